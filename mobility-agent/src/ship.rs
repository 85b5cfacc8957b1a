//! Ships one disk's journal to the process server and trims it on durable acknowledgements.
//!
//! ```text
//! connect (mTLS, server must be a process server) --> Hello --> Open{item,disk,size} --> Resume{next}
//!   sender: journal records from `next` --> Batch (<= batch_bytes) --> stream, at most window_bytes unacked
//!   receiver: DurableAck{through} --> opens the window
//!             AppliedAck{through} (relayed from the master target) --> journal.trim_through(through)
//! any error --> drop the connection --> back off (jittered) --> reconnect; the server's Resume says where
//! ```

use crate::capture::ProtectedDisk;
use crate::journal::{self, Cursor};
use crate::metrics as m;
use anyhow::{bail, Context};
use sr_common::retry::{self, Reconnects};
use sr_common::stream::{Next, Sender, SenderLimits};
use sr_common::types::{ItemId, Seq};
use sr_common::wire::{self, Batch, Change, Message, Role};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;
use tokio_util::sync::CancellationToken;

pub struct ShipTarget {
    pub endpoint: quinn::Endpoint,
    /// The agent's main runtime, at the front end's priority: acknowledgements are read and trim the
    /// journal there, and resync reads the disk and marks blocks there, under the lock the front end's writes
    /// take, so that a busy core never leaves a write waiting on a low-priority thread that holds it
    /// for long. (The shipping loop itself takes the lock only to read positions and a snapshot.)
    pub front_end: tokio::runtime::Handle,
    /// Our certificate and the deployment's CA and revocation list, checked at every connect.
    pub identity: Arc<sr_common::tls::Identity>,
    pub node: String,
    pub batch_bytes: u64,
    pub window_bytes: u64,
    /// How long changes may gather into a batch ([`Sender::hold`]).
    pub linger: std::time::Duration,
    /// Bytes a session's connection buffers for sending, at most.
    pub send_window: u64,
    /// After the quick reconnects, the retry schedule (scaled in tests).
    pub retry: sr_common::retry::RetryPolicy,
    /// A session with batches in flight and no acknowledgement for this long is given up.
    pub ack_timeout: Option<std::time::Duration>,
}

/// Where a disk's changes go: the item they belong to and the process server that takes them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Route {
    pub item: ItemId,
    pub process_server: SocketAddr,
}

/// Runs until `shutdown`: keeps a session with the assigned process server up and ships; follows the
/// assignment when it changes (another process server, or none).
pub async fn run(
    disk: Arc<ProtectedDisk>,
    target: Arc<ShipTarget>,
    mut route: tokio::sync::watch::Receiver<Option<Route>>,
    shutdown: CancellationToken,
) {
    let mut reconnects = Reconnects::default();
    let connected = metrics::gauge!(m::CONNECTED, "disk" => disk.name.clone());
    // When the current assignment arrived: a process server learns of a new item at its next poll of
    // the configuration server, so for a while "not assigned" means "not yet".
    let mut assigned_at = Instant::now();
    let mut last = None;
    loop {
        let current = *route.borrow_and_update();
        if current != last {
            assigned_at = Instant::now();
            last = current;
        }
        let Some(r) = current else {
            tokio::select! {
                c = route.changed() => if c.is_err() { return },
                _ = shutdown.cancelled() => return,
            }
            continue;
        };
        let started = Instant::now();
        let res = tokio::select! {
            r = session(&disk, &target, r, &connected) => r,
            // A new assignment: go to it at once.
            _ = route.changed() => {
                connected.set(0.0);
                reconnects.reset();
                continue;
            }
            _ = shutdown.cancelled() => return,
        };
        connected.set(0.0);
        if let Err(e) = res {
            if let Some((code, reason)) = retry::stop_on(retry::classify(&e), assigned_at.elapsed()) {
                // Retrying cannot help: wait for a new assignment (or a restart with new credentials).
                tracing::error!(disk = disk.name, reason, "shipping stopped and not retrying; an operator must act");
                metrics::gauge!(m::FATAL, "disk" => disk.name.clone()).set(1.0);
                disk.set_fatal(Some((code, reason)));
                tokio::select! {
                    c = route.changed() => if c.is_err() { return },
                    _ = shutdown.cancelled() => return,
                }
                metrics::gauge!(m::FATAL, "disk" => disk.name.clone()).set(0.0);
                disk.set_fatal(None);
                reconnects.reset();
                continue;
            }
            tracing::warn!(
                disk = disk.name,
                error = format!("{e:#}"),
                "shipping to the process server stopped; reconnecting"
            );
        }
        metrics::counter!(m::RECONNECTS, "disk" => disk.name.clone()).increment(1);
        let delay = reconnects.after_session(started, Instant::now(), &target.retry, rand::random());
        let next = std::time::SystemTime::now() + delay;
        let next = next.duration_since(std::time::UNIX_EPOCH).unwrap_or_default().as_secs_f64();
        metrics::gauge!(m::NEXT_ATTEMPT, "disk" => disk.name.clone()).set(next);
        tokio::select! {
            _ = tokio::time::sleep(delay) => {}
            _ = shutdown.cancelled() => return,
        }
    }
}

