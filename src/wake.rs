//! Wake-ups: how a newly claimable job reaches an idle worker in this process
//! without waiting for the next poll.
//!
//! The store bumps a queue's generation after it commits jobs for it; the
//! PostgreSQL listener does the same when another process announces jobs with
//! `NOTIFY`. A fetcher remembers the generation it last saw and waits for it to
//! change, so a wake-up between its claim and its wait is never missed.
//! Polling remains the fallback for everything a wake-up cannot announce
//! (scheduled jobs coming due, retries, SQLite writers in other processes).

use std::collections::HashMap;
use std::sync::{Condvar, Mutex};
use std::time::{Duration, Instant};

#[derive(Debug, Default)]
pub struct Wake {
    state: Mutex<State>,
    cv: Condvar,
}

#[derive(Debug, Default)]
struct State {
    generations: HashMap<String, u64>,
    /// Bumped by [`Wake::interrupt`]; wakes every waiter.
    epoch: u64,
}

/// What a waiter has seen; compare with a later [`Wake::seen`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Seen {
    generation: u64,
    epoch: u64,
}

impl Wake {
    pub fn new() -> Wake {
        Wake::default()
    }

    /// Announces claimable jobs on `queue`.
    pub fn notify(&self, queue: &str) {
        let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        match state.generations.get_mut(queue) {
            Some(generation) => *generation += 1,
            None => {
                state.generations.insert(queue.to_string(), 1);
            }
        }
        drop(state);
        self.cv.notify_all();
    }

    /// Wakes every waiter, whatever its queue (used at shutdown).
    pub fn interrupt(&self) {
        self.state.lock().unwrap_or_else(|e| e.into_inner()).epoch += 1;
        self.cv.notify_all();
    }

    /// The current generation of `queue`, to pass to [`Wake::wait`].
    pub fn seen(&self, queue: &str) -> Seen {
        let state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        Seen {
            generation: state.generations.get(queue).copied().unwrap_or(0),
            epoch: state.epoch,
        }
    }

    /// Blocks until `queue` is notified after `seen` was taken, an interrupt,
    /// or `timeout`. Returns whether it was woken (false: timed out).
    pub fn wait(&self, queue: &str, seen: Seen, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        loop {
            let generation = state.generations.get(queue).copied().unwrap_or(0);
            if generation != seen.generation || state.epoch != seen.epoch {
                return true;
            }
            let now = Instant::now();
            if now >= deadline {
                return false;
            }
            state = self
                .cv
                .wait_timeout(state, deadline - now)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    #[test]
    fn a_notify_after_seen_is_not_missed() {
        let wake = Wake::new();
        let seen = wake.seen("q");
        wake.notify("q");
        assert!(wake.wait("q", seen, Duration::from_secs(5)));
    }

    #[test]
    fn other_queues_do_not_wake() {
        let wake = Wake::new();
        let seen = wake.seen("q");
        wake.notify("other");
        assert!(!wake.wait("q", seen, Duration::from_millis(20)));
    }

    #[test]
    fn interrupt_wakes_a_blocked_waiter() {
        let wake = Arc::new(Wake::new());
        let seen = wake.seen("q");
        let waiter = {
            let wake = wake.clone();
            std::thread::spawn(move || wake.wait("q", seen, Duration::from_secs(30)))
        };
        wake.interrupt();
        assert!(waiter.join().unwrap());
    }
}
