//! Connection-level costs for `cargo xtask bench all` (and `cargo xtask bench conn`):
//! the broker's resident memory with 10,000 idle brokered connections, and what our
//! programs add to a `connect()` whose destination no service intercepts.
//!
//! * **Idle connections.** A `tcp` service intercepts `127.0.0.6:7000` for a test cgroup
//!   and relays to a sink on loopback that accepts and holds every connection (python3).
//!   python3 in the cgroup opens 10,000 connections and holds them; the broker's RSS is
//!   read before and once every upstream connection has arrived at the sink. The broker
//!   holds two descriptors per connection: where the hard `RLIMIT_NOFILE` is below
//!   20,200 and cannot be raised (no `CAP_SYS_RESOURCE`, as on our CI machines, whose
//!   hard limit is 20,000), the count is what fits, and the table says so.
//! * **Unmatched `connect()`.** A tight loop (this binary, `xtask connect-loop`: socket,
//!   connect, close with `SO_LINGER` 0 so no TIME_WAIT piles up) to a loopback listener
//!   no service names, run in two cgroups of the same parent: one with the broker's five
//!   cgroup programs attached (a `pg` service, so the splice programs too), one without.
//!   Interleaved rounds; the median time per connect of each, and the overhead. Then the
//!   programs' own run time from the kernel's `bpf_stats`, each program's share, and the
//!   same for two programs that do nothing (`r0 = 1; exit`, sock_ops and connect4) in a
//!   third cgroup: what `bpf_stats` counts for a run whatever the program does (the
//!   clock read around it), so what is above it is our programs' own work.

use std::{
    io::{BufRead as _, BufReader},
    net::{SocketAddr, TcpListener},
    os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd},
    path::Path,
    process::{ChildStdout, Command, Stdio},
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};
use broker_tests::{free_port, net::TestCgroup};

use crate::{
    bench::{Killed, median, rss_kib},
    report::Row,
};

/// Idle brokered connections held for the memory figure, at most.
const IDLE: usize = 10_000;

/// How many idle connections the broker can hold: two descriptors each, with 200 spare,
/// within the hard `RLIMIT_NOFILE` it inherits (which it raises its soft limit to).
fn idle_count() -> anyhow::Result<usize> {
    let limits = std::fs::read_to_string("/proc/self/limits")?;
    let hard: usize = limits
        .lines()
        .find(|l| l.starts_with("Max open files"))
        .and_then(|l| l.split_whitespace().nth(4))
        .and_then(|v| v.parse().ok())
        .context("no `Max open files` in /proc/self/limits")?;
    Ok(IDLE.min(hard.saturating_sub(200) / 2))
}
/// Connects per round of the unmatched-connect loop, and rounds.
const CONNECTS: u32 = 20_000;
const ROUNDS: usize = 7;

/// Start the release broker on `yaml` (a whole configuration file) for `cg` (it raises
/// its own descriptor limit to the hard limit); waits until ready.
fn start_broker(
    root: &Path,
    dir: &Path,
    tag: &str,
    yaml: &str,
    health: u16,
    cg: &TestCgroup,
) -> anyhow::Result<Killed> {
    let cfg = dir.join(format!("broker-{tag}.yaml"));
    std::fs::write(&cfg, yaml)?;
    crate::bench::release_broker(root, &cfg, cg, health, tag)
}

/// A python3 program run with its descriptor limit raised to the hard limit, its stdout piped; `lines`
/// lines are awaited (each must start with `ok`) before it is returned.
fn python(
    script: &str,
    cg: Option<&TestCgroup>,
    lines: usize,
) -> anyhow::Result<(Killed, BufReader<ChildStdout>)> {
    let script = format!(
        "import resource\n\
         _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)\n\
         resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))\n{script}"
    );
    let mut c = Command::new("/usr/bin/python3");
    c.args(["-c", &script])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit());
    if let Some(cg) = cg {
        cg.enter(&mut c);
    }
    let mut child = c.spawn().context("starting python3")?;
    let out = child.stdout.take().context("stdout")?;
    let mut r = BufReader::new(out);
    for _ in 0..lines {
        expect_ok(&mut r, "python3")?;
    }
    Ok((Killed(child), r))
}

/// Read one line, which must start with `ok`.
fn expect_ok(r: &mut BufReader<ChildStdout>, what: &str) -> anyhow::Result<()> {
    let mut l = String::new();
    r.read_line(&mut l)?;
    if !l.starts_with("ok") {
        bail!("{what}: {}", l.trim());
    }
    Ok(())
}

