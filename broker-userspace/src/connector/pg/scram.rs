//! SCRAM-SHA-256 and SCRAM-SHA-256-PLUS client (RFC 5802, RFC 7677), as PostgreSQL
//! speaks it: a state machine over message bytes with no I/O, plus a bounded cache of
//! salted passwords so a new connection per transaction does not pay for PBKDF2 each
//! time.
//!
//! Flow: [`ScramClient::new`] -> [`ScramClient::client_first`] -> (server-first)
//! [`ScramClient::server_first`] gives salt and iterations -> the caller computes or
//! looks up the salted password -> [`ScramClient::client_final`] -> (server-final)
//! [`ScramClient::server_final`] verifies the server's signature.

use std::{
    borrow::Cow,
    collections::{HashMap, VecDeque},
    fmt,
    sync::{
        Arc, Mutex, PoisonError,
        atomic::{AtomicBool, Ordering},
    },
};

use base64::{Engine as _, engine::general_purpose::STANDARD as B64};
use hmac::{Hmac, Mac};
use sha2::{Digest, Sha256};
use zeroize::{Zeroize, Zeroizing};

/// `SCRAM-SHA-256`.
pub const SCRAM_SHA_256: &str = "SCRAM-SHA-256";
/// `SCRAM-SHA-256-PLUS` (with channel binding).
pub const SCRAM_SHA_256_PLUS: &str = "SCRAM-SHA-256-PLUS";

/// A salted password: `Hi(password, salt, i)`, zeroed on drop.
pub type SaltedPassword = Zeroizing<[u8; 32]>;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ScramError {
    #[error("SCRAM message out of order (expected {0})")]
    OutOfOrder(&'static str),
    #[error("malformed SCRAM server message: {0}")]
    Malformed(&'static str),
    #[error("server nonce does not extend the client nonce")]
    NonceMismatch,
    #[error("server requires an unsupported SCRAM extension")]
    MandatoryExtension,
    #[error("SCRAM server error: {0}")]
    Server(String),
    #[error(
        "server signature did not verify: the upstream does not know the password (impersonation?)"
    )]
    BadServerSignature,
}

/// The channel binding the client announces in its GS2 header.
#[derive(Clone, PartialEq, Eq)]
pub enum ChannelBinding {
    /// `n`: no TLS, or the client cannot bind.
    NotSupported,
    /// `y`: the client could bind but the server did not offer `-PLUS` (lets the server
    /// detect a downgrade).
    NotOffered,
    /// `p=tls-server-end-point`: with the hash of the server's certificate.
    TlsServerEndPoint(Vec<u8>),
}

impl ChannelBinding {
    fn gs2_header(&self) -> &'static str {
        match self {
            Self::NotSupported => "n,,",
            Self::NotOffered => "y,,",
            Self::TlsServerEndPoint(_) => "p=tls-server-end-point,,",
        }
    }

    fn data(&self) -> &[u8] {
        match self {
            Self::TlsServerEndPoint(d) => d,
            _ => &[],
        }
    }
}

impl fmt::Debug for ChannelBinding {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.gs2_header())
    }
}

enum State {
    /// client-first sent (or about to be).
    First {
        client_first_bare: String,
    },
    /// server-first received: waiting for the salted password.
    ServerFirst {
        client_first_bare: String,
        server_first: String,
        nonce: String,
    },
    /// client-final sent: waiting for the server's signature.
    Final {
        server_signature: Zeroizing<[u8; 32]>,
    },
    Done,
    Failed,
}

/// A SCRAM client exchange. No I/O; `Debug` shows only the state's name.
pub struct ScramClient {
    binding: ChannelBinding,
    client_nonce: String,
    state: State,
}

impl fmt::Debug for ScramClient {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let state = match self.state {
            State::First { .. } => "first",
            State::ServerFirst { .. } => "server-first",
            State::Final { .. } => "final",
            State::Done => "done",
            State::Failed => "failed",
        };
        f.debug_struct("ScramClient")
            .field("binding", &self.binding)
            .field("state", &state)
            .finish()
    }
}

