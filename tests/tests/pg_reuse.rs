//! `reuse: session` against a real PostgreSQL, through `listenOn` (the connector is the
//! same for intercepted connections), with psycopg2:
//!
//! * 1,000 sequential connections use at most a handful of backends;
//! * a temp table, a prepared statement, a `SET`, `SET ROLE`, an advisory lock, `LISTEN`
//!   and an open transaction left by one connection are invisible to the next one on
//!   the same backend, and its `application_name` is its own;
//! * a cancel reaches the query on a reused backend;
//! * a different brokered user never gets another's session.

use std::{
    path::Path,
    process::{Command, Stdio},
    time::Duration,
};

use broker_tests::{
    Daemon, assert_no_secret, free_port, output_text,
    pg::{PgAuth, PgOptions, PgServer, PgTls, python_with_psycopg2, sql_literal},
    write_file,
};

const PW: &str = "reuse-pw-91c3b7e0";
const OTHER_PW: &str = "reuse-other-pw-4d2a";

fn service(name: &str, port: u16, pg: &PgServer, user: &str, pw: &str, reuse: bool) -> String {
    tls_service(name, port, pg, user, pw, reuse, "disable")
}

fn tls_service(
    name: &str,
    port: u16,
    pg: &PgServer,
    user: &str,
    pw: &str,
    reuse: bool,
    sslmode: &str,
) -> String {
    format!(
        "  {name}:\n    connector: pg\n    listenOn: tcp://127.0.0.1:{port}\n{}    credentials:\n      host: 127.0.0.1\n      port: \"{}\"\n      sslmode: {sslmode}\n      username: {user}\n      password: {pw}\n",
        if reuse {
            "    config:\n      reuse: session\n"
        } else {
            ""
        },
        pg.addr().port()
    )
}

fn python(script: &str) -> serde_json::Value {
    let Some(py) = python_with_psycopg2() else {
        panic!("python3 with psycopg2 is required (cargo xtask setup)");
    };
    let out = Command::new("timeout")
        .args(["--kill-after=5", "120"])
        .arg(py)
        .args(["-c", script])
        .stdin(Stdio::null())
        .output()
        .expect("python");
    serde_json::from_slice(&out.stdout).unwrap_or_else(|_| panic!("{}", output_text(&out)))
}

fn start(dir: &Path, services: &str) -> Daemon {
    let health = free_port();
    let cfg = write_file(
        dir,
        "broker.yaml",
        &format!(
            "version: 2\nbroker:\n  health: 127.0.0.1:{health}\n  adminSocket: \"off\"\nservices:\n{services}"
        ),
    );
    Daemon::start(
        &cfg,
        &["--no-ebpf", "--log-format", "json"],
        format!("127.0.0.1:{health}").parse().expect("addr"),
        &dir.join("broker.log"),
    )
}

