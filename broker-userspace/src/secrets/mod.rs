//! Secrets: everything about fetching credential values.
//!
//! A [`SecretProvider`] turns an id (`get:` in the config) into a [`Fetched`] value.
//! Built-in kinds: `literal`, `env`, `file`, `http`. Vault, Conjur, AWS Secrets Manager
//! and Kubernetes implement the same trait.
//!
//! The [`SecretStore`] holds the provider instances of a configuration and the
//! [`cache`] (TTL or the provider's own expiry, whichever is shorter; one fetch for
//! concurrent requests of the same value). Connectors get a service's
//! [`Credentials`] from it; failures are typed ([`SecretError`], [`CredentialError`])
//! and never carry a value.

pub mod aws;
pub mod cache;
pub mod conjur;
pub mod credentials;
pub mod env;
pub mod file;
pub mod http;
pub mod kubernetes;
pub mod literal;
pub mod vault;

use std::{
    collections::{BTreeMap, HashMap},
    future::Future,
    pin::Pin,
    sync::Arc,
    time::Duration,
};

use tokio::time::Instant;

pub use self::{
    cache::Cache,
    credentials::{CredentialError, Credentials},
    env::EnvProvider,
    file::FileProvider,
    http::HttpProvider,
    literal::LiteralProvider,
    vault::VaultProvider,
};
use crate::{
    config::{Config, CredentialSource, ProviderConfig, Service},
    secret::Secret,
};

/// How long one credential fetch may take before the connection is refused.
pub const FETCH_TIMEOUT: Duration = Duration::from_secs(15);

/// A boxed future, so providers can be used as trait objects.
pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// A value as a provider returns it.
#[derive(Debug, Clone)]
pub struct Fetched {
    pub value: Secret,
    /// How long the value stays valid, when the provider knows (a lease, a token's
    /// lifetime). The cache keeps it no longer than this, nor than `broker.cacheTTL`.
    pub expires_in: Option<Duration>,
}

impl Fetched {
    /// A value with no known expiry.
    #[must_use]
    pub fn new(value: Secret) -> Self {
        Self {
            value,
            expires_in: None,
        }
    }

    /// A value valid for `expires_in`.
    #[must_use]
    pub fn expiring(value: Secret, expires_in: Duration) -> Self {
        Self {
            value,
            expires_in: Some(expires_in),
        }
    }
}

/// Why a value could not be fetched. Every message names the provider and the id
/// (through [`redact_id`]), never a value, a reply body or a token.
#[derive(Debug, Clone, thiserror::Error)]
pub enum SecretError {
    /// No provider instance of that name (or one whose kind is not built).
    #[error("provider `{provider}` is not configured (fetching `{}`)", redact_id(.id))]
    NotConfigured { provider: String, id: String },
    /// The store has no value with this id (HTTP 404, no such file or variable).
    #[error("{provider}: `{}` not found", redact_id(.id))]
    NotFound { provider: String, id: String },
    /// The store could not be reached or failed (connect error, I/O error, HTTP 5xx,
    /// 408, 429).
    #[error("{provider}: fetching `{}` failed: {reason}", redact_id(.id))]
    Unreachable {
        provider: String,
        id: String,
        reason: String,
    },
    /// The store refused us (HTTP 401 or 403, a file we may not read).
    #[error("{provider}: fetching `{}` was denied: {reason}", redact_id(.id))]
    Denied {
        provider: String,
        id: String,
        reason: String,
    },
    /// The store answered, but not with a usable value (a redirect, an unexpected
    /// status, a reply too large, not JSON, a missing or null field).
    #[error("{provider}: bad reply for `{}`: {reason}", redact_id(.id))]
    BadReply {
        provider: String,
        id: String,
        reason: String,
    },
    /// The id cannot be used by this provider (an `http` path without a `baseUrl`).
    #[error("{provider}: cannot fetch `{}`: {reason}", redact_id(.id))]
    BadId {
        provider: String,
        id: String,
        reason: String,
    },
    /// An empty file, HTTP body or environment variable: never an empty password.
    #[error("{provider}: `{}` is empty", redact_id(.id))]
    Empty { provider: String, id: String },
    /// No answer in time.
    #[error("{provider}: fetching `{}` timed out after {after:?}", redact_id(.id))]
    Timeout {
        provider: String,
        id: String,
        after: Duration,
    },
}

impl SecretError {
    /// A stable snake_case word for logs and metrics.
    #[must_use]
    pub fn kind(&self) -> &'static str {
        match self {
            Self::NotConfigured { .. } => "not_configured",
            Self::NotFound { .. } => "not_found",
            Self::Unreachable { .. } => "unreachable",
            Self::Denied { .. } => "denied",
            Self::BadReply { .. } => "bad_reply",
            Self::BadId { .. } => "bad_id",
            Self::Empty { .. } => "empty",
            Self::Timeout { .. } => "timeout",
        }
    }

    /// The provider instance the error is about.
    #[must_use]
    pub fn provider(&self) -> &str {
        match self {
            Self::NotConfigured { provider, .. }
            | Self::NotFound { provider, .. }
            | Self::Unreachable { provider, .. }
            | Self::Denied { provider, .. }
            | Self::BadReply { provider, .. }
            | Self::BadId { provider, .. }
            | Self::Empty { provider, .. }
            | Self::Timeout { provider, .. } => provider,
        }
    }
}

