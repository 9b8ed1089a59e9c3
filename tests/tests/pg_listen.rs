//! PostgreSQL through `listenOn` listeners, without eBPF: `broker run --no-ebpf` in front
//! of real PostgreSQL 15 servers (scram-sha-256, md5, password, TLS-only), driven by the
//! real `psql` and psycopg2. Covers every upstream sslmode, startup parameter
//! pass-through, the server's own errors, broker errors with SQLSTATEs, rotation and
//! cancel. Every output and the daemon log are grepped for the passwords.

use std::{net::SocketAddr, path::Path, process::Output};

use broker_tests::{
    Daemon, assert_no_secret, free_port, output_text,
    pg::{PgAuth, PgOptions, PgServer, PgTls, cancel_sleep, psql, python_with_psycopg2},
    privileged, write_file,
};

/// A `pg` service on `listenOn: tcp://127.0.0.1:<port>` for `pg`, the password read from
/// `pw_file`; `extra` adds credential lines (6-space indent).
fn service(name: &str, port: u16, pg_port: u16, pw_file: &Path, extra: &str) -> String {
    format!(
        "  {name}:\n    connector: pg\n    listenOn: tcp://127.0.0.1:{port}\n    credentials:\n      host: 127.0.0.1\n      port: \"{pg_port}\"\n      username: app_user\n      password: {{from: file, get: {}}}\n{extra}",
        pw_file.display()
    )
}

/// A running daemon with its files; fields drop in order (daemon first).
struct Running {
    daemon: Daemon,
    dir: tempfile::TempDir,
}

fn start(services: &str) -> Running {
    start_with("", services)
}

/// [`start`] with extra lines for the `broker:` block.
fn start_with(broker_extra: &str, services: &str) -> Running {
    let dir = tempfile::tempdir().expect("tempdir");
    let health = free_port();
    let cfg = write_file(
        dir.path(),
        "broker.yaml",
        &format!(
            "version: 2\nbroker:\n  health: 127.0.0.1:{health}\n{broker_extra}services:\n{services}"
        ),
    );
    let health: SocketAddr = format!("127.0.0.1:{health}").parse().expect("addr");
    let daemon = Daemon::start(&cfg, &["--no-ebpf"], health, &dir.path().join("broker.log"));
    Running { daemon, dir }
}

fn conninfo(port: u16, extra: &str) -> String {
    format!(
        "host=127.0.0.1 port={port} user=anything password=dummy dbname=app sslmode=disable {extra}"
    )
}

fn run_psql(port: u16, extra: &str, sql: &str) -> (Output, String) {
    let out = psql(&conninfo(port, extra), sql);
    let text = output_text(&out);
    (out, text)
}

