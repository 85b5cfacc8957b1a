//! The mobility agent: runs on a protected machine, fronts each protected disk with an NBD server,
//! journals every write in order, copies the disk once, and ships the journal to a process server.
//!
//! ```text
//! hypervisor / nbd client --NBD--> capture::ProtectedDisk --append--> journal --read--> ship --QUIC--> process server
//!                                        |                                ^
//!                                        +--pwrite--> protected disk      +-- trimmed on DurableAck
//! ```

pub mod capture;
pub mod config;
pub mod consistency;
pub mod dirty;
pub mod failover;
pub mod group_sync;
pub mod journal;
pub mod metrics;
pub mod mode;
pub mod resync;
pub mod scan;
pub mod ship;
pub mod system;

use anyhow::Context;
use capture::ProtectedDisk;
use config::AgentConfig;
use sr_common::contract::{AgentAssignment, ComponentEvent, DiskInfo, DiskProgress, Fault, Heartbeat, Load};
use sr_common::nbd::Exports;
use sr_common::types::{DiskId, ItemId};
use std::sync::Arc;
use tokio_util::sync::CancellationToken;

/// Starts every part of the agent and runs until `shutdown`.
/// Binds a Unix socket at `path` that only this user can connect to, from its first moment: it is
/// made in a private directory beside `path`, restricted there, and renamed into place.
fn bind_private_socket(path: &std::path::Path) -> std::io::Result<std::os::unix::net::UnixListener> {
    use std::os::unix::fs::PermissionsExt;
    let parent = path.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(std::path::Path::new("."));
    let tmp = parent.join(format!(".sr-socket-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&tmp);
    std::fs::create_dir(&tmp)?;
    std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o700))?;
    let inner = tmp.join("s");
    let bound = (|| {
        let l = std::os::unix::net::UnixListener::bind(&inner)?;
        std::fs::set_permissions(&inner, std::fs::Permissions::from_mode(0o600))?;
        std::fs::rename(&inner, path)?;
        Ok(l)
    })();
    let _ = std::fs::remove_dir_all(&tmp);
    bound
}

/// The shipping runtime. However `run` ends, what is left on it (the endpoint's driver) stops with
/// it without blocking the async context it is dropped in (a plain drop there would panic).
struct ShipRuntime(Option<tokio::runtime::Runtime>);

impl ShipRuntime {
    fn handle(&self) -> &tokio::runtime::Handle {
        self.0.as_ref().expect("the shipping runtime lives until dropped").handle()
    }

    fn enter(&self) -> tokio::runtime::EnterGuard<'_> {
        self.0.as_ref().expect("the shipping runtime lives until dropped").enter()
    }
}

impl Drop for ShipRuntime {
    fn drop(&mut self) {
        if let Some(rt) = self.0.take() {
            rt.shutdown_background();
        }
    }
}

