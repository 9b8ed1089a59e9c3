//! `conjur`: variables from CyberArk Conjur (Conjur Open Source, Secrets Manager
//! Self-Hosted and SaaS) through its REST API.
//!
//! * **Authentication.** Either an API key (`POST {authnUrl}/{account}/{login}/authenticate`
//!   with the key as the body; the reply is a JSON access token), or a token file that a
//!   sidecar (authn-k8s, authn-jwt) keeps fresh. Later calls carry
//!   `Authorization: Token token="<base64 of the token JSON>"`.
//! * **Token lifetime.** An API-key token is reused until three quarters of its lifetime
//!   (its payload's `exp - iat`, else Conjur's 8 minutes) have passed on our own clock,
//!   then renewed; concurrent callers share one authentication. A token file is
//!   `stat`ed before each use and re-read when it changed. A 401 on a secret fetch
//!   re-authenticates (or re-reads the file) once and retries once.
//! * **Ids** follow conjur-api-go's `makeFullID`: `prod/db/password`, `variable:ID` or
//!   `ACCOUNT:variable:ID` name the variable `ID` of the configured account; any other id
//!   with `:` is the identifier as written (`db:password` is the variable `db:password`).
//!   The identifier is sent percent-encoded as ONE path segment (`/` -> `%2F`, space ->
//!   `%20`, as Go's `url.PathEscape`). An id without `/` that holds `%2F` is taken as
//!   already encoded (`prod%2Fdb%2Fpassword`, as the REST API docs print ids) and
//!   decoded once first. `accessToken` (Secretless) is the access token itself.
//! * **Batches.** [`SecretProvider::get_many`] fetches several variables with one
//!   `GET /secrets?variable_ids=ACCT:variable:ID,...`; the reply maps full ids to values.
//!   A 404, 403 or 406 on a batch is retried id by id, so the error names the variable.
//! * **Errors.** 404 is [`SecretError::NotFound`]; 401 (after the retry) and 403 are
//!   [`SecretError::Denied`]; 5xx, 408, 429 and transport failures are
//!   [`SecretError::Unreachable`]; no answer within `timeout` is [`SecretError::Timeout`];
//!   redirects (not followed), other statuses, oversized or malformed replies are
//!   [`SecretError::BadReply`]. Messages never hold a value, the API key, a token or a
//!   reply body.
//!
//! Settings come from the instance's `providers:` keys, else from the environment as
//! Secretless and conjur-api-go read it (`CONJUR_APPLIANCE_URL`, `CONJUR_ACCOUNT`,
//! `CONJUR_AUTHN_LOGIN`, `CONJUR_AUTHN_API_KEY`, `CONJUR_AUTHN_TOKEN_FILE`,
//! `CONJUR_CERT_FILE`, `CONJUR_SSL_CERTIFICATE`, `CONJUR_AUTHN_URL`,
//! `CONJUR_HTTP_TIMEOUT`). See docs/stores/conjur.md.

use std::{
    borrow::Cow,
    collections::BTreeMap,
    path::{Path, PathBuf},
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, SystemTime},
};

use anyhow::Context as _;
use base64::Engine as _;
use reqwest::{
    StatusCode,
    header::{AUTHORIZATION, CONTENT_TYPE, HeaderValue},
};
use tokio::time::Instant;
use zeroize::{Zeroize, Zeroizing};

use super::{BoxFuture, BuiltIn, Fetched, SecretError, SecretProvider, http::describe};
use crate::{
    config::{ConjurProviderConfig, DEFAULT_HTTP_TIMEOUT},
    secret::Secret,
    tls::{self, PemSource, TlsSources, Verify},
};

/// Largest reply accepted for one variable.
pub const MAX_BODY: usize = 1024 * 1024;
/// Largest batch reply accepted.
pub const MAX_BATCH_BODY: usize = 8 * 1024 * 1024;
/// Largest access token (reply or file) and API key file accepted.
const MAX_TOKEN: usize = 64 * 1024;
/// A Conjur access token's lifetime when its payload does not say.
pub const DEFAULT_TOKEN_LIFETIME: Duration = Duration::from_secs(8 * 60);
/// Where Secretless' authn-k8s / authn-jwt sidecar writes the access token.
pub const SIDECAR_TOKEN_FILE: &str = "/run/conjur/access-token";
/// Longest `CONJUR_HTTP_TIMEOUT` accepted (conjur-api-go's maximum).
const MAX_TIMEOUT_SECS: u64 = 600;
/// The id Secretless answers with the access token itself.
pub const ACCESS_TOKEN_ID: &str = "accessToken";

