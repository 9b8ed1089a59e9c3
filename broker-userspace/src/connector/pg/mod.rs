//! `connector: pg`: PostgreSQL with credentials the client never sees.
//!
//! The client's startup is read ([`startup`]), answering SSLRequest/GSSENCRequest with
//! `N` and routing CancelRequest ([`cancel`]). The broker then connects upstream
//! ([`upstream`]: host/port from the credentials or the original destination, libpq's
//! `sslmode`), sends the client's startup with `user` (and `database`) rewritten, and
//! authenticates itself ([`auth`], [`scram`]). The client sees AuthenticationOk and the
//! session's first messages, then bytes are relayed. When the server rejects the
//! credentials, they are fetched again bypassing the cache and the connection is tried
//! once more (rotation). Failures reach the client as an ErrorResponse with a real
//! SQLSTATE ([`errors`]).

pub mod auth;
pub mod cancel;
pub mod errors;
pub mod messages;
pub mod scram;
pub mod startup;
pub mod upstream;

#[cfg(test)]
mod live_tests;

use std::{sync::Arc, time::Duration};

use bytes::BytesMut;
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpStream,
};

use self::{
    auth::{AuthInput, AuthPolicy, HandshakeLimits, Outcome},
    cancel::{CancelMap, CancelTarget},
    errors::{Failure, sqlstate},
    scram::SaltedPasswordCache,
    startup::{CancelKey, FirstPacket, Startup, StartupError},
    upstream::{Destinations, PgStream, TlsConfigCache, UpstreamParams},
};
use crate::{
    broker::Broker,
    config::{PgConfig, Service},
    connector::{Conn, ConnError, Credentials, splice, tcp},
};

/// How long a client may take to send its startup packet. A client sends it right after
/// connecting (libpq within one round trip), so a socket that waits longer is idle or
/// hostile: it costs a task and a buffer until this expires. (PostgreSQL allows 60 s, but
/// that also covers the client's own password exchange, which the broker never asks for.)
pub const STARTUP_TIMEOUT: Duration = Duration::from_secs(10);
/// How long the whole upstream handshake may take: connecting, TLS, authenticating and
/// reading up to ReadyForQuery, the retry with fresh credentials included.
pub const UPSTREAM_AUTH_TIMEOUT: Duration = Duration::from_secs(30);

/// State shared between PostgreSQL connections: cancel keys of live sessions, SCRAM
/// salted passwords, built TLS client configurations. All bounded; `Debug` shows sizes
/// only.
#[derive(Debug, Default)]
pub struct PgShared {
    pub cancel: CancelMap,
    pub salted: SaltedPasswordCache,
    pub tls: TlsConfigCache,
}

/// Serve one client connection.
///
/// # Errors
/// When the session cannot be set up (the client has been sent an ErrorResponse when the
/// protocol allows it) or the relay fails.
pub async fn serve(
    broker: &Broker,
    conn: &mut Conn,
    cfg: &PgConfig,
    mut client: TcpStream,
) -> Result<(), ConnError> {
    let service = Arc::clone(&conn.service);
    let mut cbuf = BytesMut::with_capacity(1024);
    let first =
        match tokio::time::timeout(STARTUP_TIMEOUT, read_startup(&mut client, &mut cbuf)).await {
            Ok(r) => r,
            Err(_) => Err(Failure::told(ConnError::Protocol(format!(
                "client sent no startup packet within {STARTUP_TIMEOUT:?}"
            )))),
        };
    let result = match first {
        Ok(FirstPacket::Startup(s)) => {
            session(broker, conn, &service, cfg, &mut client, s, cbuf).await
        }
        Ok(FirstPacket::Cancel(key)) => return forward_cancel(broker, conn, &key).await,
        Ok(_) => Err(Failure::new(
            sqlstate::PROTOCOL_VIOLATION,
            ConnError::Protocol("repeated encryption request".into()),
        )),
        Err(f) => Err(f),
    };
    match result {
        Ok(()) => Ok(()),
        Err(f) => {
            if !f.client_told {
                let _ = client.write_all(&f.client_error(&service.name)).await;
                let _ = client.flush().await;
            }
            let _ = client.shutdown().await;
            Err(f.err)
        }
    }
}

