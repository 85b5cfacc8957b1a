//! Failover commit: the failed-over disks (a writable view at the chosen point) become plain disk files
//! on this host, and the replica stream ends.
//!
//! ```text
//! per disk, apply sessions cut off, replica gate held:
//!   point's ranges (the view map) --> written into the replica   (the replica now is the point)
//!   overlay blocks (writes made on the failed-over disk) --> written into the replica
//!   fsync --> <disk>.srsplit {generation, those ranges} --> file moved to failed-over/ (or, for a disk
//!   adopted from the other site, left where it is) --> stream, undo journal and view forgotten
//! ```
//! Until the stream is forgotten a repeat of the commit gives the same bytes: the view reads the point
//! from the undo journal, which materializing does not touch.

/// Record kinds and the format this build writes and reads ([`sr_common::crashsafe`]).
const COMMIT: &str = "commit";
const ENDED: &str = "ended-stream";
const RECORD_VERSION: u32 = 1;

/// A stream a failover commit ended: refused from then on, also after a restart.
#[derive(Debug, serde::Serialize, serde::Deserialize)]
struct Ended {
    item: u64,
    disk: u64,
    why: String,
}

use crate::export_name;
use crate::view::BLOCK;
use crate::Server;
use sr_common::split::{coalesce, Split};
use std::path::PathBuf;

const CHUNK: u64 = 1 << 20;

/// One disk's handover, recorded before any of it happens so a restart finishes it.
#[derive(serde::Serialize, serde::Deserialize)]
struct HandOver {
    item: u64,
    disk: u64,
    size: u64,
    /// The replica's path in `replicas/` (a symlink when the disk was adopted from the other site).
    link: PathBuf,
    dest: PathBuf,
    adopted: bool,
    changed: Vec<(u64, u64)>,
}

#[derive(serde::Serialize, serde::Deserialize)]
struct CommitRecord {
    view: String,
    generation: u64,
    disks: Vec<HandOver>,
    done: bool,
}

impl CommitRecord {
    fn result(&self) -> serde_json::Value {
        let disks = self
            .disks
            .iter()
            .map(|d| sr_common::contract::CommittedDisk {
                disk: d.disk,
                path: d.dest.display().to_string(),
                generation: self.generation,
                changed_bytes: d.changed.iter().map(|c| c.1).sum::<u64>(),
                size: d.size,
            })
            .collect();
        let answer = sr_common::contract::CommitAnswer { view: self.view.clone(), disks };
        serde_json::to_value(answer).expect("a commit answer serializes")
    }
}

impl Server {
    fn commit_path(&self, view: &str) -> PathBuf {
        self.cfg.data_dir.join("commits").join(format!("{view}.json"))
    }

    fn save_commit(&self, rec: &CommitRecord) -> Result<(), (u16, String)> {
        let path = self.commit_path(&rec.view);
        std::fs::create_dir_all(path.parent().expect("commits dir"))
            .and_then(|_| sr_common::crashsafe::write_record(&path, COMMIT, RECORD_VERSION, rec))
            .map_err(|e| (500, format!("recording the commit in {}: {e}", path.display())))
    }

