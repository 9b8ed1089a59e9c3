//! `http`: GET a secret from an HTTP(S) secrets server.
//!
//! The id is an absolute `http(s)://` URL, or a path relative to the instance's
//! `baseUrl`. An optional `#field` suffix selects a field of a JSON reply, with dotted
//! paths into nested objects (`#data.password`) and numeric indexes into arrays
//! (`#keys.0`); without it the raw body is the value, with one trailing `"\n"` or
//! `"\r\n"` removed. A string field is used as is; numbers and booleans as their text;
//! objects and arrays as compact JSON.
//!
//! Redirects are not followed: a 3xx is [`SecretError::BadReply`] naming the status. An
//! empty value is [`SecretError::Empty`] (checked for every provider by the store).
//!
//! 404 is [`SecretError::NotFound`]; 401 and 403 are [`SecretError::Denied`]; 5xx, 408
//! and 429, a connection or transfer failure are [`SecretError::Unreachable`]; no reply
//! within the timeout is [`SecretError::Timeout`]; any other non-2xx status, a reply
//! over [`MAX_BODY`] bytes, a non-JSON reply when a field was asked, or a missing field
//! is [`SecretError::BadReply`]. Error messages never contain the body, the token or the
//! full URL (a `baseUrl` may carry credentials in its user-info part).
//!
//! TLS is rustls with the broker's own (ring) crypto provider: the system roots, plus
//! the instance's `caFile` when set.

use std::{sync::Arc, time::Duration};

use anyhow::Context as _;
use reqwest::header::{ACCEPT, AUTHORIZATION, HeaderValue};
use zeroize::{Zeroize, Zeroizing};

use super::{BoxFuture, Fetched, SecretError, SecretProvider, file::trim_one_newline};
use crate::{
    config::HttpProviderConfig,
    secret::Secret,
    tls::{self, TlsOptions, Verify},
};

/// Largest reply body accepted.
pub const MAX_BODY: usize = 1024 * 1024;

pub struct HttpProvider {
    name: String,
    client: reqwest::Client,
    base_url: Option<String>,
    token: Option<Secret>,
    timeout: Duration,
}

impl HttpProvider {
    /// Build the instance: read `tokenFile` and `caFile`, create the HTTP client.
    ///
    /// # Errors
    /// When a file cannot be read, the CA file holds no certificate, the token cannot be
    /// sent in a header, or the client cannot be created.
    pub fn new(name: &str, cfg: &HttpProviderConfig) -> anyhow::Result<Self> {
        let token = match (&cfg.token, &cfg.token_file) {
            (Some(t), _) => Some(t.clone()),
            (None, Some(path)) => {
                let mut bytes = Zeroizing::new(std::fs::read(path).with_context(|| {
                    format!("provider {name}: cannot read tokenFile {}", path.display())
                })?);
                trim_one_newline(&mut bytes);
                anyhow::ensure!(
                    !bytes.is_empty(),
                    "provider {name}: tokenFile {} is empty",
                    path.display()
                );
                Some(Secret::new(std::mem::take(&mut *bytes)))
            }
            (None, None) => None,
        };
        if let Some(t) = &token {
            anyhow::ensure!(
                bearer(t).is_some(),
                "provider {name}: the token contains characters that cannot be sent in an \
                 HTTP header"
            );
        }
        let timeout = if cfg.timeout.is_zero() {
            crate::config::DEFAULT_HTTP_TIMEOUT
        } else {
            cfg.timeout
        };
        // Our rustls configuration (ring): reqwest is built without a crypto provider.
        // The system roots, plus the CA file's certificates when set.
        let tls = tls::client_config(TlsOptions {
            verify: Verify::Full,
            ca_file: cfg.ca_file.as_deref(),
            with_system_roots: true,
            client_cert: None,
        })
        .map_err(|e| anyhow::anyhow!("provider {name}: caFile: {e}"))?;
        let builder = reqwest::Client::builder()
            .tls_backend_preconfigured(Arc::unwrap_or_clone(tls))
            // A redirect is an error: following one to another host made that host's
            // reply the password (and sent it our request).
            .redirect(reqwest::redirect::Policy::none())
            .timeout(timeout)
            .connect_timeout(timeout)
            .user_agent(concat!("broker/", env!("CARGO_PKG_VERSION")));
        let client = builder
            .build()
            .with_context(|| format!("provider {name}: cannot create the HTTP client"))?;
        Ok(Self {
            name: name.to_owned(),
            client,
            base_url: cfg.base_url.clone(),
            token,
            timeout,
        })
    }

    fn err_reply(&self, id: &str, reason: impl Into<String>) -> SecretError {
        SecretError::BadReply {
            provider: self.name.clone(),
            id: id.to_owned(),
            reason: reason.into(),
        }
    }

    /// A non-2xx status as an error.
    fn err_status(&self, id: &str, status: reqwest::StatusCode) -> SecretError {
        let (provider, id) = (self.name.clone(), id.to_owned());
        let reason = format!("HTTP status {status}");
        match status.as_u16() {
            404 => SecretError::NotFound { provider, id },
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
            300..=399 => SecretError::BadReply {
                provider,
                id,
                reason: format!("{reason}: redirects are not followed"),
            },
            _ => SecretError::BadReply {
                provider,
                id,
                reason,
            },
        }
    }

