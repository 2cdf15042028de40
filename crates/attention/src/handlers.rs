//! Attention's NATS methods: agent-facing (`prompt`) and operator (`pending`, `reward`,
//! `dismiss`), and the sweep (expiry, rewards left half-way).
//!
//! A reward is minted exactly once, whatever dies when: the prompt's scores are fixed first
//! (`rewarding`, in a transaction), then the economy mints with the idempotency id
//! `reward:<prompt id>`, then the prompt is marked `rewarded` with its event. A reward cut off
//! in between is finished by a retry with the same scores or by the sweep: minting again with
//! the same id returns the first mint.

use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, SubsecRound as _, Utc};
use sha2::{Digest, Sha256};
use syntropism_contracts::attention::{admin, agent};
use syntropism_contracts::economy::internal as economy;
use syntropism_contracts::orchestrator::internal as orchestrator;
use syntropism_contracts::subjects::{attention_events, services};
use syntropism_contracts::{
    ErrorCode, IdempotencyId, RequestContext, RpcClient, RpcError, RpcServer, events, pb,
};
use syntropism_platform::outbox::PendingEvent;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use crate::config::AttentionSection;
use crate::rules::{self, RewardStep, Scores, Status};
use crate::store::{Change, Insert, Store, StoredPrompt};

/// A reply must fit a NATS message; pages are cut to this many bytes.
const REPLY_BUDGET: usize = 512 * 1024;

/// The attention service's request handling, shared by every handler task.
#[derive(Debug)]
pub struct Attention {
    store: Store,
    client: RpcClient,
    config: AttentionSection,
    outbox: Arc<Notify>,
}

/// Now, to the microsecond Postgres keeps, so what a handler answers equals what it stored.
fn now() -> DateTime<Utc> {
    Utc::now().trunc_subsecs(6)
}

fn fingerprint(request: &pb::SubmitPromptRequest) -> Vec<u8> {
    let mut body = request.clone();
    body.idempotency_id.clear();
    let mut hash = Sha256::new();
    hash.update(prost::Message::encode_to_vec(&body));
    hash.finalize().to_vec()
}

fn event(subject: &str, prompt: &StoredPrompt, correlation: &str) -> PendingEvent {
    PendingEvent {
        subject: subject.into(),
        envelope: events::envelope(
            services::ATTENTION,
            &pb::PromptChanged {
                prompt: Some(prompt.to_message()),
            },
            correlation,
            &format!("prompt/{}", prompt.prompt_id),
        ),
    }
}

fn prompt_id(value: &str) -> Result<uuid::Uuid, RpcError> {
    uuid::Uuid::try_parse(value).map_err(|_| {
        RpcError::invalid_argument(format!("{value:?} is not a prompt id"))
            .with_reason("invalid_field")
            .with_detail("field", "prompt_id")
    })
}

/// The idempotency id of a prompt's reward in the economy.
pub fn reward_key(prompt: uuid::Uuid) -> String {
    format!("reward:{prompt}")
}

impl Attention {
    pub fn new(
        store: Store,
        client: RpcClient,
        config: AttentionSection,
        outbox: Arc<Notify>,
    ) -> Self {
        Self {
            store,
            client,
            config,
            outbox,
        }
    }

    // ---- agent: prompt ----

