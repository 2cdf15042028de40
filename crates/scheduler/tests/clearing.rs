//! Properties of the clearing function (pure: no services needed).

use std::collections::{HashMap, HashSet};

use proptest::prelude::*;
use syntropism_scheduler::clearing::{
    Bid, ByAmount, ByDensity, Clearing, CriticalValue, LossReason, OrderingRule, PayAsBid,
    PaymentRule, Quantities, Resource, Rules, clear,
};

const NOW: i64 = 1_000_000;

fn quantities(max: u64) -> impl Strategy<Value = Quantities> {
    [0..=max, 0..=max, 0..=max, 0..=max / 4].prop_map(|[c, m, t, a]| Quantities::new(c, m, t, a))
}

/// Bids with unique ids; amounts often tie, times often tie, some not due, some expired.
fn bids() -> impl Strategy<Value = Vec<Bid>> {
    prop::collection::vec(
        (
            1u64..50,
            0u64..20,
            quantities(40),
            0i64..5,
            prop::option::weighted(0.2, NOW - 5..NOW + 5),
            prop::option::weighted(0.2, NOW - 5..NOW + 50),
        ),
        0..40,
    )
    .prop_map(|rows| {
        rows.into_iter()
            .enumerate()
            .map(
                |(i, (amount, reserve, demand, placed_at, not_before, expires_at))| Bid {
                    id: i as i64 * 7 % 97,
                    // Every bid is at least its reserve value, as placement guarantees.
                    amount: amount.max(reserve),
                    reserve,
                    demand,
                    placed_at,
                    not_before,
                    expires_at,
                },
            )
            .collect::<Vec<_>>()
    })
    .prop_map(|mut bids| {
        let mut seen = HashSet::new();
        bids.retain(|b| seen.insert(b.id));
        bids
    })
}

fn orderings() -> [&'static dyn OrderingRule; 2] {
    [&ByAmount, &ByDensity]
}

fn payments() -> [&'static dyn PaymentRule; 2] {
    [&PayAsBid, &CriticalValue]
}

fn wins(result: &Clearing, id: i64) -> bool {
    result.winners.iter().any(|w| w.bid == id)
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(400))]

    #[test]
    fn never_exceeds_supply_and_bundles_are_whole(bids in bids(), supply in quantities(120)) {
        for ordering in orderings() {
            for payment in payments() {
                let result = clear(&bids, supply, NOW, Rules { ordering, payment });
                let by_id: HashMap<i64, &Bid> = bids.iter().map(|b| (b.id, b)).collect();
                let mut used = [0u64; 4];
                for winner in &result.winners {
                    // All-or-nothing: a winner gets its whole bundle.
                    for r in Resource::ALL {
                        used[r.index()] += by_id[&winner.bid].demand.get(r);
                    }
                }
                for r in Resource::ALL {
                    prop_assert!(used[r.index()] <= supply.get(r), "{r} over supply");
                }
                prop_assert_eq!(Quantities(used), result.used);
                // Every bid is exactly once a winner or a loser.
                let mut seen: Vec<i64> = result.winners.iter().map(|w| w.bid)
                    .chain(result.losers.iter().map(|l| l.bid)).collect();
                seen.sort();
                let mut ids: Vec<i64> = bids.iter().map(|b| b.id).collect();
                ids.sort();
                prop_assert_eq!(seen, ids);
            }
        }
    }

    #[test]
    fn is_deterministic_whatever_the_input_order(bids in bids(), supply in quantities(120), seed in any::<u64>()) {
        let mut shuffled = bids.clone();
        // A deterministic shuffle from the seed.
        let mut state = seed | 1;
        for i in (1..shuffled.len()).rev() {
            state ^= state << 13; state ^= state >> 7; state ^= state << 17;
            shuffled.swap(i, (state % (i as u64 + 1)) as usize);
        }
        for ordering in orderings() {
            for payment in payments() {
                let rules = Rules { ordering, payment };
                let a = clear(&bids, supply, NOW, rules);
                let b = clear(&bids, supply, NOW, rules);
                prop_assert_eq!(&a, &b);
                let c = clear(&shuffled, supply, NOW, rules);
                prop_assert_eq!(&a.winners, &c.winners);
                let due = |r: &Clearing| r.losers.iter().filter(|l| l.rank.is_some()).copied().collect::<Vec<_>>();
                prop_assert_eq!(due(&a), due(&c));
            }
        }
    }

    #[test]
    fn every_loser_is_explained(bids in bids(), supply in quantities(120)) {
        for ordering in orderings() {
            let result = clear(&bids, supply, NOW, Rules { ordering, payment: &PayAsBid });
            let by_id: HashMap<i64, &Bid> = bids.iter().map(|b| (b.id, b)).collect();
            for loss in &result.losers {
                let bid = by_id[&loss.bid];
                match loss.reason {
                    LossReason::NotDue { not_before } => {
                        prop_assert_eq!(Some(not_before), bid.not_before);
                        prop_assert!(not_before > NOW);
                    }
                    LossReason::Expired { expires_at } => {
                        prop_assert_eq!(Some(expires_at), bid.expires_at);
                        prop_assert!(expires_at <= NOW);
                    }
                    LossReason::DidNotFit { resource, needed, remaining } => {
                        // It did not fit beside the winners ranked above it.
                        let rank = loss.rank.expect("a due loser has a rank");
                        let above: u64 = result.winners.iter().filter(|w| w.rank < rank)
                            .map(|w| by_id[&w.bid].demand.get(resource)).sum();
                        prop_assert_eq!(needed, bid.demand.get(resource));
                        prop_assert_eq!(remaining, supply.get(resource) - above);
                        prop_assert!(needed > remaining);
                    }
                }
            }
            // And no winner was skipped over: a due bid that fits beside those above it wins.
            for winner in &result.winners {
                let bid = by_id[&winner.bid];
                prop_assert!(bid.not_before.is_none_or(|t| t <= NOW));
                prop_assert!(bid.expires_at.is_none_or(|t| t > NOW));
            }
        }
    }

    #[test]
    fn payments_never_exceed_amounts_nor_fall_below_reserve(bids in bids(), supply in quantities(120)) {
        for ordering in orderings() {
            for payment in payments() {
                let result = clear(&bids, supply, NOW, Rules { ordering, payment });
                for winner in &result.winners {
                    let bid = bids.iter().find(|b| b.id == winner.bid).unwrap();
                    prop_assert!(winner.payment <= bid.amount);
                    prop_assert!(winner.payment >= bid.min_amount());
                    if payment.name() == "pay_as_bid" {
                        prop_assert_eq!(winner.payment, bid.amount);
                    }
                }
            }
        }
    }

    #[test]
    fn a_critical_value_winner_wins_at_its_payment_and_loses_just_below(bids in bids(), supply in quantities(120)) {
        for ordering in orderings() {
            let rules = Rules { ordering, payment: &CriticalValue };
            let result = clear(&bids, supply, NOW, rules);
            for winner in &result.winners {
                let with_amount = |amount: u64| {
                    let mut changed = bids.clone();
                    changed.iter_mut().find(|b| b.id == winner.bid).unwrap().amount = amount;
                    clear(&changed, supply, NOW, rules)
                };
                prop_assert!(wins(&with_amount(winner.payment), winner.bid),
                    "bid {} does not win when bidding its payment {}", winner.bid, winner.payment);
                let bid = bids.iter().find(|b| b.id == winner.bid).unwrap();
                if winner.payment > bid.min_amount() {
                    prop_assert!(!wins(&with_amount(winner.payment - 1), winner.bid),
                        "bid {} still wins below its payment {}", winner.bid, winner.payment);
                }
            }
        }
    }
}

