//! Coordination statements: the leader lease, the registry of live worker
//! processes, finding overdue running jobs, and pruning finished ones.
//!
//! These run on the maintenance path (a few statements every few seconds),
//! so they are written once in diesel's DSL for both backends.

use std::time::Duration;

use diesel::dsl::sql;
use diesel::prelude::*;
use diesel::sql_types::{BigInt, Nullable, Text};
use diesel::upsert::excluded;

use super::jobs::{millis, now_plus};
use super::{Dialect, JobState, Lease, Result, Store, now};
use crate::schema::{idempotency_keys, jobs, leader, workers};

/// The single leader lease's name in the `leader` table.
const MAINTENANCE: &str = "maintenance";

/// Rows deleted per statement when pruning, so that no statement holds locks
/// for long.
const PRUNE_BATCH: i64 = 1000;

/// A row of `workers`: one live errand process.
#[derive(Debug, Clone, PartialEq, Eq, Queryable, Selectable, Insertable)]
#[diesel(table_name = workers)]
pub struct WorkerInfo {
    /// `host:pid:boot-id`.
    pub id: String,
    pub host: String,
    pub pid: i32,
    /// The queues it works, as `name=concurrency,…`.
    pub queues: String,
    /// Worker threads over all its queues.
    pub concurrency: i32,
    pub version: String,
    pub started_at: i64,
    pub heartbeat_at: i64,
}

/// Who holds the leader lease.
#[derive(Debug, Clone, PartialEq, Eq, Queryable, Selectable)]
#[diesel(table_name = leader)]
pub struct LeaderTerm {
    pub name: String,
    pub holder: String,
    /// +1 each time the lease changes hands.
    pub term: i64,
    pub expires_at: i64,
}

/// A running job that the rescuer must take back.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Overdue {
    pub lease: Lease,
    pub kind: String,
    pub attempt: i32,
    pub max_attempts: i32,
    pub rescue_count: i32,
    pub locked_by: Option<String>,
    /// Milliseconds since the last heartbeat.
    pub silent_ms: i64,
    /// Milliseconds past the deadline (negative: not past it).
    pub overdue_ms: i64,
    pub timeout_ms: i64,
}

/// How long finished jobs are kept.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Retention {
    /// Default 24 h.
    pub completed: Duration,
    /// Default 24 h.
    pub cancelled: Duration,
    /// Default 30 days.
    pub dead: Duration,
}

impl Default for Retention {
    fn default() -> Self {
        Retention {
            completed: Duration::from_secs(24 * 3600),
            cancelled: Duration::from_secs(24 * 3600),
            dead: Duration::from_secs(30 * 24 * 3600),
        }
    }
}

/// What one prune pass deleted.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PruneReport {
    pub completed: usize,
    pub cancelled: usize,
    pub dead: usize,
    pub workers: usize,
    /// Expired idempotency keys.
    pub keys: usize,
}

impl PruneReport {
    pub fn jobs(&self) -> usize {
        self.completed + self.cancelled + self.dead
    }
}

/// `NOW - ms` as a nullable SQL expression, to compare with nullable instants.
fn now_minus<C: Dialect>(
    _: &C,
    ms: i64,
) -> diesel::expression::UncheckedBind<
    diesel::expression::SqlLiteral<Nullable<BigInt>>,
    diesel::dsl::AsExprOf<i64, BigInt>,
> {
    sql::<Nullable<BigInt>>(&format!("{} - ", C::NOW)).bind::<BigInt, _>(ms)
}

