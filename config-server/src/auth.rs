//! Who is calling: an operator's API token (reader, operator or admin) or a registered component, by
//! the client certificate it presented (which the HTTPS server verified against the deployment CA
//! and the revocation list, and passes in [`PEER_HEADER`]). A missing or unknown credential is 401; a
//! known one without the needed role is 403.

use crate::error::ApiError;
use crate::model::{ApiRole, Component, ComponentRole, Token, COMPONENTS, TOKENS};
use crate::store::{ControlStore, Docs};
use axum::http::{HeaderMap, StatusCode};

use sr_common::tls::{Peer, PEER_HEADER};

#[derive(Debug, Clone)]
pub enum Caller {
    Operator { name: String, role: ApiRole },
    Component { name: String, role: ComponentRole },
}

/// SHA-256 of a secret, hex: what the store keeps instead of the secret.
pub fn hash(secret: &str) -> String {
    sr_common::register::secret_hash(secret)
}

/// A new random secret, hex.
pub fn secret() -> String {
    hex::encode(rand::random::<[u8; 32]>())
}

pub fn caller(store: &dyn ControlStore, headers: &HeaderMap) -> Result<Caller, ApiError> {
    let unauthorized = |m: &str| ApiError::new(StatusCode::UNAUTHORIZED, m);
    if let Some(peer) = headers.get(PEER_HEADER).and_then(|v| v.to_str().ok()).and_then(Peer::from_header_value) {
        return component(store, &peer);
    }
    let Some(value) = headers.get(axum::http::header::AUTHORIZATION) else {
        return Err(unauthorized(
            "authentication required: send Authorization: Bearer <token>, or a component certificate",
        ));
    };
    let Some(token) = value.to_str().ok().and_then(|v| v.strip_prefix("Bearer ")) else {
        return Err(unauthorized("the Authorization header must be: Bearer <token>"));
    };
    if let Some(t) = store.get::<Token>(TOKENS, &hash(token.trim()))? {
        return Ok(Caller::Operator { name: t.name, role: t.role });
    }
    Err(unauthorized("unknown token"))
}

/// A component known by its certificate: it must be registered under that name, with that role
/// and that certificate (a re-registered name has a new serial), and not revoked.
fn component(store: &dyn ControlStore, peer: &Peer) -> Result<Caller, ApiError> {
    let forbidden = |m: String| ApiError::new(StatusCode::FORBIDDEN, &m);
    let Some(c) = store.get::<Component>(COMPONENTS, &peer.name)? else {
        return Err(forbidden(format!("no component named {} is registered", peer.name)));
    };
    if c.revoked {
        return Err(forbidden(format!("component {} was revoked", c.name)));
    }
    if c.serial != peer.serial || c.role.wire() != peer.role {
        return Err(forbidden(format!(
            "the certificate (serial {}, {}) is not the one {} registered with",
            peer.serial,
            peer.role.name(),
            c.name
        )));
    }
    Ok(Caller::Component { name: c.name, role: c.role })
}

/// The caller must be an operator token with at least `role`.
pub fn require(store: &dyn ControlStore, headers: &HeaderMap, role: ApiRole) -> Result<String, ApiError> {
    match caller(store, headers)? {
        Caller::Operator { name, role: have } if have >= role => Ok(name),
        Caller::Operator { name, role: have } => Err(ApiError::new(
            StatusCode::FORBIDDEN,
            &format!("token {name} has role {have:?}; this needs {role:?} or above"),
        )),
        Caller::Component { name, .. } => {
            Err(ApiError::new(StatusCode::FORBIDDEN, &format!("component {name} may not call operator endpoints")))
        }
    }
}

/// The caller must be a registered component of the replication (not an NBD client).
pub fn require_component(store: &dyn ControlStore, headers: &HeaderMap) -> Result<(String, ComponentRole), ApiError> {
    match caller(store, headers)? {
        Caller::Component { name, role: ComponentRole::NbdClient } => Err(ApiError::new(
            StatusCode::FORBIDDEN,
            &format!("{name} is an NBD client: it takes part in no replication"),
        )),
        Caller::Component { name, role } => Ok((name, role)),
        Caller::Operator { name, .. } => {
            Err(ApiError::new(StatusCode::FORBIDDEN, &format!("{name} is an operator token, not a component")))
        }
    }
}
