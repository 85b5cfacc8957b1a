//! A protected disk: every change is appended to the journal, then applied to the disk, under one lock,
//! so the journal's order is the disk's write order even with several NBD connections.
//!
//! ```text
//! NBD WRITE --> lock --> journal.append (in kernel) --> disk.pwrite --> unlock --> wake shipper --> reply
//! NBD FLUSH --> lock --> journal.append(Flush marker) --> unlock --> fsync journal --> reply
//!              (the disk too only when changes bypassed the journal since it was last durable; else
//!              the disk is synced behind the journal: before applied records are trimmed, before a
//!              bypass, before the journal is dropped, and a restart redoes what it lost)
//! initial copy --> lock --> pread chunk --> journal.append (unless zero) --> unlock
//! journal over its limit --> writes mark the dirty map (durably) instead of the journal, until the
//!              journal drained to half its limit; then the dirty blocks are copied into the journal
//!              like the initial copy (lock --> pread --> append --> clear bit --> unlock)
//! start-up --> redo the journaled changes after the redo mark onto the disk, sync it, move the mark
//!              (the journal is written first and made durable first, so the disk may lack changes
//!              after a kill or a power loss)
//! ```
//!
//! Which way a change goes is decided by one pure rule, [`crate::mode::route`], for WRITE,
//! WRITE_ZEROES, TRIM and FLUSH alike; [`ProtectedDisk::change`] carries the decision out. The redo
//! rule, which keeps a restart from writing older data over newer, is stated in `mode.rs`.
//!
//! This file holds the disk, its start-up and the write path; beside it, `capture/state.rs` keeps the
//! copy and comparison progress (one record), `capture/copy.rs` copies blocks into the journal (initial
//! copy, dirty blocks, scan capture), and `capture/lifecycle.rs` protects, stops and reprotects.

use crate::dirty::DirtyMap;
use crate::journal::{self, Journal, JournalError};
use crate::metrics as m;
use crate::mode::{self, Capture, JournalView, Mode, Operation, Route};
use crate::scan::ScanMap;
use sr_common::disk::DiskFile;
use sr_common::nbd::{Backend, BackendError};
use sr_common::types::{DiskId, Seq};
use sr_common::wire::{MarkerKind, Op};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Mutex;

mod copy;
mod lifecycle;
mod state;
pub use state::{CopyState, DiskState, ResyncState, DISK_STATE, DISK_STATE_VERSION};

pub struct ProtectedDisk {
    pub id: DiskId,
    pub name: String,
    disk: DiskFile,
    /// Held across journal append + disk write so both see changes in the same order.
    journal: Mutex<Journal>,
    /// Wakes the shipper when a change is appended.
    pub appended: tokio::sync::Notify,
    acked: AtomicU64,
    applied: AtomicU64,
    /// Bytes written or zeroed through the front end since start (churn).
    changed_bytes: AtomicU64,
    /// The disk's [`Mode`] (stored as [`Mode::as_u8`]); changed only under the journal's lock, read
    /// without it.
    mode: std::sync::atomic::AtomicU8,
    /// An append failed (volume full, I/O error) and the journal has not freed space since: changes
    /// go to the dirty map without trying the journal.
    journal_trouble: std::sync::atomic::AtomicBool,
    /// Why shipping stopped for good (a fatal error), reported to the configuration server.
    fatal: Mutex<Option<(sr_common::wire::ErrorCode, String)>>,
    copy: Mutex<CopyState>,
    resync: Mutex<ResyncState>,
    /// Where `copy` and `resync` are kept together; held across writing the record and updating the
    /// two, so that a save of one never writes an older copy of the other.
    state_path: Mutex<PathBuf>,
    /// Wakes the comparison task when a resync is requested.
    pub resync_wake: tokio::sync::Notify,
    /// Automatic resyncs copy dirty blocks only in this window (minutes of the UTC day), unless
    /// `resync_now` says an operator asked.
    window: Mutex<Option<(u32, u32)>>,
    resync_now: std::sync::atomic::AtomicBool,
    /// Scan capture: checksums of what was shipped, and how often to scan (seconds).
    scan: Option<Mutex<ScanMap>>,
    pub scan_interval: AtomicU64,
    /// Blocks the replica may lack; locked inside the journal's lock.
    dirty: Mutex<DirtyMap>,
    /// Front-end writes take the read side; a recovery plan's consistency point holds the write side on
    /// every disk of the machine, so no write completes meanwhile. Only NBD threads wait on it, never the
    /// async runtime.
    hold_gate: std::sync::RwLock<()>,
    /// The journal's limit in bytes.
    limit: AtomicU64,
    /// Times the disk was made durable since it was opened.
    disk_syncs: AtomicU64,
    /// Whether the disk holds changes that bypassed the journal that no finished sync covers: a FLUSH
    /// syncs it then.
    disk_behind: DiskBehind,
    /// A sync of the disk failed: a failed fsync is reported once, so none may count as durable again
    /// (no FLUSH succeeds, no record leaves the journal) until a restart redoes the journal onto it.
    disk_failed: AtomicBool,
    /// Concurrent FLUSHes share fsyncs of the journal (group commit).
    group: Mutex<crate::group_sync::GroupSync>,
    group_done: std::sync::Condvar,
    /// Fsyncs FLUSHes ran on the journal since the disk was opened.
    journal_syncs: AtomicU64,
    metrics: DiskMetrics,
}

/// Metric handles resolved once, so the write path does not look them up per request.
struct DiskMetrics {
    journal_bytes: metrics::Gauge,
    journal_limit: metrics::Gauge,
    last_seq: metrics::Gauge,
    acked: metrics::Gauge,
    lag: metrics::Gauge,
    written: metrics::Counter,
    copy_ratio: metrics::Gauge,
    copy_bytes: metrics::Counter,
    dirty_bytes: metrics::Gauge,
    overflow: metrics::Gauge,
    resync_bytes: metrics::Counter,
    disk_syncs: metrics::Counter,
}

impl DiskMetrics {
    fn new(disk: &str) -> DiskMetrics {
        let d = disk.to_string();
        DiskMetrics {
            journal_bytes: metrics::gauge!(m::JOURNAL_BYTES, "disk" => d.clone()),
            journal_limit: metrics::gauge!(m::JOURNAL_LIMIT, "disk" => d.clone()),
            last_seq: metrics::gauge!(m::JOURNAL_LAST_SEQ, "disk" => d.clone()),
            acked: metrics::gauge!(m::ACKED_SEQ, "disk" => d.clone()),
            lag: metrics::gauge!(m::LAG_CHANGES, "disk" => d.clone()),
            written: metrics::counter!(m::WRITTEN_BYTES, "disk" => d.clone()),
            copy_ratio: metrics::gauge!(m::COPY_RATIO, "disk" => d.clone()),
            copy_bytes: metrics::counter!(m::COPY_BYTES, "disk" => d.clone()),
            dirty_bytes: metrics::gauge!(m::DIRTY_BYTES, "disk" => d.clone()),
            overflow: metrics::gauge!(m::OVERFLOW, "disk" => d.clone()),
            resync_bytes: metrics::counter!(m::RESYNC_BYTES, "disk" => d.clone()),
            disk_syncs: metrics::counter!(m::DISK_SYNCS, "disk" => d),
        }
    }
}

