//! Health endpoint: `GET /live` (200 while the process serves and no listener task has
//! died) and `GET /ready` (200 only once the programs are attached and every listener
//! is bound, and while every listener task is alive; 503 before, after a listener task
//! died, and while shutting down). Deliberately tiny: one request per connection, its
//! own listener and task, outside the connection caps, with a small cap of its own.
//!
//! The replies are Secretless Broker's (its `heptiolabs/healthcheck` handler): content
//! type `application/json; charset=utf-8`, body `{}` and a newline, or with `?full=1`
//! every check by name, `"OK"` or why it fails, as Go's `json.Encoder` indents it:
//! `/live` has the check `listening`, `/ready` has `listening` and `ready`. A method
//! other than GET is 405, any other path 404.
//!
//! `GET /metrics`: the daemon's Prometheus metrics (see [`crate::metrics`]): the
//! OpenMetrics text format for a client whose `Accept` names it (Prometheus), else the
//! Prometheus text format 0.0.4.

use std::{
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};

use tokio::{
    io::{AsyncReadExt as _, AsyncWriteExt as _},
    net::TcpListener,
    sync::{Semaphore, watch},
};

/// Health requests served at once; more are closed at once.
pub const MAX_REQUESTS: usize = 32;
/// Time for one request, read and reply.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(2);

/// What `/ready` reports.
#[derive(Debug)]
pub struct Readiness {
    started: AtomicBool,
    stopping: AtomicBool,
    /// The first listener task that died, and why.
    failed: watch::Sender<Option<String>>,
}

impl Default for Readiness {
    fn default() -> Self {
        Self {
            started: AtomicBool::new(false),
            stopping: AtomicBool::new(false),
            failed: watch::channel(None).0,
        }
    }
}

impl Readiness {
    /// Every listener is bound and the programs are attached.
    pub fn set_started(&self) {
        self.started.store(true, Ordering::SeqCst);
    }

    /// Shutting down: not ready any more.
    pub fn set_stopping(&self) {
        self.stopping.store(true, Ordering::SeqCst);
    }

    /// A listener task ended or panicked while it should be serving.
    pub fn listener_failed(&self, why: String) {
        self.failed.send_if_modified(|f| {
            if f.is_none() {
                *f = Some(why);
                true
            } else {
                false
            }
        });
    }

    #[must_use]
    pub fn is_ready(&self) -> bool {
        self.started.load(Ordering::SeqCst)
            && !self.stopping.load(Ordering::SeqCst)
            && self.failed.borrow().is_none()
    }

    /// Resolves with the reason once a listener task has died.
    pub async fn failed(&self) -> String {
        let mut rx = self.failed.subscribe();
        match rx.wait_for(Option::is_some).await {
            Ok(f) => f.clone().unwrap_or_default(),
            // The sender lives in `self`: cannot happen while we are borrowed.
            Err(_) => std::future::pending().await,
        }
    }
}

/// A check as Secretless names it, and its verdict (`Err`: why it fails, never a
/// secret: a fixed sentence).
type Check = (&'static str, Result<(), &'static str>);

impl Readiness {
    /// `listening`: every listener task is alive (Secretless: its services started).
    fn listening(&self) -> Check {
        let ok = self.failed.borrow().is_none();
        (
            "listening",
            if ok {
                Ok(())
            } else {
                Err("a listener task died (see the log)")
            },
        )
    }

    /// `ready`: started, not stopping, and listening.
    fn ready(&self) -> Check {
        let why = if !self.started.load(Ordering::SeqCst) {
            Some("not started yet")
        } else if self.stopping.load(Ordering::SeqCst) {
            Some("shutting down")
        } else if self.failed.borrow().is_some() {
            Some("a listener task died (see the log)")
        } else {
            None
        };
        ("ready", why.map_or(Ok(()), Err))
    }
}

/// The reply to one request: status line, content type, body.
#[derive(Debug, PartialEq, Eq)]
pub struct Reply {
    pub status: &'static str,
    pub content_type: &'static str,
    pub body: String,
}

const JSON: &str = "application/json; charset=utf-8";
const TEXT: &str = "text/plain; charset=utf-8";