/// The environment, as a function (tests pass their own).
pub type Env<'a> = &'a dyn Fn(&str) -> Option<String>;

fn process_env(name: &str) -> Option<String> {
    std::env::var(name).ok().filter(|v| !v.is_empty())
}

pub struct ConjurProvider {
    name: String,
    /// The client, or why the built-in instance has none (reported at fetch time).
    inner: BuiltIn<Client>,
}

struct Client {
    /// Appliance URL without a trailing `/`.
    base: String,
    account: String,
    authn: Authn,
    http: reqwest::Client,
    timeout: Duration,
}

enum Authn {
    ApiKey {
        /// `{authnUrl}/{account}/{login}/authenticate`, encoded.
        url: String,
        login: String,
        key: KeySource,
        token: tokio::sync::Mutex<Option<Token>>,
        generation: AtomicU64,
    },
    TokenFile {
        path: PathBuf,
        token: tokio::sync::Mutex<Option<FileToken>>,
    },
}

enum KeySource {
    Value(Secret),
    File(PathBuf),
}

/// An access token obtained with the API key.
struct Token {
    header: HeaderValue,
    raw: Secret,
    generation: u64,
    refresh_at: Instant,
}

/// An access token read from the token file, and which version of the file it was.
struct FileToken {
    header: HeaderValue,
    raw: Secret,
    stamp: FileStamp,
    /// When the token stops being fresh (wall clock, from its payload), if known.
    fresh_until: Option<SystemTime>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct FileStamp {
    dev: u64,
    ino: u64,
    len: u64,
    mtime: Option<SystemTime>,
}

/// The header to send and, for an API-key token, which token it was (a 401 renews only
/// that one, once, whoever saw it).
struct Auth {
    header: HeaderValue,
    generation: Option<u64>,
}

impl ConjurProvider {
    /// Build the instance from its config and the process environment.
    ///
    /// # Errors
    /// A declared instance with missing or unusable settings (no URL, account or
    /// credentials; an unreadable CA). The built-in instance never fails here: it
    /// reports the problem when a credential uses it.
    pub fn new(name: &str, cfg: &ConjurProviderConfig) -> anyhow::Result<Self> {
        Self::with_env(name, cfg, &process_env)
    }

    /// [`ConjurProvider::new`] with the environment given as a function.
    ///
    /// # Errors
    /// As [`ConjurProvider::new`].
    pub fn with_env(name: &str, cfg: &ConjurProviderConfig, env: Env<'_>) -> anyhow::Result<Self> {
        Ok(Self {
            name: name.to_owned(),
            inner: BuiltIn::new("conjur", name, cfg.builtin, Client::new(name, cfg, env))?,
        })
    }

    fn client(&self, id: &str) -> Result<&Client, SecretError> {
        self.inner.get(id)
    }

    /// One id: the access token, or one variable.
    async fn fetch(&self, id: &str) -> Result<Fetched, SecretError> {
        let c = self.client(id)?;
        if id == ACCESS_TOKEN_ID {
            return c.access_token(self, id).await;
        }
        let identifier = identifier(id, &c.account);
        if identifier.is_empty() {
            return Err(SecretError::BadId {
                provider: self.name.clone(),
                id: id.to_owned(),
                reason: "no variable identifier".into(),
            });
        }
        let url = format!(
            "{}/secrets/{}/variable/{}",
            c.base,
            encode_segment(&c.account),
            encode_segment(&identifier)
        );
        let resp = c
            .send(self, id, |h| {
                c.http.get(url.as_str()).header(AUTHORIZATION, h)
            })
            .await?;
        let status = resp.status();
        if !status.is_success() {
            return Err(self.err_status(id, status, "fetching the variable"));
        }
        let mut body = read_bounded(resp, MAX_BODY)
            .await
            .map_err(|e| self.err_body(id, e, c.timeout))?;
        Ok(Fetched::new(Secret::new(std::mem::take(&mut *body))))
    }

