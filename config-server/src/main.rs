use clap::Parser;
use std::path::PathBuf;

/// Configuration server: registration, inventory, policies, protection lifecycle and jobs.
#[derive(Parser)]
#[command(version)]
enum Cli {
    /// Runs the configuration server with a configuration file.
    Run {
        #[arg(long, short)]
        config: PathBuf,
    },
}

fn main() -> std::process::ExitCode {
    sr_common::telemetry::init_logging_for("config-server");
    let Cli::Run { config } = Cli::parse();
    let cfg = match config_server::config::CsConfig::load(&config) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("error: {e:#}");
            return std::process::ExitCode::from(2);
        }
    };
    sr_common::service::main(|shutdown| config_server::run(cfg, shutdown))
}
