//! The agent's configuration file.

use serde::Deserialize;
use sr_common::tls::TlsPaths;
use std::net::SocketAddr;
use std::path::PathBuf;

pub const DEFAULT_BATCH_BYTES: u64 = 4 << 20;
pub const DEFAULT_WINDOW_BYTES: u64 = 32 << 20;
pub const DEFAULT_COPY_CHUNK_BYTES: u64 = 1 << 20;
pub const DEFAULT_COPY_BACKLOG_BYTES: u64 = 256 << 20;
pub const ENV_PREFIX: &str = "SR_AGENT";

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AgentConfig {
    /// Name of this machine in logs and at the process server.
    pub node: String,
    /// Protected item this machine's disks belong to (static setups; with `[control]` the configuration
    /// server assigns it).
    #[serde(default)]
    pub item: Option<u64>,
    /// Where the journal and small state live.
    pub data_dir: PathBuf,
    /// Operations endpoint: /metrics, /healthz, /v1/status.
    pub http: SocketAddr,
    /// The API address the configuration server reaches, when it is not `http` (NAT, a proxy).
    #[serde(default)]
    pub advertise_http: Option<SocketAddr>,
    /// NBD over TCP (loopback); at least one of `nbd_tcp` and `nbd_unix` is required.
    #[serde(default)]
    pub nbd_tcp: Option<SocketAddr>,
    #[serde(default)]
    pub nbd_unix: Option<PathBuf>,
    /// The process server's QUIC address (static setups; with `[control]` it is assigned).
    #[serde(default)]
    pub process_server: Option<SocketAddr>,
    /// The configuration server to report to and take assignments from.
    #[serde(default)]
    pub control: Option<sr_common::control::ControlConfig>,
    pub tls: TlsPaths,
    #[serde(default)]
    pub ship: ShipConfig,
    #[serde(default)]
    pub copy: CopyConfig,
    #[serde(default)]
    pub points: crate::consistency::PointsConfig,
    #[serde(default)]
    pub journal: JournalConfig,
    #[serde(default)]
    pub resync: crate::resync::ResyncConfig,
    #[serde(rename = "disk")]
    pub disks: Vec<DiskConfig>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ShipConfig {
    /// A batch is cut at about this many bytes of changes.
    pub batch_bytes: u64,
    /// At most this many bytes are sent and not yet acknowledged as durable.
    pub window_bytes: u64,
    /// Scales the retry schedule (1, 2, 4, 8, 10, then 30 minutes) that follows the quick reconnects.
    pub retry_scale: f64,
    /// Under a churn, changes gather for up to this many milliseconds after a batch before a smaller
    /// batch goes out (`sr_common::stream::Sender::hold`); 0 sends each change as it comes.
    pub linger_ms: u64,
    /// Added (0..=19) to the agent's nice value for the threads that ship and resync: on a busy machine
    /// its workload's writes go first, and the replica catches up in the time they leave free. 0: the
    /// same priority as the front end.
    pub nice: i32,
}

/// Shipping's threads get about a tenth of a busy core beside the front end's (Linux weights: 110
/// against 1024), and all of an idle one.
pub const DEFAULT_NICE: i32 = 10;

/// Gathering a churn's changes this long makes a batch per 20 ms instead of one per write.
pub const DEFAULT_LINGER_MS: u64 = 20;

impl Default for ShipConfig {
    fn default() -> Self {
        ShipConfig {
            batch_bytes: DEFAULT_BATCH_BYTES,
            window_bytes: DEFAULT_WINDOW_BYTES,
            retry_scale: 1.0,
            linger_ms: DEFAULT_LINGER_MS,
            nice: DEFAULT_NICE,
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct JournalConfig {
    /// The journal may hold this share of the disk's size (the policy's journal limit overrides it)...
    pub limit_percent: u8,
    /// ...or this many bytes, when set (overrides both).
    pub limit_bytes: Option<u64>,
    /// Block size of the dirty map that takes over past the limit, and of checksum comparisons.
    pub dirty_block_bytes: u64,
}

impl Default for JournalConfig {
    fn default() -> Self {
        JournalConfig { limit_percent: 50, limit_bytes: None, dirty_block_bytes: 4096 }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct CopyConfig {
    pub chunk_bytes: u64,
    /// The initial copy pauses while the journal holds more than this many bytes.
    pub backlog_bytes: u64,
}

impl Default for CopyConfig {
    fn default() -> Self {
        CopyConfig { chunk_bytes: DEFAULT_COPY_CHUNK_BYTES, backlog_bytes: DEFAULT_COPY_BACKLOG_BYTES }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DiskConfig {
    pub id: u64,
    /// NBD export name.
    pub name: String,
    /// The protected disk: an image file or a block device.
    pub path: PathBuf,
    /// How changes are captured: `nbd` (every write through the agent's NBD front end, journaled in
    /// order) or `scan` (for a disk that cannot be fronted: block checksums compared at an interval,
    /// changed blocks shipped; the interval is the recovery point objective).
    #[serde(default)]
    pub mode: CaptureMode,
    /// Scan mode: how often (the policy's crash-consistency interval overrides it).
    #[serde(default = "default_scan_interval")]
    pub scan_interval_secs: u64,
    /// Scan mode: block size of the checksums (the map of a 64 GiB disk at 64 KiB is 16 MiB).
    #[serde(default = "default_scan_block")]
    pub scan_block_bytes: u64,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum CaptureMode {
    #[default]
    Nbd,
    Scan,
}

fn default_scan_interval() -> u64 {
    300
}

fn default_scan_block() -> u64 {
    64 << 10
}

impl AgentConfig {
    pub fn load(path: &std::path::Path) -> anyhow::Result<AgentConfig> {
        Ok(sr_common::config::load_valid(path, ENV_PREFIX)?)
    }
}

impl sr_common::config::Validate for AgentConfig {
    /// Checks what types cannot. Destructures the whole config so a new field is not forgotten.
    fn validate(&self) -> Result<(), String> {
        let AgentConfig {
            node,
            item,
            data_dir: _,
            http,
            advertise_http,
            nbd_tcp,
            nbd_unix,
            process_server,
            control,
            tls: _,
            ship,
            copy,
            points,
            journal,
            resync,
            disks,
        } = self;
        if control.is_none() && (item.is_none() || process_server.is_none()) {
            return Err(
                "set [control] (the configuration server assigns item and process server), or both item and process_server"
                    .into(),
            );
        }
        if node.is_empty() {
            return Err("key node: must not be empty".into());
        }
        if control.is_some() {
            sr_common::config::advertised(("http", "advertise_http"), *http, *advertise_http)?;
        }
        // The protected machine's own disk, like a local block device: served to this host only.
        if let Some(a) = nbd_tcp.filter(|a| !a.ip().is_loopback()) {
            return Err(format!(
                "key nbd_tcp: {a} is not a loopback address; the agent serves its disks to this host only"
            ));
        }
        if nbd_tcp.is_none() && nbd_unix.is_none() {
            return Err("set nbd_tcp or nbd_unix (or both): the agent needs an NBD front end".into());
        }
        let ShipConfig { batch_bytes, window_bytes, retry_scale, linger_ms, nice } = ship;
        if !(0..=19).contains(nice) {
            return Err(format!("key ship.nice: {nice} is outside 0..=19"));
        }
        if *linger_ms > 1000 {
            return Err(format!(
                "key ship.linger_ms: {linger_ms} is over 1000; the replica would trail the disk by that much more"
            ));
        }
        if !(*retry_scale > 0.0 && *retry_scale <= 1.0) {
            return Err(format!("key ship.retry_scale: {retry_scale} must be in (0, 1]"));
        }
        if *batch_bytes == 0 || *batch_bytes > 16 << 20 {
            return Err(format!("key ship.batch_bytes: {batch_bytes} is outside 1..=16777216"));
        }
        if window_bytes < batch_bytes {
            return Err(format!("key ship.window_bytes: {window_bytes} is smaller than ship.batch_bytes"));
        }
        let CopyConfig { chunk_bytes, backlog_bytes: _ } = copy;
        if *chunk_bytes < 4096 || *chunk_bytes > 16 << 20 || chunk_bytes % 4096 != 0 {
            return Err(format!("key copy.chunk_bytes: {chunk_bytes} must be a multiple of 4096 up to 16 MiB"));
        }
        let crate::consistency::PointsConfig {
            crash_interval_secs,
            app_interval_secs,
            pre_hook: _,
            post_hook,
            shutdown_hook: _,
            hook_timeout_secs,
        } = points;
        if *crash_interval_secs == 0 || *app_interval_secs == 0 || *hook_timeout_secs == 0 {
            return Err(
                "keys points.crash_interval_secs, app_interval_secs, hook_timeout_secs: must be at least 1".into()
            );
        }
        if post_hook.is_some() && points.pre_hook.is_none() {
            return Err("key points.post_hook: set only with points.pre_hook".into());
        }
        let JournalConfig { limit_percent, limit_bytes, dirty_block_bytes } = journal;
        if !(1..=100).contains(limit_percent) || *limit_bytes == Some(0) {
            return Err("keys journal.limit_percent (1 to 100) and journal.limit_bytes (> 0)".into());
        }
        if *dirty_block_bytes < 512 || !dirty_block_bytes.is_power_of_two() || *dirty_block_bytes > 1 << 20 {
            return Err(format!(
                "key journal.dirty_block_bytes: {dirty_block_bytes} must be a power of two from 512 to 1 MiB"
            ));
        }
        let region = resync.region_bytes;
        if !(1 << 20..=1 << 30).contains(&region) || region % *dirty_block_bytes != 0 {
            return Err(format!(
                "key resync.region_bytes: {region} must be 1 MiB to 1 GiB and a multiple of journal.dirty_block_bytes"
            ));
        }
        if disks.is_empty() {
            return Err("no [[disk]] entries: nothing to protect".into());
        }
        for (i, d) in disks.iter().enumerate() {
            let DiskConfig { id, name, path: _, mode: _, scan_interval_secs, scan_block_bytes } = d;
            if *scan_interval_secs == 0 {
                return Err(format!("disk[{i}].scan_interval_secs: must be at least 1"));
            }
            if !(4096..=1 << 20).contains(scan_block_bytes) || !scan_block_bytes.is_power_of_two() {
                return Err(format!("disk[{i}].scan_block_bytes: a power of two from 4096 to 1 MiB"));
            }
            if name.is_empty() || name.len() > 256 {
                return Err(format!("disk[{i}].name: must be 1 to 256 bytes"));
            }
            if disks[..i].iter().any(|o| o.id == *id || o.name == *name) {
                return Err(format!("disk[{i}]: id {id} or name {name:?} is used twice"));
            }
        }
        Ok(())
    }
}