impl Store {
    /// Takes or renews the leader lease for `holder` until now + `ttl`.
    /// Returns the term when `holder` is the leader, `None` when another
    /// holder's lease has not expired.
    pub fn leader_acquire(&self, holder: &str, ttl: Duration) -> Result<Option<i64>> {
        let ttl = millis(ttl);
        with_conn!(self, c => c.write_tx(|c| {
            // Renew our own lease, or take over an expired one (a new term).
            let now = now(c);
            let renewed = diesel::update(
                leader::table
                    .filter(leader::name.eq(MAINTENANCE))
                    .filter(leader::holder.eq(holder).or(leader::expires_at.lt(now))),
            )
            .set((
                leader::term.eq(sql::<BigInt>("CASE WHEN holder = ")
                    .bind::<Text, _>(holder)
                    .sql(" THEN term ELSE term + 1 END")),
                leader::holder.eq(holder),
                leader::expires_at.eq(now_plus(c, ttl)),
            ))
            .returning(leader::term)
            .get_result::<i64>(c)
            .optional()?;
            if renewed.is_some() {
                return Ok(renewed);
            }
            // Nobody has ever held it: the first claimant starts term 1.
            Ok(diesel::insert_into(leader::table)
                .values((
                    leader::name.eq(MAINTENANCE),
                    leader::holder.eq(holder),
                    leader::term.eq(1_i64),
                    leader::expires_at.eq(now_plus(c, ttl)),
                ))
                .on_conflict_do_nothing()
                .returning(leader::term)
                .get_result::<i64>(c)
                .optional()?)
        }))
    }

    /// Gives up the leader lease if `holder` has it, so that another process
    /// can take over at once instead of waiting for it to expire.
    pub fn leader_resign(&self, holder: &str) -> Result<bool> {
        with_conn!(self, c => {
            let n = diesel::delete(
                leader::table
                    .filter(leader::name.eq(MAINTENANCE))
                    .filter(leader::holder.eq(holder)),
            )
            .execute(c)?;
            Ok(n == 1)
        })
    }

    /// The current leader lease, expired or not.
    pub fn leader_get(&self) -> Result<Option<LeaderTerm>> {
        with_conn!(self, c => Ok(leader::table
            .find(MAINTENANCE)
            .select(LeaderTerm::as_select())
            .first(c)
            .optional()?))
    }

    /// Registers a worker (its `started_at` and `heartbeat_at` are set to
    /// now, whatever `info` says), or refreshes a registered one: a known row
    /// keeps its `started_at` and takes the rest (an external worker's fetch
    /// may name other queues or another batch size).
    pub fn worker_register(&self, info: &WorkerInfo) -> Result<()> {
        with_conn!(self, c => {
            let now = now(c);
            diesel::insert_into(workers::table)
                .values((
                    workers::id.eq(&info.id),
                    workers::host.eq(&info.host),
                    workers::pid.eq(info.pid),
                    workers::queues.eq(&info.queues),
                    workers::concurrency.eq(info.concurrency),
                    workers::version.eq(&info.version),
                    workers::started_at.eq(now.clone()),
                    workers::heartbeat_at.eq(now),
                ))
                .on_conflict(workers::id)
                .do_update()
                .set((
                    workers::host.eq(excluded(workers::host)),
                    workers::queues.eq(excluded(workers::queues)),
                    workers::concurrency.eq(excluded(workers::concurrency)),
                    workers::version.eq(excluded(workers::version)),
                    workers::heartbeat_at.eq(excluded(workers::heartbeat_at)),
                ))
                .execute(c)?;
            Ok(())
        })
    }

    /// Refreshes a worker's heartbeat. False when its row is gone (pruned as
    /// stale): register again.
    pub fn worker_heartbeat(&self, id: &str) -> Result<bool> {
        with_conn!(self, c => {
            let now = now(c);
            let n = diesel::update(workers::table.find(id))
                .set(workers::heartbeat_at.eq(now))
                .execute(c)?;
            Ok(n == 1)
        })
    }

    /// Refreshes the heartbeat of the worker that holds the job under
    /// `lease` (an external worker's liveness shows through its jobs'
    /// heartbeats). False when no registered worker holds it.
    pub fn worker_heartbeat_holder(&self, lease: Lease) -> Result<bool> {
        with_conn!(self, c => {
            let now = now(c);
            let holder = jobs::table
                .filter(jobs::id.eq(lease.id))
                .filter(jobs::lease_id.eq(lease.lease_id))
                .select(jobs::locked_by);
            let n = diesel::update(workers::table.filter(workers::id.nullable().eq_any(holder)))
                .set(workers::heartbeat_at.eq(now))
                .execute(c)?;
            Ok(n > 0)
        })
    }

