//! A one-host deployment of the data path (master target, process server, agent) on loopback: the
//! certificates, an item key, the three config files, and the processes. `srctl quickstart` and the
//! end-to-end tests both build on it, so they run the real binaries exactly as an operator would.
//!
//! ```text
//! root/
//!   certs/ ca.pem  agent.pem/.key  ps.pem/.key  mt.pem/.key     item-1.key
//!   agent.toml  ps.toml  mt.toml       agent/  ps/  mt/ (data dirs)     logs/*.log
//! ```

use anyhow::{bail, Context};
use sr_common::http;
use sr_common::tls::{generate_deployment, Identity, ServerTrust, TlsPaths};
use sr_common::wire::Role;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub mod netns;
pub mod sites;
pub mod wan;

pub const ITEM: u64 = 1;

/// Ports are picked below the kernel's ephemeral range (32768 and up on Linux), where outgoing
/// connections of the services and tests take theirs, so a port picked here is not taken by a client
/// socket before the service binds it.
const PORTS: std::ops::Range<u16> = 20000..32000;

/// A port nobody listens on, claimed for ten minutes in a directory all test and local processes on
/// this host share, so two processes never pick the same port while one of them is between picking it
/// and binding it (or between a service's kill and its restart).
fn pick_port(bindable: impl Fn(u16) -> bool) -> u16 {
    use rand::Rng;
    let claims = std::env::temp_dir().join("sr-port-claims");
    let _ = std::fs::create_dir_all(&claims);
    let mut rng = rand::thread_rng();
    for _ in 0..2000 {
        let port = rng.gen_range(PORTS);
        if !bindable(port) {
            continue;
        }
        let claim = claims.join(port.to_string());
        let stale = std::fs::metadata(&claim)
            .and_then(|m| m.modified())
            .is_ok_and(|t| t.elapsed().is_ok_and(|age| age > Duration::from_secs(600)));
        if stale {
            let _ = std::fs::remove_dir(&claim);
        }
        if std::fs::create_dir(&claim).is_ok() {
            return port;
        }
    }
    panic!("no free loopback port in {PORTS:?}");
}

/// A free loopback TCP port (bound, then released).
pub fn free_tcp() -> SocketAddr {
    let port = pick_port(|p| std::net::TcpListener::bind(("127.0.0.1", p)).is_ok());
    SocketAddr::from(([127, 0, 0, 1], port))
}

/// A free loopback UDP port (bound, then released).
pub fn free_udp() -> SocketAddr {
    let port = pick_port(|p| std::net::UdpSocket::bind(("127.0.0.1", p)).is_ok());
    SocketAddr::from(([127, 0, 0, 1], port))
}

/// Directory of the service binaries: `SR_BIN_DIR`, else the directory of the running executable if
/// the binaries are there, else its parent (a test executable lives in `target/<profile>/deps`).
pub fn bin_dir() -> PathBuf {
    if let Some(d) = std::env::var_os("SR_BIN_DIR") {
        return PathBuf::from(d);
    }
    let exe = std::env::current_exe().expect("path of the running executable");
    let dir = exe.parent().expect("executable has a directory").to_path_buf();
    if dir.join("mobility-agent").exists() {
        return dir;
    }
    dir.parent().map(Path::to_path_buf).unwrap_or(dir)
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Component {
    Agent,
    ProcessServer,
    MasterTarget,
    ConfigServer,
}

impl Component {
    pub fn binary(self) -> &'static str {
        match self {
            Component::Agent => "mobility-agent",
            Component::ProcessServer => "process-server",
            Component::MasterTarget => "master-target",
            Component::ConfigServer => "config-server",
        }
    }
    pub fn short(self) -> &'static str {
        match self {
            Component::Agent => "agent",
            Component::ProcessServer => "ps",
            Component::MasterTarget => "mt",
            Component::ConfigServer => "cs",
        }
    }
}

#[derive(Debug, Clone)]
pub struct DiskSpec {
    pub id: u64,
    pub name: String,
    pub path: PathBuf,
}

/// Knobs the tests turn.
#[derive(Debug, Clone)]
pub struct Options {
    pub batch_bytes: u64,
    pub ps_cache_limit_bytes: u64,
    pub copy_chunk_bytes: u64,
    /// Capture the disks by scanning at this interval instead of through NBD.
    pub scan_interval_secs: Option<u64>,
    /// With `scan_interval_secs`: scan only these disks (by id); empty: every disk.
    pub scan_disks: Vec<u64>,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            batch_bytes: 4 << 20,
            ps_cache_limit_bytes: 1 << 30,
            copy_chunk_bytes: 1 << 20,
            scan_interval_secs: None,
            scan_disks: Vec::new(),
        }
    }
}

