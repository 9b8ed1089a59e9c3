//! SCRAM-SHA-256 and SCRAM-SHA-256-PLUS server (RFC 5802, RFC 7677, channel binding
//! `tls-server-end-point` RFC 5929) as PostgreSQL speaks it (`auth-scram.c`): a state
//! machine over message bytes with no I/O.
//!
//! The broker uses it to authenticate the *client* against a per-service placeholder
//! password, so hardened client configurations (libpq `channel_binding=require`,
//! `require_auth=scram-sha-256`) work through the broker. The placeholder is not a
//! secret, but the derived keys are still zeroized and never printed.
//!
//! Flow: [`ScramServer::new`] (or [`ScramServer::with_keys`] with cached
//! [`ScramKeys`]) -> announce [`ScramServer::mechanisms`] in AuthenticationSASL ->
//! SASLInitialResponse to [`ScramServer::client_first`], its result in
//! AuthenticationSASLContinue -> SASLResponse to [`ScramServer::client_final`], its
//! result in AuthenticationSASLFinal, then AuthenticationOk. On any error, send an
//! ErrorResponse with [`ScramServerError::sqlstate`] (PostgreSQL sends no `e=` message).
//!
//! As in PostgreSQL: the user name in `n=` is ignored (the startup packet's `user`
//! counts), an authorization identity (`a=`) and mandatory extensions (`m=`) are
//! refused, other extensions are ignored, and a client that answers `y` (it could bind
//! but thinks the server cannot) while the server offered `-PLUS` is refused (downgrade).

use std::fmt;

use base64::{Engine as _, engine::general_purpose::STANDARD as B64};
use hmac::{Hmac, Mac};
use sha2::{Digest, Sha256};
use zeroize::Zeroizing;

use super::{
    errors::sqlstate,
    scram::{SCRAM_SHA_256, SCRAM_SHA_256_PLUS, compute_salted_password, new_nonce},
};

/// Iteration count, PostgreSQL's default (`scram_iterations`).
pub const DEFAULT_ITERATIONS: u32 = 4096;
/// Salt length, PostgreSQL's (`SCRAM_DEFAULT_SALT_LEN`).
pub const SALT_LEN: usize = 16;
/// Client messages longer than this are refused before parsing.
pub const MAX_MESSAGE_LEN: usize = 4096;

/// The only channel-binding type PostgreSQL (and the broker) supports.
const TLS_SERVER_END_POINT: &[u8] = b"tls-server-end-point";

/// Why an exchange failed. Messages are static: they never contain the password, key
/// material or bytes from the client.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ScramServerError {
    #[error("SCRAM message out of order (expected {0})")]
    OutOfOrder(&'static str),
    #[error("SCRAM message too long ({0} bytes)")]
    TooLong(usize),
    #[error("malformed SCRAM message: {0}")]
    Malformed(&'static str),
    #[error("client selected an invalid SASL authentication mechanism")]
    InvalidMechanism,
    #[error("SCRAM channel binding negotiation error: {0}")]
    ChannelBindingNegotiation(&'static str),
    #[error("client uses authorization identity, but it is not supported")]
    AuthzidNotSupported,
    #[error("client requires an unsupported SCRAM extension")]
    MandatoryExtension,
    #[error("SCRAM channel binding check failed")]
    ChannelBindingMismatch,
    #[error("invalid SCRAM response (nonce mismatch)")]
    NonceMismatch,
    #[error("password authentication failed (SCRAM proof did not verify)")]
    InvalidProof,
}

impl ScramServerError {
    /// The SQLSTATE PostgreSQL reports for this failure.
    #[must_use]
    pub fn sqlstate(&self) -> &'static str {
        match self {
            Self::InvalidProof => sqlstate::INVALID_PASSWORD,
            Self::ChannelBindingMismatch => sqlstate::INVALID_AUTHORIZATION,
            Self::AuthzidNotSupported | Self::MandatoryExtension => sqlstate::FEATURE_NOT_SUPPORTED,
            Self::OutOfOrder(_)
            | Self::TooLong(_)
            | Self::Malformed(_)
            | Self::InvalidMechanism
            | Self::ChannelBindingNegotiation(_)
            | Self::NonceMismatch => sqlstate::PROTOCOL_VIOLATION,
        }
    }
}

/// A SCRAM verifier: what PostgreSQL stores in `pg_authid` (salt, iterations, StoredKey,
/// ServerKey). Deriving it runs PBKDF2 (a few milliseconds at 4096 iterations), so a
/// caller may derive it once per service and clone it per connection. Keys are zeroed
/// on drop; `Debug` shows only the iteration count.
#[derive(Clone)]
pub struct ScramKeys {
    salt: Vec<u8>,
    iterations: u32,
    stored_key: Zeroizing<[u8; 32]>,
    server_key: Zeroizing<[u8; 32]>,
}

impl fmt::Debug for ScramKeys {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ScramKeys")
            .field("iterations", &self.iterations)
            .finish_non_exhaustive()
    }
}

