//! The broker's pid namespace, and what depends on it.
//!
//! * **Own-traffic bypass.** connect4/6 leave the daemon's own connects alone: its
//!   upstream sockets carry the bypass mark, and its other sockets (secret-store
//!   clients, DNS) are recognised by its process. The kernel's `bpf_get_current_pid_tgid`
//!   gives the tgid in the *initial* pid namespace, while `getpid()` in a container
//!   without the host's pid namespace gives another number (often 1): there they never
//!   match, and a host process whose tgid happens to equal the daemon's pid would be
//!   exempt instead. So the programs compare the tgid *in the daemon's own pid
//!   namespace* (`bpf_get_ns_current_pid_tgid` with the namespace's device and inode;
//!   allowed in cgroup programs since 6.10). Before 6.10 the initial-namespace tgid is
//!   used when the daemon runs there, and in a private pid namespace only the mark is
//!   left (said at start-up). See [`OwnTraffic::detect`].
//! * **Looking callers up in `/proc`.** The kernel records callers by their tgid in the
//!   initial pid namespace; this process's `/proc` shows those pids only when it
//!   belongs to that namespace ([`host_pids_visible`]). In a container, `/proc/PID` is
//!   another process (or none), so nothing is read from it for intercepted callers.

use std::{io, os::unix::fs::MetadataExt as _, path::Path, sync::OnceLock};

/// Inode number of the initial pid namespace (`PROC_PID_INIT_INO`, fixed by the kernel).
pub const INIT_PID_NS_INO: u64 = 0xEFFF_FFFC;

/// The kernel from which cgroup programs may call `bpf_get_ns_current_pid_tgid`
/// ("bpf: Allow helper bpf_get_[ns_]current_pid_tgid() for all prog types", 6.10).
pub const NS_HELPER_KERNEL: (u32, u32) = (6, 10);

/// A pid namespace as `stat(2)` of `/proc/PID/ns/pid` shows it (what
/// `bpf_get_ns_current_pid_tgid` takes).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PidNs {
    pub dev: u64,
    pub ino: u64,
}

impl PidNs {
    /// This process's pid namespace.
    ///
    /// # Errors
    /// When `/proc/self/ns/pid` cannot be read (no `/proc`).
    pub fn own() -> io::Result<Self> {
        Self::of(Path::new("/proc/self/ns/pid"))
    }

    /// The namespace behind a `ns/pid` link.
    ///
    /// # Errors
    /// The `stat` failure.
    pub fn of(link: &Path) -> io::Result<Self> {
        let m = std::fs::metadata(link)?;
        Ok(Self {
            dev: m.dev(),
            ino: m.ino(),
        })
    }

    /// Whether this is the initial pid namespace (the host's).
    #[must_use]
    pub fn is_initial(self) -> bool {
        self.ino == INIT_PID_NS_INO
    }
}

/// How the kernel programs recognise the daemon's own connects besides the mark.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OwnTraffic {
    /// `tgid` in the pid namespace `ns` (kernel >= 6.10).
    InNamespace { ns: PidNs, tgid: u32 },
    /// `tgid` in the initial pid namespace (this process runs there; older kernels).
    Initial { tgid: u32 },
    /// Only the socket mark: a private pid namespace on a kernel before 6.10, or no
    /// `/proc` to find the namespace.
    MarkOnly,
}

impl OwnTraffic {
    /// Decide for this process (`pid` = `getpid()`), on this kernel.
    #[must_use]
    pub fn detect(pid: u32) -> Self {
        Self::decide(pid, PidNs::own().ok(), kernel_version())
    }

    fn decide(pid: u32, ns: Option<PidNs>, kernel: Option<(u32, u32)>) -> Self {
        let Some(ns) = ns else {
            return Self::MarkOnly;
        };
        if kernel.is_some_and(|k| k >= NS_HELPER_KERNEL) {
            return Self::InNamespace { ns, tgid: pid };
        }
        if ns.is_initial() {
            Self::Initial { tgid: pid }
        } else {
            Self::MarkOnly
        }
    }

    /// `(PIDNS_DEV, PIDNS_INO, bypass_tgid)` for the programs.
    #[must_use]
    pub fn program_values(self) -> (u64, u64, u32) {
        match self {
            Self::InNamespace { ns, tgid } => (ns.dev, ns.ino, tgid),
            Self::Initial { tgid } => (0, 0, tgid),
            Self::MarkOnly => (0, 0, 0),
        }
    }

