//! The ledger in Postgres (schema `economy`).
//!
//! A mutation runs in one transaction: insert accounts being opened → read the holds it names →
//! lock every account row it touches in (id, shard) order, then its holds in id order (the same
//! order in every transaction, so concurrent replicas never deadlock) → let [`Ledger::apply`]
//! decide → write the rows set-based (one statement per kind of row, whatever the batch size) →
//! enqueue events → record the outcome under the idempotency id. The database's triggers and
//! constraints re-check the invariants on every write.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use chrono::{DateTime, Utc};
use diesel::sql_types::{Array, BigInt, Bool, Bytea, Nullable, SmallInt, Text, Timestamptz};
use diesel_async::{AsyncConnection, AsyncPgConnection, RunQueryDsl};
use prost::Message as _;
use rand::Rng;
use syntropism_contracts::events::envelope;
use syntropism_contracts::subjects::{economy_events, services};
use syntropism_contracts::{AgentId, Credits, HoldId, IdempotencyId, RpcError, pb};
use syntropism_platform::db::Pool;
use syntropism_platform::outbox::{self, PendingEvent};
use syntropism_platform::sql::sql;
use tokio::sync::Notify;
use uuid::Uuid;

use crate::errors::{db_error, op_error};
use crate::ledger::{
    AccountRef, AccountState, BURN_ID, HoldState, HoldStatus, Ledger, MINT_ID, MintReason, Op,
    OpError, Outcome, Payee, Plan, TransferKind,
};

/// A mutation as the store receives it: who asks (the idempotency scope), under which id, the
/// fingerprint of the request body, and the operations.
#[derive(Debug, Clone)]
pub struct Mutation {
    /// `internal` for services, `agent:<id>` for an agent: one caller cannot see or collide
    /// with another's idempotency ids.
    pub scope: String,
    pub key: IdempotencyId,
    pub request_hash: Vec<u8>,
    pub ops: Vec<Op>,
    pub correlation_id: String,
}

/// The ledger store. Cheap to clone.
#[derive(Clone)]
pub struct Store {
    pool: Pool,
    shards: i16,
    outbox: Arc<Notify>,
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Store")
            .field("shards", &self.shards)
            .finish_non_exhaustive()
    }
}

enum TxError {
    Ledger(OpError),
    /// Another request with the same idempotency id committed first.
    Duplicate,
    Db(diesel::result::Error),
}

impl From<diesel::result::Error> for TxError {
    fn from(error: diesel::result::Error) -> Self {
        TxError::Db(error)
    }
}

#[derive(diesel::QueryableByName)]
struct StoredOutcome {
    #[diesel(sql_type = Bytea)]
    request_hash: Vec<u8>,
    #[diesel(sql_type = Bool)]
    is_error: bool,
    #[diesel(sql_type = Bytea)]
    outcome: Vec<u8>,
}

#[derive(diesel::QueryableByName, Debug)]
struct AccountRow {
    #[diesel(sql_type = BigInt)]
    id: i64,
    #[diesel(sql_type = Nullable<diesel::sql_types::Uuid>)]
    agent_id: Option<Uuid>,
    #[diesel(sql_type = Text)]
    status: String,
    #[diesel(sql_type = BigInt)]
    balance: i64,
    #[diesel(sql_type = BigInt)]
    pending: i64,
    #[diesel(sql_type = Timestamptz)]
    opened_at: DateTime<Utc>,
    #[diesel(sql_type = Nullable<Timestamptz>)]
    closed_at: Option<DateTime<Utc>>,
    #[diesel(sql_type = Timestamptz)]
    now: DateTime<Utc>,
}

#[derive(diesel::QueryableByName)]
struct HoldRow {
    #[diesel(sql_type = BigInt)]
    id: i64,
    #[diesel(sql_type = diesel::sql_types::Uuid)]
    debit_agent: Uuid,
    #[diesel(sql_type = Nullable<diesel::sql_types::Uuid>)]
    credit_agent: Option<Uuid>,
    #[diesel(sql_type = BigInt)]
    amount: i64,
    #[diesel(sql_type = Text)]
    status: String,
    #[diesel(sql_type = Nullable<BigInt>)]
    posted_amount: Option<i64>,
    #[diesel(sql_type = Text)]
    memo: String,
    #[diesel(sql_type = Timestamptz)]
    created_at: DateTime<Utc>,
    #[diesel(sql_type = Nullable<Timestamptz>)]
    resolved_at: Option<DateTime<Utc>>,
}

#[derive(diesel::QueryableByName)]
struct HoldLock {
    #[diesel(sql_type = BigInt)]
    id: i64,
    #[diesel(sql_type = Text)]
    status: String,
}

/// The transaction's timestamp and the ids given to new rows, in operation order.
struct Allocation {
    now: DateTime<Utc>,
    transfer_ids: Vec<i64>,
    hold_ids: Vec<i64>,
}

#[derive(diesel::QueryableByName)]
struct NewId {
    #[diesel(sql_type = BigInt)]
    id: i64,
}

#[derive(diesel::QueryableByName)]
struct TransferRow {
    #[diesel(sql_type = BigInt)]
    id: i64,
    #[diesel(sql_type = BigInt)]
    debit_id: i64,
    #[diesel(sql_type = Nullable<diesel::sql_types::Uuid>)]
    debit_agent: Option<Uuid>,
    #[diesel(sql_type = BigInt)]
    credit_id: i64,
    #[diesel(sql_type = Nullable<diesel::sql_types::Uuid>)]
    credit_agent: Option<Uuid>,
    #[diesel(sql_type = BigInt)]
    amount: i64,
    #[diesel(sql_type = Text)]
    kind: String,
    #[diesel(sql_type = Nullable<Text>)]
    mint_reason: Option<String>,
    #[diesel(sql_type = Text)]
    memo: String,
    #[diesel(sql_type = Nullable<BigInt>)]
    hold_id: Option<i64>,
    #[diesel(sql_type = Timestamptz)]
    created_at: DateTime<Utc>,
}

