//! Configuration files: TOML, overridden by environment variables, with errors that name the file and
//! the key.
//!
//! An override is `PREFIX` + the key path in upper case with `__` between levels; its value is read as a
//! TOML value when it parses as one, else as a string. For example, with prefix `SR_AGENT`,
//! `SR_AGENT__SHIP__BATCH_BYTES=1048576` sets `[ship] batch_bytes`.

use serde::de::DeserializeOwned;
use std::path::{Path, PathBuf};

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("config file {path}: cannot read it: {source}")]
    Read { path: PathBuf, source: std::io::Error },
    #[error("config file {path}: {message}")]
    Invalid { path: PathBuf, message: String },
    #[error("environment variable {var}: {message}")]
    Env { var: String, message: String },
}

/// A configuration's checks beyond what its types say (ranges, combinations, non-empty names).
pub trait Validate {
    fn validate(&self) -> Result<(), String>;
}

/// Loads `path` as [`load`] does and runs the config's own checks: the one way every service reads
/// its configuration. An error names the file and the key.
pub fn load_valid<T: DeserializeOwned + Validate>(path: &Path, env_prefix: &str) -> Result<T, ConfigError> {
    let cfg: T = load(path, env_prefix)?;
    cfg.validate().map_err(|message| ConfigError::Invalid { path: path.into(), message })?;
    Ok(cfg)
}

/// Loads `path`, applies overrides from variables that start with `env_prefix` + `__`, deserializes.
pub fn load<T: DeserializeOwned>(path: &Path, env_prefix: &str) -> Result<T, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read { path: path.into(), source })?;
    let vars: Vec<(String, String)> = std::env::vars().collect();
    parse_with_env(path, &text, env_prefix, &vars)
}

/// The pure part of [`load`]: text and environment in, config or error out.
pub fn parse_with_env<T: DeserializeOwned>(
    path: &Path,
    text: &str,
    env_prefix: &str,
    vars: &[(String, String)],
) -> Result<T, ConfigError> {
    let invalid = |message: String| ConfigError::Invalid { path: path.into(), message };
    let prefix = format!("{env_prefix}__");
    let overrides: Vec<&(String, String)> = vars.iter().filter(|(k, _)| k.starts_with(&prefix)).collect();
    if overrides.is_empty() {
        // Parse the original text so that errors point at its lines.
        return toml::from_str(text).map_err(|e| invalid(e.to_string()));
    }
    let mut table: toml::Table = toml::from_str(text).map_err(|e| invalid(e.to_string()))?;
    for (var, value) in overrides {
        let keys: Vec<String> = var[prefix.len()..].split("__").map(|k| k.to_ascii_lowercase()).collect();
        if keys.iter().any(|k| k.is_empty()) {
            return Err(ConfigError::Env { var: var.clone(), message: "empty key in the variable name".into() });
        }
        let parsed = toml::from_str::<toml::Table>(&format!("v = {value}"))
            .ok()
            .and_then(|mut t| t.remove("v"))
            .unwrap_or_else(|| toml::Value::String(value.clone()));
        let mut cur = &mut table;
        for k in &keys[..keys.len() - 1] {
            let entry = cur.entry(k.clone()).or_insert_with(|| toml::Value::Table(toml::Table::new()));
            cur = match entry {
                toml::Value::Table(t) => t,
                _ => return Err(ConfigError::Env { var: var.clone(), message: format!("key {k} is not a table") }),
            };
        }
        cur.insert(keys[keys.len() - 1].clone(), parsed);
    }
    let merged = toml::to_string(&table).map_err(|e| invalid(e.to_string()))?;
    toml::from_str(&merged).map_err(|e| invalid(format!("{e} (after environment overrides)")))
}

