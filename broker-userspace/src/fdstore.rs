//! Restart and upgrade without a failed connect: the service manager holds the
//! listeners and the kernel attachments while the daemon is replaced.
//!
//! Under systemd (`Type=notify`, `FileDescriptorStoreMax=` in the unit, which sets
//! `$FDSTORE`), `broker run` gives the service manager's descriptor store
//! (`sd_notify` `FDSTORE=1`, `sd_pid_notify_with_fds(3)`) a copy of
//!
//! * [`TRANSPARENT`]: the transparent listeners (`127.0.0.1:P`, `[::1]:P`);
//! * [`LISTEN`]: its TCP `listenOn` listeners;
//! * [`LINKS`]: the BPF links that attach its programs to the cgroup;
//! * [`RECORDS`]: the map where sock_ops writes the redirect records.
//!
//! While the daemon restarts (`systemctl restart`, a new binary, a crash with
//! `Restart=`), the service manager's copies keep the programs attached and the
//! listeners open: connects are still redirected, and the kernel completes them into the
//! listener's backlog. The next process receives the descriptors at start (`LISTEN_FDS`,
//! `LISTEN_FDNAMES`, as socket activation passes them: [`Inherited`]), adopts the
//! listeners instead of binding, attaches its own programs, lets the previous links go
//! ([`replace`] removes them from the store, see `ebpf::Previous`), and serves the queued
//! connections with the records the previous programs wrote. On `systemctl stop` the
//! service manager empties the store once the process has exited: the links close (the
//! programs detach) and the listeners close.
//!
//! Without `$NOTIFY_SOCKET`, or with `FDSTORE=0`, nothing is stored and a restart has a
//! gap (connects refused while no process listens). A listener passed by socket
//! activation (a `.socket` unit) is adopted by its address like a stored one.

use std::{
    net::{SocketAddr, TcpListener},
    os::fd::{AsFd as _, BorrowedFd, OwnedFd},
};

/// The transparent listeners.
pub const TRANSPARENT: &str = "broker-transparent";
/// The TCP `listenOn` listeners (adopted by their address).
pub const LISTEN: &str = "broker-listen";
/// The cgroup links of the kernel programs.
pub const LINKS: &str = "broker-link";
/// The redirect-record map.
pub const RECORDS: &str = "broker-records";

/// The first descriptor socket activation passes (`SD_LISTEN_FDS_START`).
const FIRST_FD: i32 = 3;
/// Descriptors per datagram (the kernel's `SCM_MAX_FD`).
const PER_MESSAGE: usize = 253;
/// What is assumed a store holds when the service manager does not say (`$FDSTORE` is
/// set by systemd >= 254; our unit asks for this many).
const DEFAULT_CAPACITY: usize = 64;

/// Descriptors the service manager passed at start, with their names.
#[derive(Debug, Default)]
pub struct Inherited {
    fds: Vec<(String, OwnedFd)>,
}

impl Inherited {
    /// The descriptors `$LISTEN_FDS` announces for this process (`$LISTEN_PID` must be
    /// ours), named by `$LISTEN_FDNAMES`. They are made close-on-exec. Call before
    /// anything closes descriptors it does not own.
    #[must_use]
    pub fn from_env() -> Self {
        let var = |k: &str| std::env::var(k).ok();
        let Some((n, names)) = parse(
            var("LISTEN_PID").as_deref(),
            var("LISTEN_FDS").as_deref(),
            var("LISTEN_FDNAMES").as_deref(),
            std::process::id(),
        ) else {
            return Self::default();
        };
        let mut fds = Vec::with_capacity(n);
        for (i, name) in names.into_iter().enumerate() {
            // The service manager passed these numbers to this process (pid checked),
            // and they are taken once (`StartOptions::handover`, `broker run` only).
            if let Some(fd) = crate::sys::take_inherited_fd(FIRST_FD + i as i32) {
                fds.push((name, fd));
            }
        }
        if !fds.is_empty() {
            let listening: Vec<String> = fds
                .iter()
                .filter_map(|(_, fd)| listening_tcp(fd.as_fd()))
                .map(|a| a.to_string())
                .collect();
            tracing::info!(
                descriptors = fds.len(),
                names = %list(&fds),
                listening = %listening.join(","),
                "descriptors passed by the service manager"
            );
        }
        Self { fds }
    }

    /// Every descriptor named `name`.
    pub fn take(&mut self, name: &str) -> Vec<OwnedFd> {
        let (taken, kept) = std::mem::take(&mut self.fds)
            .into_iter()
            .partition(|(n, _)| n == name);
        self.fds = kept;
        taken.into_iter().map(|(_, fd)| fd).collect()
    }

    /// The listening TCP socket bound to `addr`, whatever its name (ours, or a socket
    /// unit's).
    pub fn take_listener(&mut self, addr: SocketAddr) -> Option<TcpListener> {
        let i = self.fds.iter().position(|(name, fd)| {
            name != LINKS && name != RECORDS && listening_tcp(fd.as_fd()) == Some(addr)
        })?;
        Some(TcpListener::from(self.fds.swap_remove(i).1))
    }

