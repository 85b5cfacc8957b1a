//! A token bucket for a bandwidth limit, as a pure function of time: `reserve` says how long to wait
//! before sending so many bytes. A burst of up to one second's worth goes out at once.

use std::time::{Duration, Instant};

#[derive(Debug, Clone)]
pub struct RateLimiter {
    /// Bytes per second; 0 means no limit.
    rate: u64,
    /// Bytes that may go out now (negative: owed).
    tokens: f64,
    last: Instant,
}

impl RateLimiter {
    pub fn new(bytes_per_sec: u64, now: Instant) -> RateLimiter {
        RateLimiter { rate: bytes_per_sec, tokens: bytes_per_sec as f64, last: now }
    }

    pub fn set_rate(&mut self, bytes_per_sec: u64) {
        self.rate = bytes_per_sec;
        self.tokens = self.tokens.min(bytes_per_sec as f64);
    }

    /// Takes `bytes` from the bucket at `now`; returns how long the sender must wait first.
    pub fn reserve(&mut self, now: Instant, bytes: u64) -> Duration {
        if self.rate == 0 {
            return Duration::ZERO;
        }
        let elapsed = now.saturating_duration_since(self.last).as_secs_f64();
        self.last = now;
        self.tokens = (self.tokens + elapsed * self.rate as f64).min(self.rate as f64);
        self.tokens -= bytes as f64;
        if self.tokens >= 0.0 {
            Duration::ZERO
        } else {
            Duration::from_secs_f64(-self.tokens / self.rate as f64)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn holds_the_rate_over_time() {
        let t0 = Instant::now();
        let mut r = RateLimiter::new(1_000_000, t0);
        assert_eq!(r.reserve(t0, 1_000_000), Duration::ZERO, "one second's burst goes at once");
        assert_eq!(r.reserve(t0, 500_000), Duration::from_millis(500));
        // Half a second later the debt is paid; another 500 kB waits half a second more.
        let t1 = t0 + Duration::from_millis(500);
        assert_eq!(r.reserve(t1, 500_000), Duration::from_millis(500));
        // Sending 10 MB in 1 MB pieces, waiting as told, takes about 10 s of virtual time.
        let mut now = t1 + Duration::from_millis(500);
        let start = now;
        for _ in 0..10 {
            now += r.reserve(now, 1_000_000);
        }
        let took = now - start;
        assert!(took >= Duration::from_secs(9) && took <= Duration::from_secs(10), "{took:?}");
    }

    #[test]
    fn zero_is_unlimited() {
        let t0 = Instant::now();
        let mut r = RateLimiter::new(0, t0);
        assert_eq!(r.reserve(t0, u64::MAX / 2), Duration::ZERO);
    }
}
