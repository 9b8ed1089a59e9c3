//! One circuit breaker per provider instance: after `failures` consecutive failed store
//! calls the store is not called for a pause (jittered, doubling after each failed
//! probe, capped at `maxBackoff`); then exactly one call goes through as a probe
//! (half-open) while every other request is refused at once; the probe's success closes
//! the circuit, its failure opens it again for the next, longer pause.
//!
//! * What counts as a failure: the store being down or broken,
//!   [`SecretError::is_outage`] (`unreachable`, `timeout`, `bad_reply`). Any other
//!   answer (`not_found`, `denied`, `empty`, `bad_id`) shows the store is up: it resets
//!   the count, like a success.
//! * Pauses: `backoff`, then 2x, 4x... up to `maxBackoff`, each shortened by a random
//!   0-25 % (so brokers and providers that failed together do not all probe at once).
//!   A success resets the pause to `backoff`.
//! * A probe whose request goes away (the connection closed) hands the probe on: the
//!   next request probes.
//! * Transitions are logged once each: a warning when the circuit opens, an info line
//!   when it closes; failed probes at debug.

use std::{
    sync::{Mutex, MutexGuard},
    time::Duration,
};

use rand::Rng as _;
use tokio::time::Instant;

use super::SecretError;
use crate::config::BreakerConfig;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    /// Calls go through; `failures` in a row so far.
    Closed { failures: u32 },
    /// No calls until `until`; `backoff` is the pause that was drawn from.
    Open { until: Instant, backoff: Duration },
    /// One probe call in flight; no other calls.
    HalfOpen { backoff: Duration },
}

/// A provider's breaker.
#[derive(Debug)]
pub struct Breaker {
    provider: String,
    cfg: BreakerConfig,
    phase: Mutex<Phase>,
}

/// Leave to call the store. Report how the call went with [`Permit::record`]; a probe
/// permit dropped without a report lets the next request probe.
#[derive(Debug)]
pub struct Permit<'a> {
    breaker: &'a Breaker,
    probe: bool,
    done: bool,
}

impl Breaker {
    #[must_use]
    pub fn new(provider: &str, cfg: BreakerConfig) -> Self {
        Self {
            provider: provider.to_owned(),
            cfg,
            phase: Mutex::new(Phase::Closed { failures: 0 }),
        }
    }

    fn lock(&self) -> MutexGuard<'_, Phase> {
        self.phase
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Whether a store call may start now.
    ///
    /// # Errors
    /// The circuit is open: how long until the next probe may go (zero when a probe is
    /// in flight).
    pub fn admit(&self) -> Result<Permit<'_>, Duration> {
        let mut phase = self.lock();
        let probe = match *phase {
            Phase::Closed { .. } => false,
            Phase::Open { until, backoff } => {
                let now = Instant::now();
                if now < until {
                    return Err(until - now);
                }
                *phase = Phase::HalfOpen { backoff };
                true
            }
            Phase::HalfOpen { .. } => return Err(Duration::ZERO),
        };
        Ok(Permit {
            breaker: self,
            probe,
            done: false,
        })
    }

    /// The circuit as `broker status` shows it: `closed`, `open` or `half-open`; the
    /// consecutive failures so far (closed) and how long until the next probe (open).
    #[must_use]
    pub fn state(&self) -> (&'static str, u32, Option<Duration>) {
        match *self.lock() {
            Phase::Closed { failures } => ("closed", failures, None),
            Phase::Open { until, .. } => (
                "open",
                self.cfg.failures,
                Some(until.saturating_duration_since(Instant::now())),
            ),
            Phase::HalfOpen { .. } => ("half-open", self.cfg.failures, None),
        }
    }

    /// Whether the circuit is closed (calls go through).
    #[must_use]
    pub fn is_closed(&self) -> bool {
        matches!(*self.lock(), Phase::Closed { .. })
    }

    fn on_result(&self, probe: bool, failed: bool) {
        let mut phase = self.lock();
        let was = *phase;
        *phase = match (was, failed) {
            (Phase::Closed { .. }, false) => Phase::Closed { failures: 0 },
            (Phase::Closed { failures }, true) => {
                let failures = failures.saturating_add(1);
                if failures < self.cfg.failures {
                    Phase::Closed { failures }
                } else {
                    let until = Instant::now() + jittered(self.cfg.backoff);
                    tracing::warn!(
                        provider = %self.provider,
                        failures,
                        retry_in_ms = millis(until - Instant::now()),
                        "secret store failing: circuit open, not calling it until a probe succeeds"
                    );
                    Phase::Open {
                        until,
                        backoff: self.cfg.backoff,
                    }
                }
            }
            // A success, from the probe or a call that started before the circuit
            // opened: the store answers.
            (Phase::Open { .. } | Phase::HalfOpen { .. }, false) => {
                tracing::info!(
                    provider = %self.provider,
                    "secret store answering again: circuit closed"
                );
                Phase::Closed { failures: 0 }
            }
            (Phase::HalfOpen { backoff }, true) if probe => {
                let backoff = (backoff * 2).min(self.cfg.max_backoff);
                let until = Instant::now() + jittered(backoff);
                tracing::debug!(
                    provider = %self.provider,
                    retry_in_ms = millis(until - Instant::now()),
                    "secret store probe failed: circuit stays open"
                );
                Phase::Open { until, backoff }
            }
            // A late failure of a call that started before the circuit opened.
            (open, true) => open,
        };
    }

    /// A probe that ended without a result: the next request may probe at once.
    fn on_abandoned(&self) {
        let mut phase = self.lock();
        if let Phase::HalfOpen { backoff } = *phase {
            *phase = Phase::Open {
                until: Instant::now(),
                backoff,
            };
        }
    }
}

