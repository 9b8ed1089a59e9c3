//! The upstream leg: where to connect (credentials, original destination), `sslmode`
//! as libpq defines it, TLS with the broker's rustls configuration, and the stream type
//! the rest of the connector reads and writes.

use std::{
    fmt,
    pin::Pin,
    task::{Context, Poll},
};

use sha2::{Digest, Sha256, Sha384, Sha512};
use tokio::{
    io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf},
    net::TcpStream,
};

use super::config::RequireAuth;
use super::{
    errors::{Failure, sqlstate},
    messages,
};
pub use crate::connector::db_tls::{Pem, TlsConfigCache};
use crate::{
    connector::dial::{Dialer, HostPort},
    connector::{
        ConnError, Credentials,
        db_tls::TlsFiles,
        target::{self, AppDestination, Destinations, Fallbacks, parse_port},
    },
    tls::Verify,
};

/// Default PostgreSQL port.
pub const DEFAULT_PORT: u16 = 5432;

/// libpq's `sslmode`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SslMode {
    Disable,
    /// `prefer` and `allow`: TLS when the server offers it, without verification unless
    /// `sslrootcert` is set; plaintext when it does not.
    Prefer,
    /// The default, as in Secretless (an empty value too): TLS or no session.
    Require,
    VerifyCa,
    VerifyFull,
}

