//! `aws`: AWS Secrets Manager (`GetSecretValue`).
//!
//! The id is a secret's name or ARN (Secretless' `aws` provider id, as is), optionally
//! followed by
//! * `?versionStage=LABEL` and/or `?versionId=ID` (joined with `&`): which version
//!   (`AWSCURRENT` by default; `AWSPREVIOUS` after a rotation);
//! * `#FIELD`: the value must be JSON, and the value is that field: a dotted path
//!   (`#db.password`, `#hosts.0`) or a JSON pointer (`#/db/password`); the same rules
//!   as the `http` provider ([`super::http::json_field`]).
//!
//! `db/creds?versionStage=AWSPREVIOUS#password`. Secret names cannot contain `?` or
//! `#` (AWS allows letters, digits and `/_+=.@-`), so the forms cannot be confused.
//!
//! The value is `SecretString` as is, or `SecretBinary` base64-decoded. The request is
//! `POST /` with `X-Amz-Target: secretsmanager.GetSecretValue` and
//! `Content-Type: application/x-amz-json-1.1`, signed with SigV4 (`aws-sigv4`) for the
//! service `secretsmanager`, to `endpoint` (else `AWS_ENDPOINT_URL_SECRETS_MANAGER`,
//! `AWS_ENDPOINT_URL`, else `https://secretsmanager.REGION.amazonaws.com`). The region
//! is `region`, else the chain's (`AWS_REGION`, `AWS_DEFAULT_REGION`, the profile's
//! `region`), else the region of an ARN id. Credentials come from [`chain`].
//!
//! Errors (the AWS error type from `X-Amzn-ErrorType`, the JSON `__type` or an XML
//! `<Code>`; AWS's message is never used, it can echo the request):
//! `ResourceNotFoundException` is [`SecretError::NotFound`]; access denied, unknown key,
//! bad signature, expired token are [`SecretError::Denied`]; throttling, 5xx and
//! connection failures are [`SecretError::Unreachable`]; a timeout is
//! [`SecretError::Timeout`]; any other error type or status, a redirect, a reply over
//! [`MAX_BODY`] or without a value is [`SecretError::BadReply`] naming the type. When
//! AWS rejects renewable credentials as expired or unknown, they are fetched again and
//! the request is retried once.
//!
//! [`SecretProvider::get_many`] reads each secret (and version) once for all the fields
//! a service takes from it, so a username and a password always come from the same
//! version, even during a rotation.

pub mod chain;
pub mod profile;

use std::{collections::HashMap, sync::Arc, time::Duration, time::SystemTime};

use anyhow::Context as _;
use base64::Engine as _;
use reqwest::header::{CONTENT_TYPE, HeaderMap, HeaderName, HeaderValue};
use zeroize::Zeroizing;

use self::chain::{AwsCredentials, Chain, ChainError, Failure};
use super::{
    BoxFuture, Fetched, SecretError, SecretProvider,
    http::{BodyError, describe, json_field, read_body, wipe_json},
};
use crate::{
    config::AwsProviderConfig,
    secret::Secret,
    tls::{self, TlsOptions, Verify},
};

/// Largest reply accepted (a secret is at most 64 KiB, base64 of binary ~87 KiB).
pub const MAX_BODY: usize = 1024 * 1024;
const TARGET: &str = "secretsmanager.GetSecretValue";
const JSON_11: &str = "application/x-amz-json-1.1";
const SERVICE: &str = "secretsmanager";

