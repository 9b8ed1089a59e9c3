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

/// Why a provider could not produce a value. Messages name the provider and the id
/// (through [`redact_id`]), never a secret value.
#[derive(Debug, thiserror::Error)]
pub enum ProviderError {
    #[error("{provider}: `{}` not found", redact_id(.id))]
    NotFound { provider: String, id: String },
    #[error("{provider}: fetching `{}` failed: {reason}", redact_id(.id))]
    Fetch {
        provider: String,
        id: String,
        reason: String,
    },
    #[error("{provider}: bad reply for `{}`: {reason}", redact_id(.id))]
    BadReply {
        provider: String,
        id: String,
        reason: String,
    },
    /// An empty file, HTTP body or environment variable: never an empty password.
    #[error("{provider}: `{}` is empty", redact_id(.id))]
    Empty { provider: String, id: String },
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
