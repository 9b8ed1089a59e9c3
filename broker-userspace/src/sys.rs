//! Process-wide settings the daemon makes at start, before any secret is fetched.

use std::io;

/// The soft and hard `RLIMIT_NOFILE` before and after [`raise_nofile_limit`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NofileLimits {
    pub soft_before: u64,
    pub soft: u64,
    pub hard: u64,
}

fn get_rlimit(resource: libc::__rlimit_resource_t) -> io::Result<libc::rlimit> {
    let mut r = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: valid pointer to a rlimit.
    if unsafe { libc::getrlimit(resource, &raw mut r) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(r)
}

fn set_rlimit(resource: libc::__rlimit_resource_t, r: libc::rlimit) -> io::Result<()> {
    // SAFETY: valid pointer to a rlimit.
    if unsafe { libc::setrlimit(resource, &raw const r) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// The file system type (`statfs` `f_type`: a `*_MAGIC` number) of `path`.
///
/// # Errors
/// When `path` cannot be reached or has a NUL byte.
pub fn fs_type(path: &std::path::Path) -> io::Result<libc::c_long> {
    use std::os::unix::ffi::OsStrExt as _;
    let c = std::ffi::CString::new(path.as_os_str().as_bytes())
        .map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
    // SAFETY: a zeroed `statfs` is a valid value; `statfs` reads `c` (NUL-terminated)
    // and writes `st`.
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    if unsafe { libc::statfs(c.as_ptr(), &raw mut st) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(st.f_type)
}

/// Raise the soft `RLIMIT_NOFILE` to the hard limit. Each brokered connection holds
/// two descriptors (client and upstream); systemd's default soft limit of 1024 would
/// cap the daemon at about 500 connections with `EMFILE` in the accept loop. The
/// connection caps (`broker.maxConnections`) are the bound we choose instead.
///
/// # Errors
/// When the limits cannot be read or set.
pub fn raise_nofile_limit() -> io::Result<NofileLimits> {
    let r = get_rlimit(libc::RLIMIT_NOFILE)?;
    let before = r.rlim_cur;
    if r.rlim_cur < r.rlim_max {
        set_rlimit(
            libc::RLIMIT_NOFILE,
            libc::rlimit {
                rlim_cur: r.rlim_max,
                rlim_max: r.rlim_max,
            },
        )?;
    }
    Ok(NofileLimits {
        soft_before: before,
        soft: r.rlim_max,
        hard: r.rlim_max,
    })
}

/// Keep secrets out of core dumps and away from other processes of the same uid:
/// `PR_SET_DUMPABLE=0` (no core dump; `/proc/PID/{mem,environ,...}` become root-owned
/// and `ptrace` attach needs `CAP_SYS_PTRACE`) and `RLIMIT_CORE=0` (no core file even
/// if something makes the process dumpable again, e.g. an `execve`). Heap pages are not
/// marked `MADV_DONTDUMP` one by one: with the process undumpable there is no dump.
///
/// # Errors
/// When either call fails.
pub fn make_undumpable() -> io::Result<()> {
    set_rlimit(
        libc::RLIMIT_CORE,
        libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        },
    )?;
    // SAFETY: prctl(PR_SET_DUMPABLE, 0) has no pointer arguments.
    if unsafe { libc::prctl(libc::PR_SET_DUMPABLE, 0, 0, 0, 0) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Make sure `SIGPIPE` is ignored, so a write to a closed pipe or socket returns
/// `EPIPE` instead of killing the daemon. Rust's runtime already ignores it before
/// `main`; this states the requirement where the daemon depends on it.
pub fn ignore_sigpipe() {
    // SAFETY: installing SIG_IGN has no preconditions.
    unsafe { libc::signal(libc::SIGPIPE, libc::SIG_IGN) };
}

/// What `exec` restores in the child before `execve`: the soft `RLIMIT_NOFILE` it had
/// (programs using `select(2)` break above 1024) and `RLIMIT_CORE`.
#[derive(Debug, Clone, Copy)]
pub struct ChildLimits {
    nofile: libc::rlimit,
    core: libc::rlimit,
}

impl ChildLimits {
    /// The limits now (call before changing them).
    ///
    /// # Errors
    /// When they cannot be read.
    pub fn capture() -> io::Result<Self> {
        Ok(Self {
            nofile: get_rlimit(libc::RLIMIT_NOFILE)?,
            core: get_rlimit(libc::RLIMIT_CORE)?,
        })
    }

    /// Restore them; async-signal-safe (for `pre_exec`). The hard core limit cannot be
    /// raised again without privileges: failures are ignored.
    pub fn restore(&self) {
        // SAFETY: setrlimit with valid pointers; async-signal-safe.
        unsafe {
            libc::setrlimit(libc::RLIMIT_NOFILE, &raw const self.nofile);
            libc::setrlimit(libc::RLIMIT_CORE, &raw const self.core);
        }
    }
}

/// Bytes waiting unread in a socket's receive queue (`FIONREAD`).
///
/// # Errors
/// The ioctl's failure.
pub fn unread_bytes(sock: &impl std::os::fd::AsRawFd) -> io::Result<usize> {
    let mut n: libc::c_int = 0;
    // SAFETY: FIONREAD writes one int through a valid pointer; the fd is open.
    if unsafe { libc::ioctl(sock.as_raw_fd(), libc::FIONREAD, &raw mut n) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(usize::try_from(n).unwrap_or(0))
}

/// `CLOCK_MONOTONIC` now, in nanoseconds: the clock of `bpf_ktime_get_ns`.
#[must_use]
pub fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: valid pointer to a timespec.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &raw mut ts) };
    u64::try_from(ts.tv_sec).unwrap_or(0) * 1_000_000_000 + u64::try_from(ts.tv_nsec).unwrap_or(0)
}

/// Give free heap back to the OS (`malloc_trim(0)`).
pub fn malloc_trim() {
    // SAFETY: malloc_trim has no preconditions.
    unsafe { libc::malloc_trim(0) };
}

/// Send `sig` to process `pid`.
///
/// # Errors
/// The `kill(2)` error.
pub fn kill(pid: i32, sig: i32) -> io::Result<()> {
    // SAFETY: plain kill(2).
    if unsafe { libc::kill(pid, sig) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Write `0` ("this process") to an open `cgroup.procs`. Async-signal-safe (one
/// `write(2)`): usable between fork and exec.
///
/// # Errors
/// The `write(2)` error.
pub fn join_cgroup(procs: &std::os::fd::OwnedFd) -> io::Result<()> {
    use std::os::fd::AsRawFd as _;
    // SAFETY: write(2) on an fd we own, with a valid 1-byte buffer.
    let n = unsafe { libc::write(procs.as_raw_fd(), b"0".as_ptr().cast(), 1) };
    if n == 1 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// Make `command`'s child, between fork and exec, get back `limits` and join the cgroup
/// whose `cgroup.procs` is open as `procs` (both async-signal-safe).
pub fn before_exec(
    command: &mut tokio::process::Command,
    limits: ChildLimits,
    procs: std::os::fd::OwnedFd,
) {
    // SAFETY: the closure only calls setrlimit(2) and write(2) (on an fd opened before
    // fork), both async-signal-safe.
    unsafe {
        command.pre_exec(move || {
            limits.restore();
            join_cgroup(&procs)
        });
    }
}

/// A 64-bit `SOL_SOCKET` option (`SO_COOKIE`, `SO_NETNS_COOKIE`).
///
/// # Errors
/// The `getsockopt(2)` error.
pub fn sockopt_u64(fd: &impl std::os::fd::AsRawFd, opt: libc::c_int) -> io::Result<u64> {
    let mut v: u64 = 0;
    let mut len = std::mem::size_of::<u64>() as libc::socklen_t;
    // SAFETY: valid fd; v and len outlive the call and len is v's size.
    let r = unsafe {
        libc::getsockopt(
            fd.as_raw_fd(),
            libc::SOL_SOCKET,
            opt,
            (&raw mut v).cast(),
            &raw mut len,
        )
    };
    if r == 0 {
        Ok(v)
    } else {
        Err(io::Error::last_os_error())
    }
}

/// `bpf(2)` with command `cmd` and `attr` (the command's member of `union bpf_attr`,
/// passed with its own size): the kernel's non-negative result, or the error.
///
/// # Safety
/// Every pointer in `attr` must be valid for what `cmd` reads and writes through it.
unsafe fn sys_bpf<A>(cmd: libc::c_long, attr: &mut A) -> io::Result<libc::c_long> {
    // SAFETY: attr outlives the call and its size is the one passed; the pointers in it
    // are the caller's to vouch for.
    let r = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            cmd,
            std::ptr::from_mut(attr),
            std::mem::size_of::<A>(),
        )
    };
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(r)
    }
}

/// A descriptor as `bpf_attr` carries it.
fn attr_fd(fd: std::os::fd::BorrowedFd<'_>) -> io::Result<u32> {
    use std::os::fd::AsRawFd as _;
    u32::try_from(fd.as_raw_fd()).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))
}

/// `union bpf_attr` for the map element commands (`value` is `next_key` for
/// `BPF_MAP_GET_NEXT_KEY`).
#[repr(C)]
struct MapElemAttr {
    map_fd: u32,
    _pad: u32,
    key: u64,
    value: u64,
    flags: u64,
}

/// The number of keys in the BPF map `fd` whose keys are `key_size` bytes, counted
/// with `BPF_MAP_GET_NEXT_KEY` from the first key, one call per key, at most `cap`
/// (a map whose entries come and go meanwhile may be counted a little off; the cap
/// bounds the walk whatever happens).
///
/// # Errors
/// The `bpf(2)` error (other than the end of the map).
pub fn bpf_map_count_keys(
    fd: std::os::fd::BorrowedFd<'_>,
    key_size: usize,
    cap: usize,
) -> io::Result<usize> {
    const BPF_MAP_GET_NEXT_KEY: libc::c_long = 4;
    let fd = attr_fd(fd)?;
    let mut cur = vec![0u8; key_size.max(1)];
    let mut next = vec![0u8; key_size.max(1)];
    let mut n = 0;
    while n < cap {
        let mut attr = MapElemAttr {
            map_fd: fd,
            _pad: 0,
            // NULL: the first key.
            key: if n == 0 { 0 } else { cur.as_ptr() as u64 },
            value: next.as_mut_ptr() as u64,
            flags: 0,
        };
        // SAFETY: both key buffers (key_size bytes, what the kernel reads and writes)
        // outlive the call.
        if let Err(e) = unsafe { sys_bpf(BPF_MAP_GET_NEXT_KEY, &mut attr) } {
            return if e.raw_os_error() == Some(libc::ENOENT) {
                Ok(n)
            } else {
                Err(e)
            };
        }
        n += 1;
        std::mem::swap(&mut cur, &mut next);
    }
    Ok(n)
}

/// Look `key` up in the hash map `fd` and delete it, in one `BPF_MAP_LOOKUP_AND_DELETE_ELEM`
/// (kernel >= 5.14 for hash maps): the value, `None` when there is no such key.
/// `Unsupported` when the kernel does not have the command for this map type (the
/// caller then looks up and deletes in two calls).
///
/// # Errors
/// The `bpf(2)` error.
pub fn bpf_map_take<K: Copy, V: Copy>(
    fd: std::os::fd::BorrowedFd<'_>,
    key: &K,
) -> io::Result<Option<V>> {
    const BPF_MAP_LOOKUP_AND_DELETE_ELEM: libc::c_long = 21;
    /// The kernel's `ENOTSUPP` (not `ENOTSUP`), which it returns for map types
    /// without the command before 5.14.
    const ENOTSUPP: i32 = 524;
    let mut value = std::mem::MaybeUninit::<V>::uninit();
    let mut attr = MapElemAttr {
        map_fd: attr_fd(fd)?,
        _pad: 0,
        key: std::ptr::from_ref(key) as u64,
        value: value.as_mut_ptr() as u64,
        flags: 0,
    };
    // SAFETY: the key and the value buffer (the map's key and value sizes, which the
    // caller's types are) outlive the call.
    if let Err(e) = unsafe { sys_bpf(BPF_MAP_LOOKUP_AND_DELETE_ELEM, &mut attr) } {
        return match e.raw_os_error() {
            Some(libc::ENOENT) => Ok(None),
            Some(libc::EINVAL | libc::EOPNOTSUPP | ENOTSUPP) => {
                Err(io::Error::new(io::ErrorKind::Unsupported, e))
            }
            _ => Err(e),
        };
    }
    // SAFETY: the kernel wrote the whole value on success.
    Ok(Some(unsafe { value.assume_init() }))
}

/// [`bpf_map_count_keys`] with `BPF_MAP_LOOKUP_BATCH` (kernel >= 5.6): [`BATCH`] keys
/// and values per call, for plain hash maps (`HASH`, `LRU_HASH`, not per-CPU) whose
/// values are `value_size` bytes. Much cheaper per key than one call per key.
///
/// # Errors
/// The `bpf(2)` error (`EINVAL` where the map type or kernel has no batch lookup: the
/// caller walks key by key instead).
pub fn bpf_map_count_batch(
    fd: std::os::fd::BorrowedFd<'_>,
    key_size: usize,
    value_size: usize,
    cap: usize,
) -> io::Result<usize> {
    const BPF_MAP_LOOKUP_BATCH: libc::c_long = 24;
    /// `union bpf_attr`'s `batch` member.
    #[repr(C)]
    struct Attr {
        in_batch: u64,
        out_batch: u64,
        keys: u64,
        values: u64,
        count: u32,
        map_fd: u32,
        elem_flags: u64,
        flags: u64,
    }
    let fd = attr_fd(fd)?;
    let mut keys = vec![0u8; key_size.max(1) * BATCH];
    let mut values = vec![0u8; value_size.max(1) * BATCH];
    // The position between calls (a bucket number for hash maps); 8 bytes is enough.
    let mut token_in = [0u8; 8];
    let mut token_out = [0u8; 8];
    let mut n = 0;
    let mut first = true;
    while n < cap {
        let mut attr = Attr {
            in_batch: if first { 0 } else { token_in.as_ptr() as u64 },
            out_batch: token_out.as_mut_ptr() as u64,
            keys: keys.as_mut_ptr() as u64,
            values: values.as_mut_ptr() as u64,
            count: BATCH as u32,
            map_fd: fd,
            elem_flags: 0,
            flags: 0,
        };
        // SAFETY: the token buffers and the key and value buffers (BATCH elements of
        // the map's key and value sizes, what the kernel may write) outlive the call.
        let r = unsafe { sys_bpf(BPF_MAP_LOOKUP_BATCH, &mut attr) };
        n += attr.count as usize;
        if let Err(e) = r {
            return if e.raw_os_error() == Some(libc::ENOENT) {
                Ok(n.min(cap))
            } else {
                Err(e)
            };
        }
        first = false;
        token_in = token_out;
    }
    Ok(n.min(cap))
}

/// Elements per `BPF_MAP_LOOKUP_BATCH` call.
pub const BATCH: usize = 1024;

/// The running kernel's release (`uname -r`).
#[must_use]
pub fn kernel_release() -> Option<String> {
    // SAFETY: uname fills the zeroed struct; the release is NUL-terminated.
    unsafe {
        let mut u: libc::utsname = std::mem::zeroed();
        if libc::uname(&raw mut u) != 0 {
            return None;
        }
        Some(
            std::ffi::CStr::from_ptr(u.release.as_ptr())
                .to_string_lossy()
                .into_owned(),
        )
    }
}

/// Register an owned fd (a ring buffer, an epoll set) with tokio's reactor for
/// readability.
///
/// # Errors
/// The registration error.
pub fn async_readable<T: std::os::fd::AsRawFd>(
    inner: T,
) -> io::Result<tokio::io::unix::AsyncFd<T>> {
    // SAFETY: `inner` owns its fd and moves into the AsyncFd, so the fd stays open for as
    // long as it is registered.
    unsafe {
        tokio::io::unix::AsyncFd::register_with_interest(inner, tokio::io::Interest::READABLE)
    }
    .map_err(|e| e.into_parts().1)
}

/// A private epoll set watching one socket (see `proxy::splice`).
#[derive(Debug)]
pub struct Epoll(std::os::fd::OwnedFd);

impl Epoll {
    /// # Errors
    /// The `epoll_create1(2)` error.
    pub fn new() -> io::Result<Self> {
        use std::os::fd::FromRawFd as _;
        // SAFETY: plain syscall; the result is checked.
        let raw = unsafe { libc::epoll_create1(libc::EPOLL_CLOEXEC) };
        if raw < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: raw is a fresh fd we own.
        Ok(Self(unsafe { std::os::fd::OwnedFd::from_raw_fd(raw) }))
    }

    /// `epoll_ctl(op, sock, events)`.
    ///
    /// # Errors
    /// The `epoll_ctl(2)` error.
    pub fn ctl(&self, op: i32, sock: i32, events: u32) -> io::Result<()> {
        use std::os::fd::AsRawFd as _;
        let mut ev = libc::epoll_event { events, u64: 0 };
        // SAFETY: both fds are open; ev is a valid epoll_event.
        if unsafe { libc::epoll_ctl(self.0.as_raw_fd(), op, sock, &raw mut ev) } < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    /// The events of one ready socket, without blocking (`None`: nothing ready).
    ///
    /// # Errors
    /// The `epoll_wait(2)` error (not `EINTR`, which reads as nothing ready).
    pub fn ready(&self) -> io::Result<Option<u32>> {
        use std::os::fd::AsRawFd as _;
        let mut ev = [libc::epoll_event { events: 0, u64: 0 }];
        // SAFETY: valid epoll fd and a buffer of one event; timeout 0 never blocks.
        let n = unsafe { libc::epoll_wait(self.0.as_raw_fd(), ev.as_mut_ptr(), 1, 0) };
        match n {
            n if n > 0 => Ok(Some(ev[0].events)),
            0 => Ok(None),
            _ => {
                let e = io::Error::last_os_error();
                if e.kind() == io::ErrorKind::Interrupted {
                    Ok(None)
                } else {
                    Err(e)
                }
            }
        }
    }
}

impl std::os::fd::AsRawFd for Epoll {
    fn as_raw_fd(&self) -> std::os::fd::RawFd {
        self.0.as_raw_fd()
    }
}

/// Copy what the socket holds into `buf` without consuming it and without waiting
/// (`recv(MSG_PEEK | MSG_DONTWAIT)`); `Ok(0)` at the end of the stream.
///
/// # Errors
/// `WouldBlock` when nothing is there yet, or the `recv(2)` error.
pub fn peek_now(sock: &impl std::os::fd::AsRawFd, buf: &mut [u8]) -> io::Result<usize> {
    // SAFETY: recv writes at most buf.len() bytes into buf; the fd is open.
    let n = unsafe {
        libc::recv(
            sock.as_raw_fd(),
            buf.as_mut_ptr().cast(),
            buf.len(),
            libc::MSG_PEEK | libc::MSG_DONTWAIT,
        )
    };
    usize::try_from(n).map_err(|_| io::Error::last_os_error())
}

/// `fchmod(2)`. On a Unix socket not bound yet it sets the mode its socket file will be
/// created with (less the umask).
///
/// # Errors
/// The `fchmod(2)` error.
pub fn fchmod(fd: &impl std::os::fd::AsRawFd, mode: u32) -> io::Result<()> {
    // SAFETY: plain fchmod(2) on an open fd.
    if unsafe { libc::fchmod(fd.as_raw_fd(), mode) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Change the owner of the file an `O_PATH` descriptor names (`fchownat(fd, "",
/// AT_EMPTY_PATH)`: the very inode that was opened, never a symlink's target). `None`
/// leaves that id unchanged.
///
/// # Errors
/// The `fchownat(2)` error.
pub fn fchown_path_fd(
    fd: &impl std::os::fd::AsRawFd,
    uid: Option<u32>,
    gid: Option<u32>,
) -> io::Result<()> {
    // u32::MAX ((uid_t)-1) leaves the id as it is.
    let (uid, gid) = (uid.unwrap_or(u32::MAX), gid.unwrap_or(u32::MAX));
    // SAFETY: valid fd and a NUL-terminated empty path.
    let r = unsafe { libc::fchownat(fd.as_raw_fd(), c"".as_ptr(), uid, gid, libc::AT_EMPTY_PATH) };
    if r != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Rename `from` to `to` unless `to` exists (`renameat2(RENAME_NOREPLACE)`): an atomic
/// "create", never a replace. Filesystems without it (`EINVAL`) get a hard link then
/// the removal of `from`, which is as atomic for `to`.
///
/// # Errors
/// `AlreadyExists` when `to` exists, or the system's error.
pub fn rename_noreplace(from: &std::path::Path, to: &std::path::Path) -> io::Result<()> {
    use std::os::unix::ffi::OsStrExt as _;
    let cstr = |p: &std::path::Path| {
        std::ffi::CString::new(p.as_os_str().as_bytes())
            .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "path with a NUL byte"))
    };
    let (f, t) = (cstr(from)?, cstr(to)?);
    // SAFETY: two NUL-terminated paths that outlive the call.
    let r = unsafe {
        libc::renameat2(
            libc::AT_FDCWD,
            f.as_ptr(),
            libc::AT_FDCWD,
            t.as_ptr(),
            libc::RENAME_NOREPLACE,
        )
    };
    if r == 0 {
        return Ok(());
    }
    let e = io::Error::last_os_error();
    if e.raw_os_error() != Some(libc::EINVAL) && e.raw_os_error() != Some(libc::ENOSYS) {
        return Err(e);
    }
    std::fs::hard_link(from, to)?;
    std::fs::remove_file(from)
}

/// The id of user (`group`: false) or group (`true`) `name`, through the system's
/// name service (`getpwnam_r`, `getgrnam_r`: /etc files, LDAP, systemd...). `Ok(None)`:
/// no such name.
///
/// # Errors
/// The lookup's failure (other than "not found").
pub fn lookup_id(name: &str, group: bool) -> io::Result<Option<u32>> {
    let cname = std::ffi::CString::new(name)
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "name with a NUL byte"))?;
    let mut buf = vec![0u8; 4096];
    loop {
        let (r, found, id) = if group {
            // SAFETY: zeroed POD struct; every pointer outlives the call; buf.len() is
            // the buffer's size.
            unsafe {
                let mut g: libc::group = std::mem::zeroed();
                let mut out: *mut libc::group = std::ptr::null_mut();
                let r = libc::getgrnam_r(
                    cname.as_ptr(),
                    &raw mut g,
                    buf.as_mut_ptr().cast(),
                    buf.len(),
                    &raw mut out,
                );
                (r, !out.is_null(), g.gr_gid)
            }
        } else {
            // SAFETY: as above.
            unsafe {
                let mut p: libc::passwd = std::mem::zeroed();
                let mut out: *mut libc::passwd = std::ptr::null_mut();
                let r = libc::getpwnam_r(
                    cname.as_ptr(),
                    &raw mut p,
                    buf.as_mut_ptr().cast(),
                    buf.len(),
                    &raw mut out,
                );
                (r, !out.is_null(), p.pw_uid)
            }
        };
        match r {
            0 => return Ok(found.then_some(id)),
            libc::ERANGE if buf.len() < 1 << 20 => buf.resize(buf.len() * 4, 0),
            libc::ENOENT | libc::ESRCH | libc::EBADF | libc::EPERM => return Ok(None),
            e => return Err(io::Error::from_raw_os_error(e)),
        }
    }
}

/// The process umask, from `/proc/self/status` (reading it with `umask(2)` would change
/// it for every thread meanwhile); `022` when the kernel does not say.
#[must_use]
pub fn umask() -> u32 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("Umask:"))
                .and_then(|v| u32::from_str_radix(v.trim(), 8).ok())
        })
        .unwrap_or(0o022)
}