/// Error types meaning "these credentials do not work (any more)": renewable
/// credentials are fetched again and the call retried once.
const RENEW_TYPES: &[&str] = &[
    "ExpiredTokenException",
    "ExpiredToken",
    "InvalidClientTokenId",
    "UnrecognizedClientException",
    "InvalidSignatureException",
    "SignatureDoesNotMatch",
    "InvalidAccessKeyId",
];
const DENIED_TYPES: &[&str] = &[
    "AccessDeniedException",
    "AccessDenied",
    "IncompleteSignature",
    "MissingAuthenticationToken",
    "MissingAuthenticationTokenException",
    "AuthFailure",
    "NotAuthorized",
];
const UNREACHABLE_TYPES: &[&str] = &[
    "ThrottlingException",
    "Throttling",
    "TooManyRequestsException",
    "RequestLimitExceeded",
    "InternalServiceError",
    "InternalServiceErrorException",
    "InternalFailure",
    "InternalServerError",
    "ServiceUnavailable",
    "ServiceUnavailableException",
    "RequestTimeout",
    "RequestTimeoutException",
];

/// Where the provider reads its environment variables: the process's, or a fixed map
/// (tests). Empty values count as unset.
#[derive(Clone)]
pub struct AwsEnv(Arc<EnvLookup>);

/// How [`AwsEnv`] looks a variable up.
type EnvLookup = dyn Fn(&str) -> Option<String> + Send + Sync;

impl AwsEnv {
    /// The process environment, read at each look-up.
    #[must_use]
    pub fn process() -> Self {
        Self(Arc::new(|k| std::env::var(k).ok()))
    }

    /// A fixed environment.
    #[must_use]
    pub fn from_pairs(pairs: &[(&str, &str)]) -> Self {
        let m: HashMap<String, String> = pairs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect();
        Self(Arc::new(move |k| m.get(k).cloned()))
    }

    /// The variable's value, when set and not empty.
    #[must_use]
    pub fn get(&self, key: &str) -> Option<String> {
        (self.0)(key).filter(|v| !v.is_empty())
    }
}

/// A parsed id.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SecretRef<'a> {
    /// Name or ARN.
    pub secret_id: &'a str,
    pub version_stage: Option<String>,
    pub version_id: Option<String>,
    /// After `#`: a dotted path or a JSON pointer.
    pub field: Option<&'a str>,
}

impl SecretRef<'_> {
    /// What one `GetSecretValue` call returns: the same for ids that differ only in
    /// their field.
    fn call_key(&self) -> (&str, Option<&str>, Option<&str>) {
        (
            self.secret_id,
            self.version_stage.as_deref(),
            self.version_id.as_deref(),
        )
    }
}

/// Parse `SECRET[?versionStage=S&versionId=V][#FIELD]`.
///
/// # Errors
/// An empty secret id, an unknown or empty parameter (the reason names it).
pub fn parse_id(id: &str) -> Result<SecretRef<'_>, String> {
    let (rest, field) = match id.split_once('#') {
        Some((r, f)) => (r, Some(f).filter(|f| !f.is_empty())),
        None => (id, None),
    };
    let (secret_id, query) = match rest.split_once('?') {
        Some((s, q)) => (s, Some(q)),
        None => (rest, None),
    };
    if secret_id.is_empty() {
        return Err("no secret name or ARN before `?` or `#`".into());
    }
    let mut out = SecretRef {
        secret_id,
        version_stage: None,
        version_id: None,
        field,
    };
    for (k, v) in query
        .map(|q| form_urlencoded::parse(q.as_bytes()))
        .into_iter()
        .flatten()
    {
        let slot = if k.eq_ignore_ascii_case("versionStage") {
            &mut out.version_stage
        } else if k.eq_ignore_ascii_case("versionId") {
            &mut out.version_id
        } else {
            return Err(format!(
                "unknown parameter `{k}` (known: versionStage, versionId)"
            ));
        };
        if v.is_empty() {
            return Err(format!("parameter `{k}` is empty"));
        }
        if slot.is_some() {
            return Err(format!("parameter `{k}` is given twice"));
        }
        *slot = Some(v.into_owned());
    }
    Ok(out)
}

/// A region name as it may go into a host name.
#[must_use]
pub fn valid_region(r: &str) -> bool {
    !r.is_empty()
        && r.len() <= 64
        && r.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
}

