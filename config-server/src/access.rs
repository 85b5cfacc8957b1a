//! Who may talk to the server: API tokens, one-time registration keys, component registration (which
//! signs the component's certificate), the revocation list, and the components themselves.

use crate::auth::{self, require};
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
    if req.role == ComponentRole::NbdClient {
        return Err(ApiError::bad("role: NBD clients get their certificates from POST /v1/nbd-clients"));
    }
    let ttl = req.ttl_seconds.unwrap_or(cs.cfg.registration_key_ttl_secs);
    if ttl == 0 || ttl > 30 * 24 * 3600 {
        return Err(ApiError::bad("ttl_seconds: 1 to 2592000 (30 days)"));
    }
    let secret = auth::secret();
    let k = RegistrationKey::new(&secret, req.role, now() + ttl);
    cs.store().put(KEYS, &k.hash, &k)?;
    cs.event("info", &k.id, &format!("registration key {} for a {:?} created by {by}", k.id, k.role))?;
    let fingerprint = cs.ca_fingerprint();
    Ok(Json(json!({
        "id": k.id,
        "key": sr_common::register::RegistrationKey::compose(&secret, &fingerprint),
        "ca_fingerprint": fingerprint,
        "role": k.role,
        "expires_at": k.expires_at,
    })))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CaRequest {
    key_id: String,
}

/// The CA, for a component whose registration key has no fingerprint, with the proof that this
/// server holds the key (see `sr_common::register`). Only an unused, unexpired key answers.
pub async fn register_ca(State(cs): State<Arc<Cs>>, b: Body<CaRequest>) -> R<Value> {
    let req = body(b)?;
    let refused = || {
        ::metrics::counter!(crate::metrics::REGISTRATIONS_REFUSED).increment(1);
        Err(ApiError::new(StatusCode::UNAUTHORIZED, "unknown, used or expired registration key"))
    };
    if req.key_id.len() != 12 || !req.key_id.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(ApiError::bad("key_id: the 12 hex digits of a registration key's id"));
    }
    let t = now();
    let find = |keys: &[RegistrationKey]| {
        keys.iter().find(|k| k.id == req.key_id && k.used_by.is_none() && t <= k.expires_at).cloned()
    };
    let mut key = find(&cs.store().list::<RegistrationKey>(KEYS)?);
    if key.is_none() {
        reread_keys(&cs);
        key = find(&cs.store().list::<RegistrationKey>(KEYS)?);
    }
    let Some(key) = key else { return refused() };
    let fingerprint = cs.ca_fingerprint();
    Ok(Json(json!({
        "ca_pem": cs.ca.cert_pem(),
        "proof": sr_common::register::ca_proof(&key.hash, &fingerprint),
    })))
}

/// Reads `registration_keys_dir` again (a key added since the start, a Secret grown for more
/// replicas); a failure is logged, the registration then refused as for any unknown key.
fn reread_keys(cs: &Cs) {
    if let Some(dir) = &cs.cfg.registration_keys_dir {
        if let Err(e) = import_keys(cs, dir) {
            tracing::warn!(dir = %dir.display(), error = format!("{e:#}"), "reading registration keys failed");
        }
    }
}

/// Registration keys from files (a Kubernetes Secret mounted as a directory): each file named
/// `ROLE-ANYTHING` (`process-server-0`, `master-target-1`, `agent-web`) holds one secret. Names that
/// start with `.` are skipped (a mounted Secret's own entries). Pure: names and contents in, keys out.
pub fn keys_from_files(files: &[(String, String)]) -> Result<Vec<(ComponentRole, String)>, String> {
    let mut out = Vec::new();
    for (name, content) in files.iter().filter(|(n, _)| !n.starts_with('.')) {
        let role = [
            ("process-server-", ComponentRole::ProcessServer),
            ("master-target-", ComponentRole::MasterTarget),
            ("agent-", ComponentRole::Agent),
        ]
        .iter()
        .find(|(prefix, _)| name.starts_with(prefix))
        .map(|(_, r)| *r)
        .ok_or_else(|| {
            format!("registration key file {name}: its name must start with process-server-, master-target- or agent-")
        })?;
        // A key `srctl keys create` printed (SECRET.FINGERPRINT) counts by its secret.
        let secret = content.trim().split_once('.').map_or(content.trim(), |(s, _)| s);
        if !sr_common::register::strong_secret(secret) {
            return Err(format!("registration key file {name}: not a secret of at least 32 letters and digits"));
        }
        out.push((role, secret.to_string()));
    }
    Ok(out)
}

