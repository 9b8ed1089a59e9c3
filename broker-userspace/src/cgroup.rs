//! cgroup v2 helpers: find the unified hierarchy, create and remove child cgroups.

use std::{
    fs,
    io::{self, Write as _},
    os::fd::OwnedFd,
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

#[derive(Debug, thiserror::Error)]
pub enum CgroupError {
    #[error("no cgroup v2 (cgroup2) mount found in /proc/self/mountinfo")]
    NoCgroup2,
    #[error("{op} {path}: {source}")]
    Io {
        op: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

fn io_err<'a>(op: &'static str, path: &'a Path) -> impl FnOnce(io::Error) -> CgroupError + 'a {
    move |source| CgroupError::Io {
        op,
        path: path.to_path_buf(),
        source,
    }
}

/// The mount point of the cgroup v2 hierarchy, from `/proc/self/mountinfo`
/// (`/sys/fs/cgroup` on most hosts, `/sys/fs/cgroup/unified` on hybrid ones).
///
/// # Errors
/// When mountinfo cannot be read or has no cgroup2 mount.
pub fn cgroup2_root() -> Result<PathBuf, CgroupError> {
    let text = fs::read_to_string("/proc/self/mountinfo")
        .map_err(io_err("reading", Path::new("/proc/self/mountinfo")))?;
    parse_mountinfo(&text).ok_or(CgroupError::NoCgroup2)
}

/// Whether `path` is a directory of a cgroup v2 hierarchy (`statfs` says cgroup2).
///
/// # Errors
/// When `path` cannot be reached.
pub fn is_v2_dir(path: &Path) -> io::Result<bool> {
    Ok(crate::sys::fs_type(path)? == libc::CGROUP2_SUPER_MAGIC)
}

fn parse_mountinfo(text: &str) -> Option<PathBuf> {
    text.lines().find_map(|line| {
        // <id> <parent> <maj:min> <root> <mount point> <options> ... - <fstype> <source> ...
        let (pre, post) = line.split_once(" - ")?;
        let fstype = post.split_whitespace().next()?;
        let mount_point = pre.split_whitespace().nth(4)?;
        (fstype == "cgroup2").then(|| PathBuf::from(unescape(mount_point)))
    })
}

/// A cgroup2 mount as this process sees it in `/proc/self/mountinfo`.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Mount {
    /// Where it is mounted.
    point: PathBuf,
    /// The directory of the hierarchy at its root, relative to this process's cgroup
    /// namespace (`/` in a container's own `/sys/fs/cgroup`; `/../..` for the host's
    /// hierarchy bind-mounted into a container two levels below the host's root).
    root: String,
}

fn cgroup2_mounts(text: &str) -> Vec<Mount> {
    text.lines()
        .filter_map(|line| {
            let (pre, post) = line.split_once(" - ")?;
            if post.split_whitespace().next()? != "cgroup2" {
                return None;
            }
            let mut f = pre.split_whitespace();
            let root = unescape(f.nth(3)?);
            let point = PathBuf::from(unescape(f.next()?));
            Some(Mount { point, root })
        })
        .collect()
}

/// How far `ancestor_of_self` searches a hierarchy for this process's cgroup.
const SEARCH_MAX_DEPTH: usize = 12;
const SEARCH_MAX_DIRS: usize = 100_000;

/// Why [`ancestor_of_self`] found no cgroup.
#[derive(Debug, thiserror::Error)]
pub enum SelfCgroupError {
    #[error(transparent)]
    Cgroup(#[from] CgroupError),
    #[error("this process has no cgroup v2 path in /proc/self/cgroup")]
    NoPath,
    #[error(
        "this process's cgroup is not visible in any cgroup2 mount (in a container with a private cgroup namespace, mount the container's own /sys/fs/cgroup as usual)"
    )]
    NotVisible,
    #[error(
        "no cgroup2 mount shows the cgroup {levels} level(s) above this process's ({own}): in a container with a private cgroup namespace, mount the host's cgroup v2 hierarchy (hostPath /sys/fs/cgroup) anywhere in the container"
    )]
    NoAncestor { levels: u32, own: String },
}