#[derive(Debug, Clone)]
pub struct Addrs {
    pub agent_http: SocketAddr,
    pub agent_nbd: SocketAddr,
    pub agent_unix: PathBuf,
    pub ps_http: SocketAddr,
    pub ps_quic: SocketAddr,
    pub mt_http: SocketAddr,
    pub mt_quic: SocketAddr,
    pub mt_nbd: SocketAddr,
}

/// Where a deployment's components run when they are not all on this host's loopback: each in its
/// own host (network namespace) of a [`netns::Topology`], binding the wildcard address of `family`
/// and advertising its host's address.
#[derive(Debug, Clone)]
pub struct Placement {
    pub family: netns::Family,
    pub agent: netns::Host,
    pub ps: netns::Host,
    pub mt: netns::Host,
}

impl Placement {
    fn host(&self, c: Component) -> Option<&netns::Host> {
        match c {
            Component::Agent => Some(&self.agent),
            Component::ProcessServer => Some(&self.ps),
            Component::MasterTarget => Some(&self.mt),
            Component::ConfigServer => None,
        }
    }

    /// The wildcard address of the family, at `port`.
    pub fn any(&self, port: u16) -> SocketAddr {
        match self.family {
            netns::Family::V4 => SocketAddr::from((std::net::Ipv4Addr::UNSPECIFIED, port)),
            netns::Family::V6 => SocketAddr::from((std::net::Ipv6Addr::UNSPECIFIED, port)),
        }
    }
}

/// Well-known ports of a placed deployment (each host has its own port space).
pub mod ports {
    pub const API: u16 = 9443;
    pub const AGENT_HTTP: u16 = 9101;
    pub const AGENT_NBD: u16 = 10810;
    pub const PS_HTTP: u16 = 9102;
    pub const PS_QUIC: u16 = 9201;
    pub const MT_HTTP: u16 = 9103;
    pub const MT_QUIC: u16 = 9202;
    pub const MT_NBD: u16 = 10809;
}

impl Addrs {
    /// Addresses of a placed deployment as its peers (and the tests) reach them.
    fn placed(root: &Path, p: &Placement) -> Addrs {
        let at = |h: &netns::Host, port| SocketAddr::new(h.ip(p.family), port);
        Addrs {
            agent_http: at(&p.agent, ports::AGENT_HTTP),
            agent_nbd: SocketAddr::from(([127, 0, 0, 1], ports::AGENT_NBD)),
            agent_unix: root.join("agent.sock"),
            ps_http: at(&p.ps, ports::PS_HTTP),
            ps_quic: at(&p.ps, ports::PS_QUIC),
            mt_http: at(&p.mt, ports::MT_HTTP),
            mt_quic: at(&p.mt, ports::MT_QUIC),
            mt_nbd: at(&p.mt, ports::MT_NBD),
        }
    }

    fn new(root: &Path) -> Addrs {
        Addrs {
            agent_http: free_tcp(),
            agent_nbd: free_tcp(),
            agent_unix: root.join("agent.sock"),
            ps_http: free_tcp(),
            ps_quic: free_udp(),
            mt_http: free_tcp(),
            mt_quic: free_udp(),
            mt_nbd: free_tcp(),
        }
    }
}

pub struct Local {
    /// The protected item the disks belong to: [`ITEM`] in static deployments, whatever the
    /// configuration server assigned in managed ones.
    pub item: u64,
    pub root: PathBuf,
    pub addrs: Addrs,
    pub disks: Vec<DiskSpec>,
    pub key_file: PathBuf,
    pub certs: PathBuf,
    /// Prefix of the node names ("" or, for a second site's components, "dr-").
    pub site: String,
    /// The certificate the components' APIs take (the configuration server's role): what srctl
    /// quickstart and the tests call the agent, process server and master target with.
    pub orchestrator: TlsPaths,
    /// Set when the components run in hosts of a [`netns::Topology`].
    pub placement: Option<Placement>,
    clients: std::sync::Mutex<Vec<(Role, http::Client)>>,
}

fn tls_toml(certs: &Path, name: &str) -> String {
    format!(
        "[tls]\nca = {:?}\ncert = {:?}\nkey = {:?}\n",
        certs.join("ca.pem"),
        certs.join(format!("{name}.pem")),
        certs.join(format!("{name}.key"))
    )
}

