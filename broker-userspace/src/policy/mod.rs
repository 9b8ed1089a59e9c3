//! Policy: who may use a service's credentials, when, and how often; live revocation.
//!
//! A service's policy (`allow`, `deny`, `schedule`, `rateLimit` in its configuration,
//! [`Spec`]) is compiled once per configuration snapshot into an [`Engine`]; every
//! connection's caller is then decided on before anything is dialled or fetched:
//!
//! 1. a live revocation ([`Revocations`], `broker revoke`) that selects the caller;
//! 2. `deny` rules: the first that matches denies;
//! 3. `allow` rules: when the list exists, a caller no rule matches is denied;
//! 4. `schedule`: outside every window, denied;
//! 5. `rateLimit`: per caller, then per service (GCRA, `governor`).
//!
//! A rule matches when all its keys do; a key with a list matches when any item does.
//! Identity comes from the kernel (the redirect record: uid, gid, cgroup, pid; the
//! executable and command from `/proc` at accept time), or from `SO_PEERCRED` for a
//! `listenOn: unix://` client. Where a fact is unknown (a TCP `listenOn` client: the
//! broker does not identify it), the decision fails closed: an `allow` rule that needs
//! the fact does not match, a `deny` rule or a revocation that needs it does.
//!
//! Evaluation never allocates on the allow path except for the rate limiter's per-caller
//! key; its cost is measured by `cargo xtask bench policy`.

mod revoke;
mod window;

use std::{
    hash::{Hash as _, Hasher as _},
    num::NonZeroU32,
    path::Path,
    time::Duration,
};

use globset::{Glob, GlobBuilder, GlobSet, GlobSetBuilder};
use governor::{DefaultDirectRateLimiter, DefaultKeyedRateLimiter, Quota};
pub use jiff::Timestamp;
pub use revoke::{Revocation, Revocations, Selector};
pub use window::Window;

/// A user or group as written: a number, or a name resolved when the policy is built.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum IdSpec {
    Id(u32),
    Name(String),
}

/// One rule as configured. Empty lists are keys not given.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct RuleSpec {
    /// `name:`, or `allow[N]` / `deny[N]`.
    pub name: String,
    /// Where it is in the service: `allow[N]` / `deny[N]`.
    pub at: String,
    pub uid: Vec<IdSpec>,
    pub gid: Vec<IdSpec>,
    /// Globs over the caller's cgroup path (`/system.slice/app.service`, `/kubepods/**`).
    pub cgroup: Vec<String>,
    /// systemd units: the caller's cgroup path has a component of this name.
    pub unit: Vec<String>,
    /// Globs over the executable's path, as the kernel knows it (`/proc/PID/exe`).
    pub exe: Vec<String>,
    /// Command names (`/proc/PID/comm`).
    pub comm: Vec<String>,
    /// Windows in which the rule applies.
    pub when: Vec<Window>,
}

/// `N` events per period.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rate {
    pub count: u32,
    pub per: Duration,
}

impl std::fmt::Display for Rate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let unit = match self.per.as_secs() {
            1 => "s",
            60 => "min",
            _ => "h",
        };
        write!(f, "{}/{unit}", self.count)
    }
}

/// A service's `rateLimit:` block: new connections (each one credential access).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RateSpec {
    pub per_caller: Option<Rate>,
    pub per_service: Option<Rate>,
}

/// A service's policy as configured.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Spec {
    /// `allow:` (when present, default deny).
    pub allow: Option<Vec<RuleSpec>>,
    pub deny: Vec<RuleSpec>,
    /// `schedule:`: the windows in which the service may be used at all.
    pub schedule: Vec<Window>,
    pub rate: RateSpec,
}

impl Spec {
    /// Whether the service has any policy at all.
    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.allow.is_none()
            && self.deny.is_empty()
            && self.schedule.is_empty()
            && self.rate == RateSpec::default()
    }
}

/// Who is calling, as far as it is known.
#[derive(Debug, Clone, Copy, Default)]
pub struct Identity<'a> {
    pub pid: Option<u32>,
    pub uid: Option<u32>,
    pub gid: Option<u32>,
    /// The cgroup path (`/system.slice/app.service`).
    pub cgroup: Option<&'a str>,
    pub exe: Option<&'a Path>,
    pub comm: Option<&'a str>,
}

/// The decision on one connection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// Allowed; by this `allow` rule when the service has a list.
    Allowed { rule: Option<String> },
    /// Denied by `rule` (a rule's name, `no allow rule`, `schedule`, `rateLimit`,
    /// `revoked #N`), for `reason`.
    Denied { rule: String, reason: String },
}

