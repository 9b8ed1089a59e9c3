use std::os::unix::fs::PermissionsExt as _;

use super::*;

fn caller() -> Caller {
    Caller {
        pid: 4242,
        uid: 1001,
        gid: 1002,
        cgroup_id: 77,
        cgroup: Some("/apps/orders".into()),
        exe: Some("/opt/orders/bin/orders-app".into()),
        comm: "orders-app".into(),
        thread: "worker-3".into(),
    }
}

fn settings(dir: &Path, hmac: bool) -> AuditSettings {
    AuditSettings {
        sink: AuditSink::File {
            path: dir.join("audit.log"),
            max_size: 1 << 20,
            keep: 1,
        },
        hmac_key: hmac.then(|| dir.join("state/audit.key")),
    }
}

fn access<'a>(c: &'a Caller, value: Option<&'a [u8]>) -> CredentialAccess<'a> {
    CredentialAccess {
        service: "orders-db",
        caller: Some(c),
        provider: "vault",
        secret: "kv/orders#password",
        credentials: &["password"],
        fresh: false,
        cache: Some("miss"),
        result: "ok",
        error: None,
        stale_age: None,
        latency: Duration::from_micros(1234),
        value,
    }
}

fn lines(dir: &Path) -> Vec<Value> {
    std::fs::read_to_string(dir.join("audit.log"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).expect("every line is JSON"))
        .collect()
}

#[test]
fn a_credential_line_has_every_field_and_never_the_value() {
    let dir = tempfile::tempdir().unwrap();
    let log = AuditLog::open(&settings(dir.path(), true)).unwrap();
    let c = caller();
    log.credential(&access(&c, Some(b"s3cret-value-1")));
    log.credential(&CredentialAccess {
        cache: Some("hit"),
        ..access(&c, Some(b"s3cret-value-1"))
    });
    log.credential(&CredentialAccess {
        cache: Some("miss"),
        fresh: true,
        ..access(&c, Some(b"s3cret-value-2"))
    });
    log.credential(&CredentialAccess {
        caller: None,
        cache: None,
        result: "not_found",
        error: Some("vault: `kv/orders#password` not found"),
        ..access(&c, None)
    });
    log.flush(Duration::from_secs(10));
    let text = std::fs::read_to_string(dir.path().join("audit.log")).unwrap();
    assert!(!text.contains("s3cret-value"), "{text}");
    let l = lines(dir.path());
    assert_eq!(l.len(), 4, "{text}");
    let first = &l[0];
    let time = first["time"].as_str().unwrap();
    assert!(
        time.len() >= 20 && time.ends_with('Z') && time.as_bytes()[10] == b'T',
        "{time}"
    );
    assert_eq!(first["event"], "credential");
    assert_eq!(first["service"], "orders-db");
    assert_eq!(first["provider"], "vault");
    assert_eq!(first["secret"], "kv/orders#password");
    assert_eq!(first["credentials"], serde_json::json!(["password"]));
    assert_eq!(first["cache"], "miss");
    assert_eq!(first["fresh"], false);
    assert_eq!(first["result"], "ok");
    assert_eq!(first["error"], Value::Null);
    assert_eq!(first["latency_ms"], 1.234);
    assert_eq!(
        first["caller"],
        serde_json::json!({
            "pid": 4242, "uid": 1001, "gid": 1002, "cgroup": "/apps/orders", "cgroup_id": 77,
            "comm": "orders-app", "thread": "worker-3", "exe": "/opt/orders/bin/orders-app"
        })
    );
    let h = |v: &Value| v["version_hmac"].as_str().unwrap().to_owned();
    assert!(h(first).starts_with("hmac-sha256:") && h(first).len() == 12 + 64);
    assert_eq!(h(&l[1]), h(first), "the same value, the same HMAC");
    assert_ne!(h(&l[2]), h(first), "a new value, a new HMAC");
    assert_eq!(l[2]["fresh"], true);
    // A failure: no value, no HMAC; no caller known.
    assert_eq!(l[3]["result"], "not_found");
    assert_eq!(l[3]["error"], "vault: `kv/orders#password` not found");
    assert_eq!(l[3]["caller"], Value::Null);
    assert_eq!(l[3]["cache"], Value::Null);
    assert!(l[3].get("version_hmac").is_none());
    // Independently computed.
    let key = std::fs::read(dir.path().join("state/audit.key")).unwrap();
    let want = hmac::sign(&hmac::Key::new(hmac::HMAC_SHA256, &key), b"s3cret-value-1");
    let hex: String = want.as_ref().iter().map(|b| format!("{b:02x}")).collect();
    assert_eq!(h(first), format!("hmac-sha256:{hex}"));
}

