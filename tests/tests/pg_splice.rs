//! The in-kernel splice of PostgreSQL sessions (sockmap: sk_msg on the app's socket,
//! sk_skb on the broker's upstream socket), end to end with a real server and a real
//! client library (psycopg2 / libpq) under `broker exec`:
//!
//! * prepared statements, COPY in and COPY out of 100 MB (byte counts checked on both
//!   sides), LISTEN/NOTIFY between two spliced sessions;
//! * a server-side termination (`pg_terminate_backend`): the client still reads the
//!   server's FATAL message before the end of the stream;
//! * the access log says the session was spliced and counts the kernel's bytes;
//! * the same script with `broker.splice: false` takes the userspace relay;
//! * after SIGTERM a spliced session keeps working through the drain (programs still
//!   attached, detached once stopped);
//!   SIGKILL of the broker ends a spliced session with an error, not a hang.
//!
//! No secret in any output.

use std::{
    io::{BufRead as _, BufReader, Write as _},
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use broker_tests::{
    RunBroker, assert_no_secret, broker_exec,
    net::bpftool_cgroup_show,
    output_text,
    pg::{PgAuth, PgOptions, PgServer, python_with_psycopg2},
    privileged, run_broker, write_file,
};

const MB: usize = 1024 * 1024;

/// Exercises one spliced session after another; prints `OK ...` lines the test checks.
const SCRIPT: &str = r#"
import os, select, socket, sys, time, psycopg2
dsn = sys.argv[1]
size = int(sys.argv[2])

def connect():
    c = psycopg2.connect(dsn)
    c.autocommit = True
    return c

a = connect()
cur = a.cursor()
cur.execute("select current_user")
print("OK user", cur.fetchone()[0], flush=True)

# Prepared statements, reused.
cur.execute("prepare twice(int) as select $1 * 2")
total = 0
for i in range(50):
    cur.execute("execute twice(%s)", (i,))
    total += cur.fetchone()[0]
assert total == 2 * sum(range(50)), total
print("OK prepared", total, flush=True)

# COPY in: `size` bytes (a multiple of 64) of 64-byte lines, generated on the fly.
class Source:
    def __init__(self, n):
        self.lines = n // 64
        self.i = 0
    def read(self, k=65536):
        n = min(max(k // 64, 1), self.lines - self.i)
        out = "".join("%010d%s\n" % (j, "x" * 53) for j in range(self.i, self.i + n))
        self.i += n
        return out

cur.execute("drop table if exists splice_copy")
cur.execute("create unlogged table splice_copy (line text)")
t0 = time.monotonic()
cur.copy_expert("copy splice_copy from stdin", Source(size), size=1 << 20)
print("TIME copy_in %.2f" % (time.monotonic() - t0), flush=True)
cur.execute("select coalesce(sum(length(line) + 1), 0) from splice_copy")
stored = int(cur.fetchone()[0])
print("OK copy_in", stored, flush=True)

# COPY out: count the bytes.
class Sink:
    def __init__(self):
        self.n = 0
    def write(self, b):
        self.n += len(b)
sink = Sink()
t0 = time.monotonic()
cur.copy_expert("copy splice_copy to stdout", sink, size=1 << 20)
print("TIME copy_out %.2f" % (time.monotonic() - t0), flush=True)
print("OK copy_out", sink.n, flush=True)
cur.execute("drop table splice_copy")

# LISTEN/NOTIFY across two spliced sessions.
b = connect()
cur.execute("listen splice_channel")
b.cursor().execute("notify splice_channel, 'payload-1'")
deadline = time.monotonic() + 10
got = None
while got is None and time.monotonic() < deadline:
    if select.select([a], [], [], 1.0)[0]:
        a.poll()
        while a.notifies:
            n = a.notifies.pop(0)
            got = (n.channel, n.payload)
print("OK notify", got[0], got[1], flush=True)

# The server ends a session: its FATAL message arrives before the end of the stream
# (read off the socket itself: libpq reports a lost connection either way).
b_cur = b.cursor()
b_cur.execute("select pg_backend_pid()")
pid = b_cur.fetchone()[0]
cur.execute("select pg_terminate_backend(%s)", (pid,))
raw = socket.socket(fileno=os.dup(b.fileno()))
raw.settimeout(10)
data = b""
while True:
    chunk = raw.recv(65536)
    if not chunk:
        break
    data += chunk
if data[:1] == b"E" and b"C57P01" in data:
    print("OK terminated 57P01", flush=True)
else:
    print("NOT terminated", repr(data[:200]), flush=True)
a.close()
"#;

fn run(splice: bool) {
    let dir = tempfile::tempdir().expect("tempdir");
    let pw = "splice-pw-5c2e9a7f1b";
    let pg = PgServer::start(PgOptions::new(PgAuth::Scram, pw));
    let pw_file = write_file(dir.path(), "pw", pw);
    let cfg = write_file(
        dir.path(),
        "broker.yaml",
        &format!(
            "version: 2\nbroker:\n  health: off\n  splice: {splice}\nservices:\n  db:\n    connector: pg\n    intercept: [\"db.example.test:5432\"]\n    credentials:\n      host: 127.0.0.1\n      port: \"{}\"\n      sslmode: disable\n      username: app_user\n      password: {{from: file, get: {}}}\n",
            pg.addr().port(),
            pw_file.display()
        ),
    );
    let python = python_with_psycopg2().expect("python3 with psycopg2 (cargo xtask setup)");
    let script = write_file(dir.path(), "splice.py", SCRIPT);
    let size = (100 * MB).to_string();
    let out = broker_exec(
        dir.path(),
        &[("db.example.test", "127.0.0.2")],
        &["--log-format", "json"],
        &cfg,
        &[
            "timeout",
            "120",
            python.to_str().expect("UTF-8 path"),
            script.to_str().expect("UTF-8 path"),
            "host=db.example.test port=5432 user=anything password=dummy dbname=app sslmode=disable",
            &size,
        ],
    )
    .env_remove("PGPASSWORD")
    .stdin(Stdio::null())
    .output()
    .expect("run broker exec");
    let text = output_text(&out);
    let ok = |what: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(&format!("OK {what} ")))
            .unwrap_or_else(|| panic!("no `OK {what}` line (splice: {splice}):\n{text}"))
            .to_owned()
    };
    for l in text.lines().filter(|l| l.starts_with("TIME ")) {
        println!("splice={splice}: {l} s");
    }
    assert_eq!(ok("user"), "app_user");
    assert_eq!(ok("prepared"), "2450");
    assert_eq!(ok("copy_in"), size, "COPY in stored every byte");
    assert_eq!(ok("copy_out"), size, "COPY out returned every byte");
    assert_eq!(ok("notify"), "splice_channel payload-1");
    assert_eq!(
        ok("terminated"),
        "57P01",
        "the server's FATAL message reached the client before the end of the stream"
    );
    assert!(out.status.success(), "script failed:\n{text}");

    // One access line per session; the first session moved > 100 MB each way.
    let access: Vec<serde_json::Value> = text
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|v| v["target"] == "access")
        .collect();
    assert_eq!(access.len(), 2, "two sessions:\n{text}");
    for a in &access {
        assert_eq!(a["spliced"], splice, "spliced flag: {a}");
        assert_eq!(a["result"], "ok", "{a}");
    }
    let big = access
        .iter()
        .find(|a| a["bytes.up"].as_u64().unwrap_or(0) > 100 * MB as u64)
        .unwrap_or_else(|| panic!("no session counted the COPY in:\n{text}"));
    assert!(
        big["bytes.down"].as_u64().unwrap_or(0) > 100 * MB as u64,
        "COPY out counted: {big}"
    );
    assert_no_secret(&text, &[pw], "broker exec output and access log");
    assert_no_secret(&pg.log_text(), &[pw], "PostgreSQL log");
}