pub async fn run(cfg: AgentConfig, shutdown: CancellationToken) -> anyhow::Result<()> {
    sr_common::telemetry::metrics_handle();
    std::fs::create_dir_all(&cfg.data_dir).with_context(|| format!("creating data_dir {}", cfg.data_dir.display()))?;
    // Replicated data, journals, caches and state: reachable by this service's user only.
    sr_common::ca::private_dir(&cfg.data_dir)?;
    let identity = Arc::new(sr_common::tls::Identity::load(&cfg.tls)?.keep_crl_in(cfg.data_dir.join("crl.pem")));
    // Shipping and resync run on a runtime of their own, whose threads yield to the front end's on a
    // busy core (`ship.nice`): the workload's writes first, the replica catching up behind them. The
    // QUIC endpoint is made inside it, so its driver (encryption, UDP sends) runs there too.
    // Absolute, from this thread's: a thread the runtime starts from one of its own inherits the
    // lowered value already.
    let nice = (sr_common::service::thread_nice().context("reading the agent's priority")? + cfg.ship.nice).min(19);
    let ship_rt = ShipRuntime(Some(
        tokio::runtime::Builder::new_multi_thread()
            // A worker per disk and one more: a loop waiting on a journal lock leaves the endpoint's
            // driver a thread to run on.
            .worker_threads(cfg.disks.len().max(1) + 1)
            .thread_name("ship")
            .on_thread_start(move || {
                if let Err(e) = sr_common::service::set_thread_nice(nice) {
                    tracing::warn!(error = %e, nice, "could not lower the priority of a shipping thread");
                }
            })
            .enable_all()
            .build()
            .context("starting the shipping runtime")?,
    ));
    let endpoint = {
        let _in = ship_rt.enter();
        sr_common::quic::client(&identity)?
    };
    let exports = Exports::new();
    let mut disks = Vec::new();
    for d in &cfg.disks {
        let pd = Arc::new(ProtectedDisk::open(
            DiskId(d.id),
            &d.name,
            &d.path,
            &cfg.data_dir,
            cfg.journal.dirty_block_bytes,
            (d.mode == config::CaptureMode::Scan).then_some((d.scan_block_bytes, d.scan_interval_secs)),
        )?);
        pd.set_limit(journal_limit(&cfg.journal, None, pd.size()));
        if !pd.scanned() {
            exports.insert(&d.name, pd.clone());
        }
        disks.push(pd);
    }
    if let Some(addr) = cfg.nbd_tcp {
        let l = std::net::TcpListener::bind(addr).with_context(|| format!("binding NBD on {addr}"))?;
        // Local users only: root and this service's own user (the disk is theirs to use).
        // SAFETY: geteuid has no preconditions.
        let me = unsafe { libc::geteuid() };
        sr_common::nbd::serve_tcp(l, exports.clone(), sr_common::nbd::TcpAccess::LocalUsers(vec![0, me]));
        tracing::info!(%addr, "NBD front end listening (TCP)");
    }
    if let Some(path) = &cfg.nbd_unix {
        if path.exists() {
            std::fs::remove_file(path).with_context(|| format!("removing stale socket {}", path.display()))?;
        }
        let l = bind_private_socket(path).with_context(|| format!("binding NBD socket {}", path.display()))?;
        sr_common::nbd::serve_unix(l, exports.clone());
        tracing::info!(path = %path.display(), "NBD front end listening (Unix socket)");
    }
    let client =
        cfg.control.as_ref().map(|c| sr_common::control::ControlClient::new(c, identity.clone())).transpose()?;
    let wake = client.as_ref().map(|c| c.wake.clone());
    let status_disks = disks.clone();
    let node = cfg.node.clone();
    ::metrics::gauge!(crate::metrics::INFO, "node" => node.clone()).set(1.0);
    let resync_disks = disks.clone();
    let holder = Arc::new(failover::Holder::default());
    let (hold_disks, hold_h, release_h) = (disks.clone(), holder.clone(), holder.clone());
    let router = axum::Router::new()
        .route("/v1/poll", sr_common::control::poll_route(wake))
        .route(
            "/v1/hold",
            axum::routing::post(move |body: axum::body::Bytes| {
                let (disks, holder) = (hold_disks.clone(), hold_h.clone());
                async move {
                    let req: HoldRequest = parse(&body)?;
                    let timeout = std::time::Duration::from_millis(req.timeout_ms.clamp(100, 30_000));
                    tokio::task::spawn_blocking(move || holder.hold(&disks, &req.tag, timeout))
                        .await
                        .map_err(|e| (axum::http::StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))?
                        .map_err(|e| (axum::http::StatusCode::CONFLICT, e))?;
                    Ok::<_, (axum::http::StatusCode, String)>(axum::Json(serde_json::json!({ "held": true })))
                }
            }),
        )
        .route(
            "/v1/release",
            axum::routing::post(move |body: axum::body::Bytes| {
                let holder = release_h.clone();
                async move {
                    let req: ReleaseRequest = parse(&body)?;
                    let marks = tokio::task::spawn_blocking(move || holder.release(&req.tag, req.mark))
                        .await
                        .map_err(|e| (axum::http::StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))?
                        .map_err(|e| (axum::http::StatusCode::CONFLICT, e))?;
                    let marks: Vec<_> =
                        marks.iter().map(|(disk, seq)| serde_json::json!({ "disk": disk, "seq": seq })).collect();
                    Ok::<_, (axum::http::StatusCode, String)>(axum::Json(serde_json::json!({ "marks": marks })))
                }
            }),
        )
        .route(
            "/v1/status",
            axum::routing::get(move || {
                let body = status(&node, &status_disks);
                std::future::ready(axum::Json(body))
            }),
        )
        .route(
            "/v1/resync",
            axum::routing::post(move || {
                let disks = resync_disks.clone();
                async move { request_resync(&disks) }
            }),
        );
    let http = sr_common::telemetry::serve_http(
        cfg.http,
        identity.clone(),
        router,
        sr_common::https::Guard::Role(sr_common::wire::Role::ConfigServer),
        shutdown.clone(),
    )
    .await?;
    tracing::info!(%http, "operations endpoint listening");

    for d in &disks {
        let d = d.clone();
        let stop = shutdown.clone();
        let (chunk, backlog) = (cfg.copy.chunk_bytes, cfg.copy.backlog_bytes);
        // Copies whenever the disk is protected and its copy is not done: at start, and again after
        // each new protection.
        let mut last_scan = std::time::Instant::now();
        std::thread::Builder::new().name(format!("copy-{}", d.name)).spawn(move || loop {
            if stop.is_cancelled() {
                return;
            }
            d.recheck_overflow();
            if let Err(e) = d.close_window_if_caught_up() {
                tracing::warn!(disk = d.name, error = %e, "could not journal the end of a block-order window; retrying");
            }
            if d.scanned() && d.journaling() {
                let r = if d.copy_state().done {
                    let due =
                        last_scan.elapsed().as_secs() >= d.scan_interval.load(std::sync::atomic::Ordering::Relaxed);
                    if due {
                        last_scan = std::time::Instant::now();
                        d.scan_once(&|| stop.is_cancelled()).map(|_| ())
                    } else {
                        Ok(())
                    }
                } else {
                    d.scan_initial_copy(chunk, backlog, &|| stop.is_cancelled())
                };
                if let Err(e) = r {
                    tracing::error!(disk = d.name, error = format!("{e:#}"), "scan capture failed; retrying in 10 s");
                    std::thread::sleep(std::time::Duration::from_secs(10));
                }
            }
            // A scanned disk's initial copy is its first scan (above); later it copies dirty blocks below.
            if !d.scanned() && d.journaling() && !d.copy_state().done {
                if let Err(e) = d.initial_copy(chunk, backlog, &|| stop.is_cancelled()) {
                    tracing::error!(disk = d.name, error = format!("{e:#}"), "initial copy failed; retrying in 10 s");
                    std::thread::sleep(std::time::Duration::from_secs(10));
                }
            } else if d.journaling()
                && d.copy_state().done
                && !d.overflowed()
                && d.dirty_bytes() > 0
                && d.copy_allowed()
            {
                match d.copy_dirty(chunk, backlog, &|| stop.is_cancelled()) {
                    Ok(n) if n > 0 => tracing::info!(disk = d.name, bytes = n, "dirty blocks copied into the journal"),
                    Ok(_) => {}
                    Err(e) => {
                        tracing::error!(
                            disk = d.name,
                            error = format!("{e:#}"),
                            "copying dirty blocks failed; retrying in 10 s"
                        );
                        std::thread::sleep(std::time::Duration::from_secs(10));
                    }
                }
            }
            std::thread::sleep(std::time::Duration::from_millis(200));
        })?;
    }
    let target = Arc::new(ship::ShipTarget {
        endpoint: endpoint.clone(),
        front_end: tokio::runtime::Handle::current(),
        identity: identity.clone(),
        node: cfg.node.clone(),
        batch_bytes: cfg.ship.batch_bytes,
        window_bytes: cfg.ship.window_bytes,
        linger: std::time::Duration::from_millis(cfg.ship.linger_ms),
        // Two batches buffered for sending, not the default 32 MiB: the agent runs on the protected
        // machine, whose memory is its workload's. Its process server is on the same site, so a short
        // round trip keeps even this busy; what must be sent again is read again from the journal.
        send_window: (2 * cfg.ship.batch_bytes).max(4 << 20),
        retry: sr_common::retry::RetryPolicy { scale: cfg.ship.retry_scale },
        // The process server holds batches back on purpose while its cache is full (see
        // `stream::DEFAULT_ACK_TIMEOUT`): no ack timeout here.
        ack_timeout: None,
    });
    let fixed =
        cfg.item.zip(cfg.process_server).map(|(item, ps)| ship::Route { item: ItemId(item), process_server: ps });
    let (route_tx, route_rx) = tokio::sync::watch::channel(fixed);
    let tasks = tokio_util::task::TaskTracker::new();
    for d in &disks {
        tasks.spawn_on(ship::run(d.clone(), target.clone(), route_rx.clone(), shutdown.clone()), ship_rt.handle());
        tasks.spawn_on(
            resync::run(d.clone(), target.clone(), route_rx.clone(), cfg.resync.clone(), shutdown.clone()),
            ship_rt.handle(),
        );
    }
    let (intervals_tx, intervals_rx) = tokio::sync::watch::channel(None);
    let events = consistency::Events::default();
    tasks.spawn(consistency::run(disks.clone(), cfg.points.clone(), intervals_rx, events.clone(), shutdown.clone()));
    if let Some(client) = client {
        let to_cs = Control {
            identity: identity.clone(),
            disks: disks.clone(),
            route: route_tx,
            intervals: intervals_tx,
            events,
            journal: cfg.journal.clone(),
            points: cfg.points.clone(),
            http: cfg.advertise_http.unwrap_or(http),
        };
        tasks.spawn(control_loop(client, to_cs, shutdown.clone()));
    }
    tasks.close();
    shutdown.cancelled().await;
    tasks.wait().await;
    for d in &disks {
        if let Err(e) = sr_common::nbd::Backend::flush(d.as_ref()) {
            tracing::error!(disk = d.name, error = %e, "final flush failed");
        }
    }
    endpoint.close(0u32.into(), b"agent stopping");
    // Let the close frames reach the peers so they reconnect at once instead of timing out.
    let _ = tokio::time::timeout(std::time::Duration::from_secs(2), endpoint.wait_idle()).await;
    Ok(())
}

