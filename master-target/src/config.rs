//! The master target's configuration file.

use serde::Deserialize;
use sr_common::seal::ItemKeyConfig;
use sr_common::tls::TlsPaths;
use std::net::SocketAddr;
use std::path::PathBuf;

pub const ENV_PREFIX: &str = "SR_MT";

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MtConfig {
    pub node: String,
    /// Replicas and state live here.
    pub data_dir: PathBuf,
    pub http: SocketAddr,
    /// QUIC address process servers connect to.
    pub listen: SocketAddr,
    /// Read-only NBD exports of the replicas (`item-I-disk-D`).
    #[serde(default)]
    pub nbd_tcp: Option<SocketAddr>,
    pub tls: TlsPaths,
    /// The configuration server to report to and take item keys from.
    #[serde(default)]
    pub control: Option<sr_common::control::ControlConfig>,
    #[serde(rename = "item", default)]
    pub items: Vec<ItemKeyConfig>,
}

impl MtConfig {
    pub fn load(path: &std::path::Path) -> anyhow::Result<MtConfig> {
        let cfg: MtConfig = sr_common::config::load(path, ENV_PREFIX)?;
        cfg.validate().map_err(|e| anyhow::anyhow!("config file {}: {e}", path.display()))?;
        Ok(cfg)
    }

    pub fn validate(&self) -> Result<(), String> {
        let MtConfig { node, data_dir: _, http: _, listen: _, nbd_tcp: _, tls: _, control: _, items } = self;
        if node.is_empty() {
            return Err("key node: must not be empty".into());
        }
        for (i, it) in items.iter().enumerate() {
            if items[..i].iter().any(|o| o.id == it.id) {
                return Err(format!("item[{i}]: id {} is listed twice", it.id));
            }
        }
        Ok(())
    }
}
