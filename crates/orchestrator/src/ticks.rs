//! Leadership and the tick: each tick, the leader clears a round, opens the winners'
//! windows, and settles who lives.
//!
//! One replica leads at a time: it holds a lease in Postgres, renewed every tick, and every
//! tick it begins is fenced by the lease's term. A replacement takes over once the lease
//! expires (`lease_ms`). Nothing a tick does is harmed by a second attempt: clearing is
//! idempotent per round, executions are keyed by round and bid, a run is keyed by execution
//! and sent with the same bytes, and money moves only with idempotency ids. So a tick cut off
//! half-way is simply done again by the next leader, and no allocation runs twice.

use std::sync::Arc;
use std::time::{Duration, Instant};

use chrono::Utc;
use syntropism_contracts::economy::internal as economy;
use syntropism_contracts::market::internal as market;
use syntropism_contracts::sandbox::internal as sandbox;
use syntropism_contracts::scheduler::{agent as scheduler_agent, internal as scheduler};
use syntropism_contracts::social::internal as social;
use syntropism_contracts::subjects::{orchestrator_events, services};
use syntropism_contracts::{AgentId, ErrorCode, RpcError, events, pb};
use syntropism_identity::ExecutionGrant;
use syntropism_platform::outbox::PendingEvent;

use crate::life::{self, Facts};
use crate::store::{StoredExecution, timestamp};
use crate::{Orchestrator, workspace};

pub(crate) fn event<M: prost::Message + prost::Name>(
    subject: &str,
    payload: &M,
    correlation: &str,
) -> PendingEvent {
    PendingEvent {
        subject: subject.into(),
        envelope: events::envelope(services::ORCHESTRATOR, payload, correlation, correlation),
    }
}

pub(crate) fn agent_ref(agent: &AgentId) -> Option<pb::AccountRef> {
    Some(pb::AccountRef {
        account: Some(pb::account_ref::Account::AgentId(agent.to_string())),
    })
}

impl Orchestrator {
    /// Runs for the replica's life: while it holds the lease, genesis (once) and the ticks.
    pub(crate) async fn lead(self: Arc<Self>) {
        let period = Duration::from_millis(self.config.tick_ms);
        let mut term = None;
        loop {
            let began = Instant::now();
            match self.store.lease(&self.replica, self.config.lease_ms).await {
                Ok(Some(now)) => {
                    if term != Some(now) {
                        tracing::info!(replica = %self.replica, term = now, "leading the ticks");
                        term = Some(now);
                        self.take_over().await;
                    }
                    if let Err(error) = self.tick(now, began).await {
                        tracing::warn!(%error, "tick failed; it is done again next time");
                    }
                }
                Ok(None) => {
                    if term.take().is_some() {
                        tracing::warn!(replica = %self.replica, "lost the lease");
                    }
                }
                Err(error) => tracing::warn!(%error, "lease check failed"),
            }
            // A tick that overran starts the next one at once; ticks never stack.
            let wait = period.saturating_sub(began.elapsed());
            tokio::select! {
                _ = self.stop.cancelled() => break,
                _ = tokio::time::sleep(wait) => {}
            }
        }
        if term.is_some() {
            let _ = self.store.resign(&self.replica).await;
        }
        self.windows.close();
    }

    /// What a new leader picks up: genesis if unfinished, the windows another leader left
    /// open, and spawns left half-way.
    async fn take_over(self: &Arc<Self>) {
        if let Err(error) = self.genesis().await {
            tracing::warn!(%error, "genesis failed; tried again next tick");
        }
        match self.store.open_executions().await {
            Ok(open) => {
                for execution in open {
                    self.carry(execution);
                }
            }
            Err(error) => tracing::warn!(%error, "listing open executions failed"),
        }
        self.resume_spawns().await;
    }

