//! The attention service's methods (DESIGN.md §4 "Attention").

use crate::pb;
use crate::rpc_method;

/// Agent-facing requests: `agent.<agent_id>.attention.<method>`.
pub mod agent {
    use super::*;

    rpc_method!(
        /// Shows the human a prompt (only in a window whose bundle includes attention).
        SubmitPrompt: Agent "attention"."prompt",
        pb::SubmitPromptRequest => pb::SubmitPromptResponse
    );
}

/// Operator requests: `admin.attention.<method>`.
pub mod admin {
    use super::*;

    rpc_method!(
        /// Pending prompts, most paid for first.
        PendingPrompts: Admin "attention"."pending",
        pb::PendingPromptsRequest => pb::PendingPromptsResponse
    );
    rpc_method!(
        /// Scores a prompt; the reward is minted to its agent exactly once.
        Reward: Admin "attention"."reward",
        pb::RewardRequest => pb::RewardResponse
    );
    rpc_method!(
        /// Sets a prompt aside without a reward.
        Dismiss: Admin "attention"."dismiss",
        pb::DismissRequest => pb::DismissResponse
    );
}
