//! The store owns every SQL statement errand runs, on both backends.
//!
//! Everything above this module (workers, maintenance, the web server) talks to
//! the database through [`Store`] methods named noun-first with their guard in
//! the name (`jobs_claim`, `job_fail`, `jobs_rescue`). A state change after a
//! claim is one `UPDATE … WHERE id = ? AND lease_id = ? AND state = 'running'`;
//! zero rows is a normal answer ("the lease was lost") that callers handle.
//!
//! One pool per backend sits behind [`Store`]. Most statements are written once
//! with diesel's DSL and compiled for both connection types by [`with_conn!`];
//! the few that must differ (the claim, batched acknowledgements, the enqueue
//! statement and its `NOTIFY`) live together in the "backend differences"
//! section of `jobs.rs`, each with a comment saying why.
//!
//! Every instant is epoch milliseconds taken from the database clock
//! ([`Dialect::NOW`]), so hosts with skewed clocks cannot double-run a job.

/// The database clock as epoch milliseconds, as SQL text for each backend;
/// macros so that `concat!` can build whole statements at compile time.
macro_rules! pg_now {
    // clock_timestamp(), not now(): now() is frozen at the start of the
    // transaction, and a lease must be measured from when it was taken.
    () => {
        "(EXTRACT(EPOCH FROM clock_timestamp()) * 1000)::BIGINT"
    };
}
macro_rules! sqlite_now {
    () => {
        "CAST(unixepoch('subsec') * 1000 AS INTEGER)"
    };
}

/// Runs `$body` with `$c` bound to a pooled connection of the store's backend.
/// The body is compiled once per backend, so diesel DSL written once works on
/// both; pool errors return early through `?`.
macro_rules! with_conn {
    ($store:expr, $c:ident => $body:expr) => {
        match &$store.pool {
            $crate::store::Pool::Postgres(pool) => {
                let mut conn = pool.get()?;
                let $c: &mut ::diesel::PgConnection = &mut conn;
                $body
            }
            $crate::store::Pool::Sqlite(pool) => {
                let mut conn = pool.get()?;
                let $c: &mut ::diesel::SqliteConnection = &mut conn;
                $body
            }
        }
    };
}

/// [`with_conn!`] for statements that write on the hot path. On SQLite they
/// first take the store's writer gate: SQLite admits one writer at a time,
/// and its busy handler makes losers sleep (up to 100 ms a try), so under
/// load a write could wait a second behind luckier ones. The gate queues this
/// process's writers and hands over at once. (Rarer writes, and other
/// processes, still rely on `busy_timeout`.)
macro_rules! with_write_conn {
    ($store:expr, $c:ident => $body:expr) => {
        match &$store.pool {
            $crate::store::Pool::Postgres(pool) => {
                let mut conn = pool.get()?;
                let $c: &mut ::diesel::PgConnection = &mut conn;
                $body
            }
            $crate::store::Pool::Sqlite(pool) => {
                let _gate = $store.writer.lock().unwrap_or_else(|e| e.into_inner());
                let mut conn = pool.get()?;
                let $c: &mut ::diesel::SqliteConnection = &mut conn;
                $body
            }
        }
    };
}

/// [`with_write_conn!`] for the workers' own bookkeeping (claims,
/// heartbeats, completions): on PostgreSQL a connection that commits without
/// waiting for the WAL flush (see `Store::hot`).
macro_rules! with_hot_conn {
    ($store:expr, $c:ident => $body:expr) => {
        match &$store.pool {
            $crate::store::Pool::Postgres(_) => {
                let mut conn = $store.hot.as_ref().expect("a PostgreSQL store has a hot pool").get()?;
                let $c: &mut ::diesel::PgConnection = &mut conn;
                $body
            }
            $crate::store::Pool::Sqlite(_) => with_write_conn!($store, $c => $body),
        }
    };
}