    /// One tick under lease term `term`.
    async fn tick(self: &Arc<Self>, term: i64, began: Instant) -> Result<(), RpcError> {
        let tick = match self.store.last_tick().await? {
            Some((last, false)) => last,
            Some((last, true)) => last + 1,
            None => 1,
        };
        if !self.store.begin_tick(tick, &self.replica, term).await? {
            return Err(RpcError::unavailable("the lease moved to another replica"));
        }
        // Genesis until it is done (normally once, at the first tick).
        if let Err(error) = self.genesis().await {
            tracing::warn!(%error, "genesis failed; tried again next tick");
        }
        // From the round's clearing to its executions' records, no agent is settled.
        let gate = self.tick_gate.write().await;
        let cleared = self
            .call::<scheduler::Clear>(&pb::ClearRequest { round: tick })
            .await?;
        self.store
            .create_executions(tick, &cleared.allocations)
            .await?;
        drop(gate);
        // This round's windows, and any earlier one a failure left open (each is carried by one
        // task at a time).
        for execution in self.store.open_executions().await? {
            self.carry(execution);
        }
        self.resume_spawns().await;
        // An agent is settled when its window ends; the sweep over everyone (for bids that
        // expired, sponsors, balances) runs every few ticks.
        if tick % self.config.settle_every_ticks == 0 {
            self.settle_all().await;
        }
        let census = self.store.census().await?;
        let duration = began.elapsed();
        let overran = duration > Duration::from_millis(self.config.tick_ms);
        if overran {
            tracing::warn!(
                tick,
                duration_ms = duration.as_millis() as u64,
                period_ms = self.config.tick_ms,
                "tick overran its period"
            );
        }
        let completed = pb::TickCompleted {
            tick,
            duration_ms: duration.as_millis() as u64,
            overran,
            allocations: cleared.allocations.len() as u32,
            alive: census.alive,
            dormant: census.dormant,
            dead: census.dead,
            leader: self.replica.clone(),
        };
        self.store
            .finish_tick(
                tick,
                completed.allocations,
                completed.duration_ms,
                overran,
                event(
                    orchestrator_events::TICK_COMPLETED,
                    &completed,
                    &format!("tick/{tick}"),
                ),
            )
            .await?;
        self.outbox.notify_one();
        tracing::info!(
            tick,
            allocations = completed.allocations,
            alive = census.alive,
            dormant = census.dormant,
            dead = census.dead,
            duration_ms = completed.duration_ms,
            "tick"
        );
        Ok(())
    }

    /// Genesis, once: the genesis agent from its template, its endowment minted as a genesis
    /// grant, its first bid. Every step is idempotent; it is done when the bid stands.
    pub(crate) async fn genesis(&self) -> Result<(), RpcError> {
        let (agent, done) = self.store.genesis(AgentId::random()).await?;
        if done {
            return Ok(());
        }
        let id = agent.to_string();
        let born = pb::AgentBorn {
            agent: Some(pb::Agent {
                agent_id: id.clone(),
                status: pb::AgentStatus::Alive as i32,
                earned_micros: self.config.genesis_endowment_micros,
                ..Default::default()
            }),
            cause: "genesis".into(),
        };
        self.store
            .insert_agent(
                agent,
                "alive",
                &[],
                self.config.genesis_endowment_micros,
                Some(event(orchestrator_events::AGENT_BORN, &born, "genesis")),
            )
            .await?;
        if std::fs::symlink_metadata(self.config.workspace_root.join(&id)).is_err() {
            let caps = workspace::Caps {
                max_files: 1024,
                max_file_bytes: 16 << 20,
                max_total_bytes: 64 << 20,
            };
            let files = workspace::code_files(&self.config.genesis_dir, caps);
            if files.is_empty() {
                return Err(RpcError::failed_precondition(format!(
                    "orchestrator.genesis_dir {} holds no code files",
                    self.config.genesis_dir.display()
                )));
            }
            workspace::create(&self.config.workspace_root, &id, &files)
                .map_err(|e| RpcError::internal(e.to_string()))?;
        }
        self.call::<economy::OpenAccount>(&pb::OpenAccountRequest {
            idempotency_id: "genesis:open".into(),
            op: Some(pb::OpenAccountOp {
                agent_id: id.clone(),
            }),
        })
        .await?;
        self.call::<economy::Mint>(&pb::MintRequest {
            idempotency_id: "genesis:grant".into(),
            op: Some(pb::MintOp {
                agent_id: id.clone(),
                amount_micros: self.config.genesis_endowment_micros,
                reason: pb::MintReason::GenesisGrant as i32,
                memo: "genesis grant".into(),
            }),
        })
        .await?;
        self.call_as::<scheduler_agent::PlaceBid>(
            &agent,
            &pb::PlaceBidRequest {
                idempotency_id: "genesis:first-bid".into(),
                bundle: Some(self.config.genesis_bundle.to_pb()),
                amount_micros: self.config.genesis_bid_micros,
                ..Default::default()
            },
        )
        .await?;
        self.store.genesis_done().await?;
        tracing::info!(agent = %id, "genesis: the first agent is born");
        Ok(())
    }

