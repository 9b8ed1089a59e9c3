//! The three commands: `run`, `exec`, `check`.
//!
//! [`Daemon::start`] binds every listener and attaches the programs before anything is
//! served (a conflict fails start-up naming the address); [`Daemon::stop`] stops the
//! `listenOn` listeners, drains live connections up to a deadline while the programs
//! stay attached and the transparent listener keeps brokering, then detaches, closes the
//! transparent listener and ends what is left (docs/ARCHITECTURE.md, "Lifecycle").
//!
//! Listener tasks are supervised ([`supervise`]): one that ends or panics while it
//! should serve turns `/ready` to 503 and makes `broker run` stop and exit non-zero, so
//! the service manager restarts the daemon (rather than restarting the loop in place:
//! whatever killed it may have left shared state broken).

use std::{
    collections::{BTreeMap, BTreeSet},
    ffi::OsString,
    future::Future,
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    os::fd::{AsFd, OwnedFd},
    path::{Path, PathBuf},
    sync::Arc,
    time::Duration,
};

use anyhow::{Context as _, anyhow, bail};
use broker_common::{BrokerSettings, SETTINGS_DEBUG, SETTINGS_ENABLED, SETTINGS_V6};
use tokio::{net::TcpListener, sync::watch, task::JoinSet};

use crate::{
    admin,
    cgroup::{self, ChildCgroup},
    config::{self, Config, ListenAddr},
    connector::Env,
    connector::dial::Dialer,
    ebpf::Interceptor,
    fdstore::Inherited,
    health::{self, Readiness},
    metrics::Metrics,
    proxy::{self, Caps, Shared, Tracker},
    ratelimit::LogLimiter,
    resolver,
    runtime::{self, Runtime},
    secrets::SecretStore,
    sys,
};

/// Exit status for a configuration that does not load (sysexits EX_CONFIG).
pub const EXIT_CONFIG: i32 = 78;
/// How long `stop` waits for live connections before ending them.
pub const DRAIN_DEADLINE: Duration = config::DEFAULT_DRAIN_TIMEOUT;

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
    let cfg = parse_config(path)?;
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

/// Load and validate, accepting what is not built yet.
fn parse_config(path: &Path) -> Result<Config, BadConfig> {
    let shown = path.display().to_string();
    config::load_file(path, &crate::connector::KINDS).map_err(|errs| {
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
    })
}

/// [`load_config`] for a daemon: a service that uses something not built yet (an `ssh`
/// connector, a `keychain` provider) is not served, with an error in the log naming
/// it, and the others are (Secretless' quick start has an `ssh` service beside its
/// PostgreSQL one). `broker check` still fails on them.
///
/// # Errors
/// As [`load_config`] for everything else, and when no service is left to serve.
pub fn load_for_serving(path: &Path) -> Result<Config, BadConfig> {
    let shown = path.display().to_string();
    let mut cfg = parse_config(path)?;
    log_warnings(path, &cfg);
    let unsupported = config::unsupported_by_service(&cfg);
    if unsupported.is_empty() {
        return Ok(cfg);
    }
    let skipped: std::collections::BTreeSet<usize> = unsupported.iter().map(|(i, _)| *i).collect();
    if skipped.len() == cfg.services.len() {
        return Err(BadConfig(
            unsupported
                .iter()
                .map(|(_, e)| format!("{shown}: {e}"))
                .chain([format!("{shown}: no service can be served")])
                .collect::<Vec<_>>()
                .join("\n"),
        ));
    }
    for (i, e) in &unsupported {
        tracing::error!(
            file = %shown,
            service = %cfg.services[*i].name,
            "{e}; this service is not served"
        );
    }
    let mut i = 0;
    cfg.services.retain(|_| {
        i += 1;
        !skipped.contains(&(i - 1))
    });
    Ok(cfg)
}

/// `broker ca [-f FILE | --dir DIR]`: create the local CA if missing; its certificate on
/// stdout, its path on stderr.
///
/// # Errors
/// An invalid configuration, or a CA that cannot be read or created.
pub fn ca(file: Option<&Path>, dir: Option<&Path>) -> anyhow::Result<()> {
    let dir = match (file, dir) {
        (_, Some(d)) => d.to_path_buf(),
        (Some(f), None) => {
            config::load_file(f, &crate::connector::KINDS)
                .map_err(|e| anyhow::anyhow!("{}:\n{e}", f.display()))?
                .broker
                .ca_dir
        }
        (None, None) => std::path::PathBuf::from(config::DEFAULT_CA_DIR),
    };
    let ca = crate::ca::LocalCa::load_or_create(&dir)?;
    let pem = std::fs::read_to_string(ca.cert_path())
        .with_context(|| format!("reading {}", ca.cert_path().display()))?;
    let mut out = std::io::stdout().lock();
    std::io::Write::write_all(&mut out, pem.as_bytes())?;
    let _ = std::io::Write::write_all(
        &mut std::io::stderr(),
        format!("{}\n", ca.cert_path().display()).as_bytes(),
    );
    Ok(())
}

/// `broker check FILE`: print every error and warning (or a summary) and return the exit
/// status. `strict`: warnings (what Secretless tolerates and we accept) fail the check too.
#[must_use]
pub fn check(path: &Path, strict: bool) -> i32 {
    match load_config(path) {
        Ok(cfg) => {
            let shown = path.display();
            let level = if strict { "error" } else { "warning" };
            for w in &cfg.warnings {
                eprintln!("{shown}: {level}: {w}");
            }
            // Services that cannot share their listenOn address.
            if let Err(e) = crate::runtime::check(&cfg) {
                eprintln!("{shown}: error: {e:#}");
                return EXIT_CONFIG;
            }
            if strict && !cfg.warnings.is_empty() {
                eprintln!(
                    "{shown}: {} warning(s), failing because of --strict",
                    cfg.warnings.len()
                );
                return EXIT_CONFIG;
            }
            let intercepts: usize = cfg.services.iter().map(|s| s.intercept.len()).sum();
            println!(
                "{shown}: OK: {} service(s), {} intercept target(s){}",
                cfg.services.len(),
                intercepts,
                match cfg.warnings.len() {
                    0 => String::new(),
                    n => format!(", {n} warning(s)"),
                }
            );
            0
        }
        Err(BadConfig(text)) => {
            eprintln!("{text}");
            EXIT_CONFIG
        }
    }
}