/// What the control loop reports from and acts on.
struct Control {
    identity: Arc<sr_common::tls::Identity>,
    disks: Vec<Arc<ProtectedDisk>>,
    route: tokio::sync::watch::Sender<Option<ship::Route>>,
    /// The policy's (crash, app) consistency intervals.
    intervals: tokio::sync::watch::Sender<Option<(u64, u64)>>,
    events: consistency::Events,
    journal: config::JournalConfig,
    points: consistency::PointsConfig,
    http: std::net::SocketAddr,
}

#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct HoldRequest {
    tag: String,
    /// The hold ends by itself after this long (100 ms to 30 s).
    #[serde(default = "default_hold_ms")]
    timeout_ms: u64,
}

fn default_hold_ms() -> u64 {
    5000
}

#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct ReleaseRequest {
    tag: String,
    #[serde(default)]
    mark: bool,
}

fn parse<T: serde::de::DeserializeOwned>(body: &[u8]) -> Result<T, (axum::http::StatusCode, String)> {
    serde_json::from_slice(body).map_err(|e| (axum::http::StatusCode::BAD_REQUEST, format!("request body: {e}")))
}

/// Reports disks and progress to the configuration server and follows its assignment.
async fn control_loop(client: sr_common::control::ControlClient, c: Control, shutdown: CancellationToken) {
    let (cl, id, disks, route, intervals) = (&client, &c.identity, &c.disks, &c.route, &c.intervals);
    let events = &c.events;
    let journal_cfg = &c.journal;
    let (points_cfg, http) = (&c.points, c.http);
    let mut last = (std::time::Instant::now(), 0u64);
    client
        .every_poll(&shutdown, move || {
            let changed: u64 = disks.iter().map(|d| d.changed_bytes()).sum();
            let churn = (changed - last.1) as f64 / last.0.elapsed().as_secs_f64().max(0.001);
            last = (std::time::Instant::now(), changed);
            let pending: Vec<(String, String)> = std::mem::take(&mut *events.lock().expect("events lock poisoned"));
            let report = Heartbeat {
                http: Some(http.to_string()),
                events: pending
                    .iter()
                    .map(|(level, message)| ComponentEvent { severity: level.clone(), message: message.clone() })
                    .collect(),
                load: Some(Load { churn_bytes_per_sec: churn as u64, ..Default::default() }),
                system: Some(system::info()),
                disks: Some(
                    disks
                        .iter()
                        .map(|d| DiskInfo {
                            id: d.id.0,
                            name: d.name.clone(),
                            size: d.size(),
                            path: Some(
                                std::fs::canonicalize(d.path())
                                    .unwrap_or_else(|_| d.path().to_path_buf())
                                    .display()
                                    .to_string(),
                            ),
                        })
                        .collect(),
                ),
                progress: Some(
                    disks
                        .iter()
                        .map(|d| {
                            let c = d.copy_state();
                            DiskProgress {
                                id: d.id.0,
                                copy_percent: if c.done {
                                    100.0
                                } else {
                                    100.0 * c.cursor as f64 / d.size().max(1) as f64
                                },
                                copy_done: c.done,
                                done_seq: c.done_seq,
                                last_seq: d.last_seq().0,
                                dirty_bytes: d.dirty_bytes(),
                                overflow: d.overflowed(),
                                journal_bytes: d.journal_bytes(),
                                journal_limit_bytes: Some(d.limit()).filter(|l| *l != u64::MAX).unwrap_or(0),
                                resync_active: d.resync_state().active(),
                                resync_done: d.resync_state().done,
                                resync_waiting: d.dirty_bytes() > 0 && !d.copy_allowed(),
                                compare_percent: 100.0 * d.resync_state().cursor as f64 / d.size().max(1) as f64,
                                generation: c.generation,
                                stopped: c.stopped,
                                stop_seq: c.stop_seq,
                                fatal: d.fatal().map(|(code, reason)| Fault { code, reason }),
                            }
                        })
                        .collect(),
                ),
                ..Default::default()
            };
            async move {
                if let Err(e) = cl.heartbeat(&report).await {
                    // Keep the events for the next heartbeat.
                    events.lock().expect("events lock poisoned").extend(pending);
                    return Err(e);
                }
                cl.refresh_crl(id, None).await?;
                let assignments = cl.assignments::<AgentAssignment>().await?;
                let first = assignments.first();
                let policy = first.and_then(|a| Some((a.crash_interval_secs?, a.app_interval_secs?)));
                intervals.send_if_modified(|cur| std::mem::replace(cur, policy) != policy);
                if let Some((crash, _)) = policy {
                    // A scanned disk's interval is its recovery point objective: the policy's crash interval.
                    disks
                        .iter()
                        .filter(|d| d.scanned())
                        .for_each(|d| d.scan_interval.store(crash, std::sync::atomic::Ordering::Relaxed));
                }
                let percent = first.and_then(|a| a.journal_limit_percent).map(|p| p.clamp(1, 100));
                let resync = first.map_or(0, |a| a.resync_request);
                let window = first
                    .and_then(|a| a.resync_window.as_deref())
                    .and_then(|w| sr_common::types::parse_daily_window(w).ok());
                let stop = first.and_then(|a| a.stop).filter(|g| *g > 0);
                let baseline = first.and_then(|a| a.baseline).filter(|g| *g > 0);
                let next = match first {
                    None => None,
                    Some(a) => Some(ship::Route {
                        item: a.item,
                        process_server: a.process_server.parse().with_context(|| {
                            format!("item {}: process server address {:?}", a.item, a.process_server)
                        })?,
                    }),
                };
                for d in disks {
                    match (next, baseline) {
                        (Some(r), Some(b)) => {
                            d.reprotect(r.item.0, b)?;
                        }
                        (Some(r), None) => d.protect(r.item.0)?,
                        (None, _) => d.unprotect()?,
                    }
                }
                // After the protection, which ends a comparison left from an earlier one.
                for d in disks {
                    d.set_limit(journal_limit(journal_cfg, percent, d.size()));
                    d.set_resync_window(window);
                    if resync > 0 && d.request_resync(resync)? {
                        // The operator's (or a reprotect's) resync runs now, whatever the window.
                        d.resync_now();
                    }
                }
                if let Some(generation) = stop {
                    let state = |ds: &[Arc<ProtectedDisk>]| -> Vec<(bool, u64)> {
                        ds.iter().map(|d| (d.stopped(), d.copy_state().stop_seq)).collect()
                    };
                    let was = state(disks);
                    let (d, p, e) = (disks.clone(), points_cfg.clone(), events.clone());
                    tokio::task::spawn_blocking(move || failover::stop_all(&d, generation, &p, &e)).await??;
                    if state(disks) != was {
                        // Report the stop at once: the planned failover waits for it.
                        cl.wake.notify_one();
                    }
                }
                route.send_if_modified(|cur| {
                    let changed = *cur != next;
                    if changed {
                        tracing::info!(?next, "assignment changed");
                    }
                    *cur = next;
                    changed
                });
                Ok(())
            }
        })
        .await;
}

