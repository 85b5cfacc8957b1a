//! Data safety of the source disk: an agent restart never writes older data over newer, whichever way
//! the newer data reached the disk (past the journal's limit through the dirty map, or written by the
//! machine straight into a scanned disk).

// Test code: a failed unwrap is a failed test, with its message.
#![allow(clippy::unwrap_used)]

use sr_tests::*;
use std::os::unix::fs::FileExt;
use std::time::Duration;

const MIB: u64 = 1 << 20;

fn one_disk(dir: &std::path::Path, disk: &std::path::Path, opts: &Options) -> Local {
    Local::create(&dir.join("dep"), vec![DiskSpec { id: 1, name: "d".into(), path: disk.to_path_buf() }], opts).unwrap()
}

fn read_at(path: &std::path::Path, offset: u64, len: usize) -> Vec<u8> {
    let mut buf = vec![0u8; len];
    std::fs::File::open(path).unwrap().read_exact_at(&mut buf, offset).unwrap();
    buf
}

#[test]
fn an_agent_restart_keeps_a_block_rewritten_past_the_journal_limit() {
    let dir = test_dir();
    let size = 64 * MIB;
    let disk = dir.path().join("source.img");
    make_disk(&disk, size).unwrap();
    let local = one_disk(dir.path(), &disk, &Options { batch_bytes: 256 << 10, ..Options::default() });
    let env = [("SR_AGENT__JOURNAL__LIMIT_BYTES", "1048576")];
    let _mt = local.start(Component::MasterTarget).unwrap();
    let ps = local.start(Component::ProcessServer).unwrap();
    let agent = local.start_env(Component::Agent, &env).unwrap();
    wait_caught_up(&local, Duration::from_secs(60)).unwrap();
    // The process server is gone: the journal cannot drain.
    ps.kill();
    let uri = local.agent_uri("d");
    // The first version of block 0 is journaled and flushed...
    qemu_io(&uri, &["write -P 0x11 0 4k".into(), "flush".into()]).unwrap();
    // ...the journal then fills up to its limit and past it...
    let fill: Vec<String> = (0..20).map(|i| format!("write -P 0x33 {} 64k", 8 * MIB + i * 65536)).collect();
    qemu_io(&uri, &fill).unwrap();
    let st = local.agent_status().unwrap();
    assert_eq!(st["disks"][0]["overflow"], true, "{st}");
    // ...and the second version of block 0 goes to the dirty map only, acknowledged and flushed.
    qemu_io(&uri, &["write -P 0x22 0 4k".into(), "flush".into(), "write -z 8M 64k".into(), "flush".into()]).unwrap();
    let st = local.agent_status().unwrap();
    assert_eq!(st["disks"][0]["mode"], "overflow", "{st}");
    agent.kill();
    let _agent = local.start_env(Component::Agent, &env).unwrap();
    // The restart redid nothing older over it: the disk holds what was acknowledged last.
    qemu_io(&uri, &["read -P 0x22 0 4k".into(), "read -P 0 8M 64k".into(), "read -P 0x33 8256k 1216k".into()]).unwrap();
    assert!(read_at(&disk, 0, 4096) == [0x22; 4096], "the restart rolled block 0 back");
    // And the replica follows the disk, not the stale journal record.
    let _ps = local.start(Component::ProcessServer).unwrap();
    wait_caught_up(&local, Duration::from_secs(120)).unwrap();
    compare(disk.to_str().unwrap(), &local.replica_uri(1)).unwrap();
    check_apply_log(&local, 1).unwrap();
}

#[test]
fn an_agent_restart_never_writes_a_scan_copy_over_a_newer_direct_write() {
    let dir = test_dir();
    let size = 16 * MIB;
    let disk = dir.path().join("source.img");
    make_disk(&disk, size).unwrap();
    // A long interval: the second write below lands well before the next scan.
    let local = one_disk(dir.path(), &disk, &Options { scan_interval_secs: Some(5), ..Options::default() });
    let _mt = local.start(Component::MasterTarget).unwrap();
    let ps = local.start(Component::ProcessServer).unwrap();
    let agent = local.start(Component::Agent).unwrap();
    wait_caught_up(&local, Duration::from_secs(60)).unwrap();
    ps.kill();
    let last_seq = || local.agent_status().unwrap()["disks"][0]["last_seq"].as_u64().unwrap();
    let before = last_seq();
    let f = std::fs::OpenOptions::new().write(true).open(&disk).unwrap();
    // The machine writes the disk directly; a scan copies the block into the journal...
    f.write_all_at(&[0xAA; 65536], 4 * MIB).unwrap();
    f.sync_all().unwrap();
    wait_for("the scan to journal the first write", Duration::from_secs(30), || last_seq() > before);
    // ...then the machine writes it again, and the agent dies before its next scan.
    f.write_all_at(&[0xBB; 65536], 4 * MIB).unwrap();
    f.sync_all().unwrap();
    agent.kill();
    let _agent = local.start(Component::Agent).unwrap();
    assert!(read_at(&disk, 4 * MIB, 65536) == [0xBB; 65536], "the restart wrote the journal's stale copy");
    let _ps = local.start(Component::ProcessServer).unwrap();
    // The next scans ship the newer block; the replica ends equal to the disk.
    wait_for("the replica to equal the disk", Duration::from_secs(60), || {
        compare(disk.to_str().unwrap(), &local.replica_uri(1)).is_ok()
    });
    check_apply_log(&local, 1).unwrap();
}

