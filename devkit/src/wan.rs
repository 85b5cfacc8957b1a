//! A WAN link's behaviour as a pure model: what happens to each frame that enters it (dropped, or
//! delivered once or twice, and when), from the link's settings, a seeded random source and the
//! time the caller passes in. [`crate::netns::Pipe`] drives it with real frames between two sites.
//!
//! ```text
//! frame --partition?--> dropped
//!       --loss?-------> dropped
//!       --queue full?-> dropped            (tail drop, as a router's buffer)
//!       --> leaves at max(now, link busy until) + len / rate
//!       --> arrives latency ± jitter later (never before the frame ahead of it, unless reordered)
//!       --duplicate?--> a second copy just behind it
//! ```

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use std::time::{Duration, Instant};

/// What one direction of the link does to the frames that cross it.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Impairment {
    /// One-way delay (half the round trip when both directions have it).
    pub latency: Duration,
    /// Each frame's delay varies uniformly within ± this.
    pub jitter: Duration,
    /// Share of frames lost, 0.0..=1.0.
    pub loss: f64,
    /// Share of frames held back by an extra delay so that later ones overtake them.
    pub reorder: f64,
    /// Share of frames delivered twice.
    pub duplicate: f64,
    /// Bandwidth cap in bits per second (None: unlimited).
    pub rate_bits: Option<u64>,
    /// Frames that would wait longer than this in the cap's queue are dropped.
    pub queue: Duration,
}

impl Default for Impairment {
    fn default() -> Self {
        Impairment {
            latency: Duration::ZERO,
            jitter: Duration::ZERO,
            loss: 0.0,
            reorder: 0.0,
            duplicate: 0.0,
            rate_bits: None,
            queue: Duration::from_millis(100),
        }
    }
}

impl Impairment {
    /// A link of `rtt` round trip (each direction half of it), `loss` in each direction and a
    /// `mbit` Mbit/s cap.
    pub fn wan(rtt: Duration, loss: f64, mbit: Option<u64>) -> Impairment {
        Impairment {
            latency: rtt / 2,
            loss,
            rate_bits: mbit.map(|m| m.saturating_mul(1_000_000)),
            ..Default::default()
        }
    }
}

/// The fate of one frame: the instants its copies arrive at (none: lost).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Fate {
    pub arrivals: Vec<Instant>,
    pub why_dropped: Option<Drop>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Drop {
    Partition,
    Loss,
    QueueFull,
}

/// Counters of what the link did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Counters {
    pub frames: u64,
    pub bytes: u64,
    pub partitioned: u64,
    pub lost: u64,
    pub queue_drops: u64,
    pub reordered: u64,
    pub duplicated: u64,
}

/// One direction of a link.
#[derive(Debug)]
pub struct Link {
    pub cfg: Impairment,
    partitioned: bool,
    rng: StdRng,
    /// The cap's transmitter is busy until then.
    busy_until: Option<Instant>,
    /// The latest arrival handed out, which in-order frames may not precede.
    last_arrival: Option<Instant>,
    pub counters: Counters,
}

impl Link {
    pub fn new(cfg: Impairment, seed: u64) -> Link {
        Link {
            cfg,
            partitioned: false,
            rng: StdRng::seed_from_u64(seed),
            busy_until: None,
            last_arrival: None,
            counters: Counters::default(),
        }
    }

    /// Cuts the link (every frame dropped) or heals it.
    pub fn set_partitioned(&mut self, on: bool) {
        self.partitioned = on;
    }

    pub fn partitioned(&self) -> bool {
        self.partitioned
    }

    fn chance(&mut self, p: f64) -> bool {
        p > 0.0 && self.rng.gen::<f64>() < p
    }

