//! Fetching secrets, against `broker run --no-ebpf` and a real local HTTP secret server:
//! concurrent first connections share one fetch per secret (single-flight), and a
//! secret the store does not have is a `credentials_error` naming it. Every output and
//! the daemon log are grepped for the secret values.

use std::{
    io::{Read as _, Write as _},
    net::{SocketAddr, TcpStream},
    sync::{Arc, Barrier},
    time::Duration,
};

use broker_tests::{
    Daemon, assert_no_secret, free_port, net::Upstream, privileged, secret_server::SecretServer,
    write_file,
};

const TOKEN: &str = "secrets-test-bearer-7c41e9";
const PASSWORD: &str = "secrets-test-password-2b9f5d";

/// GET / through a listener on 127.0.0.1:`port`; the reply's body, or "" when the
/// connection was closed without one.
fn fetch(port: u16) -> String {
    let addr: SocketAddr = format!("127.0.0.1:{port}").parse().expect("addr");
    let Ok(mut s) = TcpStream::connect_timeout(&addr, Duration::from_secs(5)) else {
        return String::new();
    };
    s.set_read_timeout(Some(Duration::from_secs(20)))
        .expect("timeout");
    let _ = s.write_all(b"GET / HTTP/1.0\r\n\r\n");
    let mut out = Vec::new();
    let _ = s.read_to_end(&mut out);
    let text = String::from_utf8_lossy(&out).into_owned();
    text.split("\r\n\r\n").nth(1).unwrap_or("").to_owned()
}

/// `broker run --no-ebpf` with an `http` provider `uts` on `store` and `services`.
fn start(dir: &std::path::Path, store: &SecretServer, services: &str) -> Daemon {
    let health = free_port();
    let cfg = write_file(
        dir,
        "broker.yaml",
        &format!(
            "version: 2\nproviders:\n  uts: {{type: http, baseUrl: \"{}\", token: \"${{UTS_TOKEN}}\"}}\nbroker:\n  health: 127.0.0.1:{health}\nservices:\n{services}",
            store.base_url()
        ),
    );
    Daemon::start_with_env(
        &cfg,
        &["--no-ebpf"],
        &[("UTS_TOKEN", TOKEN)],
        format!("127.0.0.1:{health}").parse().expect("addr"),
        &dir.join("broker.log"),
    )
}

/// The access-log lines of `service`.
fn access_lines(log: &str, service: &str) -> Vec<String> {
    log.lines()
        .filter(|l| l.contains("access") && l.contains(&format!("service={service} ")))
        .map(str::to_owned)
        .collect()
}

/// 50 connections at once to a `tcp` service whose `password` and `port` come from the
/// secret server, which answers slowly (300 ms) so they all wait for the first fetch:
/// the server sees exactly one request per secret, and every connection is served.
#[test]
fn concurrent_first_connections_share_one_fetch() {
    if !privileged() {
        return;
    }
    const CONNS: usize = 50;
    let store = SecretServer::start(TOKEN);
    let web = Upstream::start("127.0.0.1", "web");
    store.set("db/password", PASSWORD);
    store.set("db/port", &web.addr.port().to_string());
    store.set_delay(Duration::from_millis(300));
    let dir = tempfile::tempdir().expect("tempdir");
    let port = free_port();
    let mut d = start(
        dir.path(),
        &store,
        &format!(
            "  web:\n    connector: tcp\n    listenOn: tcp://127.0.0.1:{port}\n    credentials:\n      host: 127.0.0.1\n      port: {{from: uts, get: db/port}}\n      password: {{from: uts, get: db/password}}\n"
        ),
    );
    assert_eq!(store.requests(), 0, "nothing fetched before a connection");

    let barrier = Arc::new(Barrier::new(CONNS));
    let clients: Vec<_> = (0..CONNS)
        .map(|_| {
            let barrier = Arc::clone(&barrier);
            std::thread::spawn(move || {
                barrier.wait();
                fetch(port)
            })
        })
        .collect();
    let bodies: Vec<String> = clients
        .into_iter()
        .map(|c| c.join().expect("client thread"))
        .collect();
    let served = bodies.iter().filter(|b| *b == "hello from web").count();
    assert_eq!(served, CONNS, "every connection served: {bodies:?}");
    assert_eq!(web.hits(), CONNS);
    assert_eq!(
        store.requests_for("db/password"),
        1,
        "one fetch of the password"
    );
    assert_eq!(store.requests_for("db/port"), 1, "one fetch of the port");
    assert_eq!(store.requests(), 2);

    assert!(d.stop().success());
    let log = d.log_text();
    let lines = access_lines(&log, "web");
    assert_eq!(lines.len(), CONNS, "one access line per connection:\n{log}");
    assert!(
        lines.iter().all(|l| l.contains("result=\"ok\"")
            && l.contains("password<-uts:db/password")
            && l.contains("port<-uts:db/port")),
        "{log}"
    );
    assert_no_secret(
        &format!("{}{log}", bodies.concat()),
        &[PASSWORD, TOKEN],
        "client output and broker log",
    );
}

/// A secret the store does not have (404): the connection is closed without a session,
/// the access line says `credentials_error` and names the credential and the id; the
/// failure is not cached (a second connection asks the store again). A service whose
/// secret exists is served meanwhile.
#[test]
fn a_missing_secret_is_a_credentials_error_naming_it() {
    if !privileged() {
        return;
    }
    let store = SecretServer::start(TOKEN);
    let web = Upstream::start("127.0.0.1", "web");
    store.set("db/password", PASSWORD);
    let dir = tempfile::tempdir().expect("tempdir");
    let (p_gone, p_ok) = (free_port(), free_port());
    let service = |name: &str, port: u16, id: &str| {
        format!(
            "  {name}:\n    connector: tcp\n    listenOn: tcp://127.0.0.1:{port}\n    credentials:\n      host: 127.0.0.1\n      port: \"{}\"\n      password: {{from: uts, get: {id}}}\n",
            web.addr.port()
        )
    };
    let mut d = start(
        dir.path(),
        &store,
        &(service("gone", p_gone, "db/gone") + &service("ok", p_ok, "db/password")),
    );
    let mut all = String::new();
    for _ in 0..2 {
        let body = fetch(p_gone);
        assert_eq!(body, "", "no session without the credential");
        all += &body;
    }
    let body = fetch(p_ok);
    assert_eq!(body, "hello from web", "canary");
    all += &body;
    assert_eq!(store.requests_for("db/gone"), 2, "a failure is not cached");
    assert_eq!(web.hits(), 1);

    assert!(d.stop().success());
    let log = d.log_text();
    let gone = access_lines(&log, "gone");
    assert_eq!(gone.len(), 2, "{log}");
    for l in &gone {
        assert!(
            l.contains("credentials_error")
                && l.contains("credential `password`")
                && l.contains("uts: `db/gone` not found"),
            "{l}"
        );
    }
    assert_no_secret(
        &format!("{all}{log}"),
        &[PASSWORD, TOKEN],
        "client output and broker log",
    );
}
