//! Which failures are worth retrying, and when.
//!
//! Recoverable errors (network, a peer restarting, low disk or memory) retry after 1, 2, 4, 8 and 10
//! minutes, then every 30 minutes, each delay jittered by ±20% so a fleet never retries in step. The
//! whole schedule scales by one factor so tests run it in seconds. Non-recoverable errors
//! (authentication, authorisation, a broken replica chain, an unknown item) are not retried: they
//! need an operator, and the item turns Critical.

use std::time::{Duration, Instant};

/// Minutes of the first retries; then [`STEADY_MINUTES`] forever.
pub const SCHEDULE_MINUTES: [u64; 5] = [1, 2, 4, 8, 10];
pub const STEADY_MINUTES: u64 = 30;

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RetryPolicy {
    /// Multiplies every delay: 1.0 in production, for example 0.001 in tests.
    pub scale: f64,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        RetryPolicy { scale: 1.0 }
    }
}

impl RetryPolicy {
    /// The delay before retry number `attempt` (0-based), before jitter.
    pub fn nominal(&self, attempt: u32) -> Duration {
        let minutes = SCHEDULE_MINUTES.get(attempt as usize).copied().unwrap_or(STEADY_MINUTES);
        Duration::from_secs_f64(minutes as f64 * 60.0 * self.scale)
    }

    /// The delay with `jitter` in [0, 1) spread over 80%..120% of nominal.
    pub fn delay(&self, attempt: u32, jitter: f64) -> Duration {
        self.nominal(attempt).mul_f64(0.8 + 0.4 * jitter.clamp(0.0, 1.0))
    }
}

/// Quick reconnects ride out a peer's restart; after this many the schedule above takes over.
pub const QUICK_ATTEMPTS: u32 = 10;

/// The delay before reconnect attempt `attempt` (0-based) after a recoverable error: quick, jittered
/// back-off up to 5 s for the first [`QUICK_ATTEMPTS`] (about 30 s in all), then `policy`'s schedule.
pub fn reconnect_delay(attempt: u32, policy: &RetryPolicy, jitter: f64) -> Duration {
    if attempt < QUICK_ATTEMPTS {
        crate::backoff::RECONNECT.delay(attempt, jitter)
    } else {
        policy.delay(attempt - QUICK_ATTEMPTS, jitter)
    }
}

/// A session that lasted this long was healthy: its failure starts the quick reconnects afresh.
pub const STABLE_SESSION: Duration = Duration::from_secs(10);

/// The reconnect schedule of one long-lived link (a disk's shipping, a stream's forwarding).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Reconnects {
    attempt: u32,
}

impl Reconnects {
    /// A session that began at `started` ended at `now`: how long to wait before the next one.
    pub fn after_session(&mut self, started: Instant, now: Instant, policy: &RetryPolicy, jitter: f64) -> Duration {
        if now.saturating_duration_since(started) > STABLE_SESSION {
            self.attempt = 0;
        }
        let delay = reconnect_delay(self.attempt, policy, jitter);
        self.attempt = self.attempt.saturating_add(1);
        delay
    }

    /// Something changed (a new assignment): the next attempt is a quick one.
    pub fn reset(&mut self) {
        self.attempt = 0;
    }
}

/// A newly assigned item may be unknown to its process server for one of the server's polls of the
/// configuration server; "not assigned" in that time means "not yet".
pub const ASSIGNMENT_GRACE: Duration = Duration::from_secs(15);

