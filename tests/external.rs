//! External workers over HTTP: the fetch / heartbeat / complete / fail /
//! snooze API with its leases, the long-poll, the Workers page, and the two
//! example workers (`examples/worker.py`, `examples/worker.js`) run as real
//! processes against a real `errand serve`, one of them killed mid-job.

mod common;

use std::process::{Command, Stdio};
use std::sync::{Arc, Barrier};
use std::time::{Duration, Instant};

use common::process::{FAST, Proc, errand_cmd};
use common::{Http, ServerOptions, TestDb, TestServer, wait_for};
use errand::store::{AttemptOutcome, JobState};
use errand::web::WebConfig;
use serde_json::{Value, json};

const WAIT: Duration = Duration::from_secs(60);

fn server(db: &TestDb) -> TestServer {
    TestServer::start(
        db,
        ServerOptions {
            config: WebConfig {
                external_queues: vec!["external".into(), "external-2".into()],
                ..WebConfig::default()
            },
            ..ServerOptions::default()
        },
    )
}

fn enqueue(http: &Http, queue: &str, kind: &str, args: Value) -> i64 {
    let reply = http.post(
        "/api/jobs",
        &json!({"queue": queue, "kind": kind, "args": args}),
    );
    assert_eq!(reply.status, 202, "{}", reply.body);
    reply.json()["id"].as_i64().unwrap()
}

fn fetch(http: &Http, worker: &str, body: Value) -> Vec<Value> {
    let mut body = body;
    body["worker"] = json!(worker);
    let reply = http.post("/api/workers/fetch", &body);
    assert_eq!(reply.status, 200, "{}", reply.body);
    reply.json()["jobs"].as_array().unwrap().clone()
}

fn job(http: &Http, id: i64) -> Value {
    let reply = http.get(&format!("/api/jobs/{id}"));
    assert_eq!(reply.status, 200, "{}", reply.body);
    reply.json()
}

