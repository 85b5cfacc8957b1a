//! Two sites joined by an emulated WAN (`sr_devkit::netns`): each component in its own network
//! namespace, the sites' traffic through a userspace link with latency, loss, a bandwidth cap and
//! partitions; the real binaries, bound to the wildcard address and advertising their host's.
//! Skipped, with the reason printed, where network namespaces cannot be made.
//!
//! ```text
//! site A: agent-1, ps-1 (ps-2)          ==WAN==          site B: mt-1, cs
//! ```

// Test code: a failed unwrap is a failed test, with its message.
#![allow(clippy::unwrap_used)]

use serde_json::json;
use sr_devkit::netns::{Family, Site, Topology};
use sr_devkit::wan::Impairment;
use sr_devkit::{sites, Placement, Proc};
use sr_tests::*;
use std::io::{Read, Write};
use std::time::{Duration, Instant};

/// Whether the two-site tests can run here; with `SR_REQUIRE_NETNS` set (CI sets it) they must.
fn topology_or_skip() -> bool {
    match Topology::available() {
        Ok(()) => true,
        Err(why) if std::env::var_os("SR_REQUIRE_NETNS").is_some() => {
            panic!("SR_REQUIRE_NETNS is set but network namespaces cannot be made: {why}")
        }
        Err(why) => {
            eprintln!("SKIPPED: two-site tests need network namespaces: {why}");
            false
        }
    }
}

/// The WAN the issue names: 50 ms round trip, 1% loss each way, 200 Mbit/s.
fn lossy_wan() -> Impairment {
    Impairment::wan(Duration::from_millis(50), 0.01, Some(200))
}

/// The two sites (`sr_devkit::sites`) and the test kit's handle on their configuration server.
struct TwoSites {
    site: sites::TwoSites,
    dep: Deployment,
}

impl TwoSites {
    fn start(
        dir: &std::path::Path,
        wan: Impairment,
        family: Family,
        disk_mib: u64,
        extra: &[(&str, Site)],
    ) -> TwoSites {
        Self::start_filled(dir, wan, family, disk_mib, 0, extra)
    }

    /// [`TwoSites::start`] with the disk's first `random_mib` MiB random (an initial copy that takes
    /// a while over the WAN) before the agent starts.
    fn start_filled(
        dir: &std::path::Path,
        wan: Impairment,
        family: Family,
        disk_mib: u64,
        random_mib: u64,
        extra: &[(&str, Site)],
    ) -> TwoSites {
        let disk = dir.join("source.img");
        make_disk(&disk, disk_mib << 20).unwrap();
        let mut buf = vec![0u8; 1 << 20];
        let f = std::fs::OpenOptions::new().write(true).open(&disk).unwrap();
        for i in 0..random_mib {
            rand::Rng::fill(&mut rand::thread_rng(), &mut buf[..]);
            std::os::unix::fs::FileExt::write_all_at(&f, &buf, i << 20).unwrap();
        }
        let opts = Options { batch_bytes: 1 << 20, ..Options::default() };
        let site = sites::TwoSites::start(dir, wan, 0x5eed, family, &disk, &opts, extra).unwrap();
        let dep = Deployment::attach(site.cp.clone(), dir);
        TwoSites { site, dep }
    }

    /// Protects the disk under a policy made with `policy` (API fields); waits for Protected.
    fn protect(&mut self, policy: serde_json::Value) -> u64 {
        let (item, job) = self.site.protect(policy).unwrap();
        self.dep.wait_job(job, true);
        item
    }

    fn write(&self, cmds: &[String]) {
        let mut all = cmds.to_vec();
        all.push("flush".into());
        qemu_io(&self.site.local.agent_uri("disk0"), &all).unwrap();
    }

    fn item(&self) -> serde_json::Value {
        self.site.item().unwrap()
    }

    fn assert_identical(&self, within: Duration) {
        wait_caught_up(&self.site.local, within).unwrap();
        compare(self.site.disk.to_str().unwrap(), &self.site.local.replica_uri(1)).unwrap();
    }
}

