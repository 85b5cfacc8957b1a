//! The REST API's routes: every path and the handler that serves it. Bodies are JSON; errors are
//! [`crate::error::ApiError`]. Handlers live in one module per resource.

use crate::Cs;
use axum::routing::{get, post};
use axum::{Json, Router};
use serde_json::Value;
use std::sync::Arc;

pub fn routes(cs: Arc<Cs>) -> Router {
    Router::new()
        .route("/openapi.json", get(openapi))
        .route("/", get(crate::portal::root))
        .route("/portal/", get(crate::portal::index))
        .route("/portal/{*path}", get(crate::portal::asset))
        .route("/v1/whoami", get(crate::portal::whoami))
        .route("/v1/overview", get(crate::portal::overview))
        .route("/v1/items/{id}/history", get(crate::portal::item_history))
        .route("/v1/tokens", post(crate::access::create_token))
        .route("/v1/registration-keys", post(crate::access::create_key))
        .route("/v1/register", post(crate::access::register))
        .route("/v1/register/ca", post(crate::access::register_ca))
        .route("/v1/crl", get(crate::access::crl))
        .route("/v1/components", get(crate::access::list_components))
        .route("/v1/components/{name}/revoke", post(crate::access::revoke))
        .route("/v1/nbd-clients", post(crate::access::create_nbd_client))
        .route("/v1/heartbeat", post(crate::reports::heartbeat))
        .route("/v1/machines", get(crate::reports::list_machines))
        .route("/v1/policies", get(crate::policies::list_policies).post(crate::policies::create_policy))
        .route(
            "/v1/policies/{id}",
            get(crate::policies::get_policy).put(crate::policies::put_policy).delete(crate::policies::delete_policy),
        )
        .route("/v1/items", get(crate::items::list).post(crate::items::enable))
        .route("/v1/items/{id}", get(crate::items::get).delete(crate::items::disable))
        .route("/v1/items/{id}/resync", post(crate::items::resync))
        .route("/v1/items/{id}/move", post(crate::balance::move_item))
        .route("/v1/process-servers/{name}/drain", post(crate::balance::drain))
        .route("/v1/process-servers/{name}/resume", post(crate::balance::resume))
        .route("/v1/process-servers/balance", post(crate::balance::balance))
        .route("/v1/items/{id}/rotate-key", post(crate::items::rotate_key))
        .route("/v1/items/{id}/points", get(crate::recovery::points))
        .route("/v1/items/{id}/test-failover", post(crate::recovery::test_failover))
        .route("/v1/items/{id}/test-failover/cleanup", post(crate::recovery::test_failover_cleanup))
        .route("/v1/items/{id}/export", post(crate::recovery::export))
        .route("/v1/items/{id}/failover", post(crate::failover::failover))
        .route("/v1/items/{id}/failover/point", post(crate::failover::change_point))
        .route("/v1/items/{id}/commit", post(crate::failover::commit))
        .route("/v1/items/{id}/reprotect", post(crate::reprotect::reprotect))
        .route("/v1/items/{id}/failback", post(crate::failover::failback))
        .route("/v1/plans", get(crate::plans::list).post(crate::plans::create))
        .route("/v1/plans/{id}", get(crate::plans::get).delete(crate::plans::delete))
        .route("/v1/plans/{id}/failover", post(crate::plans::run))
        .route("/v1/plans/{id}/resume", post(crate::plans::resume))
        .route("/v1/plans/{id}/consistency-point", post(crate::plans::consistency_point))
        .route("/v1/network-mappings", get(crate::netmap::list).post(crate::netmap::create))
        .route("/v1/network-mappings/{id}", axum::routing::delete(crate::netmap::delete))
        .route("/v1/assignments", get(crate::items::assignments))
        .route("/v1/jobs", get(crate::activity::list_jobs))
        .route("/v1/jobs/{id}", get(crate::activity::get_job))
        .route("/v1/events", get(crate::activity::list_events))
        .layer(axum::middleware::map_response(crate::portal::no_store))
        .with_state(cs)
}

async fn openapi() -> Json<Value> {
    Json(crate::openapi::document())
}
