//! The configuration server: the deployment's CA and registration, inventory and heartbeats,
//! replication policies, the protection lifecycle and jobs, behind a REST API with role tokens.
//!
//! ```text
//! operator (srctl, token) --REST--> api --> store (redb: tokens, keys, components, policies, items, jobs, events)
//! component --register (one-time key + CSR)--> ca --> certificate + component token
//! component --heartbeat (token)--> inventory (address, disks, load)
//! ```

pub mod access;
pub mod actions;
pub mod activity;
pub mod api;
pub mod auth;
pub mod balance;
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
pub mod overview;
pub mod plans;
pub mod policies;
pub mod portal;
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
    /// This server's own certificate (role config-server): its API's, and the client certificate it
    /// calls the components' APIs with. Its revocation list is the one this server makes.
    pub identity: Arc<sr_common::tls::Identity>,
    /// HTTPS clients to the components' APIs, by the role the server must hold, with the revocation
    /// generation they were built at.
    clients: std::sync::Mutex<std::collections::HashMap<sr_common::wire::Role, (u64, sr_common::http::Client)>>,
    /// Serializes registrations so a key can never be used twice at the same moment.
    pub registration: tokio::sync::Mutex<()>,
    /// Serializes changes to items (enable, disable, evaluation).
    pub items_lock: tokio::sync::Mutex<()>,
    /// Plans waiting at a manual action, by plan id: resuming sends who resumed.
    pub plan_waits: std::sync::Mutex<std::collections::HashMap<String, tokio::sync::oneshot::Sender<String>>>,
    /// Plans taking a consistency point right now.
    pub plan_busy: std::sync::Mutex<std::collections::HashSet<String>>,
    /// The last hour of RPO and churn, for the portal's charts (sampled by the evaluation loop).
    pub history: std::sync::Mutex<overview::History>,
    /// Told of every heartbeat stored: a failover waiting on an agent's stop or a master target's
    /// applied position looks again at once instead of at its next check.
    pub reports: tokio::sync::Notify,
}

impl Cs {
    /// Asks a component (agent, process server or master target) to fetch its assignment now rather
    /// than at its next poll (best effort: it polls anyway).
    pub fn nudge(&self, name: &str) {
        let Some(c) = self.store().get::<model::Component>(model::COMPONENTS, name).ok().flatten() else { return };
        let role = c.role.wire();
        let Some(addr) = c.http.and_then(|h| h.parse::<std::net::SocketAddr>().ok()) else { return };
        let Ok(client) = self.client(role) else { return };
        tokio::task::spawn_blocking(move || {
            if let Err(e) = client.request(addr, "POST", "/v1/poll", None) {
                tracing::debug!(%addr, error = format!("{e:#}"), "component not nudged; it polls by itself");
            }
        });
    }

    /// An HTTPS client to the APIs of components of `role`: mutual TLS with this server's
    /// certificate, the component's checked against the CA and the revocation list in force.
    pub fn client(&self, role: sr_common::wire::Role) -> anyhow::Result<sr_common::http::Client> {
        let generation = self.identity.crl_generation();
        let mut clients = self.clients.lock().expect("clients lock poisoned");
        if let Some((g, c)) = clients.get(&role) {
            if *g == generation {
                return Ok(c.clone());
            }
        }
        let c = sr_common::http::Client::new(sr_common::tls::ServerTrust::Mutual(&self.identity, role))?;
        clients.insert(role, (generation, c.clone()));
        Ok(c)
    }

