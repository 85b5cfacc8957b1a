//! Relays a resync's checksum comparison between an agent and the item's master target: the agent
//! asks for nodes of the replica's checksum trees, the master target answers. Only `TreeQuery` goes
//! one way and `TreeHashes` or `Error` the other; anything else ends the relay.
//!
//! ```text
//! agent --TreeOpen--> check route --> master target: Hello, TreeOpen --> TreeHashes (ready) --> agent
//! agent --TreeQuery--> master target --TreeHashes--> agent        (one at a time)
//! ```

use crate::metrics as m;
use crate::Server;
use anyhow::bail;
use sr_common::types::{DiskId, ItemId};
use sr_common::wire::{self, Message};
use std::sync::Arc;

pub async fn session(
    server: &Arc<Server>,
    send: &mut quinn::SendStream,
    mut recv: quinn::RecvStream,
    open: (ItemId, DiskId, u64, u32),
) -> anyhow::Result<()> {
    let (item, disk, disk_size, block) = open;
    let route = server.route(item).ok_or_else(|| {
        sr_common::wire::Coded::new(
            sr_common::wire::ErrorCode::NotAssigned,
            format!(
                "item {item} is not assigned to process server {} (not in its [[item]] list or assignments)",
                server.cfg.node
            ),
        )
    })?;
    let (mut mt_send, mut mt_recv) = crate::forward::open_to_master_target(server, route.master_target).await?;
    wire::write_msg(&mut mt_send, &Message::TreeOpen { item, disk, disk_size, block }).await?;
    let relayed = metrics::counter!(m::CHECKSUM_BYTES);
    let mut answer = wire::expect_msg(&mut mt_recv).await?;
    loop {
        match answer {
            Message::TreeHashes { .. } | Message::Error { .. } => {
                let is_error = matches!(answer, Message::Error { .. });
                relayed.increment(wire::write_msg(send, &answer).await? as u64);
                if is_error {
                    return Ok(());
                }
            }
            other => bail!("unexpected {} from the master target in a checksum comparison", other.kind()),
        }
        let query = match wire::read_msg(&mut recv).await? {
            None => {
                let _ = mt_send.finish();
                return Ok(());
            }
            Some(q @ Message::TreeQuery { .. }) => q,
            Some(other) => bail!("expected TreeQuery from the agent, got {}", other.kind()),
        };
        relayed.increment(wire::write_msg(&mut mt_send, &query).await? as u64);
        answer = wire::expect_msg(&mut mt_recv).await?;
    }
}
