//! Restart and upgrade without a failed connect, for real: a daemon attached to a child
//! cgroup under a service manager with a descriptor store (`service_manager`, systemd's
//! documented protocol), a real PostgreSQL, apps in the cgroup.
//!
//! * A connect loop (intercepted and `listenOn`, alternating) across a restart and a
//!   binary upgrade sees no failed connect; the longest connect is reported.
//! * Connections queued while no process runs are served by the next one, but only for
//!   a service it still intercepts at that destination under the same name.
//! * A stop (the store emptied) detaches the programs and closes the listeners.

use std::{
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use broker_tests::{
    broker_bin, free_port, http_get, net,
    pg::{PgAuth, PgOptions, PgServer, python_with_psycopg2},
    privileged,
    service_manager::ServiceManager,
    write_file,
};

const PW: &str = "restart-pw-7c1f9e42";

fn service(name: &str, how: &str, pg_port: u16, pw_file: &Path) -> String {
    format!(
        "  {name}:\n    connector: pg\n    {how}\n    credentials:\n      host: 127.0.0.1\n      port: \"{pg_port}\"\n      sslmode: disable\n      username: app_user\n      password: {{from: file, get: {}}}\n",
        pw_file.display()
    )
}

fn wait_ready(sm: &ServiceManager, health: u16) {
    let addr = format!("127.0.0.1:{health}").parse().expect("address");
    let deadline = Instant::now() + Duration::from_secs(30);
    while Instant::now() < deadline {
        if matches!(http_get(addr, "/ready"), Some((200, _))) {
            return;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    panic!("broker not ready:\n{}", sm.log_text());
}

struct Setup {
    pg: PgServer,
    cg: net::TestCgroup,
    dir: tempfile::TempDir,
    pw: PathBuf,
    health: u16,
}

impl Setup {
    fn new(tag: &str) -> Self {
        assert!(privileged(), "restart tests need root (eBPF, cgroups)");
        let pg = PgServer::start(PgOptions::new(PgAuth::Scram, PW));
        let dir = tempfile::tempdir().expect("tempdir");
        let pw = write_file(dir.path(), "pw", PW);
        Self {
            pg,
            cg: net::TestCgroup::new(tag),
            dir,
            pw,
            health: free_port(),
        }
    }

    fn config(&self, services: &[(&str, &str)]) -> PathBuf {
        let mut text = format!(
            "version: 2\nbroker:\n  health: 127.0.0.1:{}\n  drainTimeout: 5s\n  adminSocket: \"off\"\nservices:\n",
            self.health
        );
        for (name, how) in services {
            text += &service(name, how, self.pg.addr().port(), &self.pw);
        }
        write_file(self.dir.path(), "broker.yaml", &text)
    }

    fn args<'a>(&'a self, cfg: &'a Path) -> Vec<&'a str> {
        vec![
            "run",
            "-f",
            cfg.to_str().expect("UTF-8 path"),
            "--cgroup",
            self.cg.path.to_str().expect("UTF-8 cgroup path"),
            "--log-format",
            "json",
        ]
    }

    /// psql in the cgroup, in the background.
    fn psql(&self, conninfo: &str) -> std::process::Child {
        let mut c = Command::new("timeout");
        c.args(["--kill-after=5", "60", "psql", "-X", "-w", "-A", "-t"])
            .arg(format!(
                "{conninfo} user=anything dbname=app sslmode=disable connect_timeout=30"
            ))
            .args(["-c", "select current_user"])
            .env_remove("PGPASSWORD")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        self.cg.enter(&mut c);
        c.spawn().expect("spawn psql")
    }
}

#[test]
fn a_connect_loop_across_a_restart_and_an_upgrade_sees_no_failure() {
    let Some(python) = python_with_psycopg2() else {
        panic!("python3 with psycopg2 is required (cargo xtask setup)");
    };
    let s = Setup::new("restart-loop");
    let listen = free_port();
    let cfg = s.config(&[
        ("db", "intercept: [\"127.0.0.2:5432\"]"),
        ("direct", &format!("listenOn: tcp://127.0.0.1:{listen}")),
    ]);
    let mut sm = ServiceManager::new();
    sm.start(&broker_bin(), &s.args(&cfg));
    wait_ready(&sm, s.health);
    let stored = sm.stored();
    for name in ["broker-transparent", "broker-records", "broker-listen"] {
        assert!(
            stored.iter().any(|n| n == name),
            "{name} not stored: {stored:?}"
        );
    }
    assert_eq!(
        stored.iter().filter(|n| *n == "broker-link").count(),
        5,
        "{stored:?}"
    );

    // Connect (intercepted and listenOn in turn), query, close; each connect timed.
    // Bounded: 2,000 connections, 60 s, or the stop file.
    let stop = s.dir.path().join("stop");
    let script = format!(
        "import os, time, json, psycopg2\n\
         ok = fail = 0\nworst = 0.0\nerrors = []\nend = time.monotonic() + 60\n\
         targets = ['host=127.0.0.2 port=5432', 'host=127.0.0.1 port={listen}']\n\
         while time.monotonic() < end and ok + fail < 2000 and not os.path.exists({stop:?}):\n\
         \x20   t0 = time.monotonic()\n\
         \x20   try:\n\
         \x20       c = psycopg2.connect(targets[(ok + fail) % 2] + ' user=anything dbname=app sslmode=disable connect_timeout=30')\n\
         \x20       cur = c.cursor(); cur.execute('select 1'); cur.fetchone(); c.close(); ok += 1\n\
         \x20       worst = max(worst, time.monotonic() - t0)\n\
         \x20   except Exception as e:\n\
         \x20       fail += 1; errors.append(str(e)[:200])\n\
         \x20   time.sleep(0.005)\n\
         print(json.dumps({{'ok': ok, 'fail': fail, 'worst_ms': round(worst * 1000, 1), 'errors': errors[:5]}}))\n",
        stop = stop.display().to_string()
    );
    let mut cmd = Command::new("timeout");
    cmd.args(["--kill-after=5", "90"])
        .arg(&python)
        .args(["-c", &script])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    s.cg.enter(&mut cmd);
    let app = cmd.spawn().expect("spawn the connect loop");

    std::thread::sleep(Duration::from_millis(3000));
    // `systemctl restart`: the same binary.
    let t = Instant::now();
    sm.restart(&broker_bin(), &s.args(&cfg));
    wait_ready(&sm, s.health);
    eprintln!("restart: ready again after {:?}", t.elapsed());
    std::thread::sleep(Duration::from_millis(3000));
    // An upgrade: another binary file, then a restart.
    let next = s.dir.path().join("broker-next");
    std::fs::copy(broker_bin(), &next).expect("copy the binary");
    let t = Instant::now();
    sm.restart(&next, &s.args(&cfg));
    wait_ready(&sm, s.health);
    eprintln!("upgrade: ready again after {:?}", t.elapsed());
    std::thread::sleep(Duration::from_millis(3000));

    std::fs::write(&stop, "").expect("stop the loop");
    let out = app.wait_with_output().expect("wait for the loop");
    let text = String::from_utf8_lossy(&out.stdout);
    let r: serde_json::Value = serde_json::from_str(text.lines().last().unwrap_or(""))
        .unwrap_or_else(|_| panic!("{}", String::from_utf8_lossy(&out.stderr)));
    eprintln!("connect loop across a restart and an upgrade: {r}");
    let log = sm.log_text();
    assert_eq!(r["fail"], 0, "{r}\n{log}");
    assert!(r["ok"].as_u64().unwrap_or(0) > 100, "{r}");
    assert_eq!(
        log.matches("took over from the previous process").count(),
        2,
        "{log}"
    );
    assert_eq!(
        log.matches("listenOn listener taken over").count(),
        2,
        "{log}"
    );
    assert!(!log.contains(PW));

    // `systemctl stop`: the store is emptied after the exit; nothing is intercepted or
    // listening any more.
    sm.stop();
    std::thread::sleep(Duration::from_millis(200));
    for conninfo in [
        "host=127.0.0.2 port=5432".to_owned(),
        format!("host=127.0.0.1 port={listen}"),
    ] {
        let out = s.psql(&conninfo).wait_with_output().expect("psql");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            !out.status.success() && err.contains("refused"),
            "{conninfo}: {err}"
        );
    }
}

#[test]
fn queued_connections_are_served_by_the_next_process_only_for_the_same_service() {
    let s = Setup::new("restart-queue");
    let cfg = s.config(&[
        ("db", "intercept: [\"127.0.0.2:5432\"]"),
        ("old", "intercept: [\"127.0.0.3:5432\"]"),
    ]);
    let mut sm = ServiceManager::new();
    sm.start(&broker_bin(), &s.args(&cfg));
    wait_ready(&sm, s.health);
    // No process: the connects complete into the stored listener's backlog and wait.
    let st = sm.terminate(Duration::from_secs(30));
    assert!(st.success(), "{}", sm.log_text());
    let kept = s.psql("host=127.0.0.2 port=5432");
    let renamed = s.psql("host=127.0.0.3 port=5432");
    std::thread::sleep(Duration::from_millis(500));
    // The next process's configuration names 127.0.0.3's service otherwise: a record the
    // previous programs wrote for `old` is not `renamed`'s to serve.
    let cfg = s.config(&[
        ("db", "intercept: [\"127.0.0.2:5432\"]"),
        ("renamed", "intercept: [\"127.0.0.3:5432\"]"),
    ]);
    sm.start(&broker_bin(), &s.args(&cfg));
    wait_ready(&sm, s.health);
    let kept = kept.wait_with_output().expect("psql");
    assert!(
        kept.status.success(),
        "{}\n{}",
        String::from_utf8_lossy(&kept.stderr),
        sm.log_text()
    );
    assert_eq!(String::from_utf8_lossy(&kept.stdout).trim(), "app_user");
    let renamed = renamed.wait_with_output().expect("psql");
    assert!(!renamed.status.success(), "served by another service");
    let log = sm.log_text();
    assert!(log.contains("no longer intercepts there"), "{log}");
    // New connects to it are the new service's.
    let again = s
        .psql("host=127.0.0.3 port=5432")
        .wait_with_output()
        .expect("psql");
    assert!(again.status.success(), "{}", sm.log_text());
    sm.stop();
}
