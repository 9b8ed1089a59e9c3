//! Authenticating to the upstream on the client's behalf: cleartext, MD5, SCRAM-SHA-256
//! and SCRAM-SHA-256-PLUS, then collecting the session's first messages (parameter
//! status, BackendKeyData, ReadyForQuery) to hand to the client.

use bytes::BytesMut;
use md5::{Digest as _, Md5};
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};
use zeroize::Zeroizing;

use super::{
    config::{AuthKind, RequireAuth},
    errors::{Failure, ServerError, sqlstate},
    messages::{self, BackendMessage, auth, tag},
    scram::{self, ChannelBinding, SaltedPasswordCache, ScramClient},
    startup::CancelKey,
};
use crate::{connector::ConnError, secret::Secret};

/// `"md5" + hex(md5(hex(md5(password + user)) + salt))`.
#[must_use]
pub fn md5_password(user: &[u8], password: &[u8], salt: [u8; 4]) -> Zeroizing<String> {
    let mut inner = Md5::new();
    inner.update(password);
    inner.update(user);
    let inner_hex = Zeroizing::new(hex(&inner.finalize()));
    let mut outer = Md5::new();
    outer.update(inner_hex.as_bytes());
    outer.update(salt);
    Zeroizing::new(format!("md5{}", hex(&outer.finalize())))
}

fn hex(bytes: &[u8]) -> String {
    use std::fmt::Write as _;
    bytes
        .iter()
        .fold(String::with_capacity(bytes.len() * 2), |mut s, b| {
            let _ = write!(s, "{b:02x}");
            s
        })
}

/// What the broker knows to authenticate with, and what it is willing to answer.
pub struct AuthInput<'a> {
    /// The user name sent in the startup message (md5 salts with it).
    pub user: &'a str,
    pub password: Option<&'a Secret>,
    /// Whether the upstream connection is TLS, and the channel-binding data when the
    /// server certificate allows it.
    pub tls: bool,
    pub channel_binding: Option<Vec<u8>>,
    pub policy: AuthPolicy,
}

/// Which authentication requests the broker answers, and the bounds of the exchange.
/// Checked before anything derived from the password is sent: the upstream may be
/// whoever holds the address the app (or a squatter) picked.
#[derive(Debug, Clone, Copy)]
pub struct AuthPolicy {
    /// `requireAuth` (config) or `require_auth` (credential); `None`: the default
    /// policy ([`RequireAuth::default_allows`]).
    pub require_auth: Option<RequireAuth>,
    /// The upstream is TLS and its certificate was verified (verify-ca, verify-full, or
    /// a root certificate given): the only case where the default policy sends a
    /// cleartext password.
    pub verified_tls: bool,
    /// SCRAM iteration counts above this are refused before PBKDF2 runs.
    pub scram_max_iterations: u32,
    pub limits: HandshakeLimits,
}

impl Default for AuthPolicy {
    fn default() -> Self {
        Self {
            require_auth: None,
            verified_tls: false,
            scram_max_iterations: super::config::DEFAULT_SCRAM_MAX_ITERATIONS,
            limits: HandshakeLimits::DEFAULT,
        }
    }
}

impl AuthPolicy {
    fn allows(&self, kind: AuthKind) -> bool {
        match self.require_auth {
            Some(r) => r.allows(kind),
            None => RequireAuth::default_allows(kind, self.verified_tls),
        }
    }

    /// Refuse a method the policy does not allow, naming the method and the setting.
    fn check(&self, kind: AuthKind) -> Result<(), Failure> {
        if self.allows(kind) {
            return Ok(());
        }
        let asked = match kind {
            AuthKind::None => {
                "the upstream opened the session without any authentication (trust)".to_owned()
            }
            AuthKind::Password => "the upstream asked for a cleartext password".to_owned(),
            k => format!("the upstream asked for {} authentication", k.name()),
        };
        let why = match self.require_auth {
            Some(r) => format!(
                "`requireAuth` allows only {}; add `{}` to it if this server is genuine",
                r.names(),
                kind.name()
            ),
            None if kind == AuthKind::Password => "the broker sends one only over TLS with \
                 a verified certificate (sslmode verify-ca or verify-full) or when \
                 `requireAuth` lists `password`"
                .to_owned(),
            None => format!(
                "the broker accepts that only when `requireAuth` lists `{}`",
                kind.name()
            ),
        };
        Err(Failure::new(
            sqlstate::REJECTED_ESTABLISHMENT,
            ConnError::Protocol(format!("refused: {asked}; {why}")),
        ))
    }
}

