//! The server name of a TLS ClientHello, read from bytes peeked on the client socket
//! (nothing consumed): whether the broker terminates the connection or passes it
//! through untouched is decided before a byte is read.

/// The most ClientHello bytes examined (records included).
pub const MAX_HELLO: usize = 16 * 1024;

/// What the peeked bytes say.
#[derive(Debug, PartialEq, Eq)]
pub enum Hello {
    /// Not complete yet: peek again once more bytes arrived.
    NeedMore,
    /// Not a TLS ClientHello (or malformed).
    NotTls,
    /// A complete ClientHello and its `server_name` (host_name), if any.
    Sni(Option<String>),
}

/// Parse `buf` (the start of the client's stream).
#[must_use]
pub fn parse(buf: &[u8]) -> Hello {
    // Reassemble the handshake message from consecutive handshake records.
    let mut hs = Vec::new();
    let mut at = 0;
    loop {
        let Some(head) = buf.get(at..at + 5) else {
            return if buf.len() >= MAX_HELLO {
                Hello::NotTls
            } else {
                Hello::NeedMore
            };
        };
        if head[0] != 0x16 || head[1] != 3 {
            return Hello::NotTls;
        }
        let len = usize::from(u16::from_be_bytes([head[3], head[4]]));
        if len == 0 {
            return Hello::NotTls;
        }
        let Some(frag) = buf.get(at + 5..at + 5 + len) else {
            return if at + 5 + len > MAX_HELLO {
                Hello::NotTls
            } else {
                Hello::NeedMore
            };
        };
        hs.extend_from_slice(frag);
        at += 5 + len;
        if hs.len() >= 4 {
            if hs[0] != 1 {
                return Hello::NotTls;
            }
            let body = (usize::from(hs[1]) << 16) | (usize::from(hs[2]) << 8) | usize::from(hs[3]);
            if hs.len() >= 4 + body {
                return hello_sni(&hs[4..4 + body]).map_or(Hello::NotTls, Hello::Sni);
            }
        }
    }
}

struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        if self.0.len() < n {
            return None;
        }
        let (a, b) = self.0.split_at(n);
        self.0 = b;
        Some(a)
    }
    fn u8(&mut self) -> Option<usize> {
        self.take(1).map(|b| usize::from(b[0]))
    }
    fn u16(&mut self) -> Option<usize> {
        self.take(2)
            .map(|b| usize::from(u16::from_be_bytes([b[0], b[1]])))
    }
    fn vec8(&mut self) -> Option<&'a [u8]> {
        let n = self.u8()?;
        self.take(n)
    }
    fn vec16(&mut self) -> Option<&'a [u8]> {
        let n = self.u16()?;
        self.take(n)
    }
}

/// `None`: malformed.
fn hello_sni(body: &[u8]) -> Option<Option<String>> {
    let mut r = Reader(body);
    r.take(2 + 32)?; // version, random
    r.vec8()?; // session id
    r.vec16()?; // cipher suites
    r.vec8()?; // compression methods
    if r.0.is_empty() {
        return Some(None);
    }
    let mut exts = Reader(r.vec16()?);
    while !exts.0.is_empty() {
        let ty = exts.u16()?;
        let data = exts.vec16()?;
        if ty != 0 {
            continue;
        }
        let mut list = Reader(Reader(data).vec16()?);
        while !list.0.is_empty() {
            let kind = list.u8()?;
            let name = list.vec16()?;
            if kind == 0 {
                let name = std::str::from_utf8(name).ok()?;
                return Some(Some(name.trim_end_matches('.').to_ascii_lowercase()));
            }
        }
        return Some(None);
    }
    Some(None)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A ClientHello as rustls writes it, for `name`.
    fn hello(name: &str) -> Vec<u8> {
        let mut roots = rustls::RootCertStore::empty();
        roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
        let cfg = rustls::ClientConfig::builder_with_provider(std::sync::Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
        let mut c = rustls::ClientConnection::new(
            std::sync::Arc::new(cfg),
            name.to_owned().try_into().unwrap(),
        )
        .unwrap();
        let mut out = Vec::new();
        c.write_tls(&mut out).unwrap();
        out
    }

    #[test]
    fn finds_the_server_name() {
        let h = hello("API.example.test");
        assert_eq!(parse(&h), Hello::Sni(Some("api.example.test".into())));
        for cut in [0, 3, 5, 40, h.len() - 1] {
            assert_eq!(parse(&h[..cut]), Hello::NeedMore, "cut {cut}");
        }
        // An IP address: no SNI.
        assert_eq!(parse(&hello("127.0.0.1")), Hello::Sni(None));
        assert_eq!(parse(b"GET / HTTP/1.1\r\n\r\n"), Hello::NotTls);
        // Split across two records.
        let body = &h[5..];
        let (a, b) = body.split_at(10);
        let mut two = vec![0x16, 3, 1, 0, 10];
        two.extend_from_slice(a);
        two.extend_from_slice(&[0x16, 3, 1]);
        two.extend_from_slice(&u16::try_from(b.len()).unwrap().to_be_bytes());
        two.extend_from_slice(b);
        assert_eq!(parse(&two), Hello::Sni(Some("api.example.test".into())));
    }
}
