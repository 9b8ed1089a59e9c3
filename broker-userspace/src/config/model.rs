//! The validated, immutable configuration the daemon runs on.
//!
//! Produced from YAML by [`super::load`]; every field here has already been checked.

use std::{
    any::Any, collections::BTreeMap, fmt, net::SocketAddr, path::PathBuf, sync::Arc, time::Duration,
};

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
    /// The failure behaviour of each built provider instance (`cacheTTL`, `staleFor`,
    /// `breaker` on its block), keyed by instance name; an instance not listed has
    /// [`FetchPolicy::default_for`] its kind.
    pub fetch_policies: BTreeMap<String, FetchPolicy>,
    /// What the file does that Secretless accepts but we only tolerate (unknown keys in a
    /// Secretless-format file, deprecated spellings, version 1 files): logged at start,
    /// printed by `broker check`, errors under `broker check --strict`.
    pub warnings: Vec<super::ConfigError>,
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
    /// Where the broker's local CA lives (`caDir`): `ca.crt` and `ca.key`, created on
    /// first use by a service that presents certificates to apps (PostgreSQL
    /// `clientTLS`).
    pub ca_dir: PathBuf,
    /// `unixSocket`: mode and owner of the socket files of `listenOn: unix://`
    /// listeners; a service's own `unixSocket` overrides it key by key.
    pub unix_socket: UnixSocketOptions,
    /// `adminSocket`: where `broker status` reaches the daemon.
    pub admin_socket: AdminSocket,
    /// `metrics`: serve `GET /metrics` on the health endpoint (default on).
    pub metrics: bool,
    /// How long live connections may finish after SIGTERM before they are ended
    /// (`drainTimeout`); intercepted connects are still brokered meanwhile.
    pub drain_timeout: Duration,
    /// `audit`: the audit log's sink and `version_hmac` key (docs/OPERATIONS.md).
    pub audit: super::audit::AuditSettings,
}

/// Default `adminSocket`.
pub const DEFAULT_ADMIN_SOCKET: &str = "/run/broker/admin.sock";

/// `broker.adminSocket`: the local admin socket (`broker status`), a Unix socket of mode
/// 0600.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum AdminSocket {
    /// Not set: [`DEFAULT_ADMIN_SOCKET`], best effort (a daemon that cannot create it,
    /// or finds another daemon on it, logs a warning and runs without one).
    #[default]
    Default,
    /// Set: this path, or start-up fails.
    Path(PathBuf),
    /// `off`.
    Off,
}

/// Default `drainTimeout`: how long live connections may finish after SIGTERM.
pub const DEFAULT_DRAIN_TIMEOUT: Duration = Duration::from_secs(10);
/// The longest `drainTimeout` accepted.
pub const MAX_DRAIN_TIMEOUT: Duration = Duration::from_secs(3600);

/// Default `caDir`.
pub const DEFAULT_CA_DIR: &str = "/var/lib/broker/ca";

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
            drain_timeout: DEFAULT_DRAIN_TIMEOUT,
            ca_dir: PathBuf::from(DEFAULT_CA_DIR),
            unix_socket: UnixSocketOptions::default(),
            admin_socket: AdminSocket::Default,
            metrics: true,
            audit: super::audit::AuditSettings::default(),
        }
    }
}

#[derive(Debug, Clone)]
pub struct Service {
    pub name: String,
    pub connector: ConnectorSpec,
    /// Explicit listener (Secretless `listenOn`).
    pub listen_on: Option<ListenAddr>,
    /// Destinations whose connections the eBPF programs redirect to this service.
    pub intercept: Vec<InterceptTarget>,
    /// Credential name -> where its value comes from.
    pub credentials: BTreeMap<String, CredentialSource>,
    /// Secretless-style `authentication:` entries (e.g. OAuth2 client credentials).
    pub authentication: Vec<AuthMethod>,
    /// The service's `cache:` block: overrides its providers' `cacheTTL` and `staleFor`.
    pub cache: CacheOverride,
    /// The service's `unixSocket:` block (a `listenOn: unix://` socket file's mode and
    /// owner): what it sets overrides `broker.unixSocket`.
    pub unix_socket: UnixSocketOptions,
    /// `allow`, `deny`, `schedule`, `rateLimit`: who may use the service, when, how often.
    pub policy: crate::policy::Spec,
}

