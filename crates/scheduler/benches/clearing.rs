//! `just bench-clearing`: the pure clearing function on 10k, 100k and 1M random bids over the
//! four resources, under each ordering and payment rule. Prints one table (median and worst of
//! `BENCH_RUNS` runs, default 7) and the target (100k bids cleared in ≤ 50 ms, default rules).

use std::time::{Duration, Instant};

use rand::{Rng, SeedableRng, rngs::StdRng};
use syntropism_scheduler::clearing::{
    Bid, ByAmount, ByDensity, CriticalValue, OrderingRule, PayAsBid, PaymentRule, Quantities,
    Rules, clear,
};

const NOW: i64 = 1_700_000_000_000_000;

/// Random bids over four resources: supply fits roughly one bid in twenty, a tenth of the bids
/// are not due yet and a twentieth have expired.
fn workload(n: usize, seed: u64) -> (Vec<Bid>, Quantities) {
    let mut rng = StdRng::seed_from_u64(seed);
    let bids = (0..n)
        .map(|i| {
            let demand = Quantities::new(
                rng.random_range(100..=2_000),
                rng.random_range(64..=2_048),
                rng.random_range(0..=20_000),
                u64::from(rng.random_bool(0.05)),
            );
            let reserve =
                demand.0[0] * 10 + demand.0[1] * 2 + demand.0[2] / 10 + demand.0[3] * 5_000;
            Bid {
                id: i as i64,
                amount: reserve + rng.random_range(0..=reserve.max(1) * 3),
                reserve,
                demand,
                placed_at: NOW - rng.random_range(0..3_600_000_000),
                not_before: rng.random_bool(0.1).then_some(NOW + 1_000_000),
                expires_at: rng.random_bool(0.05).then_some(NOW - 1),
            }
        })
        .collect();
    // Average demand × n / 20.
    let per = (n as u64 / 20).max(1);
    let supply = Quantities::new(1_050 * per, 1_056 * per, 10_000 * per, (per / 20).max(1));
    (bids, supply)
}

fn main() {
    let runs: usize = std::env::var("BENCH_RUNS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(7);
    let sizes: Vec<usize> = std::env::var("BENCH_BIDS")
        .unwrap_or_else(|_| "10000,100000,1000000".into())
        .split(',')
        .map(|s| {
            s.trim()
                .parse()
                .expect("BENCH_BIDS: comma-separated numbers")
        })
        .collect();
    let orderings: [&dyn OrderingRule; 2] = [&ByAmount, &ByDensity];
    let payments: [&dyn PaymentRule; 2] = [&PayAsBid, &CriticalValue];
    println!("| bids | ordering | payment | winners | median ms | worst ms |");
    println!("|---:|---|---|---:|---:|---:|");
    let mut target = None;
    for &n in &sizes {
        let (bids, supply) = workload(n, n as u64);
        for ordering in orderings {
            for payment in payments {
                let rules = Rules { ordering, payment };
                let mut times: Vec<Duration> = Vec::with_capacity(runs);
                let mut winners = 0;
                for _ in 0..runs {
                    let started = Instant::now();
                    let result = std::hint::black_box(clear(
                        std::hint::black_box(&bids),
                        supply,
                        NOW,
                        rules,
                    ));
                    times.push(started.elapsed());
                    winners = result.winners.len();
                }
                times.sort();
                let ms = |d: Duration| d.as_secs_f64() * 1000.0;
                let median = ms(times[times.len() / 2]);
                println!(
                    "| {n} | {} | {} | {winners} | {median:.2} | {:.2} |",
                    ordering.name(),
                    payment.name(),
                    ms(*times.last().unwrap())
                );
                if n == 100_000 && ordering.name() == "amount" && payment.name() == "pay_as_bid" {
                    target = Some(median);
                }
            }
        }
    }
    if let Some(median) = target {
        println!();
        println!(
            "target: 100k bids cleared in ≤ 50 ms (default rules): {median:.2} ms — {}",
            if median <= 50.0 { "met" } else { "NOT MET" }
        );
    }
}
