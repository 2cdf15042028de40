//! The market's state in Postgres (schema `market`): the catalogue and the rounds.

use diesel::sql_types::{Array, BigInt, Bytea, Integer, Text, Timestamptz};
use diesel_async::{AsyncConnection, AsyncPgConnection, RunQueryDsl};
use syntropism_contracts::RpcError;
use syntropism_platform::db::rpc_error as db_error;
use syntropism_platform::db::{Pool, PooledConnection};
use syntropism_platform::outbox::{self, PendingEvent};
use syntropism_platform::sql::sql;

use crate::pricing::Prices;

/// The catalogue as stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Catalogue {
    pub supply: [u64; 4],
    pub max_window_ms: u64,
    pub reserve: Prices,
    pub floor: Prices,
    pub ceiling: Prices,
    pub discovered: Prices,
    pub price_rule: String,
    pub version: u64,
}

/// A recorded round.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Round {
    pub round: u64,
    pub cleared_at: chrono::DateTime<chrono::Utc>,
    pub bids_due: u32,
    pub winners: u32,
    pub supply: [u64; 4],
    pub used: [u64; 4],
    pub utilisation_ppm: [u64; 4],
    pub paid_micros: u64,
    pub discovered: Prices,
    pub price_rule: String,
    pub request_hash: Vec<u8>,
}

#[derive(diesel::QueryableByName)]
struct CatalogueRow {
    #[diesel(sql_type = Array<BigInt>)]
    supply: Vec<i64>,
    #[diesel(sql_type = BigInt)]
    max_window_ms: i64,
    #[diesel(sql_type = Array<BigInt>)]
    reserve: Vec<i64>,
    #[diesel(sql_type = Array<BigInt>)]
    floor: Vec<i64>,
    #[diesel(sql_type = Array<BigInt>)]
    ceiling: Vec<i64>,
    #[diesel(sql_type = Array<BigInt>)]
    discovered: Vec<i64>,
    #[diesel(sql_type = Text)]
    price_rule: String,
    #[diesel(sql_type = BigInt)]
    version: i64,
}

#[derive(diesel::QueryableByName)]
struct RoundRow {
    #[diesel(sql_type = BigInt)]
    round: i64,
    #[diesel(sql_type = Timestamptz)]
    cleared_at: chrono::DateTime<chrono::Utc>,
    #[diesel(sql_type = Integer)]
    bids_due: i32,
    #[diesel(sql_type = Integer)]
    winners: i32,
    #[diesel(sql_type = Array<BigInt>)]
    supply: Vec<i64>,
    #[diesel(sql_type = Array<BigInt>)]
    used: Vec<i64>,
    #[diesel(sql_type = Array<BigInt>)]
    utilisation_ppm: Vec<i64>,
    #[diesel(sql_type = BigInt)]
    paid_micros: i64,
    #[diesel(sql_type = Array<BigInt>)]
    discovered: Vec<i64>,
    #[diesel(sql_type = Text)]
    price_rule: String,
    #[diesel(sql_type = Bytea)]
    request_hash: Vec<u8>,
}

fn vector(values: &[i64]) -> [u64; 4] {
    std::array::from_fn(|i| values.get(i).copied().unwrap_or(0).max(0) as u64)
}

fn column(values: &[u64; 4]) -> Vec<i64> {
    values
        .iter()
        .map(|v| (*v).min(i64::MAX as u64) as i64)
        .collect()
}

impl From<CatalogueRow> for Catalogue {
    fn from(row: CatalogueRow) -> Self {
        Catalogue {
            supply: vector(&row.supply),
            max_window_ms: row.max_window_ms as u64,
            reserve: Prices(vector(&row.reserve)),
            floor: Prices(vector(&row.floor)),
            ceiling: Prices(vector(&row.ceiling)),
            discovered: Prices(vector(&row.discovered)),
            price_rule: row.price_rule,
            version: row.version as u64,
        }
    }
}

impl From<RoundRow> for Round {
    fn from(row: RoundRow) -> Self {
        Round {
            round: row.round as u64,
            cleared_at: row.cleared_at,
            bids_due: row.bids_due as u32,
            winners: row.winners as u32,
            supply: vector(&row.supply),
            used: vector(&row.used),
            utilisation_ppm: vector(&row.utilisation_ppm),
            paid_micros: row.paid_micros as u64,
            discovered: Prices(vector(&row.discovered)),
            price_rule: row.price_rule,
            request_hash: row.request_hash,
        }
    }
}

