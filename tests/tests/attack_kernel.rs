//! The kernel path, attacked as a local user would, for real: unprivileged users
//! (`runuser -u nobody`), their own user and network namespaces (`unshare -Urn`), a
//! child cgroup the test creates, a real PostgreSQL server and real clients. Each test
//! shows the attack fail closed, nothing leaked, and a canary still served.
//!
//! * another network namespace cannot take over a spliced session (it binds the victim's
//!   source port and listens on the broker's port in its own namespace);
//! * a record minted by a connect that fails cannot be redeemed: not by the same socket
//!   connecting to the broker's listener afterwards, not by a process outside the cgroup;
//!   and `getpeername` does not lie for such a socket;
//! * an MPTCP socket to a target: `getpeername` never shows the broker;
//! * a socket undoing its brokered connection with `connect(AF_UNSPEC)` gets a session of
//!   its own at each new connect to the target, and none from the broker's listener
//!   afterwards (connect4/6 look for an old record only on a socket they once recorded).

use std::{
    io::{BufRead as _, BufReader, Write as _},
    path::Path,
    process::{Command, Stdio},
};

use broker_tests::{
    RunBroker, assert_no_secret, free_port,
    net::Upstream,
    pg::{PgAuth, PgOptions, PgServer, python_with_psycopg2},
    privileged, run_broker, write_file,
};

/// The intercepted destination (nothing listens there: only the broker reaches the
/// database, at its real address).
const TARGET_HOST: &str = "127.0.0.2";
const TARGET_PORT: u16 = 5432;
const PASSWORD: &str = "attack-pw-8f3b1d2c7e";

/// A PostgreSQL server with `app_user`, and `broker run` on a child cgroup with a pg
/// service intercepting 127.0.0.2:5432 on a known transparent port (so an attacker can
/// try to impersonate it).
fn setup(tag: &str) -> (PgServer, RunBroker, u16, tempfile::TempDir) {
    let dir = tempfile::tempdir().expect("tempdir");
    let pg = PgServer::start(PgOptions::new(PgAuth::Scram, PASSWORD));
    let pw_file = write_file(dir.path(), "pw", PASSWORD);
    let port = free_port();
    let b = run_broker(
        tag,
        &format!("  splice: true\n  transparentPort: {port}\n"),
        &format!(
            "  db:\n    connector: pg\n    intercept: [\"{TARGET_HOST}:{TARGET_PORT}\"]\n    credentials:\n      host: 127.0.0.1\n      port: \"{}\"\n      sslmode: disable\n      username: app_user\n      password: {{from: file, get: {}}}\n",
            pg.addr().port(),
            pw_file.display()
        ),
    );
    (pg, b, port, dir)
}

fn dsn() -> String {
    format!(
        "host={TARGET_HOST} port={TARGET_PORT} user=anything password=dummy dbname=app sslmode=disable"
    )
}

fn python() -> String {
    python_with_psycopg2()
        .expect("python3 with psycopg2 (cargo xtask setup)")
        .to_str()
        .expect("UTF-8 path")
        .to_owned()
}

/// A command run as `nobody`, optionally in its own user and network namespace, bounded
/// in time; it joins `cgroup` first when given (as root, before dropping privileges).
fn as_nobody(cgroup: Option<&RunBroker>, own_netns: bool, argv: &[&str]) -> Command {
    let mut c = Command::new("timeout");
    c.args(["--kill-after=5", "60", "runuser", "-u", "nobody", "--"]);
    if own_netns {
        c.args(["unshare", "-Urn"]);
    }
    c.args(argv).env_remove("PGPASSWORD").stdin(Stdio::null());
    if let Some(b) = cgroup {
        b.cg.enter(&mut c);
    }
    c
}

