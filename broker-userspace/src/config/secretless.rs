//! Secretless Broker's file formats, as its users have them: which dialect a file is
//! written in, version 1 files (`listeners:` / `handlers:`) converted to the version 2
//! model exactly as Secretless' own converter does (`pkg/secretless/config/v1/
//! v2_conversion.go`), and the Kubernetes objects Secretless reads that we do not.
//!
//! A file in Secretless' dialect uses no key of ours. It is read with Secretless'
//! leniency: unknown keys are warnings, and `$` is kept as written (Secretless expands no
//! variables). A file that uses any key of ours is read as strictly as ever.

use yaml_serde::{Mapping, Value};

use super::ConfigError;

/// How strictly a file is read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Dialect {
    /// Only Secretless' keys (and keys neither of us knows): lenient, no `${VAR}`.
    Secretless,
    /// At least one key of ours: strict, `${VAR}` expanded.
    Ours,
}

/// Top-level keys only we define.
const OUR_TOP_KEYS: &[&str] = &["providers", "broker"];
/// Service keys only we define (`name` is the list shape's, which is ours as a whole).
const OUR_SERVICE_KEYS: &[&str] = &[
    "intercept",
    "cache",
    "authentication",
    "unixSocket",
    "allow",
    "deny",
    "schedule",
    "rateLimit",
];

/// The dialect of a version 2 file.
pub(super) fn dialect(root: &Mapping) -> Dialect {
    let ours = |m: &Mapping, keys: &[&str]| keys.iter().any(|k| m.contains_key(*k));
    if ours(root, OUR_TOP_KEYS) {
        return Dialect::Ours;
    }
    let services = match root.get("services") {
        Some(Value::Mapping(m)) => m,
        // A list of services is the user's shape, not Secretless'.
        Some(Value::Sequence(_)) => return Dialect::Ours,
        _ => return Dialect::Secretless,
    };
    for svc in services.values() {
        let Value::Mapping(s) = svc else { continue };
        if ours(s, OUR_SERVICE_KEYS) {
            return Dialect::Ours;
        }
        // `{provider: P, get: ID}` is our spelling of Secretless' `{from: P, get: ID}`.
        if let Some(Value::Mapping(creds)) = s.get("credentials")
            && creds
                .values()
                .any(|c| matches!(c, Value::Mapping(c) if c.contains_key("provider")))
        {
            return Dialect::Ours;
        }
    }
    Dialect::Secretless
}

/// A Kubernetes object (`apiVersion` + `kind`) instead of a configuration: what it is, for
/// the message.
pub(super) fn kubernetes_object(root: &Mapping) -> Option<String> {
    let (Some(Value::String(api)), Some(Value::String(kind))) =
        (root.get("apiVersion"), root.get("kind"))
    else {
        return None;
    };
    Some(format!("{kind} ({api})"))
}

/// Whether the file is a Secretless version 1 configuration: `version: 1`, or no
/// `version` and a `listeners:` or `handlers:` key (Secretless reads a file without a
/// version as version 1).
pub(super) fn is_v1(root: &Mapping) -> bool {
    match root.get("version") {
        Some(Value::Number(n)) => n.as_u64() == Some(1) || n.as_f64() == Some(1.0),
        Some(Value::String(s)) => s.trim() == "1",
        None => root.contains_key("listeners") || root.contains_key("handlers"),
        _ => false,
    }
}

