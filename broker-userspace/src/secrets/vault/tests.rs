//! The `vault` provider against a scripted in-process server: ids and KV v2 mounts,
//! one read (one lease) for the fields of a lease path, renewal, max TTL, a new login
//! on a dead token (and none on a policy refusal), typed errors for hostile replies,
//! revocation at shutdown. Every error is checked for the values and the token.

use std::{
    collections::HashMap,
    sync::{
        Arc, Mutex,
        atomic::{AtomicUsize, Ordering},
    },
    time::Duration,
};

use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpListener,
};

use super::*;
use crate::config::{VaultAuthConfig, VaultProviderConfig, VaultValue};

const TOKEN: &str = "hvs.unit-token-5f1c";
const PASSWORD: &str = "unit-password-9a7e";
const SECRET_ID: &str = "unit-secret-id-3d2b";

/// A request as the server saw it.
#[derive(Debug, Clone)]
struct Req {
    method: String,
    path: String,
    token: Option<String>,
    namespace: Option<String>,
    body: serde_json::Value,
}

type Route = dyn Fn(&Req) -> (u16, String) + Send + Sync;

struct Mock {
    base: String,
    seen: Arc<Mutex<Vec<Req>>>,
}

impl Mock {
    async fn start(route: impl Fn(&Req) -> (u16, String) + Send + Sync + 'static) -> Self {
        let route: Arc<Route> = Arc::new(route);
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let base = format!("http://{}", listener.local_addr().unwrap());
        let seen = Arc::new(Mutex::new(Vec::new()));
        let s = Arc::clone(&seen);
        tokio::spawn(async move {
            loop {
                let Ok((mut sock, _)) = listener.accept().await else {
                    return;
                };
                let (route, seen) = (Arc::clone(&route), Arc::clone(&s));
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
                    let header = |name: &str| {
                        head.lines().find_map(|l| {
                            l.split_once(':')
                                .filter(|(k, _)| k.eq_ignore_ascii_case(name))
                                .map(|(_, v)| v.trim().to_owned())
                        })
                    };
                    let len: usize = header("content-length")
                        .and_then(|v| v.parse().ok())
                        .unwrap_or(0);
                    while buf.len() < head_end + len {
                        match sock.read(&mut chunk).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => buf.extend_from_slice(&chunk[..n]),
                        }
                    }
                    let mut words = head.split_whitespace();
                    let method = words.next().unwrap_or("").to_owned();
                    let path = words.next().unwrap_or("").to_owned();
                    let req = Req {
                        method,
                        path: path.trim_start_matches("/v1/").to_owned(),
                        token: header("x-vault-token"),
                        namespace: header("x-vault-namespace"),
                        body: serde_json::from_slice(&buf[head_end..head_end + len])
                            .unwrap_or_default(),
                    };
                    seen.lock().unwrap().push(req.clone());
                    let (status, body) = route(&req);
                    if status == 0 {
                        // Never answer.
                        tokio::time::sleep(Duration::from_secs(60)).await;
                        return;
                    }
                    let extra = if status == 307 {
                        "Location: http://127.0.0.1:9/elsewhere\r\n"
                    } else {
                        ""
                    };
                    let _ = sock
                        .write_all(
                            format!(
                                "HTTP/1.1 {status} X\r\nContent-Length: {}\r\nContent-Type: application/json\r\n{extra}Connection: close\r\n\r\n",
                                body.len()
                            )
                            .as_bytes(),
                        )
                        .await;
                    let _ = sock.write_all(body.as_bytes()).await;
                });
            }
        });
        Self { base, seen }
    }

    fn count(&self, method: &str, path: &str) -> usize {
        self.seen
            .lock()
            .unwrap()
            .iter()
            .filter(|r| r.method == method && r.path == path)
            .count()
    }

    fn requests(&self) -> Vec<Req> {
        self.seen.lock().unwrap().clone()
    }
}

fn cfg(mock: &Mock) -> VaultProviderConfig {
    VaultProviderConfig {
        address: Some(mock.base.clone()),
        token: Some(Secret::from_str_value(TOKEN)),
        timeout: Some(Duration::from_secs(2)),
        declared: true,
        ..VaultProviderConfig::default()
    }
}

