//! The control contract between the configuration server and its components, as typed structs both
//! sides share: what a component reports in its heartbeat, and what each role is assigned.
//!
//! ```text
//! agent / process server / master target --POST /v1/heartbeat {Heartbeat}--> configuration server
//! agent / process server / master target <--GET /v1/assignments {Assignments<role's type>}--
//! ```
//!
//! The JSON shape is the wire format (field names are the API's); a field added here must default so
//! that an older peer's message still reads.

use crate::types::{DiskId, ItemId};
use crate::wire::ErrorCode;
use serde::{Deserialize, Serialize};

/// Something a component cannot get past by retrying: a typed code and the reason for the operator.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Fault {
    pub code: ErrorCode,
    pub reason: String,
}

/// A stream's fault at a process server or master target (`item` is the stream's wire id).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ReplicaFault {
    pub item: u64,
    pub disk: u64,
    pub code: ErrorCode,
    pub reason: String,
}

/// How busy a component is.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct Load {
    /// Bytes waiting in a process server's cache.
    #[serde(default)]
    pub cache_bytes: u64,
    /// Bytes per second of changes flowing through.
    #[serde(default)]
    pub churn_bytes_per_sec: u64,
    /// Free bytes for replicas on a master target.
    #[serde(default)]
    pub free_bytes: u64,
}

/// One disk of a protected machine.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct DiskInfo {
    pub id: u64,
    pub name: String,
    pub size: u64,
    /// Where the disk lives on its machine (a reprotect replicates back into it).
    #[serde(default)]
    pub path: Option<String>,
}

/// What a machine is made of, for the machine description a failover produces.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct SystemInfo {
    pub cpus: u32,
    pub memory_bytes: u64,
    #[serde(default)]
    pub nics: Vec<Nic>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Nic {
    pub name: String,
    #[serde(default)]
    pub mac: String,
    /// Addresses with prefix length ("10.0.0.5/24").
    #[serde(default)]
    pub addresses: Vec<String>,
}

/// Replication progress of one disk, as its agent reports it.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct DiskProgress {
    pub id: u64,
    pub copy_percent: f64,
    pub copy_done: bool,
    /// Sequence number of the initial-copy-done marker (0 until then).
    #[serde(default)]
    pub done_seq: u64,
    pub last_seq: u64,
    /// Bytes of blocks the replica may lack (journal overflow or a checksum comparison).
    #[serde(default)]
    pub dirty_bytes: u64,
    /// A checksum comparison is running, and how far it got.
    #[serde(default)]
    pub resync_active: bool,
    #[serde(default)]
    pub compare_percent: f64,
    /// Dirty blocks wait for the policy's resync window.
    #[serde(default)]
    pub resync_waiting: bool,
    /// The latest resync request the agent finished comparing for.
    #[serde(default)]
    pub resync_done: u64,
    /// The journal is over its limit: changes are tracked in the dirty map.
    #[serde(default)]
    pub overflow: bool,
    /// Bytes the journal holds, and its limit: the headroom before changes go to the dirty map.
    #[serde(default)]
    pub journal_bytes: u64,
    #[serde(default)]
    pub journal_limit_bytes: u64,
    /// The failover generation the disk parted at (0: none), whether a planned failover stopped it, and
    /// the sequence number of its final marker.
    #[serde(default)]
    pub generation: u64,
    #[serde(default)]
    pub stopped: bool,
    #[serde(default)]
    pub stop_seq: u64,
    /// Shipping stopped for good, and why.
    #[serde(default)]
    pub fatal: Option<Fault>,
}

/// A disk's applied position, as its master target reports it.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct AppliedSeq {
    pub item: u64,
    pub disk: u64,
    pub seq: u64,
}

/// Something a component has to tell operators (a failed hook, ...).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ComponentEvent {
    /// `info`, `warning` or `critical`.
    pub severity: String,
    pub message: String,
}

