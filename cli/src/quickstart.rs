//! `srctl quickstart`: the whole system on one host, from nothing to a verified replica.
//!
//! ```text
//! sample ext4 disk (mke2fs -d) --> configuration server --> master target, process server and agent
//!   register with one-time keys and start --> policy + enable protection through the API (job)
//!   --> initial replication (progress) --> new file-system generations written through the agent's
//!   NBD export by nbdcopy (lag and RPO shown) --> caught up --> qemu-img compare source vs replica,
//!   e2fsck of an exported replica image --> summary; non-zero exit when anything differs
//! ```

use anyhow::{bail, Context};
use indicatif::{ProgressBar, ProgressStyle};
use sr_devkit::{Component, ControlPlane, DiskSpec, Local, Options, Proc};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

const MARKER: &str = ".sr-quickstart";

#[derive(clap::Args)]
pub struct Args {
    /// Directory for the disk, the replica, configs, certificates and logs (replaced if it holds an
    /// earlier quickstart).
    #[arg(long, default_value = "sr-quickstart")]
    pub(crate) dir: PathBuf,
    /// Size of the sample disk in MiB.
    #[arg(long, default_value_t = 256)]
    pub(crate) size_mib: u64,
    /// File-system generations written through the agent after the initial replication.
    #[arg(long, default_value_t = 3)]
    pub(crate) generations: u32,
    /// Leave the services running at the end (stop them with Ctrl-C).
    #[arg(long)]
    pub(crate) keep_running: bool,
    /// Two sites instead of one host: each component in its own network namespace, site A (agent,
    /// process server) and site B (master target, configuration server) joined by an emulated WAN,
    /// which is cut for a while during writes and healed (needs root).
    #[arg(long)]
    pub(crate) sites: bool,
    /// With --sites: the WAN's round trip in milliseconds.
    #[arg(long, default_value_t = 50, requires = "sites")]
    pub(crate) rtt_ms: u64,
    /// With --sites: the share of packets the WAN loses each way, in percent.
    #[arg(long, default_value_t = 1.0, requires = "sites")]
    pub(crate) loss_percent: f64,
    /// With --sites: the WAN's bandwidth in Mbit/s.
    #[arg(long, default_value_t = 200, requires = "sites")]
    pub(crate) mbit: u64,
    /// With --sites: how long the WAN stays cut, in seconds.
    #[arg(long, default_value_t = 30, requires = "sites")]
    pub(crate) partition_secs: u64,
}

/// `qemu-img compare` of two images (paths, or `nbds://` URIs with the NBD client certificate).
pub(crate) fn compare_images(a: &str, b: &str) -> anyhow::Result<String> {
    let args = sr_devkit::qemu_compare_args(a, b)?;
    tool("qemu-img", &args.iter().map(String::as_str).collect::<Vec<_>>())
}

