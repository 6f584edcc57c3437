//! Capped exponential backoff with equal jitter: pure (the random draw is a parameter), so its
//! delays are tested without sleeping.

use std::time::Duration;

use tokio_util::sync::CancellationToken;

/// Delays between retries of a transient fault: the n-th delay is drawn from
/// [c/2, c] where c = min(`max_ms`, 50 ms · 2ⁿ) ("equal jitter": always at least half the
/// ceiling, so a retry storm cannot form, and never in lockstep with other consumers).
#[derive(Debug, Clone)]
pub struct Backoff {
    /// The next delay's ceiling.
    ceiling_ms: u64,
    /// The cap of every ceiling.
    max_ms: u64,
}

impl Backoff {
    /// The first delay's ceiling.
    pub const START_MS: u64 = 50;

    /// A backoff whose ceilings stop growing at `max_ms` (at least [`Backoff::START_MS`]).
    pub fn new(max_ms: u64) -> Self {
        Self {
            ceiling_ms: Self::START_MS,
            max_ms: max_ms.max(Self::START_MS),
        }
    }

    /// Starts over from the first delay (after a success).
    pub fn reset(&mut self) {
        self.ceiling_ms = Self::START_MS;
    }

    /// The next delay for a uniform random `fraction` in [0, 1], and moves the ceiling on.
    pub fn next_delay(&mut self, fraction: f64) -> Duration {
        let half = self.ceiling_ms / 2;
        let jitter = ((self.ceiling_ms - half) as f64 * fraction.clamp(0.0, 1.0)).round() as u64;
        self.ceiling_ms = self.ceiling_ms.saturating_mul(2).min(self.max_ms);
        Duration::from_millis(half + jitter)
    }

    /// Sleeps for the next delay; false if `stop` fired first.
    pub async fn wait(&mut self, stop: &CancellationToken) -> bool {
        let delay = self.next_delay(rand::random());
        tokio::select! {
            _ = tokio::time::sleep(delay) => true,
            _ = stop.cancelled() => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn delays_double_up_to_the_cap_with_equal_jitter() {
        let mut b = Backoff::new(1_000);
        let ceilings = [50, 100, 200, 400, 800, 1_000, 1_000];
        for c in ceilings {
            let low = b.clone().next_delay(0.0);
            let high = b.clone().next_delay(1.0);
            assert_eq!(low, Duration::from_millis(c / 2), "ceiling {c}");
            assert_eq!(high, Duration::from_millis(c), "ceiling {c}");
            let d = b.next_delay(0.5);
            assert!(low <= d && d <= high);
        }
        b.reset();
        assert_eq!(b.next_delay(1.0), Duration::from_millis(Backoff::START_MS));
    }

    #[test]
    fn a_cap_below_the_start_is_raised_and_fractions_are_clamped() {
        let mut b = Backoff::new(0);
        assert_eq!(b.next_delay(7.0), Duration::from_millis(50));
        assert_eq!(b.next_delay(-1.0), Duration::from_millis(25));
    }

    #[tokio::test]
    async fn wait_returns_false_once_stopped() {
        let stop = CancellationToken::new();
        stop.cancel();
        assert!(!Backoff::new(60_000).wait(&stop).await);
    }
}
