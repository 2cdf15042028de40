//! The runner's records in Postgres (schema `sandbox`): runners and their heartbeats, and one
//! row per execution, claimed before its container exists.

use diesel::sql_types::{Array, BigInt, Bool, Bytea, Nullable, Text, Timestamptz};
use diesel_async::{AsyncConnection, RunQueryDsl};
use syntropism_contracts::{RpcError, events, pb, subjects::sandbox_events, subjects::services};
use syntropism_platform::db::rpc_error as db_error;
use syntropism_platform::db::{Pool, PooledConnection};
use syntropism_platform::outbox::{self, PendingEvent};
use syntropism_platform::sql::sql;

#[derive(diesel::QueryableByName)]
struct RunRow {
    #[diesel(sql_type = Text)]
    execution_id: String,
    #[diesel(sql_type = Text)]
    agent_id: String,
    #[diesel(sql_type = Text)]
    runner_id: String,
    #[diesel(sql_type = Bytea)]
    request_hash: Vec<u8>,
    #[diesel(sql_type = Array<BigInt>)]
    bundle: Vec<i64>,
    #[diesel(sql_type = Text)]
    status: String,
    #[diesel(sql_type = Nullable<Text>)]
    outcome: Option<String>,
    #[diesel(sql_type = BigInt)]
    exit_code: i64,
    #[diesel(sql_type = BigInt)]
    cpu_time_ms: i64,
    #[diesel(sql_type = BigInt)]
    peak_memory_bytes: i64,
    #[diesel(sql_type = BigInt)]
    wall_time_ms: i64,
    #[diesel(sql_type = Text)]
    log_tail: String,
    #[diesel(sql_type = Bool)]
    log_truncated: bool,
    #[diesel(sql_type = Text)]
    error: String,
    #[diesel(sql_type = Timestamptz)]
    started_at: chrono::DateTime<chrono::Utc>,
    #[diesel(sql_type = Nullable<Timestamptz>)]
    finished_at: Option<chrono::DateTime<chrono::Utc>>,
}

const RUN_COLUMNS: &str = "execution_id, agent_id::text AS agent_id, runner_id, request_hash, \
     bundle, status, outcome, exit_code, cpu_time_ms, peak_memory_bytes, wall_time_ms, log_tail, \
     log_truncated, error, started_at, finished_at";

use syntropism_contracts::time::timestamp;

pub fn outcome_name(outcome: pb::RunOutcome) -> &'static str {
    match outcome {
        pb::RunOutcome::Completed => "completed",
        pb::RunOutcome::Failed => "failed",
        pb::RunOutcome::TimedOut => "timed_out",
        pb::RunOutcome::OomKilled => "oom_killed",
        pb::RunOutcome::Lost => "lost",
        pb::RunOutcome::Unspecified => "unspecified",
    }
}

fn outcome_named(name: &str) -> pb::RunOutcome {
    match name {
        "completed" => pb::RunOutcome::Completed,
        "failed" => pb::RunOutcome::Failed,
        "timed_out" => pb::RunOutcome::TimedOut,
        "oom_killed" => pb::RunOutcome::OomKilled,
        "lost" => pb::RunOutcome::Lost,
        _ => pb::RunOutcome::Unspecified,
    }
}

/// A stored run and the hash of the request that made it.
#[derive(Debug, Clone)]
pub struct StoredRun {
    pub record: pb::RunRecord,
    pub request_hash: Vec<u8>,
}

impl From<RunRow> for StoredRun {
    fn from(row: RunRow) -> Self {
        let b = |i: usize| row.bundle.get(i).copied().unwrap_or(0).max(0) as u64;
        let mut record = pb::RunRecord {
            execution_id: row.execution_id,
            agent_id: row.agent_id,
            runner_id: row.runner_id,
            status: if row.status == "finished" {
                pb::RunStatus::Finished
            } else {
                pb::RunStatus::Running
            } as i32,
            outcome: 0,
            exit_code: row.exit_code,
            cpu_time_ms: row.cpu_time_ms.max(0) as u64,
            peak_memory_bytes: row.peak_memory_bytes.max(0) as u64,
            wall_time_ms: row.wall_time_ms.max(0) as u64,
            log_tail: row.log_tail,
            log_truncated: row.log_truncated,
            started_at: Some(timestamp(row.started_at)),
            finished_at: row.finished_at.map(timestamp),
            bundle: Some(pb::Bundle {
                cpu_millicores: b(0),
                memory_mib: b(1),
                duration_ms: b(2),
                llm_tokens: b(3),
                attention_slots: b(4),
            }),
            error: row.error,
        };
        record.set_outcome(
            row.outcome
                .as_deref()
                .map_or(pb::RunOutcome::Unspecified, outcome_named),
        );
        StoredRun {
            record,
            request_hash: row.request_hash,
        }
    }
}

