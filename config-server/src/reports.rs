//! What components report: heartbeats (address, load, disks and progress, applied positions, faults,
//! events) in the shared contract of `sr_common::contract`, and the machines agents describe.

use crate::auth::{require, require_component};
use crate::error::{body, ApiError, Body, R};
use crate::model::*;
use crate::store::Docs;
use crate::Cs;
use axum::extract::State;
use axum::http::HeaderMap;
use axum::Json;
use serde_json::{json, Value};
use sr_common::contract::Heartbeat;
use std::sync::Arc;

pub async fn heartbeat(State(cs): State<Arc<Cs>>, h: HeaderMap, b: Body<Heartbeat>) -> R<Value> {
    let (name, role) = require_component(cs.store(), &h)?;
    let req = body(b)?;
    let store = cs.store();
    let mut c: Component = store.get(COMPONENTS, &name)?.ok_or_else(|| ApiError::not_found("component vanished"))?;
    c.last_heartbeat = Some(now());
    if req.address.is_some() {
        c.address = req.address;
    }
    if req.http.is_some() {
        c.http = req.http;
    }
    for e in req.events.iter().take(100) {
        if !matches!(e.severity.as_str(), "info" | "warning" | "critical") {
            return Err(ApiError::bad("events[].severity: info, warning or critical"));
        }
        let message: String = e.message.chars().take(4000).collect();
        cs.event(&e.severity, &name, &message)?;
    }
    if let Some(load) = req.load {
        c.load = load;
    }
    store.put(COMPONENTS, &name, &c)?;
    if let Some(disks) = req.disks {
        if role != ComponentRole::Agent {
            return Err(ApiError::bad("only agents report disks"));
        }
        let progress = req.progress.unwrap_or_default();
        let m = Machine { name: name.clone(), disks, last_heartbeat: now(), progress, system: req.system };
        store.put(MACHINES, &name, &m)?;
    }
    if let Some(faults) = req.faults {
        if !matches!(role, ComponentRole::MasterTarget | ComponentRole::ProcessServer) {
            return Err(ApiError::bad("only master targets and process servers report stream faults"));
        }
        let faults: Vec<ReplicaFault> = faults.into_iter().take(1000).collect();
        store.put(FAULTS, &name, &faults)?;
    }
    if !req.seals.is_empty() {
        if role != ComponentRole::ProcessServer {
            return Err(ApiError::bad("only process servers report seals"));
        }
        let seals: Vec<_> = req.seals.into_iter().take(10_000).collect();
        // Not waited for: a heartbeat never stalls behind an evaluation; the counts come again.
        if let Ok(_g) = cs.items_lock.try_lock() {
            crate::items::rotate_due(&cs, Some(&name), &seals)?;
        }
    }
    if let Some(applied) = req.applied {
        if role != ComponentRole::MasterTarget {
            return Err(ApiError::bad("only master targets report applied positions"));
        }
        let items: Vec<Item> = if applied.is_empty() { Vec::new() } else { store.list(ITEMS)? };
        for a in applied {
            // Only the master target an item is assigned to speaks for it; it names the item's stream.
            let item = items.iter().find(|i| i.wire_id() == a.item);
            if item.is_some_and(|i| i.master_target.as_deref() == Some(name.as_str())) {
                store.put(APPLIED, &format!("{}-{}", a.item, a.disk), &(a.seq, now()))?;
            }
        }
    }
    // Waits on reports (a planned failover's stop and drain) look again now.
    cs.reports.notify_waiters();
    Ok(Json(json!({ "ok": true })))
}

pub async fn list_machines(State(cs): State<Arc<Cs>>, h: HeaderMap) -> R<Value> {
    require(cs.store(), &h, ApiRole::Reader)?;
    Ok(Json(serde_json::to_value(cs.store().list::<Machine>(MACHINES)?).unwrap_or_default()))
}
