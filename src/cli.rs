//! The `errand` command line: `serve`, `work`, `migrate`, `enqueue`.
//!
//! Every option has a flag and an environment variable, and its `--help` line
//! gives the default. [`run`] is public so that an application can build its
//! own `errand` binary with its own job kinds registered.

use std::net::TcpListener;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use clap::{Args, Parser, Subcommand, ValueEnum};
use tracing::info;

use crate::alerts::AlertConfig;
use crate::job::{Backoff, Registry};
use crate::maintenance::{Maintenance, MaintenanceConfig};
use crate::metrics::Metrics;
use crate::shutdown::{Shutdown, Stage};
use crate::store::{self, NewJob, Retention, SqliteSync, Store, StoreOptions};
use crate::web::{AppState, WebConfig};
use crate::worker::{QueueSpec, Worker, WorkerConfig, parse_queues};

/// errand: background jobs you can see into.
///
/// Hands slow work to worker threads through a durable queue in SQLite (the
/// default: a file, nothing to install) or PostgreSQL (when several machines
/// share the work), retries failures with backoff, keeps every attempt's error,
/// and moves jobs that run out of attempts to the dead-letter queue.
#[derive(Debug, Parser)]
#[command(name = "errand", version, max_term_width = 100)]
struct Cli {
    /// Database: a SQLite file path (or sqlite://PATH), or a postgres:// URL.
    /// Created if missing and migrated on start.
    #[arg(
        long,
        env = "ERRAND_DATABASE_URL",
        default_value = "errand.db",
        global = true
    )]
    database_url: String,

    /// How long to keep trying to reach the database before giving up.
    #[arg(long, env = "ERRAND_CONNECT_TIMEOUT", default_value = "10s", value_parser = humantime::parse_duration, global = true)]
    connect_timeout: Duration,

    /// Most database connections this process opens.
    #[arg(long, env = "ERRAND_POOL_SIZE", default_value_t = 10, global = true)]
    pool_size: u32,

    /// SQLite durability: `full` keeps every accepted job through a power
    /// loss; `normal` is faster but may lose the last moments of writes on a
    /// power loss or OS crash (never on a process crash).
    #[arg(long, env = "ERRAND_SQLITE_SYNCHRONOUS", value_enum, default_value_t = Synchronous::Full, global = true)]
    sqlite_synchronous: Synchronous,

    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum Synchronous {
    Full,
    Normal,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the web server, the workers and maintenance in one process.
    Serve(ServeArgs),
    /// Run workers and maintenance without the web server (add these on more
    /// machines, all pointing at one PostgreSQL).
    Work(RunArgs),
    /// Create or update errand's tables, then exit.
    Migrate,
    /// Add a job, e.g. `errand enqueue default sleep '{"ms": 500}'`.
    Enqueue(EnqueueArgs),
    /// Measure enqueue and drain rates and pickup latency on this database,
    /// with no-op jobs on the queue `errand-bench` (emptied before and after).
    Bench(BenchArgs),
}

#[derive(Debug, Args)]
struct BenchArgs {
    /// No-op jobs to enqueue, then drain.
    #[arg(long, default_value_t = 20_000)]
    jobs: usize,

    /// Worker threads draining them.
    #[arg(long, default_value_t = 8)]
    concurrency: usize,

    /// Most claimed jobs waiting for a thread (as `serve --max-buffer`).
    #[arg(long, default_value_t = 1000)]
    max_buffer: usize,

    /// Jobs enqueued one at a time on the idle queue to measure pickup
    /// latency (enqueue to handler start).
    #[arg(long, default_value_t = 200)]
    pickup_samples: usize,

    /// Also run plain SQL on the same database in the same run (multi-row
    /// INSERTs; a loop claiming 100 jobs per statement and deleting them) and
    /// print errand's ratio to it.
    #[arg(long)]
    baseline: bool,

    /// Print one JSON object (rates in jobs/s, latencies in ms) instead of
    /// text.
    #[arg(long)]
    json: bool,
}

#[derive(Debug, Args)]
struct ServeArgs {
    /// Address to listen on. Anything but loopback needs --api-token.
    #[arg(long, env = "ERRAND_BIND", default_value = "127.0.0.1:8080")]
    bind: String,

