//! The scheduler's NATS handlers: bids in escrow (agent-facing) and the clearing round
//! (internal).

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use diesel::sql_types::{Array, BigInt, Bytea, Nullable, Text, Timestamptz};
use diesel_async::{AsyncConnection, AsyncPgConnection, RunQueryDsl};
use prost::Message as _;
use sha2::{Digest, Sha256};
use syntropism_contracts::economy::internal as economy;
use syntropism_contracts::market::internal as market;
use syntropism_contracts::scheduler::{agent, internal};
use syntropism_contracts::subjects::{scheduler_events, services};
use syntropism_contracts::{
    AgentId, ErrorCode, IdempotencyId, RequestContext, RpcClient, RpcError, RpcServer, events, pb,
};
use syntropism_platform::db::rpc_error as db_error;
use syntropism_platform::db::{Pool, PooledConnection};
use syntropism_platform::outbox::{self, PendingEvent};
use syntropism_platform::sql::sql;
use tokio::sync::Notify;
use tracing::Instrument as _;

use crate::clearing::{self, LossReason, Rules};
use crate::config::SchedulerSection;
use crate::store::{BID_COLUMNS, BidRow, ROUND_COLUMNS, RoundRow, time_from, timestamp};

/// Bids that hold or may still hold escrow and count against the per-agent limit.
const OPEN_STATUSES: &str = "('placing', 'pending', 'settling', 'cancelling')";
/// Operations per settlement batch: a round of up to this many winners and expiries settles
/// in one atomic economy request. (The economy takes 5,000 operations, but its reply, about
/// 210 bytes per posted hold, must fit a NATS message.)
const SETTLEMENT_CHUNK: usize = 3_000;
/// Economy calls are retried this many times on retryable failures.
const ECONOMY_ATTEMPTS: u32 = 3;

pub struct Scheduler {
    pool: Pool,
    client: RpcClient,
    config: SchedulerSection,
    outbox: Arc<Notify>,
    rules: Rules<'static>,
}

impl std::fmt::Debug for Scheduler {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Scheduler")
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

/// Subscribes every scheduler method on `rpc`.
pub async fn register(
    rpc: &mut RpcServer,
    scheduler: Arc<Scheduler>,
) -> Result<(), async_nats::SubscribeError> {
    macro_rules! serve {
        ($method:ty, $handler:ident) => {{
            let scheduler = scheduler.clone();
            rpc.serve::<$method, _, _>(move |ctx, request| {
                let scheduler = scheduler.clone();
                async move { scheduler.$handler(ctx, request).await }
            })
            .await?;
        }};
    }
    serve!(agent::PlaceBid, place_bid);
    serve!(agent::CancelBid, cancel_bid);
    serve!(agent::ListBids, list_bids);
    serve!(internal::Clear, clear);
    serve!(internal::PendingFor, pending_for);
    Ok(())
}

fn agent_ref(agent: AgentId) -> pb::AccountRef {
    pb::AccountRef {
        account: Some(pb::account_ref::Account::AgentId(agent.to_string())),
    }
}

fn burn_ref() -> pb::AccountRef {
    pb::AccountRef {
        account: Some(pb::account_ref::Account::System(
            pb::SystemAccount::Burn as i32,
        )),
    }
}

fn invalid(field: &'static str, reason: &str, message: impl Into<String>) -> RpcError {
    RpcError::invalid_argument(message)
        .with_reason(reason)
        .with_detail("field", field)
}

fn fingerprint(body: &impl prost::Message) -> Vec<u8> {
    let mut hash = Sha256::new();
    hash.update(body.encode_to_vec());
    hash.finalize().to_vec()
}

fn key(text: String) -> IdempotencyId {
    IdempotencyId::parse(&text).expect("scheduler idempotency ids are well-formed")
}

impl Scheduler {
    pub fn new(
        pool: Pool,
        client: RpcClient,
        config: SchedulerSection,
        outbox: Arc<Notify>,
    ) -> Self {
        let rules = Rules {
            ordering: clearing::ordering_named(&config.ordering).expect("validated"),
            payment: clearing::payment_named(&config.payment).expect("validated"),
        };
        Self {
            pool,
            client,
            config,
            outbox,
            rules,
        }
    }

    async fn connection(&self) -> Result<PooledConnection, RpcError> {
        syntropism_platform::db::checkout(&self.pool).await
    }

    fn event<M: prost::Message + prost::Name>(
        &self,
        subject: &str,
        payload: &M,
        correlation_id: &str,
        cause: &str,
    ) -> PendingEvent {
        PendingEvent {
            subject: subject.into(),
            envelope: events::envelope(services::SCHEDULER, payload, correlation_id, cause),
        }
    }

    async fn enqueue(&self, events: Vec<PendingEvent>) -> Result<(), RpcError> {
        let mut conn = self.connection().await?;
        outbox::enqueue(&mut conn, &events)
            .await
            .map_err(db_error)?;
        self.outbox.notify_one();
        Ok(())
    }

    /// An economy call, retried on retryable failures (every economy mutation is idempotent).
    async fn economy<M: syntropism_contracts::Method>(
        &self,
        request: &M::Request,
    ) -> Result<M::Response, RpcError> {
        syntropism_contracts::rpc::retrying_with(
            ECONOMY_ATTEMPTS,
            Duration::from_millis(50),
            || self.client.call::<M>(request),
        )
        .await
    }

    async fn bid_by_key(
        &self,
        conn: &mut AsyncPgConnection,
        bidder: AgentId,
        key: &str,
    ) -> Result<Option<BidRow>, RpcError> {
        let rows: Vec<BidRow> = sql(format!(
            "SELECT {BID_COLUMNS} FROM bids WHERE bidder = $1 AND request_key = $2"
        ))
        .bind::<diesel::sql_types::Uuid, _>(bidder.as_uuid())
        .bind::<Text, _>(key.to_owned())
        .load(conn)
        .await
        .map_err(db_error)?;
        Ok(rows.into_iter().next())
    }

    // ---- place ----

