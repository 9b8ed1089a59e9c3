//! TLS toward upstreams (rustls): system roots plus configured CAs, optional client
//! certificate, and the verification levels PostgreSQL's sslmode names.

use std::{fmt, path::Path, sync::Arc};

use rustls::{
    ClientConfig, DigitallySignedStruct, RootCertStore, SignatureScheme,
    client::{
        WebPkiServerVerifier,
        danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier},
    },
    pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime, pem::PemObject},
};

/// How much of the server certificate to check.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verify {
    /// Chain and host name (`verify-full`, the default for `tcp` TLS).
    Full,
    /// Chain only (`verify-ca`).
    CaOnly,
    /// Nothing (`require`): encryption without authentication.
    None,
}

/// Options for one upstream TLS client configuration.
#[derive(Debug, Clone, Copy)]
pub struct TlsOptions<'a> {
    pub verify: Verify,
    /// PEM file of CA certificates; when set, the system roots are not used (as libpq).
    pub ca_file: Option<&'a Path>,
    /// Also trust the system roots when `ca_file` is set.
    pub with_system_roots: bool,
    /// Client certificate chain and key (PEM).
    pub client_cert: Option<(&'a Path, &'a Path)>,
}

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// A file named in the configuration (not a secret): path and reason are shown.
    #[error("reading {path}: {reason}")]
    File { path: String, reason: String },
    /// A certificate or key given as a credential: only the credential's name and a
    /// fixed reason, never the value (a mistaken "path" may be the key itself) nor the
    /// parser's message (which may quote a line of it).
    #[error("credential `{credential}`: {reason}")]
    Credential {
        credential: String,
        reason: &'static str,
    },
    #[error("{0}")]
    Rustls(#[from] rustls::Error),
}

/// Where a certificate or key comes from.
#[derive(Clone, Copy)]
pub enum PemSource<'a> {
    /// A file named in the configuration: errors show the path.
    ConfigFile(&'a Path),
    /// A file path given as a credential: errors name the credential only.
    CredentialFile { credential: &'a str, path: &'a Path },
    /// PEM text given as a credential (kept in memory, never written to disk): errors
    /// name the credential only.
    CredentialText { credential: &'a str, pem: &'a [u8] },
}

impl fmt::Debug for PemSource<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::ConfigFile(p) => write!(f, "ConfigFile({})", p.display()),
            Self::CredentialFile { credential, .. } => write!(f, "CredentialFile({credential})"),
            Self::CredentialText { credential, .. } => write!(f, "CredentialText({credential})"),
        }
    }
}

/// Options for one upstream TLS client configuration, with certificates and keys from
/// files or credentials.
#[derive(Debug, Clone, Copy)]
pub struct TlsSources<'a> {
    pub verify: Verify,
    /// CA certificates; when set, the system roots are not used (as libpq).
    pub ca: Option<PemSource<'a>>,
    /// Also trust the system roots when `ca` is set.
    pub with_system_roots: bool,
    /// Client certificate chain and key.
    pub client_cert: Option<(PemSource<'a>, PemSource<'a>)>,
}

/// A fixed description of a PEM parsing failure: the parser's own message may quote a
/// line of the input.
fn pem_reason(e: &rustls::pki_types::pem::Error) -> &'static str {
    use rustls::pki_types::pem::Error as E;
    match e {
        E::Io(io) => io_reason(io),
        E::NoItemsFound => "no PEM item of the expected type",
        E::SectionTooLarge => "PEM section too large",
        _ => "not valid PEM",
    }
}

fn io_reason(e: &std::io::Error) -> &'static str {
    match e.kind() {
        std::io::ErrorKind::NotFound => "file not found",
        std::io::ErrorKind::PermissionDenied => "file not readable (permission denied)",
        _ => "file cannot be read",
    }
}

impl PemSource<'_> {
    fn error(&self, e: &rustls::pki_types::pem::Error) -> TlsError {
        self.failed(pem_reason(e), e)
    }

    fn failed(&self, reason: &'static str, detail: impl fmt::Display) -> TlsError {
        match self {
            Self::ConfigFile(p) => file_err(p, detail),
            Self::CredentialFile { credential, .. } | Self::CredentialText { credential, .. } => {
                TlsError::Credential {
                    credential: (*credential).to_owned(),
                    reason,
                }
            }
        }
    }

    fn certs(&self) -> Result<Vec<CertificateDer<'static>>, TlsError> {
        let certs = match self {
            Self::ConfigFile(path) | Self::CredentialFile { path, .. } => {
                CertificateDer::pem_file_iter(path)
                    .map_err(|e| self.error(&e))?
                    .collect::<Result<Vec<_>, _>>()
            }
            Self::CredentialText { pem, .. } => {
                CertificateDer::pem_slice_iter(pem).collect::<Result<Vec<_>, _>>()
            }
        }
        .map_err(|e| self.error(&e))?;
        if certs.is_empty() {
            return Err(self.failed("no PEM certificate", "no PEM certificate in file"));
        }
        Ok(certs)
    }

    fn key(&self) -> Result<PrivateKeyDer<'static>, TlsError> {
        match self {
            Self::ConfigFile(path) | Self::CredentialFile { path, .. } => {
                PrivateKeyDer::from_pem_file(path)
            }
            Self::CredentialText { pem, .. } => PrivateKeyDer::from_pem_slice(pem),
        }
        .map_err(|e| match e {
            rustls::pki_types::pem::Error::NoItemsFound => {
                self.failed("no PEM private key", "no PEM private key")
            }
            e => self.error(&e),
        })
    }
}

