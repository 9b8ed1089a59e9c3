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
use http::{HeaderMap, HeaderValue, Method, Request, Response, StatusCode, Uri, header};
use http_body_util::{BodyExt as _, Empty, Full, combinators::BoxBody};
use hyper::body::{Body, Frame, Incoming, SizeHint};
use hyper_util::rt::TokioIo;
use tokio::{
    io::{AsyncRead, AsyncWrite, ReadBuf},
    net::TcpStream,
};

use super::{
    config::{HttpSettings, Style},
    inject, oauth1, sigv4, sni,
    tokens::Tokens,
};
use crate::{
    config::{InterceptTarget, ListenAddr, Service},
    connector::{
        AppSocket, AsyncStream, BoxFuture, Caller, Conn, ConnError, ConnStats, Connector,
        Credentials, Denial, Env, Handoff, Requester, Session, UpstreamStream, close_gracefully,
        dial::HostPort,
        target::{self, AppDestination, Destinations, Fallbacks},
    },
    secret::Secret,
    tls::{self, TlsOptions, Verify},
};

/// How long a client may take to send the first bytes (or its whole ClientHello).
const FIRST_BYTES: Duration = Duration::from_secs(30);

/// How long a connection reuses the credentials it fetched for its requests.
const CREDS_REUSE: Duration = Duration::from_secs(1);

/// How long a client may take to send a request head once it started it.
const HEAD_TIMEOUT: Duration = Duration::from_secs(30);

type UpBody = BoxBody<Bytes, hyper::Error>;

/// One service's part of an HTTP connector: its settings, upstream TLS and tokens.
struct Route {
    service: Arc<Service>,
    upstream_tls: Arc<rustls::ClientConfig>,
    tokens: Option<Tokens>,
    /// `authenticateURLsMatching` as lazy DFAs, to ask whether a URL prefix can still
    /// lead to a match ([`Route::may_take_origin`]).
    prefix_dfas: Vec<regex_automata::hybrid::dfa::DFA>,
}

impl Route {
    fn new(service: &Arc<Service>) -> anyhow::Result<Self> {
        let cfg = crate::connector::settings::<HttpSettings>(service)?;
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
        let prefix_dfas = cfg
            .url_patterns
            .iter()
            .filter_map(|r| regex_automata::hybrid::dfa::DFA::new(r.as_str()).ok())
            .collect();
        Ok(Self {
            service: Arc::clone(service),
            upstream_tls: upstream_tls(cfg.ca_file.as_deref())?,
            tokens,
            prefix_dfas,
        })
    }

    /// Whether this service may authenticate requests to `origin` (`https://host[:port]/`,
    /// a `CONNECT` tunnel's): a pattern matches the origin itself, or can match a URL
    /// that begins with it, read from the URL's start (`^https://api\.example\.com/v1/`).
    /// A pattern that only names paths (`/v1/`, unanchored) does not make every tunnel
    /// decrypted.
    fn may_take_origin(&self, origin: &str) -> bool {
        if self.takes(origin) {
            return true;
        }
        self.prefix_dfas
            .iter()
            .any(|dfa| prefix_viable(dfa, origin))
    }

    fn cfg(&self) -> &HttpSettings {
        self.service
            .connector
            .settings::<HttpSettings>()
            .expect("built from these settings")
    }

    /// Whether this service authenticates a request for `url` (no
    /// `authenticateURLsMatching`: every request).
    fn takes(&self, url: &str) -> bool {
        let p = &self.cfg().url_patterns;
        p.is_empty() || p.iter().any(|r| r.is_match(url))
    }
}

/// What services sharing one `listenOn` address need, checked without building
/// anything (`broker check`): each sets `authenticateURLsMatching`, none sets `upstream`.
///
/// # Errors
/// The first service that cannot share, naming its key.
pub fn check_shared(services: &[Arc<Service>]) -> anyhow::Result<()> {
    for s in services {
        let cfg = crate::connector::settings::<HttpSettings>(s)?;
        if cfg.url_patterns.is_empty() {
            anyhow::bail!(
                "services.{}.config.authenticateURLsMatching: required when services share a \
                 listenOn address (it routes each request to its service)",
                s.name
            );
        }
        if cfg.upstream.is_some() {
            anyhow::bail!(
                "services.{}.config.upstream: a reverse proxy needs a listenOn address of its \
                 own; services sharing one are forward proxies (http_proxy)",
                s.name
            );
        }
    }
    Ok(())
}

/// Whether some string that begins with `prefix` matches `dfa` from its start.
fn prefix_viable(dfa: &regex_automata::hybrid::dfa::DFA, prefix: &str) -> bool {
    use regex_automata::{Anchored, Input};
    let mut cache = dfa.create_cache();
    let input = Input::new(prefix).anchored(Anchored::Yes);
    let Ok(mut sid) = dfa.start_state_forward(&mut cache, &input) else {
        return false;
    };
    for &b in prefix.as_bytes() {
        match dfa.next_state(&mut cache, sid, b) {
            // A match ended within the prefix: every URL that begins with it matches.
            Ok(next) if next.is_match() => return true,
            Ok(next) if next.is_dead() => return false,
            Ok(next) => sid = next,
            // The cache gave up (a huge pattern): say yes, decrypting is the safe side
            // for a service that may need its credentials.
            Err(_) => return true,
        }
    }
    true
}

/// Verified TLS to upstreams: the system roots and `ca_file`, ALPN `http/1.1`.
fn upstream_tls(ca_file: Option<&std::path::Path>) -> anyhow::Result<Arc<rustls::ClientConfig>> {
    let mut tls = (*tls::client_config(TlsOptions {
        verify: Verify::Full,
        ca_file,
        with_system_roots: true,
        client_cert: None,
    })?)
    .clone();
    tls.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Arc::new(tls))
}

impl std::fmt::Debug for Route {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Route")
            .field("service", &self.service.name)
            .finish_non_exhaustive()
    }
}

/// An HTTP service, or the HTTP services sharing one `listenOn` address (Secretless'
/// forward proxy: each request goes to the first service whose
/// `authenticateURLsMatching` matches its URL; one no service takes is forwarded
/// without credentials).
#[derive(Debug)]
pub struct HttpConnector {
    routes: Vec<Route>,
    shared: bool,
    /// The `intercept:` hostnames (lowercase): the TLS server names terminated.
    names: Vec<String>,
    /// Upstream TLS for the requests of a shared listener that no service takes.
    plain_tls: Arc<rustls::ClientConfig>,
    /// Idle upstream connections shared by client connections that close after one
    /// request (`Connection: close`).
    pool: UpstreamPool,
}

/// Which upstream connections are interchangeable: the address, TLS and the name its
/// certificate was verified for, and the route (its TLS trust).
type PoolKey = (HostPort, Option<String>, usize);

