//! The `vault` provider against `broker_tests::fake_vault` (Vault's HTTP API, with a
//! database engine backed by a real PostgreSQL 15), through `broker run --no-ebpf`
//! and `pg` services on `listenOn`, driven by the real `psql`:
//!
//! * KV v1, KV v2 (Secretless' `secret/data/x#data.f` and the short `secret/x#f`), a
//!   namespace, the built-in `vault` instance from `VAULT_ADDR`/`VAULT_TOKEN` alone;
//! * AppRole and Kubernetes logins (one login for every credential);
//! * a rotated KV secret picked up after `broker.cacheTTL`;
//! * a fixed token renewed before it expires, a dead AppRole token replaced by a new
//!   login;
//! * dynamic credentials: concurrent connections share ONE lease (one user), the lease
//!   is renewed while in use, a new one is taken before its max TTL, the old one goes,
//!   and with `revokeOnShutdown` nothing is left (no lease, no role in PostgreSQL);
//! * a store answering garbage: typed errors naming the credential, no hang.
//!
//! Every output and the daemon log are grepped for every secret value and token.

use std::{path::Path, process::Output, sync::Arc, time::Duration};

use broker_tests::{
    Daemon, assert_no_secret,
    fake_vault::{FakeVault, Mode},
    fetch, free_port,
    net::Upstream,
    output_text,
    pg::{PgAuth, PgOptions, PgServer, psql},
    privileged, write_file,
};

const PW: &str = "vault-kv-password-71c3e0";
const TEAM_PW: &str = "vault-team-password-2f8d44";
const SECRET_ID: &str = "approle-secret-id-9e1b77";
const JWT: &str = "eyJhbGciOiJSUzI1NiJ9.k8s-service-account.c2lnbmF0dXJl";

/// `broker run --no-ebpf` with `providers` (YAML lines, may be empty), `broker_extra`
/// lines in `broker:` and `services`.
fn start(
    dir: &Path,
    providers: &str,
    broker_extra: &str,
    services: &str,
    env: &[(&str, &str)],
) -> Daemon {
    let health = free_port();
    let providers = if providers.is_empty() {
        String::new()
    } else {
        format!("providers:\n{providers}")
    };
    let cfg = write_file(
        dir,
        "broker.yaml",
        &format!(
            "version: 2\n{providers}broker:\n  health: 127.0.0.1:{health}\n{broker_extra}services:\n{services}"
        ),
    );
    Daemon::start_with_env(
        &cfg,
        &["--no-ebpf"],
        env,
        format!("127.0.0.1:{health}").parse().expect("addr"),
        &dir.join("broker.log"),
    )
}

/// A `pg` service on `listenOn` 127.0.0.1:`port` for `pg`, username and password from
/// `provider` with these ids.
fn pg_service(
    name: &str,
    port: u16,
    pg: &PgServer,
    provider: &str,
    user: &str,
    pass: &str,
) -> String {
    format!(
        "  {name}:\n    connector: pg\n    listenOn: tcp://127.0.0.1:{port}\n    credentials:\n      host: 127.0.0.1\n      port: \"{}\"\n      sslmode: disable\n      username: {{from: {provider}, get: \"{user}\"}}\n      password: {{from: {provider}, get: \"{pass}\"}}\n",
        pg.port
    )
}

/// `select current_user` through the broker on `port`; (the user, all output).
fn whoami(port: u16) -> (Option<String>, String) {
    let out: Output = psql(
        &format!(
            "host=127.0.0.1 port={port} user=anything password=dummy dbname=app sslmode=disable"
        ),
        "select current_user",
    );
    let text = output_text(&out);
    let user = out
        .status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).trim().to_owned());
    (user, text)
}

fn roles(pg: &PgServer) -> usize {
    pg.admin_sql("select count(*) from pg_roles where rolname like 'v-%'")
        .parse()
        .expect("a count")
}

fn ready() -> bool {
    privileged() && broker_tests::pg::available()
}

