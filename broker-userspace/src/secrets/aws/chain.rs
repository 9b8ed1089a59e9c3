//! AWS credentials: the standard chain of the AWS SDKs, cached and refreshed.
//!
//! Order (the first source that is set up is used; a source that is set up but fails
//! is an error, not a reason to try the next one, except where noted):
//! 1. fixed keys of the instance (`accessKeyId`, `secretAccessKey`, `sessionToken`);
//! 2. the environment: `AWS_ACCESS_KEY_ID` + `AWS_SECRET_ACCESS_KEY` (+ `AWS_SESSION_TOKEN`);
//! 3. the shared files' profile (the instance's `profile`, else `AWS_PROFILE`, else
//!    `default`): `aws_access_key_id` + `aws_secret_access_key` (+ `aws_session_token`),
//!    or `role_arn` + `web_identity_token_file` (STS `AssumeRoleWithWebIdentity`). A
//!    profile named explicitly must exist; `default` may be missing, or hold only
//!    settings (then the next source is tried);
//! 4. web identity: `AWS_WEB_IDENTITY_TOKEN_FILE` + `AWS_ROLE_ARN`
//!    (`AWS_ROLE_SESSION_NAME`), the token file read at every refresh (Kubernetes
//!    rotates it);
//! 5. the container endpoint: `AWS_CONTAINER_CREDENTIALS_RELATIVE_URI` (on
//!    `169.254.170.2`) or `AWS_CONTAINER_CREDENTIALS_FULL_URI` (https anywhere; http only
//!    to loopback and the ECS/EKS agent addresses), with the token of
//!    `AWS_CONTAINER_AUTHORIZATION_TOKEN_FILE` or `AWS_CONTAINER_AUTHORIZATION_TOKEN` as
//!    `Authorization`;
//! 6. instance metadata (IMDSv2 only: a session token by `PUT`, then the role's
//!    credentials), last, with one-second timeouts; not when `AWS_EC2_METADATA_DISABLED`
//!    is `true`. `AWS_EC2_METADATA_SERVICE_ENDPOINT` (or `..._ENDPOINT_MODE=IPv6`) moves it.
//!
//! Credentials are cached. Temporary ones (with an expiry) are refreshed when less than
//! five minutes, or less than half of the lifetime they came with, remain; if a refresh
//! fails while the old ones are still valid, the old ones are used. Long-lived ones
//! (environment, files) are read again every five minutes, so a rotated
//! `~/.aws/credentials` is picked up. [`Chain::invalidate`] drops them (after AWS said
//! they are expired or unknown).
//!
//! Nothing here formats a secret: errors name the source and the file or variable.

use std::{
    net::IpAddr,
    sync::Arc,
    time::{Duration, SystemTime},
};

use reqwest::header::{AUTHORIZATION, HeaderValue};
use tokio::time::Instant;
use zeroize::Zeroizing;

use super::{AwsEnv, profile, xml_text};
use crate::{
    secret::Secret,
    secrets::{
        file::trim_one_newline,
        http::{BodyError, describe, read_body, wipe_json},
    },
};

/// Largest credentials reply (container, IMDS, STS).
const MAX_CREDS_BODY: usize = 64 * 1024;
/// Long-lived credentials are read again after this long.
const REREAD_AFTER: Duration = Duration::from_secs(300);
/// Temporary credentials are refreshed at the latest this long before they expire.
const REFRESH_BEFORE: Duration = Duration::from_secs(300);
/// Each instance-metadata request.
pub const IMDS_TIMEOUT: Duration = Duration::from_secs(1);
const IMDS_DEFAULT: &str = "http://169.254.169.254";
const IMDS_DEFAULT_V6: &str = "http://[fd00:ec2::254]";
const ECS_HOST: &str = "http://169.254.170.2";

/// A set of AWS credentials. `Debug` shows the source and the access key id only.
#[derive(Clone)]
pub struct AwsCredentials {
    pub access_key_id: String,
    pub secret_access_key: Secret,
    pub session_token: Option<Secret>,
    /// When temporary credentials stop working.
    pub expiration: Option<SystemTime>,
    /// Where they came from, for messages: `configuration`, `environment`, `profile
    /// NAME`, `web identity`, `container endpoint`, `instance metadata`.
    pub source: String,
    /// Whether asking the source again may give other credentials (files, STS, the
    /// container endpoint, IMDS): then a rejection by AWS is worth one retry.
    pub renewable: bool,
}

