//! One replicated disk as the process server sees it: its cache, the master target's applied
//! position, and the next sequence number it expects from the agent.
//!
//! Invariant: a batch is deleted from the cache only after the applied position covering it was
//! persisted, so `max(applied, cache.last) + 1` is never below anything the agent was told is durable.

use crate::cache::StreamCache;
use crate::metrics as m;
use sr_common::state::{StateStore, StreamRecord};
use sr_common::types::{Seq, StreamKey};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use tokio_util::sync::CancellationToken;

pub struct Stream {
    pub key: StreamKey,
    pub disk_size: u64,
    pub cache: StreamCache,
    applied: AtomicU64,
    /// Whether `applied` is known (from the state store or from the master target).
    known: AtomicBool,
    /// Next sequence number expected from the agent.
    next: AtomicU64,
    /// Wakes the forwarder when a batch was cached.
    pub cached: tokio::sync::Notify,
    /// Wakes waiting agent sessions when cache space was freed or the position became known.
    pub freed: tokio::sync::Notify,
    /// Cancels the current agent session when a newer one for the same disk arrives.
    pub session: Mutex<Option<CancellationToken>>,
    pub forwarder: std::sync::Once,
    /// Why forwarding cannot go on by retrying (a fatal code and its reason), reported to the
    /// configuration server; cleared by a session that forwards again.
    pub fault: Mutex<Option<(sr_common::wire::ErrorCode, String)>>,
    store: Arc<dyn StateStore>,
    /// Serializes persisting the applied position, so an older position never overwrites a newer one.
    persist: Mutex<()>,
    lag: metrics::Gauge,
    applied_gauge: metrics::Gauge,
    cached_gauge: metrics::Gauge,
}

impl Stream {
    pub fn new(
        key: StreamKey,
        rec: StreamRecord,
        known: bool,
        cache: StreamCache,
        store: Arc<dyn StateStore>,
    ) -> Stream {
        let item = key.item.to_string();
        let disk = key.disk.to_string();
        let next = rec.applied.0.max(cache.last().map_or(0, |s| s.0)) + 1;
        let s = Stream {
            key,
            disk_size: rec.disk_size,
            cache,
            applied: AtomicU64::new(rec.applied.0),
            known: AtomicBool::new(known),
            next: AtomicU64::new(next),
            cached: tokio::sync::Notify::new(),
            freed: tokio::sync::Notify::new(),
            session: Mutex::new(None),
            forwarder: std::sync::Once::new(),
            fault: Mutex::new(None),
            store,
            persist: Mutex::new(()),
            lag: metrics::gauge!(m::LAG_CHANGES, "item" => item.clone(), "disk" => disk.clone()),
            applied_gauge: metrics::gauge!(m::APPLIED_SEQ, "item" => item.clone(), "disk" => disk.clone()),
            cached_gauge: metrics::gauge!(m::CACHED_SEQ, "item" => item, "disk" => disk),
        };
        s.publish();
        s
    }

    fn publish(&self) {
        let applied = self.applied.load(Ordering::Relaxed);
        let next = self.next.load(Ordering::Relaxed);
        self.applied_gauge.set(applied as f64);
        self.cached_gauge.set((next - 1) as f64);
        self.lag.set((next - 1).saturating_sub(applied) as f64);
    }

    pub fn known(&self) -> bool {
        self.known.load(Ordering::Acquire)
    }
    pub fn applied(&self) -> Seq {
        Seq(self.applied.load(Ordering::Relaxed))
    }
    pub fn next(&self) -> Seq {
        Seq(self.next.load(Ordering::Relaxed))
    }

    /// A batch ending at `last` is durable in the cache.
    pub fn cached_through(&self, last: Seq) {
        self.next.fetch_max(last.0 + 1, Ordering::Relaxed);
        self.publish();
        self.cached.notify_one();
    }

    /// The master target applied everything through `through`: persist it, then free the cache. The
    /// position in memory (which frees the cache and is relayed to the agent, which trims its journal
    /// on it) moves only once it is persisted: after a failed write the next call writes it again,
    /// and a restart never finds the store behind what the agent was told.
    pub fn set_applied(&self, through: Seq) -> anyhow::Result<()> {
        {
            let _one_at_a_time = self.persist.lock().expect("persist lock poisoned");
            if through.0 > self.applied.load(Ordering::Relaxed) || !self.known() {
                self.store.put_stream(self.key, StreamRecord { disk_size: self.disk_size, applied: through })?;
            }
            self.applied.fetch_max(through.0, Ordering::Relaxed);
        }
        self.next.fetch_max(through.0 + 1, Ordering::Relaxed);
        self.known.store(true, Ordering::Release);
        self.cache.drop_through(through)?;
        self.publish();
        self.freed.notify_waiters();
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use sr_common::state::{MemStore, StateError};
    use sr_common::types::{DiskId, ItemId};
    use std::sync::atomic::AtomicBool;

    /// A store whose stream writes fail while `full` is set, as on a full volume.
    #[derive(Default)]
    struct FullVolume {
        inner: MemStore,
        full: AtomicBool,
    }

    impl StateStore for FullVolume {
        fn streams(&self) -> Result<Vec<(StreamKey, StreamRecord)>, StateError> {
            self.inner.streams()
        }
        fn put_stream(&self, key: StreamKey, rec: StreamRecord) -> Result<(), StateError> {
            if self.full.load(Ordering::Relaxed) {
                return Err(StateError::new("put_stream", "no space left on device"));
            }
            self.inner.put_stream(key, rec)
        }
        fn record_apply(&self, key: StreamKey, first: Seq, last: Seq) -> Result<(), StateError> {
            self.inner.record_apply(key, first, last)
        }
        fn apply_log(&self, key: StreamKey, after: Seq, limit: usize) -> Result<Vec<(Seq, Seq)>, StateError> {
            self.inner.apply_log(key, after, limit)
        }
        fn remove_stream(&self, key: StreamKey) -> Result<(), StateError> {
            self.inner.remove_stream(key)
        }
    }

    #[test]
    fn the_applied_position_moves_only_once_it_is_persisted() {
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(FullVolume::default());
        let key = StreamKey { item: ItemId(1), disk: DiskId(1) };
        let cache = StreamCache::open(dir.path(), Default::default()).unwrap();
        let rec = StreamRecord { disk_size: 1 << 20, applied: Seq(3) };
        let s = Stream::new(key, rec, true, cache, store.clone());
        store.full.store(true, Ordering::Relaxed);
        assert!(s.set_applied(Seq(10)).is_err());
        assert_eq!(s.applied(), Seq(3), "not relayed to the agent before it is persisted");
        store.full.store(false, Ordering::Relaxed);
        s.set_applied(Seq(10)).unwrap();
        assert_eq!(store.streams().unwrap(), [(key, StreamRecord { disk_size: 1 << 20, applied: Seq(10) })]);
        assert_eq!(s.applied(), Seq(10));
    }
}
