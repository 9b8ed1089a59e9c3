//! Unit tests of the `kubernetes` provider: id rules, settings from the in-cluster
//! environment, and the provider against a small in-process API server. The
//! daemon-level tests (tests/tests/store_kubernetes.rs) use the full fake.

use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
};

use base64::Engine as _;
use tokio::{
    io::{AsyncReadExt as _, AsyncWriteExt as _},
    net::TcpListener,
};

use super::*;

const TOKEN: &str = "kube-unit-sa-token-3c9d";
const VALUE: &str = "kube-unit-value-71be";

#[test]
fn names_keys_and_namespaces_are_checked() {
    for ok in ["app", "a-1", "x9"] {
        assert!(valid_namespace(ok), "{ok}");
    }
    for bad in ["", "App", "-a", "a-", "a.b", "a/b", &"a".repeat(64)] {
        assert!(!valid_namespace(bad), "{bad}");
    }
    assert!(valid_secret_name("db-creds.v2"));
    assert!(!valid_secret_name("db/creds"));
    assert!(!valid_secret_name("../x"));
    assert!(!valid_secret_name("Db"));
    assert!(valid_key("tls.crt") && valid_key("PASS_word-1"));
    assert!(!valid_key("a/b") && !valid_key("..") && !valid_key("a b"));
}

/// One request as the server saw it.
#[derive(Debug, Clone)]
struct Req {
    target: String,
    headers: HashMap<String, String>,
}

type Handler = dyn Fn(&Req) -> (u16, Vec<u8>) + Send + Sync;

struct Server {
    base: String,
    seen: Arc<Mutex<Vec<Req>>>,
}

impl Server {
    fn seen(&self) -> Vec<Req> {
        self.seen.lock().unwrap().clone()
    }
}

async fn serve(handler: Arc<Handler>) -> Server {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    let seen = Arc::new(Mutex::new(Vec::new()));
    let seen2 = Arc::clone(&seen);
    tokio::spawn(async move {
        loop {
            let Ok((mut sock, _)) = listener.accept().await else {
                return;
            };
            let (seen, handler) = (Arc::clone(&seen2), Arc::clone(&handler));
            tokio::spawn(async move {
                let mut buf = Vec::new();
                let mut chunk = [0u8; 4096];
                while !buf.windows(4).any(|w| w == b"\r\n\r\n") {
                    match sock.read(&mut chunk).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => buf.extend_from_slice(&chunk[..n]),
                    }
                }
                let head = String::from_utf8_lossy(&buf).into_owned();
                let mut lines = head.split("\r\n");
                let target = lines
                    .next()
                    .unwrap_or("")
                    .split(' ')
                    .nth(1)
                    .unwrap_or("")
                    .to_owned();
                let headers = lines
                    .filter_map(|l| l.split_once(':'))
                    .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_owned()))
                    .collect();
                let req = Req { target, headers };
                seen.lock().unwrap().push(req.clone());
                let (status, body) = handler(&req);
                let head = format!(
                    "HTTP/1.1 {status} X\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
                    body.len()
                );
                let _ = sock.write_all(head.as_bytes()).await;
                let _ = sock.write_all(&body).await;
                let _ = sock.shutdown().await;
            });
        }
    });
    Server { base, seen }
}

fn b64(s: &str) -> String {
    base64::engine::general_purpose::STANDARD.encode(s)
}

fn secret_json(name: &str, data: &[(&str, &str)]) -> Vec<u8> {
    let data: serde_json::Map<String, serde_json::Value> = data
        .iter()
        .map(|(k, v)| ((*k).to_owned(), serde_json::Value::String(b64(v))))
        .collect();
    serde_json::to_vec(&serde_json::json!({
        "kind": "Secret",
        "apiVersion": "v1",
        "metadata": {"name": name, "namespace": "app", "resourceVersion": "1"},
        "data": data,
        "type": "Opaque",
    }))
    .unwrap()
}

