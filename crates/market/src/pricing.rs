//! Reserve values and price discovery, as pure functions.
//!
//! Prices are integers in nano-credits per unit (1 µcr = 1,000 nc), so small units can carry a
//! price without floating point: cpu per millicore-second and memory per MiB-second of the
//! window, tokens per token, attention per slot. Money stays in micro-credits: a bundle's value
//! is rounded up to whole micro-credits.

use std::fmt;

/// Nano-credits per micro-credit.
pub const NANOS_PER_MICRO: u128 = 1_000;

/// The four priced resources, in this order everywhere.
pub const RESOURCES: [&str; 4] = ["cpu", "memory", "tokens", "attention"];

/// A bundle: concurrent cpu and memory for a window, tokens and attention slots.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Bundle {
    pub cpu_millicores: u64,
    pub memory_mib: u64,
    pub duration_ms: u64,
    pub tokens: u64,
    pub attention_slots: u64,
}

impl Bundle {
    /// Priced units per resource: millicore-seconds, MiB-seconds, tokens, slots (cpu and memory
    /// in thousandths, since a window is counted in milliseconds).
    pub fn milli_units(&self) -> [u128; 4] {
        [
            self.cpu_millicores as u128 * self.duration_ms as u128,
            self.memory_mib as u128 * self.duration_ms as u128,
            self.tokens as u128 * 1_000,
            self.attention_slots as u128 * 1_000,
        ]
    }
}

/// Nano-credits per unit of each resource.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Prices(pub [u64; 4]);

/// Bounds of discovered prices, per resource.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Bounds {
    pub floor: Prices,
    pub ceiling: Prices,
}

impl Bounds {
    pub fn clamp(&self, prices: Prices) -> Prices {
        let mut out = prices;
        for (i, price) in out.0.iter_mut().enumerate() {
            *price = (*price).clamp(self.floor.0[i], self.ceiling.0[i].max(self.floor.0[i]));
        }
        out
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum PricingError {
    #[error("the bundle's value does not fit in 63 bits of micro-credits")]
    Overflow,
}

/// The value of `bundle` at `prices`, per resource, in nano-credits.
pub fn value_nanos(bundle: &Bundle, prices: &Prices) -> Result<[u128; 4], PricingError> {
    let units = bundle.milli_units();
    let mut values = [0u128; 4];
    for i in 0..4 {
        values[i] = units[i]
            .checked_mul(prices.0[i] as u128)
            .ok_or(PricingError::Overflow)?
            / 1_000;
    }
    Ok(values)
}

/// The value of `bundle` at `prices` in micro-credits, rounded up.
pub fn value_micros(bundle: &Bundle, prices: &Prices) -> Result<u64, PricingError> {
    let nanos = value_nanos(bundle, prices)?
        .iter()
        .try_fold(0u128, |sum, v| sum.checked_add(*v))
        .ok_or(PricingError::Overflow)?;
    let micros = nanos.div_ceil(NANOS_PER_MICRO);
    u64::try_from(micros)
        .ok()
        .filter(|m| *m <= i64::MAX as u64)
        .ok_or(PricingError::Overflow)
}

/// A resource's share of the round: used ÷ supply in parts per million (0 when nothing is
/// supplied).
pub fn utilisation_ppm(used: u64, supply: u64) -> u32 {
    if supply == 0 {
        return 0;
    }
    (used.min(supply) as u128 * 1_000_000 / supply as u128) as u32
}

/// A winning bid: what it bought and what it paid (µcr).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Winner {
    pub bundle: Bundle,
    pub paid_micros: u64,
}

/// What a price rule sees of a cleared round.
#[derive(Debug, Clone, Copy)]
pub struct RoundOutcome<'a> {
    pub winners: &'a [Winner],
    /// Utilisation per resource (ppm), in [`RESOURCES`] order.
    pub utilisation_ppm: [u32; 4],
}

/// How prices move after a round. Results are clamped to the bounds by the caller.
pub trait PriceRule: Send + Sync + fmt::Debug {
    fn name(&self) -> &'static str;

