//! `kubernetes`: keys of Kubernetes Secrets, read through the API server.
//!
//! * **Ids** are Secretless' `SECRET#KEY`: the value of `KEY` in the Secret `SECRET` of
//!   the instance's namespace (`GET /api/v1/namespaces/{ns}/secrets/{name}`, the value
//!   base64-decoded from `.data`). Both parts are required and checked against
//!   Kubernetes' name rules, so an id cannot reach another path.
//! * **In the cluster** (the built-in instance `kubernetes`): the API server is
//!   `https://$KUBERNETES_SERVICE_HOST:$KUBERNETES_SERVICE_PORT`, authenticated with the
//!   pod's service account token (`Authorization: Bearer`) and verified with its CA, in
//!   `/var/run/secrets/kubernetes.io/serviceaccount/`. The namespace is `namespace:`, else
//!   `POD_NAMESPACE`, else the service account's `namespace` file, else `default` (as
//!   client-go decides it).
//! * **Token rotation.** Projected service account tokens are replaced on disk: the
//!   token file is `stat`ed before each request and re-read when it changed; a 401 re-reads
//!   it once and retries once.
//! * **Batches.** [`SecretProvider::get_many`] reads each Secret once for all the keys a
//!   service takes from it, so they come from one version of the Secret.
//! * **Errors.** A missing Secret (404) or a key the Secret does not have is
//!   [`SecretError::NotFound`] naming `SECRET#KEY`; 401 (after the retry) and 403 are
//!   [`SecretError::Denied`]; 5xx, 408, 429 and transport failures are
//!   [`SecretError::Unreachable`]; redirects (not followed), other statuses, a reply that
//!   is not a Secret, over [`MAX_BODY`] or not base64 are [`SecretError::BadReply`].
//!   Messages never hold a value, the token or a reply body.
//!
//! See docs/stores/kubernetes.md.

use std::{
    path::{Path, PathBuf},
    sync::Arc,
    time::{Duration, SystemTime},
};

use anyhow::Context as _;
use base64::Engine as _;
use reqwest::{
    StatusCode,
    header::{ACCEPT, AUTHORIZATION, HeaderValue},
};
use zeroize::{Zeroize, Zeroizing};

use super::{
    BoxFuture, BuiltIn, Fetched, SecretError, SecretProvider,
    conjur::{BodyError, Env, read_bounded},
    http::describe,
};
use crate::{
    config::{DEFAULT_HTTP_TIMEOUT, KubernetesProviderConfig},
    secret::Secret,
    tls::{self, PemSource, TlsSources, Verify},
};

/// Largest reply accepted: a Secret holds at most 1 MiB of data, 4/3 of that in base64,
/// plus its metadata.
pub const MAX_BODY: usize = 4 * 1024 * 1024;
/// Largest service account token file accepted.
const MAX_TOKEN: usize = 64 * 1024;
/// The pod's service account files.
pub const SERVICE_ACCOUNT_DIR: &str = "/var/run/secrets/kubernetes.io/serviceaccount";

fn process_env(name: &str) -> Option<String> {
    std::env::var(name).ok().filter(|v| !v.is_empty())
}

/// A namespace name: an RFC 1123 label (lowercase letters, digits, `-`; at most 63).
#[must_use]
pub fn valid_namespace(ns: &str) -> bool {
    is_label(ns)
}

fn is_label(s: &str) -> bool {
    let b = s.as_bytes();
    !b.is_empty()
        && b.len() <= 63
        && b.iter()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == b'-')
        && b[0] != b'-'
        && b[b.len() - 1] != b'-'
}

/// A Secret's name: an RFC 1123 subdomain (labels joined by `.`; at most 253).
fn valid_secret_name(s: &str) -> bool {
    s.len() <= 253 && s.split('.').all(is_label)
}

/// A key of a Secret's data: letters, digits, `-`, `_`, `.`; at most 253.
fn valid_key(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 253
        && s.bytes()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, b'-' | b'_' | b'.'))
        && s != "."
        && s != ".."
}

pub struct KubernetesProvider {
    name: String,
    /// The client, or why the built-in instance has none (reported at fetch time).
    inner: BuiltIn<Client>,
}

struct Client {
    /// API server URL without a trailing `/`.
    base: String,
    namespace: String,
    token_file: PathBuf,
    token: tokio::sync::Mutex<Option<Bearer>>,
    http: reqwest::Client,
    timeout: Duration,
}

