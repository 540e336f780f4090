//! The built-in `http` kind against a real HTTP server on a loopback port:
//! status handling (done, retried, snoozed on 429, dead on other 4xx and on
//! redirects), transport errors and timeouts, the allow list, what each
//! attempt records, and request signing checked by the receiver — on both
//! backends.

mod common;

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::{TestDb, wait_for};
use crossbeam_channel::{Receiver, Sender};
use errand::kinds::HttpConfig;
use errand::kinds::http::sign;
use errand::shutdown::Shutdown;
use errand::store::{Attempt, AttemptOutcome, JobState, NewJob, Store};
use errand::worker::{QueueSpec, Worker, WorkerConfig};
use errand::{Backoff, Registry};
use hmac::{Hmac, Mac};
use serde_json::{Value, json};
use sha2::Sha256;

const WAIT: Duration = Duration::from_secs(20);
const SECRET: &str = "test-signing-secret";
/// The body `/ok` answers with.
const OK_BODY: &str = "{\"received\":true}";

/// A request as the server saw it (header names lowercase).
#[derive(Debug, Clone)]
struct Seen {
    method: String,
    path: String,
    headers: HashMap<String, String>,
    body: Vec<u8>,
}

/// What `/signed` found when it checked the signature.
type Verdict = Result<(), String>;

/// A small HTTP/1.1 server answering per path, one thread per connection,
/// `Connection: close` on every response.
struct Server {
    base: String,
    seen: Arc<Mutex<Vec<Seen>>>,
    verdicts: Receiver<Verdict>,
    /// `/hang` connections, held open until the server is dropped.
    held: Arc<Mutex<Vec<TcpStream>>>,
}

impl Server {
    fn start() -> Server {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let base = format!("http://{}", listener.local_addr().unwrap());
        let seen: Arc<Mutex<Vec<Seen>>> = Arc::default();
        let held: Arc<Mutex<Vec<TcpStream>>> = Arc::default();
        let (verdict_tx, verdicts) = crossbeam_channel::unbounded();
        let (s, h) = (seen.clone(), held.clone());
        std::thread::spawn(move || {
            for stream in listener.incoming() {
                let Ok(stream) = stream else { return };
                let (s, h, v) = (s.clone(), h.clone(), verdict_tx.clone());
                std::thread::spawn(move || serve(stream, &s, &h, &v));
            }
        });
        Server {
            base,
            seen,
            verdicts,
            held,
        }
    }

    fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    fn seen(&self) -> Vec<Seen> {
        self.seen.lock().unwrap().clone()
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        for stream in self.held.lock().unwrap().drain(..) {
            let _ = stream.shutdown(std::net::Shutdown::Both);
        }
    }
}

fn serve(
    stream: TcpStream,
    seen: &Mutex<Vec<Seen>>,
    held: &Mutex<Vec<TcpStream>>,
    verdicts: &Sender<Verdict>,
) {
    let Some(request) = read_request(&stream) else {
        return;
    };
    seen.lock().unwrap().push(request.clone());
    let big = "x".repeat(5000);
    let (status, extra, body): (&str, &[(&str, &str)], &str) = match request.path.as_str() {
        "/ok" => ("200 OK", &[("Content-Type", "application/json")], OK_BODY),
        "/big" => ("200 OK", &[], &big),
        "/boom" => ("500 Internal Server Error", &[], "the database is on fire"),
        "/slow-down" => (
            "429 Too Many Requests",
            &[("Retry-After", "120")],
            "slow down",
        ),
        "/missing" => ("404 Not Found", &[], "no such hook"),
        "/busy" => ("429 Too Many Requests", &[], "busy, no hint"),
        "/too-slow" => ("408 Request Timeout", &[], ""),
        "/moved" => (
            "302 Found",
            &[("Location", "http://elsewhere.example/new")],
            "",
        ),
        "/hang" => {
            // Never answer: keep the connection open until the test ends.
            held.lock().unwrap().push(stream);
            return;
        }
        "/signed" => {
            let _ = verdicts.send(verify(&request));
            ("204 No Content", &[], "")
        }
        _ => ("418 I'm a teapot", &[], "unexpected path"),
    };
    let mut response = format!(
        "HTTP/1.1 {status}\r\nConnection: close\r\nContent-Length: {}\r\n",
        body.len()
    );
    for (name, value) in extra {
        response.push_str(&format!("{name}: {value}\r\n"));
    }
    response.push_str("\r\n");
    response.push_str(body);
    let mut stream = stream;
    let _ = stream.write_all(response.as_bytes());
    let _ = stream.flush();
}

