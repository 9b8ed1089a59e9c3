//! A local HTTP secret server, like the user's "UTS": `GET /secrets/<path>` with
//! `Authorization: Bearer <token>` returns the stored value as the raw body (a value
//! stored as JSON text serves the `http` provider's `#field` ids). Values can be changed
//! while it runs (rotation), it can answer slowly, and it can be told to misbehave the
//! ways a broken store or what stands in front of it does ([`Failure`]): 500s, an HTML
//! error page with status 200, truncated JSON, a 1 GiB body streamed, a redirect to
//! itself, or no answer at all. Counts requests, per secret, whatever it answered.

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

/// How the server misbehaves ([`SecretServer::set_failure`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Failure {
    /// Answers as it should.
    #[default]
    None,
    /// `500 Internal Server Error`, a short text body.
    Status500,
    /// `200 OK` with an HTML page (`text/html`): a proxy's or portal's error page.
    Html,
    /// `200 OK`, `application/json`, the JSON cut in the middle of a string.
    TruncatedJson,
    /// `200 OK` and 1 GiB of body, streamed without a length, until the client stops
    /// reading.
    Huge,
    /// `302 Found` to the same URL.
    RedirectLoop,
    /// Reads the request and never answers (until the mode changes or the server goes,
    /// at most two minutes).
    Hang,
}

/// Bytes of a [`Failure::Huge`] body.
pub const HUGE_BODY: u64 = 1 << 30;

#[derive(Default)]
struct State {
    values: Mutex<HashMap<String, String>>,
    failure: Mutex<Failure>,
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
                let stp = Arc::clone(&stp);
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
                    let failure = *st.failure.lock().expect("lock");
                    if misbehave(&mut conn, failure, &path, &st, &stp) {
                        return;
                    }
                    let (status, body) = if !authorized {
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
        self.set_failure(if failing {
            Failure::Status500
        } else {
            Failure::None
        });
    }

    /// Misbehave this way from the next request on ([`Failure::None`]: answer again).
    pub fn set_failure(&self, failure: Failure) {
        *self.state.failure.lock().expect("lock") = failure;
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

/// Answer `conn` as `failure` says; false for [`Failure::None`] (answer normally).
fn misbehave(
    conn: &mut std::net::TcpStream,
    failure: Failure,
    path: &str,
    st: &State,
    stop: &AtomicBool,
) -> bool {
    let reply = |conn: &mut std::net::TcpStream, head: &str, body: &str| {
        let _ = write!(
            conn,
            "HTTP/1.1 {head}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        );
    };
    match failure {
        Failure::None => return false,
        Failure::Status500 => reply(
            conn,
            "500 Internal Server Error\r\nContent-Type: text/plain",
            "store unavailable",
        ),
        Failure::Html => reply(
            conn,
            "200 OK\r\nContent-Type: text/html",
            "<!DOCTYPE html><html><head><title>502 Bad Gateway</title></head><body><h1>Bad \
             Gateway</h1><p>The proxy could not reach the secret store.</p></body></html>",
        ),
        Failure::TruncatedJson => reply(
            conn,
            "200 OK\r\nContent-Type: application/json",
            r#"{"data": {"password": "trunc"#,
        ),
        Failure::RedirectLoop => reply(conn, &format!("302 Found\r\nLocation: {path}"), ""),
        Failure::Huge => {
            let _ = write!(
                conn,
                "HTTP/1.1 200 OK\r\nContent-Type: application/octet-stream\r\nConnection: close\r\n\r\n"
            );
            let chunk = vec![b'x'; 64 * 1024];
            let mut sent = 0u64;
            // Until the client stops reading (the write fails) or 1 GiB is out.
            while sent < HUGE_BODY && !stop.load(Ordering::SeqCst) {
                if conn.write_all(&chunk).is_err() {
                    break;
                }
                sent += chunk.len() as u64;
            }
        }
        Failure::Hang => {
            let deadline = std::time::Instant::now() + Duration::from_secs(120);
            while *st.failure.lock().expect("lock") == Failure::Hang
                && !stop.load(Ordering::SeqCst)
                && std::time::Instant::now() < deadline
            {
                thread::sleep(Duration::from_millis(50));
            }
        }
    }
    true
}

impl Drop for SecretServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        // Wake the accept loop so the thread ends.
        let _ = std::net::TcpStream::connect(self.addr);
    }
}
