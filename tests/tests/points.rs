//! Recovery points end to end: writes go through the agent's NBD front end, copies of the source are
//! kept at recorded instants, and the master target's views of those instants are compared with the
//! copies by `qemu-img compare`, also after retention expired older points and after the master target
//! was killed during apply, expiry and a test failover.

// Test code: a failed unwrap is a failed test, with its message.
#![allow(clippy::unwrap_used)]

use rand::{Rng, SeedableRng};
use serde_json::{json, Value};
use sr_tests::*;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

const MIB: u64 = 1 << 20;

/// A round of overlapping writes, zeroes and discards, then a flush.
fn round(rng: &mut rand::rngs::StdRng, size: u64, pattern: u8) -> Vec<String> {
    let mut cmds = Vec::new();
    for _ in 0..6 {
        let len = [512, 4096, 70_000, 2 * MIB][rng.gen_range(0..4)];
        let off = rng.gen_range(0..size - len) / 512 * 512;
        cmds.push(match rng.gen_range(0..8) {
            0 => format!("write -z {off} {len}"),
            1 => format!("discard {off} {}", len / 512 * 512),
            _ => format!("write -P {pattern} {off} {len}"),
        });
    }
    cmds.push("flush".into());
    cmds
}

fn now_us() -> u64 {
    sr_common::types::now_micros()
}

struct Setup {
    dir: TestDir,
    local: Local,
    size: u64,
    mt: Option<Proc>,
    _ps: Proc,
    _agent: Proc,
}

fn setup(size: u64, mt_env: &[(&str, &str)], agent_env: &[(&str, &str)]) -> Setup {
    setup_in(test_dir(), size, mt_env, agent_env)
}

fn setup_in(dir: TestDir, size: u64, mt_env: &[(&str, &str)], agent_env: &[(&str, &str)]) -> Setup {
    let disk = dir.path().join("source.img");
    make_disk(&disk, size).unwrap();
    run("qemu-io", &["-f", "raw", "-c", "write -P 0x42 0 3M", disk.to_str().unwrap()]).unwrap();
    let opts = Options { batch_bytes: 256 << 10, ..Options::default() };
    let local =
        Local::create(&dir.path().join("dep"), vec![DiskSpec { id: 1, name: "d".into(), path: disk }], &opts).unwrap();
    let mt = local.start_env(Component::MasterTarget, mt_env).unwrap();
    let ps = local.start(Component::ProcessServer).unwrap();
    let agent = local.start_env(Component::Agent, agent_env).unwrap();
    wait_caught_up(&local, Duration::from_secs(60)).unwrap();
    Setup { dir, local, size, mt: Some(mt), _ps: ps, _agent: agent }
}

impl Setup {
    fn source(&self) -> PathBuf {
        self.local.disks[0].path.clone()
    }

    /// Waits until applied, then records the instant and a copy of the source at it.
    fn mark(&self, name: &str) -> (u64, PathBuf) {
        wait_caught_up(&self.local, Duration::from_secs(60)).unwrap();
        let t = now_us();
        let copy = self.dir.path().join(format!("{name}.img"));
        std::fs::copy(self.source(), &copy).unwrap();
        // The next write comes strictly later than the recorded instant.
        wait_for("the clock to pass the recorded instant", Duration::from_secs(1), || now_us() > t);
        (t, copy)
    }

    fn view(&self, name: &str, point: Value, writable: bool) -> (u16, Value) {
        let body = json!({ "name": name, "item": self.local.item, "point": point, "writable": writable });
        let (code, text) = self
            .local
            .client(Component::MasterTarget)
            .unwrap()
            .request(self.local.addrs.mt_http, "POST", "/v1/views", Some(&body.to_string()))
            .unwrap();
        (code, serde_json::from_str(&text).unwrap_or(Value::String(text.clone())))
    }

    fn open_view(&self, name: &str, point: Value, writable: bool) -> String {
        let (code, v) = self.view(name, point, writable);
        assert_eq!(code, 200, "view {name}: {v}");
        self.local.with_certs(v["disks"][0]["uri"].as_str().unwrap())
    }

    fn delete_view(&self, name: &str) {
        let (code, text) = self
            .local
            .client(Component::MasterTarget)
            .unwrap()
            .request(self.local.addrs.mt_http, "DELETE", &format!("/v1/views/{name}"), None)
            .unwrap();
        assert_eq!(code, 200, "{text}");
    }

