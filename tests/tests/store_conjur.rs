//! The `conjur` provider against `broker_tests::fake_conjur` (the Conjur v5 REST API),
//! through `broker run --no-ebpf` and `pg` services on `listenOn` in front of a real
//! PostgreSQL, driven by the real `psql`:
//!
//! * the built-in instance `conjur` from the environment alone (`CONJUR_*`), over HTTPS
//!   with the CA given as PEM text, a `host/...` login and an id with `/`, a space and
//!   `:`; rotation in the store picked up once the cache TTL has passed;
//! * the access token renewed before it expires (authentications counted), and renewed
//!   once after a 401;
//! * token-file authentication (a sidecar's file), re-read when it changes;
//! * every id form (`/`, `%2F`, `variable:`, `ACCOUNT:variable:`, spaces, `:`) reaching
//!   the same variable, each sent as one encoded path segment;
//! * a missing, refused, or failing store as typed credential errors;
//! * one batch request for a service with several conjur credentials.
//!
//! Every output and the daemon log are grepped for the passwords, the API key and the
//! tokens.

use std::{net::SocketAddr, path::Path, process::Output, time::Duration};

use broker_tests::{
    Daemon, assert_no_secret,
    fake_conjur::FakeConjur,
    free_port, output_text,
    pg::{PgAuth, PgOptions, PgServer, psql},
    privileged, write_file,
};

const ACCOUNT: &str = "acme";
const LOGIN: &str = "host/apps/billing";
const API_KEY: &str = "conjur-it-api-key-1c8e4f2a9b";

/// `broker run --no-ebpf` with `head` (a `providers:` block, or nothing) and `broker`
/// lines, the `services:` given, the daemon's environment `env`.
fn start(
    dir: &Path,
    head: &str,
    broker_extra: &str,
    services: &str,
    env: &[(&str, &str)],
) -> Daemon {
    let health = free_port();
    let cfg = write_file(
        dir,
        "broker.yaml",
        &format!(
            "version: 2\n{head}broker:\n  health: 127.0.0.1:{health}\n{broker_extra}services:\n{services}"
        ),
    );
    let health: SocketAddr = format!("127.0.0.1:{health}").parse().expect("addr");
    Daemon::start_with_env(&cfg, &["--no-ebpf"], env, health, &dir.join("broker.log"))
}

/// A `pg` service on `listenOn` for `pg`; `creds` are credential lines (6 spaces).
fn pg_service(name: &str, port: u16, pg: &PgServer, creds: &str) -> String {
    format!(
        "  {name}:\n    connector: pg\n    listenOn: tcp://127.0.0.1:{port}\n    credentials:\n      host: 127.0.0.1\n      port: \"{}\"\n      sslmode: disable\n{creds}",
        pg.port
    )
}

/// `select current_user` through the service on `port`.
fn psql_through(port: u16) -> (Output, String) {
    let out = psql(
        &format!(
            "host=127.0.0.1 port={port} user=anything password=dummy dbname=app sslmode=disable"
        ),
        "select current_user",
    );
    let text = output_text(&out);
    (out, text)
}

#[track_caller]
fn assert_served(port: u16, d: &Daemon, all: &mut String) {
    let (out, text) = psql_through(port);
    assert!(
        out.status.success() && text.trim() == "app_user",
        "{text}\n{}",
        d.log_text()
    );
    all.push_str(&text);
}

/// The access-log lines of `service`.
fn access_lines(log: &str, service: &str) -> Vec<String> {
    log.lines()
        .filter(|l| l.contains("access") && l.contains(&format!("service={service} ")))
        .map(str::to_owned)
        .collect()
}

/// What must never be printed: the values and the key, and anything of a token.
fn secrets<'a>(values: &[&'a str]) -> Vec<&'a str> {
    let mut v = values.to_vec();
    v.extend_from_slice(&[API_KEY, "\"signature\"", "\"payload\"", "Token token="]);
    v
}