#[derive(diesel::QueryableByName)]
struct AuditRow {
    #[diesel(sql_type = Text)]
    sum: String,
    #[diesel(sql_type = Text)]
    minted: String,
    #[diesel(sql_type = Text)]
    burned: String,
    #[diesel(sql_type = Text)]
    agents: String,
    #[diesel(sql_type = Text)]
    pending: String,
    #[diesel(sql_type = BigInt)]
    open_accounts: i64,
    #[diesel(sql_type = BigInt)]
    closed_accounts: i64,
    #[diesel(sql_type = BigInt)]
    negative_available: i64,
    #[diesel(sql_type = BigInt)]
    closed_not_empty: i64,
    #[diesel(sql_type = BigInt)]
    balance_mismatches: i64,
    #[diesel(sql_type = BigInt)]
    pending_mismatches: i64,
    #[diesel(sql_type = BigInt)]
    transfer_count: i64,
    #[diesel(sql_type = BigInt)]
    pending_holds: i64,
}

/// Most items in one event, so that every event fits a NATS message.
const MAX_EVENT_ITEMS: usize = 1_000;

const TRANSFER_COLUMNS: &str = "t.id, t.debit_id, d.agent_id AS debit_agent, t.credit_id, \
     c.agent_id AS credit_agent, t.amount, t.kind::text AS kind, t.mint_reason::text AS mint_reason, \
     t.memo, t.hold_id, t.created_at \
     FROM transfers t \
     JOIN accounts d ON d.id = t.debit_id AND d.shard = t.debit_shard \
     JOIN accounts c ON c.id = t.credit_id AND c.shard = t.credit_shard";

impl Store {
    pub fn new(pool: Pool, shards: i16, outbox: Arc<Notify>) -> Self {
        Self {
            pool,
            shards: shards.max(1),
            outbox,
        }
    }

    async fn connection(&self) -> Result<syntropism_platform::db::PooledConnection, RpcError> {
        self.pool
            .get()
            .await
            .map_err(|e| RpcError::unavailable(format!("database unavailable: {e}")))
    }

    /// Applies a mutation exactly once per idempotency id.
    ///
    /// There is no look-up before the work: the idempotency record is inserted last, in the same
    /// transaction, so a retry of an applied request either collides there (and replays the
    /// stored outcome) or is refused by the rules and then finds the stored outcome. Retries are
    /// rare; the look-up would cost every request a round trip.
    pub async fn mutate(&self, mutation: &Mutation) -> Result<pb::BatchResponse, RpcError> {
        let mut conn = self.connection().await?;
        let mut attempt = 0;
        loop {
            attempt += 1;
            let result = conn
                .transaction::<pb::BatchResponse, TxError, _>(async |conn| {
                    self.apply_in_transaction(conn, mutation).await
                })
                .await;
            return match result {
                Ok(response) => {
                    self.outbox.notify_one();
                    Ok(response)
                }
                Err(TxError::Duplicate) => match lookup(&mut conn, mutation).await? {
                    Some(stored) => replay(stored, mutation),
                    None => Err(RpcError::internal("idempotency record vanished")),
                },
                Err(TxError::Ledger(error)) => {
                    let error = op_error(&error, mutation.ops.len());
                    record_error(&mut conn, mutation, &error).await
                }
                Err(TxError::Db(error)) if attempt < 3 && is_transient(&error) => {
                    tracing::debug!(%error, attempt, "retrying a transient database failure");
                    continue;
                }
                Err(TxError::Db(error)) => Err(db_error(error)),
            };
        }
    }

