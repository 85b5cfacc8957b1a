//! Resynchronization: the journal reaching its limit hands over to the dirty map, which survives a
//! SIGKILL of the agent and later ships just the dirty blocks; the replica ends byte-identical.

// Test code: a failed unwrap is a failed test, with its message.
#![allow(clippy::unwrap_used)]

use rand::{Rng, SeedableRng};
use sr_tests::*;
use std::collections::BTreeSet;
use std::time::Duration;

const MIB: u64 = 1 << 20;

/// A disk of `size` bytes whose first `data` bytes are random (incompressible).
fn random_disk(path: &std::path::Path, size: u64, data: u64, seed: u64) {
    use rand::RngCore;
    use std::os::unix::fs::FileExt;
    make_disk(path, size).unwrap();
    let f = std::fs::OpenOptions::new().write(true).open(path).unwrap();
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let mut buf = vec![0u8; MIB as usize];
    for i in 0..data / MIB {
        rng.fill_bytes(&mut buf);
        f.write_all_at(&buf, i * MIB).unwrap();
    }
}

/// Overwrites `share` of the 4 KiB blocks of `path` at random with junk; returns the blocks.
fn diverge(path: &std::path::Path, size: u64, share: f64, seed: u64) -> BTreeSet<u64> {
    use rand::RngCore;
    use std::os::unix::fs::FileExt;
    let f = std::fs::OpenOptions::new().write(true).open(path).unwrap();
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let n = ((size / 4096) as f64 * share) as usize;
    let mut blocks = BTreeSet::new();
    let mut junk = [0u8; 4096];
    while blocks.len() < n {
        let b = rng.gen_range(0..size / 4096);
        if blocks.insert(b) {
            rng.fill_bytes(&mut junk);
            f.write_all_at(&junk, b * 4096).unwrap();
        }
    }
    f.sync_all().unwrap();
    blocks
}

fn random_writes(rng: &mut rand::rngs::StdRng, size: u64, n: usize, blocks: &mut BTreeSet<u64>) -> Vec<String> {
    let mut cmds = Vec::new();
    for i in 0..n {
        let off = rng.gen_range(0..size / 4096) * 4096;
        blocks.insert(off / 4096);
        cmds.push(format!("write -P {} {off} 4k", (i % 200) + 1));
    }
    cmds.push("flush".into());
    cmds
}

#[test]
fn journal_overflow_falls_back_to_the_dirty_map_survives_sigkill_and_ships_only_dirty_blocks() {
    let mut rng = rand::rngs::StdRng::seed_from_u64(17);
    let dir = test_dir();
    let size = 64 * MIB;
    let disk = dir.path().join("source.img");
    make_disk(&disk, size).unwrap();
    run("qemu-io", &["-f", "raw", "-c", "write -P 0x42 0 8M", disk.to_str().unwrap()]).unwrap();
    let opts = Options { batch_bytes: 256 << 10, ..Options::default() };
    let local =
        Local::create(&dir.path().join("dep"), vec![DiskSpec { id: 1, name: "d".into(), path: disk.clone() }], &opts)
            .unwrap();
    let env = [("SR_AGENT__JOURNAL__LIMIT_BYTES", "1048576")];
    let _mt = local.start(Component::MasterTarget).unwrap();
    let ps = local.start(Component::ProcessServer).unwrap();
    let agent = local.start_env(Component::Agent, &env).unwrap();
    wait_caught_up(&local, Duration::from_secs(60)).unwrap();
    // The process server is gone: the journal cannot drain and soon reaches its 1 MiB limit.
    ps.kill();
    let uri = local.agent_uri("d");
    let mut blocks = BTreeSet::new();
    qemu_io(&uri, &random_writes(&mut rng, size, 600, &mut blocks)).unwrap();
    let st = local.agent_status().unwrap();
    assert_eq!(st["disks"][0]["overflow"], true, "{st}");
    let dirty = st["disks"][0]["dirty_bytes"].as_u64().unwrap();
    assert!(dirty > 0 && dirty <= blocks.len() as u64 * 4096, "{st}");
    // Killed in that mode and restarted: the dirty map is still there, and more writes join it.
    agent.kill();
    let _agent = local.start_env(Component::Agent, &env).unwrap();
    let st = local.agent_status().unwrap();
    assert!(st["disks"][0]["dirty_bytes"].as_u64().unwrap() >= dirty, "{st}");
    qemu_io(&uri, &random_writes(&mut rng, size, 300, &mut blocks)).unwrap();
    qemu_io(&uri, &["write -P 0x99 40M 3M".to_string(), "discard 50M 1M".to_string(), "flush".to_string()]).unwrap();
    (40 * MIB / 4096..43 * MIB / 4096).chain(50 * MIB / 4096..51 * MIB / 4096).for_each(|b| {
        blocks.insert(b);
    });
    // The process server is back: the journal drains, then the dirty blocks follow.
    let _ps = local.start(Component::ProcessServer).unwrap();
    wait_caught_up(&local, Duration::from_secs(120)).unwrap();
    compare(disk.to_str().unwrap(), &local.replica_uri(1)).unwrap();
    check_apply_log(&local, 1).unwrap();
    let resynced = metric(&local, Component::Agent, "sr_agent_resync_copied_bytes_total").unwrap() as u64;
    let touched = blocks.len() as u64 * 4096;
    assert!(resynced > 0, "nothing was resynchronized from the dirty map");
    assert!(resynced <= touched, "{resynced} bytes resynchronized, but only {touched} bytes of blocks were written");
}

