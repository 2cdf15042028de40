//! The economy's NATS handlers: wire messages in, ledger operations out, and back.
//! Decoding, size limits, error replies and tracing are the contracts layer's job.

use std::sync::Arc;

use sha2::{Digest, Sha256};
use syntropism_contracts::economy::{admin, agent, internal};
use syntropism_contracts::{
    AgentId, Credits, HoldId, IdempotencyId, Method, RequestContext, RpcError, RpcServer, pb,
};

use crate::config::EconomySection;
use crate::errors::op_error;
use crate::ledger::{AccountRef, MintReason, Op, OpError, Payee};
use crate::store::{Mutation, Store};

/// The economy's request handling, shared by every handler task.
#[derive(Debug)]
pub struct Economy {
    store: Store,
    config: EconomySection,
}

/// Subscribes every economy method on `rpc`.
pub async fn register(
    rpc: &mut RpcServer,
    economy: Arc<Economy>,
) -> Result<(), async_nats::SubscribeError> {
    macro_rules! serve {
        ($method:ty, $handler:ident) => {{
            let economy = economy.clone();
            rpc.serve::<$method, _, _>(move |ctx, request| {
                let economy = economy.clone();
                async move { economy.$handler(ctx, request).await }
            })
            .await?;
        }};
    }
    serve!(internal::OpenAccount, open_account);
    serve!(internal::CloseAccount, close_account);
    serve!(internal::Transfer, transfer);
    serve!(internal::Mint, mint);
    serve!(internal::Hold, hold);
    serve!(internal::PostHold, post_hold);
    serve!(internal::VoidHold, void_hold);
    serve!(internal::Batch, batch);
    serve!(internal::Balance, balance);
    serve!(internal::History, history);
    serve!(internal::Audit, audit);
    serve!(admin::Audit, audit);
    serve!(agent::Balance, agent_balance);
    serve!(agent::History, agent_history);
    serve!(agent::Transfer, agent_transfer);
    Ok(())
}

const INTERNAL_SCOPE: &str = "internal";

/// Fingerprint of a request body (without its idempotency id), to tell a retry from a reuse.
fn fingerprint(method: &str, body: &impl prost::Message) -> Vec<u8> {
    let mut hash = Sha256::new();
    hash.update(method.as_bytes());
    hash.update([0]);
    hash.update(body.encode_to_vec());
    hash.finalize().to_vec()
}

/// Takes the idempotency id out of a request and fingerprints the rest.
macro_rules! idempotent {
    ($method:ty, $request:ident) => {{
        let key = IdempotencyId::parse(&$request.idempotency_id)?;
        let mut body = $request.clone();
        body.idempotency_id.clear();
        (
            key,
            fingerprint(&<$method as Method>::ENDPOINT.name(), &body),
        )
    }};
}

fn required<T>(value: Option<T>, field: &'static str) -> Result<T, RpcError> {
    value.ok_or_else(|| {
        RpcError::invalid_argument(format!("{field} is required"))
            .with_reason("missing_field")
            .with_detail("field", field)
    })
}

fn agent_id(value: &str, field: &'static str) -> Result<AgentId, RpcError> {
    Ok(AgentId::parse(value, field)?)
}

fn account_ref(value: Option<pb::AccountRef>, field: &'static str) -> Result<AccountRef, RpcError> {
    use pb::account_ref::Account;
    match required(required(value, field)?.account, field)? {
        Account::AgentId(id) => Ok(AccountRef::Agent(agent_id(&id, field)?)),
        Account::System(system) => match pb::SystemAccount::try_from(system) {
            Ok(pb::SystemAccount::Mint) => Ok(AccountRef::Mint),
            Ok(pb::SystemAccount::Burn) => Ok(AccountRef::Burn),
            _ => Err(RpcError::invalid_argument(format!(
                "{field}: unknown system account {system}"
            ))
            .with_reason("invalid_field")
            .with_detail("field", field)),
        },
    }
}

