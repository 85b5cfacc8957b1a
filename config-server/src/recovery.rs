//! Recovery points, test failover and image export of protected items. The points live on the
//! item's master target; the configuration server asks it over its HTTP API and records what it did.
//!
//! ```text
//! GET  /v1/items/{id}/points                  --> master target GET /v1/points?item=
//! POST /v1/items/{id}/test-failover {point}    --> job: choose point -> writable views -> machine description
//! POST /v1/items/{id}/test-failover/cleanup    --> job: delete the views (their overlays are discarded)
//! POST /v1/items/{id}/export {disk,path,point} --> master target POST /v1/export
//! ```
//! Replication goes on during a test failover: the test disks stay at their point and their writes go
//! to overlays on the master target, never to the replica.

use crate::auth::require;
use crate::error::{body, ApiError, Body, R};
use crate::jobs::JobHandle;
use crate::model::*;
use crate::store::Docs;
use crate::Cs;
use axum::extract::{Path, State as AxState};
use axum::http::HeaderMap;
use axum::Json;
use serde::Deserialize;
use serde_json::{json, Value};
use sr_common::contract::ViewInfo;
use std::sync::Arc;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TestFailover {
    /// "latest", "latest-app-consistent", "latest-bookmark", {"time": RFC 3339}, {"time-us": n},
    /// {"tag": name} or {"seq": n} (single-disk items).
    #[serde(default = "latest")]
    point: PointSpec,
}