async fn session(
    disk: &Arc<ProtectedDisk>,
    t: &ShipTarget,
    route: Route,
    connected: &metrics::Gauge,
) -> anyhow::Result<()> {
    let (mut send, mut recv) = sr_common::quic::open_session(
        &t.endpoint,
        &t.identity,
        route.process_server,
        Role::ProcessServer,
        Role::Agent,
        &t.node,
        t.send_window,
    )
    .await?;
    wire::write_msg(&mut send, &Message::Open { item: route.item, disk: disk.id, disk_size: disk.size() }).await?;
    let next = match wire::expect_msg(&mut recv).await? {
        Message::Resume { next } => next,
        other => bail!("process server answered Open with {}", other.kind()),
    };
    // The journal this session ships: a new protection starts it over, and this session must end
    // then rather than read the new journal's records as the old stream's continuation.
    let incarnation = disk.journal_incarnation();
    let (first, last) = (disk.first_seq(), disk.last_seq());
    let limits = SenderLimits {
        window_bytes: t.window_bytes,
        batch_bytes: t.batch_bytes,
        ack_timeout: t.ack_timeout,
        linger: t.linger,
    };
    let mut sender = Sender::resume(limits, next, first, last, Instant::now())
        .with_context(|| format!("resuming disk {} of item {}", disk.name, route.item))?;
    disk.on_durable_ack(sender.acknowledged());
    connected.set(1.0);
    tracing::info!(disk = disk.name, next = next.0, last = last.0, "shipping to the process server");

    // Acknowledgements arrive on their own task; the latest durable one reaches the sender here.
    let (acked_tx, mut acked_rx) = tokio::sync::watch::channel(sender.acknowledged());
    let ack_disk = disk.clone();
    let mut acks: tokio::task::JoinHandle<anyhow::Result<()>> = t.front_end.spawn(async move {
        loop {
            match wire::read_msg(&mut recv).await? {
                Some(Message::DurableAck { through }) => {
                    ack_disk.on_durable_ack(through);
                    let _ = acked_tx.send(through);
                }
                Some(Message::AppliedAck { through }) => ack_disk.on_applied_ack(through)?,
                Some(other) => bail!("unexpected {} from the process server", other.kind()),
                None => bail!("process server closed the stream"),
            }
        }
    });

    let mut cursor = Cursor::at(next);
    let shipped = metrics::counter!(m::SHIPPED_BYTES, "disk" => disk.name.clone());
    let batches = metrics::counter!(m::BATCHES, "disk" => disk.name.clone());
    loop {
        sender.acked(*acked_rx.borrow_and_update(), Instant::now())?;
        sender.handle_timeout(Instant::now())?;
        let stall = sr_common::service::sleep_until(sender.poll_timeout());
        let budget = match sender.next() {
            Next::WindowFull => {
                tokio::select! {
                    r = acked_rx.changed() => r.context("acknowledgement reader stopped")?,
                    r = &mut acks => return Err(sr_common::service::reader_ended(r)),
                    _ = stall => {}
                }
                continue;
            }
            Next::Send { from, budget } => {
                debug_assert_eq!(from, cursor.next, "the journal cursor follows the sender");
                budget
            }
        };
        if let Some(until) = sender.hold(disk.bytes_after(Seq(cursor.next.0 - 1)), Instant::now()) {
            // Gathering: woken to look again when a change is appended (a full batch may be ready).
            tokio::select! {
                _ = disk.appended.notified() => {}
                _ = tokio::time::sleep_until(until.into()) => {}
                r = acked_rx.changed() => r.context("acknowledgement reader stopped")?,
                r = &mut acks => return Err(sr_common::service::reader_ended(r)),
                _ = stall => {}
            }
            continue;
        }
        let (now, segments) = disk.journal_snapshot();
        let read = tokio::task::block_in_place(|| journal::read_batch(&segments, &mut cursor, budget));
        // A new protection started the journal over since the session began (or during the read:
        // what was read, or why it failed, belongs to files replaced under the reader, not to
        // damage). This session is over.
        if now != incarnation || disk.journal_incarnation() != incarnation {
            anyhow::bail!("the journal started over (a new protection); shipping starts again");
        }
        let records = read.map_err(|e| match e {
            // A damaged journal cannot be shipped past: the chain is broken until a resync.
            journal::JournalError::Corrupt { .. } => {
                anyhow::Error::new(sr_common::wire::Coded::new(sr_common::wire::ErrorCode::ChainBroken, e.to_string()))
            }
            e => e.into(),
        })?;
        if records.is_empty() {
            // `appended` keeps a permit, so an append between the read and this wait is not missed.
            tokio::select! {
                _ = disk.appended.notified() => {}
                r = acked_rx.changed() => r.context("acknowledgement reader stopped")?,
                r = &mut acks => return Err(sr_common::service::reader_ended(r)),
                _ = stall => {}
            }
            continue;
        }
        let first = records[0].seq;
        let last = records[records.len() - 1].seq;
        let changes: Vec<Change> = records.into_iter().map(|r| Change { seq: r.seq, at: r.at, op: r.op }).collect();
        let batch = Batch { item: route.item, disk: disk.id, disk_size: disk.size(), first, last, changes };
        let bytes = batch.payload_bytes();
        let frame_len = wire::write_msg(&mut send, &Message::Batch(batch)).await.context("sending a batch")? as u64;
        shipped.increment(frame_len);
        batches.increment(1);
        sender.sent(first, last, frame_len, Instant::now());
        tracing::trace!(disk = disk.name, first = first.0, last = last.0, bytes, "batch sent");
    }
}
