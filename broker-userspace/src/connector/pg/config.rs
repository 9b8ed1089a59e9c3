//! The `config:` block of a `pg` service, parsed and validated here (the loader calls
//! `parse` through `SYNTAX`), and the authentication policy it sets.

use std::sync::Arc;

use ipnet::IpNet;
use yaml_serde::Value;

use crate::config::{
    ConnectorBlock, ConnectorSettings, ConnectorSyntax, InterceptTarget, Loader, index, join,
    key_text, quoted_list, suggestion,
};
use crate::secret::Secret;

/// How the loader reads a `pg` service.
pub(super) const SYNTAX: ConnectorSyntax = ConnectorSyntax {
    names: &["pg", "postgres", "postgresql"],
    required_credentials: &["username", "password"],
    upstream_credentials: &["host", "address"],
    shares_listener: false,
    parse,
};

/// The credentials a `pg` service reads (connection settings), for messages.
const CREDENTIALS: &str = "host, port, username, password, database, sslmode, sslrootcert, \
                           sslcert, sslkey, sslhost, require_auth";

/// `connector: pg` (aliases `postgres`, `postgresql`). Connection settings come from the
/// credentials (`host port username password database sslmode sslrootcert sslcert sslkey
/// sslhost require_auth`), as in Secretless; the `config:` block holds what protects the
/// password from the upstream side.
#[derive(Debug, Clone)]
pub struct PgConfig {
    /// `requireAuth`: the authentication requests the broker answers. `None`: the
    /// default policy (md5 and SCRAM; a cleartext password only over verified TLS; no
    /// session without a challenge), see [`RequireAuth::default_allows`].
    pub require_auth: Option<RequireAuth>,
    /// `upstreamAllow`: addresses the app's own destination may be used as the upstream
    /// when no `host` credential names one. Empty: any destination the service
    /// intercepts (a CIDR target then requires an explicit upstream).
    pub upstream_allow: Vec<IpNet>,
    /// `scramMaxIterations`: SCRAM iteration counts above this are refused before any
    /// PBKDF2 runs (a hostile server could ask for 2^31).
    pub scram_max_iterations: u32,
    /// `clientTLS`: answer a client's SSLRequest with `S` (and accept direct TLS) and
    /// terminate TLS with a certificate from the broker's local CA. Off (the default):
    /// `N`, as Secretless does, which keeps the kernel splice.
    pub client_tls: bool,
    /// `clientAuth: scram-sha-256` with `clientPassword`: the broker authenticates the
    /// client with SCRAM (SCRAM-SHA-256-PLUS over client TLS) against this placeholder
    /// before the session, so client settings such as `channel_binding=require` or
    /// `require_auth=scram-sha-256` work. Not a secret: it grants nothing the caller's
    /// cgroup does not already grant. `None`: the client is not asked for a password.
    pub client_password: Option<Secret>,
    /// `reuse: session`: authenticated upstream sessions are reset and kept for the
    /// next app connection with the same startup (see `reuse`). `None`: off.
    pub reuse: Option<ReuseConfig>,
}

/// `reuse: session` with `reuseIdle` and `reuseMax`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ReuseConfig {
    /// How long an idle session is kept (`reuseIdle`, default 60 s).
    pub idle: std::time::Duration,
    /// Idle sessions kept per startup (`reuseMax`, default 16).
    pub max_idle: usize,
}

impl Default for ReuseConfig {
    fn default() -> Self {
        Self {
            idle: std::time::Duration::from_secs(60),
            max_idle: 16,
        }
    }
}

/// Default `scramMaxIterations`: 25 times PostgreSQL's default of 4096.
pub const DEFAULT_SCRAM_MAX_ITERATIONS: u32 = 100_000;

impl Default for PgConfig {
    fn default() -> Self {
        Self {
            require_auth: None,
            upstream_allow: Vec::new(),
            scram_max_iterations: DEFAULT_SCRAM_MAX_ITERATIONS,
            client_tls: false,
            client_password: None,
            reuse: None,
        }
    }
}

impl ConnectorSettings for PgConfig {}

