//! A fake HashiCorp Vault for the `vault` provider's tests, written from Vault's HTTP
//! API documentation (no real Vault can be installed here). Plain std threads, one per
//! connection, HTTP/1.1 with `Connection: close`.
//!
//! What it serves, as documented:
//! * KV version 1 (<https://developer.hashicorp.com/vault/api-docs/secret/kv/kv-v1>):
//!   `GET /v1/<mount>/<path>` -> `{"lease_id": "", "renewable": false,
//!   "lease_duration": 2764800, "data": {...}}`.
//! * KV version 2 (<https://developer.hashicorp.com/vault/api-docs/secret/kv/kv-v2>):
//!   `GET /v1/<mount>/data/<path>` -> `{"data": {"data": {...}, "metadata":
//!   {"version": N, ...}}}`; the path without `data/` is a 404 with Vault's warning.
//! * The mount look-up the CLI makes first
//!   (<https://developer.hashicorp.com/vault/api-docs/system/internal-ui-mounts>):
//!   `GET /v1/sys/internal/ui/mounts/<path>` -> `{"data": {"path": "secret/", "type":
//!   "kv", "options": {"version": "2"}}}`; no mount: 403.
//! * Tokens (<https://developer.hashicorp.com/vault/api-docs/auth/token>):
//!   `X-Vault-Token`; `GET auth/token/lookup-self`, `POST auth/token/renew-self
//!   {"increment"}` (capped at the token's max TTL). An expired, revoked or unknown
//!   token gets 403 `{"errors":["permission denied"]}`.
//! * AppRole (<https://developer.hashicorp.com/vault/api-docs/auth/approle>):
//!   `POST auth/<mount>/login {"role_id","secret_id"}`; Kubernetes
//!   (<https://developer.hashicorp.com/vault/api-docs/auth/kubernetes>): `POST
//!   auth/<mount>/login {"role","jwt"}`; both -> `{"auth": {"client_token",
//!   "lease_duration", "renewable"}}`; a wrong secret: 400 `{"errors": [...]}`.
//! * Namespaces (<https://developer.hashicorp.com/vault/docs/enterprise/namespaces>):
//!   `X-Vault-Namespace` selects the namespace; a token works only in its own.
//! * Database secrets engine with PostgreSQL
//!   (<https://developer.hashicorp.com/vault/api-docs/secret/databases>,
//!   <https://developer.hashicorp.com/vault/docs/secrets/databases/postgresql>): `GET
//!   <mount>/creds/<role>` runs the role's creation statements against a REAL
//!   PostgreSQL (`CREATE ROLE "{{name}}" WITH LOGIN PASSWORD '{{password}}' VALID UNTIL
//!   '{{expiration}}'` and its grants) and answers `{"lease_id", "renewable": true,
//!   "lease_duration", "data": {"username", "password"}}`.
//! * Leases (<https://developer.hashicorp.com/vault/api-docs/system/leases>): `PUT
//!   sys/leases/renew {"lease_id","increment"}` (capped at the role's max TTL, with
//!   Vault's warning; the role's `VALID UNTIL` moved), `PUT sys/leases/lookup`, `PUT
//!   sys/leases/revoke` (204). Revocation runs `REASSIGN OWNED`, `DROP OWNED` and
//!   `DROP ROLE`; a failure is recorded in [`Counters::revoke_failures`]. A reaper
//!   revokes leases at their end, and those of a token that expired (Vault revokes a
//!   token's leases with it).
//!
//! Every call is counted ([`Counters`]): logins, token look-ups and renewals, reads per
//! path, leases created, renewed, revoked, expired. [`Mode`] makes secret reads answer
//! garbage (HTML 500, not JSON, truncated, 2 MiB, a redirect, never).

