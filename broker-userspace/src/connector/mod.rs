//! Connectors: what the broker does with one accepted client connection.
//!
//! The proxy layer accepts a connection, works out the service, the caller and the
//! original destination, and hands a [`Conn`] to the service's connector. A connector
//! fetches credentials through [`crate::broker::Broker`], authenticates to the upstream
//! and relays bytes, filling in [`ConnStats`] for the access log as it goes.

pub mod pg;
pub mod splice;
pub mod tcp;

use std::{net::SocketAddr, sync::Arc};

pub use crate::secrets::Credentials;
use crate::{config::Service, secrets::CredentialError};

/// Who is on the other end of an intercepted connection, as the kernel recorded it at
/// `connect()` time.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Caller {
    pub pid: u32,
    pub uid: u32,
    pub gid: u32,
    pub cgroup_id: u64,
    pub comm: String,
}

/// One brokered client connection.
#[derive(Debug)]
pub struct Conn {
    pub service: Arc<Service>,
    /// The client's address as the broker's listener saw it.
    pub client_addr: SocketAddr,
    /// The caller's identity (transparent connections only).
    pub caller: Option<Caller>,
    /// Where the client meant to connect (transparent connections only).
    pub orig_dst: Option<SocketAddr>,
    /// The app's socket is in the kernel's splice map: the connector may hand the
    /// session to the kernel once it is authenticated.
    pub splice: Option<SpliceTicket>,
    /// Filled in by the connector for the access log.
    pub stats: ConnStats,
}

/// What a connector needs to splice a session: the splice maps and the app socket's
/// cookie (its key in every splice map; its bytes read are counted under it).
#[derive(Debug, Clone)]
pub struct SpliceTicket {
    pub splicer: Arc<crate::ebpf::Splicer>,
    pub app_cookie: u64,
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
    /// Directions of a spliced session that the kernel handed back to the userspace
    /// relay mid-session: "" (none), "down" (the app fell behind), "up" (the upstream's
    /// send buffer filled), "both".
    pub splice_fallback: &'static str,
    /// Credential fetches: `name <- provider:id` (never values).
    pub fetched: Vec<String>,
}

/// Close a client connection without a reset: send FIN, then read and discard what the
/// client already sent (bounded in bytes and time) before the socket is closed. Closing
/// with unread data would make the kernel answer with RST, which clients report as
/// "connection reset" instead of a clean end.
pub async fn close_gracefully(mut client: tokio::net::TcpStream) {
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
    #[error("protocol error: {0}")]
    Protocol(String),
    #[error("configuration: {0}")]
    Config(String),
    #[error("i/o: {0}")]
    Io(#[from] std::io::Error),
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