/// Log the configuration's warnings (`run`, `exec`), each naming the file and key.
pub fn log_warnings(path: &Path, cfg: &Config) {
    for w in &cfg.warnings {
        tracing::warn!(file = %path.display(), "{w}");
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
    /// Take over the descriptors the service manager passed (`LISTEN_FDS`) and give it
    /// ours to keep across a restart (`broker run` only; see [`crate::fdstore`]).
    pub handover: bool,
}

/// A started broker.
pub struct Daemon {
    interceptor: Option<Arc<Interceptor>>,
    readiness: Arc<Readiness>,
    /// Stops the transparent listeners, the resolver and the health endpoint (after the
    /// drain, once the programs are detached).
    detach_tx: watch::Sender<bool>,
    abort_tx: watch::Sender<bool>,
    tracker: Arc<Tracker>,
    tasks: JoinSet<()>,
    /// The transparent listeners' supervised tasks: awaited so that the listening
    /// sockets are closed before the connections left are ended.
    transparent_tasks: JoinSet<()>,
    /// Where the transparent listener is bound (None with `--no-ebpf`).
    pub transparent: Option<SocketAddr>,
    /// What `/metrics` serves.
    pub metrics: Arc<Metrics>,
    /// What a reload needs: the accept loops' shared state (with the snapshot in force),
    /// the `listenOn` listeners by id, the settings of the start.
    reload: Reloadable,
    /// The service manager holds the listeners and programs for the next start: stop
    /// leaves the programs redirecting and the `listenOn` listeners accepting until the
    /// drain is over (see [`crate::fdstore`]).
    handed_over: bool,
}

/// The parts of a started daemon a reload changes.
struct Reloadable {
    shared: Shared,
    /// Each `listenOn` listener: its address and its own stop switch (a reload that
    /// removes it stops it alone; `stop` stops them all).
    explicit: BTreeMap<u32, (ListenAddr, watch::Sender<bool>)>,
    /// The resolver task keeping the kernel's targets current (replaced on reload).
    resolver: Option<tokio::task::JoinHandle<()>>,
    /// The `broker:` settings of the start (a reload cannot change them: logged).
    broker: config::BrokerSettings,
    splice_ok: bool,
    /// A descriptor of each TCP `listenOn` listener, for the service manager's store
    /// (empty without one).
    stored: BTreeMap<u32, OwnedFd>,
}

impl Reloadable {
    /// Keep `l`'s descriptor for the store (when there is one).
    fn keep_for_store(&mut self, id: u32, l: &proxy::Listener) {
        if let (true, proxy::Listener::Tcp(t)) = (crate::fdstore::enabled(), l)
            && let Ok(fd) = t.as_fd().try_clone_to_owned()
        {
            self.stored.insert(id, fd);
        }
    }

    /// Make the store hold the `listenOn` listeners there are now, as many as it takes
    /// after the other descriptors (`fdstore::capacity`).
    fn store_listeners(&self) {
        if !crate::fdstore::enabled() {
            return;
        }
        let room = crate::fdstore::capacity().saturating_sub(8);
        if self.stored.len() > room {
            tracing::warn!(
                listeners = self.stored.len(),
                kept = room,
                "the service manager's descriptor store is too small for every listenOn listener (FileDescriptorStoreMax=): the others refuse connects during a restart"
            );
        }
        let fds: Vec<_> = self.stored.values().take(room).map(AsFd::as_fd).collect();
        crate::fdstore::replace(crate::fdstore::LISTEN, &fds);
    }
}

/// The audit sink of the configuration in force: a reload keeps it (`broker.audit` is
/// part of the `broker:` block, applied at restart).
fn old_audit(r: &Reloadable) -> crate::audit::AuditLog {
    r.shared.runtime.load().env.secrets.audit().clone()
}

fn list_or_none(names: &[String]) -> String {
    if names.is_empty() {
        "none".to_owned()
    } else {
        names.join(", ")
    }
}

/// The names of the services `new` adds to `old`, and of those it removes.
fn service_changes(old: &Runtime, new: &Runtime) -> (Vec<String>, Vec<String>) {
    let names = |rt: &Runtime| -> BTreeSet<String> {
        rt.services()
            .iter()
            .map(|s| s.service.name.clone())
            .collect()
    };
    let (a, b) = (names(old), names(new));
    (
        b.difference(&a).cloned().collect(),
        a.difference(&b).cloned().collect(),
    )
}

/// The `broker:` keys whose value differs (they apply at the next restart).
fn broker_changes(old: &config::BrokerSettings, new: &config::BrokerSettings) -> Vec<&'static str> {
    let mut out = Vec::new();
    let mut cmp = |name: &'static str, a: String, b: String| {
        if a != b {
            out.push(name);
        }
    };
    cmp(
        "health",
        format!("{:?}", old.health_addr),
        format!("{:?}", new.health_addr),
    );
    cmp(
        "transparentPort",
        old.transparent_port.to_string(),
        new.transparent_port.to_string(),
    );
    cmp(
        "bypassMark",
        old.bypass_mark.to_string(),
        new.bypass_mark.to_string(),
    );
    cmp("splice", old.splice.to_string(), new.splice.to_string());
    cmp(
        "maxConnections",
        old.max_connections.to_string(),
        new.max_connections.to_string(),
    );
    cmp(
        "maxConnectionsPerListener",
        old.max_connections_per_listener.to_string(),
        new.max_connections_per_listener.to_string(),
    );
    cmp(
        "drainTimeout",
        format!("{:?}", old.drain_timeout),
        format!("{:?}", new.drain_timeout),
    );
    cmp(
        "caDir",
        old.ca_dir.display().to_string(),
        new.ca_dir.display().to_string(),
    );
    cmp(
        "unixSocket",
        format!("{:?}", old.unix_socket),
        format!("{:?}", new.unix_socket),
    );
    out
}

/// Bind a listener's `listenOn` address (`None` for a service without one), or adopt
/// the listener a previous process left bound there (`inherited`).
async fn bind_listen_on(
    rt: &runtime::ServiceRt,
    broker: &config::BrokerSettings,
    inherited: &mut Inherited,
) -> anyhow::Result<Option<proxy::Listener>> {
    let s = &rt.service;
    Ok(match &s.listen_on {
        Some(ListenAddr::Tcp(addr)) => {
            let what = format!("listenOn of service {}", s.name);
            if let Some(l) = inherited.take_listener(*addr) {
                tracing::info!(%addr, service = %s.name, "listenOn listener taken over");
                return Ok(Some(proxy::Listener::Tcp(adopt(l, &what)?)));
            }
            Some(proxy::Listener::Tcp(bind(*addr, &what).await?))
        }
        Some(ListenAddr::Unix(p)) => {
            // Mode and owner in place before it accepts; its file goes when the
            // listener does (on every error path too).
            let opts = s.unix_socket.over(&broker.unix_socket);
            Some(proxy::Listener::Unix(proxy::unix::bind(p, &opts, &s.name)?))
        }
        None => None,
    })
}

/// The local CA, when a service of `runtime` presents certificates to apps: `loaded`
/// (a reload keeps the one it has), or loaded (created on first use) from `caDir`.
fn load_ca(
    runtime: &Runtime,
    broker: &config::BrokerSettings,
    loaded: Option<Arc<crate::ca::LocalCa>>,
) -> anyhow::Result<Option<Arc<crate::ca::LocalCa>>> {
    let using_ca = || {
        runtime
            .services()
            .iter()
            .filter(|rt| rt.connector.uses_ca())
    };
    if using_ca().next().is_none() || loaded.is_some() {
        return Ok(loaded);
    }
    let dir = &broker.ca_dir;
    match crate::ca::LocalCa::load_or_create(dir) {
        Ok(ca) => {
            tracing::info!(cert = %ca.cert_path().display(), "local CA loaded (apps verify the broker's certificates with it)");
            Ok(Some(Arc::new(ca)))
        }
        // Secretless' quick start runs its broker as an unprivileged user: its HTTP
        // proxy must not need a CA in /var/lib/broker.
        Err(e) if using_ca().all(|rt| rt.connector.ca_optional()) => {
            tracing::warn!(
                error = format!("{e:#}"),
                "broker.caDir {}: no local CA; HTTP proxies on listenOn relay CONNECT \
                 tunnels without decrypting them (as Secretless) and refuse TLS sent to \
                 themselves",
                dir.display()
            );
            Ok(None)
        }
        Err(e) => Err(e).with_context(|| format!("broker.caDir {}", dir.display())),
    }
}

