//! The `http` provider's mutual TLS, JSON pointers and `Cache-Control`, against
//! `broker run --no-ebpf` and python3's `http.server` over TLS (a private CA made with
//! `openssl`, client certificates required), which sends a `Cache-Control` header of
//! the test's choosing and logs every request path. Every output and the daemon log
//! are grepped for the secret value.

use std::{
    net::SocketAddr,
    path::Path,
    process::{Child, Command, Stdio},
    time::Duration,
};

use broker_tests::{
    Daemon, assert_no_secret, fetch, free_port, net::Upstream, pg::make_certs, privileged,
    wait_port, write_file,
};

const PASSWORD: &str = "store-http-password-8e2c41";

/// An HTTPS file server requiring client certificates from `ca`, answering with
/// `Cache-Control: cache_control`; the paths it served are appended to `log`.
struct HttpsFiles(Child);

impl HttpsFiles {
    fn start(root: &Path, certs: &Path, port: u16, cache_control: &str, log: &Path) -> Self {
        let script = "import http.server, ssl, sys\n\
            root, port, cert, key, ca, cc, log = sys.argv[1:]\n\
            class H(http.server.SimpleHTTPRequestHandler):\n\
            \x20   def __init__(self, *a, **k):\n\
            \x20       super().__init__(*a, directory=root, **k)\n\
            \x20   def end_headers(self):\n\
            \x20       self.send_header('Cache-Control', cc)\n\
            \x20       super().end_headers()\n\
            \x20   def log_message(self, *a):\n\
            \x20       with open(log, 'a') as f:\n\
            \x20           f.write(self.path + '\\n')\n\
            s = http.server.ThreadingHTTPServer(('127.0.0.1', int(port)), H)\n\
            c = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)\n\
            c.load_cert_chain(cert, key)\n\
            c.verify_mode = ssl.CERT_REQUIRED\n\
            c.load_verify_locations(ca)\n\
            s.socket = c.wrap_socket(s.socket, server_side=True)\n\
            s.serve_forever()\n";
        let child = Command::new("python3")
            .arg("-c")
            .arg(script)
            .arg(root)
            .arg(port.to_string())
            .arg(certs.join("server.crt"))
            .arg(certs.join("server.key"))
            .arg(certs.join("ca.crt"))
            .arg(cache_control)
            .arg(log)
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

/// A client certificate and key signed by the CA `make_certs` wrote to `certs`.
fn client_cert(certs: &Path) {
    let run = |c: &mut Command| {
        let out = c.output().expect("spawn openssl");
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    run(Command::new("openssl")
        .args([
            "req",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-subj",
            "/CN=broker-client",
        ])
        .arg("-keyout")
        .arg(certs.join("client.key"))
        .arg("-out")
        .arg(certs.join("client.csr")));
    std::fs::write(
        certs.join("client.ext"),
        "basicConstraints=CA:FALSE\nkeyUsage=critical,digitalSignature\nextendedKeyUsage=clientAuth\n",
    )
    .expect("write ext");
    run(Command::new("openssl")
        .args(["x509", "-req", "-sha256", "-days", "2", "-in"])
        .arg(certs.join("client.csr"))
        .arg("-CA")
        .arg(certs.join("ca.crt"))
        .arg("-CAkey")
        .arg(certs.join("ca.key"))
        .arg("-CAcreateserial")
        .arg("-extfile")
        .arg(certs.join("client.ext"))
        .arg("-out")
        .arg(certs.join("client.crt")));
}

fn served(log: &Path) -> usize {
    std::fs::read_to_string(log)
        .unwrap_or_default()
        .lines()
        .filter(|l| l.starts_with("/secrets/db.json"))
        .count()
}

/// Both values come from one JSON document by JSON pointer, over mutual TLS. With
/// `Cache-Control: max-age=1` (and `cacheTTL: 60s`) they are fetched again after a
/// second; with `no-store`, at every connection; without the client certificate the
/// store refuses the handshake and the connection gets no session.
#[test]
fn mutual_tls_json_pointers_and_cache_control() {
    if !privileged() {
        return;
    }
    let web = Upstream::start("127.0.0.1", "web");
    let dir = tempfile::tempdir().expect("tempdir");
    let certs = dir.path().join("certs");
    let files = dir.path().join("files");
    std::fs::create_dir_all(&certs).expect("mkdir");
    std::fs::create_dir_all(files.join("secrets")).expect("mkdir");
    let ca = make_certs(&certs);
    client_cert(&certs);
    std::fs::write(
        files.join("secrets/db.json"),
        serde_json::json!({"data": {"password": PASSWORD, "port": web.addr.port()}}).to_string(),
    )
    .expect("write");
    let (port_max_age, port_no_store) = (free_port(), free_port());
    let (log_max_age, log_no_store) = (
        dir.path().join("max-age.log"),
        dir.path().join("no-store.log"),
    );
    let _a = HttpsFiles::start(&files, &certs, port_max_age, "max-age=1", &log_max_age);
    let _b = HttpsFiles::start(&files, &certs, port_no_store, "no-store", &log_no_store);
    let (p_max_age, p_no_store, p_no_cert) = (free_port(), free_port(), free_port());
    let health = free_port();
    let service = |name: &str, port: u16, provider: &str| {
        format!(
            "  {name}:\n    connector: tcp\n    listenOn: tcp://127.0.0.1:{port}\n    credentials:\n      host: 127.0.0.1\n      port: {{from: {provider}, get: \"db.json#/data/port\"}}\n      password: {{from: {provider}, get: \"db.json#/data/password\"}}\n"
        )
    };
    let tls = format!(
        "caFile: {}, certFile: {}, keyFile: {}",
        ca.display(),
        certs.join("client.crt").display(),
        certs.join("client.key").display()
    );
    let cfg = write_file(
        dir.path(),
        "broker.yaml",
        &format!(
            "version: 2\nproviders:\n  maxage: {{type: http, baseUrl: \"https://localhost:{port_max_age}/secrets/\", {tls}}}\n  nostore: {{type: http, baseUrl: \"https://localhost:{port_no_store}/secrets/\", {tls}}}\n  nocert: {{type: http, baseUrl: \"https://localhost:{port_max_age}/secrets/\", caFile: {}}}\nbroker:\n  health: 127.0.0.1:{health}\n  cacheTTL: 60s\nservices:\n{}{}{}",
            ca.display(),
            service("max-age", p_max_age, "maxage"),
            service("no-store", p_no_store, "nostore"),
            service("no-cert", p_no_cert, "nocert"),
        ),
    );
    let health: SocketAddr = format!("127.0.0.1:{health}").parse().expect("addr");
    let mut d = Daemon::start(&cfg, &["--no-ebpf"], health, &dir.path().join("broker.log"));
    let mut out = String::new();
    for _ in 0..2 {
        let body = fetch(p_max_age);
        assert_eq!(body, "hello from web", "{}", d.log_text());
        out += &body;
    }
    assert_eq!(
        served(&log_max_age),
        2,
        "port and password, kept for max-age"
    );
    std::thread::sleep(Duration::from_millis(1300));
    out += &fetch(p_max_age);
    assert_eq!(served(&log_max_age), 4, "fetched again after max-age");
    for _ in 0..2 {
        out += &fetch(p_no_store);
    }
    assert_eq!(
        served(&log_no_store),
        4,
        "no-store: fetched at every connection"
    );
    let refused = fetch(p_no_cert);
    assert_eq!(refused, "", "no session without the client certificate");
    assert_eq!(web.hits(), 5);
    assert!(d.stop().success());
    let log = d.log_text();
    let no_cert: String = log
        .lines()
        .filter(|l| l.contains("access") && l.contains("service=no-cert "))
        .collect();
    assert!(
        no_cert.contains("credentials_error") && no_cert.contains("nocert: fetching `db.json#/"),
        "{log}"
    );
    assert_no_secret(
        &format!("{out}{refused}{log}"),
        &[PASSWORD],
        "client output and broker log",
    );
}
