//! Real PostgreSQL servers for tests (owned by the PostgreSQL connector work).
//!
//! [`PgServer::start`] creates a PostgreSQL 15 cluster in a temporary directory, run as
//! the `postgres` user (the server refuses root), listening on 127.0.0.1 (and `[::1]`
//! with [`PgOptions::ipv6`]) at a free port with its unix socket inside the directory.
//! It creates a login role and a database owned by it. Dropping the server stops it
//! (`pg_ctl stop -m immediate`) and deletes the directory.
//!
//! This file uses only `std`, `libc` and `tempfile`, so the broker's in-process tests can
//! include it too.

#![allow(dead_code)]

use std::{
    net::{SocketAddr, TcpListener},
    path::{Path, PathBuf},
    process::{Command, Output, Stdio},
    time::{Duration, Instant},
};

/// Where Debian puts the PostgreSQL 15 server binaries.
pub const PG_BIN: &str = "/usr/lib/postgresql/15/bin";
/// The OS user the server runs as.
pub const PG_OS_USER: &str = "postgres";
/// Names in the test server certificate.
pub const CERT_NAMES: [&str; 2] = ["db.example.test", "localhost"];

/// How the server authenticates TCP clients (`pg_hba.conf` method).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PgAuth {
    /// `scram-sha-256`, passwords stored as SCRAM.
    Scram,
    /// `md5`, passwords stored as MD5 (`password_encryption = md5`).
    Md5,
    /// `password`: cleartext over the wire.
    Password,
}

/// TLS on the server.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PgTls {
    /// `ssl = off`: SSLRequest is answered `N`.
    Off,
    /// `ssl = on` with a `host` line: TLS optional.
    On,
    /// `ssl = on` with only a `hostssl` line: plain connections are rejected.
    Required,
}

#[derive(Debug, Clone)]
pub struct PgOptions {
    pub auth: PgAuth,
    pub tls: PgTls,
    pub user: String,
    pub password: String,
    pub database: String,
    /// Port on 127.0.0.1; a free one when `None`.
    pub port: Option<u16>,
    /// Also listen on `[::1]` (same port, same `pg_hba.conf` method).
    pub ipv6: bool,
    /// The server certificate to use when TLS is on; `None`: [`make_certs`] makes one.
    pub certs: Option<ServerCerts>,
    /// Also listen on this IPv4 address (a veth's: a "node" address a simulated pod
    /// reaches), for clients in this network (CIDR), same method.
    pub also_listen: Option<(std::net::Ipv4Addr, String)>,
}

/// A server certificate made by the test, instead of [`make_certs`]'.
#[derive(Debug, Clone)]
pub struct ServerCerts {
    /// Certificate and key (PEM; copied into the server's directory).
    pub cert: PathBuf,
    pub key: PathBuf,
    /// The CA that signed `cert` (what [`PgServer::ca_cert`] reports).
    pub ca: PathBuf,
    /// `ssl_ca_file`: the server asks clients for a certificate signed by it (a
    /// certificate is not required: `pg_hba.conf` has no `clientcert`; one that is sent
    /// must verify).
    pub client_ca: Option<PathBuf>,
}

impl PgOptions {
    /// Role `app_user` with `password`, database `app`, no TLS.
    #[must_use]
    pub fn new(auth: PgAuth, password: &str) -> Self {
        Self {
            auth,
            tls: PgTls::Off,
            user: "app_user".into(),
            password: password.into(),
            database: "app".into(),
            port: None,
            ipv6: false,
            certs: None,
            also_listen: None,
        }
    }

    /// Listen on `ip` too (it must exist when the server starts), for clients in `net`.
    #[must_use]
    pub fn also_listen(mut self, ip: std::net::Ipv4Addr, net: &str) -> Self {
        self.also_listen = Some((ip, net.to_owned()));
        self
    }

    /// TLS with this certificate (sets [`PgTls::On`] unless TLS is already on).
    #[must_use]
    pub fn certs(mut self, certs: ServerCerts) -> Self {
        if self.tls == PgTls::Off {
            self.tls = PgTls::On;
        }
        self.certs = Some(certs);
        self
    }

    #[must_use]
    pub fn tls(mut self, tls: PgTls) -> Self {
        self.tls = tls;
        self
    }

    /// Listen on `[::1]` too.
    #[must_use]
    pub fn ipv6(mut self) -> Self {
        self.ipv6 = true;
        self
    }
}

/// Whether real servers can be started here: root (to switch to `postgres`) and the
/// binaries installed.
#[must_use]
pub fn available() -> bool {
    // SAFETY: geteuid has no preconditions.
    let root = unsafe { libc::geteuid() } == 0;
    root && Path::new(PG_BIN).join("postgres").exists() && which("psql").is_some()
}