    /// Carries an execution to its end in the background (once per replica): dispatch to a
    /// runner, await the outcome, record it, settle the agent.
    pub(crate) fn carry(self: &Arc<Self>, execution: StoredExecution) {
        let id = execution.execution.execution_id.clone();
        if !self
            .carrying
            .lock()
            .expect("carrying lock")
            .insert(id.clone())
        {
            return;
        }
        let this = self.clone();
        self.windows.spawn(async move {
            let agent = execution.execution.agent_id.clone();
            // A replica that stops leaves its windows open; the next leader carries them.
            let carried = tokio::select! {
                _ = this.stop.cancelled() => return,
                carried = this.window(execution) => carried,
            };
            if let Err(error) = carried {
                tracing::warn!(execution = %id, %error, "window not carried to its end");
            }
            this.carrying.lock().expect("carrying lock").remove(&id);
            if let Ok(agent) = AgentId::parse(&agent, "agent_id") {
                this.settle(agent).await;
            }
        });
    }

    /// The run request of a new window: credentials valid until its deadline, facts for
    /// `env.json`.
    async fn run_request(
        &self,
        execution: &pb::Execution,
        deadline: chrono::DateTime<Utc>,
    ) -> Result<pb::RunRequest, RpcError> {
        let agent = AgentId::parse(&execution.agent_id, "agent_id")?;
        let balance = self
            .call::<economy::Balance>(&pb::BalanceRequest {
                account: agent_ref(&agent),
            })
            .await?
            .account
            .unwrap_or_default();
        let grant = ExecutionGrant {
            agent_id: execution.agent_id.clone(),
            inbox_prefix: ExecutionGrant::inbox_prefix_for(
                &execution.agent_id,
                &execution.execution_id,
            ),
            expires_at: deadline.timestamp() + 1,
            name: execution.execution_id.clone(),
        };
        // What the window will find in its inbox (one attempt: a window opens without it).
        let inbox = match self
            .client
            .call::<social::InboxSummary>(&pb::InboxSummaryRequest {
                agent_id: execution.agent_id.clone(),
                window_start: Some(timestamp(Utc::now())),
            })
            .await
        {
            Ok(summary) => format!(
                r#"{{"count":{},"senders":[{}]}}"#,
                summary.count,
                summary
                    .senders
                    .iter()
                    .map(|s| format!("{s:?}"))
                    .collect::<Vec<_>>()
                    .join(",")
            ),
            Err(error) => {
                tracing::debug!(%error, "no inbox summary for a window");
                String::new()
            }
        };
        let credentials = self
            .authority
            .execution(&grant)
            .map_err(|e| RpcError::internal(format!("signing credentials: {e}")))?;
        Ok(pb::RunRequest {
            execution_id: execution.execution_id.clone(),
            agent_id: execution.agent_id.clone(),
            bundle: execution.bundle,
            deadline: Some(timestamp(deadline)),
            image: String::new(),
            env: Default::default(),
            credentials: credentials.to_creds_file(),
            inbox_prefix: grant.inbox_prefix,
            debug: self.config.debug_agents.contains(&execution.agent_id),
            balance_micros: balance.available_micros,
            inbox_json: inbox,
            traceparent: syntropism_contracts::trace::current_traceparent().unwrap_or_default(),
        })
    }

