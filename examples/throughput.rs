//! Enqueues N no-op jobs (in batches of 1,000), then drains them with one
//! worker pool, and prints both rates. A quick figure until `errand bench`:
//!
//! ```sh
//! cargo run --release --example throughput -- --database-url /tmp/t.db --jobs 10000
//! cargo run --release --example throughput -- --database-url postgres://postgres@127.0.0.1/t
//! ```
//!
//! The database should be empty (use a fresh file or database).

use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::Parser;
use errand::shutdown::Shutdown;
use errand::store::{JobState, NewJob, Store, StoreOptions};
use errand::worker::{QueueSpec, Worker, WorkerConfig};
use errand::{Outcome, Registry};

#[derive(Parser)]
struct Args {
    #[arg(long, default_value = "throughput.db")]
    database_url: String,
    #[arg(long, default_value_t = 10_000)]
    jobs: usize,
    #[arg(long, default_value_t = 8)]
    concurrency: usize,
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args = Args::parse();
    let store = Store::open_and_migrate(&args.database_url, &StoreOptions::default())?;
    let mut registry = Registry::new();
    registry.register_fn(
        "noop",
        |_: serde::de::IgnoredAny, _: &errand::JobContext| Outcome::Done,
    );
    let job = registry.prepare(NewJob::new("noop", serde_json::json!({})))?;

    let started = Instant::now();
    let batch = vec![job; 1000];
    let mut left = args.jobs;
    while left > 0 {
        let n = left.min(batch.len());
        store.jobs_enqueue(&batch[..n])?;
        left -= n;
    }
    let enqueue = started.elapsed();

    let started = Instant::now();
    let worker = Worker::start(
        store.clone(),
        Arc::new(registry),
        WorkerConfig {
            queues: vec![QueueSpec {
                name: "default".into(),
                concurrency: args.concurrency,
            }],
            ..WorkerConfig::default()
        },
    )?;
    loop {
        let completed: i64 = store
            .jobs_count()?
            .iter()
            .filter(|c| c.state == JobState::Completed)
            .map(|c| c.count)
            .sum();
        if completed as usize >= args.jobs {
            break;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    let drain = started.elapsed();
    worker.shutdown(Duration::from_secs(5), &Shutdown::new());

    let rate = |d: Duration| args.jobs as f64 / d.as_secs_f64();
    println!(
        "backend={} jobs={} concurrency={} enqueue={:.0} jobs/s ({:.2}s) drain={:.0} jobs/s ({:.2}s)",
        store.backend().as_str(),
        args.jobs,
        args.concurrency,
        rate(enqueue),
        enqueue.as_secs_f64(),
        rate(drain),
        drain.as_secs_f64()
    );
    Ok(())
}
