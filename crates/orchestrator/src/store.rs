//! The orchestrator's records in Postgres (schema `orchestrator`): agents, executions, ticks,
//! the leader's lease, genesis and spawns.

use chrono::{DateTime, Utc};
use diesel::sql_types::{Array, BigInt, Bool, Bytea, Integer, Nullable, Text, Timestamptz};
use diesel_async::{AsyncConnection, RunQueryDsl};
use prost::Message as _;
use syntropism_contracts::{AgentId, RpcError, pb};
use syntropism_platform::db::rpc_error as db_error;
use syntropism_platform::db::{Pool, PooledConnection};
use syntropism_platform::outbox::{self, PendingEvent};
use syntropism_platform::sql::sql;

pub use syntropism_contracts::time::timestamp;

pub fn status_name(status: pb::AgentStatus) -> &'static str {
    match status {
        pb::AgentStatus::Alive => "alive",
        pb::AgentStatus::Dormant => "dormant",
        pb::AgentStatus::Dead => "dead",
        pb::AgentStatus::Unspecified => "spawning",
    }
}

fn status_named(name: &str) -> pb::AgentStatus {
    match name {
        "alive" => pb::AgentStatus::Alive,
        "dormant" => pb::AgentStatus::Dormant,
        "dead" => pb::AgentStatus::Dead,
        _ => pb::AgentStatus::Unspecified,
    }
}

pub fn bundle_array(b: &pb::Bundle) -> Vec<i64> {
    vec![
        b.cpu_millicores as i64,
        b.memory_mib as i64,
        b.duration_ms as i64,
        b.llm_tokens as i64,
        b.attention_slots as i64,
    ]
}

fn bundle_from(array: &[i64]) -> pb::Bundle {
    let b = |i: usize| array.get(i).copied().unwrap_or(0).max(0) as u64;
    pb::Bundle {
        cpu_millicores: b(0),
        memory_mib: b(1),
        duration_ms: b(2),
        llm_tokens: b(3),
        attention_slots: b(4),
    }
}

#[derive(diesel::QueryableByName)]
struct AgentRow {
    #[diesel(sql_type = diesel::sql_types::Uuid)]
    agent_id: uuid::Uuid,
    #[diesel(sql_type = Text)]
    status: String,
    #[diesel(sql_type = Array<diesel::sql_types::Uuid>)]
    lineage: Vec<uuid::Uuid>,
    #[diesel(sql_type = BigInt)]
    execution_count: i64,
    #[diesel(sql_type = BigInt)]
    earned_micros: i64,
    #[diesel(sql_type = BigInt)]
    spent_micros: i64,
    #[diesel(sql_type = Timestamptz)]
    created_at: DateTime<Utc>,
    #[diesel(sql_type = Nullable<Timestamptz>)]
    last_window_at: Option<DateTime<Utc>>,
    #[diesel(sql_type = Nullable<Timestamptz>)]
    died_at: Option<DateTime<Utc>>,
    #[diesel(sql_type = Text)]
    death_cause: String,
}

const AGENT_COLUMNS: &str = "agent_id, status, lineage, execution_count, earned_micros, \
    spent_micros, created_at, last_window_at, died_at, death_cause";

/// An agent as the registry keeps it; `spawning` is a child whose spawn is unfinished.
#[derive(Debug, Clone)]
pub struct StoredAgent {
    pub agent: pb::Agent,
    pub spawning: bool,
}

impl From<AgentRow> for StoredAgent {
    fn from(row: AgentRow) -> Self {
        let mut agent = pb::Agent {
            agent_id: row.agent_id.to_string(),
            status: 0,
            lineage: row.lineage.iter().map(ToString::to_string).collect(),
            execution_count: row.execution_count.max(0) as u64,
            earned_micros: row.earned_micros,
            spent_micros: row.spent_micros,
            created_at: Some(timestamp(row.created_at)),
            last_window_at: row.last_window_at.map(timestamp),
            died_at: row.died_at.map(timestamp),
            death_cause: row.death_cause,
        };
        agent.set_status(status_named(&row.status));
        StoredAgent {
            agent,
            spawning: row.status == "spawning",
        }
    }
}

#[derive(diesel::QueryableByName)]
struct ExecutionRow {
    #[diesel(sql_type = Text)]
    execution_id: String,
    #[diesel(sql_type = diesel::sql_types::Uuid)]
    agent_id: uuid::Uuid,
    #[diesel(sql_type = BigInt)]
    round: i64,
    #[diesel(sql_type = BigInt)]
    bid_id: i64,
    #[diesel(sql_type = Array<BigInt>)]
    bundle: Vec<i64>,
    #[diesel(sql_type = BigInt)]
    paid_micros: i64,
    #[diesel(sql_type = Text)]
    status: String,
    #[diesel(sql_type = Timestamptz)]
    created_at: DateTime<Utc>,
    #[diesel(sql_type = Nullable<Timestamptz>)]
    started_at: Option<DateTime<Utc>>,
    #[diesel(sql_type = Nullable<Timestamptz>)]
    deadline: Option<DateTime<Utc>>,
    #[diesel(sql_type = Nullable<Bytea>)]
    request: Option<Vec<u8>>,
    #[diesel(sql_type = Nullable<Bytea>)]
    run: Option<Vec<u8>>,
}

