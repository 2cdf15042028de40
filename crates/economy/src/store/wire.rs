//! From ledger plans and rows to protobuf: replies, events, account views.

use std::collections::HashMap;

use chrono::{DateTime, Utc};
use syntropism_contracts::events::envelope;
use syntropism_contracts::subjects::{economy_events, services};
use syntropism_contracts::{AgentId, Credits, HoldId, pb};
use syntropism_platform::outbox::PendingEvent;
use uuid::Uuid;

use super::rows::{AccountRow, HoldRow, TransferRow};
use crate::ledger::{
    AccountRef, HoldStatus, Ledger, MINT_ID, MintReason, Outcome, Plan, TransferKind,
};

/// The transaction's timestamp and the ids given to a plan's new rows, in plan order.
#[derive(Debug, Clone)]
pub(super) struct Allocation {
    pub(super) now: DateTime<Utc>,
    pub(super) transfer_ids: Vec<i64>,
    pub(super) hold_ids: Vec<i64>,
}

/// Most items, and most encoded bytes, in one event, so that every event fits a NATS message
/// whatever the items hold (a resolved hold carries its memo, up to 1 KiB).
const MAX_EVENT_ITEMS: usize = 1_000;
const MAX_EVENT_BYTES: usize = 512 * 1024;

const SOURCE: &str = services::ECONOMY;

/// Splits `items` into runs that each fit one event.
fn chunks<T: prost::Message>(items: Vec<T>) -> Vec<Vec<T>> {
    let mut runs = Vec::new();
    let (mut run, mut bytes) = (Vec::new(), 0);
    for item in items {
        // Field tag and length prefix of a repeated message: a few bytes more than the item.
        let size = item.encoded_len() + 8;
        if !run.is_empty() && (run.len() == MAX_EVENT_ITEMS || bytes + size > MAX_EVENT_BYTES) {
            runs.push(std::mem::take(&mut run));
            bytes = 0;
        }
        bytes += size;
        run.push(item);
    }
    if !run.is_empty() {
        runs.push(run);
    }
    runs
}

// ---- Conversions to the wire ----------------------------------------------------------------

pub(super) use syntropism_contracts::time::timestamp;

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

pub(super) fn account_ref_of(id: i64, agent: Option<Uuid>) -> AccountRef {
    match (id, agent) {
        (MINT_ID, _) => AccountRef::Mint,
        (_, Some(agent)) => AccountRef::Agent(AgentId::from_uuid(agent)),
        _ => AccountRef::Burn,
    }
}

pub(super) fn account_pb(
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

pub(super) fn account_from_row(account: AccountRef, row: &AccountRow) -> pb::Account {
    account_pb(
        account,
        row.status == "open",
        row.balance,
        row.pending,
        Some(row.opened_at),
        row.closed_at,
    )
}

pub(super) fn transfer_from_row(row: &TransferRow) -> pb::Transfer {
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

pub(super) fn parse_hold_status(status: &str) -> HoldStatus {
    match status {
        "posted" => HoldStatus::Posted,
        "voided" => HoldStatus::Voided,
        _ => HoldStatus::Pending,
    }
}

pub(super) fn hold_status_name(status: HoldStatus) -> &'static str {
    match status {
        HoldStatus::Pending => "pending",
        HoldStatus::Posted => "posted",
        HoldStatus::Voided => "voided",
    }
}

pub(super) fn hold_status_pb(status: HoldStatus) -> i32 {
    let status = match status {
        HoldStatus::Pending => pb::HoldStatus::Pending,
        HoldStatus::Posted => pb::HoldStatus::Posted,
        HoldStatus::Voided => pb::HoldStatus::Voided,
    };
    status as i32
}

pub(super) fn transfer_kind_name(kind: TransferKind) -> &'static str {
    match kind {
        TransferKind::Transfer => "transfer",
        TransferKind::Mint => "mint",
        TransferKind::HoldPost => "hold_post",
        TransferKind::CloseBurn => "close_burn",
    }
}

