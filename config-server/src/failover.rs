//! Failover, commit and failback of protected items (reprotect is `reprotect.rs`). Each is a job; the steps that wait on
//! components (the source stopping, the journal draining, the changed blocks shipping back) follow
//! their heartbeats.
//!
//! ```text
//! planned failover:   agent told "stop <gen>" --> writes refused, final FLUSH + bookmark failover-<gen>
//!                     --> journal drains (applied >= stop seq) --> writable view at the bookmark --> machine
//! unplanned failover: stream cut off --> writable view at the chosen point --> machine
//! change point:       view deleted (its writes discarded) --> new view at the new point
//! commit:             master target writes the point and the writes into the replica, hands the files over
//!                     with a split record (generation, ranges it rewrote)
//! failback:           planned failover of the reverse stream + commit on the primary site + reprotect
//! ```

use crate::auth::require;
use crate::error::{body, ApiError, Body, R};
use crate::jobs::JobHandle;
use crate::lifecycle::{Direction, Event, State};
use crate::model::*;
use crate::recovery::{describe, load_item, master_target, mt_call, mt_call_as};
use crate::store::Docs;
use crate::Cs;
use axum::extract::{Path, State as AxState};
use axum::http::HeaderMap;
use axum::Json;
use serde::Deserialize;
use serde_json::{json, Value};
use sr_common::contract::{CommitAnswer, ViewInfo, ViewList};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// How long a planned failover waits for the source's agent to stop its disks.
const STOP_TIMEOUT: Duration = Duration::from_secs(120);
/// How long it waits for the journal to drain once stopped.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(1800);

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FailoverReq {
    /// Shut the source down through its agent and drain first (no data loss), or fail over without it.
    #[serde(default)]
    pub planned: bool,
    /// Unplanned only: the point (see test failover); the latest by default.
    #[serde(default)]
    pub point: Option<PointSpec>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PointReq {
    pub point: PointSpec,
}

fn failover_view(id: u64) -> String {
    format!("failover-item-{id}")
}

const PLANNED_STEPS: &[&str] =
    &["stop the source machine", "drain the journal", "bring up the disks at the final point", "describe the machine"];
const UNPLANNED_STEPS: &[&str] =
    &["cut off the source", "bring up the disks at the chosen point", "describe the machine"];
const FAILBACK_STEPS: &[&str] = &[
    "stop the machine on the recovery site",
    "drain the journal",
    "bring up the disks at the final point",
    "commit on the primary site",
    "reprotect in the forward direction",
];

/// Waits until `check` gives a value: it looks again when a component reports (`reports`) and at
/// least every 200 ms; `progress` gets a fraction when known.
async fn wait_for<T>(
    reports: &tokio::sync::Notify,
    timeout: Duration,
    what: &str,
    mut check: impl FnMut() -> Result<(Option<T>, Option<f64>), String>,
    mut progress: impl FnMut(f64),
) -> Result<T, String> {
    let start = Instant::now();
    loop {
        // Registered before the check, so a report that lands during it is not missed.
        let reported = reports.notified();
        tokio::pin!(reported);
        reported.as_mut().enable();
        let (v, p) = check()?;
        if let Some(v) = v {
            return Ok(v);
        }
        if let Some(p) = p {
            progress(p);
        }
        if start.elapsed() > timeout {
            return Err(format!("{what} did not happen within {} s", timeout.as_secs()));
        }
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_millis(200)) => {}
            _ = reported => {}
        }
    }
}

pub async fn failover(
    AxState(cs): AxState<Arc<Cs>>,
    h: HeaderMap,
    Path(id): Path<u64>,
    b: Body<FailoverReq>,
) -> R<Value> {
    let by = require(cs.store(), &h, ApiRole::Operator)?;
    let req = body(b)?;
    let job = begin_failover(&cs, id, req.planned, req.point, false, &by).await?;
    Ok(Json(json!({ "job": spawn_failover(&cs, id, job) })))
}

