//! One HTTP client connection: hyper's HTTP/1.1 server on the app's leg (plain, or TLS
//! terminated with a leaf from the local CA for an intercepted name), and one upstream
//! connection (from the [`Dialer`](crate::connector::dial::Dialer), TLS verified when
//! the upstream is https) kept alive across the client's requests. Each request that
//! `authenticateURLsMatching` selects gets the service's credentials; bodies stream
//! through unbuffered; one access line per request.
//!
//! A TLS connection whose server name the service does not intercept is not decrypted:
//! the core relays it byte for byte to the app's original destination.

use std::{
    convert::Infallible,
    io,
    pin::Pin,
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering},
    },
    task::{Context, Poll},
    time::{Duration, Instant},
};

use bytes::Bytes;
use http::{HeaderMap, HeaderValue, Request, Response, StatusCode, Uri, header};
use http_body_util::{BodyExt as _, Empty, Full, combinators::BoxBody};
use hyper::body::{Body, Frame, Incoming, SizeHint};
use hyper_util::rt::TokioIo;
use tokio::{
    io::{AsyncRead, AsyncWrite, ReadBuf},
    net::TcpStream,
};

use super::{
    config::{HttpSettings, Style},
    inject, sigv4, sni,
    tokens::Tokens,
};
use crate::{
    config::{InterceptTarget, ListenAddr, Service},
    connector::{
        AsyncStream, BoxFuture, Caller, Conn, ConnError, ConnStats, Connector, Credentials, Env,
        Handoff, Session, UpstreamStream, close_gracefully,
        dial::HostPort,
        target::{self, AppDestination, Destinations, Fallbacks},
    },
    secret::Secret,
    tls::{self, TlsOptions, Verify},
};

/// How long a client may take to send the first bytes (or its whole ClientHello).
const FIRST_BYTES: Duration = Duration::from_secs(30);

type UpBody = BoxBody<Bytes, hyper::Error>;

/// An HTTP service.
#[derive(Debug)]
pub struct HttpConnector {
    service: Service,
    upstream_tls: Arc<rustls::ClientConfig>,
    tokens: Option<Tokens>,
    /// The `intercept:` hostnames (lowercase): the TLS server names terminated.
    names: Vec<String>,
}

impl HttpConnector {
    /// # Errors
    /// An unreadable CA file; an OAuth2 configuration that cannot be used.
    pub fn new(service: &Service) -> anyhow::Result<Self> {
        let cfg = crate::connector::settings::<HttpSettings>(service)?;
        let mut tls = (*tls::client_config(TlsOptions {
            verify: Verify::Full,
            ca_file: cfg.ca_file.as_deref(),
            with_system_roots: true,
            client_cert: None,
        })?)
        .clone();
        tls.alpn_protocols = vec![b"http/1.1".to_vec()];
        let tokens = match service.authentication.first() {
            Some(crate::config::AuthMethod::OAuth2(o)) => {
                Some(Tokens::new(o, cfg.ca_file.as_deref())?)
            }
            None => None,
        };
        let reads_token = cfg
            .headers
            .iter()
            .map(|(_, t)| t)
            .chain(cfg.query_params.iter().map(|(_, t)| t))
            .any(|t| t.names().contains(&"access_token"));
        if reads_token && tokens.is_none() && !service.credentials.contains_key("access_token") {
            anyhow::bail!(
                "service `{}`: the templates read `access_token`, but the service has no \
                 credential of that name nor an `authentication: [{{type: oauth2}}]` entry",
                service.name
            );
        }
        let names = service
            .intercept
            .iter()
            .filter_map(|t| match t {
                InterceptTarget::Host { host, .. } => {
                    Some(host.trim_end_matches('.').to_ascii_lowercase())
                }
                _ => None,
            })
            .collect();
        Ok(Self {
            service: service.clone(),
            upstream_tls: Arc::new(tls),
            tokens,
            names,
        })
    }

    fn cfg(&self) -> &HttpSettings {
        self.service
            .connector
            .settings::<HttpSettings>()
            .expect("built from these settings")
    }
}

