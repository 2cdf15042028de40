//! The economy service's methods (DESIGN.md §4 "Money").

use crate::pb;
use crate::rpc_method;

/// A batch carries up to this many operations (and at most this many bytes): its reply, about
/// 110 bytes an operation, must fit NATS's default 1 MiB payload.
pub const MAX_BATCH_OPS: usize = 5_000;
pub const MAX_BATCH_REQUEST_BYTES: usize = 768 * 1024;

/// Internal requests: `economy.<method>`.
pub mod internal {
    use super::*;

    rpc_method!(
        /// Opens an agent's account (zero balance).
        OpenAccount: Internal "economy"."open_account",
        pb::OpenAccountRequest => pb::OpenAccountResponse
    );
    rpc_method!(
        /// Burns what remains on a dead agent's account and closes it for good.
        CloseAccount: Internal "economy"."close_account",
        pb::CloseAccountRequest => pb::CloseAccountResponse
    );
    rpc_method!(
        /// Moves credits from an agent to another agent or to burn.
        Transfer: Internal "economy"."transfer",
        pb::TransferRequest => pb::TransferResponse
    );
    rpc_method!(
        /// Creates credits for an agent (reward or genesis grant): the only way credits appear.
        Mint: Internal "economy"."mint",
        pb::MintRequest => pb::MintResponse
    );
    rpc_method!(
        /// Places a pending transfer (escrow) on an agent's available balance.
        Hold: Internal "economy"."hold",
        pb::HoldRequest => pb::HoldResponse
    );
    rpc_method!(
        /// Posts a hold, whole or in part; the rest is released.
        PostHold: Internal "economy"."post_hold",
        pb::PostHoldRequest => pb::PostHoldResponse
    );
    rpc_method!(
        /// Releases a hold entirely.
        VoidHold: Internal "economy"."void_hold",
        pb::VoidHoldRequest => pb::VoidHoldResponse
    );
    rpc_method!(
        /// Applies many operations atomically in one transaction.
        Batch: Internal "economy"."batch",
        pb::BatchRequest => pb::BatchResponse,
        max_request_bytes = super::MAX_BATCH_REQUEST_BYTES
    );
    rpc_method!(
        /// Any account's balance.
        Balance: Internal "economy"."balance",
        pb::BalanceRequest => pb::BalanceResponse
    );
    rpc_method!(
        /// Any account's transfers, newest first, paged.
        History: Internal "economy"."history",
        pb::HistoryRequest => pb::HistoryResponse
    );
    rpc_method!(
        /// Ledger totals and whether every invariant holds.
        Audit: Internal "economy"."audit",
        pb::AuditRequest => pb::AuditResponse
    );
}

/// Agent-facing requests: `agent.<agent_id>.economy.<method>`.
pub mod agent {
    use super::*;

    rpc_method!(
        /// The caller's own balance: posted, pending and available.
        Balance: Agent "economy"."balance",
        pb::AgentBalanceRequest => pb::AgentBalanceResponse
    );
    rpc_method!(
        /// The caller's own transfers, newest first, paged.
        History: Agent "economy"."history",
        pb::AgentHistoryRequest => pb::HistoryResponse
    );
    rpc_method!(
        /// A transfer from the caller to another living agent, with a memo.
        Transfer: Agent "economy"."transfer",
        pb::AgentTransferRequest => pb::AgentTransferResponse
    );
}

/// Operator requests: `admin.economy.<method>`.
pub mod admin {
    use super::*;

    rpc_method!(
        /// Ledger totals and whether every invariant holds (the operator's audit).
        Audit: Admin "economy"."audit",
        pb::AuditRequest => pb::AuditResponse
    );
}
