//! Who may call what, with the real binaries: every route of the components' APIs and of the
//! configuration server's API with no credential, the wrong one and the right one; the master
//! target's NBD exports over TLS only, with an NBD client certificate and per-view allow lists; and a
//! packet capture of loopback during replication, test failover and failover that holds nothing in
//! clear.

// Test code: a failed unwrap is a failed test, with its message.
#![allow(clippy::unwrap_used)]

use serde_json::{json, Value};
use sr_common::http::Client;
use sr_common::tls::{Identity, ServerTrust, TlsPaths};
use sr_common::wire::Role;
use sr_tests::*;
use std::time::Duration;

const MIB: u64 = 1 << 20;

fn one_disk(dir: &std::path::Path) -> Local {
    let disk = dir.join("source.img");
    make_disk(&disk, 16 * MIB).unwrap();
    Local::create(&dir.join("dep"), vec![DiskSpec { id: 1, name: "d".into(), path: disk }], &Options::default())
        .unwrap()
}

/// A configuration server and one site (master target, process server, agent) protecting one disk.
struct Protected {
    d: Deployment,
    site: Local,
    disk: std::path::PathBuf,
    /// The master target, process server and agent, in that order.
    procs: Vec<Proc>,
    id: u64,
}

fn protected(dir: &std::path::Path, size: u64) -> Protected {
    let d = Deployment::start(dir);
    let disk = dir.join("source.img");
    make_disk(&disk, size).unwrap();
    let site = d.site(&dir.join("a"), "", &disk);
    let procs = [Component::MasterTarget, Component::ProcessServer, Component::Agent]
        .map(|c| site.start(c).unwrap())
        .into_iter()
        .collect();
    let id = d.protect("agent-1");
    Protected { d, site, disk, procs, id }
}

fn client(local: &Local, name: &str, server: Role) -> Client {
    let id = Identity::load(&local.tls(name)).unwrap();
    Client::new(ServerTrust::Mutual(&id, server)).unwrap()
}

/// The status of a call, 0 when nothing answered (a refused handshake).
fn status(c: &Client, addr: std::net::SocketAddr, method: &str, path: &str) -> u16 {
    c.request(addr, method, path, Some("{}")).map(|(s, _)| s).unwrap_or(0)
}

#[test]
fn every_component_route_takes_only_the_configuration_servers_certificate() {
    let dir = test_dir();
    let local = one_disk(dir.path());
    let _mt = local.start(Component::MasterTarget).unwrap();
    let _ps = local.start(Component::ProcessServer).unwrap();
    let _agent = local.start(Component::Agent).unwrap();
    let ca = std::fs::read_to_string(local.certs.join("ca.pem")).unwrap();
    // Each service's route table (master-target/src/export.rs, mobility-agent/src/lib.rs,
    // process-server/src/lib.rs).
    type Routes = &'static [(&'static str, &'static str)];
    let tables: [(Component, Role, Routes); 3] = [
        (
            Component::MasterTarget,
            Role::MasterTarget,
            &[
                ("GET", "/v1/status"),
                ("GET", "/v1/apply-log?item=1&disk=1"),
                ("POST", "/v1/export"),
                ("GET", "/v1/exports/1"),
                ("GET", "/v1/points?item=1"),
                ("GET", "/v1/views"),
                ("POST", "/v1/views"),
                ("DELETE", "/v1/views/x"),
                ("POST", "/v1/commit"),
                ("POST", "/v1/poll"),
            ],
        ),
        (
            Component::Agent,
            Role::Agent,
            &[
                ("POST", "/v1/poll"),
                ("POST", "/v1/hold"),
                ("POST", "/v1/release"),
                ("POST", "/v1/resync"),
                ("GET", "/v1/status"),
            ],
        ),
        (Component::ProcessServer, Role::ProcessServer, &[("GET", "/v1/status"), ("POST", "/v1/poll")]),
    ];
    for (c, role, routes) in tables {
        let addr = local.http(c);
        let anonymous = Client::new(ServerTrust::Ca(&ca, role)).unwrap();
        let (orchestrator, agent) = (client(&local, "cs", role), client(&local, "agent", role));
        // A certificate from another CA does not get through the handshake.
        let other =
            sr_common::tls::generate_deployment(&dir.path().join("other"), &[("cs", Role::ConfigServer)]).unwrap();
        let foreign = Client::new(ServerTrust::AnyComponent(&Identity::load(&other[0]).unwrap())).unwrap();
        for (m, p) in routes {
            assert_eq!(status(&anonymous, addr, m, p), 401, "{} {m} {p} without a certificate", c.binary());
            assert_eq!(status(&agent, addr, m, p), 403, "{} {m} {p} with an agent's certificate", c.binary());
            assert_eq!(status(&foreign, addr, m, p), 0, "{} {m} {p} with a foreign CA's certificate", c.binary());
            let s = status(&orchestrator, addr, m, p);
            assert!(![0, 401, 403].contains(&s), "{} {m} {p} with the orchestrator's certificate: {s}", c.binary());
        }
        // Health and metrics stay open and read-only.
        assert_eq!(status(&anonymous, addr, "GET", "/healthz"), 200);
        assert_eq!(status(&anonymous, addr, "GET", "/metrics"), 200);
        assert_eq!(status(&anonymous, addr, "POST", "/metrics"), 405);
    }
}

