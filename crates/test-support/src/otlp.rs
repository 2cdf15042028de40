//! A stand-in OpenTelemetry collector: OTLP/gRPC on a real socket, built from OpenTelemetry's
//! own protocol definitions (no collector can be installed here). It records every span it
//! receives, with the `service.name` of the span's resource.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{
    TraceService, TraceServiceServer,
};
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTraceServiceRequest, ExportTraceServiceResponse,
};
use opentelemetry_proto::tonic::common::v1::any_value::Value;
pub use opentelemetry_proto::tonic::trace::v1::Span;
pub use opentelemetry_proto::tonic::trace::v1::span::SpanKind;

/// A running collector; it serves on its own thread until the process ends.
#[derive(Debug, Clone)]
pub struct OtlpCollector {
    address: SocketAddr,
    spans: Arc<Mutex<Vec<(String, Span)>>>,
}

#[derive(Debug, Clone)]
struct Receiver {
    spans: Arc<Mutex<Vec<(String, Span)>>>,
}

#[tonic::async_trait]
impl TraceService for Receiver {
    async fn export(
        &self,
        request: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        let mut spans = self.spans.lock().unwrap_or_else(|e| e.into_inner());
        for resource_spans in request.into_inner().resource_spans {
            let service = resource_spans
                .resource
                .iter()
                .flat_map(|r| r.attributes.iter())
                .find(|kv| kv.key == "service.name")
                .and_then(
                    |kv| match kv.value.as_ref().and_then(|v| v.value.as_ref()) {
                        Some(Value::StringValue(name)) => Some(name.clone()),
                        _ => None,
                    },
                )
                .unwrap_or_default();
            for scope in resource_spans.scope_spans {
                spans.extend(scope.spans.into_iter().map(|span| (service.clone(), span)));
            }
        }
        Ok(tonic::Response::new(ExportTraceServiceResponse {
            partial_success: None,
        }))
    }
}

impl OtlpCollector {
    /// Starts a collector on a free loopback port, on a thread and runtime of its own (so it
    /// works from synchronous tests and async ones alike).
    pub fn start() -> OtlpCollector {
        let spans = Arc::new(Mutex::new(Vec::new()));
        let (ready, address) = std::sync::mpsc::channel();
        let receiver = Receiver {
            spans: spans.clone(),
        };
        std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("collector runtime");
            runtime.block_on(async move {
                let incoming = tonic::transport::server::TcpIncoming::bind(SocketAddr::from((
                    [127, 0, 0, 1],
                    0,
                )))
                .expect("collector port");
                ready
                    .send(incoming.local_addr().expect("collector address"))
                    .expect("collector start");
                let _ = tonic::transport::Server::builder()
                    .add_service(TraceServiceServer::new(receiver))
                    .serve_with_incoming(incoming)
                    .await;
            });
        });
        let address = address
            .recv_timeout(Duration::from_secs(10))
            .expect("the collector starts");
        OtlpCollector { address, spans }
    }

    /// The endpoint to give an OTLP/gRPC exporter.
    pub fn endpoint(&self) -> String {
        format!("http://{}", self.address)
    }

    /// Every span received so far, with its service name.
    pub fn spans(&self) -> Vec<(String, Span)> {
        self.spans.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Waits up to `timeout` for a span with this name and kind.
    pub fn wait_for(
        &self,
        name: &str,
        kind: SpanKind,
        timeout: Duration,
    ) -> Option<(String, Span)> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(found) = self
                .spans()
                .into_iter()
                .find(|(_, s)| s.name == name && s.kind == kind as i32)
            {
                return Some(found);
            }
            if Instant::now() > deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}