fn an_external_worker_fetches_heartbeats_and_completes(db: &TestDb) {
    let server = server(db);
    let http = server.http();

    // Routing: any kind on an external queue; elsewhere still 422.
    let id = enqueue(&http, "external", "resize-image", json!({"w": 64}));
    let refused = http.post("/api/jobs", &json!({"kind": "resize-image"}));
    assert_eq!(refused.status, 422, "{}", refused.body);
    assert_eq!(refused.error(), "unknown_kind");
    assert!(
        refused.body.contains("--external-queues"),
        "{}",
        refused.body
    );
    let job_row = db.store.job_get(id).unwrap().unwrap();
    assert_eq!(job_row.max_attempts, errand::store::DEFAULT_MAX_ATTEMPTS);
    assert_eq!(
        job_row.timeout_ms,
        errand::store::DEFAULT_TIMEOUT.as_millis() as i64
    );

    // Only external queues may be fetched from, and the fields are checked.
    let not_external = http.post(
        "/api/workers/fetch",
        &json!({"queues": ["default"], "worker": "raw"}),
    );
    assert_eq!(not_external.status, 422, "{}", not_external.body);
    let message = not_external.json()["message"].as_str().unwrap().to_string();
    assert!(
        message.contains("'default'") && message.contains("--external-queues"),
        "{message}"
    );
    for bad in [
        json!({"queues": [], "worker": "raw"}),
        json!({"queues": ["external"], "worker": ""}),
        json!({"queues": ["external"]}),
        json!({"queues": ["external"], "worker": "raw", "max": 0}),
        json!({"queues": ["external"], "worker": "raw", "max": 101}),
        json!({"queues": ["external"], "worker": "raw", "wait_ms": 60_001}),
        json!({"queues": ["external"], "worker": "raw", "surprise": 1}),
    ] {
        let reply = http.post("/api/workers/fetch", &bad);
        assert_eq!(reply.status, 422, "{bad}: {}", reply.body);
    }
    let malformed = http.post_raw("/api/workers/fetch", "application/json", b"{", &[]);
    assert_eq!(
        (malformed.status, malformed.error()),
        (400, "malformed_json".into())
    );

    // Fetch, heartbeat, complete.
    let jobs = fetch(
        &http,
        "raw-1",
        json!({"queues": ["external"], "wait_ms": 0}),
    );
    assert_eq!(jobs.len(), 1, "{jobs:?}");
    let fetched = &jobs[0];
    assert_eq!(fetched["id"], id);
    assert_eq!(fetched["kind"], "resize-image");
    assert_eq!(fetched["queue"], "external");
    assert_eq!(fetched["args"], json!({"w": 64}), "args come as JSON");
    assert_eq!(fetched["attempt"], 1);
    assert_eq!(fetched["max_attempts"], 25);
    assert!(fetched["deadline"].as_str().unwrap().ends_with('Z'));
    assert_eq!(
        fetched["heartbeat_ms"], 15_000,
        "the server's heartbeat interval"
    );
    let lease = fetched["lease_id"].as_i64().unwrap();
    let running = job(&http, id);
    assert_eq!(running["state"], "running");
    assert_eq!(running["locked_by"], "ext:raw-1");

    // Nothing else is ready: an immediate answer with no jobs.
    assert!(
        fetch(
            &http,
            "raw-1",
            json!({"queues": ["external"], "wait_ms": 0})
        )
        .is_empty()
    );

    let beat = http.post(
        &format!("/api/jobs/{id}/heartbeat"),
        &json!({"lease_id": lease}),
    );
    assert_eq!(beat.status, 200, "{}", beat.body);
    assert_eq!(beat.json(), json!({"cancel_requested": false}));
    assert_eq!(
        http.post(&format!("/api/jobs/{id}/heartbeat"), &json!({}))
            .status,
        422
    );
    let missing = http.post("/api/jobs/999999/heartbeat", &json!({"lease_id": 1}));
    assert_eq!((missing.status, missing.error()), (404, "not_found".into()));

    // The Workers page lists it, marked external, with its running job.
    let page = http.get("/workers");
    assert_eq!(page.status, 200);
    assert!(page.body.contains("ext:raw-1"), "{}", page.body);
    assert!(page.body.contains("external worker"), "{}", page.body);
    assert!(page.body.contains(&format!("#{id}")), "{}", page.body);

    let done = http.post(
        &format!("/api/jobs/{id}/complete"),
        &json!({"lease_id": lease, "detail": {"bytes": 1234}}),
    );
    assert_eq!(done.status, 200, "{}", done.body);
    assert_eq!(done.json(), json!({"state": "completed"}));
    let completed = job(&http, id);
    assert_eq!(completed["state"], "completed");
    assert_eq!(completed["locked_by"], "ext:raw-1");
    let attempts = completed["attempts"].as_array().unwrap();
    assert_eq!(attempts.len(), 1, "{attempts:?}");
    assert_eq!(attempts[0]["outcome"], "completed");
    assert_eq!(attempts[0]["worker"], "ext:raw-1");
    assert_eq!(attempts[0]["detail"], json!({"bytes": 1234}));

    // Fail: retried (with the delay asked for), then for good; snooze.
    let id = enqueue(&http, "external-2", "flaky", json!({}));
    let taken = fetch(
        &http,
        "raw-2",
        json!({"queues": ["external", "external-2"], "max": 5, "wait_ms": 0}),
    );
    assert_eq!(taken.len(), 1);
    let lease = taken[0]["lease_id"].as_i64().unwrap();
    let no_error = http.post(&format!("/api/jobs/{id}/fail"), &json!({"lease_id": lease}));
    assert_eq!(no_error.status, 422, "{}", no_error.body);
    let retried = http.post(
        &format!("/api/jobs/{id}/fail"),
        &json!({"lease_id": lease, "error": "upstream 503", "retry_in_ms": 0}),
    );
    assert_eq!(retried.status, 200, "{}", retried.body);
    assert_eq!(retried.json(), json!({"state": "retrying"}));
    let again = wait_for("the retry to be fetched", WAIT, || {
        let jobs = fetch(
            &http,
            "raw-2",
            json!({"queues": ["external-2"], "wait_ms": 200}),
        );
        jobs.into_iter().next()
    });
    assert_eq!(
        (again["id"].as_i64(), again["attempt"].as_i64()),
        (Some(id), Some(2))
    );
    let lease = again["lease_id"].as_i64().unwrap();
    let snoozed = http.post(
        &format!("/api/jobs/{id}/snooze"),
        &json!({"lease_id": lease, "delay_ms": 0}),
    );
    assert_eq!(snoozed.status, 200, "{}", snoozed.body);
    assert_eq!(snoozed.json(), json!({"state": "queued"}));
    let again = wait_for("the snoozed job to be fetched", WAIT, || {
        let jobs = fetch(
            &http,
            "raw-2",
            json!({"queues": ["external-2"], "wait_ms": 200}),
        );
        jobs.into_iter().next()
    });
    assert_eq!(again["attempt"], 2, "a snooze does not spend the attempt");
    let lease = again["lease_id"].as_i64().unwrap();
    let dead = http.post(
        &format!("/api/jobs/{id}/fail"),
        &json!({"lease_id": lease, "error": "bad input", "retry": false, "detail": {"line": 3}}),
    );
    assert_eq!(dead.status, 200, "{}", dead.body);
    assert_eq!(dead.json(), json!({"state": "dead"}));
    let finished = job(&http, id);
    assert_eq!(finished["state"], "dead");
    assert_eq!(finished["last_error"], "bad input");
    let outcomes: Vec<&str> = finished["attempts"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a["outcome"].as_str().unwrap())
        .collect();
    assert_eq!(outcomes, ["error", "error"]);

    // An operator's cancel reaches the worker at its heartbeat; its `fail`
    // then ends the job cancelled.
    let id = enqueue(&http, "external", "long", json!({}));
    let taken = fetch(
        &http,
        "raw-3",
        json!({"queues": ["external"], "wait_ms": 0}),
    );
    let lease = taken[0]["lease_id"].as_i64().unwrap();
    assert_eq!(
        http.post(&format!("/api/jobs/{id}/cancel"), &json!({}))
            .status,
        202
    );
    let beat = http.post(
        &format!("/api/jobs/{id}/heartbeat"),
        &json!({"lease_id": lease}),
    );
    assert_eq!(beat.json(), json!({"cancel_requested": true}));
    let stopped = http.post(
        &format!("/api/jobs/{id}/fail"),
        &json!({"lease_id": lease, "error": "cancelled by an operator"}),
    );
    assert_eq!(stopped.json(), json!({"state": "cancelled"}));
}