/// The services whose sessions may be spliced in the kernel after auth.
fn splice_services(runtime: &Runtime, broker: &config::BrokerSettings) -> BTreeSet<u32> {
    runtime
        .services()
        .iter()
        .filter(|rt| broker.splice && rt.connector.splices())
        .map(|rt| rt.id)
        .collect()
}

/// Start serving a bound `listenOn` listener under supervision; returns its stop switch.
fn spawn_listen_on(
    tasks: &mut JoinSet<()>,
    shared: &Shared,
    readiness: &Arc<Readiness>,
    id: u32,
    l: proxy::Listener,
) -> watch::Sender<bool> {
    let addr = l.describe();
    let name = shared
        .runtime
        .load()
        .listener(id)
        .map(|rt| rt.service.name.clone())
        .unwrap_or_default();
    tracing::info!(service = %name, %addr, "listenOn bound");
    let (tx, rx) = watch::channel(false);
    supervise(
        tasks,
        format!("listenOn {addr} of service {name}"),
        proxy::serve_explicit(l, shared.clone(), id, rx.clone()),
        rx,
        Arc::clone(readiness),
    );
    tx
}

async fn bind(addr: SocketAddr, what: &str) -> anyhow::Result<TcpListener> {
    listen(addr).with_context(|| format!("binding {what} on {addr}"))
}

/// The accept queue of every TCP listener: the kernel caps it at `net.core.somaxconn`
/// (4096 on current kernels). tokio's `bind` asks for 1024, which a burst of connects
/// (10,000 a second from one python loop) overflows: the kernel then drops the SYN and
/// the client's connect takes a second longer, the retransmission timeout.
const LISTEN_BACKLOG: u32 = 4096;

/// Bind and listen on `addr` (`SO_REUSEADDR`, as tokio's `bind`), with [`LISTEN_BACKLOG`].
fn listen(addr: SocketAddr) -> std::io::Result<TcpListener> {
    let s = if addr.is_ipv4() {
        tokio::net::TcpSocket::new_v4()?
    } else {
        tokio::net::TcpSocket::new_v6()?
    };
    s.set_reuseaddr(true)?;
    s.bind(addr)?;
    s.listen(LISTEN_BACKLOG)
}

/// A listener passed by the service manager, for tokio.
fn adopt(l: std::net::TcpListener, what: &str) -> anyhow::Result<TcpListener> {
    l.set_nonblocking(true)
        .and_then(|()| TcpListener::from_std(l))
        .with_context(|| format!("taking over the {what}"))
}

