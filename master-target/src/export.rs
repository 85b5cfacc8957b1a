//! HTTP routes of the master target: status, the apply record, and export of a replica to a raw image.

use crate::Server;
use axum::extract::{Query, State};
use axum::http::StatusCode;
use axum::Json;
use sr_common::types::{DiskId, ItemId, StreamKey};
use std::sync::Arc;

#[derive(serde::Deserialize)]
pub struct DiskQuery {
    item: u64,
    disk: u64,
}

#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ExportRequest {
    item: u64,
    disk: u64,
    /// Where to write the raw image; must not exist yet.
    path: std::path::PathBuf,
}

type ApiError = (StatusCode, Json<serde_json::Value>);

fn api_err(code: StatusCode, msg: String) -> ApiError {
    (code, Json(serde_json::json!({ "error": msg })))
}

pub fn routes(server: Arc<Server>) -> axum::Router {
    axum::Router::new()
        .route("/v1/status", axum::routing::get(status))
        .route("/v1/apply-log", axum::routing::get(apply_log))
        .route("/v1/export", axum::routing::post(export))
        .with_state(server)
}

async fn status(State(s): State<Arc<Server>>) -> Json<serde_json::Value> {
    Json(s.status())
}

async fn apply_log(
    State(s): State<Arc<Server>>,
    Query(q): Query<DiskQuery>,
) -> Result<Json<serde_json::Value>, ApiError> {
    let key = StreamKey { item: ItemId(q.item), disk: DiskId(q.disk) };
    let log = s.store.apply_log(key).map_err(|e| api_err(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))?;
    let rows: Vec<[u64; 2]> = log.into_iter().map(|(f, l)| [f.0, l.0]).collect();
    Ok(Json(serde_json::json!({ "item": q.item, "disk": q.disk, "batches": rows })))
}

/// Copies the replica's latest applied state to a new raw image file, holes kept as holes. Applying
/// waits while the copy runs, so the image is the source at exactly one applied sequence number.
async fn export(
    State(s): State<Arc<Server>>,
    body: Result<Json<ExportRequest>, axum::extract::rejection::JsonRejection>,
) -> Result<Json<serde_json::Value>, ApiError> {
    let Json(req) = body.map_err(|e| api_err(StatusCode::BAD_REQUEST, e.body_text()))?;
    let key = StreamKey { item: ItemId(req.item), disk: DiskId(req.disk) };
    let Some(r) = s.get(key) else {
        return Err(api_err(StatusCode::NOT_FOUND, format!("no replica for {key} on this master target")));
    };
    let path = req.path.clone();
    let res = tokio::task::spawn_blocking(move || -> anyhow::Result<(u64, u64)> {
        use anyhow::Context;
        use std::os::unix::fs::FileExt;
        let out = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&path)
            .with_context(|| format!("creating {} (it must not exist yet)", path.display()))?;
        let _g = r.gate.read().expect("replica gate poisoned");
        let size = r.disk.size();
        out.set_len(size)?;
        let mut buf = vec![0u8; 1 << 20];
        let mut pos = 0;
        let mut copied = 0;
        while let Some(at) = r.disk.next_data(pos) {
            let at = at / 4096 * 4096;
            let n = (buf.len() as u64).min(size - at) as usize;
            r.disk.read_at(at, &mut buf[..n])?;
            if !sr_common::compress::is_zero(&buf[..n]) {
                out.write_all_at(&buf[..n], at)?;
                copied += n as u64;
            }
            pos = at + n as u64;
        }
        out.sync_all()?;
        Ok((r.applied().0, copied))
    })
    .await
    .map_err(|e| api_err(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))?;
    match res {
        Ok((applied, copied)) => Ok(Json(serde_json::json!({
            "path": req.path, "applied_seq": applied, "bytes_copied": copied,
        }))),
        Err(e) => Err(api_err(StatusCode::BAD_REQUEST, format!("{e:#}"))),
    }
}
