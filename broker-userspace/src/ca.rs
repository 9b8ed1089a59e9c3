//! The broker's local certificate authority. It issues the certificates the broker
//! presents to apps on legs it terminates (PostgreSQL `clientTLS`; HTTPS interception
//! will use the same CA), so an app that verifies (`sslmode=verify-full` with
//! `sslrootcert=ca.crt`) sees a certificate for the very hostname it dialled.
//!
//! The CA lives in `broker.caDir` (default `/var/lib/broker/ca`): `ca.crt` (mode 0644,
//! what apps trust) and `ca.key` (0600, created exclusively; never printed). It is
//! created on first use (`broker ca` creates it and prints the certificate). Leaf
//! certificates are issued in memory (ECDSA P-256, valid [`LEAF_LIFETIME`], SANs: the
//! name only) and cached per name, bounded.

use std::{
    collections::HashMap,
    io::Write as _,
    os::unix::fs::{DirBuilderExt as _, OpenOptionsExt as _},
    path::{Path, PathBuf},
    sync::{Arc, Mutex, PoisonError},
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};
use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose,
};
use rustls::{
    pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer},
    server::ServerConfig,
};

/// How long an issued leaf certificate is valid.
pub const LEAF_LIFETIME: Duration = Duration::from_secs(7 * 24 * 3600);
/// A cached leaf is reissued once it is this old (well before it expires).
const LEAF_REISSUE: Duration = Duration::from_secs(24 * 3600);
/// Leaf certificates kept (one per name); the oldest goes when full.
pub const LEAF_CACHE: usize = 1024;
/// How long the CA certificate is valid when the broker creates it.
const CA_LIFETIME_DAYS: i64 = 3650;

/// A leaf certificate and what presenting it needs.
pub struct Leaf {
    /// The leaf, then the CA.
    pub chain: Vec<CertificateDer<'static>>,
    key_der: Vec<u8>,
    issued: Instant,
    /// Server configurations built from this leaf, by ALPN list (one per protocol that
    /// presents it): built once, not per connection.
    configs: Mutex<Vec<(Alpn, Arc<ServerConfig>)>>,
}

/// An ALPN protocol list.
type Alpn = Vec<Vec<u8>>;

impl Leaf {
    /// A TLS server configuration presenting this leaf, offering `alpn` (empty: none).
    ///
    /// # Errors
    /// When rustls refuses the key (not expected for keys issued here).
    pub fn server_config(&self, alpn: &[&[u8]]) -> anyhow::Result<Arc<ServerConfig>> {
        let alpn: Alpn = alpn.iter().map(|p| p.to_vec()).collect();
        let mut configs = self.configs.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some((_, cfg)) = configs.iter().find(|(a, _)| *a == alpn) {
            return Ok(Arc::clone(cfg));
        }
        let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(self.key_der.clone()));
        let mut cfg = ServerConfig::builder_with_provider(crate::tls::provider())
            .with_safe_default_protocol_versions()?
            .with_no_client_auth()
            .with_single_cert(self.chain.clone(), key)
            .context("building the TLS server configuration")?;
        cfg.alpn_protocols = alpn.clone();
        // Our suite order (AES-128-GCM first, see `tls::provider`), not the client's.
        cfg.ignore_client_order = true;
        let cfg = Arc::new(cfg);
        configs.push((alpn, Arc::clone(&cfg)));
        Ok(cfg)
    }
}

impl Drop for Leaf {
    fn drop(&mut self) {
        zeroize::Zeroize::zeroize(&mut self.key_der);
    }
}

/// The CA, loaded or created.
pub struct LocalCa {
    cert_path: PathBuf,
    cert_der: CertificateDer<'static>,
    issuer: Issuer<'static, KeyPair>,
    leaves: Mutex<HashMap<String, Arc<Leaf>>>,
}

impl std::fmt::Debug for LocalCa {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LocalCa")
            .field("cert", &self.cert_path)
            .finish_non_exhaustive()
    }
}

