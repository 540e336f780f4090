//! Shared test support: a fresh database per test on either backend, and
//! waiting on conditions with a deadline.
//!
//! PostgreSQL tests create a database on the server at
//! `ERRAND_TEST_POSTGRES_URL` (default `postgres://postgres@127.0.0.1:5432/postgres`)
//! and drop it afterwards. If that server is unreachable they fail: they
//! never pass by skipping. Run only the SQLite half with `cargo test sqlite`.

#![allow(dead_code)]

use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use diesel::{Connection, PgConnection, RunQueryDsl};
use errand::store::{Store, StoreOptions};

pub mod process;
pub mod smtp;

pub const DEFAULT_PG_URL: &str = "postgres://postgres@127.0.0.1:5432/postgres";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    Sqlite,
    Postgres,
}

/// A freshly created and migrated database, dropped with the value.
pub struct TestDb {
    pub store: Store,
    pub url: String,
    pub backend: Backend,
    _dir: Option<tempfile::TempDir>,
    pg: Option<(String, String)>,
}

impl TestDb {
    pub fn new(backend: Backend) -> TestDb {
        TestDb::create(backend, true)
    }

    /// A fresh database with no tables yet (its `store` is not migrated).
    pub fn unmigrated(backend: Backend) -> TestDb {
        TestDb::create(backend, false)
    }

    fn create(backend: Backend, migrate: bool) -> TestDb {
        let open = |url: &str| {
            let store = Store::open(url, &StoreOptions::default()).expect("open test database");
            if migrate {
                store.migrate().expect("migrate test database");
            }
            store
        };
        match backend {
            Backend::Sqlite => {
                let dir = tempfile::tempdir().expect("temp dir");
                let url = dir.path().join("errand.db").display().to_string();
                let store = open(&url);
                TestDb {
                    store,
                    url,
                    backend,
                    _dir: Some(dir),
                    pg: None,
                }
            }
            Backend::Postgres => {
                let admin = pg_admin_url();
                static COUNTER: AtomicU32 = AtomicU32::new(0);
                let name = format!(
                    "errand_test_{}_{}_{}",
                    std::process::id(),
                    COUNTER.fetch_add(1, Ordering::SeqCst),
                    &uuid::Uuid::new_v4().simple().to_string()[..6]
                );
                let mut conn = PgConnection::establish(&admin).unwrap_or_else(|e| {
                    panic!(
                        "PostgreSQL at {admin} is unreachable ({e}). Start it, or point \
                         ERRAND_TEST_POSTGRES_URL at one; run only the SQLite tests with \
                         `cargo test sqlite`."
                    )
                });
                diesel::sql_query(format!("CREATE DATABASE {name}"))
                    .execute(&mut conn)
                    .expect("create test database");
                let url = with_database(&admin, &name);
                let store = open(&url);
                TestDb {
                    store,
                    url,
                    backend,
                    _dir: None,
                    pg: Some((admin, name)),
                }
            }
        }
    }

    /// Another store on the same database: its own pool and its own
    /// in-process wake-ups, like another process.
    pub fn other_store(&self) -> Store {
        Store::open(&self.url, &StoreOptions::default()).expect("second store")
    }
}

