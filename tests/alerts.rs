//! Alerts with a real SMTP server (aiosmtpd, Debian's `python3-aiosmtpd`),
//! on both backends: one email per incident after its pending period, none
//! for a blip, one repeat, one resolved notice; one email for 500 dead
//! letters; an outage delays delivery but loses nothing and slows no job; a
//! refusal is not retried forever; the hourly cap sends one digest; and a
//! restart or leader change while firing neither forgets nor repeats.

mod common;

use std::net::TcpListener;
use std::sync::{Arc, Barrier, Mutex};
use std::time::Duration;

use common::smtp::Smtp;
use common::{Backend, ServerOptions, TestDb, TestServer, wait_for};
use errand::alerts::{AlertConfig, Evaluator, Mailer, Rule};
use errand::maintenance::{Maintenance, MaintenanceConfig};
use errand::store::{AttemptOutcome, DeadAction, Failure, Metric, NewJob};
use errand::web::WebConfig;
use errand::{Outcome, Registry};
use serde_json::{Value, json};

const WAIT: Duration = Duration::from_secs(20);

fn rule(name: &str, metric: Metric, threshold: f64, pending: Duration) -> Rule {
    Rule {
        name: name.into(),
        metric,
        threshold,
        queue: None,
        kind: None,
        window: Duration::from_secs(3600),
        min_finished: 1,
        pending,
        resolve_after: Duration::from_millis(200),
    }
}

fn config(smtp_url: String, rules: Vec<Rule>) -> AlertConfig {
    AlertConfig {
        rules,
        smtp_url: Some(smtp_url),
        from: "errand <errand@test.example>".into(),
        to: vec!["ops@test.example".into()],
        public_url: Some("https://errand.test".into()),
        evaluate_every: Duration::from_millis(100),
        smtp_timeout: Duration::from_secs(2),
        retry_base: Duration::from_millis(100),
        retry_max: Duration::from_millis(400),
        send_every: Duration::from_millis(50),
        ..AlertConfig::default()
    }
}

fn evaluate(db: &TestDb, config: &AlertConfig) -> errand::alerts::EvalReport {
    Evaluator {
        store: &db.store,
        config,
        stale_after: Duration::from_secs(60),
    }
    .run_once()
    .unwrap()
}

fn send(db: &TestDb, config: &AlertConfig) -> errand::alerts::SendReport {
    Mailer::new(config)
        .unwrap()
        .unwrap()
        .run_once(&db.store, config)
        .unwrap()
}

/// Enqueues `n` jobs and fails each for good: `n` dead letters.
fn bury(db: &TestDb, n: usize, error: &str) -> Vec<i64> {
    let jobs: Vec<NewJob> = (0..n)
        .map(|_| NewJob::new("mail", json!({})).queue("outbox"))
        .collect();
    let ids: Vec<i64> = db
        .store
        .jobs_enqueue(&jobs)
        .unwrap()
        .iter()
        .map(|e| e.id)
        .collect();
    loop {
        let claimed = db.store.jobs_claim("outbox", "test:1:x", 200).unwrap();
        if claimed.is_empty() {
            return ids;
        }
        for job in claimed {
            let failure = Failure {
                outcome: AttemptOutcome::Error,
                error: format!("{error} for job {}", job.id),
                retry_in: None,
                detail: None,
            };
            db.store.job_fail(job.lease(), &failure).unwrap();
        }
    }
}

fn purge(db: &TestDb) {
    db.store
        .jobs_dead_apply(&Default::default(), DeadAction::Purge, |_| {})
        .unwrap();
}

fn state(db: &TestDb, rule: &str) -> String {
    db.store
        .alert_state_get(rule)
        .unwrap()
        .map(|s| s.state)
        .unwrap_or_default()
}

