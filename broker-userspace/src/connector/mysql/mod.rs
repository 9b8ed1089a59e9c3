//! `connector: mysql` (aliases `mariadb`, `tidb`): MySQL, MariaDB and TiDB with a
//! password the client never holds.
//!
//! The server speaks first, so the broker connects upstream before anything else
//! ([`upstream`]: host/port from the credentials or the original destination) and reads
//! its greeting. The client then gets a greeting of the broker's ([`proto`]): the
//! server's version string (MariaDB's `5.5.5-` prefix, TiDB's `-TiDB-v...` kept) and
//! connection id (so `KILL QUERY <id>` from another connection reaches the session), a
//! fresh scramble, the server's capability flags without compression (TLS per
//! `config.clientTLS`) and the `mysql_native_password` plugin. Whatever the client
//! answers with (any plugin, any password: the kernel identified the caller), its
//! HandshakeResponse41 is rewritten for the server: the brokered `username`, the
//! `database` credential if set (else the client's), the client's charset, max packet
//! size, connect attributes and session-shaping capability flags (both legs must format
//! the session's packets alike). The broker authenticates ([`auth`]: native,
//! caching_sha2 fast and full, sha256, ed25519, cleartext over TLS only; one
//! AuthSwitchRequest), then hands the client the server's OK packet renumbered for the
//! client's leg (the legs' sequence ids differ when one of them did TLS), and the core
//! relays the session, or splices it in the kernel when both legs are plain TCP (a
//! MySQL client sends nothing until that OK).
//!
//! When the server rejects the credentials (1045, 1698), they are fetched again bypassing
//! the cache and the login is tried once more on a new connection (rotation). Every
//! failure reaches the client as an ERR packet naming the service ([`errors`]): 1045
//! access denied, 1429 upstream unreachable or TLS failed, 1040 over a broker cap; the
//! server's own errors keep its code. A connection the policy refused
//! ([`Connector::deny`]) never reaches the upstream: its client gets ERR 1045 `28000`
//! naming the rule in answer to its handshake response ([`deny`]).
//!
//! Limits:
//! * `COM_CHANGE_USER` after the login goes to the server as the app sent it, in the
//!   byte phase the core relays or splices: the app's placeholder credentials fail there
//!   with the server's own 1045 (connection pools that reset sessions this way must use
//!   `COM_RESET_CONNECTION` instead, which works).
//! * After a rotation retry, the session's connection id is the second connection's; the
//!   client was greeted with the first one's (`CONNECTION_ID()` tells the truth, `KILL
//!   QUERY` with the greeted id does not reach the session).
//! * No compression (`CLIENT_COMPRESS`, zstd) is offered on either leg.
//! * `mysql_old_password`, multi-factor authentication and plugins other than the ones
//!   above (PAM/dialog, GSSAPI, LDAP SASL, parsec) are refused with 1251.

pub mod auth;
pub mod client;
pub mod config;
pub mod deny;
pub mod errors;
pub mod guard;
pub mod proto;
pub mod upstream;

#[cfg(test)]
mod live_tests;
#[cfg(test)]
mod tests;

use std::{sync::Arc, time::Duration};

use mysql_common::constants::CapabilityFlags as Caps;
use tokio::io::AsyncWriteExt as _;

pub use self::config::MysqlConfig;
use self::{
    auth::{ServerAuth, Transport},
    client::{ClientIo, ClientTls},
    config::ClientTls as ClientTlsMode,
    errors::{Failure, code},
    proto::{ClientResponse, Login},
    upstream::{MyStream, Opened, Outcome, UpstreamParams},
};
use crate::{
    config::Service,
    connector::{
        AppSocket, BoxFuture, Conn, ConnError, Connector, Credentials, Denial, Env, Handoff, Kind,
        Requester, Session, UpstreamStream, close_gracefully,
        db_tls::TlsConfigCache,
        settings,
        target::{AppDestination, Destinations},
    },
};

/// How long a client may take to answer the broker's greeting (TLS included). A MySQL
/// client answers within one round trip.
pub const CLIENT_TIMEOUT: Duration = Duration::from_secs(10);

/// The `mysql` kind (aliases `mariadb`, `tidb`).
pub const KIND: Kind = Kind {
    syntax: config::SYNTAX,
    build: |service| {
        Ok(Arc::new(MysqlConnector::new(settings::<MysqlConfig>(
            service,
        )?)?))
    },
};

/// A `mysql` service: its configuration and what its connections share.
#[derive(Debug)]
pub struct MysqlConnector {
    cfg: MysqlConfig,
    /// `config.serverPublicKey`, read once.
    server_key: Option<Vec<u8>>,
    tls: TlsConfigCache,
}

