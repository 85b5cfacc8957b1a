//! Recovery plans: machines in ordered groups, fail over together.
//!
//! ```text
//! POST /v1/plans/{id}/failover {kind}
//!   test:      consistency point across every agent of the plan --> per group: pre actions -->
//!              test failover of each machine at that point --> post actions
//!   planned:   per group: pre --> planned failover of each machine (stop, drain, final point) --> post
//!   unplanned: per group: pre --> failover of each machine at the chosen point (default: the plan's
//!              latest consistency point, else the latest) --> post
//! consistency point: hold every agent (no write completes anywhere) --> then mark each and release;
//!   a write that started after another completed is never in the point without it
//! manual action: the job waits until POST /v1/plans/{id}/resume
//! ```

use crate::auth::require;
use crate::error::{body, ApiError, Body, R};
use crate::jobs::JobHandle;
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
use std::time::Duration;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RunReq {
    /// "test", "planned" or "unplanned".
    pub kind: String,
    /// Unplanned only: the point for every machine.
    #[serde(default)]
    pub point: Option<PointSpec>,
}

fn validate(cs: &Cs, p: &Plan) -> Result<(), ApiError> {
    if p.name.trim().is_empty() || p.name.len() > 128 {
        return Err(ApiError::bad("name: 1 to 128 characters"));
    }
    if p.groups.is_empty() {
        return Err(ApiError::bad("groups: at least one"));
    }
    let mut seen = Vec::new();
    for (i, g) in p.groups.iter().enumerate() {
        if g.items.is_empty() {
            return Err(ApiError::bad(&format!("groups[{i}].items: at least one item")));
        }
        for id in &g.items {
            if seen.contains(id) {
                return Err(ApiError::bad(&format!("item {id} is in the plan twice")));
            }
            seen.push(*id);
            load_item(cs, *id).map_err(|_| ApiError::bad(&format!("groups[{i}].items: no item {id}")))?;
        }
        for a in g.pre.iter().chain(&g.post) {
            match a {
                PlanAction::Script { command, timeout_secs } if command.trim().is_empty() || *timeout_secs == 0 => {
                    return Err(ApiError::bad(&format!(
                        "groups[{i}]: a script needs a command and a timeout of at least 1 s"
                    )))
                }
                PlanAction::Manual { instruction } if instruction.trim().is_empty() => {
                    return Err(ApiError::bad(&format!("groups[{i}]: a manual action needs an instruction")))
                }
                _ => {}
            }
        }
    }
    Ok(())
}

fn load_plan(cs: &Cs, id: &str) -> Result<Plan, ApiError> {
    let plans: Vec<Plan> = cs.store().list(PLANS)?;
    plans.into_iter().find(|p| p.id == id || p.name == id).ok_or_else(|| ApiError::not_found(&format!("no plan {id}")))
}

pub async fn list(AxState(cs): AxState<Arc<Cs>>, h: HeaderMap) -> R<Value> {
    require(cs.store(), &h, ApiRole::Reader)?;
    let plans: Vec<Plan> = cs.store().list(PLANS)?;
    Ok(Json(json!(plans)))
}

pub async fn get(AxState(cs): AxState<Arc<Cs>>, h: HeaderMap, Path(id): Path<String>) -> R<Value> {
    require(cs.store(), &h, ApiRole::Reader)?;
    let p = load_plan(&cs, &id)?;
    let mut v = json!(p);
    v["latest_point"] = json!(cs.store().get::<PlanPoint>(PLAN_POINTS, &p.id)?.filter(|pt| !pt.tag.is_empty()));
    Ok(Json(v))
}

/// Scripts run as shell commands on this host, beside the CA key and every data key: a plan that
/// has any is made and run by an admin only.
fn needed_role(p: &Plan) -> ApiRole {
    let scripted =
        p.groups.iter().flat_map(|g| g.pre.iter().chain(&g.post)).any(|a| matches!(a, PlanAction::Script { .. }));
    if scripted {
        ApiRole::Admin
    } else {
        ApiRole::Operator
    }
}

