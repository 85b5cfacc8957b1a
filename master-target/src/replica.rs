//! One replica disk: the latest applied state of a protected disk, its applied position, its undo
//! journal (the recovery points) and the views open on those points.
//!
//! Applying a batch takes the write side of `gate`; NBD reads, views and exports take the read side,
//! so a reader never sees half of a batch: what it reads is the source at some applied sequence number.

use crate::metrics as m;
use crate::undo::Undo;
use sr_common::disk::DiskFile;
use sr_common::nbd::{Backend, BackendError};
use sr_common::state::StateStore;
use sr_common::types::{Seq, StreamKey};
use sr_common::wire::{Batch, Op};
use std::os::unix::fs::MetadataExt;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock, Weak};
use tokio_util::sync::CancellationToken;

/// What is open on a replica's points: a view reads the undo records after its point
/// (`view::PointView`), so expiry must keep them while it is open.
pub trait Follower: Send + Sync {
    /// The point it was opened at: undo records from there on must be kept.
    fn point(&self) -> Seq;
}

pub struct Replica {
    pub key: StreamKey,
    pub disk: DiskFile,
    /// Excludes readers while a batch is being applied.
    pub gate: RwLock<()>,
    applied: AtomicU64,
    pub undo: Mutex<Undo>,
    /// Open views: expiry keeps what they read.
    views: Mutex<Vec<Weak<dyn Follower>>>,
    /// Cancels the current process-server session when a newer one for this disk arrives.
    pub session: Mutex<Option<CancellationToken>>,
    applied_gauge: metrics::Gauge,
    allocated: metrics::Gauge,
    last_apply: metrics::Gauge,
    /// Why applying stopped (a failed apply that could not be rolled back in process); until a restart.
    stopped: Mutex<Option<String>>,
    /// The stop came from a failed undo index write, which opening the journal again settles.
    index_stopped: AtomicBool,
    /// Why the last apply failed and was rolled back (a full volume, an I/O error); cleared by the next
    /// one that succeeds.
    failing: Mutex<Option<String>>,
}

impl Replica {
    pub fn new(key: StreamKey, disk: DiskFile, applied: Seq, undo: Undo) -> Replica {
        let (item, d) = (key.item.to_string(), key.disk.to_string());
        let r = Replica {
            key,
            disk,
            gate: RwLock::new(()),
            applied: AtomicU64::new(applied.0),
            undo: Mutex::new(undo),
            views: Mutex::new(Vec::new()),
            session: Mutex::new(None),
            applied_gauge: metrics::gauge!(m::APPLIED_SEQ, "item" => item.clone(), "disk" => d.clone()),
            allocated: metrics::gauge!(m::REPLICA_BYTES, "item" => item.clone(), "disk" => d.clone()),
            last_apply: metrics::gauge!(m::LAST_APPLY_TIME, "item" => item, "disk" => d),
            stopped: Mutex::new(None),
            index_stopped: AtomicBool::new(false),
            failing: Mutex::new(None),
        };
        r.applied_gauge.set(applied.0 as f64);
        r
    }

    /// Bytes the replica file takes on disk.
    pub fn allocated_bytes(&self) -> u64 {
        self.disk.file().metadata().map(|m| m.blocks() * 512).unwrap_or(0)
    }

    pub fn applied(&self) -> Seq {
        Seq(self.applied.load(Ordering::Acquire))
    }

    /// Applies a verified batch that starts right after the applied position, makes it durable, and
    /// records it. Blocking. Redoing a batch after a crash before the record is harmless: the same
    /// changes land on the same bytes in the same order.
    /// Writes a batch's changes to the replica, syncs it and records the batch as applied.
    fn write_batch(&self, batch: &Batch, bytes: &mut u64) -> anyhow::Result<()> {
        use anyhow::Context;
        for c in &batch.changes {
            match &c.op {
                Op::Write { offset, data } => {
                    crate::failpoint::check("apply.write")
                        .and_then(|_| self.disk.write_at(*offset, data))
                        .with_context(|| format!("{}: writing seq {}", self.key, c.seq))?;
                    *bytes += data.len() as u64;
                }
                Op::Zero { offset, len } => {
                    self.disk.zero(*offset, *len).with_context(|| format!("{}: zeroing seq {}", self.key, c.seq))?;
                }
                Op::Marker { .. } => {}
            }
        }
        crate::failpoint::check("apply.sync")
            .and_then(|_| self.disk.sync())
            .with_context(|| format!("{}: syncing the replica", self.key))?;
        Ok(())
    }

    /// Stops applying: the replica or its undo journal may be half way through a batch, and only a
    /// restart (its rollback at open) can tell. Every later batch is refused with `why`.
    fn stop(&self, why: &str) {
        tracing::error!(key = %self.key, why, "applying stopped until the master target restarts");
        *self.stopped.lock().expect("stopped lock poisoned") = Some(why.to_string());
    }

    /// Why applying fails for now (it is retried), if it does.
    pub fn failing(&self) -> Option<String> {
        self.failing.lock().expect("failing lock poisoned").clone()
    }

    /// Applying is stopped only until the undo index is caught up at the next expiry tick
    /// ([`Replica::reopen_index`]): nothing a restart or a resync must settle.
    pub fn index_stopped(&self) -> bool {
        self.index_stopped.load(Ordering::Acquire)
    }

    /// Why applying is stopped, if it is.
    pub fn stopped(&self) -> Option<String> {
        self.stopped.lock().expect("stopped lock poisoned").clone()
    }

