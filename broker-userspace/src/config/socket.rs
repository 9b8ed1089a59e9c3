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

/// Permission bits in octal, as `chmod` takes them, quoted: `"0660"`, `"660"`,
/// `"0o660"`. A YAML number is refused: `0o660` and `432` are the same number to the
/// YAML reader, so its digits cannot be trusted to be octal. (An unquoted `0660` is text
/// to our reader, and accepted.)
fn mode(l: &mut Loader<'_>, p: &str, v: &Value) -> Option<u32> {
    const HINT: &str = "must be permission bits in octal, such as \"0660\"";
    if matches!(v, Value::Number(_)) {
        l.err(
            p,
            format!("{HINT}, quoted (a YAML number's digits may not be octal: 0o660 reads as 432)"),
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

#[cfg(test)]
mod tests {
    use crate::config::{ConfigErrors, SocketOwner, UnixSocketOptions, load_str_with_env};

    fn load(yaml: &str) -> Result<crate::config::Config, ConfigErrors> {
        load_str_with_env(yaml, &|_| None, &crate::connector::KINDS)
    }

    fn errors(yaml: &str) -> Vec<String> {
        load(yaml)
            .expect_err("config fails")
            .0
            .iter()
            .map(ToString::to_string)
            .collect()
    }

    const SVC: &str = "services:\n  db:\n    connector: tcp\n    listenOn: unix:///run/app/db.sock\n    credentials:\n      host: 127.0.0.1\n      port: 5432\n";

    #[test]
    fn broker_block_applies_and_the_service_block_overrides_it_key_by_key() {
        let cfg = load(&format!(
            "version: 2\nbroker:\n  unixSocket:\n    mode: \"0660\"\n    group: app\n{SVC}    unixSocket:\n      group: 1234\n      user: \"0\"\n"
        ))
        .expect("loads");
        assert_eq!(
            cfg.broker.unix_socket,
            UnixSocketOptions {
                mode: Some(0o660),
                user: None,
                group: Some(SocketOwner::Name("app".into())),
            }
        );
        let s = &cfg.services[0];
        assert_eq!(
            s.unix_socket.over(&cfg.broker.unix_socket),
            UnixSocketOptions {
                mode: Some(0o660),
                user: Some(SocketOwner::Id(0)),
                group: Some(SocketOwner::Id(1234)),
            }
        );
        // Nothing set: Secretless' mode (0777 less the umask), owner the daemon's.
        let cfg = load(&format!("version: 2\n{SVC}")).expect("loads");
        let o = cfg.services[0].unix_socket.over(&cfg.broker.unix_socket);
        assert_eq!(
            (o.mode(), o.user, o.group),
            (0o777 & !crate::sys::umask(), None, None)
        );
    }

    #[test]
    fn modes_are_quoted_octal_up_to_0777() {
        for (text, want) in [
            ("\"0660\"", 0o660),
            ("\"600\"", 0o600),
            ("\"0o777\"", 0o777),
            ("0660", 0o660),
        ] {
            let cfg = load(&format!(
                "version: 2\nbroker:\n  unixSocket: {{mode: {text}}}\n{SVC}"
            ))
            .expect("loads");
            assert_eq!(cfg.broker.unix_socket.mode, Some(want), "{text}");
        }
        for (text, says) in [
            ("660", "quoted"),
            ("0o660", "quoted"),
            ("\"0999\"", "invalid mode \"0999\""),
            ("\"01777\"", "at most \"0777\""),
            ("\"rw-rw----\"", "invalid mode"),
            ("\"\"", "invalid mode"),
        ] {
            let e = errors(&format!(
                "version: 2\nbroker:\n  unixSocket: {{mode: {text}}}\n{SVC}"
            ));
            assert!(
                e.len() == 1 && e[0].starts_with("broker.unixSocket.mode: ") && e[0].contains(says),
                "{text}: {e:?}"
            );
        }
    }

    #[test]
    fn owners_keys_and_placement_are_checked() {
        let e = errors(&format!(
            "version: 2\nbroker:\n  unixSocket: {{user: \"a b\", group: \"x:y\", mdoe: \"0600\"}}\n{SVC}"
        ));
        assert!(
            e.iter()
                .any(|e| e.starts_with("broker.unixSocket.user: invalid user"))
                && e.iter()
                    .any(|e| e.starts_with("broker.unixSocket.group: invalid group"))
                && e.iter()
                    .any(|e| e.starts_with("broker.unixSocket.mdoe: unknown key")
                        && e.contains("did you mean \"mode\"")),
            "{e:?}"
        );
        // On a TCP listener, or without one, a service's block means nothing: an error.
        let e = errors(
            "version: 2\nservices:\n  db:\n    connector: tcp\n    listenOn: tcp://127.0.0.1:7000\n    unixSocket: {mode: \"0600\"}\n    credentials:\n      host: 127.0.0.1\n",
        );
        assert!(
            e.len() == 1
                && e[0].starts_with("services.db.unixSocket: applies only to a service with `listenOn: unix:///PATH`"),
            "{e:?}"
        );
        // In the list shape too.
        let cfg = load(
            "version: 2\nservices:\n  - name: db\n    connector: tcp\n    listenOn: unix:///run/db.sock\n    unixSocket: {mode: \"0600\"}\n    credentials:\n      host: 127.0.0.1\n      port: 1\n",
        )
        .expect("loads");
        assert_eq!(cfg.services[0].unix_socket.mode, Some(0o600));
    }

    #[test]
    fn socket_paths_must_fit_and_name_a_file() {
        let long = format!("/run/{}.sock", "x".repeat(110));
        let e = errors(&format!(
            "version: 2\nservices:\n  db:\n    connector: tcp\n    listenOn: unix://{long}\n    credentials:\n      host: 127.0.0.1\n      port: 1\n"
        ));
        assert!(
            e.len() == 1
                && e[0].starts_with("services.db.listenOn: the unix socket path is 120 bytes long"),
            "{e:?}"
        );
        let e = errors(
            "version: 2\nservices:\n  db:\n    connector: tcp\n    listenOn: unix:///run/sock/\n    credentials:\n      host: 127.0.0.1\n      port: 1\n",
        );
        assert!(
            e.len() == 1 && e[0].contains("must name a file, not a directory"),
            "{e:?}"
        );
    }
}
