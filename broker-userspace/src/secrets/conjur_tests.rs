//! Unit tests of the `conjur` provider: id and URL rules, token parsing, and the
//! provider against a small in-process HTTP server that answers as the handler says.
//! The daemon-level tests (tests/tests/store_conjur.rs) use the full fake Conjur.

use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
    time::Duration,
};

use base64::Engine as _;
use tokio::{
    io::{AsyncReadExt as _, AsyncWriteExt as _},
    net::TcpListener,
};

use super::*;

const API_KEY: &str = "conjur-unit-api-key-5e1d";
const VALUE: &str = "conjur-unit-value-8a7f";
const ACCOUNT: &str = "acct";

// ---- ids, URLs, tokens ------------------------------------------------------------------

#[test]
fn ids_follow_conjur_api_go_make_full_id() {
    let cases = [
        ("prod/db/password", "prod/db/password"),
        ("variable:prod/db", "prod/db"),
        ("acct:variable:prod/db", "prod/db"),
        // Another account, or a first part that is not `variable`: the id as written.
        ("other:variable:x", "other:variable:x"),
        ("db:password", "db:password"),
        ("a:b:c:d", "a:b:c:d"),
        ("variable:a:b", "variable:a:b"),
        ("acct:variable:a:b", "a:b"),
        // Already encoded, as the REST API docs print ids.
        ("prod%2Fdb%2Fpassword", "prod/db/password"),
        ("prod%2fdb%20pw", "prod/db pw"),
        ("acct:variable:prod%2Fdb", "prod/db"),
        // Not an encoded id: a literal `%`.
        ("100%", "100%"),
        ("a%2Fb/c", "a%2Fb/c"),
        ("a%2Fb%zz", "a%2Fb%zz"),
        ("50%off", "50%off"),
    ];
    for (id, want) in cases {
        assert_eq!(identifier(id, ACCOUNT), want, "{id}");
    }
}

#[test]
fn identifiers_are_one_path_segment() {
    assert_eq!(
        encode_segment("prod/db password:x@y"),
        "prod%2Fdb%20password:x@y"
    );
    assert_eq!(
        encode_segment("a+b,c;d?e#f%g&h=i$j"),
        "a%2Bb%2Cc%3Bd%3Fe%23f%25g%26h%3Di%24j"
    );
    assert_eq!(encode_segment("é-_.~"), "%C3%A9-_.~");
    assert_eq!(encode_segment("host/app/x"), "host%2Fapp%2Fx");
}

#[test]
fn saas_urls_get_their_api_prefix() {
    assert_eq!(
        normalize_base("https://conjur.example.com/").as_deref(),
        Some("https://conjur.example.com")
    );
    assert_eq!(
        normalize_base("https://acme.secretsmgr.cyberark.cloud").as_deref(),
        Some("https://acme.secretsmgr.cyberark.cloud/api")
    );
    assert_eq!(
        normalize_base("https://acme.secretsmgr.cyberark.cloud/api/").as_deref(),
        Some("https://acme.secretsmgr.cyberark.cloud/api")
    );
    assert_eq!(normalize_base("ftp://x"), None);
    assert_eq!(normalize_base("not a url"), None);
}

