//! Exponential backoff with jitter, for retrying a backend that failed. The jitter
//! spreads a fleet's reconnections after an outage instead of having every device
//! retry in lock-step; `Retry-After` from the backend is honoured as a floor.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use crate::settings::RetryPolicy;

/// Longest `Retry-After` honoured: a backend asking for more is probably misconfigured,
/// and a device silent for days helps nobody.
const MAX_RETRY_AFTER: Duration = Duration::from_secs(3600);

/// The longest delay relais schedules before a retry, whether stored in the state
/// database or waited for: a stored retry time further ahead was set by a wrong clock
/// (see [`crate::clock::RetryClock`]).
pub fn longest_delay(policy: &RetryPolicy) -> Duration {
    policy
        .initial_backoff
        .max(policy.max_backoff)
        .max(policy.permanent_retry)
        .max(MAX_RETRY_AFTER)
}

#[derive(Debug)]
pub struct Backoff {
    initial: Duration,
    max: Duration,
    failures: u32,
    rng: u64,
}

impl Backoff {
    pub fn new(policy: &RetryPolicy) -> Backoff {
        let nanos = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.subsec_nanos())
            .unwrap_or(0);
        let seed = (u64::from(nanos) << 32) ^ u64::from(std::process::id()) ^ 0x9e37_79b9_7f4a_7c15;
        Backoff {
            initial: policy.initial_backoff,
            max: policy.max_backoff,
            failures: 0,
            rng: seed | 1,
        }
    }

    /// The backend answered: the next failure starts from the initial delay again.
    pub fn reset(&mut self) {
        self.failures = 0;
    }

    /// Records one more failure and returns how long to wait before trying again:
    /// `initial * 2^n` capped at `max`, the upper half of it chosen at random
    /// ("equal jitter"), and never less than the backend's `Retry-After`.
    pub fn next_delay(&mut self, retry_after: Option<Duration>) -> Duration {
        let exp = self
            .initial
            .saturating_mul(1u32 << self.failures.min(20))
            .min(self.max);
        self.failures = self.failures.saturating_add(1);
        let half = exp / 2;
        let jitter = Duration::from_secs_f64(half.as_secs_f64() * self.unit());
        let delay = half + jitter;
        match retry_after {
            Some(r) => delay.max(r.min(MAX_RETRY_AFTER)),
            None => delay,
        }
    }

    /// A pseudo-random number in [0, 1) (xorshift64*): jitter needs spread, not secrecy.
    fn unit(&mut self) -> f64 {
        self.rng ^= self.rng >> 12;
        self.rng ^= self.rng << 25;
        self.rng ^= self.rng >> 27;
        (self.rng.wrapping_mul(0x2545_f491_4f6c_dd1d) >> 11) as f64 / (1u64 << 53) as f64
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy() -> RetryPolicy {
        RetryPolicy {
            initial_backoff: Duration::from_secs(4),
            max_backoff: Duration::from_secs(60),
            permanent_retry: Duration::from_secs(3600),
        }
    }

    #[test]
    fn grows_within_bounds_and_resets() {
        let mut b = Backoff::new(&policy());
        let mut ceiling = Duration::from_secs(4);
        for _ in 0..10 {
            let d = b.next_delay(None);
            assert!(
                d >= ceiling / 2 && d <= ceiling,
                "{d:?} outside [{:?}, {ceiling:?}]",
                ceiling / 2
            );
            ceiling = (ceiling * 2).min(Duration::from_secs(60));
        }
        b.reset();
        assert!(b.next_delay(None) <= Duration::from_secs(4));
    }

    #[test]
    fn honours_retry_after() {
        let mut b = Backoff::new(&policy());
        assert!(b.next_delay(Some(Duration::from_secs(30))) >= Duration::from_secs(30));
        assert_eq!(
            b.next_delay(Some(Duration::from_secs(86_400)))
                .max(MAX_RETRY_AFTER),
            MAX_RETRY_AFTER
        );
    }

    #[test]
    fn jitter_spreads() {
        let delays: Vec<Duration> = (0..20)
            .map(|_| Backoff::new(&policy()).next_delay(None))
            .collect();
        let mut b = Backoff::new(&policy());
        let spread: Vec<Duration> = (0..20)
            .map(|_| {
                b.reset();
                b.next_delay(None)
            })
            .collect();
        assert!(
            spread.windows(2).any(|w| w[0] != w[1]),
            "no jitter: {spread:?} {delays:?}"
        );
    }
}
