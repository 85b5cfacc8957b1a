//! The Helm chart runs as it renders: `helm template` gives the config files, the entrypoint, the
//! registration Secret and each StatefulSet's environment, and this test runs exactly those (the
//! chart's volume paths mapped to directories here) in the two-site namespace topology: the
//! configuration server and two process servers on site A, a master target on site B, reached by
//! the names the chart gives them. An agent outside the chart protects a disk; then a third process
//! server is added (the StatefulSet scaled to 3), the item moves to it under churn, the new one is
//! drained and stopped (scaled back down), and each time the replica is byte-identical to the source.

// Test code: a failed unwrap is a failed test, with its message.
#![allow(clippy::unwrap_used)]

use serde_json::Value;
use sr_devkit::netns::{Family, Site, Topology};
use sr_devkit::wan::Impairment;
use sr_tests::*;
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

const RELEASE: &str = "t";
const NAMESPACE: &str = "sr";

/// The hosts: the chart's pods take their names.
const HOSTS: [(&str, Site); 6] =
    [("cs", Site::A), ("ps-0", Site::A), ("ps-1", Site::A), ("ps-2", Site::A), ("agent-1", Site::A), ("mt-0", Site::B)];

fn helm() -> Option<PathBuf> {
    let home = std::env::var_os("HOME").map(|h| Path::new(&h).join(".local/bin/helm"));
    std::env::var_os("PATH")
        .into_iter()
        .flat_map(|p| std::env::split_paths(&p).collect::<Vec<_>>())
        .map(|d| d.join("helm"))
        .chain(home)
        .find(|p| p.is_file())
}

/// Whether this test can run here; with `SR_REQUIRE_NETNS` set (CI sets it) it must.
fn can_run() -> Option<PathBuf> {
    let why = match (Topology::available(), helm()) {
        (Ok(()), Some(h)) => return Some(h),
        (Err(why), _) => why,
        (_, None) => "helm is not installed (scripts/setup.sh installs it)".to_string(),
    };
    if std::env::var_os("SR_REQUIRE_NETNS").is_some() {
        panic!("SR_REQUIRE_NETNS is set but the chart test cannot run: {why}");
    }
    eprintln!("SKIPPED: the chart test needs network namespaces and helm: {why}");
    None
}

/// `helm template` of the chart with `values`, as JSON documents (PyYAML reads helm's YAML).
fn render(helm: &Path, values: &Path) -> Vec<Value> {
    let chart = Path::new(env!("CARGO_MANIFEST_DIR")).join("../charts/site-recovery");
    let out = std::process::Command::new(helm)
        .args(["template", RELEASE])
        .arg(&chart)
        .args(["--namespace", NAMESPACE, "-f"])
        .arg(values)
        .output()
        .unwrap();
    assert!(out.status.success(), "helm template: {}", String::from_utf8_lossy(&out.stderr));
    let path = values.with_extension("rendered.yaml");
    std::fs::write(&path, &out.stdout).unwrap();
    let json = run(
        "python3",
        &[
            "-c",
            "import json, sys, yaml; print(json.dumps([d for d in yaml.safe_load_all(open(sys.argv[1])) if d]))",
            path.to_str().unwrap(),
        ],
    )
    .unwrap();
    serde_json::from_str(&json).unwrap()
}

fn doc<'a>(docs: &'a [Value], kind: &str, name: &str) -> &'a Value {
    docs.iter()
        .find(|d| d["kind"] == kind && d["metadata"]["name"] == name)
        .unwrap_or_else(|| panic!("the chart rendered no {kind} {name}"))
}

/// What the chart gives one component's pods.
struct Pod {
    /// The init containers, then the service's container.
    init: Vec<Value>,
    main: Value,
    /// Its config file, with the chart's volume path `/data` to be mapped.
    config: String,
}

fn pod_spec(docs: &[Value], sts: &str, component: &str) -> Pod {
    let s = doc(docs, "StatefulSet", sts);
    let spec = &s["spec"]["template"]["spec"];
    let init = spec["initContainers"].as_array().cloned().unwrap_or_default();
    let main = spec["containers"][0].clone();
    let config = doc(docs, "ConfigMap", &format!("{RELEASE}-site-recovery-config"))["data"]
        [format!("{component}.toml")]
    .as_str()
    .unwrap()
    .to_string();
    Pod { init, main, config }
}