/// Writes `n` random patterns of 64 KiB to 1 MiB spread over a disk of `mib` MiB; a seed per call.
fn churn(seed: u64, n: usize, mib: u64) -> Vec<String> {
    use rand::{Rng, SeedableRng};
    let mut r = rand::rngs::StdRng::seed_from_u64(seed);
    (0..n)
        .map(|_| {
            let len = r.gen_range(1..=16u64) * 64;
            let off = r.gen_range(0..(mib << 10) - len) / 4 * 4;
            format!("write -P {} {off}k {len}k", r.gen_range(1..255))
        })
        .collect()
}

/// The link itself: a TCP round trip across it takes the latency asked, a partition stops
/// everything, healing it lets the same connection go on.
#[test]
fn wan_link_delays_and_partitions() {
    if !topology_or_skip() {
        return;
    }
    let wan = Impairment::wan(Duration::from_millis(40), 0.0, Some(100));
    let topo = Topology::create(&[("a1", Site::A), ("b1", Site::B)], wan, 1).unwrap();
    let b = topo.host("b1").v4;
    let (listening_tx, listening) = std::sync::mpsc::channel::<()>();
    let server = topo.spawn_in("b1", move || {
        let l = std::net::TcpListener::bind((b, 7000)).unwrap();
        listening_tx.send(()).unwrap();
        let (mut s, _) = l.accept().unwrap();
        let mut buf = [0u8; 1];
        while s.read_exact(&mut buf).is_ok() {
            s.write_all(&buf).unwrap();
        }
    });
    let (tx, rx) = std::sync::mpsc::channel::<()>();
    let (rtx, rrx) = std::sync::mpsc::channel::<Duration>();
    listening.recv().expect("the server on site B listens");
    let client = topo.spawn_in("a1", move || {
        let mut s = std::net::TcpStream::connect((b, 7000)).expect("connecting across the WAN");
        s.set_nodelay(true).unwrap();
        let mut buf = [0u8; 1];
        while rx.recv().is_ok() {
            let t = Instant::now();
            s.write_all(b"x").unwrap();
            s.read_exact(&mut buf).unwrap();
            rtx.send(t.elapsed()).unwrap();
        }
    });
    let mut rtts = Vec::new();
    for _ in 0..5 {
        tx.send(()).unwrap();
        rtts.push(rrx.recv().unwrap());
    }
    assert!(rtts.iter().all(|r| *r >= Duration::from_millis(40)), "{rtts:?}");
    topo.wan.set_partitioned(true);
    tx.send(()).unwrap();
    assert!(rrx.recv_timeout(Duration::from_secs(2)).is_err(), "an answer crossed a partitioned link");
    topo.wan.set_partitioned(false);
    rrx.recv_timeout(Duration::from_secs(30)).expect("the connection went on after healing");
    drop(tx);
    client.join().unwrap().unwrap();
    server.join().unwrap().unwrap();
    let c = topo.wan.counters();
    assert!(c[0].partitioned > 0 && c[0].frames > 10, "{c:?}");
}

/// Protection over IPv6 across 50 ms, 1% loss and 200 Mbit/s: every component binds `[::]` and
/// advertises its host's address; the replica ends byte-identical. The disk holds 48 MiB of random
/// data, so its initial copy is still running, held back by the WAN, when the protection arrives:
/// the protection starts one fresh journal, once.
#[test]
fn replicates_across_a_lossy_capped_wan_over_ipv6() {
    if !topology_or_skip() {
        return;
    }
    let dir = test_dir();
    let mut s = TwoSites::start_filled(dir.path(), lossy_wan(), Family::V6, 64, 48, &[]);
    s.protect(json!({}));
    let log = std::fs::read_to_string(s.site.local.log(Component::Agent)).unwrap();
    assert_eq!(log.matches("starting a fresh journal").count(), 1, "{log}");
    for round in 0..4 {
        s.write(&churn(round, 40, 64));
    }
    s.assert_identical(Duration::from_secs(120));
    // What the configuration server knows of the process server is the address it advertised.
    let (_, comps) = s.dep.api("GET", "/v1/components", None);
    let ps = comps.as_array().unwrap().iter().find(|c| c["name"] == "ps-1").cloned().unwrap();
    assert_eq!(ps["address"], json!(s.site.local.addrs.ps_quic.to_string()), "{ps}");
    let c = s.site.topo.wan.counters();
    assert!(c[0].lost > 0 && c[1].lost > 0, "the link lost nothing: {c:?}");
}

