//! CancelRequest routing: the BackendKeyData each brokered session received, mapped to
//! the upstream that issued it, so a CancelRequest arriving on a new client connection
//! can be forwarded there.

use std::{
    collections::HashMap,
    fmt,
    sync::{Arc, Mutex, PoisonError},
};

use super::startup::CancelKey;
use crate::connector::dial::HostPort;

/// Default bound on remembered sessions (one entry per live brokered connection).
pub const CANCEL_MAP_CAP: usize = 65_536;

/// Where a cancel key's session lives.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CancelTarget {
    pub to: HostPort,
    /// The key to send upstream when the client was given a key of its own (a reused
    /// session, see `reuse`); `None`: the client's key is the server's.
    pub upstream_key: Option<CancelKey>,
}

/// Live sessions' cancel keys. `Debug` shows only the size (keys authorize cancels).
pub struct CancelMap {
    cap: usize,
    inner: Mutex<HashMap<CancelKey, CancelTarget>>,
}

impl Default for CancelMap {
    fn default() -> Self {
        Self::with_capacity(CANCEL_MAP_CAP)
    }
}

impl fmt::Debug for CancelMap {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CancelMap")
            .field("len", &self.len())
            .field("cap", &self.cap)
            .finish()
    }
}

impl CancelMap {
    #[must_use]
    pub fn with_capacity(cap: usize) -> Self {
        Self {
            cap,
            inner: Mutex::new(HashMap::new()),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<CancelKey, CancelTarget>> {
        self.inner.lock().unwrap_or_else(PoisonError::into_inner)
    }

    #[must_use]
    pub fn len(&self) -> usize {
        self.lock().len()
    }

    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Remember a session; the returned guard forgets it when dropped. `None` when the
    /// map is full (that session cannot be cancelled through the broker).
    #[must_use]
    pub fn register(self: &Arc<Self>, key: CancelKey, target: CancelTarget) -> Option<CancelGuard> {
        let mut map = self.lock();
        if map.len() >= self.cap && !map.contains_key(&key) {
            return None;
        }
        map.insert(key.clone(), target.clone());
        Some(CancelGuard {
            map: Arc::clone(self),
            key,
            target,
        })
    }

    #[must_use]
    pub fn lookup(&self, key: &CancelKey) -> Option<CancelTarget> {
        self.lock().get(key).cloned()
    }
}

/// Removes a session's cancel key when the brokered connection ends.
pub struct CancelGuard {
    map: Arc<CancelMap>,
    key: CancelKey,
    target: CancelTarget,
}

impl fmt::Debug for CancelGuard {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "CancelGuard({:?})", self.key)
    }
}

impl Drop for CancelGuard {
    fn drop(&mut self) {
        let mut map = self.map.lock();
        // Only our own entry: a later session may have reused the key.
        if map.get(&self.key) == Some(&self.target) {
            map.remove(&self.key);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(pid: u32) -> CancelKey {
        CancelKey {
            pid,
            key: vec![1, 2, 3, 4],
        }
    }

    fn target() -> CancelTarget {
        CancelTarget {
            to: HostPort::new("db", 5432),
            upstream_key: None,
        }
    }

    #[test]
    fn registers_and_forgets() {
        let m = Arc::new(CancelMap::with_capacity(2));
        {
            let _g = m.register(key(1), target()).unwrap();
            assert_eq!(m.lookup(&key(1)), Some(target()));
            assert_eq!(m.lookup(&key(2)), None);
            // Same pid, other key bytes: unknown.
            let other = CancelKey {
                pid: 1,
                key: vec![9, 9, 9, 9],
            };
            assert_eq!(m.lookup(&other), None);
        }
        assert!(m.is_empty());
    }

    #[test]
    fn is_bounded() {
        let m = Arc::new(CancelMap::with_capacity(1));
        let g = m.register(key(1), target()).unwrap();
        assert!(m.register(key(2), target()).is_none());
        drop(g);
        assert!(m.register(key(2), target()).is_some());
        assert_eq!(format!("{m:?}"), "CancelMap { len: 0, cap: 1 }");
    }
}
