//! The `mysql` connector through eBPF interception, with real servers and real clients.
//!
//! * The `mariadb` CLI under `broker exec` against a real MariaDB 10.11
//!   (`broker_tests::mariadb`): a `mysql_native_password` user, an `ed25519` user, a
//!   `REQUIRE SSL` user in sslmodes `require`, `verify-ca`, `verify-full` (and a wrong
//!   name) and `disable` (refused with 1045), the `database` credential; the client's
//!   own TLS to the broker with `clientTLS: terminate` (verified against the broker's
//!   CA) and `refuse`.
//! * PyMySQL and MySQL Connector/Python (`tests/clients/mysql_*.py`): parameterized and
//!   server-side prepared statements, a transaction rolled back, multi-statement
//!   results, 50 MiB through `LOAD DATA LOCAL INFILE` and back through a `SELECT`,
//!   `KILL QUERY` from a second brokered connection ending `SELECT SLEEP(30)`.
//! * `caching_sha2_password` against a fake MySQL 8 (`broker_tests::fake_mysql`): the
//!   full path over TLS and over RSA (the key asked for, or configured with
//!   `serverPublicKey`), then the fast path; AuthSwitchRequest both ways.
//! * A wrong password in the store (the client prints 1045), then rotation of the
//!   server's password and the store together without a restart; an unreachable
//!   upstream (1429, naming the service, shown by the `mariadb` command line too).
//!
//! The app always dials `db.example.test` (mapped to 127.0.0.2 in a private mount
//! namespace) with a dummy user and password. Every output and log is grepped for the
//! passwords.

use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::Instant,
};

use broker_tests::{
    assert_no_secret, broker_exec,
    clients::{PYTHON, python_deps, scripts_dir},
    fake_mysql::{AuthPath, FakeMySql, FakeOptions, FakeUser, Plugin},
    free_port,
    mariadb::{self, ED25519_USER, MariaDb, MariaDbOptions, NATIVE_USER, TLS_USER},
    net::TestCgroup,
    output_text, privileged, run_broker, write_file,
};

/// What every session asks: who the server says we are, and the upstream session's
/// TLS version (empty in plain text).
const WHO: &str = "select concat('USER=', current_user(), ' TLS=', (select variable_value from information_schema.session_status where variable_name = 'Ssl_version'), ' END')";

/// Real servers need root and the packages; like [`privileged`], a missing server is a
/// failure when `BROKER_REQUIRE_PRIVILEGED=1`.
fn ready() -> bool {
    if !privileged() {
        return false;
    }
    if !mariadb::available() {
        panic!("mariadb-server and mariadb-client are required (cargo xtask setup installs them)");
    }
    true
}

/// One `mysql` service: `intercept` target, upstream address, brokered user, password
/// file; `creds` are more lines under `credentials:`, `config` lines under `config:`.
fn service(
    name: &str,
    target: &str,
    up: SocketAddr,
    user: &str,
    pw_file: &Path,
    creds: &str,
    config: &str,
) -> String {
    let mut s = format!(
        "  {name}:\n    connector: mysql\n    intercept: [\"{target}\"]\n    credentials:\n      host: {}\n      port: \"{}\"\n      username: {user}\n      password: {{from: file, get: {}}}\n{creds}",
        up.ip(),
        up.port(),
        pw_file.display()
    );
    if !config.is_empty() {
        s.push_str("    config:\n");
        s.push_str(config);
    }
    s
}

/// `broker.yaml` in `dir` with the broker's CA in `dir/ca`.
fn config(dir: &Path, services: &str) -> PathBuf {
    write_file(
        dir,
        "broker.yaml",
        &format!(
            "version: 2\nbroker:\n  caDir: {}\nservices:\n{services}",
            dir.join("ca").display()
        ),
    )
}

