//! The social rules, without I/O: who may be written to, what a body may hold, the fee's
//! idempotency id, and which messages a window receives.

use chrono::{DateTime, Utc};
use sha2::{Digest, Sha256};
use syntropism_contracts::{AgentId, IdempotencyId, RpcError};

/// The recipient that means the human operator.
pub const HUMAN: &str = "human";

/// Who a direct message is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Recipient {
    Human,
    Agent(AgentId),
}

impl Recipient {
    /// `"human"` or an agent id.
    pub fn parse(to: &str) -> Result<Recipient, RpcError> {
        if to == HUMAN {
            return Ok(Recipient::Human);
        }
        AgentId::parse(to, "to").map(Recipient::Agent).map_err(|_| {
            RpcError::invalid_argument(format!("to: {to:?} is neither an agent id nor \"{HUMAN}\""))
                .with_reason("invalid_recipient")
                .with_detail("field", "to")
        })
    }

    /// As stored and sent on the wire.
    pub fn name(self) -> String {
        match self {
            Recipient::Human => HUMAN.to_owned(),
            Recipient::Agent(id) => id.to_string(),
        }
    }
}

/// A message or post body: not empty, at most `max_bytes`.
pub fn check_body(body: &str, max_bytes: usize) -> Result<(), RpcError> {
    if body.trim().is_empty() {
        return Err(RpcError::invalid_argument("the body is empty")
            .with_reason("empty_body")
            .with_detail("field", "body"));
    }
    if body.len() > max_bytes {
        return Err(RpcError::payload_too_large(format!(
            "the body is {} bytes; at most {max_bytes} are carried",
            body.len()
        ))
        .with_reason("body_too_large")
        .with_detail("max_bytes", max_bytes)
        .with_detail("bytes", body.len()));
    }
    Ok(())
}

/// Kinds of fee idempotency ids in the economy: a direct message's, a board post's.
pub const MESSAGE_FEE: &str = "social-fee";
pub const POST_FEE: &str = "social-post-fee";

/// The ledger memo of message `id`'s fee (part of the fee request, so a retry must repeat it).
pub fn message_fee_memo(id: i64, recipient: &str) -> String {
    format!("fee for message {id} to {recipient}")
}

/// The ledger memo of board post `id`'s fee.
pub fn post_fee_memo(id: i64) -> String {
    format!("fee for board post {id}")
}

/// The economy idempotency id of the fee an agent pays for its request `key`: `<kind>:<agent>:
/// <key>`, or, when that would be too long, the key's SHA-256 under a kind of its own (so the
/// two forms can never meet).
pub fn fee_key(kind: &str, agent: AgentId, key: &IdempotencyId) -> String {
    let plain = format!("{kind}:{agent}:{key}");
    if plain.len() <= IdempotencyId::MAX_LEN {
        return plain;
    }
    let digest = Sha256::digest(key.as_str().as_bytes());
    let hex: String = digest.iter().map(|b| format!("{b:02x}")).collect();
    format!("{kind}-sha256:{agent}:{hex}")
}

/// Messages sent in `[since, until)` are delivered together (`since` unset: everything before
/// `until`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Delivery {
    pub since: Option<DateTime<Utc>>,
    pub until: DateTime<Utc>,
}

/// What a window that opened at `current_start` receives, the agent's previous window having
/// opened at `previous_start`: what was sent since that one opened, before this one did.
pub fn inbox_delivery(
    previous_start: Option<DateTime<Utc>>,
    current_start: DateTime<Utc>,
) -> Delivery {
    Delivery {
        since: previous_start,
        until: current_start,
    }
}

/// What a window about to open at `window_start` will receive. The orchestrator asks before it
/// opens it, so the agent's latest window — the one still open (`open_start`) or, if none is,
/// the last one (`last_start`) — is the previous window of the one about to open.
pub fn upcoming_delivery(
    open_start: Option<DateTime<Utc>>,
    last_start: Option<DateTime<Utc>>,
    window_start: DateTime<Utc>,
) -> Delivery {
    Delivery {
        since: open_start.or(last_start),
        until: window_start,
    }
}

