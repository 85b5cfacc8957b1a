//! Every metric the configuration server exports, by name.

/// Seconds since an item's replica last held everything its source had written (label `item`).
pub const ITEM_RPO_SECONDS: &str = "sr_config_server_item_rpo_seconds";

/// Registrations refused (unknown, used, expired or other-role key, or a taken name).
pub const REGISTRATIONS_REFUSED: &str = "sr_config_server_registrations_refused_total";
