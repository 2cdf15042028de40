//! The real genesis agent (`workspaces/genesis/main.py`) in the real economy: neglected, it
//! spends its endowment on attention windows and dies; rewarded, it lives on and has a child.

mod common;

use common::Stack;
use syntropism_contracts::attention::admin::{PendingPrompts, Reward};
use syntropism_contracts::pb;

const GENESIS: &str = include_str!("../../../workspaces/genesis/main.py");
const CREDIT: i64 = 1_000_000;

async fn start(endowment: &str) -> Stack {
    let mut stack = Stack::start(GENESIS).await;
    stack
        .orchestrator(
            "solo",
            &[
                ("genesis_endowment_micros", endowment),
                ("genesis_bid_micros", "10000000"),
                ("genesis_bundle__attention_slots", "1"),
            ],
        )
        .await;
    stack
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn neglected_genesis_dies() {
    // 20 credits: two attention windows and a last plain one.
    let stack = start("20000000").await;
    let agents = stack
        .until(120, "genesis to die", |agents| {
            agents.len() == 1 && agents[0].status() == pb::AgentStatus::Dead
        })
        .await;
    let genesis = &agents[0];
    assert!(genesis.execution_count >= 3, "{genesis:?}");
    // It showed the human a prompt in each attention window, and nobody answered.
    let pending = stack
        .client
        .call::<PendingPrompts>(&pb::PendingPromptsRequest { limit: 100 })
        .await
        .unwrap();
    assert!(pending.prompts.len() >= 2, "{pending:?}");
    // It spent everything: 1 credit on its report to the human (social's fee), the rest on
    // windows. Its notes are archived.
    assert_eq!(genesis.spent_micros, 19 * CREDIT);
    let audit = stack.audit().await;
    assert_eq!(audit.burned_micros, 20 * CREDIT);
    let notes =
        std::fs::read_to_string(stack.archive.join(&genesis.agent_id).join("notes.json")).unwrap();
    let notes: serde_json::Value = serde_json::from_str(&notes).unwrap();
    assert_eq!(notes["windows"], genesis.execution_count);
    assert!(notes["prompts"].as_u64().unwrap() >= 2, "{notes}");
    let audit = stack.audit().await;
    assert!(audit.ok && audit.sum_micros == 0, "{audit:?}");
    stack.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn rewarded_genesis_lives_on_and_has_a_child() {
    let stack = start("20000000").await;
    // Its first prompt, rewarded generously (30 points × 50 credits).
    let prompt = loop {
        let pending = stack
            .client
            .call::<PendingPrompts>(&pb::PendingPromptsRequest { limit: 100 })
            .await
            .unwrap();
        if let Some(prompt) = pending.prompts.into_iter().next() {
            break prompt;
        }
        tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    };
    stack
        .client
        .call::<Reward>(&pb::RewardRequest {
            prompt_id: prompt.prompt_id,
            scores: Some(pb::Scores {
                interesting: 10,
                useful: 10,
                understandable: 10,
            }),
            reason: "keep going".into(),
        })
        .await
        .unwrap();
    // Rich, it spawns a child at its next window, and keeps buying windows.
    let agents = stack
        .until(120, "a child, and genesis past five windows", |agents| {
            agents.len() >= 2
                && agents
                    .iter()
                    .any(|a| a.lineage.is_empty() && a.execution_count >= 5)
        })
        .await;
    let genesis = agents.iter().find(|a| a.lineage.is_empty()).unwrap();
    assert_eq!(genesis.status(), pb::AgentStatus::Alive);
    let child = agents.iter().find(|a| !a.lineage.is_empty()).unwrap();
    assert_eq!(child.lineage, std::slice::from_ref(&genesis.agent_id));
    assert!(child.earned_micros >= 300 * CREDIT, "{child:?}");
    // The child runs its parent's code: it has its own notes.
    stack
        .until(60, "the child to run", |agents| {
            agents
                .iter()
                .any(|a| a.agent_id == child.agent_id && a.execution_count >= 1)
        })
        .await;
    let audit = stack.audit().await;
    assert!(audit.ok && audit.sum_micros == 0, "{audit:?}");
    assert_eq!(audit.minted_micros, 20 * CREDIT + 1500 * CREDIT);
    stack.stop().await;
}