#[test]
fn the_default_orders_by_amount_then_placement_then_id() {
    let bid = |id, amount, placed_at| Bid {
        id,
        amount,
        reserve: 1,
        demand: Quantities::new(1, 1, 0, 0),
        placed_at,
        not_before: None,
        expires_at: None,
    };
    let bids = [bid(4, 10, 5), bid(3, 20, 9), bid(2, 10, 5), bid(1, 10, 3)];
    let result = clear(&bids, Quantities::new(3, 3, 0, 0), NOW, Rules::default());
    let order: Vec<i64> = result.winners.iter().map(|w| w.bid).collect();
    assert_eq!(order, vec![3, 1, 2]);
    assert_eq!(result.losers.len(), 1);
    assert_eq!(result.losers[0].bid, 4);
    assert_eq!(
        result.losers[0].reason,
        LossReason::DidNotFit {
            resource: Resource::Cpu,
            needed: 1,
            remaining: 0
        }
    );
}

#[test]
fn density_prefers_the_better_deal_and_critical_value_charges_the_threshold() {
    // Attention: one slot. A bids 100 for a bundle worth 10; B bids 150 for one worth 100.
    let bid = |id, amount, reserve| Bid {
        id,
        amount,
        reserve,
        demand: Quantities::new(0, 0, 0, 1),
        placed_at: 0,
        not_before: None,
        expires_at: None,
    };
    let bids = [bid(1, 100, 10), bid(2, 150, 100)];
    let supply = Quantities::new(0, 0, 0, 1);
    let by_amount = clear(
        &bids,
        supply,
        NOW,
        Rules {
            ordering: &ByAmount,
            payment: &CriticalValue,
        },
    );
    assert_eq!(by_amount.winners[0].bid, 2);
    // B must outbid A's 100 (ties go to the earlier placement, then the lower id: A).
    assert_eq!(by_amount.winners[0].payment, 101);
    let by_density = clear(
        &bids,
        supply,
        NOW,
        Rules {
            ordering: &ByDensity,
            payment: &CriticalValue,
        },
    );
    assert_eq!(by_density.winners[0].bid, 1);
    // A must keep density above B's 1.5: 15 × 10/10 ties at equal density, then amount decides.
    assert_eq!(by_density.winners[0].payment, 16);
}
