//! The three commands: `run`, `exec`, `check`.
//!
//! [`Daemon::start`] binds every listener and attaches the programs before anything is
//! served (a conflict fails start-up naming the address); [`Daemon::stop`] stops
//! accepting, detaches the programs (new connects go direct again), drains live
//! connections up to a deadline, then ends them.

use std::{
    ffi::OsString,
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    path::{Path, PathBuf},
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};

use anyhow::{Context as _, anyhow, bail};
use broker_common::{BrokerSettings, SETTINGS_DEBUG, SETTINGS_ENABLED};
use tokio::{net::TcpListener, sync::watch, task::JoinSet};

use crate::{
    broker::Broker,
    cgroup::{self, ChildCgroup},
    config::{self, Config, ListenAddr},
    ebpf::Interceptor,
    health,
    proxy::{self, Shared, Tracker},
    resolver,
};

/// Exit status for a configuration that does not load (sysexits EX_CONFIG).
pub const EXIT_CONFIG: i32 = 78;
/// How long `stop` waits for live connections before ending them.
pub const DRAIN_DEADLINE: Duration = Duration::from_secs(10);

/// A configuration that failed to load, with every error already formatted.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct BadConfig(pub String);

/// Load and validate; every error is reported as `FILE: key.path: message`.
///
/// # Errors
/// [`BadConfig`] listing every problem, including connectors/providers not built yet.
pub fn load_config(path: &Path) -> Result<Config, BadConfig> {
    let shown = path.display().to_string();
    let cfg = config::load_file(path).map_err(|errs| {
        BadConfig(
            errs.0
                .iter()
                .map(|e| {
                    // Whole-file errors (unreadable file) already name it.
                    if e.path.is_empty() && e.message.contains(&shown) {
                        e.to_string()
                    } else {
                        format!("{shown}: {e}")
                    }
                })
                .collect::<Vec<_>>()
                .join("\n"),
        )
    })?;
    let unsupported = config::unsupported(&cfg);
    if !unsupported.is_empty() {
        return Err(BadConfig(
            unsupported
                .iter()
                .map(|e| format!("{shown}: {e}"))
                .collect::<Vec<_>>()
                .join("\n"),
        ));
    }
    Ok(cfg)
}

/// `broker check -f FILE`: print every error (or a summary) and return the exit status.
#[must_use]
pub fn check(path: &Path) -> i32 {
    match load_config(path) {
        Ok(cfg) => {
            let intercepts: usize = cfg.services.iter().map(|s| s.intercept.len()).sum();
            println!(
                "{}: OK: {} service(s), {} intercept target(s)",
                path.display(),
                cfg.services.len(),
                intercepts
            );
            0
        }
        Err(BadConfig(text)) => {
            eprintln!("{text}");
            EXIT_CONFIG
        }
    }
}

/// Where (and whether) to attach the kernel programs.
#[derive(Debug, Clone)]
pub enum Attach {
    /// `--no-ebpf`: explicit `listenOn` listeners only.
    None,
    /// Attach to this cgroup v2 directory.
    Cgroup(PathBuf),
}

#[derive(Debug, Clone)]
pub struct StartOptions {
    pub attach: Attach,
    /// Serve the health endpoint from the config (off for `exec`).
    pub health: bool,
    /// Kernel debug logs (aya-log).
    pub ebpf_debug: bool,
}

/// A started broker.
pub struct Daemon {
    interceptor: Option<Arc<Interceptor>>,
    ready: Arc<AtomicBool>,
    stop_tx: watch::Sender<bool>,
    abort_tx: watch::Sender<bool>,
    tracker: Arc<Tracker>,
    tasks: JoinSet<()>,
    /// Where the transparent listener is bound (None with `--no-ebpf`).
    pub transparent: Option<SocketAddr>,
}

async fn bind(addr: SocketAddr, what: &str) -> anyhow::Result<TcpListener> {
    TcpListener::bind(addr)
        .await
        .with_context(|| format!("binding {what} on {addr}"))
}

/// Bind the transparent listener on 127.0.0.1:port and [::1]:port (same port).
async fn bind_transparent(port: u16) -> anyhow::Result<(TcpListener, Option<TcpListener>)> {
    for _ in 0..20 {
        let v4 = bind(
            SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), port),
            "transparent listener",
        )
        .await?;
        let p = v4.local_addr()?.port();
        match TcpListener::bind(SocketAddr::new(IpAddr::V6(Ipv6Addr::LOCALHOST), p)).await {
            Ok(v6) => return Ok((v4, Some(v6))),
            Err(e) if e.kind() == std::io::ErrorKind::AddrInUse && port == 0 => {}
            Err(e) if e.kind() == std::io::ErrorKind::AddrInUse => {
                return Err(e)
                    .with_context(|| format!("binding transparent listener on [::1]:{p}"));
            }
            Err(e) => {
                tracing::warn!(error = %e, "no IPv6 loopback: IPv6 destinations cannot be intercepted");
                return Ok((v4, None));
            }
        }
    }
    bail!("could not find a port free on both 127.0.0.1 and [::1]")
}