    /// Several variables with one batch request (see the module docs).
    async fn fetch_many(&self, ids: &[&str]) -> Result<Vec<Fetched>, SecretError> {
        let Some(first) = ids.first() else {
            return Ok(Vec::new());
        };
        let c = self.client(first)?;
        // Full ids of the variables, each once, in order of appearance.
        let mut full: Vec<String> = Vec::new();
        for id in ids.iter().filter(|id| **id != ACCESS_TOKEN_ID) {
            let f = format!("{}:variable:{}", c.account, identifier(id, &c.account));
            if !full.contains(&f) {
                full.push(f);
            }
        }
        // One variable, or an id a batch cannot carry (the server splits on `,`): one
        // request per id.
        if full.len() < 2
            || full
                .iter()
                .any(|f| f.contains(',') || f.ends_with(":variable:"))
        {
            return self.one_by_one(ids).await;
        }
        let shown = ids.join(", ");
        let query: String = form_urlencoded::byte_serialize(full.join(",").as_bytes()).collect();
        let url = format!("{}/secrets?variable_ids={query}", c.base);
        let resp = c
            .send(self, &shown, |h| {
                c.http.get(url.as_str()).header(AUTHORIZATION, h)
            })
            .await?;
        let status = resp.status();
        match status.as_u16() {
            200..=299 => {}
            // Which variable is missing or refused, or which value is binary (Conjur
            // cannot put it in JSON): asked one by one, the error names it.
            403 | 404 | 406 => {
                tracing::debug!(provider = %self.name, status = status.as_u16(), "batch refused; fetching one by one");
                return self.one_by_one(ids).await;
            }
            _ => return Err(self.err_status(&shown, status, "fetching the batch")),
        }
        let body = read_bounded(resp, MAX_BATCH_BODY)
            .await
            .map_err(|e| self.err_body(&shown, e, c.timeout))?;
        let values = parse_batch(&body).map_err(|reason| self.bad_reply(&shown, reason))?;
        let mut out = Vec::with_capacity(ids.len());
        for id in ids {
            if *id == ACCESS_TOKEN_ID {
                out.push(c.access_token(self, id).await?);
                continue;
            }
            let f = format!("{}:variable:{}", c.account, identifier(id, &c.account));
            let Some(v) = values.get(&f) else {
                return Err(self.bad_reply(id, "the batch reply has no value for this variable"));
            };
            out.push(Fetched::new(Secret::new(v.as_bytes().to_vec())));
        }
        Ok(out)
    }

    async fn one_by_one(&self, ids: &[&str]) -> Result<Vec<Fetched>, SecretError> {
        let mut out = Vec::with_capacity(ids.len());
        for id in ids {
            out.push(self.fetch(id).await?);
        }
        Ok(out)
    }

    fn bad_reply(&self, id: &str, reason: impl Into<String>) -> SecretError {
        SecretError::BadReply {
            provider: self.name.clone(),
            id: id.to_owned(),
            reason: reason.into(),
        }
    }

    /// A non-2xx status of a secrets request (`what`) as an error.
    fn err_status(&self, id: &str, status: StatusCode, what: &str) -> SecretError {
        let reason = format!("{what}: HTTP status {status}");
        SecretError::from_status(&self.name, id, status.as_u16(), reason)
    }

    fn transport(&self, id: &str, e: reqwest::Error, after: Duration) -> SecretError {
        if e.is_timeout() {
            return SecretError::Timeout {
                provider: self.name.clone(),
                id: id.to_owned(),
                after,
            };
        }
        SecretError::Unreachable {
            provider: self.name.clone(),
            id: id.to_owned(),
            reason: describe(e),
        }
    }

