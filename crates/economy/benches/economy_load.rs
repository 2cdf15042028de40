//! `just bench-economy`: load on a real economy service (release build, its own process), with
//! pgbench's simple-update workload on the same Postgres in the same run for scale.
//!
//! Prints one table: single-transfer requests at 1, 8 and 64 concurrent clients (throughput,
//! p50, p99), batched transfers (1,000 per request), and pgbench TPS at the same client counts,
//! then the ratios against the targets (batched transfers/s ≥ 5× pgbench TPS; single-transfer
//! p99 ≤ 5 ms at 8 clients). Set `BENCH_SECONDS` (default 10) for the length of each step and
//! `BENCH_WARMUP_SECONDS` (default 10) for the unmeasured load that runs first.

use std::process::Stdio;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use rand::Rng;
use syntropism_contracts::economy::internal;
use syntropism_contracts::{AgentId, RpcClient, pb};
use syntropism_test_support::{Nats, Postgres, http_get};
use tokio::sync::Mutex;

/// Client counts, overridable with `BENCH_SINGLE_CLIENTS` / `BENCH_BATCH_CLIENTS` ("1,8,64").
const SINGLE_CLIENTS: &str = "1,8,64";
const BATCH_CLIENTS: &str = "1,8";

fn clients_from_env(name: &str, default: &str) -> Vec<usize> {
    std::env::var(name)
        .unwrap_or_else(|_| default.into())
        .split(',')
        .filter(|s| !s.trim().is_empty())
        .map(|s| {
            s.trim()
                .parse()
                .unwrap_or_else(|_| panic!("{name}: {s:?} is not a number"))
        })
        .collect()
}
const BATCH_SIZE: usize = 1_000;
const AGENTS: usize = 10_000;
const CONNECTIONS: usize = 4;

struct Row {
    /// Mean mutations per database transaction, and mean time per transaction, in this step.
    grouping: Option<(f64, f64)>,
    workload: String,
    clients: usize,
    per_second: f64,
    unit: &'static str,
    p50_ms: Option<f64>,
    p99_ms: Option<f64>,
}

fn agent_ref(agent: AgentId) -> pb::AccountRef {
    pb::AccountRef {
        account: Some(pb::account_ref::Account::AgentId(agent.to_string())),
    }
}

fn transfer_op(from: AgentId, to: AgentId) -> pb::TransferOp {
    pb::TransferOp {
        from: Some(agent_ref(from)),
        to: Some(agent_ref(to)),
        amount_micros: 1,
        memo: String::new(),
    }
}

fn random_pair(agents: &[AgentId]) -> (AgentId, AgentId) {
    let mut rng = rand::rng();
    let a = rng.random_range(0..agents.len());
    let b = (a + rng.random_range(1..agents.len())) % agents.len();
    (agents[a], agents[b])
}

async fn setup(client: &RpcClient) -> Vec<AgentId> {
    let agents: Vec<AgentId> = (0..AGENTS).map(|_| AgentId::random()).collect();
    for (n, chunk) in agents.chunks(BATCH_SIZE / 2).enumerate() {
        let ops = chunk
            .iter()
            .flat_map(|agent| {
                [
                    pb::LedgerOp {
                        op: Some(pb::ledger_op::Op::OpenAccount(pb::OpenAccountOp {
                            agent_id: agent.to_string(),
                        })),
                    },
                    pb::LedgerOp {
                        op: Some(pb::ledger_op::Op::Mint(pb::MintOp {
                            agent_id: agent.to_string(),
                            amount_micros: 1_000_000_000_000,
                            reason: pb::MintReason::GenesisGrant as i32,
                            memo: String::new(),
                        })),
                    },
                ]
            })
            .collect();
        client
            .call::<internal::Batch>(&pb::BatchRequest {
                idempotency_id: format!("setup-{n}"),
                ops,
            })
            .await
            .expect("setup batch");
    }
    agents
}

