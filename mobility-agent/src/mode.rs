//! The modes of a protected disk and the one rule that routes every front-end change through them.
//!
//! WRITE, WRITE_ZEROES, TRIM and FLUSH all go through [`route`]: it takes the disk's mode, the operation
//! and what the journal looks like, and returns the next mode and what to do. No I/O happens here; the
//! driver is `capture::ProtectedDisk`, which calls it under the journal's lock and carries the decision
//! out before releasing the lock.
//!
//! ```text
//!              protect / reprotect                     pending + change > limit, or journal volume full
//!   Unprotected ------------------> Journaling --------------------------------------------------> Overflow
//!   Tracking   ------------------>      ^  <------------------ pending <= limit / 2 ----------------/
//!        ^                               |
//!        | unprotect (parted at a        | planned failover
//!        | failover: Tracking, else      v
//!        | Unprotected)               Stopped { protected } --unprotect--> Stopped { protected: false }
//! ```
//!
//! The initial copy, the dirty copy and scan capture are not modes of the front end: they append copies
//! of what the disk holds to the journal while the disk is Journaling, under the same lock.
//!
//! ## The redo rule
//! The journal is written before the disk, so a disk whose agent was killed between the two may lack the
//! newest journaled change; opening the disk redoes journaled changes onto it. A change that bypasses the
//! journal (Overflow, Tracking, Unprotected) may overwrite a range that an older journal record also
//! covers, and redoing that record would roll the disk back. So, before the first change that bypasses
//! the journal after a journaled one, the driver *seals* ([`Decision::seal`]): it makes the journal and
//! the disk durable and records durably that the disk holds every record up to the journal's newest
//! (the redo mark, [`crate::journal::Journal::mark_on_disk`]). A restart redoes only the records after
//! the mark, all of which are newer than any change that bypassed the journal ([`redo_from`]).
//! A scanned disk is written by the machine directly, never through the agent: the journal holds copies
//! read from the disk, never newer than it, so nothing is ever redone onto it.

use sr_common::types::Seq;

/// What a protected disk does with the changes its front end receives.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// Protected: every change is appended to the journal, then written to the disk.
    Journaling,
    /// Protected, but the journal reached its limit (or its volume is full): changes are marked in the
    /// dirty map (durably) and written, until the journal drained to half its limit.
    Overflow,
    /// Not protected, parted from its peer at a failover: changes are marked in the dirty map so that a
    /// reprotect ships just them.
    Tracking,
    /// Not protected and never parted from a peer: changes go to the disk only.
    Unprotected,
    /// A planned failover stopped the disk: changes are refused until it is protected again.
    /// `protected` says whether its journal still ships (it does until the item is disabled).
    Stopped { protected: bool },
}

impl Mode {
    /// Whether the disk is protected: its journal ships to a process server.
    pub fn protected(self) -> bool {
        matches!(self, Mode::Journaling | Mode::Overflow | Mode::Stopped { protected: true })
    }

    /// The mode once the journal holds `pending` bytes the master target has not applied: an overflowed
    /// disk journals again once the journal drained to half its limit.
    pub fn after_drain(self, pending: u64, limit: u64) -> Mode {
        match self {
            Mode::Overflow if pending <= limit / 2 => Mode::Journaling,
            m => m,
        }
    }

    pub fn as_u8(self) -> u8 {
        match self {
            Mode::Journaling => 0,
            Mode::Overflow => 1,
            Mode::Tracking => 2,
            Mode::Unprotected => 3,
            Mode::Stopped { protected: false } => 4,
            Mode::Stopped { protected: true } => 5,
        }
    }

    pub fn from_u8(v: u8) -> Mode {
        match v {
            0 => Mode::Journaling,
            1 => Mode::Overflow,
            2 => Mode::Tracking,
            3 => Mode::Unprotected,
            4 => Mode::Stopped { protected: false },
            5 => Mode::Stopped { protected: true },
            _ => unreachable!("mode {v} was never stored"),
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Mode::Journaling => "journaling",
            Mode::Overflow => "overflow",
            Mode::Tracking => "tracking",
            Mode::Unprotected => "unprotected",
            Mode::Stopped { .. } => "stopped",
        }
    }
}

/// An operation of the front end.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Operation {
    Write { len: u64 },
    WriteZeroes { len: u64 },
    Trim { len: u64 },
    Flush,
}

/// Bytes a journal record of a change takes (its header, and a write's data).
const RECORD_HEADER: u64 = 48;

