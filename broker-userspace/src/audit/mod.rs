//! The audit log: one JSON line per credential access and per policy decision, written
//! by a dedicated sink (a file rotated by size, or standard output; `broker.audit`),
//! apart from the daemon's own log. Never a value, never a token: a secret appears as
//! its (redacted) id and, with `hmacKey`, as an HMAC of its value (`version_hmac`), so
//! an operator sees that a value changed without seeing it (as Vault's audit device
//! does with its salted HMACs).
//!
//! Two kinds of line (schema: docs/OPERATIONS.md, "Audit log"):
//! * `event: "credential"`: written by the secret store for every id of every lookup
//!   ([`AuditLog::credential`]), cache hits included; beside the store's `audit` event
//!   in the daemon's log (one per lookup), which stays whether or not a sink is set.
//! * `event: "decision"`: a policy decision ([`AuditLog::decision`]), for the policy
//!   work: it writes the line and the daemon-log event both.
//!
//! Writing never blocks a connection: a line is formatted by the caller, then handed to
//! the sink's writer thread through a bounded queue ([`sink`]); a full queue drops the
//! line and counts it ([`AuditLog::dropped`]); the count is written into the audit file
//! itself (`event: "audit_dropped"`) and warned about in the daemon's log as soon as
//! the writer can.
//!
//! The handle is cheap to clone; [`AuditLog::off`] (the default) writes nothing.

mod sink;

use std::{
    fmt::Write as _,
    io::{self, Read as _, Write as _},
    os::unix::fs::{DirBuilderExt as _, MetadataExt as _, OpenOptionsExt as _},
    path::Path,
    sync::Arc,
    time::Duration,
};

use anyhow::Context as _;
use ring::hmac;
use serde_json::{Map, Value};

pub use self::sink::Sink;
use crate::{
    config::{AuditSettings, AuditSink},
    connector::Caller,
};

/// Bytes of a key file `hmacKey` creates.
pub const HMAC_KEY_LEN: usize = 32;
/// Sizes of key file accepted when it exists (an operator's own key, e.g. one shared by
/// a fleet so their HMACs compare).
const HMAC_KEY_MIN: u64 = 16;
const HMAC_KEY_MAX: u64 = 4096;

/// The audit log's handle (see the module docs).
#[derive(Clone, Default)]
pub struct AuditLog {
    inner: Option<Arc<Inner>>,
}

struct Inner {
    sink: Sink,
    hmac: Option<hmac::Key>,
}

impl std::fmt::Debug for AuditLog {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AuditLog")
            .field("sink", &self.inner.as_ref().map(|i| i.sink.describe()))
            .field(
                "hmac",
                &self.inner.as_ref().is_some_and(|i| i.hmac.is_some()),
            )
            .finish()
    }
}

/// One credential access: one id of one lookup (see [`AuditLog::credential`]).
#[derive(Debug, Clone, Copy)]
pub struct CredentialAccess<'a> {
    pub service: &'a str,
    pub caller: Option<&'a Caller>,
    pub provider: &'a str,
    /// The secret's id as it may be shown (already redacted; `***` when the id is the
    /// value itself, as with the `literal` provider).
    pub secret: &'a str,
    /// The service's credential names the id is fetched for.
    pub credentials: &'a [&'a str],
    /// The cache was bypassed (after the upstream rejected cached credentials).
    pub fresh: bool,
    /// How the cache answered (`hit`, `miss`, `joined`, `stale`); `None` when no
    /// cache was asked (an unknown provider).
    pub cache: Option<&'static str>,
    /// `ok`, or the error's kind (`not_found`, `unreachable`, ...).
    pub result: &'static str,
    /// The error's message (never a value: [`crate::secrets::SecretError`]).
    pub error: Option<&'a str>,
    /// For a stale value: how long past its TTL.
    pub stale_age: Option<Duration>,
    /// The lookup's time, cache included.
    pub latency: Duration,
    /// The value, for `version_hmac` only; never written.
    pub value: Option<&'a [u8]>,
}

/// A policy decision (see [`AuditLog::decision`]).
#[derive(Debug, Clone, Copy)]
pub struct Decision<'a> {
    pub service: &'a str,
    pub caller: Option<&'a Caller>,
    /// Where the caller was connecting (intercepted connections).
    pub destination: Option<std::net::SocketAddr>,
    /// The connection may proceed.
    pub allowed: bool,
    /// The rule that decided (its name or position), `None` for the default.
    pub rule: Option<&'a str>,
    /// Why, in a few words (never a value).
    pub reason: Option<&'a str>,
}

impl AuditLog {
    /// No sink: nothing is written (the daemon log's `audit` events remain).
    #[must_use]
    pub fn off() -> Self {
        Self::default()
    }