/// Carries the failover on in the background; its job shows how it goes.
fn spawn_failover(cs: &Arc<Cs>, id: u64, job: u64) -> u64 {
    let cs = cs.clone();
    tokio::spawn(async move {
        let _ = run_failover(cs, id, job).await;
    });
    job
}

pub async fn failback(AxState(cs): AxState<Arc<Cs>>, h: HeaderMap, Path(id): Path<u64>) -> R<Value> {
    let by = require(cs.store(), &h, ApiRole::Operator)?;
    let job = begin_failover(&cs, id, true, None, true, &by).await?;
    Ok(Json(json!({ "job": spawn_failover(&cs, id, job) })))
}

/// Checks and records the start of a failover (or failback); returns its job.
pub async fn begin_failover(
    cs: &Arc<Cs>,
    id: u64,
    planned: bool,
    point: Option<PointSpec>,
    failback: bool,
    by: &str,
) -> Result<u64, ApiError> {
    let _g = cs.items_lock.lock().await;
    let store = cs.store();
    let mut item = load_item(cs, id)?;
    master_target(cs, &item)?;
    if planned && point.is_some() {
        return Err(ApiError::bad("point: a planned failover always ends at the source's final write"));
    }
    let event = if failback {
        if item.state != (State::Protected { direction: Direction::Reverse }) {
            return Err(ApiError::conflict(&format!(
                "item {id} is {}: failback needs the item protected in the reverse direction (reprotect first)",
                item.state.name()
            )));
        }
        Event::FailbackRequested
    } else {
        if planned && !matches!(item.state, State::Protected { .. }) {
            return Err(ApiError::conflict(&format!(
                "item {id} is {}: a planned failover needs a protected item (an unplanned one works from any state with recovery points)",
                item.state.name()
            )));
        }
        Event::FailoverRequested { planned }
    };
    let next = item.state.on(&event).map_err(|e| ApiError::conflict(&e.to_string()))?;
    if planned && item.process_server.is_none() {
        return Err(ApiError::conflict(&format!("item {id} has no process server: use an unplanned failover")));
    }
    let generation = sr_common::types::now_micros();
    let (kind, steps) = match (failback, planned) {
        (true, _) => ("failback", FAILBACK_STEPS),
        (false, true) => ("planned failover", PLANNED_STEPS),
        (false, false) => ("unplanned failover", UNPLANNED_STEPS),
    };
    let job = JobHandle::start(store, kind, &id.to_string(), steps)?;
    item.state = next;
    item.failover = Some(FailoverRecord {
        generation,
        planned,
        failback,
        point: point.unwrap_or(PointSpec::Latest),
        job: job.job.id,
        by: by.to_string(),
        from_machine: item.machine.clone(),
        master_target: item.master_target.clone(),
        view: None,
        point_chosen: None,
        machine: None,
        committed: None,
    });
    if !planned {
        // Nothing more flows from the source: the replica stays where it is.
        item.process_server = None;
    }
    store.put(ITEMS, &id_key(id), &item)?;
    if planned {
        cs.nudge(&item.machine);
    }
    cs.event(
        "info",
        &item.machine,
        &format!("{kind} of {} (item {id}) started by {by}: job {}", item.machine, job.job.id),
    )?;
    Ok(job.job.id)
}

/// Carries a failover (or failback) through to its end. Returns the machine description.
pub async fn run_failover(cs: Arc<Cs>, id: u64, job_id: u64) -> Result<MachineDescription, String> {
    let r = failover_steps(&cs, id, job_id).await;
    if let Err(e) = &r {
        let store = cs.store();
        let _g = cs.items_lock.lock().await;
        if let Ok(Some(job)) = JobHandle::load(store, job_id) {
            let _ = job.fail(e);
        }
        if let Ok(mut item) = load_item(&cs, id) {
            if let Ok(next) = item.state.on(&Event::FailoverFailed { reason: e.clone() }) {
                item.state = next;
                let _ = store.put(ITEMS, &id_key(id), &item);
            }
            let _ = cs.alert(&item.machine, &format!("failover of item {id} failed: {e}")).await;
        }
    }
    r
}

