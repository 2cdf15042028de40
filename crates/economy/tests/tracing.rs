//! Spans reach an OTLP collector over gRPC, and one trace runs from a caller's span through the
//! NATS request into the economy's handler (collector: `syntropism_test_support::OtlpCollector`).

mod common;

use std::time::Duration;

use common::*;
use syntropism_contracts::economy::agent;
use syntropism_contracts::pb;
use syntropism_platform::config::TelemetryConfig;
use syntropism_platform::telemetry::Telemetry;
use syntropism_test_support::OtlpCollector;
use syntropism_test_support::otlp::SpanKind;
use tracing::Instrument;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn spans_are_exported_over_otlp_and_one_trace_crosses_nats() {
    let collector = OtlpCollector::start();
    let telemetry = Telemetry::init(
        "economy",
        &TelemetryConfig {
            otlp_endpoint: Some(collector.endpoint()),
            ..TelemetryConfig::default()
        },
    )
    .expect("telemetry");

    let h = Harness::start().await;
    let alice = h.funded_agent(5 * CREDIT).await;
    let flow = tracing::info_span!("test.flow");
    let balance = h
        .client
        .call_as::<agent::Balance>(&alice, &pb::AgentBalanceRequest {})
        .instrument(flow)
        .await
        .unwrap();
    assert_eq!(balance.balance_micros, 5 * CREDIT);
    h.stop().await;
    // Flush: the batch processor exports whatever it holds.
    tokio::task::spawn_blocking(move || telemetry.shutdown())
        .await
        .unwrap();

    let find = |name: &str, kind: SpanKind| {
        collector
            .wait_for(name, kind, Duration::from_secs(10))
            .unwrap_or_else(|| {
                let names: Vec<_> = collector.spans().into_iter().map(|(_, s)| s.name).collect();
                panic!("no {kind:?} span {name:?} among {names:?}")
            })
    };
    let (service, flow) = find("test.flow", SpanKind::Internal);
    let (_, client) = find("agent.economy.balance", SpanKind::Client);
    let (_, server) = find("agent.economy.balance", SpanKind::Server);
    assert_eq!(service, "economy");
    assert_eq!(
        client.trace_id, flow.trace_id,
        "the call continues the caller's trace"
    );
    assert_eq!(client.parent_span_id, flow.span_id);
    assert_eq!(
        server.trace_id, flow.trace_id,
        "the handler continues it across NATS"
    );
    assert_eq!(
        server.parent_span_id, client.span_id,
        "the handler's parent is the client span"
    );
}