impl LocalCa {
    /// Load the CA in `dir`, creating it (and `dir`, mode 0700) when there is none.
    ///
    /// # Errors
    /// Unreadable or invalid files (named), one of the two files without the other, or
    /// a key readable by others.
    pub fn load_or_create(dir: &Path) -> anyhow::Result<Self> {
        let cert_path = dir.join("ca.crt");
        let key_path = dir.join("ca.key");
        match (cert_path.exists(), key_path.exists()) {
            (true, true) => {}
            (false, false) => create(dir, &cert_path, &key_path)?,
            _ => bail!(
                "{}: ca.crt and ca.key must both exist (or neither, to create a new CA)",
                dir.display()
            ),
        }
        let meta = std::fs::metadata(&key_path)
            .with_context(|| format!("reading {}", key_path.display()))?;
        if std::os::unix::fs::PermissionsExt::mode(&meta.permissions()) & 0o077 != 0 {
            bail!(
                "{}: the CA key is readable by others; chmod 600 it",
                key_path.display()
            );
        }
        let key_pem = zeroize::Zeroizing::new(
            std::fs::read_to_string(&key_path)
                .with_context(|| format!("reading {}", key_path.display()))?,
        );
        let key = KeyPair::from_pem(&key_pem).map_err(|e| {
            anyhow::anyhow!("{}: not a usable private key: {e}", key_path.display())
        })?;
        let cert_pem = std::fs::read_to_string(&cert_path)
            .with_context(|| format!("reading {}", cert_path.display()))?;
        let cert_der = rustls_pemfile_first(&cert_pem)
            .with_context(|| format!("{}: no PEM certificate", cert_path.display()))?;
        let issuer = Issuer::from_ca_cert_der(&cert_der, key).map_err(|e| {
            anyhow::anyhow!("{}: not a usable CA certificate: {e}", cert_path.display())
        })?;
        Ok(Self {
            cert_path,
            cert_der,
            issuer,
            leaves: Mutex::new(HashMap::new()),
        })
    }

    /// Where the CA certificate is (what apps trust).
    #[must_use]
    pub fn cert_path(&self) -> &Path {
        &self.cert_path
    }

    /// The leaf certificate for `name` (a DNS name or an IP address), from the cache or
    /// issued now.
    ///
    /// # Errors
    /// A name rcgen cannot put in a certificate.
    pub fn leaf(&self, name: &str) -> anyhow::Result<Arc<Leaf>> {
        let mut leaves = self.leaves.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(l) = leaves.get(name)
            && l.issued.elapsed() < LEAF_REISSUE
        {
            return Ok(Arc::clone(l));
        }
        let leaf = Arc::new(self.issue(name)?);
        if leaves.len() >= LEAF_CACHE
            && let Some(oldest) = leaves
                .iter()
                .min_by_key(|(_, l)| l.issued)
                .map(|(k, _)| k.clone())
        {
            leaves.remove(&oldest);
        }
        leaves.insert(name.to_owned(), Arc::clone(&leaf));
        Ok(leaf)
    }

    fn issue(&self, name: &str) -> anyhow::Result<Leaf> {
        let mut params = CertificateParams::new(vec![name.to_owned()])
            .map_err(|e| anyhow::anyhow!("cannot issue a certificate for {name:?}: {e}"))?;
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, name);
        params.distinguished_name = dn;
        let now = time_now();
        params.not_before = now - time::Duration::minutes(5);
        params.not_after = now + time::Duration::seconds(LEAF_LIFETIME.as_secs() as i64);
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        params.use_authority_key_identifier_extension = true;
        let key = KeyPair::generate().context("generating a key")?;
        let cert = params
            .signed_by(&key, &self.issuer)
            .map_err(|e| anyhow::anyhow!("signing a certificate for {name:?}: {e}"))?;
        Ok(Leaf {
            chain: vec![cert.der().clone(), self.cert_der.clone()],
            key_der: key.serialize_der(),
            issued: Instant::now(),
            configs: Mutex::new(Vec::new()),
        })
    }
}

fn time_now() -> time::OffsetDateTime {
    time::OffsetDateTime::now_utc()
}

/// The first certificate of a PEM text.
fn rustls_pemfile_first(pem: &str) -> Option<CertificateDer<'static>> {
    use rustls::pki_types::pem::PemObject as _;
    CertificateDer::pem_slice_iter(pem.as_bytes()).next()?.ok()
}

