//! The HTTP side of the `vault` provider: requests with the namespace header, bounded
//! replies, status codes as typed failures, and the token (login, lookup, renewal, a
//! new login when Vault refuses it).
//!
//! Token lifecycle:
//! * fixed token (`token`, `VAULT_TOKEN`): looked up (`GET auth/token/lookup-self`) at
//!   first use to learn its TTL; renewed (`POST auth/token/renew-self`) at two thirds
//!   of each TTL granted while Vault keeps granting what was asked; a refused fixed token
//!   is an error (it cannot log in again).
//! * `tokenFile`: the same, and the file is read again when Vault refuses the token.
//! * AppRole, Kubernetes: a login at first use; the token is renewed the same way, and
//!   replaced by a new login when it is not renewable or its max TTL is near.
//! * A 403 on any request: if the token itself is dead (lookup-self refused), a new
//!   login (one for every request that saw it) and the request is sent once more;
//!   otherwise the 403 stands (a policy refusal) without a login.

use std::{
    collections::BTreeMap,
    path::Path,
    sync::{Arc, Mutex, MutexGuard},
    time::Duration,
};

use reqwest::{
    Method,
    header::{CONTENT_TYPE, HeaderValue},
};
use tokio::{sync::Notify, task::AbortHandle, time::Instant};
use zeroize::{Zeroize as _, Zeroizing};

use super::{
    id::wipe_json,
    settings::{Auth, Settings},
};
use crate::{
    config::VaultValue,
    secret::Secret,
    secrets::{SecretError, file::trim_one_newline},
    tls::{self, TlsOptions, Verify},
};

/// Largest reply accepted from Vault.
pub const MAX_BODY: usize = 1024 * 1024;
/// Longest Vault error text repeated in our messages.
const MAX_ERROR_TEXT: usize = 120;
/// A token is renewed (or replaced) when this share of its TTL has passed.
const RENEW_AT: (u32, u32) = (2, 3);
/// Replaced token generations are remembered this long after they end.
const GEN_MEMORY: Duration = Duration::from_secs(600);

/// Why a request failed, before it is tied to a credential id.
#[derive(Debug, Clone)]
pub enum Fail {
    NotConfigured,
    NotFound,
    Denied(String),
    Unreachable(String),
    BadReply(String),
    BadId(String),
    Timeout(Duration),
}

impl Fail {
    /// The error for credential `id` of provider `provider`.
    #[must_use]
    pub fn into_error(self, provider: &str, id: &str) -> SecretError {
        let (provider, id) = (provider.to_owned(), id.to_owned());
        match self {
            Self::NotConfigured => SecretError::NotConfigured { provider, id },
            Self::NotFound => SecretError::NotFound { provider, id },
            Self::Denied(reason) => SecretError::Denied {
                provider,
                id,
                reason,
            },
            Self::Unreachable(reason) => SecretError::Unreachable {
                provider,
                id,
                reason,
            },
            Self::BadReply(reason) => SecretError::BadReply {
                provider,
                id,
                reason,
            },
            Self::BadId(reason) => SecretError::BadId {
                provider,
                id,
                reason,
            },
            Self::Timeout(after) => SecretError::Timeout {
                provider,
                id,
                after,
            },
        }
    }
}

/// A reply: status and body (wiped when dropped).
pub struct Reply {
    pub status: u16,
    pub body: Zeroizing<Vec<u8>>,
}

impl Reply {
    #[must_use]
    pub fn ok(&self) -> bool {
        (200..300).contains(&self.status)
    }

    /// The body as JSON. The caller wipes it ([`wipe_json`]) when it held secrets.
    ///
    /// # Errors
    /// Not JSON.
    pub fn json(&self) -> Result<serde_json::Value, Fail> {
        serde_json::from_slice(&self.body)
            .map_err(|_| Fail::BadReply(format!("HTTP {}: the reply is not JSON", self.status)))
    }
}

/// A token as Vault issued it.
struct Issued {
    token: Secret,
    /// None: no expiry (a root token, a TTL of 0), or unknown.
    ttl: Option<Duration>,
    renewable: bool,
}

