//! The connector's whole flow over sockets, against a scripted server and a raw client:
//! the greeting the client sees, the response the server gets, sequence ids on both
//! legs, the rotation retry and the ERR packet of every failure.

use std::{collections::BTreeMap, net::SocketAddr, path::Path, sync::Arc, time::Duration};

use bytes::BytesMut;
use mysql_common::{
    auth::plugins::{
        caching_sha2_password::scramble_sha256, mysql_native_password::scramble_native,
    },
    constants::{CapabilityFlags as Caps, StatusFlags},
    packets::{AuthPlugin, HandshakePacket, HandshakeResponse},
    proto::MySerialize as _,
};
use tokio::{
    io::{AsyncReadExt as _, AsyncWriteExt as _},
    net::{TcpListener, TcpStream},
    sync::mpsc,
};

use super::{
    config::{ClientTls, MysqlConfig},
    errors::ServerError,
    proto::{self, ClientPacket, Packet, ServerGreeting, ServerHello},
};
use crate::{
    config::{
        BrokerSettings, Config, ConnectorSpec, CredentialSource, DEFAULT_CACHE_TTL, ListenAddr,
        ProviderConfig, Service,
    },
    connector::{Conn, ConnError, ConnStats, Connector, Env, dial::Dialer},
    secret::Secret,
};

const SERVICE: &str = "orders-db";
const NONCE: &[u8; 20] = b"abcdefghij0123456789";
const OK: &[u8] = b"\x00\x00\x00\x02\x00\x00\x00";

pub(super) fn lit(v: &str) -> CredentialSource {
    CredentialSource::Literal(Secret::from_str_value(v))
}

pub(super) fn file(path: &Path) -> CredentialSource {
    CredentialSource::Provider {
        provider: "file".into(),
        id: path.display().to_string(),
    }
}

fn creds(
    upstream: SocketAddr,
    password: CredentialSource,
) -> Vec<(&'static str, CredentialSource)> {
    vec![
        ("host", lit("127.0.0.1")),
        ("port", lit(&upstream.port().to_string())),
        ("username", lit("svc")),
        ("password", password),
        ("sslmode", lit("disable")),
    ]
}

