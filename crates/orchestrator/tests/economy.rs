//! The economy running by itself: genesis born, windows bought, run and recorded, a spawn,
//! death — with every service real (NATS in operator mode, Postgres, Docker).

mod common;

use std::os::unix::fs::PermissionsExt;
use std::time::Duration;

use futures::StreamExt;

use common::Stack;
use syntropism_contracts::economy::internal as economy;
use syntropism_contracts::pb;
use syntropism_contracts::scheduler::agent as scheduler;
use syntropism_contracts::subjects::orchestrator_events;

const CREDIT: i64 = 1_000_000;

/// Lives `WINDOWS` windows, bidding 1 credit for each next one, then bids everything it has
/// left for one last window, and after that stops bidding: broke, it must die.
const MORTAL: &str = r#"
import asyncio
from syntropism.agent import Agent

WINDOWS = 3
BUNDLE = {"cpu_millicores": 250, "memory_mib": 128, "duration_ms": 8000}

async def main():
    agent = await Agent.connect()
    me = await agent.whoami()
    n = me.agent.execution_count
    with open("/workspace/notes.txt", "a") as f:
        f.write(f"{agent.env.execution_id} {n}\n")
    balance = await agent.balance()
    if n < WINDOWS:
        await agent.place_bid(f"next-{agent.env.execution_id}", BUNDLE, 1_000_000)
    elif n == WINDOWS:
        await agent.place_bid(f"last-{agent.env.execution_id}", BUNDLE, balance.available_micros)
    await agent.close()

asyncio.run(main())
"#;