/// The transparent listeners a previous process left (`inherited`), when they are on
/// `port` (0: any); else bind them on 127.0.0.1:port and [::1]:port (same port).
async fn bind_transparent(
    port: u16,
    inherited: &mut Inherited,
) -> anyhow::Result<(TcpListener, Option<TcpListener>)> {
    let mut previous = inherited.take_transparent();
    previous.retain(|l| l.local_addr().is_ok_and(|a| port == 0 || a.port() == port));
    if let Some(i) = previous
        .iter()
        .position(|l| l.local_addr().is_ok_and(|a| a.is_ipv4()))
    {
        let v4 = previous.swap_remove(i);
        let p = v4.local_addr()?.port();
        let v6 = previous
            .into_iter()
            .find(|l| l.local_addr().is_ok_and(|a| a.is_ipv6() && a.port() == p));
        tracing::info!(
            port = p,
            "transparent listener taken over from the previous process"
        );
        let what = "transparent listener";
        return Ok((adopt(v4, what)?, v6.map(|l| adopt(l, what)).transpose()?));
    }
    for _ in 0..20 {
        let v4 = bind(
            SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), port),
            "transparent listener",
        )
        .await?;
        let p = v4.local_addr()?.port();
        match listen(SocketAddr::new(IpAddr::V6(Ipv6Addr::LOCALHOST), p)) {
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
        // First: nothing may take the numbers of the descriptors passed.
        let mut inherited = if opts.handover {
            Inherited::from_env()
        } else {
            Inherited::default()
        };
        let metrics = Arc::new(Metrics::new());
        let audit = crate::audit::AuditLog::open(&cfg.broker.audit)?;
        let secrets = Arc::new(
            SecretStore::new(&cfg)
                .context("setting up providers")?
                .with_metrics(&metrics)
                .with_audit(audit),
        );
        let dialer = Dialer {
            mark: cfg.broker.bypass_mark,
        };
        // The first snapshot of this process: generation 1.
        let mut runtime = Runtime::build(
            &cfg,
            1,
            Env {
                secrets: Arc::clone(&secrets),
                dialer,
                ca: None,
            },
        )?;
        let (detach_tx, detach_rx) = watch::channel(false);
        let (abort_tx, abort_rx) = watch::channel(false);
        let readiness = Arc::new(Readiness::default());
        let tracker = Arc::new(Tracker::default());
        let caps = Arc::new(Caps::new(
            &cfg.broker,
            runtime.listeners(),
            matches!(opts.attach, Attach::Cgroup(_)),
        )?);

        // 1. Bind everything first.
        let health = match (opts.health, cfg.broker.health_addr) {
            (true, Some(addr)) => Some(bind(addr, "health endpoint").await?),
            _ => None,
        };
        // `broker status`'s socket: the daemon's (not `exec`'s), like the health endpoint.
        let admin_socket = if opts.health {
            admin::bind(&cfg.broker.admin_socket)?
        } else {
            None
        };
        let mut explicit = Vec::new();
        for rt in runtime.listeners() {
            if let Some(l) = bind_listen_on(rt, &cfg.broker, &mut inherited).await? {
                explicit.push((rt.id, l));
            }
        }

        // The local CA, when a service presents certificates to apps.
        runtime.env.ca = load_ca(&runtime, &cfg.broker, None)?;

        // 2. Attach.
        let mut interceptor = None;
        let mut transparent = None;
        let mut transparent_listeners = Vec::new();
        let mut targets = None;
        let names = Arc::new(resolver::HostNames::default());
        if let Attach::Cgroup(cgroup) = &opts.attach {
            let (v4, v6) = bind_transparent(cfg.broker.transparent_port, &mut inherited).await?;
            let port = v4.local_addr()?.port();
            // Native IPv6 destinations are redirected to [::1]:P only while we hold it:
            // otherwise any local user could bind it and receive them.
            let v6_flag = if v6.is_some() { SETTINGS_V6 } else { 0 };
            transparent = Some(v4.local_addr()?);
            transparent_listeners.push(v4);
            transparent_listeners.extend(v6);

            let per_service: Vec<(u32, &[config::InterceptTarget])> = runtime
                .services()
                .iter()
                .map(|rt| (rt.id, rt.service.intercept.as_slice()))
                .collect();
            let mut t = resolver::Targets::new(&per_service);
            t.refresh_due().await;
            names.publish(&t);
            let settings = BrokerSettings {
                flags: SETTINGS_ENABLED
                    | v6_flag
                    | if opts.ebpf_debug { SETTINGS_DEBUG } else { 0 },
                bypass_mark: cfg.broker.bypass_mark,
                bypass_tgid: std::process::id(),
                listen_port: port,
                _pad: 0,
                netns_cookie: 0, // Interceptor::attach: this process's namespace
            };
            // Sessions of these services may be spliced in the kernel after auth.
            let splice_services = splice_services(&runtime, &cfg.broker);
            let splice_services = if splice_services.is_empty() || splice_kernel_ok() {
                splice_services
            } else {
                BTreeSet::new()
            };
            if !splice_services.is_empty() {
                check_splice_rmem();
            }
            match crate::cgroup::is_v2_dir(cgroup) {
                Ok(true) => {}
                Ok(false) => anyhow::bail!(
                    "--cgroup {} is not a cgroup v2 directory (the cgroup v2 hierarchy is mounted at {})",
                    cgroup.display(),
                    crate::cgroup::cgroup2_root().map_or_else(
                        |_| "no place: none is mounted".to_owned(),
                        |r| r.display().to_string()
                    )
                ),
                Err(e) => {
                    return Err(e).with_context(|| format!("--cgroup {}", cgroup.display()));
                }
            }
            let mut i = Interceptor::attach(
                cgroup,
                settings,
                &t.current(),
                splice_services,
                runtime.generation,
                crate::ebpf::Previous {
                    links: inherited.take(crate::fdstore::LINKS),
                    records: inherited.take(crate::fdstore::RECORDS).pop(),
                },
            )
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

        // What a previous process left and this configuration does not use is closed;
        // what this one uses goes to the service manager's store (replacing the previous
        // process's: its links go, and its programs detach, now that ours are attached).
        inherited.finish();
        let handed_over = opts.handover && crate::fdstore::enabled();
        if handed_over {
            let dup = |l: &TcpListener| l.as_fd().try_clone_to_owned().ok();
            let transparent_fds: Vec<OwnedFd> =
                transparent_listeners.iter().filter_map(dup).collect();
            let fds: Vec<_> = transparent_fds.iter().map(AsFd::as_fd).collect();
            crate::fdstore::replace(crate::fdstore::TRANSPARENT, &fds);
            let (links, records) = interceptor.as_ref().map_or((Vec::new(), None), |i| {
                let (l, r) = i.handover();
                (l, Some(r))
            });
            crate::fdstore::replace(crate::fdstore::LINKS, &links);
            crate::fdstore::replace(crate::fdstore::RECORDS, records.as_slice());
            tracing::info!(
                links = links.len(),
                "listeners and programs handed to the service manager's descriptor store: a restart keeps them"
            );
        }

        // 3. Serve.
        let refusals = Arc::new(LogLimiter::new(
            "refusals",
            proxy::REFUSAL_LOG_PER_SEC,
            Duration::from_secs(1),
        ));
        let shared = Shared {
            runtime: Arc::new(runtime::Current::new(runtime)),
            interceptor: interceptor.as_ref().map(Arc::downgrade),
            tracker: Arc::clone(&tracker),
            abort: abort_rx,
            caps: Arc::clone(&caps),
            refusals: Arc::clone(&refusals),
            names: Arc::clone(&names),
            metrics: Arc::clone(&metrics),
            revocations: Arc::default(),
        };
        if let Some(i) = &interceptor {
            metrics.watch_kernel(Arc::downgrade(i), Arc::downgrade(&shared.runtime));
        }
        let mut tasks = JoinSet::new();
        let mut transparent_tasks = JoinSet::new();
        let resolver = match (targets, &interceptor) {
            (Some(t), Some(i)) if t.has_hosts() => Some(tokio::spawn(resolver::run(
                t,
                Arc::downgrade(i),
                Arc::clone(&names),
                detach_rx.clone(),
            ))),
            _ => None,
        };
        for l in transparent_listeners {
            let addr = l.local_addr()?;
            tracing::info!(%addr, "transparent listener bound");
            supervise(
                &mut transparent_tasks,
                format!("transparent listener {addr}"),
                proxy::serve_transparent(l, shared.clone(), detach_rx.clone()),
                detach_rx.clone(),
                Arc::clone(&readiness),
            );
        }
        let mut listen_on = BTreeMap::new();
        let mut reload = Reloadable {
            shared: shared.clone(),
            explicit: BTreeMap::new(),
            resolver: None,
            broker: cfg.broker.clone(),
            splice_ok: splice_kernel_ok(),
            stored: BTreeMap::new(),
        };
        for (id, l) in explicit {
            if handed_over {
                reload.keep_for_store(id, &l);
            }
            let sw = spawn_listen_on(&mut tasks, &shared, &readiness, id, l);
            if let Some(addr) = shared
                .runtime
                .load()
                .listener(id)
                .and_then(|rt| rt.service.listen_on.clone())
            {
                listen_on.insert(id, (addr, sw));
            }
        }
        if handed_over {
            reload.store_listeners();
        }
        if let Some(h) = health {
            tracing::info!(addr = %h.local_addr()?, "health endpoint bound");
            tasks.spawn(health::serve(
                h,
                Arc::clone(&readiness),
                cfg.broker.metrics.then(|| Arc::clone(&metrics)),
                detach_rx.clone(),
            ));
        }
        if let Some(sock) = admin_socket {
            let state = Arc::new(admin::Admin {
                runtime: Arc::clone(&shared.runtime),
                tracker: Arc::clone(&tracker),
                names: Arc::clone(&names),
                interceptor: interceptor.as_ref().map(Arc::downgrade),
                readiness: Arc::clone(&readiness),
                transparent,
                started: std::time::SystemTime::now(),
                revocations: Arc::clone(&shared.revocations),
            });
            tasks.spawn(admin::serve(sock, state, detach_rx.clone()));
        }
        tasks.spawn(trim_when_idle(Arc::clone(&tracker)));
        tasks.spawn(secrets.sweeper());
        tasks.spawn(summarise_suppressed(vec![refusals, caps]));
        // Loading the programs parses the kernel's BTF (megabytes) for relocations; give
        // that memory back to the OS instead of keeping it as free heap forever.
        crate::sys::malloc_trim();
        readiness.set_started();
        tracing::info!(
            services = shared.runtime.load().services().len(),
            "broker ready"
        );
        Ok(Self {
            interceptor,
            readiness,
            detach_tx,
            abort_tx,
            tracker,
            tasks,
            transparent_tasks,
            transparent,
            reload: Reloadable {
                explicit: listen_on,
                resolver,
                ..reload
            },
            metrics,
            handed_over,
        })
    }

    /// Resolves with the reason once a listener task has died (see [`supervise`]).
    /// Apply a new configuration, validated already (`load_for_serving`), without a
    /// restart. Everything that can fail is done before anything changes: the new
    /// snapshot (connectors, a fresh secret store: every credential is fetched anew), its
    /// new `listenOn` listeners bound, its intercept hostnames resolved. Then the snapshot
    /// is swapped in (connections in flight keep theirs; redirect records written under
    /// the old one are served by it for `runtime::RETIRED_GRACE`), the kernel targets
    /// are rewritten in place with the new generation (no detach, no gap), and removed
    /// listeners stop. Returns a one-line summary.
    ///
    /// # Errors
    /// What the new configuration needs and this daemon cannot give without a restart
    /// (intercept targets without the programs, a `listenOn` address that cannot be
    /// bound...): nothing has changed then.
    pub async fn reload(&mut self, cfg: Config) -> anyhow::Result<String> {
        runtime::check(&cfg)?;
        let r = &mut self.reload;
        let changed_broker = broker_changes(&r.broker, &cfg.broker);
        if !changed_broker.is_empty() {
            tracing::warn!(
                keys = %changed_broker.join(", "),
                "broker settings changed: they take effect at the next restart"
            );
        }
        let old = r.shared.runtime.load();
        let generation = old.generation.wrapping_add(1).max(1);
        let secrets = Arc::new(
            SecretStore::new(&cfg)
                .context("setting up providers")?
                .with_metrics(&self.metrics)
                .with_audit(old_audit(r)),
        );
        let mut runtime = Runtime::build(
            &cfg,
            generation,
            Env {
                secrets: Arc::clone(&secrets),
                dialer: old.env.dialer,
                ca: None,
            },
        )?;
        runtime.env.ca = load_ca(&runtime, &r.broker, old.env.ca.clone())?;
        let intercepts = runtime
            .services()
            .iter()
            .any(|s| !s.service.intercept.is_empty());
        if intercepts && self.interceptor.is_none() {
            bail!(
                "the new configuration has intercept targets, but this daemon runs without \
                 the eBPF programs (started with --no-ebpf, or without intercept targets): \
                 restart it to apply"
            );
        }
        // New listeners: bound now (a failure changes nothing). An address a removed
        // listener still holds is bound once that one has stopped.
        let mut bound = Vec::new();
        let mut later = Vec::new();
        // A listener is kept when the new configuration has it (same id) at the same
        // address; its connections then find the new snapshot's service.
        let kept = |explicit: &BTreeMap<u32, (ListenAddr, watch::Sender<bool>)>,
                    rt: &runtime::ServiceRt| {
            explicit
                .get(&rt.id)
                .is_some_and(|(a, _)| Some(a) == rt.service.listen_on.as_ref())
        };
        for rt in runtime.listeners() {
            if kept(&r.explicit, rt) {
                continue;
            }
            r.shared.caps.add_listener(rt.id)?;
            let held = r
                .explicit
                .values()
                .any(|(a, _)| Some(a) == rt.service.listen_on.as_ref());
            if held {
                later.push(Arc::clone(rt));
            } else if let Some(l) = bind_listen_on(rt, &r.broker, &mut Inherited::default()).await?
            {
                bound.push((rt.id, l));
            }
        }
        let targets = if self.interceptor.is_some() {
            let per_service: Vec<(u32, &[config::InterceptTarget])> = runtime
                .services()
                .iter()
                .map(|rt| (rt.id, rt.service.intercept.as_slice()))
                .collect();
            let mut t = resolver::Targets::new(&per_service);
            t.refresh_due().await;
            Some(t)
        } else {
            None
        };
        let splice = if r.splice_ok {
            splice_services(&runtime, &r.broker)
        } else {
            BTreeSet::new()
        };
        let wanted: BTreeSet<u32> = runtime
            .listeners()
            .iter()
            .filter(|rt| kept(&r.explicit, rt))
            .map(|rt| rt.id)
            .collect();
        let (added, removed) = service_changes(&old, &runtime);

        // Commit.
        self.tasks.spawn(secrets.sweeper());
        r.shared.runtime.swap(runtime);
        drop(old);
        if let (Some(i), Some(t)) = (&self.interceptor, targets) {
            if let Some(h) = r.resolver.take() {
                h.abort();
                let _ = h.await;
            }
            r.shared.names.publish(&t);
            i.reconfigure(&t.current(), splice, generation)
                .context("updating the kernel's intercept targets")?;
            if t.has_hosts() {
                r.resolver = Some(tokio::spawn(resolver::run(
                    t,
                    Arc::downgrade(i),
                    Arc::clone(&r.shared.names),
                    self.detach_tx.subscribe(),
                )));
            }
        }
        let gone: Vec<u32> = r
            .explicit
            .keys()
            .filter(|id| !wanted.contains(id))
            .copied()
            .collect();
        for id in &gone {
            r.stored.remove(id);
            if let Some((addr, stop)) = r.explicit.remove(id) {
                let _ = stop.send(true);
                tracing::info!(listen_on = %addr, "listenOn stopped (removed by the reload)");
            }
        }
        let mut failed = Vec::new();
        if !later.is_empty() {
            // The removed listeners' sockets close as their tasks end.
            tokio::time::sleep(Duration::from_millis(100)).await;
            for rt in later {
                match bind_listen_on(&rt, &r.broker, &mut Inherited::default()).await {
                    Ok(Some(l)) => bound.push((rt.id, l)),
                    Ok(None) => {}
                    Err(e) => {
                        tracing::error!(service = %rt.service.name, error = %format!("{e:#}"), "listenOn not bound after the reload");
                        failed.push(rt.service.name.clone());
                    }
                }
            }
        }
        let current = r.shared.runtime.load();
        for (id, l) in bound {
            if self.handed_over {
                r.keep_for_store(id, &l);
            }
            let sw = spawn_listen_on(&mut self.tasks, &r.shared, &self.readiness, id, l);
            if let Some(addr) = current
                .listener(id)
                .and_then(|rt| rt.service.listen_on.clone())
            {
                r.explicit.insert(id, (addr, sw));
            }
        }
        if self.handed_over {
            r.store_listeners();
        }
        let summary = format!(
            "generation {generation}: {} service(s); added: {}; removed: {}{}",
            current.services().len(),
            list_or_none(&added),
            list_or_none(&removed),
            if failed.is_empty() {
                String::new()
            } else {
                format!("; listenOn NOT bound: {}", failed.join(", "))
            }
        );
        if failed.is_empty() {
            Ok(summary)
        } else {
            Err(anyhow!(summary))
        }
    }

    /// Wait (2 s at most) for the transparent accept loops to end (`detach_tx` sent).
    async fn join_transparent(&mut self) {
        let closing = async { while self.transparent_tasks.join_next().await.is_some() {} };
        if tokio::time::timeout(Duration::from_secs(2), closing)
            .await
            .is_err()
        {
            self.transparent_tasks.abort_all();
        }
    }

    pub async fn failed(&self) -> String {
        self.readiness.failed().await
    }

    /// Shut down: `/ready` turns 503 and the `listenOn` listeners stop accepting; live
    /// connections drain (up to `broker.drainTimeout`, [`DRAIN_DEADLINE`] by default) while the programs stay attached and
    /// the transparent listener keeps brokering new intercepted connections (detached,
    /// they would go straight to the real servers); then the programs are detached, the
    /// transparent listener is closed (in that order: the other way round, a connection
    /// redirected in between would find the port closed, or bound by another local
    /// process), and the connections still open are ended.
    ///
    /// When the service manager holds the listeners and programs for the next start
    /// (see [`crate::fdstore`]), the `listenOn` listeners keep accepting through the drain
    /// too, and the programs are not switched off: connects that come once this process
    /// has stopped accepting wait in the listeners' backlogs for the next one.
    pub async fn stop(mut self) {
        self.readiness.set_stopping();
        if !self.handed_over {
            for (_, stop) in self.reload.explicit.values() {
                let _ = stop.send(true);
            }
        }
        let active = self.tracker.active();
        if active > 0 {
            tracing::info!(
                active,
                "draining connections (intercepted connections are still brokered meanwhile)"
            );
        }
        self.tracker.drain(self.reload.broker.drain_timeout).await;
        for (_, stop) in self.reload.explicit.values() {
            let _ = stop.send(true);
        }
        if self.handed_over {
            // The programs keep redirecting into the listeners the service manager holds:
            // stop accepting (what comes now waits in the backlogs for the next process),
            // let the last connections accepted take their records and finish, and only
            // then let go of the maps.
            let _ = self.detach_tx.send(true);
            self.join_transparent().await;
            self.tracker.drain(self.reload.broker.drain_timeout).await;
            drop(self.interceptor.take());
            tracing::info!(
                "the service manager keeps the programs attached and the listeners open for the next start"
            );
        } else {
            if let Some(i) = self.interceptor.take() {
                i.disable();
                drop(i);
                tracing::info!("eBPF programs detached");
            }
            let _ = self.detach_tx.send(true);
            self.join_transparent().await;
        }
        let left = self.tracker.active();
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
        if let Some(r) = self.reload.resolver.take() {
            r.abort();
        }
        // No connection is left: leases can go (`revokeOnShutdown`).
        let secrets = Arc::clone(&self.reload.shared.runtime.load().env.secrets);
        drop(self.reload);
        secrets.shutdown().await;
        secrets.audit().flush(Duration::from_secs(2));
    }
}

