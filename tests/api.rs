//! The HTTP API over real HTTP against a running server, on both backends:
//! every endpoint and status code, idempotency and uniqueness under
//! concurrent requests, bad input refused without changing anything, 503
//! when the database is gone, the OpenAPI document, and `/metrics`.

mod common;

use std::collections::{BTreeSet, HashSet};
use std::sync::{Arc, Barrier};
use std::time::Duration;

use common::{Backend, Http, ServerOptions, TestDb, TestServer, wait_for};
use errand::store::{AttemptOutcome, Failure, JobState, NewJob, StoreOptions};
use errand::web::WebConfig;
use serde_json::{Value, json};

const WAIT: Duration = Duration::from_secs(20);

fn server(db: &TestDb) -> TestServer {
    TestServer::start(db, ServerOptions::default())
}

fn with_worker(db: &TestDb) -> TestServer {
    TestServer::start(
        db,
        ServerOptions {
            worker: true,
            ..ServerOptions::default()
        },
    )
}

fn job_count(db: &TestDb) -> i64 {
    db.store.jobs_count().unwrap().iter().map(|c| c.count).sum()
}

fn wait_job_state(http: &Http, id: i64, state: &str) -> Value {
    wait_for(&format!("job {id} to be {state}"), WAIT, || {
        let job = http.get(&format!("/api/jobs/{id}")).json();
        (job["state"] == state).then_some(job)
    })
}

fn a_202_means_committed_visible_and_run(db: &TestDb) {
    let server = with_worker(db);
    let http = server.http();
    let reply = http.post(
        "/api/jobs",
        &json!({"kind": "sleep", "args": {"ms": 5}, "priority": 3}),
    );
    assert_eq!(reply.status, 202, "{}", reply.body);
    let body = reply.json();
    let id = body["id"].as_i64().unwrap();
    assert_eq!(body["state"], "queued");
    assert_eq!(body["created"], true);
    assert_eq!(
        reply.header("location"),
        Some(format!("/api/jobs/{id}").as_str())
    );
    // Committed before the answer: the database has it already.
    assert!(db.store.job_get(id).unwrap().is_some());
    let job = wait_job_state(&http, id, "completed");
    assert_eq!(job["args"], json!({"ms": 5}));
    assert_eq!(job["priority"], 3);
    assert_eq!(job["queue"], "default");
    let attempts = job["attempts"].as_array().unwrap();
    assert_eq!(attempts.len(), 1);
    assert_eq!(attempts[0]["outcome"], "completed");
    assert!(job["finished_at"].as_str().unwrap().ends_with('Z'));
    // Scheduling: run_at and delay_ms.
    let later = http
        .post("/api/jobs", &json!({"kind": "noop", "delay_ms": 3_600_000}))
        .json();
    let scheduled = http.get(&format!("/api/jobs/{}", later["id"])).json();
    assert_eq!(
        (scheduled["state"].clone(), scheduled["scheduled"].clone()),
        (json!("queued"), json!(true))
    );
    let at = http
        .post("/api/jobs", &json!({"kind": "noop", "run_at": "2099-01-01T00:00:00Z", "max_attempts": 3, "timeout_ms": 1000}))
        .json();
    let at = http.get(&format!("/api/jobs/{}", at["id"])).json();
    assert_eq!(at["run_at"], "2099-01-01T00:00:00.000Z");
    assert_eq!(
        (at["max_attempts"].clone(), at["timeout_ms"].clone()),
        (json!(3), json!(1000))
    );
}

fn a_batch_is_all_or_nothing_in_request_order(db: &TestDb) {
    let server = TestServer::start(
        db,
        ServerOptions {
            config: WebConfig {
                batch_max: 5,
                ..WebConfig::default()
            },
            ..ServerOptions::default()
        },
    );
    let http = server.http();
    let jobs: Vec<Value> = (0..3)
        .map(|i| json!({"kind": "noop", "args": {"i": i}}))
        .collect();
    let reply = http.post("/api/jobs/batch", &json!({"jobs": jobs}));
    assert_eq!(reply.status, 202, "{}", reply.body);
    let answers = reply.json()["jobs"].as_array().unwrap().clone();
    assert_eq!(answers.len(), 3);
    for (i, answer) in answers.iter().enumerate() {
        let job = db
            .store
            .job_get(answer["id"].as_i64().unwrap())
            .unwrap()
            .unwrap();
        assert_eq!(job.args, json!({"i": i}).to_string());
    }
    let bad = http.post(
        "/api/jobs/batch",
        &json!({"jobs": [{"kind": "noop"}, {"kind": "no-such-kind"}]}),
    );
    assert_eq!((bad.status, bad.error()), (422, "unknown_kind".to_string()));
    assert!(
        bad.json()["message"]
            .as_str()
            .unwrap()
            .contains("jobs[1].kind")
    );
    let too_many: Vec<Value> = (0..6).map(|_| json!({"kind": "noop"})).collect();
    let reply = http.post("/api/jobs/batch", &json!({"jobs": too_many}));
    assert_eq!(reply.status, 422);
    assert!(
        reply.json()["message"]
            .as_str()
            .unwrap()
            .contains("1 to 5 jobs")
    );
    assert_eq!(
        http.post("/api/jobs/batch", &json!({"jobs": []})).status,
        422
    );
    assert_eq!(job_count(db), 3, "refused batches stored nothing");
}