/// KV v1 (default field `value`), KV v2 in Secretless' form and the short form, and
/// a namespace, each giving a brokered psql session. The `vault` instance used
/// without a `providers:` entry reads `VAULT_ADDR` and `VAULT_TOKEN`.
#[test]
fn kv_v1_v2_and_a_namespace_through_the_builtin_and_a_declared_instance() {
    if !ready() {
        return;
    }
    let pg = PgServer::start(PgOptions::new(PgAuth::Scram, PW));
    pg.admin_sql(&format!("CREATE ROLE team_user LOGIN PASSWORD '{TEAM_PW}'"));
    let vault = FakeVault::start();
    vault.mount_kv("", "kv", 1);
    vault.mount_kv("", "secret", 2);
    vault.mount_kv("team-a", "secret", 2);
    vault.put("", "kv/db", &[("password", PW)]);
    vault.put("", "kv/db-user", &[("value", "app_user")]);
    vault.put(
        "",
        "secret/db",
        &[("username", "app_user"), ("password", PW)],
    );
    vault.put(
        "team-a",
        "secret/db",
        &[("username", "team_user"), ("password", TEAM_PW)],
    );
    let token = vault.create_token("", Duration::ZERO, Duration::ZERO);
    let team_token = vault.create_token("team-a", Duration::ZERO, Duration::ZERO);

    let dir = tempfile::tempdir().expect("tempdir");
    let ports: Vec<u16> = (0..4).map(|_| free_port()).collect();
    let services = [
        pg_service("v1", ports[0], &pg, "vault", "kv/db-user", "kv/db#password"),
        pg_service(
            "v2",
            ports[1],
            &pg,
            "vault",
            "secret/data/db#data.username",
            "secret/data/db#data.password",
        ),
        pg_service(
            "v2-short",
            ports[2],
            &pg,
            "vault",
            "secret/db#username",
            "secret/db#password",
        ),
        pg_service(
            "team",
            ports[3],
            &pg,
            "team",
            "secret/db#username",
            "secret/db#password",
        ),
    ]
    .concat();
    let providers = format!(
        "  team: {{type: vault, address: \"{}\", token: \"${{TEAM_TOKEN}}\", namespace: team-a}}\n",
        vault.url()
    );
    let mut d = start(
        dir.path(),
        &providers,
        "",
        &services,
        &[
            ("VAULT_ADDR", vault.url().as_str()),
            ("VAULT_TOKEN", token.as_str()),
            ("TEAM_TOKEN", team_token.as_str()),
        ],
    );
    let mut all = String::new();
    for (port, want) in ports
        .iter()
        .zip(["app_user", "app_user", "app_user", "team_user"])
    {
        let (user, text) = whoami(*port);
        assert_eq!(
            user.as_deref(),
            Some(want),
            "port {port}: {text}\n{}",
            d.log_text()
        );
        all += &text;
    }
    let c = vault.counters();
    assert_eq!(c.reads.get("kv/db"), Some(&1));
    // One read (username and password together: one grouped fetch) for each of the
    // three KV v2 services (the namespace's path is the same).
    assert_eq!(c.reads.get("secret/data/db"), Some(&3), "v2 in both forms");
    assert!(
        !c.reads.contains_key("secret/db"),
        "the short form is read at data/"
    );
    assert_eq!(c.denied, 0, "{c:?}");
    assert!(d.stop().success());
    let log = d.log_text();
    assert_no_secret(
        &format!("{all}{log}"),
        &[PW, TEAM_PW, &token, &team_token],
        "psql output and broker log",
    );
}

/// A KV v2 secret rotated (with the database password) is used once the cached
/// values expire (`cacheTTL: 4s`): before that, connections use the cache.
#[test]
fn a_rotated_kv_secret_is_picked_up_after_the_cache_ttl() {
    if !ready() {
        return;
    }
    const NEW_PW: &str = "vault-rotated-password-5a0c19";
    let mut pg = PgServer::start(PgOptions::new(PgAuth::Scram, PW));
    let vault = FakeVault::start();
    vault.mount_kv("", "secret", 2);
    vault.put(
        "",
        "secret/db",
        &[("username", "app_user"), ("password", PW)],
    );
    let token = vault.create_token("", Duration::ZERO, Duration::ZERO);
    let dir = tempfile::tempdir().expect("tempdir");
    let port = free_port();
    let mut d = start(
        dir.path(),
        "",
        "  cacheTTL: 4s\n",
        &pg_service(
            "db",
            port,
            &pg,
            "vault",
            "secret/db#username",
            "secret/db#password",
        ),
        &[
            ("VAULT_ADDR", vault.url().as_str()),
            ("VAULT_TOKEN", token.as_str()),
        ],
    );
    let mut all = String::new();
    let started = std::time::Instant::now();
    let (user, text) = whoami(port);
    assert_eq!(user.as_deref(), Some("app_user"), "{text}");
    all += &text;
    let (user, text) = whoami(port);
    assert!(
        started.elapsed() < Duration::from_secs(4),
        "too slow to test the cache"
    );
    assert_eq!(user.as_deref(), Some("app_user"), "{text}");
    all += &text;
    // One read per connection that missed the cache: username and password are one
    // grouped fetch.
    assert_eq!(
        vault.reads("secret/data/db"),
        1,
        "the second connection used the cache"
    );

    pg.set_password(NEW_PW);
    vault.put(
        "",
        "secret/db",
        &[("username", "app_user"), ("password", NEW_PW)],
    );
    std::thread::sleep(Duration::from_millis(4500));
    let (user, text) = whoami(port);
    assert_eq!(
        user.as_deref(),
        Some("app_user"),
        "{text}\n{}",
        d.log_text()
    );
    all += &text;
    assert_eq!(vault.reads("secret/data/db"), 2, "read again after the TTL");
    assert!(d.stop().success());
    let log = d.log_text();
    assert!(
        !log.contains("rejected"),
        "the new password came from the store, not a retry:\n{log}"
    );
    assert_no_secret(
        &format!("{all}{log}"),
        &[PW, NEW_PW, &token],
        "output and log",
    );
}