pub(super) fn mint_reason_name(reason: MintReason) -> &'static str {
    match reason {
        MintReason::Reward => "reward",
        MintReason::GenesisGrant => "genesis_grant",
    }
}

/// Builds the reply and the events of an applied plan.
pub(super) struct ResponseView<'a> {
    pub(super) plan: &'a Plan,
    pub(super) ledger: &'a Ledger,
    pub(super) rows: &'a HashMap<AgentId, &'a AccountRow>,
    pub(super) holds: &'a [HoldRow],
    pub(super) allocation: &'a Allocation,
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

    /// An account as it was when opened (a later operation in the same request may have
    /// changed it; the event and the reply describe the opening).
    fn opened_account(&self, agent: AgentId) -> pb::Account {
        account_pb(
            AccountRef::Agent(agent),
            true,
            0,
            0,
            Some(self.allocation.now),
            None,
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

    pub(super) fn response(&self) -> pb::BatchResponse {
        let results = self
            .plan
            .outcomes
            .iter()
            .map(|outcome| match outcome {
                Outcome::Opened(agent) => pb::OpResult {
                    account: Some(self.opened_account(*agent)),
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

    pub(super) fn events(&self, correlation_id: &str, causation_id: &str) -> Vec<PendingEvent> {
        let mut events = Vec::new();
        let mut emit = |subject: &str, envelope: pb::EventEnvelope| {
            events.push(PendingEvent {
                subject: subject.to_owned(),
                envelope,
            });
        };
        let plan = self.plan;
        for accounts in chunks(
            plan.opened
                .iter()
                .map(|a| self.opened_account(*a))
                .collect(),
        ) {
            emit(
                economy_events::ACCOUNTS_OPENED,
                envelope(
                    SOURCE,
                    &pb::AccountsOpened { accounts },
                    correlation_id,
                    causation_id,
                ),
            );
        }
        for transfers in chunks(
            (0..plan.transfers.len())
                .map(|i| self.transfer(i))
                .collect(),
        ) {
            emit(
                economy_events::TRANSFERS_POSTED,
                envelope(
                    SOURCE,
                    &pb::TransfersPosted { transfers },
                    correlation_id,
                    causation_id,
                ),
            );
        }
        for holds in chunks((0..plan.holds.len()).map(|i| self.new_hold(i)).collect()) {
            emit(
                economy_events::HOLDS_PLACED,
                envelope(
                    SOURCE,
                    &pb::HoldsPlaced { holds },
                    correlation_id,
                    causation_id,
                ),
            );
        }
        for holds in chunks(
            (0..plan.resolutions.len())
                .map(|i| self.resolved_hold(i))
                .collect(),
        ) {
            emit(
                economy_events::HOLDS_RESOLVED,
                envelope(
                    SOURCE,
                    &pb::HoldsResolved { holds },
                    correlation_id,
                    causation_id,
                ),
            );
        }
        for accounts in chunks(plan.closed.iter().map(|a| self.account(*a)).collect()) {
            emit(
                economy_events::ACCOUNTS_CLOSED,
                envelope(
                    SOURCE,
                    &pb::AccountsClosed { accounts },
                    correlation_id,
                    causation_id,
                ),
            );
        }
        events
    }
}

#[cfg(test)]
mod tests {
    use prost::Message as _;

    use super::*;

    #[test]
    fn events_are_split_by_bytes_as_well_as_by_count() {
        let big = || pb::Hold {
            memo: "x".repeat(100_000),
            ..Default::default()
        };
        let runs = chunks((0..12).map(|_| big()).collect());
        assert!(
            runs.iter().all(
                |run| run.iter().map(|h| h.encoded_len() + 8).sum::<usize>() <= MAX_EVENT_BYTES
            )
        );
        assert_eq!(runs.iter().map(Vec::len).sum::<usize>(), 12);
        let small = chunks((0..2_500).map(|_| pb::Hold::default()).collect());
        assert_eq!(
            small.iter().map(Vec::len).collect::<Vec<_>>(),
            [1_000, 1_000, 500]
        );
        assert!(chunks(Vec::<pb::Hold>::new()).is_empty());
    }
}