/// The `config:` block of a `pg` service (connection settings are credentials).
fn parse(l: &mut Loader<'_>, b: &ConnectorBlock<'_>) -> Option<Arc<dyn ConnectorSettings>> {
    const KEYS: [&str; 9] = [
        "requireAuth",
        "upstreamAllow",
        "scramMaxIterations",
        "clientTLS",
        "clientAuth",
        "clientPassword",
        "reuse",
        "reuseIdle",
        "reuseMax",
    ];
    let (path, name) = (b.path, b.name);
    let mut out = PgConfig::default();
    let before = l.error_count();
    match b.value {
        None => {}
        Some(Value::Mapping(m)) => {
            for k in m.keys() {
                let k = key_text(k).unwrap_or_else(|| "?".to_owned());
                if !KEYS.contains(&k.as_str()) {
                    let hint = suggestion(&k, &KEYS);
                    l.unknown_key(
                        &join(path, &k),
                        format!(
                            "unknown key \"{k}\"{hint}; connection settings of connector \
                             \"{name}\" are credentials ({CREDENTIALS})"
                        ),
                    );
                }
            }
            if let Some(v) = m.get("requireAuth") {
                out.require_auth = require_auth(l, &join(path, "requireAuth"), v);
            }
            if let Some(v) = m.get("upstreamAllow") {
                out.upstream_allow = upstream_allow(l, &join(path, "upstreamAllow"), v);
            }
            if let Some(v) = m.get("clientTLS") {
                let p = join(path, "clientTLS");
                match v {
                    Value::Bool(b) => out.client_tls = *b,
                    Value::String(s) if matches!(s.as_str(), "on" | "true") => {
                        out.client_tls = true
                    }
                    Value::String(s) if matches!(s.as_str(), "off" | "false") => {
                        out.client_tls = false;
                    }
                    _ => l.err(&p, "must be on or off"),
                }
            }
            client_auth(l, path, m, &mut out);
            reuse(l, path, m, &mut out);
            if let Some(v) = m.get("scramMaxIterations") {
                let p = join(path, "scramMaxIterations");
                match l.uint(&p, v, u64::from(u32::MAX), "an iteration count") {
                    Some(0) => l.err(&p, "must be at least 1"),
                    Some(n) => out.scram_max_iterations = u32::try_from(n).expect("checked range"),
                    None => {}
                }
            }
        }
        Some(_) => {
            l.err(
                path,
                format!(
                    "connector \"{name}\" takes a map ({}); connection settings are \
                     credentials ({CREDENTIALS})",
                    quoted_list(&KEYS)
                ),
            );
        }
    }
    upstream_rules(l, b, &out);
    (l.error_count() == before).then(|| Arc::new(out) as Arc<dyn ConnectorSettings>)
}

/// `reuse: session|off`, `reuseIdle`, `reuseMax`.
fn reuse(l: &mut Loader<'_>, path: &str, m: &yaml_serde::Mapping, out: &mut PgConfig) {
    let mut r = ReuseConfig::default();
    let on = match m.get("reuse") {
        None => false,
        Some(v) => {
            let p = join(path, "reuse");
            match l.non_empty(&p, v).as_deref() {
                Some("session") => true,
                Some("off" | "none") => false,
                Some(_) => {
                    l.err(&p, "must be session or off");
                    false
                }
                None => false,
            }
        }
    };
    if let Some(v) = m.get("reuseIdle") {
        let p = join(path, "reuseIdle");
        match l.duration(&p, v) {
            Some(d) if d.is_zero() || d > std::time::Duration::from_secs(3600) => {
                l.err(&p, "must be between 1s and 1h");
            }
            Some(d) => r.idle = d,
            None => {}
        }
    }
    if let Some(v) = m.get("reuseMax") {
        let p = join(path, "reuseMax");
        match l.uint(&p, v, 1024, "a count of idle sessions") {
            Some(0) => l.err(&p, "must be at least 1"),
            Some(n) => r.max_idle = usize::try_from(n).expect("checked range"),
            None => {}
        }
    }
    if !on && (m.contains_key("reuseIdle") || m.contains_key("reuseMax")) {
        l.err(path, "reuseIdle and reuseMax apply with reuse: session");
    }
    if on && out.client_password.is_some() {
        // Fine: the client is authenticated by the broker either way.
    }
    out.reuse = on.then_some(r);
}

