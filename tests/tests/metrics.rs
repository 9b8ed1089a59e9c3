//! `GET /metrics` after real PostgreSQL traffic: real `psql` through an intercepted
//! service (in the broker's cgroup) and through a `listenOn` service, one session of
//! each refused by the server. The scrape (OpenMetrics, asked for as Prometheus asks)
//! is parsed with the Prometheus project's own parser (prometheus-client from PyPI,
//! `prometheus_client.openmetrics.parser`); a scrape without `Accept` (the Prometheus
//! text format) with its text parser, and its counters agree. Then:
//!
//! * `broker_connections_total{service,connector,result}` equals the access lines by
//!   service, connector and result; `broker_bytes_total` their byte counts;
//!   `broker_spliced_sessions_total` their `spliced=true`; `active_connections` is 0;
//!   `handshake_duration_seconds_count` counts the sessions that reached the byte phase;
//! * `broker_credential_fetches_total` equals the audit events by provider, result and
//!   cache;
//! * `broker_kernel_redirects_total{service}` (the kernel's per-CPU counter) equals the
//!   intercepted connects; `broker_ebpf_map_entries{map="TARGETS"}` is the one target;
//! * every label is one of the bounded set (no port, no path, no id), and no secret is
//!   in the scrape.

use std::{
    collections::BTreeMap,
    io::{Read as _, Write as _},
    net::{SocketAddr, TcpStream},
    process::{Command, Output, Stdio},
    time::{Duration, Instant},
};

use broker_tests::{
    RunBroker, assert_no_secret,
    clients::{PYTHON, python_deps},
    free_port,
    net::TestCgroup,
    output_text,
    pg::{PgAuth, PgOptions, PgServer},
    privileged, run_broker, write_file,
};
use serde_json::Value;

/// Parses an exposition (stdin) with prometheus-client's parser for its format
/// (`openmetrics`: `prometheus_client.openmetrics.parser`, which refuses a malformed
/// exposition and one without `# EOF`; `text`: `prometheus_client.parser`, the
/// Prometheus text format 0.0.4) and prints every sample as JSON:
/// `[{family, type, name, labels, value}]`.
const PARSE: &str = r#"
import json, sys
if sys.argv[1] == "openmetrics":
    from prometheus_client.openmetrics.parser import text_string_to_metric_families
else:
    from prometheus_client.parser import text_string_to_metric_families
out = []
for fam in text_string_to_metric_families(sys.stdin.read()):
    for s in fam.samples:
        out.append({"family": fam.name, "type": fam.type, "name": s.name,
                    "labels": s.labels, "value": s.value})
print(json.dumps(out))
"#;

/// `psql -c SQL` with `conninfo`, bounded to 30 s, in `cg` when given.
fn psql_in(cg: Option<&TestCgroup>, conninfo: &str, sql: &str) -> Output {
    let mut c = Command::new("timeout");
    c.args([
        "--kill-after=5",
        "30",
        "psql",
        "-X",
        "-w",
        "-A",
        "-t",
        "-v",
        "ON_ERROR_STOP=1",
    ])
    .arg(conninfo)
    .args(["-c", sql])
    .env_remove("PGPASSWORD")
    .env("PGCONNECT_TIMEOUT", "10")
    .stdin(Stdio::null());
    if let Some(cg) = cg {
        cg.enter(&mut c);
    }
    c.output().expect("spawn psql")
}

/// The daemon's JSON log lines of `target`.
fn lines(b: &RunBroker, target: &str) -> Vec<Value> {
    b.daemon
        .log_text()
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .filter(|v| v["target"] == target)
        .collect()
}

/// Every sample of the exposition in `format` (`openmetrics` or `text`), parsed by
/// prometheus-client (Python).
fn parse(text: &str, format: &str) -> Vec<Value> {
    let mut child = Command::new(PYTHON)
        .args(["-c", PARSE, format])
        .env("PYTHONPATH", python_deps())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("python3");
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(text.as_bytes())
        .expect("write the exposition");
    let out = child.wait_with_output().expect("python3");
    assert!(
        out.status.success(),
        "prometheus-client refused the exposition (cargo xtask setup installs it):\n{}\n{text}",
        output_text(&out)
    );
    serde_json::from_slice(&out.stdout).expect("parser output")
}

