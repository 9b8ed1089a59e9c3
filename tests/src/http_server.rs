//! A loopback HTTP/1.1 test server (hyper), plain or HTTPS with its own test CA. It
//! records every request it receives (method, path with query, headers, body length and
//! SHA-256, which connection it came on) and answers 200 with `sha256=<hex of the body>`;
//! a path starting with `/status/NNN` is answered with that status instead. A request to
//! `/revoke` revokes the bearer token it carries: later requests with that token get 401.
//!
//! A WebSocket upgrade request (`Upgrade: websocket` with a `Sec-WebSocket-Key`, RFC 6455
//! 4.2) is answered 101 and each frame the client sends comes back as an unmasked frame
//! with the same opcode and payload, until a close frame (echoed too).
//!
//! [`HttpServer::start_token_endpoint`] starts an OAuth2 token endpoint instead.

use std::{
    collections::HashSet,
    convert::Infallible,
    net::SocketAddr,
    path::{Path, PathBuf},
    sync::{
        Arc, Mutex,
        atomic::{AtomicUsize, Ordering},
    },
};

use bytes::Bytes;
use http_body_util::{BodyExt as _, Full};
use hyper::{Request, Response, body::Incoming};
use hyper_util::rt::TokioIo;
use sha2::{Digest as _, Sha256};

/// One request as the server saw it.
#[derive(Debug, Clone)]
pub struct Seen {
    pub method: String,
    /// Path and query.
    pub target: String,
    /// Header names lowercase.
    pub headers: Vec<(String, String)>,
    pub body_len: u64,
    pub body_sha256: String,
    /// The connection's number (0, 1, ...).
    pub conn: usize,
}

impl Seen {
    /// Every value of header `name` (lowercase).
    #[must_use]
    pub fn header(&self, name: &str) -> Vec<&str> {
        self.headers
            .iter()
            .filter(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
            .collect()
    }
}

/// The server; stops when dropped.
pub struct HttpServer {
    pub addr: SocketAddr,
    /// The test CA's certificate (PEM file), for an HTTPS server.
    pub ca_cert: Option<PathBuf>,
    /// The server's own certificate (PEM file), for an HTTPS server.
    pub cert: Option<PathBuf>,
    seen: Arc<Mutex<Vec<Seen>>>,
    conns: Arc<AtomicUsize>,
    extra: Arc<Extra>,
    rt: Option<tokio::runtime::Runtime>,
}

/// What the server does beyond recording.
#[derive(Default)]
struct Extra {
    /// A token endpoint for this client id and secret.
    token: Option<(String, String)>,
    /// Tokens issued (token endpoint).
    fetches: AtomicUsize,
    /// Bearer tokens revoked through `/revoke` (API server).
    revoked: Mutex<HashSet<String>>,
}

impl HttpServer {
    /// Plain HTTP on `ip:port`.
    #[must_use]
    pub fn start(ip: &str, port: u16) -> Self {
        Self::start_inner(ip, port, None, Extra::default())
    }

    /// An OAuth2 token endpoint on `ip:port` following RFC 6749 4.4 (client credentials
    /// grant) and 5.1 (the reply): a `POST` with a form body `grant_type=client_credentials`
    /// and the client authenticated (2.3.1) by HTTP Basic over the form-urlencoded id and
    /// secret, or by `client_id` and `client_secret` body parameters, is answered 200 with
    /// `{"access_token": "<prefix>-<n>", "token_type": "Bearer", "expires_in": 3600}`,
    /// `n` counting the tokens issued (1, 2, ...); anything else gets a 400 or 401 with an
    /// RFC 6749 5.2 error. [`HttpServer::token_fetches`] counts the tokens issued.
    #[must_use]
    pub fn start_token_endpoint(ip: &str, port: u16, client_id: &str, secret: &str) -> Self {
        let extra = Extra {
            token: Some((client_id.to_owned(), secret.to_owned())),
            ..Extra::default()
        };
        Self::start_inner(ip, port, None, extra)
    }