/// This process's effective user id.
#[must_use]
pub fn euid() -> u32 {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() }
}

/// Receive-side memory of one TCP socket, as `sock_diag` reports it (`SK_MEMINFO_*`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SockMem {
    /// Bytes of buffers the socket holds for its reader (`sk_rmem_alloc`): its TCP
    /// receive queue and, for a socket in a sockmap, what the kernel redirected into it.
    /// 0 when the reader has read everything that reached the socket.
    pub rmem_alloc: u32,
    /// Its receive buffer size (`sk_rcvbuf`).
    pub rcvbuf: u32,
}

/// The receive-side memory of the TCP socket of this network namespace connected from
/// `local` to `remote` whose socket cookie is `cookie` (any other socket on that
/// 4-tuple is not it), read with `sock_diag` (`NETLINK_SOCK_DIAG`, one exact lookup:
/// the kernel answers within the `send`). `Ok(None)`: no such socket (any more).
///
/// # Errors
/// A netlink failure or an answer that cannot be read.
pub fn tcp_sock_mem(
    local: std::net::SocketAddr,
    remote: std::net::SocketAddr,
    cookie: u64,
) -> io::Result<Option<SockMem>> {
    use std::os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd};
    const NETLINK_SOCK_DIAG: libc::c_int = 4;
    const NLM_F_REQUEST: u16 = 1;

    // Both addresses IPv4 (or IPv4-mapped): an AF_INET lookup finds the socket whatever
    // its own family (a dual-stack socket talking IPv4 is hashed by its IPv4 addresses).
    let v4 = |a: std::net::IpAddr| match a {
        std::net::IpAddr::V4(v) => Some(v),
        std::net::IpAddr::V6(v) => v.to_ipv4_mapped(),
    };
    let mut req = [0u8; NLMSG_HDR + 8 + 48];
    let (family, src, dst) = match (v4(local.ip()), v4(remote.ip())) {
        (Some(l), Some(r)) => {
            let mut s = [0u8; 16];
            let mut d = [0u8; 16];
            s[..4].copy_from_slice(&l.octets());
            d[..4].copy_from_slice(&r.octets());
            (libc::AF_INET as u8, s, d)
        }
        _ => {
            let six = |a: std::net::IpAddr| match a {
                std::net::IpAddr::V4(v) => v.to_ipv6_mapped().octets(),
                std::net::IpAddr::V6(v) => v.octets(),
            };
            (libc::AF_INET6 as u8, six(local.ip()), six(remote.ip()))
        }
    };
    let len = req.len() as u32;
    req[0..4].copy_from_slice(&len.to_ne_bytes());
    req[4..6].copy_from_slice(&SOCK_DIAG_BY_FAMILY.to_ne_bytes());
    req[6..8].copy_from_slice(&NLM_F_REQUEST.to_ne_bytes());
    // inet_diag_req_v2: family, protocol, ext (bit INET_DIAG_SKMEMINFO - 1), pad, states.
    let r = &mut req[NLMSG_HDR..];
    r[0] = family;
    r[1] = libc::IPPROTO_TCP as u8;
    r[2] = 1 << (INET_DIAG_SKMEMINFO - 1);
    r[4..8].copy_from_slice(&u32::MAX.to_ne_bytes());
    // inet_diag_sockid: ports and addresses in network order, interface, cookie.
    let id = &mut r[8..];
    id[0..2].copy_from_slice(&local.port().to_be_bytes());
    id[2..4].copy_from_slice(&remote.port().to_be_bytes());
    id[4..20].copy_from_slice(&src);
    id[20..36].copy_from_slice(&dst);
    id[40..44].copy_from_slice(&(cookie as u32).to_ne_bytes());
    id[44..48].copy_from_slice(&((cookie >> 32) as u32).to_ne_bytes());

    // SAFETY: plain socket(2); the result is checked and owned at once.
    let raw = unsafe {
        libc::socket(
            libc::AF_NETLINK,
            libc::SOCK_DGRAM | libc::SOCK_CLOEXEC,
            NETLINK_SOCK_DIAG,
        )
    };
    if raw < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: raw is a fresh fd we own.
    let fd = unsafe { OwnedFd::from_raw_fd(raw) };
    // SAFETY: send(2) of a buffer we own, to the kernel (no address: a netlink socket
    // sends to the kernel by default).
    let n = unsafe { libc::send(fd.as_raw_fd(), req.as_ptr().cast(), req.len(), 0) };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    let mut buf = [0u8; 1024];
    // SAFETY: recv(2) into a buffer we own; never blocks (the answer is already queued).
    let n = unsafe {
        libc::recv(
            fd.as_raw_fd(),
            buf.as_mut_ptr().cast(),
            buf.len(),
            libc::MSG_DONTWAIT,
        )
    };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    parse_sock_mem(&buf[..n.cast_unsigned()])
}

