//! How fast the dashboard answers with a million jobs stored.
//!
//! Fills an empty database with a realistic mix of jobs (raw SQL, in a few
//! large transactions: about 90% completed over the last 24 hours, 5% dead in
//! a handful of error groups, 2% retrying, 2% queued of which a quarter are
//! scheduled, a few hundred running, the rest cancelled; 10 queues, 8 kinds,
//! an attempt row for every finished attempt, a few thousand of them failed
//! in the last hour; unfinished and dead jobs are spread evenly over the
//! table, as jobs failing or waiting at all hours are, which is the costly
//! layout for queries that read them through the table), runs `ANALYZE`,
//! serves the dashboard in this process on a loopback port (no worker), and
//! times real HTTP requests against it: after a few warm-ups, p50/p95/max of
//! each page, full and as an htmx fragment, beside a trivial request
//! (`GET /healthz`, one before each timed request) as the same-run baseline.
//! Then the store calls behind the pages, without HTTP.
//!
//! ```sh
//! cargo run --release --example dashboard_bench -- --database-url /tmp/bench.db --jobs 1000000
//! cargo run --release --example dashboard_bench -- \
//!     --database-url postgres://postgres@127.0.0.1:5432/errand_bench --jobs 1000000
//! ```
//!
//! The database must be empty; `--keep` reuses one this program filled
//! before (the data is anchored to the fill time: after an hour the "last
//! hour" figures thin out, so refill for comparable runs). `--json` prints
//! one JSON object on stdout instead of tables; progress goes to stderr.
//! `scripts/bench-dashboard.sh` runs both backends on fresh databases.

use std::fmt::Write as _;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use clap::Parser;
use diesel::connection::SimpleConnection;
use diesel::prelude::*;
use diesel::sql_types::{BigInt, Text};
use errand::store::{Backend, JobFilter, JobState, Location, Store, StoreOptions};

#[derive(Parser)]
#[command(about = "Times the dashboard's pages with many jobs stored")]
struct Args {
    /// SQLite file path or postgres:// URL of an empty database.
    #[arg(long)]
    database_url: String,
    /// How many jobs to store.
    #[arg(long, default_value_t = 1_000_000)]
    jobs: i64,
    /// Reuse a database that already holds at least --jobs jobs (no filling).
    #[arg(long)]
    keep: bool,
    /// PostgreSQL: `VACUUM ANALYZE` before measuring, which sets the
    /// visibility map as autovacuum eventually does (index-only scans).
    #[arg(long)]
    vacuum: bool,
    /// Print the figures as one JSON object.
    #[arg(long)]
    json: bool,
    /// Timed requests per page.
    #[arg(long, default_value_t = 30)]
    requests: usize,
    /// Untimed requests per page first.
    #[arg(long, default_value_t = 3)]
    warmups: usize,
}

type BoxError = Box<dyn std::error::Error + Send + Sync>;

fn main() -> std::process::ExitCode {
    match run(Args::parse()) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("dashboard_bench: {e}");
            std::process::ExitCode::FAILURE
        }
    }
}

