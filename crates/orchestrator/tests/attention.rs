//! Attention end to end: genesis, written with the Python SDK, shows the human prompts from
//! real windows in Docker; the human's queue, rewards minted exactly once, dismissal, expiry —
//! with every service real.

mod common;

use std::time::Duration;

use common::{Stack, agent_id};
use syntropism_contracts::attention::{admin, agent};
use syntropism_contracts::subjects::attention_events;
use syntropism_contracts::{ErrorCode, RpcError, pb};

const CREDIT: i64 = 1_000_000;

/// Three windows: the first two carry an attention slot (the second paid more for), the third
/// does not. Each tries two prompts, retries the first and reuses its id for other content.
const PROMPTER: &str = r#"
import asyncio
from syntropism.agent import Agent, SyntropismError

ATTENTION = {"cpu_millicores": 250, "memory_mib": 128, "duration_ms": 8000, "attention_slots": 1}
PLAIN = {"cpu_millicores": 250, "memory_mib": 128, "duration_ms": 8000}
NEXT = {1: (ATTENTION, 7_000_000), 2: (PLAIN, 1_000_000)}

def note(line):
    with open("/workspace/notes.txt", "a") as f:
        f.write(line + "\n")

async def main():
    agent = await Agent.connect()
    me = await agent.whoami()
    n = me.agent.execution_count
    try:
        first = await agent.prompt(f"p-{n}", f"window {n}: twin primes 1019/1021")
        again = await agent.prompt(f"p-{n}", f"window {n}: twin primes 1019/1021")
        note(f"{n} prompted {first.prompt.prompt_id} {first.slots_left} {again.prompt.prompt_id} {again.slots_left}")
    except SyntropismError as error:
        note(f"{n} first {error.code} {error.reason}")
    for key, content in [(f"q-{n}", "a second prompt"), (f"p-{n}", "other content")]:
        try:
            await agent.prompt(key, content)
            note(f"{n} {key} accepted")
        except SyntropismError as error:
            note(f"{n} {key} {error.code} {error.reason}")
    if n in NEXT:
        bundle, amount = NEXT[n]
        await agent.place_bid(f"next-{n}", bundle, amount)
    await agent.close()

asyncio.run(main())
"#;

fn notes(stack: &Stack, agent: &str) -> Vec<String> {
    std::fs::read_to_string(stack.workspace(agent).join("notes.txt"))
        .unwrap_or_default()
        .lines()
        .map(str::to_owned)
        .collect()
}

/// Genesis's settings: 20 credits, a first window with one attention slot for 6 credits.
const GENESIS: &[(&str, &str)] = &[
    ("genesis_endowment_micros", "20000000"),
    ("genesis_bid_micros", "6000000"),
    ("genesis_bundle__attention_slots", "1"),
];

async fn pending(stack: &Stack) -> Vec<pb::Prompt> {
    stack
        .client
        .call::<admin::PendingPrompts>(&pb::PendingPromptsRequest { limit: 0 })
        .await
        .unwrap()
        .prompts
}

async fn reward(stack: &Stack, prompt: &str, scores: [u32; 3]) -> Result<pb::Prompt, RpcError> {
    stack
        .client
        .call::<admin::Reward>(&pb::RewardRequest {
            prompt_id: prompt.into(),
            scores: Some(pb::Scores {
                interesting: scores[0],
                useful: scores[1],
                understandable: scores[2],
            }),
            reason: "nice primes".into(),
        })
        .await
        .map(|r| r.prompt.unwrap())
}

async fn dismiss(stack: &Stack, prompt: &str) -> Result<pb::Prompt, RpcError> {
    stack
        .client
        .call::<admin::Dismiss>(&pb::DismissRequest {
            prompt_id: prompt.into(),
            reason: "not now".into(),
        })
        .await
        .map(|r| r.prompt.unwrap())
}

fn refusal<T: std::fmt::Debug>(result: Result<T, RpcError>) -> (ErrorCode, String) {
    let error = result.unwrap_err();
    (error.code, error.reason)
}

