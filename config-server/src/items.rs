//! Protected items: enable protection (prerequisites, placement, data key, assignments), disable,
//! the assignments components pull, and the evaluation that moves items through the lifecycle from
//! what components report (initial replication progress, applied positions, RPO).
//!
//! ```text
//! POST /v1/items --> job: prerequisites -> choose PS and MT -> data key -> assignments -> initial replication -> protected
//! agent heartbeat (copy %, last seq) ---+
//! MT heartbeat (applied seq) -----------+--> evaluate() every second --> state, job progress, RPO, alerts
//! components GET /v1/assignments --> what to ship where / which keys to hold
//! ```

use crate::auth::{require, require_component};
use crate::error::{body, ApiError, Body, R};
use crate::jobs::{EnableStep, JobHandle, ResyncStep};
use crate::lifecycle::{Event, State};
use crate::model::*;
use crate::store::Docs;
use crate::Cs;
use axum::extract::{Path, State as AxState};
use axum::http::HeaderMap;
use axum::Json;
use serde::Deserialize;
use serde_json::{json, Value};
use sr_common::contract::{AgentAssignment, Assignments, MasterTargetAssignment, ProcessServerAssignment};
use sr_common::types::ItemId;
use std::sync::Arc;

pub fn public(i: &Item) -> Value {
    json!({
        "id": i.id, "machine": i.machine, "policy": i.policy, "state": i.state, "state_name": i.state.name(),
        "process_server": i.process_server, "master_target": i.master_target, "job": i.job, "created": i.created,
        "rpo_seconds": i.caught_up_at.map(|t| now().saturating_sub(t)), "rpo_alert": i.rpo_alert,
        "test_failover": i.test_failover, "stream": i.wire_id(), "failover": i.failover,
        "reprotect": i.reprotect, "previous_machine": i.previous_machine, "problem": i.problem,
        "chain_broken": i.chain_broken, "actions": crate::actions::allowed(i),
    })
}

/// Gives an item's data key a new epoch now, while replication runs: new batches are sealed under
/// it once the process server has it; what is sealed under the earlier epoch still opens.
pub async fn rotate_key(AxState(cs): AxState<Arc<Cs>>, h: HeaderMap, Path(id): Path<u64>) -> R<Value> {
    let by = require(cs.store(), &h, ApiRole::Operator)?;
    // Item changes are serialized: an evaluation in flight must not write back the old key.
    let _g = cs.items_lock.lock().await;
    let epoch = rotate(&cs, id, &format!("asked by {by}"))?;
    Ok(Json(json!({ "item": id, "key_epoch": epoch })))
}

/// Rotates item `id`'s key (see [`rotate_key`]); returns the new epoch.
pub fn rotate(cs: &Cs, id: u64, why: &str) -> Result<u32, ApiError> {
    let store = cs.store();
    let mut item =
        store.get::<Item>(ITEMS, &id_key(id))?.ok_or_else(|| ApiError::not_found(&format!("no item {id}")))?;
    if item.data_key.is_empty() {
        return Err(ApiError::conflict(&format!("item {id} is not protected: it has no data key")));
    }
    item.rotate_key(now());
    store.put(ITEMS, &id_key(id), &item)?;
    cs.event("info", &item.machine, &format!("data key of item {id} rotated to epoch {} ({why})", item.key_epoch))?;
    Ok(item.key_epoch)
}

/// Rotates the keys whose epoch is due (see [`crate::model::rotation_due`]); `seals` are what process
/// server `reporter` says it sealed, by item stream id (only its own items count).
pub fn rotate_due(cs: &Cs, reporter: Option<&str>, seals: &[sr_common::contract::SealCount]) -> Result<(), ApiError> {
    let items: Vec<Item> = cs.store().list(ITEMS)?;
    for i in items.iter().filter(|i| !i.data_key.is_empty()) {
        let carries = reporter.is_some_and(|r| i.process_server.as_deref() == Some(r));
        let reported = seals
            .iter()
            .filter(|s| carries && s.item.0 == i.wire_id() && s.epoch == i.key_epoch)
            .map(|s| s.seals)
            .max()
            .unwrap_or(0);
        if let Some(why) = crate::model::rotation_due(i.key_since, now(), reported) {
            rotate(cs, i.id, why)?;
        }
    }
    Ok(())
}