/// A token as Conjur issues it, with `iat` and (optionally) `exp` in its payload.
fn token_json(iat: u64, exp: Option<u64>, tag: &str) -> String {
    let b64 = |s: &str| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(s);
    let payload = match exp {
        Some(e) => format!(r#"{{"sub":"host/app","iat":{iat},"exp":{e}}}"#),
        None => format!(r#"{{"sub":"host/app","iat":{iat}}}"#),
    };
    format!(
        r#"{{"protected":"{}","payload":"{}","signature":"{}"}}"#,
        b64(r#"{"alg":"conjur.org/slosilo/v2","kid":"k"}"#),
        base64::engine::general_purpose::STANDARD.encode(payload),
        b64(tag)
    )
}

fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

#[test]
fn tokens_are_parsed_for_their_lifetime_and_header() {
    let json = token_json(1000, Some(1300), "sig");
    let t = parse_token(json.as_bytes()).unwrap();
    assert_eq!(t.lifetime, Duration::from_secs(300));
    assert_eq!(t.json.expose(), json.as_bytes());
    let want = format!(
        "Token token=\"{}\"",
        base64::engine::general_purpose::STANDARD.encode(&json)
    );
    assert_eq!(t.header.to_str().unwrap(), want);
    assert!(t.header.is_sensitive());
    // No `exp`: Conjur's 8 minutes.
    let t = parse_token(token_json(1000, None, "s").as_bytes()).unwrap();
    assert_eq!(t.lifetime, DEFAULT_TOKEN_LIFETIME);
    // The base64 form (`Accept-Encoding: base64`, some sidecars), with a newline.
    let b64 = format!(
        "{}\n",
        base64::engine::general_purpose::STANDARD.encode(&json)
    );
    let t = parse_token(b64.as_bytes()).unwrap();
    assert_eq!(t.json.expose(), json.as_bytes());
    for bad in [
        &b"<html>nope</html>"[..],
        b"{\"protected\":\"a\"}",
        b"{\"protected\":1,\"payload\":\"a\",\"signature\":\"b\"}",
        b"",
        b"[1,2]",
    ] {
        assert!(parse_token(bad).is_err(), "{bad:?}");
    }
}

#[test]
fn batch_replies_are_string_maps() {
    let m = parse_batch(br#"{"a:variable:x":"1","a:variable:y z":"2"}"#).unwrap();
    assert_eq!(m["a:variable:y z"].as_str(), "2");
    assert!(parse_batch(br#"{"a:variable:x":1}"#).is_err());
    assert!(parse_batch(b"[]").is_err());
    assert!(parse_batch(b"<html>").is_err());
    // Truncated.
    assert!(parse_batch(br#"{"a:variable:x":"1","a:variable:y"#).is_err());
}

// ---- a scripted server --------------------------------------------------------------------

/// One request as the server saw it.
#[derive(Debug, Clone)]
struct Req {
    method: String,
    /// Path and query, as sent.
    target: String,
    headers: HashMap<String, String>,
    body: Vec<u8>,
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

    fn count(&self, pred: impl Fn(&Req) -> bool) -> usize {
        self.seen().iter().filter(|r| pred(r)).count()
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
                let head_end = loop {
                    if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                        break i + 4;
                    }
                    match sock.read(&mut chunk).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => buf.extend_from_slice(&chunk[..n]),
                    }
                };
                let head = String::from_utf8_lossy(&buf[..head_end]).into_owned();
                let mut lines = head.split("\r\n");
                let mut first = lines.next().unwrap_or("").split(' ');
                let method = first.next().unwrap_or("").to_owned();
                let target = first.next().unwrap_or("").to_owned();
                let headers: HashMap<String, String> = lines
                    .filter_map(|l| l.split_once(':'))
                    .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_owned()))
                    .collect();
                let len: usize = headers
                    .get("content-length")
                    .and_then(|v| v.parse().ok())
                    .unwrap_or(0);
                let mut body = buf[head_end..].to_vec();
                while body.len() < len {
                    match sock.read(&mut chunk).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => body.extend_from_slice(&chunk[..n]),
                    }
                }
                let req = Req {
                    method,
                    target,
                    headers,
                    body,
                };
                seen.lock().unwrap().push(req.clone());
                let (status, body) = handler(&req);
                if status == 999 {
                    // Never answer.
                    tokio::time::sleep(Duration::from_secs(30)).await;
                    return;
                }
                let head = format!(
                    "HTTP/1.1 {status} X\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
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

fn is_authn(r: &Req) -> bool {
    r.method == "POST" && r.target.ends_with("/authenticate")
}

/// The token a request carried, decoded (`Token token="<base64>"`).
fn token_of(r: &Req) -> Option<String> {
    let h = r.headers.get("authorization")?;
    let b64 = h.strip_prefix("Token token=\"")?.strip_suffix('"')?;
    let raw = base64::engine::general_purpose::STANDARD.decode(b64).ok()?;
    String::from_utf8(raw).ok()
}

/// A provider for `server` with API-key authentication as `host/app/x`.
fn api_key_provider(server: &Server) -> ConjurProvider {
    let cfg = ConjurProviderConfig {
        appliance_url: Some(server.base.clone()),
        account: Some(ACCOUNT.into()),
        login: Some("host/app/x".into()),
        api_key: Some(Secret::from_str_value(API_KEY)),
        timeout: Some(Duration::from_secs(2)),
        ..ConjurProviderConfig::default()
    };
    ConjurProvider::with_env("conjur", &cfg, &|_| None).unwrap()
}

#[track_caller]
fn assert_clean(e: &SecretError) {
    let s = format!("{e} {e:?}");
    for needle in [API_KEY, VALUE, "signature", "protected"] {
        assert!(!s.contains(needle), "leak of {needle}: {s}");
    }
}

/// Answers like Conjur: authenticate with the API key issues token N (a lifetime of
/// `lifetime_s`); a variable read with a token of `valid` gets VALUE.
fn conjur_like(lifetime_s: u64) -> (Arc<Handler>, Arc<Mutex<Vec<String>>>) {
    let issued = Arc::new(Mutex::new(Vec::<String>::new()));
    let valid = Arc::clone(&issued);
    let h: Arc<Handler> = Arc::new(move |r: &Req| {
        if is_authn(r) {
            if r.body != API_KEY.as_bytes() {
                return (401, Vec::new());
            }
            let mut v = valid.lock().unwrap();
            let now = now_secs();
            let t = token_json(now, Some(now + lifetime_s), &format!("t{}", v.len()));
            v.push(t.clone());
            return (200, t.into_bytes());
        }
        match token_of(r) {
            Some(t) if valid.lock().unwrap().contains(&t) => (200, VALUE.as_bytes().to_vec()),
            _ => (401, Vec::new()),
        }
    });
    (h, issued)
}

#[tokio::test]
async fn api_key_authentication_then_one_encoded_segment_per_variable() {
    let (h, _) = conjur_like(480);
    let server = serve(h).await;
    let p = api_key_provider(&server);
    let got = p.get("prod/db password:main").await.unwrap();
    assert_eq!(got.value.expose(), VALUE.as_bytes());
    assert_eq!(got.expires_in, None);
    let got = p.get("prod%2Fdb%2Fother").await.unwrap();
    assert_eq!(got.value.expose(), VALUE.as_bytes());
    let seen = server.seen();
    assert_eq!(seen.len(), 3, "{seen:?}");
    assert_eq!(seen[0].target, "/authn/acct/host%2Fapp%2Fx/authenticate");
    assert_eq!(seen[0].body, API_KEY.as_bytes());
    assert_eq!(
        seen[1].target,
        "/secrets/acct/variable/prod%2Fdb%20password:main"
    );
    assert_eq!(seen[2].target, "/secrets/acct/variable/prod%2Fdb%2Fother");
    assert_eq!(
        token_of(&seen[1]),
        token_of(&seen[2]),
        "the token is reused"
    );
}

#[tokio::test]
async fn a_401_renews_the_token_once_then_is_denied() {
    let (h, issued) = conjur_like(480);
    let server = serve(h).await;
    let p = api_key_provider(&server);
    p.get("a").await.unwrap();
    // The server forgets its tokens (restarted, token revoked): one renewal, one retry.
    issued.lock().unwrap().clear();
    p.get("a").await.unwrap();
    assert_eq!(server.count(is_authn), 2);

    // A server that refuses every token: one renewal, then denied.
    let refusing: Arc<Handler> = Arc::new(|r: &Req| {
        if is_authn(r) {
            (200, token_json(now_secs(), None, "x").into_bytes())
        } else {
            (401, format!("no {VALUE}").into_bytes())
        }
    });
    let server = serve(refusing).await;
    let p = api_key_provider(&server);
    let e = p.get("a").await.unwrap_err();
    assert!(matches!(e, SecretError::Denied { .. }), "{e}");
    assert_clean(&e);
    assert_eq!(server.count(is_authn), 2, "one renewal");
    assert_eq!(server.count(|r| !is_authn(r)), 2, "one retry");
}

#[tokio::test]
async fn concurrent_fetches_share_one_authentication() {
    let (h, _) = conjur_like(480);
    let server = serve(h).await;
    let p = Arc::new(api_key_provider(&server));
    let tasks: Vec<_> = (0..8)
        .map(|i| {
            let p = Arc::clone(&p);
            tokio::spawn(async move { p.get(&format!("v{i}")).await.map(|_| ()) })
        })
        .collect();
    for t in tasks {
        t.await.unwrap().unwrap();
    }
    assert_eq!(server.count(is_authn), 1);
}

#[tokio::test]
async fn the_token_is_renewed_after_three_quarters_of_its_lifetime() {
    let (h, _) = conjur_like(1);
    let server = serve(h).await;
    let p = api_key_provider(&server);
    p.get("a").await.unwrap();
    p.get("a").await.unwrap();
    assert_eq!(server.count(is_authn), 1);
    tokio::time::sleep(Duration::from_millis(800)).await;
    p.get("a").await.unwrap();
    assert_eq!(server.count(is_authn), 2, "renewed at 750 ms of 1 s");
}

#[tokio::test]
async fn failed_authentication_is_typed() {
    for (status, body, kind) in [
        (401, Vec::new(), "denied"),
        (403, Vec::new(), "denied"),
        (502, b"<html>bad gateway</html>".to_vec(), "unreachable"),
        (
            200,
            format!("<html>{VALUE}</html>").into_bytes(),
            "bad_reply",
        ),
        (200, vec![b'{'; MAX_TOKEN + 1], "bad_reply"),
        (302, Vec::new(), "bad_reply"),
    ] {
        let h: Arc<Handler> = Arc::new(move |_| (status, body.clone()));
        let server = serve(h).await;
        let e = api_key_provider(&server).get("a").await.unwrap_err();
        assert_eq!(e.kind(), kind, "{status}: {e}");
        assert!(
            e.to_string().contains("host/app/x") || kind == "bad_reply",
            "{e}"
        );
        assert_clean(&e);
    }
}

#[tokio::test]
async fn variable_statuses_are_typed() {
    for (status, body, kind) in [
        (
            404,
            br#"{"error":{"code":"not_found","message":"CONJ00076E Variable acct:variable:a is empty or not found."}}"#.to_vec(),
            "not_found",
        ),
        (403, Vec::new(), "denied"),
        (500, format!("trace {VALUE}").into_bytes(), "unreachable"),
        (429, Vec::new(), "unreachable"),
        (301, Vec::new(), "bad_reply"),
        (422, Vec::new(), "bad_reply"),
        (200, vec![b'x'; MAX_BODY + 1], "bad_reply"),
    ] {
        let h: Arc<Handler> = Arc::new(move |r| {
            if is_authn(r) {
                (200, token_json(now_secs(), None, "x").into_bytes())
            } else {
                (status, body.clone())
            }
        });
        let server = serve(h).await;
        let e = api_key_provider(&server).get("a").await.unwrap_err();
        assert_eq!(e.kind(), kind, "{status}: {e}");
        assert_clean(&e);
    }
    // No answer: a timeout, naming the id.
    let h: Arc<Handler> = Arc::new(|r| {
        if is_authn(r) {
            (200, token_json(now_secs(), None, "x").into_bytes())
        } else {
            (999, Vec::new())
        }
    });
    let server = serve(h).await;
    let e = api_key_provider(&server).get("slow/one").await.unwrap_err();
    assert_eq!(e.kind(), "timeout", "{e}");
    assert!(e.to_string().contains("slow/one"), "{e}");
    // Nobody listening.
    let cfg = ConjurProviderConfig {
        appliance_url: Some("http://127.0.0.1:1".into()),
        account: Some(ACCOUNT.into()),
        login: Some("admin".into()),
        api_key: Some(Secret::from_str_value(API_KEY)),
        ..ConjurProviderConfig::default()
    };
    let e = ConjurProvider::with_env("conjur", &cfg, &|_| None)
        .unwrap()
        .get("a")
        .await
        .unwrap_err();
    assert_eq!(e.kind(), "unreachable", "{e}");
}

/// The batch server: `GET /secrets?variable_ids=...` answered from `vars`.
fn batch_server(vars: &'static [(&'static str, &'static str)]) -> Arc<Handler> {
    Arc::new(move |r: &Req| {
        if is_authn(r) {
            return (200, token_json(now_secs(), None, "x").into_bytes());
        }
        if let Some(q) = r.target.strip_prefix("/secrets?variable_ids=") {
            let ids: String = form_urlencoded::parse(format!("v={q}").as_bytes())
                .next()
                .map(|(_, v)| v.into_owned())
                .unwrap_or_default();
            let mut out = serde_json::Map::new();
            for id in ids.split(',') {
                match vars.iter().find(|(k, _)| *k == id) {
                    Some((k, v)) => {
                        out.insert((*k).to_owned(), serde_json::Value::String((*v).to_owned()));
                    }
                    None => return (404, br#"{"error":{"code":"not_found"}}"#.to_vec()),
                }
            }
            return (200, serde_json::to_vec(&out).unwrap());
        }
        let id = r.target.trim_start_matches("/secrets/acct/variable/");
        let id = id.replace("%2F", "/").replace("%20", " ");
        match vars
            .iter()
            .find(|(k, _)| *k == format!("acct:variable:{id}"))
        {
            Some((_, v)) => (200, v.as_bytes().to_vec()),
            None => (404, Vec::new()),
        }
    })
}

#[tokio::test]
async fn get_many_is_one_batch_request() {
    static VARS: &[(&str, &str)] = &[
        ("acct:variable:db/user", "user-value"),
        ("acct:variable:db/pass word", VALUE),
        ("acct:variable:db:port", "5432"),
    ];
    let server = serve(batch_server(VARS)).await;
    let p = api_key_provider(&server);
    let ids = [
        "db/user",
        "db%2Fpass%20word",
        "variable:db/user",
        "acct:variable:db:port",
    ];
    let got = p.get_many(&ids).await.unwrap();
    let got: Vec<&[u8]> = got.iter().map(|f| f.value.expose()).collect();
    assert_eq!(
        got,
        [&b"user-value"[..], VALUE.as_bytes(), b"user-value", b"5432"]
    );
    let seen = server.seen();
    assert_eq!(seen.len(), 2, "authenticate and one batch: {seen:?}");
    assert_eq!(
        seen[1].target,
        "/secrets?variable_ids=acct%3Avariable%3Adb%2Fuser%2Cacct%3Avariable%3Adb%2Fpass+word%2Cacct%3Avariable%3Adb%3Aport"
    );

    // One variable named twice is a single fetch, not a batch.
    let server = serve(batch_server(VARS)).await;
    let p = api_key_provider(&server);
    let got = p.get_many(&["db/user", "variable:db/user"]).await.unwrap();
    assert_eq!(got.len(), 2);
    assert_eq!(server.seen()[1].target, "/secrets/acct/variable/db%2Fuser");
}

#[tokio::test]
async fn a_refused_batch_is_retried_one_by_one_to_name_the_variable() {
    static VARS: &[(&str, &str)] = &[("acct:variable:db/user", "user-value")];
    let server = serve(batch_server(VARS)).await;
    let p = api_key_provider(&server);
    let e = p.get_many(&["db/user", "db/missing"]).await.unwrap_err();
    assert!(
        matches!(&e, SecretError::NotFound { id, .. } if id == "db/missing"),
        "{e}"
    );
    let targets: Vec<String> = server.seen().into_iter().map(|r| r.target).collect();
    assert_eq!(targets.len(), 4, "{targets:?}");
    assert!(targets[1].starts_with("/secrets?variable_ids="));
}

#[tokio::test]
async fn access_token_id_is_the_token_itself() {
    let (h, issued) = conjur_like(400);
    let server = serve(h).await;
    let p = api_key_provider(&server);
    let got = p.get(ACCESS_TOKEN_ID).await.unwrap();
    assert_eq!(
        got.value.expose(),
        issued.lock().unwrap()[0].as_bytes(),
        "the token JSON"
    );
    let left = got.expires_in.unwrap();
    assert!(
        left <= Duration::from_secs(300) && left > Duration::from_secs(290),
        "{left:?}"
    );
}

#[tokio::test]
async fn token_file_is_reread_when_it_changes_and_after_a_401() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("access-token");
    let t1 = token_json(now_secs(), None, "one");
    std::fs::write(&file, &t1).unwrap();
    let valid = Arc::new(Mutex::new(vec![t1.clone()]));
    let v2 = Arc::clone(&valid);
    let h: Arc<Handler> = Arc::new(move |r: &Req| match token_of(r) {
        Some(t) if v2.lock().unwrap().contains(&t) => (200, VALUE.as_bytes().to_vec()),
        _ => (401, Vec::new()),
    });
    let server = serve(h).await;
    let cfg = ConjurProviderConfig {
        appliance_url: Some(server.base.clone()),
        account: Some(ACCOUNT.into()),
        token_file: Some(file.clone()),
        ..ConjurProviderConfig::default()
    };
    // An API key in the environment does not override the instance's tokenFile.
    let env = |k: &str| match k {
        "CONJUR_AUTHN_LOGIN" => Some("admin".to_owned()),
        "CONJUR_AUTHN_API_KEY" => Some(API_KEY.to_owned()),
        _ => None,
    };
    let p = ConjurProvider::with_env("conjur", &cfg, &env).unwrap();
    p.get("a").await.unwrap();
    assert_eq!(token_of(&server.seen()[0]).as_deref(), Some(t1.as_str()));

    // The sidecar writes a new token (a new file, renamed over the old one).
    let t2 = token_json(now_secs(), None, "two-longer");
    valid.lock().unwrap().push(t2.clone());
    let tmp = dir.path().join("tmp");
    std::fs::write(&tmp, &t2).unwrap();
    std::fs::rename(&tmp, &file).unwrap();
    p.get("a").await.unwrap();
    assert_eq!(token_of(&server.seen()[1]).as_deref(), Some(t2.as_str()));

    // Rewritten in place with the same size and mtime: the stat does not see it, the
    // 401 makes us read it again.
    let t3 = token_json(now_secs(), None, "two-longes");
    assert_eq!(t3.len(), t2.len());
    valid.lock().unwrap().clear();
    valid.lock().unwrap().push(t3.clone());
    let mtime = std::fs::metadata(&file).unwrap().modified().unwrap();
    let f = std::fs::OpenOptions::new().write(true).open(&file).unwrap();
    std::io::Write::write_all(&mut &f, t3.as_bytes()).unwrap();
    f.set_modified(mtime).unwrap();
    drop(f);
    p.get("a").await.unwrap();
    let seen = server.seen();
    assert_eq!(seen.len(), 4, "one refused request, one retry");
    assert_eq!(token_of(&seen[2]).as_deref(), Some(t2.as_str()));
    assert_eq!(token_of(&seen[3]).as_deref(), Some(t3.as_str()));
    assert_eq!(server.count(is_authn), 0, "never authenticates itself");

    // A missing file: the store is unreachable (the sidecar has not written it yet).
    std::fs::remove_file(&file).unwrap();
    let e = p.get("a").await.unwrap_err();
    assert_eq!(e.kind(), "unreachable", "{e}");
    assert!(e.to_string().contains("access-token"), "{e}");
    // Not a token.
    std::fs::write(&file, format!("<html>{VALUE}</html>")).unwrap();
    let e = p.get("a").await.unwrap_err();
    assert_eq!(e.kind(), "bad_reply", "{e}");
    assert_clean(&e);
}

#[test]
fn settings_come_from_the_instance_then_the_environment() {
    let env = |k: &str| match k {
        "CONJUR_APPLIANCE_URL" => Some("https://conjur.example.com/".to_owned()),
        "CONJUR_ACCOUNT" => Some("envacct".to_owned()),
        "CONJUR_AUTHN_LOGIN" => Some("host/env".to_owned()),
        "CONJUR_AUTHN_API_KEY" => Some(API_KEY.to_owned()),
        "CONJUR_HTTP_TIMEOUT" => Some("7".to_owned()),
        _ => None,
    };
    let builtin = ConjurProviderConfig {
        builtin: true,
        ..ConjurProviderConfig::default()
    };
    let p = ConjurProvider::with_env("conjur", &builtin, &env).unwrap();
    let c = p.inner.client().unwrap();
    assert_eq!(c.base, "https://conjur.example.com");
    assert_eq!(c.account, "envacct");
    assert_eq!(c.timeout, Duration::from_secs(7));
    let Authn::ApiKey { url, .. } = &c.authn else {
        panic!("API key expected")
    };
    assert_eq!(
        url,
        "https://conjur.example.com/authn/envacct/host%2Fenv/authenticate"
    );

    // Instance keys win; an authn URL (authn-ldap) is where the key is sent.
    let cfg = ConjurProviderConfig {
        account: Some("mine".into()),
        login: Some("alice".into()),
        authn_url: Some("https://conjur.example.com/authn-ldap/corp".into()),
        timeout: Some(Duration::from_secs(3)),
        ..ConjurProviderConfig::default()
    };
    let p = ConjurProvider::with_env("c2", &cfg, &env).unwrap();
    let c = p.inner.client().unwrap();
    assert_eq!(c.timeout, Duration::from_secs(3));
    let Authn::ApiKey { url, .. } = &c.authn else {
        panic!("API key expected")
    };
    assert_eq!(
        url,
        "https://conjur.example.com/authn-ldap/corp/mine/alice/authenticate"
    );

    // authn-k8s without a key: the sidecar's token file.
    let k8s_env = |k: &str| match k {
        "CONJUR_APPLIANCE_URL" => Some("https://conjur".to_owned()),
        "CONJUR_ACCOUNT" => Some("a".to_owned()),
        "CONJUR_AUTHN_URL" => Some("https://conjur/authn-k8s/cluster".to_owned()),
        "CONJUR_AUTHN_LOGIN" => Some("host/app".to_owned()),
        _ => None,
    };
    let p = ConjurProvider::with_env("conjur", &builtin, &k8s_env).unwrap();
    let Authn::TokenFile { path, .. } = &p.inner.client().unwrap().authn else {
        panic!("token file expected")
    };
    assert_eq!(path, Path::new(SIDECAR_TOKEN_FILE));
}

#[tokio::test]
async fn missing_settings_fail_a_declared_instance_and_defer_for_the_builtin() {
    let declared = ConjurProviderConfig::default();
    let e = ConjurProvider::with_env("vaulty", &declared, &|_| None)
        .err()
        .unwrap()
        .to_string();
    assert!(
        e.contains("CONJUR_APPLIANCE_URL") && e.contains("providers.vaulty.applianceUrl"),
        "{e}"
    );
    let no_creds = ConjurProviderConfig {
        appliance_url: Some("http://c".into()),
        account: Some("a".into()),
        ..ConjurProviderConfig::default()
    };
    let e = ConjurProvider::with_env("c", &no_creds, &|_| None)
        .err()
        .unwrap()
        .to_string();
    assert!(e.contains("no Conjur credentials"), "{e}");
    let bad_timeout = |k: &str| (k == "CONJUR_HTTP_TIMEOUT").then(|| "soon".to_owned());
    let mut cfg = no_creds.clone();
    cfg.api_key = Some(Secret::from_str_value(API_KEY));
    cfg.login = Some("l".into());
    let e = ConjurProvider::with_env("c", &cfg, &bad_timeout)
        .err()
        .unwrap()
        .to_string();
    assert!(e.contains("CONJUR_HTTP_TIMEOUT"), "{e}");
    // A bad CA in the environment.
    let bad_ca = |k: &str| (k == "CONJUR_SSL_CERTIFICATE").then(|| "not pem".to_owned());
    let e = ConjurProvider::with_env("c", &cfg, &bad_ca)
        .err()
        .unwrap()
        .to_string();
    assert!(e.contains("CONJUR_SSL_CERTIFICATE"), "{e}");

    let builtin = ConjurProviderConfig {
        builtin: true,
        ..ConjurProviderConfig::default()
    };
    let p = ConjurProvider::with_env("conjur", &builtin, &|_| None).unwrap();
    let e = p.get("a").await.unwrap_err();
    assert_eq!(e.kind(), "not_configured", "{e}");
    let e = p.get_many(&["a", "b"]).await.unwrap_err();
    assert_eq!(e.kind(), "not_configured", "{e}");
}

#[tokio::test]
async fn an_api_key_file_is_read_at_each_authentication() {
    let dir = tempfile::tempdir().unwrap();
    let key_file = dir.path().join("key");
    std::fs::write(&key_file, format!("{API_KEY}\n")).unwrap();
    let (h, issued) = conjur_like(480);
    let server = serve(h).await;
    let cfg = ConjurProviderConfig {
        appliance_url: Some(server.base.clone()),
        account: Some(ACCOUNT.into()),
        login: Some("admin".into()),
        api_key_file: Some(key_file.clone()),
        ..ConjurProviderConfig::default()
    };
    let p = ConjurProvider::with_env("conjur", &cfg, &|_| None).unwrap();
    p.get("a").await.unwrap();
    assert_eq!(
        server.seen()[0].body,
        API_KEY.as_bytes(),
        "one newline removed"
    );
    // A rotated key file is used at the next authentication.
    std::fs::write(&key_file, "rotated-key").unwrap();
    issued.lock().unwrap().clear();
    let e = p.get("a").await.unwrap_err();
    assert_eq!(e.kind(), "denied", "{e}");
    assert_eq!(server.seen().last().unwrap().body, b"rotated-key");
    std::fs::remove_file(&key_file).unwrap();
    let e = p.get("a").await.unwrap_err();
    assert!(e.to_string().contains("API key file"), "{e}");
}

// ---- configuration ------------------------------------------------------------------------

fn load(text: &str) -> Result<crate::config::Config, crate::config::ConfigErrors> {
    crate::config::load_str_with_env(
        text,
        &|k| (k == "KEY").then(|| API_KEY.to_owned()),
        &crate::connector::KINDS,
    )
}

#[test]
fn the_providers_block_and_the_builtin_instance() {
    let cfg = load(
        "
version: 2
providers:
  prod:
    type: conjur
    applianceUrl: https://conjur.example.com
    account: acme
    login: host/app/x
    apiKey: ${KEY}
    caFile: /etc/conjur.pem
    authnUrl: https://conjur.example.com/authn-ldap/corp
    timeout: 4s
  sidecar: {type: conjur, tokenFile: /run/conjur/access-token}
services:
  db:
    connector: pg
    listenOn: tcp://127.0.0.1:5432
    credentials:
      host: h
      username: {from: conjur, get: db/user}
      password: {from: prod, get: prod/db/password}
",
    )
    .unwrap_or_else(|e| panic!("{e}"));
    assert!(crate::config::unsupported(&cfg).is_empty());
    let crate::config::ProviderConfig::Conjur(prod) = &cfg.providers["prod"] else {
        panic!("conjur expected")
    };
    assert_eq!(prod.account.as_deref(), Some("acme"));
    assert_eq!(prod.api_key.as_ref().unwrap().expose(), API_KEY.as_bytes());
    assert_eq!(prod.timeout, Some(Duration::from_secs(4)));
    assert!(!prod.builtin);
    let crate::config::ProviderConfig::Conjur(builtin) = &cfg.providers["conjur"] else {
        panic!("the built-in conjur instance")
    };
    assert!(builtin.builtin);
    let crate::config::ProviderConfig::Conjur(sidecar) = &cfg.providers["sidecar"] else {
        panic!("conjur expected")
    };
    assert_eq!(
        sidecar.token_file.as_deref(),
        Some(Path::new("/run/conjur/access-token"))
    );
}

#[test]
fn bad_conjur_blocks_are_reported_without_the_key() {
    let e = load(
        "
version: 2
providers:
  a: {type: conjur, apiKey: '${KEY}', apiKeyFile: /k, tokenFile: /t, timeout: 0s, applianceUrl: 'ftp://u:pw@x', color: red}
  b: {type: conjur, authnUrl: nope, account: ''}
services: {}
",
    )
    .unwrap_err();
    let text = e.to_string();
    for want in [
        "providers.a: set either \"apiKey\" or \"apiKeyFile\", not both",
        "providers.a: set either an API key",
        "providers.a.timeout: must be more than zero",
        "providers.a.applianceUrl: invalid URL",
        "providers.a.color: unknown key",
        "providers.b.authnUrl: invalid URL",
        "providers.b.account: must not be empty",
    ] {
        assert!(text.contains(want), "{want}:\n{text}");
    }
    assert!(!text.contains(API_KEY) && !text.contains("u:pw"), "{text}");
}
