//! Attacks on the PostgreSQL connector from the credential and upstream side, each
//! performed for real against `broker run --no-ebpf` with `listenOn` services: hostile
//! fake servers (tests/src/hostile_pg.rs) that ask for a cleartext password, say
//! "trust", flood ParameterStatus, send a 1 GiB message or ask for 2^31 SCRAM
//! iterations; credentials holding a private key in `openssl pkcs12` form, multi-line
//! garbage or a bad sslmode. Each must fail closed with a clear FATAL, leak nothing (every
//! client reply, every fake server's received bytes and the daemon log are grepped for
//! the secrets), and leave the daemon serving a canary client through a real PostgreSQL.

use std::{
    net::{SocketAddr, TcpStream},
    path::Path,
    process::Command,
    time::{Duration, Instant},
};

use broker_tests::{
    Daemon, assert_no_secret, broker_check, free_port,
    hostile_pg::{
        Behaviour, HostilePg, RawReply, cpu_ticks, proc_status_kib, raw_connect, read_until_close,
        startup_message,
    },
    output_text,
    pg::{PgAuth, PgOptions, PgServer, psql},
    privileged, write_file,
};

const CANARY_PW: &str = "canary-pw-Hx81qLw";
const PW: &str = "hostile-target-pw-T4kq9Zr";

/// A `pg` service on `listenOn: tcp://127.0.0.1:<listen>` for the upstream at
/// `127.0.0.1:<up>`; `creds` adds credential lines (6 spaces), `config` a `config:`
/// block (4 spaces). The upstream is plain (`sslmode: disable`) unless `creds` sets one.
fn service(name: &str, listen: u16, up: u16, pw_file: &Path, creds: &str, config: &str) -> String {
    let plain = if creds.contains("sslmode:") {
        ""
    } else {
        "      sslmode: disable\n"
    };
    format!(
        "  {name}:\n    connector: pg\n    listenOn: tcp://127.0.0.1:{listen}\n    credentials:\n      host: 127.0.0.1\n      port: \"{up}\"\n      username: app_user\n      password: {{from: file, get: {}}}\n{plain}{creds}{config}",
        pw_file.display()
    )
}

/// A daemon, the real PostgreSQL behind its `canary` service, and the files.
struct Running {
    daemon: Daemon,
    canary_port: u16,
    _pg: PgServer,
    dir: tempfile::TempDir,
}

impl Running {
    fn pid(&self) -> u32 {
        self.daemon.child.id()
    }

    /// The canary: a real client through the broker to a real server.
    fn canary(&self) -> String {
        let out = psql(
            &format!(
                "host=127.0.0.1 port={} user=anything password=dummy dbname=app sslmode=disable",
                self.canary_port
            ),
            "select 'CANARY ' || current_user",
        );
        let text = output_text(&out);
        assert!(
            out.status.success() && text.contains("CANARY app_user"),
            "canary failed: {text}\n{}",
            self.daemon.log_text()
        );
        text
    }
}

/// Start a daemon with `services` (built by the closure from the temp dir and the
/// password file) plus a `canary` service to a real PostgreSQL.
fn start(services: impl FnOnce(&Path, &Path) -> String) -> Running {
    let pg = PgServer::start(PgOptions::new(PgAuth::Scram, CANARY_PW));
    let dir = tempfile::tempdir().expect("tempdir");
    let canary_pw = write_file(dir.path(), "canary-pw", CANARY_PW);
    let pw = write_file(dir.path(), "pw", PW);
    let canary_port = free_port();
    let mut all = services(dir.path(), &pw);
    all += &service("canary", canary_port, pg.port, &canary_pw, "", "");
    let health = free_port();
    let cfg = write_file(
        dir.path(),
        "broker.yaml",
        &format!("version: 2\nbroker:\n  health: 127.0.0.1:{health}\nservices:\n{all}"),
    );
    let health: SocketAddr = format!("127.0.0.1:{health}").parse().expect("addr");
    let daemon = Daemon::start(&cfg, &["--no-ebpf"], health, &dir.path().join("broker.log"));
    Running {
        daemon,
        canary_port,
        _pg: pg,
        dir,
    }
}

fn expect_error(reply: &RawReply, code: &str, needles: &[&str], what: &str) -> String {
    let (got_code, msg) = reply
        .error()
        .unwrap_or_else(|| panic!("{what}: no ErrorResponse in {:?}", reply.text()));
    assert_eq!(got_code, code, "{what}: {msg}");
    for n in needles {
        assert!(msg.contains(n), "{what}: expected {n:?} in {msg:?}");
    }
    msg
}

