//! errand as users run it: the binary, real processes, real signals. A worker
//! killed with SIGKILL mid-job loses nothing; two processes share a queue
//! without running a job twice; SIGTERM releases in-flight work; `serve`
//! answers HTTP; the command line explains itself.

mod common;

use std::collections::HashMap;
use std::time::Duration;

use common::process::{FAST, Proc, errand_cmd};
use common::{TestDb, wait_for, wait_state};
use errand::store::{AttemptOutcome, JobFilter, JobState, NewJob};
use serde_json::json;

const WAIT: Duration = Duration::from_secs(60);

fn all_final(db: &TestDb, total: usize) -> bool {
    let counts = db.store.jobs_count().unwrap();
    let finished: i64 = counts
        .iter()
        .filter(|c| c.state.is_final())
        .map(|c| c.count)
        .sum();
    finished as usize == total
}

fn all_jobs(db: &TestDb) -> Vec<errand::Job> {
    let mut jobs = Vec::new();
    let mut before = None;
    loop {
        let page = db
            .store
            .jobs_list(&JobFilter {
                limit: 1000,
                before_id: before,
                ..Default::default()
            })
            .unwrap();
        match page.last() {
            Some(last) => before = Some(last.id),
            None => return jobs,
        }
        jobs.extend(page);
    }
}

/// enqueued = completed + dead + cancelled + pending, and every completed
/// job has exactly one successful attempt.
fn assert_nothing_lost(db: &TestDb, enqueued: usize) -> Vec<errand::Job> {
    let jobs = all_jobs(db);
    let by_state = |s: JobState| jobs.iter().filter(|j| j.state == s).count();
    let pending =
        by_state(JobState::Queued) + by_state(JobState::Running) + by_state(JobState::Retrying);
    assert_eq!(
        enqueued,
        by_state(JobState::Completed)
            + by_state(JobState::Dead)
            + by_state(JobState::Cancelled)
            + pending,
        "every enqueued job is accounted for"
    );
    for job in jobs.iter().filter(|j| j.state == JobState::Completed) {
        let successes = db
            .store
            .job_attempts(job.id)
            .unwrap()
            .iter()
            .filter(|a| a.outcome == AttemptOutcome::Completed)
            .count();
        assert_eq!(
            successes, 1,
            "job {} has {successes} successful attempts",
            job.id
        );
    }
    jobs
}

fn a_worker_killed_mid_job_loses_nothing(db: &TestDb) {
    let mut jobs: Vec<NewJob> = (0..200).map(|_| NewJob::new("noop", json!({}))).collect();
    jobs.extend((0..4).map(|_| NewJob::new("sleep", json!({"ms": 1500})).priority(-1)));
    db.store.jobs_enqueue(&jobs).unwrap();
    let mut args = vec!["work", "--queues=default=4"];
    args.extend_from_slice(FAST);
    let doomed = Proc::start(&db.url, &args);
    let prefix = format!(":{}:", doomed.pid());
    let victim = wait_for("a sleep job running in the doomed process", WAIT, || {
        db.store
            .jobs_list(&JobFilter {
                states: vec![JobState::Running],
                kind: Some("sleep".into()),
                ..Default::default()
            })
            .unwrap()
            .into_iter()
            .find(|j| j.locked_by.as_deref().is_some_and(|w| w.contains(&prefix)))
    });
    drop(doomed); // SIGKILL, mid-job
    let rescuer = Proc::start(&db.url, &args);
    wait_for("every job to finish", WAIT, || {
        all_final(db, jobs.len()).then_some(())
    });
    drop(rescuer);
    let finished = assert_nothing_lost(db, jobs.len());
    assert!(finished.iter().all(|j| j.state == JobState::Completed));
    let attempts = db.store.job_attempts(victim.id).unwrap();
    assert_eq!(attempts[0].outcome, AttemptOutcome::Lost, "{attempts:?}");
    assert!(attempts[0].error.as_deref().unwrap().contains(&prefix));
    assert_eq!(attempts.last().unwrap().outcome, AttemptOutcome::Completed);
}

