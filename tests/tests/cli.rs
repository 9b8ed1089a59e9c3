//! The command line as users meet it: Secretless Broker's invocation (`broker -f FILE`,
//! Go flag syntax, its flags given their meaning or a clear "not supported"), `broker
//! version`, `broker check FILE` and `-c/--config`, `broker exec` without `--`, a bad
//! `--log-level`, the health endpoint's Secretless replies and `--health-addr`, and the
//! error a user without the capabilities gets. `broker -f` with a Secretless file (no
//! `intercept:`) loads no eBPF: it is run as `nobody` here, and serves psql.

use std::{
    net::SocketAddr,
    os::unix::fs::PermissionsExt as _,
    path::{Path, PathBuf},
    process::{Child, Command, ExitStatus, Output, Stdio},
    time::{Duration, Instant},
};

use broker_tests::{
    assert_no_secret, broker_bin, fetch, free_port, http_get,
    net::Upstream,
    output_text,
    pg::{PgAuth, PgOptions, PgServer, psql},
    privileged, write_file,
};

fn broker(args: &[&str]) -> Output {
    Command::new(broker_bin())
        .args(args)
        .env_remove("BROKER_LOG")
        .stdin(Stdio::null())
        .output()
        .expect("spawn broker")
}

fn code(o: &Output) -> i32 {
    o.status.code().unwrap_or(-1)
}

fn root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

/// A directory (and files) `nobody` can read, for daemons started as `nobody`.
fn shared_dir() -> tempfile::TempDir {
    let d = tempfile::tempdir().expect("tempdir");
    std::fs::set_permissions(d.path(), std::fs::Permissions::from_mode(0o755)).expect("chmod");
    d
}

/// A Secretless-format file (no key of ours): one `tcp` service on `listenOn`.
fn tcp_service_config(dir: &Path, listen: u16, upstream: SocketAddr) -> PathBuf {
    let p = write_file(
        dir,
        "secretless.yml",
        &format!(
            "version: 2\nservices:\n  web:\n    connector: tcp\n    listenOn: tcp://127.0.0.1:{listen}\n    credentials:\n      host: {}\n      port: \"{}\"\n",
            upstream.ip(),
            upstream.port()
        ),
    );
    std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o644)).expect("chmod");
    p
}

/// A daemon started with `args`, its output in `log`, SIGTERMed on drop.
struct Proc {
    child: Child,
    log: PathBuf,
}

impl Proc {
    /// `broker <args>`; as `nobody` when `as_nobody` (and we are root).
    fn start(args: &[&str], env: &[(&str, &str)], log: &Path, as_nobody: bool) -> Self {
        let out = std::fs::File::create(log).expect("log");
        let bin = broker_bin();
        let mut c = if as_nobody {
            let mut c = Command::new("setpriv");
            c.args([
                "--reuid=65534",
                "--regid=65534",
                "--clear-groups",
                "--inh-caps=-all",
                "--",
            ])
            .arg(&bin);
            c
        } else {
            Command::new(&bin)
        };
        let child = c
            .args(args)
            .env_remove("BROKER_LOG")
            .envs(env.iter().copied())
            .stdin(Stdio::null())
            .stdout(out.try_clone().expect("dup"))
            .stderr(out)
            .spawn()
            .expect("spawn broker");
        Self {
            child,
            log: log.to_path_buf(),
        }
    }

    fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    fn wait_ready(&mut self, health: SocketAddr) {
        let deadline = Instant::now() + Duration::from_secs(30);
        while Instant::now() < deadline {
            if let Some(st) = self.child.try_wait().expect("try_wait") {
                panic!("broker exited early ({st}):\n{}", self.log_text());
            }
            if matches!(http_get(health, "/ready"), Some((200, _))) {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        panic!("broker not ready on {health}:\n{}", self.log_text());
    }

    fn signal(&self, sig: i32) {
        // SAFETY: kill with a pid we own.
        unsafe { libc::kill(self.child.id() as i32, sig) };
    }

    fn stop(&mut self) -> ExitStatus {
        self.signal(libc::SIGTERM);
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            if let Some(st) = self.child.try_wait().expect("try_wait") {
                return st;
            }
            assert!(
                Instant::now() < deadline,
                "broker did not exit on SIGTERM:\n{}",
                self.log_text()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        if matches!(self.child.try_wait(), Ok(None)) {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

fn health(port: u16) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], port))
}

#[test]
fn version_in_every_spelling() {
    let want = format!("broker {}\n", env!("CARGO_PKG_VERSION"));
    for args in [
        &["version"][..],
        &["--version"],
        &["-version"],
        &["--version=true"],
        // Secretless: `version` after the flags.
        &["-f", "/nonexistent.yml", "version"],
    ] {
        let o = broker(args);
        assert_eq!(code(&o), 0, "{args:?}: {}", output_text(&o));
        assert_eq!(String::from_utf8_lossy(&o.stdout), want, "{args:?}");
    }
}

#[test]
fn check_takes_the_file_positionally_or_with_any_flag_spelling() {
    let d = tempfile::tempdir().expect("tempdir");
    let up: SocketAddr = "127.0.0.1:9".parse().expect("addr");
    let f = tcp_service_config(d.path(), free_port(), up);
    let f = f.to_str().expect("utf-8");
    let eq = format!("--config={f}");
    for args in [
        &["check", f][..],
        &["check", "-f", f],
        &["check", "-c", f],
        &["check", "--config", f],
        &["check", &eq],
        &["check", "--file", f],
        &["check", "--strict", f],
    ] {
        let o = broker(args);
        assert_eq!(code(&o), 0, "{args:?}: {}", output_text(&o));
        assert!(output_text(&o).contains("OK: 1 service(s)"), "{args:?}");
    }
    // Neither, or both: a usage error.
    assert_eq!(code(&broker(&["check"])), 2);
    assert_eq!(code(&broker(&["check", "-f", f, f])), 2);
    // `-c/--config` on the other commands too.
    let o = broker(&["run", "--help"]);
    assert!(output_text(&o).contains("--config"), "{}", output_text(&o));
}

#[test]
fn check_strict_fails_on_what_secretless_tolerates() {
    // An unknown top-level key in a Secretless-format file (its quick start sets
    // `debug: true`): a warning by default, an error under --strict.
    let d = tempfile::tempdir().expect("tempdir");
    let f = write_file(
        d.path(),
        "secretless.yml",
        "version: 2\ndebug: true\nservices:\n  web:\n    connector: tcp\n    listenOn: tcp://127.0.0.1:15999\n    credentials:\n      host: 127.0.0.1\n      port: \"9\"\n",
    );
    let f = f.to_str().expect("utf-8");
    let strict = broker(&["check", "--strict", f]);
    let text = output_text(&strict);
    assert_eq!(code(&strict), 78, "{text}");
    assert!(text.contains("debug"), "{text}");
    let lenient = broker(&["check", f]);
    let text = output_text(&lenient);
    assert!(text.contains("debug"), "{text}");
    if code(&lenient) == 0 {
        assert!(text.contains("warning"), "{text}");
    }
}

#[test]
fn exec_without_the_separator_says_where_the_command_goes() {
    let o = broker(&["exec", "-f", "broker.yaml", "psql", "-h", "db.example.com"]);
    let text = output_text(&o);
    assert_eq!(code(&o), 2, "{text}");
    assert!(
        text.contains("put the command after `--`")
            && text.contains("`psql`")
            && text.contains("broker exec -f FILE -- COMMAND"),
        "{text}"
    );
    let o = broker(&["exec", "-c", "broker.yaml"]);
    assert!(
        output_text(&o).contains("after `--`"),
        "{}",
        output_text(&o)
    );
}

#[test]
fn an_invalid_log_level_is_an_error_naming_it() {
    let d = tempfile::tempdir().expect("tempdir");
    let f = tcp_service_config(d.path(), free_port(), "127.0.0.1:9".parse().expect("addr"));
    let f = f.to_str().expect("utf-8");
    let o = broker(&["--log-level", "verbose", "run", "--no-ebpf", "-f", f]);
    let text = output_text(&o);
    assert_eq!(code(&o), 2, "{text}");
    assert!(
        text.contains("invalid --log-level \"verbose\"") && text.contains("not a log level"),
        "{text}"
    );
    let o = Command::new(broker_bin())
        .args(["check", f])
        .env("BROKER_LOG", "warning")
        .output()
        .expect("spawn");
    let text = output_text(&o);
    assert_eq!(code(&o), 2, "{text}");
    assert!(text.contains("invalid BROKER_LOG \"warning\""), "{text}");
    let o = broker(&["-f", f, "-log-level", "x=loud"]);
    let text = output_text(&o);
    assert_eq!(code(&o), 2, "{text}");
    assert!(text.contains("invalid -log-level \"x=loud\""), "{text}");
    // Valid filters still work.
    assert_eq!(
        code(&broker(&["--log-level", "warn,access=info", "check", f])),
        0
    );
}

#[test]
fn secretless_flags_get_their_meaning_or_a_clear_refusal() {
    let d = tempfile::tempdir().expect("tempdir");
    let f = tcp_service_config(d.path(), free_port(), "127.0.0.1:9".parse().expect("addr"));
    let f = f.to_str().expect("utf-8");
    let refused: &[(&[&str], &str)] = &[
        (&["-f", f, "-config-mgr", "k8s/crd"], "Kubernetes CRD"),
        (&["-config-mgr=k8s/crd#myfilter"], "k8s/crd"),
        (
            &["-f", f, "-config-mgr", "vault"],
            "configuration manager not supported",
        ),
        (&["-f", f, "-profile", "cpu"], "profiling is not supported"),
        (&["-f", f, "-nope"], "flag provided but not defined: -nope"),
        (&["-f"], "flag needs an argument: -f"),
        (&["-f", f, "-debug=maybe"], "invalid boolean value"),
        (&["-f", f, "-health-addr", "nowhere"], "-health-addr"),
        (&["-f", f, "run"], "unexpected argument `run`"),
    ];
    for (args, needle) in refused {
        let o = broker(args);
        let text = output_text(&o);
        assert_eq!(code(&o), 2, "{args:?}: {text}");
        assert!(
            text.contains(needle),
            "{args:?}: expected {needle:?} in {text}"
        );
    }
    let o = broker(&["-help"]);
    assert_eq!(code(&o), 0);
    for flag in [
        "-f string",
        "-debug",
        "-watch",
        "-config-mgr",
        "-health-addr",
    ] {
        assert!(
            output_text(&o).contains(flag),
            "{flag}: {}",
            output_text(&o)
        );
    }
    // Subcommand forms are clap's, untouched.
    assert!(output_text(&broker(&["--help"])).contains("Secretless Broker's invocation"));
}

/// `broker -f FILE` with a Secretless file, as `nobody` (no eBPF: no `intercept:`), Go
/// flag spellings, `-watch` warned about, `-debug` logging, Go plugins named, the
/// health endpoint on `-health-addr` answering as Secretless', SIGUSR1 (Secretless'
/// reload signal) ignored, SIGTERM a clean exit.
#[test]
fn secretless_form_serves_listen_on_without_privileges() {
    let d = shared_dir();
    let up = Upstream::start("127.0.0.1", "web");
    let listen = free_port();
    let hp = free_port();
    let f = tcp_service_config(d.path(), listen, up.addr);
    let plugins = d.path().join("plugins");
    std::fs::create_dir(&plugins).expect("mkdir");
    std::fs::write(plugins.join("my-connector.so"), b"").expect("write");
    let hflag = format!("-health-addr=127.0.0.1:{hp}");
    let mut p = Proc::start(
        &[
            "--f",
            f.to_str().expect("utf-8"),
            "-debug",
            "-watch=true",
            "-graceful-exit",
            "-config-mgr",
            "configfile",
            "-p",
            plugins.to_str().expect("utf-8"),
            &hflag,
        ],
        &[],
        &d.path().join("broker.log"),
        root(),
    );
    p.wait_ready(health(hp));
    assert_eq!(fetch(listen), "hello from web", "{}", p.log_text());

    // Secretless' health replies.
    assert_eq!(http_get(health(hp), "/ready"), Some((200, "{}\n".into())));
    assert_eq!(http_get(health(hp), "/live"), Some((200, "{}\n".into())));
    assert_eq!(
        http_get(health(hp), "/ready?full=1"),
        Some((
            200,
            "{\n    \"listening\": \"OK\",\n    \"ready\": \"OK\"\n}\n".into()
        ))
    );
    assert_eq!(
        http_get(health(hp), "/live?full=1"),
        Some((200, "{\n    \"listening\": \"OK\"\n}\n".into()))
    );
    assert_eq!(http_get(health(hp), "/nope").map(|r| r.0), Some(404));

    p.signal(libc::SIGUSR1);
    std::thread::sleep(Duration::from_millis(300));
    assert!(
        matches!(p.child.try_wait(), Ok(None)),
        "SIGUSR1 killed the daemon:\n{}",
        p.log_text()
    );
    assert_eq!(fetch(listen), "hello from web");
    let st = p.stop();
    let log = p.log_text();
    assert!(st.success(), "{st}:\n{log}");
    for needle in [
        "watching the configuration file",
        "my-connector.so",
        "no eBPF programs loaded",
        "DEBUG",
        "reloading the configuration",
        "configuration reloaded",
    ] {
        assert!(log.contains(needle), "expected {needle:?} in:\n{log}");
    }
}

/// `--health-addr` replaces `broker.health` (`broker run`), `off` turns it off.
#[test]
fn health_addr_flag_overrides_the_config() {
    let d = tempfile::tempdir().expect("tempdir");
    let up = Upstream::start("127.0.0.1", "web");
    let listen = free_port();
    let (from_config, from_flag) = (free_port(), free_port());
    let f = write_file(
        d.path(),
        "broker.yaml",
        &format!(
            "version: 2\nbroker:\n  health: 127.0.0.1:{from_config}\nservices:\n  web:\n    connector: tcp\n    listenOn: tcp://127.0.0.1:{listen}\n    credentials:\n      host: 127.0.0.1\n      port: \"{}\"\n",
            up.addr.port()
        ),
    );
    let f = f.to_str().expect("utf-8");
    let flag = format!("127.0.0.1:{from_flag}");
    let mut p = Proc::start(
        &["run", "--no-ebpf", "-c", f, "--health-addr", &flag],
        &[],
        &d.path().join("a.log"),
        false,
    );
    p.wait_ready(health(from_flag));
    assert_eq!(http_get(health(from_config), "/ready"), None);
    assert_eq!(
        http_get(health(from_flag), "/ready?full=1").map(|r| r.0),
        Some(200)
    );
    assert!(p.stop().success());

    // `off`: no health endpoint at all, the listeners still serve.
    let mut p = Proc::start(
        &["run", "--no-ebpf", "-f", f, "--health-addr", "off"],
        &[],
        &d.path().join("b.log"),
        false,
    );
    let deadline = Instant::now() + Duration::from_secs(30);
    while fetch(listen).is_empty() {
        assert!(Instant::now() < deadline, "not serving:\n{}", p.log_text());
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(http_get(health(from_config), "/ready"), None);
    assert!(p.stop().success());
    // A bad address is a usage error naming the flag.
    let o = broker(&["run", "--no-ebpf", "-f", f, "--health-addr", "nowhere"]);
    assert_eq!(code(&o), 2);
    assert!(
        output_text(&o).contains("--health-addr"),
        "{}",
        output_text(&o)
    );
}

/// `broker -f FILE` serves psql through a `listenOn` pg service of a Secretless-format
/// file (password from the environment, as Secretless' `from: env`).
#[test]
fn secretless_form_serves_psql_through_listen_on() {
    if !privileged() {
        return;
    }
    let password = "cli-secretless-pw-5d81c7";
    let pg = PgServer::start(PgOptions::new(PgAuth::Scram, password));
    let d = shared_dir();
    let listen = free_port();
    let hp = free_port();
    let f = write_file(
        d.path(),
        "secretless.yml",
        &format!(
            "version: 2\nservices:\n  pg-db:\n    connector: pg\n    listenOn: tcp://127.0.0.1:{listen}\n    credentials:\n      host: 127.0.0.1\n      port: {}\n      username: {}\n      password:\n        from: env\n        get: CLI_PG_PASSWORD\n      sslmode: disable\n",
            pg.port, pg.user
        ),
    );
    let hflag = format!("127.0.0.1:{hp}");
    let mut p = Proc::start(
        &["-f", f.to_str().expect("utf-8"), "--health-addr", &hflag],
        &[("CLI_PG_PASSWORD", password)],
        &d.path().join("broker.log"),
        false,
    );
    p.wait_ready(health(hp));
    let out = psql(
        &format!(
            "host=127.0.0.1 port={listen} user=anything password=dummy dbname={} sslmode=disable",
            pg.database
        ),
        "select 'ROLE=' || current_user",
    );
    let text = output_text(&out);
    assert!(
        out.status.success() && text.contains(&format!("ROLE={}", pg.user)),
        "{text}\n{}",
        p.log_text()
    );
    assert!(p.stop().success());
    let log = p.log_text();
    assert!(log.contains("no eBPF programs loaded"), "{log}");
    assert_no_secret(&format!("{text}{log}"), &[password], "psql output and log");
}

/// `broker run` as a user without the capabilities: the cause once, naming what is
/// missing; `broker exec` also names the cgroup it cannot create.
#[test]
fn without_capabilities_the_error_names_what_is_missing() {
    if !privileged() {
        return;
    }
    let d = shared_dir();
    let intercepting = write_file(
        d.path(),
        "intercept.yml",
        "version: 2\nbroker:\n  health: off\nservices:\n  db:\n    connector: tcp\n    intercept: [\"192.0.2.10:5432\"]\n    credentials:\n      host: 127.0.0.1\n      port: \"9\"\n",
    );
    std::fs::set_permissions(&intercepting, std::fs::Permissions::from_mode(0o644)).expect("chmod");
    let listen_only = tcp_service_config(d.path(), free_port(), "127.0.0.1:9".parse().expect("a"));
    let as_nobody = |args: &[&str]| {
        Command::new("setpriv")
            .args([
                "--reuid=65534",
                "--regid=65534",
                "--clear-groups",
                "--inh-caps=-all",
                "--",
            ])
            .arg(broker_bin())
            .args(args)
            .env_remove("BROKER_LOG")
            .stdin(Stdio::null())
            .output()
            .expect("spawn")
    };
    let i = intercepting.to_str().expect("utf-8");
    // Never the root cgroup, even if the check let a run through.
    let nowhere = d.path().join("no-such-cgroup");
    let nowhere = nowhere.to_str().expect("utf-8");
    let o = as_nobody(&["run", "-f", i, "--cgroup", nowhere]);
    let text = output_text(&o);
    assert_eq!(code(&o), 1, "{text}");
    assert!(
        text.contains("uid 65534")
            && text.contains("lacks CAP_BPF, CAP_NET_ADMIN, CAP_PERFMON")
            && text.contains("AmbientCapabilities="),
        "{text}"
    );
    // Once: no kernel error repeated after it, no verifier log.
    assert_eq!(text.matches("lacks").count(), 1, "{text}");
    assert!(!text.contains("Operation not permitted"), "{text}");
    // A listenOn-only file: pointed at the way that needs no privileges.
    let o = as_nobody(&[
        "run",
        "-f",
        listen_only.to_str().expect("utf-8"),
        "--cgroup",
        nowhere,
    ]);
    assert!(output_text(&o).contains("--no-ebpf"), "{}", output_text(&o));
    // exec: the capabilities and the cgroup.
    let o = as_nobody(&["exec", "-f", i, "--", "true"]);
    let text = output_text(&o);
    assert_eq!(code(&o), 1, "{text}");
    assert!(
        text.contains("lacks CAP_BPF") && text.contains("child cgroup"),
        "{text}"
    );
    assert!(
        !text.contains("Permission denied (os error 13): Permission denied"),
        "{text}"
    );

    // Root without CAP_PERFMON (the splice programs read kernel memory): named alone.
    let o = Command::new("setpriv")
        .args([
            "--bounding-set=-all,+bpf,+net_admin",
            "--inh-caps=-all",
            "--",
        ])
        .arg(broker_bin())
        .args(["run", "-f", i, "--cgroup", nowhere])
        .env_remove("BROKER_LOG")
        .stdin(Stdio::null())
        .output()
        .expect("spawn");
    let text = output_text(&o);
    assert_eq!(code(&o), 1, "{text}");
    assert!(text.contains("lacks CAP_PERFMON."), "{text}");
    assert!(!text.contains("Verifier output"), "{text}");
}