    /// Commits the failover view `name` as generation `generation`. Returns each disk's new path. Asking
    /// again (after an answer was lost, or a crash) gives the same answer.
    pub fn commit_view(&self, name: &str, generation: u64) -> Result<serde_json::Value, (u16, String)> {
        if generation == 0 {
            return Err((400, "generation: must be at least 1".into()));
        }
        crate::points::valid_name(name).map_err(|e| (400, e))?;
        let recorded =
            sr_common::crashsafe::read_record::<CommitRecord>(&self.commit_path(name), COMMIT, RECORD_VERSION)
                .map_err(|e| (500, e.to_string()))?;
        if let Some(sr_common::crashsafe::Record { value: mut rec, .. }) = recorded {
            if rec.generation != generation {
                return Err((
                    409,
                    format!("view {name} was committed as generation {}, not {generation}", rec.generation),
                ));
            }
            if !rec.done {
                self.hand_over(&mut rec)?;
            }
            return Ok(rec.result());
        }
        let view = self.views.lock().expect("views lock poisoned").get(name).cloned();
        let view = view.ok_or((404, format!("no view named {name}")))?;
        if !view.record.writable {
            return Err((409, format!("view {name} is read-only: only a writable (failover) view can be committed")));
        }
        let mut disks = Vec::new();
        for (export, pv) in &view.disks {
            let r = &pv.replica;
            if let Some(t) = r.session.lock().expect("session lock poisoned").take() {
                t.cancel();
            }
            // No write reaches the failed-over disk from here on.
            self.exports.remove(export);
            pv.close();
            let _w = r.gate.write().expect("replica gate poisoned");
            let fail = |what: &str, e: std::io::Error| (500, format!("{}: {what}: {e}", r.key));
            let map = r.undo.lock().expect("undo lock poisoned").view_map(pv.point, 0, r.disk.size());
            let map = map.map_err(|e| fail("reading the point's undo records", e.into()))?;
            let mut changed = map.ranges();
            let mut buf = vec![0u8; CHUNK as usize];
            for &(start, len) in &changed {
                let mut off = start;
                while off < start + len {
                    let n = CHUNK.min(start + len - off) as usize;
                    map.read(off, &mut buf[..n], &|o, b| r.disk.read_at(o, b))
                        .map_err(|e| fail("reading the point", e))?;
                    r.disk.write_at(off, &buf[..n]).map_err(|e| fail("writing the point into the replica", e))?;
                    off += n as u64;
                }
            }
            drop(map);
            if let Some(ov) = &pv.overlay {
                let size = r.disk.size();
                for b in ov.blocks() {
                    let (s, e) = (b * BLOCK, ((b + 1) * BLOCK).min(size));
                    let blk = &mut buf[..(e - s) as usize];
                    ov.read_block(b, blk).map_err(|e| fail("reading the failed-over disk's writes", e))?;
                    r.disk.write_at(s, blk).map_err(|e| fail("writing the failed-over disk's writes", e))?;
                    changed.push((s, e - s));
                }
            }
            r.disk.sync().map_err(|e| fail("syncing", e))?;
            let changed = coalesce(changed);
            tracing::info!(key = %r.key, export, changed_bytes = changed.iter().map(|c| c.1).sum::<u64>(), "failover disk materialized");
            let key = r.key;
            let link = self.replica_path(key);
            let adopted = std::fs::symlink_metadata(&link).map(|m| m.file_type().is_symlink()).unwrap_or(false);
            let dest = if adopted {
                std::fs::read_link(&link).map_err(|e| (500, format!("{key}: reading {}: {e}", link.display())))?
            } else {
                self.cfg.data_dir.join("failed-over").join(format!("{}.img", export_name(key)))
            };
            disks.push(HandOver {
                item: key.item.0,
                disk: key.disk.0,
                size: r.disk.size(),
                link,
                dest,
                adopted,
                changed,
            });
        }
        // Every disk holds its committed contents now (the undo journal still has the point, so doing
        // all of the above again gives the same bytes). From the record on, only the handover is left.
        let mut rec = CommitRecord { view: name.to_string(), generation, disks, done: false };
        self.save_commit(&rec)?;
        if std::env::var_os("SR_TEST_CRASH_AFTER_COMMIT_RECORD").is_some() {
            // Fault injection for the tests: die like a SIGKILL between the record and the handover.
            std::process::abort();
        }
        self.hand_over(&mut rec)?;
        Ok(rec.result())
    }

    /// The handover steps of a commit; each is idempotent, so a restart may run them again.
    fn hand_over(&self, rec: &mut CommitRecord) -> Result<(), (u16, String)> {
        for d in &rec.disks {
            let key = sr_common::types::StreamKey {
                item: sr_common::types::ItemId(d.item),
                disk: sr_common::types::DiskId(d.disk),
            };
            let err = |what: &str, e: std::io::Error| (500, format!("{key}: {what}: {e}"));
            let split = Split {
                version: sr_common::split::VERSION,
                generation: rec.generation,
                disk_size: d.size,
                changed: d.changed.clone(),
            };
            if let Some(dir) = d.dest.parent() {
                std::fs::create_dir_all(dir).map_err(|e| err(&format!("creating {}", dir.display()), e))?;
            }
            split.write(&d.dest).map_err(|e| err(&format!("writing the split record of {}", d.dest.display()), e))?;
            self.store.remove_stream(key).map_err(|e| (500, format!("{key}: {e}")))?;
            let link_there = std::fs::symlink_metadata(&d.link).is_ok();
            if d.adopted && link_there {
                std::fs::remove_file(&d.link).map_err(|e| err(&format!("removing {}", d.link.display()), e))?;
            } else if link_there {
                std::fs::rename(&d.link, &d.dest)
                    .map_err(|e| err(&format!("moving {} to {}", d.link.display(), d.dest.display()), e))?;
            }
            // Both directories durable before the commit is recorded as done: a power loss must not
            // undo the move after the record says it happened.
            for dir in [d.link.parent(), d.dest.parent()].into_iter().flatten() {
                if std::fs::symlink_metadata(dir).is_ok() {
                    sr_common::crashsafe::fsync_dir(dir).map_err(|e| err(&format!("syncing {}", dir.display()), e))?;
                }
            }
            self.forget(key);
            self.end_stream(
                key,
                &format!("its replica was handed over by a failover commit (now {})", d.dest.display()),
            );
        }
        self.drop_view_record(&rec.view);
        rec.done = true;
        self.save_commit(rec)
    }

    /// Finishes the handovers a crash interrupted; runs before streams and views are opened.
    pub(crate) fn finish_commits(&self) {
        let Ok(entries) = std::fs::read_dir(self.cfg.data_dir.join("commits")) else { return };
        for e in entries.flatten() {
            let mut rec = match sr_common::crashsafe::read_record::<CommitRecord>(&e.path(), COMMIT, RECORD_VERSION) {
                Ok(Some(r)) => r.value,
                Ok(None) => continue,
                Err(e) => {
                    tracing::error!(error = %e, "unreadable commit record; left as it is");
                    continue;
                }
            };
            if !rec.done {
                match self.hand_over(&mut rec) {
                    Ok(()) => tracing::info!(view = rec.view, "finished a failover commit interrupted by a restart"),
                    Err((_, m)) => {
                        tracing::error!(view = rec.view, error = m, "finishing an interrupted commit failed")
                    }
                }
            }
        }
    }

