//! `cargo xtask bench secrets`: what the credential cache saves and what it costs. A
//! release broker (`--no-ebpf`, `listenOn` listeners) in front of a real PostgreSQL
//! (SCRAM), with three `pg` services that differ only in where the password comes
//! from: a literal in the file, the local HTTP secret server
//! (`broker_tests::secret_server`) through the cache (`cacheTTL` 60 s), and the same
//! server with the cache off for that service (`cache: {ttl: 0s}`). Reported:
//!
//! * store calls per 1,000 brokered connections, cache on and off, one client at a time
//!   and 8 clients at once (concurrent connections share a store call in flight);
//! * connect + authenticate time (TCP connect to ReadyForQuery, with a minimal client
//!   that sends the startup packet and reads to `Z`, so no client library or process
//!   start is in the number): median and p90 of `BENCH_CONNS` connections (default
//!   1000) per service, interleaved; the differences to the literal are what a cache
//!   hit, and a store call, add to a connection.

use std::{
    io::{BufReader, Read as _, Write as _},
    net::{SocketAddr, TcpStream},
    path::Path,
    process::{Command, Stdio},
    sync::{Arc, Barrier},
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};
use broker_tests::{
    free_port, http_get,
    pg::{PgAuth, PgOptions, PgServer},
    secret_server::SecretServer,
};

use crate::bench::{Killed, median};

const TOKEN: &str = "bench-secrets-token-3c9e";

/// One connection through the broker's `pg` listener on `port`, up to ReadyForQuery:
/// how long it took. Then `Terminate` and close.
fn connect_auth(port: u16) -> anyhow::Result<Duration> {
    let started = Instant::now();
    let mut s = TcpStream::connect(("127.0.0.1", port)).context("connecting")?;
    s.set_nodelay(true)?;
    s.set_read_timeout(Some(Duration::from_secs(30)))?;
    let mut body = 196_608u32.to_be_bytes().to_vec(); // protocol 3.0
    for (k, v) in [("user", "bench"), ("database", "app")] {
        body.extend_from_slice(k.as_bytes());
        body.push(0);
        body.extend_from_slice(v.as_bytes());
        body.push(0);
    }
    body.push(0);
    let mut startup = u32::try_from(body.len() + 4)?.to_be_bytes().to_vec();
    startup.extend_from_slice(&body);
    s.write_all(&startup)?;
    let mut r = BufReader::new(s.try_clone()?);
    loop {
        let mut head = [0u8; 5];
        r.read_exact(&mut head)
            .context("reading the server's reply")?;
        let len = u32::from_be_bytes([head[1], head[2], head[3], head[4]]) as usize;
        if !(4..=1 << 20).contains(&len) {
            bail!("bad message length {len}");
        }
        let mut msg = vec![0u8; len - 4];
        r.read_exact(&mut msg)?;
        match head[0] {
            b'Z' => break,
            b'E' => bail!(
                "the broker refused the connection: {}",
                String::from_utf8_lossy(&msg).replace('\0', " ")
            ),
            b'R' if msg.get(..4) != Some(&[0, 0, 0, 0]) => {
                bail!("the broker asked the client to authenticate")
            }
            _ => {}
        }
    }
    let took = started.elapsed();
    let _ = s.write_all(&[b'X', 0, 0, 0, 4]);
    Ok(took)
}

/// `q` quantile (0..=1) of `v`, ms.
fn quantile_ms(v: &[Duration], q: f64) -> f64 {
    let mut s: Vec<f64> = v.iter().map(|d| d.as_secs_f64() * 1e3).collect();
    s.sort_by(f64::total_cmp);
    let i = ((s.len() - 1) as f64 * q).round() as usize;
    s[i]
}

/// Store calls for `key` while `clients` threads make `n` connections to `port`
/// together, per 1,000 connections.
fn calls_per_1000(
    store: &SecretServer,
    key: &str,
    port: u16,
    n: usize,
    clients: usize,
) -> anyhow::Result<f64> {
    let before = store.requests_for(key);
    let barrier = Arc::new(Barrier::new(clients));
    let threads: Vec<_> = (0..clients)
        .map(|i| {
            let barrier = Arc::clone(&barrier);
            let mine = n / clients + usize::from(i < n % clients);
            std::thread::spawn(move || -> anyhow::Result<()> {
                barrier.wait();
                for _ in 0..mine {
                    connect_auth(port)?;
                }
                Ok(())
            })
        })
        .collect();
    for t in threads {
        t.join()
            .map_err(|_| anyhow::anyhow!("client thread panicked"))??;
    }
    let calls = store.requests_for(key) - before;
    Ok(calls as f64 * 1000.0 / n as f64)
}

