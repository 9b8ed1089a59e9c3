//! The client leg: the app's socket, plain or with TLS the broker terminates
//! (`config.clientTLS`), and its first packets: SSLRequest answered `S` (TLS) or `N`,
//! GSSENCRequest answered `N`, direct TLS (PostgreSQL 17 `sslnegotiation=direct`, ALPN
//! `postgresql`) accepted, then the StartupMessage or a CancelRequest.
//!
//! The certificate presented is issued by the broker's local CA ([`crate::ca`]) for the
//! name the app dialled: the `intercept:` hostname, else the address it dialled (a
//! `listenOn` client: the name it sent as SNI, else `localhost`). Any other SNI is not
//! used: the broker only ever vouches for destinations it was configured to intercept.

use std::{
    io,
    pin::Pin,
    task::{Context, Poll},
};

use bytes::BytesMut;
use sha2::{Digest, Sha256};
use tokio::io::{AsyncRead, AsyncReadExt as _, AsyncWrite, AsyncWriteExt as _, ReadBuf};

use super::{
    errors::{Failure, sqlstate},
    startup::{self, FirstPacket, StartupError},
};
use crate::{
    ca::LocalCa,
    connector::{AppSocket, ClientStream, ConnError},
};

/// ALPN protocol name of PostgreSQL over TLS.
pub const ALPN: &[u8] = b"postgresql";

/// The app's connection.
pub enum ClientIo {
    Plain(AppSocket),
    Tls {
        stream: Box<tokio_rustls::server::TlsStream<AppSocket>>,
        /// `tls-server-end-point` channel binding data of the certificate presented.
        binding: Vec<u8>,
    },
}

impl ClientIo {
    /// The socket underneath.
    #[must_use]
    pub fn socket(&self) -> &AppSocket {
        match self {
            Self::Plain(s) => s,
            Self::Tls { stream, .. } => stream.get_ref().0,
        }
    }

    #[must_use]
    pub fn is_tls(&self) -> bool {
        matches!(self, Self::Tls { .. })
    }

    /// The channel binding a SCRAM-SHA-256-PLUS exchange with the client binds to.
    #[must_use]
    pub fn channel_binding(&self) -> Option<&[u8]> {
        match self {
            Self::Plain(_) => None,
            Self::Tls { binding, .. } => Some(binding),
        }
    }

    /// For the byte phase.
    #[must_use]
    pub fn into_session_client(self) -> ClientStream {
        match self {
            Self::Plain(s) => ClientStream::Plain(s),
            Self::Tls { stream, .. } => ClientStream::Tls(stream),
        }
    }
}

impl AsyncRead for ClientIo {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Self::Plain(s) => Pin::new(s).poll_read(cx, buf),
            Self::Tls { stream, .. } => Pin::new(stream.as_mut()).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for ClientIo {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, b: &[u8]) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Self::Plain(s) => Pin::new(s).poll_write(cx, b),
            Self::Tls { stream, .. } => Pin::new(stream.as_mut()).poll_write(cx, b),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Self::Plain(s) => Pin::new(s).poll_flush(cx),
            Self::Tls { stream, .. } => Pin::new(stream.as_mut()).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Self::Plain(s) => Pin::new(s).poll_shutdown(cx),
            Self::Tls { stream, .. } => Pin::new(stream.as_mut()).poll_shutdown(cx),
        }
    }
}

/// TLS on the client leg: the CA and the name to present a certificate for.
pub struct ClientTls<'a> {
    pub ca: &'a LocalCa,
    /// The name the app dialled (see the module docs); `None`: the client's SNI if it
    /// sent one, else `localhost`.
    pub name: Option<String>,
}