/// Mode of a `listenOn: unix://` socket file when neither `broker.unixSocket.mode` nor
/// the service's sets one: what Secretless' sockets get, `0777` less the process umask
/// (with the usual `022`, only the daemon's user and root may connect; see
/// docs/CONFIG.md, "unixSocket").
#[must_use]
pub fn default_unix_socket_mode() -> u32 {
    0o777 & !crate::sys::umask()
}

/// A `unixSocket: {mode, user, group}` block (`broker:` or a service). Unset keys are
/// `None`: the service's block overrides the broker's key by key ([`Self::over`]).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct UnixSocketOptions {
    /// Permission bits (`0` to `0o777`); `None`: [`default_unix_socket_mode`].
    pub mode: Option<u32>,
    /// Owner of the socket file; `None`: the daemon's user.
    pub user: Option<SocketOwner>,
    /// Group of the socket file; `None`: the daemon's group.
    pub group: Option<SocketOwner>,
}

impl UnixSocketOptions {
    /// These options, with what they leave unset taken from `base`.
    #[must_use]
    pub fn over(&self, base: &Self) -> Self {
        Self {
            mode: self.mode.or(base.mode),
            user: self.user.clone().or_else(|| base.user.clone()),
            group: self.group.clone().or_else(|| base.group.clone()),
        }
    }

    /// The mode to apply.
    #[must_use]
    pub fn mode(&self) -> u32 {
        self.mode.unwrap_or_else(default_unix_socket_mode)
    }
}

/// A user or group of `unixSocket`: a number, or a name looked up when the daemon starts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SocketOwner {
    Id(u32),
    Name(String),
}

impl fmt::Display for SocketOwner {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Id(n) => write!(f, "{n}"),
            Self::Name(s) => write!(f, "{s:?}"),
        }
    }
}

/// Default `breaker.failures`: consecutive store failures that open a provider's circuit.
pub const DEFAULT_BREAKER_FAILURES: u32 = 5;
/// Default `breaker.backoff`: the first pause after the circuit opens.
pub const DEFAULT_BREAKER_BACKOFF: Duration = Duration::from_secs(1);
/// Default `breaker.maxBackoff`: the longest pause.
pub const DEFAULT_BREAKER_MAX_BACKOFF: Duration = Duration::from_secs(60);

/// How one provider instance's values are cached and how its failures are handled (the
/// keys every provider block accepts: `cacheTTL`, `staleFor`, `breaker`; see
/// docs/stores/failure.md).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FetchPolicy {
    /// `cacheTTL`: how long a fetched value is reused; `None`: `broker.cacheTTL`.
    pub cache_ttl: Option<Duration>,
    /// `staleFor`: how long past its TTL a value may still be used while the store is
    /// failing (unreachable, timing out, answering garbage). Zero (the default): never,
    /// the connection is refused (fail closed).
    pub stale_for: Duration,
    /// `breaker`: the circuit breaker; `None` (`breaker: off`): every request calls the
    /// store.
    pub breaker: Option<BreakerConfig>,
}

impl FetchPolicy {
    /// The policy of an instance of `kind` whose block sets none of the keys: the
    /// breaker is on for stores reached over the network and off for the local kinds
    /// (`literal`, `env`, `file`: a missing file is no outage of other files).
    #[must_use]
    pub fn default_for(kind: &str) -> Self {
        Self {
            cache_ttl: None,
            stale_for: Duration::ZERO,
            breaker: (!matches!(kind, "literal" | "env" | "file")).then(BreakerConfig::default),
        }
    }
}

