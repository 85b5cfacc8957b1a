//! Resynchronization by checksum comparison: the disk and its replica are compared region by region
//! as trees of block checksums (through the process server, which relays to the master target), and
//! the blocks that differ go into the dirty map, from where they are copied into the journal and
//! shipped like any change. Unchanged regions cost one hash each on the wire.
//!
//! ```text
//! request (API, assignment) --> ResyncState{requested} --> connect PS --TreeOpen--> ready
//! for each region from the persisted cursor:
//!   own tree (disk read under the journal's lock) <--TreeQuery/TreeHashes, top down--> replica's tree
//!   differing blocks --> dirty map (durable) --> cursor saved
//! done --> the copy thread ships the dirty blocks --> Protected
//! ```
//! Interrupted (any component killed, the network gone), it retries with back-off and resumes at the
//! saved cursor. Writes during the comparison are journaled as usual, so a block the comparison
//! finds equal is right once the journal is applied.

use crate::capture::ProtectedDisk;
use crate::ship::{Route, ShipTarget};
use anyhow::{bail, Context};
use serde::Deserialize;
use sr_common::merkle::{self, Tree, REGION};
use sr_common::wire::{self, Message, Role};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio_util::sync::CancellationToken;

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ResyncConfig {
    /// Reading the disk for checksums is held to this rate, so production I/O keeps its share;
    /// 0: unlimited.
    pub max_read_mbps: u64,
    /// The comparison goes a region of this size at a time; progress is saved after each.
    pub region_bytes: u64,
}

impl Default for ResyncConfig {
    fn default() -> Self {
        ResyncConfig { max_read_mbps: 0, region_bytes: REGION }
    }
}

/// Runs comparisons for `disk` whenever one is requested, until `shutdown`.
pub async fn run(
    disk: Arc<ProtectedDisk>,
    target: Arc<ShipTarget>,
    route: tokio::sync::watch::Receiver<Option<Route>>,
    cfg: ResyncConfig,
    shutdown: CancellationToken,
) {
    let mut attempt = 0u32;
    let progress = metrics::gauge!(crate::metrics::RESYNC_COMPARED_RATIO, "disk" => disk.name.clone());
    loop {
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_millis(500)) => {}
            _ = disk.resync_wake.notified() => {}
            _ = shutdown.cancelled() => return,
        }
        let st = disk.resync_state();
        let r = *route.borrow();
        let Some(r) = r.filter(|_| st.active() && disk.journaling() && disk.copy_state().done) else {
            continue;
        };
        let res = tokio::select! {
            r = compare(&disk, &target, r, &cfg, &progress) => r,
            _ = shutdown.cancelled() => return,
        };
        match res {
            Ok(()) => attempt = 0,
            Err(e) => {
                attempt += 1;
                let delay = sr_common::retry::reconnect_delay(attempt, &target.retry, rand::random());
                tracing::warn!(disk = disk.name, error = format!("{e:#}"), retry_in = ?delay, "checksum comparison interrupted; it resumes where it stopped");
                tokio::select! {
                    _ = tokio::time::sleep(delay) => {}
                    _ = shutdown.cancelled() => return,
                }
            }
        }
    }
}

async fn ask(
    send: &mut quinn::SendStream,
    recv: &mut quinn::RecvStream,
    q: Message,
) -> anyhow::Result<Vec<merkle::Hash>> {
    wire::write_msg(send, &q).await?;
    match wire::expect_msg(recv).await? {
        Message::TreeHashes { hashes } => Ok(hashes),
        Message::Error { message, .. } => bail!("the master target refused: {message}"),
        other => bail!("expected TreeHashes, got {}", other.kind()),
    }
}

/// The replica's tree of one region, through the process server.
struct Remote<'a> {
    send: &'a mut quinn::SendStream,
    recv: &'a mut quinn::RecvStream,
    offset: u64,
    len: u64,
    /// The root, asked for before this side's tree was built.
    root: Option<Vec<merkle::Hash>>,
}