    /// Say at start-up how the daemon's own connects are kept from being redirected.
    pub fn log(self, mark: u32) {
        match self {
            Self::InNamespace { ns, tgid } => tracing::info!(
                mark = format_args!("{mark:#x}"),
                pid = tgid,
                pid_namespace = ns.ino,
                initial_pid_namespace = ns.is_initial(),
                "own connections exempt from interception: socket mark, and this process in its pid namespace"
            ),
            Self::Initial { tgid } => tracing::info!(
                mark = format_args!("{mark:#x}"),
                pid = tgid,
                "own connections exempt from interception: socket mark, and this process"
            ),
            Self::MarkOnly => tracing::warn!(
                mark = format_args!("{mark:#x}"),
                "own connections exempt from interception by the socket mark only: in a private pid namespace the process cannot be recognised before kernel 6.10, so this daemon's secret-store and DNS connections must not go to intercepted destinations"
            ),
        }
    }
}

/// The running kernel's (major, minor).
fn kernel_version() -> Option<(u32, u32)> {
    parse_release(&crate::sys::kernel_release()?)
}

fn parse_release(release: &str) -> Option<(u32, u32)> {
    let mut parts = release.split(|c: char| !c.is_ascii_digit());
    let major = parts.next()?.parse().ok()?;
    let minor = parts.next()?.parse().ok()?;
    Some((major, minor))
}

/// Whether pids the kernel recorded (tgids in the initial pid namespace) name the same
/// processes in this process's `/proc`: it runs in the initial pid namespace and its
/// `/proc` is that namespace's (`/proc/self` is our own pid). Checked once.
#[must_use]
pub fn host_pids_visible() -> bool {
    static VISIBLE: OnceLock<bool> = OnceLock::new();
    *VISIBLE.get_or_init(|| {
        let initial = PidNs::own().is_ok_and(PidNs::is_initial);
        let own_proc = std::fs::read_link("/proc/self")
            .ok()
            .and_then(|p| p.to_str()?.parse::<u32>().ok())
            == Some(std::process::id());
        initial && own_proc
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const HOST: PidNs = PidNs {
        dev: 4,
        ino: INIT_PID_NS_INO,
    };
    const CONTAINER: PidNs = PidNs {
        dev: 4,
        ino: 4_026_532_999,
    };

    #[test]
    fn the_namespace_helper_wherever_the_kernel_allows_it() {
        assert_eq!(
            OwnTraffic::decide(1, Some(CONTAINER), Some((6, 18))),
            OwnTraffic::InNamespace {
                ns: CONTAINER,
                tgid: 1
            }
        );
        assert_eq!(
            OwnTraffic::decide(4242, Some(HOST), Some((6, 10))),
            OwnTraffic::InNamespace {
                ns: HOST,
                tgid: 4242
            }
        );
    }

    #[test]
    fn older_kernels_use_the_host_tgid_only_in_the_host_namespace() {
        assert_eq!(
            OwnTraffic::decide(4242, Some(HOST), Some((6, 9))),
            OwnTraffic::Initial { tgid: 4242 }
        );
        // A container's pid 1 is not the host's pid 1 (init): mark only.
        assert_eq!(
            OwnTraffic::decide(1, Some(CONTAINER), Some((5, 15))),
            OwnTraffic::MarkOnly
        );
        assert_eq!(
            OwnTraffic::decide(1, None, Some((6, 18))),
            OwnTraffic::MarkOnly
        );
        assert_eq!(
            OwnTraffic::decide(7, Some(HOST), None),
            OwnTraffic::Initial { tgid: 7 }
        );
    }

    #[test]
    fn program_values() {
        assert_eq!(
            OwnTraffic::InNamespace {
                ns: CONTAINER,
                tgid: 1
            }
            .program_values(),
            (4, 4_026_532_999, 1)
        );
        assert_eq!(OwnTraffic::Initial { tgid: 9 }.program_values(), (0, 0, 9));
        assert_eq!(OwnTraffic::MarkOnly.program_values(), (0, 0, 0));
    }

    #[test]
    fn kernel_releases() {
        assert_eq!(parse_release("6.18.44-fc-v669"), Some((6, 18)));
        assert_eq!(parse_release("5.14.0-427.el9.x86_64"), Some((5, 14)));
        assert_eq!(parse_release("6.10"), Some((6, 10)));
        assert_eq!(parse_release("garbage"), None);
    }

    #[test]
    fn this_process() {
        let ns = PidNs::own().expect("/proc/self/ns/pid");
        assert!(ns.ino != 0);
        // The test runs in the host's pid namespace unless it was started in another.
        assert_eq!(host_pids_visible(), ns.is_initial());
    }
}
