//! Secret providers: where credential values come from.
//!
//! A [`SecretProvider`] turns an id (`get:` in the config) into a [`Secret`]. Built-in
//! kinds: `literal`, `env`, `file`, `http`. Vault, Conjur, AWS Secrets Manager and
//! Kubernetes implement the same trait.

use std::{future::Future, pin::Pin};

use crate::secret::Secret;

/// A boxed future, so providers can be used as trait objects.
pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// Why a provider could not produce a value. Messages name the provider and the id,
/// never a secret value.
#[derive(Debug, thiserror::Error)]
pub enum ProviderError {
    #[error("{provider}: `{id}` not found")]
    NotFound { provider: String, id: String },
    #[error("{provider}: fetching `{id}` failed: {reason}")]
    Fetch {
        provider: String,
        id: String,
        reason: String,
    },
    #[error("{provider}: bad reply for `{id}`: {reason}")]
    BadReply {
        provider: String,
        id: String,
        reason: String,
    },
}

/// A source of secret values.
pub trait SecretProvider: Send + Sync {
    /// The instance name, as used in `from:` / `provider:` (e.g. `env`, `uts`).
    fn name(&self) -> &str;
    /// Fetch the value with this id. Must not log the value.
    fn get<'a>(&'a self, id: &'a str) -> BoxFuture<'a, Result<Secret, ProviderError>>;
}

/// Create every provider instance of a configuration.
///
/// # Errors
/// When an instance cannot be built.
pub fn build_all(
    _configs: &std::collections::BTreeMap<String, crate::config::ProviderConfig>,
) -> anyhow::Result<std::collections::HashMap<String, std::sync::Arc<dyn SecretProvider>>> {
    Ok(std::collections::HashMap::new())
}
