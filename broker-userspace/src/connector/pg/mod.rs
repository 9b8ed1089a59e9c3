//! `connector: pg`: PostgreSQL with credentials the client never sees.
//!
//! The client's startup is read ([`startup`]), answering SSLRequest/GSSENCRequest with
//! `N` and routing CancelRequest ([`cancel`]). The broker then connects upstream
//! ([`upstream`]: host/port from the credentials or the original destination, libpq's
//! `sslmode`), sends the client's startup with `user` (and `database`) rewritten, and
//! authenticates itself ([`auth`], [`scram`]). The client is then owed AuthenticationOk
//! and the session's first messages, which the core delivers before it relays or splices
//! the session (a PostgreSQL client sends nothing until ReadyForQuery). When the server rejects the
//! credentials, they are fetched again bypassing the cache and the connection is tried
//! once more (rotation). Failures reach the client as an ErrorResponse with a real
//! SQLSTATE ([`errors`]).

pub mod auth;
pub mod cancel;
pub mod client;
pub mod client_auth;
pub mod config;
pub mod deny;
pub mod errors;
pub mod messages;
pub mod reuse;
pub mod scram;
pub mod scram_server;
pub mod startup;
pub mod upstream;

#[cfg(test)]
mod live_tests;

use std::{sync::Arc, time::Duration};

use bytes::BytesMut;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use self::{
    auth::{AuthInput, AuthPolicy, HandshakeLimits, Outcome},
    cancel::{CancelMap, CancelTarget},
    client::{ClientIo, ClientTls},
    config::PgConfig,
    errors::{Failure, sqlstate},
    scram::SaltedPasswordCache,
    startup::{CancelKey, FirstPacket, Startup},
    upstream::{PgStream, TlsConfigCache, UpstreamParams},
};
use crate::{
    config::Service,
    connector::{
        AppSocket, BoxFuture, Conn, ConnError, Connector, Credentials, Denial, Env, Handoff, Kind,
        Requester, Session, UpstreamStream, settings,
        target::{AppDestination, Destinations},
    },
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
    pub cancel: Arc<CancelMap>,
    pub salted: SaltedPasswordCache,
    pub tls: TlsConfigCache,
    /// Idle sessions (`reuse: session`).
    pub pool: reuse::Pool,
}

/// The `pg` kind (aliases `postgres`, `postgresql`).
pub const KIND: Kind = Kind {
    syntax: config::SYNTAX,
    build: |service| {
        Ok(Arc::new(PgConnector::new(
            settings::<PgConfig>(service)?.clone(),
        )))
    },
};

/// A `pg` service: its configuration and the state its connections share.
#[derive(Debug)]
pub struct PgConnector {
    cfg: PgConfig,
    pub shared: PgShared,
    /// The SCRAM verifier of `clientPassword` (`clientAuth: scram-sha-256`), derived
    /// once.
    client_keys: Option<scram_server::ScramKeys>,
}

impl PgConnector {
    #[must_use]
    pub fn new(cfg: PgConfig) -> Self {
        let client_keys = cfg
            .client_password
            .as_ref()
            .map(|p| scram_server::ScramKeys::generate(p.expose()));
        Self {
            cfg,
            shared: PgShared::default(),
            client_keys,
        }
    }
}

impl Connector for PgConnector {
    fn serve<'a>(
        &'a self,
        env: &'a Env,
        conn: &'a mut Conn,
        client: AppSocket,
    ) -> BoxFuture<'a, Result<Handoff, ConnError>> {
        Box::pin(serve(self, env, conn, client))
    }

    /// The startup read (encryption requests answered `N`), then FATAL `28000` naming
    /// the rule ([`deny`]).
    fn deny<'a>(&'a self, client: AppSocket, denial: &'a Denial) -> BoxFuture<'a, ()> {
        Box::pin(deny::deny(client, denial))
    }

    /// Not with `reuse: session`: the broker frames those sessions itself.
    fn splices(&self) -> bool {
        self.cfg.reuse.is_none()
    }

    fn uses_ca(&self) -> bool {
        self.cfg.client_tls
    }

    /// PostgreSQL's own "too many connections" (53300), which a server may send before
    /// it has read the client's startup packet; libpq shows it as the connection error.
    fn refusal(&self, service: &str, reason: &str) -> Option<Vec<u8>> {
        Some(
            Failure::new(
                sqlstate::TOO_MANY_CONNECTIONS,
                ConnError::Protocol(reason.to_owned()),
            )
            .client_error(service),
        )
    }
}

