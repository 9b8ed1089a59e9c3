//! A fake MySQL 8 server speaking `caching_sha2_password`, written from the MySQL
//! client/server protocol documentation (the "Connection Phase", "Protocol::HandshakeV10",
//! "Protocol::HandshakeResponse41", "Protocol::AuthSwitchRequest", "Protocol::AuthMoreData",
//! "Caching_sha2_password information" and "Native Authentication" pages, and the text
//! protocol's `COM_QUERY` response) and nothing else: no MySQL code went into it.
//!
//! What it does:
//! * handshake v10 naming the server's default plugin (`caching_sha2_password` unless
//!   told otherwise), with `CLIENT_SSL` when TLS is on (a certificate for
//!   `db.example.test` and `localhost` from a test CA made with rcgen);
//! * `caching_sha2_password` as MySQL 8 does it: the server caches SHA256(SHA256(password))
//!   after a full authentication; a login whose scramble checks against the cache is the
//!   fast path (AuthMoreData `0x03`, then OK); otherwise AuthMoreData `0x04` asks for
//!   full authentication, which takes the password in clear over TLS, or RSA-OAEP
//!   encrypted (the client may first ask for the server's public key with `0x02`, which
//!   is answered with its PEM) and XORed with the scramble;
//! * `mysql_native_password` (SHA1 scramble);
//! * an AuthSwitchRequest (with a fresh scramble) when the plugin the client answered
//!   with is not the user's;
//! * after authentication: `COM_QUERY` (a `SELECT` gets a one-column, one-row result set:
//!   `current_user()` gives `user@%`, anything else `1`; other statements get OK),
//!   `COM_PING`, `COM_INIT_DB`, `COM_RESET_CONNECTION`, `COM_QUIT`.
//!
//! Every login is recorded with the path it took ([`AuthPath`]), for the tests to check.

use std::{
    collections::HashMap,
    io::{Read, Write},
    net::{SocketAddr, TcpListener, TcpStream},
    path::{Path, PathBuf},
    process::Command,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicU32, Ordering},
    },
    thread,
    time::Duration,
};

use rsa::{
    Oaep, RsaPrivateKey,
    pkcs8::{DecodePrivateKey as _, EncodePublicKey as _, LineEnding},
};
use sha1::Sha1;
use sha2::{Digest as _, Sha256};

/// An authentication plugin the fake server knows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Plugin {
    CachingSha2,
    Native,
}

impl Plugin {
    #[must_use]
    pub fn name(self) -> &'static str {
        match self {
            Self::CachingSha2 => "caching_sha2_password",
            Self::Native => "mysql_native_password",
        }
    }

    fn from_name(name: &str) -> Option<Self> {
        match name {
            "caching_sha2_password" => Some(Self::CachingSha2),
            "mysql_native_password" => Some(Self::Native),
            _ => None,
        }
    }
}

/// How a login was authenticated.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AuthPath {
    /// `caching_sha2_password`, scramble checked against the cache.
    Fast,
    /// `caching_sha2_password` full authentication, the password in clear over TLS.
    FullTls,
    /// `caching_sha2_password` full authentication, RSA-OAEP; `key_requested` when the
    /// client asked for the public key (`0x02`) rather than knowing it.
    FullRsa { key_requested: bool },
    /// `mysql_native_password`.
    Native,
}

/// One login attempt as the server saw it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Login {
    pub user: String,
    /// The database the client named, if any.
    pub database: Option<String>,
    /// The session was TLS.
    pub tls: bool,
    /// The server sent an AuthSwitchRequest.
    pub switched: bool,
    /// `Ok(path)` for an accepted login; `Err(why)` for a refused one.
    pub result: Result<AuthPath, String>,
}

/// A user account.
#[derive(Debug, Clone)]
pub struct FakeUser {
    pub name: String,
    pub password: String,
    pub plugin: Plugin,
}

impl FakeUser {
    #[must_use]
    pub fn new(name: &str, password: &str, plugin: Plugin) -> Self {
        Self {
            name: name.into(),
            password: password.into(),
            plugin,
        }
    }
}

#[derive(Debug, Clone)]
pub struct FakeOptions {
    /// Loopback address to listen on.
    pub ip: String,
    /// Port; a free one when 0.
    pub port: u16,
    /// The plugin named in the handshake.
    pub default_plugin: Plugin,
    /// Offer TLS (`CLIENT_SSL`).
    pub tls: bool,
    pub users: Vec<FakeUser>,
}

impl FakeOptions {
    /// `caching_sha2_password` by default, no TLS, on 127.0.0.1.
    #[must_use]
    pub fn new(users: Vec<FakeUser>) -> Self {
        Self {
            ip: "127.0.0.1".into(),
            port: 0,
            default_plugin: Plugin::CachingSha2,
            tls: false,
            users,
        }
    }

    #[must_use]
    pub fn tls(mut self) -> Self {
        self.tls = true;
        self
    }

    #[must_use]
    pub fn default_plugin(mut self, p: Plugin) -> Self {
        self.default_plugin = p;
        self
    }
}

struct State {
    users: Mutex<HashMap<String, FakeUser>>,
    /// user -> SHA256(SHA256(password)), filled by a successful full authentication.
    cache: Mutex<HashMap<String, [u8; 32]>>,
    logins: Mutex<Vec<Login>>,
    key: RsaPrivateKey,
    public_pem: String,
    default_plugin: Plugin,
    tls: Option<Arc<rustls::ServerConfig>>,
    next_id: AtomicU32,
}

/// The running server; stops accepting when dropped.
pub struct FakeMySql {
    pub addr: SocketAddr,
    /// The test CA (PEM) when TLS is on.
    pub ca_cert: Option<PathBuf>,
    /// The server's RSA public key (PEM), as it answers a `0x02` request.
    pub public_key: PathBuf,
    state: Arc<State>,
    stop: Arc<AtomicBool>,
    _dir: tempfile::TempDir,
}