    /// Bearer token for the API and /metrics; repeat the flag (or separate
    /// with commas in the variable) to accept several, e.g. while rotating.
    /// Without one the API answers on a loopback address only.
    #[arg(
        long = "api-token",
        env = "ERRAND_API_TOKENS",
        value_delimiter = ',',
        hide_env_values = true
    )]
    api_tokens: Vec<String>,

    /// A dashboard user, as name:password:role (role admin or viewer);
    /// repeat the flag (or separate with commas in the variable) for more.
    /// Without one the dashboard answers on a loopback address only.
    #[arg(
        long = "dashboard-user",
        env = "ERRAND_DASHBOARD_USERS",
        value_delimiter = ',',
        hide_env_values = true
    )]
    dashboard_users: Vec<crate::web::access::DashboardUser>,

    /// Largest request body accepted by the API, in bytes.
    #[arg(long, env = "ERRAND_BODY_LIMIT", default_value_t = 4 * 1024 * 1024)]
    body_limit: usize,

    /// Most jobs in one POST /api/jobs/batch.
    #[arg(long, env = "ERRAND_BATCH_MAX", default_value_t = 1000)]
    batch_max: usize,

    /// How long an Idempotency-Key is remembered.
    #[arg(long, env = "ERRAND_IDEMPOTENCY_TTL", default_value = "24h", value_parser = humantime::parse_duration)]
    idempotency_ttl: Duration,

    /// Enqueue a mix of demo jobs every 2 s (successes, slow jobs, transient
    /// and permanent failures), to see every state within a minute.
    #[arg(long, env = "ERRAND_DEMO")]
    demo: bool,

    #[command(flatten)]
    run: RunArgs,
}

#[derive(Debug, Args)]
struct RunArgs {
    /// Queues to work, each with its number of worker threads.
    #[arg(long, env = "ERRAND_QUEUES", default_value = "default=8", value_parser = |s: &str| parse_queues(s).map(Queues))]
    queues: Queues,

    /// How often an idle queue looks for jobs no wake-up announced (scheduled
    /// jobs coming due, retries).
    #[arg(long, env = "ERRAND_POLL_INTERVAL", default_value = "1s", value_parser = humantime::parse_duration)]
    poll_interval: Duration,

    /// Most claimed jobs a queue keeps ready beyond one per thread. The
    /// buffer holds what the threads finish in 50 ms at the recent pace, so
    /// only fast jobs fill it; 0 claims only for idle threads.
    #[arg(long, env = "ERRAND_MAX_BUFFER", default_value_t = 1000)]
    max_buffer: usize,

    /// How often running jobs' heartbeats are refreshed.
    #[arg(long, env = "ERRAND_HEARTBEAT_INTERVAL", default_value = "15s", value_parser = humantime::parse_duration)]
    heartbeat_interval: Duration,

    /// A running job whose worker has not heartbeated for this long is
    /// presumed lost and rescued.
    #[arg(long, env = "ERRAND_STALE_AFTER", default_value = "60s", value_parser = humantime::parse_duration)]
    stale_after: Duration,

    /// How often the leader looks for jobs to rescue.
    #[arg(long, env = "ERRAND_RESCUE_INTERVAL", default_value = "15s", value_parser = humantime::parse_duration)]
    rescue_interval: Duration,

    /// Rescues after which a job goes to dead instead of being retried.
    #[arg(long, env = "ERRAND_MAX_RESCUES", default_value_t = 3)]
    max_rescues: i32,

    /// How often the leader deletes finished jobs past their retention.
    #[arg(long, env = "ERRAND_PRUNE_INTERVAL", default_value = "1m", value_parser = humantime::parse_duration)]
    prune_interval: Duration,

    /// How long completed jobs are kept.
    #[arg(long, env = "ERRAND_KEEP_COMPLETED", default_value = "24h", value_parser = humantime::parse_duration)]
    keep_completed: Duration,

    /// How long cancelled jobs are kept.
    #[arg(long, env = "ERRAND_KEEP_CANCELLED", default_value = "24h", value_parser = humantime::parse_duration)]
    keep_cancelled: Duration,

    /// How long dead jobs (the dead-letter queue) are kept.
    #[arg(long, env = "ERRAND_KEEP_DEAD", default_value = "30days", value_parser = humantime::parse_duration)]
    keep_dead: Duration,

    /// How long the maintenance leader's lease lasts (renewed every third).
    #[arg(long, env = "ERRAND_LEADER_TTL", default_value = "30s", value_parser = humantime::parse_duration)]
    leader_ttl: Duration,

