//! The store's operations and every lifecycle transition, including the
//! guarded writes that must change nothing, on both backends.

mod common;

use std::collections::HashSet;
use std::sync::{Arc, Barrier};
use std::time::Duration;

use common::{TestDb, wait_for};
use errand::job::Registry;
use errand::maintenance::{MaintenanceConfig, Pruner, Rescuer};
use errand::store::{
    AttemptOutcome, BulkAction, DeadAction, DeadFilter, Failure, JobFilter, JobState, Lease,
    NewJob, Retention, Transition, WorkerInfo,
};
use serde_json::json;

const WORKER: &str = "test-host:1:worker";

fn job(kind: &str) -> NewJob {
    NewJob::new(kind, json!({"n": 1}))
}

fn retry_now(error: &str) -> Failure {
    Failure {
        outcome: AttemptOutcome::Error,
        error: error.to_string(),
        retry_in: Some(Duration::ZERO),
        detail: None,
    }
}

fn claim_one(db: &TestDb) -> errand::Job {
    let mut claimed = db.store.jobs_claim("default", WORKER, 1).unwrap();
    assert_eq!(claimed.len(), 1, "expected one claimable job");
    claimed.remove(0)
}

fn state_of(db: &TestDb, id: i64) -> JobState {
    db.store.job_get(id).unwrap().expect("job exists").state
}

fn enqueued_job_is_stored_queued_with_defaults(db: &TestDb) {
    let before = db.store.now_ms().unwrap();
    let e = db.store.job_enqueue(&job("noop")).unwrap();
    assert!(e.created);
    assert_eq!(e.state, JobState::Queued);
    let j = db.store.job_get(e.id).unwrap().unwrap();
    assert_eq!(j.queue, "default");
    assert_eq!(j.kind, "noop");
    assert_eq!(
        serde_json::from_str::<serde_json::Value>(&j.args).unwrap(),
        json!({"n": 1})
    );
    assert_eq!(
        (j.state, j.attempt, j.max_attempts, j.priority),
        (JobState::Queued, 0, 25, 0)
    );
    assert_eq!(j.timeout_ms, 300_000);
    assert_eq!(j.lease_id, 0);
    assert!(
        j.run_at >= before && j.run_at <= before + 5_000,
        "run_at is the database's now"
    );
    assert_eq!(j.created_at, j.run_at);
    assert!(db.store.job_get(e.id + 1000).unwrap().is_none());
}

fn a_batch_is_enqueued_in_input_order(db: &TestDb) {
    let batch: Vec<NewJob> = (0..50)
        .map(|i| NewJob::new("noop", json!({"i": i})).priority(i % 3))
        .collect();
    let ids = db.store.jobs_enqueue(&batch).unwrap();
    assert_eq!(ids.len(), 50);
    for (i, e) in ids.iter().enumerate() {
        let j = db.store.job_get(e.id).unwrap().unwrap();
        assert_eq!(
            j.args,
            json!({"i": i}).to_string(),
            "job {i} got the right id"
        );
    }
    assert!(db.store.jobs_enqueue(&[]).unwrap().is_empty());
}

fn a_unique_key_returns_the_unfinished_job_instead_of_a_duplicate(db: &TestDb) {
    let first = db
        .store
        .job_enqueue(&job("noop").unique_key("order-7"))
        .unwrap();
    let again = db
        .store
        .job_enqueue(&job("noop").unique_key("order-7"))
        .unwrap();
    assert!(first.created);
    assert_eq!((again.id, again.created), (first.id, false));
    // In one batch: the second occurrence maps to the first.
    let batch = db
        .store
        .jobs_enqueue(&[
            job("noop").unique_key("a"),
            job("noop"),
            job("noop").unique_key("a"),
            job("noop").unique_key("order-7"),
        ])
        .unwrap();
    assert!(batch[0].created && batch[1].created);
    assert_eq!((batch[2].id, batch[2].created), (batch[0].id, false));
    assert_eq!((batch[3].id, batch[3].created), (first.id, false));
    // Once the holder is finished, the key is free again.
    let claimed = db.store.jobs_claim("default", WORKER, 10).unwrap();
    let leases: Vec<Lease> = claimed.iter().map(|j| j.lease()).collect();
    db.store.jobs_complete(&leases).unwrap();
    let later = db
        .store
        .job_enqueue(&job("noop").unique_key("order-7"))
        .unwrap();
    assert!(later.created);
    assert_ne!(later.id, first.id);
}

fn claims_follow_priority_then_run_at_and_take_a_lease(db: &TestDb) {
    let low = db.store.job_enqueue(&job("noop").priority(5)).unwrap().id;
    let high = db.store.job_enqueue(&job("noop").priority(-1)).unwrap().id;
    let mid = db.store.job_enqueue(&job("noop").priority(2)).unwrap().id;
    let claimed = db.store.jobs_claim("default", WORKER, 2).unwrap();
    assert_eq!(
        claimed.iter().map(|j| j.id).collect::<Vec<_>>(),
        vec![high, mid]
    );
    let j = &claimed[0];
    assert_eq!((j.state, j.attempt, j.lease_id), (JobState::Running, 1, 1));
    assert_eq!(j.locked_by.as_deref(), Some(WORKER));
    let started = j.started_at.unwrap();
    assert_eq!(j.heartbeat_at, Some(started));
    assert_eq!(j.deadline_at, Some(started + j.timeout_ms));
    assert_eq!(
        db.store.jobs_claim("default", WORKER, 5).unwrap()[0].id,
        low
    );
    assert!(
        db.store
            .jobs_claim("default", WORKER, 5)
            .unwrap()
            .is_empty()
    );
    assert!(db.store.jobs_claim("other", WORKER, 5).unwrap().is_empty());
}