/// Salt and iteration count from the server-first message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SaltParams {
    pub salt: Vec<u8>,
    pub iterations: u32,
}

/// A fresh client nonce: 18 random bytes, base64 (printable, no comma).
#[must_use]
pub fn new_nonce() -> String {
    let bytes: [u8; 18] = rand::random();
    B64.encode(bytes)
}

fn escape_saslname(user: &str) -> String {
    user.replace('=', "=3D").replace(',', "=2C")
}

fn hmac(key: &[u8], parts: &[&[u8]]) -> [u8; 32] {
    let mut mac = Hmac::<Sha256>::new_from_slice(key).expect("HMAC takes any key length");
    for p in parts {
        mac.update(p);
    }
    mac.finalize().into_bytes().into()
}

fn ct_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

impl ScramClient {
    /// Start an exchange. PostgreSQL ignores the SCRAM user name (it uses the startup
    /// `user`), so the broker passes `""` as libpq does.
    #[must_use]
    pub fn new(user: &str, client_nonce: String, binding: ChannelBinding) -> Self {
        let client_first_bare = format!("n={},r={client_nonce}", escape_saslname(user));
        Self {
            binding,
            client_nonce,
            state: State::First { client_first_bare },
        }
    }

    /// The SASL mechanism name for SASLInitialResponse.
    #[must_use]
    pub fn mechanism(&self) -> &'static str {
        match self.binding {
            ChannelBinding::TlsServerEndPoint(_) => SCRAM_SHA_256_PLUS,
            _ => SCRAM_SHA_256,
        }
    }

    /// The client-first message (GS2 header + bare message).
    ///
    /// # Errors
    /// After the exchange has moved on.
    pub fn client_first(&self) -> Result<Vec<u8>, ScramError> {
        match &self.state {
            State::First { client_first_bare } => {
                Ok(format!("{}{client_first_bare}", self.binding.gs2_header()).into_bytes())
            }
            _ => Err(ScramError::OutOfOrder("client-first")),
        }
    }

    /// Take the server-first message; returns the salt and iteration count to derive the
    /// salted password with.
    ///
    /// # Errors
    /// On a malformed message, a nonce that does not extend ours, a mandatory extension,
    /// or an iteration count of zero.
    pub fn server_first(&mut self, msg: &[u8]) -> Result<SaltParams, ScramError> {
        let State::First { client_first_bare } = std::mem::replace(&mut self.state, State::Failed)
        else {
            return Err(ScramError::OutOfOrder("server-first"));
        };
        let text = std::str::from_utf8(msg).map_err(|_| ScramError::Malformed("not UTF-8"))?;
        let mut attrs = text.split(',');
        let mut next = |name: &'static str| -> Result<&str, ScramError> {
            let a = attrs.next().ok_or(ScramError::Malformed(name))?;
            if a.starts_with("m=") {
                return Err(ScramError::MandatoryExtension);
            }
            a.strip_prefix(name).ok_or(ScramError::Malformed(name))
        };
        let nonce = next("r=")?;
        let salt = next("s=")?;
        let iterations = next("i=")?;
        if !nonce.starts_with(&self.client_nonce) || nonce.len() <= self.client_nonce.len() {
            return Err(ScramError::NonceMismatch);
        }
        if !nonce
            .bytes()
            .all(|b| (0x21..=0x7e).contains(&b) && b != b',')
        {
            return Err(ScramError::Malformed("nonce has invalid characters"));
        }
        let salt = B64
            .decode(salt)
            .map_err(|_| ScramError::Malformed("salt is not base64"))?;
        if salt.is_empty() {
            return Err(ScramError::Malformed("empty salt"));
        }
        // Accept what the server says (PostgreSQL 16 lets admins lower it), but never 0.
        let iterations: u32 = iterations
            .parse()
            .ok()
            .filter(|&i| i > 0)
            .ok_or(ScramError::Malformed("iteration count"))?;
        self.state = State::ServerFirst {
            client_first_bare,
            server_first: text.to_owned(),
            nonce: nonce.to_owned(),
        };
        Ok(SaltParams { salt, iterations })
    }

    /// The client-final message, given the salted password for the salt and iterations
    /// [`Self::server_first`] returned.
    ///
    /// # Errors
    /// When called out of order.
    pub fn client_final(&mut self, salted: &[u8; 32]) -> Result<Vec<u8>, ScramError> {
        let State::ServerFirst {
            client_first_bare,
            server_first,
            nonce,
        } = std::mem::replace(&mut self.state, State::Failed)
        else {
            return Err(ScramError::OutOfOrder("client-final"));
        };
        let mut cbind = self.binding.gs2_header().as_bytes().to_vec();
        cbind.extend_from_slice(self.binding.data());
        let without_proof = format!("c={},r={nonce}", B64.encode(&cbind));
        let auth_message =
            format!("{client_first_bare},{server_first},{without_proof}").into_bytes();

        let client_key = Zeroizing::new(hmac(salted, &[b"Client Key"]));
        let stored_key = Zeroizing::new(<[u8; 32]>::from(Sha256::digest(client_key.as_slice())));
        let client_signature = Zeroizing::new(hmac(&*stored_key, &[&auth_message]));
        let mut proof = Zeroizing::new([0u8; 32]);
        for (i, p) in proof.iter_mut().enumerate() {
            *p = client_key[i] ^ client_signature[i];
        }
        let server_key = Zeroizing::new(hmac(salted, &[b"Server Key"]));
        let server_signature = Zeroizing::new(hmac(&*server_key, &[&auth_message]));
        self.state = State::Final { server_signature };
        Ok(format!("{without_proof},p={}", B64.encode(proof.as_slice())).into_bytes())
    }

    /// Verify the server-final message.
    ///
    /// # Errors
    /// On a server error (`e=`), a malformed message, or a signature mismatch.
    pub fn server_final(&mut self, msg: &[u8]) -> Result<(), ScramError> {
        let State::Final { server_signature } = std::mem::replace(&mut self.state, State::Failed)
        else {
            return Err(ScramError::OutOfOrder("server-final"));
        };
        let text = std::str::from_utf8(msg).map_err(|_| ScramError::Malformed("not UTF-8"))?;
        let first = text.split(',').next().unwrap_or_default();
        if let Some(e) = first.strip_prefix("e=") {
            return Err(ScramError::Server(e.to_owned()));
        }
        let v = first
            .strip_prefix("v=")
            .ok_or(ScramError::Malformed("no verifier"))?;
        let v = B64
            .decode(v)
            .map_err(|_| ScramError::Malformed("verifier is not base64"))?;
        if !ct_eq(&v, &*server_signature) {
            return Err(ScramError::BadServerSignature);
        }
        self.state = State::Done;
        Ok(())
    }

    /// The server's signature has been verified.
    #[must_use]
    pub fn is_done(&self) -> bool {
        matches!(self.state, State::Done)
    }
}

