//! The ledger's rules, as plain functions over an in-memory view of the accounts a request
//! touches. No I/O here: [`crate::store`] loads and locks the view, asks [`Ledger::apply`] what
//! a batch of operations does, and writes the resulting rows. On error nothing is applied.

use std::collections::HashMap;

use syntropism_contracts::{AgentId, Credits, HoldId};

/// Ids of the system accounts (agent accounts start at 1000).
pub const MINT_ID: i64 = 1;
pub const BURN_ID: i64 = 2;

/// Longest memo accepted, in bytes.
pub const MAX_MEMO_BYTES: usize = 1024;

/// An account as the rules see it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum AccountRef {
    Agent(AgentId),
    Mint,
    Burn,
}

/// Where credits can go: another agent, or the burn sink (never the mint).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Payee {
    Agent(AgentId),
    Burn,
}

impl From<Payee> for AccountRef {
    fn from(payee: Payee) -> Self {
        match payee {
            Payee::Agent(agent) => AccountRef::Agent(agent),
            Payee::Burn => AccountRef::Burn,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum MintReason {
    Reward,
    GenesisGrant,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum TransferKind {
    Transfer,
    Mint,
    HoldPost,
    CloseBurn,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum HoldStatus {
    Pending,
    Posted,
    Voided,
}

/// One ledger operation, already checked for shape (positive amounts, no self-transfer, memo
/// size) by [`Op::check_shape`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Op {
    Open {
        agent: AgentId,
    },
    Close {
        agent: AgentId,
        memo: String,
    },
    Transfer {
        from: AgentId,
        to: Payee,
        amount: Credits,
        memo: String,
    },
    Mint {
        to: AgentId,
        amount: Credits,
        reason: MintReason,
        memo: String,
    },
    Hold {
        from: AgentId,
        to: Payee,
        amount: Credits,
        memo: String,
    },
    Post {
        hold: HoldId,
        amount: Option<Credits>,
    },
    Void {
        hold: HoldId,
    },
}

impl Op {
    /// Rules that need no account state.
    pub fn check_shape(&self) -> Result<(), LedgerError> {
        let (memo, amounts, self_pay) = match self {
            Op::Open { .. } | Op::Void { .. } => (None, vec![], false),
            Op::Close { memo, .. } => (Some(memo), vec![], false),
            Op::Transfer {
                from,
                to,
                amount,
                memo,
            }
            | Op::Hold {
                from,
                to,
                amount,
                memo,
            } => (Some(memo), vec![*amount], *to == Payee::Agent(*from)),
            Op::Mint { amount, memo, .. } => (Some(memo), vec![*amount], false),
            Op::Post { amount, .. } => (None, amount.iter().copied().collect(), false),
        };
        if let Some(amount) = amounts.iter().find(|a| !a.is_positive()) {
            return Err(LedgerError::NonPositiveAmount(*amount));
        }
        if self_pay {
            return Err(LedgerError::SelfTransfer);
        }
        if let Some(memo) = memo
            && memo.len() > MAX_MEMO_BYTES
        {
            return Err(LedgerError::MemoTooLong(memo.len()));
        }
        Ok(())
    }

    /// Agents whose accounts this operation reads or changes (holds add their own).
    pub fn agents(&self) -> Vec<AgentId> {
        match self {
            Op::Open { agent } | Op::Close { agent, .. } => vec![*agent],
            Op::Transfer { from, to, .. } | Op::Hold { from, to, .. } => match to {
                Payee::Agent(to) => vec![*from, *to],
                Payee::Burn => vec![*from],
            },
            Op::Mint { to, .. } => vec![*to],
            Op::Post { .. } | Op::Void { .. } => vec![],
        }
    }

    pub fn hold(&self) -> Option<HoldId> {
        match self {
            Op::Post { hold, .. } | Op::Void { hold } => Some(*hold),
            _ => None,
        }
    }

    pub fn touches(&self, account: AccountRef) -> bool {
        match account {
            AccountRef::Mint => matches!(self, Op::Mint { .. }),
            AccountRef::Burn => matches!(
                self,
                Op::Close { .. }
                    | Op::Transfer {
                        to: Payee::Burn,
                        ..
                    }
                    | Op::Hold {
                        to: Payee::Burn,
                        ..
                    }
            ),
            AccountRef::Agent(agent) => self.agents().contains(&agent),
        }
    }
}

/// Why the ledger refuses an operation. Each maps to one stable error code and reason.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LedgerError {
    #[error("amount must be > 0 micro-credits, got {}", .0.micros())]
    NonPositiveAmount(Credits),
    #[error("an account cannot pay itself")]
    SelfTransfer,
    #[error("memo is {0} bytes; at most {MAX_MEMO_BYTES} are allowed")]
    MemoTooLong(usize),
    #[error("no account for agent {0}")]
    AccountNotFound(AgentId),
    #[error("the account of agent {0} is closed")]
    AccountClosed(AgentId),
    #[error("agent {0} already has an account")]
    AccountExists(AgentId),
    #[error("agent {agent} has {} available, needs {}", available, needed)]
    InsufficientFunds {
        agent: AgentId,
        available: Credits,
        needed: Credits,
    },
    #[error("the balance of {0:?} would overflow")]
    Overflow(AccountRef),
    #[error("no hold {0}")]
    HoldNotFound(HoldId),
    #[error("hold {hold} is already {status:?}")]
    HoldNotPending { hold: HoldId, status: HoldStatus },
    #[error("cannot post {} of hold {hold}, which holds only {}", amount, held)]
    PostExceedsHold {
        hold: HoldId,
        amount: Credits,
        held: Credits,
    },
    #[error(
        "agent {agent} still has {} in pending holds; post or void them first",
        pending
    )]
    PendingHolds { agent: AgentId, pending: Credits },
}

/// An error and the position of the operation that caused it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OpError {
    pub index: usize,
    pub error: LedgerError,
}

