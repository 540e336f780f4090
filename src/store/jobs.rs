//! Job statements: enqueue, claim, heartbeat, acknowledge, fail, and the
//! operator's actions (retry, cancel, delete), plus reads for lists and counts.
//!
//! The hot path (enqueue, claim, heartbeat, complete) takes a whole batch per
//! statement on PostgreSQL, where every statement is a network round trip; on
//! SQLite a statement is a function call, so a loop inside one `BEGIN
//! IMMEDIATE` transaction is as fast and simpler. Those statements are in the
//! "backend differences" section at the end of this file.

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use diesel::dsl::{count_star, sql};
use diesel::prelude::*;
use diesel::sql_types::{Array, BigInt, Bool, Integer, Nullable, Text};

use super::prepared::prepared;
use super::types::{DEFAULT_MAX_ATTEMPTS, DEFAULT_TIMEOUT};
use super::{
    Attempt, AttemptOutcome, Dialect, Failure, Job, JobState, Lease, NewJob, Pool, QueueCount,
    QueueInfo, Result, Schedule, Store, Transition, now,
};
use crate::schema::{job_attempts, jobs, queues};

/// The `NOTIFY` channel that announces claimable jobs; the payload is the queue.
pub(crate) const NOTIFY_CHANNEL: &str = "errand_jobs";

/// Longest error text kept per attempt; longer ones are cut with a marker.
const MAX_ERROR_BYTES: usize = 16 * 1024;

/// The states in which a job is not finished (and holds its unique key).
const UNFINISHED: [JobState; 3] = [JobState::Queued, JobState::Running, JobState::Retrying];

/// A successful attempt's record, for [`Store::jobs_complete_recorded`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CompletedDetail {
    pub lease: Lease,
    pub attempt: i32,
    pub worker: String,
    pub started_at: i64,
    /// JSON.
    pub detail: String,
}

/// The answer to enqueueing one job.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Enqueued {
    pub id: i64,
    /// The job's state: `queued` for a new job; for an existing job with the
    /// same unique key, whatever state it is in.
    pub state: JobState,
    /// False when an unfinished job with the same unique key was returned
    /// instead of creating a new one.
    pub created: bool,
}

/// How an enqueue under an idempotency key went.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Once {
    /// The key was new: the jobs were enqueued.
    Fresh(Vec<Enqueued>),
    /// The key was used before for the same request: the jobs it made.
    Repeat(Vec<i64>),
    /// The key was used before for a different request; nothing changed.
    Mismatch,
}

/// Which dead jobs a bulk action touches; unset fields match every job.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DeadFilter {
    pub queue: Option<String>,
    pub kind: Option<String>,
    /// A dead-letter group's error signature (with `kind`, the group).
    pub signature: Option<String>,
    pub ids: Option<Vec<i64>>,
}

/// What to do with matching dead jobs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeadAction {
    /// Back to `queued`, history kept.
    Replay,
    /// Delete, with their attempts.
    Purge,
}

/// An operator's action on several jobs by id.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BulkAction {
    Retry,
    Cancel,
    Delete,
}

/// What a bulk action did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct BulkReport {
    pub applied: usize,
    /// In a state the action does not fit (e.g. deleting a running job).
    pub refused: usize,
    pub missing: usize,
}

/// Which jobs [`Store::jobs_list`] returns, newest first.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct JobFilter {
    /// Any of these states; empty means all.
    pub states: Vec<JobState>,
    pub queue: Option<String>,
    pub kind: Option<String>,
    /// Keyset pagination: only jobs with an id below this one.
    pub before_id: Option<i64>,
    /// Only jobs whose args or last error contain this text (any case).
    pub search: Option<String>,
    /// `Some(true)`: only jobs whose `run_at` is ahead (scheduled);
    /// `Some(false)`: only jobs due now.
    pub scheduled: Option<bool>,
    /// Only dead jobs with this error signature (a dead-letter group).
    pub signature: Option<String>,
    /// At most this many (clamped to 1..=1000; 0 means 25).
    pub limit: i64,
}

/// Enqueues of fewer jobs than this join a group commit on SQLite; larger
/// batches are committed alone (they already amortize their sync).
const GROUP_COMMIT_BELOW: usize = 64;

/// Group commit for SQLite enqueues. Each committed transaction costs a disk
/// sync (`synchronous = FULL`), and SQLite has one writer at a time: a
/// thousand single-job requests a second, each with its own transaction,
/// would queue behind each other's syncs. Instead a request adds itself to
/// `pending` and waits for the `turn`; the holder of the turn commits every
/// pending request in one transaction and answers each. No thread of its
/// own, no timer: a lone request commits at once.
#[derive(Default)]
pub(crate) struct GroupCommit {
    pending: std::sync::Mutex<Vec<Waiting>>,
    turn: std::sync::Mutex<()>,
}

impl GroupCommit {
    fn lock_pending(&self) -> std::sync::MutexGuard<'_, Vec<Waiting>> {
        self.pending.lock().unwrap_or_else(|e| e.into_inner())
    }
}

struct Waiting {
    jobs: Vec<NewJob>,
    reply: crossbeam_channel::Sender<Result<Vec<Enqueued>>>,
}

/// One job as the enqueue statement reads it (on PostgreSQL a JSON array of
/// these is the statement's single parameter, so any batch size is one
/// statement; on SQLite each is a row of bound values).
#[derive(serde::Serialize)]
struct EnqueueRow<'a> {
    queue: &'a str,
    kind: &'a str,
    args: &'a str,
    priority: i32,
    max_attempts: i32,
    timeout_ms: i64,
    run_at: Option<i64>,
    delay_ms: i64,
    unique_key: Option<&'a str>,
}

impl<'a> EnqueueRow<'a> {
    fn new(job: &'a NewJob) -> Self {
        let (run_at, delay_ms) = match job.schedule {
            Schedule::Now => (None, 0),
            Schedule::At(at) => (Some(at), 0),
            Schedule::After(delay) => (None, millis(delay)),
        };
        EnqueueRow {
            queue: &job.queue,
            kind: &job.kind,
            args: &job.args,
            priority: job.priority,
            max_attempts: job.max_attempts.unwrap_or(DEFAULT_MAX_ATTEMPTS),
            timeout_ms: millis(job.timeout.unwrap_or(DEFAULT_TIMEOUT)),
            run_at,
            delay_ms,
            unique_key: job.unique_key.as_deref(),
        }
    }
}

#[derive(QueryableByName)]
struct InsertedRow {
    #[diesel(sql_type = BigInt)]
    id: i64,
    #[diesel(sql_type = Nullable<Text>)]
    unique_key: Option<String>,
}

#[derive(QueryableByName)]
struct HeldRow {
    #[diesel(sql_type = BigInt)]
    id: i64,
    #[diesel(sql_type = Bool)]
    cancel_requested: bool,
}

#[derive(QueryableByName)]
pub(crate) struct IdRow {
    #[diesel(sql_type = BigInt)]
    pub(crate) id: i64,
}