const CATALOGUE_SELECT: &str = "SELECT supply, max_window_ms, reserve, floor, ceiling, discovered, \
     price_rule, version FROM catalogue WHERE id = 1";
const ROUND_SELECT: &str = "SELECT round, cleared_at, bids_due, winners, supply, used, \
     utilisation_ppm, paid_micros, discovered, price_rule, request_hash FROM rounds";

/// What a write decided: committed with these events, or refused.
#[derive(Debug)]
pub enum Decision<T> {
    Commit(T, Vec<PendingEvent>),
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

impl Store {
    pub fn new(pool: Pool) -> Self {
        Self { pool }
    }

    async fn connection(&self) -> Result<PooledConnection, RpcError> {
        syntropism_platform::db::checkout(&self.pool).await
    }

    /// Writes the configured catalogue (and `event`) unless one exists; returns the catalogue
    /// in force and whether it was just created.
    pub async fn seed(
        &self,
        seed: &Catalogue,
        event: PendingEvent,
    ) -> Result<(Catalogue, bool), RpcError> {
        let mut conn = self.connection().await?;
        let inserted = conn
            .transaction::<usize, diesel::result::Error, _>(async |conn| {
                let inserted = sql(
                    "INSERT INTO catalogue (id, supply, max_window_ms, reserve, floor, ceiling, discovered, price_rule, version) \
                     VALUES (1, $1, $2, $3, $4, $5, $3, $6, 1) ON CONFLICT (id) DO NOTHING",
                )
                .bind::<Array<BigInt>, _>(column(&seed.supply))
                .bind::<BigInt, _>(seed.max_window_ms as i64)
                .bind::<Array<BigInt>, _>(column(&seed.reserve.0))
                .bind::<Array<BigInt>, _>(column(&seed.floor.0))
                .bind::<Array<BigInt>, _>(column(&seed.ceiling.0))
                .bind::<Text, _>(seed.price_rule.clone())
                .execute(conn)
                .await?;
                if inserted == 1 {
                    outbox::enqueue(conn, std::slice::from_ref(&event)).await?;
                }
                Ok(inserted)
            })
            .await
            .map_err(db_error)?;
        let current = self.catalogue_on(&mut conn).await?;
        Ok((current, inserted == 1))
    }

    async fn catalogue_on(&self, conn: &mut AsyncPgConnection) -> Result<Catalogue, RpcError> {
        let rows: Vec<CatalogueRow> = sql(CATALOGUE_SELECT).load(conn).await.map_err(db_error)?;
        rows.into_iter()
            .next()
            .map(Catalogue::from)
            .ok_or_else(|| RpcError::unavailable("the catalogue is not seeded yet"))
    }

    pub async fn catalogue(&self) -> Result<Catalogue, RpcError> {
        let mut conn = self.connection().await?;
        self.catalogue_on(&mut conn).await
    }

    /// The most recent rounds, newest first.
    pub async fn recent_rounds(&self, limit: u32) -> Result<Vec<Round>, RpcError> {
        let mut conn = self.connection().await?;
        let rows: Vec<RoundRow> = sql(format!("{ROUND_SELECT} ORDER BY round DESC LIMIT $1"))
            .bind::<BigInt, _>(i64::from(limit))
            .load(&mut conn)
            .await
            .map_err(db_error)?;
        Ok(rows.into_iter().map(Round::from).collect())
    }