/// Read packets until a StartupMessage or CancelRequest, answering `N` to encryption
/// requests (once each).
async fn read_startup(client: &mut TcpStream, buf: &mut BytesMut) -> Result<FirstPacket, Failure> {
    let mut negotiated = 0;
    loop {
        let len = loop {
            match startup::frame(buf) {
                Ok(Some(len)) => break len,
                Ok(None) => {}
                Err(StartupError::TlsHello) => {
                    // The client expects TLS: no ErrorResponse can reach it.
                    tracing::warn!("client opened with a TLS ClientHello");
                    return Err(Failure::told(ConnError::Protocol(
                        StartupError::TlsHello.to_string(),
                    )));
                }
                Err(e) => return Err(startup_error(e)),
            }
            buf.reserve(startup::MAX_STARTUP_LEN.min(4096));
            if client.read_buf(buf).await.map_err(ConnError::Io)? == 0 {
                return Err(Failure::told(ConnError::Protocol(
                    "client closed the connection before its startup packet".into(),
                )));
            }
        };
        let packet = buf.split_to(len);
        match startup::parse(&packet).map_err(startup_error)? {
            FirstPacket::SslRequest | FirstPacket::GssEncRequest if negotiated < 2 => {
                negotiated += 1;
                if !buf.is_empty() {
                    // Bytes after SSLRequest before our answer (CVE-2021-23214).
                    return Err(Failure::told(ConnError::Protocol(
                        "client sent data after an encryption request before the answer".into(),
                    )));
                }
                client.write_all(b"N").await.map_err(ConnError::Io)?;
            }
            other => return Ok(other),
        }
    }
}

fn startup_error(e: StartupError) -> Failure {
    let code = match e {
        StartupError::UnsupportedVersion(_) => sqlstate::FEATURE_NOT_SUPPORTED,
        _ => sqlstate::PROTOCOL_VIOLATION,
    };
    Failure::new(code, ConnError::Protocol(e.to_string()))
}

/// Forward a CancelRequest to the session's upstream on a fresh connection.
async fn forward_cancel(
    broker: &Broker,
    conn: &mut Conn,
    key: &CancelKey,
) -> Result<(), ConnError> {
    let Some(target) = broker.pg.cancel.lookup(key) else {
        tracing::info!(
            pid = key.pid,
            "CancelRequest for an unknown session: dropped"
        );
        return Err(ConnError::Protocol(format!(
            "CancelRequest for unknown backend pid {}: dropped",
            key.pid
        )));
    };
    let CancelTarget { host, port } = &target;
    conn.stats.upstream = Some(if host.contains(':') {
        format!("[{host}]:{port}")
    } else {
        format!("{host}:{port}")
    });
    let mut up = broker.dial(host, *port).await?;
    let packet = key.cancel_request();
    up.write_all(&packet).await?;
    up.flush().await?;
    // The server answers by closing; wait for that briefly so the cancel is processed
    // before the client (which waits for our close) moves on.
    let mut sink = [0u8; 64];
    let _ = tokio::time::timeout(Duration::from_secs(5), up.read(&mut sink)).await;
    conn.stats.bytes_up = packet.len() as u64;
    tracing::debug!(pid = key.pid, "CancelRequest forwarded");
    Ok(())
}

