//! [`Broker`]: the shared state every connection handler works with: the configuration,
//! the secret store (providers and credential cache), the upstream socket factory.

use std::{net::SocketAddr, sync::Arc, time::Duration};

use tokio::net::{TcpSocket, TcpStream};

use crate::{
    config::{Config, Service},
    connector::{ConnError, ConnStats, Credentials, pg::PgShared},
    secrets::SecretStore,
};

/// How long an upstream TCP connect may take.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

pub struct Broker {
    pub config: Arc<Config>,
    /// Provider instances and the credential cache.
    pub secrets: SecretStore,
    /// State the PostgreSQL connector shares between connections (cancel keys, SCRAM cache).
    pub pg: PgShared,
}

impl Broker {
    /// Build the provider instances for a validated configuration.
    ///
    /// # Errors
    /// When a provider instance cannot be created (e.g. an unreadable CA file).
    pub fn new(config: Arc<Config>) -> anyhow::Result<Self> {
        let secrets = SecretStore::new(&config)?;
        Ok(Self {
            config,
            secrets,
            pg: PgShared::default(),
        })
    }

    /// Fetch every credential of `service` (see [`SecretStore::credentials`]), recording
    /// the fetches in `stats`. With `fresh`, the cache is bypassed (and refreshed): used
    /// after the upstream rejected cached credentials (rotation).
    ///
    /// # Errors
    /// `ConnError::Credentials` naming the credential and the provider, never a value.
    pub async fn credentials(
        &self,
        service: &Service,
        fresh: bool,
        stats: &mut ConnStats,
    ) -> Result<Credentials, ConnError> {
        Ok(self
            .secrets
            .credentials(service, fresh, &mut stats.fetched)
            .await?)
    }

    /// Open a TCP connection to the upstream with the bypass mark set, so the eBPF
    /// programs never redirect the broker's own connections.
    ///
    /// # Errors
    /// `ConnError::Upstream` naming `host:port`.
    pub async fn dial(&self, host: &str, port: u16) -> Result<TcpStream, ConnError> {
        let addr_text = if host.contains(':') {
            format!("[{host}]:{port}")
        } else {
            format!("{host}:{port}")
        };
        let fail = |source: std::io::Error| ConnError::Upstream {
            addr: addr_text.clone(),
            source,
        };
        let addrs: Vec<SocketAddr> = tokio::net::lookup_host((host, port))
            .await
            .map_err(fail)?
            .collect();
        let mut last = std::io::Error::new(std::io::ErrorKind::NotFound, "no address");
        for addr in addrs {
            match tokio::time::timeout(CONNECT_TIMEOUT, self.dial_addr(addr)).await {
                Ok(Ok(s)) => return Ok(s),
                Ok(Err(e)) => last = e,
                Err(_) => {
                    last = std::io::Error::new(std::io::ErrorKind::TimedOut, "connect timed out");
                }
            }
        }
        Err(fail(last))
    }

    async fn dial_addr(&self, addr: SocketAddr) -> std::io::Result<TcpStream> {
        let sock = if addr.is_ipv4() {
            TcpSocket::new_v4()?
        } else {
            TcpSocket::new_v6()?
        };
        let mark = self.config.broker.bypass_mark;
        if mark != 0 {
            // SO_MARK needs CAP_NET_ADMIN; without it (--no-ebpf as a user) there is
            // nothing to bypass anyway.
            if let Err(e) = socket2::SockRef::from(&sock).set_mark(mark)
                && e.raw_os_error() != Some(libc::EPERM)
            {
                return Err(e);
            }
        }
        sock.set_nodelay(true)?;
        sock.connect(addr).await
    }
}
