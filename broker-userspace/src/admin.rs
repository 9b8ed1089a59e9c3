//! The local admin socket and `broker status`.
//!
//! **The socket** (`broker.adminSocket`, default [`DEFAULT_ADMIN_SOCKET`]; `off`
//! disables it) is a Unix stream socket of mode 0600 owned by the daemon's user (root),
//! created like a `listenOn: unix://` socket (bound at a private name with mode 0, its
//! mode set through the inode, renamed into place; a stale socket nobody accepts on is
//! replaced; see [`crate::proxy::unix`]) and removed when the daemon stops. Anyone else
//! gets `EACCES` from the file mode before a byte is exchanged; a client whose
//! credentials (`SO_PEERCRED`) are neither root's nor the daemon's is refused anyway.
//! The default path is best effort: a daemon that cannot create `/run/broker` (not
//! root) or finds another daemon serving it logs a warning and runs without one; a
//! configured path that cannot be served fails start-up.
//!
//! **The protocol**: one request line, one reply line, both JSON, then the connection
//! closes. A request is `{"cmd": "<command>", ...}` (at most [`MAX_REQUEST`] bytes,
//! within [`REQUEST_TIMEOUT`]); the reply `{"ok": true, "<command>": {...}}` or
//! `{"ok": false, "error": "..."}`. Commands: `status`, and `revoke` and `lift`
//! ([`crate::admin_revoke`]). At most [`MAX_CLIENTS`] requests are served at once.
//!
//! **`status`**: the daemon (version, pid, uptime, configuration generation, ready),
//! the services (connector, `listenOn`, intercepted destinations with the addresses
//! they resolve to now), the connections open now with the caller's identity (pid,
//! uid, gid, cgroup, command), phase (handshake, relayed, spliced) and bytes so far
//! (oldest first, at most [`MAX_CONNECTIONS_LISTED`]), the provider instances with their
//! circuit breaker and last failure, and the credential cache (provider, ids as
//! [`crate::secrets::redact_id`] prints them, age, time left, fresh or stale). Never a
//! value.