#[test]
fn a_diverged_replica_is_resynced_by_checksums_shipping_only_what_differs() {
    let dir = test_dir();
    let size = 128 * MIB;
    let disk = dir.path().join("source.img");
    random_disk(&disk, size, 96 * MIB, 1);
    let local = Local::create(
        &dir.path().join("dep"),
        vec![DiskSpec { id: 1, name: "d".into(), path: disk.clone() }],
        &Options::default(),
    )
    .unwrap();
    let mt = local.start(Component::MasterTarget).unwrap();
    let _ps = local.start(Component::ProcessServer).unwrap();
    let _agent = local.start(Component::Agent).unwrap();
    wait_caught_up(&local, Duration::from_secs(120)).unwrap();
    // 1% of the replica's blocks overwritten while the master target is stopped.
    mt.kill();
    let blocks = diverge(&local.replica_path(1), size, 0.01, 2);
    let _mt = local.start(Component::MasterTarget).unwrap();
    assert!(compare(disk.to_str().unwrap(), &local.replica_uri(1)).is_err(), "the replica did not diverge");
    let (in_before, sums_before) = (
        metric(&local, Component::ProcessServer, "sr_process_server_received_bytes_total").unwrap(),
        metric(&local, Component::ProcessServer, "sr_process_server_checksum_bytes_total").unwrap(),
    );
    let v = local.post(Component::Agent, "/v1/resync", &serde_json::json!({})).unwrap();
    assert_eq!(v["resync"][0]["disk"], 1, "{v}");
    wait_caught_up(&local, Duration::from_secs(120)).unwrap();
    compare(disk.to_str().unwrap(), &local.replica_uri(1)).unwrap();
    let st = local.agent_status().unwrap();
    let differing = blocks.len() as u64 * 4096;
    assert_eq!(st["disks"][0]["resync"]["differing_bytes"].as_u64().unwrap(), differing, "{st}");
    let shipped =
        metric(&local, Component::ProcessServer, "sr_process_server_received_bytes_total").unwrap() - in_before;
    let sums =
        metric(&local, Component::ProcessServer, "sr_process_server_checksum_bytes_total").unwrap() - sums_before;
    eprintln!("differing {differing} bytes, shipped {shipped}, checksum traffic {sums}");
    assert!(shipped <= 1.1 * differing as f64, "{shipped} bytes shipped for {differing} differing bytes");
    assert!(sums > 0.0 && sums < size as f64 / 20.0, "checksum traffic of {sums} bytes");
}

