//! OAuth2 client-credentials tokens (RFC 6749 section 4.4) for the HTTP connector.
//!
//! A [`TokenSource`] gets an access token from a token endpoint with the service's client
//! id and secret (brokered credentials: the app never sees them, nor the token) and hands
//! it to every request of the service, which injects it (`Authorization: Bearer {{
//! .access_token }}`). One source is shared, behind an `Arc`, by all connections of a
//! service.
//!
//! # The request (RFC 6749 4.4.2)
//! `POST token_url` with `Content-Type: application/x-www-form-urlencoded`, `Accept:
//! application/json` and the body `grant_type=client_credentials`, then `scope`,
//! `audience` (when set) and the extra parameters in their order, every name and value
//! form-urlencoded. The client authenticates ([`ClientAuth`]) either with HTTP Basic
//! (RFC 6749 2.3.1: the id and the secret each form-urlencoded, then `id:secret` in
//! base64; the default, which every server must support) or with `client_id` and
//! `client_secret` body parameters, never both.
//!
//! # The reply (RFC 6749 5.1, 5.2)
//! Any 2xx reply must be a JSON object with a non-empty string `access_token` made of
//! visible ASCII and spaces (RFC 6749 A.12, so it can go in a header). `expires_in` may be
//! a number (a fraction is rounded down), a string of digits (seen in the wild) or
//! absent/`null`: then [`TokenConfig::default_lifetime`] applies ([`DEFAULT_LIFETIME`],
//! five minutes, when zero; a 401 from the API drops a token that dies earlier, see
//! [`TokenSource::invalidate`]). Lifetimes are capped at [`MAX_LIFETIME`]. `token_type` is
//! not checked: the header template decides how the token is sent. A reply with an
//! `error` field and no token (RFC 6749 5.2, normally a 400 or 401; some servers answer
//! 200) is [`TokenError::Rejected`] with the error code and its `error_description`.
//!
//! # Caching and refreshing
//! Lifetimes are counted from when the request was sent. With `L` the lifetime:
//! * the token is served from the cache until `L - min(60 s, L/10)` (the refresh margin);
//! * inside the margin, the first caller starts a refresh in the background and every
//!   caller still gets the current token at once;
//! * the token is never handed out in the last `min(5 s, L/20)` of its life (the time
//!   for the request carrying it to reach the API), nor after: callers then wait for a
//!   fetch, and get its error if it fails. An expired token is never returned.
//!
//! No timer refreshes tokens of a service nobody uses: the refresh is triggered by the
//! first request inside the margin. A token whose lifetime is zero (`expires_in: 0`) is
//! handed to the callers waiting for that fetch and not cached.
//!
//! # Fetches
//! At most one fetch is in flight: concurrent callers all wait for it, so N concurrent
//! requests cause one fetch. The fetch runs in its own task, so a caller that goes away
//! (its client hung up) stops nobody else's wait. Each fetch is bounded by
//! [`TokenConfig::timeout`] (connecting, sending, the whole reply) and the reply by
//! [`MAX_BODY`] bytes. A failure is not cached, but it is returned to the callers that
//! ask within [`RETRY_AFTER`] (one second) instead of starting a new fetch each, so a
//! failing endpoint sees at most one request a second from a source. While a refresh
//! fails, a token that is still valid keeps being served.
//!
//! # Secrets
//! The client secret and the tokens are [`Secret`]s: `Debug` never shows them, and no
//! error message contains them (an `error_description` that echoes the secret has it
//! replaced by `***`). The request body and the reply are built and read in buffers
//! zeroed after use (best effort: the HTTP stack keeps its own copies of what it sends).
//! The HTTP client must not follow redirects (a redirected POST would carry the secret
//! elsewhere): [`http_client`] builds one that does not, and a reply from another URL
//! than `token_url` is refused. `token_url` should be `https`; `http` works (tests, a
//! local endpoint) and sends the secret in clear.

use std::{
    fmt,
    path::Path,
    sync::{
        Arc, Mutex, MutexGuard,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use anyhow::Context as _;
use base64::Engine as _;
use bytes::Bytes;
use reqwest::header::{ACCEPT, AUTHORIZATION, CONTENT_TYPE, HeaderValue};
use tokio::{sync::watch, time::Instant};
use zeroize::{Zeroize, Zeroizing};

use crate::{
    secret::Secret,
    secrets::redact_id,
    tls::{self, TlsOptions, Verify},
};

/// Lifetime of a token whose reply has no `expires_in`, when the configuration says 0.
pub const DEFAULT_LIFETIME: Duration = Duration::from_secs(5 * 60);
/// Bound of one fetch, when the configuration says 0.
pub const DEFAULT_TIMEOUT: Duration = crate::config::DEFAULT_HTTP_TIMEOUT;
/// Largest reply accepted from the token endpoint.
pub const MAX_BODY: usize = 64 * 1024;
/// Longest lifetime believed (a longer one is refreshed after this).
pub const MAX_LIFETIME: Duration = Duration::from_secs(24 * 60 * 60);
/// Upper bound of the refresh margin (otherwise a tenth of the lifetime).
pub const MAX_REFRESH_MARGIN: Duration = Duration::from_secs(60);
/// Upper bound of the end of life in which a token is no longer handed out (otherwise
/// a twentieth of the lifetime).
pub const MAX_EXPIRY_GRACE: Duration = Duration::from_secs(5);
/// How long a failed fetch is returned to new callers instead of a new fetch.
pub const RETRY_AFTER: Duration = Duration::from_secs(1);
/// Longest `error` / `error_description` text kept from an error reply, in characters.
const MAX_ERROR_TEXT: usize = 256;

/// How the client authenticates to the token endpoint (RFC 6749 2.3.1).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum ClientAuth {
    /// `Authorization: Basic base64(urlencode(id) ":" urlencode(secret))`.
    #[default]
    Basic,
    /// `client_id` and `client_secret` parameters in the request body.
    Body,
}

/// One token endpoint and the client's credentials for it.
#[derive(Clone)]
pub struct TokenConfig {
    /// The token endpoint (`https://...`).
    pub token_url: String,
    pub client_id: String,
    pub client_secret: Secret,
    /// `scope`, space-separated scopes as the server expects them.
    pub scope: Option<String>,
    /// `audience` (Auth0, Okta and others).
    pub audience: Option<String>,
    /// More body parameters (`resource`, ...), sent after the standard ones. Their names
    /// may not be those of the standard parameters (see [`TokenConfig::validate`]).
    pub extra: Vec<(String, String)>,
    pub auth: ClientAuth,
    /// Lifetime of a token whose reply has no `expires_in` (0: [`DEFAULT_LIFETIME`]).
    pub default_lifetime: Duration,
    /// Bound of one fetch, from connecting to the end of the reply (0:
    /// [`DEFAULT_TIMEOUT`]).
    pub timeout: Duration,
}

/// Body parameters the source sets itself.
const RESERVED: [&str; 5] = [
    "grant_type",
    "client_id",
    "client_secret",
    "scope",
    "audience",
];

impl TokenConfig {
    /// A configuration with Basic client authentication and the default lifetime and
    /// timeout.
    #[must_use]
    pub fn new(
        token_url: impl Into<String>,
        client_id: impl Into<String>,
        client_secret: Secret,
    ) -> Self {
        Self {
            token_url: token_url.into(),
            client_id: client_id.into(),
            client_secret,
            scope: None,
            audience: None,
            extra: Vec::new(),
            auth: ClientAuth::Basic,
            default_lifetime: DEFAULT_LIFETIME,
            timeout: DEFAULT_TIMEOUT,
        }
    }

    /// Check what can be checked without asking the endpoint (for `broker check`):
    /// `token_url` is an absolute `http(s)` URL, the client id is not empty, no extra
    /// parameter is unnamed or repeats a standard one.
    ///
    /// # Errors
    /// [`TokenError::Config`] naming the problem.
    pub fn validate(&self) -> Result<(), TokenError> {
        self.url().map(|_| ())
    }

    fn url(&self) -> Result<reqwest::Url, TokenError> {
        let config = |reason: String| TokenError::Config { reason };
        let url = reqwest::Url::parse(&self.token_url).map_err(|e| {
            config(format!(
                "token_url `{}` is not a URL: {e}",
                redact_id(&self.token_url)
            ))
        })?;
        if !matches!(url.scheme(), "http" | "https") {
            return Err(config(format!(
                "token_url `{}` is not an http:// or https:// URL",
                redact_id(&self.token_url)
            )));
        }
        if self.client_id.is_empty() {
            return Err(config("client_id is empty".into()));
        }
        for (name, _) in &self.extra {
            if name.is_empty() {
                return Err(config("an extra token parameter has no name".into()));
            }
            if RESERVED.contains(&name.as_str()) {
                return Err(config(format!(
                    "extra token parameter `{name}` would repeat a standard one (set \
                     `scope` and `audience` with their own keys)"
                )));
            }
        }
        Ok(url)
    }

    fn default_lifetime(&self) -> Duration {
        if self.default_lifetime.is_zero() {
            DEFAULT_LIFETIME
        } else {
            self.default_lifetime
        }
    }

    fn timeout(&self) -> Duration {
        if self.timeout.is_zero() {
            DEFAULT_TIMEOUT
        } else {
            self.timeout
        }
    }

    /// The form body: `grant_type`, `scope`, `audience`, the extras, and with
    /// [`ClientAuth::Body`] the credentials. Allocated once at its largest possible size,
    /// so no partial copy of the secret is left behind by a reallocation.
    fn body(&self) -> Zeroizing<Vec<u8>> {
        let mut params: Vec<(&str, &[u8])> = Vec::with_capacity(5 + self.extra.len());
        params.push(("grant_type", b"client_credentials"));
        if let Some(s) = &self.scope {
            params.push(("scope", s.as_bytes()));
        }
        if let Some(a) = &self.audience {
            params.push(("audience", a.as_bytes()));
        }
        for (n, v) in &self.extra {
            params.push((n, v.as_bytes()));
        }
        if self.auth == ClientAuth::Body {
            params.push(("client_id", self.client_id.as_bytes()));
            params.push(("client_secret", self.client_secret.expose()));
        }
        let cap = params
            .iter()
            .map(|(n, v)| 2 + 3 * (n.len() + v.len()))
            .sum();
        let mut body = Zeroizing::new(Vec::with_capacity(cap));
        for (i, (name, value)) in params.into_iter().enumerate() {
            if i > 0 {
                body.push(b'&');
            }
            form_encode(&mut body, name.as_bytes());
            body.push(b'=');
            form_encode(&mut body, value);
        }
        body
    }

    /// `Basic base64(urlencode(id) ":" urlencode(secret))` as a sensitive header value.
    fn basic(&self) -> Option<HeaderValue> {
        let (id, secret) = (self.client_id.as_bytes(), self.client_secret.expose());
        let mut pair = Zeroizing::new(Vec::with_capacity(3 * (id.len() + secret.len()) + 1));
        form_encode(&mut pair, id);
        pair.push(b':');
        form_encode(&mut pair, secret);
        let b64 = base64::encoded_len(pair.len(), true)?;
        let mut raw = Zeroizing::new(vec![0u8; 6 + b64]);
        raw[..6].copy_from_slice(b"Basic ");
        base64::engine::general_purpose::STANDARD
            .encode_slice(&*pair, &mut raw[6..])
            .ok()?;
        let mut h = HeaderValue::from_bytes(&raw).ok()?;
        h.set_sensitive(true);
        Some(h)
    }
}

impl fmt::Debug for TokenConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TokenConfig")
            .field("token_url", &redact_id(&self.token_url))
            .field("client_id", &self.client_id)
            .field("client_secret", &self.client_secret)
            .field("scope", &self.scope)
            .field("audience", &self.audience)
            .field("extra", &self.extra)
            .field("auth", &self.auth)
            .field("default_lifetime", &self.default_lifetime)
            .field("timeout", &self.timeout)
            .finish()
    }
}

