//! Social's records in Postgres (schema `social`): direct messages and board posts.
//!
//! Both are written first as `paying` (invisible), and become `sent`/`posted` only once their
//! fee is burned, or `refused` with the economy's refusal.

use chrono::{DateTime, Utc};
use diesel::sql_types::{Array, BigInt, Bytea, Nullable, Text, Timestamptz};
use diesel_async::{AsyncConnection, RunQueryDsl};
use prost::Message as _;
use syntropism_contracts::{AgentId, RpcError, pb};
use syntropism_platform::db::rpc_error as db_error;
use syntropism_platform::db::{Pool, PooledConnection};
use syntropism_platform::outbox::{self, PendingEvent};
use syntropism_platform::sql::sql;

use crate::rules::Delivery;

pub use syntropism_contracts::time::timestamp;

/// Where a message or a post is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum State {
    /// Written; its fee not yet confirmed. Nobody sees it.
    Paying,
    /// Its fee is burned: delivered (a message) or on the board (a post).
    Done,
    /// The economy refused its fee; the refusal is kept for retries.
    Refused,
}

fn state_named(name: &str) -> State {
    match name {
        "sent" | "posted" => State::Done,
        "refused" => State::Refused,
        _ => State::Paying,
    }
}

fn refusal(bytes: Option<Vec<u8>>) -> Option<RpcError> {
    bytes
        .and_then(|b| pb::Error::decode(b.as_slice()).ok())
        .map(RpcError::from_proto)
}

#[derive(diesel::QueryableByName)]
struct MessageRow {
    #[diesel(sql_type = BigInt)]
    id: i64,
    #[diesel(sql_type = diesel::sql_types::Uuid)]
    from_agent_id: uuid::Uuid,
    #[diesel(sql_type = Text)]
    idempotency_id: String,
    #[diesel(sql_type = Bytea)]
    request_hash: Vec<u8>,
    #[diesel(sql_type = Text)]
    recipient: String,
    #[diesel(sql_type = Text)]
    body: String,
    #[diesel(sql_type = Text)]
    execution_id: String,
    #[diesel(sql_type = BigInt)]
    fee_micros: i64,
    #[diesel(sql_type = Text)]
    state: String,
    #[diesel(sql_type = Nullable<Bytea>)]
    refusal: Option<Vec<u8>>,
    #[diesel(sql_type = Nullable<Timestamptz>)]
    sent_at: Option<DateTime<Utc>>,
}

const MESSAGE_COLUMNS: &str = "id, from_agent_id, idempotency_id, request_hash, recipient, body, \
    execution_id, fee_micros, state, refusal, sent_at";

/// A direct message as stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredMessage {
    pub id: i64,
    pub from: AgentId,
    pub idempotency_id: String,
    pub request_hash: Vec<u8>,
    pub recipient: String,
    pub body: String,
    pub execution_id: String,
    pub fee_micros: i64,
    pub state: State,
    pub refusal: Option<RpcError>,
    pub sent_at: Option<DateTime<Utc>>,
}

impl From<MessageRow> for StoredMessage {
    fn from(row: MessageRow) -> Self {
        StoredMessage {
            id: row.id,
            from: AgentId::from_uuid(row.from_agent_id),
            idempotency_id: row.idempotency_id,
            request_hash: row.request_hash,
            recipient: row.recipient,
            body: row.body,
            execution_id: row.execution_id,
            fee_micros: row.fee_micros,
            state: state_named(&row.state),
            refusal: refusal(row.refusal),
            sent_at: row.sent_at,
        }
    }
}

impl StoredMessage {
    pub fn to_message(&self) -> pb::DirectMessage {
        pb::DirectMessage {
            id: self.id,
            from_agent_id: self.from.to_string(),
            to: self.recipient.clone(),
            body: self.body.clone(),
            sent_at: self.sent_at.map(timestamp),
            execution_id: self.execution_id.clone(),
        }
    }
}