pub async fn list(AxState(cs): AxState<Arc<Cs>>, h: HeaderMap) -> R<Value> {
    require(cs.store(), &h, ApiRole::Reader)?;
    Ok(Json(Value::Array(cs.store().list::<Item>(ITEMS)?.iter().map(public).collect())))
}

pub async fn get(AxState(cs): AxState<Arc<Cs>>, h: HeaderMap, Path(id): Path<u64>) -> R<Value> {
    require(cs.store(), &h, ApiRole::Reader)?;
    let i: Option<Item> = cs.store().get(ITEMS, &id_key(id))?;
    i.map(|i| Json(public(&i))).ok_or_else(|| ApiError::not_found(&format!("no item {id}")))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Enable {
    machine: String,
    /// Policy id or name.
    policy: String,
}

/// Checks prerequisites and picks the least-loaded process server and a master target with room.
fn place(cs: &Cs, machine: &str) -> Result<(Machine, Component, Component), String> {
    let store = cs.store();
    let err = |e: crate::store::StoreError| e.to_string();
    let agent: Component = store
        .get(COMPONENTS, machine)
        .map_err(err)?
        .ok_or_else(|| format!("no agent named {machine} is registered"))?;
    if agent.revoked {
        return Err(format!("the agent of {machine} was revoked"));
    }
    let m: Machine = store
        .get(MACHINES, machine)
        .map_err(err)?
        .ok_or_else(|| format!("the agent of {machine} has not reported its disks yet (is it running?)"))?;
    let timeout = cs.cfg.component_timeout_secs;
    if now().saturating_sub(m.last_heartbeat) > timeout * 3 {
        return Err(format!(
            "the agent of {machine} has not reported for {} s",
            now().saturating_sub(m.last_heartbeat)
        ));
    }
    if m.disks.is_empty() {
        return Err(format!("the agent of {machine} reports no readable disk"));
    }
    let comps: Vec<Component> = store.list(COMPONENTS).map_err(err)?;
    let items: Vec<Item> = store.list(ITEMS).map_err(err)?;
    let ps = crate::orchestrate::pick_process_server(&comps, &items, now(), timeout, None)
        .cloned()
        .ok_or("no process server is available: register one and make sure it reports")?;
    let need: u64 = m.disks.iter().map(|d| d.size).sum();
    let mts: Vec<&Component> = comps
        .iter()
        .filter(|c| c.role == ComponentRole::MasterTarget && crate::orchestrate::live(c, now(), timeout))
        .collect();
    if mts.is_empty() {
        return Err("no master target is available: register one and make sure it reports".into());
    }
    let mt = mts
        .iter()
        .filter(|c| c.load.free_bytes >= need)
        .max_by_key(|c| c.load.free_bytes)
        .map(|c| (*c).clone())
        .ok_or_else(|| format!("no master target has {need} bytes free for the replicas of {machine}"))?;
    Ok((m, ps, mt))
}

pub async fn enable(AxState(cs): AxState<Arc<Cs>>, h: HeaderMap, b: Body<Enable>) -> R<Value> {
    let by = require(cs.store(), &h, ApiRole::Operator)?;
    let req = body(b)?;
    let store = cs.store();
    let _g = cs.items_lock.lock().await;
    let policies: Vec<Policy> = store.list(POLICIES)?;
    let Some(policy) = policies.iter().find(|p| p.id == req.policy || p.name == req.policy) else {
        return Err(ApiError::bad(&format!("policy: no policy with id or name {:?}", req.policy)));
    };
    let items: Vec<Item> = store.list(ITEMS)?;
    if let Some(i) = items.iter().find(|i| i.machine == req.machine && i.state != State::Unprotected) {
        return Err(ApiError::conflict(&format!("{} is already item {} ({})", req.machine, i.id, i.state.name())));
    }
    let id = store.next_id(ITEMS)?;
    let mut job = JobHandle::start(store, "enable protection", &id.to_string(), EnableStep::NAMES)?;
    let state = State::Unprotected.on(&Event::EnableRequested).map_err(|e| ApiError::bad(&e.to_string()))?;
    let mut item = Item { job: Some(job.job.id), ..Item::new(id, &req.machine, &policy.id, state, now()) };
    store.put(ITEMS, &id_key(id), &item)?;
    job.step(EnableStep::CheckPrerequisites.index())?;
    let (_machine, ps, mt) = match place(&cs, &req.machine) {
        Ok(p) => p,
        Err(reason) => {
            item.state =
                item.state.on(&Event::PrerequisitesFailed { reason: reason.clone() }).unwrap_or(State::Unprotected);
            store.put(ITEMS, &id_key(id), &item)?;
            let job = job.fail(&reason)?;
            cs.event("warning", &req.machine, &format!("enable protection of {} failed: {reason}", req.machine))?;
            return Err(ApiError::bad(&format!("prerequisites not met (job {}): {reason}", job.id)));
        }
    };
    job.step_done(EnableStep::CheckPrerequisites.index())?;
    job.step(EnableStep::Choose.index())?;
    item.process_server = Some(ps.name.clone());
    item.master_target = Some(mt.name.clone());
    job.step_done(EnableStep::Choose.index())?;
    job.step(EnableStep::DataKey.index())?;
    item.new_data_key(now());
    job.step_done(EnableStep::DataKey.index())?;
    job.step(EnableStep::Assign.index())?;
    item.state = item.state.on(&Event::PrerequisitesMet).map_err(|e| ApiError::bad(&e.to_string()))?;
    store.put(ITEMS, &id_key(id), &item)?;
    job.step_done(EnableStep::Assign.index())?;
    job.step(EnableStep::InitialReplication.index())?;
    cs.event(
        "info",
        &req.machine,
        &format!(
            "protection of {} enabled by {by}: item {id}, process server {}, master target {}",
            req.machine, ps.name, mt.name
        ),
    )?;
    Ok(Json(json!({ "item": public(&item), "job": job.job.id })))
}

pub async fn disable(AxState(cs): AxState<Arc<Cs>>, h: HeaderMap, Path(id): Path<u64>) -> R<Value> {
    let by = require(cs.store(), &h, ApiRole::Operator)?;
    let store = cs.store();
    let _g = cs.items_lock.lock().await;
    let Some(mut item) = store.get::<Item>(ITEMS, &id_key(id))? else {
        return Err(ApiError::not_found(&format!("no item {id}")));
    };
    item.state = item.state.on(&Event::DisableRequested).map_err(|e| ApiError::conflict(&e.to_string()))?;
    let mut job =
        JobHandle::start(store, "disable protection", &id.to_string(), &["withdraw assignments", "unprotected"])?;
    job.step(0)?;
    item.process_server = None;
    item.master_target = None;
    item.data_key.clear();
    item.old_keys.clear();
    item.caught_up_at = None;
    store.put(ITEMS, &id_key(id), &item)?;
    job.step_done(0)?;
    job.step(1)?;
    item.state = item.state.on(&Event::DisableDone).map_err(|e| ApiError::conflict(&e.to_string()))?;
    store.put(ITEMS, &id_key(id), &item)?;
    job.step_done(1)?;
    let job = job.succeed()?;
    cs.event("info", &item.machine, &format!("protection of {} (item {id}) disabled by {by}", item.machine))?;
    Ok(Json(json!({ "item": public(&item), "job": job.id })))
}

/// An operator's resync: compare checksums of every disk with its replica now, ship what differs.
/// `?full=true`: copy the whole disk again into a new replica (a new stream), for a replica that is
/// lost or a chain that is broken, which comparing checksums cannot repair.
#[derive(serde::Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct ResyncQuery {
    #[serde(default)]
    full: bool,
}