#[test]
fn nbd_exports_take_only_tls_with_an_nbd_client_certificate() {
    let dir = test_dir();
    let local = one_disk(dir.path());
    // At most two views open at once here.
    let _mt = local.start_env(Component::MasterTarget, &[("SR_MT__MAX_VIEWS", "2")]).unwrap();
    let _ps = local.start(Component::ProcessServer).unwrap();
    let _agent = local.start(Component::Agent).unwrap();
    qemu_io(&local.agent_uri("d"), &["write -P 0x5a 0 2M".into(), "flush".into()]).unwrap();
    // The agent's own front end is the machine's disk: root and the agent's user only.
    let other_user = run("runuser", &["-u", "nobody", "--", "nbdinfo", &local.agent_uri("d")]);
    assert!(other_user.is_err(), "another local user opened the protected disk");
    wait_caught_up(&local, Duration::from_secs(60)).unwrap();
    let export = format!("{}/item-1-disk-1", local.addrs.mt_nbd);

    // With the NBD client certificate: nbdinfo, qemu-img and qemu-io over TLS.
    let info = run("nbdinfo", &[&local.replica_uri(1)]).unwrap();
    assert!(info.contains("export-size: 16777216"), "{info}");
    compare(local.disks[0].path.to_str().unwrap(), &local.replica_uri(1)).unwrap();
    let image = sr_devkit::qemu_image(&local.replica_uri(1), "tls0").unwrap();
    run("qemu-io", &["-r", "--object", &image.objects[0], "--image-opts", &image.opts, "-c", "read -P 0x5a 0 2M"])
        .unwrap();

    // Refused: in clear, without a client certificate, with another role's, with another CA's.
    assert!(run("nbdinfo", &[&format!("nbd://{export}")]).is_err(), "plain NBD must be refused");
    let certless = dir.path().join("certless");
    std::fs::create_dir_all(&certless).unwrap();
    std::fs::copy(local.certs.join("ca.pem"), certless.join("ca-cert.pem")).unwrap();
    let as_dir = |name: &str, paths: &TlsPaths| {
        let d = dir.path().join(name);
        let read = |p: &std::path::Path| std::fs::read_to_string(p).unwrap();
        sr_common::register::write_nbd_client_dir(&d, &read(&paths.ca), &read(&paths.cert), &read(&paths.key)).unwrap();
        d
    };
    let agent_dir = as_dir("agent-as-client", &local.tls("agent"));
    let other = sr_common::tls::generate_deployment(&dir.path().join("other"), &[("nbd", Role::NbdClient)]).unwrap();
    let foreign_dir = as_dir("foreign", &other[0]);
    for (what, certs) in
        [("no client certificate", &certless), ("an agent's", &agent_dir), ("a foreign CA's", &foreign_dir)]
    {
        let uri = format!("nbds://{export}?tls-certificates={}", certs.display());
        assert!(run("nbdinfo", &[&uri]).is_err(), "nbds with {what} must be refused");
        assert!(qemu_io(&uri, &["read 0 4k".into()]).is_err(), "qemu-io with {what} must be refused");
    }

    // A view open to one named client only.
    let mt = local.client(Component::MasterTarget).unwrap();
    let view = |name: &str, clients: Value| {
        let body = json!({ "name": name, "item": 1, "point": "latest", "clients": clients, "writable": true });
        mt.post_json(local.addrs.mt_http, "/v1/views", &body).unwrap()["disks"][0]["uri"].as_str().unwrap().to_string()
    };
    let theirs = view("theirs", json!(["someone-else"]));
    assert!(theirs.starts_with("nbds://"), "{theirs}");
    assert!(run("nbdinfo", &[&local.with_certs(&theirs)]).is_err(), "a view open to another client is refused");
    let ours = view("ours", json!(["nbd"]));
    qemu_io(&local.with_certs(&ours), &["read -P 0x5a 0 2M".into(), "write -P 0x6b 4M 1M".into()]).unwrap();
    let listed = run("nbdinfo", &["--list", &local.with_certs(&format!("nbds://{}", local.addrs.mt_nbd))]).unwrap();
    assert!(listed.contains("ours-disk-1") && !listed.contains("theirs-disk-1"), "{listed}");

    // Limits: a third view is refused; the apply log comes a page at a time; a client that connects
    // and says nothing is dropped once the negotiation time is up.
    let third =
        mt.post_json(local.addrs.mt_http, "/v1/views", &json!({ "name": "third", "item": 1, "point": "latest" }));
    assert_eq!(third.unwrap_err().status(), Some(409));
    let page = local.get(Component::MasterTarget, "/v1/apply-log?item=1&disk=1&limit=1").unwrap();
    assert_eq!(page["batches"].as_array().unwrap().len(), 1, "{page}");
    let next = page["next_after"].as_u64().unwrap();
    let rest = local.get(Component::MasterTarget, &format!("/v1/apply-log?item=1&disk=1&after={next}")).unwrap();
    assert!(rest["batches"].as_array().unwrap().iter().all(|b| b[0].as_u64().unwrap() > next), "{rest}");
    let mut silent = std::net::TcpStream::connect(local.addrs.mt_nbd).unwrap();
    let mut greeting = [0u8; 18];
    std::io::Read::read_exact(&mut silent, &mut greeting).unwrap();
    // The server closes it (end of stream); a server that held it would let this read time out.
    silent.set_read_timeout(Some(Duration::from_secs(120))).unwrap();
    let mut rest = Vec::new();
    let ended = std::io::Read::read_to_end(&mut silent, &mut rest);
    assert!(ended.is_ok(), "a silent client was held: {ended:?}");
}

