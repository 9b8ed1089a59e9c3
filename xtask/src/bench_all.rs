//! `cargo xtask bench all [--seconds N]`: every workload, each direct vs its peer vs the
//! broker in interleaved rounds (each benchmark's own), gathered into one markdown table
//! of ratios to direct (`docs/bench/all.md`, also printed) and one chart
//! (`docs/bench/all.png`). A workload that cannot run here (a server not installed) or
//! that has no rows yet leaves a note under the table instead of stopping the run.

use std::{
    fmt::Write as _,
    path::Path,
    process::Command,
    time::{Duration, Instant},
};

use crate::report::{self, Row};

/// Connectors the configuration knows but that are not built: no workload to measure.
const NOT_BUILT: &str = "MSSQL, SSH and ssh-agent: connectors not built yet, no rows";

type Workload<'a> = (&'a str, Box<dyn FnOnce() -> anyhow::Result<Vec<Row>> + 'a>);

pub fn run(root: &Path, seconds: u32) -> anyhow::Result<()> {
    let started = Instant::now();
    let rounds = report::rounds();
    let cores = std::thread::available_parallelism().map_or(0, usize::from);
    let load = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    let load = load.split_whitespace().next().unwrap_or("?").to_owned();
    // The connect loop first: later workloads leave thousands of sockets in TIME_WAIT.
    let workloads: Vec<Workload<'_>> = vec![
        (
            "unmatched connect()",
            Box::new(|| crate::bench_conn::unmatched_connect(root)),
        ),
        ("pg (pgbench)", Box::new(|| crate::bench::pg(root, seconds))),
        ("PG COPY", Box::new(|| crate::bench_bulk::pg_copy(root))),
        (
            "http (wrk, HTTP and HTTPS)",
            Box::new(|| crate::bench_http::run(root, seconds)),
        ),
        (
            "mysql (mysqlslap)",
            Box::new(|| crate::bench_mysql::run(root, seconds)),
        ),
        ("bulk TCP", Box::new(|| crate::bench_bulk::tcp(root))),
        (
            "idle memory",
            Box::new(|| crate::bench_conn::idle_memory(root)),
        ),
    ];
    let mut rows = Vec::new();
    let mut notes = Vec::new();
    let mut took = Vec::new();
    for (name, f) in workloads {
        eprintln!("\n== bench all: {name}");
        let t = Instant::now();
        match f() {
            Ok(r) if r.is_empty() => notes.push(format!("{name}: no rows yet (not built)")),
            Ok(r) => rows.extend(r),
            Err(e) => {
                let first = format!("{e:#}");
                let first = first.lines().next().unwrap_or("").to_owned();
                eprintln!("bench all: {name} failed: {e:#}");
                notes.push(format!("{name}: not measured ({first})"));
            }
        }
        took.push(format!("{name} {}", minutes(t.elapsed())));
    }
    notes.push(NOT_BUILT.to_owned());
    let wall = started.elapsed();
    notes.push(format!(
        "Wall time {} ({}).",
        minutes(wall),
        took.join(", ")
    ));

    let date = Command::new("date")
        .args(["-u", "+%Y-%m-%d"])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
        .unwrap_or_default();
    let mut md = format!(
        "# `cargo xtask bench all`\n\n{date}, {cores} cores, load average {load} at start; \
         {seconds} s per timed run, {rounds} interleaved rounds per workload. Value: the \
         median of the rounds; ratio: to direct (medians); range: the lowest and highest \
         per-round ratio. Throughput rows: higher is better. How each workload is \
         measured: the header of its module in `xtask/src/` (`bench.rs`, `bench_bulk.rs`, \
         `bench_http.rs`, `bench_mysql.rs`, `bench_conn.rs`).\n\n![ratio to direct per \
         workload](all.png)\n\n"
    );
    md.push_str(&report::markdown(&rows, &notes));
    println!("\n{md}");

    let out = root.join("docs/bench");
    std::fs::create_dir_all(&out)?;
    std::fs::write(out.join("all.md"), &md)?;
    let mut title = String::from("cargo xtask bench all");
    let _ = write!(
        title,
        ": {date}, {cores} cores, {seconds} s runs, median of {rounds} round(s)"
    );
    if rows.iter().any(|r| r.shown_ratio().is_some()) {
        report::chart(&rows, &title, &out.join("all.png"))?;
    }
    eprintln!(
        "wrote {} and {} ({})",
        out.join("all.md").display(),
        out.join("all.png").display(),
        minutes(wall)
    );
    Ok(())
}

fn minutes(d: Duration) -> String {
    let s = d.as_secs();
    format!("{}m{:02}s", s / 60, s % 60)
}
