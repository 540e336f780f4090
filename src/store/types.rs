//! The rows and values the store reads and writes: jobs, attempts, states.
//!
//! States and attempt outcomes are stored as lowercase words (`'dead'`), the
//! same words the API and the pages use.

use std::time::Duration;

use diesel::backend::Backend;
use diesel::deserialize::{self, FromSql};
use diesel::prelude::*;
use diesel::serialize::{self, Output, ToSql};
use diesel::sql_types::Text;

use crate::schema::{job_attempts, jobs};

/// Attempts a job gets when neither the job nor its kind says otherwise.
pub const DEFAULT_MAX_ATTEMPTS: i32 = 25;
/// How long one attempt may run when neither the job nor its kind says otherwise.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(5 * 60);
/// The queue a job goes to when none is named.
pub const DEFAULT_QUEUE: &str = "default";

/// Declares an enum stored as one lowercase word in a TEXT column.
macro_rules! text_enum {
    ($(#[$meta:meta])* pub enum $name:ident { $($(#[$vmeta:meta])* $variant:ident => $text:literal,)+ }) => {
        $(#[$meta])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, diesel::expression::AsExpression, diesel::deserialize::FromSqlRow)]
        #[diesel(sql_type = Text)]
        pub enum $name { $($(#[$vmeta])* $variant,)+ }

        impl $name {
            /// Every value, in lifecycle order.
            pub const ALL: &'static [$name] = &[$($name::$variant,)+];

            /// The word stored in the database and shown everywhere.
            pub fn as_str(self) -> &'static str {
                match self { $($name::$variant => $text,)+ }
            }
        }

        impl std::fmt::Display for $name {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str(self.as_str())
            }
        }

        impl std::str::FromStr for $name {
            type Err = String;
            fn from_str(s: &str) -> Result<Self, String> {
                match s {
                    $($text => Ok($name::$variant),)+
                    other => Err(format!(
                        "unknown {} '{}': expected one of {}",
                        stringify!($name), other, [$($text),+].join(", ")
                    )),
                }
            }
        }

        impl serde::Serialize for $name {
            fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                s.serialize_str(self.as_str())
            }
        }

        impl<'de> serde::Deserialize<'de> for $name {
            fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                let s = <std::borrow::Cow<'de, str>>::deserialize(d)?;
                s.parse().map_err(serde::de::Error::custom)
            }
        }

        impl<DB> ToSql<Text, DB> for $name
        where
            DB: Backend,
            str: ToSql<Text, DB>,
        {
            fn to_sql<'b>(&'b self, out: &mut Output<'b, '_, DB>) -> serialize::Result {
                self.as_str().to_sql(out)
            }
        }

        impl<DB> FromSql<Text, DB> for $name
        where
            DB: Backend,
            String: FromSql<Text, DB>,
        {
            fn from_sql(bytes: DB::RawValue<'_>) -> deserialize::Result<Self> {
                Ok(String::from_sql(bytes)?.parse()?)
            }
        }
    };
}

text_enum! {
    /// Where a job is in its lifecycle.
    ///
    /// `queued → running → completed`; a failed attempt goes to `retrying` (or
    /// `dead` when no attempts are left); `cancelled` is an operator's choice.
    /// A `queued` job whose `run_at` is in the future is *scheduled*.
    pub enum JobState {
        /// Waiting to be claimed (or scheduled, when `run_at` is in the future).
        Queued => "queued",
        /// Claimed by a worker, which holds its lease.
        Running => "running",
        /// Failed an attempt; claimable again at `run_at`.
        Retrying => "retrying",
        /// Finished successfully. Final.
        Completed => "completed",
        /// Out of attempts or failed permanently: the dead-letter queue. Final
        /// until replayed.
        Dead => "dead",
        /// Cancelled by an operator. Final until replayed.
        Cancelled => "cancelled",
    }
}

impl JobState {
    /// Whether the job has reached the end of its lifecycle.
    pub fn is_final(self) -> bool {
        matches!(
            self,
            JobState::Completed | JobState::Dead | JobState::Cancelled
        )
    }
}