#[test]
fn spliced_sessions_copy_notify_and_server_termination() {
    if !privileged() {
        return;
    }
    run(true);
}

#[test]
fn splice_off_takes_the_userspace_relay() {
    if !privileged() {
        return;
    }
    run(false);
}

/// Holds one spliced session: queries, `ready`, waits for a line on stdin, then 20
/// queries 50 ms apart, printing `OK after N` or `ERR after N: message`.
const HOLD_SCRIPT: &str = r#"
import sys, time, psycopg2
c = psycopg2.connect(sys.argv[1])
c.autocommit = True
cur = c.cursor()
cur.execute("select 1")
print("ready", flush=True)
sys.stdin.readline()
n = 0
start = time.monotonic()
try:
    for i in range(20):
        cur.execute("select %s", (i,))
        assert cur.fetchone()[0] == i
        n += 1
        time.sleep(0.05)
    print("OK after", n, flush=True)
except psycopg2.Error as e:
    print("ERR after %d in %.1fs: %s" % (n, time.monotonic() - start, str(e).strip().splitlines()[0]), flush=True)
"#;

/// PostgreSQL, the daemon with its cgroup, the client holding a session, the password
/// file's directory.
type Held = (PgServer, RunBroker, std::process::Child, tempfile::TempDir);

/// Start `broker run --cgroup` for a pg service on 127.0.0.2:5432 and a client holding
/// one session in the cgroup; returns once the session is spliced and idle.
fn held_session(tag: &str) -> Held {
    held_session_to(tag, "127.0.0.2:5432", "127.0.0.2")
}

