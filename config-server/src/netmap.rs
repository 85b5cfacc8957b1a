//! Network mapping: the source machine's addresses turned into the target site's, in the machine
//! description a failover produces.
//!
//! ```text
//! NIC address 10.0.0.5/24 --rule 10.0.0.5 -> 192.168.50.7?--> 192.168.50.7/24
//!                         --else inside source 10.0.0.0/24--> same host part in target 192.168.50.0/24
//!                         --else--> kept, marked unmapped
//! ```

use crate::auth::require;
use crate::error::{body, ApiError, Body, R};
use crate::model::*;
use crate::store::Docs;
use crate::Cs;
use axum::extract::{Path, State as AxState};
use axum::http::HeaderMap;
use axum::Json;
use serde_json::{json, Value};
use std::net::IpAddr;
use std::sync::Arc;

/// A network: its address as a 128-bit number (IPv4 mapped into the low bits), prefix, family.
#[derive(Debug, Clone, Copy, PartialEq)]
struct Net {
    addr: u128,
    prefix: u8,
    v6: bool,
}

fn bits(ip: IpAddr) -> (u128, bool) {
    match ip {
        IpAddr::V4(a) => (u128::from(u32::from(a)), false),
        IpAddr::V6(a) => (u128::from(a), true),
    }
}

fn ip(addr: u128, v6: bool) -> IpAddr {
    if v6 {
        IpAddr::V6(addr.into())
    } else {
        IpAddr::V4((addr as u32).into())
    }
}

fn width(v6: bool) -> u8 {
    if v6 {
        128
    } else {
        32
    }
}

fn mask(prefix: u8, v6: bool) -> u128 {
    let w = width(v6);
    let all: u128 = if v6 { u128::MAX } else { u128::from(u32::MAX) };
    if prefix == 0 {
        0
    } else {
        (all >> (w - prefix)) << (w - prefix) & all
    }
}

fn parse_cidr(s: &str) -> Result<Net, String> {
    let (a, p) = s.split_once('/').ok_or_else(|| format!("{s:?} is not a network in CIDR form (10.0.0.0/24)"))?;
    let (addr, v6) = bits(a.parse::<IpAddr>().map_err(|e| format!("{a:?}: {e}"))?);
    let prefix: u8 = p.parse().map_err(|_| format!("{s:?}: prefix {p:?} is not a number"))?;
    if prefix > width(v6) {
        return Err(format!("{s:?}: prefix {prefix} is longer than the address"));
    }
    Ok(Net { addr: addr & mask(prefix, v6), prefix, v6 })
}

impl NetworkMapping {
    pub fn validate(&self) -> Result<(), String> {
        if self.name.trim().is_empty() || self.name.len() > 128 {
            return Err("name: 1 to 128 characters".into());
        }
        let (s, t) = (
            parse_cidr(&self.source).map_err(|e| format!("source: {e}"))?,
            parse_cidr(&self.target).map_err(|e| format!("target: {e}"))?,
        );
        if s.v6 != t.v6 {
            return Err("source and target: both IPv4 or both IPv6".into());
        }
        if t.prefix > s.prefix {
            return Err(format!(
                "target /{} is smaller than source /{}: the source's host addresses would not fit",
                t.prefix, s.prefix
            ));
        }
        if let Some(g) = &self.gateway {
            g.parse::<IpAddr>().map_err(|e| format!("gateway {g:?}: {e}"))?;
        }
        for r in &self.rules {
            let (a, b) = (r.source.parse::<IpAddr>(), r.target.parse::<IpAddr>());
            let (a, b) = (
                a.map_err(|e| format!("rule source {:?}: {e}", r.source))?,
                b.map_err(|e| format!("rule target {:?}: {e}", r.target))?,
            );
            if !in_net(bits(a), &s) {
                return Err(format!("rule source {a} is not in the source network {}", self.source));
            }
            if !in_net(bits(b), &t) {
                return Err(format!("rule target {b} is not in the target network {}", self.target));
            }
        }
        Ok(())
    }

    /// The target address of `addr` (no prefix), when this mapping covers it.
    fn map(&self, addr: IpAddr) -> Option<(IpAddr, u8)> {
        let (s, t) = (parse_cidr(&self.source).ok()?, parse_cidr(&self.target).ok()?);
        let a = bits(addr);
        if !in_net(a, &s) {
            return None;
        }
        if let Some(r) = self.rules.iter().find(|r| r.source.parse::<IpAddr>().ok() == Some(addr)) {
            return Some((r.target.parse().ok()?, t.prefix));
        }
        let host = a.0 & !mask(s.prefix, s.v6);
        Some((ip(t.addr | host, t.v6), t.prefix))
    }
}

fn in_net((addr, v6): (u128, bool), n: &Net) -> bool {
    v6 == n.v6 && addr & mask(n.prefix, v6) == n.addr
}