// Capability flags (Protocol::CapabilityFlags).
const CLIENT_LONG_PASSWORD: u32 = 1;
const CLIENT_FOUND_ROWS: u32 = 2;
const CLIENT_LONG_FLAG: u32 = 4;
const CLIENT_CONNECT_WITH_DB: u32 = 8;
const CLIENT_PROTOCOL_41: u32 = 0x200;
const CLIENT_SSL: u32 = 0x800;
const CLIENT_TRANSACTIONS: u32 = 0x2000;
const CLIENT_SECURE_CONNECTION: u32 = 0x8000;
const CLIENT_MULTI_STATEMENTS: u32 = 0x1_0000;
const CLIENT_MULTI_RESULTS: u32 = 0x2_0000;
const CLIENT_PLUGIN_AUTH: u32 = 0x8_0000;
const CLIENT_CONNECT_ATTRS: u32 = 0x10_0000;
const CLIENT_PLUGIN_AUTH_LENENC_CLIENT_DATA: u32 = 0x20_0000;
const CLIENT_DEPRECATE_EOF: u32 = 0x100_0000;

const SERVER_STATUS_AUTOCOMMIT: u16 = 2;

impl FakeMySql {
    /// Start listening; keys and certificates go to a new temporary directory.
    ///
    /// # Panics
    /// When the port cannot be bound or a key cannot be made.
    #[must_use]
    pub fn start(opts: FakeOptions) -> Self {
        let dir = tempfile::Builder::new()
            .prefix("broker-fake-mysql-")
            .tempdir()
            .expect("tempdir");
        let key = rsa_key(dir.path());
        let public_pem = key
            .to_public_key()
            .to_public_key_pem(LineEnding::LF)
            .expect("public key PEM");
        let public_key = dir.path().join("public_key.pem");
        std::fs::write(&public_key, &public_pem).expect("write public key");
        let (tls, ca_cert) = if opts.tls {
            let (cfg, ca) = tls_config(dir.path());
            (Some(cfg), Some(ca))
        } else {
            (None, None)
        };
        let port = if opts.port == 0 {
            crate::free_port()
        } else {
            opts.port
        };
        let listener = TcpListener::bind((opts.ip.as_str(), port)).expect("bind fake mysql");
        let addr = listener.local_addr().expect("local_addr");
        let users = opts
            .users
            .into_iter()
            .map(|u| (u.name.clone(), u))
            .collect();
        let state = Arc::new(State {
            users: Mutex::new(users),
            cache: Mutex::new(HashMap::new()),
            logins: Mutex::new(Vec::new()),
            key,
            public_pem,
            default_plugin: opts.default_plugin,
            tls,
            next_id: AtomicU32::new(1),
        });
        let stop = Arc::new(AtomicBool::new(false));
        let (st, sp) = (Arc::clone(&state), Arc::clone(&stop));
        thread::spawn(move || {
            for conn in listener.incoming() {
                if sp.load(Ordering::SeqCst) {
                    return;
                }
                let Ok(c) = conn else { continue };
                let st = Arc::clone(&st);
                thread::spawn(move || {
                    let _ = c.set_read_timeout(Some(Duration::from_secs(30)));
                    let _ = c.set_nodelay(true);
                    let _ = serve(&st, c);
                });
            }
        });
        Self {
            addr,
            ca_cert,
            public_key,
            state,
            stop,
            _dir: dir,
        }
    }

    /// Every login attempt so far, in order.
    #[must_use]
    pub fn logins(&self) -> Vec<Login> {
        self.state.logins.lock().expect("logins").clone()
    }

    /// How many accepted logins took `path`.
    #[must_use]
    pub fn count(&self, path: AuthPath) -> usize {
        self.logins()
            .iter()
            .filter(|l| l.result == Ok(path))
            .count()
    }

    /// Change a user's password; like `ALTER USER`, this drops the user's cache entry.
    pub fn set_password(&self, user: &str, password: &str) {
        let mut users = self.state.users.lock().expect("users");
        users.get_mut(user).expect("known user").password = password.into();
        self.state.cache.lock().expect("cache").remove(user);
    }

    /// Empty the cache (`FLUSH PRIVILEGES`): the next `caching_sha2_password` login of
    /// every user takes the full path.
    pub fn flush_cache(&self) {
        self.state.cache.lock().expect("cache").clear();
    }
}

impl Drop for FakeMySql {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        let _ = TcpStream::connect_timeout(&self.addr, Duration::from_secs(1));
    }
}

