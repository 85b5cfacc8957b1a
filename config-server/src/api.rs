//! The REST API. Every body is JSON; every error is `{"error": "..."}` with 400 (bad request), 401
//! (no or unknown token), 403 (wrong role), 404, 409 (conflict) or 500.

use crate::auth::{self, require, require_component, COMPONENT_TOKENS};
use crate::jobs::JobHandle;
use crate::model::*;
use crate::store::{Docs, StoreError};
use crate::Cs;
use axum::extract::rejection::JsonRejection;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::Deserialize;
use serde_json::{json, Value};
use std::sync::Arc;

#[derive(Debug)]
pub struct ApiError {
    pub status: StatusCode,
    pub message: String,
}

impl ApiError {
    pub fn new(status: StatusCode, message: &str) -> ApiError {
        ApiError { status, message: message.to_string() }
    }
    pub fn bad(message: &str) -> ApiError {
        ApiError::new(StatusCode::BAD_REQUEST, message)
    }
    pub fn not_found(message: &str) -> ApiError {
        ApiError::new(StatusCode::NOT_FOUND, message)
    }
    pub fn conflict(message: &str) -> ApiError {
        ApiError::new(StatusCode::CONFLICT, message)
    }
}

impl From<StoreError> for ApiError {
    fn from(e: StoreError) -> ApiError {
        tracing::error!(error = %e, "state store failed");
        ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, &e.to_string())
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (self.status, Json(json!({ "error": self.message }))).into_response()
    }
}

pub type R<T> = Result<Json<T>, ApiError>;
pub type Body<T> = Result<Json<T>, JsonRejection>;

pub fn body<T>(b: Body<T>) -> Result<T, ApiError> {
    b.map(|Json(v)| v).map_err(|e| ApiError::bad(&format!("invalid request body: {}", e.body_text())))
}

pub fn routes(cs: Arc<Cs>) -> Router {
    Router::new()
        .route("/openapi.json", get(openapi))
        .route("/v1/tokens", post(create_token))
        .route("/v1/registration-keys", post(create_key))
        .route("/v1/register", post(register))
        .route("/v1/crl", get(crl))
        .route("/v1/components", get(list_components))
        .route("/v1/components/{name}/revoke", post(revoke))
        .route("/v1/heartbeat", post(heartbeat))
        .route("/v1/machines", get(list_machines))
        .route("/v1/policies", get(list_policies).post(create_policy))
        .route("/v1/policies/{id}", get(get_policy).put(put_policy).delete(delete_policy))
        .route("/v1/items", get(crate::items::list).post(crate::items::enable))
        .route("/v1/items/{id}", get(crate::items::get).delete(crate::items::disable))
        .route("/v1/items/{id}/resync", post(crate::items::resync))
        .route("/v1/items/{id}/points", get(crate::recovery::points))
        .route("/v1/items/{id}/test-failover", post(crate::recovery::test_failover))
        .route("/v1/items/{id}/test-failover/cleanup", post(crate::recovery::test_failover_cleanup))
        .route("/v1/items/{id}/export", post(crate::recovery::export))
        .route("/v1/items/{id}/failover", post(crate::failover::failover))
        .route("/v1/items/{id}/failover/point", post(crate::failover::change_point))
        .route("/v1/items/{id}/commit", post(crate::failover::commit))
        .route("/v1/items/{id}/reprotect", post(crate::failover::reprotect))
        .route("/v1/items/{id}/failback", post(crate::failover::failback))
        .route("/v1/plans", get(crate::plans::list).post(crate::plans::create))
        .route("/v1/plans/{id}", get(crate::plans::get).delete(crate::plans::delete))
        .route("/v1/plans/{id}/failover", post(crate::plans::run))
        .route("/v1/plans/{id}/resume", post(crate::plans::resume))
        .route("/v1/plans/{id}/consistency-point", post(crate::plans::consistency_point))
        .route("/v1/network-mappings", get(crate::netmap::list).post(crate::netmap::create))
        .route("/v1/network-mappings/{id}", axum::routing::delete(crate::netmap::delete))
        .route("/v1/assignments", get(crate::items::assignments))
        .route("/v1/jobs", get(list_jobs))
        .route("/v1/jobs/{id}", get(get_job))
        .route("/v1/events", get(list_events))
        .with_state(cs)
}