    pub fn apply(&self, batch: &Batch, store: &dyn StateStore) -> anyhow::Result<u64> {
        let mut bytes = 0;
        {
            // Checked under the gate: two sessions of one disk can never both apply the same batch.
            let _w = self.gate.write().expect("replica gate poisoned");
            let applied = self.applied();
            anyhow::ensure!(
                batch.first == applied.next(),
                "{}: batch {}..={} does not follow the applied position {applied}",
                self.key,
                batch.first,
                batch.last
            );
            if let Some(why) = self.stopped.lock().expect("stopped lock poisoned").clone() {
                anyhow::bail!("{}: applying is stopped: {why}", self.key);
            }
            let mut undo = self.undo.lock().expect("undo lock poisoned");
            let pending = undo.record_batch(batch, &self.disk).map_err(|e| {
                if matches!(e, crate::undo::UndoError::Io { .. }) {
                    // record_batch leaves the journal as it was, unless even that failed: then only a
                    // restart (which rolls back what it finds past the applied position) may go on.
                    if undo.needs_restart() {
                        self.stop(&format!("{e}"));
                    }
                }
                anyhow::Error::new(e)
                    .context(format!("{}: recording old contents before seq {}", self.key, batch.first))
            })?;
            let r = self.write_batch(batch, &mut bytes);
            if let Err(e) = r {
                return Err(match undo.abort(pending, &self.disk) {
                    Ok(()) => {
                        // Retried; the configuration server shows it on the item meanwhile.
                        *self.failing.lock().expect("failing lock poisoned") = Some(format!("{e:#}"));
                        e.context(format!(
                            "{}: applying batch {}..={} failed and was rolled back; it is retried",
                            self.key, batch.first, batch.last
                        ))
                    }
                    Err(ae) => {
                        self.stop(&format!("a failed apply could not be rolled back: {ae}"));
                        e.context(format!(
                            "{}: applying batch {}..={} failed and could not be rolled back ({ae}); applying is \
                             stopped until a restart of the master target rolls it back",
                            self.key, batch.first, batch.last
                        ))
                    }
                });
            }
            // Recording the batch may fail after the store made it durable: its outcome is unknown
            // here, so nothing is undone; applying stops and the restart decides from the store (a
            // batch it did not record is rolled back from the undo journal, one it did stays).
            let recorded = crate::failpoint::check("apply.record")
                .map_err(anyhow::Error::new)
                .and_then(|_| store.record_apply(self.key, batch.first, batch.last).map_err(anyhow::Error::new));
            if let Err(e) = recorded {
                self.stop(&format!("recording batch {}..={} as applied failed: {e:#}", batch.first, batch.last));
                return Err(e.context(format!(
                    "{}: recording batch {}..={} as applied failed; applying is stopped until a restart of the \
                     master target settles it",
                    self.key, batch.first, batch.last
                )));
            }
            self.applied.store(batch.last.0, Ordering::Release);
            *self.failing.lock().expect("failing lock poisoned") = None;
            // The batch is applied and recorded. An index that missed it would serve points without it:
            // they are refused, and applying stops, until the journal is opened again (the next expiry
            // tick tries, see `Replica::expire`; a restart does too), which indexes it from the segments.
            if let Err(e) = undo.commit(pending) {
                // Flagged first: the stop is never reported as one that needs a restart.
                self.index_stopped.store(true, Ordering::Release);
                let why = format!("indexing the undo records of batch {}..={} failed: {e}", batch.first, batch.last);
                tracing::error!(key = %self.key, why, "applying waits until the undo index is caught up");
                *self.stopped.lock().expect("stopped lock poisoned") = Some(why);
            }
            self.views.lock().expect("views lock poisoned").retain(|v| v.strong_count() > 0);
        }
        self.applied_gauge.set(batch.last.0 as f64);
        self.allocated.set(self.allocated_bytes() as f64);
        let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
        self.last_apply.set(now.as_secs_f64());
        Ok(bytes)
    }
}

impl Replica {
    /// Registers what follows this replica's batches from now on (a view opened on it).
    pub fn follow(&self, f: Weak<dyn Follower>) {
        self.views.lock().expect("views lock poisoned").push(f);
    }

    /// The oldest point an open view needs, if any view is open.
    pub fn pinned(&self) -> Option<Seq> {
        let views = self.views.lock().expect("views lock poisoned");
        views.iter().filter_map(Weak::upgrade).map(|v| v.point()).min()
    }

    /// After a failed index write (and only then: other stops need the store's word, which only a
    /// restart reads), opens the undo journal again, which indexes what the index missed, and lets
    /// applying go on. Returns whether it did.
    pub fn reopen_index(&self) -> anyhow::Result<bool> {
        if !self.index_stopped.load(Ordering::Acquire) {
            return Ok(false);
        }
        let _w = self.gate.write().expect("replica gate poisoned");
        let mut undo = self.undo.lock().expect("undo lock poisoned");
        undo.reopen(self.applied(), &self.disk)
            .map_err(|e| anyhow::Error::new(e).context(format!("{}: opening the undo journal again", self.key)))?;
        self.index_stopped.store(false, Ordering::Release);
        *self.stopped.lock().expect("stopped lock poisoned") = None;
        tracing::info!(key = %self.key, "the undo index caught up from the segments; applying goes on");
        Ok(true)
    }

    /// Drops undo segments no longer needed by points at or after `keep` (nor by open views); first
    /// catches the undo index up if a failed write left it behind.
    pub fn expire(&self, keep: Seq) -> anyhow::Result<u64> {
        self.reopen_index()?;
        // The views are counted under the undo lock, which opening a view holds while it checks its
        // point and registers: a view is either counted here or opened after the expiry.
        let mut undo = self.undo.lock().expect("undo lock poisoned");
        let keep = self.pinned().map_or(keep, |p| p.min(keep));
        Ok(undo.expire_through(keep)?)
    }
}

/// Read-only NBD view of a replica.
pub struct ReplicaExport(pub Arc<Replica>);