/// A 2048-bit RSA key: `openssl genpkey` (fast, where a debug build of the key
/// generation would take long), read back as PKCS#8.
fn rsa_key(dir: &Path) -> RsaPrivateKey {
    let path = dir.join("private_key.pem");
    let out = Command::new("openssl")
        .args([
            "genpkey",
            "-algorithm",
            "RSA",
            "-pkeyopt",
            "rsa_keygen_bits:2048",
            "-out",
        ])
        .arg(&path)
        .output()
        .expect("run openssl genpkey");
    assert!(
        out.status.success(),
        "openssl genpkey: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let pem = std::fs::read_to_string(&path).expect("read key");
    RsaPrivateKey::from_pkcs8_pem(&pem).expect("PKCS#8 RSA key")
}

/// A server configuration with a certificate for `db.example.test` and `localhost`
/// from a new test CA, whose certificate is written to `dir/fake-mysql-ca.crt`.
fn tls_config(dir: &Path) -> (Arc<rustls::ServerConfig>, PathBuf) {
    let ca_key = rcgen::KeyPair::generate().expect("key");
    let mut ca_params = rcgen::CertificateParams::new(Vec::new()).expect("params");
    ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    ca_params
        .distinguished_name
        .push(rcgen::DnType::CommonName, "broker test fake MySQL CA");
    let ca = ca_params.self_signed(&ca_key).expect("CA");
    let issuer = rcgen::Issuer::new(ca_params, ca_key);
    let key = rcgen::KeyPair::generate().expect("key");
    let leaf = rcgen::CertificateParams::new(vec!["db.example.test".into(), "localhost".into()])
        .expect("params")
        .signed_by(&key, &issuer)
        .expect("leaf");
    let ca_path = dir.join("fake-mysql-ca.crt");
    std::fs::write(&ca_path, ca.pem()).expect("write CA");
    let cfg = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .expect("versions")
    .with_no_client_auth()
    .with_single_cert(
        vec![leaf.der().clone()],
        rustls::pki_types::PrivateKeyDer::Pkcs8(key.serialize_der().into()),
    )
    .expect("server config");
    (Arc::new(cfg), ca_path)
}

/// SHA1(password) XOR SHA1(nonce + SHA1(SHA1(password))): what a `mysql_native_password`
/// client sends.
#[must_use]
pub fn native_scramble(password: &[u8], nonce: &[u8]) -> [u8; 20] {
    let h1: [u8; 20] = Sha1::digest(password).into();
    let h2: [u8; 20] = Sha1::digest(h1).into();
    let mut h = Sha1::new();
    h.update(nonce);
    h.update(h2);
    let h3: [u8; 20] = h.finalize().into();
    std::array::from_fn(|i| h1[i] ^ h3[i])
}

/// SHA256(password) XOR SHA256(SHA256(SHA256(password)) + nonce): what a
/// `caching_sha2_password` client sends first.
#[must_use]
pub fn sha2_scramble(password: &[u8], nonce: &[u8]) -> [u8; 32] {
    let h1: [u8; 32] = Sha256::digest(password).into();
    let h2: [u8; 32] = Sha256::digest(h1).into();
    let mut h = Sha256::new();
    h.update(h2);
    h.update(nonce);
    let h3: [u8; 32] = h.finalize().into();
    std::array::from_fn(|i| h1[i] ^ h3[i])
}

/// The fast-path check: does `reply` prove knowledge of the password whose
/// SHA256(SHA256()) is `cached`?
fn sha2_fast_check(cached: &[u8; 32], nonce: &[u8], reply: &[u8]) -> bool {
    if reply.len() != 32 {
        return false;
    }
    let mut h = Sha256::new();
    h.update(cached);
    h.update(nonce);
    let mask: [u8; 32] = h.finalize().into();
    let h1: [u8; 32] = std::array::from_fn(|i| reply[i] ^ mask[i]);
    let again: [u8; 32] = Sha256::digest(h1).into();
    &again == cached
}

fn sha2_stage2(password: &[u8]) -> [u8; 32] {
    Sha256::digest(Sha256::digest(password)).into()
}

/// A nonce as MySQL sends one: 20 bytes, no NUL (the handshake NUL-terminates it).
fn nonce() -> [u8; 20] {
    use rsa::rand_core::RngCore as _;
    let mut b = [0u8; 20];
    rsa::rand_core::OsRng.fill_bytes(&mut b);
    for x in &mut b {
        *x = (*x % 127) + 1;
    }
    b
}

/// XOR `data` with `key` repeated (how the password is masked before RSA).
fn xor_cycle(data: &[u8], key: &[u8]) -> Vec<u8> {
    data.iter()
        .zip(key.iter().cycle())
        .map(|(a, b)| a ^ b)
        .collect()
}

// ---- wire ----

enum Stream {
    Plain(TcpStream),
    Tls(Box<rustls::StreamOwned<rustls::ServerConnection, TcpStream>>),
    Gone,
}

impl Read for Stream {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        match self {
            Self::Plain(s) => s.read(buf),
            Self::Tls(s) => s.read(buf),
            Self::Gone => Ok(0),
        }
    }
}

impl Write for Stream {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        match self {
            Self::Plain(s) => s.write(buf),
            Self::Tls(s) => s.write(buf),
            Self::Gone => Err(std::io::ErrorKind::BrokenPipe.into()),
        }
    }

    fn flush(&mut self) -> std::io::Result<()> {
        match self {
            Self::Plain(s) => s.flush(),
            Self::Tls(s) => s.flush(),
            Self::Gone => Ok(()),
        }
    }
}

/// Packets: 3-byte little-endian length, sequence id, payload.
struct Wire {
    s: Stream,
    seq: u8,
}

type Res<T> = Result<T, String>;

impl Wire {
    fn read(&mut self) -> Res<Vec<u8>> {
        let mut payload = Vec::new();
        loop {
            let mut h = [0u8; 4];
            self.s
                .read_exact(&mut h)
                .map_err(|e| format!("read: {e}"))?;
            let len = usize::from(h[0]) | usize::from(h[1]) << 8 | usize::from(h[2]) << 16;
            self.seq = h[3].wrapping_add(1);
            let start = payload.len();
            payload.resize(start + len, 0);
            self.s
                .read_exact(&mut payload[start..])
                .map_err(|e| format!("read: {e}"))?;
            if len < 0xff_ffff {
                return Ok(payload);
            }
        }
    }

    fn write(&mut self, payload: &[u8]) -> Res<()> {
        let mut out = Vec::with_capacity(payload.len() + 8);
        let mut rest = payload;
        loop {
            // A payload of exactly k * 0xffffff bytes ends with an empty packet.
            let n = rest.len().min(0xff_ffff);
            out.extend_from_slice(&[n as u8, (n >> 8) as u8, (n >> 16) as u8, self.seq]);
            out.extend_from_slice(&rest[..n]);
            self.seq = self.seq.wrapping_add(1);
            rest = &rest[n..];
            if n < 0xff_ffff {
                break;
            }
        }
        self.s.write_all(&out).map_err(|e| format!("write: {e}"))?;
        self.s.flush().map_err(|e| format!("flush: {e}"))
    }

