//! The secret store failing, against `broker run --no-ebpf` and the local HTTP secret
//! server (`broker_tests::secret_server`), with a real PostgreSQL where the client
//! should see a clear error:
//!
//! * a stale window (`cache.staleFor`) carries connections through an outage, then
//!   they are refused with a clear error once it is over; without one a service is
//!   refused as soon as its TTL is over (fail closed); each transition is logged once;
//! * the circuit breaker opens after N failures (the server sees no request while it is
//!   open), lets one probe through, and closes when the store answers;
//! * every way a store can answer garbage (500, an HTML page, truncated JSON, a 1 GiB
//!   body, a redirect loop, no answer) is an error naming the provider and the id, the
//!   daemon lives on, and a service on another provider is unaffected;
//! * each fetch is one `audit` event naming the intercepted caller (eBPF, a test
//!   cgroup).
//!
//! Every output and the daemon log are grepped for the secret values.

use std::{
    os::unix::fs::MetadataExt as _,
    path::Path,
    process::{Command, Stdio},
    sync::{Arc, Barrier},
    time::{Duration, Instant},
};

use broker_tests::{
    Daemon, assert_no_secret, fetch, free_port, http_get,
    net::Upstream,
    output_text,
    pg::{PgAuth, PgOptions, PgServer, psql},
    privileged, run_broker,
    secret_server::{Failure, SecretServer},
    write_file,
};

const TOKEN: &str = "store-failure-bearer-5e08c2";
const PASSWORD: &str = "store-failure-password-91d7a4";

/// `broker run --no-ebpf` with `providers` (lines under `providers:`, which may use
/// `${UTS_TOKEN}`) and `services`.
fn start(dir: &Path, providers: &str, services: &str) -> Daemon {
    let health = free_port();
    let cfg = write_file(
        dir,
        "broker.yaml",
        &format!(
            "version: 2\nproviders:\n{providers}broker:\n  health: 127.0.0.1:{health}\nservices:\n{services}"
        ),
    );
    Daemon::start_with_env(
        &cfg,
        &["--no-ebpf"],
        &[("UTS_TOKEN", TOKEN)],
        format!("127.0.0.1:{health}").parse().expect("addr"),
        &dir.join("broker.log"),
    )
}

/// An `http` provider instance `name` on `store`, with `extra` settings (`, key: v`).
fn provider(name: &str, store: &SecretServer, extra: &str) -> String {
    format!(
        "  {name}: {{type: http, baseUrl: \"{}\", token: \"${{UTS_TOKEN}}\"{extra}}}\n",
        store.base_url()
    )
}

/// A `tcp` service on `listenOn: tcp://127.0.0.1:<port>` to `web`, its `password` from
/// `from`/`get`; `extra`: more lines of the service (4-space indent).
fn tcp_service(
    name: &str,
    port: u16,
    web: &Upstream,
    from: &str,
    get: &str,
    extra: &str,
) -> String {
    format!(
        "  {name}:\n    connector: tcp\n    listenOn: tcp://127.0.0.1:{port}\n    credentials:\n      host: 127.0.0.1\n      port: \"{}\"\n      sslmode: disable\n      password: {{from: {from}, get: \"{get}\"}}\n{extra}",
        web.addr.port()
    )
}

/// The lines of `log` whose target is `target` (`access`, `audit`) and that are about
/// `service`.
fn lines(log: &str, target: &str, service: &str) -> Vec<String> {
    log.lines()
        .filter(|l| {
            l.contains(&format!(" {target}: ")) && l.contains(&format!(" service={service} "))
        })
        .map(str::to_owned)
        .collect()
}

fn count(log: &str, needle: &str) -> usize {
    log.lines().filter(|l| l.contains(needle)).count()
}

/// `psql -c 'select 1'` through the broker's listener on `port`: (succeeded, output).
fn select_one(port: u16) -> (bool, String) {
    let out = psql(
        &format!("host=127.0.0.1 port={port} user=anything dbname=app sslmode=disable"),
        "select 1",
    );
    let text = output_text(&out);
    (out.status.success() && text.trim() == "1", text)
}

