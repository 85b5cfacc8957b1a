//! Every metric the process server exports, by name.

pub const BYTES_IN: &str = "sr_process_server_received_bytes_total";
pub const BYTES_OUT: &str = "sr_process_server_forwarded_bytes_total";
pub const BATCHES_IN: &str = "sr_process_server_batches_received_total";
pub const BATCHES_OUT: &str = "sr_process_server_batches_forwarded_total";
pub const PAYLOAD_BYTES: &str = "sr_process_server_payload_bytes_total";
pub const CACHE_BYTES: &str = "sr_process_server_cache_bytes";
pub const CACHE_LIMIT: &str = "sr_process_server_cache_limit_bytes";
pub const APPLIED_SEQ: &str = "sr_process_server_applied_seq";
pub const CACHED_SEQ: &str = "sr_process_server_cached_seq";
pub const LAG_CHANGES: &str = "sr_process_server_replication_lag_changes";
pub const BACKPRESSURE: &str = "sr_process_server_backpressure_waits_total";
pub const DUPLICATES: &str = "sr_process_server_duplicate_batches_total";
pub const ERRORS: &str = "sr_process_server_stream_errors_total";
pub const BANDWIDTH_WAIT_MS: &str = "sr_process_server_bandwidth_wait_milliseconds_total";
/// Bytes of checksum queries and answers relayed for resyncs (both ways).
pub const CHECKSUM_BYTES: &str = "sr_process_server_checksum_bytes_total";

/// The epoch of an item's data key new batches are sealed under (label `item`).
pub const KEY_EPOCH: &str = "sr_process_server_key_epoch";