const EXECUTION_COLUMNS: &str = "execution_id, agent_id, round, bid_id, bundle, paid_micros, \
    status, created_at, started_at, deadline, request, run";

/// An execution with the request its runner was sent (if it was).
#[derive(Debug, Clone)]
pub struct StoredExecution {
    pub execution: pb::Execution,
    pub started_at: Option<DateTime<Utc>>,
    pub request: Option<pb::RunRequest>,
}

impl From<ExecutionRow> for StoredExecution {
    fn from(row: ExecutionRow) -> Self {
        let mut execution = pb::Execution {
            execution_id: row.execution_id,
            agent_id: row.agent_id.to_string(),
            round: row.round.max(0) as u64,
            bid_id: row.bid_id,
            bundle: Some(bundle_from(&row.bundle)),
            paid_micros: row.paid_micros,
            status: 0,
            created_at: Some(timestamp(row.created_at)),
            deadline: row.deadline.map(timestamp),
            started_at: row.started_at.map(timestamp),
            run: row
                .run
                .and_then(|bytes| pb::RunRecord::decode(bytes.as_slice()).ok()),
        };
        execution.set_status(match row.status.as_str() {
            "created" => pb::ExecutionStatus::Created,
            "running" => pb::ExecutionStatus::Running,
            _ => pb::ExecutionStatus::Finished,
        });
        StoredExecution {
            execution,
            started_at: row.started_at,
            request: row
                .request
                .and_then(|bytes| pb::RunRequest::decode(bytes.as_slice()).ok()),
        }
    }
}

#[derive(diesel::QueryableByName)]
struct TermRow {
    #[diesel(sql_type = BigInt)]
    term: i64,
}

#[derive(diesel::QueryableByName)]
struct TickRow {
    #[diesel(sql_type = BigInt)]
    tick: i64,
    #[diesel(sql_type = Bool)]
    finished: bool,
}

#[derive(diesel::QueryableByName)]
struct CountRow {
    #[diesel(sql_type = Text)]
    status: String,
    #[diesel(sql_type = BigInt)]
    n: i64,
}

#[derive(diesel::QueryableByName)]
struct GenesisRow {
    #[diesel(sql_type = diesel::sql_types::Uuid)]
    agent_id: uuid::Uuid,
    #[diesel(sql_type = Bool)]
    done: bool,
}

#[derive(Debug, diesel::QueryableByName)]
pub struct SpawnRow {
    #[diesel(sql_type = diesel::sql_types::Uuid)]
    pub parent_id: uuid::Uuid,
    #[diesel(sql_type = Text)]
    pub idempotency_id: String,
    #[diesel(sql_type = diesel::sql_types::Uuid)]
    pub child_id: uuid::Uuid,
    #[diesel(sql_type = Bytea)]
    pub request_hash: Vec<u8>,
    #[diesel(sql_type = Bytea)]
    pub request: Vec<u8>,
    #[diesel(sql_type = Text)]
    pub state: String,
    #[diesel(sql_type = Nullable<BigInt>)]
    pub first_bid_id: Option<i64>,
    #[diesel(sql_type = Nullable<Bytea>)]
    pub error: Option<Vec<u8>>,
}

const SPAWN_COLUMNS: &str =
    "parent_id, idempotency_id, child_id, request_hash, request, state, first_bid_id, error";

/// Counts of agents by status, and the last tick.
#[derive(Debug, Clone, Copy, Default)]
pub struct Census {
    pub alive: u32,
    pub dormant: u32,
    pub dead: u32,
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

impl Store {
    pub fn new(pool: Pool) -> Self {
        Self { pool }
    }

    async fn connection(&self) -> Result<PooledConnection, RpcError> {
        syntropism_platform::db::checkout(&self.pool).await
    }

    // ---- The leader's lease ----

