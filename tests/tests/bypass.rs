//! The broker's own-traffic bypass in a container, for real: the broker runs as pid 1
//! of a pid namespace of its own (`unshare --pid --fork --mount-proc`, as a container
//! without the host's pid namespace), in a child cgroup of the cgroup its programs are
//! attached to (a sidecar in its pod's cgroup), with a real PostgreSQL and `psql`.
//!
//! * Its own connections are not intercepted: its upstream (an intercepted address)
//!   by the socket mark, and its secret store's, which carries no mark, by its process
//!   recognised in its own pid namespace. The store's address is itself an intercepted
//!   destination here (a `trap` service): had the store's connection been redirected,
//!   the trap would have brokered it, with an access line.
//! * An unprivileged app in the cgroup cannot claim the bypass: it cannot set the mark
//!   (not as `nobody`, not as root of its own user namespace), and being pid 1 of a pid
//!   namespace of its own, like the broker, does not make it the broker. A privileged
//!   app (root with `CAP_NET_ADMIN`) can set the mark: its connection then goes direct,
//!   without the broker, and gets nothing (out of scope, shown for the record).

use std::{
    process::{Output, Stdio},
    time::Duration,
};

use broker_tests::{
    assert_no_secret, broker_bin, free_port, output_text,
    pg::{PgAuth, PgOptions, PgServer, python_with_psycopg2},
    pod::{CgroupView, NsDaemon, PodCgroup, container},
    privileged,
    secret_server::SecretServer,
    write_file,
};

const PASSWORD: &str = "bypass-pw-5c1e9a77d2";
const TOKEN: &str = "bypass-uts-token-0b8e4f61";
/// What the app dials (nothing listens there: only the broker reaches the database).
const TARGET_HOST: &str = "127.0.0.2";
const TARGET_PORT: u16 = 5432;

fn dsn() -> String {
    format!(
        "host={TARGET_HOST} port={TARGET_PORT} user=someone password=dummy dbname=app sslmode=disable connect_timeout=10"
    )
}

/// A pod (cgroup `pod` with `broker` and `app`) whose broker runs in its own pid
/// namespace, attached to the pod's cgroup, with the `services:` given.
struct Setup {
    daemon: NsDaemon,
    pod: PodCgroup,
    _dir: tempfile::TempDir,
}

fn start(tag: &str, providers: &str, services: &str) -> Setup {
    let dir = tempfile::tempdir().expect("tempdir");
    let pod = PodCgroup::new(tag, &["broker", "app"]);
    let health = free_port();
    let cfg = write_file(
        dir.path(),
        "broker.yaml",
        &format!(
            "version: 2\n{providers}broker:\n  health: 127.0.0.1:{health}\n  cacheTTL: 0s\nservices:\n{services}"
        ),
    );
    let bin = broker_bin();
    let mut cmd = container(
        &[
            bin.to_str().expect("UTF-8"),
            "--log-format",
            "json",
            "run",
            "-f",
            cfg.to_str().expect("UTF-8"),
            "--cgroup",
            pod.path.to_str().expect("UTF-8"),
        ],
        &pod.container("broker"),
        None,
        CgroupView::Host,
        None,
    );
    cmd.env("UTS_TOKEN", TOKEN);
    let daemon = NsDaemon::start(
        cmd,
        format!("127.0.0.1:{health}").parse().expect("addr"),
        &dir.path().join("broker.log"),
    );
    Setup {
        daemon,
        pod,
        _dir: dir,
    }
}

fn pg_service(pg: &PgServer, password: &str) -> String {
    format!(
        "  db:\n    connector: pg\n    intercept: [\"{TARGET_HOST}:{TARGET_PORT}\"]\n    credentials:\n      host: 127.0.0.1\n      port: \"{}\"\n      sslmode: disable\n      username: app_user\n      password: {password}\n",
        pg.addr().port()
    )
}

