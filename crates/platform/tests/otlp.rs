//! OTLP export works wherever telemetry is initialised: the SDK exports from a thread of its own,
//! which has no Tokio reactor, so the gRPC exporter must bring one.

use std::time::Duration;

use syntropism_platform::config::TelemetryConfig;
use syntropism_platform::telemetry::Telemetry;
use syntropism_test_support::OtlpCollector;
use syntropism_test_support::otlp::SpanKind;

#[test]
fn spans_are_exported_when_telemetry_starts_outside_any_runtime() {
    let collector = OtlpCollector::start();
    let telemetry = Telemetry::init(
        "platform-test",
        &TelemetryConfig {
            otlp_endpoint: Some(collector.endpoint()),
            ..TelemetryConfig::default()
        },
    )
    .expect("telemetry starts without a runtime");
    tracing::info_span!("outside.runtime").in_scope(|| tracing::info!("inside the span"));
    telemetry.shutdown();
    let (service, span) = collector
        .wait_for(
            "outside.runtime",
            SpanKind::Internal,
            Duration::from_secs(10),
        )
        .expect("the span reached the collector");
    assert_eq!(service, "platform-test");
    assert_eq!(span.trace_id.len(), 16);
}