#[derive(Default)]
struct TokenState {
    token: Option<Secret>,
    /// Counts tokens installed: leases remember the generation that created them (Vault
    /// revokes a token's leases with it).
    generation: u64,
    /// When the token was issued or last renewed, and the TTL granted then.
    renewed: Option<Instant>,
    ttl: Option<Duration>,
    renewable: bool,
    /// The TTL to ask for at renewal: what the token was issued with.
    increment: Duration,
    /// The last renewal granted less than asked: the max TTL is near.
    capped: bool,
    /// Do nothing for this token before then (a failed renewal or login).
    retry_at: Option<Instant>,
    /// Replaced generations -> when their leases stop being usable (the old token's
    /// end; now, for a token Vault refused).
    replaced: BTreeMap<u64, Instant>,
    keeper: Option<AbortHandle>,
    warned: bool,
}

/// Talks to one Vault server as one identity.
pub struct Client {
    provider: String,
    http: reqwest::Client,
    base: reqwest::Url,
    namespace: Option<HeaderValue>,
    timeout: Duration,
    auth: Auth,
    state: Mutex<TokenState>,
    /// One login (or token load) at a time.
    login: tokio::sync::Mutex<()>,
    /// Wakes the keeper when the token changed.
    changed: Notify,
    /// What we sent Vault that must never come back into a message (login secrets).
    sent: Mutex<Vec<Secret>>,
}

impl Client {
    /// Create the HTTP client (our ring rustls: system roots plus the CA file).
    ///
    /// # Errors
    /// The CA file cannot be read or holds no certificate; the namespace cannot be
    /// sent in a header; the client cannot be created.
    pub fn new(provider: &str, s: &Settings) -> Result<Self, String> {
        let tls = tls::client_config(TlsOptions {
            verify: Verify::Full,
            ca_file: s.ca_file.as_deref(),
            with_system_roots: true,
            client_cert: None,
        })
        .map_err(|e| format!("caFile (or VAULT_CACERT): {e}"))?;
        let http = crate::secrets::store_client(Arc::unwrap_or_clone(tls), s.timeout)
            .build()
            .map_err(|e| format!("cannot create the HTTP client: {e}"))?;
        let namespace = match &s.namespace {
            Some(n) => Some(
                HeaderValue::from_str(n)
                    .map_err(|_| "the namespace cannot be sent in an HTTP header".to_owned())?,
            ),
            None => None,
        };
        let mut sent = Vec::new();
        match &s.auth {
            Auth::Token(Some(t)) => sent.push(t.clone()),
            Auth::AppRole {
                role_id, secret_id, ..
            } => {
                for v in std::iter::once(role_id).chain(secret_id) {
                    if let VaultValue::Inline(x) = v {
                        sent.push(x.clone());
                    }
                }
            }
            _ => {}
        }
        Ok(Self {
            provider: provider.to_owned(),
            http,
            base: s.address.clone(),
            namespace,
            timeout: s.timeout,
            auth: s.auth.clone(),
            state: Mutex::new(TokenState::default()),
            login: tokio::sync::Mutex::new(()),
            changed: Notify::new(),
            sent: Mutex::new(sent),
        })
    }

    fn lock(&self) -> MutexGuard<'_, TokenState> {
        self.state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn remember_sent(&self, s: &Secret) {
        let mut sent = self
            .sent
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if !sent.contains(s) {
            // Bounded: the configured secrets plus the last few tokens and JWTs.
            if sent.len() >= 16 {
                sent.remove(0);
            }
            sent.push(s.clone());
        }
    }

    /// The URL of API path `path` (`kv/db`: `<address>/v1/kv/db`), each segment
    /// percent-encoded.
    fn url(&self, path: &str) -> reqwest::Url {
        let mut url = self.base.clone();
        if let Ok(mut segs) = url.path_segments_mut() {
            segs.pop_if_empty().push("v1").extend(path.split('/'));
        }
        url
    }