    async fn prompt(
        &self,
        ctx: RequestContext,
        request: pb::SubmitPromptRequest,
    ) -> Result<pb::SubmitPromptResponse, RpcError> {
        let agent = ctx.caller()?;
        let key = IdempotencyId::parse(&request.idempotency_id)?;
        rules::check_content(&request.content, self.config.max_prompt_bytes)?;
        let hash = fingerprint(&request);
        if let Some(existing) = self.store.prompt_by_key(agent, key.as_str()).await? {
            return self.answer_retry(existing, &hash).await;
        }
        let ask = pb::WindowRequest {
            agent_id: agent.to_string(),
        };
        let window = self
            .client
            .call_retrying::<orchestrator::Window>(&ask)
            .await?;
        let execution = window.execution.ok_or_else(|| {
            RpcError::failed_precondition(
                "no window of yours is open: prompts are shown only during one",
            )
            .with_reason("no_window")
        })?;
        let slots = execution.bundle.map_or(0, |b| b.attention_slots);
        rules::check_slots(slots, 0)?;
        let now = now();
        let prompt = StoredPrompt {
            prompt_id: uuid::Uuid::now_v7(),
            agent_id: agent,
            idempotency_id: key.to_string(),
            request_hash: hash.clone(),
            execution_id: execution.execution_id.clone(),
            window_slots: slots,
            paid_micros: execution.paid_micros.max(0),
            content: request.content,
            status: Status::Pending,
            created_at: now,
            expires_at: now + chrono::Duration::milliseconds(self.config.prompt_ttl_ms as i64),
            scores: None,
            reward_micros: 0,
            reason: String::new(),
            refusal: None,
            resolved_at: None,
        };
        let prompted = event(attention_events::PROMPTED, &prompt, &ctx.correlation_id);
        match self.store.insert_prompt(&prompt, prompted).await? {
            Insert::Inserted(prompt, used) => {
                self.outbox.notify_one();
                tracing::info!(prompt = %prompt.prompt_id, %agent, "prompt shown to the human");
                Ok(pb::SubmitPromptResponse {
                    prompt: Some(prompt.to_message()),
                    slots_left: slots.saturating_sub(used),
                })
            }
            Insert::Exists(existing) => self.answer_retry(*existing, &hash).await,
            Insert::SlotsUsed(used) => rules::check_slots(slots, used)
                .and(Err(RpcError::internal("slots were used, then not"))),
        }
    }

    /// A prompt submitted again with the same idempotency id: the first outcome, or `CONFLICT`
    /// if the content differs.
    async fn answer_retry(
        &self,
        existing: StoredPrompt,
        hash: &[u8],
    ) -> Result<pb::SubmitPromptResponse, RpcError> {
        if existing.request_hash != hash {
            return Err(RpcError::conflict(format!(
                "idempotency id {:?} was already used for a different prompt",
                existing.idempotency_id
            ))
            .with_reason("idempotency_id_reused"));
        }
        let used = self.store.used_slots(&existing.execution_id).await?;
        Ok(pb::SubmitPromptResponse {
            slots_left: existing.window_slots.saturating_sub(used),
            prompt: Some(existing.to_message()),
        })
    }

    // ---- admin ----

    async fn pending(
        &self,
        request: pb::PendingPromptsRequest,
    ) -> Result<pb::PendingPromptsResponse, RpcError> {
        let limit = match request.limit {
            0 => self.config.pending_default_limit,
            n => n.min(self.config.pending_max_limit),
        };
        let mut prompts: Vec<pb::Prompt> = self
            .store
            .pending(limit)
            .await?
            .iter()
            .map(StoredPrompt::to_message)
            .collect();
        let fit = rules::fitting(
            prompts.iter().map(prost::Message::encoded_len),
            REPLY_BUDGET,
        );
        prompts.truncate(fit);
        Ok(pb::PendingPromptsResponse { prompts })
    }