/// Everything after the client's StartupMessage.
async fn session(
    broker: &Broker,
    conn: &mut Conn,
    service: &Service,
    cfg: &PgConfig,
    client: &mut TcpStream,
    startup: Startup,
    client_rest: BytesMut,
) -> Result<(), Failure> {
    tracing::debug!(
        params = %startup.param_names(),
        version = startup.version,
        "client startup"
    );
    let mut creds = broker.credentials(service, false, &mut conn.stats).await?;
    let mut retried = false;
    let dests = Destinations::for_service(cfg, &service.intercept);
    // One deadline for the whole handshake, both attempts included.
    let deadline = tokio::time::Instant::now() + UPSTREAM_AUTH_TIMEOUT;
    let (up, up_rest, ready, params, startup_len) = loop {
        let params = UpstreamParams::from_credentials(&creds, conn.orig_dst, dests)?;
        conn.stats.upstream = Some(params.addr());
        let (mut client_rd, mut client_wr) = client.split();
        let attempt = tokio::select! {
            r = tokio::time::timeout_at(
                deadline,
                attempt(broker, cfg, &params, &creds, &startup, &mut client_wr),
            ) => r,
            () = client_gone(&mut client_rd) => {
                // Dropping the attempt stops its work (a SCRAM computation included).
                return Err(Failure::told(ConnError::Protocol(
                    "client closed the connection during the upstream handshake".into(),
                )));
            }
        }
        .map_err(|_| {
            Failure::new(
                sqlstate::CONNECTION_FAILURE,
                ConnError::Upstream {
                    addr: params.addr(),
                    source: std::io::Error::new(
                        std::io::ErrorKind::TimedOut,
                        format!("no session within {UPSTREAM_AUTH_TIMEOUT:?}"),
                    ),
                },
            )
        })??;
        match attempt {
            Attempt::Ready {
                stream,
                rest,
                ready,
                startup_len,
            } => break (stream, rest, ready, params, startup_len),
            Attempt::Rejected { error, forward } => {
                if !retried {
                    retried = true;
                    tracing::info!(
                        code = %error.code,
                        "upstream rejected the credentials; fetching them again (rotation)"
                    );
                    match broker.credentials(service, true, &mut conn.stats).await {
                        Ok(fresh) if !same_credentials(&fresh, &creds) => {
                            creds = fresh;
                            continue;
                        }
                        Ok(_) => tracing::info!("credentials unchanged; not retrying"),
                        Err(e) => tracing::warn!(error = %e, "refetching credentials failed"),
                    }
                }
                let _ = client.write_all(&forward).await;
                let _ = client.flush().await;
                return Err(Failure::told(ConnError::AuthRejected(error.to_string())));
            }
        }
    };

    // Remember the session for CancelRequests until it ends.
    let _cancel_guard = ready.backend_key.clone().and_then(|key| {
        let pid = key.pid;
        let g = broker.pg.cancel.register(
            key,
            CancelTarget {
                host: params.host.clone(),
                port: params.port,
            },
        );
        if g.is_none() {
            tracing::warn!(
                pid,
                "cancel map full: this session cannot be cancelled via the broker"
            );
        }
        g
    });

    // Splice in the kernel when the upstream is plain TCP and nothing is pending in
    // either direction: the client sends nothing between its StartupMessage and our
    // ReadyForQuery, so once the splice is in place before ReadyForQuery goes out,
    // every later client byte takes the kernel path, in order.
    let mut up = match (up, conn.splice.take()) {
        (PgStream::Plain(s), Some(ticket))
            if client_rest.is_empty() && up_rest.is_empty() && nothing_pending(client) =>
        {
            // Out of tokio's reactor first (see connector::splice).
            let s = s.into_std().map_err(|e| Failure::told(ConnError::Io(e)))?;
            // The app reads these through TCP, after the splice has started.
            let sent_after = (ready.to_client.len() + up_rest.len()) as u64;
            match ticket.splicer.start(ticket.app_cookie, sent_after, &s) {
                Ok(sp) => Upstream::Spliced(s, sp),
                Err(e) => {
                    tracing::warn!(error = %e, "kernel splice unavailable; relaying in userspace");
                    ticket.splicer.forget(ticket.app_cookie);
                    let s = TcpStream::from_std(s).map_err(|e| Failure::told(ConnError::Io(e)))?;
                    Upstream::Pg(PgStream::Plain(s))
                }
            }
        }
        (up, ticket) => {
            // Not spliced (TLS upstream, or bytes pending): the app's socket goes back
            // to plain TCP.
            if let Some(t) = ticket {
                t.splicer.forget(t.app_cookie);
            }
            Upstream::Pg(up)
        }
    };
    let spliced = matches!(up, Upstream::Spliced(..));
    client
        .write_all(&ready.to_client)
        .await
        .map_err(|e| Failure::told(ConnError::Io(e)))?;
    if !up_rest.is_empty() {
        client
            .write_all(&up_rest)
            .await
            .map_err(|e| Failure::told(ConnError::Io(e)))?;
    }
    client
        .flush()
        .await
        .map_err(|e| Failure::told(ConnError::Io(e)))?;
    if !client_rest.is_empty()
        && let Upstream::Pg(up) = &mut up
    {
        up.write_all(&client_rest)
            .await
            .map_err(|e| Failure::told(ConnError::Io(e)))?;
        up.flush()
            .await
            .map_err(|e| Failure::told(ConnError::Io(e)))?;
    }
    let pre_up = (startup_len + client_rest.len()) as u64;
    let pre_down = (ready.to_client.len() + up_rest.len()) as u64;
    conn.stats.bytes_up = pre_up;
    conn.stats.bytes_down = pre_down;
    conn.stats.spliced = spliced;
    tracing::debug!(
        upstream = %params.addr(),
        tls = matches!(&up, Upstream::Pg(s) if s.is_tls()),
        auth = ready.method,
        spliced,
        "session established; relaying"
    );
    // Plain upstreams use the readiness-based relay (no buffer held while idle).
    let relayed = match up {
        Upstream::Spliced(s, sp) => splice::run(client, s, &sp).await.map(|o| {
            conn.stats.splice_fallback = o.fallback;
            (o.up, o.down)
        }),
        Upstream::Pg(PgStream::Plain(s)) => tcp::relay_tcp(client, &s).await,
        Upstream::Pg(tls) => tcp::relay(client, tls).await,
    };
    let (a, b) = relayed.map_err(Failure::told)?;
    conn.stats.bytes_up = pre_up + a;
    conn.stats.bytes_down = pre_down + b;
    Ok(())
}