/// Why no token could be had. Messages name the endpoint (without user-info or query
/// string), never the client secret nor a token.
#[derive(Debug, Clone, thiserror::Error)]
pub enum TokenError {
    /// The configuration cannot work (no fetch was made).
    #[error("oauth2: {reason}")]
    Config { reason: String },
    /// No connection, or it failed before the reply was complete.
    #[error("token endpoint {endpoint} unreachable: {reason}")]
    Unreachable { endpoint: String, reason: String },
    /// No complete reply within the timeout.
    #[error("token endpoint {endpoint}: no complete reply within {after:?}")]
    Timeout { endpoint: String, after: Duration },
    /// A non-2xx status without an RFC 6749 5.2 error body.
    #[error("token endpoint {endpoint}: HTTP status {}", status_text(*.status))]
    Status { endpoint: String, status: u16 },
    /// An RFC 6749 5.2 error reply (`invalid_client`, `invalid_scope`, ...).
    #[error(
        "token endpoint {endpoint} refused the request (HTTP status {}): {error}{}",
        status_text(*.status),
        description.as_deref().map(|d| format!(": {d}")).unwrap_or_default()
    )]
    Rejected {
        endpoint: String,
        status: u16,
        error: String,
        description: Option<String>,
    },
    /// A reply larger than [`MAX_BODY`].
    #[error("token endpoint {endpoint}: reply larger than {limit} bytes")]
    TooLarge { endpoint: String, limit: usize },
    /// A reply that is not a usable token (not JSON, no `access_token`, a bad
    /// `expires_in`, a redirect).
    #[error("token endpoint {endpoint}: bad reply: {reason}")]
    BadReply { endpoint: String, reason: String },
    /// The fetch's task ended without a result (the runtime is shutting down).
    #[error("token endpoint {endpoint}: the fetch was abandoned")]
    Abandoned { endpoint: String },
}

impl TokenError {
    /// A stable snake_case word for logs and metrics.
    #[must_use]
    pub fn kind(&self) -> &'static str {
        match self {
            Self::Config { .. } => "config",
            Self::Unreachable { .. } => "unreachable",
            Self::Timeout { .. } => "timeout",
            Self::Status { .. } => "status",
            Self::Rejected { .. } => "rejected",
            Self::TooLarge { .. } => "too_large",
            Self::BadReply { .. } => "bad_reply",
            Self::Abandoned { .. } => "abandoned",
        }
    }
}

fn status_text(status: u16) -> String {
    reqwest::StatusCode::from_u16(status).map_or_else(|_| status.to_string(), |s| s.to_string())
}

/// A token, when it stops being served from the cache without a refresh, and when it
/// stops being served at all.
struct Current {
    token: Secret,
    refresh_at: Instant,
    usable_until: Instant,
}

/// What a fetch produced, as its waiters get it.
type Outcome = Result<Secret, TokenError>;

#[derive(Default)]
struct State {
    current: Option<Current>,
    /// The fetch in flight: `Some(outcome)` once it is done.
    flight: Option<watch::Receiver<Option<Outcome>>>,
    /// The last fetch failed: its error, returned until then.
    failure: Option<(TokenError, Instant)>,
}

impl State {
    fn recent_failure(&self, now: Instant) -> Option<&TokenError> {
        self.failure
            .as_ref()
            .filter(|(_, until)| now < *until)
            .map(|(e, _)| e)
    }
}

/// The refresh margin and the expiry grace for a lifetime.
type Margins = fn(Duration) -> (Duration, Duration);

/// `min(60 s, L/10)` and `min(5 s, L/20)`.
fn margins(lifetime: Duration) -> (Duration, Duration) {
    (
        (lifetime / 10).min(MAX_REFRESH_MARGIN),
        (lifetime / 20).min(MAX_EXPIRY_GRACE),
    )
}

