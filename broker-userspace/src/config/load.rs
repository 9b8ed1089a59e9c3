//! The hand-written walk from a YAML value to the validated [`Config`].
//!
//! Every check records a [`ConfigError`] with the key path and carries on, so one run
//! reports every problem. Values are echoed in messages only when they are structural
//! (connector names, addresses) *and* did not come from the environment; credential
//! values are never echoed.

use std::collections::{BTreeMap, BTreeSet, HashSet};

use yaml_serde::{Mapping, Value};
use zeroize::Zeroize;

use super::{
    BUILT_PROVIDERS, ConfigError, ConfigErrors, NOT_BUILT_PROVIDERS, interpolate,
    kinds::{ConnectorBlock, ConnectorSyntax},
    model::{
        AuthMethod, AwsProviderConfig, BreakerConfig, BrokerSettings, CacheOverride, Config,
        ConjurProviderConfig, ConnectorSpec, CredentialSource, DEFAULT_HTTP_TIMEOUT,
        DEFAULT_MAX_CONNECTIONS_PER_LISTENER, FetchPolicy, HttpProviderConfig, InterceptTarget,
        KubernetesProviderConfig, ListenAddr, OAuth2ClientAuth, OAuth2Config, ProviderConfig,
        Service, VaultProviderConfig,
    },
    secretless, values,
};
use crate::secret::Secret;

/// Parse, expand and validate.
pub(super) fn load(
    text: &str,
    env: &dyn Fn(&str) -> Option<String>,
    kinds: Kinds,
) -> Result<Config, ConfigErrors> {
    let mut root: Value = yaml_serde::from_str(text)
        .map_err(|e| ConfigErrors(vec![ConfigError::new("", yaml_error(&e))]))?;
    // `<<: *anchor` merge keys, as YAML 1.1 defines them.
    let result = match root.apply_merge() {
        Ok(()) => load_value(&mut root, env, kinds),
        Err(e) => Err(ConfigErrors(vec![ConfigError::new(
            "",
            format!("invalid YAML merge key (<<): {e}"),
        )])),
    };
    // The tree held every literal credential and expanded value as plain strings.
    wipe(&mut root);
    result
}

/// The connector kinds a load accepts: the built ones and the names known but not built.
pub(super) struct Kinds {
    pub built: Vec<ConnectorSyntax>,
    pub not_built: &'static [&'static str],
}

fn load_value(
    root: &mut Value,
    env: &dyn Fn(&str) -> Option<String>,
    kinds: Kinds,
) -> Result<Config, ConfigErrors> {
    let one = |path: &str, msg: &str| Err(ConfigErrors(vec![ConfigError::new(path, msg)]));
    let mut warnings = Vec::new();
    let dialect = match &*root {
        Value::Mapping(m) => {
            if let Some(object) = secretless::kubernetes_object(m) {
                return one(
                    "",
                    &format!(
                        "this is a Kubernetes object, {object}, not a configuration: \
                         Secretless' Kubernetes CRD configuration (-config-mgr k8s/crd) is \
                         not supported; put the object's `spec:` in a file and pass that \
                         file with -f"
                    ),
                );
            }
            if secretless::is_v1(m) {
                let (converted, shown) = secretless::convert_v1(m).map_err(ConfigErrors)?;
                let mut old = std::mem::replace(root, converted);
                wipe(&mut old);
                warnings.push(ConfigError::new(
                    "",
                    format!(
                        "Secretless version 1 configuration (`listeners:` and `handlers:`), \
                         deprecated: read as this version 2 equivalent (key paths in \
                         messages refer to it):\n{}",
                        shown.trim_end()
                    ),
                ));
                secretless::Dialect::Secretless
            } else {
                secretless::dialect(m)
            }
        }
        Value::Null => return one("", "the configuration is empty"),
        _ => {
            return one(
                "",
                "the top level must be a map with `version: 2` and `services:`",
            );
        }
    };
    let mut l = Loader {
        env,
        kinds,
        lenient: dialect == secretless::Dialect::Secretless,
        errors: Vec::new(),
        warnings,
        from_env: HashSet::new(),
        broken: HashSet::new(),
        seen_listen: Vec::new(),
        seen_targets: Vec::new(),
    };
    if l.lenient {
        l.note_dollars("", root);
    } else {
        l.expand_tree("", root);
    }
    let Value::Mapping(m) = &*root else {
        unreachable!("expansion keeps the shape")
    };
    let mut cfg = l.config(m);
    if l.errors.is_empty() {
        cfg.warnings = l.warnings;
        Ok(cfg)
    } else {
        Err(ConfigErrors(l.errors))
    }
}

/// Whether the value at `path` may be a credential: a service's credentials, or a key
/// whose name says it holds one.
fn secret_path(path: &str) -> bool {
    const SECRET_WORDS: &[&str] = &["password", "secret", "token", "key", "credential"];
    let last = path
        .rsplit(['.', '['])
        .next()
        .unwrap_or(path)
        .to_ascii_lowercase();
    path.contains(".credentials") || SECRET_WORDS.iter().any(|w| last.contains(w))
}

fn yaml_error(e: &yaml_serde::Error) -> String {
    let msg = e.to_string();
    match e.location() {
        Some(loc) if !msg.contains("line ") => format!(
            "invalid YAML: {msg} at line {} column {}",
            loc.line(),
            loc.column()
        ),
        _ => format!("invalid YAML: {msg}"),
    }
}

/// Overwrite every string of the tree with zeros.
fn wipe(v: &mut Value) {
    match v {
        Value::String(s) => s.zeroize(),
        Value::Sequence(seq) => seq.iter_mut().for_each(wipe),
        Value::Mapping(m) => m.values_mut().for_each(wipe),
        Value::Tagged(t) => wipe(&mut t.value),
        Value::Null | Value::Bool(_) | Value::Number(_) => {}
    }
}

pub fn join(path: &str, key: &str) -> String {
    if path.is_empty() {
        key.to_owned()
    } else {
        format!("{path}.{key}")
    }
}

pub fn index(path: &str, i: usize) -> String {
    format!("{path}[{i}]")
}

pub fn key_text(k: &Value) -> Option<String> {
    match k {
        Value::String(s) => Some(s.clone()),
        Value::Number(n) => Some(n.to_string()),
        Value::Bool(b) => Some(b.to_string()),
        _ => None,
    }
}

pub fn quoted_list(items: &[&str]) -> String {
    items
        .iter()
        .map(|s| format!("\"{s}\""))
        .collect::<Vec<_>>()
        .join(", ")
}

/// Levenshtein distance, for "did you mean" hints on short key names.
fn distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut prev: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut cur = vec![i + 1; b.len() + 1];
        for (j, cb) in b.iter().enumerate() {
            let cost = usize::from(ca != *cb);
            cur[j + 1] = (prev[j] + cost).min(prev[j + 1] + 1).min(cur[j] + 1);
        }
        prev = cur;
    }
    prev[b.len()]
}

/// " (did you mean ...?)" or " (expected one of: ...)".
pub fn suggestion(word: &str, known: &[&str]) -> String {
    let lower = word.to_ascii_lowercase();
    let best = known
        .iter()
        .map(|k| (distance(&lower, &k.to_ascii_lowercase()), *k))
        .min();
    match best {
        Some((d, k)) if d <= 2 && d < word.len() => format!(" (did you mean \"{k}\"?)"),
        _ => format!(" (expected one of: {})", quoted_list(known)),
    }
}

const SERVICE_KEYS: &[&str] = &[
    "protocol",
    "connector",
    "listenOn",
    "intercept",
    "credentials",
    "config",
    "authentication",
    "cache",
    "unixSocket",
    "allow",
    "deny",
    "schedule",
    "rateLimit",
];
const LIST_SERVICE_KEYS: &[&str] = &[
    "name",
    "protocol",
    "connector",
    "listenOn",
    "intercept",
    "credentials",
    "config",
    "authentication",
    "cache",
    "unixSocket",
    "allow",
    "deny",
    "schedule",
    "rateLimit",
];

/// Keys every provider block accepts besides its kind's own: its failure behaviour
/// ([`Loader::fetch_policy`], docs/stores/failure.md). A kind's parser checks its block
/// with [`Loader::provider_keys`], which adds these to its own list.
pub const COMMON_PROVIDER_KEYS: &[&str] = &["cacheTTL", "staleFor", "breaker"];
/// The walk over one configuration. Connector kinds parse their own `config:` block
/// with its helpers ([`ConnectorSyntax::parse`]), so their messages read like the rest.
pub struct Loader<'e> {
    env: &'e dyn Fn(&str) -> Option<String>,
    kinds: Kinds,
    /// A file in Secretless' dialect ([`secretless::Dialect`]): unknown keys are
    /// warnings, `$` is kept as written.
    lenient: bool,
    errors: Vec<ConfigError>,
    /// Tolerated deviations (see [`Config::warnings`]).
    warnings: Vec<ConfigError>,
    /// Paths whose value contains text from the environment: never echoed.
    from_env: HashSet<String>,
    /// Paths whose expansion failed (already reported): not checked further.
    broken: HashSet<String>,
    /// Every `listenOn` and `intercept` target seen so far, with its path, to report
    /// the same address used twice.
    /// Each `listenOn` address: the first key path that names it, and whether its kind
    /// shares listeners.
    seen_listen: Vec<(ListenAddr, String, bool)>,
    seen_targets: Vec<(InterceptTarget, String)>,
}

