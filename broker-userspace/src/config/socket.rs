//! `unixSocket: {mode, user, group}`: the socket file of a `listenOn: unix:///PATH`
//! listener. `broker.unixSocket` applies to every such listener; a service's own
//! `unixSocket` overrides it key by key. Names of users and groups are looked up when the
//! daemon starts (the file may be checked on another machine).
//!
//! Also the checks of a `unix://` path that only matter for sockets: it fits in a socket
//! address and names a file, not a directory.

use yaml_serde::{Mapping, Value};

use super::{
    Loader, join,
    model::{ListenAddr, SocketOwner, UnixSocketOptions},
};

/// The keys of a `unixSocket` block.
pub const KEYS: &[&str] = &["mode", "user", "group"];

/// The longest path a Unix socket can be bound at: `sun_path` holds 108 bytes, the
/// terminating NUL included.
pub const MAX_SOCKET_PATH: usize = 107;

const WHAT: &str = "a map {mode, user, group}";

/// `broker.unixSocket`.
pub(super) fn broker(l: &mut Loader<'_>, v: Option<&Value>) -> UnixSocketOptions {
    block(l, "broker.unixSocket", v)
}

/// A service's `unixSocket` (at `service_path`, map `m`), and the socket checks of its
/// `listenOn` (`listen_on`: what it parsed to, `None` when absent or invalid).
pub(super) fn service(
    l: &mut Loader<'_>,
    service_path: &str,
    m: &Mapping,
    listen_on: Option<&ListenAddr>,
) -> UnixSocketOptions {
    if let Some(ListenAddr::Unix(p)) = listen_on {
        let lp = join(service_path, "listenOn");
        let text = p.to_string_lossy();
        if text.ends_with('/') {
            l.err(
                &lp,
                "a unix socket path must name a file, not a directory: unix:///dir/name.sock",
            );
        } else if text.len() > MAX_SOCKET_PATH {
            l.err(
                &lp,
                format!(
                    "the unix socket path is {} bytes long; a socket address holds at most \
                     {MAX_SOCKET_PATH}",
                    text.len()
                ),
            );
        }
    }
    let p = join(service_path, "unixSocket");
    let v = m.get("unixSocket").filter(|v| !v.is_null());
    // Meaningless on a TCP listener or without one (an invalid listenOn is reported
    // already).
    let tcp_or_none = match (m.get("listenOn"), listen_on) {
        (None, _) => true,
        (Some(_), Some(ListenAddr::Tcp(_))) => true,
        (Some(_), _) => false,
    };
    if v.is_some() && tcp_or_none {
        l.err(
            &p,
            "applies only to a service with `listenOn: unix:///PATH` (the socket file's \
             mode and owner)",
        );
    }
    block(l, &p, v)
}

fn block(l: &mut Loader<'_>, p: &str, v: Option<&Value>) -> UnixSocketOptions {
    let mut out = UnixSocketOptions::default();
    let Some(v) = v.filter(|v| !v.is_null()) else {
        return out;
    };
    let Some(m) = l.map(p, v, WHAT) else {
        return out;
    };
    l.keys(p, m, KEYS);
    if let Some(v) = m.get("mode") {
        out.mode = mode(l, &join(p, "mode"), v);
    }
    if let Some(v) = m.get("user") {
        out.user = owner(l, &join(p, "user"), v, "user");
    }
    if let Some(v) = m.get("group") {
        out.group = owner(l, &join(p, "group"), v, "group");
    }
    out
}

/// Permission bits written in octal, quoted (`"0660"`, `"660"`, `"0o660"`): a YAML
/// integer would be read as decimal by some readers and octal by others.
fn mode(l: &mut Loader<'_>, p: &str, v: &Value) -> Option<u32> {
    const HINT: &str = "must be permission bits in octal, quoted: \"0660\"";
    if matches!(v, Value::Number(_)) {
        l.err(
            p,
            format!("{HINT} (a YAML number is ambiguous: 0660 reads as decimal 660 in YAML 1.2)"),
        );
        return None;
    }
    let s = l.text(p, v)?;
    let digits = s.strip_prefix("0o").unwrap_or(&s);
    match u32::from_str_radix(digits, 8) {
        Ok(n) if !digits.is_empty() && n <= 0o777 => Some(n),
        _ => {
            let shown = l.shown(p, &s);
            l.err(p, format!("invalid mode {shown}: {HINT}, at most \"0777\""));
            None
        }
    }
}

/// A user or group: a number, or a name.
fn owner(l: &mut Loader<'_>, p: &str, v: &Value, what: &str) -> Option<SocketOwner> {
    let s = l.text(p, v)?;
    let s = s.trim();
    if !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit()) {
        return match s.parse::<u32>() {
            Ok(n) if n != u32::MAX => Some(SocketOwner::Id(n)),
            _ => {
                l.err(
                    p,
                    format!("must be a {what} name or a numeric id below 4294967295"),
                );
                None
            }
        };
    }
    let valid = !s.is_empty()
        && s.len() <= 256
        && !s
            .chars()
            .any(|c| c.is_control() || c.is_whitespace() || c == ':' || c == '/');
    if !valid {
        let shown = l.shown(p, s);
        l.err(
            p,
            format!("invalid {what} {shown}: expected a {what} name or a numeric id"),
        );
        return None;
    }
    Some(SocketOwner::Name(s.to_owned()))
}
