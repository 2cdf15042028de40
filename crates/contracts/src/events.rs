//! Building event envelopes (DESIGN.md §3: every event carries event id, time, correlation id,
//! causation id and the trace context).

use prost::{Message, Name};

use crate::pb;

/// Wraps `payload` for publication on an `events.<service>.<event>` subject.
pub fn envelope<M: Message + Name>(
    source: &str,
    payload: &M,
    correlation_id: &str,
    causation_id: &str,
) -> pb::EventEnvelope {
    let now = chrono::Utc::now();
    pb::EventEnvelope {
        event_id: uuid::Uuid::now_v7().to_string(),
        time: Some(prost_types::Timestamp {
            seconds: now.timestamp(),
            nanos: now.timestamp_subsec_nanos() as i32,
        }),
        correlation_id: correlation_id.to_owned(),
        causation_id: causation_id.to_owned(),
        r#type: M::full_name(),
        source: source.to_owned(),
        traceparent: crate::trace::current_traceparent().unwrap_or_default(),
        payload: payload.encode_to_vec(),
    }
}

/// Decodes an envelope's payload, checking its declared type.
pub fn open<M: Message + Name + Default>(envelope: &pb::EventEnvelope) -> Result<M, String> {
    if envelope.r#type != M::full_name() {
        return Err(format!(
            "expected {}, got {}",
            M::full_name(),
            envelope.r#type
        ));
    }
    M::decode(envelope.payload.as_slice()).map_err(|e| e.to_string())
}