impl Drop for TestDb {
    fn drop(&mut self) {
        if let Some((admin, name)) = &self.pg
            && let Ok(mut conn) = PgConnection::establish(admin)
        {
            let _ = diesel::sql_query(format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
                .execute(&mut conn);
        }
    }
}

pub fn pg_admin_url() -> String {
    std::env::var("ERRAND_TEST_POSTGRES_URL").unwrap_or_else(|_| DEFAULT_PG_URL.to_string())
}

/// `url` with its database name replaced by `name`.
fn with_database(url: &str, name: &str) -> String {
    let (base, query) = match url.split_once('?') {
        Some((b, q)) => (b, Some(q)),
        None => (url, None),
    };
    let after_scheme = base.find("://").map(|i| i + 3).unwrap_or(0);
    let root = match base[after_scheme..].find('/') {
        Some(i) => &base[..after_scheme + i],
        None => base,
    };
    match query {
        Some(q) => format!("{root}/{name}?{q}"),
        None => format!("{root}/{name}"),
    }
}

/// Polls `check` until it returns `Some`, failing the test after `within`.
pub fn wait_for<T>(what: &str, within: Duration, mut check: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + within;
    loop {
        if let Some(value) = check() {
            return value;
        }
        assert!(
            Instant::now() < deadline,
            "timed out after {within:?} waiting for {what}"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Waits for job `id` to reach `state`, and returns it.
pub fn wait_state(
    store: &Store,
    id: i64,
    state: errand::JobState,
    within: Duration,
) -> errand::Job {
    wait_for(&format!("job {id} to be {state}"), within, || {
        store.job_get(id).unwrap().filter(|j| j.state == state)
    })
}

/// Generates `sqlite::NAME` and `postgres::NAME` tests for each listed
/// `fn NAME(backend: Backend)`, for tests that make their own databases.
#[macro_export]
macro_rules! on_both_backends_raw {
    ($($name:ident),+ $(,)?) => {
        mod sqlite_raw {
            $(#[test]
            fn $name() {
                super::$name($crate::common::Backend::Sqlite);
            })+
        }
        mod postgres_raw {
            $(#[test]
            fn $name() {
                super::$name($crate::common::Backend::Postgres);
            })+
        }
    };
}

/// Generates `sqlite::NAME` and `postgres::NAME` tests for each listed
/// `fn NAME(db: &TestDb)`.
#[macro_export]
macro_rules! on_both_backends {
    ($($name:ident),+ $(,)?) => {
        mod sqlite {
            $(#[test]
            fn $name() {
                super::$name(&$crate::common::TestDb::new($crate::common::Backend::Sqlite));
            })+
        }
        mod postgres {
            $(#[test]
            fn $name() {
                super::$name(&$crate::common::TestDb::new($crate::common::Backend::Postgres));
            })+
        }
    };
}

#[cfg(test)]
mod tests {
    #[test]
    fn database_names_are_swapped_in_urls() {
        assert_eq!(
            super::with_database("postgres://u@h:5432/postgres?sslmode=disable", "x"),
            "postgres://u@h:5432/x?sslmode=disable"
        );
        assert_eq!(
            super::with_database("postgres://u@h", "x"),
            "postgres://u@h/x"
        );
    }
}

/// The web server on a loopback port, in this process, over real HTTP.
pub struct TestServer {
    pub base: String,
    shutdown: errand::shutdown::Shutdown,
    thread: Option<std::thread::JoinHandle<()>>,
    worker: Option<errand::Worker>,
}

/// How to start a [`TestServer`].
#[derive(Clone, Default)]
pub struct ServerOptions {
    pub config: errand::web::WebConfig,
    /// Also run a worker (default queue, 4 threads) sharing the metrics.
    pub worker: bool,
    pub store: Option<Store>,
}

impl TestServer {
    pub fn start(db: &TestDb, options: ServerOptions) -> TestServer {
        let store = options.store.unwrap_or_else(|| db.store.clone());
        let mut registry = errand::Registry::new();
        errand::demo::register(&mut registry);
        let registry = std::sync::Arc::new(registry);
        let metrics = errand::metrics::Metrics::new();
        let worker = options.worker.then(|| {
            errand::Worker::start(
                store.clone(),
                registry.clone(),
                errand::WorkerConfig {
                    queues: vec![errand::worker::QueueSpec {
                        name: "default".into(),
                        concurrency: 4,
                    }],
                    poll_interval: Duration::from_millis(50),
                    heartbeat_interval: Duration::from_millis(200),
                    backoff: errand::Backoff::Fixed(Duration::ZERO),
                    metrics: metrics.clone(),
                    ..errand::WorkerConfig::default()
                },
            )
            .expect("worker starts")
        });
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let base = format!("http://{}", listener.local_addr().unwrap());
        let shutdown = errand::shutdown::Shutdown::new();
        let state = errand::web::AppState::new(store, registry, metrics, options.config);
        let stop = shutdown.clone();
        let thread = std::thread::spawn(move || {
            actix_web::rt::System::new()
                .block_on(errand::web::serve(state, listener, stop))
                .expect("server runs");
        });
        TestServer {
            base,
            shutdown,
            thread: Some(thread),
            worker,
        }
    }

    pub fn http(&self) -> Http {
        Http::new(&self.base, None)
    }

    pub fn http_with_token(&self, token: &str) -> Http {
        Http::new(&self.base, Some(token))
    }
}

impl Drop for TestServer {
    fn drop(&mut self) {
        self.shutdown.request();
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
        if let Some(worker) = self.worker.take() {
            worker.shutdown(Duration::from_secs(5), &errand::shutdown::Shutdown::new());
        }
    }
}

/// A blocking HTTP client that returns every status as a [`Reply`].
#[derive(Clone)]
pub struct Http {
    agent: ureq::Agent,
    base: String,
    token: Option<String>,
    basic: Option<String>,
}

/// A response, read whole.
#[derive(Debug, Clone)]
pub struct Reply {
    pub status: u16,
    pub body: String,
    pub headers: Vec<(String, String)>,
}

impl Reply {
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_str(&self.body).unwrap_or_else(|e| panic!("not JSON ({e}): {}", self.body))
    }

    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    /// The body as JSON, or `null` when it is not JSON.
    pub fn json_or_null(&self) -> serde_json::Value {
        serde_json::from_str(&self.body).unwrap_or(serde_json::Value::Null)
    }

    /// The `error` code of a JSON error body.
    pub fn error(&self) -> String {
        self.json()["error"]
            .as_str()
            .unwrap_or_default()
            .to_string()
    }
}

impl Http {
    pub fn new(base: &str, token: Option<&str>) -> Http {
        let agent: ureq::Agent = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .build()
            .into();
        Http {
            agent,
            base: base.to_string(),
            token: token.map(str::to_string),
            basic: None,
        }
    }

    /// A client that signs in to the dashboard with HTTP Basic.
    pub fn with_basic(base: &str, user: &str, password: &str) -> Http {
        use base64::Engine;
        let mut http = Http::new(base, None);
        http.basic =
            Some(base64::engine::general_purpose::STANDARD.encode(format!("{user}:{password}")));
        http
    }

    pub fn base(&self) -> &str {
        &self.base
    }

    /// GET with extra headers.
    pub fn get_with(&self, path: &str, headers: &[(&str, &str)]) -> Reply {
        let mut request = self.auth(self.agent.get(format!("{}{path}", self.base)));
        for (k, v) in headers {
            request = request.header(*k, *v);
        }
        Http::finish(request.call())
    }

    fn finish(response: Result<ureq::http::Response<ureq::Body>, ureq::Error>) -> Reply {
        let mut response = response.expect("HTTP exchange");
        let headers = response
            .headers()
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_str().unwrap_or_default().to_string()))
            .collect();
        let status = response.status().as_u16();
        let body = response.body_mut().read_to_string().unwrap_or_default();
        Reply {
            status,
            body,
            headers,
        }
    }

    fn auth<B>(&self, request: ureq::RequestBuilder<B>) -> ureq::RequestBuilder<B> {
        match (&self.token, &self.basic) {
            (Some(token), _) => request.header("Authorization", format!("Bearer {token}")),
            (None, Some(basic)) => request.header("Authorization", format!("Basic {basic}")),
            (None, None) => request,
        }
    }

    pub fn get(&self, path: &str) -> Reply {
        Http::finish(
            self.auth(self.agent.get(format!("{}{path}", self.base)))
                .call(),
        )
    }

    pub fn delete(&self, path: &str) -> Reply {
        Http::finish(
            self.auth(self.agent.delete(format!("{}{path}", self.base)))
                .call(),
        )
    }

    /// POSTs raw bytes with a content type and extra headers.
    pub fn post_raw(
        &self,
        path: &str,
        content_type: &str,
        body: &[u8],
        headers: &[(&str, &str)],
    ) -> Reply {
        let mut request = self
            .auth(self.agent.post(format!("{}{path}", self.base)))
            .content_type(content_type);
        for (k, v) in headers {
            request = request.header(*k, *v);
        }
        Http::finish(request.send(body))
    }

    pub fn post(&self, path: &str, body: &serde_json::Value) -> Reply {
        self.post_raw(path, "application/json", body.to_string().as_bytes(), &[])
    }

    pub fn post_with(
        &self,
        path: &str,
        body: &serde_json::Value,
        headers: &[(&str, &str)],
    ) -> Reply {
        self.post_raw(
            path,
            "application/json",
            body.to_string().as_bytes(),
            headers,
        )
    }
}