impl std::fmt::Debug for AwsCredentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AwsCredentials")
            .field("source", &self.source)
            .field("access_key_id", &self.access_key_id)
            .field("expiration", &self.expiration)
            .finish_non_exhaustive()
    }
}

/// Why no credentials could be had.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Failure {
    /// None found, or the source refused (STS `AccessDenied`, a 403 from the container
    /// endpoint, an unsupported profile).
    Denied,
    /// The source could not be reached or failed (connect errors, 5xx).
    Unreachable,
    /// No answer in time.
    Timeout,
    /// The source answered something unusable.
    BadReply,
}

/// A credential failure: its kind and a reason naming the source (never a value).
#[derive(Debug, Clone)]
pub struct ChainError {
    pub kind: Failure,
    pub reason: String,
}

impl ChainError {
    fn new(kind: Failure, reason: impl Into<String>) -> Self {
        Self {
            kind,
            reason: reason.into(),
        }
    }
}

struct Cached {
    creds: Arc<AwsCredentials>,
    refresh_at: Instant,
    expires_at: Option<Instant>,
}

/// The credential chain of one provider instance.
pub struct Chain {
    env: AwsEnv,
    fixed: Option<Arc<AwsCredentials>>,
    profile: Option<String>,
    /// Secrets Manager's client also serves STS and an https container endpoint.
    http: reqwest::Client,
    /// No proxy: the container endpoint over http.
    local: reqwest::Client,
    /// No proxy, one-second timeouts.
    imds: reqwest::Client,
    cached: tokio::sync::Mutex<Option<Cached>>,
}

impl Chain {
    /// A chain for `env`; `fixed` credentials (the instance's own) skip it; `profile`
    /// is the instance's `profile`; `http` (with `tls`) reaches STS and https container
    /// endpoints.
    ///
    /// # Errors
    /// When an HTTP client cannot be created.
    pub fn new(
        env: AwsEnv,
        fixed: Option<AwsCredentials>,
        profile: Option<String>,
        http: reqwest::Client,
        tls: &rustls::ClientConfig,
        timeout: Duration,
    ) -> Result<Self, reqwest::Error> {
        // Every client gets our (ring) TLS configuration: reqwest has no provider.
        let local = reqwest::Client::builder()
            .tls_backend_preconfigured(tls.clone())
            .no_proxy()
            .redirect(reqwest::redirect::Policy::none())
            .timeout(timeout)
            .connect_timeout(timeout)
            .build()?;
        let imds = reqwest::Client::builder()
            .tls_backend_preconfigured(tls.clone())
            .no_proxy()
            .redirect(reqwest::redirect::Policy::none())
            .timeout(IMDS_TIMEOUT)
            .connect_timeout(IMDS_TIMEOUT)
            .build()?;
        Ok(Self {
            env,
            fixed: fixed.map(Arc::new),
            profile,
            http,
            local,
            imds,
            cached: tokio::sync::Mutex::new(None),
        })
    }

    /// The profile in use: the instance's, `AWS_PROFILE`, `AWS_DEFAULT_PROFILE`, else
    /// `default`; and whether it was named explicitly.
    fn profile_name(&self) -> (String, bool) {
        match self
            .profile
            .clone()
            .or_else(|| self.env.get("AWS_PROFILE"))
            .or_else(|| self.env.get("AWS_DEFAULT_PROFILE"))
        {
            Some(p) => (p, true),
            None => ("default".to_owned(), false),
        }
    }

    /// The region of the chain: `AWS_REGION`, `AWS_DEFAULT_REGION`, the profile's
    /// `region`; with where it came from.
    #[must_use]
    pub fn region(&self) -> Option<(String, String)> {
        for var in ["AWS_REGION", "AWS_DEFAULT_REGION"] {
            if let Some(r) = self.env.get(var) {
                return Some((r, var.to_owned()));
            }
        }
        let (name, _) = self.profile_name();
        let (p, _) = profile::load(&self.env, &name).ok()?;
        let r = p?.get("region")?.to_owned();
        Some((r, format!("profile {name}")))
    }

