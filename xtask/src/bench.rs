//! `cargo xtask bench pg`: pgbench select-only, persistent connections and a new
//! connection per transaction (`-C`), each direct, through haproxy (TCP relay),
//! pgbouncer (session and transaction pooling, clients trusted: its best case), the
//! broker with `reuse: session`, and through the broker (release build, eBPF-intercepted; once as configured by default,
//! sessions spliced in the kernel after auth, once with `splice: false`, relaying in
//! userspace), in one run; TPS and
//! the ratio to direct (median of `BENCH_ROUNDS` interleaved rounds, default 3). Then
//! the broker's resident memory idle and per idle brokered connection.
//!
//! Direct and haproxy runs authenticate with the password (SCRAM in the client, as an
//! application would today); broker runs carry no password at all.

use std::{
    net::SocketAddr,
    path::Path,
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};
use broker_tests::{
    free_port, http_get,
    net::TestCgroup,
    pg::{PgAuth, PgOptions, PgServer},
};

use crate::report::Row;

pub(crate) struct Killed(pub(crate) Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn pgbench(
    args: &[&str],
    host: &str,
    port: u16,
    password: Option<&str>,
    cg: Option<&TestCgroup>,
    sslmode: &str,
) -> anyhow::Result<f64> {
    let mut c = Command::new("pgbench");
    c.args(["-h", host, "-p", &port.to_string(), "-U", "app_user", "-n"])
        .args(args)
        .arg("app")
        .env_remove("PGPASSWORD")
        .env("PGSSLMODE", sslmode)
        .stdin(Stdio::null());
    if let Some(p) = password {
        c.env("PGPASSWORD", p);
    }
    if let Some(cg) = cg {
        cg.enter(&mut c);
    }
    let out = c.output().context("running pgbench")?;
    let text =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    if !out.status.success() {
        bail!("pgbench {args:?} via {host}:{port} failed:\n{text}");
    }
    if let Some(failed) = text
        .lines()
        .find_map(|l| l.strip_prefix("number of failed transactions: "))
        && !failed.starts_with('0')
    {
        bail!("pgbench reported failed transactions: {failed}");
    }
    text.lines()
        .find_map(|l| l.strip_prefix("tps = "))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .with_context(|| format!("no tps in pgbench output:\n{text}"))
}

/// haproxy relaying TCP from 127.0.0.1:`port` to `backend`, its configuration in `dir`;
/// killed when dropped.
pub(crate) fn tcp_haproxy(dir: &Path, port: u16, backend: &str) -> anyhow::Result<Killed> {
    let cfg = dir.join(format!("haproxy-{port}.cfg"));
    std::fs::write(
        &cfg,
        format!(
            "global\n  maxconn 4096\ndefaults\n  mode tcp\n  timeout connect 5s\n  timeout client 60s\n  timeout server 60s\nlisten relay\n  bind 127.0.0.1:{port}\n  server backend {backend}\n"
        ),
    )?;
    Ok(Killed(
        Command::new("haproxy")
            .arg("-db")
            .arg("-f")
            .arg(&cfg)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context("starting haproxy")?,
    ))
}

/// pgbouncer on `port` in `mode` (`session` or `transaction`), clients trusted (its
/// cheapest client side), the server reached with the password. Runs as `nobody` (it
/// refuses root); its files are in a directory of its own.
pub(crate) fn pgbouncer(
    dir: &Path,
    port: u16,
    pg_port: u16,
    password: &str,
    mode: &str,
) -> anyhow::Result<Killed> {
    use std::os::unix::fs::PermissionsExt as _;
    let d = dir.join(format!("pgbouncer-{port}"));
    std::fs::create_dir_all(&d)?;
    std::fs::set_permissions(&d, std::fs::Permissions::from_mode(0o777))?;
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o755))?;
    let users = d.join("users.txt");
    std::fs::write(&users, "\"app_user\" \"\"\n")?;
    let ini = d.join("pgbouncer.ini");
    std::fs::write(
        &ini,
        format!(
            "[databases]\napp = host=127.0.0.1 port={pg_port} dbname=app user=app_user password={password}\n\
             [pgbouncer]\nlisten_addr = 127.0.0.1\nlisten_port = {port}\nunix_socket_dir =\n\
             auth_type = trust\nauth_file = {}\npool_mode = {mode}\nmax_client_conn = 1000\n\
             default_pool_size = 8\nlogfile = {}\nlog_connections = 0\nlog_disconnections = 0\n",
            users.display(),
            d.join("pgbouncer.log").display()
        ),
    )?;
    for f in [&users, &ini] {
        std::fs::set_permissions(f, std::fs::Permissions::from_mode(0o644))?;
    }
    let child = Killed(
        Command::new("pgbouncer")
            .arg("-u")
            .arg("nobody")
            .arg(&ini)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context("starting pgbouncer")?,
    );
    broker_tests::wait_port(
        format!("127.0.0.1:{port}").parse()?,
        Duration::from_secs(10),
    );
    Ok(child)
}

