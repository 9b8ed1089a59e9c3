//! Secretless' forward-proxy mode: several HTTP services share one `listenOn` address;
//! the app sets `http_proxy` (here `curl -x`) and each request goes to the service whose
//! `authenticateURLsMatching` matches its URL, with that service's credentials. A
//! request no service takes is forwarded without credentials (as Secretless does).
//! `CONNECT` (`https_proxy`) is served: a tunnel to an origin some service may take is
//! decrypted with the broker's CA and its requests authenticated; any other tunnel is
//! relayed byte for byte (the client sees the real server's certificate). The reverse-proxy
//! form (`upstream:`) with its failures: 504 on timeout, 502 refused or hostile. Real test
//! servers ([`broker_tests::http_server`]), real `curl`, `broker run --no-ebpf`.

use std::process::{Command, Stdio};

use broker_tests::{
    Daemon, assert_no_secret, broker_check, free_port, http_server::HttpServer, output_text,
    write_file,
};

const TOKEN_A: &str = "alpha-token-8d2f61c0";
const PASSWORD_B: &str = "beta-pass-5e07b9a4";
const TOKEN_C: &str = "gamma-key-a41c93d7";

/// `curl -sS -x http://127.0.0.1:{proxy} <args>`, no proxy variables from the test's
/// environment.
fn curl(proxy: u16, args: &[&str]) -> (bool, String) {
    let out = Command::new("curl")
        .args(["-sS", "--max-time", "20", "-x"])
        .arg(format!("http://127.0.0.1:{proxy}"))
        .args(args)
        .env_remove("NO_PROXY")
        .env_remove("no_proxy")
        .env_remove("http_proxy")
        .env_remove("https_proxy")
        .stdin(Stdio::null())
        .output()
        .expect("run curl");
    (out.status.success(), output_text(&out))
}