    async fn place_bid(
        &self,
        ctx: RequestContext,
        request: pb::PlaceBidRequest,
    ) -> Result<pb::PlaceBidResponse, RpcError> {
        let bidder = ctx.caller()?;
        let key = IdempotencyId::parse(&request.idempotency_id)?;
        let hash = {
            let mut body = request.clone();
            body.idempotency_id.clear();
            fingerprint(&body)
        };
        let mut conn = self.connection().await?;
        if let Some(existing) = self.bid_by_key(&mut conn, bidder, key.as_str()).await? {
            return self.resume_placement(&ctx, existing, &hash).await;
        }
        let bid = self.validate(bidder, &request).await;
        let bid = match bid {
            Ok(bid) => bid,
            Err(error) => {
                if matches!(
                    error.code,
                    ErrorCode::FailedPrecondition | ErrorCode::NotFound
                ) || error.reason == "below_reserve"
                {
                    self.reject_event(&ctx, bidder, &key, &error).await;
                }
                return Err(error);
            }
        };
        // Written before the escrow is asked for, under a per-bidder lock so the limit on open
        // bids holds under concurrent placements.
        let max_pending = i64::from(self.config.max_pending_bids);
        let inserted = conn
            .transaction::<Result<Option<BidRow>, RpcError>, diesel::result::Error, _>(async |conn| {
                sql("SELECT pg_advisory_xact_lock(hashtextextended($1::text, 1))")
                    .bind::<Text, _>(bidder.to_string())
                    .execute(conn)
                    .await?;
                #[derive(diesel::QueryableByName)]
                struct Count {
                    #[diesel(sql_type = BigInt)]
                    n: i64,
                }
                let open: Vec<Count> = sql(format!(
                    "SELECT count(*) AS n FROM bids WHERE bidder = $1 AND status IN {OPEN_STATUSES}"
                ))
                .bind::<diesel::sql_types::Uuid, _>(bidder.as_uuid())
                .load(conn)
                .await?;
                if open.as_slice().first().map_or(0, |c| c.n) >= max_pending {
                    return Ok(Err(RpcError::failed_precondition(format!(
                        "at most {max_pending} open bids per agent; cancel one or wait for a round"
                    ))
                    .with_reason("too_many_bids")));
                }
                let rows: Vec<BidRow> = sql(format!(
                    "INSERT INTO bids (bidder, beneficiary, cpu_millicores, memory_mib, duration_ms, llm_tokens, \
                     attention_slots, amount_micros, reserve_micros, not_before, expires_at, request_key, request_hash) \
                     VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13) \
                     ON CONFLICT (bidder, request_key) DO NOTHING RETURNING {BID_COLUMNS}"
                ))
                .bind::<diesel::sql_types::Uuid, _>(bidder.as_uuid())
                .bind::<diesel::sql_types::Uuid, _>(bid.beneficiary.as_uuid())
                .bind::<BigInt, _>(bid.bundle.cpu_millicores as i64)
                .bind::<BigInt, _>(bid.bundle.memory_mib as i64)
                .bind::<BigInt, _>(bid.bundle.duration_ms as i64)
                .bind::<BigInt, _>(bid.bundle.llm_tokens as i64)
                .bind::<BigInt, _>(bid.bundle.attention_slots as i64)
                .bind::<BigInt, _>(bid.amount)
                .bind::<BigInt, _>(bid.reserve)
                .bind::<Nullable<Timestamptz>, _>(bid.not_before)
                .bind::<Timestamptz, _>(bid.expires_at)
                .bind::<Text, _>(key.as_str().to_owned())
                .bind::<Bytea, _>(hash.clone())
                .load(conn)
                .await?;
                Ok(Ok(rows.into_iter().next()))
            })
            .await
            .map_err(db_error)?;
        let row = match inserted {
            Ok(Some(row)) => row,
            // A concurrent placement with the same id won the insert: answer as it does.
            Ok(None) => {
                let existing = self
                    .bid_by_key(&mut conn, bidder, key.as_str())
                    .await?
                    .ok_or_else(|| RpcError::internal("a bid vanished"))?;
                return self.resume_placement(&ctx, existing, &hash).await;
            }
            Err(error) => {
                self.reject_event(&ctx, bidder, &key, &error).await;
                return Err(error);
            }
        };
        drop(conn);
        self.escrow(&ctx, row).await
    }

    /// A retry (or a race) of a placement: the first outcome, or the placement finished.
    async fn resume_placement(
        &self,
        ctx: &RequestContext,
        existing: BidRow,
        hash: &[u8],
    ) -> Result<pb::PlaceBidResponse, RpcError> {
        if existing.request_hash != hash {
            return Err(RpcError::conflict(format!(
                "idempotency id {:?} was already used for a different bid",
                existing.request_key
            ))
            .with_reason("idempotency_id_reused"));
        }
        match existing.status.as_str() {
            "placing" => self.escrow(ctx, existing).await,
            "rejected" => {
                let stored = pb::Error::decode(existing.rejection.as_deref().unwrap_or_default())
                    .map_err(|e| RpcError::internal(format!("stored rejection: {e}")))?;
                Err(RpcError::from_proto(stored))
            }
            _ => Ok(pb::PlaceBidResponse {
                bid: Some(existing.to_message()),
            }),
        }
    }

