//! Secretless Broker's own PostgreSQL connector tests, run against this broker started
//! the way Secretless is started (`broker -f FILE`), and Secretless' quick-start demo.
//!
//! **The fixture suite** (cyberark/secretless-broker `test/connector/tcp/pg`). Secretless
//! generates its `secretless.yml` (`test/util/testutil/config_generator.go` and
//! `types.go`): two services of its own (`health-check`, a `mysql` service on a Unix
//! socket that only has to come up, and `pg-bench`) and one `test_service_<port>` per
//! combination of server TLS x listener socket type x `sslmode` x `sslhost` x `sslcert`
//! x `sslkey` x `sslrootcert` x credential validity: 2 x 2 x 5 x 2 x 4 x 4 x 4 x 2 = 5120
//! services (2560 TCP listeners, 2560 Unix sockets), every credential `from: literal`
//! (`get: ""` when unset) or `from: file`. [`generate`] is a port of that generator
//! and writes the file as Secretless' marshaller does (`version: "2"`, services as a
//! map, `protocol: ""`, `config: null`). Then Secretless' test cases run against it,
//! with the same clients and arguments: `essentials_test.go` (psql over TCP and a Unix
//! socket with wrong or empty credentials, client TLS), `ssl_test.go` (every row, with
//! its `ShouldPass` and `CmdOutput`), `sslmode_test.go`, `client_options_test.go`, and
//! the JDBC cases (Secretless' `jdbcsql` jar is replaced by a 20-line pgjdbc program
//! that runs the same query with the same arguments, [`JDBC_SOURCE`]).
//!
//! What is adapted, and only because it must be:
//! - listeners: `0.0.0.0` -> `127.0.0.1` (loopback only here); the ports keep
//!   Secretless' numbering (3307 up) when they are free, otherwise the same layout from
//!   another base; `pg-bench`'s `5432` becomes a free port (the quick-start test needs
//!   5432 for its server); `/sock` -> a temporary directory;
//! - `/secretless/test/util/ssl/*.pem` -> the same set made with `openssl`
//!   ([`make_secretless_certs`]): Secretless' CA expired in June 2025. Same subjects,
//!   names (`localhost`, `mysql`, `pg`), usages, PKCS#1 keys and the "DO NOT EDIT" header
//!   lines before each PEM block;
//! - the database hosts `pg` (TLS) and `pg_no_tls` are the names Secretless uses; they
//!   resolve to 127.0.0.1 in a private mount namespace of the broker
//!   ([`broker_tests::net::with_hosts`]), and as the two servers share an address here
//!   the generator's one `DB_PORT` becomes one port per host;
//! - `DB_PASSWORD` `test` -> a value no output contains by accident, so every psql
//!   output and the daemon's log can be searched for it ([`assert_no_secret`]);
//! - the PostgreSQL servers are [`PgServer`]s (PostgreSQL 15, as Secretless' image)
//!   configured as `docker-compose.yml` and `pg_hba.conf` configure theirs: SCRAM for
//!   every TCP connection (no `clientcert`), the TLS one with `ssl_ca_file` (so it asks
//!   for client certificates and checks those it gets); `test.sql` runs verbatim, then
//!   the role `test` gets the password above.
//!
//! Secretless' `CmdOutput` strings are its own Go error texts; [`OUTPUTS`] maps each to
//! what this broker says for the same failure, and the test asserts ours.
//! `ShouldPass` (psql's exit status) must match exactly.
//!
//! **The quick-start demo** (`demos/quick-start`): its `secretless.yml`, verbatim
//! (`tests/fixtures/secretless-quick-start.yml`), with the environment its entrypoint
//! sets, against PostgreSQL with `ssl=on` on `localhost:5432` as in the demo image: psql
//! through `tcp://0.0.0.0:5454`, then through a Unix socket.

use std::{
    collections::BTreeMap,
    fmt::Write as _,
    io::Read as _,
    net::{SocketAddr, TcpListener, TcpStream},
    os::unix::{fs::PermissionsExt as _, net::UnixStream},
    path::{Path, PathBuf},
    process::{Child, Command, Output, Stdio},
    sync::{
        Mutex, PoisonError,
        atomic::{AtomicUsize, Ordering},
    },
    time::{Duration, Instant},
};

use broker_tests::{
    assert_no_secret, broker_bin, clients, free_port, http_get,
    net::with_hosts,
    output_text,
    pg::{self, PgAuth, PgOptions, PgServer, PgTls, ServerCerts},
    privileged, workspace_root, write_file,
};

// ---------------------------------------------------------------------------------------
// The generator: test/util/testutil/types.go and config_generator.go, ported.
// ---------------------------------------------------------------------------------------

/// `SocketType`: the listener is TCP or a Unix socket.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum SocketType {
    Tcp,
    Socket,
}

impl SocketType {
    const ALL: [Self; 2] = [Self::Tcp, Self::Socket];

    fn name(self) -> &'static str {
        match self {
            Self::Tcp => "TCP",
            Self::Socket => "Unix Socket",
        }
    }
}

/// `TLSSetting`: which database server (`DB_HOST_TLS` or `DB_HOST_NO_TLS`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum TlsSetting {
    Tls,
    NoTls,
}

impl TlsSetting {
    const ALL: [Self; 2] = [Self::Tls, Self::NoTls];
}

/// `SSLMode` (`""` is Secretless' default, `require`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum SslMode {
    Default,
    Disable,
    Require,
    VerifyCa,
    VerifyFull,
}

impl SslMode {
    const ALL: [Self; 5] = [
        Self::Default,
        Self::Disable,
        Self::Require,
        Self::VerifyCa,
        Self::VerifyFull,
    ];

    fn value(self) -> &'static str {
        match self {
            Self::Default => "",
            Self::Disable => "disable",
            Self::Require => "require",
            Self::VerifyCa => "verify-ca",
            Self::VerifyFull => "verify-full",
        }
    }
}

/// `SSLHost`: the name full verification checks, when not the host's.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum SslHost {
    Default,
    Invalid,
}

impl SslHost {
    const ALL: [Self; 2] = [Self::Default, Self::Invalid];

    fn value(self) -> &'static str {
        match self {
            Self::Default => "",
            Self::Invalid => "invalid",
        }
    }
}

/// `RootCertStatus` (`sslrootcert`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum RootCert {
    Undefined,
    Valid,
    Invalid,
    Malformed,
}

impl RootCert {
    const ALL: [Self; 4] = [Self::Undefined, Self::Valid, Self::Invalid, Self::Malformed];
}

/// `PrivateKeyStatus` (`sslkey`) and `PublicCertStatus` (`sslcert`): the same four
/// states.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ClientCert {
    Undefined,
    Valid,
    NotSignedByCa,
    Malformed,
}

impl ClientCert {
    const ALL: [Self; 4] = [
        Self::Undefined,
        Self::Valid,
        Self::NotSignedByCa,
        Self::Malformed,
    ];
}

/// `AllAuthCredentialsInvalidity`: invalid first, as Secretless lists them.
const AUTH_INVALIDITY: [bool; 2] = [true, false];

/// `AbstractConfiguration`. Go's zero values are the defaults: `SSLHostDefault`,
/// `Default` sslmode, `Undefined` certificates, valid credentials.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Abstract {
    socket: SocketType,
    tls: TlsSetting,
    ssl_host: SslHost,
    ssl_mode: SslMode,
    root_cert: RootCert,
    private_key: ClientCert,
    public_cert: ClientCert,
    auth_invalid: bool,
}

impl Abstract {
    fn new(socket: SocketType, tls: TlsSetting, ssl_mode: SslMode) -> Self {
        Self {
            socket,
            tls,
            ssl_host: SslHost::Default,
            ssl_mode,
            root_cert: RootCert::Undefined,
            private_key: ClientCert::Undefined,
            public_cert: ClientCert::Undefined,
            auth_invalid: false,
        }
    }

