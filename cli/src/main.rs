//! `srctl`: the operator's command line.

mod api;
mod quickstart;
mod sites;

use clap::{Parser, Subcommand, ValueEnum};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

#[derive(Parser)]
#[command(version, about = "Operate a site recovery deployment")]
struct Cli {
    /// Output format for results.
    #[arg(long, short, global = true, value_enum, default_value_t = Output::Text)]
    output: Output,
    #[command(flatten)]
    conn: api::Conn,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Clone, Copy, ValueEnum, PartialEq, Eq)]
enum Output {
    Text,
    Json,
}

#[derive(Subcommand)]
enum Cmd {
    /// Runs the whole data path on this host with a sample ext4 disk, replicates it, writes to it
    /// through the agent, and proves the replica equals the source.
    Quickstart(quickstart::Args),
    /// Makes a deployment CA and one certificate per component (NAME:ROLE, ROLE one of agent,
    /// process-server, master-target, config-server (what the components' APIs take), nbd-client
    /// (also written as DIR/NAME/ for libnbd and qemu)). Without a configuration server only.
    Certs {
        #[arg(long)]
        dir: PathBuf,
        #[arg(required = true)]
        nodes: Vec<String>,
    },
    /// Starts master target, process server and agent on loopback for the given disks (NAME=PATH)
    /// and runs until Ctrl-C or SIGTERM; prints the endpoints as one JSON line once all answer.
    Local {
        #[arg(long)]
        dir: PathBuf,
        #[arg(long = "disk", required = true)]
        disks: Vec<String>,
    },
    /// Registration keys for components.
    #[command(subcommand)]
    Keys(api::KeysCmd),
    /// API tokens.
    #[command(subcommand)]
    Tokens(api::TokensCmd),
    /// Registered agents, process servers and master targets.
    #[command(subcommand)]
    Components(api::ComponentsCmd),
    /// Certificates for clients of the master targets' NBD exports (failover disks over nbds://).
    #[command(subcommand)]
    NbdClients(api::NbdClientsCmd),
    /// Machines whose agents reported their disks.
    Machines,
    /// Replication policies.
    #[command(subcommand)]
    Policies(api::PoliciesCmd),
    /// Enables protection of a machine under a policy.
    Protect {
        #[arg(long)]
        machine: String,
        /// Policy id or name.
        #[arg(long)]
        policy: String,
        /// Follow the job with a progress bar until the item is protected.
        #[arg(long)]
        watch: bool,
    },
    /// Disables protection of an item.
    Unprotect { item: u64 },
    /// Resynchronizes an item now: checksums of its disks and replicas are compared and the blocks that
    /// differ are shipped.
    Resync {
        item: u64,
        /// Follow the job with a progress bar until the item is protected again.
        #[arg(long)]
        watch: bool,
        /// Copy the whole disk again into a new replica (a lost replica, a broken chain), instead of
        /// comparing checksums with the existing one.
        #[arg(long)]
        full: bool,
    },
    /// Protected items with their state and RPO.
    #[command(subcommand)]
    Items(api::ItemsCmd),
    /// Process servers: drain before removing one, balance after adding one.
    #[command(subcommand)]
    ProcessServers(api::ProcessServersCmd),
    /// Recovery points of an item: the retained range and the named points.
    Points { item: u64 },
    /// Brings an item's disks up, writable, at a recovery point while replication goes on, and prints
    /// the machine description (disks as NBD URIs, CPUs, memory, NICs). `--cleanup` discards them.
    TestFailover {
        item: u64,
        #[command(flatten)]
        point: api::PointArgs,
        /// Discard the test failover's disks instead.
        #[arg(long)]
        cleanup: bool,
    },
    /// Writes one disk of an item at a recovery point to a raw image (a path on the master target's host).
    Export {
        item: u64,
        #[arg(long)]
        disk: u64,
        #[arg(long)]
        path: String,
        /// raw (sparse) or qcow2.
        #[arg(long, default_value = "raw", value_parser = ["raw", "qcow2"])]
        format: String,
        #[command(flatten)]
        point: api::PointArgs,
    },
    /// Fail an item over to the recovery site: planned (the source is stopped and drained first: no data
    /// loss) or unplanned at a point (the latest by default). Follows the job.
    Failover {
        item: u64,
        #[arg(long)]
        planned: bool,
        #[command(flatten)]
        point: api::PointArgs,
        /// Before commit: bring the failed-over disks up at this other point instead (their writes are
        /// discarded).
        #[arg(long)]
        change_point: bool,
    },
    /// Make a failover final: the failed-over disks become plain files on the recovery site.
    Commit { item: u64 },
    /// Replicate back from the failed-over disks (only blocks changed since the failover). Follows the job.
    Reprotect {
        item: u64,
        /// The agent fronting the failed-over disks (after a failback: the original machine).
        #[arg(long)]
        machine: Option<String>,
        #[arg(long)]
        master_target: Option<String>,
        #[arg(long)]
        process_server: Option<String>,
    },
    /// Planned failover back to the primary site, then reprotect forward. Follows the job.
    Failback { item: u64 },
    /// Recovery plans: groups of items that fail over together, in order, with scripts and manual
    /// actions between groups.
    #[command(subcommand)]
    Plans(api::PlansCmd),
    /// Network mappings: the addresses failed-over machines take on the recovery site's networks.
    #[command(subcommand)]
    NetworkMappings(api::NetMapCmd),
    /// Jobs: list, show, watch.
    #[command(subcommand)]
    Jobs(api::JobsCmd),
    /// The event log.
    Events,
    /// Shows a component's status (its API endpoint, for example 127.0.0.1:9101). Its API takes the
    /// configuration server's certificate: `--cert`/`--key` (with `srctl local`, `DIR/certs/cs.pem`
    /// and `cs.key`) and the deployment CA (`--ca`).
    Status {
        endpoint: SocketAddr,
        #[arg(long)]
        cert: PathBuf,
        #[arg(long)]
        key: PathBuf,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let json = cli.output == Output::Json;
    if matches!(cli.cmd, Cmd::Quickstart(_) | Cmd::Local { .. }) {
        // The services these start go when srctl goes, however it goes.
        sr_devkit::services_die_with_parent();
    }
    let res = match cli.cmd {
        Cmd::Quickstart(a) => quickstart::run(a, json),
        Cmd::Certs { dir, nodes } => certs(&dir, &nodes, json),
        Cmd::Local { dir, disks } => local(&dir, &disks),
        Cmd::Keys(c) => api::Client::new(&cli.conn).and_then(|cl| api::keys(&cl, c, json)),
        Cmd::Tokens(c) => api::Client::new(&cli.conn).and_then(|cl| api::tokens(&cl, c, json)),
        Cmd::Components(c) => api::Client::new(&cli.conn).and_then(|cl| api::components(&cl, c, json)),
        Cmd::NbdClients(c) => api::Client::new(&cli.conn).and_then(|cl| api::nbd_clients(&cl, c, json)),
        Cmd::Machines => api::Client::new(&cli.conn).and_then(|cl| api::machines(&cl, json)),
        Cmd::Policies(c) => api::Client::new(&cli.conn).and_then(|cl| api::policies(&cl, c, json)),
        Cmd::Protect { machine, policy, watch } => {
            api::Client::new(&cli.conn).and_then(|cl| api::protect(&cl, &machine, &policy, watch, json))
        }
        Cmd::Unprotect { item } => api::Client::new(&cli.conn).and_then(|cl| api::unprotect(&cl, item, json)),
        Cmd::Resync { item, watch, full } => {
            api::Client::new(&cli.conn).and_then(|cl| api::resync(&cl, item, watch, full, json))
        }
        Cmd::Items(c) => api::Client::new(&cli.conn).and_then(|cl| api::items(&cl, c, json)),
        Cmd::ProcessServers(c) => api::Client::new(&cli.conn).and_then(|cl| api::process_servers(&cl, c, json)),
        Cmd::Points { item } => api::Client::new(&cli.conn).and_then(|cl| api::points(&cl, item, json)),
        Cmd::TestFailover { item, point, cleanup } => {
            api::Client::new(&cli.conn).and_then(|cl| api::test_failover(&cl, item, &point, cleanup, json))
        }
        Cmd::Export { item, disk, path, format, point } => {
            api::Client::new(&cli.conn).and_then(|cl| api::export(&cl, item, disk, &path, &format, &point, json))
        }
        Cmd::Failover { item, planned, point, change_point } => {
            api::Client::new(&cli.conn).and_then(|cl| api::failover(&cl, item, planned, &point, change_point, json))
        }
        Cmd::Commit { item } => api::Client::new(&cli.conn).and_then(|cl| api::commit(&cl, item, json)),
        Cmd::Reprotect { item, machine, master_target, process_server } => api::Client::new(&cli.conn)
            .and_then(|cl| api::reprotect(&cl, item, machine, master_target, process_server, json)),
        Cmd::Failback { item } => api::Client::new(&cli.conn).and_then(|cl| api::failback(&cl, item, json)),
        Cmd::Plans(c) => api::Client::new(&cli.conn).and_then(|cl| api::plans(&cl, c, json)),
        Cmd::NetworkMappings(c) => api::Client::new(&cli.conn).and_then(|cl| api::netmaps(&cl, c, json)),
        Cmd::Jobs(c) => api::Client::new(&cli.conn).and_then(|cl| api::jobs(&cl, c, json)),
        Cmd::Events => api::Client::new(&cli.conn).and_then(|cl| api::events(&cl, json)),
        Cmd::Status { endpoint, cert, key } => component_status(endpoint, cert, key, cli.conn.ca()),
    };
    match res {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn certs(dir: &std::path::Path, nodes: &[String], json: bool) -> anyhow::Result<()> {
    use sr_common::wire::Role;
    let mut parsed = Vec::new();
    for n in nodes {
        let Some((name, role)) = n.split_once(':') else {
            anyhow::bail!("{n:?}: write NAME:ROLE, for example ps-1:process-server");
        };
        let Some(role) = Role::from_name(role) else {
            anyhow::bail!(
                "{n:?}: unknown role {role:?} (agent, process-server, master-target, config-server, nbd-client)"
            )
        };
        if name.is_empty() || !name.chars().all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_') {
            anyhow::bail!("{n:?}: a name is letters, digits, '-' and '_'");
        }
        parsed.push((name, role));
    }
    let paths = sr_common::tls::generate_deployment(dir, &parsed)?;
    // An NBD client also gets the directory libnbd (`?tls-certificates=DIR`) and qemu read.
    for ((name, role), p) in parsed.iter().zip(&paths) {
        if *role == Role::NbdClient {
            let read = |f: &std::path::Path| {
                std::fs::read_to_string(f).map_err(|e| anyhow::anyhow!("reading {}: {e}", f.display()))
            };
            sr_common::register::write_nbd_client_dir(&dir.join(name), &read(&p.ca)?, &read(&p.cert)?, &read(&p.key)?)?;
        }
    }
    if json {
        println!("{}", serde_json::to_string_pretty(&paths)?);
    } else {
        for ((name, role), p) in parsed.iter().zip(&paths) {
            println!("{name} ({}): {} {}", role.name(), p.cert.display(), p.key.display());
        }
        println!("CA: {}", dir.join("ca.pem").display());
    }
    Ok(())
}

fn component_status(
    endpoint: SocketAddr,
    cert: PathBuf,
    key: PathBuf,
    ca: Option<&std::path::Path>,
) -> anyhow::Result<()> {
    let ca = anyhow::Context::context(ca, "pass --ca (the deployment CA certificate)")?.to_path_buf();
    let id = sr_common::tls::Identity::load(&sr_common::tls::TlsPaths { ca, cert, key })?;
    let client = sr_common::http::Client::new(sr_common::tls::ServerTrust::AnyComponent(&id))?;
    let v = client.get_json(endpoint, "/v1/status")?;
    println!("{}", serde_json::to_string_pretty(&v).expect("JSON value prints"));
    Ok(())
}

fn local(dir: &std::path::Path, disks: &[String]) -> anyhow::Result<()> {
    use sr_devkit::{Component, DiskSpec, Local, Options};
    let mut specs = Vec::new();
    for (i, d) in disks.iter().enumerate() {
        let Some((name, path)) = d.split_once('=') else { anyhow::bail!("--disk {d:?}: write NAME=PATH") };
        let path = std::fs::canonicalize(path).map_err(|e| anyhow::anyhow!("--disk {d:?}: {path}: {e}"))?;
        specs.push(DiskSpec { id: i as u64 + 1, name: name.to_string(), path });
    }
    std::fs::create_dir_all(dir)?;
    let dir = std::fs::canonicalize(dir)?;
    let local = Local::create(&dir, specs, &Options::default())?;
    let mut procs = Vec::new();
    for c in [Component::MasterTarget, Component::ProcessServer, Component::Agent] {
        procs.push(local.start(c)?);
    }
    let a = &local.addrs;
    let exports: Vec<_> =
        local.disks.iter().map(|d| (d.name.clone(), local.agent_uri(&d.name), local.replica_uri(d.id))).collect();
    println!(
        "{}",
        serde_json::json!({
            "agent_http": a.agent_http, "ps_http": a.ps_http, "mt_http": a.mt_http,
            "exports": exports.iter().map(|(n, u, r)| serde_json::json!({"name": n, "uri": u, "replica_uri": r})).collect::<Vec<_>>(),
            "logs": dir.join("logs"),
        })
    );
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    rt.block_on(async {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = term.recv() => {}
        }
        anyhow::Ok(())
    })?;
    for p in procs.into_iter().rev() {
        p.stop()?;
    }
    Ok(())
}