impl Local {
    /// Writes certificates, the item key and the three config files under `root`: a static deployment,
    /// no configuration server.
    pub fn create(root: &Path, disks: Vec<DiskSpec>, opts: &Options) -> anyhow::Result<Local> {
        std::fs::create_dir_all(root.join("logs")).with_context(|| format!("creating {}", root.display()))?;
        let certs = root.join("certs");
        let paths = generate_deployment(
            &certs,
            &[
                ("agent", Role::Agent),
                ("ps", Role::ProcessServer),
                ("mt", Role::MasterTarget),
                ("cs", Role::ConfigServer),
                ("nbd", Role::NbdClient),
            ],
        )?;
        let read = |p: &Path| std::fs::read_to_string(p).with_context(|| format!("reading {}", p.display()));
        sr_common::register::write_nbd_client_dir(
            &certs.join("nbd-client"),
            &read(&paths[4].ca)?,
            &read(&paths[4].cert)?,
            &read(&paths[4].key)?,
        )?;
        let (key, _) = sr_common::seal::ItemKey::generate();
        let key_file = certs.join(format!("item-{ITEM}.key"));
        sr_common::crashsafe::write_secret(&key_file, hex::encode(key).as_bytes())?;
        let local = Local {
            item: ITEM,
            root: root.to_path_buf(),
            addrs: Addrs::new(root),
            disks,
            key_file,
            certs,
            site: String::new(),
            orchestrator: paths[3].clone(),
            placement: None,
            clients: Default::default(),
        };
        local.write_configs(opts, None)?;
        Ok(local)
    }

    /// A deployment run by the configuration server at `api`: each component registers with a fresh
    /// one-time key (made with `admin_token`) through its own `register` subcommand, and its config
    /// names only the configuration server; items, keys and peers come from assignments.
    pub fn managed(
        root: &Path,
        disks: Vec<DiskSpec>,
        opts: &Options,
        cp: &ControlPlane,
        admin_token: &str,
    ) -> anyhow::Result<Local> {
        Local::managed_site(root, disks, opts, cp, admin_token, "")
    }

    /// [`Local::managed`] for another site of the same deployment: node names start with `site`.
    pub fn managed_site(
        root: &Path,
        disks: Vec<DiskSpec>,
        opts: &Options,
        cp: &ControlPlane,
        admin_token: &str,
        site: &str,
    ) -> anyhow::Result<Local> {
        Local::managed_placed(root, disks, opts, cp, admin_token, site, None)
    }

    /// [`Local::managed_site`] with the components on the hosts of `placement` (or on loopback).
    pub fn managed_placed(
        root: &Path,
        disks: Vec<DiskSpec>,
        opts: &Options,
        cp: &ControlPlane,
        admin_token: &str,
        site: &str,
        placement: Option<Placement>,
    ) -> anyhow::Result<Local> {
        let api = cp.api;
        let admin = cp.client(admin_token)?;
        std::fs::create_dir_all(root.join("logs")).with_context(|| format!("creating {}", root.display()))?;
        let certs = root.join("certs");
        let local = Local {
            item: ITEM,
            root: root.to_path_buf(),
            addrs: match &placement {
                Some(p) => Addrs::placed(root, p),
                None => Addrs::new(root),
            },
            disks,
            key_file: PathBuf::new(),
            certs,
            site: site.to_string(),
            orchestrator: cp.orchestrator(),
            placement,
            clients: Default::default(),
        };
        for c in [Component::MasterTarget, Component::ProcessServer, Component::Agent] {
            let role = match c {
                Component::Agent => "agent",
                Component::ProcessServer => "process-server",
                _ => "master-target",
            };
            let key = admin
                .post_json(api, "/v1/registration-keys", &serde_json::json!({ "role": role }))
                .with_context(|| format!("creating a registration key for {role}"))?;
            let key = key["key"].as_str().context("no key in the answer")?.to_string();
            let mut cmd = Command::new(bin_dir().join(c.binary()));
            cmd.args(["register", "--server", &api.to_string(), "--key", &key, "--name", &local.node(c), "--dir"]);
            cmd.arg(&local.certs);
            match c {
                Component::ProcessServer => cmd.args(["--address", &local.addrs.ps_quic.to_string()]),
                Component::MasterTarget => cmd.args(["--address", &local.addrs.mt_quic.to_string()]),
                _ => &mut cmd,
            };
            let out = cmd.output().with_context(|| format!("running {} register", c.binary()))?;
            if !out.status.success() {
                bail!("{} register failed: {}", c.binary(), String::from_utf8_lossy(&out.stderr));
            }
        }
        // A certificate for the NBD exports of the master target (replicas, failover disks).
        let (csr, key) = sr_common::ca::make_csr("nbd")?;
        let name = format!("{site}nbd-client");
        let v = admin
            .post_json(api, "/v1/nbd-clients", &serde_json::json!({ "name": name, "csr_pem": csr }))
            .context("issuing the NBD client certificate")?;
        let field = |k: &str| v[k].as_str().map(str::to_string).with_context(|| format!("no {k} in the answer"));
        sr_common::register::write_nbd_client_dir(
            &local.nbd_certs(),
            &field("ca_pem")?,
            &field("certificate_pem")?,
            &key,
        )?;
        local.write_configs(opts, Some(api))?;
        Ok(local)
    }

