//! `broker`: the eBPF-assisted transparent credential broker.
//!
//! Two command-line forms: ours (`broker run -f FILE`, `broker check FILE`...) parsed by
//! clap, and Secretless Broker's (`broker -f FILE -debug`), parsed like Go's `flag`
//! package by [`broker::cli`].

use std::{ffi::OsString, io::Write as _, net::SocketAddr, path::PathBuf, process::ExitCode};

use clap::{ArgGroup, CommandFactory as _, FromArgMatches as _, Parser, Subcommand, ValueEnum};

#[derive(Parser)]
#[command(
    name = "broker",
    version,
    about = "Transparent credential broker: apps connect to real hostnames with no secrets; the broker authenticates for them",
    after_help = "Secretless Broker's invocation also works: broker -f FILE [-debug] [-watch] [-config-mgr configfile] [-health-addr ADDR] (broker -help lists its flags)."
)]
struct Cli {
    /// Log format.
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Text)]
    log_format: LogFormat,
    /// Log filter (tracing env-filter syntax): a level (`trace`, `debug`, `info`, `warn`,
    /// `error`, `off`) and `target=level` directives, e.g. `debug,hickory=warn`.
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
        #[arg(
            short = 'f',
            long = "file",
            visible_short_alias = 'c',
            visible_alias = "config"
        )]
        file: PathBuf,
        /// cgroup v2 directory to attach to (default: the root of the cgroup v2 mount).
        #[arg(long, conflicts_with = "cgroup_from_self")]
        cgroup: Option<PathBuf>,
        /// Attach to the cgroup N levels above the broker's own: 1 in a Kubernetes
        /// sidecar is its pod's cgroup (with a private cgroup namespace, mount the host's
        /// /sys/fs/cgroup into the container; docs/OPERATIONS.md).
        #[arg(long, value_name = "N")]
        cgroup_from_self: Option<u32>,
        /// Serve only the explicit `listenOn` listeners; load no eBPF (Secretless mode).
        #[arg(long)]
        no_ebpf: bool,
        /// Forward the kernel programs' debug logs.
        #[arg(long)]
        ebpf_debug: bool,
        /// Health endpoint address (`/live`, `/ready`): IP:PORT, or `off`; replaces
        /// `broker.health`. Kubernetes probes reach the pod IP: `0.0.0.0:5335`.
        #[arg(long, value_name = "ADDR", value_parser = health_addr)]
        health_addr: Option<HealthAddr>,
        /// Reload when the configuration file changes (as SIGHUP does).
        #[arg(long)]
        watch: bool,
    },
    /// Run one command with its connections brokered: a child cgroup is created, the
    /// programs are attached there, CMD runs inside it; exits with CMD's status.
    Exec {
        /// Configuration file (YAML).
        #[arg(
            short = 'f',
            long = "file",
            visible_short_alias = 'c',
            visible_alias = "config"
        )]
        file: PathBuf,
        #[arg(long)]
        ebpf_debug: bool,
        /// The command and its arguments, after `--`.
        #[arg(last = true, required = true, value_name = "CMD")]
        cmd: Vec<OsString>,
    },
    /// Validate a configuration file: print every error with its key path.
    #[command(
        group(ArgGroup::new("config_file").required(true).args(["file", "path"])),
        override_usage = "broker check [--strict] FILE\n       broker check [--strict] -f FILE"
    )]
    Check {
        /// Configuration file (YAML).
        #[arg(
            short = 'f',
            long = "file",
            visible_short_alias = 'c',
            visible_alias = "config"
        )]
        file: Option<PathBuf>,
        /// Configuration file (YAML), instead of `-f`.
        #[arg(value_name = "FILE")]
        path: Option<PathBuf>,
        /// Warnings (what Secretless tolerates and the broker accepts: unknown keys in a
        /// Secretless file, deprecated spellings, version 1) fail the check too.
        #[arg(long)]
        strict: bool,
    },
    /// The broker's local CA (what apps trust to verify the certificates the broker
    /// presents, e.g. PostgreSQL `clientTLS`): create it if missing, print its
    /// certificate (PEM) on stdout and its path on stderr. The key is never printed.
    Ca {
        /// Take `broker.caDir` from this configuration file.
        #[arg(
            short = 'f',
            long = "file",
            visible_short_alias = 'c',
            visible_alias = "config",
            conflicts_with = "dir"
        )]
        file: Option<PathBuf>,
        /// The CA directory (default: /var/lib/broker/ca).
        #[arg(long)]
        dir: Option<PathBuf>,
    },
    /// Ask the running daemon for its state over the admin socket (root only): services
    /// and what their intercepted names resolve to, open connections and who made them,
    /// the credential cache (ages, never values), providers and their circuit breakers.
    Status {
        /// The admin socket (`broker.adminSocket`).
        #[arg(long, value_name = "PATH", default_value = broker::admin::DEFAULT_ADMIN_SOCKET)]
        socket: PathBuf,
        /// Print the daemon's JSON document instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Revoke a caller's access, live, over the admin socket (root only): its next
    /// connections are denied at once; `--kill` also ends its open ones. Lasts until
    /// lifted (`--lift ID`) or the daemon stops; `broker status` lists revocations.
    Revoke {
        /// The service (default: every service).
        #[arg(long)]
        service: Option<String>,
        /// The caller's user id.
        #[arg(long)]
        uid: Option<u32>,
        /// The caller's group id.
        #[arg(long)]
        gid: Option<u32>,
        /// The caller's process id.
        #[arg(long)]
        pid: Option<u32>,
        /// A glob over the caller's cgroup path (`/system.slice/app.service`).
        #[arg(long)]
        cgroup: Option<String>,
        /// A glob over the caller's executable (`/usr/bin/python3*`).
        #[arg(long)]
        exe: Option<String>,
        /// The caller's command name.
        #[arg(long)]
        comm: Option<String>,
        /// End the selected callers' open connections too.
        #[arg(long)]
        kill: bool,
        /// Lift revocation ID instead.
        #[arg(long, value_name = "ID", conflicts_with_all = ["service", "uid", "gid", "pid", "cgroup", "exe", "comm", "kill"])]
        lift: Option<u64>,
        /// The admin socket (`broker.adminSocket`).
        #[arg(long, value_name = "PATH", default_value = broker::admin::DEFAULT_ADMIN_SOCKET)]
        socket: PathBuf,
    },
    /// Print the version (also `--version`).
    Version,
}

