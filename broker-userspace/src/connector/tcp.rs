//! `connector: tcp`: relay bytes to the upstream, optionally originating TLS.
//!
//! The upstream is `credentials.host`/`credentials.port` when set, else the original
//! destination of an intercepted connection, else (for `listenOn` services) the
//! listener's port on `credentials.host` ([`target::resolve`]).

use std::{path::PathBuf, sync::Arc};

use yaml_serde::Value;

use crate::{
    config::{ConnectorBlock, ConnectorSettings, ConnectorSyntax, ListenAddr, Loader, join},
    connector::{
        AppSocket, BoxFuture, Conn, ConnError, Connector, Env, Handoff, Kind, Requester, Session,
        UpstreamStream, close_gracefully, settings,
        target::{self, AppDestination, Destinations, Fallbacks},
    },
    tls::{self, TlsOptions, Verify},
};

/// The `tcp` kind: relay bytes, optionally originating TLS.
pub const KIND: Kind = Kind {
    syntax: ConnectorSyntax {
        names: &["tcp"],
        required_credentials: &[],
        upstream_credentials: &["host"],
        shares_listener: false,
        parse,
    },
    build: |service| Ok(Arc::new(TcpConnector::new(settings(service)?)?)),
};

/// `connector: tcp`: relay bytes, optionally originating TLS to the upstream.
#[derive(Debug, Clone, Default)]
pub struct TcpConfig {
    pub tls: Option<UpstreamTls>,
}

/// TLS toward the upstream.
#[derive(Debug, Clone, Default)]
pub struct UpstreamTls {
    /// Extra CA certificate(s) (PEM) trusted besides the system roots.
    pub ca_file: Option<PathBuf>,
    /// Name to verify and send as SNI; defaults to the upstream host.
    pub server_name: Option<String>,
    /// Skip certificate verification entirely (never for production).
    pub insecure_skip_verify: bool,
}

impl ConnectorSettings for TcpConfig {}

/// `config: {tls: true | false | {caFile, serverName, insecureSkipVerify}}`.
fn parse(l: &mut Loader<'_>, b: &ConnectorBlock<'_>) -> Option<Arc<dyn ConnectorSettings>> {
    let path = b.path;
    let Some(v) = b.value else {
        return Some(Arc::new(TcpConfig::default()));
    };
    let m = l.map(path, v, "a map (`tls:`)")?;
    l.keys(path, m, &["tls"]);
    let before = l.error_count();
    let tpath = join(path, "tls");
    let tls = match m.get("tls") {
        None | Some(Value::Null) => None,
        Some(v @ (Value::Bool(_) | Value::String(_))) => {
            l.boolean(&tpath, v)?.then(UpstreamTls::default)
        }
        Some(Value::Mapping(tm)) => {
            l.keys(&tpath, tm, &["caFile", "serverName", "insecureSkipVerify"]);
            let mut t = UpstreamTls::default();
            if let Some(v) = tm.get("caFile") {
                t.ca_file = l.non_empty(&join(&tpath, "caFile"), v).map(Into::into);
            }
            if let Some(v) = tm.get("serverName") {
                t.server_name = l.non_empty(&join(&tpath, "serverName"), v);
            }
            if let Some(v) = tm.get("insecureSkipVerify") {
                t.insecure_skip_verify = l
                    .boolean(&join(&tpath, "insecureSkipVerify"), v)
                    .unwrap_or(false);
            }
            Some(t)
        }
        Some(_) => {
            l.err(
                &tpath,
                "must be true, false or a map {caFile, serverName, insecureSkipVerify}",
            );
            None
        }
    };
    (l.error_count() == before).then(|| Arc::new(TcpConfig { tls }) as Arc<dyn ConnectorSettings>)
}

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
        client: AppSocket,
    ) -> BoxFuture<'a, Result<Handoff, ConnError>> {
        Box::pin(async move {
            match self.upstream(env, conn).await {
                Ok(upstream) => Ok(Handoff::Relay(Session::transparent(client, upstream))),
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
        let creds = env
            .credentials(
                Requester::new(&service, conn.caller.as_ref()),
                false,
                &mut conn.stats,
            )
            .await?;
        // A `listenOn` service's listener port stands in for the destination's.
        let listener_port = match &service.listen_on {
            Some(ListenAddr::Tcp(a)) => Some(a.port()),
            _ => None,
        };
        let target = target::resolve(
            &creds,
            AppDestination {
                addr: conn.orig_dst,
                host: conn.orig_host.as_deref(),
            },
            Fallbacks {
                default_port: listener_port,
                ..Fallbacks::default()
            },
            Destinations::Any,
        )?;
        let to = &target.to;
        conn.stats.upstream = Some(to.to_string());
        let upstream = env.dialer.dial(to).await?;
        let Some(t) = &self.tls else {
            return Ok(UpstreamStream::Plain(upstream));
        };
        let name = t.server_name.clone().unwrap_or_else(|| target.name.clone());
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