    fn ok(&mut self, deprecate_eof_end: bool) -> Res<()> {
        let mut p = vec![if deprecate_eof_end { 0xfe } else { 0x00 }, 0, 0];
        p.extend_from_slice(&SERVER_STATUS_AUTOCOMMIT.to_le_bytes());
        p.extend_from_slice(&0u16.to_le_bytes());
        self.write(&p)
    }

    fn err(&mut self, code: u16, state: &str, msg: &str) -> Res<()> {
        let mut p = vec![0xff];
        p.extend_from_slice(&code.to_le_bytes());
        p.push(b'#');
        p.extend_from_slice(state.as_bytes());
        p.extend_from_slice(msg.as_bytes());
        self.write(&p)
    }

    fn eof(&mut self) -> Res<()> {
        let mut p = vec![0xfe, 0, 0];
        p.extend_from_slice(&SERVER_STATUS_AUTOCOMMIT.to_le_bytes());
        self.write(&p)
    }
}

fn put_lenenc_int(out: &mut Vec<u8>, n: u64) {
    if n < 251 {
        out.push(n as u8);
    } else if n < 1 << 16 {
        out.push(0xfc);
        out.extend_from_slice(&(n as u16).to_le_bytes());
    } else if n < 1 << 24 {
        out.push(0xfd);
        out.extend_from_slice(&(n as u32).to_le_bytes()[..3]);
    } else {
        out.push(0xfe);
        out.extend_from_slice(&n.to_le_bytes());
    }
}

fn put_lenenc_str(out: &mut Vec<u8>, s: &[u8]) {
    put_lenenc_int(out, s.len() as u64);
    out.extend_from_slice(s);
}

/// A cursor over a received payload.
struct Cur<'a> {
    b: &'a [u8],
}

impl<'a> Cur<'a> {
    fn take(&mut self, n: usize) -> Res<&'a [u8]> {
        if self.b.len() < n {
            return Err("short packet".into());
        }
        let (a, rest) = self.b.split_at(n);
        self.b = rest;
        Ok(a)
    }

    fn u8(&mut self) -> Res<u8> {
        Ok(self.take(1)?[0])
    }

    fn u32(&mut self) -> Res<u32> {
        let b = self.take(4)?;
        Ok(u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
    }

    fn nul_str(&mut self) -> Res<&'a [u8]> {
        let end = self
            .b
            .iter()
            .position(|&c| c == 0)
            .ok_or("unterminated string")?;
        let s = &self.b[..end];
        self.b = &self.b[end + 1..];
        Ok(s)
    }

    fn lenenc_int(&mut self) -> Res<u64> {
        Ok(match self.u8()? {
            n @ 0..=250 => u64::from(n),
            0xfc => {
                let b = self.take(2)?;
                u64::from(u16::from_le_bytes([b[0], b[1]]))
            }
            0xfd => {
                let b = self.take(3)?;
                u64::from(b[0]) | u64::from(b[1]) << 8 | u64::from(b[2]) << 16
            }
            0xfe => {
                let b = self.take(8)?;
                u64::from_le_bytes(b.try_into().expect("8 bytes"))
            }
            _ => return Err("bad length-encoded integer".into()),
        })
    }
}

/// The parsed HandshakeResponse41.
struct Response {
    caps: u32,
    user: String,
    auth: Vec<u8>,
    database: Option<String>,
    plugin: Option<String>,
}

fn parse_response(p: &[u8], caps: u32) -> Res<Response> {
    let mut c = Cur { b: p };
    c.take(32)?; // capabilities, max packet, charset, filler: read by the caller
    let user = String::from_utf8_lossy(c.nul_str()?).into_owned();
    let auth = if caps & CLIENT_PLUGIN_AUTH_LENENC_CLIENT_DATA != 0 {
        let n = usize::try_from(c.lenenc_int()?).map_err(|_| "length")?;
        c.take(n)?.to_vec()
    } else if caps & CLIENT_SECURE_CONNECTION != 0 {
        let n = usize::from(c.u8()?);
        c.take(n)?.to_vec()
    } else {
        c.nul_str()?.to_vec()
    };
    let database = if caps & CLIENT_CONNECT_WITH_DB != 0 && !c.b.is_empty() {
        Some(String::from_utf8_lossy(c.nul_str()?).into_owned())
    } else {
        None
    };
    let plugin = if caps & CLIENT_PLUGIN_AUTH != 0 && !c.b.is_empty() {
        Some(String::from_utf8_lossy(c.nul_str()?).into_owned())
    } else {
        None
    };
    Ok(Response {
        caps,
        user,
        auth,
        database,
        plugin,
    })
}