/// SASLprep (RFC 4013, via the `stringprep` crate) as PostgreSQL applies it to
/// passwords: when the password is not valid UTF-8 or SASLprep rejects it (prohibited
/// output, bidi rules), the raw bytes are used, exactly like the server does.
#[must_use]
pub fn saslprep(password: &[u8]) -> Cow<'_, [u8]> {
    let Ok(text) = std::str::from_utf8(password) else {
        return Cow::Borrowed(password);
    };
    if text.is_ascii() {
        // Identity, or prohibited (controls), in which case PostgreSQL uses the raw
        // bytes: the same thing.
        return Cow::Borrowed(password);
    }
    match stringprep::saslprep(text) {
        Ok(Cow::Borrowed(_)) | Err(_) => Cow::Borrowed(password),
        Ok(Cow::Owned(prepared)) => Cow::Owned(prepared.into_bytes()),
    }
}

/// `Hi(SASLprep(password), salt, iterations)` (PBKDF2-HMAC-SHA-256). CPU-bound: call from
/// a blocking task.
#[must_use]
pub fn compute_salted_password(password: &[u8], salt: &[u8], iterations: u32) -> SaltedPassword {
    compute_salted_password_until(password, salt, iterations, &AtomicBool::new(false))
        .expect("never cancelled")
}

