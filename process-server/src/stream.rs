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

    /// The master target applied everything through `through`: persist it, then free the cache.
    pub fn set_applied(&self, through: Seq) -> anyhow::Result<()> {
        let prev = self.applied.fetch_max(through.0, Ordering::Relaxed);
        if through.0 > prev || !self.known() {
            self.store.put_stream(self.key, StreamRecord { disk_size: self.disk_size, applied: through })?;
        }
        self.next.fetch_max(through.0 + 1, Ordering::Relaxed);
        self.known.store(true, Ordering::Release);
        self.cache.drop_through(through)?;
        self.publish();
        self.freed.notify_waiters();
        Ok(())
    }
}