fn run(args: Args) -> Result<(), BoxError> {
    if args.jobs < 1000 || args.requests == 0 {
        return Err("--jobs must be at least 1000 and --requests at least 1".into());
    }
    let store = Store::open_and_migrate(&args.database_url, &StoreOptions::default())?;
    let backend = store.backend();
    let mut conn = Conn::open(&args.database_url)?;

    let existing = conn.scalar("SELECT COUNT(*) AS n FROM jobs")?;
    let fill_secs = if existing == 0 {
        let started = Instant::now();
        fill(&mut conn, args.jobs)?;
        let secs = started.elapsed().as_secs_f64();
        progress(format_args!("filled in {secs:.1} s"));
        Some(secs)
    } else if args.keep && existing >= args.jobs {
        progress(format_args!(
            "--keep: reusing the {} jobs already stored (no filling)",
            thousands(existing)
        ));
        None
    } else if args.keep {
        return Err(format!(
            "the database holds {} jobs, fewer than --jobs {}: use a fresh database \
             (or a smaller --jobs)",
            thousands(existing),
            thousands(args.jobs)
        )
        .into());
    } else {
        return Err(format!(
            "the database is not empty ({} jobs): give a fresh SQLite file or PostgreSQL \
             database, or pass --keep to reuse one this benchmark filled before",
            thousands(existing)
        )
        .into());
    };
    if args.vacuum {
        if backend == Backend::Postgres {
            let started = Instant::now();
            conn.batch("VACUUM ANALYZE")?;
            progress(format_args!(
                "VACUUM ANALYZE in {:.1} s",
                started.elapsed().as_secs_f64()
            ));
        } else {
            progress(format_args!("--vacuum: nothing to do on SQLite"));
        }
    }
    let states = conn.state_counts()?;
    let data_age_ms = conn
        .scalar("SELECT COALESCE(MAX(finished_at), 0) AS n FROM jobs WHERE state = 'completed'")
        .map(|newest| epoch_ms() - newest)?;
    if data_age_ms > 3_600_000 {
        progress(format_args!(
            "warning: the newest completion is {} min old: the last-hour figures are thinner \
             than at fill time; refill for comparable runs",
            data_age_ms / 60_000
        ));
    }
    drop(conn);

    let server = Server::start(store.clone())?;
    let http = Http::new(&server.base);
    let load_before = load_average();
    progress(format_args!(
        "measuring: {} warm-ups and {} timed requests per page (load average {load_before})",
        args.warmups, args.requests
    ));
    let mut pages = Vec::new();
    for page in PAGES {
        let figures = http.measure(&page, args.warmups, args.requests)?;
        progress(format_args!(
            "  {:<44} p50 {:>8.2} ms",
            page.label(),
            figures.p50
        ));
        pages.push((page, figures));
    }
    let stores = measure_store(&store, args.warmups, args.requests)?;
    let load_after = load_average();
    drop(server);

    let baseline = pages
        .iter()
        .find(|(p, _)| p.path == "/healthz")
        .map(|(_, f)| f.p50)
        .unwrap_or(f64::NAN);
    if args.json {
        let page_values: Vec<serde_json::Value> = pages
            .iter()
            .map(|(page, f)| {
                serde_json::json!({
                    "name": page.name,
                    "path": page.path,
                    "htmx": page.htmx,
                    "p50_ms": round3(f.p50),
                    "p95_ms": round3(f.p95),
                    "max_ms": round3(f.max),
                    "healthz_p50_interleaved_ms": round3(f.healthz_p50),
                    "p50_over_healthz": round3(f.p50 / f.healthz_p50),
                    "bytes": f.bytes,
                })
            })
            .collect();
        let store_values: Vec<serde_json::Value> = stores
            .iter()
            .map(|(name, f)| {
                serde_json::json!({
                    "call": name,
                    "p50_ms": round3(f.p50),
                    "p95_ms": round3(f.p95),
                    "max_ms": round3(f.max),
                })
            })
            .collect();
        let out = serde_json::json!({
            "backend": backend.as_str(),
            "jobs": args.jobs,
            "states": states
                .iter()
                .map(|(s, n)| (s.clone(), serde_json::Value::from(*n)))
                .collect::<serde_json::Map<_, _>>(),
            "fill_secs": fill_secs.map(round3),
            "warmups": args.warmups,
            "requests": args.requests,
            "load_average_before": load_before,
            "load_average_after": load_after,
            "healthz_p50_ms": round3(baseline),
            "pages": page_values,
            "store_calls": store_values,
        });
        println!("{out}");
    } else {
        let mut out = String::new();
        let _ = writeln!(
            out,
            "\nerrand dashboard benchmark: {} with {} jobs ({}), {} timed requests per page \
             after {} warm-ups",
            backend.as_str(),
            thousands(args.jobs),
            states
                .iter()
                .map(|(s, n)| format!("{s} {}", thousands(*n)))
                .collect::<Vec<_>>()
                .join(", "),
            args.requests,
            args.warmups
        );
        if let Some(secs) = fill_secs {
            let _ = writeln!(out, "filled in {secs:.1} s");
        }
        let _ = writeln!(
            out,
            "load average before: {load_before}; after: {load_after}\n\
             healthz p50: a GET /healthz timed before each request of the page \
             (the same-moment baseline)\n"
        );
        let _ = writeln!(
            out,
            "{:<44} {:>9} {:>9} {:>9} {:>11} {:>12} {:>8}",
            "page", "p50 ms", "p95 ms", "max ms", "healthz p50", "p50/healthz", "bytes"
        );
        for (page, f) in &pages {
            let _ = writeln!(
                out,
                "{:<44} {:>9.2} {:>9.2} {:>9.2} {:>11.2} {:>11.1}x {:>8}",
                page.label(),
                f.p50,
                f.p95,
                f.max,
                f.healthz_p50,
                f.p50 / f.healthz_p50,
                f.bytes
            );
        }
        let _ = writeln!(
            out,
            "\n{:<44} {:>9} {:>9} {:>9}",
            "store call (no HTTP)", "p50 ms", "p95 ms", "max ms"
        );
        for (name, f) in &stores {
            let _ = writeln!(
                out,
                "{:<44} {:>9.2} {:>9.2} {:>9.2}",
                name, f.p50, f.p95, f.max
            );
        }
        print!("{out}");
    }
    Ok(())
}

