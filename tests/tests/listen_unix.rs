//! `listenOn: unix:///PATH` listeners, without eBPF (`broker run --no-ebpf`), in front of
//! real servers: psql through `DIR/.s.PGSQL.5432` with `psql -h DIR` (Secretless' quick
//! start), the real `mariadb` client through `--socket`, curl through `--unix-socket`.
//! The socket file: a stale one replaced, a live one / a regular file / a directory / a
//! missing directory refused naming the path and the service, removed at exit, left
//! alone when someone else replaced it; mode and owner applied (and the broker-level
//! block overridden per service); an unprivileged user (`runuser -u nobody`) refused by a
//! 0660 root:root socket and let in when the socket's group is its own. The access log
//! names the peer (`SO_PEERCRED`: pid, uid, gid, comm). Every output and the log are
//! grepped for the secrets.

use std::{
    os::unix::fs::{FileTypeExt as _, MetadataExt as _, PermissionsExt as _},
    path::{Path, PathBuf},
    process::{Command, Output, Stdio},
    time::{Duration, Instant},
};

use broker_tests::{
    Daemon, assert_no_secret, broker_bin, free_port,
    http_server::HttpServer,
    mariadb::{self, MariaDb, MariaDbOptions, NATIVE_USER},
    output_text,
    pg::{PgAuth, PgOptions, PgServer, psql},
    privileged, write_file,
};

/// A daemon and its files; fields drop in order (daemon first).
struct Running {
    daemon: Daemon,
    dir: tempfile::TempDir,
}

fn config(dir: &Path, health: u16, broker_extra: &str, services: &str) -> PathBuf {
    write_file(
        dir,
        "broker.yaml",
        &format!(
            "version: 2\nbroker:\n  health: 127.0.0.1:{health}\n{broker_extra}services:\n{services}"
        ),
    )
}

fn start(broker_extra: &str, services: &str) -> Running {
    let dir = tempfile::tempdir().expect("tempdir");
    let health = free_port();
    let cfg = config(dir.path(), health, broker_extra, services);
    let daemon = Daemon::start(
        &cfg,
        &["--no-ebpf", "--log-format", "json"],
        format!("127.0.0.1:{health}").parse().expect("addr"),
        &dir.path().join("broker.log"),
    );
    Running { daemon, dir }
}

