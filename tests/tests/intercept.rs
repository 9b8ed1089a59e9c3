//! Interception core, end to end and for real: the eBPF programs are attached to child
//! cgroups these tests create, unmodified clients (python3, curl) connect, and we assert
//! on what they got, the access log and `bpftool cgroup show`.

use std::{
    io::Read as _,
    net::TcpStream,
    path::Path,
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use broker_tests::{
    Daemon, assert_no_secret, broker_bin, broker_exec, free_port,
    net::{TestCgroup, Upstream},
    output_text, privileged,
    secret_server::SecretServer,
    write_file,
};

/// A python3 client: connect to each `host port` argument (dual-stack socket for IPv6
/// addresses), print `getpeername()` and whether the upstream's body came back.
const CLIENT: &str = r#"
import socket, sys, threading
args = sys.argv[1:]
def run():
    # Name this thread as the kernel sees it: the access line names the process
    # (python3) and the connecting thread apart.
    with open(f"/proc/self/task/{threading.get_native_id()}/comm", "w") as f:
        f.write("conn-worker")
    for i in range(0, len(args), 2):
        host, port = args[i], int(args[i + 1])
        fam, _, _, _, addr = socket.getaddrinfo(host, port, 0, socket.SOCK_STREAM)[0]
        s = socket.socket(fam, socket.SOCK_STREAM)
        if fam == socket.AF_INET6:
            s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        s.settimeout(10)
        try:
            s.connect(addr)
            peer = s.getpeername()
            s.sendall(b"GET / HTTP/1.0\r\n\r\n")
            data = b""
            while True:
                d = s.recv(4096)
                if not d:
                    break
                data += d
            body = data.split(b"\r\n\r\n", 1)[-1].decode()
            print(f"RESULT {host} {port} peer={peer[0]}:{peer[1]} body={body!r}", flush=True)
        except Exception as e:
            print(f"RESULT {host} {port} error={type(e).__name__}", flush=True)
t = threading.Thread(target=run)
t.start()
t.join()
"#;

fn result_line<'a>(out: &'a str, host: &str, port: u16) -> &'a str {
    let prefix = format!("RESULT {host} {port} ");
    out.lines()
        .find(|l| l.starts_with(&prefix))
        .unwrap_or_else(|| panic!("no result for {host}:{port} in:\n{out}"))
}