/// An agent account as loaded (and locked) by the store.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AccountState {
    pub id: i64,
    pub agent: AgentId,
    pub open: bool,
    pub balance: i64,
    pub pending: i64,
    /// False for a row the store inserted for an `Open` in this request that has not been
    /// reached yet: until then the account does not exist for the other operations.
    pub visible: bool,
}

impl AccountState {
    pub fn available(&self) -> i64 {
        self.balance - self.pending
    }
}

/// A hold as loaded (and locked) by the store.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HoldState {
    pub id: HoldId,
    pub from: AgentId,
    pub to: Payee,
    pub amount: Credits,
    pub status: HoldStatus,
}

/// A transfer row to write.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewTransfer {
    pub debit: AccountRef,
    pub credit: AccountRef,
    pub amount: Credits,
    pub kind: TransferKind,
    pub mint_reason: Option<MintReason>,
    pub memo: String,
    pub hold: Option<HoldId>,
}

/// A hold row to write (its id is allocated by the store).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewHold {
    pub from: AgentId,
    pub to: Payee,
    pub amount: Credits,
    pub memo: String,
}

/// A pending hold that becomes posted (with the amount moved) or voided.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Resolution {
    pub hold: HoldId,
    pub status: HoldStatus,
    pub posted: Option<Credits>,
}

/// What each operation produced, by index into the plan's rows.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    Opened(AgentId),
    Closed { agent: AgentId, burn: Option<usize> },
    Transferred(usize),
    Minted(usize),
    HoldPlaced(usize),
    HoldPosted { resolution: usize, transfer: usize },
    HoldVoided { resolution: usize },
}

/// Everything a batch writes, in the order the store must apply it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Plan {
    pub outcomes: Vec<Outcome>,
    pub opened: Vec<AgentId>,
    pub closed: Vec<AgentId>,
    pub transfers: Vec<NewTransfer>,
    pub holds: Vec<NewHold>,
    pub resolutions: Vec<Resolution>,
}

