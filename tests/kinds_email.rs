//! The `email` kind with a real SMTP server (aiosmtpd, Debian's
//! `python3-aiosmtpd`) and a real worker, on both backends: a message with
//! text and HTML is delivered and the server's reply recorded; a permanent
//! refusal (550) is dead after one attempt; a transient one (451) retries;
//! bad addresses are dead without contacting the server; and without an
//! SMTP server jobs retry, saying how to configure one.

mod common;

use std::net::TcpListener;
use std::sync::Arc;
use std::time::Duration;

use common::smtp::Smtp;
use common::{TestDb, wait_for};
use errand::kinds::EmailConfig;
use errand::shutdown::Shutdown;
use errand::store::{AttemptOutcome, NewJob};
use errand::worker::{QueueSpec, Worker, WorkerConfig};
use errand::{Backoff, JobState, Registry};
use serde_json::{Value, json};

const WAIT: Duration = Duration::from_secs(20);

/// A worker running `email` against `smtp_url`; retries wait a minute, so
/// a retrying job stays visible.
fn worker(db: &TestDb, smtp_url: Option<String>) -> Worker {
    let mut registry = Registry::new();
    errand::kinds::email::register(
        &mut registry,
        Arc::new(EmailConfig {
            smtp_url,
            from: "errand <errand@example.com>".into(),
            timeout: Duration::from_secs(5),
        }),
    );
    Worker::start(
        db.store.clone(),
        Arc::new(registry),
        WorkerConfig {
            queues: vec![QueueSpec {
                name: "default".into(),
                concurrency: 2,
            }],
            poll_interval: Duration::from_millis(50),
            heartbeat_interval: Duration::from_millis(200),
            backoff: Backoff::Fixed(Duration::from_secs(60)),
            ..WorkerConfig::default()
        },
    )
    .expect("worker starts")
}

fn stop(worker: Worker) {
    worker.shutdown(Duration::from_secs(5), &Shutdown::new());
}

fn enqueue(db: &TestDb, args: Value) -> i64 {
    db.store
        .job_enqueue(&NewJob::new("email", args).max_attempts(5))
        .unwrap()
        .id
}

fn wait_state(db: &TestDb, id: i64, state: JobState) -> errand::Job {
    common::wait_state(&db.store, id, state, WAIT)
}

/// The single attempt's record, and its detail as JSON.
fn only_attempt(db: &TestDb, id: i64) -> (errand::store::Attempt, Value) {
    let attempts = db.store.job_attempts(id).unwrap();
    assert_eq!(attempts.len(), 1, "{attempts:?}");
    let attempt = attempts.into_iter().next().unwrap();
    let detail = attempt
        .detail
        .as_deref()
        .map(|d| serde_json::from_str(d).unwrap())
        .unwrap_or(Value::Null);
    (attempt, detail)
}

/// Like [`only_attempt`] once the detail is stored: a completion's detail
/// is written just after the job is marked completed.
fn recorded_attempt(db: &TestDb, id: i64) -> (errand::store::Attempt, Value) {
    wait_for(&format!("job {id}'s attempt detail"), WAIT, || {
        let (attempt, detail) = only_attempt(db, id);
        (!detail.is_null()).then_some((attempt, detail))
    })
}

