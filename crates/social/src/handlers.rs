//! Social's NATS methods: agent-facing (`send`, `inbox`, `post`, `board`), internal
//! (`inbox_summary`) and operator (`messages`), and the sweep.
//!
//! A message is written `paying` first, its fee is then burned through the economy (with an
//! idempotency id derived from the sender's), and only then is it `sent`: visible to its
//! recipient, with its event. A message cut off in between is finished by a retry with the
//! same id, or by the sweep; asking the economy again with the same id charges nothing more.
//! So a message is delivered if and only if its fee was paid, once.

use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, SubsecRound as _, Utc};
use sha2::{Digest, Sha256};
use syntropism_contracts::economy::internal as economy;
use syntropism_contracts::orchestrator::internal as orchestrator;
use syntropism_contracts::social::{admin, agent, internal};
use syntropism_contracts::subjects::{services, social_events};
use syntropism_contracts::{
    AgentId, ErrorCode, IdempotencyId, RequestContext, RpcClient, RpcError, RpcServer, events, pb,
};
use syntropism_platform::outbox::PendingEvent;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use crate::config::SocialSection;
use crate::rules::{self, Recipient};
use crate::store::{NewMessage, NewPost, State, Store, StoredMessage, StoredPost};

/// A reply must fit a NATS message; pages are cut to this many bytes.
const REPLY_BUDGET: usize = 512 * 1024;

/// The social service's request handling, shared by every handler task.
#[derive(Debug)]
pub struct Social {
    store: Store,
    client: RpcClient,
    config: SocialSection,
    outbox: Arc<Notify>,
}

/// Now, to the microsecond Postgres keeps, so what a handler answers equals what it stored.
fn now() -> DateTime<Utc> {
    Utc::now().trunc_subsecs(6)
}

fn fingerprint(body: &impl prost::Message) -> Vec<u8> {
    let mut hash = Sha256::new();
    hash.update(body.encode_to_vec());
    hash.finalize().to_vec()
}

/// Only a definite refusal means no fee was taken; anything else leaves the outcome unknown.
fn definite(error: &RpcError) -> bool {
    matches!(
        error.code,
        ErrorCode::InsufficientFunds
            | ErrorCode::FailedPrecondition
            | ErrorCode::NotFound
            | ErrorCode::InvalidArgument
            | ErrorCode::Conflict
            | ErrorCode::Forbidden
            | ErrorCode::PayloadTooLarge
    )
}

fn time(t: Option<&prost_types::Timestamp>) -> Option<DateTime<Utc>> {
    t.and_then(|t| DateTime::from_timestamp(t.seconds, t.nanos.max(0) as u32))
}

fn reused(key: &str, what: &str) -> RpcError {
    RpcError::conflict(format!(
        "idempotency id {key:?} was already used for a different {what}"
    ))
    .with_reason("idempotency_id_reused")
}

fn message_sent(message: &StoredMessage, correlation: &str) -> PendingEvent {
    PendingEvent {
        subject: social_events::MESSAGE_SENT.into(),
        envelope: events::envelope(
            services::SOCIAL,
            &pb::MessageSent {
                message: Some(message.to_message()),
            },
            correlation,
            &format!("message/{}", message.id),
        ),
    }
}

fn posted(post: &StoredPost, correlation: &str) -> PendingEvent {
    PendingEvent {
        subject: social_events::POSTED.into(),
        envelope: events::envelope(
            services::SOCIAL,
            &pb::Posted {
                post: Some(post.to_message()),
            },
            correlation,
            &format!("post/{}", post.id),
        ),
    }
}

fn burn() -> Option<pb::AccountRef> {
    Some(pb::AccountRef {
        account: Some(pb::account_ref::Account::System(
            pb::SystemAccount::Burn as i32,
        )),
    })
}

impl Social {
    pub fn new(
        store: Store,
        client: RpcClient,
        config: SocialSection,
        outbox: Arc<Notify>,
    ) -> Self {
        Self {
            store,
            client,
            config,
            outbox,
        }
    }

    /// The agent's open window, and the start of the one before it.
    async fn window(&self, agent: AgentId) -> Result<pb::WindowResponse, RpcError> {
        let ask = pb::WindowRequest {
            agent_id: agent.to_string(),
        };
        self.client
            .call_retrying::<orchestrator::Window>(&ask)
            .await
    }

