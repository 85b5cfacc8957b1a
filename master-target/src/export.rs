//! HTTP routes of the master target: status, the apply record, recovery points and views (see
//! [`crate::points`]), and export of a replica at a point to a raw image.

use crate::points::PointSpec;
use crate::Server;
use axum::extract::{Query, State};
use axum::http::StatusCode;
use axum::Json;
use sr_common::types::{DiskId, ItemId, StreamKey};
use std::sync::Arc;

#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ExportRequest {
    item: u64,
    disk: u64,
    /// Where to write the raw image; must not exist yet.
    path: std::path::PathBuf,
    /// The point to export; the latest applied state when left out.
    #[serde(default)]
    point: Option<PointSpec>,
    #[serde(default)]
    format: ImageFormat,
    /// Answer when the image is written (default), or at once with an id to follow at
    /// `GET /v1/exports/{id}`.
    #[serde(default = "yes")]
    wait: bool,
}

fn yes() -> bool {
    true
}

/// Progress of an export, kept for `GET /v1/exports/{id}`.
#[derive(Default, Clone, serde::Serialize)]
pub struct ExportJob {
    pub id: u64,
    pub path: std::path::PathBuf,
    pub state: &'static str,
    pub percent: f64,
    pub result: Option<serde_json::Value>,
    pub error: Option<String>,
}

#[derive(serde::Deserialize, Default, Clone, Copy, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum ImageFormat {
    /// Sparse raw image: holes where the disk reads zeroes.
    #[default]
    Raw,
    /// qcow2 (version 3): only clusters holding data are stored.
    Qcow2,
}

#[derive(serde::Deserialize)]
pub struct ItemQuery {
    item: u64,
}

#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ViewRequest {
    name: String,
    item: u64,
    point: PointSpec,
    #[serde(default)]
    writable: bool,
    /// NBD clients (certificate names) that may open the view's disks; none: any NBD client.
    #[serde(default)]
    clients: Vec<String>,
}

enum Sink {
    Raw(std::fs::File),
    Qcow2(crate::qcow2::Qcow2Writer),
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
        .route("/v1/exports/{id}", axum::routing::get(export_progress))
        .route("/v1/points", axum::routing::get(points))
        .route("/v1/views", axum::routing::get(list_views).post(create_view))
        .route("/v1/views/{name}", axum::routing::delete(delete_view))
        .route("/v1/commit", axum::routing::post(commit))
        .route(
            "/v1/poll",
            sr_common::control::poll_route(server.cfg.control.is_some().then(|| server.report_now.clone())),
        )
        .with_state(server)
}

async fn status(State(s): State<Arc<Server>>) -> Json<serde_json::Value> {
    Json(s.status())
}

/// Most batches one page of `GET /v1/apply-log` holds.
pub const APPLY_LOG_PAGE: usize = 10_000;

#[derive(serde::Deserialize)]
pub struct ApplyLogQuery {
    item: u64,
    disk: u64,
    /// Batches whose first sequence number is above this (the previous page's `next_after`).
    #[serde(default)]
    after: u64,
    #[serde(default)]
    limit: Option<usize>,
}

/// The apply record of a disk, a page at a time: `batches` in order and, while more follow,
/// `next_after` to ask for the next page with.
async fn apply_log(
    State(s): State<Arc<Server>>,
    Query(q): Query<ApplyLogQuery>,
) -> Result<Json<serde_json::Value>, ApiError> {
    let key = StreamKey { item: ItemId(q.item), disk: DiskId(q.disk) };
    let limit = q.limit.unwrap_or(APPLY_LOG_PAGE).clamp(1, APPLY_LOG_PAGE);
    let log = s
        .store
        .apply_log(key, sr_common::types::Seq(q.after), limit)
        .map_err(|e| api_err(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))?;
    let next_after = (log.len() == limit).then(|| log.last().map(|(f, _)| f.0)).flatten();
    let rows: Vec<[u64; 2]> = log.into_iter().map(|(f, l)| [f.0, l.0]).collect();
    Ok(Json(serde_json::json!({ "item": q.item, "disk": q.disk, "batches": rows, "next_after": next_after })))
}

fn code(c: u16) -> StatusCode {
    StatusCode::from_u16(c).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR)
}

async fn points(State(s): State<Arc<Server>>, Query(q): Query<ItemQuery>) -> Result<Json<serde_json::Value>, ApiError> {
    s.points_json(ItemId(q.item))
        .map(Json)
        .ok_or_else(|| api_err(StatusCode::NOT_FOUND, format!("item {} has no replica on this master target", q.item)))
}

