//! Congestion control for replication across a WAN: a window sized from the measured delivery rate
//! and the path's minimum round trip (the model of BBR), not from losses.
//!
//! A WAN drops packets that no queue overflowed for (radio, a noisy line, a policer elsewhere). A
//! loss-based controller (New Reno, Cubic) halves its window at each: at 1% loss over 50 ms it
//! carries a few Mbit/s whatever the link's capacity. quinn's own BBR sizes its window at twice the
//! bandwidth-delay product and quinn paces at 1.25 windows per round trip, so it keeps the
//! bottleneck's queue full and loses a quarter of its packets to it. This controller:
//!
//! ```text
//! every round (one minimum RTT, at least 5 ms): rate = bytes acknowledged in it / its length
//! best = max(rate over the last 10 rounds)      (app-limited rounds count only when they raise it)
//! bdp  = best * max(min_rtt, 5 ms)        (min_rtt: the least round trip of the last 10 s)
//! startup: window = 2 * bdp (doubling each round) until best stops growing by a quarter for 3
//!          rounds
//! cruise:  window = gain * bdp, gain cycling 1.75, 1, then 1.5 for six rounds (probe, drain, cruise)
//! loss:    ignored, unless quinn reports persistent congestion (everything lost for a while): then
//!          back to the initial window and startup
//! ```
//!
//! Pure: time comes in as arguments; tested below against a simulated bottleneck.

use quinn::congestion::{Controller, ControllerFactory};
use std::any::Any;
use std::collections::VecDeque;
use std::sync::Arc;
use std::time::{Duration, Instant};

const ROUNDS_KEPT: usize = 10;
const CYCLE: [f64; 8] = [1.75, 1.0, 1.5, 1.5, 1.5, 1.5, 1.5, 1.5];
const STARTUP_GROWTH: f64 = 1.25;
/// In startup the window is twice what the last rounds delivered: it doubles each round until the
/// rate stops following, with at most one bandwidth-delay product queued at the bottleneck.
const STARTUP_GAIN: f64 = 2.0;
const STARTUP_STALLS: u8 = 3;
/// Acknowledgements arrive in bursts (delayed ACKs, reads batched by the receiver): on paths shorter
/// than this the window covers this long at the measured rate, and rounds last at least this long.
const MIN_ROUND: Duration = Duration::from_millis(5);
/// The minimum round trip is the least sample of this long: a path that became longer (a new route)
/// is believed within this time, instead of sizing the window from a round trip that is gone.
const RTT_WINDOW: Duration = Duration::from_secs(10);

/// Builds [`RateControl`] for each connection.
#[derive(Debug, Clone)]
pub struct RateConfig {
    /// Bytes that may be in flight before anything is measured.
    pub initial_window: u64,
}

impl Default for RateConfig {
    fn default() -> Self {
        RateConfig { initial_window: 14_720 }
    }
}

impl ControllerFactory for RateConfig {
    fn build(self: Arc<Self>, _now: Instant, current_mtu: u16) -> Box<dyn Controller> {
        Box::new(RateControl::new(self.initial_window, current_mtu))
    }
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum Phase {
    Startup { stalls: u8, last_best: u64 },
    Cruise { round: usize },
}

#[derive(Debug, Clone)]
pub struct RateControl {
    mtu: u64,
    initial: u64,
    window: u64,
    /// Bytes acknowledged since the connection began.
    delivered: u64,
    /// When the current round began, and `delivered` then.
    round: Option<(Instant, u64)>,
    /// Delivery rate (bytes per second) of the last rounds.
    rates: VecDeque<u64>,
    min_rtt: Duration,
    /// When `min_rtt` was sampled.
    min_rtt_at: Option<Instant>,
    phase: Phase,
}

impl RateControl {
    pub fn new(initial: u64, mtu: u16) -> RateControl {
        RateControl {
            mtu: mtu as u64,
            initial,
            window: initial,
            delivered: 0,
            round: None,
            rates: VecDeque::new(),
            min_rtt: Duration::ZERO,
            min_rtt_at: None,
            phase: Phase::Startup { stalls: 0, last_best: 0 },
        }
    }

    fn best(&self) -> u64 {
        self.rates.iter().copied().max().unwrap_or(0)
    }

