//! The economy service's configuration: the shared platform sections plus `[economy]`.

use serde::Deserialize;
use syntropism_platform::config::ServiceConfig;
use syntropism_platform::{Problems, Validate};

/// The shared platform sections plus `[economy]`.
pub type EconomyConfig = ServiceConfig<EconomySection>;

/// The name of the service's own configuration section.
pub const SECTION: &str = "economy";

#[derive(Debug, Clone, Deserialize)]
#[serde(default)]
pub struct EconomySection {
    /// How many of the 64 shard rows of `mint` and `burn` to spread writes over.
    pub system_shards: i16,
    /// Page size of history requests that do not say.
    pub history_default_limit: u32,
    /// Largest history page.
    pub history_max_limit: u32,
    /// Most operations in one batch.
    pub max_batch_ops: usize,
    /// Committer tasks per replica: concurrent mutations are applied in shared transactions.
    pub committers: usize,
    /// Most mutations one transaction takes.
    pub max_group: usize,
    /// Most operations one transaction of batches takes: concurrent batches share a
    /// transaction up to this many operations (one bigger batch still runs alone).
    pub max_group_ops: usize,
}

impl Default for EconomySection {
    fn default() -> Self {
        Self {
            system_shards: 64,
            history_default_limit: 50,
            history_max_limit: 500,
            max_batch_ops: syntropism_contracts::economy::MAX_BATCH_OPS,
            committers: 1,
            max_group: 64,
            max_group_ops: 10_000,
        }
    }
}

impl Validate for EconomySection {
    fn validate(&self, p: &mut Problems) {
        let e = self;
        p.check(
            (1..=64).contains(&e.system_shards),
            "economy.system_shards",
            "must be between 1 and 64",
        );
        p.check(
            e.history_default_limit >= 1,
            "economy.history_default_limit",
            "must be >= 1",
        );
        p.check(
            e.history_max_limit >= e.history_default_limit && e.history_max_limit <= 10_000,
            "economy.history_max_limit",
            "must be >= history_default_limit and <= 10000",
        );
        p.check(
            (1..=syntropism_contracts::economy::MAX_BATCH_OPS).contains(&e.max_batch_ops),
            "economy.max_batch_ops",
            format!(
                "must be between 1 and {}",
                syntropism_contracts::economy::MAX_BATCH_OPS
            ),
        );
        p.check(
            (1..=64).contains(&e.committers),
            "economy.committers",
            "must be between 1 and 64 (each holds a database connection while it works)",
        );
        p.check(
            (1..=1024).contains(&e.max_group),
            "economy.max_group",
            "must be between 1 and 1024",
        );
        p.check(
            (1..=100_000).contains(&e.max_group_ops),
            "economy.max_group_ops",
            "must be between 1 and 100000",
        );
    }
}

/// Built-in defaults that depend on the service (the rest are in the structs).
pub const DEFAULTS: &[(&str, &str)] = &[
    (
        "database.url",
        "postgres://economy:economy@127.0.0.1:55432/syntropism",
    ),
    ("http.listen", "127.0.0.1:9101"),
];
