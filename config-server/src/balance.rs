//! Moving items between process servers: one item on request, every item off one process server
//! (drain, before scaling down), or from the busiest to the least busy (balance, after scaling out).
//! [`plan`] decides, purely; the handlers record each move as a job that ends once the replica
//! caught up through the new process server. Nothing is lost by a move: the agent keeps every change
//! until the master target applied it, and sends what the old process server had not forwarded to
//! the new one (the master target applies each change once).

use crate::auth::require;
use crate::error::{body, ApiError, Body, R};
use crate::jobs::JobHandle;
use crate::lifecycle::State;
use crate::model::*;
use crate::store::Docs;
use crate::Cs;
use axum::extract::{Path, State as AxState};
use axum::http::HeaderMap;
use axum::Json;
use serde::Deserialize;
use serde_json::{json, Value};
use std::collections::BTreeMap;
use std::sync::Arc;

/// The job kind of a move.
pub const JOB_KIND: &str = "move process server";
const STEPS: &[&str] = &["assign the new process server", "catch up through it"];

/// What an operator asked for.
#[derive(Debug, Clone, PartialEq)]
pub enum Request<'a> {
    /// One item, to a named process server or the least busy other one.
    Item { item: u64, to: Option<&'a str> },
    /// Every item off this process server.
    Drain(&'a str),
    /// Items from the busiest process servers to the least busy, until their counts differ by at most one.
    Balance,
}

/// One item's move.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Move {
    pub item: u64,
    pub from: String,
    pub to: String,
}

/// Why a request cannot be carried out.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refused {
    #[error("item {0} does not exist")]
    NoItem(u64),
    #[error("item {0} is {1}: only an item that replicates through a process server can move")]
    NotMovable(u64, &'static str),
    #[error("{0} is not a registered process server")]
    NoProcessServer(String),
    #[error("process server {0} is draining, unreachable or revoked: it takes no items")]
    Unavailable(String),
    #[error("item {0} is on {1} already")]
    AlreadyThere(u64, String),
    #[error("no other live process server to move to: add one (helm upgrade --set processServer.replicas=N)")]
    NowhereToGo,
}

impl Refused {
    /// Not found, or a conflict with the deployment's state.
    pub fn not_found(&self) -> bool {
        matches!(self, Refused::NoItem(_) | Refused::NoProcessServer(_))
    }
}

/// Whether an item's data flows through its process server, so that it can move.
pub fn movable(i: &Item) -> bool {
    i.process_server.is_some() && (i.state.replicating() || matches!(i.state, State::Critical { .. }))
}