// ---------------------------------------------------------------------------
// Filling
// ---------------------------------------------------------------------------

/// Rows per statement (each statement is one transaction).
const CHUNK: i64 = 100_000;
const DAY_MS: i64 = 86_400_000;
const HOUR_MS: i64 = 3_600_000;

/// The error messages of dead and retrying jobs: the SQL that builds each
/// (from the row's `n`, `h`, `uid` and `attempt`), and a sample of its text
/// from which the signature is computed with errand's own function.
const ERRORS: [(&str, &str); 6] = [
    (
        "'SMTP error: connection refused by smtp.example.com:25 (attempt ' || (h % 25 + 1) || ')'",
        "SMTP error: connection refused by smtp.example.com:25 (attempt 7)",
    ),
    (
        "'HTTP 503 from https://api.example.com/v2/users/' || uid || ': service unavailable'",
        "HTTP 503 from https://api.example.com/v2/users/4711: service unavailable",
    ),
    (
        "'invalid args: missing field `template` at line 1 column ' || (n % 90 + 10)",
        "invalid args: missing field `template` at line 1 column 42",
    ),
    (
        "'timeout: the job ran past its deadline of 300s'",
        "timeout: the job ran past its deadline of 300s",
    ),
    (
        "'panicked at src/handlers/report.rs:' || (h % 400 + 10) || ':9: called `Option::unwrap()` on a `None` value'",
        "panicked at src/handlers/report.rs:120:9: called `Option::unwrap()` on a `None` value",
    ),
    (
        "'user ' || uid || ' not found in the accounts database'",
        "user 4711 not found in the accounts database",
    ),
];

/// The second line of every error: a location, as errand records panics.
const ERROR_TAIL: &str =
    "'\n   at errand::worker::run_one (src/worker.rs:' || (h % 900 + 100) || ')'";

