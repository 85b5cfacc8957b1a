//! Process-server-facing side: verify sealed batches and apply them in order, exactly once.
//!
//! ```text
//! PS --Hello, Open{item,disk,size}--> replica (created sparse on first use) --Resume{applied+1}--> PS
//! PS --Sealed--> header for this disk? --> last <= applied: duplicate, re-ack, nothing applied
//!                                      --> first != applied+1: out of order, refused, stream closed
//!             --> AES-GCM open (else refused) --> decompress + validate --> apply, fsync, record
//!             --> AppliedAck{last}
//! ```

use crate::metrics as m;
use crate::Server;
use anyhow::{bail, Context};
use sr_common::compress;
use sr_common::stream::{Offer, OverlapRule, Receiver};
use sr_common::types::StreamKey;
use sr_common::wire::{self, Message, Role};
use std::sync::Arc;

fn reject(reason: &'static str) {
    metrics::counter!(m::REJECTED, "reason" => reason).increment(1);
}

pub async fn session(
    server: &Arc<Server>,
    send: &mut quinn::SendStream,
    mut recv: quinn::RecvStream,
) -> anyhow::Result<()> {
    let node =
        sr_common::quic::answer_session(send, &mut recv, Role::ProcessServer, Role::MasterTarget, &server.cfg.node)
            .await?;
    let (item, disk, disk_size) = match wire::expect_msg(&mut recv).await? {
        Message::Open { item, disk, disk_size } => (item, disk, disk_size),
        Message::TreeOpen { item, disk, disk_size, block } => {
            return crate::tree::session(server, send, recv, StreamKey { item, disk }, disk_size, block).await;
        }
        other => bail!("expected Open or TreeOpen, got {}", other.kind()),
    };
    let Some(mut item_key) = server.item_key(item) else {
        return Err(sr_common::wire::Coded::new(
            sr_common::wire::ErrorCode::NotConfigured,
            format!(
                "item {item} is not configured on master target {}: add its key to the [[item]] list",
                server.cfg.node
            ),
        )
        .into());
    };
    let key = StreamKey { item, disk };
    let replica = server.replica(key, disk_size)?;
    let token = tokio_util::sync::CancellationToken::new();
    if let Some(old) = replica.session.lock().expect("session lock poisoned").replace(token.clone()) {
        old.cancel();
    }
    // The replica's applied position is the durable state; the receiver mirrors it for this session.
    let mut receiver = Receiver::new(replica.applied().next(), OverlapRule::Refuse);
    tracing::info!(%key, node, next = receiver.next().0, "process server stream open");
    wire::write_msg(send, &Message::Resume { next: receiver.next() }).await?;
    loop {
        let msg = tokio::select! {
            m = wire::read_msg(&mut recv) => m.inspect_err(|_| reject("malformed"))?,
            _ = token.cancelled() => bail!("{key}: a newer session took over"),
        };
        let sealed = match msg {
            None => return Ok(()),
            Some(Message::Sealed(s)) => s,
            Some(other) => {
                reject("unexpected");
                bail!("expected Sealed, got {}", other.kind())
            }
        };
        metrics::counter!(m::BYTES_IN).increment(sealed.ciphertext.len() as u64);
        if sealed.item != item || sealed.disk != disk || sealed.disk_size != disk_size {
            reject("wrong-stream");
            bail!(
                "batch for item {} disk {} ({} bytes) arrived on the stream of {key} ({disk_size} bytes)",
                sealed.item,
                sealed.disk,
                sealed.disk_size
            );
        }
        // An older session's batch may have finished applying after this session began.
        receiver.advance(replica.applied().next());
        match receiver.offer(sealed.first, sealed.last) {
            Ok(Offer::Take { .. }) => {}
            Ok(Offer::Replay { through }) => {
                reject("duplicate");
                metrics::counter!(m::DUPLICATES).increment(1);
                tracing::warn!(%key, first = sealed.first.0, last = sealed.last.0, applied = through.0, "batch already applied (replayed); ignored");
                wire::write_msg(send, &Message::AppliedAck { through }).await?;
                continue;
            }
            Err(e) => {
                reject("out-of-order");
                return Err(anyhow::Error::new(e).context(format!("{key}: nothing applied")));
            }
        }
        let sealed_last = sealed.last;
        // A batch of a key epoch not assigned here yet (the key was just rotated): retried once the
        // assignment with the new epoch arrives. Anything else that does not open is tampering.
        if !item_key.epochs().contains(&sealed.epoch) {
            // The key was rotated since the session began: take the item's keys as they are now.
            if let Some(k) = server.item_key(item) {
                item_key = k;
            }
        }
        let plain = item_key.open(&sealed).inspect_err(|e| {
            reject(match e {
                sr_common::seal::SealError::UnknownEpoch { .. } => "unknown_key_epoch",
                _ => "authentication",
            })
        })?;
        metrics::gauge!(m::KEY_EPOCH, "item" => key.item.0.to_string()).set(sealed.epoch as f64);
        let r = replica.clone();
        let store = server.store.clone();
        let started = std::time::Instant::now();
        let span = tracing::info_span!(
            "apply_batch",
            item = key.item.0,
            disk = key.disk.0,
            first = sealed.first.0,
            last = sealed.last.0,
            ciphertext_bytes = sealed.ciphertext.len()
        );
        let (bytes, stop_mark) = tokio::task::spawn_blocking(move || -> anyhow::Result<(u64, bool)> {
            let _in = span.enter();
            let batch = compress::decompress(&plain).inspect_err(|_| reject("malformed"))?;
            if batch.item != sealed.item
                || batch.disk != sealed.disk
                || batch.first != sealed.first
                || batch.last != sealed.last
                || batch.disk_size != sealed.disk_size
            {
                reject("header-mismatch");
                bail!("sealed header and batch contents disagree");
            }
            batch.check().inspect_err(|_| reject("invalid"))?;
            Ok((r.apply(&batch, store.as_ref())?, batch.has_stop_mark()))
        })
        .await
        .context("apply task panicked")??;
        metrics::histogram!(m::APPLY_SECONDS).record(started.elapsed().as_secs_f64());
        metrics::counter!(m::APPLIED_BYTES).increment(bytes);
        metrics::counter!(m::BATCHES).increment(1);
        let through = receiver.taken(sealed_last);
        debug_assert_eq!(through, replica.applied(), "the replica recorded the batch");
        wire::write_msg(send, &Message::AppliedAck { through }).await?;
        if stop_mark {
            // A planned failover waits for this position: report it now, not at the next poll.
            server.report_now.notify_one();
        }
    }
}