fn payer(value: Option<pb::AccountRef>, field: &'static str) -> Result<AgentId, RpcError> {
    match account_ref(value, field)? {
        AccountRef::Agent(agent) => Ok(agent),
        other => Err(RpcError::invalid_argument(format!(
            "{field}: only agent accounts pay ({other:?} cannot; credits are created only by mint requests)"
        ))
        .with_reason("invalid_payer")
        .with_detail("field", field)),
    }
}

fn payee(value: Option<pb::AccountRef>, field: &'static str) -> Result<Payee, RpcError> {
    match account_ref(value, field)? {
        AccountRef::Agent(agent) => Ok(Payee::Agent(agent)),
        AccountRef::Burn => Ok(Payee::Burn),
        AccountRef::Mint => Err(RpcError::invalid_argument(format!(
            "{field}: nothing can be paid to the mint"
        ))
        .with_reason("invalid_payee")
        .with_detail("field", field)),
    }
}

fn hold_id(value: i64) -> Result<HoldId, RpcError> {
    Ok(HoldId::parse(value)?)
}

fn open_op(op: Option<pb::OpenAccountOp>) -> Result<Op, RpcError> {
    let op = required(op, "op")?;
    Ok(Op::Open {
        agent: agent_id(&op.agent_id, "agent_id")?,
    })
}

fn close_op(op: Option<pb::CloseAccountOp>) -> Result<Op, RpcError> {
    let op = required(op, "op")?;
    Ok(Op::Close {
        agent: agent_id(&op.agent_id, "agent_id")?,
        memo: op.memo,
    })
}

fn transfer_op(op: Option<pb::TransferOp>) -> Result<Op, RpcError> {
    let op = required(op, "op")?;
    Ok(Op::Transfer {
        from: payer(op.from, "from")?,
        to: payee(op.to, "to")?,
        amount: Credits::from_micros(op.amount_micros),
        memo: op.memo,
    })
}

fn mint_op(op: Option<pb::MintOp>) -> Result<Op, RpcError> {
    let op = required(op, "op")?;
    let reason = match pb::MintReason::try_from(op.reason) {
        Ok(pb::MintReason::Reward) => MintReason::Reward,
        Ok(pb::MintReason::GenesisGrant) => MintReason::GenesisGrant,
        _ => {
            return Err(RpcError::invalid_argument(
                "reason: a mint needs a reason (reward or genesis grant)",
            )
            .with_reason("missing_field")
            .with_detail("field", "reason"));
        }
    };
    Ok(Op::Mint {
        to: agent_id(&op.agent_id, "agent_id")?,
        amount: Credits::from_micros(op.amount_micros),
        reason,
        memo: op.memo,
    })
}

fn hold_op(op: Option<pb::HoldOp>) -> Result<Op, RpcError> {
    let op = required(op, "op")?;
    Ok(Op::Hold {
        from: payer(op.from, "from")?,
        to: payee(op.to, "to")?,
        amount: Credits::from_micros(op.amount_micros),
        memo: op.memo,
    })
}

fn post_op(op: Option<pb::PostHoldOp>) -> Result<Op, RpcError> {
    let op = required(op, "op")?;
    Ok(Op::Post {
        hold: hold_id(op.hold_id)?,
        amount: op.amount_micros.map(Credits::from_micros),
    })
}

fn void_op(op: Option<pb::VoidHoldOp>) -> Result<Op, RpcError> {
    let op = required(op, "op")?;
    Ok(Op::Void {
        hold: hold_id(op.hold_id)?,
    })
}

fn ledger_op(op: pb::LedgerOp) -> Result<Op, RpcError> {
    use pb::ledger_op::Op as Kind;
    match required(op.op, "op")? {
        Kind::OpenAccount(op) => open_op(Some(op)),
        Kind::CloseAccount(op) => close_op(Some(op)),
        Kind::Transfer(op) => transfer_op(Some(op)),
        Kind::Mint(op) => mint_op(Some(op)),
        Kind::Hold(op) => hold_op(Some(op)),
        Kind::PostHold(op) => post_op(Some(op)),
        Kind::VoidHold(op) => void_op(Some(op)),
    }
}

fn single(mut response: pb::BatchResponse) -> Result<pb::OpResult, RpcError> {
    response
        .results
        .pop()
        .ok_or_else(|| RpcError::internal("an operation produced no result"))
}

