//! When a failed attempt is tried again: exponential backoff with jitter, per kind.

use std::time::Duration;

/// How a kind's failed attempts are retried. The worker's settings (`MAX_ATTEMPTS`,
/// `RETRY_BASE`, `RETRY_MAX`) give every kind's default; a handler can have its own
/// ([`crate::Handler::retry_policy`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RetryPolicy {
    /// Attempts in all, the first included; after the last the task is dead.
    pub max_attempts: u32,
    /// The delay after the first failed attempt; it doubles after each further one.
    pub base: Duration,
    /// The longest delay between two attempts.
    pub max: Duration,
}

impl RetryPolicy {
    /// 20 attempts, 10 s after the first failure, doubling up to 2 h: about 21 hours from the
    /// first attempt to the last, in the spirit of Sidekiq's 25 retries over about 21 days
    /// but for work that is stale after a day.
    pub const DEFAULT: Self = Self {
        max_attempts: 20,
        base: Duration::from_secs(10),
        max: Duration::from_secs(2 * 60 * 60),
    };

    /// The delay before the next attempt after attempt `attempt` (1 for the first) failed:
    /// `base × 2^(attempt-1)`, capped at `max`, times a factor between 0.75 and 1.25 drawn
    /// from `jitter` (0 to 1), so tasks that failed together do not come back together; never
    /// over `max`.
    pub fn delay_after(&self, attempt: u32, jitter: f64) -> Duration {
        let doublings = attempt.saturating_sub(1).min(63);
        let exponential = self
            .base
            .checked_mul(1_u32.checked_shl(doublings.min(31)).unwrap_or(u32::MAX))
            .unwrap_or(self.max)
            .min(self.max);
        exponential
            .mul_f64(0.75 + 0.5 * jitter.clamp(0.0, 1.0))
            .min(self.max)
    }

    /// Whether attempt `attempt` (1 for the first) was the last one allowed.
    pub fn is_last(&self, attempt: u32) -> bool {
        attempt >= self.max_attempts
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const POLICY: RetryPolicy = RetryPolicy {
        max_attempts: 5,
        base: Duration::from_secs(10),
        max: Duration::from_secs(60),
    };

    #[test]
    fn delays_double_from_the_base_and_stop_at_the_max() {
        let middle = |attempt| POLICY.delay_after(attempt, 0.5);
        assert_eq!(middle(1), Duration::from_secs(10));
        assert_eq!(middle(2), Duration::from_secs(20));
        assert_eq!(middle(3), Duration::from_secs(40));
        assert_eq!(middle(4), Duration::from_secs(60));
        assert_eq!(middle(u32::MAX), Duration::from_secs(60));
    }

    #[test]
    fn jitter_spreads_a_quarter_either_way_and_never_past_the_max() {
        assert_eq!(POLICY.delay_after(1, 0.0), Duration::from_millis(7_500));
        assert_eq!(POLICY.delay_after(1, 1.0), Duration::from_millis(12_500));
        assert_eq!(POLICY.delay_after(3, 1.0), Duration::from_secs(50));
        assert_eq!(POLICY.delay_after(4, 1.0), Duration::from_secs(60));
    }

    #[test]
    fn the_default_spreads_its_attempts_over_about_a_day() {
        let total: Duration = (1..RetryPolicy::DEFAULT.max_attempts)
            .map(|attempt| RetryPolicy::DEFAULT.delay_after(attempt, 0.5))
            .sum();
        let hours = total.as_secs_f64() / 3600.0;
        assert!((18.0..24.0).contains(&hours), "{hours} h");
    }

    #[test]
    fn the_last_attempt_is_the_max() {
        assert!(!POLICY.is_last(4));
        assert!(POLICY.is_last(5));
    }
}