fn bad_input_gets_a_clear_error_and_changes_nothing(db: &TestDb) {
    let server = TestServer::start(
        db,
        ServerOptions {
            config: WebConfig {
                body_limit: 2048,
                ..WebConfig::default()
            },
            ..ServerOptions::default()
        },
    );
    let http = server.http();
    let malformed = http.post_raw(
        "/api/jobs",
        "application/json",
        b"{\"kind\": \"noop\",",
        &[],
    );
    assert_eq!(
        (malformed.status, malformed.error()),
        (400, "malformed_json".to_string())
    );
    assert!(
        malformed.json()["message"]
            .as_str()
            .unwrap()
            .contains("line 1 column")
    );
    let not_json = http.post_raw("/api/jobs", "text/plain", b"kind=noop", &[]);
    assert_eq!(
        (not_json.status, not_json.error()),
        (415, "unsupported_media_type".to_string())
    );
    let big = json!({"kind": "noop", "args": {"blob": "x".repeat(4096)}});
    let too_big = http.post("/api/jobs", &big);
    assert_eq!(
        (too_big.status, too_big.error()),
        (413, "payload_too_large".to_string())
    );
    let deep = format!(
        "{{\"kind\": \"noop\", \"args\": {}{}}}",
        "[".repeat(100),
        "]".repeat(100)
    );
    let too_deep = http.post_raw("/api/jobs", "application/json", deep.as_bytes(), &[]);
    assert_eq!(
        (too_deep.status, too_deep.error()),
        (400, "too_deep".to_string())
    );

    let invalid = [
        (
            json!({"kind": "nope"}),
            "unknown_kind",
            "unknown job kind 'nope'",
        ),
        (
            json!({"kind": ""}),
            "invalid_field",
            "kind must be 1 to 100",
        ),
        (
            json!({"kind": "noop", "queue": "q".repeat(101)}),
            "invalid_field",
            "queue must be",
        ),
        (
            json!({"kind": "noop", "queue": "<script>"}),
            "invalid_field",
            "queue must be",
        ),
        (
            json!({"kind": "noop", "run_at": "tomorrow"}),
            "invalid_field",
            "RFC 3339",
        ),
        (
            json!({"kind": "noop", "run_at": "2030-01-01T00:00:00Z", "delay_ms": 5}),
            "invalid_field",
            "not both",
        ),
        (
            json!({"kind": "noop", "max_attempts": 0}),
            "invalid_field",
            "between 1 and 1000",
        ),
        (
            json!({"kind": "noop", "max_attempts": 1001}),
            "invalid_field",
            "between 1 and 1000",
        ),
        (
            json!({"kind": "noop", "timeout_ms": 0}),
            "invalid_field",
            "timeout_ms",
        ),
        (
            json!({"kind": "noop", "priority": 99999}),
            "invalid_field",
            "priority",
        ),
        (
            json!({"kind": "noop", "colour": "red"}),
            "invalid_field",
            "unknown field `colour`",
        ),
        (
            json!({"kind": "noop", "priority": "high"}),
            "invalid_field",
            "invalid type",
        ),
        (json!({"args": {}}), "invalid_field", "missing field `kind`"),
    ];
    for (body, code, message) in invalid {
        let reply = http.post("/api/jobs", &body);
        assert_eq!(reply.status, 422, "{body} → {}", reply.body);
        assert_eq!(reply.error(), code, "{body}");
        assert!(
            reply.json()["message"].as_str().unwrap().contains(message),
            "{body} → {}",
            reply.body
        );
    }
    // Hostile strings are data: stored and returned as given, never run.
    let hostile = json!({"kind": "noop", "args": {"html": "<script>alert(1)</script>", "sql": "'; DROP TABLE jobs; --"}});
    let reply = http.post("/api/jobs", &hostile);
    assert_eq!(reply.status, 202);
    let job = http.get(reply.header("location").unwrap()).json();
    assert_eq!(job["args"], hostile["args"]);
    assert_eq!(job_count(db), 1, "only the valid job was stored");
    let missing = http.get("/api/jobs/424242");
    assert_eq!(
        (missing.status, missing.error()),
        (404, "not_found".to_string())
    );
    let not_a_number = http.get("/api/jobs/abc");
    assert_eq!(not_a_number.status, 400);
    let wrong_method = http.delete("/api/stats");
    assert_eq!(
        (wrong_method.status, wrong_method.error()),
        (405, "method_not_allowed".to_string())
    );
    assert_eq!(wrong_method.header("allow"), Some("GET"));
    let no_route = http.get("/api/nothing-here");
    assert_eq!(
        (no_route.status, no_route.error()),
        (404, "no_route".to_string())
    );
}

