//! Waiting out a session the kernel relays (see `broker_splice_msg` / `broker_splice_skb`
//! in `broker-ebpf` and docs/ARCHITECTURE.md, "Splice").
//!
//! Once spliced, the app's sends leave through the upstream socket and the upstream's
//! data lands in the app socket's receive queue without passing through this process.
//! The upstream socket is taken out of tokio's reactor for the splice: registered there,
//! every packet the kernel redirects would still wake a worker thread (the socket's
//! "readable" callback fires even though nothing is left to read). What is left here is
//! the ends of the session:
//!
//! * the client-side socket sees the app's FIN (or, defensively, any byte the app sent
//!   before the splice took effect, which is forwarded). The app's FIN ends the kernel
//!   path both ways at once (the `SPLICE` entries are deleted, so nothing more is
//!   redirected) and is passed on as
//!   `shutdown(SHUT_WR)` on the upstream socket. A half-closed app therefore gets no
//!   more data; PostgreSQL clients never half-close (they send Terminate and close);
//! * the upstream socket's hang-up is watched through a private epoll set that asks for
//!   `EPOLLRDHUP` only: the kernel filters out the per-packet "readable" wake-ups there,
//!   so a busy spliced session never wakes the daemon. The hang-up is passed on as
//!   `shutdown(SHUT_WR)` on the client-side socket after a short grace period that lets
//!   the kernel's redirect worker deliver the upstream's last bytes first.

use std::{io, time::Duration};

use tokio::{io::unix::AsyncFd, net::TcpStream};

use std::sync::Arc;

use tokio::io::AsyncWriteExt as _;

use super::relay;
use crate::sys::Epoll;
use crate::{
    connector::{ClientStream, ConnError, ConnStats, Session, UpstreamStream},
    ebpf::{Spliced, Splicer},
};

/// What the core needs to splice a session: the splice maps and the app socket's cookie
/// (its key in every splice map; its bytes read are counted under it).
#[derive(Debug, Clone)]
pub struct SpliceTicket {
    pub splicer: Arc<Splicer>,
    pub app_cookie: u64,
}

/// The byte phase of an authenticated session, for any connector: deliver what each
/// side is owed, then splice the session in the kernel or relay it, until both sides are
/// done. Spliced only with a ticket (the app socket is in `SPLICE_APP`), a plain
/// upstream, a client that sends nothing until it has its bytes
/// ([`Session::client_waits`]) and nothing in flight either way; otherwise the app
/// socket leaves the splice map and the session is relayed.
///
/// # Errors
/// An I/O error on either side.
pub async fn run_session(
    mut s: Session,
    ticket: Option<SpliceTicket>,
    stats: &mut ConnStats,
) -> Result<(), ConnError> {
    let _keep = s.keep.take();
    let mut client = match s.client {
        ClientStream::Plain(c) => c,
        ClientStream::Tls(mut c) => {
            // TLS terminated here: never spliced.
            if let Some(t) = ticket {
                t.splicer.forget(t.app_cookie);
            }
            stats.client_tls = true;
            return relay::relay_terminated(
                &mut c,
                s.upstream,
                &s.to_client,
                &s.to_upstream,
                stats,
            )
            .await;
        }
    };
    let mut up = match (s.upstream, ticket) {
        (UpstreamStream::Plain(up), Some(t))
            if s.client_waits && s.to_upstream.is_empty() && nothing_pending(&client) =>
        {
            // Out of tokio's reactor first (see `run`).
            let up = up
                .into_std()
                .inspect_err(|_| t.splicer.forget(t.app_cookie))?;
            // The app reads `to_client` through TCP, after the splice has started.
            match t.splicer.start(t.app_cookie, s.to_client.len() as u64, &up) {
                Ok(sp) => Up::Spliced(up, sp),
                Err(e) => {
                    tracing::warn!(error = %e, "kernel splice unavailable; relaying in userspace");
                    t.splicer.forget(t.app_cookie);
                    Up::Plain(TcpStream::from_std(up)?)
                }
            }
        }
        (up, t) => {
            // Not spliced: the app's socket goes back to plain TCP.
            if let Some(t) = t {
                t.splicer.forget(t.app_cookie);
            }
            match up {
                UpstreamStream::Plain(up) => Up::Plain(up),
                UpstreamStream::Other(up) => Up::Other(up),
            }
        }
    };
    client.write_all(&s.to_client).await?;
    client.flush().await?;
    match &mut up {
        Up::Plain(u) => relay::write_all(u, &s.to_upstream).await?,
        Up::Other(u) => {
            u.write_all(&s.to_upstream).await?;
            u.flush().await?;
        }
        Up::Spliced(..) => debug_assert!(s.to_upstream.is_empty()),
    }
    stats.bytes_down += s.to_client.len() as u64;
    stats.bytes_up += s.to_upstream.len() as u64;
    stats.spliced = matches!(up, Up::Spliced(..));
    let (a, b) = match up {
        Up::Spliced(u, sp) => {
            let o = run(&client, u, &sp).await?;
            stats.splice_fallback = o.fallback;
            (o.up, o.down)
        }
        // Plain upstreams use the readiness-based relay (no buffer held while idle).
        Up::Plain(u) => relay::relay_tcp(&client, &u).await?,
        Up::Other(u) => relay::relay(&mut client, u).await?,
    };
    stats.bytes_up += a;
    stats.bytes_down += b;
    Ok(())
}

