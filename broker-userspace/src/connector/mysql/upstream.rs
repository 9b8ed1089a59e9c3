//! The upstream leg: where to connect (credentials, original destination), the server's
//! greeting, `sslmode` (Secretless' values: TLS after an SSLRequest), and the
//! authentication exchange ([`super::auth`]) driven over the connection.

use std::{
    fmt,
    pin::Pin,
    task::{Context, Poll},
};

use bytes::BytesMut;
use tokio::{
    io::{AsyncRead, AsyncWrite, AsyncWriteExt as _, ReadBuf},
    net::TcpStream,
};

use super::{
    auth::{AuthError, ServerAuth, Step, Transport},
    errors::{Failure, ServerError, code},
    proto::{self, MAX_PACKET, ReadError, ServerGreeting, ServerHello},
};
use crate::{
    connector::{
        ConnError, Credentials,
        db_tls::{Pem, TlsConfigCache, TlsFiles},
        dial::{Dialer, HostPort},
        target::{self, AppDestination, Destinations, Fallbacks},
    },
    tls::Verify,
};

/// The MySQL port (TiDB's usual 4000 is named by the `port` credential or the
/// intercepted destination).
pub const DEFAULT_PORT: u16 = 3306;

/// Secretless' `sslmode` for MySQL.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SslMode {
    /// Plain TCP.
    Disable,
    /// TLS, the server's certificate not verified unless `sslrootcert` is set (then as
    /// `verify-ca`). The default, also for an empty value; a server without TLS is
    /// refused.
    Require,
    /// TLS, the certificate chain verified against `sslrootcert` (or the system roots).
    VerifyCa,
    /// As `verify-ca`, and the certificate names the host (`sslhost` if set).
    VerifyFull,
}

impl SslMode {
    /// Parse a credential value.
    ///
    /// # Errors
    /// An unknown mode; the value is not quoted (a credential read from the wrong
    /// secret would be echoed to the client and the logs).
    pub fn parse(s: &str) -> Result<Self, ConnError> {
        Ok(match s.trim() {
            "disable" => Self::Disable,
            "require" | "" => Self::Require,
            "verify-ca" => Self::VerifyCa,
            "verify-full" => Self::VerifyFull,
            _ => {
                return Err(ConnError::Config(
                    "credential `sslmode` has an unsupported value (expected disable, \
                     require, verify-ca or verify-full)"
                        .into(),
                ));
            }
        })
    }
}

/// Where and how to reach the upstream, from one set of credentials.
#[derive(Debug, Clone)]
pub struct UpstreamParams {
    pub to: HostPort,
    /// The name the server certificate must carry (`verify-full`) unless `sslhost`
    /// names another ([`target::Target::name`]).
    pub name: String,
    /// Credential `database`: replaces the client's.
    pub database: Option<String>,
    pub sslmode: SslMode,
    pub sslrootcert: Option<Pem>,
    pub sslcert: Option<Pem>,
    pub sslkey: Option<Pem>,
    pub sslhost: Option<String>,
}

impl UpstreamParams {
    /// host = credential `host`, else the app's original destination (when `dests`
    /// allows it); port = credential `port`, else the original destination's, else
    /// 3306. See [`target::resolve`].
    ///
    /// # Errors
    /// When no upstream can be determined or a credential is malformed (named, never
    /// quoted).
    pub fn from_credentials(
        creds: &Credentials,
        app: AppDestination<'_>,
        dests: Destinations<'_>,
    ) -> Result<Self, ConnError> {
        let target = target::resolve(
            creds,
            app,
            Fallbacks {
                default_port: Some(DEFAULT_PORT),
                ..Fallbacks::default()
            },
            dests,
        )?;
        let database = creds
            .text("database")?
            .filter(|d| !d.is_empty())
            .map(str::to_owned);
        let sslmode = match creds.text("sslmode")? {
            Some(m) => SslMode::parse(m)?,
            None => SslMode::Require,
        };
        let sslhost = creds
            .text("sslhost")?
            .map(str::trim)
            .filter(|s| !s.is_empty())
            .map(str::to_owned);
        let sslcert = Pem::from_credential(creds, "sslcert")?;
        let sslkey = Pem::from_credential(creds, "sslkey")?;
        if sslcert.is_some() != sslkey.is_some() {
            return Err(ConnError::Config(
                "credentials `sslcert` and `sslkey` must be set together".into(),
            ));
        }
        Ok(Self {
            to: target.to,
            name: target.name,
            database,
            sslmode,
            sslrootcert: Pem::from_credential(creds, "sslrootcert")?,
            sslcert,
            sslkey,
            sslhost,
        })
    }