#[test]
fn exec_redirects_hostname_ipv6_and_mapped_and_leaves_the_rest_alone() {
    if !privileged() {
        return;
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let web = Upstream::start("127.0.0.2", "web");
    let v6 = Upstream::start("::1", "web6");
    let other = Upstream::start("127.0.0.3", "other");
    let script = write_file(dir.path(), "client.py", CLIENT);
    // The service has no host credential: the upstream is the original destination.
    let cfg = write_file(
        dir.path(),
        "broker.yaml",
        &format!(
            "version: 2\nservices:\n  web:\n    connector: tcp\n    intercept:\n      - web.example.test:{}\n      - \"[::1]:{}\"\n",
            web.addr.port(),
            v6.addr.port()
        ),
    );
    let (wp, v6p, op) = (
        web.addr.port().to_string(),
        v6.addr.port().to_string(),
        other.addr.port().to_string(),
    );
    let client = [
        "python3",
        script.to_str().unwrap(),
        "web.example.test",
        &wp,
        "::1",
        &v6p,
        "::ffff:127.0.0.2",
        &wp,
        "127.0.0.3",
        &op,
    ];
    let child = broker_exec(
        dir.path(),
        &[("web.example.test", "127.0.0.2")],
        &["--log-format", "json"],
        &cfg,
        &client,
    )
    .stdin(Stdio::null())
    .stdout(Stdio::piped())
    .stderr(Stdio::piped())
    .spawn()
    .expect("run broker exec");
    // unshare and sh exec in place: the child's pid is the broker's.
    let exec_cgroup = broker_tests::net::cgroup2_root().join(format!("broker-exec-{}", child.id()));
    let out = child.wait_with_output().expect("wait broker exec");
    let text = output_text(&out);
    assert!(out.status.success(), "broker exec failed:\n{text}");

    // Hostname, IPv6 and IPv4-mapped destinations reached the upstream through the
    // broker, and the client saw the real peer, never the broker.
    let l = result_line(&text, "web.example.test", web.addr.port());
    assert!(l.contains("body='hello from web'"), "{l}");
    assert!(
        l.contains(&format!("peer=127.0.0.2:{}", web.addr.port())),
        "{l}"
    );
    let l = result_line(&text, "::1", v6.addr.port());
    assert!(l.contains("body='hello from web6'"), "{l}");
    assert!(l.contains(&format!("peer=::1:{}", v6.addr.port())), "{l}");
    let l = result_line(&text, "::ffff:127.0.0.2", web.addr.port());
    assert!(l.contains("body='hello from web'"), "{l}");
    assert!(
        l.contains(&format!("peer=::ffff:127.0.0.2:{}", web.addr.port())),
        "{l}"
    );
    // A destination that is not configured goes direct.
    let l = result_line(&text, "127.0.0.3", other.addr.port());
    assert!(l.contains("body='hello from other'"), "{l}");

    // One access-log line per brokered connection, with caller and original destination.
    let access: Vec<serde_json::Value> = text
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|v| v["target"] == "access")
        .collect();
    assert_eq!(access.len(), 3, "three brokered connections:\n{text}");
    for a in &access {
        assert_eq!(a["service"], "web");
        assert_eq!(a["result"], "ok", "{a}");
        assert_eq!(a["caller.comm"], "python3", "{a}");
        assert_eq!(a["caller.thread"], "conn-worker", "{a}");
        assert!(a["caller.pid"].as_u64().unwrap_or(0) > 0, "{a}");
        assert_eq!(a["caller.uid"], 0, "{a}");
        assert!(a["caller.cgroup"].as_u64().unwrap_or(0) > 0, "{a}");
        assert!(a["bytes.down"].as_u64().unwrap_or(0) > 0, "{a}");
    }
    let dsts: Vec<&str> = access
        .iter()
        .filter_map(|a| a["dst.addr"].as_str())
        .collect();
    // The hostname the app dialled is named beside its address.
    assert!(
        access.iter().any(|a| a["dst.host"] == "web.example.test"
            && a["dst.addr"] == format!("127.0.0.2:{}", web.addr.port()).as_str()),
        "{access:?}"
    );
    assert!(
        dsts.contains(&format!("127.0.0.2:{}", web.addr.port()).as_str()),
        "{dsts:?}"
    );
    assert!(
        dsts.contains(&format!("[::1]:{}", v6.addr.port()).as_str()),
        "{dsts:?}"
    );
    assert!(
        !text.contains(&format!("127.0.0.3:{}", other.addr.port()).replace(':', "\":")),
        "not brokered"
    );
    // The exec cgroup is gone.
    assert!(
        !exec_cgroup.exists(),
        "{} left behind",
        exec_cgroup.display()
    );
}

