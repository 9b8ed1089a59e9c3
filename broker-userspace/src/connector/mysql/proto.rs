//! The packets of MySQL's connection phase, as bytes: framing (a 3-byte length and a
//! sequence id before every payload), the server's greeting and the one the broker sends
//! the client, the client's SSLRequest and HandshakeResponse41, the broker's own
//! response upstream and the capability flags of both legs. The packets themselves are
//! parsed and serialized by `mysql_common`; this module decides what goes in them.

use std::collections::HashMap;

use bytes::{Buf as _, BytesMut};
use mysql_common::{
    constants::{CapabilityFlags as Caps, MariadbCapabilities, StatusFlags},
    io::ParseBuf,
    packets::{AuthPlugin, HandshakePacket, HandshakeResponse, SslRequest},
    proto::MySerialize as _,
};
use tokio::io::{AsyncRead, AsyncReadExt as _};
use zeroize::Zeroizing;

use super::errors::ServerError;

/// The largest packet of the connection phase the broker reads (greetings, handshake
/// responses, authentication exchanges are all far smaller; an RSA public key is under
/// 1 KiB). A bigger length is refused before anything is buffered.
pub const MAX_PACKET: usize = 64 * 1024;

/// The largest payload one packet carries (a longer one is split, which the connection
/// phase never needs).
pub const MAX_PAYLOAD: usize = 0xFF_FFFF;

/// The auth plugin the broker names in its greeting to the client. Its client side
/// sends the scramble and waits for OK or ERR, whatever the answer (the client's
/// credentials are never checked: the kernel identified the caller).
pub const CLIENT_PLUGIN: &[u8] = b"mysql_native_password";

/// Flags that never reach either leg: compression (the byte phase is relayed or spliced
/// as is), and flags only a client sets for itself.
const NEVER: Caps = Caps::CLIENT_COMPRESS
    .union(Caps::CLIENT_ZSTD_COMPRESSION_ALGORITHM)
    .union(Caps::CLIENT_SSL_VERIFY_SERVER_CERT)
    .union(Caps::CLIENT_REMEMBER_OPTIONS);

/// Flags that only shape the connection phase, which each leg negotiates on its own; all
/// the others shape the session's packets and must be the same on both legs.
const AUTH_PHASE: Caps = Caps::CLIENT_SSL
    .union(Caps::CLIENT_CONNECT_WITH_DB)
    .union(Caps::CLIENT_PLUGIN_AUTH)
    .union(Caps::CLIENT_PLUGIN_AUTH_LENENC_CLIENT_DATA)
    .union(Caps::CLIENT_CONNECT_ATTRS)
    .union(Caps::CLIENT_SECURE_CONNECTION);

/// One packet: its sequence id and payload.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Packet {
    pub seq: u8,
    pub payload: Vec<u8>,
}

