//! End-to-end replication: the three real binaries on loopback, real NBD clients writing through the
//! agent, and `qemu-img compare` proving the replica equals the source.

// Test code: a failed unwrap is a failed test, with its message.
#![allow(clippy::unwrap_used)]

use sr_tests::*;
use std::time::Duration;

const MIB: u64 = 1 << 20;

fn setup(dir: &std::path::Path, size: u64, opts: Options) -> Local {
    let disk = dir.join("source.img");
    make_disk(&disk, size).unwrap();
    // Some data before protection starts, for the initial copy to carry.
    run("qemu-io", &["-f", "raw", "-c", "write -P 0x11 1M 3M", "-c", "write -P 0x22 17M 64k", disk.to_str().unwrap()])
        .unwrap();
    Local::create(&dir.join("dep"), vec![DiskSpec { id: 1, name: "disk0".into(), path: disk }], &opts).unwrap()
}

/// qemu-io commands covering aligned, unaligned, sub-block and multi-MiB writes, flushes, trims and
/// zero writes at pseudo-random offsets.
fn workload(seed: u64, size: u64, n: usize) -> Vec<String> {
    let mut x = seed;
    let mut next = || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x
    };
    let mut cmds = Vec::new();
    for i in 0..n {
        let kind = next() % 10;
        let len = match next() % 4 {
            0 => 512,
            1 => 4096,
            2 => 1 + next() % 70000,
            _ => MIB + next() % (3 * MIB),
        };
        let off = next() % (size - len);
        let off = if next() % 2 == 0 { off / 4096 * 4096 } else { off };
        let pat = (i % 250) + 1;
        cmds.push(match kind {
            0 => "flush".to_string(),
            1 => format!("discard {off} {len}"),
            2 => format!("write -z {off} {len}"),
            _ => format!("write -P {pat} {off} {len}"),
        });
    }
    cmds
}

#[test]
fn replica_equals_source_after_mixed_writes() {
    let dir = test_dir();
    let size = 64 * MIB;
    let local = setup(dir.path(), size, Options::default());
    let _mt = local.start(Component::MasterTarget).unwrap();
    let _ps = local.start(Component::ProcessServer).unwrap();
    let agent = local.start(Component::Agent).unwrap();
    // Shipping yields to the front end on a busy core: its threads run at the agent's nice value plus
    // ship.nice (10 by default), the rest as the agent was started.
    let nices = thread_nices(agent.pid().unwrap());
    let base = nices.iter().find(|(c, _)| c == "mobility-agent").unwrap().1;
    let ship: Vec<i64> = nices.iter().filter(|(c, _)| c == "ship").map(|(_, n)| *n).collect();
    assert!(!ship.is_empty() && ship.iter().all(|n| *n == (base + 10).min(19)), "nice values: {nices:?}");
    let front = ["nbd-accept-tcp", "nbd-accept-unix", "tokio-rt-worker"];
    assert!(nices.iter().filter(|(c, _)| front.contains(&c.as_str())).all(|(_, n)| *n == base), "{nices:?}");
    let uri = local.agent_uri("disk0");
    for round in 0..4 {
        qemu_io(&uri, &workload(round + 1, size, 60)).unwrap();
    }
    // The same export over the agent's Unix socket.
    let unix = format!("nbd+unix:///disk0?socket={}", local.addrs.agent_unix.display());
    qemu_io(&unix, &["write -P 0x77 33M 3M".to_string(), "flush".to_string(), "read -P 0x77 33M 3M".to_string()])
        .unwrap();
    let nbdinfo = run("nbdinfo", &["--size", &uri]).unwrap();
    assert_eq!(nbdinfo.trim(), size.to_string());
    // nbdcopy reads the whole export, then writes a whole image through it with several connections
    // (data, zeroes and holes: it zeroes or trims what the source leaves empty).
    let copy = dir.path().join("copy.img");
    run("nbdcopy", &[&uri, copy.to_str().unwrap()]).unwrap();
    compare(local.disks[0].path.to_str().unwrap(), copy.to_str().unwrap()).unwrap();
    let payload = dir.path().join("payload.img");
    make_disk(&payload, size).unwrap();
    run(
        "qemu-io",
        &[
            "-f",
            "raw",
            "-c",
            "write -P 0x5a 0 5M",
            "-c",
            "write -P 0xa5 9M 1M",
            "-c",
            "write -P 0x3c 40M 700k",
            payload.to_str().unwrap(),
        ],
    )
    .unwrap();
    run("nbdcopy", &["--flush", "--connections=4", payload.to_str().unwrap(), &uri]).unwrap();
    qemu_io(&uri, &workload(99, size, 40)).unwrap();
    qemu_io(&uri, &["flush".to_string()]).unwrap();
    wait_caught_up(&local, Duration::from_secs(120)).unwrap();
    let source = local.disks[0].path.to_str().unwrap().to_string();
    compare(&source, &local.replica_uri(1)).unwrap();
    compare(&source, local.replica_path(1).to_str().unwrap()).unwrap();
    check_apply_log(&local, 1).unwrap();
    check_metrics(&local);
    // The comparison can fail: a byte changed behind the agent's back is found.
    run("qemu-io", &["-f", "raw", "-c", "write -P 0x01 5000 1", &source]).unwrap();
    assert!(compare(&source, &local.replica_uri(1)).is_err(), "qemu-img compare must see a one-byte difference");
}

