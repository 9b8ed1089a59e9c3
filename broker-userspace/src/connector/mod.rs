//! Connectors: the protocol-specific part of one brokered connection.
//!
//! The core ([`crate::proxy`]) accepts a connection, works out the service, the caller
//! and the original destination, and hands the client socket to the service's
//! [`Connector`] with a [`Conn`] and the shared [`Env`] (credentials, the dialer). The
//! connector authenticates to the upstream (and, where the protocol has one, does the
//! client leg) and hands back a [`Handoff`]: either an authenticated [`Session`], whose
//! bytes the core then moves (relayed in userspace, or spliced in the kernel when the
//! connector says no client byte can be in flight), or "done" when it ran the whole
//! exchange itself. Connectors are leaves: they never reach into the core.
//!
//! Adding a connector: a module here declaring its [`Kind`] (names, credentials, how its
//! `config:` block parses, how it is built) with a type implementing [`Connector`], and
//! one line in [`KINDS`] (see docs/ARCHITECTURE.md, "Adding a connector").

pub mod app_socket;
pub mod db_tls;
pub mod deny;
pub mod dial;
pub mod http;
pub mod mysql;
pub mod pg;
pub mod target;
pub mod tcp;

use std::{
    any::Any,
    fmt,
    future::Future,
    net::SocketAddr,
    path::{Path, PathBuf},
    pin::Pin,
    sync::Arc,
};

use tokio::{
    io::{AsyncRead, AsyncWrite},
    net::TcpStream,
};

pub use self::app_socket::AppSocket;
pub use crate::secrets::{Credentials, Requester};
use crate::{
    config::{ConnectorKind, ConnectorKinds, ConnectorSpec, Service},
    connector::dial::Dialer,
    secrets::{CredentialError, SecretStore},
};

/// A boxed, sendable future (the connector trait's methods return one, so connectors can
/// be kept as `dyn Connector`).
pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// How long [`Connector::deny`] may take (reading the client's first message, writing
/// the error, closing).
pub const DENY_DEADLINE: std::time::Duration = std::time::Duration::from_secs(5);

/// A connection the policy refused, as the client is told: the service, the rule that
/// decided (a configured rule's name, or `schedule`, `rateLimit`, `revoked #N`, `no
/// allow rule`), and why in a few words. No secret, no value from the caller.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Denial {
    pub service: String,
    pub rule: String,
    pub reason: String,
}

impl Denial {
    /// One line for the client: `service "db": denied by policy (rule "ops-only": ...)`.
    #[must_use]
    pub fn message(&self) -> String {
        format!(
            "service \"{}\": denied by policy (rule \"{}\": {})",
            self.service, self.rule, self.reason
        )
    }
}

/// What every connector may use: the secret store and the upstream socket factory.
#[derive(Clone)]
pub struct Env {
    pub secrets: Arc<SecretStore>,
    pub dialer: Dialer,
    /// The broker's local CA, when a service presents certificates to apps
    /// ([`Connector::uses_ca`]).
    pub ca: Option<Arc<crate::ca::LocalCa>>,
}

impl std::fmt::Debug for Env {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Env")
            .field("dialer", &self.dialer)
            .field("ca", &self.ca.is_some())
            .finish_non_exhaustive()
    }
}

impl Env {
    /// Every credential of the requester's service (from the cache, or fetched once for
    /// all the connections that want it at the same time). With `fresh`, the cache is
    /// bypassed and refreshed: after the upstream rejected cached credentials
    /// (rotation). The fetches (`name<-provider:id`, never values) are noted in
    /// `stats`; the requester's identity goes to the audit event of each fetch. Call
    /// it as `env.credentials(Requester::new(service, conn.caller.as_ref()), fresh,
    /// &mut conn.stats)`.
    ///
    /// # Errors
    /// `ConnError::Credentials` naming the credential and the provider, never a value.
    pub async fn credentials(
        &self,
        who: Requester<'_>,
        fresh: bool,
        stats: &mut ConnStats,
    ) -> Result<Credentials, ConnError> {
        Ok(self
            .secrets
            .credentials(who, fresh, &mut stats.fetched)
            .await?)
    }
}

