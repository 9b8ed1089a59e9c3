//! Secrets tests: the providers (literal, env, file, and http against a tiny in-process
//! HTTP server), typed errors, and the store (cache, single-flight, expiry).

use std::{
    collections::{BTreeMap, HashMap},
    sync::{Arc, Mutex},
    time::Duration,
};

use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpListener,
};

use super::*;
use crate::config::{HttpProviderConfig, ProviderConfig};

const TOKEN: &str = "tok-Very-Secret-123";
const BODY_SECRET: &str = "body-Very-Secret-456";

fn text(s: &Secret) -> &str {
    s.expose_str().unwrap()
}

#[tokio::test]
async fn literal_returns_the_id() {
    let p = LiteralProvider::new("literal");
    assert_eq!(p.name(), "literal");
    assert_eq!(text(&p.get("p@ss word").await.unwrap().value), "p@ss word");
}

#[tokio::test]
async fn env_reads_variables() {
    let p = EnvProvider::new("env");
    // PATH is set for any test run; reading it needs no `set_var`.
    let path = std::env::var_os("PATH").expect("PATH is set");
    assert_eq!(
        p.get("PATH").await.unwrap().value.expose(),
        path.as_encoded_bytes()
    );
    for id in ["BROKER_TEST_SURELY_UNSET_5D04_7A1C", "", "A=B", "NUL\0"] {
        let e = p.get(id).await.unwrap_err();
        assert!(matches!(e, SecretError::NotFound { .. }), "{id:?}: {e}");
    }
}

#[tokio::test]
async fn file_reads_bytes_and_trims_one_newline() {
    let dir = tempfile::tempdir().unwrap();
    let p = FileProvider::new("file");
    for (contents, want) in [
        (&b"secret\n"[..], &b"secret"[..]),
        (b"secret\r\n", b"secret"),
        (b"secret\n\n", b"secret\n"),
        (b"secret", b"secret"),
        (b"\n", b""),
        (b"bin\x00\xff\n", b"bin\x00\xff"),
    ] {
        let f = dir.path().join("s");
        std::fs::write(&f, contents).unwrap();
        let got = p.get(f.to_str().unwrap()).await.unwrap().value;
        assert_eq!(got.expose(), want, "{contents:?}");
    }
    let missing = dir.path().join("missing");
    let e = p.get(missing.to_str().unwrap()).await.unwrap_err();
    assert!(matches!(e, SecretError::NotFound { .. }), "{e}");
    // A directory: an OS error, reported as the store failing.
    let e = p.get(dir.path().to_str().unwrap()).await.unwrap_err();
    assert!(matches!(e, SecretError::Unreachable { .. }), "{e}");
    assert!(e.to_string().contains("directory"), "{e}");
}

// ---- http ----------------------------------------------------------------------------

/// A tiny HTTP/1.1 server: one response per connection, chosen by the request path.
/// Records the `Authorization` header of every request.
struct TestServer {
    base: String,
    auth_seen: Arc<Mutex<Vec<Option<String>>>>,
}

