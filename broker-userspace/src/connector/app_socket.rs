//! The app's socket as a listener accepted it: TCP (the transparent listener, a
//! `listenOn: tcp://` listener) or Unix (`listenOn: unix:///PATH`).
//!
//! Connectors read and write it like any stream ([`AsyncRead`], [`AsyncWrite`]) and peek
//! at it ([`AppSocket::peek`]); the core's readiness-based relay uses
//! [`AppSocket::readable`], [`AppSocket::try_read_buf`] and friends. Only a TCP socket
//! can be spliced in the kernel (the sockmap programs see TCP sockets only): a Unix
//! client is always relayed in userspace.

use std::{
    io,
    os::fd::{AsFd, AsRawFd, BorrowedFd, RawFd},
    pin::Pin,
    task::{Context, Poll},
};

use tokio::{
    io::{AsyncRead, AsyncWrite, Interest, ReadBuf},
    net::{TcpStream, UnixStream},
};

/// The app's end of a brokered connection, as accepted.
#[derive(Debug)]
pub enum AppSocket {
    Tcp(TcpStream),
    Unix(UnixStream),
}

impl From<TcpStream> for AppSocket {
    fn from(s: TcpStream) -> Self {
        Self::Tcp(s)
    }
}

impl From<UnixStream> for AppSocket {
    fn from(s: UnixStream) -> Self {
        Self::Unix(s)
    }
}

impl AppSocket {
    /// The TCP socket, when it is one (what the kernel splice and the redirect records
    /// need).
    #[must_use]
    pub fn as_tcp(&self) -> Option<&TcpStream> {
        match self {
            Self::Tcp(s) => Some(s),
            Self::Unix(_) => None,
        }
    }

    /// Wait for data and copy it into `buf` without consuming it; `Ok(0)` at the end of
    /// the stream.
    ///
    /// # Errors
    /// The socket's error.
    pub async fn peek(&self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Self::Tcp(s) => s.peek(buf).await,
            Self::Unix(s) => {
                s.async_io(Interest::READABLE, || crate::sys::peek_now(s, buf))
                    .await
            }
        }
    }

    /// Wait until the socket may be read (see `TcpStream::readable`).
    ///
    /// # Errors
    /// The socket's error.
    pub async fn readable(&self) -> io::Result<()> {
        match self {
            Self::Tcp(s) => s.readable().await,
            Self::Unix(s) => s.readable().await,
        }
    }

    /// Wait until the socket may be written (see `TcpStream::writable`).
    ///
    /// # Errors
    /// The socket's error.
    pub async fn writable(&self) -> io::Result<()> {
        match self {
            Self::Tcp(s) => s.writable().await,
            Self::Unix(s) => s.writable().await,
        }
    }

    /// Read what is there now into `buf`'s spare capacity (`WouldBlock` when nothing is).
    ///
    /// # Errors
    /// `WouldBlock`, or the socket's error.
    pub fn try_read_buf(&self, buf: &mut Vec<u8>) -> io::Result<usize> {
        match self {
            Self::Tcp(s) => s.try_read_buf(buf),
            Self::Unix(s) => s.try_read_buf(buf),
        }
    }

    /// Write what fits now (`WouldBlock` when nothing does).
    ///
    /// # Errors
    /// `WouldBlock`, or the socket's error.
    pub fn try_write(&self, data: &[u8]) -> io::Result<usize> {
        match self {
            Self::Tcp(s) => s.try_write(data),
            Self::Unix(s) => s.try_write(data),
        }
    }
}

impl AsRawFd for AppSocket {
    fn as_raw_fd(&self) -> RawFd {
        match self {
            Self::Tcp(s) => s.as_raw_fd(),
            Self::Unix(s) => s.as_raw_fd(),
        }
    }
}

impl AsFd for AppSocket {
    fn as_fd(&self) -> BorrowedFd<'_> {
        match self {
            Self::Tcp(s) => s.as_fd(),
            Self::Unix(s) => s.as_fd(),
        }
    }
}

impl AsyncRead for AppSocket {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Self::Tcp(s) => Pin::new(s).poll_read(cx, buf),
            Self::Unix(s) => Pin::new(s).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for AppSocket {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, b: &[u8]) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Self::Tcp(s) => Pin::new(s).poll_write(cx, b),
            Self::Unix(s) => Pin::new(s).poll_write(cx, b),
        }
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Self::Tcp(s) => Pin::new(s).poll_write_vectored(cx, bufs),
            Self::Unix(s) => Pin::new(s).poll_write_vectored(cx, bufs),
        }
    }

    fn is_write_vectored(&self) -> bool {
        match self {
            Self::Tcp(s) => s.is_write_vectored(),
            Self::Unix(s) => s.is_write_vectored(),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Self::Tcp(s) => Pin::new(s).poll_flush(cx),
            Self::Unix(s) => Pin::new(s).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Self::Tcp(s) => Pin::new(s).poll_shutdown(cx),
            Self::Unix(s) => Pin::new(s).poll_shutdown(cx),
        }
    }
}

#[cfg(test)]
mod tests {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

    use super::*;

    #[tokio::test]
    async fn a_unix_socket_peeks_reads_and_writes_like_tcp() {
        let (a, mut b) = UnixStream::pair().unwrap();
        let a = AppSocket::from(a);
        b.write_all(b"hello").await.unwrap();
        let mut buf = [0u8; 8];
        let n = a.peek(&mut buf).await.unwrap();
        assert_eq!(&buf[..n], b"hello");
        // Peeked, not consumed.
        let mut v = Vec::with_capacity(16);
        a.readable().await.unwrap();
        assert_eq!(a.try_read_buf(&mut v).unwrap(), 5);
        assert_eq!(v, b"hello");
        a.writable().await.unwrap();
        assert_eq!(a.try_write(b"back").unwrap(), 4);
        let mut got = [0u8; 4];
        b.read_exact(&mut got).await.unwrap();
        assert_eq!(&got, b"back");
        drop(b);
        assert_eq!(a.peek(&mut buf).await.unwrap(), 0, "end of stream");
        assert!(a.as_tcp().is_none());
    }
}
