//! Live revocations (`broker revoke`, through the admin socket): callers that may no
//! longer use a service (or any), effective for the next connection. Shared by every
//! configuration snapshot; lost at restart (the configuration's `deny` rules are the
//! durable form).

use std::{
    sync::{
        Arc, RwLock,
        atomic::{AtomicU64, Ordering},
    },
    time::SystemTime,
};

use globset::GlobMatcher;

use super::{Identity, glob};

/// The most revocations held at once.
pub const MAX_REVOCATIONS: usize = 1024;

/// Which callers a revocation selects: every key given must match (a key whose fact is
/// unknown for a caller counts as matching: revocations fail closed).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Selector {
    pub uid: Option<u32>,
    pub gid: Option<u32>,
    pub pid: Option<u32>,
    /// A glob over the cgroup path.
    pub cgroup: Option<String>,
    /// A glob over the executable's path.
    pub exe: Option<String>,
    pub comm: Option<String>,
}

impl Selector {
    fn is_empty(&self) -> bool {
        *self == Self::default()
    }
}

/// One revocation.
#[derive(Debug)]
pub struct Revocation {
    pub id: u64,
    /// The service it applies to (`None`: every service).
    pub service: Option<String>,
    pub selector: Selector,
    /// Whether the caller's live connections were ended when it was made.
    pub kill: bool,
    pub since: SystemTime,
    cgroup: Option<GlobMatcher>,
    exe: Option<GlobMatcher>,
}

impl Revocation {
    /// Whether it selects `who` on `service`.
    #[must_use]
    pub fn selects(&self, service: &str, who: &Identity<'_>) -> bool {
        if self.service.as_deref().is_some_and(|s| s != service) {
            return false;
        }
        let s = &self.selector;
        let eq = |want: Option<u32>, have: Option<u32>| match (want, have) {
            (None, _) | (Some(_), None) => true,
            (Some(w), Some(h)) => w == h,
        };
        eq(s.uid, who.uid)
            && eq(s.gid, who.gid)
            && eq(s.pid, who.pid)
            && match (&self.cgroup, who.cgroup) {
                (Some(g), Some(c)) => g.is_match(c),
                _ => true,
            }
            && match (&self.exe, who.exe) {
                (Some(g), Some(e)) => g.is_match(e),
                _ => true,
            }
            && match (&s.comm, who.comm) {
                (Some(w), Some(c)) => w == c,
                _ => true,
            }
    }
}

/// The revocations in force.
#[derive(Debug, Default)]
pub struct Revocations {
    list: RwLock<Vec<Arc<Revocation>>>,
    next: AtomicU64,
}

impl Revocations {
    /// Add one; returns it.
    ///
    /// # Errors
    /// An empty selector (it would select everyone: say so with `uid`, or stop the
    /// service), an invalid glob, or [`MAX_REVOCATIONS`] reached.
    pub fn add(
        &self,
        service: Option<String>,
        selector: Selector,
        kill: bool,
    ) -> Result<Arc<Revocation>, String> {
        if selector.is_empty() {
            return Err(
                "a revocation needs a caller: uid, gid, pid, cgroup, exe or comm".to_owned(),
            );
        }
        let matcher = |g: &Option<String>| {
            g.as_deref()
                .map(|g| glob(g).map(|g| g.compile_matcher()))
                .transpose()
        };
        let r = Arc::new(Revocation {
            id: self.next.fetch_add(1, Ordering::Relaxed) + 1,
            service,
            cgroup: matcher(&selector.cgroup)?,
            exe: matcher(&selector.exe)?,
            selector,
            kill,
            since: SystemTime::now(),
        });
        let mut list = self
            .list
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if list.len() >= MAX_REVOCATIONS {
            return Err(format!(
                "{MAX_REVOCATIONS} revocations are in force already: lift some (broker revoke --lift ID)"
            ));
        }
        list.push(Arc::clone(&r));
        Ok(r)
    }

    /// Lift revocation `id`; whether it existed.
    pub fn lift(&self, id: u64) -> bool {
        let mut list = self
            .list
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let before = list.len();
        list.retain(|r| r.id != id);
        list.len() != before
    }

    /// Every revocation in force, oldest first.
    #[must_use]
    pub fn list(&self) -> Vec<Arc<Revocation>> {
        self.list
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }

    /// The first revocation that selects `who` on `service`.
    #[must_use]
    pub fn find(&self, service: &str, who: &Identity<'_>) -> Option<u64> {
        let list = self
            .list
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        list.iter().find(|r| r.selects(service, who)).map(|r| r.id)
    }
}
