//! The plain-SQL baselines `errand bench` measures errand against: what the
//! database itself allows, with none of errand's bookkeeping.
//!
//! - Enqueue: a multi-row `INSERT … VALUES (…), (…)` of 1,000 rows per
//!   statement, each statement its own transaction.
//! - Drain: one loop that claims 100 claimable rows per statement (`FOR
//!   UPDATE SKIP LOCKED` on PostgreSQL) and deletes them in one statement.
//!
//! Both run on the store's own pool, so they get the same connection settings
//! (SQLite's `synchronous`, WAL) as errand's statements.

use diesel::prelude::*;
use diesel::sql_types::{Array, BigInt, Text};

use super::jobs::IdRow;
use super::{Dialect, Result, Store};
use crate::schema::jobs;
use crate::store::types::JobState;

/// Rows per statement in the baseline drain.
pub const BASELINE_CLAIM: i64 = 100;
/// Rows per statement in the baseline enqueue.
pub const BASELINE_INSERT: usize = 1000;

impl Store {
    /// Deletes every job of `queues` (with their attempts), whatever their
    /// state; returns how many. For benchmark queues only.
    pub fn bench_clear(&self, queues: &[&str]) -> Result<usize> {
        Ok(
            with_conn!(self, c => diesel::delete(jobs::table.filter(jobs::queue.eq_any(queues)))
            .execute(c)?),
        )
    }

    /// Inserts `n` jobs of `kind` on `queue` with multi-row INSERTs of
    /// [`BASELINE_INSERT`] rows, one transaction each. `progress` hears each
    /// statement's row count.
    pub fn bench_insert_plain(
        &self,
        queue: &str,
        kind: &str,
        n: usize,
        progress: &dyn Fn(usize),
    ) -> Result<()> {
        // A minute in the past (client clock): claimable at once even if the
        // database's clock is a little behind this host's.
        let at = chrono::Utc::now().timestamp_millis() - 60_000;
        let row = (
            jobs::queue.eq(queue),
            jobs::kind.eq(kind),
            jobs::args.eq("{}"),
            jobs::state.eq(JobState::Queued),
            jobs::max_attempts.eq(crate::store::DEFAULT_MAX_ATTEMPTS),
            jobs::timeout_ms.eq(300_000_i64),
            jobs::run_at.eq(at),
            jobs::created_at.eq(at),
        );
        let mut left = n;
        while left > 0 {
            let rows = left.min(BASELINE_INSERT);
            let values = vec![row; rows];
            with_conn!(self, c => diesel::insert_into(jobs::table).values(values).execute(c)?);
            progress(rows);
            left -= rows;
        }
        Ok(())
    }

    /// Claims and deletes claimable jobs of `queue`, [`BASELINE_CLAIM`] per
    /// statement, until none is left; returns how many. `progress` hears each
    /// batch's size.
    pub fn bench_drain_plain(&self, queue: &str, progress: &dyn Fn(usize)) -> Result<usize> {
        let mut total = 0;
        with_conn!(self, c => loop {
            let ids = c.claim_plain(queue)?;
            if ids.is_empty() {
                break;
            }
            c.delete_plain(&ids)?;
            total += ids.len();
            progress(ids.len());
        });
        Ok(total)
    }
}

/// The baseline's two statements.
trait PlainSql: Dialect {
    fn claim_plain(&mut self, queue: &str) -> Result<Vec<i64>>;
    fn delete_plain(&mut self, ids: &[i64]) -> Result<()>;
}

impl PlainSql for PgConnection {
    fn claim_plain(&mut self, queue: &str) -> Result<Vec<i64>> {
        const SQL: &str = concat!(
            "UPDATE jobs SET state = 'running', locked_by = 'baseline' WHERE id IN (
                SELECT id FROM jobs
                WHERE queue = $1 AND state IN ('queued', 'retrying') AND run_at <= ",
            pg_now!(),
            "
                ORDER BY priority, run_at, id LIMIT $2
                FOR UPDATE SKIP LOCKED)
            RETURNING id"
        );
        let rows: Vec<IdRow> = diesel::sql_query(SQL)
            .bind::<Text, _>(queue)
            .bind::<BigInt, _>(BASELINE_CLAIM)
            .load(self)?;
        Ok(rows.into_iter().map(|r| r.id).collect())
    }

    fn delete_plain(&mut self, ids: &[i64]) -> Result<()> {
        diesel::sql_query("DELETE FROM jobs WHERE id = ANY($1)")
            .bind::<Array<BigInt>, _>(ids)
            .execute(self)?;
        Ok(())
    }
}

impl PlainSql for SqliteConnection {
    fn claim_plain(&mut self, queue: &str) -> Result<Vec<i64>> {
        const SQL: &str = concat!(
            "UPDATE jobs SET state = 'running', locked_by = 'baseline' WHERE id IN (
                SELECT id FROM jobs
                WHERE queue = ? AND state IN ('queued', 'retrying') AND run_at <= ",
            sqlite_now!(),
            "
                ORDER BY priority, run_at, id LIMIT ?)
            RETURNING id"
        );
        self.write_tx(|c| {
            let rows: Vec<IdRow> = diesel::sql_query(SQL)
                .bind::<Text, _>(queue)
                .bind::<BigInt, _>(BASELINE_CLAIM)
                .load(c)?;
            Ok(rows.into_iter().map(|r| r.id).collect())
        })
    }

    fn delete_plain(&mut self, ids: &[i64]) -> Result<()> {
        diesel::delete(jobs::table.filter(jobs::id.eq_any(ids))).execute(self)?;
        Ok(())
    }
}
