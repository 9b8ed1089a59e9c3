//! Keeps the kernel's target maps current for `intercept:` hostnames.
//!
//! Each hostname is resolved two ways and the answers are merged:
//! * `getaddrinfo` (through tokio), so the broker sees exactly what applications see
//!   (`/etc/hosts`, nsswitch, search domains);
//! * a DNS query (hickory) for the same name, which also gives the record TTL.
//!
//! The name is resolved again when the shortest TTL expires (clamped to
//! [`MIN_REFRESH`]..=[`MAX_REFRESH`]; [`DEFAULT_REFRESH`] when DNS gave no TTL, e.g.
//! for `/etc/hosts` names). An address stays in the map until it has been missing from
//! two successful resolutions in a row, so round-robin DNS answers do not flap; a failed
//! resolution keeps the previous addresses.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::{IpAddr, SocketAddr},
    sync::{Arc, PoisonError, RwLock},
    time::Duration,
};

use hickory_resolver::TokioResolver;
use tokio::{sync::watch, time::Instant};

use crate::{config::InterceptTarget, ebpf::KernelTarget};

pub const MIN_REFRESH: Duration = Duration::from_secs(1);
pub const MAX_REFRESH: Duration = Duration::from_secs(300);
pub const DEFAULT_REFRESH: Duration = Duration::from_secs(30);
pub const RETRY_AFTER_FAILURE: Duration = Duration::from_secs(5);

/// One `host:port` intercept and what it currently resolves to.
#[derive(Debug)]
struct HostEntry {
    host: String,
    port: u16,
    service_id: u32,
    /// Address -> consecutive successful resolutions it was missing from.
    addrs: BTreeMap<IpAddr, u8>,
    next: Instant,
}

/// Which configured intercept hostname an address stands for, per service: the name an
/// upstream's TLS certificate is verified against when the app's own destination is
/// the upstream (the app dialled `db.example.com`, the kernel saw only its address).
///
/// When several hostnames of one service resolve to the same address and port, the
/// first in the configuration wins (the broker cannot see which name the app looked up).
#[derive(Debug, Default)]
pub struct HostNames(RwLock<Arc<NameMap>>);

/// (service id, address, port) -> hostname.
type NameMap = BTreeMap<(u32, IpAddr, u16), String>;

impl HostNames {
    /// The hostname of `service` that `dst` currently stands for.
    #[must_use]
    pub fn lookup(&self, service: u32, dst: SocketAddr) -> Option<String> {
        let map = Arc::clone(&self.0.read().unwrap_or_else(PoisonError::into_inner));
        map.get(&(service, dst.ip().to_canonical(), dst.port()))
            .cloned()
    }

    /// The addresses `host:port` of `service` currently stands for (`broker status`).
    #[must_use]
    pub fn addrs_of(&self, service: u32, host: &str, port: u16) -> Vec<IpAddr> {
        let map = Arc::clone(&self.0.read().unwrap_or_else(PoisonError::into_inner));
        map.iter()
            .filter(|((id, _, p), h)| *id == service && *p == port && h.as_str() == host)
            .map(|((_, ip, _), _)| *ip)
            .collect()
    }

    /// Publish the names of `targets`' current addresses.
    pub fn publish(&self, targets: &Targets) {
        let mut map = BTreeMap::new();
        for h in &targets.hosts {
            for ip in h.addrs.keys() {
                map.entry((h.service_id, ip.to_canonical(), h.port))
                    .or_insert_with(|| h.host.clone());
            }
        }
        *self.0.write().unwrap_or_else(PoisonError::into_inner) = Arc::new(map);
    }
}

/// Resolves intercept hostnames and computes the kernel target set.
pub struct Targets {
    fixed: BTreeMap<KernelTarget, u32>,
    hosts: Vec<HostEntry>,
    dns: Option<TokioResolver>,
}

impl Targets {
    /// Split the configured intercepts into fixed kernel targets and hostnames.
    #[must_use]
    pub fn new(services: &[(u32, &[InterceptTarget])]) -> Self {
        let mut fixed = BTreeMap::new();
        let mut hosts = Vec::new();
        for &(id, targets) in services {
            for t in targets {
                match t {
                    InterceptTarget::Addr(a) => {
                        fixed.insert(KernelTarget::Exact(a.ip(), a.port()), id);
                    }
                    InterceptTarget::Cidr { net, port } => {
                        fixed.insert(
                            KernelTarget::Cidr(net.network(), net.prefix_len(), *port),
                            id,
                        );
                    }
                    InterceptTarget::Host { host, port } => {
                        if let Ok(ip) = host.parse::<IpAddr>() {
                            fixed.insert(KernelTarget::Exact(ip, *port), id);
                        } else {
                            hosts.push(HostEntry {
                                host: host.clone(),
                                port: *port,
                                service_id: id,
                                addrs: BTreeMap::new(),
                                next: Instant::now(),
                            });
                        }
                    }
                }
            }
        }
        let dns = if hosts.is_empty() {
            None
        } else {
            match TokioResolver::builder_tokio() {
                Ok(b) => Some(b.build()),
                Err(e) => {
                    tracing::warn!(error = %e, "no DNS configuration; using getaddrinfo only");
                    None
                }
            }
        };
        Self { fixed, hosts, dns }
    }