use std::{
    collections::HashMap,
    hash::{BuildHasher as _, Hasher as _},
    io::{BufRead as _, BufReader, Read as _, Write as _},
    net::{SocketAddr, TcpListener, TcpStream},
    process::{Command, Stdio},
    sync::{
        Arc, Mutex, MutexGuard,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    thread,
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use serde_json::{Value, json};

use crate::pg::PgServer;

/// The root token: no expiry, every namespace.
pub const ROOT_TOKEN: &str = "hvs.fake-root-token-0000";

/// How secret reads (not logins, not `sys/`) answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    Normal,
    /// 500 with an HTML page.
    Html500,
    /// 200, not JSON.
    NotJson,
    /// 200, JSON cut in the middle.
    Truncated,
    /// 200, 2 MiB of JSON.
    Huge,
    /// 307 to another address.
    Redirect,
    /// 503 `{"errors":["Vault is sealed"]}`.
    Sealed,
    /// Never answers.
    Hang,
}

/// What the server saw.
#[derive(Debug, Clone, Default)]
pub struct Counters {
    pub requests: usize,
    pub logins_approle: usize,
    pub logins_kubernetes: usize,
    pub failed_logins: usize,
    pub token_lookups: usize,
    pub token_renewals: usize,
    /// 403s answered (dead tokens, no mount).
    pub denied: usize,
    pub mount_lookups: usize,
    /// Reads per API path (`kv/db`, `secret/data/db`, `database/creds/app`).
    pub reads: HashMap<String, usize>,
    pub leases_created: usize,
    pub leases_renewed: usize,
    /// Revoked by a `sys/leases/revoke` request.
    pub leases_revoked: usize,
    /// Revoked by the server at the lease's (or its token's) end.
    pub leases_expired: usize,
    /// `role: error` for revocations PostgreSQL refused.
    pub revoke_failures: Vec<String>,
}

enum Engine {
    Kv1,
    Kv2,
    Database { pg: Arc<PgServer>, database: String },
}

struct Mount {
    ns: String,
    /// Without slashes: `secret`, `team/kv`.
    path: String,
    engine: Engine,
}

struct Token {
    ns: String,
    display: String,
    /// The TTL it was created with (zero: no expiry).
    ttl: Duration,
    expires: Option<Instant>,
    max_expires: Option<Instant>,
    renewable: bool,
    revoked: bool,
}

impl Token {
    fn alive(&self, now: Instant) -> bool {
        !self.revoked && self.expires.is_none_or(|e| now < e)
    }
}

struct AppRole {
    ns: String,
    mount: String,
    role_id: String,
    secret_id: String,
    ttl: Duration,
    max_ttl: Duration,
}

struct K8sRole {
    ns: String,
    mount: String,
    role: String,
    jwt: String,
    ttl: Duration,
    max_ttl: Duration,
}

struct DbRole {
    default_ttl: Duration,
    max_ttl: Duration,
    /// Run after `CREATE ROLE`, `{{name}}` replaced.
    grants: Vec<String>,
}

struct Lease {
    ns: String,
    mount: String,
    username: String,
    /// The role's default TTL: what a renewal without `increment` grants.
    ttl: Duration,
    expires: Instant,
    max_expires: Instant,
    token: String,
    done: bool,
}

#[derive(Default)]
struct State {
    tokens: HashMap<String, Token>,
    mounts: Vec<Mount>,
    kv1: HashMap<(String, String), Value>,
    kv2: HashMap<(String, String), Vec<Value>>,
    approles: Vec<AppRole>,
    k8s: Vec<K8sRole>,
    db_roles: HashMap<(String, String, String), DbRole>,
    leases: HashMap<String, Lease>,
    counters: Counters,
    passwords: Vec<String>,
}

struct Inner {
    st: Mutex<State>,
    mode: Mutex<Mode>,
    seq: AtomicU64,
    /// Serialises the SQL of lease creation and revocation.
    sql: Mutex<()>,
}

/// The running server; it stops when dropped.
pub struct FakeVault {
    pub addr: SocketAddr,
    inner: Arc<Inner>,
    stop: Arc<AtomicBool>,
}

type Reply = (u16, String);

fn errors(status: u16, msgs: &[&str]) -> Reply {
    (status, json!({ "errors": msgs }).to_string())
}

fn denied() -> Reply {
    errors(403, &["permission denied"])
}

/// A duration given as seconds (`3600`) or a Go duration string (`"1h"`, `"30s"`).
fn duration_param(v: &Value) -> Option<Duration> {
    if let Some(n) = v.as_u64() {
        return Some(Duration::from_secs(n));
    }
    let s = v.as_str()?.trim();
    let (num, unit) = s.split_at(s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len()));
    let n: u64 = num.parse().ok()?;
    Some(Duration::from_secs(match unit {
        "" | "s" => n,
        "m" => n * 60,
        "h" => n * 3600,
        _ => return None,
    }))
}

/// `2026-01-02 03:04:05+00`, a PostgreSQL timestamp `secs` from now (UTC).
fn pg_timestamp(after: Duration) -> String {
    let t = SystemTime::now() + after;
    let secs = t.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs());
    let (days, rem) = (secs / 86_400, secs % 86_400);
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1_460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02} {:02}:{:02}:{:02}+00",
        rem / 3600,
        (rem % 3600) / 60,
        rem % 60
    )
}