fn a_stale_lease_is_refused_and_changes_nothing(db: &TestDb) {
    let server = server(db);
    let http = server.http();
    let id = enqueue(&http, "external", "render", json!({"page": 1}));
    let first = fetch(&http, "slow", json!({"queues": ["external"], "wait_ms": 0}));
    let old_lease = first[0]["lease_id"].as_i64().unwrap();
    // The leader takes the job back, as from a worker that went silent, and
    // another worker fetches it under a new lease.
    let held = db.store.job_get(id).unwrap().unwrap();
    let rescued = db
        .store
        .job_rescue(
            held.lease(),
            &errand::store::Failure {
                outcome: AttemptOutcome::Lost,
                error: "worker ext:slow stopped heartbeating".into(),
                retry_in: Some(Duration::ZERO),
                detail: None,
            },
        )
        .unwrap();
    assert_eq!(rescued, Some(JobState::Retrying));
    let second = fetch(
        &http,
        "fast",
        json!({"queues": ["external"], "wait_ms": 5000}),
    );
    let new_lease = second[0]["lease_id"].as_i64().unwrap();
    assert_ne!(old_lease, new_lease);
    let before = db.store.job_get(id).unwrap().unwrap();

    for (action, body) in [
        (
            "complete",
            json!({"lease_id": old_lease, "detail": {"late": true}}),
        ),
        ("heartbeat", json!({"lease_id": old_lease})),
        (
            "fail",
            json!({"lease_id": old_lease, "error": "late", "retry": false}),
        ),
        ("snooze", json!({"lease_id": old_lease, "delay_ms": 1000})),
    ] {
        let reply = http.post(&format!("/api/jobs/{id}/{action}"), &body);
        assert_eq!(
            (reply.status, reply.error()),
            (409, "lease_lost".into()),
            "{action}: {}",
            reply.body
        );
        assert!(reply.body.contains("fetch again"), "{}", reply.body);
        assert_eq!(
            db.store.job_get(id).unwrap().unwrap(),
            before,
            "{action} with a stale lease changed nothing"
        );
    }
    let done = http.post(
        &format!("/api/jobs/{id}/complete"),
        &json!({"lease_id": new_lease}),
    );
    assert_eq!(done.status, 200, "{}", done.body);
    // A finished job refuses even its last lease.
    let twice = http.post(
        &format!("/api/jobs/{id}/complete"),
        &json!({"lease_id": new_lease}),
    );
    assert_eq!(twice.status, 409, "{}", twice.body);
    let attempts = db.store.job_attempts(id).unwrap();
    let summary: Vec<(AttemptOutcome, &str)> = attempts
        .iter()
        .map(|a| (a.outcome, a.worker.as_str()))
        .collect();
    assert_eq!(
        summary,
        [
            (AttemptOutcome::Lost, "ext:slow"),
            (AttemptOutcome::Completed, "ext:fast")
        ]
    );
}

