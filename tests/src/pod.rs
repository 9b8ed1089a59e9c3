//! Containers and pods, simulated with the kernel objects a container runtime uses, for
//! the packaging tests (`tests/tests/sidecar.rs`, `tests/tests/bypass.rs`):
//!
//! * [`Netns`]: a network namespace (`ip netns add`) with loopback up and a veth pair to
//!   this namespace: the pod's IP on its side, the "node's" on ours;
//! * [`PodCgroup`]: a cgroup with one child per container;
//! * [`container`]: a command started as a runtime starts a container's process: in its
//!   container's cgroup, in the pod's network namespace (if any), with a pid namespace of
//!   its own (it is pid 1 there, with its own `/proc`), and, when asked, a cgroup
//!   namespace of its own whose root is its container's cgroup, the container's own
//!   `/sys/fs/cgroup` mounted over the host's and the host's hierarchy visible at another
//!   path (the hostPath mount of a Kubernetes manifest);
//! * [`NsDaemon`]: `broker run` started that way, stopped with SIGTERM to the broker itself
//!   (pid 1 of its namespace) and waited for.
//!
//! Everything is removed when dropped (processes killed, cgroups removed, the namespace
//! deleted, which takes the veth pair with it).

use std::{
    io::Read as _,
    net::{Ipv4Addr, SocketAddr},
    os::unix::process::CommandExt as _,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::atomic::{AtomicU32, Ordering},
    time::{Duration, Instant},
};

use crate::{http_get, net::cgroup2_root};

