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

use crate::export_name;
use crate::points::ViewRecord;
use crate::view::BLOCK;
use crate::Server;
use sr_common::split::{coalesce, Split};
use std::path::PathBuf;

const CHUNK: u64 = 1 << 20;

impl Server {
    /// Commits the failover view `name` as generation `generation`. Returns each disk's new path.
    pub fn commit_view(&self, name: &str, generation: u64) -> Result<serde_json::Value, (u16, String)> {
        if generation == 0 {
            return Err((400, "generation: must be at least 1".into()));
        }
        let view = self.views.lock().expect("views lock poisoned").get(name).cloned();
        let view = view.ok_or((404, format!("no view named {name}")))?;
        if !view.record.writable {
            return Err((409, format!("view {name} is read-only: only a writable (failover) view can be committed")));
        }
        let mut done = Vec::new();
        for (export, pv) in &view.disks {
            let r = &pv.replica;
            if let Some(t) = r.session.lock().expect("session lock poisoned").take() {
                t.cancel();
            }
            let _w = r.gate.write().expect("replica gate poisoned");
            let fail = |what: &str, e: std::io::Error| (500, format!("{}: {what}: {e}", r.key));
            let map = pv.map.lock().expect("view map poisoned");
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
            done.push((r.clone(), changed));
        }
        // Every disk holds its committed contents now; hand the files over.
        let mut out = Vec::new();
        for (r, changed) in done {
            let key = r.key;
            let link = self.replica_path(key);
            let adopted = std::fs::symlink_metadata(&link).map(|m| m.file_type().is_symlink()).unwrap_or(false);
            let dest = if adopted {
                std::fs::read_link(&link).map_err(|e| (500, format!("{key}: reading {}: {e}", link.display())))?
            } else {
                let dir = self.cfg.data_dir.join("failed-over");
                std::fs::create_dir_all(&dir).map_err(|e| (500, format!("creating {}: {e}", dir.display())))?;
                dir.join(format!("{}.img", export_name(key)))
            };
            let split = Split { version: sr_common::split::VERSION, generation, disk_size: r.disk.size(), changed };
            split
                .write(&dest)
                .map_err(|e| (500, format!("{key}: writing the split record of {}: {e}", dest.display())))?;
            self.store.remove_stream(key).map_err(|e| (500, format!("{key}: {e}")))?;
            if adopted {
                std::fs::remove_file(&link).map_err(|e| (500, format!("removing {}: {e}", link.display())))?;
            } else {
                std::fs::rename(&link, &dest)
                    .map_err(|e| (500, format!("moving {} to {}: {e}", link.display(), dest.display())))?;
            }
            self.forget(key);
            self.end_stream(key, &format!("its replica was handed over by a failover commit (now {})", dest.display()));
            out.push(serde_json::json!({
                "disk": key.disk.0, "path": dest, "generation": generation,
                "changed_bytes": split.changed_bytes(), "size": r.disk.size(),
            }));
        }
        self.drop_view_record(&view.record);
        Ok(serde_json::json!({ "view": name, "disks": out }))
    }

    fn drop_view_record(&self, rec: &ViewRecord) {
        if let Some(v) = self.views.lock().expect("views lock poisoned").remove(&rec.name) {
            for (export, pv) in &v.disks {
                self.exports.remove(export);
                if let Some(ov) = &pv.overlay {
                    ov.remove();
                }
            }
        }
        let _ = std::fs::remove_file(self.cfg.data_dir.join("views").join(format!("{}.json", rec.name)));
    }

    /// Replication of `item` back into a disk of the other site: the replica of (item, disk) is the file
    /// at `path`, which holds the disk as it was at the failover (a symlink in place of a new file).
    pub fn adopt(&self, key: sr_common::types::StreamKey, path: &std::path::Path) -> anyhow::Result<bool> {
        use anyhow::Context;
        let link: PathBuf = self.replica_path(key);
        if self.get(key).is_some() || std::fs::symlink_metadata(&link).is_ok() {
            return Ok(false);
        }
        anyhow::ensure!(path.is_absolute(), "{key}: disk path {} is not absolute", path.display());
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
        let rec = serde_json::json!({ "item": key.item.0, "disk": key.disk.0, "why": why });
        let r = std::fs::create_dir_all(&dir).and_then(|_| {
            sr_common::crashsafe::write_file(
                &dir.join(format!("{}.json", export_name(key))),
                rec.to_string().as_bytes(),
            )
        });
        if let Err(e) = r {
            tracing::warn!(%key, error = %e, "recording the end of the stream");
        }
        self.broken.lock().expect("broken lock poisoned").insert(key, format!("the stream ended: {why}"));
    }

    /// Streams ended by a commit before a restart.
    pub(crate) fn load_ended(&self) {
        let Ok(entries) = std::fs::read_dir(self.cfg.data_dir.join("ended")) else { return };
        for e in entries.flatten() {
            let Ok(v) = std::fs::read(e.path()).map(|b| serde_json::from_slice::<serde_json::Value>(&b)) else {
                continue;
            };
            let Ok(v) = v else { continue };
            let (Some(item), Some(disk)) = (v["item"].as_u64(), v["disk"].as_u64()) else { continue };
            let key = sr_common::types::StreamKey {
                item: sr_common::types::ItemId(item),
                disk: sr_common::types::DiskId(disk),
            };
            let why = v["why"].as_str().unwrap_or("a failover commit").to_string();
            self.broken.lock().expect("broken lock poisoned").insert(key, format!("the stream ended: {why}"));
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