    fn points(&self) -> Value {
        self.local.get(Component::MasterTarget, &format!("/v1/points?item={}", self.local.item)).unwrap()
    }
}

fn check_equal(s: &Setup, name: &str, t: u64, copy: &Path) {
    let uri = s.open_view(name, json!({ "time-us": t }), false);
    if let Err(e) = compare(copy.to_str().unwrap(), &uri) {
        panic!("the point at {t} ({name}) differs from the source's copy then: {e:#}");
    }
    s.delete_view(name);
}

#[test]
fn any_instant_reads_back_as_the_source_was_then() {
    let mut rng = rand::rngs::StdRng::seed_from_u64(21);
    let s = setup(32 * MIB, &[], &[("SR_AGENT__POINTS__CRASH_INTERVAL_SECS", "1")]);
    let uri = s.local.agent_uri("d");
    let mut marks = Vec::new();
    for k in 0..5u8 {
        qemu_io(&uri, &round(&mut rng, s.size, 0x10 + k)).unwrap();
        marks.push(s.mark(&format!("t{k}")));
    }
    for (k, (t, copy)) in marks.iter().enumerate() {
        check_equal(&s, &format!("at-{k}"), *t, copy);
    }
    // The comparison can fail: an earlier copy is not the later point.
    let later = s.open_view("later", json!({ "time-us": marks[4].0 }), false);
    assert!(compare(marks[0].1.to_str().unwrap(), &later).is_err());
    s.delete_view("later");
    // Bookmarks from the agent's interval are listed as crash-consistent named points, and usable.
    let p = wait_until("a bookmark from the agent's interval", Duration::from_secs(30), || {
        let p = s.points();
        p["disks"][0]["named"].as_array().unwrap().iter().any(|m| m["kind"] == "crash-consistent").then_some(p)
    });
    let named = p["disks"][0]["named"].as_array().unwrap();
    assert!(named.iter().any(|m| m["kind"] == "initial-copy-done"), "{p}");
    assert!(p["disks"][0]["undo_bytes"].as_u64().unwrap() > 0);
    s.open_view("bm", json!("latest-bookmark"), false);
    // Bad requests get clear refusals.
    let (code, v) = s.view("bm", json!("latest"), false);
    assert_eq!(code, 409, "{v}");
    let (code, v) = s.view("early", json!({ "time-us": 1_000_000 }), false);
    assert_eq!(code, 409, "{v}");
    assert!(v["error"].as_str().unwrap().contains("before the oldest retained point"), "{v}");
    let (code, _) = s.view("Bad Name", json!("latest"), false);
    assert_eq!(code, 400);
    let (code, _) = s.view("x", json!({ "bogus": 1 }), false);
    assert_eq!(code, 400);
    // Export at a point writes exactly the copy.
    let out = s.local.export_dir().join("export-t2.img");
    let body = json!({ "item": s.local.item, "disk": 1, "path": out, "point": { "time-us": marks[2].0 } });
    s.local.post(Component::MasterTarget, "/v1/export", &body).unwrap();
    compare(marks[2].1.to_str().unwrap(), out.to_str().unwrap()).unwrap();
    // Without waiting: the export's progress is followed until it is done.
    let out = s.local.export_dir().join("export-t4.img");
    let body =
        json!({ "item": s.local.item, "disk": 1, "path": out, "point": { "time-us": marks[4].0 }, "wait": false });
    let started = s.local.post(Component::MasterTarget, "/v1/export", &body).unwrap();
    let id = started["export_id"].as_u64().unwrap();
    wait_for("the export to finish", Duration::from_secs(30), || {
        let p = s.local.get(Component::MasterTarget, &format!("/v1/exports/{id}")).unwrap();
        assert!(p["percent"].as_f64().unwrap() <= 100.0);
        if p["state"] == "done" {
            assert_eq!(p["percent"], 100.0);
            return true;
        }
        assert_eq!(p["state"], "running", "{p}");
        false
    });
    compare(marks[4].1.to_str().unwrap(), out.to_str().unwrap()).unwrap();
    // And as qcow2, which qemu-img checks and reads back as the same disk.
    let q = s.local.export_dir().join("export-t3.qcow2");
    let body =
        json!({ "item": s.local.item, "disk": 1, "path": q, "point": { "time-us": marks[3].0 }, "format": "qcow2" });
    s.local.post(Component::MasterTarget, "/v1/export", &body).unwrap();
    run("qemu-img", &["check", "-f", "qcow2", q.to_str().unwrap()]).unwrap();
    run("qemu-img", &["compare", "-f", "raw", "-F", "qcow2", marks[3].1.to_str().unwrap(), q.to_str().unwrap()])
        .unwrap();
    assert!(run(
        "qemu-img",
        &["compare", "-f", "raw", "-F", "qcow2", marks[1].1.to_str().unwrap(), q.to_str().unwrap()]
    )
    .is_err());
}