/// The part of the ledger a request can see: its agents' accounts, its holds, and the shard of
/// each system account it was given.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Ledger {
    pub accounts: HashMap<AgentId, AccountState>,
    pub holds: HashMap<HoldId, HoldState>,
    pub mint_balance: i64,
    pub burn_balance: i64,
}

impl Ledger {
    /// Applies `ops` in order, all or nothing: on success the view reflects every operation and
    /// the plan says what to write; on error the view is unchanged.
    pub fn apply(&mut self, ops: &[Op]) -> Result<Plan, OpError> {
        let mut next = self.clone();
        let mut plan = Plan::default();
        for (index, op) in ops.iter().enumerate() {
            next.apply_one(op, &mut plan)
                .map_err(|error| OpError { index, error })?;
        }
        *self = next;
        Ok(plan)
    }

    fn account(&mut self, agent: AgentId) -> Result<&mut AccountState, LedgerError> {
        match self.accounts.get_mut(&agent) {
            Some(account) if account.visible => Ok(account),
            _ => Err(LedgerError::AccountNotFound(agent)),
        }
    }

    fn open_account(&mut self, agent: AgentId) -> Result<&mut AccountState, LedgerError> {
        let account = self.account(agent)?;
        if !account.open {
            return Err(LedgerError::AccountClosed(agent));
        }
        Ok(account)
    }

    /// Checks that `to` can receive `amount` (open, no overflow) without changing anything.
    fn check_credit(&mut self, to: AccountRef, amount: Credits) -> Result<(), LedgerError> {
        let fits = match to {
            AccountRef::Agent(agent) => self
                .open_account(agent)?
                .balance
                .checked_add(amount.micros()),
            AccountRef::Burn => self.burn_balance.checked_add(amount.micros()),
            AccountRef::Mint => None,
        };
        fits.map(|_| ()).ok_or(LedgerError::Overflow(to))
    }

    fn debit_available(&mut self, agent: AgentId, amount: Credits) -> Result<(), LedgerError> {
        let account = self.open_account(agent)?;
        if account.available() < amount.micros() {
            return Err(LedgerError::InsufficientFunds {
                agent,
                available: Credits::from_micros(account.available()),
                needed: amount,
            });
        }
        Ok(())
    }

    /// Moves `amount` between two accounts already checked by the caller.
    fn move_credits(&mut self, debit: AccountRef, credit: AccountRef, amount: i64) {
        for (account, delta) in [(debit, -amount), (credit, amount)] {
            match account {
                AccountRef::Agent(agent) => {
                    if let Some(state) = self.accounts.get_mut(&agent) {
                        state.balance += delta;
                    }
                }
                AccountRef::Mint => self.mint_balance += delta,
                AccountRef::Burn => self.burn_balance += delta,
            }
        }
    }

    fn transfer(&mut self, plan: &mut Plan, row: NewTransfer) -> usize {
        self.move_credits(row.debit, row.credit, row.amount.micros());
        plan.transfers.push(row);
        plan.transfers.len() - 1
    }