fn run_ok(argv: &[&str]) {
    let out = Command::new(argv[0])
        .args(&argv[1..])
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("{argv:?}: {e}"));
    assert!(
        out.status.success(),
        "{argv:?} failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A network namespace with `lo` up and a veth pair: `node_ip` on this side,
/// `pod_ip` on the pod's (a /30 of 10.213.0.0/16 per namespace).
pub struct Netns {
    pub name: String,
    pub host_if: String,
    pub node_ip: Ipv4Addr,
    pub pod_ip: Ipv4Addr,
}

impl Netns {
    #[must_use]
    pub fn new() -> Self {
        static NEXT: AtomicU32 = AtomicU32::new(0);
        let n = NEXT.fetch_add(1, Ordering::SeqCst);
        let pid = std::process::id();
        // One /30 per namespace: the third octet from the pid, the fourth from n.
        let block = u8::try_from((pid % 250) + 1).expect("fits");
        let base = u8::try_from((n % 60) * 4).expect("fits");
        let ns = Self {
            name: format!("broker-pod-{pid}-{n}"),
            host_if: format!("bkn{}x{n}", pid % 100_000),
            node_ip: Ipv4Addr::new(10, 213, block, base + 1),
            pod_ip: Ipv4Addr::new(10, 213, block, base + 2),
        };
        let pod_if = format!("bkp{}x{n}", pid % 100_000);
        run_ok(&["ip", "netns", "add", &ns.name]);
        run_ok(&["ip", "-n", &ns.name, "link", "set", "lo", "up"]);
        run_ok(&[
            "ip",
            "link",
            "add",
            &ns.host_if,
            "type",
            "veth",
            "peer",
            "name",
            &pod_if,
        ]);
        run_ok(&["ip", "link", "set", &pod_if, "netns", &ns.name]);
        run_ok(&[
            "ip",
            "addr",
            "add",
            &format!("{}/30", ns.node_ip),
            "dev",
            &ns.host_if,
        ]);
        run_ok(&["ip", "link", "set", &ns.host_if, "up"]);
        run_ok(&[
            "ip",
            "-n",
            &ns.name,
            "addr",
            "add",
            &format!("{}/30", ns.pod_ip),
            "dev",
            &pod_if,
        ]);
        run_ok(&["ip", "-n", &ns.name, "link", "set", &pod_if, "up"]);
        ns
    }

    /// The network of the veth pair (`10.213.B.N/30`), for `pg_hba.conf`.
    #[must_use]
    pub fn cidr(&self) -> String {
        let o = self.node_ip.octets();
        format!("{}.{}.{}.{}/30", o[0], o[1], o[2], o[3] - 1)
    }

    /// `/run/netns/NAME`, for `nsenter --net=`.
    #[must_use]
    pub fn path(&self) -> PathBuf {
        Path::new("/run/netns").join(&self.name)
    }
}

impl Default for Netns {
    fn default() -> Self {
        Self::new()
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .status();
        // Normally gone with its peer.
        let _ = Command::new("ip")
            .args(["link", "del", &self.host_if])
            .stderr(Stdio::null())
            .status();
    }
}

/// A pod's cgroup under the cgroup v2 root, with one child cgroup per container.
pub struct PodCgroup {
    pub path: PathBuf,
    containers: Vec<String>,
}

impl PodCgroup {
    #[must_use]
    pub fn new(tag: &str, containers: &[&str]) -> Self {
        let path = cgroup2_root().join(format!("broker-pod-{tag}-{}", std::process::id()));
        std::fs::create_dir(&path).expect("create pod cgroup");
        for c in containers {
            std::fs::create_dir(path.join(c)).expect("create container cgroup");
        }
        Self {
            path,
            containers: containers.iter().map(|c| (*c).to_owned()).collect(),
        }
    }

    /// The cgroup of container `name`.
    #[must_use]
    pub fn container(&self, name: &str) -> PathBuf {
        assert!(
            self.containers.iter().any(|c| c == name),
            "no container {name}"
        );
        self.path.join(name)
    }

    /// The cgroup id of container `name` (what the kernel records for its processes).
    #[must_use]
    pub fn container_id(&self, name: &str) -> u64 {
        use std::os::unix::fs::MetadataExt as _;
        std::fs::metadata(self.container(name))
            .expect("container cgroup")
            .ino()
    }
}

fn remove_cgroup(path: &Path) {
    for _ in 0..250 {
        if std::fs::remove_dir(path).is_ok() || !path.exists() {
            return;
        }
        let _ = std::fs::write(path.join("cgroup.kill"), "1");
        std::thread::sleep(Duration::from_millis(20));
    }
    eprintln!("warning: could not remove {}", path.display());
}

impl Drop for PodCgroup {
    fn drop(&mut self) {
        for c in &self.containers {
            remove_cgroup(&self.path.join(c));
        }
        remove_cgroup(&self.path);
    }
}

/// How a [`container`] sees the cgroup hierarchy.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CgroupView {
    /// The host's mounts, as they are (no cgroup namespace).
    Host,
    /// Its own cgroup namespace rooted at its container's cgroup, its own cgroup2 mount
    /// over the host's mount point, and the host's hierarchy at the given path (which
    /// must exist).
    Private,
}

/// `argv` as a container's process: moved into `cgroup` before it execs, in `netns`
/// (when given), pid 1 of a new pid namespace with its own `/proc`, in a new mount
/// namespace, and with [`CgroupView::Private`] in a new cgroup namespace with the host's
/// hierarchy mounted at `host_view`. The caller sets stdio and the environment.
///
/// # Panics
/// When the cgroup cannot be opened.
#[must_use]
pub fn container(
    argv: &[&str],
    cgroup: &Path,
    netns: Option<&Netns>,
    view: CgroupView,
    host_view: Option<&Path>,
) -> Command {
    let mut c = Command::new("nsenter");
    // nsenter with no namespace just runs the command.
    if let Some(ns) = netns {
        c.arg(format!("--net={}", ns.path().display()));
    }
    c.args([
        "--",
        "unshare",
        "--pid",
        "--fork",
        "--mount-proc",
        "--kill-child=SIGTERM",
    ]);
    if view == CgroupView::Private {
        let hv = host_view.expect("CgroupView::Private needs a host view path");
        let cg = cgroup2_root();
        c.args(["--cgroup", "sh", "-c"])
            .arg(
                r#"set -e
mount --bind "$0" "$1"
umount -l "$0"
mount -t cgroup2 cgroup2 "$0"
shift
exec "$@""#,
            )
            .arg(&cg)
            .arg(hv);
    }
    c.args(argv);
    enter_cgroup(&mut c, cgroup);
    c
}