/// One protocol. An instance serves one service and owns that service's shared state
/// (caches, TLS configurations, cancel keys...).
pub trait Connector: Send + Sync + fmt::Debug {
    /// Serve one accepted client connection up to the point where only bytes remain.
    /// On failure the connector has already told the client what the protocol allows
    /// (e.g. a PostgreSQL ErrorResponse) and closed it without a reset.
    fn serve<'a>(
        &'a self,
        env: &'a Env,
        conn: &'a mut Conn,
        client: AppSocket,
    ) -> BoxFuture<'a, Result<Handoff, ConnError>>;

    /// What to write to a client refused before [`Connector::serve`] (a connection cap is
    /// reached), when the protocol has an error the server may send first. Sent with one
    /// non-blocking write, then the socket is closed.
    fn refusal(&self, _service: &str, _reason: &str) -> Option<Vec<u8>> {
        None
    }

    /// Tell a client the policy denied, in the protocol's own words (PostgreSQL:
    /// ErrorResponse `28000` after its startup packet; MySQL: ERR 1045 in place of the
    /// greeting; HTTP: `403` with a JSON body), naming the rule, then close without a
    /// reset. Called before [`Connector::serve`], instead of it; the caller bounds it in
    /// time ([`DENY_DEADLINE`]). Never dials the upstream, never reads a credential. The
    /// default closes without a byte.
    fn deny<'a>(&'a self, client: AppSocket, denial: &'a Denial) -> BoxFuture<'a, ()> {
        let _ = denial;
        Box::pin(async move { drop(client) })
    }

    /// Whether the protocol's sessions may be spliced in the kernel once authenticated
    /// (its [`Session`]s can have [`Session::client_waits`]). The kernel then puts the
    /// app sockets of this service's connections in the splice map as they connect.
    fn splices(&self) -> bool {
        false
    }

    /// Whether the connector presents certificates from the broker's local CA to apps
    /// (e.g. PostgreSQL `clientTLS`): the daemon then loads (or creates) the CA at start.
    fn uses_ca(&self) -> bool {
        false
    }

    /// Whether the connector still serves, with less, when the local CA cannot be
    /// loaded or created (an unprivileged daemon and the default `caDir`): an HTTP proxy
    /// on `listenOn` then relays `CONNECT` tunnels without decrypting them, as
    /// Secretless does. Only asked when [`Connector::uses_ca`] holds.
    fn ca_optional(&self) -> bool {
        false
    }
    /// Give the instance the daemon's metrics, for what it counts itself (OAuth2 token
    /// requests). Called once per instance, before its first connection. The default
    /// counts nothing.
    fn observe(&self, _metrics: &Arc<crate::metrics::Metrics>) {}
}

/// What a connector hands back to the core.
pub enum Handoff {
    /// Authenticated: the core delivers the pending bytes, then moves the session's
    /// bytes until both sides are done.
    Relay(Session),
    /// The connector ran the whole exchange (e.g. a PostgreSQL CancelRequest).
    Done,
}

/// An authenticated session, ready for the byte phase.
pub struct Session {
    pub client: ClientStream,
    pub upstream: UpstreamStream,
    /// Bytes the client must still receive, before anything else (e.g. PostgreSQL's
    /// AuthenticationOk .. ReadyForQuery).
    pub to_client: Vec<u8>,
    /// Bytes the upstream must still receive, before anything else (client bytes the
    /// connector read ahead).
    pub to_upstream: Vec<u8>,
    /// The protocol guarantees the client sends nothing until it has received
    /// `to_client` (PostgreSQL before ReadyForQuery). Only then may the core splice the
    /// session in the kernel: with nothing in flight, every later client byte takes the
    /// kernel path, in order.
    pub client_waits: bool,
    /// Kept alive until the session ends (e.g. the cancel-key registration).
    pub keep: Option<Box<dyn Any + Send>>,
    /// Sees every byte the client sends during the byte phase, for protocols with
    /// commands the broker must not let through as the app wrote them (MySQL
    /// `COM_CHANGE_USER`, which carries the app's dummy credentials). `None`: bytes
    /// pass untouched.
    pub upload_filter: Option<Box<dyn UploadFilter>>,
}

/// A watch on the client's bytes of a session's byte phase (see
/// [`Session::upload_filter`]). It is fed everything the client sends, in order, from
/// the first byte after the handshake, whichever path carries it (relay, or the daemon
/// once the kernel hands the upload back).
pub trait UploadFilter: Send {
    /// The client sent `data`: append what goes on to the upstream to `up` and what the
    /// client must receive now (an error in place of a refused command) to `reply`.
    fn feed(&mut self, data: &[u8], up: &mut Vec<u8>, reply: &mut Vec<u8>);