    async fn apply_in_transaction(
        &self,
        conn: &mut AsyncPgConnection,
        mutation: &Mutation,
    ) -> Result<pb::BatchResponse, TxError> {
        let ops = &mutation.ops;
        // 1. Rows for accounts being opened; invisible to the rules until their Open is reached.
        let opening: Vec<Uuid> = unique(ops.iter().filter_map(|op| match op {
            Op::Open { agent } => Some(agent.as_uuid()),
            _ => None,
        }));
        let reserved: HashSet<Uuid> = if opening.is_empty() {
            HashSet::new()
        } else {
            #[derive(diesel::QueryableByName)]
            struct Inserted {
                #[diesel(sql_type = diesel::sql_types::Uuid)]
                agent_id: Uuid,
            }
            let rows: Vec<Inserted> = sql("INSERT INTO accounts (id, kind, agent_id) \
                 SELECT nextval('agent_account_ids'), 'agent', a FROM unnest($1::uuid[]) AS a \
                 ON CONFLICT (agent_id) WHERE agent_id IS NOT NULL DO NOTHING RETURNING agent_id")
            .bind::<Array<diesel::sql_types::Uuid>, _>(opening)
            .load(conn)
            .await?;
            rows.into_iter().map(|r| r.agent_id).collect()
        };

        // 2. The holds named by posts and voids (their accounts never change, so no lock yet).
        let hold_ids: Vec<i64> = unique(ops.iter().filter_map(|op| op.hold().map(HoldId::get)));
        let hold_rows: Vec<HoldRow> = if hold_ids.is_empty() {
            Vec::new()
        } else {
            sql(format!("{HOLD_SELECT} WHERE h.id = ANY($1)"))
                .bind::<Array<BigInt>, _>(hold_ids.clone())
                .load(conn)
                .await?
        };

        // 3. Lock every account row involved, in (id, shard) order.
        let mut agents: Vec<Uuid> = ops
            .iter()
            .flat_map(Op::agents)
            .map(|a| a.as_uuid())
            .collect();
        agents.extend(
            hold_rows
                .iter()
                .flat_map(|h| std::iter::once(h.debit_agent).chain(h.credit_agent)),
        );
        let agents = unique(agents.into_iter());
        let (mint_shard, burn_shard) = {
            let mut rng = rand::rng();
            let uses_burn = ops.iter().any(|op| op.touches(AccountRef::Burn))
                || hold_rows.iter().any(|h| h.credit_agent.is_none());
            let mint = if ops.iter().any(|op| op.touches(AccountRef::Mint)) {
                rng.random_range(0..self.shards)
            } else {
                -1
            };
            let burn = if uses_burn {
                rng.random_range(0..self.shards)
            } else {
                -1
            };
            (mint, burn)
        };
        let locked: Vec<AccountRow> = sql(
            "SELECT id, agent_id, status::text AS status, balance, pending, opened_at, closed_at, now() AS now \
             FROM accounts \
             WHERE agent_id = ANY($1) OR (id = 1 AND shard = $2) OR (id = 2 AND shard = $3) \
             ORDER BY id, shard FOR UPDATE",
        )
        .bind::<Array<diesel::sql_types::Uuid>, _>(agents)
        .bind::<SmallInt, _>(mint_shard)
        .bind::<SmallInt, _>(burn_shard)
        .load(conn)
        .await?;

        // 4. Lock the holds, in id order, and take their current status.
        let mut hold_status: HashMap<i64, String> = HashMap::new();
        if !hold_ids.is_empty() {
            let locks: Vec<HoldLock> = sql(
                "SELECT id, status::text AS status FROM holds WHERE id = ANY($1) ORDER BY id FOR UPDATE",
            )
            .bind::<Array<BigInt>, _>(hold_ids)
            .load(conn)
            .await?;
            hold_status = locks.into_iter().map(|l| (l.id, l.status)).collect();
        }

        // 5. Decide.
        let mut ledger = Ledger::default();
        let mut rows_by_agent: HashMap<AgentId, &AccountRow> = HashMap::new();
        for row in &locked {
            match (row.id, row.agent_id) {
                (MINT_ID, _) => ledger.mint_balance = row.balance,
                (BURN_ID, _) => ledger.burn_balance = row.balance,
                (_, Some(uuid)) => {
                    let agent = AgentId::from_uuid(uuid);
                    rows_by_agent.insert(agent, row);
                    ledger.accounts.insert(
                        agent,
                        AccountState {
                            id: row.id,
                            agent,
                            open: row.status == "open",
                            balance: row.balance,
                            pending: row.pending,
                            visible: !reserved.contains(&uuid),
                        },
                    );
                }
                _ => {}
            }
        }
        for row in &hold_rows {
            let status = hold_status
                .get(&row.id)
                .map(String::as_str)
                .unwrap_or(&row.status);
            let id = HoldId::parse(row.id).map_err(|_| diesel::result::Error::NotFound)?;
            ledger.holds.insert(
                id,
                HoldState {
                    id,
                    from: AgentId::from_uuid(row.debit_agent),
                    to: row
                        .credit_agent
                        .map(|a| Payee::Agent(AgentId::from_uuid(a)))
                        .unwrap_or(Payee::Burn),
                    amount: Credits::from_micros(row.amount),
                    status: parse_hold_status(status),
                },
            );
        }
        let plan = ledger.apply(ops).map_err(TxError::Ledger)?;
        let now = match locked.as_slice().first() {
            Some(row) => row.now,
            None => {
                #[derive(diesel::QueryableByName)]
                struct Now {
                    #[diesel(sql_type = Timestamptz)]
                    now: DateTime<Utc>,
                }
                sql("SELECT now() AS now")
                    .get_result::<Now>(conn)
                    .await?
                    .now
            }
        };
        let request_key = format!("{}/{}", mutation.scope, mutation.key);
        let account_id = |account: AccountRef| -> (i64, i16) {
            match account {
                AccountRef::Mint => (MINT_ID, mint_shard),
                AccountRef::Burn => (BURN_ID, burn_shard),
                AccountRef::Agent(agent) => (ledger.accounts[&agent].id, 0),
            }
        };

        // 6. Write: releases first, then transfers, then new holds, then closures, so no
        // intermediate state breaks a constraint that the final state satisfies. Inserts take
        // their ids from the sequences and return them in operation order.
        if !plan.resolutions.is_empty() {
            let ids: Vec<i64> = plan.resolutions.iter().map(|r| r.hold.get()).collect();
            let statuses: Vec<&'static str> = plan
                .resolutions
                .iter()
                .map(|r| hold_status_name(r.status))
                .collect();
            let posted: Vec<Option<i64>> = plan
                .resolutions
                .iter()
                .map(|r| r.posted.map(Credits::micros))
                .collect();
            sql(
                "UPDATE holds h SET status = r.status::hold_status, posted_amount = r.posted, resolved_at = now() \
                 FROM unnest($1::bigint[], $2::text[], $3::bigint[]) AS r(id, status, posted) WHERE h.id = r.id",
            )
            .bind::<Array<BigInt>, _>(ids)
            .bind::<Array<Text>, _>(statuses)
            .bind::<Array<Nullable<BigInt>>, _>(posted)
            .execute(conn)
            .await?;
        }
        let mut transfer_ids = Vec::new();
        if !plan.transfers.is_empty() {
            let n = plan.transfers.len();
            let (mut debit_ids, mut debit_shards, mut credit_ids, mut credit_shards) = (
                Vec::with_capacity(n),
                Vec::with_capacity(n),
                Vec::with_capacity(n),
                Vec::with_capacity(n),
            );
            for transfer in &plan.transfers {
                let (debit, debit_shard) = account_id(transfer.debit);
                let (credit, credit_shard) = account_id(transfer.credit);
                debit_ids.push(debit);
                debit_shards.push(debit_shard);
                credit_ids.push(credit);
                credit_shards.push(credit_shard);
            }
            let rows: Vec<NewId> = sql(
                "WITH new AS MATERIALIZED ( \
                   SELECT nextval('transfer_ids') AS id, x.* \
                   FROM unnest($1::bigint[], $2::smallint[], $3::bigint[], $4::smallint[], $5::bigint[], \
                     $6::text[], $7::text[], $8::text[], $9::bigint[]) WITH ORDINALITY \
                     AS x(d, ds, c, cs, amount, kind, reason, memo, hold, ord)), \
                 written AS ( \
                   INSERT INTO transfers (id, debit_id, debit_shard, credit_id, credit_shard, amount, kind, \
                     mint_reason, memo, hold_id, request_key, created_at) \
                   SELECT id, d, ds, c, cs, amount, kind::transfer_kind, reason::mint_reason, memo, hold, $10, now() \
                   FROM new) \
                 SELECT id FROM new ORDER BY ord",
            )
            .bind::<Array<BigInt>, _>(debit_ids)
            .bind::<Array<SmallInt>, _>(debit_shards)
            .bind::<Array<BigInt>, _>(credit_ids)
            .bind::<Array<SmallInt>, _>(credit_shards)
            .bind::<Array<BigInt>, _>(plan.transfers.iter().map(|t| t.amount.micros()).collect::<Vec<_>>())
            .bind::<Array<Text>, _>(plan.transfers.iter().map(|t| transfer_kind_name(t.kind)).collect::<Vec<_>>())
            .bind::<Array<Nullable<Text>>, _>(
                plan.transfers.iter().map(|t| t.mint_reason.map(mint_reason_name)).collect::<Vec<_>>(),
            )
            .bind::<Array<Text>, _>(plan.transfers.iter().map(|t| t.memo.clone()).collect::<Vec<_>>())
            .bind::<Array<Nullable<BigInt>>, _>(plan.transfers.iter().map(|t| t.hold.map(HoldId::get)).collect::<Vec<_>>())
            .bind::<Text, _>(request_key.clone())
            .load(conn)
            .await?;
            transfer_ids = rows.into_iter().map(|r| r.id).collect();
        }
        let mut hold_ids = Vec::new();
        if !plan.holds.is_empty() {
            let burn_shards: Vec<i16> = {
                let mut rng = rand::rng();
                plan.holds
                    .iter()
                    .map(|_| rng.random_range(0..self.shards))
                    .collect()
            };
            let (mut debit_ids, mut credit_ids, mut credit_shards) = (vec![], vec![], vec![]);
            for (hold, burn_shard) in plan.holds.iter().zip(burn_shards) {
                debit_ids.push(ledger.accounts[&hold.from].id);
                let (credit, shard) = match hold.to {
                    Payee::Agent(agent) => (ledger.accounts[&agent].id, 0),
                    Payee::Burn => (BURN_ID, burn_shard),
                };
                credit_ids.push(credit);
                credit_shards.push(shard);
            }
            let rows: Vec<NewId> = sql(
                "WITH new AS MATERIALIZED ( \
                   SELECT nextval('hold_ids') AS id, x.* \
                   FROM unnest($1::bigint[], $2::bigint[], $3::smallint[], $4::bigint[], $5::text[]) WITH ORDINALITY \
                     AS x(d, c, cs, amount, memo, ord)), \
                 written AS ( \
                   INSERT INTO holds (id, debit_id, credit_id, credit_shard, amount, memo, request_key, created_at) \
                   SELECT id, d, c, cs, amount, memo, $6, now() FROM new) \
                 SELECT id FROM new ORDER BY ord",
            )
            .bind::<Array<BigInt>, _>(debit_ids)
            .bind::<Array<BigInt>, _>(credit_ids)
            .bind::<Array<SmallInt>, _>(credit_shards)
            .bind::<Array<BigInt>, _>(plan.holds.iter().map(|h| h.amount.micros()).collect::<Vec<_>>())
            .bind::<Array<Text>, _>(plan.holds.iter().map(|h| h.memo.clone()).collect::<Vec<_>>())
            .bind::<Text, _>(request_key)
            .load(conn)
            .await?;
            hold_ids = rows.into_iter().map(|r| r.id).collect();
        }
        if !plan.closed.is_empty() {
            let closed: Vec<Uuid> = plan.closed.iter().map(|a| a.as_uuid()).collect();
            sql("UPDATE accounts SET status = 'closed', closed_at = now() WHERE shard = 0 AND agent_id = ANY($1)")
                .bind::<Array<diesel::sql_types::Uuid>, _>(closed)
                .execute(conn)
                .await?;
        }

        // 7. The response, the events, and the idempotency record, the last two pipelined.
        let allocation = Allocation {
            now,
            transfer_ids,
            hold_ids,
        };
        let view = ResponseView {
            plan: &plan,
            ledger: &ledger,
            rows: &rows_by_agent,
            holds: &hold_rows,
            allocation: &allocation,
        };
        let response = view.response();
        let events = view.events(&mutation.correlation_id, mutation.key.as_str());
        let record = sql(
            "INSERT INTO idempotency (scope, key, request_hash, is_error, outcome) \
             VALUES ($1, $2, $3, false, $4) ON CONFLICT DO NOTHING",
        )
        .bind::<Text, _>(mutation.scope.clone())
        .bind::<Text, _>(mutation.key.as_str().to_owned())
        .bind::<Bytea, _>(mutation.request_hash.clone())
        .bind::<Bytea, _>(response.encode_to_vec());
        let shared: &AsyncPgConnection = conn;
        let (recorded, _) = futures::try_join!(
            record.execute(&mut &*shared),
            outbox::insert(&events).execute(&mut &*shared),
        )?;
        if recorded == 0 {
            return Err(TxError::Duplicate);
        }
        Ok(response)
    }