/// The NICs of a machine description, with each address mapped by the first mapping that covers it.
pub fn map_nics(nics: &[Nic], maps: &[NetworkMapping]) -> Vec<MappedNic> {
    nics.iter()
        .map(|n| {
            let mut addresses = Vec::new();
            let mut networks = Vec::new();
            let mut unmapped = Vec::new();
            let mut gateway = None;
            for a in &n.addresses {
                let parsed = a.split_once('/').map_or(a.as_str(), |(x, _)| x).parse::<IpAddr>();
                let hit = parsed.ok().and_then(|ip| maps.iter().find_map(|m| m.map(ip).map(|t| (m, t))));
                match hit {
                    Some((m, (ip, prefix))) => {
                        addresses.push(format!("{ip}/{prefix}"));
                        if !networks.contains(&m.target_network) {
                            networks.push(m.target_network.clone());
                        }
                        gateway = gateway.or(m.gateway.clone());
                    }
                    None => {
                        addresses.push(a.clone());
                        unmapped.push(a.clone());
                    }
                }
            }
            MappedNic {
                name: n.name.clone(),
                mac: n.mac.clone(),
                source_addresses: n.addresses.clone(),
                addresses,
                networks,
                gateway,
                unmapped,
            }
        })
        .collect()
}

pub async fn list(AxState(cs): AxState<Arc<Cs>>, h: HeaderMap) -> R<Value> {
    require(cs.store(), &h, ApiRole::Reader)?;
    let maps: Vec<NetworkMapping> = cs.store().list(NETWORK_MAPPINGS)?;
    Ok(Json(json!(maps)))
}

pub async fn create(AxState(cs): AxState<Arc<Cs>>, h: HeaderMap, b: Body<NetworkMapping>) -> R<Value> {
    let by = require(cs.store(), &h, ApiRole::Operator)?;
    let mut m = body(b)?;
    m.validate().map_err(|e| ApiError::bad(&e))?;
    let store = cs.store();
    let all: Vec<NetworkMapping> = store.list(NETWORK_MAPPINGS)?;
    if all.iter().any(|x| x.name == m.name) {
        return Err(ApiError::conflict(&format!("a network mapping named {} exists", m.name)));
    }
    m.id = id_key(store.next_id(NETWORK_MAPPINGS)?);
    store.put(NETWORK_MAPPINGS, &m.id, &m)?;
    cs.event("info", &m.name, &format!("network mapping {} ({} -> {}) created by {by}", m.name, m.source, m.target))?;
    Ok(Json(json!(m)))
}

pub async fn delete(AxState(cs): AxState<Arc<Cs>>, h: HeaderMap, Path(id): Path<String>) -> R<Value> {
    require(cs.store(), &h, ApiRole::Operator)?;
    let store = cs.store();
    let all: Vec<NetworkMapping> = store.list(NETWORK_MAPPINGS)?;
    let m = all
        .into_iter()
        .find(|m| m.id == id || m.name == id)
        .ok_or_else(|| ApiError::not_found(&format!("no network mapping {id}")))?;
    store.delete(NETWORK_MAPPINGS, &m.id)?;
    Ok(Json(json!({ "deleted": m.id })))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mapping() -> NetworkMapping {
        NetworkMapping {
            id: String::new(),
            name: "prod".into(),
            source: "10.0.0.0/24".into(),
            target: "192.168.50.0/24".into(),
            target_network: "dr-vlan-50".into(),
            gateway: Some("192.168.50.1".into()),
            rules: vec![AddressRule { source: "10.0.0.9".into(), target: "192.168.50.200".into() }],
        }
    }

    #[test]
    fn maps_host_parts_rules_and_leaves_others() {
        let m = mapping();
        m.validate().unwrap();
        let nics = vec![Nic {
            name: "eth0".into(),
            mac: "52:54:00:00:00:01".into(),
            addresses: vec!["10.0.0.5/24".into(), "10.0.0.9/24".into(), "172.16.0.1/16".into()],
        }];
        let out = map_nics(&nics, &[m]);
        assert_eq!(out[0].addresses, ["192.168.50.5/24", "192.168.50.200/24", "172.16.0.1/16"]);
        assert_eq!(out[0].networks, ["dr-vlan-50"]);
        assert_eq!(out[0].unmapped, ["172.16.0.1/16"]);
        assert_eq!(out[0].gateway.as_deref(), Some("192.168.50.1"));
    }

    #[test]
    fn ipv6_and_bad_mappings() {
        let m = NetworkMapping {
            source: "fd00:1::/64".into(),
            target: "fd00:2::/64".into(),
            rules: vec![],
            gateway: None,
            ..mapping()
        };
        m.validate().unwrap();
        let nics = vec![Nic { name: "eth0".into(), mac: String::new(), addresses: vec!["fd00:1::abcd/64".into()] }];
        assert_eq!(map_nics(&nics, std::slice::from_ref(&m))[0].addresses, ["fd00:2::abcd/64"]);
        assert!(NetworkMapping { target: "10.0.0.0/8".into(), ..m.clone() }.validate().unwrap_err().contains("IPv4"));
        assert!(NetworkMapping { source: "10.0.0.0/16".into(), ..mapping() }
            .validate()
            .unwrap_err()
            .contains("smaller"));
        let bad_rule = NetworkMapping {
            rules: vec![AddressRule { source: "10.0.1.9".into(), target: "192.168.50.2".into() }],
            ..mapping()
        };
        assert!(bad_rule.validate().unwrap_err().contains("not in the source network"));
        assert!(NetworkMapping { source: "10.0.0.0".into(), ..mapping() }.validate().unwrap_err().contains("CIDR"));
    }
}