/// Resident memory of the broker idle, and per idle brokered connection at `IDLE`.
pub fn idle_memory(root: &Path) -> anyhow::Result<Vec<Row>> {
    let n = idle_count()?;
    let dir = tempfile::tempdir()?;
    let sink_port = free_port();
    // The sink: accepts and holds every connection, and reports when it holds `IDLE`.
    let (sink, mut sink_out) = python(
        &format!(
            "import socket, sys, time\n\
             s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)\n\
             s.bind(('127.0.0.1', {sink_port})); s.listen(4096)\n\
             print('ok listening', flush=True)\n\
             held = []\n\
             while len(held) < {n}:\n    held.append(s.accept()[0])\n\
             print('ok', len(held), flush=True)\n\
             time.sleep(600)\n"
        ),
        None,
        1,
    )?;
    broker_tests::wait_port(
        format!("127.0.0.1:{sink_port}").parse()?,
        Duration::from_secs(10),
    );
    let cg = TestCgroup::new("bench-idle");
    let health = free_port();
    let broker = start_broker(
        root,
        dir.path(),
        "idle",
        &format!(
            "version: 2\nbroker:\n  health: 127.0.0.1:{health}\n  maxConnections: {IDLE}\n  maxConnectionsPerListener: {IDLE}\nservices:\n  sink:\n    connector: tcp\n    intercept: [\"127.0.0.6:7000\"]\n    credentials:\n      host: 127.0.0.1\n      port: \"{sink_port}\"\n"
        ),
        health,
        &cg,
    )?;
    let pid = broker.0.id();
    std::thread::sleep(Duration::from_millis(500));
    let idle = rss_kib(pid)?;
    let started = Instant::now();
    let (clients, _out) = python(
        &format!(
            "import socket, sys, time\n\
             held = []\n\
             t = time.time()\n\
             for i in range({n}):\n    held.append(socket.create_connection(('127.0.0.6', 7000), timeout=10))\n    if i % 1000 == 999: print('  ', i + 1, round(time.time() - t, 2), file=sys.stderr, flush=True)\n\
             print('ok', flush=True)\n\
             time.sleep(600)\n"
        ),
        Some(&cg),
        1,
    )?;
    // Every upstream connection has reached the sink once it says so.
    expect_ok(&mut sink_out, "the sink")?;
    let opened = started.elapsed();
    std::thread::sleep(Duration::from_secs(1));
    let with = rss_kib(pid)?;
    let per = with.saturating_sub(idle) as f64 / n as f64;
    println!(
        "\nidle brokered connections (tcp, userspace relay): {n} opened in {:.1} s; broker RSS {:.1} MiB idle, {:.1} MiB with {n}: {per:.1} KiB per connection\n",
        opened.as_secs_f64(),
        idle as f64 / 1024.0,
        with as f64 / 1024.0,
    );
    drop(clients);
    drop(broker);
    drop(sink);
    Ok(vec![
        Row::absolute("broker memory", "RSS idle", idle as f64 / 1024.0, "MiB"),
        Row::absolute(
            "broker memory",
            &format!("per idle connection ({n} held)"),
            per,
            "KiB",
        )
        .target("< 16 KiB"),
    ])
}

/// The hidden `xtask connect-loop ADDR COUNT`: connect `count` times to `addr` and
/// close each at once (`SO_LINGER` 0: no TIME_WAIT); prints the nanoseconds taken.
pub fn connect_loop(addr: &str, count: u32) -> anyhow::Result<()> {
    let addr: SocketAddr = addr.parse()?;
    let started = Instant::now();
    let (mut slow, mut worst) = (0u32, Duration::ZERO);
    for _ in 0..count {
        let t = Instant::now();
        let s = std::net::TcpStream::connect(addr).context("connect")?;
        let took = t.elapsed();
        worst = worst.max(took);
        slow += u32::from(took > Duration::from_millis(1));
        let linger = Linger { on: 1, secs: 0 };
        // SAFETY: a valid descriptor and a `struct linger` of the right size.
        let rc = unsafe {
            setsockopt(
                std::os::fd::AsRawFd::as_raw_fd(&s),
                1,  // SOL_SOCKET
                13, // SO_LINGER
                (&raw const linger).cast(),
                size_of::<Linger>() as u32,
            )
        };
        if rc != 0 {
            bail!("SO_LINGER: {}", std::io::Error::last_os_error());
        }
        drop(s);
    }
    println!("{}", started.elapsed().as_nanos());
    eprintln!("connect loop: {slow} of {count} connects over 1 ms, slowest {worst:?}");
    Ok(())
}

