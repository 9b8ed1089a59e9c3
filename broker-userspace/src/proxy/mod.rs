//! Accept loops and per-connection handling.
//!
//! Two kinds of listener:
//! * the **transparent** listener (127.0.0.1:P and [::1]:P) that the eBPF programs
//!   redirect to. Each accepted connection must have a redirect record (original
//!   destination + caller identity, see [`crate::ebpf`]); one without is refused.
//! * **explicit** `listenOn` listeners (Secretless style), one per address: a service's
//!   own, or one shared by the HTTP services that name the same address. TCP, or a Unix
//!   socket ([`unix`]: its file, and its clients' identity from `SO_PEERCRED`); a Unix
//!   client is served like a TCP one and always relayed in userspace (never spliced).
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

use std::{net::SocketAddr, os::fd::AsFd, sync::Arc, time::Duration};

use broker_common::REC_IN_SPLICE_APP;
use tokio::{
    net::TcpListener,
    sync::{OwnedSemaphorePermit, Semaphore, watch},
};
use tracing::Instrument as _;

pub mod caller;
pub mod relay;
pub mod result;
pub mod splice;
pub mod unix;

use crate::drain::LiveConn;
pub use crate::drain::Tracker;

use self::{result::ConnResult, splice::SpliceTicket};
use crate::{
    config::{BrokerSettings, ListenAddr},
    connector::{
        AppSocket, Caller, ClientAddr, Conn, ConnError, ConnStats, Connector, Env, Handoff,
    },
    ebpf::{Interceptor, record_destination},
    ratelimit::LogLimiter,
    resolver::HostNames,
    runtime::{Current, Runtime, ServiceRt},
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
    /// One per `listenOn` listener, by its id (see `Runtime::listeners`):
    /// `maxConnectionsPerListener`. A reload adds the new listeners' ones.
    per_service: std::sync::RwLock<std::collections::HashMap<u32, Arc<Semaphore>>>,
    /// `maxConnectionsPerListener`, and the size of `explicit_pool`.
    per: usize,
    pool: usize,
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
    /// `listenOn` listeners.
    ///
    /// # Errors
    /// When both kinds run and nothing would be left for `listenOn`.
    pub fn new(
        settings: &BrokerSettings,
        listeners: &[Arc<ServiceRt>],
        transparent: bool,
    ) -> Result<Self, CapsError> {
        let max = settings.max_connections as usize;
        let per = (settings.max_connections_per_listener as usize).min(max);
        let any_explicit = !listeners.is_empty();
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
            per_service: std::sync::RwLock::new(
                listeners
                    .iter()
                    .map(|s| (s.id, Arc::new(Semaphore::new(per))))
                    .collect(),
            ),
            per,
            pool,
            log: LogLimiter::new("cap refusals", REFUSAL_LOG_PER_SEC, Duration::from_secs(1)),
        })
    }

    /// The cap of a listener a reload adds (a listener already known keeps its own,
    /// with the connections it holds).
    ///
    /// # Errors
    /// When nothing is left for `listenOn` listeners (see [`Caps::new`]).
    pub fn add_listener(&self, id: u32) -> Result<(), CapsError> {
        if self.pool == 0 {
            return Err(CapsError {
                per: u32::try_from(self.per).unwrap_or(u32::MAX),
                max: u32::try_from(self.per).unwrap_or(u32::MAX),
            });
        }
        self.per_service
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .entry(id)
            .or_insert_with(|| Arc::new(Semaphore::new(self.per)));
        Ok(())
    }

    /// Permits for one more connection on this listener (`None`: transparent), or `None`
    /// when a cap is reached. Never waits.
    #[must_use]
    pub fn admit(&self, explicit: Option<u32>) -> Option<Admission> {
        match explicit {
            None => Some(Admission {
                _listener: Arc::clone(&self.transparent).try_acquire_owned().ok()?,
                _pool: None,
            }),
            Some(id) => {
                let sem = Arc::clone(
                    self.per_service
                        .read()
                        .unwrap_or_else(std::sync::PoisonError::into_inner)
                        .get(&id)?,
                );
                let listener = sem.try_acquire_owned().ok()?;
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

/// Everything an accept loop needs.
#[derive(Clone)]
pub struct Shared {
    /// The services, their connectors and what they use (credentials, the dialer),
    /// swapped whole on reload.
    pub runtime: Arc<Current>,
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
    /// The intercept hostnames the app's destinations stand for.
    pub names: Arc<HostNames>,
    /// The daemon's metrics.
    pub metrics: Arc<crate::metrics::Metrics>,
    /// Live revocations (`broker revoke`), across reloads.
    pub revocations: Arc<crate::policy::Revocations>,
}

/// A listening socket: TCP (the transparent listener, `listenOn: tcp://`) or Unix
/// (`listenOn: unix://`, with the guard that removes its file when the listener goes).
#[derive(Debug)]
pub enum Listener {
    Tcp(TcpListener),
    Unix(unix::UnixBound),
}

impl Listener {
    /// Where it listens, for logs: `127.0.0.1:5432`, `unix:/sock/.s.PGSQL.5432`.
    #[must_use]
    pub fn describe(&self) -> String {
        match self {
            Self::Tcp(l) => l
                .local_addr()
                .map_or_else(|_| "tcp".to_owned(), |a| a.to_string()),
            Self::Unix(u) => format!("unix:{}", u.file.path().display()),
        }
    }

    async fn accept(&self) -> std::io::Result<(AppSocket, ClientAddr)> {
        match self {
            Self::Tcp(l) => l
                .accept()
                .await
                .map(|(s, a)| (AppSocket::Tcp(s), ClientAddr::Tcp(a))),
            Self::Unix(u) => u.listener.accept().await.map(|(s, _)| {
                (
                    AppSocket::Unix(s),
                    ClientAddr::Unix(Arc::clone(u.file.path())),
                )
            }),
        }
    }
}

/// Accept on the transparent listener until `stop` turns true.
pub async fn serve_transparent(listener: TcpListener, shared: Shared, stop: watch::Receiver<bool>) {
    accept_loop(Listener::Tcp(listener), shared, stop, None).await;
}

/// Accept on a `listenOn` listener (`Runtime::listener(listener_id)`) until `stop`
/// turns true. A Unix socket's file is removed when this returns (or is dropped).
pub async fn serve_explicit(
    listener: Listener,
    shared: Shared,
    listener_id: u32,
    stop: watch::Receiver<bool>,
) {
    accept_loop(listener, shared, stop, Some(listener_id)).await;
}

async fn accept_loop(
    listener: Listener,
    shared: Shared,
    mut stop: watch::Receiver<bool>,
    explicit: Option<u32>,
) {
    // The address every accepted connection has on our side (one `getsockname` here
    // instead of one per connection); unknown for a wildcard or Unix listener.
    let local = match &listener {
        Listener::Tcp(l) => l.local_addr().ok().filter(|a| !a.ip().is_unspecified()),
        Listener::Unix(_) => None,
    };
    loop {
        tokio::select! {
            biased;
            () = stopped(&mut stop) => return,
            res = listener.accept() => match res {
                Ok((stream, peer)) => {
                    let Some(admission) = shared.caps.admit(explicit) else {
                        // Closed at once: over a cap, a connection must not cost more
                        // than the accept and one write (no task, no buffer, no
                        // upstream).
                        refuse_over_cap(&shared, &stream, &peer, local, explicit);
                        drop(stream);
                        shared.metrics.refused("cap");
                        cap_reached(&shared, &peer, explicit);
                        continue;
                    };
                    let shared = shared.clone();
                    let guard = shared.tracker.enter();
                    tokio::spawn(async move {
                        let _guard = guard;
                        let _admission = admission;
                        handle(stream, peer, local, shared, explicit).await;
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

/// Tell a client refused for a cap what its protocol says ("too many connections"), with
/// one non-blocking write, where the protocol lets a server speak first. A transparent
/// connection's record is taken (it names the service) so it does not linger.
fn refuse_over_cap(
    shared: &Shared,
    stream: &AppSocket,
    peer: &ClientAddr,
    local: Option<SocketAddr>,
    explicit: Option<u32>,
) {
    let runtime = shared.runtime.load();
    let rt = match explicit {
        Some(id) => runtime.listener(id),
        None => shared
            .interceptor
            .as_ref()
            .and_then(std::sync::Weak::upgrade)
            .zip(stream.as_tcp())
            .and_then(|(i, s)| i.take_record(s, peer.tcp(), local).ok().flatten())
            .and_then(|r| runtime.service(r.service_id)),
    };
    let Some(rt) = rt else {
        return;
    };
    let reason = "too many connections through the broker (broker.maxConnections / maxConnectionsPerListener)";
    if let Some(bytes) = rt.connector.refusal(&rt.service.name, reason) {
        let _ = stream.try_write(&bytes);
    }
}

/// The caller as policy sees it.
pub(crate) fn identity(c: Option<&Caller>) -> crate::policy::Identity<'_> {
    c.map_or_else(crate::policy::Identity::default, |c| {
        crate::policy::Identity {
            pid: Some(c.pid).filter(|p| *p != 0),
            uid: Some(c.uid),
            gid: Some(c.gid),
            cgroup: c.cgroup.as_deref().and_then(std::path::Path::to_str),
            exe: c.exe.as_deref(),
            comm: Some(c.comm.as_str()).filter(|s| !s.is_empty()),
        }
    })
}

/// Decide on a connection before anything is dialled or fetched: a live revocation,
/// then the service's policy. Every decision of a service with a policy, and every
/// revocation hit, is audited and counted. `Ok`: allowed (by this `allow` rule);
/// `Err`: the denial to tell the client.
fn police(
    shared: &Shared,
    runtime: &Runtime,
    rt: &ServiceRt,
    caller: Option<&Caller>,
    dst: Option<std::net::SocketAddr>,
) -> Result<Option<String>, crate::connector::Denial> {
    use crate::policy::Outcome;
    let who = identity(caller);
    let service = &rt.service.name;
    let outcome = if let Some(id) = shared.revocations.find(service, &who) {
        Outcome::Denied {
            rule: format!("revoked #{id}"),
            reason: "revoked by an operator (broker revoke)".to_owned(),
        }
    } else {
        match &rt.policy {
            Some(p) => p.decide(&who, crate::policy::Timestamp::now()),
            None => return Ok(None),
        }
    };
    let (allowed, rule, reason) = match &outcome {
        Outcome::Allowed { rule } => (true, rule.as_deref(), None),
        Outcome::Denied { rule, reason } => (false, Some(rule.as_str()), Some(reason.as_str())),
    };
    runtime
        .env
        .secrets
        .audit()
        .decision(&crate::audit::Decision {
            service,
            caller,
            destination: dst,
            allowed,
            rule,
            reason,
        });
    match outcome {
        Outcome::Allowed { rule } => Ok(rule),
        Outcome::Denied { rule, reason } => {
            // A bounded label: configured rule names and fixed words.
            let label = if rule.starts_with("revoked") {
                "revoked"
            } else {
                rule.as_str()
            };
            shared.metrics.policy_denied(service, label);
            Err(crate::connector::Denial {
                service: service.clone(),
                rule,
                reason,
            })
        }
    }
}

/// The rate-limited line for a connection closed because a cap was reached.
fn cap_reached(shared: &Shared, peer: &ClientAddr, explicit: Option<u32>) {
    let Some(suppressed) = shared.caps.log.check() else {
        return;
    };
    let runtime = shared.runtime.load();
    let listener = match explicit
        .and_then(|id| runtime.listener(id))
        .map(|rt| &rt.service)
    {
        Some(s) => match &s.listen_on {
            Some(ListenAddr::Tcp(a)) => format!("listenOn {a} of service {}", s.name),
            Some(a @ ListenAddr::Unix(_)) => format!("listenOn {a} of service {}", s.name),
            _ => format!("listenOn of service {}", s.name),
        },
        None => "transparent".to_owned(),
    };
    tracing::warn!(
        target: "access",
        result = "refused",
        src.addr = %peer,
        listener = %listener,
        reason = "connection cap reached (broker.maxConnections / maxConnectionsPerListener)",
        suppressed_before = suppressed,
        "connection refused: too many connections"
    );
}

async fn handle(
    stream: AppSocket,
    peer: ClientAddr,
    local: Option<SocketAddr>,
    shared: Shared,
    explicit: Option<u32>,
) {
    // The snapshot this connection runs with, from start to end: the one in force, or
    // for a redirected connect, the one its record was written under.
    let (runtime, rt, caller, orig_dst, splice) = match explicit {
        Some(id) => {
            let runtime = shared.runtime.load();
            let Some(rt) = runtime.listener(id).map(Arc::clone) else {
                return;
            };
            // A Unix socket's client is known by its credentials (SO_PEERCRED).
            let caller = match &stream {
                AppSocket::Unix(u) => unix::caller(u),
                AppSocket::Tcp(_) => None,
            };
            (runtime, rt, caller, None, None)
        }
        None => {
            let interceptor = shared
                .interceptor
                .as_ref()
                .and_then(std::sync::Weak::upgrade);
            let rec = interceptor
                .as_ref()
                .zip(stream.as_tcp())
                .and_then(|(i, s)| i.take_record(s, peer.tcp(), local).ok().flatten());
            let Some(rec) = rec.filter(|r| record_is_fresh(r.connect_ns)) else {
                // Someone connected to the listener directly: no redirect record, no
                // identity, nothing to broker. Close without a byte. Anyone local can
                // do this in a loop: the line is rate-limited (summarised once a second).
                // A client that closed before the accept (a driver's probe) took its
                // record with it when its socket closed: nothing was refused.
                if peer_gone(&stream) {
                    tracing::debug!(
                        target: "access",
                        result = "client_closed",
                        src.addr = %peer,
                        "connection closed by the client before it was accepted"
                    );
                    return;
                }
                drop(stream);
                shared.metrics.refused("no_record");
                if let Some(suppressed) = shared.refusals.check() {
                    tracing::warn!(
                        target: "access",
                        result = "refused",
                        src.addr = %peer,
                        reason = "no redirect record (direct connection to the broker's listener)",
                        suppressed_before = suppressed,
                        "connection refused"
                    );
                }
                return;
            };
            let caller = caller::from_record(&rec);
            let splice = interceptor
                .as_ref()
                .filter(|_| rec.flags & REC_IN_SPLICE_APP != 0)
                .map(|i| SpliceTicket {
                    splicer: i.splicer(),
                    app_cookie: rec.cookie,
                });
            let (runtime, rt) = match shared.runtime.for_record(rec.service_id, rec.generation) {
                Ok(found) => found,
                Err(e) => {
                    // Never served with another service's credentials.
                    if let Some(t) = splice {
                        t.splicer.forget(t.app_cookie);
                    }
                    shared.metrics.refused("stale_record");
                    tracing::warn!(target: "access", result = "refused", src.addr = %peer, reason = %e, "connection refused");
                    return;
                }
            };
            (
                runtime,
                rt,
                Some(caller),
                Some(record_destination(&rec)),
                splice,
            )
        }
    };
    let admitted_by = match police(&shared, &runtime, &rt, caller.as_ref(), orig_dst) {
        Ok(rule) => rule,
        Err(denial) => {
            if let Some(t) = splice {
                t.splicer.forget(t.app_cookie);
            }
            if let Some(suppressed) = shared.refusals.check() {
                tracing::warn!(
                    target: "access",
                    result = "denied",
                    service = %rt.service.name,
                    src.addr = %peer,
                    caller.pid = caller.as_ref().map(|c| c.pid),
                    caller.uid = caller.as_ref().map(|c| c.uid),
                    rule = %denial.rule,
                    reason = %denial.reason,
                    suppressed_before = suppressed,
                    "connection denied by policy"
                );
            }
            let _ = tokio::time::timeout(
                crate::connector::DENY_DEADLINE,
                rt.connector.deny(stream, &denial),
            )
            .await;
            return;
        }
    };
    let orig_host = orig_dst.and_then(|d| shared.names.lookup(rt.id, d));
    let span = tracing::info_span!("conn", service = %rt.service.name, client = %peer);
    // The service's metric handles, made once per snapshot; the connector instance gets
    // the metrics at the same moment (before its first connection).
    let metrics = Arc::clone(rt.metrics.get_or_init(|| {
        rt.connector.observe(&shared.metrics);
        Arc::new(
            shared
                .metrics
                .service(&rt.service.name, rt.service.connector.name()),
        )
    }));
    let live = shared.tracker.register(LiveConn::new(
        rt.service.name.clone(),
        rt.service.connector.name().to_owned(),
        caller.clone(),
        peer.to_string(),
        orig_dst,
    ));
    metrics.opened();
    let mut record = ConnResult::new(Conn {
        service: Arc::clone(&rt.service),
        client_addr: peer,
        caller,
        orig_dst,
        orig_host,
        admitted_by,
        stats: ConnStats {
            metrics: Some(metrics),
            live: Some(Arc::clone(live.conn())),
            ..ConnStats::default()
        },
    });
    let mut abort = shared.abort.clone();
    let ended = Arc::clone(live.conn());
    let conn = &mut record.conn;
    let result = async {
        // Biased: the connection first, with no random pick on each of its wake-ups;
        // the shutdown and revocation signals are polled on every wake-up all the same.
        tokio::select! {
            biased;
            r = serve(rt.connector.as_ref(), &runtime.env, conn, stream, splice) => r,
            () = stopped(&mut abort) => Err(ConnError::Io(std::io::Error::other("broker shutting down"))),
            () = ended.ended() => Err(ConnError::Io(std::io::Error::other("ended by a revocation (broker revoke --kill)"))),
        }
    }
    .instrument(span)
    .await;
    record.finish(result);
    // The access line and the metrics first, then the registry entry.
    drop(record);
    drop(live);
}

/// One connection through its connector, then the byte phase the core owns. An app
/// socket that is not spliced (an error, a cancel request, a client that never finished
/// its startup) leaves the splice map as soon as that is known, not when the app
/// closes: a client holding sockets open must not be able to fill it.
///
/// # Errors
/// The connector's error, or an I/O error while moving the session's bytes.
pub async fn serve(
    connector: &dyn Connector,
    env: &Env,
    conn: &mut Conn,
    client: AppSocket,
    ticket: Option<SpliceTicket>,
) -> Result<(), ConnError> {
    // Forgets the app socket on every way out but one: the byte phase, which decides.
    let mut guard = ForgetOnDrop(ticket);
    let started = std::time::Instant::now();
    match connector.serve(env, conn, client).await? {
        Handoff::Done => Ok(()),
        Handoff::Relay(session) => {
            if let Some(m) = &conn.stats.metrics {
                m.handshake(started.elapsed());
            }
            splice::run_session(session, guard.0.take(), &mut conn.stats).await
        }
    }
}

/// Takes an app socket out of `SPLICE_APP` when dropped, unless its ticket was taken.
struct ForgetOnDrop(Option<SpliceTicket>);

impl Drop for ForgetOnDrop {
    fn drop(&mut self) {
        if let Some(t) = self.0.take() {
            t.splicer.forget(t.app_cookie);
        }
    }
}

/// Resolves once the flag turns true (or its sender is gone).
pub async fn stopped(rx: &mut watch::Receiver<bool>) {
    let _ = rx.wait_for(|s| *s).await;
}

fn record_is_fresh(connect_ns: u64) -> bool {
    crate::sys::monotonic_ns().saturating_sub(connect_ns) < MAX_RECORD_AGE.as_nanos() as u64
}

/// Whether the peer of an accepted socket has already closed it (end of stream or a
/// reset waiting), without consuming anything.
fn peer_gone(stream: &impl AsFd) -> bool {
    let mut byte = [std::mem::MaybeUninit::<u8>::uninit(); 1];
    match socket2::SockRef::from(stream).peek(&mut byte) {
        Ok(0) => true,
        Ok(_) => false,
        Err(e) => e.kind() != std::io::ErrorKind::WouldBlock,
    }
}
