//! The audit log's writer: a bounded queue and one thread that writes it out, to a file
//! rotated by size or to standard output.
//!
//! * Never blocks the caller: a line is handed over with `try_send`; over
//!   [`QUEUE_LINES`] lines or [`QUEUE_BYTES`] bytes queued it is dropped and counted.
//!   The writer puts the count in the output itself, as a line of its own
//!   (`{"event":"audit_dropped","lines":N}`), before the lines that follow the gap, and
//!   warns in the daemon's log.
//! * The file: created with mode 0600 (an existing one is set to 0600), opened with
//!   `O_NOFOLLOW`, and refused unless it is a regular file owned by the daemon's user
//!   with one link (a symbolic or hard link planted at the path cannot make the daemon
//!   append to, or chmod, another file). Its directory is created (0700) if missing.
//! * Rotation: a line that would take the file over `max_size` goes to a new file
//!   first: `PATH.keep` is dropped, `PATH.N` becomes `PATH.N+1`, `PATH` becomes
//!   `PATH.1` (with `keep: 0`, `PATH` is removed). A line is never split; one line longer
//!   than `max_size` gets a file of its own. At most `(keep + 1) * max_size` bytes, plus
//!   one line.
//! * A write error (a full disk) loses the batch in hand: counted, warned about (at
//!   most once a minute), and the file is reopened for the next batch.
//! * Lines reach the kernel once per batch (`write`), not `fsync`ed: a crash of the
//!   daemon loses nothing written, a crash of the machine may lose the last lines.

use std::{
    fs::{self, File},
    io::{self, Write as _},
    os::unix::fs::{DirBuilderExt as _, MetadataExt as _, OpenOptionsExt as _},
    path::{Path, PathBuf},
    sync::{
        Arc, Condvar, Mutex,
        atomic::{AtomicU64, AtomicUsize, Ordering},
        mpsc::{Receiver, SyncSender, TrySendError},
    },
    time::{Duration, Instant},
};

/// Lines held for the writer at most.
pub const QUEUE_LINES: usize = 4096;
/// Bytes held for the writer at most, whatever the line count.
pub const QUEUE_BYTES: usize = 4 << 20;
/// Lines written per batch at most.
const BATCH_LINES: usize = 1024;
/// Write errors are warned about at most this often.
const FAILURE_WARN_EVERY: Duration = Duration::from_secs(60);

/// The sending side (see the module docs).
pub struct Sink {
    tx: SyncSender<Vec<u8>>,
    shared: Arc<Shared>,
    what: String,
}

#[derive(Default)]
struct Shared {
    /// Bytes queued and not yet taken by the writer.
    bytes: AtomicUsize,
    dropped: AtomicU64,
    failed: AtomicU64,
    /// Lines queued since start, and lines the writer is done with (under the mutex,
    /// for `flush`).
    queued: AtomicU64,
    done: Mutex<u64>,
    written: Condvar,
}

/// Where the writer writes.
enum Output {
    Stdout,
    File(Rotating),
}

impl Sink {
    /// Lines to the daemon's standard output.
    ///
    /// # Errors
    /// When the writer thread cannot be started.
    pub fn stdout() -> io::Result<Self> {
        Self::start(Output::Stdout, "stdout".into())
    }

    /// Lines to the file `path`, rotated at `max_size` bytes, `keep` old files.
    ///
    /// # Errors
    /// The file cannot be created or opened, or is not one the daemon may trust (see
    /// the module docs); or the writer thread cannot be started.
    pub fn file(path: &Path, max_size: u64, keep: u32) -> io::Result<Self> {
        let r = Rotating::open(path, max_size, keep)?;
        Self::start(Output::File(r), path.display().to_string())
    }

    fn start(out: Output, what: String) -> io::Result<Self> {
        let (tx, rx) = std::sync::mpsc::sync_channel(QUEUE_LINES);
        let shared = Arc::new(Shared::default());
        let s = Arc::clone(&shared);
        std::thread::Builder::new()
            .name("broker-audit".into())
            .spawn(move || write_queue(&rx, out, &s))?;
        Ok(Self { tx, shared, what })
    }

    /// What the sink writes to (for logs).
    #[must_use]
    pub fn describe(&self) -> &str {
        &self.what
    }