/// The token as last read, and which version of the file it came from.
struct Bearer {
    header: HeaderValue,
    stamp: FileStamp,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct FileStamp {
    dev: u64,
    ino: u64,
    len: u64,
    mtime: Option<SystemTime>,
}

impl KubernetesProvider {
    /// Build the instance from its config, the process environment and the service
    /// account directory.
    ///
    /// # Errors
    /// A declared instance with missing or unusable settings (no API server, no token
    /// file, an unreadable CA). The built-in instance never fails here: it reports the
    /// problem when a credential uses it.
    pub fn new(name: &str, cfg: &KubernetesProviderConfig) -> anyhow::Result<Self> {
        Self::with_env(name, cfg, &process_env, Path::new(SERVICE_ACCOUNT_DIR))
    }

    /// [`KubernetesProvider::new`] with the environment and the service account
    /// directory given.
    ///
    /// # Errors
    /// As [`KubernetesProvider::new`].
    pub fn with_env(
        name: &str,
        cfg: &KubernetesProviderConfig,
        env: Env<'_>,
        sa_dir: &Path,
    ) -> anyhow::Result<Self> {
        Ok(Self {
            name: name.to_owned(),
            inner: BuiltIn::new(
                "kubernetes",
                name,
                cfg.builtin,
                Client::new(name, cfg, env, sa_dir),
            )?,
        })
    }

    fn client(&self, id: &str) -> Result<&Client, SecretError> {
        self.inner.get(id)
    }

    fn bad_id(&self, id: &str, reason: &str) -> SecretError {
        SecretError::BadId {
            provider: self.name.clone(),
            id: id.to_owned(),
            reason: reason.to_owned(),
        }
    }

    fn bad_reply(&self, id: &str, reason: impl Into<String>) -> SecretError {
        SecretError::BadReply {
            provider: self.name.clone(),
            id: id.to_owned(),
            reason: reason.into(),
        }
    }

    /// `SECRET#KEY`, checked.
    fn parse<'a>(&self, id: &'a str) -> Result<(&'a str, &'a str), SecretError> {
        let Some((name, key)) = id.split_once('#') else {
            return Err(self.bad_id(
                id,
                "expected SECRET#KEY (the Secret's name and the key in its data)",
            ));
        };
        if name.is_empty() || key.is_empty() {
            return Err(self.bad_id(id, "expected SECRET#KEY: both parts are required"));
        }
        if !valid_secret_name(name) {
            return Err(self.bad_id(
                id,
                "not a Secret name (lowercase letters, digits, `-` and `.`)",
            ));
        }
        if !valid_key(key) {
            return Err(self.bad_id(id, "not a Secret key (letters, digits, `-`, `_` and `.`)"));
        }
        Ok((name, key))
    }

    /// Values of several keys, reading each Secret once.
    async fn fetch_many(&self, ids: &[&str]) -> Result<Vec<Fetched>, SecretError> {
        let Some(first) = ids.first() else {
            return Ok(Vec::new());
        };
        let c = self.client(first)?;
        let parsed = ids
            .iter()
            .map(|id| self.parse(id))
            .collect::<Result<Vec<_>, _>>()?;
        let mut out: Vec<Option<Fetched>> = vec![None; ids.len()];
        for (i, (name, _)) in parsed.iter().enumerate() {
            if out[i].is_some() {
                continue;
            }
            // Every id of this Secret, from one read of it.
            let same: Vec<usize> = (i..ids.len()).filter(|j| parsed[*j].0 == *name).collect();
            let mut data = c.secret(self, ids[i], name).await?;
            for j in same {
                let (_, key) = parsed[j];
                out[j] = Some(self.value(ids[j], &mut data, key)?);
            }
            wipe_json(&mut data);
        }
        Ok(out.into_iter().flatten().collect())
    }