/// ring, with the AES-128-GCM suites first: on a host with AES and SHA instructions
/// they cost less than AES-256-GCM (10 rounds instead of 14) and SHA-384 (no hardware
/// SHA-512) in every handshake and record, for the same protocol versions and
/// strength class every peer accepts. Both legs the broker terminates or originates
/// use it (client preference here; [`crate::ca`]'s server configurations prefer it over
/// the client's order).
pub(crate) fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    use rustls::crypto::ring::cipher_suite as cs;
    let mut p = rustls::crypto::ring::default_provider();
    p.cipher_suites = vec![
        cs::TLS13_AES_128_GCM_SHA256,
        cs::TLS13_AES_256_GCM_SHA384,
        cs::TLS13_CHACHA20_POLY1305_SHA256,
        cs::TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256,
        cs::TLS_ECDHE_ECDSA_WITH_AES_256_GCM_SHA384,
        cs::TLS_ECDHE_ECDSA_WITH_CHACHA20_POLY1305_SHA256,
        cs::TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256,
        cs::TLS_ECDHE_RSA_WITH_AES_256_GCM_SHA384,
        cs::TLS_ECDHE_RSA_WITH_CHACHA20_POLY1305_SHA256,
    ];
    Arc::new(p)
}

fn file_err(path: &Path, reason: impl fmt::Display) -> TlsError {
    TlsError::File {
        path: path.display().to_string(),
        reason: reason.to_string(),
    }
}

/// Load every certificate of a PEM file.
///
/// # Errors
/// When the file cannot be read or holds no certificate.
pub fn load_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    PemSource::ConfigFile(path).certs()
}

/// The system trust store, read and parsed once per process (the bundle is hundreds of
/// certificates; connections must not re-read it). Falls back to the bundled webpki
/// roots when the system has none.
fn system_roots(store: &mut RootCertStore) {
    static ROOTS: std::sync::OnceLock<RootCertStore> = std::sync::OnceLock::new();
    let roots = ROOTS.get_or_init(|| {
        let mut roots = RootCertStore::empty();
        for cert in rustls_native_certs::load_native_certs().certs {
            let _ = roots.add(cert);
        }
        if roots.is_empty() {
            roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
        }
        roots
    });
    store.roots.extend(roots.roots.iter().cloned());
}

/// Build a client configuration from files named in the configuration.
///
/// # Errors
/// When a certificate or key file cannot be loaded.
pub fn client_config(opts: TlsOptions<'_>) -> Result<Arc<ClientConfig>, TlsError> {
    client_config_from(TlsSources {
        verify: opts.verify,
        ca: opts.ca_file.map(PemSource::ConfigFile),
        with_system_roots: opts.with_system_roots,
        client_cert: opts
            .client_cert
            .map(|(c, k)| (PemSource::ConfigFile(c), PemSource::ConfigFile(k))),
    })
}

/// Build a client configuration from files or credential values.
///
/// # Errors
/// When a certificate or key cannot be loaded.
pub fn client_config_from(opts: TlsSources<'_>) -> Result<Arc<ClientConfig>, TlsError> {
    let mut roots = RootCertStore::empty();
    if let Some(ca) = &opts.ca {
        for c in ca.certs()? {
            roots
                .add(c)
                .map_err(|e| ca.failed("not a usable CA certificate", e))?;
        }
    }
    if opts.ca.is_none() || opts.with_system_roots {
        system_roots(&mut roots);
    }
    let provider = provider();
    let builder = ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()?;
    let builder = match opts.verify {
        Verify::Full => builder.with_root_certificates(roots),
        Verify::CaOnly => {
            let inner = WebPkiServerVerifier::builder_with_provider(Arc::new(roots), provider)
                .build()
                .map_err(|e| TlsError::Rustls(rustls::Error::General(e.to_string())))?;
            builder
                .dangerous()
                .with_custom_certificate_verifier(Arc::new(ChainOnly(inner)))
        }
        Verify::None => builder
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(NoVerify(provider))),
    };
    let config = match &opts.client_cert {
        Some((cert, key)) => {
            let chain = cert.certs()?;
            let key = key.key()?;
            builder.with_client_auth_cert(chain, key)?
        }
        None => builder.with_no_client_auth(),
    };
    Ok(Arc::new(config))
}

/// Verify the chain against the roots but accept any host name (`verify-ca`).
#[derive(Debug)]
struct ChainOnly(Arc<WebPkiServerVerifier>);

impl ServerCertVerifier for ChainOnly {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        match self
            .0
            .verify_server_cert(end_entity, intermediates, server_name, ocsp_response, now)
        {
            Ok(v) => Ok(v),
            Err(rustls::Error::InvalidCertificate(rustls::CertificateError::NotValidForName))
            | Err(rustls::Error::InvalidCertificate(
                rustls::CertificateError::NotValidForNameContext { .. },
            )) => Ok(ServerCertVerified::assertion()),
            Err(e) => Err(e),
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.0.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.0.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.supported_verify_schemes()
    }
}

/// Accept any certificate (`sslmode=require`); signatures are still checked so the
/// handshake is bound to the presented key.
#[derive(Debug)]
struct NoVerify(Arc<rustls::crypto::CryptoProvider>);

impl ServerCertVerifier for NoVerify {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}