fn serve(st: &State, sock: TcpStream) -> Res<()> {
    let peer_ip = sock
        .peer_addr()
        .map_or_else(|_| "unknown".into(), |a| a.ip().to_string());
    let mut w = Wire {
        s: Stream::Plain(sock),
        seq: 0,
    };
    let id = st.next_id.fetch_add(1, Ordering::SeqCst);
    let mut scramble = nonce();
    let mut server_caps = CLIENT_LONG_PASSWORD
        | CLIENT_FOUND_ROWS
        | CLIENT_LONG_FLAG
        | CLIENT_CONNECT_WITH_DB
        | CLIENT_PROTOCOL_41
        | CLIENT_TRANSACTIONS
        | CLIENT_SECURE_CONNECTION
        | CLIENT_MULTI_STATEMENTS
        | CLIENT_MULTI_RESULTS
        | CLIENT_PLUGIN_AUTH
        | CLIENT_CONNECT_ATTRS
        | CLIENT_PLUGIN_AUTH_LENENC_CLIENT_DATA
        | CLIENT_DEPRECATE_EOF;
    if st.tls.is_some() {
        server_caps |= CLIENT_SSL;
    }
    // Protocol::HandshakeV10.
    let mut h = vec![10u8];
    h.extend_from_slice(b"8.0.36-fake\0");
    h.extend_from_slice(&id.to_le_bytes());
    h.extend_from_slice(&scramble[..8]);
    h.push(0);
    h.extend_from_slice(&(server_caps as u16).to_le_bytes());
    h.push(255); // utf8mb4_0900_ai_ci
    h.extend_from_slice(&SERVER_STATUS_AUTOCOMMIT.to_le_bytes());
    h.extend_from_slice(&((server_caps >> 16) as u16).to_le_bytes());
    h.push(21);
    h.extend_from_slice(&[0; 10]);
    h.extend_from_slice(&scramble[8..]);
    h.push(0);
    h.extend_from_slice(st.default_plugin.name().as_bytes());
    h.push(0);
    w.write(&h)?;

    let mut p = w.read()?;
    let mut client_caps = Cur { b: &p }.u32()?;
    let mut tls = false;
    if client_caps & CLIENT_SSL != 0 && p.len() == 32 {
        // SSLRequest: switch to TLS, then the real response comes.
        let cfg = st
            .tls
            .clone()
            .ok_or("SSLRequest without CLIENT_SSL offered")?;
        let Stream::Plain(sock) = std::mem::replace(&mut w.s, Stream::Gone) else {
            return Err("TLS twice".into());
        };
        let conn = rustls::ServerConnection::new(cfg).map_err(|e| e.to_string())?;
        w.s = Stream::Tls(Box::new(rustls::StreamOwned::new(conn, sock)));
        tls = true;
        p = w.read()?;
        client_caps = Cur { b: &p }.u32()?;
    }
    let caps = client_caps & server_caps;
    let resp = parse_response(&p, caps)?;
    let mut login = Login {
        user: resp.user.clone(),
        database: resp.database.clone(),
        tls,
        switched: false,
        result: Err("incomplete".into()),
    };
    let outcome = authenticate(st, &mut w, &resp, &mut scramble, tls, &mut login);
    let deny = format!(
        "Access denied for user '{}'@'{peer_ip}' (using password: {})",
        resp.user,
        if resp.auth.is_empty() { "NO" } else { "YES" }
    );
    match outcome {
        Ok(path) => {
            login.result = Ok(path);
            st.logins.lock().expect("logins").push(login);
        }
        Err(why) => {
            login.result = Err(why.clone());
            st.logins.lock().expect("logins").push(login);
            let _ = w.err(1045, "28000", &deny);
            return Err(why);
        }
    }
    w.ok(false)?;
    commands(
        &mut w,
        &resp.user,
        id,
        resp.caps & CLIENT_DEPRECATE_EOF != 0,
    )
}

/// Run the user's plugin (switching to it when the client answered with another one);
/// the path taken, or why not.
fn authenticate(
    st: &State,
    w: &mut Wire,
    resp: &Response,
    scramble: &mut [u8; 20],
    tls: bool,
    login: &mut Login,
) -> Res<AuthPath> {
    let user = st
        .users
        .lock()
        .expect("users")
        .get(&resp.user)
        .cloned()
        .ok_or_else(|| format!("no user {}", resp.user))?;
    let client_plugin = resp
        .plugin
        .as_deref()
        .and_then(Plugin::from_name)
        .unwrap_or(st.default_plugin);
    let mut auth = resp.auth.clone();
    if client_plugin != user.plugin || resp.plugin.is_none() && user.plugin != st.default_plugin {
        // Protocol::AuthSwitchRequest, with a fresh scramble.
        *scramble = nonce();
        let mut p = vec![0xfe];
        p.extend_from_slice(user.plugin.name().as_bytes());
        p.push(0);
        p.extend_from_slice(scramble.as_slice());
        p.push(0);
        w.write(&p)?;
        auth = w.read()?;
        login.switched = true;
    }
    let password = user.password.as_bytes();
    match user.plugin {
        Plugin::Native => {
            let ok = if password.is_empty() {
                auth.is_empty()
            } else {
                auth == native_scramble(password, scramble.as_slice())
            };
            if ok {
                Ok(AuthPath::Native)
            } else {
                Err("mysql_native_password scramble mismatch".into())
            }
        }
        Plugin::CachingSha2 => {
            if auth.is_empty() || auth == [0] {
                return if password.is_empty() {
                    Ok(AuthPath::Fast)
                } else {
                    Err("empty password".into())
                };
            }
            let cached = st.cache.lock().expect("cache").get(&user.name).copied();
            if let Some(c) = cached
                && sha2_fast_check(&c, scramble.as_slice(), &auth)
            {
                w.write(&[0x01, 0x03])?; // fast_auth_success
                return Ok(AuthPath::Fast);
            }
            // Not cached, or not matching the cache: full authentication.
            w.write(&[0x01, 0x04])?; // perform_full_authentication
            let mut reply = w.read()?;
            let (clear, path) = if tls {
                (reply, AuthPath::FullTls)
            } else {
                let mut key_requested = false;
                if reply == [0x02] {
                    let mut p = vec![0x01];
                    p.extend_from_slice(st.public_pem.as_bytes());
                    w.write(&p)?;
                    reply = w.read()?;
                    key_requested = true;
                }
                if reply.len() != 256 {
                    return Err(format!(
                        "full authentication without TLS needs RSA ({} bytes received)",
                        reply.len()
                    ));
                }
                let masked = st
                    .key
                    .decrypt(Oaep::new::<Sha1>(), &reply)
                    .map_err(|e| format!("RSA-OAEP decryption: {e}"))?;
                (
                    xor_cycle(&masked, scramble.as_slice()),
                    AuthPath::FullRsa { key_requested },
                )
            };
            let clear = clear.strip_suffix(&[0]).unwrap_or(&clear);
            if clear != password {
                return Err("caching_sha2_password full authentication: wrong password".into());
            }
            st.cache
                .lock()
                .expect("cache")
                .insert(user.name.clone(), sha2_stage2(password));
            Ok(path)
        }
    }
}