fn openssl(args: &[&str]) {
    let out = Command::new("openssl")
        .args(args)
        .output()
        .expect("run openssl");
    assert!(
        out.status.success(),
        "openssl {args:?}: {}",
        output_text(&out)
    );
}

/// (3) A private key in `openssl pkcs12 -nodes` form (Bag Attributes before the PEM
/// block), multi-line garbage, a missing path, a bad sslmode or require_auth: each is
/// refused naming the credential, and no value reaches the client or the log.
#[test]
fn pem_and_option_credentials_are_never_echoed() {
    if !privileged() {
        return;
    }
    let keys = tempfile::tempdir().expect("tempdir");
    let key = keys.path().join("key.pem");
    let cert = keys.path().join("cert.pem");
    let key_s = key.to_str().expect("utf-8");
    openssl(&[
        "genpkey",
        "-algorithm",
        "EC",
        "-pkeyopt",
        "ec_paramgen_curve:P-256",
        "-out",
        key_s,
    ]);
    openssl(&[
        "req",
        "-x509",
        "-new",
        "-key",
        key_s,
        "-subj",
        "/CN=hostile",
        "-days",
        "1",
        "-out",
        cert.to_str().expect("utf-8"),
    ]);
    let key_pem = std::fs::read_to_string(&key).expect("key");
    let cert_pem = std::fs::read_to_string(&cert).expect("cert");
    // The key's base64 lines are the secret.
    let key_lines: Vec<String> = key_pem
        .lines()
        .filter(|l| !l.starts_with("-----") && l.len() > 16)
        .map(str::to_owned)
        .collect();
    assert!(!key_lines.is_empty());
    let bag = "Bag Attributes\n    localKeyID: 5A 1B 2C 3D\nKey Attributes: <No Attributes>\n";
    let broken_key = "BROKEN-KEY-SECRET-Zq81";
    let no_marker = "NOMARKER-SECRET-Pq55";
    let path_secret = "PATH-SECRET-Lm20";
    let mode_secret = "MODE-SECRET-Vb61";
    let ra_secret = "RA-SECRET-Kd07";

    let fake = HostilePg::start(Behaviour::Md5);
    let ports: Vec<u16> = (0..6).map(|_| free_port()).collect();
    let b = start(|dir, pw| {
        let f = |name: &str, text: &str| write_file(dir, name, text).display().to_string();
        let p12_key = f("p12-key", &format!("{bag}{key_pem}"));
        let p12_cert = f(
            "p12-cert",
            &format!(
                "Bag Attributes\n    localKeyID: 5A 1B 2C 3D\nsubject=CN = hostile\n{cert_pem}"
            ),
        );
        let broken = f(
            "broken-key",
            &format!(
                "{bag}-----BEGIN PRIVATE KEY-----\n{broken_key}!!\n-----END PRIVATE KEY-----\n"
            ),
        );
        let garbage = f(
            "garbage",
            &format!("MIGHAgEAMBMGByqGSM49AgEGCCqGSM49AwEHBG0wawIBAQQg{no_marker}\nsecond line\n"),
        );
        let mode = f("mode", &format!("verify-full-{mode_secret}"));
        let cases = [
            format!(
                "      sslmode: require\n      sslcert: {{from: file, get: {p12_cert}}}\n      sslkey: {{from: file, get: {p12_key}}}\n"
            ),
            format!(
                "      sslmode: require\n      sslcert: {{from: file, get: {p12_cert}}}\n      sslkey: {{from: file, get: {broken}}}\n"
            ),
            format!("      sslmode: require\n      sslrootcert: {{from: file, get: {garbage}}}\n"),
            format!(
                "      sslmode: verify-ca\n      sslrootcert: /nonexistent/{path_secret}.pem\n"
            ),
            format!("      sslmode: {{from: file, get: {mode}}}\n"),
            format!("      require_auth: scram-{ra_secret}\n"),
        ];
        cases
            .iter()
            .zip(&ports)
            .enumerate()
            .map(|(i, (c, port))| service(&format!("pem{i}"), *port, fake.port, pw, c, ""))
            .collect()
    });
    let mut secrets: Vec<&str> = key_lines.iter().map(String::as_str).collect();
    secrets.extend([
        PW,
        broken_key,
        no_marker,
        path_secret,
        mode_secret,
        ra_secret,
    ]);

    let expected: [(&str, &[&str]); 6] = [
        // A pkcs12-style key is PEM: the TLS set-up goes on, and fails only because
        // this server has no TLS.
        ("08006", &["does not support TLS"]),
        ("08004", &["credential `sslkey`", "not valid PEM"]),
        (
            "08004",
            &["credential `sslrootcert` is neither a file path nor PEM text"],
        ),
        ("08004", &["credential `sslrootcert`: file not found"]),
        ("08004", &["credential `sslmode` has an unsupported value"]),
        (
            "08004",
            &["credential `require_auth` has an unsupported value"],
        ),
    ];
    let mut all = String::new();
    for (i, ((code, needles), port)) in expected.iter().zip(&ports).enumerate() {
        let reply = raw_connect(*port);
        let msg = expect_error(&reply, code, needles, &format!("pem{i}"));
        eprintln!("pem{i}: {code} {msg}");
        all += &reply.text();
    }
    assert_no_secret(&all, &secrets, "client replies");
    // Nothing derived from the password reached the upstream either.
    assert!(
        fake.received().is_empty(),
        "the broker sent the upstream something after its startup"
    );
    all += &b.canary();
    assert_no_secret(&all, &secrets, "client replies");
    assert_no_secret(&b.daemon.log_text(), &secrets, "daemon log");
    let _ = &b.dir;
}

