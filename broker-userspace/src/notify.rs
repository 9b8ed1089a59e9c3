//! The service manager's readiness protocol (`sd_notify`, systemd `Type=notify`): one
//! datagram per state change to the socket named by `$NOTIFY_SOCKET` (a path, or an
//! abstract name starting with `@`), through the `sd-notify` crate.
//!
//! `broker run` sends `READY=1` once [`Daemon::start`](crate::app::Daemon::start) has
//! returned, which is when `/ready` answers 200 (every listener bound, the programs
//! attached); `STOPPING=1` when the drain begins; `STATUS=` lines on the way. Without
//! `$NOTIFY_SOCKET` (not started by systemd) nothing is sent. A failed send is logged
//! once and never stops the daemon.

use std::sync::atomic::{AtomicBool, Ordering};

use sd_notify::NotifyState;

/// The variable that names the service manager's socket.
pub const NOTIFY_SOCKET: &str = "NOTIFY_SOCKET";

/// Every listener is bound and the programs are attached (`/ready` is 200).
pub fn ready(status: &str) {
    send(&[NotifyState::Ready, NotifyState::Status(status)]);
}

/// The drain has begun (`/ready` is 503).
pub fn stopping(status: &str) {
    send(&[NotifyState::Stopping, NotifyState::Status(status)]);
}

/// A one-line status for `systemctl status`.
pub fn status(status: &str) {
    send(&[NotifyState::Status(status)]);
}

fn send(states: &[NotifyState<'_>]) {
    static WARNED: AtomicBool = AtomicBool::new(false);
    if let Err(e) = sd_notify::notify(states)
        && !WARNED.swap(true, Ordering::Relaxed)
    {
        tracing::warn!(error = %e, "cannot notify the service manager ($NOTIFY_SOCKET)");
    }
}