fn read_request(stream: &TcpStream) -> Option<Seen> {
    let mut reader = BufReader::new(stream);
    let mut line = String::new();
    reader.read_line(&mut line).ok()?;
    let mut parts = line.split_whitespace();
    let method = parts.next()?.to_string();
    let path = parts.next()?.to_string();
    let mut headers = HashMap::new();
    loop {
        let mut line = String::new();
        reader.read_line(&mut line).ok()?;
        let line = line.trim_end();
        if line.is_empty() {
            break;
        }
        let (name, value) = line.split_once(':')?;
        headers.insert(name.trim().to_ascii_lowercase(), value.trim().to_string());
    }
    let length: usize = headers
        .get("content-length")
        .map_or(0, |l| l.parse().unwrap());
    let mut body = vec![0; length];
    reader.read_exact(&mut body).ok()?;
    Some(Seen {
        method,
        path,
        headers,
        body,
    })
}

/// The receiver's side of signing: parse `Errand-Signature`, recompute with
/// the secret (through `sign` and through hmac directly), compare in
/// constant time, check the timestamp's age.
fn verify(request: &Seen) -> Verdict {
    let header = request
        .headers
        .get("errand-signature")
        .ok_or("no Errand-Signature header")?;
    let mut t = None;
    let mut v1 = None;
    for part in header.split(',') {
        match part.split_once('=') {
            Some(("t", value)) => t = value.parse::<i64>().ok(),
            Some(("v1", value)) => v1 = Some(value.to_string()),
            _ => return Err(format!("unexpected part {part:?} in {header:?}")),
        }
    }
    let t = t.ok_or("no t= in the signature")?;
    let v1 = v1.ok_or("no v1= in the signature")?;
    let age = chrono::Utc::now().timestamp() - t;
    if !(-300..=300).contains(&age) {
        return Err(format!("timestamp {t} is {age} s old"));
    }
    let mut mac = Hmac::<Sha256>::new_from_slice(SECRET.as_bytes()).unwrap();
    mac.update(format!("{t}.").as_bytes());
    mac.update(&request.body);
    let expected: String = mac
        .finalize()
        .into_bytes()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    if expected != sign(SECRET, t, &request.body) {
        return Err("sign() disagrees with HMAC-SHA256 computed directly".into());
    }
    use subtle::ConstantTimeEq;
    if !bool::from(expected.as_bytes().ct_eq(v1.as_bytes())) {
        return Err(format!("signature mismatch: got {v1}, expected {expected}"));
    }
    // A tampered body or another secret must not verify.
    let mut tampered = request.body.clone();
    tampered.push(b' ');
    if sign(SECRET, t, &tampered) == v1 || sign("another-secret", t, &request.body) == v1 {
        return Err("a tampered body or a wrong secret verified".into());
    }
    Ok(())
}

fn http_config(allow: &[&str]) -> HttpConfig {
    HttpConfig {
        allow: allow.iter().map(|a| a.to_string()).collect(),
        signing_secret: Some(SECRET.to_string()),
        timeout: Duration::from_secs(5),
    }
}

/// A worker running the `http` kind (through `errand::kinds::register`),
/// retrying after a minute so that `retrying` is seen.
fn start_worker(store: &Store, http: HttpConfig) -> Worker {
    let mut registry = Registry::new();
    errand::kinds::register(
        &mut registry,
        &errand::kinds::KindsConfig {
            http,
            ..Default::default()
        },
    );
    assert!(registry.contains("http"));
    Worker::start(
        store.clone(),
        Arc::new(registry),
        WorkerConfig {
            queues: vec![QueueSpec {
                name: "default".into(),
                concurrency: 4,
            }],
            poll_interval: Duration::from_millis(50),
            heartbeat_interval: Duration::from_millis(100),
            backoff: Backoff::Fixed(Duration::from_secs(60)),
            ..WorkerConfig::default()
        },
    )
    .expect("worker starts")
}

fn stop(worker: Worker) {
    worker.shutdown(Duration::from_secs(5), &Shutdown::new());
}

fn enqueue(store: &Store, args: Value, max_attempts: i32) -> i64 {
    store
        .job_enqueue(&NewJob::new("http", args).max_attempts(max_attempts))
        .unwrap()
        .id
}

