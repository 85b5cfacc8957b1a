//! Named recovery points: at the policy's intervals the agent marks every disk of the machine at one
//! moment (all journals locked together, so no write falls between the disks' markers).
//!
//! ```text
//! every crash interval: lock all journals --> Bookmark{tag} on each --> unlock
//! every app interval:   pre hook (e.g. fsfreeze -f) --ok--> AppConsistent{tag} on each --> post hook
//!                                               \--fails or times out--> Bookmark{tag} + warning event --> post hook
//! ```
//! A failing hook never stalls replication: the point is then crash-consistent and an event says why.

use crate::capture::ProtectedDisk;
use serde::Deserialize;
use sr_common::wire::MarkerKind;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio_util::sync::CancellationToken;

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PointsConfig {
    /// A crash-consistent bookmark this often (the configuration server's policy overrides it).
    pub crash_interval_secs: u64,
    /// An app-consistent point this often (the policy overrides it).
    pub app_interval_secs: u64,
    /// Run with `sh -c` before an app-consistent point, to quiesce applications (`fsfreeze -f /data`, a
    /// database checkpoint). Without it, app-consistent points are not taken.
    pub pre_hook: Option<String>,
    /// Run after the point, whether the pre hook succeeded or not (`fsfreeze -u /data`).
    pub post_hook: Option<String>,
    /// Run with `sh -c` when a planned failover stops the machine's disks, before writes are refused
    /// (stop the applications cleanly). A failure is reported; the disks are stopped anyway.
    pub shutdown_hook: Option<String>,
    pub hook_timeout_secs: u64,
}

impl Default for PointsConfig {
    fn default() -> Self {
        PointsConfig {
            crash_interval_secs: 300,
            app_interval_secs: 3600,
            pre_hook: None,
            post_hook: None,
            shutdown_hook: None,
            hook_timeout_secs: 60,
        }
    }
}

/// Warnings for the configuration server's event log, sent with the next heartbeat.
pub type Events = Arc<Mutex<Vec<(String, String)>>>;

/// Puts the same marker on every disk at one moment. Returns false when some disk is not protected
/// or still copying (no point can exist then).
pub fn mark_all(disks: &[Arc<ProtectedDisk>], kind: &MarkerKind) -> anyhow::Result<bool> {
    if disks.is_empty() || !disks.iter().all(|d| d.journaling() && d.copy_state().done) {
        return Ok(false);
    }
    let mut guards: Vec<_> = disks.iter().map(|d| d.lock_journal()).collect();
    for g in guards.iter_mut() {
        g.append(&sr_common::wire::Op::Marker { kind: kind.clone() })?;
    }
    drop(guards);
    disks.iter().for_each(|d| d.after_marker());
    Ok(true)
}

/// Runs `cmd` with `sh -c`, killed after `timeout`. Returns its output, or why it failed.
pub fn run_hook(cmd: &str, timeout: Duration) -> Result<String, String> {
    sr_common::hook::run(cmd, timeout, &[])
}

fn tag(prefix: &str) -> String {
    format!("{prefix}-{}", sr_common::types::now_micros() / 1000)
}

/// Takes one app-consistent point (or a crash-consistent one when the pre hook fails).
pub fn app_point(disks: &[Arc<ProtectedDisk>], cfg: &PointsConfig, events: &Events) -> anyhow::Result<()> {
    let Some(pre) = &cfg.pre_hook else { return Ok(()) };
    if !disks.iter().all(|d| d.journaling() && d.copy_state().done) {
        return Ok(());
    }
    let timeout = Duration::from_secs(cfg.hook_timeout_secs);
    let pre_result = run_hook(pre, timeout);
    let (kind, ok) = match &pre_result {
        Ok(_) => (MarkerKind::AppConsistent { tag: tag("app") }, true),
        Err(_) => (MarkerKind::Bookmark { tag: tag("crash") }, false),
    };
    let marked = mark_all(disks, &kind);
    let post = cfg.post_hook.as_ref().map(|post| run_hook(post, timeout));
    if let Err(why) = &pre_result {
        tracing::warn!(error = why, "pre hook failed; this point is crash-consistent only");
        events.lock().expect("events lock poisoned").push((
            "warning".into(),
            format!("app-consistent point not taken, a crash-consistent one instead: pre hook {why}"),
        ));
    }
    if let Some(Err(why)) = post {
        tracing::warn!(error = why, "post hook failed");
        events.lock().expect("events lock poisoned").push(("warning".into(), format!("post hook {why}")));
    }
    marked?;
    if ok {
        tracing::info!(?kind, "app-consistent point taken");
    }
    Ok(())
}

/// Takes the points at their intervals until `shutdown`. `intervals` carries the policy's
/// (crash, app) intervals in seconds when the configuration server gives them.
pub async fn run(
    disks: Vec<Arc<ProtectedDisk>>,
    cfg: PointsConfig,
    intervals: tokio::sync::watch::Receiver<Option<(u64, u64)>>,
    events: Events,
    shutdown: CancellationToken,
) {
    let (mut last_crash, mut last_app) = (Instant::now(), Instant::now());
    loop {
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_millis(250)) => {}
            _ = shutdown.cancelled() => return,
        }
        let (crash, app) = intervals.borrow().unwrap_or((cfg.crash_interval_secs, cfg.app_interval_secs));
        if last_app.elapsed() >= Duration::from_secs(app.max(1)) {
            last_app = Instant::now();
            let (d, c, e) = (disks.clone(), cfg.clone(), events.clone());
            match tokio::task::spawn_blocking(move || app_point(&d, &c, &e)).await {
                Ok(Ok(())) => {}
                Ok(Err(e)) => tracing::error!(error = format!("{e:#}"), "app-consistent point failed"),
                Err(e) => tracing::error!(error = %e, "app-consistent point task failed"),
            }
        }
        if last_crash.elapsed() >= Duration::from_secs(crash.max(1)) {
            last_crash = Instant::now();
            let d = disks.clone();
            let r =
                tokio::task::spawn_blocking(move || mark_all(&d, &MarkerKind::Bookmark { tag: tag("crash") })).await;
            if let Ok(Err(e)) = r {
                tracing::error!(error = format!("{e:#}"), "crash-consistent bookmark failed");
            }
        }
    }
}
