//! Who is calling: an operator's API token (reader, operator or admin) or a registered component's
//! token. A missing or unknown token is 401; a known one without the needed role is 403.

use crate::error::ApiError;
use crate::model::{ApiRole, Component, ComponentRole, Token, COMPONENTS, TOKENS};
use crate::store::{ControlStore, Docs};
use axum::http::{HeaderMap, StatusCode};

pub const COMPONENT_TOKENS: &str = "component_tokens";

#[derive(Debug, Clone)]
pub enum Caller {
    Operator { name: String, role: ApiRole },
    Component { name: String, role: ComponentRole },
}

/// SHA-256 of a secret, hex: what the store keeps instead of the secret.
pub fn hash(secret: &str) -> String {
    hex::encode(ring::digest::digest(&ring::digest::SHA256, secret.as_bytes()))
}

/// A new random secret, hex.
pub fn secret() -> String {
    hex::encode(rand::random::<[u8; 32]>())
}

pub fn caller(store: &dyn ControlStore, headers: &HeaderMap) -> Result<Caller, ApiError> {
    let unauthorized = |m: &str| ApiError::new(StatusCode::UNAUTHORIZED, m);
    let Some(value) = headers.get(axum::http::header::AUTHORIZATION) else {
        return Err(unauthorized("authentication required: send Authorization: Bearer <token>"));
    };
    let Some(token) = value.to_str().ok().and_then(|v| v.strip_prefix("Bearer ")) else {
        return Err(unauthorized("the Authorization header must be: Bearer <token>"));
    };
    let h = hash(token.trim());
    if let Some(t) = store.get::<Token>(TOKENS, &h)? {
        return Ok(Caller::Operator { name: t.name, role: t.role });
    }
    if let Some(name) = store.get::<String>(COMPONENT_TOKENS, &h)? {
        if let Some(c) = store.get::<Component>(COMPONENTS, &name)? {
            if c.revoked {
                return Err(ApiError::new(StatusCode::FORBIDDEN, &format!("component {name} was revoked")));
            }
            return Ok(Caller::Component { name, role: c.role });
        }
    }
    Err(unauthorized("unknown token"))
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

/// The caller must be a registered component.
pub fn require_component(store: &dyn ControlStore, headers: &HeaderMap) -> Result<(String, ComponentRole), ApiError> {
    match caller(store, headers)? {
        Caller::Component { name, role } => Ok((name, role)),
        Caller::Operator { name, .. } => {
            Err(ApiError::new(StatusCode::FORBIDDEN, &format!("{name} is an operator token, not a component")))
        }
    }
}