    fn err_body(&self, id: &str, e: BodyError, after: Duration) -> SecretError {
        match e {
            BodyError::TooBig(max) => self.bad_reply(id, format!("reply larger than {max} bytes")),
            BodyError::Transport(e) => self.transport(id, e, after),
        }
    }
}

impl Client {
    fn new(name: &str, cfg: &ConjurProviderConfig, env: Env<'_>) -> anyhow::Result<Self> {
        let pick = |yaml: &Option<String>, var: &str| yaml.clone().or_else(|| env(var));
        let appliance = pick(&cfg.appliance_url, "CONJUR_APPLIANCE_URL").with_context(|| {
            format!(
                "provider {name}: no Conjur URL: set providers.{name}.applianceUrl or \
                 CONJUR_APPLIANCE_URL"
            )
        })?;
        let base = normalize_base(&appliance)
            .with_context(|| format!("provider {name}: the appliance URL is not an http(s) URL"))?;
        let account = pick(&cfg.account, "CONJUR_ACCOUNT").with_context(|| {
            format!("provider {name}: no account: set providers.{name}.account or CONJUR_ACCOUNT")
        })?;
        let authn_url = match pick(&cfg.authn_url, "CONJUR_AUTHN_URL") {
            Some(u) => Some(normalize_base(&u).with_context(|| {
                format!("provider {name}: the authn URL is not an http(s) URL")
            })?),
            None => None,
        };
        let timeout = match cfg.timeout {
            Some(t) => t,
            None => match env("CONJUR_HTTP_TIMEOUT") {
                Some(s) => match s.trim().parse::<u64>() {
                    Ok(n) if (1..=MAX_TIMEOUT_SECS).contains(&n) => Duration::from_secs(n),
                    _ => anyhow::bail!(
                        "provider {name}: CONJUR_HTTP_TIMEOUT must be a number of seconds \
                         from 1 to {MAX_TIMEOUT_SECS}"
                    ),
                },
                None => DEFAULT_HTTP_TIMEOUT,
            },
        };

        let login = pick(&cfg.login, "CONJUR_AUTHN_LOGIN");
        let yaml_key = match (&cfg.api_key, &cfg.api_key_file) {
            (Some(k), _) => Some(KeySource::Value(k.clone())),
            (None, Some(f)) => Some(KeySource::File(f.clone())),
            (None, None) => None,
        };
        let env_key = || env("CONJUR_AUTHN_API_KEY").map(|k| KeySource::Value(Secret::from(k)));
        let token_file = cfg
            .token_file
            .clone()
            .or_else(|| env("CONJUR_AUTHN_TOKEN_FILE").map(PathBuf::from));
        let sidecar = authn_url
            .as_deref()
            .is_some_and(|u| u.contains("authn-k8s") || u.contains("authn-jwt"));
        // The instance's own keys choose first; then Secretless' order on the merged
        // settings: login and API key, a token file, an authn-k8s/authn-jwt sidecar.
        let method = if cfg.token_file.is_some() {
            Method::File(token_file.clone().unwrap_or_default())
        } else if let Some(key) = yaml_key {
            Method::Key(key)
        } else if let (Some(_), Some(key)) = (&login, env_key()) {
            Method::Key(key)
        } else if let Some(f) = token_file {
            Method::File(f)
        } else if sidecar {
            Method::File(PathBuf::from(SIDECAR_TOKEN_FILE))
        } else {
            anyhow::bail!(
                "provider {name}: no Conjur credentials: set login and apiKey (or \
                 CONJUR_AUTHN_LOGIN and CONJUR_AUTHN_API_KEY), or tokenFile (or \
                 CONJUR_AUTHN_TOKEN_FILE)"
            );
        };
        let authn = match method {
            Method::Key(key) => {
                let login = login.with_context(|| {
                    format!(
                        "provider {name}: an API key needs a login: set providers.{name}.login \
                         or CONJUR_AUTHN_LOGIN"
                    )
                })?;
                let authn_base = match (&authn_url, sidecar) {
                    (Some(u), false) => u.clone(),
                    _ => format!("{base}/authn"),
                };
                Authn::ApiKey {
                    url: format!(
                        "{authn_base}/{}/{}/authenticate",
                        encode_segment(&account),
                        encode_segment(&login)
                    ),
                    login,
                    key,
                    token: tokio::sync::Mutex::new(None),
                    generation: AtomicU64::new(0),
                }
            }
            Method::File(path) => Authn::TokenFile {
                path,
                token: tokio::sync::Mutex::new(None),
            },
        };

        // conjur-api-go: with a certificate, trust that certificate only.
        let pem_env = if cfg.ca_file.is_none() {
            env("CONJUR_SSL_CERTIFICATE")
        } else {
            None
        };
        let ca_path = cfg
            .ca_file
            .clone()
            .or_else(|| env("CONJUR_CERT_FILE").map(PathBuf::from));
        let ca = match (&pem_env, &ca_path) {
            (Some(pem), _) => Some(PemSource::CredentialText {
                credential: "CONJUR_SSL_CERTIFICATE",
                pem: pem.as_bytes(),
            }),
            (None, Some(p)) => Some(PemSource::ConfigFile(p)),
            (None, None) => None,
        };
        let tls = tls::client_config_from(TlsSources {
            verify: Verify::Full,
            ca,
            with_system_roots: false,
            client_cert: None,
        })
        .map_err(|e| anyhow::anyhow!("provider {name}: Conjur CA certificate: {e}"))?;
        let http = crate::secrets::store_client(Arc::unwrap_or_clone(tls), timeout)
            .build()
            .with_context(|| format!("provider {name}: cannot create the HTTP client"))?;
        Ok(Self {
            base,
            account,
            authn,
            http,
            timeout,
        })
    }

