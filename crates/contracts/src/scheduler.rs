//! The scheduler service's methods (DESIGN.md §4 "Bids and clearing").

use crate::pb;
use crate::rpc_method;

/// Internal requests: `scheduler.<method>`.
pub mod internal {
    use super::*;

    rpc_method!(
        /// Clears one round; idempotent per round number, exactly once across replicas.
        Clear: Internal "scheduler"."clear",
        pb::ClearRequest => pb::ClearResponse
    );
    rpc_method!(
        /// How many pending bids would run each agent (by beneficiary, whoever pays).
        PendingFor: Internal "scheduler"."pending_for",
        pb::PendingForRequest => pb::PendingForResponse
    );
}

/// Agent-facing requests: `agent.<agent_id>.scheduler.<method>`.
pub mod agent {
    use super::*;

    rpc_method!(
        /// Places a bid for a bundle, holding its amount in escrow.
        PlaceBid: Agent "scheduler"."place_bid",
        pb::PlaceBidRequest => pb::PlaceBidResponse
    );
    rpc_method!(
        /// Cancels one of the caller's pending bids, releasing its escrow.
        CancelBid: Agent "scheduler"."cancel_bid",
        pb::CancelBidRequest => pb::CancelBidResponse
    );
    rpc_method!(
        /// The caller's bids with their status, newest first, paged.
        ListBids: Agent "scheduler"."list_bids",
        pb::ListBidsRequest => pb::ListBidsResponse
    );
}
