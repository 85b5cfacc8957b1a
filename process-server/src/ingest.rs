//! Agent-facing side: receive batches, make them durable in the cache, acknowledge them.
//!
//! ```text
//! agent --Hello, Open{item,disk,size}--> check item key, find or create stream, wait until the
//!        replica position is known --Resume{next}--> agent
//! agent --Batch--> validate --> drop duplicate prefix --> wait while the cache is full --> cache.put
//!       (fsync) --> DurableAck{last} --> wake forwarder
//! ```

use crate::metrics as m;
use crate::stream::Stream;
use crate::Server;
use anyhow::{bail, Context};
use sr_common::types::{Seq, StreamKey};
use sr_common::wire::{self, Message, Role};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

/// How long an agent waits for a new stream's replica position before it is told to retry.
const POSITION_WAIT: Duration = Duration::from_secs(20);

/// Writes a message on a send stream shared by the session and its applied-position relay.
async fn send_msg(send: &tokio::sync::Mutex<&mut quinn::SendStream>, msg: &Message) -> anyhow::Result<()> {
    wire::write_msg(&mut **send.lock().await, msg).await?;
    Ok(())
}

pub async fn session(
    server: &Arc<Server>,
    send: &mut quinn::SendStream,
    mut recv: quinn::RecvStream,
) -> anyhow::Result<()> {
    let node = wire::check_hello(wire::expect_msg(&mut recv).await?, Role::Agent)?;
    wire::write_msg(
        send,
        &Message::Hello { version: wire::PROTOCOL_VERSION, role: Role::ProcessServer, node: server.cfg.node.clone() },
    )
    .await?;
    let (item, disk, disk_size) = match wire::expect_msg(&mut recv).await? {
        Message::Open { item, disk, disk_size } => (item, disk, disk_size),
        Message::TreeOpen { item, disk, disk_size, block } => {
            return crate::relay::session(server, send, recv, (item, disk, disk_size, block)).await;
        }
        other => bail!("expected Open or TreeOpen, got {}", other.kind()),
    };
    if server.route(item).is_none() {
        return Err(sr_common::wire::Coded::new(
            sr_common::wire::ErrorCode::NotAssigned,
            format!(
                "item {item} is not assigned to process server {} (not in its [[item]] list or assignments)",
                server.cfg.node
            ),
        )
        .into());
    }
    let key = StreamKey { item, disk };
    let stream = server.stream(key, disk_size)?;
    if stream.disk_size != disk_size {
        bail!(
            "{key}: agent says the disk is {disk_size} bytes, but it was {} bytes when replication began",
            stream.disk_size
        );
    }
    let token = tokio_util::sync::CancellationToken::new();
    if let Some(old) = stream.session.lock().expect("session lock poisoned").replace(token.clone()) {
        old.cancel();
    }
    server.ensure_forwarder(&stream);
    let deadline = tokio::time::Instant::now() + POSITION_WAIT;
    while !stream.known() {
        let freed = stream.freed.notified();
        if stream.known() {
            break;
        }
        if tokio::time::timeout_at(deadline, freed).await.is_err() {
            bail!("{key}: the replica position is not known yet (is the master target reachable?); retry later");
        }
    }
    let mut next = stream.next();
    tracing::info!(%key, node, next = next.0, "agent stream open");
    wire::write_msg(send, &Message::Resume { next }).await?;
    wire::write_msg(send, &Message::AppliedAck { through: stream.applied() }).await?;
    let send = tokio::sync::Mutex::new(send);
    // Relays the master target's applied position to the agent, which trims its journal on it.
    let relay = async {
        let mut told = stream.applied();
        loop {
            let freed = stream.freed.notified();
            let applied = stream.applied();
            if applied > told {
                send_msg(&send, &Message::AppliedAck { through: applied }).await?;
                told = applied;
            }
            tokio::select! {
                _ = freed => {}
                _ = tokio::time::sleep(Duration::from_millis(500)) => {}
            }
        }
    };
    tokio::pin!(relay);
    loop {
        // `read_msg` is not cancel-safe: the relay runs beside it and never interrupts a frame.
        // Only the relay or a cancellation can interrupt it, and both end the session.
        let msg = tokio::select! {
            m = wire::read_msg(&mut recv) => m?,
            r = &mut relay => return r,
            _ = token.cancelled() => bail!("{key}: a newer session of the same agent disk took over"),
        };
        let mut batch = match msg {
            None => return Ok(()),
            Some(Message::Batch(b)) => b,
            Some(other) => bail!("expected Batch, got {}", other.kind()),
        };
        let frame_bytes = batch.payload_bytes();
        if batch.item != item || batch.disk != disk || batch.disk_size != disk_size {
            bail!("batch for item {} disk {} arrived on the stream of {key}", batch.item, batch.disk);
        }
        batch.check()?;
        metrics::counter!(m::BYTES_IN).increment(frame_bytes);
        metrics::counter!(m::BATCHES_IN).increment(1);
        if batch.last < next {
            metrics::counter!(m::DUPLICATES).increment(1);
            send_msg(&send, &Message::DurableAck { through: Seq(next.0 - 1) }).await?;
            continue;
        }
        if batch.first > next {
            return Err(sr_common::wire::Coded::new(
                sr_common::wire::ErrorCode::ChainBroken,
                format!("{key}: gap: expected seq {next}, batch starts at {}; the disk needs a resync", batch.first),
            )
            .into());
        }
        if batch.first < next {
            let skip = (next.0 - batch.first.0) as usize;
            batch.changes.drain(..skip);
            batch.first = next;
        }
        while server.cache_total.load(Ordering::Relaxed) >= server.cfg.cache_limit_bytes {
            metrics::counter!(m::BACKPRESSURE).increment(1);
            let freed = stream.freed.notified();
            tokio::select! {
                _ = freed => {}
                _ = tokio::time::sleep(Duration::from_millis(200)) => {}
                _ = token.cancelled() => bail!("{key}: a newer session took over"),
            }
        }
        let last = batch.last;
        let s = stream.clone();
        let span = tracing::info_span!(
            "cache_batch",
            item = key.item.0,
            disk = key.disk.0,
            first = batch.first.0,
            last = last.0
        );
        tokio::task::spawn_blocking(move || span.in_scope(|| s.cache.put(&batch)))
            .await
            .context("cache writer panicked")?
            .with_context(|| format!("{key}: writing batch ..={last} to the cache"))?;
        metrics::gauge!(m::CACHE_BYTES).set(server.cache_total.load(Ordering::Relaxed) as f64);
        stream.cached_through(last);
        next = last.next();
        send_msg(&send, &Message::DurableAck { through: last }).await?;
    }
}

pub type StreamRef = Arc<Stream>;
