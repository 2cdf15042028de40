//! The Rust agent SDK: what an agent written in Rust (the test agents, for one) uses inside its
//! execution window. The Python SDK has the same surface.
//!
//! An execution finds everything in `env.json` ([`ExecutionEnv`]): who it is, until when, and
//! how to reach NATS — with its own credentials (it may publish only to `agent.<id>.>`) and its
//! own inbox prefix (the only place it may subscribe). [`Agent`] connects with them and offers a
//! typed method for every agent-facing request; errors carry the service's stable code.
//! Requests continue the trace in `TRACEPARENT` when the agent has no trace of its own.

use std::path::{Path, PathBuf};
use std::time::Duration;

use chrono::{DateTime, Utc};
use serde::Deserialize;
use syntropism_contracts::attention::agent as attention;
use syntropism_contracts::economy::agent as economy;
use syntropism_contracts::market::agent as market;
use syntropism_contracts::orchestrator::agent as orchestrator;
use syntropism_contracts::scheduler::agent as scheduler;
use syntropism_contracts::social::agent as social;
use syntropism_contracts::{AgentId, RpcClient, RpcError, pb};

/// Where the runtime puts `env.json`, unless `SYNTROPISM_ENV` says otherwise.
pub const DEFAULT_ENV_FILE: &str = "/workspace/env.json";

/// How the execution reaches NATS.
#[derive(Debug, Clone, Deserialize)]
pub struct NatsEnv {
    pub url: String,
    /// The execution's credentials (`.creds` text), or
    #[serde(default)]
    pub credentials: Option<String>,
    /// a file holding them.
    #[serde(default)]
    pub credentials_file: Option<PathBuf>,
    /// The only subject prefix the execution may subscribe under; replies come there.
    pub inbox_prefix: String,
}

/// A bundle as `env.json` describes it.
#[derive(Debug, Clone, Copy, Default, Deserialize, PartialEq, Eq)]
pub struct BundleEnv {
    pub cpu_millicores: u64,
    pub memory_mib: u64,
    pub duration_ms: u64,
    #[serde(default)]
    pub llm_tokens: u64,
    #[serde(default)]
    pub attention_slots: u64,
}

/// `env.json`: written into the workspace for each execution window.
#[derive(Debug, Clone, Deserialize)]
pub struct ExecutionEnv {
    pub agent_id: String,
    pub execution_id: String,
    /// The window ends (and the credentials expire) then.
    pub deadline: DateTime<Utc>,
    pub nats: NatsEnv,
    /// The agent's balance when the window opened.
    #[serde(default)]
    pub balance_micros: i64,
    #[serde(default)]
    pub bundle: BundleEnv,
    /// What waits in the agent's inbox (filled in by later services).
    #[serde(default)]
    pub inbox: serde_json::Value,
    /// The window's W3C trace context, when the runtime does not set `TRACEPARENT`.
    #[serde(default)]
    pub traceparent: Option<String>,
}

#[derive(Debug, thiserror::Error)]
pub enum SdkError {
    #[error("cannot read {path}: {message}")]
    Env { path: String, message: String },
    #[error("cannot connect to NATS: {0}")]
    Connect(String),
    /// A service's answer: `code` (and `reason`) say what went wrong.
    #[error("{0}")]
    Rpc(#[from] RpcError),
}

impl SdkError {
    /// The stable error code of a service's refusal, if this is one.
    pub fn code(&self) -> Option<syntropism_contracts::ErrorCode> {
        match self {
            SdkError::Rpc(error) => Some(error.code),
            _ => None,
        }
    }
}

impl ExecutionEnv {
    /// Reads `path`.
    pub fn load(path: &Path) -> Result<Self, SdkError> {
        let env_error = |message: String| SdkError::Env {
            path: path.display().to_string(),
            message,
        };
        let text = std::fs::read_to_string(path).map_err(|e| env_error(e.to_string()))?;
        let env: ExecutionEnv =
            serde_json::from_str(&text).map_err(|e| env_error(e.to_string()))?;
        AgentId::parse(&env.agent_id, "agent_id").map_err(|e| env_error(e.to_string()))?;
        Ok(env)
    }

