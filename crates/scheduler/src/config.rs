//! The scheduler service's configuration: the shared platform sections plus `[scheduler]`.

use serde::Deserialize;
use syntropism_platform::config::ServiceConfig;
use syntropism_platform::{Problems, Validate};

/// The shared platform sections plus `[scheduler]`.
pub type SchedulerConfig = ServiceConfig<SchedulerSection>;

/// The name of the service's own configuration section.
pub const SECTION: &str = "scheduler";

#[derive(Debug, Clone, Deserialize)]
#[serde(default)]
pub struct SchedulerSection {
    /// `amount` (highest first; ties by placement time, then id) or `density` (amount ÷
    /// reserve value).
    pub ordering: String,
    /// `pay_as_bid` or `critical_value`.
    pub payment: String,
    /// Pending bids one agent may have at once (as bidder).
    pub max_pending_bids: u32,
    /// Lifetime of a bid that names no expiry.
    pub default_bid_lifetime_ms: u64,
    /// Longest lifetime a bid may ask for (and furthest `not_before`).
    pub max_bid_lifetime_ms: u64,
    /// Page sizes of `list_bids`.
    pub list_default_limit: u32,
    pub list_max_limit: u32,
}

impl Default for SchedulerSection {
    fn default() -> Self {
        Self {
            ordering: "amount".into(),
            payment: "pay_as_bid".into(),
            max_pending_bids: 10,
            default_bid_lifetime_ms: 3_600_000,
            max_bid_lifetime_ms: 86_400_000,
            list_default_limit: 50,
            list_max_limit: 500,
        }
    }
}

impl Validate for SchedulerSection {
    fn validate(&self, p: &mut Problems) {
        p.check(
            crate::clearing::ordering_named(&self.ordering).is_some(),
            "scheduler.ordering",
            format!("unknown rule {:?} (known: amount, density)", self.ordering),
        );
        p.check(
            crate::clearing::payment_named(&self.payment).is_some(),
            "scheduler.payment",
            format!(
                "unknown rule {:?} (known: pay_as_bid, critical_value)",
                self.payment
            ),
        );
        p.check(
            (1..=10_000).contains(&self.max_pending_bids),
            "scheduler.max_pending_bids",
            "must be between 1 and 10000",
        );
        p.check(
            self.default_bid_lifetime_ms >= 1
                && self.default_bid_lifetime_ms <= self.max_bid_lifetime_ms,
            "scheduler.default_bid_lifetime_ms",
            "must be between 1 and max_bid_lifetime_ms",
        );
        p.check(
            self.max_bid_lifetime_ms <= 366 * 86_400_000,
            "scheduler.max_bid_lifetime_ms",
            "must be at most a year",
        );
        p.check(
            self.list_default_limit >= 1 && self.list_default_limit <= self.list_max_limit,
            "scheduler.list_default_limit",
            "must be between 1 and list_max_limit",
        );
        p.check(
            self.list_max_limit <= 10_000,
            "scheduler.list_max_limit",
            "must be at most 10000",
        );
    }
}

/// Built-in defaults that depend on the service (the rest are in the structs).
pub const DEFAULTS: &[(&str, &str)] = &[
    (
        "database.url",
        "postgres://scheduler:scheduler@127.0.0.1:55432/syntropism",
    ),
    ("http.listen", "127.0.0.1:9103"),
];
