//! The client leg: the app's socket, plain or with TLS the broker terminates
//! (`config.clientTLS: terminate`); the broker's greeting, the client's SSLRequest and
//! HandshakeResponse41.
//!
//! The certificate presented is issued by the broker's local CA ([`crate::ca`]) for the
//! name the app dialled: the `intercept:` hostname, else the address it dialled (a
//! `listenOn` client: the name it sent as SNI, else `localhost`).

use std::{
    io,
    pin::Pin,
    task::{Context, Poll},
};

use bytes::BytesMut;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt as _, ReadBuf};

use super::{
    errors::{Failure, code},
    proto::{self, ClientPacket, ClientResponse, MAX_PACKET, ReadError},
};
use crate::{
    ca::LocalCa,
    connector::{AppSocket, ClientStream, ConnError},
};

/// The app's connection.
pub enum ClientIo {
    Plain(AppSocket),
    Tls(Box<tokio_rustls::server::TlsStream<Prefixed>>),
}

impl ClientIo {
    /// The socket underneath.
    #[must_use]
    pub fn socket(&self) -> &AppSocket {
        match self {
            Self::Plain(s) => s,
            Self::Tls(s) => &s.get_ref().0.inner,
        }
    }

    #[must_use]
    pub fn is_tls(&self) -> bool {
        matches!(self, Self::Tls(_))
    }

    /// For the byte phase.
    #[must_use]
    pub fn into_session_client(self) -> ClientStream {
        match self {
            Self::Plain(s) => ClientStream::Plain(s),
            Self::Tls(s) => ClientStream::Tls(Box::new(QuietClose(s))),
        }
    }
}

/// The client's TLS stream in the byte phase: ending it flushes what TLS holds and ends
/// the TCP stream without a close_notify. A MySQL client closes right after `COM_QUIT`;
/// a close_notify arriving after that finds its socket closed with the alert unread and
/// is answered with a reset, which the relay would report as an error of a session that
/// ended cleanly. (MySQL clients neither wait for one nor send one reliably.)
struct QuietClose(Box<tokio_rustls::server::TlsStream<Prefixed>>);

impl AsyncRead for QuietClose {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(self.get_mut().0.as_mut()).poll_read(cx, buf)
    }
}

impl AsyncWrite for QuietClose {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, b: &[u8]) -> Poll<io::Result<usize>> {
        Pin::new(self.get_mut().0.as_mut()).poll_write(cx, b)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(self.get_mut().0.as_mut()).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let tls = self.get_mut().0.as_mut();
        std::task::ready!(Pin::new(&mut *tls).poll_flush(cx))?;
        Pin::new(&mut tls.get_mut().0).poll_shutdown(cx)
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
            Self::Tls(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for ClientIo {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, b: &[u8]) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Self::Plain(s) => Pin::new(s).poll_write(cx, b),
            Self::Tls(s) => Pin::new(s.as_mut()).poll_write(cx, b),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Self::Plain(s) => Pin::new(s).poll_flush(cx),
            Self::Tls(s) => Pin::new(s.as_mut()).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Self::Plain(s) => Pin::new(s).poll_shutdown(cx),
            Self::Tls(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
        }
    }
}

/// TLS on the client leg: the CA and the name to present a certificate for.
pub struct ClientTls<'a> {
    pub ca: &'a LocalCa,
    /// The name the app dialled; `None`: the client's SNI if it sent one, else
    /// `localhost`.
    pub name: Option<String>,
}

/// The client leg after its HandshakeResponse.
pub struct Greeted {
    pub io: ClientIo,
    pub response: ClientResponse,
    /// The sequence id of the broker's next packet to the client (its OK or ERR).
    pub seq: u8,
    /// Bytes the client sent after its response (none from a well-behaved client).
    pub rest: BytesMut,
}

/// A client leg that failed: the socket when there still is one, the sequence id an ERR
/// packet must carry, and why.
pub struct Failed {
    pub io: Option<ClientIo>,
    pub seq: u8,
    pub failure: Failure,
}

