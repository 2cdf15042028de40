//! The attention service's configuration: the shared platform sections plus `[attention]`.

use serde::Deserialize;
use syntropism_platform::config::ServiceConfig;
use syntropism_platform::{Problems, Validate};

use crate::rules::MAX_POINTS;

/// The shared platform sections plus `[attention]`.
pub type AttentionConfig = ServiceConfig<AttentionSection>;

/// The name of the service's own configuration section.
pub const SECTION: &str = "attention";

#[derive(Debug, Clone, Deserialize)]
#[serde(default)]
pub struct AttentionSection {
    /// Longest prompt an agent may submit, in bytes (UTF-8).
    pub max_prompt_bytes: usize,
    /// How long a prompt waits for the human before it expires.
    pub prompt_ttl_ms: u64,
    /// Credits (µcr) minted per point of score: reward = (interesting + useful +
    /// understandable) × weight.
    pub weight_micros_per_point: i64,
    /// Longest reason the human may give with a reward or a dismissal, in bytes.
    pub max_reason_bytes: usize,
    /// `admin.attention.pending` page sizes: when the request does not say, and at most.
    pub pending_default_limit: u32,
    pub pending_max_limit: u32,
    /// How often the sweep runs (expiry, and rewards left half-way).
    pub sweep_interval_ms: u64,
    /// A reward left half-way this long (its handler died) is finished by the sweep.
    pub resume_after_ms: u64,
}

impl Default for AttentionSection {
    fn default() -> Self {
        Self {
            max_prompt_bytes: 4096,
            prompt_ttl_ms: 3_600_000,
            weight_micros_per_point: 50_000_000,
            max_reason_bytes: 4096,
            pending_default_limit: 50,
            pending_max_limit: 500,
            sweep_interval_ms: 1_000,
            resume_after_ms: 10_000,
        }
    }
}

/// A request body is at most 64 KiB; a prompt must fit in one with its envelope.
const MAX_CONTENT_BYTES: usize = 60_000;

impl Validate for AttentionSection {
    fn validate(&self, p: &mut Problems) {
        p.check(
            (1..=MAX_CONTENT_BYTES).contains(&self.max_prompt_bytes),
            "attention.max_prompt_bytes",
            format!("must be between 1 and {MAX_CONTENT_BYTES}"),
        );
        p.check(
            self.prompt_ttl_ms >= 100,
            "attention.prompt_ttl_ms",
            "must be at least 100",
        );
        p.check(
            self.weight_micros_per_point >= 0
                && self.weight_micros_per_point <= i64::MAX / i64::from(MAX_POINTS),
            "attention.weight_micros_per_point",
            format!(
                "must be between 0 and {} (a full score must not overflow)",
                i64::MAX / i64::from(MAX_POINTS)
            ),
        );
        p.check(
            self.max_reason_bytes <= MAX_CONTENT_BYTES,
            "attention.max_reason_bytes",
            format!("must be at most {MAX_CONTENT_BYTES}"),
        );
        p.check(
            self.pending_default_limit >= 1 && self.pending_default_limit <= self.pending_max_limit,
            "attention.pending_default_limit",
            "must be between 1 and pending_max_limit",
        );
        p.check(
            self.pending_max_limit <= 1_000,
            "attention.pending_max_limit",
            "must be at most 1000",
        );
        p.check(
            self.sweep_interval_ms >= 10,
            "attention.sweep_interval_ms",
            "must be at least 10",
        );
    }
}

/// Built-in defaults that depend on the service (the rest are in the structs).
pub const DEFAULTS: &[(&str, &str)] = &[
    (
        "database.url",
        "postgres://attention:attention@127.0.0.1:55432/syntropism",
    ),
    ("http.listen", "127.0.0.1:9106"),
];

#[cfg(test)]
mod tests {
    use super::*;

    fn problems(section: &AttentionSection) -> Result<(), syntropism_platform::ConfigError> {
        let mut p = Problems::default();
        section.validate(&mut p);
        p.into_result()
    }

    #[test]
    fn defaults_are_valid_and_match_the_design() {
        let d = AttentionSection::default();
        assert!(problems(&d).is_ok());
        assert_eq!(d.weight_micros_per_point, 50 * 1_000_000);
        assert_eq!(d.max_prompt_bytes, 4096);
        assert_eq!(d.prompt_ttl_ms, 3_600_000);
    }

    #[test]
    fn a_weight_that_could_overflow_is_refused_by_name() {
        let section = AttentionSection {
            weight_micros_per_point: i64::MAX / 10,
            ..Default::default()
        };
        let error = problems(&section).unwrap_err().to_string();
        assert!(
            error.contains("attention.weight_micros_per_point"),
            "{error}"
        );
        let section = AttentionSection {
            max_prompt_bytes: 0,
            ..Default::default()
        };
        let error = problems(&section).unwrap_err().to_string();
        assert!(error.contains("attention.max_prompt_bytes"), "{error}");
    }
}