fn latest() -> PointSpec {
    PointSpec::Latest
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Export {
    disk: u64,
    /// Where the master target writes the raw image (a path on the master target's host).
    path: String,
    #[serde(default)]
    point: Option<PointSpec>,
    /// "raw" (default) or "qcow2".
    #[serde(default)]
    format: Option<String>,
}

pub fn load_item(cs: &Cs, id: u64) -> Result<Item, ApiError> {
    cs.store().get::<Item>(ITEMS, &id_key(id))?.ok_or_else(|| ApiError::not_found(&format!("no item {id}")))
}

/// The item's master target: its name, its API address and a client to call it with.
#[derive(Clone)]
pub struct Mt {
    pub name: String,
    pub addr: std::net::SocketAddr,
    client: sr_common::http::Client,
}

/// The API of the item's master target.
pub fn master_target(cs: &Cs, item: &Item) -> Result<Mt, ApiError> {
    let name = item.master_target.clone().ok_or_else(|| {
        ApiError::conflict(&format!("item {} has no master target (state {})", item.id, item.state.name()))
    })?;
    let c: Component = cs
        .store()
        .get(COMPONENTS, &name)?
        .ok_or_else(|| ApiError::conflict(&format!("master target {name} is not registered")))?;
    let addr =
        c.http.as_deref().and_then(|a| a.parse().ok()).ok_or_else(|| {
            ApiError::conflict(&format!("master target {name} has not reported its HTTP address yet"))
        })?;
    let client = cs
        .client(sr_common::wire::Role::MasterTarget)
        .map_err(|e| ApiError::new(axum::http::StatusCode::INTERNAL_SERVER_ERROR, &format!("{e:#}")))?;
    Ok(Mt { name, addr, client })
}

/// Calls the master target; its JSON error is passed on with the master target named.
pub async fn mt_call(mt: &Mt, method: &str, path: &str, body: Option<Value>) -> Result<Value, String> {
    mt_call_status(mt, method, path, body).await.map_err(|e| e.message)
}

/// [`mt_call`] reading the answer as `T` (a shape of `sr_common::contract`).
pub async fn mt_call_as<T: serde::de::DeserializeOwned>(
    mt: &Mt,
    method: &str,
    path: &str,
    body: Option<Value>,
) -> Result<T, String> {
    let v = mt_call(mt, method, path, body).await?;
    serde_json::from_value(v)
        .map_err(|e| format!("master target {} answered {method} {path} unexpectedly: {e}", mt.name))
}

/// A master target's refusal: its HTTP status (none when it could not be reached) and message.
#[derive(Debug)]
pub struct MtError {
    pub status: Option<u16>,
    pub message: String,
}

/// [`mt_call`] keeping the HTTP status of a refusal, for callers that decide by it.
pub async fn mt_call_status(mt: &Mt, method: &str, path: &str, body: Option<Value>) -> Result<Value, MtError> {
    let Mt { name, addr, client } = mt.clone();
    let (method, path) = (method.to_string(), path.to_string());
    let res = tokio::task::spawn_blocking(move || client.call_json(addr, &method, &path, body.as_ref()))
        .await
        .map_err(|e| MtError { status: None, message: e.to_string() })?;
    res.map_err(|e| match e.status() {
        Some(_) => MtError { status: e.status(), message: format!("master target {name}: {}", e.message()) },
        None => MtError { status: None, message: format!("master target {name} at {addr}: {e}") },
    })
}

pub async fn points(AxState(cs): AxState<Arc<Cs>>, h: HeaderMap, Path(id): Path<u64>) -> R<Value> {
    require(cs.store(), &h, ApiRole::Reader)?;
    let item = load_item(&cs, id)?;
    let mt = master_target(&cs, &item)?;
    let v = mt_call(&mt, "GET", &format!("/v1/points?item={}", item.wire_id()), None)
        .await
        .map_err(|e| ApiError::conflict(&e))?;
    Ok(Json(v))
}

fn view_name(id: u64) -> String {
    format!("tfo-item-{id}")
}

const TFO_STEPS: &[&str] = &["choose the point", "bring up the disks", "describe the machine"];

pub async fn test_failover(
    AxState(cs): AxState<Arc<Cs>>,
    h: HeaderMap,
    Path(id): Path<u64>,
    b: Body<TestFailover>,
) -> R<Value> {
    let by = require(cs.store(), &h, ApiRole::Operator)?;
    let req = body(b)?;
    Ok(Json(test_failover_item(&cs, id, req.point, &by).await?))
}

/// Brings up the disks of item `id` at `point` as writable views, with the machine description.
pub async fn test_failover_item(cs: &Arc<Cs>, id: u64, point: PointSpec, by: &str) -> Result<Value, ApiError> {
    let _g = cs.items_lock.lock().await;
    let store = cs.store();
    let mut item = load_item(cs, id)?;
    if let Some(tf) = &item.test_failover {
        return Err(ApiError::conflict(&format!(
            "item {id} already has a test failover ({}); clean it up first",
            tf.view
        )));
    }
    if !crate::actions::has_points(&item.state) {
        return Err(ApiError::conflict(&format!(
            "item {id} is {}: test failover needs a replicating item with recovery points",
            item.state.name()
        )));
    }
    let mt = master_target(cs, &item)?;
    let mut job = JobHandle::start(store, "test failover", &id.to_string(), TFO_STEPS)?;
    job.step(0)?;
    job.step_done(0)?;
    job.step(1)?;
    let view = view_name(id);
    let created = mt_call_as::<ViewInfo>(
        &mt,
        "POST",
        "/v1/views",
        Some(json!({ "name": view, "item": item.wire_id(), "point": point, "writable": true })),
    )
    .await;
    let created = match created {
        Ok(v) => v,
        Err(e) => {
            let job = job.fail(&e)?;
            cs.event("warning", &item.machine, &format!("test failover of item {id} failed: {e}"))?;
            return Err(ApiError::conflict(&format!("test failover failed (job {}): {e}", job.id)));
        }
    };
    job.step_done(1)?;
    job.step(2)?;
    let description = describe(store, &item, &created, "test-failover")?;
    item.test_failover =
        Some(TestFailoverRecord { view, master_target: mt.name.clone(), machine: description.clone() });
    store.put(ITEMS, &id_key(id), &item)?;
    job.step_done(2)?;
    let job = job.succeed()?;
    cs.event(
        "info",
        &item.machine,
        &format!("test failover of {} (item {id}) by {by}: disks up at the chosen point on {}", item.machine, mt.name),
    )?;
    Ok(json!({ "job": job.id, "machine": description }))
}

/// What a hypervisor hook needs to boot the machine: its disks as NBD URIs, CPUs, memory, NICs.
/// Reads the machine's report and the network mappings from `store`.
pub fn describe(
    store: &dyn crate::store::ControlStore,
    item: &Item,
    view: &ViewInfo,
    purpose: &str,
) -> Result<MachineDescription, crate::store::StoreError> {
    let machine: Option<Machine> = store.get(MACHINES, &item.machine)?;
    let maps: Vec<NetworkMapping> = store.list(NETWORK_MAPPINGS)?;
    Ok(describe_with(item, machine.as_ref(), view, purpose, &maps))
}

fn describe_with(
    item: &Item,
    machine: Option<&Machine>,
    view: &ViewInfo,
    purpose: &str,
    maps: &[NetworkMapping],
) -> MachineDescription {
    let names = |disk: u64| {
        machine.and_then(|m| m.disks.iter().find(|d| d.id == disk)).map(|d| d.name.clone()).unwrap_or_default()
    };
    let disks = view
        .disks
        .iter()
        .map(|d| DescribedDisk {
            id: d.disk,
            name: names(d.disk),
            size: d.size,
            uri: d.uri.clone(),
            export: Some(d.export.clone()),
            point_seq: d.seq,
            point_time: d.time.clone(),
            writable: true,
            path: None,
        })
        .collect();
    let system = machine.and_then(|m| m.system.clone()).unwrap_or_default();
    let name = if purpose == "test-failover" { format!("{}-test", item.machine) } else { item.machine.clone() };
    MachineDescription {
        name,
        source_machine: item.machine.clone(),
        item: item.id,
        purpose: purpose.to_string(),
        cpus: system.cpus,
        memory_bytes: system.memory_bytes,
        network_interfaces: crate::netmap::map_nics(&system.nics, maps),
        disks,
    }
}

pub async fn test_failover_cleanup(AxState(cs): AxState<Arc<Cs>>, h: HeaderMap, Path(id): Path<u64>) -> R<Value> {
    let by = require(cs.store(), &h, ApiRole::Operator)?;
    let _g = cs.items_lock.lock().await;
    let store = cs.store();
    let mut item = load_item(&cs, id)?;
    let Some(tf) = item.test_failover.clone() else {
        return Err(ApiError::conflict(&format!("item {id} has no test failover to clean up")));
    };
    let mut job = JobHandle::start(store, "test failover cleanup", &id.to_string(), &["discard the test disks"])?;
    job.step(0)?;
    let view = tf.view;
    if let Ok(mt) = master_target(&cs, &item) {
        if let Err(MtError { status, message: e }) =
            mt_call_status(&mt, "DELETE", &format!("/v1/views/{view}"), None).await
        {
            // Already gone (404: a master target that lost it) is fine; anything else fails the job.
            if status != Some(404) {
                let job = job.fail(&e)?;
                return Err(ApiError::conflict(&format!("cleanup failed (job {}): {e}", job.id)));
            }
        }
    }
    item.test_failover = None;
    store.put(ITEMS, &id_key(id), &item)?;
    job.step_done(0)?;
    let job = job.succeed()?;
    cs.event("info", &item.machine, &format!("test failover of item {id} cleaned up by {by}"))?;
    Ok(Json(json!({ "job": job.id })))
}

pub async fn export(AxState(cs): AxState<Arc<Cs>>, h: HeaderMap, Path(id): Path<u64>, b: Body<Export>) -> R<Value> {
    let by = require(cs.store(), &h, ApiRole::Operator)?;
    let req = body(b)?;
    let item = load_item(&cs, id)?;
    let mt = master_target(&cs, &item)?;
    let mut job = JobHandle::start(cs.store(), "export", &id.to_string(), &["write the image"])?;
    job.step(0)?;
    let mut call = json!({ "item": item.wire_id(), "disk": req.disk, "path": req.path, "wait": false });
    if let Some(p) = req.point {
        call["point"] = json!(p);
    }
    if let Some(f) = req.format {
        call["format"] = json!(f);
    }
    let export_id = match mt_call(&mt, "POST", "/v1/export", Some(call)).await {
        Ok(v) => v["export_id"].as_u64().unwrap_or(0),
        Err(e) => {
            let job = job.fail(&e)?;
            return Err(ApiError::conflict(&format!("export failed (job {}): {e}", job.id)));
        }
    };
    let job_id = job.job.id;
    let (cs2, machine, path, disk) = (cs.clone(), item.machine.clone(), req.path.clone(), req.disk);
    // The job follows the master target's progress until the image is written.
    tokio::spawn(async move {
        let store = cs2.store();
        loop {
            tokio::time::sleep(std::time::Duration::from_millis(500)).await;
            let Ok(Some(mut job)) = JobHandle::load(store, job_id) else { return };
            let v = match mt_call(&mt, "GET", &format!("/v1/exports/{export_id}"), None).await {
                Ok(v) => v,
                Err(e) => {
                    let _ = job.fail(&format!("following the export on the master target: {e}"));
                    return;
                }
            };
            match v["state"].as_str() {
                Some("done") => {
                    let _ = job.step_done(0).and_then(|_| job.succeed());
                    let _ =
                        cs2.event("info", &machine, &format!("disk {disk} of item {id} exported to {path} by {by}"));
                    return;
                }
                Some("failed") => {
                    let _ = job.fail(v["error"].as_str().unwrap_or("the master target gave no reason"));
                    return;
                }
                _ => {
                    let _ = job.progress(v["percent"].as_f64().unwrap_or(0.0) as u8);
                }
            }
        }
    });
    Ok(Json(json!({ "job": job_id, "export_id": export_id })))
}