/// A credential id as it may be printed (access log, errors): the user-info of a URL
/// (`http://user:pass@host/...`) and any query string (`?token=...`) replaced by `***`.
/// Ids are configuration, not secrets, but a URL id can carry credentials for the
/// secret store itself.
#[must_use]
pub fn redact_id(id: &str) -> std::borrow::Cow<'_, str> {
    let has_userinfo = id.find("://").is_some_and(|i| {
        let rest = &id[i + 3..];
        let end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
        rest[..end].contains('@')
    });
    if !has_userinfo && !id.contains('?') {
        return std::borrow::Cow::Borrowed(id);
    }
    let mut out = String::with_capacity(id.len());
    let mut rest = id;
    if let Some(i) = id.find("://") {
        out.push_str(&id[..i + 3]);
        rest = &id[i + 3..];
        let end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
        if let Some(at) = rest[..end].rfind('@') {
            out.push_str("***@");
            rest = &rest[at + 1..];
        }
    }
    match rest.find('?') {
        Some(q) => {
            out.push_str(&rest[..q]);
            out.push_str("?***");
            if let Some(f) = rest[q..].find('#') {
                out.push_str(&rest[q + f..]);
            }
        }
        None => out.push_str(rest),
    }
    std::borrow::Cow::Owned(out)
}

/// A source of secret values.
pub trait SecretProvider: Send + Sync {
    /// The instance name, as used in `from:` / `provider:` (e.g. `env`, `uts`).
    fn name(&self) -> &str;
    /// Fetch the value with this id. Must not log the value.
    fn get<'a>(&'a self, id: &'a str) -> BoxFuture<'a, Result<Fetched, SecretError>>;

    /// Fetch several ids that one service needs together, consistently: values that
    /// belong together (a Vault dynamic-credential lease's username and password, a
    /// Conjur batch) come from one store call, never from two calls that could return
    /// two different leases. Returns one value per id, in order. The default fetches
    /// each id with [`SecretProvider::get`]; providers with leases or batch APIs
    /// override it.
    fn get_many<'a>(
        &'a self,
        ids: &'a [&'a str],
    ) -> BoxFuture<'a, Result<Vec<Fetched>, SecretError>> {
        Box::pin(async move {
            let mut out = Vec::with_capacity(ids.len());
            for id in ids {
                out.push(self.get(id).await?);
            }
            Ok(out)
        })
    }

    /// Release what the provider holds in the store (Vault leases with
    /// `revokeOnShutdown`) when the daemon stops, after its connections ended. The
    /// default does nothing.
    fn shutdown(&self) -> BoxFuture<'_, ()> {
        Box::pin(async {})
    }
}

/// Create every provider instance of a configuration, keyed by instance name.
/// Instances of kinds that are not built yet ([`ProviderConfig::NotBuilt`]) are skipped;
/// `config::unsupported` reports the credentials that use them.
///
/// # Errors
/// When an instance cannot be built (an unreadable `tokenFile` or `caFile`, a CA file
/// with no certificate); the message names the instance and the file, never a value.
pub fn build_all(
    configs: &BTreeMap<String, ProviderConfig>,
) -> anyhow::Result<HashMap<String, Arc<dyn SecretProvider>>> {
    let mut out: HashMap<String, Arc<dyn SecretProvider>> = HashMap::new();
    for (name, cfg) in configs {
        let p: Arc<dyn SecretProvider> = match cfg {
            ProviderConfig::Literal => Arc::new(LiteralProvider::new(name)),
            ProviderConfig::Env => Arc::new(EnvProvider::new(name)),
            ProviderConfig::File => Arc::new(FileProvider::new(name)),
            ProviderConfig::Http(c) => Arc::new(HttpProvider::new(name, c)?),
            ProviderConfig::Conjur(c) => Arc::new(conjur::ConjurProvider::new(name, c)?),
            ProviderConfig::Kubernetes(c) => {
                Arc::new(kubernetes::KubernetesProvider::new(name, c)?)
            }
            ProviderConfig::Aws(c) => Arc::new(aws::AwsProvider::new(name, c)?),
            ProviderConfig::Vault(c) => Arc::new(VaultProvider::new(name, c)?),
            ProviderConfig::NotBuilt { .. } => continue,
        };
        out.insert(name.clone(), p);
    }
    Ok(out)
}