#[test]
fn services_sharing_listen_on_are_routed_by_url_and_connect_is_served() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (pa, pb, pc, pd) = (free_port(), free_port(), free_port(), free_port());
    let a = HttpServer::start("127.0.0.5", pa);
    let b = HttpServer::start("127.0.0.6", pb);
    for sub in ["c", "d"] {
        std::fs::create_dir_all(dir.path().join(sub)).expect("mkdir");
    }
    let c = HttpServer::start_tls("127.0.0.7", pc, "127.0.0.7", &dir.path().join("c"));
    let d = HttpServer::start_tls("127.0.0.8", pd, "127.0.0.8", &dir.path().join("d"));
    let tok_a = write_file(dir.path(), "token-a", TOKEN_A);
    let pw_b = write_file(dir.path(), "password-b", PASSWORD_B);
    let tok_c = write_file(dir.path(), "token-c", TOKEN_C);
    let proxy = free_port();
    let health = free_port();
    let ca_dir = dir.path().join("ca");
    let cfg = write_file(
        dir.path(),
        "broker.yaml",
        &format!(
            r#"version: 2
broker:
  health: 127.0.0.1:{health}
  caDir: {ca}
services:
  alpha:
    connector: generic_http
    listenOn: tcp://127.0.0.1:{proxy}
    credentials:
      token: {{from: file, get: {tok_a}}}
    config:
      authenticateURLsMatching: ["^http://127\\.0\\.0\\.5:{pa}/api/"]
      headers:
        Authorization: "Bearer {{{{ .token }}}}"
  beta:
    connector: basic_auth
    listenOn: tcp://127.0.0.1:{proxy}
    credentials:
      username: svc-beta
      password: {{from: file, get: {pw_b}}}
    config:
      authenticateURLsMatching: "^https?://127\\.0\\.0\\.6"
  gamma:
    connector: generic_http
    listenOn: tcp://127.0.0.1:{proxy}
    credentials:
      token: {{from: file, get: {tok_c}}}
    config:
      authenticateURLsMatching: ["^https://127\\.0\\.0\\.7:{pc}/api/"]
      caFile: {c_ca}
      headers:
        X-Api-Key: "{{{{ .token }}}}"
"#,
            ca = ca_dir.display(),
            tok_a = tok_a.display(),
            pw_b = pw_b.display(),
            tok_c = tok_c.display(),
            c_ca = c.ca_cert.as_ref().expect("CA").display(),
        ),
    );
    let check = broker_check(&cfg, &[]);
    assert!(check.status.success(), "{}", output_text(&check));
    let log = dir.path().join("broker.log");
    let mut daemon = Daemon::start(
        &cfg,
        &["--no-ebpf", "--log-format", "json"],
        format!("127.0.0.1:{health}").parse().expect("health"),
        &log,
    );
    let broker_ca = ca_dir.join("ca.crt");
    let mut outputs = String::new();
    let mut run = |args: &[&str]| {
        let (ok, out) = curl(proxy, args);
        outputs.push_str(&out);
        assert!(ok, "curl {args:?}: {out}");
        out
    };

    // Plain HTTP, absolute URLs: each routed to its service, or to none.
    run(&[
        "-H",
        "Authorization: Bearer dummy",
        &format!("http://127.0.0.5:{pa}/api/one"),
        &format!("http://127.0.0.5:{pa}/api/two"),
    ]);
    run(&[&format!("http://127.0.0.5:{pa}/public")]);
    run(&[
        "-H",
        "Authorization: Basic ZHVtbXk6ZHVtbXk=",
        &format!("http://127.0.0.6:{pb}/b"),
    ]);
    // HTTPS through CONNECT: decrypted (gamma may take the origin), trusted through the
    // broker's CA only.
    run(&[
        "--cacert",
        broker_ca.to_str().expect("path"),
        &format!("https://127.0.0.7:{pc}/api/c"),
    ]);
    // A tunnel no service may take: relayed, the real server's certificate.
    let d_ca = d.ca_cert.as_ref().expect("CA");
    run(&[
        "--cacert",
        d_ca.to_str().expect("path"),
        &format!("https://127.0.0.8:{pd}/d"),
    ]);
    // The same tunnel checked against the broker's CA fails: it was not decrypted.
    let (ok, out) = curl(
        proxy,
        &[
            "--cacert",
            broker_ca.to_str().expect("path"),
            &format!("https://127.0.0.8:{pd}/d2"),
        ],
    );
    assert!(
        !ok,
        "a blind tunnel must show the server's own certificate: {out}"
    );
    // Not a proxy request: a JSON error.
    let out = Command::new("curl")
        .args(["-sS", "--max-time", "10"])
        .arg(format!("http://127.0.0.1:{proxy}/relative"))
        .output()
        .expect("curl");
    let text = output_text(&out);
    assert!(text.contains("forward proxy"), "{text}");

    let sa = a.seen();
    for p in ["/api/one", "/api/two"] {
        let s = sa
            .iter()
            .find(|s| s.target == p)
            .unwrap_or_else(|| panic!("{p}: {sa:?}"));
        assert_eq!(
            s.header("authorization"),
            vec![format!("Bearer {TOKEN_A}")],
            "{p}"
        );
        assert_eq!(s.header("host"), vec![format!("127.0.0.5:{pa}")]);
    }
    let public = sa.iter().find(|s| s.target == "/public").expect("/public");
    assert!(public.header("authorization").is_empty(), "{public:?}");
    let sb = b.seen();
    let basic = format!(
        "Basic {}",
        base64_encode(format!("svc-beta:{PASSWORD_B}").as_bytes())
    );
    assert_eq!(sb[0].header("authorization"), vec![basic.as_str()]);
    let sc = c.seen();
    assert_eq!(sc[0].target, "/api/c");
    assert_eq!(sc[0].header("x-api-key"), vec![TOKEN_C]);
    let sd = d.seen();
    assert_eq!(sd.len(), 1, "only /d reached D: {sd:?}");
    assert!(sd[0].header("x-api-key").is_empty() && sd[0].header("authorization").is_empty());

    daemon.stop();
    let log_text = daemon.log_text();
    for (svc, path) in [("alpha", "/api/one"), ("beta", "/b"), ("gamma", "/api/c")] {
        assert!(
            log_text
                .lines()
                .any(|l| l.contains(&format!("\"service\":\"{svc}\""))
                    && l.contains(&format!("\"http.path\":\"{path}\""))
                    && l.contains("\"authenticated\":true")),
            "request line of {svc} {path}:\n{log_text}"
        );
    }
    assert_no_secret(&outputs, &[TOKEN_A, PASSWORD_B, TOKEN_C], "curl output");
    assert_no_secret(&log_text, &[TOKEN_A, PASSWORD_B, TOKEN_C], "broker log");
}

