//! The Kubernetes sidecar, simulated with the kernel objects a container runtime uses
//! (`broker_tests::pod`): a pod is a network namespace with a veth pair to the node
//! and a cgroup with one child per container; each container's process runs in its
//! container's cgroup, in the pod's network namespace, as pid 1 of a pid namespace of
//! its own; the broker's container also has a cgroup namespace of its own (its view of
//! `/sys/fs/cgroup` is its own cgroup) and the node's hierarchy mounted elsewhere (the
//! manifest's hostPath). This is `deploy/kubernetes/sidecar/` without Kubernetes.
//!
//! The broker finds its pod's cgroup itself (`--cgroup-from-self 1`), attaches there,
//! serves on the pod's loopback and answers health probes on the pod IP
//! (`--health-addr 0.0.0.0:PORT`, probed from the node); the app container's `psql`
//! dials the database's real address (on the node) and is brokered, the upstream
//! leaving from the pod; the same address dialled from the node, or from the pod's
//! network namespace outside the pod's cgroup, is not intercepted.

use std::{
    process::{Output, Stdio},
    time::Duration,
};

use broker_tests::{
    assert_no_secret, broker_bin, free_port, http_get,
    net::bpftool_cgroup_show,
    output_text,
    pg::{PgAuth, PgOptions, PgServer},
    pod::{CgroupView, Netns, NsDaemon, PodCgroup, container},
    privileged, write_file,
};

const PASSWORD: &str = "sidecar-pw-71d04c9be3";

fn psql_argv(dsn: &str, sql: &'static str) -> Vec<String> {
    [
        "timeout",
        "--kill-after=5",
        "30",
        "psql",
        "-X",
        "-w",
        "-A",
        "-t",
    ]
    .iter()
    .map(|s| (*s).to_owned())
    .chain([dsn.to_owned(), "-c".to_owned(), sql.to_owned()])
    .collect()
}

fn run(mut cmd: std::process::Command) -> Output {
    cmd.env_remove("PGPASSWORD")
        .stdin(Stdio::null())
        .output()
        .expect("spawn")
}

#[test]
fn a_sidecar_brokers_its_pods_app_and_nothing_else() {
    if !privileged() {
        return;
    }
    let netns = Netns::new();
    let pg = PgServer::start(
        PgOptions::new(PgAuth::Scram, PASSWORD).also_listen(netns.node_ip, &netns.cidr()),
    );
    let db = format!("{}:{}", netns.node_ip, pg.port);
    let pod = PodCgroup::new("sidecar", &["broker", "app"]);
    let dir = tempfile::tempdir().expect("tempdir");
    let host_view = dir.path().join("host-cgroup");
    std::fs::create_dir(&host_view).expect("mkdir");
    let pw = write_file(dir.path(), "db-password", PASSWORD);
    // The ConfigMap of deploy/kubernetes/sidecar, reduced to one service: the app
    // dials the database's real address; no host credential, so the upstream is that
    // address.
    let cfg = write_file(
        dir.path(),
        "broker.yaml",
        &format!(
            "version: 2\nservices:\n  db:\n    connector: pg\n    intercept: [\"{db}\"]\n    credentials:\n      sslmode: disable\n      username: app_user\n      password: {{from: file, get: {}}}\n",
            pw.display()
        ),
    );
    let health = free_port();
    let bin = broker_bin();
    let health_flag = format!("0.0.0.0:{health}");
    let broker = container(
        &[
            bin.to_str().expect("UTF-8"),
            "--log-format",
            "json",
            "run",
            "-f",
            cfg.to_str().expect("UTF-8"),
            "--cgroup-from-self",
            "1",
            "--health-addr",
            &health_flag,
        ],
        &pod.container("broker"),
        Some(&netns),
        CgroupView::Private,
        Some(&host_view),
    );
    // Probed from the node, at the pod IP, as the kubelet does.
    let probe = std::net::SocketAddr::from((netns.pod_ip, health));
    let mut daemon = NsDaemon::start(broker, probe, &dir.path().join("broker.log"));
    let log = daemon.log_text();
    let attached = host_view.join(
        pod.path
            .file_name()
            .expect("pod cgroup name")
            .to_str()
            .expect("UTF-8"),
    );
    assert!(
        log.contains("attaching above this process's own cgroup")
            && log.contains(&format!("\"cgroup\":\"{}\"", attached.display())),
        "the broker found its pod's cgroup ({}) through the node's hierarchy:\n{log}",
        attached.display()
    );
    assert!(
        log.contains("\"initial_pid_namespace\":false"),
        "the broker runs in a pid namespace of its own:\n{log}"
    );
    assert!(
        bpftool_cgroup_show(&pod.path).contains("connect4"),
        "programs attached to the pod's cgroup"
    );
    assert_eq!(
        http_get(probe, "/live").map(|(s, _)| s),
        Some(200),
        "/live on the pod IP"
    );

    // The app container: brokered, and the server sees the pod as the client.
    let dsn = format!(
        "host={} port={} user=whoever password=dummy dbname=app sslmode=disable connect_timeout=10",
        netns.node_ip, pg.port
    );
    let argv = psql_argv(
        &dsn,
        "select current_user || ' ' || host(inet_client_addr())",
    );
    let argv: Vec<&str> = argv.iter().map(String::as_str).collect();
    let out = run(container(
        &argv,
        &pod.container("app"),
        Some(&netns),
        CgroupView::Host,
        None,
    ));
    let text = output_text(&out);
    assert!(
        out.status.success() && text.trim() == format!("app_user {}", netns.pod_ip),
        "the app's psql through the sidecar: {text}\n{}",
        daemon.log_text()
    );
    let log = daemon.log_until(Duration::from_secs(5), |l| {
        l.contains("\"target\":\"access\"")
    });
    let access: Vec<serde_json::Value> = log
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|v| v["target"] == "access")
        .collect();
    assert_eq!(access.len(), 1, "one brokered session:\n{log}");
    let a = &access[0];
    assert_eq!(a["service"], "db", "{a}");
    assert_eq!(a["result"], "ok", "{a}");
    assert_eq!(a["dst.addr"], db.as_str(), "{a}");
    assert_eq!(a["caller.comm"], "psql", "{a}");
    assert_eq!(
        a["caller.cgroup"].as_u64(),
        Some(pod.container_id("app")),
        "{a}"
    );

    // Not intercepted: the same address from the node, and from the pod's network
    // namespace outside the pod's cgroup. Both reach the server with the dummy password.
    let argv = psql_argv(&dsn, "select 1");
    let argv: Vec<&str> = argv.iter().map(String::as_str).collect();
    let mut from_node = std::process::Command::new(argv[0]);
    from_node.args(&argv[1..]);
    let t = output_text(&run(from_node));
    assert!(
        t.contains("password authentication failed"),
        "from the node: {t}"
    );
    let mut outside = std::process::Command::new("nsenter");
    outside
        .arg(format!("--net={}", netns.path().display()))
        .arg("--")
        .args(&argv);
    let t = output_text(&run(outside));
    assert!(
        t.contains("password authentication failed"),
        "from the pod's network namespace, outside its cgroup: {t}"
    );
    let log = daemon.log_text();
    assert_eq!(
        log.matches("\"target\":\"access\"").count(),
        1,
        "nothing else was brokered:\n{log}"
    );

    let st = daemon.stop();
    let log = daemon.log_text();
    assert!(st.success(), "stopped cleanly ({st}):\n{log}");
    assert_no_secret(&log, &[PASSWORD], "broker log");
    assert!(
        !bpftool_cgroup_show(&pod.path).contains("connect4"),
        "detached at exit"
    );
}