    /// On SIGTERM/SIGINT, how long running jobs may take to finish before
    /// they are released back to their queue (a second signal skips the wait).
    #[arg(long, env = "ERRAND_SHUTDOWN_GRACE", default_value = "25s", value_parser = humantime::parse_duration)]
    shutdown_grace: Duration,

    /// Configuration file (TOML): alert rules, SMTP server, recipients. See
    /// the README's "Alerts" section.
    #[arg(long, env = "ERRAND_CONFIG")]
    config: Option<std::path::PathBuf>,

    /// SMTP server for alert emails, e.g. smtp://127.0.0.1:25,
    /// smtps://user:pass@smtp.example.com:465, smtp://host:587?tls=required.
    #[arg(long, env = "ERRAND_SMTP_URL", hide_env_values = true)]
    smtp_url: Option<String>,

    /// Who gets alert emails; repeat the flag or separate with commas. With a
    /// recipient and no rules configured, the default rules apply (new dead
    /// letters, failure rate, backlog age, no live workers).
    #[arg(long = "alert-to", env = "ERRAND_ALERT_TO", value_delimiter = ',')]
    alert_to: Vec<String>,

    /// Sender of alert emails [default: errand <errand@HOSTNAME>].
    #[arg(long, env = "ERRAND_ALERT_FROM")]
    alert_from: Option<String>,

    /// errand's address as readers of the emails reach it (for links), e.g.
    /// https://errand.example.com.
    #[arg(long, env = "ERRAND_PUBLIC_URL")]
    public_url: Option<String>,

    /// A fixed delay between attempts instead of the default backoff
    /// (attempt^4 + 15 s, with jitter), for kinds that set none.
    #[arg(long, env = "ERRAND_RETRY_DELAY", value_parser = humantime::parse_duration)]
    retry_delay: Option<Duration>,

    /// Queues worked by external workers over HTTP (POST
    /// /api/workers/fetch), comma-separated: this process's threads never
    /// claim from them, and jobs of any kind may be enqueued there.
    #[arg(long, env = "ERRAND_EXTERNAL_QUEUES", value_delimiter = ',')]
    external_queues: Vec<String>,

    /// Where `http` jobs may send requests; repeat the flag or separate with
    /// commas. Each is a host (any port), host:port, *.domain, or a URL
    /// prefix (https://api.example.com/hooks/). Without one, any target.
    #[arg(long = "http-allow", env = "ERRAND_HTTP_ALLOW", value_delimiter = ',')]
    http_allow: Vec<String>,

    /// Secret that signs every `http` job's request: an Errand-Signature
    /// header, t=<unix seconds>,v1=<hex HMAC-SHA256 of "<t>.<body>">.
    #[arg(long, env = "ERRAND_HTTP_SIGNING_SECRET", hide_env_values = true)]
    http_signing_secret: Option<String>,

    /// Sender of `email` jobs that name none [default: the alert sender].
    #[arg(long, env = "ERRAND_EMAIL_FROM")]
    email_from: Option<String>,
}

impl RunArgs {
    /// The external queues, trimmed, without empties.
    fn external_queues(&self) -> Vec<String> {
        self.external_queues
            .iter()
            .map(|q| q.trim().to_string())
            .filter(|q| !q.is_empty())
            .collect()
    }

    /// The built-in kinds' settings; SMTP as for alerts.
    fn kinds(&self, alerts: &AlertConfig) -> crate::kinds::KindsConfig {
        let mut config = crate::kinds::KindsConfig::default();
        config.http.allow = self
            .http_allow
            .iter()
            .map(|a| a.trim().to_string())
            .filter(|a| !a.is_empty())
            .collect();
        config.http.signing_secret = self.http_signing_secret.clone().filter(|s| !s.is_empty());
        config.email.smtp_url = alerts.smtp_url.clone();
        config.email.from = self
            .email_from
            .clone()
            .unwrap_or_else(|| alerts.from.clone());
        config
    }
}

/// `--queues`, parsed (one value holding every queue).
#[derive(Debug, Clone)]
struct Queues(Vec<QueueSpec>);

#[derive(Debug, Args)]
struct EnqueueArgs {
    /// The queue, e.g. `default`.
    queue: String,
    /// The job kind, e.g. `noop`, `sleep`, `fail`.
    kind: String,
    /// The arguments, as JSON, e.g. '{"ms": 500}'.
    #[arg(default_value = "{}")]
    args: String,