/// The cgroup `levels` above this process's own, as a directory to attach to: 0 is its
/// own cgroup, 1 its parent (a Kubernetes pod's cgroup, seen from one of its
/// containers), and so on.
///
/// This process's cgroup is found through `/proc/self/cgroup` in a mount whose root is
/// an ancestor of it (a container's own `/sys/fs/cgroup`), which gives its id (the
/// directory's inode). The ancestor must be inside some cgroup2 mount: when the
/// path does not reach it there (a private cgroup namespace, whose root is the
/// container's own cgroup), the other cgroup2 mounts (the host's hierarchy mounted into
/// the container) are searched for the directory with that id, breadth first, at most
/// 12 levels and 100 000 directories deep.
///
/// # Errors
/// [`SelfCgroupError`], saying what to mount.
pub fn ancestor_of_self(levels: u32) -> Result<PathBuf, SelfCgroupError> {
    let mountinfo = fs::read_to_string("/proc/self/mountinfo")
        .map_err(io_err("reading", Path::new("/proc/self/mountinfo")))?;
    let cgroup = fs::read_to_string("/proc/self/cgroup")
        .map_err(io_err("reading", Path::new("/proc/self/cgroup")))?;
    let own = cgroup
        .lines()
        .find_map(|l| l.strip_prefix("0::"))
        .ok_or(SelfCgroupError::NoPath)?
        .trim()
        .to_owned();
    let mounts = cgroup2_mounts(&mountinfo);
    find_ancestor(&mounts, &own, levels)
}

/// `own`'s path under a mount whose root is `own` or one of its ancestors.
fn under_root(m: &Mount, own: &str) -> Option<PathBuf> {
    let root = m.root.trim_end_matches('/');
    let rest = own.strip_prefix(root)?;
    if !(rest.is_empty() || rest.starts_with('/')) {
        return None;
    }
    Some(m.point.join(rest.trim_start_matches('/')))
}

fn find_ancestor(mounts: &[Mount], own: &str, levels: u32) -> Result<PathBuf, SelfCgroupError> {
    use std::os::unix::fs::MetadataExt as _;
    // Where this process's cgroup is, by path, and its id.
    let direct: Vec<(PathBuf, &Mount)> = mounts
        .iter()
        .filter_map(|m| Some((under_root(m, own)?, m)))
        .filter(|(p, _)| p.is_dir())
        .collect();
    let (own_dir, _) = direct.first().ok_or(SelfCgroupError::NotVisible)?;
    let id = fs::metadata(own_dir)
        .map_err(io_err("reading", own_dir))?
        .ino();
    let up = |p: &Path, point: &Path| -> Option<PathBuf> {
        let mut p = p.to_path_buf();
        for _ in 0..levels {
            if p == point {
                return None;
            }
            p = p.parent()?.to_path_buf();
        }
        p.starts_with(point).then_some(p)
    };
    for (p, m) in &direct {
        if let Some(a) = up(p, &m.point) {
            return Ok(a);
        }
    }
    // The other mounts (a hierarchy whose root is above our namespace's): find the
    // directory with our id.
    for m in mounts.iter().filter(|m| under_root(m, own).is_none()) {
        if let Some(p) = search(&m.point, id)
            && let Some(a) = up(&p, &m.point)
        {
            return Ok(a);
        }
    }
    Err(SelfCgroupError::NoAncestor {
        levels,
        own: own.to_owned(),
    })
}

/// The directory under `top` whose inode is `id` (breadth first, bounded).
fn search(top: &Path, id: u64) -> Option<PathBuf> {
    use std::os::unix::fs::MetadataExt as _;
    let mut queue = std::collections::VecDeque::from([(top.to_path_buf(), 0usize)]);
    let mut seen = 0usize;
    while let Some((dir, depth)) = queue.pop_front() {
        seen += 1;
        if seen > SEARCH_MAX_DIRS {
            return None;
        }
        let Ok(meta) = fs::symlink_metadata(&dir) else {
            continue;
        };
        if meta.ino() == id {
            return Some(dir);
        }
        if depth >= SEARCH_MAX_DEPTH {
            continue;
        }
        let Ok(entries) = fs::read_dir(&dir) else {
            continue;
        };
        for e in entries.filter_map(Result::ok) {
            if e.file_type().is_ok_and(|t| t.is_dir()) {
                queue.push_back((e.path(), depth + 1));
            }
        }
    }
    None
}

/// The cgroup v2 mount point of this process, read once.
fn root() -> Option<&'static Path> {
    static ROOT: std::sync::OnceLock<Option<PathBuf>> = std::sync::OnceLock::new();
    ROOT.get_or_init(|| cgroup2_root().ok()).as_deref()
}

