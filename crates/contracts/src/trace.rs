//! W3C trace context carried in NATS headers, both ways.

use async_nats::HeaderMap;
use opentelemetry::Context;
use opentelemetry::propagation::{Extractor, Injector, TextMapPropagator};
use opentelemetry::trace::TraceContextExt;
use opentelemetry_sdk::propagation::TraceContextPropagator;
use tracing_opentelemetry::OpenTelemetrySpanExt;

struct HeaderInjector<'a>(&'a mut HeaderMap);

impl Injector for HeaderInjector<'_> {
    fn set(&mut self, key: &str, value: String) {
        self.0.insert(key, value.as_str());
    }
}

struct HeaderExtractor<'a>(&'a HeaderMap);

impl Extractor for HeaderExtractor<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).map(|value| value.as_str())
    }

    fn keys(&self) -> Vec<&str> {
        // Only the two W3C keys matter to the propagator.
        [crate::headers::TRACEPARENT, crate::headers::TRACESTATE]
            .into_iter()
            .filter(|key| self.0.get(*key).is_some())
            .collect()
    }
}

/// Writes `cx`'s span context into `headers` (nothing when it carries no valid span).
pub fn inject(cx: &Context, headers: &mut HeaderMap) {
    if cx.span().span_context().is_valid() {
        TraceContextPropagator::new().inject_context(cx, &mut HeaderInjector(headers));
    }
}

/// Reads the remote span context from `headers` (an empty context when absent or malformed).
pub fn extract(headers: Option<&HeaderMap>) -> Context {
    match headers {
        Some(headers) => TraceContextPropagator::new().extract(&HeaderExtractor(headers)),
        None => Context::new(),
    }
}

/// The context of the current `tracing` span, as OpenTelemetry sees it.
pub fn current_context() -> Context {
    tracing::Span::current().context()
}

/// The `traceparent` of the current span, if it has a valid one.
pub fn current_traceparent() -> Option<String> {
    let mut headers = HeaderMap::new();
    inject(&current_context(), &mut headers);
    headers
        .get(crate::headers::TRACEPARENT)
        .map(|v| v.as_str().to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn extract_then_inject_keeps_the_trace_id() {
        let mut incoming = HeaderMap::new();
        incoming.insert(
            crate::headers::TRACEPARENT,
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
        );
        let cx = extract(Some(&incoming));
        assert!(cx.span().span_context().is_valid());
        let mut outgoing = HeaderMap::new();
        inject(&cx, &mut outgoing);
        let value = outgoing
            .get(crate::headers::TRACEPARENT)
            .unwrap()
            .as_str()
            .to_owned();
        assert!(
            value.contains("4bf92f3577b34da6a3ce929d0e0e4736"),
            "{value}"
        );
    }

    #[test]
    fn garbage_traceparent_is_ignored() {
        let mut incoming = HeaderMap::new();
        incoming.insert(crate::headers::TRACEPARENT, "not-a-trace");
        assert!(!extract(Some(&incoming)).span().span_context().is_valid());
        let mut outgoing = HeaderMap::new();
        inject(&Context::new(), &mut outgoing);
        assert!(outgoing.get(crate::headers::TRACEPARENT).is_none());
    }
}