pub(crate) fn millis(d: Duration) -> i64 {
    i64::try_from(d.as_millis()).unwrap_or(i64::MAX)
}

/// Cuts `error` to [`MAX_ERROR_BYTES`] on a character boundary.
/// Writes one `job_attempts` row through `$c` (either connection type),
/// finished now by the database clock.
macro_rules! insert_attempt {
    ($c:expr,
     job: $job:expr,
     attempt: $attempt:expr,
     worker: $worker:expr,
     started_at: $started_at:expr,
     outcome: $outcome:expr,
     error: $error:expr,
     detail: $detail:expr $(,)?) => {{
        let finished_at = now($c);
        diesel::insert_into(job_attempts::table)
            .values((
                job_attempts::job_id.eq($job),
                job_attempts::attempt.eq($attempt),
                job_attempts::worker.eq($worker),
                job_attempts::started_at.eq($started_at),
                job_attempts::finished_at.eq(finished_at),
                job_attempts::outcome.eq($outcome),
                job_attempts::error.eq($error),
                job_attempts::detail.eq($detail),
            ))
            .execute($c)?;
    }};
}

fn cap_error(error: &str) -> String {
    if error.len() <= MAX_ERROR_BYTES {
        return error.to_string();
    }
    let mut end = MAX_ERROR_BYTES;
    while !error.is_char_boundary(end) {
        end -= 1;
    }
    format!(
        "{}\n… [{} more bytes cut]",
        &error[..end],
        error.len() - end
    )
}

/// The rows a lease-fenced write may touch: this job, this lease, still running.
#[diesel::dsl::auto_type]
fn fenced(id: i64, lease_id: i64) -> _ {
    let running: JobState = JobState::Running;
    jobs::table
        .filter(jobs::id.eq(id))
        .filter(jobs::lease_id.eq(lease_id))
        .filter(jobs::state.eq(running))
}

/// `text` with LIKE's wildcards escaped (the escape character is `\`).
fn escape_like(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        if matches!(c, '%' | '_' | '\\') {
            out.push('\\');
        }
        out.push(c);
    }
    out
}

/// `NOW + ?`: the database clock plus a bound number of milliseconds.
pub(super) type NowPlus = diesel::expression::UncheckedBind<
    diesel::expression::SqlLiteral<BigInt>,
    diesel::dsl::AsExprOf<i64, BigInt>,
>;

pub(super) fn now_plus<C: Dialect>(_: &C, ms: i64) -> NowPlus {
    sql::<BigInt>(&format!("{} + ", C::NOW)).bind::<BigInt, _>(ms)
}

/// The database clock's SQL text, for statements that embed it.
fn now_sql<C: Dialect>(_: &C) -> &'static str {
    C::NOW
}

impl Store {
    /// Enqueues one job. See [`Store::jobs_enqueue`].
    pub fn job_enqueue(&self, job: &NewJob) -> Result<Enqueued> {
        Ok(self.jobs_enqueue(std::slice::from_ref(job))?[0])
    }

    /// Enqueues jobs in one transaction and returns, in input order, each
    /// job's id. A job whose `unique_key` is held by an unfinished job is not
    /// created: the existing job is returned with `created: false`. When this
    /// returns `Ok`, every job is committed.
    ///
    /// Unset `max_attempts` and `timeout` get the global defaults (25, 5
    /// minutes); pass jobs through [`crate::Registry::prepare`] first to apply
    /// their kind's defaults.
    ///
    /// On SQLite, small enqueues arriving together (API requests, say) are
    /// committed in one transaction: one disk sync for all of them instead
    /// of one each ([`GroupCommit`]).
    pub fn jobs_enqueue(&self, new: &[NewJob]) -> Result<Vec<Enqueued>> {
        if new.is_empty() {
            return Ok(Vec::new());
        }
        let enqueued = match self.pool {
            Pool::Sqlite(_) if new.len() < GROUP_COMMIT_BELOW => self.enqueue_grouped(new)?,
            _ => self.enqueue_alone(new)?,
        };
        self.wake_queues(new);
        Ok(enqueued)
    }

    fn enqueue_alone(&self, new: &[NewJob]) -> Result<Vec<Enqueued>> {
        with_write_conn!(self, c => c.write_tx(|c| enqueue_in(c, new)))
    }

    /// Joins the next group commit: whoever holds the group's turn commits
    /// every request waiting so far in one transaction and answers each.
    fn enqueue_grouped(&self, new: &[NewJob]) -> Result<Vec<Enqueued>> {
        let (reply, answer) = crossbeam_channel::bounded(1);
        self.group.lock_pending().push(Waiting {
            jobs: new.to_vec(),
            reply,
        });
        {
            let _turn = self.group.turn.lock().unwrap_or_else(|e| e.into_inner());
            // Not answered by the previous turn: this turn answers everyone
            // waiting, this request included.
            if answer.is_empty() {
                let waiting = std::mem::take(&mut *self.group.lock_pending());
                self.commit_group(waiting);
            }
        }
        answer.recv().unwrap_or_else(|_| {
            Err(super::Error::Conflict(
                "the enqueue was interrupted (a panic in the thread committing it); try again"
                    .into(),
            ))
        })
    }

    fn commit_group(&self, waiting: Vec<Waiting>) {
        if waiting.len() == 1 {
            let w = &waiting[0];
            let _ = w.reply.send(self.enqueue_alone(&w.jobs));
            return;
        }
        let all: Vec<NewJob> = waiting
            .iter()
            .flat_map(|w| w.jobs.iter().cloned())
            .collect();
        match self.enqueue_alone(&all) {
            Ok(enqueued) => {
                let mut rest = enqueued.into_iter();
                for w in &waiting {
                    let _ = w.reply.send(Ok(rest.by_ref().take(w.jobs.len()).collect()));
                }
            }
            // One request's failure must not fail the others: each alone.
            Err(_) => {
                for w in &waiting {
                    let _ = w.reply.send(self.enqueue_alone(&w.jobs));
                }
            }
        }
    }