/// How long the long partition lasts: 60 s, or `SR_WAN_PARTITION_SECS`.
fn partition_secs() -> u64 {
    std::env::var("SR_WAN_PARTITION_SECS").ok().and_then(|v| v.parse().ok()).unwrap_or(60)
}

/// A partition of a minute during churn: the agent journals, the RPO alert fires; once healed,
/// replication resumes by itself, the RPO comes back under the policy, the alert clears and the
/// replica is byte-identical.
#[test]
fn a_long_partition_during_churn_heals_by_itself() {
    if !topology_or_skip() {
        return;
    }
    let dir = test_dir();
    let mut s = TwoSites::start(dir.path(), lossy_wan(), Family::V4, 64, &[]);
    s.protect(json!({ "rpo_threshold_secs": 10 }));
    s.write(&churn(1, 20, 64));
    s.assert_identical(Duration::from_secs(120));

    s.site.topo.wan.set_partitioned(true);
    let cut_at = Instant::now();
    // Churn through the partition: a round of writes every 200 ms (about 13 MiB a minute, well
    // inside the journal's limit), the first rounds until the RPO alert is raised.
    let mut round = 0u32;
    let mut churn_due = || {
        if cut_at.elapsed() >= Duration::from_millis(200) * round {
            s.write(&churn(100 + u64::from(round), 5, 64));
            round += 1;
        }
    };
    let alert = wait_until("an RPO alert during the partition", Duration::from_secs(60), || {
        churn_due();
        let item = s.item();
        (item["rpo_alert"] == true).then_some(item)
    });
    assert!(alert["rpo_seconds"].as_u64().unwrap() > 10, "{alert}");
    let partition = Duration::from_secs(partition_secs());
    wait_for("the partition's end", partition + Duration::from_secs(10), || {
        churn_due();
        cut_at.elapsed() >= partition
    });
    s.site.topo.wan.set_partitioned(false);
    s.assert_identical(Duration::from_secs(180));
    let item = wait_until("the RPO alert to clear", Duration::from_secs(60), || {
        let i = s.item();
        (i["rpo_alert"] == false && i["rpo_seconds"].as_u64().is_some_and(|r| r <= 10)).then_some(i)
    });
    assert_eq!(item["state_name"], "protected", "{item}");
    let events = s.dep.srctl(&["events"]);
    assert!(events.contains("over the policy's 10 s"), "{events}");
}

/// A partition long enough to overflow the journal: the agent keeps a dirty map, and after healing
/// the item is resynchronized by itself and ends byte-identical.
#[test]
fn a_partition_past_the_journal_limit_resyncs_after_healing() {
    if !topology_or_skip() {
        return;
    }
    let dir = test_dir();
    let mut s = TwoSites::start(dir.path(), lossy_wan(), Family::V4, 32, &[]);
    // 1% of 32 MiB: about 330 KiB of journal.
    s.protect(json!({ "journal_limit_percent": 1 }));
    s.site.topo.wan.set_partitioned(true);
    s.write(&["write -P 0x71 1M 4M".into()]);
    s.write(&churn(7, 30, 32));
    wait_for("the agent to overflow into its dirty map", Duration::from_secs(30), || {
        let st = s.site.local.agent_status().unwrap();
        st["disks"][0]["overflow"] == true || st["disks"][0]["dirty_bytes"].as_u64().unwrap_or(0) > 0
    });
    s.site.topo.wan.set_partitioned(false);
    let resync = wait_until("the item to need a resync", Duration::from_secs(60), || {
        let i = s.item();
        (i["state_name"] == "resync_required" || i["state_name"] == "resynchronizing").then_some(i)
    });
    eprintln!("after healing: {resync}");
    wait_until("the item to be protected again", Duration::from_secs(180), || {
        (s.item()["state_name"] == "protected").then_some(())
    });
    s.assert_identical(Duration::from_secs(120));
    let events = s.dep.srctl(&["events"]);
    let required = events.find("resync required").unwrap_or_else(|| panic!("no resync in the events: {events}"));
    assert!(events.rfind("is protected").is_some_and(|p| p > required), "{events}");
}