    /// One request, no retry: `token` sent as `X-Vault-Token`, the namespace as
    /// `X-Vault-Namespace`, the reply read up to [`MAX_BODY`].
    ///
    /// # Errors
    /// Transport failures and timeouts; an oversized reply.
    pub async fn send(
        &self,
        method: Method,
        path: &str,
        token: Option<&Secret>,
        body: Option<&serde_json::Value>,
    ) -> Result<Reply, Fail> {
        let mut req = self
            .http
            .request(method, self.url(path))
            .header(reqwest::header::ACCEPT, "application/json");
        if let Some(ns) = &self.namespace {
            req = req.header("X-Vault-Namespace", ns.clone());
        }
        if let Some(t) = token {
            let mut h = HeaderValue::from_bytes(t.expose())
                .map_err(|_| Fail::Denied("the token cannot be sent in an HTTP header".into()))?;
            h.set_sensitive(true);
            req = req.header("X-Vault-Token", h);
        }
        if let Some(b) = body {
            let mut bytes = Zeroizing::new(serde_json::to_vec(b).unwrap_or_default());
            req = req
                .header(CONTENT_TYPE, "application/json")
                .body(std::mem::take(&mut *bytes));
        }
        let mut resp = req.send().await.map_err(|e| self.transport(e))?;
        let status = resp.status().as_u16();
        let too_big =
            || Fail::BadReply(format!("HTTP {status}: reply larger than {MAX_BODY} bytes"));
        let hint = resp.content_length().unwrap_or(0);
        if hint > MAX_BODY as u64 {
            return Err(too_big());
        }
        let mut body = Zeroizing::new(Vec::with_capacity(
            usize::try_from(hint).unwrap_or(0).clamp(256, MAX_BODY),
        ));
        while let Some(chunk) = resp.chunk().await.map_err(|e| self.transport(e))? {
            if body.len() + chunk.len() > MAX_BODY {
                return Err(too_big());
            }
            if body.capacity() < body.len() + chunk.len() {
                // Grow by hand so the old buffer is wiped rather than freed as is.
                let mut bigger = Vec::with_capacity((body.len() + chunk.len()).max(body.len() * 2));
                bigger.extend_from_slice(&body);
                std::mem::replace(&mut *body, bigger).zeroize();
            }
            body.extend_from_slice(&chunk);
        }
        Ok(Reply { status, body })
    }

    fn transport(&self, e: reqwest::Error) -> Fail {
        if e.is_timeout() {
            Fail::Timeout(self.timeout)
        } else {
            Fail::Unreachable(crate::secrets::http::describe(e))
        }
    }

    /// A non-2xx reply as a failure: 404 not found; 401, 403 denied; 408, 412, 429 and
    /// 5xx unreachable (sealed, standby, overloaded); 3xx and anything else a bad
    /// reply. Vault's own error text is repeated only when short, printable and free
    /// of anything we sent it.
    #[must_use]
    pub fn status_fail(&self, r: &Reply) -> Fail {
        let status = r.status;
        let mut reason = format!("HTTP {status}");
        if let Some(text) = self.error_text(r) {
            reason.push_str(": ");
            reason.push_str(&text);
        }
        match status {
            404 => Fail::NotFound,
            401 | 403 => Fail::Denied(reason),
            408 | 412 | 429 | 500..=599 => Fail::Unreachable(reason),
            300..=399 => Fail::BadReply(format!(
                "{reason}: redirects are not followed (set the address of the active node)"
            )),
            _ => Fail::BadReply(reason),
        }
    }

    /// The first of Vault's `{"errors": [...]}`, sanitised: at most
    /// [`MAX_ERROR_TEXT`] printable ASCII characters, and nothing at all when the body
    /// contains a secret we sent.
    fn error_text(&self, r: &Reply) -> Option<String> {
        let sent = self
            .sent
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let token = self.lock().token.clone();
        let leaks = sent.iter().chain(token.as_ref()).any(|s| {
            let s = s.expose();
            s.len() >= 4 && r.body.windows(s.len()).any(|w| w == s)
        });
        if leaks {
            return None;
        }
        let mut json: serde_json::Value = serde_json::from_slice(&r.body).ok()?;
        let text = json
            .get("errors")
            .and_then(|e| e.as_array())
            .and_then(|a| a.iter().find_map(|x| x.as_str().filter(|s| !s.is_empty())))
            .map(|s| {
                let mut out: String = s
                    .chars()
                    .take(MAX_ERROR_TEXT)
                    .map(|c| {
                        if c.is_ascii_graphic() || c == ' ' {
                            c
                        } else {
                            '?'
                        }
                    })
                    .collect();
                if s.chars().count() > MAX_ERROR_TEXT {
                    out.push_str("...");
                }
                out
            });
        wipe_json(&mut json);
        text
    }

