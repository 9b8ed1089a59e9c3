//! The credential cache: groups of values, each group the ids one service needs from one
//! provider, fetched together by one store call ([`super::SecretProvider::get_many`])
//! and kept together: the values of a group always come from the same call and expire
//! together (a Vault lease's username and password are never mixed with another
//! lease's).
//!
//! * Key: the provider instance, the group's ids (sorted, without duplicates) and the
//!   policy in force (TTL, stale window): services that need the same ids from the same
//!   provider under the same policy share the entry.
//! * Lifetime: `ttl` or the provider's own expiry, whichever comes first. With a stale
//!   window (`staleFor` > 0) the values are kept that much longer, never past the
//!   provider's expiry, for use only while the store is failing.
//! * Single-flight: requests for a group that is not cached join the fetch already in
//!   flight for it, so N concurrent connections cause one store call. A `fresh` request
//!   (the upstream rejected the cached values) starts a new fetch, which concurrent
//!   `fresh` requests join in turn, and the rejected values are never served stale. The
//!   fetch runs in a waiting request's task; if that request goes away, another waiter
//!   carries on with its own fetch.
//! * A failed fetch is returned to everyone waiting for it and not cached: the next
//!   request tries again. When the failure is an outage ([`SecretError::is_outage`]) and
//!   the group's stale window has not run out, the last values are served instead.
//! * Stale serving is logged once per transition and group: a warning when it starts,
//!   a warning when the window runs out and requests are refused, an info line when the
//!   store answers again.
//! * Entries are removed (and their values zeroized) by [`sweep`] when they expire (at
//!   the end of the stale window, if any), not when next read.
//! * With a TTL of zero nothing is reused; concurrent requests still share a fetch (and
//!   a stale window still keeps the last values for outages).

use std::{
    collections::HashMap,
    sync::{Arc, Mutex, MutexGuard, Weak},
    time::Duration,
};

use tokio::{
    sync::{Notify, OnceCell},
    time::Instant,
};

use super::{SecretError, redact_id};
use crate::secret::Secret;

/// How long values of a group are reused, and kept for outages after that.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Policy {
    pub ttl: Duration,
    pub stale_for: Duration,
}

/// One group: a provider instance, the ids one store call fetches, the policy.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct GroupKey {
    pub provider: String,
    /// Sorted, without duplicates.
    pub ids: Vec<String>,
    pub policy: Policy,
}

impl GroupKey {
    /// The ids as they may be printed (each through [`redact_id`]), comma-separated.
    #[must_use]
    pub fn shown_ids(&self) -> String {
        self.ids
            .iter()
            .map(|id| redact_id(id))
            .collect::<Vec<_>>()
            .join(",")
    }
}

/// What one store call produced: a value per id (in the key's order) and the
/// provider's expiry, if any.
pub type Outcome = Result<(Vec<Secret>, Option<Instant>), SecretError>;

/// Where a request's values came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum How {
    /// From the cache, within the TTL.
    Hit,
    /// This request called the store.
    Miss,
    /// Another request's store call, in flight when this one came.
    Joined,
    /// From the cache past the TTL: the store failed and the stale window allowed it.
    Stale,
}

impl How {
    /// The word for logs (`cache=` of the audit event).
    #[must_use]
    pub fn word(self) -> &'static str {
        match self {
            Self::Hit => "hit",
            Self::Miss => "miss",
            Self::Joined => "joined",
            Self::Stale => "stale",
        }
    }
}

/// The answer to one request.
#[derive(Debug)]
pub struct Lookup {
    pub how: How,
    /// A value per id of the key, or why there is none.
    pub result: Result<Vec<Secret>, SecretError>,
    /// For [`How::Stale`]: how long past its TTL the value is.
    pub stale_age: Option<Duration>,
}

/// One cached group as `broker status` shows it (no value).
#[derive(Debug, Clone)]
pub struct EntryState {
    pub provider: String,
    /// The group's ids, each through [`redact_id`].
    pub ids: Vec<String>,
    /// Since the values were fetched.
    pub age: Duration,
    /// Until they are no longer reused (zero: past the TTL).
    pub fresh_for: Duration,
    /// Until they are dropped (the end of the stale window, if any).
    pub kept_for: Duration,
    /// `fresh` (reused), `stale` (past the TTL, served while the store fails),
    /// `expired` (past the TTL, kept for a stale window), `rejected` (the upstream
    /// refused them; never served again).
    pub state: &'static str,
}

struct Entry {
    values: Vec<Secret>,
    /// When the values were fetched.
    stored_at: Instant,
    /// Reused until then (TTL, provider expiry).
    fresh_until: Instant,
    /// Kept until then, for outages (= `fresh_until` without a stale window).
    keep_until: Instant,
    /// The upstream rejected these values (a `fresh` request came): never served stale.
    rejected: bool,
}

