//! The service manager's readiness protocol (`sd_notify(3)`, systemd `Type=notify`): one
//! datagram of `KEY=VALUE` lines per state change, sent to the socket `$NOTIFY_SOCKET`
//! names: a path, or an abstract socket name written with a leading `@`. (The
//! `sd-notify` crate was the first choice; it takes `@name` for a path, so it cannot
//! reach an abstract socket.)
//!
//! `broker run` sends `READY=1` once [`Daemon::start`](crate::app::Daemon::start) has
//! returned, which is when `/ready` answers 200 (every listener bound, the programs
//! attached); `STOPPING=1` when the drain begins; `STATUS=` lines on the way. Without
//! `$NOTIFY_SOCKET` (not started by systemd) nothing is sent. A failed send is logged
//! once and never stops the daemon.

use std::{
    ffi::OsStr,
    io,
    os::unix::{
        ffi::OsStrExt as _,
        net::{SocketAddr, UnixDatagram},
    },
    sync::atomic::{AtomicBool, Ordering},
};

/// The variable that names the service manager's socket.
pub const NOTIFY_SOCKET: &str = "NOTIFY_SOCKET";

/// Every listener is bound and the programs are attached (`/ready` is 200).
pub fn ready(status: &str) {
    send(&format!("READY=1\nSTATUS={}\n", one_line(status)));
}

/// A reload has begun (systemd >= 253, `Type=notify-reload` or `ExecReload`, expects
/// `RELOADING=1` with the monotonic time, then `READY=1` when it is done).
pub fn reloading(status: &str) {
    let now = crate::sys::monotonic_ns() / 1000;
    send(&format!(
        "RELOADING=1\nMONOTONIC_USEC={now}\nSTATUS={}\n",
        one_line(status)
    ));
}

/// The drain has begun (`/ready` is 503).
pub fn stopping(status: &str) {
    send(&format!("STOPPING=1\nSTATUS={}\n", one_line(status)));
}

/// A one-line status for `systemctl status`.
pub fn status(status: &str) {
    send(&format!("STATUS={}\n", one_line(status)));
}

/// A status is one line: a newline would start another assignment.
fn one_line(s: &str) -> String {
    s.replace(['\n', '\r'], " ")
}

fn send(message: &str) {
    static WARNED: AtomicBool = AtomicBool::new(false);
    let Some(target) = std::env::var_os(NOTIFY_SOCKET) else {
        return;
    };
    if let Err(e) = send_to(&target, message.as_bytes())
        && !WARNED.swap(true, Ordering::Relaxed)
    {
        tracing::warn!(error = %e, "cannot notify the service manager ($NOTIFY_SOCKET)");
    }
}

/// Send `message` with `fds` attached (the descriptor store, see `fdstore`).
///
/// # Errors
/// No `$NOTIFY_SOCKET`, or the send failure.
pub fn send_fds(message: &str, fds: &[std::os::fd::BorrowedFd<'_>]) -> io::Result<()> {
    let target = std::env::var_os(NOTIFY_SOCKET)
        .ok_or_else(|| io::Error::new(io::ErrorKind::NotFound, "no $NOTIFY_SOCKET"))?;
    let addr = address(&target)?;
    let sock = UnixDatagram::unbound()?;
    sock.set_write_timeout(Some(std::time::Duration::from_secs(1)))?;
    crate::sys::send_with_fds(&sock, &addr, message.as_bytes(), fds)
}

/// The address `$NOTIFY_SOCKET` names.
fn address(target: &OsStr) -> io::Result<SocketAddr> {
    let bytes = target.as_bytes();
    match bytes.first() {
        Some(b'@') => {
            use std::os::linux::net::SocketAddrExt as _;
            SocketAddr::from_abstract_name(&bytes[1..])
        }
        Some(b'/') => SocketAddr::from_pathname(target),
        _ => Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "NOTIFY_SOCKET is neither an absolute path nor an abstract name (@NAME)",
        )),
    }
}

fn send_to(target: &OsStr, message: &[u8]) -> io::Result<()> {
    let addr = address(target)?;
    let sock = UnixDatagram::unbound()?;
    // The service manager reads at once; never let a stuck one hold the daemon.
    sock.set_write_timeout(Some(std::time::Duration::from_secs(1)))?;
    let n = sock.send_to_addr(message, &addr)?;
    if n == message.len() {
        Ok(())
    } else {
        Err(io::Error::new(io::ErrorKind::WriteZero, "short datagram"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_and_abstract_names() {
        use std::os::linux::net::SocketAddrExt as _;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("notify");
        let rx = UnixDatagram::bind(&path).unwrap();
        send_to(path.as_os_str(), b"READY=1\n").unwrap();
        let mut buf = [0u8; 64];
        let n = rx.recv(&mut buf).unwrap();
        assert_eq!(&buf[..n], b"READY=1\n");

        let name = format!("broker-notify-unit-{}", std::process::id());
        let rx = UnixDatagram::bind_addr(&SocketAddr::from_abstract_name(name.as_bytes()).unwrap())
            .unwrap();
        send_to(OsStr::new(&format!("@{name}")), b"STOPPING=1\n").unwrap();
        let n = rx.recv(&mut buf).unwrap();
        assert_eq!(&buf[..n], b"STOPPING=1\n");

        assert!(send_to(OsStr::new("relative/path"), b"x").is_err());
        assert!(send_to(OsStr::new(""), b"x").is_err());
        assert_eq!(one_line("a\nb\rc"), "a b c");
    }
}