/// The DNS suffix of a region's partition.
#[must_use]
pub fn dns_suffix(region: &str) -> &'static str {
    if region.starts_with("cn-") {
        "amazonaws.com.cn"
    } else if region.starts_with("us-isob-") {
        "sc2s.sgov.gov"
    } else if region.starts_with("us-iso-") {
        "c2s.ic.gov"
    } else if region.starts_with("eusc-") {
        "amazonaws.eu"
    } else {
        "amazonaws.com"
    }
}

/// An AWS error type as it may be printed: the name after a `#` namespace and before a
/// `:` suffix, letters, digits, `.` and `_` only, at most 64 characters.
#[must_use]
pub fn clean_type(raw: &str) -> Option<String> {
    let t = raw.rsplit('#').next().unwrap_or(raw);
    let t = t.split(':').next().unwrap_or(t).trim();
    (!t.is_empty()
        && t.len() <= 64
        && t.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'.' || b == b'_'))
    .then(|| t.to_owned())
}

/// The text of the first `<tag>...</tag>` element of an XML reply, entities decoded.
#[must_use]
pub fn xml_text(body: &[u8], tag: &str) -> Option<Zeroizing<String>> {
    let text = std::str::from_utf8(body).ok()?;
    let open = format!("<{tag}>");
    let close = format!("</{tag}>");
    let start = text.find(&open)? + open.len();
    let len = text[start..].find(&close)?;
    let raw = &text[start..start + len];
    let mut out = Zeroizing::new(String::with_capacity(raw.len()));
    let mut rest = raw;
    while let Some(i) = rest.find('&') {
        out.push_str(&rest[..i]);
        let after = &rest[i + 1..];
        let end = after.find(';')?;
        let entity = &after[..end];
        let c = match entity {
            "amp" => '&',
            "lt" => '<',
            "gt" => '>',
            "quot" => '"',
            "apos" => '\'',
            e => {
                let n = if let Some(h) = e.strip_prefix("#x").or_else(|| e.strip_prefix("#X")) {
                    u32::from_str_radix(h, 16).ok()
                } else {
                    e.strip_prefix('#').and_then(|d| d.parse().ok())
                };
                char::from_u32(n?)?
            }
        };
        out.push(c);
        rest = &after[end + 1..];
    }
    out.push_str(rest);
    Some(out)
}

/// The AWS error type of a failed reply.
fn error_type(headers: &HeaderMap, body: &[u8]) -> Option<String> {
    if let Some(t) = headers
        .get("x-amzn-errortype")
        .and_then(|v| v.to_str().ok())
        .and_then(clean_type)
    {
        return Some(t);
    }
    if let Ok(mut v) = serde_json::from_slice::<serde_json::Value>(body) {
        let t = ["__type", "code", "Code"].iter().find_map(|k| {
            v.get(*k)
                .and_then(serde_json::Value::as_str)
                .and_then(clean_type)
        });
        wipe_json(&mut v);
        return t;
    }
    xml_text(body, "Code").and_then(|c| clean_type(&c))
}

/// What a signature is for: the credential scope's region and service.
#[derive(Debug, Clone, Copy)]
pub struct Scope<'a> {
    pub region: &'a str,
    pub service: &'a str,
}