fn run_text(mut c: Command) -> String {
    let out = c.output().expect("spawn");
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// The canary: a fresh brokered session in the cgroup still works.
fn assert_canary(b: &RunBroker) {
    let mut c = as_nobody(
        Some(b),
        false,
        &[
            &python(),
            "-c",
            "import sys, psycopg2\nc = psycopg2.connect(sys.argv[1])\ncur = c.cursor()\ncur.execute('select current_user')\nprint('canary', cur.fetchone()[0])",
            &dsn(),
        ],
    );
    c.env("PYTHONDONTWRITEBYTECODE", "1");
    let text = run_text(c);
    assert!(
        text.contains("canary app_user"),
        "the canary session was not served:\n{text}\n{}",
        b.daemon.log_text()
    );
}

/// Holds one brokered (spliced) session, prints its source port, waits for a line on
/// stdin, then runs 20 queries and checks every answer.
const VICTIM: &str = r#"
import os, socket, sys, psycopg2
c = psycopg2.connect(sys.argv[1])
c.autocommit = True
cur = c.cursor()
cur.execute("select 1")
s = socket.socket(fileno=os.dup(c.fileno()))
print("port", s.getsockname()[1], flush=True)
sys.stdin.readline()
n = 0
for i in range(20):
    cur.execute("select 'victim-row-' || %s::text", (i,))
    assert cur.fetchone()[0] == "victim-row-%d" % i
    n += 1
print("OK", n, flush=True)
"#;

/// In its own user and network namespace: listen on the broker's port, bind the
/// victim's source port, connect to the intercepted destination, send a query as the
/// victim's client would, and print whatever comes back (to either socket).
const HIJACKER: &str = r#"
import os, socket, struct, subprocess, sys
port, vport, host, tport = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], int(sys.argv[4])
print("netns", os.readlink("/proc/self/ns/net"), flush=True)
subprocess.run(["ip", "link", "set", "lo", "up"], check=True)
lst = socket.socket()
lst.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
lst.bind(("127.0.0.1", port))
lst.listen(8)
s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("127.0.0.1", vport))
s.settimeout(3)
try:
    s.connect((host, tport))
    print("connected", s.getpeername(), flush=True)
except OSError as e:
    print("connect failed", e.errno, flush=True)
    sys.exit(0)
q = b"select current_user || ' stolen'\0"
s.sendall(b"Q" + struct.pack("!I", len(q) + 4) + q)
got = b""
try:
    while len(got) < 65536:
        d = s.recv(65536)
        if not d:
            break
        got += d
except OSError:
    pass
print("received", len(got), repr(got[:300]), flush=True)
lst.settimeout(0.5)
try:
    a, _ = lst.accept()
    a.settimeout(1)
    print("listener got", repr(a.recv(4096)), flush=True)
except OSError:
    print("listener got nothing", flush=True)
"#;

#[test]
fn another_network_namespace_cannot_take_over_a_spliced_session() {
    if !privileged() {
        return;
    }
    let (pg, b, port, _dir) = setup("hijack");
    let mut victim = as_nobody(Some(&b), false, &[&python(), "-c", VICTIM, &dsn()]);
    victim.stdin(Stdio::piped()).stdout(Stdio::piped());
    let mut victim = victim.spawn().expect("spawn victim");
    let mut line = String::new();
    BufReader::new(victim.stdout.as_mut().expect("stdout"))
        .read_line(&mut line)
        .expect("read victim port");
    let vport = line
        .strip_prefix("port ")
        .and_then(|p| p.trim().parse::<u16>().ok())
        .unwrap_or_else(|| panic!("victim: {line}\n{}", b.daemon.log_text()));

    // The attacker: same cgroup, unprivileged, its own user and network namespace.
    let attack = run_text(as_nobody(
        Some(&b),
        true,
        &[
            &python(),
            "-c",
            HIJACKER,
            &port.to_string(),
            &vport.to_string(),
            TARGET_HOST,
            &TARGET_PORT.to_string(),
        ],
    ));
    println!("attacker:\n{attack}");
    assert!(
        attack.contains("netns "),
        "the attacker ran in its own namespace: {attack}"
    );
    assert!(
        !attack.contains("connected"),
        "a socket in another network namespace was redirected:\n{attack}"
    );
    for leak in ["stolen", "app_user", "victim-row"] {
        assert!(
            !attack.contains(leak),
            "the attacker got `{leak}`:\n{attack}"
        );
    }

    // The victim's session is intact and still its own.
    victim
        .stdin
        .take()
        .expect("stdin")
        .write_all(b"go\n")
        .expect("write go");
    let out = victim.wait_with_output().expect("wait victim");
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(
        text.trim(),
        "OK 20",
        "victim session after the attack:\n{text}\n{}",
        b.daemon.log_text()
    );
    assert_canary(&b);
    let log = b.daemon.log_text();
    assert!(
        log.contains("\"spliced\":true"),
        "the victim was spliced:\n{log}"
    );
    assert_no_secret(
        &format!("{attack}{text}{log}"),
        &[PASSWORD],
        "outputs and log",
    );
    assert_no_secret(&pg.log_text(), &[PASSWORD], "PostgreSQL log");
}

