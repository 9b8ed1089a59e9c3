//! The `kubernetes` provider against `broker_tests::fake_kube` (core v1 Secrets),
//! through `broker run --no-ebpf` and `pg` services on `listenOn` in front of a real
//! PostgreSQL, driven by the real `psql`:
//!
//! * the built-in instance `kubernetes` from the in-cluster environment alone: the
//!   daemon runs in a private mount namespace where our files are the pod's
//!   `/var/run/secrets/kubernetes.io/serviceaccount` (token, CA, namespace), and
//!   `KUBERNETES_SERVICE_HOST`/`_PORT` point at the HTTPS fake; rotation in the store
//!   picked up once the cache TTL has passed; a rotated service account token;
//! * declared instances: a token file rotated (picked up before use; rewritten in place,
//!   picked up after one 401), a `namespace` override, a forbidden namespace and a
//!   missing key as typed credential errors.
//!
//! Every output and the daemon log are grepped for the passwords and the tokens.

use std::{
    net::SocketAddr,
    path::Path,
    process::{Command, Output},
    time::{Duration, Instant},
};

use broker_tests::{
    Daemon, assert_no_secret, broker_bin,
    fake_kube::FakeKube,
    free_port, http_get, output_text,
    pg::{PgAuth, PgOptions, PgServer, psql},
    privileged, write_file,
};

const SA_TOKEN: &str = "kube-it-sa-token-one-8c2e5a";
const SA_TOKEN_2: &str = "kube-it-sa-token-two-4f7b1d";

/// A `pg` service on `listenOn` for `pg`; `creds` are credential lines (6 spaces).
fn pg_service(name: &str, port: u16, pg: &PgServer, creds: &str) -> String {
    format!(
        "  {name}:\n    connector: pg\n    listenOn: tcp://127.0.0.1:{port}\n    credentials:\n      host: 127.0.0.1\n      port: \"{}\"\n      sslmode: disable\n{creds}",
        pg.port
    )
}

/// The config file: `head` (a `providers:` block or nothing), `broker` lines, services.
fn config(
    dir: &Path,
    head: &str,
    broker_extra: &str,
    services: &str,
) -> (std::path::PathBuf, SocketAddr) {
    let health = free_port();
    let cfg = write_file(
        dir,
        "broker.yaml",
        &format!(
            "version: 2\n{head}broker:\n  health: 127.0.0.1:{health}\n{broker_extra}services:\n{services}"
        ),
    );
    (cfg, format!("127.0.0.1:{health}").parse().expect("addr"))
}

