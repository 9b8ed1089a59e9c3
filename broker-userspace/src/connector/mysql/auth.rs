//! Authenticating to the server with the brokered password, as an exchange without I/O:
//! [`ServerAuth::start`] gives the auth data for the HandshakeResponse, then
//! [`ServerAuth::next`] takes each packet the server sends and says what to answer, until
//! OK or ERR. The scrambles and the RSA encryption are `mysql_common`'s.
//!
//! Methods: `mysql_native_password`; `caching_sha2_password` (the fast path, `0x01 0x03`
//! then OK; full authentication, `0x01 0x04`: the password and a NUL over TLS, else
//! encrypted with the server's RSA public key (RSA-OAEP), the one configured
//! (`config.serverPublicKey`) or, without one, the one the server sends when asked with
//! `0x02`); `sha256_password` (the same, without a cache); `client_ed25519` (MariaDB);
//! `mysql_clear_password` (only over TLS). One AuthSwitchRequest is followed;
//! `mysql_old_password` and unknown methods are refused.

use mysql_common::{
    auth::plugins::{
        ChallengeResponsePlugin as _, Context, caching_sha2_password::scramble_sha256,
        client_ed25519::ClientEd25519, mysql_native_password::scramble_native,
    },
    crypto,
    io::ParseBuf,
    packets::AuthSwitchRequest,
};
use zeroize::Zeroizing;

use super::{errors::ServerError, proto};

/// An authentication method the broker answers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Method {
    Native,
    CachingSha2,
    Sha256,
    Clear,
    Ed25519,
}

impl Method {
    /// The method a plugin name stands for.
    #[must_use]
    pub fn from_name(name: &[u8]) -> Option<Self> {
        Some(match name {
            b"mysql_native_password" => Self::Native,
            b"caching_sha2_password" => Self::CachingSha2,
            b"sha256_password" => Self::Sha256,
            b"mysql_clear_password" => Self::Clear,
            b"client_ed25519" => Self::Ed25519,
            _ => return None,
        })
    }

    /// The plugin name.
    #[must_use]
    pub fn name(self) -> &'static str {
        match self {
            Self::Native => "mysql_native_password",
            Self::CachingSha2 => "caching_sha2_password",
            Self::Sha256 => "sha256_password",
            Self::Clear => "mysql_clear_password",
            Self::Ed25519 => "client_ed25519",
        }
    }
}

/// What the upstream leg offers the exchange.
#[derive(Debug, Clone, Copy)]
pub struct Transport<'a> {
    /// The connection is TLS (a cleartext password may go).
    pub tls: bool,
    /// The server's RSA public key (PEM), from `config.serverPublicKey`.
    pub server_key: Option<&'a [u8]>,
}

/// What to do after a server packet.
#[derive(Debug)]
pub enum Step {
    /// Send this payload (with the next sequence id), then read the next packet.
    Send(Zeroizing<Vec<u8>>),
    /// Read the next packet.
    Read,
    /// Authenticated: the packet was the server's OK.
    Ok,
    /// The server refused (ERR).
    Err(ServerError),
}

/// Why the exchange cannot go on.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum AuthError {
    /// A method the broker does not do.
    #[error("the server asked for {0} authentication, which the broker does not do")]
    Unsupported(String),
    /// A method the broker does not do over this connection.
    #[error("refused: {0}")]
    Refused(&'static str),
    #[error("{0}")]
    Protocol(String),
}

/// The most packets the server may send during authentication (a full
/// `caching_sha2_password` exchange after a switch takes five).
const MAX_PACKETS: u8 = 8;

/// Where the exchange is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// The first answer of the method went: OK, ERR, a switch or (caching_sha2) its
    /// status follow.
    Answered,
    /// caching_sha2: the server had the password in its cache (`0x03`); OK follows.
    FastAuthOk,
    /// caching_sha2, sha256: the broker asked for the server's RSA key.
    KeyRequested,
    /// The password went (over TLS, or RSA-encrypted); OK or ERR follows.
    PasswordSent,
}