#[repr(C)]
struct Linger {
    on: i32,
    secs: i32,
}

unsafe extern "C" {
    fn listen(fd: i32, backlog: i32) -> i32;
    fn setsockopt(fd: i32, level: i32, name: i32, val: *const std::ffi::c_void, len: u32) -> i32;
    fn syscall(num: i64, ...) -> i64;
}

/// `bpf(2)` with a 128-byte `union bpf_attr` (the members used here are shorter; the
/// rest is zero); the new descriptor.
fn bpf(cmd: i64, attr: &[u8; 128], what: &str) -> anyhow::Result<OwnedFd> {
    const SYS_BPF: i64 = 321;
    // SAFETY: attr is 128 readable bytes, the size passed.
    let fd = unsafe { syscall(SYS_BPF, cmd, attr.as_ptr(), 128u32) };
    if fd < 0 {
        bail!("{what}: {}", std::io::Error::last_os_error());
    }
    // SAFETY: a descriptor the kernel just returned, owned by nobody else.
    Ok(unsafe { OwnedFd::from_raw_fd(i32::try_from(fd)?) })
}

/// Two programs that do nothing (`r0 = 1; exit`) attached to `cg` as sock_ops and
/// cgroup/connect4, with BPF links (closing the descriptors detaches them).
fn attach_do_nothing(cg: &TestCgroup) -> anyhow::Result<Vec<OwnedFd>> {
    const PROG_LOAD: i64 = 5;
    const LINK_CREATE: i64 = 28;
    // mov64 r0, 1; exit
    let insns: [u8; 16] = [0xb7, 0, 0, 0, 1, 0, 0, 0, 0x95, 0, 0, 0, 0, 0, 0, 0];
    let license = *b"GPL\0";
    let dir = std::fs::File::open(&cg.path)?;
    let mut held = Vec::new();
    // (program type, expected attach type, attach type, name)
    for (prog_type, expected, attach, name) in [
        (13u32, 0u32, 3u32, &b"nothing_sockops\0"[..]),
        (18, 10, 10, &b"nothing_connect\0"[..]),
    ] {
        // union bpf_attr, prog_load: type, insn_cnt, insns, license, log (0), kern_version,
        // flags, name at 48, ifindex, expected_attach_type at 68.
        let mut attr = [0u8; 128];
        attr[0..4].copy_from_slice(&prog_type.to_ne_bytes());
        attr[4..8].copy_from_slice(&2u32.to_ne_bytes());
        attr[8..16].copy_from_slice(&(insns.as_ptr() as u64).to_ne_bytes());
        attr[16..24].copy_from_slice(&(license.as_ptr() as u64).to_ne_bytes());
        attr[48..48 + name.len()].copy_from_slice(name);
        attr[68..72].copy_from_slice(&expected.to_ne_bytes());
        let prog = bpf(PROG_LOAD, &attr, "loading a do-nothing program")?;
        // link_create: prog_fd, target_fd, attach_type, flags.
        let mut attr = [0u8; 128];
        attr[0..4].copy_from_slice(&u32::try_from(prog.as_raw_fd())?.to_ne_bytes());
        attr[4..8].copy_from_slice(&u32::try_from(dir.as_raw_fd())?.to_ne_bytes());
        attr[8..12].copy_from_slice(&attach.to_ne_bytes());
        held.push(bpf(LINK_CREATE, &attr, "attaching a do-nothing program")?);
        held.push(prog);
    }
    Ok(held)
}

/// One connect loop of `CONNECTS` in `cg`; nanoseconds per connect.
fn connect_round(addr: SocketAddr, cg: &TestCgroup) -> anyhow::Result<f64> {
    let mut c = Command::new(std::env::current_exe()?);
    c.args(["connect-loop", &addr.to_string(), &CONNECTS.to_string()])
        .stdin(Stdio::null())
        .stderr(Stdio::inherit());
    cg.enter(&mut c);
    let out = c.output().context("running the connect loop")?;
    if !out.status.success() {
        bail!("the connect loop failed: {}", out.status);
    }
    let ns: f64 = String::from_utf8_lossy(&out.stdout).trim().parse()?;
    Ok(ns / f64::from(CONNECTS))
}