/// Adds the keys of `dir` that the store has never seen (a used key stays used; a deleted file's key
/// stays valid until used or revoked by an admin). Returns how many were added.
pub fn import_keys(cs: &Cs, dir: &std::path::Path) -> anyhow::Result<usize> {
    use anyhow::Context;
    let mut files = Vec::new();
    for e in std::fs::read_dir(dir).with_context(|| format!("registration_keys_dir {}", dir.display()))? {
        let e = e?;
        let name = e.file_name().to_string_lossy().to_string();
        if name.starts_with('.') || !e.path().is_file() {
            continue;
        }
        let text = std::fs::read_to_string(e.path()).with_context(|| format!("reading {}", e.path().display()))?;
        files.push((name, text));
    }
    let keys = keys_from_files(&files).map_err(|m| anyhow::anyhow!("registration_keys_dir {}: {m}", dir.display()))?;
    let mut added = 0;
    for (role, secret) in keys {
        // Valid as long as the file's owner keeps it (ten years): the Secret is the authority.
        let k = RegistrationKey::new(&secret, role, now() + 10 * 365 * 24 * 3600);
        if cs.store().get::<RegistrationKey>(KEYS, &k.hash)?.is_some() {
            continue;
        }
        cs.store().put(KEYS, &k.hash, &k)?;
        cs.event(
            "info",
            &k.id,
            &format!("registration key {} for a {:?} imported from {}", k.id, k.role, dir.display()),
        )?;
        added += 1;
    }
    Ok(added)
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
    /// Host names and IP addresses its certificate names besides its address's host.
    #[serde(default)]
    names: Vec<String>,
}

