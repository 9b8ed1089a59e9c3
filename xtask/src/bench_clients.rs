//! `cargo xtask bench clients`: for each real client of the client matrix
//! (`tests/clients/`, run with `CLIENT_BENCH=N`), the time to connect, run `SELECT 1`
//! and close, and the time of the `close()` call alone, direct and through the broker
//! (release build, eBPF-intercepted, spliced in the kernel by default, and with
//! `splice: false`). Median of `BENCH_RUNS` connections (default 20) after one warm-up
//! connection; ratios are time through the broker over time direct (below 1: faster).
//!
//! Direct connections authenticate with the password (SCRAM in the client, as an
//! application would today); brokered ones carry a dummy. psql starts one process per
//! connection (the time includes the process) and cannot time its close apart.

use std::{
    path::Path,
    process::{Command, Stdio},
};

use anyhow::{Context as _, bail};
use broker_tests::{
    clients::{Client, compile_jdbc},
    net::TestCgroup,
    pg::{PgAuth, PgOptions, PgServer},
};

use crate::bench::{median, start_broker};

/// One client's connections on one path: (connect ms, close ms) per connection.
fn measure(
    client: Client,
    jdbc: &Path,
    runs: usize,
    (host, port, password): (&str, u16, &str),
    cg: Option<&TestCgroup>,
) -> anyhow::Result<(Vec<f64>, Vec<f64>)> {
    let argv = client.argv(jdbc);
    let mut c = Command::new("timeout");
    c.args(["--kill-after=5", "120"])
        .args(&argv)
        .envs(client.env())
        .env("CLIENT_BENCH", (runs + 1).to_string())
        .env("PGHOST", host)
        .env("PGPORT", port.to_string())
        .env("PGUSER", "app_user")
        .env("PGPASSWORD", password)
        .env("PGDATABASE", "app")
        .env("PGCONNECT_TIMEOUT", "10")
        .env_remove("PGSSLMODE")
        .stdin(Stdio::null());
    if let Some(cg) = cg {
        cg.enter(&mut c);
    }
    let out = c
        .output()
        .with_context(|| format!("running {}", client.name()))?;
    let text =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    if !out.status.success() {
        bail!(
            "{} via {host}:{port} failed:\n{}",
            client.name(),
            text.replace(password, "<password>")
        );
    }
    let field = |line: &str, name: &str| {
        line.split_whitespace()
            .find_map(|w| w.strip_prefix(name))
            .and_then(|v| v.parse::<f64>().ok())
    };
    let lines: Vec<&str> = text
        .lines()
        .filter(|l| l.starts_with("bench "))
        .skip(1) // warm-up (the JVM loads the driver on its first connection)
        .collect();
    if lines.len() != runs {
        bail!(
            "{}: {} measurements, not {runs}:\n{text}",
            client.name(),
            lines.len()
        );
    }
    let connect = lines
        .iter()
        .filter_map(|l| field(l, "connect_ms="))
        .collect();
    let close = lines.iter().filter_map(|l| field(l, "close_ms=")).collect();
    Ok((connect, close))
}

pub fn run(root: &Path) -> anyhow::Result<()> {
    if !broker_tests::pg::available() {
        bail!("the benchmark needs root and PostgreSQL 15");
    }
    let missing: Vec<String> = Client::ALL.iter().filter_map(|c| c.missing()).collect();
    if !missing.is_empty() {
        bail!("{}", missing.join("\n"));
    }
    let runs: usize = std::env::var("BENCH_RUNS")
        .ok()
        .and_then(|r| r.parse().ok())
        .unwrap_or(20)
        .clamp(1, 1000);
    let password = "bench-clients-password-7a3e";
    let pg = PgServer::start(PgOptions::new(PgAuth::Scram, password));
    let pg_port = pg.addr().port();
    let dir = tempfile::tempdir()?;
    let jdbc = dir.path().join("jdbc");
    compile_jdbc(&jdbc);
    let pw_file = dir.path().join("pw");
    std::fs::write(&pw_file, password)?;
    let cg = TestCgroup::new("bench-clients");
    let _spliced = start_broker(root, dir.path(), "127.0.0.2", "", pg_port, &pw_file, &cg)?;
    let cg_relay = TestCgroup::new("bench-clients-relay");
    let _relay = start_broker(
        root,
        dir.path(),
        "127.0.0.3",
        "  splice: false\n",
        pg_port,
        &pw_file,
        &cg_relay,
    )?;
    let paths = [
        ("127.0.0.1", pg_port, password, None),
        ("127.0.0.2", 5432, "dummy", Some(&cg)),
        ("127.0.0.3", 5432, "dummy", Some(&cg_relay)),
    ];

    println!(
        "\nconnect + SELECT 1 + close, and close() alone: median of {runs} connections, ms (ratio to direct), 2 cores\n"
    );
    println!(
        "{:<14} {:>9} {:>16} {:>16}   {:>9} {:>16} {:>16}",
        "client", "direct", "broker", "splice: false", "close", "broker close", "splice: false"
    );
    for client in Client::ALL {
        let mut connect = Vec::new();
        let mut close = Vec::new();
        for (host, port, pw, cg) in paths {
            let (c, cl) = measure(client, &jdbc, runs, (host, port, pw), cg)?;
            connect.push(median(&c));
            close.push((!cl.is_empty()).then(|| median(&cl)));
        }
        let ratio = |v: f64, d: f64| format!("{v:.1} ({:.2}x)", v / d);
        let close_cell = |i: usize| match (close[i], close[0]) {
            (Some(v), Some(d)) if i > 0 => format!("{v:.2} ({:.2}x)", v / d),
            (Some(v), _) => format!("{v:.2}"),
            (None, _) => "-".to_owned(),
        };
        println!(
            "{:<14} {:>9.1} {:>16} {:>16}   {:>9} {:>16} {:>16}",
            client.name(),
            connect[0],
            ratio(connect[1], connect[0]),
            ratio(connect[2], connect[0]),
            close_cell(0),
            close_cell(1),
            close_cell(2),
        );
    }
    println!("\npsql: one process per connection (process start included, close not timed apart).");
    Ok(())
}