/// Two `pg` services whose password comes from a store that then fails (500): `stale`
/// (TTL 1 s, staleFor 4 s) keeps working on its last password until 5 s after it was
/// fetched, then psql gets a FATAL naming the credential, the provider and the id;
/// `closed` (TTL 1 s, no stale window) is refused as soon as its TTL is over. When the
/// store answers again, both work. One warning when stale serving starts, one when the
/// window is over, one info line on recovery, whatever the number of connections.
#[test]
fn a_stale_window_carries_connections_through_an_outage_then_refuses_them() {
    if !privileged() {
        return;
    }
    let pg = PgServer::start(PgOptions::new(PgAuth::Scram, PASSWORD));
    let store = SecretServer::start(TOKEN);
    store.set("db/password", PASSWORD);
    let dir = tempfile::tempdir().expect("tempdir");
    let (p_stale, p_closed) = (free_port(), free_port());
    let service = |name: &str, port: u16, cache: &str| {
        format!(
            "  {name}:\n    connector: pg\n    listenOn: tcp://127.0.0.1:{port}\n    cache: {cache}\n    credentials:\n      host: 127.0.0.1\n      port: \"{}\"\n      sslmode: disable\n      username: app_user\n      password: {{from: uts, get: db/password}}\n",
            pg.addr().port()
        )
    };
    let mut d = start(
        dir.path(),
        &provider("uts", &store, ", breaker: off"),
        &(service("stale", p_stale, "{ttl: 1s, staleFor: 4s}")
            + &service("closed", p_closed, "{ttl: 1s}")),
    );
    let mut all = String::new();
    let mut check = |port: u16, want: bool, what: &str| -> String {
        let (ok, text) = select_one(port);
        assert_eq!(ok, want, "{what}: {text}");
        all.push_str(&text);
        text
    };
    check(p_closed, true, "closed, store up");
    check(p_stale, true, "stale, store up");
    let t0 = Instant::now();
    assert_eq!(store.requests(), 2, "one fetch per service (two policies)");

    store.set_failing(true);
    std::thread::sleep(Duration::from_millis(1_500));
    for _ in 0..3 {
        check(p_stale, true, "stale, within the window");
    }
    let refused = check(p_closed, false, "closed: fail closed");
    for needle in [
        "FATAL",
        "fetching credentials failed: credential `password`: uts: fetching `db/password` failed: HTTP status 500",
    ] {
        assert!(refused.contains(needle), "{needle} in {refused}");
    }
    std::thread::sleep(
        (t0 + Duration::from_millis(5_500)).saturating_duration_since(Instant::now()),
    );
    for _ in 0..2 {
        let refused = check(p_stale, false, "stale, after the window");
        assert!(
            refused.contains("uts: fetching `db/password` failed: HTTP status 500"),
            "{refused}"
        );
    }
    store.set_failing(false);
    check(p_stale, true, "stale, store back");
    check(p_closed, true, "closed, store back");

    assert!(d.stop().success());
    let log = d.log_text();
    assert_eq!(count(&log, "serving the last values (stale)"), 1, "{log}");
    assert_eq!(count(&log, "the stale window is over"), 1, "{log}");
    assert_eq!(
        count(&log, "secret store answering again: fresh values"),
        1,
        "{log}"
    );
    let access = lines(&log, "access", "stale");
    let results: Vec<bool> = access.iter().map(|l| l.contains("result=\"ok\"")).collect();
    assert_eq!(
        results,
        [true, true, true, true, false, false, true],
        "{access:#?}"
    );
    let audit = lines(&log, "audit", "stale");
    assert_eq!(audit.len(), 7, "one audit event per fetch: {audit:#?}");
    assert_eq!(
        audit
            .iter()
            .filter(|l| l.contains("cache=\"stale\""))
            .count(),
        3,
        "{audit:#?}"
    );
    assert!(
        audit.iter().all(|l| l.contains("provider=uts ")
            && l.contains("ids=db/password")
            && l.contains("credentials=password")
            && l.contains("latency_us=")),
        "{audit:#?}"
    );
    assert_no_secret(
        &format!("{all}{log}"),
        &[PASSWORD, TOKEN],
        "psql output and broker log",
    );
}