    /// Holds the bid's amount through the economy and makes the bid pending (or rejected).
    async fn escrow(
        &self,
        ctx: &RequestContext,
        row: BidRow,
    ) -> Result<pb::PlaceBidResponse, RpcError> {
        let hold = self
            .economy::<economy::Hold>(&pb::HoldRequest {
                idempotency_id: key(format!("scheduler:bid:{}:hold", row.id)).to_string(),
                op: Some(pb::HoldOp {
                    from: Some(agent_ref(row.bidder())),
                    to: Some(burn_ref()),
                    amount_micros: row.amount_micros,
                    memo: format!("escrow of bid {}", row.id),
                }),
            })
            .await;
        let mut conn = self.connection().await?;
        match hold {
            Ok(response) => {
                let Some(hold_id) = response.hold.map(|h| h.id).filter(|id| *id > 0) else {
                    // Leave the bid placing: a retry (or the sweep before a round) asks again.
                    return Err(RpcError::internal(
                        "the economy answered a hold without its id",
                    ));
                };
                let mut placed = row.clone();
                placed.status = "pending".into();
                placed.hold_id = Some(hold_id);
                let event = self.event(
                    scheduler_events::BID_PLACED,
                    &pb::BidChanged {
                        bid: Some(placed.to_message()),
                    },
                    &ctx.correlation_id,
                    &row.request_key,
                );
                let updated = conn
                    .transaction::<usize, diesel::result::Error, _>(async |conn| {
                        let n = sql("UPDATE bids SET status = 'pending', hold_id = $2 WHERE id = $1 AND status = 'placing'")
                            .bind::<BigInt, _>(row.id)
                            .bind::<BigInt, _>(hold_id)
                            .execute(conn)
                            .await?;
                        if n == 1 {
                            outbox::enqueue(conn, std::slice::from_ref(&event)).await?;
                        }
                        Ok(n)
                    })
                    .await
                    .map_err(db_error)?;
                if updated == 1 {
                    self.outbox.notify_one();
                }
                let current = self.reload(&mut conn, row.id).await?;
                Ok(pb::PlaceBidResponse {
                    bid: Some(current.to_message()),
                })
            }
            // Only a definite refusal means no hold exists; anything else (a reply we could not
            // read, an internal error) leaves the bid placing, to be asked again.
            Err(error)
                if matches!(
                    error.code,
                    ErrorCode::InsufficientFunds
                        | ErrorCode::FailedPrecondition
                        | ErrorCode::NotFound
                        | ErrorCode::InvalidArgument
                        | ErrorCode::Conflict
                        | ErrorCode::Forbidden
                ) =>
            {
                let event = self.event(
                    scheduler_events::BID_REJECTED,
                    &pb::BidRejected {
                        bidder_id: row.bidder().to_string(),
                        idempotency_id: row.request_key.clone(),
                        reason: error.reason.clone(),
                        message: error.message.clone(),
                    },
                    &ctx.correlation_id,
                    &row.request_key,
                );
                let stored = error.to_proto().encode_to_vec();
                conn.transaction::<(), diesel::result::Error, _>(async |conn| {
                    let n = sql(
                        "UPDATE bids SET status = 'rejected', rejection = $2, resolved_at = now() \
                                 WHERE id = $1 AND status = 'placing'",
                    )
                    .bind::<BigInt, _>(row.id)
                    .bind::<Bytea, _>(stored)
                    .execute(conn)
                    .await?;
                    if n == 1 {
                        outbox::enqueue(conn, std::slice::from_ref(&event)).await?;
                    }
                    Ok(())
                })
                .await
                .map_err(db_error)?;
                self.outbox.notify_one();
                Err(error)
            }
            // Unknown outcome: the bid stays `placing`; a retry with the same id finishes it.
            Err(error) => Err(error),
        }
    }

    async fn reload(&self, conn: &mut AsyncPgConnection, id: i64) -> Result<BidRow, RpcError> {
        let rows: Vec<BidRow> = sql(format!("SELECT {BID_COLUMNS} FROM bids WHERE id = $1"))
            .bind::<BigInt, _>(id)
            .load(conn)
            .await
            .map_err(db_error)?;
        rows.into_iter()
            .next()
            .ok_or_else(|| RpcError::internal("a bid vanished"))
    }

    async fn reject_event(
        &self,
        ctx: &RequestContext,
        bidder: AgentId,
        key: &IdempotencyId,
        error: &RpcError,
    ) {
        let event = self.event(
            scheduler_events::BID_REJECTED,
            &pb::BidRejected {
                bidder_id: bidder.to_string(),
                idempotency_id: key.to_string(),
                reason: error.reason.clone(),
                message: error.message.clone(),
            },
            &ctx.correlation_id,
            key.as_str(),
        );
        if let Err(e) = self.enqueue(vec![event]).await {
            tracing::warn!(error = %e, "could not record a bid rejection event");
        }
    }

