//! `reuse: session`: authenticated upstream sessions kept for the next app connection.
//!
//! An app that opens a connection per request costs PostgreSQL a backend (a fork, its
//! catalog caches) and the broker an authentication each time. With `reuse: session` the
//! broker keeps the upstream session when the app's connection ends and hands it to the
//! next app connection of the same service with the same startup:
//!
//! * **Key.** The upstream address, the startup parameters the server received (the
//!   brokered user, the database, `options`, `client_encoding`, ...: everything but
//!   `application_name`, which is set per app) and the policy rule that admitted the
//!   caller. Reuse never crosses services (one pool per connector instance), users,
//!   databases, options or policy identities.
//! * **The byte phase** is relayed here, not spliced, with the protocol framed in both
//!   directions (headers only: message bodies pass through in the read buffers): the
//!   client's Terminate is not forwarded, every ReadyForQuery's transaction status is
//!   noted, ParameterStatus values are kept, and the queries in flight are counted (one
//!   ReadyForQuery per Query, Sync or FunctionCall).
//! * **Reset.** When the app leaves with nothing in flight and both streams at a message
//!   boundary: `ROLLBACK` if a transaction is open, then `DISCARD ALL` (closes cursors,
//!   `SET SESSION AUTHORIZATION DEFAULT` and `RESET ALL` (so `SET ROLE` and every `SET`
//!   go), `DEALLOCATE ALL`, `UNLISTEN *`, `pg_advisory_unlock_all()`, temporary tables,
//!   plans and sequences). Any error, or a status other than idle after it, and the
//!   session is closed, never kept. What `DISCARD ALL` does not undo stays for the next
//!   app: extensions' own session state (`dblink` connections, `pg_stat_statements`
//!   aside), and a session-level change made through `ALTER ROLE ... SET` is not
//!   session state at all (documented in docs/CONFIG.md).
//! * **Next app.** The idle session is checked by setting the app's `application_name`
//!   (a session the server closed fails here and is dropped); the app gets
//!   AuthenticationOk, every ParameterStatus as the session has them now, a
//!   BackendKeyData with the backend's pid and a secret key of its own (mapped to the
//!   backend's real key for CancelRequests, and forgotten when the app leaves: a
//!   previous app's key never cancels the next one's queries) and ReadyForQuery.
//! * **Bounds.** At most `reuseMax` idle sessions per key and [`MAX_KEYS`] keys; an idle
//!   session older than `reuseIdle` is closed when next seen.

use std::{
    collections::HashMap,
    sync::{Arc, Mutex, PoisonError},
    time::{Duration, Instant},
};

use bytes::BytesMut;
use tokio::io::{AsyncRead, AsyncReadExt as _, AsyncWrite, AsyncWriteExt as _};

use super::{
    cancel::{CancelGuard, CancelMap, CancelTarget},
    config::ReuseConfig,
    messages::{MAX_BACKEND_MESSAGE, backend_frame},
    startup::CancelKey,
    upstream::PgStream,
};
use crate::connector::{ConnError, dial::HostPort};

/// Startups with idle sessions, at most.
pub const MAX_KEYS: usize = 64;
/// How long a reset (or the check of an idle session) may take.
const RESET_TIMEOUT: Duration = Duration::from_secs(5);
/// The largest ParameterStatus or ReadyForQuery body the relay reads (others pass).
const MAX_NOTED: usize = 4096;

/// What sessions are kept under.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Key {
    pub to: String,
    pub params: Vec<(Vec<u8>, Vec<u8>)>,
    pub rule: Option<String>,
}

/// An authenticated upstream session between apps.
pub struct Idle {
    pub up: PgStream,
    pub to: HostPort,
    /// ParameterStatus values, in the server's order.
    pub params: Vec<(String, String)>,
    pub backend: CancelKey,
    since: Instant,
    /// Apps served so far.
    pub uses: u64,
    /// Reset queries sent whose answers are not read yet (see [`begin_reset`]).
    unread: u8,
}

