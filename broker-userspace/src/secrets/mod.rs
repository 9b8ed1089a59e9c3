//! Secrets: everything about fetching credential values.
//!
//! A [`SecretProvider`] turns an id (`get:` in the config) into a [`Fetched`] value.
//! Built-in kinds: `literal`, `env`, `file`, `http`. Vault, Conjur, AWS Secrets Manager
//! and Kubernetes implement the same trait.
//!
//! The [`SecretStore`] holds the provider instances of a configuration, each with its
//! failure policy ([`FetchPolicy`]: TTL, stale window, [`breaker`]), and the [`cache`]
//! (groups of values fetched by one store call; TTL or the provider's own expiry,
//! whichever is shorter; one fetch for concurrent requests of the same group).
//! Connectors get a service's [`Credentials`] from it; failures are typed
//! ([`SecretError`], [`CredentialError`]) and never carry a value. Every lookup is one
//! audit event (`target: "audit"`). See docs/stores/failure.md.

pub mod aws;
pub mod breaker;
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
    breaker::Breaker,
    cache::Cache,
    credentials::{CredentialError, Credentials},
    env::EnvProvider,
    file::FileProvider,
    http::HttpProvider,
    literal::LiteralProvider,
    vault::VaultProvider,
};
use crate::{
    audit::AuditLog,
    config::{CacheOverride, Config, CredentialSource, FetchPolicy, ProviderConfig, Service},
    connector::Caller,
    secret::Secret,
};

/// How long one store call may take before the connection is refused, for a provider
/// that has no `timeout` of its own ([`SecretProvider::timeout`]).
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
    /// The provider's circuit breaker is open: the store failed too often in a row and
    /// is left alone for a while (see [`breaker`]). `retry_in`: until the next probe
    /// may go; zero while a probe is in flight.
    #[error(
        "{provider}: `{}` not fetched: the store is failing (circuit open, {})",
        redact_id(.id),
        retry_hint(*.retry_in)
    )]
    CircuitOpen {
        provider: String,
        id: String,
        retry_in: Duration,
    },
}

