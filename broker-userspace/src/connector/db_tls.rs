//! TLS settings the database connectors (pg, mysql) take from credentials, as Secretless
//! names them: `sslrootcert`, `sslcert`, `sslkey`, each a file path or PEM text
//! ([`Pem`]); and the per-service cache of the rustls client configurations built from
//! them ([`TlsConfigCache`]), so a connection does not reload the system roots or re-read
//! the files.

use std::{
    collections::HashMap,
    fmt,
    path::{Path, PathBuf},
    sync::{Arc, Mutex, PoisonError},
    time::{Duration, Instant},
};

use sha2::{Digest, Sha256};

use crate::{
    connector::{ConnError, Credentials},
    secret::Secret,
    tls::{self, TlsSources, Verify},
};

/// A certificate or key given as a file path or, as Secretless does with
/// `sslrootcert: {from: file, ...}`, as PEM text.
///
/// PEM text is recognised by a `-----BEGIN` marker anywhere in the value, not only at
/// the start: `openssl pkcs12 -nodes` writes `Bag Attributes` lines before the block, and
/// taking such a key for a path used to put the whole key into error messages.
#[derive(Clone)]
pub enum Pem {
    Path(PathBuf),
    Inline(Secret),
}

impl fmt::Debug for Pem {
    // Neither form is printed: a path credential is still a credential.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Path(_) => f.write_str("Path(<path>)"),
            Self::Inline(_) => f.write_str("Inline(<pem>)"),
        }
    }
}

/// The PEM boundary marker; a value containing it is PEM text, never a path.
const PEM_MARKER: &[u8] = b"-----BEGIN";

impl Pem {
    /// The credential `name`, if set and not empty.
    ///
    /// # Errors
    /// A value that is neither PEM text nor a one-line path; the message names the
    /// credential, never the value.
    pub fn from_credential(creds: &Credentials, name: &str) -> Result<Option<Self>, ConnError> {
        let Some(v) = creds.get(name) else {
            return Ok(None);
        };
        if v.is_empty() {
            return Ok(None);
        }
        if v.expose()
            .windows(PEM_MARKER.len())
            .any(|w| w == PEM_MARKER)
        {
            return Ok(Some(Self::Inline(v.clone())));
        }
        let not_a_path = || {
            ConnError::Config(format!(
                "credential `{name}` is neither a file path nor PEM text (no `-----BEGIN` line)"
            ))
        };
        let text = v.expose_str().map_err(|_| not_a_path())?;
        let path = text.trim();
        // A path is one line; anything else is text that went wrong (e.g. DER or base64
        // without the PEM armour), not something to open.
        if path.is_empty() || path.contains(['\n', '\r', '\0']) {
            return Err(not_a_path());
        }
        Ok(Some(Self::Path(PathBuf::from(path))))
    }

    /// As a source for the TLS configuration: errors name the credential only.
    #[must_use]
    pub fn source<'a>(&'a self, credential: &'a str) -> tls::PemSource<'a> {
        match self {
            Self::Path(path) => tls::PemSource::CredentialFile { credential, path },
            Self::Inline(s) => tls::PemSource::CredentialText {
                credential,
                pem: s.expose(),
            },
        }
    }

    fn cache_key(&self) -> PemKey {
        match self {
            Self::Path(p) => PemKey::Path(p.clone()),
            Self::Inline(s) => PemKey::Inline(Sha256::digest(s.expose()).into()),
        }
    }
}

/// What one upstream TLS client configuration is built from.
#[derive(Debug, Clone, Copy)]
pub struct TlsFiles<'a> {
    pub verify: Verify,
    /// `sslrootcert`: the CA certificates (the path `system`: the system's trust store,
    /// as libpq 16).
    pub root: Option<&'a Pem>,
    /// `sslcert` and `sslkey`: the client certificate (both or neither).
    pub cert: Option<&'a Pem>,
    pub key: Option<&'a Pem>,
}

#[derive(Clone, PartialEq, Eq, Hash)]
enum PemKey {
    Path(PathBuf),
    Inline([u8; 32]),
}

#[derive(Clone, PartialEq, Eq, Hash)]
struct TlsKey {
    verify: u8,
    root: Option<PemKey>,
    cert: Option<PemKey>,
    key: Option<PemKey>,
}

/// How long a built TLS client configuration is reused (files may be rotated).
const TLS_CONFIG_TTL: Duration = Duration::from_secs(60);
const TLS_CONFIG_CAP: usize = 64;

/// Built rustls client configurations of one service. Bounded; entries expire after a
/// minute. One cache serves one ALPN list (each connector has its own).
#[derive(Default)]
pub struct TlsConfigCache {
    inner: Mutex<HashMap<TlsKey, (Arc<rustls::ClientConfig>, Instant)>>,
}