/// A component's periodic report. Every part is optional: each role sends what it has.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Heartbeat {
    /// Where peers reach it (QUIC), when it serves.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub address: Option<String>,
    /// An agent's disks.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub disks: Option<Vec<DiskInfo>>,
    /// An agent's replication progress per disk.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub progress: Option<Vec<DiskProgress>>,
    /// A master target's applied positions.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub applied: Option<Vec<AppliedSeq>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub load: Option<Load>,
    /// The component's HTTP address (a master target's recovery points and views are there).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub http: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub system: Option<SystemInfo>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub events: Vec<ComponentEvent>,
    /// A process server's or master target's streams that cannot go on by retrying.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub faults: Option<Vec<ReplicaFault>>,
    /// A process server's seals per item under the current key epoch.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub seals: Vec<SealCount>,
}

/// The answer to `GET /v1/assignments`, for the role the caller's token has.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Assignments<T> {
    pub items: Vec<T>,
}

/// What an agent is told to do with its disks.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct AgentAssignment {
    pub item: ItemId,
    /// The process server to ship to (its QUIC address).
    pub process_server: String,
    /// Stop for the planned failover of this generation: seal, write a final marker, stop.
    #[serde(default)]
    pub stop: Option<u64>,
    /// Replicate back after the failover of this generation (reprotect): start from this baseline.
    #[serde(default)]
    pub baseline: Option<u64>,
    #[serde(default)]
    pub crash_interval_secs: Option<u64>,
    #[serde(default)]
    pub app_interval_secs: Option<u64>,
    #[serde(default)]
    pub journal_limit_percent: Option<u8>,
    /// A resync is asked for: compare checksums, counted so the agent knows when one is new.
    #[serde(default)]
    pub resync_request: u64,
    /// The policy's daily window ("HH:MM-HH:MM") for resync copies; none: any time.
    #[serde(default)]
    pub resync_window: Option<String>,
}

/// What a process server carries for one item.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ProcessServerAssignment {
    pub item: ItemId,
    /// The epochs of the item's data key: the newest seals, the others open what is still cached.
    pub keys: Vec<EpochKey>,
    /// The master target to forward to (its QUIC address).
    pub master_target: String,
    pub compression_level: i32,
    /// 0: no limit.
    #[serde(default)]
    pub bandwidth_limit_mbps: u64,
    /// The agent (its certificate's name) whose batches and checksum queries for this item the
    /// process server takes; any other agent is refused.
    pub agent: String,
}

/// One epoch of an item's data key.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct EpochKey {
    pub epoch: u32,
    /// The key, hex.
    pub key: String,
}

/// What a process server has sealed under an item's current key epoch (reported in heartbeats, so
/// the configuration server rotates the key long before a key seals too much).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct SealCount {
    pub item: ItemId,
    pub epoch: u32,
    pub seals: u64,
}

/// A disk a master target replicates into in place (reprotect: the old source disk).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct AdoptDisk {
    pub disk: DiskId,
    pub path: String,
}

/// What a master target holds for one item.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct MasterTargetAssignment {
    pub item: ItemId,
    /// The epochs of the item's data key a batch may come sealed under.
    pub keys: Vec<EpochKey>,
    /// How long recovery points are kept (0: the master target's default).
    #[serde(default)]
    pub retention_secs: u64,
    #[serde(default)]
    pub adopt: Option<Vec<AdoptDisk>>,
}

/// Which point of an item to use: what an operator asks for, the configuration server records, and
/// the master target resolves.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub enum PointSpec {
    /// The newest point every disk of the item has reached.
    Latest,
    /// The newest app-consistent point present on every disk.
    LatestAppConsistent,
    /// The newest named point (app- or crash-consistent bookmark) present on every disk.
    LatestBookmark,
    /// The state at this instant (µs since the Unix epoch): the last change captured at or before it.
    TimeUs(u64),
    /// The state at this instant (RFC 3339).
    Time(String),
    /// A sequence number; only for an item with a single disk.
    Seq(u64),
    /// A named point (its tag).
    Tag(String),
}