    fn root(mut self, r: RootCert) -> Self {
        self.root_cert = r;
        self
    }

    fn client(mut self, key: ClientCert, cert: ClientCert) -> Self {
        self.private_key = key;
        self.public_cert = cert;
        self
    }

    fn host(mut self, h: SslHost) -> Self {
        self.ssl_host = h;
        self
    }

    /// For the results table.
    fn short(&self) -> String {
        format!(
            "{} {} sslmode={} sslhost={} root={:?} key={:?} cert={:?}{}",
            self.socket.name(),
            if self.tls == TlsSetting::Tls {
                "pg"
            } else {
                "pg_no_tls"
            },
            if self.ssl_mode == SslMode::Default {
                "(default)"
            } else {
                self.ssl_mode.value()
            },
            if self.ssl_host == SslHost::Default {
                "(default)"
            } else {
                self.ssl_host.value()
            },
            self.root_cert,
            self.private_key,
            self.public_cert,
            if self.auth_invalid {
                " bad-password"
            } else {
                ""
            }
        )
    }
}

/// `LiveConfiguration`: an abstract configuration and where its service listens.
#[derive(Debug, Clone, Copy)]
struct Live {
    ac: Abstract,
    port: u16,
}

/// `config_v2.Credential`.
struct Credential {
    name: &'static str,
    from: &'static str,
    get: String,
}

fn literal(name: &'static str, get: impl Into<String>) -> Credential {
    Credential {
        name,
        from: "literal",
        get: get.into(),
    }
}

/// What Secretless' generator reads from its environment (`DB_*` of
/// `docker-compose.yml`, the `/secretless/test/util/ssl` mount, `/sock`, port 3307 up),
/// as it is here. See the module docs for each adaptation.
struct GenEnv {
    /// `DB_HOST_TLS`, `DB_HOST_NO_TLS`.
    host_with_tls: &'static str,
    host_without_tls: &'static str,
    /// `DB_PORT`, one per host here.
    port_tls: u16,
    port_no_tls: u16,
    /// `DB_USER`, `DB_PASSWORD`.
    user: &'static str,
    password: &'static str,
    /// `/secretless/test/util/ssl`.
    ssl_dir: PathBuf,
    /// `/sock`.
    sock_dir: PathBuf,
    /// `portNumber := 3307`.
    first_port: u16,
    /// `0.0.0.0`.
    listen_ip: &'static str,
    /// `pg-bench`'s `5432`.
    pg_bench_port: u16,
}

impl GenEnv {
    fn ssl(&self, file: &str) -> String {
        self.ssl_dir.join(file).display().to_string()
    }

    /// `ConnectionPort.ToSocketPath`.
    fn socket_path(&self, port: u16) -> PathBuf {
        self.sock_dir.join(format!(".s.PGSQL.{port}"))
    }

    /// `RootCertStatus.toSecret`.
    fn root_cert(&self, s: RootCert) -> Credential {
        match s {
            RootCert::Undefined => literal("sslrootcert", ""),
            RootCert::Malformed => literal("sslrootcert", "malformed"),
            RootCert::Valid => Credential {
                name: "sslrootcert",
                from: "file",
                get: self.ssl("ca.pem"),
            },
            RootCert::Invalid => Credential {
                name: "sslrootcert",
                from: "file",
                get: self.ssl("ca-invalid.pem"),
            },
        }
    }

    /// `PrivateKeyStatus.toSecret` and `PublicCertStatus.toSecret`.
    fn client_cert(&self, name: &'static str, s: ClientCert) -> Credential {
        let (valid, other) = if name == "sslkey" {
            ("client-key.pem", "client-different-ca-key.pem")
        } else {
            ("client.pem", "client-different-ca.pem")
        };
        match s {
            ClientCert::Undefined => literal(name, ""),
            ClientCert::Malformed => literal(name, "malformed"),
            ClientCert::Valid => Credential {
                name,
                from: "file",
                get: self.ssl(valid),
            },
            ClientCert::NotSignedByCa => Credential {
                name,
                from: "file",
                get: self.ssl(other),
            },
        }
    }
}

/// `GenerateConfigurations`: the `secretless.yml` text and every live configuration,
/// in the generator's order (port `first_port + index`).
fn generate(env: &GenEnv) -> (String, Vec<Live>) {
    let mut services: Vec<(String, &str, String, Vec<Credential>)> = vec![
        (
            "health-check".into(),
            "mysql",
            format!("unix://{}", env.sock_dir.join("mysql.sock").display()),
            vec![
                literal("host", env.host_with_tls),
                literal("username", env.user),
                literal("password", env.password),
            ],
        ),
        (
            "pg-bench".into(),
            "pg",
            format!("tcp://{}:{}", env.listen_ip, env.pg_bench_port),
            vec![
                literal("host", "health-check"),
                literal("port", "3306"),
                literal("username", "health-check"),
                literal("password", "health-check"),
            ],
        ),
    ];
    let mut lives = Vec::new();
    let mut port = env.first_port;
    for tls in TlsSetting::ALL {
        for socket in SocketType::ALL {
            for ssl_mode in SslMode::ALL {
                for ssl_host in SslHost::ALL {
                    for public_cert in ClientCert::ALL {
                        for private_key in ClientCert::ALL {
                            for root_cert in RootCert::ALL {
                                for auth_invalid in AUTH_INVALIDITY {
                                    let ac = Abstract {
                                        socket,
                                        tls,
                                        ssl_host,
                                        ssl_mode,
                                        root_cert,
                                        private_key,
                                        public_cert,
                                        auth_invalid,
                                    };
                                    // areAuthCredentialsInvalid.toSecrets()
                                    let mut creds = vec![
                                        literal("username", env.user),
                                        literal(
                                            "password",
                                            if auth_invalid {
                                                "wrong-password"
                                            } else {
                                                env.password
                                            },
                                        ),
                                        env.root_cert(root_cert),
                                        literal("sslmode", ssl_mode.value()),
                                        literal("sslhost", ssl_host.value()),
                                        env.client_cert("sslkey", private_key),
                                        env.client_cert("sslcert", public_cert),
                                    ];
                                    // serverTLSSetting.toSecrets(sampleDbConfig)
                                    let (host, db_port) = match tls {
                                        TlsSetting::Tls => (env.host_with_tls, env.port_tls),
                                        TlsSetting::NoTls => {
                                            (env.host_without_tls, env.port_no_tls)
                                        }
                                    };
                                    creds.push(literal("host", host));
                                    creds.push(literal("port", db_port.to_string()));
                                    let address = match socket {
                                        SocketType::Tcp => {
                                            format!("tcp://{}:{port}", env.listen_ip)
                                        }
                                        SocketType::Socket => {
                                            format!("unix://{}", env.socket_path(port).display())
                                        }
                                    };
                                    services.push((
                                        format!("test_service_{port}"),
                                        "pg",
                                        address,
                                        creds,
                                    ));
                                    lives.push(Live { ac, port });
                                    port += 1;
                                }
                            }
                        }
                    }
                }
            }
        }
    }
    // config_v2.Config.MarshalYAML through yaml.v2: `version: "2"`, services as a map,
    // each with `protocol: ""` and `config: null`, credentials as a map (yaml.v2 sorts
    // map keys).
    let mut out = String::from("version: \"2\"\nservices:\n");
    for (name, connector, listen, creds) in &services {
        let _ = write!(
            out,
            "  {name}:\n    protocol: \"\"\n    connector: {connector}\n    listenOn: {}\n    credentials:\n",
            yaml_scalar(listen)
        );
        let sorted: BTreeMap<&str, &Credential> = creds.iter().map(|c| (c.name, c)).collect();
        for (k, c) in sorted {
            let _ = write!(
                out,
                "      {k}:\n        from: {}\n        get: {}\n",
                c.from,
                yaml_scalar(&c.get)
            );
        }
        out.push_str("    config: null\n");
    }
    (out, lives)
}

