//! Attention's records in Postgres (schema `attention`): the prompts.

use chrono::{DateTime, Utc};
use diesel::sql_types::{BigInt, Bytea, Integer, Nullable, Text, Timestamptz};
use diesel_async::{AsyncConnection, AsyncPgConnection, RunQueryDsl};
use prost::Message as _;
use syntropism_contracts::{AgentId, RpcError, pb};
use syntropism_platform::db::rpc_error as db_error;
use syntropism_platform::db::{Pool, PooledConnection};
use syntropism_platform::outbox::{self, PendingEvent};
use syntropism_platform::sql::sql;

use crate::rules::{Scores, Status};

pub use syntropism_contracts::time::timestamp;

#[derive(diesel::QueryableByName)]
struct PromptRow {
    #[diesel(sql_type = diesel::sql_types::Uuid)]
    prompt_id: uuid::Uuid,
    #[diesel(sql_type = diesel::sql_types::Uuid)]
    agent_id: uuid::Uuid,
    #[diesel(sql_type = Text)]
    idempotency_id: String,
    #[diesel(sql_type = Bytea)]
    request_hash: Vec<u8>,
    #[diesel(sql_type = Text)]
    execution_id: String,
    #[diesel(sql_type = BigInt)]
    window_slots: i64,
    #[diesel(sql_type = BigInt)]
    paid_micros: i64,
    #[diesel(sql_type = Text)]
    content: String,
    #[diesel(sql_type = Text)]
    status: String,
    #[diesel(sql_type = Timestamptz)]
    created_at: DateTime<Utc>,
    #[diesel(sql_type = Timestamptz)]
    expires_at: DateTime<Utc>,
    #[diesel(sql_type = Nullable<Integer>)]
    interesting: Option<i32>,
    #[diesel(sql_type = Nullable<Integer>)]
    useful: Option<i32>,
    #[diesel(sql_type = Nullable<Integer>)]
    understandable: Option<i32>,
    #[diesel(sql_type = BigInt)]
    reward_micros: i64,
    #[diesel(sql_type = Text)]
    reason: String,
    #[diesel(sql_type = Nullable<Bytea>)]
    refusal: Option<Vec<u8>>,
    #[diesel(sql_type = Nullable<Timestamptz>)]
    resolved_at: Option<DateTime<Utc>>,
}

const PROMPT_COLUMNS: &str = "prompt_id, agent_id, idempotency_id, request_hash, execution_id, \
    window_slots, paid_micros, content, status, created_at, expires_at, interesting, useful, \
    understandable, reward_micros, reason, refusal, resolved_at";

/// A prompt as stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredPrompt {
    pub prompt_id: uuid::Uuid,
    pub agent_id: AgentId,
    pub idempotency_id: String,
    pub request_hash: Vec<u8>,
    pub execution_id: String,
    pub window_slots: u64,
    pub paid_micros: i64,
    pub content: String,
    pub status: Status,
    pub created_at: DateTime<Utc>,
    pub expires_at: DateTime<Utc>,
    pub scores: Option<Scores>,
    pub reward_micros: i64,
    pub reason: String,
    /// The economy's refusal of the reward, when it refused for good.
    pub refusal: Option<RpcError>,
    pub resolved_at: Option<DateTime<Utc>>,
}

impl TryFrom<PromptRow> for StoredPrompt {
    type Error = diesel::result::Error;

    fn try_from(row: PromptRow) -> Result<Self, Self::Error> {
        let status = Status::named(&row.status).ok_or_else(|| {
            diesel::result::Error::DeserializationError(
                format!("unknown prompt status {:?}", row.status).into(),
            )
        })?;
        let score = |v: i32| v.clamp(0, 10) as u32;
        let scores = match (row.interesting, row.useful, row.understandable) {
            (Some(i), Some(u), Some(un)) => Some(Scores {
                interesting: score(i),
                useful: score(u),
                understandable: score(un),
            }),
            _ => None,
        };
        Ok(StoredPrompt {
            prompt_id: row.prompt_id,
            agent_id: AgentId::from_uuid(row.agent_id),
            idempotency_id: row.idempotency_id,
            request_hash: row.request_hash,
            execution_id: row.execution_id,
            window_slots: row.window_slots.max(0) as u64,
            paid_micros: row.paid_micros,
            content: row.content,
            status,
            created_at: row.created_at,
            expires_at: row.expires_at,
            scores,
            reward_micros: row.reward_micros,
            reason: row.reason,
            refusal: row
                .refusal
                .and_then(|bytes| pb::Error::decode(bytes.as_slice()).ok())
                .map(RpcError::from_proto),
            resolved_at: row.resolved_at,
        })
    }
}

