//! What happened: jobs with their steps, and the event log.

use crate::auth::require;
use crate::error::{ApiError, R};
use crate::model::*;
use crate::store::Docs;
use crate::Cs;
use axum::extract::{Path, Query, State};
use axum::http::HeaderMap;
use axum::Json;
use serde::Deserialize;
use std::sync::Arc;

#[derive(Deserialize)]
pub struct JobFilter {
    state: Option<JobState>,
    kind: Option<String>,
    target: Option<String>,
    /// Only jobs with a smaller id (the previous page's first).
    before: Option<u64>,
    /// At most this many, the newest (default and most: [`PAGE`]).
    limit: Option<usize>,
}

/// Most entries one page of jobs or events holds.
pub const PAGE: usize = 1000;

/// The newest `limit` (at most [`PAGE`]) documents of `collection` below id `before` that `keep`
/// takes, oldest first. Only the newest are read: a page of 10,000 jobs parses what it returns and
/// what `keep` refused on the way, not the rest.
fn newest<T: serde::de::DeserializeOwned>(
    store: &dyn crate::store::ControlStore,
    collection: &str,
    before: Option<u64>,
    limit: Option<usize>,
    keep: impl Fn(&T) -> bool,
) -> Result<Vec<T>, crate::store::StoreError> {
    let n = limit.unwrap_or(PAGE).clamp(1, PAGE);
    let mut out = Vec::with_capacity(n);
    for (id, bytes) in store.list_raw(collection)?.iter().rev() {
        if before.is_some_and(|b| !id.parse::<u64>().is_ok_and(|i| i < b)) {
            continue;
        }
        let doc: T = crate::store::parse(collection, id, bytes)?;
        if keep(&doc) {
            out.push(doc);
            if out.len() == n {
                break;
            }
        }
    }
    out.reverse();
    Ok(out)
}

/// Jobs and events kept: at most `keep` of them, none older than `max_age_secs` (an unfinished job is
/// always kept). Returns the ids to delete, given (id, time, finished) in id order.
pub fn to_prune(entries: &[(u64, u64, bool)], now: u64, keep: usize, max_age_secs: u64) -> Vec<u64> {
    let over = entries.len().saturating_sub(keep);
    entries
        .iter()
        .enumerate()
        .filter(|(i, (_, time, finished))| *finished && (*i < over || now.saturating_sub(*time) > max_age_secs))
        .map(|(_, (id, _, _))| *id)
        .collect()
}

pub const KEEP_JOBS: usize = 10_000;
pub const KEEP_EVENTS: usize = 100_000;
pub const MAX_AGE_SECS: u64 = 90 * 24 * 3600;

/// Deletes jobs and events past what is kept (see [`to_prune`]).
pub fn prune(cs: &Cs) -> Result<usize, crate::store::StoreError> {
    let store = cs.store();
    let jobs: Vec<Job> = store.list(JOBS)?;
    // A job's age counts from when it ended.
    let j: Vec<(u64, u64, bool)> =
        jobs.iter().map(|j| (j.id, j.ended.unwrap_or(j.started), j.ended.is_some())).collect();
    let events: Vec<EventRecord> = store.list(EVENTS)?;
    let e: Vec<(u64, u64, bool)> = events.iter().map(|e| (e.id, e.time, true)).collect();
    let mut gone = 0;
    for id in to_prune(&j, now(), KEEP_JOBS, MAX_AGE_SECS) {
        gone += store.delete(JOBS, &id_key(id))? as usize;
    }
    for id in to_prune(&e, now(), KEEP_EVENTS, MAX_AGE_SECS) {
        gone += store.delete(EVENTS, &id_key(id))? as usize;
    }
    Ok(gone)
}

pub async fn list_jobs(
    State(cs): State<Arc<Cs>>,
    h: HeaderMap,
    q: Result<Query<JobFilter>, axum::extract::rejection::QueryRejection>,
) -> R<Vec<Job>> {
    require(cs.store(), &h, ApiRole::Reader)?;
    let Query(f) = q.map_err(|e| ApiError::bad(&format!("invalid filter: {}", e.body_text())))?;
    Ok(Json(newest(cs.store(), JOBS, f.before, f.limit, |j: &Job| {
        f.state.is_none_or(|s| j.state == s)
            && f.kind.as_ref().is_none_or(|k| &j.kind == k)
            && f.target.as_ref().is_none_or(|t| &j.target == t)
    })?))
}

pub async fn get_job(State(cs): State<Arc<Cs>>, h: HeaderMap, Path(id): Path<u64>) -> R<Job> {
    require(cs.store(), &h, ApiRole::Reader)?;
    cs.store().get(JOBS, &id_key(id))?.map(Json).ok_or_else(|| ApiError::not_found(&format!("no job {id}")))
}

#[derive(Deserialize)]
pub struct EventFilter {
    /// Only events with a smaller id (the previous page's first).
    before: Option<u64>,
    /// At most this many, the newest (default and most: [`PAGE`]).
    limit: Option<usize>,
}

pub async fn list_events(
    State(cs): State<Arc<Cs>>,
    h: HeaderMap,
    q: Result<Query<EventFilter>, axum::extract::rejection::QueryRejection>,
) -> R<Vec<EventRecord>> {
    require(cs.store(), &h, ApiRole::Reader)?;
    let Query(f) = q.map_err(|e| ApiError::bad(&format!("invalid filter: {}", e.body_text())))?;
    Ok(Json(newest(cs.store(), EVENTS, f.before, f.limit, |_: &EventRecord| true)?))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pruning_keeps_the_newest_and_every_unfinished_job() {
        let now = 1_000_000;
        // (id, time, finished)
        let e = [(1, 10, true), (2, 20, false), (3, now - 5, true), (4, now - 4, true), (5, now, true)];
        assert_eq!(to_prune(&e, now, 3, 3600), vec![1], "over the count and old; 2 is still running");
        assert_eq!(to_prune(&e, now, 10, 3600), vec![1], "old");
        assert_eq!(to_prune(&e, now, 10, u64::MAX), Vec::<u64>::new());
        assert_eq!(to_prune(&e, now, 1, u64::MAX), vec![1, 3, 4]);
    }

    #[test]
    fn a_page_is_the_newest_that_match_below_before_oldest_first() {
        use crate::store::MemControlStore;
        let store = MemControlStore::default();
        for id in 1..=20u64 {
            store
                .put(
                    EVENTS,
                    &id_key(id),
                    &EventRecord {
                        id,
                        time: id,
                        severity: if id % 2 == 0 { "warning" } else { "info" }.into(),
                        subject: "s".into(),
                        message: "m".into(),
                    },
                )
                .unwrap();
        }
        let ids = |v: Vec<EventRecord>| v.into_iter().map(|e| e.id).collect::<Vec<_>>();
        let all = |_: &EventRecord| true;
        assert_eq!(ids(newest(&store, EVENTS, None, Some(3), all).unwrap()), vec![18, 19, 20]);
        assert_eq!(ids(newest(&store, EVENTS, Some(5), None, all).unwrap()), vec![1, 2, 3, 4]);
        assert_eq!(ids(newest(&store, EVENTS, None, Some(0), all).unwrap()), vec![20], "at least one");
        let warnings = |e: &EventRecord| e.severity == "warning";
        assert_eq!(ids(newest(&store, EVENTS, Some(15), Some(2), warnings).unwrap()), vec![12, 14]);
        assert_eq!(ids(newest(&store, EVENTS, None, Some(PAGE + 5), all).unwrap()).len(), 20);
    }
}