/// Iterations between two looks at the cancellation flag (a few milliseconds).
const PBKDF2_CHUNK: u32 = 1024;

/// [`compute_salted_password`], giving up (`None`) once `cancel` is set: the flag is
/// read every [`PBKDF2_CHUNK`] iterations, so a connection that goes away (client gone,
/// deadline, daemon shutdown) does not leave a blocking thread hashing for minutes.
///
/// PBKDF2 with a 32-byte output is one block: `U1 = HMAC(P, salt || 1)`,
/// `Ui = HMAC(P, U(i-1))`, result `U1 ^ ... ^ Un`; the keyed HMAC state is computed once
/// and cloned per iteration, as the `pbkdf2` crate does.
#[must_use]
pub fn compute_salted_password_until(
    password: &[u8],
    salt: &[u8],
    iterations: u32,
    cancel: &AtomicBool,
) -> Option<SaltedPassword> {
    let prepared = saslprep(password);
    let prf = Hmac::<Sha256>::new_from_slice(&prepared).expect("HMAC takes any key length");
    if let Cow::Owned(mut v) = prepared {
        v.zeroize();
    }
    let mut u = Zeroizing::new([0u8; 32]);
    let mut mac = prf.clone();
    mac.update(salt);
    mac.update(&1u32.to_be_bytes());
    u.copy_from_slice(&mac.finalize().into_bytes());
    let mut out: SaltedPassword = u.clone();
    let mut left = iterations.saturating_sub(1);
    while left > 0 {
        if cancel.load(Ordering::Relaxed) {
            return None;
        }
        let n = left.min(PBKDF2_CHUNK);
        for _ in 0..n {
            let mut mac = prf.clone();
            mac.update(&*u);
            u.copy_from_slice(&mac.finalize().into_bytes());
            for (o, x) in out.iter_mut().zip(u.iter()) {
                *o ^= x;
            }
        }
        left -= n;
    }
    Some(out)
}

/// Sets its flag when dropped: the future waiting for a blocking computation holds it,
/// so dropping the future (connection gone) stops the computation.
struct CancelOnDrop(Arc<AtomicBool>);

impl Drop for CancelOnDrop {
    fn drop(&mut self) {
        self.0.store(true, Ordering::Relaxed);
    }
}

/// Default capacity of the salted-password cache.
pub const SALTED_CACHE_CAP: usize = 1024;

#[derive(Clone, PartialEq, Eq, Hash)]
struct CacheKey {
    password_sha256: [u8; 32],
    salt: Vec<u8>,
    iterations: u32,
}

impl Drop for CacheKey {
    fn drop(&mut self) {
        self.password_sha256.zeroize();
    }
}

impl CacheKey {
    fn new(password: &[u8], salt: &[u8], iterations: u32) -> Self {
        Self {
            password_sha256: Sha256::digest(password).into(),
            salt: salt.to_vec(),
            iterations,
        }
    }
}

#[derive(Default)]
struct CacheInner {
    map: HashMap<CacheKey, SaltedPassword>,
    /// Insertion order, for FIFO eviction.
    order: VecDeque<CacheKey>,
}

/// Bounded cache of salted passwords keyed by (SHA-256 of the password, salt,
/// iterations). Evicted values are zeroed. `Debug` shows only the size.
pub struct SaltedPasswordCache {
    cap: usize,
    inner: Mutex<CacheInner>,
}

impl Default for SaltedPasswordCache {
    fn default() -> Self {
        Self::with_capacity(SALTED_CACHE_CAP)
    }
}

impl fmt::Debug for SaltedPasswordCache {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SaltedPasswordCache")
            .field("len", &self.len())
            .field("cap", &self.cap)
            .finish()
    }
}