    /// An account's balance; system accounts sum their shards.
    pub async fn balance(&self, account: AccountRef) -> Result<pb::Account, RpcError> {
        let mut conn = self.connection().await?;
        let rows: Vec<AccountRow> = match account {
            AccountRef::Agent(agent) => sql(
                "SELECT id, agent_id, status::text AS status, balance, pending, opened_at, closed_at, now() AS now \
                 FROM accounts WHERE agent_id = $1",
            )
            .bind::<diesel::sql_types::Uuid, _>(agent.as_uuid())
            .load(&mut conn)
            .await,
            AccountRef::Mint | AccountRef::Burn => sql(
                "SELECT id, NULL::uuid AS agent_id, 'open' AS status, \
                   sum(balance)::bigint AS balance, sum(pending)::bigint AS pending, \
                   min(opened_at) AS opened_at, NULL::timestamptz AS closed_at, now() AS now \
                 FROM accounts WHERE id = $1 GROUP BY id",
            )
            .bind::<BigInt, _>(if account == AccountRef::Mint { MINT_ID } else { BURN_ID })
            .load(&mut conn)
            .await,
        }
        .map_err(db_error)?;
        let row = rows.as_slice().first().ok_or_else(|| {
            RpcError::not_found(format!("no account {account:?}")).with_reason("account_not_found")
        })?;
        Ok(account_from_row(account, row))
    }

