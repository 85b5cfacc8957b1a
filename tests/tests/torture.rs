//! Seeded torture: random writes, zeroings, discards and FLUSHes from `qemu-io` through the agent's NBD
//! front end, random direct writes into a scanned disk beside it, a journal limit small enough to
//! overflow again and again, and SIGKILLs of the agent, the process server and the master target at
//! random moments. After every round:
//! - each source disk holds exactly what was acknowledged (the test keeps a shadow of it: per 512-byte
//!   sector the byte it must be filled with; a command cut off by a kill leaves its sectors allowed
//!   either value until a later acknowledged write covers them);
//! - once caught up, each replica equals its source byte for byte, and no batch was applied twice.
//!
//! `SR_TORTURE_ROUNDS` sets the rounds (3 by default, for CI); `SR_TORTURE_SEED` replays a run (the
//! seed is printed at the start).

// Test code: a failed unwrap is a failed test, with its message.
#![allow(clippy::unwrap_used)]

use rand::{Rng, SeedableRng};
use sr_tests::*;
use std::collections::{BTreeSet, HashMap};
use std::os::unix::fs::FileExt;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

const MIB: u64 = 1 << 20;
const SECTOR: u64 = 512;

/// What a disk must hold: the fill byte of every sector, and for sectors a cut-off command may or may
/// not have reached, the other byte they may hold.
struct Shadow {
    bytes: Vec<u8>,
    doubt: HashMap<u64, BTreeSet<u8>>,
}

impl Shadow {
    fn new(size: u64) -> Shadow {
        Shadow { bytes: vec![0; (size / SECTOR) as usize], doubt: HashMap::new() }
    }

    fn acknowledged(&mut self, off: u64, len: u64, byte: u8) {
        for s in off / SECTOR..(off + len) / SECTOR {
            self.bytes[s as usize] = byte;
            self.doubt.remove(&s);
        }
    }

    fn in_doubt(&mut self, off: u64, len: u64, byte: u8) {
        for s in off / SECTOR..(off + len) / SECTOR {
            self.doubt.entry(s).or_default().insert(byte);
        }
    }

    /// Checks the image at `path` sector by sector; the first few differences, if any.
    fn check(&self, path: &std::path::Path, what: &str) -> Result<(), String> {
        let f = std::fs::File::open(path).unwrap();
        let mut buf = vec![0u8; MIB as usize];
        let mut bad = Vec::new();
        for chunk in 0..(self.bytes.len() as u64 * SECTOR).div_ceil(MIB) {
            f.read_exact_at(&mut buf, chunk * MIB).unwrap();
            for (i, sec) in buf.chunks(SECTOR as usize).enumerate() {
                let s = chunk * (MIB / SECTOR) + i as u64;
                let want = self.bytes[s as usize];
                let ok_bytes = |b: u8| b == want || self.doubt.get(&s).is_some_and(|d| d.contains(&b));
                if !(sec.iter().all(|b| *b == sec[0]) && ok_bytes(sec[0])) {
                    bad.push(format!(
                        "sector {s} (offset {}) holds {:#04x}.. where {want:#04x}{} was acknowledged",
                        s * SECTOR,
                        sec[0],
                        self.doubt.get(&s).map(|d| format!(" (or one of {d:?})")).unwrap_or_default()
                    ));
                }
            }
        }
        if bad.is_empty() {
            return Ok(());
        }
        let n = bad.len();
        bad.truncate(5);
        Err(format!("{what}: {n} sectors differ from what was acknowledged: {}", bad.join("; ")))
    }
}

/// One qemu-io command and how it changes the shadow.
struct Cmd {
    text: String,
    off: u64,
    len: u64,
    byte: u8,
}

