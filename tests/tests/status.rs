//! `broker status` over the admin socket, while a real `psql` session through an
//! intercepted service is open in the broker's cgroup:
//!
//! * the JSON document, field by field: the service, its intercepted destinations with
//!   the addresses they resolve to, the open connection with the caller's identity
//!   (psql's pid, uid, gid, cgroup id, command), its phase (spliced) and bytes, the
//!   provider and its breaker, the cached credential group (ids, age, fresh; no value);
//! * the text rendering;
//! * the socket: mode 0600, owned by root; `runuser -u nobody -- broker status` is
//!   refused by the file mode (EACCES) with a message saying why; removed when the
//!   daemon stops;
//! * once psql has quit, no connection is listed.
//!
//! No secret in any output.

use std::{
    io::{BufRead as _, BufReader, Write as _},
    os::unix::fs::{MetadataExt as _, PermissionsExt as _},
    path::Path,
    process::{Child, Command, Output, Stdio},
    time::{Duration, Instant},
};

use broker_tests::{
    assert_no_secret, broker_bin, output_text,
    pg::{PgAuth, PgOptions, PgServer},
    privileged, run_broker, write_file,
};
use serde_json::Value;

/// Kills the child on every way out.
struct Killed(Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn status(socket: &Path, json: bool) -> Output {
    let mut c = Command::new("timeout");
    c.args(["--kill-after=5", "20"])
        .arg(broker_bin())
        .arg("status")
        .arg("--socket")
        .arg(socket);
    if json {
        c.arg("--json");
    }
    c.stdin(Stdio::null()).output().expect("broker status")
}

fn status_json(socket: &Path) -> Value {
    let o = status(socket, true);
    assert!(o.status.success(), "{}", output_text(&o));
    serde_json::from_slice(&o.stdout).unwrap_or_else(|e| panic!("{e}: {}", output_text(&o)))
}

#[test]
fn status_shows_an_open_psql_session_and_the_socket_is_root_only() {
    if !privileged() {
        return;
    }
    let pw = "status-pw-0b7c3e51a9";
    let pg = PgServer::start(PgOptions::new(PgAuth::Scram, pw));
    let dir = tempfile::tempdir().expect("tempdir");
    // Anyone may reach the directory: the socket's own mode is what refuses.
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).expect("chmod");
    let pw_file = write_file(dir.path(), "pw", pw);
    std::fs::set_permissions(&pw_file, std::fs::Permissions::from_mode(0o600)).expect("chmod");
    let socket = dir.path().join("admin.sock");
    let b = run_broker(
        "status",
        &format!("  adminSocket: {}\n", socket.display()),
        &format!(
            "  db:\n    connector: pg\n    intercept: [\"127.0.0.2:5432\", \"localhost:15433\"]\n    credentials:\n      host: 127.0.0.1\n      port: \"{}\"\n      sslmode: disable\n      username: app_user\n      password: {{from: file, get: {}}}\n",
            pg.addr().port(),
            pw_file.display()
        ),
    );

    // The socket: 0600, root's.
    let m = std::fs::symlink_metadata(&socket).expect("the admin socket exists");
    assert_eq!(m.permissions().mode() & 0o777, 0o600);
    assert_eq!(m.uid(), 0);

    // Nothing open yet.
    let s = status_json(&socket);
    assert_eq!(s["connections"]["open"], 0, "{s}");

    // A psql session in the broker's cgroup, kept open.
    let mut c = Command::new("psql");
    c.args(["-X", "-w", "-A", "-t", "-v", "ON_ERROR_STOP=1"])
        .arg("host=127.0.0.2 port=5432 user=anyone dbname=app sslmode=disable")
        .env_remove("PGPASSWORD")
        .env("PGCONNECT_TIMEOUT", "10")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::null());
    b.cg.enter(&mut c);
    let mut psql = Killed(c.spawn().expect("spawn psql"));
    let pid = psql.0.id();
    let mut stdin = psql.0.stdin.take().expect("stdin");
    let mut out = BufReader::new(psql.0.stdout.take().expect("stdout"));
    stdin
        .write_all(b"select 'ready-' || 42;\n")
        .expect("write a query");
    let mut line = String::new();
    out.read_line(&mut line).expect("psql answers");
    assert_eq!(line.trim(), "ready-42", "{}", b.daemon.log_text());

    let s = status_json(&socket);
    let text_out = status(&socket, false);
    assert!(text_out.status.success(), "{}", output_text(&text_out));
    let text = String::from_utf8_lossy(&text_out.stdout).into_owned();

    // The daemon.
    assert_eq!(s["ready"], true, "{s}");
    assert_eq!(s["generation"], 1);
    assert_eq!(s["pid"], b.daemon.child.id());
    assert!(
        s["transparent"]
            .as_str()
            .is_some_and(|t| t.starts_with("127.0.0.1:")),
        "{s}"
    );
    assert_eq!(s["cgroup"], b.cg.path.display().to_string());

    // The service and what its destinations stand for now.
    let svc = &s["services"][0];
    assert_eq!(svc["name"], "db");
    assert_eq!(svc["connector"], "pg");
    assert!(svc["listen_on"].is_null());
    assert_eq!(svc["intercept"][0]["target"], "127.0.0.2:5432");
    assert_eq!(
        svc["intercept"][0]["resolved"],
        serde_json::json!(["127.0.0.2"])
    );
    assert_eq!(svc["intercept"][1]["target"], "localhost:15433");
    let resolved: Vec<&str> = svc["intercept"][1]["resolved"]
        .as_array()
        .expect("resolved")
        .iter()
        .filter_map(Value::as_str)
        .collect();
    assert!(resolved.contains(&"127.0.0.1"), "{s}");

    // The connection and who made it.
    assert_eq!(s["connections"]["open"], 1, "{s}");
    let conn = &s["connections"]["list"][0];
    assert_eq!(conn["service"], "db");
    assert_eq!(conn["connector"], "pg");
    assert_eq!(conn["dst"], "127.0.0.2:5432");
    assert_eq!(conn["caller"]["pid"], pid, "{conn}");
    assert_eq!(conn["caller"]["uid"], 0);
    assert_eq!(conn["caller"]["gid"], 0);
    assert_eq!(conn["caller"]["comm"], "psql");
    let cgroup_id = std::fs::metadata(&b.cg.path).expect("cgroup").ino();
    assert_eq!(conn["caller"]["cgroup"], cgroup_id, "{conn}");
    assert_eq!(conn["phase"], "spliced", "{conn}");
    assert!(conn["bytes_down"].as_u64().unwrap_or(0) > 0, "{conn}");
    assert!(conn["bytes_up"].as_u64().unwrap_or(0) > 0, "{conn}");
    assert!(
        conn["client"]
            .as_str()
            .is_some_and(|c| c.starts_with("127.0.0.1:"))
    );
    assert!(conn["age_ms"].as_u64().is_some());

    // The provider and the cached group (ids, times; no value).
    let file = s["providers"]
        .as_array()
        .expect("providers")
        .iter()
        .find(|p| p["name"] == "file")
        .expect("the file provider")
        .clone();
    assert_eq!(file["kind"], "file");
    assert_eq!(file["breaker"], "none");
    assert!(file["last_error"].is_null(), "{file}");
    assert_eq!(s["cache"]["groups"], 1, "{s}");
    let group = &s["cache"]["list"][0];
    assert_eq!(group["provider"], "file");
    assert_eq!(
        group["ids"],
        serde_json::json!([pw_file.display().to_string()])
    );
    assert_eq!(group["state"], "fresh");
    assert!(group["fresh_for_ms"].as_u64().unwrap_or(0) > 0, "{group}");

    // The same as text.
    for want in [
        "SERVICES (1)",
        "intercept 127.0.0.2:5432 -> 127.0.0.2",
        "CONNECTIONS (1 open)",
        &format!("pid {pid} uid 0 gid 0 cgroup {cgroup_id} comm psql"),
        "spliced for",
        "file (file)  breaker none",
        "CACHE (1 group(s))",
    ] {
        assert!(text.contains(want), "{want:?} missing:\n{text}");
    }

    // Another user: refused by the socket's mode.
    let o = Command::new("runuser")
        .args(["-u", "nobody", "--"])
        .arg(broker_bin())
        .arg("status")
        .arg("--socket")
        .arg(&socket)
        .stdin(Stdio::null())
        .output()
        .expect("runuser");
    let refused = output_text(&o);
    assert_eq!(o.status.code(), Some(1), "{refused}");
    assert!(
        refused.contains("Permission denied") && refused.contains("root"),
        "{refused}"
    );
    assert!(!refused.contains("\"services\""), "{refused}");

    // psql quits: the connection leaves the list.
    stdin.write_all(b"\\q\n").expect("quit");
    drop(stdin);
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let s = status_json(&socket);
        if s["connections"]["open"] == 0 {
            break;
        }
        assert!(Instant::now() < deadline, "{s}");
        std::thread::sleep(Duration::from_millis(50));
    }
    drop(psql);

    for (what, t) in [
        (
            "status --json",
            serde_json::to_string(&s).unwrap_or_default(),
        ),
        ("status", text),
        ("the daemon log", b.daemon.log_text()),
    ] {
        assert_no_secret(&t, &[pw], what);
    }
    let mut b = b;
    assert!(b.daemon.stop().success());
    assert!(
        std::fs::symlink_metadata(&socket).is_err(),
        "the socket is removed when the daemon stops"
    );
    drop(pg);
}
