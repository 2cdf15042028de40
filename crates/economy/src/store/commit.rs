//! Applying mutations: concurrent requests share one database transaction.
//!
//! Each replica runs a few committers for small mutations and one for big ones (batches of more
//! than a few operations), each fed by its own queue. A committer takes the mutations waiting in
//! its queue (small ones: up to `max_group`; big ones: up to `max_group_ops` operations in all)
//! and applies them in one transaction: claim their idempotency ids → lock every account row
//! involved in (id, shard) order, then their holds in id order → let the rules apply each
//! mutation on its own, all-or-nothing, over the shared view (one request's refusal does not
//! touch the others) → write all rows set-based → record each outcome and enqueue the events →
//! commit once. Under load this divides the per-transaction cost (round trips, locking, the
//! commit's WAL flush, and for batches the account rows they share) among the group; alone, a
//! request costs the same as before. A group that fails as a whole is retried one mutation at a
//! time, so one bad request cannot sink the others.
//!
//! Mutations that open accounts run in a transaction of their own: small ones at once
//! ([`apply_alone`], concurrently with the committers — the fixed locking order makes that
//! safe), big ones in turn on the committer of big mutations. If an opener is refused its
//! transaction rolls back, so the rows reserved for the accounts vanish, and the refusal is
//! recorded afterwards.

use std::collections::{HashMap, HashSet};
use std::panic::AssertUnwindSafe;
use std::sync::Arc;

use diesel::sql_types::{Array, BigInt, Bool, Bytea, Nullable, SmallInt, Text};
use diesel_async::{AsyncPgConnection, RunQueryDsl};
use futures::FutureExt;
use prost::Message as _;
use rand::Rng;
use syntropism_contracts::{AgentId, Credits, HoldId, RpcError, pb};
use syntropism_platform::db::PooledConnection;
use syntropism_platform::outbox;
use syntropism_platform::sql::sql;
use tokio::sync::{Mutex, mpsc, oneshot};
use uuid::Uuid;

use super::rows::{AccountRow, Allocated, HoldLock, HoldRow};
use super::wire::{self, Allocation, ResponseView};
use super::{
    HOLD_SELECT, Inner, Mutation, db_error, is_transient, lookup, record_error, replay, unique,
};
use crate::errors::op_error;
use crate::ledger::{
    AccountRef, AccountState, BURN_ID, HoldState, Ledger, MINT_ID, Op, OpError, Payee, Plan,
};

/// Largest reply a mutation may have: NATS's default 1 MiB payload, less room for headers.
const MAX_REPLY_BYTES: usize = 1_000_000;

/// A mutation waiting for a committer, and where its outcome goes.
pub(super) struct Job {
    pub(super) mutation: Mutation,
    pub(super) reply: oneshot::Sender<Result<pb::BatchResponse, RpcError>>,
}

/// How big one committer's groups may grow.
#[derive(Debug, Clone, Copy)]
pub(super) struct GroupLimits {
    /// Most mutations in one transaction.
    pub(super) mutations: usize,
    /// Most operations in one transaction (a first mutation bigger than this still runs).
    pub(super) ops: usize,
}