impl Backend for ReplicaExport {
    fn size(&self) -> u64 {
        self.0.disk.size()
    }
    fn read_only(&self) -> bool {
        true
    }
    fn read(&self, offset: u64, buf: &mut [u8]) -> Result<(), BackendError> {
        let _r = self.0.gate.read().expect("replica gate poisoned");
        Ok(self.0.disk.read_at(offset, buf)?)
    }
    fn write(&self, _: u64, _: &[u8], _: bool) -> Result<(), BackendError> {
        Err(BackendError::ReadOnly)
    }
    fn zero(&self, _: u64, _: u64, _: bool) -> Result<(), BackendError> {
        Err(BackendError::ReadOnly)
    }
    fn flush(&self) -> Result<(), BackendError> {
        Ok(())
    }
    fn extents(&self, offset: u64, len: u64, max: usize) -> Result<Vec<sr_common::nbd::Extent>, BackendError> {
        let _r = self.0.gate.read().expect("replica gate poisoned");
        Ok(self.0.disk.extents(offset, len, max))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};
    use sr_common::nbd::Backend;
    use sr_common::state::MemStore;
    use sr_common::types::{DiskId, ItemId};
    use sr_common::wire::{Change, MarkerKind};
    use std::io::Write;

    const SIZE: u64 = 1 << 20;
    const KEY: StreamKey = StreamKey { item: ItemId(1), disk: DiskId(1) };

    struct Rig {
        dir: tempfile::TempDir,
        store: MemStore,
        replica: Arc<Replica>,
        /// The source's contents after each applied sequence number.
        states: Vec<(Seq, Vec<u8>)>,
        source: Vec<u8>,
        next: u64,
    }

    fn open(dir: &std::path::Path, applied: Seq, segment_bytes: u64) -> Arc<Replica> {
        let disk = DiskFile::open_or_create(&dir.join("replica.img"), SIZE).unwrap();
        let undo = Undo::open(&dir.join("undo"), segment_bytes, 3600, applied, &disk).unwrap();
        Arc::new(Replica::new(KEY, disk, applied, undo))
    }

    /// The replica as a crash at this instant leaves it, opened from a copy of its files (the live
    /// handle keeps the undo index locked, as a second process would find it).
    fn open_copy(dir: &std::path::Path, applied: Seq) -> (tempfile::TempDir, Arc<Replica>) {
        let t = tempfile::tempdir().unwrap();
        std::fs::copy(dir.join("replica.img"), t.path().join("replica.img")).unwrap();
        std::fs::create_dir_all(t.path().join("undo")).unwrap();
        for e in std::fs::read_dir(dir.join("undo")).unwrap() {
            let e = e.unwrap();
            std::fs::copy(e.path(), t.path().join("undo").join(e.file_name())).unwrap();
        }
        let r = open(t.path(), applied, 64 << 20);
        (t, r)
    }

    /// The newest undo segment's file.
    fn last_segment(dir: &std::path::Path) -> std::path::PathBuf {
        let mut segs: Vec<_> = std::fs::read_dir(dir.join("undo"))
            .unwrap()
            .map(|e| e.unwrap().path())
            .filter(|p| p.extension().is_some_and(|x| x == "undo"))
            .collect();
        segs.sort();
        segs.pop().unwrap()
    }

    /// Closes the replica (a stand-in on other files takes its place), as a stop does.
    fn close(rig: &mut Rig) {
        let spare = rig.dir.path().join("spare");
        std::fs::create_dir_all(&spare).unwrap();
        rig.replica = open(&spare, Seq::ZERO, 64 << 20);
    }

    /// Restarts the replica as the master target's restart does: the old handle is closed first.
    fn restart(rig: &mut Rig, applied: Seq) {
        close(rig);
        rig.replica = open(rig.dir.path(), applied, 64 << 20);
    }

    impl Rig {
        fn new(segment_bytes: u64) -> Rig {
            let dir = tempfile::tempdir().unwrap();
            let replica = open(dir.path(), Seq::ZERO, segment_bytes);
            let store = MemStore::default();
            store.put_stream(KEY, sr_common::state::StreamRecord { disk_size: SIZE, applied: Seq::ZERO }).unwrap();
            Rig { dir, store, replica, states: Vec::new(), source: vec![0; SIZE as usize], next: 1 }
        }

        /// Builds a batch of `ops`, applies it to the source model and the replica.
        fn batch(&mut self, ops: Vec<Op>) -> Batch {
            let first = Seq(self.next);
            let mut changes = Vec::new();
            for op in ops {
                match &op {
                    Op::Write { offset, data } => {
                        self.source[*offset as usize..*offset as usize + data.len()].copy_from_slice(data)
                    }
                    Op::Zero { offset, len } => self.source[*offset as usize..(*offset + *len) as usize].fill(0),
                    Op::Marker { .. } => {}
                }
                changes.push(Change { seq: Seq(self.next), at: self.next * 1000, op });
                self.states.push((Seq(self.next), self.source.clone()));
                self.next += 1;
            }
            Batch { item: KEY.item, disk: KEY.disk, disk_size: SIZE, first, last: Seq(self.next - 1), changes }
        }

        fn apply(&mut self, ops: Vec<Op>) {
            let b = self.batch(ops);
            self.replica.apply(&b, &self.store).unwrap();
        }

        fn read_point(&self, seq: Seq) -> Vec<u8> {
            let v = self.replica.open_view(seq, None).unwrap();
            let mut buf = vec![0u8; SIZE as usize];
            // Odd-sized reads so pieces are split at every kind of boundary.
            let mut pos = 0;
            while pos < SIZE {
                let n = 7919.min(SIZE - pos) as usize;
                v.read(pos, &mut buf[pos as usize..pos as usize + n]).unwrap();
                pos += n as u64;
            }
            buf
        }

        fn state_at(&self, seq: Seq) -> &Vec<u8> {
            &self.states.iter().rfind(|(s, _)| *s <= seq).unwrap().1
        }
    }

