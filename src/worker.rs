//! Workers: the threads that claim jobs, run their handlers and record what
//! happened. This is the "claim, commit, run, then acknowledge" step of the
//! data flow; no transaction is open while a handler runs.
//!
//! Per queue, one *fetcher* thread claims jobs in batches (one statement each)
//! and hands them over a channel to the queue's *executor* threads. A batch
//! fills the idle executors plus a local buffer sized to what they finish in
//! [`BUFFER_WINDOW`] (an average of recent run times; at most
//! [`WorkerConfig::max_buffer`]): fast jobs are claimed hundreds at a time,
//! slow ones only as threads free up. A buffered job that waited for half its
//! timeout is released unrun rather than started short of time. Executors run handlers (panics caught) and send each result to the
//! process's single *completer*, which records results in batches: every
//! completion that arrived meanwhile goes in one statement. A *keeper* thread
//! refreshes the heartbeat of every held job in one statement per interval,
//! passes operators' cancel requests to handlers, and times out attempts that
//! overrun: it records the timeout, abandons the stuck thread and starts a
//! replacement, so a hung handler never costs a slot. On PostgreSQL a
//! *listener* thread turns `NOTIFY` from other processes into wake-ups.
//!
//! Shutdown ([`Worker::shutdown`]): stop claiming, release jobs not yet
//! started, let running ones finish within the grace period, then release
//! the rest without spending their attempt. Heartbeats go on until the last
//! release is recorded.

use std::any::Any;
use std::backtrace::Backtrace;
use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::panic::{self, AssertUnwindSafe};
use std::sync::atomic::{AtomicBool, AtomicU8, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, Once};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, RecvTimeoutError, Sender};
use fallible_iterator::FallibleIterator;
use tracing::{debug, info, warn};

use crate::job::{Backoff, JobContext, Outcome, Registry};
use crate::metrics::Metrics;
use crate::shutdown::{Shutdown, Stage};
use crate::store::{
    self, AttemptOutcome, CompletedDetail, Failure, Job, JobState, Lease, Store, WorkerInfo,
};

/// A queue to work and how many jobs of it may run at once.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QueueSpec {
    pub name: String,
    pub concurrency: usize,
}

/// Reads `default=8,mail=2` (a name alone means concurrency 1).
pub fn parse_queues(spec: &str) -> Result<Vec<QueueSpec>, String> {
    let mut queues: Vec<QueueSpec> = Vec::new();
    for part in spec.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let (name, concurrency) = match part.split_once('=') {
            Some((name, n)) => {
                let n: usize = n.trim().parse().map_err(|_| {
                    format!(
                        "'{part}': the concurrency after '=' must be a whole number, e.g. {name}=4"
                    )
                })?;
                (name.trim(), n)
            }
            None => (part, 1),
        };
        if name.is_empty() {
            return Err(format!("'{part}': the queue name is empty"));
        }
        if concurrency == 0 || concurrency > 1024 {
            return Err(format!("'{part}': concurrency must be between 1 and 1024"));
        }
        if queues.iter().any(|q| q.name == name) {
            return Err(format!("queue '{name}' is named twice"));
        }
        queues.push(QueueSpec {
            name: name.to_string(),
            concurrency,
        });
    }
    if queues.is_empty() {
        return Err("no queues given: name at least one, e.g. default=8".into());
    }
    Ok(queues)
}

/// Worker settings; [`WorkerConfig::default`] matches `errand serve`'s.
#[derive(Debug, Clone)]
pub struct WorkerConfig {
    /// Queues to work, with threads per queue. Default `default=8`.
    pub queues: Vec<QueueSpec>,
    /// How often an idle queue looks for jobs no wake-up announced (scheduled
    /// jobs coming due, retries, other SQLite processes). Default 1 s.
    pub poll_interval: Duration,
    /// How often held jobs' heartbeats (and this process's) are refreshed.
    /// Default 15 s; keep it well under the rescuer's stale-after (60 s).
    pub heartbeat_interval: Duration,
    /// Delay between attempts for kinds that set none. Default exponential.
    pub backoff: Backoff,
    /// This process's worker id. Default `host:pid:boot-id`.
    pub id: Option<String>,
    /// Most claimed jobs a queue keeps waiting for a free thread, beyond one
    /// per thread. The buffer is sized to what the threads finish within
    /// [`BUFFER_WINDOW`], so it fills only with fast jobs. 0 sizes every claim
    /// to the idle threads. Default 1,000.
    pub max_buffer: usize,
    /// Where the workers count what they do (shared with `/metrics`).
    pub metrics: Metrics,
}

impl Default for WorkerConfig {
    fn default() -> Self {
        WorkerConfig {
            queues: vec![QueueSpec {
                name: store::DEFAULT_QUEUE.to_string(),
                concurrency: 8,
            }],
            poll_interval: Duration::from_secs(1),
            heartbeat_interval: Duration::from_secs(15),
            backoff: Backoff::default(),
            id: None,
            max_buffer: 1000,
            metrics: Metrics::default(),
        }
    }
}