#[test]
fn exec_with_curl_and_exit_status() {
    if !privileged() {
        return;
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let web = Upstream::start("127.0.0.1", "curl-upstream");
    // Intercept an address where nothing listens; credentials.host/port send the
    // connection to the real upstream.
    let port = free_port();
    let cfg = write_file(
        dir.path(),
        "broker.yaml",
        &format!(
            "version: 2\nservices:\n  api:\n    connector: tcp\n    intercept: [\"api.example.test:{port}\"]\n    credentials:\n      host: 127.0.0.1\n      port: \"{}\"\n",
            web.addr.port()
        ),
    );
    let url = format!("http://api.example.test:{port}/");
    let out = broker_exec(
        dir.path(),
        &[("api.example.test", "127.0.0.4")],
        &[],
        &cfg,
        &["curl", "-sS", "-m", "10", &url],
    )
    .output()
    .expect("run broker exec curl");
    let text = output_text(&out);
    assert!(out.status.success(), "{text}");
    assert!(text.contains("hello from curl-upstream"), "{text}");
    assert_eq!(web.hits(), 1);

    // exec returns the command's own exit status.
    let out = Command::new(broker_bin())
        .args([
            "exec",
            "-f",
            cfg.to_str().unwrap(),
            "--",
            "sh",
            "-c",
            "exit 7",
        ])
        .output()
        .expect("run broker exec sh");
    assert_eq!(out.status.code(), Some(7), "{}", output_text(&out));
}

fn run_config(dir: &Path, health: u16, body: &str) -> std::path::PathBuf {
    write_file(
        dir,
        "broker.yaml",
        &format!("version: 2\nbroker:\n  health: 127.0.0.1:{health}\nservices:\n{body}"),
    )
}

fn transparent_port(log: &str) -> u16 {
    log.lines()
        .find(|l| l.contains("transparent listener bound") && l.contains("127.0.0.1:"))
        .and_then(|l| l.split("127.0.0.1:").nth(1))
        .and_then(|rest| rest.split(|c: char| !c.is_ascii_digit()).next())
        .and_then(|p| p.parse().ok())
        .unwrap_or_else(|| panic!("no transparent listener in log:\n{log}"))
}

#[test]
fn run_refuses_direct_connections_and_detaches_on_sigterm_and_sigkill() {
    if !privileged() {
        return;
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let cg = TestCgroup::new("run");
    let web = Upstream::start("127.0.0.2", "run-web");
    let health = free_port();
    let cfg = run_config(
        dir.path(),
        health,
        &format!(
            "  web:\n    connector: tcp\n    intercept: [\"127.0.0.2:{}\"]\n",
            web.addr.port()
        ),
    );
    let script = write_file(dir.path(), "client.py", CLIENT);
    let client = |cg: &TestCgroup| {
        let mut c = Command::new("python3");
        c.arg(&script)
            .arg("127.0.0.2")
            .arg(web.addr.port().to_string());
        cg.enter(&mut c);
        output_text(&c.output().expect("run client"))
    };
    let health_addr = format!("127.0.0.1:{health}").parse().unwrap();
    let log = dir.path().join("broker.log");
    let mut d = Daemon::start(
        &cfg,
        &["--cgroup", cg.path.to_str().unwrap()],
        health_addr,
        &log,
    );
    assert_eq!(
        broker_tests::http_get(health_addr, "/live").map(|r| r.0),
        Some(200)
    );
    let attached = cg.attached();
    for prog in [
        "connect4",
        "connect6",
        "getpeername4",
        "getpeername6",
        "sock_ops",
    ] {
        assert!(attached.contains(prog), "{prog} not attached:\n{attached}");
    }

    // A process in the cgroup is brokered.
    let out = client(&cg);
    assert!(out.contains("body='hello from run-web'"), "{out}");
    assert_eq!(web.hits(), 1);

    // A process outside the cgroup connecting straight to the listener gets nothing.
    let port = transparent_port(&d.log_text());
    let mut s = TcpStream::connect(("127.0.0.1", port)).expect("connect to listener");
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut buf = Vec::new();
    let n = s.read_to_end(&mut buf).unwrap_or(0);
    assert_eq!(n, 0, "a direct connection must get no byte");
    let deadline = Instant::now() + Duration::from_secs(5);
    while !d.log_text().contains("no redirect record") && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(
        d.log_text().contains("no redirect record"),
        "{}",
        d.log_text()
    );
    assert_eq!(
        web.hits(),
        1,
        "the refused connection never reached the upstream"
    );

    // SIGTERM: clean exit, nothing attached, connections go direct again.
    let st = d.stop();
    assert!(st.success(), "exit status {st}:\n{}", d.log_text());
    assert_eq!(
        cg.attached()
            .lines()
            .filter(|l| l.contains("connect"))
            .count(),
        0,
        "{}",
        cg.attached()
    );
    let out = client(&cg);
    assert!(out.contains("body='hello from run-web'"), "{out}");
    assert_eq!(web.hits(), 2, "direct connection reached the server");

    // SIGKILL: the kernel closes the link fds, which detaches everything.
    let health2 = free_port();
    let cfg2 = run_config(
        dir.path(),
        health2,
        &format!(
            "  web:\n    connector: tcp\n    intercept: [\"127.0.0.2:{}\"]\n",
            web.addr.port()
        ),
    );
    let mut d2 = Daemon::start(
        &cfg2,
        &["--cgroup", cg.path.to_str().unwrap()],
        format!("127.0.0.1:{health2}").parse().unwrap(),
        &dir.path().join("broker2.log"),
    );
    assert!(cg.attached().contains("connect4"));
    d2.child.kill().expect("SIGKILL");
    let _ = d2.child.wait();
    let deadline = Instant::now() + Duration::from_secs(5);
    while cg.attached().contains("connect4") && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(!cg.attached().contains("connect4"), "{}", cg.attached());
}

#[test]
fn run_fails_cleanly_on_start_errors() {
    if !privileged() {
        return;
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let cg = TestCgroup::new("starterr");
    // The listenOn port is taken: start-up fails naming the address; nothing attached.
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let taken_port = taken.local_addr().unwrap().port();
    let cfg = run_config(
        dir.path(),
        free_port(),
        &format!(
            "  web:\n    connector: tcp\n    listenOn: tcp://127.0.0.1:{taken_port}\n    intercept: [\"127.0.0.2:80\"]\n    credentials:\n      host: 127.0.0.1\n"
        ),
    );
    let out = Command::new(broker_bin())
        .args([
            "run",
            "-f",
            cfg.to_str().unwrap(),
            "--cgroup",
            cg.path.to_str().unwrap(),
        ])
        .output()
        .expect("run broker");
    let text = output_text(&out);
    assert!(!out.status.success());
    assert!(text.contains(&format!("127.0.0.1:{taken_port}")), "{text}");
    assert!(
        cg.attached().trim().lines().count() <= 1,
        "{}",
        cg.attached()
    );
    // A cgroup that does not exist: clear error naming it.
    let out = Command::new(broker_bin())
        .args([
            "run",
            "-f",
            cfg.to_str().unwrap(),
            "--cgroup",
            "/sys/fs/cgroup/does-not-exist-xyz",
        ])
        .output()
        .expect("run broker");
    assert!(!out.status.success());
}

#[test]
fn failing_secret_store_closes_cleanly_and_other_services_keep_working() {
    if !privileged() {
        return;
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let cg = TestCgroup::new("store");
    let web = Upstream::start("127.0.0.2", "store-web");
    let ok = Upstream::start("127.0.0.3", "literal-web");
    let token = "tok-3f9a1c77e2";
    let store = SecretServer::start(token);
    store.set("web/host", "127.0.0.2");
    store.set("web/password", "s3cr3t-value-should-never-print");
    store.set_failing(true);
    let health = free_port();
    let cfg = run_config(
        dir.path(),
        health,
        &format!(
            "  web:\n    connector: tcp\n    intercept: [\"127.0.0.9:{wp}\"]\n    credentials:\n      host: {{from: uts, get: web/host}}\n      password: {{from: uts, get: web/password}}\n      port: \"{wp}\"\n  other:\n    connector: tcp\n    intercept: [\"127.0.0.3:{op}\"]\nproviders:\n  uts:\n    type: http\n    baseUrl: {base}\n    token: ${{UTS_TOKEN_FOR_TEST}}\n",
            wp = web.addr.port(),
            op = ok.addr.port(),
            base = store.base_url()
        ),
    );
    let script = write_file(dir.path(), "client.py", CLIENT);
    let log = dir.path().join("broker.log");
    // The token comes from the environment, through ${...} interpolation.
    let d = Daemon::start_with_env(
        &cfg,
        &[
            "--cgroup",
            cg.path.to_str().unwrap(),
            "--log-format",
            "json",
        ],
        &[("UTS_TOKEN_FOR_TEST", token)],
        format!("127.0.0.1:{health}").parse().unwrap(),
        &log,
    );
    let client = |host: &str, port: u16| {
        let mut c = Command::new("python3");
        c.arg(&script).arg(host).arg(port.to_string());
        cg.enter(&mut c);
        output_text(&c.output().expect("run client"))
    };
    let out = client("127.0.0.9", web.addr.port());
    let l = result_line(&out, "127.0.0.9", web.addr.port());
    assert!(l.contains("body=''"), "clean close, no data: {l}");
    assert_eq!(web.hits(), 0);
    // The other service still works.
    let out = client("127.0.0.3", ok.addr.port());
    assert!(out.contains("body='hello from literal-web'"), "{out}");
    // The store recovers: the same service works without a restart.
    store.set_failing(false);
    let out = client("127.0.0.9", web.addr.port());
    assert!(out.contains("body='hello from store-web'"), "{out}");

    let deadline = Instant::now() + Duration::from_secs(5);
    while d.log_text().matches("\"target\":\"access\"").count() < 3 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    let text = d.log_text();
    let lines: Vec<serde_json::Value> = text
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .filter(|v: &serde_json::Value| v["target"] == "access")
        .collect();
    let failed = lines
        .iter()
        .find(|v| v["result"] == "credentials_error")
        .unwrap_or_else(|| panic!("no credentials_error access line:\n{text}"));
    assert_eq!(failed["service"], "web");
    assert!(
        failed["error"].as_str().unwrap_or("").contains("uts"),
        "{failed}"
    );
    assert!(
        lines
            .iter()
            .any(|v| v["service"] == "other" && v["result"] == "ok")
    );
    assert!(
        lines
            .iter()
            .any(|v| v["service"] == "web" && v["result"] == "ok")
    );
    assert_no_secret(
        &text,
        &["s3cr3t-value-should-never-print", token],
        "broker log",
    );
}
