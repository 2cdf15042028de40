//! The operator CLI (`syntropism`, the real binary) against the running economy: it sees the
//! agents and the market, and a reward given through it raises the agent's balance by exactly
//! the reward.

mod common;

use std::path::PathBuf;
use std::time::Duration;

use common::Stack;
use syntropism_contracts::pb;

const CREDIT: i64 = 1_000_000;

/// Prompts the human once per window that carries attention, writes to the human, and bids
/// for plain windows after the first.
const PROMPTER: &str = r#"
import asyncio
from syntropism.agent import Agent

async def main():
    agent = await Agent.connect()
    me = await agent.whoami()
    if me.current.bundle.attention_slots > 0:
        await agent.prompt(f"p-{agent.env.execution_id}", "Twin primes: 1019/1021, 1031/1033.")
        await agent.send_message(f"m-{agent.env.execution_id}", "human", "Hello, human.")
    await agent.close()

asyncio.run(main())
"#;

/// The `syntropism` binary of this build (the workspace's binaries are built with its tests).
fn cli_binary() -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    let path = exe
        .parent()
        .and_then(|deps| deps.parent())
        .map(|dir| dir.join("syntropism"))
        .unwrap();
    assert!(
        path.exists(),
        "{} is missing: build it with `cargo build --bin syntropism` (scripts/test.sh builds every binary)",
        path.display()
    );
    path
}

fn cli(stack: &Stack, args: &[&str]) -> String {
    let creds = stack.dir.path().join("cli.creds");
    let out = std::process::Command::new(cli_binary())
        .arg("--nats-url")
        .arg(stack.nats.url())
        .arg("--creds")
        .arg(&creds)
        .args(args)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "syntropism {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

fn json(stack: &Stack, args: &[&str]) -> serde_json::Value {
    let mut all = args.to_vec();
    all.push("--json");
    serde_json::from_str(&cli(stack, &all)).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_operator_sees_the_economy_and_rewards_through_the_cli() {
    let mut stack = Stack::start(PROMPTER).await;
    stack
        .orchestrator(
            "solo",
            &[
                ("genesis_endowment_micros", "100000000"),
                ("genesis_bid_micros", "10000000"),
                ("genesis_bundle__attention_slots", "1"),
            ],
        )
        .await;
    let genesis = stack
        .until(60, "genesis to have run", |agents| {
            agents.len() == 1 && agents[0].execution_count >= 1
        })
        .await
        .remove(0);
    // Its prompt, as the operator sees it.
    let mut prompts = serde_json::Value::Null;
    for _ in 0..60 {
        prompts = json(&stack, &["prompts"]);
        if prompts.as_array().is_some_and(|p| !p.is_empty()) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let prompt = &prompts[0];
    assert_eq!(prompt["agent_id"], genesis.agent_id.as_str(), "{prompts}");
    assert!(prompt["content"].as_str().unwrap().contains("Twin primes"));
    let table = cli(&stack, &["prompts"]);
    assert!(table.contains("Twin primes"), "{table}");
    // Wait for its window to end, so the balance is settled, then reward.
    stack
        .until(60, "genesis's window to end", |agents| {
            agents[0].status() != pb::AgentStatus::Alive
        })
        .await;
    let before = stack.account(&genesis.agent_id).await.balance_micros;
    let rewarded = json(
        &stack,
        &[
            "reward",
            prompt["prompt_id"].as_str().unwrap(),
            "7",
            "5",
            "8",
            "--reason",
            "good primes",
        ],
    );
    let reward = 20 * 50 * CREDIT;
    assert_eq!(rewarded["reward_micros"], reward, "{rewarded}");
    let after = stack.account(&genesis.agent_id).await.balance_micros;
    assert_eq!(after - before, reward);
    // The registry counts it as earned (once).
    stack
        .until(30, "the reward in the registry", |agents| {
            agents[0].earned_micros == 100 * CREDIT + reward
        })
        .await;
    // It left the queue; the ledger balances with the reward minted.
    assert_eq!(json(&stack, &["prompts"]).as_array().unwrap().len(), 0);
    let audit = json(&stack, &["audit"]);
    assert_eq!(audit["ok"], true, "{audit}");
    assert_eq!(audit["sum_micros"], 0);
    assert_eq!(audit["minted_micros"], 100 * CREDIT + reward);

    // The other views.
    let status = json(&stack, &["status"]);
    assert_eq!(status["audit_ok"], true, "{status}");
    assert!(status["tick"].as_u64().unwrap() >= 1);
    let agents = json(&stack, &["agents"]);
    assert_eq!(agents[0]["agent_id"], genesis.agent_id.as_str());
    let detail = cli(&stack, &["agent", &genesis.agent_id]);
    assert!(detail.contains("completed"), "{detail}");
    let market = cli(&stack, &["market"]);
    assert!(market.contains("attention slots"), "{market}");
    let messages = cli(&stack, &["messages"]);
    assert!(messages.contains("Hello, human."), "{messages}");
    let events = cli(&stack, &["events", "--last", "500"]);
    for expected in [
        "events.orchestrator.agent_born",
        "events.attention.prompted",
        "events.attention.rewarded",
        "events.orchestrator.tick_completed",
    ] {
        assert!(events.contains(expected), "{expected} missing: {events}");
    }
    stack.stop().await;
}