/// AppRole (secret id from a file) and Kubernetes (the service-account JWT from a
/// file): one login each for both credentials, and the sessions work.
#[test]
fn approle_and_kubernetes_logins() {
    if !ready() {
        return;
    }
    let pg = PgServer::start(PgOptions::new(PgAuth::Scram, PW));
    let vault = FakeVault::start();
    vault.mount_kv("", "kv", 1);
    vault.put("", "kv/db", &[("username", "app_user"), ("password", PW)]);
    vault.add_approle(
        "",
        "approle",
        "role-app",
        SECRET_ID,
        Duration::from_secs(600),
        Duration::from_secs(3600),
    );
    vault.add_kubernetes_role(
        "",
        "k8s",
        "app",
        JWT,
        Duration::from_secs(600),
        Duration::from_secs(3600),
    );
    let dir = tempfile::tempdir().expect("tempdir");
    let sid = write_file(dir.path(), "secret-id", &format!("{SECRET_ID}\n"));
    let jwt = write_file(dir.path(), "jwt", JWT);
    let (p1, p2) = (free_port(), free_port());
    let providers = format!(
        "  role:\n    type: vault\n    address: \"{0}\"\n    auth: {{method: approle, roleId: role-app, secretIdFile: {1}}}\n  pod:\n    type: vault\n    address: \"{0}\"\n    auth: {{method: kubernetes, role: app, jwtFile: {2}, mount: k8s}}\n",
        vault.url(),
        sid.display(),
        jwt.display()
    );
    let services = pg_service(
        "by-role",
        p1,
        &pg,
        "role",
        "kv/db#username",
        "kv/db#password",
    ) + &pg_service("by-pod", p2, &pg, "pod", "kv/db#username", "kv/db#password");
    let mut d = start(dir.path(), &providers, "", &services, &[]);
    let mut all = String::new();
    for port in [p1, p2, p1, p2] {
        let (user, text) = whoami(port);
        assert_eq!(
            user.as_deref(),
            Some("app_user"),
            "{text}\n{}",
            d.log_text()
        );
        all += &text;
    }
    let c = vault.counters();
    assert_eq!((c.logins_approle, c.logins_kubernetes), (1, 1), "{c:?}");
    assert_eq!(c.failed_logins, 0);
    assert!(d.stop().success());
    let log = d.log_text();
    let mut secrets = vec![PW.to_owned(), SECRET_ID.to_owned(), JWT.to_owned()];
    secrets.extend(vault.issued_tokens());
    let secrets: Vec<&str> = secrets.iter().map(String::as_str).collect();
    assert_no_secret(&format!("{all}{log}"), &secrets, "output and log");
}