pub async fn resync(
    AxState(cs): AxState<Arc<Cs>>,
    h: HeaderMap,
    Path(id): Path<u64>,
    q: Result<axum::extract::Query<ResyncQuery>, axum::extract::rejection::QueryRejection>,
) -> R<Value> {
    let by = require(cs.store(), &h, ApiRole::Operator)?;
    let full = q.map_err(|e| ApiError::bad(&e.body_text()))?.full;
    let store = cs.store();
    let _g = cs.items_lock.lock().await;
    let Some(mut item) = store.get::<Item>(ITEMS, &id_key(id))? else {
        return Err(ApiError::not_found(&format!("no item {id}")));
    };
    // A gap cannot be closed by comparing checksums under the same stream.
    let full = full || item.chain_broken;
    let reason = format!("{} requested by {by}", if full { "full resync" } else { "resync" });
    item.state = match (&item.state, full) {
        (State::ResyncRequired { .. } | State::Resynchronizing { .. }, _) => item.state.clone(),
        (State::Critical { reason: why, .. }, false) => {
            return Err(ApiError::conflict(&format!(
                "item {id} is critical ({why}): comparing checksums cannot repair its stream; \
                 `srctl resync {id} --full` copies the whole disk again into a new replica"
            )))
        }
        (s @ State::Critical { .. }, true) => {
            s.on(&Event::Recovered).map_err(|e| ApiError::conflict(&e.to_string()))?
        }
        (s, _) => {
            s.on(&Event::ResyncNeeded { reason: reason.clone() }).map_err(|e| ApiError::conflict(&e.to_string()))?
        }
    };
    if full {
        // A new stream: the agent starts a fresh journal and copies the whole disk, the master target
        // builds a new replica file for it; the lost one is never written into.
        item.stream = Some(STREAM_BASE + store.next_id(STREAMS)?);
        item.chain_broken = false;
    }
    // Ids grow with time, so they stay above any the agent numbered itself.
    item.resync_request = sr_common::types::now_micros().max(item.resync_request + 1);
    let mut job = JobHandle::start(store, "resync", &id.to_string(), ResyncStep::NAMES)?;
    job.step(ResyncStep::Compare.index())?;
    item.resync_job = Some(job.job.id);
    store.put(ITEMS, &id_key(id), &item)?;
    cs.event("info", &item.machine, &format!("item {id}: {reason}"))?;
    Ok(Json(json!({ "item": public(&item), "job": job.job.id })))
}