impl Idle {
    #[must_use]
    pub fn new(
        up: PgStream,
        to: HostPort,
        params: Vec<(String, String)>,
        backend: CancelKey,
        uses: u64,
    ) -> Self {
        Self {
            up,
            to,
            params,
            backend,
            since: Instant::now(),
            uses,
            unread: 0,
        }
    }

    /// A session whose reset was sent ([`begin_reset`]: `unread` queries) but not
    /// read: whoever takes it reads the answers first ([`adopt`]).
    #[must_use]
    pub fn resetting(mut self, unread: u8) -> Self {
        self.unread = unread;
        self
    }
}

/// The idle sessions of one service.
#[derive(Default)]
pub struct Pool {
    inner: Mutex<HashMap<Key, Vec<Idle>>>,
}

impl std::fmt::Debug for Pool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pool").field("idle", &self.idle()).finish()
    }
}

impl Pool {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<Key, Vec<Idle>>> {
        self.inner.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Idle sessions now.
    #[must_use]
    pub fn idle(&self) -> usize {
        self.lock().values().map(Vec::len).sum()
    }

    /// The most recently kept session under `key` that is not too old.
    pub fn take(&self, key: &Key, cfg: &ReuseConfig) -> Option<Idle> {
        let mut map = self.lock();
        let list = map.get_mut(key)?;
        list.retain(|i| i.since.elapsed() < cfg.idle);
        let idle = list.pop();
        if list.is_empty() {
            map.remove(key);
        }
        idle
    }