/// Send the greeting (sequence id 0) and read the client's answer: an SSLRequest
/// (answered with TLS when `tls` is set, else refused with an ERR) then the
/// HandshakeResponse41.
///
/// # Errors
/// The client leg's failure, with what is left of the socket to tell it.
pub async fn handshake(
    client: AppSocket,
    greeting: &[u8],
    tls: Option<&ClientTls<'_>>,
) -> Result<Greeted, Box<Failed>> {
    let mut io = ClientIo::Plain(client);
    let fail = |io, seq, failure| Err(Box::new(Failed { io, seq, failure }));
    if let Err(e) = io.write_all(&proto::encode(0, greeting)).await {
        return fail(Some(io), 1, Failure::told(ConnError::Io(e)));
    }
    let mut buf = BytesMut::with_capacity(1024);
    let mut expect = 1u8;
    loop {
        let packet = match proto::read_packet(&mut io, &mut buf, MAX_PACKET).await {
            Ok(p) => p,
            Err(e) => {
                let seq = expect.wrapping_add(1);
                return fail(Some(io), seq, read_failure(e, expect));
            }
        };
        let seq = packet.seq.wrapping_add(1);
        if packet.seq != expect {
            return fail(
                Some(io),
                seq,
                bad(format!(
                    "packet with sequence id {} (expected {expect})",
                    packet.seq
                )),
            );
        }
        let parsed = match ClientPacket::parse(&packet.payload, io.is_tls()) {
            Ok(p) => p,
            Err(e) => return fail(Some(io), seq, bad(e.to_string())),
        };
        match parsed {
            ClientPacket::Response(response) => {
                return Ok(Greeted {
                    io,
                    response,
                    seq,
                    rest: buf,
                });
            }
            ClientPacket::SslRequest if expect == 1 => {
                let Some(t) = tls else {
                    let why = "the client asked for TLS, which this service refuses \
                               (config.clientTLS: refuse)";
                    return fail(
                        Some(io),
                        seq,
                        Failure::new(code::CLIENT_TLS_REFUSED, ConnError::Protocol(why.into())),
                    );
                };
                let ClientIo::Plain(tcp) = io else {
                    unreachable!("the first SSLRequest arrives on the plain socket")
                };
                // The server never answers an SSLRequest, so a client may send its
                // ClientHello in the same write: bytes read past the SSLRequest are the
                // start of the TLS stream and go to the TLS handshake (parsed as TLS
                // records, never as MySQL packets).
                let tcp = Prefixed {
                    pre: std::mem::take(&mut buf),
                    inner: tcp,
                };
                io = match accept(tcp, t).await {
                    Ok(s) => s,
                    // Nothing can be told: the TLS handshake consumed the socket.
                    Err(f) => return fail(None, seq, f),
                };
                expect = 2;
            }
            ClientPacket::SslRequest => {
                return fail(Some(io), seq, bad("a second SSLRequest".into()));
            }
        }
    }
}

fn bad(why: String) -> Failure {
    Failure::new(
        code::BAD_HANDSHAKE,
        ConnError::Protocol(format!("client: {why}")),
    )
}

fn read_failure(e: ReadError, expect: u8) -> Failure {
    match e {
        ReadError::Closed => {
            let why = if expect == 1 {
                "before its handshake response"
            } else {
                "after TLS, before its handshake response"
            };
            Failure::told(ConnError::ClientGone(why.into()))
        }
        ReadError::Io(e) => Failure::told(ConnError::Io(e)),
        e @ ReadError::TooLarge(_) => bad(e.to_string()),
    }
}

/// The client's socket with bytes already read from it in front (the start of its TLS
/// stream, read with its SSLRequest).
pub struct Prefixed {
    pre: BytesMut,
    inner: AppSocket,
}

impl AsyncRead for Prefixed {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        out: &mut tokio::io::ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let me = self.get_mut();
        if !me.pre.is_empty() {
            let n = me.pre.len().min(out.remaining());
            out.put_slice(&me.pre.split_to(n));
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut me.inner).poll_read(cx, out)
    }
}

impl AsyncWrite for Prefixed {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, b: &[u8]) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write(cx, b)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}

/// The TLS handshake with the client, presenting a certificate from the local CA.
async fn accept(tcp: Prefixed, t: &ClientTls<'_>) -> Result<ClientIo, Failure> {
    let fail = |why: String| Failure::told(ConnError::Protocol(format!("client TLS: {why}")));
    let start = tokio_rustls::LazyConfigAcceptor::new(rustls::server::Acceptor::default(), tcp)
        .await
        .map_err(|e| fail(format!("no valid ClientHello: {e}")))?;
    let hello = start.client_hello();
    let name = match (&t.name, hello.server_name()) {
        (Some(n), _) => n.clone(),
        (None, Some(sni)) => sni.to_owned(),
        (None, None) => "localhost".to_owned(),
    };
    let leaf =
        t.ca.leaf(&name)
            .map_err(|e| fail(format!("no certificate for {name:?}: {e:#}")))?;
    let config = leaf
        .server_config(&[])
        .map_err(|e| fail(format!("{e:#}")))?;
    let stream = start
        .into_stream(config)
        .await
        .map_err(|e| fail(format!("handshake failed: {e}")))?;
    Ok(ClientIo::Tls(Box::new(stream)))
}