impl Connector for HttpConnector {
    fn serve<'a>(
        &'a self,
        env: &'a Env,
        conn: &'a mut Conn,
        client: TcpStream,
    ) -> BoxFuture<'a, Result<Handoff, ConnError>> {
        Box::pin(async move {
            match first_bytes(&client).await {
                Err(e) => {
                    close_gracefully(client).await;
                    Err(e)
                }
                Ok(None) => {
                    let h = Handler::new(self, env, conn, false, None);
                    Ok(h.run(client, conn).await)
                }
                Ok(Some(sni)) => match self.tls_name(conn, sni.as_deref()) {
                    Some(name) => self.terminate(env, conn, client, name).await,
                    None => self.pass_through(env, conn, client).await,
                },
            }
        })
    }

    fn uses_ca(&self) -> bool {
        // Any intercepted port may carry TLS for an intercepted name.
        !self.service.intercept.is_empty()
            || matches!(self.service.listen_on, Some(ListenAddr::Tcp(_)))
    }
}

impl HttpConnector {
    /// The name to present a certificate for, when the broker terminates this TLS
    /// connection: an intercepted connection's server name must be one the service
    /// intercepts; a `listenOn` client gets its server name, else `localhost`.
    fn tls_name(&self, conn: &Conn, sni: Option<&str>) -> Option<String> {
        if conn.orig_dst.is_none() {
            return Some(sni.unwrap_or("localhost").to_owned());
        }
        let sni = sni?;
        let known = self.names.iter().any(|n| n == sni)
            || conn
                .orig_host
                .as_deref()
                .is_some_and(|h| h.trim_end_matches('.').eq_ignore_ascii_case(sni));
        known.then(|| sni.to_owned())
    }

    async fn terminate(
        &self,
        env: &Env,
        conn: &mut Conn,
        client: TcpStream,
        name: String,
    ) -> Result<Handoff, ConnError> {
        let Some(ca) = env.ca.as_ref() else {
            close_gracefully(client).await;
            return Err(ConnError::Config("the local CA is not loaded".into()));
        };
        let fail = |why: String| ConnError::Protocol(format!("client TLS: {why}"));
        let start =
            tokio_rustls::LazyConfigAcceptor::new(rustls::server::Acceptor::default(), client)
                .await
                .map_err(|e| fail(format!("no valid ClientHello: {e}")))?;
        let config = ca
            .leaf(&name)
            .and_then(|l| l.server_config(&[b"http/1.1"]))
            .map_err(|e| fail(format!("no certificate for {name:?}: {e:#}")))?;
        let stream = tokio::time::timeout(FIRST_BYTES, start.into_stream(config))
            .await
            .map_err(|_| fail("handshake timed out".into()))?
            .map_err(|e| fail(format!("handshake failed: {e}")))?;
        conn.stats.client_tls = true;
        let h = Handler::new(self, env, conn, true, Some(name));
        Ok(h.run(stream, conn).await)
    }

    /// TLS for a name the service does not intercept: relayed, never decrypted.
    async fn pass_through(
        &self,
        env: &Env,
        conn: &mut Conn,
        client: TcpStream,
    ) -> Result<Handoff, ConnError> {
        conn.stats.request = Some("tls_passthrough");
        let Some(dst) = conn.orig_dst else {
            close_gracefully(client).await;
            return Err(ConnError::Protocol("TLS without a destination".into()));
        };
        let to = HostPort::from(dst);
        conn.stats.upstream = Some(to.to_string());
        match env.dialer.dial(&to).await {
            Ok(up) => Ok(Handoff::Relay(Session::transparent(
                client,
                UpstreamStream::Plain(up),
            ))),
            Err(e) => {
                close_gracefully(client).await;
                Err(e)
            }
        }
    }
}