/// Breaker `{failures: 3, backoff: 1s, maxBackoff: 2s}`, no cache: three failed fetches
/// open the circuit; the next connections are refused at once and the server sees no
/// request; after the pause two connections at once cause one probe request; once the
/// store answers, the circuit closes and connections are served again.
#[test]
fn the_breaker_opens_after_n_failures_probes_once_and_closes() {
    if !privileged() {
        return;
    }
    let store = SecretServer::start(TOKEN);
    let web = Upstream::start("127.0.0.1", "web");
    store.set("db/password", PASSWORD);
    let dir = tempfile::tempdir().expect("tempdir");
    let port = free_port();
    let mut d = start(
        dir.path(),
        &provider(
            "uts",
            &store,
            ", cacheTTL: 0s, breaker: {failures: 3, backoff: 1s, maxBackoff: 2s}",
        ),
        &tcp_service("web", port, &web, "uts", "db/password", ""),
    );
    assert_eq!(fetch(port), "hello from web");
    assert_eq!(store.requests(), 1);

    store.set_failing(true);
    for _ in 0..3 {
        assert_eq!(fetch(port), "", "store failing");
    }
    assert_eq!(store.requests(), 4);
    let started = Instant::now();
    for _ in 0..5 {
        assert_eq!(fetch(port), "", "circuit open");
    }
    assert!(
        started.elapsed() < Duration::from_millis(700),
        "refused at once"
    );
    assert_eq!(store.requests(), 4, "no request while the circuit is open");

    // Half-open: two connections at once, one probe (slow, failing).
    std::thread::sleep(Duration::from_millis(1_100));
    store.set_delay(Duration::from_millis(500));
    let barrier = Arc::new(Barrier::new(2));
    let both: Vec<_> = (0..2)
        .map(|_| {
            let barrier = Arc::clone(&barrier);
            std::thread::spawn(move || {
                barrier.wait();
                fetch(port)
            })
        })
        .collect();
    for t in both {
        assert_eq!(t.join().expect("client"), "");
    }
    assert_eq!(store.requests(), 5, "one probe");

    // The failed probe doubled the pause (2 s, the cap); then the store is back.
    store.set_delay(Duration::ZERO);
    store.set_failing(false);
    assert_eq!(fetch(port), "", "still open");
    assert_eq!(store.requests(), 5);
    std::thread::sleep(Duration::from_millis(2_100));
    assert_eq!(fetch(port), "hello from web", "the probe succeeds");
    assert_eq!(fetch(port), "hello from web");
    assert_eq!(store.requests(), 7);

    assert!(d.stop().success());
    let log = d.log_text();
    assert_eq!(count(&log, "circuit open, not calling it"), 1, "{log}");
    assert_eq!(count(&log, "circuit closed"), 1, "{log}");
    let refused: Vec<String> = lines(&log, "access", "web")
        .into_iter()
        .filter(|l| l.contains("circuit open"))
        .collect();
    assert!(refused.len() >= 6, "{log}");
    assert!(
        refused.iter().all(|l| l.contains("credentials_error")
            && l.contains("error.kind=\"circuit_open\"")
            && l.contains("uts: `db/password` not fetched: the store is failing")),
        "{refused:#?}"
    );
    assert_no_secret(&log, &[PASSWORD, TOKEN], "broker log");
}

/// Each way a store can answer garbage refuses the connection of the service using it,
/// with an error naming the provider and the id; a service on another provider is
/// served meanwhile; the daemon lives on and serves the service again once the store
/// behaves.
#[test]
fn garbage_from_a_store_is_a_clear_error_and_nothing_else_suffers() {
    if !privileged() {
        return;
    }
    let bad = SecretServer::start(TOKEN);
    let good = SecretServer::start(TOKEN);
    let web = Upstream::start("127.0.0.1", "web");
    bad.set("db/secret", &format!("{{\"password\": \"{PASSWORD}\"}}"));
    good.set("db/password", PASSWORD);
    let dir = tempfile::tempdir().expect("tempdir");
    let (p_victim, p_canary) = (free_port(), free_port());
    let mut d = start(
        dir.path(),
        &(provider("bad", &bad, ", timeout: 1s, cacheTTL: 0s, breaker: off")
            + &provider("good", &good, ", cacheTTL: 0s")),
        &(tcp_service("victim", p_victim, &web, "bad", "db/secret#password", "")
            + &tcp_service("canary", p_canary, &web, "good", "db/password", "")),
    );
    assert_eq!(
        fetch(p_victim),
        "hello from web",
        "the bad store, still good"
    );
    let cases = [
        (
            Failure::Status500,
            "failed: HTTP status 500 Internal Server Error",
        ),
        (
            Failure::Html,
            "bad reply for `db/secret#password`: the reply is not JSON",
        ),
        (
            Failure::TruncatedJson,
            "bad reply for `db/secret#password`: the reply is not JSON",
        ),
        (
            Failure::Huge,
            "bad reply for `db/secret#password`: reply larger than 1048576 bytes",
        ),
        (
            Failure::RedirectLoop,
            "bad reply for `db/secret#password`: HTTP status 302 Found: redirects are not followed",
        ),
        (
            Failure::Hang,
            "fetching `db/secret#password` timed out after 1s",
        ),
    ];
    for (failure, _) in &cases {
        bad.set_failure(*failure);
        let started = Instant::now();
        assert_eq!(fetch(p_victim), "", "{failure:?}");
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "{failure:?}: refused within the timeout"
        );
        assert_eq!(fetch(p_canary), "hello from web", "{failure:?}: the canary");
    }
    bad.set_failure(Failure::None);
    assert_eq!(fetch(p_victim), "hello from web", "the store behaves again");
    let health = d.health;
    assert!(matches!(http_get(health, "/live"), Some((200, _))));
    assert_eq!(bad.requests(), 8);

    assert!(d.stop().success());
    let log = d.log_text();
    let victim = lines(&log, "access", "victim");
    assert_eq!(victim.len(), 8, "{log}");
    assert!(victim[0].contains("result=\"ok\"") && victim[7].contains("result=\"ok\""));
    for ((failure, needle), line) in cases.iter().zip(&victim[1..7]) {
        assert!(
            line.contains("credentials_error")
                && line.contains("credential `password`: bad: ")
                && line.contains(needle),
            "{failure:?}: {needle} in {line}"
        );
    }
    let canary = lines(&log, "access", "canary");
    assert_eq!(canary.len(), 6);
    assert!(
        canary.iter().all(|l| l.contains("result=\"ok\"")),
        "{canary:#?}"
    );
    assert!(!log.contains("panicked"), "{log}");
    assert_no_secret(&log, &[PASSWORD, TOKEN], "broker log");
}

