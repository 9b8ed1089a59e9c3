//! Health endpoint: `GET /live` (200 while the process serves) and `GET /ready` (200
//! only once the programs are attached and every listener is bound, and while every
//! listener task is alive; 503 before, after a listener task died, and while shutting
//! down). Deliberately tiny: one request per connection, its own listener and task,
//! outside the connection caps, with a small cap of its own.

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

/// Serve health checks until `stop` turns true.
pub async fn serve(listener: TcpListener, ready: Arc<Readiness>, mut stop: watch::Receiver<bool>) {
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
        tokio::spawn(async move {
            let _slot = slot;
            let _ = tokio::time::timeout(REQUEST_TIMEOUT, async {
                let mut buf = [0u8; 1024];
                let Ok(n) = s.read(&mut buf).await else {
                    return;
                };
                let req = String::from_utf8_lossy(&buf[..n]);
                let path = req.split_whitespace().nth(1).unwrap_or("");
                let (code, body) = match path {
                    "/live" => ("200 OK", "live\n"),
                    "/ready" if ready.is_ready() => ("200 OK", "ready\n"),
                    "/ready" => ("503 Service Unavailable", "not ready\n"),
                    _ => ("404 Not Found", "not found\n"),
                };
                let resp = format!(
                    "HTTP/1.1 {code}\r\nContent-Type: text/plain\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                    body.len()
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
}