    fn apply_one(&mut self, op: &Op, plan: &mut Plan) -> Result<(), LedgerError> {
        op.check_shape()?;
        match op {
            Op::Open { agent } => {
                match self.accounts.get_mut(agent) {
                    Some(account) if !account.visible => account.visible = true,
                    _ => return Err(LedgerError::AccountExists(*agent)),
                }
                plan.opened.push(*agent);
                plan.outcomes.push(Outcome::Opened(*agent));
            }
            Op::Close { agent, memo } => {
                let account = self.open_account(*agent)?;
                if account.pending > 0 {
                    return Err(LedgerError::PendingHolds {
                        agent: *agent,
                        pending: Credits::from_micros(account.pending),
                    });
                }
                let remaining = account.balance;
                let burn = if remaining > 0 {
                    self.check_credit(AccountRef::Burn, Credits::from_micros(remaining))?;
                    Some(self.transfer(
                        plan,
                        NewTransfer {
                            debit: AccountRef::Agent(*agent),
                            credit: AccountRef::Burn,
                            amount: Credits::from_micros(remaining),
                            kind: TransferKind::CloseBurn,
                            mint_reason: None,
                            memo: memo.clone(),
                            hold: None,
                        },
                    ))
                } else {
                    None
                };
                self.open_account(*agent)?.open = false;
                plan.closed.push(*agent);
                plan.outcomes.push(Outcome::Closed {
                    agent: *agent,
                    burn,
                });
            }
            Op::Transfer {
                from,
                to,
                amount,
                memo,
            } => {
                self.debit_available(*from, *amount)?;
                self.check_credit((*to).into(), *amount)?;
                let index = self.transfer(
                    plan,
                    NewTransfer {
                        debit: AccountRef::Agent(*from),
                        credit: (*to).into(),
                        amount: *amount,
                        kind: TransferKind::Transfer,
                        mint_reason: None,
                        memo: memo.clone(),
                        hold: None,
                    },
                );
                plan.outcomes.push(Outcome::Transferred(index));
            }
            Op::Mint {
                to,
                amount,
                reason,
                memo,
            } => {
                self.check_credit(AccountRef::Agent(*to), *amount)?;
                if self.mint_balance.checked_sub(amount.micros()).is_none() {
                    return Err(LedgerError::Overflow(AccountRef::Mint));
                }
                let index = self.transfer(
                    plan,
                    NewTransfer {
                        debit: AccountRef::Mint,
                        credit: AccountRef::Agent(*to),
                        amount: *amount,
                        kind: TransferKind::Mint,
                        mint_reason: Some(*reason),
                        memo: memo.clone(),
                        hold: None,
                    },
                );
                plan.outcomes.push(Outcome::Minted(index));
            }
            Op::Hold {
                from,
                to,
                amount,
                memo,
            } => {
                self.debit_available(*from, *amount)?;
                self.check_credit((*to).into(), *amount)?;
                self.open_account(*from)?.pending += amount.micros();
                plan.holds.push(NewHold {
                    from: *from,
                    to: *to,
                    amount: *amount,
                    memo: memo.clone(),
                });
                plan.outcomes
                    .push(Outcome::HoldPlaced(plan.holds.len() - 1));
            }
            Op::Post { hold, amount } => {
                let state = self.pending_hold(*hold)?;
                let posted = amount.unwrap_or(state.amount);
                if posted > state.amount {
                    return Err(LedgerError::PostExceedsHold {
                        hold: *hold,
                        amount: posted,
                        held: state.amount,
                    });
                }
                self.check_credit(state.to.into(), posted)?;
                self.release(&state);
                let transfer = self.transfer(
                    plan,
                    NewTransfer {
                        debit: AccountRef::Agent(state.from),
                        credit: state.to.into(),
                        amount: posted,
                        kind: TransferKind::HoldPost,
                        mint_reason: None,
                        memo: String::new(),
                        hold: Some(*hold),
                    },
                );
                self.resolve(*hold, HoldStatus::Posted);
                plan.resolutions.push(Resolution {
                    hold: *hold,
                    status: HoldStatus::Posted,
                    posted: Some(posted),
                });
                plan.outcomes.push(Outcome::HoldPosted {
                    resolution: plan.resolutions.len() - 1,
                    transfer,
                });
            }
            Op::Void { hold } => {
                let state = self.pending_hold(*hold)?;
                self.release(&state);
                self.resolve(*hold, HoldStatus::Voided);
                plan.resolutions.push(Resolution {
                    hold: *hold,
                    status: HoldStatus::Voided,
                    posted: None,
                });
                plan.outcomes.push(Outcome::HoldVoided {
                    resolution: plan.resolutions.len() - 1,
                });
            }
        }
        Ok(())
    }

