//! `cargo xtask bench http`: wrk (`-t1 -c16`) against a static origin (nginx serving a
//! 1 KB and a 1 MB file, the request refused with 401 unless it carries
//! `Authorization: Bearer <token>`), over HTTP and HTTPS, keep-alive and
//! `Connection: close`, each direct (wrk sends the token itself), through an nginx
//! reverse proxy that sets the header (keep-alive upstream pool; for HTTPS it terminates
//! TLS and verifies the origin's), and through the broker (release build,
//! eBPF-intercepted: wrk runs in the broker's cgroup and dials the origin's own address;
//! for HTTPS the broker terminates TLS with a leaf of its local CA and verifies the
//! origin against `caFile`), in one run. Requests per second (MB/s of body for 1 MB) and
//! the ratio to direct: median of `BENCH_ROUNDS` interleaved rounds (default 3). Every
//! run must get no non-2xx answer, so every proxied request carried the injected header.
//! Then the broker's resident memory.
//!
//! The origin's name (`api.bench.test`) maps to 127.0.0.1 in private mount namespaces
//! (`broker_tests::net::with_hosts`): the broker resolves its `intercept:` name there,
//! and wrk sends it as SNI and `Host`. Everything stays on loopback.

use std::{
    fmt::Write as _,
    net::SocketAddr,
    path::Path,
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};
use broker_tests::{
    free_port, http_get,
    net::{TestCgroup, with_hosts},
};

use crate::{
    bench::{Killed, median, rss_kib},
    report::Row,
};

const NAME: &str = "api.bench.test";
const TOKEN: &str = "bench-http-token-5c2e9a71";

/// An nginx instance in a cgroup of its own: dropping it kills the master, then every
/// worker with the cgroup.
struct Nginx {
    _master: Killed,
    _cg: TestCgroup,
}

