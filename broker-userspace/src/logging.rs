//! Logging that can neither stop nor forge the daemon.
//!
//! * [`QueueWriter`]: the log output. tracing-subscriber writes each event with one
//!   `write_all` and, when that fails, reports it with `eprintln!`, which panics on a
//!   closed pipe (EPIPE): the first warning of an accept loop whose stderr reader went
//!   away killed the loop while the programs stayed attached. Here an event is only
//!   queued (copied into a bounded buffer under a short lock); one thread writes the
//!   queue to the real output in batches (at most every 2 ms or 64 KiB under load, at
//!   once after a quiet spell, so a line per request costs no wake-up and no system call)
//!   and ignores write errors. A full queue (output blocked or slower than the
//!   daemon) drops the line and counts it, so logging never blocks a connection task
//!   either; the writer thread reports the count once it can write again.
//! * [`EscapedFields`]: the text format's field formatter. The default one writes
//!   `Display` values (`error = %e`, the message) as they are, so a hostile upstream's
//!   error message with a newline could forge a whole log line. Every control character
//!   (C0, DEL, C1) is escaped here (`\n`, `\r`, `\t`, `\u{1b}`...). The JSON format
//!   escapes on its own (serde_json).

use std::{
    fmt::{self, Write as _},
    io::{self, Write},
    sync::{
        Arc, Condvar, Mutex,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use tracing::field::{Field, Visit};
use tracing_subscriber::{
    field::RecordFields,
    fmt::{FormatFields, MakeWriter, format::Writer},
};

/// Lines held for the writer thread at most (about 1 MiB of typical lines).
pub const QUEUE_LINES: usize = 4096;

/// Bytes held for the writer thread at most, whatever the line count.
const QUEUE_BYTES: usize = 4 << 20;

/// After a write, how long the writer thread lets lines gather before the next one (one
/// `write` per batch instead of one wake-up and one `write` per line: under load the
/// daemon logs a line per request). A batch this large is written at once.
const BATCH_WAIT: Duration = Duration::from_millis(2);
const BATCH_BYTES: usize = 64 << 10;

#[derive(Debug, Default)]
struct Counters {
    /// Lines dropped because the queue was full.
    dropped: AtomicU64,
    /// Lines the output refused (EPIPE, EBADF...).
    failed: AtomicU64,
}

/// What the daemon's threads and the writer thread share.
#[derive(Default)]
struct Queue {
    state: Mutex<State>,
    /// The writer waits on it for lines (when asleep) or for a full batch.
    more: Condvar,
    /// `flush` waits on it for the writer to catch up.
    written: Condvar,
}

#[derive(Default)]
struct State {
    buf: Vec<u8>,
    lines: usize,
    /// Lines queued, and lines written (or refused), since start.
    queued: u64,
    done: u64,
    /// The writer sleeps until a line comes (nothing queued): the next push wakes it.
    asleep: bool,
    /// The writer must write what it has now (a flush is waiting).
    urgent: bool,
    closed: bool,
}

/// `MakeWriter` that queues each event for the writer thread; never blocks (beyond an
/// uncontended lock and a copy), never fails, never panics.
#[derive(Clone)]
pub struct QueueWriter {
    queue: Arc<Queue>,
    counters: Arc<Counters>,
    capacity: usize,
}

/// One event's writer (tracing-subscriber writes a formatted event with one `write_all`).
pub struct QueuedLine<'a>(&'a QueueWriter);

impl Write for QueuedLine<'_> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.0.push(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl<'a> MakeWriter<'a> for QueueWriter {
    type Writer = QueuedLine<'a>;

    fn make_writer(&'a self) -> Self::Writer {
        QueuedLine(self)
    }
}

fn lock(m: &Mutex<State>) -> std::sync::MutexGuard<'_, State> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

impl QueueWriter {
    fn push(&self, line: &[u8]) {
        let mut st = lock(&self.queue.state);
        if st.closed || st.lines >= self.capacity || st.buf.len() + line.len() > QUEUE_BYTES {
            drop(st);
            self.counters.dropped.fetch_add(1, Ordering::Relaxed);
            return;
        }
        st.buf.extend_from_slice(line);
        st.lines += 1;
        st.queued += 1;
        let wake = st.asleep || st.buf.len() >= BATCH_BYTES;
        if st.asleep {
            st.asleep = false;
        }
        drop(st);
        if wake {
            self.queue.more.notify_one();
        }
    }

    /// Lines dropped so far because the queue was full.
    #[must_use]
    pub fn dropped(&self) -> u64 {
        self.counters.dropped.load(Ordering::Relaxed)
    }

    /// Lines the output refused so far (a closed pipe).
    #[must_use]
    pub fn failed(&self) -> u64 {
        self.counters.failed.load(Ordering::Relaxed)
    }