fn idempotency_keys_return_the_same_job_and_refuse_another_body(db: &TestDb) {
    let server = server(db);
    let http = server.http();
    let key = [("Idempotency-Key", "order-42-email")];
    let first = http.post_with(
        "/api/jobs",
        &json!({"kind": "noop", "args": {"a": 1, "b": 2}}),
        &key,
    );
    assert_eq!(first.status, 202);
    // Same JSON, other key order and spacing: the same request.
    let again = http.post_raw(
        "/api/jobs",
        "application/json",
        br#"{ "args": {"b": 2, "a": 1}, "kind": "noop" }"#,
        &key,
    );
    assert_eq!(again.status, 200, "{}", again.body);
    assert_eq!(again.json()["id"], first.json()["id"]);
    assert_eq!(again.json()["created"], false);
    let other = http.post_with(
        "/api/jobs",
        &json!({"kind": "noop", "args": {"a": 2}}),
        &key,
    );
    assert_eq!(
        (other.status, other.error()),
        (422, "idempotency_key_reused".to_string())
    );
    let batch_key = [("Idempotency-Key", "import-7")];
    let batch = json!({"jobs": [{"kind": "noop"}, {"kind": "noop"}]});
    let b1 = http.post_with("/api/jobs/batch", &batch, &batch_key);
    let b2 = http.post_with("/api/jobs/batch", &batch, &batch_key);
    assert_eq!((b1.status, b2.status), (202, 200));
    assert_eq!(b1.json()["jobs"][1]["id"], b2.json()["jobs"][1]["id"]);
    assert_eq!(job_count(db), 3);
}

fn idempotency_keys_expire(db: &TestDb) {
    let server = TestServer::start(
        db,
        ServerOptions {
            config: WebConfig {
                idempotency_ttl: Duration::from_millis(50),
                ..WebConfig::default()
            },
            ..ServerOptions::default()
        },
    );
    let http = server.http();
    let key = [("Idempotency-Key", "short-lived")];
    let body = json!({"kind": "noop"});
    let first = http.post_with("/api/jobs", &body, &key).json()["id"].clone();
    let fresh = wait_for("the key to expire", WAIT, || {
        let reply = http.post_with("/api/jobs", &body, &key);
        (reply.status == 202).then_some(reply)
    });
    assert_ne!(fresh.json()["id"], first, "an expired key enqueues anew");
    // The pruner clears expired keys.
    let pruned = wait_for("the key to be prunable", WAIT, || {
        let report = db
            .store
            .jobs_prune(
                &errand::store::Retention::default(),
                Duration::from_secs(3600),
            )
            .unwrap();
        (report.keys == 1).then_some(report)
    });
    assert_eq!(pruned.keys, 1);
}