/// Decides the moves for `req`. A target is a live process server that is not draining; load is the
/// number of items placed on it.
pub fn plan(req: &Request, comps: &[Component], items: &[Item], now: u64, timeout: u64) -> Result<Vec<Move>, Refused> {
    let open = |c: &Component| {
        c.role == ComponentRole::ProcessServer && !c.draining && crate::orchestrate::live(c, now, timeout)
    };
    let mut load: BTreeMap<&str, usize> = comps.iter().filter(|c| open(c)).map(|c| (c.name.as_str(), 0)).collect();
    for i in items.iter().filter(|i| i.state != State::Unprotected) {
        if let Some(n) = load.get_mut(i.process_server.as_deref().unwrap_or_default()) {
            *n += 1;
        }
    }
    // The least loaded open process server other than `from` (ties: by name).
    let least = |load: &BTreeMap<&str, usize>, from: &str| {
        load.iter().filter(|(n, _)| **n != from).min_by_key(|(n, c)| (**c, **n)).map(|(n, _)| n.to_string())
    };
    match req {
        Request::Item { item, to } => {
            let i = items.iter().find(|i| i.id == *item).ok_or(Refused::NoItem(*item))?;
            if !movable(i) {
                return Err(Refused::NotMovable(i.id, i.state.name()));
            }
            let from = i.process_server.clone().unwrap_or_default();
            let to = match to {
                Some(t) => {
                    let c = comps
                        .iter()
                        .find(|c| c.name == *t && c.role == ComponentRole::ProcessServer)
                        .ok_or_else(|| Refused::NoProcessServer(t.to_string()))?;
                    if c.name == from {
                        return Err(Refused::AlreadyThere(i.id, from));
                    }
                    if !open(c) {
                        return Err(Refused::Unavailable(c.name.clone()));
                    }
                    c.name.clone()
                }
                None => least(&load, &from).ok_or(Refused::NowhereToGo)?,
            };
            Ok(vec![Move { item: i.id, from, to }])
        }
        Request::Drain(ps) => {
            if !comps.iter().any(|c| c.name == *ps && c.role == ComponentRole::ProcessServer) {
                return Err(Refused::NoProcessServer(ps.to_string()));
            }
            load.remove(ps);
            let mut moves = Vec::new();
            let mut on: Vec<&Item> =
                items.iter().filter(|i| i.process_server.as_deref() == Some(*ps) && movable(i)).collect();
            on.sort_by_key(|i| i.id);
            for i in on {
                let to = least(&load, ps).ok_or(Refused::NowhereToGo)?;
                *load.entry(comps.iter().find(|c| c.name == to).map_or("", |c| c.name.as_str())).or_default() += 1;
                moves.push(Move { item: i.id, from: ps.to_string(), to });
            }
            Ok(moves)
        }
        Request::Balance => {
            let mut moves = Vec::new();
            // An item on its way somewhere is left to finish its move.
            let mut placed: Vec<(u64, String)> = items
                .iter()
                .filter(|i| movable(i) && i.moving.is_none())
                .filter_map(|i| Some((i.id, i.process_server.clone()?)))
                .filter(|(_, ps)| load.contains_key(ps.as_str()))
                .collect();
            placed.sort();
            for _ in 0..placed.len() {
                // The busiest process server that has an item free to move (one whose items are all
                // still moving or cannot move does not stop the others from evening out).
                let Some((busiest, most)) = load
                    .iter()
                    .filter(|(n, _)| placed.iter().any(|(_, ps)| ps == **n))
                    .max_by_key(|(n, c)| (**c, std::cmp::Reverse(**n)))
                    .map(|(n, c)| (n.to_string(), *c))
                else {
                    break;
                };
                let Some(to) = least(&load, &busiest) else { break };
                if most <= load[to.as_str()] + 1 {
                    break;
                }
                let Some(pos) = placed.iter().position(|(_, ps)| *ps == busiest) else { break };
                let (item, _) = placed.remove(pos);
                *load.get_mut(busiest.as_str()).expect("busiest is in the load") -= 1;
                *load.get_mut(to.as_str()).expect("least is in the load") += 1;
                moves.push(Move { item, from: busiest, to });
            }
            Ok(moves)
        }
    }
}

fn refused(e: Refused) -> ApiError {
    if e.not_found() {
        ApiError::new(axum::http::StatusCode::NOT_FOUND, &e.to_string())
    } else {
        ApiError::conflict(&e.to_string())
    }
}

