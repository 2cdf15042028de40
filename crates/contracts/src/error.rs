//! The small, shared error vocabulary every service error maps to, and its one mapping to and
//! from the wire (`pb::Error` behind the [`crate::headers::ERROR`] header).

use std::collections::BTreeMap;
use std::fmt;

use crate::ids::IdError;
use crate::pb;

pub use crate::pb::ErrorCode;

impl ErrorCode {
    /// Stable short name, used in the error header, logs and metrics labels.
    pub fn name(self) -> &'static str {
        match self {
            ErrorCode::Unspecified => "UNSPECIFIED",
            ErrorCode::InvalidArgument => "INVALID_ARGUMENT",
            ErrorCode::NotFound => "NOT_FOUND",
            ErrorCode::AlreadyExists => "ALREADY_EXISTS",
            ErrorCode::InsufficientFunds => "INSUFFICIENT_FUNDS",
            ErrorCode::Conflict => "CONFLICT",
            ErrorCode::FailedPrecondition => "FAILED_PRECONDITION",
            ErrorCode::Forbidden => "FORBIDDEN",
            ErrorCode::PayloadTooLarge => "PAYLOAD_TOO_LARGE",
            ErrorCode::Unavailable => "UNAVAILABLE",
            ErrorCode::DeadlineExceeded => "DEADLINE_EXCEEDED",
            ErrorCode::Internal => "INTERNAL",
        }
    }

    /// Whether the same request may succeed if simply sent again (with the same idempotency id).
    pub fn is_retryable(self) -> bool {
        matches!(self, ErrorCode::Unavailable | ErrorCode::DeadlineExceeded)
    }
}

impl fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// An error as it travels between services: a stable code, a human-readable message, an
/// optional machine-readable reason and details.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{code}: {message}")]
pub struct RpcError {
    pub code: ErrorCode,
    pub message: String,
    pub reason: String,
    pub details: BTreeMap<String, String>,
}

macro_rules! constructors {
    ($($fn_name:ident => $code:ident),* $(,)?) => {
        $(
            pub fn $fn_name(message: impl Into<String>) -> Self {
                Self::new(ErrorCode::$code, message)
            }
        )*
    };
}

impl RpcError {
    pub fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        Self {
            code,
            message: message.into(),
            reason: String::new(),
            details: BTreeMap::new(),
        }
    }

    constructors! {
        invalid_argument => InvalidArgument,
        not_found => NotFound,
        already_exists => AlreadyExists,
        insufficient_funds => InsufficientFunds,
        conflict => Conflict,
        failed_precondition => FailedPrecondition,
        forbidden => Forbidden,
        payload_too_large => PayloadTooLarge,
        unavailable => Unavailable,
        deadline_exceeded => DeadlineExceeded,
        internal => Internal,
    }

    pub fn with_reason(mut self, reason: impl Into<String>) -> Self {
        self.reason = reason.into();
        self
    }

    pub fn with_detail(mut self, key: impl Into<String>, value: impl ToString) -> Self {
        self.details.insert(key.into(), value.to_string());
        self
    }

    pub fn is_retryable(&self) -> bool {
        self.code.is_retryable()
    }

    pub fn to_proto(&self) -> pb::Error {
        pb::Error {
            code: self.code as i32,
            message: self.message.clone(),
            reason: self.reason.clone(),
            retryable: self.is_retryable(),
            details: self
                .details
                .iter()
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect(),
        }
    }

    pub fn from_proto(error: pb::Error) -> Self {
        Self {
            code: ErrorCode::try_from(error.code).unwrap_or(ErrorCode::Internal),
            message: error.message,
            reason: error.reason,
            details: error.details.into_iter().collect(),
        }
    }
}

/// Invalid ids and amounts on the wire are the caller's fault.
impl From<IdError> for RpcError {
    fn from(error: IdError) -> Self {
        RpcError::invalid_argument(error.to_string())
            .with_reason("invalid_field")
            .with_detail("field", error.field)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn proto_round_trip_keeps_code_reason_and_details() {
        let error = RpcError::insufficient_funds("need more")
            .with_reason("available_below_amount")
            .with_detail("op_index", 3);
        let back = RpcError::from_proto(error.to_proto());
        assert_eq!(back, error);
        assert!(!error.to_proto().retryable);
        assert!(RpcError::unavailable("x").to_proto().retryable);
    }
}