/// An intercepted connection (eBPF, a test cgroup): its fetch is one `audit` event
/// naming the caller as the kernel recorded it (pid, uid, cgroup, comm), the service,
/// the provider and the id, the cache's answer and the result; the second connection
/// is a cache hit. Never the value.
#[test]
fn the_audit_event_names_the_intercepted_caller() {
    if !privileged() {
        return;
    }
    let web = Upstream::start("127.0.0.1", "web");
    let files = tempfile::tempdir().expect("tempdir");
    let pw = write_file(files.path(), "pw", PASSWORD);
    let port = web.addr.port();
    let b = run_broker(
        "audit",
        "",
        &format!(
            "  web:\n    connector: tcp\n    intercept: [\"127.0.0.9:{port}\"]\n    credentials:\n      host: 127.0.0.1\n      password: {{from: file, get: {}}}\n",
            pw.display()
        ),
    );
    let mut pids = Vec::new();
    for _ in 0..2 {
        let mut c = Command::new("curl");
        c.args([
            "-s",
            "--max-time",
            "10",
            &format!("http://127.0.0.9:{port}/"),
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
        b.cg.enter(&mut c);
        let child = c.spawn().expect("curl");
        pids.push(u64::from(child.id()));
        let out = child.wait_with_output().expect("curl");
        assert!(
            String::from_utf8_lossy(&out.stdout).contains("hello from web"),
            "{}",
            output_text(&out)
        );
    }
    let audit_of = |text: &str| -> Vec<serde_json::Value> {
        text.lines()
            .filter_map(|l| serde_json::from_str(l).ok())
            .filter(|v: &serde_json::Value| v["target"] == "audit")
            .collect()
    };
    let log = b
        .daemon
        .log_until(Duration::from_secs(5), |t| audit_of(t).len() >= 2);
    let audit = audit_of(&log);
    assert_eq!(audit.len(), 2, "{log}");
    let cgroup = std::fs::metadata(&b.cg.path).expect("cgroup").ino();
    for (event, (pid, cache)) in audit.iter().zip(pids.iter().zip(["miss", "hit"])) {
        assert_eq!(event["service"], "web", "{event}");
        assert_eq!(event["caller.pid"], *pid, "{event}");
        assert_eq!(event["caller.uid"], 0, "{event}");
        assert_eq!(event["caller.cgroup"], cgroup, "{event}");
        assert_eq!(event["caller.comm"], "curl", "{event}");
        assert_eq!(event["provider"], "file", "{event}");
        assert_eq!(event["ids"], pw.display().to_string(), "{event}");
        assert_eq!(event["credentials"], "password", "{event}");
        assert_eq!(event["cache"], cache, "{event}");
        assert_eq!(event["result"], "ok", "{event}");
        assert!(event["latency_us"].is_u64(), "{event}");
    }
    assert_no_secret(&log, &[PASSWORD], "broker log");
}