fn column_def(name: &str) -> Vec<u8> {
    let mut c = Vec::new();
    for s in ["def", "", "", "", name, name] {
        put_lenenc_str(&mut c, s.as_bytes());
    }
    c.push(0x0c);
    c.extend_from_slice(&255u16.to_le_bytes()); // utf8mb4
    c.extend_from_slice(&256u32.to_le_bytes());
    c.push(0xfd); // MYSQL_TYPE_VAR_STRING
    c.extend_from_slice(&0u16.to_le_bytes());
    c.push(0);
    c.extend_from_slice(&[0, 0]);
    c
}

fn commands(w: &mut Wire, user: &str, id: u32, deprecate_eof: bool) -> Res<()> {
    loop {
        let p = match w.read() {
            Ok(p) => p,
            Err(_) => return Ok(()),
        };
        let Some((&cmd, rest)) = p.split_first() else {
            return Err("empty command".into());
        };
        match cmd {
            0x01 => return Ok(()),              // COM_QUIT
            0x02 | 0x0e | 0x1f => w.ok(false)?, // COM_INIT_DB, COM_PING, COM_RESET_CONNECTION
            0x03 => {
                let q = String::from_utf8_lossy(rest).to_lowercase();
                let q = q.trim();
                if !q.starts_with("select") {
                    w.ok(false)?;
                    continue;
                }
                let value = if q.contains("current_user") {
                    format!("{user}@%")
                } else if q.contains("connection_id") {
                    id.to_string()
                } else if q.contains("@@version_comment") {
                    "fake MySQL".to_owned()
                } else {
                    "1".to_owned()
                };
                let name = String::from_utf8_lossy(rest).trim()["select".len()..]
                    .trim()
                    .to_owned();
                w.write(&[1])?;
                w.write(&column_def(&name))?;
                if !deprecate_eof {
                    w.eof()?;
                }
                let mut row = Vec::new();
                put_lenenc_str(&mut row, value.as_bytes());
                w.write(&row)?;
                if deprecate_eof {
                    w.ok(true)?;
                } else {
                    w.eof()?;
                }
            }
            _ => w.err(1047, "08S01", "Unknown command")?,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hex(b: &[u8]) -> String {
        b.iter().map(|x| format!("{x:02x}")).collect()
    }

    /// The vector of go-sql-driver/mysql's `TestAuthFastNativePassword` (password
    /// `secret`).
    #[test]
    fn native_scramble_published_vector() {
        let nonce = [
            70, 114, 92, 94, 1, 38, 11, 116, 63, 114, 23, 101, 126, 103, 26, 95, 81, 17, 24, 21,
        ];
        assert_eq!(
            native_scramble(b"secret", &nonce),
            [
                53, 177, 140, 159, 251, 189, 127, 53, 109, 252, 172, 50, 211, 192, 240, 164, 26,
                48, 207, 45
            ]
        );
    }

    /// The stored form of `mysql_native_password`, `*` + hex(SHA1(SHA1(pw))), as the
    /// MySQL manual shows `PASSWORD('mypass')`.
    #[test]
    fn native_stored_hash_published_vector() {
        let h: [u8; 20] = Sha1::digest(Sha1::digest(b"mypass")).into();
        assert_eq!(
            hex(&h).to_uppercase(),
            "6C8989366EAF75BB670AD8EA7A7FC1176A95CEF4"
        );
    }

    /// go-sql-driver/mysql's `TestScrambleSHA256Pass` and
    /// `TestAuthFastCachingSHA256PasswordCached` vectors.
    #[test]
    fn sha2_scramble_published_vectors() {
        let nonce = [
            10, 47, 74, 111, 75, 73, 34, 48, 88, 76, 114, 74, 37, 13, 3, 80, 82, 2, 23, 21,
        ];
        assert_eq!(
            hex(&sha2_scramble(b"secret", &nonce)),
            "f490e76f66d9d86665ce54d98c78d0acfe2fb0b08b423da807144873d30b312c"
        );
        assert_eq!(
            hex(&sha2_scramble(b"secret2", &nonce)),
            "abc3934a012cf342e876071c8ee202de51785b430258a7a0138bc79c4d800bc6"
        );
        let nonce2 = [
            90, 105, 74, 126, 30, 48, 37, 56, 3, 23, 115, 127, 69, 22, 41, 84, 32, 123, 43, 118,
        ];
        assert_eq!(
            sha2_scramble(b"secret", &nonce2),
            [
                102, 32, 5, 35, 143, 161, 140, 241, 171, 232, 56, 139, 43, 14, 107, 196, 249, 170,
                147, 60, 220, 204, 120, 178, 214, 15, 184, 150, 26, 61, 57, 235
            ]
        );
        // The server's fast check accepts exactly that reply.
        let cached = sha2_stage2(b"secret");
        assert!(sha2_fast_check(
            &cached,
            &nonce2,
            &sha2_scramble(b"secret", &nonce2)
        ));
        assert!(!sha2_fast_check(
            &cached,
            &nonce2,
            &sha2_scramble(b"secret2", &nonce2)
        ));
    }

    // A minimal client, enough to drive each path of the server.

    struct Client {
        w: Wire,
        scramble: Vec<u8>,
        plugin: String,
    }

    fn connect(addr: SocketAddr) -> Client {
        let s = TcpStream::connect(addr).expect("connect");
        s.set_read_timeout(Some(Duration::from_secs(10)))
            .expect("timeout");
        let mut w = Wire {
            s: Stream::Plain(s),
            seq: 0,
        };
        let h = w.read().expect("handshake");
        let mut c = Cur { b: &h };
        assert_eq!(c.u8().unwrap(), 10);
        c.nul_str().unwrap();
        c.u32().unwrap();
        let mut scramble = c.take(8).unwrap().to_vec();
        c.take(1 + 2 + 1 + 2 + 2 + 1 + 10).unwrap();
        scramble.extend_from_slice(c.take(12).unwrap());
        c.u8().unwrap();
        let plugin = String::from_utf8_lossy(c.nul_str().unwrap()).into_owned();
        Client {
            w,
            scramble,
            plugin,
        }
    }

    impl Client {
        /// Send a HandshakeResponse41 for `plugin` with `auth`.
        fn respond(&mut self, user: &str, plugin: &str, auth: &[u8]) {
            let caps = CLIENT_PROTOCOL_41
                | CLIENT_SECURE_CONNECTION
                | CLIENT_PLUGIN_AUTH
                | CLIENT_PLUGIN_AUTH_LENENC_CLIENT_DATA
                | CLIENT_CONNECT_WITH_DB;
            let mut p = caps.to_le_bytes().to_vec();
            p.extend_from_slice(&(1u32 << 24).to_le_bytes());
            p.push(45);
            p.extend_from_slice(&[0; 23]);
            p.extend_from_slice(user.as_bytes());
            p.push(0);
            put_lenenc_str(&mut p, auth);
            p.extend_from_slice(b"app\0");
            p.extend_from_slice(plugin.as_bytes());
            p.push(0);
            self.w.write(&p).expect("response");
        }

        /// A `caching_sha2_password` login with `password`, asking for the public key
        /// when full authentication is needed; the last packet (OK or ERR).
        fn sha2_login(&mut self, user: &str, password: &str) -> Vec<u8> {
            let plugin = self.plugin.clone();
            let auth = sha2_scramble(password.as_bytes(), &self.scramble);
            self.respond(user, &plugin, &auth);
            self.sha2_finish(password)
        }

        /// After a `caching_sha2_password` scramble: the fast path, or full
        /// authentication over RSA (asking for the key).
        fn sha2_finish(&mut self, password: &str) -> Vec<u8> {
            let p = self.w.read().expect("reply");
            match p.as_slice() {
                [0x01, 0x03] => self.w.read().expect("OK"),
                [0x01, 0x04] => {
                    self.w.write(&[0x02]).expect("key request");
                    let key = self.w.read().expect("key");
                    assert_eq!(key[0], 0x01);
                    let pem = String::from_utf8_lossy(&key[1..]).into_owned();
                    use rsa::pkcs8::DecodePublicKey as _;
                    let public = rsa::RsaPublicKey::from_public_key_pem(&pem).expect("PEM");
                    let mut clear = password.as_bytes().to_vec();
                    clear.push(0);
                    let masked = xor_cycle(&clear, &self.scramble);
                    let enc = public
                        .encrypt(&mut rsa::rand_core::OsRng, Oaep::new::<Sha1>(), &masked)
                        .expect("encrypt");
                    self.w.write(&enc).expect("encrypted password");
                    self.w.read().expect("OK")
                }
                _ => p,
            }
        }

        fn query(&mut self, q: &str) -> Vec<Vec<u8>> {
            self.w.seq = 0;
            let mut p = vec![0x03];
            p.extend_from_slice(q.as_bytes());
            self.w.write(&p).expect("query");
            // Without CLIENT_DEPRECATE_EOF: an EOF after the columns, another after
            // the rows.
            let mut out = Vec::new();
            let mut eofs = 0;
            loop {
                let p = self.w.read().expect("result");
                if p[0] == 0xfe && p.len() < 9 {
                    eofs += 1;
                }
                let end = eofs == 2 || p[0] == 0xff || out.is_empty() && p[0] == 0;
                out.push(p);
                if end {
                    return out;
                }
            }
        }
    }

    #[test]
    fn caching_sha2_full_rsa_then_fast_then_rotation() {
        let fake = FakeMySql::start(FakeOptions::new(vec![FakeUser::new(
            "app",
            "s3cret-pw",
            Plugin::CachingSha2,
        )]));
        let mut c = connect(fake.addr);
        assert_eq!(c.plugin, "caching_sha2_password");
        let ok = c.sha2_login("app", "s3cret-pw");
        assert_eq!(ok[0], 0, "{ok:?}");
        let rows = c.query("select current_user()");
        // This client did not ask for CLIENT_DEPRECATE_EOF: count, column, EOF, row, EOF.
        assert_eq!(rows.len(), 5, "{rows:?}");
        assert_eq!(&rows[3][1..], b"app@%");
        // Cached now: the fast path.
        let mut c = connect(fake.addr);
        assert_eq!(c.sha2_login("app", "s3cret-pw")[0], 0);
        // A wrong password misses the cache and fails full authentication.
        let mut c = connect(fake.addr);
        let err = c.sha2_login("app", "wrong");
        assert_eq!(err[0], 0xff);
        assert_eq!(u16::from_le_bytes([err[1], err[2]]), 1045);
        fake.set_password("app", "new-pw");
        let mut c = connect(fake.addr);
        assert_eq!(c.sha2_login("app", "new-pw")[0], 0);
        let paths: Vec<_> = fake.logins().into_iter().map(|l| l.result).collect();
        assert_eq!(
            paths,
            vec![
                Ok(AuthPath::FullRsa {
                    key_requested: true
                }),
                Ok(AuthPath::Fast),
                Err("caching_sha2_password full authentication: wrong password".into()),
                Ok(AuthPath::FullRsa {
                    key_requested: true
                }),
            ]
        );
    }

    #[test]
    fn auth_switch_to_the_users_plugin() {
        let fake = FakeMySql::start(FakeOptions::new(vec![
            FakeUser::new("old", "native-pw", Plugin::Native),
            FakeUser::new("new", "sha2-pw", Plugin::CachingSha2),
        ]));
        // The client starts with caching_sha2_password; the user has native.
        let mut c = connect(fake.addr);
        let first = c.scramble.clone();
        c.respond(
            "old",
            "caching_sha2_password",
            &sha2_scramble(b"native-pw", &first),
        );
        let sw = c.w.read().expect("switch");
        assert_eq!(sw[0], 0xfe);
        let mut cur = Cur { b: &sw[1..] };
        assert_eq!(cur.nul_str().unwrap(), b"mysql_native_password");
        let nonce = cur.take(20).unwrap().to_vec();
        assert_ne!(nonce, first, "a fresh scramble");
        c.w.write(&native_scramble(b"native-pw", &nonce))
            .expect("switch reply");
        assert_eq!(c.w.read().expect("OK")[0], 0);
        // A native-first client for a caching_sha2 user is switched the other way.
        let mut c = connect(fake.addr);
        let first = c.scramble.clone();
        c.respond(
            "new",
            "mysql_native_password",
            &native_scramble(b"sha2-pw", &first),
        );
        let sw = c.w.read().expect("switch");
        assert_eq!(sw[0], 0xfe);
        let mut cur = Cur { b: &sw[1..] };
        assert_eq!(cur.nul_str().unwrap(), b"caching_sha2_password");
        c.scramble = cur.take(20).unwrap().to_vec();
        c.w.write(&sha2_scramble(b"sha2-pw", &c.scramble))
            .expect("switch reply");
        assert_eq!(c.sha2_finish("sha2-pw")[0], 0);
        let logins = fake.logins();
        assert!(logins[0].switched && logins[0].result == Ok(AuthPath::Native));
        assert!(
            logins[1].switched
                && logins[1].result
                    == Ok(AuthPath::FullRsa {
                        key_requested: true
                    })
        );
    }
}

#[cfg(test)]
mod real_clients {
    //! The fake against real clients, directly (no broker): the `mariadb` CLI
    //! (libmariadb's caching_sha2_password plugin) and PyMySQL.
    use super::*;
    use std::process::Stdio;

    fn have(cmd: &str, arg: &str) -> bool {
        Command::new(cmd)
            .arg(arg)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
    }

    fn mariadb(port: u16, user: &str, pw: &str, extra: &[&str]) -> String {
        let out = Command::new("timeout")
            .args(["20", "mariadb", "--no-defaults", "-h", "127.0.0.1", "-P"])
            .arg(port.to_string())
            .args(["-u", user])
            .arg(format!("-p{pw}"))
            .args(extra)
            .args(["-N", "-B", "-e", "select current_user()"])
            .stdin(Stdio::null())
            .output()
            .expect("run mariadb");
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
    }

    #[test]
    fn mariadb_cli_full_over_tls_then_fast_and_over_rsa() {
        if !have("mariadb", "--version") {
            eprintln!("SKIPPED: no mariadb client");
            return;
        }
        let fake = FakeMySql::start(
            FakeOptions::new(vec![FakeUser::new("app", "cli-pw-1", Plugin::CachingSha2)]).tls(),
        );
        let port = fake.addr.port();
        let out = mariadb(port, "app", "cli-pw-1", &["--ssl"]);
        assert!(out.contains("app@%"), "{out}");
        let out = mariadb(port, "app", "cli-pw-1", &["--ssl"]);
        assert!(out.contains("app@%"), "{out}");
        let out = mariadb(port, "app", "wrong", &["--ssl"]);
        assert!(out.contains("1045"), "{out}");
        fake.flush_cache();
        let out = mariadb(port, "app", "cli-pw-1", &["--skip-ssl"]);
        assert!(out.contains("app@%"), "{out}\n{:?}", fake.logins());
        let paths: Vec<_> = fake.logins().into_iter().map(|l| l.result).collect();
        assert_eq!(paths[0], Ok(AuthPath::FullTls), "{paths:?}");
        assert_eq!(paths[1], Ok(AuthPath::Fast), "{paths:?}");
        assert!(paths[2].is_err(), "{paths:?}");
        assert!(
            matches!(paths[3], Ok(AuthPath::FullRsa { .. })),
            "{paths:?}"
        );
    }

    #[test]
    fn pymysql_rsa_and_switch() {
        let py = "/usr/bin/python3";
        if !Command::new(py)
            .args(["-c", "import pymysql, cryptography"])
            .status()
            .is_ok_and(|s| s.success())
        {
            eprintln!("SKIPPED: no PyMySQL with cryptography");
            return;
        }
        let fake = FakeMySql::start(FakeOptions::new(vec![
            FakeUser::new("app", "py-pw-1", Plugin::CachingSha2),
            FakeUser::new("old", "py-pw-2", Plugin::Native),
        ]));
        let script = r#"
import sys, pymysql
port = int(sys.argv[1])
for user, pw in (("app", "py-pw-1"), ("app", "py-pw-1"), ("old", "py-pw-2")):
    c = pymysql.connect(host="127.0.0.1", port=port, user=user, password=pw, database="app")
    cur = c.cursor()
    cur.execute("select current_user()")
    print("USER", cur.fetchone()[0])
    c.close()
"#;
        let out = Command::new("timeout")
            .args(["30", py, "-c", script])
            .arg(fake.addr.port().to_string())
            .output()
            .expect("python");
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(out.status.success(), "{text}");
        assert_eq!(text.matches("USER app@%").count(), 2, "{text}");
        assert!(text.contains("USER old@%"), "{text}");
        let logins = fake.logins();
        assert_eq!(
            logins[0].result,
            Ok(AuthPath::FullRsa {
                key_requested: true
            })
        );
        assert_eq!(logins[1].result, Ok(AuthPath::Fast));
        assert!(logins[2].switched && logins[2].result == Ok(AuthPath::Native));
        assert_eq!(logins[0].database.as_deref(), Some("app"));
    }
}
