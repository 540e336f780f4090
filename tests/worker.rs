//! Workers in this process: each job runs once, failures become attempts and
//! dead letters, bad input and panics are recorded while work goes on,
//! timeouts, cancellation, wake-ups and graceful shutdown — on both backends.

mod common;

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::{TestDb, wait_for};
use crossbeam_channel::{Receiver, Sender};
use errand::shutdown::Shutdown;
use errand::store::{AttemptOutcome, JobState, NewJob, Store};
use errand::worker::{QueueSpec, Worker, WorkerConfig};
use errand::{Backoff, Outcome, Registry};
use serde::Deserialize;
use serde_json::{Value, json};

const WAIT: Duration = Duration::from_secs(20);

fn config(concurrency: usize) -> WorkerConfig {
    WorkerConfig {
        queues: vec![QueueSpec {
            name: "default".into(),
            concurrency,
        }],
        poll_interval: Duration::from_millis(50),
        heartbeat_interval: Duration::from_millis(100),
        backoff: Backoff::Fixed(Duration::ZERO),
        ..WorkerConfig::default()
    }
}

fn start(store: &Store, registry: Registry, config: WorkerConfig) -> Worker {
    Worker::start(store.clone(), Arc::new(registry), config).expect("worker starts")
}

fn stop(worker: Worker) {
    worker.shutdown(Duration::from_secs(5), &Shutdown::new());
}

fn wait_state(store: &Store, id: i64, state: JobState) -> errand::Job {
    common::wait_state(store, id, state, WAIT)
}

fn enqueue(store: &Store, job: NewJob) -> i64 {
    store.job_enqueue(&job).unwrap().id
}

fn every_job_runs_exactly_once_across_workers(db: &TestDb) {
    let runs: Arc<Mutex<HashMap<i64, usize>>> = Arc::default();
    let registry = || {
        let runs = runs.clone();
        let mut r = Registry::new();
        r.register_fn("count", move |_: Value, job: &errand::JobContext| {
            *runs.lock().unwrap().entry(job.id).or_default() += 1;
            Outcome::Done
        });
        r
    };
    let jobs: Vec<NewJob> = (0..300)
        .map(|i| NewJob::new("count", json!({"i": i})))
        .collect();
    db.store.jobs_enqueue(&jobs).unwrap();
    // Two workers with separate pools, as two processes would have.
    let a = start(&db.store, registry(), config(4));
    let b = start(&db.other_store(), registry(), config(4));
    wait_for("all 300 jobs to run", WAIT, || {
        (runs.lock().unwrap().len() == 300).then_some(())
    });
    wait_for("all 300 completions to be recorded", WAIT, || {
        let counts = db.store.jobs_count().unwrap();
        (counts.iter().all(|c| c.state == JobState::Completed)).then_some(())
    });
    stop(a);
    stop(b);
    assert!(
        runs.lock().unwrap().values().all(|&n| n == 1),
        "a job ran twice"
    );
    let ids: Vec<i64> = runs.lock().unwrap().keys().copied().collect();
    for id in ids.iter().take(20) {
        let attempts = db.store.job_attempts(*id).unwrap();
        assert_eq!(attempts.len(), 1);
        assert_eq!(attempts[0].outcome, AttemptOutcome::Completed);
    }
}

fn a_job_that_keeps_failing_is_dead_after_max_attempts_and_can_be_replayed(db: &TestDb) {
    let fixed = Arc::new(AtomicBool::new(false));
    let mut registry = Registry::new();
    let f = fixed.clone();
    registry.register_fn("flaky", move |_: Value, job: &errand::JobContext| {
        if f.load(Ordering::SeqCst) {
            Outcome::Done
        } else {
            Outcome::Retry(format!("upstream said no on attempt {}", job.attempt))
        }
    });
    let worker = start(&db.store, registry, config(2));
    let id = enqueue(&db.store, NewJob::new("flaky", json!({})).max_attempts(3));
    let dead = wait_state(&db.store, id, JobState::Dead);
    assert_eq!(dead.attempt, 3);
    let attempts = db.store.job_attempts(id).unwrap();
    let errors: Vec<_> = attempts.iter().map(|a| a.error.clone().unwrap()).collect();
    assert_eq!(
        errors,
        (1..=3)
            .map(|n| format!("upstream said no on attempt {n}"))
            .collect::<Vec<_>>()
    );
    assert!(attempts.iter().all(|a| a.outcome == AttemptOutcome::Error));
    fixed.store(true, Ordering::SeqCst);
    db.store.job_retry(id).unwrap();
    let done = wait_state(&db.store, id, JobState::Completed);
    assert_eq!(done.attempt, 4);
    assert_eq!(db.store.job_attempts(id).unwrap().len(), 4);
    stop(worker);
}

