//! Rows as the economy's queries return them.

use chrono::{DateTime, Utc};
use diesel::sql_types::{BigInt, Bool, Bytea, Nullable, Text, Timestamptz};
use uuid::Uuid;

#[derive(diesel::QueryableByName)]
pub(super) struct StoredOutcome {
    #[diesel(sql_type = Bytea)]
    pub(super) request_hash: Vec<u8>,
    #[diesel(sql_type = Bool)]
    pub(super) is_error: bool,
    #[diesel(sql_type = Bytea)]
    pub(super) outcome: Vec<u8>,
}

#[derive(diesel::QueryableByName, Debug)]
pub(super) struct AccountRow {
    #[diesel(sql_type = BigInt)]
    pub(super) id: i64,
    #[diesel(sql_type = Nullable<diesel::sql_types::Uuid>)]
    pub(super) agent_id: Option<Uuid>,
    #[diesel(sql_type = Text)]
    pub(super) status: String,
    #[diesel(sql_type = BigInt)]
    pub(super) balance: i64,
    #[diesel(sql_type = BigInt)]
    pub(super) pending: i64,
    #[diesel(sql_type = Timestamptz)]
    pub(super) opened_at: DateTime<Utc>,
    #[diesel(sql_type = Nullable<Timestamptz>)]
    pub(super) closed_at: Option<DateTime<Utc>>,
}

#[derive(diesel::QueryableByName)]
pub(super) struct HoldRow {
    #[diesel(sql_type = BigInt)]
    pub(super) id: i64,
    #[diesel(sql_type = diesel::sql_types::Uuid)]
    pub(super) debit_agent: Uuid,
    #[diesel(sql_type = Nullable<diesel::sql_types::Uuid>)]
    pub(super) credit_agent: Option<Uuid>,
    #[diesel(sql_type = BigInt)]
    pub(super) amount: i64,
    #[diesel(sql_type = Text)]
    pub(super) status: String,
    #[diesel(sql_type = Nullable<BigInt>)]
    pub(super) posted_amount: Option<i64>,
    #[diesel(sql_type = Text)]
    pub(super) memo: String,
    #[diesel(sql_type = Timestamptz)]
    pub(super) created_at: DateTime<Utc>,
    #[diesel(sql_type = Nullable<Timestamptz>)]
    pub(super) resolved_at: Option<DateTime<Utc>>,
}

#[derive(diesel::QueryableByName)]
pub(super) struct HoldLock {
    #[diesel(sql_type = BigInt)]
    pub(super) id: i64,
    #[diesel(sql_type = Text)]
    pub(super) status: String,
}

/// Ids handed out for a group's new rows, and the transaction's timestamp.
#[derive(diesel::QueryableByName)]
pub(super) struct Allocated {
    #[diesel(sql_type = Timestamptz)]
    pub(super) now: DateTime<Utc>,
    #[diesel(sql_type = diesel::sql_types::Array<BigInt>)]
    pub(super) transfer_ids: Vec<i64>,
    #[diesel(sql_type = diesel::sql_types::Array<BigInt>)]
    pub(super) hold_ids: Vec<i64>,
}

#[derive(diesel::QueryableByName)]
pub(super) struct TransferRow {
    #[diesel(sql_type = BigInt)]
    pub(super) id: i64,
    #[diesel(sql_type = BigInt)]
    pub(super) debit_id: i64,
    #[diesel(sql_type = Nullable<diesel::sql_types::Uuid>)]
    pub(super) debit_agent: Option<Uuid>,
    #[diesel(sql_type = BigInt)]
    pub(super) credit_id: i64,
    #[diesel(sql_type = Nullable<diesel::sql_types::Uuid>)]
    pub(super) credit_agent: Option<Uuid>,
    #[diesel(sql_type = BigInt)]
    pub(super) amount: i64,
    #[diesel(sql_type = Text)]
    pub(super) kind: String,
    #[diesel(sql_type = Nullable<Text>)]
    pub(super) mint_reason: Option<String>,
    #[diesel(sql_type = Text)]
    pub(super) memo: String,
    #[diesel(sql_type = Nullable<BigInt>)]
    pub(super) hold_id: Option<i64>,
    #[diesel(sql_type = Timestamptz)]
    pub(super) created_at: DateTime<Utc>,
}

#[derive(diesel::QueryableByName)]
pub(super) struct AuditRow {
    #[diesel(sql_type = Text)]
    pub(super) sum: String,
    #[diesel(sql_type = Text)]
    pub(super) minted: String,
    #[diesel(sql_type = Text)]
    pub(super) burned: String,
    #[diesel(sql_type = Text)]
    pub(super) agents: String,
    #[diesel(sql_type = Text)]
    pub(super) pending: String,
    #[diesel(sql_type = BigInt)]
    pub(super) open_accounts: i64,
    #[diesel(sql_type = BigInt)]
    pub(super) closed_accounts: i64,
    #[diesel(sql_type = BigInt)]
    pub(super) negative_available: i64,
    #[diesel(sql_type = BigInt)]
    pub(super) closed_not_empty: i64,
    #[diesel(sql_type = BigInt)]
    pub(super) balance_mismatches: i64,
    #[diesel(sql_type = BigInt)]
    pub(super) pending_mismatches: i64,
    #[diesel(sql_type = BigInt)]
    pub(super) transfer_count: i64,
    #[diesel(sql_type = BigInt)]
    pub(super) pending_holds: i64,
}
