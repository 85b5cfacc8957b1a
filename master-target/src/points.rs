//! Recovery points of the replicas on this master target: listing, choosing one point for all disks
//! of an item, views (read-only or writable disks at a point, served over NBD), image export at a
//! point, and expiry.
//!
//! ```text
//! GET    /v1/points?item=I                   retained range, named points, undo bytes per disk
//! POST   /v1/views {name,item,point,writable} every disk of the item at one point, as NBD exports
//! GET    /v1/views                            open views
//! DELETE /v1/views/{name}                     close a view and discard its overlay
//! POST   /v1/export {item,disk,path,point?}   a sparse raw image of one disk at a point
//! ```
//!
//! A view is recorded in `data_dir/views/NAME.json` (its overlay files beside it) and reopened after a
//! restart; while it is open, expiry keeps every point it needs.

/// The record kind of a view and the format this build writes and reads ([`sr_common::crashsafe`]).
const VIEW: &str = "view";
const VIEW_VERSION: u32 = 1;

use crate::replica::Replica;
use crate::undo::{fmt_time, PointKind};
use crate::view::{Overlay, PointView};
use crate::Server;
use serde::{Deserialize, Serialize};
use sr_common::types::{DiskId, ItemId, Seq, StreamKey};
use std::sync::Arc;

pub use sr_common::contract::PointSpec;

/// The point chosen for each disk of an item.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Chosen {
    pub disk: u64,
    pub seq: u64,
    /// Capture time of the last change at the point (µs), if known.
    pub at_us: Option<u64>,
    /// Set when the point was named explicitly but is not crash-consistent (it lies where blocks were
    /// copied in block order).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub warning: Option<String>,
}

/// The newest instant at or before `t` whose state is crash-consistent on every disk: moved back to
/// before the window a disk's state at `t` lies in, until none does. `None`: a window reaches back past
/// the oldest retained point.
fn consistent_at(disks: &[Arc<Replica>], mut t: u64) -> Result<u64, String> {
    'again: for _ in 0..1000 {
        for r in disks {
            let undo = r.undo.lock().expect("undo lock poisoned");
            let seq = undo.point_at(t, r.applied()).map_err(|e| format!("disk {}: {e}", r.key.disk))?;
            if let Some(w) = undo.window_at(seq) {
                let Some((_, begin_at)) = w.begin else {
                    return Err(format!(
                        "disk {}: no crash-consistent point is retained before the blocks being copied in block \
                         order (a resync or the journal's overflow); name a point explicitly to use one anyway",
                        r.key.disk
                    ));
                };
                t = begin_at.saturating_sub(1);
                continue 'again;
            }
        }
        return Ok(t);
    }
    Err("could not find a crash-consistent point common to every disk".into())
}

fn replicas_of(server: &Server, item: ItemId) -> Vec<Arc<Replica>> {
    let mut v: Vec<_> = server.all_replicas().into_iter().filter(|r| r.key.item == item).collect();
    v.sort_by_key(|r| r.key.disk);
    v
}

