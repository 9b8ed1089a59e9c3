//! The client's first packets: SSLRequest, GSSENCRequest, CancelRequest, StartupMessage
//! (3.0 and 3.2), and rewriting the startup parameters.
//!
//! Pure functions over bytes: [`frame`] says how long the next packet is (or that more
//! bytes are needed), [`parse`] decodes it.

use std::fmt;

use super::messages::{CANCEL_REQUEST, GSSENC_REQUEST, PROTOCOL_3_0, SSL_REQUEST};

/// Largest startup packet accepted (PostgreSQL itself allows 10000).
pub const MAX_STARTUP_LEN: usize = 10_000;
/// Longest cancel key (protocol 3.2 allows up to 256 bytes).
pub const MAX_CANCEL_KEY: usize = 256;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum StartupError {
    #[error(
        "client opened with TLS (sslnegotiation=direct); use sslmode=disable/prefer toward the broker"
    )]
    TlsHello,
    #[error("startup packet length {0} is out of range (8..={MAX_STARTUP_LEN})")]
    BadLength(usize),
    #[error("malformed startup packet: {0}")]
    Malformed(&'static str),
    #[error("unsupported frontend protocol {}.{}: the broker supports 3.0 to 3.2", .0 >> 16, .0 & 0xffff)]
    UnsupportedVersion(u32),
}

/// The key a client presents to cancel a query: the server's BackendKeyData.
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct CancelKey {
    pub pid: u32,
    /// 4 bytes in protocol 3.0, up to 256 in 3.2.
    pub key: Vec<u8>,
}

impl CancelKey {
    /// Parse a BackendKeyData body.
    #[must_use]
    pub fn from_backend_key_data(body: &[u8]) -> Option<Self> {
        if body.len() < 8 || body.len() > 4 + MAX_CANCEL_KEY {
            return None;
        }
        Some(Self {
            pid: u32::from_be_bytes([body[0], body[1], body[2], body[3]]),
            key: body[4..].to_vec(),
        })
    }

    /// The CancelRequest packet for this key.
    #[must_use]
    pub fn cancel_request(&self) -> Vec<u8> {
        let len = 12 + self.key.len();
        let mut out = Vec::with_capacity(len);
        out.extend_from_slice(&(len as u32).to_be_bytes());
        out.extend_from_slice(&CANCEL_REQUEST.to_be_bytes());
        out.extend_from_slice(&self.pid.to_be_bytes());
        out.extend_from_slice(&self.key);
        out
    }
}

impl fmt::Debug for CancelKey {
    // The key bytes authorize a cancel: keep them out of logs.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "CancelKey(pid {}, {}-byte key)",
            self.pid,
            self.key.len()
        )
    }
}

/// A startup parameter: name and value, as bytes.
pub type Param = (Vec<u8>, Vec<u8>);

/// A StartupMessage: protocol version and parameters in the client's order. Values are
/// bytes (PostgreSQL treats them as C strings, not necessarily UTF-8).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Startup {
    pub version: u32,
    pub params: Vec<Param>,
}

/// The credentials the connector reads itself; any other is a startup parameter.
pub const CONNECTION_CREDENTIALS: &[&str] = &[
    "host",
    "port",
    "address",
    "username",
    "password",
    "database",
    "sslmode",
    "sslrootcert",
    "sslcert",
    "sslkey",
    "sslhost",
    "require_auth",
];