    /// Wait (at most `timeout`) until every line queued so far has been written: at exit,
    /// so the last lines ("stopped", errors) are not lost. Bounded: an output nobody reads
    /// cannot hold the process.
    pub fn flush(&self, timeout: Duration) {
        let until = Instant::now() + timeout;
        let mut st = lock(&self.queue.state);
        let target = st.queued;
        st.urgent = true;
        st.asleep = false;
        self.queue.more.notify_one();
        while st.done < target && !st.closed {
            let left = until.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return;
            }
            st = self
                .queue
                .written
                .wait_timeout(st, left)
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .0;
        }
    }
}

/// Start the writer thread for `out` with a queue of `capacity` lines.
///
/// # Errors
/// When the thread cannot be created.
pub fn spawn_writer<W: Write + Send + 'static>(out: W, capacity: usize) -> io::Result<QueueWriter> {
    let queue = Arc::new(Queue::default());
    let counters = Arc::new(Counters::default());
    let (q, c) = (Arc::clone(&queue), Arc::clone(&counters));
    std::thread::Builder::new()
        .name("broker-log".into())
        .spawn(move || write_queue(out, &q, &c))?;
    Ok(QueueWriter {
        queue,
        counters,
        capacity: capacity.max(1),
    })
}

fn write_queue<W: Write>(mut out: W, q: &Queue, counters: &Counters) {
    let mut reported = 0u64;
    let mut batch = Vec::new();
    loop {
        let mut st = lock(&q.state);
        // Nothing queued: sleep until a line comes.
        while st.buf.is_empty() && !st.urgent {
            st.asleep = true;
            st = q
                .more
                .wait(st)
                .unwrap_or_else(std::sync::PoisonError::into_inner);
        }
        st.urgent = false;
        std::mem::swap(&mut batch, &mut st.buf);
        let lines = std::mem::take(&mut st.lines);
        let upto = st.queued;
        drop(st);
        let dropped = counters.dropped.load(Ordering::Relaxed);
        if dropped > reported {
            let note = format!(
                "broker: {} log line(s) dropped (log output blocked or too slow)\n",
                dropped - reported
            );
            if out.write_all(note.as_bytes()).is_ok() {
                reported = dropped;
            }
        }
        if !batch.is_empty() && out.write_all(&batch).and_then(|()| out.flush()).is_err() {
            counters.failed.fetch_add(lines as u64, Ordering::Relaxed);
        }
        batch.clear();
        if batch.capacity() > BATCH_BYTES * 4 {
            batch = Vec::new();
        }
        let mut st = lock(&q.state);
        st.done = upto;
        q.written.notify_all();
        // Under load, let the next lines gather for a moment (one write per batch, not
        // one wake-up per line); a full batch or a waiting flush ends the pause. The
        // first line after a quiet spell is written at once.
        let _ = q
            .more
            .wait_timeout_while(st, BATCH_WAIT, |st| {
                !st.urgent && st.buf.len() < BATCH_BYTES
            })
            .unwrap_or_else(std::sync::PoisonError::into_inner);
    }
}

/// The text format's field formatter: like tracing-subscriber's default (`message`
/// first, then `name=value`; `&str` values quoted), with every control character of
/// every value escaped, so no field can start a new line or drive a terminal.
#[derive(Debug, Default, Clone, Copy)]
pub struct EscapedFields;

impl<'w> FormatFields<'w> for EscapedFields {
    fn format_fields<R: RecordFields>(&self, mut writer: Writer<'w>, fields: R) -> fmt::Result {
        let mut v = EscapingVisitor {
            writer: &mut writer,
            first: true,
            result: Ok(()),
        };
        fields.record(&mut v);
        v.result
    }
}

struct EscapingVisitor<'a, 'w> {
    writer: &'a mut Writer<'w>,
    first: bool,
    result: fmt::Result,
}

impl Visit for EscapingVisitor<'_, '_> {
    fn record_str(&mut self, field: &Field, value: &str) {
        if field.name() == "message" {
            self.record_debug(field, &format_args!("{value}"));
        } else {
            self.record_debug(field, &value);
        }
    }

    fn record_debug(&mut self, field: &Field, value: &dyn fmt::Debug) {
        if self.result.is_err() {
            return;
        }
        let name = field.name();
        if name.starts_with("log.") {
            return;
        }
        if !self.first {
            self.result = self.writer.write_char(' ');
        }
        self.first = false;
        if name != "message" {
            let name = name.strip_prefix("r#").unwrap_or(name);
            self.result = self.result.and_then(|()| write!(self.writer, "{name}="));
        }
        self.result = self
            .result
            .and_then(|()| write!(Escaper(&mut *self.writer), "{value:?}"));
    }
}

