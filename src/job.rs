//! What a job kind is to errand: a [`Handler`] registered under a name, with
//! per-kind defaults, returning a closed [`Outcome`].
//!
//! Handlers never touch job state. They return an outcome and the worker turns
//! it into a state change (`Done` → completed, `Retry` → retrying or dead,
//! `Dead` → dead, `Snooze` → queued again without spending an attempt).

use std::collections::BTreeMap;
use std::fmt::Display;
use std::marker::PhantomData;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde::de::DeserializeOwned;

use crate::store::{DEFAULT_MAX_ATTEMPTS, DEFAULT_TIMEOUT, Job, NewJob};

/// How an attempt ended, as the handler sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// Success: the job is completed.
    Done,
    /// A failure worth retrying: counts an attempt; the job is retried with
    /// backoff, or goes to `dead` when it has no attempts left.
    Retry(String),
    /// A permanent failure: the job goes to `dead` at once.
    Dead(String),
    /// Not now: try again after this long. Does not count an attempt.
    Snooze(Duration),
}

impl Outcome {
    /// `Outcome::Retry` with the error's text.
    pub fn retry(error: impl Display) -> Outcome {
        Outcome::Retry(error.to_string())
    }

    /// `Outcome::Dead` with the error's text.
    pub fn dead(error: impl Display) -> Outcome {
        Outcome::Dead(error.to_string())
    }
}

/// `Ok` is `Done`; `Err` is `Retry` with the error's text.
impl<E: Display> From<Result<(), E>> for Outcome {
    fn from(result: Result<(), E>) -> Outcome {
        match result {
            Ok(()) => Outcome::Done,
            Err(e) => Outcome::retry(e),
        }
    }
}

/// A job kind's code.
///
/// `Args` is what the job's JSON arguments decode into; a job whose arguments
/// do not decode goes to `dead` with the decoding error (retrying cannot fix
/// its arguments; an operator can edit and replay it).
pub trait Handler: Send + Sync + 'static {
    type Args: DeserializeOwned;

    fn run(&self, args: Self::Args, job: &JobContext) -> Outcome;
}

/// A closure as a [`Handler`]; see [`Registry::register_fn`].
struct FnHandler<F, A> {
    f: F,
    _args: PhantomData<fn(A)>,
}

impl<F, A> Handler for FnHandler<F, A>
where
    F: Fn(A, &JobContext) -> Outcome + Send + Sync + 'static,
    A: DeserializeOwned + 'static,
{
    type Args = A;

    fn run(&self, args: A, job: &JobContext) -> Outcome {
        (self.f)(args, job)
    }
}

/// What a running handler knows about its job.
#[derive(Debug)]
pub struct JobContext {
    pub id: i64,
    pub queue: String,
    pub kind: String,
    /// This attempt's number, from 1.
    pub attempt: i32,
    pub max_attempts: i32,
    deadline: Instant,
    cancelled: Arc<AtomicBool>,
    detail: Mutex<Option<serde_json::Value>>,
}

impl JobContext {
    pub(crate) fn new(job: &Job, deadline: Instant, cancelled: Arc<AtomicBool>) -> JobContext {
        JobContext {
            id: job.id,
            queue: job.queue.clone(),
            kind: job.kind.clone(),
            attempt: job.attempt,
            max_attempts: job.max_attempts,
            deadline,
            cancelled,
            detail: Mutex::new(None),
        }
    }

    /// Keeps `detail` (any JSON: an HTTP status and duration, an SMTP reply)
    /// with this attempt's record, whatever its outcome; shown on the job's
    /// page and in the API. A later call replaces it. Keep it small: it is
    /// stored capped at 16 KiB.
    pub fn record(&self, detail: serde_json::Value) {
        *self.detail.lock().unwrap_or_else(|e| e.into_inner()) = Some(detail);
    }

    /// What [`JobContext::record`] kept, as JSON text.
    pub(crate) fn take_detail(&self) -> Option<String> {
        self.detail
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take()
            .map(|v| v.to_string())
    }