pub async fn create(AxState(cs): AxState<Arc<Cs>>, h: HeaderMap, b: Body<Plan>) -> R<Value> {
    require(cs.store(), &h, ApiRole::Operator)?;
    let mut p = body(b)?;
    let by = require(cs.store(), &h, needed_role(&p))?;
    validate(&cs, &p)?;
    let store = cs.store();
    let all: Vec<Plan> = store.list(PLANS)?;
    if all.iter().any(|x| x.name == p.name) {
        return Err(ApiError::conflict(&format!("a plan named {} exists", p.name)));
    }
    p.id = id_key(store.next_id(PLANS)?);
    store.put(PLANS, &p.id, &p)?;
    cs.event("info", &p.name, &format!("recovery plan {} created by {by}", p.name))?;
    Ok(Json(json!(p)))
}

pub async fn delete(AxState(cs): AxState<Arc<Cs>>, h: HeaderMap, Path(id): Path<String>) -> R<Value> {
    require(cs.store(), &h, ApiRole::Operator)?;
    let p = load_plan(&cs, &id)?;
    cs.store().delete(PLANS, &p.id)?;
    Ok(Json(json!({ "deleted": p.id })))
}

pub async fn resume(AxState(cs): AxState<Arc<Cs>>, h: HeaderMap, Path(id): Path<String>) -> R<Value> {
    let by = require(cs.store(), &h, ApiRole::Operator)?;
    let p = load_plan(&cs, &id)?;
    let waiting = cs.plan_waits.lock().expect("plan waits lock poisoned").remove(&p.id);
    match waiting {
        Some(tx) => {
            let _ = tx.send(by.clone());
            cs.event("info", &p.name, &format!("plan {} resumed by {by}", p.name))?;
            Ok(Json(json!({ "resumed": p.id })))
        }
        None => Err(ApiError::conflict(&format!("plan {} is not waiting at a manual action", p.name))),
    }
}

/// Takes a consistency point now on every machine of the plan; returns its tag.
pub async fn consistency_point(AxState(cs): AxState<Arc<Cs>>, h: HeaderMap, Path(id): Path<String>) -> R<Value> {
    require(cs.store(), &h, ApiRole::Operator)?;
    let p = load_plan(&cs, &id)?;
    let (tag, marks) = take_consistency_point(&cs, &p).await.map_err(|e| ApiError::conflict(&e))?;
    Ok(Json(json!({ "tag": tag, "marks": marks })))
}

pub async fn run(AxState(cs): AxState<Arc<Cs>>, h: HeaderMap, Path(id): Path<String>, b: Body<RunReq>) -> R<Value> {
    require(cs.store(), &h, ApiRole::Operator)?;
    let req = body(b)?;
    let p = load_plan(&cs, &id)?;
    let by = require(cs.store(), &h, needed_role(&p))?;
    if !matches!(req.kind.as_str(), "test" | "planned" | "unplanned") {
        return Err(ApiError::bad("kind: test, planned or unplanned"));
    }
    if req.point.is_some() && req.kind != "unplanned" {
        return Err(ApiError::bad("point: only for an unplanned failover"));
    }
    if cs.plan_waits.lock().expect("plan waits lock poisoned").contains_key(&p.id) {
        return Err(ApiError::conflict(&format!("plan {} is already running (waiting at a manual action)", p.name)));
    }
    let mut steps = Vec::new();
    if req.kind == "test" {
        steps.push("take a consistency point on every machine".to_string());
    }
    for (i, g) in p.groups.iter().enumerate() {
        let n = i + 1;
        steps.push(format!("group {n}: pre actions ({})", g.pre.len()));
        steps.push(format!("group {n}: fail over {} machine(s)", g.items.len()));
        steps.push(format!("group {n}: post actions ({})", g.post.len()));
    }
    let names: Vec<&str> = steps.iter().map(String::as_str).collect();
    let job = JobHandle::start(cs.store(), &format!("plan {} failover", req.kind), &p.name, &names)?;
    let job_id = job.job.id;
    let cs2 = cs.clone();
    tokio::spawn(async move {
        let r = run_plan(&cs2, &p, &req, job_id, &by).await;
        if let Ok(Some(job)) = JobHandle::load(cs2.store(), job_id) {
            match r {
                Ok(()) => {
                    let _ = job.succeed();
                    let _ = cs2.event(
                        "info",
                        &p.name,
                        &format!("plan {} {} failover done (job {job_id})", p.name, req.kind),
                    );
                }
                Err(e) => {
                    let _ = job.fail(&e);
                    let _ = cs2
                        .alert(&p.name, &format!("plan {} {} failover failed (job {job_id}): {e}", p.name, req.kind))
                        .await;
                }
            }
        }
        cs2.plan_waits.lock().expect("plan waits lock poisoned").remove(&p.id);
    });
    Ok(Json(json!({ "job": job_id })))
}