#[test]
fn a_writable_view_stays_at_its_point_and_never_touches_the_replica() {
    let mut rng = rand::rngs::StdRng::seed_from_u64(5);
    let s = setup(32 * MIB, &[], &[]);
    let uri = s.local.agent_uri("d");
    qemu_io(&uri, &round(&mut rng, s.size, 0x21)).unwrap();
    let (t, copy) = s.mark("before");
    let test_disk = s.open_view("tf", json!({ "time-us": t }), true);
    // Churn on the source while the test disk is written to.
    let stop = Arc::new(AtomicBool::new(false));
    let churn = {
        let (stop, uri, size) = (stop.clone(), uri.clone(), s.size);
        std::thread::spawn(move || {
            let mut rng = rand::rngs::StdRng::seed_from_u64(9);
            let mut k = 0u8;
            while !stop.load(Ordering::Relaxed) {
                qemu_io(&uri, &round(&mut rng, size, 0x30 + k % 50)).unwrap();
                k = k.wrapping_add(1);
            }
        })
    };
    let writes =
        ["write -P 0xee 1M 1M".to_string(), "write -z 5M 8k".to_string(), "write -P 0xdd 777 1000".to_string()];
    qemu_io(&test_disk, &writes).unwrap();
    let expected = s.dir.path().join("expected.img");
    std::fs::copy(&copy, &expected).unwrap();
    qemu_io(expected.to_str().unwrap(), &writes).unwrap();
    // Replication goes on meanwhile: something the churn wrote after the test disk's writes is applied.
    let written = s.local.agent_status().unwrap()["disks"][0]["last_seq"].as_u64().unwrap();
    wait_for("the churn to be applied to the replica", Duration::from_secs(30), || {
        s.local.applied(1).unwrap() > written
    });
    compare(expected.to_str().unwrap(), &test_disk).unwrap();
    stop.store(true, Ordering::Relaxed);
    churn.join().unwrap();
    // Replication went on, and the test disk's writes are not in the replica.
    wait_caught_up(&s.local, Duration::from_secs(60)).unwrap();
    compare(s.source().to_str().unwrap(), &s.local.replica_uri(1)).unwrap();
    compare(expected.to_str().unwrap(), &test_disk).unwrap();
    s.delete_view("tf");
    assert!(run("nbdinfo", &[&test_disk]).is_err(), "the test disk is still served after cleanup");
}

