//! The replication stream's rules, free of I/O: which sequence numbers a sender sends next and how much
//! it may have unacknowledged, and what a receiver does with each batch (take it, trim the prefix it
//! already holds, re-acknowledge a replay, refuse a gap). Every hop of the pipeline runs these same
//! rules; the tokio drivers around them only move bytes:
//!
//! ```text
//!  agent ship.rs        process server ingest.rs | forward.rs        master target apply.rs
//!  Sender ---Batch---> Receiver (cache, DurableAck) | Sender ---Sealed---> Receiver (apply, AppliedAck)
//!         <--ack------                              |        <--ack-------
//! ```
//!
//! A session starts with the receiver's `Resume { next }`: the sender starts there whatever it sent
//! before, so a lost session, a restart of either side, or a replay of old batches costs resending and
//! never a duplicate or a hole. Nothing here reads a clock: time comes in as `now`, and
//! [`Sender::poll_timeout`] says when the driver must call [`Sender::handle_timeout`].

use crate::errcode::ErrorCode;
use crate::types::Seq;
use std::collections::VecDeque;
use std::time::{Duration, Instant};

/// What breaks a session. [`StreamError::code`] says whether retrying can help.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum StreamError {
    /// The receiver asks for changes the sender no longer (or never) held: the replica would have a
    /// hole, so only a resync repairs it.
    #[error("the peer needs changes from seq {next}, but only {first}..={last} are held; the disk needs a resync")]
    NotHeld { next: Seq, first: Seq, last: Seq },
    /// A batch starts after the next expected change: something between was lost for good.
    #[error("gap: expected seq {expected}, the batch starts at {first}; the disk needs a resync")]
    Gap { expected: Seq, first: Seq },
    /// A receiver that takes only exact continuations got another batch: the sender's session is out of
    /// date (its sender cuts batches at the receiver's position and checks its own source for holes),
    /// and a new session fixes it.
    #[error("out of order: expected seq {expected}, got {first}..={last}; nothing taken")]
    OutOfOrder { expected: Seq, first: Seq, last: Seq },
    /// The peer acknowledged changes that were never sent to it in this session.
    #[error("the peer acknowledged seq {through}, but only up to {sent} was sent")]
    AckBeyondSent { through: Seq, sent: Seq },
    /// Nothing was acknowledged for too long while batches were in flight.
    #[error("no acknowledgement for {waited:?} with {bytes} bytes in flight; the peer is stuck or unreachable")]
    Stalled { waited: Duration, bytes: u64 },
}

impl StreamError {
    /// Gaps and missing changes break the replica chain; the rest end the session and a new one
    /// (resuming where the receiver is) gets past them.
    pub fn code(&self) -> ErrorCode {
        match self {
            StreamError::NotHeld { .. } | StreamError::Gap { .. } => ErrorCode::ChainBroken,
            StreamError::OutOfOrder { .. } | StreamError::AckBeyondSent { .. } | StreamError::Stalled { .. } => {
                ErrorCode::Transient
            }
        }
    }
}

/// Where a batch `first..=last` stands against the next change a receiver (or a reader) needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Place {
    /// Everything in it is already held: a replay.
    Behind,
    /// It continues what is held once its first `skip` changes are dropped (0 for an exact fit).
    Continues { skip: u64 },
    /// It starts after `next`: the changes between are missing.
    Ahead,
}

/// The one rule for placing a batch; the receiver, and the forwarder reading its cache, both use it.
pub fn place(next: Seq, first: Seq, last: Seq) -> Place {
    if last < next {
        Place::Behind
    } else if first > next {
        Place::Ahead
    } else {
        Place::Continues { skip: next.0 - first.0 }
    }
}

/// How long a sender waits for any acknowledgement while batches are in flight before it starts a new
/// session, where its receiver has no reason to hold batches back (the master target applies or
/// refuses at once): a peer stuck behind a live connection is left. A process server holds an agent's
/// batches back on purpose while its cache is full, for as long as its master target is away, so the
/// agent's sessions have no ack timeout (QUIC's idle timeout still ends a session with a dead peer).
pub const DEFAULT_ACK_TIMEOUT: Duration = Duration::from_secs(300);

