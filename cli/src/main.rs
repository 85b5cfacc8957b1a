//! `srctl`: the operator's command line.

mod quickstart;

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
    /// process-server, master-target).
    Certs {
        #[arg(long)]
        dir: PathBuf,
        #[arg(required = true)]
        nodes: Vec<String>,
    },
    /// Shows a service's status (its operations endpoint, for example 127.0.0.1:9101).
    Status { endpoint: SocketAddr },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let json = cli.output == Output::Json;
    let res = match cli.cmd {
        Cmd::Quickstart(a) => quickstart::run(a, json),
        Cmd::Certs { dir, nodes } => certs(&dir, &nodes, json),
        Cmd::Status { endpoint } => sr_common::http::get_json(endpoint, "/v1/status").map(|v| {
            println!("{}", serde_json::to_string_pretty(&v).expect("JSON value prints"));
        }),
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
        let role = match role {
            "agent" => Role::Agent,
            "process-server" => Role::ProcessServer,
            "master-target" => Role::MasterTarget,
            "config-server" => Role::ConfigServer,
            other => {
                anyhow::bail!("{n:?}: unknown role {other:?} (agent, process-server, master-target, config-server)")
            }
        };
        if name.is_empty() || !name.chars().all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_') {
            anyhow::bail!("{n:?}: a name is letters, digits, '-' and '_'");
        }
        parsed.push((name, role));
    }
    let paths = sr_common::tls::generate_deployment(dir, &parsed)?;
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
