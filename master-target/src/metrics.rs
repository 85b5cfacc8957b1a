//! Every metric the master target exports, by name.

pub const BYTES_IN: &str = "sr_master_target_received_bytes_total";
pub const APPLIED_BYTES: &str = "sr_master_target_applied_bytes_total";
pub const BATCHES: &str = "sr_master_target_batches_applied_total";
pub const APPLIED_SEQ: &str = "sr_master_target_applied_seq";
pub const REPLICA_BYTES: &str = "sr_master_target_replica_allocated_bytes";
pub const LAST_APPLY_TIME: &str = "sr_master_target_last_apply_timestamp_seconds";
pub const REJECTED: &str = "sr_master_target_rejected_batches_total";
pub const DUPLICATES: &str = "sr_master_target_duplicate_batches_total";
pub const APPLY_SECONDS: &str = "sr_master_target_apply_seconds";
pub const UNDO_BYTES: &str = "sr_master_target_undo_bytes";
pub const OLDEST_POINT_AGE: &str = "sr_master_target_oldest_point_age_seconds";
pub const EXPIRED_BYTES: &str = "sr_master_target_expired_undo_bytes_total";
/// How long the newest points have not been crash-consistent (an open block-order window), 0 if they are.
pub const INCONSISTENT_SECONDS: &str = "sr_master_target_inconsistent_window_seconds";
/// Runs of the retention expiry over every replica.
pub const EXPIRY_RUNS: &str = "sr_master_target_expiry_runs_total";
pub const VIEWS_OPEN: &str = "sr_master_target_views_open";
pub const HASHED_BYTES: &str = "sr_master_target_checksummed_bytes_total";

/// The key epoch of the last batch applied for an item (label `item`).
pub const KEY_EPOCH: &str = "sr_master_target_key_epoch";

/// Size of the file system that holds the replicas and undo journals, in bytes.
pub const VOLUME_SIZE: &str = "sr_master_target_volume_size_bytes";
/// Bytes free on that file system.
pub const VOLUME_FREE: &str = "sr_master_target_volume_free_bytes";
