//! Small durable state of the process server and the master target, behind [`StateStore`]: which
//! streams exist (disk size, applied position) and, on the master target, the log of applied batches.
//!
//! [`RedbStore`] keeps it in redb (ACID, crash-safe); [`MemStore`] is the in-memory version for tests.
//! One conformance suite runs against both.

use crate::types::{DiskId, ItemId, Seq, StreamKey};
use redb::{ReadableDatabase, ReadableTable, TableDefinition};
use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Mutex;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StreamRecord {
    pub disk_size: u64,
    /// Highest sequence number the master target applied (0: none).
    pub applied: Seq,
}

#[derive(Debug, thiserror::Error)]
#[error("state store {what}: {message}")]
pub struct StateError {
    what: &'static str,
    message: String,
}

impl StateError {
    /// A failure of the store's backend doing `what` (for stores outside this module, and tests).
    pub fn new(what: &'static str, message: impl Into<String>) -> StateError {
        StateError { what, message: message.into() }
    }
}

pub trait StateStore: Send + Sync {
    fn streams(&self) -> Result<Vec<(StreamKey, StreamRecord)>, StateError>;
    fn put_stream(&self, key: StreamKey, rec: StreamRecord) -> Result<(), StateError>;
    /// Atomically logs that `first..=last` was applied and sets the stream's applied position to `last`.
    fn record_apply(&self, key: StreamKey, first: Seq, last: Seq) -> Result<(), StateError>;
    /// A page of a stream's logged batches: up to `limit` whose first sequence number is above
    /// `after`, in order. The log keeps the batches of the last [`APPLY_LOG_KEEP`] changes.
    fn apply_log(&self, key: StreamKey, after: Seq, limit: usize) -> Result<Vec<(Seq, Seq)>, StateError>;
    /// Forgets a stream and its apply log (its replica was handed over at a failover commit).
    fn remove_stream(&self, key: StreamKey) -> Result<(), StateError>;
}

const STREAMS: TableDefinition<(u64, u64), (u64, u64)> = TableDefinition::new("streams");
const APPLY_LOG: TableDefinition<(u64, u64, u64), u64> = TableDefinition::new("apply_log");

/// How many changes back the apply log reaches: older batches are pruned as new ones are recorded.
pub const APPLY_LOG_KEEP: u64 = 1 << 22;

pub struct RedbStore {
    db: redb::Database,
    keep: u64,
}

fn err<E: std::fmt::Display>(what: &'static str) -> impl Fn(E) -> StateError {
    move |e| StateError { what, message: e.to_string() }
}

impl RedbStore {
    pub fn open(path: &Path) -> Result<RedbStore, StateError> {
        let db = create_db(path, LOCK_WAIT)
            .map_err(|e| StateError { what: "open", message: format!("{}: {e}", path.display()) })?;
        let tx = db.begin_write().map_err(err("begin"))?;
        tx.open_table(STREAMS).map_err(err("create streams"))?;
        tx.open_table(APPLY_LOG).map_err(err("create apply_log"))?;
        tx.commit().map_err(err("commit"))?;
        Ok(RedbStore { db, keep: APPLY_LOG_KEEP })
    }

    /// [`RedbStore::open`] keeping the apply log of only the last `keep` changes.
    pub fn open_keeping(path: &Path, keep: u64) -> Result<RedbStore, StateError> {
        Ok(RedbStore { keep, ..RedbStore::open(path)? })
    }
}

/// How long a starting service waits for a killed predecessor to let go of its state database.
pub const LOCK_WAIT: std::time::Duration = std::time::Duration::from_secs(10);

/// Opens (or creates) a redb database. While another process still holds it (a predecessor killed a
/// moment ago and not yet gone), tries again for up to `wait` before giving up.
pub fn create_db(path: &Path, wait: std::time::Duration) -> Result<redb::Database, redb::DatabaseError> {
    let deadline = std::time::Instant::now() + wait;
    let mut told = false;
    loop {
        match redb::Database::create(path) {
            Err(redb::DatabaseError::DatabaseAlreadyOpen) if std::time::Instant::now() < deadline => {
                if !told {
                    tracing::warn!(path = %path.display(), ?wait, "state database still held by another process; waiting");
                    told = true;
                }
                std::thread::sleep(std::time::Duration::from_millis(100));
            }
            r => return r,
        }
    }
}

impl StateStore for RedbStore {
    fn streams(&self) -> Result<Vec<(StreamKey, StreamRecord)>, StateError> {
        let tx = self.db.begin_read().map_err(err("begin read"))?;
        let t = tx.open_table(STREAMS).map_err(err("open streams"))?;
        let mut out = Vec::new();
        for row in t.iter().map_err(err("iterate streams"))? {
            let (k, v) = row.map_err(err("read stream"))?;
            let ((item, disk), (disk_size, applied)) = (k.value(), v.value());
            out.push((
                StreamKey { item: ItemId(item), disk: DiskId(disk) },
                StreamRecord { disk_size, applied: Seq(applied) },
            ));
        }
        Ok(out)
    }

