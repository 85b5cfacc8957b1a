//! `srctl quickstart --sites`: two sites on this host, a WAN between them, and an outage of it.
//!
//! ```text
//! network namespaces: site A (agent-1, ps-1), site B (mt-1, cs), the WAN emulated in this process
//!   --> configuration server on site B; the others register across the WAN --> protection, initial
//!   replication across the WAN (progress) --> the WAN is cut while the machine keeps writing (RPO and
//!   alert live) --> healed: replication resumes by itself, RPO back under the policy, alert cleared
//!   --> qemu-img compare source vs replica --> summary; non-zero exit when anything differs
//! ```

use crate::quickstart::{catch_up, compare_images, ctrlc_wait, fresh_dir, Args, Ui};
use anyhow::{bail, Context};
use sr_devkit::netns::{Family, Topology};
use sr_devkit::sites::TwoSites;
use sr_devkit::wan::Impairment;
use sr_devkit::{ports, Component, Options};
use std::time::{Duration, Instant};

const RPO_SECS: u64 = 15;

fn random_mib(path: &std::path::Path, at_mib: u64, mib: u64) -> anyhow::Result<()> {
    use std::os::unix::fs::FileExt;
    let f = std::fs::OpenOptions::new().write(true).open(path)?;
    let mut buf = vec![0u8; 1 << 20];
    for i in 0..mib {
        rand::Rng::fill(&mut rand::thread_rng(), &mut buf[..]);
        f.write_all_at(&buf, (at_mib + i) << 20)?;
    }
    Ok(())
}