    /// Changes the catalogue: `decide` sees it locked and returns the new one (or a refusal).
    pub async fn update_catalogue(
        &self,
        decide: impl FnOnce(&Catalogue) -> Decision<Catalogue> + Send,
    ) -> Result<Catalogue, RpcError> {
        let mut conn = self.connection().await?;
        conn.transaction::<Result<Catalogue, RpcError>, diesel::result::Error, _>(async |conn| {
                let rows: Vec<CatalogueRow> = sql(format!("{CATALOGUE_SELECT} FOR UPDATE"))
                    .load(conn)
                    .await?;
                let Some(current) = rows.into_iter().next().map(Catalogue::from) else {
                    return Ok(Err(RpcError::unavailable("the catalogue is not seeded yet")));
                };
                let (next, events) = match decide(&current) {
                    Decision::Commit(next, events) => (next, events),
                    Decision::Refuse(error) => return Ok(Err(error)),
                };
                sql("UPDATE catalogue SET supply = $1, max_window_ms = $2, reserve = $3, floor = $4, \
                     ceiling = $5, discovered = $6, price_rule = $7, version = $8, updated_at = now() WHERE id = 1")
                .bind::<Array<BigInt>, _>(column(&next.supply))
                .bind::<BigInt, _>(next.max_window_ms as i64)
                .bind::<Array<BigInt>, _>(column(&next.reserve.0))
                .bind::<Array<BigInt>, _>(column(&next.floor.0))
                .bind::<Array<BigInt>, _>(column(&next.ceiling.0))
                .bind::<Array<BigInt>, _>(column(&next.discovered.0))
                .bind::<Text, _>(next.price_rule.clone())
                .bind::<BigInt, _>(next.version as i64)
                .execute(conn)
                .await?;
                outbox::enqueue(conn, &events).await?;
                Ok(Ok(next))
            })
            .await
            .map_err(db_error)?
    }

    /// Records a round once: `decide` sees the catalogue locked and the round's earlier record,
    /// if any, and returns the round to insert with the new discovered prices (or a refusal, or
    /// the earlier record as the answer to a retry).
    pub async fn record_round(
        &self,
        round: u64,
        decide: impl FnOnce(&Catalogue, Option<Round>) -> Result<RoundWrite, RpcError> + Send,
    ) -> Result<Round, RpcError> {
        let mut conn = self.connection().await?;
        conn.transaction::<Result<Round, RpcError>, diesel::result::Error, _>(async |conn| {
            let rows: Vec<CatalogueRow> = sql(format!("{CATALOGUE_SELECT} FOR UPDATE"))
                .load(conn)
                .await?;
            let Some(catalogue) = rows.into_iter().next().map(Catalogue::from) else {
                return Ok(Err(RpcError::unavailable("the catalogue is not seeded yet")));
            };
            let earlier: Vec<RoundRow> = sql(format!("{ROUND_SELECT} WHERE round = $1"))
                .bind::<BigInt, _>(round as i64)
                .load(conn)
                .await?;
            let write = match decide(&catalogue, earlier.into_iter().next().map(Round::from)) {
                Ok(write) => write,
                Err(error) => return Ok(Err(error)),
            };
            let (record, events) = match write {
                RoundWrite::Known(record) => return Ok(Ok(record)),
                RoundWrite::New(record, events) => (record, events),
            };
            sql("INSERT INTO rounds (round, cleared_at, bids_due, winners, supply, used, utilisation_ppm, \
                 paid_micros, discovered, price_rule, request_hash) \
                 VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11)")
            .bind::<BigInt, _>(record.round as i64)
            .bind::<Timestamptz, _>(record.cleared_at)
            .bind::<Integer, _>(record.bids_due.min(i32::MAX as u32) as i32)
            .bind::<Integer, _>(record.winners.min(i32::MAX as u32) as i32)
            .bind::<Array<BigInt>, _>(column(&record.supply))
            .bind::<Array<BigInt>, _>(column(&record.used))
            .bind::<Array<BigInt>, _>(column(&record.utilisation_ppm))
            .bind::<BigInt, _>(record.paid_micros.min(i64::MAX as u64) as i64)
            .bind::<Array<BigInt>, _>(column(&record.discovered.0))
            .bind::<Text, _>(record.price_rule.clone())
            .bind::<Bytea, _>(record.request_hash.clone())
            .execute(conn)
            .await?;
            sql("UPDATE catalogue SET discovered = $1 WHERE id = 1")
                .bind::<Array<BigInt>, _>(column(&record.discovered.0))
                .execute(conn)
                .await?;
            outbox::enqueue(conn, &events).await?;
            Ok(Ok(record))
        })
        .await
        .map_err(db_error)?
    }
}

/// What [`Store::record_round`] writes.
#[derive(Debug)]
pub enum RoundWrite {
    /// The round was recorded before; answer with that record.
    Known(Round),
    New(Round, Vec<PendingEvent>),
}