/// The upstream during the byte phase.
enum Up {
    Plain(TcpStream),
    Other(Box<dyn crate::connector::AsyncStream>),
    /// Out of tokio's reactor, with the guard of its splice map entries.
    Spliced(std::net::TcpStream, Spliced),
}

/// Whether the client-side socket has no unread byte in the kernel (anything the client
/// sent early would be overtaken by its spliced bytes).
fn nothing_pending(client: &TcpStream) -> bool {
    crate::sys::unread_bytes(client).is_ok_and(|n| n == 0)
}

/// How long the upstream's last bytes get to reach the app before its FIN does. The
/// kernel delivers redirected data from a work queue; a FIN sent by us travels the
/// loopback TCP path and could otherwise overtake it.
pub const HANGUP_GRACE: Duration = Duration::from_millis(50);

/// How long the upstream gets to hang up after the app has closed. Once the app socket
/// is gone the kernel has nowhere to put the upstream's data; a server blocked sending a
/// large result would never read our FIN, so the session is closed on it after this.
pub const UPSTREAM_LINGER: Duration = Duration::from_secs(5);

/// Wait until both directions of a spliced session have ended; returns the bytes moved
/// (client -> upstream, upstream -> client), kernel and daemon together.
///
/// Either direction can leave the kernel path for good mid-session (see the `SPLICE_*`
/// programs in `broker-ebpf`):
/// * client -> upstream when the upstream's send buffer fills: the app's bytes then
///   arrive on the client-side socket like stragglers and are forwarded from here, with
///   ordinary flow control;
/// * upstream -> client when the app falls too far behind: the kernel reports it, the
///   app first reads what the kernel gave it, then the session is relayed here both
///   ways (the splice entries are deleted; the upstream's unread bytes wait, charged to
///   its receive buffer, which is what stops the server meanwhile).
///
/// # Errors
/// An I/O error on either socket, or when the hang-up watch cannot be set up.
pub async fn run(
    client: &TcpStream,
    up: std::net::TcpStream,
    spliced: &Spliced,
) -> Result<Outcome, ConnError> {
    let watch = UpWatch::new(&up)?;
    let mut forwarded = 0u64;
    let mut client_done = false;
    let mut up_done = false;
    let mut counted = None;
    let linger = tokio::time::sleep(Duration::MAX);
    tokio::pin!(linger);
    while !(client_done && up_done) {
        tokio::select! {
            () = &mut linger, if client_done => {
                // Abort (RST on close): a server blocked on a full window would not
                // notice a FIN until its next successful send.
                tracing::debug!("upstream did not hang up after the client left; resetting it");
                let _ = socket2::SockRef::from(&up).set_linger(Some(Duration::ZERO));
                break;
            }
            r = client_bytes(client), if !client_done => {
                let buf = r?;
                if buf.is_empty() {
                    client_done = true;
                    // Count first: unlinking deletes the counters.
                    counted = Some(spliced.bytes());
                    spliced.unlink();
                    let _ = socket2::SockRef::from(&up).shutdown(std::net::Shutdown::Write);
                    linger
                        .as_mut()
                        .reset(tokio::time::Instant::now() + UPSTREAM_LINGER);
                } else {
                    // Sent before the splice took effect, or after the kernel handed
                    // this direction back: the kernel's bytes are already in the
                    // upstream socket, so these go after them, in order.
                    watch.write_all(&up, &buf).await?;
                    forwarded += buf.len() as u64;
                }
            }
            r = watch.hangup(), if !up_done => {
                r?;
                if !client_done && spliced.download_fell_back() {
                    // The server's last bytes wait on the upstream socket: relay them
                    // (then its end of stream) once the app has caught up.
                    drop(watch);
                    return relay_after_fallback(client, up, spliced, forwarded).await;
                }
                up_done = true;
                if !client_done {
                    // The app is still there to read the upstream's last bytes.
                    tokio::time::sleep(HANGUP_GRACE).await;
                }
                let _ = socket2::SockRef::from(client).shutdown(std::net::Shutdown::Write);
            }
            () = spliced.read_fallback(), if !client_done && !up_done => {
                drop(watch);
                return relay_after_fallback(client, up, spliced, forwarded).await;
            }
        }
    }
    let (up_bytes, down_bytes) = counted.unwrap_or_else(|| spliced.bytes());
    Ok(Outcome {
        up: up_bytes + forwarded,
        down: down_bytes,
        fallback: if forwarded > 0 { "up" } else { "" },
    })
}