#[test]
fn builtin_instance_from_the_environment_over_https_and_rotation_after_the_ttl() {
    if !privileged() {
        return;
    }
    let (pw1, pw2) = ("conjur-rot-one-5d2c8e", "conjur-rot-two-7a1f3b");
    let dir = tempfile::tempdir().expect("tempdir");
    let conjur = FakeConjur::start_tls(ACCOUNT, dir.path());
    conjur.add_login(LOGIN, API_KEY);
    let id = "prod/db/pass word:main";
    conjur.set(id, pw1.as_bytes());
    let mut pg = PgServer::start(PgOptions::new(PgAuth::Scram, pw1));
    let port = free_port();
    let (_, ca_pem) = conjur.ca.clone().expect("HTTPS fake has a CA");
    let mut d = start(
        dir.path(),
        "",
        "  cacheTTL: 1s\n",
        &pg_service(
            "db",
            port,
            &pg,
            &format!("      username: app_user\n      password: {{from: conjur, get: \"{id}\"}}\n"),
        ),
        &[
            ("CONJUR_APPLIANCE_URL", &conjur.url),
            ("CONJUR_ACCOUNT", ACCOUNT),
            ("CONJUR_AUTHN_LOGIN", LOGIN),
            ("CONJUR_AUTHN_API_KEY", API_KEY),
            ("CONJUR_SSL_CERTIFICATE", &ca_pem),
        ],
    );
    let mut all = String::new();
    assert_served(port, &d, &mut all);
    let targets: Vec<String> = conjur.seen().into_iter().map(|x| x.target).collect();
    assert_eq!(
        targets,
        [
            "/authn/acme/host%2Fapps%2Fbilling/authenticate",
            "/secrets/acme/variable/prod%2Fdb%2Fpass%20word:main",
        ],
        "the login and the id are each one encoded path segment"
    );

    // Rotation: the database and the store change together; after the TTL the new
    // value is fetched (not after a rejection), with the same access token.
    pg.set_password(pw2);
    conjur.set(id, pw2.as_bytes());
    std::thread::sleep(Duration::from_millis(1500));
    assert_served(port, &d, &mut all);
    assert_eq!(conjur.reads(id), 2);
    assert_eq!(conjur.authentications(), 1, "the token is still fresh");

    assert!(d.stop().success());
    let log = d.log_text();
    assert!(
        !log.contains("auth_rejected"),
        "picked up by the TTL:\n{log}"
    );
    let lines = access_lines(&log, "db");
    assert_eq!(lines.len(), 2, "{log}");
    assert!(
        lines
            .iter()
            .all(|l| l.contains("result=\"ok\"") && l.contains(&format!("password<-conjur:{id}"))),
        "{log}"
    );
    assert_no_secret(
        &format!("{all}{log}"),
        &secrets(&[pw1, pw2]),
        "psql output and broker log",
    );
}

