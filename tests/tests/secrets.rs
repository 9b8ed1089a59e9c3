//! Fetching secrets, against `broker run --no-ebpf` and a real local HTTP secret server:
//! concurrent first connections share one fetch per secret (single-flight), a secret
//! the store does not have is a `credentials_error` naming it, and an HTTPS store is
//! trusted through `caFile` (and not without it). Every output and the daemon log are
//! grepped for the secret values.

use std::{
    process::{Child, Command, Stdio},
    sync::{Arc, Barrier},
    time::Duration,
};

use broker_tests::{
    Daemon, assert_no_secret, fetch, free_port, net::Upstream, pg::make_certs, privileged,
    secret_server::SecretServer, wait_port, write_file,
};

const TOKEN: &str = "secrets-test-bearer-7c41e9";
const PASSWORD: &str = "secrets-test-password-2b9f5d";

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

/// An HTTPS static file server (python3 `http.server` with `ssl`) on 127.0.0.1:`port`
/// serving `root`, with the certificate `make_certs` wrote to `certs`. Killed on drop.
struct HttpsFiles(Child);

impl HttpsFiles {
    fn start(root: &std::path::Path, certs: &std::path::Path, port: u16) -> Self {
        let script = "import http.server, ssl, sys\n\
            h = lambda *a, **k: http.server.SimpleHTTPRequestHandler(*a, directory=sys.argv[1], **k)\n\
            s = http.server.HTTPServer(('127.0.0.1', int(sys.argv[2])), h)\n\
            c = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)\n\
            c.load_cert_chain(sys.argv[3], sys.argv[4])\n\
            s.socket = c.wrap_socket(s.socket, server_side=True)\n\
            s.serve_forever()\n";
        let child = Command::new("python3")
            .arg("-c")
            .arg(script)
            .arg(root)
            .arg(port.to_string())
            .arg(certs.join("server.crt"))
            .arg(certs.join("server.key"))
            // Its request log.
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn python3 https server");
        wait_port(
            format!("127.0.0.1:{port}").parse().expect("addr"),
            Duration::from_secs(10),
        );
        Self(child)
    }
}

impl Drop for HttpsFiles {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// An `https://` secret store with a private CA: trusted with `caFile` (the connection
/// is served with the fetched port), refused without it (the system roots do not
/// know the CA): a `credentials_error`, and nothing of the value in the log.
#[test]
fn an_https_store_is_trusted_through_ca_file_only() {
    if !privileged() {
        return;
    }
    let web = Upstream::start("127.0.0.1", "web");
    let dir = tempfile::tempdir().expect("tempdir");
    let certs = dir.path().join("certs");
    let files = dir.path().join("files");
    std::fs::create_dir_all(&certs).expect("mkdir");
    std::fs::create_dir_all(files.join("secrets/db")).expect("mkdir");
    let ca = make_certs(&certs);
    std::fs::write(files.join("secrets/db/password"), format!("{PASSWORD}\n")).expect("write");
    std::fs::write(files.join("secrets/db/port"), web.addr.port().to_string()).expect("write");
    let https_port = free_port();
    let _server = HttpsFiles::start(&files, &certs, https_port);
    let (p_ca, p_no_ca) = (free_port(), free_port());
    let health = free_port();
    let service = |name: &str, port: u16, provider: &str| {
        format!(
            "  {name}:\n    connector: tcp\n    listenOn: tcp://127.0.0.1:{port}\n    credentials:\n      host: 127.0.0.1\n      port: {{from: {provider}, get: db/port}}\n      password: {{from: {provider}, get: db/password}}\n"
        )
    };
    let base = format!("https://localhost:{https_port}/secrets/");
    let cfg = write_file(
        dir.path(),
        "broker.yaml",
        &format!(
            "version: 2\nproviders:\n  private: {{type: http, baseUrl: \"{base}\", caFile: {}}}\n  public: {{type: http, baseUrl: \"{base}\"}}\nbroker:\n  health: 127.0.0.1:{health}\nservices:\n{}{}",
            ca.display(),
            service("with-ca", p_ca, "private"),
            service("without-ca", p_no_ca, "public"),
        ),
    );
    let mut d = Daemon::start(
        &cfg,
        &["--no-ebpf"],
        format!("127.0.0.1:{health}").parse().expect("addr"),
        &dir.path().join("broker.log"),
    );
    let ok = fetch(p_ca);
    assert_eq!(ok, "hello from web", "served through the https store");
    let refused = fetch(p_no_ca);
    assert_eq!(refused, "", "no session without a trusted store");
    assert_eq!(web.hits(), 1);
    assert!(d.stop().success());
    let log = d.log_text();
    let line = access_lines(&log, "without-ca").concat();
    assert!(
        line.contains("credentials_error") && line.contains("public: fetching `db/"),
        "{log}"
    );
    assert!(
        access_lines(&log, "with-ca")
            .concat()
            .contains("result=\"ok\""),
        "{log}"
    );
    assert_no_secret(
        &format!("{ok}{refused}{log}"),
        &[PASSWORD],
        "client output and broker log",
    );
}
