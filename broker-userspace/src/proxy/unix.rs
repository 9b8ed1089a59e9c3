//! `listenOn: unix:///PATH` listeners: the socket file and the identity of its clients.
//!
//! **The socket file** ([`bind`]) is never reachable before it has its mode and owner:
//! the socket is bound at a private random name in the same directory with mode 0 (set
//! on the socket before `bind`, so only root could connect meanwhile), listens, gets its
//! owner and mode through an `O_PATH` descriptor of that very inode (never a path that
//! could have been swapped for a symlink), and is then renamed into place with
//! `RENAME_NOREPLACE`. Setting the umask around `bind` instead was rejected: the umask
//! is per process, so every other thread's files would be created with it meanwhile, and
//! it cannot set an owner anyway.
//!
//! What may already be at the path: nothing; or a socket nobody accepts on (a connect
//! is refused: left by a run that was killed), which is replaced; anything else (a
//! regular file, a directory, a symlink, a socket something accepts on) is an error
//! naming the path and the service. The file is removed when the listener stops
//! ([`SocketFile`]), unless another process has put its own file there since (compared
//! by device and inode).
//!
//! **The client** ([`caller`]): `SO_PEERCRED` gives the pid, uid and gid the client
//! connected with (the kernel records them at `connect()`); the command name and the
//! cgroup are read from `/proc/PID` at accept time, so they are informative (the pid may
//! have exited, or exec'd something else, by then).

use std::{
    fs,
    io::{self, ErrorKind},
    os::{
        fd::{AsRawFd as _, OwnedFd},
        unix::fs::{FileTypeExt as _, MetadataExt as _, OpenOptionsExt as _, PermissionsExt as _},
    },
    path::{Path, PathBuf},
    sync::Arc,
};

use socket2::{Domain, SockAddr, Socket, Type};
use tokio::net::{UnixListener, UnixStream};

use crate::{
    config::{MAX_SOCKET_PATH, SocketOwner, UnixSocketOptions},
    connector::Caller,
    sys,
};

/// The listen backlog of a Unix socket listener (tokio's default for TCP).
const BACKLOG: i32 = 1024;

/// How many private names are tried before giving up (each is random: a clash means
/// someone else creates files of that shape in the directory).
const PRIVATE_NAME_TRIES: usize = 8;

/// Why a `listenOn: unix://` socket cannot be set up.
#[derive(Debug, thiserror::Error)]
#[error("listenOn unix://{} of service {service}: {problem}", path.display())]
pub struct BindError {
    pub service: String,
    pub path: PathBuf,
    #[source]
    pub problem: Problem,
}

/// What went wrong (see [`BindError`]).
#[derive(Debug, thiserror::Error)]
pub enum Problem {
    #[error("the directory {} does not exist (create it first)", .0.display())]
    NoDirectory(PathBuf),
    #[error("{} is not a directory", .0.display())]
    NotADirectory(PathBuf),
    #[error("the path must name a file in a directory")]
    NoFileName,
    #[error(
        "a {0} is in the way: only a socket left behind by an earlier run (nobody accepting \
         on it) is replaced; remove it or choose another path"
    )]
    InTheWay(&'static str),
    #[error("another process accepts connections on this socket (another broker running?)")]
    Live,
    #[error(
        "the path (or the private name it is first bound at, {0} bytes) is too long for a \
         socket address (at most {MAX_SOCKET_PATH} bytes)"
    )]
    TooLong(usize),
    #[error("no such {what} {name:?} (unixSocket.{what})")]
    NoOwner { what: &'static str, name: String },
    #[error("the file changed while the broker was setting it up; not touching it")]
    Raced,
    #[error("{op}: {source}")]
    Io {
        op: &'static str,
        #[source]
        source: io::Error,
    },
}

fn io(op: &'static str) -> impl FnOnce(io::Error) -> Problem {
    move |source| Problem::Io { op, source }
}

/// A bound, listening Unix socket at its path, and the guard that removes its file.
#[derive(Debug)]
pub struct UnixBound {
    pub listener: UnixListener,
    pub file: SocketFile,
}

/// The socket file this process created; removed on drop if it is still that file.
#[derive(Debug)]
pub struct SocketFile {
    path: Arc<Path>,
    dev: u64,
    ino: u64,
}

impl SocketFile {
    /// Where the socket is.
    #[must_use]
    pub fn path(&self) -> &Arc<Path> {
        &self.path
    }
}