    fn put_stream(&self, key: StreamKey, rec: StreamRecord) -> Result<(), StateError> {
        let tx = self.db.begin_write().map_err(err("begin write"))?;
        {
            let mut t = tx.open_table(STREAMS).map_err(err("open streams"))?;
            t.insert((key.item.0, key.disk.0), (rec.disk_size, rec.applied.0)).map_err(err("write stream"))?;
        }
        tx.commit().map_err(err("commit"))
    }

    fn record_apply(&self, key: StreamKey, first: Seq, last: Seq) -> Result<(), StateError> {
        let tx = self.db.begin_write().map_err(err("begin write"))?;
        {
            let mut t = tx.open_table(STREAMS).map_err(err("open streams"))?;
            let k = (key.item.0, key.disk.0);
            let size = t
                .get(k)
                .map_err(err("read stream"))?
                .map(|v| v.value().0)
                .ok_or_else(|| StateError { what: "record_apply", message: format!("unknown stream {key}") })?;
            t.insert(k, (size, last.0)).map_err(err("write stream"))?;
            let mut log = tx.open_table(APPLY_LOG).map_err(err("open apply_log"))?;
            log.insert((key.item.0, key.disk.0, first.0), last.0).map_err(err("write apply_log"))?;
            // Prune what ended more than `keep` changes ago (usually one old batch per new one).
            let horizon = last.0.saturating_sub(self.keep);
            let oldest = log
                .range((key.item.0, key.disk.0, 0)..=(key.item.0, key.disk.0, u64::MAX))
                .map_err(err("iterate apply_log"))?
                .next()
                .transpose()
                .map_err(err("read apply_log"))?
                .map(|(_, v)| v.value());
            if oldest.is_some_and(|l| l <= horizon) {
                let old = (key.item.0, key.disk.0, 0)..(key.item.0, key.disk.0, horizon);
                log.retain_in(old, |_, l| l > horizon).map_err(err("prune apply_log"))?;
            }
        }
        tx.commit().map_err(err("commit"))
    }

    fn apply_log(&self, key: StreamKey, after: Seq, limit: usize) -> Result<Vec<(Seq, Seq)>, StateError> {
        let tx = self.db.begin_read().map_err(err("begin read"))?;
        let t = tx.open_table(APPLY_LOG).map_err(err("open apply_log"))?;
        let Some(from) = after.0.checked_add(1) else { return Ok(Vec::new()) };
        let range = (key.item.0, key.disk.0, from)..=(key.item.0, key.disk.0, u64::MAX);
        let mut out = Vec::new();
        for row in t.range(range).map_err(err("iterate apply_log"))?.take(limit) {
            let (k, v) = row.map_err(err("read apply_log"))?;
            out.push((Seq(k.value().2), Seq(v.value())));
        }
        Ok(out)
    }

    fn remove_stream(&self, key: StreamKey) -> Result<(), StateError> {
        let tx = self.db.begin_write().map_err(err("begin write"))?;
        {
            let mut t = tx.open_table(STREAMS).map_err(err("open streams"))?;
            t.remove((key.item.0, key.disk.0)).map_err(err("remove stream"))?;
            let mut log = tx.open_table(APPLY_LOG).map_err(err("open apply_log"))?;
            let range = (key.item.0, key.disk.0, 0)..=(key.item.0, key.disk.0, u64::MAX);
            log.retain_in(range, |_, _| false).map_err(err("remove apply_log"))?;
        }
        tx.commit().map_err(err("commit"))
    }
}

/// In-memory [`StateStore`] for tests.
#[derive(Default)]
pub struct MemStore {
    inner: Mutex<MemState>,
}

/// Streams, and the apply log keyed by (stream, first sequence number).
type MemState = (BTreeMap<StreamKey, StreamRecord>, BTreeMap<(StreamKey, Seq), Seq>);

impl StateStore for MemStore {
    fn streams(&self) -> Result<Vec<(StreamKey, StreamRecord)>, StateError> {
        Ok(self.inner.lock().expect("poisoned").0.iter().map(|(k, v)| (*k, *v)).collect())
    }
    fn put_stream(&self, key: StreamKey, rec: StreamRecord) -> Result<(), StateError> {
        self.inner.lock().expect("poisoned").0.insert(key, rec);
        Ok(())
    }
    fn record_apply(&self, key: StreamKey, first: Seq, last: Seq) -> Result<(), StateError> {
        let mut g = self.inner.lock().expect("poisoned");
        let rec =
            g.0.get_mut(&key)
                .ok_or_else(|| StateError { what: "record_apply", message: format!("unknown stream {key}") })?;
        rec.applied = last;
        g.1.insert((key, first), last);
        Ok(())
    }
    fn apply_log(&self, key: StreamKey, after: Seq, limit: usize) -> Result<Vec<(Seq, Seq)>, StateError> {
        let g = self.inner.lock().expect("poisoned");
        Ok(g.1.iter().filter(|((k, f), _)| *k == key && *f > after).map(|((_, f), l)| (*f, *l)).take(limit).collect())
    }
    fn remove_stream(&self, key: StreamKey) -> Result<(), StateError> {
        let mut g = self.inner.lock().expect("poisoned");
        g.0.remove(&key);
        g.1.retain(|(k, _), _| *k != key);
        Ok(())
    }
}