async fn run_plan(cs: &Arc<Cs>, p: &Plan, req: &RunReq, job_id: u64, by: &str) -> Result<(), String> {
    let store = cs.store();
    let s = |e: crate::store::StoreError| e.to_string();
    let job = || -> Result<JobHandle<'_>, String> {
        JobHandle::load(store, job_id).map_err(s)?.ok_or("the job is gone".into())
    };
    let mut step = 0;
    let point = match req.kind.as_str() {
        "test" => {
            job()?.step(0).map_err(s)?;
            let (tag, _) = take_consistency_point(cs, p).await?;
            job()?.step_done(0).map_err(s)?;
            step = 1;
            Some(PointSpec::Tag(tag))
        }
        "unplanned" => match &req.point {
            Some(pt) => Some(pt.clone()),
            None => Some(latest_plan_point(cs, p).unwrap_or(PointSpec::Latest)),
        },
        _ => None,
    };
    for (gi, g) in p.groups.iter().enumerate() {
        let n = gi + 1;
        job()?.step(step).map_err(s)?;
        run_actions(cs, p, &g.pre, n, "pre", &req.kind).await?;
        job()?.step_done(step).map_err(s)?;
        step += 1;
        job()?.step(step).map_err(s)?;
        for id in &g.items {
            let r = match req.kind.as_str() {
                "test" => crate::recovery::test_failover_item(cs, *id, point.clone().unwrap_or(PointSpec::Latest), by)
                    .await
                    .map(|_| ())
                    .map_err(|e| e.message),
                kind => {
                    let planned = kind == "planned";
                    let pt = if planned { None } else { point.clone() };
                    let j = crate::failover::begin_failover(cs, *id, planned, pt, false, by)
                        .await
                        .map_err(|e| e.message)?;
                    crate::failover::run_failover(cs.clone(), *id, j).await.map(|_| ())
                }
            };
            r.map_err(|e| format!("group {n}, item {id}: {e}"))?;
        }
        job()?.step_done(step).map_err(s)?;
        step += 1;
        job()?.step(step).map_err(s)?;
        run_actions(cs, p, &g.post, n, "post", &req.kind).await?;
        job()?.step_done(step).map_err(s)?;
        step += 1;
    }
    Ok(())
}

