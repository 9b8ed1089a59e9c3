//! The real-client matrix: psql, psycopg2, asyncpg, pg8000, node-postgres and JDBC,
//! unmodified, under `broker exec` against a real PostgreSQL, each running the same
//! workload (`tests/clients/`, see `broker_tests::clients`): a prepared statement
//! executed twice, a transaction rolled back then committed, about 10 MB of COPY in and
//! back out (byte for byte), a server error after which the session still answers, and
//! a cancel of `pg_sleep(30)` through the client's own cancel API (a CancelRequest,
//! answered with 57014 within seconds; pg8000 has no cancel API and skips it).
//!
//! One `#[test]` per row of the matrix: what the app dials and how the broker and the
//! upstream are configured. A row is one line in `matrix!` below; each row starts its
//! own PostgreSQL and runs the clients one after another, each in its own `broker
//! exec`. Every client's output and the broker's log are grepped for the password.
//! `direct_baseline` runs the same scripts straight to the server with the real
//! password (plain, and TLS verify-full), so a client failing in a row and passing
//! there is the broker's failure.

use std::{
    path::{Path, PathBuf},
    process::{Command, Stdio},
    sync::OnceLock,
    time::{Duration, Instant},
};

use broker_tests::{
    assert_no_secret, broker_exec,
    clients::{Client, compile_jdbc},
    free_port, output_text,
    pg::{PgAuth, PgOptions, PgServer, PgTls},
    privileged, write_file,
};

/// The name rows that dial a hostname use; `/etc/hosts` maps it to 127.0.0.1 for the
/// broker and the client (a private mount namespace). The test server certificate
/// carries it.
const HOSTNAME: &str = "db.example.test";

/// What the app dials (always the server's real port).
#[derive(Debug, Clone, Copy)]
enum Dial {
    /// [`HOSTNAME`], resolving to 127.0.0.1.
    Name,
    /// 127.0.0.1.
    V4,
    /// `::1`.
    V6,
}

impl Dial {
    fn host(self) -> &'static str {
        match self {
            Self::Name => HOSTNAME,
            Self::V4 => "127.0.0.1",
            Self::V6 => "::1",
        }
    }

    fn target(self, port: u16) -> String {
        match self {
            Self::V6 => format!("[::1]:{port}"),
            _ => format!("{}:{port}", self.host()),
        }
    }
}

/// One row: the upstream PostgreSQL, what the app dials, what the broker's service
/// adds, and the clients' environment. In `credentials`, `service` and `env`, `{ca}`
/// is the test CA that signed the upstream's certificate (TLS upstreams) and `{dir}`
/// the row's temporary directory.
#[derive(Debug, Clone, Copy)]
struct Row {
    upstream: PgTls,
    dial: Dial,
    /// YAML lines under the service's `credentials:` (besides username and password).
    credentials: &'static str,
    /// YAML lines under the service (e.g. `config:` keys).
    service: &'static str,
    /// Environment of every client (e.g. `PGSSLMODE`); unset means the client's own
    /// default sslmode.
    env: &'static [(&'static str, &'static str)],
}

impl Row {
    /// A plain PostgreSQL (`ssl = off`) at the dialled address; no `host` credential:
    /// the upstream is the original destination.
    const fn plain(dial: Dial) -> Self {
        Self {
            upstream: PgTls::Off,
            dial,
            credentials: "sslmode: disable",
            service: "",
            env: &[],
        }
    }

    /// A TLS-only PostgreSQL (`ssl = on`, `hostssl` lines only) at the dialled address.
    const fn tls_only(dial: Dial) -> Self {
        Self {
            upstream: PgTls::Required,
            credentials: "",
            ..Self::plain(dial)
        }
    }

    const fn credentials(self, credentials: &'static str) -> Self {
        Self {
            credentials,
            ..self
        }
    }

    const fn service(self, service: &'static str) -> Self {
        Self { service, ..self }
    }

    const fn env(self, env: &'static [(&'static str, &'static str)]) -> Self {
        Self { env, ..self }
    }
}

