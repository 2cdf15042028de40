//! `just bench-economy-loop`: the whole economy under load, beside bare `docker run --rm`.
//!
//! Genesis spawns `BENCH_AGENTS - 1` children in its first windows; every agent runs the same
//! trivial program (connect with its execution's credentials, bid for its next window, exit).
//! Once all of them live, the benchmark measures `BENCH_TICKS` ticks (default 20): each tick's
//! duration (the leader's work: clearing, creating and dispatching executions, settling every
//! agent) from the `tick_completed` events, and the windows completed per minute. The market
//! sells the machine's capacity (`BENCH_CPU`, default 2000 millicores) each round in windows of
//! 250 millicores, so 8 windows run at once. Then, in the same run, it starts the same number
//! of containers with bare `docker run --rm` of the same image and cpu limit (8 at a time,
//! `BENCH_BARE_PARALLEL`) and prints the ratio of the two rates. Every service is real: NATS in
//! operator mode, Postgres, Docker.

#[path = "../tests/common/mod.rs"]
#[allow(dead_code)]
mod common;

use std::time::{Duration, Instant};

use futures::StreamExt;
use hdrhistogram::Histogram;
use prost::Message as _;
use syntropism_contracts::pb;
use syntropism_contracts::subjects::orchestrator_events;

fn env_or(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// Every agent: bid for the next window, exit. Genesis's first window also spawns the others.
fn program(agents: u64) -> String {
    format!(
        r#"
import asyncio
from syntropism.agent import Agent

BUNDLE = {{"cpu_millicores": 250, "memory_mib": 64, "duration_ms": 10000}}

async def main():
    agent = await Agent.connect(timeout=30)
    # Genesis is the rich one (children get 50 credits); it alone asks for its record.
    if agent.env.balance_micros > 1_000_000_000 and not (await agent.whoami()).agent.lineage:
        # Genesis: spawn the population (idempotent per child, so a later window finishes it).
        living = len(await agent.directory())
        if living < {agents}:
            async def one(i):
                try:
                    await agent.spawn(f"bench-{{i}}", 50_000_000, BUNDLE, 50_000, {{}})
                except Exception as error:
                    print("spawn", i, error)
            for start in range(0, {children}, 10):
                await asyncio.gather(*(one(i) for i in range(start, min(start + 10, {children}))))
    await agent.place_bid(f"next-{{agent.env.execution_id}}", BUNDLE, 50_000)
    await agent.close()

asyncio.run(main())
"#,
        agents = agents,
        children = agents - 1
    )
}

/// CPU time the whole machine has spent busy (all cores, `/proc/stat`), in seconds.
fn machine_busy_seconds() -> f64 {
    let stat = std::fs::read_to_string("/proc/stat").unwrap_or_default();
    let fields: Vec<u64> = stat
        .lines()
        .next()
        .unwrap_or_default()
        .split_whitespace()
        .skip(1)
        .filter_map(|v| v.parse().ok())
        .collect();
    // user nice system idle iowait irq softirq steal: all but idle and iowait.
    let busy: u64 = fields
        .iter()
        .take(8)
        .enumerate()
        .filter(|(i, _)| *i != 3 && *i != 4)
        .map(|(_, v)| v)
        .sum();
    busy as f64 / 100.0
}

/// CPU time of every Docker container, living or gone (the `docker` cgroup), in seconds.
fn containers_cpu_seconds() -> Option<f64> {
    if let Ok(text) = std::fs::read_to_string("/sys/fs/cgroup/cpuacct/docker/cpuacct.usage") {
        return text.trim().parse::<u64>().ok().map(|n| n as f64 / 1e9);
    }
    // cgroup v2 with Docker's cgroupfs driver; under systemd the containers have no parent
    // of their own, and the figure is left out rather than mixed with other services.
    std::fs::read_to_string("/sys/fs/cgroup/docker/cpu.stat")
        .ok()
        .and_then(|text| {
            text.lines()
                .find_map(|l| l.strip_prefix("usage_usec "))
                .and_then(|v| v.trim().parse::<u64>().ok())
        })
        .map(|usec| usec as f64 / 1e6)
}

fn per(total: Option<f64>, count: u64) -> String {
    total.map_or("n/a".into(), |t| format!("{:.3}", t / count.max(1) as f64))
}

#[tokio::main]
async fn main() {
    let agents = env_or("BENCH_AGENTS", 200);
    let ticks = env_or("BENCH_TICKS", 20);
    let parallel = env_or("BENCH_BARE_PARALLEL", 8) as usize;
    let tick_ms = env_or("BENCH_TICK_MS", 2000);
    // The machine's capacity, sold every round: `BENCH_CPU` millicores (default 2000, two
    // cores) in windows of 250 — 8 at a time, as many as the bare run starts at once.
    let cpu = env_or("BENCH_CPU", 2000).to_string();
    let memory = "4096".to_owned();
    let mut stack = common::Stack::start_with(
        &program(agents),
        &[
            ("SYNTROPISM__MARKET__SUPPLY__CPU_MILLICORES", cpu.as_str()),
            ("SYNTROPISM__MARKET__SUPPLY__MEMORY_MIB", memory.as_str()),
            ("SYNTROPISM__SANDBOX__CPU_MILLICORES", cpu.as_str()),
            ("SYNTROPISM__SANDBOX__MEMORY_MIB", memory.as_str()),
            ("SYNTROPISM__SANDBOX__MAX_NATS_CONNECTIONS", "4"),
        ],
    )
    .await;
    let tick = tick_ms.to_string();
    stack
        .orchestrator(
            "bench",
            &[
                ("tick_ms", tick.as_str()),
                ("lease_ms", "20000"),
                ("genesis_endowment_micros", "100000000000"),
                ("genesis_bid_micros", "1000000"),
                ("genesis_bundle__duration_ms", "120000"),
                ("spawn_fee_micros", "0"),
            ],
        )
        .await;
    eprintln!("economy loop: waiting for {agents} agents");
    let started = Instant::now();
    stack
        .until(900, "the population", |list| list.len() as u64 >= agents)
        .await;
    eprintln!(
        "economy loop: {agents} agents after {:.1} s; measuring {ticks} ticks",
        started.elapsed().as_secs_f64()
    );

    // The ticks, from their events; executions finished meanwhile, from theirs.
    let mut events = stack
        .nats_client
        .subscribe("events.orchestrator.>")
        .await
        .unwrap();
    let mut durations = Histogram::<u64>::new(3).unwrap();
    let mut finished = 0u64;
    let mut outcomes = std::collections::BTreeMap::new();
    let mut first_tick: Option<Instant> = None;
    let mut seen = 0;
    let mut overran = 0;
    let mut agent_cpu_ms = 0u64;
    let (mut busy_start, mut containers_start) = (0.0, None);
    while seen <= ticks {
        let message = tokio::time::timeout(Duration::from_secs(120), events.next())
            .await
            .expect("a tick within two minutes")
            .unwrap();
        let envelope = pb::EventEnvelope::decode(message.payload.as_ref()).unwrap();
        if message.subject.as_str() == orchestrator_events::TICK_COMPLETED {
            let t: pb::TickCompleted = syntropism_contracts::events::open(&envelope).unwrap();
            // The first tick seen starts the clock; the next `ticks` are measured.
            if first_tick.is_some() {
                durations.record(t.duration_ms.max(1)).unwrap();
                overran += u64::from(t.overran);
            } else {
                finished = 0;
                agent_cpu_ms = 0;
                outcomes.clear();
                busy_start = machine_busy_seconds();
                containers_start = containers_cpu_seconds();
            }
            first_tick.get_or_insert_with(Instant::now);
            seen += 1;
        } else if message.subject.as_str() == orchestrator_events::EXECUTION_FINISHED
            && first_tick.is_some()
        {
            let changed: pb::ExecutionChanged =
                syntropism_contracts::events::open(&envelope).unwrap();
            let run = changed.execution.and_then(|e| e.run);
            let outcome = run
                .as_ref()
                .map_or(pb::RunOutcome::Unspecified, |r| r.outcome());
            *outcomes.entry(format!("{outcome:?}")).or_insert(0u64) += 1;
            // Only windows that ran to completion count as executions.
            if outcome == pb::RunOutcome::Completed {
                finished += 1;
                agent_cpu_ms += run.map_or(0, |r| r.cpu_time_ms);
            }
        }
    }
    let elapsed = first_tick.unwrap().elapsed();
    let loop_busy = machine_busy_seconds() - busy_start;
    let loop_containers = containers_cpu_seconds()
        .zip(containers_start)
        .map(|(end, start)| end - start);
    let loop_rate = finished as f64 / elapsed.as_secs_f64() * 60.0;
    let status = stack.status().await;
    stack.stop().await;

    // The same number of bare containers, `parallel` at a time.
    let image = common::IMAGE;
    let bare = finished.max(1) as usize;
    let begun = Instant::now();
    let (bare_busy_start, bare_containers_start) =
        (machine_busy_seconds(), containers_cpu_seconds());
    futures::stream::iter(0..bare)
        .map(|_| async move {
            let out = tokio::process::Command::new("docker")
                .args([
                    "run",
                    "--rm",
                    "--network",
                    "none",
                    "--cpus",
                    "0.25",
                    "--memory",
                    "64m",
                    image,
                    "/opt/syntropism/bin/python",
                    "-c",
                    "import syntropism.agent",
                ])
                .output()
                .await
                .unwrap();
            assert!(
                out.status.success(),
                "{}",
                String::from_utf8_lossy(&out.stderr)
            );
        })
        .buffer_unordered(parallel)
        .collect::<Vec<_>>()
        .await;
    let bare_elapsed = begun.elapsed();
    let bare_busy = machine_busy_seconds() - bare_busy_start;
    let bare_containers = containers_cpu_seconds()
        .zip(bare_containers_start)
        .map(|(end, start)| end - start);
    let bare_rate = bare as f64 / bare_elapsed.as_secs_f64() * 60.0;

    println!();
    println!("Economy loop: {agents} agents, {ticks} ticks of {tick_ms} ms");
    println!();
    println!("| measure                                  |      value |");
    println!("|------------------------------------------|-----------:|");
    println!(
        "| tick duration p50 (ms)                   | {:>10} |",
        durations.value_at_quantile(0.5)
    );
    println!(
        "| tick duration p99 (ms)                   | {:>10} |",
        durations.value_at_quantile(0.99)
    );
    println!(
        "| ticks that overran their period          | {:>10} |",
        overran
    );
    println!(
        "| windows completed during the ticks       | {:>10} |",
        finished
    );
    println!(
        "| economy: windows completed per minute    | {:>10.1} |",
        loop_rate
    );
    println!(
        "| bare docker run --rm: {bare:>4} containers     | {:>8.1} s |",
        bare_elapsed.as_secs_f64()
    );
    println!(
        "| bare docker run: containers per minute   | {:>10.1} |",
        bare_rate
    );
    println!(
        "| machine CPU-s per window (economy)       | {:>10.3} |",
        loop_busy / finished.max(1) as f64
    );
    println!(
        "| machine CPU-s per container (bare)       | {:>10.3} |",
        bare_busy / bare as f64
    );
    println!(
        "| container CPU-s per window (economy)     | {:>10} |",
        per(loop_containers, finished)
    );
    println!(
        "| agent CPU-s per window, runner's record  | {:>10.3} |",
        agent_cpu_ms as f64 / 1000.0 / finished.max(1) as f64
    );
    println!(
        "| container CPU-s per container (bare)     | {:>10} |",
        per(bare_containers, bare as u64)
    );
    println!();
    println!("window outcomes during the ticks: {outcomes:?}");
    println!(
        "economy rate / bare rate = {:.2} (target ≥ 0.80); ledger audit {} ({} executions in all)",
        loop_rate / bare_rate,
        if status.audit_ok { "clean" } else { "VIOLATED" },
        status.executions_total
    );
}
