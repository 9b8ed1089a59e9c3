//! Accept loops and per-connection handling.
//!
//! Two kinds of listener:
//! * the **transparent** listener (127.0.0.1:P and [::1]:P) that the eBPF programs
//!   redirect to. Each accepted connection must have a redirect record (original
//!   destination + caller identity, see [`crate::ebpf`]); one without is refused.
//! * **explicit** `listenOn` listeners (Secretless style), one per service.
//!
//! Each connection runs in its own task with one span, and writes exactly one access-log
//! line (target `access`) when it ends, whatever the outcome (success, error, refusal,
//! or the shutdown deadline ending it).
//!
//! Connections are capped ([`Caps`], `broker.maxConnections` and
//! `maxConnectionsPerListener`): over a cap, a connection is closed as soon as it is
//! accepted, with a rate-limited log line. The transparent listener's share is reserved,
//! so `listenOn` listeners (which any local process can reach) cannot starve it; the
//! health endpoint has its own listener and task, outside the caps.

use std::{
    net::SocketAddr,
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
    time::{Duration, Instant},
};

use broker_common::REC_IN_SPLICE_APP;
use tokio::{
    net::{TcpListener, TcpStream},
    sync::{Notify, OwnedSemaphorePermit, Semaphore, watch},
};
use tracing::Instrument as _;

use crate::{
    broker::Broker,
    config::{BrokerSettings, Connector, ListenAddr, Service},
    connector::{self, Caller, Conn, ConnError, ConnStats, SpliceTicket},
    ebpf::{Interceptor, record_destination},
    ratelimit::LogLimiter,
};

/// Log lines per second for connections refused for want of a redirect record, and for
/// connections over a cap; the rest are counted and summarised once a second.
pub const REFUSAL_LOG_PER_SEC: u32 = 10;

/// Connection caps (see the module docs). Each accepted connection holds its
/// listener's permit, and a `listenOn` one also a permit of the shared `listenOn` pool,
/// until its task ends.
#[derive(Debug)]
pub struct Caps {
    /// The transparent listener (IPv4 and IPv6 together): `maxConnectionsPerListener`,
    /// reserved out of `maxConnections`.
    transparent: Arc<Semaphore>,
    /// Every `listenOn` listener together: `maxConnections` minus the transparent share.
    explicit_pool: Arc<Semaphore>,
    /// One per service (used by those with `listenOn`): `maxConnectionsPerListener`.
    per_service: Vec<Arc<Semaphore>>,
    /// Rate limit of the "cap reached" lines.
    pub log: LogLimiter,
}

/// Why [`Caps::new`] cannot share out the connections.
#[derive(Debug, thiserror::Error)]
#[error(
    "broker.maxConnectionsPerListener ({per}) must be below broker.maxConnections ({max}) when \
     both the transparent listener and listenOn listeners run: the transparent listener's \
     share is reserved and nothing would be left for listenOn"
)]
pub struct CapsError {
    per: u32,
    max: u32,
}

/// The permits an admitted connection holds until it ends.
#[derive(Debug)]
pub struct Admission {
    _listener: OwnedSemaphorePermit,
    _pool: Option<OwnedSemaphorePermit>,
}

impl Caps {
    /// Share `maxConnections` out between the transparent listener (if it runs) and the
    /// `listenOn` listeners of `services`.
    ///
    /// # Errors
    /// When both kinds run and nothing would be left for `listenOn`.
    pub fn new(
        settings: &BrokerSettings,
        services: &[Arc<Service>],
        transparent: bool,
    ) -> Result<Self, CapsError> {
        let max = settings.max_connections as usize;
        let per = (settings.max_connections_per_listener as usize).min(max);
        let any_explicit = services.iter().any(|s| s.listen_on.is_some());
        let pool = if transparent { max - per } else { max };
        if any_explicit && pool == 0 {
            return Err(CapsError {
                per: settings.max_connections_per_listener,
                max: settings.max_connections,
            });
        }
        Ok(Self {
            transparent: Arc::new(Semaphore::new(if transparent { per } else { 0 })),
            explicit_pool: Arc::new(Semaphore::new(pool)),
            per_service: services
                .iter()
                .map(|s| Arc::new(Semaphore::new(if s.listen_on.is_some() { per } else { 0 })))
                .collect(),
            log: LogLimiter::new("cap refusals", REFUSAL_LOG_PER_SEC, Duration::from_secs(1)),
        })
    }

    /// Permits for one more connection on this listener (`None`: transparent), or `None`
    /// when a cap is reached. Never waits.
    #[must_use]
    pub fn admit(&self, explicit: Option<usize>) -> Option<Admission> {
        match explicit {
            None => Some(Admission {
                _listener: Arc::clone(&self.transparent).try_acquire_owned().ok()?,
                _pool: None,
            }),
            Some(id) => {
                let listener = Arc::clone(self.per_service.get(id)?)
                    .try_acquire_owned()
                    .ok()?;
                let pool = Arc::clone(&self.explicit_pool).try_acquire_owned().ok()?;
                Some(Admission {
                    _listener: listener,
                    _pool: Some(pool),
                })
            }
        }
    }
}