/// One `#[test]` per row: `name: row;`, attributes (`#[ignore = "why"]`) allowed.
macro_rules! matrix {
    ($($(#[$attr:meta])* $name:ident: $row:expr;)*) => {$(
        #[test]
        $(#[$attr])*
        fn $name() {
            run_row(stringify!($name), $row);
        }
    )*};
}

// A row is one line (or one builder chain). `{brokerca}`: the broker's local CA
// certificate (what an app trusts to verify the broker's client-leg certificates).
matrix! {
    hostname: Row::plain(Dial::Name);
    ipv4: Row::plain(Dial::V4);
    ipv6: Row::plain(Dial::V6);
    tls_upstream_verify_full_with_host: Row::tls_only(Dial::Name)
        .credentials("sslmode: verify-full\nsslrootcert: {ca}\nhost: db.example.test");
    tls_upstream_verify_full_no_host: Row::tls_only(Dial::Name)
        .credentials("sslmode: verify-full\nsslrootcert: {ca}");
    client_sslmode_require: Row::plain(Dial::Name)
        .service("config:\n  clientTLS: on")
        .env(&[("PGSSLMODE", "require")]);
    client_verify_full_with_broker_ca: Row::plain(Dial::Name)
        .service("config:\n  clientTLS: on")
        .env(&[("PGSSLMODE", "verify-full"), ("PGSSLROOTCERT", "{brokerca}")]);
    client_channel_binding_require: Row::plain(Dial::Name)
        .service("config:\n  clientTLS: on\n  clientAuth: scram-sha-256\n  clientPassword: dummy")
        .env(&[("PGSSLMODE", "require"), ("PGCHANNELBINDING", "require")]);
}

/// What one client run showed.
struct Outcome {
    client: Client,
    seconds: f64,
    /// `None` when every step passed.
    failure: Option<String>,
    /// Its `ok ...`/`skip ...` lines.
    steps: Vec<String>,
    /// Access lines of its connections.
    access: Vec<Access>,
}

/// The steps every client prints, in order (`skip cancel` for a client without a
/// cancel API).
const STEPS: [&str; 8] = [
    "connect",
    "prepared",
    "transaction",
    "copy_in",
    "copy_out",
    "error",
    "cancel",
    "close",
];

/// The server logs one line per cancelled statement.
const CANCELLED: &str = "canceling statement due to user request";

/// `Jdbc.java` compiled once per test process, into Cargo's temporary directory for
/// integration tests (`jdbc-<pid>`; directories of processes that are gone are removed).
fn jdbc_classes() -> &'static Path {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let tmp = Path::new(env!("CARGO_TARGET_TMPDIR"));
        for entry in std::fs::read_dir(tmp).into_iter().flatten().flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            if let Some(pid) = name.strip_prefix("jdbc-")
                && !Path::new("/proc").join(pid).exists()
            {
                let _ = std::fs::remove_dir_all(entry.path());
            }
        }
        let dir = tmp.join(format!("jdbc-{}", std::process::id()));
        compile_jdbc(&dir);
        dir
    })
}

fn require_clients() {
    let missing: Vec<String> = Client::ALL.iter().filter_map(|c| c.missing()).collect();
    assert!(missing.is_empty(), "{}", missing.join("\n"));
}

fn start_server(tls: PgTls, password: &str) -> PgServer {
    let mut opts = PgOptions::new(PgAuth::Scram, password).tls(tls).ipv6();
    opts.port = Some(free_port());
    PgServer::start(opts)
}

/// Check one run's output against the workload; the failure, if any.
fn judge(client: Client, ok: bool, text: &str) -> Option<String> {
    if let Some(fail) = text.lines().find(|l| l.starts_with("FAIL ")) {
        return Some(fail.to_owned());
    }
    for step in STEPS {
        let want_skip = step == "cancel" && !client.cancels();
        let prefix = if want_skip { "skip" } else { "ok" };
        let found = text.lines().any(|l| {
            l.strip_prefix(prefix)
                .and_then(|l| l.strip_prefix(' '))
                .is_some_and(|l| l == step || l.starts_with(&format!("{step} ")))
        });
        if !found {
            return Some(format!("no `{prefix} {step}` line (exit ok: {ok})"));
        }
    }
    if !text.lines().any(|l| l == "ok connect user=app_user") {
        return Some("the session is not app_user's".into());
    }
    (!ok).then(|| "the client exited with an error".into())
}

/// What the table shows of an access line.
struct Access {
    result: String,
    spliced: bool,
    /// The client leg was TLS the broker terminated.
    client_tls: bool,
    /// Bytes from the app: 16 for a connection that carried only a CancelRequest.
    bytes_up: u64,
}

/// The length of a CancelRequest, all a cancel connection sends.
const CANCEL_REQUEST_LEN: u64 = 16;

/// Access lines (JSON) in `text`.
fn access_lines(text: &str) -> Vec<Access> {
    text.lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|v| v["target"] == "access")
        .map(|v| Access {
            result: v["result"].as_str().unwrap_or("?").to_owned(),
            spliced: v["spliced"].as_bool().unwrap_or(false),
            client_tls: v["client.tls"].as_bool().unwrap_or(false),
            bytes_up: v["bytes.up"].as_u64().unwrap_or(0),
        })
        .collect()
}

/// The broker's warnings and errors in `text` (JSON lines), for failure reports.
fn broker_complaints(text: &str) -> Vec<String> {
    text.lines()
        .filter(|l| {
            serde_json::from_str::<serde_json::Value>(l).is_ok_and(|v| {
                matches!(v["level"].as_str(), Some("WARN" | "ERROR"))
                    || (v["target"] == "access" && v["result"] != "ok")
            })
        })
        .map(str::to_owned)
        .collect()
}