/// A scalar as yaml.v2 writes it: plain when that reads back as the same string,
/// double-quoted otherwise (empty, numbers, booleans, null, special characters).
fn yaml_scalar(s: &str) -> String {
    let plain = !s.is_empty()
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || "/._-:".contains(c))
        && !s.starts_with(['-', ':', '.'])
        && !s.contains(": ")
        && s.parse::<f64>().is_err()
        && ![
            "true", "false", "yes", "no", "on", "off", "null", "y", "n", "~",
        ]
        .contains(&s.to_ascii_lowercase().as_str());
    if plain {
        s.to_owned()
    } else {
        format!("\"{}\"", s.replace('\\', "\\\\").replace('"', "\\\""))
    }
}

/// `LiveConfigurations.Find`: the first live configuration with this abstract one.
fn find(lives: &[Live], ac: &Abstract) -> Live {
    *lives
        .iter()
        .find(|l| l.ac == *ac)
        .unwrap_or_else(|| panic!("LiveConfiguration not found for {ac:?}"))
}

// ---------------------------------------------------------------------------------------
// Certificates: test/util/cfssl/generate_certificates.sh, with openssl.
// ---------------------------------------------------------------------------------------

/// The header `generate_certificates.sh` puts before every PEM block.
const PEM_HEADER: &str =
    "// File generated by ROOT/test/util/cfssl/generate_certificates.sh\n// DO NOT EDIT\n\n";

fn openssl(args: &[&str], cwd: &Path) {
    let out = Command::new("openssl")
        .args(args)
        .current_dir(cwd)
        .stdin(Stdio::null())
        .output()
        .expect("run openssl");
    assert!(
        out.status.success(),
        "openssl {args:?}: {}",
        output_text(&out)
    );
}

/// An RSA 2048 key in PKCS#1 (`RSA PRIVATE KEY`, as cfssl writes them).
fn rsa_key(dir: &Path, file: &str) {
    openssl(&["genrsa", "-traditional", "-out", file, "2048"], dir);
}

fn self_signed_ca(dir: &Path, name: &str, subject: &str, sans: Option<&str>) {
    let key = format!("{name}-key.pem");
    rsa_key(dir, &key);
    let mut args = vec![
        "req",
        "-x509",
        "-new",
        "-sha256",
        "-days",
        "2",
        "-key",
        &key,
        "-subj",
        subject,
        "-addext",
        "basicConstraints=critical,CA:TRUE",
        "-addext",
        "keyUsage=critical,keyCertSign,cRLSign",
    ];
    let san;
    if let Some(s) = sans {
        san = format!("subjectAltName={s}");
        args.extend(["-addext", &san]);
    }
    let out = format!("{name}.pem");
    args.extend(["-out", &out]);
    openssl(&args, dir);
}

fn leaf(dir: &Path, name: &str, ca: &str, subject: &str, usage: &str, sans: Option<&str>) {
    let key = format!("{name}-key.pem");
    let csr = format!("{name}.csr");
    rsa_key(dir, &key);
    openssl(
        &["req", "-new", "-key", &key, "-subj", subject, "-out", &csr],
        dir,
    );
    let mut ext = format!(
        "basicConstraints=critical,CA:FALSE\nkeyUsage=critical,digitalSignature,keyEncipherment\n\
         extendedKeyUsage={usage}\n"
    );
    if let Some(s) = sans {
        let _ = writeln!(ext, "subjectAltName={s}");
    }
    let ext_file = format!("{name}.ext");
    std::fs::write(dir.join(&ext_file), ext).expect("write ext");
    openssl(
        &[
            "x509",
            "-req",
            "-sha256",
            "-days",
            "2",
            "-in",
            &csr,
            "-CA",
            &format!("{ca}.pem"),
            "-CAkey",
            &format!("{ca}-key.pem"),
            "-CAcreateserial",
            "-extfile",
            &ext_file,
            "-out",
            &format!("{name}.pem"),
        ],
        dir,
    );
}

/// Secretless' `test/util/ssl` set, made afresh: `ca.pem` (CN test-server), `server.pem`
/// (names localhost, mysql, pg; server and client auth), `client.pem` (client auth, by
/// the CA), `client-different-ca.pem` (by another CA, CN example.net), `ca-invalid.pem`
/// (an unrelated CA, MySQL's auto-generated one in Secretless' set), each with its
/// `-key.pem`, each file starting with the generator's header lines.
fn make_secretless_certs(dir: &Path) {
    const NAMES: &str = "DNS:localhost,DNS:mysql,DNS:pg";
    self_signed_ca(
        dir,
        "ca",
        "/C=US/ST=CA/L=San Francisco/CN=test-server",
        Some("DNS:localhost,DNS:www.example.net"),
    );
    self_signed_ca(
        dir,
        "different-ca",
        "/C=US/ST=CA/L=San Francisco/CN=example.net",
        None,
    );
    self_signed_ca(
        dir,
        "ca-invalid",
        "/CN=MySQL_Server_5.7.24_Auto_Generated_CA_Certificate",
        None,
    );
    leaf(
        dir,
        "server",
        "ca",
        "/CN=server",
        "serverAuth,clientAuth",
        Some(NAMES),
    );
    leaf(dir, "client", "ca", "/CN=client", "clientAuth", Some(NAMES));
    leaf(
        dir,
        "client-different-ca",
        "different-ca",
        "/CN=client",
        "clientAuth",
        None,
    );
    for e in std::fs::read_dir(dir).expect("read cert dir") {
        let p = e.expect("dir entry").path();
        if p.extension().is_some_and(|x| x == "pem") {
            let body = std::fs::read_to_string(&p).expect("read pem");
            std::fs::write(&p, format!("{PEM_HEADER}{body}")).expect("write pem");
        }
    }
}

// ---------------------------------------------------------------------------------------
// The broker, started as Secretless is.
// ---------------------------------------------------------------------------------------

/// `broker -f FILE -health-addr ADDR` (optionally in a private mount namespace whose
/// /etc/hosts maps names), output to `log`; SIGTERM, then SIGKILL, on drop.
struct SecretlessBroker {
    child: Child,
    log: PathBuf,
    health: SocketAddr,
}

impl SecretlessBroker {
    fn start(mut cmd: Command, env: &[(&str, &str)], log: &Path, health: SocketAddr) -> Self {
        let out = std::fs::File::create(log).expect("create broker log");
        let child = cmd
            .env_remove("BROKER_LOG")
            .envs(env.iter().copied())
            .stdin(Stdio::null())
            .stdout(out.try_clone().expect("dup log"))
            .stderr(out)
            .spawn()
            .expect("spawn broker");
        Self {
            child,
            log: log.to_path_buf(),
            health,
        }
    }

    fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Wait for `/ready`; returns how long it took.
    fn wait_ready(&mut self, timeout: Duration) -> Duration {
        let start = Instant::now();
        while start.elapsed() < timeout {
            if let Some(st) = self.child.try_wait().expect("try_wait") {
                panic!("broker exited early ({st}):\n{}", tail(&self.log_text()));
            }
            if matches!(http_get(self.health, "/ready"), Some((200, _))) {
                return start.elapsed();
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        panic!(
            "broker not ready on {} after {timeout:?}:\n{}",
            self.health,
            tail(&self.log_text())
        );
    }

    fn stop(&mut self) -> std::process::ExitStatus {
        // SAFETY: kill with a pid we own (the broker: unshare and sh exec it).
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(st) = self.child.try_wait().expect("try_wait") {
                return st;
            }
            if Instant::now() > deadline {
                let _ = self.child.kill();
                panic!(
                    "broker did not exit on SIGTERM:\n{}",
                    tail(&self.log_text())
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for SecretlessBroker {
    fn drop(&mut self) {
        if matches!(self.child.try_wait(), Ok(None)) {
            // SAFETY: kill with a pid we own.
            unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
            let deadline = Instant::now() + Duration::from_secs(10);
            while Instant::now() < deadline {
                if !matches!(self.child.try_wait(), Ok(None)) {
                    return;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// The last lines of a long log, for panic messages.
fn tail(text: &str) -> String {
    let lines: Vec<&str> = text.lines().collect();
    let from = lines.len().saturating_sub(60);
    lines[from..].join("\n")
}

// ---------------------------------------------------------------------------------------
// Secretless' test cases.
// ---------------------------------------------------------------------------------------

/// Secretless' `CmdOutput` (its Go error text, or libpq's), and what is asserted here
/// instead for the same failure: libpq's own messages are the same; Secretless' error
/// texts become ours (the broker sends them to the client as a FATAL ErrorResponse, as
/// Secretless does).
const OUTPUTS: &[(&str, &str)] = &[
    // libpq, psql over TCP with sslmode=require: the broker answers SSLRequest with `N`
    // (clientTLS off, the default), as Secretless does.
    (
        "server does not support SSL, but SSL was required",
        "server does not support SSL, but SSL was required",
    ),
    // The same, in psql 15's words ("psql: error: connection to server at ... failed:
    // ..."; Secretless' test ran a psql that printed "psql: error: ..." only).
    (
        "psql: error: server does not support SSL, but SSL was required",
        "failed: server does not support SSL, but SSL was required",
    ),
    // sslmode=require with sslrootcert (libpq: that is verify-ca), or verify-ca without
    // one (the system roots), and the server's CA is not among them.
    (
        "x509: certificate signed by unknown authority",
        "failed: invalid peer certificate: UnknownIssuer",
    ),
    (
        "certificate signed by unknown authority",
        "failed: invalid peer certificate: UnknownIssuer",
    ),
    // sslrootcert is the text "malformed": Secretless parses it as PEM; the broker
    // takes a value without a PEM block for a file path.
    (
        "couldn't parse pem in sslrootcert",
        "upstream TLS settings: credential `sslrootcert`: file not found",
    ),
    // A server without TLS and the default sslmode (require).
    (
        "the backend does not allow SSL connections",
        "server does not support TLS, but sslmode is require",
    ),
    // sslcert and sslkey are the text "malformed".
    (
        "psql: error: FATAL:  tls: failed to find any PEM data in certificate input",
        "upstream TLS settings: credential `sslcert`: file not found",
    ),
    // verify-full with sslhost=invalid.
    (
        "psql: error: FATAL:  tls: failed to verify certificate: x509: certificate is valid for localhost, mysql, pg, not invalid",
        "certificate not valid for name \"invalid\"; certificate is only valid for \
         DnsName(\"localhost\"), DnsName(\"mysql\") or DnsName(\"pg\")",
    ),
    // The database named by the client does not exist: PostgreSQL's own message.
    (
        "database \"notfound\" does not exist",
        "database \"notfound\" does not exist",
    ),
];

fn ours(secretless: &str) -> &'static str {
    OUTPUTS
        .iter()
        .find(|(s, _)| *s == secretless)
        .map(|(_, o)| *o)
        .unwrap_or_else(|| panic!("no mapping for Secretless' output {secretless:?}"))
}

/// `ClientConfiguration`.
#[derive(Debug, Clone, Copy)]
struct ClientCfg {
    ssl: bool,
    username: &'static str,
    password: &'static str,
}

/// How a case runs its client.
#[derive(Debug, Clone)]
enum Program {
    Psql,
    Java,
}

#[derive(Debug, Clone)]
struct Case {
    /// Go's test name (`TestSSL/SSL_functionality/succeeds: ...`).
    name: String,
    /// The live configuration the case talks to.
    live: Live,
    program: Program,
    args: Vec<String>,
    /// `None`: the test's environment (PG* variables removed); `Some`: exactly these
    /// variables (Go's `c.Env = append(c.Env, envs...)` on a nil `Env`).
    env_only: Option<Vec<(String, String)>>,
    /// `ShouldPass` (exit status); `None`: not asserted.
    should_pass: Option<bool>,
    /// Secretless' `CmdOutput`, or a literal (`Contains`) of the custom tests.
    output: Option<Expect>,
}

#[derive(Debug, Clone, Copy)]
enum Expect {
    /// Secretless' error text, asserted through [`OUTPUTS`].
    Secretless(&'static str),
    /// Text the test asserts verbatim (a query result).
    Literal(&'static str),
}

/// Where the cases connect: `ConnectionPort.Host()` (`secretless`) and `ToSocketDir()`.
struct Where<'a> {
    host: &'a str,
    sock_dir: &'a Path,
}

/// `pkg.RunQuery`: `psql -c "select count(*) from test.test" --username=U --port=P
/// --host=H "dbname=postgres sslmode=S password=W"`.
fn run_query_args(c: ClientCfg, live: Live, w: &Where<'_>) -> Vec<String> {
    let sslmode = if c.ssl { "require" } else { "disable" };
    let host = match live.ac.socket {
        SocketType::Tcp => w.host.to_owned(),
        SocketType::Socket => w.sock_dir.display().to_string(),
    };
    vec![
        "-c".into(),
        "select count(*) from test.test".into(),
        format!("--username={}", c.username),
        format!("--port={}", live.port),
        format!("--host={host}"),
        format!("dbname=postgres sslmode={sslmode} password={}", c.password),
    ]
}

/// `pkg.RunJDBCQuery`, with [`JDBC_SOURCE`] in place of `jdbcsql`.
fn jdbc_args(c: ClientCfg, live: Live, w: &Where<'_>, source: &Path) -> Vec<String> {
    vec![
        "-cp".into(),
        clients::JDBC_JAR.into(),
        source.display().to_string(),
        "-d".into(),
        "postgres".into(),
        "-h".into(),
        format!("{}:{}", w.host, live.port),
        "-U".into(),
        c.username.into(),
        "-P".into(),
        c.password.into(),
        "select count(*) from test.test".into(),
    ]
}

/// A stand-in for Secretless' `jdbcsql` jar (`-d DB -h HOST:PORT -U USER -P PASSWORD
/// SQL`, prints the result), run with `java -cp postgresql.jar SecretlessJdbc.java`.
const JDBC_SOURCE: &str = r#"
import java.sql.*;
import java.util.*;

public class SecretlessJdbc {
    public static void main(String[] argv) throws Exception {
        Map<String, String> o = new HashMap<>();
        for (int i = 0; i + 1 < argv.length - 1; i += 2) o.put(argv[i], argv[i + 1]);
        String url = "jdbc:postgresql://" + o.get("-h") + "/" + o.get("-d");
        try (Connection c = DriverManager.getConnection(url, o.get("-U"), o.get("-P"));
             Statement s = c.createStatement();
             ResultSet r = s.executeQuery(argv[argv.length - 1])) {
            System.out.println(r.getMetaData().getColumnName(1));
            while (r.next()) System.out.println(r.getString(1));
        } catch (SQLException e) {
            System.err.println(e.getMessage());
            System.exit(1);
        }
    }
}
"#;

fn def(ssl: bool, username: &'static str, password: &'static str) -> ClientCfg {
    ClientCfg {
        ssl,
        username,
        password,
    }
}

/// Every case of `essentials_test.go`, `ssl_test.go`, `sslmode_test.go` and
/// `client_options_test.go`, in Secretless' order.
#[allow(clippy::too_many_lines)]
fn cases(lives: &[Live], w: &Where<'_>, jdbc_source: &Path) -> Vec<Case> {
    use SocketType::{Socket, Tcp};
    use SslMode::{Default, Disable, Require, VerifyCa, VerifyFull};
    use TlsSetting::{NoTls, Tls};
    let mut out = Vec::new();
    let verdict = |pass: bool| if pass { "succeeds" } else { "throws" };
    let psql_case = |out: &mut Vec<Case>,
                     name: String,
                     ac: Abstract,
                     c: ClientCfg,
                     pass: bool,
                     output: Option<&'static str>| {
        let live = find(lives, &ac);
        out.push(Case {
            name,
            live,
            program: Program::Psql,
            args: run_query_args(c, live, w),
            env_only: None,
            should_pass: Some(pass),
            output: output.map(Expect::Secretless),
        });
    };

    // essentials_test.go
    let essentials = [
        (
            "with username, wrong password",
            def(false, "testuser", "wrongpassword"),
        ),
        (
            "with wrong username, wrong password",
            def(false, "wrongusername", "wrongpassword"),
        ),
        ("with empty username, empty password", def(false, "", "")),
    ];
    for socket in SocketType::ALL {
        for (desc, c) in essentials {
            psql_case(
                &mut out,
                format!(
                    "TestEssentials/Essentials/Connect over {}/succeeds: {desc}",
                    socket.name()
                ),
                Abstract::new(socket, Tls, Default),
                c,
                true,
                None,
            );
        }
    }
    psql_case(
        &mut out,
        "TestEssentials/Essentials/succeeds: Socket, client -> TLS -> secretless".into(),
        Abstract::new(Socket, Tls, Default),
        def(true, "wrongusername", "wrongpassword"),
        true,
        None,
    );
    psql_case(
        &mut out,
        "TestEssentials/Essentials/throws: TCP, client -> TLS -> secretless".into(),
        Abstract::new(Tcp, Tls, Default),
        def(true, "wrongusername", "wrongpassword"),
        false,
        Some("server does not support SSL, but SSL was required"),
    );
    for (desc, c) in essentials {
        let live = find(lives, &Abstract::new(Tcp, Tls, Default));
        out.push(Case {
            name: format!("TestEssentials/JDBC/Connect over TCP/succeeds: {desc}"),
            live,
            program: Program::Java,
            args: jdbc_args(c, live, w, jdbc_source),
            env_only: None,
            should_pass: Some(true),
            output: None,
        });
    }

    // ssl_test.go: (description, ShouldPass, CmdOutput, configuration).
    use ClientCert as K;
    use RootCert as R;
    let ssl: [(&str, bool, Option<&'static str>, Abstract); 16] = [
        (
            "server_tls, sslmode=default",
            true,
            None,
            Abstract::new(Tcp, Tls, Default),
        ),
        (
            "server_tls, sslmode=disable",
            true,
            None,
            Abstract::new(Tcp, Tls, Disable),
        ),
        (
            "server_tls, sslmode=require, sslrootcert=none",
            true,
            None,
            Abstract::new(Tcp, Tls, Require),
        ),
        (
            "server_tls, sslmode=require, sslrootcert=invalid",
            false,
            Some("x509: certificate signed by unknown authority"),
            Abstract::new(Tcp, Tls, Require).root(R::Invalid),
        ),
        (
            "server_tls, sslmode=require, sslrootcert=malformed",
            false,
            Some("couldn't parse pem in sslrootcert"),
            Abstract::new(Tcp, Tls, Require).root(R::Malformed),
        ),
        (
            "server_tls, sslmode=verify-ca, sslrootcert=none",
            false,
            Some("x509: certificate signed by unknown authority"),
            Abstract::new(Tcp, Tls, VerifyCa),
        ),
        (
            "server_tls, sslmode=verify-ca, sslrootcert=valid",
            true,
            None,
            Abstract::new(Tcp, Tls, VerifyCa).root(R::Valid),
        ),
        (
            "server_tls, sslmode=verify-ca, sslrootcert=invalid",
            false,
            Some("certificate signed by unknown authority"),
            Abstract::new(Tcp, Tls, VerifyCa).root(R::Invalid),
        ),
        (
            "server_tls, sslmode=verify-ca, sslrootcert=malformed",
            false,
            Some("couldn't parse pem in sslrootcert"),
            Abstract::new(Tcp, Tls, VerifyCa).root(R::Malformed),
        ),
        (
            "server_no_tls, sslmode=default",
            false,
            Some("the backend does not allow SSL connections"),
            Abstract::new(Tcp, NoTls, Default),
        ),
        (
            "server_no_tls, sslmode=disable",
            true,
            None,
            Abstract::new(Tcp, NoTls, Disable),
        ),
        (
            "server_tls, sslmode=verify-ca, sslrootcert=valid, sslkey=malformed, sslcert=malformed",
            false,
            Some("psql: error: FATAL:  tls: failed to find any PEM data in certificate input"),
            Abstract::new(Tcp, Tls, VerifyCa)
                .root(R::Valid)
                .client(K::Malformed, K::Malformed),
        ),
        (
            "server_tls, sslmode=verify-ca, sslrootcert=valid, sslkey=valid, sslcert=valid",
            true,
            None,
            Abstract::new(Tcp, Tls, VerifyCa)
                .root(R::Valid)
                .client(K::Valid, K::Valid),
        ),
        (
            "server_tls, sslmode=verify-ca, sslrootcert=valid, sslkey=notsignedbyca, sslcert=notsignedbyca",
            true,
            None,
            Abstract::new(Tcp, Tls, VerifyCa)
                .root(R::Valid)
                .client(K::NotSignedByCa, K::NotSignedByCa),
        ),
        (
            "server_tls, sslmode=verify-full, sslrootcert=valid, sslkey=valid, sslcert=valid, sslhost=valid",
            true,
            None,
            Abstract::new(Tcp, Tls, VerifyFull)
                .root(R::Valid)
                .client(K::Valid, K::Valid),
        ),
        (
            "server_tls, sslmode=verify-full, sslrootcert=valid, sslkey=valid, sslcert=valid, sslhost=invalid",
            false,
            Some(
                "psql: error: FATAL:  tls: failed to verify certificate: x509: certificate is valid for localhost, mysql, pg, not invalid",
            ),
            Abstract::new(Tcp, Tls, VerifyFull)
                .host(SslHost::Invalid)
                .root(R::Valid)
                .client(K::Valid, K::Valid),
        ),
    ];
    for (desc, pass, output, ac) in ssl {
        psql_case(
            &mut out,
            format!("TestSSL/SSL functionality/{}: {desc}", verdict(pass)),
            ac,
            def(false, "", ""),
            pass,
            output,
        );
    }

    // sslmode_test.go: psql -c ... --username x --port P --host H "dbname=postgres
    // password=x sslmode=M"; the exit status is not asserted.
    let custom = find(lives, &Abstract::new(Tcp, Tls, Default));
    for (mode, expect) in [
        (
            "require",
            Expect::Secretless("psql: error: server does not support SSL, but SSL was required"),
        ),
        ("prefer", Expect::Literal("count")),
    ] {
        out.push(Case {
            name: format!("TestCustom/sslmode={mode}"),
            live: custom,
            program: Program::Psql,
            args: vec![
                "-c".into(),
                "select count(*) from test.test".into(),
                "--username".into(),
                "x".into(),
                "--port".into(),
                custom.port.to_string(),
                "--host".into(),
                w.host.into(),
                format!("dbname=postgres password=x sslmode={mode}"),
            ],
            env_only: None,
            should_pass: None,
            output: Some(expect),
        });
    }

    // client_options_test.go: psql --host=H --port=P -c QUERY "sslmode=disable OPTIONS".
    let opts_live = find(lives, &Abstract::new(Tcp, Tls, Default));
    let client_option =
        |name: &str, env: Option<&str>, options: &str, query: &str, pass: bool, expect: Expect| {
            Case {
                name: format!("TestClientOptions/{name}"),
                live: opts_live,
                program: Program::Psql,
                args: vec![
                    format!("--host={}", w.host),
                    format!("--port={}", opts_live.port),
                    "-c".into(),
                    query.into(),
                    format!("sslmode=disable {options}"),
                ],
                env_only: env.map(|e| vec![("PGCLIENTENCODING".to_owned(), e.to_owned())]),
                should_pass: Some(pass),
                output: Some(expect),
            }
        };
    out.push(client_option(
        "dbname/set and found",
        None,
        "dbname=postgres",
        "SELECT current_database();",
        true,
        Expect::Literal("postgres"),
    ));
    out.push(client_option(
        "dbname/set and not found",
        None,
        "dbname=notfound",
        "SELECT current_database();",
        false,
        Expect::Secretless("database \"notfound\" does not exist"),
    ));
    out.push(client_option(
        "client_encoding/client encoding [smoke test]",
        Some("latin1"),
        "dbname=postgres",
        "select value from test.encodings where encoding='latin1'",
        true,
        Expect::Literal("tést"),
    ));
    out.push(client_option(
        "client_encoding/defaults to utf8 when not set",
        None,
        "dbname=postgres",
        "SHOW client_encoding;",
        true,
        Expect::Literal("UTF8"),
    ));
    out.push(client_option(
        "client_encoding/propagates to target server",
        Some("euc-jp"),
        "dbname=postgres",
        "SHOW client_encoding;",
        true,
        Expect::Literal("EUC_JP"),
    ));
    out
}

/// The result of one case.
struct Outcome {
    ok: bool,
    text: String,
    secs: f64,
    problems: Vec<String>,
}

fn which(cmd: &str) -> Option<PathBuf> {
    std::env::var_os("PATH")?
        .to_str()?
        .split(':')
        .map(|d| Path::new(d).join(cmd))
        .find(|p| p.exists())
}

/// Run one case's client, bounded (`timeout`), and check it.
fn run_case(case: &Case) -> Outcome {
    let (program, limit) = match case.program {
        Program::Psql => (which("psql").expect("psql on PATH"), "30"),
        Program::Java => (which("java").expect("java on PATH"), "90"),
    };
    let mut c = Command::new("/usr/bin/timeout");
    c.args(["--kill-after=5", limit])
        .arg(&program)
        .args(&case.args)
        .stdin(Stdio::null());
    match &case.env_only {
        Some(vars) => {
            c.env_clear();
            c.envs(vars.iter().map(|(k, v)| (k.as_str(), v.as_str())));
        }
        None => {
            for (k, _) in std::env::vars_os() {
                if k.to_string_lossy().starts_with("PG") {
                    c.env_remove(k);
                }
            }
        }
    }
    let start = Instant::now();
    let out: Output = c.output().expect("spawn client");
    let secs = start.elapsed().as_secs_f64();
    // Go's CombinedOutput.
    let text = output_text(&out);
    let ok = out.status.success();
    let mut problems = Vec::new();
    if let Some(want) = case.should_pass
        && want != ok
    {
        problems.push(format!(
            "ShouldPass is {want}, the client {} ({})",
            if ok { "succeeded" } else { "failed" },
            out.status
        ));
    }
    match case.output {
        Some(Expect::Secretless(s)) => {
            let want = ours(s);
            if !text.contains(want) {
                problems.push(format!(
                    "output lacks {want:?} (ours for Secretless' {s:?})"
                ));
            }
        }
        Some(Expect::Literal(want)) if !text.contains(want) => {
            problems.push(format!("output lacks {want:?}"));
        }
        Some(Expect::Literal(_)) | None => {}
    }
    Outcome {
        ok,
        text,
        secs,
        problems,
    }
}

/// Run `cases` on `threads` threads; results in the cases' order.
fn run_all(cases: &[Case], threads: usize) -> Vec<Outcome> {
    let next = AtomicUsize::new(0);
    let results: Mutex<Vec<Option<Outcome>>> = Mutex::new((0..cases.len()).map(|_| None).collect());
    std::thread::scope(|s| {
        for _ in 0..threads {
            s.spawn(|| {
                loop {
                    let i = next.fetch_add(1, Ordering::SeqCst);
                    let Some(case) = cases.get(i) else {
                        return;
                    };
                    let r = run_case(case);
                    results.lock().unwrap_or_else(PoisonError::into_inner)[i] = Some(r);
                }
            });
        }
    });
    results
        .into_inner()
        .unwrap_or_else(PoisonError::into_inner)
        .into_iter()
        .map(|r| r.expect("every case ran"))
        .collect()
}

/// The first `count` ports from `first` in generator order whose listener is TCP must
/// be free on 127.0.0.1, and none may be one the quick-start test binds.
fn tcp_ports_free(first: u16, count: usize) -> bool {
    let tcp_index = |i: usize| (i / 1280).is_multiple_of(2);
    (0..count).filter(|&i| tcp_index(i)).all(|i| {
        let port = first + u16::try_from(i).expect("fits");
        ![5432, 5454, 8081, 2222].contains(&port) && TcpListener::bind(("127.0.0.1", port)).is_ok()
    })
}

/// The database password (`DB_PASSWORD`); see the module docs.
const DB_PASSWORD: &str = "slpg-Secretless-pw-4c1e9b";
/// `DB_USER`.
const DB_USER: &str = "test";
/// `test/connector/tcp/pg/test.sql`, verbatim.
const TEST_SQL: &str = "CREATE USER test PASSWORD 'test';

CREATE SCHEMA test;

CREATE TABLE test.test ( id INTEGER PRIMARY KEY );
CREATE TABLE test.encodings ( encoding TEXT, value TEXT );


INSERT INTO test.test VALUES ( generate_series(0, 99999) );
INSERT INTO test.encodings VALUES ('latin1', 'tÃ©st'); --- tést in latin1

GRANT ALL ON SCHEMA test TO test;
GRANT ALL ON test.test TO test;
GRANT ALL ON test.encodings TO test;
";

/// A database server as Secretless' `docker-compose.yml` starts `pg` / `pg_no_tls`.
fn secretless_pg_server(certs: Option<ServerCerts>) -> PgServer {
    let mut opts = PgOptions::new(PgAuth::Scram, "unused-app-user-pw");
    if let Some(c) = certs {
        opts = opts.certs(c);
    }
    let server = PgServer::start(opts);
    server.admin_sql(TEST_SQL);
    server.admin_sql(&format!(
        "ALTER ROLE {DB_USER} PASSWORD {}",
        pg::sql_literal(DB_PASSWORD)
    ));
    server
}

/// How many listeners of each kind the daemon accepts connections on.
fn probe_listeners(
    lives: &[Live],
    listen_ip: &str,
    sock_dir: &Path,
) -> (usize, usize, Vec<String>) {
    let (mut tcp, mut unix, mut missing) = (0, 0, Vec::new());
    for l in lives {
        match l.ac.socket {
            SocketType::Tcp => {
                let addr: SocketAddr = format!("{listen_ip}:{}", l.port).parse().expect("addr");
                if TcpStream::connect_timeout(&addr, Duration::from_secs(2)).is_ok() {
                    tcp += 1;
                } else {
                    missing.push(format!("tcp://{addr}"));
                }
            }
            SocketType::Socket => {
                let p = sock_dir.join(format!(".s.PGSQL.{}", l.port));
                if UnixStream::connect(&p).is_ok() {
                    unix += 1;
                } else {
                    missing.push(format!("unix://{}", p.display()));
                }
            }
        }
    }
    (tcp, unix, missing)
}

/// Secretless' PostgreSQL connector suite, with its generated 5120-service file, against
/// two real PostgreSQL servers through `broker -f`.
#[test]
#[allow(clippy::too_many_lines)]
fn secretless_pg_fixtures_with_the_generated_sslmode_matrix() {
    if !privileged() {
        return;
    }
    assert!(
        pg::available(),
        "PostgreSQL 15 and psql are needed (cargo xtask setup installs them)"
    );
    let t0 = Instant::now();
    let dir = tempfile::tempdir().expect("tempdir");
    let ssl_dir = dir.path().join("ssl");
    let sock_dir = dir.path().join("sock");
    std::fs::create_dir(&ssl_dir).expect("mkdir ssl");
    std::fs::create_dir(&sock_dir).expect("mkdir sock");
    std::fs::set_permissions(&sock_dir, std::fs::Permissions::from_mode(0o755)).expect("chmod");
    make_secretless_certs(&ssl_dir);
    let certs = ServerCerts {
        cert: ssl_dir.join("server.pem"),
        key: ssl_dir.join("server-key.pem"),
        ca: ssl_dir.join("ca.pem"),
        client_ca: Some(ssl_dir.join("ca.pem")),
    };
    let pg_tls = secretless_pg_server(Some(certs));
    let pg_no_tls = secretless_pg_server(None);
    let setup = t0.elapsed();

    const SERVICES: usize = 2 * 2 * 5 * 2 * 4 * 4 * 4 * 2;
    let first_port = [3307u16, 10307, 13307]
        .into_iter()
        .find(|&p| tcp_ports_free(p, SERVICES))
        .expect("no free range of 5120 ports for the listeners (3307.., 10307.., 13307..)");
    let env = GenEnv {
        host_with_tls: "pg",
        host_without_tls: "pg_no_tls",
        port_tls: pg_tls.port,
        port_no_tls: pg_no_tls.port,
        user: DB_USER,
        password: DB_PASSWORD,
        ssl_dir: ssl_dir.clone(),
        sock_dir: sock_dir.clone(),
        first_port,
        listen_ip: "127.0.0.1",
        pg_bench_port: free_port(),
    };
    let (yaml, lives) = generate(&env);
    assert_eq!(lives.len(), SERVICES);
    let file = write_file(dir.path(), "secretless.yml", &yaml);
    let mut failures: Vec<String> = Vec::new();

    // The file loads as Secretless loads it.
    let check = Command::new(broker_bin())
        .arg("check")
        .arg(&file)
        .output()
        .expect("broker check");
    let check_text = output_text(&check);
    assert_no_secret(
        &check_text,
        &[DB_PASSWORD, "wrong-password"],
        "broker check",
    );
    if !check.status.success() {
        let lines: Vec<&str> = check_text.lines().collect();
        failures.push(format!(
            "broker check {} failed ({}), {} lines, first:\n{}",
            file.display(),
            check.status,
            lines.len(),
            lines.iter().take(5).copied().collect::<Vec<_>>().join("\n")
        ));
    }

    // `broker -f FILE`, with `pg` and `pg_no_tls` resolving to the servers' address.
    let health: SocketAddr = format!("127.0.0.1:{}", free_port())
        .parse()
        .expect("health addr");
    let bin = broker_bin();
    let health_flag = format!("-health-addr={health}");
    let argv = [
        bin.to_str().expect("UTF-8 broker path"),
        "-f",
        file.to_str().expect("UTF-8 path"),
        &health_flag,
    ];
    let cmd = with_hosts(
        dir.path(),
        &[("pg", "127.0.0.1"), ("pg_no_tls", "127.0.0.1")],
        &argv,
    );
    let mut broker = SecretlessBroker::start(cmd, &[], &dir.path().join("broker.log"), health);
    let ready = broker.wait_ready(Duration::from_secs(90));

    // Every listener of the file is served: 2560 TCP ports and 2560 Unix sockets (and
    // the health-check service's socket).
    let (tcp, unix, missing) = probe_listeners(&lives, env.listen_ip, &sock_dir);
    if !missing.is_empty() {
        failures.push(format!(
            "{} of {} listeners not served ({tcp} TCP and {unix} Unix sockets answer), e.g. {}",
            missing.len(),
            lives.len(),
            missing
                .iter()
                .take(3)
                .cloned()
                .collect::<Vec<_>>()
                .join(", ")
        ));
    }
    if UnixStream::connect(sock_dir.join("mysql.sock")).is_err() {
        failures.push("health-check (mysql) socket not served".into());
    }

    let jdbc_source = write_file(dir.path(), "SecretlessJdbc.java", JDBC_SOURCE);
    let w = Where {
        host: env.listen_ip,
        sock_dir: &sock_dir,
    };
    let all = cases(&lives, &w, &jdbc_source);
    let jdbc_missing = clients::Client::Jdbc.missing();
    let runnable: Vec<Case> = all
        .iter()
        .filter(|c| !(matches!(c.program, Program::Java) && jdbc_missing.is_some()))
        .cloned()
        .collect();
    if let Some(why) = &jdbc_missing {
        failures.push(format!("JDBC cases not run: {why}"));
    }
    let t_cases = Instant::now();
    let results = run_all(&runnable, 6);
    let cases_time = t_cases.elapsed();

    let mut table = String::new();
    for (case, r) in runnable.iter().zip(&results) {
        let _ = writeln!(
            table,
            "{:<4} {:>5.2}s {:<5} port {:<5} {}\n      [{}]",
            if r.problems.is_empty() { "ok" } else { "FAIL" },
            r.secs,
            if r.ok { "exit0" } else { "error" },
            case.live.port,
            case.name,
            case.live.ac.short()
        );
        let first_line = r.text.lines().find(|l| !l.trim().is_empty()).unwrap_or("");
        let _ = writeln!(table, "      > {first_line}");
        if !r.problems.is_empty() {
            let _ = writeln!(table, "      {}", r.problems.join("; "));
            failures.push(format!(
                "{}: {}\n    output: {}",
                case.name,
                r.problems.join("; "),
                r.text
                    .lines()
                    .take(3)
                    .collect::<Vec<_>>()
                    .join("\n            ")
            ));
        }
        assert_no_secret(
            &r.text,
            &[DB_PASSWORD, "wrong-password"],
            &format!("output of {}", case.name),
        );
    }

    let status = broker.stop();
    let log = broker.log_text();
    assert_no_secret(&log, &[DB_PASSWORD, "wrong-password"], "the daemon's log");
    if !status.success() {
        failures.push(format!("broker exited with {status} on SIGTERM"));
    }
    eprintln!(
        "\nSecretless pg suite: {} services ({} TCP, {} Unix answering), setup {:.1}s, \
         ready after {:.1}s, {} cases in {:.1}s, total {:.1}s, log {} lines\n\
         broker check: {} lines, e.g.\n  {}\n{table}",
        lives.len() + 2,
        tcp,
        unix,
        setup.as_secs_f64(),
        ready.as_secs_f64(),
        runnable.len(),
        cases_time.as_secs_f64(),
        t0.elapsed().as_secs_f64(),
        log.lines().count(),
        check_text.lines().count(),
        check_text.lines().take(4).collect::<Vec<_>>().join("\n  ")
    );
    assert!(
        failures.is_empty(),
        "{} failure(s):\n{}\n--- daemon log (tail) ---\n{}",
        failures.len(),
        failures.join("\n"),
        tail(&log)
    );
}

// ---------------------------------------------------------------------------------------
// The quick-start demo.
// ---------------------------------------------------------------------------------------

/// The demo's PostgreSQL listens on 5432: one test at a time holds it.
static PORT_5432: Mutex<()> = Mutex::new(());

/// `demos/quick-start/docker/bin/pg-init.sh`'s SQL (as `QUICKSTART_USERNAME`).
const QUICKSTART_SQL: &str = "
    CREATE TABLE counties (
      id serial PRIMARY KEY,
      name varchar (32) NOT NULL
    );

    INSERT INTO counties (name) VALUES ('Middlesex');
    INSERT INTO counties (name) VALUES ('Worcester');
    INSERT INTO counties (name) VALUES ('Essex');
    INSERT INTO counties (name) VALUES ('Suffolk');
    INSERT INTO counties (name) VALUES ('Norfolk');
    INSERT INTO counties (name) VALUES ('Bristol');
    INSERT INTO counties (name) VALUES ('Plymouth');
    INSERT INTO counties (name) VALUES ('Hampden');
    INSERT INTO counties (name) VALUES ('Barnstable');
    INSERT INTO counties (name) VALUES ('Hampshire');
    INSERT INTO counties (name) VALUES ('Berkshire');
    INSERT INTO counties (name) VALUES ('Franklin');
    INSERT INTO counties (name) VALUES ('Dukes');
    INSERT INTO counties (name) VALUES ('Nantucket');
";

fn random_hex(bytes: usize) -> String {
    let mut buf = vec![0u8; bytes];
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut buf))
        .expect("read /dev/urandom");
    buf.iter().map(|b| format!("{b:02x}")).collect()
}

/// Run the quick-start demo's broker with its `secretless.yml` (the pg service's
/// `listenOn` replaced when `pg_listen` is set) and check psql through `psql_host`.
fn quick_start(pg_listen: Option<&str>, psql_host: impl Fn(&Path) -> String, label: &str) {
    let _port = PORT_5432.lock().unwrap_or_else(PoisonError::into_inner);
    assert!(
        TcpListener::bind("127.0.0.1:5432").is_ok(),
        "the quick-start demo's PostgreSQL needs 127.0.0.1:5432, which is taken on this \
         machine (stop whatever listens there)"
    );
    for port in [5454, 8081] {
        assert!(
            TcpListener::bind(("0.0.0.0", port)).is_ok(),
            "the quick-start demo's secretless.yml listens on 0.0.0.0:{port}, which is taken"
        );
    }
    // The entrypoint: QUICKSTART_USERNAME=secretless, QUICKSTART_PASSWORD=$(openssl
    // rand -hex 8), BASIC_AUTH_USERNAME=user, BASIC_AUTH_PASSWORD=$(openssl rand -hex
    // 16), SSH_PRIVATE_KEY (a key made with ssh-keygen there; any value here: the ssh
    // connector is not built and the service is not served).
    let pg_password = random_hex(8);
    let basic_password = random_hex(16);
    let ssh_key = format!("not-a-key-{}", random_hex(8));
    let mut opts = PgOptions::new(PgAuth::Scram, &pg_password).tls(PgTls::On);
    opts.user = "secretless".into();
    opts.database = "quickstart".into();
    opts.port = Some(5432);
    let pg = PgServer::start(opts);
    pg.admin_sql_in(
        "quickstart",
        &format!("set role secretless; {QUICKSTART_SQL}"),
    );

    let dir = tempfile::tempdir().expect("tempdir");
    // Readable by `nobody` (the demo runs the broker as its own user, `secretless`).
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).expect("chmod");
    let sock_dir = dir.path().join("sock");
    std::fs::create_dir(&sock_dir).expect("mkdir");
    let chown = Command::new("chown")
        .args(["65534:65534"])
        .arg(&sock_dir)
        .status()
        .expect("chown");
    assert!(chown.success());
    let original =
        std::fs::read_to_string(workspace_root().join("tests/fixtures/secretless-quick-start.yml"))
            .expect("tests/fixtures/secretless-quick-start.yml");
    let text = match pg_listen {
        Some(l) => {
            let l = l.replace("<sock>", &sock_dir.display().to_string());
            let replaced =
                original.replacen("listenOn: tcp://0.0.0.0:5454", &format!("listenOn: {l}"), 1);
            assert_ne!(
                replaced, original,
                "the fixture's pg listenOn is not where expected"
            );
            replaced
        }
        None => original,
    };
    let file = write_file(dir.path(), "secretless.yml", &text);
    std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o644)).expect("chmod");

    let health: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().expect("addr");
    let health_flag = format!("-health-addr={health}");
    let mut cmd = Command::new("setpriv");
    cmd.args([
        "--reuid=65534",
        "--regid=65534",
        "--clear-groups",
        "--inh-caps=-all",
        "--",
    ])
    .arg(broker_bin())
    .arg("-f")
    .arg(&file)
    .arg(&health_flag);
    let env = [
        ("QUICKSTART_USERNAME", "secretless"),
        ("QUICKSTART_PASSWORD", pg_password.as_str()),
        ("BASIC_AUTH_USERNAME", "user"),
        ("BASIC_AUTH_PASSWORD", basic_password.as_str()),
        ("SSH_PRIVATE_KEY", ssh_key.as_str()),
    ];
    let mut broker = SecretlessBroker::start(cmd, &env, &dir.path().join("broker.log"), health);
    broker.wait_ready(Duration::from_secs(30));
    let secrets = [
        pg_password.as_str(),
        basic_password.as_str(),
        ssh_key.as_str(),
    ];

    // demos/quick-start/test/bin/entrypoint's PostgreSQL check.
    let conninfo = format!(
        "host={}\n  port=5454\n  sslmode=disable\n  user=secretless\n  dbname=quickstart",
        psql_host(&sock_dir)
    );
    let out = Command::new("timeout")
        .args(["--kill-after=5", "30", "psql"])
        .arg(&conninfo)
        .args(["-c", "select * from counties;"])
        .env_remove("PGPASSWORD")
        .env("PGCONNECT_TIMEOUT", "10")
        .stdin(Stdio::null())
        .output()
        .expect("psql");
    let text = output_text(&out);
    let log = broker.log_text();
    assert!(
        out.status.success() && text.contains("Nantucket") && text.contains("(14 rows)"),
        "{label}: psql through the quick-start broker:\n{text}\n--- log ---\n{}",
        tail(&log)
    );
    // The basic_auth service is bound (it needs an upstream to do more).
    assert!(
        TcpStream::connect_timeout(
            &"127.0.0.1:8081".parse().expect("addr"),
            Duration::from_secs(2)
        )
        .is_ok(),
        "{label}: quick-start-basic-auth not listening on 0.0.0.0:8081:\n{}",
        tail(&log)
    );
    // The ssh service is named as not built, and not served.
    assert!(
        log.contains("quick-start-ssh") && log.contains("not served"),
        "{label}: the ssh service is not reported as unserved:\n{}",
        tail(&log)
    );
    assert!(
        TcpStream::connect_timeout(
            &"127.0.0.1:2222".parse().expect("addr"),
            Duration::from_secs(2)
        )
        .is_err(),
        "{label}: something serves the ssh service's port 2222"
    );
    let status = broker.stop();
    let log = broker.log_text();
    assert!(
        status.success(),
        "{label}: broker exit {status}:\n{}",
        tail(&log)
    );
    assert_no_secret(&text, &secrets, "psql output");
    assert_no_secret(&log, &secrets, "the daemon's log");
    drop(pg);
}

/// `broker -f` with the quick-start demo's `secretless.yml` as it is: psql to
/// `127.0.0.1:5454` (the file says `tcp://0.0.0.0:5454`) reaches the demo's database.
#[test]
fn quick_start_demo_serves_psql_over_tcp() {
    if !privileged() {
        return;
    }
    quick_start(None, |_| "127.0.0.1".into(), "TCP");
}

/// The same file with the pg service on `unix://<dir>/.s.PGSQL.5454`: psql `-h <dir>
/// -p 5454` goes through the Unix socket.
#[test]
fn quick_start_demo_serves_psql_through_a_unix_socket() {
    if !privileged() {
        return;
    }
    quick_start(
        Some("unix://<sock>/.s.PGSQL.5454"),
        |sock| sock.display().to_string(),
        "Unix socket",
    );
}