/// The authentication exchange with the server. Holds no secret: the password is handed
/// to each call.
#[derive(Debug)]
pub struct ServerAuth {
    method: Method,
    nonce: Vec<u8>,
    state: State,
    switched: bool,
    packets: u8,
}

impl ServerAuth {
    /// Start with the server's greeting: its plugin (a method the broker does not know
    /// is answered as `mysql_native_password`, as clients do: the server then switches
    /// to the account's method) and scramble. Returns the exchange and the auth data
    /// for the HandshakeResponse, which names [`Self::method`].
    ///
    /// # Errors
    /// A scramble of the wrong size, an unusable RSA key.
    pub fn start(
        plugin: Option<&[u8]>,
        nonce: &[u8],
        password: &[u8],
        t: &Transport<'_>,
    ) -> Result<(Self, Zeroizing<Vec<u8>>), AuthError> {
        let method = match plugin.and_then(Method::from_name) {
            // A greeting naming these is answered natively: the server switches if the
            // account needs them (and the broker then decides whether it may).
            Some(Method::Clear | Method::Ed25519) | None => Method::Native,
            Some(m) => m,
        };
        let mut auth = Self {
            method,
            nonce: nonce.to_vec(),
            state: State::Answered,
            switched: false,
            packets: 0,
        };
        let data = auth.first_answer(password, t)?;
        Ok((auth, data))
    }

    /// The method in use (the greeting's, or the one the server switched to).
    #[must_use]
    pub fn method(&self) -> Method {
        self.method
    }

    /// Take the next packet from the server.
    ///
    /// # Errors
    /// A packet out of place, a method the broker does not do (or not over this
    /// connection), too many packets.
    pub fn next(
        &mut self,
        payload: &[u8],
        password: &[u8],
        t: &Transport<'_>,
    ) -> Result<Step, AuthError> {
        self.packets += 1;
        if self.packets > MAX_PACKETS {
            return Err(AuthError::Protocol(format!(
                "the server sent more than {MAX_PACKETS} packets during authentication"
            )));
        }
        match payload.first() {
            Some(0x00) if proto::is_ok(payload) => Ok(Step::Ok),
            Some(0xFF) => ServerError::parse(payload)
                .map(Step::Err)
                .ok_or_else(|| AuthError::Protocol("unreadable ERR packet".into())),
            Some(0xFE) => self.switch(payload, password, t),
            Some(0x01) => self.more_data(&payload[1..], password, t),
            Some(b) => Err(AuthError::Protocol(format!(
                "unexpected packet 0x{b:02x} during authentication ({})",
                self.method.name()
            ))),
            None => Err(AuthError::Protocol(
                "empty packet during authentication".into(),
            )),
        }
    }

    /// AuthSwitchRequest: the method named, with a new scramble.
    fn switch(
        &mut self,
        payload: &[u8],
        password: &[u8],
        t: &Transport<'_>,
    ) -> Result<Step, AuthError> {
        if self.switched {
            return Err(AuthError::Protocol(
                "the server asked to switch the authentication method twice".into(),
            ));
        }
        if self.state != State::Answered {
            return Err(AuthError::Protocol(format!(
                "an authentication switch in the middle of {}",
                self.method.name()
            )));
        }
        if payload.len() == 1 {
            // The pre-4.1 switch: mysql_old_password (a broken hash, never answered).
            return Err(AuthError::Unsupported("mysql_old_password".into()));
        }
        let req: AuthSwitchRequest<'_> = ParseBuf(payload)
            .parse(())
            .map_err(|_| AuthError::Protocol("unreadable AuthSwitchRequest".into()))?;
        let name = req.auth_plugin();
        let method = Method::from_name(name.as_bytes()).ok_or_else(|| {
            let shown: String = String::from_utf8_lossy(name.as_bytes())
                .chars()
                .take(64)
                .collect();
            AuthError::Unsupported(format!("`{shown}`"))
        })?;
        self.method = method;
        self.nonce = req.plugin_data().to_vec();
        self.switched = true;
        self.state = State::Answered;
        self.first_answer(password, t).map(Step::Send)
    }