/// `host:pid:boot-id`, unique per process start.
pub fn worker_id() -> String {
    let host = gethostname::gethostname().to_string_lossy().into_owned();
    let boot = uuid::Uuid::new_v4().simple().to_string();
    format!("{host}:{}:{}", std::process::id(), &boot[..8])
}

/// What a shutdown did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ShutdownReport {
    /// Jobs that finished during the drain (any outcome).
    pub finished: usize,
    /// Jobs given back to their queue without spending an attempt.
    pub released: usize,
}

// A claimed job's life in this process: claimed (maybe waiting for an
// executor, then running), then either finished by its executor or abandoned
// by the keeper (timed out) or the drain. Exactly one of them records it.
const CLAIMED: u8 = 0;
const FINISHED: u8 = 1;
const ABANDONED: u8 = 2;

/// A job this process holds the lease of.
struct Held {
    job: Job,
    lease: Lease,
    queue: usize,
    claimed_at: Instant,
    deadline: Instant,
    timeout: Duration,
    status: AtomicU8,
    /// Seen by the handler through `JobContext::is_cancelled`.
    cancelled: Arc<AtomicBool>,
    lost: AtomicBool,
}

impl Held {
    fn take(&self, to: u8) -> bool {
        self.status
            .compare_exchange(CLAIMED, to, Ordering::AcqRel, Ordering::Acquire)
            .is_ok()
    }
}

/// A result on its way to the database.
enum Finished {
    /// With what the attempt recorded, if anything.
    Done(Arc<Held>, Option<String>),
    Failed(Arc<Held>, Failure),
    Snoozed(Arc<Held>, Duration, Option<String>),
    Released(Arc<Held>),
    /// The completer's last message: everything before it is recorded.
    Stop,
}

impl Finished {
    fn held(&self) -> Option<&Arc<Held>> {
        match self {
            Finished::Done(h, _) | Finished::Failed(h, _) | Finished::Snoozed(h, _, _) => Some(h),
            Finished::Released(h) => Some(h),
            Finished::Stop => None,
        }
    }
}

/// Snoozes with a recorded reason one attempt may take; the last counts as
/// a failed attempt (see `record`).
pub const MAX_SNOOZES: i64 = 20;

/// How much work, at the recent pace, a queue's local buffer holds.
pub const BUFFER_WINDOW: Duration = Duration::from_millis(50);

struct QueueRunner {
    spec: QueueSpec,
    /// What this queue holds; the fetcher waits on `counts_cv` for room.
    counts: Mutex<Counts>,
    /// Signalled when a count falls (and on stop).
    counts_cv: Condvar,
    /// Recent handler run time in nanoseconds (moving average); sizes the
    /// buffer. Starts at a second, so a queue claims no more than its idle
    /// threads until it has seen its jobs are fast.
    run_ns: AtomicU64,
    /// Kept to start replacement executors.
    jobs_rx: Receiver<Arc<Held>>,
}

#[derive(Debug, Default)]
struct Counts {
    /// Claimed and not yet finished by an executor: running, or waiting in
    /// the channel.
    in_flight: usize,
    /// Claimed and not yet recorded: `in_flight` plus results on their way
    /// to the database. Bounds claims when recording falls behind (a slow
    /// or unreachable database), so that claimed work cannot pile up.
    unrecorded: usize,
}

impl QueueRunner {
    fn counts(&self) -> MutexGuard<'_, Counts> {
        self.counts.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Jobs to keep waiting beyond one per thread: what the threads finish
    /// within [`BUFFER_WINDOW`] at the recent pace, at most `max`.
    fn buffer_target(&self, max: usize) -> usize {
        let run_ns = self.run_ns.load(Ordering::Relaxed).max(1);
        let per_window = BUFFER_WINDOW.as_nanos() as u64 / run_ns;
        (per_window.saturating_mul(self.spec.concurrency as u64)).min(max as u64) as usize
    }

    fn ran_for(&self, took: Duration) {
        // An exponential moving average (1/8 weight to the newest); updates
        // racing between executors lose a sample, which is harmless.
        let old = self.run_ns.load(Ordering::Relaxed);
        let new = (old - old / 8).saturating_add(took.as_nanos() as u64 / 8);
        self.run_ns.store(new, Ordering::Relaxed);
    }
}

struct Shared {
    store: Store,
    registry: Arc<Registry>,
    config: WorkerConfig,
    id: String,
    queues: Vec<Arc<QueueRunner>>,
    stopping: AtomicBool,
    held: Mutex<HashMap<i64, Arc<Held>>>,
    /// Signalled when `held` shrinks while stopping (the drain waits on it).
    held_cv: Condvar,
    /// Signalled when the keeper should look again: a claimed job's deadline
    /// falls before `keeper_wake`, or stop.
    keeper_cv: Condvar,
    /// When the keeper next wakes, as nanoseconds after `epoch`.
    keeper_wake: AtomicU64,
    epoch: Instant,
    keeper_stop: AtomicBool,
    results: Sender<Finished>,
}

