//! Alert statements: the values rules watch (SQL over the job tables, through
//! the partial indexes), each rule's state, and the email outbox.
//!
//! A state change and the email it causes are written in one transaction,
//! guarded by the state read before (compare-and-set on `evaluated_at`), so
//! two evaluators — an old leader and a new one — cannot both send it.

use std::time::Duration;

use diesel::dsl::{count_star, sql};
use diesel::prelude::*;
use diesel::sql_types::Bool;

use super::jobs::millis;
use super::{Dialect, Result, Store, now};
use crate::schema::{alert_outbox, alert_state, job_attempts, jobs, workers};

/// Queues an email, inside the caller's connection (and transaction).
macro_rules! insert_email {
    ($c:expr, $email:expr) => {{
        let (c, email) = ($c, $email);
        let now = now(c);
        diesel::insert_into(alert_outbox::table)
            .values((
                alert_outbox::created_at.eq(now.clone()),
                alert_outbox::rule.eq(email.rule.as_str()),
                alert_outbox::event.eq(email.event.as_str()),
                alert_outbox::subject.eq(email.subject.as_str()),
                alert_outbox::body_text.eq(email.text.as_str()),
                alert_outbox::body_html.eq(email.html.as_str()),
                alert_outbox::status.eq("pending"),
                alert_outbox::next_attempt_at.eq(now),
            ))
            .execute(c)?;
    }};
}

/// Failed attempts (the predicate of the partial index `job_attempts_failed`).
pub(crate) const FAILED_ATTEMPT_SQL: &str =
    "job_attempts.outcome <> 'completed' AND job_attempts.outcome <> 'snoozed'";
const CLAIMABLE_SQL: &str = "jobs.state IN ('queued', 'retrying')";

/// What a rule measures.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Deserialize, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Metric {
    /// Failed attempts (errors, panics, timeouts, lost) in the window.
    Failures,
    /// Failed attempts over finished attempts in the window (0 to 1).
    FailureRate,
    /// Jobs that went dead in the window.
    NewDead,
    /// Dead jobs stored.
    DeadTotal,
    /// Seconds the oldest claimable job has waited.
    BacklogAge,
    /// Jobs taken back from workers that stopped heartbeating, in the window.
    Rescued,
    /// Claimable jobs while no worker process is alive (0 while one is).
    NoWorkers,
}

impl Metric {
    pub fn as_str(self) -> &'static str {
        match self {
            Metric::Failures => "failures",
            Metric::FailureRate => "failure_rate",
            Metric::NewDead => "new_dead",
            Metric::DeadTotal => "dead_total",
            Metric::BacklogAge => "backlog_age",
            Metric::Rescued => "rescued",
            Metric::NoWorkers => "no_workers",
        }
    }
}

/// Which jobs a rule looks at, over which window.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Scope {
    pub queue: Option<String>,
    pub kind: Option<String>,
    pub window: Duration,
    /// For the failure rate: fewer finished attempts than this give no
    /// value (too little to judge).
    pub min_finished: i64,
    /// For `no_workers`: a worker silent longer than this is not alive.
    pub stale_after: Duration,
}

/// A row of `alert_state`.
#[derive(Debug, Clone, PartialEq, Queryable, Selectable, Insertable, AsChangeset)]
#[diesel(table_name = alert_state, treat_none_as_null = true)]
pub struct AlertState {
    pub rule: String,
    /// `inactive`, `pending`, `firing` or `resolved`.
    pub state: String,
    pub since: i64,
    pub value: Option<f64>,
    pub evaluated_at: i64,
    pub clear_since: Option<i64>,
    pub notified_at: Option<i64>,
    pub incident: i64,
}

/// An email for the outbox.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Email {
    pub rule: String,
    /// `firing`, `repeat`, `resolved` or `test`.
    pub event: String,
    pub subject: String,
    pub text: String,
    pub html: String,
}