/// A fetch in flight: every request for the key waits on the same cell.
struct Flight {
    cell: Arc<OnceCell<Outcome>>,
    /// Started by a `fresh` request (joined by later `fresh` requests too).
    fresh: bool,
}

/// Where a group stands in its stale window, for logging transitions once.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum StalePhase {
    /// The store is failing and the last values are served.
    Serving,
    /// The store is still failing and the window has run out: requests are refused.
    Exhausted,
}

#[derive(Default)]
struct State {
    entries: HashMap<GroupKey, Entry>,
    flights: HashMap<GroupKey, Flight>,
    /// Groups whose store is failing while they have a stale window.
    stale: HashMap<GroupKey, StalePhase>,
    /// When the sweeper will next run (None: it waits for a wake-up).
    next_sweep: Option<Instant>,
}

pub struct Cache {
    state: Mutex<State>,
    /// Wakes the sweeper when an entry expires before its next run, or the cache goes.
    wake: Arc<Notify>,
}

impl Default for Cache {
    fn default() -> Self {
        Self::new()
    }
}

impl Drop for Cache {
    fn drop(&mut self) {
        // The sweeper then finds the cache gone and ends.
        self.wake.notify_one();
    }
}

/// `t + d`, or far in the future when that cannot be represented.
fn later(t: Instant, d: Duration) -> Instant {
    t.checked_add(d)
        .unwrap_or_else(|| t + Duration::from_secs(30 * 365 * 86_400))
}