/// Waits until the event stream holds `count` events on `subject`.
async fn events_on(stack: &Stack, subject: &str, count: usize) -> Vec<pb::Prompt> {
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    loop {
        let prompts: Vec<pb::Prompt> = stack
            .events()
            .await
            .into_iter()
            .filter(|(s, _)| s == subject)
            .map(|(_, e)| {
                syntropism_contracts::events::open::<pb::PromptChanged>(&e)
                    .unwrap()
                    .prompt
                    .unwrap()
            })
            .collect();
        if prompts.len() >= count || std::time::Instant::now() > deadline {
            return prompts;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn genesis_prompts_the_human_and_is_rewarded_exactly_once() {
    let mut stack = Stack::start(PROMPTER).await;
    stack.orchestrator("solo", GENESIS).await;
    let agents = stack
        .until(120, "genesis's three windows", |agents| {
            agents.len() == 1
                && agents[0].execution_count == 3
                && agents[0].status() == pb::AgentStatus::Dormant
        })
        .await;
    let genesis = &agents[0];
    let lines = notes(&stack, &genesis.agent_id);
    // Window 1: one slot, one prompt (a retry answers the same prompt); the second prompt and
    // a reused id are refused.
    let first: Vec<&str> = lines[0].split_whitespace().collect();
    assert_eq!(first[..2], ["1", "prompted"], "{lines:?}");
    assert_eq!(
        (first[3], first[4], first[5]),
        ("0", first[2], "0"),
        "{lines:?}"
    );
    let a = first[2].to_owned();
    assert_eq!(
        lines[1], "1 q-1 FAILED_PRECONDITION slots_used",
        "{lines:?}"
    );
    assert_eq!(
        lines[2], "1 p-1 CONFLICT idempotency_id_reused",
        "{lines:?}"
    );
    // Window 2: the same, with a prompt of its own.
    let second: Vec<&str> = lines[3].split_whitespace().collect();
    assert_eq!(second[..2], ["2", "prompted"], "{lines:?}");
    let b = second[2].to_owned();
    assert_ne!(a, b);
    assert_eq!(
        lines[4], "2 q-2 FAILED_PRECONDITION slots_used",
        "{lines:?}"
    );
    // Window 3 carries no attention: no prompt at all.
    assert_eq!(
        lines[6..],
        [
            "3 first FAILED_PRECONDITION no_attention",
            "3 q-3 FAILED_PRECONDITION no_attention",
            "3 p-3 FAILED_PRECONDITION no_attention",
        ],
        "{lines:?}"
    );
    assert_eq!(lines.len(), 9, "{lines:?}");

    // The human's queue: most paid for first (window 2 paid 7 credits, window 1 paid 6).
    let queue = pending(&stack).await;
    let ids: Vec<&str> = queue.iter().map(|p| p.prompt_id.as_str()).collect();
    assert_eq!(ids, [b.as_str(), a.as_str()]);
    assert_eq!(
        (queue[0].paid_micros, queue[1].paid_micros),
        (7 * CREDIT, 6 * CREDIT)
    );
    let shown = &queue[1];
    assert_eq!(shown.agent_id, genesis.agent_id);
    assert_eq!(shown.status(), pb::PromptStatus::Pending);
    assert_eq!(shown.content, "window 1: twin primes 1019/1021");
    let detail = stack.detail(&genesis.agent_id).await;
    let windows: Vec<&str> = detail
        .executions
        .iter()
        .map(|e| e.execution_id.as_str())
        .collect();
    assert!(windows.contains(&shown.execution_id.as_str()));
    let ttl = shown.expires_at.unwrap().seconds - shown.created_at.unwrap().seconds;
    assert!((3599..=3601).contains(&ttl), "{ttl}");

    // Rewarding mints (7 + 5 + 8) × 50 credits to genesis, once.
    let before = stack.account(&genesis.agent_id).await.balance_micros;
    assert_eq!(before, 20 * CREDIT - 6 * CREDIT - 7 * CREDIT - CREDIT);
    let rewarded = reward(&stack, &a, [7, 5, 8]).await.unwrap();
    assert_eq!(rewarded.status(), pb::PromptStatus::Rewarded);
    assert_eq!(rewarded.reward_micros, 1000 * CREDIT);
    assert_eq!(rewarded.reason, "nice primes");
    assert!(rewarded.resolved_at.is_some());
    let after = stack.account(&genesis.agent_id).await.balance_micros;
    assert_eq!(after - before, 1000 * CREDIT);
    // The same reward again: the first outcome, nothing minted.
    let again = reward(&stack, &a, [7, 5, 8]).await.unwrap();
    assert_eq!(again, rewarded);
    assert_eq!(stack.account(&genesis.agent_id).await.balance_micros, after);
    // Other scores: refused.
    assert_eq!(
        refusal(reward(&stack, &a, [1, 1, 1]).await),
        (ErrorCode::Conflict, "already_rewarded".into())
    );
    assert_eq!(
        refusal(dismiss(&stack, &a).await),
        (ErrorCode::FailedPrecondition, "prompt_rewarded".into())
    );
    // The other prompt, dismissed (twice: the same answer), can no longer be rewarded.
    let dismissed = dismiss(&stack, &b).await.unwrap();
    assert_eq!(dismissed.status(), pb::PromptStatus::Dismissed);
    assert_eq!(dismissed.reason, "not now");
    assert_eq!(dismiss(&stack, &b).await.unwrap(), dismissed);
    assert_eq!(
        refusal(reward(&stack, &b, [10, 10, 10]).await),
        (ErrorCode::FailedPrecondition, "prompt_dismissed".into())
    );
    assert!(pending(&stack).await.is_empty());
    // Bad requests.
    assert_eq!(
        refusal(reward(&stack, &b, [11, 0, 0]).await),
        (ErrorCode::InvalidArgument, "invalid_score".into())
    );
    let unknown = uuid::Uuid::new_v4().to_string();
    assert_eq!(
        refusal(reward(&stack, &unknown, [1, 2, 3]).await).0,
        ErrorCode::NotFound
    );
    assert_eq!(
        refusal(reward(&stack, "not-a-prompt", [1, 2, 3]).await).0,
        ErrorCode::InvalidArgument
    );
    // Outside a window, nothing can be shown.
    let outside = stack
        .client
        .call_as::<agent::SubmitPrompt>(
            &agent_id(genesis),
            &pb::SubmitPromptRequest {
                idempotency_id: "outside".into(),
                content: "hello?".into(),
            },
        )
        .await;
    assert_eq!(
        refusal(outside),
        (ErrorCode::FailedPrecondition, "no_window".into())
    );
    assert_eq!(stack.account(&genesis.agent_id).await.balance_micros, after);

    // The books: only the endowment and the reward were minted.
    let audit = stack.audit().await;
    assert!(audit.ok, "{audit:?}");
    assert_eq!(audit.sum_micros, 0);
    assert_eq!(audit.minted_micros, 20 * CREDIT + 1000 * CREDIT);
    let history = stack
        .client
        .call::<syntropism_contracts::economy::internal::History>(&pb::HistoryRequest {
            account: Some(pb::AccountRef {
                account: Some(pb::account_ref::Account::AgentId(genesis.agent_id.clone())),
            }),
            ..Default::default()
        })
        .await
        .unwrap();
    let rewards: Vec<&pb::Transfer> = history
        .transfers
        .iter()
        .filter(|t| t.mint_reason() == pb::MintReason::Reward)
        .collect();
    assert_eq!(rewards.len(), 1, "{history:?}");
    assert_eq!(rewards[0].amount_micros, 1000 * CREDIT);

    // The events: two prompts, one reward, one dismissal.
    let prompted = events_on(&stack, attention_events::PROMPTED, 2).await;
    let mut ids: Vec<&str> = prompted.iter().map(|p| p.prompt_id.as_str()).collect();
    ids.sort();
    let mut expected = [a.as_str(), b.as_str()];
    expected.sort();
    assert_eq!(ids, expected);
    let rewards = events_on(&stack, attention_events::REWARDED, 1).await;
    assert_eq!(rewards.len(), 1);
    assert_eq!(rewards[0].prompt_id, a);
    assert_eq!(rewards[0].reward_micros, 1000 * CREDIT);
    let dismissals = events_on(&stack, attention_events::DISMISSED, 1).await;
    assert_eq!(dismissals.len(), 1);
    assert_eq!(dismissals[0].prompt_id, b);
    stack.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn unanswered_prompts_expire() {
    let mut stack = Stack::start_with(
        PROMPTER,
        &[("SYNTROPISM__ATTENTION__PROMPT_TTL_MS", "2000")],
    )
    .await;
    stack.orchestrator("solo", GENESIS).await;
    let agents = stack
        .until(120, "genesis's three windows", |agents| {
            agents.len() == 1
                && agents[0].execution_count == 3
                && agents[0].status() == pb::AgentStatus::Dormant
        })
        .await;
    let genesis = &agents[0];
    let lines = notes(&stack, &genesis.agent_id);
    let shown: Vec<String> = lines
        .iter()
        .filter(|l| l.contains(" prompted "))
        .map(|l| l.split_whitespace().nth(2).unwrap().to_owned())
        .collect();
    assert_eq!(shown.len(), 2, "{lines:?}");
    // Both expired unanswered: each swept once, with its event.
    let expired = events_on(&stack, attention_events::EXPIRED, 2).await;
    let mut ids: Vec<String> = expired.iter().map(|p| p.prompt_id.clone()).collect();
    ids.sort();
    let mut expected = shown.clone();
    expected.sort();
    assert_eq!(ids, expected);
    for prompt in &expired {
        assert_eq!(prompt.status(), pb::PromptStatus::Expired);
        assert!(prompt.resolved_at.is_some());
    }
    assert!(pending(&stack).await.is_empty());
    assert_eq!(
        refusal(reward(&stack, &shown[0], [5, 5, 5]).await),
        (ErrorCode::FailedPrecondition, "prompt_expired".into())
    );
    assert_eq!(
        refusal(dismiss(&stack, &shown[1]).await),
        (ErrorCode::FailedPrecondition, "prompt_expired".into())
    );
    // Nothing was minted but the endowment.
    let audit = stack.audit().await;
    assert!(audit.ok, "{audit:?}");
    assert_eq!(audit.minted_micros, 20 * CREDIT);
    // Still exactly two expiries (a sweep never expires a prompt twice).
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(
        events_on(&stack, attention_events::EXPIRED, 2).await.len(),
        2
    );
    stack.stop().await;
}