/// A service's `connector:` name, looked up.
enum Named {
    Built(ConnectorSyntax, String),
    NotBuilt(String),
}

/// What the service walk needs to know about providers.
struct ProviderNames<'a> {
    configured: &'a BTreeMap<String, ProviderConfig>,
    /// Known not-built kinds used without an instance; added as `NotBuilt` instances.
    implicit: BTreeSet<String>,
}

impl Loader<'_> {
    /// Record an error at `path`.
    pub fn err(&mut self, path: &str, message: impl Into<String>) {
        self.errors.push(ConfigError::new(path, message));
    }

    /// Record a warning at `path`: accepted, but logged at start and an error under
    /// `broker check --strict`.
    pub fn warn(&mut self, path: &str, message: impl Into<String>) {
        self.warnings.push(ConfigError::new(path, message));
    }

    /// How many errors are recorded so far (a parser compares before and after).
    #[must_use]
    pub fn error_count(&self) -> usize {
        self.errors.len()
    }

    /// How a structural value may appear in a message.
    #[must_use]
    pub fn shown(&self, path: &str, value: &str) -> String {
        if self.from_env.contains(path) {
            "(value from the environment)".to_owned()
        } else if value.chars().count() > 80 {
            format!("{:?}...", value.chars().take(80).collect::<String>())
        } else {
            format!("{value:?}")
        }
    }

    /// Whether the value at `path` contains text from the environment (then it is never
    /// echoed; see [`Self::shown`]).
    #[must_use]
    pub fn is_from_env(&self, path: &str) -> bool {
        self.from_env.contains(path)
    }

    // ---- ${VAR} expansion ------------------------------------------------------------

    fn expand_tree(&mut self, path: &str, v: &mut Value) {
        match v {
            Value::String(s) if s.contains('$') => match interpolate::expand(s, self.env) {
                Ok(e) => {
                    if e.from_env {
                        self.from_env.insert(path.to_owned());
                    }
                    s.zeroize();
                    *s = e.text;
                }
                Err(errs) => {
                    self.broken.insert(path.to_owned());
                    if secret_path(path) && !interpolate::is_whole_reference(s) {
                        // `pa${x}` may be a password that holds "${x}": quote none of it.
                        self.err(
                            path,
                            "holds a \"$\" reference that cannot be expanded (a variable \
                             that is not set, or an invalid name; not quoted: the value is \
                             a credential); write \"$$\" for a literal \"$\"",
                        );
                    } else {
                        for m in errs {
                            self.err(path, m);
                        }
                    }
                }
            },
            Value::Sequence(seq) => {
                for (i, x) in seq.iter_mut().enumerate() {
                    self.expand_tree(&index(path, i), x);
                }
            }
            Value::Mapping(m) => {
                for (k, x) in m.iter_mut() {
                    let key = key_text(k).unwrap_or_else(|| "?".to_owned());
                    self.expand_tree(&join(path, &key), x);
                }
            }
            Value::Tagged(t) => self.expand_tree(path, &mut t.value),
            _ => {}
        }
    }

    /// In a file in Secretless' dialect: warn about each `${NAME}` kept as written (the
    /// value is not quoted: it may be a credential).
    fn note_dollars(&mut self, path: &str, v: &Value) {
        match v {
            Value::String(s) if interpolate::has_reference(s) => self.warn(
                path,
                "contains \"${...}\", kept as written: a file in Secretless' format expands \
                 no variables, as Secretless does (a file that uses a key of ours, such as \
                 `intercept:` or `providers:`, expands them; or read the variable with \
                 {from: env, get: NAME})",
            ),
            Value::Sequence(seq) => {
                for (i, x) in seq.iter().enumerate() {
                    self.note_dollars(&index(path, i), x);
                }
            }
            Value::Mapping(m) => {
                for (k, x) in m {
                    let key = key_text(k).unwrap_or_else(|| "?".to_owned());
                    self.note_dollars(&join(path, &key), x);
                }
            }
            Value::Tagged(t) => self.note_dollars(path, &t.value),
            _ => {}
        }
    }

    // ---- generic shape helpers -------------------------------------------------------

    /// `v` as a map, or an error saying it must be `what`.
    pub fn map<'v>(&mut self, path: &str, v: &'v Value, what: &str) -> Option<&'v Mapping> {
        match v {
            Value::Mapping(m) => Some(m),
            Value::Tagged(_) => {
                self.err(path, "YAML tags (`!tag`) are not supported");
                None
            }
            _ => {
                self.err(path, format!("must be {what}"));
                None
            }
        }
    }

    /// Report every key of `m` not in `allowed`.
    pub fn keys(&mut self, path: &str, m: &Mapping, allowed: &[&str]) {
        for k in m.keys() {
            match k.as_str() {
                Some(s) if allowed.contains(&s) => {}
                Some(s) => {
                    let hint = suggestion(s, allowed);
                    self.unknown_key(&join(path, s), format!("unknown key \"{s}\"{hint}"));
                }
                None => self.err(path, "keys must be strings"),
            }
        }
    }

    /// Report an unknown key: an error, or in a file in Secretless' dialect a warning
    /// (Secretless ignores keys it does not know).
    pub fn unknown_key(&mut self, path: &str, message: String) {
        if self.lenient {
            self.warn(path, format!("{message}; ignored, as Secretless does"));
        } else {
            self.err(path, message);
        }
    }

    /// [`Self::keys`] for a provider block: `own` (the kind's keys, `type` included) plus
    /// [`COMMON_PROVIDER_KEYS`].
    pub fn provider_keys(&mut self, path: &str, m: &Mapping, own: &[&str]) {
        let all: Vec<&str> = own.iter().chain(COMMON_PROVIDER_KEYS).copied().collect();
        self.keys(path, m, &all);
    }

    /// A scalar as text (numbers and booleans become their text).
    pub fn text(&mut self, path: &str, v: &Value) -> Option<String> {
        if self.broken.contains(path) {
            return None;
        }
        match v {
            Value::String(s) => Some(s.clone()),
            Value::Number(n) => Some(n.to_string()),
            Value::Bool(b) => Some(b.to_string()),
            Value::Null => {
                self.err(path, "has no value");
                None
            }
            Value::Tagged(_) => {
                self.err(path, "YAML tags (`!tag`) are not supported");
                None
            }
            Value::Sequence(_) | Value::Mapping(_) => {
                self.err(path, "must be a single value, not a list or a map");
                None
            }
        }
    }

    /// A non-empty scalar as text.
    pub fn non_empty(&mut self, path: &str, v: &Value) -> Option<String> {
        let s = self.text(path, v)?;
        if s.is_empty() {
            self.err(path, "must not be empty");
            return None;
        }
        Some(s)
    }

    /// An unsigned integer up to `max` (a YAML integer, or text holding one, decimal or
    /// `0x` hexadecimal).
    pub fn uint(&mut self, path: &str, v: &Value, max: u64, what: &str) -> Option<u64> {
        if self.broken.contains(path) {
            return None;
        }
        let n = match v {
            Value::Number(n) => n.as_u64(),
            Value::String(s) => {
                let s = s.trim();
                match s.strip_prefix("0x").or_else(|| s.strip_prefix("0X")) {
                    Some(hex) => u64::from_str_radix(hex, 16).ok(),
                    None => s.parse().ok(),
                }
            }
            _ => None,
        };
        match n {
            Some(n) if n <= max => Some(n),
            _ => {
                self.err(path, format!("must be {what} (0 to {max})"));
                None
            }
        }
    }

    pub fn boolean(&mut self, path: &str, v: &Value) -> Option<bool> {
        if self.broken.contains(path) {
            return None;
        }
        match v {
            Value::Bool(b) => Some(*b),
            Value::String(s) if s == "true" => Some(true),
            Value::String(s) if s == "false" => Some(false),
            _ => {
                self.err(path, "must be true or false");
                None
            }
        }
    }

    pub fn duration(&mut self, path: &str, v: &Value) -> Option<std::time::Duration> {
        let s = self.text(path, v)?;
        match values::duration(&s) {
            Ok(d) => Some(d),
            Err(reason) => {
                let shown = self.shown(path, &s);
                self.err(path, format!("invalid duration {shown}: {reason}"));
                None
            }
        }
    }

    // ---- top level -------------------------------------------------------------------

    fn config(&mut self, root: &Mapping) -> Config {
        self.keys("", root, &["version", "services", "providers", "broker"]);
        self.version(root.get("version"));
        let (mut providers, fetch_policies) = self.providers(root.get("providers"));
        let broker = self.broker(root.get("broker"));
        let mut names = ProviderNames {
            configured: &providers,
            implicit: BTreeSet::new(),
        };
        let services = self.services(root.get("services"), &mut names);
        let implicit = names.implicit;
        for kind in implicit {
            providers
                .entry(kind.clone())
                .or_insert(ProviderConfig::NotBuilt { kind });
        }
        Config {
            services,
            providers,
            broker,
            fetch_policies,
            warnings: Vec::new(),
        }
    }

    fn version(&mut self, v: Option<&Value>) {
        let Some(v) = v else {
            self.err("version", "missing: set `version: 2`");
            return;
        };
        let ok = match v {
            Value::Number(n) => n.as_u64() == Some(2) || n.as_f64() == Some(2.0),
            Value::String(s) => s.trim() == "2",
            _ => false,
        };
        if !ok && !self.broken.contains("version") {
            self.err(
                "version",
                "unsupported version: only version 2 (Secretless v2) is supported",
            );
        }
    }

    // ---- providers -------------------------------------------------------------------

    /// A store's bearer token: `token` (a value that can be sent in an HTTP header; never
    /// echoed) or `tokenFile` (a path), not both.
    fn token_or_file(
        &mut self,
        path: &str,
        m: &Mapping,
    ) -> (Option<Secret>, Option<std::path::PathBuf>) {
        let mut token = None;
        if let Some(v) = m.get("token") {
            // Never echoed: `text` reports shape problems only.
            let p = join(path, "token");
            if let Some(t) = self.text(&p, v) {
                if t.is_empty() {
                    self.err(&p, "is empty");
                } else if reqwest::header::HeaderValue::from_bytes(t.as_bytes()).is_err() {
                    // What `broker run` rejects when it builds the provider; `check` too.
                    self.err(
                        &p,
                        "contains characters that cannot be sent in an HTTP header \
                         (a newline or another control character)",
                    );
                } else {
                    token = Some(Secret::from(t));
                }
            }
        }
        let file = m
            .get("tokenFile")
            .and_then(|v| self.non_empty(&join(path, "tokenFile"), v))
            .map(Into::into);
        if m.contains_key("token") && m.contains_key("tokenFile") {
            self.err(path, "set either \"token\" or \"tokenFile\", not both");
        }
        (token, file)
    }

    /// The provider instances, and the failure policy ([`Self::fetch_policy`]) of each
    /// built one the block declares.
    fn providers(
        &mut self,
        v: Option<&Value>,
    ) -> (
        BTreeMap<String, ProviderConfig>,
        BTreeMap<String, FetchPolicy>,
    ) {
        let mut out = BTreeMap::new();
        let mut policies = BTreeMap::new();
        out.insert("literal".to_owned(), ProviderConfig::Literal);
        out.insert("env".to_owned(), ProviderConfig::Env);
        out.insert("file".to_owned(), ProviderConfig::File);
        out.insert(
            "http".to_owned(),
            ProviderConfig::Http(HttpProviderConfig {
                timeout: DEFAULT_HTTP_TIMEOUT,
                ..HttpProviderConfig::default()
            }),
        );
        // Configured from the environment when used (`CONJUR_*`, in-cluster).
        out.insert(
            "conjur".to_owned(),
            ProviderConfig::Conjur(ConjurProviderConfig {
                builtin: true,
                ..ConjurProviderConfig::default()
            }),
        );
        out.insert(
            "kubernetes".to_owned(),
            ProviderConfig::Kubernetes(KubernetesProviderConfig {
                builtin: true,
                ..KubernetesProviderConfig::default()
            }),
        );
        out.insert(
            "vault".to_owned(),
            ProviderConfig::Vault(VaultProviderConfig::default()),
        );
        out.insert(
            "aws".to_owned(),
            ProviderConfig::Aws(AwsProviderConfig {
                timeout: DEFAULT_HTTP_TIMEOUT,
                ..AwsProviderConfig::default()
            }),
        );
        let m = match v {
            None | Some(Value::Null) => return (out, policies),
            Some(v) => match self.map(
                "providers",
                v,
                "a map of instance name -> {type: http|env|file|literal|..., ...}",
            ) {
                Some(m) => m,
                None => return (out, policies),
            },
        };
        let all_kinds: Vec<&str> = BUILT_PROVIDERS
            .iter()
            .chain(NOT_BUILT_PROVIDERS)
            .copied()
            .collect();
        for (k, pv) in m {
            let Some(name) = k.as_str() else {
                self.err("providers", "provider instance names must be strings");
                continue;
            };
            let path = join("providers", name);
            if name.is_empty() {
                self.err(&path, "a provider instance name must not be empty");
                continue;
            }
            let empty = Mapping::new();
            let pm = match pv {
                Value::Null => &empty,
                v => match self.map(&path, v, "a map with `type:` and the provider's options") {
                    Some(m) => m,
                    None => continue,
                },
            };
            let kind = match pm.get("type") {
                Some(t) => match self.non_empty(&join(&path, "type"), t) {
                    Some(t) => t,
                    None => continue,
                },
                None if all_kinds.contains(&name) => name.to_owned(),
                None => {
                    self.err(
                        &path,
                        format!("missing \"type\" (one of: {})", quoted_list(&all_kinds)),
                    );
                    continue;
                }
            };
            let cfg = match kind.as_str() {
                "literal" | "env" | "file" => {
                    self.provider_keys(&path, pm, &["type"]);
                    match kind.as_str() {
                        "literal" => ProviderConfig::Literal,
                        "env" => ProviderConfig::Env,
                        _ => ProviderConfig::File,
                    }
                }
                "http" => match self.http_provider(&path, pm) {
                    Some(c) => ProviderConfig::Http(c),
                    None => continue,
                },
                "vault" => match self.vault_provider(&path, pm) {
                    Some(c) => ProviderConfig::Vault(c),
                    None => continue,
                },
                "conjur" => match self.conjur_provider(&path, pm) {
                    Some(c) => ProviderConfig::Conjur(c),
                    None => continue,
                },
                "kubernetes" => match self.kubernetes_provider(&path, pm) {
                    Some(c) => ProviderConfig::Kubernetes(c),
                    None => continue,
                },
                "aws" => match self.aws_provider(&path, pm) {
                    Some(c) => ProviderConfig::Aws(c),
                    None => continue,
                },
                k if NOT_BUILT_PROVIDERS.contains(&k) => ProviderConfig::NotBuilt { kind },
                _ => {
                    let tpath = join(&path, "type");
                    let shown = self.shown(&tpath, &kind);
                    self.err(
                        &tpath,
                        format!(
                            "unknown provider type {shown} (known: {})",
                            quoted_list(&all_kinds)
                        ),
                    );
                    continue;
                }
            };
            if !matches!(cfg, ProviderConfig::NotBuilt { .. }) {
                policies.insert(name.to_owned(), self.fetch_policy(&path, pm, cfg.kind()));
            }
            out.insert(name.to_owned(), cfg);
        }
        (out, policies)
    }

    /// The failure keys every provider block accepts ([`COMMON_PROVIDER_KEYS`]):
    /// `cacheTTL`, `staleFor`, `breaker`, over the defaults of `kind`
    /// ([`FetchPolicy::default_for`]). Errors name the key path.
    pub fn fetch_policy(&mut self, path: &str, m: &Mapping, kind: &str) -> FetchPolicy {
        let mut out = FetchPolicy::default_for(kind);
        if let Some(v) = m.get("cacheTTL")
            && let Some(d) = self.duration(&join(path, "cacheTTL"), v)
        {
            out.cache_ttl = Some(d);
        }
        if let Some(v) = m.get("staleFor")
            && let Some(d) = self.duration(&join(path, "staleFor"), v)
        {
            out.stale_for = d;
        }
        if let Some(v) = m.get("breaker") {
            out.breaker = self.breaker_config(&join(path, "breaker"), v, out.breaker);
        }
        out
    }

    /// `breaker: off | on | {failures, backoff, maxBackoff}` (`false`/`true` too); keys
    /// left out of the map keep their defaults. On an error, `default`.
    fn breaker_config(
        &mut self,
        path: &str,
        v: &Value,
        default: Option<BreakerConfig>,
    ) -> Option<BreakerConfig> {
        const WHAT: &str = "off, on, or a map {failures, backoff, maxBackoff}";
        if self.broken.contains(path) {
            return default;
        }
        let word = match v {
            Value::Bool(b) => Some(*b),
            Value::String(s) => match s.as_str() {
                "off" | "false" => Some(false),
                "on" | "true" => Some(true),
                _ => {
                    let shown = self.shown(path, s);
                    self.err(path, format!("invalid breaker {shown}: expected {WHAT}"));
                    return default;
                }
            },
            Value::Mapping(_) => None,
            _ => {
                self.err(path, format!("must be {WHAT}"));
                return default;
            }
        };
        if let Some(on) = word {
            return on.then(BreakerConfig::default);
        }
        let m = self.map(path, v, WHAT)?;
        self.keys(path, m, &["failures", "backoff", "maxBackoff"]);
        let mut b = BreakerConfig::default();
        if let Some(v) = m.get("failures") {
            let p = join(path, "failures");
            match self.uint(&p, v, 1_000_000, "a number of consecutive failures") {
                Some(0) => self.err(&p, "must be at least 1 (use `breaker: off` to disable it)"),
                Some(n) => b.failures = u32::try_from(n).expect("checked range"),
                None => {}
            }
        }
        let positive = |l: &mut Self, key: &str| {
            let p = join(path, key);
            let d = l.duration(&p, m.get(key)?)?;
            if d.is_zero() {
                l.err(&p, "must be more than 0");
                return None;
            }
            Some(d)
        };
        let backoff = positive(self, "backoff");
        let max = positive(self, "maxBackoff");
        if let Some(d) = backoff {
            b.backoff = d;
        }
        match max {
            Some(d) => b.max_backoff = d,
            // Only `backoff` set, above the default cap: it is the cap.
            None => b.max_backoff = b.max_backoff.max(b.backoff),
        }
        if b.max_backoff < b.backoff {
            self.err(
                &join(path, "maxBackoff"),
                format!("must not be less than backoff ({:?})", b.backoff),
            );
        }
        Some(b)
    }

    fn http_provider(&mut self, path: &str, m: &Mapping) -> Option<HttpProviderConfig> {
        self.provider_keys(
            path,
            m,
            &[
                "type",
                "baseUrl",
                "token",
                "tokenFile",
                "caFile",
                "certFile",
                "keyFile",
                "timeout",
            ],
        );
        let errors_before = self.errors.len();
        let mut cfg = HttpProviderConfig {
            timeout: DEFAULT_HTTP_TIMEOUT,
            ..HttpProviderConfig::default()
        };
        if let Some(v) = m.get("baseUrl") {
            let p = join(path, "baseUrl");
            if let Some(url) = self.non_empty(&p, v) {
                match reqwest::Url::parse(&url) {
                    Ok(u) if matches!(u.scheme(), "http" | "https") && u.has_host() => {
                        cfg.base_url = Some(url);
                    }
                    // Not echoed: a URL may carry a password in its user-info part.
                    _ => self.err(
                        &p,
                        "invalid URL: expected http://HOST/... or https://HOST/...",
                    ),
                }
            }
        }
        (cfg.token, cfg.token_file) = self.token_or_file(path, m);
        if let Some(v) = m.get("caFile") {
            cfg.ca_file = self.non_empty(&join(path, "caFile"), v).map(Into::into);
        }
        let cert = m
            .get("certFile")
            .and_then(|v| self.non_empty(&join(path, "certFile"), v));
        let key = m
            .get("keyFile")
            .and_then(|v| self.non_empty(&join(path, "keyFile"), v));
        match (cert, key) {
            (Some(c), Some(k)) => cfg.client_cert = Some((c.into(), k.into())),
            (Some(_), None) if !m.contains_key("keyFile") => {
                self.err(
                    path,
                    "\"certFile\" needs \"keyFile\" (the client certificate's key)",
                );
            }
            (None, Some(_)) if !m.contains_key("certFile") => {
                self.err(
                    path,
                    "\"keyFile\" needs \"certFile\" (the client certificate)",
                );
            }
            _ => {}
        }
        if let Some(v) = m.get("timeout") {
            let p = join(path, "timeout");
            match self.duration(&p, v) {
                Some(d) if d.is_zero() => self.err(&p, "must be more than zero"),
                Some(d) => cfg.timeout = d,
                None => {}
            }
        }
        (self.errors.len() == errors_before).then_some(cfg)
    }

    fn aws_provider(&mut self, path: &str, m: &Mapping) -> Option<AwsProviderConfig> {
        self.provider_keys(
            path,
            m,
            &[
                "type",
                "region",
                "endpoint",
                "profile",
                "accessKeyId",
                "secretAccessKey",
                "sessionToken",
                "timeout",
            ],
        );
        let errors_before = self.errors.len();
        let mut cfg = AwsProviderConfig {
            timeout: DEFAULT_HTTP_TIMEOUT,
            ..AwsProviderConfig::default()
        };
        if let Some(v) = m.get("region") {
            let p = join(path, "region");
            if let Some(r) = self.non_empty(&p, v) {
                if !r.is_empty()
                    && r.len() <= 64
                    && r.bytes()
                        .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
                {
                    cfg.region = Some(r);
                } else {
                    let shown = self.shown(&p, &r);
                    self.err(
                        &p,
                        format!("invalid region {shown}: expected a name such as us-east-1"),
                    );
                }
            }
        }
        if let Some(v) = m.get("endpoint") {
            let p = join(path, "endpoint");
            if let Some(url) = self.non_empty(&p, v) {
                match reqwest::Url::parse(&url) {
                    Ok(u)
                        if matches!(u.scheme(), "http" | "https")
                            && u.has_host()
                            && u.username().is_empty()
                            && u.password().is_none() =>
                    {
                        cfg.endpoint = Some(url);
                    }
                    // Not echoed: it may carry a password in its user-info part.
                    _ => self.err(
                        &p,
                        "invalid URL: expected http://HOST[:PORT] or https://HOST[:PORT] \
                         (no user-info)",
                    ),
                }
            }
        }
        if let Some(v) = m.get("profile") {
            cfg.profile = self.non_empty(&join(path, "profile"), v);
        }
        if let Some(v) = m.get("accessKeyId") {
            // Not secret by itself, but not echoed either.
            let p = join(path, "accessKeyId");
            match self.text(&p, v) {
                Some(t) if t.is_empty() => self.err(&p, "is empty"),
                Some(t) if !t.bytes().all(|b| b.is_ascii_alphanumeric()) => {
                    self.err(&p, "must be letters and digits only");
                }
                Some(t) => cfg.access_key_id = Some(t),
                None => {}
            }
        }
        for (key, slot) in [
            ("secretAccessKey", &mut cfg.secret_access_key),
            ("sessionToken", &mut cfg.session_token),
        ] {
            let Some(v) = m.get(key) else { continue };
            // Never echoed: `text` reports shape problems only.
            let p = join(path, key);
            if let Some(t) = self.text(&p, v) {
                if t.is_empty() {
                    self.err(&p, "is empty");
                } else if reqwest::header::HeaderValue::from_bytes(t.as_bytes()).is_err() {
                    self.err(
                        &p,
                        "contains characters that cannot be sent in an HTTP header \
                         (a newline or another control character)",
                    );
                } else {
                    *slot = Some(Secret::from(t));
                }
            }
        }
        let (id, secret, token) = (
            m.contains_key("accessKeyId"),
            m.contains_key("secretAccessKey"),
            m.contains_key("sessionToken"),
        );
        if id != secret {
            self.err(
                path,
                "set \"accessKeyId\" and \"secretAccessKey\" together (or neither, to use \
                 the AWS credential chain)",
            );
        } else if token && !id {
            self.err(
                path,
                "\"sessionToken\" needs \"accessKeyId\" and \"secretAccessKey\"",
            );
        }
        if let Some(v) = m.get("timeout") {
            let p = join(path, "timeout");
            match self.duration(&p, v) {
                Some(d) if d.is_zero() => self.err(&p, "must be more than zero"),
                Some(d) => cfg.timeout = d,
                None => {}
            }
        }
        (self.errors.len() == errors_before).then_some(cfg)
    }

    /// An `http://` or `https://` URL with a host, never echoed (a URL may carry a
    /// password in its user-info part).
    fn store_url(&mut self, path: &str, v: &Value) -> Option<String> {
        let url = self.non_empty(path, v)?;
        match reqwest::Url::parse(&url) {
            Ok(u) if matches!(u.scheme(), "http" | "https") && u.has_host() => Some(url),
            _ => {
                self.err(
                    path,
                    "invalid URL: expected http://HOST/... or https://HOST/...",
                );
                None
            }
        }
    }

    /// A provider's `timeout`: a duration more than zero.
    fn provider_timeout(&mut self, path: &str, m: &Mapping) -> Option<std::time::Duration> {
        let v = m.get("timeout")?;
        let p = join(path, "timeout");
        match self.duration(&p, v) {
            Some(d) if d.is_zero() => {
                self.err(&p, "must be more than zero");
                None
            }
            d => d,
        }
    }

    fn conjur_provider(&mut self, path: &str, m: &Mapping) -> Option<ConjurProviderConfig> {
        self.provider_keys(
            path,
            m,
            &[
                "type",
                "applianceUrl",
                "account",
                "login",
                "apiKey",
                "apiKeyFile",
                "tokenFile",
                "caFile",
                "authnUrl",
                "timeout",
            ],
        );
        let errors_before = self.errors.len();
        let mut cfg = ConjurProviderConfig::default();
        let p = |k: &str| join(path, k);
        if let Some(v) = m.get("applianceUrl") {
            cfg.appliance_url = self.store_url(&p("applianceUrl"), v);
        }
        if let Some(v) = m.get("authnUrl") {
            cfg.authn_url = self.store_url(&p("authnUrl"), v);
        }
        if let Some(v) = m.get("account") {
            cfg.account = self.non_empty(&p("account"), v);
        }
        if let Some(v) = m.get("login") {
            cfg.login = self.non_empty(&p("login"), v);
        }
        if let Some(v) = m.get("apiKey") {
            // Never echoed: `text` reports shape problems only.
            match self.text(&p("apiKey"), v) {
                Some(k) if k.is_empty() => self.err(&p("apiKey"), "is empty"),
                Some(k) => cfg.api_key = Some(Secret::from(k)),
                None => {}
            }
        }
        for (key, slot) in [
            ("apiKeyFile", &mut cfg.api_key_file),
            ("tokenFile", &mut cfg.token_file),
            ("caFile", &mut cfg.ca_file),
        ] {
            if let Some(v) = m.get(key) {
                *slot = self.non_empty(&p(key), v).map(Into::into);
            }
        }
        if m.contains_key("apiKey") && m.contains_key("apiKeyFile") {
            self.err(path, "set either \"apiKey\" or \"apiKeyFile\", not both");
        }
        if m.contains_key("tokenFile") && (m.contains_key("apiKey") || m.contains_key("apiKeyFile"))
        {
            self.err(
                path,
                "set either an API key (\"apiKey\", \"apiKeyFile\") or \"tokenFile\", not both",
            );
        }
        cfg.timeout = self.provider_timeout(path, m);
        (self.errors.len() == errors_before).then_some(cfg)
    }

    fn kubernetes_provider(&mut self, path: &str, m: &Mapping) -> Option<KubernetesProviderConfig> {
        self.provider_keys(
            path,
            m,
            &[
                "type",
                "apiServer",
                "tokenFile",
                "caFile",
                "namespace",
                "timeout",
            ],
        );
        let errors_before = self.errors.len();
        let mut cfg = KubernetesProviderConfig::default();
        if let Some(v) = m.get("apiServer") {
            cfg.api_server = self.store_url(&join(path, "apiServer"), v);
        }
        for (key, slot) in [
            ("tokenFile", &mut cfg.token_file),
            ("caFile", &mut cfg.ca_file),
        ] {
            if let Some(v) = m.get(key) {
                *slot = self.non_empty(&join(path, key), v).map(Into::into);
            }
        }
        if let Some(v) = m.get("namespace") {
            let p = join(path, "namespace");
            if let Some(ns) = self.non_empty(&p, v) {
                if crate::secrets::kubernetes::valid_namespace(&ns) {
                    cfg.namespace = Some(ns);
                } else {
                    let shown = self.shown(&p, &ns);
                    self.err(
                        &p,
                        format!(
                            "invalid namespace {shown}: lowercase letters, digits and `-`, \
                             at most 63 characters"
                        ),
                    );
                }
            }
        }
        cfg.timeout = self.provider_timeout(path, m);
        (self.errors.len() == errors_before).then_some(cfg)
    }

    /// A `vault` instance: every key optional (the Vault CLI's environment variables
    /// fill in what is left out when the provider is built).
    fn vault_provider(&mut self, path: &str, m: &Mapping) -> Option<VaultProviderConfig> {
        use super::model::{
            DEFAULT_VAULT_APPROLE_MOUNT, DEFAULT_VAULT_JWT_FILE, DEFAULT_VAULT_KUBERNETES_MOUNT,
            VaultAuthConfig, VaultValue,
        };
        self.provider_keys(
            path,
            m,
            &[
                "type",
                "address",
                "token",
                "tokenFile",
                "namespace",
                "caFile",
                "auth",
                "timeout",
                "revokeOnShutdown",
            ],
        );
        let errors_before = self.errors.len();
        let mut cfg = VaultProviderConfig {
            declared: true,
            ..VaultProviderConfig::default()
        };
        if let Some(v) = m.get("address") {
            let p = join(path, "address");
            if let Some(url) = self.non_empty(&p, v) {
                match reqwest::Url::parse(&url) {
                    Ok(u)
                        if matches!(u.scheme(), "http" | "https")
                            && u.has_host()
                            && u.username().is_empty()
                            && u.password().is_none()
                            && u.query().is_none() =>
                    {
                        cfg.address = Some(url);
                    }
                    // Not echoed: a URL may carry a password in its user-info part.
                    _ => self.err(
                        &p,
                        "invalid address: expected http://HOST[:PORT] or https://HOST[:PORT] \
                         (no user-info, no query)",
                    ),
                }
            }
        }
        let token_ok = |t: &str| reqwest::header::HeaderValue::from_bytes(t.as_bytes()).is_ok();
        (cfg.token, cfg.token_file) = self.token_or_file(path, m);
        if let Some(v) = m.get("namespace") {
            let p = join(path, "namespace");
            if let Some(ns) = self.non_empty(&p, v) {
                if token_ok(&ns) {
                    cfg.namespace = Some(ns);
                } else {
                    self.err(
                        &p,
                        "contains characters that cannot be sent in an HTTP header",
                    );
                }
            }
        }
        if let Some(v) = m.get("caFile") {
            cfg.ca_file = self.non_empty(&join(path, "caFile"), v).map(Into::into);
        }
        if let Some(v) = m.get("timeout") {
            let p = join(path, "timeout");
            match self.duration(&p, v) {
                Some(d) if d.is_zero() => self.err(&p, "must be more than zero"),
                Some(d) => cfg.timeout = Some(d),
                None => {}
            }
        }
        if let Some(v) = m.get("revokeOnShutdown")
            && let Some(b) = self.boolean(&join(path, "revokeOnShutdown"), v)
        {
            cfg.revoke_on_shutdown = b;
        }
        if let Some(v) = m.get("auth") {
            let apath = join(path, "auth");
            if let Some(am) = self.map(
                &apath,
                v,
                "a map: {method: token}, {method: approle, roleId, secretId, ...} or \
                 {method: kubernetes, role, ...}",
            ) {
                let method = match am.get("method") {
                    Some(mv) => self.non_empty(&join(&apath, "method"), mv),
                    None => {
                        self.err(&apath, "missing \"method\" (token, approle or kubernetes)");
                        None
                    }
                };
                // A login secret: `KEY` inline or `KEYFile`, exactly one (or none when
                // optional).
                let value = |this: &mut Self, key: &str, required: bool| -> Option<VaultValue> {
                    let fkey = format!("{key}File");
                    match (am.get(key), am.get(fkey.as_str())) {
                        (Some(_), Some(_)) => {
                            this.err(
                                &apath,
                                format!("set either \"{key}\" or \"{fkey}\", not both"),
                            );
                            None
                        }
                        // Never echoed.
                        (Some(v), None) => this
                            .non_empty(&join(&apath, key), v)
                            .map(|s| VaultValue::Inline(Secret::from(s))),
                        (None, Some(v)) => this
                            .non_empty(&join(&apath, &fkey), v)
                            .map(|s| VaultValue::File(s.into())),
                        (None, None) => {
                            if required {
                                this.err(&apath, format!("missing \"{key}\" (or \"{fkey}\")"));
                            }
                            None
                        }
                    }
                };
                let mount = |this: &mut Self, default: &str| -> String {
                    am.get("mount")
                        .and_then(|v| this.non_empty(&join(&apath, "mount"), v))
                        .map_or_else(|| default.to_owned(), |s| s.trim_matches('/').to_owned())
                };
                match method.as_deref() {
                    None => {}
                    Some("token") => {
                        self.keys(&apath, am, &["method"]);
                        cfg.auth = VaultAuthConfig::Token;
                    }
                    Some("approle") => {
                        self.keys(
                            &apath,
                            am,
                            &[
                                "method",
                                "roleId",
                                "roleIdFile",
                                "secretId",
                                "secretIdFile",
                                "mount",
                            ],
                        );
                        let role_id = value(self, "roleId", true);
                        let secret_id = value(self, "secretId", false);
                        let mount = mount(self, DEFAULT_VAULT_APPROLE_MOUNT);
                        if let Some(role_id) = role_id {
                            cfg.auth = VaultAuthConfig::AppRole {
                                role_id,
                                secret_id,
                                mount,
                            };
                        }
                    }
                    Some("kubernetes") => {
                        self.keys(&apath, am, &["method", "role", "jwtFile", "mount"]);
                        let role = match am.get("role") {
                            Some(v) => self.non_empty(&join(&apath, "role"), v),
                            None => {
                                self.err(&apath, "missing \"role\" (the Vault role to log in as)");
                                None
                            }
                        };
                        let jwt_file = am
                            .get("jwtFile")
                            .and_then(|v| self.non_empty(&join(&apath, "jwtFile"), v))
                            .unwrap_or_else(|| DEFAULT_VAULT_JWT_FILE.to_owned());
                        let mount = mount(self, DEFAULT_VAULT_KUBERNETES_MOUNT);
                        if let Some(role) = role {
                            cfg.auth = VaultAuthConfig::Kubernetes {
                                role,
                                jwt_file: jwt_file.into(),
                                mount,
                            };
                        }
                    }
                    Some(other) => {
                        let mpath = join(&apath, "method");
                        let shown = self.shown(&mpath, other);
                        self.err(
                            &mpath,
                            format!(
                                "unknown auth method {shown} (known: \"token\", \"approle\", \"kubernetes\")"
                            ),
                        );
                    }
                }
                if !matches!(method.as_deref(), None | Some("token"))
                    && (m.contains_key("token") || m.contains_key("tokenFile"))
                {
                    self.err(
                        path,
                        "set either a token (\"token\", \"tokenFile\") or a login method \
                         (\"auth\"), not both",
                    );
                }
            }
        }
        (self.errors.len() == errors_before).then_some(cfg)
    }

    // ---- broker ----------------------------------------------------------------------

    fn broker(&mut self, v: Option<&Value>) -> BrokerSettings {
        let mut out = BrokerSettings::default();
        let m = match v {
            None | Some(Value::Null) => return out,
            Some(v) => match self.map("broker", v, "a map of broker settings") {
                Some(m) => m,
                None => return out,
            },
        };
        self.keys(
            "broker",
            m,
            &[
                "health",
                "transparentPort",
                "cacheTTL",
                "bypassMark",
                "splice",
                "maxConnections",
                "maxConnectionsPerListener",
                "caDir",
                "unixSocket",
                "adminSocket",
                "metrics",
                "drainTimeout",
                "audit",
            ],
        );
        if let Some(v) = m.get("drainTimeout")
            && let Some(d) = self.duration("broker.drainTimeout", v)
        {
            if d > super::model::MAX_DRAIN_TIMEOUT {
                self.err(
                    "broker.drainTimeout",
                    "must be at most 1h (systemd's TimeoutStopSec must exceed it)",
                );
            } else {
                out.drain_timeout = d;
            }
        }
        if let Some(v) = m.get("metrics")
            && let Some(b) = self.boolean("broker.metrics", v)
        {
            out.metrics = b;
        }
        if let Some(v) = m.get("adminSocket") {
            out.admin_socket = self.admin_socket("broker.adminSocket", v);
        }
        out.unix_socket = super::socket::broker(self, m.get("unixSocket"));
        out.audit = super::audit::broker(self, m.get("audit"));
        if let Some(v) = m.get("health") {
            let p = "broker.health";
            let text = match v {
                Value::Bool(false) => Some("off".to_owned()),
                v => self.text(p, v),
            };
            if let Some(s) = text {
                match values::health_addr(&s) {
                    Ok(a) => out.health_addr = a,
                    Err(reason) => {
                        let shown = self.shown(p, &s);
                        self.err(p, format!("invalid address {shown}: {reason}"));
                    }
                }
            }
        }
        if let Some(v) = m.get("transparentPort")
            && let Some(p) = self.uint(
                "broker.transparentPort",
                v,
                u64::from(u16::MAX),
                "a port number",
            )
        {
            out.transparent_port = u16::try_from(p).expect("checked range");
        }
        if let Some(v) = m.get("cacheTTL")
            && let Some(d) = self.duration("broker.cacheTTL", v)
        {
            out.cache_ttl = d;
        }
        if let Some(v) = m.get("caDir")
            && let Some(d) = self.non_empty("broker.caDir", v)
        {
            out.ca_dir = d.into();
        }
        if let Some(v) = m.get("splice")
            && let Some(b) = self.boolean("broker.splice", v)
        {
            out.splice = b;
        }
        if let Some(v) = m.get("bypassMark")
            && let Some(mark) =
                self.uint("broker.bypassMark", v, u64::from(u32::MAX), "a socket mark")
        {
            if mark == 0 {
                self.err(
                    "broker.bypassMark",
                    "must not be 0: the broker's own connections would be intercepted",
                );
            } else {
                out.bypass_mark = u32::try_from(mark).expect("checked range");
            }
        }
        let limit = |l: &mut Self, key: &str| {
            let p = format!("broker.{key}");
            let n = l.uint(&p, m.get(key)?, 1_000_000, "a connection count")?;
            if n == 0 {
                l.err(&p, "must be at least 1");
                return None;
            }
            u32::try_from(n).ok()
        };
        let max = limit(self, "maxConnections");
        let per = limit(self, "maxConnectionsPerListener");
        if let Some(n) = max {
            out.max_connections = n;
        }
        out.max_connections_per_listener = match (per, max) {
            (Some(p), _) => p,
            // Half by default, so `listenOn` listeners always have a share left.
            (None, Some(n)) => (n / 2).max(1),
            (None, None) => DEFAULT_MAX_CONNECTIONS_PER_LISTENER,
        };
        if out.max_connections_per_listener > out.max_connections {
            self.err(
                "broker.maxConnectionsPerListener",
                format!(
                    "must not be more than broker.maxConnections ({})",
                    out.max_connections
                ),
            );
        }
        out
    }

    /// `broker.adminSocket`: `off` (or `false`), or an absolute path that fits in a
    /// socket address and names a file.
    fn admin_socket(&mut self, p: &str, v: &Value) -> super::model::AdminSocket {
        use super::model::AdminSocket;
        let text = match v {
            Value::Bool(false) => Some("off".to_owned()),
            v => self.non_empty(p, v),
        };
        let Some(text) = text else {
            return AdminSocket::Default;
        };
        if text == "off" {
            return AdminSocket::Off;
        }
        if !text.starts_with('/') {
            self.err(
                p,
                format!("must be an absolute path or `off` (got {text:?})"),
            );
        } else if text.ends_with('/') {
            self.err(
                p,
                "must name a file, not a directory: /run/broker/admin.sock",
            );
        } else if text.len() > super::MAX_SOCKET_PATH {
            self.err(
                p,
                format!(
                    "the path is {} bytes long; a socket address holds at most {}",
                    text.len(),
                    super::MAX_SOCKET_PATH
                ),
            );
        } else {
            return AdminSocket::Path(text.into());
        }
        AdminSocket::Default
    }

    // ---- services --------------------------------------------------------------------

    fn services(&mut self, v: Option<&Value>, names: &mut ProviderNames<'_>) -> Vec<Service> {
        const WHAT: &str = "a map of service name -> service, or a list of services with `name:`";
        let mut out: Vec<Service> = Vec::new();
        match v {
            None => self.err(
                "services",
                "missing: a configuration needs at least one service",
            ),
            Some(Value::Null) => self.err("services", "has no services"),
            Some(Value::Mapping(m)) => {
                if m.is_empty() {
                    self.err("services", "has no services");
                }
                for (k, sv) in m {
                    let Some(name) = key_text(k) else {
                        self.err("services", "service names must be strings");
                        continue;
                    };
                    let path = join("services", &name);
                    if name.is_empty() {
                        self.err(&path, "a service name must not be empty");
                        continue;
                    }
                    out.extend(self.service(&path, name, sv, false, names));
                }
            }
            Some(Value::Sequence(seq)) => {
                // Name -> path of its first entry.
                let mut seen: Vec<(String, String)> = Vec::new();
                if seq.is_empty() {
                    self.err("services", "has no services");
                }
                for (i, sv) in seq.iter().enumerate() {
                    let path = index("services", i);
                    let Some(m) = self.map(&path, sv, "a service: {name, connector, ...}") else {
                        continue;
                    };
                    let Some(nv) = m.get("name") else {
                        self.err(&path, "missing \"name\"");
                        // Still check the rest of the entry.
                        let _ = self.service(&path, String::new(), sv, true, names);
                        continue;
                    };
                    let npath = join(&path, "name");
                    let Some(name) = self.non_empty(&npath, nv) else {
                        let _ = self.service(&path, String::new(), sv, true, names);
                        continue;
                    };
                    if let Some((_, other)) = seen.iter().find(|(n, _)| *n == name) {
                        let msg = format!("duplicate service name {name:?} (also {other})");
                        self.err(&npath, msg);
                    } else {
                        seen.push((name.clone(), path.clone()));
                    }
                    out.extend(self.service(&path, name, sv, true, names));
                }
            }
            Some(_) => self.err("services", format!("must be {WHAT}")),
        }
        out
    }

    fn service(
        &mut self,
        path: &str,
        name: String,
        v: &Value,
        list_shape: bool,
        names: &mut ProviderNames<'_>,
    ) -> Option<Service> {
        let m = self.map(
            path,
            v,
            "a service: {connector, listenOn, intercept, credentials, config}",
        )?;
        self.keys(
            path,
            m,
            if list_shape {
                LIST_SERVICE_KEYS
            } else {
                SERVICE_KEYS
            },
        );
        let connector = self.connector(path, m);
        let shares = matches!(&connector, Some(Named::Built(k, _)) if k.shares_listener);
        let listen_on = m.get("listenOn").and_then(|v| {
            let p = join(path, "listenOn");
            let s = self.text(&p, v)?;
            match values::listen_addr(&s) {
                Ok(a) => {
                    match self.seen_listen.iter().find(|(x, ..)| *x == a) {
                        // Secretless' HTTP forward proxy: one listener, requests routed
                        // by URL.
                        Some((ListenAddr::Tcp(_), _, true)) if shares => {}
                        Some((_, other, other_shares)) => {
                            let msg = if shares && *other_shares {
                                format!(
                                    "the same address is also used by {other}; HTTP services \
                                     share a listener only on tcp://"
                                )
                            } else {
                                format!(
                                    "the same address is also used by {other} (only HTTP \
                                     services may share a listenOn, routed by \
                                     authenticateURLsMatching)"
                                )
                            };
                            self.err(&p, msg);
                        }
                        None => self.seen_listen.push((a.clone(), p.clone(), shares)),
                    }
                    Some(a)
                }
                Err(reason) => {
                    let shown = self.shown(&p, &s);
                    self.err(&p, format!("invalid listenOn {shown}: {reason}"));
                    None
                }
            }
        });
        let unix_socket = super::socket::service(self, path, m, listen_on.as_ref());
        let policy = super::policy::service(self, path, m);
        let intercept = self.intercept(path, m.get("intercept"));
        let cache = self.cache_override(path, m.get("cache"));
        let credentials = self.credentials(path, m.get("credentials"), names);
        let authentication = self.authentication(path, m.get("authentication"));

        let connector = match connector? {
            Named::NotBuilt(name) => ConnectorSpec::NotBuilt { name },
            Named::Built(kind, written) => {
                let intercept_given = m.get("intercept").is_some_and(|v| !v.is_null());
                if !m.contains_key("listenOn") && !intercept_given {
                    self.err(
                        path,
                        format!(
                            "needs \"listenOn\" or \"intercept\" (or both): connector \"{}\" \
                             has no way to receive connections",
                            kind.kind()
                        ),
                    );
                }
                let creds_path = join(path, "credentials");
                let creds_given = m.get("credentials").is_some_and(|v| !v.is_null());
                // Without a readable credentials block, its own errors say enough.
                if creds_given && credentials.is_none() {
                    return None;
                }
                let given = credentials
                    .as_ref()
                    .map(|(_, given)| given.clone())
                    .unwrap_or_default();
                for k in kind.required_credentials {
                    if !given.contains(*k) {
                        self.err(&creds_path, format!("missing \"{k}\""));
                    }
                }
                let config_path = join(path, "config");
                // `protocol: http`'s `config.authenticationStrategy` named the connector.
                let config = match m.get("config") {
                    Some(Value::Mapping(c))
                        if c.contains_key("authenticationStrategy")
                            && m.get("connector")
                                .and_then(Value::as_str)
                                .is_none_or(str::is_empty)
                            && m.get("protocol").and_then(Value::as_str) == Some("http") =>
                    {
                        let mut c = c.clone();
                        c.remove("authenticationStrategy");
                        Some(Value::Mapping(c))
                    }
                    v => v.filter(|v| !v.is_null()).cloned(),
                };
                let settings = (kind.parse)(
                    self,
                    &ConnectorBlock {
                        path: &config_path,
                        service_path: path,
                        name: &written,
                        value: config.as_ref(),
                        intercept: &intercept,
                        credentials: &given,
                        authentication: &authentication,
                    },
                );
                if let [first, ..] = kind.upstream_credentials
                    && !intercept_given
                    && !kind.upstream_credentials.iter().any(|c| given.contains(*c))
                {
                    let alternatives: String = kind.upstream_credentials[1..]
                        .iter()
                        .map(|c| format!(" or \"{c}\""))
                        .collect();
                    self.err(
                        &creds_path,
                        format!(
                            "missing \"{first}\"{alternatives} (the upstream server; required \
                             for a service without \"intercept\")"
                        ),
                    );
                }
                ConnectorSpec::Built {
                    kind: kind.kind(),
                    settings: settings?,
                }
            }
        };
        Some(Service {
            name,
            connector,
            listen_on,
            intercept,
            credentials: credentials.map(|(c, _)| c).unwrap_or_default(),
            authentication: authentication.into_iter().map(|(_, a)| a).collect(),
            cache,
            unix_socket,
            policy,
        })
    }

    /// A service's `cache: {ttl, staleFor}` block.
    fn cache_override(&mut self, path: &str, v: Option<&Value>) -> CacheOverride {
        let mut out = CacheOverride::default();
        let p = join(path, "cache");
        let Some(v) = v.filter(|v| !v.is_null()) else {
            return out;
        };
        let Some(m) = self.map(&p, v, "a map {ttl, staleFor}") else {
            return out;
        };
        self.keys(&p, m, &["ttl", "staleFor"]);
        if let Some(v) = m.get("ttl") {
            out.ttl = self.duration(&join(&p, "ttl"), v);
        }
        if let Some(v) = m.get("staleFor") {
            out.stale_for = self.duration(&join(&p, "staleFor"), v);
        }
        out
    }

    /// The service's connector kind: a built one (with its name as written), or a known
    /// name not built yet.
    fn connector(&mut self, path: &str, m: &Mapping) -> Option<Named> {
        // Secretless: `protocol` is the deprecated name of `connector`; an empty value
        // (as its own marshaller writes `protocol: ""`) is no value; `connector` wins.
        let given = |k: &str| {
            m.get(k)
                .filter(|v| !matches!(v, Value::String(s) if s.is_empty()))
        };
        let (key, v) = match (given("connector"), given("protocol")) {
            (Some(c), p) => {
                if p.is_some() {
                    self.warn(
                        &join(path, "protocol"),
                        "deprecated Secretless key, ignored: \"connector\" is also set and wins",
                    );
                }
                ("connector", c)
            }
            (None, Some(p)) => {
                self.warn(
                    &join(path, "protocol"),
                    "deprecated Secretless key: read as \"connector\"",
                );
                ("protocol", p)
            }
            (None, None) => {
                self.err(path, "missing \"connector\"");
                return None;
            }
        };
        let cpath = join(path, key);
        let mut name = self.non_empty(&cpath, v)?;
        if key == "protocol" && name == "http" {
            // Secretless v2's legacy HTTP form: the connector is the config's
            // `authenticationStrategy`.
            let spath = join(path, "config.authenticationStrategy");
            let strategy = match m.get("config") {
                Some(Value::Mapping(c)) => c.get("authenticationStrategy"),
                _ => None,
            };
            let Some(sv) = strategy else {
                self.err(
                    &spath,
                    "missing: `protocol: http` takes its connector from \
                     config.authenticationStrategy (aws, basic_auth or conjur)",
                );
                return None;
            };
            let strategy = self.non_empty(&spath, sv)?;
            if !["aws", "basic_auth", "conjur"].contains(&strategy.as_str()) {
                let shown = self.shown(&spath, &strategy);
                self.err(
                    &spath,
                    format!("unknown authenticationStrategy {shown} (aws, basic_auth or conjur)"),
                );
                return None;
            }
            name = strategy;
        }
        if let Some(k) = self
            .kinds
            .built
            .iter()
            .find(|k| k.names.contains(&name.as_str()))
        {
            return Some(Named::Built(*k, name));
        }
        if self.kinds.not_built.contains(&name.as_str()) {
            return Some(Named::NotBuilt(name));
        }
        let known: Vec<&str> = (self.kinds.built.iter())
            .flat_map(|k| k.names.iter().copied())
            .chain(self.kinds.not_built.iter().copied())
            .collect();
        let shown = self.shown(&cpath, &name);
        let plugin = if self.lenient {
            "; Secretless Go plugin connectors are not supported"
        } else {
            ""
        };
        self.err(
            &cpath,
            format!(
                "unknown connector {shown} (known: {}){plugin}",
                quoted_list(&known)
            ),
        );
        None
    }

    fn intercept(&mut self, path: &str, v: Option<&Value>) -> Vec<InterceptTarget> {
        let ipath = join(path, "intercept");
        let items: Vec<(String, &Value)> = match v {
            None | Some(Value::Null) => return Vec::new(),
            Some(Value::Sequence(seq)) => seq
                .iter()
                .enumerate()
                .map(|(i, x)| (index(&ipath, i), x))
                .collect(),
            Some(v @ Value::String(_)) => vec![(ipath.clone(), v)],
            Some(_) => {
                self.err(
                    &ipath,
                    "must be a list of HOST:PORT, IP:PORT, [IPV6]:PORT or CIDR:PORT",
                );
                return Vec::new();
            }
        };
        let mut out: Vec<InterceptTarget> = Vec::new();
        for (p, x) in items {
            let Some(s) = self.text(&p, x) else { continue };
            match values::intercept_target(s.trim()) {
                Ok(t) => {
                    if let Some((_, other)) = self.seen_targets.iter().find(|(x, _)| *x == t) {
                        let msg = format!("the same target is also listed at {other}");
                        self.err(&p, msg);
                    } else {
                        self.seen_targets.push((t.clone(), p));
                        out.push(t);
                    }
                }
                Err(reason) => {
                    let shown = self.shown(&p, &s);
                    self.err(&p, format!("invalid target {shown}: {reason}"));
                }
            }
        }
        out
    }

    // ---- credentials -----------------------------------------------------------------

    /// The valid credentials and the names of all given ones (valid or not); `None`
    /// when the block was unreadable (errors recorded).
    fn credentials(
        &mut self,
        path: &str,
        v: Option<&Value>,
        names: &mut ProviderNames<'_>,
    ) -> Option<(BTreeMap<String, CredentialSource>, BTreeSet<String>)> {
        let cpath = join(path, "credentials");
        let mut out = BTreeMap::new();
        let mut given = BTreeSet::new();
        match v {
            None | Some(Value::Null) => {}
            Some(Value::Mapping(m)) => {
                for (k, cv) in m {
                    let Some(name) = key_text(k) else {
                        self.err(&cpath, "credential names must be strings");
                        continue;
                    };
                    let p = join(&cpath, &name);
                    // As Secretless: an empty value, or an empty `get`, is no credential.
                    let empty = |v: Option<&Value>, lenient: bool| match v {
                        Some(Value::String(s)) => s.is_empty(),
                        Some(Value::Null) => lenient,
                        _ => false,
                    };
                    let unset = match cv {
                        Value::Mapping(cm) => empty(cm.get("get"), self.lenient),
                        v => empty(Some(v), self.lenient),
                    };
                    if unset {
                        continue;
                    }
                    given.insert(name.clone());
                    let src = match cv {
                        Value::Mapping(cm) => self.credential_source(&p, cm, false, names),
                        Value::Sequence(_) => {
                            self.err(
                                &p,
                                "must be a value or {from: PROVIDER, get: ID}, not a list",
                            );
                            None
                        }
                        // Literal. `text` never echoes the value.
                        v => self
                            .text(&p, v)
                            .map(|s| CredentialSource::Literal(s.into())),
                    };
                    if let Some(src) = src {
                        out.insert(name, src);
                    }
                }
            }
            Some(Value::Sequence(seq)) => {
                for (i, item) in seq.iter().enumerate() {
                    let p = index(&cpath, i);
                    let Some(cm) = self.map(&p, item, "a credential: {name, provider, get}") else {
                        continue;
                    };
                    let name = match cm.get("name") {
                        Some(nv) => self.non_empty(&join(&p, "name"), nv),
                        None => {
                            self.err(&p, "missing \"name\"");
                            None
                        }
                    };
                    let src = self.credential_source(&p, cm, true, names);
                    if let Some(name) = name {
                        if !given.insert(name.clone()) {
                            self.err(&join(&p, "name"), format!("duplicate credential {name:?}"));
                        } else if let Some(src) = src {
                            out.insert(name, src);
                        }
                    }
                }
            }
            Some(_) => {
                self.err(
                    &cpath,
                    "must be a map of name -> value or {from, get}, or a list of {name, \
                     provider, get}",
                );
                return None;
            }
        }
        Some((out, given))
    }

    /// `{from|provider: P, get: ID}` (plus `name` in the list shape).
    fn credential_source(
        &mut self,
        path: &str,
        m: &Mapping,
        list_shape: bool,
        names: &mut ProviderNames<'_>,
    ) -> Option<CredentialSource> {
        self.keys(
            path,
            m,
            if list_shape {
                &["name", "provider", "from", "get"]
            } else {
                &["from", "provider", "get"]
            },
        );
        let (pkey, pv) = match (m.get("from"), m.get("provider")) {
            (Some(_), Some(_)) => {
                self.err(
                    path,
                    "set either \"from\" or \"provider\" (they mean the same), not both",
                );
                return None;
            }
            (Some(v), None) => ("from", v),
            (None, Some(v)) => ("provider", v),
            (None, None) => {
                self.err(
                    path,
                    format!(
                        "missing \"{}\" (the provider name: {}, or a configured instance)",
                        if list_shape { "provider" } else { "from" },
                        quoted_list(BUILT_PROVIDERS)
                    ),
                );
                return None;
            }
        };
        let ppath = join(path, pkey);
        let provider = self.non_empty(&ppath, pv);
        let get = match m.get("get") {
            // The id of a literal is the secret itself: never echoed.
            Some(v) => self.non_empty(&join(path, "get"), v),
            None => {
                self.err(path, "missing \"get\" (what to fetch from the provider)");
                None
            }
        };
        let provider = provider?;
        let kind = match names.configured.get(&provider) {
            Some(cfg) => Some(cfg),
            None if NOT_BUILT_PROVIDERS.contains(&provider.as_str()) => {
                names.implicit.insert(provider.clone());
                None
            }
            None => {
                let shown = self.shown(&ppath, &provider);
                let configured: Vec<&str> = names
                    .configured
                    .keys()
                    .map(String::as_str)
                    .filter(|k| !BUILT_PROVIDERS.contains(k))
                    .collect();
                let mut msg = format!(
                    "unknown provider {shown} (built in: {}",
                    quoted_list(BUILT_PROVIDERS)
                );
                if !configured.is_empty() {
                    msg.push_str(&format!("; configured: {}", quoted_list(&configured)));
                }
                msg.push_str("; not built yet: ");
                msg.push_str(&quoted_list(NOT_BUILT_PROVIDERS));
                msg.push(')');
                self.err(&ppath, msg);
                return None;
            }
        };
        let get = get?;
        Some(match kind {
            Some(ProviderConfig::Literal) => CredentialSource::Literal(Secret::from(get)),
            _ => CredentialSource::Provider { provider, id: get },
        })
    }

    // ---- authentication --------------------------------------------------------------

    /// The valid entries, each with the key path of its `config:` block.
    fn authentication(&mut self, path: &str, v: Option<&Value>) -> Vec<(String, AuthMethod)> {
        let apath = join(path, "authentication");
        let seq = match v {
            None | Some(Value::Null) => return Vec::new(),
            Some(Value::Sequence(seq)) => seq,
            Some(_) => {
                self.err(&apath, "must be a list of {type, config}");
                return Vec::new();
            }
        };
        let mut out = Vec::new();
        for (i, item) in seq.iter().enumerate() {
            let p = index(&apath, i);
            let Some(m) = self.map(&p, item, "an authentication entry: {type, config}") else {
                continue;
            };
            self.keys(&p, m, &["type", "config"]);
            let Some(tv) = m.get("type") else {
                self.err(&p, "missing \"type\" (known: \"oauth2\")");
                continue;
            };
            let tpath = join(&p, "type");
            let Some(kind) = self.non_empty(&tpath, tv) else {
                continue;
            };
            match kind.as_str() {
                "oauth2" => {
                    let cpath = join(&p, "config");
                    if let Some(c) = self.oauth2(&cpath, m.get("config")) {
                        out.push((cpath, AuthMethod::OAuth2(c)));
                    }
                }
                _ => {
                    let shown = self.shown(&tpath, &kind);
                    self.err(
                        &tpath,
                        format!("unknown authentication type {shown} (known: \"oauth2\")"),
                    );
                }
            }
        }
        out
    }

    fn oauth2(&mut self, path: &str, v: Option<&Value>) -> Option<OAuth2Config> {
        const KEYS: &[&str] = &[
            "token_url",
            "client_id",
            "client_secret",
            "scope",
            "audience",
            "client_auth",
            "params",
            "default_lifetime",
            "timeout",
        ];
        let Some(v) = v else {
            self.err(
                path,
                "missing: oauth2 needs config {token_url, client_id, client_secret}",
            );
            return None;
        };
        let m = self.map(
            path,
            v,
            "a map {token_url, client_id, client_secret, scope, ...}",
        )?;
        self.keys(path, m, KEYS);
        let field = |l: &mut Self, key: &str| match m.get(key) {
            Some(v) => l.non_empty(&join(path, key), v),
            None => {
                l.err(path, format!("missing \"{key}\""));
                None
            }
        };
        let token_url = field(self, "token_url");
        let client_id = field(self, "client_id");
        // Literal or `${VAR}`; `non_empty` never echoes it.
        let client_secret = field(self, "client_secret");
        let optional = |l: &mut Self, key: &str| match m.get(key) {
            Some(v) => l.text(&join(path, key), v),
            None => None,
        };
        let scope = optional(self, "scope");
        let audience = optional(self, "audience");
        let client_auth = match m.get("client_auth") {
            None => OAuth2ClientAuth::Basic,
            Some(v) => {
                let p = join(path, "client_auth");
                match self.text(&p, v).as_deref() {
                    None => OAuth2ClientAuth::Basic,
                    Some("basic") => OAuth2ClientAuth::Basic,
                    Some("body") => OAuth2ClientAuth::Body,
                    Some(other) => {
                        let shown = self.shown(&p, other);
                        self.err(
                            &p,
                            format!(
                                "unknown client_auth {shown} (accepted: \"basic\": HTTP Basic, \
                                 the default; \"body\": client_id and client_secret in the \
                                 request body; RFC 6749 2.3.1)"
                            ),
                        );
                        OAuth2ClientAuth::Basic
                    }
                }
            }
        };
        let mut params = Vec::new();
        if let Some(v) = m.get("params") {
            let p = join(path, "params");
            if let Some(pm) = self.map(&p, v, "a map of parameter name: value") {
                for (k, pv) in pm {
                    let Some(name) = k.as_str() else {
                        self.err(&p, "parameter names must be strings");
                        continue;
                    };
                    if name.is_empty() {
                        self.err(&p, "a parameter name must not be empty");
                        continue;
                    }
                    if let Some(value) = self.text(&join(&p, name), pv) {
                        params.push((name.to_owned(), value));
                    }
                }
            }
        }
        let positive = |l: &mut Self, key: &str| {
            let p = join(path, key);
            let d = l.duration(&p, m.get(key)?)?;
            if d.is_zero() {
                l.err(&p, "must be more than 0");
                return None;
            }
            Some(d)
        };
        let default_lifetime = positive(self, "default_lifetime");
        let timeout = positive(self, "timeout");
        // With the three required values, the entry is kept even when an optional key
        // was wrong (that error fails the load): the connector's own checks still run,
        // so one run reports every problem.
        Some(OAuth2Config {
            token_url: token_url?,
            client_id: client_id?,
            client_secret: Secret::from(client_secret?),
            scope,
            audience,
            client_auth,
            params,
            default_lifetime,
            timeout,
        })
    }
}
