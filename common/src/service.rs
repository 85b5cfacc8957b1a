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
    tune_allocator();
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
    match rt.block_on(run(shutdown)) {
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

/// Batches are buffers of a few MiB allocated and freed continuously. glibc serves such sizes with a
/// fresh mmap each time by default, so every batch pays page faults and page zeroing for each of its
/// pages; serving them from the heap and keeping some freed memory for reuse removes that cost.
pub fn tune_allocator() {
    // SAFETY: mallopt only changes allocator parameters; called before the service allocates heavily.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 64 << 20);
        libc::mallopt(libc::M_TRIM_THRESHOLD, 32 << 20);
        // Every thread's arena would keep its own freed batches: two arenas bound what is kept.
        libc::mallopt(libc::M_ARENA_MAX, 2);
    }
}
