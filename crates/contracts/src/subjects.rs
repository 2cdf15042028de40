//! Subject names. Internal RPC is `<service>.<method>`, agent-facing RPC is
//! `agent.<agent_id>.<service>.<method>`, operator RPC is `admin.<service>.<method>`, and events
//! are `events.<service>.<event>` (DESIGN.md §3).

/// The JetStream stream that captures every event for audit and replay.
pub const EVENTS_STREAM: &str = "EVENTS";
/// Subjects captured by [`EVENTS_STREAM`].
pub const EVENTS_WILDCARD: &str = "events.>";

/// Service names; each is also its queue group, NATS namespace and Postgres schema.
pub mod services {
    pub const ECONOMY: &str = "economy";
    pub const MARKET: &str = "market";
    pub const SCHEDULER: &str = "scheduler";
    pub const SANDBOX: &str = "sandbox";
    pub const ORCHESTRATOR: &str = "orchestrator";
    pub const ATTENTION: &str = "attention";
    pub const SOCIAL: &str = "social";
}

/// Event subjects of the economy service.
pub mod economy_events {
    pub const ACCOUNTS_OPENED: &str = "events.economy.accounts_opened";
    pub const ACCOUNTS_CLOSED: &str = "events.economy.accounts_closed";
    pub const TRANSFERS_POSTED: &str = "events.economy.transfers_posted";
    pub const HOLDS_PLACED: &str = "events.economy.holds_placed";
    pub const HOLDS_RESOLVED: &str = "events.economy.holds_resolved";
}

/// Event subjects of the market service.
pub mod market_events {
    pub const CATALOGUE_CHANGED: &str = "events.market.catalogue_changed";
    pub const ROUND_RECORDED: &str = "events.market.round_recorded";
}

/// Event subjects of the scheduler service.
pub mod scheduler_events {
    pub const BID_PLACED: &str = "events.scheduler.bid_placed";
    pub const BID_REJECTED: &str = "events.scheduler.bid_rejected";
    pub const BID_CANCELLED: &str = "events.scheduler.bid_cancelled";
    pub const BID_EXPIRED: &str = "events.scheduler.bid_expired";
    pub const BID_WON: &str = "events.scheduler.bid_won";
    pub const ROUND_CLEARED: &str = "events.scheduler.round_cleared";
}

/// Event subjects of the sandbox runner.
pub mod sandbox_events {
    pub const RUN_STARTED: &str = "events.sandbox.run_started";
    pub const RUN_FINISHED: &str = "events.sandbox.run_finished";
}

/// Event subjects of the orchestrator.
pub mod orchestrator_events {
    pub const AGENT_BORN: &str = "events.orchestrator.agent_born";
    pub const AGENT_STATUS_CHANGED: &str = "events.orchestrator.agent_status_changed";
    pub const EXECUTION_STARTED: &str = "events.orchestrator.execution_started";
    pub const EXECUTION_FINISHED: &str = "events.orchestrator.execution_finished";
    pub const TICK_COMPLETED: &str = "events.orchestrator.tick_completed";
}

/// Event subjects of the attention service.
pub mod attention_events {
    pub const PROMPTED: &str = "events.attention.prompted";
    pub const REWARDED: &str = "events.attention.rewarded";
    pub const DISMISSED: &str = "events.attention.dismissed";
    pub const EXPIRED: &str = "events.attention.expired";
}

/// Event subjects of the social service.
pub mod social_events {
    pub const MESSAGE_SENT: &str = "events.social.message_sent";
    pub const POSTED: &str = "events.social.posted";
}