async fn run_actions(
    cs: &Arc<Cs>,
    p: &Plan,
    actions: &[PlanAction],
    group: usize,
    when: &str,
    kind: &str,
) -> Result<(), String> {
    for a in actions {
        match a {
            PlanAction::Script { command, timeout_secs } => {
                let env = [
                    ("SR_PLAN", p.name.clone()),
                    ("SR_GROUP", group.to_string()),
                    ("SR_PHASE", when.to_string()),
                    ("SR_FAILOVER_KIND", kind.to_string()),
                ];
                let (cmd, t) = (command.clone(), Duration::from_secs(*timeout_secs));
                let out = tokio::task::spawn_blocking(move || {
                    let env: Vec<(&str, String)> = env.iter().map(|(k, v)| (*k, v.clone())).collect();
                    sr_common::hook::run(&cmd, t, &env)
                })
                .await
                .map_err(|e| e.to_string())?
                .map_err(|e| format!("group {group} {when} script: {e}"))?;
                cs.event(
                    "info",
                    &p.name,
                    &format!("plan {}: group {group} {when} script `{command}` ran: {out}", p.name),
                )
                .map_err(|e| e.to_string())?;
            }
            PlanAction::Manual { instruction } => {
                let (tx, rx) = tokio::sync::oneshot::channel();
                cs.plan_waits.lock().expect("plan waits lock poisoned").insert(p.id.clone(), tx);
                cs.event(
                    "warning",
                    &p.name,
                    &format!("plan {}: group {group} {when}: waiting for resume: {instruction}", p.name),
                )
                .map_err(|e| e.to_string())?;
                let by = rx.await.map_err(|_| "the manual action was abandoned".to_string())?;
                tracing::info!(plan = p.name, group, by, "manual action resumed");
            }
        }
    }
    Ok(())
}

/// The plan's latest consistency point, when one was taken.
fn latest_plan_point(cs: &Cs, p: &Plan) -> Option<PointSpec> {
    let pt: PlanPoint = cs.store().get(PLAN_POINTS, &p.id).ok()??;
    (!pt.tag.is_empty()).then_some(PointSpec::Tag(pt.tag))
}

/// Starts the consistency points plans are due for (every second, from the evaluation loop). A plan
/// whose machines are not all replicating waits; a failed point is logged and tried at the next interval.
pub fn due_points(cs: &Arc<Cs>) {
    let Ok(plans) = cs.store().list::<Plan>(PLANS) else { return };
    for p in plans.into_iter().filter(|p| p.consistency_interval_secs > 0) {
        let last = cs.store().get::<PlanPoint>(PLAN_POINTS, &p.id).ok().flatten();
        let last = last.map_or(0, |pt| pt.taken.max(pt.attempted));
        if now().saturating_sub(last) < p.consistency_interval_secs {
            continue;
        }
        let all_replicating = p.groups.iter().flat_map(|g| &g.items).all(|id| {
            cs.store().get::<Item>(ITEMS, &id_key(*id)).ok().flatten().is_some_and(|i| i.state.replicating())
        });
        if !all_replicating || cs.plan_busy.lock().expect("plan busy lock poisoned").contains(&p.id) {
            continue;
        }
        let cs = cs.clone();
        tokio::spawn(async move {
            if let Err(e) = take_consistency_point(&cs, &p).await {
                tracing::warn!(
                    plan = p.name,
                    error = e,
                    "scheduled consistency point failed; trying again at the next interval"
                );
                let prev = cs.store().get::<PlanPoint>(PLAN_POINTS, &p.id).ok().flatten();
                let prev = prev.unwrap_or(PlanPoint { tag: String::new(), taken: 0, attempted: 0 });
                let _ = cs.store().put(PLAN_POINTS, &p.id, &PlanPoint { attempted: now(), ..prev });
            }
        });
    }
}

/// Marks a plan as taking a consistency point until dropped (one at a time per plan).
struct Busy<'a> {
    cs: &'a Cs,
    plan: String,
}

impl Drop for Busy<'_> {
    fn drop(&mut self) {
        self.cs.plan_busy.lock().expect("plan busy lock poisoned").remove(&self.plan);
    }
}