impl SslMode {
    /// The libpq name.
    #[must_use]
    pub fn name(self) -> &'static str {
        match self {
            Self::Disable => "disable",
            Self::Prefer => "prefer",
            Self::Require => "require",
            Self::VerifyCa => "verify-ca",
            Self::VerifyFull => "verify-full",
        }
    }

    /// Parse a credential value.
    ///
    /// # Errors
    /// On an unknown mode. The message does not quote the value: a credential read from
    /// the wrong secret would otherwise be echoed to the client and the logs.
    pub fn parse(s: &str) -> Result<Self, ConnError> {
        Ok(match s.trim() {
            "disable" => Self::Disable,
            "allow" | "prefer" => Self::Prefer,
            "require" | "" => Self::Require,
            "verify-ca" => Self::VerifyCa,
            "verify-full" => Self::VerifyFull,
            _ => {
                return Err(ConnError::Config(
                    "credential `sslmode` has an unsupported value (expected disable, allow, \
                     prefer, require, verify-ca or verify-full)"
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
    /// names another: the `host` credential, or the `intercept:` hostname the app
    /// dialled ([`target::Target::name`]).
    pub name: String,
    pub database: Option<String>,
    pub sslmode: SslMode,
    pub sslrootcert: Option<Pem>,
    pub sslcert: Option<Pem>,
    pub sslkey: Option<Pem>,
    pub sslhost: Option<String>,
    /// Credential `require_auth` (libpq's name); overrides the service's `requireAuth`.
    pub require_auth: Option<RequireAuth>,
}

impl UpstreamParams {
    /// host = credential `host` (or Secretless v1 `address` `host[:port][/db]`), else the
    /// original destination (when `dests` allows it); port = credential `port`, else the
    /// address/original destination port, else 5432. See [`target::resolve`].
    ///
    /// # Errors
    /// When no upstream can be determined or a credential is malformed.
    pub fn from_credentials(
        creds: &Credentials,
        app: AppDestination<'_>,
        dests: Destinations<'_>,
    ) -> Result<Self, ConnError> {
        let address = match creds.text("address")? {
            Some(a) => parse_address(a)?,
            None => Address::default(),
        };
        let target = target::resolve(
            creds,
            app,
            Fallbacks {
                host: address.host.as_deref(),
                port: address.port,
                default_port: Some(DEFAULT_PORT),
            },
            dests,
        )?;
        let database = match creds.text("database")? {
            Some(d) if !d.is_empty() => Some(d.to_owned()),
            _ => address.database,
        };
        let sslmode = match creds.text("sslmode")? {
            Some(m) => SslMode::parse(m)?,
            // Secretless' default: a migrated service never falls back to plaintext.
            None => SslMode::Require,
        };
        let sslhost = creds
            .text("sslhost")?
            .map(str::trim)
            .filter(|s| !s.is_empty())
            .map(str::to_owned);
        let require_auth = match creds.text("require_auth")? {
            Some(r) if !r.trim().is_empty() => Some(RequireAuth::parse_text(r).map_err(|why| {
                ConnError::Config(format!(
                    "credential `require_auth` has an unsupported value: {why}"
                ))
            })?),
            _ => None,
        };
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
            require_auth,
        })
    }

    /// Whether a TLS connection made with these parameters has a verified server
    /// certificate (what makes sending a cleartext password acceptable by default).
    #[must_use]
    pub fn verifies_server(&self) -> bool {
        self.sslmode != SslMode::Disable && self.verify() != Verify::None
    }

    /// The verification level and CA for this sslmode, as libpq: `require` (and
    /// `prefer`) with a root certificate behave like `verify-ca`.
    fn verify(&self) -> Verify {
        match self.sslmode {
            SslMode::VerifyFull => Verify::Full,
            SslMode::VerifyCa => Verify::CaOnly,
            _ if self.sslrootcert.is_some() => Verify::CaOnly,
            _ => Verify::None,
        }
    }
}

/// The parts of a Secretless `address` credential.
#[derive(Debug, Default, PartialEq, Eq)]
struct Address {
    host: Option<String>,
    port: Option<u16>,
    database: Option<String>,
}

/// Secretless `address`: `host[:port][/dbname]`, host possibly `[v6]`.
fn parse_address(a: &str) -> Result<Address, ConnError> {
    let a = a.trim();
    let (hostport, db) = match a.split_once('/') {
        Some((hp, d)) => (hp, (!d.is_empty()).then(|| d.to_owned())),
        None => (a, None),
    };
    let (host, port) = if let Some(rest) = hostport.strip_prefix('[') {
        let (h, tail) = rest
            .split_once(']')
            .ok_or_else(|| ConnError::Config("credential `address`: unclosed `[`".into()))?;
        let port = match tail.strip_prefix(':') {
            Some(p) => Some(parse_port(p)?),
            None => None,
        };
        (h.to_owned(), port)
    } else {
        match hostport.rsplit_once(':') {
            Some((h, p)) if !h.contains(':') => (h.to_owned(), Some(parse_port(p)?)),
            _ => (hostport.to_owned(), None),
        }
    };
    Ok(Address {
        host: (!host.is_empty()).then_some(host),
        port,
        database: db,
    })
}

/// The upstream connection: plain TCP or TLS.
pub enum PgStream {
    Plain(TcpStream),
    Tls(Box<tokio_rustls::client::TlsStream<TcpStream>>),
}

impl fmt::Debug for PgStream {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Plain(_) => "PgStream::Plain",
            Self::Tls(_) => "PgStream::Tls",
        })
    }
}

impl PgStream {
    #[must_use]
    pub fn is_tls(&self) -> bool {
        matches!(self, Self::Tls(_))
    }

    /// The `tls-server-end-point` channel binding data (RFC 5929) for this connection,
    /// when it is TLS and the certificate's signature algorithm defines one.
    #[must_use]
    pub fn channel_binding(&self) -> Option<Vec<u8>> {
        let Self::Tls(t) = self else {
            return None;
        };
        let cert = t.get_ref().1.peer_certificates()?.first()?;
        tls_server_end_point(cert)
    }
}

