//! The validated, immutable configuration the daemon runs on.
//!
//! Produced from YAML by [`super::load`]; every field here has already been checked.

use std::{collections::BTreeMap, net::SocketAddr, path::PathBuf, time::Duration};

use ipnet::IpNet;

use crate::secret::Secret;

/// Default health endpoint.
pub const DEFAULT_HEALTH_ADDR: &str = "127.0.0.1:5335";
/// Default lifetime of a fetched credential in the cache.
pub const DEFAULT_CACHE_TTL: Duration = Duration::from_secs(60);
/// Default cap on brokered connections open at once, over all listeners.
pub const DEFAULT_MAX_CONNECTIONS: u32 = 10_000;
/// Default cap on connections open at once through one listener (the transparent one,
/// or one `listenOn`).
pub const DEFAULT_MAX_CONNECTIONS_PER_LISTENER: u32 = 5_000;
/// Default per-request timeout of an `http` provider.
pub const DEFAULT_HTTP_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Debug, Clone)]
pub struct Config {
    /// Services in file order; a service's index is its id in the eBPF maps.
    pub services: Vec<Service>,
    /// Named provider instances from the top-level `providers:` block, plus the built-in
    /// defaults (`literal`, `env`, `file`, `http`) when not overridden.
    pub providers: BTreeMap<String, ProviderConfig>,
    /// Broker-wide settings (top-level `broker:` block).
    pub broker: BrokerSettings,
}

#[derive(Debug, Clone)]
pub struct BrokerSettings {
    /// Health endpoint (`/live`, `/ready`). `None` when set to `off`.
    pub health_addr: Option<SocketAddr>,
    /// Port of the transparent listener on 127.0.0.1 and ::1; 0 picks a free port.
    pub transparent_port: u16,
    /// How long a fetched credential may be reused. Zero disables the cache.
    pub cache_ttl: Duration,
    /// Socket mark bit set on the broker's upstream sockets.
    pub bypass_mark: u32,
    /// Splice authenticated sessions in the kernel (sockmap) instead of relaying them
    /// in userspace, where the connector and the kernel allow it (default on; see
    /// docs/ARCHITECTURE.md, "Splice").
    pub splice: bool,
    /// Brokered connections open at once, over all listeners (`maxConnections`). The
    /// transparent listener's share (`max_connections_per_listener`) is reserved for
    /// it; the `listenOn` listeners share the rest.
    pub max_connections: u32,
    /// Connections open at once through one listener (`maxConnectionsPerListener`).
    pub max_connections_per_listener: u32,
}

impl Default for BrokerSettings {
    /// The settings of a configuration without a `broker:` block.
    fn default() -> Self {
        Self {
            health_addr: DEFAULT_HEALTH_ADDR.parse().ok(),
            transparent_port: 0,
            cache_ttl: DEFAULT_CACHE_TTL,
            bypass_mark: broker_common::DEFAULT_BYPASS_MARK,
            splice: true,
            max_connections: DEFAULT_MAX_CONNECTIONS,
            max_connections_per_listener: DEFAULT_MAX_CONNECTIONS_PER_LISTENER,
        }
    }
}

#[derive(Debug, Clone)]
pub struct Service {
    pub name: String,
    pub connector: Connector,
    /// Explicit listener (Secretless `listenOn`).
    pub listen_on: Option<ListenAddr>,
    /// Destinations whose connections the eBPF programs redirect to this service.
    pub intercept: Vec<InterceptTarget>,
    /// Credential name -> where its value comes from.
    pub credentials: BTreeMap<String, CredentialSource>,
    /// Secretless-style `authentication:` entries (e.g. OAuth2 client credentials).
    pub authentication: Vec<AuthMethod>,
}

/// A connector and its validated `config:` block.
#[derive(Debug, Clone)]
pub enum Connector {
    Tcp(TcpConfig),
    Pg(PgConfig),
    /// A connector name we know (Secretless or ours) whose implementation is not built
    /// yet. Loading succeeds; `broker check` and `broker run` report it by name.
    NotBuilt {
        name: String,
    },
}