impl Inner {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.st
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn random(&self, len: usize) -> String {
        const ALPHABET: &[u8] = b"abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789";
        let mut out = String::with_capacity(len);
        while out.len() < len {
            let mut h = std::collections::hash_map::RandomState::new().build_hasher();
            h.write_u64(self.seq.fetch_add(1, Ordering::Relaxed));
            let mut x = h.finish();
            for _ in 0..8 {
                if out.len() == len {
                    break;
                }
                out.push(ALPHABET[(x % ALPHABET.len() as u64) as usize] as char);
                x /= ALPHABET.len() as u64;
            }
        }
        out
    }

    fn new_token(
        &self,
        st: &mut State,
        ns: &str,
        display: &str,
        ttl: Duration,
        max_ttl: Duration,
    ) -> String {
        let token = format!("hvs.{}", self.random(24));
        let now = Instant::now();
        st.tokens.insert(
            token.clone(),
            Token {
                ns: ns.to_owned(),
                display: display.to_owned(),
                ttl,
                expires: (!ttl.is_zero()).then(|| now + ttl),
                max_expires: (!max_ttl.is_zero()).then(|| now + max_ttl),
                renewable: true,
                revoked: false,
            },
        );
        token
    }

    /// Run SQL as the superuser in `db` (over the server's unix socket).
    fn sql(pg: &PgServer, db: &str, sql: &str) -> Result<(), String> {
        let out = Command::new("psql")
            .args([
                "-X",
                "-w",
                "-A",
                "-t",
                "-q",
                "-v",
                "ON_ERROR_STOP=1",
                "-U",
                "postgres",
                "-h",
            ])
            .arg(pg.dir())
            .args(["-p", &pg.port.to_string(), "-d", db, "-c", sql])
            .stdin(Stdio::null())
            .output()
            .map_err(|e| format!("cannot run psql: {e}"))?;
        if out.status.success() {
            Ok(())
        } else {
            Err(String::from_utf8_lossy(&out.stderr)
                .lines()
                .next()
                .unwrap_or("psql failed")
                .to_owned())
        }
    }

    /// Drop a lease's role (what Vault's PostgreSQL plugin does at revocation).
    fn revoke_sql(&self, pg: &PgServer, database: &str, user: &str) -> Result<(), String> {
        let _one = self
            .sql
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let q = format!(
            "REASSIGN OWNED BY \"{user}\" TO postgres; DROP OWNED BY \"{user}\"; DROP ROLE IF EXISTS \"{user}\";"
        );
        Self::sql(pg, database, &q)
    }

    fn database_of(st: &State, ns: &str, mount: &str) -> Option<(Arc<PgServer>, String)> {
        st.mounts.iter().find_map(|m| match &m.engine {
            Engine::Database { pg, database } if m.ns == ns && m.path == mount => {
                Some((Arc::clone(pg), database.clone()))
            }
            _ => None,
        })
    }

    /// End a lease: drop its role. `by_request`: a revoke call (else the reaper).
    fn end_lease(&self, lease_id: &str, by_request: bool) {
        let (pg, user) = {
            let mut st = self.lock();
            let Some(l) = st.leases.get_mut(lease_id) else {
                return;
            };
            if l.done {
                return;
            }
            l.done = true;
            let (ns, mount, user) = (l.ns.clone(), l.mount.clone(), l.username.clone());
            if by_request {
                st.counters.leases_revoked += 1;
            } else {
                st.counters.leases_expired += 1;
            }
            (Self::database_of(&st, &ns, &mount), user)
        };
        if let Some((pg, database)) = pg
            && let Err(e) = self.revoke_sql(&pg, &database, &user)
        {
            self.lock()
                .counters
                .revoke_failures
                .push(format!("{user}: {e}"));
        }
    }

    /// Revoke leases past their end, and those of dead tokens.
    fn reap(&self) {
        let now = Instant::now();
        let due: Vec<String> = {
            let st = self.lock();
            st.leases
                .iter()
                .filter(|(_, l)| {
                    !l.done
                        && (now >= l.expires
                            || st.tokens.get(&l.token).is_none_or(|t| !t.alive(now)))
                })
                .map(|(id, _)| id.clone())
                .collect()
        };
        for id in due {
            self.end_lease(&id, false);
        }
    }

