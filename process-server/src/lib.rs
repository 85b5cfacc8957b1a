//! The process server: receives agents' streams, caches each batch durably before acknowledging it,
//! then compresses, seals and forwards it to the master target, and frees it once applied.
//!
//! ```text
//! agent --QUIC--> ingest --fsync--> cache --> forward --zstd, AES-GCM, QUIC--> master target
//!   ^                                 ^                                            |
//!   +------ DurableAck ---------------+--------- deleted on AppliedAck <-----------+
//! ```

pub mod cache;
pub mod config;
pub mod forward;
pub mod ingest;
pub mod metrics;
pub mod relay;
pub mod stream;

use anyhow::Context;
use config::PsConfig;
use sr_common::contract::{Heartbeat, Load, ProcessServerAssignment, ReplicaFault, SealCount};
use sr_common::seal::{ItemKeys, KeyRing};
use sr_common::state::{RedbStore, StateStore, StreamRecord};
use sr_common::types::ItemId;
use sr_common::types::{Seq, StreamKey};
use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::RwLock;
use std::sync::{Arc, Mutex};
use stream::Stream;
use tokio_util::sync::CancellationToken;

/// Where an item's batches go and the key they are sealed with.
#[derive(Clone)]
pub struct Route {
    /// The item's data key epochs (shared, so seals are counted once whatever copy seals).
    pub key: Arc<ItemKeys>,
    pub master_target: SocketAddr,
    /// zstd level for this item (the policy's, or the server's default).
    pub compression_level: i32,
    /// Bytes per second towards the master target for this item; 0: unlimited.
    pub bandwidth_bytes_per_sec: u64,
    /// The agent allowed to ship this item and query its checksums (its certificate's name), as
    /// the configuration server assigned it; `None` in a static deployment, where any agent
    /// certificate of the deployment may.
    pub agent: Option<String>,
}

pub struct Server {
    pub cfg: PsConfig,
    /// Items this server may carry, from the static config or the configuration server's assignments.
    routes: RwLock<HashMap<ItemId, Route>>,
    /// Whether `routes` is authoritative yet (static config, or assignments fetched at least once).
    pub routes_known: std::sync::atomic::AtomicBool,
    /// Wakes idle forwarders when `routes` was replaced, so a stream assigned again forwards at once.
    pub routes_changed: tokio::sync::Notify,
    pub endpoint: quinn::Endpoint,
    /// The endpoint agents connect to (its TLS configuration changes with the revocation list).
    pub listener: quinn::Endpoint,
    pub identity: Arc<sr_common::tls::Identity>,
    /// Open agent connections, closed when the revocation list changes so they are checked again.
    pub conns: Mutex<Vec<quinn::Connection>>,
    pub store: Arc<dyn StateStore>,
    /// Guards creation of streams so two sessions never build two caches for one disk.
    streams: Mutex<HashMap<StreamKey, Arc<Stream>>>,
    pub cache_total: Arc<cache::CacheSpace>,
    pub shutdown: CancellationToken,
}

impl Server {
    pub fn route(&self, item: ItemId) -> Option<Route> {
        self.routes.read().expect("routes lock poisoned").get(&item).cloned()
    }

    fn cache_dir(&self, key: StreamKey) -> std::path::PathBuf {
        self.cfg.data_dir.join("cache").join(format!("item-{}-disk-{}", key.item, key.disk))
    }

    /// The stream of `key`, created (and recorded) when it is new.
    pub fn stream(&self, key: StreamKey, disk_size: u64) -> anyhow::Result<Arc<Stream>> {
        let mut g = self.streams.lock().expect("streams lock poisoned");
        if let Some(s) = g.get(&key) {
            return Ok(s.clone());
        }
        let rec = StreamRecord { disk_size, applied: Seq::ZERO };
        self.store.put_stream(key, rec)?;
        let cache = cache::StreamCache::open(&self.cache_dir(key), self.cache_total.clone())
            .with_context(|| format!("opening the cache of {key}"))?;
        let s = Arc::new(Stream::new(key, rec, false, cache, self.store.clone()));
        g.insert(key, s.clone());
        Ok(s)
    }