fn a_crossing_alerts_once_repeats_once_and_resolves_once(db: &TestDb) {
    let smtp = Smtp::start();
    let mut cfg = config(
        smtp.url(),
        vec![rule(
            "dead letters",
            Metric::DeadTotal,
            1.0,
            Duration::from_millis(300),
        )],
    );
    bury(db, 2, "mailbox full");
    assert_eq!(evaluate(db, &cfg).fired, 0);
    assert_eq!(state(db, "dead letters"), "pending");
    assert_eq!(send(db, &cfg).sent, 0, "nothing before the pending period");
    wait_for("the rule to fire", WAIT, || {
        (evaluate(db, &cfg).fired == 1).then_some(())
    });
    assert_eq!(send(db, &cfg).sent, 1);
    let emails = smtp.emails();
    assert_eq!(emails.len(), 1);
    let email = &emails[0];
    assert_eq!(
        email["subject"],
        "[errand] FIRING: dead letters - 2 (threshold 1)"
    );
    assert_eq!(email["to"], json!(["ops@test.example"]));
    let text = email["text"].as_str().unwrap();
    assert!(
        text.contains("dead letters stored: 2 (threshold 1)"),
        "{text}"
    );
    assert!(
        text.contains("outbox (2)") && text.contains("mail (2)"),
        "worst queues and kinds: {text}"
    );
    assert!(
        text.contains("mailbox full for job"),
        "sample errors: {text}"
    );
    assert!(text.contains("https://errand.test/dead"), "a link: {text}");
    let html = email["html"].as_str().unwrap();
    assert!(
        html.contains("<strong>2</strong>") && html.contains("href=\"https://errand.test/dead\"")
    );

    // Still firing: nothing more until the repeat interval…
    for _ in 0..3 {
        evaluate(db, &cfg);
    }
    assert_eq!(send(db, &cfg).sent, 0);
    // …then exactly one repeat.
    cfg.repeat_every = Duration::from_millis(400);
    wait_for("a repeat", WAIT, || {
        (evaluate(db, &cfg).repeated == 1).then_some(())
    });
    evaluate(db, &cfg);
    assert_eq!(send(db, &cfg).notifications, 1);
    assert!(smtp.subjects()[1].starts_with("[errand] STILL FIRING: dead letters"));

    // Cleared: one resolved notice after resolve_after.
    purge(db);
    wait_for("the rule to resolve", WAIT, || {
        (evaluate(db, &cfg).resolved == 1).then_some(())
    });
    evaluate(db, &cfg);
    assert_eq!(send(db, &cfg).notifications, 1);
    assert_eq!(smtp.subjects().len(), 3);
    assert_eq!(smtp.subjects()[2], "[errand] RESOLVED: dead letters");
    assert_eq!(state(db, "dead letters"), "resolved");
}

fn a_blip_shorter_than_the_pending_period_sends_nothing(db: &TestDb) {
    let smtp = Smtp::start();
    let cfg = config(
        smtp.url(),
        vec![rule(
            "dead",
            Metric::DeadTotal,
            1.0,
            Duration::from_secs(3600),
        )],
    );
    bury(db, 1, "oops");
    evaluate(db, &cfg);
    assert_eq!(state(db, "dead"), "pending");
    purge(db);
    evaluate(db, &cfg);
    assert_eq!(state(db, "dead"), "inactive");
    assert_eq!(send(db, &cfg).sent, 0);
    assert!(db.store.outbox_recent(10).unwrap().is_empty());
    assert!(smtp.emails().is_empty());
}

fn five_hundred_dead_letters_make_one_email(db: &TestDb) {
    let smtp = Smtp::start();
    let cfg = config(
        smtp.url(),
        vec![rule("new dead", Metric::NewDead, 1.0, Duration::ZERO)],
    );
    bury(db, 500, "card declined");
    for _ in 0..5 {
        evaluate(db, &cfg);
        send(db, &cfg);
    }
    let subjects = smtp.subjects();
    assert_eq!(
        subjects,
        vec!["[errand] FIRING: new dead - 500 (threshold 1)".to_string()]
    );
}

fn an_smtp_outage_delays_delivery_but_loses_nothing(db: &TestDb) {
    let mut smtp = Smtp::start();
    smtp.down();
    let cfg = config(
        smtp.url(),
        vec![rule("dead", Metric::DeadTotal, 1.0, Duration::ZERO)],
    );
    bury(db, 1, "boom");
    assert_eq!(evaluate(db, &cfg).fired, 1);
    let first = send(db, &cfg);
    assert_eq!(
        (first.sent, first.retrying),
        (0, 1),
        "the server is down: retry later"
    );
    let row = &db.store.outbox_recent(1).unwrap()[0];
    assert_eq!((row.status.as_str(), row.attempts), ("pending", 1));
    assert!(row.last_error.is_some());
    smtp.up();
    wait_for("the email to go out", WAIT, || {
        (send(db, &cfg).sent == 1).then_some(())
    });
    for _ in 0..3 {
        send(db, &cfg);
    }
    assert_eq!(smtp.emails().len(), 1, "delivered once");
    let row = &db.store.outbox_recent(1).unwrap()[0];
    assert_eq!(row.status, "sent");
    assert!(row.attempts >= 2);
}

fn a_refusal_is_recorded_and_not_retried(db: &TestDb) {
    let smtp = Smtp::start();
    let mut cfg = config(
        smtp.url(),
        vec![rule("dead", Metric::DeadTotal, 1.0, Duration::ZERO)],
    );
    cfg.to = vec!["reject@test.example".into()];
    bury(db, 1, "boom");
    evaluate(db, &cfg);
    let report = send(db, &cfg);
    assert_eq!((report.sent, report.failed), (0, 1));
    let row = &db.store.outbox_recent(1).unwrap()[0];
    assert_eq!((row.status.as_str(), row.attempts), ("failed", 1));
    assert!(
        row.last_error.as_deref().unwrap().contains("550"),
        "{row:?}"
    );
    // Never again.
    for _ in 0..3 {
        assert_eq!(send(db, &cfg), Default::default());
    }
    assert!(smtp.emails().is_empty());
}

