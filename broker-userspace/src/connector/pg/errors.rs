//! ErrorResponse toward the client: encoding, parsing the server's, and the SQLSTATE
//! each broker failure maps to.

use std::fmt;

use crate::connector::ConnError;

/// SQLSTATE codes the broker itself reports.
pub mod sqlstate {
    /// `connection_failure`: upstream unreachable, TLS failure, upstream gone.
    pub const CONNECTION_FAILURE: &str = "08006";
    /// `sqlserver_rejected_establishment_of_sqlconnection`: credentials could not be
    /// fetched, configuration problems, unsupported upstream authentication.
    pub const REJECTED_ESTABLISHMENT: &str = "08004";
    /// `protocol_violation`.
    pub const PROTOCOL_VIOLATION: &str = "08P01";
    /// `feature_not_supported` (e.g. an unknown frontend protocol version).
    pub const FEATURE_NOT_SUPPORTED: &str = "0A000";
    /// `invalid_password`.
    pub const INVALID_PASSWORD: &str = "28P01";
    /// `invalid_authorization_specification` (also "no pg_hba.conf entry").
    pub const INVALID_AUTHORIZATION: &str = "28000";
    /// `too_many_connections`: a broker connection cap is reached.
    pub const TOO_MANY_CONNECTIONS: &str = "53300";
}

/// Encode an ErrorResponse (`E`) with the fields libpq prints: severity (`S` and the
/// non-localized `V`), SQLSTATE (`C`) and message (`M`).
#[must_use]
pub fn error_response(severity: &str, code: &str, message: &str) -> Vec<u8> {
    let mut body = Vec::with_capacity(message.len() + 32);
    for (tag, value) in [
        (b'S', severity),
        (b'V', severity),
        (b'C', code),
        (b'M', message),
    ] {
        body.push(tag);
        // A NUL would end the field early; the message is ours, but be safe.
        body.extend(value.bytes().filter(|&b| b != 0));
        body.push(0);
    }
    body.push(0);
    let mut out = Vec::with_capacity(body.len() + 5);
    out.push(b'E');
    out.extend_from_slice(&(body.len() as u32 + 4).to_be_bytes());
    out.extend_from_slice(&body);
    out
}

/// The fields of a server ErrorResponse/NoticeResponse body that we log and act on.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ServerError {
    pub severity: String,
    pub code: String,
    pub message: String,
}

impl ServerError {
    /// Parse the body (after the type byte and length) of an ErrorResponse.
    #[must_use]
    pub fn parse(body: &[u8]) -> Self {
        let mut out = Self::default();
        let mut rest = body;
        while let Some((&tag, tail)) = rest.split_first() {
            if tag == 0 {
                break;
            }
            let Some(end) = tail.iter().position(|&b| b == 0) else {
                break;
            };
            let value = String::from_utf8_lossy(&tail[..end]).into_owned();
            match tag {
                b'V' => out.severity = value,
                b'S' if out.severity.is_empty() => out.severity = value,
                b'C' => out.code = value,
                b'M' => out.message = value,
                _ => {}
            }
            rest = &tail[end + 1..];
        }
        out
    }

    /// Whether this is the server refusing the credentials: the case where fetching them
    /// again (rotation) may help.
    #[must_use]
    pub fn is_credential_rejection(&self) -> bool {
        self.code == sqlstate::INVALID_PASSWORD || self.code == sqlstate::INVALID_AUTHORIZATION
    }
}

impl fmt::Display for ServerError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {}: {}", self.severity, self.code, self.message)
    }
}

/// A failed connection attempt: the error for the access log, the SQLSTATE to report,
/// and whether the client has already been told (a server error forwarded as is).
#[derive(Debug)]
pub struct Failure {
    pub err: ConnError,
    pub sqlstate: &'static str,
    pub client_told: bool,
}

impl Failure {
    #[must_use]
    pub fn new(sqlstate: &'static str, err: ConnError) -> Self {
        Self {
            err,
            sqlstate,
            client_told: false,
        }
    }

    /// The client has already received an ErrorResponse for this failure.
    #[must_use]
    pub fn told(err: ConnError) -> Self {
        Self {
            err,
            sqlstate: sqlstate::CONNECTION_FAILURE,
            client_told: true,
        }
    }

    /// The message for the client's ErrorResponse, naming the service.
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

    /// The ErrorResponse to send the client.
    #[must_use]
    pub fn client_error(&self, service: &str) -> Vec<u8> {
        error_response("FATAL", self.sqlstate, &self.client_message(service))
    }
}

impl From<ConnError> for Failure {
    fn from(err: ConnError) -> Self {
        let sqlstate = match &err {
            ConnError::Upstream { .. } | ConnError::Tls { .. } | ConnError::Io(_) => {
                sqlstate::CONNECTION_FAILURE
            }
            ConnError::Credentials(_) | ConnError::Config(_) | ConnError::Refused(_) => {
                sqlstate::REJECTED_ESTABLISHMENT
            }
            ConnError::AuthRejected(_) => sqlstate::INVALID_AUTHORIZATION,
            ConnError::Protocol(_) | ConnError::ClientGone(_) => sqlstate::PROTOCOL_VIOLATION,
        };
        Self::new(sqlstate, err)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn encodes_error_response() {
        let e = error_response("FATAL", "08006", "boom");
        let mut want = vec![b'E'];
        let body = b"SFATAL\0VFATAL\0C08006\0Mboom\0\0";
        want.extend_from_slice(&(body.len() as u32 + 4).to_be_bytes());
        want.extend_from_slice(body);
        assert_eq!(e, want);
        // And it parses back.
        let parsed = ServerError::parse(&e[5..]);
        assert_eq!(parsed.severity, "FATAL");
        assert_eq!(parsed.code, "08006");
        assert_eq!(parsed.message, "boom");
    }

    #[test]
    fn strips_nul_from_fields() {
        let e = error_response("FATAL", "08P01", "a\0b");
        assert_eq!(ServerError::parse(&e[5..]).message, "ab");
    }

    #[test]
    fn parses_server_error_with_extra_fields() {
        let body = b"SFATAL\0VFATAL\0C28P01\0Mpassword authentication failed for user \"u\"\0Fauth.c\0L335\0Rauth_failed\0\0";
        let e = ServerError::parse(body);
        assert_eq!(e.code, "28P01");
        assert!(e.is_credential_rejection());
        assert_eq!(
            e.to_string(),
            "FATAL 28P01: password authentication failed for user \"u\""
        );
        // Truncated input does not panic.
        let _ = ServerError::parse(&body[..7]);
    }

    #[test]
    fn maps_errors_to_sqlstate() {
        let f = Failure::from(ConnError::Upstream {
            addr: "db:5432".into(),
            source: std::io::Error::from(std::io::ErrorKind::ConnectionRefused),
        });
        assert_eq!(f.sqlstate, "08006");
        assert!(
            f.client_message("orders")
                .starts_with("service `orders`: cannot reach upstream db:5432")
        );
        assert_eq!(
            Failure::from(ConnError::from(crate::secrets::CredentialError {
                credential: "password".into(),
                source: crate::secrets::SecretError::NotFound {
                    provider: "file".into(),
                    id: "x".into(),
                },
            }))
            .sqlstate,
            "08004"
        );
        assert_eq!(
            Failure::from(ConnError::Protocol("x".into())).sqlstate,
            "08P01"
        );
        let bytes = Failure::from(ConnError::Protocol("bad".into())).client_error("svc");
        let e = ServerError::parse(&bytes[5..]);
        assert_eq!((e.severity.as_str(), e.code.as_str()), ("FATAL", "08P01"));
    }
}
