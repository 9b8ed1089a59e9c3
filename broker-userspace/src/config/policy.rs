//! A service's policy keys: `allow`, `deny` (rules over the caller's identity),
//! `schedule` (time windows) and `rateLimit`. What they mean: [`crate::policy`];
//! reference: docs/CONFIG.md, "Policy".

use std::time::Duration;

use yaml_serde::{Mapping, Value};

use super::{Loader, index, join};
use crate::policy::{IdSpec, Rate, RateSpec, RuleSpec, Spec, Window};

/// The keys of one rule.
const RULE_KEYS: &[&str] = &[
    "name", "uid", "gid", "cgroup", "unit", "exe", "comm", "when",
];

/// Kubernetes identity keys: named, and refused until the pod lookup exists.
const KUBERNETES_KEYS: &[&str] = &["namespace", "podLabels", "serviceAccount", "pod"];

/// The most rules a list may hold.
const MAX_RULES: usize = 256;

/// Parse the policy keys of service map `m` at `path`.
pub(super) fn service(l: &mut Loader<'_>, path: &str, m: &Mapping) -> Spec {
    let mut spec = Spec::default();
    if let Some(v) = m.get("allow").filter(|v| !v.is_null()) {
        spec.allow = Some(rules(l, &join(path, "allow"), "allow", v));
    }
    if let Some(v) = m.get("deny").filter(|v| !v.is_null()) {
        spec.deny = rules(l, &join(path, "deny"), "deny", v);
    }
    if let Some(v) = m.get("schedule").filter(|v| !v.is_null()) {
        let before = l.error_count();
        spec.schedule = windows(l, &join(path, "schedule"), v);
        if spec.schedule.is_empty() && l.error_count() == before {
            l.err(
                &join(path, "schedule"),
                "an empty schedule would deny every connection: remove the key, or list windows",
            );
        }
    }
    if let Some(v) = m.get("rateLimit").filter(|v| !v.is_null()) {
        spec.rate = rate_limit(l, &join(path, "rateLimit"), v);
    }
    spec
}

/// One value or a list of them, as texts (each item at its own path).
fn texts(l: &mut Loader<'_>, p: &str, v: &Value) -> Vec<(String, String)> {
    match v {
        Value::Sequence(items) => items
            .iter()
            .enumerate()
            .filter_map(|(i, item)| {
                let ip = index(p, i);
                l.non_empty(&ip, item).map(|t| (ip, t))
            })
            .collect(),
        _ => l
            .non_empty(p, v)
            .map(|t| (p.to_owned(), t))
            .into_iter()
            .collect(),
    }
}

fn rules(l: &mut Loader<'_>, p: &str, list_name: &str, v: &Value) -> Vec<RuleSpec> {
    let Value::Sequence(items) = v else {
        l.err(
            p,
            "must be a list of rules, e.g. [{uid: 0}, {exe: /usr/bin/psql, cgroup: /system.slice/app.service}]",
        );
        return Vec::new();
    };
    if items.len() > MAX_RULES {
        l.err(p, format!("at most {MAX_RULES} rules"));
        return Vec::new();
    }
    let mut names = std::collections::BTreeSet::new();
    let mut out = Vec::new();
    for (i, item) in items.iter().enumerate() {
        let rp = index(p, i);
        if let Some(r) = rule(l, &rp, &format!("{list_name}[{i}]"), item) {
            if !names.insert(r.name.clone()) {
                l.err(
                    &join(&rp, "name"),
                    format!("another rule is named {:?}", r.name),
                );
            }
            out.push(r);
        }
    }
    out
}

