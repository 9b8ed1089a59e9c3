//! Real MariaDB servers for tests (the `mysql` connector's acceptance tests).
//!
//! [`MariaDb::start`] creates a MariaDB 10.11 data directory (`mariadb-install-db`) in a
//! temporary directory owned by the `mysql` user, and runs `mariadbd --user=mysql` (the
//! server drops root itself) on `ip:port` with TLS on (a server certificate for
//! `db.example.test` and `localhost` from a test CA made with rcgen), `local_infile` on,
//! its unix socket inside the directory. It creates database `app` and three users with
//! all privileges on it:
//! * [`NATIVE_USER`], `mysql_native_password`;
//! * [`ED25519_USER`], `ed25519` (the `auth_ed25519` plugin, installed with
//!   `INSTALL SONAME`; the user is left out, with the reason in [`MariaDb::ed25519`] and
//!   on stderr, when the plugin is missing);
//! * [`TLS_USER`], `mysql_native_password` and `REQUIRE SSL`.
//!
//! Start-up is bounded (60 s). Dropping the server kills it and deletes the directory.
//! Administration goes over the unix socket as `root` (`unix_socket` authentication).

use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
    process::{Child, Command, Output, Stdio},
    time::{Duration, Instant},
};

/// `mysql_native_password` user.
pub const NATIVE_USER: &str = "native_user";
/// `ed25519` user.
pub const ED25519_USER: &str = "ed_user";
/// `REQUIRE SSL` user (`mysql_native_password`).
pub const TLS_USER: &str = "tls_user";
/// The test database, all privileges to every user above.
pub const DATABASE: &str = "app";
/// Names in the server certificate.
pub const CERT_NAMES: [&str; 2] = ["db.example.test", "localhost"];
/// The OS user the server runs as.
pub const OS_USER: &str = "mysql";

/// What to start.
#[derive(Debug, Clone)]
pub struct MariaDbOptions {
    /// A loopback address (`127.0.0.x`).
    pub ip: String,
    /// A free port when `None`.
    pub port: Option<u16>,
    pub native_password: String,
    pub ed25519_password: String,
    pub tls_password: String,
}

impl MariaDbOptions {
    /// On 127.0.0.1, with these passwords for [`NATIVE_USER`], [`ED25519_USER`] and
    /// [`TLS_USER`].
    #[must_use]
    pub fn new(native: &str, ed25519: &str, tls: &str) -> Self {
        Self {
            ip: "127.0.0.1".into(),
            port: None,
            native_password: native.into(),
            ed25519_password: ed25519.into(),
            tls_password: tls.into(),
        }
    }

    #[must_use]
    pub fn ip(mut self, ip: &str) -> Self {
        self.ip = ip.into();
        self
    }
}

/// Whether real servers can be started here: root and the binaries installed.
#[must_use]
pub fn available() -> bool {
    // SAFETY: geteuid has no preconditions.
    let root = unsafe { libc::geteuid() } == 0;
    root && which("mariadbd").is_some()
        && which("mariadb-install-db").is_some()
        && which("mariadb").is_some()
}

fn which(cmd: &str) -> Option<PathBuf> {
    let path = std::env::var("PATH").unwrap_or_default();
    path.split(':')
        .chain(["/usr/sbin", "/usr/bin"])
        .map(|d| Path::new(d).join(cmd))
        .find(|p| p.exists())
}

