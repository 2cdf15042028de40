//! Where ledger and database failures become the shared error codes — in one place.

use syntropism_contracts::RpcError;

use crate::ledger::{LedgerError, OpError};

impl From<&LedgerError> for RpcError {
    fn from(error: &LedgerError) -> Self {
        let message = error.to_string();
        match error {
            LedgerError::NonPositiveAmount(_) => {
                RpcError::invalid_argument(message).with_reason("non_positive_amount")
            }
            LedgerError::SelfTransfer => {
                RpcError::invalid_argument(message).with_reason("self_transfer")
            }
            LedgerError::MemoTooLong(_) => {
                RpcError::invalid_argument(message).with_reason("memo_too_long")
            }
            LedgerError::Overflow(_) => RpcError::invalid_argument(message).with_reason("overflow"),
            LedgerError::PostExceedsHold { .. } => {
                RpcError::invalid_argument(message).with_reason("post_exceeds_hold")
            }
            LedgerError::AccountNotFound(_) => {
                RpcError::not_found(message).with_reason("account_not_found")
            }
            LedgerError::HoldNotFound(_) => {
                RpcError::not_found(message).with_reason("hold_not_found")
            }
            LedgerError::AccountExists(_) => {
                RpcError::already_exists(message).with_reason("account_exists")
            }
            LedgerError::AccountClosed(_) => {
                RpcError::failed_precondition(message).with_reason("account_closed")
            }
            LedgerError::HoldNotPending { .. } => {
                RpcError::failed_precondition(message).with_reason("hold_not_pending")
            }
            LedgerError::PendingHolds { .. } => {
                RpcError::failed_precondition(message).with_reason("pending_holds")
            }
            LedgerError::InsufficientFunds {
                available, needed, ..
            } => RpcError::insufficient_funds(message)
                .with_reason("insufficient_funds")
                .with_detail("available_micros", available.micros())
                .with_detail("needed_micros", needed.micros()),
        }
    }
}

/// A refused operation; in a batch the error says which operation it was.
pub(crate) fn op_error(error: &OpError, ops: usize) -> RpcError {
    let rpc = RpcError::from(&error.error);
    if ops > 1 {
        RpcError {
            message: format!("operation {}: {}", error.index, rpc.message),
            ..rpc
        }
        .with_detail("op_index", error.index)
    } else {
        rpc
    }
}

/// Database failures. Constraint and trigger refusals mean the rules in code and the
/// database disagree: an internal error, and nothing was written.
pub(crate) fn db_error(error: diesel::result::Error) -> RpcError {
    use diesel::result::{DatabaseErrorKind, Error};
    match &error {
        Error::DatabaseError(kind, info) => {
            let message = info.message().to_owned();
            if message.contains("deadlock detected") {
                return RpcError::unavailable(format!("database contention: {message}"))
                    .with_reason("contention");
            }
            if message.contains("out of range") {
                return RpcError::invalid_argument(format!("amount overflows: {message}"))
                    .with_reason("overflow");
            }
            match kind {
                DatabaseErrorKind::ClosedConnection => {
                    RpcError::unavailable(format!("database connection lost: {message}"))
                }
                DatabaseErrorKind::SerializationFailure => {
                    RpcError::unavailable(format!("database contention: {message}"))
                        .with_reason("contention")
                }
                DatabaseErrorKind::CheckViolation
                | DatabaseErrorKind::ForeignKeyViolation
                | DatabaseErrorKind::NotNullViolation
                | DatabaseErrorKind::UniqueViolation => {
                    tracing::error!(%message, "the database refused a ledger write");
                    RpcError::internal(format!("ledger invariant refused the change: {message}"))
                        .with_reason("invariant_violation")
                }
                _ => {
                    tracing::error!(%message, "database error");
                    RpcError::internal(format!("database error: {message}"))
                }
            }
        }
        Error::BrokenTransactionManager | Error::AlreadyInTransaction => {
            RpcError::unavailable(format!("database connection unusable: {error}"))
        }
        _ => RpcError::internal(format!("database error: {error}")),
    }
}