    /// Checks a placement against the rules; returns what to insert.
    async fn validate(
        &self,
        bidder: AgentId,
        request: &pb::PlaceBidRequest,
    ) -> Result<NewBid, RpcError> {
        let bundle = request
            .bundle
            .ok_or_else(|| invalid("bundle", "missing_field", "bundle is required"))?;
        for (value, field) in [
            (bundle.cpu_millicores, "bundle.cpu_millicores"),
            (bundle.memory_mib, "bundle.memory_mib"),
            (bundle.duration_ms, "bundle.duration_ms"),
        ] {
            if value == 0 {
                return Err(invalid(
                    field,
                    "invalid_bundle",
                    format!("{field} must be positive"),
                ));
            }
        }
        if request.amount_micros <= 0 {
            return Err(invalid(
                "amount_micros",
                "invalid_amount",
                "amount_micros must be positive",
            ));
        }
        let beneficiary = if request.beneficiary_id.is_empty() {
            bidder
        } else {
            AgentId::parse(&request.beneficiary_id, "beneficiary_id")?
        };
        let now = Utc::now();
        let horizon = now + chrono::Duration::milliseconds(self.config.max_bid_lifetime_ms as i64);
        let expires_at = match &request.expires_at {
            Some(t) => time_from(t, "expires_at")?,
            None => {
                now + chrono::Duration::milliseconds(self.config.default_bid_lifetime_ms as i64)
            }
        };
        if expires_at <= now || expires_at > horizon {
            return Err(invalid(
                "expires_at",
                "invalid_time",
                format!(
                    "expires_at must be in the future and at most {} ms ahead",
                    self.config.max_bid_lifetime_ms
                ),
            ));
        }
        let not_before = request
            .not_before
            .as_ref()
            .map(|t| time_from(t, "not_before"))
            .transpose()?;
        if let Some(not_before) = not_before
            && (not_before >= expires_at
                || not_before
                    < now - chrono::Duration::milliseconds(self.config.max_bid_lifetime_ms as i64))
        {
            return Err(invalid(
                "not_before",
                "invalid_time",
                "not_before must be before expires_at (and not long past)",
            ));
        }
        // Within one window's limits: no longer than the longest window, no more of a resource
        // than a round supplies.
        let catalogue = self
            .client
            .call::<market::Catalogue>(&pb::CatalogueRequest {})
            .await?
            .catalogue
            .ok_or_else(|| RpcError::internal("the market sent no catalogue"))?;
        let supply = catalogue.supply.unwrap_or_default();
        for (want, have, field) in [
            (
                bundle.cpu_millicores,
                supply.cpu_millicores,
                "bundle.cpu_millicores",
            ),
            (bundle.memory_mib, supply.memory_mib, "bundle.memory_mib"),
            (bundle.llm_tokens, supply.llm_tokens, "bundle.llm_tokens"),
            (
                bundle.attention_slots,
                supply.attention_slots,
                "bundle.attention_slots",
            ),
            (
                bundle.duration_ms,
                catalogue.max_window_ms,
                "bundle.duration_ms",
            ),
        ] {
            if want > have {
                return Err(invalid(
                    field,
                    "exceeds_window_limit",
                    format!("{field} is {want}; one window allows at most {have}"),
                ));
            }
        }
        let reserve = self
            .client
            .call::<market::Quote>(&pb::QuoteRequest {
                bundle: Some(bundle),
            })
            .await?
            .reserve_micros;
        if request.amount_micros < reserve {
            return Err(RpcError::invalid_argument(format!(
                "the bid of {} µcr is below the bundle's reserve value of {reserve} µcr",
                request.amount_micros
            ))
            .with_reason("below_reserve")
            .with_detail("reserve_micros", reserve));
        }
        // The beneficiary must be a living agent with an open account.
        let account = self
            .client
            .call::<economy::Balance>(&pb::BalanceRequest {
                account: Some(agent_ref(beneficiary)),
            })
            .await
            .map_err(|error| {
                if error.code == ErrorCode::NotFound {
                    RpcError::not_found(format!("no ledger account for beneficiary {beneficiary}"))
                        .with_reason("unknown_beneficiary")
                        .with_detail("field", "beneficiary_id")
                } else {
                    error
                }
            })?
            .account
            .unwrap_or_default();
        if account.status != pb::AccountStatus::Open as i32 {
            return Err(RpcError::failed_precondition(format!(
                "the beneficiary {beneficiary}'s account is closed"
            ))
            .with_reason("beneficiary_closed")
            .with_detail("field", "beneficiary_id"));
        }
        Ok(NewBid {
            beneficiary,
            bundle,
            amount: request.amount_micros,
            reserve,
            not_before,
            expires_at,
        })
    }

    // ---- cancel ----

    async fn cancel_bid(
        &self,
        ctx: RequestContext,
        request: pb::CancelBidRequest,
    ) -> Result<pb::CancelBidResponse, RpcError> {
        let bidder = ctx.caller()?;
        IdempotencyId::parse(&request.idempotency_id)?;
        let mut conn = self.connection().await?;
        let id = request.bid_id;
        let step = conn
            .transaction::<Result<BidRow, RpcError>, diesel::result::Error, _>(async |conn| {
                let rows: Vec<BidRow> = sql(format!(
                    "SELECT {BID_COLUMNS} FROM bids WHERE id = $1 AND bidder = $2 FOR UPDATE"
                ))
                .bind::<BigInt, _>(id)
                .bind::<diesel::sql_types::Uuid, _>(bidder.as_uuid())
                .load(conn)
                .await?;
                // Another agent's bid is as unknown as a missing one.
                let Some(row) = rows.into_iter().next() else {
                    return Ok(Err(RpcError::not_found(format!("you have no bid {id}"))
                        .with_reason("bid_not_found")
                        .with_detail("field", "bid_id")));
                };
                match row.status.as_str() {
                    "pending" => {
                        sql("UPDATE bids SET status = 'cancelling' WHERE id = $1")
                            .bind::<BigInt, _>(id)
                            .execute(conn)
                            .await?;
                        Ok(Ok(row))
                    }
                    "cancelling" | "cancelled" => Ok(Ok(row)),
                    other => Ok(Err(RpcError::failed_precondition(format!(
                        "bid {id} is {other}, not pending"
                    ))
                    .with_reason("bid_not_pending"))),
                }
            })
            .await
            .map_err(db_error)??;
        drop(conn);
        let row = self.finish_cancel(&ctx.correlation_id, step).await?;
        Ok(pb::CancelBidResponse {
            bid: Some(row.to_message()),
        })
    }

    /// Releases a cancelling bid's escrow and marks it cancelled (idempotent).
    async fn finish_cancel(&self, correlation_id: &str, row: BidRow) -> Result<BidRow, RpcError> {
        if row.status == "cancelled" {
            return Ok(row);
        }
        self.economy::<economy::VoidHold>(&pb::VoidHoldRequest {
            idempotency_id: key(format!("scheduler:bid:{}:void", row.id)).to_string(),
            op: Some(pb::VoidHoldOp {
                hold_id: row.hold_id.unwrap_or_default(),
            }),
        })
        .await?;
        let mut conn = self.connection().await?;
        let mut cancelled = row.clone();
        cancelled.status = "cancelled".into();
        let event = self.event(
            scheduler_events::BID_CANCELLED,
            &pb::BidChanged {
                bid: Some(cancelled.to_message()),
            },
            correlation_id,
            &format!("bid/{}", row.id),
        );
        conn.transaction::<(), diesel::result::Error, _>(async |conn| {
            let n = sql("UPDATE bids SET status = 'cancelled', resolved_at = now() WHERE id = $1 AND status = 'cancelling'")
                .bind::<BigInt, _>(row.id)
                .execute(conn)
                .await?;
            if n == 1 {
                outbox::enqueue(conn, std::slice::from_ref(&event)).await?;
            }
            Ok(())
        })
        .await
        .map_err(db_error)?;
        self.outbox.notify_one();
        self.reload(&mut conn, row.id).await
    }