impl AsyncRead for PgStream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            Self::Plain(s) => Pin::new(s).poll_read(cx, buf),
            Self::Tls(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for PgStream {
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

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        match self.get_mut() {
            Self::Plain(s) => Pin::new(s).poll_write_vectored(cx, bufs),
            Self::Tls(s) => Pin::new(s.as_mut()).poll_write_vectored(cx, bufs),
        }
    }

    fn is_write_vectored(&self) -> bool {
        match self {
            Self::Plain(s) => s.is_write_vectored(),
            Self::Tls(s) => s.is_write_vectored(),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            Self::Plain(s) => Pin::new(s).poll_flush(cx),
            Self::Tls(s) => Pin::new(s.as_mut()).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            Self::Plain(s) => Pin::new(s).poll_shutdown(cx),
            Self::Tls(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
        }
    }
}

/// RFC 5929 `tls-server-end-point`: the hash of the server's end-entity certificate,
/// with SHA-256 when its signature uses MD5, SHA-1 or SHA-256, else the signature's own
/// hash. `None` for algorithms without a single hash (Ed25519, RSA-PSS), which
/// PostgreSQL cannot bind to either.
#[must_use]
pub fn tls_server_end_point(cert_der: &[u8]) -> Option<Vec<u8>> {
    let (_, cert) = x509_parser::parse_x509_certificate(cert_der).ok()?;
    let oid = cert.signature_algorithm.algorithm.to_id_string();
    match oid.as_str() {
        // md5/sha1/sha224?/sha256 with RSA, ECDSA with SHA-1/SHA-256, DSA with SHA-1/SHA-256.
        "1.2.840.113549.1.1.4"
        | "1.2.840.113549.1.1.5"
        | "1.2.840.113549.1.1.11"
        | "1.2.840.10045.4.1"
        | "1.2.840.10045.4.3.2"
        | "1.2.840.10040.4.3"
        | "2.16.840.1.101.3.4.3.2" => Some(Sha256::digest(cert_der).to_vec()),
        "1.2.840.113549.1.1.14" | "1.2.840.10045.4.3.1" | "2.16.840.1.101.3.4.3.1" => {
            Some(sha2::Sha224::digest(cert_der).to_vec())
        }
        "1.2.840.113549.1.1.12" | "1.2.840.10045.4.3.3" => Some(Sha384::digest(cert_der).to_vec()),
        "1.2.840.113549.1.1.13" | "1.2.840.10045.4.3.4" => Some(Sha512::digest(cert_der).to_vec()),
        _ => None,
    }
}

/// The TLS client configuration for these parameters (ALPN `postgresql`), uncached.
#[cfg(test)]
fn build_tls_config(
    p: &UpstreamParams,
    verify: Verify,
) -> Result<std::sync::Arc<rustls::ClientConfig>, ConnError> {
    crate::connector::db_tls::build(&p.tls_files(verify), &[ALPN])
}

impl UpstreamParams {
    fn tls_files(&self, verify: Verify) -> TlsFiles<'_> {
        TlsFiles {
            verify,
            root: self.sslrootcert.as_ref(),
            cert: self.sslcert.as_ref(),
            key: self.sslkey.as_ref(),
        }
    }
}

/// PostgreSQL 17+ checks ALPN when a client sends it; older servers ignore it.
const ALPN: &[u8] = b"postgresql";