/// [`held_session`] with the intercepted target and the host the client dials.
fn held_session_to(tag: &str, target: &str, client_host: &str) -> Held {
    let dir = tempfile::tempdir().expect("tempdir");
    let pw = "hold-pw-3e8d1a6c9f";
    let pg = PgServer::start(PgOptions::new(PgAuth::Scram, pw));
    let pw_file = write_file(dir.path(), "pw", pw);
    let b = run_broker(
        tag,
        "  splice: true\n",
        &format!(
            "  db:\n    connector: pg\n    intercept: [\"{target}\"]\n    credentials:\n      host: 127.0.0.1\n      port: \"{}\"\n      sslmode: disable\n      username: app_user\n      password: {{from: file, get: {}}}\n",
            pg.addr().port(),
            pw_file.display()
        ),
    );
    let python = python_with_psycopg2().expect("python3 with psycopg2");
    let mut c = Command::new("timeout");
    c.args(["--kill-after=5", "60"])
        .arg(python)
        .args([
            "-c",
            HOLD_SCRIPT,
            &format!("host={client_host} port=5432 user=anything dbname=app sslmode=disable"),
        ])
        .env_remove("PGPASSWORD")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit());
    b.cg.enter(&mut c);
    let mut child = c.spawn().expect("spawn python");
    let mut line = String::new();
    BufReader::new(child.stdout.as_mut().expect("stdout"))
        .read_line(&mut line)
        .expect("read ready");
    assert_eq!(line.trim(), "ready", "{}", b.daemon.log_text());
    (pg, b, child, dir)
}

