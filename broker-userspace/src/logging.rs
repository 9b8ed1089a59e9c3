//! Logging that can neither stop nor forge the daemon.
//!
//! * [`QueueWriter`]: the log output. tracing-subscriber writes each event with one
//!   `write_all` and, when that fails, reports it with `eprintln!`, which panics on a
//!   closed pipe (EPIPE): the first warning of an accept loop whose stderr reader went
//!   away killed the loop while the programs stayed attached. Here an event is only
//!   queued (a bounded channel, `try_send`); one thread writes the queue to the real
//!   output and ignores write errors. A full queue (output blocked or slower than the
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
        Arc,
        atomic::{AtomicU64, Ordering},
        mpsc::{self, Receiver, SyncSender, TrySendError},
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

enum Msg {
    Line(Vec<u8>),
    /// Everything queued before this has been written (or failed): acknowledge.
    Flush(SyncSender<()>),
}

#[derive(Debug, Default)]
struct Counters {
    /// Lines dropped because the queue was full.
    dropped: AtomicU64,
    /// Lines the output refused (EPIPE, EBADF...).
    failed: AtomicU64,
}

/// `MakeWriter` that queues each event for the writer thread; never blocks, never
/// fails, never panics.
#[derive(Clone)]
pub struct QueueWriter {
    tx: SyncSender<Msg>,
    counters: Arc<Counters>,
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

impl QueueWriter {
    fn push(&self, buf: &[u8]) {
        match self.tx.try_send(Msg::Line(buf.to_vec())) {
            Ok(()) => {}
            Err(TrySendError::Full(_) | TrySendError::Disconnected(_)) => {
                self.counters.dropped.fetch_add(1, Ordering::Relaxed);
            }
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
        let (ack_tx, ack_rx) = mpsc::sync_channel(1);
        let mut msg = Msg::Flush(ack_tx);
        loop {
            match self.tx.try_send(msg) {
                Ok(()) => break,
                Err(TrySendError::Disconnected(_)) => return,
                Err(TrySendError::Full(m)) => {
                    if Instant::now() >= until {
                        return;
                    }
                    msg = m;
                    std::thread::sleep(Duration::from_millis(5));
                }
            }
        }
        let _ = ack_rx.recv_timeout(until.saturating_duration_since(Instant::now()));
    }
}

/// Start the writer thread for `out` with a queue of `capacity` lines.
///
/// # Errors
/// When the thread cannot be created.
pub fn spawn_writer<W: Write + Send + 'static>(out: W, capacity: usize) -> io::Result<QueueWriter> {
    let (tx, rx) = mpsc::sync_channel(capacity.max(1));
    let counters = Arc::new(Counters::default());
    let c = Arc::clone(&counters);
    std::thread::Builder::new()
        .name("broker-log".into())
        .spawn(move || write_queue(out, &rx, &c))?;
    Ok(QueueWriter { tx, counters })
}

fn write_queue<W: Write>(mut out: W, rx: &Receiver<Msg>, counters: &Counters) {
    let mut reported = 0u64;
    while let Ok(msg) = rx.recv() {
        match msg {
            Msg::Line(line) => {
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
                if out.write_all(&line).and_then(|()| out.flush()).is_err() {
                    counters.failed.fetch_add(1, Ordering::Relaxed);
                }
            }
            Msg::Flush(ack) => {
                let _ = out.flush();
                let _ = ack.try_send(());
            }
        }
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
        // The thread holds one line, the queue 16; the rest is dropped and counted.
        assert!(writer.dropped() >= 1000 - 17, "{}", writer.dropped());
    }
}