#[derive(Deserialize)]
struct Typed {
    #[allow(dead_code)]
    count: u32,
}

fn bad_input_and_panics_are_recorded_while_work_goes_on(db: &TestDb) {
    let mut registry = Registry::new();
    registry.register_fn("typed", |_: Typed, _: &errand::JobContext| Outcome::Done);
    registry.register_fn("explode", |_: Value, _: &errand::JobContext| -> Outcome {
        panic!("the handler exploded")
    });
    registry.register_fn("noop", |_: Value, _: &errand::JobContext| Outcome::Done);
    // One thread: later jobs only run if that thread survived the earlier ones.
    let worker = start(&db.store, registry, config(1));
    let undecodable = enqueue(
        &db.store,
        NewJob::new("typed", json!({"count": "many"})).priority(1),
    );
    let unknown = enqueue(
        &db.store,
        NewJob::new("who-knows", json!({}))
            .priority(2)
            .max_attempts(1),
    );
    let panics = enqueue(
        &db.store,
        NewJob::new("explode", json!({}))
            .priority(3)
            .max_attempts(2),
    );
    let fine = enqueue(&db.store, NewJob::new("noop", json!({})).priority(4));
    wait_state(&db.store, fine, JobState::Completed);

    let bad = wait_state(&db.store, undecodable, JobState::Dead);
    assert_eq!(bad.attempt, 1, "undecodable args are not retried");
    assert!(
        bad.last_error
            .unwrap()
            .contains("args do not decode for kind 'typed'")
    );

    wait_state(&db.store, unknown, JobState::Dead);
    let a = db.store.job_attempts(unknown).unwrap();
    assert!(
        a[0].error
            .as_deref()
            .unwrap()
            .contains("unknown job kind 'who-knows'")
    );

    let p = wait_state(&db.store, panics, JobState::Dead);
    assert_eq!(p.attempt, 2, "a panic is retried like an error");
    let a = db.store.job_attempts(panics).unwrap();
    assert!(a.iter().all(|a| a.outcome == AttemptOutcome::Panic));
    let detail = a[0].error.as_deref().unwrap();
    assert!(detail.contains("the handler exploded"), "{detail}");
    assert!(
        detail.contains("tests/worker.rs"),
        "the panic location is kept: {detail}"
    );
    stop(worker);
}

fn an_overrunning_attempt_times_out_without_costing_a_thread(db: &TestDb) {
    let (release_tx, release_rx): (Sender<()>, Receiver<()>) = crossbeam_channel::unbounded();
    let mut registry = Registry::new();
    registry
        .register_fn("hang", move |_: Value, _: &errand::JobContext| {
            // Ignores cancellation: only the test lets it go.
            let _ = release_rx.recv();
            Outcome::Done
        })
        .timeout(Duration::from_millis(300));
    registry.register_fn("noop", |_: Value, _: &errand::JobContext| Outcome::Done);
    // The kind's timeout applies to jobs prepared by its registry.
    let job = registry
        .prepare(NewJob::new("hang", json!({})).max_attempts(1))
        .unwrap();
    assert_eq!(job.timeout, Some(Duration::from_millis(300)));
    let worker = start(&db.store, registry, config(1));
    let hung = enqueue(&db.store, job);
    wait_state(&db.store, hung, JobState::Dead);
    let a = db.store.job_attempts(hung).unwrap();
    assert_eq!(a.len(), 1);
    assert_eq!(a[0].outcome, AttemptOutcome::Timeout);
    assert!(a[0].error.as_deref().unwrap().contains("timed out"));
    // The only thread is stuck, yet work goes on: a replacement took over.
    let next = enqueue(&db.store, NewJob::new("noop", json!({})));
    wait_state(&db.store, next, JobState::Completed);
    // The stuck handler returns at last: its result is dropped.
    release_tx.send(()).unwrap();
    stop(worker);
    assert_eq!(
        db.store.job_get(hung).unwrap().unwrap().state,
        JobState::Dead
    );
    assert_eq!(db.store.job_attempts(hung).unwrap().len(), 1);
}