fn nginx(dir: &Path, tag: &str, http_block: &str, ports: &[u16]) -> anyhow::Result<Nginx> {
    let d = dir.display();
    let tmp = dir.join(format!("{tag}-tmp"));
    std::fs::create_dir_all(&tmp)?;
    let t = tmp.display();
    let conf = dir.join(format!("{tag}.conf"));
    let log = dir.join(format!("{tag}-error.log"));
    std::fs::write(
        &conf,
        format!(
            "daemon off;\nmaster_process on;\nuser root;\nworker_processes auto;\npid {d}/{tag}.pid;\nerror_log {log} warn;\nevents {{ worker_connections 4096; }}\nhttp {{\n  access_log off;\n  default_type application/octet-stream;\n  client_body_temp_path {t}/body;\n  proxy_temp_path {t}/proxy;\n  fastcgi_temp_path {t}/fastcgi;\n  uwsgi_temp_path {t}/uwsgi;\n  scgi_temp_path {t}/scgi;\n  sendfile on;\n  tcp_nodelay on;\n  keepalive_requests 100000000;\n  keepalive_timeout 300s;\n  ssl_session_cache shared:{tag}:10m;\n{http_block}}}\n",
            log = log.display(),
        ),
    )?;
    let cg = TestCgroup::new(&format!("bench-http-{tag}"));
    let mut c = Command::new("nginx");
    c.arg("-p")
        .arg(dir)
        .arg("-e")
        .arg(&log)
        .arg("-c")
        .arg(&conf)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::inherit());
    cg.enter(&mut c);
    let mut master = Killed(c.spawn().context("starting nginx")?);
    let deadline = Instant::now() + Duration::from_secs(10);
    for port in ports {
        let addr = SocketAddr::from(([127, 0, 0, 1], *port));
        while std::net::TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_err() {
            if let Some(st) = master.0.try_wait()? {
                bail!(
                    "nginx ({tag}) exited: {st}\n{}",
                    std::fs::read_to_string(&log).unwrap_or_default()
                );
            }
            if Instant::now() > deadline {
                bail!("nginx ({tag}) not listening on {addr}");
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
    Ok(Nginx {
        _master: master,
        _cg: cg,
    })
}

/// A test CA and a certificate for [`NAME`] signed by it, with openssl, into `dir`:
/// `origin-ca.crt`, `origin.crt`, `origin.key`.
fn certificates(dir: &Path) -> anyhow::Result<()> {
    let openssl = |args: &[&str]| {
        let out = Command::new("openssl")
            .args(args)
            .current_dir(dir)
            .stdin(Stdio::null())
            .output()
            .context("running openssl")?;
        if !out.status.success() {
            bail!(
                "openssl {args:?} failed: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        anyhow::Ok(())
    };
    let ec = [
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:P-256",
        "-nodes",
    ];
    openssl(
        &[
            &["req", "-x509"][..],
            &ec,
            &[
                "-keyout",
                "origin-ca.key",
                "-out",
                "origin-ca.crt",
                "-days",
                "2",
                "-subj",
                "/CN=broker bench origin CA",
                "-addext",
                "basicConstraints=critical,CA:TRUE",
                "-addext",
                "keyUsage=critical,keyCertSign,cRLSign",
            ],
        ]
        .concat(),
    )?;
    openssl(
        &[
            &["req"][..],
            &ec,
            &[
                "-keyout",
                "origin.key",
                "-out",
                "origin.csr",
                "-subj",
                &format!("/CN={NAME}"),
            ],
        ]
        .concat(),
    )?;
    std::fs::write(
        dir.join("origin.ext"),
        format!(
            "basicConstraints=CA:FALSE\nkeyUsage=critical,digitalSignature\nextendedKeyUsage=serverAuth\nsubjectAltName=DNS:{NAME}\n"
        ),
    )?;
    openssl(&[
        "x509",
        "-req",
        "-in",
        "origin.csr",
        "-CA",
        "origin-ca.crt",
        "-CAkey",
        "origin-ca.key",
        "-CAcreateserial",
        "-days",
        "2",
        "-extfile",
        "origin.ext",
        "-out",
        "origin.crt",
    ])
}

/// One wrk run: requests per second. Fails on any non-2xx answer, socket errors other
/// than the server closing (`Connection: close`), or no requests at all.
fn wrk(
    hosts: &Path,
    url: &str,
    headers: &[&str],
    seconds: u32,
    cg: Option<&TestCgroup>,
) -> anyhow::Result<f64> {
    let limit = (seconds + 30).to_string();
    let duration = format!("{seconds}s");
    let mut argv = vec![
        "timeout",
        "--kill-after=5",
        &limit,
        "wrk",
        "-t1",
        "-c16",
        "-d",
        &duration,
    ];
    for h in headers {
        argv.extend(["-H", h]);
    }
    argv.push(url);
    let mut c = with_hosts(hosts, &[(NAME, "127.0.0.1")], &argv);
    c.stdin(Stdio::null());
    if let Some(cg) = cg {
        cg.enter(&mut c);
    }
    let out = c.output().context("running wrk")?;
    let text =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    let text = text.replace(TOKEN, "<token>");
    if !out.status.success() {
        bail!("wrk {url} {headers:?} failed:\n{text}");
    }
    if let Some(n) = text
        .lines()
        .find_map(|l| l.trim().strip_prefix("Non-2xx or 3xx responses:"))
    {
        bail!(
            "wrk {url} {headers:?}: {} non-2xx answers:\n{text}",
            n.trim()
        );
    }
    if let Some(errors) = text
        .lines()
        .find_map(|l| l.trim().strip_prefix("Socket errors:"))
    {
        let count = |what: &str| {
            errors
                .split(',')
                .find_map(|e| e.trim().strip_prefix(what))
                .and_then(|n| n.trim().parse::<u64>().ok())
                .unwrap_or(0)
        };
        if count("connect") + count("write") + count("timeout") > 0 {
            bail!("wrk {url} {headers:?}: socket errors:\n{text}");
        }
        // A connection the server reset rather than closed; not a failed request.
        if count("read") > 0 {
            eprintln!(
                "note: wrk {url}{}: {} socket read errors",
                cg.map_or("", |_| " (broker)"),
                count("read")
            );
        }
    }
    let rps: f64 = text
        .lines()
        .find_map(|l| l.strip_prefix("Requests/sec:"))
        .and_then(|v| v.trim().parse().ok())
        .with_context(|| format!("no Requests/sec in wrk output:\n{text}"))?;
    if rps <= 0.0 {
        bail!("wrk {url} {headers:?}: no requests:\n{text}");
    }
    Ok(rps)
}

/// A release broker intercepting `NAME:http_port` and `NAME:https_port` for `cg`, in a
/// mount namespace where `NAME` is 127.0.0.1; waits until ready.
fn start_broker(
    root: &Path,
    dir: &Path,
    http_port: u16,
    https_port: u16,
    cg: &TestCgroup,
) -> anyhow::Result<Killed> {
    let ca_dir = dir.join("broker-ca");
    let out = Command::new(root.join("target/release/broker"))
        .args(["ca", "--dir"])
        .arg(&ca_dir)
        .stdin(Stdio::null())
        .output()
        .context("broker ca")?;
    if !out.status.success() {
        bail!("broker ca: {}", String::from_utf8_lossy(&out.stderr));
    }
    let token = dir.join("token");
    std::fs::write(&token, TOKEN)?;
    let health = free_port();
    let cfg = dir.join("broker.yaml");
    std::fs::write(
        &cfg,
        format!(
            "version: 2\nbroker:\n  health: 127.0.0.1:{health}\n  caDir: {}\nservices:\n  api:\n    connector: generic_http\n    intercept: [\"{NAME}:{http_port}\", \"{NAME}:{https_port}\"]\n    credentials:\n      token: {{from: file, get: {}}}\n    config:\n      caFile: {}\n      headers:\n        Authorization: \"Bearer {{{{ .token }}}}\"\n",
            ca_dir.display(),
            token.display(),
            dir.join("origin-ca.crt").display(),
        ),
    )?;
    let bin = root.join("target/release/broker");
    let hosts = dir.join("hosts-broker");
    std::fs::create_dir_all(&hosts)?;
    // unshare and sh exec the broker: the child's pid is the broker's.
    let mut c = with_hosts(
        &hosts,
        &[(NAME, "127.0.0.1")],
        &[
            bin.to_str().context("UTF-8 path")?,
            "--log-level",
            "warn",
            "run",
            "-f",
            cfg.to_str().context("UTF-8 path")?,
            "--cgroup",
            cg.path.to_str().context("UTF-8 path")?,
        ],
    );
    c.envs(
        std::env::var("BENCH_BROKER_THREADS")
            .ok()
            .map(|t| ("TOKIO_WORKER_THREADS", t)),
    )
    .stdin(Stdio::null())
    .stdout(Stdio::null())
    .stderr(Stdio::inherit());
    let mut broker = Killed(c.spawn().context("starting broker")?);
    let health_addr: SocketAddr = format!("127.0.0.1:{health}").parse()?;
    let deadline = Instant::now() + Duration::from_secs(20);
    while !matches!(http_get(health_addr, "/ready"), Some((200, _))) {
        if let Some(st) = broker.0.try_wait()? {
            bail!("broker exited: {st}");
        }
        if Instant::now() > deadline {
            bail!("broker not ready");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    Ok(broker)
}

pub fn run(root: &Path, seconds: u32) -> anyhow::Result<Vec<Row>> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { crate::libc_geteuid() } != 0 {
        bail!("the benchmark loads eBPF programs: run it as root");
    }
    let dir = tempfile::tempdir()?;
    let d = dir.path();
    certificates(d)?;
    let www = d.join("www");
    std::fs::create_dir_all(&www)?;
    std::fs::write(www.join("1k"), vec![b'k'; 1024])?;
    std::fs::write(www.join("1m"), vec![b'm'; 1 << 20])?;
    let hosts = d.join("hosts-wrk");
    std::fs::create_dir_all(&hosts)?;

    // The origin: static files, 401 without the token.
    let (origin, origin_tls) = (free_port(), free_port());
    let _origin = nginx(
        d,
        "origin",
        &format!(
            "  ssl_certificate {d}/origin.crt;\n  ssl_certificate_key {d}/origin.key;\n  open_file_cache max=16;\n  server {{\n    listen 127.0.0.1:{origin};\n    listen 127.0.0.1:{origin_tls} ssl;\n    server_name {NAME};\n    root {www};\n    location / {{\n      if ($http_authorization != \"Bearer {TOKEN}\") {{ return 401; }}\n    }}\n  }}\n",
            d = d.display(),
            www = www.display(),
        ),
        &[origin, origin_tls],
    )?;
    // nginx as the peer: a reverse proxy setting the header, keep-alive upstream pools;
    // for HTTPS it terminates TLS (the origin's certificate) and verifies the origin.
    let (proxy, proxy_tls) = (free_port(), free_port());
    let _proxy = nginx(
        d,
        "proxy",
        &format!(
            "  upstream origin {{ server 127.0.0.1:{origin}; keepalive 64; keepalive_requests 100000000; keepalive_timeout 300s; }}\n  upstream origin_tls {{ server 127.0.0.1:{origin_tls}; keepalive 64; keepalive_requests 100000000; keepalive_timeout 300s; }}\n  proxy_http_version 1.1;\n  proxy_set_header Connection \"\";\n  proxy_set_header Host $http_host;\n  proxy_set_header Authorization \"Bearer {TOKEN}\";\n  proxy_max_temp_file_size 0;\n  proxy_ssl_verify on;\n  proxy_ssl_trusted_certificate {d}/origin-ca.crt;\n  proxy_ssl_name {NAME};\n  proxy_ssl_server_name on;\n  proxy_ssl_session_reuse on;\n  ssl_certificate {d}/origin.crt;\n  ssl_certificate_key {d}/origin.key;\n  server {{\n    listen 127.0.0.1:{proxy};\n    location / {{ proxy_pass http://origin; }}\n  }}\n  server {{\n    listen 127.0.0.1:{proxy_tls} ssl;\n    location / {{ proxy_pass https://origin_tls; }}\n  }}\n",
            d = d.display(),
        ),
        &[proxy, proxy_tls],
    )?;
    let cg = TestCgroup::new("bench-http");
    let broker = start_broker(root, d, origin, origin_tls, &cg)?;
    let fresh = rss_kib(broker.0.id())?;

    let auth = format!("Authorization: Bearer {TOKEN}");
    let dummy = "Authorization: Bearer dummy";
    let close = "Connection: close";
    // (row, TLS, file, Connection: close)
    let rows = [
        ("HTTP keep-alive 1 KB", false, "1k", false),
        ("HTTP Connection: close 1 KB", false, "1k", true),
        ("HTTP keep-alive 1 MB", false, "1m", false),
        ("HTTPS keep-alive 1 KB", true, "1k", false),
        ("HTTPS Connection: close 1 KB", true, "1k", true),
        ("HTTPS keep-alive 1 MB", true, "1m", false),
    ];
    let rounds = crate::report::rounds();
    let mut out = Vec::new();
    let only = std::env::var("BENCH_ONLY").ok();
    // This machine may be shared: the load when the runs start, for the reader.
    let load = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    let load = load.split_whitespace().next().unwrap_or("?");
    let cores = std::thread::available_parallelism().map_or(0, usize::from);
    let mut table = format!(
        "\nwrk -t1 -c16, {seconds}s per run, {rounds} rounds (median; per-round ratio range), {cores} cores, load average {load} at start; req/s, MB/s (10^6 bytes of body) for 1 MB\n\n| workload | direct | nginx (ratio) | broker (ratio) |\n|---|---|---|---|\n"
    );
    print!("{table}");
    // Ratio of the broker to direct and to nginx, per row.
    let mut results: Vec<(&str, f64, f64)> = Vec::new();
    for (name, tls, path, conn_close) in rows
        .iter()
        .filter(|r| only.as_deref().is_none_or(|o| r.0.starts_with(o)))
    {
        let (scheme, port, proxy_port) = if *tls {
            ("https", origin_tls, proxy_tls)
        } else {
            ("http", origin, proxy)
        };
        let direct_url = format!("{scheme}://{NAME}:{port}/{path}");
        let proxy_url = format!("{scheme}://{NAME}:{proxy_port}/{path}");
        // Direct: the app holds the token. Proxied: a dummy the proxy replaces.
        let mut h_direct = vec![auth.as_str()];
        let mut h_dummy = vec![dummy];
        if *conn_close {
            h_direct.push(close);
            h_dummy.push(close);
        }
        let mut runs: [Vec<f64>; 3] = Default::default();
        // Each round runs every path once, back to back, so slow drifts of this shared
        // machine hit all paths alike.
        for _ in 0..rounds {
            runs[0].push(wrk(&hosts, &direct_url, &h_direct, seconds, None)?);
            runs[1].push(wrk(&hosts, &proxy_url, &h_dummy, seconds, None)?);
            runs[2].push(wrk(&hosts, &direct_url, &h_dummy, seconds, Some(&cg))?);
        }
        // 1 MB rows in MB/s of body.
        let scale = if *path == "1m" {
            f64::from(1u32 << 20) / 1e6
        } else {
            1.0
        };
        let unit = if *path == "1m" { "MB/s" } else { "req/s" };
        let direct = median(&runs[0]);
        let cell = |i: usize| crate::report::cell(&runs[i], &runs[0], scale, unit);
        let line = format!(
            "| {name} | {:.0} {unit} | {} | {} |\n",
            direct * scale,
            cell(1),
            cell(2)
        );
        print!("{line}");
        table.push_str(&line);
        results.push((
            name,
            median(&runs[2]) / direct,
            median(&runs[2]) / median(&runs[1]),
        ));
        let scaled: Vec<Vec<f64>> = runs
            .iter()
            .map(|r| r.iter().map(|v| v * scale).collect())
            .collect();
        for row in crate::bench::rows(name, &["direct", "nginx", "broker"], &scaled, unit) {
            out.push(if row.path == "broker" {
                row.target(&format!(">= {:.2}x, ahead of nginx", target(name)))
            } else {
                row
            });
        }
    }

    let pid = broker.0.id();
    let peak = std::fs::read_to_string(format!("/proc/{pid}/status"))?
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse::<u64>().ok())
        .unwrap_or(0);
    // The daemon returns a burst's heap to the OS within 5 s of going idle.
    std::thread::sleep(Duration::from_secs(6));
    let idle = rss_kib(pid)?;
    let mut summary = format!(
        "\nbroker RSS: {:.1} MiB idle after start, {:.1} MiB idle after the runs (peak {:.1} MiB)\n",
        fresh as f64 / 1024.0,
        idle as f64 / 1024.0,
        peak as f64 / 1024.0
    );
    summary.push_str("\ntargets (broker / direct; broker ahead of nginx on every row):\n");
    let mut behind = Vec::new();
    for (name, to_direct, to_nginx) in &results {
        let target = target(name);
        let met = if *to_direct >= target {
            "met"
        } else {
            "MISSED"
        };
        let _ = writeln!(
            summary,
            "  {name}: {to_direct:.2}x direct (target >= {target:.2}x: {met}); {to_nginx:.2}x nginx"
        );
        if *to_nginx < 1.0 {
            behind.push(*name);
        }
    }
    if behind.is_empty() {
        summary.push_str("  ahead of nginx on every row: met\n");
    } else {
        let _ = writeln!(
            summary,
            "  ahead of nginx on every row: MISSED ({})",
            behind.join(", ")
        );
    }
    print!("{table}{summary}");
    drop(broker);
    Ok(out)
}

/// The broker's target for a row, as a ratio to direct (issue 11).
fn target(name: &str) -> f64 {
    if name.contains("close") {
        0.80
    } else if name.contains("1 MB") {
        0.90
    } else {
        0.85
    }
}
