//! Network fixtures: a tiny upstream server, a child cgroup guard, hostname mapping in a
//! private mount namespace. Everything stays on loopback.

use std::{
    io::{Read as _, Write as _},
    net::{SocketAddr, TcpListener},
    path::{Path, PathBuf},
    process::Command,
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicUsize, Ordering},
    },
    thread,
    time::Duration,
};

/// A loopback server answering every connection with `HTTP/1.0 200` and a fixed body
/// naming it, then closing. Counts connections.
pub struct Upstream {
    pub addr: SocketAddr,
    pub body: String,
    hits: Arc<AtomicUsize>,
    stop: Arc<AtomicBool>,
}

impl Upstream {
    /// Listen on `ip` (a loopback address) at a free port.
    #[must_use]
    pub fn start(ip: &str, name: &str) -> Self {
        let listener = TcpListener::bind((ip, 0)).expect("bind upstream");
        let addr = listener.local_addr().expect("local_addr");
        let body = format!("hello from {name}");
        let hits = Arc::new(AtomicUsize::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let (b, h, s) = (body.clone(), Arc::clone(&hits), Arc::clone(&stop));
        thread::spawn(move || {
            for conn in listener.incoming() {
                if s.load(Ordering::SeqCst) {
                    return;
                }
                let Ok(mut c) = conn else { continue };
                h.fetch_add(1, Ordering::SeqCst);
                let b = b.clone();
                thread::spawn(move || {
                    let _ = c.set_read_timeout(Some(Duration::from_secs(5)));
                    let mut buf = [0u8; 4096];
                    let mut req = Vec::new();
                    while !req.windows(4).any(|w| w == b"\r\n\r\n") {
                        match c.read(&mut buf) {
                            Ok(0) | Err(_) => break,
                            Ok(n) => req.extend_from_slice(&buf[..n]),
                        }
                    }
                    let _ = write!(
                        c,
                        "HTTP/1.0 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{b}",
                        b.len()
                    );
                });
            }
        });
        Self {
            addr,
            body,
            hits,
            stop,
        }
    }

    #[must_use]
    pub fn hits(&self) -> usize {
        self.hits.load(Ordering::SeqCst)
    }
}

impl Drop for Upstream {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        let _ = std::net::TcpStream::connect(self.addr);
    }
}

/// The cgroup v2 mount point, from /proc/self/mountinfo.
#[must_use]
pub fn cgroup2_root() -> PathBuf {
    let text = std::fs::read_to_string("/proc/self/mountinfo").expect("mountinfo");
    text.lines()
        .find_map(|l| {
            let (pre, post) = l.split_once(" - ")?;
            (post.split_whitespace().next()? == "cgroup2")
                .then(|| PathBuf::from(pre.split_whitespace().nth(4).unwrap_or("")))
        })
        .expect("a cgroup2 mount")
}

/// A child cgroup created by a test; removed on drop (processes left in it are killed).
pub struct TestCgroup {
    pub path: PathBuf,
}

impl TestCgroup {
    #[must_use]
    pub fn new(tag: &str) -> Self {
        let path = cgroup2_root().join(format!("broker-test-{tag}-{}", std::process::id()));
        std::fs::create_dir(&path).expect("create test cgroup");
        Self { path }
    }

    /// Make `cmd` move itself into this cgroup before it execs.
    pub fn enter(&self, cmd: &mut Command) {
        crate::pod::enter_cgroup(cmd, &self.path);
    }

    /// Programs attached to this cgroup, as `bpftool cgroup show` lists them.
    #[must_use]
    pub fn attached(&self) -> String {
        bpftool_cgroup_show(&self.path)
    }
}

impl Drop for TestCgroup {
    fn drop(&mut self) {
        for _ in 0..100 {
            if std::fs::remove_dir(&self.path).is_ok() || !self.path.exists() {
                return;
            }
            let _ = std::fs::write(self.path.join("cgroup.kill"), "1");
            thread::sleep(Duration::from_millis(20));
        }
        eprintln!("warning: could not remove {}", self.path.display());
    }
}

/// `bpftool cgroup show PATH` output (empty when nothing is attached).
#[must_use]
pub fn bpftool_cgroup_show(path: &Path) -> String {
    let o = Command::new("bpftool")
        .args(["cgroup", "show"])
        .arg(path)
        .output()
        .expect("bpftool (cargo xtask setup installs it)");
    String::from_utf8_lossy(&o.stdout).into_owned()
}

/// A command that runs `argv` in a private mount namespace whose /etc/hosts also maps
/// the given names. Both the broker (resolving `intercept:` names) and the client see
/// it; the machine's /etc/hosts is untouched.
#[must_use]
pub fn with_hosts(dir: &Path, names: &[(&str, &str)], argv: &[&str]) -> Command {
    let mut hosts = std::fs::read_to_string("/etc/hosts").unwrap_or_default();
    for (name, ip) in names {
        hosts.push_str(&format!("\n{ip} {name}\n"));
    }
    let file = dir.join("hosts");
    std::fs::write(&file, hosts).expect("write hosts");
    let mut c = Command::new("unshare");
    c.args(["--mount", "--propagation", "private", "sh", "-c"])
        .arg(r#"mount --bind "$0" /etc/hosts && exec "$@""#)
        .arg(&file)
        .args(argv);
    c
}
