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
}

/// Event subjects of the economy service.
pub mod economy_events {
    pub const ACCOUNTS_OPENED: &str = "events.economy.accounts_opened";
    pub const ACCOUNTS_CLOSED: &str = "events.economy.accounts_closed";
    pub const TRANSFERS_POSTED: &str = "events.economy.transfers_posted";
    pub const HOLDS_PLACED: &str = "events.economy.holds_placed";
    pub const HOLDS_RESOLVED: &str = "events.economy.holds_resolved";
}
