//! Every metric the agent exports, by name. Each has the label `disk` (the NBD export name) but
//! [`INFO`].

/// Always 1, with the label `node`: the machine's name, as items name it (to join on `instance`).
pub const INFO: &str = "sr_agent_info";

pub const JOURNAL_BYTES: &str = "sr_agent_journal_bytes";
/// The journal's limit: past it, changes are tracked in the dirty map and a resync follows.
pub const JOURNAL_LIMIT: &str = "sr_agent_journal_limit_bytes";
pub const JOURNAL_LAST_SEQ: &str = "sr_agent_journal_last_seq";
pub const ACKED_SEQ: &str = "sr_agent_durable_acked_seq";
pub const LAG_CHANGES: &str = "sr_agent_replication_lag_changes";
pub const WRITTEN_BYTES: &str = "sr_agent_written_bytes_total";
pub const SHIPPED_BYTES: &str = "sr_agent_shipped_bytes_total";
pub const BATCHES: &str = "sr_agent_batches_shipped_total";
pub const COPY_RATIO: &str = "sr_agent_initial_copy_progress_ratio";
pub const COPY_BYTES: &str = "sr_agent_initial_copy_bytes_total";
pub const RECONNECTS: &str = "sr_agent_reconnects_total";
pub const CONNECTED: &str = "sr_agent_connected";
pub const NEXT_ATTEMPT: &str = "sr_agent_next_attempt_timestamp_seconds";
/// 1 while shipping is stopped on an error that retrying cannot fix.
pub const FATAL: &str = "sr_agent_shipping_fatal";
pub const DIRTY_BYTES: &str = "sr_agent_dirty_bytes";
/// 1 while the journal is over its limit and changes are tracked in the dirty map.
pub const OVERFLOW: &str = "sr_agent_journal_overflow";
/// Times the disk was made durable: a FLUSH makes the journal durable, and the disk follows at
/// checkpoints (before applied records leave the journal, before a change bypasses it).
pub const DISK_SYNCS: &str = "sr_agent_disk_syncs_total";
pub const RESYNC_BYTES: &str = "sr_agent_resync_copied_bytes_total";
pub const RESYNC_COMPARED_RATIO: &str = "sr_agent_resync_compared_ratio";
