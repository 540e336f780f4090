//! Operator reads and records: the per-queue overview behind `/api/queues`
//! and the dashboard, and the audit log of every operator action.

use std::collections::BTreeMap;

use diesel::dsl::{count_star, sql};
use diesel::prelude::*;
use diesel::sql_types::{BigInt, Bool, Nullable};

use super::{Dialect, JobState, Result, Store, now};
use crate::schema::{audit_log, job_attempts, jobs, queues};

/// The predicates of the partial indexes `jobs_unfinished` and
/// `jobs_dead_groups`, as the queries must spell them to use them.
const UNFINISHED_SQL: &str = "jobs.state IN ('queued', 'retrying', 'running')";
const DEAD_SQL: &str = "jobs.state = 'dead'";

/// One queue at a glance.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct QueueOverview {
    pub name: String,
    pub paused: bool,
    /// Jobs per state (states with none are absent).
    pub counts: BTreeMap<JobState, i64>,
    /// `queued` jobs whose `run_at` is still ahead (also in `counts`).
    pub scheduled: i64,
    /// `run_at` of the oldest job that is claimable now: how long the
    /// backlog has waited.
    pub oldest_claimable_at: Option<i64>,
}

impl QueueOverview {
    pub fn count(&self, state: JobState) -> i64 {
        self.counts.get(&state).copied().unwrap_or(0)
    }
}

/// A row of `audit_log`.
#[derive(Debug, Clone, PartialEq, Eq, Queryable, Selectable)]
#[diesel(table_name = audit_log)]
pub struct AuditEntry {
    pub id: i64,
    pub at: i64,
    /// Who: `api:<token fingerprint>`, `api:local`, or a dashboard user.
    pub actor: String,
    /// What, as `noun.verb`: `job.retry`, `dead.replay`, `queue.pause`, …
    pub action: String,
    /// On what: `job 42`, `queue mail`, a filter.
    pub target: String,
    /// How many jobs it touched.
    pub jobs: i64,
    pub detail: Option<String>,
}

impl Store {
    /// Every queue that has jobs or has been paused, by name, with its
    /// counts and backlog age (database clock: compare with
    /// [`Store::now_ms`]).
    pub fn queues_overview(&self) -> Result<Vec<QueueOverview>> {
        let (rows, paused) = with_conn!(self, c => {
            let scheduled = sql::<BigInt>(&format!(
                "COUNT(CASE WHEN jobs.state = 'queued' AND jobs.run_at > {} THEN 1 END)",
                now_sql(c)
            ));
            let oldest = sql::<Nullable<BigInt>>(&format!(
                "MIN(CASE WHEN jobs.state IN ('queued', 'retrying') AND jobs.run_at <= {} \
                 THEN jobs.run_at END)",
                now_sql(c)
            ));
            let rows = jobs::table
                .group_by((jobs::queue, jobs::state))
                .select((jobs::queue, jobs::state, count_star(), scheduled, oldest))
                .load::<(String, JobState, i64, i64, Option<i64>)>(c)?;
            let paused = queues::table
                .select((queues::name, queues::paused))
                .load::<(String, bool)>(c)?;
            (rows, paused)
        });
        let mut by_name: BTreeMap<String, QueueOverview> = BTreeMap::new();
        for (name, paused) in paused {
            by_name
                .entry(name.clone())
                .or_insert_with(|| QueueOverview {
                    name,
                    ..QueueOverview::default()
                })
                .paused = paused;
        }
        for (name, state, count, scheduled, oldest) in rows {
            let q = by_name
                .entry(name.clone())
                .or_insert_with(|| QueueOverview {
                    name,
                    ..QueueOverview::default()
                });
            q.counts.insert(state, count);
            q.scheduled += scheduled;
            q.oldest_claimable_at = match (q.oldest_claimable_at, oldest) {
                (Some(a), Some(b)) => Some(a.min(b)),
                (a, b) => a.or(b),
            };
        }
        Ok(by_name.into_values().collect())
    }

