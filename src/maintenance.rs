//! Maintenance: the work one process does for everyone. Processes compete
//! for a leader lease in the database; the holder rescues jobs from workers
//! that stopped heartbeating (or overran their deadline) and prunes finished
//! jobs and dead worker registrations. With several processes on PostgreSQL,
//! exactly one leads at a time; if it dies, another takes over when its lease
//! expires.
//!
//! Each service is a struct with a `run_once` that returns what it did, so
//! tests drive them directly; [`Maintenance`] is the loop around them.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use crossbeam_channel::{RecvTimeoutError, Sender};
use tracing::{info, warn};

use crate::alerts::{AlertConfig, Evaluator, Mailer};
use crate::job::{Backoff, Registry};
use crate::store::{self, AttemptOutcome, Failure, JobState, PruneReport, Retention, Store};

/// Maintenance settings; the defaults are `errand serve`'s.
#[derive(Debug, Clone)]
pub struct MaintenanceConfig {
    /// How often the leader looks for jobs to rescue. Default 15 s.
    pub rescue_interval: Duration,
    /// A running job whose heartbeat is older than this is rescued.
    /// Default 60 s.
    pub stale_after: Duration,
    /// Rescues after which a job goes to `dead` instead of being retried (a
    /// job that keeps killing its worker). Default 3.
    pub max_rescues: i32,
    /// How often finished jobs are pruned. Default 1 min.
    pub prune_interval: Duration,
    /// How long finished jobs are kept. Default 24 h completed and
    /// cancelled, 30 days dead.
    pub retention: Retention,
    /// How long the leader lease lasts; the leader renews it every third of
    /// that. Default 30 s.
    pub leader_ttl: Duration,
    /// Delay before a rescued job runs again, for kinds that set none.
    /// Default exponential.
    pub backoff: Backoff,
    /// Alert rules and where their emails go. Default: none.
    pub alerts: Arc<AlertConfig>,
}

impl Default for MaintenanceConfig {
    fn default() -> Self {
        MaintenanceConfig {
            rescue_interval: Duration::from_secs(15),
            stale_after: Duration::from_secs(60),
            max_rescues: 3,
            prune_interval: Duration::from_secs(60),
            retention: Retention::default(),
            leader_ttl: Duration::from_secs(30),
            backoff: Backoff::default(),
            alerts: Arc::default(),
        }
    }
}

/// What one rescue pass did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RescueReport {
    /// Rescued jobs that will be retried.
    pub retried: usize,
    /// Rescued jobs out of attempts or rescues, now `dead`.
    pub dead: usize,
    /// Rescued jobs whose cancel had been requested, now `cancelled`.
    pub cancelled: usize,
}

/// Takes running jobs back from workers that stopped heartbeating, and from
/// attempts that ran past their deadline.
pub struct Rescuer<'a> {
    pub store: &'a Store,
    pub registry: &'a Registry,
    pub config: &'a MaintenanceConfig,
}

impl Rescuer<'_> {
    pub fn run_once(&self) -> store::Result<RescueReport> {
        let mut report = RescueReport::default();
        let stale_ms = store_millis(self.config.stale_after);
        for job in self.store.jobs_overdue(self.config.stale_after)? {
            let worker = job.locked_by.as_deref().unwrap_or("(unknown)");
            let (outcome, mut error) = if job.silent_ms > stale_ms {
                (
                    AttemptOutcome::Lost,
                    format!(
                        "worker {worker} stopped heartbeating (silent for {}, stale after {}): \
                         presumed dead (killed, crashed or cut off), so the job was taken back",
                        seconds(job.silent_ms),
                        seconds(stale_ms)
                    ),
                )
            } else {
                (
                    AttemptOutcome::Timeout,
                    format!(
                        "ran past its deadline on worker {worker} (timeout {}, overdue by {}), \
                         so the job was taken back",
                        seconds(job.timeout_ms),
                        seconds(job.overdue_ms)
                    ),
                )
            };
            let out_of_rescues = job.rescue_count + 1 >= self.config.max_rescues;
            if out_of_rescues {
                error.push_str(&format!(
                    "; rescued {} times, so it goes to dead instead of being retried",
                    job.rescue_count + 1
                ));
            }
            let retry_in = (!out_of_rescues && job.attempt < job.max_attempts).then(|| {
                self.registry
                    .options(&job.kind)
                    .and_then(|o| o.backoff)
                    .unwrap_or(self.config.backoff)
                    .delay(job.attempt)
            });
            let failure = Failure {
                outcome,
                error,
                retry_in,
                detail: None,
            };
            match self.store.job_rescue(job.lease, &failure)? {
                Some(JobState::Dead) => report.dead += 1,
                Some(JobState::Cancelled) => report.cancelled += 1,
                Some(_) => report.retried += 1,
                // Its worker finished it meanwhile: nothing to rescue.
                None => {}
            }
            warn!(job = job.lease.id, kind = %job.kind, "{}", failure.error);
        }
        Ok(report)
    }
}

/// Deletes finished jobs past their retention and dead worker registrations.
pub struct Pruner<'a> {
    pub store: &'a Store,
    pub config: &'a MaintenanceConfig,
}