/// Wait for the client's first bytes: `None` for plain HTTP, `Some(server name)` for a
/// complete TLS ClientHello (peeked, not consumed).
async fn first_bytes(client: &TcpStream) -> Result<Option<Option<String>>, ConnError> {
    let deadline = tokio::time::Instant::now() + FIRST_BYTES;
    let mut buf = vec![0u8; sni::MAX_HELLO];
    let mut last = 0;
    loop {
        let n = tokio::time::timeout_at(deadline, client.peek(&mut buf))
            .await
            .map_err(|_| ConnError::ClientGone("sent nothing within 30 s".into()))??;
        if n == 0 {
            return Err(ConnError::ClientGone("closed before a request".into()));
        }
        if buf[0] != 0x16 {
            return Ok(None);
        }
        match sni::parse(&buf[..n]) {
            sni::Hello::Sni(name) => return Ok(Some(name)),
            sni::Hello::NotTls => return Ok(None),
            sni::Hello::NeedMore if n == last => {
                // Nothing new yet: peek returns at once while data is queued.
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            sni::Hello::NeedMore => last = n,
        }
        if tokio::time::Instant::now() >= deadline {
            return Err(ConnError::ClientGone("incomplete TLS ClientHello".into()));
        }
    }
}

/// The upstream connection kept for a client connection.
struct Upstream {
    key: (HostPort, bool),
    sender: hyper::client::conn::http1::SendRequest<UpBody>,
}

/// What one client connection's requests share.
struct Handler<'a> {
    c: &'a HttpConnector,
    env: &'a Env,
    service: Arc<Service>,
    caller: Option<Caller>,
    orig_dst: Option<std::net::SocketAddr>,
    orig_host: Option<String>,
    listener_port: Option<u16>,
    client_tls: bool,
    /// The server name the client sent (TLS terminated here).
    sni: Option<String>,
    upstream: tokio::sync::Mutex<Option<Upstream>>,
    /// For the connection line: the last upstream, the credential fetches.
    upstream_addr: Mutex<Option<String>>,
    fetched: Mutex<Vec<String>>,
    bytes_up: Arc<AtomicU64>,
    bytes_down: Arc<AtomicU64>,
}

impl<'a> Handler<'a> {
    fn new(
        c: &'a HttpConnector,
        env: &'a Env,
        conn: &Conn,
        client_tls: bool,
        sni: Option<String>,
    ) -> Self {
        Self {
            c,
            env,
            service: Arc::clone(&conn.service),
            caller: conn.caller.clone(),
            orig_dst: conn.orig_dst,
            orig_host: conn.orig_host.clone(),
            listener_port: match &conn.service.listen_on {
                Some(ListenAddr::Tcp(a)) => Some(a.port()),
                _ => None,
            },
            client_tls,
            sni,
            upstream: tokio::sync::Mutex::new(None),
            upstream_addr: Mutex::new(None),
            fetched: Mutex::new(Vec::new()),
            bytes_up: Arc::default(),
            bytes_down: Arc::default(),
        }
    }