fn rule(l: &mut Loader<'_>, p: &str, default_name: &str, v: &Value) -> Option<RuleSpec> {
    let m = l.map(
        p,
        v,
        "a rule: a map of uid, gid, cgroup, unit, exe, comm, when (and an optional name)",
    )?;
    let all: Vec<&str> = RULE_KEYS.iter().chain(KUBERNETES_KEYS).copied().collect();
    l.keys(p, m, &all);
    let mut r = RuleSpec {
        name: default_name.to_owned(),
        at: default_name.to_owned(),
        ..RuleSpec::default()
    };
    if let Some(v) = m.get("name") {
        r.name = l.non_empty(&join(p, "name"), v)?;
    }
    for k in KUBERNETES_KEYS {
        if m.contains_key(*k) {
            l.err(
                &join(p, k),
                "Kubernetes pod identity is not built yet: select pods by cgroup instead \
                 (cgroup: \"/kubepods.slice/**/*pod<UID>*/**\")",
            );
        }
    }
    for (key, group) in [("uid", false), ("gid", true)] {
        if let Some(v) = m.get(key) {
            let ids: Vec<IdSpec> = texts(l, &join(p, key), v)
                .into_iter()
                .filter_map(|(ip, t)| id(l, &ip, &t, group))
                .collect();
            if key == "uid" {
                r.uid = ids;
            } else {
                r.gid = ids;
            }
        }
    }
    for key in ["cgroup", "exe"] {
        if let Some(v) = m.get(key) {
            let mut globs = Vec::new();
            for (ip, t) in texts(l, &join(p, key), v) {
                if !t.starts_with('/') {
                    l.err(
                        &ip,
                        format!(
                            "must be an absolute path or glob (\"/system.slice/app.service\", \
                             \"/usr/bin/*\"), not {}",
                            l.shown(&ip, &t)
                        ),
                    );
                } else if let Err(e) = crate::policy::glob(&t) {
                    l.err(&ip, e);
                } else {
                    globs.push(t);
                }
            }
            if key == "cgroup" {
                r.cgroup = globs;
            } else {
                r.exe = globs;
            }
        }
    }
    if let Some(v) = m.get("unit") {
        r.unit = texts(l, &join(p, "unit"), v)
            .into_iter()
            .map(|(_, t)| t)
            .collect();
    }
    if let Some(v) = m.get("comm") {
        for (ip, t) in texts(l, &join(p, "comm"), v) {
            if t.len() > 15 {
                l.err(
                    &ip,
                    "a command name is at most 15 bytes (the kernel's comm); use exe for the full path",
                );
            } else {
                r.comm.push(t);
            }
        }
    }
    if let Some(v) = m.get("when") {
        r.when = windows(l, &join(p, "when"), v);
    }
    Some(r)
}

/// A user or group: a number, or a name looked up when the daemon starts.
fn id(l: &mut Loader<'_>, p: &str, t: &str, group: bool) -> Option<IdSpec> {
    if t.bytes().all(|b| b.is_ascii_digit()) {
        return match t.parse::<u32>() {
            Ok(n) if n != u32::MAX => Some(IdSpec::Id(n)),
            _ => {
                l.err(p, "a numeric id must be below 4294967295");
                None
            }
        };
    }
    let valid = t.len() <= 256
        && t.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b'.' | b'$'));
    if valid {
        Some(IdSpec::Name(t.to_owned()))
    } else {
        l.err(
            p,
            format!(
                "must be a {} name or a numeric id",
                if group { "group" } else { "user" }
            ),
        );
        None
    }
}

fn windows(l: &mut Loader<'_>, p: &str, v: &Value) -> Vec<Window> {
    texts(l, p, v)
        .into_iter()
        .filter_map(|(ip, t)| match Window::parse(&t) {
            Ok(w) => Some(w),
            Err(e) => {
                l.err(&ip, e);
                None
            }
        })
        .collect()
}

fn rate_limit(l: &mut Loader<'_>, p: &str, v: &Value) -> RateSpec {
    let mut out = RateSpec::default();
    let Some(m) = l.map(
        p,
        v,
        "a map {perCaller, perService} of rates such as \"5/s\"",
    ) else {
        return out;
    };
    l.keys(p, m, &["perCaller", "perService"]);
    if let Some(v) = m.get("perCaller") {
        out.per_caller = rate(l, &join(p, "perCaller"), v);
    }
    if let Some(v) = m.get("perService") {
        out.per_service = rate(l, &join(p, "perService"), v);
    }
    out
}