#[test]
fn psql_through_listen_on_scram_md5_password_and_every_sslmode() {
    if !privileged() {
        return;
    }
    let pw_scram = "listen-scram-pw-4f2a9c";
    let pw_md5 = "listen-md5-pw-8b1d3e";
    let pw_clear = "listen-clear-pw-6c0e2a";
    let pw_tls = "listen-tls-pw-1e5b7d";
    let secrets = [pw_scram, pw_md5, pw_clear, pw_tls];
    let scram = PgServer::start(PgOptions::new(PgAuth::Scram, pw_scram));
    let md5 = PgServer::start(PgOptions::new(PgAuth::Md5, pw_md5));
    let clear = PgServer::start(PgOptions::new(PgAuth::Password, pw_clear));
    let tls = PgServer::start(PgOptions::new(PgAuth::Scram, pw_tls).tls(PgTls::Required));
    let ca = tls.ca_cert.clone().expect("TLS server has a CA");
    let ca_s = ca.display().to_string();
    let files = tempfile::tempdir().expect("tempdir");
    let f_scram = write_file(files.path(), "scram", pw_scram);
    let f_md5 = write_file(files.path(), "md5", &format!("{pw_md5}\n"));
    let f_clear = write_file(files.path(), "clear", pw_clear);
    let f_tls = write_file(files.path(), "tls", pw_tls);

    // (service, port, server, password file, extra credentials, expect success)
    let cases: Vec<(&str, &PgServer, &Path, String, bool)> = vec![
        (
            "scram",
            &scram,
            &f_scram,
            "      sslmode: disable\n".into(),
            true,
        ),
        ("md5", &md5, &f_md5, "      sslmode: disable\n".into(), true),
        // A cleartext password over plain TCP only when the service says so (the
        // default refuses: whoever holds the address would receive it).
        (
            "clear",
            &clear,
            &f_clear,
            "      require_auth: password\n      sslmode: disable\n".into(),
            true,
        ),
        // No sslmode: `require`, as in Secretless.
        ("tls-default", &tls, &f_tls, String::new(), true),
        (
            "tls-prefer",
            &tls,
            &f_tls,
            "      sslmode: prefer\n".into(),
            true,
        ),
        (
            "tls-require",
            &tls,
            &f_tls,
            "      sslmode: require\n".into(),
            true,
        ),
        (
            "tls-verify-ca",
            &tls,
            &f_tls,
            format!("      sslmode: verify-ca\n      sslrootcert: {ca_s}\n"),
            true,
        ),
        (
            "tls-verify-full",
            &tls,
            &f_tls,
            format!(
                "      sslmode: verify-full\n      sslrootcert: {ca_s}\n      sslhost: db.example.test\n"
            ),
            true,
        ),
        (
            "tls-ca-from-store",
            &tls,
            &f_tls,
            format!(
                "      sslmode: verify-full\n      sslrootcert: {{from: file, get: {ca_s}}}\n      sslhost: localhost\n"
            ),
            true,
        ),
        (
            "tls-wrong-host",
            &tls,
            &f_tls,
            format!(
                "      sslmode: verify-full\n      sslrootcert: {ca_s}\n      sslhost: wrong.example.test\n"
            ),
            false,
        ),
        (
            "tls-disabled",
            &tls,
            &f_tls,
            "      sslmode: disable\n".into(),
            false,
        ),
        (
            "clear-default",
            &clear,
            &f_clear,
            "      sslmode: disable\n".into(),
            false,
        ),
        // No sslmode and a server without TLS: refused, saying how to allow it.
        ("plain-default", &scram, &f_scram, String::new(), false),
    ];
    let ports: Vec<u16> = cases.iter().map(|_| free_port()).collect();
    let mut services = String::new();
    for ((name, pg, f, extra, _), port) in cases.iter().zip(&ports) {
        services += &service(name, *port, pg.port, f, extra);
    }
    let b = start(&services);
    let mut all = String::new();
    for ((name, _, _, _, want_ok), port) in cases.iter().zip(&ports) {
        let (out, text) = run_psql(
            *port,
            "",
            "select 'ROLE=' || current_user || ' SSL=' || ssl from pg_stat_ssl where pid = pg_backend_pid()",
        );
        all += &text;
        assert_eq!(
            out.status.success(),
            *want_ok,
            "{name}:\n{text}\n{}",
            b.daemon.log_text()
        );
        if *want_ok {
            let tls_expected = name.starts_with("tls-");
            assert!(
                text.contains(&format!("ROLE=app_user SSL={tls_expected}")),
                "{name}: {text}"
            );
        }
    }
    // verify-full against a name the certificate lacks: a clear error naming the service.
    let (_, text) = run_psql(ports[9], "", "select 1");
    assert!(
        text.contains("service `tls-wrong-host`")
            && text.contains("TLS")
            && text.contains("wrong.example.test"),
        "{text}"
    );
    all += &text;
    // A plain connection to a TLS-only server: the server's own 28000 reaches psql.
    let (_, text) = run_psql(ports[10], "", "select 1");
    assert!(text.contains("no pg_hba.conf entry"), "{text}");
    all += &text;
    // A cleartext request over plain TCP without `require_auth: password`: refused,
    // naming the setting.
    let (_, text) = run_psql(ports[11], "", "select 1");
    assert!(
        text.contains("service `clear-default`") && text.contains("requireAuth"),
        "{text}"
    );
    all += &text;
    let (_, text) = run_psql(ports[12], "", "select 1");
    assert!(
        text.contains("service `plain-default`")
            && text.contains("server does not support TLS")
            && text.contains("sslmode: disable"),
        "{text}"
    );
    all += &text;

    // The client may offer TLS (sslmode=prefer): the broker answers N and goes on.
    let out = psql(
        &format!(
            "host=127.0.0.1 port={} user=anything dbname=app sslmode=prefer",
            ports[0]
        ),
        "select current_user",
    );
    let text = output_text(&out);
    assert!(out.status.success(), "{text}");
    assert_eq!(text.trim(), "app_user");
    all += &text;

    // Startup parameters other than user pass through.
    let (out, text) = run_psql(
        ports[0],
        "application_name=pg_listen_test options='-c search_path=custom_path'",
        "select current_setting('application_name') || ' ' || current_setting('search_path')",
    );
    assert!(out.status.success(), "{text}");
    assert_eq!(text.trim(), "pg_listen_test custom_path");
    all += &text;

    // Many sequential connections (the SCRAM cache makes each one cheap).
    for _ in 0..10 {
        let (out, text) = run_psql(ports[0], "", "select 1");
        assert!(out.status.success(), "{text}");
    }

    let log = b.daemon.log_text();
    assert!(
        log.contains("upstream_tls_error"),
        "access log has the TLS failure:\n{log}"
    );
    assert_no_secret(
        &format!("{all}{log}"),
        &secrets,
        "psql output and broker log",
    );
    let _ = &b.dir;
}

