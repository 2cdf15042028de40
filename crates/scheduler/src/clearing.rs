//! The clearing round as a pure, deterministic function (DESIGN.md §4 "Bids and clearing").
//!
//! Bids + supply + rules → allocations, and for every other bid the reason it lost. No I/O, no
//! clock, no randomness: the same input always gives the same result, so a round can be
//! replayed, tested by properties and benchmarked on its own.
//!
//! The walk: take the bids due at `now` (`not_before` reached, not expired), order them by the
//! [`OrderingRule`], and allocate each bundle whole only if every resource in it still fits
//! beside the winners ranked above it. What a winner pays is the [`PaymentRule`]'s: its amount
//! (pay-as-bid) or the least it could have bid and still won (critical value).

use std::cmp::Ordering;
use std::fmt;

/// A resource sold per round.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Resource {
    /// Millicores of concurrent capacity.
    Cpu,
    /// MiB of concurrent capacity.
    Memory,
    /// LLM tokens per round.
    Tokens,
    /// Attention slots per round.
    Attention,
}

impl Resource {
    pub const ALL: [Resource; 4] = [
        Resource::Cpu,
        Resource::Memory,
        Resource::Tokens,
        Resource::Attention,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Resource::Cpu => "cpu",
            Resource::Memory => "memory",
            Resource::Tokens => "tokens",
            Resource::Attention => "attention",
        }
    }

    pub fn index(self) -> usize {
        self as usize
    }
}

impl fmt::Display for Resource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// An amount of each resource, indexed by [`Resource::index`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Hash)]
pub struct Quantities(pub [u64; 4]);

impl Quantities {
    pub fn new(cpu: u64, memory: u64, tokens: u64, attention: u64) -> Self {
        Self([cpu, memory, tokens, attention])
    }

    pub fn get(&self, resource: Resource) -> u64 {
        self.0[resource.index()]
    }

    /// The first resource of `self` that does not fit in `room`.
    pub fn first_misfit(&self, room: &Quantities) -> Option<Resource> {
        Resource::ALL
            .into_iter()
            .find(|r| self.0[r.index()] > room.0[r.index()])
    }

    fn take_from(&self, room: &mut Quantities) {
        for (left, used) in room.0.iter_mut().zip(self.0) {
            *left -= used;
        }
    }
}

/// A pending bid as the clearing sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Bid {
    /// Unique per bid; the last tie-breaker.
    pub id: i64,
    /// Micro-credits held in escrow: the most the bid can pay.
    pub amount: u64,
    /// The bundle's reserve value at placement (µcr): no bid pays less.
    pub reserve: u64,
    /// What the bundle takes from the round's supply.
    pub demand: Quantities,
    /// Placement time (µs since the epoch); earlier wins ties.
    pub placed_at: i64,
    /// Not due before this time (µs since the epoch).
    pub not_before: Option<i64>,
    /// Expired from this time on (µs since the epoch).
    pub expires_at: Option<i64>,
}

impl Bid {
    /// The least a bid may be: its reserve value, and at least one micro-credit.
    pub fn min_amount(&self) -> u64 {
        self.reserve.max(1)
    }
}

/// Why a bid did not win this round.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LossReason {
    /// Its `not_before` is still ahead; it waits for a later round.
    NotDue { not_before: i64 },
    /// It expired; the scheduler releases its escrow.
    Expired { expires_at: i64 },
    /// A resource of its bundle did not fit beside the winners ranked above it.
    DidNotFit {
        resource: Resource,
        needed: u64,
        remaining: u64,
    },
}

/// A winning bid.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Allocation {
    pub bid: i64,
    /// What it pays (µcr), never more than its amount.
    pub payment: u64,
    /// Its place in the round's order (0 = first).
    pub rank: usize,
}

/// A bid that did not win.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Loss {
    pub bid: i64,
    pub reason: LossReason,
    /// Its place in the round's order, for bids that were due.
    pub rank: Option<usize>,
}