    /// Takes or renews the lease for `me`; returns the term while `me` leads.
    pub async fn lease(&self, me: &str, lease_ms: u64) -> Result<Option<i64>, RpcError> {
        let mut conn = self.connection().await?;
        let rows: Vec<TermRow> = sql(
            "INSERT INTO leader (id, holder, term, expires_at) \
             VALUES (1, $1, 1, now() + make_interval(secs => $2::bigint / 1000.0)) \
             ON CONFLICT (id) DO UPDATE SET \
               term = CASE WHEN leader.holder = EXCLUDED.holder THEN leader.term ELSE leader.term + 1 END, \
               holder = EXCLUDED.holder, expires_at = EXCLUDED.expires_at \
             WHERE leader.holder = EXCLUDED.holder OR leader.expires_at < now() \
             RETURNING term",
        )
        .bind::<Text, _>(me.to_owned())
        .bind::<BigInt, _>(lease_ms as i64)
        .load(&mut conn)
        .await
        .map_err(db_error)?;
        Ok(rows.into_iter().next().map(|r| r.term))
    }

    /// Gives the lease up (a clean shutdown), so another replica takes over at once.
    pub async fn resign(&self, me: &str) -> Result<(), RpcError> {
        let mut conn = self.connection().await?;
        sql("UPDATE leader SET expires_at = now() - interval '1 second' WHERE holder = $1")
            .bind::<Text, _>(me.to_owned())
            .execute(&mut conn)
            .await
            .map_err(db_error)?;
        Ok(())
    }

    pub async fn leader(&self) -> Result<String, RpcError> {
        #[derive(diesel::QueryableByName)]
        struct Row {
            #[diesel(sql_type = Text)]
            holder: String,
        }
        let mut conn = self.connection().await?;
        let rows: Vec<Row> = sql("SELECT holder FROM leader WHERE expires_at > now()")
            .load(&mut conn)
            .await
            .map_err(db_error)?;
        Ok(rows
            .into_iter()
            .next()
            .map(|r| r.holder)
            .unwrap_or_default())
    }

    // ---- Ticks ----

    /// The last tick begun, and whether it finished.
    pub async fn last_tick(&self) -> Result<Option<(u64, bool)>, RpcError> {
        let mut conn = self.connection().await?;
        let rows: Vec<TickRow> = sql(
            "SELECT tick, finished_at IS NOT NULL AS finished FROM ticks ORDER BY tick DESC LIMIT 1",
        )
        .load(&mut conn)
        .await
        .map_err(db_error)?;
        Ok(rows.into_iter().next().map(|r| (r.tick as u64, r.finished)))
    }

    /// The last finished tick and its length.
    pub async fn last_finished_tick(&self) -> Result<Option<(u64, u64)>, RpcError> {
        #[derive(diesel::QueryableByName)]
        struct Row {
            #[diesel(sql_type = BigInt)]
            tick: i64,
            #[diesel(sql_type = BigInt)]
            duration_ms: i64,
        }
        let mut conn = self.connection().await?;
        let rows: Vec<Row> = sql(
            "SELECT tick, coalesce(duration_ms, 0) AS duration_ms FROM ticks \
             WHERE finished_at IS NOT NULL ORDER BY tick DESC LIMIT 1",
        )
        .load(&mut conn)
        .await
        .map_err(db_error)?;
        Ok(rows
            .into_iter()
            .next()
            .map(|r| (r.tick as u64, r.duration_ms.max(0) as u64)))
    }

    /// Begins tick `tick` under lease term `term` (refused when the term is no longer current:
    /// another replica leads).
    pub async fn begin_tick(&self, tick: u64, me: &str, term: i64) -> Result<bool, RpcError> {
        let mut conn = self.connection().await?;
        let n = sql(
            "INSERT INTO ticks (tick, leader) SELECT $1, $2 WHERE EXISTS \
             (SELECT 1 FROM leader WHERE holder = $2 AND term = $3 AND expires_at > now()) \
             ON CONFLICT (tick) DO UPDATE SET leader = EXCLUDED.leader WHERE ticks.finished_at IS NULL",
        )
        .bind::<BigInt, _>(tick as i64)
        .bind::<Text, _>(me.to_owned())
        .bind::<BigInt, _>(term)
        .execute(&mut conn)
        .await
        .map_err(db_error)?;
        Ok(n == 1)
    }

    pub async fn finish_tick(
        &self,
        tick: u64,
        allocations: u32,
        duration_ms: u64,
        overran: bool,
        event: PendingEvent,
    ) -> Result<(), RpcError> {
        let mut conn = self.connection().await?;
        conn.transaction::<(), diesel::result::Error, _>(async |conn| {
            let n = sql(
                "UPDATE ticks SET finished_at = now(), allocations = $2, duration_ms = $3, \
                 overran = $4 WHERE tick = $1 AND finished_at IS NULL",
            )
            .bind::<BigInt, _>(tick as i64)
            .bind::<Integer, _>(allocations as i32)
            .bind::<BigInt, _>(duration_ms as i64)
            .bind::<Bool, _>(overran)
            .execute(conn)
            .await?;
            if n == 1 {
                outbox::enqueue(conn, std::slice::from_ref(&event)).await?;
            }
            Ok(())
        })
        .await
        .map_err(db_error)
    }