#[test]
fn a_full_journal_volume_hands_writes_to_the_dirty_map_and_loses_none() {
    let dir = test_dir();
    let size = 64 * MIB;
    let disk = dir.path().join("source.img");
    make_disk(&disk, size).unwrap();
    let local = one_disk(dir.path(), &disk, &Options { batch_bytes: 256 << 10, ..Options::default() });
    // The agent's state (journal, dirty map) on a 3 MiB volume; its journal limit (half the disk) is far
    // larger, so the volume fills first.
    let _volume = Tmpfs::mount(&local.root.join("agent"), "3m");
    let _mt = local.start(Component::MasterTarget).unwrap();
    let ps = local.start(Component::ProcessServer).unwrap();
    let agent = local.start(Component::Agent).unwrap();
    wait_caught_up(&local, Duration::from_secs(60)).unwrap();
    ps.kill();
    let uri = local.agent_uri("d");
    let writes = |first: u64, n: u64| -> Vec<String> {
        let mut c: Vec<String> =
            (first..first + n).map(|i| format!("write -P {} {} 96k", i % 250 + 1, i * 128 * 1024)).collect();
        c.push("flush".into());
        c
    };
    // 6 MiB of writes: the journal fills the volume part way; every write and flush still succeeds.
    qemu_io(&uri, &writes(0, 64)).unwrap();
    let st = local.agent_status().unwrap();
    assert_eq!(st["disks"][0]["mode"], "overflow", "{st}");
    assert!(st["disks"][0]["dirty_bytes"].as_u64().unwrap() > 0, "{st}");
    // Killed and restarted on the full volume: it starts, and takes more writes.
    agent.kill();
    let _agent = local.start(Component::Agent).unwrap();
    qemu_io(&uri, &writes(64, 64)).unwrap();
    let reads: Vec<String> = (0..128).map(|i| format!("read -P {} {} 96k", i % 250 + 1, i * 128 * 1024)).collect();
    qemu_io(&uri, &reads).unwrap();
    // Space returns once the process server is back: the journal drains, the dirty blocks follow.
    let _ps = local.start(Component::ProcessServer).unwrap();
    wait_caught_up(&local, Duration::from_secs(120)).unwrap();
    compare(disk.to_str().unwrap(), &local.replica_uri(1)).unwrap();
    check_apply_log(&local, 1).unwrap();
}

#[test]
fn a_failed_export_leaves_no_partial_image() {
    let dir = test_dir();
    let size = 16 * MIB;
    let disk = dir.path().join("source.img");
    make_disk(&disk, size).unwrap();
    run("qemu-io", &["-f", "raw", "-c", "write -P 0x42 0 6M", disk.to_str().unwrap()]).unwrap();
    let local = one_disk(dir.path(), &disk, &Options::default());
    let _mt = local.start(Component::MasterTarget).unwrap();
    let _ps = local.start(Component::ProcessServer).unwrap();
    let _agent = local.start(Component::Agent).unwrap();
    wait_caught_up(&local, Duration::from_secs(60)).unwrap();
    // The image's volume fills up part way through.
    let small = local.export_dir().join("small");
    std::fs::create_dir_all(&small).unwrap();
    let _full = Tmpfs::mount(&small, "1m");
    let out = small.join("replica.img");
    let body = serde_json::json!({ "item": local.item, "disk": 1, "path": out });
    let err = local.post(Component::MasterTarget, "/v1/export", &body).unwrap_err();
    assert!(format!("{err:#}").contains("partial file was removed"), "{err:#}");
    assert!(!out.exists(), "a partial image was left behind");
    // An export goes nowhere but the export directory.
    for outside in [dir.path().join("replica.img"), local.export_dir().join("../replica.img")] {
        let body = serde_json::json!({ "item": local.item, "disk": 1, "path": outside });
        let err = local
            .client(Component::MasterTarget)
            .unwrap()
            .post_json(local.addrs.mt_http, "/v1/export", &body)
            .unwrap_err();
        assert_eq!(err.status(), Some(400), "{err}");
        assert!(!outside.exists());
    }
    // Where there is room the same export succeeds.
    let out = local.export_dir().join("replica.img");
    let body = serde_json::json!({ "item": local.item, "disk": 1, "path": out });
    local.post(Component::MasterTarget, "/v1/export", &body).unwrap();
    compare(disk.to_str().unwrap(), out.to_str().unwrap()).unwrap();
}

