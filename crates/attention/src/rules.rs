//! The attention rules, without I/O: what a prompt may hold, what a reward is worth, and which
//! step a prompt in a given state may take.

use syntropism_contracts::{RpcError, pb};

/// The highest score on each scale.
pub const MAX_SCORE: u32 = 10;
/// The scales: interesting, useful, understandable.
pub const SCALES: u32 = 3;
/// The most points a prompt can earn.
pub const MAX_POINTS: u32 = MAX_SCORE * SCALES;

/// A prompt's place in its life: pending → rewarding → rewarded, or pending → dismissed |
/// expired. `Rewarding` means the scores are fixed and the reward is being minted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Status {
    Pending,
    Rewarding,
    Rewarded,
    Dismissed,
    Expired,
}

impl Status {
    pub fn as_str(self) -> &'static str {
        match self {
            Status::Pending => "pending",
            Status::Rewarding => "rewarding",
            Status::Rewarded => "rewarded",
            Status::Dismissed => "dismissed",
            Status::Expired => "expired",
        }
    }

    pub fn named(name: &str) -> Option<Status> {
        Some(match name {
            "pending" => Status::Pending,
            "rewarding" => Status::Rewarding,
            "rewarded" => Status::Rewarded,
            "dismissed" => Status::Dismissed,
            "expired" => Status::Expired,
            _ => return None,
        })
    }

    /// On the wire a reward being minted is still waiting (not yet rewarded).
    pub fn to_pb(self) -> pb::PromptStatus {
        match self {
            Status::Pending | Status::Rewarding => pb::PromptStatus::Pending,
            Status::Rewarded => pb::PromptStatus::Rewarded,
            Status::Dismissed => pb::PromptStatus::Dismissed,
            Status::Expired => pb::PromptStatus::Expired,
        }
    }
}

/// The human's three scores.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Scores {
    pub interesting: u32,
    pub useful: u32,
    pub understandable: u32,
}

impl Scores {
    /// Checks each score is within 0–[`MAX_SCORE`].
    pub fn from_pb(scores: Option<&pb::Scores>) -> Result<Scores, RpcError> {
        let s = scores.ok_or_else(|| {
            RpcError::invalid_argument("scores are required")
                .with_reason("missing_field")
                .with_detail("field", "scores")
        })?;
        for (value, field) in [
            (s.interesting, "scores.interesting"),
            (s.useful, "scores.useful"),
            (s.understandable, "scores.understandable"),
        ] {
            if value > MAX_SCORE {
                return Err(RpcError::invalid_argument(format!(
                    "{field} must be between 0 and {MAX_SCORE}, got {value}"
                ))
                .with_reason("invalid_score")
                .with_detail("field", field));
            }
        }
        Ok(Scores {
            interesting: s.interesting,
            useful: s.useful,
            understandable: s.understandable,
        })
    }

    pub fn to_pb(self) -> pb::Scores {
        pb::Scores {
            interesting: self.interesting,
            useful: self.useful,
            understandable: self.understandable,
        }
    }

    pub fn points(self) -> u32 {
        self.interesting + self.useful + self.understandable
    }
}

/// The reward for `scores`: Σ score × `weight_micros_per_point`, or `None` on overflow (which a
/// validated configuration rules out).
pub fn reward_micros(scores: Scores, weight_micros_per_point: i64) -> Option<i64> {
    i64::from(scores.points()).checked_mul(weight_micros_per_point)
}

/// A prompt's content: not empty, at most `max_bytes`.
pub fn check_content(content: &str, max_bytes: usize) -> Result<(), RpcError> {
    if content.trim().is_empty() {
        return Err(RpcError::invalid_argument("the prompt is empty")
            .with_reason("empty_prompt")
            .with_detail("field", "content"));
    }
    if content.len() > max_bytes {
        return Err(RpcError::payload_too_large(format!(
            "the prompt is {} bytes; at most {max_bytes} are shown",
            content.len()
        ))
        .with_reason("prompt_too_large")
        .with_detail("max_bytes", max_bytes)
        .with_detail("bytes", content.len()));
    }
    Ok(())
}

/// The human's reason: at most `max_bytes`.
pub fn check_reason(reason: &str, max_bytes: usize) -> Result<(), RpcError> {
    if reason.len() > max_bytes {
        return Err(RpcError::invalid_argument(format!(
            "the reason is {} bytes; at most {max_bytes} are kept",
            reason.len()
        ))
        .with_reason("reason_too_long")
        .with_detail("field", "reason")
        .with_detail("max_bytes", max_bytes));
    }
    Ok(())
}

