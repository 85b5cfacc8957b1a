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
    /// The API address the configuration server reaches, when it is not `http`.
    #[serde(default)]
    pub advertise_http: Option<SocketAddr>,
    /// QUIC address this server binds (`0.0.0.0:PORT` or `[::]:PORT` for every address).
    pub listen: SocketAddr,
    /// The QUIC address process servers reach this server at, when it is not `listen` (NAT, a
    /// Kubernetes Service, a proxy between sites).
    #[serde(default)]
    pub advertise: Option<SocketAddr>,
    /// NBD exports of the replicas and failover disks (TLS only).
    #[serde(default)]
    pub nbd_tcp: Option<SocketAddr>,
    /// The NBD address clients reach (in machine descriptions' `nbds://` URIs), when it is not `nbd_tcp`.
    #[serde(default)]
    pub advertise_nbd: Option<SocketAddr>,
    pub tls: TlsPaths,
    /// The configuration server to report to and take item keys from.
    #[serde(default)]
    pub control: Option<sr_common::control::ControlConfig>,
    #[serde(rename = "item", default)]
    pub items: Vec<ItemKeyConfig>,
    #[serde(default)]
    pub points: PointsConfig,
    /// Exports (`POST /v1/export`) write only inside this directory (default `DATA_DIR/exports`).
    #[serde(default)]
    pub export_dir: Option<PathBuf>,
    /// At most this many views (test failovers, failovers) open at once.
    #[serde(default = "default_max_views")]
    pub max_views: usize,
}

pub const DEFAULT_MAX_VIEWS: usize = 64;

fn default_max_views() -> usize {
    DEFAULT_MAX_VIEWS
}

impl MtConfig {
    /// Where process servers reach this server's QUIC listener.
    pub fn advertised(&self) -> SocketAddr {
        self.advertise.unwrap_or(self.listen)
    }

    /// Where the configuration server reaches this server's API.
    pub fn advertised_http(&self) -> SocketAddr {
        self.advertise_http.unwrap_or(self.http)
    }

    /// Where NBD clients reach the exports.
    pub fn advertised_nbd(&self) -> Option<SocketAddr> {
        self.advertise_nbd.or(self.nbd_tcp)
    }

    /// Where exports are written.
    pub fn export_dir(&self) -> PathBuf {
        self.export_dir.clone().unwrap_or_else(|| self.data_dir.join("exports"))
    }
}

/// Where an export asked for at `requested` is written: a relative path is taken inside `dir`, an
/// absolute one must lie inside it. Either may hold only plain names (no `..`, no `.`), so no
/// spelling leaves `dir`; the caller still checks that no symbolic link leads out.
pub fn confine_export(dir: &std::path::Path, requested: &std::path::Path) -> Result<PathBuf, String> {
    use std::path::Component;
    let rel = if requested.is_absolute() {
        requested
            .strip_prefix(dir)
            .map_err(|_| format!("path {}: exports are written only inside {}", requested.display(), dir.display()))?
    } else {
        requested
    };
    if rel.as_os_str().is_empty() || !rel.components().all(|c| matches!(c, Component::Normal(_))) {
        return Err(format!(
            "path {}: a file name inside {} (plain names only, no `..`)",
            requested.display(),
            dir.display()
        ));
    }
    Ok(dir.join(rel))
}

/// Recovery points: how long they are kept and how the undo journal is cut into segments.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PointsConfig {
    /// Points older than this expire, for items whose policy (from the configuration server) does not
    /// say otherwise.
    pub retention_secs: u64,
    /// A new undo segment starts past this size...
    pub segment_bytes: u64,
    /// ...or when the active one's first record is this old; space is reclaimed a segment at a time.
    pub segment_secs: u64,
    /// How often expired points are looked for.
    pub expiry_interval_secs: u64,
}

impl Default for PointsConfig {
    fn default() -> Self {
        PointsConfig { retention_secs: 24 * 3600, segment_bytes: 64 << 20, segment_secs: 600, expiry_interval_secs: 30 }
    }
}

impl MtConfig {
    pub fn load(path: &std::path::Path) -> anyhow::Result<MtConfig> {
        Ok(sr_common::config::load_valid(path, ENV_PREFIX)?)
    }
}

impl sr_common::config::Validate for MtConfig {
    fn validate(&self) -> Result<(), String> {
        let MtConfig {
            node,
            data_dir: _,
            http,
            advertise_http,
            listen,
            advertise,
            nbd_tcp,
            advertise_nbd,
            tls: _,
            control,
            items,
            points,
            export_dir,
            max_views,
        } = self;
        if export_dir.as_ref().is_some_and(|d| !d.is_absolute()) {
            return Err("key export_dir: must be an absolute path".into());
        }
        if *max_views == 0 {
            return Err("key max_views: must be at least 1".into());
        }
        if node.is_empty() {
            return Err("key node: must not be empty".into());
        }
        if advertise_nbd.is_some() && nbd_tcp.is_none() {
            return Err("key advertise_nbd: set without nbd_tcp".into());
        }
        // Advertised to the configuration server (and through it to process servers and in machine
        // descriptions) when it runs one.
        if control.is_some() {
            sr_common::config::advertised(("http", "advertise_http"), *http, *advertise_http)?;
            sr_common::config::advertised(("listen", "advertise"), *listen, *advertise)?;
            if let Some(n) = nbd_tcp {
                sr_common::config::advertised(("nbd_tcp", "advertise_nbd"), *n, *advertise_nbd)?;
            }
        }
        let PointsConfig { retention_secs, segment_bytes, segment_secs, expiry_interval_secs } = points;
        for (key, v) in [
            ("points.retention_secs", retention_secs),
            ("points.segment_bytes", segment_bytes),
            ("points.segment_secs", segment_secs),
            ("points.expiry_interval_secs", expiry_interval_secs),
        ] {
            if *v == 0 {
                return Err(format!("key {key}: must be greater than 0"));
            }
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
mod confine_tests {
    use super::confine_export;
    use std::path::Path;

    #[test]
    fn exports_stay_inside_their_directory() {
        let d = Path::new("/srv/exports");
        assert_eq!(confine_export(d, Path::new("a.img")).unwrap(), Path::new("/srv/exports/a.img"));
        assert_eq!(confine_export(d, Path::new("x/a.img")).unwrap(), Path::new("/srv/exports/x/a.img"));
        assert_eq!(confine_export(d, Path::new("/srv/exports/a.img")).unwrap(), Path::new("/srv/exports/a.img"));
        for bad in ["/etc/passwd", "../a.img", "x/../../a.img", "/srv/exports/../a.img", "", ".", "/srv/exportsx/a"] {
            assert!(confine_export(d, Path::new(bad)).is_err(), "{bad}");
        }
    }
}