impl MysqlConnector {
    /// # Errors
    /// An unreadable `serverPublicKey`, or one that is not an RSA public key in PEM.
    pub fn new(cfg: &MysqlConfig) -> anyhow::Result<Self> {
        let server_key = match &cfg.server_public_key {
            None => None,
            Some(path) => {
                let pem = std::fs::read(path).map_err(|e| {
                    anyhow::anyhow!("config.serverPublicKey: reading {}: {e}", path.display())
                })?;
                if !auth::valid_public_key(&pem) {
                    anyhow::bail!(
                        "config.serverPublicKey: {} is not an RSA public key in PEM \
                         (`-----BEGIN PUBLIC KEY-----` or `-----BEGIN RSA PUBLIC KEY-----`)",
                        path.display()
                    );
                }
                Some(pem)
            }
        };
        Ok(Self {
            cfg: cfg.clone(),
            server_key,
            tls: TlsConfigCache::default(),
        })
    }
}

impl Connector for MysqlConnector {
    fn serve<'a>(
        &'a self,
        env: &'a Env,
        conn: &'a mut Conn,
        client: AppSocket,
    ) -> BoxFuture<'a, Result<Handoff, ConnError>> {
        Box::pin(serve(self, env, conn, client))
    }

    fn splices(&self) -> bool {
        true
    }

    fn uses_ca(&self) -> bool {
        self.cfg.client_tls == ClientTlsMode::Terminate
    }

    /// MySQL's own "Too many connections" (1040, 08004), which a server sends instead of
    /// its greeting.
    fn refusal(&self, service: &str, reason: &str) -> Option<Vec<u8>> {
        let (code, state) = code::TOO_MANY_CONNECTIONS;
        let msg = format!("service `{service}`: {reason}");
        Some(proto::encode(0, &errors::err_payload(code, state, &msg)).to_vec())
    }

    /// A greeting of the broker's, the client's response read, then ERR 1045 `28000`
    /// naming the rule ([`deny`]); nothing is dialled.
    fn deny<'a>(&'a self, client: AppSocket, denial: &'a Denial) -> BoxFuture<'a, ()> {
        Box::pin(deny::deny(client, denial))
    }
}

/// A fresh scramble for the client's greeting: printable ASCII, as servers send (some
/// clients treat it as a C string).
fn scramble() -> [u8; 20] {
    let raw: [u8; 20] = rand::random();
    raw.map(|b| 0x21 + b % 94)
}

/// Serve one client connection up to the authenticated session.
async fn serve(
    my: &MysqlConnector,
    env: &Env,
    conn: &mut Conn,
    client: AppSocket,
) -> Result<Handoff, ConnError> {
    let service = Arc::clone(&conn.service);
    let deadline = tokio::time::Instant::now() + my.cfg.connect_timeout;
    let dests = Destinations::for_service(&[], &service.intercept);

    // 1. The server speaks first.
    let first = tokio::time::timeout_at(deadline, connect(env, conn, &service, dests, false))
        .await
        .unwrap_or_else(|_| Err(timed_out(my, conn)));
    let (creds, params, opened) = match first {
        Ok(x) => x,
        Err(f) => {
            tell(Some(ClientIo::Plain(client)), 0, &f, &service.name).await;
            return Err(f.err);
        }
    };

    // 2. The client's leg.
    let offer_tls = my.cfg.client_tls == ClientTlsMode::Terminate && env.ca.is_some();
    let greeting = opened.greeting.client_greeting(&scramble(), offer_tls);
    let tls = match (&env.ca, offer_tls) {
        (Some(ca), true) => Some(ClientTls {
            ca,
            name: conn
                .orig_host
                .clone()
                .or_else(|| conn.orig_dst.map(|d| d.ip().to_canonical().to_string())),
        }),
        _ => None,
    };
    let leg = match tokio::time::timeout(
        CLIENT_TIMEOUT,
        client::handshake(client, &greeting, tls.as_ref()),
    )
    .await
    {
        Ok(Ok(leg)) => leg,
        Ok(Err(failed)) => {
            tell(failed.io, failed.seq, &failed.failure, &service.name).await;
            return Err(failed.failure.err);
        }
        // The client (and its socket) went with the timed-out handshake.
        Err(_) => {
            return Err(ConnError::Protocol(format!(
                "client sent no handshake response within {CLIENT_TIMEOUT:?}"
            )));
        }
    };
    tracing::debug!(
        client.user = %String::from_utf8_lossy(&leg.response.user),
        client.plugin = %leg.response.plugin.as_deref().map(String::from_utf8_lossy).unwrap_or_default(),
        client.tls = leg.io.is_tls(),
        "client handshake"
    );

    // 3. The broker's login, the client waiting for its OK.
    let client::Greeted {
        io: mut client_io,
        response,
        seq,
        rest,
    } = leg;
    let start = Start {
        creds,
        params,
        opened,
    };
    let result = tokio::select! {
        r = tokio::time::timeout_at(
            deadline,
            establish(my, env, conn, &service, dests, start, &response),
        ) => r.ok(),
        () = client_gone(client_io.socket()) => Some(Err(Failure::told(ConnError::ClientGone(
            "during the upstream handshake".into(),
        )))),
    }
    .unwrap_or_else(|| Err(timed_out(my, conn)));
    let done = match result {
        Ok(done) => done,
        Err(f) => {
            tell(Some(client_io), seq, &f, &service.name).await;
            return Err(f.err);
        }
    };
    tracing::debug!(
        upstream = %done.to,
        tls = done.stream.is_tls(),
        auth = done.method,
        client.tls = client_io.is_tls(),
        "session established"
    );
    // 4. The server's OK, renumbered for the client's leg, then the byte phase.
    let mut to_client = proto::encode(seq, &done.ok).to_vec();
    to_client.extend_from_slice(&done.rest);
    if !rest.is_empty() {
        // A client that does not wait for its OK: harmless, but the session cannot be
        // spliced (the core sees bytes owed upstream).
        tracing::debug!(bytes = rest.len(), "client sent data before its OK");
    }
    let _ = client_io.flush().await;
    Ok(Handoff::Relay(Session {
        client: client_io.into_session_client(),
        upstream: match done.stream {
            MyStream::Plain(s) => UpstreamStream::Plain(s),
            tls => UpstreamStream::Other(Box::new(tls)),
        },
        to_client,
        to_upstream: rest.to_vec(),
        // A MySQL client sends nothing between its HandshakeResponse and the OK, which
        // is `to_client`.
        client_waits: true,
        keep: None,
        // COM_CHANGE_USER would carry the app's dummy credentials to the server.
        upload_filter: Some(Box::new(guard::ChangeUserGuard::new(&service.name))),
    }))
}