fn hmac_sha256(key: &[u8], msg: &[u8]) -> [u8; 32] {
    Hmac::<Sha256>::new_from_slice(key)
        .expect("HMAC takes any key length")
        .chain_update(msg)
        .finalize()
        .into_bytes()
        .into()
}

impl ScramKeys {
    /// A verifier for `password` with a fresh random salt and [`DEFAULT_ITERATIONS`].
    /// CPU-bound (PBKDF2).
    #[must_use]
    pub fn generate(password: &[u8]) -> Self {
        let salt: [u8; SALT_LEN] = rand::random();
        Self::derive(password, salt.to_vec(), DEFAULT_ITERATIONS)
    }

    /// A verifier for `password` with the given salt and iteration count (0 is taken
    /// as 1). SASLprep is applied as PostgreSQL does. CPU-bound (PBKDF2).
    #[must_use]
    pub fn derive(password: &[u8], salt: Vec<u8>, iterations: u32) -> Self {
        let iterations = iterations.max(1);
        let salted = compute_salted_password(password, &salt, iterations);
        let client_key = Zeroizing::new(hmac_sha256(&*salted, b"Client Key"));
        let stored_key = Zeroizing::new(<[u8; 32]>::from(Sha256::digest(client_key.as_slice())));
        let server_key = Zeroizing::new(hmac_sha256(&*salted, b"Server Key"));
        Self {
            salt,
            iterations,
            stored_key,
            server_key,
        }
    }
}

/// The channel-binding flag of the client's GS2 header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum CbindFlag {
    /// `n`: the client does not bind.
    No,
    /// `y`: the client could bind but thinks the server cannot.
    Yes,
    /// `p=tls-server-end-point`.
    Tls,
}

enum State {
    Initial,
    /// server-first sent: waiting for client-final.
    SaltSent {
        client_first_bare: Vec<u8>,
        server_first: Vec<u8>,
        /// client nonce + server nonce.
        nonce: Vec<u8>,
        /// The expected `c=` value: base64(GS2 header + channel-binding data).
        cbind: String,
        channel_bound: bool,
    },
    Done,
    Failed,
}

/// A SCRAM server exchange. No I/O; `Debug` shows no key material.
pub struct ScramServer {
    keys: ScramKeys,
    /// tls-server-end-point hash of the certificate the broker presented to the client.
    binding: Option<Vec<u8>>,
    state: State,
}

impl fmt::Debug for ScramServer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let state = match self.state {
            State::Initial => "initial",
            State::SaltSent { .. } => "salt-sent",
            State::Done => "done",
            State::Failed => "failed",
        };
        f.debug_struct("ScramServer")
            .field("keys", &self.keys)
            .field("binding", &self.binding.is_some())
            .field("state", &state)
            .finish()
    }
}

/// The value of attribute `name` (`name=value`), if `attr` is that attribute.
fn attr(attr: &[u8], name: u8) -> Option<&[u8]> {
    match attr {
        [n, b'=', value @ ..] if *n == name => Some(value),
        _ => None,
    }
}

/// RFC 5802 `printable`: 0x21-0x7E except `,`.
fn is_printable(s: &[u8]) -> bool {
    s.iter().all(|&b| (0x21..=0x7e).contains(&b) && b != b',')
}

/// An optional extension (`ALPHA "=" value`); `m=` (mandatory) is refused.
fn check_extension(a: &[u8]) -> Result<(), ScramServerError> {
    match a {
        [b'm', b'=', ..] => Err(ScramServerError::MandatoryExtension),
        [n, b'=', ..] if n.is_ascii_alphabetic() => Ok(()),
        _ => Err(ScramServerError::Malformed("invalid attribute")),
    }
}

fn check_size(msg: &[u8]) -> Result<(), ScramServerError> {
    if msg.is_empty() {
        return Err(ScramServerError::Malformed("empty message"));
    }
    if msg.len() > MAX_MESSAGE_LEN {
        return Err(ScramServerError::TooLong(msg.len()));
    }
    if msg.contains(&0) {
        return Err(ScramServerError::Malformed("NUL byte"));
    }
    Ok(())
}

impl ScramServer {
    /// An exchange for `password` (fresh salt, [`DEFAULT_ITERATIONS`]; runs PBKDF2, a
    /// few milliseconds). `binding`: the tls-server-end-point hash of the certificate
    /// the broker presented on the client leg when it is TLS, else `None` (an empty
    /// hash counts as `None`).
    #[must_use]
    pub fn new(password: &[u8], binding: Option<Vec<u8>>) -> Self {
        Self::with_keys(ScramKeys::generate(password), binding)
    }

    /// An exchange with a precomputed (e.g. cached per service) verifier.
    #[must_use]
    pub fn with_keys(keys: ScramKeys, binding: Option<Vec<u8>>) -> Self {
        Self {
            keys,
            binding: binding.filter(|b| !b.is_empty()),
            state: State::Initial,
        }
    }