    /// The transparent listeners a previous process stored (listening TCP sockets only).
    pub fn take_transparent(&mut self) -> Vec<TcpListener> {
        self.take(TRANSPARENT)
            .into_iter()
            .filter(|fd| listening_tcp(fd.as_fd()).is_some())
            .map(TcpListener::from)
            .collect()
    }

    /// Close what nobody took, saying what it was.
    pub fn finish(self) {
        if !self.fds.is_empty() {
            tracing::info!(
                names = %list(&self.fds),
                "closing passed descriptors this configuration does not use"
            );
        }
    }
}

fn list(fds: &[(String, OwnedFd)]) -> String {
    let mut names: Vec<&str> = fds.iter().map(|(n, _)| n.as_str()).collect();
    names.dedup();
    names.join(",")
}

/// How many descriptors `$LISTEN_FDS` passes to process `own_pid`, and their names
/// (`unknown` where `$LISTEN_FDNAMES` gives none), or `None` when they are not for it.
fn parse(
    pid: Option<&str>,
    fds: Option<&str>,
    names: Option<&str>,
    own_pid: u32,
) -> Option<(usize, Vec<String>)> {
    if pid?.trim().parse::<u32>().ok()? != own_pid {
        return None;
    }
    // Bounded: never more than the descriptor table could hold.
    let n = fds?.trim().parse::<usize>().ok()?.min(65_536);
    let mut given = names.unwrap_or("").split(':').map(str::to_owned);
    Some((
        n,
        (0..n)
            .map(|_| given.next().unwrap_or_else(|| "unknown".to_owned()))
            .collect(),
    ))
}

/// The address a listening TCP socket is bound to (`None` for anything else).
fn listening_tcp(fd: BorrowedFd<'_>) -> Option<SocketAddr> {
    let s = socket2::SockRef::from(&fd);
    if s.r#type().ok()? != socket2::Type::STREAM || !s.is_listener().ok()? {
        return None;
    }
    s.local_addr().ok()?.as_socket()
}

/// Whether to hand descriptors to the service manager: it is one (`$NOTIFY_SOCKET`)
/// and has a store (`$FDSTORE`, systemd >= 254, not 0; assumed when unset).
#[must_use]
pub fn enabled() -> bool {
    std::env::var_os(crate::notify::NOTIFY_SOCKET).is_some() && capacity() > 0
}

/// How many descriptors the store takes.
#[must_use]
pub fn capacity() -> usize {
    std::env::var("FDSTORE")
        .ok()
        .map_or(DEFAULT_CAPACITY, |v| v.trim().parse().unwrap_or(0))
}

/// Make the store hold `fds` under `name`, instead of what it held under that name.
/// Messages go in order: the removal is done before the new ones arrive. A failure is
/// logged once per call (a restart will have a gap) and never stops the daemon.
pub fn replace(name: &str, fds: &[BorrowedFd<'_>]) {
    let result = (|| {
        crate::notify::send_fds(&format!("FDSTOREREMOVE=1\nFDNAME={name}\n"), &[])?;
        for chunk in fds.chunks(PER_MESSAGE) {
            crate::notify::send_fds(&format!("FDSTORE=1\nFDNAME={name}\nFDPOLL=0\n"), chunk)?;
        }
        std::io::Result::Ok(())
    })();
    if let Err(e) = result {
        tracing::warn!(error = %e, name, "cannot hand descriptors to the service manager: a restart will refuse connects for a moment");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn listen_fds_for_this_process_only() {
        assert_eq!(parse(Some("7"), Some("2"), Some("a:b"), 8), None);
        assert_eq!(parse(None, Some("2"), None, 8), None);
        assert_eq!(parse(Some("x"), Some("2"), None, 8), None);
        assert_eq!(
            parse(Some("8"), Some("3"), Some("a:b"), 8),
            Some((3, vec!["a".into(), "b".into(), "unknown".into()]))
        );
        assert_eq!(parse(Some("8"), Some("0"), None, 8), Some((0, vec![])));
        assert_eq!(parse(Some("8"), Some("-1"), None, 8), None);
    }

    #[test]
    fn listeners_are_adopted_by_address_and_kind() {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        let connected = std::net::TcpStream::connect(addr).unwrap();
        let udp = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let mut inh = Inherited {
            fds: vec![
                (LINKS.into(), OwnedFd::from(udp.try_clone().unwrap())),
                ("unknown".into(), OwnedFd::from(connected)),
                ("web.socket".into(), OwnedFd::from(l)),
            ],
        };
        assert!(
            inh.take_listener(udp.local_addr().unwrap()).is_none(),
            "not a TCP listener"
        );
        let got = inh.take_listener(addr).expect("the listener, by address");
        assert_eq!(got.local_addr().unwrap(), addr);
        assert!(inh.take_listener(addr).is_none());
        assert_eq!(inh.take(LINKS).len(), 1);
        assert!(inh.take_transparent().is_empty());
        assert_eq!(inh.fds.len(), 1, "the connected socket is left");
    }
}