#[test]
fn the_access_token_is_renewed_before_it_expires_and_after_a_401() {
    if !privileged() {
        return;
    }
    let pw = "conjur-renew-pw-4b7e1d";
    let dir = tempfile::tempdir().expect("tempdir");
    let conjur = FakeConjur::start(ACCOUNT);
    conjur.add_login("admin", API_KEY);
    conjur.set_token_lifetime(Duration::from_secs(2));
    conjur.set("db/password", pw.as_bytes());
    let pg = PgServer::start(PgOptions::new(PgAuth::Scram, pw));
    let port = free_port();
    let key_file = write_file(dir.path(), "api-key", &format!("{API_KEY}\n"));
    // No cache: every connection fetches, with the provider's current token.
    let mut d = start(
        dir.path(),
        &format!(
            "providers:\n  conjur:\n    applianceUrl: {}\n    account: {ACCOUNT}\n    login: admin\n    apiKeyFile: {}\n",
            conjur.url,
            key_file.display()
        ),
        "  cacheTTL: 0s\n",
        &pg_service(
            "db",
            port,
            &pg,
            "      username: app_user\n      password: {from: conjur, get: db/password}\n",
        ),
        &[],
    );
    let mut all = String::new();
    assert_served(port, &d, &mut all);
    assert_served(port, &d, &mut all);
    assert_eq!(conjur.authentications(), 1, "one token for both");
    // Past three quarters of its 2 s: renewed before it expires.
    std::thread::sleep(Duration::from_millis(1700));
    assert_served(port, &d, &mut all);
    assert_eq!(conjur.authentications(), 2);
    // Past its expiry: renewed too; the server never saw an expired token.
    std::thread::sleep(Duration::from_millis(2500));
    assert_served(port, &d, &mut all);
    assert_eq!(conjur.authentications(), 3);
    assert_eq!(conjur.unauthorized(), 0, "renewed before use");

    // The server forgets its tokens: one 401, one authentication, one retry.
    conjur.revoke_tokens();
    assert_served(port, &d, &mut all);
    assert_eq!(conjur.unauthorized(), 1);
    assert_eq!(conjur.authentications(), 4);

    // The API key is rotated in Conjur only: the renewal fails, the connection too.
    conjur.add_login("admin", "another-key");
    conjur.revoke_tokens();
    let (out, text) = psql_through(port);
    assert!(!out.status.success(), "{text}");
    all.push_str(&text);
    // The key file follows: the next connection authenticates with it.
    std::fs::write(&key_file, "another-key").expect("rotate the key file");
    assert_served(port, &d, &mut all);

    assert!(d.stop().success());
    let log = d.log_text();
    let lines = access_lines(&log, "db");
    assert!(
        lines.iter().any(|l| l.contains("credentials_error")
            && l.contains("conjur: fetching `db/password` was denied: authenticating as `admin`")),
        "{log}"
    );
    assert_no_secret(
        &format!("{all}{log}"),
        &secrets(&[pw, "another-key"]),
        "psql output and broker log",
    );
}

#[test]
fn token_file_authentication_reads_the_sidecars_file_again_when_it_changes() {
    if !privileged() {
        return;
    }
    let pw = "conjur-file-pw-9e3a6c";
    let dir = tempfile::tempdir().expect("tempdir");
    let conjur = FakeConjur::start(ACCOUNT);
    conjur.set("db/password", pw.as_bytes());
    let pg = PgServer::start(PgOptions::new(PgAuth::Scram, pw));
    let port = free_port();
    let token_file = dir.path().join("access-token");
    let t1 = conjur.mint_token("host/app");
    std::fs::write(&token_file, &t1).expect("write token");
    let mut d = start(
        dir.path(),
        "",
        "  cacheTTL: 0s\n",
        &pg_service(
            "db",
            port,
            &pg,
            "      username: app_user\n      password: {from: conjur, get: db/password}\n",
        ),
        &[
            ("CONJUR_APPLIANCE_URL", &conjur.url),
            ("CONJUR_ACCOUNT", ACCOUNT),
            (
                "CONJUR_AUTHN_TOKEN_FILE",
                token_file.to_str().expect("UTF-8"),
            ),
            // Set as in an authn-k8s pod; the token file is what is used.
            (
                "CONJUR_AUTHN_URL",
                &format!("{}/authn-k8s/cluster", conjur.url),
            ),
            ("CONJUR_AUTHN_LOGIN", "host/app"),
        ],
    );
    let mut all = String::new();
    assert_served(port, &d, &mut all);

    // The sidecar renews: a new file replaces the old one, the old token dies.
    conjur.revoke_tokens();
    let t2 = conjur.mint_token("host/app");
    let tmp = dir.path().join("access-token.tmp");
    std::fs::write(&tmp, &t2).expect("write token");
    std::fs::rename(&tmp, &token_file).expect("rename token");
    assert_served(port, &d, &mut all);
    assert_eq!(conjur.unauthorized(), 0, "read again before use");

    // The sidecar is stuck: the token expires, the file stays. Denied after one re-read.
    conjur.revoke_tokens();
    let (out, text) = psql_through(port);
    assert!(!out.status.success(), "{text}");
    all.push_str(&text);
    assert_eq!(conjur.unauthorized(), 2, "one retry");
    assert_eq!(conjur.authentications(), 0, "never authenticates itself");

    assert!(d.stop().success());
    let log = d.log_text();
    assert!(
        access_lines(&log, "db")
            .iter()
            .any(|l| l.contains("credentials_error") && l.contains("was denied")),
        "{log}"
    );
    assert_no_secret(
        &format!("{all}{log}"),
        &secrets(&[pw, &t1, &t2]),
        "psql output and broker log",
    );
}