    /// Records an operator action.
    pub fn audit_record(
        &self,
        actor: &str,
        action: &str,
        target: &str,
        jobs: i64,
        detail: Option<&str>,
    ) -> Result<()> {
        with_conn!(self, c => {
            let now = now(c);
            diesel::insert_into(audit_log::table)
                .values((
                    audit_log::at.eq(now),
                    audit_log::actor.eq(actor),
                    audit_log::action.eq(action),
                    audit_log::target.eq(target),
                    audit_log::jobs.eq(jobs),
                    audit_log::detail.eq(detail),
                ))
                .execute(c)?;
            Ok(())
        })
    }

    /// Audit entries, newest first; `before_id` pages back.
    pub fn audit_list(&self, before_id: Option<i64>, limit: i64) -> Result<Vec<AuditEntry>> {
        with_conn!(self, c => {
            let mut query = audit_log::table.select(AuditEntry::as_select()).into_boxed();
            if let Some(before) = before_id {
                query = query.filter(audit_log::id.lt(before));
            }
            Ok(query.order(audit_log::id.desc()).limit(limit.clamp(1, 1000)).load(c)?)
        })
    }
}

fn now_sql<C: Dialect>(_: &C) -> &'static str {
    C::NOW
}

/// One queue on the dashboard: what waits, what runs, how the last hour went.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct QueueSummary {
    pub name: String,
    pub paused: bool,
    /// Queued and claimable now.
    pub ready: i64,
    /// Queued with a `run_at` still ahead.
    pub scheduled: i64,
    pub running: i64,
    pub retrying: i64,
    pub dead: i64,
    pub completed_last_hour: i64,
    /// Failed attempts in the last hour (errors, panics, timeouts, lost).
    pub failed_last_hour: i64,
    /// `run_at` of the oldest claimable job.
    pub oldest_claimable_at: Option<i64>,
}

impl QueueSummary {
    /// Failed attempts over all finished attempts in the last hour.
    pub fn failure_rate(&self) -> Option<f64> {
        let total = self.failed_last_hour + self.completed_last_hour;
        (total > 0).then(|| self.failed_last_hour as f64 / total as f64)
    }
}

/// Completions and failures in one minute.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Minute {
    /// Epoch ms of the minute's start.
    pub start: i64,
    pub completed: i64,
    pub failed: i64,
}

/// Everything the overview shows, read with index-backed queries only, so
/// that it stays fast however many finished jobs are kept.
#[derive(Debug, Clone, Default)]
pub struct Dashboard {
    pub now_ms: i64,
    pub queues: Vec<QueueSummary>,
    /// The last 60 minutes, oldest first.
    pub minutes: Vec<Minute>,
    pub workers: usize,
}

/// A group of dead letters: same kind, same error signature.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeadGroup {
    pub kind: String,
    pub signature: String,
    pub count: i64,
    pub first_at: i64,
    pub last_at: i64,
    /// The newest job of the group and its full error.
    pub sample_id: i64,
    pub sample_error: Option<String>,
}

#[derive(QueryableByName)]
struct MinuteRow {
    #[diesel(sql_type = BigInt)]
    minute: i64,
    #[diesel(sql_type = BigInt)]
    n: i64,
}