/// A container's environment as the kubelet would make it, its volumes mapped to directories here
/// (a volume the container does not mount maps to a directory that does not exist).
fn container_env(
    c: &Value,
    volumes: &BTreeMap<&str, PathBuf>,
    pod_name: &str,
    pod_ip: std::net::IpAddr,
) -> Vec<(String, String)> {
    let mounted: Vec<&str> =
        c["volumeMounts"].as_array().unwrap().iter().map(|m| m["mountPath"].as_str().unwrap()).collect();
    for m in &mounted {
        assert!(volumes.contains_key(m), "the chart mounts {m}, which this test does not map");
    }
    let at = |path: &str| {
        if mounted.contains(&path) {
            volumes[path].display().to_string()
        } else {
            format!("{}-not-mounted", volumes[path].display())
        }
    };
    let mut env: Vec<(String, String)> = vec![
        ("SR_DATA".into(), at("/data")),
        ("SR_CONFIG_DIR".into(), at("/etc/site-recovery/config")),
        ("SR_KEYS_DIR".into(), at("/etc/site-recovery/registration")),
        ("SR_BIN_DIR".into(), bin_dir().display().to_string()),
    ];
    for v in c["env"].as_array().into_iter().flatten() {
        let name = v["name"].as_str().unwrap();
        let value = match v["valueFrom"]["fieldRef"]["fieldPath"].as_str() {
            Some("metadata.name") => pod_name.to_string(),
            Some("status.podIP") => pod_ip.to_string(),
            Some(other) => panic!("{name}: a downward API field this test does not know: {other}"),
            None => v["value"].as_str().unwrap_or_default().to_string(),
        };
        env.push((name.to_string(), value));
    }
    let command: Vec<&str> = c["command"].as_array().unwrap().iter().map(|v| v.as_str().unwrap()).collect();
    assert_eq!(&command[..2], ["/bin/sh", "/etc/site-recovery/bin/entrypoint.sh"], "the container runs the entrypoint");
    env
}

/// A running topology, with the name the chart gives the configuration server in each host's
/// `/etc/hosts` (`ip netns exec` mounts `/etc/netns/NS/hosts` there).
struct Cluster {
    topo: Topology,
    hosts_dirs: Vec<PathBuf>,
}

impl Drop for Cluster {
    fn drop(&mut self) {
        for d in &self.hosts_dirs {
            let _ = std::fs::remove_dir_all(d);
        }
    }
}

impl Cluster {
    fn ip(&self, host: &str) -> std::net::IpAddr {
        self.topo.host(host).ip(Family::V4)
    }
}

