//! The master target: applies sealed batches to replica disks in order, exactly once, and serves the
//! replicas read-only over NBD and as raw image exports.
//!
//! ```text
//! process server --QUIC--> apply (verify, decrypt, decompress, apply, fsync, record) --> replica file
//!                                                                                   +--> NBD (read-only)
//!                                                                                   +--> POST /v1/export
//! ```

pub mod apply;
pub mod commit;
pub mod config;
pub mod export;
pub mod failpoint;
pub mod metrics;
pub mod points;
pub mod qcow2;
pub mod replica;
pub mod retention;
pub mod tree;
pub mod undo;
pub mod undo_index;
pub mod view;

use anyhow::Context;
use config::MtConfig;
use replica::{Replica, ReplicaExport};
use sr_common::contract::{AppliedSeq, Heartbeat, Load, MasterTargetAssignment, ReplicaFault};
use sr_common::disk::DiskFile;
use sr_common::nbd::Exports;
use sr_common::seal::KeyRing;
use sr_common::state::{RedbStore, StateStore, StreamRecord};
use sr_common::types::{Seq, StreamKey};
use std::collections::HashMap;
use std::sync::{Arc, Mutex, RwLock};
use tokio_util::sync::CancellationToken;

pub struct Server {
    pub cfg: MtConfig,
    /// Item keys from the static config, replaced by the configuration server's assignments.
    keys: RwLock<KeyRing>,
    pub store: Arc<dyn StateStore>,
    /// Guards creation so one disk never gets two replica handles.
    replicas: Mutex<HashMap<StreamKey, Arc<Replica>>>,
    listener: quinn::Endpoint,
    identity: Arc<sr_common::tls::Identity>,
    /// Open process-server connections, closed when the revocation list changes.
    pub conns: Mutex<Vec<quinn::Connection>>,
    /// Streams whose replica cannot be used, with the reason; sessions for them are refused.
    broken: Mutex<HashMap<StreamKey, Broken>>,
    exports: Arc<Exports>,
    /// Open views of recovery points, by name.
    views: Mutex<HashMap<String, Arc<points::OpenView>>>,
    /// Exports running or finished since start, by id, for their progress.
    pub export_jobs: Mutex<HashMap<u64, Arc<Mutex<export::ExportJob>>>>,
    pub next_export: std::sync::atomic::AtomicU64,
    /// Retention per item from the configuration server's policies, persisted.
    retention: retention::Retention,
    /// Wakes the control loop to report at once (after a planned failover's final bookmark was
    /// applied: the configuration server waits on it), instead of at the next poll.
    pub report_now: Arc<tokio::sync::Notify>,
}

/// Why a stream's replica cannot be used; its sessions are refused with [`ErrorCode::ReplicaUnusable`].
///
/// [`ErrorCode::ReplicaUnusable`]: sr_common::wire::ErrorCode::ReplicaUnusable
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum BrokenKind {
    /// The replica file is missing although changes were applied to it.
    Lost,
    /// The assigned disk could not be adopted (cleared when a later adoption succeeds).
    AdoptFailed,
    /// A failover commit handed the replica over: the stream is over for good.
    Ended,
}

#[derive(Debug, Clone)]
pub(crate) struct Broken {
    kind: BrokenKind,
    why: String,
}

impl Broken {
    pub(crate) fn new(kind: BrokenKind, why: String) -> Broken {
        Broken { kind, why }
    }
}

/// Why a stream is refused while the disk it must replicate into cannot be used.
const ADOPT_FAILED: &str = "cannot replicate into the assigned disk";

/// NBD export name of a replica.
pub fn export_name(key: StreamKey) -> String {
    format!("item-{}-disk-{}", key.item, key.disk)
}

impl Server {
    pub fn item_key(&self, item: sr_common::types::ItemId) -> Option<Arc<sr_common::seal::ItemKeys>> {
        self.keys.read().expect("keys lock poisoned").get(item).cloned()
    }