/// Starts a checksum comparison of every disk with its replica (a local "resync now").
fn request_resync(
    disks: &[Arc<ProtectedDisk>],
) -> Result<axum::Json<serde_json::Value>, (axum::http::StatusCode, String)> {
    let mut started = Vec::new();
    for d in disks {
        let st = d.resync_state();
        let id = st.requested.max(st.done) + 1;
        d.request_resync(id).map_err(|e| (axum::http::StatusCode::INTERNAL_SERVER_ERROR, format!("{e:#}")))?;
        d.resync_now();
        started.push(serde_json::json!({ "disk": d.id.0, "request": id }));
    }
    Ok(axum::Json(serde_json::json!({ "resync": started })))
}

/// The journal's limit in bytes for a disk of `size` bytes: the config's absolute limit, else the
/// policy's share, else the config's share.
pub fn journal_limit(cfg: &config::JournalConfig, policy_percent: Option<u8>, size: u64) -> u64 {
    cfg.limit_bytes.unwrap_or_else(|| size / 100 * u64::from(policy_percent.unwrap_or(cfg.limit_percent)))
}

fn resync_json(d: &ProtectedDisk) -> serde_json::Value {
    let r = d.resync_state();
    serde_json::json!({
        "active": r.active(), "requested": r.requested, "done": r.done, "cursor": r.cursor,
        "compare_percent": if r.active() { 100.0 * r.cursor as f64 / d.size().max(1) as f64 } else { 100.0 },
        "differing_bytes": r.differing_bytes, "compared_bytes": r.compared_bytes,
    })
}

fn status(node: &str, disks: &[Arc<ProtectedDisk>]) -> serde_json::Value {
    let disks: Vec<serde_json::Value> = disks
        .iter()
        .map(|d| {
            let c = d.copy_state();
            serde_json::json!({
                "id": d.id.0,
                "name": d.name,
                "size": d.size(),
                "first_seq": d.first_seq().0,
                "last_seq": d.last_seq().0,
                "acked_seq": d.acked().0,
                "applied_seq": d.applied().0,
                "journal_bytes": d.journal_bytes(),
                "dirty_bytes": d.dirty_bytes(),
                "overflow": d.overflowed(),
                "mode": d.mode().name(),
                "redo_mark": d.redo_mark().0,
                "resync": resync_json(d),
                "initial_copy": {
                    "done": c.done,
                    "cursor": c.cursor,
                    "percent": if c.done { 100.0 } else { 100.0 * c.cursor as f64 / d.size().max(1) as f64 },
                },
            })
        })
        .collect();
    serde_json::json!({ "node": node, "disks": disks })
}
