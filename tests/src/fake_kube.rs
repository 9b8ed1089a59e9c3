//! A fake Kubernetes API server serving core v1 Secrets, plain HTTP or HTTPS with its
//! own test CA, following the API reference
//! (<https://kubernetes.io/docs/reference/kubernetes-api/config-and-storage-resources/secret-v1/>,
//! "read the specified Secret": `GET /api/v1/namespaces/{namespace}/secrets/{name}`):
//!
//! * Requests must carry `Authorization: Bearer <token>` with a token the server
//!   accepts (a service account token; [`FakeKube::accept_tokens`] rotates them),
//!   else 401 with a `Status` object (`"reason":"Unauthorized"`).
//! * A namespace the service account may not read ([`FakeKube::forbid`]) is 403 with the
//!   RBAC `Status` message (`secrets "x" is forbidden: User
//!   "system:serviceaccount:NS:default" cannot get resource "secrets" ...`).
//! * A missing Secret is 404 with a `Status` (`secrets "x" not found`, `NotFound`).
//! * A Secret is `{"kind":"Secret","apiVersion":"v1","metadata":{...},"data":{KEY:
//!   base64},"type":"Opaque"}`; its `resourceVersion` grows with each change.
//!
//! Every request is recorded (path, bearer token) and counted, per Secret and for 401s.

use std::{
    collections::{BTreeMap, HashMap, HashSet},
    net::SocketAddr,
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
};

use base64::Engine as _;

use crate::fake_conjur::{Exchange, Reply, Served, percent_decode, serve, test_tls};

#[derive(Default)]
struct State {
    /// (namespace, name) -> key -> value.
    secrets: HashMap<(String, String), BTreeMap<String, Vec<u8>>>,
    tokens: HashSet<String>,
    forbidden: HashSet<String>,
    version: u64,
    reads: HashMap<(String, String), usize>,
    unauthorized: usize,
    /// (path, bearer token) of every request.
    seen: Vec<(String, Option<String>)>,
}

/// The fake API server; stops when dropped.
pub struct FakeKube {
    pub addr: SocketAddr,
    /// `http://127.0.0.1:P` or `https://127.0.0.1:P`.
    pub url: String,
    /// The test CA file (HTTPS only); its certificate names `127.0.0.1` and `localhost`.
    pub ca: Option<PathBuf>,
    state: Arc<Mutex<State>>,
    _served: Served,
}

impl FakeKube {
    /// Plain HTTP, accepting `token`.
    #[must_use]
    pub fn start(token: &str) -> Self {
        Self::start_inner(token, None)
    }

    /// HTTPS with a test CA written to `dir`, accepting `token`.
    #[must_use]
    pub fn start_tls(token: &str, dir: &Path) -> Self {
        Self::start_inner(token, Some(dir))
    }