async fn list_views(State(s): State<Arc<Server>>) -> Json<serde_json::Value> {
    let views: Vec<_> = s.views.lock().expect("views lock poisoned").values().cloned().collect();
    let mut v: Vec<_> = views.iter().map(|v| s.view_json(v)).collect();
    v.sort_by(|a, b| a["name"].as_str().cmp(&b["name"].as_str()));
    Json(serde_json::json!({ "views": v }))
}

async fn create_view(
    State(s): State<Arc<Server>>,
    body: Result<Json<ViewRequest>, axum::extract::rejection::JsonRejection>,
) -> Result<Json<serde_json::Value>, ApiError> {
    let Json(req) = body.map_err(|e| api_err(StatusCode::BAD_REQUEST, e.body_text()))?;
    let started = std::time::Instant::now();
    let s2 = s.clone();
    let v = tokio::task::spawn_blocking(move || {
        s2.create_view(req.name, ItemId(req.item), req.point, req.writable, req.clients)
    })
    .await
    .map_err(|e| api_err(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))?
    .map_err(|(c, m)| api_err(code(c), m))?;
    let mut j = s.view_json(&v);
    j["ready_ms"] = serde_json::json!(started.elapsed().as_secs_f64() * 1000.0);
    Ok(Json(j))
}

#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CommitRequest {
    /// The failover's writable view.
    view: String,
    /// The configuration server's id of the failover, recorded with each disk.
    generation: u64,
}

/// Makes a failover final: the view's disks become plain files here (see [`crate::commit`]).
async fn commit(
    State(s): State<Arc<Server>>,
    body: Result<Json<CommitRequest>, axum::extract::rejection::JsonRejection>,
) -> Result<Json<serde_json::Value>, ApiError> {
    let Json(req) = body.map_err(|e| api_err(StatusCode::BAD_REQUEST, e.body_text()))?;
    tokio::task::spawn_blocking(move || s.commit_view(&req.view, req.generation))
        .await
        .map_err(|e| api_err(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))?
        .map(Json)
        .map_err(|(c, m)| api_err(code(c), m))
}

async fn delete_view(
    State(s): State<Arc<Server>>,
    axum::extract::Path(name): axum::extract::Path<String>,
) -> Result<Json<serde_json::Value>, ApiError> {
    let rec = s.delete_view(&name).map_err(|e| api_err(StatusCode::NOT_FOUND, e))?;
    Ok(Json(serde_json::json!({ "deleted": rec.name })))
}