async fn serve() -> TestServer {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    let auth_seen = Arc::new(Mutex::new(Vec::new()));
    let seen = Arc::clone(&auth_seen);
    tokio::spawn(async move {
        loop {
            let Ok((mut sock, _)) = listener.accept().await else {
                return;
            };
            let seen = Arc::clone(&seen);
            tokio::spawn(async move {
                let mut req = Vec::new();
                let mut buf = [0u8; 4096];
                while !req.windows(4).any(|w| w == b"\r\n\r\n") {
                    match sock.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => req.extend_from_slice(&buf[..n]),
                    }
                }
                let req = String::from_utf8_lossy(&req).into_owned();
                let path = req.split_whitespace().nth(1).unwrap_or("/").to_owned();
                let auth = req
                    .lines()
                    .find_map(|l| {
                        l.split_once(':')
                            .filter(|(k, _)| k.eq_ignore_ascii_case("authorization"))
                    })
                    .map(|(_, v)| v.trim().to_owned());
                seen.lock().unwrap().push(auth.clone());
                let json = format!(
                    r#"{{"data":{{"password":"{BODY_SECRET}","n":5,"ok":true,"list":["a","b"],"obj":{{"k":"v"}}}},"nil":null}}"#
                );
                let (status, body, length): (&str, Vec<u8>, bool) = match path.as_str() {
                    "/raw" => ("200 OK", format!("{BODY_SECRET}\n").into_bytes(), true),
                    "/v1/secrets/db/password" => ("200 OK", b"from-base\r\n".to_vec(), true),
                    "/json" => ("200 OK", json.into_bytes(), true),
                    "/notjson" => ("200 OK", BODY_SECRET.as_bytes().to_vec(), true),
                    "/missing" => (
                        "404 Not Found",
                        format!("no {BODY_SECRET}").into_bytes(),
                        true,
                    ),
                    "/boom" => (
                        "500 Internal Server Error",
                        format!("stack trace {BODY_SECRET}").into_bytes(),
                        true,
                    ),
                    "/big" => ("200 OK", vec![b'x'; 2 * 1024 * 1024], true),
                    // No Content-Length: the body ends when the connection closes.
                    "/big-stream" => ("200 OK", vec![b'y'; 1024 * 1024 + 1], false),
                    "/exact" => ("200 OK", vec![b'z'; 1024 * 1024], false),
                    "/auth" if auth.as_deref() == Some(&format!("Bearer {TOKEN}")) => {
                        ("200 OK", b"authorized".to_vec(), true)
                    }
                    "/auth" => ("401 Unauthorized", b"who are you".to_vec(), true),
                    // The reply of a redirect names where the value would be.
                    "/moved" => ("302 Found", format!("see {BODY_SECRET}").into_bytes(), true),
                    "/slow" => {
                        tokio::time::sleep(Duration::from_secs(10)).await;
                        ("200 OK", b"late".to_vec(), true)
                    }
                    _ => ("404 Not Found", Vec::new(), true),
                };
                let mut head = format!("HTTP/1.1 {status}\r\nConnection: close\r\n");
                if path == "/moved" {
                    head.push_str("Location: /raw\r\n");
                }
                if length {
                    head.push_str(&format!("Content-Length: {}\r\n", body.len()));
                }
                head.push_str("\r\n");
                let _ = sock.write_all(head.as_bytes()).await;
                let _ = sock.write_all(&body).await;
                let _ = sock.shutdown().await;
            });
        }
    });
    TestServer { base, auth_seen }
}

fn http(base_url: Option<&str>, token: Option<&str>) -> HttpProvider {
    HttpProvider::new(
        "uts",
        &HttpProviderConfig {
            base_url: base_url.map(str::to_owned),
            token: token.map(Secret::from_str_value),
            timeout: Duration::from_secs(5),
            ..HttpProviderConfig::default()
        },
    )
    .unwrap()
}

#[track_caller]
fn assert_clean(e: &SecretError) {
    let s = format!("{e} {e:?}");
    assert!(!s.contains(TOKEN), "token leaked: {s}");
    assert!(!s.contains(BODY_SECRET), "body leaked: {s}");
}

#[tokio::test]
async fn http_raw_body_and_json_fields() {
    let srv = serve().await;
    let p = http(Some(&srv.base), Some(TOKEN));

    // Relative to baseUrl; raw body with one trailing newline trimmed.
    assert_eq!(text(&p.get("raw").await.unwrap().value), BODY_SECRET);
    // Absolute URL.
    assert_eq!(
        text(&p.get(&format!("{}/raw", srv.base)).await.unwrap().value),
        BODY_SECRET
    );
    // JSON fields, dotted paths, array indexes, non-strings as text.
    assert_eq!(
        text(&p.get("json#data.password").await.unwrap().value),
        BODY_SECRET
    );
    assert_eq!(text(&p.get("/json#data.n").await.unwrap().value), "5");
    assert_eq!(text(&p.get("json#data.ok").await.unwrap().value), "true");
    assert_eq!(text(&p.get("json#data.list.1").await.unwrap().value), "b");
    assert_eq!(
        text(&p.get("json#data.obj").await.unwrap().value),
        r#"{"k":"v"}"#
    );
    // An empty `#` is the raw body.
    assert_eq!(text(&p.get("raw#").await.unwrap().value), BODY_SECRET);

    for (id, needle) in [
        ("json#data.nope", "field `data.nope` is not in the reply"),
        ("json#data.list.7", "field `data.list.7`"),
        ("json#nil", "field `nil` is null"),
        ("notjson#password", "not JSON"),
    ] {
        let e = p.get(id).await.unwrap_err();
        assert!(matches!(e, SecretError::BadReply { .. }), "{id}: {e}");
        assert!(e.to_string().contains(needle), "{id}: {e}");
        assert_clean(&e);
    }

    // Every request carried the bearer token.
    let seen = srv.auth_seen.lock().unwrap().clone();
    assert!(!seen.is_empty());
    assert!(
        seen.iter()
            .all(|a| a.as_deref() == Some(&format!("Bearer {TOKEN}"))),
        "{seen:?}"
    );
}