pub fn run(root: &Path) -> anyhow::Result<()> {
    if !broker_tests::pg::available() {
        bail!("the benchmark needs root and PostgreSQL 15");
    }
    let n: usize = std::env::var("BENCH_CONNS")
        .ok()
        .and_then(|r| r.parse().ok())
        .unwrap_or(1000)
        .clamp(8, 1_000_000);
    let password = "bench-secrets-password-5d21";
    let pg = PgServer::start(PgOptions::new(PgAuth::Scram, password));
    let store = SecretServer::start(TOKEN);
    store.set("db/password", password);
    store.set("db/password-nocache", password);
    let dir = tempfile::tempdir()?;
    let (p_literal, p_cached, p_nocache) = (free_port(), free_port(), free_port());
    let service = |name: &str, port: u16, password: &str, extra: &str| {
        format!(
            "  {name}:\n    connector: pg\n    listenOn: tcp://127.0.0.1:{port}\n{extra}    credentials:\n      host: 127.0.0.1\n      port: \"{}\"\n      sslmode: disable\n      username: app_user\n      password: {password}\n",
            pg.addr().port()
        )
    };
    let health = free_port();
    let cfg = dir.path().join("broker.yaml");
    std::fs::write(
        &cfg,
        format!(
            "version: 2\nproviders:\n  uts: {{type: http, baseUrl: \"{}\", token: \"${{UTS_TOKEN}}\"}}\nbroker:\n  health: 127.0.0.1:{health}\n  cacheTTL: 60s\nservices:\n{}{}{}",
            store.base_url(),
            service("literal", p_literal, password, ""),
            service("cached", p_cached, "{from: uts, get: db/password}", ""),
            service(
                "nocache",
                p_nocache,
                "{from: uts, get: db/password-nocache}",
                "    cache: {ttl: 0s}\n"
            ),
        ),
    )?;
    let _broker = Killed(
        Command::new(root.join("target/release/broker"))
            .args(["--log-level", "warn", "run", "--no-ebpf", "-f"])
            .arg(&cfg)
            .env("UTS_TOKEN", TOKEN)
            .envs(
                std::env::var("BENCH_BROKER_THREADS")
                    .ok()
                    .map(|t| ("TOKIO_WORKER_THREADS", t)),
            )
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .context("starting broker")?,
    );
    let health_addr: SocketAddr = format!("127.0.0.1:{health}").parse()?;
    let deadline = Instant::now() + Duration::from_secs(20);
    while !matches!(http_get(health_addr, "/ready"), Some((200, _))) {
        if Instant::now() > deadline {
            bail!("broker not ready");
        }
        std::thread::sleep(Duration::from_millis(50));
    }

    let ports = [p_literal, p_cached, p_nocache];
    // Warm-up: the first fetch of the cached password, connections, SCRAM caches.
    for _ in 0..5 {
        for p in ports {
            connect_auth(p)?;
        }
    }

    // Latency, one client, interleaved so drifts of the machine hit all three alike.
    let (cached_before, nocache_before) = (
        store.requests_for("db/password"),
        store.requests_for("db/password-nocache"),
    );
    let mut times: [Vec<Duration>; 3] = Default::default();
    for _ in 0..n {
        for (i, p) in ports.iter().enumerate() {
            times[i].push(connect_auth(*p)?);
        }
    }
    let seq_cached = (store.requests_for("db/password") - cached_before) as f64 * 1000.0 / n as f64;
    let seq_nocache =
        (store.requests_for("db/password-nocache") - nocache_before) as f64 * 1000.0 / n as f64;
    let par_cached = calls_per_1000(&store, "db/password", p_cached, n, 8)?;
    let par_nocache = calls_per_1000(&store, "db/password-nocache", p_nocache, n, 8)?;

    println!("\nstore calls per 1,000 brokered connections ({n} connections per cell), 2 cores\n");
    println!("{:<28} {:>12} {:>12}", "", "1 client", "8 clients");
    println!(
        "{:<28} {:>12.1} {:>12.1}",
        "cache on (cacheTTL 60s)", seq_cached, par_cached
    );
    println!(
        "{:<28} {:>12.1} {:>12.1}",
        "cache off (cache.ttl 0s)", seq_nocache, par_nocache
    );
    println!(
        "\nconnect + authenticate through the broker (to ReadyForQuery), {n} connections each, ms\n"
    );
    println!(
        "{:<28} {:>9} {:>9} {:>22}",
        "password from", "median", "p90", "median vs literal"
    );
    let literal = median(
        &times[0]
            .iter()
            .map(|d| d.as_secs_f64() * 1e3)
            .collect::<Vec<_>>(),
    );
    for (i, name) in ["a literal", "the cache (hit)", "the store (no cache)"]
        .iter()
        .enumerate()
    {
        let ms: Vec<f64> = times[i].iter().map(|d| d.as_secs_f64() * 1e3).collect();
        let m = median(&ms);
        let delta = if i == 0 {
            String::new()
        } else {
            format!("{:+.3} ms", m - literal)
        };
        println!(
            "{name:<28} {m:>9.3} {:>9.3} {delta:>22}",
            quantile_ms(&times[i], 0.9)
        );
    }
    println!(
        "\nThe secret store is the test server (std threads, one connection per request, \
         loopback); PostgreSQL authenticates every connection with SCRAM."
    );
    Ok(())
}