#[test]
fn the_configuration_servers_routes_follow_their_documented_roles() {
    let dir = test_dir();
    let d = Deployment::start(dir.path());
    let disk = dir.path().join("source.img");
    make_disk(&disk, 16 * MIB).unwrap();
    let site = d.site(&dir.path().join("a"), "", &disk);
    let api = d.cp.api;
    let token = |role: &str| {
        let (code, v) = d.api("POST", "/v1/tokens", Some(json!({"name": format!("t-{role}"), "role": role})));
        assert_eq!(code, 200, "{v}");
        v["token"].as_str().unwrap().to_string()
    };
    let (reader, operator) = (token("reader"), token("operator"));
    let as_token = |t: &str| d.cp.client(t).unwrap();
    let anonymous = d.cp.client("").unwrap().without_token();
    let component = {
        let id = Identity::load(&site.tls("agent-1")).unwrap();
        Client::new(ServerTrust::Mutual(&id, Role::ConfigServer)).unwrap()
    };
    let (_, doc) = d.api("GET", "/openapi.json", None);
    let mut checked = 0;
    for (path, ops) in doc["paths"].as_object().unwrap() {
        for (method, op) in ops.as_object().unwrap() {
            let who = op["description"].as_str().unwrap().trim_start_matches("Who may call: ").trim_end_matches('.');
            // Ids and names that do not exist: a permitted caller gets 404 or 400, never 401 or 403.
            let p = path.replace("{id}", "000000000999").replace("{name}", "nobody");
            let m = method.to_uppercase();
            let call = |c: &Client| c.request(api, &m, &p, Some("{}")).map(|r| r.0).unwrap_or(0);
            let allowed = |s: u16| ![0, 401, 403].contains(&s);
            let (none, r, o, a, comp) = (
                call(&anonymous),
                call(&as_token(&reader)),
                call(&as_token(&operator)),
                call(&as_token(&d.admin)),
                call(&component),
            );
            let ctx = format!("{m} {path} ({who}): none {none}, reader {r}, operator {o}, admin {a}, component {comp}");
            match who {
                "anyone" | "registration key" => assert!(allowed(none) && allowed(r) && allowed(comp), "{ctx}"),
                "reader" => assert!(none == 401 && allowed(r) && allowed(o) && allowed(a) && comp == 403, "{ctx}"),
                "operator" => assert!(none == 401 && r == 403 && allowed(o) && allowed(a) && comp == 403, "{ctx}"),
                "admin" => assert!(none == 401 && r == 403 && o == 403 && allowed(a) && comp == 403, "{ctx}"),
                "component" => assert!(none == 401 && r == 403 && a == 403 && allowed(comp), "{ctx}"),
                other => panic!("{m} {path}: unknown caller class {other:?}"),
            }
            checked += 1;
        }
    }
    assert!(checked >= 40, "only {checked} operations in the document");

    // Outside the document, only `/` and the portal's own files answer without a credential: they
    // hold no data (the page signs in with a token and calls the routes above). Every file of
    // config-server/portal is served, and nothing else: other paths, and paths that climb out, are
    // refused or unknown, and no answer carries a secret.
    let portal = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../config-server/portal");
    let mut files = Vec::new();
    for dir in [portal.clone(), portal.join("vendor")] {
        for e in std::fs::read_dir(&dir).unwrap() {
            let p = e.unwrap().path();
            if p.is_file() {
                files.push(format!("/portal/{}", p.strip_prefix(&portal).unwrap().display()));
            }
        }
    }
    files.retain(|f| f != "/portal/index.html");
    files.push("/portal/".to_string());
    assert_eq!(anonymous.request(api, "GET", "/", None).unwrap().0, 303, "/ leads to the portal");
    for path in &files {
        let (code, body) = anonymous.request(api, "GET", path, None).unwrap();
        assert_eq!(code, 200, "GET {path} without a credential");
        assert!(!body.contains(&d.admin) && !body.contains(&reader), "GET {path} carries a token");
    }
    for path in
        ["/portal/index.html", "/portal/nothing.js", "/portal/vendor/../../src/lib.rs", "/portal/%2e%2e/Cargo.toml"]
    {
        let code = anonymous.request(api, "GET", path, None).map(|r| r.0).unwrap_or(0);
        assert!([401, 404].contains(&code), "GET {path} without a credential: {code}");
    }
    for path in ["/v1/whoami", "/v1/overview", "/v1/items/1/history"] {
        let code = anonymous.request(api, "GET", path, None).map(|r| r.0).unwrap_or(0);
        assert_eq!(code, 401, "GET {path} without a credential");
    }

    // A revoked certificate gets nowhere on any route: the server checks the list in force.
    let (code, v) = d.api("POST", "/v1/components/ps-1/revoke", None);
    assert_eq!(code, 200, "{v}");
    let revoked = {
        let id = Identity::load(&site.tls("ps-1")).unwrap();
        Client::new(ServerTrust::Mutual(&id, Role::ConfigServer)).unwrap()
    };
    for (path, ops) in doc["paths"].as_object().unwrap() {
        for method in ops.as_object().unwrap().keys() {
            let p = path.replace("{id}", "000000000999").replace("{name}", "nobody");
            let s = revoked.request(api, &method.to_uppercase(), &p, Some("{}")).map(|r| r.0).unwrap_or(0);
            assert!([0, 401, 403].contains(&s), "{method} {path} with a revoked certificate: {s}");
        }
    }

    // Limits: jobs and events come a page at a time.
    let (_, jobs) = d.api("GET", "/v1/jobs?limit=1", None);
    assert_eq!(jobs.as_array().unwrap().len(), 1, "{jobs}");
    let newest = jobs[0]["id"].as_u64().unwrap();
    let (_, older) = d.api("GET", &format!("/v1/jobs?limit=1000&before={newest}"), None);
    assert!(older.as_array().unwrap().iter().all(|j| j["id"].as_u64().unwrap() < newest), "{older}");
    let (code, _) = d.api("GET", "/v1/events?limit=1", None);
    assert_eq!(code, 200);
}

