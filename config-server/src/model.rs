//! The documents the configuration server keeps, one collection each.

use crate::lifecycle::State;
use serde::{Deserialize, Serialize};
pub use sr_common::contract::{
    AdoptDisk, AppliedSeq, CommittedDisk, DiskInfo, DiskProgress, Fault, Load, Nic, PointSpec, ReplicaFault, SystemInfo,
};

pub const TOKENS: &str = "tokens";
pub const KEYS: &str = "registration_keys";
pub const COMPONENTS: &str = "components";
pub const MACHINES: &str = "machines";
pub const POLICIES: &str = "policies";
pub const ITEMS: &str = "items";
pub const JOBS: &str = "jobs";
pub const EVENTS: &str = "events";
pub const PLANS: &str = "plans";
pub const NETWORK_MAPPINGS: &str = "network_mappings";
/// Counter of the ids replication streams carry on the wire (one per direction of an item).
pub const STREAMS: &str = "streams";
/// Stream ids start here, above any item id, so the two never meet.
pub const STREAM_BASE: u64 = 1 << 32;
/// Applied positions by "item-disk", from master-target heartbeats.
pub const APPLIED: &str = "applied";
/// Replica faults by master-target name (the whole list of its latest heartbeat).
pub const FAULTS: &str = "faults";