    /// [`Store::jobs_enqueue`] under an idempotency key: the first request
    /// with `key` enqueues `new`; a later one with the same `request_hash`
    /// gets the same jobs back ([`Once::Repeat`]) and one with a different
    /// hash is refused ([`Once::Mismatch`]). Concurrent requests with one key
    /// wait for each other, so exactly one enqueues. Keys expire after `ttl`.
    pub fn jobs_enqueue_once(
        &self,
        key: &str,
        request_hash: &str,
        ttl: Duration,
        new: &[NewJob],
    ) -> Result<Once> {
        use crate::schema::idempotency_keys as keys;
        let once = with_conn!(self, c => c.write_tx(|c| {
            let now = now(c);
            // An expired key is as good as absent.
            diesel::delete(keys::table.find(key).filter(keys::expires_at.lt(now.clone())))
                .execute(c)?;
            // Inserting first makes a concurrent request with the same key
            // wait here until this transaction ends.
            let taken = diesel::insert_into(keys::table)
                .values((
                    keys::key.eq(key),
                    keys::request_hash.eq(request_hash),
                    keys::created_at.eq(now),
                    keys::expires_at.eq(now_plus(c, millis(ttl))),
                ))
                .on_conflict_do_nothing()
                .execute(c)?
                == 0;
            if taken {
                let (hash, ids) = keys::table
                    .find(key)
                    .select((keys::request_hash, keys::job_ids))
                    .first::<(String, Option<String>)>(c)?;
                if hash != request_hash {
                    return Ok(Once::Mismatch);
                }
                let ids = ids.and_then(|ids| serde_json::from_str(&ids).ok()).unwrap_or_default();
                return Ok(Once::Repeat(ids));
            }
            let enqueued = enqueue_in(c, new)?;
            let ids: Vec<i64> = enqueued.iter().map(|e| e.id).collect();
            diesel::update(keys::table.find(key))
                .set(keys::job_ids.eq(serde_json::to_string(&ids).expect("ids serialize")))
                .execute(c)?;
            Ok(Once::Fresh(enqueued))
        }))?;
        if matches!(once, Once::Fresh(_)) {
            self.wake_queues(new);
        }
        Ok(once)
    }

    fn wake_queues(&self, new: &[NewJob]) {
        let queues: HashSet<&str> = new.iter().map(|j| j.queue.as_str()).collect();
        for queue in queues {
            self.wake.notify(queue);
        }
    }

    /// Claims up to `limit` claimable jobs of `queue` for `worker`, in claim
    /// order (priority, then `run_at`, then id). Each claimed job is `running`
    /// with a new lease, a fresh heartbeat and a deadline of now + its timeout.
    /// A paused queue yields nothing.
    pub fn jobs_claim(&self, queue: &str, worker: &str, limit: usize) -> Result<Vec<Job>> {
        if limit == 0 {
            return Ok(Vec::new());
        }
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        let mut claimed = with_hot_conn!(self, c => c.claim(queue, worker, limit)?);
        claimed.sort_by_key(|j| (j.priority, j.run_at, j.id));
        Ok(claimed)
    }

    /// Refreshes the heartbeat of every job still held under `leases`. Returns
    /// the held ones with their `cancel_requested` flag; a lease missing from
    /// the answer was lost (the job was rescued, or deleted).
    pub fn jobs_heartbeat(&self, leases: &[Lease]) -> Result<Vec<(i64, bool)>> {
        if leases.is_empty() {
            return Ok(Vec::new());
        }
        with_hot_conn!(self, c => c.heartbeat(leases))
    }

    /// Marks the jobs under `leases` completed, in one statement. Returns the
    /// ids completed; a lease that was lost completes nothing.
    ///
    /// The successful attempt gets no `job_attempts` row (a write per job on
    /// the hot path): the completed job's own row holds everything about it,
    /// and [`Store::job_attempts`] lists it from there.
    pub fn jobs_complete(&self, leases: &[Lease]) -> Result<Vec<i64>> {
        if leases.is_empty() {
            return Ok(Vec::new());
        }
        with_hot_conn!(self, c => c.complete(leases))
    }

    /// Records a failed attempt: the job goes to `retrying` (claimable after
    /// `retry_in`) or, without `retry_in`, to `dead`; a job whose cancel was
    /// requested goes to `cancelled` instead. Returns the new state, or `None`
    /// when the lease was lost (nothing changed).
    pub fn job_fail(&self, lease: Lease, failure: &Failure) -> Result<Option<JobState>> {
        self.job_fail_inner(lease, failure, false)
    }

    /// [`Store::job_fail`] for a job taken back from a worker that stopped
    /// answering or overran its deadline: the same, and it counts a rescue.
    pub fn job_rescue(&self, lease: Lease, failure: &Failure) -> Result<Option<JobState>> {
        self.job_fail_inner(lease, failure, true)
    }

    fn job_fail_inner(
        &self,
        lease: Lease,
        failure: &Failure,
        rescued: bool,
    ) -> Result<Option<JobState>> {
        let dead = failure.retry_in.is_none();
        let target = if dead {
            JobState::Dead
        } else {
            JobState::Retrying
        };
        let delay = failure.retry_in.map(millis).unwrap_or(0);
        let error = cap_error(&failure.error);
        let signature = dead.then(|| super::types::error_signature(&failure.error));
        with_write_conn!(self, c => c.write_tx(|c| {
            let finished = sql::<Nullable<BigInt>>("CASE WHEN cancel_requested OR ")
                .bind::<Bool, _>(dead)
                .sql(&format!(" THEN {} END", now_sql(c)));
            let row = diesel::update(fenced(lease.id, lease.lease_id))
                .set((
                    jobs::state.eq(sql::<Text>("CASE WHEN cancel_requested THEN 'cancelled' ELSE ")
                        .bind::<Text, _>(target)
                        .sql(" END")),
                    jobs::run_at.eq(now_plus(c, delay)),
                    jobs::finished_at.eq(finished),
                    jobs::heartbeat_at.eq(None::<i64>),
                    jobs::deadline_at.eq(None::<i64>),
                    jobs::last_error.eq(&error),
                    jobs::error_signature.eq(&signature),
                    jobs::rescue_count.eq(jobs::rescue_count + i32::from(rescued)),
                ))
                .returning((jobs::state, jobs::attempt, jobs::locked_by, jobs::started_at))
                .get_result::<(JobState, i32, Option<String>, Option<i64>)>(c)
                .optional()?;
            let Some((state, attempt, worker, started_at)) = row else {
                return Ok(None);
            };
            insert_attempt!(c,
                job: lease.id,
                attempt: attempt,
                worker: worker.unwrap_or_default(),
                // A running job always has started_at (the claim sets it).
                started_at: started_at.unwrap_or_default(),
                outcome: failure.outcome,
                error: Some(&error),
                detail: failure.detail.as_deref().map(cap_error),
            );
            Ok(Some(state))
        }))
    }

    /// Puts a running job back to wait `delay` without counting the attempt.
    /// Returns false when the lease was lost.
    pub fn job_snooze(&self, lease: Lease, delay: Duration) -> Result<bool> {
        self.job_snooze_recorded(lease, delay, None)
    }

    /// How many `snoozed` rows attempt number `attempt` of job `id` has.
    pub fn attempt_snoozes(&self, id: i64, attempt: i32) -> Result<i64> {
        with_conn!(self, c => Ok(job_attempts::table
            .filter(job_attempts::job_id.eq(id))
            .filter(job_attempts::attempt.eq(attempt))
            .filter(job_attempts::outcome.eq(AttemptOutcome::Snoozed))
            .count()
            .get_result(c)?))
    }