#[tokio::test]
async fn http_base_url_joining() {
    let srv = serve().await;
    for base in [format!("{}/v1/", srv.base), format!("{}/v1", srv.base)] {
        let p = http(Some(&base), None);
        assert_eq!(
            text(&p.get("secrets/db/password").await.unwrap().value),
            "from-base"
        );
        assert_eq!(
            text(&p.get("/secrets/db/password").await.unwrap().value),
            "from-base"
        );
    }
    let p = http(None, None);
    let e = p.get("secrets/db/password").await.unwrap_err();
    assert!(matches!(e, SecretError::BadId { .. }), "{e}");
    assert!(e.to_string().contains("baseUrl"), "{e}");
}

#[tokio::test]
async fn http_status_codes() {
    let srv = serve().await;
    let p = http(Some(&srv.base), Some(TOKEN));

    let e = p.get("missing").await.unwrap_err();
    assert!(matches!(e, SecretError::NotFound { .. }), "{e}");
    assert_clean(&e);

    let e = p.get("boom").await.unwrap_err();
    assert!(matches!(e, SecretError::Unreachable { .. }), "{e}");
    assert!(e.to_string().contains("500"), "{e}");
    assert_clean(&e);

    // Bearer token checked by the server.
    assert_eq!(text(&p.get("auth").await.unwrap().value), "authorized");
    let anonymous = http(Some(&srv.base), None);
    let e = anonymous.get("auth").await.unwrap_err();
    assert!(matches!(e, SecretError::Denied { .. }), "{e}");
    assert!(e.to_string().contains("401"), "{e}");
    assert_eq!(srv.auth_seen.lock().unwrap().last().unwrap(), &None);
}

#[tokio::test]
async fn http_oversized_bodies() {
    let srv = serve().await;
    let p = http(Some(&srv.base), None);
    for id in ["big", "big-stream"] {
        let e = p.get(id).await.unwrap_err();
        assert!(matches!(e, SecretError::BadReply { .. }), "{id}: {e}");
        assert!(e.to_string().contains("larger than"), "{id}: {e}");
    }
    // Exactly the limit is fine.
    assert_eq!(p.get("exact").await.unwrap().value.len(), http::MAX_BODY);
}

#[tokio::test]
async fn http_timeout_and_connection_errors() {
    let srv = serve().await;
    let p = HttpProvider::new(
        "uts",
        &HttpProviderConfig {
            base_url: Some(srv.base.clone()),
            timeout: Duration::from_millis(300),
            ..HttpProviderConfig::default()
        },
    )
    .unwrap();
    let started = std::time::Instant::now();
    let e = p.get("slow").await.unwrap_err();
    assert!(started.elapsed() < Duration::from_secs(5));
    assert!(matches!(e, SecretError::Timeout { .. }), "{e}");
    assert!(e.to_string().contains("timed out"), "{e}");

    // Nothing listens on this port any more.
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap();
    drop(l);
    let e = p.get(&format!("http://{addr}/x")).await.unwrap_err();
    assert!(matches!(e, SecretError::Unreachable { .. }), "{e}");
}