    // ---- Genesis ----

    /// The genesis agent's id (`candidate` the first time) and whether genesis is done.
    pub async fn genesis(&self, candidate: AgentId) -> Result<(AgentId, bool), RpcError> {
        let mut conn = self.connection().await?;
        sql("INSERT INTO genesis (id, agent_id) VALUES (1, $1) ON CONFLICT (id) DO NOTHING")
            .bind::<diesel::sql_types::Uuid, _>(candidate.as_uuid())
            .execute(&mut conn)
            .await
            .map_err(db_error)?;
        let rows: Vec<GenesisRow> = sql("SELECT agent_id, done FROM genesis WHERE id = 1")
            .load(&mut conn)
            .await
            .map_err(db_error)?;
        let row = rows
            .into_iter()
            .next()
            .ok_or_else(|| RpcError::internal("genesis row vanished"))?;
        Ok((AgentId::from_uuid(row.agent_id), row.done))
    }

    pub async fn genesis_done(&self) -> Result<(), RpcError> {
        let mut conn = self.connection().await?;
        sql("UPDATE genesis SET done = true WHERE id = 1")
            .execute(&mut conn)
            .await
            .map_err(db_error)?;
        Ok(())
    }

    // ---- Agents ----

    /// Registers an agent (no-op when it exists), with its `agent_born` event when `status` is
    /// a living one.
    pub async fn insert_agent(
        &self,
        agent: AgentId,
        status: &str,
        lineage: &[AgentId],
        earned_micros: i64,
        event: Option<PendingEvent>,
    ) -> Result<bool, RpcError> {
        let mut conn = self.connection().await?;
        let lineage: Vec<uuid::Uuid> = lineage.iter().map(AgentId::as_uuid).collect();
        conn.transaction::<bool, diesel::result::Error, _>(async |conn| {
            let n = sql(
                "INSERT INTO agents (agent_id, status, lineage, earned_micros) VALUES ($1, $2, $3, $4) \
                 ON CONFLICT (agent_id) DO NOTHING",
            )
            .bind::<diesel::sql_types::Uuid, _>(agent.as_uuid())
            .bind::<Text, _>(status.to_owned())
            .bind::<Array<diesel::sql_types::Uuid>, _>(lineage)
            .bind::<BigInt, _>(earned_micros)
            .execute(conn)
            .await?;
            if n == 1
                && let Some(event) = &event
            {
                outbox::enqueue(conn, std::slice::from_ref(event)).await?;
            }
            Ok(n == 1)
        })
        .await
        .map_err(db_error)
    }

    /// A spawning child becomes alive (with its `agent_born` event), once.
    pub async fn birth(
        &self,
        agent: AgentId,
        earned_micros: i64,
        event: PendingEvent,
    ) -> Result<(), RpcError> {
        let mut conn = self.connection().await?;
        conn.transaction::<(), diesel::result::Error, _>(async |conn| {
            let n = sql("UPDATE agents SET status = 'alive', earned_micros = $2 \
                 WHERE agent_id = $1 AND status = 'spawning'")
            .bind::<diesel::sql_types::Uuid, _>(agent.as_uuid())
            .bind::<BigInt, _>(earned_micros)
            .execute(conn)
            .await?;
            if n == 1 {
                outbox::enqueue(conn, std::slice::from_ref(&event)).await?;
            }
            Ok(())
        })
        .await
        .map_err(db_error)
    }

    /// Forgets a child whose spawn failed before any credit moved.
    pub async fn forget_spawning(&self, agent: AgentId) -> Result<(), RpcError> {
        let mut conn = self.connection().await?;
        sql("DELETE FROM agents WHERE agent_id = $1 AND status = 'spawning'")
            .bind::<diesel::sql_types::Uuid, _>(agent.as_uuid())
            .execute(&mut conn)
            .await
            .map_err(db_error)?;
        Ok(())
    }

    pub async fn agent(&self, agent: AgentId) -> Result<Option<StoredAgent>, RpcError> {
        let mut conn = self.connection().await?;
        let rows: Vec<AgentRow> = sql(format!(
            "SELECT {AGENT_COLUMNS} FROM agents WHERE agent_id = $1"
        ))
        .bind::<diesel::sql_types::Uuid, _>(agent.as_uuid())
        .load(&mut conn)
        .await
        .map_err(db_error)?;
        Ok(rows.into_iter().next().map(StoredAgent::from))
    }