    pub fn worker_deregister(&self, id: &str) -> Result<()> {
        with_conn!(self, c => {
            diesel::delete(workers::table.find(id)).execute(c)?;
            Ok(())
        })
    }

    /// Registered worker processes, oldest first.
    pub fn workers_list(&self) -> Result<Vec<WorkerInfo>> {
        with_conn!(self, c => Ok(workers::table
            .order((workers::started_at, workers::id))
            .select(WorkerInfo::as_select())
            .load(c)?))
    }

    /// Running jobs whose worker has not heartbeated for `stale_after`, or
    /// whose deadline has passed.
    pub fn jobs_overdue(&self, stale_after: Duration) -> Result<Vec<Overdue>> {
        let stale_ms = millis(stale_after);
        let rows = with_conn!(self, c => {
            let now = now(c);
            let stale_before = now_minus(c, stale_ms);
            let now_nullable = now_minus(c, 0);
            jobs::table
                .filter(super::state_in(&[JobState::Running]))
                .filter(
                    jobs::heartbeat_at
                        .lt(stale_before)
                        .or(jobs::deadline_at.lt(now_nullable)),
                )
                .select((
                    jobs::id,
                    jobs::lease_id,
                    jobs::kind,
                    jobs::attempt,
                    jobs::max_attempts,
                    jobs::rescue_count,
                    jobs::locked_by,
                    jobs::heartbeat_at,
                    jobs::deadline_at,
                    jobs::timeout_ms,
                    now,
                ))
                .order(jobs::id)
                .load::<(i64, i64, String, i32, i32, i32, Option<String>, Option<i64>, Option<i64>, i64, i64)>(c)?
        });
        Ok(rows
            .into_iter()
            .map(
                |(
                    id,
                    lease_id,
                    kind,
                    attempt,
                    max_attempts,
                    rescue_count,
                    locked_by,
                    heartbeat_at,
                    deadline_at,
                    timeout_ms,
                    now,
                )| {
                    Overdue {
                        lease: Lease { id, lease_id },
                        kind,
                        attempt,
                        max_attempts,
                        rescue_count,
                        locked_by,
                        silent_ms: now - heartbeat_at.unwrap_or(now),
                        overdue_ms: now - deadline_at.unwrap_or(now),
                        timeout_ms,
                    }
                },
            )
            .collect())
    }

    /// Deletes finished jobs older than their retention (and their
    /// attempts), a batch per statement, workers silent for `stale_after`,
    /// and expired idempotency keys.
    pub fn jobs_prune(&self, retention: &Retention, stale_after: Duration) -> Result<PruneReport> {
        let mut report = PruneReport::default();
        for (state, keep) in [
            (JobState::Completed, retention.completed),
            (JobState::Cancelled, retention.cancelled),
            (JobState::Dead, retention.dead),
        ] {
            let keep = millis(keep);
            let mut deleted = 0;
            loop {
                let n = with_write_conn!(self, c => {
                    let cutoff = now_minus(c, keep);
                    let batch: Vec<i64> = jobs::table
                        .select(jobs::id)
                        .filter(super::state_in(&[state]))
                        .filter(jobs::finished_at.lt(cutoff))
                        .limit(PRUNE_BATCH)
                        .load(c)?;
                    // Re-checked: a replay may have revived a job since.
                    diesel::delete(
                        jobs::table
                            .filter(jobs::id.eq_any(&batch))
                            .filter(jobs::state.eq(state)),
                    )
                    .execute(c)?
                });
                deleted += n;
                if (n as i64) < PRUNE_BATCH {
                    break;
                }
            }
            match state {
                JobState::Completed => report.completed = deleted,
                JobState::Cancelled => report.cancelled = deleted,
                _ => report.dead = deleted,
            }
        }
        let stale = millis(stale_after);
        report.workers = with_conn!(self, c => {
            let cutoff = now_minus(c, stale);
            diesel::delete(workers::table.filter(workers::heartbeat_at.nullable().lt(cutoff)))
                .execute(c)?
        });
        report.keys = with_conn!(self, c => {
            let now = now(c);
            diesel::delete(idempotency_keys::table.filter(idempotency_keys::expires_at.lt(now)))
                .execute(c)?
        });
        Ok(report)
    }
}