/// Resolves `spec` to one point per disk of `item`, consistent across the disks.
pub fn resolve(server: &Server, item: ItemId, spec: &PointSpec) -> Result<Vec<Chosen>, String> {
    let disks = replicas_of(server, item);
    if disks.is_empty() {
        return Err(format!("item {item} has no replica on master target {}", server.cfg.node));
    }
    let time_us = match spec {
        PointSpec::TimeUs(t) => Some(*t),
        PointSpec::Time(s) => {
            let t = time::OffsetDateTime::parse(s, &time::format_description::well_known::Rfc3339)
                .map_err(|e| format!("time {s:?} is not RFC 3339 (like 2026-11-28T10:00:00Z): {e}"))?;
            Some((t.unix_timestamp_nanos() / 1000).max(0) as u64)
        }
        PointSpec::Latest if disks.len() > 1 => {
            // Every disk carries the machine's bookmarks, so each has a change at least that recent.
            let newest = disks.iter().map(|r| r.undo.lock().expect("undo lock poisoned").time_range().map(|t| t.1));
            let t = newest.collect::<Option<Vec<u64>>>().ok_or("a disk of the item has no recovery point yet")?;
            Some(consistent_at(&disks, t.into_iter().min().unwrap_or(0))?)
        }
        _ => None,
    };
    let mut out = Vec::new();
    for r in &disks {
        let undo = r.undo.lock().expect("undo lock poisoned");
        let applied = r.applied();
        let named = |want: &dyn Fn(&crate::undo::Mark) -> bool| {
            undo.marks().filter(|m| want(m)).last().map(|m| (m.seq, m.tag.clone()))
        };
        let seq = match (spec, time_us) {
            (_, Some(t)) => undo.point_at(t, applied).map_err(|e| format!("disk {}: {e}", r.key.disk))?,
            (PointSpec::Latest, None) => {
                undo.oldest().ok_or_else(|| format!("disk {}: no recovery points yet", r.key.disk))?;
                // The newest crash-consistent point: before the window the applied state lies in.
                match undo.window_at(applied) {
                    None => applied,
                    Some(w) => w.begin.map(|(b, _)| b).ok_or_else(|| {
                        format!(
                            "disk {}: no crash-consistent point is retained before the blocks being copied in block \
                             order (a resync or the journal's overflow); name a point explicitly to use one anyway",
                            r.key.disk
                        )
                    })?,
                }
            }
            (PointSpec::Seq(s), None) => {
                if disks.len() > 1 {
                    return Err(
                        "a sequence number names a point of one disk; this item has several: use a time or a tag"
                            .into(),
                    );
                }
                Seq(*s)
            }
            (PointSpec::Tag(tag), None) => {
                named(&|m| &m.tag == tag).ok_or_else(|| format!("disk {}: no point named {tag:?}", r.key.disk))?.0
            }
            (PointSpec::LatestAppConsistent | PointSpec::LatestBookmark, None) => {
                let app = *spec == PointSpec::LatestAppConsistent;
                // The newest tag present on every disk.
                let mine: Vec<String> = undo
                    .marks()
                    .filter(|m| m.kind.named() && (!app || m.kind == PointKind::AppConsistent))
                    .map(|m| m.tag.clone())
                    .collect();
                drop(undo);
                // Present on every disk, and inside no block-order window on any of them.
                let usable = |d: &Arc<Replica>, t: &String| {
                    let u = d.undo.lock().expect("undo lock poisoned");
                    let windows = u.windows();
                    let found = u.marks().any(|m| &m.tag == t && !windows.iter().any(|w| w.contains(m.seq)));
                    found
                };
                let tag = mine.iter().rev().find(|t| disks.iter().all(|d| usable(d, t))).ok_or_else(|| {
                    format!(
                        "no {} point common to every disk of item {item}",
                        if app { "app-consistent" } else { "named" }
                    )
                })?;
                return resolve(server, item, &PointSpec::Tag(tag.clone()));
            }
            (PointSpec::TimeUs(_) | PointSpec::Time(_), None) => unreachable!("times resolved above"),
        };
        let at_us = undo.time_of(seq);
        let warning = undo.window_at(seq).map(|w| {
            format!(
                "disk {}: the chosen point lies where blocks were copied in block order (after seq {}{}); it is \
                 not crash-consistent and its file systems may need repair",
                r.key.disk,
                w.begin.map_or("before the oldest point".to_string(), |(b, _)| b.0.to_string()),
                w.end.map_or(", still open".to_string(), |(e, _)| format!(", until seq {}", e.0)),
            )
        });
        if let Some(w) = &warning {
            tracing::warn!(item = %item, warning = w, "a point inside a block-order window was chosen");
        }
        out.push(Chosen { disk: r.key.disk.0, seq: seq.0, at_us, warning });
    }
    Ok(out)
}

/// A view as recorded on disk.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ViewRecord {
    pub name: String,
    pub item: u64,
    pub writable: bool,
    pub spec: PointSpec,
    pub disks: Vec<Chosen>,
    pub created_us: u64,
    /// The NBD clients (certificate names) that may open its disks; empty: any NBD client of the
    /// deployment.
    #[serde(default)]
    pub clients: Vec<String>,
}

/// An open view: its record and one NBD export per disk.
pub struct OpenView {
    pub record: ViewRecord,
    pub disks: Vec<(String, Arc<PointView>)>,
}

pub fn view_export_name(view: &str, disk: u64) -> String {
    format!("{view}-disk-{disk}")
}

pub fn valid_name(name: &str) -> Result<(), String> {
    let ok = !name.is_empty()
        && name.len() <= 64
        && name.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !name.starts_with('-')
        && !name.starts_with("item-");
    if ok {
        Ok(())
    } else {
        Err(format!("view name {name:?}: 1 to 64 characters of a-z, 0-9 and '-', not starting with '-' or 'item-'"))
    }
}

impl Server {
    fn views_dir(&self) -> std::path::PathBuf {
        self.cfg.data_dir.join("views")
    }

    /// Opens the disks of `rec` at their points and exports them over NBD.
    fn open_recorded(&self, rec: ViewRecord) -> anyhow::Result<Arc<OpenView>> {
        let mut disks = Vec::new();
        for c in &rec.disks {
            let key = StreamKey { item: ItemId(rec.item), disk: DiskId(c.disk) };
            let r = self.get(key).ok_or_else(|| anyhow::anyhow!("{key}: no replica"))?;
            let overlay = if rec.writable {
                let path = self.views_dir().join(format!("{}.overlay", view_export_name(&rec.name, c.disk)));
                Some(Overlay::open(path, r.disk.size())?)
            } else {
                None
            };
            disks.push((view_export_name(&rec.name, c.disk), r.open_view(Seq(c.seq), overlay)?));
        }
        let allowed = if rec.clients.is_empty() {
            sr_common::nbd::Allowed::Anyone
        } else {
            sr_common::nbd::Allowed::Clients(rec.clients.clone())
        };
        for (name, v) in &disks {
            self.exports.insert_for(name, v.clone(), allowed.clone());
        }
        Ok(Arc::new(OpenView { record: rec, disks }))
    }