impl Operation {
    /// Bytes the change would add to the journal.
    fn journal_bytes(self) -> u64 {
        match self {
            Operation::Write { len } => RECORD_HEADER + len,
            Operation::WriteZeroes { .. } | Operation::Trim { .. } => RECORD_HEADER,
            Operation::Flush => 0,
        }
    }
}

/// What the journal looks like when a change arrives (read under the journal's lock).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct JournalView {
    /// Bytes of records the master target has not applied yet.
    pub pending: u64,
    /// The journal's limit in bytes.
    pub limit: u64,
    /// The redo mark covers every change record in the journal: a change may bypass the journal without
    /// sealing first.
    pub sealed: bool,
    /// The journal cannot take an append: its volume is full, or an append failed, and no space has
    /// been freed since. Changes then go to the dirty map, never refused.
    pub append_failed: bool,
    /// The journal alone does not make every acknowledged change durable: changes bypassed it since the
    /// disk was last durable, or one of its fsyncs failed. A FLUSH syncs the disk too.
    pub disk_behind: bool,
}

/// Where a change goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Route {
    /// Refused with the reason of the mode (a stopped disk).
    Refuse,
    /// Appended to the journal, then written to the disk.
    Journal,
    /// Marked in the dirty map (durable before the disk is written), then written to the disk.
    Dirty,
    /// Written to the disk only.
    Disk,
    /// FLUSH: a flush marker appended, then the journal fsynced. The journal is the durability point;
    /// the disk is made durable behind it (before applied records are trimmed, before a bypass), and a
    /// restart redoes what it lost (the redo rule).
    FlushJournal,
    /// FLUSH: as [`Route::FlushJournal`], and the disk fsynced too: it holds changes the journal does
    /// not (they bypassed it since the disk was last durable), or a journal fsync failed.
    FlushBoth,
    /// FLUSH: the disk fsynced (nothing new in the journal needs it).
    FlushDisk,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Decision {
    /// The disk's mode from now on.
    pub mode: Mode,
    pub route: Route,
    /// Before the change reaches the disk: make the journal and the disk durable and record that the
    /// disk holds every journaled change (see the redo rule above).
    pub seal: bool,
}

/// The one routing rule for every operation of the front end.
pub fn route(mode: Mode, op: Operation, j: JournalView) -> Decision {
    let bypass = |mode, route| Decision { mode, route, seal: !j.sealed };
    let keep = |route| Decision { mode, route, seal: false };
    if op == Operation::Flush {
        return match mode {
            Mode::Journaling if j.append_failed => bypass(Mode::Overflow, Route::FlushDisk),
            Mode::Journaling if j.disk_behind => keep(Route::FlushBoth),
            Mode::Journaling => keep(Route::FlushJournal),
            _ => keep(Route::FlushDisk),
        };
    }
    match mode {
        Mode::Stopped { .. } => keep(Route::Refuse),
        Mode::Journaling | Mode::Overflow => {
            let mode = mode.after_drain(j.pending, j.limit);
            if mode == Mode::Journaling && !j.append_failed && j.pending.saturating_add(op.journal_bytes()) <= j.limit {
                Decision { mode, route: Route::Journal, seal: false }
            } else {
                // A single change larger than the whole limit goes to the dirty map too: it is copied
                // into the journal later in chunks the limit allows.
                bypass(Mode::Overflow, Route::Dirty)
            }
        }
        Mode::Tracking => bypass(mode, Route::Dirty),
        Mode::Unprotected => bypass(mode, Route::Disk),
    }
}

/// Capture front end of a disk, for the redo rule.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Capture {
    /// The agent fronts the disk: every change passes through [`route`].
    Nbd,
    /// The machine writes the disk directly; the agent scans it.
    Scan,
}