    /// The STS endpoint: `AWS_ENDPOINT_URL_STS`, `AWS_ENDPOINT_URL`, else the regional
    /// one (the global one without a region).
    fn sts_endpoint(&self) -> String {
        if let Some(u) = self
            .env
            .get("AWS_ENDPOINT_URL_STS")
            .or_else(|| self.env.get("AWS_ENDPOINT_URL"))
        {
            return u;
        }
        match self.region() {
            Some((r, _)) => format!("https://sts.{r}.{}", super::dns_suffix(&r)),
            None => "https://sts.amazonaws.com".to_owned(),
        }
    }

    /// Current credentials: cached, or from the chain.
    ///
    /// # Errors
    /// When the chain has none (and no cached ones are still valid).
    pub async fn credentials(&self) -> Result<Arc<AwsCredentials>, ChainError> {
        if let Some(f) = &self.fixed {
            return Ok(Arc::clone(f));
        }
        // One resolution at a time; callers meanwhile wait for its result.
        let mut cached = self.cached.lock().await;
        let now = Instant::now();
        if let Some(c) = cached.as_ref()
            && now < c.refresh_at
        {
            return Ok(Arc::clone(&c.creds));
        }
        match self.resolve().await {
            Ok(creds) => {
                tracing::debug!(
                    source = %creds.source,
                    temporary = creds.expiration.is_some(),
                    "AWS credentials resolved"
                );
                let creds = Arc::new(creds);
                let (refresh_at, expires_at) = schedule(creds.expiration, now);
                *cached = Some(Cached {
                    creds: Arc::clone(&creds),
                    refresh_at,
                    expires_at,
                });
                Ok(creds)
            }
            Err(e) => match cached.as_ref() {
                // Still valid for a while: use them, try again at the next call.
                Some(c)
                    if c.expires_at
                        .is_none_or(|t| now + Duration::from_secs(1) < t) =>
                {
                    tracing::warn!(
                        source = %c.creds.source,
                        reason = %e.reason,
                        "refreshing AWS credentials failed; using the current ones"
                    );
                    Ok(Arc::clone(&c.creds))
                }
                _ => {
                    *cached = None;
                    Err(e)
                }
            },
        }
    }

    /// Forget the cached credentials (AWS rejected them).
    pub async fn invalidate(&self) {
        *self.cached.lock().await = None;
    }

    /// Walk the chain once.
    async fn resolve(&self) -> Result<AwsCredentials, ChainError> {
        let env = &self.env;
        // 2. Environment.
        match (
            env.get("AWS_ACCESS_KEY_ID"),
            env.get("AWS_SECRET_ACCESS_KEY"),
        ) {
            (Some(id), Some(secret)) => {
                return Ok(AwsCredentials {
                    access_key_id: id,
                    secret_access_key: Secret::from(secret),
                    session_token: env.get("AWS_SESSION_TOKEN").map(Secret::from),
                    expiration: None,
                    source: "environment".into(),
                    renewable: false,
                });
            }
            (Some(_), None) | (None, Some(_)) => {
                return Err(ChainError::new(
                    Failure::Denied,
                    "AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY must be set together",
                ));
            }
            (None, None) => {}
        }
        // 3. The shared files.
        let (name, explicit) = self.profile_name();
        let (found, looked) = profile::load(env, &name)
            .map_err(|e| ChainError::new(Failure::Denied, format!("profile {name}: {e}")))?;
        match found {
            Some(p) => {
                if let Some(c) = self.profile_credentials(&name, &p).await? {
                    return Ok(c);
                }
            }
            None if explicit => {
                let files: Vec<String> = looked.iter().map(|p| p.display().to_string()).collect();
                return Err(ChainError::new(
                    Failure::Denied,
                    if files.is_empty() {
                        format!("profile {name} not found: no AWS config or credentials file")
                    } else {
                        format!("profile {name} not found in {}", files.join(", "))
                    },
                ));
            }
            None => {}
        }
        // 4. Web identity.
        if let (Some(file), Some(role)) = (
            env.get("AWS_WEB_IDENTITY_TOKEN_FILE"),
            env.get("AWS_ROLE_ARN"),
        ) {
            let session = env.get("AWS_ROLE_SESSION_NAME");
            return self
                .web_identity(&file, &role, session.as_deref(), "web identity")
                .await;
        }
        // 5. The container endpoint.
        if let Some(url) = self.container_url()? {
            return self.container(&url).await;
        }
        // 6. Instance metadata.
        if env
            .get("AWS_EC2_METADATA_DISABLED")
            .is_some_and(|v| v.eq_ignore_ascii_case("true"))
        {
            return Err(ChainError::new(
                Failure::Denied,
                "no AWS credentials found (environment, shared files, web identity, \
                 container endpoint; instance metadata disabled by AWS_EC2_METADATA_DISABLED)",
            ));
        }
        self.imds().await.map_err(|e| {
            ChainError::new(
                e.kind,
                format!(
                    "no AWS credentials found (environment, shared files, web identity, \
                     container endpoint) and instance metadata failed: {}",
                    e.reason
                ),
            )
        })
    }