#[test]
fn sharing_a_listen_on_is_checked() {
    let dir = tempfile::tempdir().expect("tempdir");
    let port = free_port();
    let http = |name: &str, extra: &str| {
        format!(
            "  {name}:\n    connector: generic_http\n    listenOn: tcp://127.0.0.1:{port}\n    credentials:\n      token: t\n    config:\n      headers:\n        X-Key: \"{{{{ .token }}}}\"\n{extra}"
        )
    };
    let cases = [
        (
            http("a", "      authenticateURLsMatching: ^http://a/\n") + &http("b", ""),
            "services.b",
            "authenticateURLsMatching: required",
        ),
        (
            http("a", "      authenticateURLsMatching: ^http://a/\n")
                + &http(
                    "b",
                    "      authenticateURLsMatching: ^http://b/\n      upstream: http://127.0.0.1:1\n",
                ),
            "services.b.config.upstream",
            "forward proxies",
        ),
        (
            http("a", "      authenticateURLsMatching: ^http://a/\n")
                + &format!(
                    "  db:\n    connector: pg\n    listenOn: tcp://127.0.0.1:{port}\n    credentials:\n      host: 127.0.0.1\n      username: u\n      password: p\n"
                ),
            "services.db.listenOn",
            "only HTTP services may share",
        ),
    ];
    for (i, (services, at, what)) in cases.iter().enumerate() {
        let cfg = write_file(
            dir.path(),
            &format!("c{i}.yaml"),
            &format!("version: 2\nservices:\n{services}"),
        );
        let out = broker_check(&cfg, &[]);
        let text = output_text(&out);
        assert!(!out.status.success(), "case {i} passed check:\n{text}");
        assert!(text.contains(at) && text.contains(what), "case {i}: {text}");
    }
}

fn base64_encode(b: &[u8]) -> String {
    use base64::Engine as _;
    base64::engine::general_purpose::STANDARD.encode(b)
}