/// (4) A process holding the upstream's address asks for a cleartext password, says
/// "trust", or asks for md5 when the service requires SCRAM: the broker answers none of
/// them, tells the client which setting refused it, and sends the squatter nothing after
/// the startup. A CIDR intercept without an explicit upstream does not load.
#[test]
fn squatters_get_no_password_and_no_session() {
    if !privileged() {
        return;
    }
    let clear = HostilePg::start(Behaviour::Cleartext);
    let trust = HostilePg::start(Behaviour::Trust);
    let md5 = HostilePg::start(Behaviour::Md5);
    let ports: Vec<u16> = (0..3).map(|_| free_port()).collect();
    let b = start(|_, pw| {
        service("clear-default", ports[0], clear.port, pw, "", "")
            + &service("trust-default", ports[1], trust.port, pw, "", "")
            + &service(
                "md5-scram-only",
                ports[2],
                md5.port,
                pw,
                "",
                "    config:\n      requireAuth: [scram-sha-256]\n",
            )
    });
    let mut all = String::new();
    let cases: [(&HostilePg, &[&str]); 3] = [
        (
            &clear,
            &[
                "service `clear-default`",
                "cleartext password",
                "requireAuth",
            ],
        ),
        (
            &trust,
            &[
                "service `trust-default`",
                "without any authentication (trust)",
                "`none`",
            ],
        ),
        (
            &md5,
            &[
                "service `md5-scram-only`",
                "md5 authentication",
                "`requireAuth` allows only scram-sha-256",
            ],
        ),
    ];
    for ((fake, needles), port) in cases.iter().zip(&ports) {
        let reply = raw_connect(*port);
        let msg = expect_error(&reply, "08004", needles, &format!("{:?}", fake.behaviour));
        eprintln!("{:?}: {msg} ({:?})", fake.behaviour, reply.elapsed);
        assert!(
            reply.elapsed < Duration::from_secs(5),
            "{:?}",
            reply.elapsed
        );
        assert_eq!(fake.connections(), 1);
        // After its startup the squatter received nothing: no password message, no md5
        // hash, no query.
        let got = fake.received();
        assert!(got.is_empty(), "{:?} received {got:?}", fake.behaviour);
        all += &reply.text();
    }
    all += &b.canary();
    assert_no_secret(&all, &[PW, CANARY_PW], "client replies");
    assert_no_secret(&b.daemon.log_text(), &[PW, CANARY_PW], "daemon log");

    // A CIDR intercept with neither `host` nor `upstreamAllow`: refused at load.
    let cidr = "version: 2\nservices:\n  db:\n    connector: pg\n    intercept: [\"10.0.0.0/8:5432\"]\n    credentials:\n      username: app\n      password: pw\n";
    let f = write_file(b.dir.path(), "cidr.yaml", cidr);
    let out = broker_check(&f, &[]);
    let text = output_text(&out);
    assert_eq!(out.status.code(), Some(78), "{text}");
    assert!(
        text.contains("services.db.intercept") && text.contains("upstreamAllow"),
        "{text}"
    );
    let f = write_file(
        b.dir.path(),
        "cidr-allow.yaml",
        &format!("{cidr}    config:\n      upstreamAllow: [10.1.0.0/16]\n"),
    );
    let out = broker_check(&f, &[]);
    assert_eq!(out.status.code(), Some(0), "{}", output_text(&out));
}