/// A new CA in `dir`: the key written exclusively with mode 0600, then the certificate.
fn create(dir: &Path, cert_path: &Path, key_path: &Path) -> anyhow::Result<()> {
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .with_context(|| format!("creating {}", dir.display()))?;
    let key = KeyPair::generate().context("generating the CA key")?;
    let mut params = CertificateParams::new(Vec::<String>::new())?;
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, "credential broker local CA");
    dn.push(DnType::OrganizationName, "credential broker");
    params.distinguished_name = dn;
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    let now = time_now();
    params.not_before = now - time::Duration::minutes(5);
    params.not_after = now + time::Duration::days(CA_LIFETIME_DAYS);
    let cert = params
        .self_signed(&key)
        .context("signing the CA certificate")?;
    let key_pem = zeroize::Zeroizing::new(key.serialize_pem());
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(key_path)
        .with_context(|| format!("creating {}", key_path.display()))?;
    f.write_all(key_pem.as_bytes())
        .with_context(|| format!("writing {}", key_path.display()))?;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o644)
        .open(cert_path)
        .with_context(|| format!("creating {}", cert_path.display()))?;
    f.write_all(cert.pem().as_bytes())
        .with_context(|| format!("writing {}", cert_path.display()))?;
    tracing::info!(cert = %cert_path.display(), "created the broker's local CA");
    Ok(())
}

#[cfg(test)]
mod tests {
    use rustls::client::danger::ServerCertVerifier as _;

    use super::*;

    #[test]
    fn creates_once_loads_after_and_issues_verifiable_leaves() {
        let dir = tempfile::tempdir().unwrap();
        let ca_dir = dir.path().join("ca");
        let ca = LocalCa::load_or_create(&ca_dir).unwrap();
        let first = std::fs::read(ca_dir.join("ca.crt")).unwrap();
        let mode = std::fs::metadata(ca_dir.join("ca.key"))
            .unwrap()
            .permissions();
        assert_eq!(
            std::os::unix::fs::PermissionsExt::mode(&mode) & 0o777,
            0o600
        );
        // Loading again keeps the same CA.
        let again = LocalCa::load_or_create(&ca_dir).unwrap();
        assert_eq!(std::fs::read(ca_dir.join("ca.crt")).unwrap(), first);

        // A leaf verifies against the CA for its name, and is cached.
        let leaf = ca.leaf("db.example.test").unwrap();
        assert!(Arc::ptr_eq(&leaf, &ca.leaf("db.example.test").unwrap()));
        let mut roots = rustls::RootCertStore::empty();
        roots.add(again.cert_der.clone()).unwrap();
        let verifier = rustls::client::WebPkiServerVerifier::builder_with_provider(
            Arc::new(roots),
            Arc::new(rustls::crypto::ring::default_provider()),
        )
        .build()
        .unwrap();
        let now = rustls::pki_types::UnixTime::now();
        let name = rustls::pki_types::ServerName::try_from("db.example.test").unwrap();
        verifier
            .verify_server_cert(&leaf.chain[0], &leaf.chain[1..], &name, &[], now)
            .unwrap();
        let wrong = rustls::pki_types::ServerName::try_from("other.example.test").unwrap();
        assert!(
            verifier
                .verify_server_cert(&leaf.chain[0], &leaf.chain[1..], &wrong, &[], now)
                .is_err()
        );
        // An IP address gets an IP SAN.
        let ip = ca.leaf("10.1.2.3").unwrap();
        let name = rustls::pki_types::ServerName::try_from("10.1.2.3").unwrap();
        verifier
            .verify_server_cert(&ip.chain[0], &ip.chain[1..], &name, &[], now)
            .unwrap();
        let cfg = leaf.server_config(&[b"postgresql"]).unwrap();
        assert!(Arc::ptr_eq(
            &cfg,
            &leaf.server_config(&[b"postgresql"]).unwrap()
        ));
    }

    #[test]
    fn refuses_half_a_ca_and_a_key_readable_by_others() {
        let dir = tempfile::tempdir().unwrap();
        LocalCa::load_or_create(dir.path()).unwrap();
        let key = dir.path().join("ca.key");
        std::fs::set_permissions(&key, std::os::unix::fs::PermissionsExt::from_mode(0o644))
            .unwrap();
        let e = LocalCa::load_or_create(dir.path()).unwrap_err().to_string();
        assert!(e.contains("readable by others"), "{e}");
        std::fs::remove_file(&key).unwrap();
        let e = LocalCa::load_or_create(dir.path()).unwrap_err().to_string();
        assert!(e.contains("must both exist"), "{e}");
    }
}