fn a_scheduled_job_is_not_claimed_before_its_time(db: &TestDb) {
    let now = db.store.now_ms().unwrap();
    let later = db
        .store
        .job_enqueue(&job("noop").delay(Duration::from_secs(3600)))
        .unwrap();
    let at_future = db
        .store
        .job_enqueue(&job("noop").run_at(now + 3_600_000))
        .unwrap();
    let at_past = db
        .store
        .job_enqueue(&job("noop").run_at(now - 1_000))
        .unwrap();
    let scheduled = db.store.job_get(later.id).unwrap().unwrap();
    assert_eq!(scheduled.state, JobState::Queued);
    assert!(scheduled.run_at >= now + 3_600_000);
    let claimed = db.store.jobs_claim("default", WORKER, 10).unwrap();
    assert_eq!(
        claimed.iter().map(|j| j.id).collect::<Vec<_>>(),
        vec![at_past.id]
    );
    assert_eq!(state_of(db, at_future.id), JobState::Queued);
}

fn a_paused_queue_yields_nothing_until_resumed(db: &TestDb) {
    let id = db.store.job_enqueue(&job("noop")).unwrap().id;
    db.store.queue_set_paused("default", true).unwrap();
    assert!(
        db.store
            .jobs_claim("default", WORKER, 1)
            .unwrap()
            .is_empty()
    );
    let queues = db.store.queues_list().unwrap();
    assert_eq!(queues.len(), 1);
    assert!(queues[0].paused);
    db.store.queue_set_paused("default", false).unwrap();
    assert_eq!(claim_one(db).id, id);
}

fn completion_records_one_successful_attempt_and_is_fenced(db: &TestDb) {
    let id = db.store.job_enqueue(&job("noop")).unwrap().id;
    let j = claim_one(db);
    assert_eq!(db.store.jobs_complete(&[j.lease()]).unwrap(), vec![id]);
    // The same completion again, or with a wrong lease, changes nothing.
    assert!(db.store.jobs_complete(&[j.lease()]).unwrap().is_empty());
    let wrong = Lease { id, lease_id: 99 };
    assert!(db.store.jobs_complete(&[wrong]).unwrap().is_empty());
    let done = db.store.job_get(id).unwrap().unwrap();
    assert_eq!(done.state, JobState::Completed);
    assert!(done.finished_at.unwrap() >= done.started_at.unwrap());
    let attempts = db.store.job_attempts(id).unwrap();
    assert_eq!(attempts.len(), 1);
    assert_eq!(attempts[0].outcome, AttemptOutcome::Completed);
    assert_eq!(
        (attempts[0].attempt, attempts[0].worker.as_str()),
        (1, WORKER)
    );
    assert_eq!(attempts[0].started_at, done.started_at.unwrap());
    // Off the hot path: the successful attempt is read from the job's own
    // row, not written as a row of its own.
    assert_eq!(attempts[0].id, 0);
}

fn a_completion_after_the_lease_was_rescued_changes_nothing(db: &TestDb) {
    let id = db.store.job_enqueue(&job("noop")).unwrap().id;
    let stale = claim_one(db);
    let lost = Failure {
        outcome: AttemptOutcome::Lost,
        error: "worker stopped heartbeating".into(),
        retry_in: Some(Duration::ZERO),
        detail: None,
    };
    assert_eq!(
        db.store.job_rescue(stale.lease(), &lost).unwrap(),
        Some(JobState::Retrying)
    );
    // The first worker comes back and reports: fenced out.
    assert!(db.store.jobs_complete(&[stale.lease()]).unwrap().is_empty());
    assert_eq!(
        db.store
            .job_fail(stale.lease(), &retry_now("late"))
            .unwrap(),
        None
    );
    assert!(!db.store.job_snooze(stale.lease(), Duration::ZERO).unwrap());
    assert_eq!(db.store.jobs_release(&[stale.lease()]).unwrap(), 0);
    assert!(
        db.store
            .jobs_heartbeat(&[stale.lease()])
            .unwrap()
            .is_empty()
    );
    let j = db.store.job_get(id).unwrap().unwrap();
    assert_eq!((j.state, j.rescue_count), (JobState::Retrying, 1));
    // A second claim takes a new lease and may complete.
    let again = claim_one(db);
    assert_eq!((again.lease_id, again.attempt), (2, 2));
    assert_eq!(db.store.jobs_complete(&[again.lease()]).unwrap(), vec![id]);
    let outcomes: Vec<_> = db
        .store
        .job_attempts(id)
        .unwrap()
        .iter()
        .map(|a| a.outcome)
        .collect();
    assert_eq!(
        outcomes,
        vec![AttemptOutcome::Lost, AttemptOutcome::Completed]
    );
}