    /// Queue one line (ending in `\n`); never blocks.
    pub fn push(&self, line: Vec<u8>) {
        let len = line.len();
        let s = &self.shared;
        if s.bytes.fetch_add(len, Ordering::AcqRel) + len > QUEUE_BYTES {
            s.bytes.fetch_sub(len, Ordering::AcqRel);
            s.dropped.fetch_add(1, Ordering::Relaxed);
            return;
        }
        // Counted before the send, so the writer can never count it done first.
        s.queued.fetch_add(1, Ordering::AcqRel);
        match self.tx.try_send(line) {
            Ok(()) => {}
            Err(TrySendError::Full(_) | TrySendError::Disconnected(_)) => {
                s.bytes.fetch_sub(len, Ordering::AcqRel);
                s.queued.fetch_sub(1, Ordering::AcqRel);
                s.dropped.fetch_add(1, Ordering::Relaxed);
            }
        }
    }

    #[must_use]
    pub fn dropped(&self) -> u64 {
        self.shared.dropped.load(Ordering::Relaxed)
    }

    #[must_use]
    pub fn failed(&self) -> u64 {
        self.shared.failed.load(Ordering::Relaxed)
    }

    /// Wait (at most `timeout`) until every line queued so far is written.
    pub fn flush(&self, timeout: Duration) {
        let until = Instant::now() + timeout;
        let target = self.shared.queued.load(Ordering::Acquire);
        let mut done = self
            .shared
            .done
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        while *done < target {
            let left = until.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return;
            }
            done = self
                .shared
                .written
                .wait_timeout(done, left)
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .0;
        }
    }
}

/// The writer thread: until every sender is gone.
fn write_queue(rx: &Receiver<Vec<u8>>, mut out: Output, s: &Shared) {
    let mut reported = 0u64;
    let mut failed_warned = 0u64;
    let mut last_warning: Option<Instant> = None;
    let mut batch: Vec<Vec<u8>> = Vec::new();
    while let Ok(first) = rx.recv() {
        batch.push(first);
        while batch.len() < BATCH_LINES {
            match rx.try_recv() {
                Ok(l) => batch.push(l),
                Err(_) => break,
            }
        }
        let taken: usize = batch.iter().map(Vec::len).sum();
        s.bytes.fetch_sub(taken, Ordering::AcqRel);
        let dropped = s.dropped.load(Ordering::Relaxed);
        let mut lines: Vec<&[u8]> = Vec::with_capacity(batch.len() + 1);
        let note;
        if dropped > reported {
            note = dropped_line(dropped - reported);
            lines.push(&note);
        }
        lines.extend(batch.iter().map(Vec::as_slice));
        match out.write_lines(&lines) {
            Ok(()) => {
                if dropped > reported {
                    tracing::warn!(
                        lines = dropped - reported,
                        "audit lines dropped (the audit output is blocked or too slow)"
                    );
                    reported = dropped;
                }
            }
            Err(e) => {
                let n =
                    s.failed.fetch_add(batch.len() as u64, Ordering::Relaxed) + batch.len() as u64;
                if last_warning.is_none_or(|t| t.elapsed() >= FAILURE_WARN_EVERY) {
                    tracing::warn!(
                        error = %e,
                        lines = n - failed_warned,
                        "audit lines could not be written"
                    );
                    failed_warned = n;
                    last_warning = Some(Instant::now());
                }
            }
        }
        let n = batch.len() as u64;
        batch.clear();
        let mut done = s
            .done
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        *done += n;
        s.written.notify_all();
    }
}

/// The line that marks a gap of `n` dropped lines.
fn dropped_line(n: u64) -> Vec<u8> {
    let time = time::OffsetDateTime::now_utc()
        .format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_default();
    format!("{{\"time\":\"{time}\",\"event\":\"audit_dropped\",\"lines\":{n}}}\n").into_bytes()
}

impl Output {
    /// Write whole lines, then flush them to the kernel.
    fn write_lines(&mut self, lines: &[&[u8]]) -> io::Result<()> {
        match self {
            Self::Stdout => {
                let mut o = io::stdout().lock();
                for l in lines {
                    o.write_all(l)?;
                }
                o.flush()
            }
            Self::File(r) => r.write_lines(lines),
        }
    }
}

/// A file rotated by size (see the module docs).
struct Rotating {
    path: PathBuf,
    max_size: u64,
    keep: u32,
    /// `None` after a failure: reopened at the next write.
    file: Option<File>,
    size: u64,
}