/// (5) ParameterStatus floods after AuthenticationOk (4 connections at once, each
/// offering 1.5 GiB) and a single 1 GiB message: each connection is closed with a FATAL
/// 08P01 at the 1 MiB cap, the daemon's peak RSS stays far below 200 MiB, and a client
/// that never sends its startup packet is dropped after ~10 s.
#[test]
fn session_start_floods_are_capped_and_memory_stays_bounded() {
    if !privileged() {
        return;
    }
    let flood = HostilePg::start(Behaviour::FloodParams {
        max_bytes: 1536 << 20,
    });
    let huge = HostilePg::start(Behaviour::HugeMessage { len: 1 << 30 });
    let (p_flood, p_huge) = (free_port(), free_port());
    let b = start(|_, pw| {
        service("flood", p_flood, flood.port, pw, "", "")
            + &service("huge", p_huge, huge.port, pw, "", "")
    });
    let pid = b.pid();
    let rss_before = proc_status_kib(pid, "VmRSS");

    // A client that connects and stays silent, measured in parallel.
    let silent = std::thread::spawn(move || {
        let started = Instant::now();
        let mut s = TcpStream::connect(("127.0.0.1", p_flood)).expect("connect");
        let got = read_until_close(&mut s, Duration::from_secs(20));
        (started.elapsed(), got)
    });

    let floods: Vec<_> = (0..4)
        .map(|_| std::thread::spawn(move || raw_connect(p_flood)))
        .chain(std::iter::once(std::thread::spawn(move || {
            raw_connect(p_huge)
        })))
        .collect();
    let replies: Vec<RawReply> = floods
        .into_iter()
        .map(|t| t.join().expect("client thread"))
        .collect();
    let mut all = String::new();
    for (i, r) in replies.iter().enumerate() {
        let needle = if i < 4 {
            "more than 1048576 bytes of session-start messages"
        } else {
            "larger than the 1048576-byte limit"
        };
        let msg = expect_error(r, "08P01", &[needle], &format!("flood {i}"));
        eprintln!("flood {i}: {msg} after {:?}", r.elapsed);
        assert!(r.elapsed < Duration::from_secs(5), "{:?}", r.elapsed);
        all += &r.text();
    }
    let hwm = proc_status_kib(pid, "VmHWM");
    let rss = proc_status_kib(pid, "VmRSS");
    eprintln!(
        "daemon RSS before {rss_before} KiB, after {rss} KiB, peak {hwm} KiB; the flood server \
         wrote {} bytes in total ({} connections), the huge one {} bytes",
        flood.flood_bytes_sent(),
        flood.connections(),
        huge.flood_bytes_sent()
    );
    assert!(hwm < 200 * 1024, "peak RSS {hwm} KiB");
    assert!(rss < 100 * 1024, "RSS {rss} KiB");

    let (waited, got) = silent.join().expect("silent thread");
    eprintln!("silent client dropped after {waited:?}");
    assert!(
        waited >= Duration::from_secs(9) && waited < Duration::from_secs(14),
        "{waited:?}"
    );
    assert!(got.is_empty(), "{got:?}");

    all += &b.canary();
    let log = b.daemon.log_text();
    assert!(
        log.contains("more than 1048576 bytes") && log.contains("protocol_error"),
        "the access log says why:\n{log}"
    );
    assert!(log.contains("no startup packet within 10s"), "{log}");
    assert_no_secret(&all, &[PW, CANARY_PW], "client replies");
    assert_no_secret(&log, &[PW, CANARY_PW], "daemon log");
}