fn a_failing_job_retries_then_goes_dead_keeping_every_error(db: &TestDb) {
    let id = db
        .store
        .job_enqueue(&job("fail").max_attempts(2))
        .unwrap()
        .id;
    let first = claim_one(db);
    let backoff = Failure {
        retry_in: Some(Duration::from_secs(3600)),
        ..retry_now("error one")
    };
    assert_eq!(
        db.store.job_fail(first.lease(), &backoff).unwrap(),
        Some(JobState::Retrying)
    );
    let retrying = db.store.job_get(id).unwrap().unwrap();
    assert_eq!(retrying.last_error.as_deref(), Some("error one"));
    assert!(
        retrying.run_at >= db.store.now_ms().unwrap() + 3_500_000,
        "backoff delays the retry"
    );
    assert!(
        db.store
            .jobs_claim("default", WORKER, 1)
            .unwrap()
            .is_empty()
    );
    // Retry now: claimable at once.
    assert_eq!(
        db.store.job_retry(id).unwrap(),
        Transition::Applied(JobState::Queued)
    );
    let second = claim_one(db);
    assert_eq!(second.attempt, 2);
    let last = Failure {
        retry_in: None,
        ..retry_now("error two")
    };
    assert_eq!(
        db.store.job_fail(second.lease(), &last).unwrap(),
        Some(JobState::Dead)
    );
    let dead = db.store.job_get(id).unwrap().unwrap();
    assert!(dead.finished_at.is_some());
    let errors: Vec<_> = db
        .store
        .job_attempts(id)
        .unwrap()
        .into_iter()
        .map(|a| (a.attempt, a.outcome, a.error.unwrap()))
        .collect();
    assert_eq!(
        errors,
        vec![
            (1, AttemptOutcome::Error, "error one".to_string()),
            (2, AttemptOutcome::Error, "error two".to_string()),
        ]
    );
}

fn replaying_a_dead_job_queues_it_with_its_history_and_one_more_attempt(db: &TestDb) {
    let id = db
        .store
        .job_enqueue(&job("fail").max_attempts(1))
        .unwrap()
        .id;
    let j = claim_one(db);
    let dead = Failure {
        retry_in: None,
        ..retry_now("boom")
    };
    db.store.job_fail(j.lease(), &dead).unwrap();
    assert_eq!(
        db.store.job_retry(id).unwrap(),
        Transition::Applied(JobState::Queued)
    );
    let replayed = db.store.job_get(id).unwrap().unwrap();
    assert_eq!(
        (replayed.state, replayed.attempt, replayed.max_attempts),
        (JobState::Queued, 1, 2)
    );
    assert!(replayed.finished_at.is_none());
    assert_eq!(db.store.job_attempts(id).unwrap().len(), 1, "history kept");
    let again = claim_one(db);
    assert_eq!(db.store.jobs_complete(&[again.lease()]).unwrap(), vec![id]);
    assert_eq!(db.store.job_attempts(id).unwrap().len(), 2);
    // Only dead, cancelled and retrying jobs can be retried.
    assert_eq!(
        db.store.job_retry(id).unwrap(),
        Transition::Refused(JobState::Completed)
    );
    assert_eq!(db.store.job_retry(id + 100).unwrap(), Transition::Missing);
}

fn cancel_stops_waiting_jobs_and_asks_running_ones(db: &TestDb) {
    let waiting = db.store.job_enqueue(&job("noop").priority(1)).unwrap().id;
    let running_id = db.store.job_enqueue(&job("noop")).unwrap().id;
    let running = claim_one(db);
    assert_eq!(running.id, running_id);
    assert_eq!(
        db.store.job_cancel(waiting).unwrap(),
        Transition::Applied(JobState::Cancelled)
    );
    assert!(
        db.store
            .job_get(waiting)
            .unwrap()
            .unwrap()
            .finished_at
            .is_some()
    );
    assert_eq!(
        db.store.job_cancel(running_id).unwrap(),
        Transition::Applied(JobState::Running)
    );
    assert_eq!(
        db.store.jobs_heartbeat(&[running.lease()]).unwrap(),
        vec![(running_id, true)]
    );
    // The handler stops with an error: the job ends cancelled, not retrying.
    assert_eq!(
        db.store
            .job_fail(running.lease(), &retry_now("stopped"))
            .unwrap(),
        Some(JobState::Cancelled)
    );
    assert_eq!(
        db.store.job_cancel(running_id).unwrap(),
        Transition::Refused(JobState::Cancelled)
    );
    assert_eq!(db.store.job_cancel(9999).unwrap(), Transition::Missing);
    // A cancelled job can be replayed.
    assert_eq!(
        db.store.job_retry(waiting).unwrap(),
        Transition::Applied(JobState::Queued)
    );
}

fn delete_removes_a_job_and_its_attempts_but_not_a_running_one(db: &TestDb) {
    let id = db.store.job_enqueue(&job("noop")).unwrap().id;
    let j = claim_one(db);
    assert_eq!(
        db.store.job_delete(id).unwrap(),
        Transition::Refused(JobState::Running)
    );
    db.store.job_fail(j.lease(), &retry_now("x")).unwrap();
    assert_eq!(
        db.store.job_delete(id).unwrap(),
        Transition::Applied(JobState::Retrying)
    );
    assert!(db.store.job_get(id).unwrap().is_none());
    assert!(db.store.job_attempts(id).unwrap().is_empty());
    assert_eq!(db.store.job_delete(id).unwrap(), Transition::Missing);
}

