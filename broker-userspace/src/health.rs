//! Health endpoint: `GET /live` (200 while the process serves) and `GET /ready` (200
//! only once the programs are attached and every listener is bound; 503 before and
//! while shutting down). Deliberately tiny: one request per connection.

use std::sync::{
    Arc,
    atomic::{AtomicBool, Ordering},
};

use tokio::{
    io::{AsyncReadExt as _, AsyncWriteExt as _},
    net::TcpListener,
    sync::watch,
};

/// Serve health checks until `stop` turns true.
pub async fn serve(listener: TcpListener, ready: Arc<AtomicBool>, mut stop: watch::Receiver<bool>) {
    loop {
        let (mut s, _) = tokio::select! {
            () = crate::proxy::stopped(&mut stop) => return,
            r = listener.accept() => match r {
                Ok(x) => x,
                Err(_) => continue,
            },
        };
        let ready = Arc::clone(&ready);
        tokio::spawn(async move {
            let mut buf = [0u8; 1024];
            let n = match tokio::time::timeout(std::time::Duration::from_secs(2), s.read(&mut buf))
                .await
            {
                Ok(Ok(n)) => n,
                _ => return,
            };
            let req = String::from_utf8_lossy(&buf[..n]);
            let path = req.split_whitespace().nth(1).unwrap_or("");
            let (code, body) = match path {
                "/live" => ("200 OK", "live\n"),
                "/ready" if ready.load(Ordering::SeqCst) => ("200 OK", "ready\n"),
                "/ready" => ("503 Service Unavailable", "not ready\n"),
                _ => ("404 Not Found", "not found\n"),
            };
            let resp = format!(
                "HTTP/1.1 {code}\r\nContent-Type: text/plain\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                body.len()
            );
            let _ = s.write_all(resp.as_bytes()).await;
            let _ = s.shutdown().await;
        });
    }
}