impl Cache {
    #[must_use]
    pub fn new() -> Self {
        Self {
            state: Mutex::new(State::default()),
            wake: Arc::new(Notify::new()),
        }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// The values of `key`: cached, from a fetch in flight, or from `fetch` (called at
    /// most once, and only if this request ends up doing the fetch); stale when the
    /// fetch failed with an outage and the key's stale window allows it.
    pub async fn get<F, Fut>(&self, key: &GroupKey, fresh: bool, fetch: F) -> Lookup
    where
        F: FnOnce() -> Fut,
        Fut: Future<Output = Outcome>,
    {
        let cell = {
            let mut st = self.lock();
            if let Some(e) = st.entries.get_mut(key) {
                if fresh {
                    e.rejected = true;
                } else if Instant::now() < e.fresh_until {
                    return Lookup {
                        how: How::Hit,
                        result: Ok(e.values.clone()),
                        stale_age: None,
                    };
                }
            }
            match st.flights.get(key) {
                // A fresh fetch in flight serves anyone; a normal one only non-fresh
                // requests (it may have started before the values were rejected).
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
        let mut ran = false;
        let outcome = cell
            .get_or_init(|| {
                ran = true;
                fetch()
            })
            .await
            .clone();
        let how = if ran { How::Miss } else { How::Joined };
        // The first waiter back ends the flight and caches a success; a flight that a
        // fresh one replaced caches nothing.
        let mut st = self.lock();
        if st
            .flights
            .get(key)
            .is_some_and(|f| Arc::ptr_eq(&f.cell, &cell))
        {
            st.flights.remove(key);
            if let Ok((values, provider_expiry)) = &outcome {
                self.store(&mut st, key, values, *provider_expiry);
            }
        }
        match outcome {
            Ok((values, _)) => {
                if st.stale.remove(key).is_some() {
                    tracing::info!(
                        provider = %key.provider,
                        ids = %key.shown_ids(),
                        "secret store answering again: fresh values"
                    );
                }
                Lookup {
                    how,
                    result: Ok(values),
                    stale_age: None,
                }
            }
            Err(e) => {
                if !fresh && !key.policy.stale_for.is_zero() && e.is_outage() {
                    return Self::stale(&mut st, key, how, e);
                }
                Lookup {
                    how,
                    result: Err(e),
                    stale_age: None,
                }
            }
        }
    }

    /// After an outage: the kept values while the stale window lasts, else the error.
    /// Each change of phase is logged once.
    fn stale(st: &mut State, key: &GroupKey, how: How, e: SecretError) -> Lookup {
        let now = Instant::now();
        let kept = st
            .entries
            .get(key)
            .filter(|en| !en.rejected && now < en.keep_until);
        if let Some(en) = kept {
            if now < en.fresh_until {
                // Stored by a concurrent fetch meanwhile.
                return Lookup {
                    how: How::Hit,
                    result: Ok(en.values.clone()),
                    stale_age: None,
                };
            }
            let age = now - en.fresh_until;
            let left = en.keep_until - now;
            let values = en.values.clone();
            if st.stale.insert(key.clone(), StalePhase::Serving) != Some(StalePhase::Serving) {
                tracing::warn!(
                    provider = %key.provider,
                    ids = %key.shown_ids(),
                    error = %e,
                    stale_for_ms = millis(key.policy.stale_for),
                    left_ms = millis(left),
                    "secret store failing: serving the last values (stale) until it answers \
                     or the stale window ends"
                );
            }
            return Lookup {
                how: How::Stale,
                result: Ok(values),
                stale_age: Some(age),
            };
        }
        if st.stale.get(key) == Some(&StalePhase::Serving) {
            st.stale.insert(key.clone(), StalePhase::Exhausted);
            tracing::warn!(
                provider = %key.provider,
                ids = %key.shown_ids(),
                error = %e,
                stale_for_ms = millis(key.policy.stale_for),
                "secret store still failing and the stale window is over: refusing connections"
            );
        }
        Lookup {
            how,
            result: Err(e),
            stale_age: None,
        }
    }

    fn store(
        &self,
        st: &mut State,
        key: &GroupKey,
        values: &[Secret],
        provider_expiry: Option<Instant>,
    ) {
        let now = Instant::now();
        let cap = |t: Instant| provider_expiry.map_or(t, |p| t.min(p));
        let fresh_until = cap(later(now, key.policy.ttl));
        // Never kept past the provider's expiry: the store said the value ends there.
        let keep_until = cap(later(fresh_until, key.policy.stale_for));
        if keep_until <= now {
            // Nothing to keep; what was kept is replaced by nothing (zeroized).
            st.entries.remove(key);
            return;
        }
        st.entries.insert(
            key.clone(),
            Entry {
                values: values.to_vec(),
                stored_at: now,
                fresh_until,
                keep_until,
                rejected: false,
            },
        );
        if st.next_sweep.is_none_or(|at| keep_until < at) {
            st.next_sweep = Some(keep_until);
            self.wake.notify_one();
        }
    }

    /// Remove the entries past their keep time (their values are zeroized on drop).
    /// Returns when the next entry goes, if any.
    pub fn sweep_expired(&self) -> Option<Instant> {
        let now = Instant::now();
        let mut st = self.lock();
        st.entries.retain(|_, e| e.keep_until > now);
        let next = st.entries.values().map(|e| e.keep_until).min();
        st.next_sweep = next;
        next
    }

    /// Every group in the cache, as `broker status` shows it: names and times, never
    /// a value. Sorted by provider, then ids.
    #[must_use]
    pub fn snapshot(&self) -> Vec<EntryState> {
        let now = Instant::now();
        let st = self.lock();
        let mut out: Vec<EntryState> = st
            .entries
            .iter()
            .map(|(k, e)| EntryState {
                provider: k.provider.clone(),
                ids: k.ids.iter().map(|id| redact_id(id).into_owned()).collect(),
                age: now.saturating_duration_since(e.stored_at),
                fresh_for: e.fresh_until.saturating_duration_since(now),
                kept_for: e.keep_until.saturating_duration_since(now),
                state: if e.rejected {
                    "rejected"
                } else if now < e.fresh_until {
                    "fresh"
                } else if st.stale.get(k) == Some(&StalePhase::Serving) {
                    "stale"
                } else {
                    "expired"
                },
            })
            .collect();
        out.sort_by(|a, b| (&a.provider, &a.ids).cmp(&(&b.provider, &b.ids)));
        out
    }

    /// Groups in the cache (expired or not yet swept).
    #[must_use]
    pub fn len(&self) -> usize {
        self.lock().entries.len()
    }

    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

/// Evict expired credentials on time, for as long as the cache exists: sleeps until the
/// next entry goes (woken early when a new entry goes sooner, or when the cache is
/// dropped), at most [`IDLE_SWEEP`].
pub async fn sweep(cache: Weak<Cache>) {
    /// Floor between two timed sweeps, so a burst of entries expiring together costs
    /// one pass.
    const MIN_SLEEP: Duration = Duration::from_millis(50);
    loop {
        let (next, wake) = {
            let Some(c) = cache.upgrade() else { return };
            (c.sweep_expired(), Arc::clone(&c.wake))
        };
        let until = next.unwrap_or_else(|| Instant::now() + IDLE_SWEEP);
        tokio::select! {
            () = tokio::time::sleep_until(until.max(Instant::now() + MIN_SLEEP)) => {}
            () = wake.notified() => {}
        }
    }
}

/// Longest sleep of the sweeper.
pub const IDLE_SWEEP: Duration = Duration::from_secs(60);