fn notes(path: &std::path::Path) -> Vec<String> {
    std::fs::read_to_string(path.join("notes.txt"))
        .unwrap_or_default()
        .lines()
        .map(str::to_owned)
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn genesis_lives_its_windows_then_dies_broke() {
    let mut stack = Stack::start(MORTAL).await;
    // The ledger audited after every tick, while the economy runs.
    let mut ticks = stack
        .nats_client
        .subscribe(orchestrator_events::TICK_COMPLETED)
        .await
        .unwrap();
    let auditor = stack.client.clone();
    let audits = tokio::spawn(async move {
        let mut results = Vec::new();
        while let Some(_tick) = ticks.next().await {
            let audit = auditor
                .call::<syntropism_contracts::economy::admin::Audit>(&pb::AuditRequest {})
                .await
                .unwrap();
            results.push((audit.ok, audit.sum_micros, audit.violations));
            if results.len() >= 8 {
                break;
            }
        }
        results
    });
    stack
        .orchestrator(
            "solo",
            &[
                ("genesis_endowment_micros", "5000000"),
                ("genesis_bid_micros", "1000000"),
            ],
        )
        .await;
    let agents = stack
        .until(120, "genesis to die", |agents| {
            agents.len() == 1 && agents[0].status() == pb::AgentStatus::Dead
        })
        .await;
    let genesis = &agents[0];
    assert!(genesis.lineage.is_empty());
    assert_eq!(genesis.earned_micros, 5 * CREDIT);
    assert_eq!(genesis.execution_count, 4, "{genesis:?}");
    // Every credit it had went on windows.
    assert_eq!(genesis.spent_micros, 5 * CREDIT);
    let detail = stack.detail(&genesis.agent_id).await;
    assert_eq!(detail.executions.len(), 4);
    for execution in &detail.executions {
        assert_eq!(execution.status(), pb::ExecutionStatus::Finished);
        let run = execution.run.as_ref().unwrap();
        assert_eq!(run.outcome(), pb::RunOutcome::Completed, "{run:?}");
    }
    // Its workspace is archived read-only, and shows each window once, in order.
    assert!(!stack.workspace(&genesis.agent_id).exists());
    let archived = stack.archive.join(&genesis.agent_id);
    let lines = notes(&archived);
    let counts: Vec<&str> = lines
        .iter()
        .map(|l| l.split_whitespace().nth(1).unwrap())
        .collect();
    assert_eq!(counts, ["1", "2", "3", "4"], "{lines:?}");
    let mut ids: Vec<&str> = lines
        .iter()
        .map(|l| l.split_whitespace().next().unwrap())
        .collect();
    ids.dedup();
    assert_eq!(ids.len(), 4);
    let mode = std::fs::metadata(archived.join("main.py"))
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o222, 0, "archived files are read-only");
    // Its account is closed and empty; the books balance.
    let account = stack.account(&genesis.agent_id).await;
    assert_eq!(account.status(), pb::AccountStatus::Closed);
    assert_eq!(account.balance_micros, 0);
    let audit = stack.audit().await;
    assert!(audit.ok, "{audit:?}");
    assert_eq!(audit.sum_micros, 0);
    assert_eq!(audit.minted_micros, 5 * CREDIT);
    let audits = audits.await.unwrap();
    assert!(audits.len() >= 5, "{audits:?}");
    for audit in audits {
        assert_eq!(audit, (true, 0, vec![]), "the ledger after a tick");
    }
    // It never runs again.
    tokio::time::sleep(Duration::from_secs(4)).await;
    assert_eq!(stack.detail(&genesis.agent_id).await.executions.len(), 4);
    let status = stack.status().await;
    assert_eq!((status.alive, status.dormant, status.dead), (0, 0, 1));
    assert!(status.tick >= 5, "{status:?}");
    assert!(status.audit_ok);

    // The event stream: born, then four windows started and finished, then death; ticks in
    // order.
    let events = stack.events().await;
    let ours: Vec<&str> = events
        .iter()
        .filter(|(s, _)| {
            s.starts_with("events.orchestrator.") && s != orchestrator_events::TICK_COMPLETED
        })
        .map(|(s, _)| s.as_str())
        .collect();
    assert_eq!(
        ours.first(),
        Some(&orchestrator_events::AGENT_BORN),
        "{ours:?}"
    );
    assert_eq!(
        ours.iter()
            .filter(|s| **s == orchestrator_events::EXECUTION_STARTED)
            .count(),
        4
    );
    assert_eq!(
        ours.iter()
            .filter(|s| **s == orchestrator_events::EXECUTION_FINISHED)
            .count(),
        4
    );
    let last_change = events
        .iter()
        .rev()
        .find(|(s, _)| s == orchestrator_events::AGENT_STATUS_CHANGED)
        .unwrap();
    let change: pb::AgentStatusChanged =
        syntropism_contracts::events::open(&last_change.1).unwrap();
    assert_eq!(change.to(), pb::AgentStatus::Dead);
    let ticks: Vec<u64> = events
        .iter()
        .filter(|(s, _)| s == orchestrator_events::TICK_COMPLETED)
        .map(|(_, e)| {
            syntropism_contracts::events::open::<pb::TickCompleted>(e)
                .unwrap()
                .tick
        })
        .collect();
    assert!(ticks.windows(2).all(|w| w[1] == w[0] + 1), "{ticks:?}");
    stack.stop().await;
}

/// Sleeps in each window (so a leader can die while it runs) and bids for the next, forever.
const SLEEPER: &str = r#"
import asyncio
from syntropism.agent import Agent

BUNDLE = {"cpu_millicores": 250, "memory_mib": 128, "duration_ms": 8000}

async def main():
    agent = await Agent.connect()
    with open("/workspace/notes.txt", "a") as f:
        f.write(f"{agent.env.execution_id} start\n")
    await agent.place_bid(f"next-{agent.env.execution_id}", BUNDLE, 1_000_000)
    await asyncio.sleep(2)
    with open("/workspace/notes.txt", "a") as f:
        f.write(f"{agent.env.execution_id} end\n")
    await agent.close()

