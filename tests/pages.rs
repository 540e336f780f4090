//! The dashboard over real HTTP, on both backends: every page and its
//! fragment, actions with their toasts, sign-in and roles, CSRF refusals,
//! hostile strings that never reach a page unescaped, and GETs that change
//! nothing.

mod common;

use std::time::Duration;

use common::{Http, Reply, ServerOptions, TestDb, TestServer, wait_for};
use errand::store::{AttemptOutcome, Failure, JobFilter, JobState, NewJob};
use errand::web::WebConfig;
use serde_json::json;

const WAIT: Duration = Duration::from_secs(20);

/// The pages and the id of the fragment each answers htmx with.
const PAGES: [(&str, &str); 8] = [
    ("/", "overview"),
    ("/jobs", "results"),
    ("/jobs?state=dead", "results"),
    ("/jobs/1", "job"),
    ("/dead", "groups"),
    ("/queues", "queues"),
    ("/workers", "workers"),
    ("/audit", "entries"),
];

/// The CSRF token a page hands to htmx.
fn csrf(page: &Reply) -> String {
    let marker = "\"X-CSRF-Token\": \"";
    let start = page.body.find(marker).expect("the page carries a token") + marker.len();
    page.body[start..start + 32].to_string()
}

/// POSTs a form the way htmx does from our pages.
fn act(http: &Http, path: &str, form: &str, token: &str) -> Reply {
    http.post_raw(
        path,
        "application/x-www-form-urlencoded",
        form.as_bytes(),
        &[
            ("HX-Request", "true"),
            ("Sec-Fetch-Site", "same-origin"),
            ("X-CSRF-Token", token),
        ],
    )
}

fn bury(db: &TestDb, job: NewJob, error: &str) -> i64 {
    let id = db.store.job_enqueue(&job.max_attempts(1)).unwrap().id;
    let queue = db.store.job_get(id).unwrap().unwrap().queue;
    let claimed = db.store.jobs_claim(&queue, "test:1:x", 1000).unwrap();
    for j in claimed {
        let failure = Failure {
            outcome: AttemptOutcome::Error,
            error: error.into(),
            retry_in: None,
            // What the attempt recorded, names and values as hostile as
            // the error.
            detail: Some(json!({ error: error, "response": error }).to_string()),
        };
        if j.id == id {
            db.store.job_fail(j.lease(), &failure).unwrap();
        } else {
            db.store.jobs_release(&[j.lease()]).unwrap();
        }
    }
    id
}

fn seed(db: &TestDb) {
    db.store
        .job_enqueue(&NewJob::new("noop", json!({"n": 1})))
        .unwrap();
    bury(
        db,
        NewJob::new("fail", json!({"order": 42})),
        "upstream 503 for order 42",
    );
    db.store
        .audit_record("api:local", "queue.pause", "queue q", 0, None)
        .unwrap();
}

fn every_page_renders_whole_and_as_a_fragment(db: &TestDb) {
    seed(db);
    let server = TestServer::start(db, ServerOptions::default());
    let http = server.http();
    for (path, fragment) in PAGES {
        let page = http.get(path);
        assert_eq!(page.status, 200, "{path}: {}", page.body);
        assert!(
            page.header("content-type")
                .unwrap()
                .starts_with("text/html")
        );
        assert!(
            page.body.starts_with("<!doctype html>"),
            "{path} is a whole page"
        );
        assert!(
            page.body.contains(&format!("id=\"{fragment}\"")),
            "{path} holds #{fragment}"
        );
        assert!(page.body.contains("/static/htmx.min.js"));
        let csp = page.header("content-security-policy").unwrap();
        assert!(csp.contains("script-src 'self'") && !csp.contains("unsafe-inline"));
        let part = http.get_with(path, &[("HX-Request", "true")]);
        assert_eq!(part.status, 200, "{path} fragment");
        assert!(
            !part.body.contains("<html"),
            "{path} fragment is not a page"
        );
        assert!(
            part.body.trim_start().starts_with(&format!(
                "<{}",
                if fragment == "overview" {
                    "div"
                } else {
                    "section"
                }
            )) || part.body.contains(&format!("id=\"{fragment}\""))
        );
        assert!(
            part.body.contains(&format!("id=\"{fragment}\"")),
            "{path} fragment is #{fragment}"
        );
    }
    assert_eq!(http.get("/jobs/999999").status, 404);
    assert_eq!(http.get("/static/htmx.min.js").status, 200);
    assert_eq!(http.get("/static/nothing.js").status, 404);
}

