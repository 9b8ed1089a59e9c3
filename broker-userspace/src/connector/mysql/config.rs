//! The `config:` block of a `mysql` service (aliases `mariadb`, `tidb`), parsed and
//! validated here (the loader calls `parse` through `SYNTAX`). Connection settings are
//! credentials, as in Secretless (`host port username password database sslmode
//! sslrootcert sslcert sslkey sslhost`).

use std::{path::PathBuf, sync::Arc, time::Duration};

use yaml_serde::Value;

use crate::config::{
    ConnectorBlock, ConnectorSettings, ConnectorSyntax, InterceptTarget, Loader, join, key_text,
    quoted_list, suggestion,
};

/// How the loader reads a `mysql` service.
pub(super) const SYNTAX: ConnectorSyntax = ConnectorSyntax {
    names: &["mysql", "mariadb", "tidb"],
    required_credentials: &["username", "password"],
    upstream_credentials: &["host"],
    shares_listener: false,
    parse,
};

/// The credentials a `mysql` service reads, for messages.
const CREDENTIALS: &str =
    "host, port, username, password, database, sslmode, sslrootcert, sslcert, sslkey, sslhost";

/// What the broker does with a client that asks for TLS (an SSLRequest).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ClientTls {
    /// Offer TLS in the greeting and terminate it with a certificate from the broker's
    /// local CA. Such a session is relayed in userspace, never spliced in the kernel.
    #[default]
    Terminate,
    /// Do not offer TLS; a client that asks anyway gets an ERR packet.
    Refuse,
}

/// `connector: mysql`.
#[derive(Debug, Clone)]
pub struct MysqlConfig {
    /// `clientTLS`: `terminate` (the default) or `refuse`.
    pub client_tls: ClientTls,
    /// `serverPublicKey`: the server's RSA public key (a PEM file), used to encrypt the
    /// password for `caching_sha2_password`/`sha256_password` full authentication without
    /// TLS. Without it the broker asks the server for its key (which a server
    /// impersonator could answer with its own).
    pub server_public_key: Option<PathBuf>,
    /// `connectTimeout`: how long the upstream side may take, from fetching the
    /// credentials to the server's OK (both attempts of a credential rotation included).
    pub connect_timeout: Duration,
}

/// Default `connectTimeout`.
pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(30);

impl Default for MysqlConfig {
    fn default() -> Self {
        Self {
            client_tls: ClientTls::Terminate,
            server_public_key: None,
            connect_timeout: DEFAULT_CONNECT_TIMEOUT,
        }
    }
}

impl ConnectorSettings for MysqlConfig {}

const KEYS: [&str; 3] = ["clientTLS", "serverPublicKey", "connectTimeout"];

fn parse(l: &mut Loader<'_>, b: &ConnectorBlock<'_>) -> Option<Arc<dyn ConnectorSettings>> {
    let (path, name) = (b.path, b.name);
    let mut out = MysqlConfig::default();
    let before = l.error_count();
    match b.value {
        None => {}
        Some(Value::Mapping(m)) => {
            for k in m.keys() {
                let k = key_text(k).unwrap_or_else(|| "?".to_owned());
                if !KEYS.contains(&k.as_str()) {
                    let hint = suggestion(&k, &KEYS);
                    l.unknown_key(
                        &join(path, &k),
                        format!(
                            "unknown key \"{k}\"{hint}; connection settings of connector \
                             \"{name}\" are credentials ({CREDENTIALS})"
                        ),
                    );
                }
            }
            if let Some(v) = m.get("clientTLS") {
                let p = join(path, "clientTLS");
                match l.non_empty(&p, v).as_deref() {
                    Some("terminate") => out.client_tls = ClientTls::Terminate,
                    Some("refuse") => out.client_tls = ClientTls::Refuse,
                    Some(_) => l.err(&p, "must be terminate or refuse"),
                    None => {}
                }
            }
            if let Some(v) = m.get("serverPublicKey") {
                let p = join(path, "serverPublicKey");
                out.server_public_key = l.non_empty(&p, v).map(PathBuf::from);
            }
            if let Some(v) = m.get("connectTimeout") {
                let p = join(path, "connectTimeout");
                match l.duration(&p, v) {
                    Some(d) if d.is_zero() => l.err(&p, "must be more than 0"),
                    Some(d) => out.connect_timeout = d,
                    None => {}
                }
            }
        }
        Some(_) => l.err(
            path,
            format!(
                "connector \"{name}\" takes a map ({}); connection settings are credentials \
                 ({CREDENTIALS})",
                quoted_list(&KEYS)
            ),
        ),
    }
    upstream_rules(l, b);
    (l.error_count() == before).then(|| Arc::new(out) as Arc<dyn ConnectorSettings>)
}