    /// [`Store::job_snooze`], keeping why as a `snoozed` attempt row when
    /// `detail` (JSON) is given.
    pub fn job_snooze_recorded(
        &self,
        lease: Lease,
        delay: Duration,
        detail: Option<&str>,
    ) -> Result<bool> {
        with_write_conn!(self, c => c.write_tx(|c| {
            // Who ran it, read before the snooze clears it.
            let held = match detail {
                Some(_) => fenced(lease.id, lease.lease_id)
                    .select((jobs::attempt, jobs::locked_by, jobs::started_at))
                    .first::<(i32, Option<String>, Option<i64>)>(c)
                    .optional()?,
                None => None,
            };
            let n = diesel::update(fenced(lease.id, lease.lease_id))
                .set(unclaim(c, millis(delay)))
                .execute(c)?;
            if n == 0 {
                return Ok(false);
            }
            if let (Some(detail), Some((attempt, worker, started_at))) = (detail, held) {
                insert_attempt!(c,
                    job: lease.id,
                    // The attempt the snooze gave back: the next claim runs
                    // it again under the same number.
                    attempt: attempt,
                    worker: worker.unwrap_or_default(),
                    started_at: started_at.unwrap_or_default(),
                    outcome: AttemptOutcome::Snoozed,
                    error: None::<&str>,
                    detail: Some(cap_error(detail)),
                );
            }
            Ok(true)
        }))
    }

    /// [`Store::jobs_complete`] for attempts that recorded something: in
    /// the same transaction, each completed job gets a `completed` attempt
    /// row holding its detail, so the detail is there as soon as the job
    /// shows completed. Returns the ids completed.
    pub fn jobs_complete_recorded(&self, done: &[CompletedDetail]) -> Result<Vec<i64>> {
        if done.is_empty() {
            return Ok(Vec::new());
        }
        let leases: Vec<Lease> = done.iter().map(|d| d.lease).collect();
        with_hot_conn!(self, c => c.write_tx(|c| {
            let completed = c.complete(&leases)?;
            let ids: std::collections::HashSet<i64> = completed.iter().copied().collect();
            for d in done.iter().filter(|d| ids.contains(&d.lease.id)) {
                insert_attempt!(c,
                    job: d.lease.id,
                    attempt: d.attempt,
                    worker: &d.worker,
                    started_at: d.started_at,
                    outcome: AttemptOutcome::Completed,
                    error: None::<&str>,
                    detail: Some(cap_error(&d.detail)),
                );
            }
            Ok(completed)
        }))
    }

    /// Gives running jobs back to the queue without counting their attempt
    /// (graceful shutdown); a job whose cancel was requested is cancelled
    /// instead. Returns how many were released.
    pub fn jobs_release(&self, leases: &[Lease]) -> Result<usize> {
        if leases.is_empty() {
            return Ok(0);
        }
        let released = with_write_conn!(self, c => c.write_tx(|c| {
            let mut released = Vec::new();
            for lease in leases {
                let queue = diesel::update(fenced(lease.id, lease.lease_id))
                    .set(unclaim(c, 0))
                    .returning(jobs::queue)
                    .get_result::<String>(c)
                    .optional()?;
                released.extend(queue);
            }
            Ok(released)
        }))?;
        self.announce(released.iter().map(String::as_str))?;
        Ok(released.len())
    }

    /// Cancels a job: a `queued` or `retrying` job becomes `cancelled`; for a
    /// `running` job the cancel is requested and its worker sees it at the
    /// next heartbeat (the answer is then `Applied(Running)`).
    pub fn job_cancel(&self, id: i64) -> Result<Transition> {
        let applied = with_conn!(self, c => {
            let now = now(c);
            let cancelled = diesel::update(
                jobs::table
                    .filter(jobs::id.eq(id))
                    .filter(jobs::state.eq_any([JobState::Queued, JobState::Retrying])),
            )
            .set((jobs::state.eq(JobState::Cancelled), jobs::finished_at.eq(now.nullable())))
            .execute(c)?;
            if cancelled == 1 {
                Some(JobState::Cancelled)
            } else {
                let requested = diesel::update(
                    jobs::table.filter(jobs::id.eq(id)).filter(jobs::state.eq(JobState::Running)),
                )
                .set(jobs::cancel_requested.eq(true))
                .execute(c)?;
                (requested == 1).then_some(JobState::Running)
            }
        });
        match applied {
            Some(state) => Ok(Transition::Applied(state)),
            None => self.refused_or_missing(id),
        }
    }

    /// Retries a job now: a `dead`, `cancelled` or `retrying` job goes back to
    /// `queued`, claimable at once, its attempt history kept. A job that has
    /// used all its attempts gets one more.
    pub fn job_retry(&self, id: i64) -> Result<Transition> {
        let queue = with_conn!(self, c => diesel::update(
            jobs::table.filter(jobs::id.eq(id)).filter(jobs::state.eq_any([
                JobState::Dead,
                JobState::Cancelled,
                JobState::Retrying,
            ])),
        )
        .set(requeue(c))
        .returning(jobs::queue)
        .get_result::<String>(c)
        .optional()?);
        match queue {
            Some(queue) => {
                self.announce([queue.as_str()])?;
                Ok(Transition::Applied(JobState::Queued))
            }
            None => self.refused_or_missing(id),
        }
    }

    /// Replays every dead job matching `filter` (as [`Store::job_retry`]
    /// does one). See [`Store::jobs_dead_apply`].
    pub fn jobs_retry_dead(&self, filter: &DeadFilter) -> Result<usize> {
        self.jobs_dead_apply(filter, DeadAction::Replay, |_| {})
    }

    /// How many dead jobs match `filter`.
    pub fn jobs_dead_count(&self, filter: &DeadFilter) -> Result<i64> {
        with_conn!(self, c => {
            let mut query = jobs::table
                .filter(jobs::state.eq(JobState::Dead))
                .select(count_star())
                .into_boxed();
            if let Some(queue) = &filter.queue {
                query = query.filter(jobs::queue.eq(queue.clone()));
            }
            if let Some(kind) = &filter.kind {
                query = query.filter(jobs::kind.eq(kind.clone()));
            }
            if let Some(signature) = &filter.signature {
                query = query.filter(jobs::error_signature.eq(signature.clone()));
            }
            if let Some(ids) = &filter.ids {
                query = query.filter(jobs::id.eq_any(ids.clone()));
            }
            Ok(query.get_result(c)?)
        })
    }

