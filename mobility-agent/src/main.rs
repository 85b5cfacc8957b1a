use clap::Parser;
use std::path::PathBuf;

/// Mobility agent: captures every write of the protected disks and ships it to a process server.
#[derive(Parser)]
#[command(version)]
enum Cli {
    /// Runs the agent with a configuration file.
    Run {
        #[arg(long, short)]
        config: PathBuf,
    },
    /// Trades a one-time registration key for this component's certificate.
    Register(sr_common::register::RegisterArgs),
}

fn main() -> std::process::ExitCode {
    sr_common::telemetry::init_logging();
    let config = match Cli::parse() {
        Cli::Run { config } => config,
        Cli::Register(a) => return sr_common::register::main(sr_common::wire::Role::Agent, &a),
    };
    let cfg = match mobility_agent::config::AgentConfig::load(&config) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("error: {e:#}");
            return std::process::ExitCode::from(2);
        }
    };
    sr_common::service::main(|shutdown| mobility_agent::run(cfg, shutdown))
}