    // ---- the token ---------------------------------------------------------------

    /// The current token and its generation; the first call loads or logs in.
    ///
    /// # Errors
    /// No token configured; the login or lookup failed.
    pub async fn token(self: &Arc<Self>) -> Result<(Secret, u64), Fail> {
        {
            let st = self.lock();
            if let Some(t) = &st.token {
                return Ok((t.clone(), st.generation));
            }
        }
        self.acquire(None).await
    }

    /// Install a new token: the first one, or one replacing generation `refused`
    /// (which Vault refused). Concurrent callers share one login.
    async fn acquire(self: &Arc<Self>, refused: Option<u64>) -> Result<(Secret, u64), Fail> {
        let _one = self.login.lock().await;
        {
            let st = self.lock();
            if let Some(t) = &st.token
                && refused != Some(st.generation)
            {
                // Someone else logged in meanwhile.
                return Ok((t.clone(), st.generation));
            }
        }
        let issued = self.obtain(refused.is_some()).await?;
        Ok(self.install(issued, true))
    }

    /// Replace generation `generation` before it ends (the keeper): the old token stays
    /// valid until its end, and so do its leases.
    async fn replace_early(self: &Arc<Self>, generation: u64) -> Result<(), Fail> {
        let _one = self.login.lock().await;
        if self.lock().generation != generation {
            return Ok(());
        }
        let issued = self.obtain(false).await?;
        self.install(issued, false);
        Ok(())
    }

    fn install(self: &Arc<Self>, issued: Issued, old_refused: bool) -> (Secret, u64) {
        let now = Instant::now();
        let mut st = self.lock();
        if st.token.is_some() {
            let end = if old_refused {
                now
            } else {
                match (st.renewed, st.ttl) {
                    (Some(r), Some(t)) => r + t,
                    _ => now + GEN_MEMORY,
                }
            };
            let generation = st.generation;
            st.replaced.insert(generation, end);
            st.replaced.retain(|_, e| *e + GEN_MEMORY > now);
        }
        st.generation += 1;
        st.token = Some(issued.token.clone());
        st.renewed = Some(now);
        st.ttl = issued.ttl;
        st.renewable = issued.renewable;
        st.increment = issued.ttl.unwrap_or_default();
        st.capped = false;
        st.retry_at = None;
        st.warned = false;
        if st.keeper.is_none() {
            st.keeper = Some(tokio::spawn(Arc::clone(self).keep()).abort_handle());
        }
        let out = (issued.token, st.generation);
        drop(st);
        self.changed.notify_one();
        out
    }

    /// Until when leases created under token generation `generation` may be used: None for
    /// the current token (it is renewed), the old token's end for a replaced one, now
    /// for one that is gone.
    #[must_use]
    pub fn generation_end(&self, generation: u64) -> Option<Instant> {
        let st = self.lock();
        if generation == st.generation {
            None
        } else {
            Some(
                st.replaced
                    .get(&generation)
                    .copied()
                    .unwrap_or_else(Instant::now),
            )
        }
    }