/// `psql` as a process of the pod's `app` container (its own pid namespace), with
/// `prefix` before it (e.g. `runuser -u nobody --`).
fn app_psql(s: &Setup, prefix: &[&str]) -> Output {
    let dsn = dsn();
    let mut argv: Vec<&str> = vec!["timeout", "--kill-after=5", "30"];
    argv.extend_from_slice(prefix);
    argv.extend_from_slice(&[
        "psql",
        "-X",
        "-w",
        "-A",
        "-t",
        &dsn,
        "-c",
        "select current_user",
    ]);
    container(&argv, &s.pod.container("app"), None, CgroupView::Host, None)
        .env_remove("PGPASSWORD")
        .stdin(Stdio::null())
        .output()
        .expect("run psql in the app container")
}

fn access_lines(log: &str) -> Vec<serde_json::Value> {
    log.lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|v| v["target"] == "access")
        .collect()
}

fn lines_of<'a>(access: &'a [serde_json::Value], service: &str) -> Vec<&'a serde_json::Value> {
    access.iter().filter(|a| a["service"] == service).collect()
}

#[test]
fn own_connections_from_a_private_pid_namespace_are_not_intercepted() {
    if !privileged() {
        return;
    }
    let pg = PgServer::start(PgOptions::new(PgAuth::Scram, PASSWORD));
    let store = SecretServer::start(TOKEN);
    store.set("db-password", PASSWORD);
    // The store's own address is intercepted too, by a `tcp` service that forwards to
    // the original destination: a redirected store request would still work, through
    // the trap, which would log it.
    let services = format!(
        "{}  trap:\n    connector: tcp\n    intercept: [\"{}\"]\n",
        pg_service(&pg, "{from: uts, get: db-password}"),
        store.addr
    );
    let providers = format!(
        "providers:\n  uts: {{type: http, baseUrl: \"{}\", token: \"${{UTS_TOKEN}}\"}}\n",
        store.base_url()
    );
    let mut s = start("bypass-own", &providers, &services);
    let log = s.daemon.log_text();
    assert!(
        log.contains("this process in its pid namespace")
            && log.contains("\"initial_pid_namespace\":false")
            && log.contains("\"pid\":1"),
        "the broker runs as pid 1 of its own pid namespace and is recognised there:\n{log}"
    );

    for i in 0..3 {
        let out = app_psql(&s, &[]);
        let text = output_text(&out);
        assert!(
            out.status.success() && text.trim() == "app_user",
            "psql {i} through the broker: {text}\n{}",
            s.daemon.log_text()
        );
    }
    let log = s.daemon.log_until(Duration::from_secs(5), |l| {
        lines_of(&access_lines(l), "db").len() >= 3
    });
    let access = access_lines(&log);
    let db = lines_of(&access, "db");
    assert_eq!(db.len(), 3, "three brokered sessions:\n{log}");
    for a in &db {
        assert_eq!(a["result"], "ok", "{a}");
        // Looked up nowhere: the broker's /proc is its own pid namespace's, so the name
        // is the connecting thread's, from the kernel.
        assert_eq!(a["caller.comm"], "psql", "{a}");
        assert_eq!(
            a["caller.cgroup"].as_u64(),
            Some(s.pod.container_id("app")),
            "{a}"
        );
    }
    // No loop: the broker's upstream connects (to an intercepted address: the marked
    // dialer) and its store requests (no mark: its process) went direct.
    assert!(
        lines_of(&access, "trap").is_empty(),
        "the broker's own request to its secret store was intercepted:\n{log}"
    );
    assert!(
        store.requests_for("db-password") >= 3,
        "the store was asked once per connection (cacheTTL 0s): {}",
        store.requests_for("db-password")
    );
    let st = s.daemon.stop();
    let log = s.daemon.log_text();
    assert!(st.success(), "the broker stopped cleanly ({st}):\n{log}");
    assert_no_secret(&log, &[PASSWORD, TOKEN], "broker log");
}

/// A python3 snippet: set `SO_MARK` to the broker's bypass mark on a socket; prints
/// `mark ok` or `mark refused <errno name>`.
const SET_MARK: &str = r#"
import errno, socket
s = socket.socket()
try:
    s.setsockopt(socket.SOL_SOCKET, socket.SO_MARK, 0x539)
    print("mark ok", flush=True)
except OSError as e:
    print("mark refused", errno.errorcode.get(e.errno, e.errno), flush=True)
