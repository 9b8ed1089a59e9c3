//! [`Broker`]: the shared state every connection handler works with: the configuration,
//! the provider instances, the credential cache, the upstream socket factory.

use std::{
    collections::HashMap,
    net::SocketAddr,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use tokio::net::{TcpSocket, TcpStream};

use crate::{
    config::{Config, CredentialSource, Service},
    connector::{ConnError, ConnStats, Credentials, pg::PgShared},
    provider::{self, SecretProvider},
    secret::Secret,
};

/// How long an upstream TCP connect may take.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// How long one credential fetch may take before the connection is refused.
pub const FETCH_TIMEOUT: Duration = Duration::from_secs(15);

pub struct Broker {
    pub config: Arc<Config>,
    providers: HashMap<String, Arc<dyn SecretProvider>>,
    cache: Mutex<HashMap<(String, String), (Secret, Instant)>>,
    /// State the PostgreSQL connector shares between connections (cancel keys, SCRAM cache).
    pub pg: PgShared,
}

impl Broker {
    /// Build the provider instances for a validated configuration.
    ///
    /// # Errors
    /// When a provider instance cannot be created (e.g. an unreadable CA file).
    pub fn new(config: Arc<Config>) -> anyhow::Result<Self> {
        let providers = provider::build_all(&config.providers)?;
        Ok(Self {
            config,
            providers,
            cache: Mutex::new(HashMap::new()),
            pg: PgShared::default(),
        })
    }

    /// Fetch every credential of `service`. With `fresh`, the cache is bypassed (and
    /// refreshed): used after the upstream rejected cached credentials (rotation).
    ///
    /// # Errors
    /// `ConnError::Credentials` naming the credential and the provider, never a value.
    pub async fn credentials(
        &self,
        service: &Service,
        fresh: bool,
        stats: &mut ConnStats,
    ) -> Result<Credentials, ConnError> {
        let mut out = Credentials::default();
        for (name, source) in &service.credentials {
            let value = match source {
                CredentialSource::Literal(s) => s.clone(),
                CredentialSource::Provider { provider, id } => {
                    stats.fetched.push(format!("{name}<-{provider}:{id}"));
                    self.fetch(provider, id, fresh)
                        .await
                        .map_err(|e| ConnError::Credentials(format!("credential `{name}`: {e}")))?
                }
            };
            out.0.insert(name.clone(), value);
        }
        Ok(out)
    }

    async fn fetch(&self, provider: &str, id: &str, fresh: bool) -> Result<Secret, String> {
        let ttl = self.config.broker.cache_ttl;
        let key = (provider.to_owned(), id.to_owned());
        if !fresh && !ttl.is_zero() {
            let cache = self
                .cache
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            if let Some((v, at)) = cache.get(&key)
                && at.elapsed() < ttl
            {
                return Ok(v.clone());
            }
        }
        let p = self
            .providers
            .get(provider)
            .ok_or_else(|| format!("provider `{provider}` is not configured"))?;
        let started = Instant::now();
        let value = tokio::time::timeout(FETCH_TIMEOUT, p.get(id))
            .await
            .map_err(|_| format!("{provider}: fetching `{id}` timed out after {FETCH_TIMEOUT:?}"))?
            .map_err(|e| e.to_string())?;
        tracing::debug!(
            provider,
            id,
            elapsed_ms = started.elapsed().as_millis() as u64,
            "credential fetched"
        );
        if !ttl.is_zero() {
            let mut cache = self
                .cache
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            cache.insert(key, (value.clone(), Instant::now()));
        }
        Ok(value)
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