/// `GET /metrics` with `accept` (if any): the content type and the body.
fn get_metrics(addr: SocketAddr, accept: Option<&str>) -> (String, String) {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(2)).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(10)))
        .expect("timeout");
    let accept = accept
        .map(|a| format!("Accept: {a}\r\n"))
        .unwrap_or_default();
    write!(
        s,
        "GET /metrics HTTP/1.1\r\nHost: {addr}\r\n{accept}Connection: close\r\n\r\n"
    )
    .expect("request");
    let mut out = String::new();
    s.read_to_string(&mut out).expect("reply");
    let (head, body) = out.split_once("\r\n\r\n").expect("a reply head");
    assert!(head.starts_with("HTTP/1.1 200 "), "{head}");
    let ctype = head
        .lines()
        .find_map(|l| l.strip_prefix("Content-Type: "))
        .unwrap_or("")
        .to_owned();
    (ctype, body.to_owned())
}

/// The value of the sample `name` whose labels include `want` (0 when absent).
fn value(samples: &[Value], name: &str, want: &[(&str, &str)]) -> f64 {
    samples
        .iter()
        .filter(|s| s["name"] == name)
        .filter(|s| want.iter().all(|(k, v)| s["labels"][*k] == *v))
        .map(|s| s["value"].as_f64().unwrap_or(f64::NAN))
        .sum()
}

