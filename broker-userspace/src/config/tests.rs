//! Loader tests: the seed documents and examples load as written; every malformed input
//! is reported with its key path; no secret ever appears in an error.

use std::{collections::HashMap, time::Duration};

use super::*;
use crate::connector::{
    KINDS,
    pg::config::{AuthKind, DEFAULT_SCRAM_MAX_ITERATIONS, PgConfig},
    tcp::TcpConfig,
};

const SEED_003: &str = include_str!("../../../config/seed-003-uts.yaml");
const SEED_000: &str = include_str!("../../../config/seed-000-oauth2.yaml");
const SECRETLESS_V2: &str = include_str!("../../../config/secretless-v2.yaml");
const EXAMPLE: &str = include_str!("../../../config/example.yaml");

fn no_env(_: &str) -> Option<String> {
    None
}

fn load_env(text: &str, vars: &[(&str, &str)]) -> Result<Config, ConfigErrors> {
    let vars: HashMap<String, String> = vars
        .iter()
        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
        .collect();
    load_str_with_env(text, &move |k| vars.get(k).cloned(), &KINDS)
}

#[track_caller]
fn ok(text: &str) -> Config {
    match load_str_with_env(text, &no_env, &KINDS) {
        Ok(c) => c,
        Err(e) => panic!("expected the config to load, got:\n{e}"),
    }
}

#[track_caller]
fn errs(text: &str) -> ConfigErrors {
    match load_str_with_env(text, &no_env, &KINDS) {
        Ok(c) => panic!("expected errors, loaded: {c:#?}"),
        Err(e) => e,
    }
}

/// Assert there is an error at exactly `path` whose message contains `needle`.
#[track_caller]
fn has(e: &ConfigErrors, path: &str, needle: &str) {
    assert!(
        e.0.iter()
            .any(|x| x.path == path && x.message.contains(needle)),
        "no error at {path:?} containing {needle:?}; got:\n{e}"
    );
}

fn literal(s: &Service, name: &str) -> String {
    match &s.credentials[name] {
        CredentialSource::Literal(v) => v.expose_str().unwrap().to_owned(),
        other => panic!("{name}: not a literal: {other:?}"),
    }
}

fn from(s: &Service, name: &str) -> (String, String) {
    match &s.credentials[name] {
        CredentialSource::Provider { provider, id } => (provider.clone(), id.clone()),
        other => panic!("{name}: not from a provider: {other:?}"),
    }
}

fn unsupported_text(cfg: &Config) -> Vec<String> {
    unsupported(cfg).iter().map(ToString::to_string).collect()
}

const PG: &str = "
version: 2
services:
  db:
    connector: pg
    listenOn: tcp://127.0.0.1:5432
    credentials:
      host: db.internal
      username: app
      password: pw
";

// ---- the documents the user brings -------------------------------------------------

#[test]
fn seed_003_uts_loads_with_one_line_added() {
    // As written, the HTTP service says nothing about what to inject: the error names
    // the credential and gives an example.
    let e = errs(SEED_003).to_string();
    assert!(
        e.contains("services.novu-api.config") && e.contains("api_key") && e.contains("headers"),
        "{e}"
    );
    let listen = "    listenOn: \"tcp://127.0.0.1:8081\" # Local proxy for Novu\n";
    assert!(SEED_003.contains(listen));
    let fixed = SEED_003.replace(
        listen,
        &format!(
            "{listen}    config: {{upstream: \"https://api.novu.co\", headers: {{Authorization: \"ApiKey {{{{ .api_key }}}}\"}}}}\n"
        ),
    );
    let cfg = ok(&fixed);
    assert_eq!(cfg.services.len(), 2);

    let db = &cfg.services[0];
    assert_eq!(db.name, "dao-governance-db");
    assert!(db.connector.settings::<TcpConfig>().unwrap().tls.is_none());
    assert_eq!(
        db.listen_on,
        Some(ListenAddr::Tcp("127.0.0.1:5432".parse().unwrap()))
    );
    assert!(db.intercept.is_empty());
    assert_eq!(db.credentials.len(), 3);
    for k in ["username", "password", "host"] {
        assert_eq!(
            from(db, k),
            (
                "http".to_owned(),
                format!("http://uts.internal/secrets/dao-governance-db/{k}")
            )
        );
    }

    let novu = &cfg.services[1];
    assert_eq!(novu.name, "novu-api");
    assert_eq!(novu.connector.name(), "generic_http");
    assert_eq!(
        from(novu, "api_key"),
        (
            "http".to_owned(),
            "http://uts.internal/secrets/novu/api-key".to_owned()
        )
    );

    // The built-in instances exist; `http` has no token.
    for p in ["literal", "env", "file", "http"] {
        assert!(cfg.providers.contains_key(p), "{p}");
    }
    let ProviderConfig::Http(h) = &cfg.providers["http"] else {
        panic!("http is not an http provider")
    };
    assert!(h.token.is_none());
    assert_eq!(h.timeout, DEFAULT_HTTP_TIMEOUT);

    assert!(unsupported_text(&cfg).is_empty());
}

#[test]
fn seed_000_oauth2_loads_with_its_environment() {
    // One line added: where the app's requests come from.
    let e = errs(SEED_000).to_string();
    assert!(e.contains("needs \"listenOn\" or \"intercept\""), "{e}");
    let seed = SEED_000.replace(
        "    connector: generic_http\n",
        "    connector: generic_http\n    intercept: [api.aci.dev:443]\n",
    );
    let cfg = load_env(
        &seed,
        &[
            ("ACI_TOKEN_URL", "https://aci.example/oauth/token"),
            ("ACI_CLIENT_ID", "eliza"),
            ("ACI_CLIENT_SECRET", "s3cr3t-client"),
        ],
    )
    .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(cfg.services.len(), 1);
    let s = &cfg.services[0];
    assert_eq!(s.name, "elizaos-agents");
    assert_eq!(s.connector.name(), "generic_http");
    assert!(s.listen_on.is_none());
    let [AuthMethod::OAuth2(o)] = s.authentication.as_slice() else {
        panic!("expected one oauth2 entry: {:?}", s.authentication)
    };
    assert_eq!(o.token_url, "https://aci.example/oauth/token");
    assert_eq!(o.client_id, "eliza");
    assert_eq!(o.client_secret.expose_str().unwrap(), "s3cr3t-client");
    assert_eq!(o.scope.as_deref(), Some("agent:execute blockchain:read"));

    assert!(unsupported_text(&cfg).is_empty());
}

#[test]
fn seed_000_without_its_environment_names_each_variable() {
    let e = errs(SEED_000);
    // The three variables, and no way in (see seed_000_oauth2_loads_with_its_environment).
    assert_eq!(e.len(), 4, "{e}");
    has(
        &e,
        "services[0].authentication[0].config.token_url",
        "environment variable ACI_TOKEN_URL is not set",
    );
    has(
        &e,
        "services[0].authentication[0].config.client_id",
        "environment variable ACI_CLIENT_ID is not set",
    );
    has(
        &e,
        "services[0].authentication[0].config.client_secret",
        "environment variable ACI_CLIENT_SECRET is not set",
    );
}

#[test]
fn secretless_v2_example_loads() {
    let cfg = ok(SECRETLESS_V2);
    let names: Vec<&str> = cfg.services.iter().map(|s| s.name.as_str()).collect();
    assert_eq!(names, ["pg-tcp", "pg-socket", "mysql-db"]);

    let pg = &cfg.services[0];
    assert!(pg.connector.settings::<PgConfig>().is_some());
    assert_eq!(literal(pg, "host"), "db.internal");
    assert_eq!(literal(pg, "port"), "5432");
    assert_eq!(literal(pg, "sslmode"), "require");
    assert_eq!(from(pg, "username"), ("env".into(), "PG_USER".into()));
    assert_eq!(
        from(pg, "password"),
        ("vault".into(), "kv/db#password".into())
    );

    let sock = &cfg.services[1];
    assert!(sock.connector.settings::<PgConfig>().is_some());
    assert_eq!(
        sock.listen_on,
        Some(ListenAddr::Unix("/sock/.s.PGSQL.5432".into()))
    );
    // `from: literal` is a literal.
    assert_eq!(literal(sock, "username"), "app");
    assert_eq!(
        from(sock, "host"),
        ("file".into(), "/run/secrets/pg-host".into())
    );

    // The vault kind, used without an instance, is the built-in one (environment).
    assert!(matches!(
        &cfg.providers["vault"],
        ProviderConfig::Vault(v) if !v.declared
    ));
    // `listenOn: unix://` is served: nothing unsupported.
    assert!(unsupported_text(&cfg).is_empty());
    let my = &cfg.services[2];
    assert!(
        my.connector
            .settings::<crate::connector::mysql::MysqlConfig>()
            .is_some()
    );
    assert_eq!(literal(my, "host"), "mysql.internal");
}