pub fn run(a: Args, json: bool) -> anyhow::Result<()> {
    if let Err(why) = Topology::available() {
        bail!("srctl quickstart --sites builds two sites of network namespaces: {why}");
    }
    let started = Instant::now();
    let mut ui = Ui { json, step: 0, steps: 6 };
    let dir = fresh_dir(&a)?;
    let source = dir.join("source.img");
    std::fs::File::create(&source)?.set_len(a.size_mib << 20)?;
    // A quarter of the disk random (nothing to compress), the rest never written (skipped).
    random_mib(&source, 0, a.size_mib / 4)?;

    let wan = Impairment::wan(Duration::from_millis(a.rtt_ms), a.loss_percent / 100.0, Some(a.mbit));
    ui.step(&format!(
        "Two sites on this host, joined by a WAN of {} ms round trip, {}% loss each way, {} Mbit/s",
        a.rtt_ms, a.loss_percent, a.mbit
    ));
    let opts = Options { batch_bytes: 1 << 20, ..Options::default() };
    let mut s = TwoSites::start(&dir, wan, 1, Family::V4, &source, &opts, &[])?;
    if !json {
        for (site, hosts) in [("A", ["agent-1", "ps-1"]), ("B", ["mt-1", "cs"])] {
            let names: Vec<String> = hosts
                .iter()
                .map(|h| {
                    let host = s.topo.host(h);
                    format!("{h} {} (netns {})", host.v4, host.ns)
                })
                .collect();
            println!("  site {site}: {}", names.join(", "));
        }
        println!(
            "  across the WAN: A to B UDP {} (process server to master target, QUIC) and TCP {} (the \
             configuration server's API); B to A TCP {} (its calls to the agent)",
            ports::MT_QUIC,
            ports::API,
            ports::AGENT_HTTP,
        );
    }

    ui.step("Configuration server on site B; agent, process server (site A) and master target (site B) registered across the WAN");
    if !json {
        println!(
            "  configuration server https://{}  (admin token in {})",
            s.cp.api,
            s.cp.root.join("cs/admin.token").display()
        );
    }

    ui.step(&format!("Protecting the disk ({} MiB, a quarter random): initial replication across the WAN", a.size_mib));
    let copy_started = Instant::now();
    let (item, job) = s.protect(serde_json::json!({ "rpo_threshold_secs": RPO_SECS }))?;
    let bar = ui.bar(100, "  {msg:24} [{bar:40}] {pos}%");
    loop {
        let it = s.item()?;
        let state = it["state_name"].as_str().unwrap_or_default().replace('_', " ");
        bar.set_message(state.clone());
        bar.set_position(it["state"]["percent"].as_u64().unwrap_or(if state == "protected" { 100 } else { 0 }));
        match s.api("GET", &format!("/v1/jobs/{job}"), None)?["state"].as_str() {
            Some("succeeded") => break,
            Some("failed") => bail!("enable protection failed; see {}", s.local.root.join("logs").display()),
            _ => {}
        }
        if copy_started.elapsed() > Duration::from_secs(900) {
            bail!("protection did not complete in 15 minutes; see {}", s.local.root.join("logs").display());
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    bar.finish_with_message("protected");
    catch_up(&s.local, &ui, Duration::from_secs(900))?;
    let initial_secs = copy_started.elapsed().as_secs_f64();

    ui.step(&format!(
        "The WAN is cut for {} s while the machine writes 1 MiB a second (policy: RPO {RPO_SECS} s)",
        a.partition_secs
    ));
    s.topo.wan.set_partitioned(true);
    let cut = Instant::now();
    let bar = ui.bar(a.partition_secs, "  cut {pos}/{len} s [{bar:40}] {msg}");
    let (mut max_rpo, mut alert_seen, mut n) = (0u64, false, 0u64);
    let uri = s.local.agent_uri("disk0");
    let chunk = dir.join("chunk.bin");
    std::fs::write(&chunk, vec![0u8; 1 << 20])?;
    while cut.elapsed() < Duration::from_secs(a.partition_secs) {
        random_mib(&chunk, 0, 1)?;
        let off = (a.size_mib / 4 + n % (a.size_mib / 2)) << 20;
        let cmd = format!("write -s {} {off} 1M", chunk.display());
        crate::quickstart::tool("qemu-io", &["-f", "raw", "-c", &cmd, "-c", "flush", &uri])?;
        n += 1;
        let it = s.item()?;
        let rpo = it["rpo_seconds"].as_u64().unwrap_or(0);
        max_rpo = max_rpo.max(rpo);
        alert_seen |= it["rpo_alert"] == true;
        bar.set_position(cut.elapsed().as_secs());
        bar.set_message(format!("RPO {rpo} s{}", if it["rpo_alert"] == true { ", RPO alert raised" } else { "" }));
        std::thread::sleep(Duration::from_millis(1000));
    }
    bar.finish();
    s.topo.wan.set_partitioned(false);

    ui.step("Healed: replication resumes by itself");
    let healed = Instant::now();
    catch_up(&s.local, &ui, Duration::from_secs(900))?;
    let catch_secs = healed.elapsed().as_secs_f64();
    let deadline = Instant::now() + Duration::from_secs(120);
    let cleared = loop {
        let it = s.item()?;
        if it["rpo_alert"] == false && it["rpo_seconds"].as_u64().is_some_and(|r| r <= RPO_SECS) {
            break true;
        }
        if Instant::now() > deadline {
            break false;
        }
        std::thread::sleep(Duration::from_millis(200));
    };

    ui.step("Verifying the replica on site B against the source on site A");
    let compare = compare_images(&source.display().to_string(), &s.local.replica_uri(1));
    let identical = compare.is_ok();
    let counters = s.topo.wan.counters();
    let summary = serde_json::json!({
        "identical": identical,
        "item": item,
        "wan": { "rtt_ms": a.rtt_ms, "loss_percent": a.loss_percent, "mbit": a.mbit },
        "initial_replication_seconds": initial_secs,
        "partition_seconds": a.partition_secs,
        "written_during_partition_mib": n,
        "max_rpo_seconds": max_rpo,
        "rpo_alert_raised": alert_seen,
        "rpo_alert_cleared": cleared,
        "catch_up_seconds": catch_secs,
        "frames_lost_a_to_b": counters[0].lost,
        "frames_dropped_by_partition": counters[0].partitioned + counters[1].partitioned,
        "total_seconds": started.elapsed().as_secs_f64(),
        "dir": dir,
    });
    let yes = |b: bool| if b { "yes" } else { "NO" };
    if json {
        println!("{}", serde_json::to_string_pretty(&summary)?);
    } else {
        println!();
        println!("Summary");
        println!("  source (site A) and replica (site B) identical (qemu-img compare): {}", yes(identical));
        println!("  initial replication of {} MiB across the WAN: {initial_secs:.1} s", a.size_mib);
        println!(
            "  {} s cut: {n} MiB written meanwhile, RPO up to {max_rpo} s, alert raised: {}, cleared after healing: {}",
            a.partition_secs,
            yes(alert_seen),
            yes(cleared)
        );
        println!("  caught up {catch_secs:.1} s after the WAN came back");
        let srctl = format!("srctl --server {} --token-file {}", s.cp.api, s.cp.root.join("cs/admin.token").display());
        if a.keep_running {
            println!("  while the services run: {srctl} items list");
        } else {
            println!("  the services and sites stopped with the quickstart; --keep-running leaves them up for `{srctl} items list`");
        }
        println!("  logs: {}", s.local.root.join("logs").display());
    }
    if a.keep_running && identical {
        println!("Services keep running on their sites; press Ctrl-C to stop them and remove the namespaces.");
        let (tx, rx) = std::sync::mpsc::channel();
        let _ = ctrlc_wait(tx);
        let _ = rx.recv();
    }
    while let Some(p) = s.procs.pop() {
        let c = p.component;
        p.stop().with_context(|| format!("stopping {}", c.binary()))?;
    }
    if let Err(e) = compare {
        bail!("the replica differs from the source: {e:#}");
    }
    if !alert_seen || !cleared {
        bail!(
            "the RPO alert was {}; see {}",
            if alert_seen { "not cleared after healing" } else { "never raised during the cut" },
            s.local.log(Component::Agent).parent().map(|p| p.display().to_string()).unwrap_or_default()
        );
    }
    Ok(())
}
