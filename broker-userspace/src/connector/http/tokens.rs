//! The seam to [`super::oauth2`]: one token source per service with an
//! `authentication: [{type: oauth2}]` entry.

use std::path::Path;

use super::oauth2::{TokenConfig, TokenSource, http_client};
use crate::{config::OAuth2Config, secret::Secret};

/// A service's OAuth2 tokens.
pub struct Tokens(TokenSource);

impl std::fmt::Debug for Tokens {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Tokens")
    }
}

impl Tokens {
    /// # Errors
    /// The token client cannot be built (an unusable CA file, a bad token URL).
    pub fn new(cfg: &OAuth2Config, ca_file: Option<&Path>) -> anyhow::Result<Self> {
        let mut t = TokenConfig::new(
            cfg.token_url.clone(),
            cfg.client_id.clone(),
            cfg.client_secret.clone(),
        );
        t.scope.clone_from(&cfg.scope);
        t.validate()?;
        Ok(Self(TokenSource::new(t, http_client(ca_file)?)))
    }

    /// A valid token (cached, or fetched once for every concurrent caller).
    ///
    /// # Errors
    /// The token endpoint failed; the message names no secret.
    pub async fn token(&self) -> Result<Secret, String> {
        self.0.token().await.map_err(|e| e.to_string())
    }

    /// The API refused `token` (401): the next call fetches a new one.
    pub fn invalidate(&self, token: &Secret) {
        self.0.invalidate(token);
    }
}