/// Whether a window with `slots` attention slots, `used` of them taken, may show one more
/// prompt.
pub fn check_slots(slots: u64, used: u64) -> Result<(), RpcError> {
    if slots == 0 {
        return Err(RpcError::failed_precondition(
            "this window carries no attention: bid for a bundle with attention slots",
        )
        .with_reason("no_attention"));
    }
    if used >= slots {
        return Err(RpcError::failed_precondition(format!(
            "this window's {slots} attention slot(s) are used"
        ))
        .with_reason("slots_used")
        .with_detail("slots", slots));
    }
    Ok(())
}

/// What a reward request does to a prompt in a given state.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RewardStep {
    /// Fix the scores (the prompt becomes `rewarding`), then mint.
    Begin,
    /// The same scores are fixed already and the mint may not have happened: mint again (its
    /// idempotency id makes that harmless), then finish.
    Resume,
    /// Rewarded already with these scores: answer with the first outcome.
    Done,
}

/// The step a reward with `asked` scores takes on a prompt in `status` (its scores `fixed`,
/// whether it is past its expiry).
pub fn reward_step(
    status: Status,
    fixed: Option<Scores>,
    past_expiry: bool,
    asked: Scores,
) -> Result<RewardStep, RpcError> {
    match status {
        Status::Pending if past_expiry => Err(expired()),
        Status::Pending => Ok(RewardStep::Begin),
        Status::Rewarding | Status::Rewarded if fixed != Some(asked) => {
            let fixed =
                fixed.map(|s| format!("{}/{}/{}", s.interesting, s.useful, s.understandable));
            Err(
                RpcError::conflict("the prompt was already rewarded with different scores")
                    .with_reason("already_rewarded")
                    .with_detail("scores", fixed.unwrap_or_default()),
            )
        }
        Status::Rewarding => Ok(RewardStep::Resume),
        Status::Rewarded => Ok(RewardStep::Done),
        Status::Dismissed => Err(RpcError::failed_precondition("the prompt was dismissed")
            .with_reason("prompt_dismissed")),
        Status::Expired => Err(expired()),
    }
}

/// Whether a dismissal changes a prompt in `status` (`false`: dismissed already, answer as is).
pub fn dismiss_step(status: Status, past_expiry: bool) -> Result<bool, RpcError> {
    match status {
        Status::Pending if past_expiry => Err(expired()),
        Status::Pending => Ok(true),
        Status::Dismissed => Ok(false),
        Status::Rewarding | Status::Rewarded => {
            Err(RpcError::failed_precondition("the prompt was rewarded")
                .with_reason("prompt_rewarded"))
        }
        Status::Expired => Err(expired()),
    }
}

fn expired() -> RpcError {
    RpcError::failed_precondition("the prompt expired unanswered").with_reason("prompt_expired")
}

pub use syntropism_contracts::rpc::fitting;

#[cfg(test)]
mod tests {
    use syntropism_contracts::ErrorCode;

    use super::*;

    fn scores(i: u32, u: u32, un: u32) -> Scores {
        Scores {
            interesting: i,
            useful: u,
            understandable: un,
        }
    }

    #[test]
    fn the_reward_is_the_sum_of_scores_times_the_weight() {
        let weight = 50 * 1_000_000;
        assert_eq!(reward_micros(scores(7, 5, 8), weight), Some(1_000_000_000));
        assert_eq!(reward_micros(scores(0, 0, 0), weight), Some(0));
        assert_eq!(
            reward_micros(scores(10, 10, 10), weight),
            Some(1_500_000_000)
        );
        assert_eq!(reward_micros(scores(10, 10, 10), 1), Some(30));
        assert_eq!(
            reward_micros(scores(10, 10, 10), i64::MAX / 30),
            Some(i64::MAX / 30 * 30)
        );
        assert_eq!(reward_micros(scores(10, 10, 10), i64::MAX / 29), None);
    }

    #[test]
    fn scores_above_ten_or_missing_are_refused() {
        let ok = pb::Scores {
            interesting: 10,
            useful: 0,
            understandable: 3,
        };
        assert_eq!(Scores::from_pb(Some(&ok)).unwrap(), scores(10, 0, 3));
        let error = Scores::from_pb(None).unwrap_err();
        assert_eq!(
            (error.code, error.reason.as_str()),
            (ErrorCode::InvalidArgument, "missing_field")
        );
        for bad in [
            pb::Scores {
                interesting: 11,
                ..ok
            },
            pb::Scores { useful: 11, ..ok },
            pb::Scores {
                understandable: u32::MAX,
                ..ok
            },
        ] {
            let error = Scores::from_pb(Some(&bad)).unwrap_err();
            assert_eq!(error.code, ErrorCode::InvalidArgument);
            assert_eq!(error.reason, "invalid_score");
        }
    }

