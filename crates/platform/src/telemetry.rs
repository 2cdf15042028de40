//! `tracing` for every service: pretty or JSON logs, OpenTelemetry spans, and an OTLP exporter
//! when an endpoint is configured. The OpenTelemetry layer is always installed so trace context
//! propagates through NATS headers even when nothing is exported.

use std::sync::OnceLock;
use std::time::Duration;

use anyhow::Context as _;
use opentelemetry::trace::TracerProvider as _;
use opentelemetry_otlp::WithExportConfig;
use opentelemetry_sdk::Resource;
use opentelemetry_sdk::error::OTelSdkResult;
use opentelemetry_sdk::trace::SdkTracerProvider;
use opentelemetry_sdk::trace::{SpanData, SpanExporter};
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{EnvFilter, Layer, Registry};

use crate::config::{LogFormat, TelemetryConfig};

/// The runtime OTLP exports run on. The SDK's batch processor exports from a plain OS thread
/// (driving the export future with a bare executor), but the gRPC exporter needs a Tokio reactor:
/// without one the processor's thread panics and every span is silently dropped. Created once
/// and never dropped (dropping a runtime inside async code panics).
fn export_runtime() -> anyhow::Result<&'static tokio::runtime::Runtime> {
    static RUNTIME: OnceLock<tokio::runtime::Runtime> = OnceLock::new();
    if let Some(runtime) = RUNTIME.get() {
        return Ok(runtime);
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .thread_name("otlp-export")
        .enable_all()
        .build()
        .context("cannot start the OTLP export runtime")?;
    Ok(RUNTIME.get_or_init(|| runtime))
}

/// The OTLP exporter, driven on [`export_runtime`] whatever thread asks it to export.
#[derive(Debug)]
struct ReactorExporter(opentelemetry_otlp::SpanExporter);

impl SpanExporter for ReactorExporter {
    async fn export(&self, batch: Vec<SpanData>) -> OTelSdkResult {
        match export_runtime() {
            // The batch processor's own thread is outside any runtime, so blocking is fine.
            Ok(runtime) if tokio::runtime::Handle::try_current().is_err() => {
                runtime.block_on(self.0.export(batch))
            }
            // Already inside a runtime (a synchronous processor in async code): just await.
            _ => self.0.export(batch).await,
        }
    }

    fn shutdown_with_timeout(&self, timeout: Duration) -> OTelSdkResult {
        self.0.shutdown_with_timeout(timeout)
    }

    fn force_flush(&self) -> OTelSdkResult {
        self.0.force_flush()
    }

    fn set_resource(&mut self, resource: &Resource) {
        self.0.set_resource(resource);
    }
}

/// Keeps the tracer provider alive; [`Telemetry::shutdown`] flushes pending spans.
#[derive(Debug)]
pub struct Telemetry {
    provider: SdkTracerProvider,
}

impl Telemetry {
    /// Installs the global subscriber for `service`. A second call in the same process (tests
    /// starting several services) keeps the first subscriber and returns a provider that only
    /// needs shutting down.
    pub fn init(service: &str, config: &TelemetryConfig) -> anyhow::Result<Telemetry> {
        let mut builder = SdkTracerProvider::builder().with_resource(
            Resource::builder()
                .with_service_name(service.to_owned())
                .build(),
        );
        if let Some(endpoint) = &config.otlp_endpoint {
            // The gRPC channel binds to the runtime it is built in: build it in the export runtime.
            let _context = export_runtime()?.enter();
            let exporter = opentelemetry_otlp::SpanExporter::builder()
                .with_tonic()
                .with_endpoint(endpoint.clone())
                .build()
                .with_context(|| format!("telemetry.otlp_endpoint: cannot export to {endpoint}"))?;
            builder = builder.with_batch_exporter(ReactorExporter(exporter));
        }
        let provider = builder.build();
        let tracer = provider.tracer(service.to_owned());

        let filter = std::env::var("RUST_LOG")
            .ok()
            .and_then(|f| EnvFilter::try_new(f).ok())
            .unwrap_or_else(|| EnvFilter::new(&config.log_filter));
        let logs: Box<dyn Layer<Registry> + Send + Sync> = match config.log_format {
            LogFormat::Pretty => Box::new(tracing_subscriber::fmt::layer().with_target(true)),
            LogFormat::Json => Box::new(
                tracing_subscriber::fmt::layer()
                    .json()
                    .flatten_event(true)
                    .with_current_span(true),
            ),
        };
        let installed = tracing_subscriber::registry()
            .with(logs)
            .with(tracing_opentelemetry::layer().with_tracer(tracer))
            .with(filter)
            .try_init();
        if installed.is_err() {
            tracing::debug!("a tracing subscriber was already installed; keeping it");
        }
        Ok(Telemetry { provider })
    }

    /// Flushes and stops the exporter.
    pub fn shutdown(self) {
        if let Err(error) = self.provider.shutdown() {
            eprintln!("telemetry shutdown: {error}");
        }
    }
}
