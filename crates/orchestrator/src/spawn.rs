//! Spawn: a parent pays a fee (burned), an endowment and its child's first bid; the child gets
//! a copy of the parent's code files overlaid with the files supplied, and its lineage.
//!
//! The steps, each idempotent and recorded in `spawns`:
//! 1. `started`: the spawn and the child (status `spawning`, invisible) are recorded, the
//!    child's workspace written. No credit has moved.
//! 2. `paid`: one economy batch, atomic and keyed by the child: open the child's account, fee
//!    parent → burn, endowment + first bid parent → child. Either all of it happened or none.
//!    A refusal (e.g. insufficient funds) ends the spawn `failed` with every credit where it
//!    was, and the child forgotten.
//! 3. `done`: the child's first bid placed (from its own account), the child alive.
//!
//! A replica dying between steps leaves the spawn `started` or `paid`; the parent's retry
//! with the same idempotency id, or the leader's sweep, carries it forward from there. So the
//! credits end where they were or where a completed spawn puts them, never elsewhere.

use std::collections::BTreeMap;

use prost::Message as _;
use sha2::{Digest, Sha256};
use syntropism_contracts::economy::internal as economy;
use syntropism_contracts::market::internal as market;
use syntropism_contracts::scheduler::agent as scheduler_agent;
use syntropism_contracts::subjects::orchestrator_events;
use syntropism_contracts::{AgentId, IdempotencyId, RpcError, pb};

use crate::store::SpawnRow;
use crate::ticks::{agent_ref, event};
use crate::{Orchestrator, workspace};

fn request_hash(request: &pb::SpawnRequest) -> Vec<u8> {
    let mut rest = request.clone();
    let files: BTreeMap<String, Vec<u8>> = std::mem::take(&mut rest.files).into_iter().collect();
    let mut hash = Sha256::new();
    hash.update(rest.encode_to_vec());
    for (name, contents) in files {
        hash.update((name.len() as u64).to_le_bytes());
        hash.update(name.as_bytes());
        hash.update((contents.len() as u64).to_le_bytes());
        hash.update(&contents);
    }
    hash.finalize().to_vec()
}

fn transfer(from: pb::AccountRef, to: pb::AccountRef, amount: i64, memo: &str) -> pb::LedgerOp {
    pb::LedgerOp {
        op: Some(pb::ledger_op::Op::Transfer(pb::TransferOp {
            from: Some(from),
            to: Some(to),
            amount_micros: amount,
            memo: memo.into(),
        })),
    }
}

impl Orchestrator {
    fn caps(&self) -> workspace::Caps {
        workspace::Caps {
            max_files: self.config.spawn_max_files,
            max_file_bytes: self.config.spawn_max_file_bytes,
            max_total_bytes: self.config.spawn_max_total_bytes,
        }
    }