/// Answer the request whose first line is `request_line` (`GET /ready?full=1 HTTP/1.1`).
#[must_use]
pub fn respond(request_line: &str, ready: &Readiness) -> Reply {
    let mut words = request_line.split_whitespace();
    let method = words.next().unwrap_or("");
    let target = words.next().unwrap_or("");
    let (path, query) = target.split_once('?').unwrap_or((target, ""));
    let checks: Vec<Check> = match path {
        "/live" => vec![ready.listening()],
        "/ready" => vec![ready.listening(), ready.ready()],
        _ => {
            return Reply {
                status: "404 Not Found",
                content_type: TEXT,
                body: "404 page not found\n".into(),
            };
        }
    };
    if method != "GET" {
        return Reply {
            status: "405 Method Not Allowed",
            content_type: TEXT,
            body: "method not allowed\n".into(),
        };
    }
    let ok = checks.iter().all(|(_, r)| r.is_ok());
    let status = if ok {
        "200 OK"
    } else {
        "503 Service Unavailable"
    };
    let body = if query_value(query, "full") == Some("1") {
        full_body(&checks)
    } else {
        "{}\n".to_owned()
    };
    Reply {
        status,
        content_type: JSON,
        body,
    }
}

/// The first value of `key` in a query string (Go's `URL.Query().Get`; the values we
/// look for need no percent-decoding).
fn query_value<'a>(query: &'a str, key: &str) -> Option<&'a str> {
    query.split('&').find_map(|kv| {
        let (k, v) = kv.split_once('=').unwrap_or((kv, ""));
        (k == key).then_some(v)
    })
}

/// `{"name": "OK" | "why", ...}` with keys sorted and four-space indentation, as Go's
/// `json.Encoder` with `SetIndent("", "    ")` writes a `map[string]string`.
fn full_body(checks: &[Check]) -> String {
    let mut sorted: Vec<&Check> = checks.iter().collect();
    sorted.sort_by_key(|(name, _)| *name);
    let lines: Vec<String> = sorted
        .iter()
        .map(|(name, r)| {
            let v = match r {
                Ok(()) => "OK",
                Err(why) => why,
            };
            format!(
                "    {}: {}",
                serde_json::Value::from(*name),
                serde_json::Value::from(v)
            )
        })
        .collect();
    format!("{{\n{}\n}}\n", lines.join(",\n"))
}

/// Whether the request line asks for the metrics (`GET /metrics`, any query).
fn wants_metrics(request_line: &str) -> bool {
    let mut words = request_line.split_whitespace();
    let method = words.next().unwrap_or("");
    let target = words.next().unwrap_or("");
    method == "GET" && target.split_once('?').map_or(target, |(p, _)| p) == "/metrics"
}

