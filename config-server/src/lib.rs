//! The configuration server: the deployment's CA and registration, inventory and heartbeats,
//! replication policies, the protection lifecycle and jobs, behind a REST API with role tokens.
//!
//! ```text
//! operator (srctl, token) --REST--> api --> store (redb: tokens, keys, components, policies, items, jobs, events)
//! component --register (one-time key + CSR)--> ca --> certificate + component token
//! component --heartbeat (token)--> inventory (address, disks, load)
//! ```

pub mod access;
pub mod activity;
pub mod api;
pub mod auth;
pub mod config;
pub mod error;
pub mod failover;
pub mod items;
pub mod jobs;
pub mod lifecycle;
pub mod metrics;
pub mod model;
pub mod netmap;
pub mod openapi;
pub mod orchestrate;
pub mod plans;
pub mod policies;
pub mod recovery;
pub mod reports;
pub mod reprotect;
pub mod store;

use anyhow::Context;
use config::CsConfig;
use model::{now, ApiRole, EventRecord, Token, EVENTS, TOKENS};
use sr_common::ca::Ca;
use std::sync::Arc;
use store::{ControlStore, Docs, RedbControlStore};
use tokio_util::sync::CancellationToken;

pub struct Cs {
    pub cfg: CsConfig,
    store: Box<dyn ControlStore>,
    pub ca: Ca,
    /// Serializes registrations so a key can never be used twice at the same moment.
    pub registration: tokio::sync::Mutex<()>,
    /// Serializes changes to items (enable, disable, evaluation).
    pub items_lock: tokio::sync::Mutex<()>,
    /// Plans waiting at a manual action, by plan id: resuming sends who resumed.
    pub plan_waits: std::sync::Mutex<std::collections::HashMap<String, tokio::sync::oneshot::Sender<String>>>,
    /// Plans taking a consistency point right now.
    pub plan_busy: std::sync::Mutex<std::collections::HashSet<String>>,
}

impl Cs {
    /// Asks an agent to fetch its assignment now rather than at its next poll (best effort: it polls
    /// anyway).
    pub fn nudge(&self, agent: &str) {
        let c = self.store().get::<model::Component>(model::COMPONENTS, agent).ok().flatten();
        let Some(addr) = c.and_then(|c| c.http?.parse::<std::net::SocketAddr>().ok()) else { return };
        tokio::task::spawn_blocking(move || {
            if let Err(e) = sr_common::http::request(addr, "POST", "/v1/poll", None) {
                tracing::debug!(%addr, error = format!("{e:#}"), "agent not nudged; it polls by itself");
            }
        });
    }

    pub fn store(&self) -> &dyn ControlStore {
        self.store.as_ref()
    }

    /// An alert: a warning event, and a POST of it to the configured webhook.
    pub async fn alert(&self, subject: &str, message: &str) -> Result<(), store::StoreError> {
        self.event("warning", subject, message)?;
        if let Some(hook) = self.cfg.alert_webhook.clone() {
            let body =
                serde_json::json!({ "severity": "warning", "subject": subject, "message": message, "time": now() });
            let res = tokio::task::spawn_blocking(move || {
                let (addr, path) =
                    hook.split_once('/').map_or((hook.as_str(), "/".to_string()), |(a, p)| (a, format!("/{p}")));
                let addr: std::net::SocketAddr =
                    addr.parse().map_err(|e| anyhow::anyhow!("alert_webhook {addr}: {e}"))?;
                sr_common::http::request(addr, "POST", &path, Some(&body.to_string()))
            })
            .await;
            match res {
                Ok(Ok((code, _))) if code < 300 => {}
                Ok(Ok((code, text))) => tracing::warn!(code, text, "alert webhook refused the alert"),
                Ok(Err(e)) => tracing::warn!(error = format!("{e:#}"), "alert webhook unreachable"),
                Err(e) => tracing::warn!(error = %e, "alert webhook task failed"),
            }
        }
        Ok(())
    }

    /// Appends to the event log (and the service log).
    pub fn event(&self, severity: &str, subject: &str, message: &str) -> Result<(), store::StoreError> {
        let id = self.store.next_id(EVENTS)?;
        tracing::info!(severity, subject, "{message}");
        self.store.put(
            EVENTS,
            &model::id_key(id),
            &EventRecord {
                id,
                time: now(),
                severity: severity.into(),
                subject: subject.into(),
                message: message.into(),
            },
        )
    }
}

/// Path of the first admin token, written at first start.
pub fn admin_token_path(cfg: &CsConfig) -> std::path::PathBuf {
    cfg.data_dir.join("admin.token")
}

pub async fn run(cfg: CsConfig, shutdown: CancellationToken) -> anyhow::Result<()> {
    sr_common::telemetry::metrics_handle();
    std::fs::create_dir_all(&cfg.data_dir).with_context(|| format!("creating data_dir {}", cfg.data_dir.display()))?;
    let store = RedbControlStore::open(&cfg.data_dir.join("state.redb"))?;
    let ca = Ca::load_or_create(&cfg.data_dir.join("ca"))?;
    if store.list_raw(TOKENS)?.is_empty() {
        let secret = auth::secret();
        let t = Token {
            id: auth::hash(&secret)[..12].to_string(),
            name: "admin".into(),
            role: ApiRole::Admin,
            hash: auth::hash(&secret),
        };
        let path = admin_token_path(&cfg);
        sr_common::crashsafe::write_file(&path, secret.as_bytes())?;
        sr_common::ca::set_private(&path)?;
        store.put(TOKENS, &t.hash, &t)?;
        tracing::info!(path = %path.display(), "first start: admin token written");
    }
    let cs = Arc::new(Cs {
        cfg,
        store: Box::new(store),
        ca,
        registration: tokio::sync::Mutex::new(()),
        items_lock: tokio::sync::Mutex::new(()),
        plan_waits: Default::default(),
        plan_busy: Default::default(),
    });
    failover::resume_failovers(&cs);
    let ev = cs.clone();
    let stop = shutdown.clone();
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(std::time::Duration::from_secs(1));
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                _ = stop.cancelled() => return,
            }
            if let Err(e) = items::evaluate(&ev).await {
                tracing::error!(error = %e, "evaluating items failed");
            }
            plans::due_points(&ev);
        }
    });
    let http = sr_common::telemetry::serve_http(cs.cfg.listen, api::routes(cs.clone()), shutdown.clone()).await?;
    tracing::info!(%http, "configuration server listening");
    shutdown.cancelled().await;
    Ok(())
}