impl SaltedPasswordCache {
    #[must_use]
    pub fn with_capacity(cap: usize) -> Self {
        Self {
            cap: cap.max(1),
            inner: Mutex::new(CacheInner::default()),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, CacheInner> {
        self.inner.lock().unwrap_or_else(PoisonError::into_inner)
    }

    #[must_use]
    pub fn len(&self) -> usize {
        self.lock().map.len()
    }

    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    #[must_use]
    pub fn get(&self, password: &[u8], salt: &[u8], iterations: u32) -> Option<SaltedPassword> {
        let key = CacheKey::new(password, salt, iterations);
        self.lock().map.get(&key).cloned()
    }

    pub fn insert(&self, password: &[u8], salt: &[u8], iterations: u32, value: &SaltedPassword) {
        let key = CacheKey::new(password, salt, iterations);
        let mut inner = self.lock();
        if let Some(v) = inner.map.get_mut(&key) {
            *v = value.clone();
            return;
        }
        while inner.map.len() >= self.cap {
            let Some(old) = inner.order.pop_front() else {
                break;
            };
            // Dropping the Zeroizing value zeroes it.
            inner.map.remove(&old);
        }
        inner.order.push_back(key.clone());
        inner.map.insert(key, value.clone());
    }

    /// The salted password, from the cache or computed on a blocking thread.
    ///
    /// # Errors
    /// When the blocking task fails (panics or the runtime is shutting down).
    pub async fn salted_password(
        &self,
        password: &[u8],
        salt: &[u8],
        iterations: u32,
    ) -> Result<SaltedPassword, std::io::Error> {
        if let Some(v) = self.get(password, salt, iterations) {
            return Ok(v);
        }
        let pw = Zeroizing::new(password.to_vec());
        let s = salt.to_vec();
        let guard = CancelOnDrop(Arc::new(AtomicBool::new(false)));
        let cancel = Arc::clone(&guard.0);
        let value = tokio::task::spawn_blocking(move || {
            compute_salted_password_until(&pw, &s, iterations, &cancel)
        })
        .await
        .map_err(std::io::Error::other)?
        .ok_or_else(|| std::io::Error::other("SCRAM computation cancelled"))?;
        drop(guard);
        self.insert(password, salt, iterations, &value);
        Ok(value)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    // RFC 7677 section 3.
    const C_NONCE: &str = "rOprNGfwEbeRWgbNEkqO";
    const SERVER_FIRST: &str =
        "r=rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0,s=W22ZaJ0SNY7soEsUEjb6gQ==,i=4096";
    const CLIENT_FINAL: &str = "c=biws,r=rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0,p=dHzbZapWIk4jUhN+Ute9ytag9zjfMHgsqmmiz7AndVQ=";
    const SERVER_FINAL: &str = "v=6rriTRBi23WpRR/wtup+mMhUZUn/dB5nLTJRsjl95G4=";

    fn rfc_client_at_final() -> ScramClient {
        let mut c = ScramClient::new("user", C_NONCE.into(), ChannelBinding::NotSupported);
        assert_eq!(
            c.client_first().unwrap(),
            b"n,,n=user,r=rOprNGfwEbeRWgbNEkqO"
        );
        let p = c.server_first(SERVER_FIRST.as_bytes()).unwrap();
        assert_eq!(p.iterations, 4096);
        let salted = compute_salted_password(b"pencil", &p.salt, p.iterations);
        assert_eq!(
            String::from_utf8(c.client_final(&salted).unwrap()).unwrap(),
            CLIENT_FINAL
        );
        c
    }

    #[test]
    fn rfc7677_test_vector() {
        let mut c = rfc_client_at_final();
        assert!(!c.is_done());
        c.server_final(SERVER_FINAL.as_bytes()).unwrap();
        assert!(c.is_done());
        assert_eq!(c.mechanism(), SCRAM_SHA_256);
        assert!(!format!("{c:?}").contains("pencil"));
    }

    #[test]
    fn bad_server_signature_fails() {
        let mut c = rfc_client_at_final();
        let err = c
            .server_final(b"v=7rriTRBi23WpRR/wtup+mMhUZUn/dB5nLTJRsjl95G4=")
            .unwrap_err();
        assert_eq!(err, ScramError::BadServerSignature);
        assert!(!c.is_done());
        // And nothing more is accepted.
        assert!(c.server_final(SERVER_FINAL.as_bytes()).is_err());
        let mut c = rfc_client_at_final();
        assert_eq!(
            c.server_final(b"e=invalid-proof"),
            Err(ScramError::Server("invalid-proof".into()))
        );
        let mut c = rfc_client_at_final();
        assert!(matches!(
            c.server_final(b"x=1"),
            Err(ScramError::Malformed(_))
        ));
    }

    #[test]
    fn validates_server_first() {
        let fresh = || ScramClient::new("", C_NONCE.into(), ChannelBinding::NotSupported);
        // Nonce not extending ours.
        assert_eq!(
            fresh().server_first(b"r=XXprNGfwEbeRWgbNEkqOabc,s=W22ZaJ0SNY7soEsUEjb6gQ==,i=4096"),
            Err(ScramError::NonceMismatch)
        );
        // Nonce equal to ours (no server part).
        assert_eq!(
            fresh().server_first(b"r=rOprNGfwEbeRWgbNEkqO,s=W22ZaJ0SNY7soEsUEjb6gQ==,i=4096"),
            Err(ScramError::NonceMismatch)
        );
        assert_eq!(
            fresh().server_first(b"m=ext,r=rOprNGfwEbeRWgbNEkqOa,s=AA==,i=1"),
            Err(ScramError::MandatoryExtension)
        );
        assert!(
            fresh()
                .server_first(b"r=rOprNGfwEbeRWgbNEkqOa,s=AA==,i=0")
                .is_err()
        );
        assert!(
            fresh()
                .server_first(b"r=rOprNGfwEbeRWgbNEkqOa,s=!!,i=4096")
                .is_err()
        );
        assert!(
            fresh()
                .server_first(b"r=rOprNGfwEbeRWgbNEkqOa,s=AA==")
                .is_err()
        );
        assert!(
            fresh()
                .server_first(b"s=AA==,r=rOprNGfwEbeRWgbNEkqOa,i=1")
                .is_err()
        );
        // A low count is what the server says: accepted. Extensions after i are ignored.
        let p = fresh()
            .server_first(b"r=rOprNGfwEbeRWgbNEkqOa,s=AA==,i=1,x=y")
            .unwrap();
        assert_eq!((p.salt, p.iterations), (vec![0], 1));
        // Out of order.
        let mut c = fresh();
        assert!(c.client_final(&[0; 32]).is_err());
    }

    #[test]
    fn channel_binding_headers() {
        let c = ScramClient::new("", "abc".into(), ChannelBinding::NotOffered);
        assert_eq!(c.client_first().unwrap(), b"y,,n=,r=abc");
        let mut c = ScramClient::new(
            "",
            "abc".into(),
            ChannelBinding::TlsServerEndPoint(vec![1, 2, 3]),
        );
        assert_eq!(c.mechanism(), SCRAM_SHA_256_PLUS);
        assert_eq!(
            c.client_first().unwrap(),
            b"p=tls-server-end-point,,n=,r=abc"
        );
        c.server_first(b"r=abcdef,s=AA==,i=4096").unwrap();
        let fin = String::from_utf8(c.client_final(&[7; 32]).unwrap()).unwrap();
        let cb = fin.strip_prefix("c=").unwrap().split(',').next().unwrap();
        assert_eq!(
            B64.decode(cb).unwrap(),
            b"p=tls-server-end-point,,\x01\x02\x03"
        );
        assert!(fin.contains(",r=abcdef,p="));
        assert_eq!(escape_saslname("a=b,c"), "a=3Db=2Cc");
        assert_eq!(new_nonce().len(), 24);
    }

    #[test]
    fn saslprep_maps_spaces_and_keeps_ascii() {
        assert_eq!(&*saslprep(b"pencil"), b"pencil");
        assert_eq!(&*saslprep(b"a\x01b"), b"a\x01b");
        assert_eq!(&*saslprep("a\u{00A0}b".as_bytes()), b"a b");
        assert_eq!(&*saslprep("a\u{00AD}b".as_bytes()), b"ab");
        assert_eq!(&*saslprep("p\u{e4}ss".as_bytes()), "p\u{e4}ss".as_bytes());
        assert_eq!(&*saslprep(b"\xff\xfe"), b"\xff\xfe");
    }

    #[test]
    fn salted_cache_is_bounded_and_keyed() {
        let cache = SaltedPasswordCache::with_capacity(2);
        let v = |b| Zeroizing::new([b; 32]);
        cache.insert(b"pw", b"salt", 4096, &v(1));
        assert_eq!(*cache.get(b"pw", b"salt", 4096).unwrap(), [1; 32]);
        assert!(cache.get(b"pw", b"salt", 4097).is_none());
        assert!(cache.get(b"pw", b"salx", 4096).is_none());
        assert!(cache.get(b"px", b"salt", 4096).is_none());
        cache.insert(b"pw2", b"salt", 4096, &v(2));
        cache.insert(b"pw3", b"salt", 4096, &v(3));
        assert_eq!(cache.len(), 2);
        // Oldest evicted.
        assert!(cache.get(b"pw", b"salt", 4096).is_none());
        assert!(cache.get(b"pw3", b"salt", 4096).is_some());
        // Re-inserting an existing key does not grow the cache.
        cache.insert(b"pw3", b"salt", 4096, &v(4));
        assert_eq!(cache.len(), 2);
        assert_eq!(*cache.get(b"pw3", b"salt", 4096).unwrap(), [4; 32]);
        assert_eq!(
            format!("{cache:?}"),
            "SaltedPasswordCache { len: 2, cap: 2 }"
        );
    }

    #[test]
    fn chunked_pbkdf2_matches_the_pbkdf2_crate_and_stops_when_cancelled() {
        for (pw, salt, i) in [
            (&b"pencil"[..], &b"salt"[..], 1),
            (b"p", b"s", 1023),
            (b"p", b"s", 1024),
            (b"p", b"s", 1025),
            ("p\u{e4}ss".as_bytes(), b"NaCl", 5000),
        ] {
            let mut want = [0u8; 32];
            pbkdf2::pbkdf2_hmac::<Sha256>(&saslprep(pw), salt, i, &mut want);
            assert_eq!(*compute_salted_password(pw, salt, i), want, "{i}");
        }
        // Cancelled: gives up at the next chunk, long before 2^31 iterations.
        let cancel = AtomicBool::new(true);
        let t = std::time::Instant::now();
        assert!(compute_salted_password_until(b"p", b"s", u32::MAX, &cancel).is_none());
        assert!(t.elapsed() < std::time::Duration::from_secs(5));
    }

    /// Dropping the waiting future stops the blocking computation: dropping a runtime
    /// waits for its blocking threads, which would take hours for 2^32 iterations.
    #[test]
    fn dropping_the_wait_cancels_the_computation() {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .build()
            .unwrap();
        let cache = SaltedPasswordCache::default();
        let waited = rt.block_on(async {
            tokio::time::timeout(
                std::time::Duration::from_millis(50),
                cache.salted_password(b"p", b"s", u32::MAX),
            )
            .await
        });
        assert!(waited.is_err(), "2^32 iterations cannot finish in 50 ms");
        let t = std::time::Instant::now();
        drop(rt);
        assert!(
            t.elapsed() < std::time::Duration::from_secs(5),
            "{:?}",
            t.elapsed()
        );
        assert!(cache.is_empty());
    }

    #[tokio::test]
    async fn salted_cache_computes_once() {
        let cache = SaltedPasswordCache::default();
        let salt = B64.decode("W22ZaJ0SNY7soEsUEjb6gQ==").unwrap();
        let a = cache.salted_password(b"pencil", &salt, 4096).await.unwrap();
        assert_eq!(cache.len(), 1);
        let b = cache.salted_password(b"pencil", &salt, 4096).await.unwrap();
        assert_eq!(*a, *b);
        assert_eq!(*a, *compute_salted_password(b"pencil", &salt, 4096));
    }
}