/// Run `sh -c script` under `broker exec` with `db.example.test` -> 127.0.0.2; output
/// (stdout, then stderr) and whether it succeeded.
fn exec_sh(dir: &Path, cfg: &Path, env: &[(&str, String)], script: &str) -> (bool, String) {
    let mut c = broker_exec(
        dir,
        &[("db.example.test", "127.0.0.2")],
        &[],
        cfg,
        &["sh", "-c", script],
    );
    c.env_remove("MYSQL_PWD")
        .env_remove("MYSQL_HOST")
        .stdin(Stdio::null());
    for (k, v) in env {
        c.env(k, v);
    }
    let out = c.output().expect("run broker exec");
    (out.status.success(), output_text(&out))
}

/// A shell line: `echo CASE <name>`, the `mariadb` CLI to `db.example.test:<port>` as a
/// dummy user (stderr joined to stdout, so errors stay in their case), then
/// `EXIT <name>=<status>`.
fn cli_case(name: &str, port: u16, extra: &str, sql: &str) -> String {
    format!(
        "echo 'CASE {name}'; mariadb --no-defaults --connect-timeout=10 -h db.example.test -P {port} -u anything -pdummy-client-pw -N -B {extra} -e \"{sql}\" 2>&1; echo \"EXIT {name}=$?\""
    )
}

/// The output of one [`cli_case`] (without its `EXIT` line).
fn case<'a>(text: &'a str, name: &str) -> &'a str {
    let start = format!("CASE {name}\n");
    let Some(i) = text.find(&start) else {
        return "";
    };
    let rest = &text[i + start.len()..];
    let end = format!("EXIT {name}=");
    rest.find(&end).map_or(rest, |j| &rest[..j])
}

/// The exit status of one [`cli_case`].
fn exit_of(text: &str, name: &str) -> Option<i32> {
    let key = format!("EXIT {name}=");
    let i = text.find(&key)? + key.len();
    text[i..].split_whitespace().next()?.parse().ok()
}

/// Run a program in the test cgroup (the daemon intercepts it), bounded to 60 s.
fn in_cgroup(cg: &TestCgroup, program: &str, args: &[&str]) -> (bool, String) {
    let mut c = Command::new("timeout");
    c.args(["--kill-after=5", "60", program])
        .args(args)
        .env_remove("MYSQL_PWD")
        .stdin(Stdio::null());
    cg.enter(&mut c);
    let out = c.output().expect("spawn client");
    (out.status.success(), output_text(&out))
}

