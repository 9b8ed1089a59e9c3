//! PostgreSQL through eBPF interception, with real servers and real clients: `psql`
//! under `broker exec` against scram-sha-256, md5 and TLS-only servers in every sslmode,
//! pgbench (init, persistent, new connection per transaction), cancel, wrong password,
//! rotation without a restart. Every output is grepped for the passwords.

use std::{
    path::Path,
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use broker_tests::{
    assert_no_secret, broker_exec,
    net::TestCgroup,
    output_text,
    pg::{CANCEL_SCRIPT, PgAuth, PgOptions, PgServer, PgTls, python_with_psycopg2},
    privileged, run_broker, write_file,
};

/// A `pg` service intercepting `target`, with the password read from `pw_file`.
fn pg_service(name: &str, target: &str, pg: &PgServer, pw_file: &Path, extra: &str) -> String {
    format!(
        "  {name}:\n    connector: pg\n    intercept: [\"{target}\"]\n    credentials:\n      host: 127.0.0.1\n      port: \"{}\"\n      username: app_user\n      password: {{from: file, get: {}}}\n{extra}",
        pg.addr().port(),
        pw_file.display()
    )
}

/// Run `sh -c script` under `broker exec` with `db.example.test` -> 127.0.0.2.
fn exec_sh(dir: &Path, cfg: &Path, script: &str) -> (bool, String) {
    exec_sh_at(dir, cfg, "127.0.0.2", &[], script)
}

/// Run `sh -c script` under `broker [flags] exec` with `db.example.test` -> `ip`.
fn exec_sh_at(dir: &Path, cfg: &Path, ip: &str, flags: &[&str], script: &str) -> (bool, String) {
    let out = broker_exec(
        dir,
        &[("db.example.test", ip)],
        flags,
        cfg,
        &["sh", "-c", script],
    )
    .env_remove("PGPASSWORD")
    .env("PGCONNECT_TIMEOUT", "10")
    .stdin(Stdio::null())
    .output()
    .expect("run broker exec");
    (out.status.success(), output_text(&out))
}

fn psql_line(port: u16, extra: &str) -> String {
    format!(
        "psql -X -w -A -t \"host=db.example.test port={port} user=anything password=dummy dbname=app {extra}\" -c \"select 'ROLE=' || current_user\""
    )
}

#[test]
fn psql_under_exec_scram_md5_and_tls_in_every_sslmode() {
    if !privileged() {
        return;
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let pw_scram = "scram-pw-7d1f0a9c3b";
    let pw_md5 = "md5-pw-2e8b4c6a1f";
    let pw_tls = "tls-pw-9a3c5e7b0d";
    let scram = PgServer::start(PgOptions::new(PgAuth::Scram, pw_scram));
    let md5 = PgServer::start(PgOptions::new(PgAuth::Md5, pw_md5));
    let tls = PgServer::start(PgOptions::new(PgAuth::Scram, pw_tls).tls(PgTls::Required));
    let ca = tls.ca_cert.clone().expect("TLS server has a CA");
    let f_scram = write_file(dir.path(), "pw-scram", pw_scram);
    let f_md5 = write_file(dir.path(), "pw-md5", pw_md5);
    let f_tls = write_file(dir.path(), "pw-tls", pw_tls);
    let ca_s = ca.display().to_string();
    let mut services = String::new();
    services += &pg_service(
        "scram",
        "db.example.test:5432",
        &scram,
        &f_scram,
        "      sslmode: prefer\n",
    );
    services += &pg_service(
        "md5",
        "db.example.test:5433",
        &md5,
        &f_md5,
        "      sslmode: disable\n",
    );
    services += &pg_service(
        "tls-require",
        "db.example.test:5434",
        &tls,
        &f_tls,
        "      sslmode: require\n",
    );
    services += &pg_service(
        "tls-verify-ca",
        "db.example.test:5435",
        &tls,
        &f_tls,
        &format!("      sslmode: verify-ca\n      sslrootcert: {ca_s}\n"),
    );
    services += &pg_service(
        "tls-verify-full",
        "db.example.test:5436",
        &tls,
        &f_tls,
        &format!(
            "      sslmode: verify-full\n      sslrootcert: {ca_s}\n      sslhost: db.example.test\n"
        ),
    );
    services += &pg_service(
        "tls-wrong-host",
        "db.example.test:5437",
        &tls,
        &f_tls,
        &format!(
            "      sslmode: verify-full\n      sslrootcert: {ca_s}\n      sslhost: wrong.example.test\n"
        ),
    );
    let cfg = write_file(
        dir.path(),
        "broker.yaml",
        &format!("version: 2\nservices:\n{services}"),
    );
    let script = [
        psql_line(5432, "sslmode=disable"),
        psql_line(5432, "sslmode=prefer"),
        psql_line(5433, ""),
        psql_line(5434, ""),
        psql_line(5435, ""),
        psql_line(5436, ""),
        format!("{}; echo WRONG_HOST_EXIT=$?", psql_line(5437, "")),
    ]
    .join("; ");
    let (_, text) = exec_sh(dir.path(), &cfg, &script);
    assert_eq!(
        text.matches("ROLE=app_user").count(),
        6,
        "six brokered sessions as app_user:\n{text}"
    );
    // verify-full against the wrong name fails, with an error naming the service.
    assert!(
        text.contains("WRONG_HOST_EXIT=2") || text.contains("WRONG_HOST_EXIT=1"),
        "{text}"
    );
    assert!(
        text.contains("tls-wrong-host"),
        "the error names the service:\n{text}"
    );
    assert_no_secret(&text, &[pw_scram, pw_md5, pw_tls], "exec output");
}

/// The README's own example: the app dials a hostname, the service has no `host` (or
/// `sslhost`) credential, the upstream is TLS-only with `sslmode: verify-full`. The
/// broker connects to the address the app dialled and verifies the certificate against
/// the hostname the app dialled (the kernel only saw the address).
#[test]
fn verify_full_against_the_intercepted_hostname() {
    if !privileged() {
        return;
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let pw = "tls-name-pw-4c8e1a7f3d";
    let tls = PgServer::start(PgOptions::new(PgAuth::Scram, pw).tls(PgTls::Required));
    let ca = tls.ca_cert.clone().expect("TLS server has a CA");
    let f = write_file(dir.path(), "pw", pw);
    let port = tls.addr().port();
    let cfg = write_file(
        dir.path(),
        "broker.yaml",
        &format!(
            "version: 2\nservices:\n  by-name:\n    connector: pg\n    intercept: [\"db.example.test:{port}\"]\n    credentials:\n      username: app_user\n      password: {{from: file, get: {}}}\n      sslmode: verify-full\n      sslrootcert: {}\n",
            f.display(),
            ca.display()
        ),
    );
    let script = format!(
        "psql -X -w -A -t \"host=db.example.test port={port} user=anything password=dummy dbname=app sslmode=disable\" -c \"select 'ROLE=' || current_user || ' SSL=' || ssl from pg_stat_ssl where pid = pg_backend_pid()\""
    );
    let (_, text) = exec_sh_at(dir.path(), &cfg, "127.0.0.1", &[], &script);
    assert!(
        text.contains("ROLE=app_user SSL=t"),
        "a verified TLS session as app_user:\n{text}"
    );
    assert!(
        text.contains("dst.host=\"db.example.test\""),
        "the access line names the hostname the app dialled:\n{text}"
    );
    assert_no_secret(&text, &[pw], "exec output");
}

/// `clientTLS: on`: a client that requires TLS (`sslmode=require`) is served, and one
/// that verifies (`verify-full` with the broker's CA, created by `broker ca`) sees a
/// certificate for the hostname it dialled; a client negotiating TLS directly
/// (PostgreSQL 17 `sslnegotiation=direct`, ALPN `postgresql`) gets the same handshake;
/// without the setting, a client that requires TLS gives up and the access line (debug)
/// names the setting.
#[test]
fn client_tls_require_verify_full_and_direct() {
    if !privileged() {
        return;
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let pw = "clienttls-pw-5f1b3d7a9c";
    let pg = PgServer::start(PgOptions::new(PgAuth::Scram, pw));
    let f = write_file(dir.path(), "pw", pw);
    let ca_dir = dir.path().join("ca");
    // `broker ca` creates the CA and prints its certificate, never the key.
    let out = Command::new(broker_tests::broker_bin())
        .args(["ca", "--dir"])
        .arg(&ca_dir)
        .output()
        .expect("broker ca");
    let pem = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success() && pem.contains("BEGIN CERTIFICATE"),
        "{}",
        output_text(&out)
    );
    assert!(!output_text(&out).contains("PRIVATE KEY"));
    let ca = ca_dir.join("ca.crt");
    let cfg = write_file(
        dir.path(),
        "broker.yaml",
        &format!(
            "version: 2\nbroker:\n  caDir: {}\nservices:\n{}    config:\n      clientTLS: on\n{}",
            ca_dir.display(),
            pg_service(
                "tls",
                "db.example.test:5432",
                &pg,
                &f,
                "      sslmode: disable\n"
            ),
            pg_service(
                "plain",
                "db.example.test:5433",
                &pg,
                &f,
                "      sslmode: disable\n"
            ),
        ),
    );
    let q = "-c \"select 'ROLE=' || current_user\"";
    let script = format!(
        "psql -X -w -A -t \"host=db.example.test port=5432 user=x password=dummy dbname=app sslmode=require\" {q}; \
         psql -X -w -A -t \"host=db.example.test port=5432 user=x password=dummy dbname=app sslmode=verify-full sslrootcert={ca}\" {q}; \
         echo | openssl s_client -connect db.example.test:5432 -alpn postgresql -servername db.example.test -CAfile {ca} -verify_return_error 2>&1 | grep -E 'Verify return code|ALPN protocol'; \
         echo | openssl s_client -connect db.example.test:5432 -alpn postgresql -servername evil.example.test 2>/dev/null | openssl x509 -noout -subject -ext subjectAltName | sed 's/^/EVIL_SNI /'; \
         psql -X -w -A -t \"host=db.example.test port=5433 user=x password=dummy dbname=app sslmode=require\" {q}; echo PLAIN_REQUIRE_EXIT=$?",
        ca = ca.display()
    );
    let (_, text) = exec_sh_at(
        dir.path(),
        &cfg,
        "127.0.0.2",
        &["--log-level", "debug,hickory=warn,aya=warn"],
        &script,
    );
    assert_eq!(
        text.matches("ROLE=app_user").count(),
        2,
        "sslmode=require and verify-full through clientTLS:\n{text}"
    );
    assert!(text.contains("Verify return code: 0 (ok)"), "{text}");
    assert!(text.contains("ALPN protocol: postgresql"), "{text}");
    assert!(text.contains("client.tls=true"), "{text}");
    // The SNI a client sends does not choose the certificate: the broker vouches only
    // for the name the app dialled.
    let evil: Vec<&str> = text
        .lines()
        .filter(|l| l.starts_with("EVIL_SNI "))
        .collect();
    assert!(
        evil.iter().any(|l| l.contains("db.example.test"))
            && !evil.iter().any(|l| l.contains("evil")),
        "{text}"
    );
    // Without clientTLS, sslmode=require gives up; the access line names the setting.
    assert!(!text.contains("PLAIN_REQUIRE_EXIT=0"), "{text}");
    assert!(
        text.lines()
            .any(|l| l.contains("result=\"client_closed\"") && l.contains("clientTLS")),
        "{text}"
    );
    assert_no_secret(&text, &[pw], "exec output");
}

/// `clientAuth: scram-sha-256`: clients that insist on SCRAM with channel binding
/// (`channel_binding=require`, over `clientTLS`) authenticate to the broker with the
/// service's placeholder password (SCRAM is mutual: the app must know it); a wrong one is
/// refused with PostgreSQL's 28P01 before anything reaches the upstream.
#[test]
fn client_scram_with_channel_binding() {
    if !privileged() {
        return;
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let pw = "clientscram-pw-2d4f6b8a0c";
    let pg = PgServer::start(PgOptions::new(PgAuth::Scram, pw));
    let f = write_file(dir.path(), "pw", pw);
    let ca_dir = dir.path().join("ca");
    let cfg = write_file(
        dir.path(),
        "broker.yaml",
        &format!(
            "version: 2\nbroker:\n  caDir: {}\nservices:\n{}    config:\n      clientTLS: on\n      clientAuth: scram-sha-256\n      clientPassword: placeholder\n{}    config:\n      clientAuth: scram-sha-256\n      clientPassword: placeholder\n",
            ca_dir.display(),
            pg_service(
                "bound",
                "db.example.test:5432",
                &pg,
                &f,
                "      sslmode: disable\n"
            ),
            pg_service(
                "plain",
                "db.example.test:5433",
                &pg,
                &f,
                "      sslmode: disable\n"
            ),
        ),
    );
    let q = "-c \"select 'ROLE=' || current_user\"";
    let dsn = |port: u16, extra: &str| {
        format!("\"host=db.example.test port={port} user=x dbname=app {extra}\"")
    };
    let script = format!(
        "psql -X -w -A -t {} {q}; \
         psql -X -w -A -t {} {q}; \
         psql -X -w -A -t {} {q}; echo WRONG_EXIT=$?; \
         psql -X -w -A -t {} {q}; echo NOBIND_EXIT=$?",
        dsn(
            5432,
            "password=placeholder sslmode=require channel_binding=require"
        ),
        dsn(5433, "password=placeholder sslmode=disable"),
        dsn(
            5432,
            "password=wrong sslmode=require channel_binding=require"
        ),
        dsn(
            5433,
            "password=placeholder sslmode=disable channel_binding=require"
        ),
    );
    let (_, text) = exec_sh_at(dir.path(), &cfg, "127.0.0.2", &[], &script);
    assert_eq!(
        text.matches("ROLE=app_user").count(),
        2,
        "SCRAM-SHA-256-PLUS over client TLS, and SCRAM-SHA-256 in the clear:\n{text}"
    );
    assert!(
        text.contains("WRONG_EXIT=2") && text.contains("password authentication failed"),
        "{text}"
    );
    // channel_binding=require without TLS: libpq refuses (no -PLUS possible).
    assert!(!text.contains("NOBIND_EXIT=0"), "{text}");
    assert_no_secret(&text, &[pw], "exec output");
}

fn in_cgroup(cg: &TestCgroup, program: &str, args: &[&str]) -> (bool, String) {
    let mut c = Command::new("timeout");
    c.args(["--kill-after=5", "120", program])
        .args(args)
        .env_remove("PGPASSWORD")
        .env("PGSSLMODE", "disable")
        .env("PGCONNECT_TIMEOUT", "10")
        .stdin(Stdio::null());
    cg.enter(&mut c);
    let out = c.output().expect("spawn client");
    (out.status.success(), output_text(&out))
}

#[test]
fn pgbench_init_persistent_and_new_connection_per_transaction() {
    if !privileged() {
        return;
    }
    let pw = "bench-pw-5b7d9f1e3a";
    let pg = PgServer::start(PgOptions::new(PgAuth::Scram, pw));
    let tmp = tempfile::tempdir().expect("tempdir");
    let f = write_file(tmp.path(), "pw", pw);
    let b = run_broker(
        "pgbench",
        "",
        &pg_service("db", "127.0.0.2:5432", &pg, &f, "      sslmode: disable\n"),
    );
    let conn = ["-h", "127.0.0.2", "-p", "5432", "-U", "anything", "app"];
    let run = |args: &[&str]| {
        let mut all: Vec<&str> = args.to_vec();
        all.extend_from_slice(&conn);
        let (ok, text) = in_cgroup(&b.cg, "pgbench", &all);
        assert!(
            ok,
            "pgbench {args:?} failed:\n{text}\n{}",
            b.daemon.log_text()
        );
        if let Some(failed) = text
            .lines()
            .find_map(|l| l.strip_prefix("number of failed transactions: "))
        {
            assert!(failed.starts_with('0'), "{text}");
        }
        text
    };
    run(&["-i", "-q", "-s", "1"]);
    let t = run(&["-n", "-c", "8", "-j", "2", "-T", "5"]);
    assert!(t.contains("tps = "), "{t}");
    let t = run(&["-n", "-C", "-c", "4", "-j", "2", "-T", "5"]);
    assert!(t.contains("tps = "), "{t}");
    assert_no_secret(&b.daemon.log_text(), &[pw], "broker log");
    let _ = &b.dir;
}

#[test]
fn cancel_reaches_the_right_backend_within_two_seconds() {
    if !privileged() {
        return;
    }
    let Some(python) = python_with_psycopg2() else {
        panic!("python3 with psycopg2 is required (cargo xtask setup installs python3-psycopg2)");
    };
    let pw = "cancel-pw-3c5e7a9b1d";
    let pg = PgServer::start(PgOptions::new(PgAuth::Scram, pw));
    let tmp = tempfile::tempdir().expect("tempdir");
    let f = write_file(tmp.path(), "pw", pw);
    let b = run_broker(
        "cancel",
        "",
        &pg_service("db", "127.0.0.2:5432", &pg, &f, "      sslmode: disable\n"),
    );
    let dsn = "host=127.0.0.2 port=5432 user=anything dbname=app sslmode=disable";
    let started = Instant::now();
    let (ok, text) = in_cgroup(
        &b.cg,
        python.to_str().unwrap(),
        &["-c", CANCEL_SCRIPT, dsn, "1000"],
    );
    assert!(ok, "{text}\n{}", b.daemon.log_text());
    let line = text
        .lines()
        .find(|l| l.starts_with("SQLSTATE "))
        .unwrap_or_default();
    let mut w = line.split_whitespace();
    assert_eq!(
        w.nth(1),
        Some("57014"),
        "query_canceled expected:\n{text}\n{}",
        b.daemon.log_text()
    );
    let elapsed: f64 = w.nth(1).and_then(|s| s.parse().ok()).unwrap_or(f64::MAX);
    assert!(elapsed < 2.0, "cancel took {elapsed:.3}s:\n{text}");
    assert!(started.elapsed() < Duration::from_secs(30));
    // The cancel connection's access line says what it was.
    let log = b.daemon.log_text();
    assert!(
        log.lines()
            .any(|l| l.contains("\"request\":\"cancel\"") && l.contains("\"result\":\"ok\"")),
        "{log}"
    );
}

/// A client that names no database gets the brokered user's default database (libpq
/// sent its dummy user's name); the server's refusal after authentication (3D000) is
/// logged as what it is; a connection that closes before its startup packet (a
/// driver's probe) is not logged at info.
#[test]
fn database_default_server_refusal_and_probes() {
    if !privileged() {
        return;
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let pw = "dbdefault-pw-8e2a4c6f1b";
    let pg = PgServer::start(PgOptions::new(PgAuth::Scram, pw));
    let f = write_file(dir.path(), "pw", pw);
    let cfg = write_file(
        dir.path(),
        "broker.yaml",
        &format!(
            "version: 2\nservices:\n{}",
            pg_service(
                "db",
                "db.example.test:5432",
                &pg,
                &f,
                "      sslmode: disable\n"
            )
        ),
    );
    let script = "python3 -c 'import socket; socket.create_connection((\"db.example.test\", 5432)).close()'; \
                  psql -X -w -A -t \"host=db.example.test port=5432 user=dummy password=dummy\" -c \"select 'DB=' || current_database()\"; echo NODB_EXIT=$?";
    let (_, text) = exec_sh(dir.path(), &cfg, script);
    assert!(
        text.contains("database \"app_user\" does not exist"),
        "the brokered user's default database was asked for:\n{text}"
    );
    assert!(text.contains("NODB_EXIT=2"), "{text}");
    let access: Vec<&str> = text.lines().filter(|l| l.contains(" access: ")).collect();
    assert_eq!(access.len(), 1, "the probe is not logged at info:\n{text}");
    assert!(
        access[0].contains("result=\"upstream_refused\"") && access[0].contains("3D000"),
        "{text}"
    );
    pg.admin_sql("create database app_user owner app_user");
    let (ok, text2) = exec_sh(
        dir.path(),
        &cfg,
        "psql -X -w -A -t \"host=db.example.test port=5432 user=dummy password=dummy\" -c \"select 'DB=' || current_database()\"",
    );
    assert!(ok && text2.contains("DB=app_user"), "{text2}");
    assert_no_secret(&format!("{text}{text2}"), &[pw], "exec output");
}

#[test]
fn wrong_password_then_rotation_without_restart() {
    if !privileged() {
        return;
    }
    let right = "rotate-pw-one-4d6f8a0c2e";
    let wrong = "not-the-password-1a2b3c";
    let rotated = "rotate-pw-two-9e7c5a3b1d";
    let mut pg = PgServer::start(PgOptions::new(PgAuth::Scram, right));
    let tmp = tempfile::tempdir().expect("tempdir");
    let f = write_file(tmp.path(), "pw", wrong);
    let b = run_broker(
        "rotate",
        "",
        &pg_service("db", "127.0.0.2:5432", &pg, &f, "      sslmode: disable\n"),
    );
    let psql = |what: &str| {
        in_cgroup(
            &b.cg,
            "psql",
            &[
                "-X",
                "-w",
                "-A",
                "-t",
                "host=127.0.0.2 port=5432 user=anything dbname=app",
                "-c",
                what,
            ],
        )
    };
    // Wrong password in the store: the client prints the server's 28P01 error.
    let (ok, text) = psql("select current_user");
    assert!(!ok, "{text}");
    assert!(text.contains("password authentication failed"), "{text}");
    // Rotate: the server and the store change; the next connection works, no restart.
    pg.set_password(rotated);
    std::fs::write(&f, rotated).expect("rotate store");
    let (ok, text) = psql("select 'ROLE=' || current_user");
    assert!(
        ok && text.contains("ROLE=app_user"),
        "{text}\n{}",
        b.daemon.log_text()
    );
    // And once more with the value now cached.
    let (ok, text2) = psql("select 'ROLE=' || current_user");
    assert!(ok && text2.contains("ROLE=app_user"), "{text2}");
    let log = b.daemon.log_text();
    assert!(
        log.contains("auth_rejected") || log.contains("28P01"),
        "{log}"
    );
    assert_no_secret(
        &format!("{text}{text2}{log}"),
        &[right, wrong, rotated],
        "outputs",
    );
}
