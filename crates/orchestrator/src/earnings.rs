//! Rewards into the registry: the orchestrator follows `events.attention.rewarded` in the
//! events stream with a durable consumer of its own, and adds each reward to its agent's
//! earnings once (a redelivered event finds its row).

use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream::consumer::{AckPolicy, DeliverPolicy, pull};
use futures::StreamExt;
use prost::Message as _;
use syntropism_contracts::subjects::{EVENTS_STREAM, attention_events};
use syntropism_contracts::{AgentId, events, pb};

use crate::Orchestrator;

/// The durable consumer's name (shared by the replicas: each event reaches one of them).
const CONSUMER: &str = "orchestrator-earnings";

impl Orchestrator {
    /// Follows rewards until the replica stops; reconnects after a failure.
    pub(crate) async fn follow_earnings(self: Arc<Self>, nats: async_nats::Client) {
        loop {
            if let Err(error) = self.earnings_once(&nats).await {
                tracing::warn!(%error, "following rewards failed; trying again");
            }
            tokio::select! {
                _ = self.stop.cancelled() => return,
                _ = tokio::time::sleep(Duration::from_secs(1)) => {}
            }
        }
    }

    async fn earnings_once(&self, nats: &async_nats::Client) -> anyhow::Result<()> {
        let js = async_nats::jetstream::new(nats.clone());
        let stream = js.get_stream(EVENTS_STREAM).await?;
        let consumer = stream
            .get_or_create_consumer(
                CONSUMER,
                pull::Config {
                    durable_name: Some(CONSUMER.into()),
                    filter_subject: attention_events::REWARDED.into(),
                    deliver_policy: DeliverPolicy::All,
                    ack_policy: AckPolicy::Explicit,
                    ..Default::default()
                },
            )
            .await?;
        let mut messages = consumer.messages().await?;
        loop {
            let next = tokio::select! {
                _ = self.stop.cancelled() => return Ok(()),
                next = messages.next() => next,
            };
            let Some(message) = next else {
                return Ok(());
            };
            let message = message.map_err(|e| anyhow::anyhow!("{e}"))?;
            let prompt = pb::EventEnvelope::decode(message.payload.as_ref())
                .ok()
                .and_then(|e| events::open::<pb::PromptChanged>(&e).ok())
                .and_then(|c| c.prompt);
            if let Some(prompt) = prompt
                && let Ok(agent) = AgentId::parse(&prompt.agent_id, "agent_id")
                && prompt.reward_micros > 0
            {
                self.store
                    .record_earning(
                        &format!("reward:{}", prompt.prompt_id),
                        agent,
                        prompt.reward_micros,
                    )
                    .await
                    .map_err(|e| anyhow::anyhow!("{e}"))?;
            }
            message.ack().await.map_err(|e| anyhow::anyhow!("{e}"))?;
        }
    }
}