    /// The caller's open window, or why it has none.
    async fn open_window(&self, agent: AgentId) -> Result<pb::WindowResponse, RpcError> {
        let window = self.window(agent).await?;
        if window.execution.is_none() {
            return Err(RpcError::failed_precondition(
                "no window of yours is open: messages are sent and read only during one",
            )
            .with_reason("no_window"));
        }
        Ok(window)
    }

    /// A recipient agent must exist and not be dead.
    async fn check_recipient(&self, id: AgentId) -> Result<(), RpcError> {
        let ask = pb::GetAgentRequest {
            agent_id: id.to_string(),
        };
        let agent = match self
            .client
            .call_retrying::<orchestrator::GetAgent>(&ask)
            .await
        {
            Ok(reply) => reply.agent.unwrap_or_default(),
            Err(error) if error.code == ErrorCode::NotFound => {
                return Err(RpcError::not_found(format!("no agent {id}"))
                    .with_reason("unknown_recipient")
                    .with_detail("to", id));
            }
            Err(error) => return Err(error),
        };
        if agent.status() == pb::AgentStatus::Dead {
            return Err(RpcError::failed_precondition(format!("agent {id} is dead"))
                .with_reason("recipient_dead")
                .with_detail("to", id));
        }
        Ok(())
    }

    /// Burns `amount` from `payer` under `key` (asking again is harmless).
    async fn burn_fee(
        &self,
        key: String,
        payer: AgentId,
        amount: i64,
        memo: String,
    ) -> Result<(), RpcError> {
        let request = pb::TransferRequest {
            idempotency_id: key,
            op: Some(pb::TransferOp {
                from: Some(pb::AccountRef {
                    account: Some(pb::account_ref::Account::AgentId(payer.to_string())),
                }),
                to: burn(),
                amount_micros: amount,
                memo,
            }),
        };
        self.client
            .call_retrying::<economy::Transfer>(&request)
            .await
            .map(|_| ())
    }

    // ---- direct messages ----

    async fn send(
        &self,
        ctx: RequestContext,
        request: pb::SendMessageRequest,
    ) -> Result<pb::SendMessageResponse, RpcError> {
        let sender = ctx.caller()?;
        let key = IdempotencyId::parse(&request.idempotency_id)?;
        rules::check_body(&request.body, self.config.max_message_bytes)?;
        let recipient = Recipient::parse(&request.to)?;
        let hash = {
            let mut body = request.clone();
            body.idempotency_id.clear();
            fingerprint(&body)
        };
        if let Some(existing) = self.store.message_by_key(sender, key.as_str()).await? {
            if existing.request_hash != hash {
                return Err(reused(key.as_str(), "message"));
            }
            return self.finish_message(existing, &ctx.correlation_id).await;
        }
        let window = self.open_window(sender).await?;
        if let Recipient::Agent(id) = recipient {
            self.check_recipient(id).await?;
        }
        let message = self
            .store
            .begin_message(&NewMessage {
                from: sender,
                idempotency_id: key.to_string(),
                request_hash: hash.clone(),
                recipient: recipient.name(),
                body: request.body,
                execution_id: window.execution.unwrap_or_default().execution_id,
                fee_micros: self.config.message_fee_micros,
            })
            .await?;
        if message.request_hash != hash {
            // A concurrent request with the same id and another body won.
            return Err(reused(key.as_str(), "message"));
        }
        self.finish_message(message, &ctx.correlation_id).await
    }

    /// Carries a message to its end: the first outcome if it has one, else its fee burned and
    /// the message sent (or refused with the economy's refusal).
    async fn finish_message(
        &self,
        message: StoredMessage,
        correlation: &str,
    ) -> Result<pb::SendMessageResponse, RpcError> {
        let message = match message.state {
            State::Refused => {
                return Err(message
                    .refusal
                    .unwrap_or_else(|| RpcError::internal("a refused message without refusal")));
            }
            State::Done => message,
            State::Paying => {
                if message.fee_micros > 0 {
                    let key = rules::fee_key(
                        rules::MESSAGE_FEE,
                        message.from,
                        &IdempotencyId::parse(&message.idempotency_id)?,
                    );
                    let memo = rules::message_fee_memo(message.id, &message.recipient);
                    if let Err(error) = self
                        .burn_fee(key, message.from, message.fee_micros, memo)
                        .await
                    {
                        if definite(&error) {
                            self.store.refuse_message(message.id, &error).await?;
                        }
                        return Err(error);
                    }
                }
                let sent = self
                    .store
                    .complete_message(message.id, now(), |m| message_sent(m, correlation))
                    .await?;
                self.outbox.notify_one();
                tracing::debug!(message = sent.id, from = %sent.from, to = %sent.recipient, "message sent");
                sent
            }
        };
        Ok(pb::SendMessageResponse {
            fee_micros: message.fee_micros,
            message: Some(message.to_message()),
        })
    }