    fn drop_view_record(&self, name: &str) {
        if let Some(v) = self.views.lock().expect("views lock poisoned").remove(name) {
            for (export, pv) in &v.disks {
                self.exports.remove(export);
                if let Some(ov) = &pv.overlay {
                    ov.remove();
                }
            }
        }
        let views = self.cfg.data_dir.join("views");
        let _ = std::fs::remove_file(views.join(format!("{name}.json")));
        // Overlays of a view not open (a restart before it was reopened).
        if let Ok(entries) = std::fs::read_dir(&views) {
            for e in entries.flatten() {
                let f = e.file_name().to_string_lossy().to_string();
                if f.starts_with(&format!("{name}-disk-")) {
                    let _ = std::fs::remove_file(e.path());
                }
            }
        }
    }

    /// Replication of `item` back into a disk of the other site: the replica of (item, disk) is the file
    /// at `path`, which holds the disk as it was at the failover (a symlink in place of a new file).
    pub fn adopt(&self, key: sr_common::types::StreamKey, path: &std::path::Path) -> anyhow::Result<bool> {
        use anyhow::Context;
        let link: PathBuf = self.replica_path(key);
        anyhow::ensure!(path.is_absolute(), "{key}: disk path {} is not absolute", path.display());
        if std::fs::symlink_metadata(&link).is_ok() {
            // Adopted before, or a replica of its own: only the first may go on.
            let target = std::fs::read_link(&link).ok();
            anyhow::ensure!(
                target.as_deref() == Some(path),
                "{key}: {} exists and is not the disk {} to replicate into; remove it if it is left over",
                link.display(),
                path.display()
            );
            return Ok(false);
        }
        anyhow::ensure!(self.get(key).is_none(), "{key}: a replica is open already");
        let meta =
            std::fs::metadata(path).with_context(|| format!("{key}: disk to replicate into {}", path.display()))?;
        anyhow::ensure!(
            meta.is_file() || std::os::unix::fs::FileTypeExt::is_block_device(&meta.file_type()),
            "{key}: {} is neither a file nor a block device",
            path.display()
        );
        std::os::unix::fs::symlink(path, &link)
            .with_context(|| format!("linking {} to {}", link.display(), path.display()))?;
        tracing::info!(%key, path = %path.display(), "replicating into an existing disk (reverse direction)");
        Ok(true)
    }

    /// Refuses the stream of `key` from now on, also after a restart, saying `why`.
    fn end_stream(&self, key: sr_common::types::StreamKey, why: &str) {
        let dir = self.cfg.data_dir.join("ended");
        let rec = Ended { item: key.item.0, disk: key.disk.0, why: why.to_string() };
        let r = std::fs::create_dir_all(&dir).and_then(|_| {
            sr_common::crashsafe::write_record(
                &dir.join(format!("{}.json", export_name(key))),
                ENDED,
                RECORD_VERSION,
                &rec,
            )
        });
        if let Err(e) = r {
            tracing::warn!(%key, error = %e, "recording the end of the stream");
        }
        self.broken
            .lock()
            .expect("broken lock poisoned")
            .insert(key, crate::Broken::new(crate::BrokenKind::Ended, format!("the stream ended: {why}")));
    }

    /// Streams ended by a commit before a restart.
    pub(crate) fn load_ended(&self) {
        let Ok(entries) = std::fs::read_dir(self.cfg.data_dir.join("ended")) else { return };
        for e in entries.flatten() {
            let rec = match sr_common::crashsafe::read_record::<Ended>(&e.path(), ENDED, RECORD_VERSION) {
                Ok(Some(r)) => r.value,
                Ok(None) => continue,
                Err(e) => {
                    // Refusing the stream is what the record asked; it cannot be known which one.
                    tracing::error!(error = %e, "unreadable record of an ended stream; left as it is");
                    continue;
                }
            };
            let key = sr_common::types::StreamKey {
                item: sr_common::types::ItemId(rec.item),
                disk: sr_common::types::DiskId(rec.disk),
            };
            let why = rec.why;
            self.broken
                .lock()
                .expect("broken lock poisoned")
                .insert(key, crate::Broken::new(crate::BrokenKind::Ended, format!("the stream ended: {why}")));
        }
    }

    /// Forgets a replica: its NBD export, its undo journal, its handle.
    fn forget(&self, key: sr_common::types::StreamKey) {
        self.exports.remove(&export_name(key));
        self.replicas.lock().expect("replicas lock poisoned").remove(&key);
        let undo = self.cfg.data_dir.join("undo").join(export_name(key));
        if let Err(e) = std::fs::remove_dir_all(&undo) {
            tracing::warn!(%key, error = %e, "removing the undo journal of a committed replica");
        }
    }
}
