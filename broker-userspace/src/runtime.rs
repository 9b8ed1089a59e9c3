//! The runtime snapshot: every service with its connector instance, under a stable id,
//! stamped with a generation. It is immutable; a new configuration becomes a new
//! snapshot swapped in whole ([`Current::swap`]), so a connection sees one consistent
//! set of services, connectors and secrets from start to end.
//!
//! The id shared with the kernel maps is derived from the service's name, not from its
//! position in the file, and every target (and so every redirect record) carries the
//! generation of the snapshot that wrote it: a record whose generation is not the
//! current one is refused ([`Runtime::for_record`]), so a reload can never hand one
//! service's credentials to a connection meant for another.

use std::{
    collections::{BTreeMap, VecDeque},
    sync::{Arc, Mutex, RwLock},
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};

use crate::{
    config::{Config, ListenAddr, Service},
    connector::{self, Connector, Env},
};

/// How long a replaced snapshot still serves the redirect records written under it: a
/// connect the kernel redirected just before a reload is accepted just after it.
pub const RETIRED_GRACE: Duration = Duration::from_secs(10);
/// Replaced snapshots kept for [`RETIRED_GRACE`], at most.
pub const RETIRED_MAX: usize = 4;

/// One service as it runs: its configuration and its connector instance.
#[derive(Debug)]
pub struct ServiceRt {
    pub id: u32,
    pub service: Arc<Service>,
    pub connector: Arc<dyn Connector>,
    /// The service's compiled policy (`None`: no policy keys, everyone may connect).
    pub policy: Option<Arc<crate::policy::Engine>>,
    /// The service's metric handles, made at its first connection in this snapshot
    /// (`proxy::handle`).
    pub metrics: std::sync::OnceLock<Arc<crate::metrics::ServiceMetrics>>,
}

/// Every service of one configuration.
#[derive(Debug)]
pub struct Runtime {
    pub generation: u32,
    /// What the connections of this snapshot use: its secret store (the providers of
    /// this configuration, their cache), the dialer, the local CA.
    pub env: Env,
    /// In configuration order.
    services: Vec<Arc<ServiceRt>>,
    by_id: BTreeMap<u32, Arc<ServiceRt>>,
    /// One per `listenOn` address, in configuration order: the service's own, or for
    /// HTTP services sharing one address, the group (a service named after its
    /// members, `a+b`, whose connector routes each request to one of them).
    listeners: Vec<Arc<ServiceRt>>,
}

/// Why a redirect record cannot be served.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum RecordError {
    #[error("no service with id {0:#010x}")]
    UnknownService(u32),
    #[error(
        "stale redirect record: written for configuration generation {record}, the current one is {current}"
    )]
    Stale { record: u32, current: u32 },
}

/// The stable id of a service: FNV-1a of its name (the same name gets the same id in
/// every configuration and every process).
#[must_use]
pub fn service_id(name: &str) -> u32 {
    let mut h: u32 = 0x811c_9dc5;
    for b in name.bytes() {
        h ^= u32::from(b);
        h = h.wrapping_mul(0x0100_0193);
    }
    h
}

impl Runtime {
    /// Build every service's connector instance.
    ///
    /// # Errors
    /// A connector that cannot be built (naming the service), or two service names with
    /// the same id.
    pub fn build(cfg: &Config, generation: u32, env: Env) -> anyhow::Result<Self> {
        let mut services = Vec::with_capacity(cfg.services.len());
        let mut by_id = BTreeMap::new();
        for s in &cfg.services {
            let service = Arc::new(s.clone());
            let connector =
                connector::build(&service).with_context(|| format!("service {}", s.name))?;
            let policy = crate::policy::Engine::build(&s.policy)
                .map_err(|e| anyhow::anyhow!("services.{}.{e}", s.name))?
                .map(Arc::new);
            let rt = Arc::new(ServiceRt {
                id: service_id(&s.name),
                service,
                connector,
                policy,
                metrics: std::sync::OnceLock::new(),
            });
            if let Some(other) = by_id.insert(rt.id, Arc::clone(&rt)) {
                bail!(
                    "services {} and {} have the same id; rename one",
                    other.service.name,
                    s.name
                );
            }
            services.push(rt);
        }
        let listeners = listeners(&services)?;
        Ok(Self {
            generation,
            env,
            services,
            by_id,
            listeners,
        })
    }

    /// Every `listenOn` listener (see [`Runtime::listeners`](Self)).
    #[must_use]
    pub fn listeners(&self) -> &[Arc<ServiceRt>] {
        &self.listeners
    }

    /// The listener at this `listenOn` address.
    #[must_use]
    pub fn listener_at(&self, addr: &ListenAddr) -> Option<&Arc<ServiceRt>> {
        self.listeners
            .iter()
            .find(|l| l.service.listen_on.as_ref() == Some(addr))
    }