    /// Keep `idle` under `key`, if there is room.
    pub fn put(&self, key: Key, mut idle: Idle, cfg: &ReuseConfig) {
        let mut map = self.lock();
        for list in map.values_mut() {
            list.retain(|i| i.since.elapsed() < cfg.idle);
        }
        map.retain(|_, l| !l.is_empty());
        if !map.contains_key(&key) && map.len() >= MAX_KEYS {
            return;
        }
        let list = map.entry(key).or_default();
        if list.len() < cfg.max_idle {
            idle.since = Instant::now();
            list.push(idle);
        }
    }
}

/// The messages a fresh session's handshake left for the client, read for what a later
/// app must be told: ParameterStatus values and BackendKeyData.
#[must_use]
pub fn read_startup_messages(to_client: &[u8]) -> (Vec<(String, String)>, Option<CancelKey>) {
    let mut params = Vec::new();
    let mut key = None;
    let mut rest = to_client;
    while let Ok(Some(n)) = backend_frame(rest, MAX_BACKEND_MESSAGE) {
        let (tag, body) = (rest[0], &rest[5..n]);
        match tag {
            b'S' => {
                if let Some(p) = parameter_status(body) {
                    set_param(&mut params, p);
                }
            }
            b'K' => key = CancelKey::from_backend_key_data(body),
            _ => {}
        }
        rest = &rest[n..];
    }
    (params, key)
}

fn parameter_status(body: &[u8]) -> Option<(String, String)> {
    let mut it = body.split(|b| *b == 0);
    let name = std::str::from_utf8(it.next()?).ok()?;
    let value = std::str::from_utf8(it.next()?).ok()?;
    Some((name.to_owned(), value.to_owned()))
}

fn set_param(params: &mut Vec<(String, String)>, (name, value): (String, String)) {
    match params.iter_mut().find(|(n, _)| *n == name) {
        Some(p) => p.1 = value,
        None => params.push((name, value)),
    }
}

fn message(tag: u8, body: &[u8]) -> Vec<u8> {
    let mut m = Vec::with_capacity(5 + body.len());
    m.push(tag);
    m.extend_from_slice(
        &u32::try_from(body.len() + 4)
            .unwrap_or(u32::MAX)
            .to_be_bytes(),
    );
    m.extend_from_slice(body);
    m
}

/// A simple Query message.
fn query(sql: &str) -> Vec<u8> {
    let mut body = sql.as_bytes().to_vec();
    body.push(0);
    message(b'Q', &body)
}

/// What a reused session tells the app: AuthenticationOk, its parameters, its key, idle.
/// Written into one buffer sized up front (an app connection per request pays for this
/// each time).
#[must_use]
pub fn greeting(params: &[(String, String)], key: &CancelKey) -> Vec<u8> {
    fn header(out: &mut Vec<u8>, tag: u8, body_len: usize) {
        out.push(tag);
        out.extend_from_slice(
            &u32::try_from(body_len + 4)
                .unwrap_or(u32::MAX)
                .to_be_bytes(),
        );
    }
    let size = 9
        + params
            .iter()
            .map(|(n, v)| 5 + n.len() + v.len() + 2)
            .sum::<usize>()
        + 5
        + 4
        + key.key.len()
        + 6;
    let mut out = Vec::with_capacity(size);
    header(&mut out, b'R', 4);
    out.extend_from_slice(&0u32.to_be_bytes());
    for (n, v) in params {
        header(&mut out, b'S', n.len() + v.len() + 2);
        out.extend_from_slice(n.as_bytes());
        out.push(0);
        out.extend_from_slice(v.as_bytes());
        out.push(0);
    }
    header(&mut out, b'K', 4 + key.key.len());
    out.extend_from_slice(&key.pid.to_be_bytes());
    out.extend_from_slice(&key.key);
    header(&mut out, b'Z', 1);
    out.push(b'I');
    debug_assert_eq!(out.len(), size);
    out
}

/// Replace the BackendKeyData in a fresh session's messages with `key`.
#[must_use]
pub fn with_key(to_client: &[u8], key: &CancelKey) -> Vec<u8> {
    let mut out = Vec::with_capacity(to_client.len());
    let mut rest = to_client;
    while let Ok(Some(n)) = backend_frame(rest, MAX_BACKEND_MESSAGE) {
        if rest[0] == b'K' {
            let mut k = key.pid.to_be_bytes().to_vec();
            k.extend_from_slice(&key.key);
            out.extend(message(b'K', &k));
        } else {
            out.extend_from_slice(&rest[..n]);
        }
        rest = &rest[n..];
    }
    out.extend_from_slice(rest);
    out
}

/// A key of the app's own for backend `real`: its pid, a random secret of the same
/// length.
#[must_use]
pub fn app_key(real: &CancelKey) -> CancelKey {
    let mut key = vec![0u8; real.key.len().max(4)];
    rand::fill(&mut key[..]);
    CancelKey { pid: real.pid, key }
}

/// Register `app` (sent to the app) as cancelling `real` on `to`.
pub fn register(
    map: &Arc<CancelMap>,
    app: &CancelKey,
    real: &CancelKey,
    to: &HostPort,
) -> Option<CancelGuard> {
    map.register(
        app.clone(),
        CancelTarget {
            to: to.clone(),
            upstream_key: Some(real.clone()),
        },
    )
}

/// Read server messages until ReadyForQuery: its status, the ParameterStatus values
/// seen, and whether an ErrorResponse came.
async fn until_ready(
    up: &mut PgStream,
    buf: &mut BytesMut,
    params: &mut Vec<(String, String)>,
) -> Result<(u8, bool), ConnError> {
    let mut failed = false;
    loop {
        while let Some(n) = backend_frame(buf, MAX_BACKEND_MESSAGE)? {
            let msg = buf.split_to(n);
            match msg[0] {
                b'Z' => return Ok((msg.get(5).copied().unwrap_or(b'?'), failed)),
                b'E' => failed = true,
                b'S' => {
                    if let Some(p) = parameter_status(&msg[5..]) {
                        set_param(params, p);
                    }
                }
                _ => {}
            }
        }
        if up.read_buf(buf).await? == 0 {
            return Err(ConnError::Protocol("server closed the session".into()));
        }
    }
}

/// Run `sql` on an idle session: whether it ended idle without an error.
async fn run(up: &mut PgStream, sql: &str, params: &mut Vec<(String, String)>) -> bool {
    send(up, &query(sql)).await && answered(up, 1, params).await
}

/// Write `bytes` to an idle session within [`RESET_TIMEOUT`]: whether it went.
async fn send(up: &mut PgStream, bytes: &[u8]) -> bool {
    let sent = async {
        up.write_all(bytes).await?;
        up.flush().await
    };
    matches!(tokio::time::timeout(RESET_TIMEOUT, sent).await, Ok(Ok(())))
}

/// Read the answers to `queries` simple queries sent on a session: whether each ended
/// without an error, the last left the session idle, and nothing followed it.
async fn answered(up: &mut PgStream, queries: u8, params: &mut Vec<(String, String)>) -> bool {
    let work = async {
        let mut buf = BytesMut::with_capacity(512);
        let mut ok = true;
        let mut status = b'?';
        for _ in 0..queries {
            let (s, failed) = until_ready(up, &mut buf, params).await?;
            ok &= !failed;
            status = s;
        }
        // Nothing may follow the ReadyForQuery of the last query we sent.
        Ok::<_, ConnError>(ok && status == b'I' && buf.is_empty())
    };
    matches!(
        tokio::time::timeout(RESET_TIMEOUT, work).await,
        Ok(Ok(true))
    )
}

/// Whether an idle session's socket is still quiet: an idle server sends nothing, so
/// bytes or an end of stream waiting mean it closed the session (an idle timeout, a
/// terminated backend). One non-blocking peek.
fn quiet(up: &PgStream) -> bool {
    let sock = match up {
        PgStream::Plain(s) => s,
        PgStream::Tls(t) => t.get_ref().0,
    };
    let mut byte = [0u8; 1];
    matches!(
        crate::sys::peek_now(sock, &mut byte),
        Err(e) if e.kind() == std::io::ErrorKind::WouldBlock
    )
}

/// Make an idle session the next app's: its `application_name` set to the app's (`""`
/// when it sent none) with a round trip when it differs, which also proves the session
/// alive; else a check that the server has not closed it. False when the session is
/// gone or refuses.
pub async fn adopt(idle: &mut Idle, application_name: &str) -> bool {
    idle.uses += 1;
    if idle.unread > 0 {
        // The reset's answers, which the previous app's task left unread: the session
        // is the next app's only if every reset query succeeded.
        let unread = std::mem::take(&mut idle.unread);
        if !answered(&mut idle.up, unread, &mut idle.params).await {
            return false;
        }
    }
    let current = idle
        .params
        .iter()
        .find(|(n, _)| n == "application_name")
        .map(|(_, v)| v.as_str());
    if current == Some(application_name) {
        return quiet(&idle.up);
    }
    let literal = application_name.replace('\'', "''");
    run(
        &mut idle.up,
        &format!("SET application_name = '{literal}'"),
        &mut idle.params,
    )
    .await
}

/// Start undoing what the app did: `ROLLBACK` when it left a transaction open (`status`
/// of its last ReadyForQuery not `I`), then `DISCARD ALL`, sent as two pipelined simple
/// queries (`DISCARD ALL` may not run inside a transaction block, which one query of two
/// statements would be). The answers are not awaited: the session goes back to the pool
/// at once, so an app that reconnects right away finds it instead of forking a new
/// backend, and whoever takes it reads them first ([`adopt`]). The number of queries
/// sent, or `None` when the session must be closed.
pub async fn begin_reset(up: &mut PgStream, status: u8) -> Option<u8> {
    let mut out = Vec::with_capacity(64);
    let mut n = 0;
    if status != b'I' {
        out.extend(query("ROLLBACK"));
        n += 1;
    }
    out.extend(query("DISCARD ALL"));
    n += 1;
    send(up, &out).await.then_some(n)
}

/// One direction's framing: where the current message ends.
#[derive(Debug, Default)]
struct Framer {
    /// Body bytes of the current message not seen yet.
    left: usize,
    /// A partial header, or the body of a message being noted.
    held: Vec<u8>,
    /// The tag and length of a message being noted (ParameterStatus, ReadyForQuery).
    noting: Option<(u8, usize)>,
}

/// What a chunk of one direction contained.
#[derive(Debug, Default, PartialEq, Eq)]
struct Seen {
    /// Messages that each get one ReadyForQuery (client: Query, Sync, FunctionCall).
    expecting: usize,
    /// ReadyForQuery statuses (server).
    ready: Vec<u8>,
    params: Vec<(String, String)>,
    /// Where a Terminate starts (client), if one does.
    terminate: Option<usize>,
}

impl Framer {
    /// Whether the stream is at a message boundary.
    fn at_boundary(&self) -> bool {
        self.left == 0 && self.held.is_empty() && self.noting.is_none()
    }