    /// Decides the fate of a frame of `len` bytes entering the link at `now`.
    pub fn enter(&mut self, now: Instant, len: usize) -> Fate {
        self.counters.frames += 1;
        self.counters.bytes += len as u64;
        let dropped = |why| Fate { arrivals: Vec::new(), why_dropped: Some(why) };
        if self.partitioned {
            self.counters.partitioned += 1;
            return dropped(Drop::Partition);
        }
        if self.chance(self.cfg.loss) {
            self.counters.lost += 1;
            return dropped(Drop::Loss);
        }
        let start = self.busy_until.filter(|b| *b > now).unwrap_or(now);
        if start.duration_since(now) > self.cfg.queue {
            self.counters.queue_drops += 1;
            return dropped(Drop::QueueFull);
        }
        let sent = match self.cfg.rate_bits {
            Some(rate) if rate > 0 => {
                start + Duration::from_nanos((len as u64 * 8).saturating_mul(1_000_000_000) / rate)
            }
            _ => start,
        };
        self.busy_until = Some(sent);
        let jitter = self.cfg.jitter.as_nanos() as i128;
        let offset = if jitter > 0 { self.rng.gen_range(-jitter..=jitter) } else { 0 };
        let delay = (self.cfg.latency.as_nanos() as i128 + offset).max(0) as u64;
        let mut at = sent + Duration::from_nanos(delay);
        if self.chance(self.cfg.reorder) {
            // Held back by a quarter of the latency (at least 1 ms): frames behind it overtake it.
            // (Frames behind it keep their own order, not its.)
            self.counters.reordered += 1;
            at += (self.cfg.latency / 4).max(Duration::from_millis(1));
        } else {
            if let Some(last) = self.last_arrival.filter(|l| *l > at) {
                at = last;
            }
            self.last_arrival = Some(at);
        }
        let mut arrivals = vec![at];
        if self.chance(self.cfg.duplicate) {
            self.counters.duplicated += 1;
            arrivals.push(at + Duration::from_micros(50));
        }
        Fate { arrivals, why_dropped: None }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fates(cfg: Impairment, seed: u64, n: usize, gap: Duration, len: usize) -> (Instant, Vec<Fate>) {
        let t0 = Instant::now();
        let mut l = Link::new(cfg, seed);
        (t0, (0..n).map(|i| l.enter(t0 + gap * i as u32, len)).collect())
    }

    #[test]
    fn same_seed_same_fates() {
        let cfg = Impairment {
            latency: Duration::from_millis(25),
            jitter: Duration::from_millis(5),
            loss: 0.1,
            reorder: 0.05,
            duplicate: 0.05,
            ..Default::default()
        };
        let t0 = Instant::now();
        let run = |seed| {
            let mut l = Link::new(cfg, seed);
            (0..500).map(|i| l.enter(t0 + Duration::from_micros(i * 100), 1500)).collect::<Vec<_>>()
        };
        assert_eq!(run(7), run(7));
        assert_ne!(run(7), run(8));
    }

    #[test]
    fn latency_delays_and_order_holds_under_jitter() {
        let cfg =
            Impairment { latency: Duration::from_millis(25), jitter: Duration::from_millis(10), ..Default::default() };
        let (t0, f) = fates(cfg, 1, 1000, Duration::from_micros(100), 100);
        let mut last = t0;
        for (i, fate) in f.iter().enumerate() {
            let at = fate.arrivals[0];
            let sent = t0 + Duration::from_micros(100) * i as u32;
            assert!(at >= sent + Duration::from_millis(15), "frame {i} early");
            assert!(at >= last, "frame {i} overtook without a reorder");
            last = at;
        }
    }

    #[test]
    fn loss_rate_is_what_was_asked() {
        let (_, f) = fates(Impairment { loss: 0.01, ..Default::default() }, 3, 100_000, Duration::ZERO, 100);
        let lost = f.iter().filter(|x| x.why_dropped == Some(Drop::Loss)).count();
        assert!((700..=1300).contains(&lost), "{lost} of 100000 lost at 1%");
    }

    #[test]
    fn cap_spaces_frames_and_drops_past_the_queue() {
        // 8 Mbit/s: a 1000-byte frame takes 1 ms to send.
        let cfg = Impairment { rate_bits: Some(8_000_000), queue: Duration::from_millis(10), ..Default::default() };
        let (t0, f) = fates(cfg, 1, 20, Duration::ZERO, 1000);
        for (i, fate) in f.iter().take(11).enumerate() {
            assert_eq!(fate.arrivals, vec![t0 + Duration::from_millis(i as u64 + 1)]);
        }
        assert!(f[11..].iter().all(|x| x.why_dropped == Some(Drop::QueueFull)));
        // Frames spaced wider than their sending time pass without waiting.
        let (t0, f) = fates(cfg, 1, 5, Duration::from_millis(2), 1000);
        assert_eq!(f[4].arrivals, vec![t0 + Duration::from_millis(9)]);
    }

    #[test]
    fn reorder_and_duplicate_happen_at_their_rates() {
        let cfg = Impairment { latency: Duration::from_millis(8), reorder: 0.1, duplicate: 0.1, ..Default::default() };
        let (_, f) = fates(cfg, 5, 10_000, Duration::from_micros(100), 100);
        let twice = f.iter().filter(|x| x.arrivals.len() == 2).count();
        assert!((800..=1200).contains(&twice), "{twice} duplicated");
        let overtaken = f.windows(2).filter(|w| w[1].arrivals[0] < w[0].arrivals[0]).count();
        assert!(overtaken > 500, "{overtaken} overtaken");
    }

    #[test]
    fn partition_drops_everything_until_healed() {
        let mut l = Link::new(Impairment::default(), 1);
        let now = Instant::now();
        l.set_partitioned(true);
        assert_eq!(l.enter(now, 10).why_dropped, Some(Drop::Partition));
        l.set_partitioned(false);
        assert_eq!(l.enter(now, 10).arrivals, vec![now]);
        assert_eq!(l.counters.partitioned, 1);
    }
}