    /// An account's transfers, newest first; `before` is the page cursor (exclusive).
    pub async fn history(
        &self,
        account: AccountRef,
        before: Option<i64>,
        limit: u32,
    ) -> Result<pb::HistoryResponse, RpcError> {
        let mut conn = self.connection().await?;
        let account_id = match account {
            AccountRef::Mint => MINT_ID,
            AccountRef::Burn => BURN_ID,
            AccountRef::Agent(agent) => {
                #[derive(diesel::QueryableByName)]
                struct Id {
                    #[diesel(sql_type = BigInt)]
                    id: i64,
                }
                let ids: Vec<Id> = sql("SELECT id FROM accounts WHERE agent_id = $1")
                    .bind::<diesel::sql_types::Uuid, _>(agent.as_uuid())
                    .load(&mut conn)
                    .await
                    .map_err(db_error)?;
                ids.as_slice()
                    .first()
                    .ok_or_else(|| {
                        RpcError::not_found(format!("no account for agent {agent}"))
                            .with_reason("account_not_found")
                    })?
                    .id
            }
        };
        let rows: Vec<TransferRow> = sql(format!(
            "SELECT {TRANSFER_COLUMNS} WHERE (t.debit_id = $1 OR t.credit_id = $1) AND t.id < $2 \
             ORDER BY t.id DESC LIMIT $3"
        ))
        .bind::<BigInt, _>(account_id)
        .bind::<BigInt, _>(before.unwrap_or(i64::MAX))
        .bind::<BigInt, _>(i64::from(limit) + 1)
        .load(&mut conn)
        .await
        .map_err(db_error)?;
        let more = rows.len() > limit as usize;
        let transfers: Vec<pb::Transfer> = rows
            .iter()
            .take(limit as usize)
            .map(transfer_from_row)
            .collect();
        let next_before_id = if more {
            transfers.last().map(|t| t.id).unwrap_or(0)
        } else {
            0
        };
        Ok(pb::HistoryResponse {
            transfers,
            next_before_id,
        })
    }

