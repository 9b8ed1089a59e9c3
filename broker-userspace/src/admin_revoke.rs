//! `broker revoke` over the admin socket: the `revoke` and `lift` commands, the
//! `revocations` part of `status`, and the client.
//!
//! Requests: `{"cmd": "revoke", "service": "db" (or absent: every service), "selector":
//! {"uid": 1000, "gid": .., "pid": .., "cgroup": "/glob", "exe": "/glob", "comm": ".."},
//! "kill": true}` -> `{"ok": true, "revoke": {"id": 3, "ended": 1}}` (the live
//! connections of selected callers ended, with `kill`); `{"cmd": "lift", "id": 3}` ->
//! `{"ok": true, "lift": {"id": 3}}`. A revocation applies to the next connection at
//! once (it is checked before every connection's policy); it lasts until lifted or until
//! the daemon stops.

use std::{
    io::Write as _,
    path::Path,
    time::{SystemTime, UNIX_EPOCH},
};

use serde_json::{Value, json};

use crate::{
    admin::{Admin, request},
    policy::{Revocation, Selector},
};

fn error(msg: &str) -> Value {
    json!({"ok": false, "error": msg})
}

fn selector(v: &Value) -> Result<Selector, String> {
    let Some(m) = v.as_object() else {
        return Err("\"selector\" must be an object {uid, gid, pid, cgroup, exe, comm}".into());
    };
    let mut s = Selector::default();
    for (k, v) in m.iter().filter(|(_, v)| !v.is_null()) {
        let num = || {
            v.as_u64()
                .and_then(|n| u32::try_from(n).ok())
                .ok_or_else(|| format!("selector.{k} must be a number"))
        };
        let text = || {
            v.as_str()
                .filter(|t| !t.is_empty() && t.len() <= 4096)
                .map(str::to_owned)
                .ok_or_else(|| format!("selector.{k} must be a non-empty string"))
        };
        match k.as_str() {
            "uid" => s.uid = Some(num()?),
            "gid" => s.gid = Some(num()?),
            "pid" => s.pid = Some(num()?),
            "cgroup" => s.cgroup = Some(text()?),
            "exe" => s.exe = Some(text()?),
            "comm" => s.comm = Some(text()?),
            _ => {
                return Err(format!(
                    "unknown selector key {:?} (uid, gid, pid, cgroup, exe, comm)",
                    k.chars().take(64).collect::<String>()
                ));
            }
        }
    }
    Ok(s)
}

/// The `revoke` command.
pub fn revoke(admin: &Admin, req: &Value) -> Value {
    let service = match req.get("service") {
        None | Some(Value::Null) => None,
        Some(Value::String(s)) => {
            if admin
                .runtime
                .load()
                .services()
                .iter()
                .all(|rt| rt.service.name != *s)
            {
                return error(&format!(
                    "no service named {:?}",
                    s.chars().take(128).collect::<String>()
                ));
            }
            Some(s.clone())
        }
        Some(_) => return error("\"service\" must be a service's name"),
    };
    let sel = match req
        .get("selector")
        .filter(|v| !v.is_null())
        .map_or_else(|| Ok(Selector::default()), selector)
    {
        Ok(s) => s,
        Err(e) => return error(&e),
    };
    let kill = req.get("kill").and_then(Value::as_bool).unwrap_or(false);
    let r = match admin.revocations.add(service, sel, kill) {
        Ok(r) => r,
        Err(e) => return error(&e),
    };
    let mut ended = 0;
    if kill {
        let (live, _) = admin.tracker.live(usize::MAX);
        for c in live {
            let who = crate::proxy::identity(c.caller.as_ref());
            if r.selects(&c.service, &who) {
                c.end();
                ended += 1;
            }
        }
    }
    tracing::warn!(
        id = r.id,
        service = r.service.as_deref().unwrap_or("*"),
        selector = ?r.selector,
        ended,
        "revocation added (broker revoke)"
    );
    json!({"ok": true, "revoke": {"id": r.id, "ended": ended}})
}

/// The `lift` command.
pub fn lift(admin: &Admin, req: &Value) -> Value {
    let Some(id) = req.get("id").and_then(Value::as_u64) else {
        return error("\"id\" must be a revocation's number (broker status lists them)");
    };
    if admin.revocations.lift(id) {
        tracing::warn!(id, "revocation lifted (broker revoke --lift)");
        json!({"ok": true, "lift": {"id": id}})
    } else {
        error(&format!("no revocation #{id}"))
    }
}

fn one(r: &Revocation) -> Value {
    let s = &r.selector;
    json!({
        "id": r.id,
        "service": r.service,
        "selector": {
            "uid": s.uid, "gid": s.gid, "pid": s.pid,
            "cgroup": s.cgroup, "exe": s.exe, "comm": s.comm,
        },
        "kill": r.kill,
        "since_unix_ms": r.since.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64),
        "age_ms": SystemTime::now().duration_since(r.since).map_or(0, |d| d.as_millis() as u64),
    })
}

/// The `revocations` part of `status`.
#[must_use]
pub fn status(admin: &Admin) -> Value {
    Value::Array(admin.revocations.list().iter().map(|r| one(r)).collect())
}

/// The `REVOCATIONS` section of `broker status`'s text.
pub fn render(o: &mut String, s: &Value) {
    use std::fmt::Write as _;
    let empty = Vec::new();
    let list = s["revocations"].as_array().unwrap_or(&empty);
    let _ = writeln!(o, "\nREVOCATIONS ({})", list.len());
    for r in list {
        let sel: Vec<String> = r["selector"]
            .as_object()
            .into_iter()
            .flatten()
            .filter(|(_, v)| !v.is_null())
            .map(|(k, v)| {
                format!(
                    "{k}={}",
                    v.as_str().map_or_else(|| v.to_string(), str::to_owned)
                )
            })
            .collect();
        let _ = writeln!(
            o,
            "  #{} service {}  {}{}",
            r["id"],
            r["service"].as_str().unwrap_or("*"),
            sel.join(" "),
            if r["kill"] == Value::Bool(true) {
                "  (live sessions ended)"
            } else {
                ""
            }
        );
    }
}

/// `broker revoke ...`: send `req` and print the answer. Returns the exit status.
#[must_use]
pub fn command(socket: &Path, req: &Value) -> i32 {
    match request(socket, req) {
        Ok(reply) if reply.get("ok") == Some(&Value::Bool(true)) => {
            let text = if let Some(r) = reply.get("revoke") {
                format!(
                    "revocation #{} in force; {} live connection(s) ended\n",
                    r["id"], r["ended"]
                )
            } else {
                format!("revocation #{} lifted\n", reply["lift"]["id"])
            };
            let _ = std::io::stdout().write_all(text.as_bytes());
            0
        }
        Ok(reply) => {
            let why = reply
                .get("error")
                .and_then(Value::as_str)
                .unwrap_or("no reason given");
            let _ = writeln!(
                std::io::stderr(),
                "broker revoke: the daemon refused: {why}"
            );
            1
        }
        Err(e) => {
            let _ = writeln!(std::io::stderr(), "broker revoke: {e}");
            1
        }
    }
}
