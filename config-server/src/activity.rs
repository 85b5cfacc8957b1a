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
}

pub async fn list_jobs(
    State(cs): State<Arc<Cs>>,
    h: HeaderMap,
    q: Result<Query<JobFilter>, axum::extract::rejection::QueryRejection>,
) -> R<Vec<Job>> {
    require(cs.store(), &h, ApiRole::Reader)?;
    let Query(f) = q.map_err(|e| ApiError::bad(&format!("invalid filter: {}", e.body_text())))?;
    let jobs = cs.store().list::<Job>(JOBS)?;
    Ok(Json(
        jobs.into_iter()
            .filter(|j| f.state.is_none_or(|s| j.state == s))
            .filter(|j| f.kind.as_ref().is_none_or(|k| &j.kind == k))
            .filter(|j| f.target.as_ref().is_none_or(|t| &j.target == t))
            .collect(),
    ))
}

pub async fn get_job(State(cs): State<Arc<Cs>>, h: HeaderMap, Path(id): Path<u64>) -> R<Job> {
    require(cs.store(), &h, ApiRole::Reader)?;
    cs.store().get(JOBS, &id_key(id))?.map(Json).ok_or_else(|| ApiError::not_found(&format!("no job {id}")))
}

pub async fn list_events(State(cs): State<Arc<Cs>>, h: HeaderMap) -> R<Vec<EventRecord>> {
    require(cs.store(), &h, ApiRole::Reader)?;
    Ok(Json(cs.store().list(EVENTS)?))
}