/// A PostgreSQL StartupMessage for `app_user`, for raw-socket clients.
const STARTUP: &str = r#"
import struct
def startup():
    body = struct.pack("!I", 196608) + b"user\0app_user\0database\0app\0\0"
    return struct.pack("!I", len(body) + 4) + body
def drain(s):
    got = b""
    try:
        while len(got) < 65536:
            d = s.recv(65536)
            if not d:
                break
            got += d
    except OSError as e:
        print("recv error", e.errno, flush=True)
    return got
"#;

/// In the cgroup: mint a record with a connect that fails (an IPv6-only socket to the
/// IPv4-mapped target), then connect the same socket straight to the broker's listener
/// and ask for a session.
const MINTER: &str = r#"
import socket, sys
port, host, tport = int(sys.argv[1]), sys.argv[2], int(sys.argv[3])
s = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
s.settimeout(5)
try:
    s.connect(("::ffff:" + host, tport))
    print("mapped connect succeeded", flush=True)
except OSError as e:
    print("mapped connect failed", e.errno, flush=True)
s.connect(("::1", port))
print("peer", s.getpeername()[0], s.getpeername()[1], flush=True)
s.sendall(startup())
got = drain(s)
print("got", len(got), repr(got[:100]), flush=True)
"#;

/// Outside the cgroup: connect to the broker's listener directly, from a chosen source
/// port, and ask for a session.
const OUTSIDER: &str = r#"
import socket, sys
port = int(sys.argv[1])
s = socket.socket()
s.settimeout(5)
s.bind(("127.0.0.1", 0))
s.connect(("127.0.0.1", port))
s.sendall(startup())
got = drain(s)
print("got", len(got), repr(got[:100]), flush=True)
"#;

#[test]
fn a_failed_connect_mints_no_record_and_getpeername_does_not_lie() {
    if !privileged() {
        return;
    }
    let (pg, b, port, _dir) = setup("mint");
    let minter = run_text(as_nobody(
        Some(&b),
        false,
        &[
            &python(),
            "-c",
            &format!("{STARTUP}{MINTER}"),
            &port.to_string(),
            TARGET_HOST,
            &TARGET_PORT.to_string(),
        ],
    ));
    println!("minter:\n{minter}");
    assert!(
        minter.contains("mapped connect failed 101"),
        "the minting connect fails (ENETUNREACH):\n{minter}"
    );
    assert!(
        minter.contains(&format!("peer ::1 {port}")),
        "getpeername shows the real peer of a socket that was not redirected:\n{minter}"
    );
    assert!(
        minter.contains("got 0 "),
        "the minted socket got no session:\n{minter}\n{}",
        b.daemon.log_text()
    );

    let outsider = run_text(as_nobody(
        None,
        false,
        &[
            &python(),
            "-c",
            &format!("{STARTUP}{OUTSIDER}"),
            &port.to_string(),
        ],
    ));
    println!("outsider:\n{outsider}");
    assert!(
        outsider.contains("got 0 "),
        "a process outside the cgroup got a session:\n{outsider}"
    );

    let log = b.daemon.log_until(std::time::Duration::from_secs(2), |l| {
        l.matches("\"result\":\"refused\"").count() >= 2
    });
    let refused = log.matches("\"result\":\"refused\"").count();
    assert!(refused >= 2, "both were refused and logged:\n{log}");
    assert!(
        !log.contains("\"result\":\"ok\""),
        "nothing was brokered before the canary:\n{log}"
    );
    assert_canary(&b);
    assert_no_secret(
        &format!("{minter}{outsider}{}", b.daemon.log_text()),
        &[PASSWORD],
        "outputs and log",
    );
    assert_no_secret(&pg.log_text(), &[PASSWORD], "PostgreSQL log");
}

