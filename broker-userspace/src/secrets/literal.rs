//! `literal`: the id is the value itself (`{from: literal, get: value}`).
//!
//! The config loader already turns literal credentials into
//! [`CredentialSource::Literal`](crate::config::CredentialSource::Literal); this provider
//! exists so that every provider name resolves uniformly.

use super::{BoxFuture, Fetched, SecretError, SecretProvider};
use crate::secret::Secret;

pub struct LiteralProvider {
    name: String,
}

impl LiteralProvider {
    #[must_use]
    pub fn new(name: &str) -> Self {
        Self {
            name: name.to_owned(),
        }
    }
}

impl SecretProvider for LiteralProvider {
    fn name(&self) -> &str {
        &self.name
    }

    fn id_is_value(&self) -> bool {
        true
    }

    fn get<'a>(&'a self, id: &'a str) -> BoxFuture<'a, Result<Fetched, SecretError>> {
        Box::pin(async move { Ok(Fetched::new(Secret::from_str_value(id))) })
    }
}