/// Wait (up to 70 s) until few sockets are in TIME_WAIT: thousands left by an earlier
/// workload make every `connect()` search longer for a free port.
fn settle_time_wait() -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(70);
    loop {
        let stat = std::fs::read_to_string("/proc/net/sockstat")?;
        let tw: u64 = stat
            .lines()
            .find_map(|l| l.strip_prefix("TCP: "))
            .and_then(|l| l.split_whitespace().skip_while(|w| *w != "tw").nth(1))
            .and_then(|v| v.parse().ok())
            .context("no TCP tw in /proc/net/sockstat")?;
        if tw < 1000 || Instant::now() > deadline {
            return Ok(());
        }
        std::thread::sleep(Duration::from_secs(1));
    }
}

/// What the cgroup programs add to a `connect()` no service intercepts.
pub fn unmatched_connect(root: &Path) -> anyhow::Result<Vec<Row>> {
    settle_time_wait()?;
    // The listener: accepts and drops, on a thread of this process (no cgroup of ours).
    let listener = TcpListener::bind("127.0.0.1:0")?;
    // A deep backlog (std listens with 128): a full one drops SYNs, and a dropped SYN
    // costs the connect a second.
    // SAFETY: listen on a listening socket's descriptor only changes its backlog.
    if unsafe { listen(std::os::fd::AsRawFd::as_raw_fd(&listener), 4096) } != 0 {
        bail!("listen: {}", std::io::Error::last_os_error());
    }
    let addr = listener.local_addr()?;
    let stop = Arc::new(AtomicBool::new(false));
    let acceptor = {
        let stop = stop.clone();
        std::thread::spawn(move || {
            for s in listener.incoming() {
                if stop.load(Ordering::Relaxed) {
                    break;
                }
                drop(s);
            }
        })
    };
    let dir = tempfile::tempdir()?;
    let with_cg = TestCgroup::new("bench-connect-attached");
    let without_cg = TestCgroup::new("bench-connect-plain");
    let floor_cg = TestCgroup::new("bench-connect-nothing");
    let _nothing = attach_do_nothing(&floor_cg)?;
    let health = free_port();
    // A pg service (it splices, so sock_ops and the splice programs are attached too)
    // for an address the loop never dials; the broker never dials it either.
    let pw = dir.path().join("pw");
    std::fs::write(&pw, "unused")?;
    let broker = start_broker(
        root,
        dir.path(),
        "connect",
        &format!(
            "version: 2\nbroker:\n  health: 127.0.0.1:{health}\nservices:\n  db:\n    connector: pg\n    intercept: [\"127.0.0.7:5432\", \"10.255.0.0/16:5432\"]\n    credentials:\n      host: 127.0.0.1\n      port: \"1\"\n      sslmode: disable\n      username: u\n      password: {{from: file, get: {}}}\n",
            pw.display()
        ),
        health,
        &with_cg,
    )?;
    let mut with = Vec::new();
    let mut without = Vec::new();
    // A warm-up of each, then interleaved rounds.
    connect_round(addr, &without_cg)?;
    connect_round(addr, &with_cg)?;
    for _ in 0..ROUNDS {
        without.push(connect_round(addr, &without_cg)?);
        with.push(connect_round(addr, &with_cg)?);
    }
    // The programs' own run time (the kernel's `bpf_stats`), which the wall clock of a
    // shared 2-core machine cannot resolve at this size: a few rounds with statistics
    // on, then the sysctl as it was.
    let (programs, floor) = program_time_per_connect(addr, &with_cg, &floor_cg)?;
    drop(broker);
    stop.store(true, Ordering::Relaxed);
    let _ = std::net::TcpStream::connect(addr);
    let _ = acceptor.join();
    let (a, b) = (median(&with), median(&without));
    let overhead = (a / b - 1.0) * 100.0;
    println!(
        "\nunmatched connect() to loopback, {CONNECTS} per round, {ROUNDS} rounds (median): {:.2} us without our programs, {:.2} us with them attached: {overhead:+.1}%\n",
        b / 1000.0,
        a / 1000.0
    );
    let share = programs / b * 100.0;
    println!(
        "our programs' own run time (kernel bpf_stats): {:.0} ns per unmatched connect, {share:.1}% of a connect without them; programs that do nothing: {floor:.0} ns, so {:.0} ns of work ({:.1}%)\n",
        programs,
        programs - floor,
        (programs - floor) / b * 100.0,
    );
    let w = "unmatched connect() (programs attached vs not)";
    let mut base = Row::baseline(w, "no programs", b / 1000.0, "us");
    base.higher_is_better = false;
    // Per-round ratios of time (lower is better): shown as time ratios.
    let mut attached = Row::compared(w, "broker programs attached", &with, &without, "us");
    attached.value /= 1000.0;
    attached.higher_is_better = false;
    let own = Row::absolute(w, "programs' own run time (bpf_stats)", programs, "ns")
        .target(&format!("{share:.1}% of the connect"));
    let nothing = Row::absolute(
        w,
        "do-nothing programs, same hooks (bpf_stats floor)",
        floor,
        "ns",
    );
    Ok(vec![base, attached.target("<= 1.02x (2%)"), own, nothing])
}

