//! A connection the policy refused, told in MySQL's words: what a server sends a user it
//! refuses. A greeting of the broker's (nothing is dialled: version
//! [`DENY_VERSION`], `mysql_native_password`, no TLS offered), the client's
//! HandshakeResponse read (one packet, at most [`MAX_PACKET`] bytes) and discarded, then
//! ERR 1045 `28000` naming the rule, and a close without a reset. Clients print
//! `ERROR 1045 (28000): service "db": denied by policy (rule "...": ...)`.
//!
//! Why not an ERR in place of the greeting (as over a connection cap): MariaDB's client
//! library (Connector/C 3.3+, the `mariadb` command line) reports an error received
//! before the TLS it would have negotiated as `ERROR 2002 (HY000): Received error packet
//! before completion of TLS handshake. The authenticity of the following error cannot
//! be verified: 1045 - ...`, and MySQL's reads the SQLSTATE of such an error as part of
//! the message. Answering the HandshakeResponse is what every client reads as a login
//! refused. A client that requires TLS (`--ssl-verify-server-cert`,
//! `ssl-mode=REQUIRED`) stops at the greeting instead ("SSL is required but the server
//! doesn't support it"): terminating TLS takes the local CA, which `deny` is not given.

use bytes::BytesMut;
use mysql_common::constants::{CapabilityFlags as Caps, MariadbCapabilities, StatusFlags};
use tokio::io::AsyncWriteExt as _;

use super::{
    errors::{code, err_payload},
    proto::{self, ClientPacket, MAX_PACKET, ReadError, ServerGreeting},
};
use crate::connector::{AppSocket, Denial, close_gracefully};

/// The server version in a denied client's greeting (no server was asked).
pub const DENY_VERSION: &[u8] = b"8.0.0-broker";

/// `utf8mb4_general_ci`, which every MySQL and MariaDB client knows.
const COLLATION: u8 = 45;

/// The broker's greeting to a denied client.
#[must_use]
pub fn greeting() -> Vec<u8> {
    ServerGreeting {
        version: DENY_VERSION.to_vec(),
        connection_id: 0,
        caps: Caps::CLIENT_LONG_PASSWORD
            | Caps::CLIENT_LONG_FLAG
            | Caps::CLIENT_CONNECT_WITH_DB
            | Caps::CLIENT_PROTOCOL_41
            | Caps::CLIENT_TRANSACTIONS
            | Caps::CLIENT_SECURE_CONNECTION
            | Caps::CLIENT_MULTI_RESULTS
            | Caps::CLIENT_PLUGIN_AUTH
            | Caps::CLIENT_CONNECT_ATTRS
            | Caps::CLIENT_PLUGIN_AUTH_LENENC_CLIENT_DATA,
        ext_caps: MariadbCapabilities::empty(),
        collation: COLLATION,
        status: StatusFlags::SERVER_STATUS_AUTOCOMMIT,
        nonce: Vec::new(),
        plugin: None,
    }
    .client_greeting(&super::scramble(), false)
}

/// The ERR packet a denied client gets, at sequence id `seq`.
#[must_use]
pub fn denial_err(seq: u8, denial: &Denial) -> Vec<u8> {
    let (code, state) = code::ACCESS_DENIED;
    proto::encode(seq, &err_payload(code, state, &denial.message())).to_vec()
}

/// Tell the client the policy denied (see the module docs); the caller bounds it in
/// time.
pub async fn deny(mut client: AppSocket, denial: &Denial) {
    if client
        .write_all(&proto::encode(0, &greeting()))
        .await
        .is_err()
    {
        return;
    }
    let mut buf = BytesMut::with_capacity(1024);
    let seq = match proto::read_packet(&mut client, &mut buf, MAX_PACKET).await {
        // An SSLRequest, though no TLS was offered: the client now waits for a TLS
        // handshake and could not read an ERR.
        Ok(p)
            if matches!(
                ClientPacket::parse(&p.payload, false),
                Ok(ClientPacket::SslRequest)
            ) =>
        {
            None
        }
        Ok(p) => Some(p.seq.wrapping_add(1)),
        // The response is not read; the ERR follows it as the answer to a response.
        Err(ReadError::TooLarge(_)) => Some(2),
        Err(ReadError::Closed | ReadError::Io(_)) => None,
    };
    if let Some(seq) = seq {
        let _ = client.write_all(&denial_err(seq, denial)).await;
        let _ = client.flush().await;
    }
    close_gracefully(client).await;
}