fn fill(conn: &mut Conn, total: i64) -> Result<(), BoxError> {
    let now = epoch_ms();
    progress(format_args!(
        "filling {} jobs ({} rows per transaction)",
        thousands(total),
        thousands(CHUNK)
    ));
    let started = Instant::now();
    let mut lo = 1;
    while lo <= total {
        let hi = (lo + CHUNK - 1).min(total);
        conn.batch(&jobs_insert(conn.backend(), lo, hi, total, now))?;
        progress(format_args!(
            "  jobs {:>9} / {} ({:.1} s)",
            thousands(hi),
            thousands(total),
            started.elapsed().as_secs_f64()
        ));
        lo = hi + 1;
    }
    // One attempt row per finished attempt, as the worker records them: a
    // completed attempt for each completed job, the last failed attempt of
    // each dead or retrying job (a tenth of them in the last hour, for the
    // failures chart).
    let max_id = conn.scalar("SELECT COALESCE(MAX(id), 0) AS n FROM jobs")?;
    let min_id = conn.scalar("SELECT COALESCE(MIN(id), 0) AS n FROM jobs")?;
    let mut lo = min_id;
    let mut added = 0;
    while lo <= max_id {
        let hi = (lo + 2 * CHUNK - 1).min(max_id);
        added += conn.exec(&format!(
            "INSERT INTO job_attempts (job_id, attempt, worker, started_at, finished_at, outcome, error) \
             SELECT id, attempt, COALESCE(locked_by, ''), started_at, finished_at, 'completed', NULL \
             FROM jobs WHERE state = 'completed' AND id BETWEEN {lo} AND {hi}"
        ))?;
        added += conn.exec(&format!(
            "INSERT INTO job_attempts (job_id, attempt, worker, started_at, finished_at, outcome, error) \
             SELECT id, attempt, COALESCE(locked_by, ''), f - 20 - (id % 5000), f, \
                    CASE WHEN id % 7 = 0 THEN 'timeout' WHEN id % 11 = 0 THEN 'panic' ELSE 'error' END, \
                    last_error \
             FROM (SELECT id, attempt, locked_by, last_error, \
                          CASE WHEN id % 10 = 0 THEN {now} - 1000 - (id * 7919) % {window} \
                               ELSE COALESCE(finished_at, started_at + 1000) END AS f \
                   FROM jobs WHERE state IN ('dead', 'retrying') AND id BETWEEN {lo} AND {hi}) a",
            window = HOUR_MS - 10_000
        ))?;
        progress(format_args!(
            "  attempts {:>9} ({:.1} s)",
            thousands(added as i64),
            started.elapsed().as_secs_f64()
        ));
        lo = hi + 1;
    }
    // Four live workers (the ones named in locked_by), one paused queue.
    for w in 0..4 {
        conn.batch(&format!(
            "INSERT INTO workers (id, host, pid, queues, concurrency, version, started_at, heartbeat_at) \
             VALUES ('bench-host:{w}', 'bench-host', {pid}, \
                     'q0=8,q1=8,q2=8,q3=8,q4=8,q5=8,q6=8,q7=8,q8=8,q9=8', 80, 'bench', {start}, {now})",
            pid = 1000 + w,
            start = now - DAY_MS,
        ))?;
    }
    conn.batch(&format!(
        "INSERT INTO queues (name, paused, updated_at) VALUES ('q9', TRUE, {now})"
    ))?;
    let analyzing = Instant::now();
    conn.batch("ANALYZE")?;
    progress(format_args!(
        "ANALYZE in {:.1} s",
        analyzing.elapsed().as_secs_f64()
    ));
    Ok(())
}