fn snooze_and_release_do_not_spend_an_attempt(db: &TestDb) {
    let snoozed = db.store.job_enqueue(&job("noop").priority(0)).unwrap().id;
    let released = db.store.job_enqueue(&job("noop").priority(1)).unwrap().id;
    let claimed = db.store.jobs_claim("default", WORKER, 2).unwrap();
    assert!(
        db.store
            .job_snooze(claimed[0].lease(), Duration::from_secs(3600))
            .unwrap()
    );
    assert_eq!(db.store.jobs_release(&[claimed[1].lease()]).unwrap(), 1);
    let s = db.store.job_get(snoozed).unwrap().unwrap();
    assert_eq!((s.state, s.attempt), (JobState::Queued, 0));
    assert!(s.run_at > db.store.now_ms().unwrap() + 3_500_000);
    assert!(s.locked_by.is_none() && s.heartbeat_at.is_none());
    let r = db.store.job_get(released).unwrap().unwrap();
    assert_eq!((r.state, r.attempt), (JobState::Queued, 0));
    assert!(db.store.job_attempts(snoozed).unwrap().is_empty());
    assert!(db.store.job_attempts(released).unwrap().is_empty());
    assert_eq!(
        claim_one(db).id,
        released,
        "a released job is claimable at once"
    );
}

fn heartbeat_refreshes_held_jobs_and_omits_lost_ones(db: &TestDb) {
    db.store.jobs_enqueue(&[job("noop"), job("noop")]).unwrap();
    let claimed = db.store.jobs_claim("default", WORKER, 2).unwrap();
    let stale = Lease {
        id: claimed[1].id,
        lease_id: claimed[1].lease_id + 1,
    };
    let held = db
        .store
        .jobs_heartbeat(&[claimed[0].lease(), stale])
        .unwrap();
    assert_eq!(held, vec![(claimed[0].id, false)]);
    let j = db.store.job_get(claimed[0].id).unwrap().unwrap();
    assert!(j.heartbeat_at.unwrap() >= claimed[0].heartbeat_at.unwrap());
}

fn lists_filter_and_paginate_newest_first_and_counts_add_up(db: &TestDb) {
    let mut ids = Vec::new();
    for i in 0..7 {
        let j = NewJob::new(if i % 2 == 0 { "noop" } else { "sleep" }, json!({})).queue(if i < 5 {
            "default"
        } else {
            "mail"
        });
        ids.push(db.store.job_enqueue(&j).unwrap().id);
    }
    let c = claim_one(db);
    db.store.jobs_complete(&[c.lease()]).unwrap();
    let page1 = db
        .store
        .jobs_list(&JobFilter {
            limit: 3,
            ..Default::default()
        })
        .unwrap();
    assert_eq!(
        page1.iter().map(|j| j.id).collect::<Vec<_>>(),
        vec![ids[6], ids[5], ids[4]]
    );
    let page2 = db
        .store
        .jobs_list(&JobFilter {
            limit: 3,
            before_id: Some(page1[2].id),
            ..Default::default()
        })
        .unwrap();
    assert_eq!(
        page2.iter().map(|j| j.id).collect::<Vec<_>>(),
        vec![ids[3], ids[2], ids[1]]
    );
    let mail = db
        .store
        .jobs_list(&JobFilter {
            queue: Some("mail".into()),
            ..Default::default()
        })
        .unwrap();
    assert_eq!(mail.len(), 2);
    let sleeps = db
        .store
        .jobs_list(&JobFilter {
            kind: Some("sleep".into()),
            states: vec![JobState::Queued],
            ..Default::default()
        })
        .unwrap();
    assert_eq!(sleeps.len(), 3);
    let completed = db
        .store
        .jobs_list(&JobFilter {
            states: vec![JobState::Completed],
            ..Default::default()
        })
        .unwrap();
    assert_eq!(
        completed.iter().map(|j| j.id).collect::<Vec<_>>(),
        vec![c.id]
    );
    let counts = db.store.jobs_count().unwrap();
    let count = |queue: &str, state| {
        counts
            .iter()
            .find(|c| c.queue == queue && c.state == state)
            .map_or(0, |c| c.count)
    };
    assert_eq!(count("default", JobState::Queued), 4);
    assert_eq!(count("default", JobState::Completed), 1);
    assert_eq!(count("mail", JobState::Queued), 2);
    assert_eq!(counts.iter().map(|c| c.count).sum::<i64>(), 7);
}

fn concurrent_claimers_never_get_the_same_job(db: &TestDb) {
    let batch: Vec<NewJob> = (0..400).map(|_| job("noop")).collect();
    db.store.jobs_enqueue(&batch).unwrap();
    let threads = 8;
    let barrier = Arc::new(Barrier::new(threads));
    let handles: Vec<_> = (0..threads)
        .map(|t| {
            let store = db.other_store();
            let barrier = barrier.clone();
            std::thread::spawn(move || {
                barrier.wait();
                let mut mine = Vec::new();
                loop {
                    let got = store.jobs_claim("default", &format!("w{t}"), 7).unwrap();
                    if got.is_empty() {
                        return mine;
                    }
                    mine.extend(got.into_iter().map(|j| j.id));
                }
            })
        })
        .collect();
    let mut all = Vec::new();
    for h in handles {
        all.extend(h.join().unwrap());
    }
    let unique: HashSet<_> = all.iter().collect();
    assert_eq!(all.len(), 400, "every job claimed");
    assert_eq!(unique.len(), 400, "no job claimed twice");
    let twice = db
        .store
        .jobs_list(&JobFilter {
            limit: 1000,
            ..Default::default()
        })
        .unwrap()
        .into_iter()
        .filter(|j| j.attempt != 1 || j.lease_id != 1)
        .count();
    assert_eq!(twice, 0, "each job was claimed exactly once");
}

