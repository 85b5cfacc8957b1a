//! Time from request to a readable disk, for the latest point and for a point `HOURS` back (default
//! 720: 30 days), on a sparse 1 GiB and a sparse 64 GiB disk, measured on the real master-target
//! binary (HTTP request to create the view, then the first NBD read by `qemu-io`), with its start
//! time and memory. The churn is simulated: the undo journal is filled through the library with
//! changes whose capture times span `HOURS`, then the binary starts on that data directory. Beside it, in the same run: a qcow2 overlay on the
//! replica served by qemu-nbd (the usual way to get a writable test disk of the latest state) and a
//! sparse full copy of the replica (the usual way to get an old state from a backup).
//!
//!   bench/points.sh                                   # builds the binaries, then runs this
//!   BATCHES=4320 WRITES=48 HOURS=720 cargo bench -p master-target --bench points

#![allow(clippy::unwrap_used, clippy::expect_used)]

use master_target::replica::Replica;
use master_target::undo::Undo;
use rand::{Rng, SeedableRng};
use sr_common::disk::DiskFile;
use sr_common::state::{RedbStore, StateStore, StreamRecord};
use sr_common::types::{DiskId, ItemId, Seq, StreamKey};
use sr_common::wire::{Batch, Change, MarkerKind, Op};
use sr_devkit::{Component, DiskSpec, Local, Options};
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

const HOUR_US: u64 = 3_600_000_000;

fn env(name: &str, default: u64) -> u64 {
    std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

fn wait_readable(uri: &str, timeout: Duration) -> Duration {
    let started = Instant::now();
    // A path, nbd:// or nbds:// (the master target's exports are TLS only).
    let image = sr_devkit::qemu_image(uri, "tls0").expect("an image qemu can open");
    let mut args: Vec<&str> = vec!["-r"];
    for o in &image.objects {
        args.extend(["--object", o]);
    }
    args.extend(["--image-opts", &image.opts, "-c", "read 0 4k"]);
    loop {
        let ok = Command::new("qemu-io")
            .args(&args)
            .output()
            .is_ok_and(|o| o.status.success() && !String::from_utf8_lossy(&o.stdout).contains("error"));
        if ok {
            return started.elapsed();
        }
        assert!(started.elapsed() < timeout, "{uri} never became readable");
        std::thread::sleep(Duration::from_millis(5));
    }
}

fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| s.lines().find(|l| l.starts_with("VmRSS:"))?.split_whitespace().nth(1)?.parse().ok())
        .unwrap_or(0)
}

struct Row {
    disk: String,
    what: String,
    ms: Option<f64>,
    note: String,
}

