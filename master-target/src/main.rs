fn main() -> std::process::ExitCode {
    sr_common::service::cli_main(
        "master-target",
        "Master target: applies replicated changes to replica disks and serves them",
        sr_common::wire::Role::MasterTarget,
        master_target::config::MtConfig::load,
        master_target::run,
    )
}
