//! HTTP and HTTPS through eBPF interception, with a real test server
//! ([`broker_tests::http_server`]) and real clients (`curl`, Python `urllib`) under
//! `broker exec`: the injected header on each of 100 keep-alive requests, a 50 MB chunked
//! upload intact, query-parameter injection, the client's dummy `Authorization` replaced;
//! HTTPS terminated with the broker's CA (trusted by the client only through
//! `--cacert`/`SSL_CERT_FILE`), a server name no service configures passed through
//! untouched (the real server's certificate); a token endpoint down gives 502 JSON;
//! OAuth2 client credentials (one token fetch for 200 concurrent requests, a 401 causing
//! one refetch and a retry); a WebSocket upgrade carrying the injected header, then echoed,
//! over plain HTTP and over HTTPS terminated by the broker; `aws`: requests re-signed and
//! checked by botocore, a chunked body over the signing buffer's bound refused with 413
//! while the broker keeps serving.
//! Every output, response body and log is grepped for the secrets.

use std::{
    path::Path,
    process::{Command, Stdio},
    time::Instant,
};

use broker_tests::{
    assert_no_secret, broker_exec, free_port, http_server::HttpServer, output_text, privileged,
    write_file,
};

const TOKEN: &str = "api-token-3f9c1e7a5b2d";

/// Run `sh -c script` under `broker exec` with the given names mapped.
fn exec_sh(dir: &Path, cfg: &Path, names: &[(&str, &str)], script: &str) -> (bool, String) {
    let out = broker_exec(dir, names, &[], cfg, &["sh", "-c", script])
        .env_remove("http_proxy")
        .env_remove("https_proxy")
        .env_remove("HTTP_PROXY")
        .env_remove("HTTPS_PROXY")
        .stdin(Stdio::null())
        .output()
        .expect("run broker exec");
    (out.status.success(), output_text(&out))
}

fn broker_ca(dir: &Path) -> std::path::PathBuf {
    let ca_dir = dir.join("ca");
    let out = Command::new(broker_tests::broker_bin())
        .args(["ca", "--dir"])
        .arg(&ca_dir)
        .output()
        .expect("broker ca");
    assert!(out.status.success(), "{}", output_text(&out));
    ca_dir
}

#[test]
fn http_keepalive_upload_query_and_dummy_authorization() {
    if !privileged() {
        return;
    }
    let t0 = Instant::now();
    let dir = tempfile::tempdir().expect("tempdir");
    let port = free_port();
    let server = HttpServer::start("127.0.0.3", port);
    let tok = write_file(dir.path(), "token", TOKEN);
    let cfg = write_file(
        dir.path(),
        "broker.yaml",
        &format!(
            "version: 2\nbroker:\n  caDir: {ca_dir}\nservices:\n  api:\n    connector: generic_http\n    intercept: [\"api.example.test:{port}\"]\n    credentials:\n      token: {{from: file, get: {}}}\n    config:\n      headers:\n        Authorization: \"Bearer {{{{ .token }}}}\"\n      queryParams:\n        api_key: \"{{{{ .token }}}}\"\n",
            tok.display(),
            ca_dir = dir.path().join("ca").display(),
        ),
    );
    let upload = dir.path().join("upload.bin");
    let script = format!(
        "set -e\n\
         curl -sS -H 'Authorization: Bearer dummy' 'http://api.example.test:{port}/r/[1-100]?x=1' > {d}/out100\n\
         for i in $(seq 1 20); do curl -sS -H 'Connection: close' -H 'Authorization: Bearer dummy' http://api.example.test:{port}/c/$i > /dev/null; done\n\
         head -c 52428800 /dev/urandom > {up}\n\
         echo UPLOAD_SHA=$(sha256sum {up} | cut -d' ' -f1)\n\
         curl -sS -T {up} -H 'Transfer-Encoding: chunked' -H 'Expect: 100-continue' -H 'Authorization: Bearer dummy' http://api.example.test:{port}/upload\n\
         python3 -c 'import urllib.request as u; print(\"PY=\" + u.urlopen(u.Request(\"http://api.example.test:{port}/py\", headers={{\"Authorization\": \"Bearer dummy\"}})).read().decode())'\n",
        d = dir.path().display(),
        up = upload.display(),
    );
    let (ok, out) = exec_sh(
        dir.path(),
        &cfg,
        &[("api.example.test", "127.0.0.3")],
        &script,
    );
    let bodies = std::fs::read_to_string(dir.path().join("out100")).unwrap_or_default();
    assert!(ok, "{out}");
    assert_no_secret(&out, &[TOKEN], "broker exec output");
    assert_no_secret(&bodies, &[TOKEN], "response bodies");
    let seen = server.seen();
    let r: Vec<_> = seen
        .iter()
        .filter(|s| s.target.starts_with("/r/"))
        .collect();
    assert_eq!(r.len(), 100, "{out}");
    for s in &r {
        assert_eq!(
            s.header("authorization"),
            vec![format!("Bearer {TOKEN}")],
            "{s:?}"
        );
        assert!(
            s.target.ends_with(&format!("?x=1&api_key={TOKEN}")),
            "{}",
            s.target
        );
    }
    // Keep-alive both ways: one client connection, one upstream connection for the 100.
    assert!(
        r.iter().all(|s| s.conn == r[0].conn),
        "100 requests on one connection"
    );
    // Twenty client connections of one request each (`Connection: close`): they share
    // pooled upstream connections instead of dialling one each.
    let c: Vec<_> = seen
        .iter()
        .filter(|s| s.target.starts_with("/c/"))
        .collect();
    assert_eq!(c.len(), 20, "{out}");
    assert!(
        c.iter()
            .all(|s| s.header("authorization") == vec![format!("Bearer {TOKEN}")])
    );
    let mut conns: Vec<_> = c.iter().map(|s| s.conn).collect();
    conns.sort_unstable();
    conns.dedup();
    assert!(
        conns.len() <= 3,
        "20 one-request client connections used {} upstream connections",
        conns.len()
    );
    let sha = out
        .lines()
        .find_map(|l| l.strip_prefix("UPLOAD_SHA="))
        .expect("upload checksum");
    let up = seen
        .iter()
        .find(|s| s.target.starts_with("/upload"))
        .expect("upload seen");
    assert_eq!(up.body_len, 52_428_800);
    assert_eq!(up.body_sha256, sha);
    assert!(
        out.contains(&format!("sha256={sha}")),
        "client sees the server's answer"
    );
    let py = seen
        .iter()
        .find(|s| s.target.starts_with("/py"))
        .expect("python seen");
    assert_eq!(py.header("authorization"), vec![format!("Bearer {TOKEN}")]);
    assert!(out.contains("PY=sha256="), "{out}");
    for s in &seen {
        assert!(
            s.headers.iter().all(|(_, v)| !v.contains("dummy")),
            "the dummy Authorization reached the server: {s:?}"
        );
    }
    // One access line per request, without the query string.
    assert!(
        out.contains("http.path=/r/1 ") || out.contains("\"http.path\":\"/r/1\""),
        "{out}"
    );
    eprintln!("http test: {:?}", t0.elapsed());
}