asyncio.run(main())
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_killed_leader_is_replaced_and_nothing_runs_twice() {
    let stack = Stack::start(SLEEPER).await;
    let extra = [
        ("genesis_endowment_micros", "100000000"),
        ("genesis_bid_micros", "1000000"),
    ];
    let mut a = stack.orchestrator_process("replica-a", &extra);
    let mut b = stack.orchestrator_process("replica-b", &extra);
    // Wait for a window to be running, then kill the leader in the middle of it.
    let genesis = stack
        .until(60, "genesis to run", |agents| {
            agents.len() == 1 && agents[0].execution_count >= 1
        })
        .await
        .remove(0);
    let leader = stack.status().await.leader;
    assert!(leader == "replica-a" || leader == "replica-b", "{leader}");
    let (killed, survivor) = if leader == "replica-a" {
        (&mut a, "replica-b")
    } else {
        (&mut b, "replica-a")
    };
    killed.kill().unwrap();
    killed.wait().unwrap();
    let killed_at = std::time::Instant::now();
    let executions_then = genesis.execution_count;
    // The survivor takes over within the lease (3 s) and a tick or two, and the agent goes on.
    stack
        .until(60, "more windows under the new leader", |agents| {
            agents
                .first()
                .is_some_and(|a| a.execution_count >= executions_then + 2)
        })
        .await;
    let status = stack.status().await;
    assert_eq!(status.leader, survivor, "{}", stack.log_of(survivor));
    assert!(killed_at.elapsed() < Duration::from_secs(60));
    let detail = stack.detail(&genesis.agent_id).await;
    let _ = a.kill();
    let _ = b.kill();
    let _ = a.wait();
    let _ = b.wait();
    let lines = notes(&stack.workspace(&genesis.agent_id));
    let mut started: Vec<&str> = lines
        .iter()
        .filter(|l| l.ends_with(" start"))
        .map(|l| l.split_whitespace().next().unwrap())
        .collect();
    let total = started.len();
    started.sort();
    started.dedup();
    assert_eq!(started.len(), total, "an execution ran twice: {lines:?}");
    // Every window that ran belongs to an execution of the registry (none invented).
    let known: Vec<&str> = detail
        .executions
        .iter()
        .map(|e| e.execution_id.as_str())
        .collect();
    for id in &started {
        assert!(known.contains(id), "{id} is not a registered execution");
    }
    // The execution cut off by the kill was carried to its end by the survivor.
    let finished = detail
        .executions
        .iter()
        .filter(|e| e.status() == pb::ExecutionStatus::Finished)
        .count();
    assert!(finished as u64 >= executions_then, "{detail:#?}");
    let audit = stack.audit().await;
    assert!(audit.ok, "{audit:?}");
    assert_eq!(audit.sum_micros, 0);
    stack.stop().await;
}

/// Spawns one child in its first window (overlaying the child's `main.py`), then stops.
const PARENT: &str = r#"
import asyncio
from syntropism.agent import Agent

CHILD = '''
import asyncio
from syntropism.agent import Agent

async def main():
    agent = await Agent.connect()
    me = await agent.whoami()
    with open("/workspace/notes.txt", "a") as f:
        f.write("child " + " ".join(me.agent.lineage) + "\\n")
    await agent.close()

asyncio.run(main())
'''

async def main():
    agent = await Agent.connect()
    me = await agent.whoami()
    if me.agent.execution_count == 1:
        reply = await agent.spawn("first-child", 2_000_000,
                                  {"cpu_millicores": 250, "memory_mib": 128, "duration_ms": 8000},
                                  1_000_000, {"main.py": CHILD, "lib/extra.txt": "hello"})
        again = await agent.spawn("first-child", 2_000_000,
                                  {"cpu_millicores": 250, "memory_mib": 128, "duration_ms": 8000},
                                  1_000_000, {"main.py": CHILD, "lib/extra.txt": "hello"})
        assert again.child.agent_id == reply.child.agent_id
        with open("/workspace/notes.txt", "a") as f:
            f.write(f"spawned {reply.child.agent_id} {reply.cost_micros}\n")
        try:
            await agent.spawn("bad-name", 0, {"cpu_millicores": 250, "memory_mib": 128,
                              "duration_ms": 8000}, 1_000_000, {"../escape.py": "x"})
        except Exception as error:
            with open("/workspace/notes.txt", "a") as f:
                f.write(f"refused {error.code} {error.reason}\n")
    await agent.close()

