//! Who is at the other end of a connection ([`Caller`]), completed at accept time from
//! `/proc/PID`: the process's command name, its executable and its cgroup's path.
//!
//! * An intercepted connection's record (pid, uid, gid, cgroup id, thread name) was
//!   written by the kernel at `connect()`. What `/proc/PID` says is used only if that
//!   process is still in the recorded cgroup: otherwise the pid no longer names the
//!   caller (it exited and the pid was reused, or it moved), or it never did from here
//!   (the record's pid is the initial pid namespace's, and a daemon in a container with
//!   a private pid namespace would read some other process). Then `comm` is the
//!   thread's from the record, `exe` is unknown, and the cgroup's path is looked up by
//!   its id ([`cgroup::path_of_id`]).
//! * A Unix socket client's `SO_PEERCRED` pid is already in our pid namespace (0 when
//!   the client is not visible from it).
//!
//! Each process is read through one open `/proc/PID` directory ([`ProcDir`]), so every
//! fact comes from the same process even if the pid is reused meanwhile. Cost: five
//! or six system calls per connection, no cache (a cgroup can be renamed, a pid reused).

use broker_common::ConnRecord;

use crate::{cgroup, connector::Caller, sys::ProcDir};

/// The longest `comm` the kernel keeps (`TASK_COMM_LEN` less the NUL).
const COMM_MAX: u64 = 64;

/// The caller of an intercepted connection, from its redirect record and `/proc`.
#[must_use]
pub fn from_record(rec: &ConnRecord) -> Caller {
    let thread = comm_text(&rec.comm);
    let proc = ProcDir::open(rec.pid).ok();
    // Read before the check, so the check covers them (same open directory).
    let exe = proc.as_ref().and_then(|p| p.readlink(c"exe").ok());
    let comm = proc.as_ref().and_then(comm_of);
    let seen = proc.as_ref().and_then(cgroup::of_process);
    let (comm, exe, cgroup) = match seen {
        Some((id, path)) if id == rec.cgroup_id => {
            (comm.unwrap_or_else(|| thread.clone()), exe, Some(path))
        }
        _ => (thread.clone(), None, cgroup::path_of_id(rec.cgroup_id)),
    };
    Caller {
        pid: rec.pid,
        uid: rec.uid,
        gid: rec.gid,
        cgroup_id: rec.cgroup_id,
        cgroup,
        exe,
        comm,
        thread,
    }
}

/// The caller of a Unix socket client, from its `SO_PEERCRED` (pid 0: not visible from
/// our pid namespace, so nothing more is known).
#[must_use]
pub fn from_peer(pid: u32, uid: u32, gid: u32) -> Caller {
    let proc = (pid != 0).then(|| ProcDir::open(pid).ok()).flatten();
    let seen = proc.as_ref().and_then(cgroup::of_process);
    Caller {
        pid,
        uid,
        gid,
        cgroup_id: seen.as_ref().map_or(0, |(id, _)| *id),
        cgroup: seen.map(|(_, path)| path),
        exe: proc.as_ref().and_then(|p| p.readlink(c"exe").ok()),
        comm: proc.as_ref().and_then(comm_of).unwrap_or_default(),
        thread: String::new(),
    }
}

/// The process's command name (its main thread's).
fn comm_of(proc: &ProcDir) -> Option<String> {
    let raw = proc.read(c"comm", COMM_MAX).ok()?;
    let text = String::from_utf8_lossy(&raw);
    Some(text.trim_end_matches('\n').to_owned())
}

/// A kernel `comm` (NUL padded) as text.
pub(crate) fn comm_text(comm: &[u8; 16]) -> String {
    let end = comm.iter().position(|&b| b == 0).unwrap_or(comm.len());
    String::from_utf8_lossy(&comm[..end]).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(pid: u32, cgroup_id: u64) -> ConnRecord {
        let mut comm = [0u8; 16];
        comm[..6].copy_from_slice(b"worker");
        ConnRecord {
            cgroup_id,
            connect_ns: 0,
            cookie: 0,
            netns_cookie: 0,
            orig_addr: [0; 16],
            comm,
            orig_port: 0,
            family: 0,
            service_id: 0,
            pid,
            uid: 1,
            gid: 2,
            flags: 0,
            generation: 0,
            _pad: 0,
        }
    }

    #[test]
    fn a_record_of_this_process_gets_its_exe_comm_and_cgroup() {
        let me = std::process::id();
        let Some(id) = cgroup::cgroup_id_of(me) else {
            return; // no cgroup v2 here
        };
        let c = from_record(&record(me, id));
        assert_eq!(c.exe, std::env::current_exe().ok());
        assert_eq!(c.thread, "worker");
        assert!(!c.comm.is_empty());
        let proc = ProcDir::open(me).unwrap();
        assert_eq!(c.cgroup, cgroup::of_process(&proc).map(|(_, p)| p));
        assert_eq!((c.pid, c.uid, c.gid, c.cgroup_id), (me, 1, 2, id));
    }

    #[test]
    fn a_pid_that_is_not_in_the_recorded_cgroup_is_not_read() {
        // A cgroup id no process has: the pid does not name the caller.
        let c = from_record(&record(std::process::id(), u64::MAX));
        assert_eq!(c.exe, None);
        assert_eq!(c.comm, "worker", "the thread's name from the record");
        assert_eq!(c.cgroup, None);
        // A process that does not exist.
        let c = from_record(&record(u32::MAX - 1, 1));
        assert_eq!((c.exe, c.comm.as_str()), (None, "worker"));
    }

    #[test]
    fn a_unix_peer_is_read_from_its_pid() {
        let me = std::process::id();
        let c = from_peer(me, 0, 0);
        assert_eq!(c.exe, std::env::current_exe().ok());
        assert_eq!(c.cgroup_id, cgroup::cgroup_id_of(me).unwrap_or(0));
        let c = from_peer(0, 5, 6);
        assert_eq!((c.exe, c.cgroup, c.cgroup_id), (None, None, 0));
        assert!(c.comm.is_empty());
    }
}