/// SQL string literal (MySQL escapes backslashes too).
#[must_use]
pub fn sql_literal(s: &str) -> String {
    format!("'{}'", s.replace('\\', "\\\\").replace('\'', "''"))
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

/// A running MariaDB server.
pub struct MariaDb {
    dir: tempfile::TempDir,
    child: Child,
    pub ip: String,
    pub port: u16,
    /// The test CA (PEM) that signed the server certificate.
    pub ca_cert: PathBuf,
    /// `Ok` when [`ED25519_USER`] exists; why not otherwise.
    pub ed25519: Result<(), String>,
    pub native_password: String,
    pub ed25519_password: String,
    pub tls_password: String,
}

impl MariaDb {
    /// Create, start and populate a server.
    ///
    /// # Panics
    /// When anything fails (with the server log).
    #[must_use]
    pub fn start(opts: MariaDbOptions) -> Self {
        let dir = tempfile::Builder::new()
            .prefix("broker-mariadb-")
            .tempdir()
            .expect("tempdir");
        let root = dir.path().to_path_buf();
        let port = opts.port.unwrap_or_else(crate::free_port);
        let ca_cert = make_certs(&root);
        let cnf = root.join("my.cnf");
        std::fs::write(
            &cnf,
            format!(
                "[mariadbd]\n\
                 datadir={0}/data\nsocket={0}/mysqld.sock\npid-file={0}/mysqld.pid\n\
                 log-error={0}/server.log\ntmpdir={0}/tmp\nbind-address={1}\nport={port}\n\
                 skip-name-resolve\nskip-log-bin\nperformance_schema=OFF\n\
                 innodb_buffer_pool_size=64M\ninnodb_log_file_size=96M\n\
                 innodb_flush_log_at_trx_commit=0\nmax_connections=60\n\
                 max_allowed_packet=64M\nlocal-infile=1\n\
                 ssl-ca={0}/ca.crt\nssl-cert={0}/server.crt\nssl-key={0}/server.key\n",
                root.display(),
                opts.ip
            ),
        )
        .expect("write my.cnf");
        // Its own temporary directory: two servers bootstrapping at once in /tmp
        // have been seen to trip over each other's temporary tables.
        std::fs::create_dir(root.join("tmp")).expect("create tmpdir");
        run(
            Command::new("chown")
                .arg("-R")
                .arg(format!("{OS_USER}:{OS_USER}"))
                .arg(&root),
            "chown test dir",
        );
        let out = Command::new("mariadb-install-db")
            .arg(format!("--defaults-file={}", cnf.display()))
            .args([
                "--user=mysql",
                "--skip-test-db",
                "--auth-root-authentication-method=socket",
            ])
            .stdin(Stdio::null())
            .output()
            .expect("run mariadb-install-db");
        assert!(
            out.status.success(),
            "mariadb-install-db failed ({}):\n{}{}\nserver log:\n{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr),
            std::fs::read_to_string(root.join("server.log")).unwrap_or_default()
        );
        let child = Command::new("mariadbd")
            .arg(format!("--defaults-file={}", cnf.display()))
            .arg("--user=mysql")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn mariadbd");
        let mut server = Self {
            dir,
            child,
            ip: opts.ip,
            port,
            ca_cert,
            ed25519: Ok(()),
            native_password: opts.native_password,
            ed25519_password: opts.ed25519_password,
            tls_password: opts.tls_password,
        };
        server.wait_ready(Duration::from_secs(60));
        server.admin_sql(&format!("CREATE DATABASE {DATABASE}"));
        server.admin_sql(&format!(
            "CREATE USER '{NATIVE_USER}'@'%' IDENTIFIED VIA mysql_native_password USING PASSWORD({})",
            sql_literal(&server.native_password)
        ));
        server.admin_sql(&format!(
            "CREATE USER '{TLS_USER}'@'%' IDENTIFIED BY {} REQUIRE SSL",
            sql_literal(&server.tls_password)
        ));
        let ed = server.try_admin_sql("INSTALL SONAME 'auth_ed25519'");
        server.ed25519 = match ed {
            Ok(_) => {
                server.admin_sql(&format!(
                    "CREATE USER '{ED25519_USER}'@'%' IDENTIFIED VIA ed25519 USING PASSWORD({})",
                    sql_literal(&server.ed25519_password)
                ));
                Ok(())
            }
            Err(e) => {
                let why = format!("the auth_ed25519 plugin cannot be installed: {e}");
                eprintln!("mariadb: no {ED25519_USER}: {why}");
                Err(why)
            }
        };
        for user in [NATIVE_USER, TLS_USER, ED25519_USER] {
            if user != ED25519_USER || server.ed25519.is_ok() {
                server.admin_sql(&format!("GRANT ALL ON {DATABASE}.* TO '{user}'@'%'"));
            }
        }
        server
    }

    fn wait_ready(&mut self, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(st) = self.child.try_wait().expect("try_wait") {
                panic!("mariadbd exited ({st}):\n{}", self.log_text());
            }
            if self.try_admin_sql("SELECT 1").is_ok()
                && std::net::TcpStream::connect(self.addr()).is_ok()
            {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "mariadbd not ready after {timeout:?}:\n{}",
                self.log_text()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    #[must_use]
    pub fn addr(&self) -> SocketAddr {
        format!("{}:{}", self.ip, self.port)
            .parse()
            .expect("address")
    }

    #[must_use]
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// The unix socket (administration; the broker never uses it).
    #[must_use]
    pub fn socket(&self) -> PathBuf {
        self.dir.path().join("mysqld.sock")
    }

    /// Run SQL as `root` over the unix socket: stdout (tab-separated, no column names),
    /// or the client's error.
    ///
    /// # Errors
    /// The client's output when it fails.
    pub fn try_admin_sql(&self, sql: &str) -> Result<String, String> {
        let out = Command::new("timeout")
            .args([
                "--kill-after=5",
                "60",
                "mariadb",
                "--no-defaults",
                "-u",
                "root",
                "-S",
            ])
            .arg(self.socket())
            .args(["-N", "-B", "-e", sql])
            .stdin(Stdio::null())
            .output()
            .map_err(|e| format!("cannot run mariadb: {e}"))?;
        if out.status.success() {
            Ok(String::from_utf8_lossy(&out.stdout).trim().to_owned())
        } else {
            Err(format!(
                "{}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            ))
        }
    }

    /// [`MariaDb::try_admin_sql`], panicking on failure.
    pub fn admin_sql(&self, sql: &str) -> String {
        self.try_admin_sql(sql)
            .unwrap_or_else(|e| panic!("admin SQL failed: {e}\n{}", self.log_text()))
    }

    /// Change one of the three users' password (keeping its plugin and `REQUIRE SSL`).
    pub fn set_password(&mut self, user: &str, password: &str) {
        let lit = sql_literal(password);
        let how = match user {
            ED25519_USER => format!("IDENTIFIED VIA ed25519 USING PASSWORD({lit})"),
            _ => format!("IDENTIFIED VIA mysql_native_password USING PASSWORD({lit})"),
        };
        self.admin_sql(&format!("ALTER USER '{user}'@'%' {how}"));
        match user {
            NATIVE_USER => self.native_password = password.into(),
            ED25519_USER => self.ed25519_password = password.into(),
            TLS_USER => self.tls_password = password.into(),
            _ => panic!("unknown user {user}"),
        }
    }

    #[must_use]
    pub fn log_text(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("server.log")).unwrap_or_default()
    }
}

impl Drop for MariaDb {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Test CA and server certificate (SANs [`CERT_NAMES`]) made with rcgen, as `ca.crt`,
/// `server.crt` and `server.key` (PKCS#8) in `dir`. Returns the CA certificate path.
pub fn make_certs(dir: &Path) -> PathBuf {
    let ca_key = rcgen::KeyPair::generate().expect("key");
    let mut ca_params = rcgen::CertificateParams::new(Vec::new()).expect("params");
    ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    ca_params
        .distinguished_name
        .push(rcgen::DnType::CommonName, "broker test MariaDB CA");
    let ca = ca_params.self_signed(&ca_key).expect("CA");
    let issuer = rcgen::Issuer::new(ca_params, ca_key);
    let key = rcgen::KeyPair::generate().expect("key");
    let mut params = rcgen::CertificateParams::new(
        CERT_NAMES
            .iter()
            .map(|n| (*n).to_owned())
            .collect::<Vec<_>>(),
    )
    .expect("params");
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, CERT_NAMES[0]);
    let leaf = params.signed_by(&key, &issuer).expect("leaf");
    let p = |f: &str| dir.join(f);
    std::fs::write(p("ca.crt"), ca.pem()).expect("write CA");
    std::fs::write(p("server.crt"), leaf.pem()).expect("write cert");
    std::fs::write(p("server.key"), key.serialize_pem()).expect("write key");
    use std::os::unix::fs::PermissionsExt as _;
    std::fs::set_permissions(p("server.key"), std::fs::Permissions::from_mode(0o600))
        .expect("chmod key");
    std::fs::set_permissions(p("ca.crt"), std::fs::Permissions::from_mode(0o644))
        .expect("chmod ca");
    p("ca.crt")
}

/// Run the real `mariadb` client against `host:port` (no option files, batch output,
/// no column names), bounded to 60 s; `extra` goes before `-e sql`.
#[must_use]
pub fn mariadb_client(
    host: &str,
    port: u16,
    user: &str,
    password: &str,
    extra: &[&str],
    sql: &str,
) -> Output {
    Command::new("timeout")
        .args([
            "--kill-after=5",
            "60",
            "mariadb",
            "--no-defaults",
            "--connect-timeout=10",
        ])
        .args(["-h", host, "-P", &port.to_string(), "-u", user])
        .arg(format!("-p{password}"))
        .args(["-N", "-B"])
        .args(extra)
        .args(["-e", sql])
        .stdin(Stdio::null())
        .output()
        .expect("spawn mariadb")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn text(o: &Output) -> String {
        format!(
            "{}{}",
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&o.stderr)
        )
    }

    /// The server's own accounts, directly (no broker): each user logs in with its
    /// plugin, `REQUIRE SSL` refuses a plain session, a password change takes effect.
    #[test]
    fn users_tls_and_password_change() {
        if !available() {
            eprintln!("SKIPPED: needs root and mariadb-server");
            return;
        }
        let mut db =
            MariaDb::start(MariaDbOptions::new("nat-pw-1", "ed-pw-1", "tls-pw-1").ip("127.0.0.3"));
        let port = db.port;
        let q = "select current_user()";
        assert_eq!(
            db.admin_sql("select group_concat(user, ':', plugin order by user) from mysql.user where host = '%'"),
            if db.ed25519.is_ok() {
                "ed_user:ed25519,native_user:mysql_native_password,tls_user:mysql_native_password"
            } else {
                "native_user:mysql_native_password,tls_user:mysql_native_password"
            }
        );
        let o = mariadb_client(
            "127.0.0.3",
            port,
            NATIVE_USER,
            "nat-pw-1",
            &["--skip-ssl", "-D", DATABASE],
            q,
        );
        assert!(text(&o).contains("native_user@%"), "{}", text(&o));
        let o = mariadb_client("127.0.0.3", port, TLS_USER, "tls-pw-1", &["--skip-ssl"], q);
        assert!(
            text(&o).contains("1045"),
            "REQUIRE SSL refuses plain: {}",
            text(&o)
        );
        let o = mariadb_client(
            "127.0.0.3",
            port,
            TLS_USER,
            "tls-pw-1",
            &["--ssl"],
            "select current_user(), variable_value from information_schema.session_status where variable_name = 'Ssl_version'",
        );
        assert!(text(&o).contains("tls_user@%\tTLSv1."), "{}", text(&o));
        match &db.ed25519 {
            Ok(()) => {
                let o = mariadb_client("127.0.0.3", port, ED25519_USER, "ed-pw-1", &[], q);
                assert!(text(&o).contains("ed_user@%"), "{}", text(&o));
            }
            Err(why) => eprintln!("no ed25519 user: {why}"),
        }
        db.set_password(NATIVE_USER, "nat-pw-2");
        let o = mariadb_client("127.0.0.3", port, NATIVE_USER, "nat-pw-1", &[], "select 1");
        assert!(text(&o).contains("1045"), "{}", text(&o));
        let o = mariadb_client(
            "127.0.0.3",
            port,
            NATIVE_USER,
            "nat-pw-2",
            &[],
            "select 'OK'",
        );
        assert!(text(&o).contains("OK"), "{}", text(&o));
        assert_eq!(db.admin_sql("select @@local_infile"), "1");
    }
}