/// Runs until every sender of the queue is gone.
pub(super) async fn committer(
    inner: Arc<Inner>,
    queue: Arc<Mutex<mpsc::Receiver<Job>>>,
    limits: GroupLimits,
) {
    let mut carried: Option<Job> = None;
    loop {
        let mut group: Vec<Job> = Vec::new();
        {
            let mut queue = queue.lock().await;
            let first = match carried.take() {
                Some(job) => job,
                None => match queue.recv().await {
                    Some(job) => job,
                    None => return,
                },
            };
            let mut keys = HashSet::from([first.mutation.idempotency_key()]);
            let mut ops = first.mutation.ops.len();
            // A mutation that opens accounts runs alone: if it is refused, its transaction
            // rolls back (the rows reserved for the accounts must vanish).
            let alone = first.mutation.opens_accounts();
            group.push(first);
            while !alone && group.len() < limits.mutations {
                let Ok(job) = queue.try_recv() else { break };
                // One id appears once per group: a retry racing its original waits for the
                // next group, where it finds the original's outcome.
                if ops + job.mutation.ops.len() > limits.ops
                    || job.mutation.opens_accounts()
                    || !keys.insert(job.mutation.idempotency_key())
                {
                    carried = Some(job);
                    break;
                }
                ops += job.mutation.ops.len();
                group.push(job);
            }
        }
        // A bug must not stop the ledger: the group's callers get UNAVAILABLE (their replies are
        // dropped) and may retry; the committer goes on.
        if let Err(panic) = AssertUnwindSafe(apply_group(&inner, group))
            .catch_unwind()
            .await
        {
            let what = panic
                .downcast_ref::<&str>()
                .map(|s| s.to_string())
                .or_else(|| panic.downcast_ref::<String>().cloned())
                .unwrap_or_default();
            tracing::error!(panic = %what, "a committer panicked; continuing");
        }
    }
}

/// What became of one mutation in a group transaction.
enum Outcome {
    /// Applied or refused by the rules; recorded under its idempotency id.
    Decided(Result<pb::BatchResponse, RpcError>),
    /// Its idempotency id was already taken: answer from the stored outcome.
    Known,
}

impl Outcome {
    /// The reply: the decision, or the stored outcome of the id's first use.
    async fn answer(
        self,
        conn: &mut AsyncPgConnection,
        mutation: &Mutation,
    ) -> Result<pb::BatchResponse, RpcError> {
        match self {
            Outcome::Decided(answer) => answer,
            Outcome::Known => match lookup(conn, mutation).await? {
                Some(stored) => replay(stored, mutation),
                None => Err(RpcError::internal("idempotency record vanished")),
            },
        }
    }
}

enum TxError {
    /// A mutation applied alone was refused where its transaction must not commit (an opener's
    /// reserved rows, a reply too large to send): roll back, then record the refusal.
    Refused(RpcError),
    /// No idempotency id was claimed: nothing may commit (not even an opener's reserved rows);
    /// every mutation is answered from its stored outcome.
    NothingClaimed,
    Db(diesel::result::Error),
}

impl From<diesel::result::Error> for TxError {
    fn from(error: diesel::result::Error) -> Self {
        TxError::Db(error)
    }
}

async fn apply_group(inner: &Inner, group: Vec<Job>) {
    let started = std::time::Instant::now();
    metrics::histogram!("syntropism_economy_group_size").record(group.len() as f64);
    let mutations: Vec<&Mutation> = group.iter().map(|job| &job.mutation).collect();
    let outcomes = match inner.connection().await {
        Err(error) => Err(error),
        Ok(conn) => {
            let mut conn = TxConn::new(conn);
            match run_with_retries(inner, &mut conn, &mutations).await {
                Ok(outcomes) => Ok(Some((conn, outcomes))),
                // One bad request (e.g. an overflow only the database sees) must not sink the
                // others: a failed group is retried one mutation at a time.
                Err(error) if mutations.len() > 1 => {
                    tracing::warn!(%error, size = mutations.len(), "a grouped transaction failed; applying its mutations one by one");
                    Ok(None)
                }
                Err(error) => Err(error),
            }
        }
    };
    match outcomes {
        Ok(Some((mut conn, outcomes))) => {
            inner.outbox.notify_one();
            for (job, outcome) in group.into_iter().zip(outcomes) {
                let answer = outcome.answer(conn.get(), &job.mutation).await;
                let _ = job.reply.send(answer);
            }
        }
        Ok(None) => {
            for job in group {
                let answer = Box::pin(apply_alone(inner, &job.mutation)).await;
                let _ = job.reply.send(answer);
            }
        }
        Err(error) => {
            for job in group {
                let _ = job.reply.send(Err(error.clone()));
            }
        }
    }
    metrics::histogram!("syntropism_economy_commit_seconds")
        .record(started.elapsed().as_secs_f64());
}