/// Resolves when the client hangs up while the upstream handshake runs. A PostgreSQL
/// client sends nothing between its StartupMessage and ReadyForQuery; if one sends bytes
/// anyway, they stay queued (forwarded later) and the watch ends without resolving.
async fn client_gone(client: &mut tokio::net::tcp::ReadHalf<'_>) {
    let mut byte = [0u8; 1];
    match client.peek(&mut byte).await {
        Ok(0) | Err(_) => {}
        Ok(_) => std::future::pending().await,
    }
}

/// Whether the client-side socket has no unread byte in the kernel (the client must be
/// silent until ReadyForQuery; anything it sent early would be overtaken by its spliced
/// bytes).
fn nothing_pending(client: &TcpStream) -> bool {
    use std::os::fd::AsRawFd as _;
    let mut n: libc::c_int = 0;
    // SAFETY: FIONREAD writes one int through a valid pointer; the fd is open.
    let rc = unsafe { libc::ioctl(client.as_raw_fd(), libc::FIONREAD, &raw mut n) };
    rc == 0 && n == 0
}

/// The upstream after authentication: still a [`PgStream`], or handed to the kernel
/// (the socket, out of tokio's reactor, and the guard of its splice map entries).
enum Upstream {
    Pg(PgStream),
    Spliced(std::net::TcpStream, crate::ebpf::Spliced),
}

fn same_credentials(a: &Credentials, b: &Credentials) -> bool {
    a.0 == b.0
}

enum Attempt {
    Ready {
        stream: PgStream,
        rest: BytesMut,
        ready: auth::Ready,
        startup_len: usize,
    },
    Rejected {
        error: errors::ServerError,
        forward: Vec<u8>,
    },
}

