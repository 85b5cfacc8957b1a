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
}

fn main() -> std::process::ExitCode {
    sr_common::telemetry::init_logging();
    let Cli::Run { config } = Cli::parse();
    let cfg = match master_target::config::MtConfig::load(&config) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("error: {e:#}");
            return std::process::ExitCode::from(2);
        }
    };
    sr_common::service::main(|shutdown| master_target::run(cfg, shutdown))
}