    /// The mechanisms for AuthenticationSASL, in PostgreSQL's order.
    #[must_use]
    pub fn mechanisms(&self) -> Vec<&'static str> {
        if self.binding.is_some() {
            vec![SCRAM_SHA_256_PLUS, SCRAM_SHA_256]
        } else {
            vec![SCRAM_SHA_256]
        }
    }

    /// SASLInitialResponse: the chosen mechanism and the client-first-message; returns
    /// the server-first-message.
    ///
    /// # Errors
    /// Out of order, oversized or malformed message, a mechanism not offered, a GS2
    /// header that does not match the mechanism (or a `y` downgrade), an authzid, a
    /// mandatory extension. The exchange is then failed.
    pub fn client_first(
        &mut self,
        mechanism: &str,
        msg: &[u8],
    ) -> Result<Vec<u8>, ScramServerError> {
        self.client_first_with_nonce(mechanism, msg, &new_nonce())
    }

    fn client_first_with_nonce(
        &mut self,
        mechanism: &str,
        msg: &[u8],
        server_nonce: &str,
    ) -> Result<Vec<u8>, ScramServerError> {
        if !matches!(self.state, State::Initial) {
            self.state = State::Failed;
            return Err(ScramServerError::OutOfOrder("client-first"));
        }
        self.state = State::Failed;
        check_size(msg)?;
        let channel_bound = match mechanism {
            SCRAM_SHA_256_PLUS if self.binding.is_some() => true,
            SCRAM_SHA_256 => false,
            _ => return Err(ScramServerError::InvalidMechanism),
        };

        // GS2 header: cbind-flag "," [authzid] ",".
        let (flag, rest) = if let Some(rest) = msg.strip_prefix(b"n,") {
            (CbindFlag::No, rest)
        } else if let Some(rest) = msg.strip_prefix(b"y,") {
            (CbindFlag::Yes, rest)
        } else if let Some(rest) = msg.strip_prefix(b"p=") {
            let end = rest
                .iter()
                .position(|&b| b == b',')
                .ok_or(ScramServerError::Malformed("truncated GS2 header"))?;
            if &rest[..end] != TLS_SERVER_END_POINT {
                return Err(ScramServerError::ChannelBindingNegotiation(
                    "unsupported channel-binding type",
                ));
            }
            (CbindFlag::Tls, &rest[end + 1..])
        } else {
            return Err(ScramServerError::Malformed(
                "unexpected channel-binding flag",
            ));
        };
        match (flag, channel_bound) {
            (CbindFlag::Tls, true) | (CbindFlag::No, false) => {}
            (CbindFlag::No | CbindFlag::Yes, true) => {
                return Err(ScramServerError::ChannelBindingNegotiation(
                    "the client selected SCRAM-SHA-256-PLUS, but the SCRAM message does not include channel binding data",
                ));
            }
            (CbindFlag::Tls, false) => {
                return Err(ScramServerError::ChannelBindingNegotiation(
                    "the client selected SCRAM-SHA-256 without channel binding, but the SCRAM message includes channel binding data",
                ));
            }
            (CbindFlag::Yes, false) => {
                if self.binding.is_some() {
                    return Err(ScramServerError::ChannelBindingNegotiation(
                        "the client supports channel binding but thinks the server does not; this server does (downgrade?)",
                    ));
                }
            }
        }
        if rest.first() == Some(&b'a') {
            return Err(ScramServerError::AuthzidNotSupported);
        }
        let bare = rest.strip_prefix(b",").ok_or(ScramServerError::Malformed(
            "unexpected attribute in GS2 header",
        ))?;
        let gs2_header = &msg[..msg.len() - bare.len()];

        // client-first-message-bare: [reserved-mext ","] username "," nonce ["," extensions]
        let mut attrs = bare.split(|&b| b == b',');
        let user = attrs.next().unwrap_or_default();
        if user.starts_with(b"m=") {
            return Err(ScramServerError::MandatoryExtension);
        }
        // The user name is ignored: the startup packet's `user` counts.
        attr(user, b'n').ok_or(ScramServerError::Malformed("expected user name"))?;
        let client_nonce = attrs
            .next()
            .and_then(|a| attr(a, b'r'))
            .ok_or(ScramServerError::Malformed("expected nonce"))?;
        if client_nonce.is_empty() || !is_printable(client_nonce) {
            return Err(ScramServerError::Malformed("invalid characters in nonce"));
        }
        attrs.try_for_each(check_extension)?;

        let mut cbind = gs2_header.to_vec();
        if flag == CbindFlag::Tls {
            cbind.extend_from_slice(self.binding.as_deref().unwrap_or_default());
        }
        let mut nonce = client_nonce.to_vec();
        nonce.extend_from_slice(server_nonce.as_bytes());
        let mut server_first = b"r=".to_vec();
        server_first.extend_from_slice(&nonce);
        server_first.extend_from_slice(
            format!(
                ",s={},i={}",
                B64.encode(&self.keys.salt),
                self.keys.iterations
            )
            .as_bytes(),
        );
        self.state = State::SaltSent {
            client_first_bare: bare.to_vec(),
            server_first: server_first.clone(),
            nonce,
            cbind: B64.encode(cbind),
            channel_bound,
        };
        Ok(server_first)
    }

    /// SASLResponse: the client-final-message; verifies channel binding, nonce and proof
    /// and returns the server-final-message (`v=...`).
    ///
    /// # Errors
    /// Out of order, oversized or malformed message, channel-binding mismatch, nonce
    /// mismatch, a mandatory extension, or a proof that does not verify
    /// ([`ScramServerError::InvalidProof`]: wrong password). The exchange is then failed.
    pub fn client_final(&mut self, msg: &[u8]) -> Result<Vec<u8>, ScramServerError> {
        let State::SaltSent {
            client_first_bare,
            server_first,
            nonce,
            cbind,
            channel_bound,
        } = std::mem::replace(&mut self.state, State::Failed)
        else {
            return Err(ScramServerError::OutOfOrder("client-final"));
        };
        check_size(msg)?;

        // client-final-message: channel-binding "," nonce ["," extensions] "," proof
        let mut attrs = msg.split(|&b| b == b',');
        let c = attrs
            .next()
            .and_then(|a| attr(a, b'c'))
            .ok_or(ScramServerError::Malformed("expected channel binding"))?;
        if c != cbind.as_bytes() {
            return Err(if channel_bound {
                ScramServerError::ChannelBindingMismatch
            } else {
                ScramServerError::Malformed("unexpected channel-binding attribute")
            });
        }
        let r = attrs
            .next()
            .and_then(|a| attr(a, b'r'))
            .ok_or(ScramServerError::Malformed("expected nonce"))?;
        if r != nonce {
            return Err(ScramServerError::NonceMismatch);
        }
        let mut proof = None;
        for a in attrs {
            if proof.is_some() {
                return Err(ScramServerError::Malformed("garbage after the proof"));
            }
            match attr(a, b'p') {
                Some(p) => proof = Some(p),
                None => check_extension(a)?,
            }
        }
        let proof = proof.ok_or(ScramServerError::Malformed("expected proof"))?;
        let without_proof = &msg[..msg.len() - proof.len() - b",p=".len()];
        let proof: [u8; 32] = B64
            .decode(proof)
            .ok()
            .and_then(|p| p.try_into().ok())
            .ok_or(ScramServerError::Malformed("invalid proof"))?;

        let mut auth_message = client_first_bare;
        auth_message.push(b',');
        auth_message.extend_from_slice(&server_first);
        auth_message.push(b',');
        auth_message.extend_from_slice(without_proof);

        // ClientKey = ClientProof XOR HMAC(StoredKey, AuthMessage); H(ClientKey) must be
        // StoredKey.
        let mut client_key = Zeroizing::new(hmac_sha256(&*self.keys.stored_key, &auth_message));
        for (k, p) in client_key.iter_mut().zip(proof) {
            *k ^= p;
        }
        let computed = Zeroizing::new(<[u8; 32]>::from(Sha256::digest(client_key.as_slice())));
        let diff = computed
            .iter()
            .zip(self.keys.stored_key.iter())
            .fold(0u8, |acc, (a, b)| acc | (a ^ b));
        if std::hint::black_box(diff) != 0 {
            return Err(ScramServerError::InvalidProof);
        }
        let server_signature = hmac_sha256(&*self.keys.server_key, &auth_message);
        self.state = State::Done;
        Ok(format!("v={}", B64.encode(server_signature)).into_bytes())
    }

    /// The client's proof has been verified.
    #[must_use]
    pub fn is_done(&self) -> bool {
        matches!(self.state, State::Done)
    }
}