    /// Tokens issued so far (a token endpoint).
    #[must_use]
    pub fn token_fetches(&self) -> usize {
        self.extra.fetches.load(Ordering::SeqCst)
    }

    /// HTTPS on `ip:port` with a certificate for `name` from a new test CA whose files
    /// go to `dir`.
    #[must_use]
    pub fn start_tls(ip: &str, port: u16, name: &str, dir: &Path) -> Self {
        let ca_key = rcgen::KeyPair::generate().expect("key");
        let mut ca_params = rcgen::CertificateParams::new(Vec::new()).expect("params");
        ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        ca_params
            .distinguished_name
            .push(rcgen::DnType::CommonName, "broker test server CA");
        let ca = ca_params.self_signed(&ca_key).expect("CA");
        let issuer = rcgen::Issuer::new(ca_params, ca_key);
        let key = rcgen::KeyPair::generate().expect("key");
        let leaf = rcgen::CertificateParams::new(vec![name.to_owned()])
            .expect("params")
            .signed_by(&key, &issuer)
            .expect("leaf");
        let ca_path = dir.join("test-server-ca.crt");
        let cert_path = dir.join("test-server.crt");
        std::fs::write(&ca_path, ca.pem()).expect("write CA");
        std::fs::write(&cert_path, leaf.pem()).expect("write cert");
        let cfg = rustls::ServerConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .expect("versions")
        .with_no_client_auth()
        .with_single_cert(
            vec![leaf.der().clone()],
            rustls::pki_types::PrivateKeyDer::Pkcs8(key.serialize_der().into()),
        )
        .expect("server config");
        let mut s = Self::start_inner(ip, port, Some(Arc::new(cfg)), Extra::default());
        s.ca_cert = Some(ca_path);
        s.cert = Some(cert_path);
        s
    }

    fn start_inner(
        ip: &str,
        port: u16,
        tls: Option<Arc<rustls::ServerConfig>>,
        extra: Extra,
    ) -> Self {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .expect("runtime");
        let addr: SocketAddr = format!("{ip}:{port}").parse().expect("address");
        let listener = rt
            .block_on(tokio::net::TcpListener::bind(addr))
            .expect("bind test HTTP server");
        let seen = Arc::new(Mutex::new(Vec::new()));
        let conns = Arc::new(AtomicUsize::new(0));
        let extra = Arc::new(extra);
        let (seen2, conns2, extra2) = (Arc::clone(&seen), Arc::clone(&conns), Arc::clone(&extra));
        rt.spawn(async move {
            let acceptor = tls.map(tokio_rustls::TlsAcceptor::from);
            loop {
                let Ok((sock, _)) = listener.accept().await else {
                    continue;
                };
                let n = conns2.fetch_add(1, Ordering::SeqCst);
                let seen = Arc::clone(&seen2);
                let extra = Arc::clone(&extra2);
                let acceptor = acceptor.clone();
                tokio::spawn(async move {
                    let svc = hyper::service::service_fn(move |req| {
                        let seen = Arc::clone(&seen);
                        let extra = Arc::clone(&extra);
                        async move { Ok::<_, Infallible>(answer(req, n, &seen, &extra).await) }
                    });
                    let b = hyper::server::conn::http1::Builder::new();
                    match acceptor {
                        Some(a) => {
                            if let Ok(s) = a.accept(sock).await {
                                let _ = b
                                    .serve_connection(TokioIo::new(s), svc)
                                    .with_upgrades()
                                    .await;
                            }
                        }
                        None => {
                            let _ = b
                                .serve_connection(TokioIo::new(sock), svc)
                                .with_upgrades()
                                .await;
                        }
                    }
                });
            }
        });
        Self {
            addr,
            ca_cert: None,
            cert: None,
            seen,
            conns,
            extra,
            rt: Some(rt),
        }
    }