/// A row of `alert_outbox`.
#[derive(Debug, Clone, PartialEq, Eq, Queryable, Selectable)]
#[diesel(table_name = alert_outbox)]
pub struct OutboxRow {
    pub id: i64,
    pub created_at: i64,
    pub rule: String,
    pub event: String,
    pub subject: String,
    pub body_text: String,
    pub body_html: String,
    /// `pending`, `sent` or `failed`.
    pub status: String,
    pub attempts: i32,
    pub next_attempt_at: i64,
    pub sent_at: Option<i64>,
    pub sent_in: Option<i64>,
    pub last_error: Option<String>,
}

/// What failed lately, for an email's detail.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct FailureContext {
    /// Queues with the most failed attempts in the window.
    pub queues: Vec<(String, i64)>,
    pub kinds: Vec<(String, i64)>,
    /// Recent failed attempts: job id, kind, error (first line).
    pub samples: Vec<(i64, String, String)>,
}

impl Store {
    /// The current value of `metric` over `scope`; `None` when there is too
    /// little to judge (a failure rate below its minimum sample).
    pub fn alert_value(&self, metric: Metric, scope: &Scope) -> Result<Option<f64>> {
        let window = millis(scope.window);
        let q = scope.queue.clone();
        let k = scope.kind.clone();
        with_conn!(self, c => {
            let now: i64 = diesel::select(now(c)).get_result(c)?;
            let since = now - window;
            macro_rules! scoped {
                ($query:expr) => {{
                    let mut query = $query.into_boxed();
                    if let Some(queue) = &q {
                        query = query.filter(jobs::queue.eq(queue.clone()));
                    }
                    if let Some(kind) = &k {
                        query = query.filter(jobs::kind.eq(kind.clone()));
                    }
                    query
                }};
            }
            let failed = |c: &mut _, outcome: Option<&'static str>| -> QueryResult<i64> {
                let mut query = scoped!(job_attempts::table
                    .inner_join(jobs::table)
                    .filter(sql::<Bool>(FAILED_ATTEMPT_SQL))
                    .filter(job_attempts::finished_at.ge(since))
                    .select(count_star()));
                if let Some(outcome) = outcome {
                    query = query.filter(job_attempts::outcome.eq(outcome));
                }
                query.get_result(c)
            };
            let value = match metric {
                Metric::Failures => Some(failed(c, None)? as f64),
                Metric::Rescued => Some(failed(c, Some("lost"))? as f64),
                Metric::FailureRate => {
                    let failures = failed(c, None)?;
                    let completed: i64 = scoped!(jobs::table
                        .filter(super::state_in(&[super::JobState::Completed]))
                        .filter(jobs::finished_at.ge(since))
                        .select(count_star()))
                    .get_result(c)?;
                    let total = failures + completed;
                    (total > 0 && total >= scope.min_finished).then(|| failures as f64 / total as f64)
                }
                Metric::NewDead => Some(scoped!(jobs::table
                    .filter(sql::<Bool>("jobs.state = 'dead'"))
                    .filter(jobs::finished_at.ge(since))
                    .select(count_star()))
                .get_result::<i64>(c)? as f64),
                Metric::DeadTotal => Some(scoped!(jobs::table
                    .filter(sql::<Bool>("jobs.state = 'dead'"))
                    .select(count_star()))
                .get_result::<i64>(c)? as f64),
                Metric::BacklogAge => {
                    let oldest: Option<i64> = scoped!(jobs::table
                        .filter(sql::<Bool>(CLAIMABLE_SQL))
                        .filter(jobs::run_at.le(now))
                        .select(diesel::dsl::min(jobs::run_at)))
                    .get_result(c)?;
                    Some(oldest.map_or(0.0, |at| (now - at).max(0) as f64 / 1000.0))
                }
                Metric::NoWorkers => {
                    let alive: i64 = workers::table
                        .filter(workers::heartbeat_at.ge(now - millis(scope.stale_after)))
                        .count()
                        .get_result(c)?;
                    if alive > 0 {
                        Some(0.0)
                    } else {
                        let waiting: i64 = scoped!(jobs::table
                            .filter(sql::<Bool>(CLAIMABLE_SQL))
                            .filter(jobs::run_at.le(now))
                            .select(count_star()))
                        .get_result(c)?;
                        Some(waiting as f64)
                    }
                }
            };
            Ok(value)
        })
    }

    /// The worst queues and kinds and a few recent errors among failed
    /// attempts in `scope`'s window, for an email.
    pub fn alert_context(&self, scope: &Scope) -> Result<FailureContext> {
        let since_window = millis(scope.window.max(Duration::from_secs(3600)));
        let q = scope.queue.clone();
        let k = scope.kind.clone();
        with_conn!(self, c => {
            let now: i64 = diesel::select(now(c)).get_result(c)?;
            let since = now - since_window;
            // Filters for the scope, added after grouping (diesel groups
            // only unboxed queries).
            macro_rules! failed_in_scope {
                ($query:expr) => {{
                    let mut query = $query
                        .filter(sql::<Bool>(FAILED_ATTEMPT_SQL))
                        .filter(job_attempts::finished_at.ge(since))
                        .into_boxed();
                    if let Some(queue) = &q {
                        query = query.filter(jobs::queue.eq(queue.clone()));
                    }
                    if let Some(kind) = &k {
                        query = query.filter(jobs::kind.eq(kind.clone()));
                    }
                    query
                }};
            }
            let queues = failed_in_scope!(job_attempts::table
                .inner_join(jobs::table)
                .group_by(jobs::queue)
                .select((jobs::queue, count_star())))
            .order(count_star().desc())
            .limit(5)
            .load::<(String, i64)>(c)?;
            let kinds = failed_in_scope!(job_attempts::table
                .inner_join(jobs::table)
                .group_by(jobs::kind)
                .select((jobs::kind, count_star())))
            .order(count_star().desc())
            .limit(5)
            .load::<(String, i64)>(c)?;
            let samples = failed_in_scope!(job_attempts::table
                .inner_join(jobs::table)
                .select((jobs::id, jobs::kind, job_attempts::error)))
            .order(job_attempts::id.desc())
            .limit(20)
            .load::<(i64, String, Option<String>)>(c)?;
            // A few distinct errors, newest first.
            let mut seen = std::collections::HashSet::new();
            let samples = samples
                .into_iter()
                .filter_map(|(id, kind, error)| {
                    let line = error.unwrap_or_default().lines().next().unwrap_or_default().to_string();
                    seen.insert(super::error_signature(&line)).then_some((id, kind, line))
                })
                .take(3)
                .collect();
            Ok(FailureContext { queues, kinds, samples })
        })
    }

    pub fn alert_state_get(&self, rule: &str) -> Result<Option<AlertState>> {
        with_conn!(self, c => Ok(alert_state::table
            .find(rule)
            .select(AlertState::as_select())
            .first(c)
            .optional()?))
    }

    /// Every rule's state.
    pub fn alert_states(&self) -> Result<Vec<AlertState>> {
        with_conn!(self, c => Ok(alert_state::table
            .order(alert_state::rule)
            .select(AlertState::as_select())
            .load(c)?))
    }

    /// Moves a rule to `next`, and queues `email` in the same transaction —
    /// only if the rule's state is still the one read (its `evaluated_at`
    /// is `read_at`, or it has no row when `read_at` is `None`). Returns
    /// false when another evaluator moved it meanwhile (nothing written).
    pub fn alert_transition(
        &self,
        read_at: Option<i64>,
        next: &AlertState,
        email: Option<&Email>,
    ) -> Result<bool> {
        with_conn!(self, c => c.write_tx(|c| {
            let written = match read_at {
                None => diesel::insert_into(alert_state::table)
                    .values(next)
                    .on_conflict_do_nothing()
                    .execute(c)?,
                Some(read_at) => diesel::update(
                    alert_state::table
                        .filter(alert_state::rule.eq(&next.rule))
                        .filter(alert_state::evaluated_at.eq(read_at)),
                )
                .set(next)
                .execute(c)?,
            };
            if written == 1 && let Some(email) = email {
                insert_email!(c, email);
            }
            Ok(written == 1)
        }))
    }

    /// Queues an email outside any rule (the test email).
    pub fn outbox_push(&self, email: &Email) -> Result<()> {
        with_conn!(self, c => {
            insert_email!(c, email);
            Ok(())
        })
    }

    /// Emails due now, oldest first.
    pub fn outbox_due(&self) -> Result<Vec<OutboxRow>> {
        with_conn!(self, c => {
            let now = now(c);
            Ok(alert_outbox::table
                .filter(sql::<Bool>("alert_outbox.status = 'pending'"))
                .filter(alert_outbox::next_attempt_at.le(now))
                .order(alert_outbox::id)
                .limit(500)
                .select(OutboxRow::as_select())
                .load(c)?)
        })
    }

    /// Emails sent since `ago` (one per delivery, however many alerts it
    /// carried), and when the oldest of them was sent.
    pub fn outbox_sent_within(&self, ago: Duration) -> Result<(i64, Option<i64>)> {
        let ago = millis(ago);
        with_conn!(self, c => {
            let now: i64 = diesel::select(now(c)).get_result(c)?;
            let carriers = alert_outbox::table
                .filter(sql::<Bool>("alert_outbox.status = 'sent' AND alert_outbox.sent_in = alert_outbox.id"))
                .filter(alert_outbox::sent_at.ge(now - ago));
            let (n, oldest): (i64, Option<i64>) = carriers
                .select((count_star(), diesel::dsl::min(alert_outbox::sent_at)))
                .get_result(c)?;
            Ok((n, oldest))
        })
    }

    /// Marks emails delivered, all in the one carried by `carrier`.
    pub fn outbox_sent(&self, ids: &[i64], carrier: i64) -> Result<()> {
        with_conn!(self, c => {
            let now = now(c);
            diesel::update(alert_outbox::table.filter(alert_outbox::id.eq_any(ids)))
                .set((
                    alert_outbox::status.eq("sent"),
                    alert_outbox::sent_at.eq(now.nullable()),
                    alert_outbox::sent_in.eq(carrier),
                    alert_outbox::attempts.eq(alert_outbox::attempts + 1),
                ))
                .execute(c)?;
            Ok(())
        })
    }

    /// Records a failed delivery: retried after `retry_in`, or, without it,
    /// given up (a permanent refusal).
    pub fn outbox_failed(
        &self,
        ids: &[i64],
        error: &str,
        retry_in: Option<Duration>,
    ) -> Result<()> {
        with_conn!(self, c => {
            let status = if retry_in.is_some() { "pending" } else { "failed" };
            diesel::update(alert_outbox::table.filter(alert_outbox::id.eq_any(ids)))
                .set((
                    alert_outbox::status.eq(status),
                    alert_outbox::attempts.eq(alert_outbox::attempts + 1),
                    alert_outbox::last_error.eq(error),
                    alert_outbox::next_attempt_at.eq(super::jobs::now_plus(c, retry_in.map(millis).unwrap_or(0))),
                ))
                .execute(c)?;
            Ok(())
        })
    }

    /// The newest emails, for the alerts page.
    pub fn outbox_recent(&self, limit: i64) -> Result<Vec<OutboxRow>> {
        with_conn!(self, c => Ok(alert_outbox::table
            .order(alert_outbox::id.desc())
            .limit(limit.clamp(1, 500))
            .select(OutboxRow::as_select())
            .load(c)?))
    }
}