    /// Agents in `statuses` (registry names), oldest first.
    pub async fn agents(&self, statuses: &[&str]) -> Result<Vec<pb::Agent>, RpcError> {
        let mut conn = self.connection().await?;
        let statuses: Vec<String> = statuses.iter().map(|s| (*s).to_owned()).collect();
        let rows: Vec<AgentRow> = sql(format!(
            "SELECT {AGENT_COLUMNS} FROM agents WHERE status = ANY($1) ORDER BY created_at, agent_id"
        ))
        .bind::<Array<Text>, _>(statuses)
        .load(&mut conn)
        .await
        .map_err(db_error)?;
        Ok(rows
            .into_iter()
            .map(|r| StoredAgent::from(r).agent)
            .collect())
    }

    pub async fn census(&self) -> Result<Census, RpcError> {
        let mut conn = self.connection().await?;
        let rows: Vec<CountRow> = sql("SELECT status, count(*) AS n FROM agents GROUP BY status")
            .load(&mut conn)
            .await
            .map_err(db_error)?;
        let mut census = Census::default();
        for row in rows {
            match row.status.as_str() {
                "alive" => census.alive = row.n as u32,
                "dormant" => census.dormant = row.n as u32,
                "dead" => census.dead = row.n as u32,
                _ => {}
            }
        }
        Ok(census)
    }

    /// Moves an agent from `from` to `to` (with its event); false if it was not in `from`.
    pub async fn set_status(
        &self,
        agent: AgentId,
        from: pb::AgentStatus,
        to: pb::AgentStatus,
        cause: &str,
        event: PendingEvent,
    ) -> Result<bool, RpcError> {
        let mut conn = self.connection().await?;
        conn.transaction::<bool, diesel::result::Error, _>(async |conn| {
            let n = sql("UPDATE agents SET status = $3, \
                   died_at = CASE WHEN $3 = 'dead' THEN now() ELSE NULL END, \
                   death_cause = CASE WHEN $3 = 'dead' THEN $4 ELSE '' END \
                 WHERE agent_id = $1 AND status = $2")
            .bind::<diesel::sql_types::Uuid, _>(agent.as_uuid())
            .bind::<Text, _>(status_name(from).to_owned())
            .bind::<Text, _>(status_name(to).to_owned())
            .bind::<Text, _>(cause.to_owned())
            .execute(conn)
            .await?;
            if n == 1 {
                outbox::enqueue(conn, std::slice::from_ref(&event)).await?;
            }
            Ok(n == 1)
        })
        .await
        .map_err(db_error)
    }

    /// Adds `amount` to an agent's earnings once per `source` (e.g. a rewarded prompt).
    pub async fn record_earning(
        &self,
        source: &str,
        agent: AgentId,
        amount: i64,
    ) -> Result<(), RpcError> {
        let mut conn = self.connection().await?;
        conn.transaction::<(), diesel::result::Error, _>(async |conn| {
            let n = sql(
                "INSERT INTO earnings (source, agent_id, amount) VALUES ($1, $2, $3) \
                 ON CONFLICT (source) DO NOTHING",
            )
            .bind::<Text, _>(source.to_owned())
            .bind::<diesel::sql_types::Uuid, _>(agent.as_uuid())
            .bind::<BigInt, _>(amount)
            .execute(conn)
            .await?;
            if n == 1 {
                sql("UPDATE agents SET earned_micros = earned_micros + $2 WHERE agent_id = $1")
                    .bind::<diesel::sql_types::Uuid, _>(agent.as_uuid())
                    .bind::<BigInt, _>(amount)
                    .execute(conn)
                    .await?;
            }
            Ok(())
        })
        .await
        .map_err(db_error)
    }

    // ---- Executions ----

    /// Creates the executions of a round's allocations, each with a new id (those that exist
    /// already, from an earlier attempt of the round, are kept with theirs), charging each
    /// payer's record with what it paid.
    pub async fn create_executions(
        &self,
        round: u64,
        allocations: &[pb::Allocation],
    ) -> Result<(), RpcError> {
        let mut conn = self.connection().await?;
        conn.transaction::<(), diesel::result::Error, _>(async |conn| {
            for a in allocations {
                let Ok(agent) = uuid::Uuid::parse_str(&a.agent_id) else {
                    continue;
                };
                let bundle = a.bundle.unwrap_or_default();
                let n = sql(
                    "INSERT INTO executions (execution_id, agent_id, round, bid_id, bundle, paid_micros, status) \
                     SELECT $1, $2, $3, $4, $5, $6, 'created' WHERE EXISTS \
                       (SELECT 1 FROM agents WHERE agent_id = $2 AND status IN ('alive', 'dormant')) \
                     ON CONFLICT DO NOTHING",
                )
                .bind::<Text, _>(uuid::Uuid::now_v7().to_string())
                .bind::<diesel::sql_types::Uuid, _>(agent)
                .bind::<BigInt, _>(round as i64)
                .bind::<BigInt, _>(a.bid_id)
                .bind::<Array<BigInt>, _>(bundle_array(&bundle))
                .bind::<BigInt, _>(a.paid_micros)
                .execute(conn)
                .await?;
                if n == 1 {
                    sql(
                        "UPDATE agents SET execution_count = execution_count + 1, \
                         last_window_at = now(), status = 'alive' WHERE agent_id = $1",
                    )
                    .bind::<diesel::sql_types::Uuid, _>(agent)
                    .execute(conn)
                    .await?;
                    if let Ok(payer) = uuid::Uuid::parse_str(&a.payer_id) {
                        sql("UPDATE agents SET spent_micros = spent_micros + $2 WHERE agent_id = $1")
                            .bind::<diesel::sql_types::Uuid, _>(payer)
                            .bind::<BigInt, _>(a.paid_micros)
                            .execute(conn)
                            .await?;
                    }
                }
            }
            Ok(())
        })
        .await
        .map_err(db_error)
    }