    /// The kernel carried the client's bytes so far and hands the upload back with
    /// `left` bytes of the current message still to come (0: at a message boundary).
    fn resume(&mut self, _left: u32) {}

    /// How much of a spliced session's upload the kernel may carry.
    fn kernel_upload(&self) -> KernelUpload {
        KernelUpload::None
    }
}

/// What the kernel can do for an [`UploadFilter`] when the session is spliced.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KernelUpload {
    /// Nothing: the daemon takes every client byte (the kernel carries the download).
    None,
    /// Frame the client's sends as MySQL packets and hand the upload to the daemon at
    /// the first `COM_CHANGE_USER`.
    MysqlCommands,
}

impl Session {
    /// A byte-transparent session: nothing owed either way, and a client that may send
    /// at any time (so never spliced).
    #[must_use]
    pub fn transparent(client: AppSocket, upstream: UpstreamStream) -> Self {
        Self {
            client: ClientStream::Plain(client),
            upstream,
            to_client: Vec::new(),
            to_upstream: Vec::new(),
            client_waits: false,
            keep: None,
            upload_filter: None,
        }
    }
}

/// The client side of a [`Session`].
pub enum ClientStream {
    /// The app's socket: the readiness-based relay, or (TCP only) the kernel splice.
    Plain(AppSocket),
    /// TLS the broker terminated (PostgreSQL `clientTLS`): the generic relay, never
    /// spliced.
    Tls(Box<dyn AsyncStream>),
}

/// The upstream side of a [`Session`].
pub enum UpstreamStream {
    /// Plain TCP: the readiness-based relay, or the kernel splice.
    Plain(TcpStream),
    /// Anything else (TLS): the generic relay.
    Other(Box<dyn AsyncStream>),
}

/// A bidirectional byte stream the generic relay can move.
pub trait AsyncStream: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> AsyncStream for T {}

/// A connector kind that is configured but not built yet: every connection is refused
/// with an error naming it (`broker check` and `run` report such services at start).
#[derive(Debug)]
struct NotBuilt(String);

impl Connector for NotBuilt {
    fn serve<'a>(
        &'a self,
        _env: &'a Env,
        _conn: &'a mut Conn,
        _client: AppSocket,
    ) -> BoxFuture<'a, Result<Handoff, ConnError>> {
        Box::pin(async move {
            Err(ConnError::Config(format!(
                "connector `{}` is not built yet",
                self.0
            )))
        })
    }
}

/// Close a client connection without a reset: send FIN, then read and discard what the
/// client already sent (bounded in bytes and time) before the socket is closed. Closing
/// with unread data would make the kernel answer with RST, which clients report as
/// "connection reset" instead of a clean end.
pub async fn close_gracefully(mut client: AppSocket) {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let _ = client.shutdown().await;
    let mut buf = [0u8; 4096];
    let mut left = 256 * 1024usize;
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(2);
    while left > 0 {
        match tokio::time::timeout_at(deadline, client.read(&mut buf)).await {
            Ok(Ok(n)) if n > 0 => left = left.saturating_sub(n),
            _ => break,
        }
    }
}

/// How a kind builds its instance for one service.
pub type BuildFn = fn(&Service) -> anyhow::Result<Arc<dyn Connector>>;

/// A connector kind: how the configuration names and parses it, and how it is built.
pub type Kind = ConnectorKind<BuildFn>;

/// The registry: every connector kind, one line each; and the names that are known
/// (Secretless' and ours) but not built yet.
pub static KINDS: ConnectorKinds<BuildFn> = ConnectorKinds {
    built: &[
        tcp::KIND,
        pg::KIND,
        mysql::KIND,
        http::GENERIC_KIND,
        http::BASIC_KIND,
        http::AWS_KIND,
        http::CONJUR_KIND,
    ],
    not_built: &["mssql", "ssh", "ssh-agent"],
};

/// The connector instance for a service.
///
/// # Errors
/// When the instance cannot be built from its configuration (e.g. an unreadable CA
/// file); the message names the service.
pub fn build(service: &Service) -> anyhow::Result<Arc<dyn Connector>> {
    match &service.connector {
        ConnectorSpec::Built { kind, .. } => {
            let k = KINDS
                .find(kind)
                .ok_or_else(|| anyhow::anyhow!("connector kind `{kind}` is not registered"))?;
            (k.build)(service)
        }
        ConnectorSpec::NotBuilt { name } => Ok(Arc::new(NotBuilt(name.clone()))),
    }
}

