//! The `aws` provider (AWS Secrets Manager) against moto's real AWS API with SigV4
//! checking on (`broker_tests::moto`), behind `broker run --no-ebpf` and a real
//! PostgreSQL 15 (a `pg` service on `listenOn`, driven by `psql`):
//! `SecretString` JSON fields (dotted and JSON pointer), `SecretBinary`, rotation
//! (`PutSecretValue`) picked up after `cacheTTL`, `?versionStage=AWSPREVIOUS`,
//! credentials from the environment, a profile file, the container endpoint (refreshed
//! before they expire), web identity (STS) and instance metadata (the last three from
//! `broker_tests::fake_aws`, handing out moto's temporary credentials), a wrong secret
//! key denied, a missing secret "not found" naming the id. Every output, the daemon
//! log included, is grepped for every secret value, key and token.
//!
//! Instance metadata is disabled (`AWS_EC2_METADATA_DISABLED=true`) in every daemon
//! except the one pointed at the fake's IMDS: nothing leaves the loopback.

use std::{net::SocketAddr, process::Output, time::Duration};

use broker_tests::{
    Daemon, assert_no_secret,
    fake_aws::FakeAws,
    free_port,
    moto::{Moto, REGION, TempCreds},
    output_text,
    pg::{PgAuth, PgOptions, PgServer, psql},
    privileged, write_file,
};

const PW1: &str = "aws-test-password-one-7d3e1a";
const PW2: &str = "aws-test-password-two-4c9b2f";
const PW_BIN: &str = "aws-test-binary-password-0e6f5d";
const WRONG_KEY: &str = "aws-test-wrong-secret-key-91b0c7";
const CONTAINER_TOKEN: &str = "aws-test-container-token-5a2d8e";
const WEB_TOKEN: &str = "aws-test-web-identity-token-3f7c1b";
const ROLE_ARN: &str = "arn:aws:iam::123456789012:role/broker-role";

/// A daemon with its directory; fields drop in order.
struct Running {
    daemon: Daemon,
    dir: tempfile::TempDir,
}

/// `broker run --no-ebpf` with `providers` (YAML under `providers:`, may be empty),
/// `broker_extra` lines, `services`, and `env` on top of an AWS environment isolated from
/// the machine's (no shared files, instance metadata off unless `env` sets it).
fn start(providers: &str, broker_extra: &str, services: &str, env: &[(&str, &str)]) -> Running {
    let dir = tempfile::tempdir().expect("tempdir");
    let health = free_port();
    let providers = if providers.is_empty() {
        String::new()
    } else {
        format!("providers:\n{providers}")
    };
    let cfg = write_file(
        dir.path(),
        "broker.yaml",
        &format!(
            "version: 2\n{providers}broker:\n  health: 127.0.0.1:{health}\n{broker_extra}services:\n{services}"
        ),
    );
    let none = dir.path().join("none");
    let none = none.to_str().expect("utf-8");
    let mut all: Vec<(&str, &str)> = vec![
        ("AWS_CONFIG_FILE", none),
        ("AWS_SHARED_CREDENTIALS_FILE", none),
        ("AWS_EC2_METADATA_DISABLED", "true"),
    ];
    for (k, v) in env {
        all.retain(|(k2, _)| k2 != k);
        all.push((k, v));
    }
    let health: SocketAddr = format!("127.0.0.1:{health}").parse().expect("addr");
    let daemon = Daemon::start_with_env(
        &cfg,
        &["--no-ebpf"],
        &all,
        health,
        &dir.path().join("broker.log"),
    );
    Running { daemon, dir }
}

/// A `pg` service on `listenOn` for `pg`, username and password as given (YAML values).
fn service(name: &str, port: u16, pg: &PgServer, username: &str, password: &str) -> String {
    format!(
        "  {name}:\n    connector: pg\n    listenOn: tcp://127.0.0.1:{port}\n    credentials:\n      host: 127.0.0.1\n      port: \"{}\"\n      sslmode: disable\n      username: {username}\n      password: {password}\n",
        pg.addr().port()
    )
}