text_enum! {
    /// How one attempt ended, as recorded in `job_attempts`.
    pub enum AttemptOutcome {
        /// The handler returned `Done`.
        Completed => "completed",
        /// The handler returned an error (`Retry` or `Dead`), or the job could
        /// not be run at all (unknown kind, undecodable args).
        Error => "error",
        /// The handler panicked.
        Panic => "panic",
        /// The attempt ran past its timeout.
        Timeout => "timeout",
        /// The worker running it stopped heartbeating (killed, crashed, cut
        /// off) and the leader rescued the job.
        Lost => "lost",
        /// The handler asked to wait (`Snooze`) and said why
        /// ([`crate::job::JobContext::record`]); the attempt does not count.
        Snoozed => "snoozed",
    }
}

/// A row of `jobs`.
#[derive(Debug, Clone, PartialEq, Eq, Queryable, Selectable, QueryableByName)]
#[diesel(table_name = jobs)]
pub struct Job {
    pub id: i64,
    pub queue: String,
    pub kind: String,
    /// The arguments, as JSON text.
    pub args: String,
    pub state: JobState,
    /// Lower runs first.
    pub priority: i32,
    /// Attempts started so far (the running one included).
    pub attempt: i32,
    pub max_attempts: i32,
    /// When the job becomes claimable (epoch ms, database clock).
    pub run_at: i64,
    pub created_at: i64,
    /// When the current (or last) attempt was claimed.
    pub started_at: Option<i64>,
    /// When the job reached a final state.
    pub finished_at: Option<i64>,
    pub timeout_ms: i64,
    /// Fencing token: +1 on every claim; every later write must match it.
    pub lease_id: i64,
    /// The worker that holds (or last held) the job.
    pub locked_by: Option<String>,
    pub heartbeat_at: Option<i64>,
    /// When the running attempt passes its timeout.
    pub deadline_at: Option<i64>,
    /// Times the job was taken back from a worker that stopped heartbeating.
    pub rescue_count: i32,
    pub last_error: Option<String>,
    pub unique_key: Option<String>,
    /// Set when an operator cancels a running job; the worker sees it at its
    /// next heartbeat.
    pub cancel_requested: bool,
    /// For a dead job: its error with ids and numbers normalised away (see
    /// [`error_signature`]), which groups dead letters.
    pub error_signature: Option<String>,
}

impl Job {
    /// The lease the worker running this job holds.
    pub fn lease(&self) -> Lease {
        Lease {
            id: self.id,
            lease_id: self.lease_id,
        }
    }
}

/// A row of `job_attempts`: one per attempt, kept when the job is retried or
/// replayed.
#[derive(Debug, Clone, PartialEq, Eq, Queryable, Selectable)]
#[diesel(table_name = job_attempts)]
pub struct Attempt {
    pub id: i64,
    pub job_id: i64,
    pub attempt: i32,
    pub worker: String,
    pub started_at: i64,
    pub finished_at: i64,
    pub outcome: AttemptOutcome,
    pub error: Option<String>,
    /// What the attempt recorded, as JSON (see
    /// [`crate::job::JobContext::record`]).
    pub detail: Option<String>,
}

/// The right to write a running job's outcome: its id and the lease id its
/// claim produced.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Lease {
    pub id: i64,
    pub lease_id: i64,
}

/// When a new job becomes claimable.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Schedule {
    /// At once.
    #[default]
    Now,
    /// At this instant (epoch milliseconds).
    At(i64),
    /// This long after the database receives it.
    After(Duration),
}

/// A job to enqueue. Build it with [`NewJob::new`] and the setters.
#[derive(Debug, Clone, PartialEq)]
pub struct NewJob {
    pub queue: String,
    pub kind: String,
    /// The arguments, as JSON text.
    pub args: String,
    /// Lower runs first. Default 0.
    pub priority: i32,
    pub schedule: Schedule,
    /// `None`: the kind's default, else 25.
    pub max_attempts: Option<i32>,
    /// `None`: the kind's default, else 5 minutes.
    pub timeout: Option<Duration>,
    /// While an unfinished job has this key, enqueueing another returns it.
    pub unique_key: Option<String>,
}

impl NewJob {
    /// A job of `kind` with `args`, on the `default` queue, to run now.
    pub fn new(kind: impl Into<String>, args: serde_json::Value) -> NewJob {
        NewJob {
            queue: DEFAULT_QUEUE.to_string(),
            kind: kind.into(),
            args: args.to_string(),
            priority: 0,
            schedule: Schedule::Now,
            max_attempts: None,
            timeout: None,
            unique_key: None,
        }
    }

