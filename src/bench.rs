//! `errand bench`: how fast errand is on this database, next to what the
//! database itself allows.
//!
//! One run, on the database given (jobs go to the queues [`QUEUE`] and
//! [`BASELINE_QUEUE`], emptied before and after):
//!
//! 1. **Enqueue** N no-op jobs through [`Store::jobs_enqueue`], 1,000 per
//!    call (one transaction each), as `POST /api/jobs/batch` does.
//! 2. **Drain** them with a [`Worker`] of `concurrency` threads, from its start
//!    until the last completion is recorded.
//! 3. **Pickup latency** on the idle queue: one job at a time, from the
//!    enqueue call to its handler's start. On PostgreSQL the job is enqueued
//!    through a second connection pool, so the wake-up travels by
//!    `LISTEN/NOTIFY` as it does from another process; on SQLite, where only
//!    one process serves a database file, it is the in-process wake-up an
//!    API request triggers.
//! 4. With `baseline`: the same N jobs inserted by plain multi-row INSERTs,
//!    and drained by a plain loop that claims 100 per statement and deletes
//!    them in one (see `store/bench.rs`); errand's figures are divided by
//!    these.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, Sender};
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use serde::Serialize;

use crate::job::{JobContext, Outcome, Registry};
use crate::shutdown::Shutdown;
use crate::store::{self, Backend, NewJob, Store, StoreOptions};
use crate::worker::{QueueSpec, Worker, WorkerConfig};

/// The queue errand's own figures are measured on.
pub const QUEUE: &str = "errand-bench";
/// The queue the plain-SQL baseline runs on.
pub const BASELINE_QUEUE: &str = "errand-bench-baseline";
/// The no-op job kind.
pub const KIND: &str = "errand.bench.noop";

/// What to measure.
#[derive(Debug, Clone)]
pub struct BenchConfig {
    /// Jobs to enqueue and drain.
    pub jobs: usize,
    /// Worker threads draining them.
    pub concurrency: usize,
    /// [`WorkerConfig::max_buffer`].
    pub max_buffer: usize,
    /// Jobs enqueued one at a time on the idle queue for pickup latency.
    pub pickup_samples: usize,
    /// Also run the plain-SQL baseline.
    pub baseline: bool,
    /// Show progress bars (on stderr, when it is a terminal).
    pub progress: bool,
}

/// What a run measured. Rates are jobs per second; latencies milliseconds.
#[derive(Debug, Clone, Serialize)]
pub struct BenchReport {
    pub backend: &'static str,
    pub jobs: usize,
    pub concurrency: usize,
    pub enqueue_jobs_per_s: f64,
    pub drain_jobs_per_s: f64,
    pub pickup_samples: usize,
    pub pickup_p50_ms: f64,
    pub pickup_p90_ms: f64,
    pub pickup_p99_ms: f64,
    pub pickup_max_ms: f64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub baseline_enqueue_jobs_per_s: Option<f64>,
    /// `enqueue_jobs_per_s / baseline_enqueue_jobs_per_s`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub enqueue_ratio: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub baseline_drain_jobs_per_s: Option<f64>,
    /// `drain_jobs_per_s / baseline_drain_jobs_per_s`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ratio: Option<f64>,
}

impl std::fmt::Display for BenchReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let against =
            |baseline: Option<f64>, ratio: Option<f64>, what: &str| match (baseline, ratio) {
                (Some(b), Some(r)) => format!("   {r:.2}× the baseline ({what}: {})", rate(b)),
                _ => String::new(),
            };
        writeln!(
            f,
            "errand bench on {}: {} no-op jobs, {} worker threads",
            self.backend, self.jobs, self.concurrency
        )?;
        writeln!(
            f,
            "  enqueue  {:>9} jobs/s{}",
            rate(self.enqueue_jobs_per_s),
            against(
                self.baseline_enqueue_jobs_per_s,
                self.enqueue_ratio,
                "multi-row INSERT of 1,000"
            )
        )?;
        writeln!(
            f,
            "  drain    {:>9} jobs/s{}",
            rate(self.drain_jobs_per_s),
            against(
                self.baseline_drain_jobs_per_s,
                self.ratio,
                "claim 100 and delete, in a loop"
            )
        )?;
        write!(
            f,
            "  pickup   p50 {:.2} ms, p90 {:.2} ms, p99 {:.2} ms, max {:.2} ms ({} jobs on an idle queue)",
            self.pickup_p50_ms,
            self.pickup_p90_ms,
            self.pickup_p99_ms,
            self.pickup_max_ms,
            self.pickup_samples
        )
    }
}

