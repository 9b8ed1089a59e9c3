//! Shutdown's drain: every connection task is counted by a [`Tracker`] guard; stopping
//! waits until none is left or a deadline passes (then the tasks are ended by the abort
//! signal, see [`crate::app::Daemon::stop`]).
//!
//! The tracker also keeps the registry of brokered connections `broker status` lists
//! ([`LiveConn`], [`Tracker::register`]): one entry per connection a service took, in
//! one of [`LIVE_SHARDS`] small maps picked by the connection's number, so that
//! registering and leaving cost one short, rarely contended lock each. It holds no
//! more entries than connections are open (the connection caps bound those).

use std::{
    collections::HashMap,
    net::SocketAddr,
    sync::{
        Arc, Mutex, OnceLock,
        atomic::{AtomicU8, AtomicU64, AtomicUsize, Ordering},
    },
    time::{Duration, SystemTime},
};

use tokio::sync::Notify;

use crate::{connector::Caller, ebpf::SpliceCounts};

/// Shards of the live-connection registry.
pub const LIVE_SHARDS: usize = 16;

/// Counts live connection tasks so shutdown can drain them.
#[derive(Debug, Default)]
pub struct Tracker {
    active: AtomicUsize,
    /// Connections ever accepted (the memory trimmer's "was there traffic" test).
    total: AtomicUsize,
    idle: Notify,
    /// Brokered connections by number, for `broker status`.
    live: [Mutex<HashMap<u64, Arc<LiveConn>>>; LIVE_SHARDS],
    next_id: AtomicU64,
}

/// Where a brokered connection is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Phase {
    /// The connector is authenticating (or serving requests itself, for HTTP).
    Handshake = 0,
    /// Authenticated; the daemon relays the bytes.
    Relayed = 1,
    /// Authenticated; the kernel carries the bytes (spliced).
    Spliced = 2,
}

impl Phase {
    #[must_use]
    pub fn word(self) -> &'static str {
        match self {
            Self::Handshake => "handshake",
            Self::Relayed => "relayed",
            Self::Spliced => "spliced",
        }
    }
}

/// A brokered connection as `broker status` shows it: who, for which service, since
/// when, how far, how many bytes so far. No secret, no credential.
#[derive(Debug)]
pub struct LiveConn {
    pub id: u64,
    pub service: String,
    pub connector: String,
    pub caller: Option<Caller>,
    /// The client's address as the listener saw it.
    pub client: String,
    /// Where the client meant to go (intercepted connections).
    pub dst: Option<SocketAddr>,
    pub since: SystemTime,
    phase: AtomicU8,
    /// Bytes the daemon moved so far, client -> server and back (the handshake's and,
    /// for a session relayed on plain TCP, the relay's as it goes).
    pub up: AtomicU64,
    pub down: AtomicU64,
    /// The kernel's counts, once spliced.
    splice: OnceLock<SpliceCounts>,
    /// Set by [`LiveConn::end`] (a revocation that ends live sessions).
    ended: std::sync::atomic::AtomicBool,
    end: tokio::sync::Notify,
}

impl LiveConn {
    #[must_use]
    pub fn new(
        service: String,
        connector: String,
        caller: Option<Caller>,
        client: String,
        dst: Option<SocketAddr>,
    ) -> Self {
        Self {
            id: 0,
            service,
            connector,
            caller,
            client,
            dst,
            since: SystemTime::now(),
            phase: AtomicU8::new(Phase::Handshake as u8),
            up: AtomicU64::new(0),
            down: AtomicU64::new(0),
            splice: OnceLock::new(),
            ended: std::sync::atomic::AtomicBool::new(false),
            end: tokio::sync::Notify::new(),
        }
    }

    /// End the connection (its task drops both sockets).
    pub fn end(&self) {
        self.ended.store(true, Ordering::SeqCst);
        self.end.notify_waiters();
    }

    /// Resolves once [`LiveConn::end`] is called.
    pub async fn ended(&self) {
        loop {
            let n = self.end.notified();
            if self.ended.load(Ordering::SeqCst) {
                return;
            }
            n.await;
        }
    }

    #[must_use]
    pub fn phase(&self) -> Phase {
        match self.phase.load(Ordering::Relaxed) {
            1 => Phase::Relayed,
            2 => Phase::Spliced,
            _ => Phase::Handshake,
        }
    }

    pub fn set_phase(&self, p: Phase) {
        self.phase.store(p as u8, Ordering::Relaxed);
    }

    /// The session is spliced: its kernel counts are read from `counts`.
    pub fn spliced(&self, counts: SpliceCounts) {
        let _ = self.splice.set(counts);
        self.set_phase(Phase::Spliced);
    }

    /// Bytes so far, client -> server and server -> client: the daemon's and, for a
    /// spliced session, the kernel's.
    #[must_use]
    pub fn bytes(&self) -> (u64, u64) {
        let (ku, kd) = self.splice.get().map_or((0, 0), SpliceCounts::bytes);
        (
            self.up.load(Ordering::Relaxed).saturating_add(ku),
            self.down.load(Ordering::Relaxed).saturating_add(kd),
        )
    }
}

/// Keeps a connection in the registry until dropped.
#[derive(Debug)]
pub struct LiveGuard {
    tracker: Arc<Tracker>,
    conn: Arc<LiveConn>,
}

impl LiveGuard {
    #[must_use]
    pub fn conn(&self) -> &Arc<LiveConn> {
        &self.conn
    }
}

impl Drop for LiveGuard {
    fn drop(&mut self) {
        self.tracker.shard(self.conn.id).remove(&self.conn.id);
    }
}

impl Tracker {
    /// Count one more live connection until the guard drops.
    pub fn enter(self: &Arc<Self>) -> TrackerGuard {
        self.active.fetch_add(1, Ordering::SeqCst);
        self.total.fetch_add(1, Ordering::Relaxed);
        TrackerGuard(Arc::clone(self))
    }

    fn shard(&self, id: u64) -> std::sync::MutexGuard<'_, HashMap<u64, Arc<LiveConn>>> {
        self.live[(id % LIVE_SHARDS as u64) as usize]
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// List `conn` (numbered here) for `broker status` until the guard drops.
    pub fn register(self: &Arc<Self>, mut conn: LiveConn) -> LiveGuard {
        conn.id = self.next_id.fetch_add(1, Ordering::Relaxed) + 1;
        let conn = Arc::new(conn);
        self.shard(conn.id).insert(conn.id, Arc::clone(&conn));
        LiveGuard {
            tracker: Arc::clone(self),
            conn,
        }
    }

    /// The registered connections, oldest first, at most `max`; and how many there are.
    #[must_use]
    pub fn live(&self, max: usize) -> (Vec<Arc<LiveConn>>, usize) {
        let mut all: Vec<Arc<LiveConn>> = Vec::new();
        for i in 0..LIVE_SHARDS {
            all.extend(self.shard(i as u64).values().cloned());
        }
        let total = all.len();
        all.sort_unstable_by_key(|c| c.id);
        all.truncate(max);
        (all, total)
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