const SOCK_DIAG_BY_FAMILY: u16 = 20;
const NLMSG_ERROR: u16 = 2;
const INET_DIAG_SKMEMINFO: u16 = 7;
const NLMSG_HDR: usize = 16;
/// `struct inet_diag_msg`: family, state, timer, retrans, the 48-byte sockid, five u32.
const DIAG_MSG: usize = 4 + 48 + 20;

/// The `SK_MEMINFO` attribute of a `sock_diag` answer (see [`tcp_sock_mem`]).
fn parse_sock_mem(msg: &[u8]) -> io::Result<Option<SockMem>> {
    let bad = || io::Error::new(io::ErrorKind::InvalidData, "short sock_diag answer");
    let u16_at = |b: &[u8], i: usize| b.get(i..i + 2).map(|s| u16::from_ne_bytes([s[0], s[1]]));
    let u32_at = |b: &[u8], i: usize| {
        b.get(i..i + 4)
            .map(|s| u32::from_ne_bytes([s[0], s[1], s[2], s[3]]))
    };
    let len = u32_at(msg, 0).ok_or_else(bad)? as usize;
    let kind = u16_at(msg, 4).ok_or_else(bad)?;
    let msg = msg.get(..len).ok_or_else(bad)?;
    if kind == NLMSG_ERROR {
        // struct nlmsgerr: a negative errno, then the request's header.
        let errno = u32_at(msg, NLMSG_HDR).ok_or_else(bad)?.cast_signed();
        return match -errno {
            0 => Err(bad()),
            libc::ENOENT | libc::ESTALE => Ok(None),
            e => Err(io::Error::from_raw_os_error(e)),
        };
    }
    if kind != SOCK_DIAG_BY_FAMILY {
        return Err(bad());
    }
    let mut at = NLMSG_HDR + DIAG_MSG;
    while at + 4 <= msg.len() {
        let alen = usize::from(u16_at(msg, at).ok_or_else(bad)?);
        let atype = u16_at(msg, at + 2).ok_or_else(bad)?;
        if alen < 4 {
            break;
        }
        if atype == INET_DIAG_SKMEMINFO {
            return Ok(Some(SockMem {
                rmem_alloc: u32_at(msg, at + 4).ok_or_else(bad)?,
                rcvbuf: u32_at(msg, at + 8).ok_or_else(bad)?,
            }));
        }
        at += (alen + 3) & !3;
    }
    Err(bad())
}

