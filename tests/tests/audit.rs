//! The audit log (`broker.audit`): one JSON line per credential access, written by the
//! daemon's own sink, checked field by field after real traffic.
//!
//! * A real PostgreSQL behind two `pg` services: `db`, intercepted in a test cgroup,
//!   password from a `file`; `db2` on a `listenOn`, password from an `http` store (the
//!   local secret server). The real `psql` binary runs as `nobody` inside the cgroup
//!   (through `setpriv`, which execs it: the pid we spawn is psql's). Every audit line
//!   is parsed as JSON; the caller (pid, uid, gid, executable, cgroup path, comm), the
//!   provider, the secret id, the cache (miss, then hit), the result, the latency and
//!   `version_hmac` (the same for the same value, another after a rotation, found by
//!   the connector's refetch after the server rejected the old password); the access
//!   line carries the caller's executable and cgroup path too.
//! * Rotation at a small `maxSize` keeps `keep` files of whole JSON lines, mode 0600.
//! * `stdout: true` writes the same lines to the daemon's standard output.
//!
//! Every audit file, the daemon log and the clients' output are grepped for the secret
//! values and the store's token.

use std::{
    os::unix::fs::PermissionsExt as _,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use broker_tests::{
    Daemon, assert_no_secret, fetch, free_port,
    net::{TestCgroup, Upstream, cgroup2_root},
    pg::{PG_BIN, PgAuth, PgOptions, PgServer},
    privileged,
    secret_server::SecretServer,
    write_file,
};
use serde_json::Value;

const TOKEN: &str = "audit-test-bearer-5d20c7";
const PW1: &str = "audit-test-pw-one-8c31f2";
const PW2: &str = "audit-test-pw-two-47e0ab";
const NOBODY: u32 = 65534;

/// Every JSON line of `path` (panics on a line that is not JSON).
fn json_lines(path: &Path) -> Vec<Value> {
    std::fs::read_to_string(path)
        .unwrap_or_else(|e| panic!("reading {}: {e}", path.display()))
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}")))
        .collect()
}

