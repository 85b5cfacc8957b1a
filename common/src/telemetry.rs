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
        .route("/metrics", axum::routing::get(move || std::future::ready(handle.render())))
        .route("/healthz", axum::routing::get(|| std::future::ready("ok\n")))
        .merge(extra);
    crate::https::serve(addr, id, app, guard, shutdown).await
}