impl Outcome {
    fn denied(rule: impl Into<String>, reason: impl Into<String>) -> Self {
        Self::Denied {
            rule: rule.into(),
            reason: reason.into(),
        }
    }
}

/// What [`Engine::build`] refuses: where (`allow[N].key`, relative to the service) and
/// why.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{at}.{key}: {message}")]
pub struct BuildError {
    pub at: String,
    pub key: &'static str,
    pub message: String,
}

/// A compiled rule.
struct Rule {
    name: String,
    uid: Vec<u32>,
    gid: Vec<u32>,
    cgroup: Option<GlobSet>,
    unit: Vec<String>,
    exe: Option<GlobSet>,
    comm: Vec<String>,
    when: Vec<Window>,
}

/// Whether a key matches: `Some(true/false)`, or `None` when the fact is unknown.
fn key<T>(want: &[T], have: Option<impl FnOnce(&[T]) -> bool>) -> Option<bool> {
    if want.is_empty() {
        return Some(true);
    }
    have.map(|f| f(want))
}

impl Rule {
    fn build(spec: &RuleSpec) -> Result<Self, BuildError> {
        let err = |key, message: String| BuildError {
            at: spec.at.clone(),
            key,
            message,
        };
        let ids = |list: &[IdSpec], group: bool, k: &'static str| {
            list.iter()
                .map(|i| match i {
                    IdSpec::Id(n) => Ok(*n),
                    IdSpec::Name(name) => match crate::sys::lookup_id(name, group) {
                        Ok(Some(n)) => Ok(n),
                        Ok(None) => Err(err(
                            k,
                            format!(
                                "no {} named {name:?} on this host",
                                if group { "group" } else { "user" }
                            ),
                        )),
                        Err(e) => Err(err(k, format!("looking up {name:?}: {e}"))),
                    },
                })
                .collect::<Result<Vec<u32>, _>>()
        };
        Ok(Self {
            name: spec.name.clone(),
            uid: ids(&spec.uid, false, "uid")?,
            gid: ids(&spec.gid, true, "gid")?,
            cgroup: globs(&spec.cgroup).map_err(|e| err("cgroup", e))?,
            unit: spec.unit.clone(),
            exe: globs(&spec.exe).map_err(|e| err("exe", e))?,
            comm: spec.comm.clone(),
            when: spec.when.clone(),
        })
    }

    /// All keys: `Some(true)` when every key matches, `Some(false)` when one does not,
    /// `None` when none fails but some fact is unknown.
    fn matches(&self, who: &Identity<'_>, now: Timestamp) -> Option<bool> {
        let checks = [
            key(&self.uid, who.uid.map(|u| move |w: &[u32]| w.contains(&u))),
            key(&self.gid, who.gid.map(|g| move |w: &[u32]| w.contains(&g))),
            match (&self.cgroup, who.cgroup) {
                (None, _) => Some(true),
                (Some(g), Some(c)) => Some(g.is_match(c)),
                (Some(_), None) => None,
            },
            key(
                &self.unit,
                who.cgroup.map(|c| {
                    move |w: &[String]| c.split('/').any(|part| w.iter().any(|u| u == part))
                }),
            ),
            match (&self.exe, who.exe) {
                (None, _) => Some(true),
                (Some(g), Some(e)) => Some(g.is_match(e)),
                (Some(_), None) => None,
            },
            key(
                &self.comm,
                who.comm
                    .map(|c| move |w: &[String]| w.iter().any(|x| x == c)),
            ),
            Some(self.when.is_empty() || self.when.iter().any(|w| w.contains(now))),
        ];
        if checks.contains(&Some(false)) {
            Some(false)
        } else if checks.contains(&None) {
            None
        } else {
            Some(true)
        }
    }
}

/// Globs as one set: `*` stays within a path component, `**` crosses them.
fn globs(list: &[String]) -> Result<Option<GlobSet>, String> {
    if list.is_empty() {
        return Ok(None);
    }
    let mut b = GlobSetBuilder::new();
    for g in list {
        b.add(glob(g)?);
    }
    b.build().map(Some).map_err(|e| e.to_string())
}

/// One glob, as rules take it.
///
/// # Errors
/// The glob's syntax error.
pub fn glob(g: &str) -> Result<Glob, String> {
    GlobBuilder::new(g)
        .literal_separator(true)
        .build()
        .map_err(|e| format!("invalid glob {g:?}: {}", e.kind()))
}

