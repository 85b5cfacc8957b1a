//! Logs, metrics and the operations HTTP endpoint every service serves:
//! `/metrics` (Prometheus text format) and `/healthz`, plus routes the service adds (status, exports).

use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};
use std::net::SocketAddr;
use std::sync::OnceLock;
use tokio_util::sync::CancellationToken;

/// Logs to stderr, filtered by `RUST_LOG` (default `info`).
pub fn init_logging() {
    init_logging_for("sr")
}

static PROVIDER: OnceLock<opentelemetry_sdk::trace::SdkTracerProvider> = OnceLock::new();

/// Logs to stderr, filtered by `RUST_LOG` (default `info`); and, when the standard
/// `OTEL_EXPORTER_OTLP_ENDPOINT` (or `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`) is set, exports spans by
/// OTLP over HTTP as `service`. Call [`shutdown`] before exiting so the last spans are sent.
pub fn init_logging_for(service: &str) {
    use std::io::IsTerminal;
    use tracing_subscriber::layer::SubscriberExt;
    use tracing_subscriber::util::SubscriberInitExt;
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info,quinn=warn,rustls=warn"));
    let fmt = tracing_subscriber::fmt::layer().with_ansi(std::io::stderr().is_terminal()).with_writer(std::io::stderr);
    let otel = otlp_tracer(service).map(|t| tracing_opentelemetry::layer().with_tracer(t));
    let _ = tracing_subscriber::registry().with(filter).with(fmt).with(otel).try_init();
}

fn otlp_tracer(service: &str) -> Option<opentelemetry_sdk::trace::SdkTracer> {
    use opentelemetry::trace::TracerProvider;
    let configured = ["OTEL_EXPORTER_OTLP_ENDPOINT", "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"]
        .iter()
        .any(|v| std::env::var_os(v).is_some_and(|s| !s.is_empty()));
    if !configured {
        return None;
    }
    crate::tls::install_default_provider();
    let exporter = match opentelemetry_otlp::SpanExporter::builder().with_http().build() {
        Ok(e) => e,
        Err(e) => {
            eprintln!("warning: OTLP trace export is configured but cannot start: {e}");
            return None;
        }
    };
    let resource = opentelemetry_sdk::Resource::builder().with_service_name(service.to_string()).build();
    let provider = opentelemetry_sdk::trace::SdkTracerProvider::builder()
        .with_batch_exporter(exporter)
        .with_resource(resource)
        .build();
    let tracer = provider.tracer(service.to_string());
    let _ = PROVIDER.set(provider);
    Some(tracer)
}

/// Sends the spans still buffered (OTLP), if trace export is on.
pub fn shutdown() {
    if let Some(p) = PROVIDER.get() {
        if let Err(e) = p.shutdown() {
            eprintln!("warning: flushing OTLP spans failed: {e}");
        }
    }
}

static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();

/// Installs the process-wide Prometheus recorder once and returns its handle.
pub fn metrics_handle() -> PrometheusHandle {
    HANDLE
        .get_or_init(|| {
            let buckets = [0.0005, 0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1.0, 5.0, 10.0, 60.0];
            let recorder =
                PrometheusBuilder::new().set_buckets(&buckets).expect("bucket list is not empty").build_recorder();
            let handle = recorder.handle();
            // Another recorder may already be installed (several services in one test process).
            let _ = metrics::set_global_recorder(recorder);
            handle
        })
        .clone()
}

/// Serves `/metrics`, `/healthz` and `extra` over HTTPS (see [`crate::https`]) on `addr` until
/// `shutdown`, with `id`'s certificate; `guard` says who may call `extra`. Returns the bound address.
pub async fn serve_http(
    addr: SocketAddr,
    id: std::sync::Arc<crate::tls::Identity>,
    extra: axum::Router,
    guard: crate::https::Guard,
    shutdown: CancellationToken,
) -> anyhow::Result<SocketAddr> {
    let handle = metrics_handle();
    let app = axum::Router::new()
        .route(
            "/metrics",
            axum::routing::get(move || {
                sample_process();
                std::future::ready(handle.render())
            }),
        )
        .route("/healthz", axum::routing::get(|| std::future::ready("ok\n")))
        .merge(extra);
    crate::https::serve(addr, id, app, guard, shutdown).await
}

/// CPU time this process has used, user and system, in milliseconds (a counter; `rate()/1000` is
/// cores busy).
pub const PROCESS_CPU_MILLISECONDS: &str = "sr_process_cpu_milliseconds_total";
/// This process's resident memory in bytes.
pub const PROCESS_RESIDENT_BYTES: &str = "sr_process_resident_memory_bytes";

/// Sets the process gauges from `/proc/self` (Linux; nothing elsewhere).
pub fn sample_process() {
    // SAFETY: sysconf takes no pointers and only reads a constant of the system.
    let (ticks, page) = unsafe { (libc::sysconf(libc::_SC_CLK_TCK), libc::sysconf(libc::_SC_PAGESIZE)) };
    let stat = std::fs::read_to_string("/proc/self/stat").ok();
    if let Some(cpu) = stat.as_deref().and_then(|s| cpu_seconds(s, ticks)) {
        metrics::counter!(PROCESS_CPU_MILLISECONDS).absolute((cpu * 1000.0) as u64);
    }
    let statm = std::fs::read_to_string("/proc/self/statm").ok();
    if let Some(pages) = statm.as_deref().and_then(|s| s.split_whitespace().nth(1)?.parse::<u64>().ok()) {
        metrics::gauge!(PROCESS_RESIDENT_BYTES).set((pages * page.max(1) as u64) as f64);
    }
}

/// User plus system CPU seconds from the text of `/proc/PID/stat`, given the clock ticks per second.
/// The command name (field 2) may hold spaces and parentheses: fields are counted after its last `)`.
pub fn cpu_seconds(stat: &str, ticks_per_sec: i64) -> Option<f64> {
    if ticks_per_sec <= 0 {
        return None;
    }
    let rest = &stat[stat.rfind(')')? + 1..];
    let mut f = rest.split_whitespace();
    // After the name: state(3) ... utime is field 14 and stime field 15, so the 12th and 13th here.
    let utime: u64 = f.nth(11)?.parse().ok()?;
    let stime: u64 = f.next()?.parse().ok()?;
    Some((utime + stime) as f64 / ticks_per_sec as f64)
}

#[cfg(test)]
mod tests {
    #[test]
    fn cpu_seconds_reads_the_fields_after_the_name() {
        let stat = "4242 (a (b) c) S 1 4242 4242 0 -1 4194560 1000 0 0 0 250 150 0 0 20 0 4 0 100 0 0";
        assert_eq!(super::cpu_seconds(stat, 100), Some(4.0));
        assert_eq!(super::cpu_seconds("4242 (x) S 1", 100), None);
        assert_eq!(super::cpu_seconds(stat, 0), None);
        assert_eq!(super::cpu_seconds("no name here", 100), None);
    }
}