/// `clientAuth: scram-sha-256` (or `none`) and its `clientPassword`.
fn client_auth(l: &mut Loader<'_>, path: &str, m: &yaml_serde::Mapping, out: &mut PgConfig) {
    let method = match m.get("clientAuth") {
        None => None,
        Some(v) => {
            let p = join(path, "clientAuth");
            match l.non_empty(&p, v).as_deref() {
                Some("scram-sha-256") => Some(true),
                Some("none") => Some(false),
                Some(_) => {
                    l.err(&p, "must be scram-sha-256 or none");
                    None
                }
                None => None,
            }
        }
    };
    let password = m
        .get("clientPassword")
        .and_then(|v| l.non_empty(&join(path, "clientPassword"), v));
    match (method, password) {
        (Some(true), Some(pw)) => out.client_password = Some(Secret::from(pw)),
        (Some(true), None) if !m.contains_key("clientPassword") => l.err(
            path,
            "clientAuth: scram-sha-256 needs \"clientPassword\" (the placeholder password \
             the app uses; SCRAM is mutual, so the app must know it)",
        ),
        (None | Some(false), Some(_)) => l.err(
            &join(path, "clientPassword"),
            "is used only with clientAuth: scram-sha-256",
        ),
        _ => {}
    }
}

fn require_auth(l: &mut Loader<'_>, p: &str, v: &Value) -> Option<RequireAuth> {
    let items: Vec<String> = match v {
        Value::Sequence(seq) => seq
            .iter()
            .enumerate()
            .map(|(i, x)| l.non_empty(&index(p, i), x))
            .collect::<Option<_>>()?,
        v => l.non_empty(p, v)?.split(',').map(str::to_owned).collect(),
    };
    match RequireAuth::parse(items.iter().map(String::as_str)) {
        Ok(r) => Some(r),
        Err(reason) => {
            let shown = l.shown(p, &items.join(","));
            l.err(p, format!("invalid requireAuth {shown}: {reason}"));
            None
        }
    }
}

fn upstream_allow(l: &mut Loader<'_>, p: &str, v: &Value) -> Vec<IpNet> {
    let items: Vec<(String, &Value)> = match v {
        Value::Sequence(seq) => seq
            .iter()
            .enumerate()
            .map(|(i, x)| (index(p, i), x))
            .collect(),
        v => vec![(p.to_owned(), v)],
    };
    if items.is_empty() {
        l.err(p, "must list at least one IP address or CIDR block");
    }
    let mut out = Vec::new();
    for (ip, x) in items {
        let Some(s) = l.non_empty(&ip, x) else {
            continue;
        };
        let s = s.trim();
        let net = s
            .parse::<IpNet>()
            .or_else(|_| s.parse::<std::net::IpAddr>().map(IpNet::from));
        match net {
            Ok(n) => out.push(n.trunc()),
            Err(_) => {
                let shown = l.shown(&ip, s);
                l.err(
                    &ip,
                    format!(
                        "invalid address {shown}: expected an IP address or a CIDR block \
                         (10.0.0.0/8, 2001:db8::/64)"
                    ),
                );
            }
        }
    }
    out
}

/// A `pg` service whose intercept includes a CIDR block would otherwise log in to
/// whatever address in it the app (or a process squatting on one) names: it needs an
/// explicit upstream (`host` or `address`) or `config.upstreamAllow`.
fn upstream_rules(l: &mut Loader<'_>, b: &ConnectorBlock<'_>, cfg: &PgConfig) {
    let cidr = b
        .intercept
        .iter()
        .any(|t| matches!(t, InterceptTarget::Cidr { .. }));
    let explicit = b.credentials.contains("host") || b.credentials.contains("address");
    if cidr && !explicit && cfg.upstream_allow.is_empty() {
        l.err(
            &join(b.service_path, "intercept"),
            "a CIDR target needs an explicit upstream: set credential \"host\" (or \
             \"address\"), or list the addresses the app may reach in \
             config.upstreamAllow (otherwise the broker would log in to any address of the \
             block the app names)",
        );
    }
}

