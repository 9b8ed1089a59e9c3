//! A loopback HTTP/1.1 test server (hyper), plain or HTTPS with its own test CA. It
//! records every request it receives (method, path with query, headers, body length and
//! SHA-256, which connection it came on) and answers 200 with `sha256=<hex of the body>`;
//! a path starting with `/status/NNN` is answered with that status instead.

use std::{
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
    rt: Option<tokio::runtime::Runtime>,
}

impl HttpServer {
    /// Plain HTTP on `ip:port`.
    #[must_use]
    pub fn start(ip: &str, port: u16) -> Self {
        Self::start_inner(ip, port, None)
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
        let mut s = Self::start_inner(ip, port, Some(Arc::new(cfg)));
        s.ca_cert = Some(ca_path);
        s.cert = Some(cert_path);
        s
    }

    fn start_inner(ip: &str, port: u16, tls: Option<Arc<rustls::ServerConfig>>) -> Self {
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
        let (seen2, conns2) = (Arc::clone(&seen), Arc::clone(&conns));
        rt.spawn(async move {
            let acceptor = tls.map(tokio_rustls::TlsAcceptor::from);
            loop {
                let Ok((sock, _)) = listener.accept().await else {
                    continue;
                };
                let n = conns2.fetch_add(1, Ordering::SeqCst);
                let seen = Arc::clone(&seen2);
                let acceptor = acceptor.clone();
                tokio::spawn(async move {
                    let svc = hyper::service::service_fn(move |req| {
                        let seen = Arc::clone(&seen);
                        async move { Ok::<_, Infallible>(answer(req, n, &seen).await) }
                    });
                    let b = hyper::server::conn::http1::Builder::new();
                    match acceptor {
                        Some(a) => {
                            if let Ok(s) = a.accept(sock).await {
                                let _ = b.serve_connection(TokioIo::new(s), svc).await;
                            }
                        }
                        None => {
                            let _ = b.serve_connection(TokioIo::new(sock), svc).await;
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
    req: Request<Incoming>,
    conn: usize,
    seen: &Mutex<Vec<Seen>>,
) -> Response<Full<Bytes>> {
    let method = req.method().to_string();
    let target = req
        .uri()
        .path_and_query()
        .map_or("/".to_owned(), |p| p.as_str().to_owned());
    let headers = req
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
    while let Some(f) = body.frame().await {
        let Ok(f) = f else { break };
        if let Some(d) = f.data_ref() {
            len += d.len() as u64;
            h.update(d);
        }
    }
    let sha: String = h.finalize().iter().map(|b| format!("{b:02x}")).collect();
    let status = target
        .strip_prefix("/status/")
        .and_then(|s| s.get(..3))
        .and_then(|s| s.parse::<u16>().ok())
        .unwrap_or(200);
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
