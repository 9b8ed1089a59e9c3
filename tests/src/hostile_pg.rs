//! Hostile PostgreSQL servers and a raw PostgreSQL client, for tests that attack the
//! broker from the upstream side (owned by the PostgreSQL connector work).
//!
//! [`HostilePg::start`] listens on 127.0.0.1 and speaks the real wire protocol: it reads
//! the StartupMessage (answering `N` to SSLRequest/GSSENCRequest), then behaves as its
//! [`Behaviour`] says: asks for a cleartext or md5 password, says "trust", asks for a
//! SCRAM exchange with a chosen iteration count, or floods ParameterStatus messages.
//! Everything the broker sends it after the startup is recorded, so a test can show
//! that no secret reached it. Every loop is bounded in time; dropping the server stops
//! it.
//!
//! Only `std`: each connection gets a thread.

use std::{
    io::{ErrorKind, Read, Write},
    net::{Shutdown, SocketAddr, TcpListener, TcpStream},
    sync::{
        Arc, Mutex, PoisonError,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    thread::JoinHandle,
    time::{Duration, Instant},
};

/// How long any one connection of a hostile server lives at most.
const CONN_LIFETIME: Duration = Duration::from_secs(60);

/// What the server does after the client's StartupMessage.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Behaviour {
    /// AuthenticationOk at once ("trust"), ParameterStatus, BackendKeyData and
    /// ReadyForQuery; then records whatever comes (queries).
    Trust,
    /// AuthenticationCleartextPassword; records the answer.
    Cleartext,
    /// AuthenticationMD5Password; records the answer.
    Md5,
    /// SCRAM-SHA-256 with this iteration count; after the client-final, a 28P01 error.
    Scram { iterations: u32 },
    /// md5 request, AuthenticationOk whatever the answer, then ParameterStatus messages
    /// (1 KiB each) as fast as the broker takes them, up to `max_bytes` or 10 s.
    FloodParams { max_bytes: u64 },
    /// md5 request, AuthenticationOk, then one ParameterStatus header announcing `len`
    /// bytes, and body bytes up to `len` or 10 s.
    HugeMessage { len: u32 },
}

/// A hostile server; stopped on drop.
pub struct HostilePg {
    pub port: u16,
    pub behaviour: Behaviour,
    received: Arc<Mutex<Vec<u8>>>,
    sent: Arc<AtomicU64>,
    connections: Arc<AtomicU64>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl HostilePg {
    /// Listen on 127.0.0.1 at a free port.
    #[must_use]
    pub fn start(behaviour: Behaviour) -> Self {
        let port = crate::free_port();
        let listener = TcpListener::bind(("127.0.0.1", port)).expect("bind hostile server");
        listener.set_nonblocking(true).expect("nonblocking");
        let received = Arc::new(Mutex::new(Vec::new()));
        let sent = Arc::new(AtomicU64::new(0));
        let connections = Arc::new(AtomicU64::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let thread = {
            let (received, sent, connections, stop) = (
                Arc::clone(&received),
                Arc::clone(&sent),
                Arc::clone(&connections),
                Arc::clone(&stop),
            );
            std::thread::spawn(move || {
                let mut handlers = Vec::new();
                while !stop.load(Ordering::Relaxed) {
                    match listener.accept() {
                        Ok((sock, _)) => {
                            connections.fetch_add(1, Ordering::Relaxed);
                            let conn = Conn {
                                sock,
                                received: Arc::clone(&received),
                                sent: Arc::clone(&sent),
                                stop: Arc::clone(&stop),
                                deadline: Instant::now() + CONN_LIFETIME,
                            };
                            handlers.push(std::thread::spawn(move || conn.serve(behaviour)));
                        }
                        Err(e) if e.kind() == ErrorKind::WouldBlock => {
                            std::thread::sleep(Duration::from_millis(10));
                        }
                        Err(_) => break,
                    }
                }
                for h in handlers {
                    let _ = h.join();
                }
            })
        };
        Self {
            port,
            behaviour,
            received,
            sent,
            connections,
            stop,
            thread: Some(thread),
        }
    }

    #[must_use]
    pub fn addr(&self) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], self.port))
    }

    /// Everything the broker sent after its StartupMessages, all connections together.
    #[must_use]
    pub fn received(&self) -> Vec<u8> {
        self.received
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// Bytes the server wrote in floods (what the broker read before closing).
    #[must_use]
    pub fn flood_bytes_sent(&self) -> u64 {
        self.sent.load(Ordering::Relaxed)
    }

    #[must_use]
    pub fn connections(&self) -> u64 {
        self.connections.load(Ordering::Relaxed)
    }
}