/// An API server that accepts the bearer tokens in `tokens` and serves `db-creds`
/// in namespace `app`.
fn api(tokens: Arc<Mutex<Vec<String>>>) -> Arc<Handler> {
    Arc::new(move |r: &Req| {
        let ok = r
            .headers
            .get("authorization")
            .and_then(|h| h.strip_prefix("Bearer "))
            .is_some_and(|t| tokens.lock().unwrap().iter().any(|x| x == t));
        if !ok {
            return (
                401,
                br#"{"kind":"Status","apiVersion":"v1","metadata":{},"status":"Failure","message":"Unauthorized","reason":"Unauthorized","code":401}"#.to_vec(),
            );
        }
        match r.target.as_str() {
            "/api/v1/namespaces/app/secrets/db-creds" => (
                200,
                secret_json("db-creds", &[("username", "app_user"), ("password", VALUE)]),
            ),
            "/api/v1/namespaces/app/secrets/empty" => (
                200,
                br#"{"kind":"Secret","apiVersion":"v1","metadata":{"name":"empty"},"type":"Opaque"}"#.to_vec(),
            ),
            "/api/v1/namespaces/app/secrets/notb64" => (
                200,
                br#"{"kind":"Secret","data":{"k":"%%%"}}"#.to_vec(),
            ),
            "/api/v1/namespaces/app/secrets/html" => (200, b"<html>hi</html>".to_vec()),
            "/api/v1/namespaces/app/secrets/status" => (
                200,
                br#"{"kind":"Status","data":{"k":"eA=="}}"#.to_vec(),
            ),
            "/api/v1/namespaces/app/secrets/big" => (200, vec![b' '; MAX_BODY + 1]),
            "/api/v1/namespaces/app/secrets/boom" => (503, Vec::new()),
            "/api/v1/namespaces/app/secrets/moved" => (307, Vec::new()),
            t if t.starts_with("/api/v1/namespaces/other/") => (
                403,
                br#"{"kind":"Status","status":"Failure","reason":"Forbidden","code":403}"#.to_vec(),
            ),
            _ => (
                404,
                br#"{"kind":"Status","status":"Failure","reason":"NotFound","code":404}"#.to_vec(),
            ),
        }
    })
}

struct Setup {
    server: Server,
    tokens: Arc<Mutex<Vec<String>>>,
    dir: tempfile::TempDir,
}

impl Setup {
    async fn new() -> Self {
        let tokens = Arc::new(Mutex::new(vec![TOKEN.to_owned()]));
        let server = serve(api(Arc::clone(&tokens))).await;
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("token"), TOKEN).unwrap();
        std::fs::write(dir.path().join("namespace"), "app\n").unwrap();
        Self {
            server,
            tokens,
            dir,
        }
    }

    /// The built-in instance, in a "pod" whose API server is the test server.
    fn provider(&self, namespace: Option<&str>) -> KubernetesProvider {
        let cfg = KubernetesProviderConfig {
            api_server: Some(self.server.base.clone()),
            namespace: namespace.map(str::to_owned),
            timeout: Some(Duration::from_secs(2)),
            builtin: true,
            ..KubernetesProviderConfig::default()
        };
        let p =
            KubernetesProvider::with_env("kubernetes", &cfg, &|_| None, self.dir.path()).unwrap();
        assert!(p.inner.client().is_ok(), "{:?}", p.inner.client().err());
        p
    }
}

#[track_caller]
fn assert_clean(e: &SecretError) {
    let s = format!("{e} {e:?}");
    for needle in [TOKEN, VALUE, &b64(VALUE)] {
        assert!(!s.contains(needle), "leak: {s}");
    }
}