impl Daemon {
    /// Bind, attach and start serving.
    ///
    /// # Errors
    /// A listener that cannot be bound (naming the address), programs that cannot be
    /// loaded or attached, provider set-up failures. Nothing stays attached on error.
    pub async fn start(cfg: Config, opts: &StartOptions) -> anyhow::Result<Self> {
        let cfg = Arc::new(cfg);
        let broker = Arc::new(Broker::new(Arc::clone(&cfg)).context("setting up providers")?);
        let services: Arc<Vec<_>> = Arc::new(cfg.services.iter().cloned().map(Arc::new).collect());
        let (stop_tx, stop_rx) = watch::channel(false);
        let (abort_tx, abort_rx) = watch::channel(false);
        let ready = Arc::new(AtomicBool::new(false));
        let tracker = Arc::new(Tracker::default());

        // 1. Bind everything first.
        let health = match (opts.health, cfg.broker.health_addr) {
            (true, Some(addr)) => Some(bind(addr, "health endpoint").await?),
            _ => None,
        };
        let mut explicit = Vec::new();
        for (id, s) in services.iter().enumerate() {
            match &s.listen_on {
                Some(ListenAddr::Tcp(addr)) => {
                    let what = format!("listenOn of service {}", s.name);
                    explicit.push((id, bind(*addr, &what).await?));
                }
                Some(ListenAddr::Unix(p)) => bail!(
                    "service {}: listenOn unix://{} is not supported yet; use tcp://",
                    s.name,
                    p.display()
                ),
                None => {}
            }
        }

        // 2. Attach.
        let mut interceptor = None;
        let mut transparent = None;
        let mut transparent_listeners = Vec::new();
        let mut targets = None;
        if let Attach::Cgroup(cgroup) = &opts.attach {
            let (v4, v6) = bind_transparent(cfg.broker.transparent_port).await?;
            let port = v4.local_addr()?.port();
            transparent = Some(v4.local_addr()?);
            transparent_listeners.push(v4);
            transparent_listeners.extend(v6);

            let per_service: Vec<(u32, &[config::InterceptTarget])> = cfg
                .services
                .iter()
                .enumerate()
                .map(|(i, s)| (u32::try_from(i).unwrap_or(u32::MAX), s.intercept.as_slice()))
                .collect();
            let mut t = resolver::Targets::new(&per_service);
            t.refresh_due().await;
            let settings = BrokerSettings {
                flags: SETTINGS_ENABLED | if opts.ebpf_debug { SETTINGS_DEBUG } else { 0 },
                bypass_mark: cfg.broker.bypass_mark,
                bypass_tgid: std::process::id(),
                listen_port: port,
                _pad: 0,
                netns_cookie: 0, // Interceptor::attach: this process's namespace
            };
            // Sessions of these services may be spliced in the kernel after auth.
            let splice_services: std::collections::BTreeSet<u32> = cfg
                .services
                .iter()
                .enumerate()
                .filter(|(_, s)| cfg.broker.splice && s.connector.can_splice())
                .map(|(i, _)| u32::try_from(i).unwrap_or(u32::MAX))
                .collect();
            let splice_services = if splice_services.is_empty() || splice_kernel_ok() {
                splice_services
            } else {
                std::collections::BTreeSet::new()
            };
            if !splice_services.is_empty() {
                check_splice_rmem();
            }
            let mut i = Interceptor::attach(cgroup, settings, &t.current(), splice_services)
                .with_context(|| format!("attaching to cgroup {}", cgroup.display()))?;
            if opts.ebpf_debug {
                match i.kernel_logger() {
                    Ok(logger) => spawn_kernel_logger(logger),
                    Err(e) => tracing::warn!(error = %e, "kernel debug logs unavailable"),
                }
            }
            // Detached: spliced sessions may outlive the serving tasks (a drain).
            tokio::spawn(i.splicer().watch_fallbacks());
            interceptor = Some(Arc::new(i));
            targets = Some(t);
        }

        // 3. Serve.
        let shared = Shared {
            broker,
            services,
            interceptor: interceptor.as_ref().map(Arc::downgrade),
            tracker: Arc::clone(&tracker),
            abort: abort_rx,
        };
        let mut tasks = JoinSet::new();
        if let (Some(t), Some(i)) = (targets, &interceptor)
            && t.has_hosts()
        {
            tasks.spawn(resolver::run(t, Arc::downgrade(i), stop_rx.clone()));
        }
        for l in transparent_listeners {
            tracing::info!(addr = %l.local_addr()?, "transparent listener bound");
            tasks.spawn(proxy::serve_transparent(l, shared.clone(), stop_rx.clone()));
        }
        for (id, l) in explicit {
            tracing::info!(service = %shared.services[id].name, addr = %l.local_addr()?, "listenOn bound");
            tasks.spawn(proxy::serve_explicit(
                l,
                shared.clone(),
                id,
                stop_rx.clone(),
            ));
        }
        if let Some(h) = health {
            tracing::info!(addr = %h.local_addr()?, "health endpoint bound");
            tasks.spawn(health::serve(h, Arc::clone(&ready), stop_rx.clone()));
        }
        tasks.spawn(trim_when_idle(Arc::clone(&tracker)));
        // Loading the programs parses the kernel's BTF (megabytes) for relocations; give
        // that memory back to the OS instead of keeping it as free heap forever.
        // SAFETY: malloc_trim has no preconditions.
        unsafe { libc::malloc_trim(0) };
        ready.store(true, Ordering::SeqCst);
        tracing::info!(services = shared.services.len(), "broker ready");
        Ok(Self {
            interceptor,
            ready,
            stop_tx,
            abort_tx,
            tracker,
            tasks,
            transparent,
        })
    }