    /// Serve the client's requests until it closes; fills the connection's stats.
    async fn run<IO>(self, io: IO, conn: &mut Conn) -> Handoff
    where
        IO: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let io = Counting {
            io,
            read: Arc::clone(&self.bytes_up),
            written: Arc::clone(&self.bytes_down),
        };
        let h = &self;
        let svc = hyper::service::service_fn(move |req| async move {
            Ok::<_, Infallible>(h.handle(req).await)
        });
        let r = hyper::server::conn::http1::Builder::new()
            .keep_alive(true)
            .serve_connection(TokioIo::new(io), svc)
            .with_upgrades()
            .await;
        if let Err(e) = r {
            tracing::debug!(service = %self.service.name, "HTTP client connection: {e}");
        }
        conn.stats.upstream = self.upstream_addr.lock().expect("lock").take();
        conn.stats.fetched = std::mem::take(&mut *self.fetched.lock().expect("lock"));
        conn.stats.bytes_up = self.bytes_up.load(Ordering::Relaxed);
        conn.stats.bytes_down = self.bytes_down.load(Ordering::Relaxed);
        Handoff::Done
    }

    async fn handle(&self, req: Request<Incoming>) -> Response<LoggedBody> {
        let started = Instant::now();
        let authority = req
            .headers()
            .get(header::HOST)
            .and_then(|h| h.to_str().ok())
            .map(str::to_owned)
            .or_else(|| req.uri().authority().map(|a| a.to_string()))
            .unwrap_or_default();
        let mut log = RequestLog {
            service: Arc::clone(&self.service),
            caller: self.caller.clone(),
            method: req.method().to_string(),
            authority,
            path: req.uri().path().to_owned(),
            status: 0,
            bytes: 0,
            started,
            error: None,
        };
        match self.forward(req).await {
            Ok(resp) => {
                log.status = resp.status().as_u16();
                resp.map(|b| LoggedBody {
                    inner: b.boxed(),
                    log: Some(log),
                })
            }
            Err((status, msg)) => {
                log.status = status.as_u16();
                log.error = Some(msg.clone());
                let body = serde_json::json!({"error": msg, "service": self.service.name});
                let mut r = Response::new(LoggedBody {
                    inner: Full::new(Bytes::from(body.to_string()))
                        .map_err(|never| match never {})
                        .boxed(),
                    log: Some(log),
                });
                *r.status_mut() = status;
                r.headers_mut().insert(
                    header::CONTENT_TYPE,
                    HeaderValue::from_static("application/json"),
                );
                r
            }
        }
    }

    /// Where this request goes: host and port, TLS, the name to verify, and the `Host`
    /// header to send (`None`: the client's).
    fn target(
        &self,
        creds: &Credentials,
        uri: &Uri,
    ) -> Result<(HostPort, bool, String, Option<String>), ConnError> {
        let cfg = self.c.cfg();
        if let Some(u) = &cfg.upstream {
            let to = HostPort::new(u.host.clone(), u.port);
            return Ok((to, u.https, u.host.clone(), Some(u.authority())));
        }
        if self.orig_dst.is_none()
            && let (Some(scheme), Some(auth)) = (uri.scheme_str(), uri.authority())
        {
            // Forward-proxy form (`http_proxy`): the absolute URI names the origin.
            let https = scheme == "https" || cfg.force_ssl;
            let host = auth.host().trim_start_matches('[').trim_end_matches(']');
            let port = auth
                .port_u16()
                .unwrap_or(if scheme == "https" || https { 443 } else { 80 });
            return Ok((
                HostPort::new(host, port),
                https,
                host.to_owned(),
                Some(auth.to_string()),
            ));
        }
        let t = target::resolve(
            creds,
            AppDestination {
                addr: self.orig_dst,
                host: self.orig_host.as_deref(),
            },
            Fallbacks {
                default_port: self.listener_port,
                ..Fallbacks::default()
            },
            Destinations::Any,
        )?;
        let https = self.client_tls || cfg.force_ssl;
        let mut to = t.to;
        if https && !self.client_tls && to.port == 80 {
            to.port = 443;
        }
        let name = self.sni.clone().unwrap_or(t.name);
        Ok((to, https, name, None))
    }

    async fn credentials(&self) -> Result<Credentials, ConnError> {
        let mut stats = ConnStats::default();
        let r = self.env.credentials(&self.service, false, &mut stats).await;
        if !stats.fetched.is_empty() {
            let mut f = self.fetched.lock().expect("lock");
            if f.is_empty() {
                *f = stats.fetched;
            }
        }
        r
    }

    async fn forward(&self, mut req: Request<Incoming>) -> Result<Response<Incoming>, Failure> {
        let cfg = self.c.cfg();
        let bad = |e: ConnError| (StatusCode::BAD_GATEWAY, e.to_string());
        let creds = self.credentials().await.map_err(bad)?;
        let (to, https, name, host) = self.target(&creds, req.uri()).map_err(bad)?;
        let scheme = if https || self.client_tls {
            "https"
        } else {
            "http"
        };
        let authority = host.clone().unwrap_or_else(|| {
            req.headers()
                .get(header::HOST)
                .and_then(|h| h.to_str().ok())
                .unwrap_or_default()
                .to_owned()
        });
        let pq = req.uri().path_and_query().map_or("/", |p| p.as_str());
        let url = format!("{scheme}://{authority}{pq}");
        let authenticate =
            cfg.url_patterns.is_empty() || cfg.url_patterns.iter().any(|r| r.is_match(&url));

        // The request as the upstream gets it.
        let upgrade = is_upgrade(req.headers());
        let client_upgrade = upgrade.then(|| hyper::upgrade::on(&mut req));
        let (mut parts, body) = req.into_parts();
        strip_hop_by_hop(&mut parts.headers, upgrade);
        parts.headers.remove(header::EXPECT);
        if let Some(h) = &host {
            parts.headers.insert(
                header::HOST,
                HeaderValue::from_str(h).map_err(|_| bad(ConnError::Config("bad host".into())))?,
            );
        } else if !parts.headers.contains_key(header::HOST) {
            let h = HeaderValue::from_str(&to.to_string())
                .map_err(|_| bad(ConnError::Config("bad host".into())))?;
            parts.headers.insert(header::HOST, h);
        }
        let base = cfg.upstream.as_ref().map_or("", |u| u.base_path.as_str());
        let path = parts.uri.path();
        let query = parts.uri.query().map(str::to_owned);
        let mut origin = format!("{base}{path}");
        if let Some(q) = &query {
            origin.push('?');
            origin.push_str(q);
        }
        parts.version = http::Version::HTTP_11;
        let mut token = None;
        let mut aws_scope = None;
        if authenticate {
            if cfg.style == Style::Aws {
                // Region and service from the app's own signature; none: forwarded
                // unsigned, as Secretless does.
                aws_scope = parts
                    .headers
                    .get(header::AUTHORIZATION)
                    .and_then(|v| v.to_str().ok())
                    .and_then(sigv4::scope_from_authorization);
            }
            if !cfg.keep_client_authorization {
                parts.headers.remove(header::AUTHORIZATION);
            }
            token = self
                .authenticate(&creds, &mut parts.headers, &mut origin)
                .await?;
        }
        parts.uri = origin
            .parse()
            .map_err(|_| bad(ConnError::Protocol("invalid request path".into())))?;
        let replayable = body.is_end_stream();
        let mut up_body = body.boxed();
        if let Some(scope) = &aws_scope {
            up_body = aws_sign(&creds, &mut parts, up_body, scope).await?;
        }
        let retry_parts = (self.c.tokens.is_some() && replayable).then(|| {
            let mut r = Request::new(());
            *r.method_mut() = parts.method.clone();
            *r.uri_mut() = parts.uri.clone();
            *r.headers_mut() = parts.headers.clone();
            r
        });
        let req = Request::from_parts(parts, up_body);
        let mut resp = self.send(&to, https, &name, req).await?;
        if resp.status() == StatusCode::UNAUTHORIZED
            && let (Some(tokens), Some(t), Some(r)) = (&self.c.tokens, &token, retry_parts)
        {
            // The token was refused: drop it, take a new one, send the request again once.
            tokens.invalidate(t);
            let (mut parts, ()) = r.into_parts();
            let mut origin = parts.uri.to_string();
            parts.headers.remove(header::AUTHORIZATION);
            self.authenticate(&creds, &mut parts.headers, &mut origin)
                .await?;
            let _ = origin; // query parameters were already added
            let req = Request::from_parts(parts, Empty::new().map_err(|n| match n {}).boxed());
            resp = self.send(&to, https, &name, req).await?;
        }
        strip_hop_by_hop(resp.headers_mut(), upgrade);
        if resp.status() == StatusCode::SWITCHING_PROTOCOLS
            && let Some(client_up) = client_upgrade
        {
            let up = hyper::upgrade::on(&mut resp);
            tokio::spawn(async move {
                if let (Ok(c), Ok(u)) = (client_up.await, up.await) {
                    let _ =
                        tokio::io::copy_bidirectional(&mut TokioIo::new(c), &mut TokioIo::new(u))
                            .await;
                }
            });
        }
        Ok(resp)
    }

    /// Add the service's credentials to a request; returns the OAuth2 token used.
    async fn authenticate(
        &self,
        creds: &Credentials,
        headers: &mut HeaderMap,
        origin: &mut String,
    ) -> Result<Option<Secret>, Failure> {
        let cfg = self.c.cfg();
        let svc = &self.service.name;
        for (name, re) in &cfg.credential_validations {
            let ok = creds
                .get(name)
                .is_some_and(|v| std::str::from_utf8(v.expose()).is_ok_and(|s| re.is_match(s)));
            if !ok {
                return Err((
                    StatusCode::BAD_GATEWAY,
                    format!(
                        "credential \"{name}\" does not match its credentialValidations pattern"
                    ),
                ));
            }
        }
        let token = match &self.c.tokens {
            Some(t) => Some(t.token().await.map_err(|e| {
                tracing::warn!(service = %svc, "OAuth2 token: {e}");
                (
                    StatusCode::BAD_GATEWAY,
                    format!("OAuth2 token unavailable: {e}"),
                )
            })?),
            None => None,
        };
        let tok = token.as_ref();
        let get = move |n: &str| lookup(creds, tok, n);
        let value = |v: &[u8]| {
            HeaderValue::from_bytes(v)
                .map(|mut h| {
                    h.set_sensitive(true);
                    h
                })
                .map_err(|_| {
                    (
                        StatusCode::BAD_GATEWAY,
                        "a rendered header is not a valid header value".to_owned(),
                    )
                })
        };
        match cfg.style {
            // Signed in `forward`, once the request is final.
            Style::Aws => {}
            Style::Basic => {
                let (Some(u), Some(p)) = (get("username"), get("password")) else {
                    return Err((
                        StatusCode::BAD_GATEWAY,
                        "credentials `username` and `password` are required".into(),
                    ));
                };
                headers.insert(header::AUTHORIZATION, value(&inject::basic(u, p))?);
            }
            Style::Generic => {
                for (name, t) in &cfg.headers {
                    let v = t
                        .render(&get)
                        .map_err(|e| (StatusCode::BAD_GATEWAY, format!("header {name}: {e}")))?;
                    headers.insert(name.clone(), value(&v)?);
                }
                if !cfg.query_params.is_empty() {
                    let mut q = zeroize::Zeroizing::new(Vec::new());
                    for (name, t) in &cfg.query_params {
                        let v = t.render(&get).map_err(|e| {
                            (
                                StatusCode::BAD_GATEWAY,
                                format!("query parameter {name}: {e}"),
                            )
                        })?;
                        if !q.is_empty() {
                            q.push(b'&');
                        }
                        inject::encode_component(name.as_bytes(), &mut q);
                        q.push(b'=');
                        inject::encode_component(&v, &mut q);
                    }
                    origin.push(if origin.contains('?') { '&' } else { '?' });
                    origin.push_str(std::str::from_utf8(&q).expect("percent-encoded"));
                }
            }
        }
        Ok(token)
    }

    /// Send on the kept upstream connection (a new one when there is none, it closed, or
    /// this request goes elsewhere).
    async fn send(
        &self,
        to: &HostPort,
        https: bool,
        name: &str,
        req: Request<UpBody>,
    ) -> Result<Response<Incoming>, Failure> {
        let timeout = self.c.cfg().timeout;
        let key = (to.clone(), https);
        let mut slot = self.upstream.lock().await;
        let reuse = match slot.as_mut() {
            Some(u) if u.key == key && !u.sender.is_closed() => {
                tokio::time::timeout(timeout, u.sender.ready())
                    .await
                    .is_ok_and(|r| r.is_ok())
            }
            _ => false,
        };
        if !reuse {
            *slot = None;
            let sender = self
                .connect(to, https, name)
                .await
                .map_err(|e| (StatusCode::BAD_GATEWAY, e.to_string()))?;
            *slot = Some(Upstream { key, sender });
        }
        let u = slot.as_mut().expect("set above");
        match tokio::time::timeout(timeout, u.sender.send_request(req)).await {
            Ok(Ok(r)) => Ok(r),
            Ok(Err(e)) => {
                *slot = None;
                Err((StatusCode::BAD_GATEWAY, format!("upstream {to}: {e}")))
            }
            Err(_) => {
                *slot = None;
                Err((
                    StatusCode::GATEWAY_TIMEOUT,
                    format!(
                        "upstream {to} did not answer within {} s",
                        timeout.as_secs()
                    ),
                ))
            }
        }
    }

    async fn connect(
        &self,
        to: &HostPort,
        https: bool,
        name: &str,
    ) -> Result<hyper::client::conn::http1::SendRequest<UpBody>, ConnError> {
        *self.upstream_addr.lock().expect("lock") = Some(to.to_string());
        let tcp = self.env.dialer.dial(to).await?;
        let io: Box<dyn AsyncStream> = if https {
            let server_name = rustls::pki_types::ServerName::try_from(name.to_owned())
                .map_err(|_| ConnError::Config(format!("invalid TLS server name `{name}`")))?;
            let s = tokio_rustls::TlsConnector::from(Arc::clone(&self.c.upstream_tls))
                .connect(server_name, tcp)
                .await
                .map_err(|e| ConnError::Tls {
                    addr: to.to_string(),
                    reason: e.to_string(),
                })?;
            Box::new(s)
        } else {
            Box::new(tcp)
        };
        let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(io))
            .await
            .map_err(|e| ConnError::Protocol(format!("upstream {to}: {e}")))?;
        tokio::spawn(async move {
            let _ = conn.with_upgrades().await;
        });
        Ok(sender)
    }
}

