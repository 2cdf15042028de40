//! The orchestrator's methods (DESIGN.md §4 "Execution windows", "Life and death").

use crate::pb;
use crate::rpc_method;

/// A spawn request carries at most this many bytes of files.
pub const MAX_SPAWN_REQUEST_BYTES: usize = 768 * 1024;

/// Agent-facing requests: `agent.<agent_id>.orchestrator.<method>`.
pub mod agent {
    use super::*;

    rpc_method!(
        /// The caller's own record and its current window.
        SelfRecord: Agent "orchestrator"."self",
        pb::SelfRequest => pb::SelfResponse
    );
    rpc_method!(
        /// The living agents: ids and status, never code.
        Directory: Agent "orchestrator"."directory",
        pb::DirectoryRequest => pb::DirectoryResponse
    );
    rpc_method!(
        /// Spawns a child: fee burned, endowment and first bid funded by the caller.
        Spawn: Agent "orchestrator"."spawn",
        pb::SpawnRequest => pb::SpawnResponse,
        max_request_bytes = super::MAX_SPAWN_REQUEST_BYTES
    );
}

/// Internal requests: `orchestrator.<method>`.
pub mod internal {
    use super::*;

    rpc_method!(
        /// The execution an agent runs in now, if any.
        Window: Internal "orchestrator"."window",
        pb::WindowRequest => pb::WindowResponse
    );
    rpc_method!(
        /// One agent's record.
        GetAgent: Internal "orchestrator"."get_agent",
        pb::GetAgentRequest => pb::GetAgentResponse
    );
}

/// Operator requests: `admin.orchestrator.<method>`.
pub mod admin {
    use super::*;

    rpc_method!(
        /// The tick, the population, the money supply and the market at a glance.
        Status: Admin "orchestrator"."status",
        pb::StatusRequest => pb::StatusResponse
    );
    rpc_method!(
        /// Every agent's record.
        ListAgents: Admin "orchestrator"."agents",
        pb::ListAgentsRequest => pb::ListAgentsResponse
    );
    rpc_method!(
        /// One agent: record, lineage, balance, latest executions with outcome and log tail.
        AgentDetail: Admin "orchestrator"."agent",
        pb::AgentDetailRequest => pb::AgentDetailResponse
    );
}