#[test]
fn https_terminated_for_intercepted_names_passed_through_otherwise() {
    if !privileged() {
        return;
    }
    let t0 = Instant::now();
    let dir = tempfile::tempdir().expect("tempdir");
    let port = free_port();
    let server = HttpServer::start_tls("127.0.0.4", port, "api.example.test", dir.path());
    let test_ca = server.ca_cert.clone().expect("test CA");
    let ca_dir = broker_ca(dir.path());
    let broker_ca = ca_dir.join("ca.crt");
    let tok = write_file(dir.path(), "token", TOKEN);
    let cfg = write_file(
        dir.path(),
        "broker.yaml",
        &format!(
            "version: 2\nbroker:\n  caDir: {}\nservices:\n  api:\n    connector: http\n    intercept: [\"api.example.test:{port}\"]\n    credentials:\n      token: {{from: file, get: {}}}\n    config:\n      caFile: {}\n      headers:\n        X-Api-Key: \"{{{{ .token }}}}\"\n",
            ca_dir.display(),
            tok.display(),
            test_ca.display()
        ),
    );
    let script = format!(
        "curl -sS --cacert {bca} -H 'Authorization: Bearer dummy' https://api.example.test:{port}/a https://api.example.test:{port}/b\n\
         SSL_CERT_FILE={bca} python3 -c 'import urllib.request as u; print(\"PY=\" + u.urlopen(\"https://api.example.test:{port}/py\").read().decode())'\n\
         echo FP=$(openssl s_client -connect other.example.test:{port} -servername other.example.test </dev/null 2>/dev/null | openssl x509 -noout -fingerprint -sha256)\n",
        bca = broker_ca.display(),
    );
    let (ok, out) = exec_sh(
        dir.path(),
        &cfg,
        &[
            ("api.example.test", "127.0.0.4"),
            ("other.example.test", "127.0.0.4"),
        ],
        &script,
    );
    assert!(ok, "{out}");
    assert_no_secret(&out, &[TOKEN], "broker exec output");
    let seen = server.seen();
    for p in ["/a", "/b", "/py"] {
        let s = seen
            .iter()
            .find(|s| s.target == p)
            .unwrap_or_else(|| panic!("{p} not seen: {out}"));
        assert_eq!(s.header("x-api-key"), vec![TOKEN], "{p}");
        assert!(
            s.header("authorization").is_empty(),
            "dummy Authorization removed"
        );
        assert_eq!(s.header("host"), vec![format!("api.example.test:{port}")]);
    }
    assert!(out.contains("PY=sha256="), "{out}");
    // The server name no service configures: the real server's own certificate.
    let fp = Command::new("openssl")
        .args(["x509", "-noout", "-fingerprint", "-sha256", "-in"])
        .arg(server.cert.as_ref().expect("cert"))
        .output()
        .expect("openssl");
    let fp = String::from_utf8_lossy(&fp.stdout).trim().to_owned();
    assert!(fp.contains("Fingerprint="), "{fp}");
    assert!(
        out.contains(&format!("FP={fp}")),
        "passthrough shows the server's certificate {fp}: {out}"
    );
    eprintln!("https test: {:?}", t0.elapsed());
}

