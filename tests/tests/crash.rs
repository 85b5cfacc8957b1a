//! Every service killed with SIGKILL at a random moment while writes stream through, then restarted:
//! the replica still ends byte-identical to the source, and no batch is applied twice.

// Test code: a failed unwrap is a failed test, with its message.
#![allow(clippy::unwrap_used)]

use rand::{Rng, SeedableRng};
use sr_tests::*;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

const MIB: u64 = 1 << 20;

fn writes(rng: &mut rand::rngs::StdRng, size: u64, n: usize) -> Vec<String> {
    (0..n)
        .map(|i| {
            let len = match rng.gen_range(0..4) {
                0 => 512,
                1 => 4096,
                2 => rng.gen_range(1..100_000),
                _ => rng.gen_range(MIB..3 * MIB),
            };
            let off = rng.gen_range(0..size - len);
            match rng.gen_range(0..12) {
                0 => "flush".into(),
                1 => format!("discard {} {len}", off / 512 * 512),
                2 => format!("write -z {off} {len}"),
                _ => format!("write -P {} {off} {len}", (i % 250) + 1),
            }
        })
        .collect()
}

fn kill_and_restart(victim: Component) {
    let seed: u64 = std::env::var("SR_TEST_SEED").ok().and_then(|s| s.parse().ok()).unwrap_or_else(rand::random);
    eprintln!("{victim:?}: seed {seed} (set SR_TEST_SEED to replay)");
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let dir = test_dir();
    let size = 48 * MIB;
    let disk = dir.path().join("source.img");
    make_disk(&disk, size).unwrap();
    run("qemu-io", &["-f", "raw", "-c", "write -P 0x42 0 6M", disk.to_str().unwrap()]).unwrap();
    // Small batches so a kill lands between many of them.
    let opts = Options { batch_bytes: 256 << 10, ..Options::default() };
    let local =
        Local::create(&dir.path().join("dep"), vec![DiskSpec { id: 1, name: "d".into(), path: disk.clone() }], &opts)
            .unwrap();
    let mut procs = [
        Some(local.start(Component::MasterTarget).unwrap()),
        Some(local.start(Component::ProcessServer).unwrap()),
        Some(local.start(Component::Agent).unwrap()),
    ];
    let idx = match victim {
        Component::MasterTarget => 0,
        Component::ProcessServer => 1,
        Component::Agent => 2,
        Component::ConfigServer => unreachable!("the data path has no configuration server yet"),
    };
    let uri = local.agent_uri("d");
    let nbd_addr = local.addrs.agent_nbd;
    let stop = Arc::new(AtomicBool::new(false));
    let writer = {
        let (stop, uri) = (stop.clone(), uri.clone());
        let mut wrng = rand::rngs::StdRng::seed_from_u64(seed ^ 0x5eed);
        std::thread::spawn(move || {
            let mut ok = 0;
            while !stop.load(Ordering::Relaxed) {
                // While the agent is down the client fails, as a machine's disk would stall; go on.
                if qemu_io(&uri, &writes(&mut wrng, size, 15)).is_ok() {
                    ok += 1;
                } else {
                    wait_for("the agent's NBD front end to come back", Duration::from_secs(120), || {
                        stop.load(Ordering::Relaxed) || std::net::TcpStream::connect(nbd_addr).is_ok()
                    });
                }
            }
            ok
        })
    };
    // The random sleeps are on purpose, not waits for a condition: they pick the moments of the kills,
    // how long the victim stays down, and how long writes go on after the last restart.
    for _ in 0..3 {
        std::thread::sleep(Duration::from_millis(rng.gen_range(200..2000)));
        procs[idx].take().unwrap().kill();
        std::thread::sleep(Duration::from_millis(rng.gen_range(50..800)));
        procs[idx] = Some(local.start(victim).unwrap());
    }
    std::thread::sleep(Duration::from_millis(rng.gen_range(200..1500)));
    stop.store(true, Ordering::Relaxed);
    let rounds = writer.join().unwrap();
    assert!(rounds > 0, "no write round succeeded");
    qemu_io(&uri, &["flush".into()]).unwrap();
    let applied = wait_caught_up(&local, Duration::from_secs(180)).unwrap();
    compare(disk.to_str().unwrap(), &local.replica_uri(1)).unwrap();
    let logged = check_apply_log(&local, 1).unwrap();
    assert!(logged >= applied[0], "the apply record ends at {logged}, before the applied position {}", applied[0]);
    // The agent may add a marker after the flush (a crash-consistent point is due): once nothing is
    // in flight, the record ends exactly where the replica's applied position is.
    wait_for("the apply record to end at the applied position", Duration::from_secs(30), || {
        check_apply_log(&local, 1).ok() == local.applied(1).ok()
    });
}

#[test]
fn master_target_killed_mid_stream() {
    kill_and_restart(Component::MasterTarget);
}

#[test]
fn process_server_killed_mid_stream() {
    kill_and_restart(Component::ProcessServer);
}

#[test]
fn agent_killed_mid_stream() {
    kill_and_restart(Component::Agent);
}