fn to_backend(e: JournalError) -> BackendError {
    match e {
        JournalError::Io { source, .. } if source.raw_os_error() == Some(libc::ENOSPC) => {
            BackendError::NoSpace(source.to_string())
        }
        JournalError::Io { source, .. } => BackendError::Io(source),
        e @ JournalError::Corrupt { .. } => BackendError::Io(std::io::Error::other(e.to_string())),
    }
}

impl ProtectedDisk {
    /// Opens the disk and its journal under `state_dir`, and redoes journaled changes onto the disk.
    /// `dirty_block` is the dirty map's block size.
    pub fn open(
        id: DiskId,
        name: &str,
        path: &Path,
        state_dir: &Path,
        dirty_block: u64,
        scan: Option<(u64, u64)>,
    ) -> anyhow::Result<ProtectedDisk> {
        use anyhow::Context;
        let disk = DiskFile::open(path, true).with_context(|| format!("opening protected disk {}", path.display()))?;
        let jdir = state_dir.join(format!("journal-{}", id.0));
        let journal = Journal::open(&jdir).with_context(|| format!("opening journal {}", jdir.display()))?;
        let capture = if scan.is_some() { Capture::Scan } else { Capture::Nbd };
        let mut redone = 0u64;
        let mut failed = None;
        let redo = mode::redo_from(capture, journal.on_disk()).map(|from| from.max(journal.first_seq()));
        let segments = if redo.is_some() { journal.segments() } else { Vec::new() };
        journal::read_from(&segments, redo.unwrap_or(Seq::ZERO), |rec| {
            let r = match &rec.op {
                Op::Write { offset, data } => disk.write_at(*offset, data),
                Op::Zero { offset, len } => disk.zero(*offset, *len),
                Op::Marker { .. } => Ok(()),
            };
            redone += u64::from(!matches!(rec.op, Op::Marker { .. }));
            if let Err(e) = r {
                failed = Some(e);
                return false;
            }
            true
        })?;
        if let Some(e) = failed {
            return Err(e).with_context(|| format!("redoing journaled changes onto {}", path.display()));
        }
        disk.sync().with_context(|| format!("syncing {}", path.display()))?;
        let mut journal = journal;
        if !journal.sealed() {
            // Every record is on the disk for good now: redone and synced (a FLUSH made only the journal
            // durable), or, for a scanned disk, copies never newer than the disk. The next open redoes
            // nothing again, and capturing a scanned disk through NBD later never redoes its records
            // over the machine's own writes.
            journal
                .mark_on_disk()
                .with_context(|| format!("recording the journal of {} as on the disk", path.display()))?;
        }
        if redone > 0 {
            tracing::info!(disk = name, redone, after = journal.on_disk().0, "redid journaled changes onto the disk");
        }
        let DiskState { copy, resync } = DiskState::load(state_dir, id, disk.size())
            .with_context(|| format!("the state of disk {name} in {}", state_dir.display()))?;
        let mut copy = copy;
        if copy.generation == 0 && copy.item.is_none() {
            // A disk a failover commit handed over: from now on its writes are what a reprotect ships.
            match sr_common::split::Split::read(path, disk.size()) {
                Ok(Some(s)) => {
                    tracing::info!(
                        disk = name,
                        generation = s.generation,
                        "failed-over disk: tracking writes since the failover"
                    );
                    copy.generation = s.generation;
                }
                Ok(None) => {}
                Err(e) => tracing::error!(disk = name, error = e, "ignoring the disk's split record"),
            }
        }
        if copy.disk_size != disk.size() {
            anyhow::bail!(
                "disk {} is now {} bytes but was {} when protection began; resize needs a new protection",
                path.display(),
                disk.size(),
                copy.disk_size
            );
        }
        // A scanned disk tracks dirty blocks at its scan block size.
        let dirty_block = scan.map_or(dirty_block, |(block, _)| block);
        let dirty = DirtyMap::open(&state_dir.join(format!("dirty-{}.map", id.0)), disk.size(), dirty_block)?;
        let scan_map = match scan {
            Some((block, _)) => {
                Some(Mutex::new(ScanMap::open(&state_dir.join(format!("scan-{}.map", id.0)), disk.size(), block)?))
            }
            None => None,
        };
        if dirty.count() > 0 {
            tracing::info!(disk = name, dirty_bytes = dirty.dirty_bytes(), "dirty blocks left to copy");
        }
        let pd = ProtectedDisk {
            id,
            name: name.to_string(),
            disk,
            journal: Mutex::new(journal),
            appended: tokio::sync::Notify::new(),
            acked: AtomicU64::new(0),
            applied: AtomicU64::new(0),
            changed_bytes: AtomicU64::new(0),
            // A disk parted from its peer at a failover and not protected since tracks its writes in the
            // dirty map from the first one; any other starts journaling until told otherwise.
            mode: std::sync::atomic::AtomicU8::new({
                let protected = copy.generation == 0 || copy.item.is_some();
                match (copy.stopped, protected) {
                    (true, protected) => Mode::Stopped { protected },
                    (false, true) => Mode::Journaling,
                    (false, false) => Mode::Tracking,
                }
                .as_u8()
            }),
            copy: Mutex::new(copy),
            dirty: Mutex::new(dirty),
            scan: scan_map,
            scan_interval: AtomicU64::new(scan.map_or(0, |(_, i)| i)),
            resync: Mutex::new(resync),
            state_path: Mutex::new(state_dir.join(format!("disk-{}.state", id.0))),
            resync_wake: tokio::sync::Notify::new(),
            window: Mutex::new(None),
            resync_now: std::sync::atomic::AtomicBool::new(false),
            journal_trouble: std::sync::atomic::AtomicBool::new(false),
            fatal: Mutex::new(None),
            hold_gate: std::sync::RwLock::new(()),
            limit: AtomicU64::new(u64::MAX),
            disk_syncs: AtomicU64::new(0),
            disk_behind: DiskBehind::default(),
            disk_failed: AtomicBool::new(false),
            group: Default::default(),
            group_done: Default::default(),
            journal_syncs: AtomicU64::new(0),
            metrics: DiskMetrics::new(name),
        };
        if pd.copy_state().done && pd.mode().protected() && !pd.scanned() {
            // Blocks left to copy in block order keep (or open) the window; the journal knows whether one
            // was open before the restart, and the copy loop closes it once nothing is left.
            let mut j = pd.lock();
            if pd.dirty_bytes() > 0 || pd.resync_state().active() {
                j.note_bypass();
            }
        }
        pd.publish();
        Ok(pd)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Journal> {
        self.journal.lock().expect("journal lock poisoned")
    }

    fn publish(&self) {
        let j = self.lock();
        let (last, bytes) = (j.last_seq(), j.bytes());
        drop(j);
        self.publish_with(last, bytes);
    }

    fn publish_with(&self, last: Seq, bytes: u64) {
        let acked = self.acked.load(Ordering::Relaxed);
        self.metrics.dirty_bytes.set(self.dirty_bytes() as f64);
        self.metrics.overflow.set(if self.overflowed() { 1.0 } else { 0.0 });
        self.metrics.journal_bytes.set(bytes as f64);
        self.metrics.last_seq.set(last.0 as f64);
        self.metrics.acked.set(acked as f64);
        self.metrics.lag.set(last.0.saturating_sub(acked) as f64);
    }

    pub fn size(&self) -> u64 {
        self.disk.size()
    }

    /// A snapshot of the journal's segments, for the shipper to read outside the lock.
    pub fn segments(&self) -> Vec<journal::Segment> {
        self.lock().segments()
    }

    /// [`Self::segments`] with the journal's incarnation they belong to.
    pub fn journal_snapshot(&self) -> (u64, Vec<journal::Segment>) {
        let j = self.lock();
        (j.incarnation(), j.segments())
    }

    /// The journal's incarnation now: it changes each time a new protection starts it over.
    pub fn journal_incarnation(&self) -> u64 {
        self.lock().incarnation()
    }

    pub fn first_seq(&self) -> Seq {
        self.lock().first_seq()
    }
    pub fn last_seq(&self) -> Seq {
        self.lock().last_seq()
    }
    pub fn journal_bytes(&self) -> u64 {
        self.lock().bytes()
    }
    /// About how many bytes of journal records follow `after` (see [`journal::Journal::bytes_after`]).
    pub fn bytes_after(&self, after: Seq) -> u64 {
        self.lock().bytes_after(after)
    }
    pub fn acked(&self) -> Seq {
        Seq(self.acked.load(Ordering::Relaxed))
    }
    pub fn copy_state(&self) -> CopyState {
        *self.copy.lock().expect("copy lock poisoned")
    }

    /// The process server holds everything through `through` durably (this paces shipping).
    pub fn on_durable_ack(&self, through: Seq) {
        self.acked.fetch_max(through.0, Ordering::Relaxed);
        self.publish();
    }

    /// The master target applied everything through `through`: drop it from the journal. Changes are
    /// kept until then, not only until a process server cached them, so that losing a process server
    /// (and its cache) loses nothing: the next one is sent them again from here.
    pub fn on_applied_ack(&self, through: Seq) -> Result<(), JournalError> {
        self.applied.fetch_max(through.0, Ordering::Relaxed);
        let mut j = self.lock();
        j.set_urgent(self.journal_trouble.load(Ordering::Acquire));
        if j.trims_anything(through) && j.on_disk() < through.min(j.last_seq()) {
            // What leaves the journal must be on the disk for good: after a power loss a restart could
            // no longer redo it, and the replica (which has it) would stay ahead of the disk.
            self.sync_disk().map_err(|source| JournalError::Io { path: self.disk.path().to_path_buf(), source })?;
            j.mark_on_disk()?;
        }
        let freed = j.trim_through(through)?;
        if freed > 0 || through >= j.last_seq() {
            // Space came back, or everything is applied: the journal is tried again.
            self.journal_trouble.store(false, Ordering::Release);
        }
        self.drained(&j);
        drop(j);
        if freed > 0 {
            tracing::debug!(disk = self.name, freed, through = through.0, "journal trimmed");
        }
        self.publish();
        Ok(())
    }

    /// Whether the disk is protected: its changes are journaled and shipped (also while the journal is
    /// past its limit, and while a planned failover's stop drains it).
    pub fn journaling(&self) -> bool {
        self.mode().protected()
    }

    /// Shipping stopped for good (`Some`: its code and reason), or goes on (`None`).
    pub fn set_fatal(&self, f: Option<(sr_common::wire::ErrorCode, String)>) {
        *self.fatal.lock().expect("fatal lock poisoned") = f;
    }

    pub fn fatal(&self) -> Option<(sr_common::wire::ErrorCode, String)> {
        self.fatal.lock().expect("fatal lock poisoned").clone()
    }

    /// Every journal record up to this one is known to be on the disk (a restart redoes only later ones).
    pub fn redo_mark(&self) -> Seq {
        self.lock().on_disk()
    }

    pub fn mode(&self) -> Mode {
        Mode::from_u8(self.mode.load(Ordering::Acquire))
    }

    /// Changes the mode; the journal's lock, held by the caller, orders it with every change.
    fn set_mode(&self, _j: &Journal, m: Mode) {
        let old = Mode::from_u8(self.mode.swap(m.as_u8(), Ordering::AcqRel));
        if old == m {
            return;
        }
        match (old, m) {
            (Mode::Overflow, Mode::Journaling) => {
                tracing::info!(disk = self.name, "journal drained: journaling again, dirty blocks follow")
            }
            (_, Mode::Overflow) => tracing::warn!(
                disk = self.name,
                limit = self.limit.load(Ordering::Relaxed),
                "journal reached its limit (or its volume is full): tracking changed blocks in the dirty map; \
                 they are resynchronized later"
            ),
            (old, new) => tracing::debug!(disk = self.name, from = old.name(), to = new.name(), "disk mode changed"),
        }
    }

    /// Ends the dirty map's turn once the journal drained to half its limit.
    fn drained(&self, j: &Journal) {
        if self.journal_trouble.load(Ordering::Acquire) {
            return;
        }
        let m = self.mode();
        let next = m.after_drain(j.bytes_after(self.applied()), self.limit.load(Ordering::Relaxed));
        if next != m {
            self.set_mode(j, next);
        }
    }

    /// Whether changes are captured by scanning (no NBD front end).
    pub fn scanned(&self) -> bool {
        self.scan.is_some()
    }

    /// Reads `buf` at `offset` under the journal's lock: the disk at one sequence number.
    pub fn read_consistent(&self, offset: u64, buf: &mut [u8]) -> std::io::Result<()> {
        let _j = self.lock();
        self.disk.read_at(offset, buf)
    }

    /// Block size of the dirty map and of checksum comparisons.
    pub fn dirty_block(&self) -> u64 {
        self.dirty.lock().expect("dirty lock poisoned").block()
    }

    pub fn disk_file(&self) -> &DiskFile {
        &self.disk
    }

    /// The journal's limit in bytes (`u64::MAX` until one is set).
    pub fn limit(&self) -> u64 {
        self.limit.load(Ordering::Relaxed)
    }

    /// Sets the journal's limit in bytes.
    pub fn set_limit(&self, bytes: u64) {
        self.limit.store(bytes.max(1), Ordering::Relaxed);
        self.metrics.journal_limit.set(bytes.max(1) as f64);
    }

    /// Ends the dirty map's turn once the journal drained to half its limit (also when no change
    /// arrives to notice it).
    pub fn recheck_overflow(&self) {
        if self.journal_trouble.load(Ordering::Acquire) {
            // The journal's volume is full: give back what is applied now, not at the next
            // acknowledgement (none may come while nothing new can be journaled).
            if let Err(e) = self.on_applied_ack(self.applied()) {
                tracing::warn!(disk = self.name, error = %e, "giving back applied journal space failed");
            }
        }
        if self.overflowed() {
            let j = self.lock();
            self.drained(&j);
        }
    }

    /// Bytes of journal the master target has not applied yet.
    pub fn pending_bytes(&self) -> u64 {
        self.lock().bytes_after(self.applied())
    }

    pub fn overflowed(&self) -> bool {
        self.mode() == Mode::Overflow
    }

    pub fn dirty_bytes(&self) -> u64 {
        self.dirty.lock().expect("dirty lock poisoned").dirty_bytes()
    }

    /// Marks the whole disk dirty: its history is lost, every block is copied again.
    pub fn mark_all_dirty(&self) -> std::io::Result<()> {
        let mut j = self.lock();
        self.note_bypass(&mut j);
        self.dirty.lock().expect("dirty lock poisoned").mark_all()
    }

    /// Marks ranges dirty (the result of a checksum comparison).
    pub fn mark_dirty(&self, ranges: &[(u64, u64)]) -> std::io::Result<()> {
        let mut j = self.lock();
        self.mark_dirty_locked(&mut j, ranges)
    }

    /// Blocks the replica lacks will be copied in block order: the stream's points stop being
    /// crash-consistent from the next record until they are all copied (a scanned disk's stream never
    /// was, between scans, and carries no window).
    fn note_bypass(&self, j: &mut Journal) {
        if !self.scanned() {
            j.note_bypass();
        }
    }

    /// Closes the block-order window once nothing is left to copy in block order: no dirty block, no
    /// comparison running, the journal taking changes again. Called periodically by the copy loop.
    pub fn close_window_if_caught_up(&self) -> Result<(), JournalError> {
        let m = self.mode();
        if !m.protected() || m == Mode::Overflow || self.dirty_bytes() > 0 || self.resync_state().active() {
            return Ok(());
        }
        let mut j = self.lock();
        // Checked again under the lock: a comparison or a bypass may have begun meanwhile.
        let m = self.mode();
        if !j.in_window()
            || self.dirty_bytes() > 0
            || !m.protected()
            || m == Mode::Overflow
            || self.resync_state().active()
        {
            return Ok(());
        }
        let end = j.end_window()?;
        drop(j);
        if let Some(seq) = end {
            tracing::info!(
                disk = self.name,
                seq = seq.0,
                "every dirty block copied: points are crash-consistent again"
            );
            self.after_append();
        }
        Ok(())
    }

    /// [`Self::mark_dirty`] for a caller that holds the journal's lock.
    fn mark_dirty_locked(&self, j: &mut Journal, ranges: &[(u64, u64)]) -> std::io::Result<()> {
        if !ranges.is_empty() {
            self.note_bypass(j);
        }
        let mut d = self.dirty.lock().expect("dirty lock poisoned");
        for (o, l) in ranges {
            d.mark(*o, *l)?;
        }
        Ok(())
    }

    /// Bytes written or zeroed through the front end since the agent started.
    pub fn changed_bytes(&self) -> u64 {
        self.changed_bytes.load(Ordering::Relaxed)
    }

    pub fn applied(&self) -> Seq {
        Seq(self.applied.load(Ordering::Relaxed))
    }

    /// The journal, locked: for markers that must land on several disks at one moment.
    pub fn lock_journal(&self) -> std::sync::MutexGuard<'_, Journal> {
        self.lock()
    }