/// The one connector of HTTP services that share a `listenOn` address (each request
/// goes to the first service whose `authenticateURLsMatching` matches its URL).
///
/// # Errors
/// A member that cannot share (not HTTP, no `authenticateURLsMatching`, a reverse-proxy
/// `upstream`), or one that cannot be built.
pub fn build_shared(services: &[Arc<Service>]) -> anyhow::Result<Arc<dyn Connector>> {
    check_shared(services)?;
    Ok(Arc::new(http::serve::HttpConnector::shared(services)?))
}

/// What [`build_shared`] checks before building anything (for `broker check`).
///
/// # Errors
/// As [`build_shared`], but for files it does not read.
pub fn check_shared(services: &[Arc<Service>]) -> anyhow::Result<()> {
    for s in services {
        let shares = match &s.connector {
            ConnectorSpec::Built { kind, .. } => {
                KINDS.find(kind).is_some_and(|k| k.syntax.shares_listener)
            }
            ConnectorSpec::NotBuilt { .. } => false,
        };
        if !shares {
            anyhow::bail!(
                "service `{}`: connector `{}` cannot share a listenOn address",
                s.name,
                s.connector.name()
            );
        }
    }
    http::serve::check_shared(services)
}

/// The settings of `service`'s connector as a `T` (what its kind's parser produced).
///
/// # Errors
/// When the service is of another kind (a registry mistake).
pub fn settings<T: crate::config::ConnectorSettings>(service: &Service) -> anyhow::Result<&T> {
    service.connector.settings::<T>().ok_or_else(|| {
        anyhow::anyhow!(
            "service `{}`: connector `{}` has settings of another kind",
            service.name,
            service.connector.name()
        )
    })
}

/// Who is on the other end of a connection: for an intercepted connection, as the kernel
/// recorded it at `connect()` time; for a `listenOn: unix://` client, its `SO_PEERCRED`
/// (the credentials it connected with) and what `/proc` says about that pid at accept
/// time.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Caller {
    pub pid: u32,
    pub uid: u32,
    pub gid: u32,
    pub cgroup_id: u64,
    /// The cgroup's path, relative to the cgroup2 mount as `/proc/PID/cgroup` gives it
    /// (`/system.slice/app.service`); `None` when it cannot be found (the cgroup is gone,
    /// or outside the broker's cgroup namespace).
    pub cgroup: Option<PathBuf>,
    /// The process's executable (`/proc/PID/exe` at accept time: ` (deleted)` appended
    /// when the file was replaced since it started); `None` when the process is gone,
    /// was not the caller (see `proxy::caller`), or the link cannot be read (another
    /// user's process without `CAP_SYS_PTRACE`).
    pub exe: Option<PathBuf>,
    /// The process's command name (its main thread's, from `/proc/PID/comm` at accept
    /// time; the connecting thread's when the process is already gone).
    pub comm: String,
    /// The name of the thread that called `connect()` (the kernel's `comm`); empty for
    /// a Unix socket client (`SO_PEERCRED` names the process, not the thread).
    pub thread: String,
}

/// Where a client connection came from, as the broker's listener saw it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ClientAddr {
    /// The client's TCP address.
    Tcp(SocketAddr),
    /// A client of a `listenOn: unix://` socket, whose own address is normally unnamed:
    /// the socket's path. (Its identity is in [`Conn::caller`], from `SO_PEERCRED`.)
    Unix(Arc<Path>),
}

impl ClientAddr {
    /// The client's TCP address, if it is a TCP client.
    #[must_use]
    pub fn tcp(&self) -> Option<SocketAddr> {
        match self {
            Self::Tcp(a) => Some(*a),
            Self::Unix(_) => None,
        }
    }
}

impl From<SocketAddr> for ClientAddr {
    fn from(a: SocketAddr) -> Self {
        Self::Tcp(a)
    }
}

impl fmt::Display for ClientAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Tcp(a) => write!(f, "{a}"),
            Self::Unix(p) => write!(f, "unix:{}", p.display()),
        }
    }
}

