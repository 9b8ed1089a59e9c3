//! Moving bytes once a session is authenticated: the readiness-based relay between two
//! plain sockets ([`relay_tcp`]: a TCP upstream and the app's TCP or Unix socket), the
//! generic relay for any other stream (TLS: [`relay`]).

use std::{
    future::Future,
    io,
    os::fd::AsFd,
    sync::atomic::{AtomicU64, Ordering},
};

use tokio::{
    io::{AsyncReadExt as _, AsyncWriteExt as _},
    net::TcpStream,
};

use crate::{
    connector::{AppSocket, AsyncStream, ConnError, ConnStats, UploadFilter, UpstreamStream},
    drain::LiveConn,
};

/// A plain socket the readiness-based relay moves bytes between: TCP, or the app's
/// socket as accepted (TCP or Unix).
pub trait Ready: AsFd + Sync {
    /// Wait until the socket may be read.
    fn readable(&self) -> impl Future<Output = io::Result<()>> + Send;
    /// Wait until the socket may be written.
    fn writable(&self) -> impl Future<Output = io::Result<()>> + Send;
    /// Read what is there now (`WouldBlock` when nothing is).
    ///
    /// # Errors
    /// `WouldBlock`, or the socket's error.
    fn try_read_buf(&self, buf: &mut Vec<u8>) -> io::Result<usize>;
    /// Write what fits now (`WouldBlock` when nothing does).
    ///
    /// # Errors
    /// `WouldBlock`, or the socket's error.
    fn try_write(&self, data: &[u8]) -> io::Result<usize>;
}

impl Ready for TcpStream {
    fn readable(&self) -> impl Future<Output = io::Result<()>> + Send {
        TcpStream::readable(self)
    }

    fn writable(&self) -> impl Future<Output = io::Result<()>> + Send {
        TcpStream::writable(self)
    }

    fn try_read_buf(&self, buf: &mut Vec<u8>) -> io::Result<usize> {
        TcpStream::try_read_buf(self, buf)
    }

    fn try_write(&self, data: &[u8]) -> io::Result<usize> {
        TcpStream::try_write(self, data)
    }
}

impl Ready for AppSocket {
    fn readable(&self) -> impl Future<Output = io::Result<()>> + Send {
        AppSocket::readable(self)
    }

    fn writable(&self) -> impl Future<Output = io::Result<()>> + Send {
        AppSocket::writable(self)
    }

    fn try_read_buf(&self, buf: &mut Vec<u8>) -> io::Result<usize> {
        AppSocket::try_read_buf(self, buf)
    }

    fn try_write(&self, data: &[u8]) -> io::Result<usize> {
        AppSocket::try_write(self, data)
    }
}

/// Relay buffer size in each direction (plain TCP).
pub const RELAY_BUF: usize = 64 * 1024;

/// Buffer size of the generic (TLS) relay, per direction.
pub const TLS_RELAY_BUF: usize = 16 * 1024;

/// Copy both ways between the client and any upstream stream (e.g. TLS) until both
/// sides are done; returns (client->upstream, upstream->client).
///
/// # Errors
/// The first I/O error on either side.
pub async fn relay<C, U>(client: &mut C, mut upstream: U) -> Result<(u64, u64), ConnError>
where
    C: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + ?Sized,
    U: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    let res = tokio::io::copy_bidirectional_with_sizes(
        client,
        &mut upstream,
        TLS_RELAY_BUF,
        TLS_RELAY_BUF,
    )
    .await;
    let _ = upstream.shutdown().await;
    Ok(res?)
}

/// [`relay`] with the client's bytes through `filter` (see
/// [`crate::connector::Session::upload_filter`]); its replies go to the client between
/// the upstream's writes.
///
/// # Errors
/// The first I/O error on either side.
pub async fn relay_filtered<C, U>(
    client: C,
    upstream: U,
    filter: &mut (dyn UploadFilter + 'static),
) -> Result<(u64, u64), ConnError>
where
    C: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
    U: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    let (mut cr, cw) = tokio::io::split(client);
    let (mut ur, mut uw) = tokio::io::split(upstream);
    // Both directions write to the client: whole writes, one at a time.
    let cw = tokio::sync::Mutex::new(cw);
    let up = async {
        let mut buf = vec![0u8; TLS_RELAY_BUF];
        let (mut out, mut reply) = (Vec::new(), Vec::new());
        let mut total = 0u64;
        loop {
            let n = cr.read(&mut buf).await?;
            if n == 0 {
                let _ = uw.shutdown().await;
                return Ok::<_, std::io::Error>(total);
            }
            out.clear();
            reply.clear();
            filter.feed(&buf[..n], &mut out, &mut reply);
            if !out.is_empty() {
                uw.write_all(&out).await?;
                uw.flush().await?;
                total += out.len() as u64;
            }
            if !reply.is_empty() {
                let mut w = cw.lock().await;
                w.write_all(&reply).await?;
                w.flush().await?;
            }
        }
    };
    let down = async {
        let mut buf = vec![0u8; TLS_RELAY_BUF];
        let mut total = 0u64;
        loop {
            let n = ur.read(&mut buf).await?;
            let mut w = cw.lock().await;
            if n == 0 {
                let _ = w.shutdown().await;
                return Ok::<_, std::io::Error>(total);
            }
            w.write_all(&buf[..n]).await?;
            w.flush().await?;
            total += n as u64;
        }
    };
    Ok(tokio::try_join!(up, down)?)
}