fn a_running_job_sees_its_cancel_and_ends_cancelled(db: &TestDb) {
    let started = Arc::new(AtomicBool::new(false));
    let mut registry = Registry::new();
    let s = started.clone();
    registry.register_fn("patient", move |_: Value, job: &errand::JobContext| {
        s.store(true, Ordering::SeqCst);
        while !job.is_cancelled() {
            std::thread::sleep(Duration::from_millis(5));
        }
        Outcome::Retry("stopped: cancelled".into())
    });
    let worker = start(&db.store, registry, config(1));
    let id = enqueue(&db.store, NewJob::new("patient", json!({})));
    wait_for("the job to start", WAIT, || {
        started.load(Ordering::SeqCst).then_some(())
    });
    assert_eq!(
        db.store.job_cancel(id).unwrap(),
        errand::store::Transition::Applied(JobState::Running)
    );
    let j = wait_state(&db.store, id, JobState::Cancelled);
    assert!(j.finished_at.is_some());
    stop(worker);
}

fn snoozed_jobs_wait_without_spending_an_attempt(db: &TestDb) {
    let runs = Arc::new(AtomicUsize::new(0));
    let mut registry = Registry::new();
    let r = runs.clone();
    registry.register_fn("later", move |_: Value, _: &errand::JobContext| {
        if r.fetch_add(1, Ordering::SeqCst) == 0 {
            Outcome::Snooze(Duration::from_millis(200))
        } else {
            Outcome::Done
        }
    });
    let worker = start(&db.store, registry, config(1));
    let id = enqueue(&db.store, NewJob::new("later", json!({})));
    let j = wait_state(&db.store, id, JobState::Completed);
    assert_eq!(runs.load(Ordering::SeqCst), 2);
    assert_eq!(j.attempt, 1, "the snoozed run did not count");
    assert_eq!(db.store.job_attempts(id).unwrap().len(), 1);
    stop(worker);
}

fn priorities_order_the_work_and_scheduled_jobs_wait_their_turn(db: &TestDb) {
    let order: Arc<Mutex<Vec<i64>>> = Arc::default();
    let mut registry = Registry::new();
    let o = order.clone();
    registry.register_fn("record", move |_: Value, job: &errand::JobContext| {
        o.lock().unwrap().push(job.id);
        Outcome::Done
    });
    let now = db.store.now_ms().unwrap();
    let scheduled = enqueue(
        &db.store,
        NewJob::new("record", json!({})).run_at(now + 400),
    );
    let low = enqueue(&db.store, NewJob::new("record", json!({})).priority(10));
    let high = enqueue(&db.store, NewJob::new("record", json!({})).priority(-10));
    let worker = start(&db.store, registry, config(1));
    let s = wait_state(&db.store, scheduled, JobState::Completed);
    assert!(
        s.started_at.unwrap() >= now + 400,
        "claimed before its run_at"
    );
    assert_eq!(*order.lock().unwrap(), vec![high, low, scheduled]);
    stop(worker);
}

fn a_new_job_wakes_an_idle_worker_without_waiting_for_the_poll(db: &TestDb) {
    let mut registry = Registry::new();
    registry.register_fn("noop", |_: Value, _: &errand::JobContext| Outcome::Done);
    let slow_poll = WorkerConfig {
        poll_interval: Duration::from_secs(600),
        ..config(1)
    };
    let worker = start(&db.store, registry, slow_poll);
    // On SQLite the wake-up is in-process; on PostgreSQL this enqueue comes
    // through another pool, so only LISTEN/NOTIFY can wake the worker.
    let producer = match db.backend {
        common::Backend::Sqlite => db.store.clone(),
        common::Backend::Postgres => db.other_store(),
    };
    for _ in 0..3 {
        let id = enqueue(&producer, NewJob::new("noop", json!({})));
        wait_state(&db.store, id, JobState::Completed);
    }
    stop(worker);
}

