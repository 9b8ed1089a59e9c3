//! Project tasks. Every task that needs tools installs them first, idempotently.
//!
//! * `cargo xtask setup`  install everything a fresh machine lacks
//! * `cargo xtask demo`   set up, build, and run the PostgreSQL demo (root)
//! * `cargo xtask test`   set up, build, and run every check and test (root)
//! * `cargo xtask bench pg`  set up, build (release), and run the pgbench comparison
//! * `cargo xtask bench http`  wrk over HTTP and HTTPS: direct, nginx, broker
//! * `cargo xtask bench mysql`  mysqlslap point selects: direct, haproxy, broker
//! * `cargo xtask bench clients`  connect and close times of real clients, direct vs broker
//! * `cargo xtask bench secrets`  store calls per 1,000 connections (cache on, off) and
//!   what a cache hit adds to a connection
//! * `cargo xtask bench conn`  broker memory at 10,000 idle connections, and what our
//!   programs add to a connect() no service intercepts
//! * `cargo xtask bench copy`  psql COPY of 1 GB each way: direct, haproxy, broker
//! * `cargo xtask bench tcp`  2 GB one way: direct, haproxy, the broker's `tcp` connector
//! * `cargo xtask bench all`  every workload above (but clients, secrets, policy) and the
//!   connection-level costs: one table and one chart (`docs/bench/all.{md,png}`)

mod bench;
mod bench_all;
mod bench_bulk;
mod bench_clients;
mod bench_conn;
mod bench_http;
mod bench_mysql;
mod bench_secrets;
mod demo;
mod report;
mod setup;

use std::{
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context as _, bail};
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "xtask")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Install nightly rust-src, bpf-linker and the Debian packages the tests use.
    Setup,
    /// Set up, build, then run the demo: a real PostgreSQL, a local secret server, and an
    /// unmodified `psql` run under `broker exec`.
    Demo,
    /// Set up, build, then run fmt, clippy and every test (needs root).
    Test {
        /// Skip fmt and clippy.
        #[arg(long)]
        no_lint: bool,
        /// Extra arguments for `cargo test` (e.g. a test name filter).
        #[arg(last = true)]
        rest: Vec<String>,
    },
    /// Benchmarks, side by side with the direct connection and a peer proxy.
    Bench {
        /// Which benchmark: `pg`, `copy`, `http`, `mysql`, `tcp`, `conn`, `clients`,
        /// `secrets`, `policy`, or `all`.
        what: String,
        /// Duration of each pgbench, wrk or mysqlslap run, seconds (default 10; 5 for
        /// `all`, which keeps the whole run under about 25 minutes on 2 cores).
        #[arg(long)]
        seconds: Option<u32>,
    },
    /// (Used by `bench conn`) connect to ADDR COUNT times, closing each at once; prints
    /// the nanoseconds taken.
    #[command(hide = true)]
    ConnectLoop { addr: String, count: u32 },
    /// (`bench tcp`'s client) Send BYTES to ADDR, half-close, print the seconds until
    /// the sink's count arrives.
    #[command(hide = true)]
    TcpPush { addr: String, bytes: u64 },
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let root = workspace_root();
    std::env::set_current_dir(&root)?;
    match cli.cmd {
        Cmd::Setup => setup::all(),
        Cmd::Demo => {
            setup::all()?;
            build(&root, false)?;
            demo::run()
        }
        Cmd::Test { no_lint, rest } => {
            setup::all()?;
            test(&root, no_lint, &rest)
        }
        Cmd::ConnectLoop { addr, count } => bench_conn::connect_loop(&addr, count),
        Cmd::TcpPush { addr, bytes } => bench_bulk::push(&addr, bytes),
        Cmd::Bench { what, seconds } => {
            setup::all()?;
            build(&root, true)?;
            let seconds = seconds.unwrap_or(if what == "all" { 5 } else { 10 });
            match what.as_str() {
                "all" => bench_all::run(&root, seconds),
                "pg" => bench::pg(&root, seconds).map(drop),
                "copy" => bench_bulk::pg_copy(&root).map(drop),
                "http" => bench_http::run(&root, seconds).map(drop),
                "mysql" => bench_mysql::run(&root, seconds).map(drop),
                "tcp" => bench_bulk::tcp(&root).map(drop),
                "clients" => bench_clients::run(&root),
                "secrets" => bench_secrets::run(&root),
                "conn" => bench_conn::run(&root),
                "policy" => run(Command::new("cargo").args([
                    "run",
                    "--release",
                    "-q",
                    "-p",
                    "broker-userspace",
                    "--example",
                    "policy_bench",
                ])),
                other => {
                    bail!(
                        "unknown benchmark `{other}` (known: pg, copy, http, mysql, tcp, conn, clients, secrets, policy, all)"
                    )
                }
            }
        }
    }
}

fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask lives in the workspace")
        .to_path_buf()
}

/// Run a command, failing with its name if it fails.
pub fn run(cmd: &mut Command) -> anyhow::Result<()> {
    let shown = format!("{cmd:?}");
    let st = cmd.status().with_context(|| format!("starting {shown}"))?;
    if !st.success() {
        bail!("{shown} failed: {st}");
    }
    Ok(())
}

/// `cargo`, without the package variables `cargo xtask` (`cargo run`) leaves in this
/// process's environment (`CARGO_MANIFEST_DIR`, `CARGO_PKG_NAME`, ...): ring's build
/// script reruns when any of them changes, so inheriting them would rebuild ring and
/// everything above it whenever builds alternate between `cargo xtask` and a plain
/// `cargo build` sharing one target directory.
fn cargo() -> Command {
    let mut c = Command::new("cargo");
    for (k, _) in std::env::vars_os() {
        let k_str = k.to_string_lossy();
        if k_str.starts_with("CARGO_PKG_")
            || k_str.starts_with("CARGO_MANIFEST_")
            || k_str == "CARGO_CRATE_NAME"
            || k_str == "CARGO_BIN_NAME"
        {
            c.env_remove(&k);
        }
    }
    c
}

fn build(root: &Path, release: bool) -> anyhow::Result<()> {
    let mut c = cargo();
    c.current_dir(root)
        .args(["build", "-p", "broker-userspace"]);
    if release {
        c.arg("--release");
    }
    run(&mut c)
}

fn test(root: &Path, no_lint: bool, rest: &[String]) -> anyhow::Result<()> {
    if !no_lint {
        run(cargo().args(["fmt", "--all", "--", "--check"]))?;
        run(cargo().args([
            "clippy",
            "--workspace",
            "--all-targets",
            "--",
            "-D",
            "warnings",
        ]))?;
    }
    build(root, false)?;
    // SAFETY: geteuid has no preconditions.
    let euid = unsafe { libc_geteuid() };
    if euid != 0 {
        bail!(
            "the test suite loads eBPF programs and starts servers: run it as root (sudo -E cargo xtask test)"
        );
    }
    let mut c = cargo();
    c.current_dir(root)
        .args([
            "test",
            "--workspace",
            "--exclude",
            "broker-ebpf",
            "--exclude",
            "xtask",
        ])
        .args(rest)
        .env("BROKER_REQUIRE_PRIVILEGED", "1")
        .env("BROKER_BIN", root.join("target/debug/broker"));
    run(&mut c)
}

unsafe extern "C" {
    #[link_name = "geteuid"]
    pub(crate) fn libc_geteuid() -> u32;
}