/// Read packets until a StartupMessage or CancelRequest, answering encryption requests
/// (once each): `S` and a TLS handshake when `tls` is set, else `N`. A client that
/// starts with a TLS ClientHello (direct negotiation) is accepted when `tls` is set.
///
/// Returns the client leg (`None` when a failed TLS handshake consumed it; nothing
/// can be told to the client then) with the first packet or the failure.
pub async fn read_startup(
    client: AppSocket,
    buf: &mut BytesMut,
    tls: Option<&ClientTls<'_>>,
) -> (Option<ClientIo>, Result<FirstPacket, Failure>) {
    let mut client = ClientIo::Plain(client);
    if let Some(t) = tls {
        // Direct TLS: the first byte is a TLS handshake record (0x16), never the first
        // byte of a startup length.
        let mut first = [0u8; 1];
        if let Ok(1) = client.socket().peek(&mut first).await
            && first[0] == 0x16
        {
            let ClientIo::Plain(tcp) = client else {
                unreachable!("plain until here")
            };
            client = match accept(tcp, t, true).await {
                Ok(c) => c,
                Err(f) => return (None, Err(f)),
            };
        }
    }
    let mut negotiated = 0;
    let mut declined_tls = false;
    loop {
        let len = loop {
            match startup::frame(buf) {
                Ok(Some(len)) => break len,
                Ok(None) => {}
                Err(StartupError::TlsHello) => {
                    // The client expects TLS: no ErrorResponse can reach it.
                    tracing::info!(
                        "client opened with a TLS ClientHello (direct TLS); the service does \
                         not terminate TLS (config.clientTLS)"
                    );
                    return (
                        Some(client),
                        Err(Failure::told(ConnError::Protocol(
                            "client opened with a TLS ClientHello: set `config.clientTLS: on` \
                             on the service for clients that negotiate TLS directly"
                                .into(),
                        ))),
                    );
                }
                Err(e) => return (Some(client), Err(startup_error(e))),
            }
            buf.reserve(startup::MAX_STARTUP_LEN.min(4096));
            match client.read_buf(buf).await {
                Ok(0) => {
                    let why = if declined_tls {
                        "after the broker declined TLS (a client that requires TLS, e.g. \
                         sslmode=require, needs `config.clientTLS: on` on the service)"
                    } else {
                        "before its startup packet"
                    };
                    return (
                        Some(client),
                        Err(Failure::told(ConnError::ClientGone(why.into()))),
                    );
                }
                Ok(_) => {}
                Err(e) => return (Some(client), Err(Failure::told(ConnError::Io(e)))),
            }
        };
        let packet = buf.split_to(len);
        let first = match startup::parse(&packet) {
            Ok(p) => p,
            Err(e) => return (Some(client), Err(startup_error(e))),
        };
        match first {
            FirstPacket::SslRequest | FirstPacket::GssEncRequest if negotiated < 2 => {
                negotiated += 1;
                if !buf.is_empty() {
                    // Bytes after SSLRequest before our answer (CVE-2021-23214).
                    return (
                        Some(client),
                        Err(Failure::told(ConnError::Protocol(
                            "client sent data after an encryption request before the answer".into(),
                        ))),
                    );
                }
                let ssl = matches!(first, FirstPacket::SslRequest);
                match (tls, client) {
                    (Some(t), ClientIo::Plain(mut tcp)) if ssl => {
                        if let Err(e) = tcp.write_all(b"S").await {
                            return (None, Err(Failure::told(ConnError::Io(e))));
                        }
                        client = match accept(tcp, t, false).await {
                            Ok(c) => c,
                            Err(f) => return (None, Err(f)),
                        };
                    }
                    (_, mut c) => {
                        declined_tls |= ssl;
                        if let Err(e) = c.write_all(b"N").await {
                            return (Some(c), Err(Failure::told(ConnError::Io(e))));
                        }
                        client = c;
                    }
                }
            }
            other => return (Some(client), Ok(other)),
        }
    }
}

fn startup_error(e: StartupError) -> Failure {
    let code = match e {
        StartupError::UnsupportedVersion(_) => sqlstate::FEATURE_NOT_SUPPORTED,
        _ => sqlstate::PROTOCOL_VIOLATION,
    };
    Failure::new(code, ConnError::Protocol(e.to_string()))
}

/// The TLS handshake with the client, presenting a certificate from the local CA.
/// `direct`: the client negotiated TLS directly, which PostgreSQL requires to carry
/// ALPN `postgresql` (so a TLS connection meant for another protocol is not taken).
async fn accept(tcp: AppSocket, t: &ClientTls<'_>, direct: bool) -> Result<ClientIo, Failure> {
    let fail = |why: String| Failure::told(ConnError::Protocol(format!("client TLS: {why}")));
    let start = tokio_rustls::LazyConfigAcceptor::new(rustls::server::Acceptor::default(), tcp)
        .await
        .map_err(|e| fail(format!("no valid ClientHello: {e}")))?;
    let hello = start.client_hello();
    if direct && !hello.alpn().is_some_and(|mut a| a.any(|p| p == ALPN)) {
        return Err(fail(
            "direct TLS negotiation without ALPN \"postgresql\"".into(),
        ));
    }
    let name = match (&t.name, hello.server_name()) {
        (Some(n), _) => n.clone(),
        (None, Some(sni)) => sni.to_owned(),
        (None, None) => "localhost".to_owned(),
    };
    let leaf =
        t.ca.leaf(&name)
            .map_err(|e| fail(format!("no certificate for {name:?}: {e:#}")))?;
    let config = leaf
        .server_config(&[ALPN])
        .map_err(|e| fail(format!("{e:#}")))?;
    let stream = start
        .into_stream(config)
        .await
        .map_err(|e| fail(format!("handshake failed: {e}")))?;
    // RFC 5929 tls-server-end-point: the certificate's hash, with SHA-256 for the
    // ECDSA-SHA256 certificates the local CA issues.
    let binding = Sha256::digest(leaf.chain[0].as_ref()).to_vec();
    Ok(ClientIo::Tls {
        stream: Box::new(stream),
        binding,
    })
}