/// One `INSERT … SELECT` of the jobs numbered `lo..=hi` out of `total`.
///
/// Per row: `b` (0..999, exactly uniform over any 1,000 consecutive `n`)
/// picks the state; `h`, a multiplicative hash of `n`, picks queue, kind and
/// the rest independently of the state; `t` is the job's time, rising with
/// `n` over the last 24 hours (ids grow with time, as they do).
fn jobs_insert(backend: Backend, lo: i64, hi: i64, total: i64, now: i64) -> String {
    let source = match backend {
        Backend::Postgres => format!("generate_series({lo}::BIGINT, {hi}::BIGINT) AS seq(n)"),
        Backend::Sqlite => "seq".to_string(),
    };
    let prefix = match backend {
        Backend::Postgres => String::new(),
        Backend::Sqlite => format!(
            "WITH RECURSIVE seq(n) AS (SELECT {lo} UNION ALL SELECT n + 1 FROM seq WHERE n < {hi}) "
        ),
    };
    // s: 0 completed, 1 dead, 2 retrying, 3 queued, 4 running, 5 cancelled.
    let mut error_case = String::from("CASE e");
    let mut signature_case = String::from("CASE e");
    for (i, (sql, sample)) in ERRORS.iter().enumerate() {
        let signature = errand::store::error_signature(sample).replace('\'', "''");
        let _ = write!(error_case, " WHEN {i} THEN {sql}");
        let _ = write!(signature_case, " WHEN {i} THEN '{signature}'");
    }
    error_case.push_str(" END");
    signature_case.push_str(" END");
    let span = DAY_MS - 10_000;
    format!(
        "{prefix}INSERT INTO jobs (queue, kind, args, state, priority, attempt, max_attempts, \
            run_at, created_at, started_at, finished_at, timeout_ms, lease_id, locked_by, \
            heartbeat_at, deadline_at, rescue_count, last_error, error_signature, unique_key, \
            cancel_requested) \
         SELECT 'q' || ((h / 16) % 10), 'k' || ((h / 65536) % 8), \
            '{{\"user_id\":' || uid || ',\"email\":\"user' || uid || '@example.com\",\"template\":\"welcome\",\"n\":' || n || '}}', \
            CASE s WHEN 0 THEN 'completed' WHEN 1 THEN 'dead' WHEN 2 THEN 'retrying' \
                   WHEN 3 THEN 'queued' WHEN 4 THEN 'running' ELSE 'cancelled' END, \
            CASE n % 10 WHEN 0 THEN -1 WHEN 1 THEN 1 ELSE 0 END, \
            attempt, 25, \
            CASE s WHEN 2 THEN {now} + 15000 + h % 600000 \
                   WHEN 3 THEN CASE WHEN h % 4 = 0 THEN {now} + 60000 + h % {DAY_MS} \
                                    ELSE {now} - h % 120000 END \
                   ELSE t - 1000 END, \
            t - 1500, \
            CASE s WHEN 3 THEN NULL WHEN 5 THEN NULL WHEN 4 THEN {now} - h % 60000 ELSE t END, \
            CASE s WHEN 0 THEN t + 50 + h % 2000 WHEN 1 THEN t + h % 5000 \
                   WHEN 5 THEN t + 1000 ELSE NULL END, \
            300000, attempt, \
            CASE WHEN s IN (3, 5) THEN NULL ELSE 'bench-host:' || (h % 4) END, \
            CASE s WHEN 4 THEN {now} - h % 10000 ELSE NULL END, \
            CASE s WHEN 4 THEN {now} - h % 60000 + 300000 ELSE NULL END, \
            CASE WHEN s = 1 AND h % 50 = 0 THEN 3 ELSE 0 END, \
            CASE WHEN s IN (1, 2) THEN {error_case} || {ERROR_TAIL} ELSE NULL END, \
            CASE s WHEN 1 THEN {signature_case} ELSE NULL END, \
            NULL, FALSE \
         FROM (SELECT n, h, t, s, h % 100000 AS uid, \
                      CASE WHEN (h / 7) % 10 < 4 THEN 0 WHEN (h / 7) % 10 < 6 THEN 1 \
                           ELSE (h / 7) % 10 - 4 END AS e, \
                      CASE s WHEN 0 THEN 1 + CASE WHEN h % 20 = 0 THEN 1 ELSE 0 END \
                             WHEN 1 THEN CASE WHEN h % 3 = 0 THEN 1 ELSE 25 END \
                             WHEN 2 THEN 1 + h % 5 \
                             WHEN 4 THEN 1 \
                             ELSE 0 END AS attempt \
               FROM (SELECT n, h, t, \
                            CASE WHEN b < 900 THEN 0 WHEN b < 950 THEN 1 WHEN b < 970 THEN 2 \
                                 WHEN b < 990 THEN 3 WHEN b = 999 AND (n / 1000) % 3 = 0 THEN 4 \
                                 ELSE 5 END AS s \
                     FROM (SELECT n, (n * 7919) % 1000 AS b, (n * 2654435761) % 4294967296 AS h, \
                                  {now} - {DAY_MS} + n * {span} / {total} AS t \
                           FROM {source}) s1) s2) s3"
    )
}