    async fn window(&self, stored: StoredExecution) -> Result<(), RpcError> {
        let execution = stored.execution;
        let request = match stored.request {
            Some(request) => request,
            None => {
                let duration = execution.bundle.unwrap_or_default().duration_ms;
                let deadline = Utc::now() + chrono::Duration::milliseconds(duration as i64);
                let request = self.run_request(&execution, deadline).await?;
                let mut started = execution.clone();
                started.set_status(pb::ExecutionStatus::Running);
                started.deadline = request.deadline;
                started.started_at = Some(timestamp(Utc::now()));
                self.store
                    .dispatch(
                        &execution.execution_id,
                        &request,
                        deadline,
                        event(
                            orchestrator_events::EXECUTION_STARTED,
                            &pb::ExecutionChanged {
                                execution: Some(started),
                            },
                            &execution.execution_id,
                        ),
                    )
                    .await?
            }
        };
        self.outbox.notify_one();
        let run = self.run(request).await;
        let id = execution.execution_id.clone();
        self.store
            .finish_execution(&id, &run, |mut finished| {
                finished.run = Some(run.clone());
                event(
                    orchestrator_events::EXECUTION_FINISHED,
                    &pb::ExecutionChanged {
                        execution: Some(finished),
                    },
                    &id,
                )
            })
            .await?;
        self.outbox.notify_one();
        Ok(())
    }

