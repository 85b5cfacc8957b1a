//! Real NBD clients against the agent's export: fio with data verification at queue depth 1 and 32,
//! a malformed client that must get errors or a closed connection while others are served, and block
//! status (nbdinfo --map, qemu-img map) on the agent's and the replica's exports.

// Test code: a failed unwrap is a failed test, with its message.
#![allow(clippy::unwrap_used)]

use sr_tests::*;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::Duration;

const MIB: u64 = 1 << 20;

fn start(dir: &std::path::Path, size: u64) -> (Local, Vec<Proc>) {
    let disk = dir.join("source.img");
    make_disk(&disk, size).unwrap();
    let local = Local::create(
        &dir.join("dep"),
        vec![DiskSpec { id: 1, name: "disk0".into(), path: disk }],
        &Options::default(),
    )
    .unwrap();
    let procs = vec![
        local.start(Component::MasterTarget).unwrap(),
        local.start(Component::ProcessServer).unwrap(),
        local.start(Component::Agent).unwrap(),
    ];
    (local, procs)
}

#[test]
fn fio_verified_random_and_sequential_at_qd1_and_qd32() {
    let dir = test_dir();
    let size = 64 * MIB;
    let (local, _procs) = start(dir.path(), size);
    let uri = local.agent_uri("disk0");
    for (rw, bs, qd, offset) in
        [("randwrite", "4k", 1, 0), ("randwrite", "4k", 32, 16), ("write", "1m", 1, 32), ("write", "1m", 32, 48)]
    {
        let out = run(
            "fio",
            &[
                "--name=verify",
                "--ioengine=nbd",
                &format!("--uri={uri}"),
                &format!("--rw={rw}"),
                &format!("--bs={bs}"),
                &format!("--iodepth={qd}"),
                &format!("--offset={offset}M"),
                "--size=16M",
                "--verify=crc32c",
                "--verify_fatal=1",
                "--do_verify=1",
                "--randrepeat=0",
                "--output-format=terse",
            ],
        )
        .unwrap_or_else(|e| panic!("fio {rw} bs={bs} qd={qd}: {e:#}"));
        assert!(!out.is_empty());
    }
    run("qemu-io", &["-f", "raw", "-c", "flush", &uri]).unwrap();
    wait_caught_up(&local, Duration::from_secs(120)).unwrap();
    compare(local.disks[0].path.to_str().unwrap(), &local.replica_uri(1)).unwrap();
}

/// A hand-rolled NBD client that can misbehave.
struct Raw {
    s: TcpStream,
}

impl Raw {
    fn connect(addr: std::net::SocketAddr) -> Raw {
        let s = TcpStream::connect(addr).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let mut r = Raw { s };
        let mut greet = [0u8; 18];
        r.s.read_exact(&mut greet).unwrap();
        assert_eq!(&greet[0..8], b"NBDMAGIC");
        assert_eq!(&greet[8..16], b"IHAVEOPT");
        r
    }

    /// Fixed newstyle + NO_ZEROES, then OPT_GO for `name`. Returns the export size.
    fn go(addr: std::net::SocketAddr, name: &str) -> (Raw, u64) {
        let mut r = Raw::connect(addr);
        r.s.write_all(&3u32.to_be_bytes()).unwrap();
        let mut opt = b"IHAVEOPT".to_vec();
        opt.extend_from_slice(&7u32.to_be_bytes());
        opt.extend_from_slice(&((4 + name.len() + 2) as u32).to_be_bytes());
        opt.extend_from_slice(&(name.len() as u32).to_be_bytes());
        opt.extend_from_slice(name.as_bytes());
        opt.extend_from_slice(&0u16.to_be_bytes());
        r.s.write_all(&opt).unwrap();
        let mut size = 0;
        loop {
            let mut h = [0u8; 20];
            r.s.read_exact(&mut h).unwrap();
            let kind = u32::from_be_bytes(h[12..16].try_into().unwrap());
            let len = u32::from_be_bytes(h[16..20].try_into().unwrap()) as usize;
            let mut d = vec![0u8; len];
            r.s.read_exact(&mut d).unwrap();
            if kind == 3 && u16::from_be_bytes(d[0..2].try_into().unwrap()) == 0 {
                size = u64::from_be_bytes(d[2..10].try_into().unwrap());
            }
            if kind == 1 {
                return (r, size);
            }
            assert!(kind < 0x8000_0000, "option error {kind:#x}");
        }
    }

