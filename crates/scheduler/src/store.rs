//! Bids and rounds in Postgres (schema `scheduler`).

use chrono::{DateTime, Utc};
use diesel::sql_types::{Array, BigInt, Bytea, Nullable, Text, Timestamptz};
use syntropism_contracts::{AgentId, RpcError, pb};

/// The columns of a bid, as every query selects them.
pub const BID_COLUMNS: &str = "id, bidder, beneficiary, cpu_millicores, memory_mib, duration_ms, \
    llm_tokens, attention_slots, amount_micros, reserve_micros, status::text AS status, placed_at, \
    not_before, expires_at, hold_id, round, paid_micros, resolved_at, rejection, request_key, request_hash";

#[derive(Debug, Clone, diesel::QueryableByName)]
pub struct BidRow {
    #[diesel(sql_type = BigInt)]
    pub id: i64,
    #[diesel(sql_type = diesel::sql_types::Uuid)]
    pub bidder: uuid::Uuid,
    #[diesel(sql_type = diesel::sql_types::Uuid)]
    pub beneficiary: uuid::Uuid,
    #[diesel(sql_type = BigInt)]
    pub cpu_millicores: i64,
    #[diesel(sql_type = BigInt)]
    pub memory_mib: i64,
    #[diesel(sql_type = BigInt)]
    pub duration_ms: i64,
    #[diesel(sql_type = BigInt)]
    pub llm_tokens: i64,
    #[diesel(sql_type = BigInt)]
    pub attention_slots: i64,
    #[diesel(sql_type = BigInt)]
    pub amount_micros: i64,
    #[diesel(sql_type = BigInt)]
    pub reserve_micros: i64,
    #[diesel(sql_type = Text)]
    pub status: String,
    #[diesel(sql_type = Timestamptz)]
    pub placed_at: DateTime<Utc>,
    #[diesel(sql_type = Nullable<Timestamptz>)]
    pub not_before: Option<DateTime<Utc>>,
    #[diesel(sql_type = Timestamptz)]
    pub expires_at: DateTime<Utc>,
    #[diesel(sql_type = Nullable<BigInt>)]
    pub hold_id: Option<i64>,
    #[diesel(sql_type = Nullable<BigInt>)]
    pub round: Option<i64>,
    #[diesel(sql_type = Nullable<BigInt>)]
    pub paid_micros: Option<i64>,
    #[diesel(sql_type = Nullable<Timestamptz>)]
    pub resolved_at: Option<DateTime<Utc>>,
    #[diesel(sql_type = Nullable<Bytea>)]
    pub rejection: Option<Vec<u8>>,
    #[diesel(sql_type = Text)]
    pub request_key: String,
    #[diesel(sql_type = Bytea)]
    pub request_hash: Vec<u8>,
}

#[derive(Debug, Clone, diesel::QueryableByName)]
pub struct RoundRow {
    #[diesel(sql_type = BigInt)]
    pub round: i64,
    #[diesel(sql_type = Timestamptz)]
    pub clock: DateTime<Utc>,
    #[diesel(sql_type = Text)]
    pub status: String,
    #[diesel(sql_type = Nullable<Bytea>)]
    pub settlement: Option<Vec<u8>>,
    #[diesel(sql_type = Bytea)]
    pub response: Vec<u8>,
    #[diesel(sql_type = Bytea)]
    pub report: Vec<u8>,
    #[diesel(sql_type = Array<BigInt>)]
    pub expired: Vec<i64>,
}

pub const ROUND_COLUMNS: &str = "round, clock, status, settlement, response, report, expired";

pub use syntropism_contracts::time::timestamp;

/// A wire timestamp as a time, or a clear error naming `field`.
pub fn time_from(
    t: &prost_types::Timestamp,
    field: &'static str,
) -> Result<DateTime<Utc>, RpcError> {
    u32::try_from(t.nanos)
        .ok()
        .and_then(|nanos| DateTime::from_timestamp(t.seconds, nanos))
        .ok_or_else(|| {
            RpcError::invalid_argument(format!("{field} is not a valid time"))
                .with_reason("invalid_time")
                .with_detail("field", field)
        })
}

pub fn status_from(status: &str) -> pb::BidStatus {
    match status {
        "pending" | "placing" | "cancelling" | "settling" => pb::BidStatus::Pending,
        "won" => pb::BidStatus::Won,
        "cancelled" => pb::BidStatus::Cancelled,
        "expired" => pb::BidStatus::Expired,
        _ => pb::BidStatus::Unspecified,
    }
}

impl BidRow {
    pub fn bundle(&self) -> pb::Bundle {
        pb::Bundle {
            cpu_millicores: self.cpu_millicores as u64,
            memory_mib: self.memory_mib as u64,
            duration_ms: self.duration_ms as u64,
            llm_tokens: self.llm_tokens as u64,
            attention_slots: self.attention_slots as u64,
        }
    }

    pub fn bidder(&self) -> AgentId {
        AgentId::from_uuid(self.bidder)
    }

    pub fn beneficiary(&self) -> AgentId {
        AgentId::from_uuid(self.beneficiary)
    }

    pub fn to_message(&self) -> pb::Bid {
        pb::Bid {
            id: self.id,
            bidder_id: self.bidder().to_string(),
            beneficiary_id: self.beneficiary().to_string(),
            bundle: Some(self.bundle()),
            amount_micros: self.amount_micros,
            reserve_micros: self.reserve_micros,
            status: status_from(&self.status) as i32,
            placed_at: Some(timestamp(self.placed_at)),
            not_before: self.not_before.map(timestamp),
            expires_at: Some(timestamp(self.expires_at)),
            hold_id: self.hold_id.unwrap_or_default(),
            round: self.round.unwrap_or_default().max(0) as u64,
            paid_micros: self.paid_micros.unwrap_or_default(),
            resolved_at: self.resolved_at.map(timestamp),
        }
    }

    /// The bid as the clearing function sees it (times in µs since the epoch).
    pub fn to_clearing(&self) -> crate::clearing::Bid {
        crate::clearing::Bid {
            id: self.id,
            amount: self.amount_micros as u64,
            reserve: self.reserve_micros as u64,
            demand: crate::clearing::Quantities::new(
                self.cpu_millicores as u64,
                self.memory_mib as u64,
                self.llm_tokens as u64,
                self.attention_slots as u64,
            ),
            placed_at: self.placed_at.timestamp_micros(),
            not_before: self.not_before.map(|t| t.timestamp_micros()),
            expires_at: Some(self.expires_at.timestamp_micros()),
        }
    }
}