/// A client command bounded in time: `timeout` kills it after 150 s.
fn bounded(argv: &[String]) -> Vec<String> {
    let mut all: Vec<String> = ["timeout", "--kill-after=5", "150"]
        .iter()
        .map(|s| (*s).to_owned())
        .collect();
    all.extend_from_slice(argv);
    all
}

/// The environment every client gets: a clean one (no PG* variable of the test
/// runner), the connection variables, the client's own extras.
fn client_env(cmd: &mut Command, client: Client, vars: &[(&str, String)]) {
    cmd.env_clear()
        .env("PATH", std::env::var_os("PATH").unwrap_or_default())
        .env(
            "HOME",
            std::env::var_os("HOME").unwrap_or_else(|| "/root".into()),
        )
        .env("LANG", "C.UTF-8")
        .env("PGCONNECT_TIMEOUT", "10");
    for (k, v) in vars {
        cmd.env(k, v);
    }
    for (k, v) in client.env() {
        cmd.env(k, v);
    }
    cmd.stdin(Stdio::null());
}

fn expand(s: &str, ca: &str, dir: &Path) -> String {
    s.replace("{ca}", ca)
        .replace(
            "{brokerca}",
            &dir.join("brokerca/ca.crt").display().to_string(),
        )
        .replace("{dir}", &dir.display().to_string())
}

fn indent(lines: &str, by: usize) -> String {
    lines
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| format!("{:by$}{l}\n", ""))
        .collect()
}

fn run_row(name: &str, row: Row) {
    if !privileged() {
        return;
    }
    require_clients();
    let started = Instant::now();
    let password = format!("matrix-{name}-pw-5e0c3a9f71");
    let pg = start_server(row.upstream, &password);
    let port = pg.addr().port();
    let dir = tempfile::tempdir().expect("tempdir");
    let ca = pg
        .ca_cert
        .as_ref()
        .map(|p| p.display().to_string())
        .unwrap_or_default();
    let pw_file = write_file(dir.path(), "pw", &password);
    let cfg = write_file(
        dir.path(),
        "broker.yaml",
        &format!(
            "version: 2\nbroker:\n  caDir: {}\nservices:\n  db:\n    connector: pg\n    intercept: [\"{}\"]\n    credentials:\n      username: app_user\n      password: {{from: file, get: {}}}\n{}{}",
            dir.path().join("brokerca").display(),
            row.dial.target(port),
            pw_file.display(),
            indent(&expand(row.credentials, &ca, dir.path()), 6),
            indent(&expand(row.service, &ca, dir.path()), 4),
        ),
    );
    let mut vars: Vec<(&str, String)> = vec![
        ("PGHOST", row.dial.host().to_owned()),
        ("PGPORT", port.to_string()),
        ("PGUSER", "anything".to_owned()),
        ("PGPASSWORD", "dummy".to_owned()),
        ("PGDATABASE", "app".to_owned()),
    ];
    vars.extend(
        row.env
            .iter()
            .map(|(k, v)| (*k, expand(v, &ca, dir.path()))),
    );

    let mut outcomes = Vec::new();
    let mut all_text = String::new();
    for client in Client::ALL {
        let cancels_before = pg.log_text().matches(CANCELLED).count();
        let argv = bounded(&client.argv(jdbc_classes()));
        let argv: Vec<&str> = argv.iter().map(String::as_str).collect();
        let mut cmd = broker_exec(
            dir.path(),
            &[(HOSTNAME, "127.0.0.1")],
            &["--log-format", "json"],
            &cfg,
            &argv,
        );
        client_env(&mut cmd, client, &vars);
        let t = Instant::now();
        let out = cmd.output().expect("run broker exec");
        let seconds = t.elapsed().as_secs_f64();
        let text = output_text(&out);
        let mut failure = judge(client, out.status.success(), &text);
        let cancelled = pg.log_text().matches(CANCELLED).count() - cancels_before;
        let access = access_lines(&text);
        if failure.is_none() && client.cancels() {
            if cancelled != 1 {
                failure = Some(format!(
                    "the server logged {cancelled} cancelled statements, not 1"
                ));
            } else if !access.iter().any(|a| a.bytes_up == CANCEL_REQUEST_LEN) {
                failure = Some("no access line for the CancelRequest's connection".into());
            }
        }
        // Every session ended cleanly (a cancel connection aside, which carries no TLS).
        if failure.is_none()
            && let Some(a) = access
                .iter()
                .find(|a| a.result != "ok" && a.bytes_up != CANCEL_REQUEST_LEN)
        {
            failure = Some(format!("a connection ended with result {}", a.result));
        }
        if failure.is_none()
            && row.service.contains("clientTLS: on")
            && !access.iter().any(|a| a.client_tls)
        {
            failure = Some("no session used TLS to the broker (clientTLS)".into());
        }
        if let Some(f) = &mut failure {
            let complaints = broker_complaints(&text);
            if !complaints.is_empty() {
                f.push_str(&format!(
                    "\n      broker: {}",
                    complaints.join("\n      broker: ")
                ));
            }
        }
        outcomes.push(Outcome {
            client,
            seconds,
            failure,
            steps: text
                .lines()
                .filter(|l| l.starts_with("ok ") || l.starts_with("skip "))
                .map(str::to_owned)
                .collect(),
            access,
        });
        all_text.push_str(&format!("===== {}\n{text}\n", client.name()));
    }
    assert_no_secret(&all_text, &[&password], "client output and broker log");
    report(name, &outcomes, started.elapsed());
    let failed: Vec<String> = outcomes
        .iter()
        .filter_map(|o| {
            o.failure
                .as_ref()
                .map(|f| format!("  {}: {f}", o.client.name()))
        })
        .collect();
    assert!(
        failed.is_empty(),
        "row {name}: {} of {} clients failed:\n{}\n\nfull output:\n{all_text}",
        failed.len(),
        outcomes.len(),
        failed.join("\n")
    );
}

