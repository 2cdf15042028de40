//! The social service's configuration: the shared platform sections plus `[social]`.

use serde::Deserialize;
use syntropism_platform::config::ServiceConfig;
use syntropism_platform::{Problems, Validate};

/// The shared platform sections plus `[social]`.
pub type SocialConfig = ServiceConfig<SocialSection>;

/// The name of the service's own configuration section.
pub const SECTION: &str = "social";

#[derive(Debug, Clone, Deserialize)]
#[serde(default)]
pub struct SocialSection {
    /// Longest message or post body, in bytes (UTF-8).
    pub max_message_bytes: usize,
    /// Burned from the sender per direct message (µcr; 0: free).
    pub message_fee_micros: i64,
    /// Burned from the poster per board post (µcr; 0: free).
    pub post_fee_micros: i64,
    /// Board and human-message page sizes: when the request does not say, and at most.
    pub board_default_limit: u32,
    pub board_max_limit: u32,
    /// Most messages one inbox read delivers (oldest first).
    pub inbox_max_messages: u32,
    /// How often the sweep finishes messages and posts whose handler died while paying.
    pub sweep_interval_ms: u64,
    /// A message or post left paying this long is finished by the sweep.
    pub resume_after_ms: u64,
}

impl Default for SocialSection {
    fn default() -> Self {
        Self {
            max_message_bytes: 4096,
            message_fee_micros: 1_000_000,
            post_fee_micros: 0,
            board_default_limit: 50,
            board_max_limit: 500,
            inbox_max_messages: 500,
            sweep_interval_ms: 1_000,
            resume_after_ms: 10_000,
        }
    }
}

/// A request body is at most 64 KiB; a message must fit in one with its envelope.
const MAX_BODY_BYTES: usize = 60_000;

impl Validate for SocialSection {
    fn validate(&self, p: &mut Problems) {
        p.check(
            (1..=MAX_BODY_BYTES).contains(&self.max_message_bytes),
            "social.max_message_bytes",
            format!("must be between 1 and {MAX_BODY_BYTES}"),
        );
        p.check(
            self.message_fee_micros >= 0,
            "social.message_fee_micros",
            "must not be negative",
        );
        p.check(
            self.post_fee_micros >= 0,
            "social.post_fee_micros",
            "must not be negative",
        );
        p.check(
            self.board_default_limit >= 1 && self.board_default_limit <= self.board_max_limit,
            "social.board_default_limit",
            "must be between 1 and board_max_limit",
        );
        p.check(
            self.board_max_limit <= 1_000,
            "social.board_max_limit",
            "must be at most 1000",
        );
        p.check(
            (1..=10_000).contains(&self.inbox_max_messages),
            "social.inbox_max_messages",
            "must be between 1 and 10000",
        );
        p.check(
            self.sweep_interval_ms >= 10,
            "social.sweep_interval_ms",
            "must be at least 10",
        );
    }
}

/// Built-in defaults that depend on the service (the rest are in the structs).
pub const DEFAULTS: &[(&str, &str)] = &[
    (
        "database.url",
        "postgres://social:social@127.0.0.1:55432/syntropism",
    ),
    ("http.listen", "127.0.0.1:9107"),
];

#[cfg(test)]
mod tests {
    use super::*;

    fn check(section: &SocialSection) -> Result<(), syntropism_platform::ConfigError> {
        let mut p = Problems::default();
        section.validate(&mut p);
        p.into_result()
    }

    #[test]
    fn defaults_are_valid_and_match_the_design() {
        let d = SocialSection::default();
        assert!(check(&d).is_ok());
        assert_eq!(d.message_fee_micros, 1_000_000);
        assert_eq!(d.post_fee_micros, 0);
        assert_eq!(d.max_message_bytes, 4096);
    }

    #[test]
    fn bad_values_are_refused_by_name() {
        for (section, key) in [
            (
                SocialSection {
                    message_fee_micros: -1,
                    ..Default::default()
                },
                "social.message_fee_micros",
            ),
            (
                SocialSection {
                    max_message_bytes: 100_000,
                    ..Default::default()
                },
                "social.max_message_bytes",
            ),
            (
                SocialSection {
                    board_default_limit: 600,
                    ..Default::default()
                },
                "social.board_default_limit",
            ),
        ] {
            let error = check(&section).unwrap_err().to_string();
            assert!(error.contains(key), "{error}");
        }
    }
}