fn retry_hint(retry_in: Duration) -> String {
    if retry_in.is_zero() {
        "a probe request is in flight".to_owned()
    } else {
        // Milliseconds are enough to read.
        let d = Duration::from_millis(u64::try_from(retry_in.as_millis()).unwrap_or(u64::MAX));
        format!("next attempt in {d:?}")
    }
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
            Self::CircuitOpen { .. } => "circuit_open",
        }
    }

    /// Whether the error says the store is down or broken, rather than answering about
    /// this id: `unreachable`, `timeout`, `bad_reply` (and `circuit_open`, which stands
    /// for them). These count for the circuit breaker and allow stale values; a
    /// `not_found`, `denied`, `empty` or `bad_id` is the store's answer and does
    /// neither.
    #[must_use]
    pub fn is_outage(&self) -> bool {
        matches!(
            self,
            Self::Unreachable { .. }
                | Self::Timeout { .. }
                | Self::BadReply { .. }
                | Self::CircuitOpen { .. }
        )
    }

    /// The id the error is about (unredacted: print it through [`redact_id`]).
    #[must_use]
    pub fn id(&self) -> &str {
        match self {
            Self::NotConfigured { id, .. }
            | Self::NotFound { id, .. }
            | Self::Unreachable { id, .. }
            | Self::Denied { id, .. }
            | Self::BadReply { id, .. }
            | Self::BadId { id, .. }
            | Self::Empty { id, .. }
            | Self::Timeout { id, .. }
            | Self::CircuitOpen { id, .. } => id,
        }
    }

    /// A store's non-2xx HTTP status as an error: 404 not found; 401 and 403 denied;
    /// 408, 429 and 5xx unreachable; a redirect (never followed) or any other status a
    /// bad reply. `reason` says what answered so (`HTTP status 503`), never a body.
    #[must_use]
    pub fn from_status(provider: &str, id: &str, status: u16, reason: String) -> Self {
        let (provider, id) = (provider.to_owned(), id.to_owned());
        match status {
            404 => Self::NotFound { provider, id },
            401 | 403 => Self::Denied {
                provider,
                id,
                reason,
            },
            408 | 429 | 500..=599 => Self::Unreachable {
                provider,
                id,
                reason,
            },
            300..=399 => Self::BadReply {
                provider,
                id,
                reason: format!("{reason}: redirects are not followed"),
            },
            _ => Self::BadReply {
                provider,
                id,
                reason,
            },
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
            | Self::Timeout { provider, .. }
            | Self::CircuitOpen { provider, .. } => provider,
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

/// The HTTP client builder every store provider starts from: the broker's (ring) TLS
/// configuration, redirects never followed (one would carry the request's token to
/// wherever it points, and make another host's reply the value), every request and
/// connect bounded by `timeout`.
pub(crate) fn store_client(tls: rustls::ClientConfig, timeout: Duration) -> reqwest::ClientBuilder {
    reqwest::Client::builder()
        .tls_backend_preconfigured(tls)
        .redirect(reqwest::redirect::Policy::none())
        .timeout(timeout)
        .connect_timeout(timeout)
        .user_agent(concat!("broker/", env!("CARGO_PKG_VERSION")))
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
    /// two different leases. Returns one value per id, in order. The store calls it
    /// once per service and provider (the ids sorted, without duplicates) and caches
    /// the values as one group. The default fetches every id with
    /// [`SecretProvider::get`], all at once, and fails with the first error; providers
    /// with leases or batch APIs override it.
    fn get_many<'a>(
        &'a self,
        ids: &'a [&'a str],
    ) -> BoxFuture<'a, Result<Vec<Fetched>, SecretError>> {
        Box::pin(futures_util::future::try_join_all(
            ids.iter().map(|id| self.get(id)),
        ))
    }

    /// Whether an id of this provider is the value itself (`literal`): the audit log
    /// then shows `***` in its place.
    fn id_is_value(&self) -> bool {
        false
    }

    /// How long one call may take, when the instance has a `timeout` setting: the store
    /// bounds every call ([`SecretProvider::get_many`]) by it; without one, by
    /// [`FETCH_TIMEOUT`].
    fn timeout(&self) -> Option<Duration> {
        None
    }

    /// Release what the provider holds in the store (Vault leases with
    /// `revokeOnShutdown`) when the daemon stops, after its connections ended. The
    /// default does nothing.
    fn shutdown(&self) -> BoxFuture<'_, ()> {
        Box::pin(async {})
    }
}

/// Who asks for a service's credentials: the service, and the caller as the connection
/// knows it (intercepted connections; `None` for a `listenOn` client). For the audit
/// event of each fetch.
#[derive(Debug, Clone, Copy)]
pub struct Requester<'a> {
    pub service: &'a Service,
    pub caller: Option<&'a Caller>,
}