/// Connect to the upstream and negotiate TLS as `sslmode` says.
///
/// # Errors
/// Unreachable upstream (08006), TLS failures (08006), bad TLS settings (08004).
pub async fn connect(
    dialer: &Dialer,
    tls_cache: &TlsConfigCache,
    p: &UpstreamParams,
) -> Result<PgStream, Failure> {
    let mut tcp = dialer.dial(&p.to).await?;
    if p.sslmode == SslMode::Disable {
        return Ok(PgStream::Plain(tcp));
    }
    // Build the TLS configuration first: a bad setting should not cost a round trip.
    let config = tls_cache.get_or_build(&p.tls_files(p.verify()), &[ALPN])?;
    let addr = p.to.to_string();
    let tls_err = |reason: String| {
        Failure::new(
            sqlstate::CONNECTION_FAILURE,
            ConnError::Tls {
                addr: addr.clone(),
                reason,
            },
        )
    };
    tcp.write_all(&messages::ssl_request())
        .await
        .map_err(ConnError::Io)?;
    // Exactly one byte: anything the server sent after it must not be trusted as part
    // of the TLS stream (CVE-2021-23222).
    let answer = tcp.read_u8().await.map_err(|e| {
        tls_err(format!(
            "server closed the connection after SSLRequest: {e}"
        ))
    })?;
    match answer {
        b'S' => {}
        b'N' if p.sslmode == SslMode::Prefer => return Ok(PgStream::Plain(tcp)),
        b'N' => {
            return Err(tls_err(format!(
                "server does not support TLS, but sslmode is {} (require is the default, as in \
                 Secretless; set the credential `sslmode: disable` for a server without TLS)",
                p.sslmode.name()
            )));
        }
        other => {
            return Err(tls_err(format!(
                "unexpected answer {:?} to SSLRequest",
                char::from(other)
            )));
        }
    }
    let name = p.sslhost.clone().unwrap_or_else(|| p.name.clone());
    let server_name = rustls::pki_types::ServerName::try_from(name).map_err(|_| {
        ConnError::Config("credential `sslhost` (or `host`) is not a valid TLS server name".into())
    })?;
    let tls_stream = tokio_rustls::TlsConnector::from(config)
        .connect(server_name, tcp)
        .await
        .map_err(|e| tls_err(e.to_string()))?;
    Ok(PgStream::Tls(Box::new(tls_stream)))
}

#[cfg(test)]
mod tests {
    use std::net::SocketAddr;

    use ipnet::IpNet;

    use super::{super::config::PgConfig, *};
    use crate::{config::InterceptTarget, secret::Secret};