impl Store {
    /// The overview: per queue, per minute, live workers.
    pub fn dashboard(&self) -> Result<Dashboard> {
        const HOUR_MS: i64 = 3_600_000;
        let (
            now_ms,
            waiting,
            dead,
            completed,
            failed,
            done_minutes,
            failed_minutes,
            paused,
            workers,
        ) = with_conn!(self, c => {
            let now_ms: i64 = diesel::select(now(c)).get_result(c)?;
            let hour_ago = now_ms - HOUR_MS;
            // Unfinished jobs: the partial indexes and (state, id) hold them.
            let scheduled = sql::<BigInt>(&format!(
                "COUNT(CASE WHEN jobs.state = 'queued' AND jobs.run_at > {now_ms} THEN 1 END)"
            ));
            let oldest = sql::<Nullable<BigInt>>(&format!(
                "MIN(CASE WHEN jobs.state IN ('queued', 'retrying') AND jobs.run_at <= {now_ms} \
                 THEN jobs.run_at END)"
            ));
            // Literal predicates, here and below, so that the partial
            // indexes `jobs_unfinished` and `jobs_dead_groups` apply: SQLite
            // uses a partial index only for a term identical to its WHERE,
            // and PostgreSQL cannot prove one from a bound array.
            let waiting = jobs::table
                .filter(sql::<Bool>(UNFINISHED_SQL))
                .group_by((jobs::queue, jobs::state))
                .select((jobs::queue, jobs::state, count_star(), scheduled, oldest))
                .load::<(String, JobState, i64, i64, Option<i64>)>(c)?;
            let dead = jobs::table
                .filter(sql::<Bool>(DEAD_SQL))
                .group_by(jobs::queue)
                .select((jobs::queue, count_star()))
                .load::<(String, i64)>(c)?;
            let completed = jobs::table
                .filter(super::state_in(&[JobState::Completed]))
                .filter(jobs::finished_at.ge(hour_ago))
                .group_by(jobs::queue)
                .select((jobs::queue, count_star()))
                .load::<(String, i64)>(c)?;
            // A literal predicate, so that the partial index on failed
            // attempts applies (a bound value would hide it from SQLite).
            let failed = job_attempts::table
                .inner_join(jobs::table)
                .filter(sql::<Bool>(super::alerts::FAILED_ATTEMPT_SQL))
                .filter(job_attempts::finished_at.ge(hour_ago))
                .group_by(jobs::queue)
                .select((jobs::queue, count_star()))
                .load::<(String, i64)>(c)?;
            // Instants are integers formatted by us, never user input.
            let start = now_ms - HOUR_MS;
            let done_minutes: Vec<MinuteRow> = diesel::sql_query(format!(
                "SELECT (finished_at - {start}) / 60000 AS minute, COUNT(*) AS n FROM jobs \
                 WHERE state = 'completed' AND finished_at >= {start} GROUP BY 1"
            ))
            .load(c)?;
            let failed_minutes: Vec<MinuteRow> = diesel::sql_query(format!(
                "SELECT (finished_at - {start}) / 60000 AS minute, COUNT(*) AS n FROM job_attempts \
                 WHERE outcome <> 'completed' AND outcome <> 'snoozed' AND finished_at >= {start} GROUP BY 1"
            ))
            .load(c)?;
            let paused = queues::table
                .select((queues::name, queues::paused))
                .load::<(String, bool)>(c)?;
            let workers: i64 = crate::schema::workers::table.count().get_result(c)?;
            (now_ms, waiting, dead, completed, failed, done_minutes, failed_minutes, paused, workers)
        });
        let mut by_name: BTreeMap<String, QueueSummary> = BTreeMap::new();
        fn entry(map: &mut BTreeMap<String, QueueSummary>, name: String) -> &mut QueueSummary {
            map.entry(name.clone()).or_insert_with(|| QueueSummary {
                name,
                ..QueueSummary::default()
            })
        }
        for (name, paused) in paused {
            entry(&mut by_name, name).paused = paused;
        }
        for (name, state, count, scheduled, oldest) in waiting {
            let q = entry(&mut by_name, name);
            match state {
                JobState::Queued => {
                    q.ready += count - scheduled;
                    q.scheduled += scheduled;
                }
                JobState::Retrying => q.retrying += count,
                _ => q.running += count,
            }
            q.oldest_claimable_at = match (q.oldest_claimable_at, oldest) {
                (Some(a), Some(b)) => Some(a.min(b)),
                (a, b) => a.or(b),
            };
        }
        for (name, n) in dead {
            entry(&mut by_name, name).dead = n;
        }
        for (name, n) in completed {
            entry(&mut by_name, name).completed_last_hour = n;
        }
        for (name, n) in failed {
            entry(&mut by_name, name).failed_last_hour = n;
        }
        let start = now_ms - HOUR_MS;
        let mut minutes: Vec<Minute> = (0..60)
            .map(|i| Minute {
                start: start + i * 60_000,
                ..Minute::default()
            })
            .collect();
        for row in done_minutes {
            if let Some(m) = minutes.get_mut(usize::try_from(row.minute).unwrap_or(usize::MAX)) {
                m.completed = row.n;
            }
        }
        for row in failed_minutes {
            if let Some(m) = minutes.get_mut(usize::try_from(row.minute).unwrap_or(usize::MAX)) {
                m.failed = row.n;
            }
        }
        Ok(Dashboard {
            now_ms,
            queues: by_name.into_values().collect(),
            minutes,
            workers: usize::try_from(workers).unwrap_or(0),
        })
    }