/// Upstream connections kept for client connections that send one request each and
/// close (`Connection: close`): without them each such request would cost a TCP (and
/// TLS) handshake upstream and a close. A connection goes back to its key's list as
/// soon as its response head arrived and is taken again only once hyper reports it
/// ready (its response read to the end). Bounded: [`POOL_PER_KEY`] idle connections
/// per key, [`POOL_KEYS`] keys, [`POOL_IDLE`] of idleness; only authenticated routes'
/// connections are kept (their destinations come from the configuration or the
/// intercepted address, not from arbitrary forward-proxy URLs).
#[derive(Debug, Default)]
struct UpstreamPool {
    idle: Mutex<std::collections::HashMap<PoolKey, Vec<Pooled>>>,
}

#[derive(Debug)]
struct Pooled {
    sender: hyper::client::conn::http1::SendRequest<UpBody>,
    since: Instant,
}

/// Idle pooled connections kept per key.
const POOL_PER_KEY: usize = 64;
/// Keys (destinations) kept at once.
const POOL_KEYS: usize = 256;
/// How long a pooled connection may stay idle.
const POOL_IDLE: Duration = Duration::from_secs(30);

impl UpstreamPool {
    /// A ready connection for `key`, if one is idle (the most recently returned first).
    /// Closed and stale ones are dropped; busy ones (a response still being read) stay.
    fn take(&self, key: &PoolKey) -> Option<hyper::client::conn::http1::SendRequest<UpBody>> {
        let mut idle = self.idle.lock().expect("lock");
        let list = idle.get_mut(key)?;
        list.retain(Pooled::usable);
        let i = list.iter().rposition(|p| p.sender.is_ready())?;
        Some(list.swap_remove(i).sender)
    }

    /// Keep `sender` for `key` (while there is room).
    fn give(&self, key: PoolKey, sender: hyper::client::conn::http1::SendRequest<UpBody>) {
        let mut idle = self.idle.lock().expect("lock");
        if !idle.contains_key(&key) && idle.len() >= POOL_KEYS {
            idle.retain(|_, l| {
                l.retain(Pooled::usable);
                !l.is_empty()
            });
            if idle.len() >= POOL_KEYS {
                return;
            }
        }
        let list = idle.entry(key).or_default();
        if list.len() < POOL_PER_KEY {
            list.push(Pooled {
                sender,
                since: Instant::now(),
            });
        }
    }
}

impl Pooled {
    fn usable(&self) -> bool {
        !self.sender.is_closed() && self.since.elapsed() <= POOL_IDLE
    }
}

impl HttpConnector {
    /// # Errors
    /// An unreadable CA file; an OAuth2 configuration that cannot be used.
    pub fn new(service: &Service) -> anyhow::Result<Self> {
        let route = Route::new(&Arc::new(service.clone()))?;
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
            plain_tls: Arc::clone(&route.upstream_tls),
            routes: vec![route],
            shared: false,
            names,
            pool: UpstreamPool::default(),
        })
    }

    /// The connector of services sharing one `listenOn` address.
    ///
    /// # Errors
    /// A service without `authenticateURLsMatching` (nothing would route to it, or
    /// everything would), or with a reverse-proxy `upstream`; one that cannot be built.
    pub fn shared(services: &[Arc<Service>]) -> anyhow::Result<Self> {
        check_shared(services)?;
        Ok(Self {
            routes: services
                .iter()
                .map(Route::new)
                .collect::<anyhow::Result<_>>()?,
            shared: true,
            names: Vec::new(),
            plain_tls: upstream_tls(None)?,
            pool: UpstreamPool::default(),
        })
    }

    /// The service that authenticates a request for `url`, if any.
    fn route(&self, url: &str) -> Option<&Route> {
        self.routes.iter().find(|r| r.takes(url))
    }

    /// The single service (not shared) and its settings.
    fn single(&self) -> Option<&Route> {
        (!self.shared).then(|| &self.routes[0])
    }
}

impl Connector for HttpConnector {
    fn serve<'a>(
        &'a self,
        env: &'a Env,
        conn: &'a mut Conn,
        client: AppSocket,
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

    /// One request read, answered `403` with a JSON body naming the rule; TLS gets an
    /// `access_denied` alert ([`super::deny`]).
    fn deny<'a>(&'a self, client: AppSocket, denial: &'a Denial) -> BoxFuture<'a, ()> {
        Box::pin(super::deny::deny(client, denial))
    }

    fn observe(&self, metrics: &Arc<crate::metrics::Metrics>) {
        for r in &self.routes {
            if let Some(t) = &r.tokens {
                t.observe(metrics, &r.service.name);
            }
        }
    }

    fn uses_ca(&self) -> bool {
        // Any intercepted port may carry TLS for an intercepted name.
        let s = &self.routes[0].service;
        !s.intercept.is_empty() || matches!(s.listen_on, Some(ListenAddr::Tcp(_)))
    }

