//! In-process tests against a real MariaDB server and the real `mariadb` client: the
//! server runs from a temporary data directory (`mariadb-install-db`, `mariadbd`); a
//! listener in the test hands accepted sockets to a [`super::MysqlConnector`] through
//! [`crate::proxy::serve`], as the proxy layer does. Skipped, loudly, without MariaDB;
//! `BROKER_REQUIRE_PRIVILEGED=1` (CI, `cargo xtask test`) makes that a failure.

use std::{
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::Arc,
    time::{Duration, Instant},
};

use super::{
    config::{ClientTls, MysqlConfig},
    tests::{broker_with_ca, lit},
};
use crate::config::CredentialSource;

const SERVICE_PASSWORD: &str = "Live-s3cret-pw";
const ED_PASSWORD: &str = "Live-ed25519-pw";

fn skip() -> bool {
    let have = ["mariadbd", "mariadb-install-db", "mariadb"]
        .iter()
        .all(|b| which(b).is_some());
    if have {
        return false;
    }
    assert!(
        std::env::var("BROKER_REQUIRE_PRIVILEGED").as_deref() != Ok("1"),
        "live MariaDB tests need mariadbd, mariadb-install-db and mariadb on PATH"
    );
    eprintln!("SKIPPED: needs mariadbd, mariadb-install-db and mariadb on PATH");
    true
}

fn which(bin: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .chain(["/usr/sbin".into(), "/usr/bin".into()])
        .map(|d| d.join(bin))
        .find(|p| p.is_file())
}

/// A MariaDB server in a temporary directory, with TLS (a certificate for `localhost`
/// from a CA of its own), killed when dropped.
struct Mariadb {
    dir: tempfile::TempDir,
    port: u16,
    child: Child,
    ed25519: bool,
}

impl Drop for Mariadb {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Mariadb {
    fn socket(&self) -> PathBuf {
        self.dir.path().join("s")
    }

    fn ca(&self) -> PathBuf {
        self.dir.path().join("ca.pem")
    }

    /// Run SQL as root over the socket.
    fn root(&self, sql: &str) -> std::process::Output {
        Command::new(which("mariadb").unwrap())
            .arg("--no-defaults")
            .arg("-S")
            .arg(self.socket())
            .args(["-u", "root", "-N", "-B", "-e", sql])
            .output()
            .unwrap()
    }

    fn start() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let data = dir.path().join("data");
        let out = Command::new(which("mariadb-install-db").unwrap())
            .arg("--no-defaults")
            .arg(format!("--datadir={}", data.display()))
            .args(["--auth-root-authentication-method=normal", "--user=root"])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        write_tls_files(dir.path());
        let port = {
            let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            l.local_addr().unwrap().port()
        };
        let plugin_dir = Path::new("/usr/lib/mysql/plugin");
        let ed25519 = plugin_dir.join("auth_ed25519.so").is_file();
        let mut cmd = Command::new(which("mariadbd").unwrap());
        cmd.arg("--no-defaults")
            .arg(format!("--datadir={}", data.display()))
            .arg(format!("--socket={}", dir.path().join("s").display()))
            .arg(format!("--port={port}"))
            .args(["--bind-address=127.0.0.1", "--user=root"])
            .arg(format!(
                "--ssl-cert={}",
                dir.path().join("server.pem").display()
            ))
            .arg(format!(
                "--ssl-key={}",
                dir.path().join("server.key").display()
            ))
            .arg(format!(
                "--log-error={}",
                dir.path().join("err.log").display()
            ));
        if ed25519 {
            cmd.arg("--plugin-load-add=auth_ed25519");
        }
        let child = cmd
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let db = Self {
            dir,
            port,
            child,
            ed25519,
        };
        let deadline = Instant::now() + Duration::from_secs(60);
        while !db.root("select 1").status.success() {
            assert!(Instant::now() < deadline, "mariadbd did not start");
            std::thread::sleep(Duration::from_millis(200));
        }
        let mut sql = format!(
            "DROP USER IF EXISTS ''@'localhost'; DROP USER IF EXISTS ''@'{host}'; \
             CREATE DATABASE shop; CREATE USER svc@'%' IDENTIFIED BY '{SERVICE_PASSWORD}'; \
             GRANT ALL ON *.* TO svc@'%';",
            host = hostname()
        );
        if ed25519 {
            sql.push_str(&format!(
                "CREATE USER edu@'%' IDENTIFIED VIA ed25519 USING PASSWORD('{ED_PASSWORD}'); \
                 GRANT ALL ON *.* TO edu@'%';"
            ));
        }
        let out = db.root(&sql);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        db
    }
}

fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_owned())
        .unwrap_or_default()
}

