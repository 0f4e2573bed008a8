//! When to try a failed task again: exponential backoff with full jitter.

use std::time::Duration;

use rand::Rng;

/// Retry policy: attempt `n` (1-based) that fails waits
/// `min(cap, base * factor^(n-1))`, scaled by a random factor in
/// `[1 - jitter, 1]`, before attempt `n + 1`; after `max_attempts` the task
/// is dead-lettered.
#[derive(Clone, Debug)]
pub struct RetryPolicy {
    pub max_attempts: u32,
    pub base: Duration,
    pub factor: f64,
    pub cap: Duration,
    /// 0.0 (none) to 1.0 ("full jitter"): spreads retries of many failing
    /// tasks so they do not hit a recovering dependency all at once.
    pub jitter: f64,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        RetryPolicy {
            max_attempts: 5,
            base: Duration::from_secs(1),
            factor: 2.0,
            cap: Duration::from_secs(600),
            jitter: 0.5,
        }
    }
}

impl RetryPolicy {
    /// No retries: the first failure dead-letters.
    pub fn none() -> Self {
        RetryPolicy {
            max_attempts: 1,
            ..Self::default()
        }
    }

    /// `max_attempts` attempts in all, starting at `base` and doubling.
    pub fn exponential(max_attempts: u32, base: Duration) -> Self {
        RetryPolicy {
            max_attempts: max_attempts.max(1),
            base,
            ..Self::default()
        }
    }

    pub fn factor(mut self, factor: f64) -> Self {
        self.factor = factor.max(1.0);
        self
    }

    pub fn cap(mut self, cap: Duration) -> Self {
        self.cap = cap;
        self
    }

    pub fn jitter(mut self, jitter: f64) -> Self {
        self.jitter = jitter.clamp(0.0, 1.0);
        self
    }

    /// The backoff before the attempt after `failed_attempt`, without jitter.
    pub fn nominal_delay(&self, failed_attempt: u32) -> Duration {
        let exp = failed_attempt.saturating_sub(1).min(63) as i32;
        let secs = self.base.as_secs_f64() * self.factor.powi(exp);
        Duration::from_secs_f64(secs.min(self.cap.as_secs_f64()))
    }

    /// The backoff with jitter applied.
    pub fn delay(&self, failed_attempt: u32) -> Duration {
        let nominal = self.nominal_delay(failed_attempt);
        if self.jitter == 0.0 {
            return nominal;
        }
        let scale = rand::rng().random_range((1.0 - self.jitter)..=1.0);
        nominal.mul_f64(scale)
    }

    /// Whether `attempt` (1-based) was the last one allowed.
    pub fn exhausted(&self, attempt: u32) -> bool {
        attempt >= self.max_attempts
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        /// Delays grow (never shrink) with the attempt, stay under the cap,
        /// and jitter only ever shortens them, never below `1 - jitter`.
        #[test]
        fn backoff_is_monotone_capped_and_jittered_down(
            base_ms in 1u64..5_000, factor in 1.0f64..4.0, cap_ms in 1u64..100_000,
            jitter in 0.0f64..1.0, attempt in 1u32..80,
        ) {
            let p = RetryPolicy::exponential(100, Duration::from_millis(base_ms))
                .factor(factor).cap(Duration::from_millis(cap_ms)).jitter(jitter);
            let now = p.nominal_delay(attempt);
            prop_assert!(p.nominal_delay(attempt + 1) >= now);
            prop_assert!(now <= Duration::from_millis(cap_ms));
            let d = p.delay(attempt);
            prop_assert!(d <= now);
            prop_assert!(d.as_secs_f64() >= now.as_secs_f64() * (1.0 - jitter) - 1e-6);
        }
    }

    #[test]
    fn attempts_are_counted_from_one() {
        let p = RetryPolicy::exponential(3, Duration::from_millis(100)).jitter(0.0);
        assert_eq!(p.delay(1), Duration::from_millis(100));
        assert_eq!(p.delay(2), Duration::from_millis(200));
        assert!(!p.exhausted(2));
        assert!(p.exhausted(3));
        assert!(RetryPolicy::none().exhausted(1));
    }
}