impl Rotating {
    fn open(path: &Path, max_size: u64, keep: u32) -> io::Result<Self> {
        if let Some(dir) = path.parent()
            && !dir.as_os_str().is_empty()
        {
            fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(dir)?;
        }
        let (file, size) = open_file(path)?;
        Ok(Self {
            path: path.to_path_buf(),
            max_size,
            keep,
            file: Some(file),
            size,
        })
    }

    fn write_lines(&mut self, lines: &[&[u8]]) -> io::Result<()> {
        let r = self.try_write(lines);
        if r.is_err() {
            self.file = None;
        }
        r
    }

    fn try_write(&mut self, lines: &[&[u8]]) -> io::Result<()> {
        let mut pending: Vec<u8> = Vec::new();
        for l in lines {
            let len = l.len() as u64;
            if self.size > 0 && self.size + len > self.max_size {
                self.append(&pending)?;
                pending.clear();
                self.rotate()?;
            }
            pending.extend_from_slice(l);
            self.size += len;
        }
        self.append(&pending)
    }

    fn append(&mut self, bytes: &[u8]) -> io::Result<()> {
        if self.file.is_none() {
            let (f, size) = open_file(&self.path)?;
            self.file = Some(f);
            // What the file holds now; `bytes` are already counted in `self.size`.
            self.size = size + bytes.len() as u64;
        }
        match &mut self.file {
            Some(f) if !bytes.is_empty() => f.write_all(bytes),
            _ => Ok(()),
        }
    }

    /// `PATH` -> `PATH.1` -> ... -> `PATH.keep` (dropped), then a new `PATH`.
    fn rotate(&mut self) -> io::Result<()> {
        self.file = None;
        let numbered = |i: u32| {
            let mut p = self.path.clone().into_os_string();
            p.push(format!(".{i}"));
            PathBuf::from(p)
        };
        let gone_ok = |r: io::Result<()>| match r {
            Err(e) if e.kind() != io::ErrorKind::NotFound => Err(e),
            _ => Ok(()),
        };
        if self.keep == 0 {
            gone_ok(fs::remove_file(&self.path))?;
        } else {
            for i in (1..self.keep).rev() {
                gone_ok(fs::rename(numbered(i), numbered(i + 1)))?;
            }
            gone_ok(fs::rename(&self.path, numbered(1)))?;
        }
        let (f, size) = open_file(&self.path)?;
        self.file = Some(f);
        self.size = size;
        Ok(())
    }
}