    pub fn ensure_forwarder(self: &Arc<Self>, stream: &Arc<Stream>) {
        stream.forwarder.call_once(|| {
            tokio::spawn(forward::run(self.clone(), stream.clone()));
        });
    }

    fn status(&self) -> serde_json::Value {
        let g = self.streams.lock().expect("streams lock poisoned");
        let streams: Vec<_> = g
            .values()
            .map(|s| {
                serde_json::json!({
                    "item": s.key.item.0, "disk": s.key.disk.0, "disk_size": s.disk_size,
                    "next_seq": s.next().0, "applied_seq": s.applied().0, "cache_bytes": s.cache.bytes(),
                })
            })
            .collect();
        serde_json::json!({ "node": self.cfg.node, "streams": streams })
    }
}

pub async fn run(cfg: PsConfig, shutdown: CancellationToken) -> anyhow::Result<()> {
    sr_common::telemetry::metrics_handle();
    std::fs::create_dir_all(&cfg.data_dir).with_context(|| format!("creating data_dir {}", cfg.data_dir.display()))?;
    // Replicated data, journals, caches and state: reachable by this service's user only.
    sr_common::ca::private_dir(&cfg.data_dir)?;
    let identity = Arc::new(sr_common::tls::Identity::load(&cfg.tls)?.keep_crl_in(cfg.data_dir.join("crl.pem")));
    let keys = KeyRing::load(&cfg.items)?;
    let mut routes = HashMap::new();
    if let Some(mt) = cfg.master_target {
        for it in &cfg.items {
            let key = keys.get(ItemId(it.id)).expect("KeyRing::load loaded every item").clone();
            let compression_level = cfg.compression_level;
            routes.insert(
                ItemId(it.id),
                Route { key, master_target: mt, compression_level, bandwidth_bytes_per_sec: 0, agent: None },
            );
        }
    }
    let store: Arc<dyn StateStore> = Arc::new(RedbStore::open(&cfg.data_dir.join("state.redb"))?);
    let listener = sr_common::quic::server(&identity, cfg.listen)?;
    let endpoint = sr_common::quic::client(&identity)?;
    let cache_total = Arc::new(cache::CacheSpace::default());
    let static_routes = cfg.control.is_none();
    let server = Arc::new(Server {
        cfg,
        routes_known: std::sync::atomic::AtomicBool::new(static_routes),
        routes_changed: tokio::sync::Notify::new(),
        routes: RwLock::new(routes),
        endpoint,
        listener: listener.clone(),
        identity: identity.clone(),
        conns: Mutex::new(Vec::new()),
        store: store.clone(),
        streams: Mutex::new(HashMap::new()),
        cache_total: cache_total.clone(),
        shutdown: shutdown.clone(),
    });
    ::metrics::gauge!(crate::metrics::CACHE_LIMIT).set(server.cfg.cache_limit_bytes as f64);
    // Streams known from before a restart: their cached batches drain even before the agent returns.
    for (key, rec) in store.streams()? {
        let cache = cache::StreamCache::open(&server.cache_dir(key), cache_total.clone())
            .with_context(|| format!("opening the cache of {key}"))?;
        // A stream recorded before the master target ever answered (applied 0, nothing cached) does not
        // know the replica's position yet: ask again rather than assume an empty replica.
        let known = rec.applied > Seq::ZERO || cache.last().is_some();
        let s = Arc::new(Stream::new(key, rec, known, cache, store.clone()));
        server.streams.lock().expect("streams lock poisoned").insert(key, s.clone());
        server.ensure_forwarder(&s);
    }
    ::metrics::gauge!(crate::metrics::CACHE_BYTES).set(cache_total.used() as f64);
    let st = server.clone();
    let client = server
        .cfg
        .control
        .as_ref()
        .map(|control| sr_common::control::ControlClient::new(control, server.identity.clone()))
        .transpose()?;
    let wake = client.as_ref().map(|c| c.wake.clone());
    let router = axum::Router::new()
        .route("/v1/status", axum::routing::get(move || std::future::ready(axum::Json(st.status()))))
        // A reprotect gives it a new stream: it takes it at once when asked.
        .route("/v1/poll", sr_common::control::poll_route(wake));
    let http = sr_common::telemetry::serve_http(
        server.cfg.http,
        server.identity.clone(),
        router,
        sr_common::https::Guard::Role(sr_common::wire::Role::ConfigServer),
        shutdown.clone(),
    )
    .await?;
    if let Some(client) = client {
        tokio::spawn(control_loop(server.clone(), client, shutdown.clone()));
    }
    tracing::info!(%http, quic = %server.cfg.listen, "process server listening");
    let (tracker, sessions) = (server.clone(), server.clone());
    sr_common::quic::serve(
        &listener,
        sr_common::wire::Role::Agent,
        &shutdown,
        move |conn| sr_common::quic::track(&tracker.conns, conn),
        move |send, recv, peer| {
            let server = sessions.clone();
            Box::pin(async move {
                let r = ingest::session(&server, send, recv, &peer).await;
                if r.is_err() {
                    ::metrics::counter!(crate::metrics::ERRORS, "side" => "agent").increment(1);
                }
                r
            })
        },
    )
    .await;
    listener.close(0u32.into(), b"process server stopping");
    server.endpoint.close(0u32.into(), b"process server stopping");
    // Let the close frames reach the peers so they reconnect at once instead of timing out.
    let _ = tokio::time::timeout(std::time::Duration::from_secs(2), async {
        listener.wait_idle().await;
        server.endpoint.wait_idle().await;
    })
    .await;
    Ok(())
}