"#;

/// Set the mark, then connect to the target with it and print what happened.
const CONNECT_MARKED: &str = r#"
import socket, sys
s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_MARK, 0x539)
s.settimeout(10)
try:
    s.connect((sys.argv[1], int(sys.argv[2])))
    print("connected to", s.getpeername(), flush=True)
except OSError as e:
    print("direct connect failed:", type(e).__name__, flush=True)
"#;

fn app_python(s: &Setup, prefix: &[&str], script: &str, args: &[&str]) -> String {
    let python = python_with_psycopg2().expect("python3 (cargo xtask setup)");
    let mut argv: Vec<&str> = vec!["timeout", "--kill-after=5", "30"];
    argv.extend_from_slice(prefix);
    argv.extend_from_slice(&[python.to_str().expect("UTF-8"), "-c", script]);
    argv.extend_from_slice(args);
    let out = container(&argv, &s.pod.container("app"), None, CgroupView::Host, None)
        .stdin(Stdio::null())
        .output()
        .expect("run python3 in the app container");
    output_text(&out)
}

#[test]
fn an_unprivileged_app_cannot_claim_the_bypass() {
    if !privileged() {
        return;
    }
    let pg = PgServer::start(PgOptions::new(PgAuth::Scram, PASSWORD));
    let dir = tempfile::tempdir().expect("tempdir");
    let pw = write_file(dir.path(), "pw", PASSWORD);
    let s = start(
        "bypass-claim",
        "",
        &pg_service(&pg, &format!("{{from: file, get: {}}}", pw.display())),
    );
    let nobody = ["runuser", "-u", "nobody", "--"];

    // The mark: refused to nobody, and to root of a user namespace of its own (the
    // network namespace belongs to the initial user namespace).
    let t = app_python(&s, &nobody, SET_MARK, &[]);
    assert!(t.contains("mark refused EPERM"), "nobody: {t}");
    let userns = ["runuser", "-u", "nobody", "--", "unshare", "-Ur"];
    let t = app_python(&s, &userns, SET_MARK, &[]);
    assert!(
        t.contains("mark refused EPERM"),
        "root of its own user namespace: {t}"
    );

    // Brokered as nobody, and as pid 1 of a pid namespace of its own (the broker is
    // pid 1 of its own too): the same number in another namespace is not the broker.
    let out = app_psql(&s, &nobody);
    assert!(
        out.status.success() && output_text(&out).trim() == "app_user",
        "nobody's psql: {}\n{}",
        output_text(&out),
        s.daemon.log_text()
    );
    let pid1 = [
        "runuser",
        "-u",
        "nobody",
        "--",
        "unshare",
        "-Urpf",
        "--mount-proc",
    ];
    let out = app_psql(&s, &pid1);
    assert!(
        out.status.success() && output_text(&out).trim() == "app_user",
        "psql as pid 1 of its own pid namespace: {}\n{}",
        output_text(&out),
        s.daemon.log_text()
    );
    let log = s.daemon.log_until(Duration::from_secs(5), |l| {
        lines_of(&access_lines(l), "db").len() >= 2
    });
    let access = access_lines(&log);
    let db = lines_of(&access, "db");
    assert_eq!(db.len(), 2, "both brokered:\n{log}");
    for a in &db {
        assert_eq!(a["result"], "ok", "{a}");
        assert_eq!(a["caller.uid"], 65534, "{a}");
    }

    // For the record: root with CAP_NET_ADMIN in the pod can set the mark; its
    // connection then skips the broker and goes to the address it dialled, where
    // nothing listens (the app holds no credential either way).
    let t = app_python(
        &s,
        &[],
        CONNECT_MARKED,
        &[TARGET_HOST, &TARGET_PORT.to_string()],
    );
    assert!(
        t.contains("direct connect failed: ConnectionRefusedError"),
        "a marked socket goes direct: {t}"
    );
    let log = s.daemon.log_text();
    assert_eq!(
        lines_of(&access_lines(&log), "db").len(),
        2,
        "the marked connection was not brokered:\n{log}"
    );
    assert_no_secret(&log, &[PASSWORD], "broker log");
}