#[test]
fn a_resync_interrupted_by_sigkill_of_each_service_resumes_where_it_stopped() {
    let dir = test_dir();
    let size = 256 * MIB;
    let disk = dir.path().join("source.img");
    random_disk(&disk, size, 8 * MIB, 3);
    let local = Local::create(
        &dir.path().join("dep"),
        vec![DiskSpec { id: 1, name: "d".into(), path: disk.clone() }],
        &Options::default(),
    )
    .unwrap();
    // A slow comparison (32 MB/s, 16 MiB regions) so every kill lands in the middle of it.
    let env = [("SR_AGENT__RESYNC__MAX_READ_MBPS", "32"), ("SR_AGENT__RESYNC__REGION_BYTES", "16777216")];
    let mut mt = Some(local.start(Component::MasterTarget).unwrap());
    let mut ps = Some(local.start(Component::ProcessServer).unwrap());
    let mut agent = Some(local.start_env(Component::Agent, &env).unwrap());
    wait_caught_up(&local, Duration::from_secs(120)).unwrap();
    mt.take().unwrap().kill();
    let blocks = diverge(&local.replica_path(1), size, 0.01, 4);
    mt = Some(local.start(Component::MasterTarget).unwrap());
    local.post(Component::Agent, "/v1/resync", &serde_json::json!({})).unwrap();
    let cursor = || local.agent_status().unwrap()["disks"][0]["resync"]["cursor"].as_u64().unwrap();
    let mut last = 0;
    for victim in [Component::Agent, Component::ProcessServer, Component::MasterTarget] {
        wait_for(&format!("the comparison to progress before {victim:?} is killed"), Duration::from_secs(60), || {
            cursor() > last
        });
        let before = cursor();
        assert!(before < size, "the comparison finished before {victim:?} was killed");
        match victim {
            Component::Agent => {
                agent.take().unwrap().kill();
                agent = Some(local.start_env(Component::Agent, &env).unwrap());
            }
            Component::ProcessServer => {
                ps.take().unwrap().kill();
                ps = Some(local.start(Component::ProcessServer).unwrap());
            }
            _ => {
                mt.take().unwrap().kill();
                mt = Some(local.start(Component::MasterTarget).unwrap());
            }
        }
        let after = cursor();
        assert!(after >= before && after > 0, "{victim:?}: the comparison went back from {before} to {after}");
        eprintln!("{victim:?} killed at {before} of {size}; resumed at {after}");
        last = after;
    }
    wait_caught_up(&local, Duration::from_secs(120)).unwrap();
    compare(disk.to_str().unwrap(), &local.replica_uri(1)).unwrap();
    let st = local.agent_status().unwrap();
    let differing = blocks.len() as u64 * 4096;
    assert_eq!(st["disks"][0]["resync"]["differing_bytes"].as_u64().unwrap(), differing, "{st}");
    assert!(st["disks"][0]["resync"]["compared_bytes"].as_u64().unwrap() < 2 * size, "{st}");
    drop((mt, ps, agent));
}

#[test]
fn scan_capture_ships_changes_written_straight_into_the_disk_file_within_the_interval() {
    use std::os::unix::fs::FileExt;
    let dir = test_dir();
    let size = 64 * MIB;
    let disk = dir.path().join("source.img");
    random_disk(&disk, size, 4 * MIB, 5);
    let opts = Options { scan_interval_secs: Some(1), ..Options::default() };
    let local =
        Local::create(&dir.path().join("dep"), vec![DiskSpec { id: 1, name: "d".into(), path: disk.clone() }], &opts)
            .unwrap();
    let _mt = local.start(Component::MasterTarget).unwrap();
    let _ps = local.start(Component::ProcessServer).unwrap();
    let _agent = local.start(Component::Agent).unwrap();
    wait_caught_up(&local, Duration::from_secs(60)).unwrap();
    compare(disk.to_str().unwrap(), &local.replica_uri(1)).unwrap();
    assert!(run("nbdinfo", &[&local.agent_uri("d")]).is_err(), "a scanned disk is not served over NBD");
    // Another program writes the file directly: no NBD, no journal.
    let f = std::fs::OpenOptions::new().write(true).open(&disk).unwrap();
    let mut rng = rand::rngs::StdRng::seed_from_u64(6);
    let mut changed = 0u64;
    for _ in 0..40 {
        let off = rng.gen_range(0..size - 8192);
        f.write_all_at(&[rng.gen::<u8>() | 1; 5000], off).unwrap();
        changed += 5000;
    }
    f.write_all_at(&vec![0u8; 2 << 20], 0).unwrap(); // zeroes over data
    f.sync_all().unwrap();
    let copied_before = metric(&local, Component::Agent, "sr_agent_resync_copied_bytes_total").unwrap();
    // Within the interval (1 s) plus shipping, the replica has the changes.
    wait_for("the scanned changes to reach the replica", Duration::from_secs(20), || {
        compare(disk.to_str().unwrap(), &local.replica_uri(1)).is_ok()
    });
    let copied = metric(&local, Component::Agent, "sr_agent_resync_copied_bytes_total").unwrap() - copied_before;
    // Changed 64 KiB blocks only: at most two per write, plus the 2 MiB of zeroes.
    assert!(copied <= (40 * 2 * 65536 + (2 << 20)) as f64, "{copied} bytes shipped for {changed} changed bytes");
    check_apply_log(&local, 1).unwrap();
}