    /// Dead letters grouped by kind and error signature, largest first.
    pub fn dead_groups(&self, queue: Option<&str>, kind: Option<&str>) -> Result<Vec<DeadGroup>> {
        let rows = with_conn!(self, c => {
            let mut query = jobs::table
                .filter(sql::<Bool>(DEAD_SQL))
                .group_by((jobs::kind, jobs::error_signature))
                .select((
                    jobs::kind,
                    jobs::error_signature,
                    count_star(),
                    diesel::dsl::min(jobs::finished_at),
                    diesel::dsl::max(jobs::finished_at),
                    diesel::dsl::max(jobs::id),
                ))
                .into_boxed();
            if let Some(queue) = queue {
                query = query.filter(jobs::queue.eq(queue.to_string()));
            }
            if let Some(kind) = kind {
                query = query.filter(jobs::kind.eq(kind.to_string()));
            }
            query
                .order(count_star().desc())
                .limit(200)
                .load::<(String, Option<String>, i64, Option<i64>, Option<i64>, Option<i64>)>(c)?
        });
        let sample_ids: Vec<i64> = rows.iter().filter_map(|r| r.5).collect();
        let samples: BTreeMap<i64, Option<String>> = with_conn!(self, c => jobs::table
            .filter(jobs::id.eq_any(&sample_ids))
            .select((jobs::id, jobs::last_error))
            .load::<(i64, Option<String>)>(c)?)
        .into_iter()
        .collect();
        Ok(rows
            .into_iter()
            .map(|(kind, signature, count, first, last, sample)| {
                let sample_id = sample.unwrap_or_default();
                DeadGroup {
                    kind,
                    signature: signature.unwrap_or_default(),
                    count,
                    first_at: first.unwrap_or_default(),
                    last_at: last.unwrap_or_default(),
                    sample_id,
                    sample_error: samples.get(&sample_id).cloned().flatten(),
                }
            })
            .collect())
    }
}

impl Store {
    /// Queue names worth offering as filters: paused queues, queues live
    /// workers serve, and queues with unfinished or dead jobs (read through
    /// the indexes on those states, never the whole table).
    pub fn dashboard_queue_names(&self) -> Result<Vec<String>> {
        let (paused, served, active) = with_conn!(self, c => {
            let paused = queues::table.select(queues::name).load::<String>(c)?;
            let served = crate::schema::workers::table
                .select(crate::schema::workers::queues)
                .load::<String>(c)?;
            // One query per partial index: each reads its index only.
            let unfinished = jobs::table
                .filter(sql::<Bool>(UNFINISHED_SQL))
                .select(jobs::queue)
                .distinct()
                .load::<String>(c)?;
            let dead = jobs::table
                .filter(sql::<Bool>(DEAD_SQL))
                .select(jobs::queue)
                .distinct()
                .load::<String>(c)?;
            (paused, served, [unfinished, dead].concat())
        });
        let mut names: Vec<String> = paused;
        names.extend(active);
        for spec in served {
            names.extend(
                spec.split(',')
                    .filter_map(|q| q.split('=').next())
                    .filter(|q| !q.is_empty())
                    .map(str::to_string),
            );
        }
        names.sort();
        names.dedup();
        Ok(names)
    }
}