    /// How much of the server's certificate is checked: `require` with a root
    /// certificate behaves like `verify-ca` (as libpq, and Secretless with it).
    #[must_use]
    pub fn verify(&self) -> Verify {
        match self.sslmode {
            SslMode::VerifyFull => Verify::Full,
            SslMode::VerifyCa => Verify::CaOnly,
            _ if self.sslrootcert.is_some() => Verify::CaOnly,
            _ => Verify::None,
        }
    }

    fn tls_files(&self) -> TlsFiles<'_> {
        TlsFiles {
            verify: self.verify(),
            root: self.sslrootcert.as_ref(),
            cert: self.sslcert.as_ref(),
            key: self.sslkey.as_ref(),
        }
    }
}

/// The upstream connection: plain TCP or TLS.
pub enum MyStream {
    Plain(TcpStream),
    Tls(Box<tokio_rustls::client::TlsStream<TcpStream>>),
}

impl fmt::Debug for MyStream {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Plain(_) => "MyStream::Plain",
            Self::Tls(_) => "MyStream::Tls",
        })
    }
}

impl MyStream {
    #[must_use]
    pub fn is_tls(&self) -> bool {
        matches!(self, Self::Tls(_))
    }
}

impl AsyncRead for MyStream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            Self::Plain(s) => Pin::new(s).poll_read(cx, buf),
            Self::Tls(s) => match Pin::new(s.as_mut()).poll_read(cx, buf) {
                // MySQL and MariaDB servers close without a TLS close_notify (after
                // COM_QUIT, on KILL, at shutdown): the end of the stream, not an error. A
                // cut cannot pass for a whole reply: MySQL packets carry their length.
                Poll::Ready(Err(e)) if e.kind() == std::io::ErrorKind::UnexpectedEof => {
                    Poll::Ready(Ok(()))
                }
                other => other,
            },
        }
    }
}

impl AsyncWrite for MyStream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        match self.get_mut() {
            Self::Plain(s) => Pin::new(s).poll_write(cx, buf),
            Self::Tls(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            Self::Plain(s) => Pin::new(s).poll_flush(cx),
            Self::Tls(s) => Pin::new(s.as_mut()).poll_flush(cx),
        }
    }

    /// TLS: what TLS holds is flushed, then the TCP stream ends without a close_notify.
    /// MySQL servers neither send nor wait for one, and they close at `COM_QUIT`: a
    /// close_notify arriving after that is answered with a reset, which the relay would
    /// report as an error of a session that ended cleanly.
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            Self::Plain(s) => Pin::new(s).poll_shutdown(cx),
            Self::Tls(s) => {
                std::task::ready!(Pin::new(s.as_mut()).poll_flush(cx))?;
                Pin::new(&mut s.get_mut().0).poll_shutdown(cx)
            }
        }
    }
}

/// A connected server that has greeted.
#[derive(Debug)]
pub struct Opened {
    pub tcp: TcpStream,
    pub greeting: ServerGreeting,
}

/// A read error on the upstream, as a failure naming it.
fn read_failure(addr: &HostPort, e: ReadError) -> Failure {
    match e {
        ReadError::Io(source) => Failure::new(
            code::UPSTREAM_FAILED,
            ConnError::Upstream {
                addr: addr.to_string(),
                source,
            },
        ),
        ReadError::Closed => Failure::new(
            code::UPSTREAM_FAILED,
            ConnError::Upstream {
                addr: addr.to_string(),
                source: std::io::Error::new(
                    std::io::ErrorKind::UnexpectedEof,
                    "the server closed the connection during the handshake",
                ),
            },
        ),
        e @ ReadError::TooLarge(_) => Failure::new(
            code::UPSTREAM_FAILED,
            ConnError::Protocol(format!("upstream {addr}: {e}")),
        ),
    }
}

fn malformed(addr: &HostPort, what: impl fmt::Display) -> Failure {
    Failure::new(
        code::UPSTREAM_FAILED,
        ConnError::Protocol(format!("upstream {addr}: {what}")),
    )
}