use std::{
    io::{BufRead as _, Read as _, Write as _},
    net::SocketAddr,
    path::{Path, PathBuf},
    sync::{Arc, Weak},
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use serde_json::{Value, json};
use tokio::{
    io::{AsyncBufReadExt as _, AsyncReadExt as _, AsyncWriteExt as _},
    net::UnixStream,
    sync::{Semaphore, watch},
};

pub use crate::config::DEFAULT_ADMIN_SOCKET;
use crate::{
    config::{AdminSocket, InterceptTarget, ListenAddr, UnixSocketOptions},
    drain::Tracker,
    ebpf::Interceptor,
    health::Readiness,
    proxy::unix::{Problem, UnixBound},
    resolver::HostNames,
    runtime::Current,
};

/// The longest request line.
pub const MAX_REQUEST: usize = 4096;
/// Time for a client to send its request.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(2);
/// Time for the reply to be written.
pub const REPLY_TIMEOUT: Duration = Duration::from_secs(5);
/// Requests served at once; more are closed at once.
pub const MAX_CLIENTS: usize = 4;
/// Connections listed by `status` (the count says how many there are).
pub const MAX_CONNECTIONS_LISTED: usize = 1000;
/// Cache groups listed by `status`.
pub const MAX_CACHE_LISTED: usize = 1000;
/// The longest reply `broker status` reads.
pub const MAX_REPLY: u64 = 16 << 20;

/// Why the admin socket cannot be served.
#[derive(Debug, thiserror::Error)]
#[error("broker.adminSocket {}: {problem}", path.display())]
pub struct AdminError {
    pub path: PathBuf,
    #[source]
    pub problem: Problem,
}

/// Bind the admin socket as configured: `None` when it is off, or when the default path
/// cannot be served (logged).
///
/// # Errors
/// A configured path that cannot be served.
pub fn bind(setting: &AdminSocket) -> Result<Option<UnixBound>, AdminError> {
    let opts = UnixSocketOptions {
        mode: Some(0o600),
        ..UnixSocketOptions::default()
    };
    let (path, explicit) = match setting {
        AdminSocket::Off => return Ok(None),
        AdminSocket::Path(p) => (p.clone(), true),
        AdminSocket::Default => (PathBuf::from(DEFAULT_ADMIN_SOCKET), false),
    };
    if !explicit && let Some(dir) = path.parent() {
        // /run/broker (systemd's RuntimeDirectory makes it too): root's, 0755.
        if !dir.exists() {
            use std::os::unix::fs::DirBuilderExt as _;
            let _ = std::fs::DirBuilder::new().mode(0o755).create(dir);
        }
    }
    match crate::proxy::unix::bind_path(&path, &opts) {
        Ok(b) => {
            tracing::info!(path = %path.display(), "admin socket bound (broker status)");
            Ok(Some(b))
        }
        Err(problem) if !explicit => {
            let unprivileged = match &problem {
                Problem::NoDirectory(_) => true,
                Problem::Io { source, .. } => source.kind() == std::io::ErrorKind::PermissionDenied,
                _ => false,
            };
            if unprivileged {
                // A daemon without root (`broker -f FILE` of a Secretless file).
                tracing::info!(
                    path = %path.display(),
                    error = %problem,
                    "no admin socket (`broker status`): set broker.adminSocket to a path this user may create"
                );
            } else {
                tracing::warn!(
                    path = %path.display(),
                    error = %problem,
                    "no admin socket: `broker status` cannot reach this daemon (set broker.adminSocket to a path of its own, or `off`)"
                );
            }
            Ok(None)
        }
        Err(problem) => Err(AdminError { path, problem }),
    }
}

/// What `status` reads.
pub struct Admin {
    pub runtime: Arc<Current>,
    pub tracker: Arc<Tracker>,
    pub names: Arc<HostNames>,
    pub interceptor: Option<Weak<Interceptor>>,
    pub readiness: Arc<Readiness>,
    pub transparent: Option<SocketAddr>,
    pub started: SystemTime,
    /// Live revocations (`broker revoke`; see [`crate::admin_revoke`]).
    pub revocations: Arc<crate::policy::Revocations>,
}

/// Serve admin requests until `stop` turns true; the socket file goes with `bound`.
pub async fn serve(bound: UnixBound, admin: Arc<Admin>, mut stop: watch::Receiver<bool>) {
    let slots = Arc::new(Semaphore::new(MAX_CLIENTS));
    let own_uid = crate::sys::euid();
    loop {
        let (s, _) = tokio::select! {
            () = crate::proxy::stopped(&mut stop) => return,
            r = bound.listener.accept() => match r {
                Ok(x) => x,
                Err(_) => {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let Ok(slot) = Arc::clone(&slots).try_acquire_owned() else {
            continue;
        };
        let admin = Arc::clone(&admin);
        tokio::spawn(async move {
            let _slot = slot;
            one(s, &admin, own_uid).await;
        });
    }
}

async fn one(s: UnixStream, admin: &Admin, own_uid: u32) {
    let allowed = s
        .peer_cred()
        .is_ok_and(|c| c.uid() == 0 || c.uid() == own_uid);
    let (r, mut w) = s.into_split();
    let reply = if allowed {
        let mut line = Vec::new();
        let read = tokio::time::timeout(
            REQUEST_TIMEOUT,
            tokio::io::BufReader::new(r.take(MAX_REQUEST as u64 + 1)).read_until(b'\n', &mut line),
        )
        .await;
        match read {
            Err(_) => error("no request within 2 s"),
            Ok(Err(e)) => error(&format!("reading the request: {e}")),
            Ok(Ok(_)) if line.len() > MAX_REQUEST => error("request too long"),
            Ok(Ok(_)) => match serde_json::from_slice::<Value>(&line) {
                Ok(req) => admin.answer(&req),
                Err(_) => error("the request is not JSON: send {\"cmd\": \"status\"}"),
            },
        }
    } else {
        error("permission denied: the admin socket is root's")
    };
    let mut text = reply.to_string();
    text.push('\n');
    let _ = tokio::time::timeout(REPLY_TIMEOUT, async {
        let _ = w.write_all(text.as_bytes()).await;
        let _ = w.shutdown().await;
    })
    .await;
}

fn error(msg: &str) -> Value {
    json!({"ok": false, "error": msg})
}

fn ms(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

fn unix_ms(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH).map_or(0, ms)
}

impl Admin {
    /// The reply to one request.
    #[must_use]
    pub fn answer(&self, req: &Value) -> Value {
        match req.get("cmd").and_then(Value::as_str) {
            Some("status") => json!({"ok": true, "status": self.status()}),
            Some("revoke") => crate::admin_revoke::revoke(self, req),
            Some("lift") => crate::admin_revoke::lift(self, req),
            Some(other) => error(&format!(
                "unknown command {:?} (commands: status, revoke, lift)",
                other.chars().take(64).collect::<String>()
            )),
            None => error("no \"cmd\" in the request: send {\"cmd\": \"status\"}"),
        }
    }

    /// The `status` document (see the module docs).
    #[must_use]
    pub fn status(&self) -> Value {
        let rt = self.runtime.load();
        let now = SystemTime::now();
        let interceptor = self.interceptor.as_ref().and_then(Weak::upgrade);
        let services: Vec<Value> = rt
            .services()
            .iter()
            .map(|s| {
                let intercept: Vec<Value> = s
                    .service
                    .intercept
                    .iter()
                    .map(|t| match t {
                        InterceptTarget::Host { host, port } => {
                            let resolved: Vec<String> = match host.parse::<std::net::IpAddr>() {
                                Ok(ip) => vec![ip.to_string()],
                                Err(_) => self
                                    .names
                                    .addrs_of(s.id, host, *port)
                                    .iter()
                                    .map(ToString::to_string)
                                    .collect(),
                            };
                            json!({"target": format!("{host}:{port}"), "resolved": resolved})
                        }
                        InterceptTarget::Addr(a) => {
                            json!({"target": a.to_string(), "resolved": [a.ip().to_string()]})
                        }
                        InterceptTarget::Cidr { net, port } => {
                            json!({"target": format!("{net}:{port}"), "resolved": [net.to_string()]})
                        }
                    })
                    .collect();
                json!({
                    "name": s.service.name,
                    "connector": s.service.connector.name(),
                    "listen_on": s.service.listen_on.as_ref().map(ListenAddr::to_string),
                    "intercept": intercept,
                })
            })
            .collect();
        let (conns, total) = self.tracker.live(MAX_CONNECTIONS_LISTED);
        let connections: Vec<Value> = conns
            .iter()
            .map(|c| {
                let (up, down) = c.bytes();
                json!({
                    "id": c.id,
                    "service": c.service,
                    "connector": c.connector,
                    "caller": c.caller.as_ref().map(|k| json!({
                        "pid": k.pid,
                        "uid": k.uid,
                        "gid": k.gid,
                        "cgroup": k.cgroup_id,
                        "cgroup_path": k.cgroup.as_ref().map(|p| p.display().to_string()),
                        "comm": k.comm,
                        "exe": k.exe.as_ref().map(|p| p.display().to_string()),
                    })),
                    "client": c.client,
                    "dst": c.dst.map(|d| d.to_string()),
                    "since_unix_ms": unix_ms(c.since),
                    "age_ms": now.duration_since(c.since).map_or(0, ms),
                    "phase": c.phase().word(),
                    "bytes_up": up,
                    "bytes_down": down,
                })
            })
            .collect();
        // The store of the configuration in force (a reload brings a new one).
        let secrets = Arc::clone(&self.runtime.load().env.secrets);
        let providers: Vec<Value> = secrets
            .providers()
            .iter()
            .map(|p| {
                json!({
                    "name": p.name,
                    "kind": p.kind,
                    "breaker": p.breaker,
                    "failures": p.failures,
                    "retry_in_ms": p.retry_in.map(ms),
                    "last_error": p.last_error.map(|(k, _)| k),
                    "last_error_age_ms": p.last_error.map(|(_, at)| now.duration_since(at).map_or(0, ms)),
                })
            })
            .collect();
        let cache_all = secrets.cache_state();
        let cache_total = cache_all.len();
        let cache: Vec<Value> = cache_all
            .iter()
            .take(MAX_CACHE_LISTED)
            .map(|e| {
                json!({
                    "provider": e.provider,
                    "ids": e.ids,
                    "state": e.state,
                    "age_ms": ms(e.age),
                    "fresh_for_ms": ms(e.fresh_for),
                    "kept_for_ms": ms(e.kept_for),
                })
            })
            .collect();
        json!({
            "version": env!("CARGO_PKG_VERSION"),
            "pid": std::process::id(),
            "uptime_ms": now.duration_since(self.started).map_or(0, ms),
            "generation": rt.generation,
            "ready": self.readiness.is_ready(),
            "transparent": self.transparent.map(|a| a.to_string()),
            "cgroup": interceptor.as_ref().map(|i| i.cgroup().display().to_string()),
            "services": services,
            "connections": {"open": total, "list": connections},
            "providers": providers,
            "cache": {"groups": cache_total, "list": cache},
            "revocations": crate::admin_revoke::status(self),
        })
    }
}

// ---- the client: `broker status` ------------------------------------------------------

/// `broker status [--socket PATH] [--json]`: ask the daemon and print its answer.
/// Returns the exit status (0, or 1 with a message on stderr).
#[must_use]
pub fn status_command(socket: &Path, as_json: bool) -> i32 {
    match request(socket, &json!({"cmd": "status"})) {
        Ok(reply) => {
            if reply.get("ok") != Some(&Value::Bool(true)) {
                let why = reply
                    .get("error")
                    .and_then(Value::as_str)
                    .unwrap_or("no reason given");
                let _ = writeln!(
                    std::io::stderr(),
                    "broker status: the daemon refused: {why}"
                );
                return 1;
            }
            let status = reply.get("status").cloned().unwrap_or(Value::Null);
            let text = if as_json {
                serde_json::to_string_pretty(&status).unwrap_or_default() + "\n"
            } else {
                render(&status)
            };
            let _ = std::io::stdout().write_all(text.as_bytes());
            0
        }
        Err(e) => {
            let _ = writeln!(std::io::stderr(), "broker status: {e}");
            1
        }
    }
}

/// Send one request to the admin socket at `socket` and read the reply.
///
/// # Errors
/// The socket cannot be reached (with a hint for a missing socket or a refused
/// permission), or the reply is not JSON.
pub fn request(socket: &Path, req: &Value) -> Result<Value, String> {
    let shown = socket.display();
    let mut s = std::os::unix::net::UnixStream::connect(socket).map_err(|e| match e.kind() {
        std::io::ErrorKind::PermissionDenied => format!(
            "{shown}: {e}: the admin socket is root's (mode 0600): run broker status as root"
        ),
        std::io::ErrorKind::NotFound | std::io::ErrorKind::ConnectionRefused => format!(
            "{shown}: {e}: no daemon serves it (is the broker running? is broker.adminSocket set elsewhere? pass --socket)"
        ),
        _ => format!("{shown}: {e}"),
    })?;
    let timeout = Some(Duration::from_secs(10));
    let _ = s.set_read_timeout(timeout);
    let _ = s.set_write_timeout(timeout);
    let mut line = req.to_string();
    line.push('\n');
    s.write_all(line.as_bytes())
        .map_err(|e| format!("{shown}: sending the request: {e}"))?;
    let mut reply = Vec::new();
    std::io::BufReader::new((&s).take(MAX_REPLY))
        .read_until(b'\n', &mut reply)
        .map_err(|e| format!("{shown}: reading the reply: {e}"))?;
    serde_json::from_slice(&reply).map_err(|e| format!("{shown}: the reply is not JSON: {e}"))
}

fn human_ms(v: &Value) -> String {
    let Some(ms) = v.as_u64() else {
        return "-".to_owned();
    };
    if ms < 1000 {
        format!("{ms}ms")
    } else if ms < 120_000 {
        format!("{:.1}s", ms as f64 / 1000.0)
    } else if ms < 7_200_000 {
        format!("{}m{}s", ms / 60_000, ms % 60_000 / 1000)
    } else {
        format!("{}h{}m", ms / 3_600_000, ms % 3_600_000 / 60_000)
    }
}

fn text(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        Value::Null => "-".to_owned(),
        other => other.to_string(),
    }
}

/// The `status` document as text for people.
#[must_use]
pub fn render(s: &Value) -> String {
    use std::fmt::Write as _;
    let mut o = String::new();
    let _ = writeln!(
        o,
        "broker {}, pid {}, up {}, configuration generation {}, {}",
        text(&s["version"]),
        text(&s["pid"]),
        human_ms(&s["uptime_ms"]),
        text(&s["generation"]),
        if s["ready"] == Value::Bool(true) {
            "ready"
        } else {
            "NOT ready"
        }
    );
    match (&s["transparent"], &s["cgroup"]) {
        (Value::String(t), Value::String(c)) => {
            let _ = writeln!(o, "transparent listener {t}, programs attached to {c}");
        }
        (Value::String(t), _) => {
            let _ = writeln!(o, "transparent listener {t}");
        }
        _ => {
            let _ = writeln!(o, "no eBPF programs (listenOn listeners only)");
        }
    }
    let empty = Vec::new();
    let services = s["services"].as_array().unwrap_or(&empty);
    let _ = writeln!(o, "\nSERVICES ({})", services.len());
    for svc in services {
        let _ = write!(o, "  {}  {}", text(&svc["name"]), text(&svc["connector"]));
        if let Value::String(l) = &svc["listen_on"] {
            let _ = write!(o, "  listenOn {l}");
        }
        let _ = writeln!(o);
        for t in svc["intercept"].as_array().unwrap_or(&empty) {
            let resolved: Vec<String> = t["resolved"]
                .as_array()
                .unwrap_or(&empty)
                .iter()
                .map(text)
                .collect();
            let _ = writeln!(
                o,
                "    intercept {} -> {}",
                text(&t["target"]),
                if resolved.is_empty() {
                    "(not resolved)".to_owned()
                } else {
                    resolved.join(", ")
                }
            );
        }
    }
    let conns = s["connections"]["list"].as_array().unwrap_or(&empty);
    let open = s["connections"]["open"].as_u64().unwrap_or(0);
    let _ = writeln!(o, "\nCONNECTIONS ({open} open)");
    for c in conns {
        let who = match &c["caller"] {
            Value::Object(k) => format!(
                "pid {} uid {} gid {} cgroup {} comm {}",
                text(&k["pid"]),
                text(&k["uid"]),
                text(&k["gid"]),
                text(&k["cgroup"]),
                text(&k["comm"])
            ),
            _ => "caller unknown".to_owned(),
        };
        let _ = writeln!(
            o,
            "  #{} {} ({})  {}  from {}{}  {} for {}  up {} B down {} B",
            text(&c["id"]),
            text(&c["service"]),
            text(&c["connector"]),
            who,
            text(&c["client"]),
            match &c["dst"] {
                Value::String(d) => format!(" to {d}"),
                _ => String::new(),
            },
            text(&c["phase"]),
            human_ms(&c["age_ms"]),
            text(&c["bytes_up"]),
            text(&c["bytes_down"]),
        );
    }
    if (conns.len() as u64) < open {
        let _ = writeln!(o, "  ... {} more", open - conns.len() as u64);
    }
    let providers = s["providers"].as_array().unwrap_or(&empty);
    let _ = writeln!(o, "\nPROVIDERS ({})", providers.len());
    for p in providers {
        let _ = write!(
            o,
            "  {} ({})  breaker {}",
            text(&p["name"]),
            text(&p["kind"]),
            text(&p["breaker"])
        );
        if p["breaker"] == "open" {
            let _ = write!(o, ", next probe in {}", human_ms(&p["retry_in_ms"]));
        } else if p["failures"].as_u64().unwrap_or(0) > 0 && p["breaker"] == "closed" {
            let _ = write!(o, ", {} failure(s) in a row", text(&p["failures"]));
        }
        if let Value::String(k) = &p["last_error"] {
            let _ = write!(
                o,
                "; last error {k} {} ago",
                human_ms(&p["last_error_age_ms"])
            );
        }
        let _ = writeln!(o);
    }
    let groups = s["cache"]["list"].as_array().unwrap_or(&empty);
    let _ = writeln!(
        o,
        "\nCACHE ({} group(s))",
        s["cache"]["groups"].as_u64().unwrap_or(0)
    );
    for g in groups {
        let ids: Vec<String> = g["ids"]
            .as_array()
            .unwrap_or(&empty)
            .iter()
            .map(text)
            .collect();
        let _ = writeln!(
            o,
            "  {}  {}  {}, age {}, fresh for {}, kept for {}",
            text(&g["provider"]),
            ids.join(","),
            text(&g["state"]),
            human_ms(&g["age_ms"]),
            human_ms(&g["fresh_for_ms"]),
            human_ms(&g["kept_for_ms"]),
        );
    }
    crate::admin_revoke::render(&mut o, s);
    o
}

#[cfg(test)]
mod tests {
    use super::*;

    fn admin() -> Admin {
        let cfg = crate::config::load_str(
            "version: 2\nbroker:\n  health: off\nservices:\n  db:\n    connector: tcp\n    listenOn: tcp://127.0.0.1:1\n    intercept: [\"10.9.8.7:5432\", \"db.example.test:5432\", \"10.1.0.0/16:5432\"]\n    credentials:\n      host: 127.0.0.1\n      password: {from: env, get: DB_PASSWORD}\n",
            &crate::connector::KINDS,
        )
        .expect("config loads");
        let runtime = Arc::new(Current::new(
            crate::runtime::Runtime::build(
                &cfg,
                1,
                crate::connector::Env {
                    secrets: Arc::new(crate::secrets::SecretStore::new(&cfg).expect("store")),
                    dialer: crate::connector::dial::Dialer { mark: 0 },
                    ca: None,
                },
            )
            .expect("runtime"),
        ));
        Admin {
            runtime,
            tracker: Arc::new(Tracker::default()),
            names: Arc::new(HostNames::default()),
            interceptor: None,
            readiness: Arc::new(Readiness::default()),
            transparent: None,
            started: SystemTime::now(),
            revocations: Arc::default(),
        }
    }

    #[test]
    fn status_lists_services_connections_and_providers_and_unknown_commands_fail() {
        let a = admin();
        let guard = a.tracker.register(crate::drain::LiveConn::new(
            "db".into(),
            "tcp".into(),
            Some(crate::connector::Caller {
                pid: 42,
                uid: 1000,
                gid: 1000,
                cgroup_id: 77,
                comm: "psql".into(),
                thread: "psql".into(),
                cgroup: None,
                exe: Some("/usr/bin/psql".into()),
            }),
            "127.0.0.1:40000".into(),
            Some("10.9.8.7:5432".parse().unwrap()),
        ));
        guard
            .conn()
            .up
            .fetch_add(5, std::sync::atomic::Ordering::Relaxed);
        let r = a.answer(&json!({"cmd": "status"}));
        assert_eq!(r["ok"], true, "{r}");
        let s = &r["status"];
        assert_eq!(s["generation"], 1);
        assert_eq!(s["services"][0]["name"], "db");
        assert_eq!(s["services"][0]["listen_on"], "tcp://127.0.0.1:1");
        let intercept = &s["services"][0]["intercept"];
        assert_eq!(intercept[0]["target"], "10.9.8.7:5432");
        assert_eq!(intercept[0]["resolved"][0], "10.9.8.7");
        assert_eq!(intercept[1]["target"], "db.example.test:5432");
        assert_eq!(intercept[1]["resolved"].as_array().map(Vec::len), Some(0));
        assert_eq!(intercept[2]["target"], "10.1.0.0/16:5432");
        let c = &s["connections"]["list"][0];
        assert_eq!(s["connections"]["open"], 1);
        assert_eq!(c["caller"]["pid"], 42);
        assert_eq!(c["caller"]["comm"], "psql");
        assert_eq!(c["caller"]["exe"], "/usr/bin/psql");
        assert_eq!(c["phase"], "handshake");
        assert_eq!(c["bytes_up"], 5);
        assert_eq!(c["dst"], "10.9.8.7:5432");
        let env = s["providers"]
            .as_array()
            .unwrap()
            .iter()
            .find(|p| p["name"] == "env")
            .expect("the built-in env provider");
        assert_eq!(env["kind"], "env");
        assert!(env["last_error"].is_null());
        let text = render(s);
        println!("{text}");
        assert!(text.contains("SERVICES (1)"), "{text}");
        assert!(
            text.contains("pid 42 uid 1000 gid 1000 cgroup 77 comm psql"),
            "{text}"
        );
        assert!(
            text.contains("intercept db.example.test:5432 -> (not resolved)"),
            "{text}"
        );
        drop(guard);
        let r = a.answer(&json!({"cmd": "status"}));
        assert_eq!(r["status"]["connections"]["open"], 0);
        let r = a.answer(&json!({"cmd": "reboot"}));
        assert_eq!(r["ok"], false);
        assert!(r["error"].as_str().unwrap().contains("unknown command"));
        // `revoke` needs a caller; one that selects is listed by status and lifted.
        let r = a.answer(&json!({"cmd": "revoke", "service": "db"}));
        assert!(
            r["error"].as_str().unwrap().contains("needs a caller"),
            "{r}"
        );
        let r = a.answer(
            &json!({"cmd": "revoke", "service": "db", "selector": {"uid": 7, "exe": null}}),
        );
        assert_eq!(r["revoke"]["id"], 1, "{r}");
        assert_eq!(
            a.answer(&json!({"cmd": "status"}))["status"]["revocations"][0]["selector"]["uid"],
            7
        );
        assert_eq!(a.answer(&json!({"cmd": "lift", "id": 1}))["ok"], true);
        assert_eq!(a.answer(&json!({"cmd": "lift", "id": 1}))["ok"], false);
        assert_eq!(a.answer(&json!({}))["ok"], false);
    }

    fn broker_block(extra: &str) -> Result<crate::config::Config, String> {
        crate::config::load_str(
            &format!(
                "version: 2\nbroker:\n{extra}services:\n  db:\n    connector: tcp\n    listenOn: tcp://127.0.0.1:1\n    credentials:\n      host: 127.0.0.1\n"
            ),
            &crate::connector::KINDS,
        )
        .map_err(|e| e.to_string())
    }

    #[test]
    fn admin_socket_and_metrics_keys() {
        let c = broker_block("  health: off\n").unwrap();
        assert_eq!(c.broker.admin_socket, AdminSocket::Default);
        assert!(c.broker.metrics);
        let c = broker_block("  adminSocket: off\n  metrics: false\n").unwrap();
        assert_eq!(c.broker.admin_socket, AdminSocket::Off);
        assert!(!c.broker.metrics);
        let c = broker_block("  adminSocket: /run/b/a.sock\n").unwrap();
        assert_eq!(
            c.broker.admin_socket,
            AdminSocket::Path("/run/b/a.sock".into())
        );
        for (bad, why) in [
            ("relative.sock", "absolute path"),
            ("/run/b/", "name a file"),
            (&format!("/{}", "x".repeat(120)), "at most 107"),
        ] {
            let e = broker_block(&format!("  adminSocket: \"{bad}\"\n")).unwrap_err();
            assert!(e.contains("broker.adminSocket") && e.contains(why), "{e}");
        }
        let e = broker_block("  metrics: maybe\n").unwrap_err();
        assert!(e.contains("broker.metrics"), "{e}");
    }

    /// The socket is 0600, answers one request per connection, and goes at the end.
    #[tokio::test]
    async fn the_socket_is_private_answers_and_is_removed() {
        use std::os::unix::fs::PermissionsExt as _;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("admin.sock");
        let bound = bind(&AdminSocket::Path(path.clone())).unwrap().unwrap();
        let mode = std::fs::symlink_metadata(&path)
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        let (tx, rx) = watch::channel(false);
        let task = tokio::spawn(serve(bound, Arc::new(admin()), rx));
        let p = path.clone();
        let reply = tokio::task::spawn_blocking(move || request(&p, &json!({"cmd": "status"})))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(reply["ok"], true);
        let p = path.clone();
        let bad = tokio::task::spawn_blocking(move || {
            let mut s = std::os::unix::net::UnixStream::connect(&p).unwrap();
            s.write_all(b"not json\n").unwrap();
            let mut out = String::new();
            s.read_to_string(&mut out).unwrap();
            out
        })
        .await
        .unwrap();
        assert!(bad.contains("\"ok\":false"), "{bad}");
        // A second daemon on the same configured path is refused.
        let e = bind(&AdminSocket::Path(path.clone())).unwrap_err();
        assert!(e.to_string().contains("another process"), "{e}");
        tx.send(true).unwrap();
        task.await.unwrap();
        assert!(
            std::fs::symlink_metadata(&path).is_err(),
            "removed at the end"
        );
    }
}
