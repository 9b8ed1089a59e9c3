//! Opening upstream connections: one [`Dialer`] (sockets carrying the bypass mark, so the
//! kernel programs never redirect the broker's own connections; a connect deadline) and
//! one [`HostPort`] type for every upstream address a connector works out.

use std::{fmt, net::SocketAddr, time::Duration};

use tokio::net::{TcpSocket, TcpStream};

use crate::connector::ConnError;

/// How long an upstream TCP connect may take (per resolved address).
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// An upstream host (name or IP literal) and port, as configured or worked out.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct HostPort {
    pub host: String,
    pub port: u16,
}

impl HostPort {
    #[must_use]
    pub fn new(host: impl Into<String>, port: u16) -> Self {
        Self {
            host: host.into(),
            port,
        }
    }
}

impl From<SocketAddr> for HostPort {
    fn from(a: SocketAddr) -> Self {
        Self::new(a.ip().to_string(), a.port())
    }
}

/// `host:port`, with an IPv6 literal in brackets.
impl fmt::Display for HostPort {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.host.contains(':') {
            write!(f, "[{}]:{}", self.host, self.port)
        } else {
            write!(f, "{}:{}", self.host, self.port)
        }
    }
}

/// The broker's socket factory for upstream connections.
#[derive(Debug, Clone, Copy)]
pub struct Dialer {
    /// `SO_MARK` for every upstream socket (`broker.bypassMark`; 0: none).
    pub mark: u32,
}

impl Dialer {
    /// Connect to `to` (each resolved address in turn, [`CONNECT_TIMEOUT`] each).
    ///
    /// # Errors
    /// `ConnError::Upstream` naming `host:port`.
    pub async fn dial(&self, to: &HostPort) -> Result<TcpStream, ConnError> {
        let fail = |source: std::io::Error| ConnError::Upstream {
            addr: to.to_string(),
            source,
        };
        let addrs: Vec<SocketAddr> = tokio::net::lookup_host((to.host.as_str(), to.port))
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
        if self.mark != 0 {
            // SO_MARK needs CAP_NET_ADMIN; without it (--no-ebpf as a user) there is
            // nothing to bypass anyway.
            if let Err(e) = socket2::SockRef::from(&sock).set_mark(self.mark)
                && e.raw_os_error() != Some(libc::EPERM)
            {
                return Err(e);
            }
        }
        sock.set_nodelay(true)?;
        sock.connect(addr).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_port_brackets_ipv6_literals() {
        assert_eq!(HostPort::new("db", 5432).to_string(), "db:5432");
        assert_eq!(HostPort::new("::1", 5432).to_string(), "[::1]:5432");
        assert_eq!(
            HostPort::from("[::1]:80".parse::<SocketAddr>().unwrap()).to_string(),
            "[::1]:80"
        );
    }
}