/// (SCRAM) 2^31 iterations are refused before any PBKDF2 (and nothing derived from the
/// password is sent); connections at the cap do not stall a canary; a computation whose
/// client hangs up stops; shutdown is not held by one.
#[test]
fn scram_iterations_are_capped_and_the_computation_ends_with_its_connection() {
    if !privileged() {
        return;
    }
    let over = HostilePg::start(Behaviour::Scram {
        iterations: 2_147_483_647,
    });
    let at_cap = HostilePg::start(Behaviour::Scram {
        iterations: 100_000,
    });
    let endless = HostilePg::start(Behaviour::Scram {
        iterations: 4_000_000_000,
    });
    let (p_over, p_at, p_endless) = (free_port(), free_port(), free_port());
    let mut b = start(|_, pw| {
        service("scram-over", p_over, over.port, pw, "", "")
            + &service("scram-at-cap", p_at, at_cap.port, pw, "", "")
            + &service(
                "scram-endless",
                p_endless,
                endless.port,
                pw,
                "",
                "    config:\n      scramMaxIterations: 4294967295\n",
            )
    });
    let pid = b.pid();
    let mut all = String::new();

    // Above the cap: refused at once, no client-final (proof) sent.
    let r = raw_connect(p_over);
    let msg = expect_error(
        &r,
        "08004",
        &["2147483647 SCRAM iterations", "scramMaxIterations"],
        "over the cap",
    );
    eprintln!("over the cap: {msg} after {:?}", r.elapsed);
    assert!(r.elapsed < Duration::from_secs(2), "{:?}", r.elapsed);
    let got = String::from_utf8_lossy(&over.received()).into_owned();
    assert!(
        got.contains("SCRAM-SHA-256") && !got.contains("c=biws"),
        "{got}"
    );
    all += &r.text();

    // At the cap (100 000, the default), three at once: a canary is not held up.
    let at: Vec<_> = (0..3)
        .map(|_| std::thread::spawn(move || raw_connect(p_at)))
        .collect();
    std::thread::sleep(Duration::from_millis(100));
    let t = Instant::now();
    all += &b.canary();
    let canary_took = t.elapsed();
    for h in at {
        let r = h.join().expect("client thread");
        // The fake server cannot verify the proof: its 28P01 reaches the client.
        let msg = expect_error(&r, "28P01", &["hostile server"], "at the cap");
        eprintln!("at the cap: {msg} after {:?}", r.elapsed);
        all += &r.text();
    }
    eprintln!("canary during three at-cap computations: {canary_took:?}");
    assert!(canary_took < Duration::from_secs(10), "{canary_took:?}");
    let got = String::from_utf8_lossy(&at_cap.received()).into_owned();
    assert_eq!(got.matches("c=biws").count(), 3, "three proofs computed");

    // 4e9 iterations (the service allows it): the client hangs up, the work stops.
    let hang_up = {
        let mut s = TcpStream::connect(("127.0.0.1", p_endless)).expect("connect");
        std::io::Write::write_all(&mut s, &startup_message("anything", "app")).expect("send");
        s
    };
    let deadline = Instant::now() + Duration::from_secs(10);
    while !String::from_utf8_lossy(&endless.received()).contains("SCRAM-SHA-256")
        && Instant::now() < deadline
    {
        std::thread::sleep(Duration::from_millis(50));
    }
    std::thread::sleep(Duration::from_millis(300));
    // 2 s each way: on a loaded machine (a CI neighbour) one hashing thread may get
    // well under a core, so the comparison is relative as well as absolute.
    let c0 = cpu_ticks(pid);
    std::thread::sleep(Duration::from_secs(2));
    let busy = cpu_ticks(pid) - c0;
    drop(hang_up);
    std::thread::sleep(Duration::from_millis(500));
    let c1 = cpu_ticks(pid);
    std::thread::sleep(Duration::from_secs(2));
    let idle = cpu_ticks(pid) - c1;
    eprintln!(
        "daemon CPU: {busy} ticks in 2 s while hashing, {idle} ticks in 2 s after the hang-up"
    );
    assert!(busy >= 20, "the computation was not running ({busy} ticks)");
    assert!(
        idle < 30 && idle * 2 < busy,
        "the computation went on after the hang-up ({idle} ticks, {busy} while hashing)"
    );

    all += &b.canary();
    assert_no_secret(&all, &[PW, CANARY_PW], "client replies");
    assert_no_secret(&b.daemon.log_text(), &[PW, CANARY_PW], "daemon log");

    // A computation still running at shutdown does not hold the daemon: the drain
    // deadline ends the connection, and with it the computation.
    let _held = {
        let mut s = TcpStream::connect(("127.0.0.1", p_endless)).expect("connect");
        std::io::Write::write_all(&mut s, &startup_message("anything", "app")).expect("send");
        s
    };
    std::thread::sleep(Duration::from_secs(1));
    let t = Instant::now();
    let status = b.daemon.stop();
    eprintln!(
        "shutdown with a computation running took {:?} ({status})",
        t.elapsed()
    );
    assert!(t.elapsed() < Duration::from_secs(15));
}
