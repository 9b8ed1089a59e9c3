//! Wire messages of the PostgreSQL protocol that the broker reads or writes while it
//! sets up a session: backend framing (with an explicit "incomplete") and the few
//! frontend messages it sends.

use bytes::{Bytes, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt};

use crate::connector::ConnError;

/// `SSLRequest` code.
pub const SSL_REQUEST: u32 = 80_877_103;
/// `GSSENCRequest` code.
pub const GSSENC_REQUEST: u32 = 80_877_104;
/// `CancelRequest` code.
pub const CANCEL_REQUEST: u32 = 80_877_102;
/// Protocol 3.0.
pub const PROTOCOL_3_0: u32 = 196_608;
/// Protocol 3.2 (PostgreSQL 18: longer cancel keys).
pub const PROTOCOL_3_2: u32 = 196_610;

/// Largest backend message accepted before the session is relayed.
pub const MAX_BACKEND_MESSAGE: usize = 1024 * 1024;

/// Backend message types the broker looks at.
pub mod tag {
    pub const AUTHENTICATION: u8 = b'R';
    pub const ERROR_RESPONSE: u8 = b'E';
    pub const NOTICE_RESPONSE: u8 = b'N';
    pub const PARAMETER_STATUS: u8 = b'S';
    pub const BACKEND_KEY_DATA: u8 = b'K';
    pub const READY_FOR_QUERY: u8 = b'Z';
    pub const NEGOTIATE_PROTOCOL_VERSION: u8 = b'v';
}

/// Authentication request codes (`R` messages).
pub mod auth {
    pub const OK: u32 = 0;
    pub const KERBEROS_V5: u32 = 2;
    pub const CLEARTEXT_PASSWORD: u32 = 3;
    pub const MD5_PASSWORD: u32 = 5;
    pub const SCM_CREDENTIAL: u32 = 6;
    pub const GSS: u32 = 7;
    pub const GSS_CONTINUE: u32 = 8;
    pub const SSPI: u32 = 9;
    pub const SASL: u32 = 10;
    pub const SASL_CONTINUE: u32 = 11;
    pub const SASL_FINAL: u32 = 12;
}

/// Framing result: `Ok(None)` is "incomplete, read more".
///
/// # Errors
/// When the length field is impossible or larger than `max`.
pub fn backend_frame(buf: &[u8], max: usize) -> Result<Option<usize>, ConnError> {
    if buf.len() < 5 {
        return Ok(None);
    }
    let len = u32::from_be_bytes([buf[1], buf[2], buf[3], buf[4]]) as usize;
    if len < 4 {
        return Err(ConnError::Protocol(format!(
            "server message `{}` has invalid length {len}",
            char::from(buf[0]).escape_default()
        )));
    }
    if len > max {
        return Err(ConnError::Protocol(format!(
            "server message `{}` of {len} bytes is larger than the {max}-byte limit",
            char::from(buf[0]).escape_default()
        )));
    }
    let total = len + 1;
    Ok((buf.len() >= total).then_some(total))
}

/// One backend message, kept as the raw bytes so it can be forwarded as is.
#[derive(Debug, Clone)]
pub struct BackendMessage {
    raw: Bytes,
}

impl BackendMessage {
    #[must_use]
    pub fn tag(&self) -> u8 {
        self.raw[0]
    }

    /// The payload after the type byte and the length.
    #[must_use]
    pub fn body(&self) -> &[u8] {
        &self.raw[5..]
    }

    #[must_use]
    pub fn raw(&self) -> &[u8] {
        &self.raw
    }