    async fn reward(
        &self,
        ctx: RequestContext,
        request: pb::RewardRequest,
    ) -> Result<pb::RewardResponse, RpcError> {
        let id = prompt_id(&request.prompt_id)?;
        let scores = Scores::from_pb(request.scores.as_ref())?;
        rules::check_reason(&request.reason, self.config.max_reason_bytes)?;
        let amount = rules::reward_micros(scores, self.config.weight_micros_per_point)
            .ok_or_else(|| RpcError::internal("the reward overflows"))?;
        let now = now();
        let mut step = None;
        let correlation = ctx.correlation_id.clone();
        let prompt = self
            .store
            .change(id, |current| {
                if let Some(refusal) = &current.refusal
                    && current.scores == Some(scores)
                {
                    // The economy refused this reward for good: the same answer again.
                    return Change::Refuse(refusal.clone());
                }
                match rules::reward_step(
                    current.status,
                    current.scores,
                    current.past_expiry(now),
                    scores,
                ) {
                    Err(error) => Change::Refuse(error),
                    Ok(RewardStep::Begin) => {
                        let mut next = current.clone();
                        next.scores = Some(scores);
                        next.reward_micros = amount;
                        next.reason = request.reason.clone();
                        if amount == 0 {
                            // Nothing to mint: rewarded at once.
                            next.status = Status::Rewarded;
                            next.resolved_at = Some(now);
                            let rewarded = event(attention_events::REWARDED, &next, &correlation);
                            step = Some(RewardStep::Done);
                            Change::Write(Box::new(next), vec![rewarded])
                        } else {
                            next.status = Status::Rewarding;
                            step = Some(RewardStep::Begin);
                            Change::Write(Box::new(next), Vec::new())
                        }
                    }
                    Ok(other) => {
                        step = Some(other);
                        Change::Keep
                    }
                }
            })
            .await?;
        if step == Some(RewardStep::Done) {
            self.outbox.notify_one();
            return Ok(pb::RewardResponse {
                prompt: Some(prompt.to_message()),
            });
        }
        let prompt = self.finish_reward(prompt, &ctx.correlation_id).await?;
        Ok(pb::RewardResponse {
            prompt: Some(prompt.to_message()),
        })
    }

    /// Mints a `rewarding` prompt's reward (again, harmlessly, if it was minted before) and
    /// marks it rewarded; a definite refusal (the agent's account is closed: it died) sets the
    /// prompt aside with that refusal.
    async fn finish_reward(
        &self,
        prompt: StoredPrompt,
        correlation: &str,
    ) -> Result<StoredPrompt, RpcError> {
        let id = prompt.prompt_id;
        let mint = pb::MintRequest {
            idempotency_id: reward_key(id),
            op: Some(pb::MintOp {
                agent_id: prompt.agent_id.to_string(),
                amount_micros: prompt.reward_micros,
                reason: pb::MintReason::Reward as i32,
                memo: format!("reward for prompt {id}"),
            }),
        };
        match self.client.call_retrying::<economy::Mint>(&mint).await {
            Ok(_) => {
                let now = now();
                let done = self
                    .store
                    .change(id, |current| {
                        if current.status != Status::Rewarding {
                            return Change::Keep;
                        }
                        let mut next = current.clone();
                        next.status = Status::Rewarded;
                        next.resolved_at = Some(now);
                        let rewarded = event(attention_events::REWARDED, &next, correlation);
                        Change::Write(Box::new(next), vec![rewarded])
                    })
                    .await?;
                self.outbox.notify_one();
                tracing::info!(prompt = %id, agent = %done.agent_id, reward_micros = done.reward_micros, "reward minted");
                Ok(done)
            }
            Err(error) if error.is_retryable() || error.code == ErrorCode::Internal => {
                // Unknown outcome: the prompt stays `rewarding`; a retry or the sweep finishes it.
                Err(error)
            }
            Err(error) => {
                let refusal = if matches!(
                    error.code,
                    ErrorCode::FailedPrecondition | ErrorCode::NotFound
                ) {
                    RpcError::failed_precondition(format!(
                        "agent {} cannot be rewarded: its account is closed (it died)",
                        prompt.agent_id
                    ))
                    .with_reason("agent_dead")
                    .with_detail("economy", error.to_string())
                } else {
                    error
                };
                let now = now();
                self.store
                    .change(id, |current| {
                        if current.status != Status::Rewarding {
                            return Change::Keep;
                        }
                        let mut next = current.clone();
                        next.status = Status::Dismissed;
                        next.reward_micros = 0;
                        next.reason = format!("not rewarded: {}", refusal.message);
                        next.refusal = Some(refusal.clone());
                        next.resolved_at = Some(now);
                        let dismissed = event(attention_events::DISMISSED, &next, correlation);
                        Change::Write(Box::new(next), vec![dismissed])
                    })
                    .await?;
                self.outbox.notify_one();
                Err(refusal)
            }
        }
    }