    fn request(&mut self, cmd: u16, offset: u64, len: u32, payload: &[u8]) {
        let mut h = Vec::with_capacity(28 + payload.len());
        h.extend_from_slice(&0x2560_9513u32.to_be_bytes());
        h.extend_from_slice(&0u16.to_be_bytes());
        h.extend_from_slice(&cmd.to_be_bytes());
        h.extend_from_slice(&0xabcdu64.to_be_bytes());
        h.extend_from_slice(&offset.to_be_bytes());
        h.extend_from_slice(&len.to_be_bytes());
        h.extend_from_slice(payload);
        self.s.write_all(&h).unwrap();
    }

    /// Reads a simple reply; returns its error code, or None when the server closed the connection.
    fn reply(&mut self) -> Option<u32> {
        let mut h = [0u8; 16];
        self.s.read_exact(&mut h).ok()?;
        assert_eq!(u32::from_be_bytes(h[0..4].try_into().unwrap()), 0x6744_6698);
        Some(u32::from_be_bytes(h[4..8].try_into().unwrap()))
    }

    fn closed(&mut self) -> bool {
        let mut b = [0u8; 1];
        matches!(self.s.read(&mut b), Ok(0) | Err(_))
    }
}

#[test]
fn malformed_clients_get_errors_and_others_are_still_served() {
    let dir = test_dir();
    let size = 16 * MIB;
    let (local, _procs) = start(dir.path(), size);
    let addr = local.addrs.agent_nbd;
    let uri = local.agent_uri("disk0");
    run("qemu-io", &["-f", "raw", "-c", "write -P 0x61 0 2M", &uri]).unwrap();

    // Garbage instead of client flags and options: the connection is closed.
    let mut r = Raw::connect(addr);
    r.s.write_all(&[0xff; 64]).unwrap();
    assert!(r.closed(), "garbage handshake must close the connection");

    // Unknown export name: an error reply, and the connection stays in negotiation.
    let mut r = Raw::connect(addr);
    r.s.write_all(&3u32.to_be_bytes()).unwrap();
    let mut opt = b"IHAVEOPT".to_vec();
    opt.extend_from_slice(&7u32.to_be_bytes());
    opt.extend_from_slice(&9u32.to_be_bytes());
    opt.extend_from_slice(&3u32.to_be_bytes());
    opt.extend_from_slice(b"nop");
    opt.extend_from_slice(&0u16.to_be_bytes());
    r.s.write_all(&opt).unwrap();
    let mut h = [0u8; 20];
    r.s.read_exact(&mut h).unwrap();
    assert_eq!(u32::from_be_bytes(h[12..16].try_into().unwrap()), 0x8000_0006, "NBD_REP_ERR_UNKNOWN");

    let (mut r, sz) = Raw::go(addr, "disk0");
    assert_eq!(sz, size);
    // A write past the end: ENOSPC, nothing written, connection still usable.
    r.request(1, size - 512, 4096, &[0xee; 4096]);
    assert_eq!(r.reply(), Some(28));
    // A read past the end and an offset that overflows: EINVAL.
    r.request(0, size - 512, 4096, &[]);
    assert_eq!(r.reply(), Some(22));
    r.request(0, u64::MAX - 10, 4096, &[]);
    assert_eq!(r.reply(), Some(22));
    // An oversized read: EINVAL, still usable.
    r.request(0, 0, 64 << 20, &[]);
    assert_eq!(r.reply(), Some(22));
    // An unknown command: EINVAL.
    r.request(42, 0, 0, &[]);
    assert_eq!(r.reply(), Some(22));
    // A valid read still works on the same connection.
    r.request(0, 0, 4096, &[]);
    assert_eq!(r.reply(), Some(0));
    let mut data = vec![0u8; 4096];
    r.s.read_exact(&mut data).unwrap();
    assert!(data.iter().all(|b| *b == 0x61));
    // An oversized write cannot be skipped: EINVAL, then the connection is closed.
    r.request(1, 0, 64 << 20, &[]);
    assert_eq!(r.reply(), Some(22));
    assert!(r.closed());

    // A request with a bad magic closes the connection.
    let (mut r, _) = Raw::go(addr, "disk0");
    r.s.write_all(&[0u8; 28]).unwrap();
    assert!(r.closed());

    // A client that vanishes in the middle of a write payload.
    let (mut r, _) = Raw::go(addr, "disk0");
    r.request(1, 0, 65536, &[0x99; 1000]);
    drop(r);

    // Everyone else is still served, and the journal still carries exactly what was written.
    run("qemu-io", &["-f", "raw", "-c", "write -P 0x62 1M 1M", "-c", "read -P 0x61 0 1M", "-c", "flush", &uri])
        .unwrap();
    wait_caught_up(&local, Duration::from_secs(60)).unwrap();
    compare(local.disks[0].path.to_str().unwrap(), &local.replica_uri(1)).unwrap();
    check_apply_log(&local, 1).unwrap();
}

