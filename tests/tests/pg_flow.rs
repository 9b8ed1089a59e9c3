//! Flow control of spliced PostgreSQL sessions (the default), end to end with a real
//! server and a raw protocol client (`tests/scripts/pg_flow.py`) in the broker's cgroup:
//!
//! * an app that stops reading in the middle of a large COPY out stalls the server
//!   (its backend waits in `ClientWrite`) instead of having the result piled up in
//!   kernel memory; when it reads again every row arrives, in order;
//! * an edge-triggered non-blocking writer (like Go's netpoller or tokio) streaming a
//!   COPY in to a server that stops reading for a while gets EAGAIN, and then the
//!   EPOLLOUT edge that lets it finish.
//!
//! The access line of each session says it was spliced and counts every byte.

use std::{
    path::PathBuf,
    process::{Command, Output, Stdio},
    time::{Duration, Instant},
};

use broker_tests::{
    RunBroker, output_text,
    pg::{PgAuth, PgOptions, PgServer},
    privileged, run_broker, workspace_root, write_file,
};

/// PostgreSQL (scram) and a daemon with the default settings (splice on) for a pg
/// service on 127.0.0.2:5432; and the password file's directory.
fn setup(tag: &str) -> (PgServer, RunBroker, tempfile::TempDir) {
    let pw = "flow-pw-8b1e4c7a2d";
    let pg = PgServer::start(PgOptions::new(PgAuth::Scram, pw));
    let pw_dir = tempfile::tempdir().expect("tempdir");
    let pw_file = write_file(pw_dir.path(), "pw", pw);
    let b = run_broker(
        tag,
        "",
        &format!(
            "  db:\n    connector: pg\n    intercept: [\"127.0.0.2:5432\"]\n    credentials:\n      host: 127.0.0.1\n      port: \"{}\"\n      sslmode: disable\n      username: app_user\n      password: {{from: file, get: {}}}\n",
            pg.addr().port(),
            pw_file.display()
        ),
    );
    (pg, b, pw_dir)
}

/// `pg_flow.py <mode args>` as the app, in the broker's cgroup, dialing 127.0.0.2:5432
/// with no password.
fn pg_flow(b: &RunBroker, args: &[&str]) -> Command {
    let script: PathBuf = workspace_root().join("tests/scripts/pg_flow.py");
    let mut c = Command::new("timeout");
    c.args(["--kill-after=5", "120", "/usr/bin/python3"])
        .arg(script)
        .args([
            "--host",
            "127.0.0.2",
            "--port",
            "5432",
            "--user",
            "anything",
            "--dbname",
            "app",
        ])
        .args(args)
        .env_remove("PGPASSWORD")
        .stdin(Stdio::null());
    b.cg.enter(&mut c);
    c
}

/// The JSON line a finished `pg_flow.py` printed.
fn result(out: &Output, b: &RunBroker) -> serde_json::Value {
    let text = String::from_utf8_lossy(&out.stdout);
    serde_json::from_str(text.lines().last().unwrap_or(""))
        .unwrap_or_else(|_| panic!("{}\n{}", output_text(out), b.daemon.log_text()))
}