    /// The audit log `settings` ask for: the sink's file opened (created 0600) and its
    /// writer thread started, the HMAC key read or created.
    ///
    /// # Errors
    /// A file or key that cannot be opened, created or trusted, naming it.
    pub fn open(settings: &AuditSettings) -> anyhow::Result<Self> {
        let sink = match &settings.sink {
            AuditSink::Off => return Ok(Self::off()),
            AuditSink::Stdout => Sink::stdout().context("starting the audit writer")?,
            AuditSink::File {
                path,
                max_size,
                keep,
            } => Sink::file(path, *max_size, *keep)
                .with_context(|| format!("broker.audit.file {}", path.display()))?,
        };
        let hmac = match &settings.hmac_key {
            None => None,
            Some(p) => Some(
                load_or_create_key(p)
                    .with_context(|| format!("broker.audit.hmacKey {}", p.display()))?,
            ),
        };
        tracing::info!(
            sink = %sink.describe(),
            version_hmac = hmac.is_some(),
            "audit log open"
        );
        Ok(Self {
            inner: Some(Arc::new(Inner { sink, hmac })),
        })
    }

    /// Whether lines are written anywhere.
    #[must_use]
    pub fn enabled(&self) -> bool {
        self.inner.is_some()
    }

    /// Write the line of one credential access (nothing without a sink).
    pub fn credential(&self, e: &CredentialAccess<'_>) {
        let Some(inner) = &self.inner else {
            return;
        };
        let mut l = Line::new("credential");
        l.field("service", e.service);
        l.field("caller", caller_json(e.caller));
        l.field("provider", e.provider);
        l.field("secret", e.secret);
        l.field(
            "credentials",
            Value::Array(e.credentials.iter().map(|&c| Value::from(c)).collect()),
        );
        l.field("fresh", e.fresh);
        l.field("cache", e.cache);
        l.field("result", e.result);
        l.field("error", e.error);
        l.field(
            "stale_age_ms",
            e.stale_age
                .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX)),
        );
        l.field("latency_ms", millis(e.latency));
        if let (Some(key), Some(v)) = (&inner.hmac, e.value) {
            l.field("version_hmac", version_hmac(key, v));
        }
        inner.sink.push(l.finish());
    }

    /// A policy decision: one `audit` event in the daemon's log and, with a sink, one
    /// line (`event: "decision"`). The hook of the policy work: call it once per
    /// decision, allow or deny.
    pub fn decision(&self, d: &Decision<'_>) {
        let c = d.caller;
        let result = if d.allowed { "allow" } else { "deny" };
        tracing::info!(
            target: "audit",
            service = %d.service,
            caller.pid = c.map(|c| c.pid),
            caller.uid = c.map(|c| c.uid),
            caller.gid = c.map(|c| c.gid),
            caller.cgroup = c.map(|c| c.cgroup_id),
            caller.cgroup_path = c.and_then(|c| c.cgroup.as_deref()).map(|p| p.display()).map(tracing::field::display),
            caller.comm = c.map(|c| c.comm.as_str()),
            caller.exe = c.and_then(|c| c.exe.as_deref()).map(|p| p.display()).map(tracing::field::display),
            dst.addr = d.destination.map(tracing::field::display),
            rule = d.rule,
            reason = d.reason,
            result,
            "policy decision"
        );
        let Some(inner) = &self.inner else {
            return;
        };
        let mut l = Line::new("decision");
        l.field("service", d.service);
        l.field("caller", caller_json(d.caller));
        l.field("destination", d.destination.map(|a| a.to_string()));
        l.field("result", result);
        l.field("rule", d.rule);
        l.field("reason", d.reason);
        inner.sink.push(l.finish());
    }

    /// Lines dropped so far because the queue was full (the writer or its output too
    /// slow), for metrics.
    #[must_use]
    pub fn dropped(&self) -> u64 {
        self.inner.as_ref().map_or(0, |i| i.sink.dropped())
    }

    /// Lines the output refused so far (a full disk...), for metrics.
    #[must_use]
    pub fn failed(&self) -> u64 {
        self.inner.as_ref().map_or(0, |i| i.sink.failed())
    }

    /// Wait (at most `timeout`) until every line queued so far is written: at exit.
    pub fn flush(&self, timeout: Duration) {
        if let Some(i) = &self.inner {
            i.sink.flush(timeout);
        }
    }
}

/// Milliseconds with microsecond precision.
fn millis(d: Duration) -> f64 {
    let us = u64::try_from(d.as_micros()).unwrap_or(u64::MAX);
    #[allow(clippy::cast_precision_loss)]
    let ms = us as f64 / 1000.0;
    ms
}

