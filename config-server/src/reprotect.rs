//! Reprotect: replication from the failed-over disks back into the other site's disks, so the item is
//! protected again in the other direction (and a failback can follow).
//!
//! ```text
//! check both sites --> new stream: source = the agent fronting the failed-over disks (baseline <gen>:
//!   ships the blocks changed since, no copy), target = the old source's disks, adopted in place by a
//!   master target there; unknown history (unplanned failover) --> checksum comparison
//! --> evaluate_reprotect (every second): done when every changed block is applied
//! ```

use crate::auth::require;
use crate::error::{body, ApiError, Body, R};
use crate::items::public;
use crate::jobs::{JobHandle, ReprotectStep};
use crate::lifecycle::{Event, State};
use crate::model::*;
use crate::recovery::load_item;
use crate::store::Docs;
use crate::Cs;
use axum::extract::{Path, State as AxState};
use axum::http::HeaderMap;
use axum::Json;
use serde::Deserialize;
use serde_json::{json, Value};
use std::sync::Arc;

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct ReprotectReq {
    /// The agent that fronts the failed-over disks (after a failover); after a failback, the original
    /// machine by default.
    #[serde(default)]
    pub machine: Option<String>,
    #[serde(default)]
    pub master_target: Option<String>,
    #[serde(default)]
    pub process_server: Option<String>,
}

pub async fn reprotect(
    AxState(cs): AxState<Arc<Cs>>,
    h: HeaderMap,
    Path(id): Path<u64>,
    b: Body<ReprotectReq>,
) -> R<Value> {
    let by = require(cs.store(), &h, ApiRole::Operator)?;
    let req = body(b)?;
    let job = begin_reprotect(&cs, id, req, &by).await?;
    let item = load_item(&cs, id)?;
    Ok(Json(json!({ "job": job, "item": public(&item) })))
}

/// Starts replication from the failed-over disks back into the disks of the other site.
pub async fn begin_reprotect(cs: &Arc<Cs>, id: u64, req: ReprotectReq, by: &str) -> Result<u64, ApiError> {
    let _g = cs.items_lock.lock().await;
    let store = cs.store();
    let mut item = load_item(cs, id)?;
    let next = item.state.on(&Event::ReprotectRequested).map_err(|e| ApiError::conflict(&e.to_string()))?;
    let fo =
        item.failover.clone().ok_or_else(|| ApiError::conflict(&format!("item {id} has no committed failover")))?;
    let generation = fo.generation;
    let source = match (&req.machine, &item.previous_machine, &item.state) {
        (Some(m), _, _) => m.clone(),
        (None, Some(p), State::FailedBack) => p.clone(),
        _ => {
            return Err(ApiError::bad(
                "machine: name the agent that fronts the failed-over disks on the recovery site (see the item's failover.committed paths)",
            ))
        }
    };
    if source == item.machine {
        return Err(ApiError::bad(&format!(
            "machine: {source} is the machine that was failed over from; name the one on the other site"
        )));
    }
    let timeout = cs.cfg.component_timeout_secs;
    let comps: Vec<Component> = store.list(COMPONENTS)?;
    let live = |c: &Component| crate::orchestrate::live(c, now(), timeout);
    let new_m: Machine = store.get(MACHINES, &source)?.ok_or_else(|| {
        ApiError::conflict(&format!("the agent of {source} has not reported its disks (is it running?)"))
    })?;
    let old_m: Machine = store
        .get(MACHINES, &item.machine)?
        .ok_or_else(|| ApiError::conflict(&format!("the disks of {} are not known", item.machine)))?;
    let mut adopt = Vec::new();
    for d in &old_m.disks {
        let n = new_m.disks.iter().find(|x| x.id == d.id).ok_or_else(|| {
            ApiError::conflict(&format!("{source} has no disk {} ({}) to replicate back from", d.id, d.name))
        })?;
        if n.size != d.size {
            return Err(ApiError::conflict(&format!(
                "disk {}: {source} has {} bytes, {} has {}",
                d.id, n.size, item.machine, d.size
            )));
        }
        let path = d.path.clone().ok_or_else(|| {
            ApiError::conflict(&format!("the agent of {} did not report where disk {} lives", item.machine, d.id))
        })?;
        if !std::path::Path::new(&path).is_absolute() {
            return Err(ApiError::conflict(&format!(
                "the agent of {} reported disk {} at {path:?}, not an absolute path; give its [[disk]] an absolute path",
                item.machine, d.id
            )));
        }
        adopt.push(AdoptDisk { disk: sr_common::types::DiskId(d.id), path });
    }
    let pick = |want: &Option<String>,
                role: ComponentRole,
                prefer: &Option<String>,
                avoid: &Option<String>|
     -> Result<String, ApiError> {
        if let Some(w) = want {
            return comps
                .iter()
                .find(|c| &c.name == w && c.role == role && live(c))
                .map(|c| c.name.clone())
                .ok_or_else(|| ApiError::conflict(&format!("{w} is not a live {role:?}")));
        }
        let cands: Vec<&Component> = comps.iter().filter(|c| c.role == role && live(c)).collect();
        cands
            .iter()
            .find(|c| Some(&c.name) == prefer.as_ref())
            .or_else(|| cands.iter().find(|c| Some(&c.name) != avoid.as_ref()))
            .or_else(|| cands.first())
            .map(|c| c.name.clone())
            .ok_or_else(|| ApiError::conflict(&format!("no live {role:?} to reprotect with")))
    };
    let mt = pick(&req.master_target, ComponentRole::MasterTarget, &item.previous_master_target, &item.master_target)?;
    let ps = pick(&req.process_server, ComponentRole::ProcessServer, &None, &None)?;
    // The target side's history is known when a planned failover stopped it after its last write.
    let known = fo.planned;
    let mut job = JobHandle::start(store, "reprotect", &id.to_string(), ReprotectStep::NAMES)?;
    job.step(ReprotectStep::Check.index())?;
    let stream = STREAM_BASE + store.next_id(STREAMS)?;
    item.previous_machine = Some(item.machine.clone());
    item.previous_master_target = item.master_target.clone();
    item.machine = source.clone();
    item.master_target = Some(mt.clone());
    item.process_server = Some(ps.clone());
    item.stream = Some(stream);
    item.new_data_key(now());
    item.resync_request = if known { 0 } else { sr_common::types::now_micros() };
    item.reprotect =
        Some(ReprotectRecord { baseline: generation, known, adopt, job: job.job.id, initial_dirty: 0, failover: fo });
    item.failover = None;
    item.caught_up_at = None;
    item.job = None;
    item.test_failover = None;
    item.state = next;
    store.put(ITEMS, &id_key(id), &item)?;
    // The new stream's three holders take it now, not at their next polls.
    for name in [&mt, &ps, &source] {
        cs.nudge(name);
    }
    job.step_done(ReprotectStep::Check.index())?;
    job.step(ReprotectStep::Replicate.index())?;
    let how = if known {
        "only blocks changed since the failover are shipped"
    } else {
        "the history of the other site is not known (unplanned failover): checksums are compared"
    };
    cs.event(
        "info",
        &source,
        &format!(
            "reprotect of item {id} by {by}: {source} -> {mt} (through {ps}) into {}'s disks; {how}",
            item.previous_machine.clone().unwrap_or_default()
        ),
    )?;
    Ok(job.job.id)
}
