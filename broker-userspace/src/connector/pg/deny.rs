//! A connection the policy refused, told in PostgreSQL's words: the client's startup
//! packet is read (SSLRequest and GSSENCRequest answered `N`), then a FATAL
//! ErrorResponse `28000` (`invalid_authorization_specification`, what PostgreSQL sends
//! for "no pg_hba.conf entry") carrying [`Denial::message`], and a close without a reset.
//!
//! TLS is always declined, `clientTLS` or not: the denial is written in the clear, where
//! libpq prints it (libpq, since the CVE-2024-10977 fix, does not show an error sent in
//! reply to the SSLRequest itself, so the `N` comes first), and `deny` is not given the
//! local CA that terminating TLS takes. A client that requires TLS (`sslmode=require`
//! and up) then reports "server does not support SSL, but SSL was required" instead of
//! the rule, and one that opens with TLS directly (`sslnegotiation=direct`) gets a TLS
//! `access_denied` alert. A CancelRequest is closed without a byte, as PostgreSQL
//! answers every CancelRequest.

use bytes::BytesMut;
use tokio::io::AsyncWriteExt as _;

use super::{
    client::{self, ClientIo},
    errors::{error_response, sqlstate},
    startup::FirstPacket,
};
use crate::connector::{
    AppSocket, Denial, close_gracefully,
    deny::{opens_with_tls, refuse_tls},
};

/// The ErrorResponse a denied client gets.
#[must_use]
pub fn denial_error(denial: &Denial) -> Vec<u8> {
    error_response("FATAL", sqlstate::INVALID_AUTHORIZATION, &denial.message())
}