    /// Whether any hostname needs refreshing.
    #[must_use]
    pub fn has_hosts(&self) -> bool {
        !self.hosts.is_empty()
    }

    /// The current kernel target set.
    #[must_use]
    pub fn current(&self) -> BTreeMap<KernelTarget, u32> {
        let mut out = self.fixed.clone();
        for h in &self.hosts {
            for ip in h.addrs.keys() {
                out.entry(KernelTarget::Exact(*ip, h.port))
                    .or_insert(h.service_id);
                // A dual-stack socket reaches an IPv4 address as ::ffff:a.b.c.d; the
                // kernel programs store IPv4 in that mapped form, so one entry covers both.
            }
        }
        out
    }

    /// Resolve every hostname that is due. Returns whether the target set changed.
    pub async fn refresh_due(&mut self) -> bool {
        let now = Instant::now();
        let mut changed = false;
        for i in 0..self.hosts.len() {
            if self.hosts[i].next > now {
                continue;
            }
            let (found, ttl) = resolve(self.dns.as_ref(), &self.hosts[i].host).await;
            let h = &mut self.hosts[i];
            if found.is_empty() {
                tracing::warn!(host = %h.host, "cannot resolve intercept host; keeping previous addresses");
                h.next = Instant::now() + RETRY_AFTER_FAILURE;
                continue;
            }
            let before: BTreeSet<IpAddr> = h.addrs.keys().copied().collect();
            for missing in h.addrs.values_mut() {
                *missing = missing.saturating_add(1);
            }
            for ip in &found {
                h.addrs.insert(*ip, 0);
            }
            h.addrs.retain(|_, missing| *missing < 2);
            let after: BTreeSet<IpAddr> = h.addrs.keys().copied().collect();
            if before != after {
                tracing::info!(host = %h.host, port = h.port, addrs = ?after, "intercept host resolved");
                changed = true;
            }
            let refresh = ttl
                .unwrap_or(DEFAULT_REFRESH)
                .clamp(MIN_REFRESH, MAX_REFRESH);
            h.next = Instant::now() + refresh;
        }
        changed
    }

    /// When the next hostname is due.
    #[must_use]
    pub fn next_due(&self) -> Option<Instant> {
        self.hosts.iter().map(|h| h.next).min()
    }
}

async fn resolve(dns: Option<&TokioResolver>, host: &str) -> (BTreeSet<IpAddr>, Option<Duration>) {
    let mut found = BTreeSet::new();
    if let Ok(addrs) = tokio::net::lookup_host((host, 0)).await {
        found.extend(addrs.map(|a| a.ip()));
    }
    let mut ttl = None;
    if let Some(r) = dns
        && let Ok(Ok(answer)) =
            tokio::time::timeout(Duration::from_secs(5), r.lookup_ip(host)).await
    {
        found.extend(answer.iter());
        ttl = Some(
            answer
                .valid_until()
                .saturating_duration_since(std::time::Instant::now()),
        );
    }
    (found, ttl)
}

/// Keep the kernel maps current until `stop` turns true.
pub async fn run(
    mut targets: Targets,
    interceptor: std::sync::Weak<crate::ebpf::Interceptor>,
    names: Arc<HostNames>,
    mut stop: watch::Receiver<bool>,
) {
    loop {
        let Some(due) = targets.next_due() else {
            return;
        };
        tokio::select! {
            () = crate::proxy::stopped(&mut stop) => return,
            () = tokio::time::sleep_until(due) => {}
        }
        if !targets.refresh_due().await {
            continue;
        }
        names.publish(&targets);
        let Some(interceptor) = interceptor.upgrade() else {
            return;
        };
        if let Err(e) = interceptor.set_targets(&targets.current()) {
            tracing::error!(error = %e, "updating intercept targets failed");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn fixed_targets_and_localhost_resolution() {
        let a: Vec<InterceptTarget> = vec![
            InterceptTarget::Addr("10.0.0.5:5432".parse().unwrap()),
            InterceptTarget::Cidr {
                net: "10.1.0.0/16".parse().unwrap(),
                port: 443,
            },
            InterceptTarget::Host {
                host: "localhost".into(),
                port: 8080,
            },
        ];
        let mut t = Targets::new(&[(3, &a)]);
        assert!(t.has_hosts());
        assert!(t.refresh_due().await, "localhost resolves");
        let cur = t.current();
        assert_eq!(
            cur.get(&KernelTarget::Exact("10.0.0.5".parse().unwrap(), 5432)),
            Some(&3)
        );
        assert_eq!(
            cur.get(&KernelTarget::Cidr("10.1.0.0".parse().unwrap(), 16, 443)),
            Some(&3)
        );
        assert_eq!(
            cur.get(&KernelTarget::Exact("127.0.0.1".parse().unwrap(), 8080)),
            Some(&3)
        );
        assert!(t.next_due().unwrap() > Instant::now());
    }
}
