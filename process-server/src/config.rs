//! The process server's configuration file.

use serde::Deserialize;
use sr_common::seal::ItemKeyConfig;
use sr_common::tls::TlsPaths;
use std::net::SocketAddr;
use std::path::PathBuf;

pub const DEFAULT_CACHE_LIMIT_BYTES: u64 = 1 << 30;
pub const DEFAULT_WINDOW_BYTES: u64 = 32 << 20;
pub const ENV_PREFIX: &str = "SR_PS";

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PsConfig {
    pub node: String,
    pub data_dir: PathBuf,
    pub http: SocketAddr,
    /// Where the configuration server reaches the API (`/v1/poll` after a reassignment), when it is not
    /// `http`. Without it, an `http` bound to every address is not reported, and the process server
    /// takes a new assignment at its next poll instead of at once.
    #[serde(default)]
    pub advertise_http: Option<SocketAddr>,
    /// QUIC address this server binds (`0.0.0.0:PORT` or `[::]:PORT` for every address).
    pub listen: SocketAddr,
    /// The QUIC address agents reach this server at, when it is not `listen` (NAT, a Kubernetes
    /// Service, a proxy between sites).
    #[serde(default)]
    pub advertise: Option<SocketAddr>,
    /// The master target of the statically configured items (with `[control]`, each item's master
    /// target is assigned).
    #[serde(default)]
    pub master_target: Option<SocketAddr>,
    /// The configuration server to report to and take assignments from.
    #[serde(default)]
    pub control: Option<sr_common::control::ControlConfig>,
    pub tls: TlsPaths,
    /// Past this many cached bytes the server stops acknowledging (backpressure, never loss).
    #[serde(default = "default_cache_limit")]
    pub cache_limit_bytes: u64,
    /// zstd level, 1..=19.
    #[serde(default = "default_level")]
    pub compression_level: i32,
    /// At most this many bytes forwarded to the master target and not yet applied, per stream.
    #[serde(default = "default_window")]
    pub window_bytes: u64,
    #[serde(rename = "item", default)]
    pub items: Vec<ItemKeyConfig>,
}

fn default_cache_limit() -> u64 {
    DEFAULT_CACHE_LIMIT_BYTES
}
fn default_level() -> i32 {
    sr_common::compress::DEFAULT_LEVEL
}
fn default_window() -> u64 {
    DEFAULT_WINDOW_BYTES
}

impl PsConfig {
    /// Where agents reach this server's QUIC listener.
    pub fn advertised(&self) -> SocketAddr {
        self.advertise.unwrap_or(self.listen)
    }

    /// The API's address as the configuration server reaches it, if known.
    pub fn advertised_http(&self) -> Option<SocketAddr> {
        self.advertise_http.or_else(|| sr_common::config::advertised(("http", "advertise_http"), self.http, None).ok())
    }

    pub fn load(path: &std::path::Path) -> anyhow::Result<PsConfig> {
        Ok(sr_common::config::load_valid(path, ENV_PREFIX)?)
    }
}

impl sr_common::config::Validate for PsConfig {
    fn validate(&self) -> Result<(), String> {
        let PsConfig {
            node,
            data_dir: _,
            http,
            advertise_http,
            listen,
            advertise,
            master_target,
            control,
            tls: _,
            cache_limit_bytes,
            compression_level,
            window_bytes,
            items,
        } = self;
        if node.is_empty() {
            return Err("key node: must not be empty".into());
        }
        // Advertised to the configuration server (and through it to agents) when it runs one.
        if control.is_some() {
            sr_common::config::advertised(("listen", "advertise"), *listen, *advertise)?;
        }
        if advertise_http.is_some() {
            sr_common::config::advertised(("http", "advertise_http"), *http, *advertise_http)?;
        }
        if control.is_none() && master_target.is_none() {
            return Err("set [control] (items are assigned) or master_target (for the [[item]] list)".into());
        }
        if *cache_limit_bytes < 1 << 20 {
            return Err(format!("key cache_limit_bytes: {cache_limit_bytes} is below the 1 MiB minimum"));
        }
        if !(1..=19).contains(compression_level) {
            return Err(format!("key compression_level: {compression_level} is outside 1..=19"));
        }
        if *window_bytes < 1 << 20 {
            return Err(format!("key window_bytes: {window_bytes} is below 1 MiB"));
        }
        for (i, it) in items.iter().enumerate() {
            if items[..i].iter().any(|o| o.id == it.id) {
                return Err(format!("item[{i}]: id {} is listed twice", it.id));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(extra: &str) -> Result<PsConfig, String> {
        let text = format!(
            "node = \"ps\"\ndata_dir = \"/d\"\nlisten = \"127.0.0.1:7000\"\nmaster_target = \"127.0.0.1:7001\"\n\
             {extra}[tls]\nca = \"/c\"\ncert = \"/c\"\nkey = \"/c\"\n"
        );
        let cfg: PsConfig = sr_common::config::parse_with_env(std::path::Path::new("ps.toml"), &text, ENV_PREFIX, &[])
            .map_err(|e| e.to_string())?;
        sr_common::config::Validate::validate(&cfg)?;
        Ok(cfg)
    }

    #[test]
    fn the_api_is_reported_where_the_configuration_server_reaches_it() {
        let at = |a: &str| Some(a.parse::<SocketAddr>().unwrap());
        // A bound address is reachable as it is; every address is not, unless advertised.
        assert_eq!(parse("http = \"127.0.0.1:9000\"\n").unwrap().advertised_http(), at("127.0.0.1:9000"));
        assert_eq!(parse("http = \"0.0.0.0:9000\"\n").unwrap().advertised_http(), None);
        let cfg = parse("http = \"0.0.0.0:9000\"\nadvertise_http = \"10.0.0.5:9000\"\n").unwrap();
        assert_eq!(cfg.advertised_http(), at("10.0.0.5:9000"));
        let e = parse("http = \"0.0.0.0:9000\"\nadvertise_http = \"0.0.0.0:9000\"\n").unwrap_err();
        assert!(e.contains("advertise_http"), "{e}");
    }
}