/// A process's `/proc/PID` directory, held open: what is read through it belongs to
/// the process that had the pid when it was opened (once that process is gone, reads
/// fail with `ESRCH` instead of reading a newcomer that got the pid).
#[derive(Debug)]
pub struct ProcDir(std::os::fd::OwnedFd);

impl ProcDir {
    /// Open `/proc/PID`.
    ///
    /// # Errors
    /// `NotFound` when there is no such process (in this pid namespace).
    pub fn open(pid: u32) -> io::Result<Self> {
        let path = std::ffi::CString::new(format!("/proc/{pid}")).map_err(io::Error::other)?;
        // SAFETY: NUL-terminated path; the returned fd is owned below.
        let fd = unsafe {
            libc::open(
                path.as_ptr(),
                libc::O_RDONLY | libc::O_DIRECTORY | libc::O_CLOEXEC,
            )
        };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: a new fd nobody else owns.
        Ok(Self(unsafe {
            <std::os::fd::OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fd)
        }))
    }

    /// The first `max` bytes of the process's file `name` (`comm`, `cgroup`...).
    ///
    /// # Errors
    /// The process is gone, or the file cannot be read.
    pub fn read(&self, name: &std::ffi::CStr, max: u64) -> io::Result<Vec<u8>> {
        use std::{
            io::Read as _,
            os::fd::{AsRawFd as _, FromRawFd as _},
        };
        // SAFETY: valid directory fd and NUL-terminated name; the fd is owned below.
        let fd = unsafe {
            libc::openat(
                self.0.as_raw_fd(),
                name.as_ptr(),
                libc::O_RDONLY | libc::O_CLOEXEC,
            )
        };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: a new fd nobody else owns.
        let mut f = unsafe { std::fs::File::from_raw_fd(fd) };
        // A procfs file is generated whole and handed out as far as the buffer goes,
        // so a read that does not fill the buffer reached its end: no second read (one
        // syscall less per file on every accepted connection).
        let max = usize::try_from(max).unwrap_or(usize::MAX);
        let mut out = Vec::with_capacity(max.min(512));
        while out.len() < max {
            if out.len() == out.capacity() {
                out.reserve((max - out.len()).min(out.capacity()));
            }
            let room = (out.capacity() - out.len()).min(max - out.len());
            let start = out.len();
            out.resize(start + room, 0);
            let n = match f.read(&mut out[start..]) {
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {
                    out.truncate(start);
                    continue;
                }
                Err(e) => return Err(e),
            };
            out.truncate(start + n);
            if n < room {
                break;
            }
        }
        Ok(out)
    }

    /// The target of the process's symbolic link `name` (`exe`). Reading another
    /// user's `exe` needs `CAP_SYS_PTRACE` (`EACCES` without it).
    ///
    /// # Errors
    /// The process is gone, access is denied, or the target is longer than `PATH_MAX`.
    pub fn readlink(&self, name: &std::ffi::CStr) -> io::Result<std::path::PathBuf> {
        use std::os::{fd::AsRawFd as _, unix::ffi::OsStringExt as _};
        // On the stack and not zeroed (the kernel writes the `n` bytes that are kept),
        // then copied out at its length: the path is held for the connection's life,
        // and a `PATH_MAX` buffer kept with it would be 4 KiB per connection.
        const CAP: usize = libc::PATH_MAX as usize + 1;
        let mut raw = [std::mem::MaybeUninit::<u8>::uninit(); CAP];
        // SAFETY: valid directory fd, NUL-terminated name, a buffer of CAP writable
        // bytes.
        let n = unsafe {
            libc::readlinkat(
                self.0.as_raw_fd(),
                name.as_ptr(),
                raw.as_mut_ptr().cast(),
                CAP,
            )
        };
        let n = usize::try_from(n).map_err(|_| io::Error::last_os_error())?;
        if n >= CAP {
            return Err(io::Error::from_raw_os_error(libc::ENAMETOOLONG));
        }
        // SAFETY: readlinkat wrote the first n bytes (n < CAP).
        let buf = unsafe { std::slice::from_raw_parts(raw.as_ptr().cast::<u8>(), n) }.to_vec();
        Ok(std::ffi::OsString::from_vec(buf).into())
    }
}