fn finish(mut child: std::process::Child) -> String {
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(b"go\n")
        .expect("write go");
    let out = child.wait_with_output().expect("wait python");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn spliced_session_keeps_working_through_the_drain_after_sigterm() {
    if !privileged() {
        return;
    }
    let (_pg, mut b, child, _dir) = held_session("splice-drain");
    let RunBroker { daemon, cg, .. } = &mut b;
    // SAFETY: kill with a pid we own.
    unsafe { libc::kill(daemon.child.id() as i32, libc::SIGTERM) };
    std::thread::sleep(Duration::from_millis(300));
    assert!(
        !bpftool_cgroup_show(&cg.path).trim().is_empty(),
        "cgroup programs stay attached through the drain"
    );
    let out = finish(child);
    assert_eq!(
        out.trim(),
        "OK after 20",
        "the spliced session outlives the detach:\n{}",
        daemon.log_text()
    );
    let status = daemon.stop();
    assert!(status.success(), "{status}\n{}", daemon.log_text());
    assert!(
        bpftool_cgroup_show(&cg.path).trim().is_empty(),
        "cgroup programs detached once stopped"
    );
    assert_spliced_ok(&daemon.log_text(), "drain");
}

/// The daemon log's first access line says: spliced, result ok.
fn assert_spliced_ok(log: &str, what: &str) {
    let line = log
        .lines()
        .find(|l| l.contains("\"target\":\"access\""))
        .unwrap_or_else(|| panic!("{what}: no access line:\n{log}"));
    assert!(line.contains("\"spliced\":true"), "{what}: {line}");
    assert!(line.contains("\"result\":\"ok\""), "{what}: {line}");
}

#[test]
fn spliced_session_ends_cleanly_when_the_broker_is_killed() {
    if !privileged() {
        return;
    }
    let (_pg, mut b, child, _dir) = held_session("splice-kill");
    let daemon = &mut b.daemon;
    daemon.child.kill().expect("SIGKILL the broker");
    let _ = daemon.child.wait();
    let started = Instant::now();
    let out = finish(child);
    assert!(
        out.starts_with("ERR after 0"),
        "the client gets an error, not a hang or a silent success:\n{out}"
    );
    assert!(started.elapsed() < Duration::from_secs(10), "{out}");
}

#[test]
fn app_leaving_mid_result_ends_the_spliced_session_and_its_backend() {
    if !privileged() {
        return;
    }
    // The client holds a session open on stdin; we use the same daemon set-up and run
    // a second client that streams a large COPY and dies (SIGPIPE) after 100 kB.
    let (pg, b, holder, _dir) = held_session("splice-leave");
    let RunBroker { daemon, cg, .. } = &b;
    let mut c = Command::new("timeout");
    c.args([
        "--kill-after=5",
        "60",
        "sh",
        "-c",
        "psql -X -w \"host=127.0.0.2 port=5432 user=anything dbname=app sslmode=disable\" -c \"\\copy (select repeat('x', 1000) from generate_series(1, 5000000)) to stdout\" | head -c 100000 > /dev/null",
    ])
    .env_remove("PGPASSWORD")
    .stdin(Stdio::null());
    cg.enter(&mut c);
    let out = c.output().expect("run psql | head");
    assert!(out.status.success(), "{}", output_text(&out));
    let left_at = Instant::now();
    // Its session ends (the broker closes the upstream after the linger period) and the
    // server's backend goes away; the held session is unaffected.
    let deadline = left_at + Duration::from_secs(20);
    let backends = || {
        pg.admin_sql(
            "select count(*) from pg_stat_activity where usename = 'app_user' and query like '%generate_series%'",
        )
    };
    while backends() != "0" {
        assert!(
            Instant::now() < deadline,
            "the streaming backend is still there after 20 s:\n{}",
            daemon.log_text()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    let log = daemon.log_text();
    assert_eq!(
        log.lines()
            .filter(|l| l.contains("\"target\":\"access\""))
            .count(),
        1,
        "one session ended (the streaming one):\n{log}"
    );
    assert_eq!(finish(holder).trim(), "OK after 20");
}

#[test]
fn ipv6_and_ipv4_mapped_sessions_are_spliced_too() {
    if !privileged() {
        return;
    }
    // Native IPv6 (an AF_INET6 app socket to [::1]) and IPv4-mapped (an AF_INET6 app
    // socket talking IPv4): the kernel's and the daemon's socket keys must agree.
    for (tag, target, host) in [
        ("splice-v6", "[::1]:5432", "::1"),
        ("splice-mapped", "127.0.0.2:5432", "::ffff:127.0.0.2"),
    ] {
        let (_pg, mut b, child, _dir) = held_session_to(tag, target, host);
        let daemon = &mut b.daemon;
        assert_eq!(finish(child).trim(), "OK after 20", "{tag}");
        daemon.stop();
        assert_spliced_ok(&daemon.log_text(), tag);
    }
}
