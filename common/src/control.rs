//! A component's link to the configuration server: heartbeats (address, disks, progress, load) and
//! the assignments it pulls (what to ship where, which item keys to hold). When a component's config
//! has no `[control]` section it runs from its static config instead.

use anyhow::Context;
use serde::Deserialize;
use std::net::SocketAddr;
use std::time::Duration;

pub const DEFAULT_POLL_SECS: u64 = 2;

fn default_poll() -> u64 {
    DEFAULT_POLL_SECS
}

#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct ControlConfig {
    /// The configuration server's API address. The link is mutual TLS: this component is known by
    /// its certificate (the `[tls]` section), and the server must hold the configuration server's.
    pub server: SocketAddr,
    /// Seconds between heartbeats and assignment pulls.
    #[serde(default = "default_poll")]
    pub poll_secs: u64,
}

#[derive(Clone)]
pub struct ControlClient {
    server: SocketAddr,
    id: std::sync::Arc<crate::tls::Identity>,
    /// The HTTPS client and the revocation-list generation it was built at.
    http: std::sync::Arc<std::sync::Mutex<(u64, crate::http::Client)>>,
    pub poll: Duration,
    /// Polls at once when notified (the configuration server asks after it changed this component's
    /// assignment, e.g. to stop it for a planned failover), instead of at the next interval.
    pub wake: std::sync::Arc<tokio::sync::Notify>,
}

fn client_for(id: &crate::tls::Identity) -> anyhow::Result<crate::http::Client> {
    crate::http::Client::new(crate::tls::ServerTrust::Mutual(id, crate::wire::Role::ConfigServer))
}

impl ControlClient {
    pub fn new(cfg: &ControlConfig, id: std::sync::Arc<crate::tls::Identity>) -> anyhow::Result<ControlClient> {
        let http = client_for(&id)?;
        Ok(ControlClient {
            server: cfg.server,
            http: std::sync::Arc::new(std::sync::Mutex::new((id.crl_generation(), http))),
            id,
            poll: Duration::from_secs(cfg.poll_secs.max(1)),
            wake: Default::default(),
        })
    }

    /// The HTTPS client, rebuilt when the revocation list changed (so the server is checked
    /// against the list in force).
    fn http(&self) -> anyhow::Result<crate::http::Client> {
        let mut cur = self.http.lock().expect("control client lock poisoned");
        let generation = self.id.crl_generation();
        if cur.0 != generation {
            *cur = (generation, client_for(&self.id)?);
        }
        Ok(cur.1.clone())
    }

    async fn call(
        &self,
        method: &'static str,
        path: &'static str,
        body: Option<serde_json::Value>,
    ) -> anyhow::Result<serde_json::Value> {
        let (server, http) = (self.server, self.http()?);
        let answer = tokio::task::spawn_blocking(move || http.call_json(server, method, path, body.as_ref()))
            .await
            .context("control request task failed")?;
        answer.with_context(|| format!("the configuration server at {server}"))
    }

    /// The deployment's revocation list (PEM).
    pub async fn crl(&self) -> anyhow::Result<String> {
        let (server, http) = (self.server, self.http()?);
        let (code, text) = tokio::task::spawn_blocking(move || http.request(server, "GET", "/v1/crl", None))
            .await
            .context("control request task failed")??;
        if code != 200 {
            anyhow::bail!("GET https://{server}/v1/crl: HTTP {code}: {text}");
        }
        Ok(text)
    }

    pub async fn heartbeat(&self, report: &crate::contract::Heartbeat) -> anyhow::Result<()> {
        let body = serde_json::to_value(report).context("encoding the heartbeat")?;
        self.call("POST", "/v1/heartbeat", Some(body)).await.map(|_| ())
    }

    /// This component's assignments, in its role's type ([`crate::contract`]).
    pub async fn assignments<T: serde::de::DeserializeOwned>(&self) -> anyhow::Result<Vec<T>> {
        let v = self.call("GET", "/v1/assignments", None).await?;
        let a: crate::contract::Assignments<T> = serde_json::from_value(v)
            .context("GET /v1/assignments: the answer does not match this component's contract")?;
        Ok(a.items)
    }
}

/// Free bytes of the file system holding `path`.
pub fn free_bytes(path: &std::path::Path) -> u64 {
    volume_bytes(path).map_or(0, |(_, free)| free)
}

/// The size of the file system holding `path` and the bytes free to unprivileged users, in bytes.
/// `POST /v1/poll` of a component's API: the configuration server asks it to fetch its assignment
/// now (after changing it) instead of at its next poll, by waking `wake` (the control client's; None
/// for a component without a configuration server, which answers `polling: false`).
pub fn poll_route<S: Clone + Send + Sync + 'static>(
    wake: Option<std::sync::Arc<tokio::sync::Notify>>,
) -> axum::routing::MethodRouter<S> {
    axum::routing::post(move || {
        if let Some(w) = &wake {
            w.notify_one();
        }
        std::future::ready(axum::Json(serde_json::json!({ "polling": wake.is_some() })))
    })
}

pub fn volume_bytes(path: &std::path::Path) -> Option<(u64, u64)> {
    use std::os::unix::ffi::OsStrExt;
    let c = std::ffi::CString::new(path.as_os_str().as_bytes()).ok()?;
    // SAFETY: statvfs writes into the zeroed struct we pass; the path is a valid C string.
    unsafe {
        let mut s: libc::statvfs = std::mem::zeroed();
        if libc::statvfs(c.as_ptr(), &mut s) != 0 {
            return None;
        }
        Some((s.f_blocks as u64 * s.f_frsize as u64, s.f_bavail as u64 * s.f_frsize as u64))
    }
}

impl ControlClient {
    /// Runs `step` now and then every poll interval until `shutdown`. A failed step is logged and
    /// changes nothing: the component keeps what the last good one set.
    pub async fn every_poll<F, Fut>(&self, shutdown: &tokio_util::sync::CancellationToken, mut step: F)
    where
        F: FnMut() -> Fut,
        Fut: std::future::Future<Output = anyhow::Result<()>>,
    {
        loop {
            if let Err(e) = step().await {
                tracing::warn!(
                    error = format!("{e:#}"),
                    "configuration server unreachable; keeping the last assignments"
                );
            }
            tokio::select! {
                _ = tokio::time::sleep(self.poll) => {}
                _ = self.wake.notified() => {}
                _ = shutdown.cancelled() => return,
            }
        }
    }

    /// Fetches the revocation list into `id`; when it changed and this component serves, makes its
    /// `server` endpoint check new handshakes against it and closes the `open` connections.
    pub async fn refresh_crl(
        &self,
        id: &crate::tls::Identity,
        server: Option<(&quinn::Endpoint, &std::sync::Mutex<Vec<quinn::Connection>>)>,
    ) -> anyhow::Result<()> {
        let pem = self.crl().await?;
        if id.set_crl_pem(&pem).context("the configuration server's revocation list was refused")? {
            tracing::info!("revocation list updated; peers reconnect and are checked again");
            if let Some((endpoint, open)) = server {
                crate::quic::apply_crl(id, Some(endpoint), open)?;
            }
        }
        Ok(())
    }
}