    /// Send a request built by `build` with the current token; on a 401, renew the token
    /// (once) and send it again (once).
    async fn send(
        &self,
        p: &ConjurProvider,
        id: &str,
        build: impl Fn(HeaderValue) -> reqwest::RequestBuilder,
    ) -> Result<reqwest::Response, SecretError> {
        let auth = self.auth(p, id, None).await?;
        let resp = build(auth.header)
            .send()
            .await
            .map_err(|e| p.transport(id, e, self.timeout))?;
        if resp.status() != StatusCode::UNAUTHORIZED {
            return Ok(resp);
        }
        drop(resp);
        tracing::debug!(provider = %p.name, "access token refused (401): renewing it once");
        let auth = self.auth(p, id, Some(auth.generation)).await?;
        build(auth.header)
            .send()
            .await
            .map_err(|e| p.transport(id, e, self.timeout))
    }

    /// The header for the current access token. `renew`: the previous attempt was
    /// refused with this token; get another one (unless someone already did).
    async fn auth(
        &self,
        p: &ConjurProvider,
        id: &str,
        renew: Option<Option<u64>>,
    ) -> Result<Auth, SecretError> {
        match &self.authn {
            Authn::ApiKey {
                url,
                login,
                key,
                token,
                generation,
            } => {
                let mut slot = token.lock().await;
                let refused = renew.flatten();
                if let Some(t) = slot.as_ref()
                    && Instant::now() < t.refresh_at
                    && refused.is_none_or(|g| g != t.generation)
                {
                    return Ok(Auth {
                        header: t.header.clone(),
                        generation: Some(t.generation),
                    });
                }
                let t = self
                    .authenticate(p, id, url, login, key, generation)
                    .await?;
                let auth = Auth {
                    header: t.header.clone(),
                    generation: Some(t.generation),
                };
                *slot = Some(t);
                Ok(auth)
            }
            Authn::TokenFile { path, token } => {
                let mut slot = token.lock().await;
                let stamp = stamp(p, id, path).await?;
                if renew.is_none()
                    && let Some(t) = slot.as_ref()
                    && t.stamp == stamp
                {
                    return Ok(Auth {
                        header: t.header.clone(),
                        generation: None,
                    });
                }
                let t = read_token_file(p, id, path, stamp).await?;
                let auth = Auth {
                    header: t.header.clone(),
                    generation: None,
                };
                *slot = Some(t);
                Ok(auth)
            }
        }
    }

    /// `POST .../authenticate` with the API key.
    async fn authenticate(
        &self,
        p: &ConjurProvider,
        id: &str,
        url: &str,
        login: &str,
        key: &KeySource,
        generation: &AtomicU64,
    ) -> Result<Token, SecretError> {
        let mut body: Zeroizing<Vec<u8>> = match key {
            KeySource::Value(k) => Zeroizing::new(k.expose().to_vec()),
            KeySource::File(path) => {
                let mut bytes = read_small_file(path, MAX_TOKEN).await.map_err(|reason| {
                    SecretError::Unreachable {
                        provider: p.name.clone(),
                        id: id.to_owned(),
                        reason: format!("API key file {}: {reason}", path.display()),
                    }
                })?;
                super::file::trim_one_newline(&mut bytes);
                bytes
            }
        };
        let started = Instant::now();
        let resp = self
            .http
            .post(url)
            .header(CONTENT_TYPE, "text/plain")
            // The key moves into the request (reqwest cannot wipe what it sends).
            .body(std::mem::take(&mut *body))
            .send()
            .await
            .map_err(|e| p.transport(id, e, self.timeout))?;
        let status = resp.status();
        if !status.is_success() {
            let reason = format!("authenticating as `{login}`: HTTP status {status}");
            let (provider, id) = (p.name.clone(), id.to_owned());
            return Err(match status.as_u16() {
                401 | 403 => SecretError::Denied {
                    provider,
                    id,
                    reason,
                },
                408 | 429 | 500..=599 => SecretError::Unreachable {
                    provider,
                    id,
                    reason,
                },
                _ => SecretError::BadReply {
                    provider,
                    id,
                    reason,
                },
            });
        }
        let raw = read_bounded(resp, MAX_TOKEN)
            .await
            .map_err(|e| p.err_body(id, e, self.timeout))?;
        let parsed = parse_token(&raw)
            .map_err(|reason| p.bad_reply(id, format!("authenticating as `{login}`: {reason}")))?;
        tracing::debug!(provider = %p.name, login, lifetime_s = parsed.lifetime.as_secs(), "authenticated to Conjur");
        Ok(Token {
            header: parsed.header,
            raw: parsed.json,
            generation: generation.fetch_add(1, Ordering::Relaxed) + 1,
            refresh_at: started + parsed.lifetime * 3 / 4,
        })
    }