#[cfg(test)]
mod tests {
    use postgres_protocol::authentication::sasl::{
        ChannelBinding as PpBinding, ScramSha256 as PpClient,
    };

    use super::{
        super::scram::{ChannelBinding, ScramClient, ScramError},
        *,
    };

    const PW: &[u8] = b"placeholder-pw";
    const HASH: [u8; 32] = [0xab; 32];

    fn keys(pw: &[u8]) -> ScramKeys {
        ScramKeys::derive(pw, b"0123456789abcdef".to_vec(), 64)
    }

    fn server(binding: Option<Vec<u8>>) -> ScramServer {
        ScramServer::with_keys(keys(PW), binding)
    }

    /// Runs the broker's own client against `server`; returns the client's verdict on
    /// the server-final message, or the server's error.
    fn exchange(
        server: &mut ScramServer,
        password: &[u8],
        binding: ChannelBinding,
    ) -> Result<Result<(), ScramError>, ScramServerError> {
        let mut client = ScramClient::new("", new_nonce(), binding);
        let first = server.client_first(client.mechanism(), &client.client_first().unwrap())?;
        let params = client.server_first(&first).unwrap();
        let salted = compute_salted_password(password, &params.salt, params.iterations);
        let fin = server.client_final(&client.client_final(&salted).unwrap())?;
        Ok(client.server_final(&fin))
    }

