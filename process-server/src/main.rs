fn main() -> std::process::ExitCode {
    sr_common::service::cli_main(
        "process-server",
        "Process server: caches, compresses, encrypts and forwards agents' change streams",
        sr_common::wire::Role::ProcessServer,
        process_server::config::PsConfig::load,
        process_server::run,
    )
}