    /// The prices after `round`, from the prices before it and the reserve prices.
    fn next(&self, previous: &Prices, reserve: &Prices, round: &RoundOutcome<'_>) -> Prices;
}

/// Discovery (the default): each winner's payment is apportioned over its resources in
/// proportion to their reserve value; a resource's price is what the winners paid for it per
/// unit. A resource no winner bought keeps its previous price.
#[derive(Debug, Clone, Copy, Default)]
pub struct Discovery;

impl PriceRule for Discovery {
    fn name(&self) -> &'static str {
        "discovery"
    }

    fn next(&self, previous: &Prices, reserve: &Prices, round: &RoundOutcome<'_>) -> Prices {
        let mut paid_nanos = [0u128; 4];
        let mut milli_units = [0u128; 4];
        for winner in round.winners {
            let units = winner.bundle.milli_units();
            // A placed bid's bundle was quoted, so its value fits; anything else is skipped.
            let Ok(values) = value_nanos(&winner.bundle, reserve) else {
                continue;
            };
            let total = values.iter().fold(0u128, |sum, v| sum.saturating_add(*v));
            let paid = winner.paid_micros as u128 * NANOS_PER_MICRO;
            for i in 0..4 {
                if units[i] == 0 {
                    continue;
                }
                milli_units[i] = milli_units[i].saturating_add(units[i]);
                // In proportion to reserve value; with no reserve value at all, by resource
                // count among those the bundle holds.
                paid_nanos[i] = paid_nanos[i].saturating_add(if total > 0 {
                    mul_div(paid, values[i], total)
                } else {
                    paid / units.iter().filter(|u| **u > 0).count() as u128
                });
            }
        }
        let mut next = *previous;
        for i in 0..4 {
            if milli_units[i] > 0 {
                let price = mul_div(paid_nanos[i], 1_000, milli_units[i]);
                next.0[i] = u64::try_from(price).unwrap_or(u64::MAX);
            }
        }
        next
    }
}

/// `a × b ÷ c` for `b ≤ c` or small operands, saturating instead of overflowing.
fn mul_div(a: u128, b: u128, c: u128) -> u128 {
    match a.checked_mul(b) {
        Some(product) => product / c,
        None => (a / c)
            .saturating_mul(b)
            .saturating_add((a % c).saturating_mul(b) / c),
    }
}

/// The classic utilisation threshold rule: raise a price 10% when its resource was more than
/// 80% used, lower it 5% when less than 20% used.
#[derive(Debug, Clone, Copy, Default)]
pub struct UtilisationThreshold;

impl PriceRule for UtilisationThreshold {
    fn name(&self) -> &'static str {
        "utilisation_threshold"
    }

    fn next(&self, previous: &Prices, _reserve: &Prices, round: &RoundOutcome<'_>) -> Prices {
        let mut next = *previous;
        for (i, price) in next.0.iter_mut().enumerate() {
            let utilisation = round.utilisation_ppm[i];
            let p = *price as u128;
            *price = if utilisation > 800_000 {
                // At least one nano-credit up, so a zero or tiny price can rise.
                u64::try_from((p * 110).div_ceil(100).max(p + 1)).unwrap_or(u64::MAX)
            } else if utilisation < 200_000 {
                (p * 95 / 100) as u64
            } else {
                *price
            };
        }
        next
    }
}

/// A price rule by its configured name.
pub fn rule_named(name: &str) -> Option<&'static dyn PriceRule> {
    match name {
        "discovery" => Some(&Discovery),
        "utilisation_threshold" => Some(&UtilisationThreshold),
        _ => None,
    }
}

/// The prices after a round: the rule's, clamped to the bounds.
pub fn discover(
    rule: &dyn PriceRule,
    previous: &Prices,
    reserve: &Prices,
    bounds: &Bounds,
    round: &RoundOutcome<'_>,
) -> Prices {
    bounds.clamp(rule.next(previous, reserve, round))
}