/// The most callers the per-caller rate limiter remembers before it forgets the idle
/// ones (and, past that, treats the excess as one caller).
const MAX_CALLERS: usize = 10_000;

fn quota(r: Rate) -> Quota {
    let n = NonZeroU32::new(r.count.max(1)).unwrap_or(NonZeroU32::MIN);
    let period = (r.per / n.get()).max(Duration::from_nanos(1));
    Quota::with_period(period)
        .unwrap_or_else(|| Quota::per_second(n))
        .allow_burst(n)
}

/// A service's compiled policy.
pub struct Engine {
    allow: Option<Vec<Rule>>,
    deny: Vec<Rule>,
    schedule: Vec<Window>,
    rate: RateSpec,
    per_caller: Option<DefaultKeyedRateLimiter<u64>>,
    per_service: Option<DefaultDirectRateLimiter>,
}

impl std::fmt::Debug for Engine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Engine")
            .field("allow", &self.allow.as_ref().map(Vec::len))
            .field("deny", &self.deny.len())
            .field("schedule", &self.schedule)
            .field("rate", &self.rate)
            .finish()
    }
}

impl Engine {
    /// Compile `spec` (`None` when it is empty: nothing to decide).
    ///
    /// # Errors
    /// A user or group name that does not exist here, an invalid glob.
    pub fn build(spec: &Spec) -> Result<Option<Self>, BuildError> {
        if spec.is_empty() {
            return Ok(None);
        }
        let rules = |list: &[RuleSpec]| list.iter().map(Rule::build).collect::<Result<Vec<_>, _>>();
        Ok(Some(Self {
            allow: spec.allow.as_deref().map(rules).transpose()?,
            deny: rules(&spec.deny)?,
            schedule: spec.schedule.clone(),
            rate: spec.rate,
            per_caller: spec
                .rate
                .per_caller
                .map(|r| governor::RateLimiter::keyed(quota(r))),
            per_service: spec
                .rate
                .per_service
                .map(|r| governor::RateLimiter::direct(quota(r))),
        }))
    }

    /// Decide on one connection of `who` at `now` (steps 2 to 5 of the module's list;
    /// the caller checks revocations first).
    pub fn decide(&self, who: &Identity<'_>, now: Timestamp) -> Outcome {
        for r in &self.deny {
            match r.matches(who, now) {
                Some(true) => return Outcome::denied(&r.name, "a deny rule matches the caller"),
                None => {
                    return Outcome::denied(
                        &r.name,
                        "a deny rule may match: the caller's identity is not known here",
                    );
                }
                Some(false) => {}
            }
        }
        let mut by = None;
        if let Some(allow) = &self.allow {
            match allow.iter().find(|r| r.matches(who, now) == Some(true)) {
                Some(r) => by = Some(r.name.clone()),
                None => {
                    return Outcome::denied(
                        "no allow rule",
                        if who.uid.is_none() {
                            "the service has an allow list and the caller's identity is not known here"
                        } else {
                            "the service has an allow list and no rule matches the caller"
                        },
                    );
                }
            }
        }
        if !self.schedule.is_empty() && !self.schedule.iter().any(|w| w.contains(now)) {
            return Outcome::denied("schedule", "outside the service's time windows");
        }
        if let (Some(l), Some(r)) = (&self.per_caller, self.rate.per_caller) {
            if l.len() > MAX_CALLERS {
                l.retain_recent();
            }
            let k = if l.len() > MAX_CALLERS {
                0
            } else {
                caller_key(who)
            };
            if l.check_key(&k).is_err() {
                return Outcome::denied(
                    "rateLimit",
                    format!("more than {r} new connections from this caller"),
                );
            }
        }
        if let (Some(l), Some(r)) = (&self.per_service, self.rate.per_service)
            && l.check().is_err()
        {
            return Outcome::denied(
                "rateLimit",
                format!("more than {r} new connections to the service"),
            );
        }
        Outcome::Allowed { rule: by }
    }
}

/// A caller, for the per-caller rate limit: its user, cgroup and executable.
fn caller_key(who: &Identity<'_>) -> u64 {
    let mut h = std::collections::hash_map::DefaultHasher::new();
    who.uid.hash(&mut h);
    who.cgroup.hash(&mut h);
    who.exe.hash(&mut h);
    // 0 is the overflow bucket.
    h.finish().max(1)
}

#[cfg(test)]
mod tests;