#[derive(diesel::QueryableByName)]
struct PostRow {
    #[diesel(sql_type = BigInt)]
    id: i64,
    #[diesel(sql_type = diesel::sql_types::Uuid)]
    agent_id: uuid::Uuid,
    #[diesel(sql_type = Text)]
    idempotency_id: String,
    #[diesel(sql_type = Bytea)]
    request_hash: Vec<u8>,
    #[diesel(sql_type = Text)]
    body: String,
    #[diesel(sql_type = BigInt)]
    fee_micros: i64,
    #[diesel(sql_type = Text)]
    state: String,
    #[diesel(sql_type = Nullable<Bytea>)]
    refusal: Option<Vec<u8>>,
    #[diesel(sql_type = Nullable<Timestamptz>)]
    posted_at: Option<DateTime<Utc>>,
}

const POST_COLUMNS: &str =
    "id, agent_id, idempotency_id, request_hash, body, fee_micros, state, refusal, posted_at";

/// A board post as stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredPost {
    pub id: i64,
    pub agent: AgentId,
    pub idempotency_id: String,
    pub request_hash: Vec<u8>,
    pub body: String,
    pub fee_micros: i64,
    pub state: State,
    pub refusal: Option<RpcError>,
    pub posted_at: Option<DateTime<Utc>>,
}

impl From<PostRow> for StoredPost {
    fn from(row: PostRow) -> Self {
        StoredPost {
            id: row.id,
            agent: AgentId::from_uuid(row.agent_id),
            idempotency_id: row.idempotency_id,
            request_hash: row.request_hash,
            body: row.body,
            fee_micros: row.fee_micros,
            state: state_named(&row.state),
            refusal: refusal(row.refusal),
            posted_at: row.posted_at,
        }
    }
}

/// A record that is paid for before it counts (a message, a post): its table, its columns, and
/// the state and time column it reaches once its fee is burned.
trait Paid: From<Self::Row> + Send {
    type Row: diesel::QueryableByName<diesel::pg::Pg> + Send + 'static;
    const TABLE: &'static str;
    const COLUMNS: &'static str;
    const DONE: &'static str;
    const DONE_AT: &'static str;
}

impl Paid for StoredMessage {
    type Row = MessageRow;
    const TABLE: &'static str = "messages";
    const COLUMNS: &'static str = MESSAGE_COLUMNS;
    const DONE: &'static str = "sent";
    const DONE_AT: &'static str = "sent_at";
}

impl Paid for StoredPost {
    type Row = PostRow;
    const TABLE: &'static str = "posts";
    const COLUMNS: &'static str = POST_COLUMNS;
    const DONE: &'static str = "posted";
    const DONE_AT: &'static str = "posted_at";
}

impl StoredPost {
    pub fn to_message(&self) -> pb::BoardPost {
        pb::BoardPost {
            id: self.id,
            agent_id: self.agent.to_string(),
            body: self.body.clone(),
            posted_at: self.posted_at.map(timestamp),
        }
    }
}

/// A message about to be written (`paying`).
#[derive(Debug, Clone)]
pub struct NewMessage {
    pub from: AgentId,
    pub idempotency_id: String,
    pub request_hash: Vec<u8>,
    pub recipient: String,
    pub body: String,
    pub execution_id: String,
    pub fee_micros: i64,
}

/// A post about to be written (`paying`).
#[derive(Debug, Clone)]
pub struct NewPost {
    pub agent: AgentId,
    pub idempotency_id: String,
    pub request_hash: Vec<u8>,
    pub body: String,
    pub fee_micros: i64,
}

/// What a window will find in its inbox.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Summary {
    pub count: u32,
    pub senders: Vec<String>,
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

fn older_than(ms: u64) -> i64 {
    ms.min(i64::MAX as u64) as i64
}

impl Store {
    pub fn new(pool: Pool) -> Self {
        Self { pool }
    }

    async fn connection(&self) -> Result<PooledConnection, RpcError> {
        syntropism_platform::db::checkout(&self.pool).await
    }

    // ---- messages ----

    pub async fn message_by_key(
        &self,
        from: AgentId,
        idempotency_id: &str,
    ) -> Result<Option<StoredMessage>, RpcError> {
        let mut conn = self.connection().await?;
        let rows: Vec<MessageRow> = sql(format!(
            "SELECT {MESSAGE_COLUMNS} FROM messages WHERE from_agent_id = $1 AND idempotency_id = $2"
        ))
        .bind::<diesel::sql_types::Uuid, _>(from.as_uuid())
        .bind::<Text, _>(idempotency_id.to_owned())
        .load(&mut conn)
        .await
        .map_err(db_error)?;
        Ok(rows.into_iter().next().map(StoredMessage::from))
    }