/// Starts one pod of `component` (ordinal `ordinal`) on `host` as the chart runs it: its init
/// containers to their end, then the service's container.
#[allow(clippy::too_many_arguments)]
fn start_pod(
    cl: &Cluster,
    dir: &Path,
    docs: &[Value],
    component: &str,
    short: &str,
    ordinal: u32,
    host: &str,
    http_port: u16,
) -> Proc {
    let sts = format!("{RELEASE}-site-recovery-{short}");
    let pod = pod_spec(docs, &sts, component);
    let root = dir.join(format!("{short}-{ordinal}"));
    let volumes: BTreeMap<&str, PathBuf> = BTreeMap::from([
        ("/data", root.join("data")),
        ("/etc/site-recovery/config", root.join("config")),
        ("/etc/site-recovery/bin", root.join("bin")),
        ("/etc/site-recovery/registration", registration_keys(docs, dir)),
        ("/tmp", root.join("tmp")),
    ]);
    for d in volumes.values() {
        std::fs::create_dir_all(d).unwrap();
    }
    // The volumes: the config file (its paths under /data mapped), the entrypoint.
    let config = pod.config.replace("\"/data/", &format!("\"{}/", volumes["/data"].display()));
    std::fs::write(volumes["/etc/site-recovery/config"].join(format!("{component}.toml")), config).unwrap();
    let entrypoint = doc(docs, "ConfigMap", &format!("{RELEASE}-site-recovery-entrypoint"))["data"]["entrypoint.sh"]
        .as_str()
        .unwrap()
        .to_string();
    let script = volumes["/etc/site-recovery/bin"].join("entrypoint.sh");
    std::fs::write(&script, entrypoint).unwrap();
    let (pod_name, ip) = (format!("{sts}-{ordinal}"), cl.ip(host));
    let log = dir.join(format!("{short}-{ordinal}.log"));
    let ns = &cl.topo.host(host).ns;
    for c in &pod.init {
        assert_eq!(c["command"][2], component);
        let env = container_env(c, &volumes, &pod_name, ip);
        let out = sr_devkit::entrypoint_command(ns, &script, component, &env).output().unwrap();
        assert!(
            out.status.success(),
            "init container {} of {pod_name}: {}{}",
            c["name"],
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    assert_eq!(pod.main["command"][2], component);
    let mounts = pod.main["volumeMounts"].to_string();
    assert!(!mounts.contains("/etc/site-recovery/registration"), "the service's container sees no keys: {mounts}");
    let env = container_env(&pod.main, &volumes, &pod_name, ip);
    let c = if component == "process-server" { Component::ProcessServer } else { Component::MasterTarget };
    let ca = volumes["/data"].join("certs").join("ca.pem");
    let http = SocketAddr::new(ip, http_port);
    sr_devkit::spawn_entrypoint(ns, c, &script, &env, &log, http, &ca)
        .unwrap_or_else(|e| panic!("{e:#}\n{}", std::fs::read_to_string(&log).unwrap_or_default()))
}

/// The registration Secret as the volume a pod mounts: one file per key.
fn registration_keys(docs: &[Value], dir: &Path) -> PathBuf {
    let keys = dir.join("registration");
    if !keys.exists() {
        std::fs::create_dir_all(&keys).unwrap();
        let secret = doc(docs, "Secret", &format!("{RELEASE}-site-recovery-registration"));
        for (k, v) in secret["data"].as_object().unwrap() {
            let b64 = v.as_str().unwrap();
            let bytes = run("sh", &["-c", &format!("printf %s '{b64}' | base64 -d")]).unwrap();
            std::fs::write(keys.join(k), bytes).unwrap();
        }
    }
    keys
}

#[test]
fn the_chart_as_rendered_replicates_scales_out_and_drains_with_replicas_identical() {
    let Some(helm) = can_run() else { return };
    let dir = test_dir();
    let topo = Topology::create(&HOSTS, Impairment::wan(Duration::from_millis(10), 0.0, None), 7).unwrap();
    let cs_name = format!("{RELEASE}-site-recovery-cs.{NAMESPACE}.svc");
    let mut hosts_dirs = Vec::new();
    let cs_ip = topo.host("cs").ip(Family::V4);
    for (h, _) in HOSTS {
        let d = Path::new("/etc/netns").join(&topo.host(h).ns);
        std::fs::create_dir_all(&d).unwrap();
        std::fs::write(d.join("hosts"), format!("127.0.0.1 localhost\n{cs_ip} {cs_name}\n")).unwrap();
        hosts_dirs.push(d);
    }
    let cl = Cluster { topo, hosts_dirs };

    // Values as an operator would write them for this network; the pods advertise their own IPs.
    let values = dir.path().join("values.yaml");
    std::fs::write(
        &values,
        "site: sa\nprocessServer:\n  replicas: 2\n  maxReplicas: 3\n  cacheLimitBytes: 268435456\n\
         masterTarget:\n  replicas: 1\n  maxReplicas: 1\nconfigServer:\n  componentTimeoutSecs: 5\n",
    )
    .unwrap();
    let docs = render(&helm, &values);
    let scaled: Vec<Value> = {
        let up = dir.path().join("values-3.yaml");
        std::fs::write(
            &up,
            format!("{}\n", std::fs::read_to_string(&values).unwrap().replace("replicas: 2", "replicas: 3")),
        )
        .unwrap();
        render(&helm, &up)
    };
    assert_eq!(doc(&scaled, "StatefulSet", &format!("{RELEASE}-site-recovery-ps"))["spec"]["replicas"], 3);

    // The configuration server, from the chart's config and entrypoint.
    let cs_root = dir.path().join("cs");
    let cs_data = cs_root.join("data");
    std::fs::create_dir_all(cs_root.join("config")).unwrap();
    std::fs::create_dir_all(cs_root.join("bin")).unwrap();
    let cs_pod = pod_spec(&docs, &format!("{RELEASE}-site-recovery-cs"), "config-server");
    let keys = registration_keys(&docs, dir.path());
    let cs_config = cs_pod
        .config
        .replace("\"/data/", &format!("\"{}/", cs_data.display()))
        .replace("\"/etc/site-recovery/registration\"", &format!("{:?}", keys.display().to_string()));
    assert!(cs_config.contains(&cs_name), "the API certificate names the Service: {cs_config}");
    std::fs::write(cs_root.join("config").join("config-server.toml"), cs_config).unwrap();
    std::fs::write(
        cs_root.join("bin").join("entrypoint.sh"),
        doc(&docs, "ConfigMap", &format!("{RELEASE}-site-recovery-entrypoint"))["data"]["entrypoint.sh"]
            .as_str()
            .unwrap(),
    )
    .unwrap();
    let cs_volumes: BTreeMap<&str, PathBuf> = BTreeMap::from([
        ("/data", cs_data.clone()),
        ("/etc/site-recovery/config", cs_root.join("config")),
        ("/etc/site-recovery/bin", cs_root.join("bin")),
        ("/etc/site-recovery/registration", keys.clone()),
        ("/tmp", cs_root.join("tmp")),
    ]);
    let cs_env = container_env(&cs_pod.main, &cs_volumes, "t-site-recovery-cs-0", cs_ip);
    let cp = ControlPlane {
        root: cs_data.clone(),
        api: SocketAddr::new(cs_ip, 9443),
        ns: Some(cl.topo.host("cs").ns.clone()),
    };
    let _cs = sr_devkit::spawn_entrypoint(
        &cl.topo.host("cs").ns,
        Component::ConfigServer,
        &cs_root.join("bin").join("entrypoint.sh"),
        &cs_env,
        &dir.path().join("cs.log"),
        cp.api,
        &cp.ca(),
    )
    .unwrap();
    let d = Deployment::attach(cp.clone(), dir.path());

    // The StatefulSets' pods: two process servers on site A, the master target on site B.
    let _mt = start_pod(&cl, dir.path(), &docs, "master-target", "mt", 0, "mt-0", 9103);
    let _ps0 = start_pod(&cl, dir.path(), &docs, "process-server", "ps", 0, "ps-0", 9102);
    let _ps1 = start_pod(&cl, dir.path(), &docs, "process-server", "ps", 1, "ps-1", 9102);
    let comps = d.api("GET", "/v1/components", None).1;
    let names: Vec<&str> = comps.as_array().unwrap().iter().filter_map(|c| c["name"].as_str()).collect();
    for n in ["sa-t-site-recovery-mt-0", "sa-t-site-recovery-ps-0", "sa-t-site-recovery-ps-1"] {
        assert!(names.contains(&n), "{n} registered: {names:?}");
    }

    // An agent on a protected machine, outside the chart, registered with a key from srctl.
    let disk = dir.path().join("source.img");
    make_disk(&disk, 24 << 20).unwrap();
    run("qemu-io", &["-f", "raw", "-c", "write -P 0x11 0 24M", disk.to_str().unwrap()]).unwrap();
    let agent = start_agent(&cl, &d, dir.path(), &disk);
    let item = d.protect("agent-1");
    let uri = format!("nbd+unix:///disk0?socket={}", dir.path().join("agent").join("nbd.sock").display());
    let replica = |item: &Value| {
        let mt_data = dir.path().join("mt-0").join("data").join("mt").join("replicas");
        mt_data.join(format!("item-{}-disk-1.img", item["stream"].as_u64().unwrap_or(item["id"].as_u64().unwrap())))
    };
    let identical = |what: &str| {
        let i = d.item(item);
        let r = replica(&i);
        wait_for(&format!("the replica equal to the source ({what})"), Duration::from_secs(120), || {
            r.exists() && compare(disk.to_str().unwrap(), r.to_str().unwrap()).is_ok()
        });
    };
    let write = |pattern: u8, at_mib: u64| {
        qemu_io(&uri, &[format!("write -P {pattern} {at_mib}M 2M"), "flush".into()]).unwrap();
    };
    write(0x21, 1);
    identical("protected");
    let on = |i: &Value| i["process_server"].as_str().unwrap_or_default().to_string();
    let first = on(&d.item(item));
    assert!(first.starts_with("sa-t-site-recovery-ps-"), "{first}");

    // Scale out: the third pod of the scaled StatefulSet registers with its ordinal's key and joins.
    let ps2 = start_pod(&cl, dir.path(), &scaled, "process-server", "ps", 2, "ps-2", 9102);
    let new = "sa-t-site-recovery-ps-2";
    wait_for("ps-2 reporting", Duration::from_secs(30), || {
        let c = d.api("GET", "/v1/components", None).1;
        c.as_array().unwrap().iter().any(|c| c["name"] == new && c["health"] == "healthy")
    });
    // The item moves to it, with writes before and while it moves.
    write(0x31, 4);
    let out = d.srctl(&["items", "move", &item.to_string(), "--to", new, "--watch"]);
    assert!(out.contains("caught up through"), "{out}");
    write(0x32, 8);
    assert_eq!(on(&d.item(item)), new);
    identical("moved to the new process server");

    // Scale down: drain it (its item moves back to one of the first two), then stop it.
    let out = d.srctl(&["process-servers", "drain", new, "--watch"]);
    assert!(out.contains("caught up through"), "{out}");
    let back = on(&d.item(item));
    assert!(back != new && back.starts_with("sa-t-site-recovery-ps-"), "{back}");
    let comps = d.api("GET", "/v1/components", None).1;
    let c = comps.as_array().unwrap().iter().find(|c| c["name"] == new).unwrap().clone();
    assert_eq!(c["draining"], true, "{c}");
    ps2.stop().unwrap();
    write(0x41, 12);
    identical("drained and removed");
    // A drained process server gets nothing new: moving there is refused.
    let (code, body) =
        d.api("POST", &format!("/v1/items/{item}/move"), Some(serde_json::json!({ "process_server": new })));
    assert_eq!(code, 409, "{body}");
    drop(agent);
}

/// The protected machine's agent in host agent-1, registered with a key `srctl keys create` made.
fn start_agent(cl: &Cluster, d: &Deployment, dir: &Path, disk: &Path) -> Proc {
    let key = d.srctl(&["--output", "json", "keys", "create", "--role", "agent"]);
    let key: Value = serde_json::from_str(&key).unwrap();
    let certs = dir.join("agent-certs");
    let out = cl
        .topo
        .command("agent-1", bin_dir().join("mobility-agent").to_str().unwrap())
        .args(["register", "--server", &d.cp.api.to_string(), "--name", "agent-1", "--dir"])
        .arg(&certs)
        .args(["--key", key["key"].as_str().unwrap()])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let ip = cl.ip("agent-1");
    let data = dir.join("agent");
    std::fs::create_dir_all(&data).unwrap();
    let cfg: BTreeMap<&str, String> = BTreeMap::from([
        ("node", "\"agent-1\"".into()),
        ("data_dir", format!("{:?}", data.display().to_string())),
        ("http", format!("\"0.0.0.0:{}\"", sr_devkit::ports::AGENT_HTTP)),
        ("advertise_http", format!("\"{ip}:{}\"", sr_devkit::ports::AGENT_HTTP)),
        ("nbd_unix", format!("{:?}", data.join("nbd.sock").display().to_string())),
    ]);
    let mut text: String = cfg.iter().map(|(k, v)| format!("{k} = {v}\n")).collect();
    text.push_str(&format!(
        "[tls]\nca = {:?}\ncert = {:?}\nkey = {:?}\n[control]\nserver = \"{}\"\npoll_secs = 1\n\
         [[disk]]\nid = 1\nname = \"disk0\"\npath = {:?}\n",
        certs.join("ca.pem").display().to_string(),
        certs.join("agent-1.pem").display().to_string(),
        certs.join("agent-1.key").display().to_string(),
        d.cp.api,
        disk.display().to_string(),
    ));
    let config = dir.join("agent.toml");
    std::fs::write(&config, text).unwrap();
    sr_devkit::spawn_in(
        Some(&cl.topo.host("agent-1").ns),
        Component::Agent,
        &config,
        &dir.join("agent.log"),
        SocketAddr::new(ip, sr_devkit::ports::AGENT_HTTP),
        &certs.join("ca.pem"),
        &[],
    )
    .unwrap()
}