/// The next bytes the app sent to the client-side socket; empty at its FIN. Allocated
/// only when the socket wakes: at the app's FIN, normally, since the kernel carries the
/// app's sends. Cancel-safe.
async fn client_bytes(client: &TcpStream) -> io::Result<Vec<u8>> {
    loop {
        client.readable().await?;
        let mut buf = Vec::with_capacity(64 * 1024);
        match client.try_read_buf(&mut buf) {
            Ok(_) => return Ok(buf),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
            Err(e) => return Err(e),
        }
    }
}

/// How a spliced session went.
#[derive(Debug, Clone, Copy)]
pub struct Outcome {
    /// Bytes client -> upstream, kernel and daemon together.
    pub up: u64,
    /// Bytes upstream -> client, kernel and daemon together.
    pub down: u64,
    /// Directions handed back to the daemon mid-session (see `ConnStats`).
    pub fallback: &'static str,
}

/// The longest pause between two looks at whether the app has caught up.
const CATCH_UP_POLL_MAX: Duration = Duration::from_millis(50);

/// The rest of a session whose upstream -> client direction the kernel handed back:
/// once the app has read everything the kernel gave it (what the daemon writes to the
/// client socket lands behind that), end the splice and relay both ways. `forwarded`:
/// upload bytes the daemon already forwarded.
async fn relay_after_fallback(
    client: &TcpStream,
    up: std::net::TcpStream,
    spliced: &Spliced,
    mut forwarded: u64,
) -> Result<Outcome, ConnError> {
    let uploaded_before = forwarded > 0;
    tracing::debug!("app fell behind; relaying the rest of the session in userspace");
    let up = TcpStream::from_std(up)?;
    let mut pause = Duration::from_millis(1);
    while !spliced.app_caught_up() {
        tokio::select! {
            () = tokio::time::sleep(pause) => pause = (pause * 2).min(CATCH_UP_POLL_MAX),
            r = client_bytes(client) => {
                let buf = r?;
                if buf.is_empty() {
                    // The app is gone: nothing left to keep in order.
                    break;
                }
                relay::write_all(&up, &buf).await?;
                forwarded += buf.len() as u64;
            }
        }
    }
    let (k_up, k_down) = spliced.bytes();
    spliced.unlink();
    let (a, b) = relay::relay_tcp(client, &up).await?;
    Ok(Outcome {
        up: k_up + forwarded + a,
        down: k_down + b,
        fallback: if uploaded_before { "both" } else { "down" },
    })
}

/// A private epoll set holding the upstream socket, with `EPOLLRDHUP` interest (plus
/// `EPOLLOUT` while a write waits for room); its fd turns readable when the peer
/// half-closes, resets or the socket fails, or it turns writable. The kernel filters the
/// per-packet "readable" wake-ups of redirected data out of this set, so a busy spliced
/// session never wakes the daemon.
struct UpWatch {
    fd: AsyncFd<Epoll>,
    sock: i32,
}

impl UpWatch {
    fn new(sock: &impl std::os::fd::AsRawFd) -> io::Result<Self> {
        let w = Self {
            fd: crate::sys::async_readable(Epoll::new()?)?,
            sock: sock.as_raw_fd(),
        };
        w.ctl(libc::EPOLL_CTL_ADD, false)?;
        Ok(w)
    }

    /// Level-triggered: once the peer has hung up the set stays ready. EPOLLERR and
    /// EPOLLHUP are always reported.
    fn ctl(&self, op: i32, out: bool) -> io::Result<()> {
        let events = (libc::EPOLLRDHUP | if out { libc::EPOLLOUT } else { 0 }) as u32;
        self.fd.get_ref().ctl(op, self.sock, events)
    }

    /// The next events of the upstream socket.
    async fn events(&self) -> io::Result<u32> {
        loop {
            let mut guard = self.fd.readable().await?;
            if let Some(events) = self.fd.get_ref().ready()? {
                return Ok(events);
            }
            guard.clear_ready();
        }
    }

    /// Wait for the upstream's hang-up (or failure).
    async fn hangup(&self) -> io::Result<()> {
        self.events().await.map(drop)
    }

    /// Write to the (non-blocking, unregistered) upstream socket, waiting for room in
    /// this set.
    async fn write_all(&self, mut to: &std::net::TcpStream, mut data: &[u8]) -> io::Result<()> {
        use std::io::Write as _;
        let mut waiting = false;
        let res = loop {
            if data.is_empty() {
                break Ok(());
            }
            match to.write(data) {
                Ok(0) => break Err(io::ErrorKind::WriteZero.into()),
                Ok(n) => data = &data[n..],
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    if !waiting {
                        self.ctl(libc::EPOLL_CTL_MOD, true)?;
                        waiting = true;
                    }
                    self.events().await?;
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => break Err(e),
            }
        };
        if waiting {
            self.ctl(libc::EPOLL_CTL_MOD, false)?;
        }
        res
    }
}