fn the_hourly_cap_turns_the_overflow_into_one_digest(db: &TestDb) {
    let smtp = Smtp::start();
    let rules: Vec<Rule> = (0..4)
        .map(|i| {
            rule(
                &format!("rule {i}"),
                Metric::DeadTotal,
                (i + 1) as f64,
                Duration::ZERO,
            )
        })
        .collect();
    let mut cfg = config(smtp.url(), rules);
    cfg.max_per_hour = 2;
    cfg.cap_window = Duration::from_millis(1500);
    for i in 0..4 {
        bury(db, 1, "boom");
        evaluate(db, &cfg);
        let report = send(db, &cfg);
        if i < 2 {
            assert_eq!(report.sent, 1, "email {i} goes out");
        } else {
            assert_eq!((report.sent, report.held), (0, i - 1), "email {i} waits");
        }
    }
    assert_eq!(smtp.emails().len(), 2);
    let digest = wait_for("the window to make room", WAIT, || {
        let report = send(db, &cfg);
        (report.sent == 1).then_some(report)
    });
    assert_eq!(digest.notifications, 2, "one email carries both");
    let subjects = smtp.subjects();
    assert_eq!(subjects.len(), 3);
    assert!(
        subjects[2].contains("2 alert notifications"),
        "{}",
        subjects[2]
    );
    let text = smtp.emails()[2]["text"].as_str().unwrap().to_string();
    assert!(text.contains("rule 2") && text.contains("rule 3"), "{text}");
}

fn maintenance(db: &TestDb, holder: &str, cfg: &AlertConfig) -> Maintenance {
    let store = db.other_store();
    Maintenance::start(
        store,
        Arc::new(Registry::new()),
        MaintenanceConfig {
            leader_ttl: Duration::from_millis(600),
            alerts: Arc::new(cfg.clone()),
            ..MaintenanceConfig::default()
        },
        holder.into(),
    )
    .unwrap()
}

fn a_restart_or_leader_change_while_firing_neither_forgets_nor_repeats(backend: Backend) {
    let db = TestDb::new(backend);
    let smtp = Smtp::start();
    let cfg = config(
        smtp.url(),
        vec![rule(
            "dead",
            Metric::DeadTotal,
            1.0,
            Duration::from_millis(200),
        )],
    );
    bury(&db, 3, "boom");
    let first = maintenance(&db, "host-a:1:a", &cfg);
    wait_for("the alert email", WAIT, || {
        (smtp.emails().len() == 1).then_some(())
    });
    first.stop();
    // Another process takes over while the alert fires.
    let second = maintenance(&db, "host-b:2:b", &cfg);
    let taken_over = db
        .store
        .alert_state_get("dead")
        .unwrap()
        .unwrap()
        .evaluated_at;
    wait_for("the new leader to evaluate a few times", WAIT, || {
        let state = db.store.alert_state_get("dead").unwrap().unwrap();
        (state.evaluated_at > taken_over + 500).then_some(())
    });
    let state = db.store.alert_state_get("dead").unwrap().unwrap();
    assert_eq!(
        (state.state.as_str(), state.incident),
        ("firing", 1),
        "not forgotten"
    );
    assert_eq!(smtp.emails().len(), 1, "not sent twice");
    assert_eq!(db.store.leader_get().unwrap().unwrap().holder, "host-b:2:b");
    second.stop();

    // Two evaluators racing (an old leader's last pass and a new one's
    // first) still write one email per change.
    purge(&db);
    let racing = config(
        smtp.url(),
        vec![rule("race", Metric::DeadTotal, 1.0, Duration::ZERO)],
    );
    bury(&db, 1, "boom");
    let barrier = Arc::new(Barrier::new(2));
    let fired: usize = (0..2)
        .map(|_| {
            let (store, barrier, racing) = (db.other_store(), barrier.clone(), racing.clone());
            std::thread::spawn(move || {
                barrier.wait();
                Evaluator {
                    store: &store,
                    config: &racing,
                    stale_after: Duration::from_secs(60),
                }
                .run_once()
                .unwrap()
                .fired
            })
        })
        .collect::<Vec<_>>()
        .into_iter()
        .map(|h| h.join().unwrap())
        .sum();
    assert_eq!(fired, 1);
    let race_emails = db
        .store
        .outbox_recent(50)
        .unwrap()
        .into_iter()
        .filter(|r| r.rule == "race")
        .count();
    assert_eq!(race_emails, 1);
}

