//! The configuration server, as its real binary: token roles, malformed bodies, registration with
//! one-time keys through the components' own `register` subcommands, revocation, heartbeats, jobs,
//! the OpenAPI document, and state that survives a SIGKILL.

// Test code: a failed unwrap is a failed test, with its message.
#![allow(clippy::unwrap_used)]

use serde_json::{json, Value};
use sr_devkit::{bin_dir, ControlPlane};
use sr_tests::*;
use std::process::Command;

fn raw(api: &ControlPlane, method: &str, path: &str, body: &str, token: &str) -> (u16, Value) {
    let (code, text) = api.client(token).unwrap().request(api.api, method, path, Some(body)).unwrap();
    (code, serde_json::from_str(&text).unwrap_or(Value::String(text.clone())))
}

fn register(binary: &str, api: &ControlPlane, key: &str, name: &str, dir: &std::path::Path) -> std::process::Output {
    Command::new(bin_dir().join(binary))
        .args(["register", "--server", &api.api.to_string(), "--key", key, "--name", name, "--dir"])
        .arg(dir)
        .output()
        .unwrap()
}

fn new_key(api: &ControlPlane, admin: &str, role: &str, ttl: Option<u64>) -> String {
    let mut body = json!({ "role": role });
    if let Some(t) = ttl {
        body["ttl_seconds"] = json!(t);
    }
    let (code, v) = call(api, "POST", "/v1/registration-keys", Some(body), Some(admin));
    assert_eq!(code, 200, "{v}");
    v["key"].as_str().unwrap().to_string()
}