/// `12345.6` as `12,346`.
fn rate(v: f64) -> String {
    let digits = format!("{:.0}", v.max(0.0));
    let mut out = String::new();
    for (i, ch) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i) % 3 == 0 {
            out.push(',');
        }
        out.push(ch);
    }
    out
}

/// What went wrong in a run.
#[derive(Debug, thiserror::Error)]
pub enum BenchError {
    #[error(transparent)]
    Store(#[from] store::Error),
    #[error("{0}")]
    Stalled(String),
}

/// What the no-op handler reports to the run.
#[derive(Default)]
struct Probe {
    ran: AtomicUsize,
    /// While set, each handler start is sent to `starts`.
    timing: AtomicBool,
    starts: std::sync::Mutex<Option<Sender<Instant>>>,
}

/// Runs the benchmark on `store`, whose jobs in [`QUEUE`] and
/// [`BASELINE_QUEUE`] it deletes before and after.
pub fn run(store: &Store, config: &BenchConfig) -> Result<BenchReport, BenchError> {
    let queues = [QUEUE, BASELINE_QUEUE];
    store.bench_clear(&queues)?;
    let result = measure(store, config);
    // Leave nothing behind, even after a failure.
    let cleared = store.bench_clear(&queues);
    let report = result?;
    cleared?;
    Ok(report)
}

fn measure(store: &Store, config: &BenchConfig) -> Result<BenchReport, BenchError> {
    let n = config.jobs;
    let probe = Arc::new(Probe::default());
    let mut registry = Registry::new();
    let p = probe.clone();
    registry.register_fn(KIND, move |_: serde::de::IgnoredAny, _: &JobContext| {
        if p.timing.load(Ordering::Relaxed)
            && let Some(tx) = p.starts.lock().unwrap_or_else(|e| e.into_inner()).as_ref()
        {
            let _ = tx.send(Instant::now());
        }
        p.ran.fetch_add(1, Ordering::Relaxed);
        Outcome::Done
    });
    let job = registry
        .prepare(NewJob::new(KIND, serde_json::json!({})).queue(QUEUE))
        .map_err(|e| BenchError::Stalled(e.to_string()))?;

    // 1. Enqueue.
    let bar = bar(config, "enqueue", n);
    let batch = vec![job.clone(); store::BASELINE_INSERT.min(n.max(1))];
    let started = Instant::now();
    let mut left = n;
    while left > 0 {
        let k = left.min(batch.len());
        store.jobs_enqueue(&batch[..k])?;
        bar.inc(k as u64);
        left -= k;
    }
    let enqueue = started.elapsed();
    bar.finish_and_clear();

    // 2. Drain.
    let bar = self::bar(config, "drain", n);
    let started = Instant::now();
    let worker = Worker::start(
        store.clone(),
        Arc::new(registry),
        WorkerConfig {
            queues: vec![QueueSpec {
                name: QUEUE.into(),
                concurrency: config.concurrency,
            }],
            max_buffer: config.max_buffer,
            ..WorkerConfig::default()
        },
    )?;
    let mut last = (0, Instant::now());
    loop {
        let ran = probe.ran.load(Ordering::Relaxed);
        bar.set_position(ran as u64);
        if ran >= n && worker.held() == 0 {
            break;
        }
        if ran != last.0 {
            last = (ran, Instant::now());
        } else if last.1.elapsed() > Duration::from_secs(30) {
            return Err(BenchError::Stalled(format!(
                "the drain stalled at {ran} of {n} jobs for 30 s: is another process working \
                 queue '{QUEUE}', or is the database overloaded?"
            )));
        }
        std::thread::sleep(Duration::from_millis(1));
    }
    let drain = started.elapsed();
    bar.finish_and_clear();

    // 3. Pickup latency, on the now idle queue.
    let producer = match store.backend() {
        Backend::Postgres => Store::open(
            store.url(),
            &StoreOptions {
                pool_size: 1,
                ..StoreOptions::default()
            },
        )?,
        Backend::Sqlite => store.clone(),
    };
    let (tx, rx) = crossbeam_channel::unbounded();
    *probe.starts.lock().unwrap_or_else(|e| e.into_inner()) = Some(tx);
    probe.timing.store(true, Ordering::SeqCst);
    let bar = self::bar(config, "pickup", config.pickup_samples);
    let latencies = pickup(&producer, &worker, &job, config.pickup_samples, &rx, &bar);
    probe.timing.store(false, Ordering::SeqCst);
    bar.finish_and_clear();
    worker.shutdown(Duration::from_secs(5), &Shutdown::new());
    let mut latencies = latencies?;
    latencies.sort_by(f64::total_cmp);

    let per_s = |d: Duration| n as f64 / d.as_secs_f64().max(1e-9);
    let mut report = BenchReport {
        backend: store.backend().as_str(),
        jobs: n,
        concurrency: config.concurrency,
        enqueue_jobs_per_s: per_s(enqueue),
        drain_jobs_per_s: per_s(drain),
        pickup_samples: latencies.len(),
        pickup_p50_ms: percentile(&latencies, 0.50),
        pickup_p90_ms: percentile(&latencies, 0.90),
        pickup_p99_ms: percentile(&latencies, 0.99),
        pickup_max_ms: latencies.last().copied().unwrap_or(0.0),
        baseline_enqueue_jobs_per_s: None,
        enqueue_ratio: None,
        baseline_drain_jobs_per_s: None,
        ratio: None,
    };

    // 4. The baseline, on a table emptied of errand's jobs as errand's own
    // run started on one without the baseline's.
    if config.baseline {
        store.bench_clear(&[QUEUE])?;
        let bar = self::bar(config, "baseline enqueue", n);
        let started = Instant::now();
        store.bench_insert_plain(BASELINE_QUEUE, KIND, n, &|k| bar.inc(k as u64))?;
        let insert = started.elapsed();
        bar.finish_and_clear();
        let bar = self::bar(config, "baseline drain", n);
        let started = Instant::now();
        let drained = store.bench_drain_plain(BASELINE_QUEUE, &|k| bar.inc(k as u64))?;
        let plain = started.elapsed();
        bar.finish_and_clear();
        if drained != n {
            return Err(BenchError::Stalled(format!(
                "the baseline drained {drained} of {n} jobs: is another process working queue \
                 '{BASELINE_QUEUE}'?"
            )));
        }
        let (b_enqueue, b_drain) = (per_s(insert), per_s(plain));
        report.baseline_enqueue_jobs_per_s = Some(b_enqueue);
        report.enqueue_ratio = Some(report.enqueue_jobs_per_s / b_enqueue);
        report.baseline_drain_jobs_per_s = Some(b_drain);
        report.ratio = Some(report.drain_jobs_per_s / b_drain);
    }
    Ok(report)
}

/// Enqueues `samples` jobs one at a time, each after the previous one is
/// recorded, and returns each one's enqueue-to-start time in milliseconds.
fn pickup(
    producer: &Store,
    worker: &Worker,
    job: &NewJob,
    samples: usize,
    starts: &Receiver<Instant>,
    bar: &ProgressBar,
) -> Result<Vec<f64>, BenchError> {
    let mut latencies = Vec::with_capacity(samples);
    for _ in 0..samples {
        let sent = Instant::now();
        producer.job_enqueue(job)?;
        let started = starts.recv_timeout(Duration::from_secs(10)).map_err(|_| {
            BenchError::Stalled(
                "a job enqueued on the idle queue did not start within 10 s: are wake-ups \
                 (LISTEN/NOTIFY) reaching this process?"
                    .into(),
            )
        })?;
        latencies.push(started.saturating_duration_since(sent).as_secs_f64() * 1000.0);
        bar.inc(1);
        // Idle again: the job's completion is recorded and nothing is held.
        let deadline = Instant::now() + Duration::from_secs(10);
        while worker.held() > 0 {
            if Instant::now() > deadline {
                return Err(BenchError::Stalled(
                    "a completed job was not recorded within 10 s".into(),
                ));
            }
            std::thread::sleep(Duration::from_micros(200));
        }
    }
    Ok(latencies)
}

/// The value below which `q` of the sorted `values` fall (nearest rank).
fn percentile(sorted: &[f64], q: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let rank = (q * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

fn bar(config: &BenchConfig, phase: &'static str, total: usize) -> ProgressBar {
    let bar = ProgressBar::with_draw_target(
        Some(total as u64),
        if config.progress {
            ProgressDrawTarget::stderr()
        } else {
            ProgressDrawTarget::hidden()
        },
    );
    bar.set_style(
        ProgressStyle::with_template(
            "{prefix:>16} [{bar:30}] {pos}/{len} ({per_sec}, {elapsed_precise})",
        )
        .expect("the template is valid")
        .progress_chars("=> "),
    );
    bar.set_prefix(phase);
    bar
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_use_the_nearest_rank() {
        let v: Vec<f64> = (1..=100).map(f64::from).collect();
        assert_eq!(percentile(&v, 0.50), 50.0);
        assert_eq!(percentile(&v, 0.99), 99.0);
        assert_eq!(percentile(&v, 1.0), 100.0);
        assert_eq!(percentile(&[7.0], 0.5), 7.0);
        assert_eq!(percentile(&[], 0.5), 0.0);
    }

    #[test]
    fn rates_are_grouped_by_thousands() {
        assert_eq!(rate(12345.6), "12,346");
        assert_eq!(rate(999.0), "999");
        assert_eq!(rate(1_000_000.0), "1,000,000");
    }
}