#[test]
fn the_scrape_matches_the_access_log_and_the_kernel_counts_redirects() {
    if !privileged() {
        return;
    }
    let pw = "metrics-pw-6d1f0a93c5";
    let pg = PgServer::start(PgOptions::new(PgAuth::Scram, pw));
    let pw_dir = tempfile::tempdir().expect("tempdir");
    let pw_file = write_file(pw_dir.path(), "pw", pw);
    let listen = free_port();
    let creds = format!(
        "    credentials:\n      host: 127.0.0.1\n      port: \"{}\"\n      sslmode: disable\n      username: app_user\n      password: {{from: file, get: {}}}\n",
        pg.addr().port(),
        pw_file.display()
    );
    let b = run_broker(
        "metrics",
        "  adminSocket: off\n",
        &format!(
            "  db:\n    connector: pg\n    intercept: [\"127.0.0.2:5432\"]\n{creds}  dblisten:\n    connector: pg\n    listenOn: tcp://127.0.0.1:{listen}\n{creds}"
        ),
    );
    let health: SocketAddr = b.daemon.health;
    let intercepted = "host=127.0.0.2 port=5432 user=anyone dbname=app sslmode=disable";
    let listened = format!("host=127.0.0.1 port={listen} user=anyone dbname=app sslmode=disable");
    let mut outputs = String::new();
    for i in 0..3 {
        let o = psql_in(Some(&b.cg), intercepted, &format!("select {i} + 40"));
        outputs.push_str(&output_text(&o));
        assert!(
            o.status.success(),
            "{}\n{}",
            output_text(&o),
            b.daemon.log_text()
        );
    }
    for _ in 0..2 {
        let o = psql_in(None, &listened, "select current_user");
        outputs.push_str(&output_text(&o));
        assert!(
            o.status.success(),
            "{}\n{}",
            output_text(&o),
            b.daemon.log_text()
        );
    }
    // One session of each that the server refuses (no such database).
    let o = psql_in(
        Some(&b.cg),
        &intercepted.replace("dbname=app", "dbname=nosuchdb"),
        "select 1",
    );
    assert!(!o.status.success());
    outputs.push_str(&output_text(&o));
    let o = psql_in(
        None,
        &listened.replace("dbname=app", "dbname=nosuchdb"),
        "select 1",
    );
    assert!(!o.status.success());
    outputs.push_str(&output_text(&o));

    // Every session has ended and written its line.
    let deadline = Instant::now() + Duration::from_secs(10);
    let access = loop {
        let a = lines(&b, "access");
        if a.len() >= 7 || Instant::now() > deadline {
            break a;
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    assert_eq!(access.len(), 7, "{}", b.daemon.log_text());

    // What Prometheus asks for: OpenMetrics.
    let (ctype, scrape) = get_metrics(
        health,
        Some("application/openmetrics-text;version=1.0.0;q=0.5,text/plain;version=0.0.4;q=0.4"),
    );
    assert_eq!(
        ctype,
        "application/openmetrics-text; version=1.0.0; charset=utf-8"
    );
    let samples = parse(&scrape, "openmetrics");
    // Anyone else: the Prometheus text format, the same counts.
    let (ctype, text) = get_metrics(health, None);
    assert_eq!(ctype, "text/plain; version=0.0.4; charset=utf-8");
    let text_samples = parse(&text, "text");
    for name in [
        "broker_connections_total",
        "broker_bytes_total",
        "broker_kernel_redirects_total",
        "broker_credential_fetches_total",
    ] {
        let fam: Vec<&Value> = text_samples.iter().filter(|s| s["name"] == name).collect();
        assert!(!fam.is_empty(), "{name}\n{text}");
        assert!(fam.iter().all(|s| s["type"] == "counter"), "{name}\n{text}");
        for s in fam {
            let want: Vec<(&str, &str)> = s["labels"]
                .as_object()
                .expect("labels")
                .iter()
                .map(|(k, v)| (k.as_str(), v.as_str().unwrap_or("")))
                .collect();
            assert_eq!(
                value(&samples, name, &want),
                s["value"].as_f64().unwrap_or(-1.0)
            );
        }
    }
    assert_no_secret(&text, &[pw], "the text scrape");

    // Connections by (service, connector, result), as the access log says.
    let mut by_result: BTreeMap<(String, String, String), f64> = BTreeMap::new();
    let mut bytes: BTreeMap<(String, &str), f64> = BTreeMap::new();
    let mut spliced: BTreeMap<String, f64> = BTreeMap::new();
    let mut established: BTreeMap<String, f64> = BTreeMap::new();
    for a in &access {
        let s = a["service"].as_str().unwrap_or("?").to_owned();
        let key = (
            s.clone(),
            a["connector"].as_str().unwrap_or("?").to_owned(),
            a["result"].as_str().unwrap_or("?").to_owned(),
        );
        *by_result.entry(key).or_default() += 1.0;
        *bytes.entry((s.clone(), "up")).or_default() += a["bytes.up"].as_f64().unwrap_or(0.0);
        *bytes.entry((s.clone(), "down")).or_default() += a["bytes.down"].as_f64().unwrap_or(0.0);
        if a["spliced"] == true {
            *spliced.entry(s.clone()).or_default() += 1.0;
        }
        if a["result"] == "ok" {
            *established.entry(s).or_default() += 1.0;
        }
    }
    assert_eq!(
        by_result.get(&("db".into(), "pg".into(), "ok".into())),
        Some(&3.0),
        "{by_result:?}"
    );
    assert_eq!(
        by_result.get(&("dblisten".into(), "pg".into(), "upstream_refused".into())),
        Some(&1.0),
        "{by_result:?}"
    );
    let metric_total: f64 = samples
        .iter()
        .filter(|s| s["name"] == "broker_connections_total")
        .map(|s| s["value"].as_f64().unwrap_or(0.0))
        .sum();
    assert_eq!(metric_total, access.len() as f64, "{scrape}");
    for ((service, connector, result), n) in &by_result {
        assert_eq!(
            value(
                &samples,
                "broker_connections_total",
                &[
                    ("service", service),
                    ("connector", connector),
                    ("result", result)
                ]
            ),
            *n,
            "{service} {connector} {result}\n{scrape}"
        );
    }
    for ((service, direction), n) in &bytes {
        assert_eq!(
            value(
                &samples,
                "broker_bytes_total",
                &[("service", service), ("direction", direction)]
            ),
            *n,
            "{service} {direction}\n{scrape}"
        );
        if *direction == "down" && established.contains_key(service) {
            assert!(*n > 0.0, "{service}: sessions moved bytes");
        }
    }
    for service in ["db", "dblisten"] {
        assert_eq!(
            value(
                &samples,
                "broker_spliced_sessions_total",
                &[("service", service)]
            ),
            spliced.get(service).copied().unwrap_or(0.0),
            "{service}\n{scrape}"
        );
        assert_eq!(
            value(
                &samples,
                "broker_active_connections",
                &[("service", service)]
            ),
            0.0
        );
        assert_eq!(
            value(
                &samples,
                "broker_handshake_duration_seconds_count",
                &[("service", service), ("connector", "pg")]
            ),
            established.get(service).copied().unwrap_or(0.0),
            "{service}\n{scrape}"
        );
    }
    // The intercepted sessions were spliced (the default), the listenOn ones relayed.
    assert_eq!(spliced.get("db"), Some(&3.0), "{access:?}");

    // Credential lookups, as the audit events say.
    let audit = lines(&b, "audit");
    assert!(!audit.is_empty(), "{}", b.daemon.log_text());
    let mut fetches: BTreeMap<(String, String, String), f64> = BTreeMap::new();
    let mut not_hits = 0.0;
    for a in &audit {
        let key = (
            a["provider"].as_str().unwrap_or("?").to_owned(),
            a["result"].as_str().unwrap_or("?").to_owned(),
            a["cache"].as_str().unwrap_or("?").to_owned(),
        );
        if key.2 != "hit" {
            not_hits += 1.0;
        }
        *fetches.entry(key).or_default() += 1.0;
    }
    for ((provider, result, cache), n) in &fetches {
        assert_eq!(
            value(
                &samples,
                "broker_credential_fetches_total",
                &[("provider", provider), ("result", result), ("cache", cache)]
            ),
            *n,
            "{provider} {result} {cache}\n{scrape}"
        );
    }
    assert_eq!(
        value(
            &samples,
            "broker_credential_fetch_duration_seconds_count",
            &[("provider", "file")]
        ),
        not_hits,
        "{scrape}"
    );

    // The kernel counted every intercepted connect (3 served, 1 refused by the server),
    // and none of the listenOn ones.
    let intercepted_lines = access.iter().filter(|a| a["service"] == "db").count();
    assert_eq!(intercepted_lines, 4);
    assert_eq!(
        value(
            &samples,
            "broker_kernel_redirects_total",
            &[("service", "db")]
        ),
        4.0,
        "{scrape}"
    );
    assert_eq!(
        value(
            &samples,
            "broker_kernel_redirects_total",
            &[("service", "dblisten")]
        ),
        0.0
    );
    assert_eq!(
        value(&samples, "broker_ebpf_map_entries", &[("map", "TARGETS")]),
        1.0,
        "{scrape}"
    );
    assert_eq!(
        value(&samples, "broker_ebpf_map_capacity", &[("map", "TARGETS")]),
        16384.0
    );
    for map in ["BY_COOKIE", "BY_CONN", "SPLICE", "SPLICE_READ", "REDIRECTS"] {
        assert!(
            samples
                .iter()
                .any(|s| s["name"] == "broker_ebpf_map_entries" && s["labels"]["map"] == map),
            "{map}\n{scrape}"
        );
    }

    // Bounded labels only: configured names and fixed words.
    for s in &samples {
        for (k, v) in s["labels"].as_object().expect("labels") {
            assert!(
                [
                    "service",
                    "connector",
                    "result",
                    "direction",
                    "provider",
                    "cache",
                    "reason",
                    "map",
                    "rule",
                    "le"
                ]
                .contains(&k.as_str()),
                "label {k} in {s}"
            );
            let v = v.as_str().unwrap_or("");
            assert!(
                !v.contains(':') && !v.contains('/') && !v.contains(&listen.to_string()),
                "label {k}={v} looks like an address or a path"
            );
        }
    }
    assert_no_secret(&scrape, &[pw], "the scrape");
    assert_no_secret(&outputs, &[pw], "psql's output");
    assert_no_secret(&b.daemon.log_text(), &[pw], "the daemon log");
    drop(pg);
}
