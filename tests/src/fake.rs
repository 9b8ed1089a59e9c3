//! Hostile or misbehaving peers for the hardening tests: a server that accepts and
//! holds connections, a PostgreSQL server that answers the startup with an error of our
//! choosing, an HTTP server with scripted replies (redirects, empty bodies). All on
//! loopback; every thread ends with the process at the latest and every read is bounded.

use std::{
    collections::HashMap,
    io::{Read as _, Write as _},
    net::{SocketAddr, TcpListener, TcpStream},
    sync::{
        Arc, Mutex,
        atomic::{AtomicUsize, Ordering},
    },
    thread,
    time::Duration,
};

/// Accepts connections and holds them open without a byte until dropped (the sockets
/// are kept in a list). Counts them.
pub struct HoldServer {
    pub addr: SocketAddr,
    held: Arc<Mutex<Vec<TcpStream>>>,
}

impl HoldServer {
    #[must_use]
    pub fn start(ip: &str) -> Self {
        let listener = TcpListener::bind((ip, 0)).expect("bind hold server");
        let addr = listener.local_addr().expect("local_addr");
        let held = Arc::new(Mutex::new(Vec::new()));
        let h = Arc::clone(&held);
        thread::spawn(move || {
            for c in listener.incoming().flatten() {
                let mut list = h.lock().expect("lock");
                // Bounded: a runaway test cannot make this hold more than this.
                if list.len() < 1000 {
                    list.push(c);
                }
            }
        });
        Self { addr, held }
    }

    /// Connections held now.
    #[must_use]
    pub fn held(&self) -> usize {
        self.held.lock().expect("lock").len()
    }

    /// Close every held connection.
    pub fn release(&self) {
        self.held.lock().expect("lock").clear();
    }
}

/// A "PostgreSQL server" that reads the StartupMessage (answering an SSLRequest with
/// `N`) and replies with a FATAL ErrorResponse carrying `code` and `message` as given,
/// then closes. Counts connections.
pub struct FakePgError {
    pub port: u16,
    hits: Arc<AtomicUsize>,
}

impl FakePgError {
    #[must_use]
    pub fn start(code: &str, message: &str) -> Self {
        let listener = TcpListener::bind(("127.0.0.1", 0)).expect("bind fake pg");
        let port = listener.local_addr().expect("local_addr").port();
        let hits = Arc::new(AtomicUsize::new(0));
        let h = Arc::clone(&hits);
        let mut body = Vec::new();
        for (tag, value) in [
            (b'S', "FATAL"),
            (b'V', "FATAL"),
            (b'C', code),
            (b'M', message),
        ] {
            body.push(tag);
            body.extend_from_slice(value.as_bytes());
            body.push(0);
        }
        body.push(0);
        let mut reply = vec![b'E'];
        reply.extend_from_slice(&u32::try_from(body.len() + 4).expect("small").to_be_bytes());
        reply.extend_from_slice(&body);
        thread::spawn(move || {
            for mut c in listener.incoming().flatten() {
                h.fetch_add(1, Ordering::SeqCst);
                let reply = reply.clone();
                thread::spawn(move || {
                    let _ = c.set_read_timeout(Some(Duration::from_secs(5)));
                    // At most two messages: an SSLRequest, then the StartupMessage.
                    for _ in 0..2 {
                        let mut len = [0u8; 4];
                        if c.read_exact(&mut len).is_err() {
                            return;
                        }
                        let n = u32::from_be_bytes(len) as usize;
                        if !(8..=10_000).contains(&n) {
                            return;
                        }
                        let mut rest = vec![0u8; n - 4];
                        if c.read_exact(&mut rest).is_err() {
                            return;
                        }
                        if rest[..4] == 80_877_103u32.to_be_bytes() {
                            let _ = c.write_all(b"N");
                            continue;
                        }
                        let _ = c.write_all(&reply);
                        return;
                    }
                });
            }
        });
        Self { port, hits }
    }

    #[must_use]
    pub fn hits(&self) -> usize {
        self.hits.load(Ordering::SeqCst)
    }
}

/// One scripted HTTP reply.
#[derive(Clone)]
pub struct Reply {
    pub status: &'static str,
    pub headers: Vec<(String, String)>,
    pub body: String,
}

impl Reply {
    #[must_use]
    pub fn ok(body: &str) -> Self {
        Self {
            status: "200 OK",
            headers: vec![],
            body: body.to_owned(),
        }
    }

    #[must_use]
    pub fn redirect(location: &str) -> Self {
        Self {
            status: "302 Found",
            headers: vec![("Location".into(), location.to_owned())],
            body: String::new(),
        }
    }
}

/// An HTTP/1.1 server answering `GET <path>` (query string ignored) from a fixed table,
/// 404 otherwise. Counts requests per path.
pub struct ScriptedHttp {
    pub addr: SocketAddr,
    hits: Arc<Mutex<HashMap<String, usize>>>,
}

impl ScriptedHttp {
    #[must_use]
    pub fn start(routes: HashMap<String, Reply>) -> Self {
        let listener = TcpListener::bind(("127.0.0.1", 0)).expect("bind http");
        let addr = listener.local_addr().expect("local_addr");
        let hits = Arc::new(Mutex::new(HashMap::new()));
        let h = Arc::clone(&hits);
        let routes = Arc::new(routes);
        thread::spawn(move || {
            for mut c in listener.incoming().flatten() {
                let (h, routes) = (Arc::clone(&h), Arc::clone(&routes));
                thread::spawn(move || {
                    let _ = c.set_read_timeout(Some(Duration::from_secs(5)));
                    let mut req = Vec::new();
                    let mut buf = [0u8; 4096];
                    while !req.windows(4).any(|w| w == b"\r\n\r\n") && req.len() < 65_536 {
                        match c.read(&mut buf) {
                            Ok(0) | Err(_) => return,
                            Ok(n) => req.extend_from_slice(&buf[..n]),
                        }
                    }
                    let text = String::from_utf8_lossy(&req);
                    let target = text.split_whitespace().nth(1).unwrap_or("");
                    let path = target.split('?').next().unwrap_or("").to_owned();
                    *h.lock().expect("lock").entry(path.clone()).or_default() += 1;
                    let reply = routes.get(&path).cloned().unwrap_or(Reply {
                        status: "404 Not Found",
                        headers: vec![],
                        body: String::new(),
                    });
                    let mut head = format!(
                        "HTTP/1.1 {}\r\nContent-Length: {}\r\nConnection: close\r\n",
                        reply.status,
                        reply.body.len()
                    );
                    for (k, v) in &reply.headers {
                        head.push_str(&format!("{k}: {v}\r\n"));
                    }
                    head.push_str("\r\n");
                    let _ = c.write_all(head.as_bytes());
                    let _ = c.write_all(reply.body.as_bytes());
                });
            }
        });
        Self { addr, hits }
    }

    /// Requests seen for `path`.
    #[must_use]
    pub fn hits(&self, path: &str) -> usize {
        self.hits
            .lock()
            .expect("lock")
            .get(path)
            .copied()
            .unwrap_or(0)
    }
}
