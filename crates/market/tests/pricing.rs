//! Properties of reserve values and the price rules.

use proptest::prelude::*;
use syntropism_market::pricing::{
    Bounds, Bundle, Discovery, PriceRule, Prices, RoundOutcome, UtilisationThreshold, Winner,
    discover, rule_named, utilisation_ppm, value_micros, value_nanos,
};

fn bundle() -> impl Strategy<Value = Bundle> {
    (
        0u64..4_000,
        0u64..8_192,
        1u64..600_000,
        0u64..100_000,
        0u64..3,
    )
        .prop_map(
            |(cpu_millicores, memory_mib, duration_ms, tokens, attention_slots)| Bundle {
                cpu_millicores,
                memory_mib,
                duration_ms,
                tokens,
                attention_slots,
            },
        )
}

fn prices(max: u64) -> impl Strategy<Value = Prices> {
    [0..max, 0..max, 0..max, 0..max].prop_map(Prices)
}

proptest! {
    #[test]
    fn a_bundle_value_is_its_nanos_rounded_up_to_micros(b in bundle(), p in prices(1_000_000)) {
        let nanos: u128 = value_nanos(&b, &p).unwrap().iter().sum();
        let micros = value_micros(&b, &p).unwrap() as u128;
        prop_assert!(micros * 1_000 >= nanos);
        prop_assert!(micros * 1_000 < nanos + 1_000);
        // More of anything never costs less.
        let bigger = Bundle { tokens: b.tokens + 1, ..b };
        prop_assert!(value_micros(&bigger, &p).unwrap() >= micros as u64);
    }

    #[test]
    fn huge_bundles_are_refused_not_wrapped(p in prices(u64::MAX / 2)) {
        let huge = Bundle { cpu_millicores: u64::MAX, memory_mib: u64::MAX, duration_ms: u64::MAX, tokens: u64::MAX, attention_slots: u64::MAX };
        if p.0.iter().any(|&x| x > 1_000) {
            prop_assert!(value_micros(&huge, &p).is_err());
        }
    }

    #[test]
    fn winners_paying_k_times_reserve_discover_k_times_reserve(
        bundles in prop::collection::vec(bundle(), 1..20),
        reserve in [1u64..50, 1u64..50, 1u64..50, 1u64..50],
        k in 1u64..5,
    ) {
        // Reserve prices in whole micro-credits per unit, so every value is exact.
        let reserve = Prices(reserve.map(|p| p * 1_000_000));
        let winners: Vec<Winner> = bundles.iter().map(|b| Winner {
            bundle: *b,
            paid_micros: k * value_micros(b, &reserve).unwrap(),
        }).collect();
        let previous = Prices([7, 7, 7, 7]);
        let round = RoundOutcome { winners: &winners, utilisation_ppm: [0; 4] };
        let next = Discovery.next(&previous, &reserve, &round);
        for i in 0..4 {
            let bought = bundles.iter().any(|b| b.milli_units()[i] > 0);
            if bought {
                prop_assert_eq!(next.0[i], k * reserve.0[i], "resource {}", i);
            } else {
                prop_assert_eq!(next.0[i], previous.0[i], "resource {} kept its price", i);
            }
        }
    }

    #[test]
    fn discovered_prices_stay_within_bounds(
        bundles in prop::collection::vec(bundle(), 0..10),
        paid in prop::collection::vec(0u64..1_000_000_000_000, 10),
        reserve in prices(10_000_000),
        previous in prices(10_000_000),
        floor in prices(1_000),
        span in prices(100_000_000),
        utilisation in [0u32..=1_000_000, 0u32..=1_000_000, 0u32..=1_000_000, 0u32..=1_000_000],
    ) {
        let ceiling = Prices(std::array::from_fn(|i| floor.0[i] + span.0[i]));
        let bounds = Bounds { floor, ceiling };
        let winners: Vec<Winner> = bundles.iter().zip(&paid).map(|(b, p)| Winner { bundle: *b, paid_micros: *p }).collect();
        let round = RoundOutcome { winners: &winners, utilisation_ppm: utilisation };
        for name in ["discovery", "utilisation_threshold"] {
            let next = discover(rule_named(name).unwrap(), &previous, &reserve, &bounds, &round);
            for i in 0..4 {
                prop_assert!(next.0[i] >= floor.0[i] && next.0[i] <= ceiling.0[i], "{name}: {i}");
            }
        }
    }

    #[test]
    fn the_threshold_rule_raises_busy_and_lowers_idle_resources(
        previous in prices(1_000_000_000),
        utilisation in [0u32..=1_000_000, 0u32..=1_000_000, 0u32..=1_000_000, 0u32..=1_000_000],
    ) {
        let round = RoundOutcome { winners: &[], utilisation_ppm: utilisation };
        let next = UtilisationThreshold.next(&previous, &previous, &round);
        for (i, used) in utilisation.iter().enumerate() {
            let (before, after) = (previous.0[i] as u128, next.0[i] as u128);
            if *used > 800_000 {
                prop_assert!(after >= before * 110 / 100 && after > before);
            } else if *used < 200_000 {
                prop_assert_eq!(after, before * 95 / 100);
            } else {
                prop_assert_eq!(after, before);
            }
        }
    }
}

#[test]
fn utilisation_is_parts_per_million() {
    assert_eq!(utilisation_ppm(0, 0), 0);
    assert_eq!(utilisation_ppm(1, 4), 250_000);
    assert_eq!(utilisation_ppm(9, 4), 1_000_000);
}

#[test]
fn a_worked_example_of_discovery() {
    // One winner bought 1,000 millicores for 2 s and 100 tokens, and paid 3 credits. At reserve
    // cpu 1 µcr per millicore-second (2,000 µcr) and tokens 10 µcr each (1,000 µcr), cpu is two
    // thirds of the value: it gets 2 credits of the 3 (1,000 µcr per millicore-second), tokens
    // 1 credit (10,000 µcr per token).
    let reserve = Prices([1_000, 0, 10_000, 0]);
    let bundle = Bundle {
        cpu_millicores: 1_000,
        memory_mib: 0,
        duration_ms: 2_000,
        tokens: 100,
        attention_slots: 0,
    };
    assert_eq!(value_micros(&bundle, &reserve).unwrap(), 3_000);
    let winners = [Winner {
        bundle,
        paid_micros: 3_000_000,
    }];
    let round = RoundOutcome {
        winners: &winners,
        utilisation_ppm: [0; 4],
    };
    let next = Discovery.next(&Prices([5, 5, 5, 5]), &reserve, &round);
    assert_eq!(next, Prices([1_000_000, 5, 10_000_000, 5]));
}