    /// Creates a view of every disk of `item` at one point.
    pub fn create_view(
        &self,
        name: String,
        item: ItemId,
        spec: PointSpec,
        writable: bool,
        clients: Vec<String>,
    ) -> Result<Arc<OpenView>, (u16, String)> {
        valid_name(&name).map_err(|e| (400, e))?;
        for c in &clients {
            valid_name(c).map_err(|e| (400, format!("clients: {e}")))?;
        }
        let mut views = self.views.lock().expect("views lock poisoned");
        if views.contains_key(&name) {
            return Err((409, format!("a view named {name} is already open; delete it first")));
        }
        if views.len() >= self.cfg.max_views {
            return Err((
                409,
                format!(
                    "{} views are open, the most this master target keeps (max_views); delete one first",
                    views.len()
                ),
            ));
        }
        let disks = resolve(self, item, &spec).map_err(|e| (409, e))?;
        let rec = ViewRecord {
            name: name.clone(),
            item: item.0,
            writable,
            spec,
            disks,
            created_us: sr_common::types::now_micros(),
            clients,
        };
        let dir = self.views_dir();
        let save = std::fs::create_dir_all(&dir).and_then(|_| {
            sr_common::crashsafe::write_record(&dir.join(format!("{name}.json")), VIEW, VIEW_VERSION, &rec)
        });
        save.map_err(|e| (500, format!("recording view {name} in {}: {e}", dir.display())))?;
        match self.open_recorded(rec) {
            Ok(v) => {
                views.insert(name, v.clone());
                metrics::gauge!(crate::metrics::VIEWS_OPEN).set(views.len() as f64);
                Ok(v)
            }
            Err(e) => {
                let _ = std::fs::remove_file(dir.join(format!("{name}.json")));
                Err((409, format!("{e:#}")))
            }
        }
    }

    /// Closes a view: its exports go away and its overlay is discarded.
    pub fn delete_view(&self, name: &str) -> Result<ViewRecord, String> {
        let mut views = self.views.lock().expect("views lock poisoned");
        let v = views.remove(name).ok_or(format!("no view named {name}"))?;
        metrics::gauge!(crate::metrics::VIEWS_OPEN).set(views.len() as f64);
        drop(views);
        for (export, pv) in &v.disks {
            self.exports.remove(export);
            if let Some(ov) = &pv.overlay {
                ov.remove();
            }
        }
        let _ = std::fs::remove_file(self.views_dir().join(format!("{name}.json")));
        Ok(v.record.clone())
    }

    /// Reopens the views recorded before a restart.
    pub fn reopen_views(&self) {
        let Ok(entries) = std::fs::read_dir(self.views_dir()) else { return };
        for e in entries.flatten() {
            let path = e.path();
            if path.extension().and_then(|x| x.to_str()) != Some("json") {
                continue;
            }
            let rec = sr_common::crashsafe::read_record::<ViewRecord>(&path, VIEW, VIEW_VERSION)
                .map_err(anyhow::Error::from)
                .and_then(|r| anyhow::Context::context(r, "the record vanished"))
                .map(|r| r.value);
            match rec.and_then(|rec| self.open_recorded(rec)) {
                Ok(v) => {
                    tracing::info!(view = v.record.name, "view reopened");
                    self.views.lock().expect("views lock poisoned").insert(v.record.name.clone(), v);
                }
                Err(e) => {
                    tracing::error!(path = %path.display(), error = format!("{e:#}"), "view could not be reopened")
                }
            }
        }
    }

    pub fn view_info(&self, v: &OpenView) -> sr_common::contract::ViewInfo {
        let nbd = self.cfg.advertised_nbd().map(|a| a.to_string());
        let disks = v
            .record
            .disks
            .iter()
            .zip(&v.disks)
            .map(|(c, (export, pv))| sr_common::contract::ViewDisk {
                disk: c.disk,
                seq: c.seq,
                time: c.at_us.map(fmt_time),
                at_us: c.at_us,
                export: export.clone(),
                size: pv.replica.disk.size(),
                uri: nbd.as_ref().map(|a| format!("nbds://{a}/{export}")),
            })
            .collect();
        sr_common::contract::ViewInfo {
            name: v.record.name.clone(),
            item: v.record.item,
            writable: v.record.writable,
            point: v.record.spec.clone(),
            created: fmt_time(v.record.created_us),
            disks,
        }
    }