/// `--health-addr`'s value (`None`: `off`).
#[derive(Clone, Copy)]
struct HealthAddr(Option<SocketAddr>);

fn health_addr(s: &str) -> Result<HealthAddr, String> {
    broker::config::parse_health_addr(s).map(HealthAddr)
}

/// What `broker version`, `--version` and the Secretless `-version` print.
fn version_line() -> String {
    format!("broker {}", env!("CARGO_PKG_VERSION"))
}

/// Log to stderr through [`broker::logging`]: a bounded queue and a writer thread, so a
/// closed or stalled stderr can neither panic nor block a connection task; the text
/// format escapes control characters in every field.
fn init_logging(
    format: LogFormat,
    filter: tracing_subscriber::EnvFilter,
) -> Option<broker::logging::QueueWriter> {
    broker::sys::ignore_sigpipe();
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

/// Exit status for a command line that does not parse (as clap and Go's `flag`).
const EXIT_USAGE: u8 = 2;

fn stderr_line(text: &str) {
    // Not eprintln!: it panics when stderr is a closed pipe.
    let _ = writeln!(std::io::stderr(), "{text}");
}

fn main() -> ExitCode {
    let args: Vec<OsString> = std::env::args_os().collect();
    let rest = args.get(1..).unwrap_or_default();
    if broker::cli::is_secretless_form(rest) {
        return secretless(rest);
    }
    let matches = match Cli::command().try_get_matches_from(&args) {
        Ok(m) => m,
        Err(e) => {
            use clap::error::ErrorKind;
            let shown = matches!(
                e.kind(),
                ErrorKind::DisplayHelp
                    | ErrorKind::DisplayVersion
                    | ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand
            );
            if !shown && let Some(msg) = broker::cli::exec_without_separator(rest) {
                stderr_line(&msg);
                return ExitCode::from(EXIT_USAGE);
            }
            e.exit();
        }
    };
    let level_from_env =
        matches.value_source("log_level") == Some(clap::parser::ValueSource::EnvVariable);
    let cli = match Cli::from_arg_matches(&matches) {
        Ok(c) => c,
        Err(e) => e.exit(),
    };
    let filter = match broker::cli::log_filter(&cli.log_level) {
        Ok(f) => f,
        Err(e) => {
            let source = if level_from_env {
                "BROKER_LOG"
            } else {
                "--log-level"
            };
            stderr_line(&format!(
                "broker: invalid {source} {:?}: {e}",
                cli.log_level
            ));
            return ExitCode::from(EXIT_USAGE);
        }
    };
    match cli.cmd {
        Cmd::Version => {
            let _ = writeln!(std::io::stdout(), "{}", version_line());
            ExitCode::SUCCESS
        }
        Cmd::Revoke {
            service,
            uid,
            gid,
            pid,
            cgroup,
            exe,
            comm,
            kill,
            lift,
            socket,
        } => {
            let req = match lift {
                Some(id) => serde_json::json!({"cmd": "lift", "id": id}),
                None => serde_json::json!({
                    "cmd": "revoke",
                    "service": service,
                    "kill": kill,
                    "selector": {
                        "uid": uid, "gid": gid, "pid": pid,
                        "cgroup": cgroup, "exe": exe, "comm": comm,
                    },
                }),
            };
            ExitCode::from(u8::try_from(broker::admin_revoke::command(&socket, &req)).unwrap_or(1))
        }
        Cmd::Status { socket, json } => {
            ExitCode::from(u8::try_from(broker::admin::status_command(&socket, json)).unwrap_or(1))
        }
        Cmd::Check { file, path, strict } => {
            let Some(file) = file.or(path) else {
                unreachable!("clap requires -f or FILE")
            };
            ExitCode::from(u8::try_from(broker::app::check(&file, strict)).unwrap_or(1))
        }
        Cmd::Ca { file, dir } => match broker::app::ca(file.as_deref(), dir.as_deref()) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                stderr_line(&format!("broker: {}", broker::privilege::error_chain(&e)));
                ExitCode::FAILURE
            }
        },
        Cmd::Run {
            file,
            cgroup,
            cgroup_from_self,
            no_ebpf,
            ebpf_debug,
            health_addr,
            watch,
        } => {
            let opts = broker::app::RunOptions {
                ebpf: match (no_ebpf, cgroup_from_self) {
                    (true, _) => broker::app::EbpfMode::Off,
                    (false, Some(n)) => broker::app::EbpfMode::AttachAboveSelf(n),
                    (false, None) => broker::app::EbpfMode::Attach(cgroup),
                },
                ebpf_debug,
                health_addr: health_addr.map(|h| h.0),
                watch,
                what: "broker run",
            };
            daemon(cli.log_format, filter, &[], async move {
                broker::app::run_with(&file, opts).await.map(|()| 0)
            })
        }
        Cmd::Exec {
            file,
            ebpf_debug,
            cmd,
        } => daemon(cli.log_format, filter, &[], async move {
            broker::app::exec(&file, &cmd, ebpf_debug).await
        }),
    }
}