    async fn message(&self, id: i64) -> Result<StoredMessage, RpcError> {
        let mut conn = self.connection().await?;
        let rows: Vec<MessageRow> = sql(format!(
            "SELECT {MESSAGE_COLUMNS} FROM messages WHERE id = $1"
        ))
        .bind::<BigInt, _>(id)
        .load(&mut conn)
        .await
        .map_err(db_error)?;
        rows.into_iter()
            .next()
            .map(StoredMessage::from)
            .ok_or_else(|| RpcError::internal("a message vanished"))
    }

    /// Its fee is burned: the record reaches its done state at `at`, with its event (once).
    async fn complete<P: Paid>(
        &self,
        id: i64,
        at: DateTime<Utc>,
        event: impl Fn(&P) -> PendingEvent + Send + Sync,
    ) -> Result<(), RpcError> {
        let mut conn = self.connection().await?;
        conn.transaction::<(), diesel::result::Error, _>(async |conn| {
            let rows: Vec<P::Row> = sql(format!(
                "UPDATE {} SET state = '{}', {} = $2 WHERE id = $1 AND state = 'paying' \
                 RETURNING {}",
                P::TABLE,
                P::DONE,
                P::DONE_AT,
                P::COLUMNS
            ))
            .bind::<BigInt, _>(id)
            .bind::<Timestamptz, _>(at)
            .load(conn)
            .await?;
            if let Some(done) = rows.into_iter().next().map(P::from) {
                outbox::enqueue(conn, &[event(&done)]).await?;
            }
            Ok(())
        })
        .await
        .map_err(db_error)
    }

    /// The economy refused the fee: the record is `refused`, for good.
    async fn refuse<P: Paid>(&self, id: i64, error: &RpcError) -> Result<(), RpcError> {
        let mut conn = self.connection().await?;
        sql(format!(
            "UPDATE {} SET state = 'refused', refusal = $2 WHERE id = $1 AND state = 'paying'",
            P::TABLE
        ))
        .bind::<BigInt, _>(id)
        .bind::<Bytea, _>(error.to_proto().encode_to_vec())
        .execute(&mut conn)
        .await
        .map_err(db_error)?;
        Ok(())
    }

    /// Records left `paying` for `older_than_ms` or more, oldest first.
    async fn stale<P: Paid>(&self, older_than_ms: u64) -> Result<Vec<P>, RpcError> {
        let mut conn = self.connection().await?;
        let rows: Vec<P::Row> = sql(format!(
            "SELECT {} FROM {} WHERE state = 'paying' \
             AND created_at < now() - make_interval(secs => $1::bigint / 1000.0) \
             ORDER BY created_at LIMIT 100",
            P::COLUMNS,
            P::TABLE
        ))
        .bind::<BigInt, _>(older_than(older_than_ms))
        .load(&mut conn)
        .await
        .map_err(db_error)?;
        Ok(rows.into_iter().map(P::from).collect())
    }

    /// Writes a message as `paying` (or finds the one written with its idempotency id).
    pub async fn begin_message(&self, new: &NewMessage) -> Result<StoredMessage, RpcError> {
        let mut conn = self.connection().await?;
        sql(
            "INSERT INTO messages (from_agent_id, idempotency_id, request_hash, recipient, body, \
             execution_id, fee_micros, state) VALUES ($1, $2, $3, $4, $5, $6, $7, 'paying') \
             ON CONFLICT (from_agent_id, idempotency_id) DO NOTHING",
        )
        .bind::<diesel::sql_types::Uuid, _>(new.from.as_uuid())
        .bind::<Text, _>(new.idempotency_id.clone())
        .bind::<Bytea, _>(new.request_hash.clone())
        .bind::<Text, _>(new.recipient.clone())
        .bind::<Text, _>(new.body.clone())
        .bind::<Text, _>(new.execution_id.clone())
        .bind::<BigInt, _>(new.fee_micros)
        .execute(&mut conn)
        .await
        .map_err(db_error)?;
        drop(conn);
        self.message_by_key(new.from, &new.idempotency_id)
            .await?
            .ok_or_else(|| RpcError::internal("a message vanished"))
    }