/// As in Secretless: every other credential (`application_name`, `search_path`,
/// `options`...) is sent as a startup parameter, unless the client sent that parameter
/// itself (the client's wins).
///
/// # Errors
/// A parameter that cannot be sent (a NUL byte, not UTF-8, a protocol-reserved name).
/// The message names the credential, never its value.
pub fn add_credential_params(
    startup: &mut Startup,
    creds: &crate::secrets::Credentials,
) -> Result<(), crate::connector::ConnError> {
    for (name, value) in &creds.0 {
        if CONNECTION_CREDENTIALS.contains(&name.as_str()) || startup.get(name).is_some() {
            continue;
        }
        let bad = |why: &str| {
            crate::connector::ConnError::Config(format!(
                "credential `{name}` cannot be sent as a startup parameter: {why}"
            ))
        };
        if name.is_empty() || name.contains('\0') || name == "user" || name.starts_with("_pq_.") {
            return Err(bad("reserved or invalid name"));
        }
        let value = value.expose_str().map_err(|_| bad("not UTF-8"))?;
        if value.contains('\0') {
            return Err(bad("contains a NUL byte"));
        }
        startup.set(name, value);
    }
    Ok(())
}

impl Startup {
    #[must_use]
    pub fn get(&self, name: &str) -> Option<&[u8]> {
        self.params
            .iter()
            .find(|(k, _)| k == name.as_bytes())
            .map(|(_, v)| v.as_slice())
    }

    /// Set a parameter, replacing it in place or appending it.
    pub fn set(&mut self, name: &str, value: &str) {
        match self.params.iter_mut().find(|(k, _)| k == name.as_bytes()) {
            Some((_, v)) => *v = value.as_bytes().to_vec(),
            None => self
                .params
                .push((name.as_bytes().to_vec(), value.as_bytes().to_vec())),
        }
    }

    /// The startup message sent upstream: `user` replaced by the credential user name and
    /// `database` by the credential database when there is one; everything else
    /// (application_name, options, replication, `_pq_.*`) passes through.
    ///
    /// Without a `database` credential, a client that named no database (none sent, or
    /// the one libpq fills in: its own, dummy, user name) gets the brokered user's
    /// default database, as libpq would have asked for with the real user name.
    #[must_use]
    pub fn rewritten(&self, user: Option<&str>, database: Option<&str>) -> Self {
        let mut out = self.clone();
        if let Some(u) = user {
            out.set("user", u);
        }
        match (database, user) {
            (Some(d), _) => out.set("database", d),
            (None, Some(u)) if self.database_defaulted() => out.set("database", u),
            (None, _) => {}
        }
        out
    }

    /// Whether the client named no database of its own: none, empty, or its user name.
    #[must_use]
    pub fn database_defaulted(&self) -> bool {
        match self.get("database") {
            None => true,
            Some(d) => d.is_empty() || Some(d) == self.get("user"),
        }
    }

    #[must_use]
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(64);
        out.extend_from_slice(&[0; 4]);
        out.extend_from_slice(&self.version.to_be_bytes());
        for (k, v) in &self.params {
            out.extend_from_slice(k);
            out.push(0);
            out.extend_from_slice(v);
            out.push(0);
        }
        out.push(0);
        let len = out.len() as u32;
        out[..4].copy_from_slice(&len.to_be_bytes());
        out
    }

    /// Parameter names, for logs (values may be personal).
    #[must_use]
    pub fn param_names(&self) -> String {
        self.params
            .iter()
            .map(|(k, _)| String::from_utf8_lossy(k).into_owned())
            .collect::<Vec<_>>()
            .join(",")
    }
}

/// What the client's first packet was.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FirstPacket {
    SslRequest,
    GssEncRequest,
    Cancel(CancelKey),
    Startup(Startup),
}

/// How long the packet at the start of `buf` is; `Ok(None)` when more bytes are needed.
///
/// # Errors
/// On a TLS ClientHello (direct TLS negotiation) or an impossible length.
pub fn frame(buf: &[u8]) -> Result<Option<usize>, StartupError> {
    if buf.first() == Some(&0x16) {
        // A TLS record header: no valid startup length starts with 0x16.
        return Err(StartupError::TlsHello);
    }
    if buf.len() < 4 {
        return Ok(None);
    }
    let len = u32::from_be_bytes([buf[0], buf[1], buf[2], buf[3]]) as usize;
    if !(8..=MAX_STARTUP_LEN).contains(&len) {
        return Err(StartupError::BadLength(len));
    }
    Ok((buf.len() >= len).then_some(len))
}