#[test]
fn reused_sessions_are_few_clean_cancellable_and_never_cross_users() {
    let pg = PgServer::start(PgOptions::new(PgAuth::Scram, PW));
    pg.admin_sql(&format!(
        "CREATE ROLE other_user LOGIN PASSWORD {}; GRANT ALL ON DATABASE app TO other_user",
        sql_literal(OTHER_PW)
    ));
    pg.admin_sql_in(
        "app",
        "CREATE TABLE kept (x int); GRANT ALL ON kept TO app_user",
    );
    let dir = tempfile::tempdir().expect("tempdir");
    let (reuse_port, other_port, plain_port) = (free_port(), free_port(), free_port());
    let d = start(
        dir.path(),
        &(service("db", reuse_port, &pg, "app_user", PW, true)
            + &service("other", other_port, &pg, "other_user", OTHER_PW, true)
            + &service("plain", plain_port, &pg, "app_user", PW, false)),
    );
    let conninfo = |port: u16, app: &str| {
        format!(
            "host=127.0.0.1 port={port} user=anything dbname=app sslmode=disable connect_timeout=10 application_name={app}"
        )
    };

    // 1. Sequential connections, each asking for its backend.
    let r = python(&format!(
        "import json, time, psycopg2\n\
         pids = []\nt0 = time.monotonic()\n\
         for i in range(1000):\n\
         \x20   c = psycopg2.connect({:?})\n\
         \x20   cur = c.cursor(); cur.execute('select pg_backend_pid()'); pids.append(cur.fetchone()[0]); c.close()\n\
         print(json.dumps({{'backends': len(set(pids)), 'seconds': round(time.monotonic() - t0, 2)}}))\n",
        conninfo(reuse_port, "seq")
    ));
    eprintln!("1,000 sequential connections with reuse: {r}");
    let backends = r["backends"].as_u64().unwrap_or(u64::MAX);
    assert!(backends <= 4, "{r}");

    // Idle sessions the server ended (an administrator, an idle timeout) are noticed and
    // dropped: the next app gets a working session.
    pg.admin_sql(
        "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity WHERE usename = 'app_user'",
    );
    std::thread::sleep(Duration::from_millis(300));
    let r = python(&format!(
        "import json, psycopg2\nok = 0\nfor _ in range(5):\n    c = psycopg2.connect({:?}); cur = c.cursor(); cur.execute('select 1'); ok += cur.fetchone()[0]; c.close()\nprint(json.dumps({{'ok': ok}}))\n",
        conninfo(reuse_port, "seq")
    ));
    assert_eq!(r["ok"], 5, "{r}");

    // 2. What one connection leaves, the next (on the same backend) does not see.
    let r = python(&format!(
        "import json, time, psycopg2\n\
         a = psycopg2.connect({a:?}); a.autocommit = True; cur = a.cursor()\n\
         cur.execute('select pg_backend_pid()'); pid = cur.fetchone()[0]\n\
         for q in ['create temp table t (x int)', 'prepare p as select 1', \"set work_mem = '1234kB'\", 'set role app_user', 'select pg_advisory_lock(42)', 'listen chan']:\n\
         \x20   cur.execute(q)\n\
         a.autocommit = False\n\
         cur.execute('insert into kept values (1)')\n\
         a.close()\n\
         time.sleep(0.3)\n\
         b = psycopg2.connect({b:?}); b.autocommit = True; cur = b.cursor()\n\
         def one(q):\n\
         \x20   cur.execute(q); return cur.fetchone()[0]\n\
         print(json.dumps({{\n\
         \x20   'same_backend': one('select pg_backend_pid()') == pid,\n\
         \x20   'temp_table': one(\"select to_regclass('t') is not null\"),\n\
         \x20   'prepared': one('select count(*) from pg_prepared_statements'),\n\
         \x20   'work_mem': one('show work_mem'),\n\
         \x20   'role': one(\"select current_setting('role')\"),\n\
         \x20   'advisory': one(\"select count(*) from pg_locks where locktype = 'advisory' and pid = pg_backend_pid()\"),\n\
         \x20   'listening': one('select count(*) from pg_listening_channels()'),\n\
         \x20   'uncommitted_row': one('select count(*) from kept'),\n\
         \x20   'application_name': one(\"select current_setting('application_name')\"),\n\
         }}))\n",
        a = conninfo(reuse_port, "first"),
        b = conninfo(reuse_port, "second"),
    ));
    eprintln!("after reset: {r}");
    assert_eq!(r["same_backend"], true, "{r}");
    assert_eq!(r["temp_table"], false, "{r}");
    assert_eq!(r["prepared"], 0, "{r}");
    assert_eq!(r["work_mem"], "4MB", "{r}");
    assert_eq!(r["role"], "none", "{r}");
    assert_eq!(r["advisory"], 0, "{r}");
    assert_eq!(r["listening"], 0, "{r}");
    assert_eq!(r["uncommitted_row"], 0, "{r}");
    assert_eq!(r["application_name"], "second", "{r}");

    // 3. A cancel reaches the query on a reused backend.
    let r = python(&format!(
        "import json, time, threading, psycopg2, psycopg2.extensions\n\
         a = psycopg2.connect({c:?}); cur = a.cursor(); cur.execute('select pg_backend_pid()'); pid = cur.fetchone()[0]; a.close()\n\
         time.sleep(0.3)\n\
         b = psycopg2.connect({c:?}); cur = b.cursor(); cur.execute('select pg_backend_pid()'); same = cur.fetchone()[0] == pid\n\
         threading.Timer(0.5, b.cancel).start()\n\
         t0 = time.monotonic(); outcome = 'finished'\n\
         try:\n\
         \x20   cur.execute('select pg_sleep(20)')\n\
         except psycopg2.extensions.QueryCanceledError:\n\
         \x20   outcome = 'cancelled'\n\
         print(json.dumps({{'same_backend': same, 'outcome': outcome, 'seconds': round(time.monotonic() - t0, 2)}}))\n",
        c = conninfo(reuse_port, "cancel"),
    ));
    eprintln!("cancel on a reused backend: {r}");
    assert_eq!(r["same_backend"], true, "{r}");
    assert_eq!(
        r["outcome"],
        "cancelled",
        "{r}\n{}",
        d.log_text()
            .lines()
            .filter(|l| l.contains("ancel"))
            .collect::<Vec<_>>()
            .join("\n")
    );
    assert!(r["seconds"].as_f64().unwrap_or(99.0) < 5.0, "{r}");

    // 4. Another brokered user (another service) never gets these backends.
    let r = python(&format!(
        "import json, psycopg2\n\
         def pids(ci):\n\
         \x20   out = set()\n\
         \x20   for _ in range(20):\n\
         \x20       c = psycopg2.connect(ci); cur = c.cursor(); cur.execute('select pg_backend_pid(), current_user'); p, u = cur.fetchone(); out.add((p, u)); c.close()\n\
         \x20   return out\n\
         a, b = pids({a:?}), pids({b:?})\n\
         print(json.dumps({{'shared': len({{p for p, _ in a}} & {{p for p, _ in b}}), 'users_a': sorted({{u for _, u in a}}), 'users_b': sorted({{u for _, u in b}})}}))\n",
        a = conninfo(reuse_port, "a"),
        b = conninfo(other_port, "b"),
    ));
    eprintln!("two brokered users: {r}");
    assert_eq!(r["shared"], 0, "{r}");
    assert_eq!(r["users_a"], serde_json::json!(["app_user"]), "{r}");
    assert_eq!(r["users_b"], serde_json::json!(["other_user"]), "{r}");

    // Without reuse, every connection is a backend of its own.
    let r = python(&format!(
        "import json, psycopg2\npids = set()\nfor _ in range(20):\n    c = psycopg2.connect({:?}); cur = c.cursor(); cur.execute('select pg_backend_pid()'); pids.add(cur.fetchone()[0]); c.close()\nprint(json.dumps({{'backends': len(pids)}}))\n",
        conninfo(plain_port, "plain")
    ));
    assert_eq!(r["backends"], 20, "{r}");
    std::thread::sleep(Duration::from_millis(100));
    assert_no_secret(&d.log_text(), &[PW, OTHER_PW], "daemon log");
}

#[test]
fn reuse_over_a_tls_upstream() {
    let pg = PgServer::start(PgOptions::new(PgAuth::Scram, PW).tls(PgTls::Required));
    let dir = tempfile::tempdir().expect("tempdir");
    let port = free_port();
    let d = start(
        dir.path(),
        &tls_service("db", port, &pg, "app_user", PW, true, "require"),
    );
    let r = python(&format!(
        "import json, time, psycopg2\n\
         pids = []\n\
         for i in range(200):\n\
         \x20   c = psycopg2.connect('host=127.0.0.1 port={port} user=x dbname=app sslmode=disable connect_timeout=10')\n\
         \x20   cur = c.cursor(); cur.execute('select pg_backend_pid(), ssl from pg_stat_ssl where pid = pg_backend_pid()'); p, ssl = cur.fetchone(); pids.append(p); c.close()\n\
         \x20   assert ssl\n\
         print(json.dumps({{'backends': len(set(pids))}}))\n"
    ));
    eprintln!("200 connections over a TLS upstream with reuse: {r}");
    assert!(r["backends"].as_u64().unwrap_or(u64::MAX) <= 4, "{r}");
    assert_no_secret(&d.log_text(), &[PW], "daemon log");
}