    /// Totals and a check of every invariant, from the rows themselves.
    pub async fn audit(&self) -> Result<pb::AuditResponse, RpcError> {
        let mut conn = self.connection().await?;
        let row: AuditRow = sql(
            "WITH legs AS ( \
               SELECT debit_id AS id, debit_shard AS shard, -sum(amount::numeric) AS total FROM transfers GROUP BY 1, 2 \
               UNION ALL SELECT credit_id, credit_shard, sum(amount::numeric) FROM transfers GROUP BY 1, 2 \
             ), derived AS (SELECT id, shard, sum(total) AS total FROM legs GROUP BY 1, 2), \
             held AS (SELECT debit_id AS id, sum(amount::numeric) AS total FROM holds WHERE status = 'pending' GROUP BY 1) \
             SELECT \
               coalesce(sum(a.balance::numeric), 0)::text AS sum, \
               (-coalesce(sum(a.balance::numeric) FILTER (WHERE a.kind = 'mint'), 0))::text AS minted, \
               coalesce(sum(a.balance::numeric) FILTER (WHERE a.kind = 'burn'), 0)::text AS burned, \
               coalesce(sum(a.balance::numeric) FILTER (WHERE a.kind = 'agent'), 0)::text AS agents, \
               coalesce(sum(a.pending::numeric), 0)::text AS pending, \
               count(*) FILTER (WHERE a.kind = 'agent' AND a.status = 'open') AS open_accounts, \
               count(*) FILTER (WHERE a.kind = 'agent' AND a.status = 'closed') AS closed_accounts, \
               count(*) FILTER (WHERE a.kind = 'agent' AND a.balance - a.pending < 0) AS negative_available, \
               count(*) FILTER (WHERE a.status = 'closed' AND (a.balance <> 0 OR a.pending <> 0)) AS closed_not_empty, \
               count(*) FILTER (WHERE a.balance::numeric <> coalesce(d.total, 0)) AS balance_mismatches, \
               count(*) FILTER (WHERE a.shard = 0 AND a.pending::numeric <> coalesce(h.total, 0)) AS pending_mismatches, \
               (SELECT count(*) FROM transfers) AS transfer_count, \
               (SELECT count(*) FROM holds WHERE status = 'pending') AS pending_holds \
             FROM accounts a \
             LEFT JOIN derived d ON d.id = a.id AND d.shard = a.shard \
             LEFT JOIN held h ON h.id = a.id AND a.shard = 0",
        )
        .get_result(&mut conn)
        .await
        .map_err(db_error)?;
        let big = |text: &str| text.parse::<i128>().unwrap_or(i128::MAX);
        let fit = |value: i128| {
            i64::try_from(value).unwrap_or(if value < 0 { i64::MIN } else { i64::MAX })
        };
        let mut violations = Vec::new();
        let sum = big(&row.sum);
        if sum != 0 {
            violations.push(format!("the sum of all accounts is {sum} µcr, not 0"));
        }
        for (count, what) in [
            (
                row.negative_available,
                "agent accounts have a negative available balance",
            ),
            (
                row.closed_not_empty,
                "closed accounts still hold credits or holds",
            ),
            (
                row.balance_mismatches,
                "account balances differ from the sum of their transfers",
            ),
            (
                row.pending_mismatches,
                "pending amounts differ from the sum of pending holds",
            ),
        ] {
            if count > 0 {
                violations.push(format!("{count} {what}"));
            }
        }
        Ok(pb::AuditResponse {
            ok: violations.is_empty(),
            violations,
            sum_micros: fit(sum),
            minted_micros: fit(big(&row.minted)),
            burned_micros: fit(big(&row.burned)),
            agents_micros: fit(big(&row.agents)),
            pending_micros: fit(big(&row.pending)),
            transfer_count: row.transfer_count,
            open_accounts: row.open_accounts,
            closed_accounts: row.closed_accounts,
            pending_holds: row.pending_holds,
        })
    }
}

const HOLD_SELECT: &str = "SELECT h.id, d.agent_id AS debit_agent, c.agent_id AS credit_agent, h.amount, \
       h.status::text AS status, h.posted_amount, h.memo, h.created_at, h.resolved_at \
     FROM holds h \
     JOIN accounts d ON d.id = h.debit_id AND d.shard = h.debit_shard \
     JOIN accounts c ON c.id = h.credit_id AND c.shard = h.credit_shard";

fn unique<T: std::hash::Hash + Eq + Copy>(items: impl Iterator<Item = T>) -> Vec<T> {
    let mut seen = HashSet::new();
    items.filter(|item| seen.insert(*item)).collect()
}

fn is_transient(error: &diesel::result::Error) -> bool {
    match error {
        diesel::result::Error::DatabaseError(kind, info) => {
            matches!(
                kind,
                diesel::result::DatabaseErrorKind::SerializationFailure
            ) || info.message().contains("deadlock detected")
        }
        _ => false,
    }
}

async fn lookup(
    conn: &mut AsyncPgConnection,
    mutation: &Mutation,
) -> Result<Option<StoredOutcome>, RpcError> {
    let rows: Vec<StoredOutcome> = sql(
        "SELECT request_hash, is_error, outcome FROM idempotency WHERE scope = $1 AND key = $2",
    )
    .bind::<Text, _>(mutation.scope.clone())
    .bind::<Text, _>(mutation.key.as_str().to_owned())
    .load(conn)
    .await
    .map_err(db_error)?;
    Ok(rows.into_iter().next())
}

fn replay(stored: StoredOutcome, mutation: &Mutation) -> Result<pb::BatchResponse, RpcError> {
    if stored.request_hash != mutation.request_hash {
        return Err(RpcError::conflict(format!(
            "idempotency id {:?} was already used for a different request",
            mutation.key.as_str()
        ))
        .with_reason("idempotency_mismatch"));
    }
    if stored.is_error {
        let error = pb::Error::decode(stored.outcome.as_slice())
            .map_err(|e| RpcError::internal(format!("stored outcome unreadable: {e}")))?;
        return Err(RpcError::from_proto(error));
    }
    pb::BatchResponse::decode(stored.outcome.as_slice())
        .map_err(|e| RpcError::internal(format!("stored outcome unreadable: {e}")))
}

/// A refused mutation is an outcome too: a retry with the same id gets the same refusal.
async fn record_error(
    conn: &mut AsyncPgConnection,
    mutation: &Mutation,
    error: &RpcError,
) -> Result<pb::BatchResponse, RpcError> {
    let recorded = sql(
        "INSERT INTO idempotency (scope, key, request_hash, is_error, outcome) \
         VALUES ($1, $2, $3, true, $4) ON CONFLICT DO NOTHING",
    )
    .bind::<Text, _>(mutation.scope.clone())
    .bind::<Text, _>(mutation.key.as_str().to_owned())
    .bind::<Bytea, _>(mutation.request_hash.clone())
    .bind::<Bytea, _>(error.to_proto().encode_to_vec())
    .execute(conn)
    .await
    .map_err(db_error)?;
    if recorded == 0
        && let Some(stored) = lookup(conn, mutation).await?
    {
        return replay(stored, mutation);
    }
    Err(error.clone())
}

