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
use crate::jobs::JobHandle;
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

const ENABLE_STEPS: &[&str] = &[
    "check prerequisites",
    "choose a process server and a master target",
    "create the item's data key",
    "hand out assignments",
    "initial replication",
    "protected",
];

pub fn public(i: &Item) -> Value {
    json!({
        "id": i.id, "machine": i.machine, "policy": i.policy, "state": i.state, "state_name": i.state.name(),
        "process_server": i.process_server, "master_target": i.master_target, "job": i.job, "created": i.created,
        "rpo_seconds": i.caught_up_at.map(|t| now().saturating_sub(t)), "rpo_alert": i.rpo_alert,
        "test_failover": i.test_failover, "stream": i.wire_id(), "failover": i.failover,
        "reprotect": i.reprotect, "previous_machine": i.previous_machine, "problem": i.problem,
        "chain_broken": i.chain_broken,
    })
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

fn live(c: &Component, timeout: u64) -> bool {
    !c.revoked && c.address.is_some() && c.last_heartbeat.is_some_and(|t| now().saturating_sub(t) <= timeout)
}

/// The least-loaded live process server other than `except`.
fn pick_process_server(comps: &[Component], items: &[Item], timeout: u64, except: Option<&str>) -> Option<Component> {
    let assigned = |name: &str| items.iter().filter(|i| i.process_server.as_deref() == Some(name)).count();
    comps
        .iter()
        .filter(|c| c.role == ComponentRole::ProcessServer && live(c, timeout) && Some(c.name.as_str()) != except)
        .min_by_key(|c| (c.load.cache_bytes, assigned(&c.name), c.name.clone()))
        .cloned()
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
    let ps = pick_process_server(&comps, &items, timeout, None)
        .ok_or("no process server is available: register one and make sure it reports")?;
    let need: u64 = m.disks.iter().map(|d| d.size).sum();
    let mts: Vec<&Component> =
        comps.iter().filter(|c| c.role == ComponentRole::MasterTarget && live(c, timeout)).collect();
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
    let mut job = JobHandle::start(store, "enable protection", &id.to_string(), ENABLE_STEPS)?;
    let mut item = Item {
        id,
        machine: req.machine.clone(),
        policy: policy.id.clone(),
        state: State::Unprotected.on(&Event::EnableRequested).map_err(|e| ApiError::bad(&e.to_string()))?,
        process_server: None,
        master_target: None,
        data_key: String::new(),
        job: Some(job.job.id),
        created: now(),
        caught_up_at: None,
        rpo_alert: false,
        test_failover: None,
        resync_request: 0,
        resync_job: None,
        stream: None,
        failover: None,
        reprotect: None,
        previous_machine: None,
        previous_master_target: None,
        problem: None,
        chain_broken: false,
    };
    store.put(ITEMS, &id_key(id), &item)?;
    job.step(0)?;
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
    job.step_done(0)?;
    job.step(1)?;
    item.process_server = Some(ps.name.clone());
    item.master_target = Some(mt.name.clone());
    job.step_done(1)?;
    job.step(2)?;
    item.data_key = hex::encode(rand::random::<[u8; 32]>());
    job.step_done(2)?;
    job.step(3)?;
    item.state = item.state.on(&Event::PrerequisitesMet).map_err(|e| ApiError::bad(&e.to_string()))?;
    store.put(ITEMS, &id_key(id), &item)?;
    job.step_done(3)?;
    job.step(4)?;
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

const RESYNC_STEPS: &[&str] = &["compare checksums", "ship the differing blocks", "protected"];

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
    let mut job = JobHandle::start(store, "resync", &id.to_string(), RESYNC_STEPS)?;
    job.step(0)?;
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
                        data_key: i.data_key.clone(),
                        master_target: address(&i.master_target)?,
                        compression_level: p
                            .as_ref()
                            .map_or(sr_common::compress::DEFAULT_LEVEL, |p| p.compression_level),
                        bandwidth_limit_mbps: p.as_ref().map_or(0, |p| p.bandwidth_limit_mbps),
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
                    data_key: i.data_key.clone(),
                    retention_secs: policy(&i.policy).map_or(0, |p| p.retention_hours * 3600),
                    adopt: i.reprotect.as_ref().map(|r| r.adopt.clone()),
                })
                .collect();
            serde_json::to_value(Assignments { items: mine })
        }
    };
    Ok(Json(answer.map_err(|e| {
        ApiError::new(axum::http::StatusCode::INTERNAL_SERVER_ERROR, &format!("encoding assignments: {e}"))
    })?))
}

