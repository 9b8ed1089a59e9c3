//! Policy, for real: a daemon attached to a child cgroup, callers in cgroups below it
//! (as root and as `nobody` through `runuser`), a real PostgreSQL, psql and psycopg2.
//!
//! * Two callers in different cgroups and uids reach the same service: only the allowed
//!   one gets a session; the other sees PostgreSQL's error naming the rule.
//! * A rule on the executable tells `psql` from `python3` in the same cgroup.
//! * A closed time window denies; a rate limit denies the excess and allows again after
//!   its period.
//! * `broker revoke` takes effect at once (measured: under 1 s) without a restart, ends
//!   the revoked caller's live session with `--kill`, is listed by `broker status`, and
//!   is lifted.

use std::{
    io::{BufRead as _, BufReader, Write as _},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use broker_tests::{
    RunBroker, assert_no_secret, broker_bin, output_text,
    pg::{PgAuth, PgOptions, PgServer, python_with_psycopg2},
    privileged, run_broker, write_file,
};

const PW: &str = "policy-pw-2b7e4c91";

/// A cgroup below the test's (the daemon attaches to the parent), removed on drop.
struct Sub(PathBuf);

impl Sub {
    fn new(b: &RunBroker, name: &str) -> Self {
        let p = b.cg.path.join(name);
        std::fs::create_dir(&p).expect("create sub-cgroup");
        Self(p)
    }

    /// Make `cmd` move itself into this cgroup before it execs.
    fn enter(&self, cmd: &mut Command) {
        broker_tests::pod::enter_cgroup(cmd, &self.0);
    }
}

impl Drop for Sub {
    fn drop(&mut self) {
        for _ in 0..100 {
            if std::fs::remove_dir(&self.0).is_ok() || !self.0.exists() {
                return;
            }
            let _ = std::fs::write(self.0.join("cgroup.kill"), "1");
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

struct Setup {
    b: RunBroker,
    socket: PathBuf,
    _pg: PgServer,
    _files: tempfile::TempDir,
}

/// A daemon whose services (`name`, intercepted address, policy lines) all reach one
/// PostgreSQL, with an admin socket of its own.
fn start(tag: &str, services: &[(&str, &str, &str)]) -> Setup {
    assert!(privileged(), "policy tests need root (eBPF, cgroups)");
    let pg = PgServer::start(PgOptions::new(PgAuth::Scram, PW));
    let files = tempfile::tempdir().expect("tempdir");
    let pw = write_file(files.path(), "pw", PW);
    let socket = files.path().join("admin.sock");
    let mut text = String::new();
    for (name, addr, policy) in services {
        text += &format!(
            "  {name}:\n    connector: pg\n    intercept: [\"{addr}\"]\n{policy}    credentials:\n      host: 127.0.0.1\n      port: \"{}\"\n      sslmode: disable\n      username: app_user\n      password: {{from: file, get: {}}}\n",
            pg.addr().port(),
            pw.display()
        );
    }
    let b = run_broker(
        tag,
        &format!("  adminSocket: {}\n", socket.display()),
        &text,
    );
    Setup {
        b,
        socket,
        _pg: pg,
        _files: files,
    }
}

/// psql in `cg` (as `user` through runuser, or root) to `addr`:5432.
fn psql(cg: &Sub, user: Option<&str>, host: &str) -> (bool, String) {
    let mut c = Command::new("timeout");
    c.args(["--kill-after=5", "30"]);
    if let Some(u) = user {
        c.args(["runuser", "-u", u, "--"]);
    }
    c.args(["psql", "-X", "-w", "-A", "-t"])
        .arg(format!(
            "host={host} port=5432 user=anything dbname=app sslmode=disable connect_timeout=10"
        ))
        .args(["-c", "select current_user"])
        .env_remove("PGPASSWORD")
        .current_dir("/")
        .stdin(Stdio::null());
    cg.enter(&mut c);
    let out = c.output().expect("run psql");
    (out.status.success(), output_text(&out))
}

#[test]
fn only_the_allowed_cgroup_and_uid_get_a_session() {
    let s = start(
        "policy-who",
        &[(
            "db",
            "127.0.0.2:5432",
            "    deny:\n      - name: no-nobody-in-other\n        uid: nobody\n        cgroup: \"/**/other\"\n    allow:\n      - name: app-root\n        uid: 0\n        cgroup: \"/**/app\"\n",
        )],
    );
    let app = Sub::new(&s.b, "app");
    let other = Sub::new(&s.b, "other");
    let (ok, out) = psql(&app, None, "127.0.0.2");
    assert!(ok, "{out}\n{}", s.b.daemon.log_text());
    assert_eq!(out.trim(), "app_user");
    for (cg, user, why, rule) in [
        (
            &other,
            Some("nobody"),
            "another cgroup and uid",
            "no-nobody-in-other",
        ),
        (&other, None, "another cgroup", "no allow rule"),
        (&app, Some("nobody"), "another uid", "no allow rule"),
    ] {
        let (ok, out) = psql(cg, user, "127.0.0.2");
        assert!(!ok, "{why}: served");
        assert!(
            out.contains("denied by policy") && out.contains(&format!("rule \"{rule}\"")),
            "{why}: {out}"
        );
    }
    let log = s.b.daemon.log_until(Duration::from_secs(5), |l| {
        l.matches("policy decision").count() >= 4
    });
    assert_eq!(log.matches("policy decision").count(), 4, "{log}");
    assert!(log.contains("\"rule\":\"app-root\""), "{log}");
    assert!(log.contains("connection denied by policy"), "{log}");
    assert_no_secret(&log, &[PW], "daemon log");
}

#[test]
fn the_executable_tells_psql_from_python() {
    let Some(python) = python_with_psycopg2() else {
        panic!("python3 with psycopg2 is required (cargo xtask setup)");
    };
    let s = start(
        "policy-exe",
        &[(
            "db",
            "127.0.0.2:5432",
            "    allow:\n      - name: psql-only\n        exe: \"/usr/lib/postgresql/*/bin/psql\"\n",
        )],
    );
    let cg = Sub::new(&s.b, "apps");
    let (ok, out) = psql(&cg, None, "127.0.0.2");
    assert!(ok, "{out}\n{}", s.b.daemon.log_text());
    let mut c = Command::new("timeout");
    c.args(["--kill-after=5", "30"])
        .arg(&python)
        .args(["-c", "import psycopg2\npsycopg2.connect('host=127.0.0.2 port=5432 user=anything dbname=app sslmode=disable connect_timeout=10')"])
        .stdin(Stdio::null());
    cg.enter(&mut c);
    let out = c.output().expect("python");
    let text = output_text(&out);
    assert!(!out.status.success(), "python was served");
    assert!(text.contains("denied by policy"), "{text}");
}

#[test]
fn a_closed_window_denies_and_a_rate_limit_allows_again_after_its_period() {
    let Some(python) = python_with_psycopg2() else {
        panic!("python3 with psycopg2 is required (cargo xtask setup)");
    };
    // A whole day three days from now: closed today, whatever the hour.
    let days = ["mon", "tue", "wed", "thu", "fri", "sat", "sun"];
    let today = Command::new("date")
        .args(["-u", "+%u"])
        .output()
        .expect("date");
    let today: usize = String::from_utf8_lossy(&today.stdout)
        .trim()
        .parse()
        .expect("weekday");
    let other = days[(today - 1 + 3) % 7];
    let s = start(
        "policy-when",
        &[
            (
                "closed",
                "127.0.0.2:5432",
                &format!("    schedule: \"{other} 00:00-24:00 UTC\"\n"),
            ),
            (
                "limited",
                "127.0.0.3:5432",
                "    rateLimit:\n      perCaller: 2/s\n",
            ),
        ],
    );
    let cg = Sub::new(&s.b, "apps");
    let (ok, out) = psql(&cg, None, "127.0.0.2");
    assert!(!ok && out.contains("rule \"schedule\""), "{out}");

    let script = "import time, json, psycopg2\n\
        def one():\n\
        \x20   try:\n\
        \x20       psycopg2.connect('host=127.0.0.3 port=5432 user=anything dbname=app sslmode=disable connect_timeout=10').close(); return 'ok'\n\
        \x20   except Exception as e:\n\
        \x20       return str(e).strip()[:300]\n\
        burst = [one() for _ in range(3)]\n\
        time.sleep(1.2)\n\
        print(json.dumps({'burst': burst, 'after': one()}))\n";
    let mut c = Command::new("timeout");
    c.args(["--kill-after=5", "30"])
        .arg(&python)
        .args(["-c", script])
        .stdin(Stdio::null());
    cg.enter(&mut c);
    let out = c.output().expect("python");
    let r: serde_json::Value =
        serde_json::from_slice(&out.stdout).unwrap_or_else(|_| panic!("{}", output_text(&out)));
    eprintln!("rate limit 2/s: {r}");
    assert_eq!(r["burst"][0], "ok", "{r}");
    assert_eq!(r["burst"][1], "ok", "{r}");
    let third = r["burst"][2].as_str().unwrap_or("");
    assert!(third.contains("rule \"rateLimit\""), "{r}");
    assert_eq!(r["after"], "ok", "{r}");
}

/// A psycopg2 session in a cgroup that stays open: each line on its stdin runs a query
/// and prints the answer (or the error).
struct Session {
    child: Child,
    out: BufReader<std::process::ChildStdout>,
}

impl Session {
    fn open(cg: &Sub, python: &Path) -> Self {
        let script = "import sys, psycopg2\nc = psycopg2.connect('host=127.0.0.2 port=5432 user=anything dbname=app sslmode=disable connect_timeout=10')\nc.autocommit = True\nprint('open', flush=True)\nfor _ in sys.stdin:\n    try:\n        cur = c.cursor(); cur.execute('select current_user'); print(cur.fetchone()[0], flush=True)\n    except Exception as e:\n        print('error', flush=True)\n";
        let mut cmd = Command::new("timeout");
        cmd.args(["--kill-after=5", "120"])
            .arg(python)
            .args(["-c", script])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::null());
        cg.enter(&mut cmd);
        let mut child = cmd.spawn().expect("spawn python");
        let mut out = BufReader::new(child.stdout.take().expect("stdout"));
        let mut line = String::new();
        out.read_line(&mut line).expect("read");
        assert_eq!(line.trim(), "open", "the session did not open");
        Self { child, out }
    }

    fn query(&mut self) -> String {
        let stdin = self.child.stdin.as_mut().expect("stdin");
        stdin.write_all(b"q\n").expect("write");
        stdin.flush().expect("flush");
        let mut line = String::new();
        self.out.read_line(&mut line).expect("read");
        line.trim().to_owned()
    }
}

impl Drop for Session {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn broker(args: &[&str]) -> (bool, String) {
    let out = Command::new(broker_bin())
        .args(args)
        .stdin(Stdio::null())
        .output()
        .expect("run broker");
    (out.status.success(), output_text(&out))
}

#[test]
fn a_revocation_applies_at_once_ends_live_sessions_and_is_lifted() {
    let Some(python) = python_with_psycopg2() else {
        panic!("python3 with psycopg2 is required (cargo xtask setup)");
    };
    let s = start("policy-revoke", &[("db", "127.0.0.2:5432", "")]);
    let cg = Sub::new(&s.b, "apps");
    let sock = s.socket.to_str().expect("UTF-8 path");
    let mut session = Session::open(&cg, &python);
    assert_eq!(session.query(), "app_user");

    let t = Instant::now();
    let (ok, out) = broker(&[
        "revoke",
        "--socket",
        sock,
        "--service",
        "db",
        "--uid",
        "0",
        "--cgroup",
        "/**/apps",
        "--kill",
    ]);
    assert!(ok, "{out}");
    assert!(
        out.contains("revocation #1") && out.contains("1 live connection"),
        "{out}"
    );
    let (ok, out) = psql(&cg, None, "127.0.0.2");
    let took = t.elapsed();
    eprintln!("revocation to first denied connect: {took:?}");
    assert!(!ok && out.contains("rule \"revoked #1\""), "{out}");
    assert!(took < Duration::from_secs(1), "{took:?}");
    assert_eq!(session.query(), "error", "the live session was ended");

    let (ok, status) = broker(&["status", "--socket", sock]);
    assert!(ok, "{status}");
    assert!(
        status.contains("REVOCATIONS (1)") && status.contains("uid=0"),
        "{status}"
    );
    let (ok, out) = broker(&["revoke", "--socket", sock, "--lift", "1"]);
    assert!(ok, "{out}");
    let (ok, out) = psql(&cg, None, "127.0.0.2");
    assert!(ok, "{out}");
    // Refused requests: no caller, an unknown service.
    let (ok, out) = broker(&["revoke", "--socket", sock, "--service", "db"]);
    assert!(!ok && out.contains("needs a caller"), "{out}");
    let (ok, out) = broker(&[
        "revoke",
        "--socket",
        sock,
        "--service",
        "nope",
        "--uid",
        "1",
    ]);
    assert!(!ok && out.contains("no service named"), "{out}");
    assert_no_secret(&s.b.daemon.log_text(), &[PW], "daemon log");
}