/// `broker run --no-ebpf` as in a pod: in a private mount namespace with a tmpfs on
/// /run and `sa_dir` bound on /run/secrets/kubernetes.io/serviceaccount (/var/run is
/// /run), and `env`. Waits for `/ready`.
fn start_in_pod(
    dir: &Path,
    sa_dir: &Path,
    cfg: &Path,
    health: SocketAddr,
    env: &[(&str, &str)],
) -> Daemon {
    let log = dir.join("broker.log");
    let out = std::fs::File::create(&log).expect("create daemon log");
    let child = Command::new("unshare")
        .args(["--mount", "--propagation", "private", "sh", "-c"])
        .arg(
            "mount -t tmpfs tmpfs /run && mkdir -p /run/secrets/kubernetes.io/serviceaccount \
             && mount --bind \"$0\" /run/secrets/kubernetes.io/serviceaccount && exec \"$@\"",
        )
        .arg(sa_dir)
        .arg(broker_bin())
        .arg("run")
        .arg("-f")
        .arg(cfg)
        .arg("--no-ebpf")
        .envs(env.iter().copied())
        .stdout(out.try_clone().expect("dup log"))
        .stderr(out)
        .spawn()
        .expect("spawn unshare broker run");
    let mut d = Daemon { child, health, log };
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Some(st) = d.child.try_wait().expect("try_wait") {
            panic!("broker exited early ({st}):\n{}", d.log_text());
        }
        if matches!(http_get(health, "/ready"), Some((200, _))) {
            return d;
        }
        assert!(
            Instant::now() < deadline,
            "broker not ready:\n{}",
            d.log_text()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
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

#[track_caller]
fn assert_refused(port: u16, all: &mut String) {
    let (out, text) = psql_through(port);
    assert!(!out.status.success(), "{text}");
    all.push_str(&text);
}

/// The access-log lines of `service`.
fn access_lines(log: &str, service: &str) -> Vec<String> {
    log.lines()
        .filter(|l| l.contains("access") && l.contains(&format!("service={service} ")))
        .map(str::to_owned)
        .collect()
}

/// Replace `path` as the kubelet does with projected tokens: a new file renamed over.
fn replace_file(path: &Path, text: &str) {
    let tmp = path.with_extension("new");
    std::fs::write(&tmp, text).expect("write");
    std::fs::rename(&tmp, path).expect("rename");
}

#[test]
fn builtin_instance_in_a_pod_over_https_rotation_after_the_ttl_and_a_rotated_token() {
    if !privileged() {
        return;
    }
    let (pw1, pw2) = ("kube-rot-one-3b8f1c", "kube-rot-two-9d4a2e");
    let dir = tempfile::tempdir().expect("tempdir");
    let kube = FakeKube::start_tls(SA_TOKEN, dir.path());
    kube.set("app", "db-creds", "username", b"app_user");
    kube.set("app", "db-creds", "password", pw1.as_bytes());
    // The same Secret in another namespace, with a wrong password: never read.
    kube.set("default", "db-creds", "password", b"wrong-namespace");
    let mut pg = PgServer::start(PgOptions::new(PgAuth::Scram, pw1));
    let sa = dir.path().join("serviceaccount");
    std::fs::create_dir(&sa).expect("mkdir");
    std::fs::write(sa.join("token"), SA_TOKEN).expect("token");
    std::fs::copy(
        kube.ca.as_ref().expect("HTTPS fake has a CA"),
        sa.join("ca.crt"),
    )
    .expect("ca");
    std::fs::write(sa.join("namespace"), "app").expect("namespace");
    let port = free_port();
    let (cfg, health) = config(
        dir.path(),
        "",
        "  cacheTTL: 1s\n",
        &pg_service(
            "db",
            port,
            &pg,
            "      username: {from: kubernetes, get: db-creds#username}\n      password: {from: kubernetes, get: db-creds#password}\n",
        ),
    );
    let kport = kube.addr.port().to_string();
    let mut d = start_in_pod(
        dir.path(),
        &sa,
        &cfg,
        health,
        &[
            ("KUBERNETES_SERVICE_HOST", "127.0.0.1"),
            ("KUBERNETES_SERVICE_PORT", &kport),
        ],
    );
    let mut all = String::new();
    assert_served(port, &d, &mut all);
    let first = kube.reads("app", "db-creds");
    assert!(first >= 1, "read from the pod's namespace");
    assert_eq!(kube.reads("default", "db-creds"), 0);

    // Rotation in the store and the database: picked up after the TTL.
    pg.set_password(pw2);
    kube.set("app", "db-creds", "password", pw2.as_bytes());
    std::thread::sleep(Duration::from_millis(1500));
    assert_served(port, &d, &mut all);
    assert!(kube.reads("app", "db-creds") > first);

    // The kubelet rotates the projected token; the old one stops working.
    kube.accept_tokens(&[SA_TOKEN_2]);
    replace_file(&sa.join("token"), SA_TOKEN_2);
    std::thread::sleep(Duration::from_millis(1500));
    assert_served(port, &d, &mut all);
    assert_eq!(kube.unauthorized(), 0, "the new token was read before use");
    assert!(
        kube.seen()
            .iter()
            .all(|(path, _)| path == "/api/v1/namespaces/app/secrets/db-creds"),
        "{:?}",
        kube.seen()
    );

    assert!(d.stop().success());
    let log = d.log_text();
    assert!(
        !log.contains("auth_rejected"),
        "picked up by the TTL:\n{log}"
    );
    assert_eq!(access_lines(&log, "db").len(), 3, "{log}");
    assert_no_secret(
        &format!("{all}{log}"),
        &[pw1, pw2, SA_TOKEN, SA_TOKEN_2],
        "psql output and broker log",
    );
}

#[test]
fn token_file_rotation_namespace_override_and_typed_errors() {
    if !privileged() {
        return;
    }
    let pw = "kube-ns-pw-5e1c7b";
    let dir = tempfile::tempdir().expect("tempdir");
    let kube = FakeKube::start(SA_TOKEN);
    // The right password is in namespace `other`; `app` holds a wrong one.
    kube.set("app", "db-creds", "password", b"wrong-namespace-pw");
    kube.set("other", "db-creds", "password", pw.as_bytes());
    kube.set("locked", "db-creds", "password", pw.as_bytes());
    kube.forbid("locked");
    let pg = PgServer::start(PgOptions::new(PgAuth::Scram, pw));
    let token = write_file(dir.path(), "token", SA_TOKEN);
    let instance = |name: &str, ns: &str| {
        format!(
            "  {name}:\n    type: kubernetes\n    apiServer: {}\n    tokenFile: {}\n    namespace: {ns}\n    timeout: 5s\n",
            kube.url,
            token.display()
        )
    };
    let (p_other, p_locked, p_nokey) = (free_port(), free_port(), free_port());
    let svc = |name: &str, port: u16, from: &str, id: &str| {
        pg_service(
            name,
            port,
            &pg,
            &format!("      username: app_user\n      password: {{from: {from}, get: \"{id}\"}}\n"),
        )
    };
    let (cfg, health) = config(
        dir.path(),
        &format!(
            "providers:\n{}{}",
            instance("in-other", "other"),
            instance("in-locked", "locked")
        ),
        "  cacheTTL: 0s\n",
        &(svc("other", p_other, "in-other", "db-creds#password")
            + &svc("locked", p_locked, "in-locked", "db-creds#password")
            + &svc("nokey", p_nokey, "in-other", "db-creds#passwd")),
    );
    let mut d = Daemon::start(&cfg, &["--no-ebpf"], health, &dir.path().join("broker.log"));
    let mut all = String::new();
    assert_served(p_other, &d, &mut all);
    assert_eq!(kube.reads("other", "db-creds"), 1);
    assert_eq!(kube.reads("app", "db-creds"), 0, "the namespace override");

    // Rotation: a new file renamed over the old one; read before the next request.
    kube.accept_tokens(&[SA_TOKEN_2]);
    replace_file(&token, SA_TOKEN_2);
    assert_served(p_other, &d, &mut all);
    assert_eq!(kube.unauthorized(), 0);

    // Rewritten in place, same size and mtime: the stat cannot tell; one 401, the file
    // read again, one retry.
    let third = "kube-it-sa-token-3x9-5e2c8d";
    assert_eq!(third.len(), SA_TOKEN_2.len());
    kube.accept_tokens(&[third]);
    let mtime = std::fs::metadata(&token)
        .and_then(|m| m.modified())
        .expect("mtime");
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(&token)
        .expect("open");
    std::io::Write::write_all(&mut &f, third.as_bytes()).expect("write");
    f.set_modified(mtime).expect("set mtime");
    drop(f);
    assert_served(p_other, &d, &mut all);
    assert_eq!(kube.unauthorized(), 1);

    assert_refused(p_locked, &mut all);
    assert_refused(p_nokey, &mut all);

    assert!(d.stop().success());
    let log = d.log_text();
    let has = |service: &str, needle: &str| {
        access_lines(&log, service)
            .iter()
            .any(|l| l.contains("credentials_error") && l.contains(needle))
    };
    assert!(
        has(
            "locked",
            "in-locked: fetching `db-creds#password` was denied: HTTP status 403"
        ),
        "{log}"
    );
    assert!(
        has("nokey", "in-other: `db-creds#passwd` not found"),
        "{log}"
    );
    assert!(
        !log.contains("cannot get resource"),
        "no reply body in the log:\n{log}"
    );
    assert_no_secret(
        &format!("{all}{log}"),
        &[pw, "wrong-namespace-pw", SA_TOKEN, SA_TOKEN_2, third],
        "psql output and broker log",
    );
}
