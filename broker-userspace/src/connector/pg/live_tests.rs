//! In-process tests against real PostgreSQL 15 servers and the real `psql`: a listener
//! in the test hands accepted sockets to a [`super::PgConnector`] through
//! [`crate::proxy::serve`], as the proxy layer does.
//! They need root (the server runs as `postgres`) and are skipped, loudly, otherwise.

use std::{collections::BTreeMap, net::SocketAddr, path::Path, sync::Arc, time::Duration};

use tokio::net::TcpListener;

use crate::{
    config::{
        BrokerSettings, Config, ConnectorSpec, CredentialSource, DEFAULT_CACHE_TTL, ListenAddr,
        ProviderConfig, Service,
    },
    connector::dial::Dialer,
    connector::{Conn, ConnStats, Env},
    secret::Secret,
};

// The integration tests' harness (test-only; it calls `geteuid`).
#[allow(unsafe_code)]
#[path = "../../../../tests/src/pg.rs"]
mod harness;

use harness::{PgAuth, PgOptions, PgServer, PgTls};

const SERVICE: &str = "orders-db";

fn skip() -> bool {
    if harness::available() {
        return false;
    }
    // CI (and `cargo xtask test`) must not pass these silently.
    assert!(
        std::env::var("BROKER_REQUIRE_PRIVILEGED").as_deref() != Ok("1"),
        "live PostgreSQL tests need root and PostgreSQL 15 under {}",
        harness::PG_BIN
    );
    eprintln!(
        "SKIPPED: needs root and PostgreSQL 15 under {}",
        harness::PG_BIN
    );
    true
}

fn lit(v: &str) -> CredentialSource {
    CredentialSource::Literal(Secret::from_str_value(v))
}

fn file(path: &Path) -> CredentialSource {
    CredentialSource::Provider {
        provider: "file".into(),
        id: path.display().to_string(),
    }
}