impl Pruner<'_> {
    pub fn run_once(&self) -> store::Result<PruneReport> {
        let report = self
            .store
            .jobs_prune(&self.config.retention, self.config.stale_after)?;
        if report.dead > 0 {
            warn!(
                dead = report.dead,
                "pruned dead jobs older than their retention ({})",
                humantime::format_duration(self.config.retention.dead)
            );
        }
        Ok(report)
    }
}

fn store_millis(d: Duration) -> i64 {
    i64::try_from(d.as_millis()).unwrap_or(i64::MAX)
}

fn seconds(ms: i64) -> String {
    format!("{:.1}s", ms as f64 / 1000.0)
}

/// The maintenance loop: holds or seeks the leader lease and, while leading,
/// runs the rescuer and the pruner on their intervals.
pub struct Maintenance {
    thread: Option<JoinHandle<()>>,
    mailer: Option<JoinHandle<()>>,
    stop: Option<Sender<()>>,
}

impl Maintenance {
    /// Starts the loop for the process `holder` (its worker id).
    pub fn start(
        store: Store,
        registry: Arc<Registry>,
        config: MaintenanceConfig,
        holder: String,
    ) -> std::io::Result<Maintenance> {
        let (stop, stopped) = crossbeam_channel::bounded::<()>(0);
        // The sender delivers alert emails while this process leads (one
        // sender for all processes, so an email goes out once).
        let leading = Arc::new(AtomicBool::new(false));
        let mailer = match Mailer::new(&config.alerts) {
            Ok(Some(mailer)) => {
                let (store, config, leading, stopped) = (
                    store.clone(),
                    config.clone(),
                    leading.clone(),
                    stopped.clone(),
                );
                Some(
                    thread::Builder::new()
                        .name("errand-mailer".into())
                        .spawn(move || {
                            while let Err(RecvTimeoutError::Timeout) =
                                stopped.recv_timeout(config.alerts.send_every)
                            {
                                if leading.load(Ordering::SeqCst)
                                    && let Err(e) = mailer.run_once(&store, &config.alerts)
                                {
                                    warn!(error = %e, "delivering alert emails failed; will retry");
                                }
                            }
                        })?,
                )
            }
            Ok(None) => None,
            Err(e) => {
                warn!(error = %e, "alert emails are off");
                None
            }
        };
        let thread = thread::Builder::new()
            .name("errand-maintain".into())
            .spawn(move || {
                let mut is_leader = false;
                let now = Instant::now();
                let (mut next_rescue, mut next_prune, mut next_eval) = (now, now, now);
                loop {
                    let renew_every = config.leader_ttl / 3;
                    match store.leader_acquire(&holder, config.leader_ttl) {
                        Ok(term) => {
                            if term.is_some() != is_leader {
                                is_leader = term.is_some();
                                leading.store(is_leader, Ordering::SeqCst);
                                match term {
                                    Some(term) => info!(term, "this process leads maintenance"),
                                    None => info!("another process leads maintenance now"),
                                }
                                let now = Instant::now();
                                (next_rescue, next_prune, next_eval) = (now, now, now);
                            }
                        }
                        Err(e) => warn!(error = %e, "leader election failed; will retry"),
                    }
                    let mut wake_at = Instant::now() + renew_every;
                    if is_leader {
                        let now = Instant::now();
                        if now >= next_rescue {
                            let rescuer = Rescuer {
                                store: &store,
                                registry: &registry,
                                config: &config,
                            };
                            if let Err(e) = rescuer.run_once() {
                                warn!(error = %e, "rescuing jobs failed; will retry");
                            }
                            next_rescue = Instant::now() + config.rescue_interval;
                        }
                        if now >= next_prune {
                            let pruner = Pruner {
                                store: &store,
                                config: &config,
                            };
                            match pruner.run_once() {
                                Ok(r) if r.jobs() + r.workers > 0 => {
                                    info!(jobs = r.jobs(), workers = r.workers, "pruned")
                                }
                                Ok(_) => {}
                                Err(e) => warn!(error = %e, "pruning failed; will retry"),
                            }
                            next_prune = Instant::now() + config.prune_interval;
                        }
                        if !config.alerts.rules.is_empty() && now >= next_eval {
                            let evaluator = Evaluator {
                                store: &store,
                                config: &config.alerts,
                                stale_after: config.stale_after,
                            };
                            if let Err(e) = evaluator.run_once() {
                                warn!(error = %e, "evaluating alert rules failed; will retry");
                            }
                            next_eval = Instant::now() + config.alerts.evaluate_every;
                        }
                        wake_at = wake_at.min(next_rescue).min(next_prune);
                        if !config.alerts.rules.is_empty() {
                            wake_at = wake_at.min(next_eval);
                        }
                    }
                    let pause = wake_at.saturating_duration_since(Instant::now());
                    if let Err(RecvTimeoutError::Disconnected) = stopped.recv_timeout(pause) {
                        break;
                    }
                }
                leading.store(false, Ordering::SeqCst);
                if is_leader {
                    // Let another process take over now rather than at expiry.
                    if let Err(e) = store.leader_resign(&holder) {
                        warn!(error = %e, "could not resign leadership; it expires on its own");
                    }
                }
            })?;
        Ok(Maintenance {
            thread: Some(thread),
            mailer,
            stop: Some(stop),
        })
    }

    /// Stops the loop and gives up the leader lease if held.
    pub fn stop(mut self) {
        drop(self.stop.take());
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
        if let Some(mailer) = self.mailer.take() {
            let _ = mailer.join();
        }
    }
}