/// Tell the client the policy denied (see the module docs). Reads at most two
/// encryption requests and one startup packet (each at most
/// [`super::startup::MAX_STARTUP_LEN`] bytes); the caller bounds it in time.
pub async fn deny(client: AppSocket, denial: &Denial) {
    if opens_with_tls(&client).await {
        refuse_tls(client).await;
        return;
    }
    let mut buf = BytesMut::with_capacity(1024);
    // Without a TLS acceptor, every encryption request is answered `N` and the leg stays
    // plain.
    let (client, first) = client::read_startup(client, &mut buf, None).await;
    let Some(ClientIo::Plain(mut client)) = client else {
        return;
    };
    let tell = match first {
        // What the client asked for does not matter: the policy refused the caller.
        Ok(FirstPacket::Startup(_) | FirstPacket::SslRequest | FirstPacket::GssEncRequest) => true,
        // PostgreSQL answers a CancelRequest by closing the connection.
        Ok(FirstPacket::Cancel(_)) => false,
        // A malformed or unsupported startup still gets the denial; a client that closed,
        // or bytes the client cannot read as a reply (see `read_startup`), do not.
        Err(f) => !f.client_told,
    };
    if tell {
        let _ = client.write_all(&denial_error(denial)).await;
        let _ = client.flush().await;
    }
    close_gracefully(client).await;
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

    use super::{
        super::{errors::ServerError, messages, startup::Startup},
        *,
    };
    use crate::connector::{
        Connector as _,
        deny::{
            TLS_ACCESS_DENIED,
            testing::{client_program, denial, deny_listener, pair, run},
        },
        pg::{PgConnector, config::PgConfig},
    };

    fn connector() -> PgConnector {
        PgConnector::new(PgConfig::default())
    }

    fn startup() -> Vec<u8> {
        Startup {
            version: messages::PROTOCOL_3_0,
            params: vec![
                (b"user".to_vec(), b"app".to_vec()),
                (b"database".to_vec(), b"orders".to_vec()),
            ],
        }
        .encode()
    }

    /// Everything the broker sends until it closes, which must be a FIN, not a reset.
    async fn rest(client: &mut tokio::net::TcpStream) -> Vec<u8> {
        let mut got = Vec::new();
        tokio::time::timeout(Duration::from_secs(5), client.read_to_end(&mut got))
            .await
            .expect("closed in time")
            .expect("closed without a reset");
        got
    }

    #[tokio::test]
    async fn ssl_request_gets_n_then_the_startup_a_fatal_28000_naming_the_rule() {
        let (broker, mut client) = pair().await;
        let pg = connector();
        let d = denial();
        let task = tokio::spawn(async move { pg.deny(broker, &d).await });
        client.write_all(&messages::ssl_request()).await.unwrap();
        let mut n = [0u8; 1];
        client.read_exact(&mut n).await.unwrap();
        assert_eq!(&n, b"N");
        client.write_all(&startup()).await.unwrap();
        let got = rest(&mut client).await;
        assert_eq!(got[0], b'E');
        let len = u32::from_be_bytes([got[1], got[2], got[3], got[4]]) as usize;
        assert_eq!(got.len(), 1 + len, "one ErrorResponse, then the close");
        let e = ServerError::parse(&got[5..]);
        assert_eq!((e.severity.as_str(), e.code.as_str()), ("FATAL", "28000"));
        assert_eq!(e.message, denial().message());
        assert_eq!(
            e.message,
            "service \"orders-db\": denied by policy (rule \"ops-only\": uid 1000 is not in [0])"
        );
        tokio::time::timeout(Duration::from_secs(5), task)
            .await
            .unwrap()
            .unwrap();
    }

    #[tokio::test]
    async fn gssenc_and_ssl_requests_are_declined_and_a_bare_startup_is_denied() {
        // GSSENCRequest, then SSLRequest (libpq's order with gssencmode=prefer).
        let (broker, mut client) = pair().await;
        tokio::spawn(async move { connector().deny(broker, &denial()).await });
        client
            .write_all(&[0, 0, 0, 8, 4, 210, 22, 48])
            .await
            .unwrap();
        let mut n = [0u8; 1];
        client.read_exact(&mut n).await.unwrap();
        assert_eq!(&n, b"N");
        client.write_all(&messages::ssl_request()).await.unwrap();
        client.read_exact(&mut n).await.unwrap();
        assert_eq!(&n, b"N");
        client.write_all(&startup()).await.unwrap();
        let got = rest(&mut client).await;
        assert_eq!(ServerError::parse(&got[5..]).code, "28000");

        // sslmode=disable: the startup first.
        let (broker, mut client) = pair().await;
        tokio::spawn(async move { connector().deny(broker, &denial()).await });
        client.write_all(&startup()).await.unwrap();
        let got = rest(&mut client).await;
        assert_eq!(got, denial_error(&denial()));
    }

    #[tokio::test]
    async fn a_cancel_request_is_closed_without_a_byte() {
        let (broker, mut client) = pair().await;
        tokio::spawn(async move { connector().deny(broker, &denial()).await });
        let cancel = super::super::startup::CancelKey {
            pid: 42,
            key: vec![1, 2, 3, 4],
        };
        client.write_all(&cancel.cancel_request()).await.unwrap();
        assert!(rest(&mut client).await.is_empty());
    }

    #[tokio::test]
    async fn direct_tls_gets_an_access_denied_alert_and_silence_gets_nothing() {
        let (broker, mut client) = pair().await;
        tokio::spawn(async move { connector().deny(broker, &denial()).await });
        client.write_all(&[0x16, 3, 1, 0, 200, 1]).await.unwrap();
        assert_eq!(rest(&mut client).await, TLS_ACCESS_DENIED);

        // A client that leaves before its startup packet: closed, nothing sent.
        let (broker, mut client) = pair().await;
        let task = tokio::spawn(async move { connector().deny(broker, &denial()).await });
        client.shutdown().await.unwrap();
        assert!(rest(&mut client).await.is_empty());
        tokio::time::timeout(Duration::from_secs(5), task)
            .await
            .unwrap()
            .unwrap();
    }

    /// The real `psql` prints the rule, over every `sslmode` that can reach the
    /// message; `sslmode=require` gets libpq's own "server does not support SSL".
    #[tokio::test]
    async fn psql_prints_the_denial() {
        let Some(psql) = client_program("psql") else {
            return;
        };
        let port = deny_listener(|s| async move { connector().deny(s, &denial()).await }).await;
        for mode in ["prefer", "disable", "allow", "require"] {
            let mut cmd = tokio::process::Command::new(&psql);
            cmd.env("PGCONNECT_TIMEOUT", "5")
                .env_remove("PGPASSWORD")
                .arg("-X")
                .arg("-w")
                .arg(format!(
                    "host=127.0.0.1 port={port} user=app dbname=orders sslmode={mode}"
                ))
                .args(["-c", "select 1"]);
            let out = run(cmd).await;
            let err = String::from_utf8_lossy(&out.stderr);
            assert!(!out.status.success(), "{mode}: {err}");
            if mode == "require" {
                assert!(err.contains("server does not support SSL"), "{mode}: {err}");
            } else {
                assert!(
                    err.contains(&format!("FATAL:  {}", denial().message())),
                    "{mode}: {err}"
                );
            }
        }
    }
}