    /// SHA-256 of the deployment CA's certificate: what registration keys pin.
    pub fn ca_fingerprint(&self) -> String {
        sr_common::ca::pem_fingerprint(self.ca.cert_pem()).expect("the CA certificate this server made is PEM")
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
            let res = tokio::task::spawn_blocking(move || sr_common::http::post_webhook(&hook, &body)).await;
            match res {
                Ok(Ok(())) => {}
                Ok(Err(e)) => tracing::warn!(error = format!("{e:#}"), "alert webhook did not take the alert"),
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

/// This server's certificate, issued by its own CA at first start (and again when the configured
/// names changed): `ca/config-server.pem` and `.key`.
fn api_identity(cfg: &CsConfig, ca: &Ca, store: &RedbControlStore) -> anyhow::Result<sr_common::tls::Identity> {
    let dir = cfg.data_dir.join("ca");
    let paths = sr_common::tls::TlsPaths {
        ca: dir.join("ca.pem"),
        cert: dir.join("config-server.pem"),
        key: dir.join("config-server.key"),
    };
    let names_file = dir.join("config-server.names");
    let names = cfg.api_names.join("\n");
    let current = std::fs::read_to_string(&names_file).ok();
    // Renewed a month before it expires, at the start that comes first.
    let expiring = std::fs::read_to_string(&paths.cert)
        .ok()
        .and_then(|pem| sr_common::ca::not_after(&pem))
        .is_none_or(|end| end < now() + 30 * 24 * 3600);
    if expiring || current.as_deref() != Some(names.as_str()) {
        let serial = store.next_id("certificate_serials")? + 1000;
        let (cert, key) =
            ca.issue_local("config-server", sr_common::wire::Role::ConfigServer, serial, &cfg.api_names)?;
        sr_common::crashsafe::write_secret(&paths.key, key.as_bytes())?;
        sr_common::crashsafe::write_file(&paths.cert, cert.as_bytes())?;
        sr_common::crashsafe::write_file(&names_file, names.as_bytes())?;
        tracing::info!(cert = %paths.cert.display(), "API certificate issued");
    }
    sr_common::tls::Identity::load(&paths)
}

pub async fn run(cfg: CsConfig, shutdown: CancellationToken) -> anyhow::Result<()> {
    sr_common::telemetry::metrics_handle();
    // The store holds every item's data key and the CA key lives beside it: no other user may enter.
    sr_common::ca::private_dir(&cfg.data_dir).with_context(|| format!("data_dir {}", cfg.data_dir.display()))?;
    let store = RedbControlStore::open(&cfg.data_dir.join("state.redb"))?;
    let ca = Ca::load_or_create(&cfg.data_dir.join("ca"))?;
    let identity = Arc::new(api_identity(&cfg, &ca, &store)?);
    if store.list_raw(TOKENS)?.is_empty() {
        let secret = auth::secret();
        let t = Token {
            id: auth::hash(&secret)[..12].to_string(),
            name: "admin".into(),
            role: ApiRole::Admin,
            hash: auth::hash(&secret),
        };
        let path = admin_token_path(&cfg);
        sr_common::crashsafe::write_secret(&path, secret.as_bytes())?;
        store.put(TOKENS, &t.hash, &t)?;
        tracing::info!(path = %path.display(), "first start: admin token written");
    }
    let cs = Arc::new(Cs {
        cfg,
        store: Box::new(store),
        ca,
        identity: identity.clone(),
        clients: Default::default(),
        registration: tokio::sync::Mutex::new(()),
        items_lock: tokio::sync::Mutex::new(()),
        plan_waits: Default::default(),
        plan_busy: Default::default(),
        history: Default::default(),
        reports: Default::default(),
    });
    let crl = access::current_crl(&cs).map_err(|e| anyhow::anyhow!("making the revocation list: {}", e.message))?;
    identity.set_crl_pem(&crl).context("the revocation list this server made")?;
    failover::resume_failovers(&cs);
    if let Some(dir) = &cs.cfg.registration_keys_dir {
        let added = access::import_keys(&cs, dir)?;
        tracing::info!(dir = %dir.display(), added, "registration keys read");
    }
    crate::metrics::register_counters();
    let ev = cs.clone();
    let stop = shutdown.clone();
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(std::time::Duration::from_secs(1));
        let mut prune_tick = std::time::Instant::now() - std::time::Duration::from_secs(60);
        let mut balance_tick = std::time::Instant::now();
        // While a reprotect waits for its stream to catch up, every report is looked at (at most every
        // REPORT_GAP), so the item turns Protected when it is, not at the next second.
        const REPORT_GAP: std::time::Duration = std::time::Duration::from_millis(100);
        let mut follow_reports = false;
        let mut last = tokio::time::Instant::now();
        loop {
            let reported = ev.reports.notified();
            tokio::select! {
                _ = tick.tick() => {}
                _ = reported, if follow_reports => tokio::time::sleep_until(last + REPORT_GAP).await,
                _ = stop.cancelled() => return,
            }
            last = tokio::time::Instant::now();
            match items::evaluate(&ev).await {
                Ok(waiting) => follow_reports = waiting,
                Err(e) => tracing::error!(error = %e, "evaluating items failed"),
            }
            plans::due_points(&ev);
            let every = ev.cfg.auto_balance_secs;
            if every > 0 && balance_tick.elapsed() >= std::time::Duration::from_secs(every) {
                balance_tick = std::time::Instant::now();
                if let Err(e) = balance::auto_balance(&ev).await {
                    tracing::error!(error = %e.message, "balancing items over the process servers failed");
                }
            }
            // Jobs and events are kept by count and age (checked once a minute).
            if prune_tick.elapsed() >= std::time::Duration::from_secs(60) {
                prune_tick = std::time::Instant::now();
                match activity::prune(&ev) {
                    Ok(0) => {}
                    Ok(n) => tracing::info!(removed = n, "old jobs and events removed"),
                    Err(e) => tracing::error!(error = %e, "removing old jobs and events failed"),
                }
                // Keys are rotated by age too.
                let _g = ev.items_lock.lock().await;
                if let Err(e) = items::rotate_due(&ev, None, &[]) {
                    tracing::error!(error = %e.message, "rotating data keys failed");
                }
            }
        }
    });
    let http = sr_common::telemetry::serve_http(
        cs.cfg.listen,
        identity,
        api::routes(cs.clone()),
        sr_common::https::Guard::Handlers,
        shutdown.clone(),
    )
    .await?;
    tracing::info!(%http, "configuration server listening");
    shutdown.cancelled().await;
    Ok(())
}
