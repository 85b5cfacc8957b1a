//! WAN benchmark (run by `bench/wan.sh`, as root): replication between two sites of network
//! namespaces joined by the emulated WAN link (`sr_devkit::netns`), at several round trips and loss
//! rates under one bandwidth cap, beside a plain TCP copy over the same link in the same run (nbdcopy
//! on site A into qemu-nbd on site B). For each setting:
//! - initial replication of SIZE_MIB of random data: MiB/s applied at site B while the data flows (10%
//!   to 90% of it, sampled every 50 ms) and its share of the cap, and protect to caught up;
//! - the TCP copy of the same file: MiB/s and share of the cap;
//! - a burst of BURST_MIB of random writes at the agent, and how long until the replica holds it
//!   (the RPO after a burst), with the replica checked byte for byte.
//!
//! SETTINGS is a list of RTT_MS/LOSS_PERCENT entries (default "10/0,50/0,50/0.1,50/1,100/1"), MBIT the
//! cap (default 200).

use sr_devkit::netns::Family;
use sr_devkit::sites::TwoSites;
use sr_devkit::wan::Impairment;
use sr_tests::*;
use std::path::Path;
use std::time::{Duration, Instant};

const MIB: u64 = 1 << 20;

fn env_or<T: std::str::FromStr>(name: &str, default: T) -> T {
    std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

fn random_file(path: &Path, mib: u64) {
    use std::io::Write;
    let mut f = std::fs::File::create(path).expect("creating a random file");
    let mut buf = vec![0u8; MIB as usize];
    for _ in 0..mib {
        rand::Rng::fill(&mut rand::thread_rng(), &mut buf[..]);
        f.write_all(&buf).expect("writing a random file");
    }
}

struct Row {
    rtt_ms: u64,
    loss: f64,
    replication: f64,
    end_to_end: f64,
    tcp: f64,
    burst_catch_up: f64,
}

fn tcp_copy(s: &TwoSites, src: &Path, dir: &Path) -> f64 {
    let target = dir.join("tcp-target.img");
    let len = std::fs::metadata(src).expect("source size").len();
    std::fs::File::create(&target).and_then(|f| f.set_len(len)).expect("tcp target");
    let mt = s.topo.host("mt-1").v4.to_string();
    let mut server = s
        .topo
        .command("mt-1", "qemu-nbd")
        .args(["-f", "raw", "-x", "t", "-b", &mt, "-p", "10900", "-t"])
        .arg(&target)
        .spawn()
        .expect("starting qemu-nbd on site B");
    let uri = format!("nbd://{mt}:10900/t");
    wait_for("qemu-nbd on site B to answer", Duration::from_secs(30), || {
        s.topo.command("agent-1", "nbdinfo").arg("--size").arg(&uri).output().is_ok_and(|o| o.status.success())
    });
    let start = Instant::now();
    let out = s.topo.command("agent-1", "nbdcopy").arg(src).arg(&uri).output().expect("running nbdcopy");
    let secs = start.elapsed().as_secs_f64();
    assert!(out.status.success(), "nbdcopy: {}", String::from_utf8_lossy(&out.stderr));
    let _ = server.kill();
    let _ = server.wait();
    compare(src.to_str().expect("path"), target.to_str().expect("path")).expect("the TCP copy is identical");
    len as f64 / MIB as f64 / secs
}

/// MiB/s between the samples where 10% and 90% of the bytes in the series had arrived: the rate
/// while the data flows, without the control plane's start (assignment polls) and the tail.
fn steady_rate(samples: &[(f64, f64)]) -> f64 {
    let total = samples.last().map_or(0.0, |s| s.1);
    let at = |share: f64| samples.iter().find(|s| s.1 >= total * share).copied().unwrap_or((0.0, 0.0));
    let ((t0, b0), (t1, b1)) = (at(0.1), at(0.9));
    if t1 <= t0 {
        return 0.0;
    }
    (b1 - b0) / MIB as f64 / (t1 - t0)
}

fn run_one(dir: &Path, random: &Path, burst: &Path, rtt_ms: u64, loss: f64, mbit: u64) -> Row {
    let _ = std::fs::remove_dir_all(dir);
    std::fs::create_dir_all(dir).expect("bench dir");
    let disk = dir.join("source.img");
    std::fs::copy(random, &disk).expect("copying the source");
    let size_mib = std::fs::metadata(&disk).expect("size").len() / MIB;
    let wan = Impairment::wan(Duration::from_millis(rtt_ms), loss / 100.0, Some(mbit));
    let opts = Options { batch_bytes: 4 << 20, ..Options::default() };
    let mut s = TwoSites::start(dir, wan, 7, Family::V4, &disk, &opts, &[]).expect("two sites");
    let cp = s.cp.clone();
    let d = Deployment::attach(cp, dir);
    let start = Instant::now();
    let (_, job) = s.protect(serde_json::json!({})).expect("protecting");
    // Bytes applied at site B, sampled at each look (every 50 ms) until the replica caught up.
    let mut samples = Vec::new();
    wait_until("the initial replication", Duration::from_secs(3600), || {
        let applied = metric(&s.local, Component::MasterTarget, "sr_master_target_applied_bytes_total");
        samples.push((start.elapsed().as_secs_f64(), applied.unwrap_or(0.0)));
        caught_up(&s.local).ok().flatten()
    });
    let end_to_end = size_mib as f64 / start.elapsed().as_secs_f64();
    d.wait_job(job, true);
    let replication = steady_rate(&samples);
    // Where the time went at site B: the master target's apply of each batch (it applies in order).
    let busy = metric(&s.local, Component::MasterTarget, "sr_master_target_apply_seconds_sum").unwrap_or(0.0);
    let batches = metric(&s.local, Component::MasterTarget, "sr_master_target_apply_seconds_count").unwrap_or(0.0);
    eprintln!("master target: {batches} batches applied in {busy:.1} s of {:.1} s", start.elapsed().as_secs_f64());

    // A burst of random writes (as an application's), then the time until the replica holds it.
    let burst_mib = std::fs::metadata(burst).expect("burst size").len() / MIB;
    let cmds = vec![format!("write -s {} 0 {}M", burst.display(), burst_mib), "flush".to_string()];
    let start = Instant::now();
    qemu_io(&s.local.agent_uri("disk0"), &cmds).expect("the burst");
    wait_caught_up(&s.local, Duration::from_secs(3600)).expect("catching up after the burst");
    let burst_catch_up = start.elapsed().as_secs_f64();
    compare(disk.to_str().expect("path"), &s.local.replica_uri(1)).expect("the replica is identical");

    let tcp = tcp_copy(&s, random, dir);
    let c = s.topo.wan.counters();
    eprintln!("link A->B {:?}", c[0]);
    Row { rtt_ms, loss, replication, end_to_end, tcp, burst_catch_up }
}

fn main() {
    let size_mib: u64 = env_or("SIZE_MIB", 256);
    let burst_mib: u64 = env_or("BURST_MIB", 64).min(size_mib);
    let mbit: u64 = env_or("MBIT", 200);
    let settings = std::env::var("SETTINGS").unwrap_or_else(|_| "10/0,50/0,50/0.1,50/1,100/1".into());
    let root = std::env::args().nth(1).expect("usage: wan_bench DIR");
    let root = Path::new(&root);
    std::fs::create_dir_all(root).expect("bench dir");
    if let Err(why) = sr_devkit::netns::Topology::available() {
        eprintln!("wan_bench needs network namespaces: {why}");
        std::process::exit(2);
    }
    let random = root.join("random.img");
    random_file(&random, size_mib);
    let burst = root.join("burst.bin");
    random_file(&burst, burst_mib);
    let cap = mbit as f64 * 1e6 / 8.0 / MIB as f64;
    println!("| RTT | loss | replication MiB/s (while flowing) | of the cap | protect to caught up, MiB/s | TCP copy (nbdcopy) MiB/s | of the cap | {burst_mib} MiB burst replicated in |");
    println!("|---|---|---|---|---|---|---|---|");
    for s in settings.split(',') {
        let (rtt, loss) = s.split_once('/').expect("SETTINGS entries are RTT_MS/LOSS_PERCENT");
        let (rtt, loss): (u64, f64) = (rtt.parse().expect("RTT_MS"), loss.parse().expect("LOSS_PERCENT"));
        let r = run_one(&root.join(format!("rtt{rtt}-loss{loss}")), &random, &burst, rtt, loss, mbit);
        println!(
            "| {} ms | {}% | {:.1} | {:.0}% | {:.1} | {:.1} | {:.0}% | {:.1} s |",
            r.rtt_ms,
            r.loss,
            r.replication,
            100.0 * r.replication / cap,
            r.end_to_end,
            r.tcp,
            100.0 * r.tcp / cap,
            r.burst_catch_up
        );
    }
    println!("\ncap {mbit} Mbit/s = {cap:.1} MiB/s; {size_mib} MiB of random data");
}
