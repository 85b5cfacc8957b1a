//! Portal benchmark (run by `bench/portal.sh`): a configuration server whose store holds `ITEMS`
//! protected items (with their machines, 4 process servers and 2 master targets) and `JOBS` finished
//! jobs of four steps each, written straight into its redb store before it starts. Then:
//! - each API call the portal's pages make, `ROUNDS` times over HTTPS, beside `/healthz` (the same
//!   server's smallest answer, for the floor of TLS and HTTP on this machine);
//! - each page in headless Chromium (`tests/browser/portal-pages.mjs`): from navigation until its table or
//!   heading shows the data.
//!
//! Prints one JSON object (also written to `OUT_DIR/portal.json`).

use config_server::lifecycle::{Direction, State};
use config_server::model::{
    id_key, now, Component, ComponentRole, Item, Job, JobState, Machine, Policy, Step, COMPONENTS, ITEMS, JOBS,
    MACHINES, POLICIES,
};
use config_server::store::{Docs, RedbControlStore};
use serde_json::{json, Value};
use sr_tests::*;
use std::time::{Duration, Instant};

fn env_u64(k: &str, default: u64) -> u64 {
    std::env::var(k).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

fn stats(mut ms: Vec<f64>) -> Value {
    ms.sort_by(f64::total_cmp);
    let at = |q: f64| ms[((ms.len() - 1) as f64 * q).round() as usize];
    json!({ "p50_ms": at(0.5), "p95_ms": at(0.95), "max_ms": at(1.0), "rounds": ms.len() })
}

fn main() -> anyhow::Result<()> {
    let out_dir = std::path::PathBuf::from(std::env::args().nth(1).unwrap_or_else(|| "bench/out/portal".into()));
    let (items, jobs, rounds) = (env_u64("ITEMS", 1000), env_u64("JOBS", 10_000), env_u64("ROUNDS", 30) as usize);
    let dir = tempfile::tempdir()?;
    let cp = sr_devkit::ControlPlane::create(&dir.path().join("cp"))?;
    // First start makes the CA and the admin token; the store is then filled while it is down.
    cp.start()?.stop()?;
    let seeded = Instant::now();
    {
        let store = RedbControlStore::open(&cp.root.join("cs").join("state.redb"))?;
        let now = now();
        let comp = |name: String, role: ComponentRole| Component {
            name,
            role,
            serial: 1,
            registered_at: now,
            last_heartbeat: Some(now),
            address: None,
            http: None,
            revoked: false,
            load: Default::default(),
            draining: false,
        };
        let pss: Vec<String> = (1..=4).map(|i| format!("ps-{i}")).collect();
        let mts: Vec<String> = (1..=2).map(|i| format!("mt-{i}")).collect();
        for n in &pss {
            store.put(COMPONENTS, n, &comp(n.clone(), ComponentRole::ProcessServer))?;
        }
        for n in &mts {
            store.put(COMPONENTS, n, &comp(n.clone(), ComponentRole::MasterTarget))?;
        }
        let policy: Policy = serde_json::from_value(json!({ "id": id_key(1), "name": "gold" }))?;
        store.put(POLICIES, &policy.id, &policy)?;
        for i in 1..=items {
            let machine = format!("vm-{i:05}");
            let mut item =
                Item::new(i, &machine, &policy.id, State::Protected { direction: Direction::Forward }, now - 3600);
            item.process_server = Some(pss[i as usize % pss.len()].clone());
            item.master_target = Some(mts[i as usize % mts.len()].clone());
            item.caught_up_at = Some(now - i % 400);
            store.put(ITEMS, &id_key(i), &item)?;
            let m = Machine {
                name: machine.clone(),
                disks: vec![sr_common::contract::DiskInfo { id: 1, name: "disk0".into(), size: 64 << 30, path: None }],
                last_heartbeat: now,
                progress: vec![],
                system: None,
            };
            store.put(MACHINES, &machine, &m)?;
            store.put(COMPONENTS, &machine, &comp(machine.clone(), ComponentRole::Agent))?;
        }
        let kinds = ["enable protection", "test failover", "resync", "test failover cleanup"];
        for j in 1..=jobs {
            let started = now - (jobs - j) * 10;
            let job = Job {
                id: j,
                kind: kinds[j as usize % kinds.len()].into(),
                target: (j % items.max(1) + 1).to_string(),
                state: JobState::Succeeded,
                progress: 100,
                steps: (0..4)
                    .map(|s| Step {
                        name: format!("step {s}"),
                        state: JobState::Succeeded,
                        started: Some(started + s),
                        ended: Some(started + s + 1),
                    })
                    .collect(),
                started,
                ended: Some(started + 4),
                error: None,
            };
            store.put(JOBS, &id_key(j), &job)?;
        }
    }
    let seed_secs = seeded.elapsed().as_secs_f64();
    let _cs = cp.start()?;
    let admin = cp.admin_token()?;
    let client = cp.client(&admin)?;
    let reader = client.post_json(cp.api, "/v1/tokens", &json!({ "name": "bench", "role": "reader" }))?["token"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    let client = cp.client(&reader)?;
    // The evaluation loop's first history sample, as a running server has them.
    wait_for("the first history sample", Duration::from_secs(60), || {
        client.get_json(cp.api, "/v1/overview").is_ok_and(|o| o["history"].as_array().is_some_and(|h| !h.is_empty()))
    });
    let mid = items / 2 + 1;
    let calls = [
        "/healthz".to_string(),
        "/portal/".to_string(),
        "/v1/whoami".to_string(),
        "/v1/overview".to_string(),
        "/v1/items".to_string(),
        "/v1/policies".to_string(),
        "/v1/machines".to_string(),
        format!("/v1/items/{mid}"),
        format!("/v1/items/{mid}/history"),
        "/v1/jobs?limit=200".to_string(),
        "/v1/jobs?state=running&limit=200".to_string(),
        format!("/v1/jobs/{jobs}"),
        "/v1/events?limit=200".to_string(),
    ];
    let mut api = serde_json::Map::new();
    for path in &calls {
        let mut ms = Vec::with_capacity(rounds);
        let mut size = 0;
        for _ in 0..rounds {
            let t = Instant::now();
            let (code, body) = client.request(cp.api, "GET", path, None)?;
            ms.push(t.elapsed().as_secs_f64() * 1000.0);
            anyhow::ensure!(code == 200, "GET {path}: {code}");
            size = body.len();
        }
        let mut s = stats(ms);
        s["bytes"] = json!(size);
        api.insert(path.clone(), s);
    }
    let pages = std::process::Command::new("node")
        .current_dir(std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("browser"))
        .arg("portal-pages.mjs")
        .env("SR_PORTAL", format!("https://{}", cp.api))
        .env("SR_TOKEN", &reader)
        .env("SR_ITEM", mid.to_string())
        .env("ROUNDS", rounds.min(10).to_string())
        .output()?;
    anyhow::ensure!(
        pages.status.success(),
        "tests/browser/portal-pages.mjs failed: {}{}",
        String::from_utf8_lossy(&pages.stdout),
        String::from_utf8_lossy(&pages.stderr)
    );
    let pages: Value = serde_json::from_slice(&pages.stdout)?;
    let report = json!({
        "items": items,
        "jobs": jobs,
        "seed_seconds": seed_secs,
        "api": api,
        "pages": pages,
    });
    std::fs::create_dir_all(&out_dir)?;
    std::fs::write(out_dir.join("portal.json"), serde_json::to_vec_pretty(&report)?)?;
    println!("{}", serde_json::to_string_pretty(&report)?);
    Ok(())
}
