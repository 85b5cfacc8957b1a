//! Group commit for FLUSH: concurrent FLUSHes (several NBD connections, several clients) share one
//! fsync of the journal instead of queueing one each behind the other.
//!
//! A FLUSH appends its marker, then needs an fsync of the journal that *started* after the append. One
//! fsync runs at a time; it covers every record appended before it started (`upto`, read with the
//! journal's lock held). A FLUSH whose marker is covered by a finished fsync is done; one that arrives
//! while an fsync runs waits for it and, if still not covered, starts the next, which covers everyone
//! who waited meanwhile. Positions are (journal incarnation, sequence number): a new journal starts
//! again at 1, and nothing synced in an older one covers it. A failed fsync fails every FLUSH of that
//! journal from then on (a failed fsync is reported once; a retry could succeed over lost data).

use sr_common::types::Seq;

/// A journal position: (incarnation, sequence number), ordered.
pub type Pos = (u64, Seq);

#[derive(Debug, Default)]
pub struct GroupSync {
    /// Every record up to here is durable.
    synced: Pos,
    running: bool,
    /// The incarnation of the journal whose fsync failed.
    failed: Option<u64>,
}

/// What a FLUSH does next.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Next {
    /// Its marker is durable.
    Done,
    /// An fsync of its journal failed.
    Failed,
    /// It runs the fsync now (and calls [`GroupSync::finished`]).
    Start,
    /// An fsync runs: wait for it to finish, then ask again.
    Wait,
}

impl GroupSync {
    /// What a FLUSH whose marker is at `target` does now.
    pub fn next(&mut self, target: Pos) -> Next {
        if self.failed == Some(target.0) {
            return Next::Failed;
        }
        if self.synced >= target {
            return Next::Done;
        }
        if self.running {
            return Next::Wait;
        }
        self.running = true;
        Next::Start
    }

    /// The fsync that started when the journal's newest record was `upto` ended.
    pub fn finished(&mut self, upto: Pos, ok: bool) {
        self.running = false;
        if !ok {
            self.failed = Some(upto.0);
        } else if upto > self.synced {
            self.synced = upto;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flushes_waiting_on_a_running_fsync_share_the_next_one() {
        let mut g = GroupSync::default();
        // A starts an fsync covering up to seq 3 (its own marker).
        assert_eq!(g.next((1, Seq(3))), Next::Start);
        // B and C appended after it started: they wait.
        assert_eq!(g.next((1, Seq(5))), Next::Wait);
        assert_eq!(g.next((1, Seq(7))), Next::Wait);
        g.finished((1, Seq(3)), true);
        assert_eq!(g.next((1, Seq(3))), Next::Done);
        // B starts the next one, which covers C's marker too (appended before it started).
        assert_eq!(g.next((1, Seq(5))), Next::Start);
        assert_eq!(g.next((1, Seq(7))), Next::Wait);
        g.finished((1, Seq(7)), true);
        assert_eq!(g.next((1, Seq(5))), Next::Done);
        assert_eq!(g.next((1, Seq(7))), Next::Done);
        // A marker after everything synced needs a new fsync.
        assert_eq!(g.next((1, Seq(8))), Next::Start);
    }

    #[test]
    fn an_older_fsync_never_moves_the_synced_position_back() {
        let mut g = GroupSync::default();
        assert_eq!(g.next((1, Seq(9))), Next::Start);
        g.finished((1, Seq(9)), true);
        assert_eq!(g.next((1, Seq(10))), Next::Start);
        g.finished((1, Seq(4)), true);
        assert_eq!(g.next((1, Seq(9))), Next::Done);
    }

    #[test]
    fn a_new_journal_is_not_covered_by_an_older_ones_fsync() {
        let mut g = GroupSync::default();
        assert_eq!(g.next((1, Seq(500))), Next::Start);
        g.finished((1, Seq(500)), true);
        assert_eq!(g.next((2, Seq(3))), Next::Start, "a reset journal starts again at 1");
        g.finished((2, Seq(3)), true);
        assert_eq!(g.next((2, Seq(3))), Next::Done);
    }

    #[test]
    fn a_failed_fsync_fails_every_later_flush_of_that_journal_only() {
        let mut g = GroupSync::default();
        assert_eq!(g.next((1, Seq(2))), Next::Start);
        assert_eq!(g.next((1, Seq(3))), Next::Wait);
        g.finished((1, Seq(2)), false);
        assert_eq!(g.next((1, Seq(3))), Next::Failed, "a waiter is not told its marker is durable");
        assert_eq!(g.next((1, Seq(1))), Next::Failed);
        assert_eq!(g.next((1, Seq(9))), Next::Failed);
        // A new protection's journal syncs again.
        assert_eq!(g.next((2, Seq(1))), Next::Start);
    }
}