    /// The value of `key` in a Secret's `data`.
    fn value(
        &self,
        id: &str,
        data: &mut serde_json::Value,
        key: &str,
    ) -> Result<Fetched, SecretError> {
        let Some(v) = data.get(key) else {
            return Err(SecretError::NotFound {
                provider: self.name.clone(),
                id: id.to_owned(),
            });
        };
        let Some(b64) = v.as_str() else {
            return Err(self.bad_reply(id, format!("`data.{key}` is not a string")));
        };
        let bytes = base64::engine::general_purpose::STANDARD
            .decode(b64)
            .map_err(|_| self.bad_reply(id, format!("`data.{key}` is not base64")))?;
        Ok(Fetched::new(Secret::new(bytes)))
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

    fn err_status(&self, id: &str, status: StatusCode) -> SecretError {
        let reason = format!("HTTP status {status}");
        SecretError::from_status(&self.name, id, status.as_u16(), reason)
    }
}

impl Client {
    fn new(
        name: &str,
        cfg: &KubernetesProviderConfig,
        env: Env<'_>,
        sa_dir: &Path,
    ) -> anyhow::Result<Self> {
        let api = match &cfg.api_server {
            Some(u) => u.clone(),
            None => {
                let (Some(host), Some(port)) = (
                    env("KUBERNETES_SERVICE_HOST"),
                    env("KUBERNETES_SERVICE_PORT"),
                ) else {
                    anyhow::bail!(
                        "provider {name}: no API server: set providers.{name}.apiServer, or run \
                         in a pod (KUBERNETES_SERVICE_HOST and KUBERNETES_SERVICE_PORT)"
                    );
                };
                if host.contains(':') {
                    format!("https://[{host}]:{port}")
                } else {
                    format!("https://{host}:{port}")
                }
            }
        };
        let parsed = reqwest::Url::parse(&api).ok();
        anyhow::ensure!(
            parsed
                .as_ref()
                .is_some_and(|u| matches!(u.scheme(), "http" | "https") && u.has_host()),
            "provider {name}: the API server is not an http(s) URL"
        );
        let base = api.trim_end_matches('/').to_owned();

        let token_file = cfg
            .token_file
            .clone()
            .unwrap_or_else(|| sa_dir.join("token"));
        std::fs::metadata(&token_file).with_context(|| {
            format!(
                "provider {name}: service account token file {}",
                token_file.display()
            )
        })?;

        let namespace = match &cfg.namespace {
            Some(ns) => ns.clone(),
            None => match env("POD_NAMESPACE") {
                Some(ns) => ns,
                None => std::fs::read_to_string(sa_dir.join("namespace"))
                    .ok()
                    .map(|s| s.trim().to_owned())
                    .filter(|s| !s.is_empty())
                    .unwrap_or_else(|| "default".to_owned()),
            },
        };
        anyhow::ensure!(
            valid_namespace(&namespace),
            "provider {name}: invalid namespace (lowercase letters, digits and `-`, at most 63 \
             characters)"
        );

        let timeout = cfg.timeout.unwrap_or(DEFAULT_HTTP_TIMEOUT);
        // The configured CA, else the service account's, else the system roots.
        let sa_ca = sa_dir.join("ca.crt");
        let ca_path = cfg
            .ca_file
            .clone()
            .or_else(|| sa_ca.exists().then_some(sa_ca));
        let tls = tls::client_config_from(TlsSources {
            verify: Verify::Full,
            ca: ca_path.as_deref().map(PemSource::ConfigFile),
            with_system_roots: false,
            client_cert: None,
        })
        .map_err(|e| anyhow::anyhow!("provider {name}: API server CA: {e}"))?;
        let http = crate::secrets::store_client(Arc::unwrap_or_clone(tls), timeout)
            .build()
            .with_context(|| format!("provider {name}: cannot create the HTTP client"))?;
        Ok(Self {
            base,
            namespace,
            token_file,
            token: tokio::sync::Mutex::new(None),
            http,
            timeout,
        })
    }

    /// The `data` object of Secret `name` (an empty object when it has none).
    async fn secret(
        &self,
        p: &KubernetesProvider,
        id: &str,
        name: &str,
    ) -> Result<serde_json::Value, SecretError> {
        // Both are checked names: nothing to encode.
        let url = format!(
            "{}/api/v1/namespaces/{}/secrets/{name}",
            self.base, self.namespace
        );
        let mut resp = None;
        for attempt in 0..2 {
            let header = self.bearer(p, id, attempt > 0).await?;
            let r = self
                .http
                .get(url.as_str())
                .header(ACCEPT, "application/json")
                .header(AUTHORIZATION, header)
                .send()
                .await
                .map_err(|e| p.transport(id, e, self.timeout))?;
            if r.status() == StatusCode::UNAUTHORIZED && attempt == 0 {
                tracing::debug!(provider = %p.name, "token refused (401): reading the token file again");
                continue;
            }
            resp = Some(r);
            break;
        }
        let Some(resp) = resp else {
            return Err(p.err_status(id, StatusCode::UNAUTHORIZED));
        };
        let status = resp.status();
        if !status.is_success() {
            return Err(p.err_status(id, status));
        }
        let body = read_bounded(resp, MAX_BODY).await.map_err(|e| match e {
            BodyError::TooBig(max) => p.bad_reply(id, format!("reply larger than {max} bytes")),
            BodyError::Transport(e) => p.transport(id, e, self.timeout),
        })?;
        let mut v: serde_json::Value =
            serde_json::from_slice(&body).map_err(|_| p.bad_reply(id, "the reply is not JSON"))?;
        let is_secret = v.get("kind").and_then(serde_json::Value::as_str) == Some("Secret");
        let data = match v.get_mut("data") {
            Some(d @ serde_json::Value::Object(_)) => Some(std::mem::take(d)),
            None | Some(serde_json::Value::Null) => {
                Some(serde_json::Value::Object(serde_json::Map::new()))
            }
            Some(_) => None,
        };
        wipe_json(&mut v);
        match data {
            Some(d) if is_secret => Ok(d),
            Some(mut d) => {
                wipe_json(&mut d);
                Err(p.bad_reply(id, "the reply is not a Secret"))
            }
            None => Err(p.bad_reply(id, "the reply's `data` is not an object")),
        }
    }

