//! A fake Conjur server (Conjur Open Source v5 REST API), plain HTTP or HTTPS with its
//! own test CA, written from the API documentation and the server's routes:
//!
//! * `POST /authn/{account}/{login}/authenticate` (Authenticate,
//!   <https://docs.cyberark.com/conjur-open-source/latest/en/content/developer/conjur_api/api_authenticate.htm>):
//!   the body is the API key; the login is ONE path segment, percent-decoded
//!   (`host%2Fapp%2Fx` is `host/app/x`). The reply is an access token, the JSON
//!   `{"protected", "payload", "signature"}` whose payload (base64) holds `sub`, `iat`
//!   and `exp`; base64-encoded as a whole when asked with `Accept-Encoding: base64`
//!   (`Content-Encoding: base64`). A wrong login or key: 401, empty body.
//! * `GET /secrets/{account}/variable/{id}` (Retrieve a Secret,
//!   <https://docs.cyberark.com/conjur-open-source/latest/en/content/developer/conjur_api/api_retrieve_secret.htm>):
//!   with `Authorization: Token token="<base64 of the token>"`. The id is the rest of the
//!   path, each segment percent-decoded (Rails' `*identifier` glob: `a%2Fb` and `a/b`
//!   are the same variable). The raw value is the body (`application/octet-stream`).
//!   404 `{"error":{"code":"not_found","message":"CONJ00076E Variable ... is empty or
//!   not found."}}` for a variable without a value; 403 (empty) when the role may not
//!   execute it; 401 (empty) without a valid, unexpired token.
//! * `GET /secrets?variable_ids=ACCT:variable:ID,...` (Batch Retrieval,
//!   <https://docs.cyberark.com/conjur-open-source/latest/en/content/developer/conjur_api/api_batch_retrieve.htm>):
//!   the query form-decoded, split on `,`; the reply maps each full id to its value
//!   (JSON object). Any missing variable: 404 for the whole batch; any refused: 403; an
//!   empty id list: 422; a value that is not UTF-8: 406 (`not_acceptable`), as the
//!   server's `BadSecretEncoding`.
//!
//! Tokens expire after the lifetime (8 minutes, as Conjur's; settable so a test can
//! make it short) and can be revoked; [`FakeConjur::mint_token`] issues one as an
//! authn-k8s sidecar would write it to its token file. Every request is recorded (raw
//! path and query) and counted: authentications, single reads per variable, batches,
//! 401s. [`FakeConjur::set_failing`] makes every request a 500 with an HTML body.
//!
//! The HTTP plumbing ([`serve`], [`test_tls`]) is shared with `fake_kube`.

use std::{
    collections::{HashMap, HashSet},
    convert::Infallible,
    net::SocketAddr,
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
    time::{Duration, Instant, SystemTime},
};

use base64::Engine as _;
use bytes::Bytes;
use http_body_util::{BodyExt as _, Full};
use hyper::{Request, Response, body::Incoming};
use hyper_util::rt::TokioIo;

// ---- shared HTTP plumbing -------------------------------------------------------------------

/// One request as a fake saw it.
#[derive(Debug, Clone)]
pub struct Exchange {
    pub method: String,
    /// Path and query, exactly as sent (still percent-encoded).
    pub target: String,
    /// Header names lowercase.
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl Exchange {
    /// The first value of header `name` (lowercase).
    #[must_use]
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }

    /// The path without the query.
    #[must_use]
    pub fn path(&self) -> &str {
        self.target.split('?').next().unwrap_or("")
    }

    /// The raw query, if any.
    #[must_use]
    pub fn query(&self) -> Option<&str> {
        self.target.split_once('?').map(|(_, q)| q)
    }
}

/// A reply: status, headers, body.
#[derive(Debug, Clone)]
pub struct Reply {
    pub status: u16,
    pub headers: Vec<(&'static str, String)>,
    pub body: Vec<u8>,
}

impl Reply {
    #[must_use]
    pub fn new(status: u16, content_type: &str, body: impl Into<Vec<u8>>) -> Self {
        Self {
            status,
            headers: vec![("content-type", content_type.to_owned())],
            body: body.into(),
        }
    }

