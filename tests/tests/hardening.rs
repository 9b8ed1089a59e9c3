//! Hardening, by performing each fault or attack for real against `broker run`: a closed
//! log pipe, SIGHUP, SIGTERM with an idle connection, a connection flood past the caps,
//! a hostile upstream forging log lines, a secret server that redirects or answers
//! empty, a token `check` must refuse, a process another user must not read, and
//! intercepted connects during the drain (eBPF). Each test shows the broker fails
//! closed, leaks nothing (every output and the daemon log are grepped for the secret
//! values) and still serves a canary client afterwards.

use std::{
    collections::HashMap,
    io::{Read as _, Write as _},
    net::{SocketAddr, TcpStream},
    os::unix::{fs::MetadataExt as _, process::CommandExt as _},
    path::Path,
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use broker_tests::{
    Daemon, assert_no_secret, broker_bin, broker_check,
    fake::{FakePgError, HoldServer, Reply, ScriptedHttp},
    fetch, free_port, http_get,
    net::Upstream,
    output_text, privileged, run_broker, write_file,
};

const PW: &str = "hardening-file-pw-5b8e1f";

/// A `tcp` service on `listenOn: tcp://127.0.0.1:<port>` relaying to `upstream`, with a
/// password fetched from `pw_file` (unused by `tcp`, but fetched: it must never leak).
fn tcp_service(name: &str, port: u16, upstream: SocketAddr, pw_file: &Path) -> String {
    format!(
        "  {name}:\n    connector: tcp\n    listenOn: tcp://127.0.0.1:{port}\n    credentials:\n      host: \"{}\"\n      port: \"{}\"\n      password: {{from: file, get: {}}}\n",
        upstream.ip(),
        upstream.port(),
        pw_file.display()
    )
}

fn config(dir: &Path, health: u16, broker_extra: &str, services: &str) -> std::path::PathBuf {
    write_file(
        dir,
        "broker.yaml",
        &format!(
            "version: 2\nbroker:\n  health: 127.0.0.1:{health}\n{broker_extra}services:\n{services}"
        ),
    )
}

fn health_addr(port: u16) -> SocketAddr {
    format!("127.0.0.1:{port}").parse().expect("addr")
}

/// Poll `cond` every 20 ms for at most `timeout`.
fn wait_until(timeout: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if cond() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    cond()
}

/// Kills the child if the test fails before it exits.
struct KillOnDrop(Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        if matches!(self.0.try_wait(), Ok(None)) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
}

fn alive(child: &mut Child) -> bool {
    matches!(child.try_wait(), Ok(None))
}

fn fd_count(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map(Iterator::count)
        .unwrap_or(0)
}

fn sigterm(pid: u32) {
    // SAFETY: kill with a pid we own.
    unsafe { libc::kill(pid as i32, libc::SIGTERM) };
}

/// Wait (bounded) for the exit; returns the status and how long it took.
fn wait_exit(child: &mut Child, timeout: Duration) -> (std::process::ExitStatus, Duration) {
    let started = Instant::now();
    loop {
        if let Some(st) = child.try_wait().expect("try_wait") {
            return (st, started.elapsed());
        }
        if started.elapsed() > timeout {
            let _ = child.kill();
            panic!("broker did not exit within {timeout:?}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The daemon's stdout and stderr go to a pipe whose read end is then closed: every
/// log write fails with EPIPE. Connections over the listener's cap make the accept loop
/// itself log (the case that used to kill it: tracing-subscriber reported the failed
/// write with `eprintln!`, which panics on EPIPE); then 20 connections of another
/// listener are all served, `/ready` stays 200 and the process stays up.
#[test]
fn a_closed_log_pipe_does_not_stop_the_accept_loops() {
    if !privileged() {
        return;
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let pw = write_file(dir.path(), "pw", PW);
    let web = Upstream::start("127.0.0.1", "web");
    let hold = HoldServer::start("127.0.0.1");
    let (health, web_port, hold_port) = (free_port(), free_port(), free_port());
    let cfg = config(
        dir.path(),
        health,
        "  maxConnections: 4\n  maxConnectionsPerListener: 2\n",
        &(tcp_service("web", web_port, web.addr, &pw)
            + &tcp_service("hold", hold_port, hold.addr, &pw)),
    );
    let mut guard = KillOnDrop(
        Command::new(broker_bin())
            .args(["run", "-f", cfg.to_str().expect("utf-8"), "--no-ebpf"])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn broker"),
    );
    let child = &mut guard.0;
    assert!(
        wait_until(Duration::from_secs(30), || matches!(
            http_get(health_addr(health), "/ready"),
            Some((200, _))
        )),
        "not ready"
    );
    // Close the read ends.
    drop(child.stdout.take());
    drop(child.stderr.take());

    // Fill the `hold` listener's cap (2), then 10 more: refused in the accept loop,
    // each with a (rate-limited) log line that fails with EPIPE.
    let mut kept = Vec::new();
    for _ in 0..2 {
        kept.push(TcpStream::connect(("127.0.0.1", hold_port)).expect("connect hold"));
    }
    assert!(wait_until(Duration::from_secs(5), || hold.held() == 2));
    let mut refused = 0;
    for _ in 0..10 {
        let mut s = TcpStream::connect(("127.0.0.1", hold_port)).expect("connect");
        s.set_read_timeout(Some(Duration::from_secs(5)))
            .expect("timeout");
        let mut b = [0u8; 1];
        if matches!(s.read(&mut b), Ok(0) | Err(_)) {
            refused += 1;
        }
    }
    assert_eq!(refused, 10, "connections over the cap are closed at once");
    assert_eq!(hold.held(), 2);

    // Served, each with an access line that cannot be written. The `web` listener has
    // the same cap of 2, and a connection's slot is freed only once the daemon has seen
    // the client close after it read the answer: under load the next connect can come
    // first and be refused for the cap, which is not what this test is about. So each
    // connection may take a few tries (spaced out); every one must end up served.
    let mut served = 0;
    let mut all = String::new();
    for _ in 0..20 {
        for attempt in 0..10u64 {
            let body = fetch(web_port);
            all += &body;
            if body == "hello from web" {
                served += 1;
                break;
            }
            std::thread::sleep(Duration::from_millis(20 * (attempt + 1)));
        }
    }
    assert_eq!(
        served, 20,
        "every connection after the pipe closed is served"
    );
    // Again over the cap, then the canary once more.
    let mut s = TcpStream::connect(("127.0.0.1", hold_port)).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(5)))
        .expect("timeout");
    let _ = s.read(&mut [0u8; 1]);
    assert_eq!(fetch(web_port), "hello from web");
    assert!(alive(child), "the daemon is still running");
    assert_eq!(
        http_get(health_addr(health), "/ready").map(|r| r.0),
        Some(200)
    );
    assert_no_secret(&all, &[PW], "client output");
    drop(kept);
    sigterm(child.id());
    let (st, took) = wait_exit(child, Duration::from_secs(15));
    assert!(st.success(), "exit {st} after {took:?}");
}

/// How many times `needle` is in the daemon's log, once it is there `n` times (or after
/// 10 s).
fn log_until_count(d: &Daemon, needle: &str, n: usize) -> usize {
    d.log_until(Duration::from_secs(10), |l| l.matches(needle).count() >= n)
        .matches(needle)
        .count()
}

/// SIGHUP (a service manager's reload) reloads the file; the daemon keeps serving.
#[test]
fn sighup_reloads_and_the_daemon_keeps_serving() {
    if !privileged() {
        return;
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let pw = write_file(dir.path(), "pw", PW);
    let web = Upstream::start("127.0.0.1", "web");
    let (health, port) = (free_port(), free_port());
    let cfg = config(
        dir.path(),
        health,
        "",
        &tcp_service("web", port, web.addr, &pw),
    );
    let mut d = Daemon::start(
        &cfg,
        &["--no-ebpf"],
        health_addr(health),
        &dir.path().join("broker.log"),
    );
    for _ in 0..3 {
        // SAFETY: kill with a pid we own.
        unsafe { libc::kill(d.child.id() as i32, libc::SIGHUP) };
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(alive(&mut d.child), "SIGHUP killed the daemon");
    assert_eq!(fetch(port), "hello from web");
    assert_eq!(http_get(d.health, "/ready").map(|r| r.0), Some(200));
    let log = d.log_text();
    assert_eq!(log_until_count(&d, "configuration reloaded", 3), 3, "{log}");
    assert!(d.stop().success());
    assert_no_secret(&d.log_text(), &[PW], "broker log");
}

/// SIGTERM with an idle brokered connection open: the drain waits for it up to the
/// deadline (10 s), ends it, and the process exits within a second of that.
#[test]
fn sigterm_exits_within_the_drain_deadline_with_an_idle_connection() {
    if !privileged() {
        return;
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let pw = write_file(dir.path(), "pw", PW);
    let hold = HoldServer::start("127.0.0.1");
    let (health, port) = (free_port(), free_port());
    let cfg = config(
        dir.path(),
        health,
        "",
        &tcp_service("hold", port, hold.addr, &pw),
    );
    let mut d = Daemon::start(
        &cfg,
        &["--no-ebpf"],
        health_addr(health),
        &dir.path().join("broker.log"),
    );
    let _idle = TcpStream::connect(("127.0.0.1", port)).expect("connect");
    assert!(wait_until(Duration::from_secs(5), || hold.held() == 1));
    sigterm(d.child.id());
    // Not ready while draining.
    assert!(wait_until(Duration::from_secs(2), || matches!(
        http_get(d.health, "/ready"),
        Some((503, _))
    )));
    let (st, took) = wait_exit(&mut d.child, Duration::from_secs(20));
    eprintln!("exit after SIGTERM with an idle connection: {took:?}");
    assert!(st.success(), "{st}");
    assert!(
        took < Duration::from_secs(11),
        "took {took:?} (drain deadline 10 s + 1 s)"
    );
    let log = d.log_text();
    assert!(
        log.contains("ending connections still open after the drain deadline"),
        "{log}"
    );
    assert_no_secret(&log, &[PW], "broker log");
}

/// 50 connections to a `listenOn` listener capped at 20: 20 are brokered, 30 closed at
/// once with at most 10 log lines plus a summary; the daemon's descriptors stay bounded,
/// and the health endpoint and another listener still serve.
#[test]
fn connection_caps_bound_descriptors_and_keep_others_serving() {
    if !privileged() {
        return;
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let pw = write_file(dir.path(), "pw", PW);
    let web = Upstream::start("127.0.0.1", "web");
    let hold = HoldServer::start("127.0.0.1");
    let (health, web_port, hold_port) = (free_port(), free_port(), free_port());
    let cfg = config(
        dir.path(),
        health,
        "  maxConnections: 40\n  maxConnectionsPerListener: 20\n",
        &(tcp_service("web", web_port, web.addr, &pw)
            + &tcp_service("hold", hold_port, hold.addr, &pw)),
    );
    let d = Daemon::start(
        &cfg,
        &["--no-ebpf"],
        health_addr(health),
        &dir.path().join("broker.log"),
    );
    let pid = d.child.id();
    let fds_idle = fd_count(pid);
    let mut conns = Vec::new();
    for _ in 0..50 {
        let s = TcpStream::connect(("127.0.0.1", hold_port)).expect("connect");
        s.set_read_timeout(Some(Duration::from_secs(5)))
            .expect("timeout");
        conns.push(s);
    }
    assert!(
        wait_until(Duration::from_secs(10), || hold.held() == 20),
        "held {}",
        hold.held()
    );
    // The 30 over the cap see the end of the stream at once; the 20 others see nothing.
    let mut closed = 0;
    for s in &mut conns {
        s.set_read_timeout(Some(Duration::from_millis(300)))
            .expect("timeout");
        match s.read(&mut [0u8; 1]) {
            Ok(0) => closed += 1,
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => closed += 1,
            _ => {}
        }
    }
    let fds_busy = fd_count(pid);
    eprintln!(
        "fds idle {fds_idle}, with 20 held + 30 refused {fds_busy}; held upstream {}",
        hold.held()
    );
    assert_eq!(closed, 30);
    assert_eq!(hold.held(), 20);
    assert!(
        fds_busy <= fds_idle + 2 * 20 + 4,
        "{fds_busy} descriptors (idle {fds_idle})"
    );
    // Health and another listener are not starved.
    assert_eq!(http_get(d.health, "/ready").map(|r| r.0), Some(200));
    assert_eq!(http_get(d.health, "/live").map(|r| r.0), Some(200));
    for _ in 0..5 {
        assert_eq!(fetch(web_port), "hello from web");
    }
    // The summary of the suppressed lines comes within a second or two.
    assert!(wait_until(Duration::from_secs(3), || d
        .log_text()
        .contains("cap refusals in the last second")));
    let log = d.log_text();
    let lines = log.matches("too many connections").count();
    eprintln!("cap lines logged: {lines} (of 30 refusals)");
    assert!((1..=10).contains(&lines), "{lines} cap lines:\n{log}");
    // Once the held ones end, the listener serves again.
    drop(conns);
    hold.release();
    assert!(wait_until(Duration::from_secs(5), || fd_count(pid) <= fds_idle + 2));
    assert_no_secret(&log, &[PW], "broker log");
}

/// Whether `line` looks like a line of the text format: `<RFC 3339 time> <LEVEL> ...`.
fn is_log_line(line: &str) -> bool {
    let mut words = line.split_whitespace();
    let (Some(ts), Some(level)) = (words.next(), words.next()) else {
        return false;
    };
    ts.len() >= 20
        && ts.as_bytes()[..4].iter().all(u8::is_ascii_digit)
        && ts.as_bytes()[4] == b'-'
        && ts.contains('T')
        && ts.ends_with('Z')
        && ["TRACE", "DEBUG", "INFO", "WARN", "ERROR"].contains(&level)
}

/// An upstream PostgreSQL server answers the startup with an error whose message holds
/// a newline, a carriage return and an escape sequence followed by a forged access line.
/// Every line of the daemon's (text) log still parses as a log line, the forged text
/// sits escaped inside the real access line, and the daemon serves a canary afterwards.
#[test]
fn a_hostile_upstream_cannot_forge_log_lines() {
    if !privileged() {
        return;
    }
    let forged =
        "2026-12-01T00:00:00.000000Z  INFO access: connection service=db result=\"ok\" forged=1";
    let pg = FakePgError::start("53300", &format!("too many\n{forged}\r\u{1b}[2K"));
    let dir = tempfile::tempdir().expect("tempdir");
    let pw = write_file(dir.path(), "pw", PW);
    let web = Upstream::start("127.0.0.1", "web");
    let (health, pg_port, web_port) = (free_port(), free_port(), free_port());
    let services = format!(
        "  db:\n    connector: pg\n    listenOn: tcp://127.0.0.1:{pg_port}\n    credentials:\n      host: 127.0.0.1\n      port: \"{}\"\n      username: app\n      password: {{from: file, get: {}}}\n      sslmode: disable\n",
        pg.port,
        pw.display()
    ) + &tcp_service("web", web_port, web.addr, &pw);
    let cfg = config(dir.path(), health, "", &services);
    let mut d = Daemon::start(
        &cfg,
        &["--no-ebpf"],
        health_addr(health),
        &dir.path().join("broker.log"),
    );
    // A raw StartupMessage; the server's error comes back.
    let mut s = TcpStream::connect(("127.0.0.1", pg_port)).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(10)))
        .expect("timeout");
    let mut body = 196_608u32.to_be_bytes().to_vec();
    body.extend_from_slice(b"user\0anything\0database\0app\0\0");
    let mut msg = (body.len() as u32 + 4).to_be_bytes().to_vec();
    msg.extend_from_slice(&body);
    s.write_all(&msg).expect("startup");
    let mut reply = Vec::new();
    let _ = s.read_to_end(&mut reply);
    assert_eq!(reply.first(), Some(&b'E'), "{reply:?}");
    assert_eq!(pg.hits(), 1);
    assert!(wait_until(Duration::from_secs(5), || d
        .log_text()
        .contains("53300")));
    assert_eq!(fetch(web_port), "hello from web", "canary");
    assert!(d.stop().success());
    let log = d.log_text();
    for line in log.lines() {
        assert!(is_log_line(line), "not a log line: {line:?}\n{log}");
        assert!(!line.contains('\r') && !line.contains('\u{1b}'), "{line:?}");
    }
    let access = log
        .lines()
        .find(|l| l.contains("53300") && l.contains("access"))
        .unwrap_or_else(|| panic!("no access line for the session:\n{log}"));
    assert!(
        access.contains("too many\\n2026-12-01T00:00:00.000000Z  INFO access")
            && access.contains("forged=1\\r\\u{1b}[2K"),
        "{access}"
    );
    // Not a credential rejection: the server's own refusal, with its code.
    assert!(access.contains("result=\"upstream_refused\""), "{access}");
    assert_no_secret(&log, &[PW], "broker log");
}

/// The `http` provider: a 302 to another server is an error naming the credential and
/// the status (the other server is never asked, its body never becomes a password);
/// an empty body and an empty environment variable are errors, not empty passwords;
/// a URL id's user-info and query are redacted from the access line. A canary
/// credential from the same store still works.
#[test]
fn secret_store_redirects_and_empty_values_fail_closed() {
    if !privileged() {
        return;
    }
    let target_secret = "redirect-target-body-8d2f4a";
    let good = "store-good-pw-3c7b9e";
    let token = "store-bearer-token-1f6a2d";
    let (userinfo, query) = ("idpass-in-url-7e3b", "qs-token-in-url-4a9c");
    let other = ScriptedHttp::start(HashMap::from([(
        "/pw".to_owned(),
        Reply::ok(target_secret),
    )]));
    let store = ScriptedHttp::start(HashMap::from([
        (
            "/secrets/moved".to_owned(),
            Reply::redirect(&format!("http://{}/pw", other.addr)),
        ),
        ("/secrets/empty".to_owned(), Reply::ok("")),
        ("/secrets/good".to_owned(), Reply::ok(good)),
    ]));
    let web = Upstream::start("127.0.0.1", "web");
    let dir = tempfile::tempdir().expect("tempdir");
    let health = free_port();
    let ports: Vec<u16> = (0..4).map(|_| free_port()).collect();
    let service = |name: &str, port: u16, source: &str| {
        format!(
            "  {name}:\n    connector: tcp\n    listenOn: tcp://127.0.0.1:{port}\n    credentials:\n      host: 127.0.0.1\n      port: \"{}\"\n      password: {source}\n",
            web.addr.port()
        )
    };
    let services = service("moved", ports[0], "{from: uts, get: moved}")
        + &service("empty", ports[1], "{from: uts, get: empty}")
        + &service("empty-env", ports[2], "{from: env, get: BROKER_TEST_EMPTY}")
        + &service(
            "good",
            ports[3],
            &format!(
                "{{from: uts, get: \"http://user:{userinfo}@{}/secrets/good?token={query}\"}}",
                store.addr
            ),
        );
    let cfg = write_file(
        dir.path(),
        "broker.yaml",
        &format!(
            "version: 2\nproviders:\n  uts: {{type: http, baseUrl: \"http://{}/secrets/\", token: \"${{UTS_TOKEN}}\"}}\nbroker:\n  health: 127.0.0.1:{health}\nservices:\n{services}",
            store.addr
        ),
    );
    let mut d = Daemon::start_with_env(
        &cfg,
        &["--no-ebpf"],
        &[("UTS_TOKEN", token), ("BROKER_TEST_EMPTY", "")],
        health_addr(health),
        &dir.path().join("broker.log"),
    );
    let mut all = String::new();
    for p in &ports[..3] {
        let body = fetch(*p);
        assert_eq!(body, "", "no session without the credential");
        all += &body;
    }
    let body = fetch(ports[3]);
    assert_eq!(body, "hello from web", "canary");
    all += &body;
    assert!(d.stop().success());
    let log = d.log_text();
    assert_eq!(other.hits("/pw"), 0, "the redirect was not followed");
    assert_eq!(store.hits("/secrets/moved"), 1);
    let line = |service: &str| {
        log.lines()
            .find(|l| l.contains("access") && l.contains(&format!("service={service} ")))
            .unwrap_or_else(|| panic!("no access line for {service}:\n{log}"))
            .to_owned()
    };
    let moved = line("moved");
    assert!(
        moved.contains("credentials_error")
            && moved.contains("credential `password`")
            && moved.contains("302")
            && moved.contains("redirects are not followed"),
        "{moved}"
    );
    let empty = line("empty");
    assert!(
        empty.contains("credentials_error") && empty.contains("`empty` is empty"),
        "{empty}"
    );
    let empty_env = line("empty-env");
    assert!(
        empty_env.contains("credentials_error")
            && empty_env.contains("`BROKER_TEST_EMPTY` is empty"),
        "{empty_env}"
    );
    let good_line = line("good");
    assert!(
        good_line.contains("result=\"ok\"")
            && good_line.contains(&format!(
                "password<-uts:http://***@{}/secrets/good?***",
                store.addr
            )),
        "{good_line}"
    );
    assert!(!alive(&mut d.child));
    assert_no_secret(
        &format!("{all}{log}"),
        &[target_secret, good, token, userinfo, query],
        "client output and broker log",
    );
}

/// A provider token `broker run` cannot send (a newline in it) is refused by `check`
/// too, with its key path and without echoing it; `run` refuses the same file.
#[test]
fn check_rejects_a_token_that_run_rejects() {
    let dir = tempfile::tempdir().expect("tempdir");
    let token = "tok-line-one-6b1e\ntok-line-two-2d8c";
    let cfg = write_file(
        dir.path(),
        "broker.yaml",
        "version: 2\nproviders:\n  uts: {type: http, baseUrl: \"http://127.0.0.1:1/\", token: \"${TOK}\"}\nbroker:\n  health: off\nservices:\n  db: {connector: tcp, listenOn: \"tcp://127.0.0.1:1\", credentials: {host: 127.0.0.1, password: {from: uts, get: pw}}}\n",
    );
    let out = broker_check(&cfg, &[("TOK", token)]);
    let text = output_text(&out);
    assert_eq!(out.status.code(), Some(78), "{text}");
    assert!(
        text.contains("providers.uts.token") && text.contains("cannot be sent in an HTTP header"),
        "{text}"
    );
    assert!(!text.contains("services.db.credentials.host"), "{text}");
    let run = Command::new(broker_bin())
        .args(["run", "--no-ebpf", "-f", cfg.to_str().expect("utf-8")])
        .env("TOK", token)
        .output()
        .expect("broker run");
    let run_text = output_text(&run);
    assert_eq!(run.status.code(), Some(78), "{run_text}");
    assert_no_secret(
        &format!("{text}{run_text}"),
        &["tok-line-one-6b1e", "tok-line-two-2d8c"],
        "check and run output",
    );
}

/// Run as an ordinary user (`--no-ebpf` needs no privilege), the daemon is not
/// dumpable: its /proc files belong to root, not to its own uid, so another process of
/// that uid cannot read its memory or environment; core dumps are off and the file
/// descriptor soft limit is raised to the hard one.
#[test]
fn the_daemon_is_not_dumpable() {
    if !privileged() {
        return;
    }
    const NOBODY: u32 = 65_534;
    let dir = tempfile::tempdir().expect("tempdir");
    std::fs::set_permissions(
        dir.path(),
        std::os::unix::fs::PermissionsExt::from_mode(0o755),
    )
    .expect("chmod");
    let web = Upstream::start("127.0.0.1", "web");
    let (health, port) = (free_port(), free_port());
    let cfg = config(
        dir.path(),
        health,
        "",
        &format!(
            "  web:\n    connector: tcp\n    listenOn: tcp://127.0.0.1:{port}\n    credentials:\n      host: 127.0.0.1\n      port: \"{}\"\n",
            web.addr.port()
        ),
    );
    let log = std::fs::File::create(dir.path().join("broker.log")).expect("log");
    let mut guard = KillOnDrop(
        Command::new(broker_bin())
            .args(["run", "--no-ebpf", "-f", cfg.to_str().expect("utf-8")])
            .uid(NOBODY)
            .gid(NOBODY)
            .stdout(log.try_clone().expect("dup"))
            .stderr(log)
            .spawn()
            .expect("spawn broker as nobody"),
    );
    let child = &mut guard.0;
    let ready = wait_until(Duration::from_secs(30), || {
        matches!(http_get(health_addr(health), "/ready"), Some((200, _)))
    });
    let log_text = std::fs::read_to_string(dir.path().join("broker.log")).unwrap_or_default();
    assert!(ready, "not ready:\n{log_text}");
    let pid = child.id();
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("status");
    let uid_line = status
        .lines()
        .find(|l| l.starts_with("Uid:"))
        .expect("Uid line");
    assert!(
        uid_line.split_whitespace().nth(1) == Some("65534"),
        "{uid_line}"
    );
    for f in ["environ", "mem", "maps"] {
        let owner = std::fs::metadata(format!("/proc/{pid}/{f}"))
            .expect("stat")
            .uid();
        assert_eq!(owner, 0, "/proc/{pid}/{f} belongs to uid {owner}, not root");
    }
    let limits = std::fs::read_to_string(format!("/proc/{pid}/limits")).expect("limits");
    let row = |name: &str| -> Vec<String> {
        limits
            .lines()
            .find(|l| l.starts_with(name))
            .unwrap_or_else(|| panic!("{name} in {limits}"))[name.len()..]
            .split_whitespace()
            .take(2)
            .map(str::to_owned)
            .collect()
    };
    assert_eq!(row("Max core file size"), ["0", "0"], "{limits}");
    let nofile = row("Max open files");
    assert_eq!(nofile[0], nofile[1], "soft NOFILE raised to hard: {limits}");
    assert!(log_text.contains("RLIMIT_NOFILE"), "{log_text}");
    assert_eq!(fetch(port), "hello from web", "canary");
    sigterm(pid);
    let (st, _) = wait_exit(child, Duration::from_secs(15));
    assert!(st.success(), "{st}");
}

/// The python client run inside the test cgroup: `hold PORT SECS` connects and holds
/// the connection; `get PORT` sends a request and prints the reply's body.
const CLIENT: &str = r#"
import socket, sys, time
mode, port = sys.argv[1], int(sys.argv[2])
s = socket.create_connection(("127.0.0.2", port), timeout=10)
if mode == "hold":
    print("HELD", flush=True)
    time.sleep(float(sys.argv[3]))
    sys.exit(0)
s.sendall(b"GET / HTTP/1.0\r\n\r\n")
data = b""
while True:
    d = s.recv(4096)
    if not d:
        break
    data += d
print("BODY " + data.split(b"\r\n\r\n", 1)[-1].decode(), flush=True)
"#;

/// eBPF: after SIGTERM, while a connection drains, a new intercepted connect is still
/// brokered (before, the programs were switched off for the whole drain and it went
/// straight to the real server). Here the intercepted address answers "direct" and the
/// service's upstream "brokered".
#[test]
fn intercepted_connects_are_brokered_while_draining() {
    if !privileged() {
        return;
    }
    let direct = Upstream::start("127.0.0.2", "direct");
    let brokered = Upstream::start("127.0.0.3", "brokered");
    let hold = HoldServer::start("127.0.0.3");
    let hold_target = free_port();
    let services = format!(
        "  web:\n    connector: tcp\n    intercept: [\"127.0.0.2:{}\"]\n    credentials:\n      host: 127.0.0.3\n      port: \"{}\"\n  hold:\n    connector: tcp\n    intercept: [\"127.0.0.2:{hold_target}\"]\n    credentials:\n      host: 127.0.0.3\n      port: \"{}\"\n",
        direct.addr.port(),
        brokered.addr.port(),
        hold.addr.port()
    );
    let mut b = run_broker("drain", "", &services);
    let script = write_file(b.dir.path(), "client.py", CLIENT);
    let client = |args: &[&str]| {
        let mut c = Command::new("python3");
        c.arg(&script).args(args);
        b.cg.enter(&mut c);
        c
    };
    let get = |c: &mut Command| output_text(&c.output().expect("python3"));
    // Brokered before the shutdown.
    let before = get(&mut client(&["get", &direct.addr.port().to_string()]));
    assert!(before.contains("BODY hello from brokered"), "{before}");

    let mut holder = client(&["hold", &hold_target.to_string(), "30"])
        .stdout(Stdio::piped())
        .spawn()
        .expect("holder");
    assert!(
        wait_until(Duration::from_secs(10), || hold.held() == 1),
        "the holder's connection is brokered"
    );
    sigterm(b.daemon.child.id());
    std::thread::sleep(Duration::from_millis(500));
    assert!(alive(&mut b.daemon.child), "draining");
    let during = get(&mut client(&["get", &direct.addr.port().to_string()]));
    assert!(
        during.contains("BODY hello from brokered"),
        "during the drain: {during}\n{}",
        b.daemon.log_text()
    );
    assert!(alive(&mut b.daemon.child), "still draining");
    let _ = holder.kill();
    let _ = holder.wait();
    hold.release();
    let (st, took) = wait_exit(&mut b.daemon.child, Duration::from_secs(15));
    eprintln!("exit {took:?} after the last connection ended");
    assert!(st.success(), "{st}");
    assert!(
        took < Duration::from_secs(3),
        "the drain ends with the last connection"
    );
    assert_eq!(direct.hits(), 0, "nothing went direct");
    let attached = b.cg.attached();
    assert!(
        !attached.contains("broker_connect4"),
        "detached after exit: {attached}"
    );
}