struct Inner {
    cfg: TokenConfig,
    /// `cfg.token_url` parsed, or why the configuration cannot work.
    url: Result<reqwest::Url, TokenError>,
    /// `cfg.token_url` as errors show it.
    endpoint: String,
    http: reqwest::Client,
    margins: Margins,
    state: Mutex<State>,
    fetches: AtomicU64,
    /// Told each fetch's result word (`ok` or [`TokenError::kind`]): the metrics.
    observer: std::sync::OnceLock<Box<dyn Fn(&'static str) + Send + Sync>>,
}

/// OAuth2 client-credentials tokens for one service: cached, refreshed ahead of expiry,
/// fetched once for all concurrent callers (see the [module documentation](self)).
pub struct TokenSource {
    inner: Arc<Inner>,
}

impl TokenSource {
    /// A source for `cfg`, fetching with `http` (which must not follow redirects; see
    /// [`http_client`]). Nothing is fetched before the first [`TokenSource::token`].
    #[must_use]
    pub fn new(cfg: TokenConfig, http: reqwest::Client) -> Self {
        Self::with_margins(cfg, http, margins)
    }

    fn with_margins(cfg: TokenConfig, http: reqwest::Client, margins: Margins) -> Self {
        Self {
            inner: Arc::new(Inner {
                url: cfg.url(),
                endpoint: redact_id(&cfg.token_url).into_owned(),
                cfg,
                http,
                margins,
                state: Mutex::new(State::default()),
                fetches: AtomicU64::new(0),
                observer: std::sync::OnceLock::new(),
            }),
        }
    }

    /// A token that is valid now: the cached one, or the result of the fetch in flight
    /// (started if there is none). Must be called within a tokio runtime (the fetch is a
    /// task of its own).
    ///
    /// # Errors
    /// The fetch's error; the same error for [`RETRY_AFTER`] after a failed fetch.
    pub async fn token(&self) -> Result<Secret, TokenError> {
        if let Err(e) = &self.inner.url {
            return Err(e.clone());
        }
        let mut flight = {
            let mut st = self.inner.lock();
            let now = Instant::now();
            if let Some(c) = &st.current {
                if now < c.refresh_at {
                    return Ok(c.token.clone());
                }
                if now < c.usable_until {
                    let token = c.token.clone();
                    if st.flight.is_none() && st.recent_failure(now).is_none() {
                        st.flight = Some(Inner::start(&self.inner));
                    }
                    return Ok(token);
                }
                // Expired (zeroized on drop).
                st.current = None;
            }
            if let Some(f) = &st.flight {
                f.clone()
            } else {
                if let Some(e) = st.recent_failure(now) {
                    return Err(e.clone());
                }
                let f = Inner::start(&self.inner);
                st.flight = Some(f.clone());
                f
            }
        };
        let done = flight
            .wait_for(Option::is_some)
            .await
            .map(|done| done.as_ref().cloned());
        match done {
            Ok(Some(outcome)) => outcome,
            // The task went away without a result (runtime shutdown): forget its flight.
            Ok(None) | Err(_) => {
                let mut st = self.inner.lock();
                if st.flight.as_ref().is_some_and(|f| f.same_channel(&flight)) {
                    st.flight = None;
                }
                Err(TokenError::Abandoned {
                    endpoint: self.inner.endpoint.clone(),
                })
            }
        }
    }

    /// The API refused `token` (HTTP 401): if it is still the cached token, drop it, so
    /// the next [`TokenSource::token`] fetches a new one. A token already replaced is
    /// ignored (the request that used it raced a refresh).
    pub fn invalidate(&self, token: &Secret) {
        let mut st = self.inner.lock();
        if st.current.as_ref().is_some_and(|c| c.token == *token) {
            st.current = None;
        }
    }

    /// Tell `observer` the result word of every fetch from now on (`ok` or
    /// [`TokenError::kind`]); the first observer set stays.
    pub fn observe(&self, observer: Box<dyn Fn(&'static str) + Send + Sync>) {
        let _ = self.inner.observer.set(observer);
    }

    /// Fetches started so far (successful or not).
    #[must_use]
    pub fn fetches(&self) -> u64 {
        self.inner.fetches.load(Ordering::Relaxed)
    }
}

impl fmt::Debug for TokenSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let (cached, fetching) = {
            let st = self.inner.lock();
            (st.current.is_some(), st.flight.is_some())
        };
        f.debug_struct("TokenSource")
            .field("token_url", &self.inner.endpoint)
            .field("client_id", &self.inner.cfg.client_id)
            .field("auth", &self.inner.cfg.auth)
            .field("cached", &cached)
            .field("fetching", &fetching)
            .field("fetches", &self.fetches())
            .finish_non_exhaustive()
    }
}

impl Inner {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Start a fetch in its own task; the caller records the returned receiver as the
    /// flight (under the lock it holds).
    fn start(this: &Arc<Self>) -> watch::Receiver<Option<Outcome>> {
        let (tx, rx) = watch::channel(None);
        this.fetches.fetch_add(1, Ordering::Relaxed);
        let inner = Arc::clone(this);
        tokio::spawn(async move {
            let started = Instant::now();
            let fetched = inner.fetch().await;
            let outcome = inner.finish(started, fetched);
            if let Some(o) = inner.observer.get() {
                o(outcome.as_ref().map_or_else(TokenError::kind, |_| "ok"));
            }
            tx.send_replace(Some(outcome));
        });
        rx
    }

    /// Record a fetch's result and end its flight.
    fn finish(
        &self,
        started: Instant,
        fetched: Result<(Secret, Option<Duration>), TokenError>,
    ) -> Outcome {
        let mut st = self.lock();
        st.flight = None;
        match fetched {
            Ok((token, lifetime)) => {
                let lifetime = lifetime
                    .unwrap_or_else(|| self.cfg.default_lifetime())
                    .min(MAX_LIFETIME);
                let (margin, grace) = (self.margins)(lifetime);
                let usable_until = started + lifetime.saturating_sub(grace);
                st.failure = None;
                st.current = (Instant::now() < usable_until).then(|| Current {
                    token: token.clone(),
                    refresh_at: started + lifetime.saturating_sub(margin),
                    usable_until,
                });
                Ok(token)
            }
            Err(e) => {
                st.failure = Some((e.clone(), Instant::now() + RETRY_AFTER));
                Err(e)
            }
        }
    }

    /// One request to the token endpoint, bounded in time and size: the token and the
    /// lifetime the endpoint gave it.
    async fn fetch(&self) -> Result<(Secret, Option<Duration>), TokenError> {
        let after = self.cfg.timeout();
        tokio::time::timeout(after, self.request(after))
            .await
            .unwrap_or_else(|_| {
                Err(TokenError::Timeout {
                    endpoint: self.endpoint.clone(),
                    after,
                })
            })
    }

    async fn request(&self, timeout: Duration) -> Result<(Secret, Option<Duration>), TokenError> {
        let url = self.url.clone()?;
        let mut req = self
            .http
            .post(url.clone())
            .timeout(timeout)
            .header(CONTENT_TYPE, "application/x-www-form-urlencoded")
            .header(ACCEPT, "application/json");
        if self.cfg.auth == ClientAuth::Basic {
            let basic = self.cfg.basic().ok_or_else(|| TokenError::Config {
                reason: "the client id and secret cannot be sent in an Authorization header".into(),
            })?;
            req = req.header(AUTHORIZATION, basic);
        }
        // The body's buffer is wiped when reqwest drops it.
        let req = req.body(Bytes::from_owner(self.cfg.body()));
        let resp = req.send().await.map_err(|e| self.transport(e))?;
        let status = resp.status();
        if status.is_redirection() {
            return Err(self.bad(format!("HTTP status {status}: redirects are not followed")));
        }
        if *resp.url() != url {
            return Err(self.bad(
                "the reply came from another URL: the HTTP client must not follow redirects".into(),
            ));
        }
        if status.is_success() {
            let body = self.read(resp).await?;
            return self.parse(status.as_u16(), &body);
        }
        // An error reply: its RFC 6749 5.2 body if there is a readable one, else the
        // status alone.
        let status = status.as_u16();
        match self.read(resp).await {
            Ok(body) => Err(self
                .error_reply(status, &body)
                .unwrap_or(TokenError::Status {
                    endpoint: self.endpoint.clone(),
                    status,
                })),
            Err(TokenError::Timeout { endpoint, after }) => {
                Err(TokenError::Timeout { endpoint, after })
            }
            Err(_) => Err(TokenError::Status {
                endpoint: self.endpoint.clone(),
                status,
            }),
        }
    }