/// In the cgroup: one socket connects to the target, gets a session (ReadyForQuery) and
/// undoes the connection with `connect(AF_UNSPEC)`, three times; then connects straight
/// to the broker's listener and asks for a session.
const RECONNECTER: &str = r#"
import ctypes, socket, sys
libc = ctypes.CDLL(None, use_errno=True)
port, host, tport = int(sys.argv[1]), sys.argv[2], int(sys.argv[3])
s = socket.socket()
s.settimeout(10)
def unspec():
    sa = ctypes.create_string_buffer(16)
    r = libc.connect(s.fileno(), sa, 16)
    print("unspec", r, ctypes.get_errno() if r else 0, flush=True)
for i in range(3):
    s.connect((host, tport))
    print("peer", s.getpeername()[0], s.getpeername()[1], flush=True)
    s.sendall(startup())
    got = b""
    while b"Z\0\0\0\x05" not in got:
        d = s.recv(65536)
        if not d:
            break
        got += d
    print("session", i, b"Z\0\0\0\x05" in got, flush=True)
    unspec()
s.connect(("127.0.0.1", port))
print("peer", s.getpeername()[0], s.getpeername()[1], flush=True)
s.sendall(startup())
got = drain(s)
print("got", len(got), repr(got[:100]), flush=True)
"#;

#[test]
fn a_socket_reconnecting_with_af_unspec_gets_a_fresh_session_and_nothing_after() {
    if !privileged() {
        return;
    }
    let (pg, b, port, _dir) = setup("unspec");
    let text = run_text(as_nobody(
        Some(&b),
        false,
        &[
            &python(),
            "-c",
            &format!("{STARTUP}{RECONNECTER}"),
            &port.to_string(),
            TARGET_HOST,
            &TARGET_PORT.to_string(),
        ],
    ));
    println!("reconnecter:\n{text}");
    for i in 0..3 {
        assert!(
            text.contains(&format!("session {i} True")),
            "connect {i} to the target got its own session:\n{text}\n{}",
            b.daemon.log_text()
        );
    }
    assert_eq!(
        text.matches(&format!("peer {TARGET_HOST} {TARGET_PORT}"))
            .count(),
        3,
        "getpeername shows the target each time:\n{text}"
    );
    assert_eq!(text.matches("unspec 0 0").count(), 3, "{text}");
    assert!(
        text.contains(&format!("peer 127.0.0.1 {port}")) && text.contains("got 0 "),
        "the same socket, straight to the listener, got no session:\n{text}\n{}",
        b.daemon.log_text()
    );
    let log = b.daemon.log_until(std::time::Duration::from_secs(2), |l| {
        l.contains("\"result\":\"refused\"")
    });
    assert!(
        log.contains("\"result\":\"refused\""),
        "refused and logged:\n{log}"
    );
    assert_canary(&b);
    assert_no_secret(
        &format!("{text}{}", b.daemon.log_text()),
        &[PASSWORD],
        "outputs and log",
    );
    assert_no_secret(&pg.log_text(), &[PASSWORD], "PostgreSQL log");
}