/// The first journal record that opening the disk redoes onto it, given the redo mark (every record up
/// to it is known to be on the disk); `None`: nothing is redone.
pub fn redo_from(capture: Capture, mark: Seq) -> Option<Seq> {
    match capture {
        Capture::Nbd => Some(mark.next()),
        Capture::Scan => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MODES: [Mode; 6] = [
        Mode::Journaling,
        Mode::Overflow,
        Mode::Tracking,
        Mode::Unprotected,
        Mode::Stopped { protected: false },
        Mode::Stopped { protected: true },
    ];
    const LIMIT: u64 = 1 << 20;

    fn ops() -> [Operation; 4] {
        [
            Operation::Write { len: 4096 },
            Operation::WriteZeroes { len: 1 << 20 },
            Operation::Trim { len: 4096 },
            Operation::Flush,
        ]
    }

    /// Journal states: empty, below half, between half and the limit, at the limit; sealed or not; the
    /// volume full or not.
    fn journals() -> Vec<JournalView> {
        let mut out = Vec::new();
        for pending in [0, LIMIT / 4, LIMIT * 3 / 4, LIMIT] {
            for sealed in [false, true] {
                for append_failed in [false, true] {
                    for disk_behind in [false, true] {
                        out.push(JournalView { pending, limit: LIMIT, sealed, append_failed, disk_behind });
                    }
                }
            }
        }
        out
    }

    /// The expected decision, written out case by case.
    fn expected(mode: Mode, op: Operation, j: JournalView) -> Decision {
        let change = op != Operation::Flush;
        let fits = j.pending + op.journal_bytes() <= j.limit;
        let d = |mode, route, seal| Decision { mode, route, seal };
        match (mode, change) {
            (Mode::Journaling, false) if j.append_failed => d(Mode::Overflow, Route::FlushDisk, !j.sealed),
            (Mode::Journaling, false) if j.disk_behind => d(mode, Route::FlushBoth, false),
            (Mode::Journaling, false) => d(mode, Route::FlushJournal, false),
            (_, false) => d(mode, Route::FlushDisk, false),
            (Mode::Stopped { .. }, true) => d(mode, Route::Refuse, false),
            (Mode::Journaling, true) if fits && !j.append_failed => d(Mode::Journaling, Route::Journal, false),
            (Mode::Journaling, true) => d(Mode::Overflow, Route::Dirty, !j.sealed),
            (Mode::Overflow, true) if j.pending <= LIMIT / 2 && fits && !j.append_failed => {
                d(Mode::Journaling, Route::Journal, false)
            }
            (Mode::Overflow, true) => d(Mode::Overflow, Route::Dirty, !j.sealed),
            (Mode::Tracking, true) => d(mode, Route::Dirty, !j.sealed),
            (Mode::Unprotected, true) => d(mode, Route::Disk, !j.sealed),
        }
    }

    #[test]
    fn every_mode_operation_and_journal_state() {
        let mut cases = 0;
        for mode in MODES {
            for op in ops() {
                for j in journals() {
                    let got = route(mode, op, j);
                    assert_eq!(got, expected(mode, op, j), "{mode:?} {op:?} {j:?}");
                    // The redo rule: a change that reaches the disk without a journal record seals first
                    // unless the mark already covers the journal; a journaled change never seals.
                    let bypasses = matches!(got.route, Route::Dirty | Route::Disk)
                        || (got.mode == Mode::Overflow && mode == Mode::Journaling);
                    assert_eq!(got.seal, bypasses && !j.sealed, "{mode:?} {op:?} {j:?}");
                    // Protection never starts or ends by a front-end operation.
                    assert_eq!(got.mode.protected(), mode.protected(), "{mode:?} {op:?} {j:?}");
                    cases += 1;
                }
            }
        }
        assert_eq!(cases, 6 * 4 * 32);
    }

    #[test]
    fn write_zeroes_and_trim_route_alike_and_like_a_small_write() {
        for mode in MODES {
            for j in journals() {
                let z = route(mode, Operation::WriteZeroes { len: 1 << 30 }, j);
                assert_eq!(z, route(mode, Operation::Trim { len: 1 << 30 }, j));
                assert_eq!(z, route(mode, Operation::Write { len: 0 }, j), "{mode:?} {j:?}");
            }
        }
    }

    #[test]
    fn a_full_journal_volume_never_refuses_a_write_or_a_flush() {
        for mode in [Mode::Journaling, Mode::Overflow] {
            let j = JournalView { pending: 0, limit: LIMIT, sealed: false, append_failed: true, disk_behind: true };
            let d = route(mode, Operation::Write { len: 4096 }, j);
            assert_eq!((d.mode, d.route, d.seal), (Mode::Overflow, Route::Dirty, true));
            let d = route(mode, Operation::Flush, j);
            assert_eq!((d.mode, d.route), (Mode::Overflow, Route::FlushDisk));
        }
    }

    #[test]
    fn modes_round_trip_through_their_stored_form() {
        for m in MODES {
            assert_eq!(Mode::from_u8(m.as_u8()), m);
        }
    }

    #[test]
    fn scanned_disks_are_never_redone_onto() {
        assert_eq!(redo_from(Capture::Scan, Seq(0)), None);
        assert_eq!(redo_from(Capture::Scan, Seq(9)), None);
        assert_eq!(redo_from(Capture::Nbd, Seq(0)), Some(Seq(1)));
        assert_eq!(redo_from(Capture::Nbd, Seq(41)), Some(Seq(42)));
    }
}