    /// Frame `data`; `server` says which direction. Errors on an impossible length.
    fn feed(&mut self, data: &[u8], server: bool, seen: &mut Seen) -> Result<(), ConnError> {
        let mut i = 0;
        while i < data.len() {
            if self.left > 0 {
                let n = self.left.min(data.len() - i);
                self.left -= n;
                i += n;
                continue;
            }
            if let Some((tag, len)) = self.noting {
                let n = (len - self.held.len()).min(data.len() - i);
                self.held.extend_from_slice(&data[i..i + n]);
                i += n;
                if self.held.len() == len {
                    match tag {
                        b'Z' => seen.ready.push(self.held.first().copied().unwrap_or(b'?')),
                        _ => {
                            if let Some(p) = parameter_status(&self.held) {
                                seen.params.push(p);
                            }
                        }
                    }
                    self.held.clear();
                    self.noting = None;
                }
                continue;
            }
            let start = i;
            let n = (5 - self.held.len()).min(data.len() - i);
            self.held.extend_from_slice(&data[i..i + n]);
            i += n;
            if self.held.len() < 5 {
                continue;
            }
            let tag = self.held[0];
            let len = u32::from_be_bytes([self.held[1], self.held[2], self.held[3], self.held[4]])
                as usize;
            self.held.clear();
            if len < 4 {
                return Err(ConnError::Protocol(format!(
                    "message `{}` with invalid length {len}",
                    char::from(tag).escape_default()
                )));
            }
            let body = len - 4;
            if server {
                if matches!(tag, b'Z' | b'S') && body <= MAX_NOTED {
                    if body > 0 {
                        self.noting = Some((tag, body));
                    }
                    continue;
                }
            } else {
                match tag {
                    b'X' if body == 0 => {
                        seen.terminate = Some(start);
                        return Ok(());
                    }
                    b'Q' | b'S' | b'F' => seen.expecting += 1,
                    _ => {}
                }
            }
            self.left = body;
        }
        Ok(())
    }
}

/// How the app's session ended.
#[derive(Debug, PartialEq, Eq)]
pub enum End {
    /// The app left (Terminate, or closed) with nothing in flight: the upstream may be
    /// reset and kept. Its last ReadyForQuery status.
    Reusable(u8),
    /// Anything else: close the upstream.
    Close(String),
}

/// Relay the session between `client` and `up` until the app leaves; `params` follows
/// the server's ParameterStatus. `moved` counts bytes (to the server, to the client).
pub async fn relay<C>(
    client: &mut C,
    up: &mut PgStream,
    params: &mut Vec<(String, String)>,
    moved: &mut (u64, u64),
) -> End
where
    C: AsyncRead + AsyncWrite + Unpin,
{
    let (mut cf, mut sf) = (Framer::default(), Framer::default());
    let mut in_flight: usize = 0;
    let mut status = b'I';
    // Filled by `read_buf`: never zeroed (a connection per request would pay for
    // zeroing 80 KiB each time), cleared after each chunk is passed on.
    let mut cbuf = BytesMut::with_capacity(16 * 1024);
    let mut sbuf = BytesMut::with_capacity(64 * 1024);
    loop {
        cbuf.clear();
        sbuf.clear();
        tokio::select! {
            r = client.read_buf(&mut cbuf) => {
                let n = match r {
                    Ok(0) | Err(_) => {
                        return if in_flight == 0 && cf.at_boundary() && sf.at_boundary() {
                            End::Reusable(status)
                        } else {
                            End::Close("the client left in the middle of a query".into())
                        };
                    }
                    Ok(n) => n,
                };
                let mut seen = Seen::default();
                if let Err(e) = cf.feed(&cbuf[..n], false, &mut seen) {
                    return End::Close(e.to_string());
                }
                in_flight += seen.expecting;
                let upto = seen.terminate.unwrap_or(n);
                if upto > 0 {
                    // Flushed: over TLS, written records may wait in the session.
                    if up.write_all(&cbuf[..upto]).await.is_err() || up.flush().await.is_err() {
                        return End::Close("the server closed the session".into());
                    }
                    moved.0 += upto as u64;
                }
                if seen.terminate.is_some() {
                    let _ = up.flush().await;
                    return if in_flight == 0 && sf.at_boundary() {
                        End::Reusable(status)
                    } else {
                        End::Close("the client left in the middle of a query".into())
                    };
                }
            }
            r = up.read_buf(&mut sbuf) => {
                let n = match r {
                    Ok(0) | Err(_) => return End::Close("the server closed the session".into()),
                    Ok(n) => n,
                };
                let mut seen = Seen::default();
                if let Err(e) = sf.feed(&sbuf[..n], true, &mut seen) {
                    return End::Close(e.to_string());
                }
                for p in seen.params {
                    set_param(params, p);
                }
                if let Some(s) = seen.ready.last() {
                    status = *s;
                }
                in_flight = in_flight.saturating_sub(seen.ready.len());
                if client.write_all(&sbuf[..n]).await.is_err() || client.flush().await.is_err() {
                    // The app is gone; what the server still sends is not its.
                    return End::Close("the client left while the server answered".into());
                }
                moved.1 += n as u64;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn msg(tag: u8, body: &[u8]) -> Vec<u8> {
        message(tag, body)
    }

    #[test]
    fn the_client_side_counts_queries_and_finds_terminate_across_chunks() {
        let mut data = msg(b'Q', b"select 1\0");
        data.extend(msg(b'P', b"\0select 2\0\0\0"));
        data.extend(msg(b'S', b""));
        let t = data.len();
        data.extend(msg(b'X', b""));
        let mut f = Framer::default();
        let mut seen = Seen::default();
        // One byte at a time: every split point.
        for (i, b) in data.iter().enumerate() {
            f.feed(std::slice::from_ref(b), false, &mut seen).unwrap();
            if seen.terminate.is_some() {
                assert_eq!(i, t + 4, "found once its header is whole");
                break;
            }
        }
        assert_eq!(seen.expecting, 2);
        assert!(seen.terminate.is_some());
        let mut f = Framer::default();
        let mut seen = Seen::default();
        f.feed(&data, false, &mut seen).unwrap();
        assert_eq!(seen.terminate, Some(t));
    }

    #[test]
    fn the_server_side_notes_ready_and_parameters() {
        let mut data = msg(b'T', &[0u8; 30]);
        data.extend(msg(b'D', &[7u8; 100]));
        data.extend(msg(b'S', b"TimeZone\0UTC\0"));
        data.extend(msg(b'Z', b"T"));
        for split in [1, 3, 7, 50, data.len()] {
            let mut f = Framer::default();
            let mut seen = Seen::default();
            for c in data.chunks(split) {
                f.feed(c, true, &mut seen).unwrap();
            }
            assert!(f.at_boundary());
            assert_eq!(seen.ready, vec![b'T']);
            assert_eq!(seen.params, vec![("TimeZone".into(), "UTC".into())]);
        }
        let mut f = Framer::default();
        assert!(
            f.feed(&[b'Z', 0, 0, 0, 2], true, &mut Seen::default())
                .is_err()
        );
    }

    #[test]
    fn greeting_and_key_replacement() {
        let real = CancelKey {
            pid: 42,
            key: vec![1, 2, 3, 4],
        };
        let app = app_key(&real);
        assert_eq!(app.pid, 42);
        assert_eq!(app.key.len(), 4);
        let params = vec![("server_version".to_owned(), "15.1".to_owned())];
        let g = greeting(&params, &app);
        let (p, k) = read_startup_messages(&g);
        assert_eq!(p, params);
        assert_eq!(k, Some(app.clone()));
        let mut fresh = msg(b'R', &[0, 0, 0, 0]);
        fresh.extend(msg(b'K', &[0, 0, 0, 42, 1, 2, 3, 4]));
        fresh.extend(msg(b'Z', b"I"));
        let (_, k) = read_startup_messages(&with_key(&fresh, &app));
        assert_eq!(k, Some(app));
    }
}