/// The id of process `pid`'s cgroup v2 (the inode number of its directory, which is what
/// `bpf_get_current_cgroup_id` returns), read from `/proc/PID/cgroup` now. `None` when
/// the process is gone, has no cgroup v2 path, or it cannot be read.
#[must_use]
pub fn cgroup_id_of(pid: u32) -> Option<u64> {
    let proc = crate::sys::ProcDir::open(pid).ok()?;
    of_process(&proc).map(|(id, _)| id)
}

/// The cgroup v2 of the process `proc` is the directory of: its id and its path as
/// `/proc/PID/cgroup` gives it (relative to the cgroup2 mount, starting with `/`).
/// `None` when the process is gone, or its cgroup is not under our cgroup2 mount
/// (another cgroup namespace's root: a path with `..`).
#[must_use]
pub fn of_process(proc: &crate::sys::ProcDir) -> Option<(u64, PathBuf)> {
    let text = proc.read(c"cgroup", 64 * 1024).ok()?;
    let path = proc_cgroup_path(&text)?;
    Some((id_of_path(&path)?, path))
}

/// The cgroup v2 line (`0::/a/b`) of a `/proc/PID/cgroup` text, as a path; `None`
/// without one, or for a path that climbs out of the mount (`/../x`, seen from a cgroup
/// namespace the process is not in).
#[must_use]
pub fn proc_cgroup_path(text: &[u8]) -> Option<PathBuf> {
    use std::os::unix::ffi::OsStrExt as _;
    let rel = text
        .split(|&b| b == b'\n')
        .find_map(|l| l.strip_prefix(b"0::"))?;
    let path = Path::new(std::ffi::OsStr::from_bytes(rel));
    let plain = path.is_absolute()
        && path.components().all(|c| {
            matches!(
                c,
                std::path::Component::RootDir | std::path::Component::Normal(_)
            )
        });
    plain.then(|| path.to_path_buf())
}

/// The id of the cgroup at `path` (relative to the cgroup2 mount, as
/// [`proc_cgroup_path`] gives it).
#[must_use]
pub fn id_of_path(path: &Path) -> Option<u64> {
    use std::os::unix::fs::MetadataExt as _;
    let dir = root()?.join(path.strip_prefix("/").unwrap_or(path));
    fs::metadata(dir)
        .ok()
        .filter(fs::Metadata::is_dir)
        .map(|m| m.ino())
}

/// The path (relative to the cgroup2 mount, starting with `/`) of the cgroup whose id
/// is `id`, found from the id alone: the cgroup is opened by file handle and the path
/// read back from the open directory, then checked to name that same cgroup. `None`
/// when no cgroup has that id any more, it is outside our mount, or the daemon lacks
/// `CAP_DAC_READ_SEARCH` (which `open_by_handle_at` needs).
#[must_use]
pub fn path_of_id(id: u64) -> Option<PathBuf> {
    static MOUNT: std::sync::OnceLock<Option<fs::File>> = std::sync::OnceLock::new();
    let root = root()?;
    let mount = MOUNT.get_or_init(|| fs::File::open(root).ok()).as_ref()?;
    let dir = crate::sys::open_cgroup_by_id(mount, id).ok()?;
    let full = fs::read_link(format!(
        "/proc/self/fd/{}",
        std::os::fd::AsRawFd::as_raw_fd(&dir)
    ))
    .ok()?;
    let rel = full.strip_prefix(root).ok()?;
    let path = Path::new("/").join(rel);
    (id_of_path(&path) == Some(id)).then_some(path)
}

/// mountinfo escapes space, tab, newline and backslash as octal.
fn unescape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let b = s.as_bytes();
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\'
            && i + 3 < b.len()
            && let Ok(v) = u8::from_str_radix(&s[i + 1..i + 4], 8)
        {
            out.push(char::from(v));
            i += 4;
            continue;
        }
        out.push(char::from(b[i]));
        i += 1;
    }
    out
}

/// A child cgroup this process created; removed (after killing anything left in it)
/// on drop.
#[derive(Debug)]
pub struct ChildCgroup {
    path: PathBuf,
}

impl ChildCgroup {
    /// Create `parent/name`.
    ///
    /// # Errors
    /// When the directory cannot be created.
    pub fn create(parent: &Path, name: &str) -> Result<Self, CgroupError> {
        let path = parent.join(name);
        fs::create_dir(&path).map_err(io_err("creating cgroup", &path))?;
        Ok(Self { path })
    }