    fn handle(
        &self,
        method: &str,
        path: &str,
        token: Option<&str>,
        ns: &str,
        body: &Value,
    ) -> Reply {
        let now = Instant::now();
        let write = matches!(method, "POST" | "PUT");
        // Logins need no token.
        if write
            && let Some(mount) = path
                .strip_prefix("auth/")
                .and_then(|p| p.strip_suffix("/login"))
        {
            return self.login(ns, mount, body);
        }
        {
            let mut st = self.lock();
            let ok = token
                .and_then(|t| st.tokens.get(t))
                .is_some_and(|t| t.alive(now) && (t.ns == ns || t.display == "root"));
            if !ok {
                st.counters.denied += 1;
                return denied();
            }
        }
        let token = token.unwrap_or_default();
        match (method, path) {
            ("GET", "auth/token/lookup-self") => self.lookup_self(token),
            ("POST" | "PUT", "auth/token/renew-self") => self.renew_self(token, body),
            ("GET", p) if p.starts_with("sys/internal/ui/mounts/") => {
                self.mount_info(ns, &p["sys/internal/ui/mounts/".len()..])
            }
            ("POST" | "PUT", "sys/leases/renew") => self.renew_lease(body),
            ("POST" | "PUT", "sys/leases/lookup") => self.lookup_lease(body),
            ("POST" | "PUT", "sys/leases/revoke") => {
                let id = body["lease_id"].as_str().unwrap_or("");
                self.end_lease(id, true);
                (204, String::new())
            }
            ("GET", p) => {
                *self.lock().counters.reads.entry(p.to_owned()).or_default() += 1;
                match *self
                    .mode
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner)
                {
                    Mode::Normal => {}
                    Mode::Html500 => {
                        return (
                            500,
                            "<html><body>Internal Server Error</body></html>".into(),
                        );
                    }
                    Mode::NotJson => return (200, "this is not json".into()),
                    Mode::Truncated => return (200, r#"{"data":{"password":"abc"#.into()),
                    Mode::Huge => {
                        return (
                            200,
                            format!(r#"{{"data":{{"x":"{}"}}}}"#, "a".repeat(2 << 20)),
                        );
                    }
                    Mode::Redirect => return (307, String::new()),
                    Mode::Sealed => return errors(503, &["Vault is sealed"]),
                    Mode::Hang => return (0, String::new()),
                }
                self.read(ns, p, token)
            }
            _ => errors(405, &["unsupported operation"]),
        }
    }

    fn login(&self, ns: &str, mount: &str, body: &Value) -> Reply {
        let mut st = self.lock();
        let approle = st
            .approles
            .iter()
            .find(|r| r.ns == ns && r.mount == mount)
            .map(|_| ());
        let (ttl, max_ttl, display, kind) = if approle.is_some() {
            let found = st.approles.iter().find(|r| {
                r.ns == ns
                    && r.mount == mount
                    && body["role_id"].as_str() == Some(&r.role_id)
                    && body["secret_id"].as_str() == Some(&r.secret_id)
            });
            match found {
                Some(r) => (r.ttl, r.max_ttl, "approle".to_owned(), 0),
                None => {
                    st.counters.failed_logins += 1;
                    return errors(400, &["invalid role or secret ID"]);
                }
            }
        } else if st.k8s.iter().any(|r| r.ns == ns && r.mount == mount) {
            let found = st.k8s.iter().find(|r| {
                r.ns == ns
                    && r.mount == mount
                    && body["role"].as_str() == Some(&r.role)
                    && body["jwt"].as_str() == Some(&r.jwt)
            });
            match found {
                Some(r) => (r.ttl, r.max_ttl, format!("kubernetes-{}", r.role), 1),
                None => {
                    st.counters.failed_logins += 1;
                    return errors(403, &["permission denied"]);
                }
            }
        } else {
            return errors(
                400,
                &[&format!("no handler for route \"auth/{mount}/login\"")],
            );
        };
        if kind == 0 {
            st.counters.logins_approle += 1;
        } else {
            st.counters.logins_kubernetes += 1;
        }
        let token = self.new_token(&mut st, ns, &display, ttl, max_ttl);
        (
            200,
            json!({
                "request_id": self.random(8), "lease_id": "", "renewable": false,
                "lease_duration": 0, "data": null, "warnings": null,
                "auth": {
                    "client_token": token, "accessor": self.random(24),
                    "policies": ["default"], "token_policies": ["default"],
                    "metadata": {}, "lease_duration": ttl.as_secs(), "renewable": true,
                }
            })
            .to_string(),
        )
    }

    fn lookup_self(&self, token: &str) -> Reply {
        let now = Instant::now();
        let mut st = self.lock();
        st.counters.token_lookups += 1;
        let Some(t) = st.tokens.get(token) else {
            return denied();
        };
        let ttl = t
            .expires
            .map_or(0, |e| e.saturating_duration_since(now).as_secs());
        let out = json!({
            "data": {
                "id": token, "display_name": t.display, "ttl": ttl,
                "creation_ttl": t.ttl.as_secs(), "renewable": t.renewable && !t.ttl.is_zero(),
                "namespace_path": if t.ns.is_empty() { String::new() } else { format!("{}/", t.ns) },
                "policies": ["default"],
            }
        });
        (200, out.to_string())
    }

    fn renew_self(&self, token: &str, body: &Value) -> Reply {
        let now = Instant::now();
        let mut st = self.lock();
        st.counters.token_renewals += 1;
        let Some(t) = st.tokens.get_mut(token) else {
            return denied();
        };
        if !t.renewable || t.ttl.is_zero() {
            return errors(400, &["lease is not renewable"]);
        }
        let asked = duration_param(&body["increment"]).unwrap_or(t.ttl);
        let mut granted = asked;
        let mut warnings = Vec::new();
        if let Some(max) = t.max_expires {
            let left = max.saturating_duration_since(now);
            if left < granted {
                granted = Duration::from_secs(left.as_secs());
                warnings.push(format!(
                    "TTL of \"{}s\" exceeded the effective max_ttl of \"{}s\"; TTL value is capped accordingly",
                    asked.as_secs(),
                    granted.as_secs()
                ));
            }
        }
        t.expires = Some(now + granted);
        (
            200,
            json!({
                "auth": {"client_token": token, "policies": ["default"],
                         "lease_duration": granted.as_secs(), "renewable": true},
                "warnings": if warnings.is_empty() { Value::Null } else { json!(warnings) },
            })
            .to_string(),
        )
    }

    fn mount_info(&self, ns: &str, path: &str) -> Reply {
        let mut st = self.lock();
        st.counters.mount_lookups += 1;
        let m = st
            .mounts
            .iter()
            .filter(|m| m.ns == ns && (path == m.path || path.starts_with(&format!("{}/", m.path))))
            .max_by_key(|m| m.path.len());
        let Some(m) = m else {
            st.counters.denied += 1;
            // Vault answers 403 rather than say which mounts exist.
            return errors(
                403,
                &[
                    "preflight capability check returned 403, please ensure client's policies grant access to path",
                ],
            );
        };
        let (ty, version) = match m.engine {
            Engine::Kv1 => ("kv", Some("1")),
            Engine::Kv2 => ("kv", Some("2")),
            Engine::Database { .. } => ("database", None),
        };
        (
            200,
            json!({"data": {
                "path": format!("{}/", m.path), "type": ty, "description": "",
                "options": version.map(|v| json!({"version": v})),
                "config": {"default_lease_ttl": 0, "max_lease_ttl": 0},
            }})
            .to_string(),
        )
    }

    fn read(&self, ns: &str, path: &str, token: &str) -> Reply {
        let (mount, rest, kind) = {
            let st = self.lock();
            let Some(m) = st
                .mounts
                .iter()
                .filter(|m| m.ns == ns && path.starts_with(&format!("{}/", m.path)))
                .max_by_key(|m| m.path.len())
            else {
                return errors(404, &[&format!("no handler for route \"{path}\"")]);
            };
            let rest = path[m.path.len() + 1..].to_owned();
            let kind = match m.engine {
                Engine::Kv1 => 1,
                Engine::Kv2 => 2,
                Engine::Database { .. } => 3,
            };
            (m.path.clone(), rest, kind)
        };
        match kind {
            1 => match self.lock().kv1.get(&(ns.to_owned(), path.to_owned())) {
                Some(data) => (
                    200,
                    json!({"request_id": self.random(8), "lease_id": "", "renewable": false,
                           "lease_duration": 2_764_800, "data": data, "wrap_info": null,
                           "warnings": null, "auth": null})
                    .to_string(),
                ),
                None => errors(404, &[]),
            },
            2 => {
                let Some(key) = rest.strip_prefix("data/") else {
                    return (
                        404,
                        json!({"errors": [], "warnings": ["Invalid path for a versioned K/V secrets engine. See the API docs for the appropriate API endpoints to use. If using the Vault CLI, use 'vault kv get' for this operation."]}).to_string(),
                    );
                };
                let st = self.lock();
                match st.kv2.get(&(ns.to_owned(), format!("{mount}/{key}"))) {
                    Some(versions) if !versions.is_empty() => (
                        200,
                        json!({"request_id": self.random(8), "lease_id": "", "renewable": false,
                               "lease_duration": 0,
                               "data": {"data": versions[versions.len() - 1],
                                        "metadata": {"version": versions.len(), "created_time": "",
                                                     "deletion_time": "", "destroyed": false}},
                               "wrap_info": null, "warnings": null, "auth": null})
                        .to_string(),
                    ),
                    _ => errors(404, &[]),
                }
            }
            _ => match rest.strip_prefix("creds/") {
                Some(role) => self.create_lease(ns, &mount, role, token),
                None => errors(404, &[]),
            },
        }
    }

    fn create_lease(&self, ns: &str, mount: &str, role: &str, token: &str) -> Reply {
        let (ttl, max_ttl, grants, pg, database, display) = {
            let st = self.lock();
            let Some(r) = st
                .db_roles
                .get(&(ns.to_owned(), mount.to_owned(), role.to_owned()))
            else {
                return errors(400, &[&format!("unknown role: {role}")]);
            };
            let Some((pg, database)) = Self::database_of(&st, ns, mount) else {
                return errors(404, &[]);
            };
            let display = st
                .tokens
                .get(token)
                .map(|t| t.display.clone())
                .unwrap_or_default();
            (
                r.default_ttl,
                r.max_ttl,
                r.grants.clone(),
                pg,
                database,
                display,
            )
        };
        // Vault's username template, shortened: v-<display>-<role>-<random>.
        let mut username = format!("v-{display}-{role}-{}", self.random(10));
        username.truncate(63);
        let password = format!("A1a-{}", self.random(20));
        let mut q = format!(
            "CREATE ROLE \"{username}\" WITH LOGIN PASSWORD '{password}' VALID UNTIL '{}';",
            pg_timestamp(ttl)
        );
        for g in &grants {
            q.push_str(&g.replace("{{name}}", &username));
            q.push(';');
        }
        {
            let _one = self
                .sql
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            if let Err(e) = Self::sql(&pg, &database, &q) {
                return errors(500, &[&format!("failed to create the user: {e}")]);
            }
        }
        let lease_id = format!("{mount}/creds/{role}/{}", self.random(24));
        let now = Instant::now();
        let mut st = self.lock();
        st.counters.leases_created += 1;
        st.passwords.push(password.clone());
        st.leases.insert(
            lease_id.clone(),
            Lease {
                ns: ns.to_owned(),
                mount: mount.to_owned(),
                username: username.clone(),
                ttl,
                expires: now + ttl,
                max_expires: now + max_ttl,
                token: token.to_owned(),
                done: false,
            },
        );
        (
            200,
            json!({"request_id": self.random(8), "lease_id": lease_id, "renewable": true,
                   "lease_duration": ttl.as_secs(),
                   "data": {"username": username, "password": password},
                   "wrap_info": null, "warnings": null, "auth": null})
            .to_string(),
        )
    }

    fn renew_lease(&self, body: &Value) -> Reply {
        let now = Instant::now();
        let id = body["lease_id"].as_str().unwrap_or("").to_owned();
        let (granted, asked, user, pg) = {
            let mut st = self.lock();
            let Some(l) = st.leases.get(&id).filter(|l| !l.done && now < l.expires) else {
                return errors(400, &["lease not found"]);
            };
            let asked = duration_param(&body["increment"]).unwrap_or(l.ttl);
            let left = l.max_expires.saturating_duration_since(now);
            let granted = if left < asked {
                Duration::from_secs(left.as_secs())
            } else {
                asked
            };
            let (ns, mount, user) = (l.ns.clone(), l.mount.clone(), l.username.clone());
            let pg = Self::database_of(&st, &ns, &mount);
            if let Some(l) = st.leases.get_mut(&id) {
                l.expires = now + granted;
            }
            st.counters.leases_renewed += 1;
            (granted, asked, user, pg)
        };
        if let Some((pg, database)) = pg {
            let _one = self
                .sql
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            let _ = Self::sql(
                &pg,
                &database,
                &format!(
                    "ALTER ROLE \"{user}\" VALID UNTIL '{}';",
                    pg_timestamp(granted)
                ),
            );
        }
        let warnings = (granted < asked).then(|| {
            json!([format!(
                "TTL of \"{}s\" exceeded the effective max_ttl of \"{}s\"; TTL value is capped accordingly",
                asked.as_secs(),
                granted.as_secs()
            )])
        });
        (
            200,
            json!({"request_id": self.random(8), "lease_id": id, "renewable": true,
                   "lease_duration": granted.as_secs(), "data": null, "warnings": warnings})
            .to_string(),
        )
    }

    fn lookup_lease(&self, body: &Value) -> Reply {
        let now = Instant::now();
        let id = body["lease_id"].as_str().unwrap_or("");
        let st = self.lock();
        match st.leases.get(id).filter(|l| !l.done && now < l.expires) {
            Some(l) => (
                200,
                json!({"data": {"id": id, "renewable": true,
                                "ttl": l.expires.saturating_duration_since(now).as_secs()}})
                .to_string(),
            ),
            None => errors(400, &["invalid lease"]),
        }
    }
}

fn serve(inner: &Inner, mut conn: TcpStream) {
    let _ = conn.set_read_timeout(Some(Duration::from_secs(10)));
    let Ok(clone) = conn.try_clone() else { return };
    let mut reader = BufReader::new(clone);
    let mut line = String::new();
    if reader.read_line(&mut line).is_err() {
        return;
    }
    let mut words = line.split_whitespace();
    let method = words.next().unwrap_or("").to_owned();
    let target = words.next().unwrap_or("").to_owned();
    let (mut token, mut ns, mut length) = (None, String::new(), 0usize);
    loop {
        let mut h = String::new();
        if reader.read_line(&mut h).is_err() || h == "\r\n" || h.is_empty() {
            break;
        }
        if let Some((k, v)) = h.split_once(':') {
            let v = v.trim().to_owned();
            match k.trim().to_ascii_lowercase().as_str() {
                "x-vault-token" => token = Some(v),
                "x-vault-namespace" => ns = v.trim_matches('/').to_owned(),
                "content-length" => length = v.parse().unwrap_or(0).min(1 << 20),
                _ => {}
            }
        }
    }
    let mut body = vec![0u8; length];
    if reader.read_exact(&mut body).is_err() {
        return;
    }
    let body: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
    inner.lock().counters.requests += 1;
    let path = target
        .split('?')
        .next()
        .unwrap_or("")
        .trim_start_matches("/v1/")
        .to_owned();
    let (status, text) = inner.handle(&method, &path, token.as_deref(), &ns, &body);
    if status == 0 {
        thread::sleep(Duration::from_secs(60));
        return;
    }
    let reason = match status {
        200 => "OK",
        204 => "No Content",
        307 => "Temporary Redirect",
        400 => "Bad Request",
        403 => "Forbidden",
        404 => "Not Found",
        500 => "Internal Server Error",
        503 => "Service Unavailable",
        _ => "Other",
    };
    let location = if status == 307 {
        "Location: http://127.0.0.1:9/v1/elsewhere\r\n"
    } else {
        ""
    };
    let ctype = if text.starts_with('<') {
        "text/html"
    } else {
        "application/json"
    };
    let _ = write!(
        conn,
        "HTTP/1.1 {status} {reason}\r\nContent-Type: {ctype}\r\nContent-Length: {}\r\n{location}Cache-Control: no-store\r\nConnection: close\r\n\r\n{text}",
        text.len()
    );
}

impl FakeVault {
    /// Start on 127.0.0.1 (free port) with the root token.
    #[must_use]
    pub fn start() -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind fake vault");
        let addr = listener.local_addr().expect("local_addr");
        let inner = Arc::new(Inner {
            st: Mutex::new(State::default()),
            mode: Mutex::new(Mode::Normal),
            seq: AtomicU64::new(1),
            sql: Mutex::new(()),
        });
        inner.lock().tokens.insert(
            ROOT_TOKEN.to_owned(),
            Token {
                ns: String::new(),
                display: "root".into(),
                ttl: Duration::ZERO,
                expires: None,
                max_expires: None,
                renewable: false,
                revoked: false,
            },
        );
        let stop = Arc::new(AtomicBool::new(false));
        let (i, s) = (Arc::clone(&inner), Arc::clone(&stop));
        thread::spawn(move || {
            for conn in listener.incoming() {
                if s.load(Ordering::SeqCst) {
                    return;
                }
                let Ok(conn) = conn else { continue };
                let i = Arc::clone(&i);
                thread::spawn(move || serve(&i, conn));
            }
        });
        let (i, s) = (Arc::clone(&inner), Arc::clone(&stop));
        thread::spawn(move || {
            while !s.load(Ordering::SeqCst) {
                i.reap();
                thread::sleep(Duration::from_millis(100));
            }
        });
        Self { addr, inner, stop }
    }