    #[test]
    fn full_exchange_with_the_broker_client() {
        // Default construction: random salt, 4096 iterations.
        let mut s = ScramServer::new(PW, None);
        assert_eq!(s.mechanisms(), [SCRAM_SHA_256]);
        assert_eq!(
            exchange(&mut s, PW, ChannelBinding::NotSupported),
            Ok(Ok(()))
        );
        assert!(s.is_done());
        // Nothing more is accepted.
        assert_eq!(
            s.client_final(b"c=biws,r=x,p=AA=="),
            Err(ScramServerError::OutOfOrder("client-final"))
        );

        // `y` when the server offered no -PLUS: fine.
        let mut s = server(None);
        assert_eq!(exchange(&mut s, PW, ChannelBinding::NotOffered), Ok(Ok(())));
    }

    #[test]
    fn full_exchange_with_channel_binding() {
        let mut s = ScramServer::new(PW, Some(HASH.to_vec()));
        assert_eq!(s.mechanisms(), [SCRAM_SHA_256_PLUS, SCRAM_SHA_256]);
        assert_eq!(
            exchange(&mut s, PW, ChannelBinding::TlsServerEndPoint(HASH.to_vec())),
            Ok(Ok(()))
        );
        assert!(s.is_done());
        // A client that does not bind at all (`n`) may still pick plain SCRAM, as
        // PostgreSQL allows (libpq `channel_binding=disable`).
        let mut s = server(Some(HASH.to_vec()));
        assert_eq!(
            exchange(&mut s, PW, ChannelBinding::NotSupported),
            Ok(Ok(()))
        );
        // An empty hash counts as no binding.
        assert_eq!(server(Some(vec![])).mechanisms(), [SCRAM_SHA_256]);
    }

    #[test]
    fn wrong_password_fails_the_proof() {
        let mut s = server(Some(HASH.to_vec()));
        let err = exchange(
            &mut s,
            b"not-the-placeholder",
            ChannelBinding::TlsServerEndPoint(HASH.to_vec()),
        )
        .unwrap_err();
        assert_eq!(err, ScramServerError::InvalidProof);
        assert_eq!(err.sqlstate(), sqlstate::INVALID_PASSWORD);
        assert!(!s.is_done());
        let mut s = server(None);
        assert_eq!(
            exchange(&mut s, b"", ChannelBinding::NotSupported),
            Err(ScramServerError::InvalidProof)
        );
    }

    #[test]
    fn binding_mismatch_fails() {
        let mut s = server(Some(HASH.to_vec()));
        let err = exchange(
            &mut s,
            PW,
            ChannelBinding::TlsServerEndPoint([0xcd; 32].to_vec()),
        )
        .unwrap_err();
        assert_eq!(err, ScramServerError::ChannelBindingMismatch);
        assert_eq!(err.sqlstate(), sqlstate::INVALID_AUTHORIZATION);
    }

    #[test]
    fn downgrade_and_mechanism_mismatches_fail() {
        // `y` although -PLUS was offered: downgrade.
        let mut s = server(Some(HASH.to_vec()));
        assert!(matches!(
            exchange(&mut s, PW, ChannelBinding::NotOffered),
            Err(ScramServerError::ChannelBindingNegotiation(_))
        ));
        // `p=` on a server without binding: -PLUS was not offered.
        let mut s = server(None);
        assert_eq!(
            exchange(&mut s, PW, ChannelBinding::TlsServerEndPoint(HASH.to_vec())),
            Err(ScramServerError::InvalidMechanism)
        );
        // `p=` with plain SCRAM-SHA-256, with or without server binding.
        for b in [None, Some(HASH.to_vec())] {
            let mut s = server(b);
            assert!(matches!(
                s.client_first(SCRAM_SHA_256, b"p=tls-server-end-point,,n=,r=abc"),
                Err(ScramServerError::ChannelBindingNegotiation(_))
            ));
        }
        // -PLUS with `n` or `y`.
        for gs2 in ["n,,", "y,,"] {
            let mut s = server(Some(HASH.to_vec()));
            let err = s
                .client_first(SCRAM_SHA_256_PLUS, format!("{gs2}n=,r=abc").as_bytes())
                .unwrap_err();
            assert!(matches!(
                err,
                ScramServerError::ChannelBindingNegotiation(_)
            ));
            assert_eq!(err.sqlstate(), sqlstate::PROTOCOL_VIOLATION);
        }
        // Unknown mechanism, unsupported binding type.
        let mut s = server(Some(HASH.to_vec()));
        assert_eq!(
            s.client_first("SCRAM-SHA-1", b"n,,n=,r=abc"),
            Err(ScramServerError::InvalidMechanism)
        );
        let mut s = server(Some(HASH.to_vec()));
        assert!(matches!(
            s.client_first(SCRAM_SHA_256_PLUS, b"p=tls-unique,,n=,r=abc"),
            Err(ScramServerError::ChannelBindingNegotiation(_))
        ));
    }