/// The address peers reach a listener at: `advertise` when it is set (behind NAT, a Kubernetes Service,
/// a proxy), else the address it binds. The answer must name one host and a port: a listener bound
/// to the unspecified address (`0.0.0.0`, `[::]`) needs an advertised address.
/// `keys` names the two settings (bind, advertise) for the error message.
pub fn advertised(
    keys: (&str, &str),
    bind: std::net::SocketAddr,
    advertise: Option<std::net::SocketAddr>,
) -> Result<std::net::SocketAddr, String> {
    let (bind_key, advertise_key) = keys;
    // (`[::ffff:0.0.0.0]` is the unspecified address too.)
    let nowhere = |a: std::net::SocketAddr| {
        let ip = a.ip().to_canonical();
        ip.is_unspecified() || ip.is_multicast() || a.port() == 0
    };
    match advertise {
        Some(a) if nowhere(a) => {
            Err(format!("key {advertise_key}: {a} is not an address peers can reach; name a host address and a port"))
        }
        Some(a) => Ok(a),
        None if nowhere(bind) => Err(format!(
            "key {bind_key}: {bind} binds every address or any port; set {advertise_key} to the address peers reach"
        )),
        None => Ok(bind),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, serde::Deserialize, PartialEq)]
    #[serde(deny_unknown_fields)]
    struct Cfg {
        name: String,
        net: Net,
    }
    #[derive(Debug, serde::Deserialize, PartialEq)]
    #[serde(deny_unknown_fields)]
    struct Net {
        port: u16,
    }

    fn parse(text: &str, vars: &[(&str, &str)]) -> Result<Cfg, ConfigError> {
        let vars: Vec<(String, String)> = vars.iter().map(|(a, b)| (a.to_string(), b.to_string())).collect();
        parse_with_env(Path::new("/etc/x.toml"), text, "SR_X", &vars)
    }

    #[test]
    fn env_overrides_nested_keys() {
        let c = parse("name = 'a'\n[net]\nport = 1\n", &[("SR_X__NET__PORT", "9"), ("SR_X__NAME", "b c")]).unwrap();
        assert_eq!(c, Cfg { name: "b c".into(), net: Net { port: 9 } });
    }

    #[test]
    fn errors_name_file_and_key() {
        let e = parse("name = 'a'\n[net]\nport = 'x'\n", &[]).unwrap_err().to_string();
        assert!(e.contains("/etc/x.toml") && e.contains("port"), "{e}");
        let e = parse("name = 'a'\nbogus = 1\n[net]\nport = 1\n", &[]).unwrap_err().to_string();
        assert!(e.contains("bogus"), "{e}");
        let e = parse("name = 'a'\n[net]\nport = 1\n", &[("SR_X__NET__PORT", "70000")]).unwrap_err().to_string();
        assert!(e.contains("port") && e.contains("environment"), "{e}");
    }

    #[test]
    fn advertised_address_names_one_host() {
        let a = |s: &str| s.parse::<std::net::SocketAddr>().unwrap();
        let keys = ("listen", "advertise");
        assert_eq!(advertised(keys, a("10.0.0.1:7"), None), Ok(a("10.0.0.1:7")));
        assert_eq!(advertised(keys, a("[fd00::1]:7"), None), Ok(a("[fd00::1]:7")));
        assert_eq!(advertised(keys, a("0.0.0.0:7"), Some(a("192.0.2.9:70"))), Ok(a("192.0.2.9:70")));
        assert_eq!(advertised(keys, a("[::]:7"), Some(a("[2001:db8::5]:7"))), Ok(a("[2001:db8::5]:7")));
        for (bind, adv) in [("0.0.0.0:7", None), ("[::]:7", None), ("10.0.0.1:0", None), ("[::]:7", Some("[::]:7"))] {
            let e = advertised(keys, a(bind), adv.map(a)).unwrap_err();
            assert!(e.contains("advertise"), "{e}");
        }
        assert!(advertised(keys, a("0.0.0.0:7"), Some(a("10.0.0.1:0"))).unwrap_err().contains("key advertise:"));
        for adv in ["[::ffff:0.0.0.0]:7", "224.0.0.1:7", "[ff02::1]:7"] {
            assert!(advertised(keys, a("0.0.0.0:7"), Some(a(adv))).is_err(), "{adv}");
        }
    }
}