    /// To call after appending through [`Self::lock_journal`].
    pub fn after_marker(&self) {
        self.after_append();
    }

    fn after_append(&self) {
        self.appended.notify_one();
        self.publish();
    }

    /// [`Self::after_append`] with the journal figures read under the lock the caller already held.
    fn after_append_with(&self, last: Seq, bytes: u64) {
        self.appended.notify_one();
        self.publish_with(last, bytes);
    }

    /// Appends a consistency marker (for example an app-consistent tag) to the stream.
    pub fn mark(&self, kind: MarkerKind) -> Result<Seq, JournalError> {
        let seq = self.lock().append(&Op::Marker { kind })?;
        self.after_append();
        Ok(seq)
    }
}

impl Backend for ProtectedDisk {
    fn size(&self) -> u64 {
        self.disk.size()
    }
    fn read_only(&self) -> bool {
        false
    }
    fn read(&self, offset: u64, buf: &mut [u8]) -> Result<(), BackendError> {
        Ok(self.disk.read_at(offset, buf)?)
    }
    fn write(&self, offset: u64, data: &[u8], fua: bool) -> Result<(), BackendError> {
        self.change(Operation::Write { len: data.len() as u64 }, offset, Some(data), fua)
    }
    fn zero(&self, offset: u64, len: u64, fua: bool) -> Result<(), BackendError> {
        self.change(Operation::WriteZeroes { len }, offset, None, fua)
    }
    fn zero_allocated(&self, offset: u64, len: u64, fua: bool) -> Result<(), BackendError> {
        self.change_zeroing(Operation::WriteZeroes { len }, offset, None, fua, true)
    }
    fn trim(&self, offset: u64, len: u64, fua: bool) -> Result<(), BackendError> {
        self.change(Operation::Trim { len }, offset, None, fua)
    }
    fn flush(&self) -> Result<(), BackendError> {
        self.change(Operation::Flush, 0, None, false)
    }
    fn extents(&self, offset: u64, len: u64, max: usize) -> Result<Vec<sr_common::nbd::Extent>, BackendError> {
        // Holes read as zeroes: trimming and zeroing punch them.
        Ok(self.disk.extents(offset, len, max))
    }
}