    /// Runs the client up to its client-final message; returns the server and that
    /// message.
    fn at_final(binding: ChannelBinding, server_binding: Option<Vec<u8>>) -> (ScramServer, String) {
        let mut s = server(server_binding);
        let mut client = ScramClient::new("", new_nonce(), binding);
        let first = s
            .client_first(client.mechanism(), &client.client_first().unwrap())
            .unwrap();
        let params = client.server_first(&first).unwrap();
        let salted = compute_salted_password(PW, &params.salt, params.iterations);
        let fin = String::from_utf8(client.client_final(&salted).unwrap()).unwrap();
        (s, fin)
    }

    #[test]
    fn nonce_tampering_fails() {
        // The client accepts any server-first nonce extending its own: extend ours.
        let mut s = server(None);
        let mut client = ScramClient::new("", new_nonce(), ChannelBinding::NotSupported);
        let first = s
            .client_first(SCRAM_SHA_256, &client.client_first().unwrap())
            .unwrap();
        let first = String::from_utf8(first).unwrap().replacen(",s=", "X,s=", 1);
        let params = client.server_first(first.as_bytes()).unwrap();
        let salted = compute_salted_password(PW, &params.salt, params.iterations);
        let fin = client.client_final(&salted).unwrap();
        assert_eq!(s.client_final(&fin), Err(ScramServerError::NonceMismatch));

        // Tampered in transit: a changed, shortened or lengthened nonce, or the client
        // nonce alone.
        let tamper: [fn(&str, usize, usize) -> String; 4] = [
            |f, _, e| {
                let flipped = if &f[e - 1..e] == "A" { "B" } else { "A" };
                format!("{}{flipped}{}", &f[..e - 1], &f[e..])
            },
            |f, _, e| format!("{}{}", &f[..e - 1], &f[e..]),
            |f, _, e| format!("{}x{}", &f[..e], &f[e..]),
            |f, r, e| format!("{}{}", &f[..r + 24], &f[e..]),
        ];
        for t in tamper {
            let (mut s, fin) = at_final(ChannelBinding::NotSupported, None);
            let r_start = fin.find(",r=").unwrap() + 3;
            let r_end = fin.find(",p=").unwrap();
            let m = t(&fin, r_start, r_end);
            assert_ne!(m, fin);
            assert_eq!(
                s.client_final(m.as_bytes()),
                Err(ScramServerError::NonceMismatch)
            );
        }
    }

    #[test]
    fn client_final_is_validated() {
        let (_, good) = at_final(ChannelBinding::NotSupported, None);
        let r = &good[good.find(",r=").unwrap() + 1..good.find(",p=").unwrap()];
        let p = &good[good.find(",p=").unwrap() + 1..];
        let cases: Vec<(String, ScramServerError)> = vec![
            (String::new(), ScramServerError::Malformed("empty message")),
            (
                format!("c=eSws,{r},{p}"),
                ScramServerError::Malformed("unexpected channel-binding attribute"),
            ),
            (
                format!("c=cD10bHMtc2VydmVyLWVuZC1wb2ludCws,{r},{p}"),
                ScramServerError::Malformed("unexpected channel-binding attribute"),
            ),
            (
                format!("{r},c=biws,{p}"),
                ScramServerError::Malformed("expected channel binding"),
            ),
            (
                "c=biws".to_owned(),
                ScramServerError::Malformed("expected nonce"),
            ),
            (
                format!("c=biws,{r}"),
                ScramServerError::Malformed("expected proof"),
            ),
            (
                format!("c=biws,{r},{p},x=y"),
                ScramServerError::Malformed("garbage after the proof"),
            ),
            (
                format!("c=biws,{r},{p},"),
                ScramServerError::Malformed("garbage after the proof"),
            ),
            (
                format!("c=biws,{r},m=x,{p}"),
                ScramServerError::MandatoryExtension,
            ),
            (
                format!("c=biws,{r},1=x,{p}"),
                ScramServerError::Malformed("invalid attribute"),
            ),
            (
                format!("c=biws,{r},p=!!!"),
                ScramServerError::Malformed("invalid proof"),
            ),
            (
                format!("c=biws,{r},p=AAAA"),
                ScramServerError::Malformed("invalid proof"),
            ),
            (
                format!("c=biws,{r},{p}\0"),
                ScramServerError::Malformed("NUL byte"),
            ),
            (
                format!("c=biws,{r},{}", "x".repeat(MAX_MESSAGE_LEN)),
                ScramServerError::TooLong(MAX_MESSAGE_LEN + r.len() + 8),
            ),
        ];
        for (msg, want) in cases {
            // The nonce in `good` belongs to a server we dropped: build each case
            // against a fresh server with that server's nonce.
            let (mut s, fin) = at_final(ChannelBinding::NotSupported, None);
            let r2 = &fin[fin.find(",r=").unwrap() + 1..fin.find(",p=").unwrap()];
            let msg = msg.replace(r, r2);
            assert_eq!(s.client_final(msg.as_bytes()), Err(want), "{msg:?}");
            assert!(!s.is_done());
            // Failed: nothing more is accepted, not even the right message.
            assert_eq!(
                s.client_final(fin.as_bytes()),
                Err(ScramServerError::OutOfOrder("client-final"))
            );
        }
        // An optional extension before the proof is accepted (and covered by the
        // proof, so a client would have to sign it: here the proof then fails).
        let (mut s, fin) = at_final(ChannelBinding::NotSupported, None);
        let with_ext = fin.replacen(",p=", ",x=ext,p=", 1);
        assert_eq!(
            s.client_final(with_ext.as_bytes()),
            Err(ScramServerError::InvalidProof)
        );
        // A flipped proof bit.
        let (mut s, fin) = at_final(ChannelBinding::NotSupported, None);
        let p_at = fin.find(",p=").unwrap() + 3;
        let mut proof = B64.decode(&fin[p_at..]).unwrap();
        proof[0] ^= 1;
        let tampered = format!("{}{}", &fin[..p_at], B64.encode(proof));
        assert_eq!(
            s.client_final(tampered.as_bytes()),
            Err(ScramServerError::InvalidProof)
        );
    }