/// Decode one complete first packet (as delimited by [`frame`]).
///
/// # Errors
/// On malformed contents or an unsupported protocol version.
pub fn parse(packet: &[u8]) -> Result<FirstPacket, StartupError> {
    let len = frame(packet)?.ok_or(StartupError::Malformed("truncated packet"))?;
    if len != packet.len() {
        return Err(StartupError::Malformed(
            "length field does not match the packet",
        ));
    }
    let code = u32::from_be_bytes([packet[4], packet[5], packet[6], packet[7]]);
    let rest = &packet[8..];
    match code {
        SSL_REQUEST | GSSENC_REQUEST if !rest.is_empty() => Err(StartupError::Malformed(
            "negotiation request with a payload",
        )),
        SSL_REQUEST => Ok(FirstPacket::SslRequest),
        GSSENC_REQUEST => Ok(FirstPacket::GssEncRequest),
        CANCEL_REQUEST => {
            if rest.len() < 8 || rest.len() > 4 + MAX_CANCEL_KEY {
                return Err(StartupError::Malformed("cancel request of invalid length"));
            }
            Ok(FirstPacket::Cancel(CancelKey {
                pid: u32::from_be_bytes([rest[0], rest[1], rest[2], rest[3]]),
                key: rest[4..].to_vec(),
            }))
        }
        // 3.0, 3.2, and any later 3.x: the server negotiates the minor version down
        // (NegotiateProtocolVersion), which the broker passes to the client.
        v if v >> 16 == PROTOCOL_3_0 >> 16 => {
            parse_params(rest).map(|params| FirstPacket::Startup(Startup { version: v, params }))
        }
        v => Err(StartupError::UnsupportedVersion(v)),
    }
}