/// Trades a one-time registration key and a CSR for a certificate naming the key's role. The key
/// is checked before anything is written: an unknown, used, expired or other-role key leaves no
/// trace but the refusal (and a counter).
pub async fn register(State(cs): State<Arc<Cs>>, b: Body<Registration>) -> R<Value> {
    let req = body(b)?;
    valid_name(&req.name)?;
    if let Some(n) = req.names.iter().find(|n| !sr_common::ca::valid_host_name(n)) {
        return Err(ApiError::bad(&format!("names: {n:?} is neither a host name nor an IP address")));
    }
    let store = cs.store();
    // The secret alone; a component may send the whole SECRET.FINGERPRINT it was given.
    let secret = req.key.trim().split_once('.').map_or(req.key.trim(), |(s, _)| s);
    let key_hash = auth::hash(secret);
    let _guard = cs.registration.lock().await;
    let refused = |status: StatusCode, msg: String| {
        ::metrics::counter!(crate::metrics::REGISTRATIONS_REFUSED).increment(1);
        tracing::warn!(name = req.name, "registration refused: {msg}");
        Err(ApiError::new(status, &msg))
    };
    if store.get::<RegistrationKey>(KEYS, &key_hash)?.is_none() {
        reread_keys(&cs);
    }
    let Some(mut key) = store.get::<RegistrationKey>(KEYS, &key_hash)? else {
        return refused(StatusCode::UNAUTHORIZED, "unknown registration key".into());
    };
    if let Some(by) = &key.used_by {
        return refused(StatusCode::UNAUTHORIZED, format!("registration key {} was already used by {by}", key.id));
    }
    if now() > key.expires_at {
        return refused(
            StatusCode::UNAUTHORIZED,
            format!("registration key {} expired; ask an admin for a new one", key.id),
        );
    }
    if let Some(role) = req.role.filter(|r| *r != key.role) {
        let msg = format!("registration key {} is for a {:?}, but this component is a {role:?}", key.id, key.role);
        return refused(StatusCode::BAD_REQUEST, msg);
    }
    if let Some(c) = store.get::<Component>(COMPONENTS, &req.name)? {
        if !c.revoked {
            return refused(StatusCode::CONFLICT, format!("a component named {} is already registered", req.name));
        }
    }
    let mut job = JobHandle::start(
        store,
        "register",
        &req.name,
        &["check the registration key", "issue a certificate", "record the component"],
    )?;
    job.step(0)?;
    job.step_done(0)?;
    job.step(1)?;
    let serial = store.next_id("certificate_serials")? + 1000;
    let mut names: Vec<String> = req.address.as_deref().map(sr_common::ca::names_of_address).unwrap_or_default();
    names.extend(req.names.iter().cloned());
    names.dedup();
    let cert = match cs.ca.sign_csr(&req.csr_pem, &req.name, key.role.wire(), serial, &names) {
        Ok(c) => c,
        Err(e) => {
            let msg = format!("csr_pem: {e:#}");
            job.fail(&msg)?;
            return Err(ApiError::new(StatusCode::BAD_REQUEST, &msg));
        }
    };
    job.step_done(1)?;
    job.step(2)?;
    let c = Component {
        name: req.name.clone(),
        role: key.role,
        serial,
        registered_at: now(),
        last_heartbeat: None,
        address: req.address,
        http: None,
        revoked: false,
        load: Load::default(),
        draining: false,
    };
    key.used_by = Some(req.name.clone());
    store.put(KEYS, &key.hash, &key)?;
    store.put(COMPONENTS, &c.name, &c)?;
    job.step_done(2)?;
    let job = job.succeed()?;
    ::metrics::counter!(crate::metrics::REGISTRATIONS, "role" => c.role.wire().name()).increment(1);
    cs.event("info", &c.name, &format!("{} registered as {:?} (certificate serial {serial})", c.name, c.role))?;
    Ok(Json(json!({ "certificate_pem": cert, "ca_pem": cs.ca.cert_pem(), "job": job.id })))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NewNbdClient {
    name: String,
    csr_pem: String,
}

/// Issues a certificate in the NBD-client role for the key in a CSR: what a hypervisor or an
/// operator's tools open the master targets' NBD exports (failover disks) with. It is recorded as a
/// component, so it can be listed and revoked.
pub async fn create_nbd_client(State(cs): State<Arc<Cs>>, h: HeaderMap, b: Body<NewNbdClient>) -> R<Value> {
    let by = require(cs.store(), &h, ApiRole::Admin)?;
    let req = body(b)?;
    valid_name(&req.name)?;
    let store = cs.store();
    let _guard = cs.registration.lock().await;
    if store.get::<Component>(COMPONENTS, &req.name)?.is_some_and(|c| !c.revoked) {
        return Err(ApiError::conflict(&format!("a component named {} is already registered", req.name)));
    }
    let serial = store.next_id("certificate_serials")? + 1000;
    let cert = cs
        .ca
        .sign_csr(&req.csr_pem, &req.name, sr_common::wire::Role::NbdClient, serial, &[])
        .map_err(|e| ApiError::bad(&format!("csr_pem: {e:#}")))?;
    let c = Component {
        name: req.name.clone(),
        role: ComponentRole::NbdClient,
        serial,
        registered_at: now(),
        last_heartbeat: None,
        address: None,
        http: None,
        revoked: false,
        load: Load::default(),
        draining: false,
    };
    store.put(COMPONENTS, &c.name, &c)?;
    cs.event("info", &c.name, &format!("NBD client certificate for {} issued by {by} (serial {serial})", c.name))?;
    Ok(Json(json!({ "name": c.name, "serial": serial, "certificate_pem": cert, "ca_pem": cs.ca.cert_pem() })))
}

/// Serial numbers of every certificate ever revoked (the revocation list is made from these).
pub const REVOKED_SERIALS: &str = "revoked_serials";

/// The CRL is made once per revocation and kept, so it stays byte-for-byte the same between changes
/// (components compare it to decide whether to re-check their peers).
pub async fn crl(State(cs): State<Arc<Cs>>) -> Result<String, ApiError> {
    current_crl(&cs)
}

/// The revocation list in force (made and kept when the number changed).
pub fn current_crl(cs: &Cs) -> Result<String, ApiError> {
    let store = cs.store();
    let number = store.get::<u64>("meta", "crl_number")?.unwrap_or(1);
    if let Some((n, pem)) = store.get::<(u64, String)>("meta", "crl")? {
        if n == number {
            return Ok(pem);
        }
    }
    let mut revoked: Vec<u64> = store.list::<u64>(REVOKED_SERIALS)?;
    revoked.extend(store.list::<Component>(COMPONENTS)?.iter().filter(|c| c.revoked).map(|c| c.serial));
    revoked.sort_unstable();
    revoked.dedup();
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
        "load": c.load, "draining": c.draining,
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
    // Kept apart from the component record, which a new registration under the same name replaces:
    // a revoked serial stays on the list for good.
    store.put(REVOKED_SERIALS, &format!("{:020}", c.serial), &c.serial)?;
    let number = store.get::<u64>("meta", "crl_number")?.unwrap_or(1) + 1;
    store.put("meta", "crl_number", &number)?;
    // This server's own TLS checks (its API, its calls to components) use the new list at once.
    let pem = current_crl(&cs)?;
    cs.identity.set_crl_pem(&pem).map_err(|e| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, &e.to_string()))?;
    cs.event("warning", &name, &format!("certificate of {name} (serial {}) revoked by {by}", c.serial))?;
    Ok(Json(public(&c, cs.cfg.component_timeout_secs)))
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn key_files_name_their_role_and_hold_strong_secrets() {
        let f = |n: &str, c: &str| (n.to_string(), c.to_string());
        let s = "a".repeat(32);
        let keys = keys_from_files(&[
            f("process-server-0", &format!("{s}\n")),
            f("master-target-1", &s),
            f("agent-web", &format!("{s}.{}", "0f".repeat(32))),
            f("..data", "whatever"),
        ])
        .unwrap();
        let roles: Vec<ComponentRole> = keys.iter().map(|k| k.0).collect();
        assert_eq!(roles, vec![ComponentRole::ProcessServer, ComponentRole::MasterTarget, ComponentRole::Agent]);
        assert!(keys.iter().all(|k| k.1 == s), "trimmed");
        let e = keys_from_files(&[f("config-server-0", &s)]).unwrap_err();
        assert!(e.contains("config-server-0") && e.contains("process-server-"), "{e}");
        let e = keys_from_files(&[f("process-server-0", "short")]).unwrap_err();
        assert!(e.contains("process-server-0") && e.contains("32"), "{e}");
    }
}