/// Why the bytes are not a usable packet.
#[derive(Debug, thiserror::Error)]
pub enum ReadError {
    #[error("packet of {0} bytes is over the connection phase's limit of {MAX_PACKET}")]
    TooLarge(usize),
    #[error("connection closed")]
    Closed,
    #[error("{0}")]
    Io(#[from] std::io::Error),
}

/// Take one whole packet off the front of `buf`: `Ok(None)` when more bytes are needed.
///
/// # Errors
/// A length over `max` (checked on the header, before the payload is waited for).
pub fn frame(buf: &mut BytesMut, max: usize) -> Result<Option<Packet>, ReadError> {
    if buf.len() < 4 {
        return Ok(None);
    }
    let len = usize::from(buf[0]) | usize::from(buf[1]) << 8 | usize::from(buf[2]) << 16;
    if len > max {
        return Err(ReadError::TooLarge(len));
    }
    if buf.len() < 4 + len {
        return Ok(None);
    }
    let seq = buf[3];
    buf.advance(4);
    Ok(Some(Packet {
        seq,
        payload: buf.split_to(len).to_vec(),
    }))
}

/// Read one packet (at most `max` bytes), keeping what follows it in `buf`.
///
/// # Errors
/// End of stream before a whole packet, I/O errors, an oversized packet.
pub async fn read_packet<R: AsyncRead + Unpin>(
    r: &mut R,
    buf: &mut BytesMut,
    max: usize,
) -> Result<Packet, ReadError> {
    loop {
        if let Some(p) = frame(buf, max)? {
            return Ok(p);
        }
        buf.reserve(4096);
        if r.read_buf(buf).await? == 0 {
            return Err(ReadError::Closed);
        }
    }
}

/// A packet on the wire: header and payload. Zeroized when dropped (it may carry the
/// password).
///
/// # Panics
/// On a payload of [`MAX_PAYLOAD`] bytes or more (the connection phase sends none).
#[must_use]
pub fn encode(seq: u8, payload: &[u8]) -> Zeroizing<Vec<u8>> {
    assert!(
        payload.len() < MAX_PAYLOAD,
        "connection-phase packet too large"
    );
    let mut out = Zeroizing::new(Vec::with_capacity(payload.len() + 4));
    let len = u32::try_from(payload.len()).expect("checked").to_le_bytes();
    out.extend_from_slice(&len[..3]);
    out.push(seq);
    out.extend_from_slice(payload);
    out
}

/// Whether a payload is an OK packet (`0x00`, at least 7 bytes).
#[must_use]
pub fn is_ok(payload: &[u8]) -> bool {
    payload.first() == Some(&0x00) && payload.len() >= 7
}

/// Why a packet of the connection phase is not usable.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ProtoError {
    #[error("{0}")]
    Malformed(&'static str),
    #[error("{0}")]
    Unsupported(&'static str),
}

/// The server's greeting (Handshake v10), the fields the broker uses.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServerGreeting {
    /// As the server sent it: MariaDB's `5.5.5-` prefix and TiDB's `-TiDB-v...` kept.
    pub version: Vec<u8>,
    pub connection_id: u32,
    pub caps: Caps,
    /// MariaDB's extended capabilities (in the reserved bytes, when the server does not
    /// set `CLIENT_LONG_PASSWORD`, which MariaDB calls `CLIENT_MYSQL`).
    pub ext_caps: MariadbCapabilities,
    pub collation: u8,
    pub status: StatusFlags,
    /// The scramble: 20 bytes.
    pub nonce: Vec<u8>,
    /// The default auth plugin, when the server names one.
    pub plugin: Option<Vec<u8>>,
}

/// What a server says first.
#[derive(Debug)]
pub enum ServerHello {
    Greeting(ServerGreeting),
    /// It refuses the connection before any handshake ("Too many connections", "Host
    /// ... is blocked").
    Error(ServerError),
}

impl ServerGreeting {
    /// Parse the server's first packet.
    ///
    /// # Errors
    /// Not a Handshake v10, or a server too old for the 4.1 protocol (every MySQL since
    /// 4.1, MariaDB and TiDB speak it).
    pub fn parse(payload: &[u8]) -> Result<ServerHello, ProtoError> {
        if payload.first() == Some(&0xFF) {
            return ServerError::parse(payload)
                .map(ServerHello::Error)
                .ok_or(ProtoError::Malformed("unreadable ERR packet"));
        }
        if payload.first() != Some(&10) {
            return Err(ProtoError::Unsupported(
                "not a MySQL protocol 10 greeting (a server of another protocol, or older \
                 than MySQL 4.1)",
            ));
        }
        let h: HandshakePacket<'_> = ParseBuf(payload)
            .parse(())
            .map_err(|_| ProtoError::Malformed("truncated server greeting"))?;
        let caps = h.capabilities();
        if !caps.contains(Caps::CLIENT_PROTOCOL_41 | Caps::CLIENT_SECURE_CONNECTION) {
            return Err(ProtoError::Unsupported(
                "the server does not speak the 4.1 protocol (CLIENT_PROTOCOL_41, \
                 CLIENT_SECURE_CONNECTION)",
            ));
        }
        let mut nonce = h.nonce();
        nonce.truncate(20);
        Ok(ServerHello::Greeting(Self {
            version: h.server_version_ref().to_vec(),
            connection_id: h.connection_id(),
            caps,
            ext_caps: if caps.contains(Caps::CLIENT_LONG_PASSWORD) {
                MariadbCapabilities::empty()
            } else {
                h.mariadb_ext_capabilities()
            },
            collation: h.default_collation(),
            status: h.status_flags(),
            nonce,
            plugin: h.auth_plugin_name_ref().map(<[u8]>::to_vec),
        }))
    }