mod admin;
mod alerts;
mod bench;
mod coord;
mod jobs;
mod prepared;
mod types;

use std::sync::Arc;
use std::time::Duration;

use diesel::connection::SimpleConnection;
use diesel::prelude::*;
use diesel::r2d2::{ConnectionManager, CustomizeConnection, Pool as R2d2Pool};
use diesel::sql_types::BigInt;
use diesel_migrations::{EmbeddedMigrations, MigrationHarness, embed_migrations};

use crate::wake::Wake;

pub use admin::{AuditEntry, Dashboard, DeadGroup, Minute, QueueOverview, QueueSummary};
pub use alerts::{AlertState, Email, FailureContext, Metric, OutboxRow, Scope};
pub use bench::{BASELINE_CLAIM, BASELINE_INSERT};
pub use coord::{LeaderTerm, Overdue, PruneReport, Retention, WorkerInfo};
pub(crate) use jobs::NOTIFY_CHANNEL;
pub use jobs::{
    BulkAction, BulkReport, CompletedDetail, DeadAction, DeadFilter, Enqueued, JobFilter, Once,
};
pub use types::{
    Attempt, AttemptOutcome, DEFAULT_MAX_ATTEMPTS, DEFAULT_QUEUE, DEFAULT_TIMEOUT, Failure, Job,
    JobState, Lease, NewJob, QueueCount, QueueInfo, Schedule, Transition, error_signature,
};

const PG_MIGRATIONS: EmbeddedMigrations = embed_migrations!("migrations/postgres");
const SQLITE_MIGRATIONS: EmbeddedMigrations = embed_migrations!("migrations/sqlite");
/// The advisory lock key held while migrating PostgreSQL ("errand" in ASCII).
const MIGRATION_LOCK: i64 = 0x6572_7261_6e64;

/// What can go wrong talking to the database.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// No connection could be taken from the pool (database down, wrong URL,
    /// pool exhausted for longer than the connection timeout).
    #[error("cannot reach the database: {0}")]
    Pool(#[from] r2d2::Error),
    /// A statement failed.
    #[error("database error: {0}")]
    Query(#[from] diesel::result::Error),
    /// Migrations could not be applied.
    #[error("migrating the database failed: {0}")]
    Migration(String),
    /// The database URL or options are unusable.
    #[error("{0}")]
    Config(String),
    /// Concurrent changes kept getting in the way; trying again may succeed.
    #[error("{0}")]
    Conflict(String),
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Which database a [`Store`] talks to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    Sqlite,
    Postgres,
}

impl Backend {
    pub fn as_str(self) -> &'static str {
        match self {
            Backend::Sqlite => "sqlite",
            Backend::Postgres => "postgres",
        }
    }
}

/// How durable a committed write is on SQLite.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum SqliteSync {
    /// `synchronous = FULL`: a job answered with 202 survives a power loss.
    #[default]
    Full,
    /// `synchronous = NORMAL`: survives a process crash, but the last
    /// transactions before a power loss or OS crash may be lost. Faster.
    Normal,
}

/// Connection options; every field has a default suited to `errand serve`.
#[derive(Debug, Clone)]
pub struct StoreOptions {
    /// Most connections the pool keeps open. Default 10.
    pub pool_size: u32,
    /// How long to wait for a connection before giving up. Default 10 s.
    pub connect_timeout: Duration,
    /// SQLite durability. Default [`SqliteSync::Full`].
    pub sqlite_sync: SqliteSync,
    /// How long a SQLite write waits for another writer before failing with
    /// "database is locked". Default 10 s.
    pub sqlite_busy_timeout: Duration,
}

impl Default for StoreOptions {
    fn default() -> Self {
        StoreOptions {
            pool_size: 10,
            connect_timeout: Duration::from_secs(10),
            sqlite_sync: SqliteSync::Full,
            sqlite_busy_timeout: Duration::from_secs(10),
        }
    }
}

