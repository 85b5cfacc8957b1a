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
    /// Alerts are POSTed as JSON here (`host:port/path`), besides the event log.
    #[serde(default)]
    pub alert_webhook: Option<String>,
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
        let CsConfig { data_dir: _, listen: _, registration_key_ttl_secs, alert_webhook, component_timeout_secs } =
            self;
        if *component_timeout_secs < 2 {
            return Err("key component_timeout_secs: must be at least 2".into());
        }
        if let Some(h) = alert_webhook {
            let addr = h.split_once('/').map_or(h.as_str(), |(a, _)| a);
            if addr.parse::<std::net::SocketAddr>().is_err() {
                return Err(format!("key alert_webhook: {h:?} is not host:port/path with an IP address"));
            }
        }
        if *registration_key_ttl_secs == 0 {
            return Err("key registration_key_ttl_secs: must be at least 1".into());
        }
        Ok(())
    }
}