impl Drop for SocketFile {
    fn drop(&mut self) {
        let path = &*self.path;
        match fs::symlink_metadata(path) {
            Ok(m) if m.dev() == self.dev && m.ino() == self.ino => match fs::remove_file(path) {
                Ok(()) => tracing::debug!(path = %path.display(), "socket file removed"),
                Err(e) => {
                    tracing::warn!(path = %path.display(), error = %e, "cannot remove the socket file");
                }
            },
            Ok(_) => tracing::info!(
                path = %path.display(),
                "socket file replaced by another process since; left in place"
            ),
            Err(e) if e.kind() == ErrorKind::NotFound => {}
            Err(e) => {
                tracing::warn!(path = %path.display(), error = %e, "cannot check the socket file");
            }
        }
    }
}

/// Removes a private name on every early return.
struct RemoveOnDrop(Option<PathBuf>);

impl Drop for RemoveOnDrop {
    fn drop(&mut self) {
        if let Some(p) = self.0.take() {
            let _ = fs::remove_file(p);
        }
    }
}

/// Create the socket of `service` at `path` with `opts` (see the module docs). Must run
/// inside the tokio runtime.
///
/// # Errors
/// [`BindError`] naming the path, the service and the problem.
pub fn bind(path: &Path, opts: &UnixSocketOptions, service: &str) -> Result<UnixBound, BindError> {
    bind_inner(path, opts).map_err(|problem| BindError {
        service: service.to_owned(),
        path: path.to_path_buf(),
        problem,
    })
}

/// [`bind`] for a socket that is not a service's (the admin socket): the problem alone,
/// for the caller to word.
///
/// # Errors
/// What is wrong ([`Problem`]).
pub fn bind_path(path: &Path, opts: &UnixSocketOptions) -> Result<UnixBound, Problem> {
    bind_inner(path, opts)
}

fn bind_inner(path: &Path, opts: &UnixSocketOptions) -> Result<UnixBound, Problem> {
    let len = path.as_os_str().len();
    if len > MAX_SOCKET_PATH {
        return Err(Problem::TooLong(len));
    }
    if path.as_os_str().to_string_lossy().ends_with('/') {
        return Err(Problem::NoFileName);
    }
    let dir = match path.parent() {
        Some(d) if path.file_name().is_some() && !d.as_os_str().is_empty() => d,
        _ => return Err(Problem::NoFileName),
    };
    match fs::metadata(dir) {
        Ok(m) if m.is_dir() => {}
        Ok(_) => return Err(Problem::NotADirectory(dir.to_path_buf())),
        Err(e) if e.kind() == ErrorKind::NotFound => {
            return Err(Problem::NoDirectory(dir.to_path_buf()));
        }
        Err(e) => return Err(io("checking the directory")(e)),
    }
    let uid = owner(opts.user.as_ref(), false)?;
    let gid = owner(opts.group.as_ref(), true)?;
    let stale = existing(path)?;

    let (private, socket) = bind_private(dir)?;
    let mut cleanup = RemoveOnDrop(Some(private.clone()));
    let (dev, ino) = apply(&private, uid, gid, opts.mode())?;
    if let Some((d, i)) = stale {
        match fs::symlink_metadata(path) {
            Ok(m) if m.dev() == d && m.ino() == i => match fs::remove_file(path) {
                Ok(()) => {
                    tracing::info!(path = %path.display(), "replaced a stale socket file (nobody accepted on it)")
                }
                Err(e) if e.kind() == ErrorKind::NotFound => {}
                Err(e) => return Err(io("removing the stale socket file")(e)),
            },
            Ok(_) => return Err(Problem::Raced),
            Err(e) if e.kind() == ErrorKind::NotFound => {}
            Err(e) => return Err(io("checking the stale socket file")(e)),
        }
    }
    sys::rename_noreplace(&private, path).map_err(|e| {
        if e.kind() == ErrorKind::AlreadyExists {
            Problem::Raced
        } else {
            io("moving the socket into place")(e)
        }
    })?;
    cleanup.0 = None;
    // From here the file is ours to remove, whatever happens next.
    let file = SocketFile {
        path: Arc::from(path),
        dev,
        ino,
    };
    let std = std::os::unix::net::UnixListener::from(OwnedFd::from(socket));
    let listener = UnixListener::from_std(std).map_err(io("registering the listener"))?;
    Ok(UnixBound { listener, file })
}

/// A user or group id from the configuration (names looked up now).
fn owner(o: Option<&SocketOwner>, group: bool) -> Result<Option<u32>, Problem> {
    let what = if group { "group" } else { "user" };
    match o {
        None => Ok(None),
        Some(SocketOwner::Id(n)) => Ok(Some(*n)),
        Some(SocketOwner::Name(name)) => match sys::lookup_id(name, group) {
            Ok(Some(id)) => Ok(Some(id)),
            Ok(None) => Err(Problem::NoOwner {
                what,
                name: name.clone(),
            }),
            Err(e) => Err(Problem::Io {
                op: if group {
                    "looking up the group"
                } else {
                    "looking up the user"
                },
                source: e,
            }),
        },
    }
}