    /// Credentials of a profile; `None` when it has none (only settings).
    async fn profile_credentials(
        &self,
        name: &str,
        p: &profile::Profile,
    ) -> Result<Option<AwsCredentials>, ChainError> {
        let source = format!("profile {name}");
        if let (Some(id), Some(secret)) =
            (p.get("aws_access_key_id"), p.get("aws_secret_access_key"))
        {
            return Ok(Some(AwsCredentials {
                access_key_id: id.to_owned(),
                secret_access_key: Secret::from_str_value(secret),
                session_token: p.get("aws_session_token").map(Secret::from_str_value),
                expiration: None,
                source,
                renewable: true,
            }));
        }
        if let (Some(role), Some(file)) = (p.get("role_arn"), p.get("web_identity_token_file")) {
            let session = p.get("role_session_name");
            return self
                .web_identity(file, role, session, &source)
                .await
                .map(Some);
        }
        for (key, what) in [
            (
                "role_arn",
                "role_arn with source_profile or credential_source",
            ),
            ("credential_process", "credential_process"),
            ("sso_session", "AWS IAM Identity Center (sso_session)"),
            ("sso_start_url", "AWS IAM Identity Center (sso_start_url)"),
        ] {
            if p.has(key) {
                return Err(ChainError::new(
                    Failure::Denied,
                    format!(
                        "{source}: {what} is not supported; use keys, web identity, or another source"
                    ),
                ));
            }
        }
        if p.has("aws_access_key_id") || p.has("aws_secret_access_key") {
            return Err(ChainError::new(
                Failure::Denied,
                format!(
                    "{source}: aws_access_key_id and aws_secret_access_key must be set together"
                ),
            ));
        }
        Ok(None)
    }