/// Run time of the programs attached to `cg` and to `floor` (`bpf_stats`), in
/// nanoseconds per connect of the loop, over 3 interleaved rounds each; each program's
/// share is printed (time and runs per connect).
fn program_time_per_connect(
    addr: SocketAddr,
    cg: &TestCgroup,
    floor: &TestCgroup,
) -> anyhow::Result<(f64, f64)> {
    const SYSCTL: &str = "/proc/sys/kernel/bpf_stats_enabled";
    let before = std::fs::read_to_string(SYSCTL)?;
    std::fs::write(SYSCTL, "1")?;
    let result = (|| {
        let (ids, floor_ids) = (attached_ids(cg)?, attached_ids(floor)?);
        let (s0, f0) = (run_stats(&ids)?, run_stats(&floor_ids)?);
        for _ in 0..3 {
            connect_round(addr, cg)?;
            connect_round(addr, floor)?;
        }
        let (s1, f1) = (run_stats(&ids)?, run_stats(&floor_ids)?);
        let connects = f64::from(3 * CONNECTS);
        let mut totals = [0.0; 2];
        println!();
        for (total, (before, after)) in totals.iter_mut().zip([(&s0, &s1), (&f0, &f1)]) {
            for (a, b) in before.iter().zip(after) {
                let (ns, runs) = ((b.1 - a.1) as f64, (b.2 - a.2) as f64);
                *total += ns;
                println!(
                    "  {}: {:.0} ns per connect ({:.1} runs, {:.0} ns per run)",
                    a.0,
                    ns / connects,
                    runs / connects,
                    if runs > 0.0 { ns / runs } else { 0.0 },
                );
            }
        }
        Ok((totals[0] / connects, totals[1] / connects))
    })();
    std::fs::write(SYSCTL, before.trim())?;
    result
}

/// The ids of the programs attached to `cg` (`bpftool cgroup show`).
fn attached_ids(cg: &TestCgroup) -> anyhow::Result<Vec<u64>> {
    let ids: Vec<u64> = cg
        .attached()
        .lines()
        .filter_map(|l| l.split_whitespace().next()?.parse().ok())
        .collect();
    if ids.is_empty() {
        bail!("no programs attached to {}", cg.path.display());
    }
    Ok(ids)
}

/// Name, `run_time_ns` and `run_cnt` of each program `ids` (`bpftool prog show id N`).
fn run_stats(ids: &[u64]) -> anyhow::Result<Vec<(String, u64, u64)>> {
    let mut stats = Vec::with_capacity(ids.len());
    for id in ids {
        let out = Command::new("bpftool")
            .args(["prog", "show", "id", &id.to_string()])
            .output()
            .context("bpftool")?;
        let text = String::from_utf8_lossy(&out.stdout);
        let field = |name: &str| {
            text.split_whitespace()
                .skip_while(|w| *w != name)
                .nth(1)
                .and_then(|v| v.parse::<u64>().ok())
                .unwrap_or(0)
        };
        let name = text
            .split_whitespace()
            .skip_while(|w| *w != "name")
            .nth(1)
            .unwrap_or("?")
            .to_owned();
        stats.push((name, field("run_time_ns"), field("run_cnt")));
    }
    Ok(stats)
}

/// `cargo xtask bench conn`: both figures.
pub fn run(root: &Path) -> anyhow::Result<()> {
    unmatched_connect(root)?;
    idle_memory(root)?;
    Ok(())
}