/// Registers a second process server on host `name` (a copy of ps-1's config with its own node
/// name, data directory, certificate and advertised address) and starts it.
fn second_process_server(s: &TwoSites, name: &str) -> Proc {
    let host = s.site.topo.host(name);
    let advertise = std::net::SocketAddr::new(host.ip(Family::V4), sr_devkit::ports::PS_QUIC);
    let key = s.dep.api("POST", "/v1/registration-keys", Some(json!({ "role": "process-server" }))).1["key"]
        .as_str()
        .unwrap()
        .to_string();
    let out = std::process::Command::new(sr_devkit::bin_dir().join("process-server"))
        .args(["register", "--server", &s.dep.cp.api.to_string(), "--key", &key, "--name", name])
        .args(["--address", &advertise.to_string(), "--dir"])
        .arg(&s.site.local.certs)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let root = &s.site.local.root;
    let text = std::fs::read_to_string(root.join("ps.toml"))
        .unwrap()
        .replace("node = \"ps-1\"", &format!("node = \"{name}\""))
        .replace(&s.site.local.addrs.ps_quic.to_string(), &advertise.to_string())
        .replace(&format!("{:?}", root.join("ps")), &format!("{:?}", root.join(name)))
        .replace("ps-1.", &format!("{name}."));
    let config = root.join(format!("{name}.toml"));
    std::fs::write(&config, text).unwrap();
    let http = std::net::SocketAddr::new(host.ip(Family::V4), sr_devkit::ports::PS_HTTP);
    let log = root.join("logs").join(format!("{name}.log"));
    sr_devkit::spawn_in(Some(&host.ns), Component::ProcessServer, &config, &log, http, &s.dep.cp.ca(), &[]).unwrap()
}

/// A process server cut off from the network (its agents, the master target, the configuration
/// server) while writes go on: the item moves to the other process server with nothing lost.
#[test]
fn a_process_server_cut_off_hands_its_items_to_another() {
    if !topology_or_skip() {
        return;
    }
    let dir = test_dir();
    let mut s = TwoSites::start(dir.path(), lossy_wan(), Family::V4, 64, &[("ps-2", Site::A)]);
    s.protect(json!({}));
    let _ps2 = second_process_server(&s, "ps-2");
    assert_eq!(s.item()["process_server"], "ps-1");
    s.write(&churn(3, 20, 64));
    s.assert_identical(Duration::from_secs(120));

    s.site.topo.set_cut("ps-1", true).unwrap();
    // Writes go on while the configuration server notices and moves the item.
    let mut round = 200;
    wait_for("the item to move to ps-2", Duration::from_secs(120), || {
        s.write(&churn(round, 5, 64));
        round += 1;
        s.item()["process_server"] == "ps-2"
    });
    s.write(&churn(round, 20, 64));
    s.assert_identical(Duration::from_secs(120));
    let events = s.dep.srctl(&["events"]);
    assert!(events.contains("moved to ps-2"), "{events}");
    s.site.topo.set_cut("ps-1", false).unwrap();
}