/// Bounds on what the upstream may send before ReadyForQuery: everything up to it is
/// held in memory to be handed to the client at once, so a hostile or broken server
/// must not be able to make it grow without end (a ParameterStatus flood reached
/// 1.5 GiB in 2 s before these existed).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HandshakeLimits {
    /// Bytes kept for the client (notices, AuthenticationOk, ParameterStatus, ...).
    pub max_bytes: usize,
    /// Messages read from the upstream, authentication included.
    pub max_messages: usize,
    /// Largest single message after AuthenticationOk.
    pub max_message: usize,
    /// Largest single message before AuthenticationOk (authentication requests, SASL
    /// data, notices, errors: all small).
    pub max_auth_message: usize,
}

impl HandshakeLimits {
    pub const DEFAULT: Self = Self {
        max_bytes: 1024 * 1024,
        max_messages: 10_000,
        max_message: messages::MAX_BACKEND_MESSAGE,
        max_auth_message: 64 * 1024,
    };
}

fn over_limit(what: String) -> Failure {
    Failure::new(
        sqlstate::PROTOCOL_VIOLATION,
        ConnError::Protocol(format!(
            "the upstream sent {what} before ReadyForQuery; connection closed"
        )),
    )
}

/// A session the server accepted.
pub struct Ready {
    /// Every message for the client, in order: notices and NegotiateProtocolVersion
    /// seen during authentication, AuthenticationOk, then everything up to and including
    /// ReadyForQuery.
    pub to_client: Vec<u8>,
    pub backend_key: Option<CancelKey>,
    /// How the broker authenticated: `trust`, `password`, `md5`, `SCRAM-SHA-256`,
    /// `SCRAM-SHA-256-PLUS`.
    pub method: &'static str,
}

impl std::fmt::Debug for Ready {
    // The messages hold the cancel key: sizes only.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Ready")
            .field("to_client_len", &self.to_client.len())
            .field("backend_key", &self.backend_key)
            .field("method", &self.method)
            .finish()
    }
}

/// How authentication ended.
#[derive(Debug)]
pub enum Outcome {
    Ready(Ready),
    /// The server refused the credentials (28P01/28000): worth retrying with fresh ones.
    /// `forward` is what to send the client if we give up (ends with the server's error).
    Rejected {
        error: ServerError,
        forward: Vec<u8>,
    },
}

async fn send<S: AsyncWrite + Unpin>(stream: &mut S, bytes: &[u8]) -> Result<(), ConnError> {
    stream.write_all(bytes).await?;
    stream.flush().await?;
    Ok(())
}

fn protocol(msg: impl Into<String>) -> Failure {
    Failure::new(
        sqlstate::PROTOCOL_VIOLATION,
        ConnError::Protocol(msg.into()),
    )
}

fn need_password<'a>(input: &AuthInput<'a>, method: &str) -> Result<&'a Secret, Failure> {
    input.password.ok_or_else(|| {
        Failure::new(
            sqlstate::REJECTED_ESTABLISHMENT,
            ConnError::Config(format!(
                "the upstream asked for {method} authentication but credential `password` is not set"
            )),
        )
    })
}

fn unsupported_method(code: u32) -> Failure {
    let name = match code {
        auth::KERBEROS_V5 => "Kerberos V5",
        auth::SCM_CREDENTIAL => "SCM credentials",
        auth::GSS | auth::GSS_CONTINUE => "GSSAPI",
        auth::SSPI => "SSPI",
        _ => "an unknown method",
    };
    Failure::new(
        sqlstate::REJECTED_ESTABLISHMENT,
        ConnError::Protocol(format!(
            "the upstream asked for {name} authentication (code {code}), which the broker does not support; use scram-sha-256, md5 or password in pg_hba.conf"
        )),
    )
}