    /// Stop accepting, detach, drain live connections (up to [`DRAIN_DEADLINE`]).
    pub async fn stop(mut self) {
        self.ready.store(false, Ordering::SeqCst);
        if let Some(i) = self.interceptor.take() {
            i.disable();
            drop(i);
            tracing::info!("eBPF programs detached");
        }
        let _ = self.stop_tx.send(true);
        let active = self.tracker.active();
        if active > 0 {
            tracing::info!(active, "draining connections");
        }
        let left = self.tracker.drain(DRAIN_DEADLINE).await;
        if left > 0 {
            tracing::warn!(
                left,
                "ending connections still open after the drain deadline"
            );
            let _ = self.abort_tx.send(true);
            self.tracker.drain(Duration::from_secs(2)).await;
        }
        self.tasks.abort_all();
        while self.tasks.join_next().await.is_some() {}
    }
}

/// The splice needs a stream verdict without a parser (kernel 5.13), the sockmap fixes
/// of the following releases and the `sock_recv_length` tracepoint (6.3); it is tested
/// on 6.x. Older kernels relay in userspace.
fn splice_kernel_ok() -> bool {
    const MIN: (u32, u32) = (6, 3);
    // SAFETY: uname fills the zeroed struct; the release is NUL-terminated.
    let release = unsafe {
        let mut u: libc::utsname = std::mem::zeroed();
        if libc::uname(&raw mut u) != 0 {
            return false;
        }
        std::ffi::CStr::from_ptr(u.release.as_ptr())
            .to_string_lossy()
            .into_owned()
    };
    let mut parts = release
        .split(|c: char| !c.is_ascii_digit())
        .filter_map(|p| p.parse::<u32>().ok());
    let version = (parts.next().unwrap_or(0), parts.next().unwrap_or(0));
    let ok = version >= MIN;
    if !ok {
        tracing::info!(
            kernel = %release,
            "kernel older than 6.3: sessions are relayed in userspace, not spliced"
        );
    }
    ok
}

/// Spliced data waits in the app socket's receive buffer, which the kernel caps at
/// `net.core.rmem_max`; below 4 MiB a slow reader of a bulk transfer (COPY out, a big
/// result) gets less than the userspace relay would give it. Say so once at start.
fn check_splice_rmem() {
    const WANT: u64 = 4 << 20;
    let Ok(text) = std::fs::read_to_string("/proc/sys/net/core/rmem_max") else {
        return;
    };
    if let Ok(v) = text.trim().parse::<u64>()
        && v < WANT
    {
        tracing::warn!(
            rmem_max = v,
            "net.core.rmem_max is below 4194304: spliced sessions move bulk server->client data to slow readers at tens of MB/s; raise it (sysctl -w net.core.rmem_max=4194304) or set broker.splice: false"
        );
    }
}

/// Give the heap a burst of connections left behind back to the OS once the broker is
/// idle again (glibc keeps freed memory in per-thread arenas otherwise): every
/// [`TRIM_EVERY`], if no connection is open and some came and went since the last trim.
pub const TRIM_EVERY: Duration = Duration::from_secs(5);

