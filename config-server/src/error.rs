//! The API's one error shape: a status and a message, answered as `{"error": "..."}` with 400 (bad
//! request), 401 (no or unknown token), 403 (wrong role), 404, 409 (conflict) or 500. Every handler
//! module returns it; it depends on nothing but the store's error, so no module imports another's
//! handlers to get it.

use crate::store::StoreError;
use axum::extract::rejection::JsonRejection;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde_json::json;

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

/// A name for a token, key or component: 1 to 64 letters, digits, '-' or '_'.
pub fn valid_name(name: &str) -> Result<(), ApiError> {
    if name.is_empty() || name.len() > 64 || !name.chars().all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_') {
        return Err(ApiError::bad("name: 1 to 64 letters, digits, '-' or '_'"));
    }
    Ok(())
}