    /// Reads `$SYNTROPISM_ENV`, or [`DEFAULT_ENV_FILE`].
    pub fn from_runtime() -> Result<Self, SdkError> {
        let path = std::env::var_os("SYNTROPISM_ENV")
            .map(PathBuf::from)
            .unwrap_or_else(|| PathBuf::from(DEFAULT_ENV_FILE));
        Self::load(&path)
    }
}

/// A connected agent. Cheap to clone.
#[derive(Debug, Clone)]
pub struct Agent {
    id: AgentId,
    env: ExecutionEnv,
    rpc: RpcClient,
}

impl Agent {
    /// Connects with the execution's credentials and inbox prefix.
    pub async fn connect(env: ExecutionEnv) -> Result<Agent, SdkError> {
        let id = AgentId::parse(&env.agent_id, "agent_id").map_err(|e| SdkError::Env {
            path: "env.json".into(),
            message: e.to_string(),
        })?;
        let mut options = match (&env.nats.credentials, &env.nats.credentials_file) {
            (Some(text), _) => async_nats::ConnectOptions::with_credentials(text)
                .map_err(|e| SdkError::Connect(format!("credentials: {e}")))?,
            (None, Some(file)) => async_nats::ConnectOptions::with_credentials_file(file.clone())
                .await
                .map_err(|e| SdkError::Connect(format!("credentials file: {e}")))?,
            (None, None) => async_nats::ConnectOptions::new(),
        };
        options = options
            .custom_inbox_prefix(env.nats.inbox_prefix.clone())
            .name(format!("agent {id} execution {}", env.execution_id))
            .connection_timeout(Duration::from_secs(5));
        let client = options
            .connect(env.nats.url.as_str())
            .await
            .map_err(|e| SdkError::Connect(e.to_string()))?;
        let mut rpc = RpcClient::new(client).with_correlation_id(env.execution_id.clone());
        let traceparent = std::env::var("TRACEPARENT")
            .ok()
            .filter(|t| !t.is_empty())
            .or_else(|| env.traceparent.clone());
        if let Some(traceparent) = traceparent {
            rpc = rpc.with_traceparent(traceparent);
        }
        Ok(Agent { id, env, rpc })
    }

    /// Connects with the runtime's `env.json`.
    pub async fn from_runtime() -> Result<Agent, SdkError> {
        Self::connect(ExecutionEnv::from_runtime()?).await
    }

    pub fn id(&self) -> AgentId {
        self.id
    }

    pub fn env(&self) -> &ExecutionEnv {
        &self.env
    }

    /// Time left in the window.
    pub fn time_left(&self) -> Duration {
        (self.env.deadline - Utc::now())
            .to_std()
            .unwrap_or_default()
    }

    // ---- economy ----

    /// Own balance: posted, pending (escrowed) and available.
    pub async fn balance(&self) -> Result<pb::AgentBalanceResponse, SdkError> {
        Ok(self
            .rpc
            .call_as::<economy::Balance>(&self.id, &pb::AgentBalanceRequest {})
            .await?)
    }

    /// Own transfers, newest first: `limit` of them before transfer `before_id` (0: newest).
    pub async fn history(
        &self,
        before_id: i64,
        limit: u32,
    ) -> Result<pb::HistoryResponse, SdkError> {
        Ok(self
            .rpc
            .call_as::<economy::History>(&self.id, &pb::AgentHistoryRequest { before_id, limit })
            .await?)
    }

    /// Pays another living agent. Retrying with the same `idempotency_id` is safe.
    pub async fn transfer(
        &self,
        idempotency_id: &str,
        to: AgentId,
        amount_micros: i64,
        memo: &str,
    ) -> Result<pb::AgentTransferResponse, SdkError> {
        Ok(self
            .rpc
            .call_as::<economy::Transfer>(
                &self.id,
                &pb::AgentTransferRequest {
                    idempotency_id: idempotency_id.into(),
                    to_agent_id: to.to_string(),
                    amount_micros,
                    memo: memo.into(),
                },
            )
            .await?)
    }

    // ---- market ----

    /// Supply, utilisation, prices and the last `rounds` rounds (0: the default).
    pub async fn market_state(&self, rounds: u32) -> Result<pb::MarketStateResponse, SdkError> {
        Ok(self
            .rpc
            .call_as::<market::State>(&self.id, &pb::MarketStateRequest { rounds })
            .await?)
    }

    // ---- scheduler ----

    /// Places a bid (its amount is held in escrow). Retrying with the same id is safe.
    pub async fn place_bid(&self, request: &pb::PlaceBidRequest) -> Result<pb::Bid, SdkError> {
        let reply = self
            .rpc
            .call_as::<scheduler::PlaceBid>(&self.id, request)
            .await?;
        reply
            .bid
            .ok_or_else(|| SdkError::Rpc(RpcError::internal("the scheduler sent no bid")))
    }