/// (name, nice value) of each thread of process `pid`.
fn thread_nices(pid: u32) -> Vec<(String, i64)> {
    let mut out = Vec::new();
    for t in std::fs::read_dir(format!("/proc/{pid}/task")).unwrap() {
        // A thread that ended since the listing is skipped.
        let Ok(stat) = std::fs::read_to_string(t.unwrap().path().join("stat")) else { continue };
        let (head, rest) = stat.rsplit_once(')').unwrap();
        let name = head.split_once('(').unwrap().1.to_string();
        // Fields after the name start at the state (field 3); the nice value is field 19.
        let nice = rest.split_whitespace().nth(16).unwrap().parse().unwrap();
        out.push((name, nice));
    }
    out
}

fn check_metrics(local: &Local) {
    let want: &[(Component, &[&str])] = &[
        (
            Component::Agent,
            &[
                "sr_agent_written_bytes_total",
                "sr_agent_shipped_bytes_total",
                "sr_agent_batches_shipped_total",
                "sr_agent_journal_bytes",
                "sr_agent_durable_acked_seq",
                "sr_agent_replication_lag_changes",
                "sr_nbd_requests_total",
            ],
        ),
        (
            Component::ProcessServer,
            &[
                "sr_process_server_received_bytes_total",
                "sr_process_server_forwarded_bytes_total",
                "sr_process_server_batches_received_total",
                "sr_process_server_batches_forwarded_total",
                "sr_process_server_cache_bytes",
                "sr_process_server_applied_seq",
                "sr_process_server_replication_lag_changes",
            ],
        ),
        (
            Component::MasterTarget,
            &[
                "sr_master_target_received_bytes_total",
                "sr_master_target_batches_applied_total",
                "sr_master_target_applied_seq",
                "sr_master_target_applied_bytes_total",
                "sr_master_target_last_apply_timestamp_seconds",
            ],
        ),
    ];
    let ca = std::fs::read_to_string(local.certs.join("ca.pem")).unwrap();
    for (c, names) in want {
        // Health and metrics are open to a client without a certificate (Prometheus, probes); the
        // API is not.
        let role = match c {
            Component::Agent => sr_common::wire::Role::Agent,
            Component::ProcessServer => sr_common::wire::Role::ProcessServer,
            _ => sr_common::wire::Role::MasterTarget,
        };
        let anonymous = sr_common::http::Client::new(sr_common::tls::ServerTrust::Ca(&ca, role)).unwrap();
        let (code, body) = anonymous.request(local.http(*c), "GET", "/metrics", None).unwrap();
        assert_eq!(code, 200);
        for n in *names {
            assert!(body.lines().any(|l| l.starts_with(n)), "{} /metrics lacks {n}:\n{body}", c.binary());
        }
        let (code, body) = anonymous.request(local.http(*c), "GET", "/healthz", None).unwrap();
        assert_eq!((code, body.trim()), (200, "ok"));
        let (code, body) = anonymous.request(local.http(*c), "GET", "/v1/status", None).unwrap();
        assert_eq!(code, 401, "{} /v1/status without a certificate: {body}", c.binary());
    }
}

