//! Replication policies: RPO threshold, retention, consistency intervals, journal limit, compression,
//! bandwidth and resync window.

use crate::auth::require;
use crate::error::{body, ApiError, Body, R};
use crate::model::*;
use crate::store::Docs;
use crate::Cs;
use axum::extract::{Path, State};
use axum::http::HeaderMap;
use axum::Json;
use serde_json::{json, Value};
use std::sync::Arc;

pub async fn list_policies(State(cs): State<Arc<Cs>>, h: HeaderMap) -> R<Vec<Policy>> {
    require(cs.store(), &h, ApiRole::Reader)?;
    Ok(Json(cs.store().list(POLICIES)?))
}

pub async fn create_policy(State(cs): State<Arc<Cs>>, h: HeaderMap, b: Body<Policy>) -> R<Policy> {
    let by = require(cs.store(), &h, ApiRole::Operator)?;
    let mut p = body(b)?;
    p.validate().map_err(|e| ApiError::bad(&e))?;
    if cs.store().list::<Policy>(POLICIES)?.iter().any(|o| o.name == p.name) {
        return Err(ApiError::conflict(&format!("a policy named {} exists", p.name)));
    }
    p.id = id_key(cs.store().next_id(POLICIES)?);
    cs.store().put(POLICIES, &p.id, &p)?;
    cs.event("info", &p.name, &format!("policy {} created by {by}", p.name))?;
    Ok(Json(p))
}

pub async fn get_policy(State(cs): State<Arc<Cs>>, h: HeaderMap, Path(id): Path<String>) -> R<Policy> {
    require(cs.store(), &h, ApiRole::Reader)?;
    cs.store().get(POLICIES, &id)?.map(Json).ok_or_else(|| ApiError::not_found(&format!("no policy {id}")))
}

pub async fn put_policy(State(cs): State<Arc<Cs>>, h: HeaderMap, Path(id): Path<String>, b: Body<Policy>) -> R<Policy> {
    let by = require(cs.store(), &h, ApiRole::Operator)?;
    let mut p = body(b)?;
    p.validate().map_err(|e| ApiError::bad(&e))?;
    if cs.store().get::<Policy>(POLICIES, &id)?.is_none() {
        return Err(ApiError::not_found(&format!("no policy {id}")));
    }
    p.id = id.clone();
    cs.store().put(POLICIES, &id, &p)?;
    cs.event("info", &p.name, &format!("policy {} changed by {by}", p.name))?;
    Ok(Json(p))
}

pub async fn delete_policy(State(cs): State<Arc<Cs>>, h: HeaderMap, Path(id): Path<String>) -> R<Value> {
    let by = require(cs.store(), &h, ApiRole::Operator)?;
    if cs.store().list::<Item>(ITEMS)?.iter().any(|i| i.policy == id) {
        return Err(ApiError::conflict(&format!("policy {id} is used by protected items; change them first")));
    }
    if !cs.store().delete(POLICIES, &id)? {
        return Err(ApiError::not_found(&format!("no policy {id}")));
    }
    cs.event("info", &id, &format!("policy {id} deleted by {by}"))?;
    Ok(Json(json!({ "deleted": id })))
}