    fn random_ops(rng: &mut rand::rngs::StdRng, n: usize) -> Vec<Op> {
        (0..n)
            .map(|_| {
                let offset = rng.gen_range(0..SIZE - 70_000);
                match rng.gen_range(0..10) {
                    0 => Op::Zero { offset, len: rng.gen_range(1..70_000) },
                    1 => Op::Marker { kind: MarkerKind::Flush },
                    _ => {
                        let len = rng.gen_range(1..20_000);
                        let b: u8 = rng.gen();
                        Op::Write { offset, data: (0..len).map(|i| b.wrapping_add(i as u8) | 1).collect() }
                    }
                }
            })
            .collect()
    }

    fn base(r: &Replica) -> Vec<u8> {
        let mut b = vec![0u8; SIZE as usize];
        r.disk.read_at(0, &mut b).unwrap();
        b
    }

    /// Every retained point of `r` reads as the model says.
    fn check_points(rig: &Rig, r: &Arc<Replica>) {
        let oldest = r.undo.lock().unwrap().oldest().unwrap();
        for (seq, state) in rig.states.iter().filter(|(s, _)| *s >= oldest && *s <= r.applied()) {
            let v = r.open_view(*seq, None).unwrap();
            let mut buf = vec![0u8; SIZE as usize];
            v.read(0, &mut buf).unwrap();
            assert!(buf == *state, "point {seq} differs");
        }
    }

    /// Reopens the replica as a restart does (at `applied`): it must read `before`; then `b` applies
    /// whole and every point reads as the model says.
    fn restart_and_apply_again(rig: &mut Rig, applied: Seq, before: &[u8], b: &Batch) {
        restart(rig, applied);
        assert!(base(&rig.replica) == before, "the restart did not roll the batch back");
        rig.replica.apply(b, &rig.store).unwrap();
        assert!(base(&rig.replica) == rig.source);
        check_points(rig, &rig.replica);
    }

    #[test]
    fn a_failed_apply_at_any_step_is_rolled_back_in_process_and_a_retry_and_a_restart_both_find_it_whole() {
        // (failpoint, which hit fails): mid-way through writing undo records, their fsync, mid-way
        // through the replica writes, the replica's fsync, and recording the batch as applied.
        let points = [("undo.write", 3), ("undo.sync", 1), ("apply.write", 2), ("apply.sync", 1)];
        for (k, (point, nth)) in points.into_iter().enumerate() {
            let mut rng = rand::rngs::StdRng::seed_from_u64(40 + k as u64);
            let mut rig = Rig::new(64 << 20);
            rig.apply(vec![Op::Marker { kind: MarkerKind::InitialCopyDone }]);
            for _ in 0..4 {
                rig.apply(random_ops(&mut rng, 6));
            }
            let (applied, before) = (rig.replica.applied(), rig.source.clone());
            let mut ops = random_ops(&mut rng, 8);
            ops.push(Op::Write { offset: 0, data: vec![0xee; 9000] });
            let b = rig.batch(ops);
            crate::failpoint::arm(point, nth);
            let e = rig.replica.apply(&b, &rig.store).unwrap_err();
            assert!(format!("{e:#}").contains("failpoint"), "{point}: {e:#}");
            assert_eq!(rig.replica.applied(), applied, "{point}");
            assert!(base(&rig.replica) == before, "{point}: the replica kept part of the failed batch");
            assert!(rig.replica.stopped().is_none(), "{point}: rolled back in process, not stopped");
            check_points(&rig, &rig.replica);
            // A restart now finds a consistent journal too.
            let (_copy, reopened) = open_copy(rig.dir.path(), applied);
            assert!(base(&reopened) == before, "{point}");
            check_points(&rig, &reopened);
            drop(reopened);
            // And the retry applies it whole.
            rig.replica.apply(&b, &rig.store).unwrap();
            assert!(base(&rig.replica) == rig.source, "{point}");
            rig.apply(random_ops(&mut rng, 4));
            check_points(&rig, &rig.replica);
            let (_copy, reopened) = open_copy(rig.dir.path(), rig.replica.applied());
            check_points(&rig, &reopened);
            let applied = rig.replica.applied();
            restart(&mut rig, applied);
            check_points(&rig, &rig.replica);
        }
    }