    /// `Bearer <token>`, re-read when the file changed (or always with `reread`).
    async fn bearer(
        &self,
        p: &KubernetesProvider,
        id: &str,
        reread: bool,
    ) -> Result<HeaderValue, SecretError> {
        use std::os::unix::fs::MetadataExt as _;
        let path = &self.token_file;
        let io_err = |e: &std::io::Error| {
            let reason = format!("service account token file {}: {e}", path.display());
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
        };
        let mut slot = self.token.lock().await;
        let md = tokio::fs::metadata(path).await.map_err(|e| io_err(&e))?;
        let stamp = FileStamp {
            dev: md.dev(),
            ino: md.ino(),
            len: md.len(),
            mtime: md.modified().ok(),
        };
        if !reread
            && let Some(b) = slot.as_ref()
            && b.stamp == stamp
        {
            return Ok(b.header.clone());
        }
        let raw = read_token(path).await.map_err(|e| io_err(&e))?;
        let token = raw.trim_ascii();
        let denied = |reason: &str| SecretError::Denied {
            provider: p.name.clone(),
            id: id.to_owned(),
            reason: format!("service account token file {}: {reason}", path.display()),
        };
        if token.is_empty() {
            return Err(denied("empty"));
        }
        if token.len() > MAX_TOKEN {
            return Err(denied("too large"));
        }
        let mut text = Zeroizing::new(Vec::with_capacity(7 + token.len()));
        text.extend_from_slice(b"Bearer ");
        text.extend_from_slice(token);
        let mut header = HeaderValue::from_bytes(&text)
            .map_err(|_| denied("the token cannot be sent in an HTTP header"))?;
        header.set_sensitive(true);
        *slot = Some(Bearer {
            header: header.clone(),
            stamp,
        });
        Ok(header)
    }
}

/// The token file, at most one byte more than [`MAX_TOKEN`] read.
async fn read_token(path: &Path) -> std::io::Result<Zeroizing<Vec<u8>>> {
    use tokio::io::AsyncReadExt as _;
    let f = tokio::fs::File::open(path).await?;
    let mut buf = Zeroizing::new(Vec::with_capacity(2048));
    f.take(MAX_TOKEN as u64 + 1).read_to_end(&mut buf).await?;
    Ok(buf)
}

fn wipe_json(v: &mut serde_json::Value) {
    match v {
        serde_json::Value::String(s) => s.zeroize(),
        serde_json::Value::Array(a) => a.iter_mut().for_each(wipe_json),
        serde_json::Value::Object(m) => m.values_mut().for_each(wipe_json),
        _ => {}
    }
}

impl SecretProvider for KubernetesProvider {
    fn name(&self) -> &str {
        &self.name
    }

    fn get<'a>(&'a self, id: &'a str) -> BoxFuture<'a, Result<Fetched, SecretError>> {
        Box::pin(async move {
            let mut v = self.fetch_many(std::slice::from_ref(&id)).await?;
            v.pop().ok_or_else(|| self.bad_reply(id, "no value"))
        })
    }

    fn get_many<'a>(
        &'a self,
        ids: &'a [&'a str],
    ) -> BoxFuture<'a, Result<Vec<Fetched>, SecretError>> {
        Box::pin(self.fetch_many(ids))
    }
}

#[cfg(test)]
#[path = "kubernetes_tests.rs"]
mod tests;
