//! `broker`: the eBPF-assisted transparent credential broker.

use std::{ffi::OsString, io::Write as _, path::PathBuf, process::ExitCode};

use clap::{Parser, Subcommand, ValueEnum};

#[derive(Parser)]
#[command(
    name = "broker",
    version,
    about = "Transparent credential broker: apps connect to real hostnames with no secrets; the broker authenticates for them"
)]
struct Cli {
    /// Log format.
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Text)]
    log_format: LogFormat,
    /// Log filter (tracing env-filter syntax), e.g. `info`, `debug,hickory=warn`.
    #[arg(long, global = true, env = "BROKER_LOG", default_value = "info")]
    log_level: String,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Clone, Copy, ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

#[derive(Subcommand)]
enum Cmd {
    /// Run the daemon: attach the eBPF programs and broker connections until SIGTERM.
    Run {
        /// Configuration file (YAML).
        #[arg(short = 'f', long = "file")]
        file: PathBuf,
        /// cgroup v2 directory to attach to (default: the root of the cgroup v2 mount).
        #[arg(long)]
        cgroup: Option<PathBuf>,
        /// Serve only the explicit `listenOn` listeners; load no eBPF (Secretless mode).
        #[arg(long)]
        no_ebpf: bool,
        /// Forward the kernel programs' debug logs.
        #[arg(long)]
        ebpf_debug: bool,
    },
    /// Run one command with its connections brokered: a child cgroup is created, the
    /// programs are attached there, CMD runs inside it; exits with CMD's status.
    Exec {
        #[arg(short = 'f', long = "file")]
        file: PathBuf,
        #[arg(long)]
        ebpf_debug: bool,
        /// The command and its arguments.
        #[arg(last = true, required = true)]
        cmd: Vec<OsString>,
    },
    /// Validate a configuration file: print every error with its key path.
    Check {
        #[arg(short = 'f', long = "file")]
        file: PathBuf,
    },
    /// The broker's local CA (what apps trust to verify the certificates the broker
    /// presents, e.g. PostgreSQL `clientTLS`): create it if missing, print its
    /// certificate (PEM) on stdout and its path on stderr. The key is never printed.
    Ca {
        /// Take `broker.caDir` from this configuration file.
        #[arg(short = 'f', long = "file", conflicts_with = "dir")]
        file: Option<PathBuf>,
        /// The CA directory (default: /var/lib/broker/ca).
        #[arg(long)]
        dir: Option<PathBuf>,
    },
}

/// Log to stderr through [`broker::logging`]: a bounded queue and a writer thread, so a
/// closed or stalled stderr can neither panic nor block a connection task; the text
/// format escapes control characters in every field.
fn init_logging(format: LogFormat, level: &str) -> Option<broker::logging::QueueWriter> {
    broker::sys::ignore_sigpipe();
    let filter = tracing_subscriber::EnvFilter::try_new(level)
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let Ok(writer) = broker::logging::spawn_writer(std::io::stderr(), broker::logging::QUEUE_LINES)
    else {
        let _ = writeln!(std::io::stderr(), "broker: cannot start the log writer");
        return None;
    };
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(ansi)
        .log_internal_errors(false)
        .with_writer(writer.clone());
    match format {
        LogFormat::Text => builder.fmt_fields(broker::logging::EscapedFields).init(),
        LogFormat::Json => builder.json().flatten_event(true).init(),
    }
    Some(writer)
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    if let Cmd::Check { file } = &cli.cmd {
        return ExitCode::from(u8::try_from(broker::app::check(file, false)).unwrap_or(1));
    }
    if let Cmd::Ca { file, dir } = &cli.cmd {
        return match broker::app::ca(file.as_deref(), dir.as_deref()) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                let _ = writeln!(std::io::stderr(), "broker: {e:#}");
                ExitCode::FAILURE
            }
        };
    }
    let log = init_logging(cli.log_format, &cli.log_level);
    let rt = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(e) => {
            let _ = writeln!(std::io::stderr(), "broker: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = rt.block_on(async {
        match cli.cmd {
            Cmd::Run {
                file,
                cgroup,
                no_ebpf,
                ebpf_debug,
            } => broker::app::run(&file, cgroup, no_ebpf, ebpf_debug)
                .await
                .map(|()| 0),
            Cmd::Exec {
                file,
                ebpf_debug,
                cmd,
            } => broker::app::exec(&file, &cmd, ebpf_debug).await,
            Cmd::Check { .. } | Cmd::Ca { .. } => unreachable!("handled above"),
        }
    });
    // The drain is over: do not wait for blocking tasks still running (a PBKDF2 of a
    // connection that was ended kept the process alive for minutes past "stopped").
    rt.shutdown_background();
    // Queued lines first (bounded: an output nobody reads cannot hold the exit).
    if let Some(log) = &log {
        log.flush(std::time::Duration::from_secs(1));
    }
    match result {
        Ok(code) => ExitCode::from(u8::try_from(code).unwrap_or(1)),
        Err(e) => {
            let code = if e.downcast_ref::<broker::app::BadConfig>().is_some() {
                broker::app::EXIT_CONFIG
            } else {
                1
            };
            // Not eprintln!: it panics when stderr is a closed pipe.
            let _ = writeln!(std::io::stderr(), "broker: {e:#}");
            ExitCode::from(u8::try_from(code).unwrap_or(1))
        }
    }
}