impl Drop for HostilePg {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// A backend message.
#[must_use]
pub fn message(tag: u8, body: &[u8]) -> Vec<u8> {
    let mut out = vec![tag];
    out.extend_from_slice(&(u32::try_from(body.len()).expect("small") + 4).to_be_bytes());
    out.extend_from_slice(body);
    out
}

/// An authentication request (`R`) with its code and data.
#[must_use]
pub fn auth_request(code: u32, data: &[u8]) -> Vec<u8> {
    let mut body = code.to_be_bytes().to_vec();
    body.extend_from_slice(data);
    message(b'R', &body)
}

/// An ErrorResponse with severity FATAL.
#[must_use]
pub fn error_response(code: &str, text: &str) -> Vec<u8> {
    let body = format!("SFATAL\0VFATAL\0C{code}\0M{text}\0\0");
    message(b'E', body.as_bytes())
}

struct Conn {
    sock: TcpStream,
    received: Arc<Mutex<Vec<u8>>>,
    sent: Arc<AtomicU64>,
    stop: Arc<AtomicBool>,
    deadline: Instant,
}

impl Conn {
    fn live(&self) -> bool {
        !self.stop.load(Ordering::Relaxed) && Instant::now() < self.deadline
    }

    /// Read exactly `n` bytes, polling the stop flag; `None` on EOF, error or stop.
    fn read_exact(&mut self, n: usize) -> Option<Vec<u8>> {
        let mut out = vec![0u8; n];
        let mut got = 0;
        self.sock
            .set_read_timeout(Some(Duration::from_millis(200)))
            .ok()?;
        while got < n {
            if !self.live() {
                return None;
            }
            match self.sock.read(&mut out[got..]) {
                Ok(0) => return None,
                Ok(k) => got += k,
                Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {}
                Err(_) => return None,
            }
        }
        Some(out)
    }

    /// One frontend message (type byte, length, body), recorded.
    fn read_message(&mut self) -> Option<(u8, Vec<u8>)> {
        let head = self.read_exact(5)?;
        let len = u32::from_be_bytes([head[1], head[2], head[3], head[4]]) as usize;
        if !(4..=1 << 20).contains(&len) {
            return None;
        }
        let body = self.read_exact(len - 4)?;
        let mut rec = self.received.lock().unwrap_or_else(PoisonError::into_inner);
        rec.extend_from_slice(&head);
        rec.extend_from_slice(&body);
        Some((head[0], body))
    }

    /// Record everything until EOF, error, stop or the deadline.
    fn record_rest(&mut self) {
        let _ = self.sock.set_read_timeout(Some(Duration::from_millis(200)));
        let mut buf = [0u8; 4096];
        while self.live() {
            match self.sock.read(&mut buf) {
                Ok(0) => return,
                Ok(n) => self
                    .received
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .extend_from_slice(&buf[..n]),
                Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {}
                Err(_) => return,
            }
        }
    }