    /// Records the request sent to a runner (the first one stands) and opens the window.
    /// Returns the request that stands.
    pub async fn dispatch(
        &self,
        execution: &str,
        request: &pb::RunRequest,
        deadline: DateTime<Utc>,
        event: PendingEvent,
    ) -> Result<pb::RunRequest, RpcError> {
        let mut conn = self.connection().await?;
        let bytes = request.encode_to_vec();
        let stored = conn
            .transaction::<Option<Vec<u8>>, diesel::result::Error, _>(async |conn| {
                let n = sql(
                    "UPDATE executions SET status = 'running', request = $2, started_at = now(), \
                     deadline = $3 WHERE execution_id = $1 AND status = 'created'",
                )
                .bind::<Text, _>(execution.to_owned())
                .bind::<Bytea, _>(bytes)
                .bind::<Timestamptz, _>(deadline)
                .execute(conn)
                .await?;
                if n == 1 {
                    outbox::enqueue(conn, std::slice::from_ref(&event)).await?;
                }
                #[derive(diesel::QueryableByName)]
                struct Row {
                    #[diesel(sql_type = Nullable<Bytea>)]
                    request: Option<Vec<u8>>,
                }
                let rows: Vec<Row> = sql("SELECT request FROM executions WHERE execution_id = $1")
                    .bind::<Text, _>(execution.to_owned())
                    .load(conn)
                    .await?;
                Ok(rows.into_iter().next().and_then(|r| r.request))
            })
            .await
            .map_err(db_error)?;
        stored
            .and_then(|bytes| pb::RunRequest::decode(bytes.as_slice()).ok())
            .ok_or_else(|| RpcError::internal(format!("execution {execution} has no request")))
    }

    /// Replaces a window's request (and deadline) with `new` if it is still `old`; returns the
    /// request that stands.
    pub async fn renew_request(
        &self,
        execution: &str,
        old: &pb::RunRequest,
        new: &pb::RunRequest,
        deadline: DateTime<Utc>,
    ) -> Result<pb::RunRequest, RpcError> {
        #[derive(diesel::QueryableByName)]
        struct Row {
            #[diesel(sql_type = Nullable<Bytea>)]
            request: Option<Vec<u8>>,
        }
        let mut conn = self.connection().await?;
        sql(
            "UPDATE executions SET request = $3, deadline = $4, started_at = now() \
             WHERE execution_id = $1 AND status = 'running' AND request = $2",
        )
        .bind::<Text, _>(execution.to_owned())
        .bind::<Bytea, _>(old.encode_to_vec())
        .bind::<Bytea, _>(new.encode_to_vec())
        .bind::<Timestamptz, _>(deadline)
        .execute(&mut conn)
        .await
        .map_err(db_error)?;
        let rows: Vec<Row> = sql("SELECT request FROM executions WHERE execution_id = $1")
            .bind::<Text, _>(execution.to_owned())
            .load(&mut conn)
            .await
            .map_err(db_error)?;
        rows.into_iter()
            .next()
            .and_then(|r| r.request)
            .and_then(|bytes| pb::RunRequest::decode(bytes.as_slice()).ok())
            .ok_or_else(|| RpcError::internal(format!("execution {execution} has no request")))
    }

    /// Records a window's end (once), with its event. Returns whether this call recorded it.
    pub async fn finish_execution(
        &self,
        execution: &str,
        run: &pb::RunRecord,
        event: impl FnOnce(pb::Execution) -> PendingEvent,
    ) -> Result<bool, RpcError> {
        let mut conn = self.connection().await?;
        let bytes = run.encode_to_vec();
        let rows: Vec<ExecutionRow> = conn
            .transaction::<Vec<ExecutionRow>, diesel::result::Error, _>(async |conn| {
                sql(format!(
                    "UPDATE executions SET status = 'finished', run = $2, finished_at = now() \
                     WHERE execution_id = $1 AND status <> 'finished' RETURNING {EXECUTION_COLUMNS}"
                ))
                .bind::<Text, _>(execution.to_owned())
                .bind::<Bytea, _>(bytes)
                .load(conn)
                .await
            })
            .await
            .map_err(db_error)?;
        let Some(row) = rows.into_iter().next() else {
            return Ok(false);
        };
        let finished = StoredExecution::from(row).execution;
        let mut conn = self.connection().await?;
        outbox::enqueue(&mut conn, &[event(finished)])
            .await
            .map_err(db_error)?;
        Ok(true)
    }