    fn start_inner(token: &str, tls_dir: Option<&Path>) -> Self {
        let state = Arc::new(Mutex::new(State::default()));
        state.lock().expect("lock").tokens.insert(token.to_owned());
        let (tls, ca) = match tls_dir {
            Some(dir) => {
                let (cfg, path, _) = test_tls(dir, "kube", &["127.0.0.1", "localhost"]);
                (Some(cfg), Some(path))
            }
            None => (None, None),
        };
        let st = Arc::clone(&state);
        let served = serve(tls, Arc::new(move |x: &Exchange| handle(&st, x)));
        let scheme = if ca.is_some() { "https" } else { "http" };
        Self {
            addr: served.addr,
            url: format!("{scheme}://{}", served.addr),
            ca,
            state,
            _served: served,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().expect("lock")
    }

    /// Set `key` of Secret `namespace/name` (creating the Secret).
    pub fn set(&self, namespace: &str, name: &str, key: &str, value: &[u8]) {
        let mut st = self.lock();
        st.version += 1;
        st.secrets
            .entry((namespace.to_owned(), name.to_owned()))
            .or_default()
            .insert(key.to_owned(), value.to_vec());
    }

    /// Accept exactly these tokens from now on (a rotation: the old ones expire).
    pub fn accept_tokens(&self, tokens: &[&str]) {
        self.lock().tokens = tokens.iter().map(|t| (*t).to_owned()).collect();
    }

    /// The service account may not read Secrets in `namespace`.
    pub fn forbid(&self, namespace: &str) {
        self.lock().forbidden.insert(namespace.to_owned());
    }

    /// Reads of Secret `namespace/name` that were answered (any status but 401).
    #[must_use]
    pub fn reads(&self, namespace: &str, name: &str) -> usize {
        self.lock()
            .reads
            .get(&(namespace.to_owned(), name.to_owned()))
            .copied()
            .unwrap_or(0)
    }

    /// Requests refused with 401.
    #[must_use]
    pub fn unauthorized(&self) -> usize {
        self.lock().unauthorized
    }

    /// (path, bearer token) of every request so far.
    #[must_use]
    pub fn seen(&self) -> Vec<(String, Option<String>)> {
        self.lock().seen.clone()
    }
}

fn status(code: u16, reason: &str, message: &str, name: &str) -> Reply {
    Reply::json(
        code,
        &serde_json::json!({
            "kind": "Status",
            "apiVersion": "v1",
            "metadata": {},
            "status": "Failure",
            "message": message,
            "reason": reason,
            "details": {"name": name, "kind": "secrets"},
            "code": code,
        }),
    )
}

fn handle(state: &Mutex<State>, x: &Exchange) -> Reply {
    let mut st = state.lock().expect("lock");
    let bearer = x
        .header("authorization")
        .and_then(|h| h.strip_prefix("Bearer "))
        .map(str::to_owned);
    st.seen.push((x.target.clone(), bearer.clone()));
    if !bearer.as_ref().is_some_and(|b| st.tokens.contains(b)) {
        st.unauthorized += 1;
        return status(401, "Unauthorized", "Unauthorized", "");
    }
    let segments: Vec<String> = x
        .path()
        .trim_start_matches('/')
        .split('/')
        .map(|s| String::from_utf8_lossy(&percent_decode(s)).into_owned())
        .collect();
    let segs: Vec<&str> = segments.iter().map(String::as_str).collect();
    let ["api", "v1", "namespaces", ns, "secrets", name] = segs.as_slice() else {
        return status(
            404,
            "NotFound",
            "the server could not find the requested resource",
            "",
        );
    };
    if x.method != "GET" {
        return status(405, "MethodNotAllowed", "method not allowed", name);
    }
    let key = ((*ns).to_owned(), (*name).to_owned());
    *st.reads.entry(key.clone()).or_default() += 1;
    if st.forbidden.contains(*ns) {
        return status(
            403,
            "Forbidden",
            &format!(
                "secrets \"{name}\" is forbidden: User \"system:serviceaccount:{ns}:default\" \
                 cannot get resource \"secrets\" in API group \"\" in the namespace \"{ns}\""
            ),
            name,
        );
    }
    let Some(data) = st.secrets.get(&key) else {
        return status(
            404,
            "NotFound",
            &format!("secrets \"{name}\" not found"),
            name,
        );
    };
    let data: serde_json::Map<String, serde_json::Value> = data
        .iter()
        .map(|(k, v)| {
            (
                k.clone(),
                serde_json::Value::String(base64::engine::general_purpose::STANDARD.encode(v)),
            )
        })
        .collect();
    Reply::json(
        200,
        &serde_json::json!({
            "kind": "Secret",
            "apiVersion": "v1",
            "metadata": {
                "name": name,
                "namespace": ns,
                "uid": format!("00000000-0000-0000-0000-{:012}", st.version),
                "resourceVersion": st.version.to_string(),
                "creationTimestamp": "2026-01-01T00:00:00Z",
            },
            "data": data,
            "type": "Opaque",
        }),
    )
}