async fn busy<'a>(cs: &'a Cs, plan: &str) -> Result<Busy<'a>, String> {
    let start = std::time::Instant::now();
    while !cs.plan_busy.lock().expect("plan busy lock poisoned").insert(plan.to_string()) {
        if start.elapsed() > Duration::from_secs(30) {
            return Err("another consistency point of this plan has not finished in 30 s".into());
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    Ok(Busy { cs, plan: plan.to_string() })
}

/// Holds every agent of the plan, then marks and releases each: one cut across all machines.
async fn take_consistency_point(cs: &Arc<Cs>, p: &Plan) -> Result<(String, Vec<Value>), String> {
    let _busy = busy(cs, &p.id).await?;
    let store = cs.store();
    let tag = format!("plan-{}-{}", p.id.trim_start_matches('0'), sr_common::types::now_micros());
    let mut agents = Vec::new();
    for id in p.groups.iter().flat_map(|g| &g.items) {
        let item = load_item(cs, *id).map_err(|e| e.message)?;
        if !item.state.replicating() {
            return Err(format!(
                "item {id} ({}) is {}: a consistency point needs every machine replicating",
                item.machine,
                item.state.name()
            ));
        }
        let c: Component = store
            .get(COMPONENTS, &item.machine)
            .map_err(|e| e.to_string())?
            .ok_or(format!("agent {} is not registered", item.machine))?;
        let addr: std::net::SocketAddr = c
            .http
            .as_deref()
            .and_then(|a| a.parse().ok())
            .ok_or(format!("agent {} has not reported its HTTP address", item.machine))?;
        agents.push((item, addr));
    }
    let client = cs.client(sr_common::wire::Role::Agent).map_err(|e| format!("{e:#}"))?;
    let call = |addr: std::net::SocketAddr, path: &'static str, body: Value| {
        let client = client.clone();
        tokio::task::spawn_blocking(move || {
            client.post_json(addr, path, &body).map_err(|e| format!("agent at {addr}: {e}"))
        })
    };
    let holds: Vec<_> =
        agents.iter().map(|(_, a)| call(*a, "/v1/hold", json!({ "tag": tag, "timeout_ms": 10_000 }))).collect();
    let mut held = Vec::new();
    let mut failed = None;
    for (h, (item, addr)) in holds.into_iter().zip(&agents) {
        match h.await.map_err(|e| e.to_string()).and_then(|r| r) {
            Ok(_) => held.push(*addr),
            Err(e) => failed = Some(format!("holding the writes of {}: {e}", item.machine)),
        }
    }
    if let Some(e) = failed {
        for a in held {
            let _ = call(a, "/v1/release", json!({ "tag": tag, "mark": false })).await;
        }
        return Err(e);
    }
    let releases: Vec<_> =
        agents.iter().map(|(_, a)| call(*a, "/v1/release", json!({ "tag": tag, "mark": true }))).collect();
    let mut marks = Vec::new();
    for (r, (item, _)) in releases.into_iter().zip(&agents) {
        let v = r.await.map_err(|e| e.to_string())?.map_err(|e| format!("marking {}: {e}", item.machine))?;
        marks.push(json!({ "item": item.id, "machine": item.machine, "marks": v["marks"] }));
    }
    // The point exists once every master target applied the marks.
    let wire: Vec<(u64, Value)> =
        agents.iter().zip(&marks).map(|((i, _), m)| (i.wire_id(), m["marks"].clone())).collect();
    let start = std::time::Instant::now();
    loop {
        let mut all = true;
        for (w, ms) in &wire {
            for m in ms.as_array().into_iter().flatten() {
                let (disk, seq) = (m["disk"].as_u64().unwrap_or(0), m["seq"].as_u64().unwrap_or(u64::MAX));
                let applied = store
                    .get::<(u64, u64)>(APPLIED, &format!("{w}-{disk}"))
                    .map_err(|e| e.to_string())?
                    .unwrap_or((0, 0))
                    .0;
                all &= applied >= seq;
            }
        }
        if all {
            break;
        }
        if start.elapsed() > Duration::from_secs(600) {
            return Err(format!("the consistency point {tag} was not applied on every master target within 600 s"));
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let pt = PlanPoint { tag: tag.clone(), taken: now(), attempted: now() };
    cs.store().put(PLAN_POINTS, &p.id, &pt).map_err(|e| e.to_string())?;
    cs.event("info", &p.name, &format!("plan {}: consistency point {tag} on {} machine(s)", p.name, agents.len()))
        .map_err(|e| e.to_string())?;
    Ok((tag, marks))
}