    #[test]
    fn content_must_be_present_and_within_the_cap() {
        assert!(check_content("hello", 5).is_ok());
        let error = check_content("hello!", 5).unwrap_err();
        assert_eq!(error.code, ErrorCode::PayloadTooLarge);
        assert_eq!(error.reason, "prompt_too_large");
        // Bytes, not characters.
        assert!(check_content("ééé", 5).is_err());
        for empty in ["", "  \n\t"] {
            let error = check_content(empty, 5).unwrap_err();
            assert_eq!(
                (error.code, error.reason.as_str()),
                (ErrorCode::InvalidArgument, "empty_prompt")
            );
        }
        assert!(check_reason("", 0).is_ok());
        assert_eq!(check_reason("x", 0).unwrap_err().reason, "reason_too_long");
    }

    #[test]
    fn slots_bound_the_prompts_of_a_window() {
        assert_eq!(check_slots(0, 0).unwrap_err().reason, "no_attention");
        assert!(check_slots(1, 0).is_ok());
        assert_eq!(check_slots(1, 1).unwrap_err().reason, "slots_used");
        assert!(check_slots(3, 2).is_ok());
        assert_eq!(
            check_slots(3, 3).unwrap_err().code,
            ErrorCode::FailedPrecondition
        );
    }

    #[test]
    fn a_prompt_is_rewarded_once_with_one_set_of_scores() {
        let s = scores(1, 2, 3);
        let other = scores(3, 2, 1);
        assert_eq!(
            reward_step(Status::Pending, None, false, s),
            Ok(RewardStep::Begin)
        );
        assert_eq!(
            reward_step(Status::Rewarding, Some(s), false, s),
            Ok(RewardStep::Resume)
        );
        assert_eq!(
            reward_step(Status::Rewarded, Some(s), true, s),
            Ok(RewardStep::Done)
        );
        for status in [Status::Rewarding, Status::Rewarded] {
            let error = reward_step(status, Some(s), false, other).unwrap_err();
            assert_eq!(
                (error.code, error.reason.as_str()),
                (ErrorCode::Conflict, "already_rewarded")
            );
        }
        let error = reward_step(Status::Pending, None, true, s).unwrap_err();
        assert_eq!(
            (error.code, error.reason.as_str()),
            (ErrorCode::FailedPrecondition, "prompt_expired")
        );
        let error = reward_step(Status::Expired, None, true, s).unwrap_err();
        assert_eq!(error.reason, "prompt_expired");
        let error = reward_step(Status::Dismissed, None, false, s).unwrap_err();
        assert_eq!(
            (error.code, error.reason.as_str()),
            (ErrorCode::FailedPrecondition, "prompt_dismissed")
        );
    }

    #[test]
    fn only_a_pending_prompt_can_be_dismissed() {
        assert_eq!(dismiss_step(Status::Pending, false), Ok(true));
        assert_eq!(dismiss_step(Status::Dismissed, false), Ok(false));
        assert_eq!(
            dismiss_step(Status::Pending, true).unwrap_err().reason,
            "prompt_expired"
        );
        assert_eq!(
            dismiss_step(Status::Expired, true).unwrap_err().reason,
            "prompt_expired"
        );
        assert_eq!(
            dismiss_step(Status::Rewarded, false).unwrap_err().reason,
            "prompt_rewarded"
        );
        assert_eq!(
            dismiss_step(Status::Rewarding, false).unwrap_err().reason,
            "prompt_rewarded"
        );
    }

    #[test]
    fn statuses_round_trip_and_rewarding_shows_as_pending() {
        for s in [
            Status::Pending,
            Status::Rewarding,
            Status::Rewarded,
            Status::Dismissed,
            Status::Expired,
        ] {
            assert_eq!(Status::named(s.as_str()), Some(s));
        }
        assert_eq!(Status::named("other"), None);
        assert_eq!(Status::Rewarding.to_pb(), pb::PromptStatus::Pending);
        assert_eq!(Status::Expired.to_pb(), pb::PromptStatus::Expired);
    }
}