/// Serve one client connection up to the authenticated session.
///
/// # Errors
/// When the session cannot be set up (the client has been sent an ErrorResponse when the
/// protocol allows it).
async fn serve(
    pg: &PgConnector,
    env: &Env,
    conn: &mut Conn,
    client: AppSocket,
) -> Result<Handoff, ConnError> {
    let service = Arc::clone(&conn.service);
    let mut cbuf = BytesMut::with_capacity(1024);
    let tls = match (&env.ca, pg.cfg.client_tls) {
        (Some(ca), true) => Some(ClientTls {
            ca,
            name: conn
                .orig_host
                .clone()
                .or_else(|| conn.orig_dst.map(|d| d.ip().to_canonical().to_string())),
        }),
        _ => None,
    };
    let (client, first) = match tokio::time::timeout(
        STARTUP_TIMEOUT,
        client::read_startup(client, &mut cbuf, tls.as_ref()),
    )
    .await
    {
        Ok(r) => r,
        // The client (and its socket) went with the timed-out read.
        Err(_) => {
            return Err(ConnError::Protocol(format!(
                "client sent no startup packet within {STARTUP_TIMEOUT:?}"
            )));
        }
    };
    let Some(mut client) = client else {
        // A failed TLS handshake: nothing can be told.
        return Err(first.err().map_or_else(
            || ConnError::Protocol("client TLS failed".into()),
            |f| f.err,
        ));
    };
    let result = match first {
        Ok(FirstPacket::Startup(s)) => {
            let client_authed = match &pg.client_keys {
                Some(keys) => {
                    let user =
                        String::from_utf8_lossy(s.get("user").unwrap_or_default()).into_owned();
                    client_auth::scram(&mut client, &cbuf, keys, &user).await
                }
                None => Ok(()),
            };
            match (client_authed, pg.cfg.reuse) {
                (Ok(()), Some(cfg)) => {
                    return reused(pg, env, conn, &service, client, s, cbuf, cfg).await;
                }
                (Ok(()), None) => session(pg, env, conn, &service, &mut client, s, cbuf).await,
                (Err(f), _) => Err(f),
            }
        }
        Ok(FirstPacket::Cancel(key)) => {
            conn.stats.request = Some("cancel");
            return forward_cancel(pg, env, conn, &key)
                .await
                .map(|()| Handoff::Done);
        }
        Ok(_) => Err(Failure::new(
            sqlstate::PROTOCOL_VIOLATION,
            ConnError::Protocol("repeated encryption request".into()),
        )),
        Err(f) => Err(f),
    };
    match result {
        Ok(s) => Ok(Handoff::Relay(Session {
            client: client.into_session_client(),
            upstream: match s.upstream {
                PgStream::Plain(s) => UpstreamStream::Plain(s),
                tls => UpstreamStream::Other(Box::new(tls)),
            },
            to_client: s.to_client,
            to_upstream: s.to_upstream,
            // A PostgreSQL client sends nothing between its StartupMessage and
            // ReadyForQuery, which is the last of `to_client`.
            client_waits: true,
            keep: s.keep.map(|g| Box::new(g) as Box<dyn std::any::Any + Send>),
            upload_filter: None,
        })),
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

/// An upstream session for an app, from the pool or fresh.
struct ForApp {
    up: PgStream,
    to: crate::connector::dial::HostPort,
    params: Vec<(String, String)>,
    /// The backend's own key (`None`: the server sent none; the session is not kept).
    backend: Option<startup::CancelKey>,
    uses: u64,
    to_client: Vec<u8>,
    to_upstream: Vec<u8>,
    reused: bool,
}

/// `reuse: session` (see [`reuse`]): serve the whole session, then keep the upstream.
#[allow(clippy::too_many_arguments)]
async fn reused(
    pg: &PgConnector,
    env: &Env,
    conn: &mut Conn,
    service: &Service,
    mut client: ClientIo,
    startup: Startup,
    cbuf: BytesMut,
    cfg: config::ReuseConfig,
) -> Result<Handoff, ConnError> {
    let got = async {
        // The key: what a fresh session would send upstream.
        let creds = env
            .credentials(
                Requester::new(service, conn.caller.as_ref()),
                false,
                &mut conn.stats,
            )
            .await?;
        let params = UpstreamParams::from_credentials(
            &creds,
            AppDestination {
                addr: conn.orig_dst,
                host: conn.orig_host.as_deref(),
            },
            Destinations::for_service(&pg.cfg.upstream_allow, &service.intercept),
        )?;
        let username = creds.text("username").map_err(ConnError::from)?;
        let mut rewritten = startup.rewritten(username, params.database.as_deref());
        startup::add_credential_params(&mut rewritten, &creds)?;
        let app_name = rewritten
            .get("application_name")
            .map(|v| String::from_utf8_lossy(v).into_owned())
            .unwrap_or_default();
        let to = params.to.to_string();
        let key = reuse::Key {
            to: to.clone(),
            params: rewritten
                .params
                .iter()
                .filter(|(k, _)| k.as_slice() != b"application_name")
                .cloned()
                .collect(),
            rule: conn.admitted_by.clone(),
        };
        conn.stats.upstream = Some(to);
        while let Some(mut idle) = pg.shared.pool.take(&key, &cfg) {
            if reuse::adopt(&mut idle, &app_name).await {
                return Ok::<_, Failure>((
                    key,
                    ForApp {
                        // Made below, with the app's key.
                        to_client: Vec::new(),
                        up: idle.up,
                        to: idle.to,
                        params: idle.params,
                        backend: Some(idle.backend),
                        uses: idle.uses,
                        to_upstream: cbuf.to_vec(),
                        reused: true,
                    },
                ));
            }
            tracing::debug!("an idle session failed its check: closed");
        }
        let est = session(pg, env, conn, service, &mut client, startup, cbuf).await?;
        let (server_params, backend) = reuse::read_startup_messages(&est.to_client);
        // The app gets a key of its own (below), not the server's.
        drop(est.keep);
        Ok((
            key,
            ForApp {
                up: est.upstream,
                to: params.to,
                params: server_params,
                backend,
                uses: 1,
                to_client: est.to_client,
                to_upstream: est.to_upstream,
                reused: false,
            },
        ))
    }
    .await;
    let (key, mut s) = match got {
        Ok(g) => g,
        Err(f) => {
            if !f.client_told {
                let _ = client.write_all(&f.client_error(&service.name)).await;
                let _ = client.flush().await;
            }
            let _ = client.shutdown().await;
            return Err(f.err);
        }
    };
    // A key of the app's own, mapped to the backend's for CancelRequests while it is
    // connected.
    let app_key = s.backend.as_ref().map(reuse::app_key);
    let _cancel = match (&app_key, &s.backend) {
        (Some(app), Some(real)) => reuse::register(&pg.shared.cancel, app, real, &s.to),
        _ => None,
    };
    let to_client = match (&app_key, s.reused) {
        (Some(app), true) => reuse::greeting(&s.params, app),
        (Some(app), false) => reuse::with_key(&s.to_client, app),
        (None, _) => std::mem::take(&mut s.to_client),
    };
    tracing::debug!(reused = s.reused, uses = s.uses, "session for the app");
    client.write_all(&to_client).await?;
    client.flush().await?;
    if !s.to_upstream.is_empty() {
        s.up.write_all(&s.to_upstream).await?;
    }
    let mut moved = (0u64, 0u64);
    let end = reuse::relay(&mut client, &mut s.up, &mut s.params, &mut moved).await;
    conn.stats.bytes_up += moved.0;
    conn.stats.bytes_down += moved.1 + to_client.len() as u64;
    let _ = client.shutdown().await;
    drop(client);
    match (end, s.backend) {
        (reuse::End::Reusable(status), Some(backend)) => {
            if let Some(unread) = reuse::begin_reset(&mut s.up, status).await {
                pg.shared.pool.put(
                    key,
                    reuse::Idle::new(s.up, s.to, s.params, backend, s.uses).resetting(unread),
                    &cfg,
                );
            } else {
                tracing::debug!("the session could not be reset: closed");
            }
        }
        (reuse::End::Close(why), _) => tracing::debug!(%why, "session not kept"),
        (_, None) => {}
    }
    Ok(Handoff::Done)
}

/// Forward a CancelRequest to the session's upstream on a fresh connection.
async fn forward_cancel(
    pg: &PgConnector,
    env: &Env,
    conn: &mut Conn,
    key: &CancelKey,
) -> Result<(), ConnError> {
    let Some(target) = pg.shared.cancel.lookup(key) else {
        tracing::info!(
            pid = key.pid,
            "CancelRequest for an unknown session: dropped"
        );
        return Err(ConnError::Protocol(format!(
            "CancelRequest for unknown backend pid {}: dropped",
            key.pid
        )));
    };
    let to = target.to;
    conn.stats.upstream = Some(to.to_string());
    let mut up = env.dialer.dial(&to).await?;
    let packet = target.upstream_key.as_ref().unwrap_or(key).cancel_request();
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

/// An authenticated upstream and what each side is still owed.
struct Established {
    upstream: PgStream,
    to_client: Vec<u8>,
    to_upstream: Vec<u8>,
    keep: Option<cancel::CancelGuard>,
}

/// Everything after the client's StartupMessage, up to the authenticated session.
async fn session(
    pg: &PgConnector,
    env: &Env,
    conn: &mut Conn,
    service: &Service,
    client: &mut ClientIo,
    startup: Startup,
    client_rest: BytesMut,
) -> Result<Established, Failure> {
    let cfg = &pg.cfg;
    tracing::debug!(
        params = %startup.param_names(),
        version = startup.version,
        "client startup"
    );
    let mut creds = env
        .credentials(
            Requester::new(service, conn.caller.as_ref()),
            false,
            &mut conn.stats,
        )
        .await?;
    let mut retried = false;
    let dests = Destinations::for_service(&cfg.upstream_allow, &service.intercept);
    // One deadline for the whole handshake, both attempts included.
    let deadline = tokio::time::Instant::now() + UPSTREAM_AUTH_TIMEOUT;
    let (up, up_rest, ready, params, startup_len) = loop {
        let params = UpstreamParams::from_credentials(
            &creds,
            AppDestination {
                addr: conn.orig_dst,
                host: conn.orig_host.as_deref(),
            },
            dests,
        )?;
        conn.stats.upstream = Some(params.to.to_string());
        // What the attempt has for the client (a server error), written after it.
        let mut for_client = Vec::new();
        let attempt = tokio::select! {
            r = tokio::time::timeout_at(
                deadline,
                attempt(pg, env, &params, &creds, &startup, &mut for_client),
            ) => r,
            () = client_gone(client.socket()) => {
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
                    addr: params.to.to_string(),
                    source: std::io::Error::new(
                        std::io::ErrorKind::TimedOut,
                        format!("no session within {UPSTREAM_AUTH_TIMEOUT:?}"),
                    ),
                },
            )
        })?;
        if !for_client.is_empty() {
            let _ = client.write_all(&for_client).await;
            let _ = client.flush().await;
        }
        match attempt? {
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
                    match env
                        .credentials(
                            Requester::new(service, conn.caller.as_ref()),
                            true,
                            &mut conn.stats,
                        )
                        .await
                    {
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
    let keep = ready.backend_key.clone().and_then(|key| {
        let pid = key.pid;
        let g = pg.shared.cancel.register(
            key,
            CancelTarget {
                to: params.to.clone(),
                upstream_key: None,
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
    // The startup went upstream; the client is owed the server's messages up to
    // ReadyForQuery (and whatever the server sent after it); the server is owed what the
    // client sent early.
    conn.stats.bytes_up = startup_len as u64;
    let mut to_client = ready.to_client;
    to_client.extend_from_slice(&up_rest);
    tracing::debug!(
        upstream = %params.to.to_string(),
        tls = up.is_tls(),
        auth = ready.method,
        "session established"
    );
    Ok(Established {
        upstream: up,
        to_client,
        to_upstream: client_rest.to_vec(),
        keep,
    })
}

/// Resolves when the client hangs up while the upstream handshake runs. A PostgreSQL
/// client sends nothing between its StartupMessage and ReadyForQuery; if one sends bytes
/// anyway, they stay queued (forwarded later) and the watch ends without resolving.
async fn client_gone(client: &AppSocket) {
    let mut byte = [0u8; 1];
    match client.peek(&mut byte).await {
        Ok(0) | Err(_) => {}
        Ok(_) => std::future::pending().await,
    }
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
    pg: &PgConnector,
    env: &Env,
    params: &UpstreamParams,
    creds: &Credentials,
    startup: &Startup,
    client: &mut (impl tokio::io::AsyncWrite + Unpin),
) -> Result<Attempt, Failure> {
    let username = creds.text("username").map_err(ConnError::from)?;
    let mut rewritten = startup.rewritten(username, params.database.as_deref());
    startup::add_credential_params(&mut rewritten, creds)?;
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
    let cfg = &pg.cfg;
    let mut stream = upstream::connect(&env.dialer, &pg.shared.tls, params).await?;
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
        &pg.shared.salted,
        client,
    )
    .await
    .map_err(|mut f| {
        // Name the upstream in I/O errors during the exchange.
        if let ConnError::Io(e) = f.err {
            f.err = ConnError::Upstream {
                addr: params.to.to_string(),
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
    use tokio::net::{TcpListener, TcpStream};

    use super::*;

    /// A connected (broker side, client side) socket pair.
    async fn pair() -> (AppSocket, TcpStream) {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let c = TcpStream::connect(l.local_addr().unwrap()).await.unwrap();
        let (s, _) = l.accept().await.unwrap();
        (s.into(), c)
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
        let (broker_side, mut client) = pair().await;
        let task = tokio::spawn(async move {
            let mut buf = BytesMut::new();
            client::read_startup(broker_side, &mut buf, None)
                .await
                .1
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
            let (broker_side, mut client) = pair().await;
            client.write_all(&bytes).await.unwrap();
            client.shutdown().await.unwrap();
            let mut buf = BytesMut::new();
            let f = client::read_startup(broker_side, &mut buf, None)
                .await
                .1
                .unwrap_err();
            assert_eq!(f.client_told, told, "{bytes:?}");
            if !told {
                assert_eq!(f.sqlstate, code, "{bytes:?}");
            }
        }
    }
}