fn graceful_shutdown_releases_unfinished_jobs_without_spending_an_attempt(db: &TestDb) {
    let started = Arc::new(AtomicUsize::new(0));
    let (release_tx, release_rx) = crossbeam_channel::unbounded::<()>();
    let mut registry = Registry::new();
    let s = started.clone();
    registry.register_fn("block", move |_: Value, _: &errand::JobContext| {
        s.fetch_add(1, Ordering::SeqCst);
        let _ = release_rx.recv();
        Outcome::Done
    });
    let s = started.clone();
    registry.register_fn("quick", move |_: Value, _: &errand::JobContext| {
        s.fetch_add(1, Ordering::SeqCst);
        std::thread::sleep(Duration::from_millis(100));
        Outcome::Done
    });
    let worker = start(&db.store, registry, config(2));
    let blocked = enqueue(&db.store, NewJob::new("block", json!({})));
    wait_for("the blocking job to start", WAIT, || {
        (started.load(Ordering::SeqCst) == 1).then_some(())
    });
    let quick = enqueue(&db.store, NewJob::new("quick", json!({})));
    wait_for("the quick job to start", WAIT, || {
        (started.load(Ordering::SeqCst) == 2).then_some(())
    });
    let report = worker.shutdown(Duration::from_millis(800), &Shutdown::new());
    assert_eq!(report.released, 1, "{report:?}");
    assert_eq!(
        db.store.job_get(quick).unwrap().unwrap().state,
        JobState::Completed,
        "finished within grace"
    );
    let j = db.store.job_get(blocked).unwrap().unwrap();
    assert_eq!(
        (j.state, j.attempt),
        (JobState::Queued, 0),
        "released, attempt not spent"
    );
    assert!(j.locked_by.is_none());
    assert!(db.store.job_attempts(blocked).unwrap().is_empty());
    assert!(db.store.workers_list().unwrap().is_empty(), "deregistered");
    drop(release_tx);
}

fn a_second_signal_cuts_the_drain_short(db: &TestDb) {
    let started = Arc::new(AtomicBool::new(false));
    let (_keep, release_rx) = crossbeam_channel::unbounded::<()>();
    let mut registry = Registry::new();
    let s = started.clone();
    registry.register_fn("block", move |_: Value, _: &errand::JobContext| {
        s.store(true, Ordering::SeqCst);
        let _ = release_rx.recv();
        Outcome::Done
    });
    let worker = start(&db.store, registry, config(1));
    let id = enqueue(&db.store, NewJob::new("block", json!({})));
    wait_for("the job to start", WAIT, || {
        started.load(Ordering::SeqCst).then_some(())
    });
    let shutdown = Shutdown::new();
    shutdown.request();
    shutdown.request();
    // A grace period far longer than the test's wait: only the hurry ends it.
    let report = worker.shutdown(Duration::from_secs(3600), &shutdown);
    assert_eq!(report.released, 1);
    assert_eq!(
        db.store.job_get(id).unwrap().unwrap().state,
        JobState::Queued
    );
}

/// Runs `n` no-op jobs so that the queue has seen its jobs are fast.
fn warm_up(store: &Store, n: usize) {
    let jobs = vec![NewJob::new("noop", json!({})); n];
    let ids: Vec<i64> = store
        .jobs_enqueue(&jobs)
        .unwrap()
        .iter()
        .map(|e| e.id)
        .collect();
    for id in ids {
        wait_state(store, id, JobState::Completed);
    }
}

fn running_count(store: &Store) -> i64 {
    store
        .jobs_count()
        .unwrap()
        .iter()
        .filter(|c| c.state == JobState::Running)
        .map(|c| c.count)
        .sum()
}

fn slow_jobs_are_claimed_only_for_idle_threads(db: &TestDb) {
    let (started_tx, started_rx) = crossbeam_channel::unbounded();
    let (go_tx, go_rx): (Sender<()>, Receiver<()>) = crossbeam_channel::unbounded();
    let mut registry = Registry::new();
    registry.register_fn("gate", move |_: Value, _: &errand::JobContext| {
        started_tx.send(()).unwrap();
        go_rx.recv().unwrap();
        Outcome::Done
    });
    let ids: Vec<i64> = (0..6)
        .map(|_| enqueue(&db.store, NewJob::new("gate", json!({}))))
        .collect();
    let worker = start(&db.store, registry, config(2));
    for _ in 0..2 {
        started_rx.recv_timeout(WAIT).unwrap();
    }
    // A queue that has not seen fast jobs claims for its idle threads only:
    // the other four stay claimable by other processes.
    assert_eq!(running_count(&db.store), 2);
    for _ in 0..6 {
        go_tx.send(()).unwrap();
    }
    for id in ids {
        wait_state(&db.store, id, JobState::Completed);
    }
    stop(worker);
}

