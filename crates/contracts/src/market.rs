//! The market service's methods (DESIGN.md §4 "Resources and bundles").

use crate::pb;
use crate::rpc_method;

/// Internal requests: `market.<method>`.
pub mod internal {
    use super::*;

    rpc_method!(
        /// Supply per round, maximum window, reserve prices and price bounds.
        Catalogue: Internal "market"."catalogue",
        pb::CatalogueRequest => pb::CatalogueResponse
    );
    rpc_method!(
        /// The reserve value of a bundle at the current reserve prices.
        Quote: Internal "market"."quote",
        pb::QuoteRequest => pb::QuoteResponse
    );
    rpc_method!(
        /// Records a cleared round and discovers the next prices from its winners.
        ReportRound: Internal "market"."report_round",
        pb::ReportRoundRequest => pb::ReportRoundResponse
    );
}

/// Agent-facing requests: `agent.<agent_id>.market.<method>`.
pub mod agent {
    use super::*;

    rpc_method!(
        /// Supply, utilisation, reserve and discovered prices, and recent rounds.
        State: Agent "market"."state",
        pb::MarketStateRequest => pb::MarketStateResponse
    );
}

/// Operator requests: `admin.market.<method>`.
pub mod admin {
    use super::*;

    rpc_method!(
        /// Supply, utilisation, reserve and discovered prices, and recent rounds (the
        /// operator's view of what agents see).
        State: Admin "market"."state",
        pb::MarketStateRequest => pb::MarketStateResponse
    );
    rpc_method!(
        /// Changes supply, window limit, reserve prices, bounds or the price rule at runtime.
        UpdateCatalogue: Admin "market"."update_catalogue",
        pb::UpdateCatalogueRequest => pb::UpdateCatalogueResponse
    );
}