/// What is at `path` now: nothing (`None`), a stale socket (its device and inode), or
/// an error saying what is in the way.
fn existing(path: &Path) -> Result<Option<(u64, u64)>, Problem> {
    let m = match fs::symlink_metadata(path) {
        Ok(m) => m,
        Err(e) if e.kind() == ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(io("checking the path")(e)),
    };
    let t = m.file_type();
    if !t.is_socket() {
        let what = if t.is_symlink() {
            "symlink"
        } else if t.is_dir() {
            "directory"
        } else if t.is_file() {
            "regular file"
        } else {
            "special file"
        };
        return Err(Problem::InTheWay(what));
    }
    // A connect that does not wait: refused means nobody accepts on it any more; a full
    // backlog (EAGAIN) means someone does.
    let probe = Socket::new(Domain::UNIX, Type::STREAM, None).map_err(io("probing the socket"))?;
    probe
        .set_nonblocking(true)
        .map_err(io("probing the socket"))?;
    let addr = SockAddr::unix(path).map_err(io("probing the socket"))?;
    match probe.connect(&addr) {
        Ok(()) => Err(Problem::Live),
        Err(e) if e.raw_os_error() == Some(libc::ECONNREFUSED) => Ok(Some((m.dev(), m.ino()))),
        Err(e)
            if e.kind() == ErrorKind::WouldBlock || e.raw_os_error() == Some(libc::EINPROGRESS) =>
        {
            Err(Problem::Live)
        }
        Err(e) => Err(io("probing whether something accepts on the socket")(e)),
    }
}

/// A listening socket bound at a private random name in `dir`, with mode 0.
fn bind_private(dir: &Path) -> Result<(PathBuf, Socket), Problem> {
    let mut last = None;
    for _ in 0..PRIVATE_NAME_TRIES {
        let private = dir.join(format!(".broker-{:08x}", rand::random::<u32>()));
        let len = private.as_os_str().len();
        if len > MAX_SOCKET_PATH {
            return Err(Problem::TooLong(len));
        }
        let socket =
            Socket::new(Domain::UNIX, Type::STREAM, None).map_err(io("creating the socket"))?;
        // The file bind creates gets this mode (less the umask): nobody but root can
        // connect until the configured mode is set.
        sys::fchmod(&socket, 0).map_err(io("setting the socket's initial mode"))?;
        let addr = SockAddr::unix(&private).map_err(io("binding the socket"))?;
        match socket.bind(&addr) {
            Ok(()) => {}
            Err(e) if e.kind() == ErrorKind::AddrInUse => {
                last = Some(e);
                continue;
            }
            Err(e) => return Err(io("binding the socket")(e)),
        }
        let mut undo = RemoveOnDrop(Some(private.clone()));
        socket.listen(BACKLOG).map_err(io("listening"))?;
        socket
            .set_nonblocking(true)
            .map_err(io("making the socket non-blocking"))?;
        undo.0 = None;
        return Ok((private, socket));
    }
    Err(io("binding the socket at a private name")(
        last.unwrap_or_else(|| io::Error::from(ErrorKind::AddrInUse)),
    ))
}

/// Owner and mode of the socket file just bound at `private`, through an `O_PATH`
/// descriptor of it; its device and inode.
fn apply(
    private: &Path,
    uid: Option<u32>,
    gid: Option<u32>,
    mode: u32,
) -> Result<(u64, u64), Problem> {
    let f = fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_PATH | libc::O_NOFOLLOW)
        .open(private)
        .map_err(io("opening the socket file"))?;
    let m = f.metadata().map_err(io("reading the socket file"))?;
    // Ours, as bound: a socket this process owns, with mode 0.
    if !m.file_type().is_socket() || m.uid() != sys::euid() || m.mode() & 0o777 != 0 {
        return Err(Problem::Raced);
    }
    if uid.is_some() || gid.is_some() {
        sys::fchown_path_fd(&f, uid, gid).map_err(io("changing the socket file's owner"))?;
    }
    let through = format!("/proc/self/fd/{}", f.as_raw_fd());
    let perms = fs::Permissions::from_mode(mode);
    match fs::set_permissions(&through, perms.clone()) {
        Ok(()) => {}
        // No /proc: by path, after checking it is still the same file.
        Err(e) if e.kind() == ErrorKind::NotFound => {
            let now = fs::symlink_metadata(private).map_err(io("reading the socket file"))?;
            if now.dev() != m.dev() || now.ino() != m.ino() {
                return Err(Problem::Raced);
            }
            fs::set_permissions(private, perms).map_err(io("setting the socket file's mode"))?;
        }
        Err(e) => return Err(io("setting the socket file's mode")(e)),
    }
    Ok((m.dev(), m.ino()))
}