#[test]
fn the_key_is_created_once_private_and_reused() {
    let dir = tempfile::tempdir().unwrap();
    let c = caller();
    let one = |log: &AuditLog| {
        log.credential(&access(&c, Some(b"v")));
        log.flush(Duration::from_secs(10));
    };
    let log = AuditLog::open(&settings(dir.path(), true)).unwrap();
    one(&log);
    let key_path = dir.path().join("state/audit.key");
    let m = std::fs::metadata(&key_path).unwrap();
    assert_eq!(m.permissions().mode() & 0o777, 0o600);
    assert_eq!(m.len(), HMAC_KEY_LEN as u64);
    let state = std::fs::metadata(dir.path().join("state")).unwrap();
    assert_eq!(state.permissions().mode() & 0o777, 0o700);
    let key = std::fs::read(&key_path).unwrap();
    drop(log);
    // A restart: the same key, so the same HMAC for the same value.
    let log = AuditLog::open(&settings(dir.path(), true)).unwrap();
    one(&log);
    assert_eq!(std::fs::read(&key_path).unwrap(), key);
    let l = lines(dir.path());
    assert_eq!(l[0]["version_hmac"], l[1]["version_hmac"]);
    // No key: no HMAC.
    let log = AuditLog::open(&settings(dir.path(), false)).unwrap();
    one(&log);
    assert!(lines(dir.path())[2].get("version_hmac").is_none());
}

#[test]
fn a_key_others_can_read_or_of_the_wrong_size_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let key_path = dir.path().join("state/audit.key");
    std::fs::create_dir_all(key_path.parent().unwrap()).unwrap();
    std::fs::write(&key_path, [7u8; 32]).unwrap();
    std::fs::set_permissions(&key_path, std::fs::Permissions::from_mode(0o644)).unwrap();
    let e = format!(
        "{:#}",
        AuditLog::open(&settings(dir.path(), true)).unwrap_err()
    );
    assert!(
        e.contains("broker.audit.hmacKey") && e.contains("chmod 600"),
        "{e}"
    );
    std::fs::set_permissions(&key_path, std::fs::Permissions::from_mode(0o600)).unwrap();
    std::fs::write(&key_path, [7u8; 8]).unwrap();
    let e = format!(
        "{:#}",
        AuditLog::open(&settings(dir.path(), true)).unwrap_err()
    );
    assert!(e.contains("16 to 4096 bytes"), "{e}");
    std::fs::write(&key_path, [7u8; 20]).unwrap();
    assert!(AuditLog::open(&settings(dir.path(), true)).is_ok());
}

#[test]
fn a_decision_line() {
    let dir = tempfile::tempdir().unwrap();
    let log = AuditLog::open(&settings(dir.path(), false)).unwrap();
    let c = caller();
    log.decision(&Decision {
        service: "orders-db",
        caller: Some(&c),
        destination: Some("10.0.0.5:5432".parse().unwrap()),
        allowed: false,
        rule: Some("deny-batch"),
        reason: Some("exe not allowed"),
    });
    log.flush(Duration::from_secs(10));
    let l = lines(dir.path());
    assert_eq!(l.len(), 1);
    assert_eq!(l[0]["event"], "decision");
    assert_eq!(l[0]["result"], "deny");
    assert_eq!(l[0]["rule"], "deny-batch");
    assert_eq!(l[0]["reason"], "exe not allowed");
    assert_eq!(l[0]["destination"], "10.0.0.5:5432");
    assert_eq!(l[0]["caller"]["exe"], "/opt/orders/bin/orders-app");
}

#[test]
fn off_writes_nothing_and_costs_nothing() {
    let log = AuditLog::off();
    assert!(!log.enabled());
    let c = caller();
    log.credential(&access(&c, Some(b"v")));
    log.flush(Duration::from_secs(1));
    assert_eq!((log.dropped(), log.failed()), (0, 0));
}