impl Shared {
    fn held(&self) -> MutexGuard<'_, HashMap<i64, Arc<Held>>> {
        self.held.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn since_epoch(&self, at: Instant) -> u64 {
        at.saturating_duration_since(self.epoch).as_nanos() as u64
    }

    /// An executor is done with a job (or abandoned it): one less in flight.
    fn free_slot(&self, queue: usize) {
        let q = &self.queues[queue];
        let mut counts = q.counts();
        counts.in_flight = counts.in_flight.saturating_sub(1);
        q.counts_cv.notify_one();
    }

    /// Results of `queue` are recorded: that many fewer unrecorded.
    fn recorded(&self, queue: usize, n: usize) {
        let q = &self.queues[queue];
        let mut counts = q.counts();
        counts.unrecorded = counts.unrecorded.saturating_sub(n);
        q.counts_cv.notify_one();
    }
}

/// A running pool of workers. Stop it with [`Worker::shutdown`]; dropping it
/// stops it too, with no grace period (running jobs are released at once).
pub struct Worker {
    shared: Arc<Shared>,
    fetchers: Vec<JoinHandle<()>>,
    keeper: Option<JoinHandle<()>>,
    completer: Option<JoinHandle<ShutdownReport>>,
    stop_tx: Option<Sender<()>>,
    listener: Option<JoinHandle<()>>,
}

impl Worker {
    /// Registers this process and starts its threads.
    pub fn start(
        store: Store,
        registry: Arc<Registry>,
        config: WorkerConfig,
    ) -> Result<Worker, store::Error> {
        install_panic_hook();
        let id = config.id.clone().unwrap_or_else(worker_id);
        let info = worker_info(&id, &config);
        store.worker_register(&info)?;

        let (results_tx, results_rx) = crossbeam_channel::unbounded();
        let (stop_tx, stop_rx) = crossbeam_channel::bounded::<()>(0);
        let mut senders = Vec::new();
        let queues = config
            .queues
            .iter()
            .map(|spec| {
                // Unbounded: the fetcher bounds what it claims.
                let (tx, rx) = crossbeam_channel::unbounded();
                senders.push(tx);
                Arc::new(QueueRunner {
                    spec: spec.clone(),
                    counts: Mutex::default(),
                    counts_cv: Condvar::new(),
                    run_ns: AtomicU64::new(1_000_000_000),
                    jobs_rx: rx,
                })
            })
            .collect();
        let shared = Arc::new(Shared {
            store,
            registry,
            config,
            id,
            queues,
            stopping: AtomicBool::new(false),
            held: Mutex::new(HashMap::new()),
            held_cv: Condvar::new(),
            keeper_cv: Condvar::new(),
            keeper_wake: AtomicU64::new(0),
            epoch: Instant::now(),
            keeper_stop: AtomicBool::new(false),
            results: results_tx,
        });

        let spawn_err =
            |e: std::io::Error| store::Error::Config(format!("cannot start a thread: {e}"));
        let mut fetchers = Vec::new();
        for (index, tx) in senders.into_iter().enumerate() {
            let spec = &shared.queues[index].spec;
            shared
                .config
                .metrics
                .threads(&spec.name, spec.concurrency as i64);
            for _ in 0..spec.concurrency {
                spawn_executor(&shared, index).map_err(spawn_err)?;
            }
            let s = shared.clone();
            fetchers.push(
                thread::Builder::new()
                    .name(format!("errand-fetch-{}", shared.queues[index].spec.name))
                    .spawn(move || fetch_loop(&s, index, tx))
                    .map_err(spawn_err)?,
            );
        }
        let s = shared.clone();
        let completer_stop = stop_rx.clone();
        let completer = thread::Builder::new()
            .name("errand-complete".into())
            .spawn(move || complete_loop(&s, results_rx, completer_stop))
            .map_err(spawn_err)?;
        let s = shared.clone();
        let keeper = thread::Builder::new()
            .name("errand-keeper".into())
            .spawn(move || keep_loop(&s))
            .map_err(spawn_err)?;
        let listener = match crate::store::parse_url(shared.store.url())? {
            crate::store::Location::Postgres(url) => {
                let s = shared.clone();
                Some(
                    thread::Builder::new()
                        .name("errand-listen".into())
                        .spawn(move || listen_loop(&s, &url, stop_rx))
                        .map_err(spawn_err)?,
                )
            }
            crate::store::Location::SqliteFile(_) => None,
        };
        info!(worker = %shared.id, queues = %info.queues, "worker started");
        Ok(Worker {
            shared,
            fetchers,
            keeper: Some(keeper),
            completer: Some(completer),
            stop_tx: Some(stop_tx),
            listener,
        })
    }

    /// This process's worker id (`host:pid:boot-id`), as stored in
    /// `locked_by` and `workers`.
    pub fn id(&self) -> &str {
        &self.shared.id
    }