    #[test]
    fn client_first_is_validated() {
        let cases: &[(&[u8], ScramServerError)] = &[
            (b"", ScramServerError::Malformed("empty message")),
            (
                b"x,,n=,r=abc",
                ScramServerError::Malformed("unexpected channel-binding flag"),
            ),
            (
                b"n",
                ScramServerError::Malformed("unexpected channel-binding flag"),
            ),
            (b"n,a=bob,n=,r=abc", ScramServerError::AuthzidNotSupported),
            (
                b"n,x,n=,r=abc",
                ScramServerError::Malformed("unexpected attribute in GS2 header"),
            ),
            (
                b"n,",
                ScramServerError::Malformed("unexpected attribute in GS2 header"),
            ),
            (b"n,,m=ext,n=,r=abc", ScramServerError::MandatoryExtension),
            (
                b"n,,r=abc",
                ScramServerError::Malformed("expected user name"),
            ),
            (b"n,,n=", ScramServerError::Malformed("expected nonce")),
            (
                b"n,,n=,x=abc",
                ScramServerError::Malformed("expected nonce"),
            ),
            (
                b"n,,n=,r=",
                ScramServerError::Malformed("invalid characters in nonce"),
            ),
            (
                b"n,,n=,r=a b",
                ScramServerError::Malformed("invalid characters in nonce"),
            ),
            (
                b"n,,n=,r=a\x7fb",
                ScramServerError::Malformed("invalid characters in nonce"),
            ),
            (
                b"n,,n=,r=\xc3\xa4",
                ScramServerError::Malformed("invalid characters in nonce"),
            ),
            (
                b"n,,n=,r=abc,",
                ScramServerError::Malformed("invalid attribute"),
            ),
            (b"n,,n=,r=abc,m=x", ScramServerError::MandatoryExtension),
            (b"n,,n=\0,r=abc", ScramServerError::Malformed("NUL byte")),
        ];
        for (msg, want) in cases {
            let mut s = server(None);
            assert_eq!(
                s.client_first(SCRAM_SHA_256, msg).as_ref(),
                Err(want),
                "{}",
                String::from_utf8_lossy(msg)
            );
            // Failed: nothing more is accepted.
            assert!(s.client_first(SCRAM_SHA_256, b"n,,n=,r=abc").is_err());
            assert!(s.client_final(b"c=biws,r=abc,p=AA==").is_err());
        }

        // Oversized.
        let mut big = b"n,,n=,r=abc,x=".to_vec();
        big.resize(MAX_MESSAGE_LEN + 1, b'y');
        assert_eq!(
            server(None).client_first(SCRAM_SHA_256, &big),
            Err(ScramServerError::TooLong(MAX_MESSAGE_LEN + 1))
        );
        big.truncate(MAX_MESSAGE_LEN);
        assert!(server(None).client_first(SCRAM_SHA_256, &big).is_ok());

        // The user name is ignored (any bytes), optional extensions are ignored.
        let mut s = server(None);
        let first = s
            .client_first(SCRAM_SHA_256, b"n,,n=some=2Cone\xff,r=abc,x=1,y=2")
            .unwrap();
        let first = String::from_utf8(first).unwrap();
        let (r, rest) = first.split_once(",s=").unwrap();
        assert!(r.starts_with("r=abc") && r.len() == 5 + 24, "{first}");
        assert_eq!(rest, "MDEyMzQ1Njc4OWFiY2RlZg==,i=64");

        // Out of order.
        let mut s = server(None);
        assert_eq!(
            s.client_final(b"c=biws,r=abc,p=AA=="),
            Err(ScramServerError::OutOfOrder("client-final"))
        );
        let mut s = server(None);
        s.client_first(SCRAM_SHA_256, b"n,,n=,r=abc").unwrap();
        assert_eq!(
            s.client_first(SCRAM_SHA_256, b"n,,n=,r=abc"),
            Err(ScramServerError::OutOfOrder("client-first"))
        );
    }