/// SigV4 headers (`x-amz-date`, `authorization`, `x-amz-security-token`) for a request
/// with `headers` (besides `host`, taken from the URL) and `body`.
///
/// # Errors
/// When the credentials cannot be used (not UTF-8) or signing fails.
pub fn sign_headers(
    method: &str,
    url: &reqwest::Url,
    headers: &[(&str, &str)],
    body: &[u8],
    scope: Scope<'_>,
    creds: &AwsCredentials,
    time: SystemTime,
) -> Result<Vec<(HeaderName, HeaderValue)>, String> {
    use aws_sigv4::{
        http_request::{SignableBody, SignableRequest, SigningSettings, sign},
        sign::v4,
    };
    let secret = creds
        .secret_access_key
        .expose_str()
        .map_err(|_| "the secret access key is not text".to_owned())?;
    let token = match &creds.session_token {
        Some(t) => Some(
            t.expose_str()
                .map_err(|_| "the session token is not text".to_owned())?
                .to_owned(),
        ),
        None => None,
    };
    // Held in wiped buffers by aws-credential-types, dropped after signing.
    let identity = aws_credential_types::Credentials::new(
        creds.access_key_id.clone(),
        secret.to_owned(),
        token,
        None,
        "broker",
    )
    .into();
    let params = v4::SigningParams::builder()
        .identity(&identity)
        .region(scope.region)
        .name(scope.service)
        .time(time)
        .settings(SigningSettings::default())
        .build()
        .map_err(|e| format!("cannot sign: {e}"))?
        .into();
    let request = SignableRequest::new(
        method,
        url.as_str(),
        headers.iter().copied(),
        SignableBody::Bytes(body),
    )
    .map_err(|e| format!("cannot sign: {e}"))?;
    let (instructions, _signature) = sign(request, &params)
        .map_err(|e| format!("cannot sign: {e}"))?
        .into_parts();
    let (signed, _params) = instructions.into_parts();
    signed
        .into_iter()
        .map(|h| {
            let name = HeaderName::from_bytes(h.name().as_bytes())
                .map_err(|_| "a signed header has an invalid name".to_owned())?;
            let mut value = HeaderValue::from_str(h.value())
                .map_err(|_| "a signed header is not a valid header value".to_owned())?;
            value.set_sensitive(h.sensitive() || name == reqwest::header::AUTHORIZATION);
            Ok((name, value))
        })
        .collect()
}

/// A failed call: the error, and AWS's error type when it gave one.
struct CallError {
    err: SecretError,
    aws_type: Option<String>,
}

pub struct AwsProvider {
    name: String,
    region: Option<String>,
    endpoint: Option<String>,
    env: AwsEnv,
    chain: Chain,
    http: reqwest::Client,
    timeout: Duration,
}

impl AwsProvider {
    /// An instance reading the process environment.
    ///
    /// # Errors
    /// When the HTTP client cannot be created.
    pub fn new(name: &str, cfg: &AwsProviderConfig) -> anyhow::Result<Self> {
        Self::with_env(name, cfg, AwsEnv::process())
    }

    /// An instance reading `env` (tests). Nothing is read or fetched until the first
    /// value is asked for.
    ///
    /// # Errors
    /// When the HTTP client cannot be created.
    pub fn with_env(name: &str, cfg: &AwsProviderConfig, env: AwsEnv) -> anyhow::Result<Self> {
        let timeout = if cfg.timeout.is_zero() {
            crate::config::DEFAULT_HTTP_TIMEOUT
        } else {
            cfg.timeout
        };
        let tls = tls::client_config(TlsOptions {
            verify: Verify::Full,
            ca_file: None,
            with_system_roots: true,
            client_cert: None,
        })
        .map_err(|e| anyhow::anyhow!("provider {name}: TLS: {e}"))?;
        let http = crate::secrets::store_client((*tls).clone(), timeout)
            .build()
            .with_context(|| format!("provider {name}: cannot create the HTTP client"))?;
        let fixed = match (&cfg.access_key_id, &cfg.secret_access_key) {
            (Some(id), Some(secret)) => Some(AwsCredentials {
                access_key_id: id.clone(),
                secret_access_key: secret.clone(),
                session_token: cfg.session_token.clone(),
                expiration: None,
                source: "configuration".into(),
                renewable: false,
            }),
            _ => None,
        };
        let chain = Chain::new(
            env.clone(),
            fixed,
            cfg.profile.clone(),
            http.clone(),
            &tls,
            timeout,
        )
        .with_context(|| format!("provider {name}: cannot create the HTTP client"))?;
        Ok(Self {
            name: name.to_owned(),
            region: cfg.region.clone(),
            endpoint: cfg.endpoint.clone(),
            env,
            chain,
            http,
            timeout,
        })
    }