/// A fixed token with a 3 s TTL is renewed before it expires (no connection in
/// between); an AppRole token that Vault expired is replaced by a new login at the
/// next fetch, which then succeeds.
#[test]
fn tokens_are_renewed_or_replaced_by_a_new_login() {
    if !ready() {
        return;
    }
    let pg = PgServer::start(PgOptions::new(PgAuth::Scram, PW));
    let vault = FakeVault::start();
    vault.mount_kv("", "kv", 1);
    vault.put("", "kv/db", &[("username", "app_user"), ("password", PW)]);
    vault.add_approle(
        "",
        "approle",
        "role-app",
        SECRET_ID,
        Duration::from_secs(600),
        Duration::from_secs(3600),
    );
    let token = vault.create_token("", Duration::from_secs(3), Duration::from_secs(120));
    let dir = tempfile::tempdir().expect("tempdir");
    let (p1, p2) = (free_port(), free_port());
    let providers = format!(
        "  role:\n    type: vault\n    address: \"{}\"\n    auth: {{method: approle, roleId: role-app, secretId: \"${{SID}}\"}}\n",
        vault.url()
    );
    let services = pg_service(
        "fixed",
        p1,
        &pg,
        "vault",
        "kv/db#username",
        "kv/db#password",
    ) + &pg_service("login", p2, &pg, "role", "kv/db#username", "kv/db#password");
    let mut d = start(
        dir.path(),
        &providers,
        "  cacheTTL: 1s\n",
        &services,
        &[
            ("VAULT_ADDR", vault.url().as_str()),
            ("VAULT_TOKEN", token.as_str()),
            ("SID", SECRET_ID),
        ],
    );
    let mut all = String::new();
    for port in [p1, p2] {
        let (user, text) = whoami(port);
        assert_eq!(
            user.as_deref(),
            Some("app_user"),
            "{text}\n{}",
            d.log_text()
        );
        all += &text;
    }
    // Past the fixed token's first TTL: renewed meanwhile, still works.
    std::thread::sleep(Duration::from_millis(4500));
    let (user, text) = whoami(p1);
    assert_eq!(
        user.as_deref(),
        Some("app_user"),
        "{text}\n{}",
        d.log_text()
    );
    all += &text;
    let renewals = vault.counters().token_renewals;
    assert!(renewals >= 2, "renewed at 2 s and 4 s: {renewals}");

    // Vault expires every token: the AppRole provider logs in again.
    vault.expire_tokens();
    std::thread::sleep(Duration::from_millis(1200));
    let (user, text) = whoami(p2);
    assert_eq!(
        user.as_deref(),
        Some("app_user"),
        "{text}\n{}",
        d.log_text()
    );
    all += &text;
    let c = vault.counters();
    assert_eq!(c.logins_approle, 2, "{c:?}");
    // The fixed token cannot log in again: a credentials error naming Vault's refusal.
    let (user, text) = whoami(p1);
    assert_eq!(user, None, "{text}");
    all += &text;
    assert!(d.stop().success());
    let log = d.log_text();
    assert!(
        log.contains("fixed token cannot log in again"),
        "the refusal is explained:\n{log}"
    );
    let mut secrets = vec![PW.to_owned(), SECRET_ID.to_owned()];
    secrets.extend(vault.issued_tokens());
    let secrets: Vec<&str> = secrets.iter().map(String::as_str).collect();
    assert_no_secret(&format!("{all}{log}"), &secrets, "output and log");
}

/// Dynamic PostgreSQL credentials (`database/creds/app`, TTL 5 s, max TTL 12 s):
/// concurrent connections share one lease (one role); connections over 12.5 s keep
/// working while the lease is renewed and then replaced before its max TTL; the old
/// role is gone; at shutdown (`revokeOnShutdown: true`) every lease is revoked and no
/// `v-` role is left in PostgreSQL.
#[test]
fn dynamic_credentials_one_lease_renewed_replaced_and_revoked_at_shutdown() {
    if !ready() {
        return;
    }
    let pg = Arc::new(PgServer::start(PgOptions::new(PgAuth::Scram, PW)));
    let vault = FakeVault::start();
    vault.mount_database("", "database", Arc::clone(&pg), "app");
    vault.add_db_role(
        "",
        "database",
        "app",
        Duration::from_secs(5),
        Duration::from_secs(12),
        &["GRANT CREATE ON SCHEMA public TO \"{{name}}\""],
    );
    let token = vault.create_token("", Duration::ZERO, Duration::ZERO);
    let dir = tempfile::tempdir().expect("tempdir");
    let port = free_port();
    let mut d = start(
        dir.path(),
        "  vault: {revokeOnShutdown: true}\n",
        "",
        &pg_service(
            "dyn",
            port,
            &pg,
            "vault",
            "database/creds/app#username",
            "database/creds/app#password",
        ),
        &[
            ("VAULT_ADDR", vault.url().as_str()),
            ("VAULT_TOKEN", token.as_str()),
            // Lease renewals and fetches in the log (grepped for secrets too).
            ("BROKER_LOG", "info,broker::secrets=debug"),
        ],
    );
    let mut all = String::new();

    // Five connections at once: one lease, one role.
    let first: Vec<_> = (0..5)
        .map(|_| std::thread::spawn(move || whoami(port)))
        .collect();
    let mut users = Vec::new();
    for t in first {
        let (user, text) = t.join().expect("psql thread");
        all += &text;
        users.push(user.unwrap_or_else(|| panic!("{text}")));
    }
    users.dedup();
    assert_eq!(users.len(), 1, "one role for all: {users:?}");
    assert!(users[0].starts_with("v-token-app-"), "{users:?}");
    assert_eq!(vault.counters().leases_created, 1);
    assert_eq!(
        vault.reads("database/creds/app"),
        1,
        "username and password: one read"
    );

    // Keep connecting for 12.5 s (renewed at about 2.5, 5, 7.5 s; the last renewal is
    // capped by the max TTL, so a new lease comes at about 10.5 s).
    let started = std::time::Instant::now();
    let mut seen = vec![users[0].clone()];
    while started.elapsed() < Duration::from_millis(12_500) {
        std::thread::sleep(Duration::from_millis(400));
        let (user, text) = whoami(port);
        all += &text;
        let user = user.unwrap_or_else(|| panic!("{text}\n{}", d.log_text()));
        if seen.last() != Some(&user) {
            seen.push(user);
        }
    }
    let c = vault.counters();
    assert_eq!(
        c.leases_created,
        2,
        "a new lease before the max TTL: {c:?}\n{}",
        d.log_text()
    );
    assert_eq!(seen.len(), 2, "two roles in turn: {seen:?}");
    assert!(c.leases_renewed >= 3, "renewed while in use: {c:?}");
    assert_eq!(
        vault.active_leases(),
        1,
        "the superseded lease is gone: {c:?}"
    );
    assert_eq!(roles(&pg), 1, "only the current role exists");

    assert!(d.stop().success());
    let c = vault.counters();
    assert_eq!(vault.active_leases(), 0, "revoked at shutdown: {c:?}");
    assert!(c.leases_revoked >= 1, "{c:?}");
    assert!(c.revoke_failures.is_empty(), "{c:?}");
    assert_eq!(roles(&pg), 0, "no role left in PostgreSQL");

    let log = d.log_text();
    let mut secrets = vault.issued_passwords();
    secrets.push(token.clone());
    secrets.push(PW.to_owned());
    let secrets: Vec<&str> = secrets.iter().map(String::as_str).collect();
    assert_no_secret(
        &format!("{all}{log}"),
        &secrets,
        "psql output and broker log",
    );
}