    /// Jobs this process holds right now (claimed, running, or with a result
    /// not yet recorded).
    pub fn held(&self) -> usize {
        self.shared.held().len()
    }

    /// Stops claiming, lets running jobs finish for up to `grace` (less if
    /// `hurry` reaches [`Stage::Hurry`]), releases what is left without
    /// spending an attempt, and deregisters the process.
    pub fn shutdown(mut self, grace: Duration, hurry: &Shutdown) -> ShutdownReport {
        self.stop(grace, hurry)
    }

    fn stop(&mut self, grace: Duration, hurry: &Shutdown) -> ShutdownReport {
        if self.completer.is_none() {
            return ShutdownReport::default();
        }
        let shared = self.shared.clone();
        shared.stopping.store(true, Ordering::SeqCst);
        shared.store.wake().interrupt();
        for q in &shared.queues {
            q.counts_cv.notify_all();
        }
        // Fetchers exit and drop their senders; executors release whatever
        // was claimed but not started, finish what they run, and exit.
        for fetcher in self.fetchers.drain(..) {
            let _ = fetcher.join();
        }
        let deadline = Instant::now() + grace;
        {
            let mut held = shared.held();
            loop {
                let running = held
                    .values()
                    .filter(|h| h.status.load(Ordering::Acquire) == CLAIMED)
                    .count();
                let now = Instant::now();
                if running == 0 || now >= deadline || hurry.stage() >= Stage::Hurry {
                    if running > 0 {
                        info!(running, "grace period over: releasing unfinished jobs");
                    }
                    break;
                }
                // Short slices: a second signal must cut the drain short.
                let slice = (deadline - now).min(Duration::from_millis(50));
                held = shared
                    .held_cv
                    .wait_timeout(held, slice)
                    .unwrap_or_else(|e| e.into_inner())
                    .0;
            }
            for h in held.values() {
                if h.take(ABANDONED) {
                    let _ = shared.results.send(Finished::Released(h.clone()));
                }
            }
        }
        let _ = shared.results.send(Finished::Stop);
        let report = self
            .completer
            .take()
            .and_then(|c| c.join().ok())
            .unwrap_or_default();
        shared.keeper_stop.store(true, Ordering::SeqCst);
        {
            // Under the lock the keeper waits with, so the wake-up is not lost.
            let _held = shared.held();
            shared.keeper_cv.notify_all();
        }
        if let Some(keeper) = self.keeper.take() {
            let _ = keeper.join();
        }
        drop(self.stop_tx.take());
        if let Some(listener) = self.listener.take() {
            let _ = listener.join();
        }
        if let Err(e) = shared.store.worker_deregister(&shared.id) {
            warn!(error = %e, "could not deregister this worker; the leader will prune it");
        }
        info!(
            finished = report.finished,
            released = report.released,
            "worker stopped"
        );
        report
    }
}

impl Drop for Worker {
    fn drop(&mut self) {
        self.stop(Duration::ZERO, &Shutdown::new());
    }
}

fn spawn_executor(shared: &Arc<Shared>, queue: usize) -> std::io::Result<()> {
    let s = shared.clone();
    thread::Builder::new()
        .name(format!("errand-run-{}", shared.queues[queue].spec.name))
        .spawn(move || execute_loop(&s, queue))
        .map(drop)
}

/// Claims jobs for one queue whenever executors are idle or the buffer runs
/// low.
fn fetch_loop(shared: &Shared, index: usize, tx: Sender<Arc<Held>>) {
    let q = &shared.queues[index];
    let name = q.spec.name.as_str();
    let concurrency = q.spec.concurrency;
    let wake = shared.store.wake();
    let mut failures: u32 = 0;
    loop {
        let want = {
            let mut counts = q.counts();
            loop {
                if shared.stopping.load(Ordering::SeqCst) {
                    return;
                }
                // Refill when a thread is idle or half the buffer is gone,
                // unless a whole buffer's worth of results is still waiting
                // to be recorded.
                let full = concurrency + q.buffer_target(shared.config.max_buffer);
                let refill_below = concurrency + (full - concurrency) / 2;
                let unrecorded_cap = 2 * full;
                if counts.in_flight < refill_below && counts.unrecorded < unrecorded_cap {
                    break (full - counts.in_flight).min(unrecorded_cap - counts.unrecorded);
                }
                counts = q.counts_cv.wait(counts).unwrap_or_else(|e| e.into_inner());
            }
        };
        if shared.stopping.load(Ordering::SeqCst) {
            return;
        }
        let seen = wake.seen(name);
        let claimed_at = Instant::now();
        let pause = match shared.store.jobs_claim(name, &shared.id, want) {
            Ok(jobs) => {
                failures = 0;
                let got = jobs.len();
                if got > 0 {
                    {
                        let mut counts = q.counts();
                        counts.in_flight += got;
                        counts.unrecorded += got;
                    }
                    let mut held = shared.held();
                    let mut batch = Vec::with_capacity(got);
                    for job in jobs {
                        let timeout =
                            Duration::from_millis(u64::try_from(job.timeout_ms).unwrap_or(0));
                        let h = Arc::new(Held {
                            lease: job.lease(),
                            cancelled: Arc::new(AtomicBool::new(job.cancel_requested)),
                            queue: index,
                            claimed_at,
                            // Measured from before the claim, so the local
                            // deadline never falls after the database's.
                            deadline: claimed_at + timeout,
                            timeout,
                            status: AtomicU8::new(CLAIMED),
                            lost: AtomicBool::new(false),
                            job,
                        });
                        held.insert(h.lease.id, h.clone());
                        batch.push(h);
                    }
                    // The keeper looks again only if these time out before
                    // it meant to wake anyway.
                    let due = batch.iter().map(|h| h.deadline).min();
                    if due.is_some_and(|due| {
                        shared.since_epoch(due) < shared.keeper_wake.load(Ordering::Relaxed)
                    }) {
                        shared.keeper_cv.notify_one();
                    }
                    drop(held);
                    for item in batch {
                        if tx.send(item).is_err() {
                            return;
                        }
                    }
                }
                if got == want {
                    // The claim was filled: there may be more.
                    continue;
                }
                shared.config.poll_interval
            }
            Err(e) => {
                failures += 1;
                let pause = shared
                    .config
                    .poll_interval
                    .saturating_mul(1 << failures.min(5))
                    .min(Duration::from_secs(30));
                warn!(queue = name, error = %e, retry_in = ?pause, "claiming jobs failed");
                pause
            }
        };
        wake.wait(name, seen, pause);
    }
}