/// Wait until `path` holds at least `n` lines (the sink writes from its own thread).
fn wait_lines(path: &Path, n: usize) -> Vec<Value> {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let text = std::fs::read_to_string(path).unwrap_or_default();
        if text.lines().count() >= n || Instant::now() > deadline {
            return json_lines(path);
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn mode(p: &Path) -> u32 {
    std::fs::metadata(p)
        .unwrap_or_else(|e| panic!("{}: {e}", p.display()))
        .permissions()
        .mode()
        & 0o7777
}

/// The real psql binary (not Debian's wrapper script) as `nobody`, in `cg` when given,
/// with `conninfo`; bounded to 30 s. Returns (pid, success, output).
fn psql_as_nobody(cg: Option<&TestCgroup>, conninfo: &str) -> (u32, bool, String) {
    let mut c = Command::new("setpriv");
    c.args(["--reuid=65534", "--regid=65534", "--clear-groups", "--"])
        .arg(Path::new(PG_BIN).join("psql"))
        .args(["-X", "-w", "-A", "-t", "-v", "ON_ERROR_STOP=1", conninfo])
        .args(["-c", "select 'ok:' || current_user"])
        .env_remove("PGPASSWORD")
        .env_remove("PGSERVICE")
        .env("PGCONNECT_TIMEOUT", "10")
        .current_dir("/")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    if let Some(cg) = cg {
        cg.enter(&mut c);
    }
    let mut child = c.spawn().expect("spawn setpriv psql");
    let pid = child.id();
    let deadline = Instant::now() + Duration::from_secs(30);
    while child.try_wait().expect("try_wait").is_none() {
        if Instant::now() > deadline {
            let _ = child.kill();
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let out = child.wait_with_output().expect("psql output");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (pid, out.status.success(), text)
}

/// The lines of `service`, in order.
fn of_service<'a>(lines: &'a [Value], service: &str) -> Vec<&'a Value> {
    lines.iter().filter(|l| l["service"] == service).collect()
}

#[track_caller]
fn assert_common(l: &Value, service: &str, provider: &str, secret: &str) {
    let time = l["time"].as_str().expect("time");
    assert!(
        time.len() >= 20 && time.as_bytes()[10] == b'T' && time.ends_with('Z'),
        "RFC 3339 UTC: {time}"
    );
    assert_eq!(l["event"], "credential", "{l}");
    assert_eq!(l["service"], service, "{l}");
    assert_eq!(l["provider"], provider, "{l}");
    assert_eq!(l["secret"], secret, "{l}");
    assert_eq!(l["credentials"], serde_json::json!(["password"]), "{l}");
    assert_eq!(l["result"], "ok", "{l}");
    assert_eq!(l["error"], Value::Null, "{l}");
    let ms = l["latency_ms"].as_f64().expect("latency_ms");
    assert!((0.0..10_000.0).contains(&ms), "{l}");
    let h = l["version_hmac"].as_str().expect("version_hmac");
    assert!(
        h.starts_with("hmac-sha256:")
            && h.len() == 12 + 64
            && h[12..].bytes().all(|b| b.is_ascii_hexdigit()),
        "{h}"
    );
}

/// Intercepted (`file` provider) and `listenOn` (`http` store) PostgreSQL services;
/// every field of every audit line; `version_hmac` across a rotation.
#[test]
fn credential_accesses_are_audited_field_by_field() {
    if !privileged() {
        return;
    }
    let mut pg = PgServer::start(PgOptions::new(PgAuth::Scram, PW1));
    let store = SecretServer::start(TOKEN);
    store.set("db/password", PW1);
    let dir = tempfile::tempdir().expect("tempdir");
    let pw_file = write_file(dir.path(), "pw", PW1);
    let audit = dir.path().join("audit/audit.log");
    let key = dir.path().join("state/audit.key");
    let cg = TestCgroup::new("audit");
    let (health, listen) = (free_port(), free_port());
    let pg_port = pg.addr().port();
    let creds = |password: &str| {
        format!(
            "    credentials:\n      host: 127.0.0.1\n      port: \"{pg_port}\"\n      sslmode: disable\n      username: app_user\n      password: {password}\n"
        )
    };
    let cfg = write_file(
        dir.path(),
        "broker.yaml",
        &format!(
            "version: 2\nproviders:\n  uts: {{type: http, baseUrl: \"{}\", token: {TOKEN}}}\nbroker:\n  health: 127.0.0.1:{health}\n  cacheTTL: 10m\n  audit:\n    file: {}\n    hmacKey: {}\nservices:\n  db:\n    connector: pg\n    intercept: [\"127.0.0.2:5432\"]\n{}  db2:\n    connector: pg\n    listenOn: tcp://127.0.0.1:{listen}\n{}",
            store.base_url(),
            audit.display(),
            key.display(),
            creds(&format!("{{from: file, get: {}}}", pw_file.display())),
            creds("{from: uts, get: db/password}"),
        ),
    );
    let mut d = Daemon::start(
        &cfg,
        &[
            "--cgroup",
            cg.path.to_str().expect("UTF-8 cgroup path"),
            "--log-format",
            "json",
        ],
        format!("127.0.0.1:{health}").parse().expect("addr"),
        &dir.path().join("broker.log"),
    );
    let mut outputs = String::new();

    // Intercepted, twice: a miss, then a hit.
    let intercepted = "host=127.0.0.2 port=5432 user=app_user dbname=app sslmode=disable";
    let mut pids = Vec::new();
    for _ in 0..2 {
        let (pid, ok, out) = psql_as_nobody(Some(&cg), intercepted);
        assert!(ok && out.contains("ok:app_user"), "{out}\n{}", d.log_text());
        pids.push(pid);
        outputs += &out;
    }
    // listenOn, twice.
    let listened = format!("host=127.0.0.1 port={listen} user=app_user dbname=app sslmode=disable");
    for _ in 0..2 {
        let (_, ok, out) = psql_as_nobody(None, &listened);
        assert!(ok && out.contains("ok:app_user"), "{out}\n{}", d.log_text());
        outputs += &out;
    }
    // Rotation: the server and the store change together; the cached password is
    // rejected, the connector fetches again (fresh) and gets in.
    pg.set_password(PW2);
    store.set("db/password", PW2);
    let (_, ok, out) = psql_as_nobody(None, &listened);
    assert!(ok && out.contains("ok:app_user"), "{out}\n{}", d.log_text());
    outputs += &out;

    let lines = wait_lines(&audit, 6);
    assert_eq!(lines.len(), 6, "{lines:#?}");
    assert_eq!(mode(&audit), 0o600);
    assert_eq!(mode(&key), 0o600);

    // db: the file provider, caller = psql.
    let exe = std::fs::canonicalize(Path::new(PG_BIN).join("psql")).expect("psql path");
    let cg_path = Path::new("/").join(cg.path.strip_prefix(cgroup2_root()).expect("under root"));
    let db = of_service(&lines, "db");
    assert_eq!(db.len(), 2, "{db:#?}");
    for (l, (pid, cache)) in db.iter().zip(pids.iter().zip(["miss", "hit"])) {
        assert_common(l, "db", "file", pw_file.to_str().expect("UTF-8"));
        assert_eq!(l["cache"], cache, "{l}");
        assert_eq!(l["fresh"], false, "{l}");
        let c = &l["caller"];
        assert_eq!(c["pid"], *pid, "{l}");
        assert_eq!(c["uid"], NOBODY, "{l}");
        assert_eq!(c["gid"], NOBODY, "{l}");
        assert_eq!(c["exe"], exe.to_str().expect("UTF-8"), "{l}");
        assert_eq!(c["cgroup"], cg_path.to_str().expect("UTF-8"), "{l}");
        assert_eq!(c["comm"], "psql", "{l}");
        assert!(c["cgroup_id"].as_u64().is_some_and(|id| id > 0), "{l}");
    }
    assert_eq!(
        db[0]["version_hmac"], db[1]["version_hmac"],
        "the same value, the same HMAC"
    );

    // db2: the http store, no caller identity on a TCP listenOn.
    let db2 = of_service(&lines, "db2");
    assert_eq!(db2.len(), 4, "{db2:#?}");
    let words: Vec<(&str, bool)> = db2
        .iter()
        .map(|l| (l["cache"].as_str().unwrap_or("?"), l["fresh"] == true))
        .collect();
    assert_eq!(
        words,
        [
            ("miss", false),
            ("hit", false),
            // After the rotation: the cached value, rejected, then fetched again.
            ("hit", false),
            ("miss", true)
        ],
        "{db2:#?}"
    );
    for l in &db2 {
        assert_common(l, "db2", "uts", "db/password");
        assert_eq!(l["caller"], Value::Null, "{l}");
    }
    let h = |l: &Value| l["version_hmac"].as_str().unwrap_or_default().to_owned();
    assert_eq!(h(db2[0]), h(db2[1]));
    assert_eq!(h(db2[1]), h(db2[2]), "the cached (old) value, its HMAC");
    assert_ne!(h(db2[3]), h(db2[2]), "rotated: another HMAC");
    assert_ne!(h(db[0]), String::new());
    // The same password from two providers: the same HMAC (the value's, as Vault's).
    assert_eq!(h(db[0]), h(db2[0]));

    // The access lines carry the caller's executable and cgroup path.
    assert!(d.stop().success());
    let log = d.log_text();
    let access: Vec<Value> = log
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .filter(|v| v["target"] == "access" && v["service"] == "db")
        .collect();
    assert_eq!(access.len(), 2, "{log}");
    for (a, pid) in access.iter().zip(&pids) {
        assert_eq!(a["caller.pid"], *pid, "{a}");
        assert_eq!(a["caller.exe"], exe.to_str().expect("UTF-8"), "{a}");
        assert_eq!(
            a["caller.cgroup_path"],
            cg_path.to_str().expect("UTF-8"),
            "{a}"
        );
    }
    let audit_text = std::fs::read_to_string(&audit).expect("audit");
    assert_no_secret(
        &format!("{outputs}{log}{audit_text}"),
        &[PW1, PW2, TOKEN],
        "client output, daemon log and audit file",
    );
}

/// `tcp` services from the secret server, no PostgreSQL: `maxSize: 2KiB`, `keep: 2`.
fn start_tcp(dir: &Path, store: &SecretServer, web: &Upstream, audit: &str) -> (Daemon, u16) {
    let (health, port) = (free_port(), free_port());
    let cfg = write_file(
        dir,
        "broker.yaml",
        &format!(
            "version: 2\nproviders:\n  uts: {{type: http, baseUrl: \"{}\", token: {TOKEN}}}\nbroker:\n  health: 127.0.0.1:{health}\n  cacheTTL: 10m\n  audit:\n{audit}services:\n  web:\n    connector: tcp\n    listenOn: tcp://127.0.0.1:{port}\n    credentials:\n      host: 127.0.0.1\n      port: \"{}\"\n      password: {{from: uts, get: web/password}}\n",
            store.base_url(),
            web.addr.port()
        ),
    );
    let d = Daemon::start(
        &cfg,
        &["--no-ebpf", "--log-format", "json"],
        format!("127.0.0.1:{health}").parse().expect("addr"),
        &dir.join("broker.log"),
    );
    (d, port)
}

/// Many accesses through a 2 KiB audit file keeping 2: exactly `audit.log`,
/// `audit.log.1`, `audit.log.2`, each at most 2 KiB of whole JSON lines, mode 0600, in
/// time order, the newest access last.
#[test]
fn rotation_keeps_keep_files_of_whole_lines() {
    const CONNS: usize = 30;
    let store = SecretServer::start(TOKEN);
    store.set("web/password", PW1);
    let web = Upstream::start("127.0.0.1", "web");
    let dir = tempfile::tempdir().expect("tempdir");
    let logs = dir.path().join("logs");
    let audit = logs.join("audit.log");
    let (mut d, port) = start_tcp(
        dir.path(),
        &store,
        &web,
        &format!(
            "    file: {}\n    maxSize: 2KiB\n    keep: 2\n    hmacKey: {}\n",
            audit.display(),
            dir.path().join("audit.key").display()
        ),
    );
    for _ in 0..CONNS {
        assert_eq!(fetch(port), "hello from web");
    }
    assert!(d.stop().success(), "{}", d.log_text());
    let mut names: Vec<String> = std::fs::read_dir(&logs)
        .expect("logs dir")
        .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    assert_eq!(names, ["audit.log", "audit.log.1", "audit.log.2"]);
    assert_eq!(mode(&logs), 0o700, "the directory it created");
    let mut all = Vec::new();
    let mut text = String::new();
    for name in ["audit.log.2", "audit.log.1", "audit.log"] {
        let p: PathBuf = logs.join(name);
        assert_eq!(mode(&p), 0o600, "{name}");
        let len = std::fs::metadata(&p).expect("meta").len();
        assert!(len > 0 && len <= 2048, "{name}: {len} bytes");
        text += &std::fs::read_to_string(&p).expect("read");
        all.extend(json_lines(&p));
    }
    assert!(
        all.len() < CONNS,
        "older files were dropped ({} lines kept)",
        all.len()
    );
    let times: Vec<&str> = all
        .iter()
        .map(|l| l["time"].as_str().expect("time"))
        .collect();
    let mut sorted = times.clone();
    sorted.sort_unstable();
    assert_eq!(times, sorted, "in time order across the files");
    for l in &all {
        assert_eq!(l["event"], "credential");
        assert_eq!(l["service"], "web");
        assert_eq!(l["secret"], "web/password");
        assert_eq!(l["cache"], "hit", "the first (miss) was rotated away");
    }
    assert_no_secret(
        &format!("{text}{}", d.log_text()),
        &[PW1, TOKEN],
        "audit files and daemon log",
    );
}

/// `stdout: true`: the same JSON lines on the daemon's standard output, among its log.
#[test]
fn stdout_sink_writes_the_lines_to_standard_output() {
    let store = SecretServer::start(TOKEN);
    store.set("web/password", PW1);
    let web = Upstream::start("127.0.0.1", "web");
    let dir = tempfile::tempdir().expect("tempdir");
    let (mut d, port) = start_tcp(dir.path(), &store, &web, "    stdout: true\n");
    assert_eq!(fetch(port), "hello from web");
    assert_eq!(fetch(port), "hello from web");
    assert!(d.stop().success());
    let log = d.log_text();
    let lines: Vec<Value> = log
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .filter(|v| v["event"] == "credential")
        .collect();
    let caches: Vec<&str> = lines
        .iter()
        .map(|l| l["cache"].as_str().unwrap_or("?"))
        .collect();
    assert_eq!(caches, ["miss", "hit"], "{log}");
    assert!(
        lines.iter().all(|l| l.get("version_hmac").is_none()),
        "no key, no HMAC"
    );
    assert_no_secret(&log, &[PW1, TOKEN], "daemon output");
}