impl fmt::Debug for TlsConfigCache {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let len = self
            .inner
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .len();
        f.debug_struct("TlsConfigCache").field("len", &len).finish()
    }
}

impl TlsConfigCache {
    /// The configuration for `files`, offering `alpn` (empty: none), from the cache or
    /// built now.
    ///
    /// # Errors
    /// Unreadable or invalid certificates or keys (the credential named, never its value).
    pub fn get_or_build(
        &self,
        files: &TlsFiles<'_>,
        alpn: &[&[u8]],
    ) -> Result<Arc<rustls::ClientConfig>, ConnError> {
        let key = TlsKey {
            verify: files.verify as u8,
            root: files.root.map(Pem::cache_key),
            cert: files.cert.map(Pem::cache_key),
            key: files.key.map(Pem::cache_key),
        };
        {
            let map = self.inner.lock().unwrap_or_else(PoisonError::into_inner);
            if let Some((c, at)) = map.get(&key)
                && at.elapsed() < TLS_CONFIG_TTL
            {
                return Ok(Arc::clone(c));
            }
        }
        let config = build(files, alpn)?;
        let mut map = self.inner.lock().unwrap_or_else(PoisonError::into_inner);
        map.retain(|_, (_, at)| at.elapsed() < TLS_CONFIG_TTL);
        if map.len() >= TLS_CONFIG_CAP {
            map.clear();
        }
        map.insert(key, (Arc::clone(&config), Instant::now()));
        Ok(config)
    }
}

/// Build the client configuration for `files`, offering `alpn`.
///
/// # Errors
/// As [`TlsConfigCache::get_or_build`].
pub fn build(files: &TlsFiles<'_>, alpn: &[&[u8]]) -> Result<Arc<rustls::ClientConfig>, ConnError> {
    let ca = match files.root {
        // libpq 16: `sslrootcert=system` means the system's trust store.
        Some(Pem::Path(path)) if path == Path::new("system") => None,
        Some(pem) => Some(pem.source("sslrootcert")),
        None => None,
    };
    let client_cert = files
        .cert
        .zip(files.key)
        .map(|(c, k)| (c.source("sslcert"), k.source("sslkey")));
    let config = tls::client_config_from(TlsSources {
        verify: files.verify,
        ca,
        with_system_roots: false,
        client_cert,
    })
    .map_err(|e| ConnError::Config(format!("upstream TLS settings: {e}")))?;
    let hinted = client_cert.is_some().then(|| {
        config
            .client_auth_cert_resolver
            .resolve(&[], &[])
            .map(IssuerHinted::new)
    });
    if alpn.is_empty() && hinted.is_none() {
        return Ok(config);
    }
    let mut config = (*config).clone();
    config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    if let Some(Some(h)) = hinted {
        config.client_auth_cert_resolver = Arc::new(h);
    }
    Ok(Arc::new(config))
}

/// The client certificate (`sslcert`/`sslkey`) is sent as Go's `crypto/tls` sends it,
/// which is what Secretless' connectors do: when the server's CertificateRequest names
/// the CAs it accepts, only if one of them issued a certificate of the chain; otherwise
/// no certificate, and the server may still let the password in. (rustls, like
/// OpenSSL, would send it anyway and the server would end the handshake with
/// `unknown_ca`: Secretless' own test `sslkey=notsignedbyca` expects a session.)
struct IssuerHinted {
    key: Arc<rustls::sign::CertifiedKey>,
    /// The DER `Name` of each chain certificate's issuer.
    issuers: Vec<Vec<u8>>,
}

impl IssuerHinted {
    fn new(key: Arc<rustls::sign::CertifiedKey>) -> Self {
        let issuers = key
            .cert
            .iter()
            .filter_map(|c| {
                let (_, cert) = x509_parser::parse_x509_certificate(c).ok()?;
                Some(cert.tbs_certificate.issuer.as_raw().to_vec())
            })
            .collect();
        Self { key, issuers }
    }

    /// Whether `hint` (a DER `Name`, or its contents without the outer SEQUENCE header)
    /// names the issuer `raw`.
    fn names(raw: &[u8], hint: &[u8]) -> bool {
        if raw == hint {
            return true;
        }
        let header = match raw.get(1) {
            Some(&l) if l < 0x80 => 2,
            Some(&l) => 2 + usize::from(l & 0x7f),
            None => return false,
        };
        raw.get(header..) == Some(hint)
    }
}

impl fmt::Debug for IssuerHinted {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("IssuerHinted")
            .field("issuers", &self.issuers.len())
            .finish_non_exhaustive()
    }
}