#[test]
fn ids_with_slashes_spaces_colons_and_encoded_slashes() {
    if !privileged() {
        return;
    }
    let pw = "conjur-ids-pw-2f8d6a";
    let dir = tempfile::tempdir().expect("tempdir");
    let conjur = FakeConjur::start(ACCOUNT);
    conjur.add_login(LOGIN, API_KEY);
    conjur.set("prod/db/password", pw.as_bytes());
    conjur.set("team a/db:pw", pw.as_bytes());
    let pg = PgServer::start(PgOptions::new(PgAuth::Scram, pw));
    let ids = [
        "prod/db/password",
        "prod%2Fdb%2Fpassword",
        "variable:prod/db/password",
        "acme:variable:prod/db/password",
        "team a/db:pw",
        "team%20a%2Fdb:pw",
    ];
    let ports: Vec<u16> = ids.iter().map(|_| free_port()).collect();
    let services: String = ids
        .iter()
        .zip(&ports)
        .enumerate()
        .map(|(i, (id, port))| {
            pg_service(
                &format!("s{i}"),
                *port,
                &pg,
                &format!(
                    "      username: app_user\n      password: {{from: conjur, get: \"{id}\"}}\n"
                ),
            )
        })
        .collect();
    let mut d = start(
        dir.path(),
        "",
        "",
        &services,
        &[
            ("CONJUR_APPLIANCE_URL", &conjur.url),
            ("CONJUR_ACCOUNT", ACCOUNT),
            ("CONJUR_AUTHN_LOGIN", LOGIN),
            ("CONJUR_AUTHN_API_KEY", API_KEY),
        ],
    );
    let mut all = String::new();
    for port in &ports {
        assert_served(*port, &d, &mut all);
    }
    assert_eq!(
        conjur.reads("prod/db/password"),
        4,
        "four ids, one variable"
    );
    assert_eq!(conjur.reads("team a/db:pw"), 2);
    let reads: Vec<String> = conjur
        .seen()
        .into_iter()
        .map(|x| x.target)
        .filter(|t| t.starts_with("/secrets/"))
        .collect();
    for t in &reads {
        assert!(
            t == "/secrets/acme/variable/prod%2Fdb%2Fpassword"
                || t == "/secrets/acme/variable/team%20a%2Fdb:pw",
            "{reads:?}"
        );
    }
    assert!(d.stop().success());
    let log = d.log_text();
    assert_no_secret(
        &format!("{all}{log}"),
        &secrets(&[pw]),
        "psql output and broker log",
    );
}