    /// `http://127.0.0.1:PORT`, for `address` / `VAULT_ADDR`.
    #[must_use]
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Mount a KV engine of `version` (1 or 2) at `mount` in namespace `ns` ("" root).
    pub fn mount_kv(&self, ns: &str, mount: &str, version: u8) {
        self.inner.lock().mounts.push(Mount {
            ns: ns.to_owned(),
            path: mount.trim_matches('/').to_owned(),
            engine: if version == 2 {
                Engine::Kv2
            } else {
                Engine::Kv1
            },
        });
    }

    /// Write `fields` at `path` (`kv/db`, `secret/db`: the mount, then the secret's
    /// path). On a KV v2 mount a new version.
    pub fn put(&self, ns: &str, path: &str, fields: &[(&str, &str)]) {
        let data: serde_json::Map<String, Value> = fields
            .iter()
            .map(|(k, v)| ((*k).to_owned(), Value::String((*v).to_owned())))
            .collect();
        let mut st = self.inner.lock();
        let kv2 = st.mounts.iter().any(|m| {
            m.ns == ns
                && matches!(m.engine, Engine::Kv2)
                && path.starts_with(&format!("{}/", m.path))
        });
        let key = (ns.to_owned(), path.to_owned());
        if kv2 {
            st.kv2.entry(key).or_default().push(Value::Object(data));
        } else {
            st.kv1.insert(key, Value::Object(data));
        }
    }