/// The upstream side did not finish within `config.connectTimeout`.
fn timed_out(my: &MysqlConnector, conn: &Conn) -> Failure {
    Failure::new(
        code::CANNOT_REACH,
        ConnError::Upstream {
            addr: conn
                .stats
                .upstream
                .clone()
                .unwrap_or_else(|| "(not resolved yet)".into()),
            source: std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                format!(
                    "no session within {:?} (config.connectTimeout)",
                    my.cfg.connect_timeout
                ),
            ),
        },
    )
}

/// Credentials, where the upstream is, and its greeting.
async fn connect(
    env: &Env,
    conn: &mut Conn,
    service: &Service,
    dests: Destinations<'_>,
    fresh: bool,
) -> Result<(Credentials, UpstreamParams, Opened), Failure> {
    let creds = env
        .credentials(
            Requester::new(service, conn.caller.as_ref()),
            fresh,
            &mut conn.stats,
        )
        .await?;
    let params = UpstreamParams::from_credentials(
        &creds,
        AppDestination {
            addr: conn.orig_dst,
            host: conn.orig_host.as_deref(),
        },
        dests,
    )?;
    conn.stats.upstream = Some(params.to.to_string());
    let opened = upstream::open(&env.dialer, &params).await?;
    Ok((creds, params, opened))
}

/// The first connection: credentials, parameters, the greeted server.
struct Start {
    creds: Credentials,
    params: UpstreamParams,
    opened: Opened,
}

/// An authenticated upstream.
struct Established {
    stream: MyStream,
    to: crate::connector::dial::HostPort,
    ok: Vec<u8>,
    rest: bytes::BytesMut,
    method: &'static str,
}

enum Attempt {
    Ok(Established),
    Rejected(errors::ServerError),
}