/// A sender's limits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SenderLimits {
    /// Bytes in flight (sent, not acknowledged) at most.
    pub window_bytes: u64,
    /// Bytes in one batch at most.
    pub batch_bytes: u64,
    /// How long batches may stay in flight with no acknowledgement before the session is given up.
    pub ack_timeout: Option<Duration>,
    /// How long changes may gather before a batch smaller than `batch_bytes` goes out (see
    /// [`Sender::hold`]); zero sends whatever is ready at once.
    pub linger: Duration,
}

/// One batch sent and not yet acknowledged.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct InFlight {
    last: Seq,
    bytes: u64,
}

/// What a sender may do now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Next {
    /// Send the changes from `from` on, at most `budget` bytes.
    Send { from: Seq, budget: u64 },
    /// The window is full: wait for an acknowledgement.
    WindowFull,
}

/// The sending side of one session.
#[derive(Debug, Clone)]
pub struct Sender {
    limits: SenderLimits,
    /// The first change not yet sent in this session.
    next: Seq,
    /// Every change through this one is acknowledged.
    acked: Seq,
    inflight: VecDeque<InFlight>,
    inflight_bytes: u64,
    /// The last acknowledgement that freed something, or when the window last became non-empty.
    progress_at: Instant,
    /// When the last batch went out in this session.
    sent_at: Option<Instant>,
}

impl Sender {
    /// A session the receiver asked to resume at `next`, checked against the changes the sender holds
    /// (`first..=last`; `first == last + 1` when it holds none).
    pub fn resume(limits: SenderLimits, next: Seq, first: Seq, last: Seq, now: Instant) -> Result<Sender, StreamError> {
        if next.0 == 0 || next < first || next.0 > last.0 + 1 {
            return Err(StreamError::NotHeld { next, first, last });
        }
        Ok(Sender::at(limits, next, now))
    }

    /// A session resuming at `next` whose source is checked batch by batch (see [`Sender::place`]).
    pub fn at(limits: SenderLimits, next: Seq, now: Instant) -> Sender {
        let next = next.max(Seq(1));
        Sender {
            limits,
            next,
            acked: Seq(next.0 - 1),
            inflight: VecDeque::new(),
            inflight_bytes: 0,
            progress_at: now,
            sent_at: None,
        }
    }

    /// What to do now.
    pub fn next(&self) -> Next {
        if self.inflight_bytes >= self.limits.window_bytes {
            return Next::WindowFull;
        }
        let budget = self.limits.batch_bytes.min(self.limits.window_bytes - self.inflight_bytes).max(1);
        Next::Send { from: self.next, budget }
    }

    /// Whether `pending` bytes of changes ready to send should wait for more to gather, and until when.
    /// Every batch costs its receivers a fixed amount whatever its size (a file and an fsync at the
    /// process server, a commit at the master target), so under a steady churn changes gather for up
    /// to `linger` after the previous batch and go out together: batches grow, their count falls, and
    /// the replica trails by at most `linger` more. A full batch goes out at once, and so does the
    /// first change after a quiet spell (nothing was sent for `linger`). `None`: send now.
    pub fn hold(&self, pending: u64, now: Instant) -> Option<Instant> {
        let budget = match self.next() {
            Next::Send { budget, .. } => budget,
            Next::WindowFull => return None,
        };
        if self.limits.linger.is_zero() || pending >= budget {
            return None;
        }
        let until = self.sent_at? + self.limits.linger;
        (now < until).then_some(until)
    }

    /// Where a batch read from the source stands: how many of its first changes were sent already, or
    /// a gap the source cannot fill. A source asked for `next` never gives a batch that ends before it.
    pub fn place(&self, first: Seq, last: Seq) -> Result<u64, StreamError> {
        match place(self.next, first, last) {
            Place::Continues { skip } => Ok(skip),
            Place::Behind | Place::Ahead => Err(StreamError::NotHeld { next: self.next, first, last }),
        }
    }

    /// A batch `first..=last` of `bytes` went out. Batches go out in order, each continuing the last.
    pub fn sent(&mut self, first: Seq, last: Seq, bytes: u64, now: Instant) {
        assert!(first == self.next && last >= first, "batch {first}..={last} sent where {} was next", self.next);
        if self.inflight.is_empty() {
            self.progress_at = now;
        }
        self.inflight.push_back(InFlight { last, bytes });
        self.inflight_bytes += bytes;
        self.next = last.next();
        self.sent_at = Some(now);
    }