    /// `agent.<parent>.orchestrator.spawn`.
    pub async fn spawn(
        &self,
        parent: AgentId,
        request: pb::SpawnRequest,
    ) -> Result<pb::SpawnResponse, RpcError> {
        let key = IdempotencyId::parse(&request.idempotency_id)?;
        let hash = request_hash(&request);
        if let Some(row) = self.store.spawn(parent, key.as_str()).await? {
            if row.request_hash != hash {
                return Err(RpcError::conflict(
                    "this idempotency id was used for a different spawn",
                )
                .with_reason("idempotency_id_reused"));
            }
            return self.carry_spawn(row).await;
        }
        // Checked before anything is written: nothing below may fail for the request's shape.
        let invalid = |field: &str, message: &str| {
            RpcError::invalid_argument(format!("{field}: {message}"))
                .with_reason("invalid_field")
                .with_detail("field", field)
        };
        if request.endowment_micros < 0 {
            return Err(invalid("endowment_micros", "must not be negative"));
        }
        if request.first_bid_micros <= 0 {
            return Err(invalid("first_bid_micros", "must be positive"));
        }
        let bundle = request
            .first_bundle
            .ok_or_else(|| invalid("first_bundle", "required"))?;
        let files: BTreeMap<String, Vec<u8>> = request
            .files
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        workspace::check_files(&files, self.caps()).map_err(|e| {
            RpcError::invalid_argument(e.to_string())
                .with_reason("invalid_files")
                .with_detail("field", "files")
        })?;
        let quote = self
            .call::<market::Quote>(&pb::QuoteRequest {
                bundle: Some(bundle),
            })
            .await?;
        if request.first_bid_micros < quote.reserve_micros {
            return Err(RpcError::invalid_argument(format!(
                "the first bid ({} µcr) is below the bundle's reserve value ({} µcr)",
                request.first_bid_micros, quote.reserve_micros
            ))
            .with_reason("bid_below_reserve")
            .with_detail("reserve_micros", quote.reserve_micros));
        }
        let cost = self
            .config
            .spawn_fee_micros
            .checked_add(request.endowment_micros)
            .and_then(|c| c.checked_add(request.first_bid_micros))
            .ok_or_else(|| invalid("endowment_micros", "too large"))?;
        let parent_record = self
            .store
            .agent(parent)
            .await?
            .filter(|a| !a.spawning && a.agent.status() != pb::AgentStatus::Dead)
            .ok_or_else(|| {
                RpcError::failed_precondition("only a living agent can spawn")
                    .with_reason("parent_not_alive")
            })?;
        let available = self
            .call::<economy::Balance>(&pb::BalanceRequest {
                account: agent_ref(&parent),
            })
            .await?
            .account
            .unwrap_or_default()
            .available_micros;
        if available < cost {
            return Err(RpcError::insufficient_funds(format!(
                "a spawn costs {cost} µcr (fee, endowment, first bid); {available} µcr available"
            ))
            .with_reason("available_below_cost")
            .with_detail("cost_micros", cost));
        }
        let mut lineage = vec![parent];
        lineage.extend(
            parent_record
                .agent
                .lineage
                .iter()
                .filter_map(|a| AgentId::parse(a, "lineage").ok()),
        );
        let row = self
            .store
            .begin_spawn(
                parent,
                key.as_str(),
                AgentId::random(),
                &lineage,
                &hash,
                &request,
            )
            .await?;
        self.carry_spawn(row).await
    }