    #[must_use]
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// An open `cgroup.procs` of this cgroup; a child process writes `0` to it (from
    /// `pre_exec`) to move itself in before it execs.
    ///
    /// # Errors
    /// When the file cannot be opened.
    pub fn procs_fd(&self) -> Result<OwnedFd, CgroupError> {
        let p = self.path.join("cgroup.procs");
        let f = fs::OpenOptions::new()
            .write(true)
            .open(&p)
            .map_err(io_err("opening", &p))?;
        Ok(OwnedFd::from(f))
    }

    /// Move a process into this cgroup.
    ///
    /// # Errors
    /// When the kernel refuses.
    pub fn add_pid(&self, pid: u32) -> Result<(), CgroupError> {
        let p = self.path.join("cgroup.procs");
        let mut f = fs::OpenOptions::new()
            .write(true)
            .open(&p)
            .map_err(io_err("opening", &p))?;
        write!(f, "{pid}").map_err(io_err("writing", &p))
    }

    fn pids(&self) -> Vec<i32> {
        fs::read_to_string(self.path.join("cgroup.procs"))
            .unwrap_or_default()
            .lines()
            .filter_map(|l| l.trim().parse().ok())
            .collect()
    }

    /// Kill everything still in the cgroup and remove it, waiting up to `timeout`.
    ///
    /// # Errors
    /// When the cgroup is still busy after the timeout.
    pub fn remove(&self, timeout: Duration) -> Result<(), CgroupError> {
        let deadline = Instant::now() + timeout;
        loop {
            match fs::remove_dir(&self.path) {
                Ok(()) => return Ok(()),
                Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
                Err(e) if Instant::now() >= deadline => {
                    return Err(CgroupError::Io {
                        op: "removing cgroup",
                        path: self.path.clone(),
                        source: e,
                    });
                }
                Err(_) => {
                    // cgroup.kill (5.14+) kills the whole subtree; fall back to SIGKILL.
                    if fs::write(self.path.join("cgroup.kill"), "1").is_err() {
                        for pid in self.pids() {
                            let _ = crate::sys::kill(pid, libc::SIGKILL);
                        }
                    }
                    std::thread::sleep(Duration::from_millis(20));
                }
            }
        }
    }
}

impl Drop for ChildCgroup {
    fn drop(&mut self) {
        if let Err(e) = self.remove(Duration::from_secs(5)) {
            tracing::warn!(error = %e, "leaving cgroup behind");
        }
    }
}

