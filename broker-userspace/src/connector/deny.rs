//! What the connectors' [`Connector::deny`](super::Connector::deny) share: the answer to
//! a client that opened with TLS the connector cannot terminate in a denial (a TLS
//! `access_denied` alert), and the tests' helpers (socket pairs, the real clients).

use super::{AppSocket, close_gracefully};

/// A TLS record carrying a fatal `access_denied` alert (RFC 8446 6.2, code 49), sent in
/// the clear: a server may send an alert before any key is agreed. Record version
/// 0x0303, as every TLS 1.2 and 1.3 server's records.
pub const TLS_ACCESS_DENIED: [u8; 7] = [0x15, 0x03, 0x03, 0x00, 0x02, 0x02, 0x31];

/// Whether the client's first byte is a TLS handshake record (0x16), which no plaintext
/// opening of PostgreSQL or HTTP starts with. Waits for the first byte; `false` when
/// the client closed or the socket failed.
pub async fn opens_with_tls(client: &AppSocket) -> bool {
    let mut first = [0u8; 1];
    matches!(client.peek(&mut first).await, Ok(1)) && first[0] == 0x16
}

/// Refuse a client that opened with a TLS ClientHello: the `access_denied` alert (the
/// client reports e.g. "tlsv1 alert access denied"; the rule cannot be named without a
/// handshake), then a close without a reset.
pub async fn refuse_tls(mut client: AppSocket) {
    use tokio::io::AsyncWriteExt as _;
    let _ = client.write_all(&TLS_ACCESS_DENIED).await;
    close_gracefully(client).await;
}

#[cfg(test)]
pub(crate) mod testing {
    use std::{path::PathBuf, process::Output, time::Duration};

    use tokio::net::{TcpListener, TcpStream};

    use super::super::{AppSocket, Denial};

    /// A denial with a rule and a reason of the shapes the policy produces.
    pub fn denial() -> Denial {
        Denial {
            service: "orders-db".into(),
            rule: "ops-only".into(),
            reason: "uid 1000 is not in [0]".into(),
        }
    }

    /// A connected (broker side, client side) socket pair on loopback.
    pub async fn pair() -> (AppSocket, TcpStream) {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let c = TcpStream::connect(l.local_addr().unwrap()).await.unwrap();
        let (s, _) = l.accept().await.unwrap();
        (s.into(), c)
    }

    /// A loopback listener whose accepted connections go to `deny` (each in a task,
    /// bounded by `DENY_DEADLINE` as the core will); its port. The task ends with the
    /// test's runtime.
    pub async fn deny_listener<F, Fut>(deny: F) -> u16
    where
        F: Fn(AppSocket) -> Fut + Send + 'static,
        Fut: Future<Output = ()> + Send + 'static,
    {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = l.local_addr().unwrap().port();
        tokio::spawn(async move {
            while let Ok((s, _)) = l.accept().await {
                let f = deny(s.into());
                tokio::spawn(async move {
                    let _ = tokio::time::timeout(super::super::DENY_DEADLINE, f).await;
                });
            }
        });
        port
    }

    /// A client program on this machine, or `None` (the test then says it skipped; with
    /// `BROKER_REQUIRE_PRIVILEGED=1`, as in CI, it fails instead).
    pub fn client_program(bin: &str) -> Option<PathBuf> {
        let found = std::env::var_os("PATH").and_then(|path| {
            std::env::split_paths(&path)
                .chain(["/usr/bin".into(), "/usr/local/bin".into()])
                .map(|d| d.join(bin))
                .find(|p| p.is_file())
        });
        if found.is_none() {
            assert!(
                std::env::var("BROKER_REQUIRE_PRIVILEGED").as_deref() != Ok("1"),
                "`{bin}` is not installed"
            );
            eprintln!("SKIPPED: `{bin}` is not installed");
        }
        found
    }

    /// Run a client to its end (at most 20 s: killed after that); its exit status,
    /// stdout and stderr.
    pub async fn run(mut cmd: tokio::process::Command) -> Output {
        cmd.stdin(std::process::Stdio::null()).kill_on_drop(true);
        tokio::time::timeout(Duration::from_secs(20), cmd.output())
            .await
            .expect("the client ended within 20 s")
            .expect("the client started")
    }
}
