//! The ledger in Postgres (schema `economy`).
//!
//! Mutations go through a queue to a few committers per replica ([`commit`]), which apply
//! concurrent requests in one transaction each; reads ([`Store::balance`], [`Store::history`],
//! [`Store::audit`]) query directly. The database's triggers and constraints re-check the
//! ledger's invariants on every write.

mod commit;
mod rows;
mod wire;

use std::collections::HashSet;
use std::sync::Arc;

use diesel::sql_types::{BigInt, Bytea, Text};
use diesel_async::{AsyncPgConnection, RunQueryDsl};
use prost::Message as _;
use syntropism_contracts::{IdempotencyId, RpcError, pb};
use syntropism_platform::db::Pool;
use syntropism_platform::sql::sql;
use tokio::sync::{Mutex, Notify, mpsc, oneshot};

use self::rows::{AccountRow, AuditRow, StoredOutcome, TransferRow};
use self::wire::{account_from_row, transfer_from_row};
use crate::errors::db_error;
use crate::ledger::{AccountRef, BURN_ID, MINT_ID, Op};

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

impl Mutation {
    fn opens_accounts(&self) -> bool {
        self.ops.iter().any(|op| matches!(op, Op::Open { .. }))
    }

    fn idempotency_key(&self) -> (String, String) {
        (self.scope.clone(), self.key.as_str().to_owned())
    }
}

/// Mutations with more operations than this queue for the committer of big mutations.
const MAX_GROUPED_OPS: usize = 16;

/// How mutations are committed.
#[derive(Debug, Clone, Copy)]
pub struct CommitSettings {
    /// Committer tasks per replica for small mutations (each holds one database connection
    /// while it works). One gives the largest groups; more overlap their round trips.
    pub committers: usize,
    /// Most small mutations one transaction takes.
    pub max_group: usize,
    /// Most operations one transaction of big mutations takes (a single bigger one still runs).
    pub max_group_ops: usize,
}

/// What the committers share.
struct Inner {
    pool: Pool,
    shards: i16,
    outbox: Arc<Notify>,
}

impl Inner {
    async fn connection(&self) -> Result<syntropism_platform::db::PooledConnection, RpcError> {
        syntropism_platform::db::checkout(&self.pool).await
    }
}

/// The ledger store. Cheap to clone; the committers stop when the last clone is dropped.
#[derive(Clone)]
pub struct Store {
    inner: Arc<Inner>,
    /// Mutations of at most [`MAX_GROUPED_OPS`] operations.
    small: mpsc::Sender<commit::Job>,
    /// Bigger ones.
    big: mpsc::Sender<commit::Job>,
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Store")
            .field("shards", &self.inner.shards)
            .finish_non_exhaustive()
    }
}

impl Store {
    /// A store over `pool`, spreading system-account writes over `shards` shards and waking
    /// `outbox` after each commit. Starts the committers.
    pub fn new(pool: Pool, shards: i16, outbox: Arc<Notify>, settings: CommitSettings) -> Self {
        let inner = Arc::new(Inner {
            pool,
            shards: shards.max(1),
            outbox,
        });
        let (small, receiver) = mpsc::channel(1024);
        let receiver = Arc::new(Mutex::new(receiver));
        for _ in 0..settings.committers.max(1) {
            tokio::spawn(commit::committer(
                inner.clone(),
                receiver.clone(),
                commit::GroupLimits {
                    mutations: settings.max_group.max(1),
                    ops: usize::MAX,
                },
            ));
        }
        // Big mutations lock thousands of rows: run side by side they mostly queue behind each
        // other's row locks inside Postgres (measured: 8 concurrent 1,000-transfer batches ran
        // 5x slower than one at a time). One committer takes them in turn, several at once
        // when they queue up, so rows they share are locked and updated once.
        let (big, receiver) = mpsc::channel(64);
        tokio::spawn(commit::committer(
            inner.clone(),
            Arc::new(Mutex::new(receiver)),
            commit::GroupLimits {
                mutations: usize::MAX,
                ops: settings.max_group_ops.max(1),
            },
        ));
        Self { inner, small, big }
    }

    /// Applies a mutation exactly once per idempotency id: a retry gets the first outcome.
    ///
    /// Small mutations queue for the committers, which group them; big ones queue for the
    /// committer of big mutations, which groups those waiting together (one that opens accounts
    /// runs alone there), so a large batch never holds up the small ones. A small mutation that
    /// opens accounts takes its own transaction at once.
    pub async fn mutate(&self, mutation: Mutation) -> Result<pb::BatchResponse, RpcError> {
        let queue = if mutation.ops.len() > MAX_GROUPED_OPS {
            &self.big
        } else if mutation.opens_accounts() {
            return commit::apply_alone(&self.inner, &mutation).await;
        } else {
            &self.small
        };
        let (reply, outcome) = oneshot::channel();
        queue
            .send(commit::Job { mutation, reply })
            .await
            .map_err(|_| RpcError::unavailable("the ledger is shutting down"))?;
        outcome
            .await
            .map_err(|_| RpcError::unavailable("the ledger dropped the request"))?
    }

    /// An account's balance; system accounts sum their shards.
    pub async fn balance(&self, account: AccountRef) -> Result<pb::Account, RpcError> {
        let mut conn = self.inner.connection().await?;
        let rows: Vec<AccountRow> = match account {
            AccountRef::Agent(agent) => sql(
                "SELECT id, agent_id, status::text AS status, balance, pending, opened_at, closed_at \
                 FROM accounts WHERE agent_id = $1",
            )
            .bind::<diesel::sql_types::Uuid, _>(agent.as_uuid())
            .load(&mut conn)
            .await,
            AccountRef::Mint | AccountRef::Burn => sql(
                "SELECT id, NULL::uuid AS agent_id, 'open' AS status, \
                   sum(balance)::bigint AS balance, sum(pending)::bigint AS pending, \
                   min(opened_at) AS opened_at, NULL::timestamptz AS closed_at \
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
        let mut conn = self.inner.connection().await?;
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
        let mut conn = self.inner.connection().await?;
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

const TRANSFER_COLUMNS: &str = "t.id, t.debit_id, d.agent_id AS debit_agent, t.credit_id, \
     c.agent_id AS credit_agent, t.amount, t.kind::text AS kind, t.mint_reason::text AS mint_reason, \
     t.memo, t.hold_id, t.created_at \
     FROM transfers t \
     JOIN accounts d ON d.id = t.debit_id AND d.shard = t.debit_shard \
     JOIN accounts c ON c.id = t.credit_id AND c.shard = t.credit_shard";