/// Connects with MPTCP and with TCP to the target and reports the peer each socket sees
/// and the first line the server sent.
const MPTCP: &str = r#"
import socket, sys
host, port = sys.argv[1], int(sys.argv[2])
for name, proto in (("mptcp", 262), ("tcp", 6)):
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM, proto)
    s.settimeout(5)
    s.connect((host, port))
    peer = s.getpeername()
    s.sendall(b"GET / HTTP/1.0\r\n\r\n")
    got = b""
    while True:
        d = s.recv(4096)
        if not d:
            break
        got += d
    body = got.split(b"\r\n\r\n", 1)[-1].decode()
    print(name, "peer", peer[0], peer[1], "body", body, flush=True)
"#;

#[test]
fn mptcp_sockets_never_see_the_broker_as_their_peer() {
    if !privileged() {
        return;
    }
    if !Path::new("/proc/sys/net/mptcp/enabled").exists() {
        panic!("this kernel has no MPTCP; the test needs net.mptcp");
    }
    // The target itself answers too, so a connection left alone gets there.
    let direct = Upstream::start(TARGET_HOST, "direct");
    let brokered = Upstream::start("127.0.0.1", "upstream");
    let target = direct.addr;
    let b = run_broker(
        "mptcp",
        "",
        &format!(
            "  web:\n    connector: tcp\n    intercept: [\"{target}\"]\n    credentials:\n      host: 127.0.0.1\n      port: \"{}\"\n",
            brokered.addr.port()
        ),
    );
    let text = run_text(as_nobody(
        Some(&b),
        false,
        &[
            "python3",
            "-c",
            MPTCP,
            &target.ip().to_string(),
            &target.port().to_string(),
        ],
    ));
    println!("{text}");
    let want_peer = format!("peer {} {}", target.ip(), target.port());
    let line = |name: &str| {
        text.lines()
            .find(|l| l.starts_with(&format!("{name} peer")))
            .unwrap_or_else(|| panic!("no {name} line:\n{text}\n{}", b.daemon.log_text()))
            .to_owned()
    };
    let (mptcp, tcp) = (line("mptcp"), line("tcp"));
    assert!(tcp.contains(&want_peer), "tcp: {tcp}");
    assert!(
        tcp.ends_with("body hello from upstream"),
        "tcp is brokered: {tcp}"
    );
    assert!(
        mptcp.contains(&want_peer),
        "an MPTCP socket sees the real peer: {mptcp}"
    );
    assert!(
        mptcp.ends_with("body hello from direct"),
        "MPTCP is left alone (documented): {mptcp}"
    );
}

/// Connects to the broker's listener directly, as fast as it can, for `seconds`, each
/// time waiting for the broker's answer (it closes without a byte). A connection closed
/// before the broker accepted it is a client's business (a driver's probe), logged at
/// debug; one still open when accepted is refused and logged.
const FLOOD: &str = r#"
import socket, sys, time
port, seconds = int(sys.argv[1]), float(sys.argv[2])
n = 0
end = time.monotonic() + seconds
while time.monotonic() < end and n < 200000:
    s = socket.socket()
    s.settimeout(2)
    try:
        s.connect(("127.0.0.1", port))
        n += 1
        s.recv(1)
    except OSError:
        pass
    s.close()
print("connections", n, flush=True)
"#;

#[test]
fn direct_connection_floods_are_logged_at_a_bounded_rate() {
    if !privileged() {
        return;
    }
    let (_pg, b, port, _dir) = setup("flood");
    let text = run_text(as_nobody(
        None,
        false,
        &["python3", "-c", FLOOD, &port.to_string(), "2"],
    ));
    let n: usize = text
        .trim()
        .strip_prefix("connections ")
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("flood: {text}"));
    // The summary of the last second is written a second later.
    std::thread::sleep(std::time::Duration::from_millis(1500));
    let log = b.daemon.log_text();
    let lines = log.matches("connection refused").count();
    println!("{n} direct connections in 2 s -> {lines} refusal lines");
    assert!(n >= 200, "the flood made {n} connections");
    assert!(
        lines <= 10 * 4,
        "{lines} refusal lines for {n} connections in 2 s"
    );
    assert!(
        log.contains("suppressed") && log.contains("refusals in the last second"),
        "the rest are summarised:\n{log}"
    );
    assert_canary(&b);
}
