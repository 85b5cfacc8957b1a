//! The configuration server's configuration file.

use serde::Deserialize;
use std::net::SocketAddr;
use std::path::PathBuf;

pub const ENV_PREFIX: &str = "SR_CS";
pub const DEFAULT_KEY_TTL_SECS: u64 = 24 * 3600;

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CsConfig {
    /// State (redb), the CA and the first admin token live here.
    pub data_dir: PathBuf,
    /// REST API, /openapi.json, /metrics and /healthz.
    pub listen: SocketAddr,
    /// How long a registration key is valid when the request does not say.
    #[serde(default = "default_ttl")]
    pub registration_key_ttl_secs: u64,
    /// A process server or master target silent for this long gets no new work, and the items of a
    /// silent process server move to another one.
    #[serde(default = "default_timeout")]
    pub component_timeout_secs: u64,
    /// Alerts are POSTed as JSON to this URL (`https://...`, or `http://...` for a receiver on the
    /// same host or network), besides the event log.
    #[serde(default)]
    pub alert_webhook: Option<String>,
    /// Host names and IP addresses the API's certificate names besides the configuration server's
    /// role name (for clients that check the host they connect to).
    #[serde(default)]
    pub api_names: Vec<String>,
    /// Registration keys made outside the server (a Kubernetes Secret mounted here): files named
    /// `process-server-*`, `master-target-*` or `agent-*`, each holding one secret. Read at start;
    /// each key works once.
    #[serde(default)]
    pub registration_keys_dir: Option<PathBuf>,
    /// Every this many seconds, items move from the busiest process servers to the least busy when
    /// their counts differ by more than one (a process server added by scaling out gets its share).
    /// 0: only on request (`POST /v1/process-servers/balance`).
    #[serde(default)]
    pub auto_balance_secs: u64,
}

fn default_ttl() -> u64 {
    DEFAULT_KEY_TTL_SECS
}

pub const DEFAULT_COMPONENT_TIMEOUT_SECS: u64 = 10;

fn default_timeout() -> u64 {
    DEFAULT_COMPONENT_TIMEOUT_SECS
}

impl CsConfig {
    pub fn load(path: &std::path::Path) -> anyhow::Result<CsConfig> {
        Ok(sr_common::config::load_valid(path, ENV_PREFIX)?)
    }
}

impl sr_common::config::Validate for CsConfig {
    /// Destructures the whole config so a new field is not forgotten.
    fn validate(&self) -> Result<(), String> {
        let CsConfig {
            data_dir: _,
            listen: _,
            registration_key_ttl_secs,
            alert_webhook,
            component_timeout_secs,
            api_names,
            registration_keys_dir: _,
            auto_balance_secs: _,
        } = self;
        for n in api_names {
            let ok = n.parse::<std::net::IpAddr>().is_ok()
                || (!n.is_empty()
                    && n.split('.')
                        .all(|l| !l.is_empty() && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')));
            if !ok {
                return Err(format!("key api_names: {n:?} is neither a host name nor an IP address"));
            }
        }
        if *component_timeout_secs < 2 {
            return Err("key component_timeout_secs: must be at least 2".into());
        }
        if let Some(h) = alert_webhook {
            if !(h.starts_with("https://") || h.starts_with("http://")) {
                return Err(format!("key alert_webhook: {h:?} is not an https:// or http:// URL"));
            }
        }
        if *registration_key_ttl_secs == 0 {
            return Err("key registration_key_ttl_secs: must be at least 1".into());
        }
        Ok(())
    }
}