    /// STS `AssumeRoleWithWebIdentity` (unsigned) with the token in `file`.
    async fn web_identity(
        &self,
        file: &str,
        role_arn: &str,
        session: Option<&str>,
        source: &str,
    ) -> Result<AwsCredentials, ChainError> {
        let mut token = Zeroizing::new(std::fs::read(file).map_err(|e| {
            ChainError::new(
                Failure::Denied,
                format!("{source}: cannot read the token file {file}: {e}"),
            )
        })?);
        trim_one_newline(&mut token);
        let token = std::str::from_utf8(&token).map_err(|_| {
            ChainError::new(
                Failure::Denied,
                format!("{source}: the token file {file} is not text"),
            )
        })?;
        if token.trim().is_empty() {
            return Err(ChainError::new(
                Failure::Denied,
                format!("{source}: the token file {file} is empty"),
            ));
        }
        let session = session.map_or_else(
            || {
                let secs = SystemTime::now()
                    .duration_since(SystemTime::UNIX_EPOCH)
                    .map_or(0, |d| d.as_secs());
                format!("broker-{secs}")
            },
            str::to_owned,
        );
        let form = Zeroizing::new(
            form_urlencoded::Serializer::new(String::new())
                .append_pair("Action", "AssumeRoleWithWebIdentity")
                .append_pair("Version", "2011-06-15")
                .append_pair("RoleArn", role_arn)
                .append_pair("RoleSessionName", &session)
                .append_pair("WebIdentityToken", token.trim())
                .finish(),
        );
        let what = format!("{source} (STS AssumeRoleWithWebIdentity)");
        let mut resp = self
            .http
            .post(self.sts_endpoint())
            .header(
                reqwest::header::CONTENT_TYPE,
                "application/x-www-form-urlencoded",
            )
            .body(form.as_bytes().to_vec())
            .send()
            .await
            .map_err(|e| transport(&what, e))?;
        let status = resp.status();
        let body = read_body(&mut resp, MAX_CREDS_BODY)
            .await
            .map_err(|e| body_error(&what, e))?;
        if !status.is_success() {
            let code = xml_text(&body, "Code").and_then(|c| super::clean_type(&c));
            let kind = match (status.as_u16(), code.as_deref()) {
                (_, Some("IDPCommunicationError" | "Throttling" | "ServiceUnavailable"))
                | (429 | 500..=599, _) => Failure::Unreachable,
                (400..=499, _) => Failure::Denied,
                _ => Failure::BadReply,
            };
            return Err(ChainError::new(
                kind,
                format!(
                    "{what}: HTTP status {status}{}",
                    code.map(|c| format!(" ({c})")).unwrap_or_default()
                ),
            ));
        }
        let field = |tag: &str| {
            xml_text(&body, tag).ok_or_else(|| {
                ChainError::new(Failure::BadReply, format!("{what}: no {tag} in the reply"))
            })
        };
        let id = field("AccessKeyId")?;
        let secret = field("SecretAccessKey")?;
        let session_token = field("SessionToken")?;
        let expiration = parse_time(&field("Expiration")?).ok_or_else(|| {
            ChainError::new(Failure::BadReply, format!("{what}: invalid Expiration"))
        })?;
        Ok(AwsCredentials {
            access_key_id: id.to_string(),
            secret_access_key: Secret::from_str_value(&secret),
            session_token: Some(Secret::from_str_value(&session_token)),
            expiration: Some(expiration),
            source: source.to_owned(),
            renewable: true,
        })
    }

    /// The container endpoint's URL, if one is set; a full URI that may not be used is
    /// an error.
    fn container_url(&self) -> Result<Option<reqwest::Url>, ChainError> {
        let bad = |why: &str| {
            ChainError::new(
                Failure::Denied,
                format!("container endpoint: AWS_CONTAINER_CREDENTIALS_FULL_URI {why}"),
            )
        };
        if let Some(rel) = self.env.get("AWS_CONTAINER_CREDENTIALS_RELATIVE_URI") {
            let url = reqwest::Url::parse(ECS_HOST)
                .and_then(|b| b.join(&rel))
                .map_err(|_| {
                    ChainError::new(
                        Failure::Denied,
                        "container endpoint: invalid AWS_CONTAINER_CREDENTIALS_RELATIVE_URI",
                    )
                })?;
            return Ok(Some(url));
        }
        let Some(full) = self.env.get("AWS_CONTAINER_CREDENTIALS_FULL_URI") else {
            return Ok(None);
        };
        let url = reqwest::Url::parse(&full).map_err(|_| bad("is not a URL"))?;
        match url.scheme() {
            "https" => {}
            "http" if allowed_http_host(&url) => {}
            "http" => {
                return Err(bad(
                    "must be https, or http to a loopback address or the ECS/EKS agent",
                ));
            }
            _ => return Err(bad("must be an http or https URL")),
        }
        Ok(Some(url))
    }