/// `select current_user` through the broker's listener on `port`.
fn who(port: u16) -> (Output, String) {
    let out = psql(
        &format!(
            "host=127.0.0.1 port={port} user=anything password=dummy dbname=app sslmode=disable"
        ),
        "select current_user",
    );
    let text = output_text(&out);
    (out, text)
}

/// Connect and expect to be `user`; returns the output.
fn expect_user(port: u16, user: &str, what: &str, d: &Daemon) -> String {
    let (out, text) = who(port);
    assert!(
        out.status.success() && text.trim() == user,
        "{what}: {text}\nbroker log:\n{}",
        d.log_text()
    );
    text
}

/// The access-log lines of `service`.
fn access_lines(log: &str, service: &str) -> Vec<String> {
    log.lines()
        .filter(|l| l.contains("access") && l.contains(&format!("service={service} ")))
        .map(str::to_owned)
        .collect()
}

fn pg_server() -> PgServer {
    PgServer::start(PgOptions::new(PgAuth::Scram, PW1))
}

fn creds_json(password: &str) -> String {
    serde_json::json!({"username": "app_user", "password": password, "db": {"port": 5432}})
        .to_string()
}

/// The environment of the IAM user's key, the region and moto's endpoint.
fn env_keys(moto: &Moto) -> Vec<(&str, String)> {
    vec![
        ("AWS_ACCESS_KEY_ID", moto.access_key_id.clone()),
        ("AWS_SECRET_ACCESS_KEY", moto.secret_access_key.clone()),
        ("AWS_REGION", REGION.to_owned()),
        ("AWS_ENDPOINT_URL", moto.endpoint()),
    ]
}

