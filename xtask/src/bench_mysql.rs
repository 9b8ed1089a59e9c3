//! `cargo xtask bench mysql`: `mysqlslap` point selects against a real MariaDB
//! (tests/src/mariadb.rs), on persistent connections and with a new connection per
//! query (`--detach=1`), each direct, through haproxy (TCP relay) and through the broker
//! (release build, eBPF-intercepted in a test cgroup: the app dials `127.0.0.2:3306` as
//! `anything` with no password; the session is spliced in the kernel after the login),
//! in one run: queries per second, the ratio to direct (median of `BENCH_ROUNDS`
//! interleaved rounds, default 3), then the broker's idle RSS.
//!
//! Direct and haproxy runs authenticate with the password (`mysql_native_password` in
//! the client); broker runs carry none.

use std::{
    path::Path,
    process::{Command, Stdio},
    time::Duration,
};

use anyhow::{Context as _, bail};
use broker_tests::{
    free_port,
    mariadb::{DATABASE, MariaDb, MariaDbOptions, NATIVE_USER},
    net::TestCgroup,
};

use crate::{
    bench::{median, rss_kib, tcp_haproxy},
    report::Row,
};

/// Queries per second of one `mysqlslap` run.
fn mysqlslap(
    host: &str,
    port: u16,
    user: &str,
    password: Option<&str>,
    queries: u32,
    detach: bool,
    cg: Option<&TestCgroup>,
) -> anyhow::Result<f64> {
    let mut c = Command::new("timeout");
    c.args(["300", "mysqlslap", "--no-defaults", "--skip-ssl"])
        .args(["-h", host, "-P", &port.to_string(), "-u", user])
        .args([
            "--concurrency=8",
            "--iterations=1",
            &format!("--number-of-queries={queries}"),
            &format!("--create-schema={DATABASE}"),
            "--query=SELECT v FROM bench WHERE id = 42",
        ])
        .stdin(Stdio::null());
    if let Some(p) = password {
        c.arg(format!("--password={p}"));
    }
    if detach {
        c.arg("--detach=1");
    }
    if let Some(cg) = cg {
        cg.enter(&mut c);
    }
    let out = c.output().context("running mysqlslap")?;
    let text =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    if !out.status.success() {
        bail!("mysqlslap via {host}:{port} failed:\n{text}");
    }
    let secs: f64 = text
        .lines()
        .find_map(|l| {
            l.trim()
                .strip_prefix("Average number of seconds to run all queries:")
        })
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .with_context(|| format!("no timing in mysqlslap output:\n{text}"))?;
    if secs <= 0.0 {
        bail!("mysqlslap ran too fast to time ({secs} s): raise the query count");
    }
    Ok(f64::from(queries) / secs)
}

pub fn run(root: &Path, seconds: u32) -> anyhow::Result<Vec<Row>> {
    if !broker_tests::mariadb::available() {
        bail!("the benchmark needs root and MariaDB (cargo xtask setup installs it)");
    }
    let password = "bench-mysql-pass-7c2e";
    let db = MariaDb::start(MariaDbOptions::new(
        password,
        "bench-ed-3b1f",
        "bench-tls-9d04",
    ));
    db.admin_sql(&format!(
        "USE {DATABASE}; CREATE TABLE bench (id INT PRIMARY KEY, v VARCHAR(64)); \
         INSERT INTO bench SELECT seq, CONCAT('row-', seq) FROM seq_1_to_1000;"
    ));
    let db_port = db.port;
    let dir = tempfile::tempdir()?;

    let ha_port = free_port();
    let _haproxy = tcp_haproxy(dir.path(), ha_port, &format!("{}:{db_port}", db.ip))?;

    let pw_file = dir.path().join("pw");
    std::fs::write(&pw_file, password)?;
    let cg = TestCgroup::new("bench-mysql");
    let health = free_port();
    let cfg = dir.path().join("broker.yaml");
    std::fs::write(
        &cfg,
        format!(
            "version: 2\nbroker:\n  health: 127.0.0.1:{health}\n  caDir: {ca}\nservices:\n  db:\n    connector: mysql\n    intercept: [\"127.0.0.2:3306\"]\n    credentials:\n      host: {ip}\n      port: \"{db_port}\"\n      sslmode: disable\n      username: {NATIVE_USER}\n      password: {{from: file, get: {pw}}}\n    config:\n      clientTLS: refuse\n",
            ca = dir.path().join("ca").display(),
            ip = db.ip,
            pw = pw_file.display(),
        ),
    )?;
    let broker = crate::bench::release_broker(root, &cfg, &cg, health, "mysql")?;
    broker_tests::wait_port(
        format!("127.0.0.1:{ha_port}").parse()?,
        Duration::from_secs(10),
    );
    let fresh = rss_kib(broker.0.id())?;

    let rounds = crate::report::rounds();
    let mut out = Vec::new();
    // Query counts sized for about `seconds` per run on our 2-core machines.
    let s = seconds.max(1);
    let modes = [
        ("persistent (-c 8)", 8_000 * s, false),
        ("new conn/query (-c 8 --detach=1)", 600 * s, true),
    ];
    println!(
        "\nmysqlslap point select (PRIMARY KEY), MariaDB {}, -c 8, {rounds} rounds (median; per-round ratio range), 2 cores; queries/s\n",
        db.admin_sql("SELECT VERSION()").trim()
    );
    println!("| mode | direct | haproxy (ratio) | broker (ratio) |");
    println!("|---|---|---|---|");
    let ip = db.ip.clone();
    for (name, queries, detach) in modes {
        let mut runs: [Vec<f64>; 3] = Default::default();
        for _ in 0..rounds {
            runs[0].push(mysqlslap(
                &ip,
                db_port,
                NATIVE_USER,
                Some(password),
                queries,
                detach,
                None,
            )?);
            runs[1].push(mysqlslap(
                "127.0.0.1",
                ha_port,
                NATIVE_USER,
                Some(password),
                queries,
                detach,
                None,
            )?);
            runs[2].push(mysqlslap(
                "127.0.0.2",
                3306,
                "anything",
                None,
                queries,
                detach,
                Some(&cg),
            )?);
        }
        let direct = median(&runs[0]);
        let cell = |i: usize| crate::report::cell(&runs[i], &runs[0], 1.0, "");
        println!("| {name} | {direct:.0} | {} | {} |", cell(1), cell(2));
        // `persistent (-c 8)` -> `MySQL persistent (mysqlslap -c 8)`
        let workload = format!("MySQL {}", name.replacen('(', "(mysqlslap ", 1));
        for row in crate::bench::rows(&workload, &["direct", "haproxy", "broker"], &runs, "q/s") {
            out.push(match (row.path.as_str(), detach) {
                ("broker", false) => row.target(">= 0.95x"),
                ("broker", true) => row.target(">= 1.0x"),
                _ => row,
            });
        }
    }
    std::thread::sleep(Duration::from_secs(6));
    let idle = rss_kib(broker.0.id())?;
    println!(
        "\nbroker RSS: {:.1} MiB idle after start, {:.1} MiB idle after the runs",
        fresh as f64 / 1024.0,
        idle as f64 / 1024.0
    );
    println!("targets: persistent >= 0.95x direct (kernel splice), new conn/query >= 1.0x");
    drop(broker);
    Ok(out)
}