fn fast_jobs_are_claimed_in_batches_beyond_idle_threads(db: &TestDb) {
    let (started_tx, started_rx) = crossbeam_channel::unbounded();
    let (go_tx, go_rx): (Sender<()>, Receiver<()>) = crossbeam_channel::unbounded();
    let mut registry = Registry::new();
    registry.register_fn("noop", |_: Value, _: &errand::JobContext| Outcome::Done);
    registry.register_fn("gate", move |_: Value, _: &errand::JobContext| {
        started_tx.send(()).unwrap();
        go_rx.recv().unwrap();
        Outcome::Done
    });
    let worker = start(&db.store, registry, config(1));
    warm_up(&db.store, 300);
    let jobs = vec![NewJob::new("gate", json!({})); 50];
    let ids: Vec<i64> = db
        .store
        .jobs_enqueue(&jobs)
        .unwrap()
        .iter()
        .map(|e| e.id)
        .collect();
    started_rx.recv_timeout(WAIT).unwrap();
    // One thread, and all fifty claimed in one go: they wait in the buffer.
    assert_eq!(running_count(&db.store), 50);
    for _ in 0..50 {
        go_tx.send(()).unwrap();
    }
    for id in ids {
        wait_state(&db.store, id, JobState::Completed);
    }
    stop(worker);
}

fn a_job_buffered_too_long_is_released_not_started_short_of_time(db: &TestDb) {
    let mut registry = Registry::new();
    registry.register_fn("noop", |_: Value, _: &errand::JobContext| Outcome::Done);
    registry.register_fn("slow", |_: Value, _: &errand::JobContext| {
        // The handler's own work, not the test waiting: it runs 600 ms of its
        // 1 s timeout, so the jobs buffered behind it wait past half theirs.
        std::thread::sleep(Duration::from_millis(600));
        Outcome::Done
    });
    let worker = start(&db.store, registry, config(1));
    warm_up(&db.store, 300);
    let slow = NewJob::new("slow", json!({})).timeout(Duration::from_secs(1));
    let ids: Vec<i64> = db
        .store
        .jobs_enqueue(&[slow.clone(), slow.clone(), slow])
        .unwrap()
        .iter()
        .map(|e| e.id)
        .collect();
    let done: Vec<errand::Job> = ids
        .iter()
        .map(|&id| wait_state(&db.store, id, JobState::Completed))
        .collect();
    stop(worker);
    // The first ran at once; the second waited in the buffer for 600 ms,
    // more than half its timeout, so it went back to its queue unrun (no
    // attempt spent) and was claimed again, with its full time.
    assert_eq!(done[0].lease_id, 1);
    assert!(done[1].lease_id >= 2, "lease {}", done[1].lease_id);
    for job in &done {
        assert_eq!(job.attempt, 1);
        let attempts = db.store.job_attempts(job.id).unwrap();
        assert_eq!(attempts.len(), 1, "{attempts:?}");
        assert_eq!(attempts[0].outcome, AttemptOutcome::Completed);
    }
}