    async fn inbox(&self, ctx: RequestContext) -> Result<pb::ReadInboxResponse, RpcError> {
        let agent = ctx.caller()?;
        let window = self.open_window(agent).await?;
        let started = time(
            window
                .execution
                .as_ref()
                .and_then(|e| e.started_at.as_ref()),
        )
        .ok_or_else(|| RpcError::unavailable("the open window has no start yet"))?;
        let delivery = rules::inbox_delivery(time(window.previous_started_at.as_ref()), started);
        let mut messages: Vec<pb::DirectMessage> = self
            .store
            .inbox(&agent.to_string(), delivery, self.config.inbox_max_messages)
            .await?
            .iter()
            .map(StoredMessage::to_message)
            .collect();
        let fit = rules::fitting(
            messages.iter().map(prost::Message::encoded_len),
            REPLY_BUDGET,
        );
        messages.truncate(fit);
        Ok(pb::ReadInboxResponse { messages })
    }

    async fn inbox_summary(
        &self,
        request: pb::InboxSummaryRequest,
    ) -> Result<pb::InboxSummaryResponse, RpcError> {
        let agent = AgentId::parse(&request.agent_id, "agent_id")?;
        let window_start = time(request.window_start.as_ref()).ok_or_else(|| {
            RpcError::invalid_argument("window_start is required and must be a valid time")
                .with_reason("missing_field")
                .with_detail("field", "window_start")
        })?;
        let window = self.window(agent).await?;
        let delivery = rules::upcoming_delivery(
            time(
                window
                    .execution
                    .as_ref()
                    .and_then(|e| e.started_at.as_ref()),
            ),
            time(window.previous_started_at.as_ref()),
            window_start,
        );
        let summary = self
            .store
            .inbox_summary(&agent.to_string(), delivery)
            .await?;
        Ok(pb::InboxSummaryResponse {
            count: summary.count,
            senders: summary.senders,
        })
    }

    async fn human_messages(
        &self,
        request: pb::HumanMessagesRequest,
    ) -> Result<pb::HumanMessagesResponse, RpcError> {
        let limit = rules::page_limit(
            request.limit,
            self.config.board_default_limit,
            self.config.board_max_limit,
        );
        let rows = self.store.human_messages(request.before_id, limit).await?;
        let full = rows.len() == limit as usize;
        let mut messages: Vec<pb::DirectMessage> =
            rows.iter().map(StoredMessage::to_message).collect();
        let fit = rules::fitting(
            messages.iter().map(prost::Message::encoded_len),
            REPLY_BUDGET,
        );
        let cut = fit < messages.len();
        messages.truncate(fit);
        let next_before_id = if full || cut {
            messages.last().map_or(0, |m| m.id)
        } else {
            0
        };
        Ok(pb::HumanMessagesResponse {
            messages,
            next_before_id,
        })
    }

    // ---- the board ----

    async fn post(
        &self,
        ctx: RequestContext,
        request: pb::PostRequest,
    ) -> Result<pb::PostResponse, RpcError> {
        let agent = ctx.caller()?;
        let key = IdempotencyId::parse(&request.idempotency_id)?;
        rules::check_body(&request.body, self.config.max_message_bytes)?;
        let hash = {
            let mut body = request.clone();
            body.idempotency_id.clear();
            fingerprint(&body)
        };
        let post = match self.store.post_by_key(agent, key.as_str()).await? {
            Some(existing) => existing,
            None => {
                self.store
                    .begin_post(&NewPost {
                        agent,
                        idempotency_id: key.to_string(),
                        request_hash: hash.clone(),
                        body: request.body,
                        fee_micros: self.config.post_fee_micros,
                    })
                    .await?
            }
        };
        if post.request_hash != hash {
            return Err(reused(key.as_str(), "post"));
        }
        self.finish_post(post, &ctx.correlation_id).await
    }