asyncio.run(main())
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_spawned_child_gets_its_files_lineage_and_credits() {
    let mut stack = Stack::start(PARENT).await;
    stack
        .orchestrator(
            "solo",
            &[
                ("genesis_endowment_micros", "10000000"),
                ("genesis_bid_micros", "1000000"),
                ("spawn_fee_micros", "500000"),
            ],
        )
        .await;
    let agents = stack
        .until(90, "the child to run", |agents| {
            agents.len() == 2 && agents.iter().all(|a| a.execution_count >= 1)
        })
        .await;
    let parent = agents.iter().find(|a| a.lineage.is_empty()).unwrap();
    let child = agents.iter().find(|a| !a.lineage.is_empty()).unwrap();
    assert_eq!(child.lineage, std::slice::from_ref(&parent.agent_id));
    assert_eq!(child.earned_micros, 3 * CREDIT);
    let parent_notes = notes(&stack.workspace(&parent.agent_id));
    assert!(
        parent_notes.contains(&format!("spawned {} 3500000", child.agent_id)),
        "{parent_notes:?}"
    );
    assert!(
        parent_notes.contains(&"refused INVALID_ARGUMENT invalid_files".to_owned()),
        "{parent_notes:?}"
    );
    // The child's workspace: the parent's code overlaid with the supplied files.
    let child_dir = stack.workspace(&child.agent_id);
    assert_eq!(
        std::fs::read_to_string(child_dir.join("lib/extra.txt")).unwrap(),
        "hello"
    );
    // Wait for the child's window to have written its notes (it has run once).
    stack
        .until(60, "the child to settle", |agents| {
            agents.iter().all(|a| a.status() != pb::AgentStatus::Alive)
        })
        .await;
    let child_notes = notes(&child_dir);
    assert_eq!(child_notes, [format!("child {}", parent.agent_id)]);
    // Credits: the parent paid fee + endowment + first bid + its own first window; the child
    // spent its first bid on its window; the fee and both windows were burned.
    let parent_account = stack.account(&parent.agent_id).await;
    assert_eq!(
        parent_account.balance_micros,
        10 * CREDIT - CREDIT - 3_500_000
    );
    let child_account = stack.account(&child.agent_id).await;
    assert_eq!(child_account.balance_micros, 2 * CREDIT);
    let audit = stack.audit().await;
    assert!(audit.ok, "{audit:?}");
    assert_eq!(audit.minted_micros, 10 * CREDIT);
    assert_eq!(audit.burned_micros, CREDIT + 500_000 + CREDIT);
    stack.stop().await;
}

/// Spawns a child in its first window and then holds the only runner's room for longer than
/// the child's whole window.
const HOLDER: &str = r#"
import asyncio
from syntropism.agent import Agent

CHILD = """
from syntropism.agent import Agent
import asyncio
async def main():
    agent = await Agent.connect()
    with open("/workspace/notes.txt", "a") as f:
        f.write("child ran\\n")
    await agent.close()
asyncio.run(main())
"""

async def main():
    agent = await Agent.connect()
    me = await agent.whoami()
    if me.agent.execution_count == 1:
        await agent.spawn("child", 1_000_000,
                          {"cpu_millicores": 250, "memory_mib": 128, "duration_ms": 3000},
                          1_000_000, {"main.py": CHILD})
        await asyncio.sleep(6)
    await agent.close()

asyncio.run(main())
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_window_waits_for_a_runner_with_room() {
    // The market sells 4000 millicores a round, but the one runner has room for one window.
    let mut stack =
        Stack::start_with(HOLDER, &[("SYNTROPISM__SANDBOX__CPU_MILLICORES", "250")]).await;
    stack
        .orchestrator(
            "solo",
            &[
                ("genesis_endowment_micros", "10000000"),
                ("genesis_bid_micros", "1000000"),
                ("spawn_fee_micros", "0"),
            ],
        )
        .await;
    let agents = stack
        .until(90, "the child's window to have run", |agents| {
            agents.len() == 2 && agents.iter().all(|a| a.execution_count >= 1)
        })
        .await;
    let child = agents.iter().find(|a| !a.lineage.is_empty()).unwrap();
    stack
        .until(60, "the child's window to end", |agents| {
            agents
                .iter()
                .any(|a| a.agent_id == child.agent_id && a.status() != pb::AgentStatus::Alive)
        })
        .await;
    let detail = stack.detail(&child.agent_id).await;
    let run = detail.executions[0].run.clone().unwrap();
    // It waited while the parent held the room (past its first deadline), then began afresh
    // and ran its whole program.
    assert_eq!(run.outcome(), pb::RunOutcome::Completed, "{run:?}");
    assert_eq!(notes(&stack.workspace(&child.agent_id)), ["child ran"]);
    stack.stop().await;
}