/// An authentication method the upstream may ask for, by libpq's `require_auth` name.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AuthKind {
    /// `none`: AuthenticationOk without any challenge (`trust`).
    None,
    /// `password`: AuthenticationCleartextPassword.
    Password,
    /// `md5`: AuthenticationMD5Password.
    Md5,
    /// `scram-sha-256`: SASL SCRAM-SHA-256 (and -PLUS).
    ScramSha256,
}

impl AuthKind {
    const ALL: [Self; 4] = [Self::Password, Self::Md5, Self::ScramSha256, Self::None];

    /// libpq's name.
    #[must_use]
    pub fn name(self) -> &'static str {
        match self {
            Self::None => "none",
            Self::Password => "password",
            Self::Md5 => "md5",
            Self::ScramSha256 => "scram-sha-256",
        }
    }

    fn bit(self) -> u8 {
        match self {
            Self::None => 1,
            Self::Password => 2,
            Self::Md5 => 4,
            Self::ScramSha256 => 8,
        }
    }
}

/// libpq's `require_auth`: a comma-separated list (or YAML list) of methods the broker
/// answers, or of `!`-negated methods it refuses (all negated or none, as libpq).
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct RequireAuth {
    allowed: u8,
}

impl std::fmt::Debug for RequireAuth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "RequireAuth({})", self.names())
    }
}

impl RequireAuth {
    /// Parse the items of a list (`password`, `!md5`, ...).
    ///
    /// # Errors
    /// Unknown, repeated or mixed negated/plain items, or an empty list. The message
    /// does not quote the value (it may come from a credential).
    pub fn parse<'a>(items: impl IntoIterator<Item = &'a str>) -> Result<Self, String> {
        let mut listed = 0u8;
        let mut negated: Option<bool> = None;
        for item in items {
            let item = item.trim();
            let (neg, name) = match item.strip_prefix('!') {
                Some(n) => (true, n),
                None => (false, item),
            };
            if *negated.get_or_insert(neg) != neg {
                return Err(
                    "negated (`!method`) and plain methods cannot be mixed (as in libpq)".into(),
                );
            }
            let kind = AuthKind::ALL
                .into_iter()
                .find(|k| k.name() == name)
                .ok_or_else(|| {
                    "unsupported method (expected password, md5, scram-sha-256 or none, \
                     each optionally negated with `!`)"
                        .to_owned()
                })?;
            if listed & kind.bit() != 0 {
                return Err("a method is listed twice".into());
            }
            listed |= kind.bit();
        }
        match negated {
            None => Err("lists no method".into()),
            Some(false) => Ok(Self { allowed: listed }),
            Some(true) if listed == 0x0f => Err("refuses every method".into()),
            Some(true) => Ok(Self {
                allowed: !listed & 0x0f,
            }),
        }
    }

    /// Parse libpq's comma-separated form.
    ///
    /// # Errors
    /// As [`Self::parse`].
    pub fn parse_text(s: &str) -> Result<Self, String> {
        Self::parse(s.split(','))
    }

    #[must_use]
    pub fn allows(self, kind: AuthKind) -> bool {
        self.allowed & kind.bit() != 0
    }

    /// The broker's policy when `requireAuth` is not set: md5 and SCRAM (SCRAM never
    /// reveals the password; md5 over plain TCP is what many installations use), a
    /// cleartext password only over TLS whose certificate was verified, and never a
    /// session the server opens without a challenge (a squatter saying "trust" would
    /// get the session's queries).
    #[must_use]
    pub fn default_allows(kind: AuthKind, verified_tls: bool) -> bool {
        match kind {
            AuthKind::Md5 | AuthKind::ScramSha256 => true,
            AuthKind::Password => verified_tls,
            AuthKind::None => false,
        }
    }

    /// The allowed methods, comma-separated, for messages.
    #[must_use]
    pub fn names(self) -> String {
        let names: Vec<&str> = AuthKind::ALL
            .into_iter()
            .filter(|k| self.allows(*k))
            .map(AuthKind::name)
            .collect();
        if names.is_empty() {
            "(nothing)".into()
        } else {
            names.join(", ")
        }
    }
}