fn an_email_with_text_and_html_is_delivered_and_the_reply_recorded(db: &TestDb) {
    let smtp = Smtp::start();
    let worker = worker(db, Some(smtp.url()));
    let id = enqueue(
        db,
        json!({
            "to": "alice@test.example",
            "subject": "Your order 1042 has shipped",
            "text": "Hello Alice,\nyour order is on its way.",
            "html": "<p>Hello Alice,<br>your order is <b>on its way</b>.</p>",
        }),
    );
    let email = smtp.wait_email("Your order 1042 has shipped", WAIT);
    assert_eq!(email["to"], json!(["alice@test.example"]));
    assert_eq!(email["from"], "errand@example.com");
    assert!(
        email["header_from"]
            .as_str()
            .unwrap()
            .contains("errand@example.com")
    );
    assert_eq!(
        email["text"]
            .as_str()
            .unwrap()
            .replace("\r\n", "\n")
            .trim_end(),
        "Hello Alice,\nyour order is on its way."
    );
    assert_eq!(
        email["html"].as_str().unwrap().trim_end(),
        "<p>Hello Alice,<br>your order is <b>on its way</b>.</p>"
    );
    let job = wait_state(db, id, JobState::Completed);
    assert_eq!(job.attempt, 1);
    let (attempt, detail) = recorded_attempt(db, id);
    assert_eq!(attempt.outcome, AttemptOutcome::Completed);
    assert_eq!(detail["to"], json!(["alice@test.example"]));
    assert_eq!(detail["smtp_code"], 250);
    let reply = detail["smtp"].as_str().unwrap();
    assert!(reply.starts_with("250 "), "{detail}");

    // Several recipients, cc, bcc, reply-to and a sender of its own; text
    // only; a subject with a line break goes out on one line. The pooled
    // connection is reused.
    let id = enqueue(
        db,
        json!({
            "to": ["bob@test.example", "Carol <carol@test.example>"],
            "cc": "dave@test.example",
            "bcc": ["erin@test.example"],
            "reply_to": "Support <support@test.example>",
            "from": "Shop <shop@test.example>",
            "subject": "Weekly\r\n  report",
            "text": "All good.",
        }),
    );
    let email = smtp.wait_email("Weekly report", WAIT);
    assert_eq!(
        email["to"],
        json!([
            "bob@test.example",
            "carol@test.example",
            "dave@test.example",
            "erin@test.example"
        ])
    );
    assert_eq!(email["from"], "shop@test.example");
    assert!(email["cc"].as_str().unwrap().contains("dave@test.example"));
    assert!(
        email["reply_to"]
            .as_str()
            .unwrap()
            .contains("support@test.example")
    );
    assert_eq!(email["bcc_header"], "", "bcc stays hidden");
    assert_eq!(email["text"].as_str().unwrap().trim_end(), "All good.");
    assert_eq!(email["html"], "");
    wait_state(db, id, JobState::Completed);
    let (_, detail) = recorded_attempt(db, id);
    assert_eq!(detail["to"].as_array().unwrap().len(), 4);
    stop(worker);
    assert_eq!(smtp.emails().len(), 2);
}

fn a_refused_recipient_is_dead_after_one_attempt_with_the_reply(db: &TestDb) {
    let smtp = Smtp::start();
    let worker = worker(db, Some(smtp.url()));
    let id = enqueue(
        db,
        json!({"to": "reject@test.example", "subject": "Hi", "text": "Hello"}),
    );
    let job = wait_state(db, id, JobState::Dead);
    assert_eq!((job.attempt, job.max_attempts), (1, 5));
    let error = job.last_error.unwrap();
    assert_eq!(error, "SMTP server refused: 550 5.1.1 No such user here");
    let (attempt, detail) = only_attempt(db, id);
    assert!(attempt.error.unwrap().contains("550"));
    assert_eq!(detail["smtp_code"], 550);
    assert_eq!(detail["smtp"], "550 5.1.1 No such user here");
    assert_eq!(detail["to"], json!(["reject@test.example"]));

    // One refused recipient among several: nobody gets the message.
    let id = enqueue(
        db,
        json!({
            "to": ["ok@test.example", "reject@test.example"],
            "subject": "Together",
            "text": "Hello",
        }),
    );
    let job = wait_state(db, id, JobState::Dead);
    assert_eq!(job.attempt, 1);
    let error = job.last_error.unwrap();
    assert!(
        error.contains("550") && error.contains("none of its 2 recipients"),
        "{error}"
    );

    // The refusals did not spoil the pooled connection.
    let id = enqueue(
        db,
        json!({"to": "ok@test.example", "subject": "After", "text": "Hello"}),
    );
    wait_state(db, id, JobState::Completed);
    stop(worker);
    let subjects: Vec<Value> = smtp.emails().iter().map(|e| e["subject"].clone()).collect();
    assert_eq!(subjects, vec![json!("After")]);
}

