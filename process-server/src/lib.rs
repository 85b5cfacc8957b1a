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
pub mod stream;

use anyhow::Context;
use config::PsConfig;
use sr_common::seal::KeyRing;
use sr_common::state::{RedbStore, StateStore, StreamRecord};
use sr_common::types::{Seq, StreamKey};
use std::collections::HashMap;
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Mutex};
use stream::Stream;
use tokio_util::sync::CancellationToken;

pub struct Server {
    pub cfg: PsConfig,
    pub keys: KeyRing,
    pub endpoint: quinn::Endpoint,
    pub store: Arc<dyn StateStore>,
    /// Guards creation of streams so two sessions never build two caches for one disk.
    streams: Mutex<HashMap<StreamKey, Arc<Stream>>>,
    pub cache_total: Arc<AtomicU64>,
    pub shutdown: CancellationToken,
}

impl Server {
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
    let identity = sr_common::tls::Identity::load(&cfg.tls)?;
    let keys = KeyRing::load(&cfg.items)?;
    let store: Arc<dyn StateStore> = Arc::new(RedbStore::open(&cfg.data_dir.join("state.redb"))?);
    let listener = sr_common::quic::server(&identity, cfg.listen)?;
    let endpoint = sr_common::quic::client(&identity)?;
    let cache_total = Arc::new(AtomicU64::new(0));
    let server = Arc::new(Server {
        cfg,
        keys,
        endpoint,
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
    ::metrics::gauge!(crate::metrics::CACHE_BYTES).set(cache_total.load(std::sync::atomic::Ordering::Relaxed) as f64);
    let st = server.clone();
    let router = axum::Router::new()
        .route("/v1/status", axum::routing::get(move || std::future::ready(axum::Json(st.status()))));
    let http = sr_common::telemetry::serve_http(server.cfg.http, router, shutdown.clone()).await?;
    tracing::info!(%http, quic = %server.cfg.listen, "process server listening");
    loop {
        let incoming = tokio::select! {
            i = listener.accept() => i,
            _ = shutdown.cancelled() => break,
        };
        let Some(incoming) = incoming else { break };
        let server = server.clone();
        tokio::spawn(async move {
            match incoming.await {
                Ok(conn) => ingest::connection(server, conn).await,
                Err(e) => tracing::warn!(error = %e, "agent handshake failed"),
            }
        });
    }
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
