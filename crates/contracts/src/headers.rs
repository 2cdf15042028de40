//! NATS header names used on requests, replies and events.

/// W3C trace context (<https://www.w3.org/TR/trace-context/>).
pub const TRACEPARENT: &str = "traceparent";
/// W3C trace state, carried alongside `traceparent`.
pub const TRACESTATE: &str = "tracestate";
/// Present on an error reply; its value is the error code name and the body is a `pb::Error`.
pub const ERROR: &str = "Syntropism-Error";
/// The flow a request belongs to; propagated to the events it causes.
pub const CORRELATION_ID: &str = "Syntropism-Correlation-Id";
/// JetStream de-duplication id (the event id), so a relay after a crash does not publish twice.
pub const NATS_MSG_ID: &str = "Nats-Msg-Id";