/// A plain connection for filling (the store's pool is private).
enum Conn {
    Pg(PgConnection),
    Sqlite(SqliteConnection),
}

macro_rules! on_conn {
    ($conn:expr, $c:ident => $body:expr) => {
        match $conn {
            Conn::Pg($c) => $body,
            Conn::Sqlite($c) => $body,
        }
    };
}

#[derive(QueryableByName)]
struct Count {
    #[diesel(sql_type = BigInt)]
    n: i64,
}

#[derive(QueryableByName)]
struct StateCount {
    #[diesel(sql_type = Text)]
    state: String,
    #[diesel(sql_type = BigInt)]
    n: i64,
}

impl Conn {
    fn open(url: &str) -> Result<Conn, BoxError> {
        Ok(match errand::store::parse_url(url)? {
            Location::Postgres(url) => Conn::Pg(PgConnection::establish(&url)?),
            Location::SqliteFile(path) => {
                let mut c = SqliteConnection::establish(&path)?;
                // WAL like the store's connections; NORMAL sync and a big
                // cache only for this connection, to fill faster.
                c.batch_execute(
                    "PRAGMA busy_timeout = 10000; PRAGMA journal_mode = WAL; \
                     PRAGMA synchronous = NORMAL; PRAGMA cache_size = -262144; \
                     PRAGMA foreign_keys = ON;",
                )?;
                Conn::Sqlite(c)
            }
        })
    }

    fn backend(&self) -> Backend {
        match self {
            Conn::Pg(_) => Backend::Postgres,
            Conn::Sqlite(_) => Backend::Sqlite,
        }
    }

    fn batch(&mut self, sql: &str) -> QueryResult<()> {
        on_conn!(self, c => c.batch_execute(sql))
    }

    fn exec(&mut self, sql: &str) -> QueryResult<usize> {
        on_conn!(self, c => diesel::sql_query(sql).execute(c))
    }

    /// A query returning one BIGINT column named `n`.
    fn scalar(&mut self, sql: &str) -> QueryResult<i64> {
        on_conn!(self, c => diesel::sql_query(sql).get_result::<Count>(c).map(|r| r.n))
    }

    fn state_counts(&mut self) -> QueryResult<Vec<(String, i64)>> {
        const SQL: &str = "SELECT state, COUNT(*) AS n FROM jobs GROUP BY state ORDER BY 2 DESC";
        let rows: Vec<StateCount> = on_conn!(self, c => diesel::sql_query(SQL).load(c))?;
        Ok(rows.into_iter().map(|r| (r.state, r.n)).collect())
    }
}

// ---------------------------------------------------------------------------
// Measuring
// ---------------------------------------------------------------------------

#[derive(Clone, Copy)]
struct Page {
    name: &'static str,
    path: &'static str,
    htmx: bool,
}

impl Page {
    fn label(&self) -> String {
        let fragment = if self.htmx { " (htmx)" } else { "" };
        let again = if self.name.ends_with("again") {
            " (again)"
        } else {
            ""
        };
        format!("GET {}{fragment}{again}", self.path)
    }
}

const fn page(name: &'static str, path: &'static str, htmx: bool) -> Page {
    Page { name, path, htmx }
}