/// Connect and read the server's greeting.
///
/// # Errors
/// Unreachable (1429), the server's own refusal (its ERR, e.g. 1040), not a MySQL
/// server or closed (1429).
pub async fn open(dialer: &Dialer, p: &UpstreamParams) -> Result<Opened, Failure> {
    let mut tcp = dialer.dial(&p.to).await?;
    let mut buf = BytesMut::with_capacity(256);
    let packet = proto::read_packet(&mut tcp, &mut buf, MAX_PACKET)
        .await
        .map_err(|e| read_failure(&p.to, e))?;
    if packet.seq != 0 {
        return Err(malformed(&p.to, "the greeting's sequence id is not 0"));
    }
    if !buf.is_empty() {
        // A server waits for the client after its greeting: nothing may follow it (and
        // nothing read here may be taken into a TLS stream).
        return Err(malformed(&p.to, "data after the greeting"));
    }
    match ServerGreeting::parse(&packet.payload) {
        Ok(ServerHello::Greeting(greeting)) => Ok(Opened { tcp, greeting }),
        Ok(ServerHello::Error(e)) => Err(Failure::server(&e)),
        Err(e) => Err(malformed(&p.to, e)),
    }
}

/// TLS per `sslmode`, after the SSLRequest `ssl_request` (sent with sequence id 1).
/// Returns the stream and the sequence id of the HandshakeResponse.
///
/// # Errors
/// A server without TLS when `sslmode` asks for it, TLS failures (1429); bad TLS
/// settings.
pub async fn secure(
    mut tcp: TcpStream,
    greeting: &ServerGreeting,
    p: &UpstreamParams,
    cache: &TlsConfigCache,
    ssl_request: &[u8],
) -> Result<(MyStream, u8), Failure> {
    use mysql_common::constants::CapabilityFlags as Caps;
    if p.sslmode == SslMode::Disable {
        return Ok((MyStream::Plain(tcp), 1));
    }
    let addr = p.to.to_string();
    let tls_err = |reason: String| {
        Failure::new(
            code::TLS,
            ConnError::Tls {
                addr: addr.clone(),
                reason,
            },
        )
    };
    if !greeting.caps.contains(Caps::CLIENT_SSL) {
        return Err(tls_err(format!(
            "the server does not offer TLS, and sslmode is {} (set credential `sslmode: \
             disable` for a server without TLS)",
            match p.sslmode {
                SslMode::VerifyCa => "verify-ca",
                SslMode::VerifyFull => "verify-full",
                _ => "require (the default)",
            }
        )));
    }
    // Build the TLS configuration first: a bad setting should not cost a round trip.
    let config = cache
        .get_or_build(&p.tls_files(), &[])
        .map_err(|e| Failure::new(code::BROKER, e))?;
    let name = p.sslhost.clone().unwrap_or_else(|| p.name.clone());
    let server_name = rustls::pki_types::ServerName::try_from(name).map_err(|_| {
        Failure::new(
            code::BROKER,
            ConnError::Config(
                "credential `sslhost` (or `host`) is not a valid TLS server name".into(),
            ),
        )
    })?;
    tcp.write_all(&proto::encode(1, ssl_request))
        .await
        .map_err(|e| read_failure(&p.to, ReadError::Io(e)))?;
    let tls = tokio_rustls::TlsConnector::from(config)
        .connect(server_name, tcp)
        .await
        .map_err(|e| tls_err(e.to_string()))?;
    Ok((MyStream::Tls(Box::new(tls)), 2))
}

/// How the authentication ended.
#[derive(Debug)]
pub enum Outcome {
    /// The server's OK: its payload, and whatever it sent after it.
    Ok {
        payload: Vec<u8>,
        rest: BytesMut,
        method: &'static str,
    },
    /// The server refused the credentials (1045, 1698): worth retrying with fresh ones.
    Rejected(ServerError),
}