    fn bad_id(&self, id: &str, reason: impl Into<String>) -> SecretError {
        SecretError::BadId {
            provider: self.name.clone(),
            id: id.to_owned(),
            reason: reason.into(),
        }
    }

    fn bad_reply(&self, id: &str, reason: impl Into<String>) -> SecretError {
        SecretError::BadReply {
            provider: self.name.clone(),
            id: id.to_owned(),
            reason: reason.into(),
        }
    }

    fn chain_error(&self, id: &str, e: ChainError) -> SecretError {
        let (provider, id) = (self.name.clone(), id.to_owned());
        let reason = format!("AWS credentials: {}", e.reason);
        match e.kind {
            Failure::Denied => SecretError::Denied {
                provider,
                id,
                reason,
            },
            Failure::Unreachable => SecretError::Unreachable {
                provider,
                id,
                reason,
            },
            Failure::Timeout => SecretError::Timeout {
                provider,
                id,
                after: self.timeout,
            },
            Failure::BadReply => SecretError::BadReply {
                provider,
                id,
                reason,
            },
        }
    }

    /// The region for `secret_id`: configured, the chain's, or the ARN's.
    fn region(&self, id: &str, secret_id: &str) -> Result<String, SecretError> {
        let (region, from) = if let Some(r) = &self.region {
            (r.clone(), "region".to_owned())
        } else if let Some(r) = self.chain.region() {
            r
        } else if let Some(r) = arn_region(secret_id) {
            (r.to_owned(), "the secret's ARN".to_owned())
        } else {
            return Err(self.bad_id(
                id,
                "no AWS region: set the provider's `region`, AWS_REGION, or a profile's \
                 region, or use the secret's ARN",
            ));
        };
        if !valid_region(&region) {
            return Err(self.bad_id(id, format!("invalid AWS region from {from}")));
        }
        Ok(region)
    }

    /// The Secrets Manager URL for `region`.
    fn endpoint(&self, id: &str, region: &str) -> Result<reqwest::Url, SecretError> {
        let (text, from) = if let Some(e) = &self.endpoint {
            (e.clone(), "endpoint")
        } else if let Some(e) = self.env.get("AWS_ENDPOINT_URL_SECRETS_MANAGER") {
            (e, "AWS_ENDPOINT_URL_SECRETS_MANAGER")
        } else if let Some(e) = self.env.get("AWS_ENDPOINT_URL") {
            (e, "AWS_ENDPOINT_URL")
        } else {
            (
                format!("https://secretsmanager.{region}.{}/", dns_suffix(region)),
                "the region",
            )
        };
        match reqwest::Url::parse(&text) {
            Ok(u) if matches!(u.scheme(), "http" | "https") && u.has_host() => Ok(u),
            _ => Err(self.bad_id(id, format!("invalid endpoint URL from {from}"))),
        }
    }