    /// Node name of a component in this deployment.
    pub fn node(&self, c: Component) -> String {
        let name = match c {
            Component::Agent => "agent-1",
            Component::ProcessServer => "ps-1",
            Component::MasterTarget => "mt-1",
            Component::ConfigServer => "cs",
        };
        format!("{}{name}", self.site)
    }

    fn write_configs(&self, opts: &Options, control_api: Option<SocketAddr>) -> anyhow::Result<()> {
        let (root, addrs, certs) = (&self.root, &self.addrs, &self.certs);
        // `key = "bind"`, and `advertise_key = "address"` when placed (bound to the wildcard).
        let listen = |key: &str, adv_key: &str, a: SocketAddr| match &self.placement {
            Some(p) => format!("{key} = \"{}\"\n{adv_key} = \"{a}\"\n", p.any(a.port())),
            None => format!("{key} = \"{a}\"\n"),
        };
        // Static deployments name certificates by role; registered ones by node name.
        let cert_name = |c: Component| if control_api.is_some() { self.node(c) } else { c.short().to_string() };
        let control = |c: Component| match control_api {
            Some(api) => {
                let _ = c;
                format!("[control]\nserver = \"{api}\"\npoll_secs = 1\n")
            }
            None => String::new(),
        };
        let item = if control_api.is_some() {
            String::new()
        } else {
            format!("[[item]]\nid = {ITEM}\nkey_file = {:?}\n", self.key_file)
        };
        let mt = format!(
            "node = \"{}\"\ndata_dir = {:?}\nexport_dir = {:?}\n{}{}{}{}\n{}{item}",
            self.node(Component::MasterTarget),
            root.join("mt"),
            self.export_dir(),
            listen("http", "advertise_http", addrs.mt_http),
            listen("listen", "advertise", addrs.mt_quic),
            listen("nbd_tcp", "advertise_nbd", addrs.mt_nbd),
            tls_toml(certs, &cert_name(Component::MasterTarget)),
            control(Component::MasterTarget),
        );
        let static_mt =
            if control_api.is_some() { String::new() } else { format!("master_target = \"{}\"\n", addrs.mt_quic) };
        let ps = format!(
            "node = \"{}\"\ndata_dir = {:?}\n{}{}{static_mt}cache_limit_bytes = {}\n{}\n{}{item}",
            self.node(Component::ProcessServer),
            root.join("ps"),
            listen("http", "advertise_http", addrs.ps_http),
            listen("listen", "advertise", addrs.ps_quic),
            opts.ps_cache_limit_bytes,
            tls_toml(certs, &cert_name(Component::ProcessServer)),
            control(Component::ProcessServer),
        );
        let static_agent = if control_api.is_some() {
            String::new()
        } else {
            format!("item = {ITEM}\nprocess_server = \"{}\"\n", addrs.ps_quic)
        };
        let mut agent = format!(
            "node = \"{}\"\n{static_agent}data_dir = {:?}\n{}nbd_tcp = \"{}\"\nnbd_unix = {:?}\n{}\n{}[ship]\nbatch_bytes = {}\nwindow_bytes = {}\n[copy]\nchunk_bytes = {}\n",
            self.node(Component::Agent),
            root.join("agent"),
            listen("http", "advertise_http", addrs.agent_http),
            addrs.agent_nbd,
            addrs.agent_unix,
            tls_toml(certs, &cert_name(Component::Agent)),
            control(Component::Agent),
            opts.batch_bytes,
            (opts.batch_bytes * 8).max(32 << 20),
            opts.copy_chunk_bytes,
        );
        for d in &self.disks {
            agent.push_str(&format!("[[disk]]\nid = {}\nname = {:?}\npath = {:?}\n", d.id, d.name, d.path));
            let scanned = opts.scan_disks.is_empty() || opts.scan_disks.contains(&d.id);
            if let Some(i) = opts.scan_interval_secs.filter(|_| scanned) {
                agent.push_str(&format!("mode = \"scan\"\nscan_interval_secs = {i}\n"));
            }
        }
        for (name, text) in [("mt", mt), ("ps", ps), ("agent", agent)] {
            sr_common::crashsafe::write_file(&root.join(format!("{name}.toml")), text.as_bytes())?;
        }
        Ok(())
    }