    pub(crate) fn replica_path(&self, key: StreamKey) -> std::path::PathBuf {
        self.cfg.data_dir.join("replicas").join(format!("{}.img", export_name(key)))
    }

    fn add(&self, key: StreamKey, disk_size: u64, applied: Seq) -> anyhow::Result<Arc<Replica>> {
        let path = self.replica_path(key);
        let disk = DiskFile::open_or_create(&path, disk_size)
            .with_context(|| format!("opening replica {}", path.display()))?;
        let p = &self.cfg.points;
        let dir = self.cfg.data_dir.join("undo").join(export_name(key));
        let undo = undo::Undo::open(&dir, p.segment_bytes, p.segment_secs, applied, &disk)
            .with_context(|| format!("opening the undo journal of {key}"))?;
        let r = Arc::new(Replica::new(key, disk, applied, undo));
        self.exports.insert(&export_name(key), Arc::new(ReplicaExport(r.clone())));
        Ok(r)
    }

    /// The replica of `key`, created when it is new.
    pub fn replica(&self, key: StreamKey, disk_size: u64) -> anyhow::Result<Arc<Replica>> {
        if let Some(b) = self.broken.lock().expect("broken lock poisoned").get(&key) {
            return Err(sr_common::wire::Coded::new(
                sr_common::wire::ErrorCode::ReplicaUnusable,
                format!("{key}: {}", b.why),
            )
            .into());
        }
        let mut g = self.replicas.lock().expect("replicas lock poisoned");
        if let Some(r) = g.get(&key) {
            anyhow::ensure!(
                r.disk.size() == disk_size,
                "{key}: the source disk is {disk_size} bytes but the replica is {} bytes",
                r.disk.size()
            );
            return Ok(r.clone());
        }
        self.store.put_stream(key, StreamRecord { disk_size, applied: Seq::ZERO })?;
        let r = self.add(key, disk_size, Seq::ZERO)?;
        g.insert(key, r.clone());
        Ok(r)
    }

    pub fn all_replicas(&self) -> Vec<Arc<Replica>> {
        self.replicas.lock().expect("replicas lock poisoned").values().cloned().collect()
    }

    /// Replicas that cannot take their stream (lost, not adoptable, applying stopped), for the
    /// configuration server: `{item, disk, code, reason}` each. A stream a commit ended is no fault.
    pub fn faults(&self) -> Vec<ReplicaFault> {
        use sr_common::wire::ErrorCode;
        let fault = |k: StreamKey, code, reason| ReplicaFault { item: k.item.0, disk: k.disk.0, code, reason };
        let mut out: Vec<ReplicaFault> = self
            .broken
            .lock()
            .expect("broken lock poisoned")
            .iter()
            .filter(|(_, b)| b.kind != BrokenKind::Ended)
            .map(|(k, b)| fault(*k, ErrorCode::ReplicaUnusable, b.why.clone()))
            .collect();
        for r in self.all_replicas() {
            if let Some(why) = r.failing() {
                out.push(fault(r.key, ErrorCode::Transient, format!("applying fails and is retried: {why}")));
            }
            if let Some(why) = r.stopped() {
                out.push(if r.index_stopped() {
                    // Settled by the master target itself within an expiry interval.
                    fault(
                        r.key,
                        ErrorCode::Transient,
                        format!("applying waits until the undo index is caught up (at the next expiry tick): {why}"),
                    )
                } else {
                    fault(
                        r.key,
                        ErrorCode::ReplicaUnusable,
                        format!("applying stopped: {why}; restart the master target"),
                    )
                });
            }
        }
        out
    }

    /// How long points of `item` are kept: its policy's retention, else the configured default.
    pub fn retention_secs(&self, item: sr_common::types::ItemId) -> u64 {
        self.retention.get(item).unwrap_or(self.cfg.points.retention_secs)
    }

    pub fn get(&self, key: StreamKey) -> Option<Arc<Replica>> {
        self.replicas.lock().expect("replicas lock poisoned").get(&key).cloned()
    }