/// A template's value: `access_token` is the OAuth2 token when the service has one.
fn lookup<'c>(creds: &'c Credentials, token: Option<&'c Secret>, n: &str) -> Option<&'c [u8]> {
    match token {
        Some(t) if n == "access_token" => Some(t.expose()),
        _ => creds.get(n).map(Secret::expose),
    }
}

/// An error answer: status and a short message (never a secret).
type Failure = (StatusCode, String);

/// The largest body the `aws` connector buffers to sign it (a request that declares no
/// `X-Amz-Content-Sha256`, to a service other than S3); larger: 413.
pub const AWS_MAX_BODY: usize = 10 * 1024 * 1024;

/// Re-sign an `aws` request with the brokered keys (`parts` final but for the signature).
/// The payload: the app's declared `X-Amz-Content-Sha256`, else `UNSIGNED-PAYLOAD` for
/// S3, else the body's own hash, buffered up to [`AWS_MAX_BODY`].
async fn aws_sign(
    creds: &Credentials,
    parts: &mut http::request::Parts,
    body: UpBody,
    scope: &sigv4::Scope,
) -> Result<UpBody, Failure> {
    let missing = |n: &str| {
        (
            StatusCode::BAD_GATEWAY,
            format!("credential `{n}` is missing"),
        )
    };
    let keys = sigv4::AwsKeys {
        access_key_id: creds
            .get("accessKeyId")
            .and_then(|v| std::str::from_utf8(v.expose()).ok())
            .ok_or_else(|| missing("accessKeyId"))?
            .trim()
            .to_owned(),
        secret_access_key: creds
            .get("secretAccessKey")
            .cloned()
            .ok_or_else(|| missing("secretAccessKey"))?,
        session_token: creds.get("accessToken").cloned(),
    };
    let sign_err = |e: sigv4::SigV4Error| {
        let status = match e {
            sigv4::SigV4Error::InvalidAccessKeyId
            | sigv4::SigV4Error::EmptySecretKey
            | sigv4::SigV4Error::InvalidSessionToken => StatusCode::BAD_GATEWAY,
            _ => StatusCode::BAD_REQUEST,
        };
        (status, format!("cannot re-sign the AWS request: {e}"))
    };
    let now = std::time::SystemTime::now();
    let declared = sigv4::declared_payload(&parts.headers).map_err(sign_err)?;
    let is_s3 = matches!(scope.service.as_str(), "s3" | "s3-object-lambda");
    match declared {
        Some(p) => {
            sigv4::sign(parts, p, &keys, scope, now).map_err(sign_err)?;
            Ok(body)
        }
        None if is_s3 => {
            sigv4::sign(parts, sigv4::Payload::Unsigned, &keys, scope, now).map_err(sign_err)?;
            Ok(body)
        }
        None => {
            let too_large = || {
                (
                    StatusCode::PAYLOAD_TOO_LARGE,
                    format!(
                        "the body is larger than {AWS_MAX_BODY} bytes: an AWS request body is \
                         buffered to be signed unless the app sends X-Amz-Content-Sha256"
                    ),
                )
            };
            if body.size_hint().lower() > AWS_MAX_BODY as u64 {
                return Err(too_large());
            }
            let bytes = http_body_util::Limited::new(body, AWS_MAX_BODY)
                .collect()
                .await
                .map_err(|e| {
                    if e.is::<http_body_util::LengthLimitError>() {
                        too_large()
                    } else {
                        (
                            StatusCode::BAD_REQUEST,
                            "reading the request body failed".to_owned(),
                        )
                    }
                })?
                .to_bytes();
            sigv4::sign(parts, sigv4::Payload::Bytes(&bytes), &keys, scope, now)
                .map_err(sign_err)?;
            Ok(Full::new(bytes).map_err(|n| match n {}).boxed())
        }
    }
}