impl Connector {
    #[must_use]
    pub fn name(&self) -> &str {
        match self {
            Self::Tcp(_) => "tcp",
            Self::Pg(_) => "pg",
            Self::NotBuilt { name } => name,
        }
    }
}

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

/// `connector: pg` (aliases `postgres`, `postgresql`). Connection settings come from the
/// credentials (`host port username password database sslmode sslrootcert sslcert sslkey
/// sslhost require_auth`), as in Secretless; the `config:` block holds what protects the
/// password from the upstream side.
#[derive(Debug, Clone)]
pub struct PgConfig {
    /// `requireAuth`: the authentication requests the broker answers. `None`: the
    /// default policy (md5 and SCRAM; a cleartext password only over verified TLS; no
    /// session without a challenge), see [`RequireAuth::default_allows`].
    pub require_auth: Option<RequireAuth>,
    /// `upstreamAllow`: addresses the app's own destination may be used as the upstream
    /// when no `host` credential names one. Empty: any destination the service
    /// intercepts (a CIDR target then requires an explicit upstream).
    pub upstream_allow: Vec<IpNet>,
    /// `scramMaxIterations`: SCRAM iteration counts above this are refused before any
    /// PBKDF2 runs (a hostile server could ask for 2^31).
    pub scram_max_iterations: u32,
}

/// Default `scramMaxIterations`: 25 times PostgreSQL's default of 4096.
pub const DEFAULT_SCRAM_MAX_ITERATIONS: u32 = 100_000;

impl Default for PgConfig {
    fn default() -> Self {
        Self {
            require_auth: None,
            upstream_allow: Vec::new(),
            scram_max_iterations: DEFAULT_SCRAM_MAX_ITERATIONS,
        }
    }
}

/// An authentication method the upstream may ask for, by libpq's `require_auth` name.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AuthKind {
    /// `none`: AuthenticationOk without any challenge (`trust`).
    None,
    /// `password`: AuthenticationCleartextPassword.
    Password,
    /// `md5`: AuthenticationMD5Password.
    Md5,
    /// `scram-sha-256`: SASL SCRAM-SHA-256 (and -PLUS).
    ScramSha256,
}

impl AuthKind {
    const ALL: [Self; 4] = [Self::Password, Self::Md5, Self::ScramSha256, Self::None];

    /// libpq's name.
    #[must_use]
    pub fn name(self) -> &'static str {
        match self {
            Self::None => "none",
            Self::Password => "password",
            Self::Md5 => "md5",
            Self::ScramSha256 => "scram-sha-256",
        }
    }

    fn bit(self) -> u8 {
        match self {
            Self::None => 1,
            Self::Password => 2,
            Self::Md5 => 4,
            Self::ScramSha256 => 8,
        }
    }
}

/// libpq's `require_auth`: a comma-separated list (or YAML list) of methods the broker
/// answers, or of `!`-negated methods it refuses (all negated or none, as libpq).
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct RequireAuth {
    allowed: u8,
}

impl std::fmt::Debug for RequireAuth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "RequireAuth({})", self.names())
    }
}

