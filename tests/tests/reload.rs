//! Hot reload, for real: a daemon attached to a child cgroup, a real PostgreSQL, apps in
//! the cgroup (psycopg2, psql).
//!
//! * A good change (a new intercepted service, a new `listenOn` service, a credential
//!   moved to another source) takes effect on SIGHUP while an open session keeps
//!   working; a bad file is refused with its errors (key paths) logged and the old
//!   configuration keeps serving; a removed `listenOn` stops accepting.
//! * A connect loop in the cgroup across 20 reloads (SIGHUP and Secretless' SIGUSR1)
//!   sees no failed connection.
//! * `--watch` reloads when the file is replaced (as editors and ConfigMap volumes do).

use std::{
    io::{BufRead as _, BufReader, Write as _},
    path::Path,
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use broker_tests::{
    Daemon, RunBroker, assert_no_secret, free_port, net, output_text,
    pg::{PgAuth, PgOptions, PgServer, psql, python_with_psycopg2},
    privileged, write_file,
};

const PW: &str = "reload-pw-5d2e8a1c";

fn service(name: &str, how: &str, pg_port: u16, pw_file: &Path) -> String {
    format!(
        "  {name}:\n    connector: pg\n    {how}\n    credentials:\n      host: 127.0.0.1\n      port: \"{pg_port}\"\n      sslmode: disable\n      username: app_user\n      password: {{from: file, get: {}}}\n",
        pw_file.display()
    )
}

fn config(health: u16, services: &str) -> String {
    format!("version: 2\nbroker:\n  health: 127.0.0.1:{health}\nservices:\n{services}")
}

fn signal(d: &Daemon, sig: i32) {
    // SAFETY: kill with a pid we own.
    unsafe { libc::kill(d.child.id() as i32, sig) };
}

/// How many reloads the daemon has reported (applied, and refused).
fn reloads(d: &Daemon) -> (usize, usize) {
    let log = d.log_text();
    (
        log.matches("configuration reloaded").count(),
        log.matches("reload refused").count(),
    )
}

/// Wait until the daemon reports one more applied (or refused) reload than `before`.
fn wait_reload(d: &Daemon, before: (usize, usize)) -> (usize, usize) {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let now = reloads(d);
        if now != before {
            return now;
        }
        assert!(
            Instant::now() < deadline,
            "no reload reported:\n{}",
            d.log_text()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// `psql` in the cgroup to `host:5432` (an intercepted destination), no password.
fn psql_in(b: &RunBroker, host: &str, sql: &str) -> (bool, String) {
    psql_at(b, host, 5432, sql)
}

/// `psql` in the cgroup to `host:port`, no password.
fn psql_at(b: &RunBroker, host: &str, port: u16, sql: &str) -> (bool, String) {
    let mut c = Command::new("timeout");
    c.args(["--kill-after=5", "30", "psql", "-X", "-w", "-A", "-t"])
        .arg(format!(
            "host={host} port={port} user=anything dbname=app sslmode=disable connect_timeout=10"
        ))
        .args(["-c", sql])
        .env_remove("PGPASSWORD")
        .stdin(Stdio::null());
    b.cg.enter(&mut c);
    let out = c.output().expect("run psql");
    (out.status.success(), output_text(&out))
}

/// A psycopg2 session in the cgroup that stays open: each line on its stdin runs
/// `select current_user` and prints the answer.
struct Session {
    child: Child,
    out: BufReader<std::process::ChildStdout>,
}

impl Session {
    fn open(b: &RunBroker, python: &Path) -> Self {
        let script = "import sys, psycopg2\nc = psycopg2.connect('host=127.0.0.2 port=5432 user=anything dbname=app sslmode=disable connect_timeout=10')\nc.autocommit = True\nprint('open', flush=True)\nfor _ in sys.stdin:\n    cur = c.cursor(); cur.execute('select current_user'); print(cur.fetchone()[0], flush=True)\n";
        let mut cmd = Command::new("timeout");
        cmd.args(["--kill-after=5", "120"])
            .arg(python)
            .args(["-c", script])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit());
        b.cg.enter(&mut cmd);
        let mut child = cmd.spawn().expect("spawn python");
        let mut out = BufReader::new(child.stdout.take().expect("stdout"));
        let mut line = String::new();
        out.read_line(&mut line).expect("read");
        assert_eq!(line.trim(), "open", "the session did not open");
        Self { child, out }
    }

    fn query(&mut self) -> String {
        let stdin = self.child.stdin.as_mut().expect("stdin");
        stdin.write_all(b"q\n").expect("write");
        stdin.flush().expect("flush");
        let mut line = String::new();
        self.out.read_line(&mut line).expect("read");
        line.trim().to_owned()
    }
}

impl Drop for Session {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn start(tag: &str, text: &str, health: u16, extra_args: &[&str]) -> RunBroker {
    let dir = tempfile::tempdir().expect("tempdir");
    let cg = net::TestCgroup::new(tag);
    let cfg = write_file(dir.path(), "broker.yaml", text);
    let mut args = vec![
        "--cgroup",
        cg.path.to_str().expect("UTF-8 cgroup path"),
        "--log-format",
        "json",
    ];
    args.extend_from_slice(extra_args);
    let daemon = Daemon::start(
        &cfg,
        &args,
        format!("127.0.0.1:{health}")
            .parse()
            .expect("health address"),
        &dir.path().join("broker.log"),
    );
    RunBroker { daemon, cg, dir }
}

#[test]
fn a_good_change_applies_without_dropping_a_session_and_a_bad_file_is_refused() {
    if !privileged() {
        panic!("reload tests need root (eBPF, cgroups)");
    }
    let Some(python) = python_with_psycopg2() else {
        panic!("python3 with psycopg2 is required (cargo xtask setup)");
    };
    let pg = PgServer::start(PgOptions::new(PgAuth::Scram, PW));
    let files = tempfile::tempdir().expect("tempdir");
    let right = write_file(files.path(), "right", PW);
    let health = free_port();
    let port = pg.addr().port();
    let b = start(
        "reload-good",
        &config(
            health,
            &service("db", "intercept: [\"127.0.0.2:5432\"]", port, &right),
        ),
        health,
        &[],
    );
    let cfg = b.dir.path().join("broker.yaml");
    let mut session = Session::open(&b, &python);
    assert_eq!(session.query(), "app_user");

    // A good change: the credential moves to another file (the old one now holds a wrong
    // password, so only the new source can log in), a new intercepted service (also on a
    // port and a CIDR no target named before: the programs look a port up only once the
    // daemon has marked it) and a new listenOn service.
    let moved = write_file(files.path(), "moved", PW);
    std::fs::write(&right, "not-the-password-either").expect("write");
    let listen = free_port();
    std::fs::write(
        &cfg,
        config(
            health,
            &(service("db", "intercept: [\"127.0.0.2:5432\"]", port, &moved)
                + &service(
                    "db2",
                    "intercept: [\"127.0.0.3:5432\", \"127.0.9.0/24:6543\"]",
                    port,
                    &moved,
                )
                + &service(
                    "db3",
                    &format!("listenOn: tcp://127.0.0.1:{listen}"),
                    port,
                    &moved,
                )),
        ),
    )
    .expect("write config");
    let before = reloads(&b.daemon);
    signal(&b.daemon, libc::SIGHUP);
    assert_eq!(
        wait_reload(&b.daemon, before).0,
        before.0 + 1,
        "{}",
        b.daemon.log_text()
    );
    // The open session goes on.
    assert_eq!(session.query(), "app_user");
    for (host, to) in [
        ("127.0.0.2", 5432),
        ("127.0.0.3", 5432),
        ("127.0.9.7", 6543),
    ] {
        let (ok, text) = psql_at(&b, host, to, "select current_user");
        assert!(ok, "{host}:{to}: {text}\n{}", b.daemon.log_text());
        assert_eq!(text.trim(), "app_user");
    }
    let out = psql(
        &format!("host=127.0.0.1 port={listen} user=x dbname=app sslmode=disable"),
        "select current_user",
    );
    assert!(out.status.success(), "db3: {}", output_text(&out));

    // A bad file: refused, every error logged with its key path, the old one serves.
    std::fs::write(
        &cfg,
        config(
            health,
            &service("db", "intercept: [\"127.0.0.2:5432\"]", port, &moved)
                .replace("    credentials:", "    conifg: {}\n    credentials:"),
        ) + "  broken:\n    connector: nope\n    listenOn: tcp://127.0.0.1:1\n",
    )
    .expect("write config");
    let before = reloads(&b.daemon);
    signal(&b.daemon, libc::SIGHUP);
    assert_eq!(wait_reload(&b.daemon, before).1, before.1 + 1);
    let log = b.daemon.log_text();
    assert!(log.contains("services.db.conifg"), "{log}");
    assert!(log.contains("services.broken.connector"), "{log}");
    assert_eq!(session.query(), "app_user");
    let (ok, text) = psql_in(&b, "127.0.0.3", "select 1");
    assert!(ok, "the old configuration keeps serving: {text}");
    let out = psql(
        &format!("host=127.0.0.1 port={listen} user=x dbname=app sslmode=disable"),
        "select 1",
    );
    assert!(
        out.status.success(),
        "db3 still served: {}",
        output_text(&out)
    );

    // A removed listenOn stops accepting; a removed intercept goes direct (refused here:
    // nothing listens on 127.0.0.3:5432).
    std::fs::write(
        &cfg,
        config(
            health,
            &service("db", "intercept: [\"127.0.0.2:5432\"]", port, &moved),
        ),
    )
    .expect("write config");
    let before = reloads(&b.daemon);
    signal(&b.daemon, libc::SIGHUP);
    assert_eq!(wait_reload(&b.daemon, before).0, before.0 + 1);
    let out = psql(
        &format!(
            "host=127.0.0.1 port={listen} user=x dbname=app sslmode=disable connect_timeout=5"
        ),
        "select 1",
    );
    assert!(!out.status.success(), "db3 was removed");
    let (ok, _) = psql_in(&b, "127.0.0.3", "select 1");
    assert!(!ok, "db2's target is no longer intercepted");
    let (ok, _) = psql_at(&b, "127.0.9.7", 6543, "select 1");
    assert!(!ok, "db2's CIDR target is no longer intercepted");
    assert_eq!(session.query(), "app_user");
    let log = b.daemon.log_text();
    assert_no_secret(&log, &[PW], "daemon log");
}

#[test]
fn a_connect_loop_across_twenty_reloads_sees_no_failure() {
    if !privileged() {
        panic!("reload tests need root (eBPF, cgroups)");
    }
    let Some(python) = python_with_psycopg2() else {
        panic!("python3 with psycopg2 is required (cargo xtask setup)");
    };
    let pg = PgServer::start(PgOptions::new(PgAuth::Scram, PW));
    let files = tempfile::tempdir().expect("tempdir");
    let pw = write_file(files.path(), "pw", PW);
    let health = free_port();
    let port = pg.addr().port();
    let base = service("db", "intercept: [\"127.0.0.2:5432\"]", port, &pw);
    let b = start("reload-loop", &config(health, &base), health, &[]);
    let cfg = b.dir.path().join("broker.yaml");
    let stop = files.path().join("stop");

    // Connect, query, close, until told to stop (bounded: 60 s, 5000 connections).
    let script = format!(
        "import os, time, json, psycopg2\nok = fail = 0\nerrors = []\nend = time.monotonic() + 60\nwhile time.monotonic() < end and ok + fail < 5000 and not os.path.exists({stop:?}):\n    try:\n        c = psycopg2.connect('host=127.0.0.2 port=5432 user=anything dbname=app sslmode=disable connect_timeout=10')\n        cur = c.cursor(); cur.execute('select 1'); cur.fetchone(); c.close(); ok += 1\n    except Exception as e:\n        fail += 1; errors.append(str(e)[:200])\nprint(json.dumps({{'ok': ok, 'fail': fail, 'errors': errors[:5]}}))\n",
        stop = stop.display().to_string()
    );
    let mut cmd = Command::new("timeout");
    cmd.args(["--kill-after=5", "90"])
        .arg(&python)
        .args(["-c", &script])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    b.cg.enter(&mut cmd);
    let app = cmd.spawn().expect("spawn the connect loop");

    std::thread::sleep(Duration::from_millis(300));
    for i in 0..20 {
        // Every other reload adds a service (a new target in the kernel maps), and every
        // reload gives the loop's service a new generation.
        let text = if i % 2 == 0 {
            base.clone() + &service("extra", "intercept: [\"127.0.0.9:5432\"]", port, &pw)
        } else {
            base.clone()
        };
        std::fs::write(&cfg, config(health, &text)).expect("write config");
        let before = reloads(&b.daemon);
        signal(
            &b.daemon,
            if i % 4 == 3 {
                libc::SIGUSR1
            } else {
                libc::SIGHUP
            },
        );
        let after = wait_reload(&b.daemon, before);
        assert_eq!(
            after.0,
            before.0 + 1,
            "reload {i}:\n{}",
            b.daemon.log_text()
        );
        // Connects land between reloads and right after them.
        std::thread::sleep(Duration::from_millis(400));
    }
    std::fs::write(&stop, "").expect("stop the loop");
    let out = app.wait_with_output().expect("wait for the loop");
    let text = String::from_utf8_lossy(&out.stdout);
    let r: serde_json::Value = serde_json::from_str(text.lines().last().unwrap_or(""))
        .unwrap_or_else(|_| panic!("{}", output_text(&out)));
    eprintln!("connect loop across 20 reloads: {r}");
    assert_eq!(r["fail"], 0, "{r}\n{}", b.daemon.log_text());
    assert!(r["ok"].as_u64().unwrap_or(0) >= 20, "{r}");
    assert!(b.daemon.log_text().contains("SIGUSR1"));
}

#[test]
fn watch_reloads_when_the_file_is_replaced() {
    if !privileged() {
        panic!("reload tests need root (eBPF, cgroups)");
    }
    let pg = PgServer::start(PgOptions::new(PgAuth::Scram, PW));
    let files = tempfile::tempdir().expect("tempdir");
    let pw = write_file(files.path(), "pw", PW);
    let health = free_port();
    let port = pg.addr().port();
    let base = service("db", "intercept: [\"127.0.0.2:5432\"]", port, &pw);
    let b = start("reload-watch", &config(health, &base), health, &["--watch"]);
    let cfg = b.dir.path().join("broker.yaml");
    let (ok, _) = psql_in(&b, "127.0.0.3", "select 1");
    assert!(!ok, "not intercepted yet");
    // Replaced by a rename, as an editor or a ConfigMap volume does.
    let tmp = b.dir.path().join(".broker.yaml.new");
    std::fs::write(
        &tmp,
        config(
            health,
            &(base + &service("db2", "intercept: [\"127.0.0.3:5432\"]", port, &pw)),
        ),
    )
    .expect("write");
    let before = reloads(&b.daemon);
    std::fs::rename(&tmp, &cfg).expect("rename");
    assert_eq!(wait_reload(&b.daemon, before).0, before.0 + 1);
    assert!(b.daemon.log_text().contains("file change"));
    let (ok, text) = psql_in(&b, "127.0.0.3", "select current_user");
    assert!(ok, "{text}\n{}", b.daemon.log_text());
}