/// A service whose intercept includes a CIDR block would otherwise log in to whatever
/// address of it the app (or a process squatting on one) names: it needs credential
/// `host`.
fn upstream_rules(l: &mut Loader<'_>, b: &ConnectorBlock<'_>) {
    let cidr = b
        .intercept
        .iter()
        .any(|t| matches!(t, InterceptTarget::Cidr { .. }));
    if cidr && !b.credentials.contains("host") {
        l.err(
            &join(b.service_path, "intercept"),
            "a CIDR target needs an explicit upstream: set credential \"host\" (otherwise the \
             broker would log in to any address of the block the app names)",
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{Config, ConnectorSpec};

    fn load(yaml: &str) -> Result<Config, String> {
        crate::config::load_str_with_env(yaml, &|_| None, &crate::connector::KINDS)
            .map_err(|e| e.to_string())
    }

    fn settings(c: &Config) -> &MysqlConfig {
        let ConnectorSpec::Built { .. } = &c.services[0].connector else {
            panic!("not built")
        };
        c.services[0].connector.settings::<MysqlConfig>().unwrap()
    }

    #[test]
    fn names_defaults_and_keys() {
        for name in ["mysql", "mariadb", "tidb"] {
            let c = load(&format!(
                "version: 2\nservices:\n  db:\n    connector: {name}\n    listenOn: \
                 tcp://127.0.0.1:13306\n    credentials: {{host: db, username: u, password: p}}\n"
            ))
            .unwrap();
            assert_eq!(c.services[0].connector.name(), "mysql");
            let s = settings(&c);
            assert_eq!(s.client_tls, ClientTls::Terminate);
            assert_eq!(s.connect_timeout, DEFAULT_CONNECT_TIMEOUT);
            assert!(s.server_public_key.is_none());
        }
        let c = load(
            "version: 2\nservices:\n  db:\n    connector: mysql\n    listenOn: \
             tcp://127.0.0.1:13306\n    credentials: {host: db, username: u, password: p}\n    \
             config: {clientTLS: refuse, serverPublicKey: /etc/mysql/pub.pem, connectTimeout: 5s}\n",
        )
        .unwrap();
        let s = settings(&c);
        assert_eq!(s.client_tls, ClientTls::Refuse);
        assert_eq!(s.connect_timeout, Duration::from_secs(5));
        assert_eq!(
            s.server_public_key.as_deref(),
            Some(std::path::Path::new("/etc/mysql/pub.pem"))
        );
    }

    #[test]
    fn errors_with_key_paths() {
        let e = load(
            "version: 2\nbroker: {}\nservices:\n  db:\n    connector: mysql\n    listenOn: \
             tcp://127.0.0.1:13306\n    credentials: {host: db, username: u, password: p}\n    \
             config: {clientTLS: maybe, sslmode: disable, connectTimeout: 0s}\n",
        )
        .unwrap_err();
        assert!(
            e.contains("services.db.config.clientTLS: must be terminate or refuse"),
            "{e}"
        );
        assert!(
            e.contains("services.db.config.sslmode: unknown key \"sslmode\""),
            "{e}"
        );
        assert!(e.contains("are credentials (host, port"), "{e}");
        assert!(
            e.contains("services.db.config.connectTimeout: must be more than 0"),
            "{e}"
        );
        // Credentials are required.
        let e = load(
            "version: 2\nservices:\n  db:\n    connector: tidb\n    listenOn: \
             tcp://127.0.0.1:14000\n    credentials: {host: db, username: u}\n",
        )
        .unwrap_err();
        assert!(e.contains("password"), "{e}");
        // A CIDR intercept needs a host.
        let e = load(
            "version: 2\nservices:\n  db:\n    connector: mysql\n    intercept: \
             [\"10.0.0.0/8:3306\"]\n    credentials: {username: u, password: p}\n",
        )
        .unwrap_err();
        assert!(
            e.contains("services.db.intercept: a CIDR target needs"),
            "{e}"
        );
    }
}
