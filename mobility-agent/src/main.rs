fn main() -> std::process::ExitCode {
    sr_common::service::cli_main(
        "mobility-agent",
        "Mobility agent: captures every write of the protected disks and ships it to a process server",
        sr_common::wire::Role::Agent,
        mobility_agent::config::AgentConfig::load,
        mobility_agent::run,
    )
}