    // ---- list ----

    async fn list_bids(
        &self,
        ctx: RequestContext,
        request: pb::ListBidsRequest,
    ) -> Result<pb::ListBidsResponse, RpcError> {
        let bidder = ctx.caller()?;
        let limit = match request.limit {
            0 => self.config.list_default_limit,
            n => n.min(self.config.list_max_limit),
        };
        let statuses: Vec<String> = match pb::BidStatus::try_from(request.status) {
            Ok(pb::BidStatus::Unspecified) => vec![],
            Ok(pb::BidStatus::Pending) => ["placing", "pending", "cancelling", "settling"]
                .map(String::from)
                .to_vec(),
            Ok(pb::BidStatus::Won) => vec!["won".into()],
            Ok(pb::BidStatus::Cancelled) => vec!["cancelled".into()],
            Ok(pb::BidStatus::Expired) => vec!["expired".into()],
            Err(_) => return Err(invalid("status", "invalid_field", "unknown bid status")),
        };
        let mut conn = self.connection().await?;
        let rows: Vec<BidRow> = sql(format!(
            "SELECT {BID_COLUMNS} FROM bids WHERE bidder = $1 AND status <> 'rejected' \
             AND (cardinality($2::text[]) = 0 OR status::text = ANY($2)) \
             AND ($3 = 0 OR id < $3) ORDER BY id DESC LIMIT $4"
        ))
        .bind::<diesel::sql_types::Uuid, _>(bidder.as_uuid())
        .bind::<Array<Text>, _>(statuses)
        .bind::<BigInt, _>(request.before_id.max(0))
        .bind::<BigInt, _>(i64::from(limit))
        .load(&mut conn)
        .await
        .map_err(db_error)?;
        let next_before_id = if rows.len() == limit as usize {
            rows.last().map_or(0, |r| r.id)
        } else {
            0
        };
        Ok(pb::ListBidsResponse {
            bids: rows.iter().map(BidRow::to_message).collect(),
            next_before_id,
        })
    }

    /// `scheduler.pending_for`: per agent, the bids that would run it (whoever pays), due now
    /// or scheduled for later. Bids being cancelled or past their expiry do not count.
    async fn pending_for(
        &self,
        _ctx: RequestContext,
        request: pb::PendingForRequest,
    ) -> Result<pb::PendingForResponse, RpcError> {
        const MAX_AGENTS: usize = 1000;
        if request.agent_ids.len() > MAX_AGENTS {
            return Err(invalid(
                "agent_ids",
                "too_many",
                format!("at most {MAX_AGENTS} agents per request"),
            ));
        }
        let agents = request
            .agent_ids
            .iter()
            .map(|id| AgentId::parse(id, "agent_ids").map(|a| a.as_uuid()))
            .collect::<Result<Vec<_>, _>>()?;
        #[derive(diesel::QueryableByName)]
        struct Row {
            #[diesel(sql_type = diesel::sql_types::Uuid)]
            beneficiary: uuid::Uuid,
            #[diesel(sql_type = BigInt)]
            due: i64,
            #[diesel(sql_type = BigInt)]
            scheduled: i64,
        }
        let mut conn = self.connection().await?;
        let rows: Vec<Row> = sql("SELECT beneficiary, \
                    count(*) FILTER (WHERE not_before IS NULL OR not_before <= now()) AS due, \
                    count(*) FILTER (WHERE not_before > now()) AS scheduled \
             FROM bids WHERE beneficiary = ANY($1) \
               AND status IN ('placing', 'pending', 'settling') AND expires_at > now() \
             GROUP BY beneficiary")
        .bind::<Array<diesel::sql_types::Uuid>, _>(agents.clone())
        .load(&mut conn)
        .await
        .map_err(db_error)?;
        let counts: HashMap<uuid::Uuid, (i64, i64)> = rows
            .into_iter()
            .map(|r| (r.beneficiary, (r.due, r.scheduled)))
            .collect();
        Ok(pb::PendingForResponse {
            agents: request
                .agent_ids
                .iter()
                .zip(&agents)
                .map(|(id, uuid)| {
                    let (due, scheduled) = counts.get(uuid).copied().unwrap_or_default();
                    pb::PendingFor {
                        agent_id: id.clone(),
                        due: due as u32,
                        scheduled: scheduled as u32,
                    }
                })
                .collect(),
        })
    }

    // ---- clear ----

    async fn clear(
        &self,
        ctx: RequestContext,
        request: pb::ClearRequest,
    ) -> Result<pb::ClearResponse, RpcError> {
        if request.round > i64::MAX as u64 {
            return Err(invalid("round", "invalid_field", "round is too large"));
        }
        let round = request.round as i64;
        let span = tracing::info_span!("scheduler.clear_round", round);
        self.clear_round(ctx, round).instrument(span).await
    }

    async fn clear_round(
        &self,
        ctx: RequestContext,
        round: i64,
    ) -> Result<pb::ClearResponse, RpcError> {
        self.finish_cancellations(&ctx.correlation_id).await;
        self.finish_placements(&ctx).await;
        self.finish_earlier_rounds(&ctx.correlation_id, round).await;
        let row = match self.load_round(round).await? {
            Some(row) => row,
            None => self.plan_round(round).await?,
        };
        let row = self.finish_round(&ctx.correlation_id, row).await?;
        pb::ClearResponse::decode(row.response.as_slice())
            .map_err(|e| RpcError::internal(format!("stored round response: {e}")))
    }