fn prompts(rows: Vec<PromptRow>) -> Result<Vec<StoredPrompt>, diesel::result::Error> {
    rows.into_iter().map(StoredPrompt::try_from).collect()
}

impl StoredPrompt {
    pub fn to_message(&self) -> pb::Prompt {
        let mut prompt = pb::Prompt {
            prompt_id: self.prompt_id.to_string(),
            agent_id: self.agent_id.to_string(),
            execution_id: self.execution_id.clone(),
            content: self.content.clone(),
            paid_micros: self.paid_micros,
            status: 0,
            created_at: Some(timestamp(self.created_at)),
            expires_at: Some(timestamp(self.expires_at)),
            scores: self.scores.map(Scores::to_pb),
            reward_micros: self.reward_micros,
            reason: self.reason.clone(),
            resolved_at: self.resolved_at.map(timestamp),
        };
        prompt.set_status(self.status.to_pb());
        prompt
    }

    /// Whether it is past its expiry at `now`.
    pub fn past_expiry(&self, now: DateTime<Utc>) -> bool {
        self.expires_at <= now
    }
}

/// What [`Store::insert_prompt`] found.
#[derive(Debug)]
pub enum Insert {
    /// Written, with the window's prompts now counted.
    Inserted(Box<StoredPrompt>, u64),
    /// A prompt with the same idempotency id exists (a concurrent retry won).
    Exists(Box<StoredPrompt>),
    /// The window's slots were used (by this many prompts).
    SlotsUsed(u64),
}

/// What a change of one prompt decided.
#[derive(Debug)]
pub enum Change {
    /// Write this state, with these events.
    Write(Box<StoredPrompt>, Vec<PendingEvent>),
    /// Change nothing; answer with the prompt as it is.
    Keep,
    Refuse(RpcError),
}

#[derive(Clone)]
pub struct Store {
    pool: Pool,
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Store").finish_non_exhaustive()
    }
}

#[derive(diesel::QueryableByName)]
struct Count {
    #[diesel(sql_type = BigInt)]
    n: i64,
}

async fn used_on(conn: &mut AsyncPgConnection, execution: &str) -> diesel::QueryResult<u64> {
    let rows: Vec<Count> = sql("SELECT count(*) AS n FROM prompts WHERE execution_id = $1")
        .bind::<Text, _>(execution.to_owned())
        .load(conn)
        .await?;
    Ok(rows.as_slice().first().map_or(0, |c| c.n.max(0) as u64))
}

async fn prompt_on(
    conn: &mut AsyncPgConnection,
    id: uuid::Uuid,
    lock: bool,
) -> diesel::QueryResult<Option<StoredPrompt>> {
    let rows: Vec<PromptRow> = sql(format!(
        "SELECT {PROMPT_COLUMNS} FROM prompts WHERE prompt_id = $1{}",
        if lock { " FOR UPDATE" } else { "" }
    ))
    .bind::<diesel::sql_types::Uuid, _>(id)
    .load(conn)
    .await?;
    Ok(prompts(rows)?.into_iter().next())
}

impl Store {
    pub fn new(pool: Pool) -> Self {
        Self { pool }
    }

    async fn connection(&self) -> Result<PooledConnection, RpcError> {
        syntropism_platform::db::checkout(&self.pool).await
    }

    pub async fn prompt(&self, id: uuid::Uuid) -> Result<Option<StoredPrompt>, RpcError> {
        let mut conn = self.connection().await?;
        prompt_on(&mut conn, id, false).await.map_err(db_error)
    }

