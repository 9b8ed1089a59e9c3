//! A connection the policy refused, told in HTTP's words: hyper's HTTP/1.1 server reads
//! one request (any method, `CONNECT` on a forward-proxy `listenOn` included) and
//! answers `403 Forbidden` with `connection: close` and a JSON body naming the rule:
//! `{"error": "denied by policy", "service": ..., "rule": ..., "reason": ...}`. The
//! request's body is not read (drained at the close, bounded); nothing goes upstream.
//!
//! A client that opens with TLS (an intercepted `https` destination, or TLS sent to a
//! `listenOn` proxy itself) gets a TLS `access_denied` alert and the close: terminating
//! TLS takes the local CA, which `deny` is not given (the core calls it with the socket
//! and the denial only), so the rule cannot be named to it.

use std::convert::Infallible;

use bytes::Bytes;
use http::{HeaderValue, Request, Response, StatusCode, header};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;

use crate::connector::{
    AppSocket, DENY_DEADLINE, Denial, close_gracefully,
    deny::{opens_with_tls, refuse_tls},
};

/// The largest request head read (hyper's minimum buffer; a longer head gets hyper's
/// own `431`).
const MAX_HEAD: usize = 16 * 1024;

/// The JSON body of the `403`.
#[must_use]
pub fn denial_body(denial: &Denial) -> Bytes {
    Bytes::from(
        serde_json::json!({
            "error": "denied by policy",
            "service": denial.service,
            "rule": denial.rule,
            "reason": denial.reason,
        })
        .to_string(),
    )
}

/// The `403` every request of a denied connection gets.
fn forbidden(body: Bytes) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(body));
    *r.status_mut() = StatusCode::FORBIDDEN;
    let h = r.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    h.insert(header::CONNECTION, HeaderValue::from_static("close"));
    r
}