    fn bdp(&self) -> u64 {
        (self.best() as f64 * self.min_rtt.max(MIN_ROUND).as_secs_f64()) as u64
    }

    fn floor(&self) -> u64 {
        4 * self.mtu
    }

    /// Takes a measured round: its delivery rate, then the phase and window that follow.
    fn end_round(&mut self, rate: u64, app_limited: bool) {
        if !app_limited || rate > self.best() {
            self.rates.push_back(rate);
            if self.rates.len() > ROUNDS_KEPT {
                self.rates.pop_front();
            }
        }
        let best = self.best();
        self.phase = match self.phase {
            Phase::Startup { stalls, last_best } => {
                if best as f64 >= last_best as f64 * STARTUP_GROWTH {
                    Phase::Startup { stalls: 0, last_best: best }
                } else if app_limited {
                    Phase::Startup { stalls, last_best }
                } else if stalls + 1 >= STARTUP_STALLS {
                    Phase::Cruise { round: 1 }
                } else {
                    Phase::Startup { stalls: stalls + 1, last_best }
                }
            }
            Phase::Cruise { round } => Phase::Cruise { round: (round + 1) % CYCLE.len() },
        };
        let gain = match self.phase {
            Phase::Startup { .. } => STARTUP_GAIN,
            Phase::Cruise { round } => CYCLE[round],
        };
        self.window = ((gain * self.bdp() as f64) as u64).max(self.floor()).max(match self.phase {
            Phase::Startup { .. } => self.initial,
            Phase::Cruise { .. } => 0,
        });
    }

    /// `bytes` were acknowledged at `now`, `rtt` after they were sent.
    pub fn acked(&mut self, bytes: u64, rtt: Duration, now: Instant) {
        self.delivered += bytes;
        let expired = self.min_rtt_at.is_none_or(|at| now.saturating_duration_since(at) >= RTT_WINDOW);
        if expired || rtt <= self.min_rtt {
            (self.min_rtt, self.min_rtt_at) = (rtt, Some(now));
        }
    }

    /// A batch of acknowledgements ended at `now`: a round that lasted a minimum round trip is measured.
    pub fn acks_ended(&mut self, now: Instant, app_limited: bool) {
        let (start, at_start) = *self.round.get_or_insert((now, self.delivered));
        let length = now.saturating_duration_since(start);
        if length < self.min_rtt.max(MIN_ROUND) {
            return;
        }
        let rate = ((self.delivered - at_start) as f64 / length.as_secs_f64()) as u64;
        self.round = Some((now, self.delivered));
        self.end_round(rate, app_limited);
    }

    /// Packets were lost; `persistent`: all of them for longer than the persistent-congestion period.
    pub fn lost(&mut self, persistent: bool) {
        if persistent {
            self.window = self.initial.max(self.floor());
            self.rates.clear();
            self.round = None;
            self.phase = Phase::Startup { stalls: 0, last_best: 0 };
        }
    }
}

impl Controller for RateControl {
    fn on_ack(
        &mut self,
        now: Instant,
        sent: Instant,
        bytes: u64,
        _app_limited: bool,
        _rtt: &quinn_proto::RttEstimator,
    ) {
        self.acked(bytes, now.saturating_duration_since(sent), now);
    }

    fn on_end_acks(&mut self, now: Instant, _in_flight: u64, app_limited: bool, _largest: Option<u64>) {
        self.acks_ended(now, app_limited);
    }

    fn on_congestion_event(&mut self, _now: Instant, _sent: Instant, persistent: bool, _lost_bytes: u64) {
        self.lost(persistent);
    }

    fn on_mtu_update(&mut self, new_mtu: u16) {
        self.mtu = new_mtu as u64;
        self.window = self.window.max(self.floor());
    }

    fn window(&self) -> u64 {
        self.window
    }

    fn clone_box(&self) -> Box<dyn Controller> {
        Box::new(self.clone())
    }

    fn initial_window(&self) -> u64 {
        self.initial
    }