    fn status(&self) -> serde_json::Value {
        let g = self.replicas.lock().expect("replicas lock poisoned");
        let mut v: Vec<_> = g
            .values()
            .map(|r| {
                serde_json::json!({
                    "item": r.key.item.0, "disk": r.key.disk.0, "disk_size": r.disk.size(),
                    "applied_seq": r.applied().0, "export": export_name(r.key),
                    "path": r.disk.path().display().to_string(),
                })
            })
            .collect();
        v.sort_by_key(|j| (j["item"].as_u64(), j["disk"].as_u64()));
        serde_json::json!({ "node": self.cfg.node, "replicas": v })
    }
}

pub async fn run(cfg: MtConfig, shutdown: CancellationToken) -> anyhow::Result<()> {
    sr_common::telemetry::metrics_handle();
    std::fs::create_dir_all(cfg.data_dir.join("replicas"))
        .with_context(|| format!("creating data_dir {}", cfg.data_dir.display()))?;
    // Replicated data, journals, caches and state: reachable by this service's user only.
    sr_common::ca::private_dir(&cfg.data_dir)?;
    let identity = Arc::new(sr_common::tls::Identity::load(&cfg.tls)?.keep_crl_in(cfg.data_dir.join("crl.pem")));
    let keys = KeyRing::load(&cfg.items)?;
    let store: Arc<dyn StateStore> = Arc::new(RedbStore::open(&cfg.data_dir.join("state.redb"))?);
    let retention = retention::Retention::load(&cfg.data_dir.join("retention.json"))?;
    let listener = sr_common::quic::server(&identity, cfg.listen)?;
    let server = Arc::new(Server {
        cfg,
        keys: RwLock::new(keys),
        store: store.clone(),
        replicas: Mutex::new(HashMap::new()),
        listener: listener.clone(),
        identity: identity.clone(),
        conns: Mutex::new(Vec::new()),
        broken: Mutex::new(HashMap::new()),
        exports: Exports::new(),
        views: Mutex::new(HashMap::new()),
        export_jobs: Mutex::new(HashMap::new()),
        next_export: std::sync::atomic::AtomicU64::new(0),
        retention,
        report_now: Default::default(),
    });
    server.finish_commits();
    server.load_ended();
    for (key, rec) in store.streams()? {
        let path = server.replica_path(key);
        let r = if rec.applied > Seq::ZERO && !path.exists() {
            Err(anyhow::anyhow!(
                "replica {} is missing although {} changes were applied to it; the disk needs a resync",
                path.display(),
                rec.applied
            ))
        } else {
            server.add(key, rec.disk_size, rec.applied)
        };
        match r {
            Ok(r) => {
                server.replicas.lock().expect("replicas lock poisoned").insert(key, r);
            }
            Err(e) => {
                tracing::error!(%key, error = format!("{e:#}"), "replica unusable; its stream is refused");
                server
                    .broken
                    .lock()
                    .expect("broken lock poisoned")
                    .insert(key, Broken::new(BrokenKind::Lost, format!("{e:#}")));
            }
        }
    }
    server.reopen_views();
    let expiry = server.clone();
    let stop = shutdown.clone();
    tokio::spawn(async move {
        let every = std::time::Duration::from_secs(expiry.cfg.points.expiry_interval_secs);
        loop {
            tokio::select! {
                _ = tokio::time::sleep(every) => {}
                _ = stop.cancelled() => return,
            }
            let s = expiry.clone();
            let _ = tokio::task::spawn_blocking(move || s.expire_points()).await;
        }
    });
    if let Some(addr) = server.cfg.nbd_tcp {
        let l = std::net::TcpListener::bind(addr).with_context(|| format!("binding NBD on {addr}"))?;
        // TLS only, with a client certificate of the NBD-client role from the deployment CA.
        let tls = sr_common::nbd::NbdTls { id: server.identity.clone(), roles: vec![sr_common::wire::Role::NbdClient] };
        sr_common::nbd::serve_tcp(l, server.exports.clone(), sr_common::nbd::TcpAccess::Tls(Arc::new(tls)));
        tracing::info!(%addr, "NBD exports listening (TLS with client certificates)");
    }
    if let Some(control) = &server.cfg.control {
        let mut client = sr_common::control::ControlClient::new(control, server.identity.clone())?;
        client.wake = server.report_now.clone();
        tokio::spawn(control_loop(server.clone(), client, shutdown.clone()));
    }
    let router = export::routes(server.clone());
    let http = sr_common::telemetry::serve_http(
        server.cfg.http,
        server.identity.clone(),
        router,
        sr_common::https::Guard::Role(sr_common::wire::Role::ConfigServer),
        shutdown.clone(),
    )
    .await?;
    tracing::info!(%http, quic = %server.cfg.listen, "master target listening");
    let (tracker, sessions) = (server.clone(), server.clone());
    sr_common::quic::serve(
        &listener,
        sr_common::wire::Role::ProcessServer,
        &shutdown,
        move |conn| sr_common::quic::track(&tracker.conns, conn),
        move |send, recv, _peer| {
            let server = sessions.clone();
            Box::pin(async move { apply::session(&server, send, recv).await })
        },
    )
    .await;
    listener.close(0u32.into(), b"master target stopping");
    // Let the close frames reach the peers so they reconnect at once instead of timing out.
    let _ = tokio::time::timeout(std::time::Duration::from_secs(2), listener.wait_idle()).await;
    Ok(())
}