/// The daemon's one access line (written once the session has wound down).
fn access(b: &RunBroker) -> serde_json::Value {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let log = b.daemon.log_text();
        let lines: Vec<serde_json::Value> = log
            .lines()
            .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
            .filter(|v| v["target"] == "access")
            .collect();
        if lines.len() == 1 {
            return lines[0].clone();
        }
        assert!(
            lines.is_empty() && Instant::now() < deadline,
            "one session:\n{log}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn a_stalled_reader_stalls_the_server_and_then_gets_every_row_in_order() {
    if !privileged() {
        return;
    }
    let (pg, b, _pw) = setup("flow-stall");
    let rows = 10_000_000u64; // ~79 MB of COPY data, far past the kernel's read budget
    let marker = b.dir.path().join("stalled");
    let child = pg_flow(
        &b,
        &[
            "stall-read",
            "--rows",
            &rows.to_string(),
            "--stall",
            "8",
            "--marker-file",
            marker.to_str().expect("UTF-8 path"),
        ],
    )
    .stdout(Stdio::piped())
    .stderr(Stdio::piped())
    .spawn()
    .expect("spawn pg_flow");
    let deadline = Instant::now() + Duration::from_secs(30);
    while !marker.exists() {
        assert!(Instant::now() < deadline, "{}", b.daemon.log_text());
        std::thread::sleep(Duration::from_millis(50));
    }
    // While the app reads nothing, the server ends up blocked writing to its socket:
    // the backpressure reached it. (Unbounded, the kernel would have taken the whole
    // result and the backend would be idle.)
    let state = || {
        pg.admin_sql(
            "select coalesce(wait_event, '') || ' ' || state from pg_stat_activity where application_name = 'pg_flow'",
        )
    };
    let mut seen = state();
    let deadline = Instant::now() + Duration::from_secs(6);
    while seen != "ClientWrite active" && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(100));
        seen = state();
    }
    assert_eq!(
        seen,
        "ClientWrite active",
        "the backend should be blocked sending while the app is stalled\n{}",
        b.daemon.log_text()
    );
    // What the server got out while the app read nothing (acknowledged by the broker's
    // upstream socket): the read budget, the app socket's queue and a receive window.
    let acked = || {
        let ss = Command::new("ss")
            .args(["-tniH", "state", "established"])
            .arg(format!("( sport = :{} )", pg.addr().port()))
            .output()
            .expect("run ss");
        let text = String::from_utf8_lossy(&ss.stdout).into_owned();
        text.split_whitespace()
            .find_map(|w| w.strip_prefix("bytes_acked:"))
            .and_then(|n| n.parse::<u64>().ok())
            .unwrap_or_else(|| panic!("no bytes_acked in `ss` output:\n{text}"))
    };
    let first = acked();
    std::thread::sleep(Duration::from_secs(2));
    let later = acked();
    println!("server bytes out while the app is stalled: {first} then {later}");
    assert!(
        later < 32 << 20,
        "{later} bytes left the server for a stalled app"
    );
    assert!(later - first < 1 << 20, "still flowing: {first} -> {later}");
    let out = child.wait_with_output().expect("wait pg_flow");
    let r = result(&out, &b);
    assert!(out.status.success(), "{r}\n{}", output_text(&out));
    assert_eq!(r["rows"], rows, "{r}");
    assert_eq!(r["in_order"], true, "{r}");
    assert_eq!(r["tag"], format!("COPY {rows}"), "{r}");
    let a = access(&b);
    assert_eq!(a["spliced"], true, "{a}");
    assert_eq!(a["splice.fallback"], "down", "the relay took over: {a}");
    assert_eq!(a["result"], "ok", "{a}");
    let payload = r["bytes"].as_u64().expect("bytes");
    assert!(
        a["bytes.down"].as_u64().unwrap_or(0) > payload,
        "every byte counted once, kernel and relay: {a} vs payload {payload}"
    );
}

#[test]
fn an_edge_triggered_writer_is_woken_when_the_server_reads_again() {
    if !privileged() {
        return;
    }
    let (pg, b, _pw) = setup("flow-et");
    pg.admin_sql_in(
        "app",
        "create table flow_t (i int primary key); grant all on flow_t to app_user",
    );
    // Another session holds a row the COPY will conflict with: the backend stops
    // reading the COPY data when it gets there, until that session rolls back.
    let mut blocker = Command::new("psql");
    blocker
        .args(["-X", "-w", "-q", "-U", "postgres", "-h"])
        .arg(pg.dir())
        .args([
            "-p",
            &pg.addr().port().to_string(),
            "-d",
            "app",
            "-c",
            "begin; insert into flow_t values (300000); select pg_sleep(5); rollback;",
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    let mut blocker = blocker.spawn().expect("spawn blocking psql");
    let deadline = Instant::now() + Duration::from_secs(10);
    while pg.admin_sql("select count(*) from pg_stat_activity where query like '%pg_sleep(5)%' and pid <> pg_backend_pid()") != "1" {
        assert!(Instant::now() < deadline, "blocker did not start");
        std::thread::sleep(Duration::from_millis(50));
    }
    let rows = 5_000_000u64;
    let out = pg_flow(
        &b,
        &[
            "et-write",
            "--rows",
            &rows.to_string(),
            "--table",
            "flow_t",
            "--edge-timeout",
            "15",
        ],
    )
    .output()
    .expect("run pg_flow");
    let _ = blocker.wait();
    let r = result(&out, &b);
    assert!(out.status.success(), "{r}\n{}", output_text(&out));
    assert_eq!(r["stalled"], false, "{r}");
    assert_eq!(r["tag"], format!("COPY {rows}"), "{r}");
    assert!(
        r["eagain"].as_u64().unwrap_or(0) > 0,
        "the writer did block: {r}"
    );
    assert!(
        r["max_wait"].as_f64().unwrap_or(0.0) > 1.0,
        "it waited for the server (which waited for the blocker), then was woken: {r}"
    );
    assert_eq!(
        pg.admin_sql_in("app", "select count(*) from flow_t"),
        rows.to_string()
    );
    let a = access(&b);
    assert_eq!(a["spliced"], true, "{a}");
    assert_eq!(a["splice.fallback"], "up", "the relay took over: {a}");
    assert_eq!(a["result"], "ok", "{a}");
    let payload = r["bytes"].as_u64().expect("bytes");
    assert!(
        a["bytes.up"].as_u64().unwrap_or(0) > payload,
        "every byte counted once, kernel and relay: {a} vs payload {payload}"
    );
}