/// Log in upstream; on a credential rejection, fetch the credentials again bypassing the
/// cache and log in once more on a new connection (rotation).
async fn establish(
    my: &MysqlConnector,
    env: &Env,
    conn: &mut Conn,
    service: &Service,
    dests: Destinations<'_>,
    start: Start,
    client: &ClientResponse,
) -> Result<Established, Failure> {
    let Start {
        mut creds,
        mut params,
        mut opened,
    } = start;
    // What the client negotiated with the broker: a server reconnected to must have it.
    let negotiated = proto::session_caps(client, &opened.greeting);
    let greeted_id = opened.greeting.connection_id;
    let mut retried = false;
    loop {
        match attempt(my, &params, &creds, opened, client).await? {
            Attempt::Ok(e) => return Ok(e),
            Attempt::Rejected(err) => {
                if !retried {
                    retried = true;
                    tracing::info!(
                        code = err.code,
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
                        Ok(fresh) if fresh.0 != creds.0 => {
                            creds = fresh;
                            params = UpstreamParams::from_credentials(
                                &creds,
                                AppDestination {
                                    addr: conn.orig_dst,
                                    host: conn.orig_host.as_deref(),
                                },
                                dests,
                            )?;
                            conn.stats.upstream = Some(params.to.to_string());
                            opened = upstream::open(&env.dialer, &params).await?;
                            if !opened.greeting.caps.contains(negotiated) {
                                return Err(Failure::new(
                                    code::UPSTREAM_FAILED,
                                    ConnError::Protocol(format!(
                                        "upstream {}: after reconnecting with rotated \
                                         credentials, the server lacks capabilities the \
                                         client negotiated",
                                        params.to
                                    )),
                                ));
                            }
                            tracing::debug!(
                                greeted = greeted_id,
                                session = opened.greeting.connection_id,
                                "retrying on a new connection: the client was greeted with \
                                 another connection id"
                            );
                            continue;
                        }
                        Ok(_) => tracing::info!("credentials unchanged; not retrying"),
                        Err(e) => tracing::warn!(error = %e, "refetching credentials failed"),
                    }
                }
                return Err(Failure::new(
                    code::ACCESS_DENIED,
                    ConnError::AuthRejected(err.to_string()),
                ));
            }
        }
    }
}

/// One login on a greeted connection with one set of credentials.
async fn attempt(
    my: &MysqlConnector,
    params: &UpstreamParams,
    creds: &Credentials,
    opened: Opened,
    client: &ClientResponse,
) -> Result<Attempt, Failure> {
    let username = creds
        .text("username")
        .map_err(ConnError::from)?
        .filter(|u| !u.is_empty())
        .ok_or_else(|| ConnError::Config("credential `username` is empty".into()))?;
    let password = creds
        .get("password")
        .map(|p| p.expose())
        .unwrap_or_default();
    let g = &opened.greeting;
    let tls = params.sslmode != upstream::SslMode::Disable;
    let database = params
        .database
        .as_deref()
        .map(str::as_bytes)
        .or(client.database.as_deref());
    let caps = proto::upstream_caps(client, g, tls, database.is_some());
    let ext = proto::upstream_ext_caps(client, g);
    let (mut stream, seq) = upstream::secure(
        opened.tcp,
        g,
        params,
        &my.tls,
        &proto::ssl_request(caps, ext, client),
    )
    .await?;
    let transport = Transport {
        tls: stream.is_tls(),
        server_key: my.server_key.as_deref(),
    };
    let plugin_auth = g.caps.contains(Caps::CLIENT_PLUGIN_AUTH);
    let (auth, data) = ServerAuth::start(
        g.plugin.as_deref().filter(|_| plugin_auth),
        &g.nonce,
        password,
        &transport,
    )
    .map_err(|e| upstream::auth_failure(&params.to, "handshake", e))?;
    let response = proto::handshake_response(
        &Login {
            caps,
            ext_caps: ext,
            user: username.as_bytes(),
            database,
            plugin: plugin_auth.then(|| auth.method().name().as_bytes()),
            auth: &data,
        },
        client,
    );
    let outcome = upstream::login(
        &mut stream,
        &params.to,
        seq,
        &response,
        auth,
        password,
        &transport,
    )
    .await?;
    Ok(match outcome {
        Outcome::Ok {
            payload,
            rest,
            method,
        } => Attempt::Ok(Established {
            stream,
            to: params.to.clone(),
            ok: payload,
            rest,
            method,
        }),
        Outcome::Rejected(e) => {
            let _ = stream.shutdown().await;
            Attempt::Rejected(e)
        }
    })
}

/// Resolves when the client hangs up while the upstream handshake runs. A MySQL client
/// sends nothing between its HandshakeResponse and the OK; if one sends bytes anyway,
/// they stay queued (forwarded later) and the watch ends without resolving.
async fn client_gone(client: &AppSocket) {
    let mut byte = [0u8; 1];
    match client.peek(&mut byte).await {
        Ok(0) | Err(_) => {}
        Ok(_) => std::future::pending().await,
    }
}

/// Tell the client about a failure (an ERR packet with sequence id `seq`, unless it was
/// told already) and close without a reset.
async fn tell(io: Option<ClientIo>, seq: u8, f: &Failure, service: &str) {
    let Some(mut io) = io else {
        return;
    };
    if !f.client_told {
        let _ = io
            .write_all(&proto::encode(seq, &f.client_error(service)))
            .await;
        let _ = io.flush().await;
    }
    match io {
        ClientIo::Plain(tcp) => close_gracefully(tcp).await,
        ClientIo::Tls(mut s) => {
            let _ = s.shutdown().await;
        }
    }
}