/// Whether a link whose assignment is `assigned_for` old stops on this error and waits for an operator
/// (or a new assignment) instead of reconnecting: the code and the reason to show.
pub fn stop_on(class: ErrorClass, assigned_for: Duration) -> Option<(crate::wire::ErrorCode, String)> {
    match class {
        ErrorClass::Fatal { code: crate::wire::ErrorCode::NotAssigned, .. } if assigned_for < ASSIGNMENT_GRACE => None,
        ErrorClass::Fatal { code, reason } => Some((code, reason)),
        ErrorClass::Recoverable => None,
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ErrorClass {
    Recoverable,
    /// Retrying cannot help: what kind of failure, and the reason for the operator.
    Fatal {
        code: crate::wire::ErrorCode,
        reason: String,
    },
}

/// Sorts an error by the [`crate::wire::ErrorCode`] its cause chain carries (never by its text).
pub fn classify(err: &anyhow::Error) -> ErrorClass {
    let code = crate::wire::code_of(err);
    if code.fatal() {
        ErrorClass::Fatal { code, reason: format!("{}: {err:#}", code.describe()) }
    } else {
        ErrorClass::Recoverable
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn schedule_in_virtual_time() {
        let p = RetryPolicy::default();
        let minutes: Vec<u64> = (0..8).map(|a| p.nominal(a).as_secs() / 60).collect();
        assert_eq!(minutes, [1, 2, 4, 8, 10, 30, 30, 30]);
        // Summed as a clock would advance: the first hour of failures costs 25 minutes of waiting,
        // then one attempt per half hour.
        let total: Duration = (0..5).map(|a| p.nominal(a)).sum();
        assert_eq!(total, Duration::from_secs(25 * 60));
        let fast = RetryPolicy { scale: 0.001 };
        assert_eq!(fast.nominal(0), Duration::from_millis(60));
        assert_eq!(fast.nominal(99), Duration::from_millis(1800));
    }

    #[test]
    fn jitter_stays_within_a_fifth() {
        let p = RetryPolicy::default();
        assert_eq!(p.delay(0, 0.0), Duration::from_secs(48));
        assert_eq!(p.delay(0, 1.0), Duration::from_secs(72));
        assert_eq!(p.delay(0, 0.5), Duration::from_secs(60));
        assert_eq!(p.delay(3, 7.0), p.delay(3, 1.0), "jitter is clamped");
    }

    #[test]
    fn quick_reconnects_then_the_schedule() {
        let p = RetryPolicy::default();
        assert_eq!(reconnect_delay(0, &p, 0.5), Duration::from_millis(100));
        let quick: Duration = (0..QUICK_ATTEMPTS).map(|a| reconnect_delay(a, &p, 0.5)).sum();
        assert!(quick < Duration::from_secs(40), "{quick:?}");
        assert_eq!(reconnect_delay(QUICK_ATTEMPTS, &p, 0.5), Duration::from_secs(60));
        assert_eq!(reconnect_delay(QUICK_ATTEMPTS + 6, &p, 0.5), Duration::from_secs(1800));
    }

    #[test]
    fn reconnects_start_quick_again_after_a_healthy_session() {
        let p = RetryPolicy::default();
        let t0 = Instant::now();
        let mut r = Reconnects::default();
        let short = t0 + Duration::from_secs(1);
        let quick: Vec<Duration> = (0..QUICK_ATTEMPTS).map(|_| r.after_session(t0, short, &p, 0.5)).collect();
        assert_eq!(quick[0], reconnect_delay(0, &p, 0.5));
        assert_eq!(r.after_session(t0, short, &p, 0.5), Duration::from_secs(60), "then the schedule");
        let long = t0 + STABLE_SESSION + Duration::from_secs(1);
        assert_eq!(r.after_session(t0, long, &p, 0.5), quick[0], "a healthy session resets it");
        r.after_session(t0, short, &p, 0.5);
        r.reset();
        assert_eq!(r.after_session(t0, short, &p, 0.5), quick[0]);
    }

    #[test]
    fn a_fresh_assignment_is_given_time() {
        use crate::wire::ErrorCode;
        let not_assigned = || ErrorClass::Fatal { code: ErrorCode::NotAssigned, reason: "x".into() };
        assert_eq!(stop_on(not_assigned(), Duration::from_secs(3)), None);
        assert_eq!(stop_on(not_assigned(), ASSIGNMENT_GRACE).map(|s| s.0), Some(ErrorCode::NotAssigned));
        let broken = ErrorClass::Fatal { code: ErrorCode::ChainBroken, reason: "gap".into() };
        assert_eq!(stop_on(broken, Duration::ZERO).map(|s| s.0), Some(ErrorCode::ChainBroken));
        assert_eq!(stop_on(ErrorClass::Recoverable, Duration::from_secs(99)), None);
    }

    #[test]
    fn classification_by_code_never_by_text() {
        use crate::wire::{Coded, ErrorCode, WireError};
        // Text that once meant "fatal" is just text now.
        let worded = anyhow::anyhow!("the disk needs a resync; certificate Revoked; not assigned to");
        assert_eq!(classify(&worded), ErrorClass::Recoverable);
        let gap = anyhow::Error::new(Coded::new(ErrorCode::ChainBroken, "gap: expected seq 9")).context("shipping");
        assert!(matches!(classify(&gap), ErrorClass::Fatal { code: ErrorCode::ChainBroken, .. }));
        let peer = anyhow::Error::new(WireError::Peer { code: ErrorCode::NotAssigned, message: "x".into() });
        assert!(matches!(classify(&peer), ErrorClass::Fatal { code: ErrorCode::NotAssigned, .. }));
        let transient = anyhow::Error::new(WireError::Peer { code: ErrorCode::Transient, message: "x".into() });
        assert_eq!(classify(&transient), ErrorClass::Recoverable);
        // A QUIC connection closed with a certificate alert (0x100 + 44, certificate_revoked).
        let closed = quinn::ConnectionError::ConnectionClosed(quinn::ConnectionClose {
            error_code: quinn::TransportErrorCode::crypto(44),
            frame_type: None,
            reason: "invalid peer certificate".into(),
        });
        let revoked = anyhow::Error::new(closed).context("connecting");
        assert!(matches!(classify(&revoked), ErrorClass::Fatal { code: ErrorCode::CertificateRejected, .. }));
        let net = anyhow::anyhow!("timed out").context("connecting to process-server at 10.0.0.1:7443");
        assert_eq!(classify(&net), ErrorClass::Recoverable);
    }
}