/// What a handler records stays with its attempt, whatever the outcome; a
/// snooze that says why leaves a `snoozed` row and spends no attempt; a plain
/// success still writes no row of its own.
fn what_an_attempt_records_is_kept_with_it(db: &TestDb) {
    let mut registry = Registry::new();
    registry.register_fn("noted", |args: Value, job: &errand::JobContext| {
        job.record(json!({"status": args["status"], "said": "<b>hi</b>"}));
        match args["status"].as_i64() {
            Some(200) => Outcome::Done,
            Some(429) if job.attempt == 1 && args["snoozed"].is_null() => {
                Outcome::Snooze(Duration::from_secs(3600))
            }
            _ => Outcome::Dead("refused".into()),
        }
    });
    registry.register_fn("plain", |_: Value, _: &errand::JobContext| Outcome::Done);
    let done = enqueue(&db.store, NewJob::new("noted", json!({"status": 200})));
    let dead = enqueue(&db.store, NewJob::new("noted", json!({"status": 404})));
    let snoozed = enqueue(&db.store, NewJob::new("noted", json!({"status": 429})));
    let plain = enqueue(&db.store, NewJob::new("plain", json!({})));
    let worker = start(&db.store, registry, config(2));
    wait_state(&db.store, done, JobState::Completed);
    wait_state(&db.store, dead, JobState::Dead);
    wait_state(&db.store, plain, JobState::Completed);
    let snoozed_job = wait_for("the snooze to be recorded", WAIT, || {
        let attempts = db.store.job_attempts(snoozed).unwrap();
        (!attempts.is_empty()).then(|| db.store.job_get(snoozed).unwrap().unwrap())
    });
    stop(worker);

    let detail = |id: i64| -> Vec<(AttemptOutcome, Option<Value>)> {
        db.store
            .job_attempts(id)
            .unwrap()
            .into_iter()
            .map(|a| {
                (
                    a.outcome,
                    a.detail.map(|d| serde_json::from_str(&d).unwrap()),
                )
            })
            .collect()
    };
    let noted = |status: i64| Some(json!({"status": status, "said": "<b>hi</b>"}));
    assert_eq!(detail(done), vec![(AttemptOutcome::Completed, noted(200))]);
    assert_eq!(detail(dead), vec![(AttemptOutcome::Error, noted(404))]);
    assert_eq!(detail(snoozed), vec![(AttemptOutcome::Snoozed, noted(429))]);
    assert_eq!(snoozed_job.state, JobState::Queued);
    assert_eq!(snoozed_job.attempt, 0, "a snooze spends no attempt");
    let attempts = db.store.job_attempts(snoozed).unwrap();
    assert_eq!(
        attempts[0].attempt, 1,
        "numbered as the attempt it gave back"
    );
    // The plain success is listed from the job row (id 0), with no detail.
    let plain_attempts = db.store.job_attempts(plain).unwrap();
    assert_eq!(plain_attempts.len(), 1);
    assert_eq!(plain_attempts[0].id, 0);
    assert_eq!(plain_attempts[0].detail, None);
}

/// A handler that says why it snoozes and snoozes forever (a receiver that
/// always answers 429) cannot loop without end: the last of `MAX_SNOOZES`
/// spends the attempt.
fn endless_recorded_snoozes_end_up_spending_the_attempt(db: &TestDb) {
    let mut registry = Registry::new();
    registry.register_fn("pushy", |_: Value, job: &errand::JobContext| {
        job.record(json!({"status": 429}));
        Outcome::Snooze(Duration::ZERO)
    });
    let id = enqueue(&db.store, NewJob::new("pushy", json!({})).max_attempts(1));
    let worker = start(&db.store, registry, config(1));
    let job = wait_state(&db.store, id, JobState::Dead);
    stop(worker);
    let attempts = db.store.job_attempts(id).unwrap();
    let snoozed = attempts
        .iter()
        .filter(|a| a.outcome == AttemptOutcome::Snoozed)
        .count();
    assert_eq!(
        snoozed as i64,
        errand::worker::MAX_SNOOZES - 1,
        "{attempts:?}"
    );
    let last = attempts.last().unwrap();
    assert_eq!(last.outcome, AttemptOutcome::Error);
    assert_eq!(last.detail.as_deref(), Some(r#"{"status":429}"#));
    assert!(
        job.last_error
            .unwrap()
            .contains("asked to wait 20 times in a row"),
        "the error says why"
    );
    assert!(attempts.iter().all(|a| a.attempt == 1));
}

on_both_backends!(
    every_job_runs_exactly_once_across_workers,
    endless_recorded_snoozes_end_up_spending_the_attempt,
    what_an_attempt_records_is_kept_with_it,
    a_job_that_keeps_failing_is_dead_after_max_attempts_and_can_be_replayed,
    bad_input_and_panics_are_recorded_while_work_goes_on,
    an_overrunning_attempt_times_out_without_costing_a_thread,
    a_running_job_sees_its_cancel_and_ends_cancelled,
    snoozed_jobs_wait_without_spending_an_attempt,
    priorities_order_the_work_and_scheduled_jobs_wait_their_turn,
    a_new_job_wakes_an_idle_worker_without_waiting_for_the_poll,
    graceful_shutdown_releases_unfinished_jobs_without_spending_an_attempt,
    a_second_signal_cuts_the_drain_short,
    slow_jobs_are_claimed_only_for_idle_threads,
    fast_jobs_are_claimed_in_batches_beyond_idle_threads,
    a_job_buffered_too_long_is_released_not_started_short_of_time,
);
