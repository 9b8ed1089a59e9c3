//! The kernel splice under stress: spliced PostgreSQL sessions whose directions fall back
//! to the daemon's relay mid-session, with real clients (psycopg2 `copy_expert`, and a
//! raw protocol client that pipelines like pgx batches or psycopg 3's pipeline mode),
//! in the cgroup of a `broker run` daemon:
//!
//! * [`copy_and_pipelined_sessions_with_fallbacks_stay_intact`]: up to 200 sessions or
//!   90 s, whichever comes first, two at a time, each of one kind (sizes and pacing
//!   vary per iteration, deterministically):
//!   - a COPY out read slowly through a small receive buffer (the download falls back);
//!   - a COPY in while the server stops reading for a moment (a trigger sleeps at one
//!     row; the upload falls back);
//!   - both in one session;
//!   - pipelined queries, each with a large literal and a large result, written by one
//!     thread while the other reads slowly: both directions fall back while the server
//!     is blocked on its output, which is the daemon's to read. (Before, the daemon
//!     forwarded the upload with a blocking write: it waited for the server to read, the
//!     server for the daemon to read, forever.)
//!
//!   Every byte is checked on both sides (checksums computed by the client and by the
//!   server), no session may take longer than a generous bound (a hung one ends the
//!   script with a traceback), the access log shows the fallbacks in most sessions of
//!   each kind, and the daemon still serves a canary afterwards.
//! * [`spliced_close_delivers_every_last_byte_before_the_end`]: the server sends a
//!   large last result and closes (after the client's Terminate, or
//!   `pg_terminate_backend`); the app, reading fast or slowly, gets every byte and the
//!   FATAL message before the end of the stream. The time from Terminate to the end of
//!   the stream is printed for spliced and relayed sessions (not asserted).
//!
//! No secret in any output.

use std::{
    collections::HashMap,
    process::{Command, Stdio},
    sync::Mutex,
    time::Instant,
};

use broker_tests::{
    RunBroker, assert_no_secret, output_text,
    pg::{PgAuth, PgOptions, PgServer, python_with_psycopg2},
    privileged, run_broker, write_file,
};

/// The tests here load both cores: one at a time.
static SERIAL: Mutex<()> = Mutex::new(());

const PW: &str = "stress-pw-4f7c1a9e3b";

/// Sessions at most, and the time budget for starting new ones.
const MAX_ITERATIONS: u32 = 200;
const BUDGET_SECS: u32 = 90;
/// The longest one session may take (it takes 2 s at most here); a session that takes
/// longer ends the script with a traceback.
const SESSION_BOUND_SECS: u32 = 30;
/// Sessions that must have run within the budget, even on a slow machine.
const MIN_ITERATIONS: usize = 40;

/// The stress client: `stress.py HOST PORT MAX_ITERATIONS BUDGET_SECS BOUND_SECS`.
/// Prints `ITER i kind=K port=P secs=S result...` per session (its local port names its
/// access line), `CANARY 42`, then `DONE n secs`.
const STRESS: &str = r#"
import faulthandler, hashlib, os, random, socket, struct, sys, threading, time, psycopg2
host, port = sys.argv[1], int(sys.argv[2])
max_iters, budget, bound = int(sys.argv[3]), float(sys.argv[4]), int(sys.argv[5])
dsn = "host=%s port=%d user=anything dbname=app sslmode=disable" % (host, port)
WORKERS = 2

def connect():
    c = psycopg2.connect(dsn)
    c.autocommit = True
    # The checksums sort a few MB: in memory, not in temporary files.
    c.cursor().execute("set work_mem = '64MB'")
    return c

def with_socket(c, f):
    s = socket.socket(fileno=os.dup(c.fileno()))
    try:
        return f(s)
    finally:
        s.close()

