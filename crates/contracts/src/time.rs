//! Times on the wire: `google.protobuf.Timestamp` from and to `chrono`.

use chrono::{DateTime, Utc};

/// A time as a protobuf timestamp.
pub fn timestamp(t: DateTime<Utc>) -> prost_types::Timestamp {
    prost_types::Timestamp {
        seconds: t.timestamp(),
        nanos: t.timestamp_subsec_nanos() as i32,
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn nanoseconds_survive() {
        let t = chrono::DateTime::from_timestamp(1_700_000_000, 123_456_789).unwrap();
        let ts = super::timestamp(t);
        assert_eq!((ts.seconds, ts.nanos), (1_700_000_000, 123_456_789));
    }
}
