//! Shutdown: the first SIGTERM or SIGINT asks errand to drain (stop claiming,
//! let running jobs finish within the grace period, release the rest); a
//! second one asks it to hurry (skip what is left of the drain).

use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

/// How far shutdown has gone.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Stage {
    Running,
    /// Stop claiming; finish running jobs within the grace period.
    Draining,
    /// Release unfinished jobs now.
    Hurry,
}

/// A shared shutdown flag with two steps; clones share it.
#[derive(Debug, Clone)]
pub struct Shutdown {
    inner: Arc<(Mutex<Stage>, Condvar)>,
}

impl Default for Shutdown {
    fn default() -> Self {
        Shutdown {
            inner: Arc::new((Mutex::new(Stage::Running), Condvar::new())),
        }
    }
}

impl Shutdown {
    pub fn new() -> Shutdown {
        Shutdown::default()
    }

    /// Advances one step (running → draining → hurry) and returns the new
    /// stage.
    pub fn request(&self) -> Stage {
        let (lock, cv) = &*self.inner;
        let mut stage = lock.lock().unwrap_or_else(|e| e.into_inner());
        *stage = match *stage {
            Stage::Running => Stage::Draining,
            _ => Stage::Hurry,
        };
        cv.notify_all();
        *stage
    }

    pub fn stage(&self) -> Stage {
        *self.inner.0.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Blocks until the stage is at least `stage`, or `timeout` passes.
    /// Returns the stage reached.
    pub fn wait_for(&self, stage: Stage, timeout: Option<Duration>) -> Stage {
        let (lock, cv) = &*self.inner;
        let deadline = timeout.map(|t| Instant::now() + t);
        let mut current = lock.lock().unwrap_or_else(|e| e.into_inner());
        while *current < stage {
            current = match deadline {
                None => cv.wait(current).unwrap_or_else(|e| e.into_inner()),
                Some(deadline) => {
                    let now = Instant::now();
                    if now >= deadline {
                        break;
                    }
                    cv.wait_timeout(current, deadline - now)
                        .unwrap_or_else(|e| e.into_inner())
                        .0
                }
            };
        }
        *current
    }

    /// Advances the stage on every SIGTERM and SIGINT, from a thread of its
    /// own.
    pub fn on_signals(&self) -> std::io::Result<()> {
        use signal_hook::consts::{SIGINT, SIGTERM};
        let mut signals = signal_hook::iterator::Signals::new([SIGTERM, SIGINT])?;
        let shutdown = self.clone();
        std::thread::Builder::new()
            .name("errand-signals".into())
            .spawn(move || {
                for signal in signals.forever() {
                    match shutdown.request() {
                        Stage::Draining => tracing::info!(
                            signal,
                            "shutting down: no new jobs are claimed; running jobs may finish \
                             within the grace period (signal again to release them now)"
                        ),
                        _ => tracing::warn!(signal, "second signal: releasing unfinished jobs now"),
                    }
                }
            })?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_advance_one_stage_at_a_time() {
        let shutdown = Shutdown::new();
        assert_eq!(shutdown.stage(), Stage::Running);
        assert_eq!(shutdown.request(), Stage::Draining);
        assert_eq!(shutdown.request(), Stage::Hurry);
        assert_eq!(shutdown.request(), Stage::Hurry);
    }

    #[test]
    fn wait_for_returns_when_another_thread_requests() {
        let shutdown = Shutdown::new();
        let waiter = {
            let shutdown = shutdown.clone();
            std::thread::spawn(move || shutdown.wait_for(Stage::Draining, None))
        };
        shutdown.request();
        assert_eq!(waiter.join().unwrap(), Stage::Draining);
    }
}