pub(super) async fn apply_alone(
    inner: &Inner,
    mutation: &Mutation,
) -> Result<pb::BatchResponse, RpcError> {
    let mut conn = TxConn::new(inner.connection().await?);
    let outcome = run_with_retries(inner, &mut conn, &[mutation]).await?.pop();
    inner.outbox.notify_one();
    match outcome {
        Some(outcome) => outcome.answer(conn.get(), mutation).await,
        None => Err(RpcError::internal("a mutation produced no outcome")),
    }
}

/// A pooled connection on which this module opens and ends transactions itself: `BEGIN` rides
/// in a transaction's first pipeline and `COMMIT` in its last, two round trips fewer than
/// diesel's `transaction` (which awaits each alone). Dropped while a transaction may still be
/// open (a panic, a failed rollback), the connection leaves the pool instead of serving the next
/// caller mid-transaction.
struct TxConn {
    pooled: Option<PooledConnection>,
    open: bool,
}

impl TxConn {
    fn new(pooled: PooledConnection) -> Self {
        Self {
            pooled: Some(pooled),
            open: false,
        }
    }

    fn get(&mut self) -> &mut AsyncPgConnection {
        self.pooled
            .as_mut()
            .expect("the connection is only taken when dropped")
    }

    /// One transaction: commits when `group_transaction` succeeds (its last pipeline ends with
    /// `COMMIT`), rolls back otherwise.
    async fn transaction(
        &mut self,
        inner: &Inner,
        mutations: &[&Mutation],
    ) -> Result<Vec<Outcome>, TxError> {
        self.open = true;
        let result = group_transaction(inner, self.get(), mutations).await;
        if result.is_ok() {
            self.open = false;
            return result;
        }
        // Whatever failed, end the transaction (a ROLLBACK outside one only warns).
        match sql("ROLLBACK").execute(self.get()).await {
            Ok(_) => self.open = false,
            Err(error) => tracing::warn!(%error, "rollback failed; the connection will be closed"),
        }
        result
    }
}

impl Drop for TxConn {
    fn drop(&mut self) {
        if self.open
            && let Some(pooled) = self.pooled.take()
        {
            drop(PooledConnection::take(pooled));
        }
    }
}

async fn run_with_retries(
    inner: &Inner,
    conn: &mut TxConn,
    mutations: &[&Mutation],
) -> Result<Vec<Outcome>, RpcError> {
    let mut attempt = 0;
    loop {
        attempt += 1;
        let result = conn.transaction(inner, mutations).await;
        if result.is_err() && conn.open {
            // The rollback failed: the connection is unusable (it is closed when dropped), so
            // neither the refusal nor the stored outcome can be read or written on it.
            return Err(RpcError::unavailable(
                "the database connection failed mid-transaction",
            ));
        }
        return match result {
            Ok(outcomes) => Ok(outcomes),
            Err(TxError::Refused(error)) => match mutations {
                [mutation] => Ok(vec![Outcome::Decided(
                    record_error(conn.get(), mutation, &error).await,
                )]),
                // Only a mutation applied alone is refused this way; in a group, fall back to
                // applying them one at a time.
                _ => Err(error),
            },
            Err(TxError::NothingClaimed) => Ok(mutations.iter().map(|_| Outcome::Known).collect()),
            Err(TxError::Db(error)) if attempt < 3 && is_transient(&error) => {
                tracing::debug!(%error, attempt, "retrying a transient database failure");
                continue;
            }
            Err(TxError::Db(error)) => Err(db_error(error)),
        };
    }
}

/// Where one claimed mutation's rows sit in the group's combined rows.
struct Share {
    /// Index of the mutation in the group.
    index: usize,
    result: Result<Plan, OpError>,
    transfers: std::ops::Range<usize>,
    holds: std::ops::Range<usize>,
}