    /// The StartupMessage, after answering `N` to encryption requests.
    fn read_startup(&mut self) -> Option<()> {
        for _ in 0..3 {
            let len = self.read_exact(4)?;
            let len = u32::from_be_bytes([len[0], len[1], len[2], len[3]]) as usize;
            if !(8..=10_000).contains(&len) {
                return None;
            }
            let body = self.read_exact(len - 4)?;
            let code = u32::from_be_bytes([body[0], body[1], body[2], body[3]]);
            if code == 80_877_103 || code == 80_877_104 {
                self.sock.write_all(b"N").ok()?;
                continue;
            }
            return Some(());
        }
        None
    }

    fn serve(mut self, behaviour: Behaviour) {
        let _ = self.sock.set_nodelay(true);
        if self.read_startup().is_none() {
            return;
        }
        let _ = self.run(behaviour);
        let _ = self.sock.shutdown(Shutdown::Both);
    }

    fn run(&mut self, behaviour: Behaviour) -> Option<()> {
        match behaviour {
            Behaviour::Trust => {
                let mut out = auth_request(0, &[]);
                out.extend(message(b'S', b"server_version\x0015.0\0"));
                out.extend(message(b'K', &[0, 0, 0x10, 0x92, 1, 2, 3, 4]));
                out.extend(message(b'Z', b"I"));
                self.sock.write_all(&out).ok()?;
                self.record_rest();
            }
            Behaviour::Cleartext => {
                self.sock.write_all(&auth_request(3, &[])).ok()?;
                self.record_rest();
            }
            Behaviour::Md5 => {
                self.sock.write_all(&auth_request(5, &[9, 8, 7, 6])).ok()?;
                self.record_rest();
            }
            Behaviour::Scram { iterations } => {
                self.sock
                    .write_all(&auth_request(10, b"SCRAM-SHA-256\0\0"))
                    .ok()?;
                let (_, body) = self.read_message()?;
                // mechanism \0, int32 length, "n,,n=,r=<nonce>"
                let text = String::from_utf8_lossy(&body).into_owned();
                let nonce = text.split("r=").nth(1)?.to_owned();
                let first = format!("r={nonce}hostile,s=c2FsdHNhbHQ=,i={iterations}");
                self.sock
                    .write_all(&auth_request(11, first.as_bytes()))
                    .ok()?;
                // The client-final arrives once the broker has computed the proof.
                self.read_message()?;
                self.sock
                    .write_all(&error_response(
                        "28P01",
                        "password authentication failed (hostile server)",
                    ))
                    .ok()?;
            }
            Behaviour::FloodParams { max_bytes } => {
                self.authenticate_md5()?;
                let one = message(b'S', &flood_param_body(1024));
                let chunk: Vec<u8> = one.repeat(64);
                self.write_for(max_bytes, &chunk);
            }
            Behaviour::HugeMessage { len } => {
                self.authenticate_md5()?;
                let mut head = vec![b'S'];
                head.extend_from_slice(&len.to_be_bytes());
                self.sock.write_all(&head).ok()?;
                self.write_for(u64::from(len), &[b'x'; 64 * 1024]);
            }
        }
        Some(())
    }

    fn authenticate_md5(&mut self) -> Option<()> {
        self.sock.write_all(&auth_request(5, &[9, 8, 7, 6])).ok()?;
        self.read_message()?;
        self.sock.write_all(&auth_request(0, &[])).ok()
    }