/// Tell the client the policy denied (see the module docs); the caller bounds it in
/// time.
pub async fn deny(client: AppSocket, denial: &Denial) {
    if opens_with_tls(&client).await {
        refuse_tls(client).await;
        return;
    }
    let body = denial_body(denial);
    let svc = hyper::service::service_fn(move |_req: Request<Incoming>| {
        let body = body.clone();
        async move { Ok::<_, Infallible>(forbidden(body)) }
    });
    // One request: no keep-alive, so the connection ends after the first response, and
    // the socket comes back (not shut down by hyper) to be closed without a reset.
    let served = hyper::server::conn::http1::Builder::new()
        .timer(hyper_util::rt::TokioTimer::new())
        .header_read_timeout(DENY_DEADLINE)
        .max_buf_size(MAX_HEAD)
        .keep_alive(false)
        .serve_connection(TokioIo::new(client), svc)
        .without_shutdown()
        .await;
    match served {
        Ok(parts) => close_gracefully(parts.io.into_inner()).await,
        // Not HTTP (hyper answered 400 where it could), or the client left.
        Err(e) => tracing::debug!(service = %denial.service, "denied HTTP client: {e}"),
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

    use super::*;
    use crate::connector::deny::{
        TLS_ACCESS_DENIED,
        testing::{client_program, denial, deny_listener, pair, run},
    };

    /// What the broker sends for `request`, up to its close (a FIN, not a reset).
    async fn exchange(request: &[u8]) -> String {
        let (broker, mut client) = pair().await;
        let task = tokio::spawn(async move { deny(broker, &denial()).await });
        client.write_all(request).await.unwrap();
        let mut got = Vec::new();
        tokio::time::timeout(Duration::from_secs(5), client.read_to_end(&mut got))
            .await
            .expect("closed in time")
            .expect("closed without a reset");
        drop(client);
        tokio::time::timeout(Duration::from_secs(5), task)
            .await
            .unwrap()
            .unwrap();
        String::from_utf8(got).unwrap()
    }

    fn assert_403(reply: &str) {
        let (head, body) = reply.split_once("\r\n\r\n").expect("a head and a body");
        let head = head.to_ascii_lowercase();
        assert!(head.starts_with("http/1.1 403 forbidden\r\n"), "{reply}");
        assert!(
            head.contains("\r\ncontent-type: application/json"),
            "{reply}"
        );
        assert!(head.contains("\r\nconnection: close"), "{reply}");
        assert_eq!(head.matches("\r\nconnection:").count(), 1, "{reply}");
        let json: serde_json::Value = serde_json::from_str(body).unwrap();
        assert_eq!(
            json,
            serde_json::json!({
                "error": "denied by policy",
                "service": "orders-db",
                "rule": "ops-only",
                "reason": "uid 1000 is not in [0]",
            })
        );
    }

    #[tokio::test]
    async fn a_request_gets_403_json_naming_the_rule() {
        assert_403(&exchange(b"GET /v1/orders HTTP/1.1\r\nHost: api.example.com\r\n\r\n").await);
        // A body that is never read, and a second request that is never served.
        let reply = exchange(
            b"POST /x HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\n\r\nhelloGET /y HTTP/1.1\r\nHost: a\r\n\r\n",
        )
        .await;
        assert_403(&reply);
        assert_eq!(reply.matches("HTTP/1.1").count(), 1, "{reply}");
    }

    #[tokio::test]
    async fn connect_gets_403_too() {
        assert_403(
            &exchange(b"CONNECT api.example.com:443 HTTP/1.1\r\nHost: api.example.com:443\r\n\r\n")
                .await,
        );
    }

    #[tokio::test]
    async fn tls_gets_an_access_denied_alert() {
        let reply = {
            let (broker, mut client) = pair().await;
            tokio::spawn(async move { deny(broker, &denial()).await });
            client.write_all(&[0x16, 3, 1, 0, 200, 1]).await.unwrap();
            let mut got = Vec::new();
            client.read_to_end(&mut got).await.unwrap();
            got
        };
        assert_eq!(reply, TLS_ACCESS_DENIED);
    }

    /// An `http` service's connector, built from its configuration.
    fn connector() -> std::sync::Arc<dyn crate::connector::Connector> {
        let c = crate::config::load_str(
            "version: 2\nservices:\n  api:\n    connector: generic_http\n    listenOn: \
             tcp://127.0.0.1:18080\n    credentials: {token: t}\n    config:\n      \
             headers: {Authorization: 'Bearer {{ .token }}'}\n",
            &crate::connector::KINDS,
        )
        .unwrap();
        crate::connector::build(&c.services[0]).unwrap()
    }

    /// The real `curl` against the `http` connector: plain, through the forward proxy
    /// (`CONNECT`), and TLS.
    #[tokio::test]
    async fn curl_sees_the_403() {
        let Some(curl) = client_program("curl") else {
            return;
        };
        let port = deny_listener(|s| async move { connector().deny(s, &denial()).await }).await;
        let curl_out = |args: Vec<String>| {
            let mut cmd = tokio::process::Command::new(&curl);
            cmd.args(["-sS", "--max-time", "10", "--noproxy", ""])
                .args(args);
            run(cmd)
        };
        // Plain.
        let out = curl_out(vec![
            "-i".into(),
            format!("http://127.0.0.1:{port}/v1/orders"),
        ])
        .await;
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(out.status.success(), "{text}");
        assert_403(&text);
        // A forward proxy asked for a tunnel.
        let out = curl_out(vec![
            "-x".into(),
            format!("http://127.0.0.1:{port}"),
            "https://api.example.com/".into(),
        ])
        .await;
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{err}");
        assert!(err.contains("403"), "{err}");
        // TLS.
        let out = curl_out(vec!["-k".into(), format!("https://127.0.0.1:{port}/")]).await;
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{err}");
        assert!(err.contains("access denied"), "{err}");
    }
}