#[derive(Clone)]
enum Pool {
    Postgres(R2d2Pool<ConnectionManager<PgConnection>>),
    Sqlite(R2d2Pool<ConnectionManager<SqliteConnection>>),
}

/// The handle to errand's database: cheap to clone, safe to share between
/// threads. All methods block; call them from plain threads or `web::block`.
#[derive(Clone)]
pub struct Store {
    pool: Pool,
    /// PostgreSQL: connections with `synchronous_commit = off`, for what the
    /// workers write about jobs they hold (claims, heartbeats, completions).
    /// A crash of the database may forget the last few of those, never an
    /// enqueue: a forgotten claim or completion leaves the job to run again
    /// (at least once, as after a worker crash). What is forgotten then is
    /// only what was not yet flushed; nothing is torn. Enqueues, failures and
    /// every operator action commit synchronously on `pool`.
    hot: Option<R2d2Pool<ConnectionManager<PgConnection>>>,
    url: String,
    wake: Arc<Wake>,
    /// SQLite: held while writing on the hot path (see [`with_write_conn!`]).
    writer: Arc<std::sync::Mutex<()>>,
    /// SQLite: concurrent small enqueues share one transaction.
    group: Arc<jobs::GroupCommit>,
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Store")
            .field("backend", &self.backend())
            .field("url", &redact(&self.url))
            .finish()
    }
}

/// What differs between the two connection types in statements otherwise
/// written once.
pub(crate) trait Dialect: Connection {
    /// The database clock as epoch milliseconds, as a SQL expression.
    const NOW: &'static str;

    /// Runs `f` in a write transaction.
    fn write_tx<T, F>(&mut self, f: F) -> Result<T>
    where
        F: FnOnce(&mut Self) -> Result<T>;
}

impl Dialect for PgConnection {
    const NOW: &'static str = pg_now!();

    fn write_tx<T, F>(&mut self, f: F) -> Result<T>
    where
        F: FnOnce(&mut Self) -> Result<T>,
    {
        self.transaction(f)
    }
}

impl Dialect for SqliteConnection {
    const NOW: &'static str = sqlite_now!();

    // SQLite: BEGIN IMMEDIATE takes the write lock up front. A deferred
    // transaction that reads first and then writes can fail with SQLITE_BUSY
    // without waiting when another writer got there in between.
    fn write_tx<T, F>(&mut self, f: F) -> Result<T>
    where
        F: FnOnce(&mut Self) -> Result<T>,
    {
        self.immediate_transaction(f)
    }
}

/// `jobs.state IN ('…', …)` with `states` spelled out: partial indexes on
/// `state` serve a query only when its predicate is a literal the planner
/// can compare (a bound parameter hides it from SQLite, and from PostgreSQL's
/// generic plans). The values are errand's own state names, never input.
pub(crate) fn state_in(
    states: &[JobState],
) -> diesel::expression::SqlLiteral<diesel::sql_types::Bool> {
    let names: Vec<String> = states.iter().map(|s| format!("'{}'", s.as_str())).collect();
    diesel::dsl::sql(&format!("jobs.state IN ({})", names.join(", ")))
}

/// The database clock, for use in DSL expressions.
pub(crate) fn now<C: Dialect>(_: &C) -> diesel::expression::SqlLiteral<BigInt> {
    diesel::dsl::sql::<BigInt>(C::NOW)
}

/// Sets the pragmas errand relies on, on every pooled SQLite connection.
#[derive(Debug)]
struct SqlitePragmas {
    sync: SqliteSync,
    busy_timeout: Duration,
}