/// Send the HandshakeResponse (sequence id `seq`) and run the authentication exchange
/// to the server's OK or ERR.
///
/// # Errors
/// The server's other errors (its code, e.g. 1049 unknown database), a method the
/// broker does not do (1251), protocol and I/O errors.
pub async fn login(
    stream: &mut MyStream,
    addr: &HostPort,
    mut seq: u8,
    response: &[u8],
    mut auth: ServerAuth,
    password: &[u8],
    t: &Transport<'_>,
) -> Result<Outcome, Failure> {
    let io = |e: std::io::Error| read_failure(addr, ReadError::Io(e));
    stream
        .write_all(&proto::encode(seq, response))
        .await
        .map_err(io)?;
    stream.flush().await.map_err(io)?;
    let mut buf = BytesMut::with_capacity(1024);
    loop {
        let packet = proto::read_packet(stream, &mut buf, MAX_PACKET)
            .await
            .map_err(|e| read_failure(addr, e))?;
        if packet.seq != seq.wrapping_add(1) {
            return Err(malformed(
                addr,
                "packets out of order during authentication",
            ));
        }
        seq = packet.seq;
        let step = auth
            .next(&packet.payload, password, t)
            .map_err(|e| auth_failure(addr, auth.method().name(), e))?;
        match step {
            Step::Send(data) => {
                seq = seq.wrapping_add(1);
                stream
                    .write_all(&proto::encode(seq, &data))
                    .await
                    .map_err(io)?;
                stream.flush().await.map_err(io)?;
            }
            Step::Read => {}
            Step::Ok => {
                return Ok(Outcome::Ok {
                    payload: packet.payload,
                    rest: buf,
                    method: auth.method().name(),
                });
            }
            Step::Err(e) if e.is_credential_rejection() => return Ok(Outcome::Rejected(e)),
            Step::Err(e) => return Err(Failure::server(&e)),
        }
    }
}

pub(super) fn auth_failure(addr: &HostPort, method: &str, e: AuthError) -> Failure {
    match e {
        AuthError::Unsupported(_) | AuthError::Refused(_) => Failure::new(
            code::AUTH_MODE,
            ConnError::Protocol(format!("upstream {addr}: {e}")),
        ),
        AuthError::Protocol(m) => malformed(addr, format!("{method}: {m}")),
    }
}

#[cfg(test)]
mod tests {
    use std::net::SocketAddr;

    use super::*;
    use crate::secret::Secret;

    fn creds(pairs: &[(&str, &str)]) -> Credentials {
        let mut c = Credentials::default();
        for (k, v) in pairs {
            c.0.insert((*k).to_owned(), Secret::from_str_value(v));
        }
        c
    }

    fn params(
        pairs: &[(&str, &str)],
        dst: Option<SocketAddr>,
    ) -> Result<UpstreamParams, ConnError> {
        UpstreamParams::from_credentials(
            &creds(pairs),
            AppDestination {
                addr: dst,
                host: None,
            },
            Destinations::Any,
        )
    }

    #[test]
    fn upstream_from_credentials() {
        let p = params(&[("host", "db")], None).unwrap();
        assert_eq!(p.to.to_string(), "db:3306");
        assert_eq!(p.sslmode, SslMode::Require);
        assert_eq!(p.verify(), Verify::None);
        let tidb: SocketAddr = "10.0.0.7:4000".parse().unwrap();
        let p = params(&[], Some(tidb)).unwrap();
        assert_eq!(p.to.to_string(), "10.0.0.7:4000");
        let p = params(
            &[
                ("host", "db"),
                ("port", "3307"),
                ("database", "orders"),
                ("sslmode", "verify-full"),
                ("sslhost", "db.internal"),
            ],
            None,
        )
        .unwrap();
        assert_eq!(p.to.to_string(), "db:3307");
        assert_eq!(p.database.as_deref(), Some("orders"));
        assert_eq!(p.verify(), Verify::Full);
        assert_eq!(p.sslhost.as_deref(), Some("db.internal"));
        for (mode, want) in [
            ("", SslMode::Require),
            ("disable", SslMode::Disable),
            ("verify-ca", SslMode::VerifyCa),
        ] {
            assert_eq!(
                params(&[("host", "h"), ("sslmode", mode)], None)
                    .unwrap()
                    .sslmode,
                want
            );
        }
        let p = params(&[("host", "h"), ("sslrootcert", "/ca.pem")], None).unwrap();
        assert_eq!(p.verify(), Verify::CaOnly);
        // Errors never quote a value.
        let e = params(&[("host", "h"), ("sslmode", "preferred-SECRET")], None)
            .unwrap_err()
            .to_string();
        assert!(e.contains("`sslmode` has an unsupported value") && !e.contains("SECRET"));
        assert!(params(&[("host", "h"), ("sslcert", "/c")], None).is_err());
        assert!(params(&[("host", "h"), ("port", "x")], None).is_err());
        assert!(params(&[], None).is_err());
    }
}