c = connect()
cur = c.cursor()
# The server stops reading for a while at one row: the app's upload piles up in the
# upstream's send buffer and falls back to the daemon.
cur.execute("""create or replace function stress_stall() returns trigger language plpgsql as $$
begin
  if new.id = current_setting('stress.stall_row')::bigint then
    perform pg_sleep(current_setting('stress.stall_ms')::int / 1000.0);
  end if;
  return new;
end $$""")
for w in range(WORKERS):
    cur.execute("drop table if exists stress_in_%d" % w)
    cur.execute("create unlogged table stress_in_%d (id bigint, line text)" % w)
    cur.execute("create trigger stress_stall before insert on stress_in_%d for each row execute function stress_stall()" % w)
c.close()

class Source:
    def __init__(self, rows, width, seed):
        self.rows, self.i = rows, 0
        self.pad = "".join(random.Random(seed).choice("abcdefghij") for _ in range(width))
        self.h, self.n = hashlib.md5(), 0
    def read(self, k=65536):
        out, size = [], 0
        while self.i < self.rows and size < k:
            line = "%d\t%s%s\n" % (self.i, self.pad[self.i % 7:], self.pad[:self.i % 7])
            out.append(line)
            size += len(line)
            self.i += 1
        s = "".join(out)
        b = s.encode()
        self.h.update(b)
        self.n += len(b)
        return s

class Sink:
    def __init__(self, every, pause):
        self.n, self.h, self.k, self.every, self.pause = 0, hashlib.md5(), 0, every, pause
    def write(self, b):
        if isinstance(b, str):
            b = b.encode()
        self.n += len(b)
        self.h.update(b)
        self.k += 1
        # Slow at first (the kernel runs ahead of the app and hands the direction
        # back), then at full speed through the daemon's relay.
        if self.n < (3 << 20) and self.k % self.every == 0:
            time.sleep(self.pause)