/// `broker run` on a configuration that must not start: its output (bounded: 20 s).
fn fails_to_start(services: &str) -> String {
    let dir = tempfile::tempdir().expect("tempdir");
    let cfg = config(dir.path(), free_port(), "", services);
    let mut child = Command::new(broker_bin())
        .args(["run", "-f"])
        .arg(&cfg)
        .arg("--no-ebpf")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn broker run");
    let deadline = Instant::now() + Duration::from_secs(20);
    while child.try_wait().expect("try_wait").is_none() {
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("broker run kept running with {services}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let out = child.wait_with_output().expect("output");
    assert!(!out.status.success(), "broker run started with {services}");
    output_text(&out)
}

/// A directory for sockets that other users may traverse (the test's tempdirs are 0700).
fn socket_dir() -> tempfile::TempDir {
    let d = tempfile::tempdir().expect("tempdir");
    std::fs::set_permissions(d.path(), std::fs::Permissions::from_mode(0o755)).expect("chmod");
    d
}

/// A `pg` service listening on `DIR/.s.PGSQL.5432`; `extra` adds lines at 4 spaces.
fn pg_service(name: &str, dir: &Path, pg: &PgServer, pw_file: &Path, extra: &str) -> String {
    format!(
        "  {name}:\n    connector: pg\n    listenOn: unix://{}/.s.PGSQL.5432\n    credentials:\n      host: 127.0.0.1\n      port: \"{}\"\n      sslmode: disable\n      username: app_user\n      password: {{from: file, get: {}}}\n{extra}",
        dir.display(),
        pg.port,
        pw_file.display()
    )
}

/// libpq's way to a socket directory: `host=DIR` (psql -h DIR).
fn pg_conninfo(dir: &Path) -> String {
    format!(
        "host={} user=anything password=dummy dbname=app",
        dir.display()
    )
}

/// `psql` as another user (`runuser -u USER`), bounded.
fn psql_as(user: &str, conninfo: &str, sql: &str) -> Output {
    Command::new("runuser")
        .args(["-u", user, "--", "timeout", "--kill-after=5", "30"])
        .args(["psql", "-X", "-w", "-A", "-t", "-v", "ON_ERROR_STOP=1"])
        .arg(conninfo)
        .args(["-c", sql])
        .env_remove("PGPASSWORD")
        .env("PGCONNECT_TIMEOUT", "10")
        .current_dir("/")
        .stdin(Stdio::null())
        .output()
        .expect("spawn runuser psql")
}

/// The access lines (JSON) of `service`.
fn access(log: &str, service: &str) -> Vec<serde_json::Value> {
    log.lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|v| v["target"] == "access" && v["service"] == service)
        .filter(|v| v["message"] == "connection")
        .collect()
}

/// Wait for `service`'s connection line (written a moment after the connection ends;
/// an HTTP service's per-request lines come before it).
fn access_line(d: &Daemon, service: &str) -> serde_json::Value {
    let log = d.log_until(Duration::from_secs(5), |t| !access(t, service).is_empty());
    access(&log, service)
        .pop()
        .unwrap_or_else(|| panic!("no access line for {service}:\n{log}"))
}

fn mode_uid_gid(p: &Path) -> (u32, u32, u32) {
    let m = std::fs::symlink_metadata(p).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
    assert!(m.file_type().is_socket(), "{} is a socket", p.display());
    (m.mode() & 0o7777, m.uid(), m.gid())
}

#[test]
fn psql_mariadb_and_curl_through_unix_sockets() {
    if !privileged() {
        return;
    }
    assert!(
        mariadb::available(),
        "mariadb-server and mariadb-client are required (cargo xtask setup installs them)"
    );
    let pw_pg = "unix-pg-pw-5d1c9e";
    let pw_my = "unix-my-pw-0b7f3a";
    let token = "unix-http-token-8e2d4c";
    let secrets = [pw_pg, pw_my, token];
    let pg = PgServer::start(PgOptions::new(PgAuth::Scram, pw_pg));
    let my = MariaDb::start(MariaDbOptions::new(
        pw_my,
        "unix-ed-pw-unused",
        "unix-tls-unused",
    ));
    let web = HttpServer::start("127.0.0.1", free_port());
    let files = tempfile::tempdir().expect("tempdir");
    let f_pg = write_file(files.path(), "pg", pw_pg);
    let f_my = write_file(files.path(), "my", pw_my);
    let f_tok = write_file(files.path(), "tok", token);
    let socks = socket_dir();
    let dir = socks.path();
    let (my_sock, http_sock) = (dir.join("mysql.sock"), dir.join("http.sock"));
    let services = format!(
        "{}  mysql-sock:\n    connector: mysql\n    listenOn: unix://{}\n    credentials:\n      host: {}\n      port: \"{}\"\n      username: {NATIVE_USER}\n      password: {{from: file, get: {}}}\n      sslmode: verify-full\n      sslrootcert: {}\n      sslhost: localhost\n  http-sock:\n    connector: generic_http\n    listenOn: unix://{}\n    credentials:\n      token: {{from: file, get: {}}}\n    config:\n      upstream: http://{}\n      headers:\n        Authorization: \"Bearer {{{{ .token }}}}\"\n",
        pg_service("pg-sock", dir, &pg, &f_pg, ""),
        my_sock.display(),
        my.ip,
        my.port,
        f_my.display(),
        my.ca_cert.display(),
        http_sock.display(),
        f_tok.display(),
        web.addr,
    );
    let mut b = start("", &services);
    let mut all = String::new();

    // psql -h DIR, as in Secretless' quick start.
    let out = psql(
        &pg_conninfo(dir),
        "select current_user || ' ' || current_database()",
    );
    let text = output_text(&out);
    all += &text;
    assert!(out.status.success(), "{text}\n{}", b.daemon.log_text());
    assert_eq!(text.trim(), "app_user app");
    // The default mode is Secretless': 0777 less the umask (the broker's is ours).
    let umask = std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("Umask:"))
                .and_then(|v| u32::from_str_radix(v.trim(), 8).ok())
        })
        .expect("Umask in /proc/self/status");
    let pg_sock = dir.join(".s.PGSQL.5432");
    assert_eq!(mode_uid_gid(&pg_sock), (0o777 & !umask, 0, 0));
    let a = access_line(&b.daemon, "pg-sock");
    assert_eq!(a["result"], "ok", "{a}");
    assert_eq!(a["caller.comm"], "psql", "{a}");
    assert_eq!(a["caller.uid"], 0, "{a}");
    assert_eq!(a["caller.gid"], 0, "{a}");
    assert!(a["caller.pid"].as_u64().unwrap_or(0) > 0, "{a}");
    assert_eq!(
        a["src.addr"],
        format!("unix:{}", pg_sock.display()).as_str(),
        "{a}"
    );
    assert_eq!(a["spliced"], false, "{a}");

    // The mariadb client through the socket.
    let out = Command::new("timeout")
        .args(["--kill-after=5", "60", "mariadb", "--no-defaults"])
        .arg(format!("--socket={}", my_sock.display()))
        .args(["-u", "anyone", "-pdummy", "-N", "-B", "-D", "app"])
        .args(["-e", "select current_user()"])
        .stdin(Stdio::null())
        .output()
        .expect("spawn mariadb");
    let text = output_text(&out);
    all += &text;
    assert!(out.status.success(), "{text}\n{}", b.daemon.log_text());
    assert!(text.contains("native_user@%"), "{text}");
    let a = access_line(&b.daemon, "mysql-sock");
    assert_eq!(a["result"], "ok", "{a}");
    assert_eq!(a["caller.comm"], "mariadb", "{a}");

    // curl --unix-socket to an HTTP service (reverse proxy to the test server).
    let out = Command::new("curl")
        .args(["-sS", "--max-time", "20", "-w", "\nSTATUS=%{http_code}"])
        .arg("--unix-socket")
        .arg(&http_sock)
        .arg("http://localhost/hello?x=1")
        .output()
        .expect("curl");
    let text = output_text(&out);
    all += &text;
    assert!(
        text.contains("STATUS=200"),
        "{text}\n{}",
        b.daemon.log_text()
    );
    let seen = web.seen();
    assert_eq!(seen.len(), 1, "{seen:?}");
    assert_eq!(seen[0].target, "/hello?x=1");
    assert_eq!(
        seen[0].header("authorization"),
        [format!("Bearer {token}").as_str()]
    );
    let a = access_line(&b.daemon, "http-sock");
    assert_eq!(a["caller.comm"], "curl", "{a}");
    // Its executable and cgroup, read through /proc at accept time (SO_PEERCRED's pid).
    let curl = std::env::var_os("PATH")
        .and_then(|path| {
            std::env::split_paths(&path)
                .map(|d| d.join("curl"))
                .find(|p| p.exists())
        })
        .and_then(|p| std::fs::canonicalize(p).ok())
        .expect("curl in PATH");
    assert_eq!(a["caller.exe"], curl.to_str().expect("UTF-8"), "{a}");
    assert!(
        a["caller.cgroup_path"]
            .as_str()
            .is_some_and(|p| p.starts_with('/')),
        "{a}"
    );

    // Stopped: every socket file is gone.
    assert!(b.daemon.stop().success(), "{}", b.daemon.log_text());
    for p in [&pg_sock, &my_sock, &http_sock] {
        assert!(
            std::fs::symlink_metadata(p).is_err(),
            "{} left behind",
            p.display()
        );
    }
    all += &b.daemon.log_text();
    assert_no_secret(&all, &secrets, "client outputs and the broker log");
    let _ = &b.dir;
}

