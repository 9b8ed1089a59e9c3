//! [`Credentials`]: the values of one service's credentials for one connection, and
//! [`CredentialError`]: which credential could not be fetched, and why.

use std::{collections::BTreeMap, fmt};

use super::SecretError;
use crate::secret::Secret;

/// Resolved credentials for one connection: name -> value. `Debug` lists the names only.
#[derive(Default, Clone)]
pub struct Credentials(pub BTreeMap<String, Secret>);

impl Credentials {
    #[must_use]
    pub fn get(&self, name: &str) -> Option<&Secret> {
        self.0.get(name)
    }

    /// A credential that must be UTF-8 text (hosts, user names, modes).
    ///
    /// # Errors
    /// When it is not valid UTF-8; the error names the credential, not its value.
    pub fn text(&self, name: &str) -> Result<Option<&str>, NotText> {
        match self.0.get(name) {
            None => Ok(None),
            Some(s) => s.expose_str().map(Some).map_err(|_| NotText {
                credential: name.to_owned(),
            }),
        }
    }
}

/// A credential that must be text is not UTF-8 (the value is never quoted).
#[derive(Debug, Clone, thiserror::Error)]
#[error("credential `{credential}` is not UTF-8")]
pub struct NotText {
    pub credential: String,
}

impl fmt::Debug for Credentials {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_set().entries(self.0.keys()).finish()
    }
}

/// A service's credential could not be fetched: `credential `password`: <why>`.
#[derive(Debug, Clone, thiserror::Error)]
#[error("credential `{credential}`: {source}")]
pub struct CredentialError {
    /// The credential's name in the service (`password`, `host`, ...).
    pub credential: String,
    pub source: SecretError,
}

impl CredentialError {
    /// The [`SecretError::kind`] word.
    #[must_use]
    pub fn kind(&self) -> &'static str {
        self.source.kind()
    }
}