    /// Settles a planned round and reports a settled one. The allocations stand once the round
    /// is settled: if the market cannot be told now, it is told before a later round.
    async fn finish_round(
        &self,
        correlation_id: &str,
        mut row: RoundRow,
    ) -> Result<RoundRow, RpcError> {
        let round = row.round;
        if row.status == "planned" {
            self.settle_round(correlation_id, &row).await?;
            row = self
                .load_round(round)
                .await?
                .ok_or_else(|| RpcError::internal("a round vanished"))?;
        }
        if row.status == "settled" {
            match self.report_round(correlation_id, &row).await {
                Ok(()) => {
                    row = self
                        .load_round(round)
                        .await?
                        .ok_or_else(|| RpcError::internal("a round vanished"))?;
                }
                Err(error) => {
                    tracing::warn!(%error, round, "could not report the round to the market; will retry");
                }
            }
        }
        Ok(row)
    }

    /// Rounds a crash or an unreachable market left unfinished, whatever round is asked for now.
    async fn finish_earlier_rounds(&self, correlation_id: &str, except: i64) {
        let Ok(mut conn) = self.connection().await else {
            return;
        };
        let rows: Vec<RoundRow> = match sql(format!(
            "SELECT {ROUND_COLUMNS} FROM rounds WHERE status IN ('planned', 'settled') AND round <> $1 \
             ORDER BY round LIMIT 10"
        ))
        .bind::<BigInt, _>(except)
        .load(&mut conn)
        .await
        {
            Ok(rows) => rows,
            Err(_) => return,
        };
        drop(conn);
        for row in rows {
            if let Err(error) = self.finish_round(correlation_id, row).await {
                tracing::warn!(%error, "could not finish an earlier round; will retry");
            }
        }
    }

    async fn load_round(&self, round: i64) -> Result<Option<RoundRow>, RpcError> {
        let mut conn = self.connection().await?;
        let rows: Vec<RoundRow> = sql(format!(
            "SELECT {ROUND_COLUMNS} FROM rounds WHERE round = $1"
        ))
        .bind::<BigInt, _>(round)
        .load(&mut conn)
        .await
        .map_err(db_error)?;
        Ok(rows.into_iter().next())
    }

    /// Cancellations a crash left half done: release their escrow and mark them cancelled.
    async fn finish_cancellations(&self, correlation_id: &str) {
        let Ok(mut conn) = self.connection().await else {
            return;
        };
        let rows: Vec<BidRow> = match sql(format!(
            "SELECT {BID_COLUMNS} FROM bids WHERE status = 'cancelling' ORDER BY id LIMIT 1000"
        ))
        .load(&mut conn)
        .await
        {
            Ok(rows) => rows,
            Err(_) => return,
        };
        drop(conn);
        for row in rows {
            if let Err(error) = self.finish_cancel(correlation_id, row).await {
                tracing::warn!(%error, "could not finish a cancellation; will retry");
            }
        }
    }

    /// Placements a crash (or a lost economy reply) left without an answer for over a minute:
    /// ask for their escrow again (the same idempotency id, so at most one hold) and make them
    /// pending or rejected.
    async fn finish_placements(&self, ctx: &RequestContext) {
        let Ok(mut conn) = self.connection().await else {
            return;
        };
        let rows: Vec<BidRow> = match sql(format!(
            "SELECT {BID_COLUMNS} FROM bids WHERE status = 'placing' \
             AND placed_at < now() - interval '1 minute' ORDER BY id LIMIT 1000"
        ))
        .load(&mut conn)
        .await
        {
            Ok(rows) => rows,
            Err(_) => return,
        };
        drop(conn);
        for row in rows {
            if let Err(error) = self.escrow(ctx, row).await
                && error.is_retryable()
            {
                tracing::warn!(%error, "could not finish a placement; will retry");
            }
        }
    }