#[test]
fn the_socket_file_is_replaced_only_when_stale_and_removed_only_when_ours() {
    if !privileged() {
        return;
    }
    let socks = socket_dir();
    let dir = socks.path();
    let path = dir.join("db.sock");
    let svc = |name: &str, p: &Path| {
        format!(
            "  {name}:\n    connector: tcp\n    listenOn: unix://{}\n    credentials:\n      host: 127.0.0.1\n      port: \"1\"\n",
            p.display()
        )
    };

    // A socket left behind by a killed run (nobody accepts on it): replaced.
    drop(std::os::unix::net::UnixListener::bind(&path).expect("bind"));
    assert!(std::fs::symlink_metadata(&path).is_ok());
    let mut b = start("", &svc("stale", &path));
    let log = b.daemon.log_text();
    assert!(log.contains("replaced a stale socket file"), "{log}");
    assert!(std::os::unix::net::UnixStream::connect(&path).is_ok());
    assert!(b.daemon.stop().success());
    assert!(std::fs::symlink_metadata(&path).is_err(), "removed at exit");

    // A live socket: refused, naming the path and the service; left as it was.
    let live = std::os::unix::net::UnixListener::bind(&path).expect("bind");
    let text = fails_to_start(&svc("busy", &path));
    assert!(
        text.contains(&format!(
            "listenOn unix://{} of service busy",
            path.display()
        )) && text.contains("another process accepts connections"),
        "{text}"
    );
    assert!(std::os::unix::net::UnixStream::connect(&path).is_ok());
    drop(live);
    std::fs::remove_file(&path).expect("rm");

    // A regular file, a directory, a symlink: in the way, never removed.
    std::fs::write(&path, "precious").expect("write");
    let text = fails_to_start(&svc("file", &path));
    assert!(
        text.contains("of service file") && text.contains("a regular file is in the way"),
        "{text}"
    );
    assert_eq!(std::fs::read_to_string(&path).expect("read"), "precious");
    std::fs::remove_file(&path).expect("rm");
    std::fs::create_dir(&path).expect("mkdir");
    let text = fails_to_start(&svc("dir", &path));
    assert!(text.contains("a directory is in the way"), "{text}");
    std::fs::remove_dir(&path).expect("rmdir");
    std::os::unix::fs::symlink(dir.join("elsewhere"), &path).expect("symlink");
    let text = fails_to_start(&svc("link", &path));
    assert!(text.contains("a symlink is in the way"), "{text}");
    std::fs::remove_file(&path).expect("rm");

    // The directory must exist.
    let text = fails_to_start(&svc("nodir", &dir.join("missing/db.sock")));
    assert!(
        text.contains(&format!(
            "the directory {} does not exist",
            dir.join("missing").display()
        )) && text.contains("of service nodir"),
        "{text}"
    );
    // Nothing was left in the directory by the failures (no private names).
    let left: Vec<_> = std::fs::read_dir(dir)
        .expect("read_dir")
        .map(|e| e.expect("entry").file_name())
        .collect();
    assert!(left.is_empty(), "{left:?}");

    // Replaced by someone else while running: left alone at exit.
    let mut b = start("", &svc("replaced", &path));
    std::fs::remove_file(&path).expect("rm");
    std::fs::write(&path, "theirs").expect("write");
    assert!(b.daemon.stop().success());
    assert_eq!(std::fs::read_to_string(&path).expect("read"), "theirs");
    let log = b.daemon.log_text();
    assert!(log.contains("replaced by another process"), "{log}");
}