    /// The whole value (SecretString, or SecretBinary decoded) of the secret `r` names.
    async fn fetch_value(
        &self,
        id: &str,
        r: &SecretRef<'_>,
    ) -> Result<Zeroizing<Vec<u8>>, SecretError> {
        let mut req = serde_json::Map::new();
        req.insert("SecretId".into(), r.secret_id.into());
        if let Some(s) = &r.version_stage {
            req.insert("VersionStage".into(), s.as_str().into());
        }
        if let Some(v) = &r.version_id {
            req.insert("VersionId".into(), v.as_str().into());
        }
        let body = serde_json::to_vec(&serde_json::Value::Object(req))
            .map_err(|_| self.bad_id(id, "cannot encode the request"))?;
        // Credentials first: a missing profile is a clearer error than the missing
        // region that follows from it.
        let mut creds = self
            .chain
            .credentials()
            .await
            .map_err(|e| self.chain_error(id, e))?;
        let region = self.region(id, r.secret_id)?;
        let url = self.endpoint(id, &region)?;
        let mut retried = false;
        loop {
            match self.call(id, &url, &region, &creds, &body).await {
                Ok(v) => return Ok(v),
                Err(CallError { err, aws_type }) => {
                    let rejected = matches!(err, SecretError::Denied { .. });
                    if rejected && creds.renewable {
                        // The next fetch reads the source again.
                        self.chain.invalidate().await;
                    }
                    let renew = aws_type
                        .as_deref()
                        .is_some_and(|t| RENEW_TYPES.contains(&t));
                    if retried || !renew || !creds.renewable {
                        return Err(err);
                    }
                    retried = true;
                    tracing::debug!(
                        provider = %self.name,
                        source = %creds.source,
                        "AWS rejected the credentials; fetching them again"
                    );
                    creds = self
                        .chain
                        .credentials()
                        .await
                        .map_err(|e| self.chain_error(id, e))?;
                }
            }
        }
    }

    /// One signed `GetSecretValue`.
    async fn call(
        &self,
        id: &str,
        url: &reqwest::Url,
        region: &str,
        creds: &AwsCredentials,
        body: &[u8],
    ) -> Result<Zeroizing<Vec<u8>>, CallError> {
        let plain = |err| CallError {
            err,
            aws_type: None,
        };
        let signed = sign_headers(
            "POST",
            url,
            &[("content-type", JSON_11), ("x-amz-target", TARGET)],
            body,
            Scope {
                region,
                service: SERVICE,
            },
            creds,
            SystemTime::now(),
        )
        .map_err(|reason| {
            plain(SecretError::Denied {
                provider: self.name.clone(),
                id: id.to_owned(),
                reason: format!("AWS credentials ({}): {reason}", creds.source),
            })
        })?;
        let mut req = self
            .http
            .post(url.clone())
            .header(CONTENT_TYPE, JSON_11)
            .header("x-amz-target", TARGET);
        for (k, v) in signed {
            req = req.header(k, v);
        }
        let mut resp = req
            .body(body.to_vec())
            .send()
            .await
            .map_err(|e| plain(self.transport(id, e)))?;
        let status = resp.status();
        let reply = read_body(&mut resp, MAX_BODY).await.map_err(|e| {
            plain(match e {
                BodyError::TooBig => {
                    self.bad_reply(id, format!("reply larger than {MAX_BODY} bytes"))
                }
                BodyError::Transport(e) => self.transport(id, e),
            })
        })?;
        if !status.is_success() {
            let aws_type = error_type(resp.headers(), &reply);
            return Err(CallError {
                err: self.status_error(id, status, aws_type.as_deref()),
                aws_type,
            });
        }
        self.secret_value(id, &reply).map_err(plain)
    }

    /// A failed reply as an error, by AWS error type, else by status.
    fn status_error(
        &self,
        id: &str,
        status: reqwest::StatusCode,
        aws_type: Option<&str>,
    ) -> SecretError {
        let (provider, id) = (self.name.clone(), id.to_owned());
        let reason = match aws_type {
            Some(t) => format!("{t} (HTTP status {status})"),
            None => format!("HTTP status {status}"),
        };
        match aws_type {
            Some("ResourceNotFoundException") => return SecretError::NotFound { provider, id },
            Some(t) if RENEW_TYPES.contains(&t) || DENIED_TYPES.contains(&t) => {
                return SecretError::Denied {
                    provider,
                    id,
                    reason,
                };
            }
            Some(t) if UNREACHABLE_TYPES.contains(&t) => {
                return SecretError::Unreachable {
                    provider,
                    id,
                    reason,
                };
            }
            Some(_) => {
                return SecretError::BadReply {
                    provider,
                    id,
                    reason,
                };
            }
            None => {}
        }
        SecretError::from_status(&provider, &id, status.as_u16(), reason)
    }