fn actions_answer_with_the_fragment_and_a_toast(db: &TestDb) {
    let dead = bury(db, NewJob::new("fail", json!({})), "boom");
    let queued = db
        .store
        .job_enqueue(&NewJob::new("noop", json!({})))
        .unwrap()
        .id;
    let server = TestServer::start(db, ServerOptions::default());
    let http = server.http();
    let token = csrf(&http.get("/"));

    let replay = act(&http, &format!("/jobs/{dead}/retry"), "", &token);
    assert_eq!(replay.status, 200, "{}", replay.body);
    assert!(replay.body.contains("id=\"job\"") && replay.body.contains("<hx-partial"));
    assert!(replay.body.contains(&format!("Job {dead} is queued again")));
    assert_eq!(
        db.store.job_get(dead).unwrap().unwrap().state,
        JobState::Queued
    );

    let refused = act(&http, &format!("/jobs/{queued}/retry"), "", &token);
    assert_eq!(refused.status, 409);
    assert_eq!(
        refused.header("hx-reswap"),
        Some("none"),
        "errors toast, they do not swap"
    );
    assert!(refused.body.contains("cannot be retried"));

    let bad_args = bury(db, NewJob::new("fail", json!({"to": "x"})), "bad address");
    let edited = act(
        &http,
        &format!("/jobs/{bad_args}/retry"),
        "args=%7B%22to%22%3A%22y%22%7D",
        &token,
    );
    assert_eq!(edited.status, 200, "{}", edited.body);
    assert_eq!(
        db.store.job_get(bad_args).unwrap().unwrap().args,
        r#"{"to":"y"}"#
    );
    let again = bury(db, NewJob::new("fail", json!({})), "x");
    let not_json = act(
        &http,
        &format!("/jobs/{again}/retry"),
        "args=%7Bnope",
        &token,
    );
    assert_eq!(not_json.status, 422);
    assert_eq!(
        db.store.job_get(again).unwrap().unwrap().state,
        JobState::Dead,
        "nothing changed"
    );

    let cancel = act(&http, &format!("/jobs/{queued}/cancel"), "", &token);
    assert!(cancel.body.contains(&format!("Cancelled job {queued}")));
    let delete = act(&http, &format!("/jobs/{queued}/delete"), "", &token);
    assert_eq!(delete.status, 200);
    assert_eq!(delete.header("hx-redirect"), Some("/jobs"));
    assert!(db.store.job_get(queued).unwrap().is_none());

    let ids: Vec<i64> = db
        .store
        .jobs_enqueue(&[
            NewJob::new("noop", json!({})),
            NewJob::new("noop", json!({})),
        ])
        .unwrap()
        .iter()
        .map(|e| e.id)
        .collect();
    let form = format!(
        "action=cancel&ids={}&ids={}&back=%2Fjobs%3Fstate%3Dcancelled",
        ids[0], ids[1]
    );
    let bulk = act(&http, "/jobs/bulk", &form, &token);
    assert_eq!(bulk.status, 200, "{}", bulk.body);
    assert!(bulk.body.contains("id=\"results\"") && bulk.body.contains("Cancelled: 2 job(s)"));
    assert!(
        bulk.body.contains(&format!("/jobs/{}", ids[1])),
        "the refreshed list shows them"
    );

    let pause = act(&http, "/queues/default/pause", "", &token);
    assert!(pause.body.contains("id=\"queues\"") && pause.body.contains("Paused default"));
    assert!(db.store.queues_list().unwrap()[0].paused);
    act(&http, "/queues/default/resume", "", &token);
    assert!(!db.store.queues_list().unwrap()[0].paused);

    let actions: Vec<String> = db
        .store
        .audit_list(None, 100)
        .unwrap()
        .into_iter()
        .map(|e| e.action)
        .collect();
    for action in [
        "job.retry",
        "job.cancel",
        "job.delete",
        "queue.pause",
        "queue.resume",
    ] {
        assert!(
            actions.iter().any(|a| a == action),
            "{action} audited: {actions:?}"
        );
    }
}

