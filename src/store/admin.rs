//! Operator reads and records: the per-queue overview behind `/api/queues`
//! and the dashboard, and the audit log of every operator action.

use std::collections::BTreeMap;

use diesel::dsl::{count_star, sql};
use diesel::prelude::*;
use diesel::sql_types::{BigInt, Nullable};

use super::{Dialect, JobState, Result, Store, now};
use crate::schema::{audit_log, jobs, queues};

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