    /// Replays or purges every dead job matching `filter`, 1,000 per
    /// transaction so that neither a statement nor a lock lasts long, and
    /// reports the running total to `progress` after each batch. Each job is
    /// touched at most once per call, even if it dies again meanwhile.
    /// Returns how many jobs were replayed or purged.
    pub fn jobs_dead_apply(
        &self,
        filter: &DeadFilter,
        action: DeadAction,
        mut progress: impl FnMut(usize),
    ) -> Result<usize> {
        const BATCH: i64 = 1000;
        let mut done = 0;
        let mut after = 0;
        loop {
            let (n, last, queues) = with_conn!(self, c => c.write_tx(|c| {
                let mut query = jobs::table
                    .select((jobs::id, jobs::queue))
                    .filter(jobs::state.eq(JobState::Dead))
                    .filter(jobs::id.gt(after))
                    .order(jobs::id)
                    .limit(BATCH)
                    .into_boxed();
                if let Some(queue) = &filter.queue {
                    query = query.filter(jobs::queue.eq(queue.clone()));
                }
                if let Some(kind) = &filter.kind {
                    query = query.filter(jobs::kind.eq(kind.clone()));
                }
                if let Some(signature) = &filter.signature {
                    query = query.filter(jobs::error_signature.eq(signature.clone()));
                }
                if let Some(ids) = &filter.ids {
                    query = query.filter(jobs::id.eq_any(ids.clone()));
                }
                let batch: Vec<(i64, String)> = query.load(c)?;
                let ids: Vec<i64> = batch.iter().map(|(id, _)| *id).collect();
                let still_dead = jobs::table
                    .filter(jobs::id.eq_any(&ids))
                    .filter(jobs::state.eq(JobState::Dead));
                let n = match (ids.is_empty(), action) {
                    (true, _) => 0,
                    (false, DeadAction::Replay) => {
                        diesel::update(still_dead).set(requeue(c)).execute(c)?
                    }
                    (false, DeadAction::Purge) => diesel::delete(still_dead).execute(c)?,
                };
                let queues: HashSet<String> = batch.into_iter().map(|(_, q)| q).collect();
                Ok((n, ids.last().copied(), queues))
            }))?;
            done += n;
            if action == DeadAction::Replay {
                self.announce(queues.iter().map(String::as_str))?;
            }
            match last {
                Some(last) => {
                    after = last;
                    progress(done);
                }
                None => return Ok(done),
            }
        }
    }

    /// Replays a dead or cancelled job with new args (JSON text).
    pub fn job_retry_with_args(&self, id: i64, args: &str) -> Result<Transition> {
        let queue = with_conn!(self, c => diesel::update(
            jobs::table
                .filter(jobs::id.eq(id))
                .filter(jobs::state.eq_any([JobState::Dead, JobState::Cancelled])),
        )
        .set((jobs::args.eq(args), requeue(c)))
        .returning(jobs::queue)
        .get_result::<String>(c)
        .optional()?);
        match queue {
            Some(queue) => {
                self.announce([queue.as_str()])?;
                Ok(Transition::Applied(JobState::Queued))
            }
            None => self.refused_or_missing(id),
        }
    }

    /// Retries, cancels or deletes several jobs, each as its single-job
    /// action would.
    pub fn jobs_bulk(&self, action: BulkAction, ids: &[i64]) -> Result<BulkReport> {
        let mut report = BulkReport::default();
        for &id in ids {
            let transition = match action {
                BulkAction::Retry => self.job_retry(id)?,
                BulkAction::Cancel => self.job_cancel(id)?,
                BulkAction::Delete => self.job_delete(id)?,
            };
            match transition {
                Transition::Applied(_) => report.applied += 1,
                Transition::Refused(_) => report.refused += 1,
                Transition::Missing => report.missing += 1,
            }
        }
        Ok(report)
    }

    /// Deletes a job and its attempts, unless it is running (cancel it first).
    pub fn job_delete(&self, id: i64) -> Result<Transition> {
        let deleted = with_conn!(self, c => diesel::delete(
            jobs::table.filter(jobs::id.eq(id)).filter(jobs::state.ne(JobState::Running)),
        )
        .returning(jobs::state)
        .get_result::<JobState>(c)
        .optional()?);
        match deleted {
            Some(state) => Ok(Transition::Applied(state)),
            None => self.refused_or_missing(id),
        }
    }

    /// After a guarded update changed nothing: the job's state, or missing.
    fn refused_or_missing(&self, id: i64) -> Result<Transition> {
        let state = with_conn!(self, c => jobs::table
            .find(id)
            .select(jobs::state)
            .first::<JobState>(c)
            .optional()?);
        Ok(state.map_or(Transition::Missing, Transition::Refused))
    }

    pub fn job_get(&self, id: i64) -> Result<Option<Job>> {
        with_conn!(self, c => Ok(jobs::table
            .find(id)
            .select(Job::as_select())
            .first(c)
            .optional()?))
    }

    /// Every attempt of a job, oldest first. A completed job's successful
    /// attempt, which has no row of its own, comes from the job's row (with
    /// `id` 0).
    pub fn job_attempts(&self, id: i64) -> Result<Vec<Attempt>> {
        let (mut attempts, job) = with_conn!(self, c => {
            let attempts = job_attempts::table
                .filter(job_attempts::job_id.eq(id))
                .order((job_attempts::attempt, job_attempts::id))
                .select(Attempt::as_select())
                .load(c)?;
            let job = jobs::table
                .find(id)
                .filter(jobs::state.eq(JobState::Completed))
                .select(Job::as_select())
                .first(c)
                .optional()?;
            (attempts, job)
        });
        if let Some(job) = job
            && !attempts
                .iter()
                .any(|a| a.attempt == job.attempt && a.outcome == AttemptOutcome::Completed)
        {
            let finished_at = job.finished_at.unwrap_or_default();
            attempts.push(Attempt {
                id: 0,
                job_id: job.id,
                attempt: job.attempt,
                worker: job.locked_by.unwrap_or_default(),
                started_at: job.started_at.unwrap_or(finished_at),
                finished_at,
                outcome: AttemptOutcome::Completed,
                error: None,
                detail: None,
            });
        }
        Ok(attempts)
    }

    /// Jobs matching `filter`, newest first.
    pub fn jobs_list(&self, filter: &JobFilter) -> Result<Vec<Job>> {
        let limit = match filter.limit {
            0 => 25,
            n => n.clamp(1, 1000),
        };
        with_conn!(self, c => {
            let mut query = jobs::table.select(Job::as_select()).into_boxed();
            if !filter.states.is_empty() {
                query = query.filter(super::state_in(&filter.states));
            }
            if let Some(queue) = &filter.queue {
                query = query.filter(jobs::queue.eq(queue.clone()));
            }
            if let Some(kind) = &filter.kind {
                query = query.filter(jobs::kind.eq(kind.clone()));
            }
            if let Some(before) = filter.before_id {
                query = query.filter(jobs::id.lt(before));
            }
            if let Some(text) = &filter.search {
                let pattern = format!("%{}%", escape_like(&text.to_lowercase()));
                query = query.filter(
                    sql::<Bool>("(LOWER(jobs.args) LIKE ")
                        .bind::<Text, _>(pattern.clone())
                        .sql(" ESCAPE '\\' OR LOWER(COALESCE(jobs.last_error, '')) LIKE ")
                        .bind::<Text, _>(pattern)
                        .sql(" ESCAPE '\\')"),
                );
            }
            if let Some(signature) = &filter.signature {
                query = query.filter(jobs::error_signature.eq(signature.clone()));
            }
            if let Some(ahead) = filter.scheduled {
                let op = if ahead { ">" } else { "<=" };
                query = query.filter(sql::<Bool>(&format!("jobs.run_at {op} {}", now_sql(c))));
            }
            Ok(query.order(jobs::id.desc()).limit(limit).load(c)?)
        })
    }