fn which(cmd: &str) -> Option<PathBuf> {
    std::env::var_os("PATH")?
        .to_str()?
        .split(':')
        .map(|d| Path::new(d).join(cmd))
        .find(|p| p.exists())
}

fn pick_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .expect("bind 127.0.0.1:0")
        .local_addr()
        .expect("local_addr")
        .port()
}

fn run(cmd: &mut Command, what: &str) -> Output {
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("{what}: cannot run: {e}"));
    assert!(
        out.status.success(),
        "{what} failed ({}):\n{}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

fn as_postgres(bin: &str) -> Command {
    let mut c = Command::new("runuser");
    c.args(["-u", PG_OS_USER, "--"])
        .arg(Path::new(PG_BIN).join(bin));
    c
}

/// SQL string literal.
#[must_use]
pub fn sql_literal(s: &str) -> String {
    format!("'{}'", s.replace('\'', "''"))
}

/// A running PostgreSQL 15 server.
pub struct PgServer {
    dir: tempfile::TempDir,
    data: PathBuf,
    pub port: u16,
    pub user: String,
    pub password: String,
    pub database: String,
    /// The test CA (PEM) when TLS is on.
    pub ca_cert: Option<PathBuf>,
    stopped: bool,
}

impl PgServer {
    /// Create, configure and start a cluster; create the role and database.
    ///
    /// # Panics
    /// When anything fails (with the server log).
    #[must_use]
    pub fn start(opts: PgOptions) -> Self {
        let dir = tempfile::Builder::new()
            .prefix("broker-pg-")
            .tempdir()
            .expect("tempdir");
        let root = dir.path().to_path_buf();
        let data = root.join("data");
        let port = opts.port.unwrap_or_else(pick_port);
        let ca_cert = (opts.tls != PgTls::Off).then(|| match &opts.certs {
            Some(c) => use_certs(&root, c),
            None => make_certs(&root),
        });
        run(
            Command::new("chown")
                .arg("-R")
                .arg(format!("{PG_OS_USER}:{PG_OS_USER}"))
                .arg(&root),
            "chown test dir",
        );
        run(
            as_postgres("initdb")
                .args([
                    "-A",
                    "trust",
                    "-U",
                    "postgres",
                    "-E",
                    "UTF8",
                    "--no-sync",
                    "-D",
                ])
                .arg(&data),
            "initdb",
        );
        let method = match opts.auth {
            PgAuth::Scram => "scram-sha-256",
            PgAuth::Md5 => "md5",
            PgAuth::Password => "password",
        };
        let encryption = if opts.auth == PgAuth::Md5 {
            "md5"
        } else {
            "scram-sha-256"
        };
        let mut listen = if opts.ipv6 {
            "127.0.0.1,::1".to_owned()
        } else {
            "127.0.0.1".to_owned()
        };
        if let Some((ip, _)) = &opts.also_listen {
            listen.push_str(&format!(",{ip}"));
        }
        let mut conf = format!(
            "\n# broker tests\nlisten_addresses = '{listen}'\nport = {port}\n\
             unix_socket_directories = '{}'\nmax_connections = 40\nshared_buffers = 16MB\n\
             fsync = off\nsynchronous_commit = off\nfull_page_writes = off\n\
             password_encryption = '{encryption}'\nlog_connections = on\n",
            root.display()
        );
        if opts.tls != PgTls::Off {
            conf.push_str(&format!(
                "ssl = on\nssl_cert_file = '{0}/server.crt'\nssl_key_file = '{0}/server.key'\n",
                root.display()
            ));
            if opts.certs.as_ref().is_some_and(|c| c.client_ca.is_some()) {
                conf.push_str(&format!(
                    "ssl_ca_file = '{}/client-ca.crt'\n",
                    root.display()
                ));
            }
        }
        append(&data.join("postgresql.conf"), &conf);
        let host_kind = if opts.tls == PgTls::Required {
            "hostssl"
        } else {
            "host"
        };
        let mut hba = format!("local all all trust\n{host_kind} all all 127.0.0.1/32 {method}\n");
        if opts.ipv6 {
            hba.push_str(&format!("{host_kind} all all ::1/128 {method}\n"));
        }
        if let Some((_, net)) = &opts.also_listen {
            hba.push_str(&format!("{host_kind} all all {net} {method}\n"));
        }
        std::fs::write(data.join("pg_hba.conf"), hba).expect("write pg_hba.conf");
        let mut server = Self {
            dir,
            data,
            port,
            user: opts.user,
            password: opts.password,
            database: opts.database,
            ca_cert,
            stopped: true,
        };
        server.pg_ctl_start();
        server.admin_sql(&format!(
            "CREATE ROLE {} LOGIN PASSWORD {}",
            server.user,
            sql_literal(&server.password)
        ));
        server.admin_sql(&format!(
            "CREATE DATABASE {} OWNER {}",
            server.database, server.user
        ));
        server
    }

    fn pg_ctl_start(&mut self) {
        let log = self.dir.path().join("server.log");
        let out = as_postgres("pg_ctl")
            .arg("-D")
            .arg(&self.data)
            .arg("-l")
            .arg(&log)
            .args(["-w", "-t", "60", "start"])
            .stdin(Stdio::null())
            .output()
            .expect("run pg_ctl start");
        assert!(
            out.status.success(),
            "pg_ctl start failed: {}\n{}",
            String::from_utf8_lossy(&out.stderr),
            self.log_text()
        );
        self.stopped = false;
        let deadline = Instant::now() + Duration::from_secs(30);
        while std::net::TcpStream::connect(self.addr()).is_err() {
            assert!(
                Instant::now() < deadline,
                "server not listening:\n{}",
                self.log_text()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    #[must_use]
    pub fn addr(&self) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], self.port))
    }

    #[must_use]
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// Run SQL as the superuser over the unix socket; returns stdout (unaligned, tuples
    /// only). Panics on failure.
    pub fn admin_sql(&self, sql: &str) -> String {
        self.admin_sql_in("postgres", sql)
    }

    /// [`PgServer::admin_sql`] in database `db`.
    pub fn admin_sql_in(&self, db: &str, sql: &str) -> String {
        let out = run(
            Command::new("psql")
                .args([
                    "-X",
                    "-w",
                    "-A",
                    "-t",
                    "-v",
                    "ON_ERROR_STOP=1",
                    "-U",
                    "postgres",
                    "-h",
                ])
                .arg(self.dir.path())
                .args(["-p", &self.port.to_string(), "-d", db, "-c", sql]),
            "admin psql",
        );
        String::from_utf8_lossy(&out.stdout).trim().to_owned()
    }

    /// Change the role's password (the role keeps its other settings).
    pub fn set_password(&mut self, password: &str) {
        self.admin_sql(&format!(
            "ALTER ROLE {} PASSWORD {}",
            self.user,
            sql_literal(password)
        ));
        self.password = password.to_owned();
    }

    #[must_use]
    pub fn log_text(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("server.log")).unwrap_or_default()
    }

    /// Stop the server now (fast shutdown).
    pub fn stop(&mut self) {
        if self.stopped {
            return;
        }
        self.stopped = true;
        let _ = as_postgres("pg_ctl")
            .arg("-D")
            .arg(&self.data)
            .args(["-m", "immediate", "-w", "-t", "30", "stop"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
    }
}

impl Drop for PgServer {
    fn drop(&mut self) {
        self.stop();
    }
}

fn append(path: &Path, text: &str) {
    use std::io::Write as _;
    let mut f = std::fs::OpenOptions::new()
        .append(true)
        .open(path)
        .unwrap_or_else(|e| panic!("open {}: {e}", path.display()));
    f.write_all(text.as_bytes()).expect("append");
}

/// Copy the test's certificate files into the server's directory `dir` (as
/// `server.crt`, `server.key`, `client-ca.crt`: the `postgres` user cannot read the
/// test's own temporary directory). Returns the CA certificate path.
fn use_certs(dir: &Path, c: &ServerCerts) -> PathBuf {
    let copy = |from: &Path, to: &str| {
        std::fs::copy(from, dir.join(to))
            .unwrap_or_else(|e| panic!("copy {} to {to}: {e}", from.display()));
    };
    copy(&c.cert, "server.crt");
    copy(&c.key, "server.key");
    if let Some(ca) = &c.client_ca {
        copy(ca, "client-ca.crt");
    }
    use std::os::unix::fs::PermissionsExt as _;
    std::fs::set_permissions(
        dir.join("server.key"),
        std::fs::Permissions::from_mode(0o600),
    )
    .expect("chmod key");
    c.ca.clone()
}

/// Test CA and server certificate (CN `db.example.test`, SANs `db.example.test` and
/// `localhost`) with the `openssl` CLI, as `ca.crt`, `server.crt` and `server.key` in
/// `dir`. Returns the CA certificate path.
pub fn make_certs(dir: &Path) -> PathBuf {
    let p = |f: &str| dir.join(f);
    run(
        Command::new("openssl")
            .args([
                "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-sha256", "-days", "2",
            ])
            .args(["-subj", "/CN=broker test CA"])
            .args(["-addext", "basicConstraints=critical,CA:TRUE"])
            .args(["-addext", "keyUsage=critical,keyCertSign,cRLSign"])
            .arg("-keyout")
            .arg(p("ca.key"))
            .arg("-out")
            .arg(p("ca.crt")),
        "openssl CA",
    );
    run(
        Command::new("openssl")
            .args(["req", "-newkey", "rsa:2048", "-nodes", "-subj"])
            .arg(format!("/CN={}", CERT_NAMES[0]))
            .arg("-keyout")
            .arg(p("server.key"))
            .arg("-out")
            .arg(p("server.csr")),
        "openssl server key",
    );
    let sans = CERT_NAMES
        .iter()
        .map(|n| format!("DNS:{n}"))
        .collect::<Vec<_>>()
        .join(",");
    std::fs::write(
        p("server.ext"),
        format!(
            "basicConstraints=CA:FALSE\nkeyUsage=critical,digitalSignature,keyEncipherment\n\
             extendedKeyUsage=serverAuth\nsubjectAltName={sans}\n"
        ),
    )
    .expect("write ext");
    run(
        Command::new("openssl")
            .args(["x509", "-req", "-sha256", "-days", "2", "-in"])
            .arg(p("server.csr"))
            .arg("-CA")
            .arg(p("ca.crt"))
            .arg("-CAkey")
            .arg(p("ca.key"))
            .arg("-CAcreateserial")
            .arg("-extfile")
            .arg(p("server.ext"))
            .arg("-out")
            .arg(p("server.crt")),
        "openssl sign",
    );
    use std::os::unix::fs::PermissionsExt as _;
    std::fs::set_permissions(p("server.key"), std::fs::Permissions::from_mode(0o600))
        .expect("chmod key");
    // The CA must stay readable by the broker (root) and by tests.
    std::fs::set_permissions(p("ca.crt"), std::fs::Permissions::from_mode(0o644))
        .expect("chmod ca");
    p("ca.crt")
}

/// Run the real `psql` client: `psql -X -w -A -t -v ON_ERROR_STOP=1 <conninfo> -c <sql>`,
/// bounded to 30 s, never prompting for a password.
#[must_use]
pub fn psql(conninfo: &str, sql: &str) -> Output {
    psql_env(conninfo, sql, &[])
}

/// [`psql`] with extra environment variables.
#[must_use]
pub fn psql_env(conninfo: &str, sql: &str, env: &[(&str, &str)]) -> Output {
    let mut c = Command::new("timeout");
    c.args([
        "--kill-after=5",
        "30",
        "psql",
        "-X",
        "-w",
        "-A",
        "-t",
        "-v",
        "ON_ERROR_STOP=1",
    ])
    .arg(conninfo)
    .args(["-c", sql])
    .env_remove("PGPASSWORD")
    .env_remove("PGSERVICE")
    .env("PGCONNECT_TIMEOUT", "10")
    .stdin(Stdio::null());
    for (k, v) in env {
        c.env(k, v);
    }
    c.output().expect("spawn psql")
}

/// A Python interpreter that can `import psycopg2`, if there is one.
#[must_use]
pub fn python_with_psycopg2() -> Option<PathBuf> {
    ["python3", "/usr/bin/python3"].into_iter().find_map(|py| {
        let ok = Command::new(py)
            .args(["-c", "import psycopg2"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        ok.then(|| PathBuf::from(py))
    })
}

/// A psycopg2 script that runs `select pg_sleep(30)` on `dsn`, cancels it from another
/// thread after `after_ms`, and prints `SQLSTATE <code> ELAPSED <seconds>`.
pub const CANCEL_SCRIPT: &str = r#"
import sys, threading, time, psycopg2
dsn, after = sys.argv[1], float(sys.argv[2]) / 1000.0
conn = psycopg2.connect(dsn)
cur = conn.cursor()
t = threading.Timer(after, conn.cancel)
t.start()
start = time.monotonic()
code = "none"
try:
    cur.execute("select pg_sleep(30)")
except psycopg2.Error as e:
    code = e.pgcode
print("SQLSTATE %s ELAPSED %.3f" % (code, time.monotonic() - start - after))
t.cancel()
conn.close()
"#;

/// Run [`CANCEL_SCRIPT`]; returns (SQLSTATE, seconds from cancel to the error), plus
/// the raw output.
#[must_use]
pub fn cancel_sleep(python: &Path, dsn: &str, after_ms: u64) -> (String, f64, String) {
    let out = Command::new("timeout")
        .args(["--kill-after=5", "60"])
        .arg(python)
        .args(["-c", CANCEL_SCRIPT, dsn, &after_ms.to_string()])
        .env("PGCONNECT_TIMEOUT", "10")
        .stdin(Stdio::null())
        .output()
        .expect("spawn python");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let line = text
        .lines()
        .find(|l| l.starts_with("SQLSTATE "))
        .unwrap_or_default();
    let mut words = line.split_whitespace();
    let code = words.nth(1).unwrap_or("missing").to_owned();
    let elapsed = words
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(f64::MAX);
    (code, elapsed, text)
}