/// One table per row, printed (`--nocapture` shows it).
fn report(name: &str, outcomes: &[Outcome], took: Duration) {
    let mut s = format!("\nrow {name} ({:.1} s)\n", took.as_secs_f64());
    for o in outcomes {
        let spliced = o.access.iter().filter(|a| a.spliced).count();
        let results: Vec<&str> = o.access.iter().map(|a| a.result.as_str()).collect();
        s.push_str(&format!(
            "  {:<14} {:<5} {:>5.1} s",
            o.client.name(),
            if o.failure.is_none() { "ok" } else { "FAIL" },
            o.seconds,
        ));
        if !o.access.is_empty() {
            s.push_str(&format!(
                "  access lines: {} ({} spliced) results: {}",
                o.access.len(),
                spliced,
                results.join(",")
            ));
        }
        s.push('\n');
        if let Some(f) = &o.failure {
            s.push_str(&format!("      {f}\n"));
        }
        for step in &o.steps {
            if step.starts_with("ok cancel") || step.starts_with("skip") {
                s.push_str(&format!("      {step}\n"));
            }
        }
    }
    println!("{s}");
}

/// The scripts straight to the server with the real password: plain with the clients'
/// default sslmode, and TLS-only with `verify-full` against the test CA (by the name
/// `localhost`, in the certificate). What the rows are measured against.
#[test]
fn direct_baseline() {
    if !privileged() {
        return;
    }
    require_clients();
    let password = "matrix-direct-pw-2b8d4f6a0c";
    for (label, tls) in [("plain", PgTls::Off), ("tls-verify-full", PgTls::Required)] {
        let pg = start_server(tls, password);
        let mut vars: Vec<(&str, String)> = vec![
            ("PGHOST", "localhost".to_owned()),
            ("PGPORT", pg.addr().port().to_string()),
            ("PGUSER", "app_user".to_owned()),
            ("PGPASSWORD", password.to_owned()),
            ("PGDATABASE", "app".to_owned()),
        ];
        if let Some(ca) = &pg.ca_cert {
            vars.push(("PGSSLMODE", "verify-full".to_owned()));
            vars.push(("PGSSLROOTCERT", ca.display().to_string()));
        }
        let mut outcomes = Vec::new();
        let started = Instant::now();
        for client in Client::ALL {
            let argv = bounded(&client.argv(jdbc_classes()));
            let mut cmd = Command::new(&argv[0]);
            cmd.args(&argv[1..]);
            client_env(&mut cmd, client, &vars);
            let t = Instant::now();
            let out = cmd.output().expect("run client");
            let text = output_text(&out);
            outcomes.push(Outcome {
                client,
                seconds: t.elapsed().as_secs_f64(),
                failure: judge(client, out.status.success(), &text).map(|f| format!("{f}\n{text}")),
                steps: text
                    .lines()
                    .filter(|l| l.starts_with("ok cancel") || l.starts_with("skip "))
                    .map(str::to_owned)
                    .collect(),
                access: Vec::new(),
            });
        }
        report(&format!("direct {label}"), &outcomes, started.elapsed());
        let failed: Vec<String> = outcomes
            .iter()
            .filter_map(|o| {
                o.failure
                    .as_ref()
                    .map(|f| format!("{}: {f}", o.client.name()))
            })
            .collect();
        assert!(failed.is_empty(), "direct {label}:\n{}", failed.join("\n"));
    }
}