/// Reports address and load to the configuration server and takes the items assigned to this server.
async fn control_loop(server: Arc<Server>, client: sr_common::control::ControlClient, shutdown: CancellationToken) {
    let (srv, cl) = (&server, &client);
    client
        .every_poll(&shutdown, move || async move {
            let cache = srv.cache_total.used();
            let faults: Vec<ReplicaFault> = srv
                .streams
                .lock()
                .expect("streams lock poisoned")
                .values()
                .filter_map(|s| {
                    let (code, reason) = s.fault.lock().expect("fault lock poisoned").clone()?;
                    Some(ReplicaFault { item: s.key.item.0, disk: s.key.disk.0, code, reason })
                })
                .collect();
            let seals = srv
                .routes
                .read()
                .expect("routes lock poisoned")
                .iter()
                .map(|(item, r)| SealCount { item: *item, epoch: r.key.current_epoch(), seals: r.key.seals() })
                .collect();
            let report = Heartbeat {
                address: Some(srv.cfg.advertised().to_string()),
                // Where the configuration server nudges it (POST /v1/poll) after a reassignment.
                http: srv.cfg.advertised_http().map(|a| a.to_string()),
                load: Some(Load { cache_bytes: cache, ..Default::default() }),
                faults: Some(faults),
                seals,
                ..Default::default()
            };
            cl.heartbeat(&report).await?;
            cl.refresh_crl(&srv.identity, Some((&srv.listener, &srv.conns))).await?;
            let mut routes = HashMap::new();
            let old = srv.routes.read().expect("routes lock poisoned").clone();
            for a in cl.assignments::<ProcessServerAssignment>().await? {
                let fresh = sr_common::contract::item_keys(a.item, &a.keys)?;
                // The same keys keep their seal count; a new epoch (or a key that changed) starts anew.
                let key = match old.get(&a.item) {
                    Some(r) if r.key.same_keys(&fresh) => r.key.clone(),
                    _ => {
                        tracing::info!(item = %a.item, epoch = fresh.current_epoch(), "data key epoch in force");
                        Arc::new(fresh)
                    }
                };
                ::metrics::gauge!(crate::metrics::KEY_EPOCH, "item" => a.item.0.to_string())
                    .set(key.current_epoch() as f64);
                let master_target = a
                    .master_target
                    .parse()
                    .with_context(|| format!("item {}: master target address {:?}", a.item, a.master_target))?;
                routes.insert(
                    a.item,
                    Route {
                        key,
                        master_target,
                        compression_level: a.compression_level.clamp(1, 19),
                        bandwidth_bytes_per_sec: a.bandwidth_limit_mbps * 1_000_000 / 8,
                        agent: Some(a.agent.clone()),
                    },
                );
            }
            *srv.routes.write().expect("routes lock poisoned") = routes;
            srv.routes_known.store(true, std::sync::atomic::Ordering::Release);
            srv.routes_changed.notify_waiters();
            Ok(())
        })
        .await;
}