    /// AuthMoreData (`0x01` and data): caching_sha2's status, or the server's RSA key.
    fn more_data(
        &mut self,
        data: &[u8],
        password: &[u8],
        t: &Transport<'_>,
    ) -> Result<Step, AuthError> {
        match (self.method, self.state) {
            (Method::CachingSha2, State::Answered) => match data {
                [0x03] => {
                    self.state = State::FastAuthOk;
                    Ok(Step::Read)
                }
                [0x04] => self.send_password(password, t, 0x02).map(Step::Send),
                _ => Err(AuthError::Protocol(
                    "unexpected caching_sha2_password status".into(),
                )),
            },
            (Method::CachingSha2 | Method::Sha256, State::KeyRequested) => {
                self.state = State::PasswordSent;
                encrypt(password, &self.nonce, data).map(Step::Send)
            }
            (m, _) => Err(AuthError::Protocol(format!(
                "unexpected AuthMoreData during {}",
                m.name()
            ))),
        }
    }

    /// The method's first answer to the current scramble.
    fn first_answer(
        &mut self,
        password: &[u8],
        t: &Transport<'_>,
    ) -> Result<Zeroizing<Vec<u8>>, AuthError> {
        let bad_nonce = |what: &str| {
            AuthError::Protocol(format!(
                "the server's {what} scramble has {} bytes",
                self.nonce.len()
            ))
        };
        match self.method {
            Method::Native => {
                if self.nonce.len() != 20 {
                    return Err(bad_nonce(self.method.name()));
                }
                Ok(Zeroizing::new(
                    scramble_native(&self.nonce, password).map_or_else(Vec::new, |s| s.to_vec()),
                ))
            }
            Method::CachingSha2 => {
                let nonce: &[u8; 20] = self
                    .nonce
                    .as_slice()
                    .try_into()
                    .map_err(|_| bad_nonce(self.method.name()))?;
                Ok(Zeroizing::new(
                    scramble_sha256(nonce, password).map_or_else(Vec::new, |s| s.to_vec()),
                ))
            }
            Method::Sha256 => {
                if self.nonce.len() != 20 {
                    return Err(bad_nonce(self.method.name()));
                }
                self.send_password(password, t, 0x01)
            }
            Method::Clear => {
                if !t.tls {
                    return Err(AuthError::Refused(
                        "the server asked for the password in cleartext \
                         (mysql_clear_password) on a connection without TLS",
                    ));
                }
                self.state = State::PasswordSent;
                Ok(with_nul(password))
            }
            Method::Ed25519 => {
                if self.nonce.len() != 32 {
                    return Err(bad_nonce(self.method.name()));
                }
                let answer = ClientEd25519::default()
                    .run(Password(password), &self.nonce)
                    .map_err(|e| AuthError::Protocol(format!("client_ed25519: {e}")))?;
                Ok(Zeroizing::new(answer.data().unwrap_or_default().to_vec()))
            }
        }
    }

    /// The whole password: with a NUL over TLS; else RSA-encrypted with the configured
    /// key; else a request for the server's key (`request`: 0x02 for caching_sha2, 0x01
    /// for sha256_password).
    fn send_password(
        &mut self,
        password: &[u8],
        t: &Transport<'_>,
        request: u8,
    ) -> Result<Zeroizing<Vec<u8>>, AuthError> {
        if t.tls {
            self.state = State::PasswordSent;
            return Ok(with_nul(password));
        }
        if let Some(key) = t.server_key {
            self.state = State::PasswordSent;
            return encrypt(password, &self.nonce, key);
        }
        self.state = State::KeyRequested;
        Ok(Zeroizing::new(vec![request]))
    }
}

fn with_nul(password: &[u8]) -> Zeroizing<Vec<u8>> {
    let mut v = Zeroizing::new(Vec::with_capacity(password.len() + 1));
    v.extend_from_slice(password);
    v.push(0);
    v
}