    /// The receiver holds everything through `through`. Returns whether that is news.
    pub fn acked(&mut self, through: Seq, now: Instant) -> Result<bool, StreamError> {
        let sent = Seq(self.next.0 - 1);
        if through > sent {
            return Err(StreamError::AckBeyondSent { through, sent });
        }
        if through <= self.acked {
            return Ok(false);
        }
        self.acked = through;
        while self.inflight.front().is_some_and(|b| b.last <= through) {
            let b = self.inflight.pop_front().expect("front exists");
            self.inflight_bytes -= b.bytes;
        }
        self.progress_at = now;
        Ok(true)
    }

    /// When [`Sender::handle_timeout`] must be called, if batches are in flight and a timeout is set.
    pub fn poll_timeout(&self) -> Option<Instant> {
        let timeout = self.limits.ack_timeout?;
        (!self.inflight.is_empty()).then(|| self.progress_at + timeout)
    }

    /// Gives the session up if nothing was acknowledged for the whole ack timeout.
    pub fn handle_timeout(&self, now: Instant) -> Result<(), StreamError> {
        match self.poll_timeout() {
            Some(at) if now >= at => Err(self.stalled(now)),
            _ => Ok(()),
        }
    }

    /// The error of a session given up at `now` for want of acknowledgements (also while a write to the
    /// peer is blocked because it stopped reading).
    pub fn stalled(&self, now: Instant) -> StreamError {
        StreamError::Stalled { waited: now.saturating_duration_since(self.progress_at), bytes: self.inflight_bytes }
    }

    pub fn acknowledged(&self) -> Seq {
        self.acked
    }

    pub fn inflight_bytes(&self) -> u64 {
        self.inflight_bytes
    }
}

/// How a receiver treats a batch that overlaps what it holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OverlapRule {
    /// Drop the changes already held and take the rest (the agent resends from its journal in batches
    /// cut anew each session).
    Trim,
    /// Refuse it, and a batch after a gap too, as out of order (sealed batches are cut by the sender at
    /// the receiver's position and cannot be trimmed before they are opened).
    Refuse,
}

/// What a receiver does with a batch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Offer {
    /// Already held: acknowledge `through` again and take nothing.
    Replay { through: Seq },
    /// Take it, without its first `skip` changes, then call [`Receiver::taken`].
    Take { skip: usize },
}

/// The receiving side of one stream: the next change it needs, which is durable state the driver
/// restores at start (the cache's or replica's position + 1).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Receiver {
    next: Seq,
    rule: OverlapRule,
}

impl Receiver {
    pub fn new(next: Seq, rule: OverlapRule) -> Receiver {
        Receiver { next: next.max(Seq(1)), rule }
    }

    /// The change it needs next: what `Resume` tells the sender.
    pub fn next(&self) -> Seq {
        self.next
    }

    /// Everything before [`Receiver::next`] is held.
    pub fn through(&self) -> Seq {
        Seq(self.next.0 - 1)
    }

    pub fn offer(&self, first: Seq, last: Seq) -> Result<Offer, StreamError> {
        match place(self.next, first, last) {
            Place::Behind => Ok(Offer::Replay { through: self.through() }),
            Place::Continues { skip: 0 } => Ok(Offer::Take { skip: 0 }),
            _ if self.rule == OverlapRule::Refuse => Err(StreamError::OutOfOrder { expected: self.next, first, last }),
            Place::Ahead => Err(StreamError::Gap { expected: self.next, first }),
            Place::Continues { skip } => Ok(Offer::Take { skip: skip as usize }),
        }
    }

    /// The durable position moved on outside this session (a batch of an older session finished after
    /// this one began): what it now needs is at least `next`.
    pub fn advance(&mut self, next: Seq) {
        self.next = self.next.max(next);
    }