/// Write `0` ("this process") to an open `cgroup.procs`. Async-signal-safe: meant for
/// `CommandExt::pre_exec`.
///
/// # Errors
/// The `write(2)` error.
pub fn join_from_pre_exec(procs: &OwnedFd) -> io::Result<()> {
    crate::sys::join_cgroup(procs)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cgroup2_mounts_with_their_roots() {
        let text = "41 31 0:38 / /sys/fs/cgroup rw - cgroup2 cgroup2 rw\n\
                    52 41 0:38 /../.. /host/cgroup ro - cgroup2 cgroup2 rw\n\
                    53 41 0:5 / /proc rw - proc proc rw\n";
        assert_eq!(
            cgroup2_mounts(text),
            [
                Mount {
                    point: "/sys/fs/cgroup".into(),
                    root: "/".into()
                },
                Mount {
                    point: "/host/cgroup".into(),
                    root: "/../..".into()
                }
            ]
        );
    }

    #[test]
    fn paths_under_a_mount_root() {
        let host = Mount {
            point: "/sys/fs/cgroup".into(),
            root: "/".into(),
        };
        assert_eq!(
            under_root(&host, "/kubepods/pod1/c1"),
            Some(PathBuf::from("/sys/fs/cgroup/kubepods/pod1/c1"))
        );
        assert_eq!(
            under_root(&host, "/"),
            Some(PathBuf::from("/sys/fs/cgroup"))
        );
        let sub = Mount {
            point: "/mnt/pods".into(),
            root: "/kubepods".into(),
        };
        assert_eq!(
            under_root(&sub, "/kubepods/pod1"),
            Some(PathBuf::from("/mnt/pods/pod1"))
        );
        assert_eq!(under_root(&sub, "/kubepods2/pod1"), None);
        let above = Mount {
            point: "/host".into(),
            root: "/../..".into(),
        };
        assert_eq!(under_root(&above, "/"), None);
    }

    /// A fake hierarchy: `host/pod/c1` is "this process's" cgroup, seen through a
    /// namespaced mount (`ns`, the same directory) whose root is `/`, and through the
    /// host's hierarchy (`host`) whose root is above it.
    #[test]
    fn the_pod_cgroup_from_a_private_namespace() {
        let dir = tempfile::tempdir().unwrap();
        let host = dir.path().join("host");
        let c1 = host.join("pod/c1");
        fs::create_dir_all(&c1).unwrap();
        fs::create_dir_all(host.join("other/c9")).unwrap();
        let ns = dir.path().join("ns");
        std::os::unix::fs::symlink(&c1, &ns).unwrap();
        let mounts = [
            Mount {
                point: ns.clone(),
                root: "/".into(),
            },
            Mount {
                point: host.clone(),
                root: "/../..".into(),
            },
        ];
        // Level 0: our own, as seen in the namespace.
        assert_eq!(find_ancestor(&mounts, "/", 0).unwrap(), ns);
        // Level 1: only the host's hierarchy shows it.
        assert_eq!(find_ancestor(&mounts, "/", 1).unwrap(), host.join("pod"));
        assert_eq!(find_ancestor(&mounts, "/", 2).unwrap(), host);
        assert!(matches!(
            find_ancestor(&mounts, "/", 3),
            Err(SelfCgroupError::NoAncestor { levels: 3, .. })
        ));
        // Without the host's hierarchy: said so.
        assert!(matches!(
            find_ancestor(&mounts[..1], "/", 1),
            Err(SelfCgroupError::NoAncestor { .. })
        ));
    }

    #[test]
    fn the_parent_by_path_when_the_namespace_is_the_hosts() {
        let dir = tempfile::tempdir().unwrap();
        fs::create_dir_all(dir.path().join("kubepods/pod1/c1")).unwrap();
        let mounts = [Mount {
            point: dir.path().to_path_buf(),
            root: "/".into(),
        }];
        assert_eq!(
            find_ancestor(&mounts, "/kubepods/pod1/c1", 1).unwrap(),
            dir.path().join("kubepods/pod1")
        );
        assert!(matches!(
            find_ancestor(&mounts, "/nowhere", 1),
            Err(SelfCgroupError::NotVisible)
        ));
    }

    #[test]
    fn finds_cgroup2_in_hybrid_and_unified_layouts() {
        let hybrid = "31 23 0:28 / /sys/fs/cgroup rw,relatime - tmpfs tmpfs rw,mode=755\n\
                      40 31 0:37 / /sys/fs/cgroup/systemd rw - cgroup cgroup rw,name=systemd\n\
                      41 31 0:38 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw\n";
        assert_eq!(
            parse_mountinfo(hybrid),
            Some(PathBuf::from("/sys/fs/cgroup/unified"))
        );
        let unified =
            "29 23 0:26 / /sys/fs/cgroup rw,nosuid shared:4 - cgroup2 cgroup2 rw,nsdelegate\n";
        assert_eq!(
            parse_mountinfo(unified),
            Some(PathBuf::from("/sys/fs/cgroup"))
        );
        assert_eq!(parse_mountinfo("1 0 0:1 / / rw - ext4 /dev/vda rw\n"), None);
        let escaped = "1 0 0:1 / /mnt/my\\040cg rw - cgroup2 none rw\n";
        assert_eq!(parse_mountinfo(escaped), Some(PathBuf::from("/mnt/my cg")));
    }

    #[test]
    fn reads_the_cgroup_v2_line_and_refuses_paths_out_of_the_mount() {
        let text = b"12:pids:/x\n0::/system.slice/app.service\n";
        assert_eq!(
            proc_cgroup_path(text),
            Some(PathBuf::from("/system.slice/app.service"))
        );
        assert_eq!(proc_cgroup_path(b"0::/\n"), Some(PathBuf::from("/")));
        // Seen from a cgroup namespace the process is not in.
        assert_eq!(proc_cgroup_path(b"0::/../../other\n"), None);
        assert_eq!(proc_cgroup_path(b"1:name=systemd:/x\n"), None);
        assert_eq!(proc_cgroup_path(b"0::relative\n"), None);
    }

    #[test]
    fn this_process_cgroup_by_pid_and_by_id() {
        let Ok(proc) = crate::sys::ProcDir::open(std::process::id()) else {
            return;
        };
        let Some((id, path)) = of_process(&proc) else {
            // No cgroup v2 here.
            return;
        };
        assert_eq!(cgroup_id_of(std::process::id()), Some(id));
        assert!(path.is_absolute(), "{}", path.display());
        // By file handle: needs CAP_DAC_READ_SEARCH (root).
        if crate::sys::euid() == 0 {
            assert_eq!(path_of_id(id), Some(path));
        }
        assert_eq!(path_of_id(u64::MAX), None);
    }
}