fn the_leader_lease_has_one_holder_until_it_expires_or_resigns(db: &TestDb) {
    let long = Duration::from_secs(60);
    assert_eq!(db.store.leader_acquire("a", long).unwrap(), Some(1));
    assert_eq!(db.store.leader_acquire("b", long).unwrap(), None);
    assert_eq!(
        db.store.leader_acquire("a", long).unwrap(),
        Some(1),
        "renewal keeps the term"
    );
    assert!(db.store.leader_resign("a").unwrap());
    assert!(!db.store.leader_resign("a").unwrap());
    assert_eq!(
        db.store
            .leader_acquire("b", Duration::from_millis(1))
            .unwrap(),
        Some(1)
    );
    // b's 1 ms lease expires; a takes over with a new term.
    let term = wait_for("b's lease to expire", Duration::from_secs(5), || {
        db.store.leader_acquire("a", long).unwrap()
    });
    assert_eq!(term, 2);
    let leader = db.store.leader_get().unwrap().unwrap();
    assert_eq!((leader.holder.as_str(), leader.term), ("a", 2));
}

fn workers_register_heartbeat_and_are_pruned_when_silent(db: &TestDb) {
    let info = WorkerInfo {
        id: "h:1:x".into(),
        host: "h".into(),
        pid: 1,
        queues: "default=8".into(),
        concurrency: 8,
        version: "0".into(),
        started_at: 0,
        heartbeat_at: 0,
    };
    db.store.worker_register(&info).unwrap();
    assert!(db.store.worker_heartbeat("h:1:x").unwrap());
    let listed = db.store.workers_list().unwrap();
    assert_eq!(listed.len(), 1);
    assert!(listed[0].started_at > 0 && listed[0].heartbeat_at >= listed[0].started_at);
    let long = Retention::default();
    let kept = Pruner {
        store: &db.store,
        config: &MaintenanceConfig::default(),
    }
    .run_once()
    .unwrap();
    assert_eq!(kept.workers, 0);
    wait_for(
        "the silent worker to be pruned",
        Duration::from_secs(5),
        || {
            let r = db
                .store
                .jobs_prune(&long, Duration::from_millis(1))
                .unwrap();
            (r.workers == 1).then_some(())
        },
    );
    assert!(
        !db.store.worker_heartbeat("h:1:x").unwrap(),
        "a pruned worker must register again"
    );
}

fn the_rescuer_takes_back_jobs_from_silent_workers_then_buries_poison(db: &TestDb) {
    let id = db.store.job_enqueue(&job("noop")).unwrap().id;
    let registry = Registry::new();
    let config = MaintenanceConfig {
        stale_after: Duration::from_millis(1),
        backoff: errand::Backoff::Fixed(Duration::ZERO),
        max_rescues: 2,
        ..MaintenanceConfig::default()
    };
    let rescuer = Rescuer {
        store: &db.store,
        registry: &registry,
        config: &config,
    };
    claim_one(db);
    let first = wait_for("the job to go stale", Duration::from_secs(5), || {
        let r = rescuer.run_once().unwrap();
        (r.retried + r.dead > 0).then_some(r)
    });
    assert_eq!((first.retried, first.dead), (1, 0));
    let attempts = db.store.job_attempts(id).unwrap();
    assert_eq!(attempts[0].outcome, AttemptOutcome::Lost);
    assert!(
        attempts[0]
            .error
            .as_deref()
            .unwrap()
            .contains("stopped heartbeating")
    );
    claim_one(db);
    let second = wait_for("the job to go stale again", Duration::from_secs(5), || {
        let r = rescuer.run_once().unwrap();
        (r.retried + r.dead > 0).then_some(r)
    });
    assert_eq!(
        (second.retried, second.dead),
        (0, 1),
        "dead after max_rescues"
    );
    let j = db.store.job_get(id).unwrap().unwrap();
    assert_eq!((j.state, j.rescue_count), (JobState::Dead, 2));
    assert!(j.last_error.unwrap().contains("rescued 2 times"));
}

fn the_rescuer_times_out_jobs_past_their_deadline(db: &TestDb) {
    let id = db
        .store
        .job_enqueue(&job("noop").timeout(Duration::from_millis(1)))
        .unwrap()
        .id;
    claim_one(db);
    let registry = Registry::new();
    let config = MaintenanceConfig::default();
    let rescuer = Rescuer {
        store: &db.store,
        registry: &registry,
        config: &config,
    };
    wait_for("the deadline to pass", Duration::from_secs(5), || {
        (rescuer.run_once().unwrap().retried == 1).then_some(())
    });
    let attempts = db.store.job_attempts(id).unwrap();
    assert_eq!(attempts[0].outcome, AttemptOutcome::Timeout);
    assert!(attempts[0].error.as_deref().unwrap().contains("deadline"));
    assert_eq!(state_of(db, id), JobState::Retrying);
}