#[tokio::test]
async fn build_all_creates_every_built_instance() {
    let dir = tempfile::tempdir().unwrap();
    let token_file = dir.path().join("token");
    std::fs::write(&token_file, format!("{TOKEN}\n")).unwrap();
    let srv = serve().await;

    let mut configs = BTreeMap::new();
    configs.insert("literal".to_owned(), ProviderConfig::Literal);
    configs.insert("env".to_owned(), ProviderConfig::Env);
    configs.insert("file".to_owned(), ProviderConfig::File);
    configs.insert(
        "uts".to_owned(),
        ProviderConfig::Http(HttpProviderConfig {
            base_url: Some(srv.base.clone()),
            token_file: Some(token_file.clone()),
            ..HttpProviderConfig::default()
        }),
    );
    configs.insert(
        "vault".to_owned(),
        ProviderConfig::NotBuilt {
            kind: "vault".to_owned(),
        },
    );
    let all = build_all(&configs).unwrap();
    let mut names: Vec<&str> = all.keys().map(String::as_str).collect();
    names.sort_unstable();
    assert_eq!(names, ["env", "file", "literal", "uts"]);
    for (name, p) in &all {
        assert_eq!(p.name(), name);
    }
    // The token read from tokenFile (newline trimmed) is sent.
    assert_eq!(
        text(&all["uts"].get("auth").await.unwrap().value),
        "authorized"
    );

    // Unreadable files fail the build, naming the instance and the file.
    let bad = |cfg: HttpProviderConfig| {
        let mut c = BTreeMap::new();
        c.insert("uts".to_owned(), ProviderConfig::Http(cfg));
        match build_all(&c) {
            Ok(_) => panic!("built"),
            Err(e) => format!("{e:#}"),
        }
    };
    let e = bad(HttpProviderConfig {
        token_file: Some(dir.path().join("nope")),
        ..HttpProviderConfig::default()
    });
    assert!(
        e.contains("uts") && e.contains("tokenFile") && e.contains("nope"),
        "{e}"
    );
    let e = bad(HttpProviderConfig {
        ca_file: Some(dir.path().join("ca.pem")),
        ..HttpProviderConfig::default()
    });
    assert!(e.contains("caFile") && e.contains("ca.pem"), "{e}");
    let not_pem = dir.path().join("not.pem");
    std::fs::write(&not_pem, "hello").unwrap();
    let e = bad(HttpProviderConfig {
        ca_file: Some(not_pem),
        ..HttpProviderConfig::default()
    });
    assert!(e.contains("not.pem"), "{e}");
    let e = bad(HttpProviderConfig {
        token: Some(Secret::from_str_value("bad\ntoken")),
        ..HttpProviderConfig::default()
    });
    assert!(e.contains("header") && !e.contains("bad\ntoken"), "{e}");
}