/// The broker on a listener of its own; each connection's result goes to the channel.
pub(super) struct Broker {
    pub addr: SocketAddr,
    pub results: mpsc::UnboundedReceiver<Result<(), String>>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Broker {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn broker(cfg: MysqlConfig, creds: Vec<(&str, CredentialSource)>) -> Broker {
    broker_with_ca(cfg, creds, None).await
}

/// [`broker`], presenting certificates from `ca` to clients that ask for TLS.
pub(super) async fn broker_with_ca(
    cfg: MysqlConfig,
    creds: Vec<(&str, CredentialSource)>,
    ca: Option<Arc<crate::ca::LocalCa>>,
) -> Broker {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let service = Service {
        name: SERVICE.into(),
        connector: ConnectorSpec::built("mysql", cfg.clone()),
        listen_on: Some(ListenAddr::Tcp(addr)),
        intercept: vec![],
        credentials: creds.into_iter().map(|(k, v)| (k.to_owned(), v)).collect(),
        authentication: vec![],
        cache: crate::config::CacheOverride::default(),
        unix_socket: crate::config::UnixSocketOptions::default(),
        policy: crate::policy::Spec::default(),
    };
    let mut providers = BTreeMap::new();
    providers.insert("file".to_owned(), ProviderConfig::File);
    let config = Config {
        services: vec![service.clone()],
        providers,
        broker: BrokerSettings {
            health_addr: None,
            transparent_port: 0,
            cache_ttl: DEFAULT_CACHE_TTL,
            bypass_mark: 0,
            splice: false,
            ..BrokerSettings::default()
        },
        fetch_policies: BTreeMap::new(),
        warnings: Vec::new(),
    };
    let env = Env {
        secrets: Arc::new(crate::secrets::SecretStore::new(&config).unwrap()),
        dialer: Dialer { mark: 0 },
        ca,
    };
    let my: Arc<dyn Connector> = Arc::new(super::MysqlConnector::new(&cfg).unwrap());
    let service = Arc::new(service);
    let (tx, results) = mpsc::unbounded_channel();
    let task = tokio::spawn(async move {
        loop {
            let Ok((sock, peer)) = listener.accept().await else {
                return;
            };
            let (env, my, service, tx) = (
                env.clone(),
                Arc::clone(&my),
                Arc::clone(&service),
                tx.clone(),
            );
            tokio::spawn(async move {
                let mut conn = Conn {
                    service,
                    client_addr: peer.into(),
                    caller: None,
                    orig_dst: None,
                    orig_host: None,
                    admitted_by: None,
                    stats: ConnStats::default(),
                };
                let r = crate::proxy::serve(my.as_ref(), &env, &mut conn, sock.into(), None).await;
                let _ = tx.send(r.map_err(|e: ConnError| format!("{}: {e}", e.kind())));
            });
        }
    });
    Broker {
        addr,
        results,
        task,
    }
}

/// What a scripted server does with one connection.
type Script = Box<dyn FnOnce(Io) -> std::pin::Pin<Box<dyn Future<Output = ()> + Send>> + Send>;

/// One side of a connection, packet by packet.
struct Io {
    s: TcpStream,
    buf: BytesMut,
}

impl Io {
    fn new(s: TcpStream) -> Self {
        Self {
            s,
            buf: BytesMut::new(),
        }
    }

    async fn read(&mut self) -> Packet {
        proto::read_packet(&mut self.s, &mut self.buf, proto::MAX_PACKET)
            .await
            .unwrap()
    }

    async fn write(&mut self, seq: u8, payload: &[u8]) {
        self.s
            .write_all(&proto::encode(seq, payload))
            .await
            .unwrap();
    }

    /// The end of the stream (the peer closed) after whatever is left.
    async fn closed(&mut self) -> bool {
        let mut rest = Vec::new();
        matches!(
            tokio::time::timeout(Duration::from_secs(5), self.s.read_to_end(&mut rest)).await,
            Ok(Ok(_))
        )
    }
}

/// A server answering each connection with the next script.
async fn server(scripts: Vec<Script>) -> (SocketAddr, tokio::task::JoinHandle<()>) {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    let task = tokio::spawn(async move {
        for script in scripts {
            let (s, _) = l.accept().await.unwrap();
            script(Io::new(s)).await;
        }
    });
    (addr, task)
}

fn server_caps() -> Caps {
    Caps::CLIENT_LONG_PASSWORD
        | Caps::CLIENT_PROTOCOL_41
        | Caps::CLIENT_SECURE_CONNECTION
        | Caps::CLIENT_PLUGIN_AUTH
        | Caps::CLIENT_PLUGIN_AUTH_LENENC_CLIENT_DATA
        | Caps::CLIENT_CONNECT_WITH_DB
        | Caps::CLIENT_CONNECT_ATTRS
        | Caps::CLIENT_DEPRECATE_EOF
        | Caps::CLIENT_SESSION_TRACK
        | Caps::CLIENT_MULTI_RESULTS
        | Caps::CLIENT_TRANSACTIONS
        | Caps::CLIENT_COMPRESS
}

fn greeting(version: &str, id: u32, caps: Caps, plugin: &[u8]) -> Vec<u8> {
    let mut part2 = NONCE[8..].to_vec();
    part2.push(0);
    let h = HandshakePacket::new(
        10,
        version.as_bytes(),
        id,
        NONCE[..8].try_into().unwrap(),
        Some(part2),
        caps,
        255,
        StatusFlags::SERVER_STATUS_AUTOCOMMIT,
        Some(plugin),
    );
    let mut out = Vec::new();
    h.serialize(&mut out);
    out
}

/// The server's side of a login: greet, read the response (its fields and auth data
/// checked by `check`), answer with `reply`; after an OK, serve `select 1` and
/// `COM_QUIT`.
fn login_script(
    id: u32,
    plugin: &'static [u8],
    check: impl FnOnce(&proto::ClientResponse, &[u8]) + Send + 'static,
    reply: Vec<u8>,
) -> Script {
    Box::new(move |mut io: Io| {
        Box::pin(async move {
            io.write(
                0,
                &greeting("8.0.11-TiDB-v7.5.0", id, server_caps(), plugin),
            )
            .await;
            let p = io.read().await;
            assert_eq!(p.seq, 1);
            let ClientPacket::Response(r) = ClientPacket::parse(&p.payload, false).unwrap() else {
                panic!("an SSLRequest upstream")
            };
            let resp: HandshakeResponse<'_> =
                mysql_common::io::ParseBuf(&p.payload).parse(()).unwrap();
            check(&r, resp.scramble_buf());
            io.write(2, &reply).await;
            if reply.first() == Some(&0) {
                // The session: the client's COM_QUERY, then COM_QUIT.
                let q = io.read().await;
                assert_eq!((q.seq, q.payload.as_slice()), (0, &b"\x03select 1"[..]));
                io.write(1, b"\x00\x00\x00\x02\x00\x00\x00").await;
                let quit = io.read().await;
                assert_eq!(quit.payload, [0x01]);
            }
        })
    })
}

/// The app: read the greeting, answer with a HandshakeResponse (any password), read the
/// broker's answer.
async fn client(addr: SocketAddr) -> (Io, ServerGreeting, Packet) {
    let mut io = Io::new(TcpStream::connect(addr).await.unwrap());
    let g = io.read().await;
    assert_eq!(g.seq, 0);
    let greeting = match ServerGreeting::parse(&g.payload).unwrap() {
        ServerHello::Greeting(g) => g,
        ServerHello::Error(e) => panic!("greeted with {e}"),
    };
    let caps = greeting.caps
        & (Caps::CLIENT_PROTOCOL_41
            | Caps::CLIENT_SECURE_CONNECTION
            | Caps::CLIENT_PLUGIN_AUTH
            | Caps::CLIENT_DEPRECATE_EOF
            | Caps::CLIENT_SESSION_TRACK
            | Caps::CLIENT_MULTI_RESULTS
            | Caps::CLIENT_CONNECT_ATTRS);
    let mut attrs = std::collections::HashMap::new();
    attrs.insert("program_name".to_owned(), "test".to_owned());
    let r = HandshakeResponse::new(
        Some(
            scramble_native(&greeting.nonce, b"whatever")
                .unwrap()
                .to_vec(),
        ),
        (8, 0, 0),
        Some(&b"app"[..]),
        Some(&b"mine"[..]),
        Some(AuthPlugin::MysqlNativePassword),
        caps,
        Some(attrs),
        1 << 24,
    );
    let mut payload = Vec::new();
    r.serialize(&mut payload);
    payload[8] = 33;
    io.write(1, &payload).await;
    let answer = io.read().await;
    (io, greeting, answer)
}

fn err_of(p: &Packet) -> ServerError {
    ServerError::parse(&p.payload).unwrap_or_else(|| panic!("not an ERR: {:?}", p.payload))
}

/// The client sees the server's version and connection id, with the broker's scramble
/// and plugin and no compression; the server gets the brokered user, the client's
/// database, collation and attributes, and a caching_sha2 scramble of the brokered
/// password; the OK reaches the client renumbered, and the session is relayed.
#[tokio::test]
async fn login_and_session() {
    let (up, up_task) = server(vec![Box::new(|mut io: Io| {
        Box::pin(async move {
            io.write(
                0,
                &greeting(
                    "8.0.11-TiDB-v7.5.0",
                    4242,
                    server_caps(),
                    b"caching_sha2_password",
                ),
            )
            .await;
            let p = io.read().await;
            let ClientPacket::Response(r) = ClientPacket::parse(&p.payload, false).unwrap() else {
                panic!()
            };
            assert_eq!(r.user, b"svc");
            assert_eq!(r.database.as_deref(), Some(&b"mine"[..]));
            assert_eq!(r.collation, 33);
            assert_eq!(r.plugin.as_deref(), Some(&b"caching_sha2_password"[..]));
            assert_eq!(r.attrs.as_ref().unwrap()["program_name"], "test");
            assert!(!r.caps.contains(Caps::CLIENT_COMPRESS));
            assert!(r.caps.contains(Caps::CLIENT_DEPRECATE_EOF));
            let resp: HandshakeResponse<'_> =
                mysql_common::io::ParseBuf(&p.payload).parse(()).unwrap();
            assert_eq!(
                resp.scramble_buf(),
                scramble_sha256(NONCE, b"pw-1").unwrap()
            );
            io.write(2, b"\x01\x03").await;
            io.write(3, OK).await;
            let q = io.read().await;
            assert_eq!((q.seq, q.payload.as_slice()), (0, &b"\x03select 1"[..]));
            io.write(1, OK).await;
            assert_eq!(io.read().await.payload, [0x01]);
        })
    })])
    .await;
    let mut b = broker(MysqlConfig::default(), creds(up, lit("pw-1"))).await;
    let (mut c, g, ok) = client(b.addr).await;
    assert_eq!(g.version, b"8.0.11-TiDB-v7.5.0");
    assert_eq!(g.connection_id, 4242);
    assert_ne!(g.nonce, NONCE);
    assert!(g.nonce.iter().all(|b| (0x21..0x7f).contains(b)));
    assert_eq!(g.plugin.as_deref(), Some(&b"mysql_native_password"[..]));
    assert!(!g.caps.contains(Caps::CLIENT_COMPRESS));
    assert!(!g.caps.contains(Caps::CLIENT_SSL), "no CA: TLS not offered");
    assert_eq!(g.collation, 255);
    assert_eq!((ok.seq, ok.payload.as_slice()), (2, OK));
    c.write(0, b"\x03select 1").await;
    assert_eq!(c.read().await.seq, 1);
    c.write(0, b"\x01").await;
    drop(c);
    up_task.await.unwrap();
    assert_eq!(b.results.recv().await.unwrap(), Ok(()));
}

/// A rejected credential is fetched again (bypassing the cache) and the login tried on a
/// new connection; rejected twice, the client gets 1045 naming the service.
#[tokio::test]
async fn rotation_retry_then_access_denied() {
    let dir = tempfile::tempdir().unwrap();
    let pw = dir.path().join("pw");
    std::fs::write(&pw, "old-pw").unwrap();
    let pw2 = pw.clone();
    let deny = ServerError {
        code: 1045,
        sqlstate: "28000".into(),
        message: "Access denied for user 'svc'@'localhost' (using password: YES)".into(),
    };
    let deny_payload = super::errors::err_payload(deny.code, &deny.sqlstate, &deny.message);
    let (up, up_task) = server(vec![
        login_script(
            1,
            b"mysql_native_password",
            move |_, auth| {
                assert_eq!(auth, scramble_native(NONCE, b"old-pw").unwrap());
                // Rotated while the login was on its way.
                std::fs::write(&pw2, "new-pw").unwrap();
            },
            deny_payload.clone(),
        ),
        login_script(
            2,
            b"mysql_native_password",
            |_, auth| assert_eq!(auth, scramble_native(NONCE, b"new-pw").unwrap()),
            OK.to_vec(),
        ),
        // The next client: rejected with the fresh credentials too.
        login_script(3, b"mysql_native_password", |_, _| {}, deny_payload.clone()),
        login_script(4, b"mysql_native_password", |_, _| {}, deny_payload),
    ])
    .await;
    let mut b = broker(MysqlConfig::default(), creds(up, file(&pw))).await;
    let (mut c, g, ok) = client(b.addr).await;
    assert_eq!(g.connection_id, 1, "greeted with the first connection's id");
    assert_eq!((ok.seq, ok.payload.as_slice()), (2, OK));
    c.write(0, b"\x03select 1").await;
    assert_eq!(c.read().await.seq, 1);
    c.write(0, b"\x01").await;
    drop(c);
    assert_eq!(b.results.recv().await.unwrap(), Ok(()));

    std::fs::write(&pw, "newer-pw").unwrap();
    // The cache holds "new-pw": the server rejects it, the refetch gets "newer-pw",
    // which is rejected too.
    let (mut c, _, err) = client(b.addr).await;
    assert_eq!(err.seq, 2);
    let e = err_of(&err);
    assert_eq!((e.code, e.sqlstate.as_str()), (1045, "28000"));
    assert_eq!(
        e.message,
        format!(
            "service `{SERVICE}`: upstream rejected the credentials: ERROR 1045 (28000): Access denied for user 'svc'@'localhost' (using password: YES)"
        )
    );
    assert!(!e.message.contains("pw"));
    assert!(c.closed().await);
    drop(c);
    let r = b.results.recv().await.unwrap().unwrap_err();
    assert!(r.starts_with("auth_rejected"), "{r}");
    up_task.await.unwrap();
}

/// Failures before the greeting: an ERR packet with sequence id 0 instead of it.
#[tokio::test]
async fn unreachable_and_refusing_upstreams() {
    // Nothing listens there.
    let gone = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap()
    };
    let mut b = broker(MysqlConfig::default(), creds(gone, lit("pw"))).await;
    let mut c = Io::new(TcpStream::connect(b.addr).await.unwrap());
    let p = c.read().await;
    assert_eq!(p.seq, 0);
    let e = err_of(&p);
    assert_eq!((e.code, e.sqlstate.as_str()), (1429, "HY000"));
    assert!(
        e.message.starts_with(&format!(
            "service `{SERVICE}`: cannot reach upstream 127.0.0.1:{}",
            gone.port()
        )),
        "{}",
        e.message
    );
    assert!(c.closed().await);
    drop(c);
    assert!(
        b.results
            .recv()
            .await
            .unwrap()
            .unwrap_err()
            .starts_with("upstream_unreachable")
    );

    // The server refuses before its greeting: its code, the service named.
    let (up, _t) = server(vec![Box::new(|mut io: Io| {
        Box::pin(async move {
            io.write(0, b"\xff\x10\x04Too many connections").await;
        })
    })])
    .await;
    let mut b = broker(MysqlConfig::default(), creds(up, lit("pw"))).await;
    let mut c = Io::new(TcpStream::connect(b.addr).await.unwrap());
    let p = c.read().await;
    drop(c);
    let e = err_of(&p);
    assert_eq!((p.seq, e.code, e.sqlstate.as_str()), (0, 1040, "HY000"));
    assert_eq!(
        e.message,
        format!(
            "service `{SERVICE}`: upstream refused the session: ERROR 1040 (HY000): Too many connections"
        )
    );
    assert!(
        b.results
            .recv()
            .await
            .unwrap()
            .unwrap_err()
            .starts_with("upstream_refused")
    );

    // Not a MySQL server at all.
    let (up, _t) = server(vec![Box::new(|mut io: Io| {
        Box::pin(async move {
            io.s.write_all(b"SSH-2.0-OpenSSH_9.2\r\n").await.unwrap();
            let _ = io.closed().await;
        })
    })])
    .await;
    let mut b = broker(MysqlConfig::default(), creds(up, lit("pw"))).await;
    let mut c = Io::new(TcpStream::connect(b.addr).await.unwrap());
    let e = err_of(&c.read().await);
    drop(c);
    assert_eq!(e.code, 1429);
    assert!(
        b.results
            .recv()
            .await
            .unwrap()
            .unwrap_err()
            .starts_with("protocol_error")
    );
}

/// A client asking for TLS where it is refused gets an ERR after its SSLRequest
/// (sequence id 2); a server without TLS under `sslmode: require` is an ERR to the
/// client after its response.
#[tokio::test]
async fn tls_refusals() {
    let greet_only = || -> Script {
        Box::new(|mut io: Io| {
            Box::pin(async move {
                io.write(
                    0,
                    &greeting(
                        "10.11.6-MariaDB",
                        7,
                        server_caps(),
                        b"mysql_native_password",
                    ),
                )
                .await;
                let _ = io.closed().await;
            })
        })
    };
    let (up, _t) = server(vec![greet_only(), greet_only()]).await;
    let cfg = MysqlConfig {
        client_tls: ClientTls::Refuse,
        ..MysqlConfig::default()
    };
    let mut b = broker(cfg, creds(up, lit("pw"))).await;
    let mut c = Io::new(TcpStream::connect(b.addr).await.unwrap());
    let g = c.read().await;
    let ServerHello::Greeting(g) = ServerGreeting::parse(&g.payload).unwrap() else {
        panic!()
    };
    assert!(!g.caps.contains(Caps::CLIENT_SSL));
    let mut ssl = Vec::new();
    mysql_common::packets::SslRequest::new(
        Caps::CLIENT_PROTOCOL_41 | Caps::CLIENT_SSL | Caps::CLIENT_SECURE_CONNECTION,
        1 << 24,
        45,
    )
    .serialize(&mut ssl);
    c.write(1, &ssl).await;
    let p = c.read().await;
    drop(c);
    let e = err_of(&p);
    assert_eq!((p.seq, e.code), (2, 1043));
    assert!(e.message.contains("clientTLS"), "{}", e.message);
    assert!(b.results.recv().await.unwrap().is_err());

    // sslmode require (the default) and a server without TLS.
    let mut c2 = creds(up, lit("pw"));
    c2.retain(|(k, _)| *k != "sslmode");
    let mut b = broker(MysqlConfig::default(), c2).await;
    let (c, _, p) = client(b.addr).await;
    drop(c);
    let e = err_of(&p);
    assert_eq!((p.seq, e.code, e.sqlstate.as_str()), (2, 1429, "HY000"));
    assert!(e.message.contains("does not offer TLS"), "{}", e.message);
    assert!(
        b.results
            .recv()
            .await
            .unwrap()
            .unwrap_err()
            .starts_with("upstream_tls_error")
    );
}

/// An authentication the broker does not do is refused before anything derived from
/// the password goes (mysql_clear_password without TLS): 1251.
#[tokio::test]
async fn cleartext_without_tls_is_refused() {
    let (up, _t) = server(vec![Box::new(|mut io: Io| {
        Box::pin(async move {
            io.write(
                0,
                &greeting("8.0.36", 9, server_caps(), b"mysql_native_password"),
            )
            .await;
            let _ = io.read().await;
            io.write(2, b"\xfemysql_clear_password\0").await;
            // Nothing comes back: the broker closes.
            let mut rest = Vec::new();
            let _ = io.s.read_to_end(&mut rest).await;
            assert!(rest.is_empty(), "{rest:?}");
        })
    })])
    .await;
    let mut b = broker(MysqlConfig::default(), creds(up, lit("pw"))).await;
    let (c, _, p) = client(b.addr).await;
    drop(c);
    let e = err_of(&p);
    assert_eq!((p.seq, e.code, e.sqlstate.as_str()), (2, 1251, "08004"));
    assert!(e.message.contains("mysql_clear_password"), "{}", e.message);
    assert!(b.results.recv().await.unwrap().is_err());
}

/// Over a connection cap: MySQL's own "too many connections", as a server's first
/// packet.
#[test]
fn refusal_is_1040() {
    let my = super::MysqlConnector::new(&MysqlConfig::default()).unwrap();
    let bytes = my
        .refusal("svc", "too many connections through the broker")
        .unwrap();
    assert_eq!(&bytes[3..4], [0]);
    let e = ServerError::parse(&bytes[4..]).unwrap();
    assert_eq!((e.code, e.sqlstate.as_str()), (1040, "08004"));
    assert_eq!(
        e.message,
        "service `svc`: too many connections through the broker"
    );
    assert!(my.splices() && my.uses_ca());
    let refuse = MysqlConfig {
        client_tls: ClientTls::Refuse,
        ..MysqlConfig::default()
    };
    assert!(!super::MysqlConnector::new(&refuse).unwrap().uses_ca());
}

/// The denying connector on a loopback listener of its own.
async fn denying() -> SocketAddr {
    use crate::connector::deny::testing::{denial, deny_listener};
    let port = deny_listener(|s| async move {
        let my = super::MysqlConnector::new(&MysqlConfig::default()).unwrap();
        my.deny(s, &denial()).await;
    })
    .await;
    SocketAddr::from(([127, 0, 0, 1], port))
}

/// A connection the policy refused gets what a server sends a user it refuses: a
/// greeting (no TLS offered), then ERR 1045 (28000) naming the rule in answer to the
/// HandshakeResponse, then a close (FIN, not a reset); nothing is dialled.
#[tokio::test]
async fn deny_is_1045_28000_in_answer_to_the_response() {
    use crate::connector::deny::testing::denial;
    let addr = denying().await;
    let (mut io, greeting, answer) = client(addr).await;
    assert_eq!(greeting.version, super::deny::DENY_VERSION);
    assert!(!greeting.caps.contains(Caps::CLIENT_SSL));
    assert_eq!(answer.seq, 2);
    let e = err_of(&answer);
    assert_eq!((e.code, e.sqlstate.as_str()), (1045, "28000"));
    assert_eq!(e.message, denial().message());
    assert!(io.closed().await, "closed without a reset");

    // A client that insists on TLS (an SSLRequest, though none was offered) cannot read
    // an ERR: closed.
    let mut io = Io::new(TcpStream::connect(addr).await.unwrap());
    let _ = io.read().await;
    let ssl = proto::ssl_request(
        Caps::CLIENT_PROTOCOL_41 | Caps::CLIENT_SECURE_CONNECTION | Caps::CLIENT_SSL,
        mysql_common::constants::MariadbCapabilities::empty(),
        &proto::ClientResponse {
            caps: Caps::CLIENT_PROTOCOL_41,
            ext_caps: mysql_common::constants::MariadbCapabilities::empty(),
            max_packet: 1 << 24,
            collation: 45,
            user: b"app".to_vec(),
            database: None,
            plugin: None,
            attrs: None,
        },
    );
    io.write(1, &ssl).await;
    let mut rest = Vec::new();
    io.s.read_to_end(&mut rest).await.unwrap();
    assert!(rest.is_empty(), "{rest:?}");
}

/// The real `mariadb` client prints `ERROR 1045 (28000): <the denial>`.
#[tokio::test]
async fn deny_mariadb_prints_error_1045() {
    use crate::connector::deny::testing::{client_program, denial, run};
    let Some(mariadb) = client_program("mariadb") else {
        return;
    };
    let port = denying().await.port();
    for ssl in [None, Some("--ssl"), Some("--skip-ssl")] {
        let mut cmd = tokio::process::Command::new(&mariadb);
        cmd.arg("--no-defaults")
            .args(ssl)
            .args(["-h", "127.0.0.1", "-P", &port.to_string()])
            .args(["-u", "app", "-pnot-the-password", "--connect-timeout=5"])
            .args(["-e", "select 1"]);
        let out = run(cmd).await;
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{ssl:?}: {err}");
        assert_eq!(
            err.trim_end(),
            format!("ERROR 1045 (28000): {}", denial().message()),
            "{ssl:?}"
        );
    }
}