    /// Certificate paths of the component whose files are named `name` in this deployment.
    pub fn tls(&self, name: &str) -> sr_common::tls::TlsPaths {
        sr_common::tls::TlsPaths {
            ca: self.certs.join("ca.pem"),
            cert: self.certs.join(format!("{name}.pem")),
            key: self.certs.join(format!("{name}.key")),
        }
    }

    pub fn config(&self, c: Component) -> PathBuf {
        self.root.join(format!("{}.toml", c.short()))
    }

    pub fn log(&self, c: Component) -> PathBuf {
        self.root.join("logs").join(format!("{}.log", c.short()))
    }

    pub fn http(&self, c: Component) -> SocketAddr {
        match c {
            Component::Agent => self.addrs.agent_http,
            Component::ProcessServer => self.addrs.ps_http,
            Component::MasterTarget | Component::ConfigServer => self.addrs.mt_http,
        }
    }

    /// Starts a component's real binary, logging to `logs/NAME.log` (appended across restarts), and
    /// waits until its `/healthz` answers.
    pub fn start(&self, c: Component) -> anyhow::Result<Proc> {
        self.start_env(c, &[])
    }

    /// [`Local::start`] with extra environment variables.
    pub fn start_env(&self, c: Component, env: &[(&str, &str)]) -> anyhow::Result<Proc> {
        let ns = self.placement.as_ref().and_then(|p| p.host(c)).map(|h| h.ns.as_str());
        spawn_in(ns, c, &self.config(c), &self.log(c), self.http(c), &self.certs.join("ca.pem"), env)
    }

    /// An HTTPS client for component `c`'s API, holding the orchestrator's certificate (the one the
    /// components' APIs take).
    pub fn client(&self, c: Component) -> anyhow::Result<http::Client> {
        let role = role_of(c);
        let mut clients = self.clients.lock().expect("clients lock poisoned");
        if let Some((_, cl)) = clients.iter().find(|(r, _)| *r == role) {
            return Ok(cl.clone());
        }
        let id = Identity::load(&self.orchestrator)?;
        let cl = http::Client::new(ServerTrust::Mutual(&id, role))?;
        clients.push((role, cl.clone()));
        Ok(cl)
    }

    /// GET a JSON document from component `c`'s API.
    pub fn get(&self, c: Component, path: &str) -> anyhow::Result<serde_json::Value> {
        Ok(self.client(c)?.get_json(self.http(c), path)?)
    }

    /// POST JSON to component `c`'s API.
    pub fn post(&self, c: Component, path: &str, body: &serde_json::Value) -> anyhow::Result<serde_json::Value> {
        Ok(self.client(c)?.post_json(self.http(c), path, body)?)
    }

    /// Component `c`'s `/metrics` text.
    pub fn metrics(&self, c: Component) -> anyhow::Result<String> {
        let (code, text) = self.client(c)?.request(self.http(c), "GET", "/metrics", None)?;
        if code != 200 {
            bail!("GET /metrics of the {}: HTTP {code}", c.binary());
        }
        Ok(text)
    }

    pub fn agent_status(&self) -> anyhow::Result<serde_json::Value> {
        self.get(Component::Agent, "/v1/status")
    }

    /// Applied sequence number of a disk at the master target (0 when it has no replica yet).
    pub fn applied(&self, disk: u64) -> anyhow::Result<u64> {
        let s = self.get(Component::MasterTarget, "/v1/status")?;
        Ok(s["replicas"]
            .as_array()
            .into_iter()
            .flatten()
            .find(|r| r["item"] == self.item && r["disk"] == disk)
            .and_then(|r| r["applied_seq"].as_u64())
            .unwrap_or(0))
    }

    /// Where the master target writes exports (its `export_dir`).
    pub fn export_dir(&self) -> PathBuf {
        self.root.join("exports")
    }

    /// Path of a disk's replica file at the master target.
    pub fn replica_path(&self, disk: u64) -> PathBuf {
        self.root.join("mt").join("replicas").join(format!("item-{}-disk-{disk}.img", self.item))
    }

    /// The NBD client certificate (libnbd's and qemu's layout: ca-cert.pem, client-cert.pem,
    /// client-key.pem) that opens the master target's exports.
    pub fn nbd_certs(&self) -> PathBuf {
        self.certs.join("nbd-client")
    }

    /// An `nbds://` URI as the master target describes it, with this deployment's NBD client
    /// certificate: what nbdinfo and nbdcopy open (and [`qemu_image`] turns into qemu's options).
    pub fn with_certs(&self, uri: &str) -> String {
        format!("{uri}?tls-certificates={}", self.nbd_certs().display())
    }