    /// A token in `ns`: `ttl` zero for none, renewable up to `max_ttl` (zero: no max).
    #[must_use]
    pub fn create_token(&self, ns: &str, ttl: Duration, max_ttl: Duration) -> String {
        let mut st = self.inner.lock();
        self.inner.new_token(&mut st, ns, "token", ttl, max_ttl)
    }

    /// An AppRole role at auth mount `mount` whose tokens last `ttl` (renewable up to
    /// `max_ttl`).
    pub fn add_approle(
        &self,
        ns: &str,
        mount: &str,
        role_id: &str,
        secret_id: &str,
        ttl: Duration,
        max_ttl: Duration,
    ) {
        self.inner.lock().approles.push(AppRole {
            ns: ns.to_owned(),
            mount: mount.to_owned(),
            role_id: role_id.to_owned(),
            secret_id: secret_id.to_owned(),
            ttl,
            max_ttl,
        });
    }

    /// A Kubernetes auth role at mount `mount` accepting exactly `jwt` (the real one
    /// asks the TokenReview API).
    pub fn add_kubernetes_role(
        &self,
        ns: &str,
        mount: &str,
        role: &str,
        jwt: &str,
        ttl: Duration,
        max_ttl: Duration,
    ) {
        self.inner.lock().k8s.push(K8sRole {
            ns: ns.to_owned(),
            mount: mount.to_owned(),
            role: role.to_owned(),
            jwt: jwt.to_owned(),
            ttl,
            max_ttl,
        });
    }

