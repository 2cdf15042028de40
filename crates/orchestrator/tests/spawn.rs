//! Spawn across services that die half-way: the credits end where they were, or where a
//! completed spawn puts them — never elsewhere. The spawns are asked for as the parent (the
//! operator's credentials may publish on its subjects), so each step can be timed against a
//! service's death.

mod common;

use std::time::Duration;

use common::Stack;
use syntropism_contracts::orchestrator::agent::Spawn;
use syntropism_contracts::{AgentId, ErrorCode, pb};

const CREDIT: i64 = 1_000_000;

/// Genesis runs once and stops bidding: dormant with its credits, still able to spawn.
const QUIET: &str = r#"
import asyncio
from syntropism.agent import Agent

async def main():
    agent = await Agent.connect()
    await agent.close()

asyncio.run(main())
"#;

fn request(key: &str) -> pb::SpawnRequest {
    pb::SpawnRequest {
        idempotency_id: key.into(),
        endowment_micros: 20 * CREDIT,
        first_bundle: Some(pb::Bundle {
            cpu_millicores: 100,
            memory_mib: 64,
            duration_ms: 2000,
            llm_tokens: 0,
            attention_slots: 0,
        }),
        first_bid_micros: CREDIT,
        files: [("child.txt".to_owned(), b"hello".to_vec())].into(),
    }
}

async fn quiet_genesis(stack: &mut Stack, extra: &[(&str, &str)]) -> AgentId {
    let mut settings = vec![
        ("genesis_endowment_micros", "100000000"),
        ("genesis_bid_micros", "1000000"),
        ("spawn_fee_micros", "5000000"),
    ];
    settings.extend_from_slice(extra);
    stack.orchestrator("solo", &settings).await;
    let agents = stack
        .until(60, "genesis to have run", |agents| {
            agents.len() == 1 && agents[0].status() == pb::AgentStatus::Dormant
        })
        .await;
    common::agent_id(&agents[0])
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_spawn_whose_economy_is_down_moves_nothing() {
    let mut stack = Stack::start(QUIET).await;
    let parent = quiet_genesis(&mut stack, &[]).await;
    let before = stack.account(&parent.to_string()).await;
    stack.kill("economy").await;
    let client = stack.client.clone().with_timeout(Duration::from_secs(20));
    let error = client
        .call_as::<Spawn>(&parent, &request("while-economy-down"))
        .await
        .unwrap_err();
    assert!(error.is_retryable(), "{error:?}");
    stack.restart("economy").await;
    // Nothing moved, and no child appeared.
    assert_eq!(stack.account(&parent.to_string()).await, before);
    assert_eq!(stack.agents().await.len(), 1);
    let audit = stack.audit().await;
    assert!(audit.ok && audit.sum_micros == 0, "{audit:?}");
    // Asked again once the economy is back, the same spawn completes once.
    let reply = client
        .call_as::<Spawn>(&parent, &request("while-economy-down"))
        .await
        .unwrap();
    assert_eq!(reply.cost_micros, 5 * CREDIT + 20 * CREDIT + CREDIT);
    let after = stack.account(&parent.to_string()).await;
    assert_eq!(
        after.balance_micros,
        before.balance_micros - reply.cost_micros
    );
    stack.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_spawn_cut_off_after_paying_is_completed_by_the_leader() {
    let mut stack = Stack::start(QUIET).await;
    let parent = quiet_genesis(&mut stack, &[("spawn_sweep_after_ms", "1000")]).await;
    let before = stack.account(&parent.to_string()).await;
    let burned_before = stack.audit().await.burned_micros;
    // The scheduler dies: the money moves, the child's first bid cannot be placed.
    stack.kill("scheduler").await;
    let client = stack.client.clone().with_timeout(Duration::from_secs(20));
    let error = client
        .call_as::<Spawn>(&parent, &request("cut-off"))
        .await
        .unwrap_err();
    assert!(error.is_retryable(), "{error:?}");
    assert_eq!(error.code, ErrorCode::Unavailable);
    // Half-way, the credits are where the completed spawn will leave them (one atomic batch).
    let cost = 5 * CREDIT + 20 * CREDIT + CREDIT;
    assert_eq!(
        stack.account(&parent.to_string()).await.balance_micros,
        before.balance_micros - cost
    );
    let audit = stack.audit().await;
    assert!(audit.ok && audit.sum_micros == 0, "{audit:?}");
    assert_eq!(audit.burned_micros, burned_before + 5 * CREDIT);
    // The child is not born yet: nobody sees it.
    assert_eq!(stack.agents().await.len(), 1);
    stack.restart("scheduler").await;
    // Nobody asks again: the leader's sweep carries the spawn to its end.
    let agents = stack
        .until(60, "the child to be born", |agents| agents.len() == 2)
        .await;
    let child = agents.iter().find(|a| !a.lineage.is_empty()).unwrap();
    assert_eq!(child.lineage, [parent.to_string()]);
    let child_account = stack.account(&child.agent_id).await;
    // Its endowment, plus its first bid held in escrow (or already paid for its window).
    assert_eq!(
        child_account.balance_micros + child.spent_micros,
        20 * CREDIT + CREDIT,
        "{child_account:?}"
    );
    // The parent's retry now returns the same child, and nothing moves again.
    let reply = client
        .call_as::<Spawn>(&parent, &request("cut-off"))
        .await
        .unwrap();
    assert_eq!(reply.child.unwrap().agent_id, child.agent_id);
    assert_eq!(
        stack.account(&parent.to_string()).await.balance_micros,
        before.balance_micros - cost
    );
    let audit = stack.audit().await;
    assert!(audit.ok && audit.sum_micros == 0, "{audit:?}");
    stack.stop().await;
}
