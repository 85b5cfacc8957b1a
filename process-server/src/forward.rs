//! Master-target-facing side of one stream: read cached batches (sealed at ingest) in order, send; on
//! AppliedAck persist the position and free the cache.
//!
//! ```text
//! connect (server must be a master target) --> Hello --> Open{item,disk,size} --> Resume{next}
//!   sender: cache.find(next) --> the sealed batch as cached (opened, cut below next and sealed again
//!           only when next falls inside it) --> Sealed --> at most window_bytes unapplied
//!   receiver: AppliedAck{through} --> stream.set_applied(through) (persist, then delete cache files)
//! ```

use crate::cache::{Cached, StreamCache};
use crate::metrics as m;
use crate::stream::Stream;
use crate::Server;
use anyhow::{bail, Context};
use sr_common::compress;
use sr_common::retry::{Reconnects, RetryPolicy};
use sr_common::stream::{Next, Sender, SenderLimits};
use sr_common::types::Seq;
use sr_common::wire::{self, Message, Role};
use std::sync::Arc;
use std::time::Instant;

pub async fn run(server: Arc<Server>, stream: Arc<Stream>) {
    let mut reconnects = Reconnects::default();
    let mut idle_logged = false;
    loop {
        // An item no longer assigned here (protection disabled, or moved to another process server)
        // is not forwarded: its agent keeps every change until applied, so nothing waits on this cache.
        // Waiting starts before the look, so a change of routes between the two is not missed.
        let routes_changed = server.routes_changed.notified();
        if server.route(stream.key.item).is_none() {
            if !idle_logged && server.routes_known.load(std::sync::atomic::Ordering::Acquire) {
                // Its batches are not needed: the agent keeps every change until it is applied.
                let s = stream.clone();
                let freed = tokio::task::spawn_blocking(move || s.cache.drop_through(Seq(u64::MAX))).await;
                tracing::info!(key = %stream.key, ?freed, "item not assigned to this process server; forwarding stopped, cache dropped");
                idle_logged = true;
            }
            tokio::select! {
                _ = routes_changed => continue,
                _ = server.shutdown.cancelled() => return,
            }
        }
        idle_logged = false;
        let started = Instant::now();
        let res = tokio::select! {
            r = session(&server, &stream) => r,
            _ = server.shutdown.cancelled() => return,
        };
        if let Err(e) = res {
            metrics::counter!(m::ERRORS, "side" => "master-target").increment(1);
            let code = sr_common::wire::code_of(&e);
            *stream.fault.lock().expect("fault lock poisoned") = code.fatal().then(|| (code, format!("{e:#}")));
            tracing::warn!(key = %stream.key, error = format!("{e:#}"), "forwarding to the master target stopped; reconnecting");
        }
        let delay = reconnects.after_session(started, Instant::now(), &RetryPolicy::default(), rand::random());
        tokio::select! {
            _ = tokio::time::sleep(delay) => {}
            _ = server.shutdown.cancelled() => return,
        }
    }
}

/// A stream to a master target (its certificate and role checked), past the Hello exchange.
pub async fn open_to_master_target(
    server: &Server,
    addr: std::net::SocketAddr,
) -> anyhow::Result<(quinn::SendStream, quinn::RecvStream)> {
    sr_common::quic::open_session(
        &server.endpoint,
        &server.identity,
        addr,
        Role::MasterTarget,
        Role::ProcessServer,
        &server.cfg.node,
        sr_common::quic::SEND_WINDOW,
    )
    .await
}

