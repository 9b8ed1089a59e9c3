//! A `vault` instance's settings: its `providers:` keys, else the environment variables
//! the Vault CLI and Go API client read (which Secretless relies on), else the
//! defaults.
//!
//! | setting | key | environment | default |
//! |---|---|---|---|
//! | server | `address` | `VAULT_ADDR` | `https://127.0.0.1:8200` |
//! | token (method `token`) | `token`, `tokenFile` | `VAULT_TOKEN` | none |
//! | namespace | `namespace` | `VAULT_NAMESPACE` | none |
//! | extra CA | `caFile` | `VAULT_CACERT` | none (system roots) |
//! | request timeout | `timeout` | | 10 s |
//!
//! An empty variable counts as unset, as in the Go client.

use std::{path::PathBuf, time::Duration};

use crate::{
    config::{VaultAuthConfig, VaultProviderConfig, VaultValue},
    secret::Secret,
};

/// Vault's own default address (`api.DefaultConfig`).
pub const DEFAULT_ADDRESS: &str = "https://127.0.0.1:8200";
/// Bound of one request to Vault when `timeout` is not set.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(10);

/// How the provider gets its token.
#[derive(Debug, Clone)]
pub enum Auth {
    /// A fixed token (`token`, or `VAULT_TOKEN`); None when there is none anywhere.
    Token(Option<Secret>),
    /// A file holding the token, read at start and again when Vault refuses the token.
    TokenFile(PathBuf),
    AppRole {
        role_id: VaultValue,
        secret_id: Option<VaultValue>,
        mount: String,
    },
    Kubernetes {
        role: String,
        jwt_file: PathBuf,
        mount: String,
    },
}

impl Auth {
    /// A word for logs.
    #[must_use]
    pub fn method(&self) -> &'static str {
        match self {
            Self::Token(_) | Self::TokenFile(_) => "token",
            Self::AppRole { .. } => "approle",
            Self::Kubernetes { .. } => "kubernetes",
        }
    }

    /// Whether a refused token can be replaced (a new login, a re-read file).
    #[must_use]
    pub fn can_renew_identity(&self) -> bool {
        !matches!(self, Self::Token(_))
    }
}

/// Everything the provider needs, resolved.
#[derive(Debug, Clone)]
pub struct Settings {
    pub address: reqwest::Url,
    pub namespace: Option<String>,
    pub ca_file: Option<PathBuf>,
    pub timeout: Duration,
    pub auth: Auth,
    pub revoke_on_shutdown: bool,
}

