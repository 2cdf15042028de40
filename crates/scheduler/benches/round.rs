//! `just bench-round`: one full clearing round with `BENCH_BIDS` (default 10,000) pending bids
//! through NATS, Postgres and escrow settlement: the economy, the market and the scheduler run
//! in this process on a private nats-server and a fresh database. Prints the placement rate and
//! the round's time (target: the 10k round in ≤ 1 s).

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use rand::{Rng, SeedableRng, rngs::StdRng};
use syntropism_contracts::economy::internal as economy;
use syntropism_contracts::scheduler::{agent, internal};
use syntropism_contracts::{AgentId, RpcClient, pb};
use syntropism_test_support::{Nats, Postgres};
use tokio::sync::Mutex;
use tokio_util::sync::CancellationToken;

const CREDIT: i64 = 1_000_000;
const BIDS_PER_AGENT: usize = 5;
const CONCURRENCY: usize = 64;

fn env(nats: &Nats, pg: &Postgres, role: &str, extra: &[(&str, &str)]) -> Vec<(String, String)> {
    let mut vars = vec![
        ("SYNTROPISM__NATS__URL".to_owned(), nats.url()),
        (
            "SYNTROPISM__DATABASE__URL".to_owned(),
            pg.url_for(role, role),
        ),
        ("SYNTROPISM__DATABASE__ADMIN_URL".to_owned(), pg.admin_url()),
        ("SYNTROPISM__HTTP__ENABLED".to_owned(), "false".to_owned()),
        (
            "SYNTROPISM__TELEMETRY__LOG_FILTER".to_owned(),
            "warn".to_owned(),
        ),
    ];
    vars.extend(extra.iter().map(|(k, v)| (k.to_string(), v.to_string())));
    vars
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

#[tokio::main]
async fn main() {
    let bids: usize = std::env::var("BENCH_BIDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(10_000);
    let nats = Nats::start();
    let pg = Postgres::fresh_database().await;
    let stop = CancellationToken::new();
    let economy_config: syntropism_economy::EconomyConfig = syntropism_platform::config::load_from(
        syntropism_economy::config::SECTION,
        syntropism_economy::config::DEFAULTS,
        None,
        env(&nats, &pg, "economy", &[]),
    )
    .unwrap();
    let services = vec![
        syntropism_economy::start(&economy_config, stop.clone())
            .await
            .unwrap(),
    ];
    // Supply for about a third of the bids.
    let cpu_supply = (bids as u64 * 1_125 / 3).to_string();
    let market_config: syntropism_market::MarketConfig = syntropism_platform::config::load_from(
        syntropism_market::config::SECTION,
        syntropism_market::config::DEFAULTS,
        None,
        env(
            &nats,
            &pg,
            "market",
            &[
                ("SYNTROPISM__MARKET__SUPPLY__CPU_MILLICORES", &cpu_supply),
                ("SYNTROPISM__MARKET__SUPPLY__MEMORY_MIB", "100000000"),
                ("SYNTROPISM__MARKET__SUPPLY__LLM_TOKENS", "100000000"),
            ],
        ),
    )
    .unwrap();
    let mut services = services;
    services.push(
        syntropism_market::start(&market_config, stop.clone())
            .await
            .unwrap(),
    );
    let scheduler_config: syntropism_scheduler::SchedulerConfig =
        syntropism_platform::config::load_from(
            syntropism_scheduler::config::SECTION,
            syntropism_scheduler::config::DEFAULTS,
            None,
            env(&nats, &pg, "scheduler", &[]),
        )
        .unwrap();
    services.push(
        syntropism_scheduler::start(&scheduler_config, stop.clone())
            .await
            .unwrap(),
    );
    let tasks: Vec<_> = services
        .into_iter()
        .map(|s| tokio::spawn(s.run()))
        .collect();
    let client = RpcClient::new(async_nats::connect(nats.url()).await.unwrap())
        .with_timeout(Duration::from_secs(60));

    // Agents, opened and endowed in big batches.
    let agents: Vec<AgentId> = (0..bids.div_ceil(BIDS_PER_AGENT))
        .map(|_| AgentId::random())
        .collect();
    eprintln!("opening and endowing {} agents…", agents.len());
    for (i, chunk) in agents.chunks(2_000).enumerate() {
        let ops = chunk
            .iter()
            .flat_map(|agent| {
                [
                    pb::ledger_op::Op::OpenAccount(pb::OpenAccountOp {
                        agent_id: agent.to_string(),
                    }),
                    pb::ledger_op::Op::Mint(pb::MintOp {
                        agent_id: agent.to_string(),
                        amount_micros: 1_000 * CREDIT,
                        reason: pb::MintReason::GenesisGrant as i32,
                        memo: String::new(),
                    }),
                ]
            })
            .map(|op| pb::LedgerOp { op: Some(op) })
            .collect();
        client
            .call::<economy::Batch>(&pb::BatchRequest {
                idempotency_id: format!("setup-{i}"),
                ops,
            })
            .await
            .unwrap();
    }

    // Bids: random windows; the last tenth expire before the round.
    eprintln!("placing {bids} bids ({CONCURRENCY} at a time)…");
    let plan: Vec<(AgentId, pb::PlaceBidRequest)> = {
        let mut rng = StdRng::seed_from_u64(1);
        (0..bids)
            .map(|i| {
                let bundle = pb::Bundle {
                    cpu_millicores: rng.random_range(250..=2_000),
                    memory_mib: rng.random_range(128..=2_048),
                    duration_ms: rng.random_range(10_000..=120_000),
                    llm_tokens: rng.random_range(0..=5_000),
                    attention_slots: 0,
                };
                (
                    agents[i / BIDS_PER_AGENT],
                    pb::PlaceBidRequest {
                        idempotency_id: format!("bid-{i}"),
                        bundle: Some(bundle),
                        // Set below, from the quote.
                        amount_micros: 0,
                        ..Default::default()
                    },
                )
            })
            .collect()
    };
    let queue = Arc::new(Mutex::new(plan.into_iter().enumerate()));
    let histogram = Arc::new(Mutex::new(
        Histogram::<u64>::new_with_bounds(1, 60_000_000, 3).unwrap(),
    ));
    let expiring = Arc::new(AtomicUsize::new(0));
    let started = Instant::now();
    let workers: Vec<_> = (0..CONCURRENCY)
        .map(|worker| {
            let (queue, histogram, client, expiring) = (
                queue.clone(),
                histogram.clone(),
                client.clone(),
                expiring.clone(),
            );
            tokio::spawn(async move {
                let mut rng = StdRng::seed_from_u64(worker as u64);
                loop {
                    let Some((i, (agent, mut request))) = queue.lock().await.next() else {
                        break;
                    };
                    let reserve = client
                        .call::<syntropism_contracts::market::internal::Quote>(&pb::QuoteRequest {
                            bundle: request.bundle,
                        })
                        .await
                        .unwrap()
                        .reserve_micros;
                    request.amount_micros = reserve + rng.random_range(0..=reserve.max(1) * 2);
                    if i >= bids - bids / 10 {
                        let t = chrono::Utc::now() + chrono::Duration::seconds(2);
                        request.expires_at = Some(prost_types::Timestamp {
                            seconds: t.timestamp(),
                            nanos: t.timestamp_subsec_nanos() as i32,
                        });
                        expiring.fetch_add(1, Ordering::Relaxed);
                    }
                    let t = Instant::now();
                    client
                        .call_as::<agent::PlaceBid>(&agent, &request)
                        .await
                        .expect("placed");
                    histogram
                        .lock()
                        .await
                        .record(t.elapsed().as_micros() as u64)
                        .unwrap();
                }
            })
        })
        .collect();
    for worker in workers {
        worker.await.unwrap();
    }
    let placing = started.elapsed();
    let histogram = histogram.lock().await.clone();
    tokio::time::sleep(Duration::from_millis(2_100)).await;

    eprintln!("clearing…");
    let t = Instant::now();
    let round = client
        .call::<internal::Clear>(&pb::ClearRequest { round: 1 })
        .await
        .unwrap();
    let clearing = t.elapsed();
    let t = Instant::now();
    let again = client
        .call::<internal::Clear>(&pb::ClearRequest { round: 1 })
        .await
        .unwrap();
    let replay = t.elapsed();
    assert_eq!(again, round);
    let audit = client
        .call::<economy::Audit>(&pb::AuditRequest {})
        .await
        .unwrap();
    assert!(audit.ok, "{audit:?}");

    println!("| step | count | time | rate | p50 ms | p99 ms |");
    println!("|---|---:|---:|---:|---:|---:|");
    println!(
        "| place bids (quote + place, {CONCURRENCY} clients) | {bids} | {:.1} s | {:.0} bids/s | {:.2} | {:.2} |",
        placing.as_secs_f64(),
        bids as f64 / placing.as_secs_f64(),
        histogram.value_at_quantile(0.5) as f64 / 1000.0,
        histogram.value_at_quantile(0.99) as f64 / 1000.0,
    );
    println!(
        "| clear round ({} due, {} won, {} expired) | {bids} | {:.0} ms | – | – | – |",
        round.bids_due,
        round.allocations.len(),
        round.expired,
        ms(clearing)
    );
    println!(
        "| clear the same round again (replay) | – | {:.1} ms | – | – | – |",
        ms(replay)
    );
    println!();
    println!(
        "target: a full round with {bids} pending bids in ≤ 1 s: {:.0} ms — {}",
        ms(clearing),
        if clearing <= Duration::from_secs(1) {
            "met"
        } else {
            "NOT MET"
        }
    );
    println!(
        "books after the round: ok, sum {} µcr; {} bids expired by design",
        audit.sum_micros,
        expiring.load(Ordering::Relaxed)
    );
    stop.cancel();
    for task in tasks {
        let _ = task.await;
    }
}