impl ProtectedDisk {
    /// Carries out [`mode::route`]'s decision for one front-end operation: `data` for a write, none for
    /// zeroing, trimming (both make the range read as zeroes) and flushing.
    fn change(&self, op: Operation, offset: u64, data: Option<&[u8]>, fua: bool) -> Result<(), BackendError> {
        self.change_zeroing(op, offset, data, fua, false)
    }

    /// [`Self::change`]; `allocated`: a zeroed range stays allocated on the disk (NBD's NO_HOLE). The
    /// journal and the replica only need it to read as zeroes.
    fn change_zeroing(
        &self,
        op: Operation,
        offset: u64,
        data: Option<&[u8]>,
        fua: bool,
        allocated: bool,
    ) -> Result<(), BackendError> {
        let len = match op {
            Operation::Write { len } | Operation::WriteZeroes { len } | Operation::Trim { len } => len,
            Operation::Flush => 0,
        };
        let to_disk = |this: &Self| -> std::io::Result<()> {
            match data {
                Some(d) => this.disk.write_at(offset, d),
                None if allocated => this.disk.zero_allocated(offset, len),
                None => this.disk.zero(offset, len),
            }
        };
        let _gate = (op != Operation::Flush).then(|| self.gate());
        let mut j = self.lock();
        let mut view = JournalView {
            pending: j.bytes_after(self.applied()),
            limit: self.limit.load(Ordering::Relaxed),
            sealed: j.sealed(),
            append_failed: self.journal_trouble.load(Ordering::Acquire),
            disk_behind: self.disk_behind.behind() || j.failed(),
        };
        let appended = loop {
            let d = mode::route(self.mode(), op, view);
            if d.seal {
                self.seal(&mut j)?;
            }
            self.set_mode(&j, d.mode);
            match d.route {
                Route::Refuse => {
                    return Err(BackendError::Shutdown(format!(
                        "disk {} was stopped for a failover; it runs on the other site now",
                        self.name
                    )))
                }
                Route::FlushDisk => {
                    drop(j);
                    return Ok(self.sync_disk()?);
                }
                Route::FlushJournal | Route::FlushBoth => {
                    if let Err(e) = j.append(&Op::Marker { kind: MarkerKind::Flush }) {
                        self.journal_failed(&e);
                        view = JournalView { sealed: j.sealed(), append_failed: true, ..view };
                        continue;
                    }
                    // The append may have closed a segment, and that fsync may have failed.
                    let disk_too = d.route == Route::FlushBoth || j.failed();
                    let (last, bytes, marker) = (j.last_seq(), j.bytes(), (j.incarnation(), j.last_seq()));
                    drop(j);
                    self.after_append_with(last, bytes);
                    // The journal is the durability point: every acknowledged change is in it, and the
                    // redo rule puts whatever the disk lost back at the next open. The disk is made
                    // durable behind it, before records leave the journal (`on_applied_ack`) and before
                    // a change bypasses it (the seal), so a FLUSH costs one fsync, not two, and
                    // concurrent FLUSHes share it.
                    self.sync_journal_through(marker)?;
                    if disk_too {
                        self.sync_disk()?;
                    }
                    return Ok(());
                }
                Route::Disk | Route::Dirty => {
                    if d.mode == Mode::Overflow {
                        self.note_bypass(&mut j);
                    }
                    if d.route == Route::Dirty {
                        self.dirty.lock().expect("dirty lock poisoned").mark(offset, len)?;
                    }
                    let r = to_disk(self);
                    // Not in the journal: only a sync of the disk makes it durable. Counted once the
                    // write is in (a sync that starts earlier must not count it as covered), and also
                    // when it failed part way.
                    self.disk_behind.changed();
                    r?;
                    break false;
                }
                Route::Journal => {
                    let r = match data {
                        Some(d) => j.append_write(offset, d),
                        None => j.append(&Op::Zero { offset, len }),
                    };
                    if let Err(e) = r {
                        // The journal cannot take it (its volume is full, or it failed): the dirty map
                        // does, and the change is never refused for it.
                        self.journal_failed(&e);
                        view = JournalView { sealed: j.sealed(), append_failed: true, ..view };
                        continue;
                    }
                    if let Err(e) = to_disk(self) {
                        // The journal holds a change the disk may not: have the disk's real contents
                        // shipped after it (in block order), so the replica ends as the disk is.
                        let _ = self.dirty.lock().expect("dirty lock poisoned").mark(offset, len);
                        self.note_bypass(&mut j);
                        return Err(e.into());
                    }
                    break true;
                }
            }
        };
        let (last, bytes) = (j.last_seq(), j.bytes());
        drop(j);
        self.changed_bytes.fetch_add(len, Ordering::Relaxed);
        if data.is_some() {
            self.metrics.written.increment(len);
        }
        if appended {
            self.after_append_with(last, bytes);
        } else {
            self.publish();
        }
        if fua {
            self.flush()?;
        }
        Ok(())
    }