    fn pending_hold(&self, hold: HoldId) -> Result<HoldState, LedgerError> {
        let state = self
            .holds
            .get(&hold)
            .ok_or(LedgerError::HoldNotFound(hold))?;
        if state.status != HoldStatus::Pending {
            return Err(LedgerError::HoldNotPending {
                hold,
                status: state.status,
            });
        }
        Ok(state.clone())
    }

    fn release(&mut self, hold: &HoldState) {
        if let Some(account) = self.accounts.get_mut(&hold.from) {
            account.pending -= hold.amount.micros();
        }
    }

    fn resolve(&mut self, hold: HoldId, status: HoldStatus) {
        if let Some(state) = self.holds.get_mut(&hold) {
            state.status = status;
        }
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    const AGENTS: usize = 4;

    /// A test driver playing the store's part: reserves rows for opens, gives new holds ids.
    #[derive(Debug, Clone)]
    struct Model {
        ledger: Ledger,
        agents: Vec<AgentId>,
        next_id: i64,
    }

    impl Model {
        fn new() -> Self {
            let mut agents: Vec<AgentId> = (0..AGENTS).map(|_| AgentId::random()).collect();
            agents.sort();
            Model {
                ledger: Ledger::default(),
                agents,
                next_id: 1000,
            }
        }

        fn run(&mut self, ops: &[Op]) -> Result<Plan, OpError> {
            let before = self.clone();
            for op in ops {
                if let Op::Open { agent } = op
                    && !self.ledger.accounts.contains_key(agent)
                {
                    self.next_id += 1;
                    self.ledger.accounts.insert(
                        *agent,
                        AccountState {
                            id: self.next_id,
                            agent: *agent,
                            open: true,
                            balance: 0,
                            pending: 0,
                            visible: false,
                        },
                    );
                }
            }
            match self.ledger.apply(ops) {
                Ok(plan) => {
                    for hold in &plan.holds {
                        self.next_id += 1;
                        let id = HoldId::parse(self.next_id).unwrap();
                        self.ledger.holds.insert(
                            id,
                            HoldState {
                                id,
                                from: hold.from,
                                to: hold.to,
                                amount: hold.amount,
                                status: HoldStatus::Pending,
                            },
                        );
                    }
                    Ok(plan)
                }
                Err(error) => {
                    *self = before;
                    Err(error)
                }
            }
        }

        fn check_invariants(&self) {
            let l = &self.ledger;
            let agents: i128 = l
                .accounts
                .values()
                .filter(|a| a.visible)
                .map(|a| i128::from(a.balance))
                .sum();
            assert_eq!(
                agents + i128::from(l.mint_balance) + i128::from(l.burn_balance),
                0,
                "credits are conserved"
            );
            assert!(l.mint_balance <= 0 && l.burn_balance >= 0);
            for account in l.accounts.values() {
                assert!(
                    account.available() >= 0,
                    "available never negative: {account:?}"
                );
                let held: i64 = l
                    .holds
                    .values()
                    .filter(|h| h.from == account.agent && h.status == HoldStatus::Pending)
                    .map(|h| h.amount.micros())
                    .sum();
                assert_eq!(account.pending, held, "pending is the sum of pending holds");
                if !account.open {
                    assert_eq!(
                        (account.balance, account.pending),
                        (0, 0),
                        "closed accounts are empty"
                    );
                }
                assert!(account.visible, "no reserved row survives a request");
            }
        }
    }

    fn amount() -> impl Strategy<Value = Credits> {
        prop_oneof![
            8 => (1i64..=1_000).prop_map(Credits::from_micros),
            1 => Just(Credits::from_micros(0)),
            1 => Just(Credits::from_micros(-7)),
            1 => Just(Credits::from_micros(i64::MAX)),
        ]
    }

    #[derive(Debug, Clone)]
    enum OpSpec {
        Open(usize),
        Close(usize),
        Transfer(usize, Option<usize>, Credits),
        Mint(usize, Credits),
        Hold(usize, Option<usize>, Credits),
        Post(usize, Option<Credits>),
        Void(usize),
    }

    fn op_spec() -> impl Strategy<Value = OpSpec> {
        let agent = 0..AGENTS;
        let payee = proptest::option::weighted(0.8, 0..AGENTS);
        prop_oneof![
            2 => agent.clone().prop_map(OpSpec::Open),
            1 => agent.clone().prop_map(OpSpec::Close),
            4 => (agent.clone(), payee.clone(), amount()).prop_map(|(a, b, c)| OpSpec::Transfer(a, b, c)),
            3 => (agent.clone(), amount()).prop_map(|(a, c)| OpSpec::Mint(a, c)),
            3 => (agent.clone(), payee, amount()).prop_map(|(a, b, c)| OpSpec::Hold(a, b, c)),
            2 => (0usize..12, proptest::option::of(amount())).prop_map(|(h, c)| OpSpec::Post(h, c)),
            2 => (0usize..12).prop_map(OpSpec::Void),
        ]
    }

    fn realise(model: &Model, spec: &OpSpec) -> Op {
        let agent = |i: usize| model.agents[i];
        let payee = |i: Option<usize>| i.map(|i| Payee::Agent(agent(i))).unwrap_or(Payee::Burn);
        // Hold references pick among existing holds, or a missing id.
        let mut holds: Vec<HoldId> = model.ledger.holds.keys().copied().collect();
        holds.sort();
        let hold = |i: usize| {
            holds
                .get(i)
                .copied()
                .unwrap_or(HoldId::parse(999_999).unwrap())
        };
        match spec {
            OpSpec::Open(a) => Op::Open { agent: agent(*a) },
            OpSpec::Close(a) => Op::Close {
                agent: agent(*a),
                memo: String::new(),
            },
            OpSpec::Transfer(a, b, c) => Op::Transfer {
                from: agent(*a),
                to: payee(*b),
                amount: *c,
                memo: String::new(),
            },
            OpSpec::Mint(a, c) => Op::Mint {
                to: agent(*a),
                amount: *c,
                reason: MintReason::Reward,
                memo: String::new(),
            },
            OpSpec::Hold(a, b, c) => Op::Hold {
                from: agent(*a),
                to: payee(*b),
                amount: *c,
                memo: String::new(),
            },
            OpSpec::Post(h, c) => Op::Post {
                hold: hold(*h),
                amount: *c,
            },
            OpSpec::Void(h) => Op::Void { hold: hold(*h) },
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(512))]

        /// Whatever sequence of single operations arrives, the invariants hold after each, and
        /// a refused operation changes nothing.
        #[test]
        fn invariants_hold_after_every_operation(specs in proptest::collection::vec(op_spec(), 1..60)) {
            let mut model = Model::new();
            for spec in &specs {
                let op = realise(&model, spec);
                let before = model.ledger.clone();
                match model.run(std::slice::from_ref(&op)) {
                    Ok(plan) => {
                        prop_assert_eq!(plan.outcomes.len(), 1);
                        prop_assert!(op.check_shape().is_ok());
                        for t in &plan.transfers {
                            prop_assert!(t.amount.is_positive());
                            prop_assert_ne!(t.debit, t.credit);
                            prop_assert_ne!(t.credit, AccountRef::Mint);
                            prop_assert_ne!(t.debit, AccountRef::Burn);
                            prop_assert_eq!(t.debit == AccountRef::Mint, t.kind == TransferKind::Mint);
                        }
                    }
                    Err(error) => {
                        prop_assert_eq!(&model.ledger, &before, "refused {:?} with {:?} but changed the ledger", op, error);
                    }
                }
                model.check_invariants();
            }
        }

        /// A batch is all or nothing, and when it succeeds it equals its operations one by one.
        #[test]
        fn batches_are_atomic_and_sequential(
            setup in proptest::collection::vec(op_spec(), 0..30),
            batch in proptest::collection::vec(op_spec(), 1..12),
        ) {
            let mut model = Model::new();
            for spec in &setup {
                let op = realise(&model, spec);
                let _ = model.run(&[op]);
            }
            let ops: Vec<Op> = batch.iter().map(|s| realise(&model, s)).collect();
            let mut one_by_one = model.clone();
            let sequential: Result<Vec<Plan>, OpError> = ops.iter().map(|op| one_by_one.run(std::slice::from_ref(op))).collect();
            let before = model.ledger.clone();
            match model.run(&ops) {
                Ok(plan) => {
                    prop_assert!(sequential.is_ok(), "batch succeeded where its steps fail");
                    prop_assert_eq!(&model.ledger.accounts, &one_by_one.ledger.accounts);
                    prop_assert_eq!(model.ledger.mint_balance, one_by_one.ledger.mint_balance);
                    prop_assert_eq!(model.ledger.burn_balance, one_by_one.ledger.burn_balance);
                    prop_assert_eq!(plan.outcomes.len(), ops.len());
                }
                Err(error) => {
                    prop_assert!(error.index < ops.len());
                    prop_assert_eq!(&model.ledger, &before, "a failed batch leaves no trace");
                }
            }
            model.check_invariants();
        }
    }