/// What the calling component should do now.
pub async fn assignments(AxState(cs): AxState<Arc<Cs>>, h: HeaderMap) -> R<Value> {
    let (name, role) = require_component(cs.store(), &h)?;
    let store = cs.store();
    let items: Vec<Item> = store.list(ITEMS)?;
    let comps: Vec<Component> = store.list(COMPONENTS)?;
    let address = |n: &Option<String>| {
        n.as_ref().and_then(|n| comps.iter().find(|c| &c.name == n && !c.revoked)).and_then(|c| c.address.clone())
    };
    let policies: Vec<Policy> = store.list(POLICIES)?;
    let policy = |id: &str| policies.iter().find(|p| p.id == id).cloned();
    // Every item with a placement, whatever its state (Critical, failing over, ...): an agent told
    // nothing would stop journaling and drop its journal. Disable withdraws the placement.
    let placed = items.iter().filter(|i| i.state != State::Unprotected && i.process_server.is_some());
    let answer = match role {
        ComponentRole::Agent => {
            let mine: Vec<AgentAssignment> = placed
                .filter(|i| i.machine == name)
                .filter_map(|i| {
                    let p = policy(&i.policy);
                    Some(AgentAssignment {
                        item: ItemId(i.wire_id()),
                        process_server: address(&i.process_server)?,
                        stop: i.failover.as_ref().filter(|f| f.planned).map(|f| f.generation),
                        baseline: i.reprotect.as_ref().map(|r| r.baseline),
                        crash_interval_secs: p.as_ref().map(|p| p.crash_consistent_interval_secs),
                        app_interval_secs: p.as_ref().map(|p| p.app_consistent_interval_secs),
                        journal_limit_percent: p.as_ref().map(|p| p.journal_limit_percent),
                        resync_request: i.resync_request,
                        resync_window: p.as_ref().map(|p| p.resync_window.clone()).filter(|w| !w.is_empty()),
                    })
                })
                .collect();
            serde_json::to_value(Assignments { items: mine })
        }
        ComponentRole::ProcessServer => {
            let mine: Vec<ProcessServerAssignment> = placed
                .filter(|i| i.process_server.as_deref() == Some(name.as_str()))
                .filter_map(|i| {
                    let p = policy(&i.policy);
                    Some(ProcessServerAssignment {
                        item: ItemId(i.wire_id()),
                        keys: i.keys(),
                        master_target: address(&i.master_target)?,
                        compression_level: p
                            .as_ref()
                            .map_or(sr_common::compress::DEFAULT_LEVEL, |p| p.compression_level),
                        bandwidth_limit_mbps: p.as_ref().map_or(0, |p| p.bandwidth_limit_mbps),
                        agent: i.machine.clone(),
                    })
                })
                .collect();
            serde_json::to_value(Assignments { items: mine })
        }
        ComponentRole::MasterTarget => {
            let mine: Vec<MasterTargetAssignment> = placed
                .filter(|i| i.master_target.as_deref() == Some(name.as_str()))
                .map(|i| MasterTargetAssignment {
                    item: ItemId(i.wire_id()),
                    keys: i.keys(),
                    retention_secs: policy(&i.policy).map_or(0, |p| p.retention_hours * 3600),
                    adopt: i.reprotect.as_ref().map(|r| r.adopt.clone()),
                })
                .collect();
            serde_json::to_value(Assignments { items: mine })
        }
        // Refused by require_component; nothing is assigned to an NBD client.
        ComponentRole::NbdClient => serde_json::to_value(Assignments::<MasterTargetAssignment> { items: Vec::new() }),
    };
    Ok(Json(answer.map_err(|e| {
        ApiError::new(axum::http::StatusCode::INTERNAL_SERVER_ERROR, &format!("encoding assignments: {e}"))
    })?))
}