/// Run a listener's accept loop as a task of `tasks` and watch it. An accept loop ends only
/// when `stop` turns true; if it ends before, or panics, the listener is dead (every
/// connection to it would be refused by the kernel, or left in its backlog, while the
/// programs stay attached): [`Readiness::listener_failed`] turns `/ready` to 503 and
/// `broker run` stops and exits non-zero, so the service manager restarts the daemon.
pub fn supervise(
    tasks: &mut JoinSet<()>,
    what: String,
    serve: impl Future<Output = ()> + Send + 'static,
    stop: watch::Receiver<bool>,
    readiness: Arc<Readiness>,
) {
    tasks.spawn(async move {
        use futures_util::FutureExt as _;
        // Polled in this task, not one of its own: when shutdown aborts `tasks`, the
        // accept loop and its listener (a Unix socket's file) are gone by the time the
        // set reports this task ended, not at some later turn of the runtime, which an
        // exiting process may never reach.
        let res = std::panic::AssertUnwindSafe(serve).catch_unwind().await;
        if res.is_ok() && *stop.borrow() {
            return;
        }
        let why = match res {
            Ok(()) => format!("{what}: the accept loop ended unexpectedly"),
            Err(p) => {
                let text = p
                    .downcast_ref::<&str>()
                    .map(|s| (*s).to_owned())
                    .or_else(|| p.downcast_ref::<String>().cloned())
                    .unwrap_or_else(|| "(no message)".to_owned());
                format!("{what}: the accept loop panicked: {text}")
            }
        };
        tracing::error!(error = %why, "listener task died: not ready, shutting down");
        readiness.listener_failed(why);
    });
}