pub(crate) fn median(v: &[f64]) -> f64 {
    let mut s = v.to_vec();
    s.sort_by(f64::total_cmp);
    let n = s.len();
    if n % 2 == 1 {
        s[n / 2]
    } else {
        f64::midpoint(s[n / 2 - 1], s[n / 2])
    }
}

pub(crate) fn rss_kib(pid: u32) -> anyhow::Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .context("no VmRSS")
}

/// Hold `n` idle brokered connections open (python3 + psycopg2, in the cgroup) until
/// the returned child is killed; waits until all are established.
fn idle_connections(n: usize, port: u16, cg: &TestCgroup) -> anyhow::Result<Killed> {
    let script = format!(
        "import psycopg2, sys, time\nconns = [psycopg2.connect(host='127.0.0.2', port={port}, user='app_user', dbname='app', sslmode='disable') for _ in range({n})]\nprint('ready', flush=True)\ntime.sleep(60)\n"
    );
    let mut c = Command::new("/usr/bin/python3");
    c.arg("-c")
        .arg(script)
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit());
    cg.enter(&mut c);
    let mut child = c.spawn().context("starting python3")?;
    let mut out = child.stdout.take().context("stdout")?;
    let mut buf = [0u8; 6];
    std::io::Read::read_exact(&mut out, &mut buf).context("idle connections did not come up")?;
    Ok(Killed(child))
}

/// The paths of `pg`, in the table's column order; the first is the baseline.
const PG_PATHS: [&str; 8] = [
    "direct",
    "haproxy",
    "broker",
    "broker, splice: false",
    "broker, clientTLS",
    "pgbouncer session",
    "pgbouncer transaction",
    "broker, reuse: session",
];

/// The rows of one workload: `runs[0]` is the baseline (direct), each other path is
/// compared with it round by round.
pub(crate) fn rows(
    workload: &str,
    paths: &[&str],
    runs: &[Vec<f64>],
    unit: &'static str,
) -> Vec<Row> {
    let mut out = vec![Row::baseline(workload, paths[0], median(&runs[0]), unit)];
    for (path, r) in paths.iter().zip(runs).skip(1) {
        out.push(Row::compared(workload, path, r, &runs[0], unit));
    }
    out
}

/// The targets for the pgbench rows.
fn pg_target(mode: &str, path: &str) -> Option<&'static str> {
    match (mode.starts_with("persistent"), path) {
        (true, "broker") => Some(">= 0.95x"),
        (false, "broker") => Some(">= 2.5x"),
        (false, "broker, reuse: session") => Some(">= 20x and > pgbouncer transaction"),
        _ => None,
    }
}