/// A Vault answering garbage (HTML 500, not JSON, truncated JSON, 2 MiB, a redirect,
/// sealed, no answer): each connection is refused with a credentials error naming the
/// credential and what was wrong, in bounded time; then a sane answer is served.
#[test]
fn a_hostile_vault_gives_typed_errors() {
    if !privileged() {
        return;
    }
    let vault = FakeVault::start();
    vault.mount_kv("", "kv", 1);
    vault.put("", "kv/db", &[("password", PW)]);
    let token = vault.create_token("", Duration::ZERO, Duration::ZERO);
    let web = Upstream::start("127.0.0.1", "web");
    let dir = tempfile::tempdir().expect("tempdir");
    let port = free_port();
    let providers = format!(
        // No breaker: every failure mode reaches the store and is reported as itself.
        "  vault: {{address: \"{}\", token: \"${{VT}}\", timeout: 1s, breaker: off}}\n",
        vault.url()
    );
    let mut d = start(
        dir.path(),
        &providers,
        "",
        &format!(
            "  web:\n    connector: tcp\n    listenOn: tcp://127.0.0.1:{port}\n    credentials:\n      host: 127.0.0.1\n      port: \"{}\"\n      sslmode: disable\n      password: {{from: vault, get: kv/db#password}}\n",
            web.addr.port()
        ),
        &[("VT", token.as_str())],
    );
    let mut all = String::new();
    for (mode, says) in [
        (Mode::Html500, "fetching `kv/db#password` failed: HTTP 500"),
        (
            Mode::NotJson,
            "bad reply for `kv/db#password`: HTTP 200: the reply is not JSON",
        ),
        (Mode::Truncated, "the reply is not JSON"),
        (Mode::Huge, "reply larger than 1048576 bytes"),
        (Mode::Redirect, "redirects are not followed"),
        (Mode::Sealed, "HTTP 503: Vault is sealed"),
        (Mode::Hang, "timed out after 1s"),
    ] {
        vault.set_mode(mode);
        let started = std::time::Instant::now();
        let body = fetch(port);
        assert_eq!(body, "", "{mode:?}: no session");
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "{mode:?}: bounded"
        );
        all += &body;
        let log = d.log_until(Duration::from_secs(5), |l| l.contains(says));
        assert!(log.contains(says), "{mode:?}: {says}\n{log}");
    }
    vault.set_mode(Mode::Normal);
    let body = fetch(port);
    assert_eq!(body, "hello from web");
    all += &body;
    assert!(d.stop().success());
    let log = d.log_text();
    assert!(log.contains("credential `password`"), "{log}");
    assert_no_secret(&format!("{all}{log}"), &[PW, &token], "output and log");
}