/// A page size: `requested`, or `default` for 0, at most `max`.
pub fn page_limit(requested: u32, default: u32, max: u32) -> u32 {
    match requested {
        0 => default,
        n => n.min(max),
    }
}

pub use syntropism_contracts::rpc::fitting;

#[cfg(test)]
mod tests {
    use syntropism_contracts::ErrorCode;

    use super::*;

    #[test]
    fn recipients_are_the_human_or_agent_ids() {
        assert_eq!(Recipient::parse("human").unwrap(), Recipient::Human);
        let id = AgentId::random();
        assert_eq!(
            Recipient::parse(&id.to_string()).unwrap(),
            Recipient::Agent(id)
        );
        assert_eq!(Recipient::Agent(id).name(), id.to_string());
        for bad in ["", "Human", "bob", "agent.*"] {
            let error = Recipient::parse(bad).unwrap_err();
            assert_eq!(error.code, ErrorCode::InvalidArgument, "{bad}");
            assert_eq!(error.reason, "invalid_recipient");
        }
    }

    #[test]
    fn bodies_are_present_and_capped_in_bytes() {
        assert!(check_body("hi", 2).is_ok());
        let error = check_body("hé", 2).unwrap_err();
        assert_eq!(
            (error.code, error.reason.as_str()),
            (ErrorCode::PayloadTooLarge, "body_too_large")
        );
        let error = check_body(" \n", 10).unwrap_err();
        assert_eq!(
            (error.code, error.reason.as_str()),
            (ErrorCode::InvalidArgument, "empty_body")
        );
    }

    #[test]
    fn fee_keys_are_valid_distinct_and_stable() {
        let agent = AgentId::random();
        let short = IdempotencyId::parse("msg-1").unwrap();
        let key = fee_key("social-fee", agent, &short);
        assert_eq!(key, format!("social-fee:{agent}:msg-1"));
        let long = IdempotencyId::parse(&"x".repeat(128)).unwrap();
        let hashed = fee_key("social-fee", agent, &long);
        assert!(IdempotencyId::parse(&hashed).is_ok(), "{hashed}");
        assert!(hashed.starts_with("social-fee-sha256:"));
        assert_eq!(hashed, fee_key("social-fee", agent, &long));
        let other = IdempotencyId::parse(&"y".repeat(128)).unwrap();
        assert_ne!(hashed, fee_key("social-fee", agent, &other));
        // The longest kind in use still fits.
        assert!(IdempotencyId::parse(&fee_key("social-post-fee", agent, &long)).is_ok());
        assert_ne!(
            fee_key("social-fee", agent, &short),
            fee_key("social-fee", AgentId::random(), &short)
        );
    }

    #[test]
    fn a_window_receives_what_was_sent_since_the_previous_one_opened() {
        let t = |s: i64| DateTime::from_timestamp(s, 0).unwrap();
        assert_eq!(
            inbox_delivery(Some(t(10)), t(20)),
            Delivery {
                since: Some(t(10)),
                until: t(20)
            }
        );
        assert_eq!(inbox_delivery(None, t(20)).since, None);
        // Before a window opens, the latest window is its previous one: the open one if any,
        // else the last.
        assert_eq!(
            upcoming_delivery(None, Some(t(10)), t(30)).since,
            Some(t(10))
        );
        assert_eq!(
            upcoming_delivery(Some(t(25)), Some(t(10)), t(30)).since,
            Some(t(25))
        );
        assert_eq!(upcoming_delivery(None, None, t(30)).since, None);
        // The summary before a window and the inbox in it cover the same messages.
        assert_eq!(
            upcoming_delivery(None, Some(t(10)), t(30)),
            inbox_delivery(Some(t(10)), t(30))
        );
    }

    #[test]
    fn pages_have_a_default_and_a_cap() {
        assert_eq!(page_limit(0, 50, 500), 50);
        assert_eq!(page_limit(7, 50, 500), 7);
        assert_eq!(page_limit(10_000, 50, 500), 500);
    }
}