    /// Executions not finished yet (created or running), oldest first.
    pub async fn open_executions(&self) -> Result<Vec<StoredExecution>, RpcError> {
        let mut conn = self.connection().await?;
        let rows: Vec<ExecutionRow> = sql(format!(
            "SELECT {EXECUTION_COLUMNS} FROM executions WHERE status <> 'finished' ORDER BY created_at"
        ))
        .load(&mut conn)
        .await
        .map_err(db_error)?;
        Ok(rows.into_iter().map(StoredExecution::from).collect())
    }

    /// An agent's executions not finished yet.
    pub async fn executions_of_open(
        &self,
        agent: AgentId,
    ) -> Result<Vec<StoredExecution>, RpcError> {
        let mut conn = self.connection().await?;
        let rows: Vec<ExecutionRow> = sql(format!(
            "SELECT {EXECUTION_COLUMNS} FROM executions WHERE agent_id = $1 AND status <> 'finished' \
             ORDER BY created_at"
        ))
        .bind::<diesel::sql_types::Uuid, _>(agent.as_uuid())
        .load(&mut conn)
        .await
        .map_err(db_error)?;
        Ok(rows.into_iter().map(StoredExecution::from).collect())
    }

    /// The agent's open window (running, deadline not passed) and the start of the window
    /// before it.
    pub async fn window(
        &self,
        agent: AgentId,
    ) -> Result<(Option<pb::Execution>, Option<DateTime<Utc>>), RpcError> {
        let mut conn = self.connection().await?;
        let rows: Vec<ExecutionRow> = sql(format!(
            "SELECT {EXECUTION_COLUMNS} FROM executions WHERE agent_id = $1 \
             AND started_at IS NOT NULL ORDER BY started_at DESC LIMIT 2"
        ))
        .bind::<diesel::sql_types::Uuid, _>(agent.as_uuid())
        .load(&mut conn)
        .await
        .map_err(db_error)?;
        let mut rows = rows.into_iter().map(StoredExecution::from);
        let now = Utc::now();
        match rows.next() {
            Some(latest)
                if latest.execution.status() == pb::ExecutionStatus::Running
                    && latest.execution.deadline.as_ref().is_some_and(|d| {
                        (d.seconds, d.nanos)
                            > (now.timestamp(), now.timestamp_subsec_nanos() as i32)
                    }) =>
            {
                Ok((
                    Some(latest.execution),
                    rows.next().and_then(|p| p.started_at),
                ))
            }
            Some(latest) => Ok((None, latest.started_at)),
            None => Ok((None, None)),
        }
    }

    /// An agent's latest executions, newest first.
    pub async fn executions_of(
        &self,
        agent: AgentId,
        limit: u32,
    ) -> Result<Vec<StoredExecution>, RpcError> {
        let mut conn = self.connection().await?;
        let rows: Vec<ExecutionRow> = sql(format!(
            "SELECT {EXECUTION_COLUMNS} FROM executions WHERE agent_id = $1 \
             ORDER BY created_at DESC, execution_id DESC LIMIT $2"
        ))
        .bind::<diesel::sql_types::Uuid, _>(agent.as_uuid())
        .bind::<BigInt, _>(i64::from(limit))
        .load(&mut conn)
        .await
        .map_err(db_error)?;
        Ok(rows.into_iter().map(StoredExecution::from).collect())
    }

    pub async fn execution_count(&self) -> Result<u64, RpcError> {
        #[derive(diesel::QueryableByName)]
        struct Row {
            #[diesel(sql_type = BigInt)]
            n: i64,
        }
        let mut conn = self.connection().await?;
        let rows: Vec<Row> = sql("SELECT count(*) AS n FROM executions")
            .load(&mut conn)
            .await
            .map_err(db_error)?;
        Ok(rows.into_iter().next().map_or(0, |r| r.n.max(0) as u64))
    }

    // ---- Spawns ----

    pub async fn spawn(
        &self,
        parent: AgentId,
        idempotency_id: &str,
    ) -> Result<Option<SpawnRow>, RpcError> {
        let mut conn = self.connection().await?;
        let rows: Vec<SpawnRow> = sql(format!(
            "SELECT {SPAWN_COLUMNS} FROM spawns WHERE parent_id = $1 AND idempotency_id = $2"
        ))
        .bind::<diesel::sql_types::Uuid, _>(parent.as_uuid())
        .bind::<Text, _>(idempotency_id.to_owned())
        .load(&mut conn)
        .await
        .map_err(db_error)?;
        Ok(rows.into_iter().next())
    }