    #[must_use]
    pub fn json(status: u16, v: &serde_json::Value) -> Self {
        Self::new(
            status,
            "application/json",
            serde_json::to_vec(v).expect("JSON"),
        )
    }

    /// A reply with no body.
    #[must_use]
    pub fn empty(status: u16) -> Self {
        Self {
            status,
            headers: Vec::new(),
            body: Vec::new(),
        }
    }
}

/// What answers requests.
pub type Handler = dyn Fn(&Exchange) -> Reply + Send + Sync;

/// A running fake: its address, and the runtime serving it (stopped on drop).
pub struct Served {
    pub addr: SocketAddr,
    rt: Option<tokio::runtime::Runtime>,
}

impl Drop for Served {
    fn drop(&mut self) {
        if let Some(rt) = self.rt.take() {
            rt.shutdown_background();
        }
    }
}

/// The largest request body read.
const MAX_REQUEST_BODY: usize = 1024 * 1024;

/// Serve `handler` on 127.0.0.1 (a free port), over TLS when `tls` is given.
#[must_use]
pub fn serve(tls: Option<Arc<rustls::ServerConfig>>, handler: Arc<Handler>) -> Served {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    let listener = rt
        .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
        .expect("bind fake server");
    let addr = listener.local_addr().expect("local_addr");
    rt.spawn(async move {
        let acceptor = tls.map(tokio_rustls::TlsAcceptor::from);
        loop {
            let Ok((sock, _)) = listener.accept().await else {
                continue;
            };
            let handler = Arc::clone(&handler);
            let acceptor = acceptor.clone();
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(move |req| {
                    let handler = Arc::clone(&handler);
                    async move { Ok::<_, Infallible>(answer(req, &*handler).await) }
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
    Served { addr, rt: Some(rt) }
}

async fn answer(req: Request<Incoming>, handler: &Handler) -> Response<Full<Bytes>> {
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
    let mut body = Vec::new();
    let mut incoming = req.into_body();
    while let Some(f) = incoming.frame().await {
        let Ok(f) = f else { break };
        if let Some(d) = f.data_ref()
            && body.len() + d.len() <= MAX_REQUEST_BODY
        {
            body.extend_from_slice(d);
        }
    }
    let reply = handler(&Exchange {
        method,
        target,
        headers,
        body,
    });
    let mut r = Response::new(Full::new(Bytes::from(reply.body)));
    *r.status_mut() = hyper::StatusCode::from_u16(reply.status).expect("status");
    for (k, v) in reply.headers {
        r.headers_mut()
            .insert(k, hyper::header::HeaderValue::from_str(&v).expect("header"));
    }
    r
}

/// A TLS server configuration for `names` (DNS names or IP addresses), from a new test
/// CA whose certificate is written to `dir/<tag>-ca.crt`. Returns the configuration,
/// the CA file and the CA certificate as PEM.
#[must_use]
pub fn test_tls(
    dir: &Path,
    tag: &str,
    names: &[&str],
) -> (Arc<rustls::ServerConfig>, PathBuf, String) {
    let ca_key = rcgen::KeyPair::generate().expect("key");
    let mut ca_params = rcgen::CertificateParams::new(Vec::new()).expect("params");
    ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    ca_params
        .distinguished_name
        .push(rcgen::DnType::CommonName, format!("{tag} test CA"));
    let ca = ca_params.self_signed(&ca_key).expect("CA");
    let issuer = rcgen::Issuer::new(ca_params, ca_key);
    let key = rcgen::KeyPair::generate().expect("key");
    let leaf =
        rcgen::CertificateParams::new(names.iter().map(|n| (*n).to_owned()).collect::<Vec<_>>())
            .expect("params")
            .signed_by(&key, &issuer)
            .expect("leaf");
    let ca_path = dir.join(format!("{tag}-ca.crt"));
    std::fs::write(&ca_path, ca.pem()).expect("write CA");
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
    (Arc::new(cfg), ca_path, ca.pem())
}

/// Percent-decode (`%XX` only: `+` stays `+`, as in a path).
#[must_use]
pub fn percent_decode(s: &str) -> Vec<u8> {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%'
            && let Some(hex) = s.get(i + 1..i + 3)
            && let Ok(v) = u8::from_str_radix(hex, 16)
        {
            out.push(v);
            i += 3;
            continue;
        }
        out.push(b[i]);
        i += 1;
    }
    out
}

/// Form-decode one query parameter value (`+` is a space).
fn form_decode(s: &str) -> Vec<u8> {
    percent_decode(&s.replace('+', " "))
}

// ---- the fake Conjur ------------------------------------------------------------------------

/// Conjur's access token lifetime.
pub const CONJUR_TOKEN_LIFETIME: Duration = Duration::from_secs(8 * 60);

#[derive(Default)]
struct State {
    account: String,
    /// login -> API key.
    api_keys: HashMap<String, String>,
    /// Full id (`acct:variable:id`) -> value.
    variables: HashMap<String, Vec<u8>>,
    /// Full ids the role may see but not execute (403).
    denied: HashSet<String>,
    /// Token signature -> (login, expiry).
    tokens: HashMap<String, (String, Instant)>,
    lifetime: Duration,
    failing: bool,
    issued: usize,
    authentications: usize,
    failed_authentications: usize,
    unauthorized: usize,
    reads: HashMap<String, usize>,
    batches: usize,
    seen: Vec<Exchange>,
}

/// The fake Conjur; stops when dropped.
pub struct FakeConjur {
    pub addr: SocketAddr,
    /// Base URL (`http://127.0.0.1:P` or `https://localhost:P`).
    pub url: String,
    /// The test CA (HTTPS only): its file and its PEM text.
    pub ca: Option<(PathBuf, String)>,
    state: Arc<Mutex<State>>,
    _served: Served,
}

impl FakeConjur {
    /// Plain HTTP, account `account`.
    #[must_use]
    pub fn start(account: &str) -> Self {
        Self::start_inner(account, None)
    }

    /// HTTPS on `https://localhost:P`, with a test CA written to `dir`.
    #[must_use]
    pub fn start_tls(account: &str, dir: &Path) -> Self {
        Self::start_inner(account, Some(dir))
    }

    fn start_inner(account: &str, tls_dir: Option<&Path>) -> Self {
        let state = Arc::new(Mutex::new(State {
            account: account.to_owned(),
            lifetime: CONJUR_TOKEN_LIFETIME,
            ..State::default()
        }));
        let (tls, ca) = match tls_dir {
            Some(dir) => {
                let (cfg, path, pem) = test_tls(dir, "conjur", &["localhost", "127.0.0.1"]);
                (Some(cfg), Some((path, pem)))
            }
            None => (None, None),
        };
        let st = Arc::clone(&state);
        let served = serve(tls, Arc::new(move |x: &Exchange| handle(&st, x)));
        let url = match &ca {
            Some(_) => format!("https://localhost:{}", served.addr.port()),
            None => format!("http://{}", served.addr),
        };
        Self {
            addr: served.addr,
            url,
            ca,
            state,
            _served: served,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().expect("lock")
    }

    /// Let `login` (`host/app/x`, `admin`) authenticate with `api_key`.
    pub fn add_login(&self, login: &str, api_key: &str) {
        self.lock()
            .api_keys
            .insert(login.to_owned(), api_key.to_owned());
    }

    /// Give variable `id` (the identifier, without `account:variable:`) a value.
    pub fn set(&self, id: &str, value: &[u8]) {
        let mut st = self.lock();
        let full = format!("{}:variable:{id}", st.account);
        st.variables.insert(full, value.to_vec());
    }

    /// The role may see variable `id` but not execute it: 403.
    pub fn deny(&self, id: &str) {
        let mut st = self.lock();
        let full = format!("{}:variable:{id}", st.account);
        st.denied.insert(full);
    }

    /// Lifetime of the tokens issued from now on (whole seconds, at least one).
    pub fn set_token_lifetime(&self, d: Duration) {
        self.lock().lifetime = d.max(Duration::from_secs(1));
    }

    /// Every token issued so far stops working.
    pub fn revoke_tokens(&self) {
        self.lock().tokens.clear();
    }

    /// Answer every request with a 500 and an HTML body (or not).
    pub fn set_failing(&self, failing: bool) {
        self.lock().failing = failing;
    }

    /// A token for `login`, as a sidecar writes it to its token file (the JSON).
    #[must_use]
    pub fn mint_token(&self, login: &str) -> String {
        issue(&mut self.lock(), login)
    }

    /// Successful authentications.
    #[must_use]
    pub fn authentications(&self) -> usize {
        self.lock().authentications
    }

    /// Refused authentications (wrong login or key).
    #[must_use]
    pub fn failed_authentications(&self) -> usize {
        self.lock().failed_authentications
    }

    /// Requests refused with 401 for want of a valid token.
    #[must_use]
    pub fn unauthorized(&self) -> usize {
        self.lock().unauthorized
    }

    /// Single reads of variable `id` (identifier).
    #[must_use]
    pub fn reads(&self, id: &str) -> usize {
        let st = self.lock();
        let full = format!("{}:variable:{id}", st.account);
        st.reads.get(&full).copied().unwrap_or(0)
    }

    /// Single reads of any variable.
    #[must_use]
    pub fn all_reads(&self) -> usize {
        self.lock().reads.values().sum()
    }

    /// Batch requests.
    #[must_use]
    pub fn batches(&self) -> usize {
        self.lock().batches
    }

    /// Every request so far.
    #[must_use]
    pub fn seen(&self) -> Vec<Exchange> {
        self.lock().seen.clone()
    }
}

fn b64url(data: &[u8]) -> String {
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(data)
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .expect("clock")
        .as_secs()
}

/// Issue a token for `login`: `{"protected", "payload", "signature"}` (slosilo v2
/// layout; the signature is random here, and is what the server remembers).
fn issue(st: &mut State, login: &str) -> String {
    st.issued += 1;
    let iat = unix_now();
    let exp = iat + st.lifetime.as_secs();
    let protected = b64url(br#"{"alg":"conjur.org/slosilo/v2","kid":"fake-conjur-key"}"#);
    let payload = base64::engine::general_purpose::STANDARD
        .encode(serde_json::json!({"sub": login, "iat": iat, "exp": exp}).to_string());
    let nonce: [u8; 16] = std::array::from_fn(|i| {
        let t = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .expect("clock")
            .as_nanos();
        (t >> (i * 3)) as u8 ^ (st.issued as u8).wrapping_mul(31)
    });
    let signature = format!("{}{}", b64url(&nonce), st.issued);
    st.tokens.insert(
        signature.clone(),
        (login.to_owned(), Instant::now() + st.lifetime),
    );
    serde_json::json!({"protected": protected, "payload": payload, "signature": signature})
        .to_string()
}

/// The login a request's `Authorization: Token token="..."` header proves, if valid.
fn token_login(st: &State, x: &Exchange) -> Option<String> {
    let h = x.header("authorization")?;
    let b64 = h.strip_prefix("Token token=\"")?.strip_suffix('"')?;
    let raw = base64::engine::general_purpose::STANDARD.decode(b64).ok()?;
    let v: serde_json::Value = serde_json::from_slice(&raw).ok()?;
    let sig = v.get("signature")?.as_str()?;
    let (login, expires) = st.tokens.get(sig)?;
    (Instant::now() < *expires).then(|| login.clone())
}

fn not_found(message: String) -> Reply {
    Reply::json(
        404,
        &serde_json::json!({"error": {"code": "not_found", "message": message}}),
    )
}

fn handle(state: &Mutex<State>, x: &Exchange) -> Reply {
    let mut st = state.lock().expect("lock");
    st.seen.push(x.clone());
    if st.failing {
        return Reply::new(
            500,
            "text/html",
            "<html><body><h1>We're sorry, but something went wrong.</h1></body></html>",
        );
    }
    let segments: Vec<&str> = x.path().trim_start_matches('/').split('/').collect();
    match (x.method.as_str(), segments.as_slice()) {
        ("POST", ["authn", account, login, "authenticate"]) => {
            let login = String::from_utf8_lossy(&percent_decode(login)).into_owned();
            let ok = *account == st.account
                && st
                    .api_keys
                    .get(&login)
                    .is_some_and(|k| k.as_bytes() == x.body.as_slice());
            if !ok {
                st.failed_authentications += 1;
                return Reply::empty(401);
            }
            st.authentications += 1;
            let token = issue(&mut st, &login);
            if x.header("accept-encoding")
                .is_some_and(|v| v.eq_ignore_ascii_case("base64"))
            {
                let mut r = Reply::new(
                    200,
                    "text/plain",
                    base64::engine::general_purpose::STANDARD.encode(token),
                );
                r.headers.push(("content-encoding", "base64".to_owned()));
                return r;
            }
            Reply::new(200, "application/json", token)
        }
        ("GET", ["secrets", account, kind, rest @ ..]) if !rest.is_empty() => {
            if token_login(&st, x).is_none() {
                st.unauthorized += 1;
                return Reply::empty(401);
            }
            let id: Vec<String> = rest
                .iter()
                .map(|s| String::from_utf8_lossy(&percent_decode(s)).into_owned())
                .collect();
            let full = format!(
                "{}:{}:{}",
                String::from_utf8_lossy(&percent_decode(account)),
                String::from_utf8_lossy(&percent_decode(kind)),
                id.join("/")
            );
            *st.reads.entry(full.clone()).or_default() += 1;
            if *kind != "variable" {
                return not_found(format!("CONJ00076E Variable {full} is empty or not found."));
            }
            if st.denied.contains(&full) {
                return Reply::empty(403);
            }
            match st.variables.get(&full) {
                Some(v) => Reply::new(200, "application/octet-stream", v.clone()),
                None => not_found(format!("CONJ00076E Variable {full} is empty or not found.")),
            }
        }
        ("GET", ["secrets"]) => {
            if token_login(&st, x).is_none() {
                st.unauthorized += 1;
                return Reply::empty(401);
            }
            st.batches += 1;
            let ids: Vec<String> = x
                .query()
                .unwrap_or("")
                .split('&')
                .filter_map(|kv| kv.split_once('='))
                .find(|(k, _)| *k == "variable_ids")
                .map(|(_, v)| String::from_utf8_lossy(&form_decode(v)).into_owned())
                .unwrap_or_default()
                .split(',')
                .map(str::to_owned)
                .collect();
            if ids.iter().any(String::is_empty) {
                return Reply::json(
                    422,
                    &serde_json::json!({"error": {"code": "argument_error", "message": "variable_ids"}}),
                );
            }
            if ids.iter().any(|id| st.denied.contains(id)) {
                return Reply::empty(403);
            }
            let mut out = serde_json::Map::new();
            for id in &ids {
                let Some(v) = st.variables.get(id) else {
                    return not_found(format!("CONJ00076E Variable {id} is empty or not found."));
                };
                let Ok(text) = String::from_utf8(v.clone()) else {
                    return Reply::json(
                        406,
                        &serde_json::json!({"error": {"code": "not_acceptable", "message": "CONJ00047E Issue encoding secret into JSON format, try including 'Accept-Encoding: base64' header in request."}}),
                    );
                };
                out.insert(id.clone(), serde_json::Value::String(text));
            }
            Reply::json(200, &serde_json::Value::Object(out))
        }
        _ => Reply::json(
            404,
            &serde_json::json!({"error": {"code": "not_found", "message": "route not found"}}),
        ),
    }
}
