//! Configuration: YAML (Secretless v2 and the user's shapes) -> validated [`Config`].
//!
//! Loading happens in two steps: the text is parsed into a generic YAML value (a syntax
//! error is one error with its line and column), then that value is walked by hand into
//! the immutable model ([`Config`] and the types it holds), collecting *every* problem
//! with its dotted key path (`services.db.credentials.password`,
//! `services[0].authentication[0].config.token_url`) instead of stopping at the first. `${VAR}` references are expanded in every scalar
//! string after parsing, so an environment value can never break the YAML.
//!
//! Error messages never contain a credential value, nor any value that came from the
//! environment. See `docs/CONFIG.md` for the reference of the format.

pub mod audit;
mod interpolate;
mod kinds;
mod load;
mod model;
mod policy;
mod secretless;
mod socket;
mod values;

use std::{fmt, path::Path};

pub use audit::{AuditSettings, AuditSink};
pub use kinds::*;
pub use load::{COMMON_PROVIDER_KEYS, Loader, index, join, key_text, quoted_list, suggestion};
pub use model::*;
pub use socket::MAX_SOCKET_PATH;

/// One problem in a configuration, with the dotted key path it concerns.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    /// Dotted key path (`services.db.credentials.password`, `services[0].intercept[1]`);
    /// empty for whole-file errors (unreadable file, YAML syntax).
    pub path: String,
    /// What is wrong. Never contains a secret value.
    pub message: String,
}

impl ConfigError {
    pub(crate) fn new(path: impl Into<String>, message: impl Into<String>) -> Self {
        Self {
            path: path.into(),
            message: message.into(),
        }
    }
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.path.is_empty() {
            f.write_str(&self.message)
        } else {
            write!(f, "{}: {}", self.path, self.message)
        }
    }
}

impl std::error::Error for ConfigError {}

/// Every problem found in one configuration, in the order they were found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigErrors(pub Vec<ConfigError>);

impl fmt::Display for ConfigErrors {
    /// One error per line: `path: message`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, e) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str("\n")?;
            }
            write!(f, "{e}")?;
        }
        Ok(())
    }
}

impl std::error::Error for ConfigErrors {}

impl ConfigErrors {
    /// Number of errors.
    #[must_use]
    pub fn len(&self) -> usize {
        self.0.len()
    }

    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// The errors whose path is `path` or lies under it (`services.db` matches
    /// `services.db.listenOn`).
    pub fn at<'a>(&'a self, path: &'a str) -> impl Iterator<Item = &'a ConfigError> + 'a {
        self.0.iter().filter(move |e| {
            e.path == path
                || e.path
                    .strip_prefix(path)
                    .is_some_and(|rest| rest.starts_with('.') || rest.starts_with('['))
        })
    }
}

/// Read and validate a configuration file, expanding `${VAR}` from the process
/// environment. `kinds`: the connector kinds (`crate::connector::KINDS`).
///
/// # Errors
/// Every problem found; an unreadable file is one error naming the file.
pub fn load_file<B>(path: &Path, kinds: &ConnectorKinds<B>) -> Result<Config, ConfigErrors> {
    let text = std::fs::read_to_string(path).map_err(|e| {
        ConfigErrors(vec![ConfigError::new(
            "",
            format!("cannot read config file {}: {e}", path.display()),
        )])
    })?;
    load_str(&text, kinds)
}

/// Validate a configuration text, expanding `${VAR}` from the process environment.
///
/// # Errors
/// Every problem found.
pub fn load_str<B>(text: &str, kinds: &ConnectorKinds<B>) -> Result<Config, ConfigErrors> {
    load_str_with_env(text, &process_env, kinds)
}

/// Validate a configuration text, expanding `${VAR}` with `env` (a variable name ->
/// its value, `None` when unset). Lets tests load configs without touching the process
/// environment.
///
/// # Errors
/// Every problem found.
pub fn load_str_with_env<B>(
    text: &str,
    env: &dyn Fn(&str) -> Option<String>,
    kinds: &ConnectorKinds<B>,
) -> Result<Config, ConfigErrors> {
    let kinds = load::Kinds {
        built: kinds.syntaxes(),
        not_built: kinds.not_built,
    };
    load::load(text, env, kinds)
}

fn process_env(name: &str) -> Option<String> {
    std::env::var_os(name).and_then(|v| v.into_string().ok())
}

/// A health endpoint address as `broker.health` takes it (`IP:PORT`, `[IPV6]:PORT`,
/// `localhost:PORT`, or `off`/`false`: `None`), for `--health-addr`.
///
/// # Errors
/// What is expected, without quoting the value.
pub fn parse_health_addr(s: &str) -> Result<Option<std::net::SocketAddr>, String> {
    values::health_addr(s)
}

/// Provider kinds that are built in; each has a default instance of the same name.
pub const BUILT_PROVIDERS: &[&str] = &[
    "literal",
    "env",
    "file",
    "http",
    "vault",
    "conjur",
    "aws",
    "kubernetes",
];

/// Provider kinds that are recognized but not built yet.
pub const NOT_BUILT_PROVIDERS: &[&str] = &["keychain"];

/// Everything a loaded configuration uses that is recognized but not built yet
/// (connectors, provider kinds, authentication types), each as an error naming it.
/// Loading succeeds for these; `broker check` and `broker run` print them as errors.
#[must_use]
pub fn unsupported(cfg: &Config) -> Vec<ConfigError> {
    unsupported_by_service(cfg)
        .into_iter()
        .map(|(_, e)| e)
        .collect()
}

/// [`unsupported`], each problem with the index of the service it concerns.
#[must_use]
pub fn unsupported_by_service(cfg: &Config) -> Vec<(usize, ConfigError)> {
    let mut all = Vec::new();
    for (i, s) in cfg.services.iter().enumerate() {
        let mut out = Vec::new();
        let path = format!("services.{}", s.name);
        if let ConnectorSpec::NotBuilt { name } = &s.connector {
            out.push(ConfigError::new(
                format!("{path}.connector"),
                format!("connector \"{name}\" is not built yet"),
            ));
        }
        for (cred, source) in &s.credentials {
            let CredentialSource::Provider { provider, .. } = source else {
                continue;
            };
            let kind = match cfg.providers.get(provider) {
                Some(ProviderConfig::NotBuilt { kind }) => kind.as_str(),
                Some(_) => continue,
                None if NOT_BUILT_PROVIDERS.contains(&provider.as_str()) => provider.as_str(),
                None => continue,
            };
            let message = if kind == provider {
                format!("provider \"{provider}\" is not built yet")
            } else {
                format!("provider \"{provider}\" (type {kind}) is not built yet")
            };
            out.push(ConfigError::new(
                format!("{path}.credentials.{cred}"),
                message,
            ));
        }
        // `generic_http` and `basic_auth` use OAuth2 tokens; no other connector does
        // (`conjur` and `aws` inject fixed credentials).
        let uses_auth = matches!(
            &s.connector,
            ConnectorSpec::Built {
                kind: "generic_http" | "basic_auth",
                ..
            }
        );
        for (i, a) in s.authentication.iter().enumerate().filter(|_| !uses_auth) {
            let kind = match a {
                AuthMethod::OAuth2(_) => "oauth2",
            };
            out.push(ConfigError::new(
                format!("{path}.authentication[{i}]"),
                format!("authentication type \"{kind}\" is not built yet"),
            ));
        }
        all.extend(out.into_iter().map(|e| (i, e)));
    }
    all
}

#[cfg(test)]
mod policy_tests;
#[cfg(test)]
mod tests;