/// A provider's circuit breaker: after `failures` consecutive failed store calls the
/// store is left alone for `backoff` (jittered), then one probe call is let through;
/// each failed probe doubles the pause, up to `max_backoff`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BreakerConfig {
    pub failures: u32,
    pub backoff: Duration,
    pub max_backoff: Duration,
}

impl Default for BreakerConfig {
    fn default() -> Self {
        Self {
            failures: DEFAULT_BREAKER_FAILURES,
            backoff: DEFAULT_BREAKER_BACKOFF,
            max_backoff: DEFAULT_BREAKER_MAX_BACKOFF,
        }
    }
}

/// A service's `cache:` block: what it sets overrides the provider's policy for the
/// service's credentials.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CacheOverride {
    /// `ttl`: replaces the provider's `cacheTTL`.
    pub ttl: Option<Duration>,
    /// `staleFor`: replaces the provider's `staleFor`.
    pub stale_for: Option<Duration>,
}

/// A service's connector: its kind and its validated `config:` block, parsed by the
/// kind's own module (see [`super::ConnectorSyntax`]).
#[derive(Debug, Clone)]
pub enum ConnectorSpec {
    Built {
        /// The kind's canonical name (`pg` for `postgres` too).
        kind: &'static str,
        settings: Arc<dyn ConnectorSettings>,
    },
    /// A connector name we know (Secretless or ours) whose implementation is not built
    /// yet. Loading succeeds; `broker check` and `broker run` report it by name.
    NotBuilt { name: String },
}

/// The parsed `config:` block of one connector kind; the kind downcasts it back with
/// [`ConnectorSpec::settings`].
pub trait ConnectorSettings: Any + fmt::Debug + Send + Sync {}

impl ConnectorSpec {
    /// The kind's canonical name, or the unbuilt name as written.
    #[must_use]
    pub fn name(&self) -> &str {
        match self {
            Self::Built { kind, .. } => kind,
            Self::NotBuilt { name } => name,
        }
    }

    /// The settings, when they are a `T`.
    #[must_use]
    pub fn settings<T: ConnectorSettings>(&self) -> Option<&T> {
        match self {
            Self::Built { settings, .. } => (&**settings as &dyn Any).downcast_ref(),
            Self::NotBuilt { .. } => None,
        }
    }

    /// A built connector of `kind` with `settings` (tests and the registry).
    #[must_use]
    pub fn built(kind: &'static str, settings: impl ConnectorSettings) -> Self {
        Self::Built {
            kind,
            settings: Arc::new(settings),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ListenAddr {
    Tcp(SocketAddr),
    Unix(PathBuf),
}

impl std::fmt::Display for ListenAddr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Tcp(a) => write!(f, "tcp://{a}"),
            Self::Unix(p) => write!(f, "unix://{}", p.display()),
        }
    }
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
    Conjur(ConjurProviderConfig),
    Kubernetes(KubernetesProviderConfig),
    Aws(AwsProviderConfig),
    Vault(VaultProviderConfig),
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
            Self::Conjur(_) => "conjur",
            Self::Kubernetes(_) => "kubernetes",
            Self::Aws(_) => "aws",
            Self::Vault(_) => "vault",
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
    /// Client certificate chain and its key (PEM files, `certFile`/`keyFile`): mutual
    /// TLS to the secret server. Both or neither.
    pub client_cert: Option<(PathBuf, PathBuf)>,
    /// Per-request timeout.
    pub timeout: Duration,
}