/// Runs the jobs the fetcher hands over until the channel closes.
fn execute_loop(shared: &Arc<Shared>, index: usize) {
    let rx = shared.queues[index].jobs_rx.clone();
    while let Ok(held) = rx.recv() {
        let result = if shared.stopping.load(Ordering::SeqCst) {
            // Claimed but not started when shutdown began: give it back now.
            Finished::Released(held.clone())
        } else if held.claimed_at.elapsed() > held.timeout / 2 {
            // Buffered behind jobs slower than the recent pace: starting it
            // now would leave it less than half its time.
            debug!(
                job = held.lease.id,
                "waited half its timeout in the buffer; released unrun"
            );
            Finished::Released(held.clone())
        } else {
            run_job(shared, &held)
        };
        if !held.take(FINISHED) {
            // The keeper timed this attempt out (and started a replacement
            // thread), or the drain released it: the result is not ours to
            // record, and this thread is surplus.
            debug!(
                job = held.lease.id,
                "abandoned attempt returned; its result is dropped"
            );
            return;
        }
        let _ = shared.results.send(result);
        shared.free_slot(index);
    }
}

/// Runs one job's handler and turns what it returns into a result.
fn run_job(shared: &Shared, held: &Arc<Held>) -> Finished {
    let job = &held.job;
    let metrics = &shared.config.metrics;
    // Claim-to-start: from when the job became claimable (database clock)
    // to now, through the claim.
    let waited_ms = job.started_at.unwrap_or(job.run_at) - job.run_at;
    let started = Instant::now();
    metrics.started(
        &job.queue,
        waited_ms as f64 / 1000.0 + (started - held.claimed_at).as_secs_f64(),
    );
    let ctx = JobContext::new(job, held.deadline, held.cancelled.clone());
    let ran = panic::catch_unwind(AssertUnwindSafe(|| {
        IN_JOB.set(true);
        let outcome = shared.registry.run(&job.kind, &job.args, &ctx);
        IN_JOB.set(false);
        outcome
    }));
    IN_JOB.set(false);
    let took = started.elapsed();
    shared.queues[held.queue].ran_for(took);
    metrics.ran(&job.queue, &job.kind, took.as_secs_f64());
    let detail = ctx.take_detail();
    let retry = |outcome: AttemptOutcome, error: String| {
        let mut failure = failure(shared, job, outcome, error);
        failure.detail = detail.clone();
        Finished::Failed(held.clone(), failure)
    };
    match ran {
        Ok(Some(Outcome::Done)) => Finished::Done(held.clone(), detail),
        Ok(Some(Outcome::Retry(error))) => retry(AttemptOutcome::Error, error),
        Ok(Some(Outcome::Dead(error))) => Finished::Failed(
            held.clone(),
            Failure {
                outcome: AttemptOutcome::Error,
                error,
                retry_in: None,
                detail,
            },
        ),
        Ok(Some(Outcome::Snooze(delay))) => Finished::Snoozed(held.clone(), delay, detail),
        // A kind this process does not know may be known to a newer version
        // of the code rolling out: retry rather than bury it.
        Ok(None) => retry(
            AttemptOutcome::Error,
            format!(
                "{} (worker {})",
                shared.registry.unknown(&job.kind),
                shared.id
            ),
        ),
        Err(payload) => {
            let detail = PANIC_DETAIL
                .take()
                .unwrap_or_else(|| format!("panicked: {}", panic_message(payload.as_ref())));
            warn!(job = job.id, kind = %job.kind, "handler panicked: {}", panic_message(payload.as_ref()));
            retry(AttemptOutcome::Panic, detail)
        }
    }
}