impl<'a> Requester<'a> {
    #[must_use]
    pub fn new(service: &'a Service, caller: Option<&'a Caller>) -> Self {
        Self { service, caller }
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

/// A provider instance with its failure policy.
struct Slot {
    provider: Arc<dyn SecretProvider>,
    policy: FetchPolicy,
    breaker: Option<Breaker>,
    /// The kind of the last failed store call and when it failed (`broker status`).
    last_error: std::sync::Mutex<Option<(&'static str, std::time::SystemTime)>>,
}

/// A provider instance as `broker status` shows it.
#[derive(Debug, Clone)]
pub struct ProviderState {
    pub name: String,
    /// `vault`, `file`... (empty when the store was built without a configuration).
    pub kind: String,
    /// `closed`, `open`, `half-open`, or `none` (no breaker).
    pub breaker: &'static str,
    /// Consecutive failed store calls (closed), or the breaker's threshold (open).
    pub failures: u32,
    /// Until the next probe may go (open circuit).
    pub retry_in: Option<Duration>,
    /// The kind of the last failed store call ([`SecretError::kind`]) and when.
    pub last_error: Option<(&'static str, std::time::SystemTime)>,
}

/// The provider instances of a configuration, their policies and breakers, and the
/// credential cache: where connectors get a service's credentials.
pub struct SecretStore {
    slots: HashMap<String, Slot>,
    /// `broker.cacheTTL`: the TTL of providers and services that set none.
    default_ttl: Duration,
    cache: Arc<Cache>,
    /// Each provider instance's metric handles ([`SecretStore::with_metrics`]).
    metrics: HashMap<String, crate::metrics::ProviderMetrics>,
    /// Each provider instance's kind (`broker status`).
    kinds: HashMap<String, String>,
    /// Where each credential access is written as a line ([`crate::audit`]); off by
    /// default.
    audit: AuditLog,
}

impl SecretStore {
    /// Build the provider instances of `config` with their policies
    /// (`config.fetch_policies`, else their kind's defaults) and `broker.cacheTTL`.
    ///
    /// # Errors
    /// When a provider instance cannot be created (see [`build_all`]).
    pub fn new(config: &Config) -> anyhow::Result<Self> {
        let providers = build_all(&config.providers)?;
        let policies = providers
            .keys()
            .map(|name| {
                let policy = config.fetch_policies.get(name).cloned().unwrap_or_else(|| {
                    FetchPolicy::default_for(config.providers.get(name).map_or("", |c| c.kind()))
                });
                (name.clone(), policy)
            })
            .collect();
        let mut store = Self::with_policies(providers, policies, config.broker.cache_ttl);
        store.kinds = config
            .providers
            .iter()
            .map(|(name, c)| (name.clone(), c.kind().to_owned()))
            .collect();
        Ok(store)
    }

    /// A store over given provider instances (keyed by instance name), each cached for
    /// `cache_ttl`, without a stale window or a breaker.
    #[must_use]
    pub fn with_providers(
        providers: HashMap<String, Arc<dyn SecretProvider>>,
        cache_ttl: Duration,
    ) -> Self {
        Self::with_policies(providers, HashMap::new(), cache_ttl)
    }

    /// A store over given provider instances and their policies (an instance without
    /// one gets the plain policy of [`Self::with_providers`]); `default_ttl` for the
    /// policies without a `cache_ttl`.
    #[must_use]
    pub fn with_policies(
        providers: HashMap<String, Arc<dyn SecretProvider>>,
        mut policies: HashMap<String, FetchPolicy>,
        default_ttl: Duration,
    ) -> Self {
        let slots = providers
            .into_iter()
            .map(|(name, provider)| {
                let policy = policies.remove(&name).unwrap_or(FetchPolicy {
                    cache_ttl: None,
                    stale_for: Duration::ZERO,
                    breaker: None,
                });
                let breaker = policy.breaker.map(|b| Breaker::new(&name, b));
                let slot = Slot {
                    provider,
                    policy,
                    breaker,
                    last_error: std::sync::Mutex::new(None),
                };
                (name, slot)
            })
            .collect();
        Self {
            slots,
            default_ttl,
            cache: Arc::new(Cache::new()),
            audit: AuditLog::off(),
            metrics: HashMap::new(),
            kinds: HashMap::new(),
        }
    }

    /// Every provider instance (by name) with its breaker and last failure, for
    /// `broker status`.
    #[must_use]
    pub fn providers(&self) -> Vec<ProviderState> {
        let mut out: Vec<ProviderState> = self
            .slots
            .iter()
            .map(|(name, slot)| {
                let (breaker, failures, retry_in) = slot
                    .breaker
                    .as_ref()
                    .map_or(("none", 0, None), Breaker::state);
                ProviderState {
                    name: name.clone(),
                    kind: self.kinds.get(name).cloned().unwrap_or_default(),
                    breaker,
                    failures,
                    retry_in,
                    last_error: *slot
                        .last_error
                        .lock()
                        .unwrap_or_else(std::sync::PoisonError::into_inner),
                }
            })
            .collect();
        out.sort_by(|a, b| a.name.cmp(&b.name));
        out
    }

    /// Every cached group (names, ids and times; never a value), for `broker status`.
    #[must_use]
    pub fn cache_state(&self) -> Vec<cache::EntryState> {
        self.cache.snapshot()
    }

    /// Count every lookup of this store's provider instances in `metrics`
    /// (`credential_fetches_total`, `credential_fetch_duration_seconds`), beside its
    /// audit event.
    #[must_use]
    pub fn with_metrics(mut self, metrics: &crate::metrics::Metrics) -> Self {
        self.metrics = self
            .slots
            .keys()
            .map(|name| (name.clone(), metrics.provider(name)))
            .collect();
        self
    }

    /// Count one lookup (see [`SecretStore::with_metrics`]).
    fn count(
        &self,
        provider: &str,
        result: Result<(), &SecretError>,
        how: Option<cache::How>,
        started: Instant,
    ) {
        if let Some(m) = self.metrics.get(provider) {
            m.lookup(
                result.map_or_else(SecretError::kind, |()| "ok"),
                how.map_or("none", cache::How::word),
                started.elapsed(),
            );
        }
    }

    /// Write a line per credential access to `log` (`broker.audit`), from now on.
    #[must_use]
    pub fn with_audit(mut self, log: AuditLog) -> Self {
        self.audit = log;
        self
    }

    /// The audit log of this store's accesses (also the policy decisions' way in:
    /// [`AuditLog::decision`]).
    #[must_use]
    pub fn audit(&self) -> &AuditLog {
        &self.audit
    }

    /// Fetch every credential of the requester's service. The credentials a service
    /// takes from one provider are one group: fetched by one store call
    /// ([`SecretProvider::get_many`]) and cached together. With `fresh`, cached values
    /// are not used (and are replaced): after the upstream rejected cached credentials
    /// (rotation). Each provider credential is recorded in `fetched` as
    /// `name<-provider:id` (id redacted), for the access log; each group lookup is one
    /// audit event.
    ///
    /// # Errors
    /// The first group that cannot be fetched, naming the credential the error is about
    /// (the group's first when the error is about all of them) and the provider.
    pub async fn credentials(
        &self,
        who: Requester<'_>,
        fresh: bool,
        fetched: &mut Vec<String>,
    ) -> Result<Credentials, CredentialError> {
        let mut out = Credentials::default();
        // Provider -> (credential name, id), in name order.
        let mut groups: BTreeMap<&str, Vec<(&str, &str)>> = BTreeMap::new();
        for (name, source) in &who.service.credentials {
            match source {
                CredentialSource::Literal(s) => {
                    out.0.insert(name.clone(), s.clone());
                }
                CredentialSource::Provider { provider, id } => {
                    fetched.push(format!("{name}<-{provider}:{}", redact_id(id)));
                    groups.entry(provider).or_default().push((name, id));
                }
            }
        }
        for (provider, members) in groups {
            let ids: Vec<&str> = members.iter().map(|(_, id)| *id).collect();
            let values = self
                .lookup(
                    &Audit::of(who, &members, &self.audit),
                    provider,
                    &ids,
                    fresh,
                )
                .await
                .map_err(|source| {
                    let credential = members
                        .iter()
                        .find(|(_, id)| *id == source.id())
                        .unwrap_or(&members[0])
                        .0
                        .to_owned();
                    CredentialError { credential, source }
                })?;
            for ((name, _), value) in members.iter().zip(values) {
                out.0.insert((*name).to_owned(), value);
            }
        }
        Ok(out)
    }

    /// One value, outside of any service (tools and tests): a group of one id, with the
    /// provider's policy.
    ///
    /// # Errors
    /// [`SecretError`], naming the provider and the id; also for an empty value.
    pub async fn fetch(
        &self,
        provider: &str,
        id: &str,
        fresh: bool,
    ) -> Result<Secret, SecretError> {
        let audit = Audit {
            service: "-",
            caller: None,
            over: CacheOverride::default(),
            members: &[],
            log: &self.audit,
        };
        let mut values = self.lookup(&audit, provider, &[id], fresh).await?;
        Ok(values.swap_remove(0))
    }

    /// The values of `ids` (in that order) from `provider`: one group, from the cache or
    /// one store call (through the provider's breaker, bounded by its timeout), stale
    /// when the store fails and the policy allows; logged as one audit event.
    async fn lookup(
        &self,
        audit: &Audit<'_>,
        provider: &str,
        ids: &[&str],
        fresh: bool,
    ) -> Result<Vec<Secret>, SecretError> {
        let started = Instant::now();
        let mut sorted: Vec<&str> = ids.to_vec();
        sorted.sort_unstable();
        sorted.dedup();
        let Some(slot) = self.slots.get(provider) else {
            let e = SecretError::NotConfigured {
                provider: provider.to_owned(),
                id: ids[0].to_owned(),
            };
            audit.emit(
                provider,
                &sorted,
                false,
                fresh,
                None,
                Err(&e),
                None,
                started,
            );
            self.count(provider, Err(&e), None, started);
            return Err(e);
        };
        let over = audit.over;
        let key = cache::GroupKey {
            provider: provider.to_owned(),
            ids: sorted.iter().map(|id| (*id).to_owned()).collect(),
            policy: cache::Policy {
                ttl: over
                    .ttl
                    .or(slot.policy.cache_ttl)
                    .unwrap_or(self.default_ttl),
                stale_for: over.stale_for.unwrap_or(slot.policy.stale_for),
            },
        };
        let found = self
            .cache
            .get(&key, fresh, || fetch_group(slot, &key.ids))
            .await;
        audit.emit(
            provider,
            &sorted,
            slot.provider.id_is_value(),
            fresh,
            Some(found.how),
            found.result.as_ref().map(Vec::as_slice),
            found.stale_age,
            started,
        );
        self.count(
            provider,
            found.result.as_ref().map(|_| ()),
            Some(found.how),
            started,
        );
        let values = found.result?;
        // Back to the order (and duplicates) asked for.
        Ok(ids
            .iter()
            .map(|id| {
                let i = sorted.binary_search(id).expect("every id is in the group");
                values[i].clone()
            })
            .collect())
    }

    /// Groups in the credential cache (expired or not yet swept).
    #[must_use]
    pub fn cached(&self) -> usize {
        self.cache.len()
    }

    /// Let every provider release what it holds ([`SecretProvider::shutdown`]), each
    /// bounded by [`FETCH_TIMEOUT`]. The daemon calls it once, after the drain.
    pub async fn shutdown(&self) {
        for p in self.slots.values().map(|s| &s.provider) {
            if tokio::time::timeout(FETCH_TIMEOUT, p.shutdown())
                .await
                .is_err()
            {
                tracing::warn!(provider = p.name(), "provider shutdown timed out");
            }
        }
    }

    /// Whether `provider`'s circuit is closed (true without a breaker).
    #[must_use]
    pub fn circuit_closed(&self, provider: &str) -> bool {
        self.slots
            .get(provider)
            .and_then(|s| s.breaker.as_ref())
            .is_none_or(Breaker::is_closed)
    }

    /// The task that evicts (and zeroizes) expired cache entries on time; it ends when
    /// the store is dropped. Spawn it once.
    pub fn sweeper(&self) -> impl Future<Output = ()> + Send + 'static {
        cache::sweep(Arc::downgrade(&self.cache))
    }
}

/// What the audit event of a lookup says about who asked, and where its lines go.
struct Audit<'a> {
    service: &'a str,
    caller: Option<&'a Caller>,
    over: CacheOverride,
    /// The group's credentials: (name, id).
    members: &'a [(&'a str, &'a str)],
    log: &'a AuditLog,
}

impl<'a> Audit<'a> {
    fn of(who: Requester<'a>, members: &'a [(&'a str, &'a str)], log: &'a AuditLog) -> Self {
        Self {
            service: &who.service.name,
            caller: who.caller,
            over: who.service.cache,
            members,
            log,
        }
    }

    /// One `audit` event in the daemon's log: who, which provider and ids (redacted),
    /// how the cache answered, the result (`ok` or the error's kind, and its message),
    /// the time the lookup took. And, with an audit sink, one line per id
    /// ([`AuditLog::credential`]; `values`: in `ids`' order, for `version_hmac`).
    /// Never a value; an id that is the value itself (`id_is_value`: `literal`) is
    /// shown as `***`.
    #[allow(clippy::too_many_arguments)]
    fn emit<'b>(
        &self,
        provider: &str,
        ids: &[&'b str],
        id_is_value: bool,
        fresh: bool,
        how: Option<cache::How>,
        result: Result<&[Secret], &SecretError>,
        stale_age: Option<Duration>,
        started: Instant,
    ) {
        let c = self.caller;
        let shown = |id: &'b str| -> std::borrow::Cow<'b, str> {
            if id_is_value {
                "***".into()
            } else {
                redact_id(id)
            }
        };
        let event = tracing::enabled!(target: "audit", tracing::Level::INFO);
        if !event && !self.log.enabled() {
            // Nobody records this lookup (the log level is above info, no audit sink):
            // nothing to format.
            return;
        }
        let latency = started.elapsed();
        let credentials = self
            .members
            .iter()
            .map(|(name, _)| *name)
            .collect::<Vec<_>>()
            .join(",");
        let latency_us = u64::try_from(latency.as_micros()).unwrap_or(u64::MAX);
        let stale_age_ms = stale_age.map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX));
        let (word, error) = match result {
            Ok(_) => ("ok", None),
            Err(e) => (e.kind(), Some(e)),
        };
        tracing::info!(
            target: "audit",
            service = %self.service,
            caller.pid = c.map(|c| c.pid),
            caller.uid = c.map(|c| c.uid),
            caller.gid = c.map(|c| c.gid),
            caller.cgroup = c.map(|c| c.cgroup_id),
            caller.cgroup_path = c.and_then(|c| c.cgroup.as_deref()).map(|p| p.display()).map(tracing::field::display),
            caller.comm = c.map(|c| c.comm.as_str()),
            caller.exe = c.and_then(|c| c.exe.as_deref()).map(|p| p.display()).map(tracing::field::display),
            caller.thread = c.map(|c| c.thread.as_str()),
            provider = %provider,
            ids = %ids.iter().map(|id| shown(id)).collect::<Vec<_>>().join(","),
            credentials = %credentials,
            fresh,
            cache = how.map_or("none", cache::How::word),
            result = word,
            error = error.map(tracing::field::display),
            stale_age_ms,
            latency_us,
            "credential fetch"
        );
        if !self.log.enabled() {
            return;
        }
        let error = error.map(ToString::to_string);
        for (i, id) in ids.iter().enumerate() {
            let names: Vec<&str> = self
                .members
                .iter()
                .filter(|(_, m)| m == id)
                .map(|(name, _)| *name)
                .collect();
            let secret = shown(id);
            self.log.credential(&crate::audit::CredentialAccess {
                service: self.service,
                caller: c,
                provider,
                secret: &secret,
                credentials: &names,
                fresh,
                cache: how.map(cache::How::word),
                result: word,
                error: error.as_deref(),
                stale_age,
                latency,
                value: result.ok().and_then(|v| v.get(i)).map(Secret::expose),
            });
        }
    }
}