fn provider(c: &VaultProviderConfig) -> VaultProvider {
    VaultProvider::with_env("vault", c, &|_| None).unwrap()
}

fn text(f: &Fetched) -> &str {
    f.value.expose_str().unwrap()
}

fn clean(e: &SecretError) {
    let shown = format!("{e} {e:?}");
    for s in [TOKEN, PASSWORD, SECRET_ID] {
        assert!(!shown.contains(s), "{shown}");
    }
}

fn json(v: &serde_json::Value) -> String {
    v.to_string()
}

/// A token lookup: renewable, TTL 1 h.
fn lookup_ok() -> (u16, String) {
    (
        200,
        json(&serde_json::json!({"data": {"id": TOKEN, "ttl": 3600, "renewable": true}})),
    )
}

/// Mounts `kv/` (v1) and `secret/` (v2); anything else unknown (403, as Vault).
fn mounts(path: &str) -> (u16, String) {
    let rest = path.trim_start_matches("sys/internal/ui/mounts/");
    let (mount, version) = if rest.starts_with("kv/") {
        ("kv/", "1")
    } else if rest.starts_with("secret/") {
        ("secret/", "2")
    } else if rest.starts_with("database/") {
        return (
            200,
            json(&serde_json::json!({"data": {"path": "database/", "type": "database"}})),
        );
    } else {
        return (403, r#"{"errors":["permission denied"]}"#.into());
    };
    (
        200,
        json(
            &serde_json::json!({"data": {"path": mount, "type": "kv", "options": {"version": version}}}),
        ),
    )
}

fn kv_routes(r: &Req) -> (u16, String) {
    if r.token.as_deref() != Some(TOKEN) {
        return (403, r#"{"errors":["permission denied"]}"#.into());
    }
    match r.path.as_str() {
        "auth/token/lookup-self" => lookup_ok(),
        p if p.starts_with("sys/internal/ui/mounts/") => mounts(p),
        "kv/db" => (
            200,
            json(&serde_json::json!({
                "lease_id": "", "renewable": false, "lease_duration": 2_764_800,
                "data": {"password": PASSWORD, "value": "default-field", "port": 5432,
                         "nested": {"pw": PASSWORD}}
            })),
        ),
        "secret/data/db" => (
            200,
            json(&serde_json::json!({
                "lease_id": "", "renewable": false, "lease_duration": 0,
                "data": {"data": {"password": PASSWORD, "value": "v2-default"},
                         "metadata": {"version": 3}}
            })),
        ),
        _ => (404, r#"{"errors":[]}"#.into()),
    }
}

#[tokio::test]
async fn kv_v1_and_v2_in_every_id_form() {
    let mock = Mock::start(kv_routes).await;
    let mut c = cfg(&mock);
    c.namespace = Some("team-a".into());
    let p = provider(&c);
    let get = |id: &'static str| {
        let p = &p;
        async move { p.get(id).await }
    };
    let f = get("kv/db#password").await.unwrap();
    assert_eq!(text(&f), PASSWORD);
    // KV v1's lease_duration is its TTL hint.
    assert_eq!(f.expires_in, Some(Duration::from_secs(2_764_800)));
    assert_eq!(text(&get("kv/db").await.unwrap()), "default-field");
    assert_eq!(text(&get("/kv/db#port").await.unwrap()), "5432");
    assert_eq!(text(&get("kv/db#nested.pw").await.unwrap()), PASSWORD);
    // KV v2, as Secretless writes it and as `vault kv get` takes it.
    assert_eq!(
        text(&get("secret/data/db#data.password").await.unwrap()),
        PASSWORD
    );
    let f = get("secret/db#password").await.unwrap();
    assert_eq!(text(&f), PASSWORD);
    assert_eq!(f.expires_in, None);
    assert_eq!(text(&get("secret/db").await.unwrap()), "v2-default");

    // One mount look-up per mount; none for a `/data/` path.
    assert_eq!(mock.count("GET", "sys/internal/ui/mounts/kv/db"), 1);
    assert_eq!(mock.count("GET", "sys/internal/ui/mounts/secret/db"), 1);
    assert!(
        mock.requests()
            .iter()
            .all(|r| r.namespace.as_deref() == Some("team-a")),
        "every request carries the namespace"
    );

    // Errors: a missing field (with the KV v2 hint), a missing secret, a bad id.
    let e = get("secret/data/db#password").await.unwrap_err();
    assert_eq!(e.kind(), "bad_reply");
    assert!(e.to_string().contains("#data.password"), "{e}");
    clean(&e);
    let e = get("kv/db#nope").await.unwrap_err();
    assert!(e.to_string().contains("field `nope`"), "{e}");
    clean(&e);
    let e = get("kv/missing#x").await.unwrap_err();
    assert_eq!(e.kind(), "not_found");
    assert!(e.to_string().contains("kv/missing#x"), "{e}");
    let e = get("secret").await.unwrap_err();
    assert_eq!(e.kind(), "bad_id");
    let e = get("kv/db#").await.unwrap_err();
    assert_eq!(e.kind(), "bad_id");
    // A path on no known mount is read as written (the look-up's 403 is not an
    // error), and the look-up is not repeated.
    let e = get("other/x").await.unwrap_err();
    assert_eq!(e.kind(), "not_found");
    let _ = get("other/x").await;
    assert_eq!(mock.count("GET", "sys/internal/ui/mounts/other/x"), 1);
    assert_eq!(mock.count("GET", "other/x"), 2);
}

/// A dynamic-credentials reply: a new lease (and a new user) per read.
struct Db {
    reads: AtomicUsize,
    renews: AtomicUsize,
    revokes: Mutex<Vec<String>>,
    /// lease_duration of a new lease, and what renewals grant (None: what was asked).
    ttl: u64,
    renew_grants: Mutex<Vec<u64>>,
    /// Renewals and look-ups answer 400 (the lease is gone).
    gone: std::sync::atomic::AtomicBool,
}

impl Db {
    fn new(ttl: u64) -> Arc<Self> {
        Arc::new(Self {
            reads: AtomicUsize::new(0),
            renews: AtomicUsize::new(0),
            revokes: Mutex::new(Vec::new()),
            ttl,
            renew_grants: Mutex::new(Vec::new()),
            gone: std::sync::atomic::AtomicBool::new(false),
        })
    }

    fn route(self: &Arc<Self>) -> impl Fn(&Req) -> (u16, String) + Send + Sync + 'static {
        let db = Arc::clone(self);
        move |r: &Req| {
            if r.token.as_deref() != Some(TOKEN) {
                return (403, r#"{"errors":["permission denied"]}"#.into());
            }
            match r.path.as_str() {
                "auth/token/lookup-self" => lookup_ok(),
                p if p.starts_with("sys/internal/ui/mounts/") => mounts(p),
                "database/creds/app" => {
                    let n = db.reads.fetch_add(1, Ordering::SeqCst) + 1;
                    (
                        200,
                        json(&serde_json::json!({
                            "lease_id": format!("database/creds/app/lease{n}"),
                            "renewable": true, "lease_duration": db.ttl,
                            "data": {"username": format!("v-app-{n}"), "password": format!("{PASSWORD}-{n}")}
                        })),
                    )
                }
                "sys/leases/renew" | "sys/leases/lookup" => {
                    if db.gone.load(Ordering::SeqCst) {
                        return (400, r#"{"errors":["lease not found"]}"#.into());
                    }
                    db.renews.fetch_add(1, Ordering::SeqCst);
                    let asked = r.body["increment"].as_u64().unwrap_or(db.ttl);
                    let granted = {
                        let mut g = db.renew_grants.lock().unwrap();
                        if g.is_empty() { asked } else { g.remove(0) }
                    };
                    (
                        200,
                        json(&serde_json::json!({
                            "lease_id": r.body["lease_id"], "renewable": true, "lease_duration": granted
                        })),
                    )
                }
                "sys/leases/revoke" => {
                    db.revokes
                        .lock()
                        .unwrap()
                        .push(r.body["lease_id"].as_str().unwrap_or("").to_owned());
                    (204, String::new())
                }
                _ => (404, r#"{"errors":[]}"#.into()),
            }
        }
    }
}

const USER: &str = "database/creds/app#username";
const PASS: &str = "database/creds/app#password";

/// `get_many` of a lease path's username and password is one read, one lease; later
/// `get`s of either field return the same lease while it is valid, and the values are
/// reported to expire at the renewal point (half the TTL).
#[tokio::test]
async fn one_read_one_lease_for_username_and_password() {
    let db = Db::new(3600);
    let mock = Mock::start(db.route()).await;
    let p = provider(&cfg(&mock));
    let v = p.get_many(&[USER, PASS]).await.unwrap();
    assert_eq!(text(&v[0]), "v-app-1");
    assert_eq!(text(&v[1]), format!("{PASSWORD}-1"));
    assert_eq!(
        db.reads.load(Ordering::SeqCst),
        1,
        "one read for both fields"
    );
    let exp = v[0].expires_in.unwrap();
    assert!(
        exp <= Duration::from_secs(1800) && exp > Duration::from_secs(1790),
        "{exp:?}"
    );
    // Separate gets (the store's cache asks per id): the same lease.
    assert_eq!(text(&p.get(PASS).await.unwrap()), format!("{PASSWORD}-1"));
    assert_eq!(text(&p.get(USER).await.unwrap()), "v-app-1");
    assert_eq!(db.reads.load(Ordering::SeqCst), 1);
    // Mixed with another path: one read per path, values in the caller's order.
    let v = p
        .get_many(&[USER, "kv/none#x"])
        .await
        .map(|_| ())
        .unwrap_err();
    assert_eq!(v.kind(), "not_found");
    assert!(v.to_string().contains("kv/none#x"), "{v}");
}

/// Concurrent first fetches of the two fields share one read.
#[tokio::test]
async fn concurrent_gets_of_one_lease_path_share_one_read() {
    let db = Db::new(3600);
    let mock = Mock::start(db.route()).await;
    let p = Arc::new(provider(&cfg(&mock)));
    let mut tasks = Vec::new();
    for i in 0..10 {
        let p = Arc::clone(&p);
        tasks.push(tokio::spawn(async move {
            let id = if i % 2 == 0 { USER } else { PASS };
            p.get(id).await.map(|f| text(&f).to_owned())
        }));
    }
    for t in tasks {
        let v = t.await.unwrap().unwrap();
        assert!(v == "v-app-1" || v == format!("{PASSWORD}-1"), "{v}");
    }
    assert_eq!(db.reads.load(Ordering::SeqCst), 1);
}

/// A lease in use is renewed at half its TTL; once a renewal grants less than asked
/// (its max TTL), a new lease is taken before the old one ends, and the old one is
/// revoked after the grace period.
#[tokio::test]
async fn leases_are_renewed_then_replaced_before_their_max_ttl() {
    let db = Db::new(4);
    // First renewal: what was asked (4 s); second: capped at 2 s.
    db.renew_grants.lock().unwrap().extend([4, 2]);
    let mock = Mock::start(db.route()).await;
    let p = provider(&cfg(&mock));
    let f = p.get(USER).await.unwrap();
    assert_eq!(text(&f), "v-app-1");
    assert!(f.expires_in.unwrap() <= Duration::from_secs(2));
    // Past half the TTL: renewed, same lease.
    tokio::time::sleep(Duration::from_millis(2100)).await;
    assert_eq!(text(&p.get(USER).await.unwrap()), "v-app-1");
    assert_eq!(db.renews.load(Ordering::SeqCst), 1);
    // Half of that: the capped renewal (2 s left, margin 0.8 s).
    tokio::time::sleep(Duration::from_millis(2100)).await;
    let f = p.get(USER).await.unwrap();
    assert_eq!(text(&f), "v-app-1");
    assert_eq!(db.renews.load(Ordering::SeqCst), 2);
    assert!(
        f.expires_in.unwrap() <= Duration::from_millis(1300),
        "{:?}",
        f.expires_in
    );
    // Past the capped lease's use-by time: a new lease.
    tokio::time::sleep(Duration::from_millis(1300)).await;
    assert_eq!(text(&p.get(USER).await.unwrap()), "v-app-2");
    assert_eq!(db.reads.load(Ordering::SeqCst), 2);
    // The superseded lease is revoked after its grace period (0.8 s).
    tokio::time::sleep(Duration::from_millis(1200)).await;
    assert_eq!(
        *db.revokes.lock().unwrap(),
        ["database/creds/app/lease1".to_owned()]
    );
}

/// The same field fetched again at once (the upstream rejected it: a `fresh` fetch)
/// checks the lease with Vault; a lease Vault no longer has is replaced.
#[tokio::test]
async fn a_refetch_checks_the_lease_and_replaces_a_revoked_one() {
    let db = Db::new(3600);
    let mock = Mock::start(db.route()).await;
    let p = provider(&cfg(&mock));
    let v = p.get_many(&[USER, PASS]).await.unwrap();
    assert_eq!(text(&v[0]), "v-app-1");
    // Revoked behind the broker's back.
    db.gone.store(true, Ordering::SeqCst);
    let v = p.get_many(&[USER, PASS]).await.unwrap();
    assert_eq!(text(&v[0]), "v-app-2");
    assert_eq!(text(&v[1]), format!("{PASSWORD}-2"));
    assert_eq!(mock.count("PUT", "sys/leases/renew"), 1);
    // A lease is checked at most once per 5 s.
    db.gone.store(false, Ordering::SeqCst);
    for _ in 0..3 {
        assert_eq!(text(&p.get(USER).await.unwrap()), "v-app-2");
    }
    assert_eq!(mock.count("PUT", "sys/leases/renew"), 2);
    assert_eq!(db.reads.load(Ordering::SeqCst), 2);
}

/// `revokeOnShutdown`: every lease (current and superseded) is revoked; without it,
/// none.
#[tokio::test]
async fn shutdown_revokes_leases_when_configured() {
    for revoke in [true, false] {
        let db = Db::new(3600);
        let mock = Mock::start(db.route()).await;
        let mut c = cfg(&mock);
        c.revoke_on_shutdown = revoke;
        let p = provider(&c);
        let _ = p.get_many(&[USER, PASS]).await.unwrap();
        p.shutdown().await;
        let want: Vec<String> = if revoke {
            vec!["database/creds/app/lease1".into()]
        } else {
            vec![]
        };
        assert_eq!(*db.revokes.lock().unwrap(), want);
    }
}

/// AppRole: one login for concurrent first fetches; a dead token (403, and
/// lookup-self refused) means one new login and the request once more; a policy
/// refusal (lookup-self fine) is `denied` without a login.
#[tokio::test]
async fn approle_logs_in_again_only_when_the_token_is_dead() {
    let logins = Arc::new(AtomicUsize::new(0));
    let dead = Arc::new(Mutex::new(Vec::<String>::new()));
    let (l, d) = (Arc::clone(&logins), Arc::clone(&dead));
    let mock = Mock::start(move |r: &Req| {
        if r.path == "auth/approle/login" {
            if r.body["role_id"] != "role-1" || r.body["secret_id"] != SECRET_ID {
                return (400, r#"{"errors":["invalid role or secret ID"]}"#.into());
            }
            let n = l.fetch_add(1, Ordering::SeqCst) + 1;
            return (
                200,
                json(
                    &serde_json::json!({"auth": {"client_token": format!("hvs.login-{n}"),
                    "lease_duration": 3600, "renewable": true}}),
                ),
            );
        }
        let alive = r.token.as_deref().is_some_and(|t| {
            t.starts_with("hvs.login-") && !d.lock().unwrap().iter().any(|x| x == t)
        });
        if !alive {
            return (403, r#"{"errors":["permission denied"]}"#.into());
        }
        match r.path.as_str() {
            "auth/token/lookup-self" => lookup_ok(),
            p if p.starts_with("sys/internal/ui/mounts/") => mounts(p),
            "kv/db" => (
                200,
                json(&serde_json::json!({"data": {"password": PASSWORD}})),
            ),
            _ => (403, r#"{"errors":["permission denied"]}"#.into()),
        }
    })
    .await;
    let dir = tempfile::tempdir().unwrap();
    let sid = dir.path().join("secret-id");
    std::fs::write(&sid, format!("{SECRET_ID}\n")).unwrap();
    let c = VaultProviderConfig {
        token: None,
        auth: VaultAuthConfig::AppRole {
            role_id: VaultValue::Inline(Secret::from_str_value("role-1")),
            secret_id: Some(VaultValue::File(sid.clone())),
            mount: "approle".into(),
        },
        ..cfg(&mock)
    };
    let p = Arc::new(provider(&c));
    let gets: Vec<_> = (0..5)
        .map(|_| {
            let p = Arc::clone(&p);
            tokio::spawn(async move { p.get("kv/db#password").await })
        })
        .collect();
    for g in gets {
        assert_eq!(text(&g.await.unwrap().unwrap()), PASSWORD);
    }
    assert_eq!(logins.load(Ordering::SeqCst), 1, "one login for all");
    // The token dies: one new login, and the read succeeds.
    dead.lock().unwrap().push("hvs.login-1".into());
    assert_eq!(text(&p.get("kv/db#password").await.unwrap()), PASSWORD);
    assert_eq!(logins.load(Ordering::SeqCst), 2);
    // A policy refusal: denied, no login.
    let e = p.get("kv/forbidden#x").await.unwrap_err();
    assert_eq!(e.kind(), "denied");
    assert!(e.to_string().contains("permission denied"), "{e}");
    assert_eq!(logins.load(Ordering::SeqCst), 2);
    clean(&e);
    // A wrong secret_id: denied at login, naming Vault's reason.
    std::fs::write(&sid, "wrong").unwrap();
    dead.lock().unwrap().push("hvs.login-2".into());
    let e = p.get("kv/db#password").await.unwrap_err();
    assert_eq!(e.kind(), "denied");
    assert!(e.to_string().contains("login refused: HTTP 400"), "{e}");
    clean(&e);
}

/// A fixed token with a TTL is renewed at two thirds of it (renew-self), without any
/// fetch meanwhile.
#[tokio::test]
async fn a_fixed_token_is_renewed_before_it_expires() {
    let renewals = Arc::new(AtomicUsize::new(0));
    let r2 = Arc::clone(&renewals);
    let mock = Mock::start(move |r: &Req| match r.path.as_str() {
        "auth/token/lookup-self" => (
            200,
            json(&serde_json::json!({"data": {"ttl": 3, "renewable": true, "creation_ttl": 3}})),
        ),
        "auth/token/renew-self" => {
            r2.fetch_add(1, Ordering::SeqCst);
            assert_eq!(r.body["increment"], "3s");
            (
                200,
                json(&serde_json::json!({"auth": {"client_token": TOKEN, "lease_duration": 3, "renewable": true}})),
            )
        }
        p if p.starts_with("sys/internal/ui/mounts/") => mounts(p),
        "kv/db" => (200, json(&serde_json::json!({"data": {"password": PASSWORD}}))),
        _ => (404, "{}".into()),
    })
    .await;
    let p = provider(&cfg(&mock));
    assert_eq!(text(&p.get("kv/db#password").await.unwrap()), PASSWORD);
    tokio::time::sleep(Duration::from_millis(4500)).await;
    let n = renewals.load(Ordering::SeqCst);
    assert!((2..=3).contains(&n), "renewed every 2 s: {n}");
    p.shutdown().await;
}

/// Hostile or broken replies are typed errors, never a panic or a hang, and never
/// carry the body.
#[tokio::test]
async fn hostile_replies_are_typed_errors() {
    let mock = Mock::start(|r: &Req| match r.path.as_str() {
        "auth/token/lookup-self" => lookup_ok(),
        p if p.starts_with("sys/internal/ui/mounts/") => (403, "{}".into()),
        "html" => (500, format!("<html>{PASSWORD}</html>")),
        "sealed" => (503, r#"{"errors":["Vault is sealed"]}"#.into()),
        "busy" => (429, "{}".into()),
        "notjson" => (200, format!("{PASSWORD} not json")),
        "truncated" => (200, format!(r#"{{"data":{{"password":"{PASSWORD}""#)),
        "huge" => (
            200,
            format!(r#"{{"data":{{"x":"{}"}}}}"#, "a".repeat(2 << 20)),
        ),
        "redirect" => (307, String::new()),
        "nodata" => (200, r#"{"data":null}"#.into()),
        "echo" => (
            400,
            json(&serde_json::json!({"errors": [format!("bad token {TOKEN}")]})),
        ),
        "long" => (
            400,
            json(&serde_json::json!({"errors": ["x\u{1b}[31m".repeat(100)]})),
        ),
        "slow" => (0, String::new()),
        _ => (404, "{}".into()),
    })
    .await;
    let p = provider(&cfg(&mock));
    for (id, kind, says) in [
        ("html", "unreachable", "HTTP 500"),
        ("sealed", "unreachable", "HTTP 503: Vault is sealed"),
        ("busy", "unreachable", "HTTP 429"),
        ("notjson", "bad_reply", "not JSON"),
        ("truncated", "bad_reply", "not JSON"),
        ("huge", "bad_reply", "larger than 1048576"),
        ("redirect", "bad_reply", "redirects are not followed"),
        ("nodata", "bad_reply", "no `data` object"),
        ("echo", "bad_reply", "HTTP 400"),
        ("slow", "timeout", "timed out after 2s"),
    ] {
        let e = p.get(id).await.unwrap_err();
        assert_eq!(e.kind(), kind, "{id}: {e}");
        assert!(e.to_string().contains(says), "{id}: {e}");
        clean(&e);
    }
    // Vault's error text is cut short and stripped of control characters.
    let e = p.get("long").await.unwrap_err().to_string();
    assert!(
        e.len() < 250 && !e.contains('\u{1b}') && e.ends_with("..."),
        "{e}"
    );
}

/// The built-in instance without a token: fetches fail as not configured (logged
/// once); a declared one fails to build, naming what is missing.
#[tokio::test]
async fn no_token_is_not_configured_or_a_start_error() {
    let implicit =
        VaultProvider::with_env("vault", &VaultProviderConfig::default(), &|_| None).unwrap();
    let e = implicit.get("kv/db#password").await.unwrap_err();
    assert_eq!(e.kind(), "not_configured");
    let declared = VaultProviderConfig {
        declared: true,
        ..VaultProviderConfig::default()
    };
    let e = VaultProvider::with_env("team", &declared, &|_| None)
        .err()
        .unwrap()
        .to_string();
    assert!(e.contains("team") && e.contains("VAULT_TOKEN"), "{e}");
    // A bad VAULT_ADDR: the built-in instance defers it, a declared one fails.
    let env = |k: &str| (k == "VAULT_ADDR").then(|| "not a url".to_owned());
    let implicit = VaultProvider::with_env("vault", &VaultProviderConfig::default(), &env).unwrap();
    assert_eq!(
        implicit.get("kv/x").await.unwrap_err().kind(),
        "not_configured"
    );
    assert!(VaultProvider::with_env("team", &declared, &env).is_err());
    // Missing files of a declared instance.
    let k8s = VaultProviderConfig {
        declared: true,
        auth: VaultAuthConfig::Kubernetes {
            role: "r".into(),
            jwt_file: "/nonexistent/jwt".into(),
            mount: "kubernetes".into(),
        },
        ..VaultProviderConfig::default()
    };
    let e = VaultProvider::with_env("k", &k8s, &|_| None)
        .err()
        .unwrap()
        .to_string();
    assert!(
        e.contains("jwtFile") && e.contains("/nonexistent/jwt"),
        "{e}"
    );
}

/// Kubernetes login sends the role and the JWT read from the file.
#[tokio::test]
async fn kubernetes_login_sends_the_service_account_jwt() {
    let seen = Arc::new(Mutex::new(HashMap::new()));
    let s = Arc::clone(&seen);
    let mock = Mock::start(move |r: &Req| match r.path.as_str() {
        "auth/k8s/login" => {
            s.lock().unwrap().insert(
                r.body["role"].as_str().unwrap_or("").to_owned(),
                r.body["jwt"].as_str().unwrap_or("").to_owned(),
            );
            (
                200,
                json(&serde_json::json!({"auth": {"client_token": TOKEN, "lease_duration": 0}})),
            )
        }
        _ => kv_routes(r),
    })
    .await;
    let dir = tempfile::tempdir().unwrap();
    let jwt = dir.path().join("token");
    std::fs::write(&jwt, "eyJ.jwt.sig").unwrap();
    let c = VaultProviderConfig {
        token: None,
        auth: VaultAuthConfig::Kubernetes {
            role: "app".into(),
            jwt_file: jwt,
            mount: "k8s".into(),
        },
        ..cfg(&mock)
    };
    let p = provider(&c);
    assert_eq!(text(&p.get("kv/db#password").await.unwrap()), PASSWORD);
    assert_eq!(seen.lock().unwrap()["app"], "eyJ.jwt.sig");
}