fn one_disk(size: u64, batches: u64, writes: u64, hours: u64, rows: &mut Vec<Row>) {
    let span = hours * HOUR_US;
    let back = if hours.is_multiple_of(24) { format!("{} days", hours / 24) } else { format!("{hours} h") };
    let dir = tempfile::tempdir_in(std::env::var("BENCH_DIR").unwrap_or_else(|_| "bench/out".into())).unwrap();
    let source = dir.path().join("source.img");
    std::fs::File::create(&source).unwrap().set_len(size).unwrap();
    let local = Local::create(
        &dir.path().join("dep"),
        vec![DiskSpec { id: 1, name: "d".into(), path: source }],
        &Options::default(),
    )
    .unwrap();
    let key = StreamKey { item: ItemId(local.item), disk: DiskId(1) };
    let mt_dir = local.root.join("mt");
    let name = master_target::export_name(key);
    std::fs::create_dir_all(mt_dir.join("replicas")).unwrap();
    let label = format!("{} GiB sparse", size >> 30);
    // The churn through the library, with simulated capture times.
    let fill = Instant::now();
    let undo_records;
    {
        let store = RedbStore::open(&mt_dir.join("state.redb")).unwrap();
        store.put_stream(key, StreamRecord { disk_size: size, applied: Seq::ZERO }).unwrap();
        let disk = DiskFile::open_or_create(&mt_dir.join("replicas").join(format!("{name}.img")), size).unwrap();
        let undo = Undo::open(&mt_dir.join("undo").join(&name), 64 << 20, 24 * 3600, Seq::ZERO, &disk).unwrap();
        let r = Arc::new(Replica::new(key, disk, Seq::ZERO, undo));
        let start = sr_common::types::now_micros() - span - 120_000_000;
        let mut rng = rand::rngs::StdRng::seed_from_u64(1);
        let mut seq = 1;
        let marker = Change { seq: Seq(1), at: start, op: Op::Marker { kind: MarkerKind::InitialCopyDone } };
        let b = Batch {
            item: key.item,
            disk: key.disk,
            disk_size: size,
            first: Seq(1),
            last: Seq(1),
            changes: vec![marker],
        };
        r.apply(&b, &store).unwrap();
        for i in 0..batches {
            let at = start + 60_000_000 + i * (span / batches);
            let first = Seq(seq + 1);
            let changes: Vec<Change> = (0..writes)
                .map(|_| {
                    seq += 1;
                    let offset = rng.gen_range(0..size / 4096) * 4096;
                    let data = vec![(seq % 251) as u8 + 1; 4096];
                    Change { seq: Seq(seq), at, op: Op::Write { offset, data } }
                })
                .collect();
            let b = Batch { item: key.item, disk: key.disk, disk_size: size, first, last: Seq(seq), changes };
            r.apply(&b, &store).unwrap();
        }
        undo_records = seq - 1;
    }
    eprintln!(
        "{label}: {undo_records} changes over {back} (simulated) written in {:.1} s",
        fill.elapsed().as_secs_f64()
    );
    let undo_dir = mt_dir.join("undo").join(&name);
    let (mut segments, mut index) = (0u64, 0u64);
    for e in std::fs::read_dir(&undo_dir).unwrap() {
        let e = e.unwrap();
        let len = e.metadata().unwrap().len();
        if e.file_name().to_string_lossy().ends_with(".undo") {
            segments += len;
        } else {
            index += len;
        }
    }
    rows.push(Row {
        disk: label.clone(),
        what: "undo journal on disk".into(),
        ms: None,
        note: format!("segments {} MiB, index {} MiB (an older build has no index)", segments >> 20, index >> 20),
    });
    let started = Instant::now();
    // Retention past the simulated span: the points must not expire while they are measured.
    let keep = ((hours + 48) * 3600).to_string();
    let mt = local.start_env(Component::MasterTarget, &[("SR_MT__POINTS__RETENTION_SECS", &keep)]).unwrap();
    rows.push(Row {
        disk: label.clone(),
        what: "master target start (index of the undo journal)".into(),
        ms: Some(started.elapsed().as_secs_f64() * 1000.0),
        note: format!("{undo_records} undo records; RSS {} MiB", rss_kib(mt.pid().unwrap()) >> 10),
    });
    let far_back = sr_common::types::now_micros() - span - 90_000_000;
    for (what, point) in [
        ("latest point".to_string(), serde_json::json!("latest")),
        (format!("point {back} back"), serde_json::json!({ "time-us": far_back })),
    ] {
        let view = if what.starts_with("latest") { "latest" } else { "back" };
        let body = serde_json::json!({ "name": view, "item": local.item, "point": point, "writable": true });
        let started = Instant::now();
        let v = local.post(sr_devkit::Component::MasterTarget, "/v1/views", &body).unwrap();
        let uri = local.with_certs(v["disks"][0]["uri"].as_str().unwrap());
        wait_readable(&uri, Duration::from_secs(60));
        let ms = started.elapsed().as_secs_f64() * 1000.0;
        rows.push(Row {
            disk: label.clone(),
            what: format!("{what}: request to first read (writable view)"),
            ms: Some(ms),
            note: format!(
                "point seq {}; view built in {:.1} ms",
                v["disks"][0]["seq"],
                v["ready_ms"].as_f64().unwrap_or(0.0)
            ),
        });
    }
    rows.push(Row {
        disk: label.clone(),
        what: "master target RSS with both views open".into(),
        ms: None,
        note: format!("{} MiB", rss_kib(mt.pid().unwrap()) >> 10),
    });
    if size <= 1 << 30 {
        // Reading a whole point: the view furthest back (every undo record on top) beside qemu-nbd.
        let started = Instant::now();
        let out = Command::new("nbdcopy")
            .args([&local.with_certs(&format!("nbds://{}/back-disk-1", local.addrs.mt_nbd)), "null:"])
            .output();
        let ok = out.is_ok_and(|o| o.status.success());
        rows.push(Row {
            disk: label.clone(),
            what: format!("nbdcopy of the whole point {back} back"),
            ms: Some(started.elapsed().as_secs_f64() * 1000.0),
            note: if ok {
                format!("{:.0} MiB/s", (size >> 20) as f64 / started.elapsed().as_secs_f64())
            } else {
                "failed".into()
            },
        });
    }
    drop(mt);
    // Peers: a qcow2 overlay on the replica served by qemu-nbd, and a sparse full copy.
    let replica = mt_dir.join("replicas").join(format!("{name}.img"));
    let overlay = dir.path().join("overlay.qcow2");
    let port = sr_devkit::free_tcp().port();
    let started = Instant::now();
    let created = Command::new("qemu-img")
        .args(["create", "-q", "-f", "qcow2", "-F", "raw", "-b"])
        .arg(&replica)
        .arg(&overlay)
        .status();
    if created.is_ok_and(|s| s.success()) {
        let mut nbd = Command::new("qemu-nbd")
            .args(["-f", "qcow2", "-b", "127.0.0.1", "-p", &port.to_string(), "-x", "o", "-t"])
            .arg(&overlay)
            .spawn()
            .unwrap();
        let uri = format!("nbd://127.0.0.1:{port}/o");
        wait_readable(&uri, Duration::from_secs(60));
        rows.push(Row {
            disk: label.clone(),
            what: "peer: qcow2 overlay + qemu-nbd, latest state only".into(),
            ms: Some(started.elapsed().as_secs_f64() * 1000.0),
            note: "qemu-img create -b replica, qemu-nbd, first read".into(),
        });
        if size <= 1 << 30 {
            let started = Instant::now();
            let ok = Command::new("nbdcopy").args([&uri, "null:"]).output().is_ok_and(|o| o.status.success());
            rows.push(Row {
                disk: label.clone(),
                what: "peer: nbdcopy of the qcow2 overlay via qemu-nbd".into(),
                ms: Some(started.elapsed().as_secs_f64() * 1000.0),
                note: if ok {
                    format!("{:.0} MiB/s", (size >> 20) as f64 / started.elapsed().as_secs_f64())
                } else {
                    "failed".into()
                },
            });
        }
        let _ = nbd.kill();
        let _ = nbd.wait();
    }
    let started = Instant::now();
    let copy = dir.path().join("copy.img");
    let ok = Command::new("cp").arg("--sparse=always").arg(&replica).arg(&copy).status().is_ok_and(|s| s.success());
    rows.push(Row {
        disk: label,
        what: "peer: sparse full copy of the replica (cp --sparse=always)".into(),
        ms: Some(started.elapsed().as_secs_f64() * 1000.0),
        note: if ok { "a restore from a copy costs at least this".into() } else { "failed".into() },
    });
}

fn main() {
    // `cargo bench` passes --bench; nothing else is taken from the command line.
    let batches = env("BATCHES", 4320);
    let writes = env("WRITES", 48);
    let hours = env("HOURS", 720).max(1);
    let sizes: Vec<u64> = std::env::var("SIZES_GIB")
        .unwrap_or_else(|_| "1,64".into())
        .split(',')
        .filter_map(|s| s.trim().parse::<u64>().ok())
        .map(|g| g << 30)
        .collect();
    std::fs::create_dir_all(std::env::var("BENCH_DIR").unwrap_or_else(|_| "bench/out".into())).unwrap();
    let mut rows = Vec::new();
    for size in sizes {
        one_disk(size, batches, writes, hours, &mut rows);
    }
    println!("| disk | measurement | ms | note |");
    println!("|---|---|---:|---|");
    for r in rows {
        let ms = r.ms.map_or("-".to_string(), |m| format!("{m:.1}"));
        println!("| {} | {} | {ms} | {} |", r.disk, r.what, r.note);
    }
}