    /// The reply body, at most [`MAX_BODY`] bytes, in a buffer allocated once (so the
    /// token is not left behind by a reallocation) and wiped on drop.
    async fn read(&self, mut resp: reqwest::Response) -> Result<Zeroizing<Vec<u8>>, TokenError> {
        let too_large = || TokenError::TooLarge {
            endpoint: self.endpoint.clone(),
            limit: MAX_BODY,
        };
        if resp.content_length().is_some_and(|n| n > MAX_BODY as u64) {
            return Err(too_large());
        }
        let mut body = Zeroizing::new(Vec::with_capacity(MAX_BODY));
        while let Some(chunk) = resp.chunk().await.map_err(|e| self.transport(e))? {
            if body.len() + chunk.len() > MAX_BODY {
                return Err(too_large());
            }
            body.extend_from_slice(&chunk);
        }
        Ok(body)
    }

    /// A 2xx reply: the token and its lifetime, or an RFC 6749 5.2 error.
    fn parse(&self, status: u16, body: &[u8]) -> Result<(Secret, Option<Duration>), TokenError> {
        let mut json: serde_json::Value =
            serde_json::from_slice(body).map_err(|_| self.bad("the reply is not JSON".into()))?;
        let parsed = self.token_from(status, &json);
        wipe_json(&mut json);
        parsed
    }

    fn token_from(
        &self,
        status: u16,
        json: &serde_json::Value,
    ) -> Result<(Secret, Option<Duration>), TokenError> {
        use serde_json::Value;
        let Value::Object(obj) = json else {
            return Err(self.bad("the reply is not a JSON object".into()));
        };
        let token = match obj.get("access_token") {
            Some(Value::String(t)) => t,
            Some(_) => return Err(self.bad("access_token is not a string".into())),
            None => {
                return Err(self
                    .error_from(status, json)
                    .unwrap_or_else(|| self.bad("the reply has no access_token".into())));
            }
        };
        if token.is_empty() {
            return Err(self.bad("access_token is empty".into()));
        }
        if !token.bytes().all(|b| (0x20..=0x7e).contains(&b)) {
            return Err(self.bad(
                "access_token contains characters that cannot be sent in an HTTP header".into(),
            ));
        }
        let secs = match obj.get("expires_in") {
            None | Some(Value::Null) => None,
            Some(Value::Number(n)) => match (n.as_u64(), n.as_f64()) {
                (Some(s), _) => Some(s),
                (None, Some(f)) if f.is_finite() && f >= 0.0 => {
                    // Rounded down; saturates at u64::MAX, capped below anyway.
                    Some(f as u64)
                }
                _ => return Err(self.bad("expires_in is negative".into())),
            },
            Some(Value::String(s)) => Some(
                s.trim()
                    .parse::<u64>()
                    .map_err(|_| self.bad("expires_in is not a number of seconds".into()))?,
            ),
            Some(_) => return Err(self.bad("expires_in is not a number of seconds".into())),
        };
        let lifetime = secs.map(|s| Duration::from_secs(s).min(MAX_LIFETIME));
        Ok((Secret::from_str_value(token), lifetime))
    }

    /// A non-2xx reply's body as an RFC 6749 5.2 error, if it is one.
    fn error_reply(&self, status: u16, body: &[u8]) -> Option<TokenError> {
        let mut json: serde_json::Value = serde_json::from_slice(body).ok()?;
        let e = self.error_from(status, &json);
        wipe_json(&mut json);
        e
    }

    /// `{"error": code, "error_description": text}` as [`TokenError::Rejected`], the
    /// texts cleaned of control characters and the client secret, and shortened.
    fn error_from(&self, status: u16, json: &serde_json::Value) -> Option<TokenError> {
        let error = json.get("error")?.as_str()?;
        let description = json
            .get("error_description")
            .and_then(serde_json::Value::as_str)
            .map(|d| self.clean(d))
            .filter(|d| !d.is_empty());
        Some(TokenError::Rejected {
            endpoint: self.endpoint.clone(),
            status,
            error: self.clean(error),
            description,
        })
    }

    /// Server text fit for an error message: no control characters, no client secret
    /// (as sent or form-encoded: a server may echo what it received), at most
    /// [`MAX_ERROR_TEXT`] characters.
    fn clean(&self, text: &str) -> String {
        let mut out: String = text
            .chars()
            .map(|c| if c.is_control() { ' ' } else { c })
            .collect();
        let secret = self.cfg.client_secret.expose();
        if !secret.is_empty() {
            let mut encoded = Zeroizing::new(Vec::with_capacity(3 * secret.len()));
            form_encode(&mut encoded, secret);
            for s in [secret, encoded.as_slice()] {
                if let Ok(s) = std::str::from_utf8(s)
                    && out.contains(s)
                {
                    let replaced = out.replace(s, "***");
                    std::mem::replace(&mut out, replaced).zeroize();
                }
            }
        }
        if let Some((cut, _)) = out.char_indices().nth(MAX_ERROR_TEXT) {
            out.truncate(cut);
            out.push('…');
        }
        out
    }

    fn bad(&self, reason: String) -> TokenError {
        TokenError::BadReply {
            endpoint: self.endpoint.clone(),
            reason,
        }
    }

    /// A transport error: a timeout, or the endpoint unreachable with the error's causes
    /// (without the URL) as the reason.
    fn transport(&self, e: reqwest::Error) -> TokenError {
        if e.is_timeout() {
            return TokenError::Timeout {
                endpoint: self.endpoint.clone(),
                after: self.cfg.timeout(),
            };
        }
        TokenError::Unreachable {
            endpoint: self.endpoint.clone(),
            reason: crate::secrets::http::describe(e),
        }
    }
}

/// An HTTP client for token endpoints: the broker's rustls configuration (ring) trusting
/// the system roots plus `ca_file`'s certificates, and no redirects (a redirected POST
/// would carry the client secret to another URL). Timeouts are set per fetch.
///
/// # Errors
/// When the CA file cannot be used or the client cannot be created.
pub fn http_client(ca_file: Option<&Path>) -> anyhow::Result<reqwest::Client> {
    let tls = tls::client_config(TlsOptions {
        verify: Verify::Full,
        ca_file,
        with_system_roots: true,
        client_cert: None,
    })
    .map_err(|e| anyhow::anyhow!("oauth2 token endpoint CA file: {e}"))?;
    reqwest::Client::builder()
        .tls_backend_preconfigured(Arc::unwrap_or_clone(tls))
        .redirect(reqwest::redirect::Policy::none())
        .user_agent(concat!("broker/", env!("CARGO_PKG_VERSION")))
        .build()
        .context("cannot create the HTTP client for the token endpoint")
}

/// Append `bytes` form-urlencoded (the WHATWG `application/x-www-form-urlencoded` byte
/// serializer: alphanumerics and `*-._` as they are, space as `+`, the rest `%XX`).
fn form_encode(out: &mut Vec<u8>, bytes: &[u8]) {
    const HEX: &[u8; 16] = b"0123456789ABCDEF";
    for &b in bytes {
        match b {
            b'a'..=b'z' | b'A'..=b'Z' | b'0'..=b'9' | b'*' | b'-' | b'.' | b'_' => out.push(b),
            b' ' => out.push(b'+'),
            _ => out.extend_from_slice(&[b'%', HEX[usize::from(b >> 4)], HEX[usize::from(b & 15)]]),
        }
    }
}

/// Overwrite every string of a parsed reply.
fn wipe_json(v: &mut serde_json::Value) {
    match v {
        serde_json::Value::String(s) => s.zeroize(),
        serde_json::Value::Array(a) => a.iter_mut().for_each(wipe_json),
        serde_json::Value::Object(m) => m.values_mut().for_each(wipe_json),
        _ => {}
    }
}

#[cfg(test)]
mod tests {
    use std::{collections::HashSet, sync::atomic::AtomicU64};

    use base64::engine::general_purpose::STANDARD;
    use serde_json::{Value, json};
    use tokio::{
        io::{AsyncReadExt, AsyncWriteExt},
        net::{TcpListener, TcpStream},
        task::{JoinHandle, JoinSet},
        time::sleep,
    };