/// A CA and a `localhost` server certificate (rcgen), as PEM files in `dir`.
fn write_tls_files(dir: &Path) {
    use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, IsCa, KeyPair};
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let ca = CertifiedIssuer::self_signed(ca_params, KeyPair::generate().unwrap()).unwrap();
    let key = KeyPair::generate().unwrap();
    let cert = CertificateParams::new(vec!["localhost".to_owned()])
        .unwrap()
        .signed_by(&key, &ca)
        .unwrap();
    std::fs::write(dir.join("ca.pem"), ca.pem()).unwrap();
    std::fs::write(dir.join("server.pem"), cert.pem()).unwrap();
    std::fs::write(dir.join("server.key"), key.serialize_pem()).unwrap();
}

/// Run the `mariadb` client against the broker; (success, stdout + stderr).
async fn client(port: u16, args: &[&str], sql: &str) -> (bool, String) {
    let mut cmd = Command::new(which("mariadb").unwrap());
    cmd.arg("--no-defaults")
        .args(["-h", "127.0.0.1", "-P", &port.to_string()])
        .args(["-u", "anything", "-pnot-the-password", "-N", "-B"])
        .args(args)
        .args(["-e", sql]);
    tokio::task::spawn_blocking(move || {
        let out = cmd.output().unwrap();
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        (out.status.success(), text)
    })
    .await
    .unwrap()
}

fn creds(db: &Mariadb, user: &str, password: &str) -> Vec<(&'static str, CredentialSource)> {
    vec![
        ("host", lit("127.0.0.1")),
        ("port", lit(&db.port.to_string())),
        ("username", lit(user)),
        ("password", lit(password)),
    ]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn live_mariadb() {
    if skip() {
        return;
    }
    let db = tokio::task::spawn_blocking(Mariadb::start).await.unwrap();
    let ca_dir = tempfile::tempdir().unwrap();
    let local_ca = Arc::new(crate::ca::LocalCa::load_or_create(ca_dir.path()).unwrap());

    // Plain upstream, the database credential, the client's TLS terminated.
    let mut c = creds(&db, "svc", SERVICE_PASSWORD);
    c.push(("sslmode", lit("disable")));
    c.push(("database", lit("shop")));
    let mut b = broker_with_ca(MysqlConfig::default(), c, Some(Arc::clone(&local_ca))).await;
    let port = b.addr.port();
    let (ok, out) = client(port, &["--skip-ssl"], "select current_user(), database()").await;
    assert!(ok, "{out}");
    assert_eq!(out.trim(), "svc@%\tshop");
    let (ok, out) = client(
        port,
        &[
            "--ssl",
            "--ssl-ca",
            &local_ca.cert_path().display().to_string(),
        ],
        "select current_user(), @@version",
    )
    .await;
    assert!(ok, "{out}");
    assert!(out.starts_with("svc@%\t10."), "{out}");
    assert!(!out.contains(SERVICE_PASSWORD));
    for _ in 0..2 {
        assert_eq!(b.results.recv().await.unwrap(), Ok(()));
    }

    // TLS upstream verified against the server's CA (sslhost: the certificate's name),
    // the client's database kept, ed25519 after an AuthSwitchRequest.
    let (user, pw) = if db.ed25519 {
        ("edu", ED_PASSWORD)
    } else {
        ("svc", SERVICE_PASSWORD)
    };
    let mut c = creds(&db, user, pw);
    c.push(("sslmode", lit("verify-full")));
    c.push(("sslrootcert", lit(&db.ca().display().to_string())));
    c.push(("sslhost", lit("localhost")));
    let cfg = MysqlConfig {
        client_tls: ClientTls::Refuse,
        ..MysqlConfig::default()
    };
    let mut b = broker_with_ca(cfg, c, None).await;
    let (ok, out) = client(
        b.addr.port(),
        &["mysql"],
        "select current_user(), database(), \
         (select variable_value <> '' from information_schema.session_status \
          where variable_name = 'Ssl_cipher')",
    )
    .await;
    assert!(ok, "{out}");
    assert_eq!(out.trim(), format!("{user}@%\tmysql\t1"));
    assert_eq!(b.results.recv().await.unwrap(), Ok(()));

    // A wrong password: 1045 naming the service, never the password.
    let mut c = creds(&db, "svc", "Wrong-pw-9");
    c.push(("sslmode", lit("disable")));
    let mut b = broker_with_ca(MysqlConfig::default(), c, None).await;
    let (ok, out) = client(b.addr.port(), &[], "select 1").await;
    assert!(!ok, "{out}");
    assert!(out.contains("ERROR 1045 (28000)"), "{out}");
    assert!(
        out.contains("service `orders-db`: upstream rejected the credentials"),
        "{out}"
    );
    assert!(!out.contains("Wrong-pw-9"), "{out}");
    assert!(
        b.results
            .recv()
            .await
            .unwrap()
            .unwrap_err()
            .starts_with("auth_rejected")
    );

    // `sslmode` left at its default (require) works against a server with TLS.
    let mut b = broker_with_ca(
        MysqlConfig::default(),
        creds(&db, "svc", SERVICE_PASSWORD),
        None,
    )
    .await;
    let (ok, out) = client(b.addr.port(), &[], "select current_user()").await;
    assert!(ok, "{out}");
    assert_eq!(b.results.recv().await.unwrap(), Ok(()));
}