    fn app(addr: Option<SocketAddr>) -> AppDestination<'static> {
        AppDestination { addr, host: None }
    }

    fn creds(pairs: &[(&str, &str)]) -> Credentials {
        let mut c = Credentials::default();
        for (k, v) in pairs {
            c.0.insert((*k).to_owned(), Secret::from_str_value(v));
        }
        c
    }

    #[test]
    fn upstream_from_credentials_and_orig_dst() {
        let dst: SocketAddr = "10.0.0.5:6432".parse().unwrap();
        let p = UpstreamParams::from_credentials(&creds(&[]), app(Some(dst)), Destinations::Any)
            .unwrap();
        assert_eq!(p.to, HostPort::new("10.0.0.5", 6432));
        assert_eq!(p.sslmode, SslMode::Require);
        let p = UpstreamParams::from_credentials(
            &creds(&[("host", "db")]),
            app(Some(dst)),
            Destinations::Any,
        )
        .unwrap();
        assert_eq!(p.to.to_string(), "db:6432");
        let p = UpstreamParams::from_credentials(
            &creds(&[("host", "db")]),
            app(None),
            Destinations::Any,
        )
        .unwrap();
        assert_eq!(p.to.to_string(), "db:5432");
        let p = UpstreamParams::from_credentials(
            &creds(&[
                ("host", "::1"),
                ("port", "7000"),
                ("sslmode", "verify-full"),
            ]),
            app(None),
            Destinations::Any,
        )
        .unwrap();
        assert_eq!(p.to.to_string(), "[::1]:7000");
        assert_eq!(p.verify(), Verify::Full);
        assert!(
            UpstreamParams::from_credentials(&creds(&[]), app(None), Destinations::Any).is_err()
        );
        assert!(
            UpstreamParams::from_credentials(
                &creds(&[("host", "h"), ("port", "x")]),
                app(None),
                Destinations::Any
            )
            .is_err()
        );
        assert!(
            UpstreamParams::from_credentials(
                &creds(&[("host", "h"), ("sslmode", "bogus")]),
                app(None),
                Destinations::Any
            )
            .is_err()
        );
        assert!(
            UpstreamParams::from_credentials(
                &creds(&[("host", "h"), ("sslcert", "/c")]),
                app(None),
                Destinations::Any
            )
            .is_err()
        );
    }

    /// The app's destination is the upstream only where the service allows it.
    #[test]
    fn destination_rules() {
        let allow: Vec<IpNet> = vec!["10.1.0.0/16".parse().unwrap()];
        let inside: SocketAddr = "10.1.2.3:5432".parse().unwrap();
        let outside: SocketAddr = "10.2.0.1:5432".parse().unwrap();
        let mapped: SocketAddr = "[::ffff:10.1.2.3]:5432".parse().unwrap();
        let within = Destinations::Within(&allow);
        let p = UpstreamParams::from_credentials(&creds(&[]), app(Some(inside)), within).unwrap();
        assert_eq!(p.to.to_string(), "10.1.2.3:5432");
        let p = UpstreamParams::from_credentials(&creds(&[]), app(Some(mapped)), within).unwrap();
        assert_eq!(p.to.to_string(), "10.1.2.3:5432");
        let e = UpstreamParams::from_credentials(&creds(&[]), app(Some(outside)), within)
            .unwrap_err()
            .to_string();
        assert!(e.contains("not in `upstreamAllow`"), "{e}");
        let e =
            UpstreamParams::from_credentials(&creds(&[]), app(Some(inside)), Destinations::Never)
                .unwrap_err()
                .to_string();
        assert!(e.contains("CIDR intercept"), "{e}");
        // An explicit host is not the app's choice: allowed whatever the destination.
        let p = UpstreamParams::from_credentials(
            &creds(&[("host", "db.internal")]),
            app(Some(outside)),
            Destinations::Never,
        )
        .unwrap();
        assert_eq!(p.to.to_string(), "db.internal:5432");
        // The service decides the rule.
        let cidr = [InterceptTarget::Cidr {
            net: "10.0.0.0/8".parse().unwrap(),
            port: 5432,
        }];
        let exact = [InterceptTarget::Addr(inside)];
        let mut cfg = PgConfig::default();
        assert!(matches!(
            Destinations::for_service(&cfg.upstream_allow, &exact),
            Destinations::Any
        ));
        assert!(matches!(
            Destinations::for_service(&cfg.upstream_allow, &cidr),
            Destinations::Never
        ));
        cfg.upstream_allow = allow.clone();
        assert!(matches!(
            Destinations::for_service(&cfg.upstream_allow, &cidr),
            Destinations::Within(_)
        ));
        // require_auth as a credential.
        let p = UpstreamParams::from_credentials(
            &creds(&[("host", "h"), ("require_auth", "scram-sha-256")]),
            app(None),
            Destinations::Any,
        )
        .unwrap();
        assert_eq!(
            format!("{:?}", p.require_auth),
            "Some(RequireAuth(scram-sha-256))"
        );
    }

    #[test]
    fn verification_follows_libpq() {
        let p = |m: &str, root: bool| {
            let mut v = vec![("host", "h"), ("sslmode", m)];
            if root {
                v.push(("sslrootcert", "/ca.pem"));
            }
            UpstreamParams::from_credentials(&creds(&v), app(None), Destinations::Any)
                .unwrap()
                .verify()
        };
        assert_eq!(p("require", false), Verify::None);
        assert_eq!(p("prefer", false), Verify::None);
        assert_eq!(p("require", true), Verify::CaOnly);
        assert_eq!(p("verify-ca", false), Verify::CaOnly);
        assert_eq!(p("verify-full", true), Verify::Full);
    }

    #[test]
    fn secretless_address_and_inline_pem() {
        let p = UpstreamParams::from_credentials(
            &creds(&[
                ("address", "pg.internal:6543/orders"),
                (
                    "sslrootcert",
                    "-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n",
                ),
            ]),
            app(None),
            Destinations::Any,
        )
        .unwrap();
        assert_eq!(p.to.to_string(), "pg.internal:6543");
        assert_eq!(p.database.as_deref(), Some("orders"));
        assert!(matches!(p.sslrootcert, Some(Pem::Inline(_))));
        assert_eq!(format!("{:?}", p.sslrootcert), "Some(Inline(<pem>))");
        assert_eq!(
            parse_address("[::1]:5433").unwrap(),
            Address {
                host: Some("::1".into()),
                port: Some(5433),
                database: None
            }
        );
        assert_eq!(
            parse_address("db").unwrap(),
            Address {
                host: Some("db".into()),
                ..Address::default()
            }
        );
    }

    /// A PEM value that does not start with the marker (`openssl pkcs12 -nodes` output)
    /// or spans several lines is never taken for a path, and no error quotes it.
    #[test]
    fn pem_anywhere_is_text_and_errors_never_quote_values() {
        let key = "Bag Attributes\n    localKeyID: 01 02\nKey Attributes: <No Attributes>\n\
                   -----BEGIN PRIVATE KEY-----\nU0VDUkVULUtFWS1CWVRFUw==\n-----END PRIVATE KEY-----\n";
        let p = UpstreamParams::from_credentials(
            &creds(&[("host", "h"), ("sslcert", key), ("sslkey", key)]),
            app(None),
            Destinations::Any,
        )
        .unwrap();
        assert!(matches!(p.sslkey, Some(Pem::Inline(_))));
        let err = build_tls_config(&p, Verify::None).unwrap_err().to_string();
        assert!(err.contains("credential `sslcert`"), "{err}");
        assert!(!err.contains("SECRET") && !err.contains("U0VD"), "{err}");
        // Several lines without a marker: refused, not opened, not quoted.
        let err = UpstreamParams::from_credentials(
            &creds(&[
                ("host", "h"),
                ("sslrootcert", "MIIB-der-ish\nsecond-line-SECRET"),
            ]),
            app(None),
            Destinations::Any,
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("credential `sslrootcert`"), "{err}");
        assert!(!err.contains("SECRET"), "{err}");
        // A missing file: the credential is named, the path is not.
        let p = UpstreamParams::from_credentials(
            &creds(&[("host", "h"), ("sslrootcert", "/nonexistent/SECRET-ca.pem")]),
            app(None),
            Destinations::Any,
        )
        .unwrap();
        assert_eq!(format!("{:?}", p.sslrootcert), "Some(Path(<path>))");
        let err = build_tls_config(&p, Verify::CaOnly)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("credential `sslrootcert`: file not found"),
            "{err}"
        );
        assert!(!err.contains("SECRET"), "{err}");
        // sslmode: the value is never quoted.
        let err = UpstreamParams::from_credentials(
            &creds(&[("host", "h"), ("sslmode", "SECRET-mode")]),
            app(None),
            Destinations::Any,
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("`sslmode` has an unsupported value"), "{err}");
        assert!(!err.contains("SECRET"), "{err}");
    }

    fn hex(b: &[u8]) -> String {
        b.iter().map(|x| format!("{x:02x}")).collect()
    }

    #[test]
    fn end_point_hash_follows_the_signature_hash() {
        use base64::Engine as _;
        let der = |b: &str| base64::engine::general_purpose::STANDARD.decode(b).unwrap();
        // Self-signed test certificates made with `openssl req -x509`; expected values
        // from `sha256sum`/`sha384sum` of the DER.
        // ecdsa-with-SHA256 -> SHA-256.
        let a = der(
            "MIIBbDCCAROgAwIBAgIUPwu+hRBOuTcHQHh+EaaG5+uW+KQwCgYIKoZIzj0EAwIwDDEKMAgGA1UEAwwBYTAeFw0yNjExMjIxNDMyMzNaFw0zNjExMTkxNDMyMzNaMAwxCjAIBgNVBAMMAWEwWTATBgcqhkjOPQIBBggqhkjOPQMBBwNCAARZXtEcg8Jn2VB44uzQUoqeyJ5kLXT3hMWoD5/qVHOIZ8Y0lRe3kxaCo3Ff1AVaS8SqNSp4nvlKyUhu+47afqALo1MwUTAdBgNVHQ4EFgQULRvCo3xRdmuhBvVUuE6FMjRw+Q0wHwYDVR0jBBgwFoAULRvCo3xRdmuhBvVUuE6FMjRw+Q0wDwYDVR0TAQH/BAUwAwEB/zAKBggqhkjOPQQDAgNHADBEAiAJ2a9uT5veVwf2479LW/g2uGfyafXE5/txiu5d3/3uogIgL+u4X0lKbOiyyWPjioWVbhyHGdm5S29MiO0Ped4JoY4=",
        );
        assert_eq!(
            hex(&tls_server_end_point(&a).unwrap()),
            "aee6e586affe534ec39ee55bb2a2657886c49a30d5ae0336c62f83a5027af392"
        );
        // ecdsa-with-SHA384 -> SHA-384.
        let b = der(
            "MIIBqTCCATCgAwIBAgIUYelXWMQUqMwiqzv3ZF/1OX35xpMwCgYIKoZIzj0EAwMwDDEKMAgGA1UEAwwBYjAeFw0yNjExMjIxNDMyMzNaFw0zNjExMTkxNDMyMzNaMAwxCjAIBgNVBAMMAWIwdjAQBgcqhkjOPQIBBgUrgQQAIgNiAARFG37OXqWCN/wB6F4XDv12o2XLcLwWlMbWKk8yiSm6q+Kvmrr2ggNZR9ui+YF2Ll/mMe4tVI71EplYb7+eiPTv60js7FuqMl139QkDj858qpBGbyHLIc2CLM0QZxFykJ6jUzBRMB0GA1UdDgQWBBQYOTNkvl/gnvw2tJfpd86lHjle4jAfBgNVHSMEGDAWgBQYOTNkvl/gnvw2tJfpd86lHjle4jAPBgNVHRMBAf8EBTADAQH/MAoGCCqGSM49BAMDA2cAMGQCMCD5wxjbxglKjoLfrigiS552paB2LG3ieVyE/uIBmFepSUy1/aSj6oua75jmtCP7DgIwA3/tN1TIYr2Kes4UyU9mMTGJZ0GvEPq8BMnTAHAzMa4j70b2B6OiEiIZZg8ZfyXc",
        );
        assert_eq!(
            hex(&tls_server_end_point(&b).unwrap()),
            "d609de36447621f402a2103d8c3055d00444ffd523669076adc2115aa81410d225f964ec09a142e015c29c0651aa26dd"
        );
        // Ed25519 has no separate hash: no binding.
        let c = der(
            "MIIBLDCB36ADAgECAhRH7uSqpvKBsV5Ma3LTBWaYD16N2zAFBgMrZXAwDDEKMAgGA1UEAwwBYzAeFw0yNjExMjIxNDMyMzNaFw0zNjExMTkxNDMyMzNaMAwxCjAIBgNVBAMMAWMwKjAFBgMrZXADIQAyIBE1ow7Tq9fSCpw0XTaAmq6yykfb2c2iYt83jM8eMqNTMFEwHQYDVR0OBBYEFPAikcQIPuZaBztT4TZv2u97K5XyMB8GA1UdIwQYMBaAFPAikcQIPuZaBztT4TZv2u97K5XyMA8GA1UdEwEB/wQFMAMBAf8wBQYDK2VwA0EAU8dFC0ZOx8rmSq++jUA7iZ4g4sZMGeO/iL5fCsb42V+d/DkuTrDsv3uWZpc8cywB8xV89B+miXECAloF+QJ9Aw==",
        );
        assert!(tls_server_end_point(&c).is_none());
        // Not a certificate.
        assert!(tls_server_end_point(b"junk").is_none());
    }
}