impl CustomizeConnection<SqliteConnection, diesel::r2d2::Error> for SqlitePragmas {
    fn on_acquire(&self, conn: &mut SqliteConnection) -> Result<(), diesel::r2d2::Error> {
        // busy_timeout first: switching to WAL needs a lock, and without the
        // timeout a second connection starting at the same moment fails with
        // "database is locked" instead of waiting.
        let sync = match self.sync {
            SqliteSync::Full => "FULL",
            SqliteSync::Normal => "NORMAL",
        };
        conn.batch_execute(&format!(
            "PRAGMA busy_timeout = {}; PRAGMA journal_mode = WAL; \
             PRAGMA synchronous = {sync}; PRAGMA foreign_keys = ON;",
            self.busy_timeout.as_millis()
        ))
        .map_err(diesel::r2d2::Error::QueryError)
    }
}

/// `synchronous_commit = off` on every connection of [`Store::hot`].
#[derive(Debug)]
struct AsyncCommit;

impl CustomizeConnection<PgConnection, diesel::r2d2::Error> for AsyncCommit {
    fn on_acquire(&self, conn: &mut PgConnection) -> Result<(), diesel::r2d2::Error> {
        conn.batch_execute("SET synchronous_commit = off")
            .map_err(diesel::r2d2::Error::QueryError)
    }
}

fn pool_builder<M: diesel::r2d2::ManageConnection>(options: &StoreOptions) -> r2d2::Builder<M> {
    R2d2Pool::builder()
        .max_size(options.pool_size.max(1))
        .min_idle(Some(1))
        .connection_timeout(options.connect_timeout)
}

/// Where a database URL points.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Location {
    Postgres(String),
    SqliteFile(String),
}

/// Reads a database URL: `postgres://…` / `postgresql://…`, `sqlite://PATH`,
/// `sqlite:PATH`, or a bare file path.
pub fn parse_url(url: &str) -> Result<Location> {
    let url = url.trim();
    if url.starts_with("postgres://") || url.starts_with("postgresql://") {
        return Ok(Location::Postgres(url.to_string()));
    }
    let path = url
        .strip_prefix("sqlite://")
        .or_else(|| url.strip_prefix("sqlite:"))
        .unwrap_or(url);
    if path.is_empty() {
        return Err(Error::Config(
            "the database URL is empty: give a SQLite file path (e.g. errand.db) \
             or a postgres:// URL"
                .into(),
        ));
    }
    if path == ":memory:" || path.contains("mode=memory") {
        return Err(Error::Config(
            "an in-memory SQLite database cannot be shared by errand's connection pool: \
             give a file path instead (e.g. errand.db)"
                .into(),
        ));
    }
    if let Some((scheme, _)) = path.split_once("://") {
        return Err(Error::Config(format!(
            "unsupported database URL scheme '{scheme}://': use postgres://… or a SQLite file path"
        )));
    }
    Ok(Location::SqliteFile(path.to_string()))
}

/// The URL with any password replaced by `***`, for logs and messages.
pub fn redact(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.to_string();
    };
    let Some((userinfo, host)) = rest.split_once('@') else {
        return url.to_string();
    };
    match userinfo.split_once(':') {
        Some((user, _)) => format!("{scheme}://{user}:***@{host}"),
        None => url.to_string(),
    }
}

impl Store {
    /// Connects to the database named by `url` (see [`parse_url`]). A SQLite
    /// file is created if missing. Does not migrate: call [`Store::migrate`].
    pub fn open(url: &str, options: &StoreOptions) -> Result<Store> {
        let mut hot = None;
        let pool = match parse_url(url)? {
            Location::Postgres(url) => {
                let manager = ConnectionManager::<PgConnection>::new(url.clone());
                let pool = pool_builder(options).build(manager)?;
                // Opened when a worker first needs one.
                hot = Some(
                    pool_builder(options)
                        .min_idle(Some(0))
                        .connection_customizer(Box::new(AsyncCommit))
                        .build(ConnectionManager::<PgConnection>::new(url))?,
                );
                Pool::Postgres(pool)
            }
            Location::SqliteFile(path) => {
                let manager = ConnectionManager::<SqliteConnection>::new(path);
                Pool::Sqlite(
                    pool_builder(options)
                        .connection_customizer(Box::new(SqlitePragmas {
                            sync: options.sqlite_sync,
                            busy_timeout: options.sqlite_busy_timeout,
                        }))
                        .build(manager)?,
                )
            }
        };
        Ok(Store {
            pool,
            hot,
            url: url.to_string(),
            wake: Arc::new(Wake::new()),
            writer: Arc::default(),
            group: Arc::default(),
        })
    }