fn is_upgrade(h: &HeaderMap) -> bool {
    h.contains_key(header::UPGRADE)
        && h.get_all(header::CONNECTION).iter().any(|v| {
            v.to_str().is_ok_and(|s| {
                s.split(',')
                    .any(|t| t.trim().eq_ignore_ascii_case("upgrade"))
            })
        })
}

/// Remove the hop-by-hop headers (RFC 9110 7.6.1), keeping an upgrade's
/// `Connection: upgrade` and `Upgrade`. Framing (`Content-Length`,
/// `Transfer-Encoding`) stays: hyper frames each leg from it.
fn strip_hop_by_hop(h: &mut HeaderMap, upgrade: bool) {
    let listed: Vec<String> = h
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|s| s.split(','))
        .map(|t| t.trim().to_ascii_lowercase())
        .filter(|t| !t.is_empty() && t != "upgrade" && t != "transfer-encoding")
        .collect();
    for name in listed {
        h.remove(name.as_str());
    }
    for name in [
        "keep-alive",
        "proxy-connection",
        "proxy-authorization",
        "te",
        "trailer",
    ] {
        h.remove(name);
    }
    if upgrade {
        h.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
    } else {
        h.remove(header::CONNECTION);
        h.remove(header::UPGRADE);
    }
}

