//! The market service's configuration: the shared platform sections plus `[market]`.
//!
//! The catalogue (supply, maximum window, reserve prices, price bounds, price rule) seeds the
//! database on first start; afterwards the operator changes it at runtime
//! (`admin.market.update_catalogue`) and those changes persist.

use serde::Deserialize;
use syntropism_platform::config::ServiceConfig;
use syntropism_platform::{Problems, Validate};

use crate::pricing::{Prices, rule_named};

/// The shared platform sections plus `[market]`.
pub type MarketConfig = ServiceConfig<MarketSection>;

/// The name of the service's own configuration section.
pub const SECTION: &str = "market";

/// Capacity of one round.
#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq)]
#[serde(default)]
pub struct SupplyConfig {
    /// Millicores of concurrent capacity across sandbox runners.
    pub cpu_millicores: u64,
    /// MiB of concurrent capacity across sandbox runners.
    pub memory_mib: u64,
    /// The operator's LLM token budget per round.
    pub llm_tokens: u64,
    /// Prompts the human reads per round.
    pub attention_slots: u64,
}

impl Default for SupplyConfig {
    fn default() -> Self {
        Self {
            cpu_millicores: 4_000,
            memory_mib: 8_192,
            llm_tokens: 200_000,
            attention_slots: 1,
        }
    }
}

impl SupplyConfig {
    pub fn vector(&self) -> [u64; 4] {
        [
            self.cpu_millicores,
            self.memory_mib,
            self.llm_tokens,
            self.attention_slots,
        ]
    }
}

/// Prices in nano-credits per unit (1 credit = 10⁹ nc).
#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq)]
pub struct PriceConfig {
    /// Per millicore-second of the window.
    pub cpu: u64,
    /// Per MiB-second of the window.
    pub memory: u64,
    /// Per LLM token.
    pub tokens: u64,
    /// Per attention slot.
    pub attention: u64,
}

impl PriceConfig {
    pub fn prices(&self) -> Prices {
        Prices([self.cpu, self.memory, self.tokens, self.attention])
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(default)]
pub struct MarketSection {
    pub supply: SupplyConfig,
    /// Longest execution window a bundle may ask for.
    pub max_window_ms: u64,
    /// Reserve prices: no bundle sells for less than its value at these.
    pub reserve: PriceConfig,
    /// Discovered prices are clamped to [floor, ceiling].
    pub floor: PriceConfig,
    pub ceiling: PriceConfig,
    /// `discovery` (winners' payments per unit) or `utilisation_threshold` (+10% above 80%
    /// utilisation, −5% below 20%).
    pub price_rule: String,
    /// Recent rounds in `agent.<id>.market.state` when the request does not say, and at most.
    pub state_rounds_default: u32,
    pub state_rounds_max: u32,
}

/// A typical window (1 core and 512 MiB for 60 s, 10k tokens) costs about 0.8 credits at these
/// reserve prices; an attention slot costs 5 credits.
const RESERVE: PriceConfig = PriceConfig {
    cpu: 8_000,
    memory: 4_000,
    tokens: 20_000,
    attention: 5_000_000_000,
};

impl Default for MarketSection {
    fn default() -> Self {
        Self {
            supply: SupplyConfig::default(),
            max_window_ms: 300_000,
            reserve: RESERVE,
            floor: RESERVE,
            ceiling: PriceConfig {
                cpu: RESERVE.cpu * 100,
                memory: RESERVE.memory * 100,
                tokens: RESERVE.tokens * 100,
                attention: RESERVE.attention * 100,
            },
            price_rule: "discovery".into(),
            state_rounds_default: 10,
            state_rounds_max: 100,
        }
    }
}

/// Problems with a catalogue, as (key, message); shared by configuration and operator updates.
pub fn catalogue_problems(
    supply: &[u64; 4],
    max_window_ms: u64,
    reserve: &Prices,
    floor: &Prices,
    ceiling: &Prices,
    price_rule: &str,
) -> Vec<(&'static str, String)> {
    let mut problems = Vec::new();
    let limit = i64::MAX as u64;
    if supply.iter().any(|v| *v > limit) {
        problems.push(("supply", format!("each value must be at most {limit}")));
    }
    if max_window_ms == 0 || max_window_ms > 86_400_000 {
        problems.push((
            "max_window_ms",
            "must be between 1 and 86400000 (a day)".into(),
        ));
    }
    for (key, prices) in [("reserve", reserve), ("floor", floor), ("ceiling", ceiling)] {
        if prices.0.iter().any(|v| *v > limit) {
            problems.push((key, format!("each price must be at most {limit}")));
        }
    }
    if floor.0.iter().zip(ceiling.0).any(|(f, c)| *f > c) {
        problems.push(("ceiling", "every ceiling must be at least its floor".into()));
    }
    if rule_named(price_rule).is_none() {
        problems.push((
            "price_rule",
            format!("unknown rule {price_rule:?} (known: discovery, utilisation_threshold)"),
        ));
    }
    problems
}

impl Validate for MarketSection {
    fn validate(&self, p: &mut Problems) {
        for (key, message) in catalogue_problems(
            &self.supply.vector(),
            self.max_window_ms,
            &self.reserve.prices(),
            &self.floor.prices(),
            &self.ceiling.prices(),
            &self.price_rule,
        ) {
            p.check(false, &format!("market.{key}"), message);
        }
        p.check(
            self.state_rounds_default >= 1 && self.state_rounds_default <= self.state_rounds_max,
            "market.state_rounds_default",
            "must be between 1 and state_rounds_max",
        );
        p.check(
            self.state_rounds_max <= 1_000,
            "market.state_rounds_max",
            "must be at most 1000",
        );
    }
}

/// Built-in defaults that depend on the service (the rest are in the structs).
pub const DEFAULTS: &[(&str, &str)] = &[
    (
        "database.url",
        "postgres://market:market@127.0.0.1:55432/syntropism",
    ),
    ("http.listen", "127.0.0.1:9102"),
];
