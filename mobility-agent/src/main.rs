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
}

fn main() -> std::process::ExitCode {
    sr_common::telemetry::init_logging();
    let Cli::Run { config } = Cli::parse();
    let cfg = match mobility_agent::config::AgentConfig::load(&config) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("error: {e:#}");
            return std::process::ExitCode::from(2);
        }
    };
    sr_common::service::main(|shutdown| mobility_agent::run(cfg, shutdown))
}