fn dead_letter_groups_replay_in_the_background_with_progress(db: &TestDb) {
    for i in 0..3 {
        bury(
            db,
            NewJob::new("fail", json!({"i": i})),
            &format!("timeout after {i}s"),
        );
    }
    let other = bury(db, NewJob::new("fail", json!({})), "refused");
    let server = TestServer::start(db, ServerOptions::default());
    let http = server.http();
    let page = http.get("/dead");
    assert!(page.body.contains("timeout after #") && page.body.contains(">3</a>"));
    let token = csrf(&page);
    let started = act(
        &http,
        "/dead/replay",
        "kind=fail&signature=timeout+after+%23",
        &token,
    );
    assert_eq!(started.status, 200, "{}", started.body);
    assert!(started.body.contains("class=\"task"));
    let task = started
        .body
        .split("id=\"task-")
        .nth(1)
        .unwrap()
        .split('"')
        .next()
        .unwrap()
        .to_string();
    let done = wait_for("the replay to finish", WAIT, || {
        let poll = http.get_with(&format!("/tasks/{task}"), &[("HX-Request", "true")]);
        (poll.body.contains("Done:")).then_some(poll)
    });
    assert!(done.body.contains(">3</span> of 3"), "{}", done.body);
    assert_eq!(done.header("hx-trigger"), Some("dead-changed"));
    assert_eq!(db.store.jobs_dead_count(&Default::default()).unwrap(), 1);
    assert_eq!(
        db.store.job_get(other).unwrap().unwrap().state,
        JobState::Dead
    );
    let export = http.get("/dead/export");
    assert_eq!(export.status, 200);
    let exported: serde_json::Value = serde_json::from_str(&export.body).unwrap();
    assert_eq!(exported.as_array().unwrap().len(), 1);
    assert_eq!(exported[0]["id"], other);
    let purge = act(&http, "/dead/purge", "all=1", &token);
    assert_eq!(purge.status, 200);
    wait_for("the purge", WAIT, || {
        db.store.job_get(other).unwrap().is_none().then_some(())
    });
}

fn sign_in_roles_and_csrf_guard_every_action(db: &TestDb) {
    let id = bury(db, NewJob::new("fail", json!({})), "boom");
    let server = TestServer::start(
        db,
        ServerOptions {
            config: WebConfig {
                dashboard_users: vec![
                    "ada:lovelace:admin".parse().unwrap(),
                    "vic:viewer-pw:viewer".parse().unwrap(),
                ],
                ..WebConfig::default()
            },
            ..ServerOptions::default()
        },
    );
    let anonymous = server.http();
    let challenge = anonymous.get("/");
    assert_eq!(challenge.status, 401);
    assert!(
        challenge
            .header("www-authenticate")
            .unwrap()
            .starts_with("Basic")
    );
    assert_eq!(
        Http::with_basic(server.http().base(), "ada", "wrong")
            .get("/")
            .status,
        401
    );

    let viewer = Http::with_basic(server.http().base(), "vic", "viewer-pw");
    let page = viewer.get(&format!("/jobs/{id}"));
    assert_eq!(page.status, 200);
    assert!(!page.body.contains("hx-post"), "a viewer sees no action");
    let refused = act(&viewer, &format!("/jobs/{id}/retry"), "", &csrf(&page));
    assert_eq!(refused.status, 403);
    assert!(refused.body.contains("viewers can look but not act"));

    let admin = Http::with_basic(server.http().base(), "ada", "lovelace");
    let page = admin.get(&format!("/jobs/{id}"));
    assert!(page.body.contains(&format!("hx-post=\"/jobs/{id}/retry\"")));
    let token = csrf(&page);
    let path = format!("/jobs/{id}/retry");
    let no_token = admin.post_raw(
        &path,
        "application/x-www-form-urlencoded",
        b"",
        &[("HX-Request", "true")],
    );
    assert_eq!(no_token.status, 403);
    let cross_site = admin.post_raw(
        &path,
        "application/x-www-form-urlencoded",
        b"",
        &[("Sec-Fetch-Site", "cross-site"), ("X-CSRF-Token", &token)],
    );
    assert_eq!(cross_site.status, 403);
    let foreign_origin = admin.post_raw(
        &path,
        "application/x-www-form-urlencoded",
        b"",
        &[("Origin", "https://evil.example"), ("X-CSRF-Token", &token)],
    );
    assert_eq!(foreign_origin.status, 403);
    let viewers_token = act(&admin, &path, "", &csrf(&viewer.get("/")));
    assert_eq!(viewers_token.status, 403, "tokens are per user");
    assert_eq!(
        db.store.job_get(id).unwrap().unwrap().state,
        JobState::Dead,
        "nothing changed"
    );
    let ok = act(&admin, &path, "", &token);
    assert_eq!(ok.status, 200, "{}", ok.body);
    let entry = &db.store.audit_list(None, 1).unwrap()[0];
    assert_eq!(
        (entry.actor.as_str(), entry.action.as_str()),
        ("dashboard:ada", "job.retry")
    );
}

/// Strings written to break out of HTML, attributes, htmx and templates.
const HOSTILE: [&str; 7] = [
    "<script>alert(1)</script>",
    "\"><img src=x onerror=alert(1)>",
    "' onmouseover='alert(1)' x='",
    "\" hx-post=\"/jobs/1/delete\" hx-trigger=\"load",
    "</textarea><script>alert(2)</script>",
    "<hx-partial hx-target=\"body\">owned</hx-partial>",
    "{{ 7*7 }}{% if true %}x{% endif %}<!--",
];