    /// Run no earlier than this instant (RFC 3339, e.g. 2026-12-01T09:00:00Z).
    #[arg(long, conflicts_with = "delay")]
    run_at: Option<String>,

    /// Run no earlier than this long from now, e.g. 90s, 5m.
    #[arg(long, value_parser = humantime::parse_duration)]
    delay: Option<Duration>,

    /// Lower runs first.
    #[arg(long, default_value_t = 0, allow_negative_numbers = true)]
    priority: i32,

    /// Attempts before the job goes to dead [default: the kind's, else 25].
    #[arg(long)]
    max_attempts: Option<i32>,

    /// How long one attempt may run [default: the kind's, else 5m].
    #[arg(long, value_parser = humantime::parse_duration)]
    timeout: Option<Duration>,

    /// While an unfinished job has this key, return it instead of adding one.
    #[arg(long)]
    unique_key: Option<String>,

    /// Print the result as JSON.
    #[arg(long)]
    json: bool,
}

/// An error for the person at the terminal: what went wrong and what to do.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
struct CliError(String);

impl From<store::Error> for CliError {
    fn from(e: store::Error) -> Self {
        CliError(e.to_string())
    }
}

/// Parses the command line and runs it with the demo kinds and `registry`'s
/// kinds registered. Returns the process's exit code.
pub fn run(mut registry: Registry) -> ExitCode {
    crate::demo::register(&mut registry);
    let cli = Cli::parse();
    // Long-running commands report what they do; one-shot ones stay quiet.
    let long_running = matches!(cli.command, Command::Serve(_) | Command::Work(_));
    init_logging(if long_running { "info" } else { "warn" });
    match dispatch(cli, registry) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}

/// Logs to stderr; `RUST_LOG` overrides the default level.
fn init_logging(default: &str) {
    use tracing_subscriber::EnvFilter;
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(default));
    use std::io::IsTerminal;
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(std::io::stderr)
        .try_init();
}

fn dispatch(cli: Cli, registry: Registry) -> Result<(), CliError> {
    let (store, applied) = open_store(&cli)?;
    match cli.command {
        Command::Migrate => {
            let shown = store::redact(store.url());
            if applied.is_empty() {
                println!("database {shown} is up to date");
            }
            for name in applied {
                println!("applied migration {name} to {shown}");
            }
            Ok(())
        }
        Command::Enqueue(args) => {
            let mut registry = registry;
            // Known here so that they can be enqueued; they run elsewhere.
            crate::kinds::register(&mut registry, &Default::default());
            enqueue(&store, &registry, args)
        }
        Command::Work(run) => {
            let shutdown = Shutdown::new();
            shutdown
                .on_signals()
                .map_err(|e| CliError(format!("cannot handle signals: {e}")))?;
            let alerts = alert_config(&run)?;
            let running = Running::start(&store, registry, &run, Metrics::new(), alerts)?;
            shutdown.wait_for(Stage::Draining, None);
            running.stop(&run, &shutdown);
            Ok(())
        }
        Command::Serve(args) => serve(store, registry, args),
        Command::Bench(args) => bench(&store, args),
    }
}

fn bench(store: &Store, args: BenchArgs) -> Result<(), CliError> {
    if args.jobs == 0 || args.concurrency == 0 {
        return Err(CliError(
            "--jobs and --concurrency must be at least 1".into(),
        ));
    }
    use std::io::IsTerminal;
    let config = crate::bench::BenchConfig {
        jobs: args.jobs,
        concurrency: args.concurrency,
        max_buffer: args.max_buffer,
        pickup_samples: args.pickup_samples,
        baseline: args.baseline,
        progress: std::io::stderr().is_terminal(),
    };
    let report = crate::bench::run(store, &config).map_err(|e| CliError(e.to_string()))?;
    if args.json {
        println!(
            "{}",
            serde_json::to_string(&report).expect("a report serializes")
        );
    } else {
        println!("{report}");
    }
    Ok(())
}