def copy_in(cur, r, i, worker):
    table = "stress_in_%d" % worker
    width = r.choice([300, 700, 1500])
    rows = r.randint(2 << 20, 5 << 20) // width
    cur.execute("truncate " + table)
    cur.execute("select set_config('stress.stall_row', %s, false), set_config('stress.stall_ms', %s, false)",
                (str(r.randint(0, rows // 8)), str(r.choice([80, 150, 250]))))
    src = Source(rows, width, i)
    cur.copy_expert("copy %s from stdin" % table, src, size=r.choice([16384, 65536, 1 << 20]))
    cur.execute("select count(*), md5(coalesce(string_agg(id || E'\\t' || line || E'\\n', '' order by id), '')) from " + table)
    n, md5 = cur.fetchone()
    ok = n == rows and md5 == src.h.hexdigest()
    return "in=%d:%s" % (src.n, "ok" if ok else "BAD(%s rows, %s)" % (n, md5))

def copy_out(cur, r, i):
    rows = r.randint(5 << 20, 7 << 20) // 961
    q = "select repeat(md5((g * %d)::text), 30) from generate_series(1, %d) g" % (i + 1, rows)
    sink = Sink(r.choice([10, 25, 50]), r.choice([0.001, 0.002]))
    cur.copy_expert("copy (%s) to stdout" % q, sink)
    cur.execute("select md5(string_agg(l || E'\\n', '' order by n)) from (select row_number() over () n, l from (%s) q(l)) x" % q)
    ok = cur.fetchone()[0] == sink.h.hexdigest()
    return "out=%d:%s" % (sink.n, "ok" if ok else "BAD")

def frame(t, body):
    return t + struct.pack("!i", 4 + len(body)) + body

def pipelined(r, i):
    # One thread sends every query at once, the other reads the answers, slowly for the
    # first half. Each query carries a large literal and asks for a large result.
    s = socket.create_connection((host, port))
    s.settimeout(bound)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, r.choice([65536, 131072]))
    params = b"user\0anything\0database\0app\0\0"
    s.sendall(struct.pack("!ii", 8 + len(params), 196608) + params)
    buf = [b""]
    def msg():
        while True:
            b = buf[0]
            if len(b) >= 5:
                n = struct.unpack("!i", b[1:5])[0]
                if len(b) >= 1 + n:
                    buf[0] = b[1 + n:]
                    return b[0:1], b[5:1 + n]
            chunk = s.recv(65536)
            if not chunk:
                raise EOFError("end of stream inside a message")
            buf[0] = b + chunk
    while msg()[0] != b"Z":
        pass
    nq = r.randint(110, 150)
    up_size, down_size = r.choice([80000, 100000]), 200000
    queries = []
    for k in range(nq):
        lit = ("%08d" % (i * 1000 + k)) * (up_size // 8)
        sql = "select md5('%s'), repeat(md5('%d'), %d)" % (lit, k, down_size // 32)
        queries.append((lit, frame(b"Q", sql.encode() + b"\0")))
    def writer():
        for _, q in queries:
            s.sendall(q)
    w = threading.Thread(target=writer, daemon=True)
    w.start()
    got, ok, row = 0, True, None
    while got < nq:
        t, m = msg()
        if t == b"D":
            row = m
        elif t == b"Z":
            want = (hashlib.md5(queries[got][0].encode()).hexdigest(),
                    hashlib.md5(str(got).encode()).hexdigest() * (down_size // 32))
            n1 = struct.unpack("!i", row[2:6])[0]
            ok = ok and (row[6:6 + n1].decode(), row[10 + n1:].decode()) == want
            got += 1
            if got < nq // 2:
                time.sleep(0.01)
        elif t == b"E":
            ok = False
    w.join(bound)
    local = s.getsockname()[1]
    s.sendall(b"X\0\0\0\4")
    s.close()
    return local, "pipelined=%dx%d+%d:%s" % (nq, up_size, down_size, "ok" if ok else "BAD")

# The workers split the iterations, so that sessions also overlap.
worker, children = 0, []
for w in range(1, WORKERS):
    pid = os.fork()
    if pid == 0:
        worker, children = w, []
        break
    children.append(pid)

start = time.monotonic()
done = 0
for i in range(worker, max_iters, WORKERS):
    if time.monotonic() - start > budget:
        break
    # A hung session ends the script here, with a traceback and no DONE line.
    faulthandler.dump_traceback_later(bound, exit=True)
    r = random.Random(i)
    kind = (i // WORKERS) % 4
    t0 = time.monotonic()
    if kind == 3:
        local, res = pipelined(r, i)
        res = [res]
    else:
        c = connect()
        local = with_socket(c, lambda s: s.getsockname()[1])
        cur = c.cursor()
        res = []
        if kind != 1:
            with_socket(c, lambda s: s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, r.choice([65536, 131072, 262144])))
        if kind != 0:
            res.append(copy_in(cur, r, i, worker))
        if kind != 1:
            res.append(copy_out(cur, r, i))
        cur.execute("select %s", (i,))
        assert cur.fetchone()[0] == i
        c.close()
    # One write(2) per line: the workers share the pipe (print may write the newline
    # separately, and lines of two workers then run together).
    os.write(1, ("ITER %d kind=%d port=%d secs=%.2f %s\n" % (i, kind, local, time.monotonic() - t0, " ".join(res))).encode())
    done += 1
faulthandler.cancel_dump_traceback_later()
if worker:
    os._exit(0)
for pid in children:
    _, status = os.waitpid(pid, 0)
    if status != 0:
        print("WORKER FAILED status %d" % status, flush=True)
        sys.exit(1)
c = connect()
cur = c.cursor()
cur.execute("select 40 + 2")
print("CANARY", cur.fetchone()[0], flush=True)
c.close()
print("DONE %.1f" % (time.monotonic() - start), flush=True)
"#;

/// PostgreSQL (scram) and a daemon for a pg service on 127.0.0.2:5432 (`broker_extra`:
/// lines of its `broker:` block); the password file's directory.
fn setup(tag: &str, pg: &PgServer, broker_extra: &str) -> (RunBroker, tempfile::TempDir) {
    let pw_dir = tempfile::tempdir().expect("tempdir");
    let pw_file = write_file(pw_dir.path(), "pw", PW);
    let b = run_broker(
        tag,
        broker_extra,
        &format!(
            "  db:\n    connector: pg\n    intercept: [\"127.0.0.2:5432\"]\n    credentials:\n      host: 127.0.0.1\n      port: \"{}\"\n      sslmode: disable\n      username: app_user\n      password: {{from: file, get: {}}}\n",
            pg.addr().port(),
            pw_file.display()
        ),
    );
    (b, pw_dir)
}

/// `python3 -c SCRIPT ARGS...` in the daemon's cgroup, killed after `secs`.
fn python_in(b: &RunBroker, script: &str, args: &[&str], secs: u32) -> std::process::Output {
    let python = python_with_psycopg2().expect("python3 with psycopg2 (cargo xtask setup)");
    let mut c = Command::new("timeout");
    c.args(["--kill-after=5", &secs.to_string()])
        .arg(python)
        .args(["-c", script])
        .args(args)
        .env_remove("PGPASSWORD")
        .stdin(Stdio::null());
    b.cg.enter(&mut c);
    c.output().expect("run python")
}

/// The daemon's access lines by the client's port (ports seen twice are left out: the
/// line could be either session's).
fn access_by_port(log: &str) -> HashMap<u16, serde_json::Value> {
    let mut by_port = HashMap::new();
    let mut seen_twice = Vec::new();
    for v in log
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|v| v["target"] == "access")
    {
        let Some(port) = v["src.addr"]
            .as_str()
            .and_then(|a| a.parse::<std::net::SocketAddr>().ok())
            .map(|a| a.port())
        else {
            continue;
        };
        if by_port.insert(port, v).is_some() {
            seen_twice.push(port);
        }
    }
    for p in seen_twice {
        by_port.remove(&p);
    }
    by_port
}

/// One `ITER` line: iteration, kind, client port, seconds, results.
struct Iteration {
    i: u32,
    kind: u32,
    port: u16,
    secs: f64,
    results: Vec<String>,
}

fn parse_iteration(line: &str) -> Option<Iteration> {
    let mut w = line.strip_prefix("ITER ")?.split_whitespace();
    let i = w.next()?.parse().ok()?;
    let field = |s: Option<&str>, k: &str| s?.strip_prefix(k)?.parse::<f64>().ok();
    let kind = field(w.next(), "kind=")? as u32;
    let port = field(w.next(), "port=")? as u16;
    let secs = field(w.next(), "secs=")?;
    Some(Iteration {
        i,
        kind,
        port,
        secs,
        results: w.map(str::to_owned).collect(),
    })
}

#[test]
fn copy_and_pipelined_sessions_with_fallbacks_stay_intact() {
    if !privileged() {
        return;
    }
    let _serial = SERIAL
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    let pg = PgServer::start(PgOptions::new(PgAuth::Scram, PW));
    let (b, _pw_dir) = setup("splice-stress", &pg, "  splice: true\n");
    let started = Instant::now();
    let out = python_in(
        &b,
        STRESS,
        &[
            "127.0.0.2",
            "5432",
            &MAX_ITERATIONS.to_string(),
            &BUDGET_SECS.to_string(),
            &SESSION_BOUND_SECS.to_string(),
        ],
        BUDGET_SECS + 2 * SESSION_BOUND_SECS + 30,
    );
    let took = started.elapsed();
    let text = output_text(&out);
    let log = b.daemon.log_text();
    assert_no_secret(&text, &[PW], "stress client output");
    assert_no_secret(&log, &[PW], "daemon log");
    assert_no_secret(&pg.log_text(), &[PW], "PostgreSQL log");
    let tail = |s: &str| {
        let lines: Vec<&str> = s.lines().collect();
        lines[lines.len().saturating_sub(40)..].join("\n")
    };
    assert!(
        out.status.success() && text.lines().any(|l| l.starts_with("DONE ")),
        "the stress client did not finish (a session hung or failed):\n{text}\n--- daemon log (tail) ---\n{}",
        tail(&log)
    );
    assert!(
        text.lines().any(|l| l == "CANARY 42"),
        "the daemon still serves a new session afterwards:\n{text}"
    );

    let iterations: Vec<Iteration> = text.lines().filter_map(parse_iteration).collect();
    assert!(
        iterations.len() >= MIN_ITERATIONS,
        "only {} sessions in {BUDGET_SECS} s:\n{text}",
        iterations.len()
    );
    for it in &iterations {
        assert!(
            !it.results.is_empty() && it.results.iter().all(|r| r.ends_with(":ok")),
            "iteration {} (kind {}): data not intact: {:?}\n{text}",
            it.i,
            it.kind,
            it.results
        );
        assert!(
            it.secs <= f64::from(SESSION_BOUND_SECS),
            "iteration {} took {} s",
            it.i,
            it.secs
        );
    }

    // Each session's access line: spliced, ok, and which directions fell back.
    let access = access_by_port(&log);
    // kind -> (sessions with an access line, sessions with the expected fallback)
    let mut share: HashMap<u32, (u32, u32)> = HashMap::new();
    let mut fallbacks: HashMap<String, u32> = HashMap::new();
    for it in &iterations {
        let Some(a) = access.get(&it.port) else {
            continue;
        };
        assert_eq!(a["result"], "ok", "iteration {}: {a}", it.i);
        assert_eq!(a["spliced"], true, "iteration {}: {a}", it.i);
        let fallback = a["splice.fallback"].as_str().unwrap_or("").to_owned();
        let expected = match it.kind {
            0 => fallback == "down" || fallback == "both",
            1 => fallback == "up" || fallback == "both",
            _ => fallback == "both",
        };
        let e = share.entry(it.kind).or_default();
        e.0 += 1;
        e.1 += u32::from(expected);
        *fallbacks.entry(fallback).or_default() += 1;
    }
    let max_secs = iterations.iter().map(|i| i.secs).fold(0.0, f64::max);
    println!(
        "{} sessions in {:.1} s (longest {max_secs:.2} s); fallbacks by kind (sessions, expected fallback): {share:?}; all: {fallbacks:?}",
        iterations.len(),
        took.as_secs_f64()
    );
    for kind in 0..4 {
        let (n, expected) = share.get(&kind).copied().unwrap_or_default();
        // Kind 2 (COPY in then out): most sessions fall back both ways.
        let need = if kind == 2 { n / 3 } else { n / 2 };
        assert!(
            n >= 5 && expected >= need.max(1),
            "kind {kind}: {expected} of {n} sessions fell back as expected ({share:?})"
        );
    }
    assert!(
        !log.contains("never delivered"),
        "no session lost bytes in the kernel:\n{}",
        tail(&log)
    );
}

/// `lastbytes.py HOST PORT N MODE`: N sessions, each asking for a large result (2 MB)
/// followed by the server's close: `terminate` sends Terminate right behind the query
/// (the server answers, then closes), `fatal` ends the query string with
/// `pg_terminate_backend(pg_backend_pid())` (the server answers, sends FATAL 57P01 and
/// closes). Every other session reads slowly through a small receive buffer. Prints
/// `BAD ...` for a session that missed bytes, then `DONE mode n bad k`.
const LAST_BYTES: &str = r#"
import socket, struct, sys, time
host, port, n, mode = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
rows, width = 2000, 1000

def connect():
    s = socket.create_connection((host, port))
    s.settimeout(20)
    p = b"user\0anything\0database\0app\0\0"
    s.sendall(struct.pack("!ii", 8 + len(p), 196608) + p)
    return s

def messages(s, slow):
    buf = b""
    while True:
        while len(buf) >= 5:
            ln = struct.unpack("!i", buf[1:5])[0]
            if len(buf) < 1 + ln:
                break
            yield buf[0:1], buf[5:1 + ln]
            buf = buf[1 + ln:]
        c = s.recv(65536)
        if not c:
            if buf:
                yield b"!", buf
            return
        buf += c
        if slow:
            time.sleep(slow)

def query(sql):
    sql = sql.encode() + b"\0"
    return b"Q" + struct.pack("!i", 4 + len(sql)) + sql

bad = 0
for i in range(n):
    s = connect()
    for t, m in messages(s, 0):
        if t == b"Z":
            break
    slow = 0.002 if i % 2 else 0
    if slow:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 65536)
    big = "select repeat('x', %d) || %d from generate_series(1, %d)" % (width, i, rows)
    if mode == "terminate":
        s.sendall(query(big) + b"X\0\0\0\4")
    else:
        s.sendall(query(big + "; select pg_terminate_backend(pg_backend_pid())"))
    data, tags = 0, []
    for t, m in messages(s, slow):
        if t == b"D":
            data += len(m)
        else:
            tags.append((t, m[:200]))
    # DataRow: column count, value length, value.
    want = rows * (2 + 4 + width + len(str(i)))
    kinds = b"".join(t for t, _ in tags)
    if mode == "terminate":
        ok = data == want and kinds.endswith(b"CZ")
    else:
        # The FATAL may follow pg_terminate_backend's own row (7 bytes).
        ok = data - want in (0, 7) and kinds[-1:] == b"E" and b"C57P01" in tags[-1][1]
    if not ok:
        bad += 1
        print("BAD", mode, i, "slow" if slow else "fast", data, want, kinds[-6:], flush=True)
    s.close()
print("DONE", mode, n, "bad", bad, flush=True)
"#;

/// `closelat.py HOST PORT N`: N sessions that run one query, then send Terminate and
/// read to the end of the stream (as asyncpg closes); prints the median time from
/// Terminate to the end.
const CLOSE_LATENCY: &str = r#"
import socket, statistics, struct, sys, time
host, port, n = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])

def ready(s, buf=b""):
    while True:
        while len(buf) >= 5:
            ln = struct.unpack("!i", buf[1:5])[0]
            if len(buf) < 1 + ln:
                break
            t, buf = buf[0:1], buf[1 + ln:]
            if t == b"Z":
                return buf
        c = s.recv(65536)
        if not c:
            raise EOFError("end of stream before ReadyForQuery")
        buf += c

lat = []
for i in range(n):
    s = socket.create_connection((host, port))
    s.settimeout(20)
    p = b"user\0anything\0database\0app\0\0"
    s.sendall(struct.pack("!ii", 8 + len(p), 196608) + p)
    ready(s)
    q = b"select 1\0"
    s.sendall(b"Q" + struct.pack("!i", 4 + len(q)) + q)
    ready(s)
    t0 = time.perf_counter()
    s.sendall(b"X\0\0\0\4")
    while s.recv(65536):
        pass
    lat.append((time.perf_counter() - t0) * 1000)
    s.close()
print("MEDIAN_MS %.2f" % statistics.median(lat), flush=True)
"#;

#[test]
fn spliced_close_delivers_every_last_byte_before_the_end() {
    if !privileged() {
        return;
    }
    let _serial = SERIAL
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    let pg = PgServer::start(PgOptions::new(PgAuth::Scram, PW));
    let (spliced, _d1) = setup("splice-close", &pg, "  splice: true\n");
    for mode in ["terminate", "fatal"] {
        let out = python_in(
            &spliced,
            LAST_BYTES,
            &["127.0.0.2", "5432", "30", mode],
            300,
        );
        let text = output_text(&out);
        assert_no_secret(&text, &[PW], "client output");
        assert!(
            out.status.success() && text.contains(&format!("DONE {mode} 30 bad 0")),
            "{mode}: the app missed the server's last bytes:\n{text}\n{}",
            spliced.daemon.log_text()
        );
    }
    let log = spliced.daemon.log_text();
    assert_no_secret(&log, &[PW], "daemon log");
    let access: Vec<serde_json::Value> = log
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|v| v["target"] == "access")
        .collect();
    assert!(
        access.len() >= 60 && access.iter().all(|a| a["spliced"] == true),
        "every session was spliced:\n{log}"
    );

    // Close latency, spliced and relayed (reported, not asserted).
    let median = |b: &RunBroker| {
        let out = python_in(b, CLOSE_LATENCY, &["127.0.0.2", "5432", "30"], 120);
        let text = output_text(&out);
        assert!(out.status.success(), "{text}");
        text.lines()
            .find_map(|l| l.strip_prefix("MEDIAN_MS "))
            .unwrap_or("?")
            .to_owned()
    };
    let spliced_ms = median(&spliced);
    drop(spliced);
    let (relayed, _d2) = setup("splice-close-off", &pg, "  splice: false\n");
    let relayed_ms = median(&relayed);
    println!(
        "close (Terminate -> end of stream), median of 30: spliced {spliced_ms} ms, relayed {relayed_ms} ms"
    );
}