    #[test]
    fn rfc7677_test_vector() {
        let salt = B64.decode("W22ZaJ0SNY7soEsUEjb6gQ==").unwrap();
        let mut s = ScramServer::with_keys(ScramKeys::derive(b"pencil", salt, 4096), None);
        let first = s
            .client_first_with_nonce(
                SCRAM_SHA_256,
                b"n,,n=user,r=rOprNGfwEbeRWgbNEkqO",
                "%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0",
            )
            .unwrap();
        assert_eq!(
            first,
            b"r=rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0,s=W22ZaJ0SNY7soEsUEjb6gQ==,i=4096"
        );
        let fin = s
            .client_final(b"c=biws,r=rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0,p=dHzbZapWIk4jUhN+Ute9ytag9zjfMHgsqmmiz7AndVQ=")
            .unwrap();
        assert_eq!(fin, b"v=6rriTRBi23WpRR/wtup+mMhUZUn/dB5nLTJRsjl95G4=");
        assert!(s.is_done());
    }

    /// Runs postgres-protocol's client against `server`.
    fn pp_exchange(
        server: &mut ScramServer,
        mechanism: &str,
        password: &[u8],
        binding: PpBinding,
    ) -> Result<std::io::Result<()>, ScramServerError> {
        let mut c = PpClient::new(password, binding);
        let first = server.client_first(mechanism, c.message())?;
        c.update(&first).unwrap();
        let fin = server.client_final(c.message())?;
        Ok(c.finish(&fin))
    }

    #[test]
    fn full_exchange_with_postgres_protocol() {
        let mut s = server(None);
        assert!(matches!(
            pp_exchange(&mut s, SCRAM_SHA_256, PW, PpBinding::unsupported()),
            Ok(Ok(()))
        ));
        assert!(s.is_done());
        let mut s = server(None);
        assert!(matches!(
            pp_exchange(&mut s, SCRAM_SHA_256, PW, PpBinding::unrequested()),
            Ok(Ok(()))
        ));
        let mut s = ScramServer::new(PW, Some(HASH.to_vec()));
        assert!(matches!(
            pp_exchange(
                &mut s,
                SCRAM_SHA_256_PLUS,
                PW,
                PpBinding::tls_server_end_point(HASH.to_vec())
            ),
            Ok(Ok(()))
        ));
        assert!(s.is_done());
        // SASLprep agrees (U+00A0 maps to a space, U+00AD to nothing).
        let pw = "p\u{e4}ss\u{a0}w\u{ad}rd".as_bytes();
        let mut s = ScramServer::with_keys(keys(pw), None);
        assert!(matches!(
            pp_exchange(
                &mut s,
                SCRAM_SHA_256,
                "p\u{e4}ss wrd".as_bytes(),
                PpBinding::unsupported()
            ),
            Ok(Ok(()))
        ));
        // Failures.
        let mut s = server(Some(HASH.to_vec()));
        assert!(matches!(
            pp_exchange(&mut s, SCRAM_SHA_256, PW, PpBinding::unrequested()),
            Err(ScramServerError::ChannelBindingNegotiation(_))
        ));
        let mut s = server(Some(HASH.to_vec()));
        assert!(matches!(
            pp_exchange(
                &mut s,
                SCRAM_SHA_256_PLUS,
                b"wrong",
                PpBinding::tls_server_end_point(HASH.to_vec())
            ),
            Err(ScramServerError::InvalidProof)
        ));
        let mut s = server(Some(HASH.to_vec()));
        assert!(matches!(
            pp_exchange(
                &mut s,
                SCRAM_SHA_256_PLUS,
                PW,
                PpBinding::tls_server_end_point(vec![1; 32])
            ),
            Err(ScramServerError::ChannelBindingMismatch)
        ));
    }

    #[test]
    fn nothing_secret_is_printed() {
        let pw = b"pencil-placeholder";
        let k = keys(pw);
        let mut s = ScramServer::with_keys(k.clone(), Some(HASH.to_vec()));
        let dbg = format!("{s:?} {k:?}");
        assert_eq!(
            format!("{s:?}"),
            "ScramServer { keys: ScramKeys { iterations: 64, .. }, binding: true, state: \"initial\" }"
        );
        for secret in [&k.stored_key[..], &k.server_key[..]] {
            assert!(!dbg.contains(&B64.encode(secret)));
        }
        assert!(!dbg.contains("pencil"));
        let err = exchange(
            &mut s,
            b"pencil-wrong",
            ChannelBinding::TlsServerEndPoint(HASH.to_vec()),
        )
        .unwrap_err();
        assert!(!err.to_string().contains("pencil"));
    }
}
