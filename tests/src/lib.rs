//! Test harness: locate the `broker` binary, run it (`run`, `exec`, `check`), pick free
//! ports, enforce privileges. Real servers are started by the modules below.
//!
//! Tests panic (never return `Result`) so failures keep their backtrace.

pub mod clients;
pub mod fake;
pub mod fake_aws;
pub mod fake_conjur;
pub mod fake_kube;
pub mod fake_mysql;
pub mod fake_vault;
pub mod hostile_pg;
pub mod http_server;
pub mod mariadb;
pub mod moto;
pub mod net;
pub mod pg;
pub mod pod;
pub mod secret_server;
pub mod service_manager;

use std::{
    io::{Read as _, Write as _},
    net::{SocketAddr, TcpListener, TcpStream},
    path::{Path, PathBuf},
    process::{Child, Command, Output},
    time::{Duration, Instant},
};

/// The `broker` binary: `$BROKER_BIN`, else `target/debug/broker` of this workspace.
#[must_use]
pub fn broker_bin() -> PathBuf {
    if let Some(p) = std::env::var_os("BROKER_BIN") {
        return PathBuf::from(p);
    }
    let root = workspace_root();
    let p = root.join("target/debug/broker");
    assert!(
        p.exists(),
        "{} not built: run `cargo build -p broker-userspace` (cargo xtask test does)",
        p.display()
    );
    p
}

#[must_use]
pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("workspace root")
        .to_path_buf()
}

/// Whether privileged tests can run. Without root they fail when
/// `BROKER_REQUIRE_PRIVILEGED=1` (CI and `cargo xtask test` set it) and are skipped,
/// loudly, otherwise.
#[must_use]
pub fn privileged() -> bool {
    // SAFETY: geteuid has no preconditions.
    let root = unsafe { libc::geteuid() } == 0;
    if root {
        return true;
    }
    assert!(
        std::env::var("BROKER_REQUIRE_PRIVILEGED").as_deref() != Ok("1"),
        "this test needs root (CAP_BPF, CAP_NET_ADMIN, CAP_SYS_ADMIN) and BROKER_REQUIRE_PRIVILEGED=1"
    );
    eprintln!("SKIPPED: not root (set BROKER_REQUIRE_PRIVILEGED=1 to make this a failure)");
    false
}

/// A port free on 127.0.0.1 and ::1, never handed out twice by this process.
///
/// Ports come from 20000..32000, below the kernel's ephemeral range (32768+), so they
/// cannot be taken in the meantime by an outgoing connection's source port or by a
/// listener bound to port 0 (which is what `TcpListener::bind(":0")` would race with).
#[must_use]
pub fn free_port() -> u16 {
    use std::sync::atomic::{AtomicU32, Ordering};
    const LOW: u32 = 20_000;
    const SPAN: u32 = 12_000;
    static NEXT: AtomicU32 = AtomicU32::new(u32::MAX);
    let _ = NEXT.compare_exchange(
        u32::MAX,
        (std::process::id().wrapping_mul(7919)) % SPAN,
        Ordering::SeqCst,
        Ordering::SeqCst,
    );
    for _ in 0..SPAN {
        let n = NEXT.fetch_add(1, Ordering::SeqCst);
        let port = u16::try_from(LOW + n % SPAN).expect("port fits");
        if TcpListener::bind(("127.0.0.1", port)).is_ok()
            && TcpListener::bind(("::1", port)).is_ok()
        {
            return port;
        }
    }
    panic!("no free port in 20000..32000");
}

/// Write `text` to `dir/name` and return the path.
pub fn write_file(dir: &Path, name: &str, text: &str) -> PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, text).unwrap_or_else(|e| panic!("writing {}: {e}", p.display()));
    p
}

/// Wait until something accepts TCP connections on `addr`.
pub fn wait_port(addr: SocketAddr, timeout: Duration) {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok() {
            return;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    panic!("nothing listening on {addr} after {timeout:?}");
}

/// `GET /` (HTTP/1.0) to `127.0.0.1:port`, for tests whose upstream is a
/// [`net::Upstream`]: the reply's body, or "" when the connection was refused or closed
/// without one (the broker refusing it). Bounded: 5 s to connect, 20 s to read.
#[must_use]
pub fn fetch(port: u16) -> String {
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    let Ok(mut s) = TcpStream::connect_timeout(&addr, Duration::from_secs(5)) else {
        return String::new();
    };
    if s.set_read_timeout(Some(Duration::from_secs(20))).is_err() {
        return String::new();
    }
    let _ = s.write_all(b"GET / HTTP/1.0\r\n\r\n");
    let mut out = Vec::new();
    let _ = s.read_to_end(&mut out);
    let text = String::from_utf8_lossy(&out).into_owned();
    text.split("\r\n\r\n").nth(1).unwrap_or("").to_owned()
}

/// Minimal HTTP GET on loopback; returns (status, body).
#[must_use]
pub fn http_get(addr: SocketAddr, path: &str) -> Option<(u16, String)> {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(2)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )
    .ok()?;
    let mut out = String::new();
    s.read_to_string(&mut out).ok()?;
    let status = out.split_whitespace().nth(1)?.parse().ok()?;
    let body = out.split("\r\n\r\n").nth(1).unwrap_or("").to_owned();
    Some((status, body))
}

/// A running `broker run` daemon, stopped with SIGTERM on drop.
pub struct Daemon {
    pub child: Child,
    pub health: SocketAddr,
    pub log: PathBuf,
}