#[test]
fn wrong_password_then_rotation_through_listen_on() {
    if !privileged() {
        return;
    }
    let right = "listen-rot-one-3a5c7e";
    let wrong = "listen-wrong-9f8e7d";
    let rotated = "listen-rot-two-2b4d6f";
    let mut pg = PgServer::start(PgOptions::new(PgAuth::Scram, right));
    let files = tempfile::tempdir().expect("tempdir");
    let f = write_file(files.path(), "pw", wrong);
    let port = free_port();
    let b = start(&service(
        "db",
        port,
        pg.port,
        &f,
        "      sslmode: disable\n",
    ));

    // Wrong password in the store: psql prints the server's 28P01 error.
    let (out, t1) = run_psql(port, "", "select current_user");
    assert!(!out.status.success(), "{t1}");
    assert!(
        t1.contains("password authentication failed for user \"app_user\""),
        "{t1}"
    );

    // The store gets the right value: the cached wrong one is refreshed on rejection.
    std::fs::write(&f, right).expect("fix store");
    let (out, t2) = run_psql(port, "", "select current_user");
    assert!(out.status.success(), "{t2}\n{}", b.daemon.log_text());
    assert_eq!(t2.trim(), "app_user");

    // Rotation: the database password and the store change; no restart.
    pg.set_password(rotated);
    std::fs::write(&f, rotated).expect("rotate store");
    let (out, t3) = run_psql(port, "", "select current_user");
    assert!(out.status.success(), "{t3}\n{}", b.daemon.log_text());
    let (out, t4) = run_psql(port, "", "select current_user");
    assert!(out.status.success(), "{t4}");

    let log = b.daemon.log_text();
    assert!(log.contains("auth_rejected"), "{log}");
    assert_no_secret(
        &format!("{t1}{t2}{t3}{t4}{log}"),
        &[right, wrong, rotated],
        "outputs and broker log",
    );
    let _ = &b.dir;
}

/// Send a StartupMessage by hand and return the (severity, SQLSTATE) of the
/// ErrorResponse that comes back.
fn startup_error_code(port: u16) -> (String, String) {
    use std::io::{Read as _, Write as _};
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).expect("connect");
    s.set_read_timeout(Some(std::time::Duration::from_secs(30)))
        .expect("timeout");
    let mut body = 196_608u32.to_be_bytes().to_vec();
    body.extend_from_slice(b"user\0anything\0database\0app\0\0");
    let mut msg = (body.len() as u32 + 4).to_be_bytes().to_vec();
    msg.extend_from_slice(&body);
    s.write_all(&msg).expect("write startup");
    let mut reply = Vec::new();
    let _ = s.read_to_end(&mut reply);
    assert_eq!(reply.first(), Some(&b'E'), "an ErrorResponse: {reply:?}");
    let mut severity = String::new();
    let mut code = String::new();
    for field in reply[5..].split(|&b| b == 0) {
        match field.split_first() {
            Some((b'V', v)) => severity = String::from_utf8_lossy(v).into_owned(),
            Some((b'C', v)) => code = String::from_utf8_lossy(v).into_owned(),
            _ => {}
        }
    }
    (severity, code)
}