fn two_processes_share_a_queue_without_running_a_job_twice(db: &TestDb) {
    // Short sleeps rather than no-ops, so that neither process can finish
    // the whole queue before the other's first poll.
    let jobs: Vec<NewJob> = (0..600)
        .map(|_| NewJob::new("sleep", json!({"ms": 3})))
        .collect();
    // No rescue is expected here: the default heartbeat and stale-after
    // leave a loaded machine plenty of room, so a second attempt would mean
    // a double claim.
    let args = ["work", "--queues=default=4", "--poll-interval=100ms"];
    let a = Proc::start(&db.url, &args);
    let b = Proc::start(&db.url, &args);
    a.line("worker started");
    b.line("worker started");
    for chunk in jobs.chunks(100) {
        db.store.jobs_enqueue(chunk).unwrap();
    }
    wait_for("every job to finish", WAIT, || {
        all_final(db, jobs.len()).then_some(())
    });
    let finished = assert_nothing_lost(db, jobs.len());
    let claimed_twice: Vec<_> = finished
        .iter()
        .filter(|j| j.attempt != 1)
        .map(|j| (j.id, db.store.job_attempts(j.id).unwrap()))
        .collect();
    assert!(
        claimed_twice.is_empty(),
        "claimed more than once: {claimed_twice:?}"
    );
    let mut per_process: HashMap<String, usize> = HashMap::new();
    for job in &finished {
        *per_process
            .entry(job.locked_by.clone().unwrap())
            .or_default() += 1;
    }
    assert_eq!(
        per_process.len(),
        2,
        "both processes took work: {per_process:?}"
    );
}

fn sigterm_releases_the_running_job_and_exits_cleanly(db: &TestDb) {
    let id = db
        .store
        .job_enqueue(&NewJob::new("sleep", json!({"ms": 600_000})))
        .unwrap()
        .id;
    let mut worker = Proc::start(&db.url, &["work", "--shutdown-grace=300ms"]);
    wait_state(&db.store, id, JobState::Running, WAIT);
    worker.signal("-TERM");
    assert!(worker.wait_exit().success());
    let j = db.store.job_get(id).unwrap().unwrap();
    assert_eq!((j.state, j.attempt), (JobState::Queued, 0));
    assert!(db.store.job_attempts(id).unwrap().is_empty());
    assert!(db.store.workers_list().unwrap().is_empty());
    assert!(
        db.store.leader_get().unwrap().is_none(),
        "leadership was handed back"
    );
}

