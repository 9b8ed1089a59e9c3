//! The seam to [`super::oauth2`]: one token source per service with an
//! `authentication: [{type: oauth2}]` entry; the entry's keys mapped onto its
//! [`TokenConfig`] ([`token_config`]) and checked at load ([`check`]).

use std::path::Path;

use super::oauth2::{ClientAuth, TokenConfig, TokenError, TokenSource, http_client};
use crate::{
    config::{Loader, OAuth2ClientAuth, OAuth2Config, join},
    secret::Secret,
    secrets::redact_id,
};

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
        let t = token_config(cfg);
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

    /// Count every token request of `service` in `metrics` (`token_refreshes_total`;
    /// a request is rare, once per token lifetime: the series is looked up each time).
    pub fn observe(&self, metrics: &std::sync::Arc<crate::metrics::Metrics>, service: &str) {
        let metrics = std::sync::Arc::clone(metrics);
        let service = service.to_owned();
        self.0.observe(Box::new(move |result| {
            metrics.token_refresh(&service, result).inc();
        }));
    }

    /// The API refused `token` (401): the next call fetches a new one.
    pub fn invalidate(&self, token: &Secret) {
        self.0.invalidate(token);
    }
}

/// The token source's configuration for an `oauth2` entry.
#[must_use]
pub fn token_config(cfg: &OAuth2Config) -> TokenConfig {
    let mut t = TokenConfig::new(
        cfg.token_url.clone(),
        cfg.client_id.clone(),
        cfg.client_secret.clone(),
    );
    t.scope.clone_from(&cfg.scope);
    t.audience.clone_from(&cfg.audience);
    t.extra.clone_from(&cfg.params);
    t.auth = match cfg.client_auth {
        OAuth2ClientAuth::Basic => ClientAuth::Basic,
        OAuth2ClientAuth::Body => ClientAuth::Body,
    };
    if let Some(d) = cfg.default_lifetime {
        t.default_lifetime = d;
    }
    if let Some(d) = cfg.timeout {
        t.timeout = d;
    }
    t
}

/// At load (and so `broker check`): what [`TokenConfig::validate`] finds wrong with an
/// `oauth2` entry whose `config:` block is at `path`, recorded at the key it concerns
/// (`token_url`, `params`). A `token_url` from the environment is not echoed.
pub fn check(l: &mut Loader<'_>, path: &str, cfg: &OAuth2Config) {
    let url_path = join(path, "token_url");
    let reason = |e: TokenError| match e {
        TokenError::Config { reason } => reason,
        other => other.to_string(),
    };
    // The URL alone first, so its problem is reported at its own key.
    let url_only = TokenConfig::new(cfg.token_url.clone(), "-", Secret::from(String::new()));
    if let Err(e) = url_only.validate() {
        let mut why = reason(e);
        let shown = redact_id(&cfg.token_url).into_owned();
        if l.is_from_env(&url_path) {
            // From the environment: never echoed, even in part.
            why = why.replace(&format!("`{shown}`"), "(value from the environment)");
            if why.contains(&shown) {
                why = "token_url must be an absolute http:// or https:// URL".to_owned();
            }
        }
        l.err(&url_path, why);
    }
    // The rest with a URL known to be good, so only their problems show.
    let mut rest = token_config(cfg);
    rest.token_url = "https://token.invalid/".to_owned();
    if let Err(e) = rest.validate() {
        let key = if cfg.params.is_empty() {
            path.to_owned()
        } else {
            join(path, "params")
        };
        l.err(&key, reason(e));
    }
}