/// One upstream connection attempt with one set of credentials.
async fn attempt(
    broker: &Broker,
    cfg: &PgConfig,
    params: &UpstreamParams,
    creds: &Credentials,
    startup: &Startup,
    client: &mut (impl tokio::io::AsyncWrite + Unpin),
) -> Result<Attempt, Failure> {
    let username = creds.text("username")?;
    let rewritten = startup.rewritten(username, params.database.as_deref());
    let user = match rewritten.get("user") {
        Some(u) => String::from_utf8_lossy(u).into_owned(),
        None => {
            return Err(Failure::new(
                sqlstate::REJECTED_ESTABLISHMENT,
                ConnError::Config(
                    "no user name: set credential `username` (the client sent none)".into(),
                ),
            ));
        }
    };
    let wire = rewritten.encode();
    let mut stream = upstream::connect(broker, &broker.pg.tls, params).await?;
    let input = AuthInput {
        user: &user,
        password: creds.get("password"),
        tls: stream.is_tls(),
        channel_binding: stream.channel_binding(),
        policy: AuthPolicy {
            require_auth: params.require_auth.or(cfg.require_auth),
            verified_tls: stream.is_tls() && params.verifies_server(),
            scram_max_iterations: cfg.scram_max_iterations,
            limits: HandshakeLimits::DEFAULT,
        },
    };
    let mut rest = BytesMut::with_capacity(8 * 1024);
    let outcome = auth::authenticate(
        &mut stream,
        &mut rest,
        &wire,
        &input,
        &broker.pg.salted,
        client,
    )
    .await
    .map_err(|mut f| {
        // Name the upstream in I/O errors during the exchange.
        if let ConnError::Io(e) = f.err {
            f.err = ConnError::Upstream {
                addr: params.addr(),
                source: e,
            };
        }
        f
    })?;
    Ok(match outcome {
        Outcome::Ready(ready) => Attempt::Ready {
            stream,
            rest,
            ready,
            startup_len: wire.len(),
        },
        Outcome::Rejected { error, forward } => {
            let _ = stream.shutdown().await;
            Attempt::Rejected { error, forward }
        }
    })
}

#[cfg(test)]
mod tests {
    use tokio::net::TcpListener;

    use super::*;

    /// A connected (broker side, client side) socket pair.
    async fn pair() -> (TcpStream, TcpStream) {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let c = TcpStream::connect(l.local_addr().unwrap()).await.unwrap();
        let (s, _) = l.accept().await.unwrap();
        (s, c)
    }

    fn startup_bytes() -> Vec<u8> {
        Startup {
            version: messages::PROTOCOL_3_0,
            params: vec![(b"user".to_vec(), b"someone".to_vec())],
        }
        .encode()
    }

    #[tokio::test]
    async fn answers_n_to_ssl_and_gssenc_then_reads_startup() {
        let (mut broker_side, mut client) = pair().await;
        let task = tokio::spawn(async move {
            let mut buf = BytesMut::new();
            read_startup(&mut broker_side, &mut buf)
                .await
                .map(|p| (p, buf.len()))
        });
        let mut answer = [0u8; 1];
        client
            .write_all(&[0, 0, 0, 8, 4, 210, 22, 48])
            .await
            .unwrap();
        client.read_exact(&mut answer).await.unwrap();
        assert_eq!(&answer, b"N");
        client.write_all(&messages::ssl_request()).await.unwrap();
        client.read_exact(&mut answer).await.unwrap();
        assert_eq!(&answer, b"N");
        // The startup arrives in two pieces.
        let s = startup_bytes();
        client.write_all(&s[..5]).await.unwrap();
        tokio::time::sleep(Duration::from_millis(20)).await;
        client.write_all(&s[5..]).await.unwrap();
        let (packet, rest) = task.await.unwrap().unwrap();
        let FirstPacket::Startup(st) = packet else {
            panic!("not a startup")
        };
        assert_eq!(st.get("user"), Some(&b"someone"[..]));
        assert_eq!(rest, 0);
    }

    #[tokio::test]
    async fn refuses_tls_hello_oversized_and_early_close() {
        for (bytes, told, code) in [
            (vec![0x16, 3, 1, 0, 100], true, ""),
            (vec![0, 1, 0, 0, 0, 3, 0, 0], false, "08P01"),
            (vec![0, 0, 0, 12, 0, 2, 0, 0, 0, 0, 0, 0], false, "0A000"),
            (vec![0, 0], true, ""),
        ] {
            let (mut broker_side, mut client) = pair().await;
            client.write_all(&bytes).await.unwrap();
            client.shutdown().await.unwrap();
            let mut buf = BytesMut::new();
            let f = read_startup(&mut broker_side, &mut buf).await.unwrap_err();
            assert_eq!(f.client_told, told, "{bytes:?}");
            if !told {
                assert_eq!(f.sqlstate, code, "{bytes:?}");
            }
        }
    }
}