/// Copies one disk at a point (the latest applied state by default) to a new raw image file, holes
/// kept as holes. The point is held by a view while the copy runs, so replication goes on.
async fn export(
    State(s): State<Arc<Server>>,
    body: Result<Json<ExportRequest>, axum::extract::rejection::JsonRejection>,
) -> Result<Json<serde_json::Value>, ApiError> {
    let Json(req) = body.map_err(|e| api_err(StatusCode::BAD_REQUEST, e.body_text()))?;
    let key = StreamKey { item: ItemId(req.item), disk: DiskId(req.disk) };
    let Some(r) = s.get(key) else {
        return Err(api_err(StatusCode::NOT_FOUND, format!("no replica for {key} on this master target")));
    };
    let path = export_path(&s.cfg.export_dir(), &req.path).map_err(|e| api_err(StatusCode::BAD_REQUEST, e))?;
    let s2 = s.clone();
    let id = s.next_export.fetch_add(1, std::sync::atomic::Ordering::Relaxed) + 1;
    let job =
        Arc::new(std::sync::Mutex::new(ExportJob { id, path: path.clone(), state: "running", ..Default::default() }));
    s.export_jobs.lock().expect("export jobs lock poisoned").insert(id, job.clone());
    let progress = job.clone();
    let wait = req.wait;
    let out_path = path.clone();
    let task = tokio::task::spawn_blocking(move || -> anyhow::Result<(u64, u64, Option<String>)> {
        use anyhow::Context;
        use sr_common::nbd::Backend;
        use std::os::unix::fs::FileExt;
        use std::os::unix::fs::OpenOptionsExt;
        // A disk image holds everything the machine stored: its owner alone may read it.
        let out = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&path)
            .with_context(|| format!("creating {} (it must not exist yet)", path.display()))?;
        let dir = path.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(std::path::Path::new("."));
        let written = (|| -> anyhow::Result<(u64, u64, Option<String>)> {
            let (seq, warning) = match &req.point {
                None => (r.applied(), None),
                Some(spec) => {
                    let chosen = crate::points::resolve(&s2, key.item, spec).map_err(anyhow::Error::msg)?;
                    let c = chosen.iter().find(|c| c.disk == key.disk.0).context("disk not in the item")?;
                    (sr_common::types::Seq(c.seq), c.warning.clone())
                }
            };
            let view = r.open_view(seq, None)?;
            let size = r.disk.size();
            let mut sink = match req.format {
                ImageFormat::Raw => {
                    out.set_len(size)?;
                    Sink::Raw(out)
                }
                ImageFormat::Qcow2 => Sink::Qcow2(crate::qcow2::Qcow2Writer::new(out, size)),
            };
            let chunk = crate::qcow2::Qcow2Writer::CLUSTER as usize;
            let mut buf = vec![0u8; 16 * chunk];
            let mut pos = 0;
            let mut copied = 0;
            while pos < size {
                let n = (buf.len() as u64).min(size - pos) as usize;
                view.read(pos, &mut buf[..n]).map_err(|e| anyhow::anyhow!("reading {key} at {pos}: {e}"))?;
                for (i, piece) in buf[..n].chunks(chunk).enumerate() {
                    if sr_common::compress::is_zero(piece) {
                        continue;
                    }
                    let at = pos + (i * chunk) as u64;
                    match &mut sink {
                        Sink::Qcow2(q) => q.write_cluster(at, piece)?,
                        Sink::Raw(f) => f.write_all_at(piece, at)?,
                    }
                    copied += piece.len() as u64;
                }
                pos += n as u64;
                progress.lock().expect("export job lock poisoned").percent = 100.0 * pos as f64 / size.max(1) as f64;
            }
            match sink {
                Sink::Qcow2(q) => q.finish()?,
                Sink::Raw(f) => f.sync_all()?,
            }
            Ok((seq.0, copied, warning))
        })();
        match written {
            // A partial image must never pass for an export: it goes, and the error says why.
            Err(e) => {
                if let Err(rm) = std::fs::remove_file(&path) {
                    tracing::error!(path = %path.display(), error = %rm, "could not remove a failed export's partial file");
                }
                Err(e.context(format!("exporting to {} failed; the partial file was removed", path.display())))
            }
            Ok(v) => {
                sr_common::crashsafe::fsync_dir(dir).with_context(|| format!("syncing {}", dir.display()))?;
                Ok(v)
            }
        }
    });
    let finish = async move {
        let res = task.await.map_err(|e| anyhow::anyhow!("export task failed: {e}")).and_then(|r| r);
        let mut j = job.lock().expect("export job lock poisoned");
        match res {
            Ok((seq, copied, warning)) => {
                let v = serde_json::json!({
                    "path": out_path, "applied_seq": seq, "seq": seq, "bytes_copied": copied, "export_id": id,
                    "warning": warning,
                });
                (j.state, j.percent, j.result) = ("done", 100.0, Some(v.clone()));
                Ok(v)
            }
            Err(e) => {
                (j.state, j.error) = ("failed", Some(format!("{e:#}")));
                Err(format!("{e:#}"))
            }
        }
    };
    if !wait {
        tokio::spawn(finish);
        return Ok(Json(serde_json::json!({ "export_id": id, "state": "running" })));
    }
    finish.await.map(Json).map_err(|e| api_err(StatusCode::BAD_REQUEST, e))
}

/// The file an export writes: inside the export directory (created 0700 when missing), its parent
/// reached without a symbolic link that leads out of it.
fn export_path(dir: &std::path::Path, requested: &std::path::Path) -> Result<std::path::PathBuf, String> {
    let path = crate::config::confine_export(dir, requested)?;
    sr_common::ca::private_dir(dir).map_err(|e| format!("{e:#}"))?;
    let parent = path.parent().unwrap_or(dir);
    std::fs::create_dir_all(parent).map_err(|e| format!("creating {}: {e}", parent.display()))?;
    let (real_dir, real_parent) = (std::fs::canonicalize(dir), std::fs::canonicalize(parent));
    match (real_dir, real_parent) {
        (Ok(d), Ok(p)) if p.starts_with(&d) => Ok(path),
        _ => Err(format!("path {}: leads out of {} through a link", requested.display(), dir.display())),
    }
}

async fn export_progress(
    State(s): State<Arc<Server>>,
    axum::extract::Path(id): axum::extract::Path<u64>,
) -> Result<Json<ExportJob>, ApiError> {
    let jobs = s.export_jobs.lock().expect("export jobs lock poisoned");
    let j = jobs.get(&id).ok_or_else(|| api_err(StatusCode::NOT_FOUND, format!("no export {id}")))?;
    let j = j.lock().expect("export job lock poisoned").clone();
    Ok(Json(j))
}
