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