/// What an API token may do. Each role may do everything the ones before it may.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ApiRole {
    Reader,
    Operator,
    Admin,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Token {
    pub id: String,
    pub name: String,
    pub role: ApiRole,
    /// SHA-256 of the secret, hex. The secret itself is shown once, at creation.
    pub hash: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ComponentRole {
    Agent,
    ProcessServer,
    MasterTarget,
    /// A client of the master targets' NBD exports: it holds a certificate (so it can be revoked)
    /// and takes part in no replication.
    NbdClient,
}

impl ComponentRole {
    pub fn wire(self) -> sr_common::wire::Role {
        match self {
            ComponentRole::Agent => sr_common::wire::Role::Agent,
            ComponentRole::ProcessServer => sr_common::wire::Role::ProcessServer,
            ComponentRole::MasterTarget => sr_common::wire::Role::MasterTarget,
            ComponentRole::NbdClient => sr_common::wire::Role::NbdClient,
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RegistrationKey {
    pub id: String,
    pub hash: String,
    pub role: ComponentRole,
    /// Unix seconds after which the key is refused.
    pub expires_at: u64,
    /// The component that used the key; a key works once.
    pub used_by: Option<String>,
}

impl RegistrationKey {
    /// An unused key for `secret`: kept as its hash, known by the hash's first 12 hex digits.
    pub fn new(secret: &str, role: ComponentRole, expires_at: u64) -> RegistrationKey {
        let hash = sr_common::register::secret_hash(secret);
        RegistrationKey { id: hash[..12].to_string(), hash, role, expires_at, used_by: None }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Component {
    pub name: String,
    pub role: ComponentRole,
    /// Serial number of its certificate (for revocation).
    pub serial: u64,
    pub registered_at: u64,
    pub last_heartbeat: Option<u64>,
    /// Where peers reach it (QUIC), when it serves.
    pub address: Option<String>,
    /// Its HTTP address, for the master target's recovery points and views.
    #[serde(default)]
    pub http: Option<String>,
    pub revoked: bool,
    #[serde(default)]
    pub load: Load,
    /// A process server being emptied for removal: it gets no new items.
    #[serde(default)]
    pub draining: bool,
}

/// A protected-machine candidate: what its agent reported.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Machine {
    pub name: String,
    pub disks: Vec<DiskInfo>,
    pub last_heartbeat: u64,
    #[serde(default)]
    pub progress: Vec<DiskProgress>,
    /// CPUs, memory and network interfaces, for the machine description a failover produces.
    #[serde(default)]
    pub system: Option<SystemInfo>,
}

pub const DEFAULT_RPO_SECS: u64 = 300;
pub const DEFAULT_RETENTION_HOURS: u64 = 24;
pub const DEFAULT_CRASH_INTERVAL_SECS: u64 = 300;
pub const DEFAULT_APP_INTERVAL_SECS: u64 = 3600;
pub const DEFAULT_JOURNAL_LIMIT_PERCENT: u8 = 50;

fn d_rpo() -> u64 {
    DEFAULT_RPO_SECS
}
fn d_retention() -> u64 {
    DEFAULT_RETENTION_HOURS
}
fn d_crash() -> u64 {
    DEFAULT_CRASH_INTERVAL_SECS
}
fn d_app() -> u64 {
    DEFAULT_APP_INTERVAL_SECS
}
fn d_journal() -> u8 {
    DEFAULT_JOURNAL_LIMIT_PERCENT
}
fn d_level() -> i32 {
    sr_common::compress::DEFAULT_LEVEL
}

/// A replication policy. Fields left out of a request take the defaults.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Policy {
    #[serde(default)]
    pub id: String,
    pub name: String,
    /// An alert fires when an item's recovery point is older than this.
    #[serde(default = "d_rpo")]
    pub rpo_threshold_secs: u64,
    #[serde(default = "d_retention")]
    pub retention_hours: u64,
    #[serde(default = "d_crash")]
    pub crash_consistent_interval_secs: u64,
    #[serde(default = "d_app")]
    pub app_consistent_interval_secs: u64,
    /// The agent's journal may take this share of the disk's size before a resync is needed.
    #[serde(default = "d_journal")]
    pub journal_limit_percent: u8,
    #[serde(default = "d_level")]
    pub compression_level: i32,
    /// 0: unlimited.
    #[serde(default)]
    pub bandwidth_limit_mbps: u64,
    /// Automatic resyncs (after the journal reached its limit) run only in this window, "HH:MM-HH:MM"
    /// UTC (it may wrap past midnight); empty: at once. An operator's resync always runs at once.
    #[serde(default)]
    pub resync_window: String,
}

impl Policy {
    pub fn validate(&self) -> Result<(), String> {
        let Policy {
            id: _,
            name,
            rpo_threshold_secs,
            retention_hours,
            crash_consistent_interval_secs,
            app_consistent_interval_secs,
            journal_limit_percent,
            compression_level,
            bandwidth_limit_mbps: _,
            resync_window,
        } = self;
        if !resync_window.is_empty() {
            sr_common::types::parse_daily_window(resync_window).map_err(|e| format!("resync_window: {e}"))?;
        }
        if name.trim().is_empty() || name.len() > 128 {
            return Err("name: 1 to 128 characters".into());
        }
        if *rpo_threshold_secs == 0 {
            return Err("rpo_threshold_secs: must be at least 1".into());
        }
        if *retention_hours == 0 || *retention_hours > 24 * 365 {
            return Err("retention_hours: 1 to 8760".into());
        }
        if *crash_consistent_interval_secs == 0 || *app_consistent_interval_secs == 0 {
            return Err("consistency intervals: must be at least 1 second".into());
        }
        if !(1..=100).contains(journal_limit_percent) {
            return Err("journal_limit_percent: 1 to 100".into());
        }
        if !(1..=19).contains(compression_level) {
            return Err("compression_level: 1 to 19".into());
        }
        Ok(())
    }
}

/// A protected item: one machine under a policy, with where its data flows.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Item {
    pub id: u64,
    pub machine: String,
    pub policy: String,
    pub state: State,
    pub process_server: Option<String>,
    pub master_target: Option<String>,
    /// The item's data key (hex), its current epoch; released only to its process server and master
    /// target, never shown by the operator API.
    pub data_key: String,
    /// The epoch of `data_key` (each rotation adds one).
    #[serde(default)]
    pub key_epoch: u32,
    /// Earlier epochs still held, so batches sealed under them (cached, in flight) still open.
    #[serde(default)]
    pub old_keys: Vec<sr_common::contract::EpochKey>,
    /// When the current epoch began (Unix seconds).
    #[serde(default)]
    pub key_since: u64,
    /// The enable-protection job, running until the item is protected.
    pub job: Option<u64>,
    pub created: u64,
    /// When the replica last held everything the source had written (from heartbeats).
    pub caught_up_at: Option<u64>,
    /// Whether an RPO alert is open (fired, not yet cleared).
    #[serde(default)]
    pub rpo_alert: bool,
    /// The running test failover: its view on the master target and the machine description.
    #[serde(default)]
    pub test_failover: Option<TestFailoverRecord>,
    /// The latest resync the operator asked for (an increasing id; 0: none), and its job.
    #[serde(default)]
    pub resync_request: u64,
    #[serde(default)]
    pub resync_job: Option<u64>,
    /// The id the item's data carries on the wire; each reprotect starts a new one (None: the item id).
    #[serde(default)]
    pub stream: Option<u64>,
    /// The failover under way or done: generation, planned, view, point, machine description, and after
    /// the commit the disks' paths.
    #[serde(default)]
    pub failover: Option<FailoverRecord>,
    /// The running reprotect: baseline generation, whether both sides' history is known, the disks the
    /// master target replicates into, its job.
    #[serde(default)]
    pub reprotect: Option<ReprotectRecord>,
    /// The machine on the other site (the source before the last reprotect).
    #[serde(default)]
    pub previous_machine: Option<String>,
    /// The master target on the other site (the target before the last reprotect).
    #[serde(default)]
    pub previous_master_target: Option<String>,
    /// Why replication is held up for now though it retries (a master target's full volume), as its
    /// components report it.
    #[serde(default)]
    pub problem: Option<String>,
    /// A gap in the stream's sequence numbers was reported: the next resync copies the whole disk into
    /// a new stream (comparing checksums cannot close a gap).
    #[serde(default)]
    pub chain_broken: bool,
    /// A move to another process server under way: its job, and when the assignment changed (the job
    /// ends once the replica caught up through the new one).
    #[serde(default)]
    pub moving: Option<MoveRecord>,
}

/// See [`Item::moving`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MoveRecord {
    pub job: u64,
    pub from: String,
    pub to: String,
    pub since: u64,
}

/// Earlier key epochs an item keeps.
pub const KEEP_KEY_EPOCHS: usize = 32;
/// A key epoch older than this is rotated.
pub const KEY_MAX_AGE_SECS: u64 = 7 * 24 * 3600;

/// Why an item's key needs a new epoch now: too old, or the process server reports that the current
/// epoch sealed [`sr_common::seal::ROTATE_AFTER_SEALS`] batches.
pub fn rotation_due(key_since: u64, now: u64, reported_seals: u64) -> Option<&'static str> {
    if reported_seals >= sr_common::seal::ROTATE_AFTER_SEALS {
        Some("its current key sealed enough batches")
    } else if now.saturating_sub(key_since) > KEY_MAX_AGE_SECS {
        Some("its current key is a week old")
    } else {
        None
    }
}

impl Item {
    /// A fresh data key, epoch 0, no earlier epochs (protection enabled, a new stream).
    pub fn new_data_key(&mut self, now: u64) {
        self.data_key = hex::encode(rand::random::<[u8; 32]>());
        self.key_epoch = 0;
        self.old_keys.clear();
        self.key_since = now;
    }

    /// The next epoch of the data key; the current one is kept (with at most [`KEEP_KEY_EPOCHS`]
    /// earlier ones) so what is sealed under it still opens.
    pub fn rotate_key(&mut self, now: u64) {
        self.old_keys.push(sr_common::contract::EpochKey { epoch: self.key_epoch, key: self.data_key.clone() });
        let over = self.old_keys.len().saturating_sub(KEEP_KEY_EPOCHS);
        self.old_keys.drain(..over);
        self.data_key = hex::encode(rand::random::<[u8; 32]>());
        self.key_epoch += 1;
        self.key_since = now;
    }

    /// Every epoch held, for an assignment.
    pub fn keys(&self) -> Vec<sr_common::contract::EpochKey> {
        let mut k = self.old_keys.clone();
        k.push(sr_common::contract::EpochKey { epoch: self.key_epoch, key: self.data_key.clone() });
        k
    }

    /// A new item of `machine` under `policy`, in `state`, placed nowhere yet.
    pub fn new(id: u64, machine: &str, policy: &str, state: State, created: u64) -> Item {
        Item {
            id,
            machine: machine.into(),
            policy: policy.into(),
            state,
            process_server: None,
            master_target: None,
            data_key: String::new(),
            key_epoch: 0,
            old_keys: Vec::new(),
            key_since: 0,
            job: None,
            created,
            caught_up_at: None,
            rpo_alert: false,
            test_failover: None,
            resync_request: 0,
            resync_job: None,
            stream: None,
            failover: None,
            reprotect: None,
            previous_machine: None,
            previous_master_target: None,
            problem: None,
            chain_broken: false,
            moving: None,
        }
    }

    /// The id its data carries on the wire.
    pub fn wire_id(&self) -> u64 {
        self.stream.unwrap_or(self.id)
    }
}

/// A recovery plan: machines (protected items) in ordered groups, with actions before and after each.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Plan {
    #[serde(default)]
    pub id: String,
    pub name: String,
    pub groups: Vec<PlanGroup>,
    /// A consistency point across every machine of the plan this often (0: only on demand and for a
    /// test failover); an unplanned failover of the plan goes to the latest by default.
    #[serde(default = "d_plan_interval")]
    pub consistency_interval_secs: u64,
}

