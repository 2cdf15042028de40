//! The orchestrator (DESIGN.md §4): the agent registry and the loop that keeps the economy
//! running.
//!
//! - [`life`]: alive, dormant or dead, as a pure rule.
//! - [`store`]: agents, executions, ticks, the leader's lease, genesis and spawns in Postgres.
//! - [`workspace`]: workspaces on the host (genesis, a child's copy, the archive of the dead).
//! - [`ticks`]: leader election, the tick (clear → executions → credentials → runners →
//!   outcomes → life and death) and genesis.
//! - [`spawn`]: a child born from its parent's credits, all or nothing.
//! - [`handlers`]: the NATS methods (agent-facing, internal, operator).
//! - `earnings`: rewards (attention's events) added to the registry's totals.

pub mod config;
mod earnings;
pub mod handlers;
pub mod life;
pub mod spawn;
pub mod store;
pub mod ticks;
pub mod workspace;

use std::collections::HashSet;
use std::sync::{Arc, Mutex};

use anyhow::Context as _;
use diesel_migrations::{EmbeddedMigrations, embed_migrations};
use syntropism_contracts::subjects::services;
use syntropism_contracts::{Method, RpcClient, RpcError};
use syntropism_identity::Authority;
use syntropism_platform::Service;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

pub use config::OrchestratorConfig;
use config::OrchestratorSection;

/// `migrations/orchestrator/`, compiled into the binary.
pub const MIGRATIONS: EmbeddedMigrations = embed_migrations!("../../migrations/orchestrator");

/// One orchestrator replica.
pub struct Orchestrator {
    config: OrchestratorSection,
    replica: String,
    store: store::Store,
    client: RpcClient,
    authority: Authority,
    outbox: Arc<Notify>,
    /// Executions this replica is carrying (dispatching or awaiting), so none is carried twice.
    carrying: Mutex<HashSet<String>>,
    /// Woken (one waiter at a time) when a run ends, so a window waiting for a runner with
    /// room tries again at once instead of at its next poll.
    room: Notify,
    /// Held (write) by a tick from clearing a round until its executions are recorded, and
    /// (read) by every settling of an agent's status.
    tick_gate: tokio::sync::RwLock<()>,
    windows: TaskTracker,
    stop: CancellationToken,
}

impl std::fmt::Debug for Orchestrator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Orchestrator")
            .field("replica", &self.replica)
            .finish_non_exhaustive()
    }
}

impl Orchestrator {
    /// A call to another service, retried on retryable failures (every mutation it makes
    /// carries an idempotency id, so a retry is safe).
    async fn call<M: Method>(&self, request: &M::Request) -> Result<M::Response, RpcError> {
        self.client.call_retrying::<M>(request).await
    }

    /// An agent-facing call made on an agent's behalf (the orchestrator's credentials may).
    async fn call_as<M: Method>(
        &self,
        agent: &syntropism_contracts::AgentId,
        request: &M::Request,
    ) -> Result<M::Response, RpcError> {
        self.client.call_as_retrying::<M>(agent, request).await
    }

    pub fn replica(&self) -> &str {
        &self.replica
    }
}

fn default_replica_id() -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap_or_default();
    format!("{}-{}", host.trim(), std::process::id())
}

/// Starts a replica: connections and migrations, the handlers, and the leader loop (which
/// runs genesis once and then the ticks while this replica leads). Call [`Service::run`] to
/// serve until `stop` fires.
pub async fn start(
    config: &OrchestratorConfig,
    stop: CancellationToken,
) -> anyhow::Result<Service> {
    let section = config.service.clone();
    let authority = Authority::load(&section.identity_dir).with_context(|| {
        format!(
            "orchestrator.identity_dir {}: the NATS keys that sign executions' credentials \
             (create them with `just nats-config`)",
            section.identity_dir.display()
        )
    })?;
    std::fs::create_dir_all(&section.workspace_root).with_context(|| {
        format!(
            "orchestrator.workspace_root {}",
            section.workspace_root.display()
        )
    })?;
    let mut service = Service::start(
        services::ORCHESTRATOR,
        &config.platform,
        MIGRATIONS,
        stop.clone(),
    )
    .await?;
    let replica = if section.replica_id.is_empty() {
        default_replica_id()
    } else {
        section.replica_id.clone()
    };
    let orchestrator = Arc::new(Orchestrator {
        config: section,
        replica,
        store: store::Store::new(service.pool.clone()),
        client: service.client(),
        authority,
        outbox: service.outbox.clone(),
        carrying: Mutex::new(HashSet::new()),
        room: Notify::new(),
        tick_gate: tokio::sync::RwLock::new(()),
        windows: TaskTracker::new(),
        stop: stop.clone(),
    });
    handlers::register(&mut service.rpc, orchestrator.clone()).await?;
    tokio::spawn(orchestrator.clone().lead());
    tokio::spawn(orchestrator.clone().follow_earnings(service.nats.clone()));
    tracing::info!(replica = %orchestrator.replica, "orchestrator ready");
    Ok(service)
}