fn a_transient_refusal_is_retried(db: &TestDb) {
    let smtp = Smtp::start();
    let worker = worker(db, Some(smtp.url()));
    let id = enqueue(
        db,
        json!({"to": "busy@test.example", "subject": "Hi", "text": "Hello"}),
    );
    let job = wait_state(db, id, JobState::Retrying);
    assert_eq!(job.attempt, 1);
    let error = job.last_error.unwrap();
    assert_eq!(
        error,
        "SMTP server deferred: 451 4.3.0 Mailbox busy, try again later"
    );
    let (attempt, detail) = only_attempt(db, id);
    assert_eq!(attempt.outcome, AttemptOutcome::Error);
    assert_eq!(detail["smtp_code"], 451);
    assert!(detail["smtp"].as_str().unwrap().starts_with("451 "));
    stop(worker);
    assert!(smtp.emails().is_empty());
}

fn bad_args_are_dead_without_contacting_the_server(db: &TestDb) {
    // A server that would hang any client: had the kind connected, the job
    // would have timed out and retried, and the connection would wait here.
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    listener.set_nonblocking(true).unwrap();
    let url = format!("smtp://127.0.0.1:{}", listener.local_addr().unwrap().port());
    let worker = worker(db, Some(url));
    let dead = |args: Value| {
        let id = enqueue(db, args);
        let job = wait_state(db, id, JobState::Dead);
        assert_eq!(job.attempt, 1);
        let (_, detail) = only_attempt(db, id);
        assert_eq!(detail, Value::Null, "nothing was sent");
        job.last_error.unwrap()
    };

    let error = dead(json!({"to": "not an address", "subject": "Hi", "text": "Hello"}));
    assert!(
        error.starts_with("email: 'not an address' is not an email address (")
            && error.ends_with("); fix `to` and replay the job"),
        "{error}"
    );
    let error = dead(json!({
        "to": "ok@test.example",
        "cc": ["fine@test.example", "@nobody"],
        "subject": "Hi",
        "text": "Hello",
    }));
    assert!(
        error.contains("'@nobody'") && error.contains("fix `cc`"),
        "{error}"
    );
    let error = dead(json!({
        "to": "ok@test.example",
        "from": "nobody",
        "subject": "Hi",
        "text": "Hello",
    }));
    assert!(error.contains("fix `from`"), "{error}");
    let many: Vec<String> = (0..51).map(|i| format!("user{i}@test.example")).collect();
    let error = dead(json!({"to": many, "subject": "Hi", "text": "Hello"}));
    assert!(
        error.contains("51 recipients") && error.contains("at most 50"),
        "{error}"
    );
    let error = dead(json!({"to": [], "subject": "Hi", "text": "Hello"}));
    assert!(error.contains("`to` is empty"), "{error}");
    let error = dead(json!({"to": 42, "subject": "Hi", "text": "Hello"}));
    assert!(
        error.contains("an email address or a list of email addresses"),
        "{error}"
    );
    let error = dead(json!({"to": "a@test.example", "subject": "Hi", "body": "Hello"}));
    assert!(error.contains("unknown field `body`"), "{error}");

    stop(worker);
    assert_eq!(
        listener.accept().map(|_| ()).unwrap_err().kind(),
        std::io::ErrorKind::WouldBlock,
        "the server was contacted"
    );
}

fn without_an_smtp_server_jobs_retry_and_say_how_to_set_one(db: &TestDb) {
    let worker = worker(db, None);
    let id = enqueue(
        db,
        json!({"to": "alice@test.example", "subject": "Hi", "text": "Hello"}),
    );
    let job = wait_state(db, id, JobState::Retrying);
    let error = job.last_error.unwrap();
    assert!(
        error.contains("--smtp-url") && error.contains("ERRAND_SMTP_URL"),
        "{error}"
    );
    stop(worker);

    let worker = self::worker(db, Some("ftp://127.0.0.1:25".into()));
    let id = enqueue(
        db,
        json!({"to": "alice@test.example", "subject": "Hi", "text": "Hello"}),
    );
    let job = wait_state(db, id, JobState::Retrying);
    let error = job.last_error.unwrap();
    assert!(
        error.contains("SMTP URL is not usable") && error.contains("--smtp-url"),
        "{error}"
    );
    stop(worker);
}

on_both_backends!(
    an_email_with_text_and_html_is_delivered_and_the_reply_recorded,
    a_refused_recipient_is_dead_after_one_attempt_with_the_reply,
    a_transient_refusal_is_retried,
    bad_args_are_dead_without_contacting_the_server,
    without_an_smtp_server_jobs_retry_and_say_how_to_set_one,
);