/// The byte phase of a session whose client leg is TLS the broker terminated: deliver
/// what each side is owed, then the generic relay.
///
/// # Errors
/// An I/O error on either side.
pub async fn relay_terminated(
    client: &mut Box<dyn AsyncStream>,
    upstream: UpstreamStream,
    to_client: &[u8],
    to_upstream: &[u8],
    filter: Option<&mut (dyn UploadFilter + 'static)>,
    stats: &mut ConnStats,
) -> Result<(), ConnError> {
    client.write_all(to_client).await?;
    client.flush().await?;
    stats.bytes_down += to_client.len() as u64;
    stats.bytes_up += to_upstream.len() as u64;
    let mut upstream: Box<dyn AsyncStream> = match upstream {
        UpstreamStream::Plain(u) => Box::new(u),
        UpstreamStream::Other(u) => u,
    };
    upstream.write_all(to_upstream).await?;
    upstream.flush().await?;
    let mut client = EofIsEnd(client.as_mut());
    let (a, b) = match filter {
        Some(f) => relay_filtered(&mut client, upstream, f).await?,
        None => relay(&mut client, upstream).await?,
    };
    stats.bytes_up += a;
    stats.bytes_down += b;
    Ok(())
}

/// A TLS client that closes its connection without `close_notify` (many do, pg8000
/// among them) has ended its stream all the same: rustls reports it as
/// `UnexpectedEof`, taken here as the end of the stream. So is a reset: a client that
/// closes with our `close_notify` (or anything else) unread makes its kernel answer
/// with RST, which reads as `ConnectionReset` here, and our `close_notify` to a client
/// already gone fails the same way. (Truncation cannot hurt the upstream: a PostgreSQL
/// message cut short is an incomplete message to the server.)
struct EofIsEnd<'a, S: ?Sized>(&'a mut S);

impl<S: AsyncStream + ?Sized> tokio::io::AsyncRead for EofIsEnd<'_, S> {
    fn poll_read(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        match std::pin::Pin::new(&mut *self.get_mut().0).poll_read(cx, buf) {
            std::task::Poll::Ready(Err(e)) if ends_stream(&e) => std::task::Poll::Ready(Ok(())),
            other => other,
        }
    }
}

/// An error that only says the client has gone (see [`EofIsEnd`]).
fn ends_stream(e: &std::io::Error) -> bool {
    matches!(
        e.kind(),
        std::io::ErrorKind::UnexpectedEof
            | std::io::ErrorKind::ConnectionReset
            | std::io::ErrorKind::BrokenPipe
    )
}

impl<S: AsyncStream + ?Sized> tokio::io::AsyncWrite for EofIsEnd<'_, S> {
    fn poll_write(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        b: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        std::pin::Pin::new(&mut *self.get_mut().0).poll_write(cx, b)
    }

    fn poll_flush(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut *self.get_mut().0).poll_flush(cx)
    }

    fn poll_shutdown(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        match std::pin::Pin::new(&mut *self.get_mut().0).poll_shutdown(cx) {
            std::task::Poll::Ready(Err(e)) if ends_stream(&e) => std::task::Poll::Ready(Ok(())),
            other => other,
        }
    }
}