    /// A token from the configured method: the fixed token or the file (looked up),
    /// or a login. `again`: Vault refused the previous one.
    async fn obtain(&self, again: bool) -> Result<Issued, Fail> {
        match &self.auth {
            Auth::Token(None) => Err(Fail::NotConfigured),
            Auth::Token(Some(_)) if again => Err(Fail::Denied(
                "Vault refused the token (expired or revoked?); a fixed token cannot log in \
                 again"
                    .into(),
            )),
            Auth::Token(Some(t)) => self.lookup(t.clone()).await,
            Auth::TokenFile(path) => {
                let t = read_secret(path, "tokenFile")?;
                if t.expose().contains(&b'\n') || HeaderValue::from_bytes(t.expose()).is_err() {
                    return Err(Fail::Denied(
                        "the tokenFile's token cannot be sent in an HTTP header".into(),
                    ));
                }
                if again && self.lock().token.as_ref() == Some(&t) {
                    return Err(Fail::Denied(
                        "Vault refused the token, and tokenFile still holds it".into(),
                    ));
                }
                self.remember_sent(&t);
                self.lookup(t).await
            }
            Auth::AppRole {
                role_id,
                secret_id,
                mount,
            } => {
                let role_id = value(role_id, "roleIdFile")?;
                let mut body = serde_json::json!({
                    "role_id": role_id.expose_str().map_err(|_| Fail::Denied("roleId is not UTF-8".into()))?,
                });
                if let Some(s) = secret_id {
                    let s = value(s, "secretIdFile")?;
                    self.remember_sent(&s);
                    body["secret_id"] = serde_json::Value::String(
                        s.expose_str()
                            .map_err(|_| Fail::Denied("secretId is not UTF-8".into()))?
                            .to_owned(),
                    );
                }
                self.remember_sent(&role_id);
                let out = self.login(mount, &body).await;
                wipe_json(&mut body);
                out
            }
            Auth::Kubernetes {
                role,
                jwt_file,
                mount,
            } => {
                let jwt = read_secret(jwt_file, "jwtFile")?;
                self.remember_sent(&jwt);
                let mut body = serde_json::json!({
                    "role": role,
                    "jwt": jwt.expose_str().map_err(|_| Fail::Denied("the JWT is not UTF-8".into()))?,
                });
                let out = self.login(mount, &body).await;
                wipe_json(&mut body);
                out
            }
        }
    }

    /// `POST auth/<mount>/login`: `{"auth": {"client_token", "lease_duration",
    /// "renewable"}}`.
    async fn login(&self, mount: &str, body: &serde_json::Value) -> Result<Issued, Fail> {
        let r = self
            .send(
                Method::POST,
                &format!("auth/{mount}/login"),
                None,
                Some(body),
            )
            .await?;
        if !r.ok() {
            // A refused login is a refusal whatever the code (Vault answers 400 to a
            // wrong secret_id, 403 to a JWT it cannot verify).
            if matches!(r.status, 400 | 401 | 403 | 404) {
                let mut reason = format!("login refused: HTTP {}", r.status);
                if let Some(text) = self.error_text(&r) {
                    reason.push_str(": ");
                    reason.push_str(&text);
                }
                return Err(Fail::Denied(reason));
            }
            return Err(self.status_fail(&r));
        }
        let mut json = r.json()?;
        let out = issued_from_auth(&json, r.status);
        wipe_json(&mut json);
        let out = out?;
        self.remember_sent(&out.token);
        tracing::info!(
            provider = %self.provider,
            method = self.auth.method(),
            ttl_s = out.ttl.map(|d| d.as_secs()),
            renewable = out.renewable,
            "logged in to Vault"
        );
        Ok(out)
    }

    /// `GET auth/token/lookup-self` with `token`: its remaining TTL and whether it is
    /// renewable. A refusal is an error; other failures leave the TTL unknown.
    async fn lookup(&self, token: Secret) -> Result<Issued, Fail> {
        let r = self
            .send(Method::GET, "auth/token/lookup-self", Some(&token), None)
            .await?;
        if r.status == 401 || r.status == 403 {
            return Err(Fail::Denied(format!(
                "Vault refused the token: {}",
                match self.status_fail(&r) {
                    Fail::Denied(reason) => reason,
                    _ => format!("HTTP {}", r.status),
                }
            )));
        }
        let (mut ttl, mut renewable) = (None, false);
        if r.ok()
            && let Ok(mut json) = r.json()
        {
            let data = &json["data"];
            ttl = data["ttl"]
                .as_u64()
                .filter(|&s| s > 0)
                .map(Duration::from_secs);
            renewable = data["renewable"].as_bool().unwrap_or(false);
            wipe_json(&mut json);
        }
        Ok(Issued {
            token,
            ttl,
            renewable,
        })
    }

    /// Whether Vault still knows `token` (a 403 may be the token or a policy).
    async fn alive(&self, token: &Secret) -> bool {
        match self
            .send(Method::GET, "auth/token/lookup-self", Some(token), None)
            .await
        {
            Ok(r) => r.status != 401 && r.status != 403,
            // Cannot tell: keep the answer we had.
            Err(_) => true,
        }
    }