    /// True once an operator has cancelled this job or the worker has lost
    /// its lease (another worker may now run it). A long handler should check
    /// this between steps and return early.
    pub fn is_cancelled(&self) -> bool {
        self.cancelled.load(Ordering::Relaxed)
    }

    /// When this attempt times out; after it the worker records a timeout
    /// and ignores the handler's result.
    pub fn deadline(&self) -> Instant {
        self.deadline
    }
}

/// How long to wait before retry number `attempt + 1`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Backoff {
    /// `attempt⁴ + 15` seconds plus up to `10 × (attempt + 1)` seconds of
    /// jitter (Sidekiq's curve: 16 s, 31 s, 96 s, … about 3 weeks over 25
    /// attempts).
    #[default]
    Exponential,
    /// The same delay every time.
    Fixed(Duration),
}

impl Backoff {
    /// The delay after failed attempt number `attempt` (from 1).
    pub fn delay(self, attempt: i32) -> Duration {
        match self {
            Backoff::Fixed(delay) => delay,
            Backoff::Exponential => {
                let n = u64::try_from(attempt.max(1)).unwrap_or(1).min(1000);
                let base = n.saturating_pow(4).saturating_add(15);
                let jitter = rand::random_range(0..10 * (n + 1));
                Duration::from_secs(base.saturating_add(jitter))
            }
        }
    }
}

/// Per-kind settings; every field falls back to the worker's default.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct KindOptions {
    /// How long one attempt may run. Default 5 minutes.
    pub timeout: Option<Duration>,
    /// Attempts before a job goes to `dead`. Default 25.
    pub max_attempts: Option<i32>,
    /// Delay between attempts. Default [`Backoff::Exponential`].
    pub backoff: Option<Backoff>,
}

/// Type-erased handler: decodes the args, then runs.
trait Runner: Send + Sync {
    fn run(&self, args: &str, job: &JobContext) -> Outcome;
}

impl<H: Handler> Runner for H {
    fn run(&self, args: &str, job: &JobContext) -> Outcome {
        match serde_json::from_str::<H::Args>(args) {
            Ok(args) => Handler::run(self, args, job),
            Err(e) => Outcome::Dead(format!(
                "args do not decode for kind '{}': {e}; fix the args and replay the job",
                job.kind
            )),
        }
    }
}

struct Kind {
    runner: Box<dyn Runner>,
    options: KindOptions,
}

/// The job kinds a process can run, by name.
#[derive(Default)]
pub struct Registry {
    kinds: BTreeMap<String, Kind>,
}

impl std::fmt::Debug for Registry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_set().entries(self.kinds.keys()).finish()
    }
}

/// The kind named is not registered.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown job kind '{kind}': this process runs {known}")]
pub struct UnknownKind {
    pub kind: String,
    /// The registered kinds, comma-separated.
    pub known: String,
}

/// A handle to a kind just registered, to set its options.
pub struct KindBuilder<'r> {
    options: &'r mut KindOptions,
}

impl KindBuilder<'_> {
    pub fn timeout(self, timeout: Duration) -> Self {
        self.options.timeout = Some(timeout);
        self
    }

    pub fn max_attempts(self, max_attempts: i32) -> Self {
        self.options.max_attempts = Some(max_attempts);
        self
    }

    pub fn backoff(self, backoff: Backoff) -> Self {
        self.options.backoff = Some(backoff);
        self
    }
}

impl Registry {
    /// An empty registry (see [`crate::demo::register`] for the demo kinds).
    pub fn new() -> Registry {
        Registry::default()
    }