    /// A job whose arguments are JSON text already checked (kept as sent,
    /// without a parse into a `Value` and back).
    pub fn with_raw_args(
        kind: impl Into<String>,
        args: Box<serde_json::value::RawValue>,
    ) -> NewJob {
        NewJob {
            args: String::from(Box::<str>::from(args)),
            ..NewJob::new(kind, serde_json::Value::Null)
        }
    }

    pub fn queue(mut self, queue: impl Into<String>) -> Self {
        self.queue = queue.into();
        self
    }

    pub fn priority(mut self, priority: i32) -> Self {
        self.priority = priority;
        self
    }

    /// Run no earlier than `at_ms` (epoch milliseconds).
    pub fn run_at(mut self, at_ms: i64) -> Self {
        self.schedule = Schedule::At(at_ms);
        self
    }

    /// Run no earlier than `delay` from now (database clock).
    pub fn delay(mut self, delay: Duration) -> Self {
        self.schedule = Schedule::After(delay);
        self
    }

    pub fn max_attempts(mut self, max_attempts: i32) -> Self {
        self.max_attempts = Some(max_attempts);
        self
    }

    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.timeout = Some(timeout);
        self
    }

    pub fn unique_key(mut self, key: impl Into<String>) -> Self {
        self.unique_key = Some(key.into());
        self
    }
}

/// A failed attempt, as the worker (or the rescuer) reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Failure {
    pub outcome: AttemptOutcome,
    /// The error, with whatever detail helps (capped when stored).
    pub error: String,
    /// `Some(delay)`: retry after `delay`. `None`: no more attempts, the job
    /// goes to `dead`.
    pub retry_in: Option<Duration>,
    /// What the attempt recorded, as JSON, kept with its `job_attempts` row.
    pub detail: Option<String>,
}

/// The answer to an admin action on one job (retry, cancel, delete).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transition {
    /// Done; the job is now in this state (for a delete: the state it had).
    Applied(JobState),
    /// The job's state does not allow the action; nothing changed.
    Refused(JobState),
    /// No such job.
    Missing,
}

/// Jobs per queue and state.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QueueCount {
    pub queue: String,
    pub state: JobState,
    pub count: i64,
}

/// A row of `queues`: only queues an operator has paused or resumed have one.
#[derive(Debug, Clone, PartialEq, Eq, Queryable, Selectable)]
#[diesel(table_name = crate::schema::queues)]
pub struct QueueInfo {
    pub name: String,
    pub paused: bool,
    pub updated_at: i64,
}

/// An error's signature: its first non-empty line with every word that holds
/// a digit (ids, counts, addresses, timestamps) replaced by `#`, at most 200
/// characters. Dead letters with the same kind and signature are one group.
pub fn error_signature(error: &str) -> String {
    let line = error
        .lines()
        .map(str::trim)
        .find(|l| !l.is_empty())
        .unwrap_or_default();
    let mut out = String::with_capacity(line.len().min(200));
    let mut word = String::new();
    let flush = |word: &mut String, out: &mut String| {
        if word.chars().any(|c| c.is_ascii_digit()) {
            // "#-#-#" for a UUID would still differ by length; one # is enough.
            if !out.ends_with('#') {
                out.push('#');
            }
        } else {
            out.push_str(word);
        }
        word.clear();
    };
    for c in line.chars() {
        if c.is_alphanumeric() || c == '_' {
            word.push(c);
        } else {
            flush(&mut word, &mut out);
            // A separator between two numbers (1.5, 10:30, a-b-c ids)
            // belongs to the number.
            if !(out.ends_with('#') && matches!(c, '.' | ':' | '-' | '/' | ',')) {
                out.push(c);
            }
        }
    }
    flush(&mut word, &mut out);
    out.chars().take(200).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signatures_drop_ids_and_numbers() {
        assert_eq!(
            error_signature("order 1042 failed: HTTP 503 after 2.5s"),
            "order # failed: HTTP # after #"
        );
        assert_eq!(
            error_signature("user 550e8400-e29b-41d4-a716-446655440000 not found\nbacktrace..."),
            "user # not found"
        );
        assert_eq!(
            error_signature("connection refused (os error 111)"),
            error_signature("connection refused (os error 113)")
        );
        assert_ne!(error_signature("timeout"), error_signature("refused"));
        assert_eq!(error_signature("\n\n  "), "");
        assert_eq!(error_signature(&"x ".repeat(300)).chars().count(), 200);
    }
}