    /// An append failed: changes go to the dirty map until the journal frees space.
    fn journal_failed(&self, e: &JournalError) {
        if !self.journal_trouble.swap(true, Ordering::AcqRel) {
            tracing::error!(
                disk = self.name,
                error = %e,
                "the journal cannot take changes: tracking them in the dirty map until it frees space"
            );
        }
    }

    /// The redo rule's seal (see `mode.rs`): the disk and the journal durable, and the redo mark at the
    /// journal's newest record, before a change reaches the disk without a journal record.
    fn seal(&self, j: &mut Journal) -> Result<(), BackendError> {
        self.sync_disk()?;
        j.mark_on_disk().map_err(to_backend)?;
        tracing::debug!(disk = self.name, through = j.on_disk().0, "journaled changes sealed onto the disk");
        Ok(())
    }

    /// Makes the disk durable (counted: a FLUSH while journaling leaves the disk to these checkpoints).
    pub(super) fn sync_disk(&self) -> std::io::Result<()> {
        if self.disk_failed.load(Ordering::Acquire) {
            return Err(std::io::Error::other(format!(
                "an earlier sync of {} failed; restart the agent to redo its journal onto it",
                self.disk.path().display()
            )));
        }
        // What changed before this point is covered once the sync ends, not before: a FLUSH meanwhile
        // still sees the disk behind and syncs it itself.
        let upto = self.disk_behind.sync_starts();
        if let Err(e) = self.disk.sync() {
            self.disk_failed.store(true, Ordering::Release);
            tracing::error!(disk = self.name, error = %e, "syncing the disk failed: no change counts as durable until a restart");
            return Err(e);
        }
        self.disk_behind.synced(upto);
        self.disk_syncs.fetch_add(1, Ordering::Relaxed);
        self.metrics.disk_syncs.increment(1);
        Ok(())
    }

    /// Makes the journal durable through `marker` (its incarnation and sequence number), sharing an
    /// fsync with concurrent FLUSHes ([`crate::group_sync`]).
    fn sync_journal_through(&self, marker: crate::group_sync::Pos) -> std::io::Result<()> {
        use crate::group_sync::Next;
        let mut g = self.group.lock().expect("group sync lock poisoned");
        loop {
            match g.next(marker) {
                Next::Done => return Ok(()),
                Next::Failed => {
                    return Err(std::io::Error::other(format!(
                        "an fsync of the journal of {} failed; restart the agent",
                        self.disk.path().display()
                    )))
                }
                Next::Wait => g = self.group_done.wait(g).expect("group sync lock poisoned"),
                Next::Start => {
                    drop(g);
                    // Everything appended before this point is covered: closed segments were synced
                    // when they were closed, and this is the active one.
                    let (upto, handle, closed_ok) = {
                        let j = self.lock();
                        ((j.incarnation(), j.last_seq()), j.sync_handle(), !j.failed())
                    };
                    // A segment closed since the marker whose fsync failed holds it: not durable.
                    let r = if closed_ok {
                        handle.sync_data()
                    } else {
                        Err(std::io::Error::other("an fsync of a closed journal segment failed"))
                    };
                    self.journal_syncs.fetch_add(1, Ordering::Relaxed);
                    if let Err(e) = &r {
                        self.lock().fail(format!("a FLUSH's fsync of the journal failed ({e}); restart the agent"));
                    }
                    g = self.group.lock().expect("group sync lock poisoned");
                    g.finished(upto, r.is_ok());
                    self.group_done.notify_all();
                    r?;
                }
            }
        }
    }

    /// Fsyncs of the journal that FLUSHes ran since the disk was opened.
    pub fn journal_syncs(&self) -> u64 {
        self.journal_syncs.load(Ordering::Relaxed)
    }

    /// How many times the disk was made durable since it was opened.
    pub fn disk_syncs(&self) -> u64 {
        self.disk_syncs.load(Ordering::Relaxed)
    }

    /// Drops every record of the journal (a new protection, or none), after sealing: a FLUSH made its
    /// changes durable in the journal only, so the disk must hold them for good before they go.
    fn drop_journal(&self, j: &mut Journal) -> anyhow::Result<()> {
        if !j.sealed() {
            use anyhow::Context;
            self.seal(j).context("making the disk durable before dropping its journal")?;
        }
        j.reset()?;
        Ok(())
    }
}

/// Counts the changes whose durability only a sync of the disk gives (they bypassed the journal) and
/// what finished syncs covered. Concurrent FLUSHes each see the disk behind until a sync that started
/// after their changes has ended: a flag cleared when a sync starts would let a second FLUSH return
/// while the first one's sync is still running.
#[derive(Default)]
struct DiskBehind {
    changes: AtomicU64,
    covered: AtomicU64,
}

impl DiskBehind {
    /// A change that only a sync of the disk makes durable reached it.
    fn changed(&self) {
        self.changes.fetch_add(1, Ordering::AcqRel);
    }

    /// Whether such a change is not yet covered by a finished sync.
    fn behind(&self) -> bool {
        self.covered.load(Ordering::Acquire) < self.changes.load(Ordering::Acquire)
    }