/// `hmac-sha256:<hex>` of `value` under `key` (Vault's audit format).
fn version_hmac(key: &hmac::Key, value: &[u8]) -> String {
    let tag = hmac::sign(key, value);
    let mut out = String::with_capacity(12 + 64);
    out.push_str("hmac-sha256:");
    for b in tag.as_ref() {
        let _ = write!(out, "{b:02x}");
    }
    out
}

/// The caller as JSON (`null` when unknown, e.g. a TCP `listenOn` client).
fn caller_json(c: Option<&Caller>) -> Value {
    let Some(c) = c else {
        return Value::Null;
    };
    let path = |p: Option<&Path>| p.map(|p| p.to_string_lossy().into_owned());
    let mut m = Map::new();
    m.insert("pid".into(), c.pid.into());
    m.insert("uid".into(), c.uid.into());
    m.insert("gid".into(), c.gid.into());
    m.insert("cgroup".into(), path(c.cgroup.as_deref()).into());
    m.insert("cgroup_id".into(), c.cgroup_id.into());
    m.insert("comm".into(), c.comm.as_str().into());
    m.insert("thread".into(), c.thread.as_str().into());
    m.insert("exe".into(), path(c.exe.as_deref()).into());
    Value::Object(m)
}

/// One JSON object written field by field, `time` and `event` first.
struct Line(String);

impl Line {
    fn new(event: &str) -> Self {
        let mut l = Self(String::with_capacity(512));
        l.0.push('{');
        l.field("time", rfc3339_now());
        l.field("event", event);
        l
    }

    fn field(&mut self, key: &str, value: impl Into<Value>) {
        if self.0.len() > 1 {
            self.0.push(',');
        }
        let _ = write!(self.0, "{}:{}", Value::from(key), value.into());
    }

    fn finish(mut self) -> Vec<u8> {
        self.0.push_str("}\n");
        self.0.into_bytes()
    }
}

/// Now, UTC, RFC 3339 with fractional seconds (`2026-12-01T10:00:00.123456789Z`).
fn rfc3339_now() -> String {
    time::OffsetDateTime::now_utc()
        .format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_default()
}

/// The HMAC key at `path`: read when it exists (a regular file of 16 to 4096 bytes that
/// only its owner can read), else 32 random bytes written there exclusively with mode
/// 0600 (its directory created 0700 if missing).
fn load_or_create_key(path: &Path) -> anyhow::Result<hmac::Key> {
    match std::fs::symlink_metadata(path) {
        Ok(_) => read_key(path),
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            if let Some(dir) = path.parent() {
                std::fs::DirBuilder::new()
                    .recursive(true)
                    .mode(0o700)
                    .create(dir)
                    .with_context(|| format!("creating {}", dir.display()))?;
            }
            let mut key = zeroize::Zeroizing::new([0u8; HMAC_KEY_LEN]);
            ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), key.as_mut())
                .map_err(|_| anyhow::anyhow!("no random bytes from the system"))?;
            let created = std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .custom_flags(libc::O_NOFOLLOW)
                .open(path);
            match created {
                Ok(mut f) => {
                    f.write_all(key.as_ref())
                        .and_then(|()| f.sync_all())
                        .context("writing the key")?;
                    tracing::info!(key = %path.display(), "created the audit HMAC key");
                    Ok(hmac::Key::new(hmac::HMAC_SHA256, key.as_ref()))
                }
                // Another process created it meanwhile: use theirs.
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists => read_key(path),
                Err(e) => Err(e).context("creating the key"),
            }
        }
        Err(e) => Err(e).context("reading the key"),
    }
}

fn read_key(path: &Path) -> anyhow::Result<hmac::Key> {
    let f = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW)
        .open(path)
        .context("opening the key (a symbolic link is refused)")?;
    let m = f.metadata().context("reading the key")?;
    if !m.is_file() {
        anyhow::bail!("not a regular file");
    }
    if m.mode() & 0o077 != 0 {
        anyhow::bail!("the key is readable or writable by others; chmod 600 it");
    }
    if !(HMAC_KEY_MIN..=HMAC_KEY_MAX).contains(&m.len()) {
        anyhow::bail!(
            "a key must be {HMAC_KEY_MIN} to {HMAC_KEY_MAX} bytes ({} here)",
            m.len()
        );
    }
    let mut key = zeroize::Zeroizing::new(Vec::new());
    f.take(HMAC_KEY_MAX)
        .read_to_end(&mut key)
        .context("reading the key")?;
    Ok(hmac::Key::new(hmac::HMAC_SHA256, &key))
}

#[cfg(test)]
mod tests;