/// Every second, one line per rate-limited kind with what it suppressed.
async fn summarise_suppressed(limiters: Vec<Arc<dyn Suppressed>>) {
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        for l in &limiters {
            let (what, n) = l.take();
            if n > 0 {
                tracing::warn!(
                    target: "access",
                    suppressed = n,
                    "suppressed {n} {what} in the last second"
                );
            }
        }
    }
}

/// Something holding a [`LogLimiter`] (the refusal limiter, the caps).
trait Suppressed: Send + Sync {
    fn take(&self) -> (&'static str, u64);
}

impl Suppressed for LogLimiter {
    fn take(&self) -> (&'static str, u64) {
        (self.what, self.take_summary())
    }
}

impl Suppressed for Caps {
    fn take(&self) -> (&'static str, u64) {
        (self.log.what, self.log.take_summary())
    }
}

/// Process settings for a daemon holding secrets: a file-descriptor limit sized for
/// the connection caps, and no core dumps (see [`sys`]). Logged, never fatal.
fn harden_process() {
    match sys::raise_nofile_limit() {
        Ok(l) => tracing::info!(
            soft_before = l.soft_before,
            soft = l.soft,
            hard = l.hard,
            "file descriptor limit (RLIMIT_NOFILE)"
        ),
        Err(e) => tracing::warn!(error = %e, "cannot raise RLIMIT_NOFILE"),
    }
    if let Err(e) = sys::make_undumpable() {
        tracing::warn!(
            error = %e,
            "cannot disable core dumps (PR_SET_DUMPABLE, RLIMIT_CORE): secrets may reach a dump"
        );
    }
}

/// The splice needs a stream verdict without a parser (kernel 5.13), the sockmap fixes
/// of the following releases and the `sock_recv_length` tracepoint (6.3); it is tested
/// on 6.x. Older kernels relay in userspace.
fn splice_kernel_ok() -> bool {
    const MIN: (u32, u32) = (6, 3);
    let Some(release) = crate::sys::kernel_release() else {
        return false;
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
            crate::sys::malloc_trim();
        }
    }
}