#[tokio::test]
async fn keys_of_a_secret_in_the_pods_namespace() {
    let s = Setup::new().await;
    let p = s.provider(None);
    let got = p.get("db-creds#password").await.unwrap();
    assert_eq!(got.value.expose(), VALUE.as_bytes());
    let seen = s.server.seen();
    assert_eq!(seen[0].target, "/api/v1/namespaces/app/secrets/db-creds");
    assert_eq!(
        seen[0].headers.get("authorization").map(String::as_str),
        Some(format!("Bearer {TOKEN}").as_str())
    );
    assert_eq!(
        seen[0].headers.get("accept").map(String::as_str),
        Some("application/json")
    );
    // Two keys of one Secret: one read.
    let got = p
        .get_many(&[
            "db-creds#username",
            "db-creds#password",
            "db-creds#username",
        ])
        .await
        .unwrap();
    let got: Vec<&[u8]> = got.iter().map(|f| f.value.expose()).collect();
    assert_eq!(got, [&b"app_user"[..], VALUE.as_bytes(), b"app_user"]);
    assert_eq!(s.server.seen().len(), 2);
}

#[tokio::test]
async fn errors_are_typed_and_name_secret_and_key() {
    let s = Setup::new().await;
    let p = s.provider(None);
    for (id, kind) in [
        ("db-creds#nokey", "not_found"),
        ("gone#password", "not_found"),
        ("empty#k", "not_found"),
        ("notb64#k", "bad_reply"),
        ("html#k", "bad_reply"),
        ("status#k", "bad_reply"),
        ("big#k", "bad_reply"),
        ("boom#k", "unreachable"),
        ("moved#k", "bad_reply"),
        ("db-creds", "bad_id"),
        ("db-creds#", "bad_id"),
        ("#password", "bad_id"),
        ("../x#k", "bad_id"),
        ("db-creds#a/b", "bad_id"),
    ] {
        let e = p.get(id).await.unwrap_err();
        assert_eq!(e.kind(), kind, "{id}: {e}");
        assert!(e.to_string().contains(id), "{e}");
        assert_clean(&e);
    }
    let e = s
        .provider(Some("other"))
        .get("db-creds#password")
        .await
        .unwrap_err();
    assert_eq!(e.kind(), "denied", "{e}");
}

#[tokio::test]
async fn a_rotated_token_file_is_read_again() {
    let s = Setup::new().await;
    let p = s.provider(None);
    p.get("db-creds#password").await.unwrap();
    // Rotation: the kubelet writes a new token; the old one stops working.
    *s.tokens.lock().unwrap() = vec!["rotated-token-1".into()];
    std::fs::write(s.dir.path().join("token"), "rotated-token-1").unwrap();
    p.get("db-creds#password").await.unwrap();
    let seen = s.server.seen();
    assert_eq!(seen.len(), 2, "picked up before sending: no 401");
    assert_eq!(seen[1].headers["authorization"], "Bearer rotated-token-1");
    // Rewritten with the same size and mtime: the 401 makes us read it again.
    let file = s.dir.path().join("token");
    let mtime = std::fs::metadata(&file).unwrap().modified().unwrap();
    *s.tokens.lock().unwrap() = vec!["rotated-token-2".into()];
    let f = std::fs::OpenOptions::new().write(true).open(&file).unwrap();
    std::io::Write::write_all(&mut &f, b"rotated-token-2").unwrap();
    f.set_modified(mtime).unwrap();
    drop(f);
    p.get("db-creds#password").await.unwrap();
    assert_eq!(s.server.seen().len(), 4, "one 401, one retry");
    // A token nobody accepts: denied after one retry.
    *s.tokens.lock().unwrap() = Vec::new();
    let e = p.get("db-creds#password").await.unwrap_err();
    assert_eq!(e.kind(), "denied", "{e}");
    assert_eq!(s.server.seen().len(), 6);
    assert_clean(&e);
}