fn a_waiting_fetch_answers_as_soon_as_a_job_is_enqueued(db: &TestDb) {
    let server = server(db);
    let http = server.http();
    // Nothing ready: the long-poll ends empty after its wait.
    let started = Instant::now();
    assert!(
        fetch(
            &http,
            "poller",
            json!({"queues": ["external"], "wait_ms": 300})
        )
        .is_empty()
    );
    assert!(started.elapsed() >= Duration::from_millis(300));

    let ready = Arc::new(Barrier::new(2));
    let poller = {
        let (http, ready) = (http.clone(), ready.clone());
        std::thread::spawn(move || {
            ready.wait();
            let started = Instant::now();
            let jobs = fetch(
                &http,
                "poller",
                json!({"queues": ["external-2", "external"], "wait_ms": 5000}),
            );
            (jobs, Instant::now(), started.elapsed())
        })
    };
    ready.wait();
    // Its worker row is written before its first claim: once it is fresh,
    // the fetch is claiming or waiting.
    let since = db.store.now_ms().unwrap();
    let waiting = wait_for("the fetch to be waiting", WAIT, || {
        if poller.is_finished() {
            return Some(false);
        }
        db.store
            .workers_list()
            .unwrap()
            .into_iter()
            .any(|w| w.id == "ext:poller" && w.heartbeat_at >= since)
            .then_some(true)
    });
    if !waiting {
        let (jobs, _, took) = poller.join().expect("the fetch answers 200");
        panic!("the fetch ended after {took:?} with {jobs:?} before anything was enqueued");
    }
    let enqueued_at = Instant::now();
    let id = enqueue(&http, "external", "ping", json!({}));
    let (jobs, answered_at, took) = poller.join().unwrap();
    assert_eq!(jobs.len(), 1, "{jobs:?}");
    assert_eq!(jobs[0]["id"], id);
    let latency = answered_at.duration_since(enqueued_at);
    assert!(
        latency < Duration::from_millis(2500) && took < Duration::from_millis(4000),
        "the waiting fetch answered {latency:?} after the enqueue ({took:?} in all): \
         well before its 5 s wait"
    );
}