/// Open (or create) the audit file for appending, mode 0600, and check it is ours
/// (see the module docs). Returns it with its size.
fn open_file(path: &Path) -> io::Result<(File, u64)> {
    let f = fs::OpenOptions::new()
        .append(true)
        .create(true)
        .mode(0o600)
        .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
        .open(path)?;
    let m = f.metadata()?;
    let refuse = |why: &str| Err(io::Error::other(format!("{}: {why}", path.display())));
    if !m.is_file() {
        return refuse("not a regular file");
    }
    if m.uid() != crate::sys::euid() {
        return refuse("owned by another user");
    }
    if m.nlink() != 1 {
        return refuse("has other hard links");
    }
    if m.mode() & 0o7777 != 0o600 {
        crate::sys::fchmod(&f, 0o600)?;
    }
    Ok((f, m.len()))
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt as _;

    use super::*;

    fn line(i: usize, len: usize) -> Vec<u8> {
        let mut l = format!("{{\"i\":{i},\"pad\":\"");
        while l.len() < len - 3 {
            l.push('x');
        }
        l.push_str("\"}\n");
        l.into_bytes()
    }

    fn read(p: &Path) -> String {
        fs::read_to_string(p).unwrap_or_default()
    }

    #[test]
    fn rotates_by_size_keeping_keep_files_of_whole_lines() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("logs/audit.log");
        let sink = Sink::file(&path, 1024, 3).unwrap();
        for i in 0..100 {
            sink.push(line(i, 100));
        }
        sink.flush(Duration::from_secs(10));
        let mut files: Vec<String> = fs::read_dir(path.parent().unwrap())
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        files.sort();
        assert_eq!(
            files,
            ["audit.log", "audit.log.1", "audit.log.2", "audit.log.3"]
        );
        let mut seen = Vec::new();
        for f in ["audit.log.3", "audit.log.2", "audit.log.1", "audit.log"] {
            let p = path.parent().unwrap().join(f);
            let m = fs::metadata(&p).unwrap();
            assert_eq!(m.permissions().mode() & 0o777, 0o600, "{f}");
            assert!(m.len() <= 1024, "{f}: {} bytes", m.len());
            for l in read(&p).lines() {
                let v: serde_json::Value = serde_json::from_str(l).unwrap();
                seen.push(v["i"].as_u64().unwrap());
            }
        }
        // The newest lines, in order, none split: 10 lines of 100 bytes per full file.
        assert_eq!(seen, (60..100).collect::<Vec<_>>());
        assert_eq!(sink.dropped(), 0);
        assert_eq!(sink.failed(), 0);
        // The directory was created private.
        let dm = fs::metadata(path.parent().unwrap()).unwrap();
        assert_eq!(dm.permissions().mode() & 0o777, 0o700);
    }

    #[test]
    fn keep_zero_truncates_and_a_long_line_gets_a_file_of_its_own() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("a.log");
        let sink = Sink::file(&path, 1024, 0).unwrap();
        sink.push(line(1, 100));
        sink.push(line(2, 3000));
        sink.push(line(3, 100));
        sink.flush(Duration::from_secs(10));
        let text = read(&path);
        assert_eq!(text.lines().count(), 1, "only the last line");
        assert!(text.starts_with("{\"i\":3"));
        assert_eq!(fs::read_dir(dir.path()).unwrap().count(), 1);
    }

    #[test]
    fn appends_to_an_existing_file_and_makes_it_private() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("a.log");
        fs::write(&path, "{\"old\":1}\n").unwrap();
        fs::set_permissions(&path, fs::Permissions::from_mode(0o644)).unwrap();
        let sink = Sink::file(&path, 1 << 20, 2).unwrap();
        sink.push(line(1, 50));
        sink.flush(Duration::from_secs(10));
        assert_eq!(read(&path).lines().count(), 2);
        assert_eq!(
            fs::metadata(&path).unwrap().permissions().mode() & 0o777,
            0o600
        );
    }

    #[test]
    fn refuses_links_and_other_files() {
        let dir = tempfile::tempdir().unwrap();
        let target = dir.path().join("target");
        fs::write(&target, "precious\n").unwrap();
        fs::set_permissions(&target, fs::Permissions::from_mode(0o644)).unwrap();
        let sym = dir.path().join("sym.log");
        std::os::unix::fs::symlink(&target, &sym).unwrap();
        assert!(Sink::file(&sym, 1 << 20, 1).is_err());
        let hard = dir.path().join("hard.log");
        fs::hard_link(&target, &hard).unwrap();
        let e = Sink::file(&hard, 1 << 20, 1).err().unwrap().to_string();
        assert!(e.contains("hard links"), "{e}");
        assert!(Sink::file(dir.path(), 1 << 20, 1).is_err(), "a directory");
        // Untouched.
        assert_eq!(read(&target), "precious\n");
        assert_eq!(
            fs::metadata(&target).unwrap().permissions().mode() & 0o777,
            0o644
        );
    }

    #[test]
    fn a_full_queue_drops_counts_and_marks_the_gap() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("a.log");
        let sink = Sink::file(&path, 1 << 30, 1).unwrap();
        // More bytes than the queue holds, faster than the writer drains them: some are
        // dropped. Pushed until one is (a writer on an idle machine can keep up with a
        // few queues' worth), at most 64 queues' worth.
        let big = line(0, 64 * 1024);
        for _ in 0..((QUEUE_BYTES / big.len()) * 64) {
            sink.push(big.clone());
            if sink.dropped() > 0 {
                break;
            }
        }
        sink.flush(Duration::from_secs(30));
        let dropped = sink.dropped();
        assert!(dropped > 0);
        // The next batch carries the count.
        sink.push(line(1, 100));
        sink.flush(Duration::from_secs(10));
        let text = read(&path);
        let noted: u64 = text
            .lines()
            .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
            .filter(|v| v["event"] == "audit_dropped")
            .map(|v| v["lines"].as_u64().unwrap())
            .sum();
        assert_eq!(noted, dropped);
    }
}