    /// On `listenOn` only, the CA decrypts `CONNECT` tunnels and TLS sent to the proxy
    /// itself; without it tunnels are relayed blind (Secretless never decrypts them) and
    /// TLS to the proxy is refused. Intercepted names need it.
    fn ca_optional(&self) -> bool {
        self.routes.iter().all(|r| r.service.intercept.is_empty())
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
        client: AppSocket,
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
        client: AppSocket,
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
async fn first_bytes(client: &AppSocket) -> Result<Option<Option<String>>, ConnError> {
    let deadline = tokio::time::Instant::now() + FIRST_BYTES;
    // One byte tells plain HTTP from TLS: no ClientHello buffer (and no copy of the
    // request head) for a plain connection.
    let mut first = [0u8; 1];
    peek_by(client, deadline, &mut first).await?;
    if first[0] != 0x16 {
        return Ok(None);
    }
    let mut buf = vec![0u8; sni::MAX_HELLO];
    let mut last = 0;
    loop {
        let n = peek_by(client, deadline, &mut buf).await?;
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

/// Peek at the client's first bytes into `buf` by `deadline`: how many (at least one).
async fn peek_by(
    client: &AppSocket,
    deadline: tokio::time::Instant,
    buf: &mut [u8],
) -> Result<usize, ConnError> {
    let n = tokio::time::timeout_at(deadline, client.peek(buf))
        .await
        .map_err(|_| ConnError::ClientGone("sent nothing within 30 s".into()))??;
    if n == 0 {
        return Err(ConnError::ClientGone("closed before a request".into()));
    }
    Ok(n)
}

/// The upstream connection kept for a client connection: where it goes, with TLS or
/// not, and for which service (its TLS trust).
struct Upstream {
    key: (HostPort, bool, Option<usize>),
    sender: hyper::client::conn::http1::SendRequest<UpBody>,
    /// The response deadline, moved on for each request: pushing a registered timer
    /// later is an atomic store, where a timer per request is a registration and a
    /// removal in the runtime's timer wheel.
    deadline: Pin<Box<tokio::time::Sleep>>,
}

/// Where one request goes.
struct Dest {
    to: HostPort,
    https: bool,
    /// The name the upstream's certificate must carry.
    name: String,
    /// The `Host` header to send (`None`: the client's).
    host: Option<String>,
    /// `host` as a header value, made once (`None` too when `host` is not a valid one).
    host_value: Option<HeaderValue>,
}

impl Dest {
    fn new(to: HostPort, https: bool, name: String, host: Option<String>) -> Self {
        let host_value = host.as_deref().and_then(|h| HeaderValue::from_str(h).ok());
        Self {
            to,
            https,
            name,
            host,
            host_value,
        }
    }
}

/// A `CONNECT` tunnel (forward-proxy `listenOn` only), opened once its 200 is sent.
enum Tunnel {
    /// Relayed byte for byte to this upstream: no service takes its URLs.
    Blind(TcpStream),
    /// Terminated with a local-CA certificate for the host, its requests served like
    /// any others (`https://{authority}{path}` routed and authenticated).
    Decrypt(TunnelTarget),
}

/// The origin a decrypted `CONNECT` tunnel's requests go to.
#[derive(Clone)]
struct TunnelTarget {
    to: HostPort,
    /// `host` or `host:port` (not 443): the authority of the requests' URLs.
    authority: String,
}

/// An upstream connection's future (hyper's `Connection`), driven by the client
/// connection's task.
type Driver = Pin<Box<dyn Future<Output = ()> + Send>>;

/// Upstream connections handed to the client connection's task, and that task's waker
/// (a hand-over wakes it). A lock taken once per poll, uncontended (both sides run in
/// that task): cheaper than a channel's receive future per poll.
#[derive(Default)]
struct Drivers {
    new: Mutex<(Vec<Driver>, Option<std::task::Waker>)>,
}

impl Drivers {
    fn push(&self, d: Driver) {
        let mut g = self.new.lock().expect("lock");
        g.0.push(d);
        if let Some(w) = g.1.take() {
            w.wake();
        }
    }
}

/// Drive the upstream connections handed over, until the client connection ends
/// (never returns by itself).
async fn drive(drivers: &Drivers) {
    use futures_util::StreamExt as _;
    let mut set = futures_util::stream::FuturesUnordered::new();
    std::future::poll_fn(|cx| {
        {
            let mut g = drivers.new.lock().expect("lock");
            set.extend(g.0.drain(..));
            if !g.1.as_ref().is_some_and(|w| w.will_wake(cx.waker())) {
                g.1 = Some(cx.waker().clone());
            }
        }
        while let Poll::Ready(Some(())) = set.poll_next_unpin(cx) {}
        Poll::<()>::Pending
    })
    .await;
}

/// What one client connection's requests share.
struct Handler<'a> {
    c: &'a HttpConnector,
    env: &'a Env,
    /// The listener's service (for a shared listener: named after its members), named
    /// by the lines of requests no service takes.
    service: Arc<Service>,
    caller: Option<Arc<Caller>>,
    orig_dst: Option<std::net::SocketAddr>,
    orig_host: Option<String>,
    listener_port: Option<u16>,
    client_tls: bool,
    /// The server name the client sent (TLS terminated here).
    sni: Option<String>,
    /// Inside a decrypted `CONNECT` tunnel: its origin.
    tunnel: Option<TunnelTarget>,
    upstream: tokio::sync::Mutex<Option<Upstream>>,
    /// Credentials fetched by this connection, per service (keyed by its address), and
    /// when.
    creds: Mutex<Vec<(usize, Instant, Arc<Credentials>)>>,
    /// A single service's destination, for the credentials it was worked out with.
    dest_cache: Mutex<Option<(Arc<Credentials>, Arc<Dest>)>>,
    /// The headers last rendered, for the route and credentials they were rendered
    /// from (a keep-alive connection's requests do not each render the templates).
    rendered: Mutex<Option<Rendered>>,
    /// Upstream connections are driven in the client connection's own task (no
    /// cross-task wake-up per request): `open_upstream` hands them to `serve_io`.
    drivers: Drivers,
    /// A `CONNECT` answered with 200: the tunnel to open once hyper hands the
    /// connection over.
    pending: Mutex<Option<(hyper::upgrade::OnUpgrade, Tunnel)>>,
    /// For the connection line: the last upstream, the credential fetches, the bytes
    /// (shared with a tunnel's inner handler).
    upstream_addr: Arc<Mutex<Option<String>>>,
    fetched: Arc<Mutex<Vec<String>>>,
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
            caller: conn.caller.clone().map(Arc::new),
            orig_dst: conn.orig_dst,
            orig_host: conn.orig_host.clone(),
            listener_port: match &conn.service.listen_on {
                Some(ListenAddr::Tcp(a)) => Some(a.port()),
                _ => None,
            },
            client_tls,
            sni,
            tunnel: None,
            upstream: tokio::sync::Mutex::new(None),
            creds: Mutex::default(),
            dest_cache: Mutex::default(),
            rendered: Mutex::default(),
            drivers: Drivers::default(),
            pending: Mutex::new(None),
            upstream_addr: Arc::default(),
            fetched: Arc::default(),
            bytes_up: Arc::default(),
            bytes_down: Arc::default(),
        }
    }

    /// The handler of a decrypted tunnel's requests: the same connection, its own
    /// upstream.
    fn inner(&self, t: TunnelTarget) -> Self {
        let host = t.to.host.clone();
        Self {
            c: self.c,
            env: self.env,
            service: Arc::clone(&self.service),
            caller: self.caller.clone(),
            orig_dst: self.orig_dst,
            orig_host: self.orig_host.clone(),
            listener_port: self.listener_port,
            client_tls: true,
            sni: Some(host),
            tunnel: Some(t),
            upstream: tokio::sync::Mutex::new(None),
            creds: Mutex::default(),
            dest_cache: Mutex::default(),
            rendered: Mutex::default(),
            drivers: Drivers::default(),
            pending: Mutex::new(None),
            upstream_addr: Arc::clone(&self.upstream_addr),
            fetched: Arc::clone(&self.fetched),
            bytes_up: Arc::clone(&self.bytes_up),
            bytes_down: Arc::clone(&self.bytes_down),
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
        self.serve_io(io).await;
        conn.stats.upstream = self.upstream_addr.lock().expect("lock").take();
        conn.stats.fetched = std::mem::take(&mut *self.fetched.lock().expect("lock"));
        conn.stats.bytes_up = self.bytes_up.load(Ordering::Relaxed);
        conn.stats.bytes_down = self.bytes_down.load(Ordering::Relaxed);
        Handoff::Done
    }

    /// hyper's HTTP/1.1 server on `io`, then the `CONNECT` tunnel it ended with, if any.
    async fn serve_io<IO>(&self, io: IO)
    where
        IO: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let svc = hyper::service::service_fn(move |req| async move {
            Ok::<_, Infallible>(self.handle(req).await)
        });
        let server = hyper::server::conn::http1::Builder::new()
            .timer(hyper_util::rt::TokioTimer::new())
            // A client sending its request head byte by byte does not hold a task
            // forever (slowloris): the whole head within this, from its first byte.
            .header_read_timeout(HEAD_TIMEOUT)
            .keep_alive(true)
            .serve_connection(TokioIo::new(io), svc)
            .with_upgrades();
        // Biased: the server first (no random pick per poll); `drive` is polled on
        // every wake-up all the same.
        let r = tokio::select! {
            biased;
            r = server => r,
            () = drive(&self.drivers) => unreachable!("drive never returns"),
        };
        if let Err(e) = r {
            tracing::debug!(service = %self.service.name, "HTTP client connection: {e}");
        }
        let pending = self.pending.lock().expect("lock").take();
        if let Some((on_upgrade, tunnel)) = pending {
            Box::pin(self.open_tunnel(on_upgrade, tunnel)).await;
        }
    }

    /// The tunnel of an answered `CONNECT`: relayed blind, or decrypted and served.
    async fn open_tunnel(&self, on_upgrade: hyper::upgrade::OnUpgrade, tunnel: Tunnel) {
        let Ok(Ok(client)) = tokio::time::timeout(FIRST_BYTES, on_upgrade).await else {
            return;
        };
        let mut client = TokioIo::new(client);
        match tunnel {
            Tunnel::Blind(mut up) => {
                let _ = tokio::io::copy_bidirectional(&mut client, &mut up).await;
            }
            Tunnel::Decrypt(t) => {
                let Some(ca) = self.env.ca.as_ref() else {
                    return;
                };
                let host = t.to.host.clone();
                let config = match ca.leaf(&host).and_then(|l| l.server_config(&[b"http/1.1"])) {
                    Ok(c) => c,
                    Err(e) => {
                        tracing::warn!(service = %self.service.name, "CONNECT {host}: no certificate: {e:#}");
                        return;
                    }
                };
                let accept = tokio_rustls::TlsAcceptor::from(config).accept(client);
                match tokio::time::timeout(FIRST_BYTES, accept).await {
                    Ok(Ok(stream)) => self.inner(t).serve_io(stream).await,
                    Ok(Err(e)) => tracing::debug!(
                        service = %self.service.name,
                        "CONNECT {host}: client TLS handshake failed: {e}"
                    ),
                    Err(_) => tracing::debug!(
                        service = %self.service.name,
                        "CONNECT {host}: client TLS handshake timed out"
                    ),
                }
            }
        }
    }

    async fn handle(&self, req: Request<Incoming>) -> Response<LoggedBody> {
        let started = Instant::now();
        // Cheap clones (shared bytes), formatted only if the line is written.
        let authority = req.headers().get(header::HOST).cloned().or_else(|| {
            req.uri()
                .authority()
                .and_then(|a| HeaderValue::from_str(a.as_str()).ok())
        });
        let mut log = RequestLog {
            service: Arc::clone(&self.service),
            caller: self.caller.clone(),
            method: req.method().clone(),
            authority,
            uri: req.uri().clone(),
            authenticated: false,
            status: 0,
            bytes: 0,
            started,
            error: None,
        };
        let r = if req.method() == Method::CONNECT {
            self.connect(req).await
        } else {
            self.forward(req, &mut log).await
        };
        match r {
            Ok(resp) => {
                log.status = resp.status().as_u16();
                resp.map(|b| LoggedBody {
                    inner: b,
                    log: Some(log),
                })
            }
            Err((status, msg)) => {
                log.status = status.as_u16();
                log.error = Some(msg.clone());
                let body = serde_json::json!({"error": msg, "service": log.service.name});
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

    /// `CONNECT host:port` on a forward-proxy listener: 200, then the tunnel (decrypted
    /// when a service takes `https://{authority}/`, else relayed blind).
    async fn connect(&self, mut req: Request<Incoming>) -> Result<Response<UpBody>, Failure> {
        let reverse = self.c.single().is_some_and(|r| r.cfg().upstream.is_some());
        if self.orig_dst.is_some() || self.tunnel.is_some() || reverse {
            return Err((
                StatusCode::METHOD_NOT_ALLOWED,
                "CONNECT is served only by a forward-proxy listenOn (http_proxy, https_proxy)"
                    .into(),
            ));
        }
        let bad = || {
            (
                StatusCode::BAD_REQUEST,
                "CONNECT needs host:port".to_owned(),
            )
        };
        let auth = req.uri().authority().ok_or_else(bad)?.clone();
        let port = auth.port_u16().ok_or_else(bad)?;
        let host = auth.host().trim_start_matches('[').trim_end_matches(']');
        if host.is_empty() {
            return Err(bad());
        }
        let url_host = if host.contains(':') {
            format!("[{host}]")
        } else {
            host.to_ascii_lowercase()
        };
        let authority = if port == 443 {
            url_host
        } else {
            format!("{url_host}:{port}")
        };
        let to = HostPort::new(host.to_ascii_lowercase(), port);
        let origin = format!("https://{authority}/");
        let decrypt =
            self.env.ca.is_some() && self.c.routes.iter().any(|r| r.may_take_origin(&origin));
        let tunnel = if decrypt {
            Tunnel::Decrypt(TunnelTarget { to, authority })
        } else {
            // Dialled now, so that a failure is an answer the client reads.
            *self.upstream_addr.lock().expect("lock") = Some(to.to_string());
            let up = self
                .env
                .dialer
                .dial(&to)
                .await
                .map_err(|e| (StatusCode::BAD_GATEWAY, e.to_string()))?;
            Tunnel::Blind(up)
        };
        let on_upgrade = hyper::upgrade::on(&mut req);
        *self.pending.lock().expect("lock") = Some((on_upgrade, tunnel));
        Ok(Response::new(
            Empty::new().map_err(|never| match never {}).boxed(),
        ))
    }

    /// Where a request goes and which service (if any) authenticates it, with that
    /// service's credentials.
    async fn destination(
        &self,
        uri: &Uri,
    ) -> Result<(Option<&'a Route>, Arc<Credentials>, Arc<Dest>), Failure> {
        let bad = |e: ConnError| (StatusCode::BAD_GATEWAY, e.to_string());
        let pq = uri.path_and_query().map_or("/", |p| p.as_str());
        let (url, dest) = if let Some(t) = &self.tunnel {
            let dest = Dest::new(t.to.clone(), true, t.to.host.clone(), None);
            (format!("https://{}{pq}", t.authority), dest)
        } else if let Some(r) = self.c.single() {
            // One service: its upstream, the absolute URI of a forward-proxy request,
            // or the app's destination (which the `host` credentials may override).
            let creds = self.credentials(&r.service).await.map_err(bad)?;
            let dest = self.single_dest(r, &creds, uri).map_err(bad)?;
            if r.cfg().url_patterns.is_empty() {
                // Every request is authenticated: no URL to match.
                return Ok((Some(r), creds, dest));
            }
            let scheme = if dest.https || self.client_tls {
                "https"
            } else {
                "http"
            };
            let authority = dest.host.clone().unwrap_or_else(|| {
                uri.authority()
                    .map(ToString::to_string)
                    .unwrap_or_else(|| dest.to.to_string())
            });
            let url = format!("{scheme}://{authority}{pq}");
            let route = r.takes(&url).then_some(r);
            return Ok((route, creds, dest));
        } else {
            let (Some(scheme), Some(auth)) = (uri.scheme_str(), uri.authority()) else {
                return Err((
                    StatusCode::BAD_REQUEST,
                    "this listenOn address is a forward proxy (set http_proxy to it): a \
                     request must name its absolute URL"
                        .into(),
                ));
            };
            let dest = absolute_dest(auth, scheme == "https");
            (format!("{scheme}://{auth}{pq}"), dest)
        };
        let Some(route) = self.c.route(&url) else {
            return Ok((None, Arc::default(), Arc::new(dest)));
        };
        let creds = self.credentials(&route.service).await.map_err(bad)?;
        let mut dest = dest;
        if route.cfg().force_ssl && !dest.https {
            dest.https = true;
            if dest.to.port == 80 {
                dest.to.port = 443;
            }
        }
        Ok((Some(route), creds, Arc::new(dest)))
    }

    /// Where a single service's request goes: worked out once per credentials (the
    /// same `Arc`, so the same `host`/`port`) unless it depends on the request (the
    /// absolute URI of a forward-proxy request).
    fn single_dest(
        &self,
        r: &Route,
        creds: &Arc<Credentials>,
        uri: &Uri,
    ) -> Result<Arc<Dest>, ConnError> {
        let per_request = r.cfg().upstream.is_none()
            && self.orig_dst.is_none()
            && uri.scheme().is_some()
            && uri.authority().is_some();
        if per_request {
            return self.single_target(r, creds, uri).map(Arc::new);
        }
        let mut cache = self.dest_cache.lock().expect("lock");
        if let Some((c, d)) = cache.as_ref()
            && Arc::ptr_eq(c, creds)
        {
            return Ok(Arc::clone(d));
        }
        let d = Arc::new(self.single_target(r, creds, uri)?);
        *cache = Some((Arc::clone(creds), Arc::clone(&d)));
        Ok(d)
    }

    /// Where a single service's request goes.
    fn single_target(&self, r: &Route, creds: &Credentials, uri: &Uri) -> Result<Dest, ConnError> {
        let cfg = r.cfg();
        if let Some(u) = &cfg.upstream {
            return Ok(Dest::new(
                HostPort::new(u.host.clone(), u.port),
                u.https,
                u.host.clone(),
                Some(u.authority()),
            ));
        }
        if self.orig_dst.is_none()
            && let (Some(scheme), Some(auth)) = (uri.scheme_str(), uri.authority())
        {
            // Forward-proxy form (`http_proxy`): the absolute URI names the origin.
            return Ok(absolute_dest(auth, scheme == "https" || cfg.force_ssl));
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
        Ok(Dest::new(to, https, name, None))
    }

    /// The service's credentials: from the store, or the ones this connection got less
    /// than [`CREDS_REUSE`] ago (a keep-alive connection's requests do not each look the
    /// store's cache up).
    async fn credentials(&self, service: &Service) -> Result<Arc<Credentials>, ConnError> {
        let key = std::ptr::from_ref(service) as usize;
        if let Some((_, at, c)) = self.creds.lock().expect("lock").iter().find(|e| e.0 == key)
            && at.elapsed() < CREDS_REUSE
        {
            return Ok(Arc::clone(c));
        }
        let mut stats = ConnStats::default();
        let r = self
            .env
            .credentials(
                Requester::new(service, self.caller.as_deref()),
                false,
                &mut stats,
            )
            .await;
        if !stats.fetched.is_empty() {
            let mut f = self.fetched.lock().expect("lock");
            if f.is_empty() {
                *f = stats.fetched;
            }
        }
        let c = Arc::new(r?);
        let mut cache = self.creds.lock().expect("lock");
        cache.retain(|e| e.0 != key);
        cache.push((key, Instant::now(), Arc::clone(&c)));
        Ok(c)
    }

    async fn forward(
        &self,
        mut req: Request<Incoming>,
        log: &mut RequestLog,
    ) -> Result<Response<UpBody>, Failure> {
        let bad = |e: ConnError| (StatusCode::BAD_GATEWAY, e.to_string());
        let (route, creds, dest) = self.destination(req.uri()).await?;
        if let Some(r) = route {
            log.service = Arc::clone(&r.service);
            log.authenticated = true;
        }

        // The request as the upstream gets it.
        let upgrade = is_upgrade(req.headers());
        let one_shot = closes_after(&req);
        let client_upgrade = upgrade.then(|| hyper::upgrade::on(&mut req));
        let (mut parts, body) = req.into_parts();
        strip_hop_by_hop(&mut parts.headers, upgrade);
        parts.headers.remove(header::EXPECT);
        if dest.host.is_some() {
            let h = dest
                .host_value
                .clone()
                .ok_or_else(|| bad(ConnError::Config("bad host".into())))?;
            parts.headers.insert(header::HOST, h);
        } else if !parts.headers.contains_key(header::HOST) {
            let h = self
                .tunnel
                .as_ref()
                .map_or_else(|| dest.to.to_string(), |t| t.authority.clone());
            let h =
                HeaderValue::from_str(&h).map_err(|_| bad(ConnError::Config("bad host".into())))?;
            parts.headers.insert(header::HOST, h);
        }
        let base = route
            .and_then(|r| r.cfg().upstream.as_ref())
            .map_or("", |u| u.base_path.as_str());
        // The request target is rewritten (as a string, then parsed) only when a base
        // path or query parameters are added; else an absolute-form target becomes its
        // own path and query, and an origin-form one stays as it is.
        let rewrite = !base.is_empty() || route.is_some_and(|r| !r.cfg().query_params.is_empty());
        let mut origin = String::new();
        if rewrite {
            origin.push_str(base);
            origin.push_str(parts.uri.path());
            if let Some(q) = parts.uri.query() {
                origin.push('?');
                origin.push_str(q);
            }
        }
        parts.version = http::Version::HTTP_11;
        let mut token = None;
        let mut aws_scope = None;
        if let Some(r) = route {
            let cfg = r.cfg();
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
            token = authenticate(
                r,
                &creds,
                &mut parts.headers,
                &mut origin,
                Some(&self.rendered),
            )
            .await?;
        }
        if rewrite {
            parts.uri = origin
                .parse()
                .map_err(|_| bad(ConnError::Protocol("invalid request path".into())))?;
        } else if parts.uri.scheme().is_some() || parts.uri.authority().is_some() {
            parts.uri = origin_form(&parts.uri)
                .ok_or_else(|| bad(ConnError::Protocol("invalid request path".into())))?;
        }
        let replayable = body.is_end_stream();
        let mut up_body = body.boxed();
        if let Some(scope) = &aws_scope {
            up_body = aws_sign(&creds, &mut parts, up_body, scope).await?;
        }
        if let Some(o) = route.and_then(|r| r.cfg().oauth1.as_deref()) {
            let keys = oauth1_keys(o, &creds, token.as_ref())?;
            up_body = oauth1_sign(&keys, &mut parts, up_body, dest.https).await?;
        }
        let retry_parts = (route.is_some_and(|r| r.tokens.is_some()) && replayable).then(|| {
            let mut r = Request::new(());
            *r.method_mut() = parts.method.clone();
            *r.uri_mut() = parts.uri.clone();
            *r.headers_mut() = parts.headers.clone();
            r
        });
        let req = Request::from_parts(parts, up_body);
        let mut resp = self.send(route, &dest, req, upgrade, one_shot).await?;
        if resp.status() == StatusCode::UNAUTHORIZED
            && let (Some(r), Some(t), Some(retry)) = (route, &token, retry_parts)
            && let Some(tokens) = &r.tokens
        {
            // The token was refused: drop it, take a new one, send the request again once.
            tokens.invalidate(t);
            let (mut parts, ()) = retry.into_parts();
            let mut origin = parts.uri.to_string();
            parts.headers.remove(header::AUTHORIZATION);
            authenticate(r, &creds, &mut parts.headers, &mut origin, None).await?;
            let _ = origin; // query parameters were already added
            let req = Request::from_parts(parts, Empty::new().map_err(|n| match n {}).boxed());
            resp = self.send(route, &dest, req, upgrade, one_shot).await?;
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
        Ok(resp.map(|b| b.boxed()))
    }

    /// Send on the kept upstream connection (a new one when there is none, it closed, or
    /// this request goes elsewhere). The last request of a client connection that
    /// closes after it (`one_shot`) of an authenticated route takes a pooled connection
    /// and gives it back.
    async fn send(
        &self,
        route: Option<&Route>,
        dest: &Dest,
        req: Request<UpBody>,
        upgrade: bool,
        one_shot: bool,
    ) -> Result<Response<Incoming>, Failure> {
        let timeout = route.map_or(super::config::DEFAULT_TIMEOUT, |r| r.cfg().timeout);
        let tls = route.map_or(&self.c.plain_tls, |r| &r.upstream_tls);
        let idx = route.map(|r| std::ptr::from_ref(r) as usize);
        let to = &dest.to;
        let tls = dest.https.then_some((tls, dest.name.as_str()));
        let timed_out = || {
            (
                StatusCode::GATEWAY_TIMEOUT,
                format!(
                    "upstream {to} did not answer within {} s",
                    timeout.as_secs()
                ),
            )
        };
        if upgrade {
            // A connection of its own, in a task of its own: after the upgrade its
            // stream is relayed by a task that outlives this request loop.
            let mut sender = self
                .open_upstream(to, tls, Drive::Upgrade)
                .await
                .map_err(|e| (StatusCode::BAD_GATEWAY, e.to_string()))?;
            return match tokio::time::timeout(timeout, sender.send_request(req)).await {
                Ok(Ok(r)) => Ok(r),
                Ok(Err(e)) => Err((StatusCode::BAD_GATEWAY, format!("upstream {to}: {e}"))),
                Err(_) => Err(timed_out()),
            };
        }
        if one_shot && let Some(idx) = idx {
            let key = (to.clone(), tls.map(|(_, n)| n.to_owned()), idx);
            *self.upstream_addr.lock().expect("lock") = Some(to.to_string());
            let mut sender = match self.c.pool.take(&key) {
                Some(s) => s,
                None => self
                    .open_upstream(to, tls, Drive::Pooled)
                    .await
                    .map_err(|e| (StatusCode::BAD_GATEWAY, e.to_string()))?,
            };
            return match tokio::time::timeout(timeout, sender.send_request(req)).await {
                Ok(Ok(r)) => {
                    self.c.pool.give(key, sender);
                    Ok(r)
                }
                Ok(Err(e)) => Err((StatusCode::BAD_GATEWAY, format!("upstream {to}: {e}"))),
                Err(_) => Err(timed_out()),
            };
        }
        let mut slot = self.upstream.lock().await;
        let reuse = match slot.as_mut() {
            Some(u)
                if u.key.0 == *to
                    && u.key.1 == dest.https
                    && u.key.2 == idx
                    && !u.sender.is_closed() =>
            {
                // Ready at once in the usual case (the last response is done): no timer.
                u.sender.is_ready()
                    || tokio::time::timeout(timeout, u.sender.ready())
                        .await
                        .is_ok_and(|r| r.is_ok())
            }
            _ => false,
        };
        if !reuse {
            *slot = None;
            let sender = self
                .open_upstream(to, tls, Drive::Here)
                .await
                .map_err(|e| (StatusCode::BAD_GATEWAY, e.to_string()))?;
            *slot = Some(Upstream {
                key: (to.clone(), dest.https, idx),
                sender,
                deadline: Box::pin(tokio::time::sleep(timeout)),
            });
        }
        let u = slot.as_mut().expect("set above");
        u.deadline
            .as_mut()
            .reset(tokio::time::Instant::now() + timeout);
        let r = tokio::select! {
            biased;
            r = u.sender.send_request(req) => Some(r),
            () = u.deadline.as_mut() => None,
        };
        match r {
            Some(Ok(r)) => Ok(r),
            Some(Err(e)) => {
                *slot = None;
                Err((StatusCode::BAD_GATEWAY, format!("upstream {to}: {e}")))
            }
            None => {
                *slot = None;
                Err(timed_out())
            }
        }
    }

    /// A new upstream connection; TLS (verified for `name`) when `tls` is given.
    async fn open_upstream(
        &self,
        to: &HostPort,
        tls: Option<(&Arc<rustls::ClientConfig>, &str)>,
        drive: Drive,
    ) -> Result<hyper::client::conn::http1::SendRequest<UpBody>, ConnError> {
        *self.upstream_addr.lock().expect("lock") = Some(to.to_string());
        let tcp = self.env.dialer.dial(to).await?;
        let io: Box<dyn AsyncStream> = if let Some((config, name)) = tls {
            let server_name = rustls::pki_types::ServerName::try_from(name.to_owned())
                .map_err(|_| ConnError::Config(format!("invalid TLS server name `{name}`")))?;
            let s = tokio_rustls::TlsConnector::from(Arc::clone(config))
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
        match drive {
            // Its upgraded stream outlives this client connection's request loop.
            Drive::Upgrade => {
                tokio::spawn(async move {
                    let _ = conn.with_upgrades().await;
                });
            }
            // It outlives this client connection too (it ends when the pool drops it).
            Drive::Pooled => {
                tokio::spawn(async move {
                    let _ = conn.await;
                });
            }
            Drive::Here => {
                self.drivers.push(Box::pin(async move {
                    let _ = conn.await;
                }));
            }
        }
        Ok(sender)
    }
}

/// Where a new upstream connection is driven.
#[derive(Debug, Clone, Copy)]
enum Drive {
    /// In the client connection's task (no cross-task wake-up per request).
    Here,
    /// In a task of its own, with upgrades.
    Upgrade,
    /// In a task of its own, for the pool.
    Pooled,
}

/// Whether the client connection ends after this request (`Connection: close`, or
/// HTTP/1.0 without `keep-alive`).
fn closes_after<B>(req: &Request<B>) -> bool {
    let has = |token: &str| {
        req.headers()
            .get_all(header::CONNECTION)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .any(|t| t.trim().eq_ignore_ascii_case(token))
    };
    if req.version() == http::Version::HTTP_10 {
        !has("keep-alive")
    } else {
        has("close")
    }
}

/// An absolute-form request target's path and query, as an origin-form target.
fn origin_form(uri: &Uri) -> Option<Uri> {
    let mut parts = http::uri::Parts::default();
    parts.path_and_query = Some(
        uri.path_and_query()
            .filter(|pq| pq.as_str().starts_with('/'))
            .cloned()
            .unwrap_or_else(|| http::uri::PathAndQuery::from_static("/")),
    );
    Uri::from_parts(parts).ok()
}

/// Headers rendered from one route's templates and one set of credentials (the same
/// `Arc`): what a keep-alive connection's next requests with them get, unrendered.
/// Never for an OAuth2 route (its token is not part of the key).
struct Rendered {
    route: usize,
    creds: Arc<Credentials>,
    headers: Vec<(http::HeaderName, HeaderValue)>,
}

/// Add a service's credentials to a request; returns the OAuth2 token used. With
/// `cache`, the headers rendered for these credentials by an earlier request of the
/// connection are reused (and kept for the next one).
async fn authenticate(
    r: &Route,
    creds: &Arc<Credentials>,
    headers: &mut HeaderMap,
    origin: &mut String,
    cache: Option<&Mutex<Option<Rendered>>>,
) -> Result<Option<Secret>, Failure> {
    let cfg = r.cfg();
    let route_id = std::ptr::from_ref(r) as usize;
    let cache = cache.filter(|_| r.tokens.is_none() && cfg.style != Style::Aws);
    if let Some(c) = cache
        && cfg.query_params.is_empty()
        && let Some(hit) = c.lock().expect("lock").as_ref()
        && hit.route == route_id
        && Arc::ptr_eq(&hit.creds, creds)
    {
        // Validated and rendered from these very credentials already.
        for (name, v) in &hit.headers {
            headers.insert(name.clone(), v.clone());
        }
        return Ok(None);
    }
    let mut rendered = Vec::new();
    let svc = &r.service.name;
    for (name, re) in &cfg.credential_validations {
        let ok = creds
            .get(name)
            .is_some_and(|v| std::str::from_utf8(v.expose()).is_ok_and(|s| re.is_match(s)));
        if !ok {
            return Err((
                StatusCode::BAD_GATEWAY,
                format!("credential \"{name}\" does not match its credentialValidations pattern"),
            ));
        }
    }
    let token = match &r.tokens {
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
            rendered.push((header::AUTHORIZATION, value(&inject::basic(u, p))?));
        }
        Style::Generic => {
            for (name, t) in &cfg.headers {
                let v = t
                    .render(&get)
                    .map_err(|e| (StatusCode::BAD_GATEWAY, format!("header {name}: {e}")))?;
                rendered.push((name.clone(), value(&v)?));
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
    for (name, v) in &rendered {
        headers.insert(name.clone(), v.clone());
    }
    if let Some(c) = cache {
        *c.lock().expect("lock") = Some(Rendered {
            route: route_id,
            creds: Arc::clone(creds),
            headers: rendered,
        });
    }
    Ok(token)
}

/// Where an absolute-form request goes: its authority, TLS when `https` (then the
/// default port is 443), its own `Host`.
fn absolute_dest(auth: &http::uri::Authority, https: bool) -> Dest {
    let host = auth.host().trim_start_matches('[').trim_end_matches(']');
    let port = auth.port_u16().unwrap_or(if https { 443 } else { 80 });
    Dest::new(
        HostPort::new(host, port),
        https,
        host.to_owned(),
        Some(auth.to_string()),
    )
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

/// The `oauth1:` block rendered.
fn oauth1_keys(
    tmpls: &[(String, super::inject::Tmpl)],
    creds: &Credentials,
    token: Option<&Secret>,
) -> Result<oauth1::OAuth1Keys, Failure> {
    let get = move |n: &str| lookup(creds, token, n);
    let render = |k: &str| -> Result<Vec<u8>, Failure> {
        let t = tmpls
            .iter()
            .find(|(n, _)| n == k)
            .map(|(_, t)| t)
            .ok_or_else(|| (StatusCode::BAD_GATEWAY, format!("oauth1.{k} is missing")))?;
        t.render(&get)
            .map(|v| v.to_vec())
            .map_err(|e| (StatusCode::BAD_GATEWAY, format!("oauth1.{k}: {e}")))
    };
    let text = |k: &str| -> Result<String, Failure> {
        String::from_utf8(render(k)?)
            .map_err(|_| (StatusCode::BAD_GATEWAY, format!("oauth1.{k} is not UTF-8")))
    };
    Ok(oauth1::OAuth1Keys {
        consumer_key: text("consumer_key")?,
        consumer_secret: Secret::new(render("consumer_secret")?),
        token: text("token")?,
        token_secret: Secret::new(render("token_secret")?),
    })
}

/// Sign a request (final but for the signature) with OAuth 1.0a: an
/// `application/x-www-form-urlencoded` body is part of the signature, so it is buffered
/// (up to [`AWS_MAX_BODY`], else 413); any other body streams.
async fn oauth1_sign(
    keys: &oauth1::OAuth1Keys,
    parts: &mut http::request::Parts,
    body: UpBody,
    https: bool,
) -> Result<UpBody, Failure> {
    let form = parts
        .headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| {
            v.split(';').next().is_some_and(|t| {
                t.trim()
                    .eq_ignore_ascii_case("application/x-www-form-urlencoded")
            })
        });
    let (body, bytes) = if form {
        let bytes = read_bounded(body, "an OAuth1 form body is buffered to be signed").await?;
        (
            Full::new(bytes.clone()).map_err(|n| match n {}).boxed(),
            Some(bytes),
        )
    } else {
        (body, None)
    };
    let host_header = parts
        .headers
        .get(header::HOST)
        .and_then(|h| h.to_str().ok())
        .unwrap_or_default()
        .to_owned();
    let auth: http::uri::Authority = host_header
        .parse()
        .map_err(|_| (StatusCode::BAD_REQUEST, "invalid Host header".to_owned()))?;
    let host = auth.host().trim_start_matches('[').trim_end_matches(']');
    let value = oauth1::authorization(
        keys,
        &oauth1::SignInput {
            method: parts.method.as_str(),
            scheme: if https { "https" } else { "http" },
            host,
            port: auth.port_u16(),
            path: parts.uri.path(),
            query: parts.uri.query(),
            form: bytes.as_deref(),
            nonce: &oauth1::nonce(),
            timestamp: std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_secs()),
        },
    );
    let mut v = HeaderValue::from_str(&value).map_err(|_| {
        (
            StatusCode::BAD_GATEWAY,
            "the OAuth1 header is not a valid header value".to_owned(),
        )
    })?;
    v.set_sensitive(true);
    parts.headers.insert(header::AUTHORIZATION, v);
    Ok(body)
}

/// A request body read whole, up to [`AWS_MAX_BODY`] (over it: 413, saying `why`).
async fn read_bounded(body: UpBody, why: &str) -> Result<Bytes, Failure> {
    let too_large = || {
        (
            StatusCode::PAYLOAD_TOO_LARGE,
            format!("the body is larger than {AWS_MAX_BODY} bytes: {why}"),
        )
    };
    if body.size_hint().lower() > AWS_MAX_BODY as u64 {
        return Err(too_large());
    }
    Ok(http_body_util::Limited::new(body, AWS_MAX_BODY)
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
        .to_bytes())
}

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
            let bytes = read_bounded(
                body,
                "an AWS request body is buffered to be signed unless the app sends \
                 X-Amz-Content-Sha256",
            )
            .await?;
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

/// `Keep-Alive` and `Proxy-Connection`: hop-by-hop headers the `http` crate has no
/// constant for.
const KEEP_ALIVE: http::HeaderName = http::HeaderName::from_static("keep-alive");
const PROXY_CONNECTION: http::HeaderName = http::HeaderName::from_static("proxy-connection");

/// The headers that are hop-by-hop whatever `Connection` lists, each with a bit of
/// [`strip_hop_by_hop`]'s mask.
static HOP_BY_HOP: [http::HeaderName; 7] = [
    header::CONNECTION,
    header::UPGRADE,
    header::TE,
    header::TRAILER,
    header::PROXY_AUTHORIZATION,
    KEEP_ALIVE,
    PROXY_CONNECTION,
];

/// Remove the hop-by-hop headers (RFC 9110 7.6.1), keeping an upgrade's
/// `Connection: upgrade` and `Upgrade`. Framing (`Content-Length`,
/// `Transfer-Encoding`) stays: hyper frames each leg from it.
fn strip_hop_by_hop(h: &mut HeaderMap, upgrade: bool) {
    // One pass over the names (a handful): which hop-by-hop headers are there. Most
    // messages carry none, or only `Connection: keep-alive`; no look-up by a name
    // that is not there.
    let mut present = 0u8;
    for name in h.keys() {
        if let Some(i) = HOP_BY_HOP.iter().position(|n| n == name) {
            present |= 1 << i;
        }
    }
    let mut listed: Vec<http::HeaderName> = Vec::new();
    if present & 1 != 0 {
        for v in h.get_all(header::CONNECTION) {
            let Ok(s) = v.to_str() else { continue };
            for t in s.split(',').map(str::trim) {
                if t.is_empty()
                    || t.eq_ignore_ascii_case("upgrade")
                    || t.eq_ignore_ascii_case("transfer-encoding")
                    || t.eq_ignore_ascii_case("keep-alive")
                {
                    // `Keep-Alive` goes below anyway.
                    continue;
                }
                if let Ok(name) = http::HeaderName::from_bytes(t.as_bytes()) {
                    listed.push(name);
                }
            }
        }
    }
    for name in &listed {
        h.remove(name);
    }
    // TE, Trailer, Proxy-Authorization, Keep-Alive, Proxy-Connection.
    for (i, name) in HOP_BY_HOP.iter().enumerate().skip(2) {
        if present & (1 << i) != 0 {
            h.remove(name);
        }
    }
    if upgrade {
        h.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
    } else {
        if present & 1 != 0 {
            h.remove(header::CONNECTION);
        }
        if present & 2 != 0 {
            h.remove(header::UPGRADE);
        }
    }
}

/// One request's access line, written when its response body is done (or dropped).
struct RequestLog {
    service: Arc<Service>,
    caller: Option<Arc<Caller>>,
    method: Method,
    /// `Host`, or the request target's authority.
    authority: Option<HeaderValue>,
    /// The request target (its path is logged, never its query).
    uri: Uri,
    /// The service's credentials were added.
    authenticated: bool,
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
            http.authority = %self
                .authority
                .as_ref()
                .and_then(|a| a.to_str().ok())
                .unwrap_or_default(),
            http.path = %self.uri.path(),
            http.status = self.status,
            authenticated = self.authenticated,
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

    // Passed on, so that hyper writes a response head and its body chunks with one
    // writev instead of copying the chunks into its own buffer first.
    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let r = Pin::new(&mut self.io).poll_write_vectored(cx, bufs);
        if let Poll::Ready(Ok(n)) = &r {
            self.written.fetch_add(*n as u64, Ordering::Relaxed);
        }
        r
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn viable(pattern: &str, origin: &str) -> bool {
        let dfa = regex_automata::hybrid::dfa::DFA::new(pattern).expect("pattern");
        prefix_viable(&dfa, origin)
    }

    fn headers(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.append(
                http::HeaderName::from_bytes(k.as_bytes()).expect("name"),
                HeaderValue::from_str(v).expect("value"),
            );
        }
        h
    }

    fn names(h: &HeaderMap) -> Vec<&str> {
        let mut n: Vec<&str> = h.keys().map(http::HeaderName::as_str).collect();
        n.sort_unstable();
        n
    }

    #[test]
    fn hop_by_hop_headers_and_the_ones_connection_lists_are_removed() {
        let mut h = headers(&[
            ("host", "a"),
            ("connection", "keep-alive, X-Trace, close"),
            ("Connection", "Upgrade, transfer-encoding"),
            ("x-trace", "1"),
            ("close", "odd but listed"),
            ("keep-alive", "timeout=5"),
            ("proxy-connection", "keep-alive"),
            ("proxy-authorization", "Basic x"),
            ("te", "trailers"),
            ("trailer", "x-sum"),
            ("upgrade", "websocket"),
            ("transfer-encoding", "chunked"),
            ("authorization", "Bearer t"),
        ]);
        strip_hop_by_hop(&mut h, false);
        assert_eq!(names(&h), ["authorization", "host", "transfer-encoding"]);

        let mut h = headers(&[
            ("host", "a"),
            ("connection", "Upgrade"),
            ("upgrade", "websocket"),
            ("te", "trailers"),
        ]);
        strip_hop_by_hop(&mut h, true);
        assert_eq!(names(&h), ["connection", "host", "upgrade"]);
        assert_eq!(h[header::CONNECTION], "upgrade");

        // Nothing hop-by-hop: untouched.
        let mut h = headers(&[("host", "a"), ("content-length", "3")]);
        strip_hop_by_hop(&mut h, false);
        assert_eq!(names(&h), ["content-length", "host"]);
    }

    #[test]
    fn an_absolute_target_becomes_its_path_and_query() {
        let t = |u: &str| origin_form(&u.parse().expect("uri")).map(|u| u.to_string());
        assert_eq!(t("http://a.example/v1/x?q=1").as_deref(), Some("/v1/x?q=1"));
        assert_eq!(t("http://a.example").as_deref(), Some("/"));
        assert_eq!(t("https://a.example:8443/").as_deref(), Some("/"));
    }

    #[test]
    fn a_tunnel_origin_is_viable_for_patterns_that_can_match_its_urls() {
        let o = "https://api.example.com/";
        assert!(viable(r"^https://api\.example\.com/v1/", o));
        assert!(viable(r"^http[s]?://api\.example\.com", o));
        assert!(viable(r"^https://.*", o));
        assert!(viable(r"https://api", o));
        assert!(!viable(r"^https://other\.example\.com/", o));
        assert!(!viable(r"^http://api\.example\.com/", o));
        assert!(!viable(r"/v1/", o));
        assert!(!viable(r"^https://api\.example\.com:8443/", o));
        assert!(viable(
            r"^https://api\.example\.com:8443/",
            "https://api.example.com:8443/"
        ));
    }
}
