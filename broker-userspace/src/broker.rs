//! [`Broker`]: the secret side every connector works with: the provider instances and the
//! credential cache.

use std::{
    collections::HashMap,
    sync::{Arc, Mutex, Weak},
    time::Duration,
};

use tokio::time::Instant;

use crate::{
    config::{Config, CredentialSource, Service},
    connector::{ConnError, ConnStats, Credentials},
    provider::{self, SecretProvider},
    secret::Secret,
};

/// How long one credential fetch may take before the connection is refused.
pub const FETCH_TIMEOUT: Duration = Duration::from_secs(15);

pub struct Broker {
    pub config: Arc<Config>,
    providers: HashMap<String, Arc<dyn SecretProvider>>,
    /// (provider, id) -> value and when it was fetched. Bounded by the configuration:
    /// ids come from it, never from clients. Expired entries are removed (and their
    /// values zeroized) by [`sweep_cache`] when they expire, not when next read.
    cache: Mutex<HashMap<(String, String), (Secret, Instant)>>,
}

impl Broker {
    /// Build the provider instances for a validated configuration.
    ///
    /// # Errors
    /// When a provider instance cannot be created (e.g. an unreadable CA file).
    pub fn new(config: Arc<Config>) -> anyhow::Result<Self> {
        let providers = provider::build_all(&config.providers)?;
        Ok(Self {
            config,
            providers,
            cache: Mutex::new(HashMap::new()),
        })
    }

    /// Fetch every credential of `service`. With `fresh`, the cache is bypassed (and
    /// refreshed): used after the upstream rejected cached credentials (rotation).
    ///
    /// # Errors
    /// `ConnError::Credentials` naming the credential and the provider, never a value.
    pub async fn credentials(
        &self,
        service: &Service,
        fresh: bool,
        stats: &mut ConnStats,
    ) -> Result<Credentials, ConnError> {
        let mut out = Credentials::default();
        for (name, source) in &service.credentials {
            let value = match source {
                CredentialSource::Literal(s) => s.clone(),
                CredentialSource::Provider { provider, id } => {
                    stats
                        .fetched
                        .push(format!("{name}<-{provider}:{}", provider::redact_id(id)));
                    self.fetch(provider, id, fresh)
                        .await
                        .map_err(|e| ConnError::Credentials(format!("credential `{name}`: {e}")))?
                }
            };
            out.0.insert(name.clone(), value);
        }
        Ok(out)
    }

    async fn fetch(&self, provider: &str, id: &str, fresh: bool) -> Result<Secret, String> {
        let ttl = self.config.broker.cache_ttl;
        let key = (provider.to_owned(), id.to_owned());
        if !fresh && !ttl.is_zero() {
            let cache = self
                .cache
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            if let Some((v, at)) = cache.get(&key)
                && at.elapsed() < ttl
            {
                return Ok(v.clone());
            }
        }
        let p = self
            .providers
            .get(provider)
            .ok_or_else(|| format!("provider `{provider}` is not configured"))?;
        let started = Instant::now();
        let shown = provider::redact_id(id);
        let value = tokio::time::timeout(FETCH_TIMEOUT, p.get(id))
            .await
            .map_err(|_| {
                format!("{provider}: fetching `{shown}` timed out after {FETCH_TIMEOUT:?}")
            })?
            .map_err(|e| e.to_string())?;
        if value.is_empty() {
            // An empty file, body or variable is a broken store, not an empty password.
            return Err(provider::ProviderError::Empty {
                provider: provider.to_owned(),
                id: id.to_owned(),
            }
            .to_string());
        }
        tracing::debug!(
            provider,
            id = %shown,
            elapsed_ms = started.elapsed().as_millis() as u64,
            "credential fetched"
        );
        if !ttl.is_zero() {
            let mut cache = self
                .cache
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            cache.insert(key, (value.clone(), Instant::now()));
        }
        Ok(value)
    }

    /// Remove the expired cache entries (their values are zeroized on drop). Returns when
    /// the next entry expires, if any.
    pub fn sweep_expired(&self) -> Option<Instant> {
        let ttl = self.config.broker.cache_ttl;
        let now = Instant::now();
        let mut cache = self
            .cache
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        cache.retain(|_, (_, at)| now.saturating_duration_since(*at) < ttl);
        cache.values().map(|(_, at)| *at + ttl).min()
    }

    /// Entries in the credential cache (expired or not).
    #[must_use]
    pub fn cached(&self) -> usize {
        self.cache
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .len()
    }
}

/// Evict expired credentials on time, for as long as the broker exists: sleeps until
/// the next entry expires (every entry has the same TTL, so a new one never expires
/// before those already there), or one TTL when the cache is empty.
pub async fn sweep_cache(broker: Weak<Broker>) {
    /// Floor between two sweeps, so a burst of entries expiring together costs one pass.
    const MIN_SLEEP: Duration = Duration::from_millis(50);
    loop {
        let (next, ttl) = {
            let Some(b) = broker.upgrade() else { return };
            let ttl = b.config.broker.cache_ttl;
            if ttl.is_zero() {
                return;
            }
            (b.sweep_expired(), ttl)
        };
        let until = next.unwrap_or_else(|| Instant::now() + ttl);
        tokio::time::sleep_until(until.max(Instant::now() + MIN_SLEEP)).await;
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;
    use crate::config::{BrokerSettings, ProviderConfig};

    fn broker(ttl: Duration) -> Arc<Broker> {
        let mut providers = BTreeMap::new();
        providers.insert("env".to_owned(), ProviderConfig::Env);
        Arc::new(
            Broker::new(Arc::new(Config {
                services: vec![],
                providers,
                broker: BrokerSettings {
                    cache_ttl: ttl,
                    ..BrokerSettings::default()
                },
            }))
            .unwrap(),
        )
    }

    #[tokio::test(start_paused = true)]
    async fn expired_entries_are_evicted_on_time_without_a_read() {
        let b = broker(Duration::from_secs(10));
        tokio::spawn(sweep_cache(Arc::downgrade(&b)));
        // PATH is set in any test run.
        b.fetch("env", "PATH", false).await.unwrap();
        tokio::time::sleep(Duration::from_secs(5)).await;
        b.fetch("env", "HOME", false).await.unwrap();
        assert_eq!(b.cached(), 2);
        tokio::time::sleep(Duration::from_millis(5_100)).await;
        assert_eq!(b.cached(), 1, "PATH expired at 10 s");
        tokio::time::sleep(Duration::from_secs(5)).await;
        assert_eq!(b.cached(), 0, "HOME expired at 15 s");
        // The sweeper ends with the broker.
        let weak = Arc::downgrade(&b);
        drop(b);
        tokio::time::sleep(Duration::from_secs(20)).await;
        assert!(weak.upgrade().is_none());
    }

    #[tokio::test]
    async fn an_empty_value_is_an_error_naming_the_id() {
        let dir = tempfile::tempdir().unwrap();
        let mut providers = BTreeMap::new();
        providers.insert("file".to_owned(), ProviderConfig::File);
        let f = Broker::new(Arc::new(Config {
            services: vec![],
            providers,
            broker: BrokerSettings::default(),
        }))
        .unwrap();
        let path = dir.path().join("empty");
        std::fs::write(&path, "\n").unwrap();
        let e = f
            .fetch("file", path.to_str().unwrap(), false)
            .await
            .unwrap_err();
        assert!(e.ends_with("` is empty"), "{e}");
    }
}