fn the_pruner_deletes_finished_jobs_past_retention_only(db: &TestDb) {
    let ids = db
        .store
        .jobs_enqueue(&[job("noop"), job("noop"), job("noop"), job("noop")])
        .unwrap();
    let claimed = db.store.jobs_claim("default", WORKER, 3).unwrap();
    db.store.jobs_complete(&[claimed[0].lease()]).unwrap();
    let dead = Failure {
        retry_in: None,
        ..retry_now("x")
    };
    db.store.job_fail(claimed[1].lease(), &dead).unwrap();
    db.store.job_cancel(ids[3].id).unwrap();
    let retention = Retention {
        completed: Duration::ZERO,
        cancelled: Duration::ZERO,
        dead: Duration::from_secs(3600),
    };
    // A pass may come in the millisecond one of them finished: sum passes.
    let mut pruned = errand::store::PruneReport::default();
    wait_for("finished jobs to age", Duration::from_secs(5), || {
        let r = db
            .store
            .jobs_prune(&retention, Duration::from_secs(3600))
            .unwrap();
        pruned.completed += r.completed;
        pruned.cancelled += r.cancelled;
        pruned.dead += r.dead;
        (pruned.completed + pruned.cancelled == 2).then_some(())
    });
    assert_eq!((pruned.completed, pruned.cancelled, pruned.dead), (1, 1, 0));
    assert!(db.store.job_get(claimed[0].id).unwrap().is_none());
    assert!(db.store.job_attempts(claimed[0].id).unwrap().is_empty());
    assert_eq!(state_of(db, claimed[1].id), JobState::Dead);
    assert_eq!(
        state_of(db, claimed[2].id),
        JobState::Running,
        "unfinished jobs are never pruned"
    );
}

fn the_database_clock_is_epoch_milliseconds(db: &TestDb) {
    let db_now = db.store.now_ms().unwrap();
    let local = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64;
    // Same host in tests: the two clocks agree to within a second.
    assert!(
        (db_now - local).abs() < 1_000,
        "db {db_now} vs local {local}"
    );
}

/// Claims `job` and records `error` as its last failure: it goes dead.
fn bury(db: &TestDb, job: NewJob, error: &str) -> i64 {
    let id = db.store.job_enqueue(&job.max_attempts(1)).unwrap().id;
    let queue = db.store.job_get(id).unwrap().unwrap().queue;
    let claimed = db.store.jobs_claim(&queue, WORKER, 1000).unwrap();
    let (target, others): (Vec<_>, Vec<_>) = claimed.into_iter().partition(|j| j.id == id);
    let failure = Failure {
        retry_in: None,
        ..retry_now(error)
    };
    db.store.job_fail(target[0].lease(), &failure).unwrap();
    let others: Vec<Lease> = others.iter().map(|j| j.lease()).collect();
    db.store.jobs_release(&others).unwrap();
    assert_eq!(state_of(db, id), JobState::Dead);
    id
}

fn dead_letters_group_by_kind_and_error_signature(db: &TestDb) {
    let a = bury(db, job("mail"), "mailbox 1042 full");
    let b = bury(db, job("mail"), "mailbox 77 full");
    let c = bury(db, job("mail"), "address rejected");
    let d = bury(db, job("sms").queue("other"), "mailbox 5 full");
    let dead = db.store.job_get(a).unwrap().unwrap();
    assert_eq!(dead.error_signature.as_deref(), Some("mailbox # full"));
    let groups = db.store.dead_groups(None, None).unwrap();
    let summary: Vec<(String, String, i64, i64)> = groups
        .iter()
        .map(|g| (g.kind.clone(), g.signature.clone(), g.count, g.sample_id))
        .collect();
    assert_eq!(
        summary,
        vec![
            ("mail".into(), "mailbox # full".into(), 2, b),
            ("mail".into(), "address rejected".into(), 1, c),
            ("sms".into(), "mailbox # full".into(), 1, d),
        ]
    );
    assert_eq!(groups[0].sample_error.as_deref(), Some("mailbox 77 full"));
    assert!(groups[0].first_at <= groups[0].last_at);
    assert_eq!(db.store.dead_groups(Some("other"), None).unwrap().len(), 1);
    assert_eq!(db.store.dead_groups(None, Some("mail")).unwrap().len(), 2);
    // Replaying clears the signature; the group shrinks.
    db.store.job_retry(a).unwrap();
    assert!(
        db.store
            .job_get(a)
            .unwrap()
            .unwrap()
            .error_signature
            .is_none()
    );
    assert_eq!(
        db.store.dead_groups(None, Some("mail")).unwrap()[0].count,
        1
    );
}

