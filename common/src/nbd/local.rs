//! Who is on the other end of a loopback TCP connection: the user owning the connecting socket, as
//! the kernel lists it in `/proc/net/tcp` and `/proc/net/tcp6`. The agent serves the protected
//! machine's disks on loopback only to the users allowed to use them (as a block device's
//! permissions would).

use std::net::{IpAddr, SocketAddr};

/// The owner of the socket whose local end is `client` and whose remote end is `server`, from the
/// text of `/proc/net/tcp` or `/proc/net/tcp6`.
pub fn socket_owner(proc_net_tcp: &str, client: SocketAddr, server: SocketAddr) -> Option<u32> {
    let (want_local, want_remote) = (encode(client), encode(server));
    proc_net_tcp.lines().skip(1).find_map(|line| {
        let f: Vec<&str> = line.split_whitespace().collect();
        let (local, remote, uid) = (f.get(1)?, f.get(2)?, f.get(7)?);
        (local.eq_ignore_ascii_case(&want_local) && remote.eq_ignore_ascii_case(&want_remote))
            .then(|| uid.parse().ok())
            .flatten()
    })
}

/// The kernel's spelling of an address: each 32-bit word of the address in host (little-endian)
/// order as hex, then the port.
fn encode(a: SocketAddr) -> String {
    let ip = match a.ip() {
        IpAddr::V4(v4) => format!("{:08X}", u32::from_le_bytes(v4.octets())),
        IpAddr::V6(v6) => {
            v6.octets().chunks(4).map(|w| format!("{:08X}", u32::from_le_bytes([w[0], w[1], w[2], w[3]]))).collect()
        }
    };
    format!("{ip}:{:04X}", a.port())
}

/// [`socket_owner`] on this host's tables.
pub fn peer_uid(client: SocketAddr, server: SocketAddr) -> Option<u32> {
    let table = if client.is_ipv4() { "/proc/net/tcp" } else { "/proc/net/tcp6" };
    socket_owner(&std::fs::read_to_string(table).ok()?, client, server)
}

#[cfg(test)]
mod tests {
    use super::*;

    const TCP: &str = "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode
   0: 0100007F:2A29 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 1000 1 0000000000000000 100 0 0 10 0
   1: 0100007F:D8A2 0100007F:2A29 01 00000000:00000000 00:00000000 00000000  1001        0 2000 1 0000000000000000 20 4 30 10 -1
   2: 0100007F:2A29 0100007F:D8A2 01 00000000:00000000 00:00000000 00000000     0        0 3000 1 0000000000000000 20 4 30 10 -1
";

    #[test]
    fn the_connecting_sockets_owner_is_found() {
        let server: SocketAddr = "127.0.0.1:10793".parse().unwrap();
        let client: SocketAddr = "127.0.0.1:55458".parse().unwrap();
        assert_eq!(socket_owner(TCP, client, server), Some(1001), "the client's socket, not the server's");
        assert_eq!(socket_owner(TCP, "127.0.0.1:1".parse().unwrap(), server), None);
        assert_eq!(encode("[::1]:80".parse().unwrap()), "00000000000000000000000001000000:0050");
    }
}
