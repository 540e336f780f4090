//! Metrics in the Prometheus text format (OpenMetrics): what this process did
//! — jobs enqueued through it, attempts its workers recorded, how long jobs
//! waited and ran, how many worker threads are busy — and, read from the
//! database at scrape time, what every process shares: jobs by queue and
//! state, backlog age, live workers.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::{Registry, Unit};

use crate::store::{JobState, QueueOverview};

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct QueueLabels {
    queue: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct KindLabels {
    queue: String,
    kind: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct StateLabels {
    queue: String,
    state: String,
}

type Histograms<L> = Family<L, Histogram, fn() -> Histogram>;

/// From 1 ms to about 9 minutes, doubling.
fn seconds_histogram() -> Histogram {
    Histogram::new(exponential_buckets(0.001, 2.0, 20))
}

/// This process's metrics. Cheap to clone; clones share their values.
#[derive(Debug, Clone)]
pub struct Metrics {
    enqueued: Family<QueueLabels, Counter>,
    completed: Family<QueueLabels, Counter>,
    failed: Family<QueueLabels, Counter>,
    dead: Family<QueueLabels, Counter>,
    start_delay: Histograms<QueueLabels>,
    run_time: Histograms<KindLabels>,
    busy: Family<QueueLabels, Gauge>,
    threads: Family<QueueLabels, Gauge>,
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics {
            enqueued: Family::default(),
            completed: Family::default(),
            failed: Family::default(),
            dead: Family::default(),
            start_delay: Family::new_with_constructor(seconds_histogram),
            run_time: Family::new_with_constructor(seconds_histogram),
            busy: Family::default(),
            threads: Family::default(),
        }
    }
}

/// What the database held at scrape time.
#[derive(Debug, Clone, Default)]
pub struct DatabaseState {
    pub queues: Vec<QueueOverview>,
    /// The database clock, to turn `oldest_claimable_at` into an age.
    pub now_ms: i64,
    pub workers: usize,
}

fn queue(queue: &str) -> QueueLabels {
    QueueLabels {
        queue: queue.to_string(),
    }
}

impl Metrics {
    pub fn new() -> Metrics {
        Metrics::default()
    }

    pub fn enqueued(&self, queue_name: &str, n: u64) {
        self.enqueued.get_or_create(&queue(queue_name)).inc_by(n);
    }

    pub(crate) fn completed(&self, queue_name: &str) {
        self.completed.get_or_create(&queue(queue_name)).inc();
    }

    /// A failed attempt; `dead` when it was the job's last.
    pub(crate) fn failed(&self, queue_name: &str, dead: bool) {
        self.failed.get_or_create(&queue(queue_name)).inc();
        if dead {
            self.dead.get_or_create(&queue(queue_name)).inc();
        }
    }

    /// An attempt starts `delay_s` after its job became claimable.
    pub(crate) fn started(&self, queue_name: &str, delay_s: f64) {
        self.start_delay
            .get_or_create(&queue(queue_name))
            .observe(delay_s.max(0.0));
        self.busy.get_or_create(&queue(queue_name)).inc();
    }

    /// An attempt's handler returned after `run_s`.
    pub(crate) fn ran(&self, queue_name: &str, kind: &str, run_s: f64) {
        self.run_time
            .get_or_create(&KindLabels {
                queue: queue_name.to_string(),
                kind: kind.to_string(),
            })
            .observe(run_s);
        self.busy.get_or_create(&queue(queue_name)).dec();
    }

    /// A queue's worker threads in this process.
    pub(crate) fn threads(&self, queue_name: &str, n: i64) {
        self.threads.get_or_create(&queue(queue_name)).set(n);
    }

    /// The text exposition: this process's metrics, then the database's
    /// (`None` when it could not be read: `errand_database_up` says so).
    pub fn encode(&self, database: Option<&DatabaseState>) -> String {
        let mut registry = Registry::with_prefix("errand");
        registry.register(
            "jobs_enqueued",
            "Jobs enqueued through this process",
            self.enqueued.clone(),
        );
        registry.register(
            "jobs_completed",
            "Jobs this process's workers completed",
            self.completed.clone(),
        );
        registry.register(
            "jobs_failed",
            "Failed attempts this process's workers recorded (errors, panics, timeouts)",
            self.failed.clone(),
        );
        registry.register(
            "jobs_dead",
            "Jobs this process's workers moved to the dead-letter queue",
            self.dead.clone(),
        );
        registry.register_with_unit(
            "job_start_delay",
            "Claim-to-start latency: from when a job became claimable to the start of its attempt",
            Unit::Seconds,
            self.start_delay.clone(),
        );
        registry.register_with_unit(
            "job_run",
            "How long handlers ran",
            Unit::Seconds,
            self.run_time.clone(),
        );
        registry.register(
            "worker_threads_busy",
            "Worker threads running a job now",
            self.busy.clone(),
        );
        registry.register(
            "worker_threads",
            "Worker threads in this process",
            self.threads.clone(),
        );

        let up = Gauge::<i64>::default();
        up.set(i64::from(database.is_some()));
        registry.register(
            "database_up",
            "Whether the database answered this scrape",
            up,
        );
        if let Some(db) = database {
            let jobs = Family::<StateLabels, Gauge>::default();
            let scheduled = Family::<QueueLabels, Gauge>::default();
            let oldest = Family::<QueueLabels, Gauge<f64, std::sync::atomic::AtomicU64>>::default();
            let paused = Family::<QueueLabels, Gauge>::default();
            for q in &db.queues {
                for state in JobState::ALL {
                    jobs.get_or_create(&StateLabels {
                        queue: q.name.clone(),
                        state: state.to_string(),
                    })
                    .set(q.count(*state));
                }
                scheduled.get_or_create(&queue(&q.name)).set(q.scheduled);
                let age = q
                    .oldest_claimable_at
                    .map_or(0.0, |at| (db.now_ms - at).max(0) as f64 / 1000.0);
                oldest.get_or_create(&queue(&q.name)).set(age);
                paused
                    .get_or_create(&queue(&q.name))
                    .set(i64::from(q.paused));
            }
            registry.register("jobs", "Jobs in the database by queue and state", jobs);
            registry.register(
                "jobs_scheduled",
                "Queued jobs whose run_at is still ahead",
                scheduled,
            );
            registry.register_with_unit(
                "queue_oldest_claimable_age",
                "How long the oldest claimable job of each queue has waited",
                Unit::Seconds,
                oldest,
            );
            registry.register("queue_paused", "1 when the queue is paused", paused);
            let workers = Gauge::<i64>::default();
            workers.set(i64::try_from(db.workers).unwrap_or(i64::MAX));
            registry.register("workers", "Worker processes registered and alive", workers);
        }
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &registry)
            .expect("writing to a String cannot fail");
        out
    }
}
