//! `env`: the id is an environment variable name, read at each fetch.

use super::{BoxFuture, Fetched, SecretError, SecretProvider};
use crate::secret::Secret;

pub struct EnvProvider {
    name: String,
}

impl EnvProvider {
    #[must_use]
    pub fn new(name: &str) -> Self {
        Self {
            name: name.to_owned(),
        }
    }
}

impl SecretProvider for EnvProvider {
    fn name(&self) -> &str {
        &self.name
    }

    fn get<'a>(&'a self, id: &'a str) -> BoxFuture<'a, Result<Fetched, SecretError>> {
        Box::pin(async move {
            // `var_os` panics on these; they can never name a variable.
            if id.is_empty() || id.contains(['=', '\0']) {
                return Err(SecretError::NotFound {
                    provider: self.name.clone(),
                    id: id.to_owned(),
                });
            }
            match std::env::var_os(id) {
                Some(v) => Ok(Fetched::new(Secret::new(
                    std::os::unix::ffi::OsStringExt::into_vec(v),
                ))),
                None => Err(SecretError::NotFound {
                    provider: self.name.clone(),
                    id: id.to_owned(),
                }),
            }
        })
    }
}