    use super::*;

    const ID: &str = "agent:7&co ü";
    const SECRET: &str = "s3cr3t: +&=%/ü~Q";
    /// `ID` and `SECRET` form-urlencoded.
    const ID_FORM: &str = "agent%3A7%26co+%C3%BC";
    const SECRET_FORM: &str = "s3cr3t%3A+%2B%26%3D%25%2F%C3%BC%7EQ";
    /// In every token the test endpoint issues, so any text can be searched for tokens.
    const MARK: &str = "k9VbX2";

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    /// What the test endpoint answers.
    #[derive(Clone)]
    enum Reply {
        /// RFC 6749 5.1 (if the client authenticated correctly; else 5.2 `invalid_client`):
        /// `access_token` is `AT<n>.<MARK>`, `n` the request's number at the endpoint.
        Token { expires_in: Option<Value> },
        /// This status and body.
        Raw { status: u16, body: String },
        /// 1 MiB, announced by `Content-Length` or not (then until the connection closes).
        Huge { content_length: bool },
        /// `Content-Length: 100`, then one byte every 100 ms.
        Drip,
    }

    fn token_reply(expires_in: Option<Value>) -> Reply {
        Reply::Token { expires_in }
    }

    fn raw(status: u16, body: &str) -> Reply {
        Reply::Raw {
            status,
            body: body.to_owned(),
        }
    }

    /// One request as the endpoint read it.
    #[derive(Clone, Debug)]
    struct Seen {
        method: String,
        target: String,
        /// Names in lower case.
        headers: Vec<(String, String)>,
        body: String,
    }

    impl Seen {
        fn header(&self, name: &str) -> Option<&str> {
            self.headers
                .iter()
                .find(|(n, _)| n == name)
                .map(|(_, v)| v.as_str())
        }
    }

    struct Shared {
        hits: AtomicU64,
        reply: Mutex<Reply>,
        delay: Mutex<Duration>,
        seen: Mutex<Vec<Seen>>,
    }

    /// A test token endpoint on a loopback port, following RFC 6749: 4.4.2 (a POST with
    /// a form body `grant_type=client_credentials`), 2.3.1 (the client authenticated by
    /// exactly one method: HTTP Basic over the form-urlencoded id and secret, or
    /// `client_id`/`client_secret` body parameters; checked against `ID` and `SECRET`),
    /// 5.1 (the JSON token reply) and 5.2 (the JSON error reply, `invalid_client` when
    /// the check fails). hyper's server side is not a dependency of this crate, so it is
    /// written by hand over `tokio::net::TcpListener`: it reads one request head and a
    /// `Content-Length` body, and answers HTTP/1.1 with `Content-Length` and
    /// `Connection: close`. It counts requests and keeps what it read.
    struct Endpoint {
        url: String,
        shared: Arc<Shared>,
        task: JoinHandle<()>,
    }

    impl Endpoint {
        async fn start() -> Self {
            let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
            let url = format!("http://{}/token", listener.local_addr().unwrap());
            let shared = Arc::new(Shared {
                hits: AtomicU64::new(0),
                reply: Mutex::new(token_reply(Some(json!(3600)))),
                delay: Mutex::new(Duration::ZERO),
                seen: Mutex::new(Vec::new()),
            });
            let s = Arc::clone(&shared);
            let task = tokio::spawn(async move {
                loop {
                    if let Ok((sock, _)) = listener.accept().await {
                        tokio::spawn(serve(Arc::clone(&s), sock));
                    }
                }
            });
            Self { url, shared, task }
        }

        fn reply(&self, r: Reply) {
            *self.shared.reply.lock().unwrap() = r;
        }

        /// Wait this long between reading a request and answering it.
        fn delay(&self, d: Duration) {
            *self.shared.delay.lock().unwrap() = d;
        }

        fn hits(&self) -> u64 {
            self.shared.hits.load(Ordering::Relaxed)
        }

        fn seen(&self) -> Vec<Seen> {
            self.shared.seen.lock().unwrap().clone()
        }

        /// Close the listening socket: connections are refused from now on.
        async fn stop(&mut self) {
            self.task.abort();
            let _ = (&mut self.task).await;
        }
    }

    async fn serve(s: Arc<Shared>, mut sock: TcpStream) {
        let Some(req) = read_request(&mut sock).await else {
            return;
        };
        let n = s.hits.fetch_add(1, Ordering::Relaxed) + 1;
        s.seen.lock().unwrap().push(req.clone());
        let delay = *s.delay.lock().unwrap();
        sleep(delay).await;
        let reply = s.reply.lock().unwrap().clone();
        let _ = match reply {
            Reply::Token { expires_in } => match check(&req) {
                Err(why) => {
                    let body = json!({"error": "invalid_client", "error_description": why});
                    respond(&mut sock, 401, &body.to_string()).await
                }
                Ok(()) => {
                    let mut body =
                        json!({"access_token": format!("AT{n}.{MARK}"), "token_type": "Bearer"});
                    if let Some(e) = expires_in {
                        body["expires_in"] = e;
                    }
                    respond(&mut sock, 200, &body.to_string()).await
                }
            },
            Reply::Raw { status, body } => respond(&mut sock, status, &body).await,
            Reply::Huge { content_length } => {
                let length = if content_length {
                    format!("Content-Length: {}\r\n", 1 << 20)
                } else {
                    String::new()
                };
                let head = format!(
                    "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n{length}\
                     Connection: close\r\n\r\n"
                );
                async {
                    sock.write_all(head.as_bytes()).await?;
                    let chunk = vec![b' '; 16 * 1024];
                    for _ in 0..64 {
                        sock.write_all(&chunk).await?;
                    }
                    sock.shutdown().await
                }
                .await
            }
            Reply::Drip => {
                async {
                    sock.write_all(
                        b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n\
                          Content-Length: 100\r\n\r\n",
                    )
                    .await?;
                    for _ in 0..100 {
                        sock.write_all(b" ").await?;
                        sleep(ms(100)).await;
                    }
                    Ok(())
                }
                .await
            }
        };
    }

    /// RFC 6749 4.4.2 and 2.3.1, as a server checks them.
    fn check(req: &Seen) -> Result<(), String> {
        if req.method != "POST" {
            return Err(format!("method {}", req.method));
        }
        if req.header("content-type") != Some("application/x-www-form-urlencoded") {
            return Err("not a form".into());
        }
        let form = form_decode_pairs(&req.body);
        let get = |k: &str| form.iter().find(|(n, _)| n == k).map(|(_, v)| v.as_str());
        if get("grant_type") != Some("client_credentials") {
            return Err("unsupported grant_type".into());
        }
        let (id, secret) = match (req.header("authorization"), get("client_id")) {
            (Some(h), None) => {
                let b64 = h.strip_prefix("Basic ").ok_or("not Basic")?;
                let pair = STANDARD.decode(b64).map_err(|_| "bad base64")?;
                let pair = String::from_utf8(pair).map_err(|_| "not UTF-8")?;
                let (i, s) = pair.split_once(':').ok_or("no colon")?;
                (form_decode(i), form_decode(s))
            }
            (None, Some(id)) => (
                id.to_owned(),
                get("client_secret").unwrap_or_default().to_owned(),
            ),
            _ => return Err("not exactly one client authentication method".into()),
        };
        if id != ID || secret != SECRET {
            return Err("unknown client or wrong secret".into());
        }
        Ok(())
    }