    async fn dismiss(
        &self,
        ctx: RequestContext,
        request: pb::DismissRequest,
    ) -> Result<pb::DismissResponse, RpcError> {
        let id = prompt_id(&request.prompt_id)?;
        rules::check_reason(&request.reason, self.config.max_reason_bytes)?;
        let now = now();
        let mut changed = false;
        let prompt = self
            .store
            .change(id, |current| {
                match rules::dismiss_step(current.status, current.past_expiry(now)) {
                    Err(error) => Change::Refuse(error),
                    Ok(false) => Change::Keep,
                    Ok(true) => {
                        let mut next = current.clone();
                        next.status = Status::Dismissed;
                        next.reason = request.reason.clone();
                        next.resolved_at = Some(now);
                        let dismissed =
                            event(attention_events::DISMISSED, &next, &ctx.correlation_id);
                        changed = true;
                        Change::Write(Box::new(next), vec![dismissed])
                    }
                }
            })
            .await?;
        if changed {
            self.outbox.notify_one();
        }
        Ok(pb::DismissResponse {
            prompt: Some(prompt.to_message()),
        })
    }

    // ---- the sweep ----

    /// One pass: pending prompts past their expiry become `expired`; rewards left half-way
    /// (their handler died) are finished.
    pub async fn sweep(&self) -> Result<(), RpcError> {
        loop {
            let expired = self
                .store
                .expire_due(500, |p| event(attention_events::EXPIRED, p, "sweep"))
                .await?;
            if expired.is_empty() {
                break;
            }
            self.outbox.notify_one();
            tracing::info!(count = expired.len(), "prompts expired unanswered");
        }
        for prompt in self
            .store
            .stale_rewards(self.config.resume_after_ms)
            .await?
        {
            let id = prompt.prompt_id;
            if let Err(error) = self.finish_reward(prompt, "sweep").await {
                tracing::warn!(prompt = %id, %error, "a reward left half-way is not finished yet");
            }
        }
        Ok(())
    }

    /// Sweeps every `sweep_interval_ms` until `stop`.
    pub async fn sweep_until(self: Arc<Self>, stop: CancellationToken) {
        let period = Duration::from_millis(self.config.sweep_interval_ms);
        syntropism_platform::shutdown::every(period, &stop, || async {
            if let Err(error) = self.sweep().await {
                tracing::warn!(%error, "attention sweep failed; tried again");
            }
        })
        .await;
    }
}

/// Serves every method of the attention service.
pub async fn register(
    rpc: &mut RpcServer,
    attention: Arc<Attention>,
) -> Result<(), async_nats::SubscribeError> {
    let a = attention.clone();
    rpc.serve::<agent::SubmitPrompt, _, _>(move |ctx, request| {
        let a = a.clone();
        async move { a.prompt(ctx, request).await }
    })
    .await?;
    let a = attention.clone();
    rpc.serve::<admin::PendingPrompts, _, _>(move |_: RequestContext, request| {
        let a = a.clone();
        async move { a.pending(request).await }
    })
    .await?;
    let a = attention.clone();
    rpc.serve::<admin::Reward, _, _>(move |ctx, request| {
        let a = a.clone();
        async move { a.reward(ctx, request).await }
    })
    .await?;
    rpc.serve::<admin::Dismiss, _, _>(move |ctx, request| {
        let a = attention.clone();
        async move { a.dismiss(ctx, request).await }
    })
    .await?;
    Ok(())
}