#[test]
fn retention_expires_old_points_reclaims_space_and_keeps_the_rest_exact() {
    let mut rng = rand::rngs::StdRng::seed_from_u64(8);
    let env = [
        ("SR_MT__POINTS__RETENTION_SECS", "4"),
        ("SR_MT__POINTS__SEGMENT_SECS", "1"),
        ("SR_MT__POINTS__EXPIRY_INTERVAL_SECS", "1"),
    ];
    let s = setup(32 * MIB, &env, &[]);
    let uri = s.local.agent_uri("d");
    let mut marks = Vec::new();
    let mut peak = 0;
    for k in 0..12u8 {
        qemu_io(&uri, &round(&mut rng, s.size, 0x50 + k)).unwrap();
        marks.push(s.mark(&format!("r{k}")));
        peak = peak.max(s.points()["disks"][0]["undo_bytes"].as_u64().unwrap());
        // Time passing on purpose, not a wait for a condition: it spreads the points over more than the
        // retention window, so that the oldest expire and the newest stay.
        std::thread::sleep(Duration::from_millis(600));
    }
    let p = s.points();
    let oldest = p["disks"][0]["oldest_us"].as_u64().unwrap();
    assert!(oldest > marks[0].0, "the first point was not expired: {p}");
    let (code, v) = s.view("gone", json!({ "time-us": marks[0].0 }), false);
    assert_eq!(code, 409, "an expired point still opens: {v}");
    let kept: Vec<_> = marks.iter().enumerate().filter(|(_, (t, _))| *t >= oldest).collect();
    assert!(kept.len() >= 3, "too few points kept to check: {p}");
    for (k, (t, copy)) in kept {
        check_equal(&s, &format!("kept-{k}"), *t, copy);
    }
    // With no more writes, everything but the newest segment goes once the window has passed: the
    // newest point is older than the retention, and an expiry run began since (two more ended).
    let last = marks.last().unwrap();
    wait_for("the retention window to pass the newest point", Duration::from_secs(6), || now_us() > last.0 + 4_000_000);
    let runs = metric(&s.local, Component::MasterTarget, "sr_master_target_expiry_runs_total").unwrap();
    wait_for("two more expiry runs", Duration::from_secs(6), || {
        metric(&s.local, Component::MasterTarget, "sr_master_target_expiry_runs_total").unwrap() >= runs + 2.0
    });
    let p = s.points();
    let left = p["disks"][0]["undo_bytes"].as_u64().unwrap();
    assert!(left < peak / 2, "space was not reclaimed: {left} bytes left of a peak of {peak}: {p}");
    check_equal(&s, "last", last.0, &last.1);
    let metrics = s.local.metrics(Component::MasterTarget).unwrap();
    for name in [
        "sr_master_target_undo_bytes{",
        "sr_master_target_expired_undo_bytes_total",
        "sr_master_target_oldest_point_age_seconds{",
    ] {
        assert!(metrics.contains(name), "{name} missing from the metrics");
    }
}

#[test]
fn master_target_killed_during_apply_expiry_and_test_failover_keeps_every_point() {
    let seed: u64 = std::env::var("SR_TEST_SEED").ok().and_then(|s| s.parse().ok()).unwrap_or_else(rand::random);
    eprintln!("seed {seed} (set SR_TEST_SEED to replay)");
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let env = [
        ("SR_MT__POINTS__RETENTION_SECS", "6"),
        ("SR_MT__POINTS__SEGMENT_SECS", "1"),
        ("SR_MT__POINTS__EXPIRY_INTERVAL_SECS", "1"),
    ];
    let mut s = setup(32 * MIB, &env, &[]);
    let uri = s.local.agent_uri("d");
    let mut marks = Vec::new();
    let mut test_disk: Option<(String, PathBuf, u64)> = None;
    for k in 0..5u8 {
        // A burst of writes, with the master target killed at a random moment in it.
        let stop = Arc::new(AtomicBool::new(false));
        let burst = {
            let (stop, uri, size, seed) = (stop.clone(), uri.clone(), s.size, rng.gen::<u64>());
            std::thread::spawn(move || {
                let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
                let mut n = 0u8;
                while !stop.load(Ordering::Relaxed) {
                    qemu_io(&uri, &round(&mut rng, size, 0x70 + n % 40)).unwrap();
                    n = n.wrapping_add(1);
                }
            })
        };
        // Random sleeps on purpose, not waits for a condition: they pick the moment of the kill in the
        // burst, and how long the master target stays down.
        std::thread::sleep(Duration::from_millis(rng.gen_range(100..1500)));
        s.mt.take().unwrap().kill();
        std::thread::sleep(Duration::from_millis(rng.gen_range(0..500)));
        s.mt = Some(s.local.start_env(Component::MasterTarget, &env).unwrap());
        stop.store(true, Ordering::Relaxed);
        burst.join().unwrap();
        marks.push(s.mark(&format!("k{k}")));
        if k == 2 {
            // A test failover open across the later kills: its point is held, its writes are kept.
            let (code, v) = s.view("tf", json!({ "time-us": marks[2].0 }), true);
            assert_eq!(code, 200, "{v}");
            let (uri, seq) =
                (s.local.with_certs(v["disks"][0]["uri"].as_str().unwrap()), v["disks"][0]["seq"].as_u64().unwrap());
            let writes = ["write -P 0xcc 2M 300k".to_string()];
            qemu_io(&uri, &writes).unwrap();
            let expected = s.dir.path().join("tf-expected.img");
            std::fs::copy(&marks[2].1, &expected).unwrap();
            qemu_io(expected.to_str().unwrap(), &writes).unwrap();
            test_disk = Some((uri, expected, seq));
        }
    }
    wait_caught_up(&s.local, Duration::from_secs(60)).unwrap();
    compare(s.source().to_str().unwrap(), &s.local.replica_uri(1)).unwrap();
    check_apply_log(&s.local, 1).unwrap();
    let (uri, expected, tf_seq) = test_disk.unwrap();
    let p = s.points();
    assert!(p["disks"][0]["oldest_seq"].as_u64().unwrap() <= tf_seq, "the test failover's point expired under it: {p}");
    let oldest = p["disks"][0]["oldest_us"].as_u64().unwrap();
    for (k, (t, copy)) in marks.iter().enumerate().filter(|(_, (t, _))| *t >= oldest) {
        check_equal(&s, &format!("after-{k}"), *t, copy);
    }
    compare(expected.to_str().unwrap(), &uri).unwrap();
}