    /// For `R` messages: the authentication request code.
    #[must_use]
    pub fn auth_code(&self) -> Option<u32> {
        let b = self.body();
        (self.tag() == tag::AUTHENTICATION && b.len() >= 4)
            .then(|| u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
    }
}

/// Read one backend message from `stream`, buffering in `buf` (bytes after the message
/// stay in `buf`).
///
/// # Errors
/// On I/O errors, an early close, or an invalid/oversized message.
pub async fn read_backend<S>(
    stream: &mut S,
    buf: &mut BytesMut,
) -> Result<BackendMessage, ConnError>
where
    S: AsyncRead + Unpin,
{
    read_backend_max(stream, buf, MAX_BACKEND_MESSAGE).await
}

/// [`read_backend`] with a smaller bound on the message length: the length field is
/// checked before the body is read, so `buf` never grows past `max` plus one read.
///
/// # Errors
/// As [`read_backend`].
pub async fn read_backend_max<S>(
    stream: &mut S,
    buf: &mut BytesMut,
    max: usize,
) -> Result<BackendMessage, ConnError>
where
    S: AsyncRead + Unpin,
{
    loop {
        if let Some(total) = backend_frame(buf, max)? {
            return Ok(BackendMessage {
                raw: buf.split_to(total).freeze(),
            });
        }
        buf.reserve(8 * 1024);
        if stream.read_buf(buf).await? == 0 {
            return Err(ConnError::Io(std::io::Error::new(
                std::io::ErrorKind::UnexpectedEof,
                "upstream closed the connection during startup",
            )));
        }
    }
}

pub(super) fn message(tag: u8, body: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(body.len() + 5);
    out.push(tag);
    out.extend_from_slice(&(body.len() as u32 + 4).to_be_bytes());
    out.extend_from_slice(body);
    out
}

/// `SSLRequest`.
#[must_use]
pub fn ssl_request() -> [u8; 8] {
    let mut out = [0u8; 8];
    out[..4].copy_from_slice(&8u32.to_be_bytes());
    out[4..].copy_from_slice(&SSL_REQUEST.to_be_bytes());
    out
}

/// `AuthenticationOk`.
#[must_use]
pub fn authentication_ok() -> Vec<u8> {
    message(tag::AUTHENTICATION, &auth::OK.to_be_bytes())
}

/// `PasswordMessage` for cleartext and md5 (a NUL-terminated string).
#[must_use]
pub fn password_message(password: &[u8]) -> zeroize::Zeroizing<Vec<u8>> {
    let mut body = zeroize::Zeroizing::new(Vec::with_capacity(password.len() + 1));
    body.extend_from_slice(password);
    body.push(0);
    zeroize::Zeroizing::new(message(b'p', &body))
}

/// `SASLInitialResponse`.
#[must_use]
pub fn sasl_initial_response(mechanism: &str, data: &[u8]) -> Vec<u8> {
    let mut body = Vec::with_capacity(mechanism.len() + data.len() + 5);
    body.extend_from_slice(mechanism.as_bytes());
    body.push(0);
    body.extend_from_slice(&(data.len() as u32).to_be_bytes());
    body.extend_from_slice(data);
    message(b'p', &body)
}

/// `SASLResponse`.
#[must_use]
pub fn sasl_response(data: &[u8]) -> Vec<u8> {
    message(b'p', data)
}

/// The mechanism names of an `AuthenticationSASL` body (after the code).
#[must_use]
pub fn sasl_mechanisms(body_after_code: &[u8]) -> Vec<String> {
    body_after_code
        .split(|&b| b == 0)
        .take_while(|m| !m.is_empty())
        .map(|m| String::from_utf8_lossy(m).into_owned())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_backend_messages() {
        let ok = authentication_ok();
        assert_eq!(ok, b"R\0\0\0\x08\0\0\0\0");
        assert_eq!(backend_frame(&ok, 100).unwrap(), Some(9));
        assert_eq!(backend_frame(&ok[..8], 100).unwrap(), None);
        assert_eq!(backend_frame(&ok[..3], 100).unwrap(), None);
        assert!(backend_frame(b"R\0\0\0\x02", 100).is_err());
        assert!(backend_frame(b"R\0\x10\0\0", 100).is_err());
    }

    #[tokio::test]
    async fn reads_messages_and_keeps_the_rest() {
        let mut wire = authentication_ok();
        wire.extend_from_slice(b"Z\0\0\0\x05I");
        wire.extend_from_slice(b"extra");
        let mut r = &wire[..];
        let mut buf = BytesMut::new();
        let m = read_backend(&mut r, &mut buf).await.unwrap();
        assert_eq!(m.auth_code(), Some(auth::OK));
        let z = read_backend(&mut r, &mut buf).await.unwrap();
        assert_eq!(z.tag(), tag::READY_FOR_QUERY);
        assert_eq!(z.body(), b"I");
        assert_eq!(&buf[..], b"extra");
        assert!(read_backend(&mut r, &mut buf).await.is_err());
    }

    #[test]
    fn builds_frontend_messages() {
        assert_eq!(&password_message(b"pw")[..], b"p\0\0\0\x07pw\0");
        assert_eq!(
            sasl_initial_response("SCRAM-SHA-256", b"n,,"),
            b"p\0\0\0\x19SCRAM-SHA-256\0\0\0\0\x03n,,".to_vec()
        );
        assert_eq!(sasl_response(b"c=biws"), b"p\0\0\0\x0ac=biws".to_vec());
        assert_eq!(ssl_request(), [0, 0, 0, 8, 4, 210, 22, 47]);
        assert_eq!(
            sasl_mechanisms(b"SCRAM-SHA-256-PLUS\0SCRAM-SHA-256\0\0"),
            vec!["SCRAM-SHA-256-PLUS", "SCRAM-SHA-256"]
        );
    }
}