    /// How many jobs each queue has in each state (absent pairs are zero).
    pub fn jobs_count(&self) -> Result<Vec<QueueCount>> {
        let rows = with_conn!(self, c => jobs::table
            .group_by((jobs::queue, jobs::state))
            .select((jobs::queue, jobs::state, count_star()))
            .load::<(String, JobState, i64)>(c)?);
        Ok(rows
            .into_iter()
            .map(|(queue, state, count)| QueueCount {
                queue,
                state,
                count,
            })
            .collect())
    }

    /// Pauses or resumes a queue: workers claim nothing from a paused queue.
    pub fn queue_set_paused(&self, name: &str, paused: bool) -> Result<()> {
        with_conn!(self, c => {
            let now = now(c);
            diesel::insert_into(queues::table)
                .values((queues::name.eq(name), queues::paused.eq(paused), queues::updated_at.eq(now)))
                .on_conflict(queues::name)
                .do_update()
                .set((
                    queues::paused.eq(diesel::upsert::excluded(queues::paused)),
                    queues::updated_at.eq(diesel::upsert::excluded(queues::updated_at)),
                ))
                .execute(c)?;
        });
        if !paused {
            self.announce([name])?;
        }
        Ok(())
    }

    /// Queues an operator has paused or resumed.
    pub fn queues_list(&self) -> Result<Vec<QueueInfo>> {
        with_conn!(self, c => Ok(queues::table
            .order(queues::name)
            .select(QueueInfo::as_select())
            .load(c)?))
    }

    /// Tells workers, here and (on PostgreSQL) in other processes, that these
    /// queues have claimable jobs.
    fn announce<'q>(&self, queues: impl IntoIterator<Item = &'q str>) -> Result<()> {
        let queues: HashSet<&str> = queues.into_iter().collect();
        if let Pool::Postgres(pool) = &self.pool {
            let c = &mut pool.get()?;
            for queue in &queues {
                diesel::sql_query("SELECT pg_notify($1, $2)")
                    .bind::<Text, _>(NOTIFY_CHANNEL)
                    .bind::<Text, _>(queue)
                    .execute(c)?;
            }
        }
        for queue in queues {
            self.wake.notify(queue);
        }
        Ok(())
    }
}

/// The columns a job gets when it is retried or replayed: queued, claimable
/// now, with one more attempt if it had used them all.
#[allow(clippy::type_complexity)]
fn requeue<C: Dialect>(
    c: &C,
) -> (
    diesel::dsl::Eq<jobs::state, JobState>,
    diesel::dsl::Eq<jobs::run_at, diesel::expression::SqlLiteral<BigInt>>,
    diesel::dsl::Eq<jobs::finished_at, Option<i64>>,
    diesel::dsl::Eq<jobs::cancel_requested, bool>,
    diesel::dsl::Eq<jobs::rescue_count, i32>,
    diesel::dsl::Eq<jobs::max_attempts, diesel::expression::SqlLiteral<Integer>>,
    diesel::dsl::Eq<jobs::error_signature, Option<String>>,
) {
    (
        jobs::state.eq(JobState::Queued),
        jobs::run_at.eq(now(c)),
        jobs::finished_at.eq(None::<i64>),
        jobs::cancel_requested.eq(false),
        jobs::rescue_count.eq(0),
        jobs::max_attempts.eq(sql::<Integer>(
            "CASE WHEN max_attempts > attempt THEN max_attempts ELSE attempt + 1 END",
        )),
        jobs::error_signature.eq(None::<String>),
    )
}

/// The columns a job gets when it leaves `running` without finishing its
/// attempt (snooze, release): back to `queued` at now + `delay_ms`, the
/// attempt not counted; `cancelled` if that was requested meanwhile.
#[allow(clippy::type_complexity)]
fn unclaim<C: Dialect>(
    c: &C,
    delay_ms: i64,
) -> (
    diesel::dsl::Eq<jobs::state, diesel::expression::SqlLiteral<Text>>,
    diesel::dsl::Eq<jobs::attempt, diesel::dsl::Sub<jobs::attempt, i32>>,
    diesel::dsl::Eq<jobs::run_at, NowPlus>,
    diesel::dsl::Eq<jobs::finished_at, diesel::expression::SqlLiteral<Nullable<BigInt>>>,
    diesel::dsl::Eq<jobs::locked_by, Option<String>>,
    diesel::dsl::Eq<jobs::heartbeat_at, Option<i64>>,
    diesel::dsl::Eq<jobs::deadline_at, Option<i64>>,
) {
    (
        jobs::state.eq(sql::<Text>(
            "CASE WHEN cancel_requested THEN 'cancelled' ELSE 'queued' END",
        )),
        jobs::attempt.eq(jobs::attempt - 1),
        jobs::run_at.eq(now_plus(c, delay_ms)),
        jobs::finished_at.eq(sql::<Nullable<BigInt>>(&format!(
            "CASE WHEN cancel_requested THEN {} END",
            C::NOW
        ))),
        jobs::locked_by.eq(None::<String>),
        jobs::heartbeat_at.eq(None::<i64>),
        jobs::deadline_at.eq(None::<i64>),
    )
}

/// Enqueues `new` inside the caller's write transaction.
fn enqueue_in<C: JobSql>(c: &mut C, new: &[NewJob]) -> Result<Vec<Enqueued>> {
    let mut results: Vec<Option<Enqueued>> = vec![None; new.len()];
    // An existing job can finish between the insert (which saw its key
    // taken) and the lookup (which no longer finds it unfinished); such jobs
    // go round again (READ COMMITTED: each statement sees the latest commits)
    // and are created this time.
    for _round in 0..3 {
        let todo: Vec<usize> = (0..new.len()).filter(|&i| results[i].is_none()).collect();
        if todo.is_empty() {
            break;
        }
        let rows: Vec<EnqueueRow> = todo.iter().map(|&i| EnqueueRow::new(&new[i])).collect();
        let keys: Vec<&str> = rows.iter().filter_map(|r| r.unique_key).collect();
        let inserted = c.enqueue(&rows)?;
        let holders = if keys.is_empty() {
            Vec::new()
        } else {
            c.unique_key_holders(&keys)?
        };
        assign_enqueued(&rows, &todo, inserted, holders, &mut results);
    }
    results
        .into_iter()
        .map(|r| {
            r.ok_or_else(|| {
                super::Error::Conflict(
                    "a unique key kept changing hands while enqueueing; try again".into(),
                )
            })
        })
        .collect()
}