    fn transport(&self, id: &str, e: reqwest::Error) -> SecretError {
        if e.is_timeout() {
            return SecretError::Timeout {
                provider: self.name.clone(),
                id: id.to_owned(),
                after: self.timeout,
            };
        }
        SecretError::Unreachable {
            provider: self.name.clone(),
            id: id.to_owned(),
            reason: describe(e),
        }
    }

    /// `SecretString`, or `SecretBinary` decoded, from a `GetSecretValue` reply.
    fn secret_value(&self, id: &str, reply: &[u8]) -> Result<Zeroizing<Vec<u8>>, SecretError> {
        let mut json: serde_json::Value = serde_json::from_slice(reply)
            .map_err(|_| self.bad_reply(id, "the reply is not JSON"))?;
        let out = if let Some(s) = json.get("SecretString").and_then(serde_json::Value::as_str) {
            Ok(Zeroizing::new(s.as_bytes().to_vec()))
        } else if let Some(b) = json.get("SecretBinary").and_then(serde_json::Value::as_str) {
            base64::engine::general_purpose::STANDARD
                .decode(b)
                .map(Zeroizing::new)
                .map_err(|_| self.bad_reply(id, "SecretBinary is not base64"))
        } else {
            Err(self.bad_reply(id, "the reply has neither SecretString nor SecretBinary"))
        };
        wipe_json(&mut json);
        out
    }

    /// The value an id asks for, out of the secret's whole value.
    fn pick(&self, id: &str, r: &SecretRef<'_>, value: &[u8]) -> Result<Secret, SecretError> {
        match r.field {
            None => Ok(Secret::new(value.to_vec())),
            Some(field) => json_field(value, field, "secret")
                .map(Secret::new)
                .map_err(|reason| self.bad_reply(id, reason)),
        }
    }
}

/// The region of a Secrets Manager ARN (`arn:aws:secretsmanager:REGION:ACCOUNT:secret:NAME`).
fn arn_region(secret_id: &str) -> Option<&str> {
    let mut parts = secret_id.splitn(6, ':');
    (parts.next()? == "arn").then_some(())?;
    let _partition = parts.next()?;
    (parts.next()? == SERVICE).then_some(())?;
    parts.next().filter(|r| !r.is_empty())
}

impl SecretProvider for AwsProvider {
    fn name(&self) -> &str {
        &self.name
    }

    fn get<'a>(&'a self, id: &'a str) -> BoxFuture<'a, Result<Fetched, SecretError>> {
        Box::pin(async move {
            let r = parse_id(id).map_err(|reason| self.bad_id(id, reason))?;
            let value = self.fetch_value(id, &r).await?;
            self.pick(id, &r, &value).map(Fetched::new)
        })
    }

    /// One `GetSecretValue` per secret (and version) for all the ids that read it.
    fn get_many<'a>(
        &'a self,
        ids: &'a [&'a str],
    ) -> BoxFuture<'a, Result<Vec<Fetched>, SecretError>> {
        Box::pin(async move {
            let mut refs = Vec::with_capacity(ids.len());
            for id in ids {
                refs.push(parse_id(id).map_err(|reason| self.bad_id(id, reason))?);
            }
            let mut values: Vec<(usize, Zeroizing<Vec<u8>>)> = Vec::new();
            let mut out = Vec::with_capacity(ids.len());
            for (i, (id, r)) in ids.iter().zip(&refs).enumerate() {
                let known = values
                    .iter()
                    .position(|(j, _)| refs[*j].call_key() == r.call_key());
                let at = match known {
                    Some(at) => at,
                    None => {
                        values.push((i, self.fetch_value(id, r).await?));
                        values.len() - 1
                    }
                };
                out.push(Fetched::new(self.pick(id, r, &values[at].1)?));
            }
            Ok(out)
        })
    }
}

#[cfg(test)]
mod tests;