// ---- Conversions to the wire ----------------------------------------------------------------

fn timestamp(time: DateTime<Utc>) -> prost_types::Timestamp {
    prost_types::Timestamp {
        seconds: time.timestamp(),
        nanos: time.timestamp_subsec_nanos() as i32,
    }
}

pub(crate) fn account_ref_pb(account: AccountRef) -> pb::AccountRef {
    use pb::account_ref::Account;
    pb::AccountRef {
        account: Some(match account {
            AccountRef::Agent(agent) => Account::AgentId(agent.to_string()),
            AccountRef::Mint => Account::System(pb::SystemAccount::Mint as i32),
            AccountRef::Burn => Account::System(pb::SystemAccount::Burn as i32),
        }),
    }
}

fn account_ref_of(id: i64, agent: Option<Uuid>) -> AccountRef {
    match (id, agent) {
        (MINT_ID, _) => AccountRef::Mint,
        (_, Some(agent)) => AccountRef::Agent(AgentId::from_uuid(agent)),
        _ => AccountRef::Burn,
    }
}

fn account_pb(
    account: AccountRef,
    open: bool,
    balance: i64,
    pending: i64,
    opened_at: Option<DateTime<Utc>>,
    closed_at: Option<DateTime<Utc>>,
) -> pb::Account {
    pb::Account {
        account: Some(account_ref_pb(account)),
        status: if open {
            pb::AccountStatus::Open
        } else {
            pb::AccountStatus::Closed
        } as i32,
        balance_micros: balance,
        pending_micros: pending,
        available_micros: balance - pending,
        opened_at: opened_at.map(timestamp),
        closed_at: closed_at.map(timestamp),
    }
}

fn account_from_row(account: AccountRef, row: &AccountRow) -> pb::Account {
    account_pb(
        account,
        row.status == "open",
        row.balance,
        row.pending,
        Some(row.opened_at),
        row.closed_at,
    )
}

fn transfer_from_row(row: &TransferRow) -> pb::Transfer {
    pb::Transfer {
        id: row.id,
        debit: Some(account_ref_pb(account_ref_of(
            row.debit_id,
            row.debit_agent,
        ))),
        credit: Some(account_ref_pb(account_ref_of(
            row.credit_id,
            row.credit_agent,
        ))),
        amount_micros: row.amount,
        kind: match row.kind.as_str() {
            "transfer" => pb::TransferKind::Transfer,
            "mint" => pb::TransferKind::Mint,
            "hold_post" => pb::TransferKind::HoldPost,
            _ => pb::TransferKind::CloseBurn,
        } as i32,
        mint_reason: match row.mint_reason.as_deref() {
            Some("reward") => pb::MintReason::Reward,
            Some("genesis_grant") => pb::MintReason::GenesisGrant,
            _ => pb::MintReason::Unspecified,
        } as i32,
        memo: row.memo.clone(),
        hold_id: row.hold_id.unwrap_or(0),
        created_at: Some(timestamp(row.created_at)),
    }
}

fn parse_hold_status(status: &str) -> HoldStatus {
    match status {
        "posted" => HoldStatus::Posted,
        "voided" => HoldStatus::Voided,
        _ => HoldStatus::Pending,
    }
}

fn hold_status_name(status: HoldStatus) -> &'static str {
    match status {
        HoldStatus::Pending => "pending",
        HoldStatus::Posted => "posted",
        HoldStatus::Voided => "voided",
    }
}

fn hold_status_pb(status: HoldStatus) -> i32 {
    let status = match status {
        HoldStatus::Pending => pb::HoldStatus::Pending,
        HoldStatus::Posted => pb::HoldStatus::Posted,
        HoldStatus::Voided => pb::HoldStatus::Voided,
    };
    status as i32
}

fn transfer_kind_name(kind: TransferKind) -> &'static str {
    match kind {
        TransferKind::Transfer => "transfer",
        TransferKind::Mint => "mint",
        TransferKind::HoldPost => "hold_post",
        TransferKind::CloseBurn => "close_burn",
    }
}

fn mint_reason_name(reason: MintReason) -> &'static str {
    match reason {
        MintReason::Reward => "reward",
        MintReason::GenesisGrant => "genesis_grant",
    }
}

/// Builds the reply and the events of an applied plan.
struct ResponseView<'a> {
    plan: &'a Plan,
    ledger: &'a Ledger,
    rows: &'a HashMap<AgentId, &'a AccountRow>,
    holds: &'a [HoldRow],
    allocation: &'a Allocation,
}