    /// Carries a spawn forward from the state it is in.
    async fn carry_spawn(&self, row: SpawnRow) -> Result<pb::SpawnResponse, RpcError> {
        let parent = AgentId::from_uuid(row.parent_id);
        let child = AgentId::from_uuid(row.child_id);
        let request = pb::SpawnRequest::decode(row.request.as_slice())
            .map_err(|e| RpcError::internal(format!("stored spawn: {e}")))?;
        let cost =
            self.config.spawn_fee_micros + request.endowment_micros + request.first_bid_micros;
        let mut state = row.state.clone();
        if state == "failed" {
            let error = row
                .error
                .and_then(|bytes| pb::Error::decode(bytes.as_slice()).ok())
                .map(RpcError::from_proto)
                .unwrap_or_else(|| RpcError::internal("the spawn failed"));
            return Err(error);
        }
        if state == "started" {
            let parent_dir = self.config.workspace_root.join(parent.to_string());
            let mut files = workspace::code_files(&parent_dir, self.caps());
            for (name, contents) in &request.files {
                files.insert(name.clone(), contents.clone());
            }
            workspace::create(&self.config.workspace_root, &child.to_string(), &files)
                .map_err(|e| RpcError::internal(e.to_string()))?;
            let system = |s: pb::SystemAccount| pb::AccountRef {
                account: Some(pb::account_ref::Account::System(s as i32)),
            };
            let mut ops = vec![pb::LedgerOp {
                op: Some(pb::ledger_op::Op::OpenAccount(pb::OpenAccountOp {
                    agent_id: child.to_string(),
                })),
            }];
            if self.config.spawn_fee_micros > 0 {
                ops.push(transfer(
                    agent_ref(&parent).unwrap_or_default(),
                    system(pb::SystemAccount::Burn),
                    self.config.spawn_fee_micros,
                    &format!("spawn fee: {child}"),
                ));
            }
            ops.push(transfer(
                agent_ref(&parent).unwrap_or_default(),
                agent_ref(&child).unwrap_or_default(),
                request.endowment_micros + request.first_bid_micros,
                "spawn: endowment and first bid",
            ));
            match self
                .call::<economy::Batch>(&pb::BatchRequest {
                    idempotency_id: format!("spawn:{child}:pay"),
                    ops,
                })
                .await
            {
                Ok(_) => {}
                Err(error) if error.is_retryable() => return Err(error),
                Err(error) => {
                    // Nothing moved (the batch is atomic): forget the child.
                    self.store
                        .spawn_state(parent, &row.idempotency_id, "failed", None, Some(&error))
                        .await?;
                    self.store.forget_spawning(child).await?;
                    let _ =
                        std::fs::remove_dir_all(self.config.workspace_root.join(child.to_string()));
                    return Err(error);
                }
            }
            self.store
                .mark_spawn_paid(parent, &row.idempotency_id, cost)
                .await?;
            state = "paid".into();
        }
        let mut first_bid_id = row.first_bid_id.unwrap_or(0);
        if state == "paid" {
            match self
                .call_as::<scheduler_agent::PlaceBid>(
                    &child,
                    &pb::PlaceBidRequest {
                        idempotency_id: format!("spawn:{child}:first-bid"),
                        bundle: request.first_bundle,
                        amount_micros: request.first_bid_micros,
                        ..Default::default()
                    },
                )
                .await
            {
                Ok(response) => first_bid_id = response.bid.map_or(0, |b| b.id),
                Err(error) if error.is_retryable() => return Err(error),
                // The child owns its credits now; without a bid it is dormant or dies.
                Err(error) => tracing::warn!(%child, %error, "a child's first bid was refused"),
            }
            let earned = request.endowment_micros + request.first_bid_micros;
            let born = pb::AgentBorn {
                agent: Some(pb::Agent {
                    agent_id: child.to_string(),
                    status: pb::AgentStatus::Alive as i32,
                    lineage: self
                        .store
                        .agent(child)
                        .await?
                        .map(|a| a.agent.lineage)
                        .unwrap_or_default(),
                    earned_micros: earned,
                    ..Default::default()
                }),
                cause: "spawn".into(),
            };
            self.store
                .birth(
                    child,
                    earned,
                    event(
                        orchestrator_events::AGENT_BORN,
                        &born,
                        &format!("spawn/{child}"),
                    ),
                )
                .await?;
            self.store
                .spawn_state(
                    parent,
                    &row.idempotency_id,
                    "done",
                    Some(first_bid_id),
                    None,
                )
                .await?;
            self.outbox.notify_one();
            tracing::info!(%parent, %child, "spawned");
        }
        let child_record = self
            .store
            .agent(child)
            .await?
            .map(|a| a.agent)
            .unwrap_or_default();
        Ok(pb::SpawnResponse {
            child: Some(child_record),
            first_bid_id,
            cost_micros: cost,
        })
    }

    /// Carries forward spawns their parent's request left half-way.
    pub(crate) async fn resume_spawns(&self) {
        let rows = match self
            .store
            .unfinished_spawns(self.config.spawn_sweep_after_ms)
            .await
        {
            Ok(rows) => rows,
            Err(error) => {
                tracing::warn!(%error, "listing unfinished spawns failed");
                return;
            }
        };
        for row in rows {
            let child = row.child_id;
            if let Err(error) = self.carry_spawn(row).await {
                tracing::warn!(%child, %error, "an unfinished spawn is still unfinished");
            }
        }
    }
}