/// One store call for a group, through the provider's breaker: refused at once while
/// the circuit is open.
async fn fetch_group(slot: &Slot, ids: &[String]) -> cache::Outcome {
    let permit = match slot.breaker.as_ref().map(Breaker::admit) {
        None => None,
        Some(Ok(p)) => Some(p),
        Some(Err(retry_in)) => {
            return Err(SecretError::CircuitOpen {
                provider: slot.provider.name().to_owned(),
                id: ids[0].clone(),
                retry_in,
            });
        }
    };
    let outcome = call_store(slot.provider.as_ref(), ids).await;
    if let Some(p) = permit {
        p.record(&outcome);
    }
    if let Err(e) = &outcome {
        *slot
            .last_error
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) =
            Some((e.kind(), std::time::SystemTime::now()));
    }
    outcome
}

/// One provider call: bounded by the provider's timeout (else [`FETCH_TIMEOUT`]), one
/// value per id, empty values refused. Returns the values and when the first of them
/// expires, as the provider says.
async fn call_store(p: &dyn SecretProvider, ids: &[String]) -> cache::Outcome {
    let provider = p.name();
    let started = Instant::now();
    let limit = p.timeout().unwrap_or(FETCH_TIMEOUT);
    let refs: Vec<&str> = ids.iter().map(String::as_str).collect();
    let fetched = tokio::time::timeout(limit, p.get_many(&refs))
        .await
        .map_err(|_| SecretError::Timeout {
            provider: provider.to_owned(),
            id: ids[0].clone(),
            after: limit,
        })??;
    if fetched.len() != ids.len() {
        return Err(SecretError::BadReply {
            provider: provider.to_owned(),
            id: ids[0].clone(),
            reason: format!(
                "the provider returned {} values for {} ids",
                fetched.len(),
                ids.len()
            ),
        });
    }
    let mut expires: Option<Instant> = None;
    let mut values = Vec::with_capacity(ids.len());
    for (f, id) in fetched.into_iter().zip(ids) {
        if f.value.is_empty() {
            // An empty file, body or variable is a broken store, not an empty password.
            return Err(SecretError::Empty {
                provider: provider.to_owned(),
                id: id.clone(),
            });
        }
        // An expiry too far to represent is no limit (the TTL still is).
        if let Some(at) = f.expires_in.and_then(|d| started.checked_add(d)) {
            expires = Some(expires.map_or(at, |e| e.min(at)));
        }
        values.push(f.value);
    }
    tracing::debug!(
        provider,
        ids = %ids.iter().map(|id| redact_id(id)).collect::<Vec<_>>().join(","),
        elapsed_ms = started.elapsed().as_millis() as u64,
        expires_in_ms = expires.map(|e| e.saturating_duration_since(started).as_millis() as u64),
        "credentials fetched"
    );
    Ok((values, expires))
}