/// The data extents (offset, length) of an NBD export as `nbdinfo --map` (libnbd's block status)
/// reads them; every other byte is reported as a hole that reads as zeroes.
fn data_extents(uri: &str) -> Vec<(u64, u64)> {
    let out = run("nbdinfo", &["--map", "--json", uri]).unwrap();
    let map: Vec<serde_json::Value> = serde_json::from_str(&out).unwrap();
    let mut data = Vec::new();
    for e in map {
        let (offset, length, kind) = (e["offset"].as_u64().unwrap(), e["length"].as_u64().unwrap(), e["type"].as_u64());
        match kind {
            Some(0) => data.push((offset, length)),
            Some(3) => {}
            other => panic!("{uri}: unexpected extent type {other:?} in {out}"),
        }
    }
    data
}

#[test]
fn block_status_lets_real_clients_skip_the_holes_of_the_agents_and_the_replicas_exports() {
    let dir = test_dir();
    let size = 64 * MIB;
    let (local, _procs) = start(dir.path(), size);
    let uri = local.agent_uri("disk0");
    run(
        "qemu-io",
        &[
            "-f",
            "raw",
            "-c",
            "write -P 0x11 8M 1M",
            "-c",
            "write -P 0x22 40M 64k",
            "-c",
            "write -z -u 40M 4k",
            "-c",
            "flush",
            &uri,
        ],
    )
    .unwrap();
    let want = vec![(8 * MIB, MIB), (40 * MIB + 4096, 60 << 10)];
    assert_eq!(data_extents(&uri), want, "the agent's export");
    // qemu-img reads the same map through qemu's own NBD client.
    let map = run("qemu-img", &["map", "--output=json", "-f", "raw", &uri]).unwrap();
    let map: Vec<serde_json::Value> = serde_json::from_str(&map).unwrap();
    let data: Vec<(u64, u64)> = map
        .iter()
        .filter(|e| e["data"] == true)
        .map(|e| (e["start"].as_u64().unwrap(), e["length"].as_u64().unwrap()))
        .collect();
    assert_eq!(data, want, "qemu-img map: {map:?}");
    // nbdcopy copies the export and its destination is the source byte for byte.
    let copy = dir.path().join("copy.img");
    run("nbdcopy", &[&uri, copy.to_str().unwrap()]).unwrap();
    compare(local.disks[0].path.to_str().unwrap(), copy.to_str().unwrap()).unwrap();

    // The master target's replica export (TLS) has the same holes once it caught up.
    wait_caught_up(&local, Duration::from_secs(60)).unwrap();
    let replica = data_extents(&local.replica_uri(1));
    for (o, l) in &want {
        assert!(
            replica.iter().any(|(ro, rl)| ro <= o && o + l <= ro + rl),
            "the replica lacks data at {o}: {replica:?}"
        );
    }
    let data: u64 = replica.iter().map(|(_, l)| l).sum();
    assert!(data <= 2 * MIB, "the replica reports {data} bytes of data for 1 MiB written: {replica:?}");
    compare(local.disks[0].path.to_str().unwrap(), &local.replica_uri(1)).unwrap();
}