/// The result of one round.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Clearing {
    /// In rank order.
    pub winners: Vec<Allocation>,
    /// Due losers in rank order, then bids not due, then expired ones (each in input order).
    pub losers: Vec<Loss>,
    /// What the winners take.
    pub used: Quantities,
    pub supply: Quantities,
}

/// Orders the due bids; the walk allocates in this order.
pub trait OrderingRule: Send + Sync + fmt::Debug {
    fn name(&self) -> &'static str;

    /// `Less` when `a` ranks before `b`. Must be a total order on bids with distinct ids.
    fn compare(&self, a: &Bid, b: &Bid) -> Ordering;

    /// Whether `bid`, had it bid `amount`, would rank before `other`. Must be monotone in
    /// `amount` (bidding more never ranks lower).
    fn ranks_before_with(&self, bid: &Bid, amount: u64, other: &Bid) -> bool {
        let changed = Bid {
            amount,
            ..bid.clone()
        };
        self.compare(&changed, other) == Ordering::Less
    }
}

/// Highest amount first; ties by placement time, then id (the default).
#[derive(Debug, Clone, Copy, Default)]
pub struct ByAmount;

impl OrderingRule for ByAmount {
    fn name(&self) -> &'static str {
        "amount"
    }

    fn compare(&self, a: &Bid, b: &Bid) -> Ordering {
        b.amount
            .cmp(&a.amount)
            .then(a.placed_at.cmp(&b.placed_at))
            .then(a.id.cmp(&b.id))
    }
}

/// Highest bid density (amount ÷ reserve value) first; ties as [`ByAmount`]. A bid with a zero
/// reserve value has infinite density.
#[derive(Debug, Clone, Copy, Default)]
pub struct ByDensity;

impl OrderingRule for ByDensity {
    fn name(&self) -> &'static str {
        "density"
    }

    fn compare(&self, a: &Bid, b: &Bid) -> Ordering {
        // a.amount / a.reserve vs b.amount / b.reserve, exactly, in 128 bits.
        let left = a.amount as u128 * b.reserve as u128;
        let right = b.amount as u128 * a.reserve as u128;
        let density = match (a.reserve, b.reserve) {
            (0, 0) => Ordering::Equal,
            _ => right.cmp(&left),
        };
        density.then_with(|| ByAmount.compare(a, b))
    }
}

/// What the payment rule sees of a round.
#[derive(Debug)]
pub struct PaymentContext<'a> {
    /// The due bids in rank order.
    pub order: &'a [&'a Bid],
    /// Room left before each position in the walk (`room_before[i]` is what the winners
    /// ranked above `order[i]` left).
    pub room_before: &'a [Quantities],
    pub supply: Quantities,
    pub ordering: &'a dyn OrderingRule,
}

/// What a winner pays.
pub trait PaymentRule: Send + Sync + fmt::Debug {
    fn name(&self) -> &'static str;

    /// The payment of the winner at `rank`; at most its amount and at least its minimum.
    fn payment(&self, round: &PaymentContext<'_>, rank: usize) -> u64;
}

/// Winners pay what they bid (the default).
#[derive(Debug, Clone, Copy, Default)]
pub struct PayAsBid;

impl PaymentRule for PayAsBid {
    fn name(&self) -> &'static str {
        "pay_as_bid"
    }

    fn payment(&self, round: &PaymentContext<'_>, rank: usize) -> u64 {
        round.order[rank].amount
    }
}

/// Winners pay the smallest amount with which they would still have won under the same
/// ordering (and never less than their reserve value).
#[derive(Debug, Clone, Copy, Default)]
pub struct CriticalValue;