/// The identity of a Unix socket client (see the module docs); `None` when the kernel
/// does not say.
#[must_use]
pub fn caller(s: &UnixStream) -> Option<Caller> {
    let cred = s.peer_cred().ok()?;
    // 0: the client's pid is not visible from our pid namespace.
    let pid = cred.pid().and_then(|p| u32::try_from(p).ok()).unwrap_or(0);
    Some(super::caller::from_peer(pid, cred.uid(), cred.gid()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn opts(mode: Option<u32>) -> UnixSocketOptions {
        UnixSocketOptions {
            mode,
            ..UnixSocketOptions::default()
        }
    }

    #[tokio::test]
    async fn binds_with_the_mode_replaces_only_stale_sockets_and_removes_its_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.sock");
        let b = bind(&path, &opts(Some(0o640)), "svc").unwrap();
        let m = fs::symlink_metadata(&path).unwrap();
        assert!(m.file_type().is_socket());
        assert_eq!(m.mode() & 0o777, 0o640);
        // Nothing else left in the directory (the private name is gone).
        assert_eq!(fs::read_dir(dir.path()).unwrap().count(), 1);
        // Live: a second bind is refused, naming the path and the service.
        let e = bind(&path, &opts(None), "other").unwrap_err().to_string();
        assert!(
            e.contains("other") && e.contains("s.sock") && e.contains("another process"),
            "{e}"
        );
        // Its client is this process.
        let c = tokio::net::UnixStream::connect(&path).await.unwrap();
        let (s, _) = b.listener.accept().await.unwrap();
        let who = caller(&s).unwrap();
        assert_eq!(who.pid, std::process::id());
        assert_eq!(who.uid, sys::euid());
        assert!(!who.comm.is_empty());
        drop((c, s));
        // Dropped: the file goes.
        drop(b);
        assert!(fs::symlink_metadata(&path).is_err());

        // A stale socket (bound, then its listener closed without removing the file).
        drop(std::os::unix::net::UnixListener::bind(&path).unwrap());
        assert!(fs::symlink_metadata(&path).is_ok());
        let b = bind(&path, &opts(None), "svc").unwrap();
        let m = fs::symlink_metadata(&path).unwrap();
        let umask = crate::sys::umask();
        assert_eq!(m.mode() & 0o777, 0o777 & !umask, "the default mode");
        // Replaced by someone else meanwhile: not removed.
        fs::remove_file(&path).unwrap();
        fs::write(&path, "theirs").unwrap();
        drop(b);
        assert_eq!(fs::read_to_string(&path).unwrap(), "theirs");

        // A regular file, a directory, a symlink are in the way.
        let e = bind(&path, &opts(None), "svc").unwrap_err().to_string();
        assert!(e.contains("regular file"), "{e}");
        fs::remove_file(&path).unwrap();
        fs::create_dir(&path).unwrap();
        let e = bind(&path, &opts(None), "svc").unwrap_err().to_string();
        assert!(e.contains("directory is in the way"), "{e}");
        fs::remove_dir(&path).unwrap();
        std::os::unix::fs::symlink("/nonexistent", &path).unwrap();
        let e = bind(&path, &opts(None), "svc").unwrap_err().to_string();
        assert!(e.contains("symlink"), "{e}");

        // No directory.
        let e = bind(&dir.path().join("no/such.sock"), &opts(None), "svc")
            .unwrap_err()
            .to_string();
        assert!(e.contains("does not exist") && e.contains("/no"), "{e}");
        // Nothing was left behind by the failures.
        assert_eq!(fs::read_dir(dir.path()).unwrap().count(), 1);
    }

    #[tokio::test]
    async fn an_unknown_owner_name_is_an_error_naming_it() {
        let dir = tempfile::tempdir().unwrap();
        let o = UnixSocketOptions {
            user: Some(SocketOwner::Name("no-such-user-7f3a".into())),
            ..UnixSocketOptions::default()
        };
        let e = bind(&dir.path().join("s"), &o, "svc")
            .unwrap_err()
            .to_string();
        assert!(e.contains("no such user \"no-such-user-7f3a\""), "{e}");
    }
}