impl Economy {
    pub fn new(store: Store, config: EconomySection) -> Self {
        Self { store, config }
    }

    /// Checks shapes before touching the database, then applies the operations once.
    async fn apply(
        &self,
        ctx: &RequestContext,
        scope: String,
        (key, request_hash): (IdempotencyId, Vec<u8>),
        ops: Vec<Op>,
    ) -> Result<pb::BatchResponse, RpcError> {
        for (index, op) in ops.iter().enumerate() {
            op.check_shape()
                .map_err(|error| op_error(&OpError { index, error }, ops.len()))?;
        }
        let mutation = Mutation {
            scope,
            key,
            request_hash,
            ops,
            correlation_id: ctx.correlation_id.clone(),
        };
        self.store.mutate(mutation).await
    }

    async fn apply_one(
        &self,
        ctx: &RequestContext,
        idempotency: (IdempotencyId, Vec<u8>),
        op: Op,
    ) -> Result<pb::OpResult, RpcError> {
        single(
            self.apply(ctx, INTERNAL_SCOPE.into(), idempotency, vec![op])
                .await?,
        )
    }

    async fn open_account(
        &self,
        ctx: RequestContext,
        request: pb::OpenAccountRequest,
    ) -> Result<pb::OpenAccountResponse, RpcError> {
        let idempotency = idempotent!(internal::OpenAccount, request);
        let result = self
            .apply_one(&ctx, idempotency, open_op(request.op)?)
            .await?;
        Ok(pb::OpenAccountResponse {
            account: result.account,
        })
    }

    async fn close_account(
        &self,
        ctx: RequestContext,
        request: pb::CloseAccountRequest,
    ) -> Result<pb::CloseAccountResponse, RpcError> {
        let idempotency = idempotent!(internal::CloseAccount, request);
        let result = self
            .apply_one(&ctx, idempotency, close_op(request.op)?)
            .await?;
        Ok(pb::CloseAccountResponse {
            account: result.account,
            burn: result.transfer,
        })
    }

    async fn transfer(
        &self,
        ctx: RequestContext,
        request: pb::TransferRequest,
    ) -> Result<pb::TransferResponse, RpcError> {
        let idempotency = idempotent!(internal::Transfer, request);
        let result = self
            .apply_one(&ctx, idempotency, transfer_op(request.op)?)
            .await?;
        Ok(pb::TransferResponse {
            transfer: result.transfer,
        })
    }

    async fn mint(
        &self,
        ctx: RequestContext,
        request: pb::MintRequest,
    ) -> Result<pb::MintResponse, RpcError> {
        let idempotency = idempotent!(internal::Mint, request);
        let result = self
            .apply_one(&ctx, idempotency, mint_op(request.op)?)
            .await?;
        Ok(pb::MintResponse {
            transfer: result.transfer,
        })
    }

    async fn hold(
        &self,
        ctx: RequestContext,
        request: pb::HoldRequest,
    ) -> Result<pb::HoldResponse, RpcError> {
        let idempotency = idempotent!(internal::Hold, request);
        let result = self
            .apply_one(&ctx, idempotency, hold_op(request.op)?)
            .await?;
        Ok(pb::HoldResponse { hold: result.hold })
    }

    async fn post_hold(
        &self,
        ctx: RequestContext,
        request: pb::PostHoldRequest,
    ) -> Result<pb::PostHoldResponse, RpcError> {
        let idempotency = idempotent!(internal::PostHold, request);
        let result = self
            .apply_one(&ctx, idempotency, post_op(request.op)?)
            .await?;
        Ok(pb::PostHoldResponse {
            hold: result.hold,
            transfer: result.transfer,
        })
    }

    async fn void_hold(
        &self,
        ctx: RequestContext,
        request: pb::VoidHoldRequest,
    ) -> Result<pb::VoidHoldResponse, RpcError> {
        let idempotency = idempotent!(internal::VoidHold, request);
        let result = self
            .apply_one(&ctx, idempotency, void_op(request.op)?)
            .await?;
        Ok(pb::VoidHoldResponse { hold: result.hold })
    }

