//! The credential cache: (provider, id) -> value, kept for `broker.cacheTTL` or until
//! the provider's own expiry, whichever comes first; with single-flight fetching.
//!
//! * Bounded by the configuration: ids come from it, never from clients.
//! * Single-flight: requests for a key that is not cached join the fetch already in
//!   flight for it, so N concurrent connections cause one provider call. A `fresh`
//!   request (the upstream rejected the cached value) starts a new fetch, which
//!   concurrent `fresh` requests join in turn. The fetch runs in a waiting request's
//!   task; if that request goes away, another waiter carries on with its own fetch.
//! * A failed fetch is returned to everyone waiting for it and not cached: the next
//!   request tries again.
//! * Expired entries are removed (and their values zeroized) by [`sweep`] when they
//!   expire, not when next read.
//! * With a TTL of zero nothing is cached; concurrent requests still share a fetch.

use std::{
    collections::HashMap,
    sync::{Arc, Mutex, MutexGuard, Weak},
    time::Duration,
};

use tokio::{
    sync::{Notify, OnceCell},
    time::Instant,
};

use super::SecretError;
use crate::secret::Secret;

/// (provider instance, id).
type Key = (String, String);

/// What one fetch produced: the value and the provider's expiry, if any.
type Outcome = Result<(Secret, Option<Instant>), SecretError>;

struct Entry {
    value: Secret,
    expires: Instant,
}

/// A fetch in flight: every request for the key waits on the same cell.
struct Flight {
    cell: Arc<OnceCell<Outcome>>,
    /// Started by a `fresh` request (joined by later `fresh` requests too).
    fresh: bool,
}

#[derive(Default)]
struct State {
    entries: HashMap<Key, Entry>,
    flights: HashMap<Key, Flight>,
    /// When the sweeper will next run (None: it waits one TTL, or for a wake-up).
    next_sweep: Option<Instant>,
}

pub struct Cache {
    ttl: Duration,
    state: Mutex<State>,
    /// Wakes the sweeper when an entry expires before its next run.
    wake: Arc<Notify>,
}

impl Cache {
    #[must_use]
    pub fn new(ttl: Duration) -> Self {
        Self {
            ttl,
            state: Mutex::new(State::default()),
            wake: Arc::new(Notify::new()),
        }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// The value for (provider, id): cached, from a fetch in flight, or from `fetch`
    /// (called at most once, and only if this request ends up doing the fetch).
    ///
    /// # Errors
    /// What the fetch returned.
    pub async fn get<F, Fut>(
        &self,
        provider: &str,
        id: &str,
        fresh: bool,
        fetch: F,
    ) -> Result<Secret, SecretError>
    where
        F: FnOnce() -> Fut,
        Fut: Future<Output = Outcome>,
    {
        let key = (provider.to_owned(), id.to_owned());
        let cell = {
            let mut st = self.lock();
            if !fresh
                && let Some(e) = st.entries.get(&key)
                && Instant::now() < e.expires
            {
                return Ok(e.value.clone());
            }
            match st.flights.get(&key) {
                // A fresh fetch in flight serves anyone; a normal one only non-fresh
                // requests (it may have started before the value was rejected).
                Some(f) if f.fresh || !fresh => Arc::clone(&f.cell),
                _ => {
                    let cell = Arc::new(OnceCell::new());
                    st.flights.insert(
                        key.clone(),
                        Flight {
                            cell: Arc::clone(&cell),
                            fresh,
                        },
                    );
                    cell
                }
            }
        };
        let outcome = cell.get_or_init(fetch).await.clone();
        // The first waiter back ends the flight and caches a success; a flight that a
        // fresh one replaced caches nothing.
        let mut st = self.lock();
        if st
            .flights
            .get(&key)
            .is_some_and(|f| Arc::ptr_eq(&f.cell, &cell))
        {
            st.flights.remove(&key);
            if let Ok((value, provider_expiry)) = &outcome {
                self.store(&mut st, key, value, *provider_expiry);
            }
        }
        drop(st);
        outcome.map(|(value, _)| value)
    }

    fn store(&self, st: &mut State, key: Key, value: &Secret, provider_expiry: Option<Instant>) {
        if self.ttl.is_zero() {
            return;
        }
        let now = Instant::now();
        let mut expires = now + self.ttl;
        if let Some(p) = provider_expiry {
            expires = expires.min(p);
        }
        if expires <= now {
            return;
        }
        st.entries.insert(
            key,
            Entry {
                value: value.clone(),
                expires,
            },
        );
        if st.next_sweep.is_none_or(|at| expires < at) {
            st.next_sweep = Some(expires);
            self.wake.notify_one();
        }
    }

    /// Remove the expired entries (their values are zeroized on drop). Returns when the
    /// next entry expires, if any.
    pub fn sweep_expired(&self) -> Option<Instant> {
        let now = Instant::now();
        let mut st = self.lock();
        st.entries.retain(|_, e| e.expires > now);
        let next = st.entries.values().map(|e| e.expires).min();
        st.next_sweep = next;
        next
    }

    /// Entries in the cache (expired or not yet swept).
    #[must_use]
    pub fn len(&self) -> usize {
        self.lock().entries.len()
    }

    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Evict expired credentials on time, for as long as the cache exists: sleeps until the
/// next entry expires (woken early when a new entry expires sooner), or one TTL when
/// the cache is empty.
pub async fn sweep(cache: Weak<Cache>) {
    /// Floor between two timed sweeps, so a burst of entries expiring together costs
    /// one pass.
    const MIN_SLEEP: Duration = Duration::from_millis(50);
    loop {
        let (next, ttl, wake) = {
            let Some(c) = cache.upgrade() else { return };
            if c.ttl.is_zero() {
                return;
            }
            (c.sweep_expired(), c.ttl, Arc::clone(&c.wake))
        };
        let until = next.unwrap_or_else(|| Instant::now() + ttl);
        tokio::select! {
            () = tokio::time::sleep_until(until.max(Instant::now() + MIN_SLEEP)) => {}
            () = wake.notified() => {}
        }
    }
}