/// Opens and migrates the database; returns the migrations applied.
fn open_store(cli: &Cli) -> Result<(Store, Vec<String>), CliError> {
    let options = StoreOptions {
        pool_size: cli.pool_size,
        connect_timeout: cli.connect_timeout,
        sqlite_sync: match cli.sqlite_synchronous {
            Synchronous::Full => SqliteSync::Full,
            Synchronous::Normal => SqliteSync::Normal,
        },
        ..StoreOptions::default()
    };
    let shown = store::redact(&cli.database_url);
    let store = Store::open(&cli.database_url, &options).map_err(|e| match e {
        store::Error::Config(message) => CliError(message),
        e => CliError(format!(
            "{e}\n  database: {shown}\n  check --database-url (or ERRAND_DATABASE_URL), and that the \
             server is running and accepts this user"
        )),
    })?;
    let applied = store
        .migrate()
        .map_err(|e| CliError(format!("{e} (database: {shown})")))?;
    for name in &applied {
        info!(migration = %name, "applied migration");
    }
    info!(database = %shown, backend = store.backend().as_str(), "database ready");
    Ok((store, applied))
}

fn enqueue(store: &Store, registry: &Registry, args: EnqueueArgs) -> Result<(), CliError> {
    let value: serde_json::Value = serde_json::from_str(&args.args).map_err(|e| {
        CliError(format!(
            "ARGS is not valid JSON ({e}); quote it for the shell, e.g. '{{\"ms\": 500}}'"
        ))
    })?;
    let mut job = NewJob::new(&args.kind, value)
        .queue(&args.queue)
        .priority(args.priority);
    if let Some(at) = &args.run_at {
        let at = chrono::DateTime::parse_from_rfc3339(at).map_err(|e| {
            CliError(format!(
                "--run-at '{at}' is not an RFC 3339 instant ({e}); e.g. 2026-12-01T09:00:00Z"
            ))
        })?;
        job = job.run_at(at.timestamp_millis());
    }
    if let Some(delay) = args.delay {
        job = job.delay(delay);
    }
    if let Some(n) = args.max_attempts {
        if !(1..=1000).contains(&n) {
            return Err(CliError(format!("--max-attempts {n}: give 1 to 1000")));
        }
        job = job.max_attempts(n);
    }
    if let Some(timeout) = args.timeout {
        job = job.timeout(timeout);
    }
    if let Some(key) = args.unique_key {
        job = job.unique_key(key);
    }
    let job = registry.prepare(job).map_err(|e| CliError(e.to_string()))?;
    let enqueued = store.job_enqueue(&job)?;
    if args.json {
        println!(
            "{}",
            serde_json::json!({"id": enqueued.id, "state": enqueued.state, "created": enqueued.created})
        );
    } else if enqueued.created {
        println!(
            "job {} enqueued on queue '{}' ({})",
            enqueued.id, args.queue, enqueued.state
        );
    } else {
        println!(
            "job {} already holds unique key: not enqueued again ({})",
            enqueued.id, enqueued.state
        );
    }
    Ok(())
}

fn serve(store: Store, registry: Registry, args: ServeArgs) -> Result<(), CliError> {
    let web_config = WebConfig {
        api_tokens: args
            .api_tokens
            .iter()
            .map(|t| t.trim().to_string())
            .filter(|t| !t.is_empty())
            .collect(),
        body_limit: args.body_limit,
        batch_max: args.batch_max,
        idempotency_ttl: args.idempotency_ttl,
        dashboard_users: args.dashboard_users.clone(),
        alerts: Arc::default(),
        external_queues: args.run.external_queues(),
        heartbeat_interval: args.run.heartbeat_interval,
        retry_backoff: args
            .run
            .retry_delay
            .map_or(Backoff::Exponential, Backoff::Fixed),
    };
    // Bind before starting workers, so that a taken port fails fast.
    let listener = TcpListener::bind(&args.bind).map_err(|e| {
        CliError(format!(
            "cannot listen on {}: {e}; choose another address with --bind (or ERRAND_BIND)",
            args.bind
        ))
    })?;
    let address = listener
        .local_addr()
        .map_err(|e| CliError(format!("cannot read the bound address: {e}")))?;
    crate::web::check_exposure(address, &web_config).map_err(CliError)?;
    let shutdown = Shutdown::new();
    shutdown
        .on_signals()
        .map_err(|e| CliError(format!("cannot handle signals: {e}")))?;
    let metrics = Metrics::new();
    let alerts = alert_config(&args.run)?;
    let running = Running::start(&store, registry, &args.run, metrics.clone(), alerts.clone())?;
    let demo = if args.demo {
        let queue = args.run.queues.0[0].name.clone();
        info!(queue = %queue, "demo: enqueueing a mix of jobs every 2 s");
        Some(
            crate::demo::start_feeder(
                store.clone(),
                running.registry.clone(),
                queue,
                shutdown.clone(),
            )
            .map_err(|e| CliError(format!("cannot start the demo: {e}")))?,
        )
    } else {
        None
    };
    info!("listening on http://{address}");
    let state = AppState::new(
        store.clone(),
        running.registry.clone(),
        metrics,
        WebConfig {
            alerts,
            ..web_config
        },
    );
    let served =
        actix_web::rt::System::new().block_on(crate::web::serve(state, listener, shutdown.clone()));
    // The server stops on the first signal (or fails); either way, drain.
    if shutdown.stage() == Stage::Running {
        shutdown.request();
    }
    if let Some(demo) = demo {
        let _ = demo.join();
    }
    running.stop(&args.run, &shutdown);
    served.map_err(|e| CliError(format!("the web server failed: {e}")))
}