    /// The flags the broker offers the client: the server's, without compression, with
    /// TLS when the broker terminates it (whatever the server's).
    #[must_use]
    pub fn offered_caps(&self, offer_tls: bool) -> Caps {
        let mut c = (self.caps - NEVER - Caps::CLIENT_SSL) | Caps::CLIENT_PLUGIN_AUTH;
        if offer_tls {
            c |= Caps::CLIENT_SSL;
        }
        c
    }

    /// The greeting for the client: the server's version, connection id (so `KILL
    /// QUERY <id>` from another connection works), collation, status and MariaDB
    /// extended capabilities; a fresh `scramble`; [`Self::offered_caps`]; and
    /// [`CLIENT_PLUGIN`].
    #[must_use]
    pub fn client_greeting(&self, scramble: &[u8; 20], offer_tls: bool) -> Vec<u8> {
        let mut part2 = scramble[8..].to_vec();
        part2.push(0);
        let first: [u8; 8] = scramble[..8].try_into().expect("20 bytes");
        let h = HandshakePacket::new(
            10,
            self.version.as_slice(),
            self.connection_id,
            first,
            Some(part2),
            self.offered_caps(offer_tls),
            self.collation,
            self.status,
            Some(CLIENT_PLUGIN),
        )
        .with_mariadb_ext_capabilities(self.ext_caps);
        let mut out = Vec::with_capacity(96 + self.version.len());
        h.serialize(&mut out);
        out
    }
}

/// The client's HandshakeResponse41, the fields the broker keeps.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClientResponse {
    pub caps: Caps,
    pub ext_caps: MariadbCapabilities,
    pub max_packet: u32,
    pub collation: u8,
    /// The name the app logged in with (replaced upstream; logged only at debug).
    pub user: Vec<u8>,
    pub database: Option<Vec<u8>>,
    /// The auth plugin the client named (whatever it is, the broker accepts).
    pub plugin: Option<Vec<u8>>,
    pub attrs: Option<HashMap<String, String>>,
}

/// The client's first packet after the greeting.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ClientPacket {
    /// SSLRequest: TLS first, then the HandshakeResponse.
    SslRequest,
    Response(ClientResponse),
}

impl ClientPacket {
    /// Parse the client's answer to the greeting; `tls`: the leg is TLS already (the
    /// response after TLS carries `CLIENT_SSL` too).
    ///
    /// # Errors
    /// A truncated packet, or a client of the pre-4.1 protocol.
    pub fn parse(payload: &[u8], tls: bool) -> Result<Self, ProtoError> {
        let Some(flags) = payload.get(..4) else {
            return Err(ProtoError::Malformed("truncated handshake response"));
        };
        let caps = Caps::from_bits_truncate(u32::from_le_bytes(flags.try_into().expect("4 bytes")));
        if !caps.contains(Caps::CLIENT_PROTOCOL_41) {
            return Err(ProtoError::Unsupported(
                "the client speaks the pre-4.1 protocol (no CLIENT_PROTOCOL_41)",
            ));
        }
        if caps.contains(Caps::CLIENT_SSL) && !tls {
            // As the server does: the SSL flag makes it an SSLRequest, whatever follows.
            let _: SslRequest = ParseBuf(payload)
                .parse(())
                .map_err(|_| ProtoError::Malformed("truncated SSLRequest"))?;
            return Ok(Self::SslRequest);
        }
        let r: HandshakeResponse<'_> = ParseBuf(payload)
            .parse(())
            .map_err(|_| ProtoError::Malformed("truncated handshake response"))?;
        Ok(Self::Response(ClientResponse {
            caps: r.capabilities(),
            ext_caps: r.mariadb_ext_capabilities(),
            max_packet: u32::from_le_bytes(payload[4..8].try_into().expect("parsed")),
            collation: r.collation(),
            user: r.user().to_vec(),
            database: r.db_name().map(<[u8]>::to_vec),
            plugin: r.auth_plugin().map(|p| p.as_bytes().to_vec()),
            attrs: r.connect_attributes(),
        }))
    }
}