const PAGES: [Page; 19] = [
    page("healthz", "/healthz", false),
    page("overview", "/", false),
    page("overview", "/", true),
    page("jobs dead in a queue", "/jobs?state=dead&queue=q3", false),
    page("jobs dead in a queue", "/jobs?state=dead&queue=q3", true),
    page("jobs of a queue and kind", "/jobs?queue=q3&kind=k2", false),
    page("jobs of a queue and kind", "/jobs?queue=q3&kind=k2", true),
    page("jobs", "/jobs", false),
    page("jobs", "/jobs", true),
    page("dead letters", "/dead", false),
    page("dead letters", "/dead", true),
    page("queues", "/queues", false),
    page("queues", "/queues", true),
    // Beyond the brief: filters an operator picks from the same menus.
    page("dead letters of a queue", "/dead?queue=q3", false),
    page(
        "jobs dead of a queue and kind",
        "/jobs?state=dead&queue=q3&kind=k2",
        false,
    ),
    // Worst cases: a menu combination no job matches (`sleep` is a
    // registered kind, but no stored job has it), and the text search.
    page("jobs matching nothing", "/jobs?queue=q3&kind=sleep", false),
    page("jobs search", "/jobs?q=user4711%40", false),
    page("jobs running", "/jobs?state=running", false),
    page("healthz again", "/healthz", false),
];

/// Milliseconds, from the sorted samples.
struct Figures {
    p50: f64,
    p95: f64,
    max: f64,
    bytes: usize,
    /// `GET /healthz` interleaved with this page's requests.
    healthz_p50: f64,
}

fn figures(mut samples: Vec<f64>, bytes: usize) -> Figures {
    samples.sort_by(f64::total_cmp);
    // Nearest rank: the smallest sample with at least q of them at or below.
    let rank = |q: f64| {
        let i = (q * samples.len() as f64).ceil() as usize;
        samples[i.clamp(1, samples.len()) - 1]
    };
    Figures {
        p50: rank(0.50),
        p95: rank(0.95),
        max: samples[samples.len() - 1],
        bytes,
        healthz_p50: f64::NAN,
    }
}

struct Http {
    agent: ureq::Agent,
    base: String,
}

impl Http {
    fn new(base: &str) -> Http {
        let agent: ureq::Agent = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .timeout_global(Some(Duration::from_secs(120)))
            .build()
            .into();
        Http {
            agent,
            base: base.to_string(),
        }
    }

    /// One request, read whole: (elapsed ms, body length).
    fn get(&self, page: &Page) -> Result<(f64, usize), BoxError> {
        let mut request = self.agent.get(format!("{}{}", self.base, page.path));
        if page.htmx {
            request = request.header("HX-Request", "true");
        }
        let started = Instant::now();
        let mut response = request.call()?;
        let status = response.status().as_u16();
        let body = response
            .body_mut()
            .with_config()
            .limit(64 * 1024 * 1024)
            .read_to_string()?;
        let elapsed = started.elapsed().as_secs_f64() * 1000.0;
        if status != 200 {
            return Err(format!(
                "{} answered {status}: {}",
                page.label(),
                body.chars().take(500).collect::<String>()
            )
            .into());
        }
        Ok((elapsed, body.len()))
    }

    /// Warm-ups, then timed requests; before each timed request of a page
    /// other than `/healthz`, one timed `GET /healthz`: the baseline taken
    /// at the same moments, so that the ratio survives a noisy machine.
    fn measure(&self, page: &Page, warmups: usize, requests: usize) -> Result<Figures, BoxError> {
        let healthz = PAGES[0];
        for _ in 0..warmups {
            self.get(page)?;
        }
        let mut samples = Vec::with_capacity(requests);
        let mut baseline = Vec::with_capacity(requests);
        let mut bytes = 0;
        for _ in 0..requests {
            if page.path != healthz.path {
                baseline.push(self.get(&healthz)?.0);
            }
            let (ms, len) = self.get(page)?;
            samples.push(ms);
            bytes = len;
        }
        if baseline.is_empty() {
            baseline = samples.clone();
        }
        let mut f = figures(samples, bytes);
        f.healthz_p50 = figures(baseline, 0).p50;
        Ok(f)
    }
}

type StoreCall = (
    &'static str,
    Box<dyn Fn(&Store) -> errand::store::Result<()>>,
);

