//! [`LogLimiter`]: at most N log lines of one kind per window, the rest counted.
//!
//! Any local user can connect to the transparent listener directly (each such
//! connection is refused and logged) or flood a `listenOn` port past its cap: unlimited,
//! that is one log line per connection, thousands per second, drowning the access log
//! and the disk. The limiter lets the first lines of each window through and counts the
//! rest; the count is reported once, by the next line let through or by the periodic
//! [`LogLimiter::take_summary`] (`app.rs` calls it every second).

use std::{
    sync::Mutex,
    time::{Duration, Instant},
};

#[derive(Debug)]
struct State {
    window_start: Instant,
    in_window: u32,
    /// Suppressed since the count was last reported.
    suppressed: u64,
}

/// A log rate limiter (see the module docs). Cheap: one uncontended mutex per call.
#[derive(Debug)]
pub struct LogLimiter {
    /// What is being limited, for the summary line ("refusals", "cap refusals").
    pub what: &'static str,
    per_window: u32,
    window: Duration,
    state: Mutex<State>,
}

impl LogLimiter {
    /// At most `per_window` lines per `window`.
    #[must_use]
    pub fn new(what: &'static str, per_window: u32, window: Duration) -> Self {
        Self {
            what,
            per_window,
            window,
            state: Mutex::new(State {
                window_start: Instant::now(),
                in_window: 0,
                suppressed: 0,
            }),
        }
    }

    /// May this line be logged? `Some(k)`: yes, and `k` lines were suppressed before it
    /// and not reported yet (log `k` with it when non-zero); `None`: no (counted).
    pub fn check(&self) -> Option<u64> {
        self.check_at(Instant::now())
    }

    fn check_at(&self, now: Instant) -> Option<u64> {
        let mut s = self
            .state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if now.saturating_duration_since(s.window_start) >= self.window {
            s.window_start = now;
            s.in_window = 0;
        }
        if s.in_window < self.per_window {
            s.in_window += 1;
            Some(std::mem::take(&mut s.suppressed))
        } else {
            s.suppressed += 1;
            None
        }
    }

    /// Lines suppressed and not reported yet (resets the count): for a periodic
    /// "suppressed K ... in the last second" line.
    pub fn take_summary(&self) -> u64 {
        let mut s = self
            .state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        std::mem::take(&mut s.suppressed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lets_n_per_window_through_and_counts_the_rest() {
        let l = LogLimiter::new("refusals", 3, Duration::from_secs(1));
        let t0 = Instant::now();
        let got: Vec<_> = (0..10).map(|_| l.check_at(t0)).collect();
        assert_eq!(&got[..3], &[Some(0), Some(0), Some(0)]);
        assert!(got[3..].iter().all(Option::is_none));
        // Next window: the first line carries the 7 suppressed before it, once.
        let t1 = t0 + Duration::from_millis(1000);
        assert_eq!(l.check_at(t1), Some(7));
        assert_eq!(l.check_at(t1), Some(0));
        assert_eq!(l.take_summary(), 0);
    }

    #[test]
    fn summary_takes_the_count_once() {
        let l = LogLimiter::new("refusals", 1, Duration::from_secs(1));
        let t0 = Instant::now();
        assert_eq!(l.check_at(t0), Some(0));
        for _ in 0..5 {
            assert_eq!(l.check_at(t0), None);
        }
        assert_eq!(l.take_summary(), 5);
        assert_eq!(l.take_summary(), 0);
        assert_eq!(l.check_at(t0 + Duration::from_secs(2)), Some(0));
    }

    #[test]
    fn bounded_under_a_flood() {
        let l = LogLimiter::new("refusals", 10, Duration::from_secs(1));
        let t0 = Instant::now();
        // 100 000 attempts spread over 2.5 s of simulated time: 3 windows, 30 lines.
        let allowed = (0..100_000u64)
            .filter(|i| l.check_at(t0 + Duration::from_micros(i * 25)).is_some())
            .count();
        assert_eq!(allowed, 30);
    }
}