fn dead_letters_replay_and_purge_in_batches_with_progress(db: &TestDb) {
    let jobs: Vec<NewJob> = (0..2500).map(|_| job("fail").max_attempts(1)).collect();
    db.store.jobs_enqueue(&jobs).unwrap();
    let keep = bury(db, job("mail").queue("mail"), "kept");
    loop {
        let claimed = db.store.jobs_claim("default", WORKER, 500).unwrap();
        if claimed.is_empty() {
            break;
        }
        for j in claimed {
            let failure = Failure {
                retry_in: None,
                ..retry_now("boom 1")
            };
            db.store.job_fail(j.lease(), &failure).unwrap();
        }
    }
    let group = DeadFilter {
        kind: Some("fail".into()),
        signature: Some("boom #".into()),
        ..DeadFilter::default()
    };
    assert_eq!(db.store.jobs_dead_count(&group).unwrap(), 2500);
    let mut reports = Vec::new();
    let replayed = db
        .store
        .jobs_dead_apply(&group, DeadAction::Replay, |done| reports.push(done))
        .unwrap();
    assert_eq!(replayed, 2500);
    assert_eq!(
        reports,
        vec![1000, 2000, 2500],
        "progress after every batch"
    );
    assert_eq!(db.store.jobs_dead_count(&group).unwrap(), 0);
    assert_eq!(state_of(db, keep), JobState::Dead, "other groups untouched");
    let purged = db
        .store
        .jobs_dead_apply(
            &DeadFilter {
                queue: Some("mail".into()),
                ..DeadFilter::default()
            },
            DeadAction::Purge,
            |_| {},
        )
        .unwrap();
    assert_eq!(purged, 1);
    assert!(db.store.job_get(keep).unwrap().is_none());
}

fn search_and_scheduled_filters_narrow_the_list(db: &TestDb) {
    let plain = db
        .store
        .job_enqueue(&NewJob::new("noop", json!({"email": "Ada@Example.com"})))
        .unwrap()
        .id;
    db.store
        .job_enqueue(&NewJob::new("noop", json!({"pct": "100%_off"})))
        .unwrap();
    let later = db
        .store
        .job_enqueue(&NewJob::new("noop", json!({})).delay(Duration::from_secs(3600)))
        .unwrap()
        .id;
    let failed = bury(db, job("mail"), "SMTP said: user unknown");
    let search = |text: &str| -> Vec<i64> {
        db.store
            .jobs_list(&JobFilter {
                search: Some(text.into()),
                ..Default::default()
            })
            .unwrap()
            .iter()
            .map(|j| j.id)
            .collect()
    };
    assert_eq!(search("ada@example"), vec![plain], "args, any case");
    assert_eq!(search("USER UNKNOWN"), vec![failed], "errors too");
    assert_eq!(search("100%_"), search("100%_off"), "wildcards are literal");
    assert!(search("%").len() == 1 && search("_").len() == 1);
    assert!(search("nothing like this").is_empty());
    let scheduled: Vec<i64> = db
        .store
        .jobs_list(&JobFilter {
            states: vec![JobState::Queued],
            scheduled: Some(true),
            ..Default::default()
        })
        .unwrap()
        .iter()
        .map(|j| j.id)
        .collect();
    assert_eq!(scheduled, vec![later]);
}