    /// Opens the database and applies pending migrations.
    pub fn open_and_migrate(url: &str, options: &StoreOptions) -> Result<Store> {
        let store = Store::open(url, options)?;
        store.migrate()?;
        Ok(store)
    }

    pub fn backend(&self) -> Backend {
        match self.pool {
            Pool::Postgres(_) => Backend::Postgres,
            Pool::Sqlite(_) => Backend::Sqlite,
        }
    }

    /// Wake-ups for this process's workers: the store notifies it after
    /// committing claimable jobs.
    pub fn wake(&self) -> &Arc<Wake> {
        &self.wake
    }

    /// The URL this store was opened with (it may hold a password: use
    /// [`redact`] before showing it).
    pub fn url(&self) -> &str {
        &self.url
    }

    /// Applies every pending migration; returns the names of those applied.
    pub fn migrate(&self) -> Result<Vec<String>> {
        let to_names = |versions: Vec<diesel::migration::MigrationVersion<'_>>| {
            versions.iter().map(|v| v.to_string()).collect()
        };
        match &self.pool {
            Pool::Postgres(pool) => {
                let mut conn = pool.get()?;
                // Processes starting together on a fresh database would race
                // to create the same tables: one migrates, the others wait.
                conn.transaction(|c| {
                    diesel::sql_query("SELECT pg_advisory_xact_lock($1)")
                        .bind::<BigInt, _>(MIGRATION_LOCK)
                        .execute(c)?;
                    c.run_pending_migrations(PG_MIGRATIONS)
                        .map(to_names)
                        .map_err(|e| Error::Migration(e.to_string()))
                })
            }
            Pool::Sqlite(pool) => {
                let mut conn = pool.get()?;
                // Two processes starting together on one SQLite file would
                // otherwise race to create the same tables.
                conn.immediate_transaction(|c| {
                    c.run_pending_migrations(SQLITE_MIGRATIONS)
                        .map(to_names)
                        .map_err(|e| Error::Migration(e.to_string()))
                })
            }
        }
    }

    /// The database clock, epoch milliseconds.
    pub fn now_ms(&self) -> Result<i64> {
        with_conn!(self, c => {
            let now = now(c);
            Ok(diesel::select(now).get_result::<i64>(c)?)
        })
    }

    /// Whether the database answers a trivial query.
    pub fn ping(&self) -> Result<()> {
        with_conn!(self, c => {
            c.batch_execute("SELECT 1")?;
            Ok(())
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_pick_the_backend() {
        assert_eq!(
            parse_url("postgres://u@h/db").unwrap(),
            Location::Postgres("postgres://u@h/db".into())
        );
        assert_eq!(
            parse_url("sqlite://data/e.db").unwrap(),
            Location::SqliteFile("data/e.db".into())
        );
        assert_eq!(
            parse_url("sqlite:e.db").unwrap(),
            Location::SqliteFile("e.db".into())
        );
        assert_eq!(
            parse_url("errand.db").unwrap(),
            Location::SqliteFile("errand.db".into())
        );
        assert!(parse_url(":memory:").is_err());
        assert!(parse_url("mysql://x").is_err());
        assert!(parse_url("").is_err());
    }

    #[test]
    fn passwords_are_redacted() {
        assert_eq!(redact("postgres://u:secret@h/db"), "postgres://u:***@h/db");
        assert_eq!(redact("postgres://u@h/db"), "postgres://u@h/db");
        assert_eq!(redact("errand.db"), "errand.db");
    }
}
