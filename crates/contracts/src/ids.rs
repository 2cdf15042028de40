//! Domain newtypes, so business code never juggles bare strings or integers for ids and money.

use std::fmt;
use std::str::FromStr;

use uuid::Uuid;

/// Why a value on the wire is not a valid id or amount.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {problem}")]
pub struct IdError {
    pub field: &'static str,
    pub problem: String,
}

impl IdError {
    fn new(field: &'static str, problem: impl Into<String>) -> Self {
        Self {
            field,
            problem: problem.into(),
        }
    }
}

/// An agent's identity: a UUID, which is also a valid NATS subject token.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct AgentId(Uuid);

impl AgentId {
    pub fn random() -> Self {
        Self(Uuid::new_v4())
    }

    pub fn from_uuid(uuid: Uuid) -> Self {
        Self(uuid)
    }

    pub fn as_uuid(&self) -> Uuid {
        self.0
    }

    /// Parses the wire form; `field` names the offending field in the error.
    pub fn parse(value: &str, field: &'static str) -> Result<Self, IdError> {
        if value.is_empty() {
            return Err(IdError::new(field, "agent id is required"));
        }
        Uuid::try_parse(value)
            .map(Self)
            .map_err(|_| IdError::new(field, format!("{value:?} is not an agent id (a UUID)")))
    }
}

impl FromStr for AgentId {
    type Err = IdError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::parse(s, "agent_id")
    }
}

impl fmt::Display for AgentId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.hyphenated().fmt(f)
    }
}

impl fmt::Debug for AgentId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "AgentId({})", self.0.hyphenated())
    }
}

/// An amount of credits in micro-credits (1 credit = 1,000,000 µcr). Never floating point;
/// arithmetic is checked.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Default)]
pub struct Credits(i64);

impl Credits {
    pub const MICROS_PER_CREDIT: i64 = 1_000_000;
    pub const ZERO: Credits = Credits(0);

    pub const fn from_micros(micros: i64) -> Self {
        Self(micros)
    }

    /// Whole credits; `None` on overflow.
    pub fn from_credits(credits: i64) -> Option<Self> {
        credits.checked_mul(Self::MICROS_PER_CREDIT).map(Self)
    }

    pub const fn micros(self) -> i64 {
        self.0
    }

    pub fn checked_add(self, other: Credits) -> Option<Credits> {
        self.0.checked_add(other.0).map(Credits)
    }

    pub fn checked_sub(self, other: Credits) -> Option<Credits> {
        self.0.checked_sub(other.0).map(Credits)
    }

    pub fn is_positive(self) -> bool {
        self.0 > 0
    }
}

impl fmt::Display for Credits {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let sign = if self.0 < 0 { "-" } else { "" };
        let abs = self.0.unsigned_abs();
        let per = Self::MICROS_PER_CREDIT.unsigned_abs();
        write!(f, "{sign}{}.{:06} cr", abs / per, abs % per)
    }
}

impl fmt::Debug for Credits {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Credits({}µ)", self.0)
    }
}

/// A caller-chosen idempotency id: 1–128 characters of `[A-Za-z0-9._:-]`.
#[derive(Clone, PartialEq, Eq, Hash, Debug)]
pub struct IdempotencyId(String);

impl IdempotencyId {
    pub const MAX_LEN: usize = 128;

    pub fn parse(value: &str) -> Result<Self, IdError> {
        const FIELD: &str = "idempotency_id";
        if value.is_empty() {
            return Err(IdError::new(
                FIELD,
                "an idempotency id is required on every mutation",
            ));
        }
        if value.len() > Self::MAX_LEN {
            return Err(IdError::new(
                FIELD,
                format!("longer than {} characters", Self::MAX_LEN),
            ));
        }
        if !value
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b':' | b'-'))
        {
            return Err(IdError::new(
                FIELD,
                "only letters, digits and . _ : - are allowed",
            ));
        }
        Ok(Self(value.to_owned()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for IdempotencyId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

macro_rules! row_id {
    ($(#[$doc:meta])* $name:ident, $field:literal) => {
        $(#[$doc])*
        #[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Debug)]
        pub struct $name(i64);

        impl $name {
            pub fn parse(value: i64) -> Result<Self, IdError> {
                if value <= 0 {
                    return Err(IdError::new($field, format!("must be a positive id, got {value}")));
                }
                Ok(Self(value))
            }

            pub const fn get(self) -> i64 {
                self.0
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                self.0.fmt(f)
            }
        }
    };
}

row_id!(
    /// A pending transfer (escrow) in the ledger.
    HoldId,
    "hold_id"
);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn credits_display_is_exact() {
        assert_eq!(Credits::from_micros(1_500_000).to_string(), "1.500000 cr");
        assert_eq!(Credits::from_micros(-1).to_string(), "-0.000001 cr");
        assert_eq!(
            Credits::from_micros(i64::MIN).to_string(),
            "-9223372036854.775808 cr"
        );
    }

    #[test]
    fn credits_arithmetic_is_checked() {
        assert_eq!(
            Credits::from_micros(i64::MAX).checked_add(Credits::from_micros(1)),
            None
        );
        assert_eq!(Credits::from_credits(i64::MAX / 1000), None);
    }

    #[test]
    fn ids_reject_garbage() {
        assert!(AgentId::parse("", "agent_id").is_err());
        assert!(AgentId::parse("agent.*", "agent_id").is_err());
        let id = AgentId::random();
        assert_eq!(AgentId::parse(&id.to_string(), "agent_id"), Ok(id));
        assert!(IdempotencyId::parse("a b").is_err());
        assert!(IdempotencyId::parse(&"x".repeat(129)).is_err());
        assert!(IdempotencyId::parse("bid:42-retry_1.a").is_ok());
        assert!(HoldId::parse(0).is_err());
    }
}