    /// Registers `handler` under `kind`, replacing any handler of that name.
    pub fn register<H: Handler>(&mut self, kind: &str, handler: H) -> KindBuilder<'_> {
        let kind = self.kinds.entry(kind.to_string()).or_insert_with(|| Kind {
            runner: Box::new(NoHandler),
            options: KindOptions::default(),
        });
        kind.runner = Box::new(handler);
        KindBuilder {
            options: &mut kind.options,
        }
    }

    /// Registers a closure taking the decoded args and the job's context.
    pub fn register_fn<A, F>(&mut self, kind: &str, f: F) -> KindBuilder<'_>
    where
        A: DeserializeOwned + 'static,
        F: Fn(A, &JobContext) -> Outcome + Send + Sync + 'static,
    {
        self.register(
            kind,
            FnHandler {
                f,
                _args: PhantomData,
            },
        )
    }

    pub fn contains(&self, kind: &str) -> bool {
        self.kinds.contains_key(kind)
    }

    /// The registered kind names, sorted.
    pub fn kinds(&self) -> impl Iterator<Item = &str> {
        self.kinds.keys().map(String::as_str)
    }

    pub fn options(&self, kind: &str) -> Option<KindOptions> {
        self.kinds.get(kind).map(|k| k.options)
    }

    /// Fills a new job's unset max attempts and timeout from its kind's
    /// options (else the defaults), and refuses a kind that is not registered.
    pub fn prepare(&self, mut job: NewJob) -> Result<NewJob, UnknownKind> {
        let options = self
            .options(&job.kind)
            .ok_or_else(|| self.unknown(&job.kind))?;
        job.max_attempts = job
            .max_attempts
            .or(options.max_attempts)
            .or(Some(DEFAULT_MAX_ATTEMPTS));
        job.timeout = job.timeout.or(options.timeout).or(Some(DEFAULT_TIMEOUT));
        Ok(job)
    }

    pub(crate) fn unknown(&self, kind: &str) -> UnknownKind {
        UnknownKind {
            kind: kind.to_string(),
            known: if self.kinds.is_empty() {
                "no kinds".to_string()
            } else {
                self.kinds().collect::<Vec<_>>().join(", ")
            },
        }
    }

    /// Runs `args` through the kind's handler; `None` when the kind is not
    /// registered.
    pub(crate) fn run(&self, kind: &str, args: &str, job: &JobContext) -> Option<Outcome> {
        self.kinds.get(kind).map(|k| k.runner.run(args, job))
    }
}

/// Placeholder while `register` swaps the real handler in.
struct NoHandler;

impl Runner for NoHandler {
    fn run(&self, _: &str, job: &JobContext) -> Outcome {
        Outcome::Retry(format!("no handler for kind '{}'", job.kind))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exponential_backoff_follows_the_curve_with_bounded_jitter() {
        for attempt in 1..=25 {
            let n = attempt as u64;
            let delay = Backoff::Exponential.delay(attempt).as_secs();
            assert!(delay >= n.pow(4) + 15, "attempt {attempt}: {delay}");
            assert!(
                delay < n.pow(4) + 15 + 10 * (n + 1),
                "attempt {attempt}: {delay}"
            );
        }
        assert_eq!(
            Backoff::Fixed(Duration::from_millis(7)).delay(3),
            Duration::from_millis(7)
        );
    }

    #[test]
    fn prepare_fills_kind_defaults_and_refuses_unknown_kinds() {
        let mut registry = Registry::new();
        registry
            .register_fn("mail", |_: serde_json::Value, _| Outcome::Done)
            .timeout(Duration::from_secs(9))
            .max_attempts(3);
        let job = registry
            .prepare(NewJob::new("mail", serde_json::json!({})))
            .unwrap();
        assert_eq!(job.timeout, Some(Duration::from_secs(9)));
        assert_eq!(job.max_attempts, Some(3));
        let explicit = registry
            .prepare(NewJob::new("mail", serde_json::json!({})).max_attempts(7))
            .unwrap();
        assert_eq!(explicit.max_attempts, Some(7));
        let err = registry
            .prepare(NewJob::new("nope", serde_json::json!({})))
            .unwrap_err();
        assert_eq!(
            err.to_string(),
            "unknown job kind 'nope': this process runs mail"
        );
    }
}