    /// The listener with this id.
    #[must_use]
    pub fn listener(&self, id: u32) -> Option<&Arc<ServiceRt>> {
        self.listeners.iter().find(|l| l.id == id)
    }

    /// Every service, in configuration order.
    #[must_use]
    pub fn services(&self) -> &[Arc<ServiceRt>] {
        &self.services
    }

    #[must_use]
    pub fn service(&self, id: u32) -> Option<&Arc<ServiceRt>> {
        self.by_id.get(&id)
    }

    /// The service a redirect record names, if the record belongs to this snapshot.
    ///
    /// # Errors
    /// A record of another generation, or an id this snapshot does not have.
    pub fn for_record(&self, id: u32, generation: u32) -> Result<&Arc<ServiceRt>, RecordError> {
        if generation != self.generation {
            return Err(RecordError::Stale {
                record: generation,
                current: self.generation,
            });
        }
        self.service(id).ok_or(RecordError::UnknownService(id))
    }
}

/// The services by `listenOn` address, in configuration order (several only for HTTP
/// services sharing one: the loader allows only those to).
fn groups<'a, T>(
    items: &'a [T],
    service: impl Fn(&'a T) -> &'a Service,
) -> Vec<(&'a ListenAddr, Vec<&'a T>)> {
    let mut groups: Vec<(&ListenAddr, Vec<&T>)> = Vec::new();
    for item in items {
        let Some(addr) = &service(item).listen_on else {
            continue;
        };
        match groups.iter_mut().find(|(a, _)| *a == addr) {
            Some((_, members)) => members.push(item),
            None => groups.push((addr, vec![item])),
        }
    }
    groups
}

/// What building the listeners would refuse, found without building anything (for
/// `broker check`): services that share a `listenOn` address but cannot.
///
/// # Errors
/// The first such group, naming the service and key.
pub fn check(cfg: &Config) -> anyhow::Result<()> {
    for (addr, members) in groups(&cfg.services, |s| s) {
        if members.len() > 1 {
            if let Some(s) = members.iter().find(|s| !s.policy.is_empty()) {
                bail!(
                    "services.{}: a service with policy keys (allow, deny, schedule, rateLimit) cannot share listenOn {addr}: policy is decided per connection, and a shared listener routes per request; give it a listenOn of its own",
                    s.name
                );
            }
            let shared: Vec<Arc<Service>> =
                members.into_iter().map(|s| Arc::new(s.clone())).collect();
            connector::check_shared(&shared)
                .with_context(|| format!("services sharing listenOn {addr}"))?;
        }
    }
    Ok(())
}

/// One listener per `listenOn` address: the service's own, or a shared one for the
/// HTTP services that name the same address.
fn listeners(services: &[Arc<ServiceRt>]) -> anyhow::Result<Vec<Arc<ServiceRt>>> {
    let mut out = Vec::new();
    for (addr, members) in groups(services, |rt| &rt.service) {
        if let [one] = members.as_slice() {
            out.push(Arc::clone(one));
            continue;
        }
        let name = members
            .iter()
            .map(|m| m.service.name.as_str())
            .collect::<Vec<_>>()
            .join("+");
        let lead = &members[0].service;
        if let Some(m) = members.iter().find(|m| m.policy.is_some()) {
            bail!(
                "services.{}: a service with policy keys (allow, deny, schedule, rateLimit) cannot share listenOn {addr}: policy is decided per connection, and a shared listener routes per request; give it a listenOn of its own",
                m.service.name
            );
        }
        let service = Arc::new(Service {
            name: name.clone(),
            intercept: Vec::new(),
            policy: crate::policy::Spec::default(),
            credentials: BTreeMap::new(),
            authentication: Vec::new(),
            ..(**lead).clone()
        });
        let shared: Vec<Arc<Service>> = members.iter().map(|m| Arc::clone(&m.service)).collect();
        let connector = connector::build_shared(&shared)
            .with_context(|| format!("services sharing listenOn {addr}"))?;
        let id = service_id(&name);
        if services.iter().any(|s| s.id == id) {
            bail!("the listener of services {name} has the id of a service; rename one");
        }
        out.push(Arc::new(ServiceRt {
            id,
            service,
            connector,
            policy: None,
            metrics: std::sync::OnceLock::new(),
        }));
    }
    Ok(out)
}

/// The snapshot in force, swapped whole, and the ones it replaced in the last
/// [`RETIRED_GRACE`] (for redirect records written under them).
#[derive(Debug)]
pub struct Current {
    now: RwLock<Arc<Runtime>>,
    retired: Mutex<VecDeque<(Instant, Arc<Runtime>)>>,
}

impl Current {
    #[must_use]
    pub fn new(rt: Runtime) -> Self {
        Self {
            now: RwLock::new(Arc::new(rt)),
            retired: Mutex::new(VecDeque::new()),
        }
    }