impl RequireAuth {
    /// Parse the items of a list (`password`, `!md5`, ...).
    ///
    /// # Errors
    /// Unknown, repeated or mixed negated/plain items, or an empty list. The message
    /// does not quote the value (it may come from a credential).
    pub fn parse<'a>(items: impl IntoIterator<Item = &'a str>) -> Result<Self, String> {
        let mut listed = 0u8;
        let mut negated: Option<bool> = None;
        for item in items {
            let item = item.trim();
            let (neg, name) = match item.strip_prefix('!') {
                Some(n) => (true, n),
                None => (false, item),
            };
            if *negated.get_or_insert(neg) != neg {
                return Err(
                    "negated (`!method`) and plain methods cannot be mixed (as in libpq)".into(),
                );
            }
            let kind = AuthKind::ALL
                .into_iter()
                .find(|k| k.name() == name)
                .ok_or_else(|| {
                    "unsupported method (expected password, md5, scram-sha-256 or none, \
                     each optionally negated with `!`)"
                        .to_owned()
                })?;
            if listed & kind.bit() != 0 {
                return Err("a method is listed twice".into());
            }
            listed |= kind.bit();
        }
        match negated {
            None => Err("lists no method".into()),
            Some(false) => Ok(Self { allowed: listed }),
            Some(true) if listed == 0x0f => Err("refuses every method".into()),
            Some(true) => Ok(Self {
                allowed: !listed & 0x0f,
            }),
        }
    }

    /// Parse libpq's comma-separated form.
    ///
    /// # Errors
    /// As [`Self::parse`].
    pub fn parse_text(s: &str) -> Result<Self, String> {
        Self::parse(s.split(','))
    }

    #[must_use]
    pub fn allows(self, kind: AuthKind) -> bool {
        self.allowed & kind.bit() != 0
    }

    /// The broker's policy when `requireAuth` is not set: md5 and SCRAM (SCRAM never
    /// reveals the password; md5 over plain TCP is what many installations use), a
    /// cleartext password only over TLS whose certificate was verified, and never a
    /// session the server opens without a challenge (a squatter saying "trust" would
    /// get the session's queries).
    #[must_use]
    pub fn default_allows(kind: AuthKind, verified_tls: bool) -> bool {
        match kind {
            AuthKind::Md5 | AuthKind::ScramSha256 => true,
            AuthKind::Password => verified_tls,
            AuthKind::None => false,
        }
    }

    /// The allowed methods, comma-separated, for messages.
    #[must_use]
    pub fn names(self) -> String {
        let names: Vec<&str> = AuthKind::ALL
            .into_iter()
            .filter(|k| self.allows(*k))
            .map(AuthKind::name)
            .collect();
        if names.is_empty() {
            "(nothing)".into()
        } else {
            names.join(", ")
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ListenAddr {
    Tcp(SocketAddr),
    Unix(PathBuf),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum InterceptTarget {
    /// `db.example.com:5432`, resolved by the daemon and kept current (TTL).
    Host { host: String, port: u16 },
    /// `10.0.0.5:5432`, `[2001:db8::5]:5432`.
    Addr(SocketAddr),
    /// `10.0.0.0/24:5432`, `[2001:db8::/64]:5432`.
    Cidr { net: IpNet, port: u16 },
}

#[derive(Debug, Clone)]
pub enum CredentialSource {
    /// A scalar in the file, or `from: literal`.
    Literal(Secret),
    /// Fetched from a provider instance by id.
    Provider { provider: String, id: String },
}

#[derive(Debug, Clone)]
pub enum ProviderConfig {
    Literal,
    Env,
    File,
    Http(HttpProviderConfig),
    /// Known kind (`vault`, `conjur`, `aws`, `kubernetes`), not built yet.
    NotBuilt {
        kind: String,
    },
}

impl ProviderConfig {
    #[must_use]
    pub fn kind(&self) -> &str {
        match self {
            Self::Literal => "literal",
            Self::Env => "env",
            Self::File => "file",
            Self::Http(_) => "http",
            Self::NotBuilt { kind } => kind,
        }
    }
}

#[derive(Debug, Clone, Default)]
pub struct HttpProviderConfig {
    /// Prepended to relative ids (`get: secrets/db/password`).
    pub base_url: Option<String>,
    /// Sent as `Authorization: Bearer <token>`.
    pub token: Option<Secret>,
    /// File holding the bearer token (`tokenFile`), read when the provider is built;
    /// one trailing newline is removed. Exclusive with `token`.
    pub token_file: Option<PathBuf>,
    /// Extra CA certificate (PEM) for HTTPS secret servers.
    pub ca_file: Option<PathBuf>,
    /// Per-request timeout.
    pub timeout: Duration,
}

/// An entry of a Secretless-style `authentication:` list.
#[derive(Debug, Clone)]
pub enum AuthMethod {
    OAuth2(OAuth2Config),
}

#[derive(Debug, Clone)]
pub struct OAuth2Config {
    pub token_url: String,
    pub client_id: String,
    pub client_secret: Secret,
    pub scope: Option<String>,
}