/// Runs `clients` loops for `seconds`; each iteration is one request of `ops` ledger operations.
async fn drive<F, Fut>(
    clients: &[RpcClient],
    concurrency: usize,
    seconds: u64,
    ops: u64,
    request: F,
) -> (f64, Histogram<u64>)
where
    F: Fn(RpcClient, String) -> Fut + Send + Sync + Clone + 'static,
    Fut: Future<Output = ()> + Send,
{
    let histogram = Arc::new(Mutex::new(
        Histogram::<u64>::new_with_bounds(1, 60_000_000, 3).unwrap(),
    ));
    let count = Arc::new(AtomicU64::new(0));
    let deadline = Instant::now() + Duration::from_secs(seconds);
    let started = Instant::now();
    let tasks: Vec<_> = (0..concurrency)
        .map(|worker| {
            let (client, histogram, count, request) = (
                clients[worker % clients.len()].clone(),
                histogram.clone(),
                count.clone(),
                request.clone(),
            );
            tokio::spawn(async move {
                let mut local = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3).unwrap();
                let mut i = 0u64;
                while Instant::now() < deadline {
                    let key = format!(
                        "w{concurrency}-{worker}-{i}-{}",
                        uuid::Uuid::now_v7().simple()
                    );
                    let begun = Instant::now();
                    request(client.clone(), key).await;
                    local.record(begun.elapsed().as_micros() as u64).unwrap();
                    i += 1;
                }
                count.fetch_add(i, Ordering::Relaxed);
                histogram.lock().await.add(local).unwrap();
            })
        })
        .collect();
    for task in tasks {
        task.await.unwrap();
    }
    let elapsed = started.elapsed().as_secs_f64();
    let done = count.load(Ordering::Relaxed) * ops;
    let histogram = Arc::try_unwrap(histogram).unwrap().into_inner();
    (done as f64 / elapsed, histogram)
}

/// Sum and count of a summary metric from the service's `/metrics`.
async fn scrape(address: std::net::SocketAddr, metric: &str) -> (f64, f64) {
    let text = http_get(address, "/metrics")
        .await
        .map(|(_, body)| body)
        .unwrap_or_default();
    let value = |suffix: &str| {
        text.lines()
            .find_map(|line| line.strip_prefix(&format!("{metric}_{suffix} ")))
            .and_then(|v| v.trim().parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    (value("sum"), value("count"))
}

/// Mean group size and mean group commit time (ms) since `before`.
async fn grouping_since(
    address: std::net::SocketAddr,
    before: &mut [(f64, f64); 2],
) -> Option<(f64, f64)> {
    let size = scrape(address, "syntropism_economy_group_size").await;
    let time = scrape(address, "syntropism_economy_commit_seconds").await;
    let groups = size.1 - before[0].1;
    let result = (groups > 0.0).then(|| {
        (
            (size.0 - before[0].0) / groups,
            (time.0 - before[1].0) / (time.1 - before[1].1) * 1000.0,
        )
    });
    *before = [size, time];
    result
}

fn pgbench_binary() -> String {
    for candidate in ["/usr/lib/postgresql/15/bin/pgbench", "/usr/bin/pgbench"] {
        if std::path::Path::new(candidate).exists() {
            return candidate.into();
        }
    }
    "pgbench".into()
}

fn pgbench(url: &str, clients: usize, seconds: u64) -> (f64, f64) {
    let output = std::process::Command::new(pgbench_binary())
        .args(["-N", "-M", "prepared", "-n"])
        .args([
            "-c",
            &clients.to_string(),
            "-j",
            &clients.min(4).to_string(),
            "-T",
            &seconds.to_string(),
        ])
        .arg(url)
        .output()
        .expect("pgbench runs (scripts/setup.sh installs it)");
    let text = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "pgbench failed: {text}{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let number_after = |prefix: &str| {
        text.lines()
            .find_map(|line| line.trim().strip_prefix(prefix))
            .and_then(|rest| rest.split_whitespace().next())
            .and_then(|n| n.parse::<f64>().ok())
            .unwrap_or_else(|| panic!("no {prefix:?} in pgbench output:\n{text}"))
    };
    (number_after("tps = "), number_after("latency average = "))
}

fn peak_rss_mib(pid: u32) -> Option<f64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kib: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib / 1024.0)
}