#[test]
fn our_example_loads() {
    let cfg = load_env(EXAMPLE, &[("UTS_AUTH_TOKEN", "tok-123")]).unwrap_or_else(|e| panic!("{e}"));
    assert!(unsupported(&cfg).is_empty(), "{:?}", unsupported(&cfg));
    let db = &cfg.services[0];
    assert_eq!(db.name, "orders-db");
    assert!(db.connector.settings::<PgConfig>().is_some());
    assert_eq!(
        db.intercept,
        vec![
            InterceptTarget::Host {
                host: "db.example.com".into(),
                port: 5432
            },
            InterceptTarget::Cidr {
                net: "10.20.0.0/24".parse().unwrap(),
                port: 5432
            },
        ]
    );
    assert_eq!(
        from(db, "password"),
        ("uts".into(), "orders-db#password".into())
    );
    let ProviderConfig::Http(uts) = &cfg.providers["uts"] else {
        panic!("uts is not http")
    };
    assert_eq!(
        uts.base_url.as_deref(),
        Some("https://uts.internal/secrets/")
    );
    assert_eq!(uts.token.as_ref().unwrap().expose_str().unwrap(), "tok-123");
    assert_eq!(uts.timeout, Duration::from_secs(5));
    assert_eq!(
        uts.ca_file.as_deref(),
        Some(std::path::Path::new("/etc/broker/uts-ca.pem"))
    );

    let cache = &cfg.services[1];
    let Some(TcpConfig { tls: Some(tls) }) = cache.connector.settings::<TcpConfig>() else {
        panic!("cache: {:?}", cache.connector)
    };
    assert_eq!(tls.server_name.as_deref(), Some("redis.internal"));
    assert!(!tls.insecure_skip_verify);

    assert_eq!(cfg.broker.bypass_mark, 0x539);
    assert_eq!(cfg.broker.cache_ttl, Duration::from_secs(60));
    assert_eq!(
        cfg.broker.health_addr,
        Some("127.0.0.1:5335".parse().unwrap())
    );
}

#[test]
fn example_files_on_disk_load_through_load_file() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../config");
    // Seed 003's HTTP service names nothing to inject (see seed_003_uts_loads_with_one_line_added).
    let e = load_file_k(&dir.join("seed-003-uts.yaml")).unwrap_err();
    assert!(e.to_string().contains("services.novu-api.config"), "{e}");
    let e = load_file_k(&dir.join("no-such-file.yaml")).unwrap_err();
    assert_eq!(e.len(), 1);
    assert_eq!(e.0[0].path, "");
    assert!(e.0[0].message.contains("no-such-file.yaml"), "{e}");
}

// ---- shapes and defaults -----------------------------------------------------------

#[test]
fn minimal_pg_and_defaults() {
    let cfg = ok(PG);
    assert_eq!(cfg.broker.transparent_port, 0);
    assert_eq!(cfg.broker.cache_ttl, DEFAULT_CACHE_TTL);
    assert_eq!(cfg.broker.bypass_mark, broker_common::DEFAULT_BYPASS_MARK);
    assert_eq!(
        cfg.broker.health_addr,
        Some(DEFAULT_HEALTH_ADDR.parse().unwrap())
    );
    assert_eq!(literal(&cfg.services[0], "password"), "pw");
    assert!(unsupported(&cfg).is_empty());
}

#[test]
fn version_forms() {
    ok(&PG.replace("version: 2", "version: \"2\""));
    ok(&PG.replace("version: 2", "version: '2'"));
    let e = errs(&PG.replace("version: 2", "version: 3"));
    has(&e, "version", "only version 2");
    let e = errs(&PG.replace("version: 2", ""));
    has(&e, "version", "missing");
}

#[test]
fn broker_block() {
    let cfg = ok(&format!(
        "{PG}broker:\n  health: \"off\"\n  transparentPort: 15001\n  cacheTTL: 0s\n  bypassMark: 0x100\n"
    ));
    assert_eq!(cfg.broker.health_addr, None);
    assert_eq!(cfg.broker.transparent_port, 15001);
    assert_eq!(cfg.broker.cache_ttl, Duration::ZERO);
    assert_eq!(cfg.broker.bypass_mark, 0x100);

    let cfg = ok(&format!(
        "{PG}broker:\n  health: off\n  cacheTTL: 1500ms\n  bypassMark: 1337\n"
    ));
    assert_eq!(cfg.broker.health_addr, None);
    assert_eq!(cfg.broker.cache_ttl, Duration::from_millis(1500));
    assert_eq!(cfg.broker.bypass_mark, 1337);

    let cfg = ok(&format!(
        "{PG}broker:\n  health: \"[::1]:9000\"\n  cacheTTL: 2m\n"
    ));
    assert_eq!(cfg.broker.health_addr, Some("[::1]:9000".parse().unwrap()));
    assert_eq!(cfg.broker.cache_ttl, Duration::from_secs(120));

    let e = errs(&format!(
        "{PG}broker:\n  health: nowhere\n  transparentPort: 70000\n  cacheTTL: 60\n  bypassMark: -1\n  colour: blue\n"
    ));
    has(&e, "broker.health", "invalid address");
    has(&e, "broker.transparentPort", "port number");
    has(&e, "broker.cacheTTL", "missing unit");
    has(&e, "broker.bypassMark", "socket mark");
    has(&e, "broker.colour", "unknown key \"colour\"");
    assert_eq!(e.len(), 5, "{e}");
    let e = errs(&format!("{PG}broker:\n  bypassMark: 0\n"));
    has(&e, "broker.bypassMark", "must not be 0");

    assert!(ok(PG).broker.splice, "splice is on by default");
    assert!(!ok(&format!("{PG}broker:\n  splice: false\n")).broker.splice);
    let e = errs(&format!("{PG}broker:\n  splice: sometimes\n"));
    has(&e, "broker.splice", "true or false");
}