#[cfg(test)]
mod lock_tests {
    #[test]
    fn a_database_still_held_is_waited_for_and_a_timeout_is_its_typed_error() {
        let d = tempfile::tempdir().unwrap();
        let path = d.path().join("state.redb");
        let held = super::create_db(&path, std::time::Duration::ZERO).unwrap();
        assert!(matches!(
            super::create_db(&path, std::time::Duration::ZERO),
            Err(redb::DatabaseError::DatabaseAlreadyOpen)
        ));
        let (tx, rx) = std::sync::mpsc::channel();
        let p = path.clone();
        let waiter = std::thread::spawn(move || {
            tx.send(()).unwrap();
            super::create_db(&p, std::time::Duration::from_secs(60)).map(|_| ())
        });
        rx.recv().unwrap();
        drop(held);
        waiter.join().unwrap().unwrap();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn conformance(s: &dyn StateStore) {
        let a = StreamKey { item: ItemId(1), disk: DiskId(1) };
        let b = StreamKey { item: ItemId(1), disk: DiskId(2) };
        assert!(s.streams().unwrap().is_empty());
        assert!(s.record_apply(a, Seq(1), Seq(2)).is_err(), "unknown stream");
        s.put_stream(a, StreamRecord { disk_size: 10, applied: Seq(0) }).unwrap();
        s.put_stream(b, StreamRecord { disk_size: 20, applied: Seq(0) }).unwrap();
        s.record_apply(a, Seq(1), Seq(5)).unwrap();
        s.record_apply(a, Seq(6), Seq(9)).unwrap();
        s.record_apply(b, Seq(1), Seq(1)).unwrap();
        let streams = s.streams().unwrap();
        assert_eq!(streams[0], (a, StreamRecord { disk_size: 10, applied: Seq(9) }));
        assert_eq!(streams[1], (b, StreamRecord { disk_size: 20, applied: Seq(1) }));
        let all = |s: &dyn StateStore, k| s.apply_log(k, Seq(0), usize::MAX).unwrap();
        assert_eq!(all(s, a), vec![(Seq(1), Seq(5)), (Seq(6), Seq(9))]);
        assert_eq!(s.apply_log(a, Seq(0), 1).unwrap(), vec![(Seq(1), Seq(5))], "a page");
        assert_eq!(s.apply_log(a, Seq(1), 10).unwrap(), vec![(Seq(6), Seq(9))], "the next page");
        assert_eq!(s.apply_log(a, Seq(u64::MAX), 10).unwrap(), vec![]);
        assert_eq!(all(s, b), vec![(Seq(1), Seq(1))]);
        let c = StreamKey { item: ItemId(3), disk: DiskId(1) };
        s.put_stream(c, StreamRecord { disk_size: 5, applied: Seq(0) }).unwrap();
        s.record_apply(c, Seq(1), Seq(3)).unwrap();
        s.remove_stream(c).unwrap();
        assert_eq!(s.streams().unwrap().len(), 2);
        assert!(all(s, c).is_empty());
        assert_eq!(all(s, a).len(), 2, "other streams keep their log");
    }

    #[test]
    fn mem_store_conforms() {
        conformance(&MemStore::default());
    }

    #[test]
    fn redb_store_conforms_and_persists() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("state.redb");
        conformance(&RedbStore::open(&p).unwrap());
        let s = RedbStore::open(&p).unwrap();
        assert_eq!(s.streams().unwrap().len(), 2);
    }

    #[test]
    fn the_apply_log_keeps_only_the_last_changes() {
        let d = tempfile::tempdir().unwrap();
        let s = RedbStore::open_keeping(&d.path().join("state.redb"), 100).unwrap();
        let (a, b) = (StreamKey { item: ItemId(1), disk: DiskId(1) }, StreamKey { item: ItemId(2), disk: DiskId(1) });
        s.put_stream(a, StreamRecord { disk_size: 10, applied: Seq(0) }).unwrap();
        s.put_stream(b, StreamRecord { disk_size: 10, applied: Seq(0) }).unwrap();
        s.record_apply(b, Seq(1), Seq(1)).unwrap();
        for first in (1..=1000).step_by(10) {
            s.record_apply(a, Seq(first), Seq(first + 9)).unwrap();
        }
        let log = s.apply_log(a, Seq(0), usize::MAX).unwrap();
        assert_eq!(log.first(), Some(&(Seq(901), Seq(910))), "batches ending more than 100 changes back are gone");
        assert_eq!(log.last(), Some(&(Seq(991), Seq(1000))));
        assert!(log.windows(2).all(|w| w[1].0 .0 == w[0].1 .0 + 1), "what is kept is contiguous");
        assert_eq!(s.apply_log(b, Seq(0), usize::MAX).unwrap(), vec![(Seq(1), Seq(1))], "other streams keep theirs");
    }
}