    /// An authenticated request. On a 403 from a dead token (and a method that can
    /// get another), a new token and the request once more; the reply (any status) is
    /// returned.
    ///
    /// # Errors
    /// Transport failures; no token, or a login that failed.
    pub async fn call(
        self: &Arc<Self>,
        method: Method,
        path: &str,
        body: Option<&serde_json::Value>,
    ) -> Result<Reply, Fail> {
        self.call_gen(method, path, body).await.map(|(r, _)| r)
    }

    /// [`Client::call`], also returning the generation of the token that made the
    /// final request.
    ///
    /// # Errors
    /// As [`Client::call`].
    pub async fn call_gen(
        self: &Arc<Self>,
        method: Method,
        path: &str,
        body: Option<&serde_json::Value>,
    ) -> Result<(Reply, u64), Fail> {
        let (token, generation) = self.token().await?;
        let r = self.send(method.clone(), path, Some(&token), body).await?;
        if r.status != 403 || self.alive(&token).await {
            return Ok((r, generation));
        }
        if !self.auth.can_renew_identity() {
            return Err(Fail::Denied(
                "Vault refused the token (expired or revoked?); a fixed token cannot log in \
                 again"
                    .into(),
            ));
        }
        tracing::info!(
            provider = %self.provider,
            method = self.auth.method(),
            "Vault refused the token; getting a new one"
        );
        let (token, generation) = self.acquire(Some(generation)).await?;
        let r = self.send(method, path, Some(&token), body).await?;
        Ok((r, generation))
    }

    // ---- keeping the token alive ---------------------------------------------------

    /// The keeper task: renews the token at two thirds of each TTL, or replaces it
    /// (new login) when it cannot be renewed further. Runs until aborted.
    async fn keep(self: Arc<Self>) {
        loop {
            let Some((generation, at, renew)) = self.plan() else {
                self.changed.notified().await;
                continue;
            };
            tokio::select! {
                () = tokio::time::sleep_until(at) => {}
                () = self.changed.notified() => continue,
            }
            if renew {
                self.renew_token(generation).await;
            } else {
                match self.replace_early(generation).await {
                    Ok(()) => {}
                    Err(e) => {
                        tracing::warn!(provider = %self.provider, error = ?e, "Vault login failed; retrying");
                        self.retry_later(generation);
                    }
                }
            }
        }
    }

    /// (generation, when, renew (else log in again)), or None: nothing to do.
    fn plan(&self) -> Option<(u64, Instant, bool)> {
        let mut st = self.lock();
        st.token.as_ref()?;
        let (renewed, ttl) = (st.renewed?, st.ttl?);
        let mut at = renewed + ttl * RENEW_AT.0 / RENEW_AT.1;
        if let Some(r) = st.retry_at {
            at = at.max(r);
        }
        let renew = st.renewable && !st.capped;
        if !renew && !matches!(self.auth, Auth::AppRole { .. } | Auth::Kubernetes { .. }) {
            if !st.warned {
                st.warned = true;
                tracing::warn!(
                    provider = %self.provider,
                    expires_in_s = (renewed + ttl).saturating_duration_since(Instant::now()).as_secs(),
                    "the Vault token cannot be renewed further; it will expire"
                );
            }
            return None;
        }
        Some((st.generation, at, renew))
    }

    fn retry_later(&self, generation: u64) {
        let now = Instant::now();
        let mut st = self.lock();
        if st.generation != generation {
            return;
        }
        let end = match (st.renewed, st.ttl) {
            (Some(r), Some(t)) => r + t,
            _ => now,
        };
        if end <= now {
            // Gone: the next request finds out and logs in (or fails).
            st.ttl = None;
            return;
        }
        let wait = ((end - now) / 3).clamp(Duration::from_secs(1), Duration::from_secs(30));
        st.retry_at = Some(now + wait);
    }