    /// The snapshot in force now (a connection keeps it until it ends).
    #[must_use]
    pub fn load(&self) -> Arc<Runtime> {
        Arc::clone(
            &self
                .now
                .read()
                .unwrap_or_else(std::sync::PoisonError::into_inner),
        )
    }

    /// Put `rt` in force; returns the previous snapshot, which keeps serving the
    /// records written under it for [`RETIRED_GRACE`].
    pub fn swap(&self, rt: Runtime) -> Arc<Runtime> {
        let old = {
            let mut cur = self
                .now
                .write()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            std::mem::replace(&mut *cur, Arc::new(rt))
        };
        let mut retired = self
            .retired
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        retired.push_back((Instant::now(), Arc::clone(&old)));
        while retired.len() > RETIRED_MAX {
            retired.pop_front();
        }
        old
    }

    /// The snapshot a redirect record belongs to (the current one, or one replaced less
    /// than [`RETIRED_GRACE`] ago) and the service it names there.
    ///
    /// # Errors
    /// A record of a generation no longer kept, or an id its snapshot does not have.
    pub fn for_record(
        &self,
        id: u32,
        generation: u32,
    ) -> Result<(Arc<Runtime>, Arc<ServiceRt>), RecordError> {
        let now = self.load();
        if generation == now.generation {
            let rt = now.for_record(id, generation).map(Arc::clone)?;
            return Ok((now, rt));
        }
        let mut retired = self
            .retired
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        retired.retain(|(at, _)| at.elapsed() < RETIRED_GRACE);
        let Some((_, old)) = retired.iter().find(|(_, r)| r.generation == generation) else {
            return Err(RecordError::Stale {
                record: generation,
                current: now.generation,
            });
        };
        let rt = old.for_record(id, generation).map(Arc::clone)?;
        Ok((Arc::clone(old), rt))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config;

    fn cfg(yaml: &str) -> Config {
        config::load_str(yaml, &crate::connector::KINDS).expect("config loads")
    }

    fn build(yaml: &str, generation: u32) -> Runtime {
        let cfg = cfg(yaml);
        let env = Env {
            secrets: Arc::new(crate::secrets::SecretStore::new(&cfg).unwrap()),
            dialer: crate::connector::dial::Dialer { mark: 0 },
            ca: None,
        };
        Runtime::build(&cfg, generation, env).unwrap()
    }

    const TWO: &str = "version: 2\nservices:\n  a:\n    connector: tcp\n    listenOn: tcp://127.0.0.1:1\n    credentials:\n      host: 127.0.0.1\n  b:\n    connector: tcp\n    listenOn: tcp://127.0.0.1:2\n    credentials:\n      host: 127.0.0.1\n";

    #[test]
    fn ids_follow_names_not_positions() {
        let one = build(TWO, 1);
        let swapped = TWO
            .replace("  a:", "  tmp:")
            .replace("  b:", "  a:")
            .replace("  tmp:", "  b:");
        let two = build(&swapped, 2);
        for name in ["a", "b"] {
            let id = service_id(name);
            assert_eq!(one.service(id).unwrap().service.name, name);
            assert_eq!(two.service(id).unwrap().service.name, name);
        }
        assert_ne!(service_id("a"), service_id("b"));
    }

    #[test]
    fn a_record_of_another_generation_is_refused_not_served_by_another_service() {
        let current = Current::new(build(TWO, 1));
        let a = service_id("a");
        assert_eq!(current.load().for_record(a, 1).unwrap().service.name, "a");
        // A reload: the service `a` is gone, another service now sits first in the file.
        let reloaded = TWO.replace("  a:", "  c:");
        let old = current.swap(build(&reloaded, 2));
        assert_eq!(old.generation, 1);
        let now = current.load();
        assert_eq!(
            now.for_record(a, 1).unwrap_err(),
            RecordError::Stale {
                record: 1,
                current: 2
            }
        );
        assert_eq!(
            now.for_record(a, 2).unwrap_err(),
            RecordError::UnknownService(a)
        );
        assert_eq!(
            now.for_record(service_id("c"), 2).unwrap().service.name,
            "c"
        );
        // A record written just before the reload is served by the snapshot it was
        // written under (its service, its credentials), never by the new one.
        let (snap, rt) = current.for_record(a, 1).unwrap();
        assert_eq!((snap.generation, rt.service.name.as_str()), (1, "a"));
        assert_eq!(
            current.for_record(service_id("c"), 1).unwrap_err(),
            RecordError::UnknownService(service_id("c"))
        );
        // Only a few replaced snapshots are kept.
        for g in 3..3 + RETIRED_MAX as u32 + 1 {
            current.swap(build(TWO, g));
        }
        assert!(matches!(
            current.for_record(a, 1),
            Err(RecordError::Stale { record: 1, .. })
        ));
    }
}