async fn openapi() -> Json<Value> {
    Json(crate::openapi::document())
}

fn valid_name(name: &str) -> Result<(), ApiError> {
    if name.is_empty() || name.len() > 64 || !name.chars().all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_') {
        return Err(ApiError::bad("name: 1 to 64 letters, digits, '-' or '_'"));
    }
    Ok(())
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct NewToken {
    name: String,
    role: ApiRole,
}

async fn create_token(State(cs): State<Arc<Cs>>, h: HeaderMap, b: Body<NewToken>) -> R<Value> {
    let by = require(cs.store(), &h, ApiRole::Admin)?;
    let req = body(b)?;
    valid_name(&req.name)?;
    let secret = auth::secret();
    let t =
        Token { id: auth::hash(&secret)[..12].to_string(), name: req.name, role: req.role, hash: auth::hash(&secret) };
    cs.store().put(TOKENS, &t.hash, &t)?;
    cs.event("info", &t.name, &format!("API token {} ({:?}) created by {by}", t.name, t.role))?;
    Ok(Json(json!({ "id": t.id, "name": t.name, "role": t.role, "token": secret })))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct NewKey {
    role: ComponentRole,
    #[serde(default)]
    ttl_seconds: Option<u64>,
}

async fn create_key(State(cs): State<Arc<Cs>>, h: HeaderMap, b: Body<NewKey>) -> R<Value> {
    let by = require(cs.store(), &h, ApiRole::Admin)?;
    let req = body(b)?;
    let ttl = req.ttl_seconds.unwrap_or(cs.cfg.registration_key_ttl_secs);
    if ttl == 0 || ttl > 30 * 24 * 3600 {
        return Err(ApiError::bad("ttl_seconds: 1 to 2592000 (30 days)"));
    }
    let secret = auth::secret();
    let k = RegistrationKey {
        id: auth::hash(&secret)[..12].to_string(),
        hash: auth::hash(&secret),
        role: req.role,
        expires_at: now() + ttl,
        used_by: None,
    };
    cs.store().put(KEYS, &k.hash, &k)?;
    cs.event("info", &k.id, &format!("registration key {} for a {:?} created by {by}", k.id, k.role))?;
    Ok(Json(json!({ "id": k.id, "key": secret, "role": k.role, "expires_at": k.expires_at })))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Registration {
    key: String,
    name: String,
    csr_pem: String,
    #[serde(default)]
    address: Option<String>,
    /// The role the registering component has; a key for another role is refused and not used up.
    #[serde(default)]
    role: Option<ComponentRole>,
}

/// Trades a one-time registration key and a CSR for a certificate naming the key's role.
async fn register(State(cs): State<Arc<Cs>>, b: Body<Registration>) -> R<Value> {
    let req = body(b)?;
    valid_name(&req.name)?;
    let store = cs.store();
    let mut job = JobHandle::start(
        store,
        "register",
        &req.name,
        &["check the registration key", "issue a certificate", "record the component"],
    )?;
    job.step(0)?;
    let key_hash = auth::hash(req.key.trim());
    let refuse = |job: JobHandle, status: StatusCode, msg: String| -> Result<Json<Value>, ApiError> {
        job.fail(&msg)?;
        Err(ApiError::new(status, &msg))
    };
    let _guard = cs.registration.lock().await;
    let Some(mut key) = store.get::<RegistrationKey>(KEYS, &key_hash)? else {
        return refuse(job, StatusCode::UNAUTHORIZED, "unknown registration key".into());
    };
    if let Some(by) = &key.used_by {
        return refuse(job, StatusCode::UNAUTHORIZED, format!("registration key {} was already used by {by}", key.id));
    }
    if let Some(role) = req.role.filter(|r| *r != key.role) {
        let msg = format!("registration key {} is for a {:?}, but this component is a {role:?}", key.id, key.role);
        return refuse(job, StatusCode::BAD_REQUEST, msg);
    }
    if now() > key.expires_at {
        return refuse(
            job,
            StatusCode::UNAUTHORIZED,
            format!("registration key {} expired; ask an admin for a new one", key.id),
        );
    }
    if let Some(c) = store.get::<Component>(COMPONENTS, &req.name)? {
        if !c.revoked {
            return refuse(job, StatusCode::CONFLICT, format!("a component named {} is already registered", req.name));
        }
    }
    job.step_done(0)?;
    job.step(1)?;
    let serial = store.next_id("certificate_serials")? + 1000;
    let cert = match cs.ca.sign_csr(&req.csr_pem, &req.name, key.role.wire(), serial) {
        Ok(c) => c,
        Err(e) => return refuse(job, StatusCode::BAD_REQUEST, format!("csr_pem: {e:#}")),
    };
    job.step_done(1)?;
    job.step(2)?;
    let token = auth::secret();
    let c = Component {
        name: req.name.clone(),
        role: key.role,
        serial,
        registered_at: now(),
        last_heartbeat: None,
        address: req.address,
        http: None,
        revoked: false,
        token_hash: auth::hash(&token),
        load: Load::default(),
    };
    key.used_by = Some(req.name.clone());
    store.put(KEYS, &key.hash, &key)?;
    store.put(COMPONENTS, &c.name, &c)?;
    store.put(COMPONENT_TOKENS, &c.token_hash, &c.name)?;
    job.step_done(2)?;
    let job = job.succeed()?;
    cs.event("info", &c.name, &format!("{} registered as {:?} (certificate serial {serial})", c.name, c.role))?;
    Ok(Json(json!({ "certificate_pem": cert, "ca_pem": cs.ca.cert_pem(), "token": token, "job": job.id })))
}

/// The CRL is made once per revocation and kept, so it stays byte-for-byte the same between changes
/// (components compare it to decide whether to re-check their peers).
async fn crl(State(cs): State<Arc<Cs>>) -> Result<String, ApiError> {
    let store = cs.store();
    let number = store.get::<u64>("meta", "crl_number")?.unwrap_or(1);
    if let Some((n, pem)) = store.get::<(u64, String)>("meta", "crl")? {
        if n == number {
            return Ok(pem);
        }
    }
    let revoked: Vec<u64> =
        store.list::<Component>(COMPONENTS)?.iter().filter(|c| c.revoked).map(|c| c.serial).collect();
    let pem = cs
        .ca
        .crl_pem(&revoked, number)
        .map_err(|e| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, &format!("{e:#}")))?;
    store.put("meta", "crl", &(number, pem.clone()))?;
    Ok(pem)
}

fn public(c: &Component, timeout: u64) -> Value {
    let health = match c.last_heartbeat {
        _ if c.revoked => "revoked",
        None => "never reported",
        Some(t) if now().saturating_sub(t) <= timeout => "healthy",
        Some(_) => "unreachable",
    };
    json!({
        "name": c.name, "role": c.role, "serial": c.serial, "registered_at": c.registered_at,
        "last_heartbeat": c.last_heartbeat, "health": health, "address": c.address, "revoked": c.revoked,
        "load": c.load,
    })
}

async fn list_components(State(cs): State<Arc<Cs>>, h: HeaderMap) -> R<Value> {
    require(cs.store(), &h, ApiRole::Reader)?;
    let t = cs.cfg.component_timeout_secs;
    let v: Vec<Value> = cs.store().list::<Component>(COMPONENTS)?.iter().map(|c| public(c, t)).collect();
    Ok(Json(Value::Array(v)))
}

async fn revoke(State(cs): State<Arc<Cs>>, h: HeaderMap, Path(name): Path<String>) -> R<Value> {
    let by = require(cs.store(), &h, ApiRole::Admin)?;
    let store = cs.store();
    let Some(mut c) = store.get::<Component>(COMPONENTS, &name)? else {
        return Err(ApiError::not_found(&format!("no component named {name}")));
    };
    c.revoked = true;
    store.put(COMPONENTS, &name, &c)?;
    store.delete(COMPONENT_TOKENS, &c.token_hash)?;
    let number = store.get::<u64>("meta", "crl_number")?.unwrap_or(1) + 1;
    store.put("meta", "crl_number", &number)?;
    cs.event("warning", &name, &format!("certificate of {name} (serial {}) revoked by {by}", c.serial))?;
    Ok(Json(public(&c, cs.cfg.component_timeout_secs)))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Heartbeat {
    #[serde(default)]
    address: Option<String>,
    #[serde(default)]
    disks: Option<Vec<DiskInfo>>,
    #[serde(default)]
    progress: Option<Vec<DiskProgress>>,
    #[serde(default)]
    applied: Option<Vec<AppliedSeq>>,
    #[serde(default)]
    load: Option<Load>,
    /// The component's HTTP address (a master target's recovery points and views are there).
    #[serde(default)]
    http: Option<String>,
    #[serde(default)]
    system: Option<SystemInfo>,
    /// What the component has to tell operators (a failed hook, ...).
    #[serde(default)]
    events: Vec<ComponentEvent>,
    /// A master target's replicas that cannot take their streams.
    #[serde(default)]
    faults: Option<Vec<ReplicaFault>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ComponentEvent {
    severity: String,
    message: String,
}

async fn heartbeat(State(cs): State<Arc<Cs>>, h: HeaderMap, b: Body<Heartbeat>) -> R<Value> {
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
    Ok(Json(json!({ "ok": true })))
}

async fn list_machines(State(cs): State<Arc<Cs>>, h: HeaderMap) -> R<Value> {
    require(cs.store(), &h, ApiRole::Reader)?;
    Ok(Json(serde_json::to_value(cs.store().list::<Machine>(MACHINES)?).unwrap_or_default()))
}

async fn list_policies(State(cs): State<Arc<Cs>>, h: HeaderMap) -> R<Vec<Policy>> {
    require(cs.store(), &h, ApiRole::Reader)?;
    Ok(Json(cs.store().list(POLICIES)?))
}

async fn create_policy(State(cs): State<Arc<Cs>>, h: HeaderMap, b: Body<Policy>) -> R<Policy> {
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

async fn get_policy(State(cs): State<Arc<Cs>>, h: HeaderMap, Path(id): Path<String>) -> R<Policy> {
    require(cs.store(), &h, ApiRole::Reader)?;
    cs.store().get(POLICIES, &id)?.map(Json).ok_or_else(|| ApiError::not_found(&format!("no policy {id}")))
}

async fn put_policy(State(cs): State<Arc<Cs>>, h: HeaderMap, Path(id): Path<String>, b: Body<Policy>) -> R<Policy> {
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

async fn delete_policy(State(cs): State<Arc<Cs>>, h: HeaderMap, Path(id): Path<String>) -> R<Value> {
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

#[derive(Deserialize)]
struct JobFilter {
    state: Option<JobState>,
    kind: Option<String>,
    target: Option<String>,
}

async fn list_jobs(
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

async fn get_job(State(cs): State<Arc<Cs>>, h: HeaderMap, Path(id): Path<u64>) -> R<Job> {
    require(cs.store(), &h, ApiRole::Reader)?;
    cs.store().get(JOBS, &id_key(id))?.map(Json).ok_or_else(|| ApiError::not_found(&format!("no job {id}")))
}

async fn list_events(State(cs): State<Arc<Cs>>, h: HeaderMap) -> R<Vec<EventRecord>> {
    require(cs.store(), &h, ApiRole::Reader)?;
    Ok(Json(cs.store().list(EVENTS)?))
}