fn spawn_kernel_logger(logger: aya_log::EbpfLogger<&'static dyn log::Log>) {
    tokio::spawn(async move {
        let Ok(mut fd) = crate::sys::async_readable(logger) else {
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

/// The daemon's signal handlers, installed before start-up: SIGHUP's default action
/// would kill the process (service managers send it to reload), and so would SIGUSR1's
/// (Secretless Broker's reload signal).
/// What a signal asks of the daemon.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Signal {
    Stop(&'static str),
    Reload(&'static str),
}

pub struct Signals {
    term: tokio::signal::unix::Signal,
    int: tokio::signal::unix::Signal,
    hup: tokio::signal::unix::Signal,
    usr1: tokio::signal::unix::Signal,
}

impl Signals {
    /// Install the handlers.
    ///
    /// # Errors
    /// When a handler cannot be installed.
    pub fn install() -> anyhow::Result<Self> {
        use tokio::signal::unix::{SignalKind, signal};
        Ok(Self {
            term: signal(SignalKind::terminate())?,
            int: signal(SignalKind::interrupt())?,
            hup: signal(SignalKind::hangup())?,
            usr1: signal(SignalKind::user_defined1())?,
        })
    }

    /// The next signal: SIGTERM and SIGINT stop, SIGHUP and SIGUSR1 (Secretless'
    /// reload signal) reload.
    pub async fn next(&mut self) -> Signal {
        tokio::select! {
            _ = self.term.recv() => Signal::Stop("SIGTERM"),
            _ = self.int.recv() => Signal::Stop("SIGINT"),
            _ = self.hup.recv() => Signal::Reload("SIGHUP"),
            _ = self.usr1.recv() => Signal::Reload("SIGUSR1"),
        }
    }

    /// Resolve once SIGTERM or SIGINT arrives; SIGHUP and SIGUSR1 are logged and ignored
    /// (`broker exec`: one command's broker is not reloaded).
    pub async fn terminate(&mut self) -> &'static str {
        loop {
            tokio::select! {
                _ = self.term.recv() => return "SIGTERM",
                _ = self.int.recv() => return "SIGINT",
                _ = self.hup.recv() => {
                    tracing::info!("broker exec does not reload; ignoring SIGHUP");
                }
                _ = self.usr1.recv() => {
                    tracing::info!("broker exec does not reload; ignoring SIGUSR1");
                }
            }
        }
    }
}

/// When `broker run` loads the kernel programs.
#[derive(Debug, Clone)]
pub enum EbpfMode {
    /// Attach to this cgroup v2 directory (default: the root of the cgroup v2 mount).
    Attach(Option<PathBuf>),
    /// `--cgroup-from-self N`: attach to the cgroup N levels above the daemon's own (a
    /// Kubernetes sidecar: 1, its pod's cgroup); see [`cgroup::ancestor_of_self`].
    AttachAboveSelf(u32),
    /// `--no-ebpf`: explicit `listenOn` listeners only.
    Off,
    /// The Secretless form (`broker -f FILE`): attach at the cgroup v2 root only if a
    /// service has `intercept:` targets; a Secretless file has none, and is served
    /// through its `listenOn` listeners alone, without privileges.
    WhenIntercepting,
}

/// How to run the daemon.
#[derive(Debug, Clone)]
pub struct RunOptions {
    pub ebpf: EbpfMode,
    /// Forward the kernel programs' debug logs.
    pub ebpf_debug: bool,
    /// `--health-addr`: replaces `broker.health` (`Some(None)`: off).
    pub health_addr: Option<Option<SocketAddr>>,
    /// `--watch`/`-watch`: reload when the file changes.
    pub watch: bool,
    /// The command as the user typed it, for messages (`broker run`, `broker -f`).
    pub what: &'static str,
}

/// Read the file again and apply it; a file that does not load, or that this daemon
/// cannot apply, is refused with every error logged, and the configuration in force
/// keeps serving (Secretless exits; the broker does not).
async fn reload(daemon: &mut Daemon, path: &Path, opts: &RunOptions, why: &str) {
    tracing::info!(trigger = why, file = %path.display(), "reloading the configuration");
    let cfg = match load_for_serving(path) {
        Ok(mut cfg) => {
            if let Some(h) = opts.health_addr {
                cfg.broker.health_addr = h;
            }
            cfg
        }
        Err(BadConfig(text)) => {
            for line in text.lines() {
                tracing::error!(target: "reload", "{line}");
            }
            tracing::error!("reload refused: the configuration in force keeps serving");
            return;
        }
    };
    crate::notify::reloading("reloading the configuration");
    match daemon.reload(cfg).await {
        Ok(summary) => {
            tracing::info!(%summary, "configuration reloaded");
            crate::notify::ready(&summary);
        }
        Err(e) => {
            tracing::error!(error = %format!("{e:#}"), "reload refused: the configuration in force keeps serving");
            crate::notify::ready("reload refused: the previous configuration keeps serving");
        }
    }
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
    run_with(
        config_path,
        RunOptions {
            ebpf: if no_ebpf {
                EbpfMode::Off
            } else {
                EbpfMode::Attach(cgroup)
            },
            ebpf_debug,
            health_addr: None,
            watch: false,
            what: "broker run",
        },
    )
    .await
}

/// `broker run` and the Secretless form (`broker -f FILE`).
///
/// # Errors
/// Start-up failures (already detached when this returns).
pub async fn run_with(config_path: &Path, opts: RunOptions) -> anyhow::Result<()> {
    let mut signals = Signals::install()?;
    harden_process();
    let mut cfg = load_for_serving(config_path)?;
    if let Some(h) = opts.health_addr {
        cfg.broker.health_addr = h;
    }
    let intercepts = cfg.services.iter().any(|s| !s.intercept.is_empty());
    let cgroup = match opts.ebpf.clone() {
        EbpfMode::Off => None,
        EbpfMode::WhenIntercepting if !intercepts => {
            tracing::info!(
                "no service has intercept targets: serving the listenOn listeners only, no eBPF programs loaded"
            );
            None
        }
        EbpfMode::WhenIntercepting => Some(None),
        EbpfMode::Attach(c) => Some(c),
        EbpfMode::AttachAboveSelf(levels) => {
            let c = cgroup::ancestor_of_self(levels)
                .with_context(|| format!("--cgroup-from-self {levels}"))?;
            tracing::info!(cgroup = %c.display(), levels, "attaching above this process's own cgroup");
            Some(Some(c))
        }
    };
    let attach = match cgroup {
        None => Attach::None,
        Some(c) => {
            let hint = if intercepts {
                String::new()
            } else {
                format!(
                    ". No service of {} has intercept targets: `broker run --no-ebpf` (or `broker -f FILE`) serves its listenOn listeners without eBPF, and needs none of these",
                    config_path.display()
                )
            };
            crate::privilege::check_ebpf(opts.what, &hint)?;
            Attach::Cgroup(match c {
                Some(p) => p,
                None => cgroup::cgroup2_root()?,
            })
        }
    };
    let services = cfg.services.len();
    let daemon = Daemon::start(
        cfg,
        &StartOptions {
            attach,
            health: true,
            ebpf_debug: opts.ebpf_debug,
            handover: true,
        },
    )
    .await?;
    // `/ready` answers 200 from here: tell the service manager (systemd Type=notify).
    crate::notify::ready(&format!("serving {services} service(s)"));
    let mut daemon = daemon;
    let (changed_tx, mut changed) = tokio::sync::mpsc::channel(1);
    let _watcher = if opts.watch {
        Some(crate::watch::FileWatch::start(config_path, changed_tx)?)
    } else {
        None
    };
    let failure = loop {
        let why = tokio::select! {
            sig = signals.next() => match sig {
                Signal::Stop(sig) => {
                    tracing::info!(signal = sig, "shutting down");
                    break None;
                }
                Signal::Reload(sig) => sig,
            },
            Some(()) = changed.recv() => "file change",
            why = daemon.failed() => break Some(why),
        };
        reload(&mut daemon, config_path, &opts, why).await;
    };
    crate::notify::stopping(match failure {
        None => "draining connections",
        Some(_) => "a listener died: draining connections, then exiting",
    });
    daemon.stop().await;
    tracing::info!("stopped");
    match failure {
        None => Ok(()),
        Some(why) => bail!("a listener died: {why}"),
    }
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
    // Captured before hardening: CMD gets the limits the broker was started with.
    let child_limits = sys::ChildLimits::capture()?;
    harden_process();
    let cfg = load_for_serving(config_path)?;
    let root = cgroup::cgroup2_root()?;
    crate::privilege::check_ebpf(
        "broker exec",
        &format!(
            ". It also creates a child cgroup under {}, which needs root",
            root.display()
        ),
    )?;
    let cg = match ChildCgroup::create(&root, &format!("broker-exec-{}", std::process::id())) {
        Ok(cg) => cg,
        Err(cgroup::CgroupError::Io { path, source, .. })
            if source.kind() == std::io::ErrorKind::PermissionDenied =>
        {
            bail!(
                "broker exec runs the command in a new child cgroup of the cgroup v2 root, and creating {} was refused ({source}): run broker exec as root",
                path.display()
            )
        }
        Err(e) => return Err(e.into()),
    };
    let daemon = Daemon::start(
        cfg,
        &StartOptions {
            attach: Attach::Cgroup(cg.path().to_path_buf()),
            health: false,
            ebpf_debug,
            handover: false,
        },
    )
    .await?;
    let procs = cg.procs_fd()?;
    let mut command = tokio::process::Command::new(program);
    command.args(args);
    crate::sys::before_exec(&mut command, child_limits, procs);
    // CMD is not the service manager's main process: it must not report readiness.
    command.env_remove(crate::notify::NOTIFY_SOCKET);
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
        let _ = crate::sys::kill(pid as i32, sig);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The daemon in-process, without root: `--no-ebpf` with one `listenOn` service.
    /// A connection in progress when `stop` is called is drained (it completes), new
    /// connections are refused once the listener stopped, and `stop` returns.
    #[tokio::test]
    async fn starts_and_drains_in_process_without_root() {
        use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
        // An upstream that answers after a delay, so the connection is live at `stop`.
        let up = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let up_addr = up.local_addr().unwrap();
        tokio::spawn(async move {
            while let Ok((mut s, _)) = up.accept().await {
                tokio::spawn(async move {
                    let mut b = [0u8; 5];
                    let _ = s.read_exact(&mut b).await;
                    tokio::time::sleep(Duration::from_millis(300)).await;
                    let _ = s.write_all(b"pong!").await;
                });
            }
        });
        let listen = {
            let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            l.local_addr().unwrap()
        };
        let cfg = config::load_str(&format!(
            "version: 2\nbroker:\n  health: off\nservices:\n  echo:\n    connector: tcp\n    listenOn: tcp://{listen}\n    credentials:\n      host: 127.0.0.1\n      port: \"{}\"\n",
            up_addr.port()
        ), &crate::connector::KINDS)
        .unwrap();
        let daemon = Daemon::start(
            cfg,
            &StartOptions {
                attach: Attach::None,
                health: false,
                ebpf_debug: false,
                handover: false,
            },
        )
        .await
        .unwrap();
        let mut c = tokio::net::TcpStream::connect(listen).await.unwrap();
        c.write_all(b"ping!").await.unwrap();
        // The connection is brokered and waiting for the upstream's answer.
        tokio::time::sleep(Duration::from_millis(100)).await;
        let stopping = tokio::spawn(daemon.stop());
        let mut got = Vec::new();
        tokio::time::timeout(Duration::from_secs(5), c.read_to_end(&mut got))
            .await
            .expect("the live connection completes during the drain")
            .unwrap();
        assert_eq!(got, b"pong!");
        drop(c); // the client's end of the session
        tokio::time::timeout(Duration::from_secs(5), stopping)
            .await
            .expect("stop returns once drained")
            .unwrap();
        assert!(
            tokio::net::TcpStream::connect(listen).await.is_err(),
            "the listener is closed after stop"
        );
    }

    /// A `listenOn: unix://` service in-process, without root: served through the same
    /// connector path (here `tcp`), drained at `stop` like a TCP listener, and its socket
    /// file removed once the listener stops.
    #[tokio::test]
    async fn a_unix_listener_serves_drains_and_removes_its_file() {
        use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
        let up = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let up_addr = up.local_addr().unwrap();
        tokio::spawn(async move {
            while let Ok((mut s, _)) = up.accept().await {
                tokio::spawn(async move {
                    let mut b = [0u8; 5];
                    let _ = s.read_exact(&mut b).await;
                    tokio::time::sleep(Duration::from_millis(300)).await;
                    let _ = s.write_all(b"pong!").await;
                });
            }
        });
        let dir = tempfile::tempdir().unwrap();
        let sock = dir.path().join("echo.sock");
        let cfg = config::load_str(&format!(
            "version: 2\nbroker:\n  health: off\nservices:\n  echo:\n    connector: tcp\n    listenOn: unix://{}\n    unixSocket: {{mode: \"0600\"}}\n    credentials:\n      host: 127.0.0.1\n      port: \"{}\"\n",
            sock.display(),
            up_addr.port()
        ), &crate::connector::KINDS)
        .unwrap();
        let daemon = Daemon::start(
            cfg,
            &StartOptions {
                attach: Attach::None,
                health: false,
                ebpf_debug: false,
                handover: false,
            },
        )
        .await
        .unwrap();
        {
            use std::os::unix::fs::PermissionsExt as _;
            let m = std::fs::symlink_metadata(&sock).unwrap();
            assert_eq!(m.permissions().mode() & 0o777, 0o600);
        }
        let mut c = tokio::net::UnixStream::connect(&sock).await.unwrap();
        c.write_all(b"ping!").await.unwrap();
        tokio::time::sleep(Duration::from_millis(100)).await;
        let stopping = tokio::spawn(daemon.stop());
        let mut got = Vec::new();
        tokio::time::timeout(Duration::from_secs(5), c.read_to_end(&mut got))
            .await
            .expect("the live connection completes during the drain")
            .unwrap();
        assert_eq!(got, b"pong!");
        drop(c);
        tokio::time::timeout(Duration::from_secs(5), stopping)
            .await
            .expect("stop returns once drained")
            .unwrap();
        assert!(
            std::fs::symlink_metadata(&sock).is_err(),
            "the socket file is removed"
        );
    }

    async fn wait_failed(r: &Readiness) -> String {
        tokio::time::timeout(Duration::from_secs(5), r.failed())
            .await
            .expect("the supervisor reports the dead listener")
    }

    #[tokio::test]
    async fn a_panicking_accept_loop_makes_the_daemon_not_ready() {
        let readiness = Arc::new(Readiness::default());
        readiness.set_started();
        let (_stop_tx, stop_rx) = watch::channel(false);
        let mut tasks = JoinSet::new();
        supervise(
            &mut tasks,
            "listenOn 127.0.0.1:1 of service db".into(),
            async { panic!("boom in accept") },
            stop_rx,
            Arc::clone(&readiness),
        );
        let why = wait_failed(&readiness).await;
        assert!(
            why.contains("listenOn 127.0.0.1:1 of service db") && why.contains("boom in accept"),
            "{why}"
        );
        assert!(!readiness.is_ready());
    }

    #[tokio::test]
    async fn an_accept_loop_ending_early_is_a_failure_but_not_after_stop() {
        let readiness = Arc::new(Readiness::default());
        readiness.set_started();
        let (stop_tx, stop_rx) = watch::channel(false);
        let mut tasks = JoinSet::new();
        // Ends when asked: fine.
        let mut rx = stop_rx.clone();
        supervise(
            &mut tasks,
            "transparent listener 127.0.0.1:2".into(),
            async move {
                let _ = rx.wait_for(|s| *s).await;
            },
            stop_rx.clone(),
            Arc::clone(&readiness),
        );
        stop_tx.send(true).unwrap();
        while tasks.join_next().await.is_some() {}
        assert!(readiness.is_ready());
        // Ends on its own before stop: a failure.
        let readiness = Arc::new(Readiness::default());
        readiness.set_started();
        let (_stop_tx, stop_rx) = watch::channel(false);
        supervise(
            &mut tasks,
            "transparent listener 127.0.0.1:3".into(),
            async {},
            stop_rx,
            Arc::clone(&readiness),
        );
        assert!(wait_failed(&readiness).await.contains("ended unexpectedly"));
        assert!(!readiness.is_ready());
    }

    #[tokio::test]
    async fn aborting_the_supervisor_aborts_the_listener_task() {
        let readiness = Arc::new(Readiness::default());
        let (_stop_tx, stop_rx) = watch::channel(false);
        let mut tasks = JoinSet::new();
        let alive = Arc::new(());
        let held = Arc::clone(&alive);
        supervise(
            &mut tasks,
            "x".into(),
            async move {
                let _held = held;
                std::future::pending::<()>().await;
            },
            stop_rx,
            readiness,
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert_eq!(Arc::strong_count(&alive), 2);
        tasks.abort_all();
        while tasks.join_next().await.is_some() {}
        for _ in 0..100 {
            if Arc::strong_count(&alive) == 1 {
                return;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        panic!("the listener task outlived its supervisor");
    }
}