/// Matches inserted rows and existing unique-key holders to the input rows.
fn assign_enqueued(
    rows: &[EnqueueRow],
    todo: &[usize],
    mut inserted: Vec<InsertedRow>,
    existing: Vec<(i64, Option<String>, JobState)>,
    results: &mut [Option<Enqueued>],
) {
    // Ids come from a sequence in insertion order, and rows are inserted in
    // input order, so sorted ids line up with the inputs that were inserted.
    inserted.sort_by_key(|r| r.id);
    let inserted_keys: HashSet<String> = inserted
        .iter()
        .filter_map(|r| r.unique_key.clone())
        .collect();
    let holders: HashMap<String, (i64, JobState)> = existing
        .into_iter()
        .filter_map(|(id, key, state)| key.map(|k| (k, (id, state))))
        .collect();
    let mut ids = inserted.into_iter().map(|r| r.id);
    let mut keys_taken: HashSet<&str> = HashSet::new();
    for (row, &index) in rows.iter().zip(todo) {
        let was_inserted = match row.unique_key {
            None => true,
            Some(key) => keys_taken.insert(key) && inserted_keys.contains(key),
        };
        results[index] = if was_inserted {
            ids.next().map(|id| Enqueued {
                id,
                state: JobState::Queued,
                created: true,
            })
        } else {
            row.unique_key
                .and_then(|key| holders.get(key))
                .map(|&(id, state)| Enqueued {
                    id,
                    state,
                    created: false,
                })
        };
    }
}

// ---------------------------------------------------------------------------
// Backend differences: the hot-path statements.
//
// PostgreSQL: one statement per batch. The claim must use FOR UPDATE SKIP
// LOCKED: under READ COMMITTED a plain `UPDATE … WHERE id IN (SELECT … LIMIT
// n)` lets concurrent claimers pick the same rows. Batches travel as arrays
// or one JSON parameter, so the SQL text never depends on the batch size.
//
// SQLite: there is one writer at a time (BEGIN IMMEDIATE) and no network, so
// SKIP LOCKED is neither available nor needed, and a loop of single-row
// statements inside one transaction costs no round trips.
// ---------------------------------------------------------------------------

/// The statements whose SQL differs between the backends (and, through
/// [`same_on_both`], a few that do not but are needed by generic code).
trait JobSql: Dialect {
    /// Unfinished jobs holding any of `keys`: id, key, state.
    fn unique_key_holders(&mut self, keys: &[&str])
    -> Result<Vec<(i64, Option<String>, JobState)>>;
    /// Inserts `rows`, skipping those whose unique key is held, and
    /// announces the due ones.
    fn enqueue(&mut self, rows: &[EnqueueRow]) -> Result<Vec<InsertedRow>>;
    fn claim(&mut self, queue: &str, worker: &str, limit: i64) -> Result<Vec<Job>>;
    fn heartbeat(&mut self, leases: &[Lease]) -> Result<Vec<(i64, bool)>>;
    fn complete(&mut self, leases: &[Lease]) -> Result<Vec<i64>>;
}

/// PostgreSQL: the rows held under `leases`, for a fenced batch update:
/// binds ids, lease ids, and their count (see [`lease_arrays`]).
///
/// The state is matched through the join (`held.state`, an array of
/// 'running'), not as the constant `jobs.state = 'running'`: a constant lets
/// the planner reach the rows through an index on `state`, which it does
/// when statistics taken before a burst of claims say almost nothing runs —
/// then it scans every running row once per lease (measured: 13 s for 1,000
/// leases with 85,000 running). Through the join, the only way in is the
/// primary key, one probe per lease, whatever the statistics say. (Looking
/// each lease up by `array_position` was measured slower with fresh
/// statistics and with stale.)
macro_rules! held_running {
    () => {
        "FROM unnest(?::BIGINT[], ?::BIGINT[], array_fill('running'::TEXT, ARRAY[?::INTEGER]))
                AS held(id, lease_id, state)
            WHERE jobs.id = held.id AND jobs.lease_id = held.lease_id AND jobs.state = held.state"
    };
}

fn lease_arrays(leases: &[Lease]) -> (Vec<i64>, Vec<i64>, i32) {
    let (ids, lease_ids): (Vec<i64>, Vec<i64>) = leases.iter().map(|l| (l.id, l.lease_id)).unzip();
    let count = i32::try_from(ids.len()).unwrap_or(i32::MAX);
    (ids, lease_ids, count)
}

/// Method bodies written once for both connection types.
macro_rules! same_on_both {
    () => {
        fn unique_key_holders(
            &mut self,
            keys: &[&str],
        ) -> Result<Vec<(i64, Option<String>, JobState)>> {
            Ok(jobs::table
                .filter(jobs::unique_key.eq_any(keys))
                .filter(jobs::state.eq_any(UNFINISHED))
                .select((jobs::id, jobs::unique_key, jobs::state))
                .load(self)?)
        }
    };
}

impl JobSql for PgConnection {
    same_on_both!();