impl merkle::Fetch for Remote<'_> {
    async fn fetch(&mut self, level: usize, first: u64, count: u64) -> anyhow::Result<Vec<merkle::Hash>> {
        if first == 0 && count == 1 {
            if let Some(root) = self.root.take() {
                return Ok(root);
            }
        }
        let q = Message::TreeQuery { offset: self.offset, len: self.len, level: level as u8, first, count };
        ask(self.send, self.recv, q).await
    }
}

async fn compare(
    disk: &Arc<ProtectedDisk>,
    target: &ShipTarget,
    route: Route,
    cfg: &ResyncConfig,
    progress: &metrics::Gauge,
) -> anyhow::Result<()> {
    let size = disk.size();
    let block = disk.dirty_block();
    let (mut send, mut recv) = sr_common::quic::open_session(
        &target.endpoint,
        &target.identity,
        route.process_server,
        Role::ProcessServer,
        Role::Agent,
        &target.node,
        target.send_window,
    )
    .await?;
    let open = Message::TreeOpen { item: route.item, disk: disk.id, disk_size: size, block: block as u32 };
    ask(&mut send, &mut recv, open).await.context("opening the comparison")?;
    let mut st = disk.resync_state();
    tracing::info!(disk = disk.name, from = st.cursor, size, "checksum comparison running");
    let mut limiter = (cfg.max_read_mbps > 0)
        .then(|| sr_common::ratelimit::RateLimiter::new(cfg.max_read_mbps * 1_000_000, Instant::now()));
    while st.cursor < size {
        let (offset, len) = (st.cursor, cfg.region_bytes.min(size - st.cursor));
        if let Some(l) = limiter.as_mut() {
            tokio::time::sleep(l.reserve(Instant::now(), len)).await;
        }
        // Ask for the replica's root first, so the master target checksums its side while this side
        // checksums the disk.
        let top = merkle::top_level(len.div_ceil(block));
        let root_query = Message::TreeQuery { offset, len, level: top as u8, first: 0, count: 1 };
        wire::write_msg(&mut send, &root_query).await?;
        let d = disk.clone();
        // Both reading the disk and marking blocks dirty hold the journal's lock, which the front end's
        // writes take: at the front end's priority (`ShipTarget::front_end`), not at shipping's.
        let mine = blocking_at_front_end_priority(target, move || {
            Tree::build(d.disk_file(), offset, len, block, &|o, buf| d.read_consistent(o, buf))
        })
        .await??;
        let root = match wire::expect_msg(&mut recv).await? {
            Message::TreeHashes { hashes } => hashes,
            Message::Error { message, .. } => bail!("the master target refused: {message}"),
            other => bail!("expected TreeHashes, got {}", other.kind()),
        };
        let mut remote = Remote { send: &mut send, recv: &mut recv, offset, len, root: Some(root) };
        let differing = merkle::diff(&mine, &mut remote).await?;
        let ranges: Vec<(u64, u64)> =
            differing.iter().map(|i| (offset + i * block, block.min(offset + len - (offset + i * block)))).collect();
        let d = disk.clone();
        blocking_at_front_end_priority(target, move || d.mark_dirty(&ranges)).await??;
        st.differing_bytes += differing.len() as u64 * block;
        st.compared_bytes += len;
        st.cursor = offset + len;
        disk.save_resync(st)?;
        progress.set(st.cursor as f64 / size.max(1) as f64);
    }
    let _ = send.finish();
    st.done = st.requested;
    disk.save_resync(st)?;
    tracing::info!(
        disk = disk.name,
        differing_bytes = st.differing_bytes,
        "checksum comparison finished; differing blocks follow"
    );
    Ok(())
}

/// Runs `f` on the main runtime's blocking pool. A thread that pool starts is started by one of the
/// main runtime's own, so it has the front end's priority (one started from a shipping thread would
/// inherit the lower one for good).
async fn blocking_at_front_end_priority<T: Send + 'static>(
    target: &ShipTarget,
    f: impl FnOnce() -> T + Send + 'static,
) -> anyhow::Result<T> {
    let task = target.front_end.spawn(async move { tokio::task::spawn_blocking(f).await });
    task.await.context("a resync step stopped")?.context("a resync step failed")
}