    /// `POST auth/token/renew-self {"increment"}`.
    async fn renew_token(self: &Arc<Self>, generation: u64) {
        let (token, increment) = {
            let st = self.lock();
            match &st.token {
                Some(t) if st.generation == generation => (t.clone(), st.increment),
                _ => return,
            }
        };
        let body = serde_json::json!({ "increment": format!("{}s", increment.as_secs()) });
        let r = self
            .send(
                Method::POST,
                "auth/token/renew-self",
                Some(&token),
                Some(&body),
            )
            .await;
        let r = match r {
            Ok(r) if r.ok() => r,
            Ok(r) if r.status == 401 || r.status == 403 => {
                tracing::warn!(provider = %self.provider, "Vault refused the token at renewal");
                if self.auth.can_renew_identity() {
                    if let Err(e) = self.acquire(Some(generation)).await {
                        tracing::warn!(provider = %self.provider, error = ?e, "Vault login failed");
                        self.retry_later(generation);
                    }
                } else {
                    self.lock().ttl = None;
                }
                return;
            }
            Ok(r) => {
                let f = self.status_fail(&r);
                tracing::warn!(provider = %self.provider, error = ?f, "renewing the Vault token failed");
                if r.status == 400 {
                    // Not renewable after all: replace it, or let it expire.
                    self.lock().renewable = false;
                } else {
                    self.retry_later(generation);
                }
                return;
            }
            Err(e) => {
                tracing::warn!(provider = %self.provider, error = ?e, "renewing the Vault token failed");
                self.retry_later(generation);
                return;
            }
        };
        let parsed = r.json().and_then(|mut j| {
            let out = issued_from_auth(&j, r.status);
            wipe_json(&mut j);
            out
        });
        let mut st = self.lock();
        if st.generation != generation {
            return;
        }
        match parsed {
            Ok(i) => {
                let granted = i.ttl.unwrap_or_default();
                st.renewed = Some(Instant::now());
                st.ttl = i.ttl;
                st.renewable = i.renewable;
                st.retry_at = None;
                // Vault caps a renewal at the token's max TTL: less than asked means the
                // end is near; replace it (or let it expire) from now on.
                st.capped = granted + Duration::from_secs(1) < increment;
                tracing::debug!(provider = %self.provider, ttl_s = granted.as_secs(), capped = st.capped, "Vault token renewed");
            }
            Err(e) => {
                drop(st);
                tracing::warn!(provider = %self.provider, error = ?e, "renewing the Vault token failed");
                self.retry_later(generation);
            }
        }
    }

    /// Stop the keeper.
    pub fn stop(&self) {
        if let Some(k) = self.lock().keeper.take() {
            k.abort();
        }
    }
}

/// `{"auth": {"client_token", "lease_duration", "renewable"}}` as a token.
fn issued_from_auth(json: &serde_json::Value, status: u16) -> Result<Issued, Fail> {
    let auth = &json["auth"];
    let token = auth["client_token"]
        .as_str()
        .filter(|t| !t.is_empty() && HeaderValue::from_str(t).is_ok())
        .ok_or_else(|| {
            Fail::BadReply(format!(
                "HTTP {status}: the reply has no usable auth.client_token"
            ))
        })?;
    Ok(Issued {
        token: Secret::from_str_value(token),
        ttl: auth["lease_duration"]
            .as_u64()
            .filter(|&s| s > 0)
            .map(Duration::from_secs),
        renewable: auth["renewable"].as_bool().unwrap_or(false),
    })
}

/// A login secret, inline or read (one trailing newline removed) from its file.
fn value(v: &VaultValue, what: &str) -> Result<Secret, Fail> {
    match v {
        VaultValue::Inline(s) => Ok(s.clone()),
        VaultValue::File(p) => read_secret(p, what),
    }
}

/// A file's content as a secret, one trailing newline removed; empty is an error.
fn read_secret(path: &Path, what: &str) -> Result<Secret, Fail> {
    let mut bytes = Zeroizing::new(std::fs::read(path).map_err(|e| {
        Fail::Denied(format!(
            "cannot read {what} {}: {}",
            path.display(),
            e.kind()
        ))
    })?);
    trim_one_newline(&mut bytes);
    if bytes.is_empty() {
        return Err(Fail::Denied(format!("{what} {} is empty", path.display())));
    }
    Ok(Secret::new(std::mem::take(&mut *bytes)))
}
