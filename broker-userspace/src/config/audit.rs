//! `broker.audit`: where the audit log (one JSON line per credential access and per
//! policy decision) is written, and the key of its `version_hmac`. See
//! docs/OPERATIONS.md, "Audit log".
//!
//! ```yaml
//! broker:
//!   audit:
//!     file: /var/log/broker/audit.log   # or `stdout: true`
//!     maxSize: 10MiB                    # rotate above this size (file only)
//!     keep: 5                           # audit.log.1 .. audit.log.5 (file only)
//!     hmacKey: /var/lib/broker/audit.key   # or `off` (the default)
//! ```
//!
//! `audit: off` (or no `audit:`) writes no audit file; the `audit` events of the
//! daemon's own log stay either way.

use std::path::PathBuf;

use yaml_serde::Value;

use super::{Loader, join};

/// The keys of the `broker.audit` block.
pub const KEYS: &[&str] = &["file", "stdout", "maxSize", "keep", "hmacKey"];

/// `maxSize` when not set.
pub const DEFAULT_MAX_SIZE: u64 = 10 << 20;
/// `keep` when not set.
pub const DEFAULT_KEEP: u32 = 5;
/// The smallest `maxSize`: a few lines.
pub const MIN_MAX_SIZE: u64 = 1024;
/// The largest `maxSize` (1 TiB).
pub const MAX_MAX_SIZE: u64 = 1 << 40;
/// The most rotated files `keep` may ask for.
pub const MAX_KEEP: u32 = 1000;

const WHAT: &str = "a map {file | stdout, maxSize, keep, hmacKey}, or off";

/// `broker.audit`.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct AuditSettings {
    pub sink: AuditSink,
    /// `hmacKey`: the key file of `version_hmac` (created on first use); `None`: off.
    pub hmac_key: Option<PathBuf>,
}

/// Where the audit lines go.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum AuditSink {
    /// Nowhere but the daemon's log (its `audit` events).
    #[default]
    Off,
    /// The daemon's standard output.
    Stdout,
    /// A file, rotated at `max_size` bytes into `PATH.1` .. `PATH.keep`.
    File {
        path: PathBuf,
        max_size: u64,
        keep: u32,
    },
}

/// Parse `broker.audit` (`v`: its value, if present).
pub(super) fn broker(l: &mut Loader<'_>, v: Option<&Value>) -> AuditSettings {
    const P: &str = "broker.audit";
    let mut out = AuditSettings::default();
    let m = match v {
        None | Some(Value::Null | Value::Bool(false)) => return out,
        Some(Value::String(s)) if s == "off" => return out,
        Some(v) => match l.map(P, v, WHAT) {
            Some(m) => m,
            None => return out,
        },
    };
    l.keys(P, m, KEYS);
    let file = m.get("file").and_then(|v| absolute(l, &join(P, "file"), v));
    let stdout = m
        .get("stdout")
        .and_then(|v| l.boolean(&join(P, "stdout"), v))
        .unwrap_or(false);
    let max_size = m
        .get("maxSize")
        .and_then(|v| size(l, &join(P, "maxSize"), v));
    let keep = m.get("keep").and_then(|v| {
        l.uint(
            &join(P, "keep"),
            v,
            u64::from(MAX_KEEP),
            "a number of rotated files",
        )
        .and_then(|n| u32::try_from(n).ok())
    });
    out.sink = match (file, stdout) {
        (Some(_), true) => {
            l.err(P, "set `file` or `stdout: true`, not both");
            AuditSink::Off
        }
        (Some(path), false) => AuditSink::File {
            path,
            max_size: max_size.unwrap_or(DEFAULT_MAX_SIZE),
            keep: keep.unwrap_or(DEFAULT_KEEP),
        },
        (None, true) => AuditSink::Stdout,
        (None, false) => AuditSink::Off,
    };
    if !matches!(out.sink, AuditSink::File { .. }) {
        for key in ["maxSize", "keep"] {
            if m.contains_key(key) && !m.contains_key("file") {
                l.err(
                    &join(P, key),
                    "applies only to an audit `file` (rotation by size)",
                );
            }
        }
    }
    if let Some(v) = m.get("hmacKey") {
        let p = join(P, "hmacKey");
        out.hmac_key = match v {
            Value::Bool(false) => None,
            Value::String(s) if s == "off" => None,
            v => absolute(l, &p, v),
        };
        if out.hmac_key.is_some() && !m.contains_key("file") && !stdout {
            l.err(
                &p,
                "needs an audit sink (`file` or `stdout: true`): version_hmac is written \
                 only there",
            );
        }
    }
    if !m.contains_key("file") && !m.contains_key("stdout") {
        l.err(
            P,
            "say where the audit lines go: `file: /PATH` or `stdout: true` (or `audit: off`)",
        );
    }
    out
}

