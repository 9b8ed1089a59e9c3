//! Secret providers: where credential values come from.
//!
//! A [`SecretProvider`] turns an id (`get:` in the config) into a [`Secret`]. Built-in
//! kinds: `literal`, `env`, `file`, `http`. Vault, Conjur, AWS Secrets Manager and
//! Kubernetes implement the same trait.

pub mod env;
pub mod file;
pub mod http;
pub mod literal;

use std::{
    collections::{BTreeMap, HashMap},
    future::Future,
    pin::Pin,
    sync::Arc,
};

pub use self::{
    env::EnvProvider, file::FileProvider, http::HttpProvider, literal::LiteralProvider,
};
use crate::{config::ProviderConfig, secret::Secret};

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
            ProviderConfig::NotBuilt { .. } => continue,
        };
        out.insert(name.clone(), p);
    }
    Ok(out)
}

#[cfg(test)]
mod tests;