#[test]
fn cli_native_ed25519_and_tls_users_in_every_sslmode() {
    if !ready() {
        return;
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let (pw_nat, pw_ed, pw_tls) = (
        "mysql-native-pw-6b1d9e3f7a",
        "mysql-ed-pw-2c8a4f0e6d",
        "mysql-tls-pw-9e5b1d7c3a",
    );
    let db = MariaDb::start(MariaDbOptions::new(pw_nat, pw_ed, pw_tls));
    let ca = db.ca_cert.display().to_string();
    let f_nat = write_file(dir.path(), "pw-nat", pw_nat);
    let f_ed = write_file(dir.path(), "pw-ed", pw_ed);
    let f_tls = write_file(dir.path(), "pw-tls", pw_tls);
    let up = db.addr();
    let t = |port: u16| format!("db.example.test:{port}");
    let mut services = String::new();
    services += &service(
        "native",
        &t(3306),
        up,
        NATIVE_USER,
        &f_nat,
        "      sslmode: disable\n",
        "",
    );
    services += &service("native-default", &t(3307), up, NATIVE_USER, &f_nat, "", "");
    // Not "ed25519": an error naming the plugin must not be confused with one naming
    // the service.
    services += &service("edwards", &t(3308), up, ED25519_USER, &f_ed, "", "");
    services += &service(
        "tls-require",
        &t(3309),
        up,
        TLS_USER,
        &f_tls,
        "      sslmode: require\n",
        "",
    );
    services += &service(
        "tls-verify-ca",
        &t(3310),
        up,
        TLS_USER,
        &f_tls,
        &format!("      sslmode: verify-ca\n      sslrootcert: {ca}\n"),
        "",
    );
    services += &service(
        "tls-verify-full",
        &t(3311),
        up,
        TLS_USER,
        &f_tls,
        &format!(
            "      sslmode: verify-full\n      sslrootcert: {ca}\n      sslhost: db.example.test\n"
        ),
        "",
    );
    services += &service(
        "tls-wrong-host",
        &t(3312),
        up,
        TLS_USER,
        &f_tls,
        &format!(
            "      sslmode: verify-full\n      sslrootcert: {ca}\n      sslhost: wrong.example.test\n"
        ),
        "",
    );
    services += &service(
        "tls-disable",
        &t(3313),
        up,
        TLS_USER,
        &f_tls,
        "      sslmode: disable\n",
        "",
    );
    services += &service(
        "native-db",
        &t(3314),
        up,
        NATIVE_USER,
        &f_nat,
        &format!("      database: {}\n", mariadb::DATABASE),
        "",
    );
    let cfg = config(dir.path(), &services);
    let cases = [
        ("native", 3306),
        ("native-default", 3307),
        ("edwards", 3308),
        ("tls-require", 3309),
        ("tls-verify-ca", 3310),
        ("tls-verify-full", 3311),
        ("tls-wrong-host", 3312),
        ("tls-disable", 3313),
    ];
    let mut script = cases
        .iter()
        .map(|(name, port)| cli_case(name, *port, "", WHO))
        .collect::<Vec<_>>()
        .join("; ");
    // The `database` credential when the client names none.
    script += "; ";
    script += &cli_case(
        "native-db",
        3314,
        "",
        "select concat('DB=', ifnull(database(), 'none'))",
    );
    let (_, text) = exec_sh(dir.path(), &cfg, &[], &script);
    let tls_on = |c: &str| c.contains(" TLS=TLSv1.");
    let native = case(&text, "native");
    assert!(
        native.contains("USER=native_user@% TLS= END"),
        "native user, sslmode disable, plain upstream:\n{text}"
    );
    let native_default = case(&text, "native-default");
    assert!(
        native_default.contains("USER=native_user@%") && tls_on(native_default),
        "the default sslmode (require) uses TLS when the server offers it:\n{text}"
    );
    let ed = case(&text, "edwards");
    match &db.ed25519 {
        Ok(()) if ed.contains("USER=ed_user@%") => {
            eprintln!("the connector logs in with ed25519");
        }
        Ok(()) => assert!(
            ed.contains("ed25519") && exit_of(&text, "edwards") != Some(0),
            "an ed25519 user either works or fails with an error naming the plugin:\n{text}"
        ),
        Err(why) => eprintln!("ed25519 not checked: {why}"),
    }
    for name in ["tls-require", "tls-verify-ca", "tls-verify-full"] {
        let c = case(&text, name);
        assert!(
            c.contains("USER=tls_user@%") && tls_on(c),
            "REQUIRE SSL user through {name}:\n{text}"
        );
    }
    let wrong = case(&text, "tls-wrong-host");
    assert!(
        !wrong.contains("USER=") && exit_of(&text, "tls-wrong-host") != Some(0),
        "verify-full against the wrong name fails:\n{text}"
    );
    assert!(
        wrong.contains("tls-wrong-host"),
        "the error names the service:\n{text}"
    );
    assert!(
        case(&text, "native-db").contains("DB=app"),
        "the database credential:\n{text}"
    );
    let disable = case(&text, "tls-disable");
    assert!(
        disable.contains("1045") && exit_of(&text, "tls-disable") != Some(0),
        "a REQUIRE SSL user over a plain upstream is denied (1045):\n{text}"
    );
    assert_no_secret(&text, &[pw_nat, pw_ed, pw_tls], "exec output");
}

/// A client that sends its SSLRequest and its TLS ClientHello in one write (the
/// protocol has no answer to an SSLRequest, so a client need not wait; the real CLI's
/// two writes arrive together too when the broker is slow to read): argv `port`,
/// `CA file`. Prints `TLS_OK <version>` once the handshake with the broker's
/// certificate for `db.example.test` is done.
const COALESCED_TLS: &str = r#"
import socket, ssl, struct, sys
host, port, ca = "db.example.test", int(sys.argv[1]), sys.argv[2]
s = socket.create_connection((host, port), timeout=10)
def exact(n):
    b = b""
    while len(b) < n:
        c = s.recv(n - len(b))
        if not c:
            print("CLOSED"); sys.exit(1)
        b += c
    return b
n = int.from_bytes(exact(4)[:3], "little")
greeting = exact(n)
caps = 0x200 | 0x800 | 0x8000 | 0x80000 | 0x200000
req = struct.pack("<IIB23s", caps, 1 << 24, 45, b"\0" * 23)
ctx = ssl.create_default_context(cafile=ca)
inc, out = ssl.MemoryBIO(), ssl.MemoryBIO()
tls = ctx.wrap_bio(inc, out, server_hostname=host)
try:
    tls.do_handshake()
except ssl.SSLWantReadError:
    pass
s.sendall(len(req).to_bytes(3, "little") + b"\x01" + req + out.read())
while True:
    try:
        tls.do_handshake()
        break
    except ssl.SSLWantReadError:
        data = s.recv(65536)
        if not data:
            print("CLOSED"); sys.exit(1)
        inc.write(data)
        pending = out.read()
        if pending:
            s.sendall(pending)
pending = out.read()
if pending:
    s.sendall(pending)
print("TLS_OK", tls.version())
"#;

#[test]
fn cli_client_tls_terminate_and_refuse() {
    if !ready() {
        return;
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let pw = "mysql-clienttls-pw-3f7a1c9e5b";
    let db = MariaDb::start(MariaDbOptions::new(pw, "unused-ed-pw", "unused-tls-pw"));
    let f = write_file(dir.path(), "pw", pw);
    let ca_dir = dir.path().join("ca");
    // `broker ca` creates the CA and prints its certificate.
    let out = Command::new(broker_tests::broker_bin())
        .args(["ca", "--dir"])
        .arg(&ca_dir)
        .output()
        .expect("broker ca");
    assert!(
        out.status.success() && String::from_utf8_lossy(&out.stdout).contains("BEGIN CERTIFICATE"),
        "{}",
        output_text(&out)
    );
    let broker_ca = ca_dir.join("ca.crt");
    let up = db.addr();
    let mut services = service(
        "terminate",
        "db.example.test:3306",
        up,
        NATIVE_USER,
        &f,
        "      sslmode: disable\n",
        "      clientTLS: terminate\n",
    );
    services += &service(
        "refuse",
        "db.example.test:3307",
        up,
        NATIVE_USER,
        &f,
        "      sslmode: disable\n",
        "      clientTLS: refuse\n",
    );
    let cfg = config(dir.path(), &services);
    // `\s` is the client's status command: its `SSL:` line is about the client's own
    // connection (to the broker).
    let sql = "select concat('USER=', current_user()); \\s";
    let verify = format!(
        "--ssl --ssl-verify-server-cert --ssl-ca={}",
        broker_ca.display()
    );
    let wrong_ca = format!(
        "--ssl --ssl-verify-server-cert --ssl-ca={}",
        db.ca_cert.display()
    );
    let script = [
        cli_case("term-verify", 3306, &verify, sql),
        cli_case("term-wrong-ca", 3306, &wrong_ca, sql),
        cli_case("term-plain", 3306, "--skip-ssl", sql),
        cli_case("refuse-verify", 3307, &verify, sql),
        cli_case("refuse-plain", 3307, "--skip-ssl", sql),
        format!(
            "echo 'CASE coalesced'; {PYTHON} {} 3306 {} 2>&1; echo \"EXIT coalesced=$?\"",
            write_file(dir.path(), "coalesced.py", COALESCED_TLS).display(),
            broker_ca.display()
        ),
    ]
    .join("; ");
    let (_, text) = exec_sh(dir.path(), &cfg, &[], &script);
    let c = case(&text, "term-verify");
    assert!(
        c.contains("USER=native_user@%") && c.contains("Cipher in use is"),
        "a client verifying the broker's certificate (its CA, the name it dialled):\n{text}"
    );
    let c = case(&text, "term-wrong-ca");
    assert!(
        !c.contains("USER=") && exit_of(&text, "term-wrong-ca") != Some(0),
        "a certificate the client's CA did not sign is refused by the client:\n{text}"
    );
    let c = case(&text, "term-plain");
    assert!(
        c.contains("USER=native_user@%") && c.contains("Not in use"),
        "TLS offered, not required:\n{text}"
    );
    let c = case(&text, "refuse-verify");
    assert!(
        !c.contains("USER=") && c.contains("SSL is required"),
        "clientTLS refuse: a client requiring TLS gives up:\n{text}"
    );
    let c = case(&text, "refuse-plain");
    assert!(
        c.contains("USER=native_user@%") && c.contains("Not in use"),
        "clientTLS refuse: plain clients are served:\n{text}"
    );
    let c = case(&text, "coalesced");
    assert!(
        c.contains("TLS_OK TLSv1."),
        "SSLRequest and ClientHello in one write:\n{text}"
    );
    assert_no_secret(&text, &[pw], "exec output");
}

/// Run `tests/clients/<script>` under `broker exec` against a service for the native
/// user on a new MariaDB, once per environment in `runs`; each run's output.
fn python_client(tag: &str, script: &str, creds: &str, runs: &[&[(&str, &str)]]) -> Vec<String> {
    let dir = tempfile::tempdir().expect("tempdir");
    let pw = format!("mysql-{tag}-pw-8d2f6a0c4e");
    let db = MariaDb::start(MariaDbOptions::new(&pw, "unused-ed-pw", "unused-tls-pw"));
    let f = write_file(dir.path(), "pw", &pw);
    let cfg = config(
        dir.path(),
        &service(
            "app-db",
            "db.example.test:3306",
            db.addr(),
            NATIVE_USER,
            &f,
            creds,
            "",
        ),
    );
    let path = scripts_dir().join(script);
    runs.iter()
        .map(|env| {
            let mut vars: Vec<(&str, String)> = vec![
                ("MYSQL_HOST", "db.example.test".into()),
                ("MYSQL_PORT", "3306".into()),
                ("MYSQL_USER", "anything".into()),
                ("MYSQL_PASSWORD", "dummy-client-pw".into()),
                ("MYSQL_DATABASE", mariadb::DATABASE.into()),
                ("PYTHONPATH", python_deps().display().to_string()),
            ];
            vars.extend(env.iter().map(|(k, v)| (*k, (*v).to_owned())));
            let started = Instant::now();
            let (ok, text) = exec_sh(
                dir.path(),
                &cfg,
                &vars,
                &format!(
                    "timeout --kill-after=5 150 {PYTHON} {} 2>&1",
                    path.display()
                ),
            );
            eprintln!("{script} {env:?} took {:?}:\n{text}", started.elapsed());
            assert!(ok || text.contains("FAIL "), "{text}\n{}", db.log_text());
            assert_no_secret(&text, &[&pw], "client output");
            text
        })
        .collect()
}

fn python_has(module: &str, with_deps: bool) -> bool {
    let mut c = Command::new(PYTHON);
    c.args(["-c", &format!("import {module}")])
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    if with_deps {
        c.env("PYTHONPATH", python_deps());
    }
    c.status().is_ok_and(|s| s.success())
}

fn assert_steps(text: &str, steps: &[&str]) {
    for step in steps {
        assert!(
            text.lines().any(|l| l.starts_with(&format!("ok {step}"))),
            "step {step} did not pass:\n{text}"
        );
    }
    assert!(!text.contains("FAIL "), "{text}");
}

#[test]
fn pymysql_workload_load_data_select_and_kill_query() {
    if !ready() {
        return;
    }
    assert!(
        python_has("pymysql, cryptography", false),
        "PyMySQL is required (cargo xtask setup installs python3-pymysql)"
    );
    // Upstream TLS (relayed), then a plain upstream: spliced, the kernel framing the
    // upload's packets (50 MiB of LOAD DATA in 16 MiB packets, handed to the daemon
    // mid-packet when the upstream's send buffer fills).
    for creds in ["", "      sslmode: disable\n"] {
        let text = python_client("pymysql", "mysql_pymysql.py", creds, &[&[]]).remove(0);
        assert_steps(
            &text,
            &[
                "connect user=native_user@%",
                "parameterized",
                "transaction",
                "multi_statement",
                "load_data_local rows=51200",
                "select_big rows=51200",
                "kill_query",
                "thread_id",
                "split_writes refused=1235 then user=native_user@%",
            ],
        );
    }
}

#[test]
fn mysql_connector_python_server_side_prepared_statements() {
    if !ready() {
        return;
    }
    assert!(
        python_has("mysql.connector", true),
        "MySQL Connector/Python is required (cargo xtask setup installs it into target/clients)"
    );
    // The C extension (libmysqlclient answers with caching_sha2_password first), then the
    // pure-Python implementation.
    // Upstream TLS (the default `require`: the session is relayed), then a plain
    // upstream (spliced: the kernel carries the download, the daemon the upload, which
    // it watches for COM_CHANGE_USER).
    for creds in ["", "      sslmode: disable\n"] {
        let runs = python_client(
            "connector",
            "mysql_connector.py",
            creds,
            &[&[("MYSQL_USE_PURE", "0")], &[("MYSQL_USE_PURE", "1")]],
        );
        for text in &runs {
            assert_steps(
                text,
                &[
                    "connect user=native_user@%",
                    "prepared server-side",
                    "transaction",
                    "change_user refused=1235 then user=native_user@%",
                ],
            );
            assert!(text.contains("refused COM_CHANGE_USER"), "{text}");
            if !creds.is_empty() {
                // Spliced; the kernel handed the upload over at the COM_CHANGE_USER.
                assert!(
                    text.contains("spliced=true") && text.contains("splice.fallback=\"up\""),
                    "{text}"
                );
            }
        }
    }
}

#[test]
fn caching_sha2_fast_full_rsa_and_auth_switch_against_a_fake_mysql8() {
    if !ready() {
        return;
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let pw = "fake-sha2-pw-4a8c2e6f0b";
    let pw_old = "fake-native-pw-7e1b5d9c3a";
    let user = || FakeUser::new("app", pw, Plugin::CachingSha2);
    let tls = FakeMySql::start(FakeOptions::new(vec![user()]).tls());
    let rsa = FakeMySql::start(FakeOptions::new(vec![user()]));
    let key = FakeMySql::start(FakeOptions::new(vec![user()]));
    // The handshake names mysql_native_password; the user has caching_sha2_password.
    let to_sha2 = FakeMySql::start(FakeOptions::new(vec![user()]).default_plugin(Plugin::Native));
    // The handshake names caching_sha2_password; the user has mysql_native_password.
    let to_native = FakeMySql::start(FakeOptions::new(vec![FakeUser::new(
        "old",
        pw_old,
        Plugin::Native,
    )]));
    let f = write_file(dir.path(), "pw", pw);
    let f_old = write_file(dir.path(), "pw-old", pw_old);
    let t = |port: u16| format!("db.example.test:{port}");
    let mut services = String::new();
    services += &service(
        "sha2-tls",
        &t(3306),
        tls.addr,
        "app",
        &f,
        "      sslmode: require\n",
        "",
    );
    services += &service(
        "sha2-rsa",
        &t(3307),
        rsa.addr,
        "app",
        &f,
        "      sslmode: disable\n",
        "",
    );
    services += &service(
        "sha2-key",
        &t(3308),
        key.addr,
        "app",
        &f,
        "      sslmode: disable\n",
        &format!("      serverPublicKey: {}\n", key.public_key.display()),
    );
    services += &service(
        "switch-to-sha2",
        &t(3309),
        to_sha2.addr,
        "app",
        &f,
        "      sslmode: disable\n",
        "",
    );
    services += &service(
        "switch-to-native",
        &t(3310),
        to_native.addr,
        "old",
        &f_old,
        "      sslmode: disable\n",
        "",
    );
    let cfg = config(dir.path(), &services);
    let who = "select current_user()";
    let twice = |name: &str, port: u16| {
        format!(
            "{}; {}",
            cli_case(&format!("{name}-1"), port, "", who),
            cli_case(&format!("{name}-2"), port, "", who)
        )
    };
    let script = [
        cli_case("sha2-tls-1", 3306, "-D appdb", who),
        cli_case("sha2-tls-2", 3306, "", who),
        twice("sha2-rsa", 3307),
        twice("sha2-key", 3308),
        cli_case("switch-to-sha2", 3309, "", who),
        cli_case("switch-to-native", 3310, "", who),
    ]
    .join("; ");
    let (_, text) = exec_sh(dir.path(), &cfg, &[], &script);
    for name in [
        "sha2-tls-1",
        "sha2-tls-2",
        "sha2-rsa-1",
        "sha2-rsa-2",
        "sha2-key-1",
        "sha2-key-2",
        "switch-to-sha2",
    ] {
        assert!(
            case(&text, name).contains("app@%"),
            "{name}:\n{text}\nlogins: {:?} {:?} {:?} {:?}",
            tls.logins(),
            rsa.logins(),
            key.logins(),
            to_sha2.logins()
        );
    }
    assert!(
        case(&text, "switch-to-native").contains("old@%"),
        "{text}\n{:?}",
        to_native.logins()
    );
    let paths = |f: &FakeMySql| -> Vec<Result<AuthPath, String>> {
        f.logins().into_iter().map(|l| l.result).collect()
    };
    assert_eq!(
        paths(&tls),
        vec![Ok(AuthPath::FullTls), Ok(AuthPath::Fast)],
        "full authentication in clear over TLS, then the fast path"
    );
    assert!(tls.logins().iter().all(|l| l.tls));
    assert_eq!(
        tls.logins()[0].database.as_deref(),
        Some("appdb"),
        "the client's database reaches the server over TLS"
    );
    assert_eq!(
        paths(&rsa),
        vec![
            Ok(AuthPath::FullRsa {
                key_requested: true
            }),
            Ok(AuthPath::Fast)
        ],
        "full authentication over RSA (key asked for), then the fast path"
    );
    assert_eq!(
        paths(&key),
        vec![
            Ok(AuthPath::FullRsa {
                key_requested: false
            }),
            Ok(AuthPath::Fast)
        ],
        "serverPublicKey: the key is not asked for"
    );
    let s = to_sha2.logins();
    let n = to_native.logins();
    assert!(
        s.len() == 1 && matches!(s[0].result, Ok(AuthPath::FullRsa { .. })),
        "{s:?}"
    );
    assert!(n.len() == 1 && n[0].result == Ok(AuthPath::Native), "{n:?}");
    assert!(
        s[0].switched || n[0].switched,
        "an AuthSwitchRequest was followed: {s:?} {n:?}"
    );
    // After a cache flush the next login takes the full path again.
    rsa.flush_cache();
    let (_, text2) = exec_sh(
        dir.path(),
        &cfg,
        &[],
        &cli_case("sha2-rsa-3", 3307, "", who),
    );
    assert!(case(&text2, "sha2-rsa-3").contains("app@%"), "{text2}");
    assert!(
        matches!(paths(&rsa).last(), Some(Ok(AuthPath::FullRsa { .. }))),
        "{:?}",
        rsa.logins()
    );
    assert_no_secret(&format!("{text}{text2}"), &[pw, pw_old], "exec output");
}

#[test]
fn wrong_password_then_rotation_without_restart_and_unreachable_upstream() {
    if !ready() {
        return;
    }
    let right = "mysql-rotate-one-5c9e3a7b1d";
    let wrong = "mysql-not-the-pw-0f2d4b6a8c";
    let rotated = "mysql-rotate-two-1b3d5f7a9e";
    let mut db = MariaDb::start(MariaDbOptions::new(right, "unused-ed-pw", "unused-tls-pw"));
    let tmp = tempfile::tempdir().expect("tempdir");
    let f = write_file(tmp.path(), "pw", wrong);
    // Nothing listens there.
    let down: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().expect("addr");
    let mut services = service(
        "app-db",
        "127.0.0.2:3306",
        db.addr(),
        NATIVE_USER,
        &f,
        "",
        "",
    );
    services += &service("down-db", "127.0.0.2:3307", down, NATIVE_USER, &f, "", "");
    let b = run_broker(
        "mysql-rotate",
        &format!("  caDir: {}\n", tmp.path().join("ca").display()),
        &services,
    );
    let cli = |port: &str| {
        in_cgroup(
            &b.cg,
            "mariadb",
            &[
                "--no-defaults",
                "--connect-timeout=10",
                "-h",
                "127.0.0.2",
                "-P",
                port,
                "-u",
                "anything",
                "-pdummy-client-pw",
                "-N",
                "-B",
                "-e",
                "select concat('USER=', current_user())",
            ],
        )
    };
    // Wrong password in the store: the client prints the server's 1045.
    let (ok, t1) = cli("3306");
    assert!(!ok && t1.contains("1045"), "{t1}\n{}", b.daemon.log_text());
    // Rotate the server and the store together: the next connection works, no restart.
    db.set_password(NATIVE_USER, rotated);
    std::fs::write(&f, rotated).expect("rotate the store");
    let (ok, t2) = cli("3306");
    assert!(
        ok && t2.contains("USER=native_user@%"),
        "{t2}\n{}",
        b.daemon.log_text()
    );
    let (ok, t3) = cli("3306");
    assert!(ok && t3.contains("USER=native_user@%"), "{t3}");
    // An upstream that refuses connections: 1429, naming the service, in PyMySQL and in
    // the mariadb CLI (libmariadb drops the message of a client-range code like 2003).
    let (_, t4py) = in_cgroup(
        &b.cg,
        PYTHON,
        &[
            "-c",
            "import pymysql\ntry:\n    pymysql.connect(host='127.0.0.2', port=3307, user='x', password='y', connect_timeout=10)\nexcept pymysql.err.MySQLError as e:\n    print('CODE', e.args[0], e.args[1])",
        ],
    );
    assert!(
        t4py.contains("CODE 1429 ") && t4py.contains("down-db"),
        "{t4py}\n{}",
        b.daemon.log_text()
    );
    let (ok, t4) = cli("3307");
    assert!(
        !ok && t4.contains("down-db"),
        "the mariadb CLI shows the broker's error naming the service:\n{t4}\n{}",
        b.daemon.log_text()
    );
    let log = b.daemon.log_text();
    assert_no_secret(
        &format!("{t1}{t2}{t3}{t4py}{t4}{log}"),
        &[right, wrong, rotated],
        "client outputs and the broker's log",
    );
    let _ = &b.dir;
}