fn parse_params(mut rest: &[u8]) -> Result<Vec<Param>, StartupError> {
    let mut params = Vec::new();
    loop {
        let Some(end) = rest.iter().position(|&b| b == 0) else {
            return Err(StartupError::Malformed("parameters are not NUL-terminated"));
        };
        if end == 0 {
            // The terminator: nothing may follow.
            if rest.len() != 1 {
                return Err(StartupError::Malformed("bytes after the parameter list"));
            }
            return Ok(params);
        }
        let name = rest[..end].to_vec();
        rest = &rest[end + 1..];
        let Some(vend) = rest.iter().position(|&b| b == 0) else {
            return Err(StartupError::Malformed(
                "parameter value is not NUL-terminated",
            ));
        };
        if params.iter().any(|(k, _): &Param| *k == name) {
            return Err(StartupError::Malformed("duplicate startup parameter"));
        }
        params.push((name, rest[..vend].to_vec()));
        rest = &rest[vend + 1..];
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::connector::pg::messages::PROTOCOL_3_2;

    fn startup_bytes(version: u32, params: &[(&str, &str)]) -> Vec<u8> {
        Startup {
            version,
            params: params
                .iter()
                .map(|(k, v)| (k.as_bytes().to_vec(), v.as_bytes().to_vec()))
                .collect(),
        }
        .encode()
    }

    /// No dbname: libpq sends the (dummy) user's name, other drivers send nothing; the
    /// brokered user's default database is asked for instead, unless the service names
    /// one.
    #[test]
    fn a_defaulted_database_follows_the_brokered_user() {
        let parse = |params: &[(&str, &str)]| {
            let wire = startup_bytes(PROTOCOL_3_0, params);
            match parse(&wire[..]).unwrap() {
                FirstPacket::Startup(s) => s,
                _ => panic!("not a startup"),
            }
        };
        let libpq = parse(&[("user", "dummy"), ("database", "dummy")]);
        let r = libpq.rewritten(Some("app_user"), None);
        assert_eq!(r.get("database"), Some(&b"app_user"[..]));
        let r = libpq.rewritten(Some("app_user"), Some("orders"));
        assert_eq!(r.get("database"), Some(&b"orders"[..]));
        let none = parse(&[("user", "dummy")]);
        let r = none.rewritten(Some("app_user"), None);
        assert_eq!(r.get("database"), Some(&b"app_user"[..]));
        let named = parse(&[("user", "dummy"), ("database", "app")]);
        let r = named.rewritten(Some("app_user"), None);
        assert_eq!(r.get("database"), Some(&b"app"[..]));
        // No brokered user name: nothing to default to.
        let r = none.rewritten(None, None);
        assert_eq!(r.get("database"), None);
    }

    #[test]
    fn other_credentials_are_startup_parameters_the_clients_win() {
        let wire = startup_bytes(
            PROTOCOL_3_0,
            &[("user", "dummy"), ("application_name", "psql")],
        );
        let FirstPacket::Startup(mut s) = parse(&wire[..]).unwrap() else {
            panic!("not a startup")
        };
        let mut creds = crate::secrets::Credentials::default();
        for (k, v) in [
            ("password", "pw-not-a-param"),
            ("sslmode", "require"),
            ("search_path", "app,public"),
            ("application_name", "from-credentials"),
        ] {
            creds
                .0
                .insert(k.to_owned(), crate::secret::Secret::from_str_value(v));
        }
        add_credential_params(&mut s, &creds).unwrap();
        assert_eq!(s.get("search_path"), Some(&b"app,public"[..]));
        assert_eq!(s.get("application_name"), Some(&b"psql"[..]));
        assert_eq!(s.get("password"), None);
        assert_eq!(s.get("sslmode"), None);
        creds.0.insert(
            "_pq_.x".into(),
            crate::secret::Secret::from_str_value("v-not-shown"),
        );
        let e = add_credential_params(&mut s, &creds)
            .unwrap_err()
            .to_string();
        assert!(e.contains("_pq_.x") && !e.contains("v-not-shown"), "{e}");
    }

    #[test]
    fn parses_startup_3_0_and_rewrites_user_only() {
        let wire = startup_bytes(
            PROTOCOL_3_0,
            &[
                ("user", "anything"),
                ("database", "app"),
                ("application_name", "psql"),
                ("options", "-c search_path=x"),
                ("replication", "database"),
            ],
        );
        assert_eq!(frame(&wire).unwrap(), Some(wire.len()));
        let FirstPacket::Startup(s) = parse(&wire).unwrap() else {
            panic!("not a startup")
        };
        assert_eq!(s.version, PROTOCOL_3_0);
        assert_eq!(s.get("user"), Some(&b"anything"[..]));
        let r = s.rewritten(Some("app_user"), None);
        assert_eq!(
            r.encode(),
            startup_bytes(
                PROTOCOL_3_0,
                &[
                    ("user", "app_user"),
                    ("database", "app"),
                    ("application_name", "psql"),
                    ("options", "-c search_path=x"),
                    ("replication", "database"),
                ],
            )
        );
        let r = s.rewritten(Some("app_user"), Some("other"));
        assert_eq!(r.get("database"), Some(&b"other"[..]));
        assert_eq!(r.get("application_name"), Some(&b"psql"[..]));
        assert_eq!(
            s.param_names(),
            "user,database,application_name,options,replication"
        );
    }

    #[test]
    fn parses_startup_3_2_and_adds_missing_params() {
        let wire = startup_bytes(PROTOCOL_3_2, &[("_pq_.x", "1")]);
        let FirstPacket::Startup(s) = parse(&wire).unwrap() else {
            panic!("not a startup")
        };
        assert_eq!(s.version, PROTOCOL_3_2);
        let r = s.rewritten(Some("u"), Some("d"));
        assert_eq!(r.params.len(), 3);
        assert_eq!(r.get("_pq_.x"), Some(&b"1"[..]));
        assert_eq!(r.get("user"), Some(&b"u"[..]));
        // Encoding round-trips.
        assert_eq!(parse(&r.encode()).unwrap(), FirstPacket::Startup(r));
    }

    #[test]
    fn parses_negotiation_requests() {
        assert_eq!(
            parse(&[0, 0, 0, 8, 0x04, 0xd2, 0x16, 0x2f]).unwrap(),
            FirstPacket::SslRequest
        );
        assert_eq!(
            parse(&[0, 0, 0, 8, 0x04, 0xd2, 0x16, 0x30]).unwrap(),
            FirstPacket::GssEncRequest
        );
        assert!(parse(&[0, 0, 0, 9, 0x04, 0xd2, 0x16, 0x2f, 1]).is_err());
    }

    #[test]
    fn parses_cancel_requests() {
        let key = CancelKey {
            pid: 4242,
            key: vec![1, 2, 3, 4],
        };
        let wire = key.cancel_request();
        assert_eq!(wire.len(), 16);
        assert_eq!(&wire[4..8], &[0x04, 0xd2, 0x16, 0x2e]);
        assert_eq!(parse(&wire).unwrap(), FirstPacket::Cancel(key.clone()));
        // 3.2: a 32-byte key.
        let long = CancelKey {
            pid: 7,
            key: vec![9; 32],
        };
        assert_eq!(
            parse(&long.cancel_request()).unwrap(),
            FirstPacket::Cancel(long)
        );
        // Too short.
        assert!(parse(&[0, 0, 0, 12, 0x04, 0xd2, 0x16, 0x2e, 0, 0, 0, 1]).is_err());
        // BackendKeyData body round trip; Debug hides the key.
        let k = CancelKey::from_backend_key_data(&[0, 0, 0x10, 0x92, 1, 2, 3, 4]).unwrap();
        assert_eq!(k, key);
        assert_eq!(format!("{k:?}"), "CancelKey(pid 4242, 4-byte key)");
        assert!(CancelKey::from_backend_key_data(&[0, 0, 0]).is_none());
    }

    #[test]
    fn rejects_oversized_truncated_and_malformed() {
        let mut big = vec![0u8; 4];
        big[..4].copy_from_slice(&(MAX_STARTUP_LEN as u32 + 1).to_be_bytes());
        assert_eq!(
            frame(&big),
            Err(StartupError::BadLength(MAX_STARTUP_LEN + 1))
        );
        assert_eq!(frame(&[0, 0, 0, 4]), Err(StartupError::BadLength(4)));
        let wire = startup_bytes(PROTOCOL_3_0, &[("user", "u")]);
        // Truncated: framing asks for more; parsing refuses.
        assert_eq!(frame(&wire[..wire.len() - 1]).unwrap(), None);
        assert_eq!(frame(&wire[..2]).unwrap(), None);
        assert!(parse(&wire[..wire.len() - 1]).is_err());
        // Missing final terminator.
        let mut bad = wire.clone();
        bad.pop();
        bad[3] -= 1;
        assert!(matches!(parse(&bad), Err(StartupError::Malformed(_))));
        // Name without value.
        let mut bad = vec![0, 0, 0, 0, 0, 3, 0, 0];
        bad.extend_from_slice(b"user\0");
        let n = bad.len() as u32;
        bad[..4].copy_from_slice(&n.to_be_bytes());
        assert!(matches!(parse(&bad), Err(StartupError::Malformed(_))));
        // Duplicate.
        let dup = startup_bytes(PROTOCOL_3_0, &[("user", "a"), ("user", "b")]);
        assert!(parse(&dup).is_err());
        // Protocol 2.0.
        let old = startup_bytes(0x0002_0000, &[("user", "u")]);
        assert_eq!(
            parse(&old),
            Err(StartupError::UnsupportedVersion(0x0002_0000))
        );
        // TLS ClientHello.
        assert_eq!(frame(&[0x16, 3, 1, 0, 200]), Err(StartupError::TlsHello));
    }
}