fn commands(rng: &mut rand::rngs::StdRng, size: u64) -> Vec<Cmd> {
    (0..rng.gen_range(1..5))
        .map(|_| {
            let len = match rng.gen_range(0..4) {
                0 => SECTOR,
                1 => 4096,
                2 => rng.gen_range(1..256) * SECTOR,
                _ => rng.gen_range(1..4) * MIB / 2,
            };
            let off = rng.gen_range(0..(size - len) / SECTOR) * SECTOR;
            match rng.gen_range(0..10) {
                0 => Cmd { text: format!("write -z {off} {len}"), off, len, byte: 0 },
                1 => Cmd { text: format!("discard {off} {len}"), off, len, byte: 0 },
                _ => {
                    let byte = rng.gen_range(1..=255u8);
                    Cmd { text: format!("write -P {byte} {off} {len}"), off, len, byte }
                }
            }
        })
        .collect()
}

#[test]
fn torture_random_kills_overflowing_journal_scan_disk_beside() {
    let seed: u64 = std::env::var("SR_TORTURE_SEED").ok().and_then(|s| s.parse().ok()).unwrap_or_else(rand::random);
    let rounds: u32 = std::env::var("SR_TORTURE_ROUNDS").ok().and_then(|s| s.parse().ok()).unwrap_or(3);
    eprintln!("torture: seed {seed}, {rounds} rounds (SR_TORTURE_SEED replays, SR_TORTURE_ROUNDS sets rounds)");
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let dir = test_dir();
    let (nbd_size, scan_size) = (32 * MIB, 8 * MIB);
    let (nbd_disk, scan_disk) = (dir.path().join("nbd.img"), dir.path().join("scan.img"));
    make_disk(&nbd_disk, nbd_size).unwrap();
    make_disk(&scan_disk, scan_size).unwrap();
    let opts =
        Options { batch_bytes: 256 << 10, scan_interval_secs: Some(1), scan_disks: vec![2], ..Options::default() };
    let local = Local::create(
        &dir.path().join("dep"),
        vec![
            DiskSpec { id: 1, name: "d".into(), path: nbd_disk.clone() },
            DiskSpec { id: 2, name: "s".into(), path: scan_disk.clone() },
        ],
        &opts,
    )
    .unwrap();
    // A 2 MiB journal: with the process server or master target down for a moment it overflows.
    let env = [("SR_AGENT__JOURNAL__LIMIT_BYTES", "2097152")];
    let start = |c: Component| if c == Component::Agent { local.start_env(c, &env) } else { local.start(c) };
    let components = [Component::Agent, Component::ProcessServer, Component::MasterTarget];
    let mut procs: Vec<Option<Proc>> = components.iter().map(|c| Some(start(*c).unwrap())).collect();
    wait_caught_up(&local, Duration::from_secs(120)).unwrap();
    let uri = local.agent_uri("d");
    let nbd_shadow = Arc::new(Mutex::new(Shadow::new(nbd_size)));
    let mut scan_shadow = Shadow::new(scan_size);
    let scan_file = std::fs::OpenOptions::new().write(true).open(&scan_disk).unwrap();
    let mut overflowed = 0;
    for round in 0..rounds {
        let stop = Arc::new(AtomicBool::new(false));
        // qemu-io sessions the writer started and those acknowledged: the round is paced by them.
        let (started, acked, cut_off) =
            (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
        let nbd_addr = local.addrs.agent_nbd;
        let writer = {
            let (stop, uri, shadow) = (stop.clone(), uri.clone(), nbd_shadow.clone());
            let (started, acked, cut_off) = (started.clone(), acked.clone(), cut_off.clone());
            let mut wrng = rand::rngs::StdRng::seed_from_u64(seed ^ u64::from(round + 1).wrapping_mul(0x9e37_79b9));
            std::thread::spawn(move || {
                let (mut ok, mut cut) = (0, 0);
                while !stop.load(Ordering::Relaxed) {
                    let cmds = commands(&mut wrng, nbd_size);
                    let mut texts: Vec<String> = cmds.iter().map(|c| c.text.clone()).collect();
                    if wrng.gen_bool(0.5) {
                        texts.push("flush".into());
                    }
                    started.fetch_add(1, Ordering::SeqCst);
                    let done = qemu_io(&uri, &texts).is_ok();
                    let mut sh = shadow.lock().unwrap();
                    for c in &cmds {
                        if done {
                            sh.acknowledged(c.off, c.len, c.byte);
                        } else {
                            sh.in_doubt(c.off, c.len, c.byte);
                        }
                    }
                    drop(sh);
                    if done {
                        ok += 1;
                        acked.fetch_add(1, Ordering::SeqCst);
                    } else {
                        // The agent is down: a machine's disk would stall until it is back.
                        cut += 1;
                        cut_off.fetch_add(1, Ordering::SeqCst);
                        wait_for("the agent's NBD front end to come back", Duration::from_secs(120), || {
                            stop.load(Ordering::Relaxed) || std::net::TcpStream::connect(nbd_addr).is_ok()
                        });
                    }
                }
                (ok, cut)
            })
        };
        // Waits until the writer's `counter` moved `n` past `from`.
        let past = |counter: &AtomicU64, from: u64, n: u64, what: &str| {
            wait_for(what, Duration::from_secs(120), || counter.load(Ordering::SeqCst) >= from + n);
        };
        let after = |counter: &AtomicU64, n: u64, what: &str| past(counter, counter.load(Ordering::SeqCst), n, what);
        for _ in 0..rng.gen_range(6..12) {
            // The machine writes its scanned disk directly.
            for _ in 0..rng.gen_range(1..8) {
                let len = rng.gen_range(1..64) * SECTOR;
                let off = rng.gen_range(0..(scan_size - len) / SECTOR) * SECTOR;
                let byte = rng.gen_range(0..=255u8);
                scan_file.write_all_at(&vec![byte; len as usize], off).unwrap();
                scan_shadow.acknowledged(off, len, byte);
            }
            after(&acked, rng.gen_range(1..6), "the writer to make progress");
            if rng.gen_bool(0.35) {
                let i = rng.gen_range(0..components.len());
                eprintln!("round {round}: SIGKILL {:?}", components[i]);
                // Counted before the kill: the writer may feel it before this thread looks again.
                let (cuts, starts) = (cut_off.load(Ordering::SeqCst), started.load(Ordering::SeqCst));
                procs[i].take().unwrap().kill();
                // Down until the writer felt it: its session cut off when the agent died, or a few more
                // sessions started while the process server or master target is away.
                if components[i] == Component::Agent {
                    past(&cut_off, cuts, 1, "the writer to lose the agent");
                } else {
                    past(&started, starts, rng.gen_range(1..4), "the writer to go on while a service is down");
                }
                if let Ok(st) = local.agent_status() {
                    overflowed += usize::from(st["disks"][0]["overflow"] == true);
                }
                procs[i] = Some(start(components[i]).unwrap());
            }
        }
        stop.store(true, Ordering::Relaxed);
        let (ok, cut) = writer.join().unwrap();
        eprintln!("round {round}: {ok} qemu-io sessions acknowledged, {cut} cut off");
        // The source disks hold what was acknowledged: no restart rolled anything back.
        nbd_shadow.lock().unwrap().check(&nbd_disk, &format!("round {round} (seed {seed}): NBD source disk")).unwrap();
        scan_shadow.check(&scan_disk, &format!("round {round} (seed {seed}): scanned source disk")).unwrap();
        // And the replicas catch up to them.
        qemu_io(&uri, &["flush".into()]).unwrap();
        wait_caught_up(&local, Duration::from_secs(300)).unwrap();
        compare(nbd_disk.to_str().unwrap(), &local.replica_uri(1))
            .map_err(|e| format!("round {round} (seed {seed}): NBD replica: {e:#}"))
            .unwrap();
        wait_for(
            &format!("round {round} (seed {seed}): the scanned replica to catch up"),
            Duration::from_secs(120),
            || compare(scan_disk.to_str().unwrap(), &local.replica_uri(2)).is_ok(),
        );
        for disk in [1, 2] {
            check_apply_log(&local, disk).unwrap();
        }
    }
    eprintln!("torture: {rounds} rounds passed (seed {seed}); journal overflowed at {overflowed} kills");
}