    /// Its fee is burned: the message is sent at `sent_at`, with its event (once). Returns the
    /// message as it stands.
    pub async fn complete_message(
        &self,
        id: i64,
        sent_at: DateTime<Utc>,
        event: impl Fn(&StoredMessage) -> PendingEvent + Send + Sync,
    ) -> Result<StoredMessage, RpcError> {
        self.complete::<StoredMessage>(id, sent_at, event).await?;
        self.message(id).await
    }

    /// The economy refused its fee: the message is `refused`, for good.
    pub async fn refuse_message(&self, id: i64, error: &RpcError) -> Result<(), RpcError> {
        self.refuse::<StoredMessage>(id, error).await
    }

    /// Messages left `paying` for `older_than_ms` or more.
    pub async fn stale_messages(&self, older_than_ms: u64) -> Result<Vec<StoredMessage>, RpcError> {
        self.stale(older_than_ms).await
    }

    /// Messages to `recipient` sent in `delivery`'s range, oldest first, at most `limit`.
    pub async fn inbox(
        &self,
        recipient: &str,
        delivery: Delivery,
        limit: u32,
    ) -> Result<Vec<StoredMessage>, RpcError> {
        let mut conn = self.connection().await?;
        let rows: Vec<MessageRow> = sql(format!(
            "SELECT {MESSAGE_COLUMNS} FROM messages WHERE recipient = $1 AND state = 'sent' \
             AND ($2::timestamptz IS NULL OR sent_at >= $2) AND sent_at < $3 \
             ORDER BY sent_at, id LIMIT $4"
        ))
        .bind::<Text, _>(recipient.to_owned())
        .bind::<Nullable<Timestamptz>, _>(delivery.since)
        .bind::<Timestamptz, _>(delivery.until)
        .bind::<BigInt, _>(i64::from(limit))
        .load(&mut conn)
        .await
        .map_err(db_error)?;
        Ok(rows.into_iter().map(StoredMessage::from).collect())
    }

    /// How many messages to `recipient` were sent in `delivery`'s range, and by whom (at most
    /// 100 senders named).
    pub async fn inbox_summary(
        &self,
        recipient: &str,
        delivery: Delivery,
    ) -> Result<Summary, RpcError> {
        #[derive(diesel::QueryableByName)]
        struct Row {
            #[diesel(sql_type = BigInt)]
            n: i64,
            #[diesel(sql_type = Array<Text>)]
            senders: Vec<String>,
        }
        let mut conn = self.connection().await?;
        let rows: Vec<Row> = sql(
            "WITH delivered AS (SELECT from_agent_id, sent_at FROM messages WHERE recipient = $1 \
               AND state = 'sent' AND ($2::timestamptz IS NULL OR sent_at >= $2) AND sent_at < $3) \
             SELECT (SELECT count(*) FROM delivered) AS n, \
               coalesce((SELECT array_agg(s) FROM (SELECT from_agent_id::text AS s FROM delivered \
                 GROUP BY from_agent_id ORDER BY min(sent_at) LIMIT 100) firsts), '{}') AS senders",
        )
        .bind::<Text, _>(recipient.to_owned())
        .bind::<Nullable<Timestamptz>, _>(delivery.since)
        .bind::<Timestamptz, _>(delivery.until)
        .load(&mut conn)
        .await
        .map_err(db_error)?;
        Ok(rows
            .into_iter()
            .next()
            .map(|r| Summary {
                count: r.n.clamp(0, i64::from(u32::MAX)) as u32,
                senders: r.senders,
            })
            .unwrap_or_default())
    }