#[test]
fn missing_refused_and_failing_stores_are_typed_credential_errors() {
    if !privileged() {
        return;
    }
    let pw = "conjur-err-pw-6c1b9e";
    let dir = tempfile::tempdir().expect("tempdir");
    let conjur = FakeConjur::start(ACCOUNT);
    conjur.add_login(LOGIN, API_KEY);
    conjur.set("db/password", pw.as_bytes());
    conjur.set("db/locked", pw.as_bytes());
    conjur.deny("db/locked");
    let pg = PgServer::start(PgOptions::new(PgAuth::Scram, pw));
    let (p_gone, p_locked, p_ok) = (free_port(), free_port(), free_port());
    let svc = |name: &str, port: u16, id: &str| {
        pg_service(
            name,
            port,
            &pg,
            &format!("      username: app_user\n      password: {{from: conjur, get: {id}}}\n"),
        )
    };
    let mut d = start(
        dir.path(),
        "",
        "  cacheTTL: 0s\n",
        &(svc("gone", p_gone, "db/gone")
            + &svc("locked", p_locked, "db/locked")
            + &svc("ok", p_ok, "db/password")),
        &[
            ("CONJUR_APPLIANCE_URL", &conjur.url),
            ("CONJUR_ACCOUNT", ACCOUNT),
            ("CONJUR_AUTHN_LOGIN", LOGIN),
            ("CONJUR_AUTHN_API_KEY", API_KEY),
        ],
    );
    let mut all = String::new();
    for port in [p_gone, p_locked] {
        let (out, text) = psql_through(port);
        assert!(!out.status.success(), "{text}");
        all.push_str(&text);
    }
    assert_served(p_ok, &d, &mut all);
    // The store fails (500 with an HTML page): the connection fails, nothing leaks.
    conjur.set_failing(true);
    let (out, text) = psql_through(p_ok);
    assert!(!out.status.success(), "{text}");
    all.push_str(&text);
    conjur.set_failing(false);
    assert_served(p_ok, &d, &mut all);

    assert!(d.stop().success());
    let log = d.log_text();
    let has = |service: &str, needle: &str| {
        access_lines(&log, service)
            .iter()
            .any(|l| l.contains("credentials_error") && l.contains(needle))
    };
    assert!(has("gone", "conjur: `db/gone` not found"), "{log}");
    assert!(
        has(
            "locked",
            "conjur: fetching `db/locked` was denied: fetching the variable: HTTP status 403"
        ),
        "{log}"
    );
    assert!(
        has(
            "ok",
            "conjur: fetching `db/password` failed: fetching the variable: HTTP status 500"
        ),
        "{log}"
    );
    assert!(
        !log.contains("went wrong"),
        "no reply body in the log:\n{log}"
    );
    assert_no_secret(
        &format!("{all}{log}"),
        &secrets(&[pw]),
        "psql output and broker log",
    );
}

/// A service whose username and password both come from Conjur: the store asks for
/// them together (`SecretProvider::get_many`) and the provider makes ONE batch request.
///
/// Needs the credential store to group a service's fetches through `get_many` (the
/// store work of the same issue); the provider side is covered by the unit test
/// `secrets::conjur::tests::get_many_is_one_batch_request`.
#[test]
fn a_service_with_several_conjur_credentials_is_one_batch_request() {
    if !privileged() {
        return;
    }
    let pw = "conjur-batch-pw-3e9a7c";
    let dir = tempfile::tempdir().expect("tempdir");
    let conjur = FakeConjur::start(ACCOUNT);
    conjur.add_login(LOGIN, API_KEY);
    conjur.set("db/user", b"app_user");
    conjur.set("db/pass word", pw.as_bytes());
    let pg = PgServer::start(PgOptions::new(PgAuth::Scram, pw));
    conjur.set("db/port", pg.port.to_string().as_bytes());
    let port = free_port();
    let mut d = start(
        dir.path(),
        "",
        "",
        &format!(
            "  db:\n    connector: pg\n    listenOn: tcp://127.0.0.1:{port}\n    credentials:\n      host: 127.0.0.1\n      port: {{from: conjur, get: db/port}}\n      sslmode: disable\n      username: {{from: conjur, get: db/user}}\n      password: {{from: conjur, get: \"db%2Fpass%20word\"}}\n"
        ),
        &[
            ("CONJUR_APPLIANCE_URL", &conjur.url),
            ("CONJUR_ACCOUNT", ACCOUNT),
            ("CONJUR_AUTHN_LOGIN", LOGIN),
            ("CONJUR_AUTHN_API_KEY", API_KEY),
        ],
    );
    let mut all = String::new();
    assert_served(port, &d, &mut all);
    assert_eq!(conjur.batches(), 1, "one batch request");
    assert_eq!(conjur.all_reads(), 0, "no single reads");
    let batch = conjur
        .seen()
        .into_iter()
        .find(|x| x.path() == "/secrets")
        .expect("the batch request");
    let q = batch.query().unwrap_or("");
    for full in [
        "acme%3Avariable%3Adb%2Fuser",
        "acme%3Avariable%3Adb%2Fpass+word",
        "acme%3Avariable%3Adb%2Fport",
    ] {
        assert!(q.contains(full), "{q}");
    }
    assert!(d.stop().success());
    assert_no_secret(
        &format!("{all}{}", d.log_text()),
        &secrets(&[pw]),
        "psql output and broker log",
    );
}