impl Permit<'_> {
    /// Report the store call's outcome: a failure when it is an outage
    /// ([`SecretError::is_outage`]), otherwise proof that the store answers.
    pub fn record<T>(mut self, outcome: &Result<T, SecretError>) {
        self.done = true;
        let failed = outcome.as_ref().err().is_some_and(SecretError::is_outage);
        self.breaker.on_result(self.probe, failed);
    }
}

impl Drop for Permit<'_> {
    fn drop(&mut self) {
        if self.probe && !self.done {
            self.breaker.on_abandoned();
        }
    }
}

/// `backoff` shortened by a random 0-25 %.
fn jittered(backoff: Duration) -> Duration {
    let cut = rand::rng().random_range(0.0..0.25);
    backoff.mul_f64(1.0 - cut)
}

fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn unreachable() -> Result<(), SecretError> {
        Err(SecretError::Unreachable {
            provider: "p".into(),
            id: "x".into(),
            reason: "HTTP status 503".into(),
        })
    }

    fn not_found() -> Result<(), SecretError> {
        Err(SecretError::NotFound {
            provider: "p".into(),
            id: "x".into(),
        })
    }

    fn breaker() -> Breaker {
        Breaker::new(
            "p",
            BreakerConfig {
                failures: 3,
                backoff: Duration::from_secs(1),
                max_backoff: Duration::from_secs(4),
            },
        )
    }

    fn fail(b: &Breaker) {
        b.admit().expect("admitted").record(&unreachable());
    }

    /// Opens after `failures` consecutive outages; answers that are not outages reset
    /// the count.
    #[tokio::test(start_paused = true)]
    async fn opens_after_consecutive_outages_only() {
        let b = breaker();
        fail(&b);
        fail(&b);
        b.admit().unwrap().record(&not_found());
        fail(&b);
        fail(&b);
        assert!(b.is_closed(), "a not_found reset the count");
        b.admit().unwrap().record(&Ok::<(), SecretError>(()));
        fail(&b);
        fail(&b);
        assert!(b.is_closed());
        fail(&b);
        assert!(!b.is_closed());
        let retry = b.admit().unwrap_err();
        assert!(
            retry > Duration::from_millis(740) && retry <= Duration::from_secs(1),
            "{retry:?}"
        );
    }

    /// After the pause one probe goes through, the others are refused meanwhile; a
    /// failed probe doubles the pause (capped), a successful one closes the circuit.
    #[tokio::test(start_paused = true)]
    async fn one_probe_at_a_time_with_growing_capped_pauses() {
        let b = breaker();
        for _ in 0..3 {
            fail(&b);
        }
        let mut pauses = Vec::new();
        for _ in 0..4 {
            let wait = b.admit().unwrap_err();
            pauses.push(wait);
            tokio::time::sleep(wait).await;
            let probe = b.admit().expect("the probe");
            assert_eq!(
                b.admit().unwrap_err(),
                Duration::ZERO,
                "one probe at a time"
            );
            probe.record(&unreachable());
        }
        // 1 s, 2 s, 4 s, 4 s (cap), each cut by up to 25 %.
        for (p, full) in pauses.iter().zip([1.0, 2.0, 4.0, 4.0]) {
            let s = p.as_secs_f64();
            assert!(s > full * 0.74 && s <= full, "{pauses:?}");
        }
        let wait = b.admit().unwrap_err();
        tokio::time::sleep(wait).await;
        b.admit().unwrap().record(&Ok::<(), SecretError>(()));
        assert!(b.is_closed());
        // Back to the first pause after a recovery.
        for _ in 0..3 {
            fail(&b);
        }
        assert!(b.admit().unwrap_err() <= Duration::from_secs(1));
    }

    /// A probe dropped without a result lets the next request probe at once.
    #[tokio::test(start_paused = true)]
    async fn an_abandoned_probe_hands_over() {
        let b = breaker();
        for _ in 0..3 {
            fail(&b);
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
        drop(b.admit().expect("probe"));
        let probe = b.admit().expect("the next request probes");
        probe.record(&not_found());
        assert!(b.is_closed(), "any answer closes it");
    }
}