#[cfg(test)]
mod store_tests;
/// A built-in provider's client, or why it could not be made: the built-in instance of a
/// kind (`from: conjur` with no `providers:` block) is built from the environment, and
/// a missing setting is reported when a credential uses it, not at start.
pub struct BuiltIn<C> {
    kind: &'static str,
    name: String,
    client: Result<C, String>,
    warned: std::sync::atomic::AtomicBool,
}

impl<C> BuiltIn<C> {
    /// `made`: the client, or why not. A declared instance (`builtin == false`) fails at
    /// once; the built-in one keeps the reason for later.
    ///
    /// # Errors
    /// `made`'s error, for a declared instance.
    pub fn new(
        kind: &'static str,
        name: &str,
        builtin: bool,
        made: anyhow::Result<C>,
    ) -> anyhow::Result<Self> {
        let client = match made {
            Ok(c) => Ok(c),
            Err(e) if builtin => Err(format!("{e:#}")),
            Err(e) => return Err(e),
        };
        Ok(Self {
            kind,
            name: name.to_owned(),
            client,
            warned: std::sync::atomic::AtomicBool::new(false),
        })
    }

    /// The client, or why it could not be made (no log, no error for an id).
    ///
    /// # Errors
    /// When the built-in instance could not be configured.
    pub fn client(&self) -> Result<&C, &str> {
        self.client.as_ref().map_err(String::as_str)
    }

    /// The client, or [`SecretError::NotConfigured`] for `id` (the reason logged once).
    ///
    /// # Errors
    /// When the built-in instance could not be configured.
    pub fn get(&self, id: &str) -> Result<&C, SecretError> {
        match &self.client {
            Ok(c) => Ok(c),
            Err(reason) => {
                if !self.warned.swap(true, std::sync::atomic::Ordering::Relaxed) {
                    tracing::warn!(provider = %self.name, reason = %reason, "the built-in {} provider is not configured", self.kind);
                }
                Err(SecretError::NotConfigured {
                    provider: self.name.clone(),
                    id: id.to_owned(),
                })
            }
        }
    }
}

#[cfg(test)]
mod tests;
