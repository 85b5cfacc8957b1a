use clap::Parser;
use std::path::PathBuf;

/// Master target: applies replicated changes to replica disks and serves them.
#[derive(Parser)]
#[command(version)]
enum Cli {
    /// Runs the master target with a configuration file.
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
        Cli::Register(a) => return sr_common::register::main(sr_common::wire::Role::MasterTarget, &a),
    };
    let cfg = match master_target::config::MtConfig::load(&config) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("error: {e:#}");
            return std::process::ExitCode::from(2);
        }
    };
    sr_common::service::main(|shutdown| master_target::run(cfg, shutdown))
}