fn an_smtp_outage_does_not_slow_jobs_down(db: &TestDb) {
    // A server that accepts connections and never answers: the sender
    // waits out its timeout on every attempt.
    let blackhole = TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!(
        "smtp://127.0.0.1:{}",
        blackhole.local_addr().unwrap().port()
    );
    let held = Arc::new(Mutex::new(Vec::new()));
    let keep = held.clone();
    std::thread::spawn(move || {
        for stream in blackhole.incoming() {
            keep.lock().unwrap().push(stream);
        }
    });
    let mut cfg = config(
        url,
        vec![rule("dead", Metric::DeadTotal, 1.0, Duration::ZERO)],
    );
    cfg.smtp_timeout = Duration::from_secs(30);
    bury(db, 1, "boom");
    let leader = maintenance(db, "host-a:1:a", &cfg);
    wait_for("the sender to be stuck on the server", WAIT, || {
        (!held.lock().unwrap().is_empty()).then_some(())
    });
    let mut registry = Registry::new();
    registry.register_fn("noop", |_: Value, _: &errand::JobContext| Outcome::Done);
    let worker = errand::Worker::start(
        db.store.clone(),
        Arc::new(registry),
        errand::WorkerConfig {
            queues: vec![errand::worker::QueueSpec {
                name: "default".into(),
                concurrency: 4,
            }],
            poll_interval: Duration::from_millis(50),
            ..errand::WorkerConfig::default()
        },
    )
    .unwrap();
    let jobs: Vec<NewJob> = (0..300).map(|_| NewJob::new("noop", json!({}))).collect();
    db.store.jobs_enqueue(&jobs).unwrap();
    // Well inside the sender's 30 s timeout: the jobs did not wait for it.
    wait_for(
        "300 jobs to run while SMTP hangs",
        Duration::from_secs(15),
        || {
            let done: i64 = db
                .store
                .jobs_count()
                .unwrap()
                .iter()
                .filter(|c| c.queue == "default" && c.state == errand::JobState::Completed)
                .map(|c| c.count)
                .sum();
            (done == 300).then_some(())
        },
    );
    worker.shutdown(Duration::from_secs(5), &errand::shutdown::Shutdown::new());
    assert_eq!(
        db.store.outbox_recent(1).unwrap()[0].status,
        "pending",
        "still owed, not lost"
    );
    drop(leader);
}

fn the_alerts_page_shows_rules_and_sends_a_test_email(db: &TestDb) {
    let smtp = Smtp::start();
    let cfg = Arc::new(config(
        smtp.url(),
        vec![rule("dead letters", Metric::DeadTotal, 1.0, Duration::ZERO)],
    ));
    bury(db, 1, "boom");
    evaluate(db, &cfg);
    send(db, &cfg);
    let server = TestServer::start(
        db,
        ServerOptions {
            config: WebConfig {
                alerts: cfg.clone(),
                ..WebConfig::default()
            },
            ..ServerOptions::default()
        },
    );
    let http = server.http();
    let page = http.get("/alerts");
    assert_eq!(page.status, 200);
    assert!(page.body.contains("dead letters") && page.body.contains("alert-firing"));
    assert!(page.body.contains("ops@test.example"));
    let overview = http.get("/");
    assert!(overview.body.contains("Firing:") && overview.body.contains("dead letters"));
    let marker = "\"X-CSRF-Token\": \"";
    let start = page.body.find(marker).unwrap() + marker.len();
    let token = page.body[start..start + 32].to_string();
    let reply = http.post_raw(
        "/alerts/test",
        "application/x-www-form-urlencoded",
        b"",
        &[
            ("HX-Request", "true"),
            ("Sec-Fetch-Site", "same-origin"),
            ("X-CSRF-Token", &token),
        ],
    );
    assert_eq!(reply.status, 200, "{}", reply.body);
    assert!(reply.body.contains("Test email queued"));
    send(db, &cfg);
    let subjects = smtp.subjects();
    assert_eq!(subjects.len(), 2, "{subjects:?}");
    assert_eq!(subjects[1], "[errand] test email");
    let page = http.get("/alerts");
    assert!(
        page.body.contains("delivery-sent"),
        "the history shows the delivery"
    );
}

on_both_backends!(
    a_crossing_alerts_once_repeats_once_and_resolves_once,
    a_blip_shorter_than_the_pending_period_sends_nothing,
    five_hundred_dead_letters_make_one_email,
    an_smtp_outage_delays_delivery_but_loses_nothing,
    a_refusal_is_recorded_and_not_retried,
    the_hourly_cap_turns_the_overflow_into_one_digest,
    an_smtp_outage_does_not_slow_jobs_down,
    the_alerts_page_shows_rules_and_sends_a_test_email,
);

on_both_backends_raw!(a_restart_or_leader_change_while_firing_neither_forgets_nor_repeats);