pub(crate) fn tool(program: &str, args: &[&str]) -> anyhow::Result<String> {
    let out = Command::new(program).args(args).output().with_context(|| {
        format!("running {program}: is it installed? scripts/quickstart.sh installs what the quickstart needs")
    })?;
    if !out.status.success() {
        bail!(
            "{program} {} failed ({}): {}{}",
            args.join(" "),
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

pub(crate) struct Ui {
    pub json: bool,
    pub step: u32,
    pub steps: u32,
}

impl Ui {
    pub fn step(&mut self, msg: &str) {
        self.step += 1;
        if !self.json {
            println!("[{}/{}] {msg}", self.step, self.steps);
        }
    }
    pub fn bar(&self, len: u64, template: &str) -> ProgressBar {
        if self.json {
            return ProgressBar::hidden();
        }
        let b = ProgressBar::new(len.max(1));
        b.set_style(ProgressStyle::with_template(template).expect("valid template").progress_chars("=> "));
        b
    }
}

/// Files for one generation of the sample file system: text and binary, some compressible.
fn fill_tree(dir: &Path, generation: u32, bytes: u64) -> anyhow::Result<()> {
    if dir.exists() {
        std::fs::remove_dir_all(dir)?;
    }
    std::fs::create_dir_all(dir.join("etc"))?;
    std::fs::create_dir_all(dir.join("var/data"))?;
    std::fs::write(dir.join("etc/generation"), format!("{generation}\n"))?;
    let mut x = 0x9e37_79b9_7f4a_7c15u64 ^ generation as u64;
    let mut written = 0;
    let mut i = 0;
    while written < bytes {
        let len = (64 << 10) + (x % (1 << 20)) as usize;
        let mut buf = Vec::with_capacity(len);
        while buf.len() < len {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            if i % 3 == 0 {
                buf.extend_from_slice(format!("record {i} generation {generation} value {x}\n").as_bytes());
            } else {
                buf.extend_from_slice(&x.to_le_bytes());
            }
        }
        std::fs::write(dir.join(format!("var/data/file-{i:04}.bin")), &buf)?;
        written += buf.len() as u64;
        i += 1;
    }
    Ok(())
}

fn make_fs(image: &Path, tree: &Path, size_mib: u64) -> anyhow::Result<()> {
    if image.exists() {
        std::fs::remove_file(image)?;
    }
    tool(
        "mke2fs",
        &[
            "-q",
            "-F",
            "-t",
            "ext4",
            "-d",
            &tree.display().to_string(),
            &image.display().to_string(),
            &format!("{size_mib}M"),
        ],
    )?;
    Ok(())
}

fn agent_disk(local: &Local) -> anyhow::Result<(u64, f64, bool)> {
    let st = local.agent_status()?;
    let d = &st["disks"][0];
    Ok((
        d["last_seq"].as_u64().context("last_seq")?,
        d["initial_copy"]["percent"].as_f64().context("percent")?,
        d["initial_copy"]["done"].as_bool().context("done")?,
    ))
}

/// Waits until the master target applied the agent's last change; shows applied/last.
pub(crate) fn catch_up(local: &Local, ui: &Ui, timeout: Duration) -> anyhow::Result<u64> {
    let bar = ui.bar(1, "  applied {pos}/{len} changes [{bar:40}] {msg}");
    let deadline = Instant::now() + timeout;
    loop {
        let (last, _, done) = agent_disk(local)?;
        let applied = local.applied(1)?;
        bar.set_length(last.max(1));
        bar.set_position(applied.min(last));
        if done && applied >= last {
            bar.finish_with_message("caught up");
            return Ok(applied);
        }
        if Instant::now() > deadline {
            bar.abandon_with_message("timed out");
            bail!(
                "the master target applied {applied} of {last} changes after {timeout:?}; see the logs in {}",
                local.root.join("logs").display()
            );
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// The quickstart's directory, made anew (an earlier quickstart's is replaced, anything else refused).
pub(crate) fn fresh_dir(a: &Args) -> anyhow::Result<PathBuf> {
    if a.size_mib < 32 {
        bail!("--size-mib {}: the sample disk needs at least 32 MiB", a.size_mib);
    }
    if a.dir.exists() {
        if !a.dir.join(MARKER).exists() {
            bail!("{} exists and was not made by srctl quickstart; choose another --dir", a.dir.display());
        }
        std::fs::remove_dir_all(&a.dir)
            .with_context(|| format!("removing the earlier quickstart in {}", a.dir.display()))?;
    }
    std::fs::create_dir_all(&a.dir)?;
    std::fs::write(a.dir.join(MARKER), "made by srctl quickstart\n")?;
    Ok(std::fs::canonicalize(&a.dir)?)
}

pub fn run(a: Args, json: bool) -> anyhow::Result<()> {
    if a.sites {
        return crate::sites::run(a, json);
    }
    let started = Instant::now();
    let mut ui = Ui { json, step: 0, steps: 7 };
    let dir = fresh_dir(&a)?;

    let fill = a.size_mib * (1 << 20) / 4;
    ui.step(&format!("Sample disk: {} MiB ext4 holding {} MiB of files (mke2fs -d)", a.size_mib, fill >> 20));
    let source = dir.join("source.img");
    let tree = dir.join("tree");
    fill_tree(&tree, 0, fill)?;
    make_fs(&source, &tree, a.size_mib)?;

    ui.step("Starting the configuration server; master target, process server and agent register with one-time keys");
    let cp = ControlPlane::create(&dir.join("control"))?;
    let mut procs: Vec<Proc> = vec![cp.start()?];
    let admin = cp.admin_token()?;
    let api = crate::api::Client::with(cp.api, &admin, &cp.ca())?;
    let mut local = Local::managed(
        &dir.join("deployment"),
        vec![DiskSpec { id: 1, name: "disk0".into(), path: source.clone() }],
        &Options::default(),
        &cp,
        &admin,
    )?;
    for c in [Component::MasterTarget, Component::ProcessServer, Component::Agent] {
        procs.push(local.start(c)?);
    }
    let uri = local.agent_uri("disk0");
    if !json {
        println!(
            "  configuration server https://{}  (admin token in {})",
            cp.api,
            cp.root.join("cs/admin.token").display()
        );
        println!("  agent export {uri}");
    }
    let deadline = Instant::now() + Duration::from_secs(30);
    while !api.call("GET", "/v1/machines", None)?.to_string().contains("disk0") {
        if Instant::now() > deadline {
            bail!(
                "the agent did not report its disk to the configuration server; see {}",
                local.log(Component::Agent).display()
            );
        }
        std::thread::sleep(Duration::from_millis(200));
    }

    ui.step("Protecting the disk: policy, enable-protection job, initial replication");
    api.call("POST", "/v1/policies", Some(serde_json::json!({ "name": "quickstart", "rpo_threshold_secs": 60 })))?;
    let v = api.call("POST", "/v1/items", Some(serde_json::json!({ "machine": "agent-1", "policy": "quickstart" })))?;
    local.item = v["item"]["id"].as_u64().context("no item id")?;
    let job = v["job"].as_u64().context("no job id")?;
    let bar = ui.bar(100, "  {msg:24} [{bar:40}] {pos}%");
    let copy_started = Instant::now();
    // The item passed through Enabling protection while the request ran its first job steps.
    let mut seen = vec![format!("enabling protection (job {job})")];
    loop {
        let item = api.call("GET", &format!("/v1/items/{}", local.item), None)?;
        let state = item["state_name"].as_str().unwrap_or_default().replace('_', " ");
        if seen.last() != Some(&state) {
            seen.push(state.clone());
        }
        bar.set_message(state.clone());
        bar.set_position(item["state"]["percent"].as_u64().unwrap_or(if state == "protected" { 100 } else { 0 }));
        let j = api.call("GET", &format!("/v1/jobs/{job}"), None)?;
        match j["state"].as_str() {
            Some("succeeded") => break,
            Some("failed") => bail!("enable protection failed: {}", j["error"].as_str().unwrap_or_default()),
            _ => {}
        }
        if copy_started.elapsed() > Duration::from_secs(600) {
            bail!(
                "protection did not complete in 10 minutes (state {state}); see {}",
                local.root.join("logs").display()
            );
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    bar.finish_with_message("protected");
    if !json {
        println!("  states seen: {}", seen.join(" -> "));
    }
    catch_up(&local, &ui, Duration::from_secs(600))?;
    let initial_secs = copy_started.elapsed().as_secs_f64();

    ui.step(&format!(
        "Write workload: {} new file-system generations written through the agent by nbdcopy",
        a.generations
    ));
    let mut max_lag = 0u64;
    let mut max_rpo = 0u64;
    let workload_started = Instant::now();
    for g in 1..=a.generations {
        let image = dir.join("generation.img");
        fill_tree(&tree, g, fill)?;
        make_fs(&image, &tree, a.size_mib)?;
        let copy = {
            let (image, uri) = (image.clone(), uri.clone());
            std::thread::spawn(move || tool("nbdcopy", &["--flush", &image.display().to_string(), &uri]))
        };
        let bar = ui.bar(1, "  generation {msg}");
        while !copy.is_finished() {
            let (last, _, _) = agent_disk(&local)?;
            let lag = last.saturating_sub(local.applied(1)?);
            max_lag = max_lag.max(lag);
            let rpo = api.call("GET", &format!("/v1/items/{}", local.item), None)?["rpo_seconds"].as_u64();
            max_rpo = max_rpo.max(rpo.unwrap_or(0));
            bar.set_message(format!("{g}: lag {lag} changes, RPO {} s", rpo.map_or("-".into(), |r| r.to_string())));
            bar.tick();
            std::thread::sleep(Duration::from_millis(100));
        }
        copy.join().map_err(|_| anyhow::anyhow!("nbdcopy thread panicked"))??;
        bar.finish();
    }
    let workload_secs = workload_started.elapsed().as_secs_f64();

    ui.step("Catching up");
    let catch_started = Instant::now();
    let applied = catch_up(&local, &ui, Duration::from_secs(600))?;
    let catch_secs = catch_started.elapsed().as_secs_f64();

    ui.step("Verifying the replica");
    let compare = compare_images(&source.display().to_string(), &local.replica_uri(1));
    let export = local.export_dir().join("replica-export.img");
    let exported = local.post(
        Component::MasterTarget,
        "/v1/export",
        &serde_json::json!({ "item": 1, "disk": 1, "path": export }),
    )?;
    let fsck = tool("e2fsck", &["-f", "-n", &export.display().to_string()]);
    let generation = tool("debugfs", &["-R", "cat /etc/generation", &export.display().to_string()]).unwrap_or_default();
    let identical = compare.is_ok();
    let fs_ok = fsck.is_ok() && generation.trim() == a.generations.to_string();

    ui.step("Failover drill: the disks brought up at the latest point (a test failover), checked, discarded");
    let drill_started = Instant::now();
    let tf = api.call(
        "POST",
        &format!("/v1/items/{}/test-failover", local.item),
        Some(serde_json::json!({ "point": "latest" })),
    )?;
    let drill_ms = drill_started.elapsed().as_secs_f64() * 1000.0;
    let tf_uri = local.with_certs(tf["machine"]["disks"][0]["uri"].as_str().unwrap_or_default());
    let drill = compare_images(&source.display().to_string(), &tf_uri);
    api.call("POST", &format!("/v1/items/{}/test-failover/cleanup", local.item), None)?;
    let drill_ok = drill.is_ok();
    let summary = serde_json::json!({
        "identical": identical,
        "replica_filesystem_clean": fs_ok,
        "replica_generation": generation.trim(),
        "applied_seq": applied,
        "disk_mib": a.size_mib,
        "initial_replication_seconds": initial_secs,
        "workload_seconds": workload_secs,
        "catch_up_seconds": catch_secs,
        "max_lag_changes": max_lag,
        "max_rpo_seconds": max_rpo,
        "item": local.item,
        "exported_image": exported["path"],
        "test_failover_ms": drill_ms,
        "test_failover_identical": drill_ok,
        "total_seconds": started.elapsed().as_secs_f64(),
        "portal": format!("https://{}/portal/", cp.api),
        "dir": dir,
    });
    if json {
        println!("{}", serde_json::to_string_pretty(&summary)?);
    } else {
        println!();
        println!("Summary");
        println!("  source and replica identical (qemu-img compare): {}", if identical { "yes" } else { "NO" });
        println!(
            "  replica file system clean (e2fsck -fn), generation {}: {}",
            generation.trim(),
            if fs_ok { "yes" } else { "NO" }
        );
        println!("  changes applied: {applied}");
        println!("  initial replication of {} MiB: {initial_secs:.1} s", a.size_mib);
        println!("  workload: {workload_secs:.1} s, largest lag {max_lag} changes, largest RPO {max_rpo} s, caught up {catch_secs:.1} s after it ended");
        let srctl = format!("srctl --server {} --token-file {}", cp.api, cp.root.join("cs/admin.token").display());
        println!("  configuration server: https://{}", cp.api);
        println!(
            "  failover drill: disks up at the latest point in {drill_ms:.0} ms, identical to the source: {}",
            if drill_ok { "yes" } else { "NO" }
        );
        println!("  logs: {}", local.root.join("logs").display());
        if a.keep_running {
            println!("  portal: https://{}/portal/", cp.api);
            println!("  portal sign-in token (admin): {}", cp.admin_token()?);
            println!(
                "    (the browser warns about the certificate unless it trusts the deployment's CA {})",
                cp.ca().display()
            );
            println!("  while the services run: {srctl} items list");
            println!(
                "  next: {srctl} failover {} --planned (stops the source; then commit, reprotect, failback: see README)",
                local.item
            );
        } else {
            println!(
                "  the services stopped with the quickstart; `srctl quickstart --keep-running` leaves them up for \
                 the web portal, `{srctl} items list` and `{srctl} failover {} --planned`",
                local.item
            );
        }
    }
    if a.keep_running && identical && fs_ok && drill_ok {
        println!("Services keep running; press Ctrl-C to stop them.");
        let (tx, rx) = std::sync::mpsc::channel();
        let _ = ctrlc_wait(tx);
        let _ = rx.recv();
    }
    for p in procs.into_iter().rev() {
        p.stop()?;
    }
    if let Err(e) = compare {
        bail!("the replica differs from the source: {e:#}");
    }
    if let Err(e) = fsck {
        bail!("the replica's file system is not clean: {e:#}");
    }
    if !fs_ok {
        bail!("the replica holds generation {:?}, expected {}", generation.trim(), a.generations);
    }
    if let Err(e) = drill {
        bail!("the test failover's disk differs from the source: {e:#}");
    }
    Ok(())
}

/// Blocks a thread on SIGINT/SIGTERM and signals `tx`.
pub(crate) fn ctrlc_wait(tx: std::sync::mpsc::Sender<()>) -> anyhow::Result<()> {
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    // Registered here, before the caller waits: a SIGTERM from now on is taken, not fatal.
    let mut term = rt.block_on(async { tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) })?;
    std::thread::spawn(move || {
        rt.block_on(async {
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {}
                _ = term.recv() => {}
            }
        });
        let _ = tx.send(());
    });
    Ok(())
}