#[test]
fn app_consistent_points_come_from_the_hooks_and_a_failing_hook_gives_a_crash_consistent_one() {
    let dir = test_dir();
    let log = dir.path().join("hooks.log");
    let pre = format!("echo freeze >> {}", log.display());
    let post = format!("echo thaw >> {}", log.display());
    let agent_env = [
        ("SR_AGENT__POINTS__APP_INTERVAL_SECS", "1"),
        ("SR_AGENT__POINTS__CRASH_INTERVAL_SECS", "3600"),
        ("SR_AGENT__POINTS__PRE_HOOK", pre.as_str()),
        ("SR_AGENT__POINTS__POST_HOOK", post.as_str()),
    ];
    let mut s = setup_in(dir, 16 * MIB, &[], &agent_env);
    let uri = s.local.agent_uri("d");
    qemu_io(&uri, &["write -P 0x61 0 1M".to_string(), "flush".to_string()]).unwrap();
    let written = s.local.agent_status().unwrap()["disks"][0]["last_seq"].as_u64().unwrap();
    wait_for("an app-consistent point after the write", Duration::from_secs(60), || {
        let p = s.points();
        p["disks"][0]["named"]
            .as_array()
            .unwrap()
            .iter()
            .any(|m| m["kind"] == "app-consistent" && m["seq"].as_u64().unwrap() > written)
            && std::fs::read_to_string(&log).unwrap().contains("freeze\nthaw\n")
    });
    wait_caught_up(&s.local, Duration::from_secs(60)).unwrap();
    let p = s.points();
    let named = p["disks"][0]["named"].as_array().unwrap().clone();
    assert!(named.iter().any(|m| m["kind"] == "app-consistent"), "{p}");
    assert!(!named.iter().any(|m| m["kind"] == "crash-consistent"), "{p}");
    let hooks = std::fs::read_to_string(&log).unwrap();
    assert!(hooks.contains("freeze\nthaw\n"), "{hooks}");
    let tf = s.open_view("app", json!("latest-app-consistent"), false);
    compare(s.source().to_str().unwrap(), &tf).unwrap();
    // A failing pre hook: crash-consistent points, a warning, replication goes on.
    drop(s._agent);
    let failing = [
        ("SR_AGENT__POINTS__APP_INTERVAL_SECS", "1"),
        ("SR_AGENT__POINTS__CRASH_INTERVAL_SECS", "3600"),
        ("SR_AGENT__POINTS__PRE_HOOK", "echo database busy >&2; exit 3"),
    ];
    s._agent = s.local.start_env(Component::Agent, &failing).unwrap();
    qemu_io(&uri, &["write -P 0x62 1M 1M".to_string(), "flush".to_string()]).unwrap();
    wait_for("a crash-consistent point from the failing hook", Duration::from_secs(60), || {
        s.points()["disks"][0]["named"].as_array().unwrap().iter().any(|m| m["kind"] == "crash-consistent")
    });
    wait_caught_up(&s.local, Duration::from_secs(60)).unwrap();
    let agent_log = std::fs::read_to_string(s.local.log(Component::Agent)).unwrap();
    assert!(agent_log.contains("database busy"), "the hook's output is not in the agent's log");
    compare(s.source().to_str().unwrap(), &s.local.replica_uri(1)).unwrap();
}