    /// The prompt an agent submitted with `idempotency_id`, if any.
    pub async fn prompt_by_key(
        &self,
        agent: AgentId,
        idempotency_id: &str,
    ) -> Result<Option<StoredPrompt>, RpcError> {
        let mut conn = self.connection().await?;
        let rows: Vec<PromptRow> = sql(format!(
            "SELECT {PROMPT_COLUMNS} FROM prompts WHERE agent_id = $1 AND idempotency_id = $2"
        ))
        .bind::<diesel::sql_types::Uuid, _>(agent.as_uuid())
        .bind::<Text, _>(idempotency_id.to_owned())
        .load(&mut conn)
        .await
        .map_err(db_error)?;
        Ok(prompts(rows).map_err(db_error)?.into_iter().next())
    }

    /// Prompts shown in an execution so far.
    pub async fn used_slots(&self, execution: &str) -> Result<u64, RpcError> {
        let mut conn = self.connection().await?;
        used_on(&mut conn, execution).await.map_err(db_error)
    }

    /// Writes a new prompt with its event unless its window's slots are used, under a lock per
    /// execution so concurrent prompts of one window cannot exceed them.
    pub async fn insert_prompt(
        &self,
        prompt: &StoredPrompt,
        event: PendingEvent,
    ) -> Result<Insert, RpcError> {
        let mut conn = self.connection().await?;
        let inserted = conn
            .transaction::<Option<Insert>, diesel::result::Error, _>(async |conn| {
                sql("SELECT pg_advisory_xact_lock(hashtextextended($1::text, 7))")
                    .bind::<Text, _>(prompt.execution_id.clone())
                    .execute(conn)
                    .await?;
                let used = used_on(conn, &prompt.execution_id).await?;
                if used >= prompt.window_slots {
                    return Ok(Some(Insert::SlotsUsed(used)));
                }
                let n = sql(
                    "INSERT INTO prompts (prompt_id, agent_id, idempotency_id, request_hash, \
                     execution_id, window_slots, paid_micros, content, status, created_at, expires_at) \
                     VALUES ($1, $2, $3, $4, $5, $6, $7, $8, 'pending', $9, $10) \
                     ON CONFLICT (agent_id, idempotency_id) DO NOTHING",
                )
                .bind::<diesel::sql_types::Uuid, _>(prompt.prompt_id)
                .bind::<diesel::sql_types::Uuid, _>(prompt.agent_id.as_uuid())
                .bind::<Text, _>(prompt.idempotency_id.clone())
                .bind::<Bytea, _>(prompt.request_hash.clone())
                .bind::<Text, _>(prompt.execution_id.clone())
                .bind::<BigInt, _>(prompt.window_slots.min(i64::MAX as u64) as i64)
                .bind::<BigInt, _>(prompt.paid_micros)
                .bind::<Text, _>(prompt.content.clone())
                .bind::<Timestamptz, _>(prompt.created_at)
                .bind::<Timestamptz, _>(prompt.expires_at)
                .execute(conn)
                .await?;
                if n == 0 {
                    return Ok(None);
                }
                outbox::enqueue(conn, std::slice::from_ref(&event)).await?;
                Ok(Some(Insert::Inserted(Box::new(prompt.clone()), used + 1)))
            })
            .await
            .map_err(db_error)?;
        match inserted {
            Some(outcome) => Ok(outcome),
            None => self
                .prompt_by_key(prompt.agent_id, &prompt.idempotency_id)
                .await?
                .map(|p| Insert::Exists(Box::new(p)))
                .ok_or_else(|| RpcError::internal("a prompt vanished")),
        }
    }