/// Make `cmd` move itself into `cgroup` before it execs.
pub fn enter_cgroup(cmd: &mut Command, cgroup: &Path) {
    let procs = std::fs::OpenOptions::new()
        .write(true)
        .open(cgroup.join("cgroup.procs"))
        .expect("open cgroup.procs");
    let fd = std::os::fd::OwnedFd::from(procs);
    // SAFETY: only write(2) on an fd opened before fork.
    unsafe {
        cmd.pre_exec(move || {
            let n = libc::write(
                std::os::fd::AsRawFd::as_raw_fd(&fd),
                b"0".as_ptr().cast(),
                1,
            );
            if n == 1 {
                Ok(())
            } else {
                Err(std::io::Error::last_os_error())
            }
        });
    }
}

/// The children of process `pid`.
fn children(pid: u32) -> Vec<u32> {
    std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/children"))
        .unwrap_or_default()
        .split_whitespace()
        .filter_map(|p| p.parse().ok())
        .collect()
}

/// `broker run` started as a [`container`]: `child` is the `nsenter`/`unshare` chain,
/// whose innermost process is the broker (pid 1 of its pid namespace).
pub struct NsDaemon {
    pub child: Child,
    pub health: SocketAddr,
    pub log: PathBuf,
}

impl NsDaemon {
    /// Start `cmd` (a [`container`] running `broker run`) with its output in `log`, and
    /// wait for `/ready` on `health`.
    #[must_use]
    pub fn start(mut cmd: Command, health: SocketAddr, log: &Path) -> Self {
        let out = std::fs::File::create(log).expect("create daemon log");
        let child = cmd
            .stdin(Stdio::null())
            .stdout(out.try_clone().expect("dup log"))
            .stderr(out)
            .spawn()
            .expect("spawn the broker's container");
        let mut d = Self {
            child,
            health,
            log: log.to_path_buf(),
        };
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(st) = d.child.try_wait().expect("try_wait") {
                panic!("broker exited early ({st}):\n{}", d.log_text());
            }
            if matches!(http_get(d.health, "/ready"), Some((200, _))) {
                return d;
            }
            assert!(
                Instant::now() < deadline,
                "broker not ready after 30 s:\n{}",
                d.log_text()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    #[must_use]
    pub fn log_text(&self) -> String {
        let mut s = String::new();
        if let Ok(mut f) = std::fs::File::open(&self.log) {
            let _ = f.read_to_string(&mut s);
        }
        s
    }

    /// The log once `done` holds for it, or as it is after `timeout`.
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

    /// The broker's pid in this (the initial) pid namespace: the innermost process of
    /// the chain.
    #[must_use]
    pub fn broker_pid(&self) -> Option<u32> {
        let mut pid = self.child.id();
        for _ in 0..8 {
            match children(pid).first() {
                Some(&c) => pid = c,
                None => break,
            }
        }
        (pid != self.child.id()).then_some(pid)
    }

    /// SIGTERM to the broker, then wait (bounded) for the chain to exit.
    pub fn stop(&mut self) -> std::process::ExitStatus {
        if let Some(pid) = self.broker_pid() {
            // SAFETY: kill(2) with a pid of our process tree.
            unsafe { libc::kill(i32::try_from(pid).expect("pid"), libc::SIGTERM) };
        }
        let deadline = Instant::now() + Duration::from_secs(20);
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

impl Drop for NsDaemon {
    fn drop(&mut self) {
        if matches!(self.child.try_wait(), Ok(None)) {
            if let Some(pid) = self.broker_pid() {
                // SAFETY: kill(2) with a pid of our process tree.
                unsafe { libc::kill(i32::try_from(pid).expect("pid"), libc::SIGTERM) };
            }
            let deadline = Instant::now() + Duration::from_secs(15);
            while Instant::now() < deadline {
                if !matches!(self.child.try_wait(), Ok(None)) {
                    return;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            // unshare --kill-child passes the end on to the broker.
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}