/// Open the cgroup v2 directory whose id (its kernfs node id, what
/// `bpf_get_current_cgroup_id` returns) is `id`, through a file handle on the cgroup2
/// mount `mount` (`open_by_handle_at` with a `FILEID_KERNFS` handle, as systemd does).
/// Needs `CAP_DAC_READ_SEARCH`.
///
/// # Errors
/// `ESTALE` when no cgroup has that id (any more), `EPERM` without the capability.
pub fn open_cgroup_by_id(
    mount: &impl std::os::fd::AsRawFd,
    id: u64,
) -> io::Result<std::os::fd::OwnedFd> {
    /// `struct file_handle` with its 8 bytes of `f_handle`: the kernfs id.
    #[repr(C)]
    struct CgroupHandle {
        handle_bytes: u32,
        handle_type: i32,
        id: u64,
    }
    const FILEID_KERNFS: i32 = 0xfe;
    let mut h = CgroupHandle {
        handle_bytes: 8,
        handle_type: FILEID_KERNFS,
        id,
    };
    // SAFETY: a `struct file_handle` followed by `handle_bytes` bytes, valid for the
    // call; the returned fd is owned below.
    let fd = unsafe {
        libc::open_by_handle_at(
            mount.as_raw_fd(),
            (&raw mut h).cast::<libc::file_handle>(),
            libc::O_RDONLY | libc::O_DIRECTORY | libc::O_CLOEXEC,
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: a new fd nobody else owns.
    Ok(unsafe { <std::os::fd::OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fd) })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read as _, Write as _};

    #[test]
    fn sock_diag_reads_one_socket_by_its_cookie() {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let mut c = std::net::TcpStream::connect(l.local_addr().unwrap()).unwrap();
        let (mut s, _) = l.accept().unwrap();
        let cookie = sockopt_u64(&c, libc::SO_COOKIE).unwrap();
        let (local, remote) = (c.local_addr().unwrap(), c.peer_addr().unwrap());
        let mem = tcp_sock_mem(local, remote, cookie).unwrap().unwrap();
        assert_eq!(mem.rmem_alloc, 0);
        assert!(mem.rcvbuf > 0);
        s.write_all(&[7u8; 1000]).unwrap();
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        while tcp_sock_mem(local, remote, cookie)
            .unwrap()
            .unwrap()
            .rmem_alloc
            == 0
        {
            assert!(std::time::Instant::now() < deadline, "data never queued");
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
        let mut buf = [0u8; 1000];
        c.read_exact(&mut buf).unwrap();
        assert_eq!(
            tcp_sock_mem(local, remote, cookie)
                .unwrap()
                .unwrap()
                .rmem_alloc,
            0
        );
        // Another cookie on the same 4-tuple is not this socket; nor is another 4-tuple.
        assert_eq!(tcp_sock_mem(local, remote, cookie ^ 1).unwrap(), None);
        assert_eq!(tcp_sock_mem(remote, local, cookie).unwrap(), None);
        // An IPv4-mapped view of the same addresses finds it too.
        let mapped = |a: std::net::SocketAddr| match a.ip() {
            std::net::IpAddr::V4(v) => {
                std::net::SocketAddr::new(v.to_ipv6_mapped().into(), a.port())
            }
            std::net::IpAddr::V6(_) => a,
        };
        assert!(
            tcp_sock_mem(mapped(local), mapped(remote), cookie)
                .unwrap()
                .is_some()
        );
    }

    #[test]
    fn sock_diag_finds_a_dual_stack_socket_talking_ipv4() {
        // An AF_INET6 app socket dialing an IPv4 listener through a mapped address, seen
        // from the accepted IPv4 socket, as the daemon sees it.
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = l.local_addr().unwrap().port();
        let app = std::net::TcpStream::connect(("::ffff:127.0.0.1", port)).unwrap();
        assert!(app.local_addr().unwrap().is_ipv6());
        let (ours, _) = l.accept().unwrap();
        let cookie = sockopt_u64(&app, libc::SO_COOKIE).unwrap();
        let found = tcp_sock_mem(
            ours.peer_addr().unwrap(),
            ours.local_addr().unwrap(),
            cookie,
        );
        assert!(found.unwrap().is_some());
    }

    #[test]
    fn sock_diag_answers_that_cannot_be_read_are_errors() {
        assert!(parse_sock_mem(&[]).is_err());
        assert!(parse_sock_mem(&[0u8; 8]).is_err());
    }
}

/// `enum bpf_attach_type` values of the cgroup hooks the programs use.
pub mod attach_type {
    pub const CGROUP_SOCK_OPS: u32 = 3;
    pub const CGROUP_INET4_CONNECT: u32 = 10;
    pub const CGROUP_INET6_CONNECT: u32 = 11;
    pub const CGROUP_INET4_GETPEERNAME: u32 = 29;
    pub const CGROUP_INET6_GETPEERNAME: u32 = 30;
}

/// Attach program `prog` to cgroup `cgroup` at `attach_type` with a BPF link
/// (`BPF_LINK_CREATE`, kernel >= 5.7): the attachment lives as long as some descriptor
/// of the returned link does, in this process or another one it was passed to (the
/// service manager's descriptor store, see `fdstore`). Cgroup links always share the
/// hook with other programs (multi-attach).
///
/// # Errors
/// The `bpf(2)` error.
pub fn bpf_link_create(
    prog: std::os::fd::BorrowedFd<'_>,
    cgroup: std::os::fd::BorrowedFd<'_>,
    attach_type: u32,
) -> io::Result<std::os::fd::OwnedFd> {
    use std::os::fd::FromRawFd as _;
    const BPF_LINK_CREATE: libc::c_long = 28;
    /// `union bpf_attr`'s `link_create` member, up to its flags (the rest zero).
    #[repr(C)]
    struct Attr {
        prog_fd: u32,
        target_fd: u32,
        attach_type: u32,
        flags: u32,
        _rest: [u64; 4],
    }
    let mut attr = Attr {
        prog_fd: attr_fd(prog)?,
        target_fd: attr_fd(cgroup)?,
        attach_type,
        flags: 0,
        _rest: [0; 4],
    };
    // SAFETY: no pointers in attr.
    let r = unsafe { sys_bpf(BPF_LINK_CREATE, &mut attr) }?;
    let raw = i32::try_from(r).map_err(|_| io::Error::from(io::ErrorKind::InvalidData))?;
    // SAFETY: the kernel returned a new descriptor that nothing else owns.
    Ok(unsafe { std::os::fd::OwnedFd::from_raw_fd(raw) })
}

/// Send one datagram carrying `fds` (`SCM_RIGHTS`, at most 253) to `addr`.
///
/// # Errors
/// The `sendmsg` error.
pub fn send_with_fds(
    sock: &std::os::unix::net::UnixDatagram,
    addr: &std::os::unix::net::SocketAddr,
    message: &[u8],
    fds: &[std::os::fd::BorrowedFd<'_>],
) -> io::Result<()> {
    use std::os::fd::AsRawFd;
    // The connected form: the address is set once with connect, then sendmsg without one.
    sock.connect_addr(addr)?;
    let raw: Vec<i32> = fds.iter().map(AsRawFd::as_raw_fd).collect();
    let payload = std::mem::size_of_val(raw.as_slice());
    // SAFETY: CMSG_SPACE is a pure computation.
    let space = unsafe { libc::CMSG_SPACE(payload as u32) } as usize;
    let mut control = vec![0u64; space.div_ceil(8).max(1)];
    let mut iov = libc::iovec {
        iov_base: message.as_ptr() as *mut libc::c_void,
        iov_len: message.len(),
    };
    // SAFETY: an all-zero msghdr is valid; the fields are set below.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &raw mut iov;
    msg.msg_iovlen = 1;
    if !raw.is_empty() {
        msg.msg_control = control.as_mut_ptr().cast();
        msg.msg_controllen = space as _;
        // SAFETY: the control buffer holds CMSG_SPACE(payload) bytes, so the first header
        // and its data fit; the descriptors are copied into it.
        unsafe {
            let c = libc::CMSG_FIRSTHDR(&raw const msg);
            (*c).cmsg_level = libc::SOL_SOCKET;
            (*c).cmsg_type = libc::SCM_RIGHTS;
            (*c).cmsg_len = libc::CMSG_LEN(payload as u32) as _;
            std::ptr::copy_nonoverlapping(raw.as_ptr(), libc::CMSG_DATA(c).cast(), raw.len());
        }
    }
    // SAFETY: msg and everything it points to outlive the call.
    let n = unsafe { libc::sendmsg(sock.as_raw_fd(), &raw const msg, libc::MSG_NOSIGNAL) };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    if n as usize == message.len() {
        Ok(())
    } else {
        Err(io::Error::new(io::ErrorKind::WriteZero, "short datagram"))
    }
}

/// Own descriptor number `raw`, passed to this process at exec (socket activation),
/// made close-on-exec; `None` when it is not open. The caller guarantees that nothing
/// else in the process owns the number (it is taken once, at start).
#[must_use]
pub fn take_inherited_fd(raw: i32) -> Option<std::os::fd::OwnedFd> {
    use std::os::fd::FromRawFd as _;
    // SAFETY: F_GETFD on a number: fails with EBADF when it is not open.
    if raw < 3 || unsafe { libc::fcntl(raw, libc::F_GETFD) } < 0 {
        return None;
    }
    // SAFETY: open (checked above), and owned by nobody else (the caller's guarantee).
    let fd = unsafe { std::os::fd::OwnedFd::from_raw_fd(raw) };
    // SAFETY: setting a flag on a descriptor this function owns.
    unsafe { libc::fcntl(raw, libc::F_SETFD, libc::FD_CLOEXEC) };
    Some(fd)
}
