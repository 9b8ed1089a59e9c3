//! `connector: tcp`: relay bytes to the upstream, optionally originating TLS.
//!
//! The upstream is `credentials.host`/`credentials.port` when set, else the original
//! destination of an intercepted connection, else (for `listenOn` services) the
//! listener's port on `credentials.host`.

use std::sync::Arc;

use tokio::net::TcpStream;

use crate::{
    config::{ListenAddr, TcpConfig},
    connector::{BoxFuture, Conn, ConnError, Connector, Env, Handoff, Session, UpstreamStream},
    proxy::{dial::HostPort, relay::close_gracefully},
    tls::{self, TlsOptions, Verify},
};

/// A `tcp` service: its TLS client configuration is built once, here.
#[derive(Debug)]
pub struct TcpConnector {
    tls: Option<TlsUpstream>,
}

#[derive(Debug)]
struct TlsUpstream {
    config: Arc<rustls::ClientConfig>,
    /// The name to verify instead of the upstream host.
    server_name: Option<String>,
}

impl TcpConnector {
    /// # Errors
    /// An unreadable or empty CA file.
    pub fn new(cfg: &TcpConfig) -> anyhow::Result<Self> {
        let tls = match &cfg.tls {
            None => None,
            Some(t) => Some(TlsUpstream {
                config: tls::client_config(TlsOptions {
                    verify: if t.insecure_skip_verify {
                        Verify::None
                    } else {
                        Verify::Full
                    },
                    ca_file: t.ca_file.as_deref(),
                    with_system_roots: true,
                    client_cert: None,
                })?,
                server_name: t.server_name.clone(),
            }),
        };
        Ok(Self { tls })
    }
}

impl Connector for TcpConnector {
    fn serve<'a>(
        &'a self,
        env: &'a Env,
        conn: &'a mut Conn,
        client: TcpStream,
    ) -> BoxFuture<'a, Result<Handoff, ConnError>> {
        Box::pin(async move {
            match self.upstream(env, conn).await {
                Ok(upstream) => Ok(Handoff::Relay(Session {
                    client,
                    upstream,
                    to_client: Vec::new(),
                    to_upstream: Vec::new(),
                    // The client may send at any time: never spliced.
                    client_waits: false,
                    keep: None,
                })),
                Err(e) => {
                    close_gracefully(client).await;
                    Err(e)
                }
            }
        })
    }
}

impl TcpConnector {
    async fn upstream(&self, env: &Env, conn: &mut Conn) -> Result<UpstreamStream, ConnError> {
        let service = Arc::clone(&conn.service);
        let creds = env.credentials(&service, false, &mut conn.stats).await?;
        let host = match creds.text("host")? {
            Some(h) => h.to_owned(),
            None => conn
                .orig_dst
                .map(|a| a.ip().to_string())
                .ok_or_else(|| ConnError::Config("no upstream: set credential `host`".into()))?,
        };
        let port = match creds.text("port")? {
            Some(p) => p
                .parse::<u16>()
                .map_err(|_| ConnError::Config("credential `port` is not a port number".into()))?,
            None => match (conn.orig_dst, &service.listen_on) {
                (Some(a), _) => a.port(),
                (None, Some(ListenAddr::Tcp(a))) => a.port(),
                _ => {
                    return Err(ConnError::Config(
                        "no upstream port: set credential `port`".into(),
                    ));
                }
            },
        };
        let to = HostPort::new(host, port);
        conn.stats.upstream = Some(to.to_string());
        let upstream = env.dialer.dial(&to).await?;
        let Some(t) = &self.tls else {
            return Ok(UpstreamStream::Plain(upstream));
        };
        let name = t.server_name.clone().unwrap_or_else(|| to.host.clone());
        let server_name = rustls::pki_types::ServerName::try_from(name.clone())
            .map_err(|_| ConnError::Config(format!("invalid TLS server name `{name}`")))?;
        let tls_stream = tokio_rustls::TlsConnector::from(Arc::clone(&t.config))
            .connect(server_name, upstream)
            .await
            .map_err(|e| ConnError::Tls {
                addr: to.to_string(),
                reason: e.to_string(),
            })?;
        Ok(UpstreamStream::Other(Box::new(tls_stream)))
    }
}
