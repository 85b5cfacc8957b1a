//! Failover benchmark (run by `bench/failover.sh`): a disk of `SIZE_MIB` with random data, protected by
//! the real binaries on loopback, then timed from the API's side, polling every 10 ms:
//! - planned failover: request until the disks are up at the final write (stop, drain, view);
//! - commit of the failed-over disk with some writes made on it;
//! - reprotect: request until Protected in the reverse direction, bytes the recovery site's agent shipped,
//!   beside `rsync --inplace --no-whole-file` bringing a copy of the stale original disk up to date;
//! - unplanned failover of the reverse stream at its latest point.
//!
//! Page caches are dropped before the reprotect and before rsync (when run as root).

use serde_json::{json, Value};
use sr_tests::*;
use std::path::Path;
use std::time::{Duration, Instant};

const MIB: u64 = 1 << 20;

fn wait_job(d: &Deployment, job: u64) -> f64 {
    let start = Instant::now();
    loop {
        let (_, j) = d.api("GET", &format!("/v1/jobs/{job}"), None);
        match j["state"].as_str() {
            Some("succeeded") => return start.elapsed().as_secs_f64(),
            Some("failed") => panic!("job {job} failed: {j}"),
            _ => std::thread::sleep(Duration::from_millis(10)),
        }
    }
}

fn drop_caches() {
    let _ = std::process::Command::new("sync").status();
    let _ = std::fs::write("/proc/sys/vm/drop_caches", "3");
}

fn random_writes(uri: &str, count: u64, size: u64, seed: u8) {
    let cmds: Vec<String> = (0..count)
        .map(|i| {
            let off = (i * 7919 % (size / MIB)) * MIB;
            format!("write -P {} {off} 1M", (seed as u64 + i) % 250 + 1)
        })
        .collect();
    qemu_io(uri, &cmds).expect("qemu-io writes");
}

fn main() {
    let size_mib: u64 = std::env::var("SIZE_MIB").ok().and_then(|v| v.parse().ok()).unwrap_or(1024);
    let size = size_mib * MIB;
    let root = std::env::args().nth(1).expect("usage: failover_bench DIR");
    let dir = Path::new(&root);
    let _ = std::fs::remove_dir_all(dir);
    std::fs::create_dir_all(dir).expect("bench dir");
    let source = dir.join("source.img");
    {
        use std::io::Write;
        let mut f = std::fs::File::create(&source).expect("source");
        let mut buf = vec![0u8; MIB as usize];
        for _ in 0..size_mib {
            rand::Rng::fill(&mut rand::thread_rng(), &mut buf[..]);
            f.write_all(&buf).expect("writing the source");
        }
    }
    let d = Deployment::start(dir);
    let a = d.site(&dir.join("a"), "", &source);
    let _mt = a.start(Component::MasterTarget).expect("mt");
    let _ps = a.start(Component::ProcessServer).expect("ps");
    let _agent = a.start(Component::Agent).expect("agent");
    let t = Instant::now();
    let id = d.protect("agent-1");
    eprintln!("initial replication of {size_mib} MiB: {:.1} s", t.elapsed().as_secs_f64());
    let churn = (size_mib / 16).max(4);
    random_writes(&a.agent_uri("disk0"), churn, size, 1);

    let (_, v) = d.api("POST", &format!("/v1/items/{id}/failover"), Some(json!({ "planned": true })));
    let planned = wait_job(&d, v["job"].as_u64().expect("job"));
    let uri = d.with_certs(d.item(id)["failover"]["machine"]["disks"][0]["uri"].as_str().expect("uri"));
    compare(source.to_str().expect("path"), &uri).expect("the failed-over disk equals the source");
    random_writes(&uri, churn / 2, size, 60);

    let t = Instant::now();
    let (code, v) = d.api("POST", &format!("/v1/items/{id}/commit"), None);
    assert_eq!(code, 200, "{v}");
    let commit = t.elapsed().as_secs_f64();
    let committed = v["disks"][0]["path"].as_str().expect("path").to_string();

    let b = d.site(&dir.join("b"), "b-", Path::new(&committed));
    let _bmt = b.start(Component::MasterTarget).expect("b mt");
    let _bps = b.start(Component::ProcessServer).expect("b ps");
    let _bagent = b.start(Component::Agent).expect("b agent");
    d.wait_machine("b-agent-1");
    random_writes(&b.agent_uri("disk0"), churn, size, 120);
    let changed = (churn / 2 + churn) * MIB;

    // The peer: what bringing the stale original up to date by hand costs.
    let peer = dir.join("peer.img");
    run("cp", &["--sparse=always", source.to_str().expect("path"), peer.to_str().expect("path")]).expect("cp");
    drop_caches();
    let t = Instant::now();
    let stats = run(
        "rsync",
        &["--inplace", "--no-whole-file", "--ignore-times", "--stats", &committed, peer.to_str().expect("path")],
    )
    .expect("rsync");
    let rsync_secs = t.elapsed().as_secs_f64();
    let rsync_sent: u64 = stats
        .lines()
        .find(|l| l.starts_with("Total bytes sent:"))
        .and_then(|l| l.split(':').nth(1))
        .map(|n| n.trim().replace(',', "").parse().unwrap_or(0))
        .unwrap_or(0);

    drop_caches();
    let t = Instant::now();
    let (_, v) = d.api("POST", &format!("/v1/items/{id}/reprotect"), Some(json!({ "machine": "b-agent-1" })));
    let job = v["job"].as_u64().expect("job");
    wait_job(&d, job);
    let reprotect = t.elapsed().as_secs_f64();
    let shipped = metric(&b, Component::Agent, "sr_agent_shipped_bytes_total").expect("metric") as u64;
    compare(source.to_str().expect("path"), &committed).expect("the original disk equals the failed-over one");

    let (_, v) = d.api("POST", &format!("/v1/items/{id}/failover"), Some(json!({ "planned": false })));
    let unplanned = wait_job(&d, v["job"].as_u64().expect("job"));

    let out: Value = json!({
        "size_mib": size_mib, "changed_mib": changed / MIB,
        "planned_failover_secs": planned, "commit_secs": commit, "unplanned_failover_secs": unplanned,
        "reprotect_secs": reprotect, "reprotect_shipped_bytes": shipped,
        "rsync_secs": rsync_secs, "rsync_sent_bytes": rsync_sent,
    });
    println!("{}", serde_json::to_string_pretty(&out).expect("json"));
}