    /// A database secrets engine at `mount` on `pg`, creating roles in `database`.
    pub fn mount_database(&self, ns: &str, mount: &str, pg: Arc<PgServer>, database: &str) {
        self.inner.lock().mounts.push(Mount {
            ns: ns.to_owned(),
            path: mount.trim_matches('/').to_owned(),
            engine: Engine::Database {
                pg,
                database: database.to_owned(),
            },
        });
    }

    /// A role of the database engine at `mount`: leases of `ttl`, at most `max_ttl`;
    /// `grants` run after `CREATE ROLE` (`{{name}}` is the new role).
    pub fn add_db_role(
        &self,
        ns: &str,
        mount: &str,
        role: &str,
        ttl: Duration,
        max_ttl: Duration,
        grants: &[&str],
    ) {
        self.inner.lock().db_roles.insert(
            (ns.to_owned(), mount.to_owned(), role.to_owned()),
            DbRole {
                default_ttl: ttl,
                max_ttl,
                grants: grants.iter().map(|g| (*g).to_owned()).collect(),
            },
        );
    }

    /// Expire every token but the root one now (their leases go with them).
    pub fn expire_tokens(&self) {
        let now = Instant::now();
        for t in self.inner.lock().tokens.values_mut() {
            if t.display != "root" {
                t.expires = Some(now);
            }
        }
    }