/// One request's access line, written when its response body is done (or dropped).
struct RequestLog {
    service: Arc<Service>,
    caller: Option<Caller>,
    method: String,
    authority: String,
    path: String,
    status: u16,
    bytes: u64,
    started: Instant,
    error: Option<String>,
}

impl Drop for RequestLog {
    fn drop(&mut self) {
        let c = self.caller.as_ref();
        tracing::info!(
            target: "access",
            service = %self.service.name,
            connector = self.service.connector.name(),
            http.method = %self.method,
            http.authority = %self.authority,
            http.path = %self.path,
            http.status = self.status,
            bytes.down = self.bytes,
            error = self.error.as_deref(),
            caller.pid = c.map(|c| c.pid),
            caller.uid = c.map(|c| c.uid),
            caller.gid = c.map(|c| c.gid),
            caller.cgroup = c.map(|c| c.cgroup_id),
            caller.comm = c.map(|c| c.comm.as_str()),
            duration_ms = self.started.elapsed().as_millis() as u64,
            "request"
        );
    }
}

/// A response body, counted; the request's access line goes when it ends.
pub struct LoggedBody {
    inner: UpBody,
    log: Option<RequestLog>,
}

impl Body for LoggedBody {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        let r = Pin::new(&mut self.inner).poll_frame(cx);
        match &r {
            Poll::Ready(Some(Ok(f))) => {
                if let (Some(d), Some(l)) = (f.data_ref(), self.log.as_mut()) {
                    l.bytes += d.len() as u64;
                }
            }
            Poll::Ready(None) => {
                self.log.take();
            }
            _ => {}
        }
        r
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// The client leg, counting bytes each way for the connection line.
struct Counting<IO> {
    io: IO,
    read: Arc<AtomicU64>,
    written: Arc<AtomicU64>,
}

impl<IO: AsyncRead + Unpin> AsyncRead for Counting<IO> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let r = Pin::new(&mut self.io).poll_read(cx, buf);
        let n = buf.filled().len() - before;
        self.read.fetch_add(n as u64, Ordering::Relaxed);
        r
    }
}

impl<IO: AsyncWrite + Unpin> AsyncWrite for Counting<IO> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        b: &[u8],
    ) -> Poll<io::Result<usize>> {
        let r = Pin::new(&mut self.io).poll_write(cx, b);
        if let Poll::Ready(Ok(n)) = &r {
            self.written.fetch_add(*n as u64, Ordering::Relaxed);
        }
        r
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}