    /// `get: accessToken`: the token JSON itself, valid until it is due for renewal.
    async fn access_token(&self, p: &ConjurProvider, id: &str) -> Result<Fetched, SecretError> {
        self.auth(p, id, None).await?;
        match &self.authn {
            Authn::ApiKey { token, .. } => {
                let slot = token.lock().await;
                let t = slot
                    .as_ref()
                    .ok_or_else(|| p.bad_reply(id, "no access token"))?;
                let left = t.refresh_at.saturating_duration_since(Instant::now());
                Ok(Fetched::expiring(t.raw.clone(), left))
            }
            Authn::TokenFile { token, .. } => {
                let slot = token.lock().await;
                let t = slot
                    .as_ref()
                    .ok_or_else(|| p.bad_reply(id, "no access token"))?;
                let left = t
                    .fresh_until
                    .map(|u| u.duration_since(SystemTime::now()).unwrap_or_default());
                Ok(Fetched {
                    value: t.raw.clone(),
                    expires_in: left,
                })
            }
        }
    }
}

enum Method {
    Key(KeySource),
    File(PathBuf),
}

/// Which version of the token file is there now.
async fn stamp(p: &ConjurProvider, id: &str, path: &Path) -> Result<FileStamp, SecretError> {
    use std::os::unix::fs::MetadataExt as _;
    let md = tokio::fs::metadata(path)
        .await
        .map_err(|e| token_file_err(p, id, path, &e))?;
    Ok(FileStamp {
        dev: md.dev(),
        ino: md.ino(),
        len: md.len(),
        mtime: md.modified().ok(),
    })
}

fn token_file_err(p: &ConjurProvider, id: &str, path: &Path, e: &std::io::Error) -> SecretError {
    let reason = format!("access token file {}: {e}", path.display());
    if e.kind() == std::io::ErrorKind::PermissionDenied {
        SecretError::Denied {
            provider: p.name.clone(),
            id: id.to_owned(),
            reason,
        }
    } else {
        SecretError::Unreachable {
            provider: p.name.clone(),
            id: id.to_owned(),
            reason,
        }
    }
}

async fn read_token_file(
    p: &ConjurProvider,
    id: &str,
    path: &Path,
    stamp: FileStamp,
) -> Result<FileToken, SecretError> {
    let raw =
        read_small_file(path, MAX_TOKEN)
            .await
            .map_err(|reason| SecretError::Unreachable {
                provider: p.name.clone(),
                id: id.to_owned(),
                reason: format!("access token file {}: {reason}", path.display()),
            })?;
    let parsed = parse_token(&raw).map_err(|reason| {
        p.bad_reply(
            id,
            format!("access token file {}: {reason}", path.display()),
        )
    })?;
    let fresh_until = parsed.issued_at.map(|iat| iat + parsed.lifetime * 3 / 4);
    Ok(FileToken {
        header: parsed.header,
        raw: parsed.json,
        stamp,
        fresh_until,
    })
}

/// Read a file of at most `max` bytes.
async fn read_small_file(path: &Path, max: usize) -> Result<Zeroizing<Vec<u8>>, String> {
    use tokio::io::AsyncReadExt as _;
    let f = tokio::fs::File::open(path)
        .await
        .map_err(|e| e.to_string())?;
    let mut buf = Zeroizing::new(Vec::with_capacity(4096));
    let cap = u64::try_from(max).unwrap_or(u64::MAX) + 1;
    f.take(cap)
        .read_to_end(&mut buf)
        .await
        .map_err(|e| e.to_string())?;
    if buf.len() > max {
        return Err(format!("larger than {max} bytes"));
    }
    Ok(buf)
}

/// An access token, parsed.
struct ParsedToken {
    /// `Token token="<base64 of the JSON>"`, marked sensitive.
    header: HeaderValue,
    /// The token JSON.
    json: Secret,
    /// `exp - iat` from its payload, else [`DEFAULT_TOKEN_LIFETIME`].
    lifetime: Duration,
    /// `iat` from its payload.
    issued_at: Option<SystemTime>,
}

/// Parse an access token: the JSON `{"protected", "payload", "signature"}` Conjur issues
/// (or its base64, as `Accept-Encoding: base64` returns it and some sidecars write it).
fn parse_token(raw: &[u8]) -> Result<ParsedToken, &'static str> {
    const NOT_A_TOKEN: &str = "not a Conjur access token";
    let trimmed = raw.trim_ascii();
    let json: Zeroizing<Vec<u8>> = if trimmed.first() == Some(&b'{') {
        Zeroizing::new(trimmed.to_vec())
    } else {
        let decoded = Zeroizing::new(
            base64::engine::general_purpose::STANDARD
                .decode(trimmed)
                .map_err(|_| NOT_A_TOKEN)?,
        );
        if decoded.trim_ascii().first() != Some(&b'{') {
            return Err(NOT_A_TOKEN);
        }
        Zeroizing::new(decoded.trim_ascii().to_vec())
    };
    let mut v: serde_json::Value = serde_json::from_slice(&json).map_err(|_| NOT_A_TOKEN)?;
    let fields_ok = ["protected", "payload", "signature"]
        .iter()
        .all(|k| v.get(k).is_some_and(serde_json::Value::is_string));
    let claims = v
        .get("payload")
        .and_then(serde_json::Value::as_str)
        .and_then(decode_b64_any)
        .and_then(|p| serde_json::from_slice::<serde_json::Value>(&p).ok());
    wipe_json(&mut v);
    if !fields_ok {
        return Err(NOT_A_TOKEN);
    }
    let num = |k: &str| {
        claims
            .as_ref()
            .and_then(|c| c.get(k))
            .and_then(serde_json::Value::as_f64)
            .filter(|n| n.is_finite() && *n >= 0.0)
    };
    let (iat, exp) = (num("iat"), num("exp"));
    let lifetime = match (iat, exp) {
        (Some(i), Some(e)) if e > i => Duration::from_secs_f64((e - i).min(86_400.0)),
        _ => DEFAULT_TOKEN_LIFETIME,
    };
    let issued_at = iat.map(|i| SystemTime::UNIX_EPOCH + Duration::from_secs_f64(i.min(1e12)));
    let mut text = Zeroizing::new(String::from("Token token=\""));
    base64::engine::general_purpose::STANDARD.encode_string(&*json, &mut text);
    text.push('"');
    let mut header = HeaderValue::from_str(&text).map_err(|_| NOT_A_TOKEN)?;
    header.set_sensitive(true);
    Ok(ParsedToken {
        header,
        json: Secret::new(json.to_vec()),
        lifetime,
        issued_at,
    })
}