    async fn finish_post(
        &self,
        post: StoredPost,
        correlation: &str,
    ) -> Result<pb::PostResponse, RpcError> {
        let post = match post.state {
            State::Refused => {
                return Err(post
                    .refusal
                    .unwrap_or_else(|| RpcError::internal("a refused post without refusal")));
            }
            State::Done => post,
            State::Paying => {
                if post.fee_micros > 0 {
                    let key = rules::fee_key(
                        rules::POST_FEE,
                        post.agent,
                        &IdempotencyId::parse(&post.idempotency_id)?,
                    );
                    let memo = rules::post_fee_memo(post.id);
                    if let Err(error) = self.burn_fee(key, post.agent, post.fee_micros, memo).await
                    {
                        if definite(&error) {
                            self.store.refuse_post(post.id, &error).await?;
                        }
                        return Err(error);
                    }
                }
                let done = self
                    .store
                    .complete_post(post.id, now(), |p| posted(p, correlation))
                    .await?;
                self.outbox.notify_one();
                done
            }
        };
        Ok(pb::PostResponse {
            post: Some(post.to_message()),
        })
    }

    async fn board(
        &self,
        request: pb::ReadBoardRequest,
    ) -> Result<pb::ReadBoardResponse, RpcError> {
        let limit = rules::page_limit(
            request.limit,
            self.config.board_default_limit,
            self.config.board_max_limit,
        );
        let rows = self.store.board(request.before_id, limit).await?;
        let full = rows.len() == limit as usize;
        let mut posts: Vec<pb::BoardPost> = rows.iter().map(StoredPost::to_message).collect();
        let fit = rules::fitting(posts.iter().map(prost::Message::encoded_len), REPLY_BUDGET);
        let cut = fit < posts.len();
        posts.truncate(fit);
        let next_before_id = if full || cut {
            posts.last().map_or(0, |p| p.id)
        } else {
            0
        };
        Ok(pb::ReadBoardResponse {
            posts,
            next_before_id,
        })
    }

    // ---- the sweep ----

    /// One pass: messages and posts whose handler died while paying are finished.
    pub async fn sweep(&self) -> Result<(), RpcError> {
        for message in self
            .store
            .stale_messages(self.config.resume_after_ms)
            .await?
        {
            let id = message.id;
            if let Err(error) = self.finish_message(message, "sweep").await {
                tracing::warn!(message = id, %error, "a message left paying is not finished");
            }
        }
        for post in self.store.stale_posts(self.config.resume_after_ms).await? {
            let id = post.id;
            if let Err(error) = self.finish_post(post, "sweep").await {
                tracing::warn!(post = id, %error, "a post left paying is not finished");
            }
        }
        Ok(())
    }

    /// Sweeps every `sweep_interval_ms` until `stop`.
    pub async fn sweep_until(self: Arc<Self>, stop: CancellationToken) {
        let period = Duration::from_millis(self.config.sweep_interval_ms);
        syntropism_platform::shutdown::every(period, &stop, || async {
            if let Err(error) = self.sweep().await {
                tracing::warn!(%error, "social sweep failed; tried again");
            }
        })
        .await;
    }
}

/// Serves every method of the social service.
pub async fn register(
    rpc: &mut RpcServer,
    social: Arc<Social>,
) -> Result<(), async_nats::SubscribeError> {
    let s = social.clone();
    rpc.serve::<agent::SendMessage, _, _>(move |ctx, request| {
        let s = s.clone();
        async move { s.send(ctx, request).await }
    })
    .await?;
    let s = social.clone();
    rpc.serve::<agent::ReadInbox, _, _>(move |ctx, _| {
        let s = s.clone();
        async move { s.inbox(ctx).await }
    })
    .await?;
    let s = social.clone();
    rpc.serve::<agent::Post, _, _>(move |ctx, request| {
        let s = s.clone();
        async move { s.post(ctx, request).await }
    })
    .await?;
    let s = social.clone();
    rpc.serve::<agent::ReadBoard, _, _>(move |_: RequestContext, request| {
        let s = s.clone();
        async move { s.board(request).await }
    })
    .await?;
    let s = social.clone();
    rpc.serve::<internal::InboxSummary, _, _>(move |_: RequestContext, request| {
        let s = s.clone();
        async move { s.inbox_summary(request).await }
    })
    .await?;
    rpc.serve::<admin::HumanMessages, _, _>(move |_: RequestContext, request| {
        let s = social.clone();
        async move { s.human_messages(request).await }
    })
    .await?;
    Ok(())
}