/// Alert settings: the configuration file, then flags and the environment.
fn alert_config(run: &RunArgs) -> Result<Arc<AlertConfig>, CliError> {
    let file = match &run.config {
        Some(path) => AlertConfig::from_file(path).map_err(CliError)?,
        None => AlertConfig::default(),
    };
    let config = file
        .with_overrides(
            run.smtp_url.clone(),
            run.alert_to.clone(),
            run.alert_from.clone(),
            run.public_url.clone(),
        )
        .map_err(CliError)?;
    if config.can_send() {
        info!(
            rules = config.rules.len(),
            to = %config.to.join(","),
            "alert emails on"
        );
    }
    Ok(Arc::new(config))
}

/// Workers plus maintenance, started together and stopped together.
struct Running {
    registry: Arc<Registry>,
    worker: Worker,
    maintenance: Maintenance,
}

impl Running {
    fn start(
        store: &Store,
        registry: Registry,
        run: &RunArgs,
        metrics: Metrics,
        alerts: Arc<AlertConfig>,
    ) -> Result<Running, CliError> {
        if run.heartbeat_interval >= run.stale_after {
            return Err(CliError(format!(
                "--heartbeat-interval ({}) must be shorter than --stale-after ({}), or live jobs \
                 would be rescued from their workers",
                humantime::format_duration(run.heartbeat_interval),
                humantime::format_duration(run.stale_after)
            )));
        }
        if run.max_rescues < 1 {
            return Err(CliError("--max-rescues must be at least 1".into()));
        }
        let external = run.external_queues();
        if let Some(q) = run.queues.0.iter().find(|q| external.contains(&q.name)) {
            return Err(CliError(format!(
                "queue '{}' is in both --queues and --external-queues: external queues belong to \
                 workers that fetch over HTTP; remove it from one of them",
                q.name
            )));
        }
        let backoff = run.retry_delay.map_or(Backoff::Exponential, Backoff::Fixed);
        let mut registry = registry;
        crate::kinds::register(&mut registry, &run.kinds(&alerts));
        let registry = Arc::new(registry);
        let worker = Worker::start(
            store.clone(),
            registry.clone(),
            WorkerConfig {
                queues: run.queues.0.clone(),
                poll_interval: run.poll_interval,
                heartbeat_interval: run.heartbeat_interval,
                backoff,
                id: None,
                max_buffer: run.max_buffer,
                metrics,
            },
        )?;
        let maintenance = Maintenance::start(
            store.clone(),
            registry.clone(),
            MaintenanceConfig {
                rescue_interval: run.rescue_interval,
                stale_after: run.stale_after,
                max_rescues: run.max_rescues,
                prune_interval: run.prune_interval,
                retention: Retention {
                    completed: run.keep_completed,
                    cancelled: run.keep_cancelled,
                    dead: run.keep_dead,
                },
                leader_ttl: run.leader_ttl,
                backoff,
                alerts,
            },
            worker.id().to_string(),
        )
        .map_err(|e| CliError(format!("cannot start maintenance: {e}")))?;
        Ok(Running {
            registry,
            worker,
            maintenance,
        })
    }

    fn stop(self, run: &RunArgs, shutdown: &Shutdown) {
        self.worker.shutdown(run.shutdown_grace, shutdown);
        self.maintenance.stop();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn the_command_line_is_well_formed() {
        Cli::command().debug_assert();
    }
}