/// An absolute path.
fn absolute(l: &mut Loader<'_>, p: &str, v: &Value) -> Option<PathBuf> {
    let s = l.non_empty(p, v)?;
    if !s.starts_with('/') {
        let shown = l.shown(p, &s);
        l.err(p, format!("must be an absolute path, not {shown}"));
        return None;
    }
    Some(PathBuf::from(s))
}

/// A size in bytes: a YAML integer, or text with a unit (`10MiB`, `512KiB`, `1GiB`;
/// decimal `kB`, `MB`, `GB`; `B` or none for bytes).
fn size(l: &mut Loader<'_>, p: &str, v: &Value) -> Option<u64> {
    let s = l.text(p, v)?;
    match parse_size(&s) {
        Ok(n) if (MIN_MAX_SIZE..=MAX_MAX_SIZE).contains(&n) => Some(n),
        Ok(_) => {
            l.err(
                p,
                format!("must be between {MIN_MAX_SIZE} bytes (1KiB) and 1TiB"),
            );
            None
        }
        Err(reason) => {
            let shown = l.shown(p, &s);
            l.err(p, format!("invalid size {shown}: {reason}"));
            None
        }
    }
}

/// `10MiB` -> 10485760 (see [`size`]).
///
/// # Errors
/// What is wrong with the text.
pub fn parse_size(s: &str) -> Result<u64, String> {
    const UNITS: &[(&str, u64)] = &[
        ("KiB", 1 << 10),
        ("MiB", 1 << 20),
        ("GiB", 1 << 30),
        ("TiB", 1 << 40),
        ("kB", 1_000),
        ("KB", 1_000),
        ("MB", 1_000_000),
        ("GB", 1_000_000_000),
        ("TB", 1_000_000_000_000),
        ("B", 1),
    ];
    let s = s.trim();
    let digits = s.bytes().take_while(u8::is_ascii_digit).count();
    if digits == 0 {
        return Err("a number of bytes, with a unit such as 10MiB or 512KiB".into());
    }
    let (num, unit) = s.split_at(digits);
    let n: u64 = num.parse().map_err(|_| "number too large".to_owned())?;
    let unit = unit.trim();
    let mult = if unit.is_empty() {
        1
    } else {
        UNITS
            .iter()
            .find(|(u, _)| *u == unit)
            .map(|(_, m)| *m)
            .ok_or_else(|| format!("unknown unit {unit:?} (KiB, MiB, GiB, kB, MB, GB or B)"))?
    };
    n.checked_mul(mult).ok_or_else(|| "too large".to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{ConfigErrors, load_str_with_env};

    const SVC: &str = "services:\n  db:\n    connector: tcp\n    listenOn: tcp://127.0.0.1:2000\n    credentials:\n      host: 127.0.0.1\n      port: 5432\n";

    fn load(audit: &str) -> Result<crate::config::Config, ConfigErrors> {
        load_str_with_env(
            &format!("version: 2\nbroker:\n  audit: {audit}\n{SVC}"),
            &|_| None,
            &crate::connector::KINDS,
        )
    }

    fn errors(audit: &str) -> Vec<String> {
        load(audit)
            .expect_err("config fails")
            .0
            .iter()
            .map(ToString::to_string)
            .collect()
    }

    #[test]
    fn sizes() {
        assert_eq!(parse_size("10MiB"), Ok(10 << 20));
        assert_eq!(parse_size("512 KiB"), Ok(512 << 10));
        assert_eq!(parse_size("2GB"), Ok(2_000_000_000));
        assert_eq!(parse_size("4096"), Ok(4096));
        assert_eq!(parse_size("4096B"), Ok(4096));
        assert!(parse_size("MiB").is_err());
        assert!(parse_size("10 parsecs").is_err());
        assert!(parse_size("99999999999999999999").is_err());
        assert!(parse_size("20000000TiB").is_err());
    }

    #[test]
    fn a_file_with_rotation_and_a_key() {
        let cfg = load("{file: /var/log/broker/audit.log, maxSize: 1MiB, keep: 3, hmacKey: /var/lib/broker/audit.key}").unwrap();
        assert_eq!(
            cfg.broker.audit,
            AuditSettings {
                sink: AuditSink::File {
                    path: "/var/log/broker/audit.log".into(),
                    max_size: 1 << 20,
                    keep: 3
                },
                hmac_key: Some("/var/lib/broker/audit.key".into()),
            }
        );
        let cfg = load("{file: /a.log}").unwrap();
        assert_eq!(
            cfg.broker.audit.sink,
            AuditSink::File {
                path: "/a.log".into(),
                max_size: DEFAULT_MAX_SIZE,
                keep: DEFAULT_KEEP
            }
        );
        assert_eq!(cfg.broker.audit.hmac_key, None);
    }

    #[test]
    fn stdout_and_off() {
        let cfg = load("{stdout: true, hmacKey: off}").unwrap();
        assert_eq!(cfg.broker.audit.sink, AuditSink::Stdout);
        assert_eq!(cfg.broker.audit.hmac_key, None);
        for off in ["off", "false", "null"] {
            assert_eq!(load(off).unwrap().broker.audit, AuditSettings::default());
        }
        let cfg = load_str_with_env(
            &format!("version: 2\n{SVC}"),
            &|_| None,
            &crate::connector::KINDS,
        )
        .unwrap();
        assert_eq!(cfg.broker.audit, AuditSettings::default());
    }

    #[test]
    fn mistakes_are_reported_at_their_key() {
        let e = errors("{file: /a.log, stdout: true}");
        assert!(
            e.iter().any(|e| e.starts_with("broker.audit: set `file`")),
            "{e:?}"
        );
        let e = errors("{file: audit.log}");
        assert!(
            e.iter()
                .any(|e| e.starts_with("broker.audit.file: must be an absolute path")),
            "{e:?}"
        );
        let e = errors("{stdout: true, maxSize: 1MiB, keep: 2}");
        assert!(
            e.iter()
                .any(|e| e.starts_with("broker.audit.maxSize: applies only"))
                && e.iter()
                    .any(|e| e.starts_with("broker.audit.keep: applies only")),
            "{e:?}"
        );
        let e = errors("{file: /a.log, maxSize: 10, keep: 5000}");
        assert!(
            e.iter()
                .any(|e| e.starts_with("broker.audit.maxSize: must be between"))
                && e.iter()
                    .any(|e| e.starts_with("broker.audit.keep: must be")),
            "{e:?}"
        );
        let e = errors("{file: /a.log, maxSize: lots}");
        assert!(
            e.iter()
                .any(|e| e.starts_with("broker.audit.maxSize: invalid size")),
            "{e:?}"
        );
        let e = errors("{hmacKey: /k}");
        assert!(
            e.iter()
                .any(|e| e.starts_with("broker.audit.hmacKey: needs")),
            "{e:?}"
        );
        assert!(
            e.iter().any(|e| e.starts_with("broker.audit: say where")),
            "{e:?}"
        );
        let e = errors("{file: /a.log, rotate: daily}");
        assert!(
            e.iter()
                .any(|e| e.starts_with("broker.audit.rotate: unknown key")),
            "{e:?}"
        );
        let e = errors("yes please");
        assert!(
            e.iter().any(|e| e.starts_with("broker.audit: must be")),
            "{e:?}"
        );
    }
}
