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
//!   `shutdown(SHUT_WR)` on the client-side socket once the app has read every byte the
//!   kernel redirected to it (at once when nothing is in flight; at most
//!   [`HANGUP_DEADLINE`] later), so that the upstream's last bytes reach it first.
//!
//! Every wait on the kernel's counters is bounded: the hang-up above, and the app's
//! catch-up after a download fallback ([`CatchUp`]), which ends the session, logged,
//! when the bytes it waits for cannot arrive.

use std::{io, time::Duration};

use tokio::{io::unix::AsyncFd, net::TcpStream};

use std::sync::{Arc, atomic::Ordering};

use tokio::io::AsyncWriteExt as _;

use super::relay;
use crate::drain::Phase;
use crate::sys::Epoll;
use crate::{
    connector::{
        ClientStream, ConnError, ConnStats, KernelUpload, Session, UploadFilter, UpstreamStream,
    },
    ebpf::{Spliced, Splicer, UploadPath},
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
    let mut filter = s.upload_filter.take();
    if let Some(f) = filter.as_deref_mut()
        && !s.to_upstream.is_empty()
    {
        // What the client sent before the byte phase is the start of its stream.
        let (mut up, mut reply) = (Vec::new(), Vec::new());
        f.feed(&s.to_upstream, &mut up, &mut reply);
        s.to_upstream = up;
        s.to_client.extend_from_slice(&reply);
    }
    let mut client = match s.client {
        ClientStream::Plain(c) => c,
        ClientStream::Tls(mut c) => {
            // TLS terminated here: never spliced.
            if let Some(t) = ticket {
                t.splicer.forget(t.app_cookie);
            }
            if let Some(l) = &stats.live {
                l.set_phase(Phase::Relayed);
            }
            stats.client_tls = true;
            return relay::relay_terminated(
                &mut c,
                s.upstream,
                &s.to_client,
                &s.to_upstream,
                filter.as_deref_mut(),
                stats,
            )
            .await;
        }
    };
    let app_cookie = ticket.as_ref().map_or(0, |t| t.app_cookie);
    // Only a TCP client can be spliced: the sockmap programs see TCP sockets only. (A
    // Unix socket client comes through a `listenOn`, which never has a ticket.)
    let mut up = match (s.upstream, ticket) {
        (UpstreamStream::Plain(up), Some(t))
            if s.client_waits
                && s.to_upstream.is_empty()
                && client.as_tcp().is_some_and(nothing_pending) =>
        {
            // Out of tokio's reactor first (see `run`).
            let up = up
                .into_std()
                .inspect_err(|_| t.splicer.forget(t.app_cookie))?;
            // The app reads `to_client` through TCP, after the splice has started.
            // A filter sees every byte the kernel does not carry.
            let upload = match filter.as_deref().map(UploadFilter::kernel_upload) {
                None => UploadPath::Kernel,
                Some(KernelUpload::MysqlCommands) => UploadPath::KernelMysql,
                Some(KernelUpload::None) => UploadPath::Daemon,
            };
            match t
                .splicer
                .start(t.app_cookie, s.to_client.len() as u64, &up, upload)
            {
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
    if let Some(l) = &stats.live {
        l.up.fetch_add(s.to_upstream.len() as u64, Ordering::Relaxed);
        l.down
            .fetch_add(s.to_client.len() as u64, Ordering::Relaxed);
        match &up {
            Up::Spliced(_, sp) => l.spliced(sp.counts()),
            _ => l.set_phase(Phase::Relayed),
        }
    }
    let live = stats.live.clone();
    let (a, b) = match up {
        Up::Spliced(u, sp) => {
            let Some(tcp) = client.as_tcp() else {
                return Err(ConnError::Io(io::Error::other(
                    "a non-TCP client cannot be spliced",
                )));
            };
            let o = run(tcp, u, &sp, app_cookie, filter).await?;
            stats.splice_fallback = o.fallback;
            if let Some(e) = o.error {
                stats.bytes_up += o.up;
                stats.bytes_down += o.down;
                return Err(e);
            }
            (o.up, o.down)
        }
        // Plain upstreams use the readiness-based relay (no buffer held while idle).
        Up::Plain(u) => {
            relay::relay_tcp(&client, &u, filter.as_deref_mut(), live.as_deref()).await?
        }
        Up::Other(u) => match filter.as_deref_mut() {
            Some(f) => relay::relay_filtered(&mut client, u, f).await?,
            None => relay::relay(&mut client, u).await?,
        },
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

/// The longest the upstream's hang-up is held back from an app that reads nothing while
/// bytes the kernel redirected to it are unread (see [`last_bytes_delivered`]). A client
/// that waits for the server to close (Terminate, then read to EOF) has nothing in
/// flight and gets the end at once; an app still reading is waited for as long as it
/// makes progress.
pub const HANGUP_DEADLINE: Duration = Duration::from_secs(1);

/// How long the upstream gets to hang up after the app has closed. Once the app socket
/// is gone the kernel has nowhere to put the upstream's data; a server blocked sending a
/// large result would never read our FIN, so the session is closed on it after this.
pub const UPSTREAM_LINGER: Duration = Duration::from_secs(5);

/// Wait until both directions of a spliced session have ended; returns the bytes moved
/// (client -> upstream, upstream -> client), kernel and daemon together. `app_cookie`
/// names the app's socket (for `sock_diag`, see [`CatchUp`]).
///
/// Either direction can leave the kernel path for good mid-session (see the `SPLICE_*`
/// programs in `broker-ebpf`):
/// * client -> upstream when the upstream's send buffer fills: the app's bytes then
///   arrive on the client-side socket like stragglers and are forwarded from here, with
///   ordinary flow control;
/// * upstream -> client when the app falls too far behind: the kernel reports it, the
///   app first reads what the kernel gave it (the upstream's unread bytes wait, charged
///   to its receive buffer, which is what stops the server meanwhile), then this
///   direction is relayed here (an upload that has not fallen back stays in the kernel).
///
/// Forwarding never blocks the rest: bytes waiting for room in the upstream socket are
/// held ([`Upload`]) while the hang-up and the other direction's fallback are still
/// watched. (A server stops reading while its own output is held back, which is what the
/// download fallback does by design: a daemon waiting for that room before anything
/// else would wait forever.)
///
/// # Errors
/// An I/O error on either socket, or when the hang-up watch cannot be set up.
pub async fn run(
    client: &TcpStream,
    up: std::net::TcpStream,
    spliced: &Spliced,
    app_cookie: u64,
    filter: Option<Box<dyn UploadFilter>>,
) -> Result<Outcome, ConnError> {
    let mut watch = UpWatch::new(&up)?;
    let mut upload = Upload {
        filter,
        ..Upload::default()
    };
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
            // Read the client only when what it sent before is on its way (flow control).
            r = client_bytes(client), if !client_done && upload.is_empty() => {
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
                    upload.push(buf, spliced);
                    upload.reply_to(client).await?;
                    upload.flush(&up)?;
                    watch.set(!up_done, !upload.is_empty())?;
                }
            }
            r = watch.events(), if !up_done || !upload.is_empty() => {
                let ev = r?;
                if !upload.is_empty() {
                    upload.flush(&up)?;
                }
                if !up_done && ev & UpWatch::HANGUP != 0 {
                    if !client_done && spliced.download_fell_back() {
                        // The server's last bytes wait on the upstream socket: relay
                        // them (then its end of stream) once the app has caught up.
                        drop(watch);
                        return relay_after_fallback(client, up, spliced, app_cookie, upload).await;
                    }
                    up_done = true;
                    if !client_done {
                        // The upstream's last bytes reach the app before our FIN.
                        last_bytes_delivered(spliced).await;
                    }
                    let _ = socket2::SockRef::from(client).shutdown(std::net::Shutdown::Write);
                }
                watch.set(!up_done, !upload.is_empty())?;
            }
            () = spliced.read_fallback(), if !client_done && !up_done => {
                drop(watch);
                return relay_after_fallback(client, up, spliced, app_cookie, upload).await;
            }
        }
    }
    let (up_bytes, down_bytes) = counted.unwrap_or_else(|| spliced.bytes());
    Ok(Outcome {
        up: up_bytes + upload.forwarded,
        down: down_bytes,
        fallback: if upload.forwarded > 0 { "up" } else { "" },
        error: None,
    })
}

/// After the upstream hung up, wait until the app has read every byte the kernel
/// redirected to it, or has read nothing for [`HANGUP_DEADLINE`]. The kernel delivers
/// redirected data from a work queue; a FIN sent by us travels the loopback TCP path.
/// The app reads what is queued in front of the FIN first, but a FIN that arrives while
/// the server's last bytes (a FATAL message, the end of a result) are still in the
/// kernel's redirect queue reads as the end of the stream. The first look is immediate:
/// with nothing in flight (the client sent Terminate and waits for our close) the end
/// goes out at once.
async fn last_bytes_delivered(spliced: &Spliced) {
    let mut deadline = tokio::time::Instant::now() + HANGUP_DEADLINE;
    let mut last = None;
    let mut pause = Duration::from_micros(200);
    loop {
        let unread = spliced.unread();
        match unread {
            Some(n) if n > 0 => {}
            _ => return,
        }
        let now = tokio::time::Instant::now();
        if unread != last {
            // Reading: wait on.
            last = unread;
            deadline = now + HANGUP_DEADLINE;
        } else if now >= deadline {
            tracing::debug!(
                unread = unread.unwrap_or(0),
                "upstream hung up; the app stopped reading the server's last bytes; closing anyway"
            );
            return;
        }
        tokio::time::sleep(pause).await;
        pause = (pause * 2).min(Duration::from_millis(10));
    }
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

/// Client bytes the daemon forwards upstream (an upload the kernel handed back), at most
/// one read's worth waiting for room at a time.
#[derive(Default)]
struct Upload {
    pending: Vec<u8>,
    /// Of `pending`, already written.
    done: usize,
    /// Bytes taken from the client for the upstream, in all.
    forwarded: u64,
    /// The session's upload filter: it sees every byte taken here.
    filter: Option<Box<dyn UploadFilter>>,
    /// Whether the filter has been told where the kernel left off.
    resumed: bool,
    /// The filter's replies, for the client.
    reply: Vec<u8>,
}

impl Upload {
    fn is_empty(&self) -> bool {
        self.done >= self.pending.len()
    }

    fn push(&mut self, buf: Vec<u8>, spliced: &Spliced) {
        debug_assert!(self.is_empty());
        let buf = match self.filter.as_deref_mut() {
            None => buf,
            Some(f) => {
                if !self.resumed {
                    self.resumed = true;
                    f.resume(spliced.upload_left());
                }
                let mut out = Vec::with_capacity(buf.len());
                f.feed(&buf, &mut out, &mut self.reply);
                out
            }
        };
        self.forwarded += buf.len() as u64;
        self.pending = buf;
        self.done = 0;
    }

    /// Write the filter's replies to the client (it waits for them: nothing else is
    /// being written to it).
    async fn reply_to(&mut self, client: &TcpStream) -> io::Result<()> {
        if !self.reply.is_empty() {
            relay::write_all(client, &self.reply).await?;
            self.reply.clear();
        }
        Ok(())
    }

    /// What is still to be written.
    fn rest(&self) -> &[u8] {
        &self.pending[self.done.min(self.pending.len())..]
    }

    /// Write what the (non-blocking) upstream socket takes now.
    fn flush(&mut self, mut to: &std::net::TcpStream) -> io::Result<()> {
        use std::io::Write as _;
        while !self.is_empty() {
            match to.write(self.rest()) {
                Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                Ok(n) => self.done += n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }

    /// [`Upload::flush`] for the upstream once it is back in tokio's reactor.
    fn try_flush(&mut self, to: &TcpStream) -> io::Result<()> {
        while !self.is_empty() {
            match to.try_write(self.rest()) {
                Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                Ok(n) => self.done += n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }
}

/// How a spliced session went.
#[derive(Debug)]
pub struct Outcome {
    /// Bytes client -> upstream, kernel and daemon together.
    pub up: u64,
    /// Bytes upstream -> client, kernel and daemon together.
    pub down: u64,
    /// Directions handed back to the daemon mid-session (see `ConnStats`).
    pub fallback: &'static str,
    /// Why the daemon ended the session itself (see [`CatchUp`]).
    pub error: Option<ConnError>,
}

/// The longest pause between two looks at whether the app has caught up.
const CATCH_UP_POLL_MAX: Duration = Duration::from_millis(50);

/// How long the app may go without reading while it has nothing left to read and the
/// kernel still counts bytes it redirected to it: those bytes are not coming (see
/// [`CatchUp`]). Far above the kernel's redirect latency (a work queue, microseconds).
pub const CATCH_UP_STALL: Duration = Duration::from_secs(2);

/// How long the app may go without reading at all when its socket cannot be looked at
/// (`sock_diag` failed): the same verdict, without the evidence.
pub const CATCH_UP_BLIND: Duration = Duration::from_secs(60);

/// The wait for the app to read what the kernel redirected to it before the daemon
/// takes over the server -> app direction. It ends when the app has read it all, or
/// when the bytes the kernel counted cannot arrive any more: the app has read nothing
/// for [`CATCH_UP_STALL`] while its socket holds nothing for it to read
/// (`sock_diag`: no receive memory, so nothing queued, neither in its TCP queue nor
/// in what the kernel redirected). An app that is merely slow holds unread bytes and
/// is waited for, like any idle client.
struct CatchUp {
    app: Option<(std::net::SocketAddr, std::net::SocketAddr)>,
    app_cookie: u64,
    last_unread: Option<i64>,
    since: tokio::time::Instant,
}

impl CatchUp {
    fn new(client: &TcpStream, app_cookie: u64) -> Self {
        // The app socket as it sees itself: local = our peer, remote = our address.
        let app = client.peer_addr().ok().zip(client.local_addr().ok());
        Self {
            app,
            app_cookie,
            last_unread: None,
            since: tokio::time::Instant::now(),
        }
    }

    /// After a look at the counters: `Err` when the wait is over without the bytes.
    fn check(&mut self, unread: Option<i64>) -> Result<(), ConnError> {
        let now = tokio::time::Instant::now();
        if unread != self.last_unread {
            self.last_unread = unread;
            self.since = now;
            return Ok(());
        }
        let idle = now.duration_since(self.since);
        if idle < CATCH_UP_STALL {
            return Ok(());
        }
        let mem = self
            .app
            .map(|(l, r)| crate::sys::tcp_sock_mem(l, r, self.app_cookie));
        // No socket by that name (it closed: its FIN is on its way to us) or no answer:
        // no evidence either way.
        let queued = match mem {
            Some(Ok(Some(m))) => Some(m.rmem_alloc),
            Some(Ok(None) | Err(_)) | None => None,
        };
        match queued {
            Some(0) => {}
            Some(_) => {
                // Slow, not stuck: it has bytes to read.
                self.since = now;
                return Ok(());
            }
            None if idle < CATCH_UP_BLIND => return Ok(()),
            None => {}
        }
        let missing = unread.unwrap_or(0);
        tracing::warn!(
            missing,
            idle_ms = idle.as_millis() as u64,
            "kernel splice: the app is waiting for bytes the kernel counted as redirected to it and never delivered; ending the session"
        );
        Err(ConnError::Io(io::Error::new(
            io::ErrorKind::TimedOut,
            format!(
                "kernel splice: {missing} bytes redirected to the app never reached it; session ended"
            ),
        )))
    }
}

/// The rest of a session whose upstream -> client direction the kernel handed back:
/// once the app has read everything the kernel gave it (what the daemon writes to the
/// client socket lands behind that), relay it (and the upload, as far as it comes to
/// the client-side socket). `upload`: what the daemon already took from the client
/// (some of it perhaps still to write).
///
/// Meanwhile the client's bytes keep going upstream as the upstream takes them; the
/// server's output stays unread on the upstream socket (that is what holds the server
/// back), so a server that stops reading until its output moves may leave some of the
/// upload waiting: it is written by the relay, which reads the server at the same time.
async fn relay_after_fallback(
    client: &TcpStream,
    up: std::net::TcpStream,
    spliced: &Spliced,
    app_cookie: u64,
    mut upload: Upload,
) -> Result<Outcome, ConnError> {
    let uploaded_before = upload.forwarded > 0;
    tracing::debug!("app fell behind; relaying the rest of the session in userspace");
    let up = TcpStream::from_std(up)?;
    let mut catch_up = CatchUp::new(client, app_cookie);
    let mut pause = Duration::from_millis(1);
    let look = tokio::time::sleep(pause);
    tokio::pin!(look);
    let mut error = None;
    // Bounded: every turn looks at the counters or moves bytes, and CatchUp ends a wait
    // that cannot end.
    while !spliced.app_caught_up() {
        tokio::select! {
            () = &mut look => {
                if let Err(e) = catch_up.check(spliced.unread()) {
                    error = Some(e);
                    break;
                }
                pause = (pause * 2).min(CATCH_UP_POLL_MAX);
                look.as_mut().reset(tokio::time::Instant::now() + pause);
            }
            r = client_bytes(client), if upload.is_empty() => {
                let buf = r?;
                if buf.is_empty() {
                    // The app is gone: nothing left to keep in order.
                    break;
                }
                upload.push(buf, spliced);
                upload.reply_to(client).await?;
                upload.try_flush(&up)?;
            }
            r = up.writable(), if !upload.is_empty() => {
                r?;
                upload.try_flush(&up)?;
            }
        }
    }
    // The kernel hands on nothing more of the download (the fallback is for good); its
    // count is final.
    let k_down = spliced.bytes().1;
    let fallback = if uploaded_before { "both" } else { "down" };
    if let Some(e) = error {
        return Ok(Outcome {
            up: spliced.bytes().0 + upload.forwarded,
            down: k_down,
            fallback,
            error: Some(e),
        });
    }
    // The entries stay until the session ends: the upstream's is where the verdict keeps
    // the stream's position, so that a retransmitted segment's head it already handed on
    // is cut off for the relay too; and an upload that has not fallen back stays in the
    // kernel (what it redirected is in the upstream's queue ahead of anything relayed).
    // What the client already sent goes first; an app that has left (its FIN read here)
    // reads as the end of its stream again, which the relay passes on.
    let mut filter = upload.filter.take();
    let (a, b) = relay::relay_tcp_after(client, &up, upload.rest(), filter.as_deref_mut()).await?;
    Ok(Outcome {
        up: spliced.bytes().0 + upload.forwarded + a,
        down: k_down + b,
        fallback,
        error: None,
    })
}

/// A private epoll set holding the upstream socket, with `EPOLLRDHUP` interest until the
/// upstream has hung up, and `EPOLLOUT` while upload bytes wait for room. Its fd turns
/// readable when the peer half-closes, resets or the socket fails, or (when asked) it
/// turns writable. The kernel filters the per-packet "readable" wake-ups of redirected
/// data out of this set, so a busy spliced session never wakes the daemon.
struct UpWatch {
    fd: AsyncFd<Epoll>,
    sock: i32,
    /// The interest set now.
    interest: u32,
}

impl UpWatch {
    /// Events that mean the upstream hung up or failed (`EPOLLHUP` and `EPOLLERR` are
    /// always reported).
    const HANGUP: u32 = (libc::EPOLLRDHUP | libc::EPOLLHUP | libc::EPOLLERR) as u32;

    fn new(sock: &impl std::os::fd::AsRawFd) -> io::Result<Self> {
        let w = Self {
            fd: crate::sys::async_readable(Epoll::new()?)?,
            sock: sock.as_raw_fd(),
            interest: libc::EPOLLRDHUP as u32,
        };
        w.fd.get_ref()
            .ctl(libc::EPOLL_CTL_ADD, w.sock, w.interest)?;
        Ok(w)
    }

    /// Level-triggered interest: the hang-up (until seen: once the peer has hung up the
    /// set would stay ready) and room to write (while something waits for it).
    fn set(&mut self, hangup: bool, out: bool) -> io::Result<()> {
        let events = (if hangup { libc::EPOLLRDHUP } else { 0 }
            | if out { libc::EPOLLOUT } else { 0 }) as u32;
        if events != self.interest {
            self.fd
                .get_ref()
                .ctl(libc::EPOLL_CTL_MOD, self.sock, events)?;
            self.interest = events;
        }
        Ok(())
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
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The daemon's client-side socket and the app's socket at its other end.
    async fn pair() -> (TcpStream, std::net::TcpStream) {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let app = std::net::TcpStream::connect(l.local_addr().unwrap()).unwrap();
        let (ours, _) = l.accept().unwrap();
        ours.set_nonblocking(true).unwrap();
        (TcpStream::from_std(ours).unwrap(), app)
    }

    #[tokio::test(start_paused = true)]
    async fn catch_up_ends_only_when_the_app_has_nothing_left_to_read() {
        let (ours, mut app) = pair().await;
        let cookie = crate::sys::sockopt_u64(&app, libc::SO_COOKIE).unwrap();
        let mut c = CatchUp::new(&ours, cookie);
        // Progress (the unread count moves) keeps the wait going.
        assert!(c.check(Some(100)).is_ok());
        tokio::time::advance(CATCH_UP_STALL).await;
        assert!(c.check(Some(90)).is_ok());
        // The app holds bytes it has not read: slow, not stuck, however long.
        assert_eq!(ours.try_write(&[1u8; 100]).unwrap(), 100);
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        while crate::sys::unread_bytes(&app).unwrap() < 100 {
            assert!(std::time::Instant::now() < deadline, "bytes never arrived");
            std::thread::sleep(Duration::from_millis(1));
        }
        for _ in 0..5 {
            tokio::time::advance(CATCH_UP_STALL * 2).await;
            assert!(c.check(Some(90)).is_ok());
        }
        // Once it has read everything it has, the counted bytes are not coming.
        let mut buf = [0u8; 100];
        std::io::Read::read_exact(&mut app, &mut buf).unwrap();
        tokio::time::advance(CATCH_UP_STALL).await;
        let e = c.check(Some(90)).unwrap_err();
        assert!(e.to_string().contains("90 bytes"), "{e}");
        // Another socket's cookie is no evidence: only the blind bound ends the wait.
        let mut c = CatchUp::new(&ours, cookie ^ 1);
        assert!(c.check(Some(5)).is_ok());
        tokio::time::advance(CATCH_UP_STALL).await;
        assert!(c.check(Some(5)).is_ok());
        tokio::time::advance(CATCH_UP_BLIND).await;
        assert!(c.check(Some(5)).is_err());
        drop(app);
    }
}