/// `N/s`, `N/min`, `N/h`.
fn rate(l: &mut Loader<'_>, p: &str, v: &Value) -> Option<Rate> {
    let t = l.non_empty(p, v)?;
    let parsed = t.split_once('/').and_then(|(n, unit)| {
        let count: u32 = n.trim().parse().ok()?;
        let per = match unit.trim() {
            "s" | "sec" | "second" => Duration::from_secs(1),
            "m" | "min" | "minute" => Duration::from_secs(60),
            "h" | "hour" => Duration::from_secs(3600),
            _ => return None,
        };
        (1..=1_000_000)
            .contains(&count)
            .then_some(Rate { count, per })
    });
    if parsed.is_none() {
        let shown = l.shown(p, &t);
        l.err(
            p,
            format!(
                "invalid rate {shown}: a count from 1 to 1000000 per s, min or h, such as \"5/s\" or \"60/min\""
            ),
        );
    }
    parsed
}

#[cfg(test)]
mod tests {
    use crate::{
        config::{ConfigErrors, load_str_with_env},
        connector::KINDS,
        policy::IdSpec,
    };

    fn load(policy: &str) -> Result<crate::config::Config, ConfigErrors> {
        load_str_with_env(
            &format!(
                "version: 2\nservices:\n  db:\n    connector: tcp\n    intercept: [\"10.0.0.1:5432\"]\n{policy}    credentials:\n      host: 10.0.0.1\n      port: \"5432\"\n"
            ),
            &|_| None,
            &KINDS,
        )
    }

    #[track_caller]
    fn has(e: &ConfigErrors, path: &str, needle: &str) {
        assert!(
            e.0.iter()
                .any(|x| x.path == path && x.message.contains(needle)),
            "no error at {path:?} containing {needle:?}; got:\n{e}"
        );
    }

    #[test]
    fn the_issue_form_and_every_key() {
        let c = load(
            "    allow: [{uid: 0}, {exe: /usr/bin/psql, cgroup: \"/system.slice/app.service\"}]\n    deny:\n      - name: batch\n        uid: [batch, 1001]\n        gid: staff\n        unit: batch.service\n        comm: [cron]\n        when: \"sat,sun 00:00-24:00 UTC\"\n    schedule: [\"mon-fri 08:00-18:00 Europe/Paris\"]\n    rateLimit: {perCaller: 5/s, perService: 600/min}\n",
        )
        .unwrap_or_else(|e| panic!("{e}"));
        let p = &c.services[0].policy;
        let allow = p.allow.as_ref().unwrap();
        assert_eq!(allow.len(), 2);
        assert_eq!(allow[0].name, "allow[0]");
        assert_eq!(allow[0].uid, vec![IdSpec::Id(0)]);
        assert_eq!(allow[1].exe, vec!["/usr/bin/psql".to_owned()]);
        assert_eq!(p.deny[0].name, "batch");
        assert_eq!(
            p.deny[0].uid,
            vec![IdSpec::Name("batch".into()), IdSpec::Id(1001)]
        );
        assert_eq!(p.deny[0].when.len(), 1);
        assert_eq!(p.schedule.len(), 1);
        assert_eq!(p.rate.per_caller.unwrap().to_string(), "5/s");
        assert_eq!(p.rate.per_service.unwrap().to_string(), "600/min");
        assert!(load("").unwrap().services[0].policy.is_empty());
    }

    #[test]
    fn errors_name_their_key_paths() {
        let e = load(
            "    allow:\n      - exe: psql\n        cgroup: \"/a/[\"\n        shell: bash\n      - namespace: prod\n      - {name: x, uid: \"a b\"}\n      - {name: x}\n    deny: {uid: 0}\n    schedule: \"mon 8:00-18:00 UTC\"\n    rateLimit: {perCaller: 5/day, burst: 3}\n",
        )
        .unwrap_err();
        let a = "services.db.allow";
        has(&e, &format!("{a}[0].exe"), "absolute path");
        has(&e, &format!("{a}[0].cgroup"), "invalid glob");
        has(&e, &format!("{a}[0].shell"), "unknown key");
        has(&e, &format!("{a}[1].namespace"), "not built yet");
        has(&e, &format!("{a}[2].uid"), "user name or a numeric id");
        has(&e, &format!("{a}[3].name"), "another rule is named");
        has(&e, "services.db.deny", "must be a list of rules");
        has(&e, "services.db.schedule", "invalid time");
        has(&e, "services.db.rateLimit.perCaller", "invalid rate");
        has(&e, "services.db.rateLimit.burst", "unknown key");
    }
}