    /// NBD URI of a disk's read-only replica export (over TLS, with the NBD client certificate).
    pub fn replica_uri(&self, disk: u64) -> String {
        self.with_certs(&format!("nbds://{}/item-{}-disk-{disk}", self.addrs.mt_nbd, self.item))
    }

    /// NBD URI of a protected disk's export at the agent (its Unix socket when the agent runs in a
    /// host of its own, whose loopback this process cannot reach).
    pub fn agent_uri(&self, name: &str) -> String {
        match self.placement {
            Some(_) => format!("nbd+unix:///{name}?socket={}", self.addrs.agent_unix.display()),
            None => format!("nbd://{}/{name}", self.addrs.agent_nbd),
        }
    }
}

/// How qemu (qemu-img, qemu-io) opens an image given as a file path, an `nbd://` URI or an
/// `nbds://host:port/export?tls-certificates=DIR` URI: `--object` arguments (the TLS credentials)
/// and the `--image-opts` string. qemu has no `nbds://` URI, so TLS is spelled out.
pub struct QemuImage {
    pub objects: Vec<String>,
    pub opts: String,
}

pub fn qemu_image(spec: &str, id: &str) -> anyhow::Result<QemuImage> {
    let nbd = |rest: &str, tls: Option<&str>| -> anyhow::Result<QemuImage> {
        let (hostport, export) = rest.split_once('/').unwrap_or((rest, ""));
        let (host, port) = hostport.rsplit_once(':').with_context(|| format!("{spec}: no port"))?;
        let host = host.trim_matches(['[', ']']);
        let mut opts = format!(
            "driver=raw,file.driver=nbd,file.server.type=inet,file.server.host={host},file.server.port={port},file.export={export}"
        );
        let mut objects = Vec::new();
        if let Some(dir) = tls {
            objects.push(format!("tls-creds-x509,id={id},dir={dir},endpoint=client"));
            opts.push_str(&format!(",file.tls-creds={id}"));
        }
        Ok(QemuImage { objects, opts })
    };
    if let Some(rest) = spec.strip_prefix("nbds://") {
        let (rest, query) = rest.split_once('?').with_context(|| format!("{spec}: no ?tls-certificates=DIR"))?;
        let dir = query.strip_prefix("tls-certificates=").with_context(|| format!("{spec}: no tls-certificates"))?;
        return nbd(rest, Some(dir));
    }
    if let Some(rest) = spec.strip_prefix("nbd://") {
        return nbd(rest, None);
    }
    if let Some(rest) = spec.strip_prefix("nbd+unix:///") {
        let (export, query) = rest.split_once('?').with_context(|| format!("{spec}: no ?socket=PATH"))?;
        let socket = query.strip_prefix("socket=").with_context(|| format!("{spec}: no socket"))?;
        let opts =
            format!("driver=raw,file.driver=nbd,file.server.type=unix,file.server.path={socket},file.export={export}");
        return Ok(QemuImage { objects: Vec::new(), opts });
    }
    if spec.contains("://") {
        bail!("{spec}: qemu_image takes a path, nbd://, nbds:// or nbd+unix:// URI");
    }
    Ok(QemuImage { objects: Vec::new(), opts: format!("driver=raw,file.driver=file,file.filename={spec}") })
}

/// The arguments of `qemu-img compare` for two images (paths or NBD URIs, see [`qemu_image`]).
pub fn qemu_compare_args(a: &str, b: &str) -> anyhow::Result<Vec<String>> {
    let (a, b) = (qemu_image(a, "tls-a")?, qemu_image(b, "tls-b")?);
    let mut args = vec!["compare".to_string()];
    for o in a.objects.iter().chain(&b.objects) {
        args.extend(["--object".to_string(), o.clone()]);
    }
    args.extend(["--image-opts".to_string(), a.opts, b.opts]);
    Ok(args)
}

fn role_of(c: Component) -> Role {
    match c {
        Component::Agent => Role::Agent,
        Component::ProcessServer => Role::ProcessServer,
        Component::MasterTarget => Role::MasterTarget,
        Component::ConfigServer => Role::ConfigServer,
    }
}

/// Whether `c`'s `/healthz` at `addr` answers over HTTPS with a certificate from the CA in `ca`.
pub fn healthy(c: Component, addr: SocketAddr, ca: &Path) -> bool {
    let Ok(pem) = std::fs::read_to_string(ca) else { return false };
    let Ok(client) = http::Client::new(ServerTrust::Ca(&pem, role_of(c))) else { return false };
    matches!(client.request(addr, "GET", "/healthz", None), Ok((200, _)))
}

