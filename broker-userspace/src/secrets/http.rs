//! `http`: GET a secret from an HTTP(S) secrets server.
//!
//! The id is an absolute `http(s)://` URL, or a path relative to the instance's
//! `baseUrl`. An optional `#field` suffix selects a field of a JSON reply, with dotted
//! paths into nested objects (`#data.password`) and numeric indexes into arrays
//! (`#keys.0`), or, when the field starts with `/`, a JSON pointer (RFC 6901:
//! `#/data/password`, `#/keys/0`, `~1` for `/` and `~0` for `~` inside a name); without
//! it the raw body is the value, with one trailing `"\n"` or `"\r\n"` removed. A string
//! field is used as is; numbers and booleans as their text; objects and arrays as
//! compact JSON ([`json_field`], shared with the `aws` provider).
//!
//! The reply's `Cache-Control` sets the value's expiry ([`Fetched::expires_in`]):
//! `max-age=N` keeps it at most N seconds, `no-store` or `no-cache` not at all
//! (concurrent requests still share the fetch). `broker.cacheTTL` still caps it.
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
//! the instance's `caFile` when set; `certFile`/`keyFile` present a client certificate
//! (mutual TLS).

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
            client_cert: cfg
                .client_cert
                .as_ref()
                .map(|(c, k)| (c.as_path(), k.as_path())),
        })
        .map_err(|e| {
            let what = if cfg.client_cert.is_some() {
                "caFile/certFile/keyFile"
            } else {
                "caFile"
            };
            anyhow::anyhow!("provider {name}: {what}: {e}")
        })?;
        let builder = crate::secrets::store_client(Arc::unwrap_or_clone(tls), timeout);
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
        let reason = format!("HTTP status {status}");
        SecretError::from_status(&self.name, id, status.as_u16(), reason)
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

    async fn fetch(&self, id: &str) -> Result<Fetched, SecretError> {
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
        if field.is_none() && is_html(resp.headers()) {
            // A proxy's or captive portal's page answered with 200 is not a password.
            return Err(self.err_reply(
                id,
                "the store answered with an HTML page (Content-Type: text/html), not a value",
            ));
        }
        let expires_in = cache_control(resp.headers());
        let mut body = read_body(&mut resp, MAX_BODY).await.map_err(|e| match e {
            BodyError::TooBig => self.err_reply(id, format!("reply larger than {MAX_BODY} bytes")),
            BodyError::Transport(e) => self.transport(id, e),
        })?;
        let value = match field {
            None => {
                trim_one_newline(&mut body);
                Secret::new(std::mem::take(&mut *body))
            }
            Some(field) => json_field(&body, field, "reply")
                .map(Secret::new)
                .map_err(|reason| self.err_reply(id, reason))?,
        };
        Ok(Fetched { value, expires_in })
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

/// Why a reply body could not be read.
pub(crate) enum BodyError {
    /// Over the limit (by `Content-Length` or as it arrived).
    TooBig,
    /// The transfer failed (or timed out).
    Transport(reqwest::Error),
}

/// A reply body, at most `max` bytes, in a buffer that is wiped when dropped (and
/// whenever it grows).
pub(crate) async fn read_body(
    resp: &mut reqwest::Response,
    max: usize,
) -> Result<Zeroizing<Vec<u8>>, BodyError> {
    let hint = resp.content_length().unwrap_or(0);
    if hint > max as u64 {
        return Err(BodyError::TooBig);
    }
    let mut body = Zeroizing::new(Vec::with_capacity(
        usize::try_from(hint).unwrap_or(0).max(256),
    ));
    while let Some(chunk) = resp.chunk().await.map_err(BodyError::Transport)? {
        if body.len() + chunk.len() > max {
            return Err(BodyError::TooBig);
        }
        if body.capacity() < body.len() + chunk.len() {
            // Grow by hand so the old buffer is wiped rather than freed as is.
            let mut bigger = Vec::with_capacity((body.len() + chunk.len()).max(body.len() * 2));
            bigger.extend_from_slice(&body);
            std::mem::replace(&mut *body, bigger).zeroize();
        }
        body.extend_from_slice(&chunk);
    }
    Ok(body)
}

/// The expiry a reply's `Cache-Control` gives its value: `no-store` or `no-cache`:
/// zero (not kept); `max-age=N`: N seconds; otherwise none. Directives are
/// case-insensitive and may be spread over several headers; `no-store` wins over
/// `max-age`, and a malformed `max-age` is ignored.
pub(crate) fn cache_control(headers: &reqwest::header::HeaderMap) -> Option<Duration> {
    let mut max_age = None;
    for value in headers.get_all(reqwest::header::CACHE_CONTROL) {
        let Ok(text) = value.to_str() else { continue };
        for directive in text.split(',') {
            let (name, arg) = match directive.split_once('=') {
                Some((n, a)) => (n.trim(), Some(a.trim().trim_matches('"'))),
                None => (directive.trim(), None),
            };
            if name.eq_ignore_ascii_case("no-store") || name.eq_ignore_ascii_case("no-cache") {
                return Some(Duration::ZERO);
            }
            if name.eq_ignore_ascii_case("max-age")
                && let Some(secs) = arg.and_then(|a| a.parse::<u64>().ok())
            {
                // Two max-age directives: the shorter one.
                max_age = Some(max_age.map_or(secs, |m: u64| m.min(secs)));
            }
        }
    }
    max_age.map(Duration::from_secs)
}

/// The value of `field` in the JSON document `body` (a `what`, named in errors): a
/// dotted path (`data.password`, `keys.0`), or a JSON pointer when it starts with `/`
/// (RFC 6901: `/data/password`). A string is used as is, numbers and booleans as their
/// text, arrays and objects as compact JSON; `null` or a missing field is an error.
/// Every string of the parsed document is wiped before returning.
///
/// # Errors
/// The reason, naming `what` and the field, never a value.
pub(crate) fn json_field(body: &[u8], field: &str, what: &str) -> Result<Vec<u8>, String> {
    let mut json: serde_json::Value = serde_json::from_slice(body)
        .map_err(|_| format!("the {what} is not JSON, so field `{field}` cannot be read"))?;
    let found = if field.starts_with('/') {
        json.pointer(field)
    } else {
        lookup(&json, field)
    };
    let value = found
        .ok_or_else(|| format!("field `{field}` is not in the {what}"))
        .and_then(|v| match v {
            serde_json::Value::String(s) => Ok(s.as_bytes().to_vec()),
            serde_json::Value::Number(n) => Ok(n.to_string().into_bytes()),
            serde_json::Value::Bool(b) => Ok(b.to_string().into_bytes()),
            serde_json::Value::Null => Err(format!("field `{field}` is null")),
            v @ (serde_json::Value::Array(_) | serde_json::Value::Object(_)) => {
                serde_json::to_vec(v).map_err(|_| format!("field `{field}` cannot be encoded"))
            }
        });
    wipe_json(&mut json);
    value
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
pub(crate) fn wipe_json(v: &mut serde_json::Value) {
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
        Box::pin(self.fetch(id))
    }

    fn timeout(&self) -> Option<Duration> {
        Some(self.timeout)
    }
}

/// Whether a reply says it is an HTML page.
fn is_html(headers: &reqwest::header::HeaderMap) -> bool {
    headers
        .get(reqwest::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split(';').next())
        .is_some_and(|t| {
            let t = t.trim();
            t.eq_ignore_ascii_case("text/html") || t.eq_ignore_ascii_case("application/xhtml+xml")
        })
}

#[cfg(test)]
mod tests {
    use reqwest::header::{CACHE_CONTROL, HeaderMap, HeaderValue};

    use super::*;

    fn cc(values: &[&str]) -> Option<Duration> {
        let mut h = HeaderMap::new();
        for v in values {
            h.append(CACHE_CONTROL, HeaderValue::from_str(v).unwrap());
        }
        cache_control(&h)
    }

    #[test]
    fn cache_control_gives_the_expiry() {
        let secs = |s| Some(Duration::from_secs(s));
        assert_eq!(cc(&[]), None);
        assert_eq!(cc(&["max-age=30"]), secs(30));
        assert_eq!(cc(&["private, Max-Age = \"45\""]), secs(45));
        assert_eq!(cc(&["max-age=0"]), secs(0));
        assert_eq!(cc(&["no-store"]), secs(0));
        assert_eq!(cc(&["max-age=30, NO-STORE"]), secs(0));
        assert_eq!(cc(&["no-cache"]), secs(0));
        assert_eq!(cc(&["max-age=30", "max-age=10"]), secs(10));
        assert_eq!(cc(&["max-age=-1"]), None);
        assert_eq!(cc(&["max-age=soon", "public"]), None);
        assert_eq!(cc(&["s-maxage=5"]), None);
    }

    #[test]
    fn json_fields_dotted_and_pointer() {
        let doc = br#"{"data":{"password":"pw","n":5,"ok":true,"a/b":"slash","t~":"tilde","list":["x",{"k":"v"}],"nil":null},"":"empty"}"#;
        let f = |field: &str| json_field(doc, field, "reply");
        assert_eq!(f("data.password").unwrap(), b"pw");
        assert_eq!(f("/data/password").unwrap(), b"pw");
        assert_eq!(f("data.n").unwrap(), b"5");
        assert_eq!(f("/data/ok").unwrap(), b"true");
        assert_eq!(f("/data/a~1b").unwrap(), b"slash");
        assert_eq!(f("/data/t~0").unwrap(), b"tilde");
        assert_eq!(f("/data/list/1/k").unwrap(), b"v");
        assert_eq!(f("data.list.0").unwrap(), b"x");
        assert_eq!(f("/data/list/1").unwrap(), br#"{"k":"v"}"#);
        assert_eq!(f("/").unwrap(), b"empty");
        for (bad, why) in [
            ("/data/missing", "is not in the reply"),
            ("/data/list/2", "is not in the reply"),
            ("/data/list/01", "is not in the reply"),
            ("/data/a/b", "is not in the reply"),
            ("data.nil", "is null"),
            ("/data/nil", "is null"),
        ] {
            let e = f(bad).unwrap_err();
            assert!(e.contains(why) && e.contains(bad), "{bad}: {e}");
            assert!(!e.contains("pw\""), "{e}");
        }
        let e = json_field(b"pw not json", "/x", "reply").unwrap_err();
        assert!(e.contains("not JSON") && !e.contains("pw"), "{e}");
    }

    #[test]
    fn an_html_page_is_not_a_raw_value() {
        let with = |ct: &str| {
            let mut h = HeaderMap::new();
            h.insert(
                reqwest::header::CONTENT_TYPE,
                HeaderValue::from_str(ct).unwrap(),
            );
            is_html(&h)
        };
        assert!(with("text/html"));
        assert!(with("Text/HTML; charset=utf-8"));
        assert!(with("application/xhtml+xml"));
        assert!(!with("text/plain"));
        assert!(!with("application/octet-stream"));
        assert!(!is_html(&HeaderMap::new()));
    }

    #[test]
    fn client_certificate_files_are_checked_when_built() {
        let dir = tempfile::tempdir().unwrap();
        let cfg = HttpProviderConfig {
            client_cert: Some((
                dir.path().join("missing.crt"),
                dir.path().join("missing.key"),
            )),
            timeout: Duration::from_secs(1),
            ..HttpProviderConfig::default()
        };
        let e = HttpProvider::new("uts", &cfg).err().unwrap().to_string();
        assert!(
            e.contains("provider uts") && e.contains("missing.crt"),
            "{e}"
        );
    }
}
