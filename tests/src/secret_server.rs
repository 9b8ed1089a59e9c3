//! A local HTTP secret server, like the user's "UTS": `GET /secrets/<path>` with
//! `Authorization: Bearer <token>` returns the stored value as the raw body. Values can
//! be changed while it runs (rotation), it can be told to fail (500) to test a failing
//! secret store, or to answer slowly. Counts requests, per secret.

use std::{
    collections::HashMap,
    io::{BufRead as _, BufReader, Write as _},
    net::{SocketAddr, TcpListener},
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicUsize, Ordering},
    },
    thread,
    time::Duration,
};

#[derive(Default)]
struct State {
    values: Mutex<HashMap<String, String>>,
    failing: AtomicBool,
    requests: AtomicUsize,
    /// Requests per key (the path after `/secrets/`).
    per_key: Mutex<HashMap<String, usize>>,
    /// Milliseconds to wait before answering.
    delay_ms: AtomicUsize,
}

/// The running server; it stops when dropped (its thread ends with the process).
pub struct SecretServer {
    pub addr: SocketAddr,
    pub token: String,
    state: Arc<State>,
    stop: Arc<AtomicBool>,
}

impl SecretServer {
    /// Start on 127.0.0.1 (free port) requiring `token`.
    #[must_use]
    pub fn start(token: &str) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind secret server");
        let addr = listener.local_addr().expect("local_addr");
        let state = Arc::new(State::default());
        let stop = Arc::new(AtomicBool::new(false));
        let (st, tok, stp) = (Arc::clone(&state), token.to_owned(), Arc::clone(&stop));
        thread::spawn(move || {
            for conn in listener.incoming() {
                if stp.load(Ordering::SeqCst) {
                    return;
                }
                let Ok(mut conn) = conn else { continue };
                let st = Arc::clone(&st);
                let tok = tok.clone();
                thread::spawn(move || {
                    let mut reader = BufReader::new(conn.try_clone().expect("clone"));
                    let mut line = String::new();
                    if reader.read_line(&mut line).is_err() {
                        return;
                    }
                    let path = line.split_whitespace().nth(1).unwrap_or("").to_owned();
                    let mut authorized = false;
                    loop {
                        let mut h = String::new();
                        if reader.read_line(&mut h).is_err() || h == "\r\n" || h.is_empty() {
                            break;
                        }
                        let lower = h.to_ascii_lowercase();
                        if lower.starts_with("authorization:")
                            && h.trim_end().ends_with(&format!("Bearer {tok}"))
                        {
                            authorized = true;
                        }
                    }
                    st.requests.fetch_add(1, Ordering::SeqCst);
                    let key = path.trim_start_matches("/secrets/").to_owned();
                    *st.per_key
                        .lock()
                        .expect("lock")
                        .entry(key.clone())
                        .or_default() += 1;
                    let delay = st.delay_ms.load(Ordering::SeqCst);
                    if delay > 0 {
                        thread::sleep(Duration::from_millis(delay as u64));
                    }
                    let value = st.values.lock().expect("lock").get(&key).cloned();
                    let (status, body) = if st.failing.load(Ordering::SeqCst) {
                        ("500 Internal Server Error", "store unavailable".to_owned())
                    } else if !authorized {
                        ("401 Unauthorized", "missing or bad token".to_owned())
                    } else {
                        match value {
                            Some(v) => ("200 OK", v),
                            None => ("404 Not Found", "no such secret".to_owned()),
                        }
                    };
                    let _ = write!(
                        conn,
                        "HTTP/1.1 {status}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                        body.len()
                    );
                });
            }
        });
        Self {
            addr,
            token: token.to_owned(),
            state,
            stop,
        }
    }

    /// Store `value` at `/secrets/<key>`.
    pub fn set(&self, key: &str, value: &str) {
        self.state
            .values
            .lock()
            .expect("lock")
            .insert(key.to_owned(), value.to_owned());
    }

    /// Make every request fail with 500 (or work again).
    pub fn set_failing(&self, failing: bool) {
        self.state.failing.store(failing, Ordering::SeqCst);
    }

    /// Wait this long before answering each request.
    pub fn set_delay(&self, delay: Duration) {
        let ms = usize::try_from(delay.as_millis()).unwrap_or(usize::MAX);
        self.state.delay_ms.store(ms, Ordering::SeqCst);
    }

    /// Requests received so far, for any path.
    #[must_use]
    pub fn requests(&self) -> usize {
        self.state.requests.load(Ordering::SeqCst)
    }

    /// Requests received so far for `/secrets/<key>`.
    #[must_use]
    pub fn requests_for(&self, key: &str) -> usize {
        self.state
            .per_key
            .lock()
            .expect("lock")
            .get(key)
            .copied()
            .unwrap_or(0)
    }

    /// Base URL for the `http` provider: `http://127.0.0.1:P/secrets/`.
    #[must_use]
    pub fn base_url(&self) -> String {
        format!("http://{}/secrets/", self.addr)
    }
}

impl Drop for SecretServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        // Wake the accept loop so the thread ends.
        let _ = std::net::TcpStream::connect(self.addr);
    }
}