async fn failover_steps(cs: &Arc<Cs>, id: u64, job_id: u64) -> Result<MachineDescription, String> {
    let store = cs.store();
    let s = |e: crate::store::StoreError| e.to_string();
    let item = load_item(cs, id).map_err(|e| e.message)?;
    let fo = item.failover.clone().ok_or("the item has no failover recorded")?;
    let (generation, planned, failback) = (fo.generation, fo.planned, fo.failback);
    let mut job = JobHandle::load(store, job_id).map_err(s)?.ok_or("the job is gone")?;
    let mut step = 0;
    let point = if planned {
        job.step(0).map_err(s)?;
        let machine = item.machine.clone();
        let progress = |machine: &str| -> Result<Vec<DiskProgress>, String> {
            let m: Option<Machine> = store.get(MACHINES, machine).map_err(s)?;
            Ok(m.map(|m| m.progress).unwrap_or_default())
        };
        wait_for(
            &cs.reports,
            STOP_TIMEOUT,
            &format!(
                "the agent of {machine} stopping its disks (is it running? an unplanned failover does not need it)"
            ),
            || {
                let p = progress(&machine)?;
                let all = !p.is_empty() && p.iter().all(|d| d.stopped && d.generation == generation);
                Ok((all.then_some(()), None))
            },
            |_| {},
        )
        .await?;
        job.step_done(0).map_err(s)?;
        job.step(1).map_err(s)?;
        let wire = item.wire_id();
        let applied = |disk: u64| -> Result<u64, String> {
            Ok(store.get::<(u64, u64)>(APPLIED, &format!("{wire}-{disk}")).map_err(s)?.unwrap_or((0, 0)).0)
        };
        let mut pct_job = JobHandle::load(store, job_id).map_err(s)?.ok_or("the job is gone")?;
        // The final point is marked once dirty blocks left by the journal's limit are in the journal too;
        // then everything through it must reach the master target.
        wait_for(
            &cs.reports,
            DRAIN_TIMEOUT,
            "the journal draining to the master target",
            || {
                let p = progress(&machine)?;
                if p.is_empty() || p.iter().any(|d| d.stop_seq == 0) {
                    return Ok((None, Some(0.0)));
                }
                let (mut done, mut total) = (0, 0);
                for d in &p {
                    done += applied(d.id)?.min(d.stop_seq);
                    total += d.stop_seq;
                }
                Ok(((done >= total).then_some(()), Some(done as f64 / total.max(1) as f64)))
            },
            |f| {
                let _ = pct_job.progress((25.0 + 25.0 * f) as u8);
            },
        )
        .await?;
        job.step_done(1).map_err(s)?;
        step = 2;
        PointSpec::Tag(sr_common::types::stop_tag(generation))
    } else {
        job.step(0).map_err(s)?;
        job.step_done(0).map_err(s)?;
        step = step.max(1);
        fo.point.clone()
    };
    job.step(step).map_err(s)?;
    let mt = master_target(cs, &item).map_err(|e| e.message)?;
    let view = failover_view(id);
    let body = json!({ "name": view, "item": item.wire_id(), "point": point, "writable": true });
    let created = ensure_view(&mt, &view, body).await?;
    job.step_done(step).map_err(s)?;
    step += 1;
    job.step(step).map_err(s)?;
    let description = describe(store, &item, &created, if failback { "failback" } else { "failover" }).map_err(s)?;
    {
        let _g = cs.items_lock.lock().await;
        let mut item = load_item(cs, id).map_err(|e| e.message)?;
        let mut fo = item.failover.clone().ok_or("the failover record vanished")?;
        fo.view = Some(view);
        fo.master_target = Some(mt.name.clone());
        fo.machine = Some(description.clone());
        fo.point_chosen = Some(point.clone());
        item.failover = Some(fo);
        // The stream has ended: the source's agent keeps its disks stopped and tracks nothing new.
        item.process_server = None;
        if !failback {
            item.state = item.state.on(&Event::FailoverDone).map_err(|e| e.to_string())?;
        }
        store.put(ITEMS, &id_key(id), &item).map_err(s)?;
    }
    job.step_done(step).map_err(s)?;
    if failback {
        step += 1;
        job.step(step).map_err(s)?;
        commit_item(cs, id).await?;
        job.step_done(step).map_err(s)?;
        step += 1;
        job.step(step).map_err(s)?;
        let by = fo.by.clone();
        let rjob = crate::reprotect::begin_reprotect(cs, id, crate::reprotect::ReprotectReq::default(), &by)
            .await
            .map_err(|e| e.message)?;
        let mut pct_job = JobHandle::load(store, job_id).map_err(s)?.ok_or("the job is gone")?;
        wait_for(
            &cs.reports,
            DRAIN_TIMEOUT,
            "the forward reprotect",
            || {
                let j: Option<Job> = store.get(JOBS, &id_key(rjob)).map_err(s)?;
                let j = j.ok_or("the reprotect job is gone")?;
                match j.state {
                    JobState::Succeeded => Ok((Some(()), None)),
                    JobState::Failed => Err(format!("reprotect (job {rjob}) failed: {}", j.error.unwrap_or_default())),
                    JobState::Running => Ok((None, Some(j.progress as f64 / 100.0))),
                }
            },
            |f| {
                let _ = pct_job.progress((80.0 + 20.0 * f) as u8);
            },
        )
        .await?;
        job.step_done(step).map_err(s)?;
    }
    let job = job.succeed().map_err(s)?;
    let item = load_item(cs, id).map_err(|e| e.message)?;
    cs.event(
        "info",
        &item.machine,
        &format!("{} of item {id} done (job {}): disks up on {}", job.kind, job.id, mt.name),
    )
    .map_err(s)?;
    Ok(description)
}