    pub fn view_json(&self, v: &OpenView) -> serde_json::Value {
        serde_json::to_value(self.view_info(v)).expect("a view serializes")
    }

    /// Recovery points of an item's disks.
    pub fn points_json(&self, item: ItemId) -> Option<serde_json::Value> {
        let disks = replicas_of(self, item);
        if disks.is_empty() {
            return None;
        }
        let rows: Vec<_> = disks
            .iter()
            .map(|r| {
                let undo = r.undo.lock().expect("undo lock poisoned");
                let range = undo.time_range();
                let marks: Vec<_> = undo
                    .marks()
                    .map(|m| serde_json::json!({"seq": m.seq.0, "time": fmt_time(m.at_us), "at_us": m.at_us, "kind": m.kind, "tag": m.tag}))
                    .collect();
                let windows: Vec<_> = undo
                    .windows()
                    .iter()
                    .map(|w| {
                        let until = w.end.map_or(sr_common::types::now_micros(), |e| e.1);
                        serde_json::json!({
                            "begin_seq": w.begin.map(|b| b.0.0), "begin_time": w.begin.map(|b| fmt_time(b.1)),
                            "end_seq": w.end.map(|e| e.0.0), "end_time": w.end.map(|e| fmt_time(e.1)),
                            "open": w.end.is_none(),
                            "seconds": w.begin.map(|b| until.saturating_sub(b.1) as f64 / 1e6),
                        })
                    })
                    .collect();
                serde_json::json!({
                    "disk": r.key.disk.0,
                    "inconsistent": windows,
                    "oldest_seq": undo.oldest().map(|s| s.0),
                    "latest_seq": r.applied().0,
                    "oldest_time": range.map(|t| fmt_time(t.0)),
                    "latest_time": range.map(|t| fmt_time(t.1)),
                    "oldest_us": range.map(|t| t.0),
                    "latest_us": range.map(|t| t.1),
                    "named": marks,
                    "undo_bytes": undo.bytes(),
                    "replica_bytes": r.allocated_bytes(),
                })
            })
            .collect();
        Some(serde_json::json!({ "item": item.0, "disks": rows }))
    }

    /// Expires points older than each item's retention window.
    pub fn expire_points(&self) {
        let now = sr_common::types::now_micros();
        for r in self.all_replicas() {
            // Whether or not anything expires: a failed index write is settled here.
            if let Err(e) = r.reopen_index() {
                tracing::error!(key = %r.key, error = format!("{e:#}"), "catching the undo index up failed; tried again at the next tick");
            }
            let retention = self.retention_secs(r.key.item);
            let cutoff = now.saturating_sub(retention * 1_000_000);
            let keep = {
                let undo = r.undo.lock().expect("undo lock poisoned");
                // Points at or after the one in force at the cutoff stay, and a block-order window keeps
                // its beginning (so that what lies inside is always known to be inside).
                undo.point_at(cutoff, r.applied()).ok().map(|keep| match undo.window_at(keep) {
                    Some(crate::undo::Window { begin: Some((b, _)), .. }) => Seq(b.0.saturating_sub(1)).min(keep),
                    _ => keep,
                })
            };
            if let Some(keep) = keep {
                match r.expire(keep) {
                    Ok(0) => {}
                    Ok(freed) => {
                        metrics::counter!(crate::metrics::EXPIRED_BYTES).increment(freed);
                        tracing::info!(key = %r.key, freed, keep = keep.0, "expired old recovery points");
                    }
                    Err(e) => {
                        tracing::error!(key = %r.key, error = format!("{e:#}"), "expiring recovery points failed")
                    }
                }
            }
            let (item, disk) = (r.key.item.to_string(), r.key.disk.to_string());
            let undo = r.undo.lock().expect("undo lock poisoned");
            metrics::gauge!(crate::metrics::UNDO_BYTES, "item" => item.clone(), "disk" => disk.clone())
                .set(undo.bytes() as f64);
            if let Some((oldest, _)) = undo.time_range() {
                let age = now.saturating_sub(oldest) as f64 / 1e6;
                metrics::gauge!(crate::metrics::OLDEST_POINT_AGE, "item" => item.clone(), "disk" => disk.clone())
                    .set(age);
            }
            let open = undo.windows().last().filter(|w| w.end.is_none()).and_then(|w| w.begin);
            let secs = open.map_or(0.0, |(_, at)| now.saturating_sub(at) as f64 / 1e6);
            metrics::gauge!(crate::metrics::INCONSISTENT_SECONDS, "item" => item, "disk" => disk).set(secs);
        }
        metrics::counter!(crate::metrics::EXPIRY_RUNS).increment(1);
    }
}