/// The user's own manifest's way: the app's API base URL is the broker's `listenOn`
/// (`NOVU_API_ENDPOINT=http://127.0.0.1:8081`); the broker forwards each request to
/// the service's `upstream` with the upstream's own `Host`, the base path prepended.
/// An upstream that never answers gives 504 with JSON within `timeout`; one that
/// refuses connections, or answers with an endless header, gives 502; the broker keeps
/// serving.
#[test]
fn reverse_proxy_upstream_timeout_refusal_and_hostile_upstream() {
    use std::io::{Read as _, Write as _};
    let dir = tempfile::tempdir().expect("tempdir");
    let up_port = free_port();
    let up = HttpServer::start("127.0.0.9", up_port);
    // Accepts, reads, never answers.
    let silent = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let silent_port = silent.local_addr().expect("addr").port();
    let _silent_thread = std::thread::spawn(move || {
        let mut held = Vec::new();
        for s in silent.incoming().take(4).flatten() {
            held.push(s);
        }
        std::thread::sleep(std::time::Duration::from_secs(30));
    });
    // Answers with a header that never ends.
    let hostile = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let hostile_port = hostile.local_addr().expect("addr").port();
    let _hostile_thread = std::thread::spawn(move || {
        if let Some(Ok(mut s)) = hostile.incoming().next() {
            let mut buf = [0u8; 4096];
            let _ = s.read(&mut buf);
            let _ = s.write_all(b"HTTP/1.1 200 OK\r\nX-Long: ");
            let chunk = vec![b'a'; 64 * 1024];
            for _ in 0..(8 * 16) {
                if s.write_all(&chunk).is_err() {
                    break;
                }
            }
        }
    });
    let refused_port = free_port();
    let tok = write_file(dir.path(), "token", TOKEN_A);
    let (p1, p2, p3, p4) = (free_port(), free_port(), free_port(), free_port());
    let health = free_port();
    let svc = |name: &str, port: u16, upstream: &str| {
        format!(
            "  {name}:\n    connector: http\n    listenOn: tcp://127.0.0.1:{port}\n    credentials:\n      api_key: {{from: file, get: {}}}\n    config:\n      upstream: {upstream}\n      timeout: 2s\n      headers:\n        Authorization: \"ApiKey {{{{ .api_key }}}}\"\n",
            tok.display()
        )
    };
    let cfg = write_file(
        dir.path(),
        "broker.yaml",
        &format!(
            "version: 2\nbroker:\n  health: 127.0.0.1:{health}\n  caDir: {}\nservices:\n{}{}{}{}",
            dir.path().join("ca").display(),
            svc("novu", p1, &format!("http://127.0.0.9:{up_port}/v1")),
            svc("silent", p2, &format!("http://127.0.0.1:{silent_port}")),
            svc("refused", p3, &format!("http://127.0.0.1:{refused_port}")),
            svc("hostile", p4, &format!("http://127.0.0.1:{hostile_port}")),
        ),
    );
    let mut daemon = Daemon::start(
        &cfg,
        &["--no-ebpf"],
        format!("127.0.0.1:{health}").parse().expect("health"),
        &dir.path().join("broker.log"),
    );
    let get = |port: u16, path: &str| -> (String, String) {
        let out = Command::new("curl")
            .args(["-sS", "--max-time", "20", "-w", "\nSTATUS=%{http_code}"])
            .arg(format!("http://127.0.0.1:{port}{path}"))
            .env_remove("http_proxy")
            .output()
            .expect("curl");
        let text = output_text(&out);
        let status = text
            .lines()
            .find_map(|l| l.strip_prefix("STATUS="))
            .unwrap_or_default()
            .to_owned();
        (status, text)
    };
    let (status, out) = get(p1, "/notifications?x=1");
    assert_eq!(status, "200", "{out}");
    let seen = up.seen();
    assert_eq!(seen[0].target, "/v1/notifications?x=1");
    assert_eq!(seen[0].header("host"), vec![format!("127.0.0.9:{up_port}")]);
    assert_eq!(
        seen[0].header("authorization"),
        vec![format!("ApiKey {TOKEN_A}")]
    );

    let t = std::time::Instant::now();
    let (status, out) = get(p2, "/slow");
    assert_eq!(status, "504", "{out}");
    assert!(out.contains("\"service\":\"silent\""), "{out}");
    assert!(
        t.elapsed() < std::time::Duration::from_secs(10),
        "{:?}",
        t.elapsed()
    );
    let (status, out) = get(p3, "/x");
    assert_eq!(status, "502", "{out}");
    assert!(out.contains("\"error\""), "{out}");
    let (status, out) = get(p4, "/x");
    assert_eq!(status, "502", "{out}");
    // Still serving.
    let (status, out) = get(p1, "/again");
    assert_eq!(status, "200", "{out}");
    daemon.stop();
    assert_no_secret(&daemon.log_text(), &[TOKEN_A], "broker log");
}