#[test]
fn services_as_a_list_with_credentials_as_a_map_and_from_synonym() {
    let cfg = ok("
version: 2
services:
  - name: a
    connector: postgres
    intercept: [\"db.example.com:5432\", \"10.0.0.5:5432\", \"[2001:db8::5]:5432\"]
    credentials:
      username: {provider: env, get: U}
      password: {from: file, get: /run/pw}
  - name: b
    connector: tcp
    intercept: \"[2001:db8::/64]:443\"
    credentials:
      - {name: token, from: env, get: TOKEN}
");
    let a = &cfg.services[0];
    assert_eq!(a.intercept.len(), 3);
    assert_eq!(from(a, "username"), ("env".into(), "U".into()));
    let b = &cfg.services[1];
    assert_eq!(
        b.intercept,
        vec![InterceptTarget::Cidr {
            net: "2001:db8::/64".parse().unwrap(),
            port: 443
        }]
    );
    assert_eq!(from(b, "token"), ("env".into(), "TOKEN".into()));
}

#[test]
fn anchors_and_merge_keys() {
    let cfg = ok("
version: 2
services:
  a:
    connector: pg
    listenOn: tcp://127.0.0.1:5432
    credentials: &creds
      host: db.internal
      username: app
      password: {from: env, get: PW}
  b:
    connector: pg
    listenOn: tcp://127.0.0.1:5433
    credentials:
      <<: *creds
      username: other
");
    assert_eq!(literal(&cfg.services[1], "host"), "db.internal");
    assert_eq!(literal(&cfg.services[1], "username"), "other");
    assert_eq!(
        from(&cfg.services[1], "password"),
        ("env".into(), "PW".into())
    );
}

#[test]
fn scalars_become_text() {
    let cfg = ok("
version: 2
services:
  db:
    connector: tcp
    listenOn: tcp://localhost:6000
    credentials:
      host: 10.1.2.3
      port: 6379
      flag: true
      ratio: 1.5
");
    let s = &cfg.services[0];
    assert_eq!(
        s.listen_on,
        Some(ListenAddr::Tcp("127.0.0.1:6000".parse().unwrap()))
    );
    assert_eq!(literal(s, "port"), "6379");
    assert_eq!(literal(s, "flag"), "true");
    assert_eq!(literal(s, "ratio"), "1.5");
}

#[test]
fn tcp_tls_forms() {
    let with = |tls: &str| {
        format!(
            "version: 2\nservices:\n  t:\n    connector: tcp\n    intercept: [\"x.internal:443\"]\n    config:\n      tls: {tls}\n"
        )
    };
    let tls_of = |cfg: &Config| match cfg.services[0].connector.settings::<TcpConfig>() {
        Some(t) => t.tls.clone(),
        None => panic!("{:?}", cfg.services[0].connector),
    };
    assert!(tls_of(&ok(&with("false"))).is_none());
    assert!(tls_of(&ok(&with("true"))).is_some());
    let t = tls_of(&ok(&with(
        "{caFile: /ca.pem, serverName: x.internal, insecureSkipVerify: true}",
    )))
    .unwrap();
    assert_eq!(t.ca_file.as_deref(), Some(std::path::Path::new("/ca.pem")));
    assert_eq!(t.server_name.as_deref(), Some("x.internal"));
    assert!(t.insecure_skip_verify);
    let e = errs(&with("{cafile: /ca.pem, insecureSkipVerify: maybe}"));
    has(
        &e,
        "services.t.config.tls.cafile",
        "did you mean \"caFile\"",
    );
    has(
        &e,
        "services.t.config.tls.insecureSkipVerify",
        "true or false",
    );
    let e = errs(&with("[1]"));
    has(&e, "services.t.config.tls", "must be true, false or a map");
}

#[test]
fn providers_block() {
    let cfg = load_env(
        "
version: 2
providers:
  http:
    token: ${UTS_AUTH_TOKEN}
  uts:
    type: http
    baseUrl: https://uts.internal/
    tokenFile: /run/uts-token
    timeout: 3s
  env:
    type: env
  mykeys:
    type: keychain
    anything: [goes, here]
services:
  db:
    connector: pg
    intercept: [\"db:5432\"]
    credentials:
      username: {from: uts, get: db/user}
      password: {from: mykeys, get: kv/db#password}
      extra: {from: keychain, get: prod/db/password}
",
        &[("UTS_AUTH_TOKEN", "t0ken")],
    )
    .unwrap_or_else(|e| panic!("{e}"));
    let ProviderConfig::Http(http) = &cfg.providers["http"] else {
        panic!()
    };
    assert_eq!(http.token.as_ref().unwrap().expose_str().unwrap(), "t0ken");
    assert_eq!(http.timeout, DEFAULT_HTTP_TIMEOUT);
    let ProviderConfig::Http(uts) = &cfg.providers["uts"] else {
        panic!()
    };
    assert_eq!(
        uts.token_file.as_deref(),
        Some(std::path::Path::new("/run/uts-token"))
    );
    assert_eq!(uts.timeout, Duration::from_secs(3));
    assert!(
        matches!(&cfg.providers["mykeys"], ProviderConfig::NotBuilt { kind } if kind == "keychain")
    );
    assert_eq!(
        unsupported_text(&cfg),
        vec![
            "services.db.credentials.extra: provider \"keychain\" is not built yet",
            "services.db.credentials.password: provider \"mykeys\" (type keychain) is not built yet",
        ]
    );

    let e = errs(
        "
version: 2
providers:
  a: {type: http, token: x, tokenFile: /f, timeout: 0s, baseUrl: ftp://x, extra: 1}
  b: {type: magic}
  c: {}
  d: {type: env, baseUrl: http://x}
services:
  db: {connector: tcp, intercept: [\"db:1\"]}
",
    );
    has(&e, "providers.a", "either \"token\" or \"tokenFile\"");
    has(&e, "providers.a.timeout", "more than zero");
    has(&e, "providers.a.baseUrl", "invalid URL");
    has(&e, "providers.a.extra", "unknown key \"extra\"");
    has(&e, "providers.b.type", "unknown provider type \"magic\"");
    has(&e, "providers.c", "missing \"type\"");
    has(&e, "providers.d.baseUrl", "unknown key \"baseUrl\"");
}

/// `vault` instances: every key, the three auth methods with their defaults, and the
/// errors (each with its key path; tokens and secret ids never echoed).
#[test]
fn vault_providers() {
    use super::{VaultAuthConfig, VaultValue};
    let cfg = load_env(
        "
version: 2
providers:
  vault:
    address: https://vault.internal:8200
    token: ${VT}
    namespace: team-a
    caFile: /etc/vault-ca.pem
    timeout: 3s
    revokeOnShutdown: true
  byfile: {type: vault, tokenFile: /run/vault-token}
  role:
    type: vault
    auth: {method: approle, roleId: r-1, secretIdFile: /run/sid, mount: /ar/}
  k8s:
    type: vault
    auth: {method: kubernetes, role: app}
  tok: {type: vault, auth: {method: token}}
services:
  db:
    connector: tcp
    intercept: [\"db:1\"]
    credentials:
      password: {from: role, get: database/creds/app#password}
",
        &[("VT", "hvs.file-token-xyz")],
    )
    .unwrap_or_else(|e| panic!("{e}"));
    let v = |name: &str| match &cfg.providers[name] {
        ProviderConfig::Vault(v) => v.clone(),
        other => panic!("{name}: {other:?}"),
    };
    let d = v("vault");
    assert!(d.declared && d.revoke_on_shutdown);
    assert_eq!(d.address.as_deref(), Some("https://vault.internal:8200"));
    assert_eq!(d.token.unwrap().expose_str().unwrap(), "hvs.file-token-xyz");
    assert_eq!(d.namespace.as_deref(), Some("team-a"));
    assert_eq!(d.ca_file, Some("/etc/vault-ca.pem".into()));
    assert_eq!(d.timeout, Some(Duration::from_secs(3)));
    assert!(matches!(d.auth, VaultAuthConfig::Token));
    assert_eq!(v("byfile").token_file, Some("/run/vault-token".into()));
    match v("role").auth {
        VaultAuthConfig::AppRole {
            role_id: VaultValue::Inline(r),
            secret_id: Some(VaultValue::File(f)),
            mount,
        } => {
            assert_eq!(r.expose_str().unwrap(), "r-1");
            assert_eq!(f, std::path::PathBuf::from("/run/sid"));
            assert_eq!(mount, "ar");
        }
        other => panic!("{other:?}"),
    }
    match v("k8s").auth {
        VaultAuthConfig::Kubernetes {
            role,
            jwt_file,
            mount,
        } => {
            assert_eq!(role, "app");
            assert_eq!(
                jwt_file,
                std::path::PathBuf::from("/var/run/secrets/kubernetes.io/serviceaccount/token")
            );
            assert_eq!(mount, "kubernetes");
        }
        other => panic!("{other:?}"),
    }
    assert!(unsupported_text(&cfg).is_empty());

    // Without a providers block, `vault` is the built-in instance (environment only).
    let cfg = ok("
version: 2
services:
  db:
    connector: tcp
    intercept: [\"db:1\"]
    credentials:
      password: {from: vault, get: kv/db#password}
");
    assert!(matches!(&cfg.providers["vault"], ProviderConfig::Vault(v) if !v.declared));
    assert!(unsupported_text(&cfg).is_empty());

    let e = errs(
        "
version: 2
providers:
  a: {type: vault, address: \"ftp://user:pw-xyz@host\", token: t, tokenFile: /f, timeout: 0s, extra: 1}
  b: {type: vault, auth: {method: ldap}}
  c: {type: vault, auth: {method: approle, secretId: sid-xyz, secretIdFile: /s}}
  d: {type: vault, auth: {method: kubernetes, jwtFile: /j}}
  e: {type: vault, token: t, auth: {method: approle, roleId: r}}
  f: {type: vault, auth: {method: token, role: x}}
  g: {type: vault, auth: approle}
  h: {type: vault, revokeOnShutdown: maybe}
services:
  db: {connector: tcp, intercept: [\"db:1\"]}
",
    );
    has(&e, "providers.a.address", "invalid address");
    has(&e, "providers.a", "either \"token\" or \"tokenFile\"");
    has(&e, "providers.a.timeout", "more than zero");
    has(&e, "providers.a.extra", "unknown key \"extra\"");
    has(
        &e,
        "providers.b.auth.method",
        "unknown auth method \"ldap\"",
    );
    has(&e, "providers.c.auth", "missing \"roleId\"");
    has(
        &e,
        "providers.c.auth",
        "either \"secretId\" or \"secretIdFile\"",
    );
    has(&e, "providers.d.auth", "missing \"role\"");
    has(&e, "providers.e", "not both");
    has(&e, "providers.f.auth.role", "unknown key \"role\"");
    has(&e, "providers.g.auth", "must be a map");
    has(&e, "providers.h.revokeOnShutdown", "true or false");
    let all = e.to_string();
    assert!(!all.contains("pw-xyz") && !all.contains("sid-xyz"), "{all}");
}

#[test]
fn interpolation_defaults_and_dollars() {
    let cfg = load_env(
        "
version: 2
broker:
  transparentPort: ${PORT}
  cacheTTL: ${TTL:-5s}
services:
  db:
    connector: tcp
    listenOn: tcp://127.0.0.1:${LPORT:-7000}
    credentials:
      host: ${HOST}
      password: pa$$word
      template: \"Bearer {{ .token }} costs $5\"
",
        &[("PORT", "15001"), ("HOST", "redis.internal")],
    )
    .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(cfg.broker.transparent_port, 15001);
    assert_eq!(cfg.broker.cache_ttl, Duration::from_secs(5));
    let s = &cfg.services[0];
    assert_eq!(
        s.listen_on,
        Some(ListenAddr::Tcp("127.0.0.1:7000".parse().unwrap()))
    );
    assert_eq!(literal(s, "host"), "redis.internal");
    assert_eq!(literal(s, "password"), "pa$word");
    assert_eq!(literal(s, "template"), "Bearer {{ .token }} costs $5");
}

#[test]
fn interpolated_values_never_break_yaml() {
    // A value full of YAML syntax stays one string.
    let cfg = load_env(
        &format!(
            "broker: {{}}\n{}",
            PG.replace("password: pw", "password: ${PW}")
        ),
        &[("PW", "a: b\n- c # d {e} [f] 'g\" \\")],
    )
    .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(
        literal(&cfg.services[0], "password"),
        "a: b\n- c # d {e} [f] 'g\" \\"
    );
}

// ---- malformed configurations ------------------------------------------------------

#[test]
fn bad_yaml_is_one_error_with_line_and_column() {
    let e = errs("version: 2\nservices:\n  db:\n    connector: pg\n   listenOn: x\n");
    assert_eq!(e.len(), 1, "{e}");
    assert_eq!(e.0[0].path, "");
    assert!(e.0[0].message.contains("line 5"), "{e}");
    assert!(e.0[0].message.contains("column"), "{e}");

    let e = errs("version: 2\nservices: [\n");
    assert!(e.0[0].message.contains("line"), "{e}");

    let e = errs("");
    has(&e, "", "empty");
    let e = errs("- a\n- b\n");
    has(&e, "", "top level must be a map");
    let e = errs("version: 2\nversion: 2\n");
    assert!(e.0[0].message.contains("duplicate"), "{e}");
}

#[test]
fn unknown_keys_are_named() {
    let e = errs(
        "
version: 2
broker: {}
servics: {}
services:
  db:
    connector: pg
    listenOn: tcp://127.0.0.1:5432
    conifg: {}
    credentials:
      host: h
      username: u
      password: {from: env, get: PW, default: x}
",
    );
    has(
        &e,
        "servics",
        "unknown key \"servics\" (did you mean \"services\"?)",
    );
    has(
        &e,
        "services.db.conifg",
        "unknown key \"conifg\" (did you mean \"config\"?)",
    );
    has(
        &e,
        "services.db.credentials.password.default",
        "unknown key \"default\"",
    );
    assert_eq!(e.len(), 3, "{e}");
}

#[test]
fn unknown_provider_and_connector() {
    let e = errs(
        "
version: 2
services:
  db:
    connector: pgsql
    listenOn: tcp://127.0.0.1:5432
    credentials:
      password: {from: hashicorp, get: x}
  list:
    connector: tcp
    listenOn: tcp://127.0.0.1:5433
    credentials:
      - {name: host, provider: nowhere, get: x}
",
    );
    has(&e, "services.db.connector", "unknown connector \"pgsql\"");
    has(&e, "services.db.connector", "\"postgresql\"");
    has(
        &e,
        "services.db.credentials.password.from",
        "unknown provider \"hashicorp\"",
    );
    has(
        &e,
        "services.list.credentials[0].provider",
        "unknown provider \"nowhere\"",
    );
}

#[test]
fn bad_intercept_targets() {
    let e = errs(
        "
version: 2
services:
  db:
    connector: pg
    intercept:
      - 10.0.0.0/33:5432
      - db.example.com
      - 10.0.0.1:99999
      - 2001:db8::1:5432
      - ok.example.com:5432
      - ok.example.com:5432
    credentials: {username: u, password: p}
  other:
    connector: tcp
    intercept: [\"OK.example.com:5432\", \"10.1.0.0/16:80\"]
  third:
    connector: tcp
    intercept: [\"10.1.0.0/16:80\"]
",
    );
    has(&e, "services.db.intercept[0]", "invalid CIDR");
    has(&e, "services.db.intercept[1]", "missing \":PORT\"");
    has(&e, "services.db.intercept[2]", "port must be");
    has(&e, "services.db.intercept[3]", "brackets");
    has(
        &e,
        "services.db.intercept[5]",
        "also listed at services.db.intercept[4]",
    );
    has(
        &e,
        "services.other.intercept[0]",
        "also listed at services.db.intercept[4]",
    );
    has(
        &e,
        "services.third.intercept[0]",
        "also listed at services.other.intercept[1]",
    );
    assert_eq!(e.len(), 7, "{e}");
}

#[test]
fn missing_credentials_and_listeners() {
    let e = errs(
        "
version: 2
services:
  pg-nothing:
    connector: pg
    listenOn: tcp://127.0.0.1:5432
  pg-intercept:
    connector: pg
    intercept: [\"db:5432\"]
    credentials: {username: u}
  tcp-no-host:
    connector: tcp
    listenOn: tcp://127.0.0.1:6000
  nowhere:
    connector: tcp
    credentials: {host: h}
  env-no-get:
    connector: tcp
    listenOn: tcp://127.0.0.1:6001
    credentials:
      host: {from: env}
",
    );
    has(
        &e,
        "services.pg-nothing.credentials",
        "missing \"username\"",
    );
    has(
        &e,
        "services.pg-nothing.credentials",
        "missing \"password\"",
    );
    has(&e, "services.pg-nothing.credentials", "missing \"host\"");
    has(
        &e,
        "services.pg-intercept.credentials",
        "missing \"password\"",
    );
    assert!(
        !e.at("services.pg-intercept")
            .any(|x| x.message.contains("\"host\"")),
        "host is not needed with intercept: {e}"
    );
    has(&e, "services.tcp-no-host.credentials", "missing \"host\"");
    has(
        &e,
        "services.nowhere",
        "needs \"listenOn\" or \"intercept\"",
    );
    has(
        &e,
        "services.env-no-get.credentials.host",
        "missing \"get\"",
    );
}

#[test]
fn pg_config_keys_and_connection_settings_as_credentials() {
    let secretless = PG.replace(
        "    credentials:",
        "    config:\n      sslmode: require\n    credentials:",
    );
    // Secretless ignores a pg service's `config:`: a warning in its dialect.
    let cfg = ok(&secretless);
    assert!(
        cfg.warnings
            .iter()
            .any(|w| w.path == "services.db.config.sslmode" && w.message.contains("ignored")),
        "{:?}",
        cfg.warnings
    );
    let e = errs(&format!("broker: {{}}\n{secretless}"));
    has(&e, "services.db.config.sslmode", "are credentials");
    let cfg = ok(&PG.replace(
        "    credentials:",
        "    config:\n      requireAuth: [scram-sha-256, md5]\n      upstreamAllow: [10.1.2.3, \"10.0.0.0/8\", \"2001:db8::1/64\"]\n      scramMaxIterations: 8192\n    credentials:",
    ));
    let Some(pg) = cfg.services[0].connector.settings::<PgConfig>() else {
        panic!("not pg")
    };
    let r = pg.require_auth.expect("requireAuth");
    assert!(r.allows(AuthKind::ScramSha256) && r.allows(AuthKind::Md5));
    assert!(!r.allows(AuthKind::Password) && !r.allows(AuthKind::None));
    assert_eq!(
        pg.upstream_allow,
        vec![
            "10.1.2.3/32".parse().unwrap(),
            "10.0.0.0/8".parse().unwrap(),
            "2001:db8::/64".parse().unwrap()
        ]
    );
    assert_eq!(pg.scram_max_iterations, 8192);
    // Defaults.
    let cfg = ok(PG);
    let Some(pg) = cfg.services[0].connector.settings::<PgConfig>() else {
        panic!("not pg")
    };
    assert!(pg.require_auth.is_none() && pg.upstream_allow.is_empty());
    assert_eq!(pg.scram_max_iterations, DEFAULT_SCRAM_MAX_ITERATIONS);
    // libpq's comma form and negation.
    let cfg = ok(&PG.replace(
        "    credentials:",
        "    config:\n      requireAuth: \"!password,!none\"\n    credentials:",
    ));
    let Some(pg) = cfg.services[0].connector.settings::<PgConfig>() else {
        panic!("not pg")
    };
    assert_eq!(
        format!("{:?}", pg.require_auth.unwrap()),
        "RequireAuth(md5, scram-sha-256)"
    );
    let e = errs(&PG.replace(
        "    credentials:",
        "    config:\n      requireAuth: [md5, \"!none\"]\n      upstreamAllow: [db.internal]\n      scramMaxIterations: 0\n    credentials:",
    ));
    has(&e, "services.db.config.requireAuth", "cannot be mixed");
    has(&e, "services.db.config.upstreamAllow[0]", "invalid address");
    has(&e, "services.db.config.scramMaxIterations", "at least 1");
    let e = errs(&PG.replace(
        "    credentials:",
        "    config:\n      requireAuth: kerberos\n    credentials:",
    ));
    has(&e, "services.db.config.requireAuth", "unsupported method");
}

/// A CIDR intercept without an explicit upstream would let the app (or whoever holds an
/// address of the block) choose where the password goes.
#[test]
fn pg_cidr_intercept_needs_an_explicit_upstream_or_an_allow_list() {
    const CIDR: &str = "
version: 2
services:
  db:
    connector: pg
    intercept: [\"10.0.0.0/8:5432\"]
    credentials:
      username: app
      password: pw
";
    let e = errs(CIDR);
    has(&e, "services.db.intercept", "needs an explicit upstream");
    has(&e, "services.db.intercept", "upstreamAllow");
    ok(&CIDR.replace("      username", "      host: 10.1.1.1\n      username"));
    ok(&CIDR.replace(
        "      username",
        "      address: 10.1.1.1:5432\n      username",
    ));
    ok(&CIDR.replace(
        "    credentials:",
        "    config:\n      upstreamAllow: [10.1.0.0/16]\n    credentials:",
    ));
    // Exact targets keep working without either.
    ok(&CIDR.replace("10.0.0.0/8:5432", "10.1.1.1:5432"));
}

#[test]
fn bad_listen_on() {
    let e = errs(
        "
version: 2
services:
  a: {connector: tcp, listenOn: \"127.0.0.1:5432\", credentials: {host: h}}
  b: {connector: tcp, listenOn: \"tcp://db.example.com:5432\", credentials: {host: h}}
  c: {connector: tcp, listenOn: \"unix://relative.sock\", credentials: {host: h}}
  d: {connector: tcp, listenOn: \"tcp://127.0.0.1:7000\", credentials: {host: h}}
  e: {connector: tcp, listenOn: \"tcp://127.0.0.1:7000\", credentials: {host: h}}
",
    );
    has(
        &e,
        "services.a.listenOn",
        "must be tcp://HOST:PORT or unix:///PATH",
    );
    has(&e, "services.b.listenOn", "IP address or \"localhost\"");
    has(&e, "services.c.listenOn", "absolute");
    has(
        &e,
        "services.e.listenOn",
        "also used by services.d.listenOn",
    );
    assert_eq!(e.len(), 4, "{e}");
}

#[test]
fn v1_files_are_converted_as_secretless_does() {
    let cfg = ok("
listeners:
  - name: pg_listener
    protocol: pg
    address: 0.0.0.0:5432
  - name: http_listener
    protocol: http
    address: 0.0.0.0:8080
  - name: sock
    protocol: pg
    socket: /sock/.s.PGSQL.5432
handlers:
  - name: pg
    listener: pg_listener
    credentials:
      - name: address
        provider: env
        id: PG_ADDRESS
      - name: password
        provider: literal
        id: v1-literal-secret
      - {name: username, provider: literal, id: u}
  - name: pg_second
    listener: pg_listener
    credentials:
      - name: host
        provider: literal
        id: ignored
  - name: api
    listener: http_listener
    type: http/basic_auth
    match: [\"^http://api\\\\.\"]
    credentials:
      - {name: username, provider: literal, id: u}
      - {name: password, provider: literal, id: p}
  - name: sockpg
    listener: sock
    credentials:
      - {name: host, provider: literal, id: h}
      - {name: username, provider: literal, id: u}
      - {name: password, provider: literal, id: p}
");
    let names: Vec<&str> = cfg.services.iter().map(|s| s.name.as_str()).collect();
    // One service per handler; a non-HTTP listener takes only its first handler.
    assert_eq!(names, ["pg", "api", "sockpg"], "{names:?}");
    let pg = &cfg.services[0];
    assert_eq!(from(pg, "address"), ("env".into(), "PG_ADDRESS".into()));
    assert_eq!(literal(pg, "password"), "v1-literal-secret");
    assert_eq!(
        pg.listen_on,
        Some(ListenAddr::Tcp("0.0.0.0:5432".parse().unwrap()))
    );
    assert_eq!(
        cfg.services[2].listen_on,
        Some(ListenAddr::Unix("/sock/.s.PGSQL.5432".into()))
    );
    assert!(matches!(
        &cfg.services[1].connector,
        ConnectorSpec::Built {
            kind: "basic_auth",
            ..
        }
    ));
    // The warning prints the v2 equivalent, but never a literal value.
    assert_eq!(cfg.warnings.len(), 1, "{:?}", cfg.warnings);
    let w = cfg.warnings[0].to_string();
    assert!(
        w.contains("version 1") && w.contains("listenOn: tcp://0.0.0.0:5432"),
        "{w}"
    );
    assert!(w.contains("authenticateURLsMatching"), "{w}");
    assert!(!w.contains("v1-literal-secret"), "{w}");

    // What Secretless' own v1 validation rejects.
    let e = errs("version: 1\nlisteners: []\n");
    has(&e, "listeners", "must not be empty");
    let e = errs(
        "listeners:\n  - {name: a, protocol: pg}\n  - {name: b, protocol: pg, address: x, socket: y}\nhandlers:\n  - {name: h, listener: nowhere}\n",
    );
    has(&e, "listeners[0]", "needs \"address\" or \"socket\"");
    has(&e, "listeners[1]", "only one of");
    has(&e, "handlers[0].listener", "has no associated listener");
    has(&e, "listeners[0]", "has no associated handler");
}

#[test]
fn kubernetes_objects_are_named_as_unsupported() {
    let e = errs(
        "apiVersion: secretless.io/v1\nkind: Configuration\nmetadata: {name: x}\nspec:\n  listeners: []\n",
    );
    has(
        &e,
        "",
        "Kubernetes object, Configuration (secretless.io/v1)",
    );
    has(&e, "", "not supported");
}

#[test]
fn secretless_dialect_is_lenient_where_secretless_is() {
    // Secretless' quick start: `debug: true` at the top, `protocol:`, empty values.
    let cfg = load_env(
        "
version: 2
debug: true
services:
  pg:
    protocol: pg
    listenOn: tcp://127.0.0.1:5432
    credentials:
      address: 127.0.0.1:5433/app
      username: u
      password: pa${NOT_EXPANDED}$$x
      sslmode: \"\"
      sslrootcert: {from: env, get: \"\"}
      sslkey:
    config:
      optionA: 1
  both:
    connector: tcp
    protocol: pg
    listenOn: tcp://127.0.0.1:5434
    credentials: {host: h}
  marshalled:
    protocol: \"\"
    connector: tcp
    listenOn: tcp://127.0.0.1:5435
    credentials: {host: h}
  legacy-http:
    protocol: http
    listenOn: tcp://127.0.0.1:8080
    credentials: {username: u, password: p}
    config:
      authenticationStrategy: basic_auth
      authenticateURLsMatching: ['^http']
",
        &[("NOT_EXPANDED", "boom")],
    )
    .unwrap_or_else(|e| panic!("{e}"));
    let pg = &cfg.services.iter().find(|s| s.name == "pg").unwrap();
    assert!(matches!(
        &pg.connector,
        ConnectorSpec::Built { kind: "pg", .. }
    ));
    // `$` as Secretless reads it: as written.
    assert_eq!(literal(pg, "password"), "pa${NOT_EXPANDED}$$x");
    for unset in ["sslmode", "sslrootcert", "sslkey"] {
        assert!(!pg.credentials.contains_key(unset), "{unset}");
    }
    let both = cfg.services.iter().find(|s| s.name == "both").unwrap();
    assert!(matches!(
        &both.connector,
        ConnectorSpec::Built { kind: "tcp", .. }
    ));
    let http = cfg
        .services
        .iter()
        .find(|s| s.name == "legacy-http")
        .unwrap();
    assert!(matches!(
        &http.connector,
        ConnectorSpec::Built {
            kind: "basic_auth",
            ..
        }
    ));
    let warned: Vec<String> = cfg.warnings.iter().map(ToString::to_string).collect();
    let warned_at = |path: &str, needle: &str| {
        assert!(
            cfg.warnings
                .iter()
                .any(|w| w.path == path && w.message.contains(needle)),
            "no warning at {path} with {needle:?}: {warned:#?}"
        );
    };
    warned_at("debug", "unknown key \"debug\"");
    warned_at("services.pg.protocol", "read as \"connector\"");
    warned_at("services.pg.config.optionA", "ignored");
    warned_at("services.both.protocol", "\"connector\" is also set");
    warned_at("services.pg.credentials.password", "kept as written");
    assert!(
        !warned
            .iter()
            .any(|w| w.contains("NOT_EXPANDED") || w.contains("boom"))
    );
    assert!(
        !warned.iter().any(|w| w.contains("marshalled")),
        "{warned:#?}"
    );

    // The same file with one key of ours is ours: strict, and `${VAR}` expands.
    let e = load_env(
        "version: 2\ndebug: true\nservices:\n  pg:\n    connector: pg\n    intercept: [\"db:5432\"]\n    credentials: {password: \"pa${NOT_SET}\"}\n",
        &[],
    )
    .unwrap_err();
    has(&e, "debug", "unknown key \"debug\"");
    // A credential's reference is not quoted (the value may be a password holding it).
    has(&e, "services.pg.credentials.password", "cannot be expanded");
    assert!(!e.to_string().contains("NOT_SET"), "{e}");
}

#[test]
fn pg_address_names_the_upstream() {
    let cfg = ok(
        "version: 2\nservices:\n  pg:\n    connector: pg\n    listenOn: tcp://127.0.0.1:1\n    credentials: {address: \"db:5433\", username: u, password: p}\n",
    );
    assert!(cfg.warnings.is_empty(), "{:?}", cfg.warnings);
    let e = errs(
        "version: 2\nservices:\n  pg:\n    connector: pg\n    listenOn: tcp://127.0.0.1:1\n    credentials: {username: u, password: p}\n",
    );
    has(
        &e,
        "services.pg.credentials",
        "missing \"host\" or \"address\"",
    );
}

#[test]
fn service_shapes() {
    let e = errs(
        "
version: 2
services:
  - connector: tcp
    listenOn: tcp://127.0.0.1:1
    credentials: {host: h}
  - name: a
    connector: tcp
    listenOn: tcp://127.0.0.1:2
    credentials: {host: h}
  - name: a
    connector: tcp
    listenOn: tcp://127.0.0.1:3
    credentials: {host: h}
  - name: b
    listenOn: tcp://127.0.0.1:4
  - just a string
",
    );
    has(&e, "services[0]", "missing \"name\"");
    has(
        &e,
        "services[2].name",
        "duplicate service name \"a\" (also services[1])",
    );
    has(&e, "services[3]", "missing \"connector\"");
    has(&e, "services[4]", "must be a service");
    let e = errs("version: 2\nservices:\n");
    has(&e, "services", "no services");
    let e = errs("version: 2\n");
    has(&e, "services", "missing");
    let e = errs(
        "version: 2\nbroker: {}\nservices:\n  db:\n    name: db\n    connector: tcp\n    listenOn: tcp://127.0.0.1:1\n    credentials: {host: h}\n",
    );
    has(&e, "services.db.name", "unknown key \"name\"");
}

#[test]
fn authentication_entries() {
    let e = errs(
        "
version: 2
services:
  - name: x
    connector: generic_http
    authentication:
      - type: oauth2
        config: {token_url: https://t, client_id: c}
      - type: kerberos
      - config: {}
",
    );
    has(
        &e,
        "services[0].authentication[0].config",
        "missing \"client_secret\"",
    );
    has(
        &e,
        "services[0].authentication[1].type",
        "unknown authentication type \"kerberos\"",
    );
    has(&e, "services[0].authentication[2]", "missing \"type\"");
}

#[test]
fn many_errors_are_all_reported_in_one_run() {
    let e = errs(
        "
version: 2
providers:
  bad: {type: nope}
broker:
  cacheTTL: forever
services:
  db:
    connector: pg
    listenOn: tcp://nowhere:5432
    intercept: [\"10.0.0.0/99:5432\"]
    conifg: {}
    credentials:
      host: ${DB_HOST}
      password: {from: vault}
",
    );
    for (path, needle) in [
        ("providers.bad.type", "unknown provider type"),
        ("broker.cacheTTL", "invalid duration"),
        ("services.db.listenOn", "invalid listenOn"),
        ("services.db.intercept[0]", "invalid CIDR"),
        ("services.db.conifg", "unknown key"),
        (
            "services.db.credentials.host",
            "environment variable DB_HOST is not set",
        ),
        ("services.db.credentials.password", "missing \"get\""),
        ("services.db.credentials", "missing \"username\""),
    ] {
        has(&e, path, needle);
    }
    // Display: one error per line, `path: message`.
    let text = e.to_string();
    assert_eq!(text.lines().count(), e.len());
    assert!(
        text.lines()
            .any(|l| l == "services.db.conifg: unknown key \"conifg\" (did you mean \"config\"?)"),
        "{text}"
    );
}

// ---- secrets stay out of errors ----------------------------------------------------

#[test]
fn no_secret_value_in_any_error() {
    const SECRET: &str = "Hunter2-TopSecret";
    let env = [
        ("SECRET_LISTEN", SECRET),
        ("SECRET_TOKEN", SECRET),
        ("SECRET_CONNECTOR", SECRET),
        ("SECRET_INTERCEPT", SECRET),
        ("SECRET_DURATION", SECRET),
    ];
    let text = format!(
        "
version: 2
providers:
  uts:
    type: http
    token: {SECRET}
    timeout: ${{SECRET_DURATION}}
    baseUrl: ${{SECRET_LISTEN}}
  leaky:
    type: ${{SECRET_CONNECTOR}}
broker:
  health: ${{SECRET_LISTEN}}
  cacheTTL: ${{SECRET_DURATION}}
  transparentPort: ${{SECRET_TOKEN}}
  bypassMark: {SECRET}
services:
  db:
    connector: pg
    listenOn: ${{SECRET_LISTEN}}
    intercept: [\"${{SECRET_INTERCEPT}}\"]
    credentials:
      password: {SECRET}
      username: [{SECRET}]
      host: {{from: literal}}
      port: {{from: literal, get: {SECRET}, extra: 1}}
      sslmode: {{from: \"${{SECRET_CONNECTOR}}\", get: {SECRET}}}
    config:
      anything: {SECRET}
  other:
    connector: ${{SECRET_CONNECTOR}}
    listenOn: tcp://127.0.0.1:1
  - broken
  list:
    connector: tcp
    listenOn: bogus
    credentials:
      - {{name: password, provider: nowhere, get: {SECRET}}}
      - {{name: {SECRET}}}
    authentication:
      - type: ${{SECRET_CONNECTOR}}
      - type: oauth2
        config: {{token_url: x, client_id: y, client_secret: {SECRET}, scope: [{SECRET}]}}
"
    );
    // That text is not even valid YAML (a list item inside a map): the syntax error
    // must not quote it either.
    let e = load_env(&text, &env).unwrap_err();
    assert!(!e.to_string().contains(SECRET), "{e}");
    assert!(!format!("{e:?}").contains(SECRET), "{e:?}");

    let text = text.replace("  - broken\n", "");
    let e = load_env(&text, &env).unwrap_err();
    let shown = format!("{e}\n{e:?}");
    assert!(!shown.contains(SECRET), "{shown}");
    // And it did find the problems, without the value.
    assert!(e.len() >= 15, "{e}");
    has(&e, "services.db.listenOn", "(value from the environment)");
    has(
        &e,
        "services.other.connector",
        "(value from the environment)",
    );
    has(
        &e,
        "services.db.intercept[0]",
        "(value from the environment)",
    );
    has(&e, "providers.leaky.type", "(value from the environment)");
    has(&e, "broker.health", "(value from the environment)");
    has(&e, "services.db.credentials.username", "not a list");
    // An invalid credential is not also reported missing.
    assert!(!e.to_string().contains("missing \"username\""), "{e}");

    // The loaded model's Debug output hides secrets too.
    let cfg = load_env(
        &format!(
            "
version: 2
providers:
  http: {{token: {SECRET}}}
services:
  db:
    connector: pg
    listenOn: tcp://127.0.0.1:5432
    credentials: {{host: h, username: u, password: {SECRET}}}
    authentication:
      - type: oauth2
        config: {{token_url: x, client_id: y, client_secret: {SECRET}}}
"
        ),
        &[],
    )
    .unwrap_or_else(|e| panic!("{e}"));
    assert!(!format!("{cfg:?}").contains(SECRET));
    let u = unsupported_text(&cfg);
    assert!(!u.concat().contains(SECRET));
}

#[test]
fn errors_at_filters_by_prefix() {
    let e = ConfigErrors(vec![
        ConfigError::new("services.db.listenOn", "x"),
        ConfigError::new("services.db2", "y"),
        ConfigError::new("services.db", "z"),
        ConfigError::new("services.db.intercept[0]", "w"),
    ]);
    let at: Vec<&str> = e.at("services.db").map(|x| x.message.as_str()).collect();
    assert_eq!(at, ["x", "z", "w"]);
    assert_eq!(e.at("services.db.intercept").count(), 1);
}

#[test]
fn connection_caps() {
    let b = ok(PG).broker;
    assert_eq!(
        (b.max_connections, b.max_connections_per_listener),
        (10_000, 5_000)
    );
    let b = ok(&format!(
        "{PG}broker:\n  maxConnections: 20\n  maxConnectionsPerListener: 5\n"
    ))
    .broker;
    assert_eq!((b.max_connections, b.max_connections_per_listener), (20, 5));
    // Per listener: half of the global cap by default.
    let b = ok(&format!("{PG}broker:\n  maxConnections: 101\n")).broker;
    assert_eq!(
        (b.max_connections, b.max_connections_per_listener),
        (101, 50)
    );
    let e = errs(&format!(
        "{PG}broker:\n  maxConnections: 0\n  maxConnectionsPerListener: many\n"
    ));
    has(&e, "broker.maxConnections", "at least 1");
    has(&e, "broker.maxConnectionsPerListener", "connection count");
    let e = errs(&format!(
        "{PG}broker:\n  maxConnections: 10\n  maxConnectionsPerListener: 11\n"
    ));
    has(
        &e,
        "broker.maxConnectionsPerListener",
        "not be more than broker.maxConnections (10)",
    );
}

/// `broker run` refuses a token it cannot put in a header; `check` reports it with its
/// key path, without echoing it.
#[test]
fn http_token_must_fit_in_a_header() {
    let text = "
version: 2
providers:
  uts: {type: http, baseUrl: 'http://127.0.0.1:1/', token: '${TOK}'}
services:
  db: {connector: tcp, intercept: [\"db:1\"]}
";
    let e = load_env(text, &[("TOK", "tok-line-one\ntok-line-two")]).unwrap_err();
    has(
        &e,
        "providers.uts.token",
        "cannot be sent in an HTTP header",
    );
    assert!(!e.to_string().contains("tok-line"), "{e}");
    load_env(text, &[("TOK", "plain-token")]).unwrap();
}

fn load_file_k(path: &std::path::Path) -> Result<Config, ConfigErrors> {
    load_file(path, &KINDS)
}

/// `clientTLS`, `clientAuth`, `clientPassword` and `broker.caDir`.
#[test]
fn pg_client_leg_settings() {
    let with = |config: &str| {
        PG.replace(
            "    credentials:",
            &format!("    config:\n{config}    credentials:"),
        )
    };
    let cfg = ok(&with(
        "      clientTLS: on\n      clientAuth: scram-sha-256\n      clientPassword: dummy\n",
    ));
    let pg = cfg.services[0].connector.settings::<PgConfig>().unwrap();
    assert!(pg.client_tls);
    assert_eq!(pg.client_password.as_ref().unwrap().expose(), b"dummy");
    let pg_default = ok(PG);
    let pg_default = pg_default.services[0]
        .connector
        .settings::<PgConfig>()
        .unwrap();
    assert!(!pg_default.client_tls && pg_default.client_password.is_none());
    assert_eq!(
        ok(PG).broker.ca_dir,
        std::path::PathBuf::from(DEFAULT_CA_DIR)
    );

    let e = errs(&with("      clientTLS: maybe\n"));
    has(&e, "services.db.config.clientTLS", "on or off");
    let e = errs(&with("      clientAuth: scram-sha-256\n"));
    has(&e, "services.db.config", "needs \"clientPassword\"");
    let e = errs(&with("      clientPassword: dummy\n"));
    has(
        &e,
        "services.db.config.clientPassword",
        "only with clientAuth",
    );
    let e = errs(&with("      clientAuth: md5\n"));
    has(&e, "services.db.config.clientAuth", "scram-sha-256 or none");
    // The placeholder never appears in an error.
    let e = errs(&with(
        "      clientPassword: s3cr3t-placeholder\n      clientTLS: 7\n",
    ));
    assert!(!e.to_string().contains("s3cr3t-placeholder"), "{e}");
    let cfg = ok(&PG.replace("version: 2\n", "version: 2\nbroker:\n  caDir: /tmp/x/ca\n"));
    assert_eq!(cfg.broker.ca_dir, std::path::PathBuf::from("/tmp/x/ca"));
}

#[test]
fn aws_connector_keys_and_credentials() {
    let c = ok("
version: 2
services:
  aws:
    connector: aws
    intercept: [sts.amazonaws.com:443]
    credentials:
      accessKeyId: {from: literal, get: AKIDEXAMPLE}
      secretAccessKey: {from: literal, get: s}
      accessToken: {from: literal, get: t}
    config: {timeout: 5s, upstream: https://sts.eu-west-3.amazonaws.com}
");
    assert_eq!(c.services[0].connector.name(), "aws");
    let e = errs(
        "
version: 2
services:
  aws:
    connector: aws
    intercept: [sts.amazonaws.com:443]
    credentials:
      secretAccessKey: {from: literal, get: s}
    config: {headers: {X: y}}
",
    );
    has(&e, "services.aws.credentials", "missing \"accessKeyId\"");
    has(&e, "services.aws.config.headers", "unknown key \"headers\"");
}

// ---- HTTP: conjur, OAuth2 ------------------------------------------------------------

fn http_settings(s: &Service) -> &crate::connector::http::config::HttpSettings {
    s.connector
        .settings::<crate::connector::http::config::HttpSettings>()
        .expect("HTTP settings")
}

/// Secretless' `conjur` connector: `basic_auth`'s keys, the credential `accessToken`, and
/// the fixed header `Authorization: Token token="base64(accessToken)"`.
#[test]
fn conjur_connector_keys_credential_and_header() {
    use base64::Engine as _;
    let c = ok("
version: 2
services:
  conjur:
    connector: conjur
    intercept: [conjur.example.com:443]
    credentials:
      accessToken: {from: file, get: /run/conjur/access-token}
    config:
      authenticateURLsMatching: ['^https://conjur\\.example\\.com/secrets']
      forceSSL: true
      upstream: https://conjur.internal:8443
      caFile: /etc/conjur-ca.pem
      timeout: 5s
      keepClientAuthorization: false
");
    let s = &c.services[0];
    assert_eq!(s.connector.name(), "conjur");
    assert!(
        unsupported_text(&c).is_empty(),
        "{:?}",
        unsupported_text(&c)
    );
    let h = http_settings(s);
    assert_eq!(h.style, crate::connector::http::config::Style::Generic);
    assert!(h.force_ssl);
    assert_eq!(h.timeout, Duration::from_secs(5));
    assert_eq!(h.url_patterns.len(), 1);
    assert_eq!(h.upstream.as_ref().unwrap().port, 8443);
    assert!(h.query_params.is_empty());
    let [(name, t)] = h.headers.as_slice() else {
        panic!("one header: {:?}", h.headers)
    };
    assert_eq!(name, http::header::AUTHORIZATION);
    assert_eq!(t.names(), ["accessToken"]);
    let token = br#"{"protected":"eyJhbGciOiJjb25qdXIub3JnL3Nsb3NpbG8vdjIifQ==","payload":"x"}"#;
    let get = |n: &str| (n == "accessToken").then_some(&token[..]);
    let want = format!(
        "Token token=\"{}\"",
        base64::engine::general_purpose::STANDARD.encode(token)
    );
    assert_eq!(&t.render(&get).unwrap()[..], want.as_bytes());

    // Without config: the same header.
    let c = ok("
version: 2
services:
  conjur: {connector: conjur, listenOn: tcp://127.0.0.1:8082, credentials: {accessToken: t}}
");
    assert_eq!(http_settings(&c.services[0]).headers.len(), 1);

    let e = errs(
        "
version: 2
services:
  conjur:
    connector: conjur
    intercept: [conjur.example.com:443]
    credentials: {token: t}
    config: {headers: {X: y}, queryParams: {a: b}, credentialValidations: {token: x}}
",
    );
    has(&e, "services.conjur.credentials", "missing \"accessToken\"");
    for k in ["headers", "queryParams", "credentialValidations"] {
        has(
            &e,
            &format!("services.conjur.config.{k}"),
            &format!("unknown key \"{k}\""),
        );
    }
}

fn oauth2_service(config: &str) -> String {
    format!(
        "
version: 2
services:
  api:
    connector: generic_http
    intercept: [api.example.com:443]
    authentication:
      - type: oauth2
        config:
          token_url: https://auth.example.com/oauth/token
          client_id: agents
          client_secret: oauth-client-secret-9f8e7d
{config}"
    )
}

fn oauth2_of(c: &Config) -> &OAuth2Config {
    let [AuthMethod::OAuth2(o)] = c.services[0].authentication.as_slice() else {
        panic!("one oauth2 entry")
    };
    o
}

const OAUTH2_PATH: &str = "services.api.authentication[0].config";

/// Every `oauth2` key, and what the token source gets from it.
#[test]
fn oauth2_keys_reach_the_token_source() {
    use crate::connector::http::{oauth2::ClientAuth, tokens::token_config};
    let c = ok(&oauth2_service(
        "          scope: \"read write\"
          audience: https://api.example.com/
          client_auth: body
          params:
            resource: https://api.example.com/v2
            tenant: 42
          default_lifetime: 2m
          timeout: 3s
",
    ));
    let o = oauth2_of(&c);
    assert_eq!(o.audience.as_deref(), Some("https://api.example.com/"));
    assert_eq!(o.client_auth, OAuth2ClientAuth::Body);
    assert_eq!(
        o.params,
        [
            (
                "resource".to_owned(),
                "https://api.example.com/v2".to_owned()
            ),
            ("tenant".to_owned(), "42".to_owned()),
        ]
    );
    assert_eq!(o.default_lifetime, Some(Duration::from_secs(120)));
    assert_eq!(o.timeout, Some(Duration::from_secs(3)));
    let t = token_config(o);
    assert_eq!(t.token_url, "https://auth.example.com/oauth/token");
    assert_eq!(t.client_id, "agents");
    assert_eq!(
        t.client_secret.expose_str().unwrap(),
        "oauth-client-secret-9f8e7d"
    );
    assert_eq!(t.scope.as_deref(), Some("read write"));
    assert_eq!(t.audience.as_deref(), Some("https://api.example.com/"));
    assert_eq!(t.auth, ClientAuth::Body);
    assert_eq!(t.extra, o.params);
    assert_eq!(t.default_lifetime, Duration::from_secs(120));
    assert_eq!(t.timeout, Duration::from_secs(3));
    t.validate().unwrap();

    // The defaults: Basic, no audience, no parameters, the source's own lifetime and
    // timeout.
    let c = ok(&oauth2_service(""));
    let o = oauth2_of(&c);
    assert_eq!(o.client_auth, OAuth2ClientAuth::Basic);
    assert!(o.audience.is_none() && o.params.is_empty());
    assert!(o.default_lifetime.is_none() && o.timeout.is_none());
    let t = token_config(o);
    let d = crate::connector::http::oauth2::TokenConfig::new(
        "x",
        "y",
        crate::secret::Secret::from("z".to_owned()),
    );
    assert_eq!(t.auth, ClientAuth::Basic);
    assert_eq!(
        (t.default_lifetime, t.timeout),
        (d.default_lifetime, d.timeout)
    );
    let c = ok(&oauth2_service("          client_auth: basic\n"));
    assert_eq!(oauth2_of(&c).client_auth, OAuth2ClientAuth::Basic);
    // `client_secret` from the environment, as the seed does.
    let c = load_env(
        &oauth2_service("").replace("oauth-client-secret-9f8e7d", "${SECRET}"),
        &[("SECRET", "from-env-secret")],
    )
    .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(
        oauth2_of(&c).client_secret.expose_str().unwrap(),
        "from-env-secret"
    );
}

/// Each `oauth2` key's errors, at its key path, never quoting the client secret.
#[test]
fn oauth2_key_errors() {
    let p = |k: &str| format!("{OAUTH2_PATH}.{k}");
    let one = |config: &str, key: &str, needle: &str| {
        let e = errs(&oauth2_service(config));
        has(&e, &p(key), needle);
        assert!(!e.to_string().contains("oauth-client-secret"), "{e}");
    };
    one(
        "          client_auth: post\n",
        "client_auth",
        "unknown client_auth \"post\" (accepted: \"basic\"",
    );
    one("          client_auth: post\n", "client_auth", "\"body\"");
    one(
        "          client_auth: [basic]\n",
        "client_auth",
        "single value",
    );
    one(
        "          params: resource\n",
        "params",
        "a map of parameter name: value",
    );
    one(
        "          params: {resource: [a, b]}\n",
        "params.resource",
        "single value",
    );
    one(
        "          params: {resource: }\n",
        "params.resource",
        "has no value",
    );
    one(
        "          params: {grant_type: password}\n",
        "params",
        "`grant_type` would repeat a standard one",
    );
    one(
        "          params: {client_secret: x}\n",
        "params",
        "`client_secret` would repeat a standard one",
    );
    one(
        "          default_lifetime: soon\n",
        "default_lifetime",
        "invalid duration",
    );
    one(
        "          default_lifetime: 0s\n",
        "default_lifetime",
        "more than 0",
    );
    one("          timeout: 0\n", "timeout", "more than 0");
    one(
        "          timeout: forever\n",
        "timeout",
        "invalid duration",
    );
    one("          audience: [a]\n", "audience", "single value");
    one(
        "          expires_in: 60\n",
        "expires_in",
        "unknown key \"expires_in\"",
    );

    // token_url: TokenConfig::validate, at its key.
    let url = |u: &str| oauth2_service("").replace("https://auth.example.com/oauth/token", u);
    for (u, needle) in [
        ("auth.example.com/token", "is not a URL"),
        ("/oauth/token", "is not a URL"),
        (
            "ftp://auth.example.com/token",
            "is not an http:// or https:// URL",
        ),
        ("mailto:x@example.com", "is not an http:// or https:// URL"),
    ] {
        let e = errs(&url(u));
        has(&e, &p("token_url"), needle);
        assert_eq!(e.len(), 1, "{e}");
    }
    // A query string or user-info in a bad URL is not echoed.
    let e = errs(&url("ftp://user:pw-in-url@auth.example.com/t?key=q-secret"));
    has(&e, &p("token_url"), "not an http:// or https:// URL");
    let text = e.to_string();
    assert!(
        !text.contains("pw-in-url") && !text.contains("q-secret"),
        "{text}"
    );
    // From the environment: never echoed.
    let e = load_env(
        &url("${TOKEN_URL}"),
        &[("TOKEN_URL", "ftp://env-only-host.example/token")],
    )
    .unwrap_err();
    has(&e, &p("token_url"), "(value from the environment)");
    assert!(!e.to_string().contains("env-only-host"), "{e}");
    let e = load_env(&url("${TOKEN_URL}"), &[("TOKEN_URL", "envhost")]).unwrap_err();
    has(&e, &p("token_url"), "token_url");
    assert!(!e.to_string().contains("envhost"), "{e}");

    // The list shape's path, as in the seed.
    let e = errs(
        "
version: 2
services:
  - name: api
    connector: basic_auth
    intercept: [api.example.com:443]
    credentials: {username: u, password: p}
    authentication:
      - type: oauth2
        config: {token_url: 'not a url', client_id: c, client_secret: oauth-client-secret-1}
",
    );
    has(
        &e,
        "services[0].authentication[0].config.token_url",
        "is not a URL",
    );
    assert!(!e.to_string().contains("oauth-client-secret"), "{e}");
}

// ---- the aws provider and the http provider's client certificate ----------------------

#[test]
fn aws_provider_keys_and_the_built_in_instance() {
    let c = ok("
version: 2
providers:
  sm:
    type: aws
    region: eu-west-3
    endpoint: https://vpce-1.secretsmanager.eu-west-3.vpce.amazonaws.com
    profile: prod
    timeout: 3s
  keys: {type: aws, accessKeyId: AKIDEXAMPLE, secretAccessKey: aws-config-secret-6d1e, sessionToken: aws-config-token-2f7a}
services:
  db:
    connector: pg
    listenOn: tcp://127.0.0.1:5432
    credentials:
      host: h
      username: {from: aws, get: db/creds#username}
      password: {from: sm, get: \"db/creds?versionStage=AWSPREVIOUS#password\"}
");
    let ProviderConfig::Aws(sm) = &c.providers["sm"] else {
        panic!("sm: {:?}", c.providers["sm"]);
    };
    assert_eq!(sm.region.as_deref(), Some("eu-west-3"));
    assert_eq!(sm.profile.as_deref(), Some("prod"));
    assert_eq!(sm.timeout, Duration::from_secs(3));
    assert!(
        sm.endpoint
            .as_deref()
            .unwrap()
            .starts_with("https://vpce-1.")
    );
    assert!(sm.access_key_id.is_none());
    let ProviderConfig::Aws(keys) = &c.providers["keys"] else {
        panic!("keys");
    };
    assert_eq!(keys.access_key_id.as_deref(), Some("AKIDEXAMPLE"));
    assert!(keys.secret_access_key.is_some() && keys.session_token.is_some());
    assert_eq!(keys.timeout, DEFAULT_HTTP_TIMEOUT);
    // The built-in instance, from the chain alone.
    assert!(matches!(&c.providers["aws"], ProviderConfig::Aws(a) if a.region.is_none()));
    assert_eq!(c.providers["aws"].kind(), "aws");
    assert!(unsupported(&c).is_empty(), "{:?}", unsupported(&c));
    assert!(!format!("{c:?}").contains("aws-config-secret-6d1e"));
}

#[test]
fn aws_provider_errors_name_no_secret() {
    let secret = "aws-bad-secret-key-0c5e";
    let e = errs(&format!(
        "
version: 2
providers:
  a: {{type: aws, region: EU West, endpoint: ftp://x, timeout: 0s, colour: blue}}
  b: {{type: aws, secretAccessKey: {secret}}}
  c: {{type: aws, sessionToken: {secret}}}
  d: {{type: aws, accessKeyId: \"AKID-1\", secretAccessKey: \"{secret}\\n\"}}
  e: {{type: aws, endpoint: \"https://user:{secret}@host/\"}}
services: {{}}
"
    ));
    has(&e, "providers.a.region", "invalid region \"EU West\"");
    has(&e, "providers.a.endpoint", "invalid URL");
    has(&e, "providers.a.timeout", "more than zero");
    has(&e, "providers.a.colour", "unknown key \"colour\"");
    has(&e, "providers.b", "together");
    has(&e, "providers.c", "\"sessionToken\" needs");
    has(&e, "providers.d.accessKeyId", "letters and digits");
    has(
        &e,
        "providers.d.secretAccessKey",
        "cannot be sent in an HTTP header",
    );
    has(&e, "providers.e.endpoint", "no user-info");
    assert!(!e.to_string().contains(secret), "{e}");
}

#[test]
fn http_provider_client_certificate() {
    let c = ok("
version: 2
providers:
  uts: {type: http, baseUrl: https://uts/, certFile: /etc/c.crt, keyFile: /etc/c.key}
services:
  s:
    connector: pg
    listenOn: tcp://127.0.0.1:5432
    credentials: {host: h, username: u, password: p}
");
    let ProviderConfig::Http(h) = &c.providers["uts"] else {
        panic!("uts");
    };
    assert_eq!(
        h.client_cert
            .as_ref()
            .map(|(c, k)| (c.to_str().unwrap(), k.to_str().unwrap())),
        Some(("/etc/c.crt", "/etc/c.key"))
    );
    let e = errs(
        "
version: 2
providers:
  a: {type: http, certFile: /etc/c.crt}
  b: {type: http, keyFile: /etc/c.key}
  c: {type: http, certFile: \"\", keyFile: /etc/c.key}
services: {}
",
    );
    has(&e, "providers.a", "\"certFile\" needs \"keyFile\"");
    has(&e, "providers.b", "\"keyFile\" needs \"certFile\"");
    has(&e, "providers.c.certFile", "");
}