/// Serve health checks (and `GET /metrics` with `metrics`) until `stop` turns true.
pub async fn serve(
    listener: TcpListener,
    ready: Arc<Readiness>,
    metrics: Option<Arc<crate::metrics::Metrics>>,
    mut stop: watch::Receiver<bool>,
) {
    let slots = Arc::new(Semaphore::new(MAX_REQUESTS));
    loop {
        let (mut s, _) = tokio::select! {
            () = crate::proxy::stopped(&mut stop) => return,
            r = listener.accept() => match r {
                Ok(x) => x,
                Err(_) => {
                    // EMFILE and friends: back off instead of spinning.
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let Ok(slot) = Arc::clone(&slots).try_acquire_owned() else {
            continue;
        };
        let ready = Arc::clone(&ready);
        let metrics = metrics.clone();
        tokio::spawn(async move {
            let _slot = slot;
            let _ = tokio::time::timeout(REQUEST_TIMEOUT, async {
                // The whole head (a client may write it in pieces; answering early and
                // closing with bytes unread would reset the connection under the
                // reply), at most 1 KiB of it.
                let mut buf = [0u8; 1024];
                let mut n = 0;
                while n < buf.len() && !buf[..n].windows(4).any(|w| w == b"\r\n\r\n") {
                    match s.read(&mut buf[n..]).await {
                        Ok(0) | Err(_) => break,
                        Ok(k) => n += k,
                    }
                }
                if n == 0 {
                    return;
                }
                let req = String::from_utf8_lossy(&buf[..n]);
                let line = req.lines().next().unwrap_or("");
                let r = match metrics {
                    Some(m) if wants_metrics(line) => {
                        // OpenMetrics when asked for (Prometheus does), else the
                        // Prometheus text format.
                        let open = req
                            .lines()
                            .skip(1)
                            .filter_map(|h| h.split_once(':'))
                            .filter(|(k, _)| k.trim().eq_ignore_ascii_case("accept"))
                            .any(|(_, v)| crate::metrics::accepts_openmetrics(v));
                        // Off the reactor: the scrape counts the kernel maps' entries
                        // (bounded, at most every few seconds, but system calls).
                        let body = tokio::task::spawn_blocking(move || {
                            if open { m.encode() } else { m.encode_text() }
                        })
                        .await
                        .unwrap_or_default();
                        Reply {
                            status: "200 OK",
                            content_type: if open {
                                crate::metrics::CONTENT_TYPE
                            } else {
                                crate::metrics::TEXT_CONTENT_TYPE
                            },
                            body,
                        }
                    }
                    _ => respond(line, &ready),
                };
                let resp = format!(
                    "HTTP/1.1 {}\r\nContent-Type: {}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{}",
                    r.status,
                    r.content_type,
                    r.body.len(),
                    r.body
                );
                let _ = s.write_all(resp.as_bytes()).await;
                let _ = s.shutdown().await;
            })
            .await;
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ready_only_when_started_alive_and_not_stopping() {
        let r = Readiness::default();
        assert!(!r.is_ready());
        r.set_started();
        assert!(r.is_ready());
        r.listener_failed("transparent 127.0.0.1:1: panicked".into());
        assert!(!r.is_ready());
        let r = Readiness::default();
        r.set_started();
        r.set_stopping();
        assert!(!r.is_ready());
    }

    #[test]
    fn replies_like_secretless() {
        let r = Readiness::default();
        r.set_started();
        let live = respond("GET /live HTTP/1.1", &r);
        assert_eq!(
            live,
            Reply {
                status: "200 OK",
                content_type: "application/json; charset=utf-8",
                body: "{}\n".into()
            }
        );
        assert_eq!(
            respond("GET /ready?full=1 HTTP/1.1", &r).body,
            "{\n    \"listening\": \"OK\",\n    \"ready\": \"OK\"\n}\n"
        );
        assert_eq!(
            respond("GET /live?x=2&full=1 HTTP/1.1", &r).body,
            "{\n    \"listening\": \"OK\"\n}\n"
        );
        // Only `full=1` asks for the body (Go: `Query().Get("full") != "1"`).
        assert_eq!(respond("GET /ready?full=true HTTP/1.1", &r).body, "{}\n");
        r.set_stopping();
        let ready = respond("GET /ready?full=1 HTTP/1.1", &r);
        assert_eq!(ready.status, "503 Service Unavailable");
        assert_eq!(
            ready.body,
            "{\n    \"listening\": \"OK\",\n    \"ready\": \"shutting down\"\n}\n"
        );
        assert_eq!(respond("GET /live HTTP/1.1", &r).status, "200 OK");
        r.listener_failed("listenOn 127.0.0.1:1 of service db: panicked".into());
        let live = respond("GET /live?full=1 HTTP/1.1", &r);
        assert_eq!(live.status, "503 Service Unavailable");
        assert!(live.body.contains("a listener task died"), "{}", live.body);
        assert!(!live.body.contains("127.0.0.1:1"), "{}", live.body);
        assert_eq!(
            respond("POST /ready HTTP/1.1", &r).status,
            "405 Method Not Allowed"
        );
        assert_eq!(respond("GET /metrics HTTP/1.1", &r).status, "404 Not Found");
        assert_eq!(respond("", &r).status, "404 Not Found");
        let fresh = Readiness::default();
        assert!(
            respond("GET /ready?full=1 HTTP/1.1", &fresh)
                .body
                .contains("not started yet")
        );
    }
}
