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
        let of_role: Vec<(&str, bool)> =
            comps.iter().filter(|c| c.role == role && !c.revoked).map(|c| (c.name.as_str(), live(c))).collect();
        choose(&of_role, want.as_deref(), prefer.as_deref(), avoid.as_deref())
            .map_err(|e| ApiError::conflict(&e.message(&format!("{role:?}"))))
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

/// Why no component could be chosen for a reprotect.
#[derive(Debug, PartialEq, Eq)]
pub enum ChoiceError {
    /// The one asked for is not a live component of the role.
    NotLive(String),
    /// None of the role is live.
    NoneLive,
    /// Only the one to avoid (the failed-over-to master target, on the recovery site) is live, and the
    /// deployment has others: the reverse replica would land on the wrong site.
    OnlyAvoided { avoided: String, others: Vec<String> },
    /// Several could take it and none is known to be on the other site: the operator names one.
    Ambiguous(Vec<String>),
}

impl ChoiceError {
    fn message(&self, role: &str) -> String {
        match self {
            ChoiceError::NotLive(w) => format!("{w} is not a live {role}"),
            ChoiceError::NoneLive => format!("no live {role} to reprotect with"),
            ChoiceError::OnlyAvoided { avoided, others } => format!(
                "the only live {role} is {avoided}, which serves the failed-over disks on the recovery site; \
                 start one on the other site ({}) or name it with master_target",
                others.join(", ")
            ),
            ChoiceError::Ambiguous(names) => format!(
                "several live {role}s could take the reverse replica ({}); name the one on the other site with \
                 master_target",
                names.join(", ")
            ),
        }
    }
}

/// The component a reprotect uses, among `of_role` (name, live; revoked ones left out): the one asked
/// for (`want`), else the one preferred (the master target that held the item before the failover)
/// unless it is `avoid` (the one failed over to), else the one live component but `avoid` (several:
/// refused, the operator names one; with nothing to avoid, the first). `avoid` itself only when it is
/// the only one of its role (a deployment on one host).
pub fn choose(
    of_role: &[(&str, bool)],
    want: Option<&str>,
    prefer: Option<&str>,
    avoid: Option<&str>,
) -> Result<String, ChoiceError> {
    let live: Vec<&str> = of_role.iter().filter(|(_, l)| *l).map(|(n, _)| *n).collect();
    if let Some(w) = want {
        return live
            .iter()
            .find(|n| **n == w)
            .map(|n| n.to_string())
            .ok_or_else(|| ChoiceError::NotLive(w.to_string()));
    }
    if let Some(p) = live.iter().find(|n| Some(**n) == prefer && Some(**n) != avoid) {
        return Ok(p.to_string());
    }
    let others: Vec<&str> = live.iter().copied().filter(|n| Some(*n) != avoid).collect();
    match (others.as_slice(), avoid) {
        ([], _) => {}
        ([one], _) | ([one, ..], None) => return Ok(one.to_string()),
        (many, Some(_)) => return Err(ChoiceError::Ambiguous(many.iter().map(|n| n.to_string()).collect())),
    }
    match live.first() {
        None => Err(ChoiceError::NoneLive),
        Some(only) if of_role.len() == 1 => Ok(only.to_string()),
        Some(only) => Err(ChoiceError::OnlyAvoided {
            avoided: only.to_string(),
            others: of_role.iter().filter(|(n, _)| n != only).map(|(n, _)| n.to_string()).collect(),
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reprotect_never_puts_the_reverse_replica_on_the_recovery_site_unless_it_is_the_only_one() {
        let two = [("mt-a", true), ("mt-b", true)];
        // The one asked for, if live.
        assert_eq!(choose(&two, Some("mt-b"), Some("mt-a"), None), Ok("mt-b".into()));
        assert_eq!(choose(&[("mt-a", false)], Some("mt-a"), None, None), Err(ChoiceError::NotLive("mt-a".into())));
        // The one that held the item before, else any but the failed-over-to one.
        assert_eq!(choose(&two, None, Some("mt-a"), Some("mt-b")), Ok("mt-a".into()));
        assert_eq!(choose(&two, None, None, Some("mt-a")), Ok("mt-b".into()));
        // Site A's master target not (yet) live: refused, naming it, not placed on site B.
        let down = [("mt-a", false), ("mt-b", true)];
        assert_eq!(
            choose(&down, None, Some("mt-a"), Some("mt-b")),
            Err(ChoiceError::OnlyAvoided { avoided: "mt-b".into(), others: vec!["mt-a".into()] })
        );
        // One master target in the whole deployment (one host): it is used.
        assert_eq!(choose(&[("mt", true)], None, Some("mt"), Some("mt")), Ok("mt".into()));
        assert_eq!(choose(&[("mt", true)], None, None, Some("mt")), Ok("mt".into()));
        assert_eq!(choose(&[("mt", false)], None, None, None), Err(ChoiceError::NoneLive));
        assert_eq!(choose(&[], None, None, None), Err(ChoiceError::NoneLive));
        // Nothing to avoid (process servers): any live one.
        assert_eq!(choose(&down, None, None, None), Ok("mt-b".into()));
        // The one held before is the one failed over to (an earlier reprotect on one host): not kept.
        assert_eq!(choose(&two, None, Some("mt-b"), Some("mt-b")), Ok("mt-a".into()));
        // Three master targets, the one held before down: which of the two others is on the other site
        // is not known, so the operator names it.
        let three = [("mt-a", false), ("mt-b", true), ("mt-c", true)];
        assert_eq!(
            choose(&[("mt-a", true), ("mt-b", true), ("mt-c", true)], None, None, Some("mt-a")),
            Err(ChoiceError::Ambiguous(vec!["mt-b".into(), "mt-c".into()]))
        );
        assert_eq!(choose(&three, None, Some("mt-a"), Some("mt-b")), Ok("mt-c".into()));
        assert_eq!(choose(&three, Some("mt-c"), None, Some("mt-b")), Ok("mt-c".into()));
    }
}
