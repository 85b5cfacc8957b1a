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

/// The last `limit` (at most [`PAGE`]) of `items` (in id order), oldest first.
fn page<T>(items: Vec<T>, limit: Option<usize>) -> Vec<T> {
    let n = limit.unwrap_or(PAGE).clamp(1, PAGE);
    let skip = items.len().saturating_sub(n);
    items.into_iter().skip(skip).collect()
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
    let jobs = cs.store().list::<Job>(JOBS)?;
    let matching = jobs
        .into_iter()
        .filter(|j| f.state.is_none_or(|s| j.state == s))
        .filter(|j| f.kind.as_ref().is_none_or(|k| &j.kind == k))
        .filter(|j| f.target.as_ref().is_none_or(|t| &j.target == t))
        .filter(|j| f.before.is_none_or(|b| j.id < b))
        .collect();
    Ok(Json(page(matching, f.limit)))
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
    let events: Vec<EventRecord> = cs.store().list(EVENTS)?;
    let matching = events.into_iter().filter(|e| f.before.is_none_or(|b| e.id < b)).collect();
    Ok(Json(page(matching, f.limit)))
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
        assert_eq!(page(vec![1, 2, 3, 4], Some(2)), vec![3, 4]);
        assert_eq!(page(vec![1, 2], Some(0)), vec![2], "at least one");
    }
}