/// The capability flags the broker sends upstream: the client's session-shaping flags
/// the server has (so both legs format the session's packets alike), the 4.1
/// authentication flags the server offers, connect attributes when the client sent some
/// and the server takes them, the database flag when the response names one (`has_db`),
/// TLS per `sslmode`, never compression. The SSLRequest and the response carry the same
/// flags (MariaDB keeps the SSLRequest's).
#[must_use]
pub fn upstream_caps(
    client: &ClientResponse,
    server: &ServerGreeting,
    tls: bool,
    has_db: bool,
) -> Caps {
    let mut c = session_caps(client, server);
    c |= Caps::CLIENT_PROTOCOL_41 | Caps::CLIENT_SECURE_CONNECTION;
    c |= server.caps & (Caps::CLIENT_PLUGIN_AUTH | Caps::CLIENT_PLUGIN_AUTH_LENENC_CLIENT_DATA);
    if client.attrs.is_some() {
        c |= server.caps & Caps::CLIENT_CONNECT_ATTRS;
    }
    if has_db {
        c |= Caps::CLIENT_CONNECT_WITH_DB;
    }
    if tls {
        c |= Caps::CLIENT_SSL;
    }
    c
}

/// The session-shaping flags the client negotiated with the broker; a server the broker
/// reconnects to (credential rotation) must offer every one of them.
#[must_use]
pub fn session_caps(client: &ClientResponse, server: &ServerGreeting) -> Caps {
    (client.caps & server.caps) - NEVER - AUTH_PHASE
}

/// MariaDB extended capabilities upstream: the client's, where the server has them
/// (none to a MySQL server).
#[must_use]
pub fn upstream_ext_caps(client: &ClientResponse, server: &ServerGreeting) -> MariadbCapabilities {
    client.ext_caps & server.ext_caps
}

/// The SSLRequest the broker sends upstream before TLS (the same flags as the response
/// that follows it).
#[must_use]
pub fn ssl_request(caps: Caps, ext: MariadbCapabilities, client: &ClientResponse) -> Vec<u8> {
    let mut out = Vec::with_capacity(32);
    SslRequest::new(caps | Caps::CLIENT_SSL, client.max_packet, client.collation)
        .with_mariadb_capabilities(ext)
        .serialize(&mut out);
    out
}

/// What the broker's HandshakeResponse41 upstream carries besides the client's settings.
pub struct Login<'a> {
    pub caps: Caps,
    pub ext_caps: MariadbCapabilities,
    pub user: &'a [u8],
    pub database: Option<&'a [u8]>,
    /// The plugin the auth data is for (`None` when the server has no plugin auth).
    pub plugin: Option<&'a [u8]>,
    pub auth: &'a [u8],
}