/// A redirect record older than this is not trusted (the client would have been
/// accepted long ago; an old entry can only be stale).
pub const MAX_RECORD_AGE: Duration = Duration::from_secs(60);

/// Counts live connection tasks so shutdown can drain them.
#[derive(Debug, Default)]
pub struct Tracker {
    active: AtomicUsize,
    /// Connections ever accepted (the memory trimmer's "was there traffic" test).
    total: AtomicUsize,
    idle: Notify,
}

impl Tracker {
    fn enter(self: &Arc<Self>) -> TrackerGuard {
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

struct TrackerGuard(Arc<Tracker>);

impl Drop for TrackerGuard {
    fn drop(&mut self) {
        if self.0.active.fetch_sub(1, Ordering::SeqCst) == 1 {
            self.0.idle.notify_waiters();
        }
    }
}

/// Everything an accept loop needs.
#[derive(Clone)]
pub struct Shared {
    pub broker: Arc<Broker>,
    pub services: Arc<Vec<Arc<Service>>>,
    /// Weak, so that stopping the daemon detaches the programs at once even while
    /// connections are still being drained.
    pub interceptor: Option<std::sync::Weak<Interceptor>>,
    pub tracker: Arc<Tracker>,
    /// Connection tasks end when this turns true after the drain deadline.
    pub abort: watch::Receiver<bool>,
    pub caps: Arc<Caps>,
    /// Rate limit of the "connection refused" lines (no redirect record): see
    /// [`LogLimiter::check`].
    pub refusals: Arc<LogLimiter>,
}

/// Accept on the transparent listener until `stop` turns true.
pub async fn serve_transparent(listener: TcpListener, shared: Shared, stop: watch::Receiver<bool>) {
    accept_loop(listener, shared, stop, None).await;
}

/// Accept on a service's `listenOn` listener until `stop` turns true.
pub async fn serve_explicit(
    listener: TcpListener,
    shared: Shared,
    service_id: usize,
    stop: watch::Receiver<bool>,
) {
    accept_loop(listener, shared, stop, Some(service_id)).await;
}

async fn accept_loop(
    listener: TcpListener,
    shared: Shared,
    mut stop: watch::Receiver<bool>,
    explicit: Option<usize>,
) {
    loop {
        tokio::select! {
            biased;
            () = stopped(&mut stop) => return,
            res = listener.accept() => match res {
                Ok((stream, peer)) => {
                    let Some(admission) = shared.caps.admit(explicit) else {
                        // Closed at once: over a cap, a connection must not cost more
                        // than the accept (no task, no buffer, no upstream).
                        drop(stream);
                        cap_reached(&shared, peer, explicit);
                        continue;
                    };
                    let shared = shared.clone();
                    let guard = shared.tracker.enter();
                    tokio::spawn(async move {
                        let _guard = guard;
                        let _admission = admission;
                        handle(stream, peer, shared, explicit).await;
                    });
                }
                Err(e) => {
                    // EMFILE and friends: back off instead of spinning.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            }
        }
    }
}

/// The rate-limited line for a connection closed because a cap was reached.
fn cap_reached(shared: &Shared, peer: SocketAddr, explicit: Option<usize>) {
    let Some(suppressed) = shared.caps.log.check() else {
        return;
    };
    let listener = match explicit.and_then(|id| shared.services.get(id)) {
        Some(s) => match &s.listen_on {
            Some(ListenAddr::Tcp(a)) => format!("listenOn {a} of service {}", s.name),
            _ => format!("listenOn of service {}", s.name),
        },
        None => "transparent".to_owned(),
    };
    tracing::warn!(
        target: "access",
        client = %peer,
        listener = %listener,
        result = "refused",
        reason = "connection cap reached (broker.maxConnections / maxConnectionsPerListener)",
        suppressed_before = suppressed,
        "connection refused: too many connections"
    );
}

async fn handle(stream: TcpStream, peer: SocketAddr, shared: Shared, explicit: Option<usize>) {
    let started = Instant::now();
    let (service_id, caller, orig_dst, splice) = match explicit {
        Some(id) => (id, None, None, None),
        None => {
            let interceptor = shared
                .interceptor
                .as_ref()
                .and_then(std::sync::Weak::upgrade);
            let rec = interceptor
                .as_ref()
                .and_then(|i| i.take_record(&stream).ok().flatten());
            let Some(rec) = rec.filter(|r| record_is_fresh(r.connect_ns)) else {
                // Someone connected to the listener directly: no redirect record, no
                // identity, nothing to broker. Close without a byte. Anyone local can
                // do this in a loop: the line is rate-limited (summarised once a second).
                drop(stream);
                if let Some(suppressed) = shared.refusals.check() {
                    tracing::warn!(
                        target: "access",
                        client = %peer,
                        result = "refused",
                        reason = "no redirect record (direct connection to the broker's listener)",
                        suppressed_before = suppressed,
                        "connection refused"
                    );
                }
                return;
            };
            let caller = Caller {
                pid: rec.pid,
                uid: rec.uid,
                gid: rec.gid,
                cgroup_id: rec.cgroup_id,
                comm: comm_text(&rec.comm),
            };
            let splice = interceptor
                .as_ref()
                .filter(|_| rec.flags & REC_IN_SPLICE_APP != 0)
                .map(|i| SpliceTicket {
                    splicer: i.splicer(),
                    app_cookie: rec.cookie,
                });
            (
                rec.service_id as usize,
                Some(caller),
                Some(record_destination(&rec)),
                splice,
            )
        }
    };
    let Some(service) = shared.services.get(service_id).cloned() else {
        tracing::warn!(target: "access", client = %peer, service_id, result = "refused", "unknown service id");
        return;
    };
    let mut conn = Conn {
        service,
        client_addr: peer,
        caller,
        orig_dst,
        splice,
        stats: ConnStats::default(),
    };
    let span = tracing::info_span!("conn", service = %conn.service.name, client = %peer);
    let mut abort = shared.abort.clone();
    let result = async {
        tokio::select! {
            r = dispatch(&shared.broker, &mut conn, stream) => r,
            () = stopped(&mut abort) => Err(ConnError::Io(std::io::Error::other("broker shutting down"))),
        }
    }
    .instrument(span)
    .await;
    // An app socket the connector did not splice (an error, a cancel request, a client
    // that never finished its startup) leaves the splice map now, not when the app
    // closes: a client holding sockets open must not be able to fill it.
    if let Some(t) = conn.splice.take() {
        t.splicer.forget(t.app_cookie);
    }
    access_log(&conn, &result, started.elapsed());
}

async fn dispatch(broker: &Broker, conn: &mut Conn, stream: TcpStream) -> Result<(), ConnError> {
    let service = Arc::clone(&conn.service);
    match &service.connector {
        Connector::Tcp(cfg) => connector::tcp::serve(broker, conn, cfg, stream).await,
        Connector::Pg(cfg) => connector::pg::serve(broker, conn, cfg, stream).await,
        Connector::NotBuilt { name } => Err(ConnError::Config(format!(
            "connector `{name}` is not built yet"
        ))),
    }
}

/// Resolves once the flag turns true (or its sender is gone).
pub async fn stopped(rx: &mut watch::Receiver<bool>) {
    let _ = rx.wait_for(|s| *s).await;
}

fn record_is_fresh(connect_ns: u64) -> bool {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: valid pointer; CLOCK_MONOTONIC is bpf_ktime_get_ns's clock.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &raw mut ts) };
    let now = u64::try_from(ts.tv_sec).unwrap_or(0) * 1_000_000_000
        + u64::try_from(ts.tv_nsec).unwrap_or(0);
    now.saturating_sub(connect_ns) < MAX_RECORD_AGE.as_nanos() as u64
}

fn comm_text(comm: &[u8; 16]) -> String {
    let end = comm.iter().position(|&b| b == 0).unwrap_or(comm.len());
    String::from_utf8_lossy(&comm[..end]).into_owned()
}

/// The one access-log line of a connection. Never contains a credential value.
fn access_log(conn: &Conn, result: &Result<(), ConnError>, elapsed: Duration) {
    let (res, error) = match result {
        Ok(()) => ("ok", String::new()),
        Err(e) => (e.kind(), e.to_string()),
    };
    let c = conn.caller.as_ref();
    tracing::info!(
        target: "access",
        service = %conn.service.name,
        connector = conn.service.connector.name(),
        client = %conn.client_addr,
        caller.pid = c.map(|c| c.pid),
        caller.uid = c.map(|c| c.uid),
        caller.gid = c.map(|c| c.gid),
        caller.cgroup = c.map(|c| c.cgroup_id),
        caller.comm = c.map(|c| c.comm.as_str()),
        dst = conn.orig_dst.map(|d| d.to_string()),
        upstream = conn.stats.upstream.as_deref(),
        credentials = %conn.stats.fetched.join(","),
        result = res,
        error = %error,
        bytes_up = conn.stats.bytes_up,
        bytes_down = conn.stats.bytes_down,
        spliced = conn.stats.spliced,
        splice_fallback = conn.stats.splice_fallback,
        duration_ms = elapsed.as_millis() as u64,
        "connection"
    );
}