/// Starts `c`'s binary with `config`, logging to `log_path` (appended), with extra environment
/// variables, and waits until `/healthz` on `http_addr` answers with a certificate from the CA in
/// `ca` (which the configuration server writes at its first start).
pub fn spawn_env(
    c: Component,
    config: &Path,
    log_path: &Path,
    http_addr: SocketAddr,
    ca: &Path,
    env: &[(&str, &str)],
) -> anyhow::Result<Proc> {
    spawn_in(None, c, config, log_path, http_addr, ca, env)
}

static DIE_WITH_PARENT: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// Services started from now on get SIGTERM when the thread that started them dies (the kernel's
/// parent-death signal), so that a command running them (`srctl local`, `srctl quickstart
/// --keep-running`) never leaves them behind, even when it is killed. Call it from the thread that
/// starts the services and outlives them (the main thread).
pub fn services_die_with_parent() {
    DIE_WITH_PARENT.store(true, std::sync::atomic::Ordering::Relaxed);
}

/// [`spawn_env`] inside network namespace `ns` (`ip netns exec` executes the binary itself, so the
/// process is the service's).
pub fn spawn_in(
    ns: Option<&str>,
    c: Component,
    config: &Path,
    log_path: &Path,
    http_addr: SocketAddr,
    ca: &Path,
    env: &[(&str, &str)],
) -> anyhow::Result<Proc> {
    let bin = bin_dir().join(c.binary());
    if !bin.exists() {
        bail!("{} not found: build the workspace first (cargo build --workspace)", bin.display());
    }
    let mut cmd = match ns {
        Some(ns) => {
            let mut cmd = Command::new("ip");
            cmd.args(["netns", "exec", ns]).arg(&bin);
            cmd
        }
        None => Command::new(&bin),
    };
    cmd.arg("run").arg("--config").arg(config);
    cmd.env("RUST_LOG", std::env::var("RUST_LOG").unwrap_or_else(|_| "info,quinn=warn,rustls=warn".into()));
    cmd.envs(env.iter().copied());
    start_until_healthy(cmd, c, log_path, http_addr, ca, &bin)
}

/// Runs a container's entrypoint as the chart gives it: `sh SCRIPT COMPONENT` in network namespace
/// `ns`, with only `env` (and PATH) in its environment. The script execs the service, so the process
/// is the service's once it registered.
pub fn spawn_entrypoint(
    ns: &str,
    c: Component,
    script: &Path,
    env: &[(String, String)],
    log_path: &Path,
    http_addr: SocketAddr,
    ca: &Path,
) -> anyhow::Result<Proc> {
    let cmd = entrypoint_command(ns, script, c.binary(), env);
    start_until_healthy(cmd, c, log_path, http_addr, ca, script)
}

/// `sh SCRIPT COMPONENT` in network namespace `ns` with only `env` and PATH: a container's command.
pub fn entrypoint_command(ns: &str, script: &Path, component: &str, env: &[(String, String)]) -> Command {
    let mut cmd = Command::new("ip");
    cmd.args(["netns", "exec", ns, "/bin/sh"]).arg(script).arg(component);
    cmd.env_clear().env("PATH", "/usr/local/bin:/usr/bin:/bin:/usr/sbin:/sbin");
    cmd.envs(env.iter().map(|(k, v)| (k, v)));
    cmd
}

