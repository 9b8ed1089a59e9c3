//! Shutdown's drain: every connection task is counted by a [`Tracker`] guard; stopping
//! waits until none is left or a deadline passes (then the tasks are ended by the abort
//! signal, see [`crate::app::Daemon::stop`]).

use std::{
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
    time::Duration,
};

use tokio::sync::Notify;

/// Counts live connection tasks so shutdown can drain them.
#[derive(Debug, Default)]
pub struct Tracker {
    active: AtomicUsize,
    /// Connections ever accepted (the memory trimmer's "was there traffic" test).
    total: AtomicUsize,
    idle: Notify,
}

impl Tracker {
    /// Count one more live connection until the guard drops.
    pub fn enter(self: &Arc<Self>) -> TrackerGuard {
        self.active.fetch_add(1, Ordering::SeqCst);
        self.total.fetch_add(1, Ordering::Relaxed);
        TrackerGuard(Arc::clone(self))
    }

    /// Connections accepted since start.
    #[must_use]
    pub fn total(&self) -> usize {
        self.total.load(Ordering::Relaxed)
    }

    #[must_use]
    pub fn active(&self) -> usize {
        self.active.load(Ordering::SeqCst)
    }

    /// Wait until no connection is active, or `deadline` passes. Returns how many remain.
    pub async fn drain(&self, deadline: Duration) -> usize {
        let until = tokio::time::Instant::now() + deadline;
        loop {
            let notified = self.idle.notified();
            if self.active() == 0 {
                return 0;
            }
            if tokio::time::timeout_at(until, notified).await.is_err() {
                return self.active();
            }
        }
    }
}

/// A live connection, counted until dropped.
pub struct TrackerGuard(Arc<Tracker>);

impl Drop for TrackerGuard {
    fn drop(&mut self) {
        if self.0.active.fetch_sub(1, Ordering::SeqCst) == 1 {
            self.0.idle.notify_waiters();
        }
    }
}