impl ResponseView<'_> {
    fn account(&self, agent: AgentId) -> pb::Account {
        let state = &self.ledger.accounts[&agent];
        let row = self.rows.get(&agent);
        let now = self.allocation.now;
        let opened_at = row.map(|r| r.opened_at).unwrap_or(now);
        let closed_at = if state.open {
            None
        } else {
            Some(row.and_then(|r| r.closed_at).unwrap_or(now))
        };
        account_pb(
            AccountRef::Agent(agent),
            state.open,
            state.balance,
            state.pending,
            Some(opened_at),
            closed_at,
        )
    }

    fn transfer(&self, index: usize) -> pb::Transfer {
        let t = &self.plan.transfers[index];
        pb::Transfer {
            id: self.allocation.transfer_ids[index],
            debit: Some(account_ref_pb(t.debit)),
            credit: Some(account_ref_pb(t.credit)),
            amount_micros: t.amount.micros(),
            kind: match t.kind {
                TransferKind::Transfer => pb::TransferKind::Transfer,
                TransferKind::Mint => pb::TransferKind::Mint,
                TransferKind::HoldPost => pb::TransferKind::HoldPost,
                TransferKind::CloseBurn => pb::TransferKind::CloseBurn,
            } as i32,
            mint_reason: match t.mint_reason {
                Some(MintReason::Reward) => pb::MintReason::Reward,
                Some(MintReason::GenesisGrant) => pb::MintReason::GenesisGrant,
                None => pb::MintReason::Unspecified,
            } as i32,
            memo: t.memo.clone(),
            hold_id: t.hold.map(HoldId::get).unwrap_or(0),
            created_at: Some(timestamp(self.allocation.now)),
        }
    }

    fn new_hold(&self, index: usize) -> pb::Hold {
        let h = &self.plan.holds[index];
        pb::Hold {
            id: self.allocation.hold_ids[index],
            debit: Some(account_ref_pb(AccountRef::Agent(h.from))),
            credit: Some(account_ref_pb(h.to.into())),
            amount_micros: h.amount.micros(),
            status: hold_status_pb(HoldStatus::Pending),
            posted_micros: 0,
            memo: h.memo.clone(),
            created_at: Some(timestamp(self.allocation.now)),
            resolved_at: None,
        }
    }

    fn resolved_hold(&self, index: usize) -> pb::Hold {
        let r = &self.plan.resolutions[index];
        let row = self.holds.iter().find(|h| h.id == r.hold.get());
        let state = &self.ledger.holds[&r.hold];
        pb::Hold {
            id: r.hold.get(),
            debit: Some(account_ref_pb(AccountRef::Agent(state.from))),
            credit: Some(account_ref_pb(state.to.into())),
            amount_micros: state.amount.micros(),
            status: hold_status_pb(r.status),
            posted_micros: r
                .posted
                .map(Credits::micros)
                .or(row.and_then(|h| h.posted_amount))
                .unwrap_or(0),
            memo: row.map(|h| h.memo.clone()).unwrap_or_default(),
            created_at: row.map(|h| timestamp(h.created_at)),
            resolved_at: Some(timestamp(
                row.and_then(|h| h.resolved_at)
                    .unwrap_or(self.allocation.now),
            )),
        }
    }

    fn response(&self) -> pb::BatchResponse {
        let results = self
            .plan
            .outcomes
            .iter()
            .map(|outcome| match outcome {
                Outcome::Opened(agent) => pb::OpResult {
                    account: Some(self.account(*agent)),
                    ..Default::default()
                },
                Outcome::Closed { agent, burn } => pb::OpResult {
                    account: Some(self.account(*agent)),
                    transfer: burn.map(|i| self.transfer(i)),
                    ..Default::default()
                },
                Outcome::Transferred(i) | Outcome::Minted(i) => pb::OpResult {
                    transfer: Some(self.transfer(*i)),
                    ..Default::default()
                },
                Outcome::HoldPlaced(i) => pb::OpResult {
                    hold: Some(self.new_hold(*i)),
                    ..Default::default()
                },
                Outcome::HoldPosted {
                    resolution,
                    transfer,
                } => pb::OpResult {
                    hold: Some(self.resolved_hold(*resolution)),
                    transfer: Some(self.transfer(*transfer)),
                    ..Default::default()
                },
                Outcome::HoldVoided { resolution } => pb::OpResult {
                    hold: Some(self.resolved_hold(*resolution)),
                    ..Default::default()
                },
            })
            .collect();
        pb::BatchResponse { results }
    }

    fn events(&self, correlation_id: &str, causation_id: &str) -> Vec<PendingEvent> {
        let source = services::ECONOMY;
        let mut events = Vec::new();
        let mut push = |subject: &str, envelope: pb::EventEnvelope| {
            events.push(PendingEvent {
                subject: subject.to_owned(),
                envelope,
            });
        };
        let chunks = |n: usize| {
            (0..n)
                .step_by(MAX_EVENT_ITEMS)
                .map(move |start| start..(start + MAX_EVENT_ITEMS).min(n))
        };
        for range in chunks(self.plan.opened.len()) {
            let accounts = self.plan.opened[range]
                .iter()
                .map(|a| self.account(*a))
                .collect();
            push(
                economy_events::ACCOUNTS_OPENED,
                envelope(
                    source,
                    &pb::AccountsOpened { accounts },
                    correlation_id,
                    causation_id,
                ),
            );
        }
        for range in chunks(self.plan.transfers.len()) {
            let transfers = range.map(|i| self.transfer(i)).collect();
            push(
                economy_events::TRANSFERS_POSTED,
                envelope(
                    source,
                    &pb::TransfersPosted { transfers },
                    correlation_id,
                    causation_id,
                ),
            );
        }
        for range in chunks(self.plan.holds.len()) {
            let holds = range.map(|i| self.new_hold(i)).collect();
            push(
                economy_events::HOLDS_PLACED,
                envelope(
                    source,
                    &pb::HoldsPlaced { holds },
                    correlation_id,
                    causation_id,
                ),
            );
        }
        for range in chunks(self.plan.resolutions.len()) {
            let holds = range.map(|i| self.resolved_hold(i)).collect();
            push(
                economy_events::HOLDS_RESOLVED,
                envelope(
                    source,
                    &pb::HoldsResolved { holds },
                    correlation_id,
                    causation_id,
                ),
            );
        }
        for range in chunks(self.plan.closed.len()) {
            let accounts = self.plan.closed[range]
                .iter()
                .map(|a| self.account(*a))
                .collect();
            push(
                economy_events::ACCOUNTS_CLOSED,
                envelope(
                    source,
                    &pb::AccountsClosed { accounts },
                    correlation_id,
                    causation_id,
                ),
            );
        }
        events
    }
}