/// The broker's HandshakeResponse41: the client's max packet size, collation and
/// connect attributes; the brokered user and database and the broker's auth data.
/// Zeroized when dropped.
#[must_use]
pub fn handshake_response(login: &Login<'_>, client: &ClientResponse) -> Zeroizing<Vec<u8>> {
    let attrs = if login.caps.contains(Caps::CLIENT_CONNECT_ATTRS) {
        client.attrs.clone()
    } else {
        None
    };
    let r = HandshakeResponse::new(
        Some(login.auth),
        // Only used to choose a default collation, replaced below by the client's.
        (8, 0, 0),
        Some(login.user),
        login.database,
        login.plugin.map(AuthPlugin::from_bytes),
        login.caps,
        attrs,
        client.max_packet,
    )
    .with_mariadb_ext_capabilities(login.ext_caps);
    let mut out = Zeroizing::new(Vec::with_capacity(128));
    r.serialize(&mut out);
    // The collation byte follows the flags and the max packet size; mysql_common picks
    // one from the server version, the client's choice is what the session must have.
    out[8] = client.collation;
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A MariaDB 10.11 greeting as captured (connection id 3, caps without
    /// CLIENT_LONG_PASSWORD, extended caps 0x1d, plugin mysql_native_password).
    fn mariadb_greeting() -> Vec<u8> {
        let mut g = vec![10];
        g.extend_from_slice(b"5.5.5-10.11.19-MariaDB-0+deb12u1\0");
        g.extend_from_slice(&3u32.to_le_bytes());
        g.extend_from_slice(b"abcdefgh\0");
        let caps: u32 = 0xf7fe | (0x81bf << 16);
        g.extend_from_slice(&(caps as u16).to_le_bytes());
        g.push(45);
        g.extend_from_slice(&2u16.to_le_bytes());
        g.extend_from_slice(&((caps >> 16) as u16).to_le_bytes());
        g.push(21);
        g.extend_from_slice(&[0; 6]);
        g.extend_from_slice(&0x1du32.to_le_bytes());
        g.extend_from_slice(b"ijklmnopqrst\0");
        g.extend_from_slice(b"mysql_native_password\0");
        g
    }

    fn greeting() -> ServerGreeting {
        match ServerGreeting::parse(&mariadb_greeting()).unwrap() {
            ServerHello::Greeting(g) => g,
            ServerHello::Error(e) => panic!("{e}"),
        }
    }

    #[test]
    fn frames_packets_and_waits_for_more() {
        let mut buf = BytesMut::from(&b"\x03\x00\x00\x07ab"[..]);
        assert!(frame(&mut buf, MAX_PACKET).unwrap().is_none());
        buf.extend_from_slice(b"c\x01\x00\x00\x08");
        let p = frame(&mut buf, MAX_PACKET).unwrap().unwrap();
        assert_eq!((p.seq, p.payload.as_slice()), (7, &b"abc"[..]));
        assert!(frame(&mut buf, MAX_PACKET).unwrap().is_none());
        buf.extend_from_slice(b"z");
        let p = frame(&mut buf, MAX_PACKET).unwrap().unwrap();
        assert_eq!((p.seq, p.payload.as_slice()), (8, &b"z"[..]));
        assert!(buf.is_empty());
        // Oversized: refused on the header alone.
        let mut buf = BytesMut::from(&b"\xff\xff\xff\x00"[..]);
        assert!(matches!(
            frame(&mut buf, MAX_PACKET),
            Err(ReadError::TooLarge(0xFF_FFFF))
        ));
        assert_eq!(&encode(5, b"abc")[..], b"\x03\x00\x00\x05abc");
        assert_eq!(&encode(0, b"")[..], b"\x00\x00\x00\x00");
    }

    #[tokio::test]
    async fn reads_packets_across_reads_and_reports_early_close() {
        let (mut a, mut b) = tokio::io::duplex(64);
        tokio::spawn(async move {
            use tokio::io::AsyncWriteExt as _;
            a.write_all(b"\x02\x00").await.unwrap();
            tokio::task::yield_now().await;
            a.write_all(b"\x00\x01hi\x05\x00").await.unwrap();
        });
        let mut buf = BytesMut::new();
        let p = read_packet(&mut b, &mut buf, MAX_PACKET).await.unwrap();
        assert_eq!((p.seq, p.payload), (1, b"hi".to_vec()));
        assert!(matches!(
            read_packet(&mut b, &mut buf, MAX_PACKET).await,
            Err(ReadError::Closed)
        ));
    }

    #[test]
    fn server_greeting_round_trip_through_the_client_greeting() {
        let g = greeting();
        assert_eq!(g.version, b"5.5.5-10.11.19-MariaDB-0+deb12u1");
        assert_eq!(g.connection_id, 3);
        assert_eq!(g.nonce, b"abcdefghijklmnopqrst");
        assert_eq!(g.plugin.as_deref(), Some(&b"mysql_native_password"[..]));
        assert_eq!(g.ext_caps.bits(), 0x1d);
        assert!(!g.caps.contains(Caps::CLIENT_LONG_PASSWORD));
        // The greeting the client gets carries the server's identity and a new scramble.
        let scramble = *b"ABCDEFGHIJKLMNOPQRST";
        for tls in [false, true] {
            let ours = g.client_greeting(&scramble, tls);
            let ServerHello::Greeting(back) = ServerGreeting::parse(&ours).unwrap() else {
                panic!("not a greeting")
            };
            assert_eq!(back.version, g.version);
            assert_eq!(back.connection_id, 3);
            assert_eq!(back.nonce, scramble);
            assert_eq!(back.collation, 45);
            assert_eq!(back.status, g.status);
            assert_eq!(back.ext_caps, g.ext_caps);
            assert_eq!(back.plugin.as_deref(), Some(CLIENT_PLUGIN));
            assert!(!back.caps.contains(Caps::CLIENT_COMPRESS));
            assert_eq!(back.caps.contains(Caps::CLIENT_SSL), tls);
            assert_eq!(back.caps - Caps::CLIENT_SSL, g.offered_caps(false));
        }
        // The server's own SSL flag is not offered when the broker does not terminate.
        let mut with_ssl = g.clone();
        with_ssl.caps |= Caps::CLIENT_SSL | Caps::CLIENT_COMPRESS;
        assert!(!with_ssl.offered_caps(false).contains(Caps::CLIENT_SSL));
        assert!(!with_ssl.offered_caps(true).contains(Caps::CLIENT_COMPRESS));
    }

    #[test]
    fn greeting_errors_and_old_servers() {
        let ServerHello::Error(e) =
            ServerGreeting::parse(b"\xff\x10\x04Too many connections").unwrap()
        else {
            panic!("not an error")
        };
        assert_eq!(e.code, 1040);
        assert!(ServerGreeting::parse(b"\x09old").is_err());
        assert!(ServerGreeting::parse(&mariadb_greeting()[..20]).is_err());
        let mut old = mariadb_greeting();
        // Clear CLIENT_PROTOCOL_41 (0x0200) in the lower flags.
        let at = 1 + 33 + 4 + 9;
        old[at + 1] &= !0x02;
        assert!(matches!(
            ServerGreeting::parse(&old),
            Err(ProtoError::Unsupported(_))
        ));
    }

    fn client_response(caps: Caps, db: Option<&[u8]>) -> Vec<u8> {
        let mut attrs = HashMap::new();
        attrs.insert("_client_name".to_owned(), "libmariadb".to_owned());
        let r = HandshakeResponse::new(
            Some(&[1u8; 20][..]),
            (10, 11, 0),
            Some(&b"app"[..]),
            db,
            Some(AuthPlugin::MysqlNativePassword),
            caps,
            Some(attrs),
            16 * 1024 * 1024,
        )
        .with_mariadb_ext_capabilities(MariadbCapabilities::from_bits_truncate(0x1c));
        let mut out = Vec::new();
        r.serialize(&mut out);
        out[8] = 33; // utf8mb3_general_ci, the client's choice
        out
    }

    fn client_caps() -> Caps {
        Caps::CLIENT_PROTOCOL_41
            | Caps::CLIENT_SECURE_CONNECTION
            | Caps::CLIENT_PLUGIN_AUTH
            | Caps::CLIENT_PLUGIN_AUTH_LENENC_CLIENT_DATA
            | Caps::CLIENT_MULTI_RESULTS
            | Caps::CLIENT_MULTI_STATEMENTS
            | Caps::CLIENT_PS_MULTI_RESULTS
            | Caps::CLIENT_DEPRECATE_EOF
            | Caps::CLIENT_SESSION_TRACK
            | Caps::CLIENT_LOCAL_FILES
            | Caps::CLIENT_TRANSACTIONS
            | Caps::CLIENT_COMPRESS
            | Caps::CLIENT_CONNECT_ATTRS
    }

    #[test]
    fn client_packets() {
        let r = client_response(client_caps(), Some(b"shop"));
        let ClientPacket::Response(c) = ClientPacket::parse(&r, false).unwrap() else {
            panic!("not a response")
        };
        assert_eq!(c.user, b"app");
        assert_eq!(c.database.as_deref(), Some(&b"shop"[..]));
        assert_eq!(c.collation, 33);
        assert_eq!(c.max_packet, 16 * 1024 * 1024);
        assert_eq!(c.plugin.as_deref(), Some(&b"mysql_native_password"[..]));
        assert_eq!(c.attrs.as_ref().unwrap()["_client_name"], "libmariadb");
        assert!(c.caps.contains(Caps::CLIENT_CONNECT_WITH_DB));
        // SSLRequest: the 32-byte prefix with CLIENT_SSL.
        let ssl = ssl_request(client_caps(), MariadbCapabilities::empty(), &c);
        assert_eq!(ssl.len(), 32);
        assert_eq!(
            ClientPacket::parse(&ssl, false).unwrap(),
            ClientPacket::SslRequest
        );
        // After TLS, the response carries CLIENT_SSL too.
        let after = client_response(client_caps() | Caps::CLIENT_SSL, None);
        assert_eq!(
            ClientPacket::parse(&after, false).unwrap(),
            ClientPacket::SslRequest
        );
        let ClientPacket::Response(c2) = ClientPacket::parse(&after, true).unwrap() else {
            panic!("not a response")
        };
        assert_eq!(c2.user, b"app");
        assert!(ClientPacket::parse(&ssl[..20], false).is_err());
        assert!(ClientPacket::parse(&r[..40], false).is_err());
        assert!(ClientPacket::parse(b"\x00\x00", false).is_err());
        // A 3.20-protocol client.
        let mut old = r.clone();
        old[1] &= !0x02;
        assert!(matches!(
            ClientPacket::parse(&old, false),
            Err(ProtoError::Unsupported(_))
        ));
    }

    /// Both legs agree on every session-shaping flag; the upstream response carries the
    /// brokered user, the chosen database, the client's collation, max packet size,
    /// attributes and (MariaDB) extended capabilities; never compression.
    #[test]
    fn capability_negotiation_and_the_upstream_response() {
        let g = greeting();
        let offered = g.offered_caps(false);
        // A well-behaved client picks from what was offered.
        let chosen = client_caps() & offered;
        let ClientPacket::Response(c) =
            ClientPacket::parse(&client_response(chosen, None), false).unwrap()
        else {
            panic!()
        };
        for tls in [false, true] {
            let up = upstream_caps(&c, &g, tls, false);
            let shaping = Caps::all() - AUTH_PHASE - NEVER;
            assert_eq!(up & shaping, c.caps & shaping, "tls {tls}");
            assert!(!up.contains(Caps::CLIENT_COMPRESS));
            assert_eq!(up.contains(Caps::CLIENT_SSL), tls);
            assert!(up.contains(Caps::CLIENT_PLUGIN_AUTH | Caps::CLIENT_SECURE_CONNECTION));
            assert!(
                g.caps
                    .contains(up - Caps::CLIENT_SSL - Caps::CLIENT_CONNECT_ATTRS)
            );
        }
        // A client that asks for more than offered does not get it upstream.
        let greedy = ClientResponse {
            caps: c.caps | Caps::CLIENT_COMPRESS | Caps::CLIENT_QUERY_ATTRIBUTES,
            ..c.clone()
        };
        assert!(!upstream_caps(&greedy, &g, false, false).contains(Caps::CLIENT_COMPRESS));
        assert!(!upstream_caps(&greedy, &g, false, false).contains(Caps::CLIENT_QUERY_ATTRIBUTES));
        let ext = upstream_ext_caps(&c, &g);
        assert_eq!(ext.bits(), 0x1c & 0x1d);
        let caps = upstream_caps(&c, &g, true, true);
        let auth = [7u8; 20];
        let wire = handshake_response(
            &Login {
                caps,
                ext_caps: ext,
                user: b"svc_user",
                database: Some(b"orders"),
                plugin: Some(b"mysql_native_password"),
                auth: &auth,
            },
            &c,
        );
        let ClientPacket::Response(up) = ClientPacket::parse(&wire, true).unwrap() else {
            panic!()
        };
        // The SSLRequest before it carries the very same flags.
        let ssl = ssl_request(caps, ext, &c);
        assert_eq!(ssl[..4], wire[..4]);
        assert_eq!(ssl[..], wire[..32]);
        assert_eq!(up.user, b"svc_user");
        assert_eq!(up.database.as_deref(), Some(&b"orders"[..]));
        assert_eq!(up.collation, 33);
        assert_eq!(up.max_packet, c.max_packet);
        assert_eq!(up.attrs, c.attrs);
        assert_eq!(up.ext_caps, ext);
        assert!(
            up.caps
                .contains(Caps::CLIENT_CONNECT_WITH_DB | Caps::CLIENT_CONNECT_ATTRS)
        );
        let r: HandshakeResponse<'_> = ParseBuf(&wire).parse(()).unwrap();
        assert_eq!(r.scramble_buf(), auth);
        // Without a database the flag goes.
        let wire = handshake_response(
            &Login {
                caps: upstream_caps(&c, &g, false, true),
                ext_caps: ext,
                user: b"u",
                database: None,
                plugin: None,
                auth: &[],
            },
            &c,
        );
        let ClientPacket::Response(up) = ClientPacket::parse(&wire, false).unwrap() else {
            panic!()
        };
        assert!(!up.caps.contains(Caps::CLIENT_CONNECT_WITH_DB));
        assert_eq!(up.database, None);
    }

    #[test]
    fn ok_packets() {
        assert!(is_ok(b"\x00\x00\x00\x02\x00\x00\x00"));
        assert!(!is_ok(b"\x00\x00"));
        assert!(!is_ok(b"\xfe\x00\x00\x02\x00\x00\x00"));
    }
}