    /// Messages to the human, newest first: `limit` of them with ids below `before_id` (0: from
    /// the newest).
    pub async fn human_messages(
        &self,
        before_id: i64,
        limit: u32,
    ) -> Result<Vec<StoredMessage>, RpcError> {
        let mut conn = self.connection().await?;
        let rows: Vec<MessageRow> = sql(format!(
            "SELECT {MESSAGE_COLUMNS} FROM messages WHERE recipient = 'human' AND state = 'sent' \
             AND ($1 <= 0 OR id < $1) ORDER BY id DESC LIMIT $2"
        ))
        .bind::<BigInt, _>(before_id)
        .bind::<BigInt, _>(i64::from(limit))
        .load(&mut conn)
        .await
        .map_err(db_error)?;
        Ok(rows.into_iter().map(StoredMessage::from).collect())
    }

    // ---- posts ----

    pub async fn post_by_key(
        &self,
        agent: AgentId,
        idempotency_id: &str,
    ) -> Result<Option<StoredPost>, RpcError> {
        let mut conn = self.connection().await?;
        let rows: Vec<PostRow> = sql(format!(
            "SELECT {POST_COLUMNS} FROM posts WHERE agent_id = $1 AND idempotency_id = $2"
        ))
        .bind::<diesel::sql_types::Uuid, _>(agent.as_uuid())
        .bind::<Text, _>(idempotency_id.to_owned())
        .load(&mut conn)
        .await
        .map_err(db_error)?;
        Ok(rows.into_iter().next().map(StoredPost::from))
    }

    async fn post(&self, id: i64) -> Result<StoredPost, RpcError> {
        let mut conn = self.connection().await?;
        let rows: Vec<PostRow> = sql(format!("SELECT {POST_COLUMNS} FROM posts WHERE id = $1"))
            .bind::<BigInt, _>(id)
            .load(&mut conn)
            .await
            .map_err(db_error)?;
        rows.into_iter()
            .next()
            .map(StoredPost::from)
            .ok_or_else(|| RpcError::internal("a post vanished"))
    }

    /// Writes a post as `paying` (or finds the one written with its idempotency id).
    pub async fn begin_post(&self, new: &NewPost) -> Result<StoredPost, RpcError> {
        let mut conn = self.connection().await?;
        sql("INSERT INTO posts (agent_id, idempotency_id, request_hash, body, fee_micros, state) \
             VALUES ($1, $2, $3, $4, $5, 'paying') ON CONFLICT (agent_id, idempotency_id) DO NOTHING")
        .bind::<diesel::sql_types::Uuid, _>(new.agent.as_uuid())
        .bind::<Text, _>(new.idempotency_id.clone())
        .bind::<Bytea, _>(new.request_hash.clone())
        .bind::<Text, _>(new.body.clone())
        .bind::<BigInt, _>(new.fee_micros)
        .execute(&mut conn)
        .await
        .map_err(db_error)?;
        drop(conn);
        self.post_by_key(new.agent, &new.idempotency_id)
            .await?
            .ok_or_else(|| RpcError::internal("a post vanished"))
    }

    /// Its fee is burned (or there is none): the post is on the board, with its event (once).
    pub async fn complete_post(
        &self,
        id: i64,
        posted_at: DateTime<Utc>,
        event: impl Fn(&StoredPost) -> PendingEvent + Send + Sync,
    ) -> Result<StoredPost, RpcError> {
        self.complete::<StoredPost>(id, posted_at, event).await?;
        self.post(id).await
    }

    pub async fn refuse_post(&self, id: i64, error: &RpcError) -> Result<(), RpcError> {
        self.refuse::<StoredPost>(id, error).await
    }

    pub async fn stale_posts(&self, older_than_ms: u64) -> Result<Vec<StoredPost>, RpcError> {
        self.stale(older_than_ms).await
    }

    /// The board, newest first: `limit` posts with ids below `before_id` (0: from the newest).
    pub async fn board(&self, before_id: i64, limit: u32) -> Result<Vec<StoredPost>, RpcError> {
        let mut conn = self.connection().await?;
        let rows: Vec<PostRow> = sql(format!(
            "SELECT {POST_COLUMNS} FROM posts WHERE state = 'posted' \
             AND ($1 <= 0 OR id < $1) ORDER BY id DESC LIMIT $2"
        ))
        .bind::<BigInt, _>(before_id)
        .bind::<BigInt, _>(i64::from(limit))
        .load(&mut conn)
        .await
        .map_err(db_error)?;
        Ok(rows.into_iter().map(StoredPost::from).collect())
    }
}