impl Daemon {
    /// Start `broker run -f <config> <args>`; stderr/stdout go to `log`. Waits for
    /// `/ready` on `health` (the config must set `broker.health` to it).
    #[must_use]
    pub fn start(config: &Path, args: &[&str], health: SocketAddr, log: &Path) -> Self {
        Self::start_with_env(config, args, &[], health, log)
    }

    /// [`Daemon::start`] with extra environment variables for the daemon.
    #[must_use]
    pub fn start_with_env(
        config: &Path,
        args: &[&str],
        env: &[(&str, &str)],
        health: SocketAddr,
        log: &Path,
    ) -> Self {
        let out = std::fs::File::create(log).expect("create daemon log");
        let child = Command::new(broker_bin())
            .arg("run")
            .arg("-f")
            .arg(config)
            .args(args)
            .envs(env.iter().copied())
            .stdout(out.try_clone().expect("dup log"))
            .stderr(out)
            .spawn()
            .expect("spawn broker run");
        let mut d = Self {
            child,
            health,
            log: log.to_path_buf(),
        };
        d.wait_ready(Duration::from_secs(30));
        d
    }

    fn wait_ready(&mut self, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if let Some(st) = self.child.try_wait().expect("try_wait") {
                panic!("broker exited early ({st}):\n{}", self.log_text());
            }
            if matches!(http_get(self.health, "/ready"), Some((200, _))) {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        panic!("broker not ready after {timeout:?}:\n{}", self.log_text());
    }

    #[must_use]
    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// The log once `done` holds for it, or as it is after `timeout` (the daemon writes
    /// its lines from a thread of its own, a moment after the event).
    #[must_use]
    pub fn log_until(&self, timeout: Duration, done: impl Fn(&str) -> bool) -> String {
        let deadline = Instant::now() + timeout;
        loop {
            let text = self.log_text();
            if done(&text) || Instant::now() >= deadline {
                return text;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Send SIGTERM and wait (bounded) for the exit status.
    pub fn stop(&mut self) -> std::process::ExitStatus {
        // SAFETY: kill with a pid we own.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            if let Some(st) = self.child.try_wait().expect("try_wait") {
                return st;
            }
            if Instant::now() > deadline {
                let _ = self.child.kill();
                panic!("broker did not exit on SIGTERM:\n{}", self.log_text());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if matches!(self.child.try_wait(), Ok(None)) {
            // SAFETY: kill with a pid we own.
            unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
            let deadline = Instant::now() + Duration::from_secs(10);
            while Instant::now() < deadline {
                if !matches!(self.child.try_wait(), Ok(None)) {
                    return;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// A `broker run --cgroup` daemon for a child cgroup the test created. Fields drop in
/// order: the daemon stops (detaching), then the cgroup goes, then the files.
pub struct RunBroker {
    pub daemon: Daemon,
    pub cg: net::TestCgroup,
    pub dir: tempfile::TempDir,
}

/// Start `broker run --cgroup <new child cgroup> --log-format json` with `services:`
/// as given (YAML, indented) and `broker_extra` lines added to the `broker:` block
/// (which sets the health address); waits until ready.
#[must_use]
pub fn run_broker(tag: &str, broker_extra: &str, services: &str) -> RunBroker {
    let dir = tempfile::tempdir().expect("tempdir");
    let cg = net::TestCgroup::new(tag);
    let health = free_port();
    let cfg = write_file(
        dir.path(),
        "broker.yaml",
        &format!(
            "version: 2\nbroker:\n  health: 127.0.0.1:{health}\n{broker_extra}services:\n{services}"
        ),
    );
    let daemon = Daemon::start(
        &cfg,
        &[
            "--cgroup",
            cg.path.to_str().expect("UTF-8 cgroup path"),
            "--log-format",
            "json",
        ],
        format!("127.0.0.1:{health}")
            .parse()
            .expect("health address"),
        &dir.path().join("broker.log"),
    );
    RunBroker { daemon, cg, dir }
}

/// `broker [flags...] exec -f <config> -- <cmd...>`, in a private mount namespace whose
/// /etc/hosts also maps `names` (see [`net::with_hosts`]); the caller sets env and stdio.
#[must_use]
pub fn broker_exec(
    dir: &Path,
    names: &[(&str, &str)],
    flags: &[&str],
    config: &Path,
    cmd: &[&str],
) -> Command {
    let bin = broker_bin();
    let mut argv = vec![bin.to_str().expect("UTF-8 binary path")];
    argv.extend_from_slice(flags);
    argv.extend_from_slice(&[
        "exec",
        "-f",
        config.to_str().expect("UTF-8 config path"),
        "--",
    ]);
    argv.extend_from_slice(cmd);
    net::with_hosts(dir, names, &argv)
}

/// Run `broker check -f <config>`.
#[must_use]
pub fn broker_check(config: &Path, env: &[(&str, &str)]) -> Output {
    let mut c = Command::new(broker_bin());
    c.arg("check").arg("-f").arg(config);
    for (k, v) in env {
        c.env(k, v);
    }
    c.output().expect("spawn broker check")
}

/// Stdout and stderr as one string, for assertions and secret greps.
#[must_use]
pub fn output_text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

/// Panic if `haystack` contains any of the secret values.
pub fn assert_no_secret(haystack: &str, secrets: &[&str], what: &str) {
    for s in secrets {
        assert!(
            !haystack.contains(s),
            "{what} contains a secret value (length {})",
            s.len()
        );
    }
}