/// Runs tcpdump on loopback into `file` until dropped (the whole cycle: registration, protection, a
/// test failover read over NBD, planned failover, commit, reprotect and failback).
struct Capture {
    child: std::process::Child,
}

impl Capture {
    fn start(file: &std::path::Path) -> Capture {
        use std::io::BufRead;
        let mut child = std::process::Command::new("tcpdump")
            .args(["-i", "lo", "-U", "-s", "0", "-Z", "root", "-w"])
            .arg(file)
            .stderr(std::process::Stdio::piped())
            .spawn()
            .expect("running tcpdump (scripts/setup.sh installs it)");
        // tcpdump says "listening on lo" once it captures.
        let mut err = std::io::BufReader::new(child.stderr.take().unwrap());
        let mut line = String::new();
        while err.read_line(&mut line).unwrap() > 0 && !line.contains("listening on") {
            line.clear();
        }
        assert!(line.contains("listening on"), "tcpdump did not start: {line}");
        std::thread::spawn(move || std::io::copy(&mut err, &mut std::io::sink()));
        Capture { child }
    }

    fn stop(mut self) {
        // SAFETY: signalling our own child.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGINT) };
        let _ = self.child.wait();
    }
}

impl Drop for Capture {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[test]
fn a_capture_of_loopback_holds_no_key_token_or_disk_content() {
    let dir = test_dir();
    let pcap = dir.path().join("lo.pcap");
    let capture = Capture::start(&pcap);
    let Protected { d, site, disk, procs: _procs, id } = protected(dir.path(), 16 * MIB);
    // A recognisable pattern written through the agent's Unix socket (its loopback TCP front end
    // is the machine's own disk interface, outside what crosses between the parts).
    let pattern: Vec<u8> = b"SR-CLEARTEXT-CANARY-0123456789-".iter().copied().cycle().take(256 << 10).collect();
    let pattern_file = dir.path().join("pattern.bin");
    std::fs::write(&pattern_file, &pattern).unwrap();
    let unix = format!("nbd+unix:///disk0?socket={}", site.addrs.agent_unix.display());
    run("qemu-io", &["-f", "raw", "-c", &format!("write -s {} 1M 256k", pattern_file.display()), "-c", "flush", &unix])
        .unwrap();
    wait_caught_up(&site, Duration::from_secs(60)).unwrap();
    // A test failover read back over NBD, then a planned failover.
    let (code, v) = d.api("POST", &format!("/v1/items/{id}/test-failover"), Some(json!({"point": "latest"})));
    assert_eq!(code, 200, "{v}");
    let tf = d.with_certs(v["machine"]["disks"][0]["uri"].as_str().unwrap());
    let copy = dir.path().join("tf.img");
    run("nbdcopy", &[&tf, copy.to_str().unwrap()]).unwrap();
    assert!(std::fs::read(&copy).unwrap().windows(pattern.len()).any(|w| w == pattern), "the pattern was replicated");
    d.srctl(&["test-failover", &id.to_string(), "--cleanup"]);
    d.srctl(&["failover", &id.to_string(), "--planned"]);
    // Commit, reprotect from the recovery site (a second pattern written there), failback.
    d.srctl(&["commit", &id.to_string()]);
    let committed = std::path::PathBuf::from(d.item(id)["failover"]["committed"][0]["path"].as_str().unwrap());
    let b = d.site(&dir.path().join("b"), "b-", &committed);
    let _bmt = b.start(Component::MasterTarget).unwrap();
    let _bps = b.start(Component::ProcessServer).unwrap();
    let _bagent = b.start(Component::Agent).unwrap();
    d.wait_machine("b-agent-1");
    d.wait_healthy("b-mt-1");
    let reverse: Vec<u8> = b"SR-REVERSE-CANARY-9876543210-".iter().copied().cycle().take(256 << 10).collect();
    let reverse_file = dir.path().join("reverse.bin");
    std::fs::write(&reverse_file, &reverse).unwrap();
    let b_unix = format!("nbd+unix:///disk0?socket={}", b.addrs.agent_unix.display());
    run(
        "qemu-io",
        &["-f", "raw", "-c", &format!("write -s {} 3M 256k", reverse_file.display()), "-c", "flush", &b_unix],
    )
    .unwrap();
    d.srctl(&["reprotect", &id.to_string(), "--machine", "b-agent-1"]);
    wait_for("the reprotect to bring the source up to date", Duration::from_secs(60), || {
        compare(disk.to_str().unwrap(), committed.to_str().unwrap()).is_ok()
    });
    let (code, v) = d.api("POST", &format!("/v1/items/{id}/failback"), None);
    assert_eq!(code, 200, "{v}");
    d.wait_job(v["job"].as_u64().unwrap(), true);
    assert_eq!(d.item(id)["state"]["direction"], "forward");
    let source = std::fs::read(&disk).unwrap();
    assert!(source.windows(reverse.len()).any(|w| w == reverse), "the reverse pattern reached the source");
    capture.stop();

    let bytes = std::fs::read(&pcap).unwrap();
    assert!(bytes.len() > 100_000, "the capture saw the traffic ({} bytes)", bytes.len());
    let has = |needle: &[u8]| bytes.windows(needle.len()).any(|w| w == needle);
    assert!(!has(&pattern[..64]), "disk content crossed loopback in clear");
    assert!(!has(&reverse[..64]), "disk content replicated back crossed loopback in clear");
    assert!(!has(d.admin.as_bytes()), "the admin token crossed loopback in clear");
    assert!(!has(b"data_key") && !has(b"\"keys\""), "an assignment (with data keys) crossed loopback in clear");
    assert!(!has(b"Authorization"), "an HTTP header crossed loopback in clear");
    assert!(!has(b"BEGIN CERTIFICATE REQUEST"), "a registration crossed loopback in clear");
}

#[test]
fn a_data_key_rotated_twice_under_churn_leaves_the_replica_identical() {
    let dir = test_dir();
    let Protected { d, site, disk, procs: _procs, id } = protected(dir.path(), 32 * MIB);
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let churn = {
        let (stop, uri) = (stop.clone(), site.agent_uri("disk0"));
        std::thread::spawn(move || {
            let mut i = 0u64;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let cmd = format!("write -P {} {}k 512k", i % 250 + 1, (i * 1237) % 30000);
                qemu_io(&uri, &[cmd, "flush".into()]).unwrap();
                i += 1;
            }
            i
        })
    };
    let epoch = || metric(&site, Component::ProcessServer, "sr_process_server_key_epoch").unwrap();
    let opened = || metric(&site, Component::MasterTarget, "sr_master_target_key_epoch").unwrap();
    for want in [1.0, 2.0] {
        let (code, v) = d.api("POST", &format!("/v1/items/{id}/rotate-key"), None);
        assert_eq!(code, 200, "{v}");
        assert_eq!(v["key_epoch"], want as u64);
        wait_for("the process server to seal under the new epoch", Duration::from_secs(30), || epoch() == want);
        // The master target opens and applies batches sealed under it.
        wait_for("a batch sealed under the new epoch to be applied", Duration::from_secs(30), || opened() == want);
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    assert!(churn.join().unwrap() > 0);
    wait_caught_up(&site, Duration::from_secs(60)).unwrap();
    compare(disk.to_str().unwrap(), &site.replica_uri(1)).unwrap();
    let (_, events) = d.api("GET", "/v1/events", None);
    assert!(events.to_string().contains("rotated to epoch 2"), "{events}");
    // Rotating needs an operator; a reader may not.
    let (code, v) = d.api("POST", "/v1/tokens", Some(json!({"name": "r", "role": "reader"})));
    assert_eq!(code, 200, "{v}");
    let reader = d.cp.client(v["token"].as_str().unwrap()).unwrap();
    let refused = reader.call_json(d.cp.api, "POST", &format!("/v1/items/{id}/rotate-key"), None).unwrap_err();
    assert_eq!(refused.status(), Some(403));
}

#[test]
fn the_process_server_takes_an_items_batches_only_from_its_agent_and_secrets_are_owner_only() {
    use sr_common::types::{DiskId, ItemId};
    use sr_common::wire::{self, ErrorCode, Message, WireError};
    use std::os::unix::fs::PermissionsExt;
    let dir = test_dir();
    let Protected { d, site: a, disk: disk_a, procs, id } = protected(dir.path(), 16 * MIB);
    let mut procs = procs.into_iter();
    let mt = procs.next().unwrap();
    let disk_b = dir.path().join("b.img");
    make_disk(&disk_b, 16 * MIB).unwrap();
    let stream = d.item(id)["stream"].as_u64().unwrap();
    // Another machine of the deployment, with a valid agent certificate of its own.
    let b = d.site(&dir.path().join("b"), "dr-", &disk_b);
    let intruder = Identity::load(&b.tls("dr-agent-1")).unwrap();
    let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build().unwrap();
    for tree in [false, true] {
        let refusal = rt.block_on(async {
            let ep = sr_common::quic::client(&intruder).unwrap();
            let conn = sr_common::quic::connect(&ep, a.addrs.ps_quic, Role::ProcessServer).await.unwrap();
            let (mut send, mut recv) = conn.open_bi().await.unwrap();
            // It even claims to be the item's agent: the certificate is what counts.
            let hello = Message::Hello { version: wire::PROTOCOL_VERSION, role: Role::Agent, node: "agent-1".into() };
            wire::write_msg(&mut send, &hello).await.unwrap();
            wire::check_hello(wire::expect_msg(&mut recv).await.unwrap(), Role::ProcessServer).unwrap();
            let (item, disk, disk_size) = (ItemId(stream), DiskId(1), 16 * MIB);
            let open = if tree {
                Message::TreeOpen { item, disk, disk_size, block: 1 << 20 }
            } else {
                Message::Open { item, disk, disk_size }
            };
            wire::write_msg(&mut send, &open).await.unwrap();
            wire::read_msg(&mut recv).await
        });
        match refusal {
            Err(WireError::Peer { code: ErrorCode::NotAssigned, message }) => {
                assert!(message.contains("replicated from agent agent-1, not from dr-agent-1"), "{message}")
            }
            other => panic!("another machine's agent was not refused (checksums: {tree}): {other:?}"),
        }
    }
    // Seal counts rotate an item's key only when its own process server reports them.
    let report = json!({ "seals": [{ "item": stream, "epoch": 0, "seals": 1u64 << 25 }] });
    let as_ps = |tls: TlsPaths| {
        let id = Identity::load(&tls).unwrap();
        Client::new(ServerTrust::Mutual(&id, Role::ConfigServer)).unwrap()
    };
    let rotated = || d.api("GET", "/v1/events", None).1.to_string().contains("rotated to epoch 1");
    as_ps(b.tls("dr-ps-1")).post_json(d.cp.api, "/v1/heartbeat", &report).unwrap();
    assert!(!rotated(), "another process server's report rotated the key");
    wait_for("the item's process server's report to rotate the key", Duration::from_secs(30), || {
        // The report is taken when no evaluation holds the items: sent until it is.
        as_ps(a.tls("ps-1")).post_json(d.cp.api, "/v1/heartbeat", &report).unwrap();
        rotated()
    });

    // The item's own agent goes on replicating.
    qemu_io(&a.agent_uri("disk0"), &["write -P 0x44 0 1M".into(), "flush".into()]).unwrap();
    wait_caught_up(&a, Duration::from_secs(60)).unwrap();
    compare(disk_a.to_str().unwrap(), &a.replica_uri(1)).unwrap();

    // The cache is encrypted at rest: with the master target away, what waits there is sealed.
    mt.kill();
    let pattern: Vec<u8> = b"SR-CACHE-AT-REST-CANARY-".iter().copied().cycle().take(256 << 10).collect();
    let pattern_file = dir.path().join("pattern.bin");
    std::fs::write(&pattern_file, &pattern).unwrap();
    let unix = format!("nbd+unix:///disk0?socket={}", a.addrs.agent_unix.display());
    run("qemu-io", &["-f", "raw", "-c", &format!("write -s {} 2M 256k", pattern_file.display()), "-c", "flush", &unix])
        .unwrap();
    wait_for("the batch to wait in the process server's cache", Duration::from_secs(30), || {
        a.get(Component::ProcessServer, "/v1/status").unwrap()["streams"][0]["cache_bytes"].as_u64().unwrap_or(0) > 0
    });
    let mut files = vec![a.root.join("ps")];
    let mut scanned = 0;
    while let Some(p) = files.pop() {
        if p.is_dir() {
            files.extend(std::fs::read_dir(&p).unwrap().map(|e| e.unwrap().path()));
        } else {
            let bytes = std::fs::read(&p).unwrap();
            assert!(!bytes.windows(64).any(|w| w == &pattern[..64]), "{} holds the disk's data in clear", p.display());
            scanned += 1;
        }
    }
    assert!(scanned > 1, "the cache was scanned");

    // Secrets and data are owner-only.
    let mode = |p: &std::path::Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
    for f in [
        a.certs.join("agent-1.key"),
        a.certs.join("ps-1.key"),
        a.nbd_certs().join("client-key.pem"),
        d.admin_file.clone(),
        d.cp.root.join("cs").join("ca").join("ca.key"),
        d.cp.root.join("cs").join("ca").join("config-server.key"),
    ] {
        assert_eq!(mode(&f), 0o600, "{}", f.display());
    }
    for dir in [a.root.join("mt"), a.root.join("ps"), a.root.join("agent"), d.cp.root.join("cs"), a.certs.clone()] {
        assert_eq!(mode(&dir), 0o700, "{}", dir.display());
    }
}

#[test]
fn an_nbd_client_revoked_while_connected_loses_its_connection() {
    use std::io::{BufRead, Write};
    let dir = test_dir();
    let Protected { d, site, disk: _, procs: _procs, id } = protected(dir.path(), 16 * MIB);
    let (code, v) = d.api("POST", &format!("/v1/items/{id}/test-failover"), Some(json!({"point": "latest"})));
    assert_eq!(code, 200, "{v}");
    let image = sr_devkit::qemu_image(&d.with_certs(v["machine"]["disks"][0]["uri"].as_str().unwrap()), "t").unwrap();
    // One qemu-io session, fed a command at a time.
    // stdbuf: qemu-io's answers come a line at a time through the pipe.
    let mut qemu = std::process::Command::new("stdbuf")
        .args(["-oL", "qemu-io", "--object", &image.objects[0], "--image-opts", &image.opts])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdin = qemu.stdin.take().unwrap();
    let mut out = std::io::BufReader::new(qemu.stdout.take().unwrap());
    // Each read answers two lines (what was read, then the timing).
    let mut read = |stdin: &mut std::process::ChildStdin| {
        writeln!(stdin, "read 0 4k").unwrap();
        stdin.flush().unwrap();
        let (mut line, mut stats) = (String::new(), String::new());
        out.read_line(&mut line).unwrap();
        if line.contains("read 4096/4096") {
            let _ = out.read_line(&mut stats);
        }
        line
    };
    let first = read(&mut stdin);
    assert!(first.contains("read 4096/4096"), "{first}");
    // The certificate is revoked; once the master target has the new list, the open connection ends.
    let (code, v) = d.api("POST", "/v1/components/tests/revoke", None);
    assert_eq!(code, 200, "{v}");
    let mt_log = site.log(Component::MasterTarget);
    wait_for("the master target to take the new revocation list", Duration::from_secs(30), || {
        std::fs::read_to_string(&mt_log).unwrap().matches("revocation list updated").count() >= 2
    });
    let after = read(&mut stdin);
    assert!(!after.contains("read 4096/4096"), "a revoked client was still served: {after}");
    drop(stdin);
    let _ = qemu.wait();
    let log = std::fs::read_to_string(&mt_log).unwrap();
    assert!(log.contains("certificate was revoked"), "the master target said why");
}

/// Registration keys made before the CA (a Helm chart's Secret): the server reads them from a
/// directory, and a component with the bare secret registers only with a server that proves it holds
/// the key; each key works once, also across a restart.
#[test]
fn a_bare_registration_key_registers_only_with_the_server_that_holds_it() {
    let dir = test_dir();
    let keys = dir.path().join("keys");
    std::fs::create_dir_all(&keys).unwrap();
    let secret = "Zq7".repeat(12);
    std::fs::write(keys.join("process-server-0"), format!("{secret}\n")).unwrap();
    std::fs::write(keys.join("master-target-0"), "M".repeat(40)).unwrap();
    let cp = ControlPlane::create_with(&dir.path().join("cp"), &format!("registration_keys_dir = {keys:?}\n")).unwrap();
    let other = ControlPlane::create(&dir.path().join("other")).unwrap();
    let cs = cp.start().unwrap();
    let _other = other.start().unwrap();
    let register = |api: std::net::SocketAddr, name: &str, key: &str| {
        std::process::Command::new(bin_dir().join("process-server"))
            .args(["register", "--server", &api.to_string(), "--key", key, "--name", name, "--dir"])
            .arg(dir.path().join(name))
            .output()
            .unwrap()
    };
    // Another deployment's server does not know the key, so it cannot prove it holds it (the proof
    // itself is checked in sr_common::register's tests).
    let out = register(other.api, "ps-0", &secret);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("unknown, used or expired"), "another server: {err}");
    assert!(!dir.path().join("ps-0").join("ca.pem").exists(), "no CA taken from it");
    let out = register(cp.api, "ps-0", &secret);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let ca = std::fs::read_to_string(dir.path().join("ps-0").join("ca.pem")).unwrap();
    assert_eq!(ca, std::fs::read_to_string(cp.ca()).unwrap(), "the proven CA");
    let out = register(cp.api, "ps-1", &secret);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("unknown, used or expired"), "used once: {err}");
    // A master-target key is not a process server's.
    let out = register(cp.api, "ps-2", &"M".repeat(40));
    assert!(!out.status.success(), "a key of another role");
    cs.stop().unwrap();
    let _cs = cp.start().unwrap();
    let out = register(cp.api, "ps-3", &secret);
    assert!(!out.status.success(), "read again at a restart, the key stays used");
}