    async fn batch(
        &self,
        ctx: RequestContext,
        request: pb::BatchRequest,
    ) -> Result<pb::BatchResponse, RpcError> {
        let idempotency = idempotent!(internal::Batch, request);
        if request.ops.is_empty() {
            return Err(
                RpcError::invalid_argument("a batch needs at least one operation")
                    .with_reason("empty_batch"),
            );
        }
        if request.ops.len() > self.config.max_batch_ops {
            return Err(RpcError::invalid_argument(format!(
                "a batch takes at most {} operations, got {}",
                self.config.max_batch_ops,
                request.ops.len()
            ))
            .with_reason("batch_too_large"));
        }
        let ops = request
            .ops
            .into_iter()
            .enumerate()
            .map(|(index, op)| {
                ledger_op(op).map_err(|e| {
                    RpcError {
                        message: format!("operation {index}: {}", e.message),
                        ..e
                    }
                    .with_detail("op_index", index)
                })
            })
            .collect::<Result<Vec<_>, _>>()?;
        self.apply(&ctx, INTERNAL_SCOPE.into(), idempotency, ops)
            .await
    }

    async fn balance(
        &self,
        _ctx: RequestContext,
        request: pb::BalanceRequest,
    ) -> Result<pb::BalanceResponse, RpcError> {
        let account = account_ref(request.account, "account")?;
        Ok(pb::BalanceResponse {
            account: Some(self.store.balance(account).await?),
        })
    }

    fn page(&self, before_id: i64, limit: u32) -> Result<(Option<i64>, u32), RpcError> {
        if before_id < 0 {
            return Err(RpcError::invalid_argument("before_id must be >= 0")
                .with_reason("invalid_field")
                .with_detail("field", "before_id"));
        }
        let limit = if limit == 0 {
            self.config.history_default_limit
        } else {
            limit.min(self.config.history_max_limit)
        };
        Ok(((before_id > 0).then_some(before_id), limit))
    }

    async fn history(
        &self,
        _ctx: RequestContext,
        request: pb::HistoryRequest,
    ) -> Result<pb::HistoryResponse, RpcError> {
        let account = account_ref(request.account, "account")?;
        let (before, limit) = self.page(request.before_id, request.limit)?;
        self.store.history(account, before, limit).await
    }

    async fn audit(
        &self,
        _ctx: RequestContext,
        _request: pb::AuditRequest,
    ) -> Result<pb::AuditResponse, RpcError> {
        self.store.audit().await
    }

    async fn agent_balance(
        &self,
        ctx: RequestContext,
        _request: pb::AgentBalanceRequest,
    ) -> Result<pb::AgentBalanceResponse, RpcError> {
        let account = self.store.balance(AccountRef::Agent(ctx.caller()?)).await?;
        Ok(pb::AgentBalanceResponse {
            balance_micros: account.balance_micros,
            pending_micros: account.pending_micros,
            available_micros: account.available_micros,
        })
    }

    async fn agent_history(
        &self,
        ctx: RequestContext,
        request: pb::AgentHistoryRequest,
    ) -> Result<pb::HistoryResponse, RpcError> {
        let (before, limit) = self.page(request.before_id, request.limit)?;
        self.store
            .history(AccountRef::Agent(ctx.caller()?), before, limit)
            .await
    }

    async fn agent_transfer(
        &self,
        ctx: RequestContext,
        request: pb::AgentTransferRequest,
    ) -> Result<pb::AgentTransferResponse, RpcError> {
        let caller = ctx.caller()?;
        let idempotency = idempotent!(agent::Transfer, request);
        let op = Op::Transfer {
            from: caller,
            to: Payee::Agent(agent_id(&request.to_agent_id, "to_agent_id")?),
            amount: Credits::from_micros(request.amount_micros),
            memo: request.memo,
        };
        // Each agent has its own idempotency namespace: it can neither collide with nor replay
        // another agent's (or a service's) ids.
        let result = single(
            self.apply(&ctx, format!("agent:{caller}"), idempotency, vec![op])
                .await?,
        )?;
        let account = self.store.balance(AccountRef::Agent(caller)).await?;
        Ok(pb::AgentTransferResponse {
            transfer: result.transfer,
            available_micros: account.available_micros,
        })
    }
}