async fn group_transaction(
    inner: &Inner,
    conn: &mut AsyncPgConnection,
    mutations: &[&Mutation],
) -> Result<Vec<Outcome>, TxError> {
    // 1. Claim the idempotency ids (an id already taken, or being taken by a transaction we
    // then wait for, is answered from its stored outcome); insert the rows of accounts being
    // opened (invisible to the rules until their Open is reached); read the holds named by
    // posts and voids (their accounts never change, so no lock yet). All in one round trip.
    // When nothing needs reading first, the account lock rides along too. Statements run in
    // the order sent, so the claim still precedes the lock: a retry waits for its original
    // before taking any row lock.
    let all_ops = || mutations.iter().flat_map(|m| m.ops.iter());
    let mut opening: Vec<Uuid> = unique(all_ops().filter_map(|op| match op {
        Op::Open { agent } => Some(agent.as_uuid()),
        _ => None,
    }));
    opening.sort();
    let hold_ids: Vec<i64> = unique(all_ops().filter_map(|op| op.hold().map(HoldId::get)));
    let (mint_shard, burn_shard) = {
        let mut rng = rand::rng();
        let uses_burn = all_ops().any(|op| op.touches(AccountRef::Burn) || op.hold().is_some());
        let mint = if all_ops().any(|op| op.touches(AccountRef::Mint)) {
            rng.random_range(0..inner.shards)
        } else {
            -1
        };
        let burn = if uses_burn {
            rng.random_range(0..inner.shards)
        } else {
            -1
        };
        (mint, burn)
    };
    // Every agent the group touches, and those of the holds it posts or voids.
    let lock = |holds: &[HoldRow]| {
        let agents: Vec<Uuid> = unique(
            all_ops().flat_map(Op::agents).map(|a| a.as_uuid()).chain(
                holds
                    .iter()
                    .flat_map(|h| std::iter::once(h.debit_agent).chain(h.credit_agent)),
            ),
        );
        sql(
            "SELECT id, agent_id, status::text AS status, balance, pending, opened_at, closed_at \
             FROM accounts \
             WHERE agent_id = ANY($1) OR (id = 1 AND shard = $2) OR (id = 2 AND shard = $3) \
             ORDER BY id, shard FOR UPDATE",
        )
        .bind::<Array<diesel::sql_types::Uuid>, _>(agents)
        .bind::<SmallInt, _>(mint_shard)
        .bind::<SmallInt, _>(burn_shard)
    };
    #[derive(diesel::QueryableByName)]
    struct Claimed {
        #[diesel(sql_type = Text)]
        scope: String,
        #[diesel(sql_type = Text)]
        key: String,
    }
    #[derive(diesel::QueryableByName)]
    struct Inserted {
        #[diesel(sql_type = diesel::sql_types::Uuid)]
        agent_id: Uuid,
    }
    // Unique-key waits (a claim meeting a concurrent claim of the same id) follow an order too:
    // ids are claimed sorted, like rows are locked sorted.
    let mut claims: Vec<&Mutation> = mutations.to_vec();
    claims.sort_by(|a, b| (&a.scope, a.key.as_str()).cmp(&(&b.scope, b.key.as_str())));
    let claim = sql(
        "INSERT INTO idempotency (scope, key, request_hash, is_error, outcome) \
         SELECT s, k, h, false, '' FROM unnest($1::text[], $2::text[], $3::bytea[]) AS x(s, k, h) \
         ON CONFLICT DO NOTHING RETURNING scope, key",
    )
    .bind::<Array<Text>, _>(claims.iter().map(|m| m.scope.clone()).collect::<Vec<_>>())
    .bind::<Array<Text>, _>(
        claims
            .iter()
            .map(|m| m.key.as_str().to_owned())
            .collect::<Vec<_>>(),
    )
    .bind::<Array<Bytea>, _>(
        claims
            .iter()
            .map(|m| m.request_hash.clone())
            .collect::<Vec<_>>(),
    );
    // Ids for the rows this group may write (at most one transfer per transfer, mint, post or
    // close; one hold per hold) and the transaction's timestamp, so that replies and the writes
    // can be built before anything is written. Ids a refused operation does not use are gaps.
    let transfer_slots = all_ops()
        .filter(|op| {
            matches!(
                op,
                Op::Transfer { .. } | Op::Mint { .. } | Op::Post { .. } | Op::Close { .. }
            )
        })
        .count();
    let hold_slots = all_ops().filter(|op| matches!(op, Op::Hold { .. })).count();
    let allocate = sql("SELECT now() AS now, \
           array(SELECT nextval('transfer_ids') FROM generate_series(1, $1)) AS transfer_ids, \
           array(SELECT nextval('hold_ids') FROM generate_series(1, $2)) AS hold_ids")
    .bind::<BigInt, _>(transfer_slots as i64)
    .bind::<BigInt, _>(hold_slots as i64);
    let shared: &AsyncPgConnection = conn;
    let (claimed, reserved, hold_rows, locked, allocated) = if opening.is_empty()
        && hold_ids.is_empty()
    {
        let (_, claimed, locked, allocated) = futures::try_join!(
            sql("BEGIN").execute(&mut &*shared),
            claim.load::<Claimed>(&mut &*shared),
            lock(&[]).load::<AccountRow>(&mut &*shared),
            allocate.get_result::<Allocated>(&mut &*shared),
        )?;
        (
            claimed,
            HashSet::<Uuid>::new(),
            Vec::<HoldRow>::new(),
            Some(locked),
            allocated,
        )
    } else {
        let inserted = async {
            if opening.is_empty() {
                return Ok(Vec::new());
            }
            sql("INSERT INTO accounts (id, kind, agent_id) \
                     SELECT nextval('agent_account_ids'), 'agent', a FROM unnest($1::uuid[]) AS a \
                     ON CONFLICT (agent_id) WHERE agent_id IS NOT NULL DO NOTHING RETURNING agent_id")
                .bind::<Array<diesel::sql_types::Uuid>, _>(opening.clone())
                .load::<Inserted>(&mut &*shared)
                .await
        };
        let holds = async {
            if hold_ids.is_empty() {
                return Ok(Vec::new());
            }
            sql(format!("{HOLD_SELECT} WHERE h.id = ANY($1)"))
                .bind::<Array<BigInt>, _>(hold_ids.clone())
                .load::<HoldRow>(&mut &*shared)
                .await
        };
        let (_, claimed, inserted, hold_rows, allocated) = futures::try_join!(
            sql("BEGIN").execute(&mut &*shared),
            claim.load::<Claimed>(&mut &*shared),
            inserted,
            holds,
            allocate.get_result::<Allocated>(&mut &*shared),
        )?;
        (
            claimed,
            inserted.into_iter().map(|r| r.agent_id).collect(),
            hold_rows,
            None,
            allocated,
        )
    };
    let claimed: HashSet<(String, String)> =
        claimed.into_iter().map(|c| (c.scope, c.key)).collect();
    let active: Vec<usize> = (0..mutations.len())
        .filter(|&i| claimed.contains(&mutations[i].idempotency_key()))
        .collect();
    let mut outcomes: Vec<Option<Outcome>> = (0..mutations.len()).map(|_| None).collect();
    if active.is_empty() {
        return Err(TxError::NothingClaimed);
    }

    // 2. Otherwise lock every account row involved, in (id, shard) order, then the holds in id
    // order.
    let locked = match locked {
        Some(locked) => locked,
        None => lock(&hold_rows).load::<AccountRow>(conn).await?,
    };
    let mut hold_status: HashMap<i64, String> = HashMap::new();
    if !hold_ids.is_empty() {
        let locks: Vec<HoldLock> =
            sql("SELECT id, status::text AS status FROM holds WHERE id = ANY($1) ORDER BY id FOR UPDATE")
                .bind::<Array<BigInt>, _>(hold_ids)
                .load(conn)
                .await?;
        hold_status = locks.into_iter().map(|l| (l.id, l.status)).collect();
    }

    // 3. Decide, one mutation at a time over the shared view; each is all-or-nothing.
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
                status: wire::parse_hold_status(status),
            },
        );
    }
    let mut shares = Vec::with_capacity(active.len());
    let (mut transfer_count, mut hold_count) = (0, 0);
    for &index in &active {
        let result = ledger.apply(&mutations[index].ops);
        if let Err(error) = &result
            && mutations[index].opens_accounts()
        {
            return Err(TxError::Refused(op_error(
                error,
                mutations[index].ops.len(),
            )));
        }
        let (transfers, holds) = match &result {
            Ok(plan) => (plan.transfers.len(), plan.holds.len()),
            Err(_) => (0, 0),
        };
        shares.push(Share {
            index,
            result,
            transfers: transfer_count..transfer_count + transfers,
            holds: hold_count..hold_count + holds,
        });
        transfer_count += transfers;
        hold_count += holds;
    }
    let plans = || {
        shares
            .iter()
            .filter_map(|s| s.result.as_ref().ok().map(|plan| (s, plan)))
    };
    let now = allocated.now;
    let account_id = |account: AccountRef| -> (i64, i16) {
        match account {
            AccountRef::Mint => (MINT_ID, mint_shard),
            AccountRef::Burn => (BURN_ID, burn_shard),
            AccountRef::Agent(agent) => (ledger.accounts[&agent].id, 0),
        }
    };
    let request_key =
        |s: &Share| format!("{}/{}", mutations[s.index].scope, mutations[s.index].key);

    // 4. Each mutation's reply, outcome record and events, from the plan and the ids.
    let new_transfer_ids = &allocated.transfer_ids;
    let new_hold_ids = &allocated.hold_ids;
    let mut events = Vec::new();
    let (mut scopes, mut keys, mut errors, mut bodies) = (vec![], vec![], vec![], vec![]);
    for share in &shares {
        let mutation = mutations[share.index];
        let answer = match &share.result {
            Ok(plan) => {
                let allocation = Allocation {
                    now,
                    transfer_ids: new_transfer_ids[share.transfers.clone()].to_vec(),
                    hold_ids: new_hold_ids[share.holds.clone()].to_vec(),
                };
                let view = ResponseView {
                    plan,
                    ledger: &ledger,
                    rows: &rows_by_agent,
                    holds: &hold_rows,
                    allocation: &allocation,
                };
                let response = view.response();
                // The reply (and the stored outcome every retry replays) must fit a NATS
                // message; a mutation whose reply would not is refused before anything commits.
                if response.encoded_len() > MAX_REPLY_BYTES {
                    return Err(TxError::Refused(
                        RpcError::invalid_argument(format!(
                            "the reply would be {} bytes, more than the {MAX_REPLY_BYTES} a message carries; split the batch",
                            response.encoded_len()
                        ))
                        .with_reason("reply_too_large"),
                    ));
                }
                events.extend(view.events(&mutation.correlation_id, mutation.key.as_str()));
                Ok(response)
            }
            Err(error) => Err(op_error(error, mutation.ops.len())),
        };
        scopes.push(mutation.scope.clone());
        keys.push(mutation.key.as_str().to_owned());
        match &answer {
            Ok(response) => {
                errors.push(false);
                bodies.push(response.encode_to_vec());
            }
            Err(error) => {
                errors.push(true);
                bodies.push(error.to_proto().encode_to_vec());
            }
        }
        outcomes[share.index] = Some(Outcome::Decided(answer));
    }

    // 5. Write, all in one pipeline (Postgres runs a connection's statements in the order
    // sent): releases first, then transfers, then new holds, then closures, so no intermediate
    // state breaks a constraint the final state satisfies; then the outcomes and the events.
    let mut writes = Vec::new();
    let resolutions: Vec<_> = plans()
        .flat_map(|(_, plan)| plan.resolutions.iter())
        .collect();
    if !resolutions.is_empty() {
        writes.push(
            sql("UPDATE holds h SET status = r.status::hold_status, posted_amount = r.posted, resolved_at = now() \
                 FROM unnest($1::bigint[], $2::text[], $3::bigint[]) AS r(id, status, posted) WHERE h.id = r.id")
            .bind::<Array<BigInt>, _>(resolutions.iter().map(|r| r.hold.get()).collect::<Vec<_>>())
            .bind::<Array<Text>, _>(resolutions.iter().map(|r| wire::hold_status_name(r.status)).collect::<Vec<_>>())
            .bind::<Array<Nullable<BigInt>>, _>(resolutions.iter().map(|r| r.posted.map(Credits::micros)).collect::<Vec<_>>()),
        );
    }
    if transfer_count > 0 {
        let mut columns = TransferColumns::with_capacity(transfer_count);
        for (share, plan) in plans() {
            let key = request_key(share);
            for transfer in &plan.transfers {
                let (debit, debit_shard) = account_id(transfer.debit);
                let (credit, credit_shard) = account_id(transfer.credit);
                columns.debit_ids.push(debit);
                columns.debit_shards.push(debit_shard);
                columns.credit_ids.push(credit);
                columns.credit_shards.push(credit_shard);
                columns.amounts.push(transfer.amount.micros());
                columns.kinds.push(wire::transfer_kind_name(transfer.kind));
                columns
                    .reasons
                    .push(transfer.mint_reason.map(wire::mint_reason_name));
                columns.memos.push(transfer.memo.clone());
                columns.holds.push(transfer.hold.map(HoldId::get));
                columns.keys.push(key.clone());
            }
        }
        writes.push(
            sql("INSERT INTO transfers (id, debit_id, debit_shard, credit_id, credit_shard, amount, kind, \
                   mint_reason, memo, hold_id, request_key, created_at) \
                 SELECT id, d, ds, c, cs, amount, kind::transfer_kind, reason::mint_reason, memo, hold, request_key, now() \
                 FROM unnest($1::bigint[], $2::bigint[], $3::smallint[], $4::bigint[], $5::smallint[], $6::bigint[], \
                   $7::text[], $8::text[], $9::text[], $10::bigint[], $11::text[]) \
                   AS x(id, d, ds, c, cs, amount, kind, reason, memo, hold, request_key)")
            .bind::<Array<BigInt>, _>(new_transfer_ids[..transfer_count].to_vec())
            .bind::<Array<BigInt>, _>(columns.debit_ids)
            .bind::<Array<SmallInt>, _>(columns.debit_shards)
            .bind::<Array<BigInt>, _>(columns.credit_ids)
            .bind::<Array<SmallInt>, _>(columns.credit_shards)
            .bind::<Array<BigInt>, _>(columns.amounts)
            .bind::<Array<Text>, _>(columns.kinds)
            .bind::<Array<Nullable<Text>>, _>(columns.reasons)
            .bind::<Array<Text>, _>(columns.memos)
            .bind::<Array<Nullable<BigInt>>, _>(columns.holds)
            .bind::<Array<Text>, _>(columns.keys),
        );
    }
    if hold_count > 0 {
        let (mut debits, mut credits, mut shards, mut amounts, mut memos, mut keys) =
            (vec![], vec![], vec![], vec![], vec![], vec![]);
        for (share, hold) in plans().flat_map(|(s, plan)| plan.holds.iter().map(move |h| (s, h))) {
            debits.push(ledger.accounts[&hold.from].id);
            // The credit account's row is checked by a foreign key, which share-locks it: it
            // must be a row this transaction already locked (for burn: its burn shard), or the
            // locking order breaks and concurrent transactions can deadlock.
            let (credit, shard) = account_id(hold.to.into());
            credits.push(credit);
            shards.push(shard);
            amounts.push(hold.amount.micros());
            memos.push(hold.memo.clone());
            keys.push(request_key(share));
        }
        writes.push(
            sql("INSERT INTO holds (id, debit_id, credit_id, credit_shard, amount, memo, request_key, created_at) \
                 SELECT id, d, c, cs, amount, memo, request_key, now() \
                 FROM unnest($1::bigint[], $2::bigint[], $3::bigint[], $4::smallint[], $5::bigint[], $6::text[], $7::text[]) \
                   AS x(id, d, c, cs, amount, memo, request_key)")
            .bind::<Array<BigInt>, _>(new_hold_ids[..hold_count].to_vec())
            .bind::<Array<BigInt>, _>(debits)
            .bind::<Array<BigInt>, _>(credits)
            .bind::<Array<SmallInt>, _>(shards)
            .bind::<Array<BigInt>, _>(amounts)
            .bind::<Array<Text>, _>(memos)
            .bind::<Array<Text>, _>(keys),
        );
    }
    let closed: Vec<Uuid> = plans()
        .flat_map(|(_, plan)| plan.closed.iter().map(|a| a.as_uuid()))
        .collect();
    if !closed.is_empty() {
        writes.push(
            sql("UPDATE accounts SET status = 'closed', closed_at = now() WHERE shard = 0 AND agent_id = ANY($1)")
                .bind::<Array<diesel::sql_types::Uuid>, _>(closed),
        );
    }
    writes.push(
        sql("UPDATE idempotency i SET is_error = x.e, outcome = x.o \
             FROM unnest($1::text[], $2::text[], $3::bool[], $4::bytea[]) AS x(s, k, e, o) \
             WHERE i.scope = x.s AND i.key = x.k")
        .bind::<Array<Text>, _>(scopes)
        .bind::<Array<Text>, _>(keys)
        .bind::<Array<Bool>, _>(errors)
        .bind::<Array<Bytea>, _>(bodies),
    );
    if !events.is_empty() {
        writes.push(outbox::insert(&events));
    }
    // If a write fails, the transaction is aborted and this COMMIT (if sent) rolls it back;
    // the caller rolls back in any case.
    writes.push(sql("COMMIT"));
    let shared: &AsyncPgConnection = conn;
    futures::future::try_join_all(writes.into_iter().map(|write| {
        let mut connection = shared;
        write.execute(&mut connection)
    }))
    .await?;
    Ok(outcomes
        .into_iter()
        .map(|o| o.unwrap_or(Outcome::Known))
        .collect())
}

/// The columns of the transfers insert.
struct TransferColumns {
    debit_ids: Vec<i64>,
    debit_shards: Vec<i16>,
    credit_ids: Vec<i64>,
    credit_shards: Vec<i16>,
    amounts: Vec<i64>,
    kinds: Vec<&'static str>,
    reasons: Vec<Option<&'static str>>,
    memos: Vec<String>,
    holds: Vec<Option<i64>>,
    keys: Vec<String>,
}

impl TransferColumns {
    fn with_capacity(n: usize) -> Self {
        Self {
            debit_ids: Vec::with_capacity(n),
            debit_shards: Vec::with_capacity(n),
            credit_ids: Vec::with_capacity(n),
            credit_shards: Vec::with_capacity(n),
            amounts: Vec::with_capacity(n),
            kinds: Vec::with_capacity(n),
            reasons: Vec::with_capacity(n),
            memos: Vec::with_capacity(n),
            holds: Vec::with_capacity(n),
            keys: Vec::with_capacity(n),
        }
    }
}