fn as_refs<'a>(v: &'a [(&'a str, String)]) -> Vec<(&'a str, &'a str)> {
    v.iter().map(|(k, v)| (*k, v.as_str())).collect()
}

fn temp_secrets(creds: &[TempCreds]) -> Vec<&str> {
    creds
        .iter()
        .flat_map(|c| [c.secret_access_key.as_str(), c.session_token.as_str()])
        .collect()
}

/// The built-in `aws` instance, from the chain alone (environment keys, `AWS_REGION`,
/// `AWS_ENDPOINT_URL`): username and password are fields of one JSON `SecretString`,
/// one by a dotted path, one by a JSON pointer; a `SecretBinary` is a password as is.
#[test]
fn secret_string_fields_and_secret_binary_with_environment_credentials() {
    if !privileged() {
        return;
    }
    let moto = Moto::start();
    let pg = pg_server();
    let _ = moto.create_secret_string("db/app", &creds_json(PW1));
    pg.admin_sql(&format!("CREATE ROLE bin_user LOGIN PASSWORD '{PW_BIN}'"));
    moto.create_secret_binary("db/bin", PW_BIN.as_bytes());
    let (p_json, p_bin) = (free_port(), free_port());
    let env = env_keys(&moto);
    let mut r = start(
        "",
        "",
        &(service(
            "json",
            p_json,
            &pg,
            "{from: aws, get: db/app#username}",
            "{from: aws, get: \"db/app#/password\"}",
        ) + &service("bin", p_bin, &pg, "bin_user", "{from: aws, get: db/bin}")),
        &as_refs(&env),
    );
    let mut out = expect_user(p_json, "app_user", "SecretString fields", &r.daemon);
    out += &expect_user(p_bin, "bin_user", "SecretBinary", &r.daemon);
    assert!(moto.calls("secretsmanager.GetSecretValue") >= 2);
    assert!(r.daemon.stop().success());
    let log = r.daemon.log_text();
    let json = access_lines(&log, "json").concat();
    assert!(
        json.contains("result=\"ok\"")
            && json.contains("username<-aws:db/app#username")
            && json.contains("password<-aws:db/app#/password"),
        "{log}"
    );
    assert_no_secret(
        &format!("{out}{log}"),
        &[PW1, PW_BIN, &moto.secret_access_key],
        "psql output and broker log",
    );
    drop(r.dir);
}

/// Rotation: after `PutSecretValue` (and the database's password changed with it) the
/// next connection after `cacheTTL` gets the new password with one more
/// `GetSecretValue` (not a rejected try and a retry); `?versionStage=AWSPREVIOUS` reads
/// the old one, which before the rotation does not exist ("not found").
#[test]
fn rotation_after_the_ttl_and_the_previous_version() {
    if !privileged() {
        return;
    }
    let moto = Moto::start();
    let mut pg = pg_server();
    let _ = moto.create_secret_string("db/rot", &creds_json(PW1));
    pg.admin_sql(&format!("CREATE ROLE old_user LOGIN PASSWORD '{PW1}'"));
    let (p_cur, p_prev) = (free_port(), free_port());
    let env = env_keys(&moto);
    let mut r = start(
        "",
        "  cacheTTL: 1s\n",
        &(service(
            "current",
            p_cur,
            &pg,
            "app_user",
            "{from: aws, get: db/rot#password}",
        ) + &service(
            "previous",
            p_prev,
            &pg,
            "old_user",
            "{from: aws, get: \"db/rot?versionStage=AWSPREVIOUS#password\"}",
        )),
        &as_refs(&env),
    );
    const GET: &str = "secretsmanager.GetSecretValue";
    let mut out = expect_user(p_cur, "app_user", "before the rotation", &r.daemon);
    assert_eq!(moto.calls(GET), 1);
    // No previous version yet.
    let (o, text) = who(p_prev);
    assert!(!o.status.success(), "{text}");
    out += &text;

    moto.put_secret_string("db/rot", &creds_json(PW2));
    pg.set_password(PW2);
    std::thread::sleep(Duration::from_millis(1300));
    let before = moto.calls(GET);
    out += &expect_user(p_cur, "app_user", "after the rotation", &r.daemon);
    assert_eq!(moto.calls(GET), before + 1, "one fetch of the new version");
    out += &expect_user(p_prev, "old_user", "AWSPREVIOUS", &r.daemon);

    assert!(r.daemon.stop().success());
    let log = r.daemon.log_text();
    let prev = access_lines(&log, "previous");
    assert!(
        prev[0].contains("credentials_error")
            && prev[0].contains("aws: `db/rot?***#password` not found"),
        "{log}"
    );
    assert!(prev[1].contains("result=\"ok\""), "{log}");
    assert_no_secret(
        &format!("{out}{log}"),
        &[PW1, PW2, &moto.secret_access_key],
        "psql output and broker log",
    );
    drop(r.dir);
}

/// An instance with `profile:` reads the keys from `AWS_SHARED_CREDENTIALS_FILE` and the
/// region from the profile in `AWS_CONFIG_FILE`; `endpoint:` points it at moto.
#[test]
fn credentials_and_region_from_a_profile() {
    if !privileged() {
        return;
    }
    let moto = Moto::start();
    let pg = pg_server();
    let _ = moto.create_secret_string("db/app", &creds_json(PW1));
    let files = tempfile::tempdir().expect("tempdir");
    let creds = write_file(
        files.path(),
        "credentials",
        &format!(
            "[default]\naws_access_key_id = AKIANOTTHISONE\naws_secret_access_key = nope\n\n[broker-test]\naws_access_key_id = {}\naws_secret_access_key = {}\n",
            moto.access_key_id, moto.secret_access_key
        ),
    );
    let config = write_file(
        files.path(),
        "config",
        &format!("[default]\nregion = eu-west-3\n\n[profile broker-test]\nregion = {REGION}\n"),
    );
    let port = free_port();
    let mut r = start(
        &format!(
            "  store: {{type: aws, profile: broker-test, endpoint: \"{}\"}}\n",
            moto.endpoint()
        ),
        "",
        &service(
            "db",
            port,
            &pg,
            "{from: store, get: db/app#username}",
            "{from: store, get: db/app#password}",
        ),
        &[
            (
                "AWS_SHARED_CREDENTIALS_FILE",
                creds.to_str().expect("utf-8"),
            ),
            ("AWS_CONFIG_FILE", config.to_str().expect("utf-8")),
        ],
    );
    let out = expect_user(port, "app_user", "profile credentials", &r.daemon);
    assert!(r.daemon.stop().success());
    let log = r.daemon.log_text();
    assert_no_secret(
        &format!("{out}{log}"),
        &[PW1, &moto.secret_access_key],
        "psql output and broker log",
    );
    drop(r.dir);
}

/// The container endpoint (`AWS_CONTAINER_CREDENTIALS_FULL_URI` + its token) hands out
/// moto's temporary credentials valid 4 s: they are reused while fresh and fetched
/// again once half their lifetime is gone, and both sets sign requests moto accepts
/// (it checks the session token too).
#[test]
fn container_credentials_are_refreshed_before_they_expire() {
    if !privileged() {
        return;
    }
    let moto = Moto::start();
    let pg = pg_server();
    let _ = moto.create_secret_string("db/app", &creds_json(PW1));
    let temp = vec![moto.assume_role(), moto.assume_role()];
    let fake = FakeAws::start(
        temp.clone(),
        Duration::from_secs(4),
        CONTAINER_TOKEN,
        WEB_TOKEN,
        ROLE_ARN,
    );
    let port = free_port();
    let uri = format!("{}/creds", fake.url());
    let mut r = start(
        "",
        "  cacheTTL: 0s\n",
        &service(
            "db",
            port,
            &pg,
            "app_user",
            "{from: aws, get: db/app#password}",
        ),
        &[
            ("AWS_CONTAINER_CREDENTIALS_FULL_URI", &uri),
            ("AWS_CONTAINER_AUTHORIZATION_TOKEN", CONTAINER_TOKEN),
            ("AWS_REGION", REGION),
            ("AWS_ENDPOINT_URL", &moto.endpoint()),
        ],
    );
    let mut out = expect_user(port, "app_user", "first set", &r.daemon);
    out += &expect_user(port, "app_user", "first set, cached", &r.daemon);
    assert_eq!(fake.count("container"), 1, "credentials reused while fresh");
    std::thread::sleep(Duration::from_millis(2500));
    out += &expect_user(port, "app_user", "second set", &r.daemon);
    assert_eq!(
        fake.count("container"),
        2,
        "refreshed after half the lifetime"
    );
    assert_eq!(moto.calls("secretsmanager.GetSecretValue"), 3);
    assert!(r.daemon.stop().success());
    let log = r.daemon.log_text();
    let mut secrets = temp_secrets(&temp);
    secrets.extend([PW1, CONTAINER_TOKEN]);
    assert_no_secret(
        &format!("{out}{log}"),
        &secrets,
        "psql output and broker log",
    );
    drop(r.dir);
}

/// Web identity: `AWS_WEB_IDENTITY_TOKEN_FILE` + `AWS_ROLE_ARN` through STS
/// `AssumeRoleWithWebIdentity` (the fake's, at `AWS_ENDPOINT_URL_STS`); and instance
/// metadata (IMDSv2, the fake's, at `AWS_EC2_METADATA_SERVICE_ENDPOINT`) when nothing
/// else is set up. Both hand out moto's temporary credentials.
#[test]
fn web_identity_and_instance_metadata_credentials() {
    if !privileged() {
        return;
    }
    let moto = Moto::start();
    let pg = pg_server();
    let _ = moto.create_secret_string("db/app", &creds_json(PW1));
    let temp = vec![moto.assume_role()];
    let fake = FakeAws::start(
        temp.clone(),
        Duration::from_secs(3600),
        CONTAINER_TOKEN,
        WEB_TOKEN,
        ROLE_ARN,
    );
    let files = tempfile::tempdir().expect("tempdir");
    let token = write_file(files.path(), "token", &format!("{WEB_TOKEN}\n"));
    let svc = |port| {
        service(
            "db",
            port,
            &pg,
            "app_user",
            "{from: aws, get: db/app#password}",
        )
    };
    let sm = moto.endpoint();
    let sts = fake.url();
    let mut all = String::new();

    let port = free_port();
    let mut r = start(
        "",
        "",
        &svc(port),
        &[
            (
                "AWS_WEB_IDENTITY_TOKEN_FILE",
                token.to_str().expect("utf-8"),
            ),
            ("AWS_ROLE_ARN", ROLE_ARN),
            ("AWS_REGION", REGION),
            ("AWS_ENDPOINT_URL_SECRETS_MANAGER", &sm),
            ("AWS_ENDPOINT_URL_STS", &sts),
        ],
    );
    all += &expect_user(port, "app_user", "web identity", &r.daemon);
    assert_eq!(fake.count("sts"), 1);
    assert!(r.daemon.stop().success());
    all += &r.daemon.log_text();

    let port = free_port();
    let mut r = start(
        "",
        "",
        &svc(port),
        &[
            ("AWS_EC2_METADATA_DISABLED", "false"),
            ("AWS_EC2_METADATA_SERVICE_ENDPOINT", &sts),
            ("AWS_REGION", REGION),
            ("AWS_ENDPOINT_URL", &sm),
        ],
    );
    all += &expect_user(port, "app_user", "instance metadata", &r.daemon);
    assert_eq!(
        (
            fake.count("imds-token"),
            fake.count("imds-role"),
            fake.count("imds-creds")
        ),
        (1, 1, 1)
    );
    assert!(r.daemon.stop().success());
    all += &r.daemon.log_text();

    let mut secrets = temp_secrets(&temp);
    secrets.extend([PW1, WEB_TOKEN]);
    assert_no_secret(&all, &secrets, "psql output and broker logs");
    drop(r.dir);
}

/// A wrong secret access key (the right key id) is refused by moto's signature check:
/// the connection gets no session and the access line says "denied" with AWS's error
/// type; a secret that does not exist is "not found", naming the id; a service whose
/// secret exists is served meanwhile.
#[test]
fn a_wrong_key_is_denied_and_a_missing_secret_is_not_found() {
    if !privileged() {
        return;
    }
    let moto = Moto::start();
    let pg = pg_server();
    let _ = moto.create_secret_string("db/app", &creds_json(PW1));
    let (p_bad, p_gone, p_ok) = (free_port(), free_port(), free_port());
    let env = env_keys(&moto);
    let mut r = start(
        &format!(
            "  wrong: {{type: aws, region: {REGION}, endpoint: \"{}\", accessKeyId: {}, secretAccessKey: \"${{WRONG_KEY}}\"}}\n",
            moto.endpoint(),
            moto.access_key_id
        ),
        "",
        &(service(
            "bad",
            p_bad,
            &pg,
            "app_user",
            "{from: wrong, get: db/app#password}",
        ) + &service(
            "gone",
            p_gone,
            &pg,
            "app_user",
            "{from: aws, get: db/nope#password}",
        ) + &service(
            "ok",
            p_ok,
            &pg,
            "app_user",
            "{from: aws, get: db/app#password}",
        )),
        &[as_refs(&env), vec![("WRONG_KEY", WRONG_KEY)]].concat(),
    );
    let (o1, t1) = who(p_bad);
    let (o2, t2) = who(p_gone);
    assert!(!o1.status.success() && !o2.status.success(), "{t1}{t2}");
    let ok = expect_user(p_ok, "app_user", "canary", &r.daemon);
    assert!(r.daemon.stop().success());
    let log = r.daemon.log_text();
    let bad = access_lines(&log, "bad").concat();
    assert!(
        bad.contains("credentials_error")
            && bad.contains("wrong: fetching `db/app#password` was denied")
            && bad.contains("SignatureDoesNotMatch"),
        "{log}"
    );
    let gone = access_lines(&log, "gone").concat();
    assert!(
        gone.contains("credentials_error") && gone.contains("aws: `db/nope#password` not found"),
        "{log}"
    );
    assert_no_secret(
        &format!("{t1}{t2}{ok}{log}"),
        &[PW1, WRONG_KEY, &moto.secret_access_key],
        "psql output and broker log",
    );
    drop(r.dir);
}
