//! ERR packets toward the client: the error code and SQLSTATE each broker failure maps
//! to, the message naming the service, and the server's own errors.

use std::fmt;

use mysql_common::{
    io::ParseBuf,
    packets::{ErrPacket, ServerError as ErrBody, SqlState},
    proto::MySerialize as _,
};

use crate::connector::ConnError;

/// The error codes the broker itself reports (MySQL's numbers, so clients show the usual
/// text and drivers map them to their usual exceptions), with their SQLSTATE.
///
/// Every code is a server code (below 2000): MariaDB Connector/C (libmariadb 3.3+, the
/// `mariadb` command line) reports a code of the client range (2000-2999, e.g. 2003
/// "can't connect") received from a server as "2027 Received malformed packet" and drops
/// the message, so an unreachable upstream or a TLS failure is `1429` ("Unable to connect
/// to foreign data source") with a message naming the service and the cause.
pub mod code {
    /// `ER_ACCESS_DENIED_ERROR`: the server refused the brokered credentials (after the
    /// retry with fresh ones).
    pub const ACCESS_DENIED: (u16, &str) = (1045, "28000");
    /// `ER_CON_COUNT_ERROR`: a broker connection cap is reached.
    pub const TOO_MANY_CONNECTIONS: (u16, &str) = (1040, "08004");
    /// `ER_CONNECT_TO_FOREIGN_DATA_SOURCE`: the upstream cannot be reached (what a client
    /// library would call 2003).
    pub const CANNOT_REACH: (u16, &str) = (1429, "HY000");
    /// `ER_CONNECT_TO_FOREIGN_DATA_SOURCE`: TLS with the upstream failed (2026 for a
    /// client library).
    pub const TLS: (u16, &str) = (1429, "HY000");
    /// `ER_HANDSHAKE_ERROR`: the client asked for TLS, which the service refuses
    /// (`config.clientTLS: refuse`).
    pub const CLIENT_TLS_REFUSED: (u16, &str) = (1043, "08S01");
    /// `ER_CONNECT_TO_FOREIGN_DATA_SOURCE` ("Unable to connect to foreign data source"):
    /// the upstream went away during the handshake, or sent something that is not MySQL.
    pub const UPSTREAM_FAILED: (u16, &str) = (1429, "HY000");
    /// `ER_HANDSHAKE_ERROR` ("Bad handshake"): the client's handshake is not usable.
    pub const BAD_HANDSHAKE: (u16, &str) = (1043, "08S01");
    /// `ER_NOT_SUPPORTED_AUTH_MODE`: the upstream asked for an authentication the broker
    /// does not do (or not over this transport).
    pub const AUTH_MODE: (u16, &str) = (1251, "08004");
    /// `ER_UNKNOWN_ERROR`: the broker's own configuration or secret store failed.
    pub const BROKER: (u16, &str) = (1105, "HY000");
}

/// The longest message put in an ERR packet (the MySQL client library keeps 512 bytes).
pub const MAX_MESSAGE: usize = 500;

/// An ERR packet's payload: `0xFF`, the code, `#` and the SQLSTATE, the message (cut at
/// [`MAX_MESSAGE`] bytes on a character boundary, NUL bytes removed).
#[must_use]
pub fn err_payload(code: u16, sqlstate: &str, message: &str) -> Vec<u8> {
    let mut state = [b'H', b'Y', b'0', b'0', b'0'];
    if sqlstate.len() == 5 && sqlstate.is_ascii() {
        state.copy_from_slice(sqlstate.as_bytes());
    }
    let mut end = message.len().min(MAX_MESSAGE);
    while !message.is_char_boundary(end) {
        end -= 1;
    }
    let msg: Vec<u8> = message.as_bytes()[..end]
        .iter()
        .copied()
        .filter(|&b| b != 0)
        .collect();
    let mut out = Vec::with_capacity(msg.len() + 9);
    ErrPacket::Error(ErrBody::new(code, Some(SqlState::new(state)), msg)).serialize(&mut out);
    out
}

/// An error the server sent (an ERR packet), as we log and forward it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServerError {
    pub code: u16,
    /// `HY000` when the server sent none (errors before the handshake may lack it).
    pub sqlstate: String,
    pub message: String,
}

impl ServerError {
    /// Parse an ERR packet's payload (starting with `0xFF`); with or without the
    /// SQLSTATE marker (a server refusing before the handshake sends none).
    #[must_use]
    pub fn parse(payload: &[u8]) -> Option<Self> {
        use mysql_common::constants::CapabilityFlags;
        if payload.first() != Some(&0xFF) {
            return None;
        }
        let caps = if payload.get(3) == Some(&b'#') {
            CapabilityFlags::CLIENT_PROTOCOL_41
        } else {
            CapabilityFlags::empty()
        };
        let packet: ErrPacket<'_> = ParseBuf(payload).parse(caps).ok()?;
        let ErrPacket::Error(e) = packet else {
            return None;
        };
        let mut message = e.message_str().into_owned();
        if message.len() > MAX_MESSAGE {
            let mut end = MAX_MESSAGE;
            while !message.is_char_boundary(end) {
                end -= 1;
            }
            message.truncate(end);
        }
        Some(Self {
            code: e.error_code(),
            sqlstate: e
                .sql_state_ref()
                .map_or_else(|| "HY000".to_owned(), |s| s.as_str().into_owned()),
            message,
        })
    }

    /// The server refused the credentials: worth fetching them again (rotation).
    /// 1045 `ER_ACCESS_DENIED_ERROR`; 1698 `ER_ACCESS_DENIED_NO_PASSWORD_ERROR`.
    #[must_use]
    pub fn is_credential_rejection(&self) -> bool {
        matches!(self.code, 1045 | 1698)
    }
}

