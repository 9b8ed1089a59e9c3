//! Moving bytes once a session is authenticated: the readiness-based relay between two
//! plain TCP sockets ([`relay_tcp`]), the generic relay for any other upstream stream
//! (TLS: [`relay`]), and the clean close of a client that is refused ([`close_gracefully`]).

use tokio::{io::AsyncWriteExt as _, net::TcpStream};

use crate::connector::ConnError;

/// Relay buffer size in each direction (plain TCP).
pub const RELAY_BUF: usize = 64 * 1024;

/// Close a client connection without a reset: send FIN, then read and discard what the
/// client already sent (bounded in bytes and time) before the socket is closed. Closing
/// with unread data would make the kernel answer with RST, which clients report as
/// "connection reset" instead of a clean end.
pub async fn close_gracefully(mut client: TcpStream) {
    use tokio::io::AsyncReadExt as _;
    let _ = client.shutdown().await;
    let mut buf = [0u8; 4096];
    let mut left = 256 * 1024usize;
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(2);
    while left > 0 {
        match tokio::time::timeout_at(deadline, client.read(&mut buf)).await {
            Ok(Ok(n)) if n > 0 => left = left.saturating_sub(n),
            _ => break,
        }
    }
}

/// Buffer size of the generic (TLS) relay, per direction.
pub const TLS_RELAY_BUF: usize = 16 * 1024;

/// Copy both ways between the client and any upstream stream (e.g. TLS) until both
/// sides are done; returns (client->upstream, upstream->client).
///
/// # Errors
/// The first I/O error on either side.
pub async fn relay<U>(client: &mut TcpStream, mut upstream: U) -> Result<(u64, u64), ConnError>
where
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

/// Copy both ways between two plain TCP sockets until both sides are done; returns
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
pub async fn relay_tcp(client: &TcpStream, upstream: &TcpStream) -> Result<(u64, u64), ConnError> {
    Ok(tokio::try_join!(
        pump(client, upstream),
        pump(upstream, client)
    )?)
}

/// [`relay_tcp`] for a session the daemon takes over midway with `first` (bytes it
/// already took from the client) still to be written upstream: they go first, while the
/// other direction already runs (the upstream may take them only once its own output
/// moves). Returns the bytes relayed from here on, `first` not included.
///
/// # Errors
/// The first I/O error on either side.
pub async fn relay_tcp_after(
    client: &TcpStream,
    upstream: &TcpStream,
    first: &[u8],
) -> Result<(u64, u64), ConnError> {
    Ok(tokio::try_join!(
        async {
            write_all(upstream, first).await?;
            pump(client, upstream).await
        },
        pump(upstream, client)
    )?)
}

async fn pump(from: &TcpStream, to: &TcpStream) -> std::io::Result<u64> {
    let mut total = 0u64;
    loop {
        from.readable().await?;
        let mut buf = BufferPool::take();
        let res = drain(from, to, &mut buf, &mut total).await;
        BufferPool::give(buf);
        if res? {
            let _ = socket2::SockRef::from(to).shutdown(std::net::Shutdown::Write);
            return Ok(total);
        }
    }
}

/// Move everything readable now from `from` to `to`; `Ok(true)` at end of stream.
async fn drain(
    from: &TcpStream,
    to: &TcpStream,
    buf: &mut Vec<u8>,
    total: &mut u64,
) -> std::io::Result<bool> {
    loop {
        buf.clear();
        match from.try_read_buf(buf) {
            Ok(0) => return Ok(true),
            Ok(n) => {
                write_all(to, &buf[..n]).await?;
                *total += n as u64;
            }
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

pub(crate) async fn write_all(to: &TcpStream, mut data: &[u8]) -> std::io::Result<()> {
    while !data.is_empty() {
        match to.try_write(data) {
            Ok(n) => data = &data[n..],
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => to.writable().await?,
            Err(e) => return Err(e),
        }
    }
    Ok(())
}