/// Creates the failover view, or finds it open already (a failover resumed after a restart).
async fn ensure_view(mt: &crate::recovery::Mt, name: &str, body: Value) -> Result<ViewInfo, String> {
    match crate::recovery::mt_call_status(mt, "POST", "/v1/views", Some(body)).await {
        Ok(v) => serde_json::from_value(v)
            .map_err(|e| format!("master target {} described a view unexpectedly: {e}", mt.name)),
        // 409: a view of that name is open already.
        Err(e) if e.status == Some(409) => {
            let all: ViewList = mt_call_as(mt, "GET", "/v1/views", None).await?;
            all.views.into_iter().find(|v| v.name == name).ok_or(e.message)
        }
        Err(e) => Err(e.message),
    }
}

/// Carries on the failovers a restart of this server interrupted.
pub fn resume_failovers(cs: &Arc<Cs>) {
    let Ok(items) = cs.store().list::<Item>(ITEMS) else { return };
    for item in items {
        if !matches!(item.state, State::FailoverInProgress { .. } | State::FailingBack) {
            continue;
        }
        let Some(job) = item.failover.as_ref().map(|f| f.job) else { continue };
        tracing::info!(item = item.id, job, "resuming the failover a restart interrupted");
        spawn_failover(cs, item.id, job);
    }
}