pub fn pg(root: &Path, seconds: u32) -> anyhow::Result<Vec<Row>> {
    if !broker_tests::pg::available() {
        bail!("the benchmark needs root and PostgreSQL 15");
    }
    let password = "bench-password-4f1d";
    let pg = PgServer::start(PgOptions::new(PgAuth::Scram, password));
    let pg_port = pg.addr().port();
    let init = Command::new("pgbench")
        .args([
            "-i",
            "-q",
            "-s",
            "1",
            "-h",
            "127.0.0.1",
            "-p",
            &pg_port.to_string(),
            "-U",
            "app_user",
            "app",
        ])
        .env("PGPASSWORD", password)
        .output()?;
    if !init.status.success() {
        bail!(
            "pgbench -i failed: {}",
            String::from_utf8_lossy(&init.stderr)
        );
    }

    let dir = tempfile::tempdir()?;
    // haproxy: a plain TCP relay.
    let ha_port = free_port();
    let _haproxy = tcp_haproxy(dir.path(), ha_port, &format!("127.0.0.1:{pg_port}"))?;

    // The broker twice, release build, each intercepting its own address for its own
    // child cgroup: the default (sessions spliced in the kernel after auth) and with
    // `splice: false` (userspace relay), both measured in the same run.
    let pw_file = dir.path().join("pw");
    std::fs::write(&pw_file, password)?;
    let cg = TestCgroup::new("bench");
    let broker = start_broker(root, dir.path(), "127.0.0.2", "", pg_port, &pw_file, &cg)?;
    // And a third with TLS on the app's leg (`clientTLS`, pgbench `sslmode=require`):
    // what terminating the client's TLS costs.
    let cg_tls = TestCgroup::new("bench-clienttls");
    let client_tls = start_broker(
        root,
        dir.path(),
        "127.0.0.4",
        &format!(
            "  caDir: {}\n__SERVICE__    config:\n      clientTLS: on\n",
            dir.path().join("ca").display()
        ),
        pg_port,
        &pw_file,
        &cg_tls,
    )?;
    // pgbouncer in both pool modes, and the broker with `reuse: session`.
    let (pgb_session_port, pgb_txn_port) = (free_port(), free_port());
    let pgb_session = pgbouncer(dir.path(), pgb_session_port, pg_port, password, "session")?;
    let pgb_txn = pgbouncer(dir.path(), pgb_txn_port, pg_port, password, "transaction")?;
    let cg_reuse = TestCgroup::new("bench-reuse");
    let reuse = start_broker(
        root,
        dir.path(),
        "127.0.0.5",
        "__SERVICE__    config:\n      reuse: session\n      reuseMax: 8\n",
        pg_port,
        &pw_file,
        &cg_reuse,
    )?;
    let cg_relay = TestCgroup::new("bench-relay");
    let relay = start_broker(
        root,
        dir.path(),
        "127.0.0.3",
        "  splice: false\n",
        pg_port,
        &pw_file,
        &cg_relay,
    )?;
    broker_tests::wait_port(
        format!("127.0.0.1:{ha_port}").parse()?,
        Duration::from_secs(10),
    );
    let fresh = rss_kib(broker.0.id())?;

    let t = seconds.to_string();
    let modes: [(&str, Vec<&str>); 2] = [
        (
            "persistent (-S -c 8)",
            vec!["-S", "-c", "8", "-j", "2", "-T", &t],
        ),
        (
            "new conn/txn (-S -C -c 8)",
            vec!["-S", "-C", "-c", "8", "-j", "2", "-T", &t],
        ),
    ];
    // Each round runs every path once, back to back, so slow drifts of this shared
    // machine hit all paths alike; the table shows the median of the rounds and the
    // ratio of medians, with the range of the per-round ratios.
    let rounds = crate::report::rounds();
    let mut out = Vec::new();
    println!(
        "\npgbench select-only, scale 1, {seconds}s per run, {rounds} rounds (median; per-round ratio range), 2 cores\n"
    );
    println!(
        "| mode | direct tps | haproxy | broker | broker, splice: false | broker, clientTLS | pgbouncer session | pgbouncer transaction | broker, reuse: session |\n|---|---|---|---|---|---|---|---|---|"
    );
    let only = std::env::var("BENCH_ONLY").ok();
    for (name, args) in modes
        .iter()
        .filter(|(n, _)| only.as_deref().is_none_or(|o| n.starts_with(o)))
    {
        let mut runs: [Vec<f64>; 8] = Default::default();
        for _ in 0..rounds {
            let off = "disable";
            runs[0].push(pgbench(
                args,
                "127.0.0.1",
                pg_port,
                Some(password),
                None,
                off,
            )?);
            runs[1].push(pgbench(
                args,
                "127.0.0.1",
                ha_port,
                Some(password),
                None,
                off,
            )?);
            runs[2].push(pgbench(args, "127.0.0.2", 5432, None, Some(&cg), off)?);
            runs[3].push(pgbench(
                args,
                "127.0.0.3",
                5432,
                None,
                Some(&cg_relay),
                off,
            )?);
            runs[4].push(pgbench(
                args,
                "127.0.0.4",
                5432,
                None,
                Some(&cg_tls),
                "require",
            )?);
            runs[5].push(pgbench(
                args,
                "127.0.0.1",
                pgb_session_port,
                None,
                None,
                off,
            )?);
            runs[6].push(pgbench(args, "127.0.0.1", pgb_txn_port, None, None, off)?);
            runs[7].push(pgbench(
                args,
                "127.0.0.5",
                5432,
                None,
                Some(&cg_reuse),
                off,
            )?);
        }
        let direct = median(&runs[0]);
        let cell = |i: usize| crate::report::cell(&runs[i], &runs[0], 1.0, "");
        println!(
            "| {name} | {direct:.0} | {} | {} | {} | {} | {} | {} | {} |",
            cell(1),
            cell(2),
            cell(3),
            cell(4),
            cell(5),
            cell(6),
            cell(7)
        );
        // `persistent (-S -c 8)` -> `PG persistent (pgbench -S -c 8)`
        let workload = format!("PG {}", name.replacen('(', "(pgbench ", 1));
        for mut row in rows(&workload, &PG_PATHS, &runs, "tps") {
            if let Some(t) = pg_target(name, &row.path) {
                row = row.target(t);
            }
            out.push(row);
        }
    }

    // The pools hold server backends: let them go before the idle connections below.
    drop((pgb_session, pgb_txn, reuse));
    let pid = broker.0.id();
    // The daemon returns a burst's heap to the OS within 5 s of going idle.
    std::thread::sleep(Duration::from_secs(6));
    let idle = rss_kib(pid)?;
    let n = 25;
    let held = idle_connections(n, 5432, &cg)?;
    std::thread::sleep(Duration::from_millis(500));
    let with = rss_kib(pid)?;
    drop(held);
    println!(
        "\nbroker RSS: {:.1} MiB idle after start",
        fresh as f64 / 1024.0
    );
    println!(
        "broker RSS: {:.1} MiB idle after the runs; {:.1} MiB with {n} idle brokered connections: {:.1} KiB per idle connection",
        idle as f64 / 1024.0,
        with as f64 / 1024.0,
        with.saturating_sub(idle) as f64 / n as f64
    );
    drop(broker);
    drop(relay);
    drop(client_tls);
    Ok(out)
}