    /// The batch ending at `last` is durable: returns the acknowledgement to send.
    pub fn taken(&mut self, last: Seq) -> Seq {
        assert!(last >= self.next, "batch ending at {last} taken where {} was next", self.next);
        self.next = last.next();
        self.through()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const LIMITS: SenderLimits = SenderLimits {
        window_bytes: 100,
        batch_bytes: 40,
        ack_timeout: Some(Duration::from_secs(30)),
        linger: Duration::ZERO,
    };

    #[test]
    fn changes_gather_for_the_linger_unless_a_full_batch_is_ready_or_the_stream_was_quiet() {
        let ms = Duration::from_millis;
        let t0 = Instant::now();
        let mut s = Sender::at(SenderLimits { linger: ms(20), ..LIMITS }, Seq(1), t0);
        assert_eq!(s.hold(1, t0), None, "the first change of a session goes at once");
        s.sent(Seq(1), Seq(1), 1, t0);
        assert_eq!(s.hold(5, t0 + ms(1)), Some(t0 + ms(20)), "a churn gathers after a batch");
        assert_eq!(s.hold(39, t0 + ms(19)), Some(t0 + ms(20)));
        assert_eq!(s.hold(40, t0 + ms(2)), None, "a full batch is ready");
        assert_eq!(s.hold(5, t0 + ms(20)), None, "the linger is over");
        s.acked(Seq(1), t0 + ms(3)).unwrap();
        assert_eq!(s.hold(5, t0 + ms(4)), Some(t0 + ms(20)), "an acknowledgement does not end it");
        s.sent(Seq(2), Seq(3), 5, t0 + ms(25));
        assert_eq!(s.hold(1, t0 + ms(30)), Some(t0 + ms(45)), "counted from the latest batch");
        assert_eq!(s.hold(1, t0 + ms(500)), None, "after a quiet spell a change goes at once");
        // The budget is what the window leaves: what fills it is a full batch.
        s.sent(Seq(4), Seq(5), 40, t0 + ms(500));
        s.sent(Seq(6), Seq(7), 40, t0 + ms(500));
        assert_eq!(s.hold(10, t0 + ms(501)), Some(t0 + ms(520)));
        assert_eq!(s.hold(15, t0 + ms(501)), None, "the 15 bytes the window has left are ready");
        s.sent(Seq(8), Seq(9), 15, t0 + ms(501));
        assert_eq!(s.hold(5, t0 + ms(502)), None, "a full window waits for acknowledgements, not the linger");
        let mut at_once = Sender::at(LIMITS, Seq(1), t0);
        at_once.sent(Seq(1), Seq(1), 1, t0);
        assert_eq!(at_once.hold(1, t0), None, "no linger: everything goes at once");
    }

    #[test]
    fn placing_a_batch() {
        assert_eq!(place(Seq(5), Seq(1), Seq(4)), Place::Behind);
        assert_eq!(place(Seq(5), Seq(5), Seq(9)), Place::Continues { skip: 0 });
        assert_eq!(place(Seq(5), Seq(2), Seq(5)), Place::Continues { skip: 3 });
        assert_eq!(place(Seq(5), Seq(6), Seq(9)), Place::Ahead);
    }

    #[test]
    fn resume_only_where_the_changes_are_held() {
        let t = Instant::now();
        assert!(Sender::resume(LIMITS, Seq(3), Seq(3), Seq(9), t).is_ok());
        assert!(Sender::resume(LIMITS, Seq(10), Seq(3), Seq(9), t).is_ok(), "all sent and applied");
        assert!(Sender::resume(LIMITS, Seq(1), Seq(1), Seq(0), t).is_ok(), "empty journal, nothing sent");
        for next in [Seq(0), Seq(2), Seq(11)] {
            let e = Sender::resume(LIMITS, next, Seq(3), Seq(9), t).unwrap_err();
            assert_eq!(e.code(), ErrorCode::ChainBroken, "{next}");
        }
    }

    #[test]
    fn window_opens_on_acknowledgements() {
        let t0 = Instant::now();
        let mut s = Sender::resume(LIMITS, Seq(1), Seq(1), Seq(100), t0).unwrap();
        assert_eq!(s.next(), Next::Send { from: Seq(1), budget: 40 });
        s.sent(Seq(1), Seq(4), 40, t0);
        s.sent(Seq(5), Seq(8), 40, t0);
        assert_eq!(s.next(), Next::Send { from: Seq(9), budget: 20 }, "what is left of the window");
        s.sent(Seq(9), Seq(10), 25, t0);
        assert_eq!(s.next(), Next::WindowFull);
        assert_eq!(s.acked(Seq(3), t0), Ok(true), "partial: the first batch stays in flight");
        assert_eq!(s.next(), Next::WindowFull);
        assert_eq!(s.acked(Seq(8), t0), Ok(true));
        assert_eq!(s.inflight_bytes(), 25);
        assert_eq!(s.next(), Next::Send { from: Seq(11), budget: 40 });
        assert_eq!(s.acked(Seq(5), t0), Ok(false), "stale");
        assert_eq!(s.acknowledged(), Seq(8));
        assert_eq!(s.acked(Seq(11), t0), Err(StreamError::AckBeyondSent { through: Seq(11), sent: Seq(10) }));
    }

    #[test]
    fn stalls_only_without_progress_while_in_flight() {
        let t0 = Instant::now();
        let s30 = Duration::from_secs(30);
        let mut s = Sender::at(LIMITS, Seq(1), t0);
        assert_eq!(s.poll_timeout(), None, "nothing in flight, nothing to wait for");
        let t1 = t0 + Duration::from_secs(100);
        s.sent(Seq(1), Seq(2), 10, t1);
        assert_eq!(s.poll_timeout(), Some(t1 + s30), "the clock starts when the window fills, not at resume");
        s.sent(Seq(3), Seq(4), 10, t1 + Duration::from_secs(20));
        assert_eq!(s.poll_timeout(), Some(t1 + s30), "more sending is no progress");
        assert!(s.handle_timeout(t1 + Duration::from_secs(29)).is_ok());
        s.acked(Seq(2), t1 + Duration::from_secs(29)).unwrap();
        assert!(s.handle_timeout(t1 + s30).is_ok(), "an acknowledgement moved it");
        let e = s.handle_timeout(t1 + Duration::from_secs(59)).unwrap_err();
        assert_eq!(e, StreamError::Stalled { waited: s30, bytes: 10 });
        assert_eq!(e.code(), ErrorCode::Transient);
        s.acked(Seq(4), t1 + Duration::from_secs(60)).unwrap();
        assert_eq!(s.poll_timeout(), None);
        let none = Sender::at(SenderLimits { ack_timeout: None, ..LIMITS }, Seq(1), t0);
        assert_eq!(none.poll_timeout(), None);
    }

    #[test]
    fn sender_skips_what_it_sent_and_refuses_a_hole_in_its_source() {
        let t0 = Instant::now();
        let mut s = Sender::at(LIMITS, Seq(5), t0);
        assert_eq!(s.place(Seq(3), Seq(9)), Ok(2));
        assert_eq!(s.place(Seq(5), Seq(9)), Ok(0));
        s.sent(Seq(5), Seq(9), 10, t0);
        assert!(s.place(Seq(2), Seq(9)).is_err(), "all sent: a source never gives it");
        assert_eq!(s.place(Seq(11), Seq(12)).unwrap_err().code(), ErrorCode::ChainBroken);
    }

    #[test]
    fn receiver_takes_trims_replays_and_refuses() {
        let mut r = Receiver::new(Seq(1), OverlapRule::Trim);
        assert_eq!(r.offer(Seq(1), Seq(3)), Ok(Offer::Take { skip: 0 }));
        assert_eq!(r.taken(Seq(3)), Seq(3));
        assert_eq!(r.offer(Seq(1), Seq(3)), Ok(Offer::Replay { through: Seq(3) }));
        assert_eq!(r.offer(Seq(2), Seq(6)), Ok(Offer::Take { skip: 2 }));
        let gap = r.offer(Seq(5), Seq(6)).unwrap_err();
        assert_eq!(gap, StreamError::Gap { expected: Seq(4), first: Seq(5) });
        assert_eq!(gap.code(), ErrorCode::ChainBroken);
        let strict = Receiver::new(Seq(4), OverlapRule::Refuse);
        assert_eq!(strict.offer(Seq(4), Seq(4)), Ok(Offer::Take { skip: 0 }));
        assert_eq!(strict.offer(Seq(3), Seq(4)).unwrap_err().code(), ErrorCode::Transient);
        assert_eq!(strict.offer(Seq(6), Seq(7)).unwrap_err().code(), ErrorCode::Transient);
        assert_eq!(strict.offer(Seq(3), Seq(3)), Ok(Offer::Replay { through: Seq(3) }));
        assert_eq!(Receiver::new(Seq(0), OverlapRule::Trim).next(), Seq(1));
        let mut late = Receiver::new(Seq(4), OverlapRule::Refuse);
        late.advance(Seq(6));
        assert_eq!(late.offer(Seq(4), Seq(5)), Ok(Offer::Replay { through: Seq(5) }), "applied meanwhile");
        late.advance(Seq(2));
        assert_eq!(late.next(), Seq(6), "never back");
    }

    /// One step of the simulated network and of the two peers.
    #[derive(Debug, Clone)]
    enum Step {
        /// The sender sends what its window allows.
        Send,
        /// Deliver the in-flight message at this index (mod length) to the receiver.
        DeliverBatch(usize),
        /// Deliver the acknowledgement at this index (mod length) to the sender.
        DeliverAck(usize),
        /// Lose a message in either direction.
        Lose(usize),
        /// Deliver a copy and keep the original.
        Duplicate(usize),
        /// Time passes.
        Tick(u64),
        /// The sender's process restarts (the session is lost).
        RestartSender,
        /// The receiver's process restarts (its durable position survives).
        RestartReceiver,
        /// The connection drops.
        Drop,
        /// A new session resumes this many changes behind the receiver (its position moved after it
        /// answered, as when an older session's batch lands late).
        ResumeBehind(u64),
    }

    fn step() -> impl Strategy<Value = Step> {
        prop_oneof![
            6 => Just(Step::Send),
            6 => any::<usize>().prop_map(Step::DeliverBatch),
            4 => any::<usize>().prop_map(Step::DeliverAck),
            1 => any::<usize>().prop_map(Step::Lose),
            1 => any::<usize>().prop_map(Step::Duplicate),
            1 => (0u64..40).prop_map(Step::Tick),
            1 => Just(Step::RestartSender),
            1 => Just(Step::RestartReceiver),
            1 => Just(Step::Drop),
            1 => (1u64..10).prop_map(Step::ResumeBehind),
        ]
    }

    /// The world: a source of `changes` numbered 1..=len, a sender, a lossy network and a receiver
    /// whose delivered log is what the replica would hold.
    struct World {
        sizes: Vec<u64>,
        sender: Option<Sender>,
        receiver: Receiver,
        /// Sessions are numbered; a message of an older session never reaches the newer one.
        session: u64,
        batches: Vec<(u64, Seq, Seq)>,
        acks: Vec<(u64, Seq)>,
        delivered: Vec<Seq>,
        now: Instant,
    }

    impl World {
        fn new(sizes: Vec<u64>, rule: OverlapRule) -> World {
            World {
                sizes,
                sender: None,
                receiver: Receiver::new(Seq(1), rule),
                session: 0,
                batches: vec![],
                acks: vec![],
                delivered: vec![],
                now: Instant::now(),
            }
        }

        fn last(&self) -> Seq {
            Seq(self.sizes.len() as u64)
        }

        /// A new session: the receiver says where to resume.
        fn connect(&mut self) {
            self.session += 1;
            self.batches.clear();
            self.acks.clear();
            let s = Sender::resume(LIMITS, self.receiver.next(), Seq(1), self.last(), self.now)
                .expect("the source holds every change");
            self.sender = Some(s);
        }

        fn connect_behind(&mut self, k: u64) {
            self.connect();
            let next = Seq(self.receiver.next().0.saturating_sub(k).max(1));
            self.sender = Some(Sender::at(LIMITS, next, self.now));
        }

        fn disconnect(&mut self) {
            self.sender = None;
        }

        fn send(&mut self) {
            let last = self.last();
            let Some(s) = self.sender.as_mut() else { return self.connect() };
            let Next::Send { from, budget } = s.next() else { return };
            if from > last {
                return;
            }
            let mut to = from;
            let mut bytes = self.sizes[from.0 as usize - 1];
            while to < last && bytes + self.sizes[to.0 as usize] <= budget {
                bytes += self.sizes[to.0 as usize];
                to = to.next();
            }
            s.sent(from, to, bytes, self.now);
            self.batches.push((self.session, from, to));
        }

        fn receive(&mut self, (session, first, last): (u64, Seq, Seq)) {
            if session != self.session {
                return;
            }
            match self.receiver.offer(first, last) {
                Ok(Offer::Replay { through }) => self.acks.push((session, through)),
                Ok(Offer::Take { skip }) => {
                    let from = first.0 + skip as u64;
                    self.delivered.extend((from..=last.0).map(Seq));
                    let through = self.receiver.taken(last);
                    self.acks.push((session, through));
                }
                Err(_) => self.disconnect(),
            }
        }

        fn ack(&mut self, (session, through): (u64, Seq)) {
            if session != self.session {
                return;
            }
            if let Some(s) = self.sender.as_mut() {
                if s.acked(through, self.now).is_err() {
                    self.disconnect();
                }
            }
        }

        fn apply(&mut self, step: Step) {
            match step {
                Step::Send => self.send(),
                Step::DeliverBatch(i) if !self.batches.is_empty() => {
                    let b = self.batches.remove(i % self.batches.len());
                    self.receive(b);
                }
                Step::DeliverAck(i) if !self.acks.is_empty() => {
                    let a = self.acks.remove(i % self.acks.len());
                    self.ack(a);
                }
                Step::Lose(i) => {
                    let n = self.batches.len() + self.acks.len();
                    if n > 0 {
                        let i = i % n;
                        if i < self.batches.len() {
                            self.batches.remove(i);
                        } else {
                            self.acks.remove(i - self.batches.len());
                        }
                    }
                }
                Step::Duplicate(i) if !self.batches.is_empty() => {
                    let b = self.batches[i % self.batches.len()];
                    self.receive(b);
                }
                Step::Tick(secs) => {
                    self.now += Duration::from_secs(secs);
                    if self.sender.as_ref().is_some_and(|s| s.handle_timeout(self.now).is_err()) {
                        self.disconnect();
                    }
                }
                Step::RestartSender | Step::Drop => self.disconnect(),
                Step::ResumeBehind(k) => self.connect_behind(k),
                Step::RestartReceiver => {
                    self.receiver = Receiver::new(self.receiver.next(), self.receiver.rule);
                    self.disconnect();
                }
                _ => {}
            }
        }

        /// A clean network from here: in-order delivery, nothing lost, time moving.
        fn settle(&mut self) {
            for _ in 0..10 * self.sizes.len() + 10 {
                if self.receiver.next() > self.last() {
                    return;
                }
                self.send();
                while !self.batches.is_empty() {
                    let b = self.batches.remove(0);
                    self.receive(b);
                }
                while !self.acks.is_empty() {
                    let a = self.acks.remove(0);
                    self.ack(a);
                }
                self.apply(Step::Tick(31));
            }
        }
    }

    proptest! {
        /// Through any loss, duplication, reordering, stall and restart, the receiver takes every change
        /// exactly once and in order, and once the network is clean again it gets all of them.
        #[test]
        fn exactly_once_in_order_through_any_faults(
            sizes in prop::collection::vec(1u64..50, 1..60),
            steps in prop::collection::vec(step(), 0..300),
            refuse in any::<bool>(),
        ) {
            let rule = if refuse { OverlapRule::Refuse } else { OverlapRule::Trim };
            let mut w = World::new(sizes, rule);
            for s in steps {
                w.apply(s);
                let expect: Vec<Seq> = (1..=w.delivered.len() as u64).map(Seq).collect();
                prop_assert_eq!(&w.delivered, &expect, "taken twice, out of order or with a hole");
                if let Some(s) = &w.sender {
                    prop_assert!(s.inflight_bytes() < LIMITS.window_bytes + 50, "one change may overfill the window");
                    prop_assert!(s.acknowledged() <= w.receiver.through());
                }
            }
            w.settle();
            let all: Vec<Seq> = (1..=w.last().0).map(Seq).collect();
            prop_assert_eq!(w.delivered, all);
        }
    }
}