#[test]
fn tokens_roles_bodies_registration_revocation_and_restart() {
    let dir = test_dir();
    let cp = ControlPlane::create(&dir.path().join("cp")).unwrap();
    let cs = cp.start().unwrap();
    let api = &cp;
    let admin = cp.admin_token().unwrap();

    // 401 without a token or with an unknown one.
    for (m, p) in
        [("GET", "/v1/components"), ("GET", "/v1/jobs"), ("POST", "/v1/policies"), ("POST", "/v1/registration-keys")]
    {
        let (code, v) = call(api, m, p, Some(json!({})), None);
        assert_eq!(code, 401, "{m} {p}: {v}");
        assert!(v["error"].as_str().unwrap().contains("Bearer"), "{v}");
        assert_eq!(call(api, m, p, Some(json!({})), Some("not-a-token")).0, 401);
    }

    // A reader may read but not write: 403 with the reason.
    let (code, v) = call(api, "POST", "/v1/tokens", Some(json!({"name": "watcher", "role": "reader"})), Some(&admin));
    assert_eq!(code, 200, "{v}");
    let reader = v["token"].as_str().unwrap().to_string();
    assert_eq!(call(api, "GET", "/v1/policies", None, Some(&reader)).0, 200);
    let (code, v) = call(api, "POST", "/v1/policies", Some(json!({"name": "p"})), Some(&reader));
    assert_eq!(code, 403, "{v}");
    assert!(v["error"].as_str().unwrap().contains("Operator"), "{v}");
    for path in ["/v1/items/1/resync", "/v1/items/1/resync?full=true"] {
        assert_eq!(call(api, "POST", path, None, None).0, 401, "{path}");
        assert_eq!(call(api, "POST", path, None, Some(&reader)).0, 403, "{path}");
    }
    let (code, v) = call(api, "POST", "/v1/tokens", Some(json!({"name": "op", "role": "operator"})), Some(&admin));
    assert_eq!(code, 200);
    let operator = v["token"].as_str().unwrap().to_string();
    assert_eq!(call(api, "POST", "/v1/registration-keys", Some(json!({"role": "agent"})), Some(&operator)).0, 403);

    // Malformed bodies: 400 with a message that says what is wrong.
    for (body, says) in [
        ("{", "EOF"),
        ("[]", "expected struct Policy"),
        (r#"{"name": "p", "bogus": 1}"#, "bogus"),
        (r#"{"name": "p", "journal_limit_percent": 0}"#, "journal_limit_percent"),
        (r#"{"name": "p", "compression_level": 40}"#, "compression_level"),
        (r#"{"name": 7}"#, "invalid type"),
    ] {
        let (code, v) = raw(api, "POST", "/v1/policies", body, &operator);
        assert_eq!(code, 400, "{body}: {v}");
        assert!(v["error"].as_str().unwrap().contains(says), "{body}: {v}");
    }
    let (code, policy) =
        call(api, "POST", "/v1/policies", Some(json!({"name": "gold", "rpo_threshold_secs": 60})), Some(&operator));
    assert_eq!(code, 200, "{policy}");
    assert_eq!(policy["journal_limit_percent"], 50, "defaults are filled in");
    assert_eq!(call(api, "POST", "/v1/policies", Some(json!({"name": "gold"})), Some(&operator)).0, 409);

    // Registration through the components' own subcommands.
    let certs = dir.path().join("certs");
    let key = new_key(api, &admin, "master-target", None);
    let out = register("master-target", api, &key, "mt-1", &certs);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let out = register("master-target", api, &key, "mt-2", &certs);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("already used"), "{}", String::from_utf8_lossy(&out.stderr));
    let agent_key = new_key(api, &admin, "agent", None);
    let out = register("process-server", api, &agent_key, "ps-x", &certs);
    assert!(!out.status.success(), "an agent key does not make a process server");
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("is for a Agent"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let (code, v) = call(
        api,
        "POST",
        "/v1/registration-keys",
        Some(json!({"role": "process-server", "ttl_seconds": 1})),
        Some(&admin),
    );
    assert_eq!(code, 200, "{v}");
    let (key, expires_at) = (v["key"].as_str().unwrap().to_string(), v["expires_at"].as_u64().unwrap());
    // Expired once the server's clock (whole seconds) is past the key's end.
    wait_for("the key to expire", std::time::Duration::from_secs(3), || {
        sr_common::types::now_micros() / 1_000_000 > expires_at
    });
    let out = register("process-server", api, &key, "ps-1", &certs);
    assert!(String::from_utf8_lossy(&out.stderr).contains("expired"), "{}", String::from_utf8_lossy(&out.stderr));
    let key = new_key(api, &admin, "process-server", None);
    assert!(register("process-server", api, &key, "ps-1", &certs).status.success());
    assert!(
        register("mobility-agent", api, &agent_key, "agent-1", &certs).status.success(),
        "a refused key is not used up"
    );

    // The issued certificates carry their roles and chain to the deployment CA.
    let tls = |n: &str| sr_common::tls::TlsPaths {
        ca: certs.join("ca.pem"),
        cert: certs.join(format!("{n}.pem")),
        key: certs.join(format!("{n}.key")),
    };
    let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build().unwrap();
    rt.block_on(async {
        let mt = sr_common::tls::Identity::load(&tls("mt-1")).unwrap();
        let server = sr_common::quic::server(&mt, "127.0.0.1:0".parse().unwrap()).unwrap();
        let addr = server.local_addr().unwrap();
        let accept = tokio::spawn(async move {
            let conn = server.accept().await.unwrap().await.unwrap();
            sr_common::quic::require_peer_role(&conn, sr_common::wire::Role::ProcessServer).is_ok()
        });
        let ps = sr_common::tls::Identity::load(&tls("ps-1")).unwrap();
        let ep = sr_common::quic::client(&ps).unwrap();
        let _conn = sr_common::quic::connect(&ep, addr, sr_common::wire::Role::MasterTarget).await.unwrap();
        assert!(accept.await.unwrap(), "the registered process server passes the role check");
    });

    // Heartbeats over mutual TLS with the component's certificate fill the inventory.
    let as_component = |n: &str| {
        let id = sr_common::tls::Identity::load(&tls(n)).unwrap();
        sr_common::http::Client::new(sr_common::tls::ServerTrust::Mutual(&id, sr_common::wire::Role::ConfigServer))
            .unwrap()
    };
    let (agent, ps) = (as_component("agent-1"), as_component("ps-1"));
    let hb = json!({"disks": [{"id": 1, "name": "disk0", "size": 1073741824}]});
    agent.post_json(api.api, "/v1/heartbeat", &hb).unwrap();
    let (_, machines) = call(api, "GET", "/v1/machines", None, Some(&reader));
    assert_eq!(machines[0]["name"], "agent-1");
    assert_eq!(machines[0]["disks"][0]["size"], 1073741824u64);
    let status = |c: &sr_common::http::Client, m: &str, p: &str, b: Option<&Value>| match c.call_json(api.api, m, p, b)
    {
        Ok(_) => 200,
        Err(e) => e.status().unwrap_or(0),
    };
    assert_eq!(status(&agent, "GET", "/v1/policies", None), 403, "components may not use operator endpoints");
    assert_eq!(status(&ps, "POST", "/v1/heartbeat", Some(&hb)), 400, "only agents report disks");
    // A certificate from another CA is refused at the handshake; a token does not make a component.
    let stranger = dir.path().join("stranger");
    let other = sr_common::tls::generate_deployment(&stranger, &[("agent-1", sr_common::wire::Role::Agent)]).unwrap();
    let other = sr_common::tls::Identity::load(&other[0]).unwrap();
    let other = sr_common::http::Client::new(sr_common::tls::ServerTrust::AnyComponent(&other)).unwrap();
    assert_eq!(status(&other, "POST", "/v1/heartbeat", Some(&hb)), 0, "a foreign CA's certificate gets nowhere");
    assert_eq!(call(api, "POST", "/v1/heartbeat", Some(hb.clone()), Some(&operator)).0, 403);

    // Revocation: the CRL names it and its certificate stops working at once.
    assert_eq!(call(api, "POST", "/v1/components/ps-1/revoke", None, Some(&operator)).0, 403);
    let (code, v) = call(api, "POST", "/v1/components/ps-1/revoke", None, Some(&admin));
    assert_eq!((code, &v["revoked"]), (200, &json!(true)), "{v}");
    let (code, crl) = call(api, "GET", "/v1/crl", None, None);
    assert_eq!(code, 200);
    assert!(crl.as_str().unwrap().contains("BEGIN X509 CRL"));
    assert_ne!(status(&as_component("ps-1"), "POST", "/v1/heartbeat", Some(&json!({}))), 200);
    assert_eq!(status(&agent, "POST", "/v1/heartbeat", Some(&hb)), 200, "others are not affected");

    // Jobs: registrations are jobs with steps; refused ones leave no trace but a counter.
    let (_, jobs) = call(api, "GET", "/v1/jobs?kind=register", None, Some(&reader));
    let jobs = jobs.as_array().unwrap().clone();
    assert_eq!(jobs.len(), 3, "{jobs:?}");
    let (_, failed) = call(api, "GET", "/v1/jobs?kind=register&state=failed", None, Some(&reader));
    assert_eq!(failed.as_array().unwrap().len(), 0, "{failed}");
    let (_, metrics) = api.client("").unwrap().without_token().request(api.api, "GET", "/metrics", None).unwrap();
    let refused: f64 = metrics
        .lines()
        .find(|l| l.starts_with("sr_config_server_registrations_refused_total"))
        .and_then(|l| l.rsplit(' ').next()?.parse().ok())
        .unwrap_or(0.0);
    assert_eq!(refused, 3.0, "used, other-role and expired keys: {metrics}");
    let (code, v) = call(api, "GET", "/v1/jobs?state=bogus", None, Some(&reader));
    assert_eq!(code, 400, "{v}");
    let ok = jobs.iter().find(|j| j["state"] == "succeeded").unwrap();
    assert_eq!(ok["progress"], 100);
    assert!(ok["steps"].as_array().unwrap().iter().all(|s| s["state"] == "succeeded" && s["ended"].is_u64()));

    // Every operation in the OpenAPI document is served.
    let (code, doc) = call(api, "GET", "/openapi.json", None, None);
    assert_eq!(code, 200);
    for (path, ops) in doc["paths"].as_object().unwrap() {
        for method in ops.as_object().unwrap().keys() {
            let p = path.replace("{id}", "000000000001").replace("{name}", "agent-1");
            let (code, body) = call(api, &method.to_uppercase(), &p, Some(json!({})), Some(&reader));
            // A served path may answer 404 for an id that does not exist, always with the API's error
            // body; the router's own 404 for a path it does not serve has none.
            assert!(
                code != 404 || body["error"].is_string(),
                "{method} {path} is in the document but not served ({code} {body})"
            );
            assert_ne!(code, 405, "{method} {path}");
        }
    }

    // SIGKILL and restart: tokens, policies, components and jobs are all still there.
    cs.kill();
    let _cs = cp.start().unwrap();
    let (_, policies) = call(api, "GET", "/v1/policies", None, Some(&reader));
    assert_eq!(policies[0]["name"], "gold");
    let (_, comps) = call(api, "GET", "/v1/components", None, Some(&reader));
    assert_eq!(comps.as_array().unwrap().len(), 3);
    let (_, jobs_after) = call(api, "GET", "/v1/jobs?kind=register", None, Some(&reader));
    assert_eq!(jobs_after.as_array().unwrap().len(), jobs.len());
}

#[test]
fn protect_a_disk_with_srctl_from_registration_keys_only() {
    let dir = test_dir();
    let cp = ControlPlane::create(&dir.path().join("cp")).unwrap();
    let _cs = cp.start().unwrap();
    let admin_file = dir.path().join("cp").join("cs").join("admin.token");
    let disk = dir.path().join("source.img");
    make_disk(&disk, 48 << 20).unwrap();
    run("qemu-io", &["-f", "raw", "-c", "write -P 0x5c 0 8M", "-c", "write -P 0x5d 30M 2M", disk.to_str().unwrap()])
        .unwrap();
    // 12 MiB that do not compress, so the bandwidth limit has bytes to hold back.
    {
        use rand::RngCore;
        use std::os::unix::fs::FileExt;
        let mut noise = vec![0u8; 12 << 20];
        rand::thread_rng().fill_bytes(&mut noise);
        std::fs::OpenOptions::new().write(true).open(&disk).unwrap().write_all_at(&noise, 12 << 20).unwrap();
    }
    let mut local = Local::managed(
        &dir.path().join("dep"),
        vec![DiskSpec { id: 1, name: "disk0".into(), path: disk.clone() }],
        &Options::default(),
        &cp,
        &cp.admin_token().unwrap(),
    )
    .unwrap();
    let _mt = local.start(Component::MasterTarget).unwrap();
    let _ps = local.start(Component::ProcessServer).unwrap();
    let _agent = local.start(Component::Agent).unwrap();

    // The agent reports its disk; nothing replicates before protection is enabled.
    wait_for("the agent to report its disk", std::time::Duration::from_secs(30), || {
        let out = srctl(&cp, &admin_file, &["--output", "json", "machines"]);
        let v: Value = serde_json::from_slice(&out.stdout).unwrap_or_default();
        v[0]["disks"][0]["name"] == "disk0"
    });
    assert_eq!(local.applied(1).unwrap(), 0);

    let out = srctl(
        &cp,
        &admin_file,
        &["policies", "create", "--name", "gold", "--rpo-secs", "120", "--bandwidth-limit-mbps", "16"],
    );
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    // A machine that does not exist fails its prerequisites with the reason.
    let out = srctl(&cp, &admin_file, &["protect", "--machine", "nope", "--policy", "gold"]);
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("no agent named nope"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    let out = srctl(&cp, &admin_file, &["protect", "--machine", "agent-1", "--policy", "gold", "--watch"]);
    let text = String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{text}");
    assert!(text.contains("enabling protection"), "{text}");
    assert!(text.contains("initial replication"), "{text}");
    assert!(text.contains("state: protected"), "{text}");

    let out = srctl(&cp, &admin_file, &["--output", "json", "items", "list"]);
    let items: Value = serde_json::from_slice(&out.stdout).unwrap();
    local.item = items.as_array().unwrap().iter().find(|i| i["machine"] == "agent-1").unwrap()["id"].as_u64().unwrap();
    // Writes after protection reach the replica too.
    run(
        "qemu-io",
        &["-f", "raw", "-c", "write -P 0x77 1M 5M", "-c", "write -z 31M 1M", "-c", "flush", &local.agent_uri("disk0")],
    )
    .unwrap();
    wait_caught_up(&local, std::time::Duration::from_secs(60)).unwrap();
    compare(disk.to_str().unwrap(), &local.replica_uri(1)).unwrap();
    // The policy's bandwidth limit (2 MB/s) held the process server back on the 12 MiB of noise.
    let metrics = local.metrics(Component::ProcessServer).unwrap();
    let waited = metrics
        .lines()
        .find_map(|l| l.strip_prefix("sr_process_server_bandwidth_wait_milliseconds_total "))
        .and_then(|v| v.trim().parse::<f64>().ok())
        .unwrap_or(0.0);
    assert!(waited > 0.0, "no bandwidth waits:\n{metrics}");
    let out = srctl(&cp, &admin_file, &["--output", "json", "items", "show", &local.item.to_string()]);
    let item: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(item["state_name"], "protected");
    assert!(item.get("data_key").is_none(), "the data key is never shown to operators");
    let out = srctl(&cp, &admin_file, &["--output", "json", "jobs", "list", "--kind", "enable protection"]);
    let jobs: Value = serde_json::from_slice(&out.stdout).unwrap();
    let jobs = jobs.as_array().unwrap();
    assert!(jobs.iter().any(|j| j["state"] == "failed" && j["error"].as_str().unwrap().contains("nope")), "{jobs:?}");
    let ok = jobs.iter().find(|j| j["target"].as_str().and_then(|t| t.parse().ok()) == Some(local.item)).unwrap();
    let comps: Value =
        serde_json::from_slice(&srctl(&cp, &admin_file, &["--output", "json", "components", "list"]).stdout).unwrap();
    // Three components and the NBD client certificate the deployment made for its checks.
    assert_eq!(comps.as_array().unwrap().len(), 4, "{comps}");
    let comps: Value = comps.as_array().unwrap().iter().filter(|c| c["role"] != "nbd-client").cloned().collect();
    assert!(comps.as_array().unwrap().iter().all(|c| c["health"] == "healthy"), "{comps}");
    assert!(comps
        .as_array()
        .unwrap()
        .iter()
        .any(|c| c["role"] == "master-target" && c["load"]["free_bytes"].as_u64() > Some(0)));
    assert_eq!(ok["state"], "succeeded", "{ok}");
    assert_eq!(ok["steps"].as_array().unwrap().len(), 6);
}

#[test]
fn configuration_server_killed_during_initial_replication_comes_back_and_the_job_completes() {
    let dir = test_dir();
    let cp = ControlPlane::create(&dir.path().join("cp")).unwrap();
    let cs = cp.start().unwrap();
    let admin_file = dir.path().join("cp").join("cs").join("admin.token");
    let disk = dir.path().join("source.img");
    make_disk(&disk, 256 << 20).unwrap();
    let fill: Vec<String> = (0..24).map(|i| format!("write -P {} {}M 8M", i + 1, i * 10)).collect();
    let mut args = vec!["-f", "raw"];
    for c in &fill {
        args.extend(["-c", c.as_str()]);
    }
    args.push(disk.to_str().unwrap());
    run("qemu-io", &args).unwrap();
    // Small copy chunks and batches make the initial replication take a while.
    let opts = Options { batch_bytes: 256 << 10, copy_chunk_bytes: 64 << 10, ..Options::default() };
    let mut local = Local::managed(
        &dir.path().join("dep"),
        vec![DiskSpec { id: 1, name: "disk0".into(), path: disk.clone() }],
        &opts,
        &cp,
        &cp.admin_token().unwrap(),
    )
    .unwrap();
    let _mt = local.start(Component::MasterTarget).unwrap();
    let _ps = local.start(Component::ProcessServer).unwrap();
    let _agent = local.start(Component::Agent).unwrap();
    wait_for("the agent to report", std::time::Duration::from_secs(30), || {
        String::from_utf8_lossy(&srctl(&cp, &admin_file, &["machines"]).stdout).contains("disk0")
    });
    assert!(srctl(&cp, &admin_file, &["policies", "create", "--name", "p"]).status.success());
    let out = srctl(&cp, &admin_file, &["--output", "json", "protect", "--machine", "agent-1", "--policy", "p"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    let job = v["job"].as_u64().unwrap();
    local.item = v["item"]["id"].as_u64().unwrap();
    wait_for("the initial copy to start", std::time::Duration::from_secs(30), || {
        local.agent_status().unwrap()["disks"][0]["initial_copy"]["cursor"].as_u64().unwrap() > 0
    });
    let out = srctl(&cp, &admin_file, &["--output", "json", "items", "show", &local.item.to_string()]);
    let item: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(item["state_name"], "initial_replication", "killed during initial replication: {item}");
    let failed_polls = || {
        std::fs::read_to_string(local.log(Component::Agent))
            .unwrap()
            .matches("configuration server unreachable")
            .count()
    };
    let seen = failed_polls();
    cs.kill();
    // Down long enough that the components notice: the agent's next poll finds no server.
    wait_for("the agent to find the configuration server gone", std::time::Duration::from_secs(10), || {
        failed_polls() > seen
    });
    let _cs = cp.start().unwrap();
    let out = srctl(&cp, &admin_file, &["jobs", "watch", &job.to_string()]);
    assert!(out.status.success(), "{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    let out = srctl(&cp, &admin_file, &["--output", "json", "items", "show", &local.item.to_string()]);
    let item: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(item["state_name"], "protected", "{item}");
    wait_caught_up(&local, std::time::Duration::from_secs(60)).unwrap();
    compare(disk.to_str().unwrap(), &local.replica_uri(1)).unwrap();
}

/// A configuration server and a managed deployment of one disk, started, with the agent reported.
struct Managed {
    cp: ControlPlane,
    admin_file: std::path::PathBuf,
    local: Local,
    disk: std::path::PathBuf,
    mt: Option<Proc>,
    _cs: Proc,
    _ps: Proc,
    agent: Option<Proc>,
}

impl Managed {
    fn start(dir: &std::path::Path, disk_mib: u64, cs_extra: &str) -> Managed {
        let cp = ControlPlane::create_with(&dir.join("cp"), cs_extra).unwrap();
        let cs = cp.start().unwrap();
        let admin_file = dir.join("cp").join("cs").join("admin.token");
        let disk = dir.join("source.img");
        make_disk(&disk, disk_mib << 20).unwrap();
        let local = Local::managed(
            &dir.join("dep"),
            vec![DiskSpec { id: 1, name: "disk0".into(), path: disk.clone() }],
            &Options::default(),
            &cp,
            &cp.admin_token().unwrap(),
        )
        .unwrap();
        let mt = local.start(Component::MasterTarget).unwrap();
        let ps = local.start(Component::ProcessServer).unwrap();
        let agent = local.start(Component::Agent).unwrap();
        wait_for("the agent to report", std::time::Duration::from_secs(30), || {
            String::from_utf8_lossy(&srctl(&cp, &admin_file, &["machines"]).stdout).contains("disk0")
        });
        Managed { cp, admin_file, local, disk, mt: Some(mt), _cs: cs, _ps: ps, agent: Some(agent) }
    }

    /// Creates a policy with `policy_args` and protects the machine with it, waiting until protected.
    fn protect(&mut self, policy_args: &[&str]) {
        let mut args = vec!["policies", "create", "--name", "p"];
        args.extend_from_slice(policy_args);
        assert!(srctl(&self.cp, &self.admin_file, &args).status.success());
        let out = srctl(&self.cp, &self.admin_file, &["protect", "--machine", "agent-1", "--policy", "p", "--watch"]);
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        self.local.item = item_of(&self.cp, &self.admin_file, "agent-1")["id"].as_u64().unwrap();
    }
}

#[test]
fn a_revoked_agent_is_refused_by_its_process_server() {
    let dir = test_dir();
    let mut m = Managed::start(dir.path(), 32, "");
    m.protect(&[]);
    let (cp, admin_file, local) = (&m.cp, &m.admin_file, &m.local);
    let uri = local.agent_uri("disk0");
    run("qemu-io", &["-f", "raw", "-c", "write -P 0x61 0 1M", "-c", "flush", &uri]).unwrap();
    let before = wait_caught_up(local, std::time::Duration::from_secs(60)).unwrap()[0];

    let updates = || {
        std::fs::read_to_string(local.log(Component::ProcessServer)).unwrap().matches("revocation list updated").count()
    };
    let seen = updates();
    assert!(srctl(cp, admin_file, &["components", "revoke", "agent-1"]).status.success());
    wait_for("the process server to take the new revocation list", std::time::Duration::from_secs(30), || {
        updates() > seen
    });
    // The machine's disk still works locally, but nothing more is accepted from the revoked agent.
    run("qemu-io", &["-f", "raw", "-c", "write -P 0x62 2M 1M", "-c", "flush", &uri]).unwrap();
    // The agent had its chance: refused, it stopped shipping for good, and the item turned Critical.
    let agent_log = || std::fs::read_to_string(local.log(Component::Agent)).unwrap();
    wait_for("the agent to stop retrying", std::time::Duration::from_secs(30), || agent_log().contains("not retrying"));
    let item = wait_until("the item to turn critical", std::time::Duration::from_secs(30), || {
        let item = item_of(cp, admin_file, "agent-1");
        (item["state_name"] == "critical").then_some(item)
    });
    assert_eq!(local.applied(1).unwrap(), before, "nothing from a revoked agent is applied");
    let ps_log = std::fs::read_to_string(local.log(Component::ProcessServer)).unwrap();
    assert!(ps_log.to_lowercase().contains("revoked"), "the process server says why: {ps_log}");
    // The item is Critical with the reason, and an alert fired.
    assert!(item["state"]["reason"].as_str().unwrap().contains("revoked"), "{item}");
    let events = String::from_utf8_lossy(&srctl(cp, admin_file, &["events"]).stdout).to_string();
    assert!(events.contains("is critical"), "{events}");
    let refusals =
        || std::fs::read_to_string(local.log(Component::ProcessServer)).unwrap().matches("handshake failed").count();
    let before = refusals();
    // Time for a retrying agent to reconnect a few times (its quick back-off starts at 0.1 s): three
    // more of its polls of the configuration server, a second apart, each refused for the revocation.
    let polls = || agent_log().matches("configuration server unreachable").count();
    let polled = polls();
    wait_for("three more polls from the agent", std::time::Duration::from_secs(30), || polls() >= polled + 3);
    assert_eq!(refusals(), before, "no reconnect storm from a revoked agent");
}

/// Adds a component to a managed deployment by registering it and deriving its config from a sibling's:
/// `from` (e.g. "ps") becomes `to_file` with every `(old, new)` replacement applied.
fn add_component(
    local: &Local,
    api: &ControlPlane,
    admin: &str,
    c: Component,
    name: &str,
    from: &str,
    replace: &[(String, String)],
) -> std::path::PathBuf {
    let role = if c == Component::Agent { "agent" } else { "process-server" };
    let key = new_key(api, admin, role, None);
    let mut cmd = Command::new(bin_dir().join(c.binary()));
    cmd.args(["register", "--server", &api.api.to_string(), "--key", &key, "--name", name, "--dir"]).arg(&local.certs);
    for (old, new) in replace {
        if old == "ADDRESS" {
            cmd.args(["--address", new]);
        }
    }
    let out = cmd.output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let mut text = std::fs::read_to_string(local.root.join(format!("{from}.toml"))).unwrap();
    for (old, new) in replace.iter().filter(|(o, _)| o != "ADDRESS") {
        assert!(text.contains(old.as_str()), "{old} not in {from}.toml");
        text = text.replace(old.as_str(), new);
    }
    let path = local.root.join(format!("{name}.toml"));
    std::fs::write(&path, text).unwrap();
    path
}

fn applied_at_mt(local: &Local, item: u64) -> u64 {
    let s = local.get(Component::MasterTarget, "/v1/status").unwrap();
    s["replicas"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["item"] == item)
        .and_then(|r| r["applied_seq"].as_u64())
        .unwrap_or(0)
}

#[test]
fn two_process_servers_spread_items_and_take_over_when_one_dies() {
    let dir = test_dir();
    let cp = ControlPlane::create(&dir.path().join("cp")).unwrap();
    let _cs = cp.start().unwrap();
    let admin = cp.admin_token().unwrap();
    let admin_file = dir.path().join("cp").join("cs").join("admin.token");
    let (disk_a, disk_b) = (dir.path().join("a.img"), dir.path().join("b.img"));
    make_disk(&disk_a, 32 << 20).unwrap();
    make_disk(&disk_b, 32 << 20).unwrap();
    let opts = Options { batch_bytes: 256 << 10, ..Options::default() };
    let mut local = Local::managed(
        &dir.path().join("dep"),
        vec![DiskSpec { id: 1, name: "disk0".into(), path: disk_a.clone() }],
        &opts,
        &cp,
        &admin,
    )
    .unwrap();
    let (ps2_http, ps2_quic) = (sr_devkit::free_tcp(), sr_devkit::free_udp());
    let ps2 = add_component(
        &local,
        &cp,
        &admin,
        Component::ProcessServer,
        "ps-2",
        "ps",
        &[
            ("ADDRESS".into(), ps2_quic.to_string()),
            ("node = \"ps-1\"".into(), "node = \"ps-2\"".into()),
            (local.addrs.ps_http.to_string(), ps2_http.to_string()),
            (local.addrs.ps_quic.to_string(), ps2_quic.to_string()),
            (local.root.join("ps").display().to_string(), local.root.join("ps2").display().to_string()),
            ("ps-1.".into(), "ps-2.".into()),
        ],
    );
    let (b_http, b_nbd) = (sr_devkit::free_tcp(), sr_devkit::free_tcp());
    let agent_b = add_component(
        &local,
        &cp,
        &admin,
        Component::Agent,
        "agent-2",
        "agent",
        &[
            ("node = \"agent-1\"".into(), "node = \"agent-2\"".into()),
            (local.addrs.agent_http.to_string(), b_http.to_string()),
            (local.addrs.agent_nbd.to_string(), b_nbd.to_string()),
            (local.addrs.agent_unix.display().to_string(), dir.path().join("b.sock").display().to_string()),
            (local.root.join("agent").display().to_string(), local.root.join("agent2").display().to_string()),
            ("agent-1.".into(), "agent-2.".into()),
            (disk_a.display().to_string(), disk_b.display().to_string()),
        ],
    );
    let logs = local.root.join("logs");
    let _mt = local.start(Component::MasterTarget).unwrap();
    let ps1 = local.start(Component::ProcessServer).unwrap();
    let ca = local.certs.join("ca.pem");
    let _ps2 = sr_devkit::spawn_env(Component::ProcessServer, &ps2, &logs.join("ps2.log"), ps2_http, &ca, &[]).unwrap();
    let _a = local.start(Component::Agent).unwrap();
    let _b = sr_devkit::spawn_env(Component::Agent, &agent_b, &logs.join("agent2.log"), b_http, &ca, &[]).unwrap();
    let agents = local.client(Component::Agent).unwrap();
    wait_for("the agents to report", std::time::Duration::from_secs(30), || {
        let m = String::from_utf8_lossy(&srctl(&cp, &admin_file, &["machines"]).stdout).to_string();
        m.contains("agent-1") && m.contains("agent-2")
    });
    assert!(srctl(&cp, &admin_file, &["policies", "create", "--name", "p"]).status.success());
    for m in ["agent-1", "agent-2"] {
        let out = srctl(&cp, &admin_file, &["protect", "--machine", m, "--policy", "p", "--watch"]);
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    }
    let (ia, ib) = (item_of(&cp, &admin_file, "agent-1"), item_of(&cp, &admin_file, "agent-2"));
    assert_ne!(ia["process_server"], ib["process_server"], "two items spread over two process servers: {ia} {ib}");
    local.item = ia["id"].as_u64().unwrap();
    let item_b = ib["id"].as_u64().unwrap();
    let (victim, victim_item, victim_http) = if ia["process_server"] == "ps-1" {
        ("agent-1", local.item, local.addrs.agent_http)
    } else {
        ("agent-2", item_b, b_http)
    };

    // Writes stream through both while ps-1 is killed.
    let applied_before = (applied_at_mt(&local, local.item), applied_at_mt(&local, item_b));
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let writers: Vec<_> = [local.agent_uri("disk0"), format!("nbd://{b_nbd}/disk0")]
        .into_iter()
        .map(|uri| {
            let stop = stop.clone();
            std::thread::spawn(move || {
                let mut i = 0u64;
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    let cmd = format!("write -P {} {}k 300k", (i % 200) + 1, (i * 613) % 30000);
                    run("qemu-io", &["-f", "raw", "-c", &cmd, "-c", "flush", &uri]).unwrap();
                    i += 1;
                }
                i
            })
        })
        .collect();
    wait_for("the writes to stream through both process servers", std::time::Duration::from_secs(30), || {
        applied_at_mt(&local, local.item) > applied_before.0 && applied_at_mt(&local, item_b) > applied_before.1
    });
    ps1.kill();
    wait_for(&format!("the item of {victim} to move to ps-2"), std::time::Duration::from_secs(40), || {
        item_of(&cp, &admin_file, victim)["process_server"] == "ps-2"
    });
    // The victim's writes go on through ps-2: something written after the move is applied.
    let written = agents.get_json(victim_http, "/v1/status").unwrap()["disks"][0]["last_seq"].as_u64().unwrap();
    wait_for(&format!("writes of {victim} to be applied through ps-2"), std::time::Duration::from_secs(30), || {
        applied_at_mt(&local, victim_item) > written
    });
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    for w in writers {
        assert!(w.join().unwrap() > 0);
    }
    // Both replicas end identical to their sources.
    wait_caught_up(&local, std::time::Duration::from_secs(90)).unwrap();
    compare(disk_a.to_str().unwrap(), &local.replica_uri(1)).unwrap();
    wait_for("disk B to catch up", std::time::Duration::from_secs(90), || {
        let st = agents.get_json(b_http, "/v1/status").unwrap();
        applied_at_mt(&local, item_b) >= st["disks"][0]["last_seq"].as_u64().unwrap()
    });
    let replica_b = local.with_certs(&format!("nbds://{}/item-{item_b}-disk-1", local.addrs.mt_nbd));
    compare(disk_b.to_str().unwrap(), &replica_b).unwrap();
    let events = String::from_utf8_lossy(&srctl(&cp, &admin_file, &["events"]).stdout).to_string();
    assert!(events.contains("stopped reporting; moved to ps-2"), "{events}");
}

#[test]
fn rpo_over_the_policy_raises_an_alert_to_the_event_log_and_the_webhook() {
    let dir = test_dir();
    // A webhook receiver that records what it is sent.
    let (hook_addr, received) = http_receiver();
    let received = move || -> Vec<String> {
        received.lock().unwrap().iter().map(|r| String::from_utf8_lossy(r).to_string()).collect()
    };
    let mut m = Managed::start(dir.path(), 16, &format!("alert_webhook = \"http://{hook_addr}/alerts\"\n"));
    m.protect(&["--rpo-secs", "2"]);
    let mt = m.mt.take().unwrap();
    let (cp, admin_file, local, disk) = (&m.cp, &m.admin_file, &m.local, &m.disk);
    // The master target stops; writes go on; the recovery point ages past the policy.
    mt.stop().unwrap();
    run("qemu-io", &["-f", "raw", "-c", "write -P 0x41 0 1M", "-c", "flush", &local.agent_uri("disk0")]).unwrap();
    let item = wait_until("an RPO alert", std::time::Duration::from_secs(30), || {
        let item = item_of(cp, admin_file, "agent-1");
        item["rpo_alert"].as_bool().unwrap_or(false).then_some(item)
    });
    assert!(item["rpo_seconds"].as_u64().unwrap() > 2, "{item}");
    let events = String::from_utf8_lossy(&srctl(cp, admin_file, &["events"]).stdout).to_string();
    assert!(events.contains("over the policy's 2 s"), "{events}");
    wait_for("the webhook to get the alert", std::time::Duration::from_secs(10), || {
        received().iter().any(|r| r.starts_with("POST /alerts") && r.contains("over the policy"))
    });

    // The master target returns: the replica catches up and the alert clears.
    let _mt = local.start(Component::MasterTarget).unwrap();
    wait_caught_up(local, std::time::Duration::from_secs(60)).unwrap();
    wait_for("the alert to clear", std::time::Duration::from_secs(30), || {
        !item_of(cp, admin_file, "agent-1")["rpo_alert"].as_bool().unwrap_or(true)
    });
    compare(disk.to_str().unwrap(), &local.replica_uri(1)).unwrap();
}

#[test]
fn disable_stops_journaling_and_protecting_again_starts_a_fresh_replica() {
    let dir = test_dir();
    let mut m = Managed::start(dir.path(), 24, "");
    m.protect(&[]);
    let uri = m.local.agent_uri("disk0");
    run("qemu-io", &["-f", "raw", "-c", "write -P 0x21 0 2M", "-c", "flush", &uri]).unwrap();
    wait_caught_up(&m.local, std::time::Duration::from_secs(60)).unwrap();
    let first = m.local.item;

    let out = srctl(&m.cp, &m.admin_file, &["unprotect", &first.to_string()]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(item_of(&m.cp, &m.admin_file, "agent-1")["state_name"], "unprotected");
    // The agent learns it within a poll: no more journaling, the journal is dropped.
    wait_for("the agent to stop journaling", std::time::Duration::from_secs(20), || {
        run("qemu-io", &["-f", "raw", "-c", "write -P 0x22 4M 1M", "-c", "flush", &uri]).unwrap();
        let st = m.local.agent_status().unwrap();
        st["disks"][0]["journal_bytes"] == 0 && st["disks"][0]["last_seq"] == 0
    });
    // A batch already on its way when protection was disabled may still land: wait until it did, that
    // is until the disabled item's replica stayed unchanged for a second (nothing reports the last one:
    // the process server keeps the agent's session, and forwards it, until the session ends).
    let mut applied_then = applied_at_mt(&m.local, first);
    let mut since = std::time::Instant::now();
    wait_for("the disabled item's replica to settle", std::time::Duration::from_secs(30), || {
        let now = applied_at_mt(&m.local, first);
        if now != applied_then {
            (applied_then, since) = (now, std::time::Instant::now());
        }
        since.elapsed() >= std::time::Duration::from_secs(1)
    });

    // Protecting again makes a new item with a full initial copy: its replica equals the source,
    // including what was written while unprotected; the old replica was left as it was.
    let out = srctl(&m.cp, &m.admin_file, &["protect", "--machine", "agent-1", "--policy", "p", "--watch"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let second = item_of(&m.cp, &m.admin_file, "agent-1")["id"].as_u64().unwrap();
    assert_ne!(second, first);
    m.local.item = second;
    run("qemu-io", &["-f", "raw", "-c", "write -P 0x23 8M 1M", "-c", "flush", &uri]).unwrap();
    wait_caught_up(&m.local, std::time::Duration::from_secs(60)).unwrap();
    compare(m.disk.to_str().unwrap(), &m.local.replica_uri(1)).unwrap();
    assert_eq!(applied_at_mt(&m.local, first), applied_then, "nothing more reached the disabled item's replica");
}

#[test]
fn test_failover_with_srctl_while_replication_goes_on_and_hook_failures_reach_the_event_log() {
    let dir = test_dir();
    let mut m = Managed::start(dir.path(), 32, "");
    m.protect(&["--app-interval-secs", "1", "--crash-interval-secs", "3600"]);
    // An agent whose pre hook fails: crash-consistent points instead, and a warning event.
    drop(m.agent.take());
    let hook = [("SR_AGENT__POINTS__PRE_HOOK", "echo quiesce refused >&2; exit 4")];
    m.agent = Some(m.local.start_env(Component::Agent, &hook).unwrap());
    let (cp, admin_file, local) = (&m.cp, &m.admin_file, &m.local);
    let item = local.item.to_string();
    let uri = local.agent_uri("disk0");
    run("qemu-io", &["-f", "raw", "-c", "write -P 0x31 0 4M", "-c", "flush", &uri]).unwrap();
    let events = wait_until("an event about the failing hook", std::time::Duration::from_secs(30), || {
        let events = String::from_utf8_lossy(&srctl(cp, admin_file, &["events"]).stdout).to_string();
        events.contains("quiesce refused").then_some(events)
    });
    assert!(events.contains("crash-consistent"), "{events}");
    wait_caught_up(local, std::time::Duration::from_secs(60)).unwrap();
    let out = srctl(cp, admin_file, &["--output", "json", "points", &item]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let points: Value = serde_json::from_slice(&out.stdout).unwrap();
    let named = points["disks"][0]["named"].as_array().unwrap();
    assert!(named.iter().any(|p| p["kind"] == "crash-consistent"), "{points}");
    assert!(!named.iter().any(|p| p["kind"] == "app-consistent"), "{points}");

    // Churn on the source during the whole test failover.
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let churn = {
        let (stop, uri) = (stop.clone(), uri.clone());
        std::thread::spawn(move || {
            let mut i = 0u64;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let cmd = format!("write -P {} {}M 1M", 0x40 + i % 100, (i * 7) % 30);
                run("qemu-io", &["-f", "raw", "-c", &cmd, "-c", "flush", &uri]).unwrap();
                i += 1;
            }
        })
    };
    let out = srctl(cp, admin_file, &["--output", "json", "test-failover", &item]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let tfo: Value = serde_json::from_slice(&out.stdout).unwrap();
    let machine = &tfo["machine"];
    assert!(machine["cpus"].as_u64().unwrap() >= 1 && machine["memory_bytes"].as_u64().unwrap() > 0, "{tfo}");
    assert!(machine["network_interfaces"].is_array(), "{tfo}");
    let described = machine["disks"][0]["uri"].as_str().unwrap().to_string();
    assert!(described.starts_with("nbds://"), "failover disks are served over TLS only: {described}");
    let test_disk = local.with_certs(&described);
    assert_eq!(machine["disks"][0]["name"], "disk0");
    // A second test failover of the same item is refused while one runs.
    assert!(!srctl(cp, admin_file, &["test-failover", &item]).status.success());
    let before = dir.path().join("tfo-before.img");
    run("nbdcopy", &[&test_disk, before.to_str().unwrap()]).unwrap();
    let writes = ["write -P 0xab 5M 2M", "write -z 9M 64k"].map(String::from);
    qemu_io(&test_disk, &writes).unwrap();
    let expected = before.to_str().unwrap();
    qemu_io(expected, &writes).unwrap();
    // Replication goes on meanwhile: something the churn wrote after the test disk's writes is applied.
    let written = local.agent_status().unwrap()["disks"][0]["last_seq"].as_u64().unwrap();
    wait_for("the churn to be applied to the replica", std::time::Duration::from_secs(30), || {
        local.applied(1).unwrap() > written
    });
    compare(expected, &test_disk).unwrap();
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    churn.join().unwrap();
    // Replication kept up; the replica is the source, without the test disk's writes.
    wait_caught_up(local, std::time::Duration::from_secs(60)).unwrap();
    compare(m.disk.to_str().unwrap(), &local.replica_uri(1)).unwrap();
    compare(expected, &test_disk).unwrap();
    let shown = item_of(cp, admin_file, "agent-1");
    assert_eq!(shown["test_failover"]["machine"]["disks"][0]["uri"], described.as_str(), "{shown}");
    let out = srctl(cp, admin_file, &["test-failover", &item, "--cleanup"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(run("nbdinfo", &[&test_disk]).is_err(), "the test disk outlived its cleanup");
    let again = srctl(cp, admin_file, &["test-failover", &item, "--cleanup"]);
    assert!(String::from_utf8_lossy(&again.stderr).contains("no test failover"));
    let jobs = String::from_utf8_lossy(&srctl(cp, admin_file, &["jobs", "list", "--kind", "test failover"]).stdout)
        .to_string();
    assert!(jobs.contains("succeeded"), "{jobs}");
    // Export through the API writes the latest point, into the master target's export directory
    // (a name there; a path elsewhere is refused).
    let out = srctl(cp, admin_file, &["export", &item, "--disk", "1", "--path", "/etc/exported.img"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("only inside"), "{}", String::from_utf8_lossy(&out.stderr));
    let image = m.local.export_dir().join("exported.img");
    let out = srctl(cp, admin_file, &["export", &item, "--disk", "1", "--path", "exported.img"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    compare(m.disk.to_str().unwrap(), image.to_str().unwrap()).unwrap();
}

/// Overwrites 1% of a file's 4 KiB blocks with junk.
fn diverge_file(path: &std::path::Path, size: u64) {
    use rand::{Rng, RngCore};
    use std::os::unix::fs::FileExt;
    let f = std::fs::OpenOptions::new().write(true).open(path).unwrap();
    let mut rng = rand::thread_rng();
    let mut junk = [0u8; 4096];
    for _ in 0..size / 4096 / 100 {
        rng.fill_bytes(&mut junk);
        f.write_all_at(&junk, rng.gen_range(0..size / 4096) * 4096).unwrap();
    }
    f.sync_all().unwrap();
}

#[test]
fn overflow_waits_for_the_resync_window_and_srctl_resync_brings_the_item_back() {
    let dir = test_dir();
    let mut m = Managed::start(dir.path(), 32, "");
    // A window an hour from now: the automatic resync must wait; a 1% journal limit (about 330 KiB).
    let now_min = (sr_common::types::now_micros() / 60_000_000 % 1440) as u32;
    let (s, e) = ((now_min + 60) % 1440, (now_min + 61) % 1440);
    let window = format!("{:02}:{:02}-{:02}:{:02}", s / 60, s % 60, e / 60, e % 60);
    m.protect(&["--journal-limit-percent", "1", "--resync-window", &window]);
    let (cp, admin_file, local) = (&m.cp, &m.admin_file, &m.local);
    let item = local.item.to_string();
    let uri = local.agent_uri("disk0");
    run("qemu-io", &["-f", "raw", "-c", "write -P 0x71 1M 4M", "-c", "flush", &uri]).unwrap();
    let i = wait_until("the item to need a resync", std::time::Duration::from_secs(30), || {
        let i = item_of(cp, admin_file, "agent-1");
        (i["state_name"] == "resync_required").then_some(i)
    });
    assert!(i["state"]["reason"].as_str().unwrap().contains("limit"), "{i}");
    // Outside the window nothing is copied: the dirty blocks stay. The agent had its chance: past the
    // overflow, with dirty blocks to copy, it reports them waiting for the window.
    let admin = m.cp.admin_token().unwrap();
    wait_for("the agent to hold its dirty blocks for the window", std::time::Duration::from_secs(30), || {
        let (_, machines) = call(cp, "GET", "/v1/machines", None, Some(&admin));
        let d = &machines[0]["progress"][0];
        d["resync_waiting"] == true && d["overflow"] == false
    });
    let st = local.agent_status().unwrap();
    assert!(st["disks"][0]["dirty_bytes"].as_u64().unwrap() > 0, "{st}");
    assert_eq!(item_of(cp, admin_file, "agent-1")["state_name"], "resync_required");
    // The operator says now: checksums are compared too, and the item is protected again.
    let out = srctl(cp, admin_file, &["resync", &item, "--watch"]);
    assert!(out.status.success(), "{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    wait_caught_up(local, std::time::Duration::from_secs(60)).unwrap();
    compare(m.disk.to_str().unwrap(), &local.replica_uri(1)).unwrap();
    assert_eq!(item_of(cp, admin_file, "agent-1")["state_name"], "protected");

    // A replica that diverged while its master target was down: srctl resync repairs it.
    m.mt.take().unwrap().kill();
    diverge_file(&m.local.replica_path(1), 32 << 20);
    m.mt = Some(m.local.start(Component::MasterTarget).unwrap());
    let (cp, admin_file, local) = (&m.cp, &m.admin_file, &m.local);
    assert!(compare(m.disk.to_str().unwrap(), &local.replica_uri(1)).is_err());
    let out = srctl(cp, admin_file, &["resync", &item, "--watch"]);
    assert!(out.status.success(), "{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    wait_caught_up(local, std::time::Duration::from_secs(60)).unwrap();
    compare(m.disk.to_str().unwrap(), &local.replica_uri(1)).unwrap();
    let jobs =
        String::from_utf8_lossy(&srctl(cp, admin_file, &["jobs", "list", "--kind", "resync"]).stdout).to_string();
    assert_eq!(jobs.matches("succeeded").count(), 2, "{jobs}");
    let events = String::from_utf8_lossy(&srctl(cp, admin_file, &["events"]).stdout).to_string();
    assert!(events.contains("resync required") && events.contains("resynchronized"), "{events}");
}

/// Waits until agent-1's item satisfies `f`; returns it.
fn wait_item(m: &Managed, what: &str, f: impl Fn(&serde_json::Value) -> bool) -> serde_json::Value {
    let mut item = serde_json::Value::Null;
    wait_for(what, std::time::Duration::from_secs(120), || {
        item = item_of(&m.cp, &m.admin_file, "agent-1");
        f(&item)
    });
    item
}

#[test]
fn a_master_target_restarted_without_its_configuration_server_keeps_the_policys_retention() {
    let dir = test_dir();
    let mut m = Managed::start(dir.path(), 32, "");
    // Undo segments close every second, so expiry has whole segments it could delete.
    let segments = ("SR_MT__POINTS__SEGMENT_SECS", "1");
    m.mt.take().unwrap().kill();
    m.mt = Some(m.local.start_env(Component::MasterTarget, &[segments]).unwrap());
    m.protect(&["--retention-hours", "2"]);
    let uri = m.local.agent_uri("disk0");
    let item = m.local.item;
    let points = || m.local.get(Component::MasterTarget, &format!("/v1/points?item={item}")).unwrap();
    for k in 0..4u8 {
        run("qemu-io", &["-f", "raw", "-c", &format!("write -P {} 0 1M", 0x30 + k), "-c", "flush", &uri]).unwrap();
        wait_caught_up(&m.local, std::time::Duration::from_secs(60)).unwrap();
        // The next write lands in a later segment once the newest change is over a second old.
        wait_for("the newest change to age past the segment time", std::time::Duration::from_secs(30), || {
            let latest = points()["disks"][0]["latest_us"].as_u64().unwrap_or(u64::MAX);
            sr_common::types::now_micros().saturating_sub(latest) > 1_100_000
        });
    }
    let before = points()["disks"][0]["oldest_us"].as_u64().unwrap();
    // The configuration server is gone, and the master target restarts with a 1-second default.
    m.mt.take().unwrap().kill();
    m._cs.kill();
    let env = [segments, ("SR_MT__POINTS__RETENTION_SECS", "1"), ("SR_MT__POINTS__EXPIRY_INTERVAL_SECS", "1")];
    m.mt = Some(m.local.start_env(Component::MasterTarget, &env).unwrap());
    wait_for("expiry to run three times", std::time::Duration::from_secs(60), || {
        metric(&m.local, Component::MasterTarget, "sr_master_target_expiry_runs_total").unwrap() >= 3.0
    });
    let p = points();
    assert_eq!(p["disks"][0]["oldest_us"].as_u64().unwrap(), before, "points the policy keeps were expired: {p}");
}

#[test]
fn a_lost_replica_turns_its_item_critical_with_the_reason_and_an_alert() {
    let dir = test_dir();
    let mut m = Managed::start(dir.path(), 32, "");
    m.protect(&[]);
    let uri = m.local.agent_uri("disk0");
    run("qemu-io", &["-f", "raw", "-c", "write -P 0x33 0 1M", "-c", "flush", &uri]).unwrap();
    wait_caught_up(&m.local, std::time::Duration::from_secs(60)).unwrap();
    // The master target's replica file is lost while it is down.
    m.mt.take().unwrap().kill();
    for e in std::fs::read_dir(m.local.root.join("mt").join("replicas")).unwrap() {
        let p = e.unwrap().path();
        if p.extension().is_some_and(|x| x == "img") {
            std::fs::remove_file(p).unwrap();
        }
    }
    m.mt = Some(m.local.start(Component::MasterTarget).unwrap());
    // The master target reports it (a typed fault in its heartbeat): the item turns Critical by itself.
    let item = wait_item(&m, "the item to turn critical", |i| i["state_name"] == "critical");
    let reason = item["state"]["reason"].as_str().unwrap();
    assert!(reason.contains("master target mt-1") && reason.contains("missing"), "{item}");
    let events = String::from_utf8_lossy(&srctl(&m.cp, &m.admin_file, &["events"]).stdout).to_string();
    assert!(events.contains("is critical"), "{events}");
    // Comparing checksums cannot repair it, and says what can; a full resync copies the disk again into
    // a new replica, never into the lost one's place as an empty file.
    let id = m.local.item.to_string();
    let out = srctl(&m.cp, &m.admin_file, &["resync", &id]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("--full"), "{}", String::from_utf8_lossy(&out.stderr));
    let out = srctl(&m.cp, &m.admin_file, &["resync", &id, "--full", "--watch"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let item = item_of(&m.cp, &m.admin_file, "agent-1");
    assert_eq!(item["state_name"], "protected", "{item}");
    let wire = item["stream"].as_u64().unwrap();
    let replica = m.local.root.join("mt").join("replicas").join(format!("item-{wire}-disk-1.img"));
    compare(m.disk.to_str().unwrap(), replica.to_str().unwrap()).unwrap();
}

#[test]
fn a_full_master_target_volume_shows_on_the_item_until_space_returns() {
    let dir = test_dir();
    let mut m = Managed::start(dir.path(), 16, "");
    // The master target's data moves onto a 20 MiB volume: room for the replica, not for its history.
    m.mt.take().unwrap().kill();
    let data = m.local.root.join("mt");
    let aside = dir.path().join("mt-aside");
    std::fs::rename(&data, &aside).unwrap();
    let volume = Tmpfs::mount(&data, "20m");
    run("cp", &["-a", &format!("{}/.", aside.display()), data.to_str().unwrap()]).unwrap();
    m.mt = Some(m.local.start(Component::MasterTarget).unwrap());
    m.protect(&[]);
    // The disk written whole, then whole again: the undo journal must keep the first 16 MiB.
    let uri = m.local.agent_uri("disk0");
    for pass in 0..2 {
        let cmds: Vec<String> = (0..16).map(|i| format!("write -P {} {i}M 1M", pass * 16 + i + 1)).collect();
        let mut args: Vec<&str> = vec!["-f", "raw"];
        for c in &cmds {
            args.extend(["-c", c.as_str()]);
        }
        args.extend(["-c", "flush", uri.as_str()]);
        run("qemu-io", &args).unwrap();
    }
    // Applying fails for want of space (and is rolled back, retried): the item says so.
    let item = wait_item(&m, "the item to show the full volume", |i| i["problem"].is_string());
    assert!(item["problem"].as_str().unwrap().contains("No space left"), "{item}");
    // Space returns: replication goes on by itself, the problem clears, the replica equals the source.
    run("mount", &["-o", "remount,size=256m", volume.0.to_str().unwrap()]).unwrap();
    wait_item(&m, "the problem to clear", |i| i["problem"].is_null());
    wait_caught_up(&m.local, std::time::Duration::from_secs(180)).unwrap();
    compare(m.disk.to_str().unwrap(), &m.local.replica_uri(1)).unwrap();
    let events = String::from_utf8_lossy(&srctl(&m.cp, &m.admin_file, &["events"]).stdout).to_string();
    assert!(events.contains("replication goes on again"), "{events}");
}

#[test]
fn a_gap_raises_resync_required_by_itself_and_the_resync_repairs_it() {
    let dir = test_dir();
    let mut m = Managed::start(dir.path(), 32, "");
    m.protect(&[]);
    let uri = m.local.agent_uri("disk0");
    let write = |pattern: u8, at: u64| {
        run("qemu-io", &["-f", "raw", "-c", &format!("write -P {pattern} {at}M 2M"), "-c", "flush", &uri]).unwrap();
    };
    write(0x41, 0);
    wait_caught_up(&m.local, std::time::Duration::from_secs(60)).unwrap();
    // The master target's state is saved, replication goes on, and then that old state comes back (a
    // restore from backup): it now needs changes the process server and the agent dropped long ago.
    let data = m.local.root.join("mt");
    let saved = dir.path().join("mt-saved");
    m.mt.take().unwrap().kill();
    run("cp", &["-a", data.to_str().unwrap(), saved.to_str().unwrap()]).unwrap();
    m.mt = Some(m.local.start(Component::MasterTarget).unwrap());
    write(0x42, 4);
    wait_caught_up(&m.local, std::time::Duration::from_secs(60)).unwrap();
    m.mt.take().unwrap().kill();
    std::fs::remove_dir_all(&data).unwrap();
    std::fs::rename(&saved, &data).unwrap();
    m.mt = Some(m.local.start(Component::MasterTarget).unwrap());
    write(0x43, 8);
    // The gap is reported typed (no one reads an error's text): Resync required, by itself.
    let item = wait_item(&m, "the gap to be raised", |i| i["chain_broken"] == true);
    assert_eq!(item["state_name"], "resync_required", "{item}");
    // The resync repairs it: the whole disk into a new stream, protected again, replica equal to the disk.
    let out = srctl(&m.cp, &m.admin_file, &["resync", &m.local.item.to_string(), "--watch"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let item = item_of(&m.cp, &m.admin_file, "agent-1");
    assert_eq!(item["state_name"], "protected", "{item}");
    assert_eq!(item["chain_broken"], false, "{item}");
    let wire = item["stream"].as_u64().unwrap();
    let replica = m.local.root.join("mt").join("replicas").join(format!("item-{wire}-disk-1.img"));
    compare(m.disk.to_str().unwrap(), replica.to_str().unwrap()).unwrap();
}
