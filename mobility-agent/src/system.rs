//! What the machine is made of, for the machine description a failover produces: CPUs, memory and
//! network interfaces with their addresses.

use sr_common::contract::{Nic, SystemInfo};
use std::collections::BTreeMap;

pub fn info() -> SystemInfo {
    let cpus = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1);
    let memory = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|m| {
            let line = m.lines().find(|l| l.starts_with("MemTotal:"))?.to_string();
            line.split_whitespace().nth(1)?.parse::<u64>().ok()
        })
        .map_or(0, |kib| kib * 1024);
    SystemInfo { cpus: cpus as u32, memory_bytes: memory, nics: nics() }
}

/// Interfaces other than loopback, with MAC and addresses ("10.0.0.5/24").
fn nics() -> Vec<Nic> {
    let mut by_name: BTreeMap<String, Vec<String>> = BTreeMap::new();
    if let Ok(dir) = std::fs::read_dir("/sys/class/net") {
        for e in dir.flatten() {
            by_name.entry(e.file_name().to_string_lossy().into_owned()).or_default();
        }
    }
    let mut ifap: *mut libc::ifaddrs = std::ptr::null_mut();
    // SAFETY: getifaddrs fills a list we walk read-only and free with freeifaddrs.
    if unsafe { libc::getifaddrs(&mut ifap) } == 0 {
        let mut p = ifap;
        while !p.is_null() {
            // SAFETY: p is a node of the list getifaddrs returned, valid until freeifaddrs.
            let ifa = unsafe { &*p };
            p = ifa.ifa_next;
            if ifa.ifa_addr.is_null() || ifa.ifa_name.is_null() {
                continue;
            }
            // SAFETY: ifa_name is a NUL-terminated string owned by the list.
            let name = unsafe { std::ffi::CStr::from_ptr(ifa.ifa_name) }.to_string_lossy().into_owned();
            // SAFETY: ifa_addr is non-null and its family says which sockaddr it is.
            let family = unsafe { (*ifa.ifa_addr).sa_family } as i32;
            let addr = match family {
                libc::AF_INET => {
                    // SAFETY: an AF_INET address is a sockaddr_in.
                    let a = unsafe { &*(ifa.ifa_addr as *const libc::sockaddr_in) };
                    let m = (!ifa.ifa_netmask.is_null())
                        // SAFETY: the netmask of an AF_INET address is a sockaddr_in.
                        .then(|| {
                            unsafe { &*(ifa.ifa_netmask as *const libc::sockaddr_in) }.sin_addr.s_addr.count_ones()
                        });
                    Some(format!("{}/{}", std::net::Ipv4Addr::from(u32::from_be(a.sin_addr.s_addr)), m.unwrap_or(32)))
                }
                libc::AF_INET6 => {
                    // SAFETY: an AF_INET6 address is a sockaddr_in6.
                    let a = unsafe { &*(ifa.ifa_addr as *const libc::sockaddr_in6) };
                    let m = (!ifa.ifa_netmask.is_null()).then(|| {
                        // SAFETY: the netmask of an AF_INET6 address is a sockaddr_in6.
                        let n = unsafe { &*(ifa.ifa_netmask as *const libc::sockaddr_in6) };
                        n.sin6_addr.s6_addr.iter().map(|b| b.count_ones()).sum::<u32>()
                    });
                    Some(format!("{}/{}", std::net::Ipv6Addr::from(a.sin6_addr.s6_addr), m.unwrap_or(128)))
                }
                _ => None,
            };
            if let Some(a) = addr {
                by_name.entry(name).or_default().push(a);
            }
        }
        // SAFETY: ifap came from getifaddrs and is freed once.
        unsafe { libc::freeifaddrs(ifap) };
    }
    by_name
        .into_iter()
        .filter(|(name, _)| name != "lo")
        .map(|(name, addresses)| {
            let mac = std::fs::read_to_string(format!("/sys/class/net/{name}/address")).unwrap_or_default();
            Nic { name, mac: mac.trim().to_string(), addresses }
        })
        .collect()
}