#[tokio::test]
async fn build_all_from_a_loaded_config() {
    let cfg = crate::config::load_str_with_env(
        "
version: 2
providers:
  http: {token: abc}
services:
  db:
    connector: pg
    listenOn: tcp://127.0.0.1:5432
    credentials:
      host: h
      username: {from: env, get: U}
      password: {from: vault, get: kv/db#password}
",
        &|_| None,
        &crate::connector::KINDS,
    )
    .unwrap();
    let all = build_all(&cfg.providers).unwrap();
    let mut names: Vec<&str> = all.keys().map(String::as_str).collect();
    names.sort_unstable();
    assert_eq!(
        names,
        [
            "aws",
            "conjur",
            "env",
            "file",
            "http",
            "kubernetes",
            "literal",
            "vault"
        ]
    );
}

#[tokio::test]
async fn http_redirects_are_errors_not_followed() {
    let srv = serve().await;
    let p = http(Some(&srv.base), Some(TOKEN));
    let e = p.get("moved").await.unwrap_err();
    assert!(matches!(e, SecretError::BadReply { .. }), "{e}");
    assert!(
        e.to_string().contains("302") && e.to_string().contains("redirects are not followed"),
        "{e}"
    );
    assert_clean(&e);
    // The target was never asked for.
    assert_eq!(srv.auth_seen.lock().unwrap().len(), 1);
}

#[test]
fn ids_are_redacted_for_printing() {
    for (id, want) in [
        ("db/password", "db/password"),
        ("/run/secrets/pw", "/run/secrets/pw"),
        (
            "http://user:pass@host:8080/x/y?token=abc#data.pw",
            "http://***@host:8080/x/y?***#data.pw",
        ),
        ("https://host/x?token=abc", "https://host/x?***"),
        ("https://u@host", "https://***@host"),
        ("https://host/a@b", "https://host/a@b"),
        ("db/pw?version=2", "db/pw?***"),
    ] {
        assert_eq!(redact_id(id), want, "{id}");
    }
    let e = SecretError::NotFound {
        provider: "uts".into(),
        id: "http://user:hunter2@host/x?token=abc".into(),
    };
    assert_eq!(e.to_string(), "uts: `http://***@host/x?***` not found");
}

#[test]
fn error_kinds_are_stable_words_and_messages_name_no_value() {
    let (provider, id) = ("uts".to_owned(), "http://u:pw-in-url@h/x?t=1".to_owned());
    let reason = "r".to_owned();
    let cases = [
        (
            SecretError::NotConfigured {
                provider: provider.clone(),
                id: id.clone(),
            },
            "not_configured",
        ),
        (
            SecretError::NotFound {
                provider: provider.clone(),
                id: id.clone(),
            },
            "not_found",
        ),
        (
            SecretError::Unreachable {
                provider: provider.clone(),
                id: id.clone(),
                reason: reason.clone(),
            },
            "unreachable",
        ),
        (
            SecretError::Denied {
                provider: provider.clone(),
                id: id.clone(),
                reason: reason.clone(),
            },
            "denied",
        ),
        (
            SecretError::BadReply {
                provider: provider.clone(),
                id: id.clone(),
                reason: reason.clone(),
            },
            "bad_reply",
        ),
        (
            SecretError::BadId {
                provider: provider.clone(),
                id: id.clone(),
                reason,
            },
            "bad_id",
        ),
        (
            SecretError::Empty {
                provider: provider.clone(),
                id: id.clone(),
            },
            "empty",
        ),
        (
            SecretError::Timeout {
                provider,
                id,
                after: Duration::from_secs(1),
            },
            "timeout",
        ),
    ];
    for (e, kind) in cases {
        assert_eq!(e.kind(), kind);
        assert_eq!(e.provider(), "uts");
        let text = e.to_string();
        assert!(text.contains("http://***@h/x?***"), "{text}");
        assert!(!text.contains("pw-in-url"), "{text}");
        let c = CredentialError {
            credential: "password".into(),
            source: e,
        };
        assert!(c.to_string().starts_with("credential `password`: "), "{c}");
        assert_eq!(c.kind(), kind);
    }
}

// ---- the store: cache, single-flight, expiry --------------------------------------

/// A provider that counts its calls; each takes `delay`, then returns `v<n>` (n = the
/// call number), or fails while `failing` is set.
struct Counting {
    calls: std::sync::atomic::AtomicUsize,
    failing: std::sync::atomic::AtomicBool,
    delay: Duration,
    expires_in: Option<Duration>,
}

impl Counting {
    fn new(delay: Duration, expires_in: Option<Duration>) -> Arc<Self> {
        Arc::new(Self {
            calls: 0.into(),
            failing: false.into(),
            delay,
            expires_in,
        })
    }

    fn calls(&self) -> usize {
        self.calls.load(std::sync::atomic::Ordering::SeqCst)
    }
}

impl SecretProvider for Counting {
    fn name(&self) -> &str {
        "count"
    }

    fn get<'a>(&'a self, id: &'a str) -> BoxFuture<'a, Result<Fetched, SecretError>> {
        Box::pin(async move {
            let n = self.calls.fetch_add(1, std::sync::atomic::Ordering::SeqCst) + 1;
            tokio::time::sleep(self.delay).await;
            if self.failing.load(std::sync::atomic::Ordering::SeqCst) {
                return Err(SecretError::Unreachable {
                    provider: "count".into(),
                    id: id.to_owned(),
                    reason: "HTTP status 503 Service Unavailable".into(),
                });
            }
            Ok(Fetched {
                value: Secret::from_str_value(&format!("v{n}")),
                expires_in: self.expires_in,
            })
        })
    }
}

fn store_with(p: &Arc<Counting>, ttl: Duration) -> Arc<SecretStore> {
    let mut providers: HashMap<String, Arc<dyn SecretProvider>> = HashMap::new();
    providers.insert("count".into(), Arc::clone(p) as Arc<dyn SecretProvider>);
    Arc::new(SecretStore::with_providers(providers, ttl))
}

/// A `tcp` service whose `password` comes from `count:db/pw`, plus a literal `host`.
fn counted_service() -> Service {
    let mut credentials = BTreeMap::new();
    credentials.insert(
        "host".to_owned(),
        CredentialSource::Literal(Secret::from_str_value("127.0.0.1")),
    );
    credentials.insert(
        "password".to_owned(),
        CredentialSource::Provider {
            provider: "count".into(),
            id: "db/pw".into(),
        },
    );
    Service {
        name: "db".into(),
        connector: crate::config::ConnectorSpec::built(
            "tcp",
            crate::connector::tcp::TcpConfig::default(),
        ),
        listen_on: None,
        intercept: vec![],
        credentials,
        authentication: vec![],
        cache: crate::config::CacheOverride::default(),
        unix_socket: crate::config::UnixSocketOptions::default(),
        policy: crate::policy::Spec::default(),
    }
}

async fn password(
    store: &SecretStore,
    service: &Service,
    fresh: bool,
) -> Result<String, CredentialError> {
    let mut fetched = Vec::new();
    let c = store
        .credentials(Requester::new(service, None), fresh, &mut fetched)
        .await?;
    assert_eq!(fetched, ["password<-count:db/pw"]);
    assert_eq!(format!("{c:?}"), r#"{"host", "password"}"#);
    Ok(c.text("password").unwrap().unwrap().to_owned())
}

/// 50 concurrent requests for one service while the value is not cached: one provider
/// call, everyone gets its value; later requests are served from the cache.
#[tokio::test(start_paused = true)]
async fn concurrent_requests_share_one_fetch() {
    let p = Counting::new(Duration::from_millis(100), None);
    let store = store_with(&p, Duration::from_secs(60));
    let service = Arc::new(counted_service());
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..50 {
        let (store, service) = (Arc::clone(&store), Arc::clone(&service));
        tasks.spawn(async move { password(&store, &service, false).await.unwrap() });
    }
    let got = tasks.join_all().await;
    assert_eq!(got.len(), 50);
    assert!(got.iter().all(|v| v == "v1"), "{got:?}");
    assert_eq!(p.calls(), 1);
    assert_eq!(store.cached(), 1);
    assert_eq!(password(&store, &service, false).await.unwrap(), "v1");
    assert_eq!(p.calls(), 1, "served from the cache");
}

/// `fresh` forces a new fetch; concurrent fresh requests share it, and its value
/// replaces the cached one.
#[tokio::test(start_paused = true)]
async fn fresh_requests_fetch_again_and_share_that_fetch() {
    let p = Counting::new(Duration::from_millis(100), None);
    let store = store_with(&p, Duration::from_secs(60));
    let service = Arc::new(counted_service());
    assert_eq!(password(&store, &service, false).await.unwrap(), "v1");
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..20 {
        let (store, service) = (Arc::clone(&store), Arc::clone(&service));
        tasks.spawn(async move { password(&store, &service, true).await.unwrap() });
    }
    let got = tasks.join_all().await;
    assert!(got.iter().all(|v| v == "v2"), "{got:?}");
    assert_eq!(p.calls(), 2);
    assert_eq!(password(&store, &service, false).await.unwrap(), "v2");
    assert_eq!(p.calls(), 2);
}

/// A failure reaches every request that waited for it and is not cached: the next
/// request asks the provider again.
#[tokio::test(start_paused = true)]
async fn a_failed_fetch_is_shared_but_not_cached() {
    let p = Counting::new(Duration::from_millis(100), None);
    p.failing.store(true, std::sync::atomic::Ordering::SeqCst);
    let store = store_with(&p, Duration::from_secs(60));
    let service = Arc::new(counted_service());
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..10 {
        let (store, service) = (Arc::clone(&store), Arc::clone(&service));
        tasks.spawn(async move { password(&store, &service, false).await.unwrap_err() });
    }
    for e in tasks.join_all().await {
        assert_eq!(e.credential, "password");
        assert_eq!(e.kind(), "unreachable");
        assert!(e.to_string().contains("503"), "{e}");
    }
    assert_eq!(p.calls(), 1);
    assert_eq!(store.cached(), 0);
    p.failing.store(false, std::sync::atomic::Ordering::SeqCst);
    assert_eq!(password(&store, &service, false).await.unwrap(), "v2");
    assert_eq!(p.calls(), 2);
}

/// A request whose task is dropped while it runs the fetch does not strand the others:
/// one of them fetches instead.
#[tokio::test(start_paused = true)]
async fn a_cancelled_fetcher_hands_over_to_a_waiter() {
    let p = Counting::new(Duration::from_millis(100), None);
    let store = store_with(&p, Duration::from_secs(60));
    let service = Arc::new(counted_service());
    let first = {
        let (store, service) = (Arc::clone(&store), Arc::clone(&service));
        tokio::spawn(async move { password(&store, &service, false).await })
    };
    tokio::time::sleep(Duration::from_millis(10)).await;
    let second = {
        let (store, service) = (Arc::clone(&store), Arc::clone(&service));
        tokio::spawn(async move { password(&store, &service, false).await })
    };
    tokio::time::sleep(Duration::from_millis(10)).await;
    first.abort();
    assert_eq!(second.await.unwrap().unwrap(), "v2");
    assert_eq!(p.calls(), 2);
    assert_eq!(password(&store, &service, false).await.unwrap(), "v2");
    assert_eq!(p.calls(), 2);
}

/// The provider's expiry, shorter than the TTL, is honoured: the value is fetched again
/// after it, and the sweeper evicts it on time; a longer one is capped by the TTL.
#[tokio::test(start_paused = true)]
async fn a_provider_expiry_shorter_than_the_ttl_is_honoured() {
    let p = Counting::new(Duration::ZERO, Some(Duration::from_secs(5)));
    let store = store_with(&p, Duration::from_secs(60));
    tokio::spawn(store.sweeper());
    let service = counted_service();
    assert_eq!(password(&store, &service, false).await.unwrap(), "v1");
    tokio::time::sleep(Duration::from_millis(4_900)).await;
    assert_eq!(password(&store, &service, false).await.unwrap(), "v1");
    assert_eq!(store.cached(), 1);
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(store.cached(), 0, "evicted at 5 s, not at the 60 s TTL");
    assert_eq!(password(&store, &service, false).await.unwrap(), "v2");
    assert_eq!(p.calls(), 2);

    let p = Counting::new(Duration::ZERO, Some(Duration::from_secs(600)));
    let store = store_with(&p, Duration::from_secs(10));
    assert_eq!(password(&store, &service, false).await.unwrap(), "v1");
    tokio::time::sleep(Duration::from_millis(10_100)).await;
    assert_eq!(password(&store, &service, false).await.unwrap(), "v2");
}

/// With a TTL of zero nothing is cached.
#[tokio::test(start_paused = true)]
async fn a_zero_ttl_caches_nothing() {
    let p = Counting::new(Duration::ZERO, None);
    let store = store_with(&p, Duration::ZERO);
    let service = counted_service();
    assert_eq!(password(&store, &service, false).await.unwrap(), "v1");
    assert_eq!(password(&store, &service, false).await.unwrap(), "v2");
    assert_eq!(store.cached(), 0);
}

/// A provider that never answers is cut off after [`FETCH_TIMEOUT`].
#[tokio::test(start_paused = true)]
async fn a_fetch_that_never_ends_times_out() {
    let p = Counting::new(Duration::from_secs(3600), None);
    let store = store_with(&p, Duration::from_secs(60));
    let e = password(&store, &counted_service(), false)
        .await
        .unwrap_err();
    assert_eq!(e.kind(), "timeout");
    assert!(e.to_string().contains("timed out after 15s"), "{e}");
}

#[tokio::test]
async fn an_unknown_provider_is_not_configured() {
    let store = SecretStore::with_providers(HashMap::new(), Duration::from_secs(60));
    let e = store.fetch("vault", "kv/db", false).await.unwrap_err();
    assert_eq!(e.kind(), "not_configured");
    assert!(e.to_string().contains("`vault`"), "{e}");
}

fn env_store(ttl: Duration) -> Arc<SecretStore> {
    let mut providers = BTreeMap::new();
    providers.insert("env".to_owned(), ProviderConfig::Env);
    providers.insert("file".to_owned(), ProviderConfig::File);
    Arc::new(
        SecretStore::new(&Config {
            services: vec![],
            providers,
            broker: crate::config::BrokerSettings {
                cache_ttl: ttl,
                ..crate::config::BrokerSettings::default()
            },
            fetch_policies: BTreeMap::new(),
            warnings: Vec::new(),
        })
        .unwrap(),
    )
}

#[tokio::test(start_paused = true)]
async fn expired_entries_are_evicted_on_time_without_a_read() {
    let s = env_store(Duration::from_secs(10));
    tokio::spawn(s.sweeper());
    // PATH is set in any test run.
    s.fetch("env", "PATH", false).await.unwrap();
    tokio::time::sleep(Duration::from_secs(5)).await;
    s.fetch("env", "HOME", false).await.unwrap();
    assert_eq!(s.cached(), 2);
    tokio::time::sleep(Duration::from_millis(5_100)).await;
    assert_eq!(s.cached(), 1, "PATH expired at 10 s");
    tokio::time::sleep(Duration::from_secs(5)).await;
    assert_eq!(s.cached(), 0, "HOME expired at 15 s");
    // The sweeper ends with the store.
    let weak = Arc::downgrade(&s.cache);
    drop(s);
    tokio::time::sleep(Duration::from_secs(20)).await;
    assert!(weak.upgrade().is_none());
}

#[tokio::test]
async fn an_empty_value_is_an_error_naming_the_id() {
    let dir = tempfile::tempdir().unwrap();
    let s = env_store(Duration::from_secs(60));
    let path = dir.path().join("empty");
    std::fs::write(&path, "\n").unwrap();
    let e = s
        .fetch("file", path.to_str().unwrap(), false)
        .await
        .unwrap_err();
    assert_eq!(e.kind(), "empty");
    assert!(e.to_string().ends_with("` is empty"), "{e}");
}

/// A 404 from the secret store reaches the connector as `credentials_error`, with
/// `not_found` as its detail for the access log; neither the body nor the token shows.
#[tokio::test]
async fn a_404_is_a_credentials_error_with_detail_not_found() {
    use crate::connector::{ConnError, ConnStats};
    let srv = serve().await;
    let cfg = crate::config::load_str_with_env(
        &format!(
            "
version: 2
providers:
  uts: {{type: http, baseUrl: \"{}\", token: {TOKEN}}}
services:
  web:
    connector: tcp
    listenOn: tcp://127.0.0.1:5432
    credentials:
      host: 127.0.0.1
      password: {{from: uts, get: missing}}
",
            srv.base
        ),
        &|_| None,
        &crate::connector::KINDS,
    )
    .unwrap();
    let env = crate::connector::Env {
        secrets: Arc::new(super::SecretStore::new(&cfg).unwrap()),
        dialer: crate::connector::dial::Dialer { mark: 0 },
        ca: None,
    };
    let mut stats = ConnStats::default();
    let e = env
        .credentials(Requester::new(&cfg.services[0], None), false, &mut stats)
        .await
        .unwrap_err();
    assert!(matches!(e, ConnError::Credentials(_)), "{e}");
    assert_eq!(e.kind(), "credentials_error");
    assert_eq!(e.detail(), Some("not_found"));
    assert_eq!(
        e.to_string(),
        "fetching credentials failed: credential `password`: uts: `missing` not found"
    );
    assert_eq!(stats.fetched, ["password<-uts:missing"]);
    let text = format!("{e} {e:?}");
    assert!(
        !text.contains(TOKEN) && !text.contains(BODY_SECRET),
        "{text}"
    );
    // Other errors have no detail.
    assert_eq!(ConnError::Config("x".into()).detail(), None);
}