fn a_fetch_abandoned_by_its_client_claims_nothing(db: &TestDb) {
    use std::io::Write;
    let server = server(db);
    let http = server.http();
    let address = server.base.trim_start_matches("http://").to_string();
    let body = json!({"queues": ["external"], "worker": "quitter", "wait_ms": 10_000}).to_string();
    let mut stream = std::net::TcpStream::connect(&address).unwrap();
    write!(
        stream,
        "POST /api/workers/fetch HTTP/1.1\r\nHost: {address}\r\nContent-Type: application/json\r\n\
         Content-Length: {}\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
    wait_for("the fetch to be waiting", WAIT, || {
        db.store
            .workers_list()
            .unwrap()
            .into_iter()
            .find(|w| w.id == "ext:quitter")
    });
    drop(stream); // the worker goes away mid-wait
    // Not a wait for a state: the grace the server has to notice, a few of
    // its probe writes (every 200 ms); a job enqueued sooner could still be
    // claimed for nobody, and would then be rescued.
    std::thread::sleep(Duration::from_millis(600));
    // A live worker waiting beside it gets the next job: the abandoned fetch
    // did not take it (it would have had it first: it waited longer).
    let live = {
        let http = server.http();
        std::thread::spawn(move || {
            fetch(
                &http,
                "stayer",
                json!({"queues": ["external"], "wait_ms": 10_000}),
            )
        })
    };
    wait_for("the live fetch to be waiting", WAIT, || {
        db.store
            .workers_list()
            .unwrap()
            .into_iter()
            .find(|w| w.id == "ext:stayer")
    });
    let id = enqueue(&http, "external", "orphan", json!({}));
    let got = live.join().unwrap();
    assert_eq!(got.len(), 1, "the live worker got nothing: {got:?}");
    assert_eq!(got[0]["id"], id);
    let job = db.store.job_get(id).unwrap().unwrap();
    assert_eq!(job.locked_by.as_deref(), Some("ext:stayer"), "{job:?}");
}

// ---------------------------------------------------------------------------
// The example workers, as processes against `errand serve`
// ---------------------------------------------------------------------------

/// `errand serve` on a free loopback port with `external` as an external
/// queue; its base URL.
fn errand_serve(db: &TestDb) -> (Proc, String) {
    let mut cmd = errand_cmd(&db.url);
    cmd.args([
        "serve",
        "--bind=127.0.0.1:0",
        "--queues=default=2",
        "--external-queues=external",
    ])
    .args(FAST);
    let server = Proc::spawn(cmd, "errand serve");
    let line = server.line("listening on http://");
    let address = line
        .split("listening on http://")
        .nth(1)
        .unwrap()
        .split_whitespace()
        .next()
        .unwrap()
        .to_string();
    (server, format!("http://{address}"))
}

#[derive(Clone, Copy, Debug)]
enum Example {
    Python,
    Node,
}

/// Starts an example worker on the queue `external`.
fn example(which: Example, base: &str, name: &str) -> Proc {
    let root = env!("CARGO_MANIFEST_DIR");
    let (program, script) = match which {
        Example::Python => ("python3", format!("{root}/examples/worker.py")),
        Example::Node => ("node", format!("{root}/examples/worker.js")),
    };
    let found = Command::new(program)
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    assert!(
        found,
        "`{program}` is not installed: the example worker tests need it. Install it (Debian: \
         apt-get install {}; .ci/run does)",
        match which {
            Example::Python => "python3",
            Example::Node => "nodejs",
        }
    );
    let mut cmd = Command::new(program);
    cmd.arg(script)
        .env("ERRAND_URL", base)
        .env("ERRAND_QUEUES", "external")
        .env("ERRAND_WORKER", name)
        // Heartbeats as often as each job says: the server's 200 ms.
        .env_remove("ERRAND_HEARTBEAT")
        .env_remove("ERRAND_TOKEN");
    let worker = Proc::spawn(cmd, &format!("the {which:?} example worker"));
    worker.line(&format!("worker {name} fetching"));
    worker
}

fn wait_job(http: &Http, id: i64, state: &str, worker: &Proc) -> Value {
    let deadline = Instant::now() + WAIT;
    loop {
        let job = job(http, id);
        if job["state"] == state {
            return job;
        }
        assert!(
            Instant::now() < deadline,
            "job {id} is {} not {state}: {job}\nworker output:\n{}",
            job["state"],
            worker.output()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn run_example(db: &TestDb, which: Example) {
    let (_server, base) = errand_serve(db);
    let http = Http::new(&base, None);
    let name = format!("{which:?}-1").to_lowercase();
    let mut worker = example(which, &base, &name);
    let echo = enqueue(&http, "external", "echo", json!({"hello": "world"}));
    let sleep = enqueue(&http, "external", "sleep", json!({"seconds": 0.6}));
    let fail = enqueue(&http, "external", "fail", json!({"error": "no such user"}));
    let unknown = enqueue(&http, "external", "fax", json!({}));

    let echoed = wait_job(&http, echo, "completed", &worker);
    assert_eq!(echoed["locked_by"], format!("ext:{name}"));
    assert_eq!(
        echoed["attempts"][0]["detail"],
        json!({"echo": {"hello": "world"}})
    );
    let slept = wait_job(&http, sleep, "completed", &worker);
    assert_eq!(slept["attempts"][0]["detail"]["slept"], 0.6);
    let failed = wait_job(&http, fail, "dead", &worker);
    assert!(
        failed["last_error"]
            .as_str()
            .unwrap()
            .contains("no such user"),
        "{failed}"
    );
    let unknown = wait_job(&http, unknown, "dead", &worker);
    assert!(
        unknown["last_error"].as_str().unwrap().contains("fax"),
        "{unknown}"
    );
    // One line per job on stdout.
    worker.line(&format!("job {echo} echo attempt 1: complete -> completed"));
    worker.line(&format!("job {fail} fail attempt 1: fail -> dead"));
    // It heartbeated while sleeping (0.6 s at 0.2 s intervals): the worker
    // row was refreshed through its job.
    let page = http.get("/workers");
    assert!(page.body.contains(&format!("ext:{name}")), "{}", page.body);

    let status = worker.terminate();
    assert!(status.success(), "{status:?}\n{}", worker.output());
    worker.line(&format!("worker {name} stopped"));
}

fn the_python_example_worker_runs_jobs(db: &TestDb) {
    run_example(db, Example::Python);
}

fn the_node_example_worker_runs_jobs(db: &TestDb) {
    run_example(db, Example::Node);
}

fn a_worker_killed_mid_job_is_rescued_and_another_finishes_it(db: &TestDb) {
    let (_server, base) = errand_serve(db);
    let http = Http::new(&base, None);
    let doomed = example(Example::Python, &base, "py-doomed");
    let id = enqueue(&http, "external", "sleep", json!({"seconds": 2}));
    let held = wait_for("the Python worker to run the job", WAIT, || {
        db.store
            .job_get(id)
            .unwrap()
            .filter(|j| j.state == JobState::Running)
    });
    assert_eq!(held.locked_by.as_deref(), Some("ext:py-doomed"));
    // Let a few heartbeats through, then SIGKILL it mid-job.
    wait_for("a heartbeat from the Python worker", WAIT, || {
        db.store
            .job_get(id)
            .unwrap()
            .filter(|j| j.heartbeat_at > held.heartbeat_at)
    });
    drop(doomed);
    let rescuer = example(Example::Node, &base, "node-rescuer");
    let done = wait_job(&http, id, "completed", &rescuer);
    assert_eq!(done["locked_by"], "ext:node-rescuer");
    assert_eq!(done["rescue_count"], 1);
    let attempts: Vec<(String, String)> = done["attempts"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| {
            (
                a["outcome"].as_str().unwrap().to_string(),
                a["worker"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    assert_eq!(
        attempts,
        [
            ("lost".to_string(), "ext:py-doomed".to_string()),
            ("completed".to_string(), "ext:node-rescuer".to_string()),
        ]
    );
    // The dead worker's late word, under its old lease, is refused.
    let late = http.post(
        &format!("/api/jobs/{id}/complete"),
        &json!({"lease_id": held.lease_id}),
    );
    assert_eq!((late.status, late.error()), (409, "lease_lost".into()));
    assert_eq!(job(&http, id)["attempts"].as_array().unwrap().len(), 2);
}

on_both_backends!(
    an_external_worker_fetches_heartbeats_and_completes,
    a_stale_lease_is_refused_and_changes_nothing,
    a_waiting_fetch_answers_as_soon_as_a_job_is_enqueued,
    a_fetch_abandoned_by_its_client_claims_nothing,
    the_python_example_worker_runs_jobs,
    the_node_example_worker_runs_jobs,
    a_worker_killed_mid_job_is_rescued_and_another_finishes_it,
);
