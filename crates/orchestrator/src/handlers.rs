//! The orchestrator's NATS methods: agent-facing (`self`, `directory`, `spawn`), internal
//! (`window`, `get_agent`) and operator (`status`, `agents`, `agent`).

use std::sync::Arc;

use syntropism_contracts::economy::internal as economy;
use syntropism_contracts::market::admin as market_admin;
use syntropism_contracts::orchestrator::{admin, agent, internal};
use syntropism_contracts::{AgentId, RequestContext, RpcError, RpcServer, pb};

use crate::Orchestrator;
use crate::store::timestamp;
use crate::ticks::agent_ref;

impl Orchestrator {
    async fn record(&self, id: AgentId) -> Result<pb::Agent, RpcError> {
        self.store
            .agent(id)
            .await?
            .filter(|a| !a.spawning)
            .map(|a| a.agent)
            .ok_or_else(|| {
                RpcError::not_found(format!("no agent {id}")).with_reason("agent_not_found")
            })
    }

    async fn self_record(&self, caller: AgentId) -> Result<pb::SelfResponse, RpcError> {
        let agent = self.record(caller).await?;
        let (current, _) = self.store.window(caller).await?;
        Ok(pb::SelfResponse {
            agent: Some(agent),
            current,
        })
    }

    async fn directory(&self) -> Result<pb::DirectoryResponse, RpcError> {
        let agents = self.store.agents(&["alive", "dormant"]).await?;
        Ok(pb::DirectoryResponse {
            agents: agents
                .into_iter()
                .map(|a| pb::DirectoryEntry {
                    agent_id: a.agent_id,
                    status: a.status,
                })
                .collect(),
        })
    }

    async fn window_of(&self, id: AgentId) -> Result<pb::WindowResponse, RpcError> {
        let (execution, previous) = self.store.window(id).await?;
        Ok(pb::WindowResponse {
            execution,
            previous_started_at: previous.map(timestamp),
        })
    }

    async fn status(&self) -> Result<pb::StatusResponse, RpcError> {
        let census = self.store.census().await?;
        let (tick, tick_duration_ms) = self.store.last_finished_tick().await?.unwrap_or((0, 0));
        let running = self.store.open_executions().await?.len() as u32;
        let audit = self.call::<economy::Audit>(&pb::AuditRequest {}).await?;
        let market = self
            .call::<market_admin::State>(&pb::MarketStateRequest { rounds: 1 })
            .await?;
        let catalogue = market.catalogue.unwrap_or_default();
        Ok(pb::StatusResponse {
            tick,
            tick_duration_ms,
            alive: census.alive,
            dormant: census.dormant,
            dead: census.dead,
            running_executions: running,
            leader: self.store.leader().await?,
            minted_micros: audit.minted_micros,
            burned_micros: audit.burned_micros,
            agents_micros: audit.agents_micros,
            audit_ok: audit.ok,
            audit_violations: audit.violations,
            supply: catalogue.supply,
            reserve: catalogue.reserve,
            discovered: market.discovered,
            executions_total: self.store.execution_count().await?,
        })
    }

    async fn list(&self, status: pb::AgentStatus) -> Result<pb::ListAgentsResponse, RpcError> {
        let statuses: &[&str] = match status {
            pb::AgentStatus::Unspecified => &["alive", "dormant", "dead"],
            pb::AgentStatus::Alive => &["alive"],
            pb::AgentStatus::Dormant => &["dormant"],
            pb::AgentStatus::Dead => &["dead"],
        };
        Ok(pb::ListAgentsResponse {
            agents: self.store.agents(statuses).await?,
        })
    }

    async fn detail(
        &self,
        request: pb::AgentDetailRequest,
    ) -> Result<pb::AgentDetailResponse, RpcError> {
        let id = AgentId::parse(&request.agent_id, "agent_id")?;
        let agent = self.record(id).await?;
        let limit = match request.executions {
            0 => 10,
            n => n.min(100),
        };
        let executions = self
            .store
            .executions_of(id, limit)
            .await?
            .into_iter()
            .map(|e| e.execution)
            .collect();
        let account = self
            .call::<economy::Balance>(&pb::BalanceRequest {
                account: agent_ref(&id),
            })
            .await
            .ok()
            .and_then(|b| b.account)
            .unwrap_or_default();
        Ok(pb::AgentDetailResponse {
            agent: Some(agent),
            executions,
            balance_micros: account.balance_micros,
            available_micros: account.available_micros,
        })
    }
}

/// Serves every method of the orchestrator.
pub async fn register(rpc: &mut RpcServer, o: Arc<Orchestrator>) -> anyhow::Result<()> {
    let s = o.clone();
    rpc.serve::<agent::SelfRecord, _, _>(move |cx: RequestContext, _| {
        let s = s.clone();
        async move { s.self_record(cx.caller()?).await }
    })
    .await?;
    let s = o.clone();
    rpc.serve::<agent::Directory, _, _>(move |_: RequestContext, _| {
        let s = s.clone();
        async move { s.directory().await }
    })
    .await?;
    let s = o.clone();
    rpc.serve::<agent::Spawn, _, _>(move |cx: RequestContext, request| {
        let s = s.clone();
        async move { s.spawn(cx.caller()?, request).await }
    })
    .await?;
    let s = o.clone();
    rpc.serve::<internal::Window, _, _>(move |_: RequestContext, request: pb::WindowRequest| {
        let s = s.clone();
        async move {
            let id = AgentId::parse(&request.agent_id, "agent_id")?;
            s.window_of(id).await
        }
    })
    .await?;
    let s = o.clone();
    rpc.serve::<internal::GetAgent, _, _>(
        move |_: RequestContext, request: pb::GetAgentRequest| {
            let s = s.clone();
            async move {
                let id = AgentId::parse(&request.agent_id, "agent_id")?;
                Ok(pb::GetAgentResponse {
                    agent: Some(s.record(id).await?),
                })
            }
        },
    )
    .await?;
    let s = o.clone();
    rpc.serve::<admin::Status, _, _>(move |_: RequestContext, _| {
        let s = s.clone();
        async move { s.status().await }
    })
    .await?;
    let s = o.clone();
    rpc.serve::<admin::ListAgents, _, _>(
        move |_: RequestContext, request: pb::ListAgentsRequest| {
            let s = s.clone();
            async move { s.list(request.status()).await }
        },
    )
    .await?;
    rpc.serve::<admin::AgentDetail, _, _>(move |_: RequestContext, request| {
        let s = o.clone();
        async move { s.detail(request).await }
    })
    .await?;
    Ok(())
}
