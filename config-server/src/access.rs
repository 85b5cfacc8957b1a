//! Who may talk to the server: API tokens, one-time registration keys, component registration (which
//! signs the component's certificate), the revocation list, and the components themselves.

use crate::auth::{self, require, COMPONENT_TOKENS};
use crate::error::{body, valid_name, ApiError, Body, R};
use crate::jobs::JobHandle;
use crate::model::*;
use crate::store::Docs;
use crate::Cs;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::Json;
use serde::Deserialize;
use serde_json::{json, Value};
use std::sync::Arc;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NewToken {
    name: String,
    role: ApiRole,
}

pub async fn create_token(State(cs): State<Arc<Cs>>, h: HeaderMap, b: Body<NewToken>) -> R<Value> {
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
pub struct NewKey {
    role: ComponentRole,
    #[serde(default)]
    ttl_seconds: Option<u64>,
}

pub async fn create_key(State(cs): State<Arc<Cs>>, h: HeaderMap, b: Body<NewKey>) -> R<Value> {
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
pub struct Registration {
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
pub async fn register(State(cs): State<Arc<Cs>>, b: Body<Registration>) -> R<Value> {
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
pub async fn crl(State(cs): State<Arc<Cs>>) -> Result<String, ApiError> {
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

pub async fn list_components(State(cs): State<Arc<Cs>>, h: HeaderMap) -> R<Value> {
    require(cs.store(), &h, ApiRole::Reader)?;
    let t = cs.cfg.component_timeout_secs;
    let v: Vec<Value> = cs.store().list::<Component>(COMPONENTS)?.iter().map(|c| public(c, t)).collect();
    Ok(Json(Value::Array(v)))
}

pub async fn revoke(State(cs): State<Arc<Cs>>, h: HeaderMap, Path(name): Path<String>) -> R<Value> {
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
