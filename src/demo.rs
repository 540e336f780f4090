//! Demo job kinds, registered in every errand process so that the binary
//! shows life without any code (tests and benchmarks use them too), and the
//! `--demo` feeder that enqueues a realistic mix now and then.
//!
//! - `noop`: succeeds at once.
//! - `sleep` `{"ms": N}`: works for N milliseconds, stopping early if the
//!   job is cancelled.
//! - `fail` `{"message"?, "times"?, "permanent"?}`: fails `times` times and
//!   then succeeds; without `times` it always fails; `permanent: true` fails
//!   with `Dead` (no retries).

use std::sync::Arc;
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use serde::Deserialize;
use serde::de::IgnoredAny;
use serde_json::json;
use tracing::warn;

use crate::job::{JobContext, Outcome, Registry};
use crate::shutdown::{Shutdown, Stage};
use crate::store::{NewJob, Store};

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct SleepArgs {
    ms: u64,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct FailArgs {
    message: Option<String>,
    times: Option<i32>,
    #[serde(default)]
    permanent: bool,
}

/// Registers `noop`, `sleep` and `fail`.
pub fn register(registry: &mut Registry) {
    registry.register_fn("noop", |_: IgnoredAny, _: &JobContext| Outcome::Done);
    registry.register_fn("sleep", |args: SleepArgs, job: &JobContext| {
        let until = Instant::now() + Duration::from_millis(args.ms);
        loop {
            if job.is_cancelled() {
                return Outcome::Retry("stopped early: the job was cancelled".into());
            }
            let now = Instant::now();
            if now >= until {
                return Outcome::Done;
            }
            thread::sleep((until - now).min(Duration::from_millis(50)));
        }
    });
    registry.register_fn("fail", |args: FailArgs, job: &JobContext| {
        if args.times.is_some_and(|times| job.attempt > times) {
            return Outcome::Done;
        }
        let message = args
            .message
            .unwrap_or_else(|| format!("demo failure on attempt {}", job.attempt));
        if args.permanent {
            Outcome::Dead(message)
        } else {
            Outcome::Retry(message)
        }
    });
}

/// The mix `--demo` enqueues on each tick: mostly successes and short work,
/// with transient and permanent failures and a scheduled job now and then.
fn demo_batch(tick: u64, queue: &str) -> Vec<NewJob> {
    let mut jobs = vec![
        NewJob::new("noop", json!({})),
        NewJob::new("noop", json!({"demo": tick})).priority(1),
        NewJob::new("sleep", json!({"ms": 200 + (tick * 397) % 2800})),
    ];
    if tick.is_multiple_of(3) {
        jobs.push(NewJob::new(
            "fail",
            json!({"message": "upstream timed out (transient; succeeds on retry)", "times": 1}),
        ));
    }
    if tick.is_multiple_of(5) {
        jobs.push(NewJob::new(
            "fail",
            json!({"message": format!("invalid recipient address for order {}", 1000 + tick), "permanent": true}),
        ));
    }
    if tick.is_multiple_of(7) {
        jobs.push(
            NewJob::new(
                "fail",
                json!({"message": "connection refused by payments API"}),
            )
            .max_attempts(2),
        );
    }
    if tick.is_multiple_of(10) {
        jobs.push(NewJob::new("noop", json!({"scheduled": true})).delay(Duration::from_secs(30)));
    }
    jobs.into_iter().map(|j| j.queue(queue)).collect()
}

/// Enqueues [`demo_batch`] on `queue` every two seconds until shutdown.
pub fn start_feeder(
    store: Store,
    registry: Arc<Registry>,
    queue: String,
    shutdown: Shutdown,
) -> std::io::Result<JoinHandle<()>> {
    thread::Builder::new()
        .name("errand-demo".into())
        .spawn(move || {
            let mut tick = 0;
            while shutdown.wait_for(Stage::Draining, Some(Duration::from_secs(2))) == Stage::Running
            {
                tick += 1;
                let batch: Vec<NewJob> = demo_batch(tick, &queue)
                    .into_iter()
                    .filter_map(|j| registry.prepare(j).ok())
                    .collect();
                if let Err(e) = store.jobs_enqueue(&batch) {
                    warn!(error = %e, "demo: enqueueing failed");
                }
            }
        })
}