/// Base64 in any of the usual alphabets, padded or not.
fn decode_b64_any(s: &str) -> Option<Vec<u8>> {
    use base64::engine::general_purpose::{STANDARD, STANDARD_NO_PAD, URL_SAFE, URL_SAFE_NO_PAD};
    [STANDARD, URL_SAFE, STANDARD_NO_PAD, URL_SAFE_NO_PAD]
        .iter()
        .find_map(|e| e.decode(s).ok())
}

/// Overwrite every string of a parsed JSON value.
fn wipe_json(v: &mut serde_json::Value) {
    match v {
        serde_json::Value::String(s) => s.zeroize(),
        serde_json::Value::Array(a) => a.iter_mut().for_each(wipe_json),
        serde_json::Value::Object(m) => m.values_mut().for_each(wipe_json),
        _ => {}
    }
}

/// A batch reply: `{"ACCT:variable:ID": "value", ...}`. The values are wiped on drop.
fn parse_batch(body: &[u8]) -> Result<BTreeMap<String, Zeroizing<String>>, &'static str> {
    let mut v: serde_json::Value =
        serde_json::from_slice(body).map_err(|_| "the batch reply is not JSON")?;
    let mut out = BTreeMap::new();
    let result = match &mut v {
        serde_json::Value::Object(m) => m.iter_mut().try_for_each(|(k, val)| match val {
            serde_json::Value::String(s) => {
                out.insert(k.clone(), Zeroizing::new(std::mem::take(s)));
                Ok(())
            }
            _ => Err("the batch reply holds a value that is not a string"),
        }),
        _ => Err("the batch reply is not a JSON object"),
    };
    wipe_json(&mut v);
    result.map(|()| out)
}

/// The variable identifier an id names, as conjur-api-go's `makeFullID` reads it:
/// `ID`, `variable:ID` and `ACCOUNT:variable:ID` name `ID`; any other id is the
/// identifier as written. An id already percent-encoded (`prod%2Fdb`, no `/`) is
/// decoded first.
#[must_use]
pub fn identifier<'a>(id: &'a str, account: &str) -> Cow<'a, str> {
    let id = predecoded(id);
    let parts: Vec<&str> = id.splitn(3, ':').collect();
    let start = match parts.as_slice() {
        ["variable", _] => "variable:".len(),
        [a, "variable", _] if *a == account => a.len() + ":variable:".len(),
        _ => 0,
    };
    match id {
        Cow::Borrowed(s) => Cow::Borrowed(&s[start..]),
        Cow::Owned(s) => Cow::Owned(s[start..].to_owned()),
    }
}