/// The password and a NUL, XORed with the scramble, encrypted with the server's RSA
/// public key (PEM) with OAEP padding (MySQL 8.0.5 and later).
fn encrypt(password: &[u8], nonce: &[u8], key_pem: &[u8]) -> Result<Zeroizing<Vec<u8>>, AuthError> {
    if nonce.is_empty() {
        return Err(AuthError::Protocol("no scramble to encrypt with".into()));
    }
    let mut block = with_nul(password);
    for (i, b) in block.iter_mut().enumerate() {
        *b ^= nonce[i % nonce.len()];
    }
    crypto::encrypt(&block, key_pem)
        .map(Zeroizing::new)
        .map_err(|e| match e {
            crypto::Error::Key(_) => {
                AuthError::Protocol("the server's RSA public key is not a valid PEM key".into())
            }
            crypto::Error::Padding(_) => {
                AuthError::Protocol("the password is too long for the server's RSA key".into())
            }
        })
}

/// What mysql_common's ed25519 plugin needs: the password.
struct Password<'a>(&'a [u8]);

impl Context for Password<'_> {
    fn pass(&self) -> &[u8] {
        self.0
    }
    fn is_ipc_transport(&self) -> bool {
        false
    }
    fn is_tls_transport(&self) -> bool {
        false
    }
    fn scramble(&self) -> &[u8] {
        &[]
    }
    fn server_key_pem(&self) -> Option<&[u8]> {
        None
    }
}

/// Whether `key` (PEM) is an RSA public key the encryption can use.
#[must_use]
pub fn valid_public_key(key: &[u8]) -> bool {
    crypto::rsa::PublicKey::from_pem(key).is_ok()
}

#[cfg(test)]
mod tests {
    use mysql_common::num_bigint::BigUint;
    use sha1::{Digest as _, Sha1};
    use sha2::Sha256;

    use super::*;

    const PLAIN: Transport<'static> = Transport {
        tls: false,
        server_key: None,
    };
    const TLS: Transport<'static> = Transport {
        tls: true,
        server_key: None,
    };
    const OK: &[u8] = b"\x00\x00\x00\x02\x00\x00\x00";
    const NONCE: &[u8; 20] = b"0123456789abcdefghij";

    /// A 2048-bit RSA key made for this test with Python's `cryptography`.
    const TEST_KEY_PEM: &[u8] = b"-----BEGIN PUBLIC KEY-----