    /// The requests received so far.
    #[must_use]
    pub fn seen(&self) -> Vec<Seen> {
        self.seen.lock().expect("lock").clone()
    }

    /// Connections accepted so far.
    #[must_use]
    pub fn connections(&self) -> usize {
        self.conns.load(Ordering::SeqCst)
    }
}

impl Drop for HttpServer {
    fn drop(&mut self) {
        if let Some(rt) = self.rt.take() {
            rt.shutdown_background();
        }
    }
}

async fn answer(
    mut req: Request<Incoming>,
    conn: usize,
    seen: &Mutex<Vec<Seen>>,
    extra: &Extra,
) -> Response<Full<Bytes>> {
    let ws_key = req
        .headers()
        .get(hyper::header::UPGRADE)
        .filter(|v| v.as_bytes().eq_ignore_ascii_case(b"websocket"))
        .and(req.headers().get("sec-websocket-key"))
        .map(|k| k.as_bytes().to_vec());
    let upgrade = ws_key.as_ref().map(|_| hyper::upgrade::on(&mut req));
    let method = req.method().to_string();
    let target = req
        .uri()
        .path_and_query()
        .map_or("/".to_owned(), |p| p.as_str().to_owned());
    let headers: Vec<(String, String)> = req
        .headers()
        .iter()
        .map(|(n, v)| {
            (
                n.as_str().to_owned(),
                String::from_utf8_lossy(v.as_bytes()).into_owned(),
            )
        })
        .collect();
    let mut body = req.into_body();
    let mut h = Sha256::new();
    let mut len = 0u64;
    let mut form = Vec::new();
    while let Some(f) = body.frame().await {
        let Ok(f) = f else { break };
        if let Some(d) = f.data_ref() {
            len += d.len() as u64;
            h.update(d);
            if extra.token.is_some() && form.len() < 64 * 1024 {
                form.extend_from_slice(d);
            }
        }
    }
    if let Some((id, secret)) = &extra.token {
        return token_reply(&method, &headers, &form, id, secret, &extra.fetches);
    }
    let sha: String = h.finalize().iter().map(|b| format!("{b:02x}")).collect();
    if let (Some(key), Some(up)) = (ws_key, upgrade) {
        seen.lock().expect("lock").push(Seen {
            method,
            target,
            headers,
            body_len: len,
            body_sha256: sha,
            conn,
        });
        tokio::spawn(async move {
            if let Ok(u) = up.await {
                let _ = ws_echo(TokioIo::new(u)).await;
            }
        });
        let mut r = Response::new(Full::new(Bytes::new()));
        *r.status_mut() = hyper::StatusCode::SWITCHING_PROTOCOLS;
        let h = r.headers_mut();
        h.insert(
            hyper::header::UPGRADE,
            hyper::header::HeaderValue::from_static("websocket"),
        );
        h.insert(
            hyper::header::CONNECTION,
            hyper::header::HeaderValue::from_static("Upgrade"),
        );
        h.insert(
            "sec-websocket-accept",
            hyper::header::HeaderValue::from_str(&ws_accept(&key)).expect("accept"),
        );
        return r;
    }
    let mut status = target
        .strip_prefix("/status/")
        .and_then(|s| s.get(..3))
        .and_then(|s| s.parse::<u16>().ok())
        .unwrap_or(200);
    let bearer = headers
        .iter()
        .find(|(n, _): &&(String, String)| n == "authorization")
        .and_then(|(_, v)| v.strip_prefix("Bearer "))
        .map(str::to_owned);
    if let Some(b) = bearer {
        let mut revoked = extra.revoked.lock().expect("lock");
        if revoked.contains(&b) {
            status = 401;
        } else if target == "/revoke" {
            revoked.insert(b);
        }
    }
    seen.lock().expect("lock").push(Seen {
        method,
        target,
        headers,
        body_len: len,
        body_sha256: sha.clone(),
        conn,
    });
    let mut r = Response::new(Full::new(Bytes::from(format!("sha256={sha}\n"))));
    *r.status_mut() = hyper::StatusCode::from_u16(status).unwrap_or(hyper::StatusCode::OK);
    r
}

/// The token endpoint's answer to one request (RFC 6749 4.4.2, 2.3.1, 5.1, 5.2).
fn token_reply(
    method: &str,
    headers: &[(String, String)],
    form: &[u8],
    id: &str,
    secret: &str,
    fetches: &AtomicUsize,
) -> Response<Full<Bytes>> {
    let json = |status: u16, body: String| {
        let mut r = Response::new(Full::new(Bytes::from(body)));
        *r.status_mut() = hyper::StatusCode::from_u16(status).expect("status");
        r.headers_mut().insert(
            hyper::header::CONTENT_TYPE,
            hyper::header::HeaderValue::from_static("application/json"),
        );
        r.headers_mut().insert(
            hyper::header::CACHE_CONTROL,
            hyper::header::HeaderValue::from_static("no-store"),
        );
        r
    };
    let err = |status: u16, code: &str| json(status, format!("{{\"error\":\"{code}\"}}"));
    let header = |name: &str| {
        headers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    };
    if method != "POST"
        || !header("content-type")
            .is_some_and(|c| c.starts_with("application/x-www-form-urlencoded"))
    {
        return err(400, "invalid_request");
    }
    let params: Vec<(String, String)> = url_decode_form(form);
    let param = |name: &str| {
        params
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    };
    if param("grant_type") != Some("client_credentials") {
        return err(400, "unsupported_grant_type");
    }
    let basic = header("authorization")
        .and_then(|v| v.strip_prefix("Basic "))
        .and_then(|b| {
            use base64::Engine as _;
            base64::engine::general_purpose::STANDARD.decode(b).ok()
        })
        .and_then(|raw| String::from_utf8(raw).ok())
        .and_then(|pair| {
            let (i, s) = pair.split_once(':')?;
            Some((form_decode(i.as_bytes()), form_decode(s.as_bytes())))
        });
    let in_body = param("client_id").zip(param("client_secret"));
    let ok = match (basic, in_body) {
        (Some((i, s)), None) => i == id && s == secret,
        (None, Some((i, s))) => i == id && s == secret,
        _ => false,
    };
    if !ok {
        return err(401, "invalid_client");
    }
    let n = fetches.fetch_add(1, Ordering::SeqCst) + 1;
    json(
        200,
        format!(
            "{{\"access_token\":\"{id}-token-{n}\",\"token_type\":\"Bearer\",\"expires_in\":3600}}"
        ),
    )
}

/// `application/x-www-form-urlencoded` pairs.
fn url_decode_form(form: &[u8]) -> Vec<(String, String)> {
    form.split(|&b| b == b'&')
        .filter(|p| !p.is_empty())
        .map(|p| {
            let mut it = p.splitn(2, |&b| b == b'=');
            let n = it.next().unwrap_or_default();
            let v = it.next().unwrap_or_default();
            (form_decode(n), form_decode(v))
        })
        .collect()
}

/// One form-urlencoded component (`+` is a space, `%XX` a byte).
fn form_decode(s: &[u8]) -> String {
    let mut out = Vec::with_capacity(s.len());
    let mut i = 0;
    while i < s.len() {
        match s[i] {
            b'+' => out.push(b' '),
            b'%' if i + 2 < s.len() => {
                let hex = std::str::from_utf8(&s[i + 1..i + 3]).unwrap_or("");
                if let Ok(b) = u8::from_str_radix(hex, 16) {
                    out.push(b);
                    i += 2;
                } else {
                    out.push(b'%');
                }
            }
            b => out.push(b),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// `Sec-WebSocket-Accept` for a key (RFC 6455 4.2.2): base64(SHA-1(key + GUID)).
fn ws_accept(key: &[u8]) -> String {
    use base64::Engine as _;
    let mut m = key.to_vec();
    m.extend_from_slice(b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11");
    base64::engine::general_purpose::STANDARD.encode(sha1(&m))
}

/// SHA-1 (FIPS 180-4), for the WebSocket handshake only.
fn sha1(msg: &[u8]) -> [u8; 20] {
    let mut h: [u32; 5] = [
        0x6745_2301,
        0xEFCD_AB89,
        0x98BA_DCFE,
        0x1032_5476,
        0xC3D2_E1F0,
    ];
    let mut m = msg.to_vec();
    let bits = (msg.len() as u64).wrapping_mul(8);
    m.push(0x80);
    while m.len() % 64 != 56 {
        m.push(0);
    }
    m.extend_from_slice(&bits.to_be_bytes());
    for block in m.chunks(64) {
        let mut w = [0u32; 80];
        for (i, c) in block.chunks(4).enumerate() {
            w[i] = u32::from_be_bytes([c[0], c[1], c[2], c[3]]);
        }
        for i in 16..80 {
            w[i] = (w[i - 3] ^ w[i - 8] ^ w[i - 14] ^ w[i - 16]).rotate_left(1);
        }
        let [mut a, mut b, mut c, mut d, mut e] = h;
        for (i, wi) in w.iter().enumerate() {
            let (f, k) = match i {
                0..=19 => ((b & c) | (!b & d), 0x5A82_7999),
                20..=39 => (b ^ c ^ d, 0x6ED9_EBA1),
                40..=59 => ((b & c) | (b & d) | (c & d), 0x8F1B_BCDC),
                _ => (b ^ c ^ d, 0xCA62_C1D6),
            };
            let t = a
                .rotate_left(5)
                .wrapping_add(f)
                .wrapping_add(e)
                .wrapping_add(k)
                .wrapping_add(*wi);
            e = d;
            d = c;
            c = b.rotate_left(30);
            b = a;
            a = t;
        }
        for (x, y) in h.iter_mut().zip([a, b, c, d, e]) {
            *x = x.wrapping_add(y);
        }
    }
    let mut out = [0u8; 20];
    for (o, x) in out.chunks_mut(4).zip(h) {
        o.copy_from_slice(&x.to_be_bytes());
    }
    out
}

/// Echo WebSocket frames (payloads up to 1 MiB) unmasked until a close frame.
async fn ws_echo<S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin>(
    mut s: S,
) -> std::io::Result<()> {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    loop {
        let mut hdr = [0u8; 2];
        s.read_exact(&mut hdr).await?;
        let opcode = hdr[0] & 0x0f;
        let masked = hdr[1] & 0x80 != 0;
        let len = match hdr[1] & 0x7f {
            126 => u64::from(s.read_u16().await?),
            127 => s.read_u64().await?,
            n => u64::from(n),
        };
        if len > 1 << 20 {
            return Ok(());
        }
        let mut mask = [0u8; 4];
        if masked {
            s.read_exact(&mut mask).await?;
        }
        let mut payload = vec![0u8; usize::try_from(len).unwrap_or(0)];
        s.read_exact(&mut payload).await?;
        if masked {
            for (i, b) in payload.iter_mut().enumerate() {
                *b ^= mask[i % 4];
            }
        }
        let mut out = vec![0x80 | opcode];
        if payload.len() < 126 {
            out.push(u8::try_from(payload.len()).unwrap_or(0));
        } else {
            out.push(126);
            out.extend_from_slice(
                &u16::try_from(payload.len())
                    .unwrap_or(u16::MAX)
                    .to_be_bytes(),
            );
        }
        out.extend_from_slice(&payload);
        s.write_all(&out).await?;
        if opcode == 8 {
            return s.shutdown().await;
        }
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn websocket_accept_known_answer() {
        // RFC 6455 1.3's example.
        assert_eq!(
            super::ws_accept(b"dGhlIHNhbXBsZSBub25jZQ=="),
            "s3pPLMBiTxaQ9kYGzzhZRbK+xOo="
        );
    }
}