fn finished_event(record: &pb::RunRecord) -> PendingEvent {
    PendingEvent {
        subject: sandbox_events::RUN_FINISHED.into(),
        envelope: events::envelope(
            services::SANDBOX,
            &pb::RunFinished {
                run: Some(record.clone()),
            },
            &record.execution_id,
            &format!("run/{}", record.execution_id),
        ),
    }
}

/// What a claim found.
#[derive(Debug)]
pub enum Claim {
    /// This runner owns the run now.
    Claimed,
    /// The execution was claimed before (by this request or another).
    Exists(Box<StoredRun>),
}

/// A run's end, as the runner saw it.
#[derive(Debug, Clone)]
pub struct Finish {
    pub outcome: pb::RunOutcome,
    pub exit_code: i64,
    pub cpu_time_ms: u64,
    pub peak_memory_bytes: u64,
    pub wall_time_ms: u64,
    pub log_tail: String,
    pub log_truncated: bool,
    pub error: String,
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

    /// Registers (or re-registers) this runner with its capacity and a fresh heartbeat.
    pub async fn register(&self, runner_id: &str, cpu: u64, memory: u64) -> Result<(), RpcError> {
        let mut conn = self.connection().await?;
        sql(
            "INSERT INTO runners (runner_id, cpu_millicores, memory_mib) VALUES ($1, $2, $3) \
             ON CONFLICT (runner_id) DO UPDATE SET cpu_millicores = EXCLUDED.cpu_millicores, \
             memory_mib = EXCLUDED.memory_mib, started_at = now(), heartbeat_at = now()",
        )
        .bind::<Text, _>(runner_id.to_owned())
        .bind::<BigInt, _>(cpu as i64)
        .bind::<BigInt, _>(memory as i64)
        .execute(&mut conn)
        .await
        .map_err(db_error)?;
        Ok(())
    }

    pub async fn heartbeat(&self, runner_id: &str) -> Result<(), RpcError> {
        let mut conn = self.connection().await?;
        sql("UPDATE runners SET heartbeat_at = now() WHERE runner_id = $1")
            .bind::<Text, _>(runner_id.to_owned())
            .execute(&mut conn)
            .await
            .map_err(db_error)?;
        Ok(())
    }

    pub async fn get(&self, execution_id: &str) -> Result<Option<StoredRun>, RpcError> {
        let mut conn = self.connection().await?;
        let rows: Vec<RunRow> = sql(format!(
            "SELECT {RUN_COLUMNS} FROM runs WHERE execution_id = $1"
        ))
        .bind::<Text, _>(execution_id.to_owned())
        .load(&mut conn)
        .await
        .map_err(db_error)?;
        Ok(rows.into_iter().next().map(StoredRun::from))
    }

    /// Claims `execution_id` for `runner_id` (with its `run_started` event), unless it was
    /// claimed before.
    pub async fn claim(
        &self,
        execution_id: &str,
        agent_id: &str,
        runner_id: &str,
        request_hash: &[u8],
        bundle: &pb::Bundle,
        started: PendingEvent,
    ) -> Result<Claim, RpcError> {
        let mut conn = self.connection().await?;
        let bundle = vec![
            bundle.cpu_millicores as i64,
            bundle.memory_mib as i64,
            bundle.duration_ms as i64,
            bundle.llm_tokens as i64,
            bundle.attention_slots as i64,
        ];
        let claimed = conn
            .transaction::<usize, diesel::result::Error, _>(async |conn| {
                let inserted = sql(
                    "INSERT INTO runs (execution_id, agent_id, runner_id, request_hash, bundle, status) \
                     VALUES ($1, $2::uuid, $3, $4, $5, 'running') ON CONFLICT (execution_id) DO NOTHING",
                )
                .bind::<Text, _>(execution_id.to_owned())
                .bind::<Text, _>(agent_id.to_owned())
                .bind::<Text, _>(runner_id.to_owned())
                .bind::<Bytea, _>(request_hash.to_vec())
                .bind::<Array<BigInt>, _>(bundle)
                .execute(conn)
                .await?;
                if inserted == 1 {
                    outbox::enqueue(conn, std::slice::from_ref(&started)).await?;
                }
                Ok(inserted)
            })
            .await
            .map_err(db_error)?;
        if claimed == 1 {
            return Ok(Claim::Claimed);
        }
        drop(conn);
        match self.get(execution_id).await? {
            Some(run) => Ok(Claim::Exists(Box::new(run))),
            None => Err(RpcError::unavailable(
                "the run vanished while being claimed",
            )),
        }
    }

