//! What every service binary's `main` does after parsing its config: start the runtime, turn SIGINT
//! and SIGTERM into a cancellation, run the service, and report a failure with its whole cause chain.

use std::future::Future;
use std::process::ExitCode;
use tokio_util::sync::CancellationToken;

pub fn main<F, Fut>(run: F) -> ExitCode
where
    F: FnOnce(CancellationToken) -> Fut,
    Fut: Future<Output = anyhow::Result<()>>,
{
    tune_allocator(KEEP_FREE_BYTES);
    run_service(run)
}

fn run_service<F, Fut>(run: F) -> ExitCode
where
    F: FnOnce(CancellationToken) -> Fut,
    Fut: Future<Output = anyhow::Result<()>>,
{
    let rt = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let shutdown = CancellationToken::new();
    let stop = shutdown.clone();
    rt.spawn(async move {
        let mut term = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(s) => s,
            Err(e) => return tracing::error!(error = %e, "cannot watch SIGTERM"),
        };
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = term.recv() => {}
        }
        tracing::info!("stopping");
        stop.cancel();
    });
    let res = rt.block_on(run(shutdown));
    drop(rt);
    crate::telemetry::shutdown();
    match res {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{e:#}");
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// The error with which a spawned acknowledgement reader ended (it only ends on an error).
pub fn reader_ended(r: Result<anyhow::Result<()>, tokio::task::JoinError>) -> anyhow::Error {
    match r {
        Ok(Err(e)) => e,
        Ok(Ok(())) => anyhow::anyhow!("acknowledgement reader ended"),
        Err(e) => anyhow::anyhow!("acknowledgement reader failed: {e}"),
    }
}

/// Sleeps until `at`, or forever when there is nothing to wait for (a pure core's `poll_timeout`).
pub async fn sleep_until(at: Option<std::time::Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at.into()).await,
        None => std::future::pending().await,
    }
}

/// Freed memory a service's allocator keeps for reuse, at most, per arena (two arenas).
pub const KEEP_FREE_BYTES: usize = 32 << 20;

/// What the mobility agent keeps: it runs on the protected machine, whose memory is its workload's.
pub const AGENT_KEEP_FREE_BYTES: usize = 4 << 20;

/// Batches are buffers of a few MiB allocated and freed continuously. glibc serves such sizes with a
/// fresh mmap each time by default, so every batch pays page faults and page zeroing for each of its
/// pages; serving them from the heap and keeping up to `keep_free` of freed memory for reuse removes
/// most of that cost.
pub fn tune_allocator(keep_free: usize) {
    let keep = i32::try_from(keep_free).unwrap_or(i32::MAX);
    // SAFETY: mallopt only changes allocator parameters; called before the service allocates heavily.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 64 << 20);
        libc::mallopt(libc::M_TRIM_THRESHOLD, keep);
        // Every thread's arena would keep its own freed batches: two arenas bound what is kept.
        libc::mallopt(libc::M_ARENA_MAX, 2);
    }
}

/// Raises the soft limit on open files to the hard one, as servers do: connections, segment files
/// kept open for reading (the master target's undo segments) and journals all take descriptors, and
/// the soft default (often 1024) is a limit of interactive shells, not of the machine.
pub fn raise_open_files() {
    let mut lim = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: getrlimit/setrlimit read and write the rlimit struct given, nothing else.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) == 0 && lim.rlim_cur < lim.rlim_max {
            lim.rlim_cur = lim.rlim_max;
            if libc::setrlimit(libc::RLIMIT_NOFILE, &lim) != 0 {
                // Before logging is set up: straight to the service's stderr.
                eprintln!("warning: could not raise the open-files limit to the hard limit ({})", lim.rlim_max);
            }
        }
    }
}

/// The calling thread's nice value (Linux keeps one per thread, and a new thread starts with its
/// creator's).
pub fn thread_nice() -> std::io::Result<i32> {
    // SAFETY: gettid and getpriority act on the calling thread only; errno is the thread's own.
    unsafe {
        *libc::__errno_location() = 0;
        let now = libc::getpriority(libc::PRIO_PROCESS, libc::gettid() as libc::id_t);
        if now == -1 && *libc::__errno_location() != 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(now)
    }
}

/// Sets the calling thread's nice value, so that on a busy core it yields to threads of a lower one.
/// Raising it needs no privilege; lowering it does.
pub fn set_thread_nice(nice: i32) -> std::io::Result<()> {
    // SAFETY: gettid and setpriority act on the calling thread only and take no pointers.
    if unsafe { libc::setpriority(libc::PRIO_PROCESS, libc::gettid() as libc::id_t, nice) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// The command line every data-path service binary takes.
#[derive(clap::Parser)]
#[command(version)]
pub enum ServiceCli {
    /// Runs the service with a configuration file.
    Run {
        #[arg(long, short)]
        config: std::path::PathBuf,
    },
    /// Trades a one-time registration key for this component's certificate.
    Register(crate::register::RegisterArgs),
}

/// The whole `main` of a data-path service: parse the command line, then register, or load the config
/// (exit code 2 and the config error when it is bad) and [`main`] the service.
pub fn cli_main<C, F, Fut>(
    name: &'static str,
    about: &'static str,
    role: crate::wire::Role,
    load: impl FnOnce(&std::path::Path) -> anyhow::Result<C>,
    run: F,
) -> ExitCode
where
    F: FnOnce(C, CancellationToken) -> Fut,
    Fut: Future<Output = anyhow::Result<()>>,
{
    use clap::{CommandFactory, FromArgMatches};
    crate::telemetry::init_logging_for(name);
    let matches = ServiceCli::command().name(name).about(about).get_matches();
    let cli = ServiceCli::from_arg_matches(&matches).unwrap_or_else(|e| e.exit());
    let config = match cli {
        ServiceCli::Run { config } => config,
        ServiceCli::Register(a) => return crate::register::main(role, &a),
    };
    let cfg = match load(&config) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("error: {e:#}");
            return ExitCode::from(2);
        }
    };
    tune_allocator(if role == crate::wire::Role::Agent { AGENT_KEEP_FREE_BYTES } else { KEEP_FREE_BYTES });
    raise_open_files();
    run_service(|shutdown| run(cfg, shutdown))
}