/// Plans `req` and records its moves: each item's new process server, and a job per move.
async fn carry_out(cs: &Cs, by: &str, req: Request<'_>, drain: Option<&str>) -> R<Value> {
    let store = cs.store();
    let _g = cs.items_lock.lock().await;
    let mut comps: Vec<Component> = store.list(COMPONENTS)?;
    let items: Vec<Item> = store.list(ITEMS)?;
    let mut newly_draining = None;
    if let Some(ps) = drain {
        let Some(c) = comps.iter_mut().find(|c| c.name == ps && c.role == ComponentRole::ProcessServer) else {
            return Err(refused(Refused::NoProcessServer(ps.to_string())));
        };
        if !c.draining {
            c.draining = true;
            newly_draining = Some(c.clone());
        }
    }
    // Planned first: a drain with nowhere to go changes nothing.
    let moves = plan(&req, &comps, &items, now(), cs.cfg.component_timeout_secs).map_err(refused)?;
    if let Some(c) = newly_draining {
        store.put(COMPONENTS, &c.name, &c)?;
        let ps = &c.name;
        cs.event("info", ps, &format!("process server {ps} is draining (asked by {by}): it takes no new items"))?;
    }
    let mut out = Vec::new();
    for m in moves {
        let Some(mut item) = store.get::<Item>(ITEMS, &id_key(m.item))? else { continue };
        if let Some(old) = item.moving.take() {
            if let Some(job) = JobHandle::load(store, old.job)? {
                if job.job.state == JobState::Running {
                    job.fail(&format!("superseded by a move to {}", m.to))?;
                }
            }
        }
        let mut job = JobHandle::start(store, JOB_KIND, &m.item.to_string(), STEPS)?;
        job.step(0)?;
        job.step_done(0)?;
        job.step(1)?;
        item.process_server = Some(m.to.clone());
        item.moving = Some(MoveRecord { job: job.job.id, from: m.from.clone(), to: m.to.clone(), since: now() });
        store.put(ITEMS, &id_key(item.id), &item)?;
        cs.event(
            "info",
            &item.machine,
            &format!("item {}: moving from {} to {} (asked by {by})", m.item, m.from, m.to),
        )?;
        out.push(json!({ "item": m.item, "from": m.from, "to": m.to, "job": job.job.id }));
    }
    Ok(Json(json!({ "moves": out })))
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct MoveItem {
    #[serde(default)]
    process_server: Option<String>,
}

pub async fn move_item(
    AxState(cs): AxState<Arc<Cs>>,
    h: HeaderMap,
    Path(id): Path<u64>,
    b: Body<MoveItem>,
) -> R<Value> {
    let by = require(cs.store(), &h, ApiRole::Operator)?;
    let req = body(b)?;
    carry_out(&cs, &by, Request::Item { item: id, to: req.process_server.as_deref() }, None).await
}

pub async fn drain(AxState(cs): AxState<Arc<Cs>>, h: HeaderMap, Path(name): Path<String>) -> R<Value> {
    let by = require(cs.store(), &h, ApiRole::Operator)?;
    carry_out(&cs, &by, Request::Drain(&name), Some(&name)).await
}

/// The configuration's automatic balance (`auto_balance_secs`).
pub async fn auto_balance(cs: &Cs) -> Result<(), ApiError> {
    let v = carry_out(cs, "automatic balance", Request::Balance, None).await?;
    let n = v.0["moves"].as_array().map_or(0, |m| m.len());
    if n > 0 {
        tracing::info!(moves = n, "items moved to even out the process servers");
    }
    Ok(())
}

pub async fn balance(AxState(cs): AxState<Arc<Cs>>, h: HeaderMap) -> R<Value> {
    let by = require(cs.store(), &h, ApiRole::Operator)?;
    carry_out(&cs, &by, Request::Balance, None).await
}

/// Ends a drain: the process server takes new items again.
pub async fn resume(AxState(cs): AxState<Arc<Cs>>, h: HeaderMap, Path(name): Path<String>) -> R<Value> {
    let by = require(cs.store(), &h, ApiRole::Operator)?;
    let store = cs.store();
    let _g = cs.items_lock.lock().await;
    let Some(mut c) = store.get::<Component>(COMPONENTS, &name)?.filter(|c| c.role == ComponentRole::ProcessServer)
    else {
        return Err(refused(Refused::NoProcessServer(name)));
    };
    if c.draining {
        c.draining = false;
        store.put(COMPONENTS, &c.name, &c)?;
        cs.event("info", &name, &format!("process server {name} takes items again (asked by {by})"))?;
    }
    Ok(Json(json!({ "name": c.name, "draining": c.draining })))
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::lifecycle::Direction;

    const NOW: u64 = 1000;

    fn ps(name: &str, heard: u64) -> Component {
        Component {
            name: name.into(),
            role: ComponentRole::ProcessServer,
            serial: 1,
            registered_at: 0,
            last_heartbeat: Some(heard),
            address: Some("10.0.0.1:1".into()),
            http: None,
            revoked: false,
            load: Default::default(),
            draining: false,
        }
    }

    fn item(id: u64, on: &str) -> Item {
        Item {
            process_server: Some(on.into()),
            ..Item::new(id, &format!("vm{id}"), "p", State::Protected { direction: Direction::Forward }, 0)
        }
    }

    fn moves(m: &[Move]) -> Vec<(u64, &str, &str)> {
        m.iter().map(|m| (m.item, m.from.as_str(), m.to.as_str())).collect()
    }

    #[test]
    fn one_item_moves_to_the_named_or_the_least_busy_process_server() {
        let comps = vec![ps("ps-1", NOW), ps("ps-2", NOW), ps("ps-3", NOW)];
        let items = vec![item(1, "ps-1"), item(2, "ps-1"), item(3, "ps-2")];
        let go = |req| plan(&req, &comps, &items, NOW, 10);
        assert_eq!(moves(&go(Request::Item { item: 1, to: None }).unwrap()), vec![(1, "ps-1", "ps-3")]);
        assert_eq!(moves(&go(Request::Item { item: 1, to: Some("ps-2") }).unwrap()), vec![(1, "ps-1", "ps-2")]);
        assert_eq!(go(Request::Item { item: 1, to: Some("ps-1") }), Err(Refused::AlreadyThere(1, "ps-1".into())));
        assert_eq!(go(Request::Item { item: 9, to: None }), Err(Refused::NoItem(9)));
        assert_eq!(go(Request::Item { item: 1, to: Some("mt") }), Err(Refused::NoProcessServer("mt".into())));
        let failed_over = Item { state: State::FailedOver { direction: Direction::Forward }, ..item(4, "ps-1") };
        let items2 = [items.clone(), vec![failed_over]].concat();
        let e = plan(&Request::Item { item: 4, to: None }, &comps, &items2, NOW, 10).unwrap_err();
        assert_eq!(e, Refused::NotMovable(4, "failed_over"));
    }

    #[test]
    fn silent_and_draining_process_servers_take_nothing() {
        let mut draining = ps("ps-3", NOW);
        draining.draining = true;
        let comps = vec![ps("ps-1", NOW), ps("ps-2", NOW - 60), draining];
        let items = vec![item(1, "ps-1")];
        let go = |to| plan(&Request::Item { item: 1, to }, &comps, &items, NOW, 10);
        assert_eq!(go(None), Err(Refused::NowhereToGo));
        assert_eq!(go(Some("ps-2")), Err(Refused::Unavailable("ps-2".into())));
        assert_eq!(go(Some("ps-3")), Err(Refused::Unavailable("ps-3".into())));
    }

    #[test]
    fn a_drain_spreads_every_item_over_the_others() {
        let comps = vec![ps("ps-1", NOW), ps("ps-2", NOW), ps("ps-3", NOW)];
        let items = vec![item(1, "ps-1"), item(2, "ps-1"), item(3, "ps-1"), item(4, "ps-2"), item(5, "ps-1")];
        let m = plan(&Request::Drain("ps-1"), &comps, &items, NOW, 10).unwrap();
        assert_eq!(moves(&m), vec![(1, "ps-1", "ps-3"), (2, "ps-1", "ps-2"), (3, "ps-1", "ps-3"), (5, "ps-1", "ps-2")]);
        assert_eq!(plan(&Request::Drain("ps-1"), &comps[..1], &items, NOW, 10), Err(Refused::NowhereToGo));
        assert_eq!(plan(&Request::Drain("ps-2"), &comps, &[], NOW, 10), Ok(vec![]));
    }

    #[test]
    fn balance_evens_the_counts_out() {
        let comps = vec![ps("ps-1", NOW), ps("ps-2", NOW), ps("ps-3", NOW)];
        let items: Vec<Item> = (1..=7).map(|i| item(i, if i <= 6 { "ps-1" } else { "ps-2" })).collect();
        let m = plan(&Request::Balance, &comps, &items, NOW, 10).unwrap();
        let mut count: BTreeMap<String, i64> =
            BTreeMap::from([("ps-1".into(), 6), ("ps-2".into(), 1), ("ps-3".into(), 0)]);
        for mv in &m {
            *count.get_mut(&mv.from).unwrap() -= 1;
            *count.get_mut(&mv.to).unwrap() += 1;
        }
        let (lo, hi) = (count.values().min().unwrap(), count.values().max().unwrap());
        assert!(hi - lo <= 1, "{count:?} after {m:?}");
        assert_eq!(m.len(), 3, "6, 1, 0 become 3, 2, 2: no more moves than needed: {m:?}");
        let even: Vec<Item> = vec![item(1, "ps-1"), item(2, "ps-2"), item(3, "ps-3"), item(4, "ps-1")];
        assert_eq!(plan(&Request::Balance, &comps, &even, NOW, 10), Ok(vec![]));
        // Items still moving stay put (they count where they go).
        let rec = |id| MoveRecord { job: id, from: "ps-2".into(), to: "ps-1".into(), since: NOW };
        let busy: Vec<Item> = (1..=3).map(|i| Item { moving: Some(rec(i)), ..item(i, "ps-1") }).collect();
        assert_eq!(plan(&Request::Balance, &comps, &busy, NOW, 10), Ok(vec![]));
        // ps-1 holds 3 items that are all moving; ps-2's 2 still even out with the empty ps-3.
        let mixed: Vec<Item> = [busy, vec![item(4, "ps-2"), item(5, "ps-2")]].concat();
        let m = plan(&Request::Balance, &comps, &mixed, NOW, 10).unwrap();
        assert_eq!(moves(&m), vec![(4, "ps-2", "ps-3")]);
    }
}