    /// How secret reads answer from now on.
    pub fn set_mode(&self, mode: Mode) {
        *self
            .inner
            .mode
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = mode;
    }

    /// What the server saw so far.
    #[must_use]
    pub fn counters(&self) -> Counters {
        self.inner.lock().counters.clone()
    }

    /// Reads of API path `path`.
    #[must_use]
    pub fn reads(&self, path: &str) -> usize {
        self.inner
            .lock()
            .counters
            .reads
            .get(path)
            .copied()
            .unwrap_or(0)
    }

    /// Leases neither revoked nor expired.
    #[must_use]
    pub fn active_leases(&self) -> usize {
        self.inner
            .lock()
            .leases
            .values()
            .filter(|l| !l.done)
            .count()
    }

    /// Every password the database engine issued (for secret greps).
    #[must_use]
    pub fn issued_passwords(&self) -> Vec<String> {
        self.inner.lock().passwords.clone()
    }

    /// Every token issued (for secret greps).
    #[must_use]
    pub fn issued_tokens(&self) -> Vec<String> {
        self.inner.lock().tokens.keys().cloned().collect()
    }
}

impl Drop for FakeVault {
    fn drop(&mut self) {
        // The database mounts hold the test's PostgreSQL: let it go now, not when the
        // server's threads end (they may outlive the test process's last destructor,
        // leaving the server running).
        self.inner.lock().mounts.clear();
        self.stop.store(true, Ordering::SeqCst);
        // Wake the accept loop so the thread ends.
        let _ = TcpStream::connect(self.addr);
    }
}