/// A `vault` provider instance (HashiCorp Vault). Keys left out fall back, when the
/// provider is built, to the Vault CLI's environment variables (`VAULT_ADDR`,
/// `VAULT_TOKEN`, `VAULT_NAMESPACE`, `VAULT_CACERT`); see docs/stores/vault.md.
#[derive(Debug, Clone, Default)]
pub struct VaultProviderConfig {
    /// `address`: the server's base URL (`https://vault.internal:8200`).
    pub address: Option<String>,
    /// `token` (auth method `token`).
    pub token: Option<Secret>,
    /// `tokenFile`: a file holding the token, read at start and again when Vault
    /// refuses the token (a Vault Agent sink rewrites it).
    pub token_file: Option<PathBuf>,
    /// `namespace`: sent as `X-Vault-Namespace` (Vault Enterprise, HCP Vault).
    pub namespace: Option<String>,
    /// `caFile`: extra CA certificate(s), PEM, trusted besides the system roots.
    pub ca_file: Option<PathBuf>,
    /// `auth`: how the broker logs in.
    pub auth: VaultAuthConfig,
    /// `timeout`: bound of one request to Vault.
    pub timeout: Option<Duration>,
    /// `revokeOnShutdown`: revoke the leases taken (dynamic credentials) when the
    /// daemon stops.
    pub revoke_on_shutdown: bool,
    /// Declared under `providers:`. False for the built-in `vault` instance, which
    /// exists in every configuration: its problems (no token in the environment) are
    /// reported when a credential uses it, not at start.
    pub declared: bool,
}

/// `auth:` of a `vault` instance.
#[derive(Debug, Clone, Default)]
pub enum VaultAuthConfig {
    /// A token: `token`, `tokenFile` or `VAULT_TOKEN`.
    #[default]
    Token,
    /// AppRole: `POST /v1/auth/<mount>/login {role_id, secret_id}`.
    AppRole {
        role_id: VaultValue,
        /// None: a role without `bind_secret_id`.
        secret_id: Option<VaultValue>,
        mount: String,
    },
    /// Kubernetes: `POST /v1/auth/<mount>/login {role, jwt}`, the service-account JWT
    /// read from `jwt_file` at each login.
    Kubernetes {
        role: String,
        jwt_file: PathBuf,
        mount: String,
    },
}

/// A login secret given inline or as a file read at each login.
#[derive(Debug, Clone)]
pub enum VaultValue {
    Inline(Secret),
    File(PathBuf),
}

/// Default mount of the AppRole auth method.
pub const DEFAULT_VAULT_APPROLE_MOUNT: &str = "approle";
/// Default mount of the Kubernetes auth method.
pub const DEFAULT_VAULT_KUBERNETES_MOUNT: &str = "kubernetes";
/// Where Kubernetes mounts a pod's service-account token.
pub const DEFAULT_VAULT_JWT_FILE: &str = "/var/run/secrets/kubernetes.io/serviceaccount/token";

/// A `conjur` instance: what the `providers:` block says. Unset keys are read from the
/// environment (`CONJUR_*`, as Secretless and conjur-api-go read them) when the provider
/// is built; see `secrets::conjur` and docs/stores/conjur.md.
#[derive(Debug, Clone, Default)]
pub struct ConjurProviderConfig {
    /// `applianceUrl` (`CONJUR_APPLIANCE_URL`).
    pub appliance_url: Option<String>,
    /// `account` (`CONJUR_ACCOUNT`).
    pub account: Option<String>,
    /// `login` (`CONJUR_AUTHN_LOGIN`): `host/app/x` or a user name.
    pub login: Option<String>,
    /// `apiKey` (`CONJUR_AUTHN_API_KEY`).
    pub api_key: Option<Secret>,
    /// `apiKeyFile`: a file holding the API key, read at each authentication.
    pub api_key_file: Option<PathBuf>,
    /// `tokenFile` (`CONJUR_AUTHN_TOKEN_FILE`): an access token a sidecar keeps fresh.
    pub token_file: Option<PathBuf>,
    /// `caFile` (`CONJUR_CERT_FILE`; `CONJUR_SSL_CERTIFICATE` holds the PEM itself).
    pub ca_file: Option<PathBuf>,
    /// `authnUrl` (`CONJUR_AUTHN_URL`).
    pub authn_url: Option<String>,
    /// `timeout`: per request (`CONJUR_HTTP_TIMEOUT` seconds; default 10 s).
    pub timeout: Option<Duration>,
    /// The built-in instance `conjur`, not declared in `providers:`: configured from the
    /// environment alone, and a missing setting is an error at fetch time, not at start.
    pub builtin: bool,
}