/// An id without `/` that holds `%2F` (any case) and only valid `%XX` escapes, decoded;
/// any other id as it is.
fn predecoded(id: &str) -> Cow<'_, str> {
    let b = id.as_bytes();
    let has_encoded_slash = b
        .windows(3)
        .any(|w| w[0] == b'%' && w[1] == b'2' && w[2].eq_ignore_ascii_case(&b'f'));
    let escapes_valid = b.iter().enumerate().all(|(i, c)| {
        *c != b'%'
            || (b.get(i + 1).is_some_and(u8::is_ascii_hexdigit)
                && b.get(i + 2).is_some_and(u8::is_ascii_hexdigit))
    });
    if id.contains('/') || !has_encoded_slash || !escapes_valid {
        return Cow::Borrowed(id);
    }
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' {
            let hex = std::str::from_utf8(&b[i + 1..i + 3]).unwrap_or("00");
            out.push(u8::from_str_radix(hex, 16).unwrap_or(0));
            i += 3;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    match String::from_utf8(out) {
        Ok(s) => Cow::Owned(s),
        Err(_) => Cow::Borrowed(id),
    }
}

/// Percent-encode `s` as one URL path segment, as Go's `url.PathEscape` does for ids:
/// letters, digits, `-._~` and `:@` stay; everything else (`/`, space, `%`, `+`, `,`,
/// `;`, `?`, `#`, non-ASCII bytes, ...) becomes `%XX`.
#[must_use]
pub fn encode_segment(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for &c in s.as_bytes() {
        if c.is_ascii_alphanumeric() || b"-._~:@".contains(&c) {
            out.push(char::from(c));
        } else {
            out.push_str(&format!("%{c:02X}"));
        }
    }
    out
}

/// The appliance (or authn) URL without a trailing `/`; a Secrets Manager SaaS URL gets
/// its `/api` prefix, as conjur-api-go adds it.
fn normalize_base(url: &str) -> Option<String> {
    let u = reqwest::Url::parse(url).ok()?;
    if !matches!(u.scheme(), "http" | "https") || !u.has_host() {
        return None;
    }
    let base = url.trim_end_matches('/').to_owned();
    let host = u.host_str().unwrap_or_default().to_ascii_lowercase();
    let saas = u.scheme() == "https"
        && [
            ".cyberark.cloud",
            ".integration-cyberark.cloud",
            ".test-cyberark.cloud",
            ".dev-cyberark.cloud",
            ".cyberark-everest-integdev.cloud",
            ".cyberark-everest-pre-prod.cloud",
            ".sandbox-cyberark.cloud",
            ".pt-cyberark.cloud",
        ]
        .iter()
        .any(|sfx| {
            host.strip_suffix(sfx)
                .is_some_and(|h| h.ends_with(".secretsmgr") || h.ends_with("-secretsmanager"))
        });
    if saas && !base.contains("/api") {
        return Some(format!("{base}/api"));
    }
    Some(base)
}

/// Why a reply body could not be read.
pub(crate) enum BodyError {
    TooBig(usize),
    Transport(reqwest::Error),
}

/// A reply body of at most `max` bytes, in a buffer wiped on drop (grown by hand, so
/// no copy is freed unwiped).
pub(crate) async fn read_bounded(
    mut resp: reqwest::Response,
    max: usize,
) -> Result<Zeroizing<Vec<u8>>, BodyError> {
    let hint = resp.content_length().unwrap_or(0);
    if hint > max as u64 {
        return Err(BodyError::TooBig(max));
    }
    let mut body = Zeroizing::new(Vec::with_capacity(
        usize::try_from(hint).unwrap_or(0).max(256),
    ));
    while let Some(chunk) = resp.chunk().await.map_err(BodyError::Transport)? {
        if body.len() + chunk.len() > max {
            return Err(BodyError::TooBig(max));
        }
        if body.capacity() < body.len() + chunk.len() {
            let mut bigger = Vec::with_capacity((body.len() + chunk.len()).max(body.len() * 2));
            bigger.extend_from_slice(&body);
            std::mem::replace(&mut *body, bigger).zeroize();
        }
        body.extend_from_slice(&chunk);
    }
    Ok(body)
}

impl SecretProvider for ConjurProvider {
    fn name(&self) -> &str {
        &self.name
    }

    fn get<'a>(&'a self, id: &'a str) -> BoxFuture<'a, Result<Fetched, SecretError>> {
        Box::pin(self.fetch(id))
    }

    fn get_many<'a>(
        &'a self,
        ids: &'a [&'a str],
    ) -> BoxFuture<'a, Result<Vec<Fetched>, SecretError>> {
        Box::pin(self.fetch_many(ids))
    }
}

#[cfg(test)]
#[path = "conjur_tests.rs"]
mod tests;
