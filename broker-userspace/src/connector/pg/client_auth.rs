//! The broker authenticating the client (`config.clientAuth: scram-sha-256`): a SCRAM
//! exchange on the client leg against the service's placeholder password
//! (`clientPassword`), SCRAM-SHA-256-PLUS bound to the certificate the broker presented
//! when the client leg is TLS. It runs after the client's StartupMessage and before the
//! upstream is dialled, so hardened client settings (`channel_binding=require`,
//! `require_auth=scram-sha-256`) find the exchange they insist on. The placeholder is
//! not a secret: SCRAM is mutual (the client checks the server's signature), so the app
//! has to know it; it grants nothing the caller's cgroup does not already grant.

use std::time::Duration;

use bytes::BytesMut;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

use super::{
    client::ClientIo,
    errors::{Failure, error_response, sqlstate},
    messages::{self, auth, tag},
    scram_server::{ScramKeys, ScramServer},
};
use crate::connector::ConnError;

/// How long the client may take for the whole exchange.
pub const CLIENT_AUTH_TIMEOUT: Duration = Duration::from_secs(10);
/// The longest SASL message a client may send (PostgreSQL's are well under 1 KiB).
pub const MAX_SASL_MESSAGE: usize = 4096;

/// Authenticate the client. `pending`: bytes the client sent after its StartupMessage
/// (a client waits for the authentication request, so any is a protocol violation).
///
/// # Errors
/// A failed or malformed exchange; the client has been sent an ErrorResponse (28P01
/// for a wrong password, as PostgreSQL).
pub async fn scram(
    client: &mut ClientIo,
    pending: &BytesMut,
    keys: &ScramKeys,
    user: &str,
) -> Result<(), Failure> {
    if !pending.is_empty() {
        return Err(Failure::new(
            sqlstate::PROTOCOL_VIOLATION,
            ConnError::Protocol("client sent data before the authentication request".into()),
        ));
    }
    let binding = client.channel_binding().map(<[u8]>::to_vec);
    let mut server = ScramServer::with_keys(keys.clone(), binding);
    let exchange = async {
        let mechanisms = server.mechanisms();
        send(client, &sasl_request(&mechanisms)).await?;
        let first = read_sasl(client).await?;
        let (mechanism, data) = parse_initial(&first)?;
        let server_first = server
            .client_first(mechanism, data)
            .map_err(|e| (e.sqlstate(), e.to_string()))?;
        send(client, &authentication(auth::SASL_CONTINUE, &server_first)).await?;
        let last = read_sasl(client).await?;
        let server_final = server
            .client_final(&last)
            .map_err(|e| (e.sqlstate(), e.to_string()))?;
        send(client, &authentication(auth::SASL_FINAL, &server_final)).await?;
        Ok::<(), (&'static str, String)>(())
    };
    match tokio::time::timeout(CLIENT_AUTH_TIMEOUT, exchange).await {
        Ok(Ok(())) => Ok(()),
        Ok(Err((code, why))) => {
            let text = if code == sqlstate::INVALID_PASSWORD {
                format!(
                    "password authentication failed for user \"{user}\" (the service's \
                     clientPassword)"
                )
            } else {
                why.clone()
            };
            let _ = client
                .write_all(&error_response("FATAL", code, &text))
                .await;
            let _ = client.flush().await;
            Err(Failure::told(ConnError::Protocol(format!(
                "client authentication: {why}"
            ))))
        }
        Err(_) => Err(Failure::told(ConnError::Protocol(format!(
            "client authentication took longer than {CLIENT_AUTH_TIMEOUT:?}"
        )))),
    }
}

async fn send(client: &mut ClientIo, msg: &[u8]) -> Result<(), (&'static str, String)> {
    client.write_all(msg).await.map_err(|e| {
        (
            sqlstate::CONNECTION_FAILURE,
            format!("writing to the client: {e}"),
        )
    })?;
    client.flush().await.map_err(|e| {
        (
            sqlstate::CONNECTION_FAILURE,
            format!("writing to the client: {e}"),
        )
    })
}

/// One `p` message (SASLInitialResponse or SASLResponse): its body.
async fn read_sasl(client: &mut ClientIo) -> Result<Vec<u8>, (&'static str, String)> {
    let violation = |m: String| (sqlstate::PROTOCOL_VIOLATION, m);
    let mut head = [0u8; 5];
    client
        .read_exact(&mut head)
        .await
        .map_err(|e| violation(format!("reading the client's SASL message: {e}")))?;
    if head[0] != b'p' {
        return Err(violation(format!(
            "expected a SASL response, got message type {:?}",
            char::from(head[0])
        )));
    }
    let len = u32::from_be_bytes([head[1], head[2], head[3], head[4]]) as usize;
    if !(4..=MAX_SASL_MESSAGE).contains(&len) {
        return Err(violation(format!("invalid SASL message length {len}")));
    }
    let mut body = vec![0u8; len - 4];
    client
        .read_exact(&mut body)
        .await
        .map_err(|e| violation(format!("reading the client's SASL message: {e}")))?;
    Ok(body)
}

/// SASLInitialResponse: mechanism name, NUL, Int32 length (-1: none), data.
fn parse_initial(body: &[u8]) -> Result<(&str, &[u8]), (&'static str, String)> {
    let bad = || {
        (
            sqlstate::PROTOCOL_VIOLATION,
            "malformed SASLInitialResponse".to_owned(),
        )
    };
    let nul = body.iter().position(|&b| b == 0).ok_or_else(bad)?;
    let mechanism = std::str::from_utf8(&body[..nul]).map_err(|_| bad())?;
    let rest = &body[nul + 1..];
    let len_bytes: [u8; 4] = rest
        .get(..4)
        .ok_or_else(bad)?
        .try_into()
        .map_err(|_| bad())?;
    let len = i32::from_be_bytes(len_bytes);
    let data = &rest[4..];
    if len < 0 || len as usize != data.len() {
        return Err(bad());
    }
    Ok((mechanism, data))
}

/// `AuthenticationSASL` with the mechanism names.
fn sasl_request(mechanisms: &[&str]) -> Vec<u8> {
    let mut data = Vec::new();
    for m in mechanisms {
        data.extend_from_slice(m.as_bytes());
        data.push(0);
    }
    data.push(0);
    authentication(auth::SASL, &data)
}

fn authentication(code: u32, data: &[u8]) -> Vec<u8> {
    let mut body = Vec::with_capacity(4 + data.len());
    body.extend_from_slice(&code.to_be_bytes());
    body.extend_from_slice(data);
    messages::message(tag::AUTHENTICATION, &body)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_initial_response_and_frames_requests() {
        let wire = messages::sasl_initial_response("SCRAM-SHA-256", b"n,,n=,r=abc");
        let (m, d) = parse_initial(&wire[5..]).unwrap();
        assert_eq!((m, d), ("SCRAM-SHA-256", &b"n,,n=,r=abc"[..]));
        assert!(parse_initial(b"SCRAM-SHA-256").is_err());
        assert!(parse_initial(b"SCRAM-SHA-256\0\0\0\0\x09abc").is_err());
        let req = sasl_request(&["SCRAM-SHA-256-PLUS", "SCRAM-SHA-256"]);
        assert_eq!(req[0], tag::AUTHENTICATION);
        assert_eq!(
            messages::sasl_mechanisms(&req[9..]),
            vec!["SCRAM-SHA-256-PLUS", "SCRAM-SHA-256"]
        );
    }
}