#[tokio::main]
async fn main() {
    let seconds: u64 = std::env::var("BENCH_SECONDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(10);
    let warmup: u64 = std::env::var("BENCH_WARMUP_SECONDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(10);
    let single_clients = clients_from_env("BENCH_SINGLE_CLIENTS", SINGLE_CLIENTS);
    let batch_clients = clients_from_env("BENCH_BATCH_CLIENTS", BATCH_CLIENTS);
    let nats = Nats::start();
    let pg = Postgres::fresh_database().await;
    let metrics_address = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let mut service = tokio::process::Command::new(env!("CARGO_BIN_EXE_economy"))
        .env("SYNTROPISM__NATS__URL", nats.url())
        .env(
            "SYNTROPISM__DATABASE__URL",
            pg.url_for("economy", "economy"),
        )
        .env("SYNTROPISM__DATABASE__ADMIN_URL", pg.admin_url())
        .env("SYNTROPISM__HTTP__LISTEN", metrics_address.to_string())
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .expect("economy starts");
    let mut clients = Vec::new();
    for _ in 0..CONNECTIONS {
        let nats = async_nats::connect(nats.url()).await.unwrap();
        clients.push(RpcClient::new(nats).with_timeout(Duration::from_secs(30)));
    }
    let mut ready = false;
    for _ in 0..200 {
        if clients[0]
            .call::<internal::Audit>(&pb::AuditRequest {})
            .await
            .is_ok()
        {
            ready = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(ready, "economy did not come up");
    eprintln!("setting up {AGENTS} funded accounts…");
    let agents = Arc::new(setup(&clients[0]).await);
    let mut rows = Vec::new();
    let mut counters = [(0.0, 0.0); 2];
    grouping_since(metrics_address, &mut counters).await;

    let single = {
        let agents = agents.clone();
        move |client: RpcClient, key: String| {
            let (from, to) = random_pair(&agents);
            async move {
                client
                    .call::<internal::Transfer>(&pb::TransferRequest {
                        idempotency_id: key,
                        op: Some(transfer_op(from, to)),
                    })
                    .await
                    .expect("transfer");
            }
        }
    };
    // Steady state, not a cold start: a fresh database first extends its files, gathers its
    // statistics and runs its first autovacuum, which otherwise lands in the first steps.
    if warmup > 0 {
        eprintln!("warming up: single transfers, 8 clients, {warmup} s…");
        drive(&clients, 8, warmup, 1, single.clone()).await;
    }
    grouping_since(metrics_address, &mut counters).await;
    for &concurrency in &single_clients {
        eprintln!("single transfers, {concurrency} clients, {seconds} s…");
        let (rate, histogram) = drive(&clients, concurrency, seconds, 1, single.clone()).await;
        rows.push(Row {
            grouping: grouping_since(metrics_address, &mut counters).await,
            workload: "economy: single transfer".into(),
            clients: concurrency,
            per_second: rate,
            unit: "transfers/s",
            p50_ms: Some(histogram.value_at_quantile(0.5) as f64 / 1000.0),
            p99_ms: Some(histogram.value_at_quantile(0.99) as f64 / 1000.0),
        });
    }
    for &concurrency in &batch_clients {
        eprintln!("batches of {BATCH_SIZE}, {concurrency} clients, {seconds} s…");
        let agents = agents.clone();
        let (rate, histogram) = drive(
            &clients,
            concurrency,
            seconds,
            BATCH_SIZE as u64,
            move |client, key| {
                let ops = (0..BATCH_SIZE)
                    .map(|_| {
                        let (from, to) = random_pair(&agents);
                        pb::LedgerOp {
                            op: Some(pb::ledger_op::Op::Transfer(transfer_op(from, to))),
                        }
                    })
                    .collect();
                async move {
                    client
                        .call::<internal::Batch>(&pb::BatchRequest {
                            idempotency_id: key,
                            ops,
                        })
                        .await
                        .expect("batch");
                }
            },
        )
        .await;
        rows.push(Row {
            grouping: None,
            workload: format!("economy: batch of {BATCH_SIZE} transfers"),
            clients: concurrency,
            per_second: rate,
            unit: "transfers/s",
            p50_ms: Some(histogram.value_at_quantile(0.5) as f64 / 1000.0),
            p99_ms: Some(histogram.value_at_quantile(0.99) as f64 / 1000.0),
        });
    }
    let audit = clients[0]
        .call::<internal::Audit>(&pb::AuditRequest {})
        .await
        .expect("audit");
    assert!(
        audit.ok && audit.sum_micros == 0,
        "books after the run: {:?}",
        audit.violations
    );
    let rss = service.id().and_then(peak_rss_mib);

    eprintln!("pgbench -i on a separate database of the same server…");
    let pgbench_db = Postgres::fresh_database().await;
    let init = std::process::Command::new(pgbench_binary())
        .args(["-i", "-s", "10", "-q"])
        .arg(pgbench_db.admin_url())
        .output()
        .expect("pgbench -i");
    assert!(
        init.status.success(),
        "{}",
        String::from_utf8_lossy(&init.stderr)
    );
    let mut pgbench_tps = Vec::new();
    for &concurrency in &single_clients {
        eprintln!("pgbench simple-update, {concurrency} clients, {seconds} s…");
        let (tps, latency_ms) = pgbench(&pgbench_db.admin_url(), concurrency, seconds);
        pgbench_tps.push((concurrency, tps));
        rows.push(Row {
            grouping: None,
            workload: "pgbench -N (simple-update)".into(),
            clients: concurrency,
            per_second: tps,
            unit: "tps",
            p50_ms: None,
            p99_ms: None,
        });
        eprintln!("  average latency {latency_ms} ms");
    }
    service.start_kill().ok();

    println!();
    println!("| workload | clients | throughput | p50 ms | p99 ms | per transaction |");
    println!("|---|---:|---:|---:|---:|---|");
    let ms = |v: Option<f64>| v.map(|v| format!("{v:.2}")).unwrap_or_else(|| "–".into());
    for row in &rows {
        let grouping = match row.grouping {
            Some((size, ms)) => format!("{size:.1} requests, {ms:.2} ms"),
            None => "–".into(),
        };
        println!(
            "| {} | {} | {:.0} {} | {} | {} | {} |",
            row.workload,
            row.clients,
            row.per_second,
            row.unit,
            ms(row.p50_ms),
            ms(row.p99_ms),
            grouping
        );
    }
    println!();
    let tps_at = |c: usize| {
        pgbench_tps
            .iter()
            .find(|(n, _)| *n == c)
            .map(|(_, t)| *t)
            .unwrap_or(f64::NAN)
    };
    for row in rows.iter().filter(|r| r.workload.starts_with("economy")) {
        println!(
            "{} at {} clients: {:.2}× pgbench TPS at {} clients",
            row.workload,
            row.clients,
            row.per_second / tps_at(row.clients),
            row.clients
        );
    }
    let best_batch = rows
        .iter()
        .filter(|r| r.workload.contains("batch"))
        .map(|r| r.per_second)
        .fold(0.0, f64::max);
    let best_pgbench = pgbench_tps.iter().map(|(_, t)| *t).fold(0.0, f64::max);
    let single_p99_8 = rows
        .iter()
        .find(|r| r.workload.contains("single") && r.clients == 8)
        .and_then(|r| r.p99_ms)
        .unwrap_or(f64::NAN);
    println!();
    let verdict = |ok: bool| if ok { "met" } else { "NOT MET" };
    let ratio = best_batch / best_pgbench;
    println!(
        "target: batched transfers/s ≥ 5× pgbench TPS (best vs best): {ratio:.2}× — {}",
        verdict(ratio >= 5.0)
    );
    println!(
        "target: single-transfer p99 ≤ 5 ms at 8 clients: {single_p99_8:.2} ms — {}",
        verdict(single_p99_8 <= 5.0)
    );
    if let Some(rss) = rss {
        println!("economy peak RSS: {rss:.1} MiB");
    }
    println!(
        "books after the run: ok, {} transfers, sum {} µcr",
        audit.transfer_count, audit.sum_micros
    );
}