/// Start a release broker intercepting `target:5432` for `cg`; waits until ready.
/// `broker_extra`: lines of the `broker:` block; a `__SERVICE__` line in it ends them,
/// what follows goes under the service.
pub(crate) fn start_broker(
    root: &Path,
    dir: &Path,
    target: &str,
    broker_extra: &str,
    pg_port: u16,
    pw_file: &Path,
    cg: &TestCgroup,
) -> anyhow::Result<Killed> {
    let health = free_port();
    let (broker_extra, service_extra) = broker_extra
        .split_once("__SERVICE__")
        .unwrap_or((broker_extra, ""));
    let cfg = dir.join(format!("broker-{target}.yaml"));
    std::fs::write(
        &cfg,
        format!(
            "version: 2\nbroker:\n  health: 127.0.0.1:{health}\n{broker_extra}services:\n  db:\n    connector: pg\n    intercept: [\"{target}:5432\"]\n    credentials:\n      host: 127.0.0.1\n      port: \"{pg_port}\"\n      sslmode: disable\n      username: app_user\n      password: {{from: file, get: {}}}\n{service_extra}",
            pw_file.display()
        ),
    )?;
    release_broker(root, &cfg, cg, health, target)
}

/// Start the release broker on configuration file `cfg` for cgroup `cg`
/// (`BENCH_BROKER_THREADS` sets its worker threads); waits until its health endpoint on
/// 127.0.0.1:`health` says ready, failing at once if it exits. `tag` names it in errors.
pub(crate) fn release_broker(
    root: &Path,
    cfg: &Path,
    cg: &TestCgroup,
    health: u16,
    tag: &str,
) -> anyhow::Result<Killed> {
    let mut broker = Killed(
        Command::new(root.join("target/release/broker"))
            .args(["--log-level", "warn", "run", "-f"])
            .arg(cfg)
            .arg("--cgroup")
            .arg(&cg.path)
            .envs(
                std::env::var("BENCH_BROKER_THREADS")
                    .ok()
                    .map(|t| ("TOKIO_WORKER_THREADS", t)),
            )
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .context("starting broker")?,
    );
    let health_addr: SocketAddr = format!("127.0.0.1:{health}").parse()?;
    let deadline = Instant::now() + Duration::from_secs(20);
    while !matches!(http_get(health_addr, "/ready"), Some((200, _))) {
        if let Some(st) = broker.0.try_wait()? {
            bail!("broker ({tag}) exited: {st}");
        }
        if Instant::now() > deadline {
            bail!("broker ({tag}) not ready");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    Ok(broker)
}