/// `broker -f FILE [-debug] ...`: Secretless Broker's invocation.
fn secretless(args: &[OsString]) -> ExitCode {
    use broker::cli::{FlagError, SECRETLESS_USAGE, SecretlessAction};
    let parsed = match broker::cli::parse_secretless(args) {
        Ok(p) => p,
        Err(FlagError::Help) => {
            let _ = write!(std::io::stdout(), "{SECRETLESS_USAGE}");
            return ExitCode::SUCCESS;
        }
        Err(FlagError::Usage(e)) => {
            stderr_line(&format!("broker: {e}\n{SECRETLESS_USAGE}"));
            return ExitCode::from(EXIT_USAGE);
        }
    };
    let run = match parsed.resolve() {
        Ok(SecretlessAction::Version) => {
            let _ = writeln!(std::io::stdout(), "{}", version_line());
            return ExitCode::SUCCESS;
        }
        Ok(SecretlessAction::Run(r)) => r,
        Err(e) => {
            stderr_line(&format!("broker: {e}"));
            return ExitCode::from(EXIT_USAGE);
        }
    };
    let format = match run.log_format.as_deref() {
        None => LogFormat::Text,
        Some(f) => match LogFormat::from_str(f, true) {
            Ok(f) => f,
            Err(_) => {
                stderr_line(&format!(
                    "broker: invalid value {f:?} for flag -log-format: text or json"
                ));
                return ExitCode::from(EXIT_USAGE);
            }
        },
    };
    let (level, source) = match (&run.log_level, std::env::var("BROKER_LOG")) {
        (Some(l), _) => (l.clone(), "-log-level"),
        (None, Ok(l)) => (l, "BROKER_LOG"),
        (None, Err(_)) => ("info".to_owned(), "-log-level"),
    };
    let filter = match broker::cli::log_filter(&level) {
        Ok(f) => f,
        Err(e) => {
            stderr_line(&format!("broker: invalid {source} {level:?}: {e}"));
            return ExitCode::from(EXIT_USAGE);
        }
    };
    let opts = broker::app::RunOptions {
        ebpf: broker::app::EbpfMode::WhenIntercepting,
        ebpf_debug: false,
        health_addr: run.health_addr,
        watch: run.watch,
        what: "broker -f",
    };
    let file = run.file;
    daemon(format, filter, &run.warnings, async move {
        broker::app::run_with(&file, opts).await.map(|()| 0)
    })
}

/// Start logging and the runtime, run `work` (`run`, `exec`) and turn its result into
/// the exit status. `warnings` are logged first.
fn daemon(
    format: LogFormat,
    filter: tracing_subscriber::EnvFilter,
    warnings: &[String],
    work: impl std::future::Future<Output = anyhow::Result<i32>>,
) -> ExitCode {
    let log = init_logging(format, filter);
    for w in warnings {
        tracing::warn!("{w}");
    }
    let rt = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(e) => {
            stderr_line(&format!("broker: cannot start the runtime: {e}"));
            return ExitCode::FAILURE;
        }
    };
    let result = rt.block_on(work);
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
            stderr_line(&format!("broker: {}", broker::privilege::error_chain(&e)));
            ExitCode::from(u8::try_from(code).unwrap_or(1))
        }
    }
}