fn start_until_healthy(
    mut cmd: Command,
    c: Component,
    log_path: &Path,
    http_addr: SocketAddr,
    ca: &Path,
    bin: &Path,
) -> anyhow::Result<Proc> {
    let log = std::fs::OpenOptions::new().create(true).append(true).open(log_path)?;
    if DIE_WITH_PARENT.load(std::sync::atomic::Ordering::Relaxed) {
        use std::os::unix::process::CommandExt;
        // SAFETY: prctl is async-signal-safe and touches only the child being started.
        unsafe {
            cmd.pre_exec(|| {
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
    }
    let child = cmd
        .stdin(Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log)
        .spawn()
        .with_context(|| format!("starting {}", bin.display()))?;
    let mut p = Proc { child: Some(child), component: c };
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if healthy(c, http_addr, ca) {
            return Ok(p);
        }
        if let Some(status) = p.child.as_mut().and_then(|ch| ch.try_wait().ok().flatten()) {
            bail!("{} exited with {status} while starting; see {}", c.binary(), log_path.display());
        }
        if Instant::now() > deadline {
            bail!("{} did not answer /healthz within 30 s; see {}", c.binary(), log_path.display());
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// A configuration server on loopback with its own data directory.
#[derive(Debug, Clone)]
pub struct ControlPlane {
    pub root: PathBuf,
    pub api: SocketAddr,
    /// The network namespace it runs in (None: this host's).
    pub ns: Option<String>,
}

impl ControlPlane {
    pub fn create(root: &Path) -> anyhow::Result<ControlPlane> {
        Self::create_with(root, "")
    }

    /// [`ControlPlane::create`] with extra lines for the config file.
    pub fn create_with(root: &Path, extra_toml: &str) -> anyhow::Result<ControlPlane> {
        std::fs::create_dir_all(root.join("logs")).with_context(|| format!("creating {}", root.display()))?;
        let api = free_tcp();
        let text =
            format!("data_dir = {:?}\nlisten = \"{api}\"\ncomponent_timeout_secs = 5\n{extra_toml}", root.join("cs"));
        sr_common::crashsafe::write_file(&root.join("cs.toml"), text.as_bytes())?;
        Ok(ControlPlane { root: root.to_path_buf(), api, ns: None })
    }

    /// A configuration server on `host` of a topology, listening on the wildcard address of `family`,
    /// its certificate naming the host's address.
    pub fn create_on(
        root: &Path,
        host: &netns::Host,
        family: netns::Family,
        extra_toml: &str,
    ) -> anyhow::Result<ControlPlane> {
        std::fs::create_dir_all(root.join("logs")).with_context(|| format!("creating {}", root.display()))?;
        let ip = host.ip(family);
        let any: std::net::IpAddr = match family {
            netns::Family::V4 => std::net::Ipv4Addr::UNSPECIFIED.into(),
            netns::Family::V6 => std::net::Ipv6Addr::UNSPECIFIED.into(),
        };
        let text = format!(
            "data_dir = {:?}\nlisten = \"{}\"\napi_names = [\"{ip}\"]\ncomponent_timeout_secs = 5\n{extra_toml}",
            root.join("cs"),
            SocketAddr::new(any, ports::API)
        );
        sr_common::crashsafe::write_file(&root.join("cs.toml"), text.as_bytes())?;
        Ok(ControlPlane { root: root.to_path_buf(), api: SocketAddr::new(ip, ports::API), ns: Some(host.ns.clone()) })
    }

    pub fn start(&self) -> anyhow::Result<Proc> {
        let cfg = self.root.join("cs.toml");
        spawn_in(self.ns.as_deref(), Component::ConfigServer, &cfg, &self.log(), self.api, &self.ca(), &[])
    }

    /// The deployment CA's certificate, written at the server's first start.
    pub fn ca(&self) -> PathBuf {
        self.root.join("cs").join("ca").join("ca.pem")
    }

    /// The configuration server's own certificate (the one the components' APIs take).
    pub fn orchestrator(&self) -> TlsPaths {
        let dir = self.root.join("cs").join("ca");
        TlsPaths { ca: dir.join("ca.pem"), cert: dir.join("config-server.pem"), key: dir.join("config-server.key") }
    }

    /// An HTTPS client of the API, checking the server against the deployment CA, sending `token`.
    pub fn client(&self, token: &str) -> anyhow::Result<http::Client> {
        let ca = self.ca();
        let pem = std::fs::read_to_string(&ca).with_context(|| format!("reading {}", ca.display()))?;
        Ok(http::Client::new(ServerTrust::Ca(&pem, Role::ConfigServer))?.with_token(token))
    }

    pub fn log(&self) -> PathBuf {
        self.root.join("logs").join("cs.log")
    }

    /// The admin token written at first start.
    pub fn admin_token(&self) -> anyhow::Result<String> {
        let p = self.root.join("cs").join("admin.token");
        Ok(std::fs::read_to_string(&p).with_context(|| format!("reading {}", p.display()))?.trim().to_string())
    }
}

/// A running service process. Dropping it kills the process.
pub struct Proc {
    child: Option<Child>,
    pub component: Component,
}

impl Proc {
    /// SIGKILL, as a crash would.
    pub fn kill(mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// SIGTERM and wait for a clean exit.
    pub fn stop(mut self) -> anyhow::Result<()> {
        if let Some(mut c) = self.child.take() {
            // SAFETY: sending a signal to our own child process id.
            unsafe { libc::kill(c.id() as i32, libc::SIGTERM) };
            let deadline = Instant::now() + Duration::from_secs(20);
            loop {
                if let Some(st) = c.try_wait()? {
                    if !st.success() {
                        bail!("{} exited with {st}", self.component.binary());
                    }
                    return Ok(());
                }
                if Instant::now() > deadline {
                    let _ = c.kill();
                    let _ = c.wait();
                    bail!("{} did not stop within 20 s of SIGTERM", self.component.binary());
                }
                std::thread::sleep(Duration::from_millis(50));
            }
        }
        Ok(())
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(|c| c.id())
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}