/// An agent kept alive only by someone else's bid. Genesis spends its last credit on its
/// first window and never bids; a sponsor has already bid for a window of it, not before a
/// few seconds from now. Broke, with no bid of its own, genesis is still not dead: the
/// sponsor's bid will wake it. It sleeps, runs the sponsor's window, and only then dies.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_sponsored_agent_lives_on_its_sponsors_bid() {
    const IDLE: &str = "print('nothing to do')\n";
    let mut stack = Stack::start(IDLE).await;
    stack
        .orchestrator(
            "solo",
            &[
                ("genesis_endowment_micros", "1000000"),
                ("genesis_bid_micros", "1000000"),
            ],
        )
        .await;
    let agents = stack.until(60, "genesis", |agents| agents.len() == 1).await;
    let genesis = common::agent_id(&agents[0]);
    let sponsor = syntropism_contracts::AgentId::random();
    stack
        .client
        .call::<economy::OpenAccount>(&pb::OpenAccountRequest {
            idempotency_id: "sponsor:open".into(),
            op: Some(pb::OpenAccountOp {
                agent_id: sponsor.to_string(),
            }),
        })
        .await
        .unwrap();
    stack
        .client
        .call::<economy::Mint>(&pb::MintRequest {
            idempotency_id: "sponsor:grant".into(),
            op: Some(pb::MintOp {
                agent_id: sponsor.to_string(),
                amount_micros: 10 * CREDIT,
                reason: pb::MintReason::GenesisGrant as i32,
                memo: "a sponsor".into(),
            }),
        })
        .await
        .unwrap();
    let wake = chrono::Utc::now() + chrono::Duration::seconds(12);
    stack
        .client
        .call_as::<scheduler::PlaceBid>(
            &sponsor,
            &pb::PlaceBidRequest {
                idempotency_id: "sponsor:bid".into(),
                bundle: Some(pb::Bundle {
                    cpu_millicores: 250,
                    memory_mib: 128,
                    duration_ms: 8000,
                    ..Default::default()
                }),
                amount_micros: CREDIT,
                beneficiary_id: genesis.to_string(),
                not_before: Some(prost_types::Timestamp {
                    seconds: wake.timestamp(),
                    nanos: 0,
                }),
                ..Default::default()
            },
        )
        .await
        .unwrap();
    let agents = stack
        .until(90, "genesis to die after its sponsored window", |agents| {
            agents[0].status() == pb::AgentStatus::Dead
        })
        .await;
    assert_eq!(agents[0].execution_count, 2, "{:?}", agents[0]);
    // Its own credit and the sponsor's went on its two windows.
    assert_eq!(
        stack.account(&sponsor.to_string()).await.balance_micros,
        9 * CREDIT
    );
    let changes: Vec<pb::AgentStatus> = stack
        .events()
        .await
        .into_iter()
        .filter(|(subject, _)| subject == orchestrator_events::AGENT_STATUS_CHANGED)
        .map(|(_, envelope)| {
            let changed: pb::AgentStatusChanged =
                syntropism_contracts::events::open(&envelope).unwrap();
            changed.to()
        })
        .collect();
    assert_eq!(
        changes
            .iter()
            .filter(|s| **s == pb::AgentStatus::Dead)
            .count(),
        1,
        "dead once, at the end: {changes:?}"
    );
    assert_eq!(changes.last(), Some(&pb::AgentStatus::Dead), "{changes:?}");
    let audit = stack.audit().await;
    assert!(audit.ok, "{audit:?}");
    stack.stop().await;
}