    async fn read_request(sock: &mut TcpStream) -> Option<Seen> {
        let mut buf = Vec::new();
        let mut chunk = [0u8; 4096];
        let head_end = loop {
            if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                break i;
            }
            if buf.len() > MAX_BODY {
                return None;
            }
            let n = sock.read(&mut chunk).await.ok()?;
            if n == 0 {
                return None;
            }
            buf.extend_from_slice(&chunk[..n]);
        };
        let head = std::str::from_utf8(&buf[..head_end]).ok()?;
        let mut lines = head.split("\r\n");
        let mut first = lines.next()?.split(' ');
        let (method, target) = (first.next()?.to_owned(), first.next()?.to_owned());
        let headers: Vec<(String, String)> = lines
            .filter_map(|l| l.split_once(':'))
            .map(|(n, v)| (n.trim().to_ascii_lowercase(), v.trim().to_owned()))
            .collect();
        let len: usize = headers
            .iter()
            .find(|(n, _)| n == "content-length")
            .and_then(|(_, v)| v.parse().ok())
            .unwrap_or(0);
        let mut body = buf[head_end + 4..].to_vec();
        while body.len() < len {
            let n = sock.read(&mut chunk).await.ok()?;
            if n == 0 {
                return None;
            }
            body.extend_from_slice(&chunk[..n]);
        }
        Some(Seen {
            method,
            target,
            headers,
            body: String::from_utf8(body).ok()?,
        })
    }

    async fn respond(sock: &mut TcpStream, status: u16, body: &str) -> std::io::Result<()> {
        let reason = reqwest::StatusCode::from_u16(status)
            .ok()
            .and_then(|s| s.canonical_reason())
            .unwrap_or("Status");
        let head = format!(
            "HTTP/1.1 {status} {reason}\r\nContent-Type: application/json\r\n\
             Content-Length: {}\r\nCache-Control: no-store\r\nConnection: close\r\n\r\n",
            body.len()
        );
        sock.write_all(head.as_bytes()).await?;
        sock.write_all(body.as_bytes()).await?;
        sock.shutdown().await
    }

    fn form_decode(s: &str) -> String {
        let b = s.as_bytes();
        let mut out = Vec::with_capacity(b.len());
        let mut i = 0;
        while i < b.len() {
            match b[i] {
                b'+' => out.push(b' '),
                b'%' if s.get(i + 1..i + 3).is_some() => {
                    out.push(u8::from_str_radix(&s[i + 1..i + 3], 16).unwrap());
                    i += 2;
                }
                c => out.push(c),
            }
            i += 1;
        }
        String::from_utf8(out).unwrap()
    }

    fn form_decode_pairs(body: &str) -> Vec<(String, String)> {
        body.split('&')
            .filter(|p| !p.is_empty())
            .map(|p| {
                let (n, v) = p.split_once('=').unwrap_or((p, ""));
                (form_decode(n), form_decode(v))
            })
            .collect()
    }

    fn config(ep: &Endpoint) -> TokenConfig {
        TokenConfig {
            token_url: ep.url.clone(),
            client_id: ID.into(),
            client_secret: Secret::from_str_value(SECRET),
            scope: None,
            audience: None,
            extra: Vec::new(),
            auth: ClientAuth::Basic,
            default_lifetime: Duration::from_secs(300),
            timeout: Duration::from_secs(5),
        }
    }

    fn source(cfg: TokenConfig) -> Arc<TokenSource> {
        Arc::new(TokenSource::new(cfg, http_client(None).unwrap()))
    }

    fn text(t: &Secret) -> String {
        t.expose_str().unwrap().to_owned()
    }

    fn issued(n: u64) -> String {
        format!("AT{n}.{MARK}")
    }

    /// Neither the client secret (as is, form-encoded, or in the Basic header) nor any
    /// token in `s`.
    fn assert_clean(s: &str) {
        let basic = STANDARD.encode(format!("{ID_FORM}:{SECRET_FORM}"));
        for needle in ["s3cr3t", SECRET_FORM, &basic, MARK] {
            assert!(!s.contains(needle), "{s:?} contains {needle:?}");
        }
    }

    /// The error, checked to be free of secrets in both its forms.
    async fn token_err(src: &TokenSource) -> TokenError {
        let e = src.token().await.expect_err("expected an error");
        assert_clean(&e.to_string());
        assert_clean(&format!("{e:?}"));
        e
    }

    /// Call `token` `n` times at once.
    async fn concurrently(src: &Arc<TokenSource>, n: usize) -> Vec<Result<Secret, TokenError>> {
        let mut set = JoinSet::new();
        for _ in 0..n {
            let s = Arc::clone(src);
            set.spawn(async move { s.token().await });
        }
        let mut out = Vec::with_capacity(n);
        while let Some(r) = set.join_next().await {
            out.push(r.unwrap());
        }
        out
    }

    #[test]
    fn source_is_send_and_sync() {
        fn shared<T: Send + Sync + 'static>() {}
        shared::<TokenSource>();
        shared::<TokenError>();
    }

    #[test]
    fn margins_are_a_tenth_and_a_twentieth_capped() {
        let s = Duration::from_secs;
        assert_eq!(margins(s(3600)), (s(60), s(5)));
        assert_eq!(margins(s(300)), (s(30), s(5)));
        assert_eq!(margins(s(60)), (s(6), s(3)));
        assert_eq!(margins(s(1)), (ms(100), ms(50)));
        assert_eq!(margins(Duration::ZERO), (Duration::ZERO, Duration::ZERO));
    }

    #[test]
    fn form_encoding_is_the_whatwg_serializer() {
        let mut out = Vec::new();
        form_encode(&mut out, "aZ09*-._ ~!'()+&=%/:ü".as_bytes());
        assert_eq!(
            String::from_utf8(out).unwrap(),
            "aZ09*-._+%7E%21%27%28%29%2B%26%3D%25%2F%3A%C3%BC"
        );
    }

    #[tokio::test]
    async fn basic_client_auth_form_encodes_id_and_secret() {
        let ep = Endpoint::start().await;
        let mut cfg = config(&ep);
        cfg.scope = Some("read write:all".into());
        cfg.audience = Some("https://api.example.com/".into());
        cfg.extra = vec![("resource".into(), "a&b=c d".into())];
        let src = source(cfg);
        assert_eq!(text(&src.token().await.unwrap()), issued(1));
        let seen = ep.seen();
        assert_eq!(seen.len(), 1);
        let r = &seen[0];
        assert_eq!((r.method.as_str(), r.target.as_str()), ("POST", "/token"));
        assert_eq!(
            r.header("content-type"),
            Some("application/x-www-form-urlencoded")
        );
        assert_eq!(r.header("accept"), Some("application/json"));
        // RFC 6749 2.3.1: each form-urlencoded, then `id:secret` in base64.
        assert_eq!(
            r.header("authorization").unwrap(),
            format!(
                "Basic {}",
                STANDARD.encode(format!("{ID_FORM}:{SECRET_FORM}"))
            )
        );
        assert_eq!(
            r.body,
            "grant_type=client_credentials&scope=read+write%3Aall&audience=https%3A%2F%2Fapi.\
             example.com%2F&resource=a%26b%3Dc+d"
        );
    }

    #[tokio::test]
    async fn body_client_auth_sends_form_fields_and_no_authorization() {
        let ep = Endpoint::start().await;
        let mut cfg = config(&ep);
        cfg.auth = ClientAuth::Body;
        cfg.scope = Some("agent:execute blockchain:read".into());
        let src = source(cfg);
        assert_eq!(text(&src.token().await.unwrap()), issued(1));
        let r = &ep.seen()[0];
        assert_eq!(r.header("authorization"), None);
        assert_eq!(r.header("accept"), Some("application/json"));
        assert_eq!(
            r.body,
            format!(
                "grant_type=client_credentials&scope=agent%3Aexecute+blockchain%3Aread&\
                 client_id={ID_FORM}&client_secret={SECRET_FORM}"
            )
        );
    }

    #[tokio::test]
    async fn wrong_credentials_are_an_invalid_client_rejection() {
        let ep = Endpoint::start().await;
        for auth in [ClientAuth::Basic, ClientAuth::Body] {
            let mut cfg = config(&ep);
            cfg.auth = auth;
            cfg.client_secret = Secret::from_str_value("s3cr3t-but-wrong");
            let e = token_err(&source(cfg)).await;
            assert_eq!(e.kind(), "rejected");
            assert!(
                matches!(&e, TokenError::Rejected { status: 401, error, .. } if error == "invalid_client"),
                "{e:?}"
            );
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn concurrent_calls_share_one_fetch() {
        let ep = Endpoint::start().await;
        ep.delay(ms(200));
        let src = source(config(&ep));
        let tokens: HashSet<String> = concurrently(&src, 200)
            .await
            .into_iter()
            .map(|r| text(&r.unwrap()))
            .collect();
        assert_eq!(tokens, HashSet::from([issued(1)]));
        assert_eq!((src.fetches(), ep.hits()), (1, 1));
        // Then from the cache.
        assert_eq!(text(&src.token().await.unwrap()), issued(1));
        assert_eq!((src.fetches(), ep.hits()), (1, 1));
    }

    #[tokio::test]
    async fn a_cancelled_caller_does_not_stop_the_fetch() {
        let ep = Endpoint::start().await;
        ep.delay(ms(300));
        let src = source(config(&ep));
        assert!(tokio::time::timeout(ms(50), src.token()).await.is_err());
        assert_eq!(text(&src.token().await.unwrap()), issued(1));
        assert_eq!((src.fetches(), ep.hits()), (1, 1));
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn an_expired_token_is_fetched_again_exactly_once() {
        let ep = Endpoint::start().await;
        ep.reply(token_reply(Some(json!(1))));
        let src = source(config(&ep));
        assert_eq!(text(&src.token().await.unwrap()), issued(1));
        assert_eq!(text(&src.token().await.unwrap()), issued(1));
        sleep(ms(1100)).await;
        ep.delay(ms(100));
        for r in concurrently(&src, 50).await {
            assert_eq!(text(&r.unwrap()), issued(2));
        }
        assert_eq!((src.fetches(), ep.hits()), (2, 2));
    }

    /// Margins wide enough for timing tests: refresh after a quarter of the lifetime,
    /// stop serving in its last tenth.
    fn wide(lifetime: Duration) -> (Duration, Duration) {
        (lifetime * 3 / 4, lifetime / 10)
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn refreshed_ahead_of_expiry_while_the_valid_token_is_served() {
        let ep = Endpoint::start().await;
        ep.reply(token_reply(Some(json!(2))));
        // Refresh from 0.5 s, served until 1.8 s.
        let src = Arc::new(TokenSource::with_margins(
            config(&ep),
            http_client(None).unwrap(),
            wide,
        ));
        assert_eq!(text(&src.token().await.unwrap()), issued(1));
        sleep(ms(700)).await;
        // The refresh takes 400 ms and brings a long-lived token.
        ep.delay(ms(400));
        ep.reply(token_reply(Some(json!(3600))));
        let asked = Instant::now();
        for r in concurrently(&src, 20).await {
            assert_eq!(text(&r.unwrap()), issued(1));
        }
        assert!(asked.elapsed() < ms(200), "waited for the refresh");
        assert_eq!(src.fetches(), 2);
        sleep(ms(600)).await;
        assert_eq!(text(&src.token().await.unwrap()), issued(2));
        assert_eq!((src.fetches(), ep.hits()), (2, 2));
    }

    #[tokio::test]
    async fn a_failed_refresh_keeps_serving_the_valid_token_until_it_expires() {
        let mut ep = Endpoint::start().await;
        ep.reply(token_reply(Some(json!(2))));
        let src = TokenSource::with_margins(config(&ep), http_client(None).unwrap(), wide);
        let started = Instant::now();
        assert_eq!(text(&src.token().await.unwrap()), issued(1));
        ep.stop().await;
        sleep(ms(700)).await;
        // Inside the refresh margin: the refresh fails, the token is still served.
        assert_eq!(text(&src.token().await.unwrap()), issued(1));
        sleep(ms(100)).await;
        assert_eq!(text(&src.token().await.unwrap()), issued(1));
        assert_eq!(
            src.fetches(),
            2,
            "a failed refresh is retried after a second"
        );
        // Past 1.8 s the token is not served any more, and its refresh fails.
        sleep((started + ms(2000)).saturating_duration_since(Instant::now())).await;
        let e = token_err(&src).await;
        assert_eq!(e.kind(), "unreachable", "{e}");
        assert_eq!(src.fetches(), 3);
    }

    #[tokio::test]
    async fn a_missing_expires_in_uses_the_default_lifetime() {
        let ep = Endpoint::start().await;
        ep.reply(token_reply(None));
        let mut cfg = config(&ep);
        cfg.default_lifetime = Duration::from_secs(1);
        let src = source(cfg);
        assert_eq!(text(&src.token().await.unwrap()), issued(1));
        assert_eq!(text(&src.token().await.unwrap()), issued(1));
        sleep(ms(1100)).await;
        assert_eq!(text(&src.token().await.unwrap()), issued(2));
        assert_eq!(src.fetches(), 2);
    }

    #[tokio::test]
    async fn a_token_without_lifetime_is_not_cached() {
        let ep = Endpoint::start().await;
        ep.reply(token_reply(Some(json!(0))));
        let src = source(config(&ep));
        assert_eq!(text(&src.token().await.unwrap()), issued(1));
        assert_eq!(text(&src.token().await.unwrap()), issued(2));
    }

    #[tokio::test]
    async fn invalidate_drops_only_the_current_token() {
        let ep = Endpoint::start().await;
        let src = source(config(&ep));
        let first = src.token().await.unwrap();
        src.invalidate(&first);
        let second = src.token().await.unwrap();
        assert_eq!(text(&second), issued(2));
        assert_eq!(src.fetches(), 2);
        // A request that used the old token got its 401 late: nothing happens.
        src.invalidate(&first);
        assert_eq!(text(&src.token().await.unwrap()), issued(2));
        assert_eq!((src.fetches(), ep.hits()), (2, 2));
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn endpoint_down_after_expiry_is_an_error_never_the_stale_token() {
        let mut ep = Endpoint::start().await;
        ep.reply(token_reply(Some(json!(1))));
        let src = source(config(&ep));
        assert_eq!(text(&src.token().await.unwrap()), issued(1));
        ep.stop().await;
        sleep(ms(1100)).await;
        let e = token_err(&src).await;
        assert_eq!(e.kind(), "unreachable", "{e}");
        assert!(e.to_string().contains(&ep.url), "{e}");
        assert_eq!(src.fetches(), 2);
        // Shared with the callers of the next second, without new fetches.
        for r in concurrently(&src, 20).await {
            assert_eq!(r.unwrap_err().kind(), "unreachable");
        }
        assert_eq!(src.fetches(), 2);
        sleep(ms(1100)).await;
        assert_eq!(token_err(&src).await.kind(), "unreachable");
        assert_eq!(src.fetches(), 3);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_failure_is_shared_for_a_second_then_retried() {
        let ep = Endpoint::start().await;
        ep.reply(raw(503, "down for maintenance"));
        ep.delay(ms(100));
        let src = source(config(&ep));
        for r in concurrently(&src, 50).await {
            let e = r.unwrap_err();
            assert!(matches!(e, TokenError::Status { status: 503, .. }), "{e:?}");
        }
        assert_eq!(src.fetches(), 1);
        assert_eq!(token_err(&src).await.kind(), "status");
        assert_eq!(src.fetches(), 1);
        ep.reply(token_reply(Some(json!(3600))));
        sleep(ms(1100)).await;
        assert_eq!(text(&src.token().await.unwrap()), issued(2));
        assert_eq!((src.fetches(), ep.hits()), (2, 2));
    }

    /// The observer hears every fetch's result word once (the metrics'
    /// `token_refreshes_total`), not the calls served from the cache.
    #[tokio::test]
    async fn the_observer_hears_each_fetch_once() {
        let ep = Endpoint::start().await;
        let src = source(config(&ep));
        let heard = Arc::new(std::sync::Mutex::new(Vec::new()));
        let h = Arc::clone(&heard);
        src.observe(Box::new(move |w| h.lock().unwrap().push(w)));
        text(&src.token().await.unwrap());
        text(&src.token().await.unwrap());
        let src = source(config(&ep));
        let h = Arc::clone(&heard);
        src.observe(Box::new(move |w| h.lock().unwrap().push(w)));
        ep.reply(raw(503, "down"));
        assert_eq!(token_err(&src).await.kind(), "status");
        assert_eq!(*heard.lock().unwrap(), vec!["ok", "status"]);
    }

    #[tokio::test]
    async fn error_replies_are_typed() {
        let ep = Endpoint::start().await;
        let cases: Vec<(Reply, &str, &str)> = vec![
            (
                raw(
                    400,
                    r#"{"error":"invalid_scope","error_description":"scope \"x\" is not allowed"}"#,
                ),
                "rejected",
                r#"refused the request (HTTP status 400 Bad Request): invalid_scope: scope "x" is not allowed"#,
            ),
            (
                raw(200, r#"{"error":"access_denied"}"#),
                "rejected",
                "(HTTP status 200 OK): access_denied",
            ),
            (
                raw(503, "down for maintenance"),
                "status",
                "HTTP status 503 Service Unavailable",
            ),
            (
                raw(500, r#"{"message":"oops"}"#),
                "status",
                "HTTP status 500",
            ),
            (
                raw(200, "<html>hello</html>"),
                "bad_reply",
                "the reply is not JSON",
            ),
            (raw(200, "[1]"), "bad_reply", "not a JSON object"),
            (
                raw(200, r#"{"token_type":"Bearer"}"#),
                "bad_reply",
                "no access_token",
            ),
            (
                raw(200, r#"{"access_token":""}"#),
                "bad_reply",
                "access_token is empty",
            ),
            (
                raw(200, r#"{"access_token":7}"#),
                "bad_reply",
                "not a string",
            ),
            (
                raw(200, &format!(r#"{{"access_token":"{MARK}\r\nX-Evil: 1"}}"#)),
                "bad_reply",
                "cannot be sent in an HTTP header",
            ),
            (
                raw(
                    200,
                    &format!(r#"{{"access_token":"{MARK}","expires_in":-5}}"#),
                ),
                "bad_reply",
                "expires_in is negative",
            ),
            (
                raw(
                    200,
                    &format!(r#"{{"access_token":"{MARK}","expires_in":"soon"}}"#),
                ),
                "bad_reply",
                "expires_in is not a number",
            ),
            (raw(302, ""), "bad_reply", "redirects are not followed"),
        ];
        for (reply, kind, message) in cases {
            ep.reply(reply);
            let e = token_err(&source(config(&ep))).await;
            assert_eq!(e.kind(), kind, "{e}");
            assert!(e.to_string().contains(message), "{e}");
        }
    }

    #[tokio::test]
    async fn an_error_description_echoing_the_secret_is_redacted() {
        let ep = Endpoint::start().await;
        let body = json!({
            "error": "invalid_client",
            "error_description": format!("client {ID} secret {SECRET} / {SECRET_FORM}\n is wrong"),
        });
        ep.reply(raw(401, &body.to_string()));
        let e = token_err(&source(config(&ep))).await;
        let TokenError::Rejected {
            status,
            error,
            description,
            ..
        } = &e
        else {
            panic!("{e:?}")
        };
        assert_eq!((*status, error.as_str()), (401, "invalid_client"));
        assert_eq!(
            description.as_deref(),
            Some(format!("client {ID} secret *** / ***  is wrong").as_str())
        );
    }

    #[tokio::test]
    async fn a_huge_reply_is_refused() {
        let ep = Endpoint::start().await;
        for content_length in [true, false] {
            ep.reply(Reply::Huge { content_length });
            let e = token_err(&source(config(&ep))).await;
            assert!(
                matches!(
                    e,
                    TokenError::TooLarge {
                        limit: MAX_BODY,
                        ..
                    }
                ),
                "{e:?}"
            );
            assert_eq!(e.kind(), "too_large");
        }
    }

    #[tokio::test]
    async fn a_slow_reply_times_out() {
        let ep = Endpoint::start().await;
        let mut cfg = config(&ep);
        cfg.timeout = ms(300);
        // No answer at all; then headers at once and a body that trickles.
        ep.delay(Duration::from_secs(5));
        let asked = Instant::now();
        let e = token_err(&source(cfg.clone())).await;
        assert_eq!(e.kind(), "timeout", "{e}");
        assert!(asked.elapsed() < Duration::from_secs(2));
        ep.delay(Duration::ZERO);
        ep.reply(Reply::Drip);
        let asked = Instant::now();
        let e = token_err(&source(cfg)).await;
        assert_eq!(e.kind(), "timeout", "{e}");
        assert!(e.to_string().contains("300ms"), "{e}");
        assert!(asked.elapsed() < Duration::from_secs(2));
    }

    #[tokio::test]
    async fn unreachable_endpoint_is_a_typed_error() {
        // A port nothing listens on.
        let port = {
            let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            l.local_addr().unwrap().port()
        };
        let mut cfg = TokenConfig::new(
            format!("http://127.0.0.1:{port}/token"),
            ID,
            Secret::from_str_value(SECRET),
        );
        cfg.timeout = Duration::from_secs(2);
        let e = token_err(&source(cfg)).await;
        assert_eq!(e.kind(), "unreachable", "{e}");
    }

    #[tokio::test]
    async fn a_bad_configuration_fetches_nothing() {
        let ep = Endpoint::start().await;
        let mut bad = Vec::new();
        for url in ["not a url", "ftp://auth.example.com/token"] {
            let mut cfg = config(&ep);
            cfg.token_url = url.into();
            bad.push(cfg);
        }
        for name in ["grant_type", "client_secret", ""] {
            let mut cfg = config(&ep);
            cfg.extra = vec![(name.into(), "x".into())];
            bad.push(cfg);
        }
        let mut cfg = config(&ep);
        cfg.client_id = String::new();
        bad.push(cfg);
        for cfg in bad {
            assert_eq!(cfg.validate().unwrap_err().kind(), "config");
            let src = source(cfg);
            assert_eq!(token_err(&src).await.kind(), "config");
            assert_eq!(src.fetches(), 0);
        }
        assert!(config(&ep).validate().is_ok());
        assert_eq!(ep.hits(), 0);
    }

    #[test]
    fn expires_in_forms() {
        let src = TokenSource::new(
            TokenConfig::new(
                "https://auth.example.com/token",
                ID,
                Secret::from_str_value(SECRET),
            ),
            http_client(None).unwrap(),
        );
        let lifetime = |expires_in: &str| {
            let body = format!(r#"{{"access_token":"{MARK}"{expires_in}}}"#);
            src.inner.parse(200, body.as_bytes()).map(|(t, l)| {
                assert_eq!(text(&t), MARK);
                l
            })
        };
        let s = Duration::from_secs;
        assert_eq!(lifetime(r#","expires_in":3600"#).unwrap(), Some(s(3600)));
        assert_eq!(lifetime(r#","expires_in":59.9"#).unwrap(), Some(s(59)));
        assert_eq!(lifetime(r#","expires_in":" 120 ""#).unwrap(), Some(s(120)));
        assert_eq!(lifetime(r#","expires_in":null"#).unwrap(), None);
        assert_eq!(lifetime("").unwrap(), None);
        assert_eq!(
            lifetime(r#","expires_in":1e300"#).unwrap(),
            Some(MAX_LIFETIME)
        );
        assert_eq!(
            lifetime(r#","expires_in":99999999999999"#).unwrap(),
            Some(MAX_LIFETIME)
        );
        for bad in [
            r#","expires_in":true"#,
            r#","expires_in":"1h""#,
            r#","expires_in":-1"#,
        ] {
            assert_eq!(lifetime(bad).unwrap_err().kind(), "bad_reply", "{bad}");
        }
    }

    #[tokio::test]
    async fn debug_never_shows_secrets() {
        let ep = Endpoint::start().await;
        let src = source(config(&ep));
        src.token().await.unwrap();
        let shown = format!("{src:?}");
        assert!(shown.contains("cached: true"), "{shown}");
        assert_clean(&shown);
        assert_clean(&format!("{:?}", config(&ep)));
        let mut cfg = config(&ep);
        cfg.token_url = "https://user:pw@auth.example.com/token?key=k".into();
        let shown = format!("{cfg:?}");
        assert_clean(&shown);
        assert!(
            !shown.contains("pw@") && !shown.contains("key=k"),
            "{shown}"
        );
    }
}