/// A failed attempt that will be retried after the kind's backoff, or go to
/// `dead` if it was the last one.
fn failure(shared: &Shared, job: &Job, outcome: AttemptOutcome, error: String) -> Failure {
    let backoff = shared
        .registry
        .options(&job.kind)
        .and_then(|o| o.backoff)
        .unwrap_or(shared.config.backoff);
    Failure {
        outcome,
        error,
        retry_in: (job.attempt < job.max_attempts).then(|| backoff.delay(job.attempt)),
        detail: None,
    }
}

/// Records results in batches until told to stop. Returns how many jobs it
/// recorded as finished and as released.
fn complete_loop(shared: &Shared, rx: Receiver<Finished>, stop: Receiver<()>) -> ShutdownReport {
    let mut report = ShutdownReport::default();
    let mut pending: Vec<Finished> = Vec::new();
    let mut stopping = false;
    // Once shutdown asks for the last results, a database outage is waited
    // out this long; after that the unrecorded jobs are left to the rescuer.
    let mut give_up_at = None;
    let mut failures: u32 = 0;
    loop {
        if pending.is_empty() {
            if stopping {
                return report;
            }
            match rx.recv() {
                Ok(f) => pending.push(f),
                Err(_) => return report,
            }
        }
        // Everything that arrived meanwhile goes in the same batch.
        while pending.len() < 1000 {
            match rx.try_recv() {
                Ok(f) => pending.push(f),
                Err(_) => break,
            }
        }
        if let Some(at) = pending.iter().position(|f| matches!(f, Finished::Stop)) {
            pending.remove(at);
            stopping = true;
            give_up_at = Some(Instant::now() + Duration::from_secs(10));
        }
        match record(shared, &pending, &mut report) {
            Ok(()) => {
                failures = 0;
                let mut per_queue = vec![0; shared.queues.len()];
                let mut held = shared.held();
                for f in pending.drain(..) {
                    if let Some(h) = f.held() {
                        held.remove(&h.lease.id);
                        per_queue[h.queue] += 1;
                    }
                }
                drop(held);
                for (queue, n) in per_queue.into_iter().enumerate() {
                    if n > 0 {
                        shared.recorded(queue, n);
                    }
                }
                if shared.stopping.load(Ordering::Relaxed) {
                    shared.held_cv.notify_all();
                }
            }
            Err(e) => {
                if give_up_at.is_some_and(|at| Instant::now() >= at) {
                    warn!(
                        error = %e,
                        pending = pending.len(),
                        "giving up on unrecorded results at shutdown: the leader will rescue \
                         their jobs once their heartbeats go stale"
                    );
                    return report;
                }
                failures += 1;
                let pause = Duration::from_millis(100 * (1 << failures.min(5)));
                warn!(error = %e, pending = pending.len(), retry_in = ?pause, "recording job results failed; will retry");
                // A pause, not a sleep: `stop` never carries a message.
                let _ = stop.recv_timeout(pause);
            }
        }
    }
}

/// Writes a batch of results: completions in one statement, the rest one by
/// one (failures carry per-job errors and delays).
fn record(shared: &Shared, batch: &[Finished], report: &mut ShutdownReport) -> store::Result<()> {
    let store = &shared.store;
    let metrics = &shared.config.metrics;
    // Plain successes in one statement; those that recorded something
    // (HTTP and email kinds) in another, with their attempt rows.
    let mut done: Vec<&Arc<Held>> = Vec::new();
    let mut recorded: Vec<&Arc<Held>> = Vec::new();
    let mut details: Vec<CompletedDetail> = Vec::new();
    for f in batch {
        match f {
            Finished::Done(h, None) => done.push(h),
            Finished::Done(h, Some(detail)) => {
                recorded.push(h);
                details.push(CompletedDetail {
                    lease: h.lease,
                    attempt: h.job.attempt,
                    worker: shared.id.clone(),
                    started_at: h.job.started_at.unwrap_or_default(),
                    detail: detail.clone(),
                });
            }
            _ => {}
        }
    }
    for (held, completed) in [
        (&done, {
            let leases: Vec<Lease> = done.iter().map(|h| h.lease).collect();
            store.jobs_complete(&leases)?
        }),
        (&recorded, store.jobs_complete_recorded(&details)?),
    ] {
        report.finished += completed.len();
        for h in held.iter() {
            metrics.completed(&h.job.queue);
        }
        if completed.len() < held.len() {
            lost(shared, held.len() - completed.len(), "completion");
        }
    }
    let mut released = Vec::new();
    for f in batch {
        match f {
            Finished::Failed(h, failure) => match store.job_fail(h.lease, failure)? {
                Some(state) => {
                    report.finished += 1;
                    metrics.failed(&h.job.queue, state == JobState::Dead);
                    debug!(job = h.lease.id, %state, error = %failure.error, "attempt failed");
                }
                None => lost(shared, 1, "failure"),
            },
            // A snooze that says why (an HTTP 429) is kept as a row; one
            // asked for again and again (a receiver that always answers
            // 429) would loop forever and pile up rows: the last of
            // `MAX_SNOOZES` spends the attempt instead.
            Finished::Snoozed(h, _, Some(detail))
                if store.attempt_snoozes(h.lease.id, h.job.attempt)? + 1 >= MAX_SNOOZES =>
            {
                let mut failure = failure(
                    shared,
                    &h.job,
                    AttemptOutcome::Error,
                    format!(
                        "asked to wait {MAX_SNOOZES} times in a row on attempt {}: counted as \
                         a failed attempt (the target keeps refusing: see the snoozed attempts)",
                        h.job.attempt
                    ),
                );
                failure.detail = Some(detail.clone());
                match store.job_fail(h.lease, &failure)? {
                    Some(state) => {
                        report.finished += 1;
                        metrics.failed(&h.job.queue, state == JobState::Dead);
                    }
                    None => lost(shared, 1, "failure"),
                }
            }
            Finished::Snoozed(h, delay, detail) => {
                if !store.job_snooze_recorded(h.lease, *delay, detail.as_deref())? {
                    lost(shared, 1, "snooze");
                }
            }
            Finished::Released(h) => released.push(h.lease),
            Finished::Done(..) | Finished::Stop => {}
        }
    }
    report.released += store.jobs_release(&released)?;
    Ok(())
}