/// The provider instances of a configuration and the credential cache: where
/// connectors get a service's credentials.
pub struct SecretStore {
    providers: HashMap<String, Arc<dyn SecretProvider>>,
    cache: Arc<Cache>,
}

impl SecretStore {
    /// Build the provider instances of `config`, with a cache of `broker.cacheTTL`.
    ///
    /// # Errors
    /// When a provider instance cannot be created (see [`build_all`]).
    pub fn new(config: &Config) -> anyhow::Result<Self> {
        Ok(Self::with_providers(
            build_all(&config.providers)?,
            config.broker.cache_ttl,
        ))
    }

    /// A store over given provider instances (keyed by instance name).
    #[must_use]
    pub fn with_providers(
        providers: HashMap<String, Arc<dyn SecretProvider>>,
        cache_ttl: Duration,
    ) -> Self {
        Self {
            providers,
            cache: Arc::new(Cache::new(cache_ttl)),
        }
    }

    /// Fetch every credential of `service`. With `fresh`, cached values are not used
    /// (and are replaced): after the upstream rejected cached credentials (rotation).
    /// Each provider fetch is recorded in `fetched` as `name<-provider:id` (id
    /// redacted), for the access log.
    ///
    /// # Errors
    /// The first credential that cannot be fetched, naming it and the provider.
    pub async fn credentials(
        &self,
        service: &Service,
        fresh: bool,
        fetched: &mut Vec<String>,
    ) -> Result<Credentials, CredentialError> {
        let mut out = Credentials::default();
        for (name, source) in &service.credentials {
            let value = match source {
                CredentialSource::Literal(s) => s.clone(),
                CredentialSource::Provider { provider, id } => {
                    fetched.push(format!("{name}<-{provider}:{}", redact_id(id)));
                    self.fetch(provider, id, fresh)
                        .await
                        .map_err(|source| CredentialError {
                            credential: name.clone(),
                            source,
                        })?
                }
            };
            out.0.insert(name.clone(), value);
        }
        Ok(out)
    }

    /// One value, from the cache or the provider. Concurrent requests for the same
    /// (provider, id) share one provider call; with `fresh` a new call is made (shared
    /// by concurrent `fresh` requests).
    ///
    /// # Errors
    /// [`SecretError`], naming the provider and the id; also for an empty value.
    pub async fn fetch(
        &self,
        provider: &str,
        id: &str,
        fresh: bool,
    ) -> Result<Secret, SecretError> {
        let p = self
            .providers
            .get(provider)
            .ok_or_else(|| SecretError::NotConfigured {
                provider: provider.to_owned(),
                id: id.to_owned(),
            })?;
        self.cache
            .get(provider, id, fresh, || fetch_one(p.as_ref(), id))
            .await
    }

    /// Entries in the credential cache (expired or not yet swept).
    #[must_use]
    pub fn cached(&self) -> usize {
        self.cache.len()
    }

    /// Let every provider release what it holds ([`SecretProvider::shutdown`]), each
    /// bounded by [`FETCH_TIMEOUT`]. The daemon calls it once, after the drain.
    pub async fn shutdown(&self) {
        for p in self.providers.values() {
            if tokio::time::timeout(FETCH_TIMEOUT, p.shutdown())
                .await
                .is_err()
            {
                tracing::warn!(provider = p.name(), "provider shutdown timed out");
            }
        }
    }

    /// The task that evicts (and zeroizes) expired cache entries on time; it ends when
    /// the store is dropped. Spawn it once.
    pub fn sweeper(&self) -> impl Future<Output = ()> + Send + 'static {
        cache::sweep(Arc::downgrade(&self.cache))
    }
}

/// One provider call: bounded by [`FETCH_TIMEOUT`], an empty value refused. Returns the
/// value and when the provider says it expires.
async fn fetch_one(
    p: &dyn SecretProvider,
    id: &str,
) -> Result<(Secret, Option<Instant>), SecretError> {
    let provider = p.name();
    let started = Instant::now();
    let shown = redact_id(id);
    let fetched = tokio::time::timeout(FETCH_TIMEOUT, p.get(id))
        .await
        .map_err(|_| SecretError::Timeout {
            provider: provider.to_owned(),
            id: id.to_owned(),
            after: FETCH_TIMEOUT,
        })??;
    if fetched.value.is_empty() {
        // An empty file, body or variable is a broken store, not an empty password.
        return Err(SecretError::Empty {
            provider: provider.to_owned(),
            id: id.to_owned(),
        });
    }
    tracing::debug!(
        provider,
        id = %shown,
        elapsed_ms = started.elapsed().as_millis() as u64,
        expires_in_ms = fetched.expires_in.map(|d| d.as_millis() as u64),
        "credential fetched"
    );
    // An expiry too far to represent is no limit (the TTL still is).
    let expires = fetched.expires_in.and_then(|d| started.checked_add(d));
    Ok((fetched.value, expires))
}

#[cfg(test)]
mod tests;