#[test]
fn a_full_master_target_volume_stops_apply_without_harm_and_it_resumes_when_space_returns() {
    let dir = test_dir();
    let size = 64 * MIB;
    let disk = dir.path().join("source.img");
    make_disk(&disk, size).unwrap();
    let local = one_disk(dir.path(), &disk, &Options { batch_bytes: 1 << 20, ..Options::default() });
    // The replica, its undo journal and the state store on a 20 MiB volume.
    let volume = Tmpfs::mount(&local.root.join("mt"), "20m");
    let _mt = local.start(Component::MasterTarget).unwrap();
    let _ps = local.start(Component::ProcessServer).unwrap();
    let _agent = local.start(Component::Agent).unwrap();
    wait_caught_up(&local, Duration::from_secs(60)).unwrap();
    // 40 MiB of new data (and the old contents the undo journal keeps) cannot fit.
    let cmds: Vec<String> = (0..40).map(|i| format!("write -P {} {}M 1M", i + 1, i)).chain(["flush".into()]).collect();
    qemu_io(&local.agent_uri("d"), &cmds).unwrap();
    let log = local.log(Component::MasterTarget);
    wait_for("an apply to fail on the full volume", Duration::from_secs(120), || {
        std::fs::read_to_string(&log).unwrap_or_default().contains("rolled back")
    });
    // Space returns: the same batches apply, once each, and the replica equals the source.
    run("mount", &["-o", "remount,size=256m", volume.0.to_str().unwrap()]).unwrap();
    wait_caught_up(&local, Duration::from_secs(300)).unwrap();
    compare(disk.to_str().unwrap(), &local.replica_uri(1)).unwrap();
    check_apply_log(&local, 1).unwrap();
}

/// An ext4 image of `size` bytes holding `files` files of random data made from `seed`.
fn ext4_image(dir: &std::path::Path, name: &str, size: u64, files: usize, seed: u64) -> std::path::PathBuf {
    use rand::{RngCore, SeedableRng};
    let content = dir.join(format!("{name}.d"));
    std::fs::create_dir_all(&content).unwrap();
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    for i in 0..files {
        let mut data = vec![0u8; 256 << 10];
        rng.fill_bytes(&mut data);
        std::fs::write(content.join(format!("f{i}")), data).unwrap();
    }
    let img = dir.join(format!("{name}.img"));
    run(
        "mke2fs",
        &[
            "-q",
            "-F",
            "-t",
            "ext4",
            "-d",
            content.to_str().unwrap(),
            img.to_str().unwrap(),
            &format!("{}k", size >> 10),
        ],
    )
    .unwrap();
    img
}