fn wait_state(store: &Store, id: i64, state: JobState) -> errand::Job {
    common::wait_state(store, id, state, WAIT)
}

fn attempts(store: &Store, id: i64) -> Vec<Attempt> {
    store.job_attempts(id).unwrap()
}

/// The attempts of a completed job, once its detail is written (the worker
/// writes what successful attempts recorded just after the completion).
fn completed_attempts(store: &Store, id: i64) -> Vec<Attempt> {
    wait_for(&format!("job {id}'s recorded detail"), WAIT, || {
        let a = attempts(store, id);
        a.last()
            .is_some_and(|a| a.outcome == AttemptOutcome::Completed && a.detail.is_some())
            .then_some(a)
    })
}

fn detail(attempt: &Attempt) -> Value {
    serde_json::from_str(attempt.detail.as_deref().expect("the attempt has a detail")).unwrap()
}

fn error(attempt: &Attempt) -> &str {
    attempt.error.as_deref().unwrap_or_default()
}

fn a_2xx_completes_the_job_and_records_status_duration_and_excerpt(db: &TestDb) {
    let server = Server::start();
    let worker = start_worker(&db.store, http_config(&["127.0.0.1"]));
    let ok = enqueue(
        &db.store,
        json!({
            "url": server.url("/ok"),
            "headers": {"Authorization": "Bearer sekrit-token", "X-Trace": "abc"},
            "body": {"order": 42},
        }),
        3,
    );
    let big = enqueue(
        &db.store,
        json!({"url": server.url("/big"), "method": "get"}),
        3,
    );
    let done = wait_state(&db.store, ok, JobState::Completed);
    assert_eq!(done.attempt, 1);
    let a = completed_attempts(&db.store, ok);
    assert_eq!(a.len(), 1);
    let d = detail(&a[0]);
    assert_eq!(d["status"], 200);
    assert_eq!(d["method"], "POST");
    assert_eq!(d["url"], server.url("/ok"));
    assert_eq!(d["response"], OK_BODY);
    assert!(d["duration_ms"].is_u64(), "{d}");
    let text = a[0].detail.as_deref().unwrap();
    assert!(
        !text.contains("sekrit") && !text.contains(SECRET),
        "header values and the secret are never recorded: {text}"
    );

    // What the receiver got: the JSON body, its content type, our headers.
    let seen = server.seen();
    let request = seen.iter().find(|r| r.path == "/ok").unwrap();
    assert_eq!(request.method, "POST");
    assert_eq!(
        serde_json::from_slice::<Value>(&request.body).unwrap(),
        json!({"order": 42})
    );
    assert_eq!(request.headers["content-type"], "application/json");
    assert_eq!(request.headers["authorization"], "Bearer sekrit-token");
    assert_eq!(request.headers["x-trace"], "abc");
    assert_eq!(request.headers["errand-job-id"], ok.to_string());
    assert_eq!(request.headers["errand-attempt"], "1");
    assert_eq!(
        request.headers["user-agent"],
        format!("errand/{}", env!("CARGO_PKG_VERSION"))
    );
    assert!(request.headers["errand-signature"].starts_with("t="));

    // A long response is recorded capped, with an ellipsis.
    wait_state(&db.store, big, JobState::Completed);
    let d = detail(&completed_attempts(&db.store, big)[0]);
    let response = d["response"].as_str().unwrap();
    assert_eq!(response, format!("{}…", "x".repeat(2048)));
    let get = server
        .seen()
        .into_iter()
        .find(|r| r.path == "/big")
        .unwrap();
    assert_eq!(get.method, "GET");
    assert!(get.body.is_empty());
    stop(worker);
}

