//! Agent-facing side: receive batches, make them durable in the cache, acknowledge them.
//!
//! ```text
//! agent --Hello, Open{item,disk,size}--> check item key, find or create stream, wait until the
//!        replica position is known --Resume{next}--> agent
//! agent --Batch--> validate --> drop duplicate prefix --> wait while the cache is full --> zero writes
//!       become markers --> zstd --> AES-GCM --> cache.put (fsync) --> DurableAck{last} --> wake forwarder
//! ```

use crate::metrics as m;
use crate::stream::Stream;
use crate::Server;
use anyhow::{bail, Context};
use sr_common::stream::{Offer, OverlapRule, Receiver};
use sr_common::tls::Peer;
use sr_common::types::StreamKey;
use sr_common::wire::{self, Message, Role};
use std::sync::Arc;
use std::time::Duration;

/// How long an agent waits for a new stream's replica position before it is told to retry.
const POSITION_WAIT: Duration = Duration::from_secs(20);

/// How often a batch is tried again on a full cache volume when nothing this server does frees space.
const VOLUME_FULL_RETRY: Duration = Duration::from_secs(2);

/// Writes a message on a send stream shared by the session and its applied-position relay.
async fn send_msg(send: &tokio::sync::Mutex<&mut quinn::SendStream>, msg: &Message) -> anyhow::Result<()> {
    wire::write_msg(&mut **send.lock().await, msg).await?;
    Ok(())
}

pub async fn session(
    server: &Arc<Server>,
    send: &mut quinn::SendStream,
    mut recv: quinn::RecvStream,
    peer: &Peer,
) -> anyhow::Result<()> {
    let node =
        sr_common::quic::answer_session(send, &mut recv, Role::Agent, Role::ProcessServer, &server.cfg.node).await?;
    let (item, disk, disk_size, tree) = match wire::expect_msg(&mut recv).await? {
        Message::Open { item, disk, disk_size } => (item, disk, disk_size, None),
        Message::TreeOpen { item, disk, disk_size, block } => (item, disk, disk_size, Some(block)),
        other => bail!("expected Open or TreeOpen, got {}", other.kind()),
    };
    let not_assigned = |why: String| -> anyhow::Error {
        sr_common::wire::Coded::new(sr_common::wire::ErrorCode::NotAssigned, why).into()
    };
    let Some(route) = server.route(item) else {
        return Err(not_assigned(format!(
            "item {item} is not assigned to process server {} (not in its [[item]] list or assignments)",
            server.cfg.node
        )));
    };
    if let Some(agent) = route.agent.as_deref().filter(|a| *a != peer.name) {
        return Err(not_assigned(format!(
            "item {item} is replicated from agent {agent}, not from {} (the name in its certificate)",
            peer.name
        )));
    }
    if let Some(block) = tree {
        return crate::relay::session(server, send, recv, (item, disk, disk_size, block)).await;
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
    let mut receiver = Receiver::new(stream.next(), OverlapRule::Trim);
    tracing::info!(%key, node, next = receiver.next().0, "agent stream open");
    wire::write_msg(send, &Message::Resume { next: receiver.next() }).await?;
    wire::write_msg(send, &Message::AppliedAck { through: stream.applied() }).await?;
    let send = tokio::sync::Mutex::new(send);
    // Relays the master target's applied position to the agent, which trims its journal on it.
    let relay = async {
        let mut told = stream.applied();
        loop {
            // Created before the look: `set_applied` wakes every waiter that exists when it runs.
            let freed = stream.freed.notified();
            let applied = stream.applied();
            if applied > told {
                send_msg(&send, &Message::AppliedAck { through: applied }).await?;
                told = applied;
            }
            freed.await;
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
        match receiver.offer(batch.first, batch.last).with_context(|| format!("{key}: batch from the agent"))? {
            Offer::Replay { through } => {
                metrics::counter!(m::DUPLICATES).increment(1);
                send_msg(&send, &Message::DurableAck { through }).await?;
                continue;
            }
            Offer::Take { skip } => {
                batch.changes.drain(..skip);
                batch.first = receiver.next();
            }
        }
        loop {
            let freed = server.cache_total.freed();
            if server.cache_total.used() < server.cfg.cache_limit_bytes {
                break;
            }
            metrics::counter!(m::BACKPRESSURE).increment(1);
            tokio::select! {
                _ = freed => {}
                _ = token.cancelled() => bail!("{key}: a newer session took over"),
            }
        }
        let last = batch.last;
        let span = tracing::info_span!(
            "cache_batch",
            item = key.item.0,
            disk = key.disk.0,
            first = batch.first.0,
            last = last.0
        );
        // Sealed now, so the cache holds nothing in clear; under the item's key as it is now (the
        // configuration server may have rotated it since the session began).
        let now_route =
            server.route(item).with_context(|| format!("{key}: no longer assigned to this process server"))?;
        let sealed = tokio::task::spawn_blocking({
            let (key, level, span) = (now_route.key.clone(), now_route.compression_level, span.clone());
            move || span.in_scope(|| crate::cache::seal_batch(&key, level, batch))
        })
        .await
        .context("sealing task panicked")?
        .with_context(|| format!("{key}: sealing a batch"))?;
        metrics::counter!(m::PAYLOAD_BYTES).increment(sealed.1);
        let mut batch = Some(sealed.0);
        let mut full_since = None;
        loop {
            let freed = server.cache_total.freed();
            let (s, b, span) = (stream.clone(), batch.take().expect("the batch is back"), span.clone());
            let (b, put) = tokio::task::spawn_blocking(move || {
                let r = span.in_scope(|| s.cache.put(&b));
                (b, r)
            })
            .await
            .context("cache writer panicked")?;
            match put {
                Ok(()) => break,
                // A full cache volume holds the agent back like the cache limit does: the session
                // stays up and the batch is written once space is freed (by the forwarder, or by
                // an operator, which only the retry interval notices).
                Err(e) if e.kind() == std::io::ErrorKind::StorageFull => {
                    metrics::counter!(m::BACKPRESSURE).increment(1);
                    if full_since.is_none() {
                        tracing::warn!(%key, "the cache volume is full; holding the agent back until space is freed");
                        full_since = Some(std::time::Instant::now());
                    }
                    // Written again only once the volume has room for it (a partial write would fill the
                    // volume for everyone sharing it), and only while the item is still carried here.
                    let need = b.ciphertext.len() as u64 + 4096;
                    batch = Some(b);
                    let mut freed = std::pin::pin!(freed);
                    loop {
                        tokio::select! {
                            _ = &mut freed => {}
                            _ = tokio::time::sleep(VOLUME_FULL_RETRY) => {}
                            _ = token.cancelled() => bail!("{key}: a newer session took over"),
                        }
                        metrics::counter!(m::BACKPRESSURE).increment(1);
                        if server.route(item).is_none() {
                            bail!("{key}: no longer assigned to this process server");
                        }
                        if sr_common::control::free_bytes(&server.cfg.data_dir) > need {
                            break;
                        }
                        freed.set(server.cache_total.freed());
                    }
                }
                Err(e) => {
                    return Err(anyhow::Error::new(e).context(format!("{key}: writing batch ..={last} to the cache")))
                }
            }
        }
        if let Some(since) = full_since {
            tracing::info!(%key, waited = ?since.elapsed(), "the cache volume has space again");
        }
        metrics::gauge!(m::CACHE_BYTES).set(server.cache_total.used() as f64);
        stream.cached_through(last);
        let through = receiver.taken(last);
        send_msg(&send, &Message::DurableAck { through }).await?;
    }
}

pub type StreamRef = Arc<Stream>;