async fn session(server: &Arc<Server>, stream: &Arc<Stream>) -> anyhow::Result<()> {
    let key = stream.key;
    let route =
        server.route(key.item).with_context(|| format!("item {} is not assigned to this process server", key.item))?;
    let item_key = route.key.clone();
    let (mut send, mut recv) = open_to_master_target(server, route.master_target).await?;
    wire::write_msg(&mut send, &Message::Open { item: key.item, disk: key.disk, disk_size: stream.disk_size }).await?;
    let next = match wire::expect_msg(&mut recv).await? {
        Message::Resume { next } => next,
        other => bail!("master target answered Open with {}", other.kind()),
    };
    // Sequence numbers start at 1: a Resume below is a peer's mistake, read as "from the start".
    let next = next.max(Seq(1));
    let s = stream.clone();
    tokio::task::spawn_blocking(move || s.set_applied(Seq(next.0 - 1))).await??;
    tracing::info!(%key, next = next.0, "forwarding to the master target");

    let (applied_tx, mut applied_rx) = tokio::sync::watch::channel(Seq(next.0 - 1));
    let ack_stream = stream.clone();
    let mut acks: tokio::task::JoinHandle<anyhow::Result<()>> = tokio::spawn(async move {
        loop {
            match wire::read_msg(&mut recv).await? {
                Some(Message::AppliedAck { through }) => {
                    let s = ack_stream.clone();
                    tokio::task::spawn_blocking(move || s.set_applied(through)).await??;
                    let _ = applied_tx.send(through);
                }
                Some(other) => bail!("unexpected {} from the master target", other.kind()),
                None => bail!("master target closed the stream"),
            }
        }
    });
    let limits = SenderLimits {
        window_bytes: server.cfg.window_bytes,
        batch_bytes: u64::MAX,
        ack_timeout: Some(sr_common::stream::DEFAULT_ACK_TIMEOUT),
        // The agent gathered the changes already: each cached batch goes on as it is.
        linger: std::time::Duration::ZERO,
    };
    let mut sender = Sender::at(limits, next, Instant::now());
    let level = route.compression_level;
    let mut limiter = sr_common::ratelimit::RateLimiter::new(route.bandwidth_bytes_per_sec, Instant::now());
    loop {
        sender.acked(*applied_rx.borrow_and_update(), Instant::now())?;
        sender.handle_timeout(Instant::now())?;
        let stall = sr_common::service::sleep_until(sender.poll_timeout());
        // `cached` keeps a permit, so a batch cached between the look and the wait is not missed.
        let entry = match sender.next() {
            Next::Send { from, .. } => stream.cache.find(from),
            Next::WindowFull => None,
        };
        let Some(entry) = entry else {
            tokio::select! {
                _ = stream.cached.notified() => {}
                r = applied_rx.changed() => r.context("acknowledgement reader stopped")?,
                r = &mut acks => return Err(sr_common::service::reader_ended(r)),
                _ = stall => {}
            }
            continue;
        };
        let skip = sender.place(entry.first, entry.last).with_context(|| format!("{key}: reading the cache"))?;
        let cursor = Seq(entry.first.0 + skip);
        let span = tracing::info_span!("seal_batch", item = key.item.0, disk = key.disk.0, from = cursor.0);
        // The item's keys as they are now (a rotation adds an epoch while the stream runs).
        let item_key = server.route(key.item).map_or_else(|| item_key.clone(), |r| r.key);
        let sealed = tokio::task::spawn_blocking({
            let item_key = item_key.clone();
            move || -> anyhow::Result<_> {
                let _in = span.enter();
                // The cache holds batches sealed at ingest; one is opened only to send a part of it.
                let mut batch = match StreamCache::read(&entry)? {
                    Cached::Sealed(s) if skip == 0 => return Ok(s),
                    Cached::Sealed(s) => compress::decompress(&item_key.open(&s)?)?,
                    Cached::Plain(b) => b,
                };
                batch.changes.drain(..skip as usize);
                batch.first = cursor;
                Ok(crate::cache::seal_batch(&item_key, level, batch)?.0)
            }
        })
        .await??;
        let (first, last) = (sealed.first, sealed.last);
        // The item's bandwidth limit, counted on what crosses the link.
        if let Some(r) = server.route(key.item) {
            limiter.set_rate(r.bandwidth_bytes_per_sec);
        }
        let wait = limiter.reserve(Instant::now(), sealed.ciphertext.len() as u64);
        if !wait.is_zero() {
            metrics::counter!(m::BANDWIDTH_WAIT_MS).increment(wait.as_millis() as u64);
            tokio::time::sleep(wait).await;
        }
        // A master target that stopped reading blocks the write once the stream's credit is used up.
        let msg = Message::Sealed(sealed);
        let frame_len = tokio::select! {
            r = wire::write_msg(&mut send, &msg) => r.context("sending a sealed batch")? as u64,
            _ = sr_common::service::sleep_until(sender.poll_timeout()) => {
                return Err(sender.stalled(Instant::now())).context(format!("{key}: forwarding"));
            }
        };
        metrics::counter!(m::BYTES_OUT).increment(frame_len);
        metrics::counter!(m::BATCHES_OUT).increment(1);
        sender.sent(first, last, frame_len, Instant::now());
    }
}