/// Moves items along from what components reported. Runs every second.
pub async fn evaluate(cs: &Cs) -> Result<(), crate::store::StoreError> {
    let store = cs.store();
    let _g = cs.items_lock.lock().await;
    let timeout = cs.cfg.component_timeout_secs;
    let comps: Vec<Component> = store.list(COMPONENTS)?;
    let all: Vec<Item> = store.list(ITEMS)?;
    for mut item in all.clone() {
        // Scale-out: an item whose process server went silent moves to the least-loaded live one. The
        // agent keeps every change until the master target applied it, so nothing cached only on the
        // silent server is lost: the new one is sent it again.
        if item.state.replicating() {
            if let Some(ps) = item.process_server.clone() {
                let alive = comps.iter().find(|c| c.name == ps).is_some_and(|c| live(c, timeout));
                if !alive {
                    if let Some(next) = pick_process_server(&comps, &all, timeout, Some(&ps)) {
                        item.process_server = Some(next.name.clone());
                        store.put(ITEMS, &id_key(item.id), &item)?;
                        cs.alert(
                            &item.machine,
                            &format!("item {}: process server {ps} stopped reporting; moved to {}", item.id, next.name),
                        )
                        .await?;
                    }
                }
            }
        }
        // A revoked agent cannot be retried into working: the item turns Critical, with an alert.
        let agent_revoked = comps.iter().any(|c| c.name == item.machine && c.revoked);
        if agent_revoked && !matches!(item.state, State::Critical { .. }) {
            let reason = format!("the certificate of agent {} was revoked", item.machine);
            if let Ok(next) = item.state.on(&Event::FatalError { reason: reason.clone() }) {
                item.state = next;
                store.put(ITEMS, &id_key(item.id), &item)?;
                cs.alert(&item.machine, &format!("item {} is critical: {reason}; re-register the agent", item.id))
                    .await?;
            }
        }
        let Some(machine) = store.get::<Machine>(MACHINES, &item.machine)? else { continue };
        // A fault retrying cannot fix, reported by the item's agent or master target (never read from
        // an error's text: each carries its code): the item turns Critical with the reason, and alerts.
        // Not assigned or not configured is the control plane catching up (its assignments clear it).
        let agent_fault = machine
            .progress
            .iter()
            .filter_map(|d| d.fatal.as_ref().map(|f| (d.id, f)))
            .find(|(_, f)| f.code.needs_operator());
        // The item's master target and process server speak for its stream.
        let mut mt_faults: Vec<ReplicaFault> = Vec::new();
        for (role, name) in [("master target", &item.master_target), ("process server", &item.process_server)] {
            let Some(name) = name else { continue };
            for mut f in store.get::<Vec<ReplicaFault>>(FAULTS, name)?.unwrap_or_default() {
                if f.item == item.wire_id() {
                    f.reason = format!("{role} {name}: {}", f.reason);
                    mt_faults.push(f);
                }
            }
        }
        // A transient problem (retried) is shown on the item, with an event when it starts and ends.
        let problem = mt_faults.iter().find(|f| !f.code.fatal()).map(|f| format!("disk {}: {}", f.disk, f.reason));
        if problem != item.problem {
            match &problem {
                Some(p) => cs.event("warning", &item.machine, &format!("item {}: {p}", item.id))?,
                None => cs.event("info", &item.machine, &format!("item {}: replication goes on again", item.id))?,
            }
            item.problem = problem;
            store.put(ITEMS, &id_key(item.id), &item)?;
        }
        let mt_fault = mt_faults.into_iter().find(|f| f.code.needs_operator());
        let chain = sr_common::wire::ErrorCode::ChainBroken;
        let broken_chain =
            agent_fault.is_some_and(|(_, f)| f.code == chain) || mt_fault.as_ref().is_some_and(|f| f.code == chain);
        if broken_chain && !item.chain_broken {
            // A gap: Resync required by itself; the resync copies the whole disk into a new stream.
            item.chain_broken = true;
            let reason = "the stream has a gap (its chain is broken): the next resync copies the whole disk";
            if let Ok(next) = item.state.on(&Event::ResyncNeeded { reason: reason.into() }) {
                item.state = next;
            }
            store.put(ITEMS, &id_key(item.id), &item)?;
            cs.alert(&item.machine, &format!("item {}: the replica chain is broken; a resync repairs it", item.id))
                .await?;
            continue;
        }
        let fault = agent_fault
            .filter(|(_, f)| f.code != chain)
            .map(|(disk, f)| format!("agent {} disk {disk}: {}", item.machine, f.reason))
            .or(mt_fault.filter(|f| f.code != chain).map(|f| format!("disk {}: {}", f.disk, f.reason)));
        if let Some(reason) = fault.filter(|_| !matches!(item.state, State::Critical { .. })) {
            if let Ok(next) = item.state.on(&Event::FatalError { reason: reason.clone() }) {
                item.state = next;
                store.put(ITEMS, &id_key(item.id), &item)?;
                cs.alert(&item.machine, &format!("item {} is critical: {reason}", item.id)).await?;
                continue;
            }
        }
        let before = item.clone();
        let wire = item.wire_id();
        let applied = |disk: u64| -> Result<(u64, u64), crate::store::StoreError> {
            Ok(store.get::<(u64, u64)>(APPLIED, &format!("{wire}-{disk}"))?.unwrap_or((0, 0)))
        };
        match &item.state {
            State::Reprotecting { .. } => {
                crate::failover::evaluate_reprotect(cs, &mut item, &machine, &|d| Ok(applied(d)?.0))?;
            }
            State::InitialReplication { percent } => {
                let p = &machine.progress;
                let n = machine.disks.len().max(1) as f64;
                let pct = (p.iter().map(|d| d.copy_percent).sum::<f64>() / n).clamp(0.0, 100.0) as u8;
                let mut done =
                    !p.is_empty() && machine.disks.iter().all(|d| p.iter().any(|x| x.id == d.id && x.copy_done));
                for d in p {
                    done &= d.done_seq > 0 && applied(d.id)?.0 >= d.done_seq;
                }
                if done {
                    item.state = item.state.on(&Event::InitialReplicationDone).unwrap_or(item.state.clone());
                    item.caught_up_at = Some(now());
                } else if pct != *percent {
                    item.state = item.state.on(&Event::Progress { percent: pct }).unwrap_or(item.state.clone());
                }
            }
            State::Protected { .. }
                if machine.progress.iter().any(|d| d.overflow || d.dirty_bytes > 0 || d.resync_active) =>
            {
                let reason = if machine.progress.iter().any(|d| d.overflow || (d.dirty_bytes > 0 && !d.resync_active)) {
                    "the journal reached its limit; changed blocks are tracked for a resync".to_string()
                } else {
                    "a checksum comparison with the replica was started".to_string()
                };
                item.state =
                    item.state.on(&Event::ResyncNeeded { reason: reason.clone() }).unwrap_or(item.state.clone());
                cs.event("warning", &item.machine, &format!("item {}: resync required: {reason}", item.id))?;
            }
            State::ResyncRequired { .. } | State::Resynchronizing { .. } => {
                let p = &machine.progress;
                let comparing = p.iter().any(|d| d.resync_active);
                let copying = p.iter().any(|d| d.dirty_bytes > 0 && !d.overflow && !d.resync_waiting);
                // An operator's request is done only once every disk compared for it.
                let requested = p.iter().all(|d| d.resync_done >= item.resync_request);
                let mut caught_up = !p.is_empty()
                    && requested
                    && !comparing
                    && p.iter().all(|d| d.copy_done && d.done_seq > 0 && d.dirty_bytes == 0 && !d.overflow);
                for d in p {
                    caught_up &= applied(d.id)?.0 >= d.last_seq;
                }
                if matches!(item.state, State::ResyncRequired { .. }) && (comparing || copying || caught_up) {
                    item.state = item.state.on(&Event::ResyncStarted).unwrap_or(item.state.clone());
                }
                if caught_up {
                    item.state = item.state.on(&Event::ResyncDone).unwrap_or(item.state.clone());
                    item.caught_up_at = Some(machine.last_heartbeat);
                } else {
                    let n = p.len().max(1) as f64;
                    let compared =
                        p.iter().map(|d| if d.resync_active { d.compare_percent } else { 100.0 }).sum::<f64>() / n;
                    let pct = if comparing {
                        0.8 * compared
                    } else if copying {
                        80.0
                    } else {
                        95.0
                    };
                    item.state = item.state.on(&Event::Progress { percent: pct as u8 }).unwrap_or(item.state.clone());
                }
                if let (Some(job_id), true) = (item.resync_job, item.state != before.state) {
                    if let Some(mut job) = JobHandle::load(store, job_id)? {
                        match &item.state {
                            State::Protected { .. } => {
                                for i in 0..3 {
                                    job.step_done(i)?;
                                }
                                job.succeed()?;
                                item.resync_job = None;
                                cs.event(
                                    "info",
                                    &item.machine,
                                    &format!("item {} is resynchronized and protected", item.id),
                                )?;
                            }
                            State::Resynchronizing { percent, .. } => {
                                if !comparing && job.job.steps.first().is_some_and(|s| s.state != JobState::Succeeded) {
                                    job.step_done(0)?;
                                    job.step(1)?;
                                }
                                job.progress(*percent)?;
                            }
                            _ => {}
                        }
                    }
                }
            }
            State::Protected { .. } => {
                let mut caught_up = !machine.progress.is_empty();
                for d in &machine.progress {
                    caught_up &= applied(d.id)?.0 >= d.last_seq;
                }
                if caught_up {
                    item.caught_up_at = Some(machine.last_heartbeat.max(item.caught_up_at.unwrap_or(0)));
                }
                let rpo = item.caught_up_at.map(|t| now().saturating_sub(t)).unwrap_or(0);
                metrics::gauge!("sr_config_server_item_rpo_seconds", "item" => item.id.to_string()).set(rpo as f64);
                let threshold =
                    store.get::<Policy>(POLICIES, &item.policy)?.map_or(DEFAULT_RPO_SECS, |p| p.rpo_threshold_secs);
                if rpo > threshold && !item.rpo_alert {
                    item.rpo_alert = true;
                    let msg = format!(
                        "item {} ({}): recovery point is {rpo} s old, over the policy's {threshold} s",
                        item.id, item.machine
                    );
                    cs.alert(&item.machine, &msg).await?;
                } else if rpo <= threshold && item.rpo_alert {
                    item.rpo_alert = false;
                    cs.event(
                        "info",
                        &item.machine,
                        &format!("item {}: recovery point back within {threshold} s", item.id),
                    )?;
                }
            }
            _ => {}
        }
        if let (Some(job_id), true) = (item.job, item.state != before.state) {
            if let Some(mut job) = JobHandle::load(store, job_id)? {
                match &item.state {
                    State::InitialReplication { percent } => job.progress(*percent)?,
                    State::Protected { .. } => {
                        job.step_done(4)?;
                        job.step(5)?;
                        job.step_done(5)?;
                        job.succeed()?;
                        cs.event("info", &item.machine, &format!("item {} ({}) is protected", item.id, item.machine))?;
                    }
                    _ => {}
                }
            }
        }
        if item.state != before.state
            || item.caught_up_at != before.caught_up_at
            || item.rpo_alert != before.rpo_alert
            || item.resync_job != before.resync_job
            || item.reprotect != before.reprotect
        {
            store.put(ITEMS, &id_key(item.id), &item)?;
        }
    }
    Ok(())
}