impl PaymentRule for CriticalValue {
    fn name(&self) -> &'static str {
        "critical_value"
    }

    fn payment(&self, round: &PaymentContext<'_>, rank: usize) -> u64 {
        let bid = round.order[rank];
        // Bidding less moves the bid down the order, past more of the others. The walk of the
        // others alone, up to its position, is the real walk; go on past it until the bid no
        // longer fits in what the others leave: it must rank before that one ("the blocker").
        let mut room = round.room_before[rank];
        let mut blocker = None;
        for other in &round.order[rank + 1..] {
            if other.demand.first_misfit(&room).is_none() {
                other.demand.take_from(&mut room);
                if bid.demand.first_misfit(&room).is_some() {
                    blocker = Some(*other);
                    break;
                }
            }
        }
        let floor = bid.min_amount().min(bid.amount);
        let Some(blocker) = blocker else {
            return floor;
        };
        // The least amount in [floor, bid.amount] that still ranks before the blocker
        // (bid.amount does: the blocker ranked after the bid).
        let (mut low, mut high) = (floor, bid.amount);
        if round.ordering.ranks_before_with(bid, low, blocker) {
            return low;
        }
        // Invariant: `low` does not rank before the blocker, `high` does.
        while high - low > 1 {
            let middle = low + (high - low) / 2;
            if round.ordering.ranks_before_with(bid, middle, blocker) {
                high = middle;
            } else {
                low = middle;
            }
        }
        high
    }
}

/// The rules of a round.
#[derive(Debug, Clone, Copy)]
pub struct Rules<'a> {
    pub ordering: &'a dyn OrderingRule,
    pub payment: &'a dyn PaymentRule,
}

impl Default for Rules<'static> {
    fn default() -> Self {
        Rules {
            ordering: &ByAmount,
            payment: &PayAsBid,
        }
    }
}

/// Clears one round at `now` (µs since the epoch). Bid ids must be unique.
pub fn clear(bids: &[Bid], supply: Quantities, now: i64, rules: Rules<'_>) -> Clearing {
    let mut not_due = Vec::new();
    let mut expired = Vec::new();
    let mut order: Vec<&Bid> = Vec::with_capacity(bids.len());
    for bid in bids {
        match (bid.expires_at, bid.not_before) {
            (Some(expires_at), _) if expires_at <= now => expired.push(Loss {
                bid: bid.id,
                reason: LossReason::Expired { expires_at },
                rank: None,
            }),
            (_, Some(not_before)) if not_before > now => not_due.push(Loss {
                bid: bid.id,
                reason: LossReason::NotDue { not_before },
                rank: None,
            }),
            _ => order.push(bid),
        }
    }
    order.sort_unstable_by(|a, b| rules.ordering.compare(a, b));

    let mut room = supply;
    let mut room_before = Vec::with_capacity(order.len());
    let mut won = Vec::new();
    let mut losers = Vec::with_capacity(order.len() + not_due.len() + expired.len());
    for (rank, bid) in order.iter().enumerate() {
        room_before.push(room);
        match bid.demand.first_misfit(&room) {
            None => {
                bid.demand.take_from(&mut room);
                won.push(rank);
            }
            Some(resource) => losers.push(Loss {
                bid: bid.id,
                reason: LossReason::DidNotFit {
                    resource,
                    needed: bid.demand.get(resource),
                    remaining: room.get(resource),
                },
                rank: Some(rank),
            }),
        }
    }
    let context = PaymentContext {
        order: &order,
        room_before: &room_before,
        supply,
        ordering: rules.ordering,
    };
    let winners = won
        .into_iter()
        .map(|rank| {
            let bid = order[rank];
            let payment = rules
                .payment
                .payment(&context, rank)
                .clamp(bid.min_amount().min(bid.amount), bid.amount);
            Allocation {
                bid: bid.id,
                payment,
                rank,
            }
        })
        .collect();
    losers.extend(not_due);
    losers.extend(expired);
    let mut used = supply;
    for (used, left) in used.0.iter_mut().zip(room.0) {
        *used -= left;
    }
    Clearing {
        winners,
        losers,
        used,
        supply,
    }
}

/// An ordering rule by its configured name.
pub fn ordering_named(name: &str) -> Option<&'static dyn OrderingRule> {
    match name {
        "amount" => Some(&ByAmount),
        "density" => Some(&ByDensity),
        _ => None,
    }
}

/// A payment rule by its configured name.
pub fn payment_named(name: &str) -> Option<&'static dyn PaymentRule> {
    match name {
        "pay_as_bid" => Some(&PayAsBid),
        "critical_value" => Some(&CriticalValue),
        _ => None,
    }
}