/// Secretless' `oauth1:` block: each request signed with OAuth 1.0a HMAC-SHA1 (query and
/// form-body parameters included), verified by a real implementation (Python
/// `oauthlib`'s `verify_hmac_sha1`) from what the server received.
#[test]
fn oauth1_signatures_verify_with_oauthlib() {
    const CONSUMER_SECRET: &str = "consumer-secret-0b7e2c";
    const TOKEN_SECRET: &str = "token-secret-94d1aa";
    let dir = tempfile::tempdir().expect("tempdir");
    let up_port = free_port();
    let up = HttpServer::start("127.0.0.10", up_port);
    let cs = write_file(dir.path(), "cs", CONSUMER_SECRET);
    let ts = write_file(dir.path(), "ts", TOKEN_SECRET);
    let (port, health) = (free_port(), free_port());
    let cfg = write_file(
        dir.path(),
        "broker.yaml",
        &format!(
            "version: 2\nbroker:\n  health: 127.0.0.1:{health}\n  caDir: {ca}\nservices:\n  twitter:\n    connector: generic_http\n    listenOn: tcp://127.0.0.1:{port}\n    credentials:\n      consumer_key: xvz1evFS4wEEPTGEFPHBog\n      consumer_secret: {{from: file, get: {cs}}}\n      token: 370773112-GmHxMAgYyLbNEtIKZeRNFsMKPR9EyMZeS9weJAEb\n      token_secret: {{from: file, get: {ts}}}\n    config:\n      upstream: http://127.0.0.10:{up_port}\n      oauth1:\n        consumer_key: \"{{{{ .consumer_key }}}}\"\n        consumer_secret: \"{{{{ .consumer_secret }}}}\"\n        token: \"{{{{ .token }}}}\"\n        token_secret: \"{{{{ .token_secret }}}}\"\n",
            ca = dir.path().join("ca").display(),
            cs = cs.display(),
            ts = ts.display(),
        ),
    );
    let mut daemon = Daemon::start(
        &cfg,
        &["--no-ebpf"],
        format!("127.0.0.1:{health}").parse().expect("health"),
        &dir.path().join("broker.log"),
    );
    let form = "status=Hello+Ladies+%2b+Gentlemen%2c+a+signed+OAuth+request%21&x=%E2%9C%93";
    let base = format!("http://127.0.0.1:{port}");
    for args in [
        vec![
            "-d".to_owned(),
            form.to_owned(),
            format!("{base}/1.1/statuses/update.json?include_entities=true"),
        ],
        vec![format!("{base}/1.1/search.json?q=a%20b&q=c&count=2")],
    ] {
        let out = Command::new("curl")
            .args(["-sS", "--fail", "--max-time", "10"])
            .args(&args)
            .output()
            .expect("curl");
        assert!(out.status.success(), "{}", output_text(&out));
    }
    daemon.stop();
    let seen = up.seen();
    assert_eq!(seen.len(), 2, "{seen:?}");
    let verify = r#"
import sys
from urllib.parse import urlparse
from oauthlib.oauth1.rfc5849 import signature, utils
uri, method, auth, body, cs, ts = sys.argv[1:7]
params = signature.collect_parameters(
    uri_query=urlparse(uri).query, body=body or None, headers={"Authorization": auth})
base = signature.signature_base_string(
    method, signature.base_string_uri(uri), signature.normalize_parameters(params))
want = signature.sign_hmac_sha1(base, cs, ts)
got = utils.unescape(dict(utils.parse_authorization_header(auth))["oauth_signature"])
print("VERIFIED" if signature.safe_string_equals(want, got) else "MISMATCH " + base)
"#;
    for (s, body) in seen.iter().zip([form, ""]) {
        let auth = s.header("authorization");
        assert_eq!(auth.len(), 1, "{s:?}");
        assert!(auth[0].starts_with("OAuth oauth_consumer_key=\"xvz1evFS4wEEPTGEFPHBog\""));
        let uri = format!("http://127.0.0.10:{up_port}{}", s.target);
        let out = Command::new("/usr/bin/python3")
            .args([
                "-c",
                verify,
                &uri,
                &s.method,
                auth[0],
                body,
                CONSUMER_SECRET,
                TOKEN_SECRET,
            ])
            .output()
            .expect("python3");
        let text = output_text(&out);
        assert!(
            text.contains("VERIFIED"),
            "{uri} {} {}: {text}",
            s.method,
            auth[0]
        );
    }
    let log = daemon.log_text();
    assert_no_secret(&log, &[CONSUMER_SECRET, TOKEN_SECRET], "broker log");
    for s in &seen {
        let all: String = s.headers.iter().map(|(_, v)| v.as_str()).collect();
        assert_no_secret(&all, &[CONSUMER_SECRET, TOKEN_SECRET], "request headers");
    }
}