/// The whole cycle across the WAN: planned failover to site B, commit, reprotect from site B back
/// into the source disk through a master target on site A, failback; then an unplanned failover
/// while site A is cut off entirely, at the last point that reached site B.
#[test]
fn failover_commit_reprotect_failback_across_the_wan_and_unplanned_with_the_primary_cut_off() {
    if !topology_or_skip() {
        return;
    }
    let dir = test_dir();
    let extra = [("mt-a", Site::A), ("dr-agent", Site::B), ("dr-ps", Site::B)];
    let mut s = TwoSites::start(dir.path(), lossy_wan(), Family::V4, 64, &extra);
    s.write(&["write -P 0x0a 0 16M".into()]);
    let id = s.protect(json!({})).to_string();
    s.write(&["write -P 0x11 1M 2M".into()]);
    let source = s.site.disk.to_str().unwrap().to_string();

    // The JSON output carries the machine description, as the text output does.
    let out: serde_json::Value =
        serde_json::from_str(&s.dep.srctl(&["--output", "json", "failover", &id, "--planned"]))
            .expect("srctl failover --output json prints one JSON document");
    assert_eq!(out["state"], "succeeded", "{out}");
    let item = s.item();
    assert_eq!(item["state_name"], "failed_over", "{item}");
    assert_eq!(out["machine"], item["failover"]["machine"], "{out}");
    let fo_uri = s.dep.with_certs(item["failover"]["machine"]["disks"][0]["uri"].as_str().unwrap());
    assert!(
        fo_uri.contains(&s.site.topo.host("mt-1").v4.to_string()),
        "the failover disk is served on site B: {fo_uri}"
    );
    compare(&source, &fo_uri).unwrap();
    qemu_io(&fo_uri, &["write -P 0x22 8M 1M".into(), "flush".into()]).unwrap();
    s.dep.srctl(&["commit", &id]);
    let item = s.item();
    let failed_over = item["failover"]["committed"][0]["path"].as_str().unwrap().to_string();

    // Site B fronts the committed disk with its own agent and process server; a master target on
    // site A replicates back into the source disk.
    let placement = Placement {
        family: Family::V4,
        agent: s.site.topo.host("dr-agent").clone(),
        ps: s.site.topo.host("dr-ps").clone(),
        mt: s.site.topo.host("mt-a").clone(),
    };
    let b = Local::managed_placed(
        &dir.path().join("b"),
        vec![DiskSpec { id: 1, name: "disk0".into(), path: failed_over.clone().into() }],
        &Options { batch_bytes: 1 << 20, ..Options::default() },
        &s.dep.cp,
        &s.dep.admin,
        "b-",
        Some(placement),
    )
    .unwrap();
    let _b: Vec<Proc> = [Component::MasterTarget, Component::ProcessServer, Component::Agent]
        .into_iter()
        .map(|c| b.start(c).unwrap())
        .collect();
    s.dep.wait_machine("b-agent-1");
    // The reprotect picks a live master target other than the one failed over to: site A's must have
    // reported (the agent can report first).
    s.dep.wait_healthy("b-mt-1");
    qemu_io(&b.agent_uri("disk0"), &["write -P 0x33 20M 3M".into(), "flush".into()]).unwrap();
    let out = s.dep.srctl(&["reprotect", &id, "--machine", "b-agent-1"]);
    assert!(out.contains("b-mt-1"), "{out}");
    assert_eq!(s.item()["state"]["direction"], "reverse");
    wait_for("the source to take the recovery site's writes", Duration::from_secs(120), || {
        compare(&source, &failed_over).is_ok()
    });
    qemu_io(&b.agent_uri("disk0"), &["write -P 0x44 30M 1M".into(), "flush".into()]).unwrap();

    let (code, v) = s.dep.api("POST", &format!("/v1/items/{id}/failback"), None);
    assert_eq!(code, 200, "{v}");
    s.dep.wait_job(v["job"].as_u64().unwrap(), true);
    let item = s.item();
    assert_eq!(
        (item["state_name"].as_str(), item["state"]["direction"].as_str()),
        (Some("protected"), Some("forward"))
    );
    compare(&source, &failed_over).unwrap();
    qemu_io(&source, &["read -P 0x44 30M 1M".into(), "read -P 0x33 20M 3M".into(), "read -P 0x22 8M 1M".into()])
        .unwrap();

    // Forward again; then site A drops off the WAN entirely and site B fails over on its own.
    // (The replica is now the committed disk, which site B's master target adopted.)
    s.write(&["write -P 0x55 40M 1M".into()]);
    wait_for("the replica to take the write", Duration::from_secs(120), || compare(&source, &failed_over).is_ok());
    let then = dir.path().join("then.img");
    run("cp", &["--sparse=always", &source, then.to_str().unwrap()]).unwrap();
    s.site.topo.wan.set_partitioned(true);
    s.write(&["write -P 0x66 44M 1M".into()]);
    let (code, v) = s.dep.api("POST", &format!("/v1/items/{id}/failover"), Some(json!({ "planned": false })));
    assert_eq!(code, 200, "{v}");
    s.dep.wait_job(v["job"].as_u64().unwrap(), true);
    let item = s.item();
    assert_eq!(item["state_name"], "failed_over", "{item}");
    let fo_uri = s.dep.with_certs(item["failover"]["machine"]["disks"][0]["uri"].as_str().unwrap());
    compare(then.to_str().unwrap(), &fo_uri).unwrap();
    assert!(compare(&source, &fo_uri).is_err(), "the write made during the cut cannot have reached site B");
}