#[test]
fn mode_and_owner_decide_which_users_may_connect() {
    if !privileged() {
        return;
    }
    let pw = "unix-owner-pw-3c9a1f";
    let pg = PgServer::start(PgOptions::new(PgAuth::Scram, pw));
    let files = tempfile::tempdir().expect("tempdir");
    let f = write_file(files.path(), "pw", pw);
    // nobody's group (`nogroup` on Debian, `nobody` elsewhere), by number.
    let nobody_gid = {
        let out = Command::new("id")
            .args(["-g", "nobody"])
            .output()
            .expect("id");
        String::from_utf8_lossy(&out.stdout)
            .trim()
            .parse::<u32>()
            .expect("gid of nobody")
    };
    let (closed, grouped) = (socket_dir(), socket_dir());
    // Broker-wide: 0660, owned by root (by name); `grouped` overrides the group only.
    let services = format!(
        "{}{}",
        pg_service("closed", closed.path(), &pg, &f, ""),
        pg_service(
            "grouped",
            grouped.path(),
            &pg,
            &f,
            &format!("    unixSocket:\n      group: {nobody_gid}\n"),
        ),
    );
    let b = start(
        "  unixSocket:\n    mode: \"0660\"\n    user: root\n    group: \"0\"\n",
        &services,
    );
    let sock = |d: &tempfile::TempDir| d.path().join(".s.PGSQL.5432");
    assert_eq!(mode_uid_gid(&sock(&closed)), (0o660, 0, 0));
    assert_eq!(mode_uid_gid(&sock(&grouped)), (0o660, 0, nobody_gid));
    let mut all = String::new();

    // nobody may not connect to a 0660 root:root socket: the kernel refuses the connect.
    let out = psql_as("nobody", &pg_conninfo(closed.path()), "select current_user");
    let text = output_text(&out);
    all += &text;
    assert!(!out.status.success(), "{text}");
    assert!(text.contains("Permission denied"), "{text}");
    // ... and may when the socket's group is its own.
    let out = psql_as(
        "nobody",
        &pg_conninfo(grouped.path()),
        "select current_user",
    );
    let text = output_text(&out);
    all += &text;
    assert!(out.status.success(), "{text}\n{}", b.daemon.log_text());
    assert_eq!(text.trim(), "app_user");
    // The access line names the unprivileged caller.
    let a = access_line(&b.daemon, "grouped");
    assert_eq!(a["result"], "ok", "{a}");
    assert_eq!(a["caller.uid"], 65534, "{a}");
    assert_eq!(a["caller.gid"], nobody_gid, "{a}");
    assert_eq!(a["caller.comm"], "psql", "{a}");
    // Root may, whatever the mode (nothing reached `closed` before).
    let out = psql(&pg_conninfo(closed.path()), "select current_user");
    assert!(out.status.success(), "{}", output_text(&out));
    let a = access_line(&b.daemon, "closed");
    assert_eq!(a["caller.uid"], 0, "{a}");

    all += &b.daemon.log_text();
    assert_no_secret(&all, &[pw], "psql outputs and the broker log");
}