fn a_5xx_is_retried_and_dead_when_attempts_run_out(db: &TestDb) {
    let server = Server::start();
    let worker = start_worker(&db.store, http_config(&["127.0.0.1"]));
    let retried = enqueue(&db.store, json!({"url": server.url("/boom")}), 2);
    let last = enqueue(&db.store, json!({"url": server.url("/boom")}), 1);
    let j = wait_state(&db.store, retried, JobState::Retrying);
    assert_eq!(j.attempt, 1);
    let a = attempts(&db.store, retried);
    assert_eq!(a.len(), 1);
    assert_eq!(a[0].outcome, AttemptOutcome::Error);
    assert_eq!(
        error(&a[0]),
        format!(
            "HTTP 500 Internal Server Error from {}",
            server.url("/boom")
        )
    );
    let d = detail(&a[0]);
    assert_eq!(d["status"], 500);
    assert_eq!(d["response"], "the database is on fire");

    let dead = wait_state(&db.store, last, JobState::Dead);
    assert_eq!(dead.attempt, 1);
    assert!(dead.last_error.unwrap().contains("500"));
    assert_eq!(detail(&attempts(&db.store, last)[0])["status"], 500);

    // 408, and 429 without a Retry-After, are retried like a 5xx.
    for (path, status) in [("/too-slow", 408), ("/busy", 429)] {
        let id = enqueue(&db.store, json!({"url": server.url(path)}), 2);
        let j = wait_state(&db.store, id, JobState::Retrying);
        assert_eq!(j.attempt, 1);
        let a = attempts(&db.store, id);
        assert!(
            error(&a[0]).contains(&status.to_string()),
            "{}",
            error(&a[0])
        );
        assert_eq!(detail(&a[0])["status"], status);
    }
    stop(worker);
}

fn a_429_snoozes_for_its_retry_after_without_spending_an_attempt(db: &TestDb) {
    let server = Server::start();
    let worker = start_worker(&db.store, http_config(&["127.0.0.1"]));
    let id = enqueue(&db.store, json!({"url": server.url("/slow-down")}), 2);
    let a = wait_for("the snoozed attempt", WAIT, || {
        let a = attempts(&db.store, id);
        (!a.is_empty()).then_some(a)
    });
    assert_eq!(a.len(), 1);
    assert_eq!(a[0].outcome, AttemptOutcome::Snoozed);
    let d = detail(&a[0]);
    assert_eq!(d["status"], 429);
    assert_eq!(d["retry_after_s"], 120);
    let j = db.store.job_get(id).unwrap().unwrap();
    assert_eq!(j.state, JobState::Queued);
    assert_eq!(j.attempt, 0, "a snooze spends no attempt");
    let now = db.store.now_ms().unwrap();
    let wait = j.run_at - now;
    assert!(
        (110_000..=130_000).contains(&wait),
        "run_at is {wait} ms away, not about 120 s"
    );
    stop(worker);
}

fn other_4xx_and_redirects_are_dead_after_one_attempt(db: &TestDb) {
    let server = Server::start();
    let worker = start_worker(&db.store, http_config(&["127.0.0.1"]));
    let missing = enqueue(&db.store, json!({"url": server.url("/missing")}), 5);
    let moved = enqueue(
        &db.store,
        json!({"url": server.url("/moved"), "method": "GET"}),
        5,
    );
    let dead = wait_state(&db.store, missing, JobState::Dead);
    assert_eq!(dead.attempt, 1);
    let a = attempts(&db.store, missing);
    assert_eq!(a.len(), 1);
    assert!(
        error(&a[0]).starts_with("HTTP 404 Not Found from "),
        "{}",
        error(&a[0])
    );
    let d = detail(&a[0]);
    assert_eq!(d["status"], 404);
    assert_eq!(d["response"], "no such hook");

    let dead = wait_state(&db.store, moved, JobState::Dead);
    assert_eq!(dead.attempt, 1);
    let e = dead.last_error.unwrap();
    assert!(
        e.contains("redirected to http://elsewhere.example/new")
            && e.contains("does not follow redirects"),
        "{e}"
    );
    assert_eq!(detail(&attempts(&db.store, moved)[0])["status"], 302);
    assert!(
        server.seen().iter().all(|r| r.path != "/new"),
        "the redirect was not followed"
    );
    stop(worker);
}

