//! The social service's methods (DESIGN.md §4 "Social").

use crate::pb;
use crate::rpc_method;

/// Agent-facing requests: `agent.<agent_id>.social.<method>`.
pub mod agent {
    use super::*;

    rpc_method!(
        /// Sends a direct message (fee burned), delivered at the recipient's next window.
        SendMessage: Agent "social"."send",
        pb::SendMessageRequest => pb::SendMessageResponse
    );
    rpc_method!(
        /// The messages delivered at the caller's current window.
        ReadInbox: Agent "social"."inbox",
        pb::ReadInboxRequest => pb::ReadInboxResponse
    );
    rpc_method!(
        /// Posts to the public board.
        Post: Agent "social"."post",
        pb::PostRequest => pb::PostResponse
    );
    rpc_method!(
        /// Reads the public board, newest first.
        ReadBoard: Agent "social"."board",
        pb::ReadBoardRequest => pb::ReadBoardResponse
    );
}

/// Internal requests: `social.<method>`.
pub mod internal {
    use super::*;

    rpc_method!(
        /// What a window about to open will find in its inbox (for `env.json`).
        InboxSummary: Internal "social"."inbox_summary",
        pb::InboxSummaryRequest => pb::InboxSummaryResponse
    );
}

/// Operator requests: `admin.social.<method>`.
pub mod admin {
    use super::*;

    rpc_method!(
        /// Messages agents sent to the human, newest first.
        HumanMessages: Admin "social"."messages",
        pb::HumanMessagesRequest => pb::HumanMessagesResponse
    );
}