#[test]
fn settings_from_the_in_cluster_environment() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("token"), TOKEN).unwrap();
    std::fs::write(dir.path().join("namespace"), "from-file\n").unwrap();
    let env = |k: &str| match k {
        "KUBERNETES_SERVICE_HOST" => Some("10.96.0.1".to_owned()),
        "KUBERNETES_SERVICE_PORT" => Some("443".to_owned()),
        _ => None,
    };
    let builtin = KubernetesProviderConfig {
        builtin: true,
        ..KubernetesProviderConfig::default()
    };
    let p = KubernetesProvider::with_env("kubernetes", &builtin, &env, dir.path()).unwrap();
    let c = p.inner.client().unwrap();
    assert_eq!(c.base, "https://10.96.0.1:443");
    assert_eq!(c.namespace, "from-file");
    assert_eq!(c.token_file, dir.path().join("token"));
    // POD_NAMESPACE first (client-go), IPv6 hosts in brackets.
    let env6 = |k: &str| match k {
        "KUBERNETES_SERVICE_HOST" => Some("fd00::1".to_owned()),
        "KUBERNETES_SERVICE_PORT" => Some("6443".to_owned()),
        "POD_NAMESPACE" => Some("from-env".to_owned()),
        _ => None,
    };
    let p = KubernetesProvider::with_env("kubernetes", &builtin, &env6, dir.path()).unwrap();
    let c = p.inner.client().unwrap();
    assert_eq!(c.base, "https://[fd00::1]:6443");
    assert_eq!(c.namespace, "from-env");
    // No namespace anywhere: `default`.
    std::fs::remove_file(dir.path().join("namespace")).unwrap();
    let p = KubernetesProvider::with_env("kubernetes", &builtin, &env, dir.path()).unwrap();
    assert_eq!(p.inner.client().unwrap().namespace, "default");
}

#[tokio::test]
async fn missing_settings_fail_a_declared_instance_and_defer_for_the_builtin() {
    let dir = tempfile::tempdir().unwrap();
    let declared = KubernetesProviderConfig::default();
    let e = KubernetesProvider::with_env("k8s", &declared, &|_| None, dir.path())
        .err()
        .unwrap()
        .to_string();
    assert!(e.contains("providers.k8s.apiServer"), "{e}");
    let no_token = KubernetesProviderConfig {
        api_server: Some("https://127.0.0.1:6443".into()),
        ..KubernetesProviderConfig::default()
    };
    let e = format!(
        "{:#}",
        KubernetesProvider::with_env("k8s", &no_token, &|_| None, dir.path())
            .err()
            .unwrap()
    );
    assert!(e.contains("token"), "{e}");
    let builtin = KubernetesProviderConfig {
        builtin: true,
        ..KubernetesProviderConfig::default()
    };
    let p = KubernetesProvider::with_env("kubernetes", &builtin, &|_| None, dir.path()).unwrap();
    let e = p.get("a#b").await.unwrap_err();
    assert_eq!(e.kind(), "not_configured", "{e}");
}

#[test]
fn the_providers_block_and_the_builtin_instance() {
    let load =
        |text: &str| crate::config::load_str_with_env(text, &|_| None, &crate::connector::KINDS);
    let cfg = load(
        "
version: 2
providers:
  other-ns:
    type: kubernetes
    apiServer: https://kube.example.com:6443
    tokenFile: /t
    caFile: /ca
    namespace: other
    timeout: 2s
services:
  db:
    connector: pg
    listenOn: tcp://127.0.0.1:5432
    credentials:
      host: h
      username: {from: kubernetes, get: db#user}
      password: {from: other-ns, get: db#password}
",
    )
    .unwrap_or_else(|e| panic!("{e}"));
    assert!(crate::config::unsupported(&cfg).is_empty());
    let crate::config::ProviderConfig::Kubernetes(k) = &cfg.providers["other-ns"] else {
        panic!("kubernetes expected")
    };
    assert_eq!(k.namespace.as_deref(), Some("other"));
    assert_eq!(k.timeout, Some(Duration::from_secs(2)));
    assert!(matches!(
        &cfg.providers["kubernetes"],
        crate::config::ProviderConfig::Kubernetes(k) if k.builtin
    ));
    let e = load(
        "
version: 2
providers:
  k: {type: kubernetes, namespace: Not_A_Label, apiServer: 'x', timeout: 0s, token: t}
services: {}
",
    )
    .unwrap_err()
    .to_string();
    for want in [
        "providers.k.namespace: invalid namespace \"Not_A_Label\"",
        "providers.k.apiServer: invalid URL",
        "providers.k.timeout: must be more than zero",
        "providers.k.token: unknown key",
    ] {
        assert!(e.contains(want), "{want}:\n{e}");
    }
}