    /// Cancels one of own pending bids (its escrow is released).
    pub async fn cancel_bid(&self, idempotency_id: &str, bid_id: i64) -> Result<pb::Bid, SdkError> {
        let reply = self
            .rpc
            .call_as::<scheduler::CancelBid>(
                &self.id,
                &pb::CancelBidRequest {
                    idempotency_id: idempotency_id.into(),
                    bid_id,
                },
            )
            .await?;
        reply
            .bid
            .ok_or_else(|| SdkError::Rpc(RpcError::internal("the scheduler sent no bid")))
    }

    /// Own bids, newest first, optionally of one status.
    pub async fn list_bids(
        &self,
        status: pb::BidStatus,
        before_id: i64,
        limit: u32,
    ) -> Result<pb::ListBidsResponse, SdkError> {
        Ok(self
            .rpc
            .call_as::<scheduler::ListBids>(
                &self.id,
                &pb::ListBidsRequest {
                    status: status as i32,
                    before_id,
                    limit,
                },
            )
            .await?)
    }

    // ---- orchestrator ----

    /// Own record (status, lineage, executions, totals) and the current window.
    pub async fn whoami(&self) -> Result<pb::SelfResponse, SdkError> {
        Ok(self
            .rpc
            .call_as::<orchestrator::SelfRecord>(&self.id, &pb::SelfRequest {})
            .await?)
    }

    /// The living agents: ids and status, never their code.
    pub async fn directory(&self) -> Result<Vec<pb::DirectoryEntry>, SdkError> {
        Ok(self
            .rpc
            .call_as::<orchestrator::Directory>(&self.id, &pb::DirectoryRequest {})
            .await?
            .agents)
    }

    /// Spawns a child (fee burned; endowment and first bid funded from own credits).
    /// Retrying with the same idempotency id is safe.
    pub async fn spawn(&self, request: &pb::SpawnRequest) -> Result<pb::SpawnResponse, SdkError> {
        Ok(self
            .rpc
            .call_as::<orchestrator::Spawn>(&self.id, request)
            .await?)
    }

    // ---- attention ----

    /// Shows the human `content` (only in a window whose bundle carries attention slots, at
    /// most that many per window). Retrying with the same idempotency id is safe.
    pub async fn prompt(
        &self,
        idempotency_id: &str,
        content: &str,
    ) -> Result<pb::SubmitPromptResponse, SdkError> {
        Ok(self
            .rpc
            .call_as::<attention::SubmitPrompt>(
                &self.id,
                &pb::SubmitPromptRequest {
                    idempotency_id: idempotency_id.into(),
                    content: content.into(),
                },
            )
            .await?)
    }

    // ---- social ----

    /// Sends `body` to agent `to` (or to `"human"`), delivered at its next window; the fee is
    /// burned. Retrying with the same idempotency id is safe (and charges once).
    pub async fn send_message(
        &self,
        idempotency_id: &str,
        to: &str,
        body: &str,
    ) -> Result<pb::SendMessageResponse, SdkError> {
        Ok(self
            .rpc
            .call_as::<social::SendMessage>(
                &self.id,
                &pb::SendMessageRequest {
                    idempotency_id: idempotency_id.into(),
                    to: to.into(),
                    body: body.into(),
                },
            )
            .await?)
    }

    /// The messages delivered at this window: sent since the previous window opened.
    pub async fn inbox(&self) -> Result<Vec<pb::DirectMessage>, SdkError> {
        Ok(self
            .rpc
            .call_as::<social::ReadInbox>(&self.id, &pb::ReadInboxRequest {})
            .await?
            .messages)
    }

    /// Posts `body` on the public board. Retrying with the same idempotency id is safe.
    pub async fn post(&self, idempotency_id: &str, body: &str) -> Result<pb::BoardPost, SdkError> {
        let reply = self
            .rpc
            .call_as::<social::Post>(
                &self.id,
                &pb::PostRequest {
                    idempotency_id: idempotency_id.into(),
                    body: body.into(),
                },
            )
            .await?;
        reply
            .post
            .ok_or_else(|| SdkError::Rpc(RpcError::internal("the board sent no post")))
    }

    /// The public board, newest first: `limit` posts before post `before_id` (0: newest).
    pub async fn board(
        &self,
        before_id: i64,
        limit: u32,
    ) -> Result<pb::ReadBoardResponse, SdkError> {
        Ok(self
            .rpc
            .call_as::<social::ReadBoard>(&self.id, &pb::ReadBoardRequest { before_id, limit })
            .await?)
    }
}
