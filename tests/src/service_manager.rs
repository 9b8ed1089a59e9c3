//! A service manager for tests: systemd's notification protocol and its file
//! descriptor store, as `sd_notify(3)`, `sd_listen_fds(3)` and `systemd.service(5)`
//! document them (no systemd runs as PID 1 in CI):
//!
//! * `$NOTIFY_SOCKET` names a datagram socket; the service sends `KEY=VALUE` lines, one
//!   datagram per notification, descriptors attached with `SCM_RIGHTS`;
//! * `FDSTORE=1` stores the attached descriptors under `FDNAME=` (default `stored`);
//!   `FDSTOREREMOVE=1` closes and removes every descriptor named `FDNAME=`; `FDPOLL=0`
//!   (no polling) is accepted and is what this store does anyway;
//! * `$FDSTORE` tells the service the store's capacity (systemd >= 254);
//! * every start passes the stored descriptors from 3 up, with `LISTEN_FDS`,
//!   `LISTEN_FDNAMES` (colon-separated) and `LISTEN_PID` (the service's own pid);
//! * a restart (stop, then start) keeps the store; a stop empties it once the service
//!   has exited (`FileDescriptorStorePreserve=restart`, the default).
//!
//! Left out: `NotifyAccess=` (only the service writes here), polling stored descriptors
//! for hang-ups, and refusing more than the capacity (the tests stay under it).

use std::{
    os::{
        fd::{AsRawFd as _, FromRawFd as _, OwnedFd},
        unix::net::UnixDatagram,
    },
    path::{Path, PathBuf},
    process::{Child, Command},
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

/// The store's capacity, as `$FDSTORE`.
pub const CAPACITY: usize = 64;

type Store = Arc<Mutex<Vec<(String, OwnedFd)>>>;

/// One service under this manager: its command line, its store, its current process.
pub struct ServiceManager {
    dir: tempfile::TempDir,
    store: Store,
    messages: Arc<Mutex<Vec<String>>>,
    done: Arc<AtomicBool>,
    reader: Option<std::thread::JoinHandle<()>>,
    /// The running process, if any.
    pub child: Option<Child>,
    /// Where the service's stdout and stderr go (appended across starts).
    pub log: PathBuf,
}

impl ServiceManager {
    /// A manager with an empty store, listening on its notification socket.
    #[must_use]
    pub fn new() -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        let sock = UnixDatagram::bind(dir.path().join("notify")).expect("bind notify socket");
        sock.set_read_timeout(Some(Duration::from_millis(100)))
            .expect("read timeout");
        let store: Store = Arc::default();
        let messages = Arc::new(Mutex::new(Vec::new()));
        let done = Arc::new(AtomicBool::new(false));
        let reader = {
            let (store, messages, done) = (store.clone(), messages.clone(), done.clone());
            std::thread::spawn(move || {
                while !done.load(Ordering::Relaxed) {
                    if let Some((text, fds)) = receive(&sock) {
                        apply(&store, &text, fds);
                        messages.lock().unwrap().push(text);
                    }
                }
            })
        };
        let log = dir.path().join("service.log");
        Self {
            dir,
            store,
            messages,
            done,
            reader: Some(reader),
            child: None,
            log,
        }
    }

    /// The names in the store, one per descriptor.
    #[must_use]
    pub fn stored(&self) -> Vec<String> {
        self.store
            .lock()
            .unwrap()
            .iter()
            .map(|(n, _)| n.clone())
            .collect()
    }

    /// Every notification received so far.
    #[must_use]
    pub fn messages(&self) -> Vec<String> {
        self.messages.lock().unwrap().clone()
    }

    /// The service's output so far.
    #[must_use]
    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Start `program args...` with the stored descriptors passed from 3 up.
    ///
    /// # Panics
    /// When it cannot be spawned, or one is running already.
    pub fn start(&mut self, program: &Path, args: &[&str]) {
        assert!(self.child.is_none(), "the service is running");
        let store = self.store.lock().unwrap();
        // Copies far above 3 (so moving them to 3.. cannot overwrite one), inherited by
        // a small program that moves them into place and execs the service with its own
        // pid in LISTEN_PID.
        let high: Vec<OwnedFd> = store
            .iter()
            .enumerate()
            .map(|(i, (_, fd))| {
                // SAFETY: F_DUPFD on a descriptor we own; the result is a new one we own.
                let raw = unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_DUPFD, 1000 + i as i32) };
                assert!(raw >= 0, "dup: {}", std::io::Error::last_os_error());
                // SAFETY: a descriptor just created, owned by nobody else.
                unsafe { OwnedFd::from_raw_fd(raw) }
            })
            .collect();
        let numbers: Vec<String> = high.iter().map(|fd| fd.as_raw_fd().to_string()).collect();
        let names: Vec<&str> = store.iter().map(|(n, _)| n.as_str()).collect();
        let out = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .expect("open the service log");
        // (bash loses descriptors above 9 moved with `exec`: python moves them.)
        let mut cmd = Command::new("python3");
        cmd.arg("-c")
            .arg(
                "import os, sys\n\
                 high = [int(n) for n in sys.argv[1].split(',') if n]\n\
                 for i, fd in enumerate(high):\n    os.dup2(fd, 3 + i)\n\
                 for fd in high:\n    os.close(fd)\n\
                 os.environ['LISTEN_PID'] = str(os.getpid())\n\
                 os.execv(sys.argv[2], sys.argv[2:])\n",
            )
            .arg(numbers.join(","))
            .arg(program)
            .args(args)
            .env("NOTIFY_SOCKET", self.dir.path().join("notify"))
            .env("FDSTORE", CAPACITY.to_string())
            .stdout(out.try_clone().expect("dup log"))
            .stderr(out);
        if store.is_empty() {
            cmd.env_remove("LISTEN_FDS").env_remove("LISTEN_FDNAMES");
        } else {
            cmd.env("LISTEN_FDS", store.len().to_string())
                .env("LISTEN_FDNAMES", names.join(":"));
        }
        drop(store);
        self.child = Some(cmd.spawn().expect("start the service"));
        drop(high);
    }

    /// SIGTERM the service and wait (bounded) for it to exit.
    ///
    /// # Panics
    /// When it does not exit within `timeout`.
    pub fn terminate(&mut self, timeout: Duration) -> std::process::ExitStatus {
        let mut child = self.child.take().expect("a running service");
        // SAFETY: kill with a pid we own.
        unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(st) = child.try_wait().expect("try_wait") {
                return st;
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                panic!("the service did not exit on SIGTERM:\n{}", self.log_text());
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// `systemctl restart`: stop (the store is kept), then start again.
    pub fn restart(&mut self, program: &Path, args: &[&str]) {
        let st = self.terminate(Duration::from_secs(30));
        assert!(st.success(), "exit status {st}:\n{}", self.log_text());
        // Notifications the old process sent before it exited are applied first.
        self.settle();
        self.start(program, args);
    }

    /// `systemctl stop`: stop, then empty the store.
    pub fn stop(&mut self) {
        if self.child.is_some() {
            self.terminate(Duration::from_secs(30));
        }
        self.settle();
        self.store.lock().unwrap().clear();
    }

    /// Wait until the notification socket has been read empty.
    fn settle(&self) {
        let n = self.messages.lock().unwrap().len();
        std::thread::sleep(Duration::from_millis(30));
        let deadline = Instant::now() + Duration::from_secs(2);
        while self.messages.lock().unwrap().len() != n && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(30));
        }
    }
}

