use clap::Parser;
use std::path::PathBuf;

/// Process server: caches, compresses, encrypts and forwards agents' change streams.
#[derive(Parser)]
#[command(version)]
enum Cli {
    /// Runs the process server with a configuration file.
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
        Cli::Register(a) => return sr_common::register::main(sr_common::wire::Role::ProcessServer, &a),
    };
    let cfg = match process_server::config::PsConfig::load(&config) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("error: {e:#}");
            return std::process::ExitCode::from(2);
        }
    };
    sr_common::service::main(|shutdown| process_server::run(cfg, shutdown))
}