/// Reports address, free space and applied positions; takes the keys of the items assigned here.
async fn control_loop(server: Arc<Server>, client: sr_common::control::ControlClient, shutdown: CancellationToken) {
    let (srv, cl) = (&server, &client);
    client
        .every_poll(&shutdown, move || async move {
            let applied: Vec<AppliedSeq> = srv
                .replicas
                .lock()
                .expect("replicas lock poisoned")
                .values()
                .map(|r| AppliedSeq { item: r.key.item.0, disk: r.key.disk.0, seq: r.applied().0 })
                .collect();
            let (size, free) = sr_common::control::volume_bytes(&srv.cfg.data_dir).unwrap_or_default();
            ::metrics::gauge!(crate::metrics::VOLUME_SIZE).set(size as f64);
            ::metrics::gauge!(crate::metrics::VOLUME_FREE).set(free as f64);
            let report = Heartbeat {
                faults: Some(srv.faults()),
                address: Some(srv.cfg.advertised().to_string()),
                load: Some(Load { free_bytes: free, ..Default::default() }),
                applied: Some(applied),
                http: Some(srv.cfg.advertised_http().to_string()),
                ..Default::default()
            };
            cl.heartbeat(&report).await?;
            cl.refresh_crl(&srv.identity, Some((&srv.listener, &srv.conns))).await?;
            let mut items = Vec::new();
            let mut retention = Vec::new();
            for a in cl.assignments::<MasterTargetAssignment>().await? {
                let (item, key) = (a.item, Arc::new(sr_common::contract::item_keys(a.item, &a.keys)?));
                for d in a.adopt.iter().flatten() {
                    let key = StreamKey { item, disk: d.disk };
                    // Until the disk is adopted its stream is refused: it must never go to a new file.
                    let adopted = srv.adopt(key, std::path::Path::new(&d.path));
                    let mut broken = srv.broken.lock().expect("broken lock poisoned");
                    match adopted {
                        Ok(_) => {
                            if broken.get(&key).is_some_and(|b| b.kind == BrokenKind::AdoptFailed) {
                                broken.remove(&key);
                            }
                        }
                        Err(e) => {
                            tracing::error!(error = format!("{e:#}"), "cannot replicate into the assigned disk");
                            broken.insert(key, Broken::new(BrokenKind::AdoptFailed, format!("{ADOPT_FAILED}: {e:#}")));
                        }
                    }
                }
                retention.push((item, a.retention_secs));
                items.push((item, key));
            }
            srv.retention.update(&retention)?;
            *srv.keys.write().expect("keys lock poisoned") = KeyRing::from_keys(items);
            Ok(())
        })
        .await;
}