fn timeouts_and_refused_connections_are_retried(db: &TestDb) {
    let server = Server::start();
    // A port nobody listens on.
    let closed = {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let worker = start_worker(&db.store, http_config(&["127.0.0.1"]));
    let hang = enqueue(
        &db.store,
        json!({"url": server.url("/hang"), "timeout_ms": 300}),
        2,
    );
    let refused = enqueue(
        &db.store,
        json!({"url": format!("http://127.0.0.1:{closed}/x")}),
        2,
    );
    wait_state(&db.store, hang, JobState::Retrying);
    let a = attempts(&db.store, hang);
    assert_eq!(a.len(), 1);
    assert_eq!(a[0].outcome, AttemptOutcome::Error);
    assert!(
        error(&a[0]).contains("timed out after 300 ms"),
        "{}",
        error(&a[0])
    );
    let d = detail(&a[0]);
    assert!(d.get("status").is_none(), "{d}");
    let took = d["duration_ms"].as_u64().unwrap();
    assert!((250..5000).contains(&took), "took {took} ms");

    wait_state(&db.store, refused, JobState::Retrying);
    let a = attempts(&db.store, refused);
    assert!(error(&a[0]).contains("failed"), "{}", error(&a[0]));
    assert!(detail(&a[0]).get("status").is_none());
    stop(worker);
}

fn targets_outside_the_allow_list_are_refused_unsent(db: &TestDb) {
    let server = Server::start();
    let worker = start_worker(
        &db.store,
        http_config(&[
            "127.0.0.1:1",
            "*.example.com",
            "https://api.example.com/hooks/",
        ]),
    );
    let local = enqueue(&db.store, json!({"url": server.url("/ok")}), 3);
    let invalid = enqueue(&db.store, json!({"url": "http://example.invalid/"}), 3);
    let ftp = enqueue(&db.store, json!({"url": "ftp://files.example.com/x"}), 3);
    let verb = enqueue(
        &db.store,
        json!({"url": "https://a.example.com/", "method": "BREW"}),
        3,
    );
    for id in [local, invalid] {
        let dead = wait_state(&db.store, id, JobState::Dead);
        assert_eq!(dead.attempt, 1);
        let e = dead.last_error.unwrap();
        assert!(
            e.contains("is not allowed by --http-allow")
                && e.contains("*.example.com")
                && e.contains("ERRAND_HTTP_ALLOW"),
            "{e}"
        );
        assert_eq!(detail(&attempts(&db.store, id)[0])["sent"], false);
    }
    let e = wait_state(&db.store, ftp, JobState::Dead)
        .last_error
        .unwrap();
    assert!(e.contains("http:// or https://"), "{e}");
    let e = wait_state(&db.store, verb, JobState::Dead)
        .last_error
        .unwrap();
    assert!(e.contains("method 'BREW' is not supported"), "{e}");
    stop(worker);
    assert!(server.seen().is_empty(), "the server got a request");
}

fn signed_requests_verify_at_the_receiver(db: &TestDb) {
    let server = Server::start();
    let worker = start_worker(&db.store, http_config(&[&server.base]));
    let json_body = enqueue(
        &db.store,
        json!({"url": server.url("/signed"), "body": {"event": "paid", "amount": 12.5}}),
        3,
    );
    let text_body = enqueue(
        &db.store,
        json!({"url": server.url("/signed"), "method": "PUT", "body": "plain text ✓"}),
        3,
    );
    let no_body = enqueue(
        &db.store,
        json!({"url": server.url("/signed"), "method": "DELETE"}),
        3,
    );
    for id in [json_body, text_body, no_body] {
        wait_state(&db.store, id, JobState::Completed);
        assert_eq!(detail(&completed_attempts(&db.store, id)[0])["status"], 204);
    }
    for _ in 0..3 {
        let verdict = server.verdicts.recv_timeout(WAIT).expect("a verdict");
        assert_eq!(verdict, Ok(()));
    }
    let seen = server.seen();
    let text = seen.iter().find(|r| r.method == "PUT").unwrap();
    assert_eq!(text.body, "plain text ✓".as_bytes());
    assert_eq!(text.headers["content-type"], "text/plain; charset=utf-8");
    stop(worker);
}

#[test]
fn sign_is_hmac_sha256_hex_of_timestamp_dot_body() {
    let body = br#"{"event":"paid"}"#;
    let mut mac = Hmac::<Sha256>::new_from_slice(SECRET.as_bytes()).unwrap();
    mac.update(b"1700000000.");
    mac.update(body);
    let expected: String = mac
        .finalize()
        .into_bytes()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    assert_eq!(sign(SECRET, 1_700_000_000, body), expected);
    assert_ne!(
        sign(SECRET, 1_700_000_000, br#"{"event":"paid "}"#),
        expected
    );
    assert_ne!(sign("wrong", 1_700_000_000, body), expected);
    assert_ne!(sign(SECRET, 1_700_000_001, body), expected);
}

on_both_backends!(
    a_2xx_completes_the_job_and_records_status_duration_and_excerpt,
    a_5xx_is_retried_and_dead_when_attempts_run_out,
    a_429_snoozes_for_its_retry_after_without_spending_an_attempt,
    other_4xx_and_redirects_are_dead_after_one_attempt,
    timeouts_and_refused_connections_are_retried,
    targets_outside_the_allow_list_are_refused_unsent,
    signed_requests_verify_at_the_receiver,
);