fn hostile_strings_never_reach_a_page_unescaped(db: &TestDb) {
    let mut ids = Vec::new();
    for (i, evil) in HOSTILE.iter().enumerate() {
        // Queue and kind names straight through the store: the API would
        // refuse them, but a Rust caller or another tool could write them.
        let job = NewJob::new(
            format!("kind{i}{evil}"),
            json!({"payload": evil, "nested": {evil.to_string(): [evil]}}),
        )
        .queue(format!("q{i}{evil}"))
        .unique_key(evil.to_string());
        ids.push(bury(db, job, &format!("{evil} failed\n{evil}")));
    }
    db.store
        .audit_record(HOSTILE[0], HOSTILE[1], HOSTILE[2], 1, Some(HOSTILE[3]))
        .unwrap();
    let server = TestServer::start(db, ServerOptions::default());
    let http = server.http();
    let mut paths: Vec<String> = PAGES.iter().map(|(p, _)| p.to_string()).collect();
    for id in &ids {
        paths.push(format!("/jobs/{id}"));
    }
    for evil in HOSTILE {
        let q: String = evil.bytes().map(|b| format!("%{b:02X}")).collect();
        paths.push(format!("/jobs?q={q}"));
        paths.push(format!("/jobs?queue={q}"));
        paths.push(format!("/dead?kind={q}"));
    }
    for path in &paths {
        for headers in [&[][..], &[("HX-Request", "true")][..]] {
            let reply = http.get_with(path, headers);
            assert!(
                reply.status == 200 || reply.status == 422,
                "{path}: {}",
                reply.status
            );
            for evil in HOSTILE {
                assert!(
                    !reply.body.contains(evil),
                    "{path} shows {evil:?} unescaped"
                );
            }
            // Escaped text may still spell `onerror=`; tags and quotes may not.
            for raw in [
                "<script>",
                "<img",
                "<!--",
                "hx-trigger=\"load",
                "onmouseover='alert",
            ] {
                assert!(!reply.body.contains(raw), "{path} holds {raw:?}");
            }
        }
    }
    // The data is still shown, as text.
    let page = http.get(&format!("/jobs/{}", ids[0]));
    assert!(
        page.body
            .contains("&#60;script&#62;alert(1)&#60;/script&#62;"),
        "shown as escaped text"
    );
    let page = http.get(&format!("/jobs/{}", ids[6]));
    assert!(
        page.body.contains("{{ 7*7 }}"),
        "template syntax in data stays text"
    );
}

fn gets_change_nothing_and_parameters_are_clamped(db: &TestDb) {
    seed(db);
    let many: Vec<NewJob> = (0..250).map(|_| NewJob::new("noop", json!({}))).collect();
    db.store.jobs_enqueue(&many).unwrap();
    let before = (
        db.store.jobs_count().unwrap(),
        db.store.audit_list(None, 100).unwrap(),
        db.store.queues_list().unwrap(),
    );
    let server = TestServer::start(db, ServerOptions::default());
    let http = server.http();
    for path in [
        "/",
        "/jobs",
        "/jobs/1",
        "/dead",
        "/queues",
        "/workers",
        "/audit",
        "/dead/export",
        "/jobs/1/retry",
        "/jobs/1/delete",
        "/queues/default/pause",
        "/dead/purge",
    ] {
        let reply = http.get(path);
        assert!(
            reply.status == 200 || reply.status == 405,
            "{path}: {}",
            reply.status
        );
    }
    let after = (
        db.store.jobs_count().unwrap(),
        db.store.audit_list(None, 100).unwrap(),
        db.store.queues_list().unwrap(),
    );
    assert_eq!(before, after, "GETs changed something");
    let rows = |body: &str| body.matches("name=\"ids\"").count();
    assert_eq!(
        rows(&http.get("/jobs?limit=100000").body),
        200,
        "page size clamped to 200"
    );
    assert_eq!(
        rows(&http.get("/jobs?limit=1").body),
        10,
        "and to at least 10"
    );
    assert!(
        http.get("/?refresh=1").body.contains("every 5s"),
        "refresh clamped to the choices"
    );
    assert!(
        !http.get("/?refresh=0").body.contains("hx-trigger=\"every"),
        "0 turns refresh off"
    );
    assert_eq!(http.get("/jobs?state=bogus").status, 422);
    let filtered = http.get("/jobs?state=dead");
    assert_eq!(rows(&filtered.body), 1);
    let _ = JobFilter::default();
}

on_both_backends!(
    every_page_renders_whole_and_as_a_fragment,
    actions_answer_with_the_fragment_and_a_toast,
    dead_letter_groups_replay_in_the_background_with_progress,
    sign_in_roles_and_csrf_guard_every_action,
    hostile_strings_never_reach_a_page_unescaped,
    gets_change_nothing_and_parameters_are_clamped,
);
