//! The web portal in headless Chromium (Debian's `chromium`, driven by `playwright-core` from npm)
//! against the real binaries: an operator signs in, protects a disk, watches initial replication
//! reach Protected, picks an instant on the recovery-point timeline and runs a test failover by
//! keyboard, follows its job, and cleans up; a reader sees everything and is offered no action; the
//! pages fit a phone's width; no page logs an error. Screenshots go to `target/portal-screenshots`.
//! Between phases the test checks the disks themselves: the test failover's disk equals the source
//! at the chosen instant, byte for byte.

// Test code: a failed unwrap is a failed test, with its message.
#![allow(clippy::unwrap_used)]

use serde_json::{json, Value};
use sr_tests::*;
use std::path::{Path, PathBuf};
use std::time::Duration;

const MIB: u64 = 1 << 20;

fn browser_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("browser")
}

/// Where a test's screenshots go: `target/portal-screenshots/<test>`, emptied when the test starts.
fn shots_dir(test: &str) -> PathBuf {
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("..").join("target"));
    let dir = target.join("portal-screenshots").join(test);
    let _ = std::fs::remove_dir_all(&dir);
    dir
}

/// Runs one phase of `tests/browser/portal.mjs`; what it saw. Panics with its report when it failed.
fn browser(shots: &Path, phase: &str, portal: &str, token: &str, env: &[(&str, String)]) -> Value {
    assert!(
        browser_dir().join("node_modules").join("playwright-core").exists(),
        "playwright-core is not installed: run scripts/setup.sh (npm ci in tests/browser)"
    );
    let mut cmd = std::process::Command::new("node");
    cmd.current_dir(browser_dir())
        .arg("portal.mjs")
        .arg(phase)
        .env("SR_PORTAL", portal)
        .env("SR_TOKEN", token)
        .env("SR_SHOTS", shots);
    for (k, v) in env {
        cmd.env(k, v);
    }
    let out = cmd.output().expect("running node (scripts/setup.sh installs it)");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let report: Value = stdout.lines().last().and_then(|l| serde_json::from_str(l).ok()).unwrap_or(Value::Null);
    assert!(
        out.status.success(),
        "browser phase {phase} failed: {report}\n{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    report
}

#[test]
fn an_operator_protects_and_test_fails_over_at_a_chosen_instant_in_the_portal_and_a_reader_only_looks() {
    let dir = test_dir();
    let d = Deployment::start(dir.path());
    let disk = dir.path().join("source.img");
    make_disk(&disk, 32 * MIB).unwrap();
    let mut local = d.site(&dir.path().join("a"), "", &disk);
    let _procs: Vec<_> = [Component::MasterTarget, Component::ProcessServer, Component::Agent]
        .into_iter()
        .map(|c| local.start(c).unwrap())
        .collect();
    let machine = local.node(Component::Agent);
    d.wait_machine(&machine);
    let (code, v) = d.api("POST", "/v1/policies", Some(json!({ "name": "gold", "crash_consistent_interval_secs": 5 })));
    assert!(code < 300, "{v}");
    let token = |role: &str| {
        let (code, v) = d.api("POST", "/v1/tokens", Some(json!({ "name": format!("portal-{role}"), "role": role })));
        assert_eq!(code, 200, "{v}");
        v["token"].as_str().unwrap().to_string()
    };
    let (operator, reader) = (token("operator"), token("reader"));
    let portal = format!("https://{}", d.cp.api);
    let shots = shots_dir("operator");

    // Protect from the portal and watch initial replication reach Protected.
    let seen = browser(
        &shots,
        "protect",
        &portal,
        &operator,
        &[("SR_MACHINE", machine.clone()), ("SR_POLICY", "gold".to_string())],
    );
    assert_eq!(seen["enable"]["succeeded"], true, "{seen}");
    let item = seen["item"].as_u64().unwrap();
    local.item = item;
    assert_eq!(d.item(item)["state_name"], "protected");
    assert_eq!(d.item(item)["policy"], d.api("GET", "/v1/policies", None).1[0]["id"]);

    // Pattern A, caught up; then an instant after it; then pattern B over it.
    let uri = local.agent_uri("disk0");
    qemu_io(&uri, &["write -P 0x41 0 4M".into(), "flush".into()]).unwrap();
    wait_caught_up(&local, Duration::from_secs(60)).unwrap();
    let expected = dir.path().join("at-instant.img");
    run("qemu-img", &["convert", "-f", "raw", "-O", "raw", &uri, expected.to_str().unwrap()]).unwrap();
    let now = || std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs();
    let instant = now() + 1;
    wait_for("the clock to pass the chosen instant", Duration::from_secs(10), || now() > instant);
    qemu_io(&uri, &["write -P 0x42 0 4M".into(), "flush".into()]).unwrap();
    wait_caught_up(&local, Duration::from_secs(60)).unwrap();

    // The instant typed on the timeline, the slider moved by keyboard, Test failover by Tab and Enter.
    let seen = browser(
        &shots,
        "failover",
        &portal,
        &operator,
        &[("SR_ITEM", item.to_string()), ("SR_INSTANT_SECS", instant.to_string())],
    );
    assert_eq!(seen["job"]["succeeded"], true, "{seen}");
    let steps = seen["job"]["steps"].as_array().unwrap();
    assert!(steps.len() >= 3 && steps.iter().all(|s| s[0] == "succeeded"), "{seen}");
    let job = d.api("GET", &format!("/v1/jobs/{}", seen["job"]["id"]), None).1;
    assert_eq!(job["kind"], "test failover", "{job}");
    let tf = d.item(item)["test_failover"].clone();
    let test_disk = d.with_certs(tf["machine"]["disks"][0]["uri"].as_str().unwrap());
    compare(expected.to_str().unwrap(), &test_disk).expect("the test disk holds the source at the chosen instant");
    assert!(
        compare(disk.to_str().unwrap(), &test_disk).is_err(),
        "the test disk is at the chosen instant, not the latest"
    );

    let seen = browser(&shots, "cleanup", &portal, &operator, &[("SR_ITEM", item.to_string())]);
    assert_eq!(seen["job"]["succeeded"], true, "{seen}");
    assert!(d.item(item)["test_failover"].is_null());

    // An admin's forms reach the API: what they made is there, and the secrets they showed work.
    let seen = browser(&shots, "manage", &portal, &d.admin, &[("SR_ITEM", item.to_string())]);
    let names = |path: &str, key: &str| -> Vec<String> {
        d.api("GET", path, None).1.as_array().unwrap().iter().map(|v| v[key].as_str().unwrap().to_string()).collect()
    };
    assert!(names("/v1/policies", "name").contains(&"silver".to_string()), "{seen}");
    assert!(names("/v1/network-mappings", "target_network").contains(&"dr-lan".to_string()), "{seen}");
    let plan = d.api("GET", "/v1/plans", None).1[0].clone();
    assert_eq!((plan["name"].as_str(), plan["groups"][0]["items"][0].as_u64()), (Some("app"), Some(item)), "{plan}");
    assert!(seen["planButtons"].as_array().unwrap().iter().any(|b| b == "Test failover"), "{seen}");
    let ops = seen["token"].as_str().unwrap();
    assert_eq!(call(&d.cp, "GET", "/v1/whoami", None, Some(ops)).1["role"], "operator", "{seen}");
    assert!(seen["key"].as_str().unwrap().len() > 32, "{seen}");

    // A reader sees every page and is offered nothing; the API refuses a forced action.
    let seen = browser(&shots, "reader", &portal, &reader, &[("SR_ITEM", item.to_string())]);
    assert_eq!(seen["who"], "portal-reader (reader)", "{seen}");
    for (page, buttons) in seen["buttons"].as_object().unwrap() {
        assert_eq!(buttons.as_array().unwrap().len(), 0, "a reader is offered actions on {page}: {buttons}");
    }
    assert_eq!(seen["forced"], 403, "{seen}");

    // At a phone's width no page scrolls sideways (wide tables scroll inside their panel).
    let seen = browser(&shots, "phone", &portal, &operator, &[("SR_ITEM", item.to_string())]);
    for (page, overflow) in seen["overflow"].as_object().unwrap() {
        assert!(overflow.as_i64().unwrap() <= 0, "{page} is wider than a phone: {seen}");
    }
    // The replica is still identical to its source after all of it.
    wait_caught_up(&local, Duration::from_secs(60)).unwrap();
    compare(disk.to_str().unwrap(), &local.replica_uri(1)).unwrap();
}

#[test]
fn the_quickstart_prints_the_portals_address_and_a_token_that_signs_in() {
    use std::io::BufRead;
    let dir = test_dir();
    let mut child = std::process::Command::new(sr_devkit::bin_dir().join("srctl"))
        .args(["quickstart", "--keep-running", "--size-mib", "32", "--generations", "1", "--dir"])
        .arg(dir.path().join("qs"))
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::inherit())
        .spawn()
        .unwrap();
    let mut lines = std::io::BufReader::new(child.stdout.take().unwrap()).lines();
    let mut printed = Vec::new();
    let (mut portal, mut token) = (None, None);
    while portal.is_none() || token.is_none() {
        let Some(Ok(line)) = lines.next() else {
            let _ = child.kill();
            panic!("srctl quickstart ended without printing the portal's address and token:\n{}", printed.join("\n"));
        };
        if let Some(l) = line.trim().strip_prefix("portal: ") {
            portal = Some(l.trim_end_matches("/portal/").to_string());
        }
        if let Some(l) = line.trim().strip_prefix("portal sign-in token (admin): ") {
            token = Some(l.to_string());
        }
        printed.push(line);
    }
    let (portal, token) = (portal.unwrap(), token.unwrap());
    let admin = std::fs::read_to_string(dir.path().join("qs").join("control").join("cs").join("admin.token"));
    let seen = browser(&shots_dir("quickstart"), "quickstart", &portal, &token, &[]);
    // SAFETY: signalling our own child.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let status = child.wait().unwrap();
    assert!(status.success(), "srctl quickstart exited with {status} on SIGTERM");
    assert_eq!(admin.unwrap().trim(), token, "the printed token is the admin token");
    assert_eq!(seen["who"], "admin (admin)", "{seen}");
    assert_eq!(seen["worst"], 1, "the quickstart's item is on the overview: {seen}");
}