/// Send the startup message and authenticate; on success read up to ReadyForQuery.
/// Bytes the server sent after ReadyForQuery stay in `buf`.
///
/// # Errors
/// A [`Failure`]: I/O, protocol violations, unsupported methods, SCRAM verification
/// failures, and server errors other than credential rejections (those are forwarded
/// to the client by the caller: `client_told` is false but `forward` is set in
/// [`Outcome::Rejected`]; other server errors are written to the client here).
pub async fn authenticate<S, C>(
    stream: &mut S,
    buf: &mut BytesMut,
    startup: &[u8],
    input: &AuthInput<'_>,
    cache: &SaltedPasswordCache,
    client: &mut C,
) -> Result<Outcome, Failure>
where
    S: AsyncRead + AsyncWrite + Unpin,
    C: AsyncWrite + Unpin,
{
    send(stream, startup).await?;
    let limits = input.policy.limits;
    let mut to_client = Vec::new();
    // Everything kept for the client goes through here: bounded in total.
    let keep = |to_client: &mut Vec<u8>, msg: &BackendMessage| {
        if to_client.len() + msg.raw().len() > limits.max_bytes {
            return Err(over_limit(format!(
                "more than {} bytes of session-start messages",
                limits.max_bytes
            )));
        }
        to_client.extend_from_slice(msg.raw());
        Ok(())
    };
    let mut scram: Option<ScramClient> = None;
    let mut authenticated = false;
    let mut challenged = false;
    let mut backend_key = None;
    let mut method = "trust";
    for _ in 0..limits.max_messages {
        let max = if authenticated {
            limits.max_message
        } else {
            limits.max_auth_message
        };
        let msg = messages::read_backend_max(stream, buf, max).await?;
        match msg.tag() {
            tag::ERROR_RESPONSE => {
                let error = ServerError::parse(msg.body());
                keep(&mut to_client, &msg)?;
                if error.is_credential_rejection() {
                    return Ok(Outcome::Rejected {
                        error,
                        forward: to_client,
                    });
                }
                // Forward the server's own error (real SQLSTATE) as is.
                let _ = send(client, &to_client).await;
                return Err(Failure::told(ConnError::Refused(error.to_string())));
            }
            tag::AUTHENTICATION if !authenticated => {
                let code = msg
                    .auth_code()
                    .ok_or_else(|| protocol("truncated authentication request"))?;
                if code == auth::OK {
                    if scram.as_ref().is_some_and(|s| !s.is_done()) {
                        return Err(protocol(
                            "upstream reported success before completing SCRAM (server not verified)",
                        ));
                    }
                    if !challenged {
                        // "trust": whoever answered gets the session's queries.
                        input.policy.check(AuthKind::None)?;
                    }
                    authenticated = true;
                    keep(&mut to_client, &msg)?;
                    continue;
                }
                challenged = true;
                if let Some(m) =
                    handle_auth_request(stream, &msg, code, input, cache, &mut scram).await?
                {
                    method = m;
                }
            }
            tag::NOTICE_RESPONSE | tag::NEGOTIATE_PROTOCOL_VERSION => keep(&mut to_client, &msg)?,
            tag::BACKEND_KEY_DATA if authenticated => {
                backend_key = CancelKey::from_backend_key_data(msg.body());
                keep(&mut to_client, &msg)?;
            }
            tag::READY_FOR_QUERY if authenticated => {
                keep(&mut to_client, &msg)?;
                return Ok(Outcome::Ready(Ready {
                    to_client,
                    backend_key,
                    method,
                }));
            }
            _ if authenticated => keep(&mut to_client, &msg)?,
            other => {
                return Err(protocol(format!(
                    "unexpected server message `{}` during authentication",
                    char::from(other).escape_default()
                )));
            }
        }
    }
    Err(over_limit(format!(
        "more than {} messages",
        limits.max_messages
    )))
}