/// Moves items along from what components reported. Runs every second: gathers each item's
/// observations, lets [`crate::orchestrate::step`] decide, and carries its effects out. Returns
/// whether a reprotect waits for its stream to catch up (then the next runs follow the reports).
pub async fn evaluate(cs: &Cs) -> Result<bool, crate::store::StoreError> {
    use crate::orchestrate::{step, Effect, JobUpdate, Observed};
    let store = cs.store();
    let _g = cs.items_lock.lock().await;
    let comps: Vec<Component> = store.list(COMPONENTS)?;
    let all: Vec<Item> = store.list(ITEMS)?;
    let policies: Vec<Policy> = store.list(POLICIES)?;
    let mut after = Vec::with_capacity(all.len());
    for item in &all {
        let machine = store.get::<Machine>(MACHINES, &item.machine)?;
        let mut stream_faults = Vec::new();
        for (role, name) in [("master target", &item.master_target), ("process server", &item.process_server)] {
            let Some(name) = name else { continue };
            for mut f in store.get::<Vec<ReplicaFault>>(FAULTS, name)?.unwrap_or_default() {
                if f.item == item.wire_id() {
                    f.reason = format!("{role} {name}: {}", f.reason);
                    stream_faults.push(f);
                }
            }
        }
        let mut applied = std::collections::BTreeMap::new();
        for d in machine.iter().flat_map(|m| &m.progress) {
            let seq = store.get::<(u64, u64)>(APPLIED, &format!("{}-{}", item.wire_id(), d.id))?.map_or(0, |a| a.0);
            applied.insert(d.id, seq);
        }
        let observed = Observed {
            now: now(),
            component_timeout: cs.cfg.component_timeout_secs,
            components: &comps,
            items: &all,
            machine: machine.as_ref(),
            stream_faults,
            applied,
            rpo_threshold_secs: policies
                .iter()
                .find(|p| p.id == item.policy)
                .map_or(DEFAULT_RPO_SECS, |p| p.rpo_threshold_secs),
        };
        let (next, effects) = step(item, &observed);
        if next != *item {
            store.put(ITEMS, &id_key(item.id), &next)?;
        }
        after.push(next);
        for e in effects {
            match e {
                Effect::Alert(m) => cs.alert(&item.machine, &m).await?,
                Effect::Event { severity, message } => cs.event(severity, &item.machine, &message)?,
                Effect::Job { job, update } => {
                    let Some(mut job) = JobHandle::load(store, job)? else { continue };
                    match update {
                        JobUpdate::Progress(p) if job.job.progress != p => job.progress(p)?,
                        JobUpdate::Progress(_) => {}
                        JobUpdate::Advance { done, next } => {
                            if job.job.steps.get(done).is_some_and(|s| s.state != JobState::Succeeded) {
                                job.step_done(done)?;
                                job.step(next)?;
                            }
                        }
                        JobUpdate::Succeed { done } => {
                            for i in done {
                                if job.job.steps.get(i).is_some_and(|s| s.started.is_none()) {
                                    job.step(i)?;
                                }
                                job.step_done(i)?;
                            }
                            job.succeed()?;
                        }
                        JobUpdate::Fail(why) => {
                            if job.job.state == JobState::Running {
                                job.fail(&why)?;
                            }
                        }
                    }
                }
            }
        }
    }
    let t = now();
    let fleet = crate::metrics::Fleet::of(&after, &policies, &comps, t, cs.cfg.component_timeout_secs);
    fleet.export();
    cs.history.lock().expect("history lock poisoned").record(t, &fleet, &comps);
    Ok(after.iter().any(|i| i.reprotect.is_some()))
}
