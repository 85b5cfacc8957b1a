//! Reconnect back-off: a pure function of the attempt number and a jitter draw, so it is tested
//! without clocks and a fleet of agents does not reconnect in step.

use std::time::Duration;

#[derive(Debug, Clone, Copy)]
pub struct Backoff {
    pub base: Duration,
    pub max: Duration,
}

pub const RECONNECT: Backoff = Backoff { base: Duration::from_millis(100), max: Duration::from_secs(5) };

impl Backoff {
    /// Delay before attempt `attempt` (0-based), scaled by `jitter` in [0, 1) to 80%..120% of nominal.
    pub fn delay(&self, attempt: u32, jitter: f64) -> Duration {
        let nominal = self.base.saturating_mul(1u32 << attempt.min(20)).min(self.max);
        nominal.mul_f64(0.8 + 0.4 * jitter.clamp(0.0, 1.0))
    }

    /// [`Backoff::delay`] with a random jitter.
    pub fn delay_random(&self, attempt: u32) -> Duration {
        self.delay(attempt, rand::random::<f64>())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn doubles_then_caps_with_bounded_jitter() {
        let b = RECONNECT;
        assert_eq!(b.delay(0, 0.5), Duration::from_millis(100));
        assert_eq!(b.delay(3, 0.5), Duration::from_millis(800));
        assert_eq!(b.delay(30, 0.5), Duration::from_secs(5));
        assert_eq!(b.delay(30, 0.0), Duration::from_secs(4));
        assert_eq!(b.delay(30, 1.0), Duration::from_secs(6));
    }
}