impl fmt::Display for ServerError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "ERROR {} ({}): {}",
            self.code, self.sqlstate, self.message
        )
    }
}

/// A failed connection: the error for the access log, the code and SQLSTATE the client
/// is told, and whether it has been told already.
#[derive(Debug)]
pub struct Failure {
    pub err: ConnError,
    pub code: u16,
    pub sqlstate: String,
    pub client_told: bool,
}

impl Failure {
    #[must_use]
    pub fn new((code, sqlstate): (u16, &str), err: ConnError) -> Self {
        Self {
            err,
            code,
            sqlstate: sqlstate.to_owned(),
            client_told: false,
        }
    }

    /// Nothing more can be told to the client (it has its answer, or it is gone).
    #[must_use]
    pub fn told(err: ConnError) -> Self {
        Self {
            client_told: true,
            ..Self::from(err)
        }
    }

    /// A server error other than a credential rejection: the client gets the server's
    /// code and SQLSTATE, with the message prefixed by the service.
    #[must_use]
    pub fn server(e: &ServerError) -> Self {
        Self {
            code: e.code,
            sqlstate: e.sqlstate.clone(),
            err: ConnError::Refused(e.to_string()),
            client_told: false,
        }
    }

    /// The message for the client's ERR packet, naming the service. Never a secret: the
    /// errors carry none.
    #[must_use]
    pub fn client_message(&self, service: &str) -> String {
        let detail = match &self.err {
            ConnError::Upstream { addr, source } => {
                format!("cannot reach upstream {addr}: {source}")
            }
            ConnError::Tls { addr, reason } => format!("TLS with upstream {addr} failed: {reason}"),
            ConnError::Credentials(m) => format!("fetching credentials failed: {m}"),
            ConnError::AuthRejected(m) => format!("upstream rejected the credentials: {m}"),
            ConnError::Refused(m) => format!("upstream refused the session: {m}"),
            ConnError::Protocol(m) => format!("protocol error: {m}"),
            ConnError::ClientGone(m) => format!("client closed the connection: {m}"),
            ConnError::Config(m) => format!("configuration: {m}"),
            ConnError::Io(e) => format!("i/o error: {e}"),
        };
        format!("service `{service}`: {detail}")
    }

    /// The ERR packet's payload for the client.
    #[must_use]
    pub fn client_error(&self, service: &str) -> Vec<u8> {
        err_payload(self.code, &self.sqlstate, &self.client_message(service))
    }
}

impl From<ConnError> for Failure {
    fn from(err: ConnError) -> Self {
        let c = match &err {
            ConnError::Upstream { .. } => code::CANNOT_REACH,
            ConnError::Tls { .. } => code::TLS,
            ConnError::Io(_) => code::UPSTREAM_FAILED,
            ConnError::Credentials(_) | ConnError::Config(_) | ConnError::Refused(_) => {
                code::BROKER
            }
            ConnError::AuthRejected(_) => code::ACCESS_DENIED,
            ConnError::Protocol(_) | ConnError::ClientGone(_) => code::BAD_HANDSHAKE,
        };
        Self::new(c, err)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn err_packet_bytes() {
        let p = err_payload(1045, "28000", "no");
        assert_eq!(p, b"\xff\x15\x04#28000no");
        // A bad SQLSTATE becomes HY000; NUL bytes go; long messages are cut on a
        // character boundary.
        let p = err_payload(2003, "x", "a\0b");
        assert_eq!(p, b"\xff\xd3\x07#HY000ab");
        let long = "é".repeat(400);
        let p = err_payload(1105, "HY000", &long);
        assert!(p.len() - 9 <= MAX_MESSAGE);
        assert!(std::str::from_utf8(&p[9..]).is_ok());
    }

    #[test]
    fn parses_server_errors_with_and_without_sqlstate() {
        let e = ServerError::parse(&err_payload(1045, "28000", "Access denied")).unwrap();
        assert_eq!(e.to_string(), "ERROR 1045 (28000): Access denied");
        assert!(e.is_credential_rejection());
        // Before the handshake: no marker (MySQL's "Host ... is blocked").
        let e = ServerError::parse(b"\xff\x69\x04Host 'x' is blocked").unwrap();
        assert_eq!((e.code, e.sqlstate.as_str()), (1129, "HY000"));
        assert_eq!(e.message, "Host 'x' is blocked");
        assert!(!e.is_credential_rejection());
        assert!(ServerError::parse(b"\x00\x00").is_none());
        assert!(ServerError::parse(b"\xff").is_none());
    }

    #[test]
    fn failures_name_the_service() {
        let f = Failure::from(ConnError::Upstream {
            addr: "db:3306".into(),
            source: std::io::Error::from(std::io::ErrorKind::ConnectionRefused),
        });
        assert_eq!((f.code, f.sqlstate.as_str()), (1429, "HY000"));
        let p = f.client_error("orders");
        let e = ServerError::parse(&p).unwrap();
        assert!(
            e.message
                .starts_with("service `orders`: cannot reach upstream db:3306"),
            "{e}"
        );
        let f = Failure::server(&ServerError {
            code: 1049,
            sqlstate: "42000".into(),
            message: "Unknown database 'x'".into(),
        });
        let e = ServerError::parse(&f.client_error("orders")).unwrap();
        assert_eq!((e.code, e.sqlstate.as_str()), (1049, "42000"));
        assert_eq!(
            e.message,
            "service `orders`: upstream refused the session: ERROR 1049 (42000): Unknown \
             database 'x'"
        );
        assert_eq!(
            Failure::from(ConnError::AuthRejected("x".into())).code,
            1045
        );
    }
}