fn d_plan_interval() -> u64 {
    300
}

/// A plan's latest consistency point, kept under the plan's id.
pub const PLAN_POINTS: &str = "plan_points";

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct PlanPoint {
    /// Empty until one succeeded.
    pub tag: String,
    /// Unix seconds.
    pub taken: u64,
    /// The last scheduled attempt, failed or not (unix seconds).
    #[serde(default)]
    pub attempted: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct PlanGroup {
    /// Item ids, brought up together.
    pub items: Vec<u64>,
    #[serde(default)]
    pub pre: Vec<PlanAction>,
    #[serde(default)]
    pub post: Vec<PlanAction>,
}

/// A script run with `sh -c` on the configuration server's host (killed after its timeout; a failure
/// fails the plan's job with its output), or a manual step the plan waits at until resumed.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, rename_all = "snake_case")]
pub enum PlanAction {
    Script {
        command: String,
        #[serde(default = "d_script_timeout")]
        timeout_secs: u64,
    },
    Manual {
        instruction: String,
    },
}

fn d_script_timeout() -> u64 {
    300
}

/// Source network to target network, with address rules, applied to the machine descriptions that
/// failovers produce.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct NetworkMapping {
    #[serde(default)]
    pub id: String,
    pub name: String,
    /// CIDR of the source network ("10.0.0.0/24").
    pub source: String,
    /// CIDR of the target network; an address keeps its host part in it unless a rule says otherwise.
    pub target: String,
    /// The target network's name for the hypervisor (a port group, a bridge, a VLAN).
    #[serde(default)]
    pub target_network: String,
    #[serde(default)]
    pub gateway: Option<String>,
    #[serde(default)]
    pub rules: Vec<AddressRule>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct AddressRule {
    pub source: String,
    pub target: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum JobState {
    Running,
    Succeeded,
    Failed,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Step {
    pub name: String,
    pub state: JobState,
    pub started: Option<u64>,
    pub ended: Option<u64>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Job {
    pub id: u64,
    pub kind: String,
    /// What the job acts on (an item id, a component name).
    pub target: String,
    pub state: JobState,
    pub progress: u8,
    pub steps: Vec<Step>,
    pub started: u64,
    pub ended: Option<u64>,
    pub error: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct EventRecord {
    pub id: u64,
    pub time: u64,
    pub severity: String,
    pub subject: String,
    pub message: String,
}

pub fn now() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0)
}

/// Ids are zero-padded so the store lists them in numeric order.
pub fn id_key(id: u64) -> String {
    format!("{id:012}")
}

/// A network interface of a failed-over machine: its source addresses mapped into the recovery site's
/// networks (see `netmap.rs`).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct MappedNic {
    pub name: String,
    pub mac: String,
    pub source_addresses: Vec<String>,
    pub addresses: Vec<String>,
    pub networks: Vec<String>,
    pub gateway: Option<String>,
    /// Source addresses no mapping covers (kept as they were).
    pub unmapped: Vec<String>,
}

/// One disk of a machine description.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct DescribedDisk {
    pub id: u64,
    pub name: String,
    pub size: u64,
    /// Where it is served (`nbd://...`) until a commit; then `path` names the file.
    pub uri: Option<String>,
    pub export: Option<String>,
    pub point_seq: u64,
    pub point_time: Option<String>,
    pub writable: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path: Option<String>,
}

/// What a hypervisor hook needs to boot a failed-over (or test) machine.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct MachineDescription {
    pub name: String,
    pub source_machine: String,
    pub item: u64,
    /// `failover`, `failback` or `test-failover`.
    pub purpose: String,
    pub cpus: u32,
    pub memory_bytes: u64,
    pub network_interfaces: Vec<MappedNic>,
    pub disks: Vec<DescribedDisk>,
}