    #[test]
    fn shape_errors_come_before_state() {
        let agent = AgentId::random();
        let op = Op::Transfer {
            from: agent,
            to: Payee::Agent(agent),
            amount: Credits::from_micros(5),
            memo: String::new(),
        };
        assert_eq!(op.check_shape(), Err(LedgerError::SelfTransfer));
        let op = Op::Mint {
            to: agent,
            amount: Credits::from_micros(1),
            reason: MintReason::Reward,
            memo: "x".repeat(MAX_MEMO_BYTES + 1),
        };
        assert_eq!(
            op.check_shape(),
            Err(LedgerError::MemoTooLong(MAX_MEMO_BYTES + 1))
        );
        let op = Op::Post {
            hold: HoldId::parse(1).unwrap(),
            amount: Some(Credits::from_micros(0)),
        };
        assert!(matches!(
            op.check_shape(),
            Err(LedgerError::NonPositiveAmount(_))
        ));
    }

    #[test]
    fn posting_part_of_a_hold_releases_the_rest() {
        let mut model = Model::new();
        let (a, b) = (model.agents[0], model.agents[1]);
        model
            .run(&[Op::Open { agent: a }, Op::Open { agent: b }])
            .unwrap();
        model
            .run(&[Op::Mint {
                to: a,
                amount: Credits::from_micros(100),
                reason: MintReason::GenesisGrant,
                memo: String::new(),
            }])
            .unwrap();
        model
            .run(&[Op::Hold {
                from: a,
                to: Payee::Agent(b),
                amount: Credits::from_micros(60),
                memo: String::new(),
            }])
            .unwrap();
        let hold = *model.ledger.holds.keys().next().unwrap();
        assert_eq!(model.ledger.accounts[&a].available(), 40);
        let too_much = model
            .run(&[Op::Post {
                hold,
                amount: Some(Credits::from_micros(61)),
            }])
            .unwrap_err();
        assert!(matches!(
            too_much.error,
            LedgerError::PostExceedsHold { .. }
        ));
        model
            .run(&[Op::Post {
                hold,
                amount: Some(Credits::from_micros(25)),
            }])
            .unwrap();
        assert_eq!(
            (
                model.ledger.accounts[&a].balance,
                model.ledger.accounts[&a].pending
            ),
            (75, 0)
        );
        assert_eq!(model.ledger.accounts[&b].balance, 25);
        model.check_invariants();
    }
}