#[test]
fn token_endpoint_down_gives_502_json() {
    if !privileged() {
        return;
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let port = free_port();
    let server = HttpServer::start("127.0.0.5", port);
    let secret = "client-secret-8e2a4c6f1d";
    let dead = free_port();
    let cfg = write_file(
        dir.path(),
        "broker.yaml",
        &format!(
            "version: 2\nbroker:\n  caDir: {ca_dir}\nservices:\n  agents:\n    connector: generic_http\n    intercept: [\"api.example.test:{port}\"]\n    authentication:\n      - type: oauth2\n        config:\n          token_url: http://127.0.0.1:{dead}/token\n          client_id: agents\n          client_secret: {secret}\n    config:\n      headers:\n        Authorization: \"Bearer {{{{ .access_token }}}}\"\n",
            ca_dir = dir.path().join("ca").display(),
        ),
    );
    let script =
        format!("curl -sS -w '\\nSTATUS=%{{http_code}}\\n' http://api.example.test:{port}/x");
    let (ok, out) = exec_sh(
        dir.path(),
        &cfg,
        &[("api.example.test", "127.0.0.5")],
        &script,
    );
    assert!(ok, "{out}");
    assert_no_secret(&out, &[secret], "broker exec output");
    assert!(out.contains("STATUS=502"), "{out}");
    assert!(out.contains("\"service\":\"agents\""), "{out}");
    assert!(
        server.seen().is_empty(),
        "no request without a token reaches the API"
    );
}

#[test]
fn secret_store_failure_gives_502_json() {
    if !privileged() {
        return;
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let port = free_port();
    let server = HttpServer::start("127.0.0.6", port);
    let missing = dir.path().join("no-such-token");
    let cfg = write_file(
        dir.path(),
        "broker.yaml",
        &format!(
            "version: 2\nbroker:\n  caDir: {ca_dir}\nservices:\n  api:\n    connector: generic_http\n    intercept: [\"api.example.test:{port}\"]\n    credentials:\n      token: {{from: file, get: {}}}\n    config:\n      headers:\n        Authorization: \"Bearer {{{{ .token }}}}\"\n",
            missing.display(),
            ca_dir = dir.path().join("ca").display(),
        ),
    );
    let script = format!(
        "curl -sS -w '\\nSTATUS=%{{http_code}}\\n' -H 'Authorization: Bearer dummy' http://api.example.test:{port}/x"
    );
    let (ok, out) = exec_sh(
        dir.path(),
        &cfg,
        &[("api.example.test", "127.0.0.6")],
        &script,
    );
    assert!(ok, "{out}");
    assert!(out.contains("STATUS=502"), "{out}");
    assert!(out.contains("\"service\":\"api\""), "{out}");
    assert!(
        server.seen().is_empty(),
        "nothing reaches the API without its credential"
    );
}

/// OAuth2 client credentials end to end: 200 concurrent requests (Python threads released
/// together) cause exactly one token fetch and all carry the token; the API then revokes
/// that token, and the next request's 401 makes the broker fetch a new one and retry the
/// request once, which succeeds. The client secret and the tokens appear in no output.
#[test]
fn oauth2_one_fetch_for_concurrent_requests_and_401_refetch() {
    if !privileged() {
        return;
    }
    let t0 = Instant::now();
    let dir = tempfile::tempdir().expect("tempdir");
    let port = free_port();
    let api = HttpServer::start("127.0.0.7", port);
    let secret = "client-secret-5b7d9f2e4a";
    let token_port = free_port();
    let idp = HttpServer::start_token_endpoint("127.0.0.1", token_port, "agents", secret);
    let cfg = write_file(
        dir.path(),
        "broker.yaml",
        &format!(
            "version: 2\nbroker:\n  caDir: {ca_dir}\nservices:\n  agents:\n    connector: generic_http\n    intercept: [\"api.example.test:{port}\"]\n    authentication:\n      - type: oauth2\n        config:\n          token_url: http://127.0.0.1:{token_port}/oauth/token\n          client_id: agents\n          client_secret: {secret}\n    config:\n      headers:\n        Authorization: \"Bearer {{{{ .access_token }}}}\"\n",
            ca_dir = dir.path().join("ca").display(),
        ),
    );
    let py = write_file(
        dir.path(),
        "concurrent.py",
        &format!(
            r#"import sys, threading, urllib.request as u
N = 200
base = "http://api.example.test:{port}"
barrier = threading.Barrier(N)
codes = [None] * N
def one(i):
    barrier.wait()
    try:
        r = u.urlopen(u.Request(base + "/c/%d" % i, headers={{"Authorization": "Bearer dummy"}}), timeout=60)
        r.read()
        codes[i] = r.status
    except Exception as e:
        codes[i] = repr(e)
ts = [threading.Thread(target=one, args=(i,)) for i in range(N)]
for t in ts: t.start()
for t in ts: t.join()
print("OK200=%d" % sum(1 for c in codes if c == 200))
print("OTHER=%r" % sorted(set(str(c) for c in codes if c != 200))[:5])
for p in ("/revoke", "/after"):
    try:
        r = u.urlopen(base + p, timeout=60)
        print("%s=%d" % (p, r.status))
    except Exception as e:
        print("%s=%r" % (p, e))
"#
        ),
    );
    let (ok, out) = exec_sh(
        dir.path(),
        &cfg,
        &[("api.example.test", "127.0.0.7")],
        &format!("python3 {}", py.display()),
    );
    assert!(ok, "{out}");
    assert_no_secret(
        &out,
        &[secret, "agents-token-1", "agents-token-2"],
        "broker exec output",
    );
    assert!(out.contains("OK200=200"), "{out}");
    let seen = api.seen();
    let c: Vec<_> = seen
        .iter()
        .filter(|s| s.target.starts_with("/c/"))
        .collect();
    assert_eq!(c.len(), 200, "{out}");
    for s in &c {
        assert_eq!(
            s.header("authorization"),
            vec!["Bearer agents-token-1"],
            "{s:?}"
        );
    }
    // The revoked token: refused once, then the retry with a new token succeeds.
    assert!(out.contains("/revoke=200"), "{out}");
    assert!(out.contains("/after=200"), "{out}");
    let after: Vec<_> = seen
        .iter()
        .filter(|s| s.target == "/after")
        .map(|s| s.header("authorization").join(","))
        .collect();
    assert_eq!(
        after,
        vec!["Bearer agents-token-1", "Bearer agents-token-2"],
        "{out}"
    );
    assert_eq!(
        idp.token_fetches(),
        2,
        "one fetch for the 200, one after the 401"
    );
    eprintln!("oauth2 test: {:?}", t0.elapsed());
}

/// A WebSocket client in Python: `connect` makes the socket `s` (plain or TLS) to
/// `api.example.test:port`; then the handshake (printing `STATUS_LINE=` and
/// `ACCEPT_OK=`), two text frames echoed (`ECHO_OK=`) and a close (`CLOSE_OK=`).
fn ws_client(connect: &str, port: u16) -> String {
    format!(
        r#"import base64, hashlib, os, socket, ssl
{connect}
key = base64.b64encode(os.urandom(16)).decode()
s.sendall(("GET /ws HTTP/1.1\r\nHost: api.example.test:{port}\r\nUpgrade: websocket\r\n"
           "Connection: Upgrade\r\nSec-WebSocket-Key: %s\r\nSec-WebSocket-Version: 13\r\n"
           "Authorization: Bearer dummy\r\n\r\n" % key).encode())
buf = b""
while b"\r\n\r\n" not in buf:
    d = s.recv(4096)
    if not d: break
    buf += d
head, _, rest = buf.partition(b"\r\n\r\n")
lines = head.decode().split("\r\n")
print("STATUS_LINE=" + lines[0])
hdrs = {{l.split(":", 1)[0].strip().lower(): l.split(":", 1)[1].strip() for l in lines[1:] if ":" in l}}
want = base64.b64encode(hashlib.sha1((key + "258EAFA5-E914-47DA-95CA-C5AB0DC85B11").encode()).digest()).decode()
print("ACCEPT_OK=%s" % (hdrs.get("sec-websocket-accept") == want))
def frame(op, payload):
    mask = os.urandom(4)
    n = len(payload)
    h = bytes([0x80 | op]) + (bytes([0x80 | n]) if n < 126 else bytes([0x80 | 126]) + n.to_bytes(2, "big"))
    return h + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
def read_exact(n):
    global rest
    while len(rest) < n:
        d = s.recv(4096)
        if not d: raise EOFError
        rest += d
    out, rest = rest[:n], rest[n:]
    return out
def read_frame():
    h = read_exact(2)
    n = h[1] & 0x7f
    if n == 126: n = int.from_bytes(read_exact(2), "big")
    return h[0] & 0x0f, read_exact(n)
for msg in (b"hello through the broker", b"x" * 1000):
    s.sendall(frame(1, msg))
    op, p = read_frame()
    print("ECHO_OK=%s" % (op == 1 and p == msg))
s.sendall(frame(8, b"\x03\xe8"))
op, p = read_frame()
print("CLOSE_OK=%s" % (op == 8))
"#
    )
}

/// A WebSocket upgrade through the broker: the injected header is on the upgrade request,
/// the app's own handshake completes (101, a correct `Sec-WebSocket-Accept`), and frames
/// sent after the 101 come back from the server's echo.
#[test]
fn websocket_upgrade_injected_and_echoed() {
    if !privileged() {
        return;
    }
    let t0 = Instant::now();
    let dir = tempfile::tempdir().expect("tempdir");
    let port = free_port();
    let server = HttpServer::start("127.0.0.8", port);
    let tok = write_file(dir.path(), "token", TOKEN);
    let cfg = write_file(
        dir.path(),
        "broker.yaml",
        &format!(
            "version: 2\nbroker:\n  caDir: {ca_dir}\nservices:\n  api:\n    connector: generic_http\n    intercept: [\"api.example.test:{port}\"]\n    credentials:\n      token: {{from: file, get: {}}}\n    config:\n      headers:\n        Authorization: \"Bearer {{{{ .token }}}}\"\n",
            tok.display(),
            ca_dir = dir.path().join("ca").display(),
        ),
    );
    let py = write_file(
        dir.path(),
        "ws.py",
        &ws_client(
            &format!("s = socket.create_connection((\"api.example.test\", {port}), timeout=20)"),
            port,
        ),
    );
    let (ok, out) = exec_sh(
        dir.path(),
        &cfg,
        &[("api.example.test", "127.0.0.8")],
        &format!("python3 {}", py.display()),
    );
    assert!(ok, "{out}");
    assert_no_secret(&out, &[TOKEN], "broker exec output");
    assert!(out.contains("STATUS_LINE=HTTP/1.1 101"), "{out}");
    assert!(out.contains("ACCEPT_OK=True"), "{out}");
    assert_eq!(out.matches("ECHO_OK=True").count(), 2, "{out}");
    assert!(out.contains("CLOSE_OK=True"), "{out}");
    let seen = server.seen();
    let ws = seen
        .iter()
        .find(|s| s.target == "/ws")
        .unwrap_or_else(|| panic!("upgrade not seen: {out}"));
    assert_eq!(ws.header("authorization"), vec![format!("Bearer {TOKEN}")]);
    assert_eq!(ws.header("upgrade"), vec!["websocket"]);
    assert_eq!(ws.header("sec-websocket-version"), vec!["13"]);
    eprintln!("websocket test: {:?}", t0.elapsed());
}

/// A WebSocket upgrade over HTTPS: the app connects with TLS to an intercepted name,
/// trusting only the broker's CA; the broker terminates it, injects the header into the
/// upgrade request, sends it over verified TLS to the real server (test CA in `caFile`)
/// and, after the 101, relays the frames both ways through the two TLS legs.
#[test]
fn websocket_over_https_injected_and_echoed() {
    if !privileged() {
        return;
    }
    let t0 = Instant::now();
    let dir = tempfile::tempdir().expect("tempdir");
    let port = free_port();
    let server = HttpServer::start_tls("127.0.0.11", port, "api.example.test", dir.path());
    let test_ca = server.ca_cert.clone().expect("test CA");
    let ca_dir = broker_ca(dir.path());
    let broker_ca = ca_dir.join("ca.crt");
    let tok = write_file(dir.path(), "token", TOKEN);
    let cfg = write_file(
        dir.path(),
        "broker.yaml",
        &format!(
            "version: 2\nbroker:\n  caDir: {}\nservices:\n  api:\n    connector: generic_http\n    intercept: [\"api.example.test:{port}\"]\n    credentials:\n      token: {{from: file, get: {}}}\n    config:\n      caFile: {}\n      headers:\n        Authorization: \"Bearer {{{{ .token }}}}\"\n",
            ca_dir.display(),
            tok.display(),
            test_ca.display()
        ),
    );
    // `cafile` alone: the default context then trusts nothing else (not the system
    // store, not the test server's CA), and checks the name.
    let connect = format!(
        "ctx = ssl.create_default_context(cafile=\"{bca}\")\n\
         s = ctx.wrap_socket(socket.create_connection((\"api.example.test\", {port}), timeout=20), server_hostname=\"api.example.test\")\n\
         print(\"TLS=%s ISSUER=%s\" % (s.version(), dict(x[0] for x in s.getpeercert()[\"issuer\"]).get(\"commonName\")))",
        bca = broker_ca.display(),
    );
    let py = write_file(dir.path(), "wss.py", &ws_client(&connect, port));
    let (ok, out) = exec_sh(
        dir.path(),
        &cfg,
        &[("api.example.test", "127.0.0.11")],
        &format!("python3 {}", py.display()),
    );
    assert!(ok, "{out}");
    assert_no_secret(&out, &[TOKEN], "broker exec output");
    assert!(out.contains("TLS=TLSv1."), "{out}");
    // The certificate the app verified is the broker's, not the server's.
    assert!(out.contains("ISSUER=credential broker local CA"), "{out}");
    assert!(out.contains("STATUS_LINE=HTTP/1.1 101"), "{out}");
    assert!(out.contains("ACCEPT_OK=True"), "{out}");
    assert_eq!(out.matches("ECHO_OK=True").count(), 2, "{out}");
    assert!(out.contains("CLOSE_OK=True"), "{out}");
    let seen = server.seen();
    let ws = seen
        .iter()
        .find(|s| s.target == "/ws")
        .unwrap_or_else(|| panic!("upgrade not seen: {out}"));
    assert_eq!(ws.header("authorization"), vec![format!("Bearer {TOKEN}")]);
    assert_eq!(ws.header("upgrade"), vec!["websocket"]);
    assert_eq!(ws.header("host"), vec![format!("api.example.test:{port}")]);
    // The connection line: the app's leg was TLS the broker terminated.
    assert!(
        out.contains("client.tls=true") || out.contains("\"client.tls\":true"),
        "{out}"
    );
    eprintln!("websocket over https test: {:?}", t0.elapsed());
}

/// Whether `/usr/bin/python3` has botocore (required when `BROKER_REQUIRE_PRIVILEGED` is
/// set, as in CI).
fn have_botocore() -> bool {
    if Command::new("/usr/bin/python3")
        .args(["-c", "import botocore"])
        .status()
        .is_ok_and(|s| s.success())
    {
        return true;
    }
    assert!(
        std::env::var_os("BROKER_REQUIRE_PRIVILEGED").is_none(),
        "python3-botocore is missing"
    );
    false
}

/// Checks received requests' SigV4 signatures with botocore: for each, rebuilds the
/// request from the headers it signed and the body, signs it with the real keys at its
/// own `X-Amz-Date`, and prints `SIG_OK` or `SIG_BAD` with both `Authorization` values.
const BOTOCORE_VERIFY: &str = r#"
import datetime, json, sys
from unittest import mock
import botocore.auth
from botocore.auth import S3SigV4Auth, SigV4Auth
from botocore.awsrequest import AWSRequest
from botocore.credentials import Credentials

for spec in json.load(sys.stdin):
    got = dict(spec["headers"])
    auth = got["authorization"]
    signed = auth.split("SignedHeaders=")[1].split(",")[0].split(";")
    headers = {n: got[n] for n in signed if n in got}
    headers.pop("x-amz-date", None)
    headers.pop("x-amz-security-token", None)
    request = AWSRequest(method=spec["method"], url=spec["url"], data=spec["body"].encode(),
                         headers=headers)
    when = datetime.datetime.strptime(got["x-amz-date"], "%Y%m%dT%H%M%SZ").replace(
        tzinfo=datetime.timezone.utc)
    if hasattr(botocore.auth, "get_current_datetime"):
        clock = mock.patch.object(botocore.auth, "get_current_datetime", return_value=when)
    else:
        class Frozen(datetime.datetime):
            @classmethod
            def utcnow(cls):
                return when.replace(tzinfo=None)
        clock = mock.patch.object(botocore.auth.datetime, "datetime", Frozen)
    cls = S3SigV4Auth if spec["service"] == "s3" else SigV4Auth
    with clock:
        cls(Credentials(spec["key_id"], spec["secret"], spec["token"]), spec["service"],
            spec["region"]).add_auth(request)
    want = request.headers["Authorization"]
    print(("SIG_OK " if want == auth else "SIG_BAD ") + spec["url"])
"#;

/// The `aws` connector: an app signing with dummy keys (botocore) under `broker exec`;
/// the broker re-signs each request with the brokered keys and session token, and
/// botocore recomputing each signature with the real keys agrees. A body with no
/// `X-Amz-Content-Sha256` is buffered and hashed (STS); S3 keeps the app's declared hash;
/// a request without SigV4 `Authorization` passes unsigned; an unhashed body over the
/// bound gets 413 JSON.
#[test]
fn aws_requests_resigned_and_verified_by_botocore() {
    if !privileged() {
        return;
    }
    if !have_botocore() {
        return;
    }
    let t0 = Instant::now();
    let dir = tempfile::tempdir().expect("tempdir");
    let port = free_port();
    let server = HttpServer::start("127.0.0.10", port);
    let key_id = "AKIAREALKEY000000001";
    let secret = "realSecret/Key+0123456789abcdefghijklmn";
    let token = "FwoGZXIvYXdzEREALSESSIONTOKEN/abc+def==";
    let kf = write_file(dir.path(), "akid", key_id);
    let sf = write_file(dir.path(), "secret", secret);
    let tf = write_file(dir.path(), "token", token);
    let cfg = write_file(
        dir.path(),
        "broker.yaml",
        &format!(
            "version: 2\nbroker:\n  caDir: {ca_dir}\nservices:\n  aws:\n    connector: aws\n    intercept: [\"sts.example.test:{port}\", \"s3.example.test:{port}\"]\n    credentials:\n      accessKeyId: {{from: file, get: {}}}\n      secretAccessKey: {{from: file, get: {}}}\n      accessToken: {{from: file, get: {}}}\n",
            kf.display(),
            sf.display(),
            tf.display(),
            ca_dir = dir.path().join("ca").display(),
        ),
    );
    let sts_body = "Action=GetCallerIdentity&Version=2011-06-15";
    let py = write_file(
        dir.path(),
        "app.py",
        &format!(
            r#"import urllib.request as u, urllib.error
from botocore.auth import S3SigV4Auth, SigV4Auth
from botocore.awsrequest import AWSRequest
from botocore.credentials import Credentials
dummy = Credentials("AKIDAPPDUMMY", "app-dummy-secret", "app-dummy-token")
def send(name, method, url, body, service, headers=None, sign=True):
    req = AWSRequest(method=method, url=url, data=body, headers=headers or {{}})
    if sign:
        (S3SigV4Auth if service == "s3" else SigV4Auth)(dummy, service, "eu-west-3").add_auth(req)
    r = u.Request(url, data=body if body else None, method=method, headers=dict(req.headers.items()))
    try:
        resp = u.urlopen(r, timeout=30)
        print("%s=%d" % (name, resp.status))
    except urllib.error.HTTPError as e:
        print("%s=%d %s" % (name, e.code, e.read().decode()))
send("STS", "POST", "http://sts.example.test:{port}/", b"{sts_body}", "sts",
     {{"Content-Type": "application/x-www-form-urlencoded; charset=utf-8"}})
send("S3", "PUT", "http://s3.example.test:{port}/bucket/some%20key.txt?x-id=PutObject", b"hello s3", "s3")
send("PLAIN", "GET", "http://sts.example.test:{port}/plain", b"", "sts", sign=False)
# Over the bound: the broker answers 413 from the Content-Length, before the body.
import http.client
big = AWSRequest(method="POST", url="http://sts.example.test:{port}/big", data=b"x" * (11 * 1024 * 1024))
SigV4Auth(dummy, "sts", "eu-west-3").add_auth(big)
c = http.client.HTTPConnection("sts.example.test", {port}, timeout=30)
c.putrequest("POST", "/big", skip_accept_encoding=True)
for n, v in big.headers.items():
    c.putheader(n, v)
c.putheader("Content-Length", str(11 * 1024 * 1024))
c.endheaders()
r = c.getresponse()
print("BIG=%d %s" % (r.status, r.read().decode()))
"#
        ),
    );
    let (ok, out) = exec_sh(
        dir.path(),
        &cfg,
        &[
            ("sts.example.test", "127.0.0.10"),
            ("s3.example.test", "127.0.0.10"),
        ],
        &format!("/usr/bin/python3 {}", py.display()),
    );
    assert!(ok, "{out}");
    assert_no_secret(&out, &[secret, token], "broker exec output");
    assert!(out.contains("STS=200"), "{out}");
    assert!(out.contains("S3=200"), "{out}");
    assert!(out.contains("PLAIN=200"), "{out}");
    assert!(out.contains("BIG=413"), "{out}");
    assert!(out.contains("\"service\":\"aws\""), "{out}");
    let seen = server.seen();
    let find = |p: &str| {
        seen.iter()
            .find(|s| s.target.starts_with(p))
            .unwrap_or_else(|| panic!("{p} not seen: {out}"))
    };
    let sts = find("/");
    let s3 = find("/bucket/");
    let plain = find("/plain");
    assert!(
        seen.iter().all(|s| s.target != "/big"),
        "an unsignable request does not reach the API"
    );
    assert!(plain.header("authorization").is_empty(), "{plain:?}");
    let mut specs = Vec::new();
    for (s, service, body) in [(sts, "sts", sts_body), (s3, "s3", "hello s3")] {
        let auth = s.header("authorization").join(",");
        assert!(
            auth.starts_with(&format!("AWS4-HMAC-SHA256 Credential={key_id}/")),
            "{auth}"
        );
        assert!(
            auth.contains(&format!("/eu-west-3/{service}/aws4_request")),
            "{auth}"
        );
        assert_eq!(s.header("x-amz-security-token"), vec![token]);
        assert!(
            s.headers
                .iter()
                .all(|(_, v)| !v.contains("DUMMY") && !v.contains("dummy"))
        );
        let host = s.header("host").join(",");
        specs.push(serde_json::json!({
            "method": s.method,
            "url": format!("http://{host}{}", s.target),
            "headers": s.headers,
            "body": body,
            "service": service,
            "region": "eu-west-3",
            "key_id": key_id,
            "secret": secret,
            "token": token,
        }));
    }
    let mut child = Command::new("/usr/bin/python3")
        .args(["-c", BOTOCORE_VERIFY])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("python3");
    {
        use std::io::Write as _;
        let mut stdin = child.stdin.take().expect("stdin");
        stdin
            .write_all(serde_json::Value::Array(specs).to_string().as_bytes())
            .expect("write specs");
    }
    let v = child.wait_with_output().expect("botocore verifier");
    let vout = output_text(&v);
    assert!(v.status.success(), "{vout}");
    assert_eq!(vout.matches("SIG_OK").count(), 2, "{vout}");
    eprintln!("aws test: {:?}", t0.elapsed());
}

/// The `aws` connector's buffering bound with a chunked body (no `Content-Length` to
/// answer from): an app's SigV4-signed `POST` to a non-S3 service, without
/// `X-Amz-Content-Sha256`, streaming 11 MiB chunked. The broker buffers up to
/// `AWS_MAX_BODY` (10 MiB) to sign it, then answers 413 with a JSON error while the app
/// is still sending; nothing reaches the API; the broker keeps serving: the next signed
/// request, on a new connection, is re-signed and answered 200.
#[test]
fn aws_chunked_body_over_the_bound_gets_413_and_the_broker_keeps_serving() {
    if !privileged() || !have_botocore() {
        return;
    }
    let t0 = Instant::now();
    let dir = tempfile::tempdir().expect("tempdir");
    let port = free_port();
    let server = HttpServer::start("127.0.0.12", port);
    let key_id = "AKIAREALKEY000000002";
    let secret = "realSecret/Key+chunked0123456789abcdefgh";
    let token = "FwoGZXIvYXdzECHUNKEDSESSIONTOKEN/xyz+uvw==";
    let kf = write_file(dir.path(), "akid", key_id);
    let sf = write_file(dir.path(), "secret", secret);
    let tf = write_file(dir.path(), "token", token);
    let cfg = write_file(
        dir.path(),
        "broker.yaml",
        &format!(
            "version: 2\nbroker:\n  caDir: {}\nservices:\n  aws:\n    connector: aws\n    intercept: [\"sts.example.test:{port}\"]\n    credentials:\n      accessKeyId: {{from: file, get: {}}}\n      secretAccessKey: {{from: file, get: {}}}\n      accessToken: {{from: file, get: {}}}\n",
            dir.path().join("ca").display(),
            kf.display(),
            sf.display(),
            tf.display()
        ),
    );
    let py = write_file(
        dir.path(),
        "app.py",
        &format!(
            r#"import json, socket, threading, urllib.request as u, urllib.error
from botocore.auth import SigV4Auth
from botocore.awsrequest import AWSRequest
from botocore.credentials import Credentials
dummy = Credentials("AKIDAPPDUMMY", "app-dummy-secret", "app-dummy-token")
def signed(path, body):
    # Signed over the body as given (the broker keeps only the scope); SigV4Auth adds
    # no X-Amz-Content-Sha256.
    r = AWSRequest(method="POST", url="http://sts.example.test:{port}" + path, data=body,
                   headers={{"Content-Type": "application/x-www-form-urlencoded"}})
    SigV4Auth(dummy, "sts", "eu-west-3").add_auth(r)
    assert "X-Amz-Content-Sha256" not in r.headers
    return dict(r.headers.items())
TOTAL, CHUNK = 11 * 1024 * 1024, 64 * 1024
s = socket.create_connection(("sts.example.test", {port}), timeout=30)
head = "POST /big HTTP/1.1\r\nHost: sts.example.test:{port}\r\nTransfer-Encoding: chunked\r\n"
for n, v in signed("/big", b"").items():
    head += "%s: %s\r\n" % (n, v)
s.sendall((head + "\r\n").encode())
sent = [0, None]
def send_body():
    # The broker answers while this is still sending, then closes: an error here is
    # expected once the answer is in.
    piece = b"%x\r\n" % CHUNK + b"x" * CHUNK + b"\r\n"
    try:
        while sent[0] < TOTAL:
            s.sendall(piece)
            sent[0] += CHUNK
        s.sendall(b"0\r\n\r\n")
    except OSError as e:
        sent[1] = type(e).__name__
t = threading.Thread(target=send_body)
t.start()
buf = b""
try:
    while b"\r\n\r\n" not in buf:
        d = s.recv(65536)
        if not d: break
        buf += d
    head, _, body = buf.partition(b"\r\n\r\n")
    lines = head.decode().split("\r\n")
    hdrs = {{l.split(":", 1)[0].strip().lower(): l.split(":", 1)[1].strip() for l in lines[1:] if ":" in l}}
    n = int(hdrs.get("content-length", "0"))
    while len(body) < n:
        d = s.recv(65536)
        if not d: break
        body += d
    print("BIG=%s" % lines[0])
    print("BIG_TYPE=%s" % hdrs.get("content-type"))
    print("BIG_BODY=%s" % body.decode())
    doc = json.loads(body)
    print("BIG_JSON=%s" % sorted(doc))
except OSError as e:
    print("BIG_ERROR=%r" % e)
t.join(60)
print("SENT_MIB=%d SEND_ERROR=%s" % (sent[0] >> 20, sent[1]))
s.close()
body = b"Action=GetCallerIdentity&Version=2011-06-15"
r = u.Request("http://sts.example.test:{port}/after", data=body, method="POST",
              headers=signed("/after", body))
try:
    print("AFTER=%d %s" % (u.urlopen(r, timeout=30).status, "ok"))
except urllib.error.HTTPError as e:
    print("AFTER=%d %s" % (e.code, e.read().decode()))
"#
        ),
    );
    let (ok, out) = exec_sh(
        dir.path(),
        &cfg,
        &[("sts.example.test", "127.0.0.12")],
        &format!("/usr/bin/python3 {}", py.display()),
    );
    assert!(ok, "{out}");
    assert_no_secret(&out, &[secret, token], "broker exec output");
    assert!(out.contains("BIG=HTTP/1.1 413"), "{out}");
    assert!(out.contains("BIG_TYPE=application/json"), "{out}");
    assert!(out.contains("BIG_JSON=['error', 'service']"), "{out}");
    assert!(out.contains("\"service\":\"aws\""), "{out}");
    assert!(
        out.contains("X-Amz-Content-Sha256"),
        "the error says why: {out}"
    );
    assert!(out.contains("AFTER=200 ok"), "{out}");
    let seen = server.seen();
    assert!(
        seen.iter().all(|s| s.target != "/big"),
        "the unsignable request does not reach the API: {seen:?}"
    );
    let after = seen
        .iter()
        .find(|s| s.target == "/after")
        .unwrap_or_else(|| panic!("/after not seen: {out}"));
    let auth = after.header("authorization").join(",");
    assert!(
        auth.starts_with(&format!("AWS4-HMAC-SHA256 Credential={key_id}/"))
            && auth.contains("/eu-west-3/sts/aws4_request"),
        "{auth}"
    );
    assert_eq!(after.header("x-amz-security-token"), vec![token]);
    assert_eq!(after.body_len, 43);
    eprintln!("aws chunked 413 test: {:?}", t0.elapsed());
}