/// One brokered client connection.
#[derive(Debug)]
pub struct Conn {
    pub service: Arc<Service>,
    /// The client's address as the broker's listener saw it.
    pub client_addr: ClientAddr,
    /// The caller's identity (transparent connections and Unix socket clients).
    pub caller: Option<Caller>,
    /// Where the client meant to connect (transparent connections only).
    pub orig_dst: Option<SocketAddr>,
    /// The `intercept:` hostname `orig_dst` stands for, when the service intercepts by
    /// name (what the app dialled; see [`crate::resolver::HostNames`]).
    pub orig_host: Option<String>,
    /// The policy rule that admitted the caller (its service's `allow` rule), if any: a
    /// reused PostgreSQL session never crosses rules.
    pub admitted_by: Option<String>,
    /// Filled in by the connector (and the core) for the access log.
    pub stats: ConnStats,
}

/// Per-connection facts for the access-log line.
#[derive(Debug, Default)]
pub struct ConnStats {
    /// `host:port` actually dialed.
    pub upstream: Option<String>,
    /// Bytes client -> upstream and upstream -> client.
    pub bytes_up: u64,
    pub bytes_down: u64,
    /// The session's bytes went through the kernel splice, not the userspace relay.
    pub spliced: bool,
    /// The client leg was TLS the broker terminated.
    pub client_tls: bool,
    /// Directions of a spliced session that the kernel handed back to the userspace
    /// relay mid-session: "" (none), "down" (the app fell behind), "up" (the upstream's
    /// send buffer filled), "both".
    pub splice_fallback: &'static str,
    /// What the connection was for, when not an ordinary session (PostgreSQL: `cancel`).
    pub request: Option<&'static str>,
    /// Credential fetches: `name <- provider:id` (never values).
    pub fetched: Vec<String>,
    /// The service's metric handles (set by the core; counted when the record drops).
    pub metrics: Option<Arc<crate::metrics::ServiceMetrics>>,
    /// The connection's entry in the live-connection registry (`broker status`), which
    /// the byte phase keeps current.
    pub live: Option<Arc<crate::drain::LiveConn>>,
}

/// Why a brokered connection failed. Never carries a secret value.
#[derive(Debug, thiserror::Error)]
pub enum ConnError {
    /// Boxed: the connection's error travels in every `Result` of the data path.
    #[error("fetching credentials failed: {0}")]
    Credentials(#[source] Box<CredentialError>),
    #[error("upstream {addr} unreachable: {source}")]
    Upstream {
        addr: String,
        #[source]
        source: std::io::Error,
    },
    #[error("upstream TLS with {addr} failed: {reason}")]
    Tls { addr: String, reason: String },
    #[error("upstream rejected the credentials: {0}")]
    AuthRejected(String),
    /// The upstream ended the session for another reason than the credentials (e.g.
    /// PostgreSQL FATAL 3D000: the database does not exist; 53300: too many
    /// connections). The message carries the server's code and text.
    #[error("upstream refused the session: {0}")]
    Refused(String),
    #[error("protocol error: {0}")]
    Protocol(String),
    /// The client closed before asking for anything (a driver's probe; a client that
    /// wanted something the service does not offer, e.g. TLS): routine, logged at debug.
    #[error("client closed the connection: {0}")]
    ClientGone(String),
    #[error("configuration: {0}")]
    Config(String),
    #[error("i/o: {0}")]
    Io(#[from] std::io::Error),
}

impl From<crate::secrets::credentials::NotText> for ConnError {
    fn from(e: crate::secrets::credentials::NotText) -> Self {
        Self::Config(e.to_string())
    }
}

impl From<CredentialError> for ConnError {
    fn from(e: CredentialError) -> Self {
        Self::Credentials(Box::new(e))
    }
}

impl ConnError {
    /// Short result word for the access log.
    #[must_use]
    pub fn kind(&self) -> &'static str {
        match self {
            Self::Credentials(_) => "credentials_error",
            Self::Upstream { .. } => "upstream_unreachable",
            Self::Tls { .. } => "upstream_tls_error",
            Self::AuthRejected(_) => "auth_rejected",
            Self::Refused(_) => "upstream_refused",
            Self::ClientGone(_) => "client_closed",
            Self::Protocol(_) => "protocol_error",
            Self::Config(_) => "config_error",
            Self::Io(_) => "io_error",
        }
    }

    /// A finer word for the access log beside [`Self::kind`], when there is one: for
    /// `credentials_error`, why the secret store failed ([`crate::secrets::SecretError::kind`]:
    /// `not_found`, `unreachable`, `denied`, `bad_reply`, `timeout`, ...).
    #[must_use]
    pub fn detail(&self) -> Option<&'static str> {
        match self {
            Self::Credentials(e) => Some(e.kind()),
            _ => None,
        }
    }
}