    /// Write `chunk` repeatedly until `max` bytes, the broker closing (a write error
    /// other than a timeout), 10 s, or stop.
    fn write_for(&mut self, max: u64, chunk: &[u8]) {
        let until = Instant::now() + Duration::from_secs(10);
        let _ = self
            .sock
            .set_write_timeout(Some(Duration::from_millis(200)));
        let mut total = 0u64;
        while total < max && Instant::now() < until && self.live() {
            match self.sock.write(chunk) {
                Ok(0) => break,
                Ok(n) => {
                    total += n as u64;
                    self.sent.fetch_add(n as u64, Ordering::Relaxed);
                }
                Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {}
                Err(_) => break,
            }
        }
    }
}

/// A ParameterStatus body of about `size` bytes: a unique-looking name and a value.
fn flood_param_body(size: usize) -> Vec<u8> {
    let mut body = b"flood_param\0".to_vec();
    body.resize(size - 1, b'v');
    body.push(0);
    body
}

/// What a raw client saw: every byte the broker sent until it closed (or 15 s).
#[derive(Debug, Clone)]
pub struct RawReply {
    pub bytes: Vec<u8>,
    pub elapsed: Duration,
}

impl RawReply {
    /// The first ErrorResponse's SQLSTATE and message.
    #[must_use]
    pub fn error(&self) -> Option<(String, String)> {
        let mut rest = &self.bytes[..];
        while rest.len() >= 5 {
            let len = u32::from_be_bytes([rest[1], rest[2], rest[3], rest[4]]) as usize;
            let end = (len + 1).min(rest.len());
            if rest[0] == b'E' {
                let (mut code, mut msg) = (String::new(), String::new());
                for field in rest[5..end].split(|&b| b == 0) {
                    match field.split_first() {
                        Some((b'C', v)) => code = String::from_utf8_lossy(v).into_owned(),
                        Some((b'M', v)) => msg = String::from_utf8_lossy(v).into_owned(),
                        _ => {}
                    }
                }
                return Some((code, msg));
            }
            rest = &rest[end..];
        }
        None
    }

    /// Everything as text, for secret greps.
    #[must_use]
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.bytes).into_owned()
    }
}

/// A StartupMessage (protocol 3.0) with `user` and `database`.
#[must_use]
pub fn startup_message(user: &str, database: &str) -> Vec<u8> {
    let mut body = 196_608u32.to_be_bytes().to_vec();
    for (k, v) in [("user", user), ("database", database)] {
        body.extend_from_slice(k.as_bytes());
        body.push(0);
        body.extend_from_slice(v.as_bytes());
        body.push(0);
    }
    body.push(0);
    let mut out = (u32::try_from(body.len()).expect("small") + 4)
        .to_be_bytes()
        .to_vec();
    out.extend_from_slice(&body);
    out
}

/// Connect to a broker listener, send a StartupMessage, and read until it closes (or
/// 15 s). The broker's answer to a failed upstream is a FATAL ErrorResponse.
#[must_use]
pub fn raw_connect(port: u16) -> RawReply {
    let started = Instant::now();
    let mut s = TcpStream::connect(("127.0.0.1", port)).expect("connect to the broker");
    s.write_all(&startup_message("anything", "app"))
        .expect("send startup");
    RawReply {
        bytes: read_until_close(&mut s, Duration::from_secs(15)),
        elapsed: started.elapsed(),
    }
}

/// Read until EOF, an error, or `limit`.
pub fn read_until_close(s: &mut TcpStream, limit: Duration) -> Vec<u8> {
    let until = Instant::now() + limit;
    let _ = s.set_read_timeout(Some(Duration::from_millis(100)));
    let mut out = Vec::new();
    let mut buf = [0u8; 4096];
    while Instant::now() < until && out.len() < 16 << 20 {
        match s.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => out.extend_from_slice(&buf[..n]),
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {}
            Err(_) => break,
        }
    }
    out
}

/// A `/proc/<pid>/status` field in KiB (`VmRSS`, `VmHWM`).
#[must_use]
pub fn proc_status_kib(pid: u32, field: &str) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("proc status");
    status
        .lines()
        .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or_else(|| panic!("no {field} in /proc/{pid}/status"))
}

/// CPU time (user + system) of a process, in clock ticks.
#[must_use]
pub fn cpu_ticks(pid: u32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).expect("proc stat");
    // Fields after the command (which may hold spaces and parentheses).
    let rest = &stat[stat.rfind(')').expect("comm") + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    // utime and stime are fields 14 and 15, i.e. 11 and 12 after the state (field 3).
    f[11].parse::<u64>().expect("utime") + f[12].parse::<u64>().expect("stime")
}