    /// The URL for the part of an id before `#`.
    fn url(&self, target: &str) -> Result<reqwest::Url, String> {
        let is_absolute = ["http://", "https://"].iter().any(|p| {
            target
                .get(..p.len())
                .is_some_and(|s| s.eq_ignore_ascii_case(p))
        });
        let text = if is_absolute {
            target.to_owned()
        } else if let Some(base) = &self.base_url {
            format!(
                "{}/{}",
                base.trim_end_matches('/'),
                target.trim_start_matches('/')
            )
        } else {
            return Err(
                "not an absolute http:// or https:// URL, and the provider has no baseUrl".into(),
            );
        };
        reqwest::Url::parse(&text).map_err(|e| format!("invalid URL: {e}"))
    }

    async fn fetch(&self, id: &str) -> Result<Secret, SecretError> {
        let (target, field) = match id.split_once('#') {
            Some((t, f)) if !f.is_empty() => (t, Some(f)),
            Some((t, _)) => (t, None),
            None => (id, None),
        };
        let url = self.url(target).map_err(|reason| SecretError::BadId {
            provider: self.name.clone(),
            id: id.to_owned(),
            reason,
        })?;
        let mut req = self.client.get(url);
        if field.is_some() {
            req = req.header(ACCEPT, "application/json");
        }
        if let Some(t) = &self.token {
            // Checked in `new`.
            if let Some(h) = bearer(t) {
                req = req.header(AUTHORIZATION, h);
            }
        }
        let mut resp = req.send().await.map_err(|e| self.transport(id, e))?;
        let status = resp.status();
        if !status.is_success() {
            return Err(self.err_status(id, status));
        }
        let too_big = || format!("reply larger than {MAX_BODY} bytes");
        let hint = resp.content_length().unwrap_or(0);
        if hint > MAX_BODY as u64 {
            return Err(self.err_reply(id, too_big()));
        }
        let mut body = Zeroizing::new(Vec::with_capacity(
            usize::try_from(hint).unwrap_or(0).max(256),
        ));
        while let Some(chunk) = resp.chunk().await.map_err(|e| self.transport(id, e))? {
            if body.len() + chunk.len() > MAX_BODY {
                return Err(self.err_reply(id, too_big()));
            }
            if body.capacity() < body.len() + chunk.len() {
                // Grow by hand so the old buffer is wiped rather than freed as is.
                let mut bigger = Vec::with_capacity((body.len() + chunk.len()).max(body.len() * 2));
                bigger.extend_from_slice(&body);
                std::mem::replace(&mut *body, bigger).zeroize();
            }
            body.extend_from_slice(&chunk);
        }
        match field {
            None => {
                trim_one_newline(&mut body);
                Ok(Secret::new(std::mem::take(&mut *body)))
            }
            Some(field) => self.select(id, field, &body),
        }
    }

    fn select(&self, id: &str, field: &str, body: &[u8]) -> Result<Secret, SecretError> {
        let mut json: serde_json::Value = serde_json::from_slice(body).map_err(|_| {
            self.err_reply(
                id,
                format!("the reply is not JSON, so field `{field}` cannot be read"),
            )
        })?;
        let value = lookup(&json, field)
            .ok_or_else(|| self.err_reply(id, format!("field `{field}` is not in the reply")))
            .and_then(|v| match v {
                serde_json::Value::String(s) => Ok(s.as_bytes().to_vec()),
                serde_json::Value::Number(n) => Ok(n.to_string().into_bytes()),
                serde_json::Value::Bool(b) => Ok(b.to_string().into_bytes()),
                serde_json::Value::Null => {
                    Err(self.err_reply(id, format!("field `{field}` is null")))
                }
                v @ (serde_json::Value::Array(_) | serde_json::Value::Object(_)) => {
                    serde_json::to_vec(v).map_err(|_| {
                        self.err_reply(id, format!("field `{field}` cannot be encoded"))
                    })
                }
            });
        wipe_json(&mut json);
        value.map(Secret::new)
    }

    /// A transport error: a timeout, or the store unreachable with the error's causes
    /// as the reason (without the URL).
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
}

/// A transport error as text: its causes, without the URL.
pub(crate) fn describe(e: reqwest::Error) -> String {
    let e = e.without_url();
    let mut out = e.to_string();
    let mut source = std::error::Error::source(&e);
    while let Some(s) = source {
        let text = s.to_string();
        if !out.contains(&text) {
            out.push_str(": ");
            out.push_str(&text);
        }
        source = s.source();
    }
    out
}

/// `Bearer <token>` as a sensitive header value (hidden from reqwest's Debug output).
fn bearer(token: &Secret) -> Option<HeaderValue> {
    let mut raw = Zeroizing::new(Vec::with_capacity(7 + token.len()));
    raw.extend_from_slice(b"Bearer ");
    raw.extend_from_slice(token.expose());
    let mut h = HeaderValue::from_bytes(&raw).ok()?;
    h.set_sensitive(true);
    Some(h)
}

/// Follow a dotted path: object keys, or array indexes.
fn lookup<'v>(root: &'v serde_json::Value, path: &str) -> Option<&'v serde_json::Value> {
    path.split('.').try_fold(root, |cur, part| match cur {
        serde_json::Value::Object(m) => m.get(part),
        serde_json::Value::Array(a) => part.parse::<usize>().ok().and_then(|i| a.get(i)),
        _ => None,
    })
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

impl SecretProvider for HttpProvider {
    fn name(&self) -> &str {
        &self.name
    }

    fn get<'a>(&'a self, id: &'a str) -> BoxFuture<'a, Result<Fetched, SecretError>> {
        Box::pin(async move { self.fetch(id).await.map(Fetched::new) })
    }

    fn timeout(&self) -> Option<Duration> {
        Some(self.timeout)
    }
}