/// Copy both ways between two plain sockets until both sides are done; returns
/// (client->upstream, upstream->client).
///
/// An idle connection holds no buffer: a direction takes a buffer (from a small
/// per-thread pool) only when its socket is readable and gives it back as soon as the
/// socket would block, so thousands of idle brokered connections cost little more than
/// their sockets. A half-close on one
/// side is passed on as `shutdown(SHUT_WR)` on the other.
///
/// # Errors
/// The first I/O error on either side.
pub async fn relay_tcp<C: Ready, U: Ready>(
    client: &C,
    upstream: &U,
    filter: Option<&mut (dyn UploadFilter + 'static)>,
    live: Option<&LiveConn>,
) -> Result<(u64, u64), ConnError> {
    Ok(tokio::try_join!(
        pump(client, upstream, filter, live.map(|l| &l.up)),
        pump(upstream, client, None, live.map(|l| &l.down))
    )?)
}

/// [`relay_tcp`] for a session the daemon takes over midway with `first` (bytes it
/// already took from the client) still to be written upstream: they go first, while the
/// other direction already runs (the upstream may take them only once its own output
/// moves). Returns the bytes relayed from here on, `first` not included.
///
/// # Errors
/// The first I/O error on either side.
pub async fn relay_tcp_after<C: Ready, U: Ready>(
    client: &C,
    upstream: &U,
    first: &[u8],
    filter: Option<&mut (dyn UploadFilter + 'static)>,
) -> Result<(u64, u64), ConnError> {
    Ok(tokio::try_join!(
        async {
            write_all(upstream, first).await?;
            pump(client, upstream, filter, None).await
        },
        pump(upstream, client, None, None)
    )?)
}

/// One direction of [`relay_tcp`]; with a filter (client to upstream only), its replies
/// are written back to `from`. `live`: the connection's running count for `broker
/// status`, added to as bytes go (one relaxed atomic add per read).
async fn pump<F: Ready, T: Ready>(
    from: &F,
    to: &T,
    mut filter: Option<&mut (dyn UploadFilter + 'static)>,
    live: Option<&AtomicU64>,
) -> std::io::Result<u64> {
    let mut total = 0u64;
    loop {
        from.readable().await?;
        let mut buf = BufferPool::take();
        let res = drain(from, to, &mut buf, &mut total, filter.as_deref_mut(), live).await;
        BufferPool::give(buf);
        if res? {
            let _ = socket2::SockRef::from(to).shutdown(std::net::Shutdown::Write);
            return Ok(total);
        }
    }
}

/// Move everything readable now from `from` to `to`; `Ok(true)` at end of stream.
async fn drain<F: Ready, T: Ready>(
    from: &F,
    to: &T,
    buf: &mut Vec<u8>,
    total: &mut u64,
    mut filter: Option<&mut (dyn UploadFilter + 'static)>,
    live: Option<&AtomicU64>,
) -> std::io::Result<bool> {
    let count = |n: usize| {
        if let Some(l) = live {
            l.fetch_add(n as u64, Ordering::Relaxed);
        }
    };
    let (mut out, mut reply) = (Vec::new(), Vec::new());
    loop {
        buf.clear();
        match from.try_read_buf(buf) {
            Ok(0) => return Ok(true),
            Ok(n) => match filter.as_deref_mut() {
                None => {
                    write_all(to, &buf[..n]).await?;
                    *total += n as u64;
                    count(n);
                }
                Some(f) => {
                    out.clear();
                    reply.clear();
                    f.feed(&buf[..n], &mut out, &mut reply);
                    write_all(to, &out).await?;
                    *total += out.len() as u64;
                    count(out.len());
                    // The client waits for this reply: nothing else is being written
                    // to it.
                    write_all(from, &reply).await?;
                }
            },
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => return Ok(false),
            Err(e) => return Err(e),
        }
    }
}

/// Relay buffers, cached per worker thread so a busy connection does not allocate (and
/// the allocator does not trim and re-fault) a buffer per message, while an idle
/// connection holds none. At most [`POOL_MAX`] buffers are kept per thread.
struct BufferPool;

const POOL_MAX: usize = 16;

thread_local! {
    static POOL: std::cell::RefCell<Vec<Vec<u8>>> = const { std::cell::RefCell::new(Vec::new()) };
}

impl BufferPool {
    fn take() -> Vec<u8> {
        POOL.with(|p| p.borrow_mut().pop())
            .unwrap_or_else(|| Vec::with_capacity(RELAY_BUF))
    }

    fn give(buf: Vec<u8>) {
        POOL.with(|p| {
            let mut p = p.borrow_mut();
            if p.len() < POOL_MAX {
                p.push(buf);
            }
        });
    }
}

pub(crate) async fn write_all<T: Ready>(to: &T, mut data: &[u8]) -> std::io::Result<()> {
    while !data.is_empty() {
        match to.try_write(data) {
            Ok(n) => data = &data[n..],
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => to.writable().await?,
            Err(e) => return Err(e),
        }
    }
    Ok(())
}