async fn trim_when_idle(tracker: Arc<Tracker>) {
    let mut trimmed_at = tracker.total();
    let mut tick = tokio::time::interval(TRIM_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let total = tracker.total();
        if total != trimmed_at && tracker.active() == 0 {
            trimmed_at = total;
            // SAFETY: malloc_trim has no preconditions.
            unsafe { libc::malloc_trim(0) };
        }
    }
}

fn spawn_kernel_logger(logger: aya_log::EbpfLogger<&'static dyn log::Log>) {
    tokio::spawn(async move {
        // SAFETY: the logger owns its ring-buffer fd and is moved into the AsyncFd, so
        // the fd stays open for as long as it is registered.
        let Ok(mut fd) = (unsafe {
            tokio::io::unix::AsyncFd::register_with_interest(logger, tokio::io::Interest::READABLE)
        }) else {
            return;
        };
        loop {
            let Ok(mut guard) = fd.readable_mut().await else {
                return;
            };
            guard.get_inner_mut().flush();
            guard.clear_ready();
        }
    });
}

/// Resolve once SIGINT or SIGTERM arrives.
///
/// # Errors
/// When the signal handlers cannot be installed.
pub async fn terminate_signal() -> anyhow::Result<&'static str> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    Ok(tokio::select! {
        _ = term.recv() => "SIGTERM",
        _ = int.recv() => "SIGINT",
    })
}

/// `broker run`.
///
/// # Errors
/// Start-up failures (already detached when this returns).
pub async fn run(
    config_path: &Path,
    cgroup: Option<PathBuf>,
    no_ebpf: bool,
    ebpf_debug: bool,
) -> anyhow::Result<()> {
    let cfg = load_config(config_path)?;
    let attach = if no_ebpf {
        Attach::None
    } else {
        Attach::Cgroup(match cgroup {
            Some(p) => p,
            None => cgroup::cgroup2_root()?,
        })
    };
    let daemon = Daemon::start(
        cfg,
        &StartOptions {
            attach,
            health: true,
            ebpf_debug,
        },
    )
    .await?;
    let sig = terminate_signal().await?;
    tracing::info!(signal = sig, "shutting down");
    daemon.stop().await;
    tracing::info!("stopped");
    Ok(())
}

/// `broker exec -f FILE -- CMD ARGS...`: run CMD in a fresh child cgroup with the
/// programs attached there; return CMD's exit status (128+N if killed by signal N).
///
/// # Errors
/// Set-up failures; CMD's own failure is its exit status.
pub async fn exec(config_path: &Path, cmd: &[OsString], ebpf_debug: bool) -> anyhow::Result<i32> {
    let (program, args) = cmd
        .split_first()
        .ok_or_else(|| anyhow!("broker exec needs a command after `--`"))?;
    let cfg = load_config(config_path)?;
    let root = cgroup::cgroup2_root()?;
    let cg = ChildCgroup::create(&root, &format!("broker-exec-{}", std::process::id()))?;
    let daemon = Daemon::start(
        cfg,
        &StartOptions {
            attach: Attach::Cgroup(cg.path().to_path_buf()),
            health: false,
            ebpf_debug,
        },
    )
    .await?;
    let procs = cg.procs_fd()?;
    let mut command = tokio::process::Command::new(program);
    command.args(args);
    // SAFETY: the closure only calls write(2) on an fd opened before fork.
    unsafe {
        command.pre_exec(move || cgroup::join_from_pre_exec(&procs));
    }
    let mut child = match command.spawn() {
        Ok(c) => c,
        Err(e) => {
            daemon.stop().await;
            return Err(e).with_context(|| format!("starting {}", program.to_string_lossy()));
        }
    };
    let status = {
        use tokio::signal::unix::{SignalKind, signal};
        let mut term = signal(SignalKind::terminate())?;
        let mut hup = signal(SignalKind::hangup())?;
        // SIGINT from a terminal reaches the whole foreground group, CMD included; the
        // broker ignores it and lets CMD decide.
        let mut int = signal(SignalKind::interrupt())?;
        loop {
            tokio::select! {
                st = child.wait() => break st?,
                _ = term.recv() => forward(&child, libc::SIGTERM),
                _ = hup.recv() => forward(&child, libc::SIGHUP),
                _ = int.recv() => {}
            }
        }
    };
    daemon.stop().await;
    cg.remove(Duration::from_secs(5))?;
    drop(cg);
    use std::os::unix::process::ExitStatusExt as _;
    Ok(status
        .code()
        .or_else(|| status.signal().map(|s| 128 + s))
        .unwrap_or(1))
}

fn forward(child: &tokio::process::Child, sig: i32) {
    if let Some(pid) = child.id() {
        // SAFETY: kill(2) on our own child.
        unsafe { libc::kill(pid as i32, sig) };
    }
}