    /// Chooses the round's winners and writes the plan (once, across replicas).
    async fn plan_round(&self, round: i64) -> Result<RoundRow, RpcError> {
        let catalogue = self
            .client
            .call::<market::Catalogue>(&pb::CatalogueRequest {})
            .await?
            .catalogue
            .ok_or_else(|| RpcError::internal("the market sent no catalogue"))?;
        let supply = catalogue.supply.unwrap_or_default();
        let supply_q = clearing::Quantities::new(
            supply.cpu_millicores,
            supply.memory_mib,
            supply.llm_tokens,
            supply.attention_slots,
        );
        let rules = self.rules;
        let mut conn = self.connection().await?;
        conn.transaction::<RoundRow, diesel::result::Error, _>(async |conn| {
            // One planner at a time across replicas; the second finds the first's plan.
            sql("SELECT pg_advisory_xact_lock(hashtextextended('scheduler.clear', 0))")
                .execute(conn)
                .await?;
            let existing: Vec<RoundRow> = sql(format!(
                "SELECT {ROUND_COLUMNS} FROM rounds WHERE round = $1"
            ))
            .bind::<BigInt, _>(round)
            .load(conn)
            .await?;
            if let Some(existing) = existing.into_iter().next() {
                return Ok(existing);
            }
            #[derive(diesel::QueryableByName)]
            struct Now {
                #[diesel(sql_type = Timestamptz)]
                now: DateTime<Utc>,
            }
            let clock = sql("SELECT now() AS now").load::<Now>(conn).await?[0].now;
            let bids: Vec<BidRow> = sql(format!(
                "SELECT {BID_COLUMNS} FROM bids WHERE status = 'pending' ORDER BY id FOR UPDATE"
            ))
            .load(conn)
            .await?;
            let input: Vec<clearing::Bid> = bids.iter().map(BidRow::to_clearing).collect();
            let result = clearing::clear(&input, supply_q, clock.timestamp_micros(), rules);
            let by_id: HashMap<i64, &BidRow> = bids.iter().map(|b| (b.id, b)).collect();
            let expired: Vec<i64> = result
                .losers
                .iter()
                .filter(|l| matches!(l.reason, LossReason::Expired { .. }))
                .map(|l| l.bid)
                .collect();
            let due =
                result.winners.len() + result.losers.iter().filter(|l| l.rank.is_some()).count();
            let mut ops = Vec::new();
            let mut allocations = Vec::new();
            let mut winners = Vec::new();
            for winner in &result.winners {
                let bid = by_id[&winner.bid];
                let paid = winner.payment as i64;
                ops.push(pb::LedgerOp {
                    op: Some(pb::ledger_op::Op::PostHold(pb::PostHoldOp {
                        hold_id: bid.hold_id.unwrap_or_default(),
                        amount_micros: Some(paid),
                    })),
                });
                allocations.push(pb::Allocation {
                    bid_id: bid.id,
                    agent_id: bid.beneficiary().to_string(),
                    payer_id: bid.bidder().to_string(),
                    bundle: Some(bid.bundle()),
                    paid_micros: paid,
                });
                winners.push(pb::RoundWinner {
                    bundle: Some(bid.bundle()),
                    paid_micros: paid,
                });
            }
            for id in &expired {
                ops.push(pb::LedgerOp {
                    op: Some(pb::ledger_op::Op::VoidHold(pb::VoidHoldOp {
                        hold_id: by_id[id].hold_id.unwrap_or_default(),
                    })),
                });
            }
            let used = pb::Supply {
                cpu_millicores: result.used.0[0],
                memory_mib: result.used.0[1],
                llm_tokens: result.used.0[2],
                attention_slots: result.used.0[3],
            };
            let settlement = (!ops.is_empty()).then(|| {
                pb::BatchRequest {
                    idempotency_id: key(format!("scheduler:round:{round}")).to_string(),
                    ops,
                }
                .encode_to_vec()
            });
            let response = pb::ClearResponse {
                round: round as u64,
                cleared_at: Some(timestamp(clock)),
                allocations,
                bids_due: due as u32,
                expired: expired.len() as u32,
                used: Some(used),
                discovered: None,
            };
            let report = pb::ReportRoundRequest {
                round: round as u64,
                cleared_at: Some(timestamp(clock)),
                bids_due: due as u32,
                supply: Some(supply),
                winners,
            };
            let chosen: Vec<i64> = result
                .winners
                .iter()
                .map(|w| w.bid)
                .chain(expired.iter().copied())
                .collect();
            sql("UPDATE bids SET status = 'settling', round = $2 WHERE id = ANY($1)")
                .bind::<Array<BigInt>, _>(chosen)
                .bind::<BigInt, _>(round)
                .execute(conn)
                .await?;
            let rows: Vec<RoundRow> = sql(format!(
                "INSERT INTO rounds (round, clock, status, settlement, response, report, expired) \
                 VALUES ($1, $2, 'planned', $3, $4, $5, $6) RETURNING {ROUND_COLUMNS}"
            ))
            .bind::<BigInt, _>(round)
            .bind::<Timestamptz, _>(clock)
            .bind::<Nullable<Bytea>, _>(settlement)
            .bind::<Bytea, _>(response.encode_to_vec())
            .bind::<Bytea, _>(report.encode_to_vec())
            .bind::<Array<BigInt>, _>(expired)
            .load(conn)
            .await?;
            Ok(rows.into_iter().next().expect("inserted"))
        })
        .await
        .map_err(db_error)
    }