#[test]
fn full_cache_is_backpressure_not_loss() {
    let dir = test_dir();
    let size = 64 * MIB;
    // A 2 MiB cache and 256 KiB batches: with the master target down, the process server stops
    // acknowledging after a few batches and the agent keeps the rest in its journal.
    let opts = Options { batch_bytes: 256 << 10, ps_cache_limit_bytes: 2 * MIB, ..Options::default() };
    let local = setup(dir.path(), size, opts);
    let mt = local.start(Component::MasterTarget).unwrap();
    let _ps = local.start(Component::ProcessServer).unwrap();
    let _agent = local.start(Component::Agent).unwrap();
    wait_caught_up(&local, Duration::from_secs(60)).unwrap();
    mt.stop().unwrap();
    let waits = metric(&local, Component::ProcessServer, "sr_process_server_backpressure_waits_total").unwrap();
    let uri = local.agent_uri("disk0");
    // Incompressible data: the cache holds batches compressed and sealed.
    let noise = dir.path().join("noise.bin");
    std::fs::write(&noise, (0..MIB).map(|_| rand::random::<u8>()).collect::<Vec<u8>>()).unwrap();
    let mut cmds: Vec<String> = (0..30).map(|i| format!("write -s {} {}M 1M", noise.display(), i * 2)).collect();
    cmds.push("flush".into());
    qemu_io(&uri, &cmds).unwrap();
    // The journal holds what the process server could not take. Once the process server holds the agent
    // back (its cache at the limit), nothing more enters the cache while the master target is away.
    let (st, cache) = wait_until("the process server to hold the agent back", Duration::from_secs(30), || {
        let st = local.agent_status().unwrap();
        let (acked, last) =
            (st["disks"][0]["acked_seq"].as_u64().unwrap(), st["disks"][0]["last_seq"].as_u64().unwrap());
        let ps = local.get(Component::ProcessServer, "/v1/status").unwrap();
        let cache = ps["streams"][0]["cache_bytes"].as_u64().unwrap();
        let held =
            metric(&local, Component::ProcessServer, "sr_process_server_backpressure_waits_total").unwrap() > waits;
        (acked < last && cache > 0 && held).then_some((st, cache))
    });
    // The limit is checked before each batch: at most one batch (a few records) beyond it.
    assert!(cache <= 4 * MIB, "cache grew to {cache} bytes past its limit");
    let journal = st["disks"][0]["journal_bytes"].as_u64().unwrap();
    assert!(journal > 20 * MIB, "the agent keeps the unacknowledged changes ({journal} bytes)");
    let _mt = local.start(Component::MasterTarget).unwrap();
    wait_caught_up(&local, Duration::from_secs(120)).unwrap();
    compare(local.disks[0].path.to_str().unwrap(), &local.replica_uri(1)).unwrap();
    check_apply_log(&local, 1).unwrap();
}

#[test]
fn a_lost_replica_is_refused_not_silently_recreated() {
    let dir = test_dir();
    let local = setup(dir.path(), 32 * MIB, Options::default());
    let mt = local.start(Component::MasterTarget).unwrap();
    let _ps = local.start(Component::ProcessServer).unwrap();
    let _agent = local.start(Component::Agent).unwrap();
    wait_caught_up(&local, Duration::from_secs(60)).unwrap();
    mt.stop().unwrap();
    std::fs::remove_file(local.replica_path(1)).unwrap();
    let _mt = local.start(Component::MasterTarget).unwrap();
    qemu_io(&local.agent_uri("disk0"), &["write -P 0x44 0 1M".to_string(), "flush".to_string()]).unwrap();
    wait_for("the process server to be told why", Duration::from_secs(30), || {
        std::fs::read_to_string(local.log(Component::ProcessServer)).unwrap().contains("is missing")
    });
    assert!(!local.replica_path(1).exists(), "an empty replica must not be made in its place");
    let log = std::fs::read_to_string(local.log(Component::MasterTarget)).unwrap();
    assert!(log.contains("replica unusable") && log.contains("needs a resync"), "{log}");
}