async fn handle_auth_request<S>(
    stream: &mut S,
    msg: &BackendMessage,
    code: u32,
    input: &AuthInput<'_>,
    cache: &SaltedPasswordCache,
    scram: &mut Option<ScramClient>,
) -> Result<Option<&'static str>, Failure>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let data = &msg.body()[4..];
    match code {
        auth::CLEARTEXT_PASSWORD => {
            input.policy.check(AuthKind::Password)?;
            let pw = need_password(input, "password")?;
            send(stream, &messages::password_message(pw.expose())).await?;
            return Ok(Some("password"));
        }
        auth::MD5_PASSWORD => {
            input.policy.check(AuthKind::Md5)?;
            let pw = need_password(input, "md5")?;
            let salt: [u8; 4] = data
                .try_into()
                .map_err(|_| protocol("md5 request without a 4-byte salt"))?;
            let hashed = md5_password(input.user.as_bytes(), pw.expose(), salt);
            send(stream, &messages::password_message(hashed.as_bytes())).await?;
            return Ok(Some("md5"));
        }
        auth::SASL => {
            if scram.is_some() {
                return Err(protocol("second SASL request"));
            }
            input.policy.check(AuthKind::ScramSha256)?;
            need_password(input, "SCRAM")?;
            let mechs = messages::sasl_mechanisms(data);
            let offers = |m: &str| mechs.iter().any(|x| x == m);
            let binding = match (&input.channel_binding, offers(scram::SCRAM_SHA_256_PLUS)) {
                (Some(cb), true) => ChannelBinding::TlsServerEndPoint(cb.clone()),
                (Some(_), false) if input.tls => ChannelBinding::NotOffered,
                _ => ChannelBinding::NotSupported,
            };
            if !matches!(binding, ChannelBinding::TlsServerEndPoint(_))
                && !offers(scram::SCRAM_SHA_256)
            {
                return Err(Failure::new(
                    sqlstate::REJECTED_ESTABLISHMENT,
                    ConnError::Protocol(format!(
                        "the upstream offered SASL mechanisms {mechs:?}, none of which the broker supports"
                    )),
                ));
            }
            let client = ScramClient::new("", scram::new_nonce(), binding);
            let first = client.client_first().map_err(|e| protocol(e.to_string()))?;
            send(
                stream,
                &messages::sasl_initial_response(client.mechanism(), &first),
            )
            .await?;
            let mechanism = client.mechanism();
            *scram = Some(client);
            return Ok(Some(mechanism));
        }
        auth::SASL_CONTINUE => {
            let client = scram
                .as_mut()
                .ok_or_else(|| protocol("SASL continue without SASL"))?;
            let pw = need_password(input, "SCRAM")?;
            let params = client
                .server_first(data)
                .map_err(|e| protocol(format!("upstream SCRAM: {e}")))?;
            let max = input.policy.scram_max_iterations;
            if params.iterations > max {
                // Before any PBKDF2: 2^31 iterations would hold a thread for minutes.
                return Err(Failure::new(
                    sqlstate::REJECTED_ESTABLISHMENT,
                    ConnError::Protocol(format!(
                        "refused: the upstream asked for {} SCRAM iterations, more than \
                         `scramMaxIterations` ({max}); raise it if this server is genuine",
                        params.iterations
                    )),
                ));
            }
            let salted = cache
                .salted_password(pw.expose(), &params.salt, params.iterations)
                .await
                .map_err(ConnError::Io)?;
            let fin = Zeroizing::new(
                client
                    .client_final(&salted)
                    .map_err(|e| protocol(format!("upstream SCRAM: {e}")))?,
            );
            send(stream, &messages::sasl_response(&fin)).await?;
        }
        auth::SASL_FINAL => {
            let client = scram
                .as_mut()
                .ok_or_else(|| protocol("SASL final without SASL"))?;
            client
                .server_final(data)
                .map_err(|e| protocol(format!("upstream SCRAM: {e}")))?;
        }
        other => return Err(unsupported_method(other)),
    }
    Ok(None)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every method allowed: the exchange itself under test.
    fn open() -> AuthPolicy {
        AuthPolicy {
            require_auth: Some(RequireAuth::parse_text("password,md5,scram-sha-256,none").unwrap()),
            ..AuthPolicy::default()
        }
    }

    #[test]
    fn md5_known_vector() {
        // PostgreSQL's stored form for user "postgres", password "postgres" is
        // md53175bce1d3201d16594cebf9d7eb3f9d; salted with 01 02 03 04 (checked with
        // Python's hashlib).
        let mut inner = Md5::new();
        inner.update(b"postgrespostgres");
        assert_eq!(hex(&inner.finalize()), "3175bce1d3201d16594cebf9d7eb3f9d");
        let got = md5_password(b"postgres", b"postgres", [1, 2, 3, 4]);
        assert_eq!(got.as_str(), "md568be9ed08db75f318087ab337aaea044");
        // Independent implementation.
        assert_eq!(
            got.as_str(),
            postgres_protocol::authentication::md5_hash(b"postgres", b"postgres", [1, 2, 3, 4])
        );
    }

    /// A scripted server: what it sends, and what it expects.
    async fn run(
        server_msgs: Vec<u8>,
        input: AuthInput<'_>,
    ) -> (Result<Outcome, Failure>, Vec<u8>, Vec<u8>) {
        let (mut ours, mut theirs) = tokio::io::duplex(64 * 1024);
        theirs.write_all(&server_msgs).await.unwrap();
        // EOF after the script, so a waiting exchange ends instead of hanging.
        theirs.shutdown().await.unwrap();
        let mut client = Vec::new();
        let mut buf = BytesMut::new();
        let cache = SaltedPasswordCache::default();
        let res = authenticate(&mut ours, &mut buf, b"startup", &input, &cache, &mut client).await;
        drop(ours);
        let mut sent = Vec::new();
        tokio::io::AsyncReadExt::read_to_end(&mut theirs, &mut sent)
            .await
            .unwrap();
        (res, sent, client)
    }

    fn r(code: u32, extra: &[u8]) -> Vec<u8> {
        let mut body = code.to_be_bytes().to_vec();
        body.extend_from_slice(extra);
        let mut m = vec![b'R'];
        m.extend_from_slice(&(body.len() as u32 + 4).to_be_bytes());
        m.extend_from_slice(&body);
        m
    }

    fn after_ok() -> Vec<u8> {
        let mut v = b"S\0\0\0\x16server_version\x0015\0".to_vec();
        v.extend_from_slice(b"K\0\0\0\x0c\0\0\x10\x92\x01\x02\x03\x04");
        v.extend_from_slice(b"Z\0\0\0\x05I");
        v
    }

    #[tokio::test]
    async fn md5_exchange() {
        let pw = Secret::from_str_value("postgres");
        let mut server = r(auth::MD5_PASSWORD, &[1, 2, 3, 4]);
        server.extend(r(auth::OK, &[]));
        server.extend(after_ok());
        let (res, sent, _) = run(
            server,
            AuthInput {
                user: "postgres",
                password: Some(&pw),
                tls: false,
                channel_binding: None,
                policy: open(),
            },
        )
        .await;
        let Outcome::Ready(ready) = res.unwrap() else {
            panic!("not ready")
        };
        let mut want = b"startup".to_vec();
        want.extend_from_slice(&messages::password_message(
            b"md568be9ed08db75f318087ab337aaea044",
        ));
        assert_eq!(sent, want);
        assert_eq!(ready.backend_key.unwrap().pid, 4242);
        let mut expect = r(auth::OK, &[]);
        expect.extend(after_ok());
        assert_eq!(ready.to_client, expect);
    }

    #[tokio::test]
    async fn rejection_and_other_errors() {
        let pw = Secret::from_str_value("x");
        let input = || AuthInput {
            user: "u",
            password: Some(&pw),
            tls: false,
            channel_binding: None,
            policy: open(),
        };
        let e28 = super::super::errors::error_response(
            "FATAL",
            "28P01",
            "password authentication failed",
        );
        let mut server = r(auth::CLEARTEXT_PASSWORD, &[]);
        server.extend_from_slice(&e28);
        let (res, _, client) = run(server, input()).await;
        match res.unwrap() {
            Outcome::Rejected { error, forward } => {
                assert_eq!(error.code, "28P01");
                assert_eq!(forward, e28);
            }
            Outcome::Ready(_) => panic!("ready"),
        }
        assert!(client.is_empty());
        // Another error is forwarded as is.
        let e3d =
            super::super::errors::error_response("FATAL", "3D000", "database \"x\" does not exist");
        let mut server = r(auth::OK, &[]);
        server.extend_from_slice(&e3d);
        let (res, _, client) = run(server, input()).await;
        assert!(res.unwrap_err().client_told);
        let mut want = r(auth::OK, &[]);
        want.extend_from_slice(&e3d);
        assert_eq!(client, want);
    }

    #[tokio::test]
    async fn unsupported_and_missing_password() {
        let (res, _, _) = run(
            r(auth::GSS, &[]),
            AuthInput {
                user: "u",
                password: None,
                tls: false,
                channel_binding: None,
                policy: open(),
            },
        )
        .await;
        let f = res.unwrap_err();
        assert_eq!(f.sqlstate, "08004");
        assert!(f.client_message("s").contains("GSSAPI"));
        let (res, _, _) = run(
            r(auth::CLEARTEXT_PASSWORD, &[]),
            AuthInput {
                user: "u",
                password: None,
                tls: false,
                channel_binding: None,
                policy: open(),
            },
        )
        .await;
        assert!(
            res.unwrap_err()
                .client_message("s")
                .contains("`password` is not set")
        );
        // SASL with an unknown mechanism only.
        let (res, _, _) = run(
            r(auth::SASL, b"SCRAM-SHA-1\0\0"),
            AuthInput {
                user: "u",
                password: Some(&Secret::from_str_value("p")),
                tls: false,
                channel_binding: None,
                policy: open(),
            },
        )
        .await;
        assert_eq!(res.unwrap_err().sqlstate, "08004");
    }

    #[tokio::test]
    async fn chooses_plus_when_offered_with_binding_data() {
        let pw = Secret::from_str_value("p");
        let input = |cb: Option<Vec<u8>>| AuthInput {
            user: "u",
            password: Some(&pw),
            tls: true,
            channel_binding: cb,
            policy: open(),
        };
        let offer = || r(auth::SASL, b"SCRAM-SHA-256-PLUS\0SCRAM-SHA-256\0\0");
        let (_, sent, _) = run(offer(), input(Some(vec![1; 32]))).await;
        let initial = &sent[b"startup".len()..];
        assert!(initial.windows(19).any(|w| w == b"SCRAM-SHA-256-PLUS\0"));
        assert!(
            initial
                .windows(24)
                .any(|w| w == b"p=tls-server-end-point,,")
        );
        // Without binding data (e.g. an Ed25519 certificate): plain SCRAM, `n`.
        let (_, sent, _) = run(offer(), input(None)).await;
        let initial = &sent[b"startup".len()..];
        assert!(!initial.windows(18).any(|w| w == b"SCRAM-SHA-256-PLUS"));
        assert!(initial.windows(3).any(|w| w == b"n,,"));
    }

    #[tokio::test]
    async fn ok_before_scram_completes_is_refused() {
        let mut server = r(auth::SASL, b"SCRAM-SHA-256\0\0");
        server.extend(r(auth::OK, &[]));
        let pw = Secret::from_str_value("p");
        let (res, sent, _) = run(
            server,
            AuthInput {
                user: "u",
                password: Some(&pw),
                tls: true,
                channel_binding: Some(vec![1; 32]),
                policy: open(),
            },
        )
        .await;
        assert_eq!(res.unwrap_err().sqlstate, "08P01");
        // PLUS not offered on TLS: `y` header.
        let initial = &sent[b"startup".len()..];
        assert!(initial.windows(3).any(|w| w == b"y,,"));
    }

    fn with(policy: AuthPolicy, pw: &Secret) -> AuthInput<'_> {
        AuthInput {
            user: "u",
            password: Some(pw),
            tls: false,
            channel_binding: None,
            policy,
        }
    }

    fn policy(require: &str) -> AuthPolicy {
        AuthPolicy {
            require_auth: Some(RequireAuth::parse_text(require).unwrap()),
            ..AuthPolicy::default()
        }
    }

    /// Nothing derived from the password went upstream.
    fn sent_nothing(sent: &[u8]) {
        assert_eq!(sent, b"startup", "the broker answered a refused request");
    }

    #[tokio::test]
    async fn default_policy_sends_cleartext_only_over_verified_tls() {
        let pw = Secret::from_str_value("clear-SECRET");
        let mut server = r(auth::CLEARTEXT_PASSWORD, &[]);
        server.extend(r(auth::OK, &[]));
        server.extend(after_ok());
        let (res, sent, _) = run(server.clone(), with(AuthPolicy::default(), &pw)).await;
        let f = res.unwrap_err();
        assert_eq!(f.sqlstate, "08004");
        let msg = f.client_message("svc");
        assert!(msg.contains("cleartext password"), "{msg}");
        assert!(
            msg.contains("requireAuth") && msg.contains("verify-full"),
            "{msg}"
        );
        sent_nothing(&sent);
        // Verified TLS, or `requireAuth: password`: sent.
        for policy in [
            AuthPolicy {
                verified_tls: true,
                ..AuthPolicy::default()
            },
            policy("password"),
        ] {
            let (res, sent, _) = run(server.clone(), with(policy, &pw)).await;
            assert!(matches!(res.unwrap(), Outcome::Ready(_)));
            assert!(sent.windows(12).any(|w| w == b"clear-SECRET"));
        }
    }

    #[tokio::test]
    async fn trust_needs_none_in_require_auth() {
        let pw = Secret::from_str_value("p");
        let mut server = r(auth::OK, &[]);
        server.extend(after_ok());
        let (res, sent, client) = run(server.clone(), with(AuthPolicy::default(), &pw)).await;
        let f = res.unwrap_err();
        assert_eq!(f.sqlstate, "08004");
        assert!(!f.client_told);
        let msg = f.client_message("svc");
        assert!(msg.contains("without any authentication (trust)"), "{msg}");
        assert!(msg.contains("`none`"), "{msg}");
        sent_nothing(&sent);
        assert!(client.is_empty());
        let (res, _, _) = run(server.clone(), with(policy("none"), &pw)).await;
        assert_eq!(
            match res.unwrap() {
                Outcome::Ready(r) => r.method,
                Outcome::Rejected { .. } => "rejected",
            },
            "trust"
        );
        // `!password` allows none, as in libpq.
        let (res, _, _) = run(server, with(policy("!password"), &pw)).await;
        assert!(matches!(res.unwrap(), Outcome::Ready(_)));
    }

    #[tokio::test]
    async fn require_auth_refuses_other_methods_before_answering() {
        let pw = Secret::from_str_value("p");
        let (res, sent, _) = run(
            r(auth::MD5_PASSWORD, &[1, 2, 3, 4]),
            with(policy("scram-sha-256"), &pw),
        )
        .await;
        let msg = res.unwrap_err().client_message("svc");
        assert!(msg.contains("md5 authentication"), "{msg}");
        assert!(
            msg.contains("`requireAuth` allows only scram-sha-256"),
            "{msg}"
        );
        sent_nothing(&sent);
        let (res, sent, _) = run(
            r(auth::SASL, b"SCRAM-SHA-256\0\0"),
            with(policy("md5,password"), &pw),
        )
        .await;
        assert_eq!(res.unwrap_err().sqlstate, "08004");
        sent_nothing(&sent);
    }

    #[tokio::test]
    async fn scram_iterations_above_the_cap_are_refused_before_pbkdf2() {
        // Find the client nonce the broker sends, then answer with 2^31 iterations.
        let pw = Secret::from_str_value("p");
        let (mut ours, mut theirs) = tokio::io::duplex(64 * 1024);
        let server = tokio::spawn(async move {
            use tokio::io::AsyncReadExt as _;
            theirs
                .write_all(&r(auth::SASL, b"SCRAM-SHA-256\0\0"))
                .await
                .unwrap();
            let mut got = vec![0u8; 1024];
            let mut n = 0;
            while !got[..n].windows(2).any(|w| w == b"r=") || got[n - 1] == b'=' {
                n += theirs.read(&mut got[n..]).await.unwrap();
            }
            let text = String::from_utf8_lossy(&got[..n]).into_owned();
            let nonce = text.split("r=").nth(1).unwrap().to_owned();
            let first = format!("r={nonce}srv,s=AAAA,i=2147483647");
            theirs
                .write_all(&r(auth::SASL_CONTINUE, first.as_bytes()))
                .await
                .unwrap();
            let mut rest = Vec::new();
            theirs.read_to_end(&mut rest).await.unwrap();
            rest
        });
        let mut client = Vec::new();
        let mut buf = BytesMut::new();
        let cache = SaltedPasswordCache::default();
        let t = std::time::Instant::now();
        let res = authenticate(
            &mut ours,
            &mut buf,
            b"",
            &with(AuthPolicy::default(), &pw),
            &cache,
            &mut client,
        )
        .await;
        drop(ours);
        let f = res.unwrap_err();
        assert!(t.elapsed() < std::time::Duration::from_secs(2));
        assert_eq!(f.sqlstate, "08004");
        let msg = f.client_message("svc");
        assert!(msg.contains("2147483647 SCRAM iterations"), "{msg}");
        assert!(msg.contains("scramMaxIterations"), "{msg}");
        // No client-final (proof) was sent.
        assert!(server.await.unwrap().is_empty());
        assert!(cache.is_empty());
    }

    #[tokio::test]
    async fn handshake_is_bounded_in_bytes_messages_and_message_size() {
        let pw = Secret::from_str_value("p");
        let param = b"S\0\0\0\x0ca\0bcdef\0";
        let flood = |n: usize| {
            let mut v = r(auth::MD5_PASSWORD, &[1, 2, 3, 4]);
            v.extend(r(auth::OK, &[]));
            for _ in 0..n {
                v.extend_from_slice(param);
            }
            v.extend(after_ok());
            v
        };
        let limited = |bytes, msgs| AuthPolicy {
            limits: HandshakeLimits {
                max_bytes: bytes,
                max_messages: msgs,
                ..HandshakeLimits::DEFAULT
            },
            ..AuthPolicy::default()
        };
        // Within the limits.
        let (res, _, _) = run(flood(100), with(limited(4096, 200), &pw)).await;
        assert!(matches!(res.unwrap(), Outcome::Ready(_)));
        // Bytes.
        let (res, _, client) = run(flood(1000), with(limited(4096, 100_000), &pw)).await;
        let f = res.unwrap_err();
        assert_eq!(f.sqlstate, "08P01");
        assert!(f.client_message("s").contains("more than 4096 bytes"));
        assert!(client.is_empty());
        // Messages.
        let (res, _, _) = run(flood(1000), with(limited(1 << 20, 500), &pw)).await;
        let f = res.unwrap_err();
        assert!(f.client_message("s").contains("more than 500 messages"));
        // One message larger than the bound before authentication: refused from its
        // header, the body is never read.
        let (res, _, _) = run(b"N\0\x02\0\0".to_vec(), with(AuthPolicy::default(), &pw)).await;
        let f = res.unwrap_err();
        assert_eq!(f.sqlstate, "08P01");
        assert!(
            f.client_message("s").contains("131072 bytes"),
            "{}",
            f.client_message("s")
        );
        // And after it: the 1 MiB bound.
        let mut v = r(auth::MD5_PASSWORD, &[1, 2, 3, 4]);
        v.extend(r(auth::OK, &[]));
        v.extend_from_slice(b"S\x7f\0\0\0");
        let (res, _, _) = run(v, with(AuthPolicy::default(), &pw)).await;
        assert!(
            res.unwrap_err()
                .client_message("s")
                .contains("larger than the 1048576-byte limit")
        );
    }
}