#[test]
fn primary_lost_during_a_dirty_copy_fails_over_to_the_last_crash_consistent_point() {
    let dir = test_dir();
    let size = 64 * MIB;
    let gen1 = ext4_image(dir.path(), "gen1", size, 40, 1);
    let gen2 = ext4_image(dir.path(), "gen2", size, 120, 2);
    let disk = dir.path().join("source.img");
    std::fs::copy(&gen1, &disk).unwrap();
    // Small copy chunks and a small journal: the dirty copy takes many round trips.
    let opts = Options { batch_bytes: 128 << 10, copy_chunk_bytes: 64 << 10, ..Options::default() };
    let local = one_disk(dir.path(), &disk, &opts);
    let env = [("SR_AGENT__JOURNAL__LIMIT_BYTES", "524288")];
    let _mt = local.start(Component::MasterTarget).unwrap();
    let ps = local.start(Component::ProcessServer).unwrap();
    let agent = local.start_env(Component::Agent, &env).unwrap();
    wait_caught_up(&local, Duration::from_secs(120)).unwrap();
    // The new generation lands in one write past the journal's limit: it goes to the dirty map.
    ps.kill();
    let uri = local.agent_uri("d");
    qemu_io(&uri, &[format!("write -s {} 0 {}", gen2.display(), size), "flush".into()]).unwrap();
    // The write went to the dirty map. (The overflow flag itself may already be down again: with
    // nothing pending in the journal, the next check ends the dirty map's turn, and its blocks wait
    // for their copy.)
    let st = &local.agent_status().unwrap()["disks"][0];
    assert!(st["dirty_bytes"].as_u64().unwrap() > 0, "the new generation is in the dirty map: {st}");
    let _ps = local.start(Component::ProcessServer).unwrap();
    // The dirty blocks reach the master target in block order; part way, the primary site is lost.
    let points =
        || local.get(Component::MasterTarget, &format!("/v1/points?item={}", local.item)).unwrap()["disks"][0].clone();
    wait_for("the dirty copy to be part way applied", Duration::from_secs(120), || {
        let p = points();
        let open = p["inconsistent"].as_array().and_then(|w| w.last()).filter(|w| w["open"] == true).cloned();
        open.is_some_and(|w| p["latest_seq"].as_u64().unwrap() > w["begin_seq"].as_u64().unwrap() + 2)
    });
    agent.kill();
    let p = points();
    let window = p["inconsistent"].as_array().unwrap().last().unwrap().clone();
    assert_eq!(window["open"], true, "the copy finished before the primary was lost: {p}");
    assert!(window["seconds"].as_f64().unwrap() >= 0.0, "{p}");
    // Failover to the latest point: the state before the window, a file system that checks clean.
    let out = local.export_dir().join("failover.img");
    let body = serde_json::json!({ "item": local.item, "disk": 1, "path": out, "point": "latest" });
    local.post(Component::MasterTarget, "/v1/export", &body).unwrap();
    compare(gen1.to_str().unwrap(), out.to_str().unwrap()).unwrap();
    run("e2fsck", &["-fn", out.to_str().unwrap()]).unwrap();
    // Naming the torn state explicitly still works, with a warning.
    let body = serde_json::json!({ "item": local.item, "disk": 1, "path": local.export_dir().join("torn.img"),
        "point": { "seq": p["latest_seq"] } });
    let r = local.post(Component::MasterTarget, "/v1/export", &body).unwrap();
    assert!(r.to_string().contains("not crash-consistent"), "{r}");
}

#[test]
fn a_full_process_server_cache_volume_holds_writes_back_and_loses_none() {
    let dir = test_dir();
    let size = 64 * MIB;
    let disk = dir.path().join("source.img");
    make_disk(&disk, size).unwrap();
    let local = one_disk(dir.path(), &disk, &Options { batch_bytes: 256 << 10, ..Options::default() });
    // The cache on a 3 MiB volume, far below its configured limit; the master target is away, so
    // nothing leaves the cache.
    let _volume = Tmpfs::mount(&local.root.join("ps"), "3m");
    let mt = local.start(Component::MasterTarget).unwrap();
    let _ps = local.start(Component::ProcessServer).unwrap();
    let _agent = local.start(Component::Agent).unwrap();
    wait_caught_up(&local, Duration::from_secs(60)).unwrap();
    mt.kill();
    // Incompressible data: the cache holds batches compressed and sealed.
    let noise = dir.path().join("noise.bin");
    std::fs::write(&noise, (0..MIB).map(|_| rand::random::<u8>()).collect::<Vec<u8>>()).unwrap();
    let cmds: Vec<String> =
        (0..12).map(|i| format!("write -s {} {i}M 1M", noise.display())).chain(["flush".into()]).collect();
    qemu_io(&local.agent_uri("d"), &cmds).unwrap();
    // The agent keeps what the cache cannot take: more journaled than the volume holds.
    wait_for("the agent to hold the writes back", Duration::from_secs(60), || {
        let st = local.agent_status().unwrap();
        let d = &st["disks"][0];
        d["last_seq"].as_u64().unwrap() > d["acked_seq"].as_u64().unwrap()
    });
    // Held back, not refused: the agent's session stays up while the volume is full (a refused
    // session costs the agent a reconnect each time, and then back-off delays long past the outage).
    let reconnects = metric(&local, Component::Agent, "sr_agent_reconnects_total").unwrap();
    wait_for("the process server to hold the agent back", Duration::from_secs(30), || {
        metric(&local, Component::ProcessServer, "sr_process_server_backpressure_waits_total").unwrap() >= 3.0
    });
    assert_eq!(metric(&local, Component::Agent, "sr_agent_reconnects_total").unwrap(), reconnects);
    let _mt = local.start(Component::MasterTarget).unwrap();
    wait_caught_up(&local, Duration::from_secs(180)).unwrap();
    compare(disk.to_str().unwrap(), &local.replica_uri(1)).unwrap();
    check_apply_log(&local, 1).unwrap();
}