    /// Posts the winners' escrow to burn for their price and releases the expired, in one
    /// idempotent economy batch; then marks the bids (once, whoever gets there first).
    async fn settle_round(&self, correlation_id: &str, row: &RoundRow) -> Result<(), RpcError> {
        let mut response = pb::ClearResponse::decode(row.response.as_slice())
            .map_err(|e| RpcError::internal(format!("stored round response: {e}")))?;
        let mut report = pb::ReportRoundRequest::decode(row.report.as_slice())
            .map_err(|e| RpcError::internal(format!("stored report: {e}")))?;
        // Bids whose own settlement the economy refused (see below).
        let mut failed: Vec<i64> = Vec::new();
        if let Some(settlement) = &row.settlement {
            let batch = pb::BatchRequest::decode(settlement.as_slice())
                .map_err(|e| RpcError::internal(format!("stored settlement: {e}")))?;
            // The ops are the winners' posts in allocation order, then the expiries' voids.
            let winners = response.allocations.len();
            let bid_of = |i: usize| {
                if i < winners {
                    response.allocations[i].bid_id
                } else {
                    row.expired.get(i - winners).copied().unwrap_or_default()
                }
            };
            // In economy batches of at most SETTLEMENT_CHUNK operations, each idempotent under
            // its own id, side by side (the economy groups them into shared transactions).
            let chunks = batch
                .ops
                .chunks(SETTLEMENT_CHUNK)
                .enumerate()
                .map(|(i, ops)| {
                    let request = pb::BatchRequest {
                        idempotency_id: key(format!("{}:{i}", batch.idempotency_id)).to_string(),
                        ops: ops.to_vec(),
                    };
                    async move { self.economy::<economy::Batch>(&request).await }
                });
            let results = futures::future::join_all(chunks).await;
            for (chunk, result) in results.into_iter().enumerate() {
                let error = match result {
                    Ok(_) => continue,
                    Err(error) if error.is_retryable() => return Err(error),
                    Err(error) => error,
                };
                // A batch is all-or-nothing: one bad operation must not hold the whole round
                // (and every bid in it) hostage. Settle this chunk's operations one by one,
                // each under its own id; a bid whose own operation is refused is left out.
                tracing::error!(%error, round = row.round, chunk, "the economy refused a settlement batch; settling its operations one by one");
                let start = chunk * SETTLEMENT_CHUNK;
                let end = (start + SETTLEMENT_CHUNK).min(batch.ops.len());
                for (offset, op) in batch.ops[start..end].iter().enumerate() {
                    let id = key(format!("{}:{chunk}:{offset}", batch.idempotency_id)).to_string();
                    let result = match &op.op {
                        Some(pb::ledger_op::Op::PostHold(post)) => self
                            .economy::<economy::PostHold>(&pb::PostHoldRequest {
                                idempotency_id: id,
                                op: Some(*post),
                            })
                            .await
                            .map(drop),
                        Some(pb::ledger_op::Op::VoidHold(void)) => self
                            .economy::<economy::VoidHold>(&pb::VoidHoldRequest {
                                idempotency_id: id,
                                op: Some(*void),
                            })
                            .await
                            .map(drop),
                        _ => Ok(()),
                    };
                    match result {
                        Ok(()) => {}
                        Err(error) if error.is_retryable() => return Err(error),
                        Err(error) => {
                            let bid = bid_of(start + offset);
                            tracing::error!(%error, bid, round = row.round, "the economy refused a bid's settlement; the bid is left out of the round");
                            failed.push(bid);
                        }
                    }
                }
            }
        }
        // A winner whose payment was refused did not win: it goes back to pending (its escrow
        // was not taken). An expiry whose release was refused held nothing to release.
        if !failed.is_empty() {
            response.allocations.retain(|a| !failed.contains(&a.bid_id));
            report.winners = response
                .allocations
                .iter()
                .map(|a| pb::RoundWinner {
                    bundle: a.bundle,
                    paid_micros: a.paid_micros,
                })
                .collect();
            let mut used = pb::Supply::default();
            for a in &response.allocations {
                let b = a.bundle.unwrap_or_default();
                used.cpu_millicores += b.cpu_millicores;
                used.memory_mib += b.memory_mib;
                used.llm_tokens += b.llm_tokens;
                used.attention_slots += b.attention_slots;
            }
            response.used = Some(used);
        }
        let won: Vec<i64> = response.allocations.iter().map(|a| a.bid_id).collect();
        let paid: Vec<i64> = response.allocations.iter().map(|a| a.paid_micros).collect();
        let encoded_response = response.encode_to_vec();
        let encoded_report = report.encode_to_vec();
        let round = row.round;
        let expired = row.expired.clone();
        let mut conn = self.connection().await?;
        let settled = conn
            .transaction::<bool, diesel::result::Error, _>(async |conn| {
                let n = sql(
                    "UPDATE rounds SET status = 'settled', response = $2, report = $3 \
                     WHERE round = $1 AND status = 'planned'",
                )
                .bind::<BigInt, _>(round)
                .bind::<Bytea, _>(encoded_response.clone())
                .bind::<Bytea, _>(encoded_report.clone())
                .execute(conn)
                .await?;
                if n == 0 {
                    return Ok(false);
                }
                sql("UPDATE bids SET status = 'pending', round = NULL \
                     WHERE id = ANY($1) AND round = $2 AND NOT (id = ANY($3))")
                .bind::<Array<BigInt>, _>(failed.clone())
                .bind::<BigInt, _>(round)
                .bind::<Array<BigInt>, _>(expired.clone())
                .execute(conn)
                .await?;
                sql(
                    "UPDATE bids b SET status = 'won', paid_micros = x.paid, resolved_at = now() \
                     FROM unnest($1::bigint[], $2::bigint[]) AS x(id, paid) WHERE b.id = x.id",
                )
                .bind::<Array<BigInt>, _>(won.clone())
                .bind::<Array<BigInt>, _>(paid.clone())
                .execute(conn)
                .await?;
                sql("UPDATE bids SET status = 'expired', resolved_at = now() WHERE id = ANY($1)")
                    .bind::<Array<BigInt>, _>(expired.clone())
                    .execute(conn)
                    .await?;
                let changed: Vec<BidRow> = sql(format!(
                    "SELECT {BID_COLUMNS} FROM bids WHERE round = $1 ORDER BY id"
                ))
                .bind::<BigInt, _>(round)
                .load(conn)
                .await?;
                let mut events = Vec::with_capacity(changed.len() + 1);
                for bid in &changed {
                    let subject = if bid.status == "won" {
                        scheduler_events::BID_WON
                    } else {
                        scheduler_events::BID_EXPIRED
                    };
                    events.push(self.event(
                        subject,
                        &pb::BidChanged {
                            bid: Some(bid.to_message()),
                        },
                        correlation_id,
                        &format!("round/{round}"),
                    ));
                }
                outbox::enqueue(conn, &events).await?;
                Ok(true)
            })
            .await
            .map_err(db_error)?;
        if settled {
            self.outbox.notify_one();
        }
        Ok(())
    }

    /// Tells the market about the round and keeps the prices it discovered in the reply.
    async fn report_round(&self, correlation_id: &str, row: &RoundRow) -> Result<(), RpcError> {
        let report = pb::ReportRoundRequest::decode(row.report.as_slice())
            .map_err(|e| RpcError::internal(format!("stored report: {e}")))?;
        let summary = self
            .client
            .call::<market::ReportRound>(&report)
            .await?
            .summary
            .unwrap_or_default();
        let mut response = pb::ClearResponse::decode(row.response.as_slice())
            .map_err(|e| RpcError::internal(format!("stored round response: {e}")))?;
        response.discovered = summary.discovered;
        // The round is complete: announce it with the prices it led to.
        let cleared = self.event(
            scheduler_events::ROUND_CLEARED,
            &pb::RoundCleared {
                round: response.round,
                cleared_at: response.cleared_at,
                bids_due: response.bids_due,
                winners: response.allocations.len() as u32,
                expired: response.expired,
                supply: report.supply,
                used: response.used,
                discovered: response.discovered,
                paid_micros: response.allocations.iter().map(|a| a.paid_micros).sum(),
            },
            correlation_id,
            &format!("round/{}", row.round),
        );
        let encoded = response.encode_to_vec();
        let round = row.round;
        let mut conn = self.connection().await?;
        conn.transaction::<(), diesel::result::Error, _>(async |conn| {
            let n = sql("UPDATE rounds SET status = 'reported', response = $2 WHERE round = $1 AND status = 'settled'")
                .bind::<BigInt, _>(round)
                .bind::<Bytea, _>(encoded)
                .execute(conn)
                .await?;
            if n == 1 {
                outbox::enqueue(conn, std::slice::from_ref(&cleared)).await?;
            }
            Ok(())
        })
        .await
        .map_err(db_error)?;
        self.outbox.notify_one();
        Ok(())
    }
}

/// A validated placement.
struct NewBid {
    beneficiary: AgentId,
    bundle: pb::Bundle,
    amount: i64,
    reserve: i64,
    not_before: Option<DateTime<Utc>>,
    expires_at: DateTime<Utc>,
}