    /// Records a run's end (and its `run_finished` event) if it is still running; returns the
    /// record as stored.
    pub async fn finish(
        &self,
        execution_id: &str,
        finish: &Finish,
    ) -> Result<Option<pb::RunRecord>, RpcError> {
        let mut conn = self.connection().await?;
        // Postgres text holds no NUL.
        let tail = finish.log_tail.replace('\0', "\u{FFFD}");
        let finished = conn
            .transaction::<Option<pb::RunRecord>, diesel::result::Error, _>(async |conn| {
                let rows: Vec<RunRow> = sql(format!(
                    "UPDATE runs SET status = 'finished', outcome = $2, exit_code = $3, \
                     cpu_time_ms = $4, peak_memory_bytes = $5, wall_time_ms = $6, log_tail = $7, \
                     log_truncated = $8, error = $9, finished_at = now() \
                     WHERE execution_id = $1 AND status = 'running' RETURNING {RUN_COLUMNS}"
                ))
                .bind::<Text, _>(execution_id.to_owned())
                .bind::<Text, _>(outcome_name(finish.outcome).to_owned())
                .bind::<BigInt, _>(finish.exit_code)
                .bind::<BigInt, _>(finish.cpu_time_ms.min(i64::MAX as u64) as i64)
                .bind::<BigInt, _>(finish.peak_memory_bytes.min(i64::MAX as u64) as i64)
                .bind::<BigInt, _>(finish.wall_time_ms.min(i64::MAX as u64) as i64)
                .bind::<Text, _>(tail.clone())
                .bind::<Bool, _>(finish.log_truncated)
                .bind::<Text, _>(finish.error.clone())
                .load(conn)
                .await?;
                let Some(row) = rows.into_iter().next() else {
                    return Ok(None);
                };
                let record = StoredRun::from(row).record;
                outbox::enqueue(conn, &[finished_event(&record)]).await?;
                Ok(Some(record))
            })
            .await
            .map_err(db_error)?;
        Ok(finished)
    }

    /// Marks lost every run still `running` on a runner that has not beaten for `stale_ms`, or
    /// (with `runner`) every run still `running` on that runner. Returns them.
    pub async fn mark_lost(
        &self,
        stale_ms: u64,
        runner: Option<&str>,
    ) -> Result<Vec<pb::RunRecord>, RpcError> {
        let mut conn = self.connection().await?;
        let lost = conn
            .transaction::<Vec<pb::RunRecord>, diesel::result::Error, _>(async |conn| {
                let rows: Vec<RunRow> = sql(format!(
                    "UPDATE runs SET status = 'finished', outcome = 'lost', exit_code = -1, \
                     error = 'the runner stopped while the run was in progress', finished_at = now() \
                     WHERE status = 'running' AND runner_id IN ( \
                        SELECT runner_id FROM runners WHERE \
                        CASE WHEN $1::text IS NULL \
                             THEN heartbeat_at < now() - make_interval(secs => $2::bigint / 1000.0) \
                             ELSE runner_id = $1 END) \
                     RETURNING {RUN_COLUMNS}"
                ))
                .bind::<Nullable<Text>, _>(runner.map(str::to_owned))
                .bind::<BigInt, _>(stale_ms as i64)
                .load(conn)
                .await?;
                let records: Vec<pb::RunRecord> =
                    rows.into_iter().map(|r| StoredRun::from(r).record).collect();
                let events: Vec<PendingEvent> = records.iter().map(finished_event).collect();
                outbox::enqueue(conn, &events).await?;
                Ok(records)
            })
            .await
            .map_err(db_error)?;
        Ok(lost)
    }
}