    /// The container endpoint's credentials.
    async fn container(&self, url: &reqwest::Url) -> Result<AwsCredentials, ChainError> {
        let what = "container endpoint";
        let token = match self.env.get("AWS_CONTAINER_AUTHORIZATION_TOKEN_FILE") {
            Some(file) => {
                let mut t = Zeroizing::new(std::fs::read(&file).map_err(|e| {
                    ChainError::new(
                        Failure::Denied,
                        format!(
                            "{what}: cannot read AWS_CONTAINER_AUTHORIZATION_TOKEN_FILE {file}: {e}"
                        ),
                    )
                })?);
                trim_one_newline(&mut t);
                Some(t)
            }
            None => self
                .env
                .get("AWS_CONTAINER_AUTHORIZATION_TOKEN")
                .map(|t| Zeroizing::new(t.into_bytes())),
        };
        let client = if url.scheme() == "https" {
            &self.http
        } else {
            &self.local
        };
        let mut req = client
            .get(url.clone())
            .header(reqwest::header::ACCEPT, "application/json");
        if let Some(t) = token {
            let mut h = HeaderValue::from_bytes(&t).map_err(|_| {
                ChainError::new(
                    Failure::Denied,
                    format!("{what}: the authorization token cannot be sent in an HTTP header"),
                )
            })?;
            h.set_sensitive(true);
            req = req.header(AUTHORIZATION, h);
        }
        let mut resp = req.send().await.map_err(|e| transport(what, e))?;
        let status = resp.status();
        if !status.is_success() {
            let kind = match status.as_u16() {
                401 | 403 => Failure::Denied,
                408 | 429 | 500..=599 => Failure::Unreachable,
                _ => Failure::BadReply,
            };
            return Err(ChainError::new(
                kind,
                format!("{what}: HTTP status {status}"),
            ));
        }
        let body = read_body(&mut resp, MAX_CREDS_BODY)
            .await
            .map_err(|e| body_error(what, e))?;
        creds_from_json(&body, what)
    }

    /// Instance metadata, IMDSv2.
    async fn imds(&self) -> Result<AwsCredentials, ChainError> {
        let what = "instance metadata";
        let base = match self.env.get("AWS_EC2_METADATA_SERVICE_ENDPOINT") {
            Some(u) => u,
            None => match self.env.get("AWS_EC2_METADATA_SERVICE_ENDPOINT_MODE") {
                Some(m) if m.eq_ignore_ascii_case("ipv6") => IMDS_DEFAULT_V6.to_owned(),
                _ => IMDS_DEFAULT.to_owned(),
            },
        };
        let base = base.trim_end_matches('/');
        let status_err = |step: &str, status: reqwest::StatusCode| {
            let kind = match status.as_u16() {
                401 | 403 | 404 => Failure::Denied,
                500..=599 | 429 => Failure::Unreachable,
                _ => Failure::BadReply,
            };
            ChainError::new(kind, format!("{what}: {step}: HTTP status {status}"))
        };
        let mut resp = self
            .imds
            .put(format!("{base}/latest/api/token"))
            .header("x-aws-ec2-metadata-token-ttl-seconds", "21600")
            .send()
            .await
            .map_err(|e| transport(what, e))?;
        if !resp.status().is_success() {
            return Err(status_err("session token", resp.status()));
        }
        let token = read_body(&mut resp, 4096)
            .await
            .map_err(|e| body_error(what, e))?;
        let mut token = HeaderValue::from_bytes(&token).map_err(|_| {
            ChainError::new(Failure::BadReply, format!("{what}: unusable session token"))
        })?;
        token.set_sensitive(true);
        let list = format!("{base}/latest/meta-data/iam/security-credentials/");
        let mut resp = self
            .imds
            .get(&list)
            .header("x-aws-ec2-metadata-token", token.clone())
            .send()
            .await
            .map_err(|e| transport(what, e))?;
        if !resp.status().is_success() {
            return Err(status_err("role name", resp.status()));
        }
        let roles = read_body(&mut resp, 4096)
            .await
            .map_err(|e| body_error(what, e))?;
        let role = String::from_utf8_lossy(&roles)
            .lines()
            .map(str::trim)
            .find(|l| !l.is_empty())
            .map(str::to_owned)
            .ok_or_else(|| {
                ChainError::new(
                    Failure::Denied,
                    format!("{what}: the instance has no IAM role"),
                )
            })?;
        if !role
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"+=,.@_-".contains(&b))
        {
            return Err(ChainError::new(
                Failure::BadReply,
                format!("{what}: invalid role name"),
            ));
        }
        let mut resp = self
            .imds
            .get(format!("{list}{role}"))
            .header("x-aws-ec2-metadata-token", token)
            .send()
            .await
            .map_err(|e| transport(what, e))?;
        if !resp.status().is_success() {
            return Err(status_err("role credentials", resp.status()));
        }
        let body = read_body(&mut resp, MAX_CREDS_BODY)
            .await
            .map_err(|e| body_error(what, e))?;
        creds_from_json(&body, what)
    }
}