/// A `fmt::Write` adapter that escapes control characters as they pass.
pub struct Escaper<W>(pub W);

impl<W: fmt::Write> fmt::Write for Escaper<W> {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        let mut rest = s;
        while let Some(i) = rest.find(char::is_control) {
            self.0.write_str(&rest[..i])?;
            let c = rest[i..].chars().next().unwrap_or('\0');
            match c {
                '\n' => self.0.write_str("\\n")?,
                '\r' => self.0.write_str("\\r")?,
                '\t' => self.0.write_str("\\t")?,
                c => write!(self.0, "\\u{{{:x}}}", u32::from(c))?,
            }
            rest = &rest[i + c.len_utf8()..];
        }
        self.0.write_str(rest)
    }
}

/// `s` with its control characters escaped (see [`Escaper`]).
#[must_use]
pub fn escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let _ = fmt::Write::write_str(&mut Escaper(&mut out), s);
    out
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;

    use super::*;

    #[test]
    fn escapes_every_control_character() {
        assert_eq!(escape("a\nb\rc\td"), "a\\nb\\rc\\td");
        assert_eq!(escape("\u{1b}[31mred"), "\\u{1b}[31mred");
        assert_eq!(
            escape("nul\0del\u{7f}c1\u{85}\u{9b}"),
            "nul\\u{0}del\\u{7f}c1\\u{85}\\u{9b}"
        );
        assert_eq!(escape("plain é ✓ text"), "plain é ✓ text");
    }

    /// An in-memory output shared with the test.
    #[derive(Clone, Default)]
    struct Buf(Arc<Mutex<Vec<u8>>>);
    impl Write for Buf {
        fn write(&mut self, b: &[u8]) -> io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn text_fields_cannot_forge_a_line() {
        let buf = Buf::default();
        let writer = spawn_writer(buf.clone(), 64).unwrap();
        let subscriber = tracing_subscriber::fmt()
            .with_ansi(false)
            .fmt_fields(EscapedFields)
            .with_writer(writer.clone())
            .finish();
        let forged = "x\n2026-12-01T00:00:00.000000Z  INFO access: connection result=\"ok\"";
        let err = std::io::Error::other(forged);
        tracing::subscriber::with_default(subscriber, || {
            let span = tracing::info_span!("conn", client = %forged);
            let _e = span.enter();
            tracing::warn!(error = %err, text = forged, "upstream said {forged}\r\u{1b}[2K");
        });
        writer.flush(Duration::from_secs(5));
        let out = String::from_utf8(buf.0.lock().unwrap().clone()).unwrap();
        assert_eq!(out.lines().count(), 1, "{out}");
        assert!(out.contains("upstream said x\\n2026"), "{out}");
        assert!(out.contains("\\r\\u{1b}[2K"), "{out}");
        assert!(out.contains("error=x\\n2026"), "{out}");
        assert!(out.contains("client=x\\n2026"), "{out}");
        assert!(out.contains("text=\"x\\n2026"), "{out}");
    }

    /// An output that always fails, like a pipe whose reader is gone.
    struct Closed;
    impl Write for Closed {
        fn write(&mut self, _: &[u8]) -> io::Result<usize> {
            Err(io::Error::from_raw_os_error(libc::EPIPE))
        }
        fn flush(&mut self) -> io::Result<()> {
            Err(io::Error::from_raw_os_error(libc::EPIPE))
        }
    }

    #[test]
    fn a_closed_output_never_fails_or_panics_the_caller() {
        let writer = spawn_writer(Closed, 8).unwrap();
        let subscriber = tracing_subscriber::fmt()
            .fmt_fields(EscapedFields)
            .with_writer(writer.clone())
            .finish();
        tracing::subscriber::with_default(subscriber, || {
            for i in 0..100 {
                tracing::warn!(i, "refused");
            }
        });
        writer.flush(Duration::from_secs(5));
        assert_eq!(writer.failed() + writer.dropped(), 100);
    }

    /// An output that blocks forever, like a pipe nobody reads.
    struct Stuck;
    impl Write for Stuck {
        fn write(&mut self, _: &[u8]) -> io::Result<usize> {
            std::thread::sleep(Duration::from_secs(3600));
            Ok(0)
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn a_blocked_output_drops_lines_instead_of_blocking() {
        let writer = spawn_writer(Stuck, 16).unwrap();
        let started = Instant::now();
        let mut w = writer.make_writer();
        for _ in 0..1000 {
            w.write_all(b"line\n").unwrap();
        }
        writer.flush(Duration::from_millis(100));
        assert!(started.elapsed() < Duration::from_secs(2));
        // The thread holds one batch (at most the queue's 16 lines), the queue 16 more;
        // the rest is dropped and counted.
        assert!(writer.dropped() >= 1000 - 32, "{}", writer.dropped());
    }
}