fn a_dead_job_can_be_replayed_with_edited_args(db: &TestDb) {
    let id = bury(db, job("mail"), "bad address");
    let t = db
        .store
        .job_retry_with_args(id, r#"{"to": "fixed@example.com"}"#)
        .unwrap();
    assert_eq!(t, Transition::Applied(JobState::Queued));
    let j = db.store.job_get(id).unwrap().unwrap();
    assert_eq!(j.args, r#"{"to": "fixed@example.com"}"#);
    assert_eq!(
        db.store.job_retry_with_args(id, "{}").unwrap(),
        Transition::Refused(JobState::Queued),
        "only dead or cancelled jobs take new args"
    );
}

fn bulk_actions_report_what_applied(db: &TestDb) {
    let ids: Vec<i64> = db
        .store
        .jobs_enqueue(&[job("noop"), job("noop"), job("noop")])
        .unwrap()
        .iter()
        .map(|e| e.id)
        .collect();
    let running = claim_one(db).id;
    let report = db
        .store
        .jobs_bulk(BulkAction::Delete, &[ids[0], ids[1], ids[2], 999_999])
        .unwrap();
    assert_eq!((report.applied, report.refused, report.missing), (2, 1, 1));
    assert_eq!(state_of(db, running), JobState::Running);
    let report = db.store.jobs_bulk(BulkAction::Cancel, &[running]).unwrap();
    assert_eq!(report.applied, 1);
}

fn the_dashboard_counts_queues_and_minutes_from_indexes(db: &TestDb) {
    db.store
        .jobs_enqueue(&[
            job("noop"),
            job("noop"),
            job("noop").delay(Duration::from_secs(600)),
        ])
        .unwrap();
    db.store.job_enqueue(&job("noop").queue("mail")).unwrap();
    let running = claim_one(db);
    let done = claim_one(db);
    db.store.jobs_complete(&[done.lease()]).unwrap();
    bury(db, job("mail").queue("mail"), "boom");
    db.store.queue_set_paused("idle", true).unwrap();
    let d = db.store.dashboard().unwrap();
    let q = |name: &str| d.queues.iter().find(|q| q.name == name).unwrap().clone();
    let default = q("default");
    assert_eq!(
        (
            default.ready,
            default.scheduled,
            default.running,
            default.retrying,
            default.dead
        ),
        (0, 1, 1, 0, 0)
    );
    assert_eq!(default.completed_last_hour, 1);
    assert!(
        default.oldest_claimable_at.is_none(),
        "nothing claimable waits"
    );
    let mail = q("mail");
    assert_eq!((mail.ready, mail.dead, mail.failed_last_hour), (1, 1, 1));
    assert_eq!(mail.failure_rate(), Some(1.0));
    assert!(mail.oldest_claimable_at.unwrap() <= d.now_ms);
    assert!(q("idle").paused);
    assert_eq!(d.minutes.len(), 60);
    assert_eq!(d.minutes.iter().map(|m| m.completed).sum::<i64>(), 1);
    assert_eq!(d.minutes.iter().map(|m| m.failed).sum::<i64>(), 1);
    assert_eq!(
        d.minutes[59].completed + d.minutes[58].completed,
        1,
        "in the last minutes"
    );
    let _ = running;
}

fn processes_starting_together_on_a_fresh_database_migrate_it_once(backend: common::Backend) {
    let db = TestDb::unmigrated(backend);
    let starters = 4;
    let barrier = Arc::new(Barrier::new(starters));
    let handles: Vec<_> = (0..starters)
        .map(|_| {
            let (url, barrier) = (db.url.clone(), barrier.clone());
            std::thread::spawn(move || {
                barrier.wait();
                let store =
                    errand::Store::open(&url, &errand::store::StoreOptions::default()).unwrap();
                store.migrate()
            })
        })
        .collect();
    let mut applied: Vec<String> = handles
        .into_iter()
        .flat_map(|h| h.join().unwrap().expect("migration succeeds"))
        .collect();
    let total = applied.len();
    applied.sort();
    applied.dedup();
    assert_eq!(total, applied.len(), "a migration was applied twice");
    let dir = match backend {
        common::Backend::Sqlite => "migrations/sqlite",
        common::Backend::Postgres => "migrations/postgres",
    };
    let migrations = std::fs::read_dir(dir).unwrap().count();
    assert_eq!(total, migrations, "every migration applied: {applied:?}");
    assert!(db.store.job_enqueue(&job("noop")).is_ok());
}

on_both_backends_raw!(processes_starting_together_on_a_fresh_database_migrate_it_once);

fn concurrent_small_enqueues_each_get_their_own_jobs(db: &TestDb) {
    // On SQLite these share transactions (group commit); every caller must
    // still get back exactly its own jobs, committed.
    let threads = 16;
    let per_thread = 40;
    let barrier = Arc::new(Barrier::new(threads));
    let handles: Vec<_> = (0..threads)
        .map(|t| {
            let store = db.store.clone();
            let barrier = barrier.clone();
            std::thread::spawn(move || {
                barrier.wait();
                let mut mine = Vec::new();
                for i in 0..per_thread {
                    // Alternate one job and two, so groups mix sizes.
                    let jobs: Vec<NewJob> = (0..1 + i % 2)
                        .map(|k| NewJob::new("noop", json!({"t": t, "i": i, "k": k})))
                        .collect();
                    let enqueued = store.jobs_enqueue(&jobs).unwrap();
                    assert_eq!(enqueued.len(), jobs.len());
                    for (e, j) in enqueued.iter().zip(&jobs) {
                        assert!(e.created);
                        mine.push((e.id, j.args.clone()));
                    }
                }
                mine
            })
        })
        .collect();
    let mut ids = HashSet::new();
    let mut total = 0;
    for h in handles {
        for (id, args) in h.join().unwrap() {
            let stored = db.store.job_get(id).unwrap().expect("committed");
            assert_eq!(
                serde_json::from_str::<serde_json::Value>(&stored.args).unwrap(),
                serde_json::from_str::<serde_json::Value>(&args).unwrap()
            );
            assert!(ids.insert(id), "id {id} answered twice");
            total += 1;
        }
    }
    assert_eq!(total, threads * (per_thread / 2) * 3);
}

on_both_backends!(
    concurrent_small_enqueues_each_get_their_own_jobs,
    dead_letters_group_by_kind_and_error_signature,
    dead_letters_replay_and_purge_in_batches_with_progress,
    search_and_scheduled_filters_narrow_the_list,
    a_dead_job_can_be_replayed_with_edited_args,
    bulk_actions_report_what_applied,
    the_dashboard_counts_queues_and_minutes_from_indexes,
    enqueued_job_is_stored_queued_with_defaults,
    a_batch_is_enqueued_in_input_order,
    a_unique_key_returns_the_unfinished_job_instead_of_a_duplicate,
    claims_follow_priority_then_run_at_and_take_a_lease,
    a_scheduled_job_is_not_claimed_before_its_time,
    a_paused_queue_yields_nothing_until_resumed,
    completion_records_one_successful_attempt_and_is_fenced,
    a_completion_after_the_lease_was_rescued_changes_nothing,
    a_failing_job_retries_then_goes_dead_keeping_every_error,
    replaying_a_dead_job_queues_it_with_its_history_and_one_more_attempt,
    cancel_stops_waiting_jobs_and_asks_running_ones,
    delete_removes_a_job_and_its_attempts_but_not_a_running_one,
    snooze_and_release_do_not_spend_an_attempt,
    heartbeat_refreshes_held_jobs_and_omits_lost_ones,
    lists_filter_and_paginate_newest_first_and_counts_add_up,
    concurrent_claimers_never_get_the_same_job,
    the_leader_lease_has_one_holder_until_it_expires_or_resigns,
    workers_register_heartbeat_and_are_pruned_when_silent,
    the_rescuer_takes_back_jobs_from_silent_workers_then_buries_poison,
    the_rescuer_times_out_jobs_past_their_deadline,
    the_pruner_deletes_finished_jobs_past_retention_only,
    the_database_clock_is_epoch_milliseconds,
);