/// The store calls behind the pages, timed without HTTP or rendering.
fn measure_store(
    store: &Store,
    warmups: usize,
    requests: usize,
) -> Result<Vec<(&'static str, Figures)>, BoxError> {
    let list = |states: Vec<JobState>, queue: Option<&str>, kind: Option<&str>| JobFilter {
        states,
        queue: queue.map(str::to_string),
        kind: kind.map(str::to_string),
        limit: 50,
        ..JobFilter::default()
    };
    let dead_q3 = list(vec![JobState::Dead], Some("q3"), None);
    let q3_k2 = list(Vec::new(), Some("q3"), Some("k2"));
    let all = list(Vec::new(), None, None);
    let nothing = list(Vec::new(), Some("q3"), Some("sleep"));
    let calls: Vec<StoreCall> = vec![
        ("now_ms()", Box::new(|s: &Store| s.now_ms().map(drop))),
        ("dashboard()", Box::new(|s: &Store| s.dashboard().map(drop))),
        (
            "dashboard_queue_names()",
            Box::new(|s: &Store| s.dashboard_queue_names().map(drop)),
        ),
        (
            "jobs_list(state=dead, queue=q3)",
            Box::new(move |s: &Store| s.jobs_list(&dead_q3).map(drop)),
        ),
        (
            "jobs_list(queue=q3, kind=k2)",
            Box::new(move |s: &Store| s.jobs_list(&q3_k2).map(drop)),
        ),
        (
            "jobs_list()",
            Box::new(move |s: &Store| s.jobs_list(&all).map(drop)),
        ),
        (
            "jobs_list(queue=q3, kind=sleep) (no match)",
            Box::new(move |s: &Store| s.jobs_list(&nothing).map(drop)),
        ),
        (
            "dead_groups(None, None)",
            Box::new(|s: &Store| s.dead_groups(None, None).map(drop)),
        ),
        (
            "dead_groups(Some(q3), None)",
            Box::new(|s: &Store| s.dead_groups(Some("q3"), None).map(drop)),
        ),
    ];
    let mut out = Vec::new();
    for (name, call) in calls {
        for _ in 0..warmups {
            call(store)?;
        }
        let mut samples = Vec::with_capacity(requests);
        for _ in 0..requests {
            let started = Instant::now();
            call(store)?;
            samples.push(started.elapsed().as_secs_f64() * 1000.0);
        }
        let f = figures(samples, 0);
        progress(format_args!("  {name:<44} p50 {:>8.2} ms", f.p50));
        out.push((name, f));
    }
    Ok(out)
}

/// The dashboard on a loopback port, in this process (as the tests run it).
struct Server {
    base: String,
    shutdown: errand::shutdown::Shutdown,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Server {
    fn start(store: Store) -> Result<Server, BoxError> {
        let mut registry = errand::Registry::new();
        errand::demo::register(&mut registry);
        let state = errand::web::AppState::new(
            store,
            Arc::new(registry),
            errand::metrics::Metrics::new(),
            errand::web::WebConfig::default(),
        );
        let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
        let base = format!("http://{}", listener.local_addr()?);
        let shutdown = errand::shutdown::Shutdown::new();
        let stop = shutdown.clone();
        let thread = std::thread::spawn(move || {
            if let Err(e) =
                actix_web::rt::System::new().block_on(errand::web::serve(state, listener, stop))
            {
                eprintln!("the server failed: {e}");
            }
        });
        Ok(Server {
            base,
            shutdown,
            thread: Some(thread),
        })
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.shutdown.request();
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

// ---------------------------------------------------------------------------
// Small things
// ---------------------------------------------------------------------------

fn epoch_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or_default()
}

/// The 1, 5 and 15 minute load averages (Linux), or "unknown".
fn load_average() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .ok()
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_else(|| "unknown".into())
}

fn progress(message: std::fmt::Arguments<'_>) {
    eprintln!("[dashboard_bench] {message}");
}

fn thousands(n: i64) -> String {
    let digits = n.unsigned_abs().to_string();
    let mut out = String::new();
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    if n < 0 { format!("-{out}") } else { out }
}

fn round3(x: f64) -> f64 {
    (x * 1000.0).round() / 1000.0
}