MIIBIjANBgkqhkiG9w0BAQEFAAOCAQ8AMIIBCgKCAQEAk0xCZcXX1EbbHSgsRilP
Buc2kyXi/GXDFSfGC6BWSyjDij68a/07HgvNWDxgpm3wVu0yrEul9pHvUL0Tqaa9
OLegY+l8iI/zyRmsO1L+Cno9QJUdAQoUwVFBw/Z4RjcSk5CDBgHwJ+Jkj5WeD/Re
5G+r4gydRSDIZDSnMdgSPlC9jc+jeVjwKF6b/41dHyl5nSjvrLJgDCREd8My0ja4
lf8P9Q69Eu/woeZYfpMRvGe8w2XIIKOEkEinqspIDEKTpYNje5gA1m2kx/hJMHDj
9NJEO80YvC0buKcsFrF5FVQNS5bkW7mfvmaWWQlOW4lrrWDu5+djBoCvaBz1ZuH7
dwIDAQAB
-----END PUBLIC KEY-----
";
    const TEST_KEY_N: &str = "934c4265c5d7d446db1d282c46294f06e7369325e2fc65c31527c60ba0564b28c38a3ebc6bfd3b1e0bcd583c60a66df056ed32ac4ba5f691ef50bd13a9a6bd38b7a063e97c888ff3c919ac3b52fe0a7a3d40951d010a14c15141c3f6784637129390830601f027e2648f959e0ff45ee46fabe20c9d4520c86434a731d8123e50bd8dcfa37958f0285e9bff8d5d1f29799d28efacb2600c244477c332d236b895ff0ff50ebd12eff0a1e6587e9311bc67bcc365c820a3849048a7aaca480c4293a583637b9800d66da4c7f8493070e3f4d2443bcd18bc2d1bb8a72c16b17915540d4b96e45bb99fbe669659094e5b896bad60eee7e7630680af681cf566e1fb77";
    const TEST_KEY_D: &str = "797fedefafc22d8244e5f2bd3d22808d5bd5d33597db9a1526337dfe6e6e153bb56528afee63c8dfd531b76c164d320ce2fc6ffaaf166177a9c51a319de9c12b87a19ac87dc627a26fbf3d7d0722db2c4f04cbfaf60b30139b732406ff8440e93c7a22445254f13bf80c783313f5fefac477d8d38ee6a14eaaaec3e5d97fdd907bc4a809c06c21550e1943586267c82f59d5c6863c4e022ced85c6d26e569c87b4c2be64f16b4d9f9adf707392e02accc9f082ae9f939cc3c7f8a53ae1bd28073e901c652659f8eb645d82d61e9d2a4424ce3f429a875f74a73a6aba240ea6aebca8ab54d6c879936bb8f8f0835379cd7d5e229a66c48c801f7aa5ffa63a581";

    fn mgf1(seed: &[u8], len: usize) -> Vec<u8> {
        let mut out = Vec::new();
        let mut c = 0u32;
        while out.len() < len {
            out.extend_from_slice(
                &Sha1::new()
                    .chain_update(seed)
                    .chain_update(c.to_be_bytes())
                    .finalize(),
            );
            c += 1;
        }
        out.truncate(len);
        out
    }

    /// RSA-OAEP (SHA-1, empty label) decryption with the test key, written from
    /// RFC 8017 7.1.2 as an independent check of what the server would read.
    fn decrypt(c: &[u8]) -> Vec<u8> {
        let n = BigUint::parse_bytes(TEST_KEY_N.as_bytes(), 16).unwrap();
        let d = BigUint::parse_bytes(TEST_KEY_D.as_bytes(), 16).unwrap();
        let k = 256;
        assert_eq!(c.len(), k);
        let m = BigUint::from_bytes_be(c).modpow(&d, &n).to_bytes_be();
        let mut em = vec![0; k - m.len()];
        em.extend_from_slice(&m);
        assert_eq!(em[0], 0);
        let (masked_seed, masked_db) = em[1..].split_at(20);
        let seed: Vec<u8> = masked_seed
            .iter()
            .zip(mgf1(masked_db, 20))
            .map(|(a, b)| a ^ b)
            .collect();
        let db: Vec<u8> = masked_db
            .iter()
            .zip(mgf1(&seed, k - 21))
            .map(|(a, b)| a ^ b)
            .collect();
        assert_eq!(&db[..20], Sha1::digest(b"").as_slice());
        let one = 20 + db[20..].iter().position(|&b| b != 0).unwrap();
        assert_eq!(db[one], 1);
        db[one + 1..].to_vec()
    }

    /// What a server reads from an RSA-encrypted password: the password and a NUL.
    fn unscramble(block: &[u8], nonce: &[u8]) -> Vec<u8> {
        block
            .iter()
            .enumerate()
            .map(|(i, b)| b ^ nonce[i % nonce.len()])
            .collect()
    }

    fn sent(step: Step) -> Vec<u8> {
        match step {
            Step::Send(d) => d.to_vec(),
            other => panic!("expected Send, got {other:?}"),
        }
    }

    /// `mysql_native_password`: mysql_common's published vector, and the server's own
    /// check against the stored hash `PASSWORD('password')` =
    /// `*2470C0C06DEE42FD1618BB99005ADCA2EC9D1E19` (MySQL reference manual).
    #[test]
    fn native_password_vectors() {
        let nonce = [
            0x4e, 0x52, 0x33, 0x48, 0x50, 0x3a, 0x71, 0x49, 0x59, 0x61, 0x5f, 0x39, 0x3d, 0x64,
            0x62, 0x3f, 0x53, 0x64, 0x7b, 0x60,
        ];
        let (auth, data) = ServerAuth::start(
            Some(b"mysql_native_password"),
            &nonce,
            &[0x47, 0x21, 0x69, 0x64, 0x65, 0x72, 0x32, 0x37],
            &PLAIN,
        )
        .unwrap();
        assert_eq!(auth.method(), Method::Native);
        assert_eq!(
            data.as_slice(),
            [
                0x09, 0xcf, 0xf8, 0x85, 0x5e, 0x9e, 0x70, 0x53, 0x40, 0xff, 0x22, 0x70, 0xd8, 0xfb,
                0x9f, 0xad, 0xba, 0x90, 0x6b, 0x70,
            ]
        );
        let (_, data) = ServerAuth::start(None, NONCE, b"password", &PLAIN).unwrap();
        let stored: Vec<u8> = (0..20)
            .map(|i| {
                u8::from_str_radix(
                    &"2470C0C06DEE42FD1618BB99005ADCA2EC9D1E19"[i * 2..i * 2 + 2],
                    16,
                )
                .unwrap()
            })
            .collect();
        let mask = Sha1::new()
            .chain_update(NONCE)
            .chain_update(&stored)
            .finalize();
        let stage1: Vec<u8> = data.iter().zip(mask).map(|(a, b)| a ^ b).collect();
        assert_eq!(Sha1::digest(&stage1).as_slice(), stored);
    }

    /// `caching_sha2_password` fast path: the server checks the scramble against
    /// SHA256(SHA256(password)), says 0x03, then OK.
    #[test]
    fn caching_sha2_fast_path() {
        let pw = b"s3cret";
        let (mut auth, data) =
            ServerAuth::start(Some(b"caching_sha2_password"), NONCE, pw, &PLAIN).unwrap();
        assert_eq!(auth.method(), Method::CachingSha2);
        let stored = Sha256::digest(Sha256::digest(pw));
        let mask = Sha256::new()
            .chain_update(stored)
            .chain_update(NONCE)
            .finalize();
        let stage1: Vec<u8> = data.iter().zip(mask).map(|(a, b)| a ^ b).collect();
        assert_eq!(Sha256::digest(&stage1), stored);
        assert!(matches!(auth.next(b"\x01\x03", pw, &PLAIN), Ok(Step::Read)));
        assert!(matches!(auth.next(OK, pw, &PLAIN), Ok(Step::Ok)));
    }

    #[test]
    fn caching_sha2_full_auth_over_tls_sends_the_password() {
        let pw = b"s3cret";
        let (mut auth, _) =
            ServerAuth::start(Some(b"caching_sha2_password"), NONCE, pw, &TLS).unwrap();
        assert_eq!(sent(auth.next(b"\x01\x04", pw, &TLS).unwrap()), b"s3cret\0");
        assert!(matches!(auth.next(OK, pw, &TLS), Ok(Step::Ok)));
    }

    #[test]
    fn caching_sha2_full_auth_with_the_configured_key() {
        let pw = b"s3cret";
        let t = Transport {
            tls: false,
            server_key: Some(TEST_KEY_PEM),
        };
        let (mut auth, _) =
            ServerAuth::start(Some(b"caching_sha2_password"), NONCE, pw, &t).unwrap();
        let c = sent(auth.next(b"\x01\x04", pw, &t).unwrap());
        assert_eq!(unscramble(&decrypt(&c), NONCE), b"s3cret\0");
        assert!(matches!(auth.next(OK, pw, &t), Ok(Step::Ok)));
    }

    #[test]
    fn caching_sha2_full_auth_asks_for_the_key() {
        let pw = b"a-longer password, still under the OAEP limit";
        let (mut auth, _) =
            ServerAuth::start(Some(b"caching_sha2_password"), NONCE, pw, &PLAIN).unwrap();
        assert_eq!(sent(auth.next(b"\x01\x04", pw, &PLAIN).unwrap()), [0x02]);
        let mut more = vec![0x01];
        more.extend_from_slice(TEST_KEY_PEM);
        let c = sent(auth.next(&more, pw, &PLAIN).unwrap());
        let mut want = pw.to_vec();
        want.push(0);
        assert_eq!(unscramble(&decrypt(&c), NONCE), want);
        assert!(matches!(auth.next(OK, pw, &PLAIN), Ok(Step::Ok)));
        // A bad key from the server is an error, not a panic.
        let (mut auth, _) =
            ServerAuth::start(Some(b"caching_sha2_password"), NONCE, pw, &PLAIN).unwrap();
        auth.next(b"\x01\x04", pw, &PLAIN).unwrap();
        assert!(matches!(
            auth.next(b"\x01not a key", pw, &PLAIN),
            Err(AuthError::Protocol(_))
        ));
    }

    #[test]
    fn sha256_password() {
        let pw = b"pw";
        let (_, data) = ServerAuth::start(Some(b"sha256_password"), NONCE, pw, &TLS).unwrap();
        assert_eq!(data.as_slice(), b"pw\0");
        let (mut auth, data) =
            ServerAuth::start(Some(b"sha256_password"), NONCE, pw, &PLAIN).unwrap();
        assert_eq!(data.as_slice(), [0x01]);
        let mut more = vec![0x01];
        more.extend_from_slice(TEST_KEY_PEM);
        let c = sent(auth.next(&more, pw, &PLAIN).unwrap());
        assert_eq!(unscramble(&decrypt(&c), NONCE), b"pw\0");
        assert!(matches!(auth.next(OK, pw, &PLAIN), Ok(Step::Ok)));
    }

    fn switch(plugin: &[u8], data: &[u8]) -> Vec<u8> {
        let mut p = vec![0xFE];
        p.extend_from_slice(plugin);
        p.push(0);
        p.extend_from_slice(data);
        p
    }

    #[test]
    fn auth_switch() {
        let pw = b"password";
        // caching_sha2 greeting, account on native: answered with the new scramble
        // (MySQL sends it with a trailing NUL).
        let (mut auth, _) =
            ServerAuth::start(Some(b"caching_sha2_password"), NONCE, pw, &PLAIN).unwrap();
        let new = b"ABCDEFGHIJKLMNOPQRST";
        let mut data = new.to_vec();
        data.push(0);
        let answer = sent(
            auth.next(&switch(b"mysql_native_password", &data), pw, &PLAIN)
                .unwrap(),
        );
        assert_eq!(answer, scramble_native(new, pw).unwrap());
        assert_eq!(auth.method(), Method::Native);
        // Only one switch.
        assert!(matches!(
            auth.next(&switch(b"mysql_native_password", &data), pw, &PLAIN),
            Err(AuthError::Protocol(_))
        ));
        // native greeting, account on caching_sha2, then the fast path.
        let (mut auth, _) = ServerAuth::start(None, NONCE, pw, &PLAIN).unwrap();
        let answer = sent(
            auth.next(&switch(b"caching_sha2_password", &data), pw, &PLAIN)
                .unwrap(),
        );
        assert_eq!(answer, scramble_sha256(new, pw).unwrap());
        assert!(matches!(auth.next(b"\x01\x03", pw, &PLAIN), Ok(Step::Read)));
        assert!(matches!(auth.next(OK, pw, &PLAIN), Ok(Step::Ok)));
        // mysql_clear_password: over TLS only.
        let (mut auth, _) = ServerAuth::start(None, NONCE, pw, &PLAIN).unwrap();
        assert!(matches!(
            auth.next(&switch(b"mysql_clear_password", b""), pw, &PLAIN),
            Err(AuthError::Refused(_))
        ));
        let (mut auth, _) = ServerAuth::start(None, NONCE, pw, &TLS).unwrap();
        assert_eq!(
            sent(
                auth.next(&switch(b"mysql_clear_password", b""), pw, &TLS)
                    .unwrap()
            ),
            b"password\0"
        );
        // The old switch and unknown methods are refused, naming the method.
        let (mut auth, _) = ServerAuth::start(None, NONCE, pw, &PLAIN).unwrap();
        assert_eq!(
            auth.next(b"\xfe", pw, &PLAIN).unwrap_err(),
            AuthError::Unsupported("mysql_old_password".into())
        );
        let (mut auth, _) = ServerAuth::start(None, NONCE, pw, &PLAIN).unwrap();
        let e = auth
            .next(&switch(b"auth_gssapi_client", b"x"), pw, &PLAIN)
            .unwrap_err();
        assert_eq!(
            e.to_string(),
            "the server asked for `auth_gssapi_client` authentication, which the broker does not do"
        );
    }

    /// MariaDB's ed25519: the signature of the 32-byte scramble with the key derived from
    /// the password. For a 32-byte password that is RFC 8032 Ed25519 with the password as
    /// the seed; the expected value is from Python's `cryptography`.
    #[test]
    fn ed25519() {
        let pw = b"0123456789abcdef0123456789abcdef";
        let nonce: Vec<u8> = (0..32).collect();
        let (mut auth, _) = ServerAuth::start(None, NONCE, pw, &PLAIN).unwrap();
        let sig = sent(
            auth.next(&switch(b"client_ed25519", &nonce), pw, &PLAIN)
                .unwrap(),
        );
        let hex: String = sig.iter().map(|b| format!("{b:02x}")).collect();
        assert_eq!(
            hex,
            "35f8279abc453a33d152e79ba89692fd5829db9bc1fffb946b95f893166be180\
             12597112063bd06ce3e3519d7f9faeeb1357587dd75124486f83cd6a8b71b00c"
        );
        assert!(matches!(auth.next(OK, pw, &PLAIN), Ok(Step::Ok)));
        // The scramble must be 32 bytes.
        let (mut auth, _) = ServerAuth::start(None, NONCE, pw, &PLAIN).unwrap();
        assert!(
            auth.next(&switch(b"client_ed25519", b"short"), pw, &PLAIN)
                .is_err()
        );
    }

    #[test]
    fn errors_and_junk() {
        let pw = b"pw";
        let (mut auth, _) = ServerAuth::start(None, NONCE, pw, &PLAIN).unwrap();
        let Ok(Step::Err(e)) = auth.next(
            &super::super::errors::err_payload(1045, "28000", "Access denied"),
            pw,
            &PLAIN,
        ) else {
            panic!("not an error")
        };
        assert!(e.is_credential_rejection());
        for junk in [&b""[..], b"\x05", b"\x01\x03", b"\x00"] {
            let (mut auth, _) = ServerAuth::start(None, NONCE, pw, &PLAIN).unwrap();
            assert!(auth.next(junk, pw, &PLAIN).is_err(), "{junk:?}");
        }
        // caching_sha2: an unknown status; a second 0x03.
        let (mut auth, _) =
            ServerAuth::start(Some(b"caching_sha2_password"), NONCE, pw, &PLAIN).unwrap();
        assert!(auth.next(b"\x01\x09", pw, &PLAIN).is_err());
        let (mut auth, _) =
            ServerAuth::start(Some(b"caching_sha2_password"), NONCE, pw, &PLAIN).unwrap();
        auth.next(b"\x01\x03", pw, &PLAIN).unwrap();
        assert!(auth.next(b"\x01\x03", pw, &PLAIN).is_err());
        // A bad scramble size.
        assert!(ServerAuth::start(None, b"short", pw, &PLAIN).is_err());
        // The exchange is bounded.
        let (mut auth, _) = ServerAuth::start(None, NONCE, pw, &PLAIN).unwrap();
        auth.packets = MAX_PACKETS;
        assert!(auth.next(OK, pw, &PLAIN).is_err());
        // Greeting plugins the broker does not start with are answered natively.
        let (auth, data) = ServerAuth::start(Some(b"client_ed25519"), NONCE, pw, &PLAIN).unwrap();
        assert_eq!((auth.method(), data.len()), (Method::Native, 20));
        let (auth, _) = ServerAuth::start(Some(b"dialog"), NONCE, pw, &PLAIN).unwrap();
        assert_eq!(auth.method(), Method::Native);
        assert!(valid_public_key(TEST_KEY_PEM));
        assert!(!valid_public_key(
            b"-----BEGIN PUBLIC KEY-----\nAAAA\n-----END PUBLIC KEY-----\n"
        ));
    }
}