/// A version 1 file as the version 2 tree Secretless' converter makes of it, and that
/// tree as YAML for the warning (literal credential values replaced: the warning is
/// logged).
///
/// As Secretless: each listener becomes one service per handler attached to it (only
/// the first handler for a non-HTTP listener), named after the handler; `address`
/// becomes `tcp://ADDRESS` and `socket` `unix://SOCKET`; an `http` listener's handler
/// type `http/X` is the connector `X` and its `match` list `authenticateURLsMatching`;
/// each `{name, provider, id}` credential becomes `name: {from: provider, get: id}`.
///
/// # Errors
/// What Secretless' v1 validation rejects, with `listeners[i]` / `handlers[j]` paths.
pub(super) fn convert_v1(root: &Mapping) -> Result<(Value, String), Vec<ConfigError>> {
    let mut errors = Vec::new();
    let listeners = seq(root, "listeners", &mut errors);
    let handlers = seq(root, "handlers", &mut errors);
    if !errors.is_empty() {
        return Err(errors);
    }
    let text = |m: &Mapping, k: &str| match m.get(k) {
        Some(Value::String(s)) => s.clone(),
        Some(Value::Number(n)) => n.to_string(),
        _ => String::new(),
    };
    let mut listener_maps = Vec::new();
    for (i, l) in listeners.iter().enumerate() {
        let path = format!("listeners[{i}]");
        let Value::Mapping(l) = l else {
            errors.push(ConfigError::new(
                path,
                "must be a map {name, protocol, address|socket}",
            ));
            continue;
        };
        let name = text(l, "name");
        if name.is_empty() {
            errors.push(ConfigError::new(
                format!("{path}.name"),
                "missing (required)",
            ));
        }
        match (text(l, "address").is_empty(), text(l, "socket").is_empty()) {
            (true, true) => {
                errors.push(ConfigError::new(&path, "needs \"address\" or \"socket\""));
            }
            (false, false) => errors.push(ConfigError::new(
                &path,
                "only one of \"address\" or \"socket\" may be given",
            )),
            _ => {}
        }
        listener_maps.push((path, l));
    }
    let mut handler_maps = Vec::new();
    for (j, h) in handlers.iter().enumerate() {
        let path = format!("handlers[{j}]");
        let Value::Mapping(h) = h else {
            errors.push(ConfigError::new(
                path,
                "must be a map {name, listener, credentials}",
            ));
            continue;
        };
        for k in ["name", "listener"] {
            if text(h, k).is_empty() {
                errors.push(ConfigError::new(
                    format!("{path}.{k}"),
                    "missing (required)",
                ));
            }
        }
        let linked = text(h, "listener");
        if !linked.is_empty() && !listener_maps.iter().any(|(_, l)| text(l, "name") == linked) {
            errors.push(ConfigError::new(
                format!("{path}.listener"),
                format!("has no associated listener (no listener is named {linked:?})"),
            ));
        }
        handler_maps.push((path, h));
    }
    for (path, l) in &listener_maps {
        let name = text(l, "name");
        if !handler_maps
            .iter()
            .any(|(_, h)| text(h, "listener") == name)
        {
            errors.push(ConfigError::new(path.clone(), "has no associated handler"));
        }
    }
    if !errors.is_empty() {
        return Err(errors);
    }

    let mut services = Mapping::new();
    let mut shown = Mapping::new();
    for (_, l) in &listener_maps {
        let protocol = text(l, "protocol");
        let address = text(l, "address");
        let listen_on = if address.is_empty() {
            format!("unix://{}", text(l, "socket"))
        } else {
            format!("tcp://{address}")
        };
        let linked = handler_maps
            .iter()
            .filter(|(_, h)| text(h, "listener") == text(l, "name"));
        let take = if protocol == "http" { usize::MAX } else { 1 };
        for (hpath, h) in linked.take(take) {
            let mut svc = Mapping::new();
            let mut connector = protocol.clone();
            if protocol == "http" {
                let kind = text(h, "type");
                connector = kind.strip_prefix("http/").unwrap_or(&kind).to_owned();
            }
            svc.insert("connector".into(), Value::String(connector));
            svc.insert("listenOn".into(), Value::String(listen_on.clone()));
            let (creds, creds_shown) = credentials(hpath, h, &mut errors);
            let mut svc_shown = svc.clone();
            svc.insert("credentials".into(), Value::Mapping(creds));
            svc_shown.insert("credentials".into(), Value::Mapping(creds_shown));
            if protocol == "http" {
                let mut config = Mapping::new();
                let matching = match h.get("match") {
                    Some(Value::Sequence(s)) => Value::Sequence(s.clone()),
                    Some(v @ Value::String(_)) => Value::Sequence(vec![v.clone()]),
                    _ => Value::Sequence(Vec::new()),
                };
                config.insert("authenticateURLsMatching".into(), matching);
                svc.insert("config".into(), Value::Mapping(config.clone()));
                svc_shown.insert("config".into(), Value::Mapping(config));
            }
            let name = Value::String(text(h, "name"));
            services.insert(name.clone(), Value::Mapping(svc));
            shown.insert(name, Value::Mapping(svc_shown));
        }
    }
    if !errors.is_empty() {
        return Err(errors);
    }
    let wrap = |services: Mapping| {
        let mut root = Mapping::new();
        root.insert("version".into(), Value::String("2".into()));
        root.insert("services".into(), Value::Mapping(services));
        Value::Mapping(root)
    };
    let rendered = yaml_serde::to_string(&wrap(shown)).unwrap_or_default();
    Ok((wrap(services), rendered))
}

/// The list at `key` (absent or null: empty).
fn seq<'a>(root: &'a Mapping, key: &str, errors: &mut Vec<ConfigError>) -> &'a [Value] {
    match root.get(key) {
        None | Some(Value::Null) => {
            errors.push(ConfigError::new(
                key,
                "missing: a version 1 file needs listeners and handlers",
            ));
            &[]
        }
        Some(Value::Sequence(s)) if s.is_empty() => {
            errors.push(ConfigError::new(key, "must not be empty"));
            &[]
        }
        Some(Value::Sequence(s)) => s,
        Some(_) => {
            errors.push(ConfigError::new(key, "must be a list"));
            &[]
        }
    }
}

/// A v1 handler's `credentials: [{name, provider, id}]` as v2 `name: {from, get}`, and
/// the same with literal ids replaced for display.
fn credentials(path: &str, h: &Mapping, errors: &mut Vec<ConfigError>) -> (Mapping, Mapping) {
    let mut out = Mapping::new();
    let mut shown = Mapping::new();
    let items = match h.get("credentials") {
        None | Some(Value::Null) => return (out, shown),
        Some(Value::Sequence(s)) => s,
        Some(_) => {
            errors.push(ConfigError::new(
                format!("{path}.credentials"),
                "must be a list of {name, provider, id}",
            ));
            return (out, shown);
        }
    };
    for (i, c) in items.iter().enumerate() {
        let cpath = format!("{path}.credentials[{i}]");
        let Value::Mapping(c) = c else {
            errors.push(ConfigError::new(
                cpath,
                "must be a map {name, provider, id}",
            ));
            continue;
        };
        let Some(name) = c.get("name").filter(|n| !n.is_null()).cloned() else {
            errors.push(ConfigError::new(
                format!("{cpath}.name"),
                "missing (required)",
            ));
            continue;
        };
        let provider = c.get("provider").cloned().unwrap_or(Value::Null);
        let id = c.get("id").cloned().unwrap_or(Value::Null);
        let literal = provider.as_str() == Some("literal");
        let mut m = Mapping::new();
        m.insert("from".into(), provider.clone());
        m.insert("get".into(), id);
        let mut s = m.clone();
        if literal {
            s.insert(
                "get".into(),
                Value::String("(the literal value from the version 1 file)".into()),
            );
        }
        out.insert(name.clone(), Value::Mapping(m));
        shown.insert(name, Value::Mapping(s));
    }
    (out, shown)
}