/// When cached credentials are refreshed, and when they expire.
fn schedule(expiration: Option<SystemTime>, now: Instant) -> (Instant, Option<Instant>) {
    match expiration {
        None => (now + REREAD_AFTER, None),
        Some(exp) => {
            let left = exp
                .duration_since(SystemTime::now())
                .unwrap_or(Duration::ZERO);
            let ahead = left.saturating_sub(REFRESH_BEFORE).max(left / 2);
            (now + ahead, Some(now + left))
        }
    }
}

/// `http` container endpoints: loopback, or the ECS / EKS Pod Identity agents.
fn allowed_http_host(url: &reqwest::Url) -> bool {
    let Some(host) = url.host_str() else {
        return false;
    };
    if host.eq_ignore_ascii_case("localhost") {
        return true;
    }
    match host
        .trim_start_matches('[')
        .trim_end_matches(']')
        .parse::<IpAddr>()
    {
        Ok(ip) => {
            ip.is_loopback()
                || ["169.254.170.2", "169.254.170.23", "fd00:ec2::23"]
                    .iter()
                    .any(|a| a.parse::<IpAddr>().is_ok_and(|a| a == ip))
        }
        Err(_) => false,
    }
}

/// Credentials in the JSON of the container endpoint and IMDS: `AccessKeyId`,
/// `SecretAccessKey`, `Token`, `Expiration` (and IMDS' `Code: Success`).
fn creds_from_json(body: &[u8], what: &str) -> Result<AwsCredentials, ChainError> {
    let bad = |why: &str| ChainError::new(Failure::BadReply, format!("{what}: {why}"));
    let mut json: serde_json::Value =
        serde_json::from_slice(body).map_err(|_| bad("the reply is not JSON"))?;
    let out = (|| {
        let s = |k: &str| json.get(k).and_then(serde_json::Value::as_str);
        if let Some(code) = s("Code")
            && code != "Success"
        {
            return Err(ChainError::new(
                Failure::Denied,
                format!(
                    "{what}: Code {}",
                    super::clean_type(code).unwrap_or_else(|| "(invalid)".into())
                ),
            ));
        }
        let id = s("AccessKeyId").ok_or_else(|| bad("no AccessKeyId in the reply"))?;
        let secret = s("SecretAccessKey").ok_or_else(|| bad("no SecretAccessKey in the reply"))?;
        if !id.bytes().all(|b| b.is_ascii_alphanumeric()) || id.is_empty() {
            return Err(bad("invalid AccessKeyId"));
        }
        let expiration = match s("Expiration") {
            Some(t) => Some(parse_time(t).ok_or_else(|| bad("invalid Expiration"))?),
            None => None,
        };
        Ok(AwsCredentials {
            access_key_id: id.to_owned(),
            secret_access_key: Secret::from_str_value(secret),
            session_token: s("Token").map(Secret::from_str_value),
            expiration,
            source: what.to_owned(),
            renewable: true,
        })
    })();
    wipe_json(&mut json);
    out
}

/// An RFC 3339 time (`2026-12-01T15:00:00Z`, with or without fractions).
#[must_use]
pub fn parse_time(s: &str) -> Option<SystemTime> {
    time::OffsetDateTime::parse(s.trim(), &time::format_description::well_known::Rfc3339)
        .ok()
        .map(SystemTime::from)
}

fn transport(what: &str, e: reqwest::Error) -> ChainError {
    if e.is_timeout() {
        return ChainError::new(Failure::Timeout, format!("{what}: timed out"));
    }
    ChainError::new(Failure::Unreachable, format!("{what}: {}", describe(e)))
}

fn body_error(what: &str, e: BodyError) -> ChainError {
    match e {
        BodyError::TooBig => ChainError::new(Failure::BadReply, format!("{what}: reply too large")),
        BodyError::Transport(e) => transport(what, e),
    }
}