/// A `kubernetes` instance: Secrets of the pod's namespace through the API server. Unset
/// keys come from the in-cluster environment (`KUBERNETES_SERVICE_HOST`/`_PORT`, the
/// service account's files); see `secrets::kubernetes` and docs/stores/kubernetes.md.
#[derive(Debug, Clone, Default)]
pub struct KubernetesProviderConfig {
    /// `apiServer`: `https://HOST:PORT` (default from `KUBERNETES_SERVICE_HOST`/`_PORT`).
    pub api_server: Option<String>,
    /// `tokenFile`: the service account token, re-read when it changes.
    pub token_file: Option<PathBuf>,
    /// `caFile`: the API server's CA.
    pub ca_file: Option<PathBuf>,
    /// `namespace` (default: `POD_NAMESPACE`, then the service account's namespace file).
    pub namespace: Option<String>,
    /// `timeout`: per request (default 10 s).
    pub timeout: Option<Duration>,
    /// The built-in instance `kubernetes`, not declared in `providers:`: a missing
    /// setting is an error at fetch time, not at start.
    pub builtin: bool,
}

/// An `aws` instance (AWS Secrets Manager). Everything is optional: credentials and
/// region come from the standard AWS chain when not set here.
#[derive(Debug, Clone, Default)]
pub struct AwsProviderConfig {
    /// `region` (else `AWS_REGION`, `AWS_DEFAULT_REGION`, the profile's `region`).
    pub region: Option<String>,
    /// `endpoint`: the Secrets Manager URL (a VPC endpoint, a test server); else
    /// `AWS_ENDPOINT_URL_SECRETS_MANAGER`, `AWS_ENDPOINT_URL`, the public endpoint.
    pub endpoint: Option<String>,
    /// `profile` of the shared files (else `AWS_PROFILE`, `default`).
    pub profile: Option<String>,
    /// `accessKeyId` / `secretAccessKey` / `sessionToken`: fixed keys (discouraged),
    /// used instead of the chain. The first two together, the token only with them.
    pub access_key_id: Option<String>,
    pub secret_access_key: Option<Secret>,
    pub session_token: Option<Secret>,
    /// Per-request timeout (Secrets Manager, STS, the container endpoint).
    pub timeout: Duration,
}

/// An entry of a Secretless-style `authentication:` list.
#[derive(Debug, Clone)]
pub enum AuthMethod {
    OAuth2(OAuth2Config),
}

/// An `authentication: [{type: oauth2, config: {...}}]` entry: OAuth2 client credentials
/// (RFC 6749 4.4).
#[derive(Debug, Clone)]
pub struct OAuth2Config {
    pub token_url: String,
    pub client_id: String,
    pub client_secret: Secret,
    pub scope: Option<String>,
    /// `audience` (Auth0, Okta and others).
    pub audience: Option<String>,
    /// How the client authenticates to the token endpoint (`client_auth`).
    pub client_auth: OAuth2ClientAuth,
    /// More token request parameters (`params`), in file order.
    pub params: Vec<(String, String)>,
    /// Lifetime of a token whose reply has no `expires_in` (`default_lifetime`; `None`:
    /// the token source's default).
    pub default_lifetime: Option<Duration>,
    /// Bound of one token fetch (`timeout`; `None`: the token source's default).
    pub timeout: Option<Duration>,
}

/// `client_auth` (RFC 6749 2.3.1).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum OAuth2ClientAuth {
    /// `basic`: HTTP Basic over the form-urlencoded id and secret.
    #[default]
    Basic,
    /// `body`: `client_id` and `client_secret` parameters in the request body.
    Body,
}