    fn enqueue(&mut self, rows: &[EnqueueRow]) -> Result<Vec<InsertedRow>> {
        let rows_json = serde_json::to_string(rows).expect("enqueue rows serialize");
        // ORDER BY ord: ids are drawn in insertion order (see
        // `assign_enqueued`). The `woken` CTE sends one NOTIFY per queue with
        // due jobs, delivered when the transaction commits; the cross join
        // makes PostgreSQL evaluate it.
        const SQL: &str = concat!(
            "WITH input AS (
                SELECT e.j, e.ord FROM jsonb_array_elements(?::jsonb) WITH ORDINALITY AS e(j, ord)
            ), inserted AS (
                INSERT INTO jobs (queue, kind, args, state, priority, max_attempts, timeout_ms,
                                  run_at, created_at, unique_key)
                SELECT j->>'queue', j->>'kind', j->>'args', 'queued', (j->>'priority')::INTEGER,
                       (j->>'max_attempts')::INTEGER, (j->>'timeout_ms')::BIGINT,
                       COALESCE((j->>'run_at')::BIGINT, ",
            pg_now!(),
            " + (j->>'delay_ms')::BIGINT),
                       ",
            pg_now!(),
            ", j->>'unique_key'
                FROM input ORDER BY ord
                ON CONFLICT (unique_key)
                    WHERE unique_key IS NOT NULL AND state IN ('queued', 'running', 'retrying')
                    DO NOTHING
                RETURNING id, unique_key, queue, run_at
            ), woken AS (
                SELECT pg_notify('errand_jobs', queue)
                FROM (SELECT DISTINCT queue FROM inserted WHERE run_at <= ",
            pg_now!(),
            ") due
            )
            SELECT id, unique_key FROM inserted CROSS JOIN (SELECT count(*) FROM woken) AS w"
        );
        Ok(prepared(SQL).bind::<Text, _>(rows_json).load(self)?)
    }

    fn claim(&mut self, queue: &str, worker: &str, limit: i64) -> Result<Vec<Job>> {
        // The clock is read once, and compared through a scalar subquery:
        // joined as a table instead, it hides from the planner that the index
        // scan is already in claim order, and every claim sorted the whole
        // backlog (measured: 60 ms per claim at 100,000 queued jobs).
        const SQL: &str = concat!(
            "WITH clock AS MATERIALIZED (SELECT ",
            pg_now!(),
            " AS now),
            next AS (
                SELECT jobs.id FROM jobs
                WHERE jobs.queue = ? AND jobs.state IN ('queued', 'retrying')
                  AND jobs.run_at <= (SELECT now FROM clock)
                  AND NOT EXISTS (SELECT 1 FROM queues WHERE queues.name = ? AND queues.paused)
                ORDER BY jobs.priority, jobs.run_at, jobs.id
                LIMIT ?
                FOR UPDATE OF jobs SKIP LOCKED
            )
            UPDATE jobs SET state = 'running', attempt = jobs.attempt + 1,
                lease_id = jobs.lease_id + 1, locked_by = ?, started_at = clock.now,
                heartbeat_at = clock.now, deadline_at = clock.now + jobs.timeout_ms,
                finished_at = NULL
            FROM next, clock
            WHERE jobs.id = next.id
            RETURNING jobs.*"
        );
        Ok(prepared(SQL)
            .bind::<Text, _>(queue)
            .bind::<Text, _>(queue)
            .bind::<BigInt, _>(limit)
            .bind::<Text, _>(worker)
            .load(self)?)
    }

    fn heartbeat(&mut self, leases: &[Lease]) -> Result<Vec<(i64, bool)>> {
        const SQL: &str = concat!(
            "UPDATE jobs SET heartbeat_at = ",
            pg_now!(),
            "
            ",
            held_running!(),
            "
            RETURNING jobs.id, jobs.cancel_requested"
        );
        let (ids, lease_ids, count) = lease_arrays(leases);
        let rows: Vec<HeldRow> = prepared(SQL)
            .bind::<Array<BigInt>, _>(ids)
            .bind::<Array<BigInt>, _>(lease_ids)
            .bind::<Integer, _>(count)
            .load(self)?;
        Ok(rows
            .into_iter()
            .map(|r| (r.id, r.cancel_requested))
            .collect())
    }

    fn complete(&mut self, leases: &[Lease]) -> Result<Vec<i64>> {
        // No `job_attempts` row: the successful attempt is the job row itself
        // (see `Store::job_attempts`).
        const SQL: &str = concat!(
            "UPDATE jobs SET state = 'completed', finished_at = ",
            pg_now!(),
            "
            ",
            held_running!(),
            "
            RETURNING jobs.id"
        );
        let (ids, lease_ids, count) = lease_arrays(leases);
        let rows: Vec<IdRow> = prepared(SQL)
            .bind::<Array<BigInt>, _>(ids)
            .bind::<Array<BigInt>, _>(lease_ids)
            .bind::<Integer, _>(count)
            .load(self)?;
        Ok(rows.into_iter().map(|r| r.id).collect())
    }
}

impl JobSql for SqliteConnection {
    same_on_both!();

    fn enqueue(&mut self, rows: &[EnqueueRow]) -> Result<Vec<InsertedRow>> {
        // jsonb_each, not json_each: it hands each element over as binary
        // JSON, which `->>` reads without parsing text again per field; and
        // each job is an array, whose fields `->>` finds by position.
        // `WHERE true` resolves SQLite's parsing ambiguity between a join
        // constraint and the upsert's ON CONFLICT after INSERT … SELECT.
        const SQL: &str = concat!(
            "INSERT INTO jobs (queue, kind, args, state, priority, max_attempts, timeout_ms,
                               run_at, created_at, unique_key)
            SELECT value->>0, value->>1, value->>2, 'queued', value->>3, value->>4, value->>5,
                   COALESCE(value->>6, ",
            sqlite_now!(),
            " + value->>7), ",
            sqlite_now!(),
            ", value->>8
            FROM jsonb_each(?) WHERE true ORDER BY key
            ON CONFLICT (unique_key)
                WHERE unique_key IS NOT NULL AND state IN ('queued', 'running', 'retrying')
                DO NOTHING
            RETURNING id, unique_key"
        );
        let tuples: Vec<_> = rows
            .iter()
            .map(|r| {
                (
                    r.queue,
                    r.kind,
                    r.args,
                    r.priority,
                    r.max_attempts,
                    r.timeout_ms,
                    r.run_at,
                    r.delay_ms,
                    r.unique_key,
                )
            })
            .collect();
        let rows_json = serde_json::to_string(&tuples).expect("enqueue rows serialize");
        Ok(prepared(SQL).bind::<Text, _>(rows_json).load(self)?)
    }

    fn claim(&mut self, queue: &str, worker: &str, limit: i64) -> Result<Vec<Job>> {
        const SQL: &str = concat!(
            "UPDATE jobs SET state = 'running', attempt = attempt + 1, lease_id = lease_id + 1,
                locked_by = ?, started_at = ",
            sqlite_now!(),
            ", heartbeat_at = ",
            sqlite_now!(),
            ",
                deadline_at = ",
            sqlite_now!(),
            " + timeout_ms, finished_at = NULL
            WHERE id IN (
                SELECT id FROM jobs
                WHERE queue = ? AND state IN ('queued', 'retrying') AND run_at <= ",
            sqlite_now!(),
            "
                  AND NOT EXISTS (SELECT 1 FROM queues WHERE name = ? AND paused)
                ORDER BY priority, run_at, id
                LIMIT ?)
            RETURNING *"
        );
        self.write_tx(|c| {
            Ok(prepared(SQL)
                .bind::<Text, _>(worker)
                .bind::<Text, _>(queue)
                .bind::<Text, _>(queue)
                .bind::<BigInt, _>(limit)
                .load(c)?)
        })
    }

    fn heartbeat(&mut self, leases: &[Lease]) -> Result<Vec<(i64, bool)>> {
        self.write_tx(|c| {
            let mut held = Vec::with_capacity(leases.len());
            for lease in leases {
                let now = now(c);
                let cancel = diesel::update(fenced(lease.id, lease.lease_id))
                    .set(jobs::heartbeat_at.eq(now.nullable()))
                    .returning(jobs::cancel_requested)
                    .get_result::<bool>(c)
                    .optional()?;
                held.extend(cancel.map(|cancel| (lease.id, cancel)));
            }
            Ok(held)
        })
    }

    fn complete(&mut self, leases: &[Lease]) -> Result<Vec<i64>> {
        // One statement for the batch, the leases as a JSON array of
        // [id, lease_id] pairs; no `job_attempts` row (see PostgreSQL's). A
        // row-value IN, not UPDATE … FROM: SQLite then looks each pair up by
        // id instead of scanning every running job once per pair.
        const SQL: &str = concat!(
            "UPDATE jobs SET state = 'completed', finished_at = ",
            sqlite_now!(),
            "
            WHERE (id, lease_id) IN (SELECT value->>0, value->>1 FROM json_each(?))
              AND state = 'running'
            RETURNING id"
        );
        let pairs: Vec<[i64; 2]> = leases.iter().map(|l| [l.id, l.lease_id]).collect();
        let json = serde_json::to_string(&pairs).expect("integers serialize");
        let rows: Vec<IdRow> = prepared(SQL).bind::<Text, _>(json).load(self)?;
        Ok(rows.into_iter().map(|r| r.id).collect())
    }
}