/// Unplanned failover only, before commit: bring the disks up at another point (their writes so far
/// are discarded).
pub async fn change_point(
    AxState(cs): AxState<Arc<Cs>>,
    h: HeaderMap,
    Path(id): Path<u64>,
    b: Body<PointReq>,
) -> R<Value> {
    let by = require(cs.store(), &h, ApiRole::Operator)?;
    let req = body(b)?;
    let _g = cs.items_lock.lock().await;
    let store = cs.store();
    let mut item = load_item(&cs, id)?;
    if !matches!(item.state, State::FailedOver { .. }) {
        return Err(ApiError::conflict(&format!(
            "item {id} is {}: the point can change only after a failover and before its commit",
            item.state.name()
        )));
    }
    let mt = master_target(&cs, &item)?;
    let mut job =
        JobHandle::start(store, "change recovery point", &id.to_string(), &["bring up the disks at the new point"])?;
    job.step(0)?;
    // The disks at the new point come up beside the old ones, under a new name; only once they are up
    // and recorded are the old ones discarded. A point that does not resolve leaves the failover as it was.
    let old_view = item.failover.as_ref().and_then(|f| f.view.clone());
    let view = format!("{}-{}", failover_view(id), job.job.id);
    let r = mt_call_as::<ViewInfo>(
        &mt,
        "POST",
        "/v1/views",
        Some(json!({ "name": view, "item": item.wire_id(), "point": req.point, "writable": true })),
    )
    .await;
    let created = match r {
        Ok(v) => v,
        Err(e) => {
            let job = job.fail(&e)?;
            return Err(ApiError::conflict(&format!("changing the point failed (job {}): {e}", job.id)));
        }
    };
    let description = describe(store, &item, &created, "failover")?;
    let mut fo = item.failover.clone().ok_or_else(|| ApiError::conflict(&format!("item {id} has no failover")))?;
    fo.point_chosen = Some(req.point.clone());
    fo.machine = Some(description.clone());
    fo.view = Some(view.clone());
    item.failover = Some(fo);
    store.put(ITEMS, &id_key(id), &item)?;
    if let Some(old) = old_view.filter(|o| *o != view) {
        if let Err(e) = mt_call(&mt, "DELETE", &format!("/v1/views/{old}"), None).await {
            tracing::warn!(item = id, view = old, error = %e, "the disks at the previous point were not discarded");
        }
    }
    job.step_done(0)?;
    let job = job.succeed()?;
    cs.event("info", &item.machine, &format!("item {id}: failover point changed by {by}"))?;
    Ok(Json(json!({ "job": job.id, "machine": description })))
}

pub async fn commit(AxState(cs): AxState<Arc<Cs>>, h: HeaderMap, Path(id): Path<u64>) -> R<Value> {
    let by = require(cs.store(), &h, ApiRole::Operator)?;
    let item = load_item(&cs, id)?;
    if !matches!(item.state, State::FailedOver { .. }) {
        return Err(ApiError::conflict(&format!(
            "item {id} is {}: only a failed-over item can be committed",
            item.state.name()
        )));
    }
    let mut job =
        JobHandle::start(cs.store(), "commit failover", &id.to_string(), &["write the disks at the chosen point"])?;
    job.step(0)?;
    match commit_item(&cs, id).await {
        Ok(v) => {
            job.step_done(0)?;
            let job = job.succeed()?;
            cs.event("info", &item.machine, &format!("failover of item {id} committed by {by}"))?;
            Ok(Json(json!({ "job": job.id, "disks": v.disks })))
        }
        Err(e) => {
            let job = job.fail(&e)?;
            Err(ApiError::conflict(&format!("commit failed (job {}): {e}", job.id)))
        }
    }
}

/// Has the master target write the failover disks into plain files, and records where they are.
async fn commit_item(cs: &Arc<Cs>, id: u64) -> Result<CommitAnswer, String> {
    let item = load_item(cs, id).map_err(|e| e.message)?;
    let fo = item.failover.clone().ok_or("the item has no failover")?;
    let mt = master_target(cs, &item).map_err(|e| e.message)?;
    let body = json!({ "view": fo.view, "generation": fo.generation });
    let v: CommitAnswer = mt_call_as(&mt, "POST", "/v1/commit", Some(body)).await?;
    let _g = cs.items_lock.lock().await;
    let mut item = load_item(cs, id).map_err(|e| e.message)?;
    let mut fo = item.failover.clone().ok_or("the failover record vanished")?;
    fo.committed = Some(v.disks.clone());
    // The description now names files, for an agent (or a hypervisor) on this site to front.
    for d in fo.machine.iter_mut().flat_map(|m| m.disks.iter_mut()) {
        d.path = v.disks.iter().find(|c| c.disk == d.id).map(|c| c.path.clone());
        d.uri = None;
        d.export = None;
    }
    item.failover = Some(fo);
    let event = if matches!(item.state, State::FailingBack) { Event::FailbackDone } else { Event::CommitRequested };
    item.state = item.state.on(&event).map_err(|e| e.to_string())?;
    cs.store().put(ITEMS, &id_key(id), &item).map_err(|e| e.to_string())?;
    Ok(v)
}