fn serve_answers_healthz_and_runs_what_the_cli_enqueues(db: &TestDb) {
    let mut server = Proc::start(&db.url, &["serve", "--bind=127.0.0.1:0"]);
    let address = serve_address(&server);
    let body = ureq::get(&format!("http://{address}/healthz"))
        .call()
        .unwrap()
        .body_mut()
        .read_to_string()
        .unwrap();
    assert_eq!(
        serde_json::from_str::<serde_json::Value>(&body).unwrap(),
        json!({"status": "ok"})
    );
    let out = errand_cmd(&db.url)
        .args(["enqueue", "default", "sleep", r#"{"ms": 10}"#, "--json"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let printed: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let id = printed["id"].as_i64().unwrap();
    wait_state(&db.store, id, JobState::Completed, WAIT);
    server.signal("-INT");
    assert!(server.wait_exit().success());
}

fn serve_address(server: &Proc) -> String {
    let line = server.line("listening on http://");
    line.rsplit("http://").next().unwrap().trim().to_string()
}

fn a_job_answered_202_survives_a_sigkill_of_the_server(db: &TestDb) {
    // The server works `default`; the job goes to `parked`, so it waits.
    let server = Proc::start(&db.url, &["serve", "--bind=127.0.0.1:0"]);
    let http = common::Http::new(&format!("http://{}", serve_address(&server)), None);
    let reply = http.post("/api/jobs", &json!({"kind": "noop", "queue": "parked"}));
    assert_eq!(reply.status, 202);
    drop(server); // SIGKILL, right after the answer
    let restarted = Proc::start(&db.url, &["serve", "--bind=127.0.0.1:0"]);
    let http = common::Http::new(&format!("http://{}", serve_address(&restarted)), None);
    let job = http.get(reply.header("location").unwrap());
    assert_eq!(job.status, 200, "{}", job.body);
    assert_eq!(job.json()["state"], "queued");
}

fn serve_refuses_an_open_bind_without_a_token(db: &TestDb) {
    let mut open = Proc::start(&db.url, &["serve", "--bind=0.0.0.0:0"]);
    assert!(!open.wait_exit().success());
    open.line("refusing to listen on 0.0.0.0");
    let mut token_only = Proc::start(
        &db.url,
        &["serve", "--bind=0.0.0.0:0", "--api-token=s3cret"],
    );
    assert!(!token_only.wait_exit().success());
    token_only.line("without dashboard users");
    let guarded = Proc::start(
        &db.url,
        &[
            "serve",
            "--bind=0.0.0.0:0",
            "--api-token=s3cret",
            "--dashboard-user=ada:pw:admin",
        ],
    );
    let address = serve_address(&guarded).replace("0.0.0.0", "127.0.0.1");
    let anonymous = common::Http::new(&format!("http://{address}"), None);
    assert_eq!(anonymous.get("/api/stats").status, 401);
    let member = common::Http::new(&format!("http://{address}"), Some("s3cret"));
    assert_eq!(member.get("/api/stats").status, 200);
    assert_eq!(
        anonymous.get("/").status,
        401,
        "the dashboard asks for sign-in"
    );
    let ada = common::Http::with_basic(&format!("http://{address}"), "ada", "pw");
    assert_eq!(ada.get("/").status, 200);
}

fn bench_measures_errand_and_the_baseline_and_leaves_nothing_behind(db: &TestDb) {
    // A job of the user's own stays untouched.
    let mine = db
        .store
        .job_enqueue(&errand::NewJob::new("noop", serde_json::json!({})).queue("mine"))
        .unwrap()
        .id;
    let out = errand_cmd(&db.url)
        .args([
            "bench",
            "--jobs",
            "300",
            "--pickup-samples",
            "5",
            "--baseline",
            "--json",
        ])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    for key in [
        "enqueue_jobs_per_s",
        "drain_jobs_per_s",
        "pickup_p50_ms",
        "pickup_p99_ms",
        "baseline_enqueue_jobs_per_s",
        "baseline_drain_jobs_per_s",
        "ratio",
    ] {
        let v = report[key]
            .as_f64()
            .unwrap_or_else(|| panic!("{key} in {report}"));
        assert!(v > 0.0, "{key} = {v}");
    }
    assert_eq!(report["jobs"], 300);
    assert_eq!(report["pickup_samples"], 5);
    let ratio = report["drain_jobs_per_s"].as_f64().unwrap()
        / report["baseline_drain_jobs_per_s"].as_f64().unwrap();
    assert!((ratio - report["ratio"].as_f64().unwrap()).abs() < 1e-9);
    assert!(
        report["pickup_p50_ms"].as_f64() <= report["pickup_p99_ms"].as_f64(),
        "{report}"
    );
    // Only the user's job is left.
    let left = all_jobs(db);
    assert_eq!(left.len(), 1, "{left:?}");
    assert_eq!(left[0].id, mine);

    let text = errand_cmd(&db.url)
        .args(["bench", "--jobs", "50", "--pickup-samples", "2"])
        .output()
        .unwrap();
    let text = String::from_utf8(text.stdout).unwrap();
    for word in ["enqueue", "drain", "jobs/s", "pickup", "p50", "p99"] {
        assert!(text.contains(word), "{word} in {text}");
    }
}

on_both_backends!(
    bench_measures_errand_and_the_baseline_and_leaves_nothing_behind,
    a_job_answered_202_survives_a_sigkill_of_the_server,
    serve_refuses_an_open_bind_without_a_token,
    a_worker_killed_mid_job_loses_nothing,
    two_processes_share_a_queue_without_running_a_job_twice,
    sigterm_releases_the_running_job_and_exits_cleanly,
    serve_answers_healthz_and_runs_what_the_cli_enqueues,
);

#[test]
fn serve_with_no_options_creates_errand_db_in_the_current_directory() {
    let dir = tempfile::tempdir().unwrap();
    let mut cmd = errand_cmd("unused");
    cmd.env_remove("ERRAND_DATABASE_URL")
        // Port 0: the one setting a test cannot leave at its default.
        .env("ERRAND_BIND", "127.0.0.1:0")
        .current_dir(dir.path())
        .arg("serve");
    let mut server = Proc::spawn(cmd, "errand");
    server.line("listening on http://");
    assert!(dir.path().join("errand.db").exists());
    server.signal("-TERM");
    assert!(server.wait_exit().success());
    let store = errand::Store::open(
        dir.path().join("errand.db").to_str().unwrap(),
        &errand::store::StoreOptions::default(),
    )
    .unwrap();
    assert!(store.jobs_count().unwrap().is_empty(), "migrated and empty");
}

#[test]
fn the_command_line_explains_itself_and_its_errors() {
    let help = errand_cmd("x").arg("--help").output().unwrap();
    let text = String::from_utf8(help.stdout).unwrap();
    for word in [
        "serve",
        "work",
        "migrate",
        "enqueue",
        "bench",
        "ERRAND_DATABASE_URL",
        "errand.db",
    ] {
        assert!(text.contains(word), "--help mentions {word}");
    }
    let serve = errand_cmd("x").args(["serve", "--help"]).output().unwrap();
    let text = String::from_utf8(serve.stdout).unwrap();
    for word in [
        "--bind",
        "127.0.0.1:8080",
        "ERRAND_QUEUES",
        "default=8",
        "--shutdown-grace",
        "25s",
    ] {
        assert!(text.contains(word), "serve --help mentions {word}");
    }

    let dir = tempfile::tempdir().unwrap();
    let url = dir.path().join("e.db").display().to_string();
    let run = |args: &[&str]| {
        let out = errand_cmd(&url).args(args).output().unwrap();
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let (ok, err) = run(&["enqueue", "default", "noop", "{not json"]);
    assert!(!ok && err.contains("not valid JSON"), "{err}");
    let (ok, err) = run(&["enqueue", "default", "send-fax", "{}"]);
    assert!(!ok && err.contains("unknown job kind 'send-fax'"), "{err}");
    let (ok, err) = run(&["enqueue", "default", "noop", "--run-at", "tomorrow"]);
    assert!(!ok && err.contains("RFC 3339"), "{err}");
    let (ok, err) = run(&["work", "--queues", "default=zero"]);
    assert!(!ok && err.contains("whole number"), "{err}");
    let (ok, err) = run(&["work", "--heartbeat-interval=2m"]);
    assert!(
        !ok && err.contains("must be shorter than --stale-after"),
        "{err}"
    );
    let (ok, err) = run(&["--database-url", "mysql://x", "migrate"]);
    assert!(
        !ok && err.contains("unsupported database URL scheme"),
        "{err}"
    );
    let (ok, _) = run(&["migrate"]);
    assert!(ok);
    let store = errand::Store::open(&url, &errand::store::StoreOptions::default()).unwrap();
    assert!(
        store.jobs_count().unwrap().is_empty(),
        "bad input enqueued nothing"
    );
}

#[test]
fn an_unreachable_postgres_is_an_error_that_says_what_to_check() {
    let out = errand_cmd("postgres://errand@127.0.0.1:1/nowhere")
        .args(["migrate", "--connect-timeout=500ms"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("cannot reach the database"), "{err}");
    assert!(err.contains("--database-url"), "{err}");
}
