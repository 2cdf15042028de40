//! `tracing` for every service: pretty or JSON logs, OpenTelemetry spans, and an OTLP exporter
//! when an endpoint is configured. The OpenTelemetry layer is always installed so trace context
//! propagates through NATS headers even when nothing is exported.

use anyhow::Context as _;
use opentelemetry::trace::TracerProvider as _;
use opentelemetry_otlp::WithExportConfig;
use opentelemetry_sdk::Resource;
use opentelemetry_sdk::trace::SdkTracerProvider;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{EnvFilter, Layer, Registry};

use crate::config::{LogFormat, TelemetryConfig};

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
            let exporter = opentelemetry_otlp::SpanExporter::builder()
                .with_tonic()
                .with_endpoint(endpoint.clone())
                .build()
                .with_context(|| format!("telemetry.otlp_endpoint: cannot export to {endpoint}"))?;
            builder = builder.with_batch_exporter(exporter);
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