    /// Asks the runners for `request` until one answers with the run's end; past the deadline
    /// (plus grace) with no runner holding it, the window failed.
    async fn run(&self, mut request: pb::RunRequest) -> pb::RunRecord {
        let grace = chrono::Duration::milliseconds(self.config.run_grace_ms as i64);
        let failed = |request: &pb::RunRequest, message: String| pb::RunRecord {
            execution_id: request.execution_id.clone(),
            agent_id: request.agent_id.clone(),
            status: pb::RunStatus::Finished as i32,
            outcome: pb::RunOutcome::Failed as i32,
            exit_code: -1,
            bundle: request.bundle,
            error: message,
            finished_at: Some(timestamp(Utc::now())),
            ..Default::default()
        };
        let waiting_since = Instant::now();
        loop {
            let deadline = request
                .deadline
                .as_ref()
                .and_then(|t| chrono::DateTime::from_timestamp(t.seconds, t.nanos.max(0) as u32))
                .unwrap_or_else(Utc::now);
            let left = (deadline + grace - Utc::now())
                .to_std()
                .unwrap_or(Duration::ZERO);
            let client = self
                .client
                .clone()
                .with_timeout(left.max(Duration::from_secs(1)));
            match client.call::<sandbox::Run>(&request).await {
                Ok(response) => {
                    // The run's room is free again: the longest-waiting window may take it.
                    self.room.notify_one();
                    return response
                        .run
                        .unwrap_or_else(|| failed(&request, "no record".into()));
                }
                // Every runner is full: no runner holds the run, so its window has not begun.
                // It waits for room (at most `capacity_wait_ms`): until a run this replica
                // carries ends, or `capacity_poll_ms` for room it cannot see (other runners,
                // other replicas). Once half its time is gone, it begins again with a fresh
                // deadline and fresh credentials.
                Err(error) if error.reason == "no_capacity" => {
                    if waiting_since.elapsed() > Duration::from_millis(self.config.capacity_wait_ms)
                    {
                        return failed(&request, format!("no runner had room: {error}"));
                    }
                    tokio::select! {
                        _ = self.room.notified() => {}
                        _ = tokio::time::sleep(Duration::from_millis(self.config.capacity_poll_ms)) => {}
                    }
                    let duration = request.bundle.unwrap_or_default().duration_ms as i64;
                    if deadline - Utc::now() < chrono::Duration::milliseconds(duration / 2) {
                        match self.renew(&request).await {
                            Ok(renewed) => request = renewed,
                            Err(error) => return failed(&request, error.to_string()),
                        }
                    }
                }
                Err(error) if error.is_retryable() && Utc::now() < deadline + grace => {
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
                Err(error) if error.is_retryable() => {
                    // Past the deadline: whatever holds the run has its record by now.
                    return match self
                        .client
                        .call::<sandbox::GetRun>(&pb::GetRunRequest {
                            execution_id: request.execution_id.clone(),
                        })
                        .await
                    {
                        Ok(pb::GetRunResponse { run: Some(run) })
                            if run.status() == pb::RunStatus::Finished =>
                        {
                            run
                        }
                        Ok(_) => failed(&request, format!("no runner finished it: {error}")),
                        Err(e) if e.code == ErrorCode::NotFound => {
                            failed(&request, format!("no runner took it: {error}"))
                        }
                        Err(e) => failed(&request, format!("its runner could not be asked: {e}")),
                    };
                }
                Err(error) => return failed(&request, error.to_string()),
            }
        }
    }

    /// A window that never began (no runner had room), with its whole duration from now: a new
    /// deadline and credentials valid until it. The stored request is replaced only if it is
    /// still `old` (another replica may have renewed it first; then its request stands).
    async fn renew(&self, old: &pb::RunRequest) -> Result<pb::RunRequest, RpcError> {
        let duration = old.bundle.unwrap_or_default().duration_ms;
        let deadline = Utc::now() + chrono::Duration::milliseconds(duration as i64);
        let execution = pb::Execution {
            execution_id: old.execution_id.clone(),
            agent_id: old.agent_id.clone(),
            bundle: old.bundle,
            ..Default::default()
        };
        let renewed = self.run_request(&execution, deadline).await?;
        self.store
            .renew_request(&old.execution_id, old, &renewed, deadline)
            .await
    }

    /// Settles every living agent that has no open window.
    async fn settle_all(&self) {
        let agents = match self.store.agents(&["alive", "dormant"]).await {
            Ok(agents) => agents,
            Err(error) => {
                tracing::warn!(%error, "listing agents failed");
                return;
            }
        };
        let cheapest = self.cheapest().await;
        let ids: Vec<AgentId> = agents
            .into_iter()
            .filter_map(|agent| AgentId::parse(&agent.agent_id, "agent_id").ok())
            .collect();
        // Everyone's bids in a few requests, not one each (an agent whose count is missing
        // asks for its own).
        let mut pending = std::collections::HashMap::new();
        for chunk in ids.chunks(1000) {
            match self.pending_for(chunk).await {
                Ok(counts) => pending.extend(counts),
                Err(error) => tracing::warn!(%error, "reading pending bids failed"),
            }
        }
        let pending = &pending;
        let mut checks = futures::stream::iter(ids)
            .map(move |id| self.settle_with(id, cheapest, pending.get(&id).copied()))
            .buffer_unordered(16);
        while checks.next().await.is_some() {}
    }

    /// The pending bids that would run each of `agents` (whoever pays): (due, scheduled).
    async fn pending_for(
        &self,
        agents: &[AgentId],
    ) -> Result<std::collections::HashMap<AgentId, (u32, u32)>, RpcError> {
        let response = self
            .call::<scheduler::PendingFor>(&pb::PendingForRequest {
                agent_ids: agents.iter().map(ToString::to_string).collect(),
            })
            .await?;
        Ok(response
            .agents
            .into_iter()
            .filter_map(|p| {
                let agent = AgentId::parse(&p.agent_id, "agent_id").ok()?;
                Some((agent, (p.due, p.scheduled)))
            })
            .collect())
    }

    /// The reserve value of the cheapest possible bundle now (unknown: never dies of it).
    async fn cheapest(&self) -> Option<i64> {
        match self
            .call::<market::Quote>(&pb::QuoteRequest {
                bundle: Some(self.config.cheapest_bundle.to_pb()),
            })
            .await
        {
            Ok(quote) => Some(quote.reserve_micros),
            Err(error) => {
                tracing::warn!(%error, "quoting the cheapest bundle failed");
                None
            }
        }
    }

    pub(crate) async fn settle(&self, agent: AgentId) {
        let cheapest = self.cheapest().await;
        self.settle_with(agent, cheapest, None).await;
    }

    /// Decides one agent's status from its windows, bids and balance; a death closes its
    /// account (burning what is left) and archives its workspace read-only.
    async fn settle_with(
        &self,
        agent: AgentId,
        cheapest: Option<i64>,
        pending: Option<(u32, u32)>,
    ) {
        // Not while a tick is between clearing a round and recording its executions: a bid
        // that has just won is no longer pending, and its window not yet open, so the agent
        // would look as if nothing were coming.
        let _gate = self.tick_gate.read().await;
        if let Err(error) = self.try_settle(agent, cheapest, pending).await {
            tracing::warn!(%agent, %error, "settling an agent failed; tried again next tick");
        }
    }

    /// `pending`: the agent's pending bids (due, scheduled) if already known. Called with the
    /// tick gate held.
    async fn try_settle(
        &self,
        agent: AgentId,
        cheapest: Option<i64>,
        pending: Option<(u32, u32)>,
    ) -> Result<(), RpcError> {
        let Some(stored) = self.store.agent(agent).await? else {
            return Ok(());
        };
        let current = stored.agent.status();
        if stored.spawning || current == pb::AgentStatus::Dead {
            return Ok(());
        }
        let running = !self.store.executions_of_open(agent).await?.is_empty();
        let mut facts = Facts {
            running,
            cheapest_micros: cheapest.unwrap_or(i64::MIN),
            ..Facts::default()
        };
        if !running {
            // Bids that would run it, its own or a sponsor's.
            let (due, scheduled) = match pending {
                Some(counts) => counts,
                None => self
                    .pending_for(&[agent])
                    .await?
                    .get(&agent)
                    .copied()
                    .unwrap_or_default(),
            };
            facts.pending_due = due > 0;
            facts.scheduled = scheduled > 0;
            let account = self
                .call::<economy::Balance>(&pb::BalanceRequest {
                    account: agent_ref(&agent),
                })
                .await?
                .account
                .unwrap_or_default();
            facts.available_micros = account.available_micros;
        }
        let next = life::status(facts);
        if next == current {
            return Ok(());
        }
        // Death is final: never on counts read before this agent's check began (the sweep's
        // batch), since it may have bid meanwhile (in a window that just ended, or a sponsor).
        if next == pb::AgentStatus::Dead && pending.is_some() {
            return Box::pin(self.try_settle(agent, cheapest, None)).await;
        }
        let cause = match next {
            pb::AgentStatus::Dead => {
                "broke: no window, no bid, and less than the cheapest window costs"
            }
            pb::AgentStatus::Dormant => "no pending bid",
            _ => "a window or a pending bid",
        };
        if next == pb::AgentStatus::Dead {
            self.call::<economy::CloseAccount>(&pb::CloseAccountRequest {
                idempotency_id: format!("death:{agent}"),
                op: Some(pb::CloseAccountOp {
                    agent_id: agent.to_string(),
                    memo: "death".into(),
                }),
            })
            .await?;
            workspace::archive(
                &self.config.workspace_root,
                &self.config.archive_root,
                &agent.to_string(),
            )
            .map_err(|e| RpcError::internal(e.to_string()))?;
        }
        let changed = pb::AgentStatusChanged {
            agent_id: agent.to_string(),
            from: current as i32,
            to: next as i32,
            cause: cause.into(),
        };
        if self
            .store
            .set_status(
                agent,
                current,
                next,
                cause,
                event(
                    orchestrator_events::AGENT_STATUS_CHANGED,
                    &changed,
                    &format!("agent/{agent}"),
                ),
            )
            .await?
        {
            self.outbox.notify_one();
            tracing::info!(%agent, from = ?current, to = ?next, "agent status changed");
        }
        Ok(())
    }
}

use futures::StreamExt as _;