fn lost(shared: &Shared, n: usize, what: &str) {
    warn!(
        worker = %shared.id,
        jobs = n,
        "{what} not recorded: the lease was lost (the job was rescued by the leader \
         after missed heartbeats, or deleted)"
    );
}

/// Heartbeats held jobs and this process, passes cancel requests on, and
/// times out overrunning attempts.
fn keep_loop(shared: &Arc<Shared>) {
    let interval = shared.config.heartbeat_interval;
    let mut next_beat = Instant::now() + interval;
    loop {
        let overdue: Vec<Arc<Held>> = {
            let mut held = shared.held();
            loop {
                if shared.keeper_stop.load(Ordering::SeqCst) {
                    return;
                }
                let now = Instant::now();
                let earliest = held
                    .values()
                    .filter(|h| h.status.load(Ordering::Acquire) == CLAIMED)
                    .map(|h| h.deadline)
                    .min();
                let wake_at = earliest.map_or(next_beat, |d| d.min(next_beat));
                if now >= wake_at {
                    break;
                }
                shared
                    .keeper_wake
                    .store(shared.since_epoch(wake_at), Ordering::Relaxed);
                held = shared
                    .keeper_cv
                    .wait_timeout(held, wake_at - now)
                    .unwrap_or_else(|e| e.into_inner())
                    .0;
            }
            let now = Instant::now();
            held.values()
                .filter(|h| h.deadline <= now && h.status.load(Ordering::Acquire) == CLAIMED)
                .cloned()
                .collect()
        };
        for h in overdue {
            if !h.take(ABANDONED) {
                continue;
            }
            let error = format!(
                "timed out: still running after its timeout of {}; the attempt was abandoned \
                 (raise the job's or the kind's timeout if it needs longer)",
                humantime::format_duration(h.timeout)
            );
            warn!(job = h.lease.id, "{error}");
            let failure = failure(shared, &h.job, AttemptOutcome::Timeout, error);
            let _ = shared.results.send(Finished::Failed(h.clone(), failure));
            h.cancelled.store(true, Ordering::Relaxed);
            // The stuck thread keeps its slot until it returns; a new one
            // takes over its share of the work.
            shared.free_slot(h.queue);
            if let Err(e) = spawn_executor(shared, h.queue) {
                warn!(error = %e, "could not start a replacement worker thread");
            }
        }
        if Instant::now() >= next_beat {
            heartbeat(shared);
            next_beat = Instant::now() + interval;
        }
    }
}

fn heartbeat(shared: &Shared) {
    let held: Vec<Arc<Held>> = shared.held().values().cloned().collect();
    let leases: Vec<Lease> = held.iter().map(|h| h.lease).collect();
    match shared.store.jobs_heartbeat(&leases) {
        Ok(alive) => {
            let alive: HashMap<i64, bool> = alive.into_iter().collect();
            for h in &held {
                match alive.get(&h.lease.id) {
                    Some(true) => h.cancelled.store(true, Ordering::Relaxed),
                    Some(false) => {}
                    // Finished here meanwhile: its result is recorded (the
                    // completer reports a lease lost when it records it).
                    None if h.status.load(Ordering::Acquire) != CLAIMED => {}
                    None => {
                        // Someone else may run it now: tell the handler to stop.
                        h.cancelled.store(true, Ordering::Relaxed);
                        if !h.lost.swap(true, Ordering::Relaxed) {
                            warn!(
                                job = h.lease.id,
                                "lease lost while running (rescued or deleted)"
                            );
                        }
                    }
                }
            }
        }
        Err(e) => warn!(error = %e, jobs = leases.len(), "heartbeat failed; will retry"),
    }
    match shared.store.worker_heartbeat(&shared.id) {
        Ok(true) => {}
        Ok(false) => {
            // Pruned as stale (e.g. the process was suspended): come back.
            warn!(worker = %shared.id, "this worker's registration was pruned; registering again");
            let info = worker_info(&shared.id, &shared.config);
            if let Err(e) = shared.store.worker_register(&info) {
                warn!(error = %e, "registering again failed");
            }
        }
        Err(e) => warn!(error = %e, "worker heartbeat failed"),
    }
}