fn idempotency_and_uniqueness_hold_under_concurrent_requests(db: &TestDb) {
    let server = server(db);
    let concurrent = |make: fn(usize) -> (Value, Option<String>)| {
        let threads = 12;
        let barrier = Arc::new(Barrier::new(threads));
        let handles: Vec<_> = (0..threads)
            .map(|i| {
                let (http, barrier) = (server.http(), barrier.clone());
                let (body, key) = make(i);
                std::thread::spawn(move || {
                    barrier.wait();
                    let headers: Vec<(&str, &str)> = key
                        .as_deref()
                        .map(|k| vec![("Idempotency-Key", k)])
                        .unwrap_or_default();
                    http.post_with("/api/jobs", &body, &headers)
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().unwrap())
            .collect::<Vec<_>>()
    };
    let same_key = concurrent(|_| {
        (
            json!({"kind": "noop", "args": {"x": 1}}),
            Some("same-key".into()),
        )
    });
    let same_unique = concurrent(|i| {
        (
            json!({"kind": "noop", "args": {"i": i}, "unique_key": "nightly-report"}),
            None,
        )
    });
    for replies in [same_key, same_unique] {
        let ids: HashSet<i64> = replies
            .iter()
            .map(|r| r.json()["id"].as_i64().unwrap())
            .collect();
        assert_eq!(ids.len(), 1, "one job for all: {replies:?}");
        let created = replies.iter().filter(|r| r.status == 202).count();
        assert_eq!(created, 1, "exactly one 202");
        assert!(replies.iter().all(|r| r.status == 202 || r.status == 200));
    }
    assert_eq!(job_count(db), 2);
}

fn the_job_list_filters_and_pages_newest_first(db: &TestDb) {
    let server = server(db);
    let http = server.http();
    let mut ids = Vec::new();
    for i in 0..23 {
        let queue = if i % 2 == 0 { "default" } else { "mail" };
        let kind = if i % 3 == 0 { "sleep" } else { "noop" };
        let args = if kind == "sleep" {
            json!({"ms": 1})
        } else {
            json!({})
        };
        ids.push(
            http.post(
                "/api/jobs",
                &json!({"kind": kind, "queue": queue, "args": args}),
            )
            .json()["id"]
                .as_i64()
                .unwrap(),
        );
    }
    let mut seen = Vec::new();
    let mut next = Some("/api/jobs?limit=5".to_string());
    while let Some(url) = next {
        let page = http.get(&url).json();
        seen.extend(
            page["jobs"]
                .as_array()
                .unwrap()
                .iter()
                .map(|j| j["id"].as_i64().unwrap()),
        );
        next = page["next"].as_str().map(str::to_string);
    }
    let mut newest_first = ids.clone();
    newest_first.reverse();
    assert_eq!(seen, newest_first, "every job once, newest first");
    let mail = http.get("/api/jobs?queue=mail&limit=100").json();
    assert_eq!(mail["jobs"].as_array().unwrap().len(), 11);
    let sleeps = http
        .get("/api/jobs?kind=sleep&state=queued,retrying&limit=100")
        .json();
    assert_eq!(sleeps["jobs"].as_array().unwrap().len(), 8);
    assert!(sleeps["next"].is_null());
    let clamped = http.get("/api/jobs?limit=0").json();
    assert_eq!(
        clamped["jobs"].as_array().unwrap().len(),
        1,
        "limit clamps to at least 1"
    );
    let bad_state = http.get("/api/jobs?state=lost");
    assert_eq!(
        (bad_state.status, bad_state.error()),
        (422, "invalid_field".to_string())
    );
    assert_eq!(http.get("/api/jobs?limit=many").status, 400);
}

fn job_actions_answer_with_the_status_that_fits_the_state(db: &TestDb) {
    let server = server(db);
    let http = server.http();
    let id = http.post("/api/jobs", &json!({"kind": "noop"})).json()["id"]
        .as_i64()
        .unwrap();
    let retry_queued = http.post(&format!("/api/jobs/{id}/retry"), &json!({}));
    assert_eq!(
        (retry_queued.status, retry_queued.error()),
        (409, "conflict".to_string())
    );
    assert!(
        retry_queued.json()["message"]
            .as_str()
            .unwrap()
            .contains("queued")
    );
    let cancel = http.post(&format!("/api/jobs/{id}/cancel"), &json!({}));
    assert_eq!(
        (cancel.status, cancel.json()["state"].clone()),
        (200, json!("cancelled"))
    );
    assert_eq!(
        http.post(&format!("/api/jobs/{id}/cancel"), &json!({}))
            .status,
        409
    );
    let replay = http.post(&format!("/api/jobs/{id}/retry"), &json!({}));
    assert_eq!(
        (replay.status, replay.json()["state"].clone()),
        (200, json!("queued"))
    );

    // A running job: cancel is requested (202), delete is refused (409).
    let claimed = db.store.jobs_claim("default", "test:1:x", 1).unwrap();
    assert_eq!(claimed[0].id, id);
    let cancel_running = http.post(&format!("/api/jobs/{id}/cancel"), &json!({}));
    assert_eq!(cancel_running.status, 202);
    assert_eq!(cancel_running.json()["cancel_requested"], true);
    let retry_running = http.post(&format!("/api/jobs/{id}/retry"), &json!({}));
    assert_eq!(
        (retry_running.status, retry_running.error()),
        (409, "conflict".to_string())
    );
    assert!(
        retry_running.json()["message"]
            .as_str()
            .unwrap()
            .contains("running")
    );
    let delete_running = http.delete(&format!("/api/jobs/{id}"));
    assert_eq!(
        (delete_running.status, delete_running.error()),
        (409, "conflict".to_string())
    );
    db.store.jobs_complete(&[claimed[0].lease()]).unwrap();
    assert_eq!(http.delete(&format!("/api/jobs/{id}")).status, 204);
    assert_eq!(http.get(&format!("/api/jobs/{id}")).status, 404);
    for path in ["retry", "cancel"] {
        assert_eq!(
            http.post(&format!("/api/jobs/{id}/{path}"), &json!({}))
                .status,
            404
        );
    }
    assert_eq!(http.delete(&format!("/api/jobs/{id}")).status, 404);
    let audit: Vec<String> = db
        .store
        .audit_list(None, 100)
        .unwrap()
        .into_iter()
        .rev()
        .map(|e| format!("{} {} {}", e.actor, e.action, e.target))
        .collect();
    assert_eq!(
        audit,
        [
            format!("api:local job.cancel job {id}"),
            format!("api:local job.retry job {id}"),
            format!("api:local job.cancel job {id}"),
            format!("api:local job.delete job {id}"),
        ]
    );
}

fn dead_letters_replay_by_filter(db: &TestDb) {
    let server = server(db);
    let http = server.http();
    let mut dead = Vec::new();
    for queue in ["default", "mail", "mail"] {
        let id = db
            .store
            .job_enqueue(&NewJob::new("fail", json!({})).queue(queue))
            .unwrap()
            .id;
        let job = db.store.jobs_claim(queue, "test:1:x", 1).unwrap().remove(0);
        let failure = Failure {
            outcome: AttemptOutcome::Error,
            error: "boom".into(),
            retry_in: None,
            detail: None,
        };
        db.store.job_fail(job.lease(), &failure).unwrap();
        dead.push(id);
    }
    let vague = http.post("/api/dead/replay", &json!({}));
    assert_eq!(vague.status, 422);
    assert!(
        vague.json()["message"]
            .as_str()
            .unwrap()
            .contains("\"all\": true")
    );
    let mail = http.post("/api/dead/replay", &json!({"queue": "mail"}));
    assert_eq!(
        (mail.status, mail.json()["replayed"].clone()),
        (200, json!(2))
    );
    let rest = http.post("/api/dead/replay", &json!({"all": true}));
    assert_eq!(rest.json()["replayed"], 1);
    for id in dead {
        assert_eq!(
            db.store.job_get(id).unwrap().unwrap().state,
            JobState::Queued
        );
    }
    let audit = db.store.audit_list(None, 1).unwrap();
    assert_eq!(
        (audit[0].action.as_str(), audit[0].jobs),
        ("dead.replay", 1)
    );
    // The same selectors purge; a group is kind + error signature.
    let gone = bury_once(db, "purge-a", "mailbox 7 full");
    let kept = bury_once(db, "purge-b", "address unknown");
    let purge = http.post(
        "/api/dead/purge",
        &json!({"kind": "fail", "signature": "mailbox # full"}),
    );
    assert_eq!(
        (purge.status, purge.json()["purged"].clone()),
        (200, json!(1)),
        "{}",
        purge.body
    );
    assert!(db.store.job_get(gone).unwrap().is_none());
    assert_eq!(
        db.store.job_get(kept).unwrap().unwrap().state,
        JobState::Dead
    );
    assert_eq!(http.post("/api/dead/purge", &json!({})).status, 422);
}

fn bury_once(db: &TestDb, queue: &str, error: &str) -> i64 {
    let id = db
        .store
        .job_enqueue(&NewJob::new("fail", json!({})).queue(queue))
        .unwrap()
        .id;
    let job = db.store.jobs_claim(queue, "test:1:x", 1).unwrap().remove(0);
    let failure = Failure {
        outcome: AttemptOutcome::Error,
        error: error.into(),
        retry_in: None,
        detail: None,
    };
    db.store.job_fail(job.lease(), &failure).unwrap();
    id
}

fn bulk_actions_act_on_ids(db: &TestDb) {
    let server = server(db);
    let http = server.http();
    let ids: Vec<i64> = (0..3)
        .map(|_| {
            http.post("/api/jobs", &json!({"kind": "noop"})).json()["id"]
                .as_i64()
                .unwrap()
        })
        .collect();
    let running = db
        .store
        .jobs_claim("default", "test:1:x", 1)
        .unwrap()
        .remove(0)
        .id;
    let reply = http.post(
        "/api/jobs/bulk",
        &json!({"action": "delete", "ids": [ids[0], ids[1], ids[2], 424242]}),
    );
    assert_eq!(reply.status, 200, "{}", reply.body);
    assert_eq!(
        reply.json(),
        json!({"applied": 2, "refused": 1, "missing": 1})
    );
    assert_eq!(
        db.store.job_get(running).unwrap().unwrap().state,
        JobState::Running
    );
    assert_eq!(
        http.post("/api/jobs/bulk", &json!({"action": "explode", "ids": [1]}))
            .status,
        422
    );
    assert_eq!(
        http.post("/api/jobs/bulk", &json!({"action": "retry", "ids": []}))
            .status,
        422
    );
    let audit = &db.store.audit_list(None, 1).unwrap()[0];
    assert_eq!((audit.action.as_str(), audit.jobs), ("job.delete", 2));
}

fn queues_pause_resume_and_stats_add_up(db: &TestDb) {
    let server = server(db);
    let http = server.http();
    http.post("/api/jobs/batch", &json!({"jobs": [{"kind": "noop"}, {"kind": "noop", "queue": "mail"}, {"kind": "noop", "queue": "mail", "delay_ms": 600000}]}));
    let paused = http.post("/api/queues/mail/pause", &json!({}));
    assert_eq!(paused.json(), json!({"name": "mail", "paused": true}));
    assert!(
        db.store
            .jobs_claim("mail", "test:1:x", 10)
            .unwrap()
            .is_empty()
    );
    let queues = http.get("/api/queues").json();
    let mail = queues["queues"]
        .as_array()
        .unwrap()
        .iter()
        .find(|q| q["name"] == "mail")
        .unwrap()
        .clone();
    assert_eq!(mail["paused"], true);
    assert_eq!(mail["counts"]["queued"], 2);
    assert_eq!(mail["scheduled"], 1);
    assert!(mail["oldest_claimable_age_ms"].as_i64().unwrap() >= 0);
    let resumed = http.post("/api/queues/mail/resume", &json!({}));
    assert_eq!(resumed.json()["paused"], false);
    assert_eq!(
        db.store.jobs_claim("mail", "test:1:x", 10).unwrap().len(),
        1
    );
    let stats = http.get("/api/stats").json();
    assert_eq!(stats["jobs"]["queued"], 2);
    assert_eq!(stats["jobs"]["running"], 1);
    assert_eq!(stats["jobs"]["dead"], 0);
    assert_eq!(
        (stats["queues"].clone(), stats["scheduled"].clone()),
        (json!(2), json!(1))
    );
    let bad = http.post("/api/queues/%3Cx%3E/pause", &json!({}));
    assert_eq!(bad.status, 422);
}

fn tokens_are_required_when_configured(db: &TestDb) {
    let server = TestServer::start(
        db,
        ServerOptions {
            config: WebConfig {
                api_tokens: vec!["s3cret-one".into(), "s3cret-two".into()],
                ..WebConfig::default()
            },
            ..ServerOptions::default()
        },
    );
    let anonymous = server.http();
    let none = anonymous.post("/api/jobs", &json!({"kind": "noop"}));
    assert_eq!(
        (none.status, none.error()),
        (401, "unauthorized".to_string())
    );
    assert_eq!(none.header("www-authenticate"), Some("Bearer"));
    assert_eq!(
        server.http_with_token("guess").get("/api/stats").status,
        401
    );
    assert_eq!(anonymous.get("/metrics").status, 401);
    assert_eq!(job_count(db), 0);
    for token in ["s3cret-one", "s3cret-two"] {
        let http = server.http_with_token(token);
        assert_eq!(http.post("/api/jobs", &json!({"kind": "noop"})).status, 202);
        assert_eq!(http.get("/metrics").status, 200);
    }
    // Probes and the API description stay open.
    assert_eq!(anonymous.get("/healthz").status, 200);
    assert_eq!(anonymous.get("/readyz").status, 200);
    assert_eq!(anonymous.get("/api/openapi.json").status, 200);
}

/// A store that gives up quickly when the database is unreachable.
fn impatient_store(db: &TestDb) -> errand::Store {
    errand::Store::open(
        &db.url,
        &StoreOptions {
            connect_timeout: Duration::from_secs(1),
            sqlite_busy_timeout: Duration::from_millis(200),
            ..StoreOptions::default()
        },
    )
    .unwrap()
}

fn an_unavailable_database_gets_503_and_never_a_202(db: &TestDb) {
    let server = TestServer::start(
        db,
        ServerOptions {
            store: Some(impatient_store(db)),
            ..ServerOptions::default()
        },
    );
    let http = server.http();
    let assert_unavailable = |reply: common::Reply| {
        assert_eq!(
            (reply.status, reply.error()),
            (503, "unavailable".to_string()),
            "{}",
            reply.body
        );
        assert!(reply.header("retry-after").is_some());
    };
    match db.backend {
        Backend::Sqlite => {
            // Another process holds the write lock.
            use diesel::Connection;
            use diesel::connection::SimpleConnection;
            let mut holder = diesel::SqliteConnection::establish(&db.url).unwrap();
            holder.batch_execute("BEGIN EXCLUSIVE").unwrap();
            assert_unavailable(http.post("/api/jobs", &json!({"kind": "noop"})));
            holder.batch_execute("ROLLBACK").unwrap();
        }
        Backend::Postgres => {
            // The server goes away: no new connections, existing ones cut.
            use diesel::{Connection, RunQueryDsl};
            let name = db.url.rsplit('/').next().unwrap().to_string();
            let mut admin = diesel::PgConnection::establish(&common::pg_admin_url()).unwrap();
            diesel::sql_query(format!("ALTER DATABASE {name} ALLOW_CONNECTIONS false"))
                .execute(&mut admin)
                .unwrap();
            diesel::sql_query(format!(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = '{name}'"
            ))
            .execute(&mut admin)
            .unwrap();
            assert_unavailable(http.post("/api/jobs", &json!({"kind": "noop"})));
            assert_unavailable(http.get("/readyz"));
            diesel::sql_query(format!("ALTER DATABASE {name} ALLOW_CONNECTIONS true"))
                .execute(&mut admin)
                .unwrap();
        }
    }
    assert_eq!(job_count(db), 0, "nothing was stored");
    // Back: the same request now succeeds.
    let reply = wait_for("the database to come back", WAIT, || {
        let reply = http.post("/api/jobs", &json!({"kind": "noop"}));
        (reply.status == 202).then_some(reply)
    });
    assert!(
        db.store
            .job_get(reply.json()["id"].as_i64().unwrap())
            .unwrap()
            .is_some()
    );
}

fn the_openapi_document_validates_and_lists_every_route(db: &TestDb) {
    let server = server(db);
    let reply = server.http().get("/api/openapi.json");
    assert_eq!(reply.status, 200);
    let spec = oas3::from_json(&reply.body).expect("a valid OpenAPI 3.1 document");
    let documented: BTreeSet<String> = spec
        .operations()
        .map(|(path, method, _)| format!("{} {path}", method.as_str()))
        .collect();
    let served: BTreeSet<String> = [
        "POST /api/jobs",
        "GET /api/jobs",
        "POST /api/jobs/batch",
        "GET /api/jobs/{id}",
        "DELETE /api/jobs/{id}",
        "POST /api/jobs/{id}/retry",
        "POST /api/jobs/{id}/cancel",
        "POST /api/dead/replay",
        "POST /api/dead/purge",
        "POST /api/jobs/bulk",
        "GET /api/queues",
        "POST /api/queues/{name}/pause",
        "POST /api/queues/{name}/resume",
        "GET /api/stats",
        "POST /api/workers/fetch",
        "POST /api/jobs/{id}/heartbeat",
        "POST /api/jobs/{id}/complete",
        "POST /api/jobs/{id}/fail",
        "POST /api/jobs/{id}/snooze",
        "GET /api/openapi.json",
        "GET /healthz",
        "GET /readyz",
        "GET /metrics",
    ]
    .into_iter()
    .map(String::from)
    .collect();
    assert_eq!(documented, served);
    // Every documented route answers (not the catch-all 404).
    let http = server.http();
    for route in &served {
        let (method, path) = route.split_once(' ').unwrap();
        let path = path.replace("{id}", "1").replace("{name}", "default");
        let reply = match method {
            "GET" => http.get(&path),
            "DELETE" => http.delete(&path),
            _ => http.post(&path, &json!({})),
        };
        assert_ne!(
            reply.json_or_null()["error"],
            "no_route",
            "{route} is not served"
        );
    }
    // Every error response is documented with the error schema.
    let value: Value = serde_json::from_str(&reply.body).unwrap();
    assert!(value["components"]["schemas"]["ErrorBody"].is_object());
    assert!(value["components"]["securitySchemes"]["bearer"].is_object());
}

fn metrics_parse_and_count_what_happens(db: &TestDb) {
    let server = with_worker(db);
    let http = server.http();
    let scrape = || {
        let reply = http.get("/metrics");
        assert_eq!(reply.status, 200);
        assert!(
            reply
                .header("content-type")
                .unwrap()
                .contains("openmetrics-text")
        );
        let lines = reply.body.lines().map(|l| Ok(l.to_string()));
        prometheus_parse::Scrape::parse(lines).expect("Prometheus text")
    };
    let value = |scrape: &prometheus_parse::Scrape, metric: &str, labels: &[(&str, &str)]| -> f64 {
        scrape
            .samples
            .iter()
            .filter(|s| s.metric == metric)
            .filter(|s| labels.iter().all(|(k, v)| s.labels.get(k) == Some(v)))
            .map(|s| match s.value {
                prometheus_parse::Value::Counter(v)
                | prometheus_parse::Value::Gauge(v)
                | prometheus_parse::Value::Untyped(v) => v,
                _ => 0.0,
            })
            .sum()
    };
    let before = scrape();
    assert_eq!(value(&before, "errand_database_up", &[]), 1.0);
    assert_eq!(
        value(&before, "errand_worker_threads", &[("queue", "default")]),
        4.0
    );
    let batch: Vec<Value> = (0..3).map(|_| json!({"kind": "noop"})).collect();
    http.post("/api/jobs/batch", &json!({"jobs": batch}));
    let fail = http
        .post("/api/jobs", &json!({"kind": "fail", "max_attempts": 1}))
        .json();
    wait_job_state(&http, fail["id"].as_i64().unwrap(), "dead");
    wait_for("the no-ops to complete", WAIT, || {
        let after = scrape();
        (value(
            &after,
            "errand_jobs_completed_total",
            &[("queue", "default")],
        ) == 3.0)
            .then_some(())
    });
    let after = scrape();
    let q = [("queue", "default")];
    assert_eq!(
        value(&after, "errand_jobs_enqueued_total", &q)
            - value(&before, "errand_jobs_enqueued_total", &q),
        4.0
    );
    assert_eq!(value(&after, "errand_jobs_failed_total", &q), 1.0);
    assert_eq!(value(&after, "errand_jobs_dead_total", &q), 1.0);
    assert_eq!(
        value(
            &after,
            "errand_jobs",
            &[("queue", "default"), ("state", "completed")]
        ),
        3.0
    );
    assert_eq!(
        value(
            &after,
            "errand_jobs",
            &[("queue", "default"), ("state", "dead")]
        ),
        1.0
    );
    assert_eq!(
        value(
            &after,
            "errand_job_run_seconds_count",
            &[("queue", "default"), ("kind", "noop")]
        ),
        3.0
    );
    assert_eq!(
        value(&after, "errand_job_start_delay_seconds_count", &q),
        4.0
    );
    assert_eq!(value(&after, "errand_worker_threads_busy", &q), 0.0);
    assert_eq!(value(&after, "errand_workers", &[]), 1.0);
}

on_both_backends!(
    a_202_means_committed_visible_and_run,
    a_batch_is_all_or_nothing_in_request_order,
    bad_input_gets_a_clear_error_and_changes_nothing,
    idempotency_keys_return_the_same_job_and_refuse_another_body,
    idempotency_keys_expire,
    idempotency_and_uniqueness_hold_under_concurrent_requests,
    the_job_list_filters_and_pages_newest_first,
    job_actions_answer_with_the_status_that_fits_the_state,
    dead_letters_replay_by_filter,
    bulk_actions_act_on_ids,
    queues_pause_resume_and_stats_add_up,
    tokens_are_required_when_configured,
    an_unavailable_database_gets_503_and_never_a_202,
    the_openapi_document_validates_and_lists_every_route,
    metrics_parse_and_count_what_happens,
);