    /// A sync starts: it will cover what changed before now.
    fn sync_starts(&self) -> u64 {
        self.changes.load(Ordering::Acquire)
    }

    /// The sync started at `upto` finished.
    fn synced(&self, upto: u64) {
        self.covered.fetch_max(upto, Ordering::AcqRel);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_sync_of_the_disk_covers_a_change_only_once_it_ends() {
        let b = DiskBehind::default();
        assert!(!b.behind());
        b.changed();
        let first = b.sync_starts();
        // A FLUSH while that sync runs still syncs the disk: the change is not durable yet.
        assert!(b.behind());
        b.changed();
        let second = b.sync_starts();
        b.synced(first);
        assert!(b.behind(), "the second change came after the first sync started");
        b.synced(second);
        assert!(!b.behind());
        // A sync that started earlier and ends later covers nothing newer.
        b.changed();
        b.synced(first);
        assert!(b.behind());
    }

    fn disk(dir: &Path, name: &str, size: u64) -> PathBuf {
        let p = dir.join(name);
        std::fs::File::create(&p).unwrap().set_len(size).unwrap();
        p
    }

    fn read(pd: &ProtectedDisk, offset: u64) -> Vec<u8> {
        let mut b = vec![0u8; 4096];
        pd.read(offset, &mut b).unwrap();
        b
    }

    #[test]
    fn a_restart_redoes_a_journaled_write_the_disk_lacks() {
        let d = tempfile::tempdir().unwrap();
        let path = disk(d.path(), "source.img", 1 << 20);
        let state = d.path().join("state");
        let pd = ProtectedDisk::open(DiskId(1), "d", &path, &state, 4096, None).unwrap();
        pd.protect(3).unwrap();
        // Killed between the journal append and the disk write.
        pd.lock_journal().append_write(8192, &[5u8; 4096]).unwrap();
        drop(pd);
        let pd = ProtectedDisk::open(DiskId(1), "d", &path, &state, 4096, None).unwrap();
        assert_eq!(read(&pd, 8192), vec![5u8; 4096], "the journal's change was redone");
    }

    /// A FLUSH while journaling makes the journal durable and not the disk: the disk may lose what
    /// was flushed (a power loss takes its page cache), and the next open puts it back from the journal,
    /// once.
    #[test]
    fn a_flush_is_durable_in_the_journal_and_the_disk_is_redone_from_it() {
        let d = tempfile::tempdir().unwrap();
        let path = disk(d.path(), "source.img", 1 << 20);
        let state = d.path().join("state");
        let pd = ProtectedDisk::open(DiskId(1), "d", &path, &state, 4096, None).unwrap();
        pd.protect(3).unwrap();
        pd.write(8192, &[5u8; 4096], false).unwrap();
        pd.zero(16384, 4096, false).unwrap();
        pd.write(65536, &[6u8; 4096], true).unwrap();
        pd.flush().unwrap();
        assert_eq!(pd.disk_syncs(), 0, "a FLUSH while journaling synced the disk");
        assert_eq!(pd.redo_mark(), Seq::ZERO);
        drop(pd);
        // The power loss: the disk lost every change since it was last durable (it never was).
        let f = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
        std::os::unix::fs::FileExt::write_all_at(&f, &[9u8; 3 << 12], 8192).unwrap();
        std::os::unix::fs::FileExt::write_all_at(&f, &[0u8; 4096], 65536).unwrap();
        drop(f);
        let pd = ProtectedDisk::open(DiskId(1), "d", &path, &state, 4096, None).unwrap();
        assert_eq!(read(&pd, 8192), vec![5u8; 4096], "a flushed write was lost");
        assert_eq!(read(&pd, 16384), vec![0u8; 4096], "a flushed zeroing was lost");
        assert_eq!(read(&pd, 65536), vec![6u8; 4096], "a FUA write was lost");
        assert_eq!(pd.redo_mark(), pd.last_seq(), "what was redone is on the disk for good");
        // Redone once: a write the machine makes past the journal later is never undone by it.
        drop(pd);
        let f = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
        std::os::unix::fs::FileExt::write_all_at(&f, &[7u8; 4096], 8192).unwrap();
        drop(f);
        let pd = ProtectedDisk::open(DiskId(1), "d", &path, &state, 4096, None).unwrap();
        assert_eq!(read(&pd, 8192), vec![7u8; 4096]);
    }

    /// FLUSHes from many connections at once all return, each after an fsync that started after its
    /// marker; they share fsyncs rather than run one each.
    #[test]
    fn concurrent_flushes_all_finish_and_share_fsyncs() {
        let d = tempfile::tempdir().unwrap();
        let path = disk(d.path(), "source.img", 8 << 20);
        let pd = ProtectedDisk::open(DiskId(1), "d", &path, &d.path().join("state"), 4096, None).unwrap();
        pd.protect(3).unwrap();
        let (threads, rounds) = (8u64, 25u64);
        std::thread::scope(|s| {
            for t in 0..threads {
                let pd = &pd;
                s.spawn(move || {
                    for r in 0..rounds {
                        pd.write((t * rounds + r) * 4096, &[t as u8 + 1; 4096], false).unwrap();
                        pd.flush().unwrap();
                    }
                });
            }
        });
        assert!(pd.journal_syncs() <= threads * rounds);
        assert_eq!(pd.disk_syncs(), 0);
        for t in 0..threads {
            assert_eq!(read(&pd, t * rounds * 4096), vec![t as u8 + 1; 4096]);
        }
    }

    /// Changes that bypassed the journal (past its limit, or unprotected) are durable only once the disk
    /// is: the first FLUSH after them syncs the disk too, also once the disk journals again.
    #[test]
    fn a_flush_after_changes_that_bypassed_the_journal_syncs_the_disk_too() {
        let d = tempfile::tempdir().unwrap();
        let path = disk(d.path(), "source.img", 1 << 20);
        let state = d.path().join("state");
        let pd = ProtectedDisk::open(DiskId(1), "d", &path, &state, 4096, None).unwrap();
        pd.protect(3).unwrap();
        pd.set_limit(8192);
        pd.write(0, &[1u8; 4096], false).unwrap();
        pd.write(65536, &[2u8; 16384], false).unwrap();
        assert_eq!(pd.mode(), Mode::Overflow);
        // Journaling again before any FLUSH: the overflowed write is in no journal record.
        pd.set_limit(1 << 30);
        pd.write(4096, &[3u8; 4096], false).unwrap();
        assert_eq!(pd.mode(), Mode::Journaling);
        let before = pd.disk_syncs();
        pd.flush().unwrap();
        assert!(pd.disk_syncs() > before, "a FLUSH left a write that bypassed the journal in the page cache");
        // Once durable, FLUSHes go back to syncing the journal only.
        let before = pd.disk_syncs();
        pd.write(8192, &[4u8; 4096], false).unwrap();
        pd.flush().unwrap();
        assert_eq!(pd.disk_syncs(), before);

        // Unprotected, then protected: the first FLUSH syncs the disk.
        pd.unprotect().unwrap();
        pd.write(0, &[5u8; 4096], false).unwrap();
        pd.protect(4).unwrap();
        let before = pd.disk_syncs();
        pd.write(4096, &[6u8; 4096], true).unwrap();
        assert!(pd.disk_syncs() > before, "a FUA write after unprotected writes left them in the page cache");
    }

    /// Protection starting over, ending, or reprotect drops the journal: the disk holds its records for
    /// good first, as a FLUSH left them in the journal only.
    #[test]
    fn the_journal_is_dropped_only_once_the_disk_holds_its_records_for_good() {
        let d = tempfile::tempdir().unwrap();
        let path = disk(d.path(), "source.img", 1 << 20);
        let state = d.path().join("state");
        let pd = ProtectedDisk::open(DiskId(1), "d", &path, &state, 4096, None).unwrap();
        type Drop = fn(&ProtectedDisk);
        let drops: [(&str, Drop); 3] = [
            ("unprotect", |pd| pd.unprotect().unwrap()),
            ("protect as another item", |pd| pd.protect(4).unwrap()),
            ("reprotect", |pd| {
                pd.reprotect(5, 0).unwrap();
            }),
        ];
        for (what, drop_it) in drops {
            pd.protect(3).unwrap();
            pd.write(0, &[1u8; 4096], false).unwrap();
            pd.flush().unwrap();
            let before = pd.disk_syncs();
            drop_it(&pd);
            assert!(pd.disk_syncs() > before, "{what} dropped flushed records before the disk held them");
            pd.unprotect().unwrap();
        }
    }

    #[test]
    fn a_restart_never_redoes_a_record_overwritten_past_the_limit_or_while_tracking() {
        let d = tempfile::tempdir().unwrap();
        let path = disk(d.path(), "source.img", 1 << 20);
        let state = d.path().join("state");
        let pd = ProtectedDisk::open(DiskId(1), "d", &path, &state, 4096, None).unwrap();
        pd.protect(3).unwrap();
        pd.set_limit(64 << 10);
        pd.write(0, &[1u8; 4096], false).unwrap();
        pd.zero(4096, 4096, false).unwrap();
        pd.flush().unwrap();
        pd.write(65536, &[9u8; 65536], false).unwrap();
        assert_eq!(pd.mode(), Mode::Overflow);
        pd.write(0, &[2u8; 4096], false).unwrap();
        pd.write(4096, &[3u8; 4096], false).unwrap();
        pd.flush().unwrap();
        drop(pd);
        let pd = ProtectedDisk::open(DiskId(1), "d", &path, &state, 4096, None).unwrap();
        assert_eq!(read(&pd, 0), vec![2u8; 4096], "a journaled write was redone over a newer one");
        assert_eq!(read(&pd, 4096), vec![3u8; 4096], "a journaled zeroing was redone over a newer write");
        // The journal drains: journaling again, a new record after the mark, then the journal overflows
        // once more and the same block is written past it.
        pd.set_limit(64 << 10);
        pd.on_applied_ack(pd.last_seq()).unwrap();
        pd.write(0, &[4u8; 4096], false).unwrap();
        assert_eq!(pd.mode(), Mode::Journaling);
        let mut at = 65536;
        while pd.mode() == Mode::Journaling {
            pd.write(at, &[8u8; 16 << 10], false).unwrap();
            at += 16 << 10;
        }
        pd.write(0, &[5u8; 4096], false).unwrap();
        assert_eq!(pd.mode(), Mode::Overflow);
        pd.trim(0, 4096, false).unwrap();
        assert_eq!(pd.mode(), Mode::Overflow);
        drop(pd);
        let pd = ProtectedDisk::open(DiskId(1), "d", &path, &state, 4096, None).unwrap();
        assert_eq!(read(&pd, 0), vec![0u8; 4096], "the trim past the limit was undone by a redo");
    }

    /// The marker kinds in the journal from `from` on.
    fn markers(pd: &ProtectedDisk, from: Seq) -> Vec<MarkerKind> {
        let mut out = Vec::new();
        journal::read_from(&pd.segments(), from, |r| {
            if let Op::Marker { kind } = r.op {
                out.push(kind);
            }
            true
        })
        .unwrap();
        out
    }

    /// The protection starts over (unprotected and protected again as the same item) while an
    /// initial copy runs: the old copy writes nothing into the new journal and does not mark it done;
    /// the new protection's own copy covers the whole disk.
    #[test]
    fn a_copy_overtaken_by_a_new_protection_leaves_the_new_journal_alone() {
        let d = tempfile::tempdir().unwrap();
        let path = disk(d.path(), "source.img", 8 << 20);
        std::fs::write(&path, vec![7u8; 8 << 20]).unwrap();
        let state = d.path().join("state");
        let pd = ProtectedDisk::open(DiskId(1), "d", &path, &state, 4096, None).unwrap();
        pd.protect(3).unwrap();
        let asked = std::cell::Cell::new(0);
        let again = || {
            asked.set(asked.get() + 1);
            if asked.get() == 3 {
                pd.unprotect().unwrap();
                pd.protect(3).unwrap();
            }
            false
        };
        pd.initial_copy(1 << 20, 64 << 20, &again).unwrap();
        assert!(asked.get() >= 3, "the copy asked to stop {} times", asked.get());
        let st = pd.copy_state();
        assert!(!st.done && st.cursor == 0, "the new protection's copy state was written by the old copy");
        assert_eq!(pd.last_seq(), Seq::ZERO, "the old copy appended to the new journal");
        pd.initial_copy(1 << 20, 64 << 20, &|| false).unwrap();
        assert!(pd.copy_state().done);
        assert_eq!(markers(&pd, Seq(1)), vec![MarkerKind::InitialCopyDone]);
        assert_eq!(pd.last_seq(), Seq(9), "eight 1 MiB chunks and the marker");
    }

    #[test]
    fn a_bypass_opens_a_block_order_window_that_closes_once_the_dirty_blocks_are_copied() {
        let d = tempfile::tempdir().unwrap();
        let path = disk(d.path(), "source.img", 1 << 20);
        let state = d.path().join("state");
        let pd = ProtectedDisk::open(DiskId(1), "d", &path, &state, 4096, None).unwrap();
        pd.protect(3).unwrap();
        pd.initial_copy(1 << 20, 64 << 20, &|| false).unwrap();
        pd.on_applied_ack(pd.last_seq()).unwrap();
        let before = pd.last_seq();
        pd.set_limit(8192);
        for i in 0..4u8 {
            pd.write(u64::from(i) * 65536, &[i + 1; 4096], false).unwrap();
        }
        assert_eq!(pd.mode(), Mode::Overflow);
        pd.mark(MarkerKind::Bookmark { tag: "during".into() }).unwrap();
        // A bookmark taken while blocks bypass the journal comes after the window's beginning.
        let m = markers(&pd, before.next());
        assert_eq!(m.last(), Some(&MarkerKind::Bookmark { tag: "during".into() }));
        assert!(m.contains(&MarkerKind::InconsistentBegin), "{m:?}");
        pd.close_window_if_caught_up().unwrap();
        assert!(!markers(&pd, before.next()).contains(&MarkerKind::InconsistentEnd), "still dirty: stays open");
        // A restart keeps it open while dirty blocks remain.
        drop(pd);
        let pd = ProtectedDisk::open(DiskId(1), "d", &path, &state, 4096, None).unwrap();
        pd.set_limit(1 << 20);
        pd.copy_dirty(1 << 20, 64 << 20, &|| false).unwrap();
        assert_eq!(pd.dirty_bytes(), 0);
        let copied_through = pd.last_seq();
        pd.close_window_if_caught_up().unwrap();
        let m = markers(&pd, before.next());
        assert_eq!(m.last(), Some(&MarkerKind::InconsistentEnd), "{m:?}");
        assert!(pd.last_seq() > copied_through, "the end follows every copied block");
        pd.close_window_if_caught_up().unwrap();
        assert_eq!(pd.last_seq(), copied_through.next(), "closed once");
    }

    #[test]
    fn nothing_leaves_the_journal_before_the_disk_holds_it_for_good() {
        let d = tempfile::tempdir().unwrap();
        let path = disk(d.path(), "source.img", 64 << 20);
        let pd = ProtectedDisk::open(DiskId(1), "d", &path, &d.path().join("state"), 4096, None).unwrap();
        pd.protect(3).unwrap();
        // More than a segment: the first is closed, and goes once applied.
        for i in 0..34u64 {
            pd.write(i << 20, &[i as u8 + 1; 1 << 20], false).unwrap();
        }
        assert_eq!(pd.redo_mark(), Seq::ZERO);
        let last = pd.last_seq();
        pd.on_applied_ack(last).unwrap();
        assert!(pd.journal_bytes() < 4 << 20, "applied records were trimmed");
        assert!(pd.redo_mark() >= last, "trimmed before the redo mark said the disk holds them");
    }

    #[test]
    fn a_tracked_write_is_never_rolled_back_by_an_older_journal_record() {
        let d = tempfile::tempdir().unwrap();
        let path = disk(d.path(), "failed-over.img", 1 << 20);
        let state = d.path().join("state");
        sr_common::split::Split { version: 1, generation: 42, disk_size: 1 << 20, changed: vec![] }
            .write(&path)
            .unwrap();
        let pd = ProtectedDisk::open(DiskId(1), "d", &path, &state, 4096, None).unwrap();
        assert_eq!(pd.mode(), Mode::Tracking);
        // A record left in the journal (for example by a protection cut short), then a tracked write.
        pd.lock_journal().append_write(0, &[1u8; 4096]).unwrap();
        pd.write(0, &[2u8; 4096], false).unwrap();
        assert_eq!(pd.dirty_bytes(), 4096);
        drop(pd);
        let pd = ProtectedDisk::open(DiskId(1), "d", &path, &state, 4096, None).unwrap();
        assert_eq!(read(&pd, 0), vec![2u8; 4096]);
    }

    #[test]
    fn flush_on_a_stopped_disk_adds_nothing_after_the_final_point() {
        let d = tempfile::tempdir().unwrap();
        let path = disk(d.path(), "source.img", 1 << 20);
        let pd = ProtectedDisk::open(DiskId(1), "d", &path, &d.path().join("state"), 4096, None).unwrap();
        pd.protect(3).unwrap();
        pd.write(0, &[1u8; 4096], false).unwrap();
        let seq = pd.stop(5).unwrap();
        pd.flush().unwrap();
        assert_eq!(pd.last_seq(), seq, "the final bookmark stays the journal's last record");
        assert!(matches!(pd.trim(0, 4096, false), Err(BackendError::Shutdown(_))));
    }

    #[test]
    fn a_committed_disk_tracks_its_first_write_and_reprotect_ships_it_with_the_commits_ranges() {
        let d = tempfile::tempdir().unwrap();
        let path = disk(d.path(), "failed-over.img", 1 << 20);
        let split =
            sr_common::split::Split { version: 1, generation: 42, disk_size: 1 << 20, changed: vec![(0, 8192)] };
        split.write(&path).unwrap();
        let pd = ProtectedDisk::open(DiskId(1), "d", &path, &d.path().join("state"), 4096, None).unwrap();
        // No assignment has arrived yet: the write is tracked at once, not journaled and dropped later.
        pd.write(65536, &[7u8; 4096], false).unwrap();
        assert_eq!(pd.dirty_bytes(), 4096);
        pd.unprotect().unwrap();
        assert_eq!(pd.dirty_bytes(), 4096, "unprotecting a parted disk keeps what it tracked");
        assert!(pd.reprotect(9, 42).unwrap(), "the split record knows the baseline");
        assert_eq!(pd.dirty_bytes(), 4096 + 8192, "the commit's ranges ship too");
        assert!(pd.copy_state().done && pd.journaling() && !pd.stopped());
        assert_eq!(pd.resync_state().requested, 0, "no checksum comparison when the history is known");
    }

    #[test]
    fn the_final_point_of_a_planned_failover_waits_for_dirty_blocks() {
        let d = tempfile::tempdir().unwrap();
        let path = disk(d.path(), "source.img", 1 << 20);
        let pd = ProtectedDisk::open(DiskId(1), "d", &path, &d.path().join("state"), 4096, None).unwrap();
        pd.protect(3).unwrap();
        pd.initial_copy(1 << 20, 64 << 20, &|| false).unwrap();
        pd.on_applied_ack(pd.last_seq()).unwrap();
        pd.set_limit(8192);
        for i in 0..4u8 {
            pd.write(u64::from(i) * 65536, &[i + 1; 4096], false).unwrap();
        }
        assert!(pd.overflowed() && pd.dirty_bytes() > 0, "past the limit: writes went to the dirty map");
        assert_eq!(pd.stop(5).unwrap(), Seq::ZERO, "no final point while blocks are only in the dirty map");
        assert!(pd.write(0, &[9u8; 4096], false).is_err(), "but writes are refused at once");
        // The journal drains (and has room again): the dirty blocks are copied into it.
        pd.on_applied_ack(pd.last_seq()).unwrap();
        pd.set_limit(1 << 20);
        pd.recheck_overflow();
        pd.copy_dirty(1 << 20, 64 << 20, &|| false).unwrap();
        assert_eq!(pd.dirty_bytes(), 0);
        let copied_through = pd.last_seq();
        let seq = pd.stop(5).unwrap();
        assert!(seq > copied_through, "the final point comes after the copied dirty blocks");
        assert_eq!(pd.stop(5).unwrap(), seq);
    }

    #[test]
    fn a_stopped_disk_refuses_writes_after_its_final_marker_until_reprotected() {
        let d = tempfile::tempdir().unwrap();
        let path = disk(d.path(), "source.img", 1 << 20);
        let state = d.path().join("state");
        let pd = ProtectedDisk::open(DiskId(1), "d", &path, &state, 4096, None).unwrap();
        pd.protect(3).unwrap();
        pd.write(0, &[1u8; 4096], false).unwrap();
        let seq = pd.stop(77).unwrap();
        assert_eq!(pd.stop(77).unwrap(), seq, "stopping again for the same failover is the same stop");
        assert_eq!(seq, pd.last_seq(), "the final bookmark comes after every accepted write");
        assert!(matches!(pd.write(0, &[2u8; 4096], false), Err(BackendError::Shutdown(_))));
        assert!(pd.zero(0, 4096, false).is_err());
        drop(pd);
        // Stopped survives a restart; a reprotect with an unknown baseline asks for a comparison.
        let pd = ProtectedDisk::open(DiskId(1), "d", &path, &state, 4096, None).unwrap();
        assert!(pd.write(0, &[2u8; 4096], false).is_err());
        assert!(!pd.reprotect(4, 99).unwrap(), "baseline 99 is not this disk's history");
        assert!(pd.resync_state().active());
        pd.write(0, &[3u8; 4096], false).unwrap();
    }
}