impl Default for ServiceManager {
    fn default() -> Self {
        Self::new()
    }
}

impl Drop for ServiceManager {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            // SAFETY: kill with a pid we own.
            unsafe { libc::kill(c.id() as i32, libc::SIGTERM) };
            let deadline = Instant::now() + Duration::from_secs(15);
            while matches!(c.try_wait(), Ok(None)) && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = c.kill();
            let _ = c.wait();
        }
        self.done.store(true, Ordering::Relaxed);
        if let Some(r) = self.reader.take() {
            let _ = r.join();
        }
        self.store.lock().unwrap().clear();
    }
}

/// Apply one notification to the store.
fn apply(store: &Store, text: &str, fds: Vec<OwnedFd>) {
    let field = |k: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(k).and_then(|v| v.strip_prefix('=')))
    };
    let name = field("FDNAME").unwrap_or("stored").to_owned();
    let mut store = store.lock().unwrap();
    if field("FDSTOREREMOVE") == Some("1") {
        store.retain(|(n, _)| *n != name);
    }
    if field("FDSTORE") == Some("1") {
        store.extend(fds.into_iter().map(|fd| (name.clone(), fd)));
    }
}

/// One datagram and the descriptors it carries (`None` on timeout).
fn receive(sock: &UnixDatagram) -> Option<(String, Vec<OwnedFd>)> {
    let mut buf = vec![0u8; 4096];
    let mut control = vec![0u64; 1024];
    let mut iov = libc::iovec {
        iov_base: buf.as_mut_ptr().cast(),
        iov_len: buf.len(),
    };
    // SAFETY: an all-zero msghdr is valid; the fields are set below.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &raw mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = control.as_mut_ptr().cast();
    msg.msg_controllen = std::mem::size_of_val(control.as_slice()) as _;
    // SAFETY: msg and its buffers outlive the call.
    let n = unsafe { libc::recvmsg(sock.as_raw_fd(), &raw mut msg, libc::MSG_CMSG_CLOEXEC) };
    if n < 0 {
        return None;
    }
    let mut fds = Vec::new();
    // SAFETY: walking the control messages the kernel wrote, within msg_controllen.
    unsafe {
        let mut c = libc::CMSG_FIRSTHDR(&raw const msg);
        while !c.is_null() {
            if (*c).cmsg_level == libc::SOL_SOCKET && (*c).cmsg_type == libc::SCM_RIGHTS {
                let data = libc::CMSG_DATA(c).cast::<i32>();
                let len = (*c).cmsg_len as usize - libc::CMSG_LEN(0) as usize;
                for i in 0..len / std::mem::size_of::<i32>() {
                    fds.push(OwnedFd::from_raw_fd(data.add(i).read_unaligned()));
                }
            }
            c = libc::CMSG_NXTHDR(&raw const msg, c);
        }
    }
    Some((
        String::from_utf8_lossy(&buf[..n as usize]).into_owned(),
        fds,
    ))
}