    /// Changes one prompt: `decide` sees it locked and says what to write (or to keep it, or
    /// to refuse). Returns the prompt as it then stands.
    pub async fn change(
        &self,
        id: uuid::Uuid,
        decide: impl FnOnce(&StoredPrompt) -> Change + Send,
    ) -> Result<StoredPrompt, RpcError> {
        let mut conn = self.connection().await?;
        conn.transaction::<Result<StoredPrompt, RpcError>, diesel::result::Error, _>(async |conn| {
            let Some(current) = prompt_on(conn, id, true).await? else {
                return Ok(Err(RpcError::not_found(format!("no prompt {id}"))
                    .with_reason("prompt_not_found")));
            };
            let (next, events) = match decide(&current) {
                Change::Write(next, events) => (next, events),
                Change::Keep => return Ok(Ok(current)),
                Change::Refuse(error) => return Ok(Err(error)),
            };
            let score = |f: fn(&Scores) -> u32| next.scores.as_ref().map(|s| f(s) as i32);
            sql("UPDATE prompts SET status = $2, interesting = $3, useful = $4, understandable = $5, \
                 reward_micros = $6, reason = $7, refusal = $8, resolved_at = $9, updated_at = now() \
                 WHERE prompt_id = $1")
            .bind::<diesel::sql_types::Uuid, _>(id)
            .bind::<Text, _>(next.status.as_str())
            .bind::<Nullable<Integer>, _>(score(|s| s.interesting))
            .bind::<Nullable<Integer>, _>(score(|s| s.useful))
            .bind::<Nullable<Integer>, _>(score(|s| s.understandable))
            .bind::<BigInt, _>(next.reward_micros)
            .bind::<Text, _>(next.reason.clone())
            .bind::<Nullable<Bytea>, _>(next.refusal.as_ref().map(|e| e.to_proto().encode_to_vec()))
            .bind::<Nullable<Timestamptz>, _>(next.resolved_at)
            .execute(conn)
            .await?;
            outbox::enqueue(conn, &events).await?;
            Ok(Ok(*next))
        })
        .await
        .map_err(db_error)?
    }

    /// Pending prompts not yet expired, most paid for first, then oldest.
    pub async fn pending(&self, limit: u32) -> Result<Vec<StoredPrompt>, RpcError> {
        let mut conn = self.connection().await?;
        let rows: Vec<PromptRow> = sql(format!(
            "SELECT {PROMPT_COLUMNS} FROM prompts WHERE status = 'pending' AND expires_at > now() \
             ORDER BY paid_micros DESC, created_at, prompt_id LIMIT $1"
        ))
        .bind::<BigInt, _>(i64::from(limit))
        .load(&mut conn)
        .await
        .map_err(db_error)?;
        prompts(rows).map_err(db_error)
    }

    /// Marks up to `limit` pending prompts past their expiry `expired`, each with its event
    /// (`event` builds it from the expired prompt). Replicas sweeping at once skip each other's
    /// rows, so each prompt expires once.
    pub async fn expire_due(
        &self,
        limit: u32,
        event: impl Fn(&StoredPrompt) -> PendingEvent + Send + Sync,
    ) -> Result<Vec<StoredPrompt>, RpcError> {
        let mut conn = self.connection().await?;
        conn.transaction::<Vec<StoredPrompt>, diesel::result::Error, _>(async |conn| {
            let rows: Vec<PromptRow> = sql(format!(
                "UPDATE prompts SET status = 'expired', resolved_at = now(), updated_at = now() \
                 WHERE prompt_id IN (SELECT prompt_id FROM prompts WHERE status = 'pending' \
                   AND expires_at <= now() ORDER BY expires_at LIMIT $1 FOR UPDATE SKIP LOCKED) \
                 RETURNING {PROMPT_COLUMNS}"
            ))
            .bind::<BigInt, _>(i64::from(limit))
            .load(conn)
            .await?;
            let expired = prompts(rows)?;
            let events: Vec<PendingEvent> = expired.iter().map(&event).collect();
            outbox::enqueue(conn, &events).await?;
            Ok(expired)
        })
        .await
        .map_err(db_error)
    }

    /// Rewards whose minting was left half-way `older_than_ms` ago or more.
    pub async fn stale_rewards(&self, older_than_ms: u64) -> Result<Vec<StoredPrompt>, RpcError> {
        let mut conn = self.connection().await?;
        let rows: Vec<PromptRow> = sql(format!(
            "SELECT {PROMPT_COLUMNS} FROM prompts WHERE status = 'rewarding' \
             AND updated_at < now() - make_interval(secs => $1::bigint / 1000.0) \
             ORDER BY updated_at LIMIT 100"
        ))
        .bind::<BigInt, _>(older_than_ms.min(i64::MAX as u64) as i64)
        .load(&mut conn)
        .await
        .map_err(db_error)?;
        prompts(rows).map_err(db_error)
    }
}