/// Resolve `cfg` over the environment (`env`: a variable's value, `None` when unset).
///
/// # Errors
/// A variable that cannot be used (`VAULT_ADDR` not an http(s) URL, `VAULT_TOKEN` or
/// `VAULT_NAMESPACE` not sendable in a header); the message names the variable, never
/// its value.
pub fn resolve(
    cfg: &VaultProviderConfig,
    env: &dyn Fn(&str) -> Option<String>,
) -> Result<Settings, String> {
    let var = |name: &str| env(name).filter(|v| !v.is_empty());
    let address_text = match &cfg.address {
        Some(a) => a.clone(),
        None => var("VAULT_ADDR").unwrap_or_else(|| DEFAULT_ADDRESS.to_owned()),
    };
    let from = if cfg.address.is_some() {
        "address"
    } else {
        "VAULT_ADDR"
    };
    let address = reqwest::Url::parse(&address_text)
        .ok()
        .filter(|u| {
            matches!(u.scheme(), "http" | "https")
                && u.has_host()
                && u.username().is_empty()
                && u.password().is_none()
                && u.query().is_none()
        })
        .ok_or_else(|| {
            format!("{from} is not an http:// or https:// URL (without user-info or query)")
        })?;
    let header_ok = |t: &str| reqwest::header::HeaderValue::from_bytes(t.as_bytes()).is_ok();
    let namespace = match &cfg.namespace {
        Some(n) => Some(n.clone()),
        None => var("VAULT_NAMESPACE"),
    }
    .map(|n| n.trim_matches('/').to_owned())
    .filter(|n| !n.is_empty());
    if namespace.as_deref().is_some_and(|n| !header_ok(n)) {
        return Err("VAULT_NAMESPACE cannot be sent in an HTTP header".into());
    }
    let ca_file = cfg
        .ca_file
        .clone()
        .or_else(|| var("VAULT_CACERT").map(PathBuf::from));
    let auth = match &cfg.auth {
        VaultAuthConfig::Token => match (&cfg.token, &cfg.token_file) {
            (Some(t), _) => Auth::Token(Some(t.clone())),
            (None, Some(f)) => Auth::TokenFile(f.clone()),
            (None, None) => match var("VAULT_TOKEN") {
                Some(t) if !header_ok(&t) => {
                    return Err("VAULT_TOKEN cannot be sent in an HTTP header".into());
                }
                Some(t) => Auth::Token(Some(Secret::from(t))),
                None => Auth::Token(None),
            },
        },
        VaultAuthConfig::AppRole {
            role_id,
            secret_id,
            mount,
        } => Auth::AppRole {
            role_id: role_id.clone(),
            secret_id: secret_id.clone(),
            mount: mount.clone(),
        },
        VaultAuthConfig::Kubernetes {
            role,
            jwt_file,
            mount,
        } => Auth::Kubernetes {
            role: role.clone(),
            jwt_file: jwt_file.clone(),
            mount: mount.clone(),
        },
    };
    Ok(Settings {
        address,
        namespace,
        ca_file,
        timeout: cfg.timeout.unwrap_or(DEFAULT_TIMEOUT),
        auth,
        revoke_on_shutdown: cfg.revoke_on_shutdown,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(vars: &'static [(&'static str, &'static str)]) -> impl Fn(&str) -> Option<String> {
        move |name| {
            vars.iter()
                .find(|(k, _)| *k == name)
                .map(|(_, v)| (*v).to_owned())
        }
    }

    fn token(s: &Settings) -> Option<&str> {
        match &s.auth {
            Auth::Token(t) => t.as_ref().map(|t| t.expose_str().unwrap()),
            _ => None,
        }
    }

    const ALL: &[(&str, &str)] = &[
        ("VAULT_ADDR", "http://env-vault:8200"),
        ("VAULT_TOKEN", "env-token"),
        ("VAULT_NAMESPACE", "env-ns/"),
        ("VAULT_CACERT", "/env/ca.pem"),
    ];

    /// The built-in `vault` instance (no keys) works from the environment alone, as in
    /// Secretless; with nothing set, Vault's own defaults.
    #[test]
    fn the_environment_fills_in_what_the_file_leaves_out() {
        let s = resolve(&VaultProviderConfig::default(), &env(ALL)).unwrap();
        assert_eq!(s.address.as_str(), "http://env-vault:8200/");
        assert_eq!(token(&s), Some("env-token"));
        assert_eq!(s.namespace.as_deref(), Some("env-ns"));
        assert_eq!(s.ca_file, Some(PathBuf::from("/env/ca.pem")));
        assert_eq!(s.timeout, DEFAULT_TIMEOUT);

        let s = resolve(&VaultProviderConfig::default(), &env(&[])).unwrap();
        assert_eq!(s.address.as_str(), "https://127.0.0.1:8200/");
        assert!(matches!(s.auth, Auth::Token(None)));
        assert_eq!(s.namespace, None);
        assert_eq!(s.ca_file, None);
        // Empty variables count as unset.
        let s = resolve(
            &VaultProviderConfig::default(),
            &env(&[
                ("VAULT_ADDR", ""),
                ("VAULT_TOKEN", ""),
                ("VAULT_NAMESPACE", ""),
            ]),
        )
        .unwrap();
        assert_eq!(s.address.as_str(), "https://127.0.0.1:8200/");
        assert!(matches!(s.auth, Auth::Token(None)));
        assert_eq!(s.namespace, None);
    }

    /// Keys of the `providers:` block win over the variables.
    #[test]
    fn keys_override_the_environment() {
        let cfg = VaultProviderConfig {
            address: Some("https://file-vault:8200".into()),
            token: Some(Secret::from_str_value("file-token")),
            namespace: Some("file-ns".into()),
            ca_file: Some("/file/ca.pem".into()),
            timeout: Some(Duration::from_secs(3)),
            revoke_on_shutdown: true,
            declared: true,
            ..VaultProviderConfig::default()
        };
        let s = resolve(&cfg, &env(ALL)).unwrap();
        assert_eq!(s.address.as_str(), "https://file-vault:8200/");
        assert_eq!(token(&s), Some("file-token"));
        assert_eq!(s.namespace.as_deref(), Some("file-ns"));
        assert_eq!(s.ca_file, Some(PathBuf::from("/file/ca.pem")));
        assert_eq!(s.timeout, Duration::from_secs(3));
        assert!(s.revoke_on_shutdown);

        // tokenFile wins over VAULT_TOKEN too.
        let cfg = VaultProviderConfig {
            token_file: Some("/run/token".into()),
            ..VaultProviderConfig::default()
        };
        let s = resolve(&cfg, &env(ALL)).unwrap();
        assert!(matches!(&s.auth, Auth::TokenFile(p) if p == &PathBuf::from("/run/token")));

        // A login method ignores VAULT_TOKEN (as `vault login -method=...` does).
        let cfg = VaultProviderConfig {
            auth: VaultAuthConfig::Kubernetes {
                role: "app".into(),
                jwt_file: "/jwt".into(),
                mount: "kubernetes".into(),
            },
            ..VaultProviderConfig::default()
        };
        let s = resolve(&cfg, &env(ALL)).unwrap();
        assert!(matches!(&s.auth, Auth::Kubernetes { role, .. } if role == "app"));
        assert_eq!(s.address.as_str(), "http://env-vault:8200/");
    }

    /// Unusable variables are errors naming the variable, never its value.
    #[test]
    fn bad_variables_are_named_not_echoed() {
        for (vars, name) in [
            (&[("VAULT_ADDR", "ftp://secret-host")][..], "VAULT_ADDR"),
            (
                &[("VAULT_ADDR", "http://user:pw-xyz@host")][..],
                "VAULT_ADDR",
            ),
            (&[("VAULT_TOKEN", "tok\nen-xyz")][..], "VAULT_TOKEN"),
            (&[("VAULT_NAMESPACE", "ns\nxyz")][..], "VAULT_NAMESPACE"),
        ] {
            let vars: &'static [(&'static str, &'static str)] =
                Box::leak(vars.to_vec().into_boxed_slice());
            let e = resolve(&VaultProviderConfig::default(), &env(vars)).unwrap_err();
            assert!(e.contains(name), "{e}");
            assert!(!e.contains("xyz") && !e.contains("secret-host"), "{e}");
        }
    }
}
