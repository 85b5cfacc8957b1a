//! Checksum trees of a replica, for a resync's comparison (the agent asks, through its process
//! server; see `sr_common::merkle`). The tree of the region asked about is built once and kept while
//! the agent walks it; blocks are read a piece at a time under the replica's gate, so each piece is the
//! replica at some applied sequence number while replication goes on.
//!
//! ```text
//! PS --TreeOpen{item,disk,size,block}--> check item, replica --TreeHashes{[]} (ready)
//! PS --TreeQuery{region,level,first,count}--> build region tree (cached) --TreeHashes{nodes}
//! ```

use crate::Server;
use anyhow::bail;
use sr_common::merkle::Tree;
use sr_common::types::StreamKey;
use sr_common::wire::{self, Message};
use std::sync::Arc;

/// Largest region one query may name, and most nodes one answer may carry.
const MAX_REGION: u64 = 1 << 30;
const MAX_NODES: u64 = 1 << 20;

pub async fn session(
    server: &Arc<Server>,
    send: &mut quinn::SendStream,
    mut recv: quinn::RecvStream,
    key: StreamKey,
    disk_size: u64,
    block: u32,
) -> anyhow::Result<()> {
    if server.item_key(key.item).is_none() {
        return Err(sr_common::wire::Coded::new(
            sr_common::wire::ErrorCode::NotAssigned,
            format!("item {} is not assigned to master target {}", key.item, server.cfg.node),
        )
        .into());
    }
    let block = u64::from(block);
    if !(512..=1 << 20).contains(&block) || !block.is_power_of_two() {
        bail!("{key}: block size {block} must be a power of two from 512 to 1 MiB");
    }
    // A replica that does not exist yet is created empty: everything then differs.
    let replica = server.replica(key, disk_size)?;
    wire::write_msg(send, &Message::TreeHashes { hashes: Vec::new() }).await?;
    tracing::info!(%key, block, "checksum comparison open");
    let mut cached: Option<((u64, u64), Arc<Tree>)> = None;
    loop {
        let (offset, len, level, first, count) = match wire::read_msg(&mut recv).await? {
            None => return Ok(()),
            Some(Message::TreeQuery { offset, len, level, first, count }) => (offset, len, level, first, count),
            Some(other) => bail!("expected TreeQuery, got {}", other.kind()),
        };
        if len == 0 || len > MAX_REGION || offset.checked_add(len).is_none_or(|e| e > disk_size) || count > MAX_NODES {
            let message = format!("{key}: query of {count} nodes of region {offset}+{len} is out of bounds");
            wire::write_msg(send, &Message::Error { code: wire::ErrorCode::Transient, message: message.clone() })
                .await?;
            bail!(message);
        }
        let tree = match &cached {
            Some((r, t)) if *r == (offset, len) => t.clone(),
            _ => {
                let r = replica.clone();
                let t = tokio::task::spawn_blocking(move || {
                    Tree::build(&r.disk, offset, len, block, &|o, buf| {
                        let _g = r.gate.read().expect("replica gate poisoned");
                        r.disk.read_at(o, buf)
                    })
                })
                .await??;
                metrics::counter!(crate::metrics::HASHED_BYTES).increment(len);
                let t = Arc::new(t);
                cached = Some(((offset, len), t.clone()));
                t
            }
        };
        let hashes = tree.nodes(level as usize, first, count).to_vec();
        wire::write_msg(send, &Message::TreeHashes { hashes }).await?;
    }
}