/// This process's row in `workers`.
fn worker_info(id: &str, config: &WorkerConfig) -> WorkerInfo {
    let concurrency: usize = config.queues.iter().map(|q| q.concurrency).sum();
    WorkerInfo {
        id: id.to_string(),
        host: gethostname::gethostname().to_string_lossy().into_owned(),
        pid: i32::try_from(std::process::id()).unwrap_or(i32::MAX),
        queues: config
            .queues
            .iter()
            .map(|q| format!("{}={}", q.name, q.concurrency))
            .collect::<Vec<_>>()
            .join(","),
        concurrency: i32::try_from(concurrency).unwrap_or(i32::MAX),
        version: env!("CARGO_PKG_VERSION").to_string(),
        // The store sets both from the database clock.
        started_at: 0,
        heartbeat_at: 0,
    }
}

/// PostgreSQL: turns `NOTIFY errand_jobs` from any process into wake-ups.
fn listen_loop(shared: &Shared, url: &str, stop: Receiver<()>) {
    let mut failures: u32 = 0;
    while !shared.stopping.load(Ordering::SeqCst) {
        match listen(shared, url) {
            Ok(()) => return,
            Err(e) => {
                failures += 1;
                let pause = Duration::from_millis(250 * (1 << failures.min(7)));
                warn!(error = %e, retry_in = ?pause, "LISTEN connection failed; polling meanwhile");
                if let Err(RecvTimeoutError::Disconnected) = stop.recv_timeout(pause) {
                    return;
                }
            }
        }
    }
}

fn listen(shared: &Shared, url: &str) -> Result<(), postgres::Error> {
    let mut client = postgres::Client::connect(url, postgres::NoTls)?;
    client.batch_execute(&format!("LISTEN {}", crate::store::NOTIFY_CHANNEL))?;
    debug!("listening for new jobs");
    let wake = shared.store.wake();
    // Jobs announced while we were not yet (or no longer) listening would
    // otherwise wait for the next poll: look now.
    wake.interrupt();
    while !shared.stopping.load(Ordering::SeqCst) {
        let mut notifications = client.notifications();
        let mut arrived = notifications.timeout_iter(Duration::from_millis(500));
        while let Some(n) = arrived.next()? {
            wake.notify(n.payload());
        }
    }
    Ok(())
}

thread_local! {
    /// Set while a handler runs on this thread, so the panic hook knows to
    /// keep the details for the attempt record.
    static IN_JOB: Cell<bool> = const { Cell::new(false) };
    static PANIC_DETAIL: RefCell<Option<String>> = const { RefCell::new(None) };
}

/// Keeps a handler's panic message, location and backtrace for its attempt
/// record; panics elsewhere go to the previous hook as before.
fn install_panic_hook() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        let previous = panic::take_hook();
        panic::set_hook(Box::new(move |info| {
            if IN_JOB.get() {
                let location = info
                    .location()
                    .map(|l| format!(" at {}:{}", l.file(), l.line()))
                    .unwrap_or_default();
                let detail = format!(
                    "panicked{location}: {}\n\nbacktrace:\n{}",
                    panic_message(info.payload()),
                    Backtrace::force_capture()
                );
                PANIC_DETAIL.set(Some(detail));
            } else {
                previous(info);
            }
        }));
    });
}

fn panic_message(payload: &(dyn Any + Send)) -> String {
    if let Some(s) = payload.downcast_ref::<&str>() {
        (*s).to_string()
    } else if let Some(s) = payload.downcast_ref::<String>() {
        s.clone()
    } else {
        "(a non-string panic payload)".to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn queue_specs_parse_with_clear_errors() {
        assert_eq!(
            parse_queues("default=8, mail=2,solo").unwrap(),
            vec![
                QueueSpec {
                    name: "default".into(),
                    concurrency: 8
                },
                QueueSpec {
                    name: "mail".into(),
                    concurrency: 2
                },
                QueueSpec {
                    name: "solo".into(),
                    concurrency: 1
                },
            ]
        );
        assert!(parse_queues("a=x").unwrap_err().contains("whole number"));
        assert!(
            parse_queues("a=0")
                .unwrap_err()
                .contains("between 1 and 1024")
        );
        assert!(parse_queues("a=1,a=2").unwrap_err().contains("twice"));
        assert!(parse_queues(" , ").unwrap_err().contains("no queues"));
    }
}