struct Running {
    env: Env,
    pg: Arc<super::PgConnector>,
    addr: SocketAddr,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Running {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn start_broker(creds: Vec<(&str, CredentialSource)>) -> Running {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let service = Service {
        name: SERVICE.into(),
        connector: ConnectorSpec::built("pg", super::PgConfig::default()),
        listen_on: Some(ListenAddr::Tcp(addr)),
        intercept: vec![],
        credentials: creds.into_iter().map(|(k, v)| (k.to_owned(), v)).collect(),
        authentication: vec![],
        cache: crate::config::CacheOverride::default(),
        unix_socket: crate::config::UnixSocketOptions::default(),
        policy: crate::policy::Spec::default(),
    };
    let mut providers = BTreeMap::new();
    providers.insert("file".to_owned(), ProviderConfig::File);
    let config = Config {
        services: vec![service.clone()],
        providers,
        broker: BrokerSettings {
            health_addr: None,
            transparent_port: 0,
            cache_ttl: DEFAULT_CACHE_TTL,
            bypass_mark: 0,
            splice: false,
            ..BrokerSettings::default()
        },
        fetch_policies: BTreeMap::new(),
        warnings: Vec::new(),
    };
    let env = Env {
        secrets: Arc::new(crate::secrets::SecretStore::new(&config).unwrap()),
        dialer: Dialer { mark: 0 },
        ca: None,
    };
    let pg = Arc::new(super::PgConnector::new(super::PgConfig::default()));
    let service = Arc::new(service);
    let (e, p) = (env.clone(), Arc::clone(&pg));
    let task = tokio::spawn(async move {
        loop {
            let Ok((sock, peer)) = listener.accept().await else {
                return;
            };
            let (e, p) = (e.clone(), Arc::clone(&p));
            let service = Arc::clone(&service);
            tokio::spawn(async move {
                let mut conn = Conn {
                    service,
                    client_addr: peer.into(),
                    caller: None,
                    orig_dst: None,
                    orig_host: None,
                    admitted_by: None,
                    stats: ConnStats::default(),
                };
                let r = crate::proxy::serve(p.as_ref(), &e, &mut conn, sock.into(), None).await;
                eprintln!(
                    "[broker] {peer}: {:?} {:?}",
                    r.as_ref().map_err(|e| e.to_string()),
                    conn.stats
                );
            });
        }
    });
    Running {
        env,
        pg,
        addr,
        task,
    }
}

fn conninfo(addr: SocketAddr) -> String {
    format!(
        "host=127.0.0.1 port={} user=anything dbname=app sslmode=disable",
        addr.port()
    )
}

async fn psql(conninfo: String, sql: &'static str) -> (bool, String) {
    tokio::task::spawn_blocking(move || {
        let out = harness::psql(&conninfo, sql);
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

fn base_creds(pg: &PgServer) -> Vec<(&'static str, CredentialSource)> {
    vec![
        ("host", lit("127.0.0.1")),
        ("port", lit(&pg.port.to_string())),
        ("username", lit(&pg.user)),
        ("password", lit(&pg.password)),
        ("sslmode", lit("disable")),
    ]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn live_scram_md5_cleartext() {
    if skip() {
        return;
    }
    for auth in [PgAuth::Scram, PgAuth::Md5, PgAuth::Password] {
        let pw = "s3cr3t-Live-pw";
        let pg = tokio::task::spawn_blocking(move || PgServer::start(PgOptions::new(auth, pw)))
            .await
            .unwrap();
        let mut creds = base_creds(&pg);
        if auth == PgAuth::Password {
            // A cleartext password over plain TCP is refused by default...
            let run = start_broker(base_creds(&pg)).await;
            let (ok, out) = psql(conninfo(run.addr), "select current_user").await;
            assert!(!ok, "{out}");
            assert!(out.contains("requireAuth") && !out.contains(pw), "{out}");
            // ...and sent when the service says so.
            creds.push(("require_auth", lit("password")));
        }
        let run = start_broker(creds).await;
        for _ in 0..2 {
            let (ok, out) = psql(conninfo(run.addr), "select current_user").await;
            assert!(ok, "{auth:?}: {out}");
            assert_eq!(out.trim(), "app_user", "{auth:?}");
            assert!(!out.contains(pw));
        }
        // SCRAM computed the salted password once.
        let expected = usize::from(auth == PgAuth::Scram);
        assert_eq!(run.pg.shared.salted.len(), expected, "{auth:?}");
        // Sessions ended: no cancel keys left.
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert!(run.pg.shared.cancel.is_empty());
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn live_tls_modes() {
    if skip() {
        return;
    }
    let pw = "tls-Live-pw";
    let pg = tokio::task::spawn_blocking(move || {
        PgServer::start(PgOptions::new(PgAuth::Scram, pw).tls(PgTls::Required))
    })
    .await
    .unwrap();
    let ca = pg.ca_cert.clone().unwrap();
    let ca_text = std::fs::read_to_string(&ca).unwrap();
    let ca_s = ca.display().to_string();
    type Case<'a> = (&'a str, Vec<(&'a str, CredentialSource)>, bool);
    let cases: Vec<Case<'_>> = vec![
        ("default require", vec![], true),
        ("require", vec![("sslmode", lit("require"))], true),
        (
            "verify-ca",
            vec![("sslmode", lit("verify-ca")), ("sslrootcert", lit(&ca_s))],
            true,
        ),
        (
            "verify-ca inline PEM",
            vec![
                ("sslmode", lit("verify-ca")),
                ("sslrootcert", lit(&ca_text)),
            ],
            true,
        ),
        (
            "verify-full sslhost",
            vec![
                ("sslmode", lit("verify-full")),
                ("sslrootcert", lit(&ca_s)),
                ("sslhost", lit("db.example.test")),
            ],
            true,
        ),
        (
            "verify-full by IP",
            vec![("sslmode", lit("verify-full")), ("sslrootcert", lit(&ca_s))],
            false,
        ),
        (
            "verify-full wrong sslhost",
            vec![
                ("sslmode", lit("verify-full")),
                ("sslrootcert", lit(&ca_s)),
                ("sslhost", lit("wrong.example.test")),
            ],
            false,
        ),
        ("disable", vec![("sslmode", lit("disable"))], false),
    ];
    for (name, extra, want_ok) in cases {
        let mut creds = base_creds(&pg);
        creds.retain(|(k, _)| *k != "sslmode");
        creds.extend(extra);
        let run = start_broker(creds).await;
        let (ok, out) = psql(
            conninfo(run.addr),
            "select current_user || ' ' || ssl from pg_stat_ssl where pid = pg_backend_pid()",
        )
        .await;
        assert_eq!(ok, want_ok, "{name}: {out}");
        if want_ok {
            assert_eq!(out.trim(), "app_user true", "{name}");
        } else if name.starts_with("verify-full") {
            assert!(
                out.contains(SERVICE) && out.contains("TLS"),
                "{name}: {out}"
            );
        } else {
            // No hostssl match for a plain connection: the server's own 28000.
            assert!(out.contains("no pg_hba.conf entry"), "{name}: {out}");
        }
        assert!(!out.contains(pw));
    }

    // Over TLS the broker binds the SCRAM exchange to the server certificate.
    let run = start_broker(vec![]).await;
    let mut creds = crate::connector::Credentials::default();
    for (k, v) in [
        ("host", "127.0.0.1".to_owned()),
        ("port", pg.port.to_string()),
        ("username", pg.user.clone()),
        ("password", pg.password.clone()),
        ("sslmode", "verify-ca".to_owned()),
        ("sslrootcert", ca_s.clone()),
    ] {
        creds.0.insert(k.to_owned(), Secret::from_str_value(&v));
    }
    let params = super::UpstreamParams::from_credentials(
        &creds,
        Default::default(),
        super::Destinations::Any,
    )
    .unwrap();
    let startup = super::Startup {
        version: super::messages::PROTOCOL_3_0,
        params: vec![(b"database".to_vec(), b"app".to_vec())],
    };
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let mut dummy = tokio::net::TcpStream::connect(l.local_addr().unwrap())
        .await
        .unwrap();
    let attempt = super::attempt(&run.pg, &run.env, &params, &creds, &startup, &mut dummy)
        .await
        .unwrap();
    let super::Attempt::Ready { ready, stream, .. } = attempt else {
        panic!("rejected")
    };
    assert!(stream.is_tls());
    assert_eq!(ready.method, "SCRAM-SHA-256-PLUS");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn live_errors_and_rotation() {
    if skip() {
        return;
    }
    let pw = "old-Live-pw";
    let mut pg =
        tokio::task::spawn_blocking(move || PgServer::start(PgOptions::new(PgAuth::Scram, pw)))
            .await
            .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let pw_file = dir.path().join("pw");
    std::fs::write(&pw_file, "wrong-pw\n").unwrap();
    let mut creds = base_creds(&pg);
    creds.retain(|(k, _)| *k != "password");
    creds.push(("password", file(&pw_file)));
    let run = start_broker(creds).await;
    // Wrong password: the server's 28P01 reaches psql (after one fresh refetch).
    let (ok, out) = psql(conninfo(run.addr), "select 1").await;
    assert!(!ok);
    assert!(out.contains("password authentication failed"), "{out}");
    // Rotation: the store now has the right value; the cached wrong one is refreshed.
    std::fs::write(&pw_file, format!("{pw}\n")).unwrap();
    let (ok, out) = psql(conninfo(run.addr), "select current_user").await;
    assert!(ok, "{out}");
    // Database password rotated, then the store: next connection works.
    pg.set_password("new-Live-pw");
    std::fs::write(&pw_file, "new-Live-pw").unwrap();
    let (ok, out) = psql(conninfo(run.addr), "select current_user").await;
    assert!(ok, "{out}");
    assert_eq!(out.trim(), "app_user");

    // Unreachable upstream: 08006 naming the service.
    // Nothing listens on port 1.
    let dead = 1u16;
    let run2 = start_broker(vec![
        ("host", lit("127.0.0.1")),
        ("port", lit(&dead.to_string())),
        ("username", lit("u")),
        ("password", lit("p")),
    ])
    .await;
    let (ok, out) = psql(conninfo(run2.addr), "select 1").await;
    assert!(!ok);
    assert!(
        out.contains(&format!(
            "service `{SERVICE}`: cannot reach upstream 127.0.0.1:1"
        )),
        "{out}"
    );
    // Missing credential file: 08004 naming the credential, not a value.
    let run3 = start_broker(vec![
        ("host", lit("127.0.0.1")),
        ("username", lit("u")),
        ("password", file(&dir.path().join("missing"))),
    ])
    .await;
    let (ok, out) = psql(conninfo(run3.addr), "select 1").await;
    assert!(!ok);
    assert!(out.contains("credential `password`"), "{out}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn live_cancel() {
    if skip() {
        return;
    }
    let Some(python) = harness::python_with_psycopg2() else {
        eprintln!("SKIPPED: no python3 with psycopg2");
        return;
    };
    let pw = "cancel-Live-pw";
    let pg =
        tokio::task::spawn_blocking(move || PgServer::start(PgOptions::new(PgAuth::Scram, pw)))
            .await
            .unwrap();
    let run = start_broker(base_creds(&pg)).await;
    let dsn = format!(
        "host=127.0.0.1 port={} user=anything dbname=app sslmode=disable",
        run.addr.port()
    );
    let (code, elapsed, text) =
        tokio::task::spawn_blocking(move || harness::cancel_sleep(&python, &dsn, 500))
            .await
            .unwrap();
    assert_eq!(code, "57014", "{text}");
    assert!(elapsed < 2.0, "cancel took {elapsed}s: {text}");
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(run.pg.shared.cancel.is_empty());
}