    /// Records a new spawn and its child (status `spawning`), unless the key exists.
    pub async fn begin_spawn(
        &self,
        parent: AgentId,
        idempotency_id: &str,
        child: AgentId,
        lineage: &[AgentId],
        request_hash: &[u8],
        request: &pb::SpawnRequest,
    ) -> Result<SpawnRow, RpcError> {
        let mut conn = self.connection().await?;
        let lineage: Vec<uuid::Uuid> = lineage.iter().map(AgentId::as_uuid).collect();
        conn.transaction::<(), diesel::result::Error, _>(async |conn| {
            let n = sql(
                "INSERT INTO spawns (parent_id, idempotency_id, child_id, request_hash, request, state) \
                 VALUES ($1, $2, $3, $4, $5, 'started') ON CONFLICT DO NOTHING",
            )
            .bind::<diesel::sql_types::Uuid, _>(parent.as_uuid())
            .bind::<Text, _>(idempotency_id.to_owned())
            .bind::<diesel::sql_types::Uuid, _>(child.as_uuid())
            .bind::<Bytea, _>(request_hash.to_vec())
            .bind::<Bytea, _>(request.encode_to_vec())
            .execute(conn)
            .await?;
            if n == 1 {
                sql("INSERT INTO agents (agent_id, status, lineage) VALUES ($1, 'spawning', $2)")
                    .bind::<diesel::sql_types::Uuid, _>(child.as_uuid())
                    .bind::<Array<diesel::sql_types::Uuid>, _>(lineage)
                    .execute(conn)
                    .await?;
            }
            Ok(())
        })
        .await
        .map_err(db_error)?;
        self.spawn(parent, idempotency_id)
            .await?
            .ok_or_else(|| RpcError::internal("spawn row vanished"))
    }

    pub async fn spawn_state(
        &self,
        parent: AgentId,
        idempotency_id: &str,
        state: &str,
        first_bid_id: Option<i64>,
        error: Option<&RpcError>,
    ) -> Result<(), RpcError> {
        let mut conn = self.connection().await?;
        sql(
            "UPDATE spawns SET state = $3, first_bid_id = coalesce($4, first_bid_id), error = $5 \
             WHERE parent_id = $1 AND idempotency_id = $2",
        )
        .bind::<diesel::sql_types::Uuid, _>(parent.as_uuid())
        .bind::<Text, _>(idempotency_id.to_owned())
        .bind::<Text, _>(state.to_owned())
        .bind::<Nullable<BigInt>, _>(first_bid_id)
        .bind::<Nullable<Bytea>, _>(error.map(|e| e.to_proto().encode_to_vec()))
        .execute(&mut conn)
        .await
        .map_err(db_error)?;
        Ok(())
    }

    /// A spawn's money moved: it is `paid`, and its parent's record charged (once).
    pub async fn mark_spawn_paid(
        &self,
        parent: AgentId,
        idempotency_id: &str,
        cost_micros: i64,
    ) -> Result<(), RpcError> {
        let mut conn = self.connection().await?;
        conn.transaction::<(), diesel::result::Error, _>(async |conn| {
            let n = sql("UPDATE spawns SET state = 'paid' \
                 WHERE parent_id = $1 AND idempotency_id = $2 AND state = 'started'")
            .bind::<diesel::sql_types::Uuid, _>(parent.as_uuid())
            .bind::<Text, _>(idempotency_id.to_owned())
            .execute(conn)
            .await?;
            if n == 1 {
                sql("UPDATE agents SET spent_micros = spent_micros + $2 WHERE agent_id = $1")
                    .bind::<diesel::sql_types::Uuid, _>(parent.as_uuid())
                    .bind::<BigInt, _>(cost_micros)
                    .execute(conn)
                    .await?;
            }
            Ok(())
        })
        .await
        .map_err(db_error)
    }

    /// Spawns left unfinished (their parent's request died with a replica).
    pub async fn unfinished_spawns(&self, older_than_ms: u64) -> Result<Vec<SpawnRow>, RpcError> {
        let mut conn = self.connection().await?;
        let rows: Vec<SpawnRow> = sql(format!(
            "SELECT {SPAWN_COLUMNS} FROM spawns WHERE state IN ('started', 'paid') \
             AND created_at < now() - make_interval(secs => $1::bigint / 1000.0) ORDER BY created_at"
        ))
        .bind::<BigInt, _>(older_than_ms as i64)
        .load(&mut conn)
        .await
        .map_err(db_error)?;
        Ok(rows)
    }
}