/// An item's failover, from its start until a reprotect.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct FailoverRecord {
    /// Names this failover: the agent's stop, the bookmark, the split record of the committed disks.
    pub generation: u64,
    pub planned: bool,
    #[serde(default)]
    pub failback: bool,
    /// The point asked for (a planned failover takes its own final bookmark).
    pub point: PointSpec,
    pub job: u64,
    pub by: String,
    pub from_machine: String,
    /// The master target holding the replica (set to the one that brought the disks up).
    pub master_target: Option<String>,
    /// Set once the disks are up: the view, the point it resolved, the machine description.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub view: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub point_chosen: Option<PointSpec>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub machine: Option<MachineDescription>,
    /// Set by the commit: where the disks now are, as plain files.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub committed: Option<Vec<CommittedDisk>>,
}

/// An item's reprotect while it runs.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ReprotectRecord {
    /// The failover generation the new source ships changes since.
    pub baseline: u64,
    /// Whether both sides' history is known (a planned failover); else checksums are compared.
    pub known: bool,
    /// The old source's disks the master target replicates into, in place.
    pub adopt: Vec<AdoptDisk>,
    pub job: u64,
    /// The dirty bytes at the start, for progress.
    #[serde(default)]
    pub initial_dirty: u64,
    pub failover: FailoverRecord,
}

/// An item's test failover while it is up.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct TestFailoverRecord {
    pub view: String,
    pub master_target: String,
    pub machine: MachineDescription,
}
