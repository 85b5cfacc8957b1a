//! One replica disk: the latest applied state of a protected disk, and its applied position.
//!
//! Applying a batch takes the write side of `gate`; NBD reads and exports take the read side, so a
//! reader never sees half of a batch: what it reads is the source at some applied sequence number.

use crate::metrics as m;
use sr_common::disk::DiskFile;
use sr_common::nbd::{Backend, BackendError};
use sr_common::state::StateStore;
use sr_common::types::{Seq, StreamKey};
use sr_common::wire::{Batch, Op};
use std::os::unix::fs::MetadataExt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use tokio_util::sync::CancellationToken;

pub struct Replica {
    pub key: StreamKey,
    pub disk: DiskFile,
    /// Excludes readers while a batch is being applied.
    pub gate: RwLock<()>,
    applied: AtomicU64,
    /// Cancels the current process-server session when a newer one for this disk arrives.
    pub session: Mutex<Option<CancellationToken>>,
    applied_gauge: metrics::Gauge,
    allocated: metrics::Gauge,
    last_apply: metrics::Gauge,
}

impl Replica {
    pub fn new(key: StreamKey, disk: DiskFile, applied: Seq) -> Replica {
        let (item, d) = (key.item.to_string(), key.disk.to_string());
        let r = Replica {
            key,
            disk,
            gate: RwLock::new(()),
            applied: AtomicU64::new(applied.0),
            session: Mutex::new(None),
            applied_gauge: metrics::gauge!(m::APPLIED_SEQ, "item" => item.clone(), "disk" => d.clone()),
            allocated: metrics::gauge!(m::REPLICA_BYTES, "item" => item.clone(), "disk" => d.clone()),
            last_apply: metrics::gauge!(m::LAST_APPLY_TIME, "item" => item, "disk" => d),
        };
        r.applied_gauge.set(applied.0 as f64);
        r
    }

    pub fn applied(&self) -> Seq {
        Seq(self.applied.load(Ordering::Acquire))
    }

    /// Applies a verified batch that starts right after the applied position, makes it durable, and
    /// records it. Blocking. Redoing a batch after a crash before the record is harmless: the same
    /// changes land on the same bytes in the same order.
    pub fn apply(&self, batch: &Batch, store: &dyn StateStore) -> anyhow::Result<u64> {
        use anyhow::Context;
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
            for c in &batch.changes {
                match &c.op {
                    Op::Write { offset, data } => {
                        self.disk
                            .write_at(*offset, data)
                            .with_context(|| format!("{}: writing seq {}", self.key, c.seq))?;
                        bytes += data.len() as u64;
                    }
                    Op::Zero { offset, len } => {
                        self.disk
                            .zero(*offset, *len)
                            .with_context(|| format!("{}: zeroing seq {}", self.key, c.seq))?;
                    }
                    Op::Marker { .. } => {}
                }
            }
            self.disk.sync().with_context(|| format!("{}: syncing the replica", self.key))?;
            store.record_apply(self.key, batch.first, batch.last)?;
            self.applied.store(batch.last.0, Ordering::Release);
        }
        self.applied_gauge.set(batch.last.0 as f64);
        if let Ok(meta) = self.disk.file().metadata() {
            self.allocated.set((meta.blocks() * 512) as f64);
        }
        let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
        self.last_apply.set(now.as_secs_f64());
        Ok(bytes)
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
}