impl rustls::client::ResolvesClientCert for IssuerHinted {
    fn resolve(
        &self,
        root_hint_subjects: &[&[u8]],
        _sigschemes: &[rustls::SignatureScheme],
    ) -> Option<Arc<rustls::sign::CertifiedKey>> {
        let acceptable = root_hint_subjects.is_empty()
            || self
                .issuers
                .iter()
                .any(|i| root_hint_subjects.iter().any(|h| Self::names(i, h)));
        acceptable.then(|| Arc::clone(&self.key))
    }

    fn has_certs(&self) -> bool {
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn creds(pairs: &[(&str, &str)]) -> Credentials {
        let mut c = Credentials::default();
        for (k, v) in pairs {
            c.0.insert((*k).to_owned(), Secret::from_str_value(v));
        }
        c
    }

    #[test]
    fn path_or_pem_text_never_quoted() {
        let c = creds(&[
            ("a", " /etc/ca.pem "),
            ("b", "junk\n-----BEGIN CERTIFICATE-----\nAAAA\n"),
            ("c", "two\nlines-SECRET"),
            ("d", ""),
        ]);
        assert!(matches!(
            Pem::from_credential(&c, "a").unwrap(),
            Some(Pem::Path(p)) if p == Path::new("/etc/ca.pem")
        ));
        assert!(matches!(
            Pem::from_credential(&c, "b").unwrap(),
            Some(Pem::Inline(_))
        ));
        let e = Pem::from_credential(&c, "c").unwrap_err().to_string();
        assert!(e.contains("credential `c`") && !e.contains("SECRET"), "{e}");
        assert!(Pem::from_credential(&c, "d").unwrap().is_none());
        assert!(Pem::from_credential(&c, "missing").unwrap().is_none());
    }

    /// A client certificate goes only to a server that lists its issuer among the CAs
    /// it accepts, or lists none (Go's choice, so Secretless').
    #[test]
    fn client_certificate_sent_as_go_sends_it() {
        use rcgen::{CertificateParams, DnType, IsCa, Issuer, KeyPair};
        let ca = |cn: &str| {
            let mut p = CertificateParams::new(Vec::<String>::new()).unwrap();
            p.distinguished_name.push(DnType::CommonName, cn);
            p.is_ca = IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
            let key = KeyPair::generate().unwrap();
            let cert = p.self_signed(&key).unwrap();
            (cert, key, p)
        };
        let (ca_a, ca_a_key, ca_a_params) = ca("CA A");
        let (ca_b, _, _) = ca("CA B");
        let issuer = Issuer::new(ca_a_params, ca_a_key);
        let mut p = CertificateParams::new(vec!["client".to_owned()]).unwrap();
        p.distinguished_name.push(DnType::CommonName, "client");
        let key = KeyPair::generate().unwrap();
        let leaf = p.signed_by(&key, &issuer).unwrap();
        let c = creds(&[("sslcert", &leaf.pem()), ("sslkey", &key.serialize_pem())]);
        let (cert, key) = (
            Pem::from_credential(&c, "sslcert").unwrap().unwrap(),
            Pem::from_credential(&c, "sslkey").unwrap().unwrap(),
        );
        let config = build(
            &TlsFiles {
                verify: Verify::None,
                root: None,
                cert: Some(&cert),
                key: Some(&key),
            },
            &[],
        )
        .unwrap();
        let subject = |der: &[u8]| {
            let (_, c) = x509_parser::parse_x509_certificate(der).unwrap();
            c.tbs_certificate.subject.as_raw().to_vec()
        };
        let (a, b) = (subject(ca_a.der()), subject(ca_b.der()));
        let r = &config.client_auth_cert_resolver;
        assert!(r.has_certs());
        assert!(r.resolve(&[], &[]).is_some(), "no hint: sent");
        assert!(r.resolve(&[&b, &a], &[]).is_some(), "issuer listed: sent");
        assert!(
            r.resolve(&[&a[2..]], &[]).is_some(),
            "listed without its header"
        );
        assert!(
            r.resolve(&[&b], &[]).is_none(),
            "issuer not listed: not sent"
        );
        assert_eq!(format!("{:?}", r), "IssuerHinted { issuers: 1, .. }");
    }

    #[test]
    fn cache_reuses_a_config_and_sets_alpn() {
        let cache = TlsConfigCache::default();
        let files = TlsFiles {
            verify: Verify::None,
            root: None,
            cert: None,
            key: None,
        };
        let a = cache.get_or_build(&files, &[b"x"]).unwrap();
        let b = cache.get_or_build(&files, &[b"x"]).unwrap();
        assert!(Arc::ptr_eq(&a, &b));
        assert_eq!(a.alpn_protocols, vec![b"x".to_vec()]);
        assert!(build(&files, &[]).unwrap().alpn_protocols.is_empty());
    }
}