/// One disk of a view, as the master target describes it.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct ViewDisk {
    pub disk: u64,
    pub seq: u64,
    /// The capture time of the point (RFC 3339), when known.
    #[serde(default)]
    pub time: Option<String>,
    #[serde(default)]
    pub at_us: Option<u64>,
    pub export: String,
    pub size: u64,
    /// Where a client reaches it (`nbds://...`: NBD over TLS with a client certificate of the
    /// deployment CA in the NBD-client role), when the master target serves NBD over TCP.
    #[serde(default)]
    pub uri: Option<String>,
}

/// A view of an item at a point, as the master target answers `POST /v1/views` and `GET /v1/views`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct ViewInfo {
    pub name: String,
    pub item: u64,
    pub writable: bool,
    pub point: PointSpec,
    pub created: String,
    pub disks: Vec<ViewDisk>,
}

/// `GET /v1/views` of a master target.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct ViewList {
    pub views: Vec<ViewInfo>,
}

/// One disk a failover commit handed over, as a plain file.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct CommittedDisk {
    pub disk: u64,
    pub path: String,
    pub generation: u64,
    pub changed_bytes: u64,
    pub size: u64,
}

/// The master target's answer to `POST /v1/commit`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct CommitAnswer {
    pub view: String,
    pub disks: Vec<CommittedDisk>,
}

/// An item's data key from its hex form in an assignment.
pub fn data_key(item: ItemId, hex_key: &str) -> anyhow::Result<crate::seal::ItemKey> {
    let key: [u8; 32] = hex::decode(hex_key)
        .ok()
        .and_then(|k| k.try_into().ok())
        .ok_or_else(|| anyhow::anyhow!("the data key of item {item} is not 32 bytes of hex"))?;
    Ok(crate::seal::ItemKey::from_bytes(&key))
}

/// An item's key epochs from an assignment.
pub fn item_keys(item: ItemId, keys: &[EpochKey]) -> anyhow::Result<crate::seal::ItemKeys> {
    let epochs = keys.iter().map(|k| Ok((k.epoch, data_key(item, &k.key)?))).collect::<anyhow::Result<Vec<_>>>()?;
    crate::seal::ItemKeys::new(epochs)
        .ok_or_else(|| anyhow::anyhow!("the assignment of item {item} carries no data key"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn heartbeats_carry_only_what_a_role_has_and_refuse_unknown_fields() {
        let hb = Heartbeat { address: Some("127.0.0.1:1".into()), ..Default::default() };
        assert_eq!(serde_json::to_string(&hb).unwrap(), r#"{"address":"127.0.0.1:1"}"#);
        let back: Heartbeat = serde_json::from_str(r#"{"address":"127.0.0.1:1"}"#).unwrap();
        assert_eq!(back, hb);
        assert!(serde_json::from_str::<Heartbeat>(r#"{"adress":"x"}"#).is_err());
    }

    #[test]
    fn assignments_read_as_the_configuration_server_writes_them() {
        let a: Assignments<AgentAssignment> = serde_json::from_str(
            r#"{"items":[{"item":7,"process_server":"127.0.0.1:9","stop":null,"baseline":3,
               "crash_interval_secs":300,"app_interval_secs":null,"journal_limit_percent":50,
               "resync_request":2,"resync_window":null}]}"#,
        )
        .unwrap();
        assert_eq!(a.items[0].item, ItemId(7));
        assert_eq!(a.items[0].baseline, Some(3));
        let mt: MasterTargetAssignment = serde_json::from_str(
            r#"{"item":1,"keys":[{"epoch":0,"key":"00"}],"retention_secs":60,"adopt":[{"disk":2,"path":"/d"}]}"#,
        )
        .unwrap();
        assert_eq!(mt.adopt.unwrap()[0].disk, DiskId(2));
        assert!(data_key(ItemId(1), "00").is_err());
        assert!(data_key(ItemId(1), &"ab".repeat(32)).is_ok());
        assert!(item_keys(ItemId(1), &[]).is_err());
        let keys = [EpochKey { epoch: 3, key: "ab".repeat(32) }, EpochKey { epoch: 4, key: "cd".repeat(32) }];
        assert_eq!(item_keys(ItemId(1), &keys).unwrap().current_epoch(), 4);
    }
}