    #[test]
    fn a_failure_to_record_a_batch_stops_applying_and_the_restart_settles_it_from_the_store() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(51);
        let mut rig = Rig::new(64 << 20);
        rig.apply(vec![Op::Marker { kind: MarkerKind::InitialCopyDone }]);
        rig.apply(random_ops(&mut rng, 6));
        let (applied, before) = (rig.replica.applied(), rig.source.clone());
        let b = rig.batch(random_ops(&mut rng, 8));
        crate::failpoint::arm("apply.record", 1);
        rig.replica.apply(&b, &rig.store).unwrap_err();
        assert!(rig.replica.stopped().is_some());
        // Not recorded: the restart rolls the batch back, and it applies again.
        restart_and_apply_again(&mut rig, applied, &before, &b);
    }

    #[test]
    fn an_apply_that_cannot_be_rolled_back_stops_until_a_restart_repairs_it() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(50);
        let mut rig = Rig::new(64 << 20);
        rig.apply(vec![Op::Marker { kind: MarkerKind::InitialCopyDone }]);
        rig.apply(random_ops(&mut rng, 6));
        let (applied, before) = (rig.replica.applied(), rig.source.clone());
        let b = rig.batch(random_ops(&mut rng, 8));
        crate::failpoint::arm("apply.sync", 1);
        crate::failpoint::arm("undo.abort", 1);
        let e = rig.replica.apply(&b, &rig.store).unwrap_err();
        assert!(format!("{e:#}").contains("could not be rolled back"), "{e:#}");
        assert!(rig.replica.stopped().is_some());
        let e = rig.replica.apply(&b, &rig.store).unwrap_err();
        assert!(format!("{e:#}").contains("applying is stopped"), "{e:#}");
        // The restart rolls the half-applied batch back from the undo journal.
        restart_and_apply_again(&mut rig, applied, &before, &b);
    }

    #[test]
    fn a_damaged_undo_payload_is_an_error_when_read_never_wrong_data() {
        let mut rig = Rig::new(64 << 20);
        rig.apply(vec![Op::Marker { kind: MarkerKind::InitialCopyDone }]);
        rig.apply(vec![Op::Write { offset: 0, data: vec![0x11; 8192] }]);
        let point = rig.replica.applied();
        rig.apply(vec![Op::Write { offset: 0, data: vec![0x22; 8192] }]);
        // One byte of the old contents (0x11) flipped on disk.
        let seg = last_segment(rig.dir.path());
        let mut raw = std::fs::read(&seg).unwrap();
        let at = raw.windows(64).rposition(|w| w.iter().all(|b| *b == 0x11)).unwrap();
        raw[at + 10] ^= 0xff;
        std::fs::write(&seg, &raw).unwrap();
        let (_copy, reopened) = open_copy(rig.dir.path(), rig.replica.applied());
        for replica in [rig.replica.clone(), reopened] {
            let v = replica.open_view(point, None).unwrap();
            let mut buf = vec![0u8; 4096];
            let e = v.read(4096, &mut buf).unwrap_err();
            assert!(e.to_string().contains("does not match its checksum"), "{e}");
        }
    }

    #[test]
    fn damaged_undo_bytes_are_errors_never_panics() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(60);
        let mut rig = Rig::new(64 << 20);
        rig.apply(vec![Op::Marker { kind: MarkerKind::InitialCopyDone }]);
        for _ in 0..6 {
            rig.apply(random_ops(&mut rng, 5));
        }
        let applied = rig.replica.applied();
        let seg = last_segment(rig.dir.path());
        let good = std::fs::read(&seg).unwrap();
        for _ in 0..300 {
            let mut b = good.clone();
            for _ in 0..rng.gen_range(1..5) {
                let i = rng.gen_range(0..b.len());
                b[i] = rng.gen();
            }
            let t = tempfile::tempdir().unwrap();
            std::fs::create_dir_all(t.path().join("undo")).unwrap();
            std::fs::write(t.path().join("undo").join(seg.file_name().unwrap()), &b).unwrap();
            std::fs::copy(rig.dir.path().join("replica.img"), t.path().join("replica.img")).unwrap();
            let disk = DiskFile::open_or_create(&t.path().join("replica.img"), SIZE).unwrap();
            if let Ok(undo) = Undo::open(&t.path().join("undo"), 64 << 20, 3600, applied, &disk) {
                let r = Arc::new(Replica::new(KEY, disk, applied, undo));
                let oldest = r.undo.lock().unwrap().oldest();
                if let Some(v) = oldest.and_then(|o| r.open_view(o, None).ok()) {
                    let mut buf = vec![0u8; SIZE as usize];
                    let _ = v.read(0, &mut buf);
                }
            }
        }
    }

    #[test]
    fn every_point_reads_as_the_source_did_then() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(7);
        let mut rig = Rig::new(64 << 20);
        // Changes before the initial copy finished keep no points.
        rig.apply(random_ops(&mut rng, 5));
        assert!(rig.replica.open_view(Seq(3), None).is_err());
        let mut ops = random_ops(&mut rng, 3);
        ops.push(Op::Marker { kind: MarkerKind::InitialCopyDone });
        ops.extend(random_ops(&mut rng, 3));
        rig.apply(ops);
        let oldest = rig.replica.undo.lock().unwrap().oldest().unwrap();
        assert_eq!(oldest, Seq(8));
        // A view opened now must stay at its point while later batches land.
        let early = rig.replica.open_view(Seq(10), None).unwrap();
        for _ in 0..20 {
            let n = rng.gen_range(1..12);
            rig.apply(random_ops(&mut rng, n));
        }
        let applied = rig.replica.applied();
        for seq in (oldest.0..=applied.0).step_by(3).chain([applied.0]) {
            assert!(rig.read_point(Seq(seq)) == *rig.state_at(Seq(seq)), "point {seq} differs from the source");
        }
        let mut buf = vec![0u8; SIZE as usize];
        early.read(0, &mut buf).unwrap();
        assert!(buf == *rig.state_at(Seq(10)), "an open view moved with replication");
        // The latest point is the replica itself.
        let mut base = vec![0u8; SIZE as usize];
        rig.replica.disk.read_at(0, &mut base).unwrap();
        assert!(base == rig.source);
        // Reopened after a restart, the same points are there.
        drop(early);
        restart(&mut rig, applied);
        for seq in [oldest.0, oldest.0 + 5, applied.0 - 2] {
            assert!(rig.read_point(Seq(seq)) == *rig.state_at(Seq(seq)), "point {seq} after reopening");
        }
    }

    #[test]
    fn a_batch_cut_short_is_rolled_back_on_open() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(11);
        let mut rig = Rig::new(64 << 20);
        rig.apply(vec![Op::Marker { kind: MarkerKind::InitialCopyDone }]);
        for _ in 0..5 {
            rig.apply(random_ops(&mut rng, 6));
        }
        let applied = rig.replica.applied();
        let committed = rig.source.clone();
        // The next batch: undo written, half of it applied, then a crash before the commit.
        let b = rig.batch(random_ops(&mut rng, 8));
        let pending = rig.replica.undo.lock().unwrap().record_batch(&b, &rig.replica.disk).unwrap();
        assert!(!pending.is_empty());
        for c in &b.changes[..4] {
            if let Op::Write { offset, data } = &c.op {
                rig.replica.disk.write_at(*offset, data).unwrap();
            }
        }
        // A torn record at the end, as a crash mid-append leaves.
        let seg = last_segment(rig.dir.path());
        std::fs::OpenOptions::new().append(true).open(&seg).unwrap().write_all(b"SRU1 torn").unwrap();
        restart(&mut rig, applied);
        let mut base = vec![0u8; SIZE as usize];
        rig.replica.disk.read_at(0, &mut base).unwrap();
        assert!(base == committed, "the replica was not rolled back to the committed state");
        rig.states.truncate(applied.0 as usize);
        rig.source = committed;
        rig.next = applied.0 + 1;
        // The same batch applies again and every point is still right.
        rig.apply(b.changes.iter().map(|c| c.op.clone()).collect());
        for seq in 1..=rig.replica.applied().0 {
            assert!(rig.read_point(Seq(seq)) == *rig.state_at(Seq(seq)), "point {seq}");
        }
    }

    #[test]
    fn expiry_drops_old_segments_and_keeps_newer_points_exact() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(3);
        let mut rig = Rig::new(64 << 10);
        rig.apply(vec![Op::Marker { kind: MarkerKind::InitialCopyDone }]);
        for _ in 0..30 {
            rig.apply(random_ops(&mut rng, 4));
        }
        let before = rig.replica.undo.lock().unwrap().bytes();
        let pinned = rig.replica.open_view(Seq(40), None).unwrap();
        let keep = Seq(100);
        let freed = rig.replica.expire(keep).unwrap();
        assert!(freed > 0 && rig.replica.undo.lock().unwrap().bytes() < before);
        // The open view at 40 held its records.
        let oldest = rig.replica.undo.lock().unwrap().oldest().unwrap();
        assert!(oldest <= Seq(40));
        drop(pinned);
        rig.replica.expire(keep).unwrap();
        let oldest = rig.replica.undo.lock().unwrap().oldest().unwrap();
        assert!(oldest > Seq(40) && oldest <= keep, "oldest {oldest}");
        assert!(rig.replica.open_view(Seq(oldest.0 - 1), None).is_err());
        for seq in oldest.0..=rig.replica.applied().0 {
            assert!(rig.read_point(Seq(seq)) == *rig.state_at(Seq(seq)), "point {seq}");
        }
    }

    /// Every point from the oldest retained one reads as the source did then (at most about 100 of
    /// them, evenly spread, with the oldest and the latest).
    fn check_all_points(rig: &Rig) {
        let oldest = rig.replica.undo.lock().unwrap().oldest().unwrap().0.max(1);
        let applied = rig.replica.applied().0;
        let step = ((applied - oldest) / 100).max(1) as usize;
        for seq in (oldest..=applied).step_by(step).chain([applied]) {
            assert!(rig.read_point(Seq(seq)) == *rig.state_at(Seq(seq)), "point {seq}");
        }
    }

    fn index_path(rig: &Rig) -> std::path::PathBuf {
        rig.dir.path().join("undo").join("index.redb")
    }

    #[test]
    fn the_undo_index_is_rebuilt_or_caught_up_from_the_segments_whatever_state_a_restart_finds_it_in() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(21);
        // Small segments: several rotations, so that some commits synced the index and some did not.
        let mut rig = Rig::new(48 << 10);
        rig.apply(vec![Op::Marker { kind: MarkerKind::InitialCopyDone }]);
        for _ in 0..6 {
            rig.apply(random_ops(&mut rng, 5));
        }
        // 1. The index as it was a few batches ago: the restart indexes the rest from the segments.
        let applied = rig.replica.applied();
        restart(&mut rig, applied);
        let old_index = std::fs::read(index_path(&rig)).unwrap();
        for _ in 0..4 {
            rig.apply(random_ops(&mut rng, 5));
        }
        let applied = rig.replica.applied();
        close(&mut rig);
        std::fs::write(index_path(&rig), &old_index).unwrap();
        rig.replica = open(rig.dir.path(), applied, 64 << 20);
        check_all_points(&rig);
        // 2. No index at all (a journal written before the index existed): built from every segment.
        close(&mut rig);
        std::fs::remove_file(index_path(&rig)).unwrap();
        rig.replica = open(rig.dir.path(), applied, 64 << 20);
        check_all_points(&rig);
        // 3. An index that claims more than the segments hold (not this journal's): built again.
        let segs_then: Vec<(std::path::PathBuf, Vec<u8>)> = std::fs::read_dir(rig.dir.path().join("undo"))
            .unwrap()
            .map(|e| e.unwrap().path())
            .filter(|p| p.extension().is_some_and(|x| x == "undo"))
            .map(|p| (p.clone(), std::fs::read(&p).unwrap()))
            .collect();
        let replica_then = std::fs::read(rig.dir.path().join("replica.img")).unwrap();
        let (states_then, source_then, next_then) = (rig.states.clone(), rig.source.clone(), rig.next);
        for _ in 0..3 {
            rig.apply(random_ops(&mut rng, 5));
        }
        close(&mut rig);
        for e in std::fs::read_dir(rig.dir.path().join("undo")).unwrap() {
            let p = e.unwrap().path();
            if p.extension().is_some_and(|x| x == "undo") {
                std::fs::remove_file(p).unwrap();
            }
        }
        for (p, b) in &segs_then {
            std::fs::write(p, b).unwrap();
        }
        std::fs::write(rig.dir.path().join("replica.img"), &replica_then).unwrap();
        (rig.states, rig.source, rig.next) = (states_then, source_then, next_then);
        rig.replica = open(rig.dir.path(), applied, 64 << 20);
        check_all_points(&rig);
        // And it goes on from there.
        rig.apply(random_ops(&mut rng, 5));
        let applied = rig.replica.applied();
        restart(&mut rig, applied);
        check_all_points(&rig);
    }

    #[test]
    fn a_restart_after_expiry_removed_segments_but_not_yet_their_index_rows_drops_those_rows() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(22);
        let mut rig = Rig::new(16 << 10);
        rig.apply(vec![Op::Marker { kind: MarkerKind::InitialCopyDone }]);
        for _ in 0..30 {
            rig.apply(random_ops(&mut rng, 4));
        }
        let applied = rig.replica.applied();
        restart(&mut rig, applied);
        let before_expiry = std::fs::read(index_path(&rig)).unwrap();
        let time_before = rig.replica.undo.lock().unwrap().time_range().unwrap().0;
        assert!(rig.replica.expire(Seq(applied.0 / 2)).unwrap() > 0);
        let oldest = rig.replica.undo.lock().unwrap().oldest().unwrap();
        // The crash came after the segments were deleted and before the index was.
        close(&mut rig);
        std::fs::write(index_path(&rig), &before_expiry).unwrap();
        rig.replica = open(rig.dir.path(), applied, 64 << 20);
        let undo = rig.replica.undo.lock().unwrap();
        assert_eq!(undo.oldest(), Some(oldest));
        assert!(undo.marks().all(|m| m.seq > oldest));
        let first = undo.time_range().unwrap().0;
        assert!(first > time_before, "the expired changes' times are gone");
        assert!(undo.point_at(time_before, applied).is_err(), "an expired time is no point");
        assert_eq!(undo.point_at(first - 1, applied), Ok(oldest), "just before the first kept change: the oldest");
        drop(undo);
        check_all_points(&rig);
    }

    /// An index write fails (`fail` arms it and returns a guard that heals the cause): the batch
    /// stays applied, points are refused, applying stops, and the next expiry tick opens the journal
    /// again, after which everything goes on and every point is right, also the open view's.
    fn index_failure_is_settled_by_the_next_expiry_tick(rig: &mut Rig, fail: &dyn Fn() -> Box<dyn FnOnce()>) {
        let mut rng = rand::rngs::StdRng::seed_from_u64(23);
        rig.apply(vec![Op::Marker { kind: MarkerKind::InitialCopyDone }]);
        rig.apply(random_ops(&mut rng, 6));
        let point = rig.replica.applied();
        let view = rig.replica.open_view(point, None).unwrap();
        let heal = fail();
        // Many changes: the index must grow.
        let ops = (0..6000u64).map(|i| Op::Write { offset: i * 128, data: vec![(i % 250) as u8 + 1; 100] }).collect();
        let b = rig.batch(ops);
        rig.replica.apply(&b, &rig.store).unwrap();
        heal();
        // Applied and recorded: it is not undone, nor applied twice.
        assert_eq!(rig.replica.applied(), b.last);
        assert!(rig.replica.stopped().is_some_and(|w| w.contains("indexing")), "{:?}", rig.replica.stopped());
        assert!(rig.replica.index_stopped(), "reported as settled by the master target, not as needing a restart");
        let mut buf = vec![0u8; SIZE as usize];
        let e = view.read(0, &mut buf).unwrap_err();
        assert!(e.to_string().contains("missed a batch"), "{e}");
        let next = rig.batch(random_ops(&mut rng, 3));
        assert!(rig.replica.apply(&next, &rig.store).is_err());
        rig.replica.expire(Seq::ZERO).unwrap();
        assert!(rig.replica.stopped().is_none() && !rig.replica.index_stopped());
        rig.replica.apply(&next, &rig.store).unwrap();
        view.read(0, &mut buf).unwrap();
        assert!(buf == *rig.state_at(point), "the view's point after the index caught up");
        drop(view);
        check_all_points(rig);
        let applied = rig.replica.applied();
        restart(rig, applied);
        check_all_points(rig);
    }

    #[test]
    fn a_failure_to_index_a_batch_refuses_points_until_the_journal_is_opened_again() {
        let mut rig = Rig::new(64 << 20);
        index_failure_is_settled_by_the_next_expiry_tick(&mut rig, &|| {
            crate::failpoint::arm("undo.index", 1);
            Box::new(|| {})
        });
    }

    #[test]
    fn an_index_write_that_fails_inside_redb_is_settled_by_opening_the_journal_again() {
        // A real failure inside redb (which then refuses every use of that database): no file of this
        // process may grow past 900 KiB during the big batch. Its undo segment ends near 350 KiB and
        // its replica writes below 770 KiB, but the index grows to about 1.1 MiB. Nextest runs each
        // test in a process of its own, so the limit and the ignored signal stay here.
        let mut rig = Rig::new(64 << 20);
        let index = index_path(&rig);
        index_failure_is_settled_by_the_next_expiry_tick(&mut rig, &|| {
            let limit = 900 << 10;
            assert!(std::fs::metadata(&index).unwrap().len() < limit);
            // SAFETY: ignoring SIGXFSZ and setting this process's file size limit touch nothing else.
            unsafe {
                libc::signal(libc::SIGXFSZ, libc::SIG_IGN);
                let lim = libc::rlimit { rlim_cur: limit, rlim_max: libc::RLIM_INFINITY };
                assert_eq!(libc::setrlimit(libc::RLIMIT_FSIZE, &lim), 0);
            }
            Box::new(|| {
                let lim = libc::rlimit { rlim_cur: libc::RLIM_INFINITY, rlim_max: libc::RLIM_INFINITY };
                // SAFETY: as above.
                unsafe { assert_eq!(libc::setrlimit(libc::RLIMIT_FSIZE, &lim), 0) };
            })
        });
    }

    #[test]
    fn a_view_whose_records_expired_under_it_is_an_error_never_the_replicas_bytes() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(24);
        let mut rig = Rig::new(16 << 10);
        rig.apply(vec![Op::Marker { kind: MarkerKind::InitialCopyDone }]);
        for _ in 0..30 {
            rig.apply(random_ops(&mut rng, 4));
        }
        let view = rig.replica.open_view(Seq(5), None).unwrap();
        // As a race between opening the view and expiry would: its records go although it is open.
        assert!(rig.replica.undo.lock().unwrap().expire_through(Seq(100)).unwrap() > 0);
        let mut buf = vec![0u8; SIZE as usize];
        let e = view.read(0, &mut buf).unwrap_err();
        assert!(e.to_string().contains("older than the oldest retained point"), "{e}");
    }

    #[test]
    fn an_unreadable_index_is_built_again_and_a_damaged_row_is_an_error_never_other_bytes() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(25);
        let mut rig = Rig::new(64 << 20);
        rig.apply(vec![Op::Marker { kind: MarkerKind::InitialCopyDone }]);
        rig.apply(vec![Op::Write { offset: 0, data: vec![0x11; 8192] }]);
        rig.apply(vec![Op::Write { offset: 512 << 10, data: vec![0x33; 8192] }]);
        let point = rig.replica.applied();
        rig.apply(vec![Op::Write { offset: 0, data: vec![0x22; 8192] }]);
        rig.apply(random_ops(&mut rng, 5));
        let applied = rig.replica.applied();
        // Garbage for an index: built again from the segments.
        close(&mut rig);
        std::fs::write(index_path(&rig), vec![0x5a; 64 << 10]).unwrap();
        rig.replica = open(rig.dir.path(), applied, 64 << 20);
        check_all_points(&rig);
        // A row that names the 0x11 record's bytes for another place (offset 512 KiB).
        let mut real = Vec::new();
        close(&mut rig);
        {
            let ix = crate::undo_index::Index::open(&rig.dir.path().join("undo")).unwrap();
            ix.covering(point.0, 0, 8192, |_, r| {
                real.push(*r);
                0
            })
            .unwrap();
            let r = real.iter().find(|r| r.kind == 1).copied().expect("the 0x11 record");
            let forged = crate::undo_index::IndexedRec { seq: point.0 + 1, offset: 512 << 10, ..r };
            let mut a = crate::undo_index::Additions::default();
            a.recs.push(forged);
            ix.add(&a, true).unwrap();
        }
        rig.replica = open(rig.dir.path(), applied, 64 << 20);
        let v = rig.replica.open_view(Seq(point.0), None).unwrap();
        let mut buf = vec![0u8; 8192];
        let e = v.read(512 << 10, &mut buf).unwrap_err();
        assert!(e.to_string().contains("not the one the index names"), "{e}");
        v.read(0, &mut buf).unwrap();
        assert!(buf.iter().all(|b| *b == 0x11));
    }

    #[test]
    fn an_index_ahead_of_the_applied_position_is_built_again_and_the_replica_rolled_back() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(26);
        let mut rig = Rig::new(16 << 10);
        rig.apply(vec![Op::Marker { kind: MarkerKind::InitialCopyDone }]);
        for _ in 0..8 {
            rig.apply(random_ops(&mut rng, 4));
        }
        let (at, source_then, next_then) = (rig.replica.applied(), rig.source.clone(), rig.next);
        for _ in 0..8 {
            rig.apply(random_ops(&mut rng, 4));
        }
        // The store says less was applied (restored from an older copy): the segments roll back.
        restart(&mut rig, at);
        assert!(base(&rig.replica) == source_then, "the replica is the state the store names");
        rig.states.retain(|(s, _)| *s <= at);
        (rig.source, rig.next) = (source_then, next_then);
        check_all_points(&rig);
        for _ in 0..3 {
            rig.apply(random_ops(&mut rng, 4));
        }
        check_all_points(&rig);
    }

    #[test]
    fn a_points_block_status_is_data_where_its_records_lie_over_the_replicas_holes() {
        let mut rig = Rig::new(64 << 20);
        rig.apply(vec![Op::Marker { kind: MarkerKind::InitialCopyDone }]);
        rig.apply(vec![Op::Write { offset: 128 << 10, data: vec![0x44; 64 << 10] }]);
        let point = rig.replica.applied();
        // The replica's bytes there become a hole again; at the point they are data.
        rig.apply(vec![Op::Zero { offset: 128 << 10, len: 64 << 10 }]);
        let runs = |v: &dyn Backend| {
            let mut pos = 0;
            let mut data = Vec::new();
            for e in v.extents(0, SIZE, 1000).unwrap() {
                if !e.hole {
                    data.push((pos, e.len));
                }
                pos += e.len;
            }
            data
        };
        let latest = rig.replica.open_view(rig.replica.applied(), None).unwrap();
        assert_eq!(runs(&*latest), Vec::<(u64, u64)>::new(), "the replica is all holes now");
        let v = rig.replica.open_view(point, None).unwrap();
        let data = runs(&*v);
        assert!(
            data.iter().any(|&(o, l)| o <= 128 << 10 && o + l >= 192 << 10),
            "the point's data over the replica's hole is reported: {data:?}"
        );
        assert!(data.iter().all(|&(o, l)| o + l <= 256 << 10 && o >= 64 << 10), "nothing else: {data:?}");
        check_all_points(&rig);
    }

    #[test]
    fn writable_view_keeps_writes_in_its_overlay() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(5);
        let mut rig = Rig::new(64 << 20);
        rig.apply(vec![Op::Marker { kind: MarkerKind::InitialCopyDone }]);
        rig.apply(random_ops(&mut rng, 10));
        let point = rig.replica.applied();
        let ov = crate::view::Overlay::open(rig.dir.path().join("v.overlay"), SIZE).unwrap();
        let v = rig.replica.open_view(point, Some(ov)).unwrap();
        let mut expect = rig.source.clone();
        v.write(1000, &[0xab; 5000], false).unwrap();
        expect[1000..6000].fill(0xab);
        v.zero(9000, 3, true).unwrap();
        expect[9000..9003].fill(0);
        rig.apply(random_ops(&mut rng, 10));
        let mut buf = vec![0u8; SIZE as usize];
        v.read(0, &mut buf).unwrap();
        assert!(buf == expect, "the writable view lost its writes or moved with replication");
        let mut base = vec![0u8; SIZE as usize];
        rig.replica.disk.read_at(0, &mut base).unwrap();
        assert!(base == rig.source, "a write to the view reached the replica");
        // Its writes survive a reopen of the overlay.
        drop(v);
        let ov = crate::view::Overlay::open(rig.dir.path().join("v.overlay"), SIZE).unwrap();
        let v = rig.replica.open_view(point, Some(ov)).unwrap();
        v.read(0, &mut buf).unwrap();
        assert!(buf == expect);
    }
}