#[test]
fn broker_errors_carry_sqlstates_and_name_the_service() {
    if !privileged() {
        return;
    }
    let files = tempfile::tempdir().expect("tempdir");
    let missing = files.path().join("missing-password");
    let dead = free_port();
    let (p1, p2) = (free_port(), free_port());
    let mut services = String::new();
    // Nothing listens on `dead`.
    let pw = write_file(files.path(), "pw", "unused-pw-5d3c1b");
    services += &service("unreachable", p1, dead, &pw, "      sslmode: disable\n");
    services += &service("no-secret", p2, dead, &missing, "");
    let b = start(&services);

    let (out, text) = run_psql(p1, "", "select 1");
    assert!(!out.status.success());
    assert!(
        text.contains(&format!(
            "service `unreachable`: cannot reach upstream 127.0.0.1:{dead}"
        )),
        "{text}"
    );
    let (out, text) = run_psql(p2, "", "select 1");
    assert!(!out.status.success());
    assert!(
        text.contains("service `no-secret`") && text.contains("credential `password`"),
        "{text}"
    );

    // The SQLSTATEs on the wire.
    assert_eq!(
        startup_error_code(p1),
        ("FATAL".to_owned(), "08006".to_owned())
    );
    assert_eq!(
        startup_error_code(p2),
        ("FATAL".to_owned(), "08004".to_owned())
    );
    // The access line is written once the connection has ended on the daemon's side,
    // which can be a moment after the client read its error.
    let mut log = b.daemon.log_text();
    for _ in 0..100 {
        if log.contains("upstream_unreachable") && log.contains("credentials_error") {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
        log = b.daemon.log_text();
    }
    assert!(log.contains("upstream_unreachable"), "{log}");
    assert!(log.contains("credentials_error"), "{log}");
    assert_no_secret(&log, &["unused-pw-5d3c1b"], "broker log");
    let _ = &b.dir;
}

#[test]
fn cancel_through_listen_on_within_two_seconds() {
    if !privileged() {
        return;
    }
    let Some(python) = python_with_psycopg2() else {
        panic!("python3 with psycopg2 is required (apt-get install python3-psycopg2)");
    };
    let pw = "listen-cancel-pw-7e9a1c";
    let pg = PgServer::start(PgOptions::new(PgAuth::Scram, pw));
    let files = tempfile::tempdir().expect("tempdir");
    let f = write_file(files.path(), "pw", pw);
    let port = free_port();
    let b = start(&service(
        "db",
        port,
        pg.port,
        &f,
        "      sslmode: disable\n",
    ));
    let (code, elapsed, text) = cancel_sleep(&python, &conninfo(port, ""), 1000);
    assert_eq!(
        code,
        "57014",
        "query_canceled expected:\n{text}\n{}",
        b.daemon.log_text()
    );
    assert!(elapsed < 2.0, "cancel took {elapsed:.3}s:\n{text}");
    // A cancel with an unknown key is dropped (and logged), nothing else happens.
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).expect("connect");
    use std::io::{Read as _, Write as _};
    s.write_all(&[0, 0, 0, 16, 0x04, 0xd2, 0x16, 0x2e, 0, 0, 0, 1, 9, 9, 9, 9])
        .expect("write cancel");
    let mut buf = Vec::new();
    let _ = s.read_to_end(&mut buf);
    assert!(buf.is_empty(), "no reply to a cancel");
    // The access line is written just after the socket closes: wait for it (bounded).
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    while !b.daemon.log_text().contains("unknown backend pid 1")
        && std::time::Instant::now() < deadline
    {
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    let log = b.daemon.log_text();
    assert!(log.contains("unknown backend pid 1"), "{log}");
    assert_no_secret(&format!("{text}{log}"), &[pw], "outputs and broker log");
    let _ = &b.dir;
}

/// Over a connection cap, a PostgreSQL client is told so in its own protocol (FATAL
/// 53300, "too many connections", naming the service) instead of being cut off.
#[test]
fn over_the_cap_a_client_gets_too_many_connections() {
    if !privileged() {
        return;
    }
    let files = tempfile::tempdir().expect("tempdir");
    let pw = write_file(files.path(), "pw", "unused-pw-7a1c9e");
    let (p, dead) = (free_port(), free_port());
    let b = start_with(
        "  maxConnections: 2\n  maxConnectionsPerListener: 1\n",
        &service("capped", p, dead, &pw, ""),
    );
    // Hold the listener's one slot: a client that has not sent its startup packet yet.
    let hold = std::net::TcpStream::connect(("127.0.0.1", p)).expect("connect");
    std::thread::sleep(std::time::Duration::from_millis(200));
    let (out, text) = run_psql(p, "", "select 1");
    assert!(!out.status.success());
    assert!(
        text.contains("service `capped`") && text.contains("too many connections"),
        "{text}"
    );
    assert_eq!(
        startup_error_code(p),
        ("FATAL".to_owned(), "53300".to_owned())
    );
    drop(hold);
    assert_no_secret(&b.daemon.log_text(), &["unused-pw-7a1c9e"], "broker log");
}