    fn into_any(self: Box<Self>) -> Box<dyn Any> {
        self
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A bottleneck of `rate` bytes/s with a `queue` of that many seconds, `rtt` of propagation and
    /// random `loss`, fed by a sender that keeps `window` in flight paced at 1.25 windows per round
    /// trip (as quinn does). Runs `secs` in 100 us steps; the share of the capacity delivered in the
    /// last half, and the share of sent packets the queue dropped.
    fn simulate(rate: f64, rtt: Duration, loss: f64, queue: f64, secs: f64) -> (f64, f64) {
        use rand::{Rng, SeedableRng};
        let mut rng = rand::rngs::StdRng::seed_from_u64(1);
        let pkt = 1200u64;
        let t0 = Instant::now();
        let mut cc = RateControl::new(14_720, 1200);
        let step = Duration::from_micros(100);
        // Packets in the queue (departure time) and on their way back as acks (arrival time, sent).
        let mut queue_free_at = 0.0f64;
        let mut acks: VecDeque<(f64, f64)> = VecDeque::new();
        let (mut in_flight, mut sent, mut dropped, mut delivered_late, mut credit) = (0u64, 0u64, 0u64, 0u64, 0f64);
        let mut smoothed = 0.0f64;
        let mut now = 0.0;
        while now < secs {
            let at = t0 + Duration::from_secs_f64(now);
            while acks.front().is_some_and(|a| a.0 <= now) {
                let (_, sent_at) = acks.pop_front().unwrap();
                in_flight -= pkt;
                smoothed = if smoothed == 0.0 { now - sent_at } else { 0.875 * smoothed + 0.125 * (now - sent_at) };
                cc.acked(pkt, Duration::from_secs_f64(now - sent_at), at);
                if now > secs / 2.0 {
                    delivered_late += pkt;
                }
            }
            cc.acks_ended(at, false);
            let srtt = smoothed.max(rtt.as_secs_f64());
            credit = (credit + 1.25 * cc.window() as f64 / srtt * step.as_secs_f64()).min(cc.window() as f64);
            while in_flight + pkt <= cc.window() && credit >= pkt as f64 {
                credit -= pkt as f64;
                sent += 1;
                in_flight += pkt;
                let start = queue_free_at.max(now);
                if start - now > queue {
                    dropped += 1;
                    cc.lost(false);
                    in_flight -= pkt;
                    continue;
                }
                queue_free_at = start + pkt as f64 / rate;
                if rng.gen::<f64>() < loss {
                    cc.lost(false);
                    in_flight -= pkt;
                    continue;
                }
                acks.push_back((queue_free_at + rtt.as_secs_f64(), now));
            }
            now += step.as_secs_f64();
        }
        (delivered_late as f64 / (rate * secs / 2.0), dropped as f64 / sent as f64)
    }

    #[test]
    fn fills_a_lossy_long_link_without_flooding_its_queue() {
        let mib = 1024.0 * 1024.0;
        for (rtt_ms, loss) in [(50, 0.0), (50, 0.01), (100, 0.01), (10, 0.001), (1, 0.0)] {
            let (used, dropped) = simulate(24.0 * mib, Duration::from_millis(rtt_ms), loss, 0.1, 20.0);
            assert!(used > 0.85, "{rtt_ms} ms, {loss} loss: {:.0}% of the link used", used * 100.0);
            assert!(dropped < 0.02, "{rtt_ms} ms, {loss} loss: {:.1}% dropped by the queue", dropped * 100.0);
        }
    }

    #[test]
    fn a_longer_path_is_believed_within_the_window() {
        let t0 = Instant::now();
        let mut cc = RateControl::new(14_720, 1200);
        let ms = Duration::from_millis;
        for i in 0..1000u32 {
            cc.acked(1200, ms(10) + ms(u64::from(i % 3)), t0 + ms(u64::from(i) * 5));
        }
        assert_eq!(cc.min_rtt, ms(10));
        // The route changes: 50 ms from 5 s on; 10 s after the last short sample it is the minimum.
        for i in 0..3000u32 {
            cc.acked(1200, ms(50) + ms(u64::from(i % 3)), t0 + ms(5000 + u64::from(i) * 5));
        }
        assert_eq!(cc.min_rtt, ms(50));
    }

    #[test]
    fn persistent_congestion_starts_over() {
        let mut cc = RateControl::new(14_720, 1200);
        cc.end_round(10_000_000, false);
        cc.lost(true);
        assert_eq!((cc.window(), cc.best()), (14_720, 0));
    }
}
