//! The dashboard in a real headless Chromium (Debian's `chromium` driven
//! through its `chromedriver`), used as a person would: filter the job list,
//! open a job, replay a dead letter and watch it complete, replay a
//! dead-letter group, pause a queue — and a viewer who cannot act. Each run
//! saves screenshots of the main pages under `target/screenshots/`.
//!
//! Needs `/usr/bin/chromium` and `/usr/bin/chromedriver` (`.ci/run` installs
//! them); `ERRAND_TEST_CHROMEDRIVER` and `ERRAND_TEST_CHROMIUM` point
//! elsewhere. Without them these tests fail, saying what to install.

mod common;

use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::{Backend, ServerOptions, TestDb, TestServer};
use errand::store::{JobState, NewJob};
use errand::web::WebConfig;
use fantoccini::{Client, ClientBuilder, Locator};
use serde_json::{Value, json};

const WAIT: Duration = Duration::from_secs(30);

/// A chromedriver process on a free port, killed at the end.
struct Driver {
    child: Child,
    port: u16,
    _profile: tempfile::TempDir,
}

impl Drop for Driver {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn tool(var: &str, default: &str, package: &str) -> String {
    let path = std::env::var(var).unwrap_or_else(|_| default.to_string());
    assert!(
        std::path::Path::new(&path).exists(),
        "{path} is missing: install Debian's {package} (apt-get install chromium chromium-driver; \
         .ci/run does), or set {var}"
    );
    path
}

fn start_driver() -> Driver {
    let driver = tool(
        "ERRAND_TEST_CHROMEDRIVER",
        "/usr/bin/chromedriver",
        "chromium-driver",
    );
    let port = TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let child = Command::new(driver)
        .arg(format!("--port={port}"))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start chromedriver");
    let deadline = Instant::now() + WAIT;
    let address = SocketAddr::from(([127, 0, 0, 1], port));
    while TcpStream::connect(address).is_err() {
        assert!(Instant::now() < deadline, "chromedriver did not start");
        std::thread::sleep(Duration::from_millis(50));
    }
    Driver {
        child,
        port,
        _profile: tempfile::tempdir().unwrap(),
    }
}

async fn browser(driver: &Driver) -> Client {
    let chromium = tool("ERRAND_TEST_CHROMIUM", "/usr/bin/chromium", "chromium");
    let mut caps = serde_json::Map::new();
    caps.insert(
        "goog:chromeOptions".into(),
        json!({
            "binary": chromium,
            "args": [
                "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                "--disable-background-networking", "--disable-component-update",
                "--disable-sync", "--no-first-run", "--window-size=1360,900",
                format!("--user-data-dir={}", driver._profile.path().display()),
            ],
        }),
    );
    ClientBuilder::new(hyper_util::client::legacy::connect::HttpConnector::new())
        .capabilities(caps)
        .connect(&format!("http://127.0.0.1:{}", driver.port))
        .await
        .expect("a chromium session")
}

/// Polls `check` until it yields, or fails the test.
async fn eventually<T, F, Fut>(what: &str, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = Instant::now() + WAIT;
    loop {
        if let Some(value) = check().await {
            return value;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn text_of(client: &Client, css: &str) -> Option<String> {
    client.find(Locator::Css(css)).await.ok()?.text().await.ok()
}

async fn count(client: &Client, css: &str) -> usize {
    client
        .find_all(Locator::Css(css))
        .await
        .map(|v| v.len())
        .unwrap_or(0)
}

async fn screenshot(client: &Client, name: &str, backend: Backend) {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("target/screenshots");
    std::fs::create_dir_all(&dir).unwrap();
    let png = client.screenshot().await.expect("a screenshot");
    let file = dir.join(format!(
        "{name}-{}.png",
        format!("{backend:?}").to_lowercase()
    ));
    std::fs::write(&file, png).unwrap();
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
}

/// A job that fails once and then succeeds, buried after its first attempt.
fn flaky(message: &str) -> NewJob {
    NewJob::new("fail", json!({"message": message, "times": 1})).max_attempts(1)
}

fn an_operator_works_the_dashboard(backend: Backend) {
    let db = TestDb::new(backend);
    let store = &db.store;
    // Jobs in three queues; the test server's worker takes `default` only.
    let mail: Vec<NewJob> = (0..3)
        .map(|i| {
            NewJob::new(
                "sleep",
                json!({"ms": 1, "to": format!("user{i}@example.com")}),
            )
            .queue("mail")
        })
        .collect();
    store.jobs_enqueue(&mail).unwrap();
    store
        .job_enqueue(&NewJob::new("noop", json!({"report": "daily"})).queue("reports"))
        .unwrap();
    let server = TestServer::start(
        &db,
        ServerOptions {
            worker: true,
            ..ServerOptions::default()
        },
    );
    let lone = store.job_enqueue(&flaky("card declined")).unwrap().id;
    let group: Vec<i64> = (0..3)
        .map(|_| store.job_enqueue(&flaky("smtp timeout")).unwrap().id)
        .collect();
    for id in std::iter::once(lone).chain(group.iter().copied()) {
        common::wait_state(store, id, JobState::Dead, WAIT);
    }
    let base = server.http().base().to_string();
    let driver = start_driver();
    runtime().block_on(async {
        let client = browser(&driver).await;

        // The overview shows the dead letters.
        client.goto(&format!("{base}/")).await.unwrap();
        let dead = eventually("the dead count", || async {
            text_of(&client, ".card-dead .n").await.filter(|n| n == "4")
        })
        .await;
        assert_eq!(dead, "4");
        screenshot(&client, "overview", backend).await;

        // Filter the job list by queue: the rows change without a reload
        // and the URL keeps the filter.
        client.goto(&format!("{base}/jobs")).await.unwrap();
        let marker: Value = client
            .execute("window.notReloaded = true; return true;", vec![])
            .await
            .unwrap();
        assert_eq!(marker, json!(true));
        client
            .find(Locator::Css("select[name=queue]"))
            .await
            .unwrap()
            .select_by_value("mail")
            .await
            .unwrap();
        eventually("only mail rows", || async {
            let rows = client
                .find_all(Locator::Css("#results tbody tr"))
                .await
                .ok()?;
            let mut queues = Vec::new();
            for row in &rows {
                queues.push(
                    row.find(Locator::Css("td:nth-child(5)"))
                        .await
                        .ok()?
                        .text()
                        .await
                        .ok()?,
                );
            }
            (queues.len() == 3 && queues.iter().all(|q| q == "mail")).then_some(())
        })
        .await;
        let url = client.current_url().await.unwrap();
        assert!(url.as_str().contains("queue=mail"), "{url}");
        let still: Value = client
            .execute("return window.notReloaded === true;", vec![])
            .await
            .unwrap();
        assert_eq!(still, json!(true), "filtering did not reload the page");
        screenshot(&client, "jobs", backend).await;

        // Open a job from the list.
        client
            .find(Locator::Css("#results tbody tr td:nth-child(2) a"))
            .await
            .unwrap()
            .click()
            .await
            .unwrap();
        let args = eventually("the job page", || async {
            text_of(&client, "pre.json").await
        })
        .await;
        assert!(args.contains("@example.com"), "{args}");
        // The test server works only `default`: mail waits, visibly.
        assert_eq!(
            text_of(&client, ".job-title .state").await.unwrap(),
            "queued"
        );

        // Replay a dead letter from its page and watch it complete.
        client.goto(&format!("{base}/jobs/{lone}")).await.unwrap();
        assert!(
            text_of(&client, ".timeline")
                .await
                .unwrap()
                .contains("card declined")
        );
        screenshot(&client, "job-dead", backend).await;
        client
            .find(Locator::Css("#job .actions button"))
            .await
            .unwrap()
            .click()
            .await
            .unwrap();
        eventually("the replayed job to complete", || async {
            text_of(&client, ".job-title .state")
                .await
                .filter(|s| s == "completed")
        })
        .await;
        eventually("the toast", || async {
            text_of(&client, "#toasts .toast")
                .await
                .filter(|t| t.contains("queued again"))
        })
        .await;
        screenshot(&client, "job-completed", backend).await;

        // Replay a whole dead-letter group and watch its progress.
        client.goto(&format!("{base}/dead")).await.unwrap();
        let groups = count(&client, "#groups tbody tr").await;
        assert_eq!(groups, 1, "one group left: smtp timeout");
        screenshot(&client, "dead", backend).await;
        client
            .find(Locator::Css("#groups .row-actions form button"))
            .await
            .unwrap()
            .click()
            .await
            .unwrap();
        eventually("the replay to finish", || async {
            text_of(&client, "#task .task-label")
                .await
                .filter(|t| t.starts_with("Done"))
        })
        .await;
        eventually("the group to leave the table", || async {
            text_of(&client, "#groups tbody")
                .await
                .filter(|t| t.contains("No dead letters"))
        })
        .await;
        for id in &group {
            common::wait_state(store, *id, JobState::Completed, WAIT);
        }

        // Pause a queue.
        client.goto(&format!("{base}/queues")).await.unwrap();
        let row = "//tr[td/a[text()='reports']]";
        client
            .find(Locator::XPath(&format!("{row}//button")))
            .await
            .unwrap()
            .click()
            .await
            .unwrap();
        eventually("the paused badge", || async {
            let cell = client
                .find(Locator::XPath(&format!("{row}/td[2]")))
                .await
                .ok()?;
            cell.text().await.ok().filter(|t| t == "paused")
        })
        .await;
        assert!(
            store
                .queues_list()
                .unwrap()
                .iter()
                .any(|q| q.name == "reports" && q.paused)
        );
        screenshot(&client, "queues", backend).await;

        client.goto(&format!("{base}/workers")).await.unwrap();
        screenshot(&client, "workers", backend).await;
        client.goto(&format!("{base}/audit")).await.unwrap();
        let audit = text_of(&client, "#entries tbody").await.unwrap();
        assert!(
            audit.contains("queue.pause") && audit.contains("dead.replay"),
            "{audit}"
        );
        screenshot(&client, "audit", backend).await;

        // On a phone-sized screen the navigation and tables stay usable.
        client.set_window_size(390, 844).await.unwrap();
        client.goto(&format!("{base}/jobs")).await.unwrap();
        screenshot(&client, "jobs-phone", backend).await;
        client.close().await.unwrap();
    });
}

fn a_viewer_can_look_but_not_act(backend: Backend) {
    let db = TestDb::new(backend);
    let id = db.store.job_enqueue(&flaky("declined")).unwrap().id;
    let jobs = db.store.jobs_claim("default", "test:1:x", 1).unwrap();
    db.store
        .job_fail(
            jobs[0].lease(),
            &errand::store::Failure {
                outcome: errand::store::AttemptOutcome::Error,
                error: "declined".into(),
                retry_in: None,
                detail: None,
            },
        )
        .unwrap();
    let server = TestServer::start(
        &db,
        ServerOptions {
            config: WebConfig {
                dashboard_users: vec!["vic:look-only:viewer".parse().unwrap()],
                ..WebConfig::default()
            },
            ..ServerOptions::default()
        },
    );
    let base = server
        .http()
        .base()
        .replace("http://", "http://vic:look-only@");
    let driver = start_driver();
    runtime().block_on(async {
        let client = browser(&driver).await;
        client.goto(&format!("{base}/jobs/{id}")).await.unwrap();
        let role = eventually("the page", || async { text_of(&client, ".who .role").await }).await;
        assert_eq!(role, "viewer");
        assert_eq!(count(&client, "#job .actions button").await, 0, "no action buttons");
        assert_eq!(count(&client, "textarea[name=args]").await, 0, "no args editor");
        client.goto(&format!("{base}/jobs")).await.unwrap();
        assert_eq!(count(&client, "input[name=ids]").await, 0, "no bulk selection");
        client.goto(&format!("{base}/queues")).await.unwrap();
        assert_eq!(count(&client, "#queues button").await, 0);
        // Even a hand-made request from the page is refused.
        let status: Value = client
            .execute_async(
                "const done = arguments[arguments.length - 1];
                 const token = JSON.parse(document.body.getAttribute('hx-headers:inherited'))['X-CSRF-Token'];
                 fetch(location.origin + '/jobs/' + arguments[0] + '/retry',
                       {method: 'POST', headers: {'X-CSRF-Token': token}})
                   .then(r => done(r.status), e => done(String(e)));",
                vec![json!(id)],
            )
            .await
            .unwrap();
        assert_eq!(status, json!(403));
        screenshot(&client, "viewer", backend).await;
        client.close().await.unwrap();
    });
    assert_eq!(db.store.job_get(id).unwrap().unwrap().state, JobState::Dead);
}

on_both_backends_raw!(
    an_operator_works_the_dashboard,
    a_viewer_can_look_but_not_act
);
