//! Social end to end: genesis, written with the Python SDK, writes to the human, to itself and
//! on the board from real windows in Docker; fees burned once, messages delivered at the
//! recipient's next window and not before, refusals with their codes — every service real.

mod common;

use std::time::Duration;

use common::{Stack, agent_id};
use syntropism_contracts::social::{admin, agent, internal};
use syntropism_contracts::subjects::social_events;
use syntropism_contracts::{ErrorCode, pb};

const CREDIT: i64 = 1_000_000;

/// Two windows. The first reads its (empty) inbox, writes to the human (and retries), to
/// itself, to nobody, too much, and posts twice on the board; the second reads its inbox.
const SOCIABLE: &str = r#"
import asyncio, json, uuid
from syntropism.agent import Agent, SyntropismError

PLAIN = {"cpu_millicores": 250, "memory_mib": 128, "duration_ms": 8000}

def note(line):
    with open("/workspace/notes.txt", "a") as f:
        f.write(line + "\n")

def shown(messages):
    return json.dumps([[m.from_agent_id, m.to, m.body, m.execution_id] for m in messages])

async def main():
    agent = await Agent.connect()
    me = await agent.whoami()
    n = me.agent.execution_count
    note(f"{n} env {json.dumps(agent.env.inbox)}")
    note(f"{n} inbox {shown(await agent.inbox())}")
    if n == 1:
        sent = await agent.send_message("to-human", "human", "hello human")
        again = await agent.send_message("to-human", "human", "hello human")
        note(f"1 human {sent.message.id} {sent.fee_micros} {again.message.id}")
        mine = await agent.send_message("to-self", agent.id, f"from {agent.env.execution_id}")
        note(f"1 self {mine.message.id}")
        for key, to, body in [("ghost", str(uuid.uuid4()), "boo"), ("big", "human", "x" * 5000),
                              ("bob", "bob", "hi"), ("empty", "human", ""),
                              ("to-human", "human", "another body")]:
            try:
                await agent.send_message(key, to, body)
                note(f"1 {key} accepted")
            except SyntropismError as error:
                note(f"1 {key} {error.code} {error.reason}")
        note(f"1 inbox-after {shown(await agent.inbox())}")
        await agent.post("post-1", "hello board")
        await agent.post("post-1", "hello board")
        await agent.post("post-2", "second post")
        board = await agent.board()
        note(f"1 board {json.dumps([p.body for p in board.posts])} {board.next_before_id}")
        await agent.place_bid("next-1", PLAIN, 1_000_000)
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

fn line<'a>(lines: &'a [String], prefix: &str) -> &'a str {
    lines
        .iter()
        .find(|l| l.starts_with(prefix))
        .unwrap_or_else(|| panic!("no line {prefix:?} in {lines:#?}"))
        .strip_prefix(prefix)
        .unwrap()
        .trim()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn messages_reach_the_human_and_the_next_window_once_paid() {
    let mut stack = Stack::start(SOCIABLE).await;
    stack
        .orchestrator(
            "solo",
            &[
                ("genesis_endowment_micros", "10000000"),
                ("genesis_bid_micros", "1000000"),
            ],
        )
        .await;
    let agents = stack
        .until(120, "genesis's two windows", |agents| {
            agents.len() == 1
                && agents[0].execution_count == 2
                && agents[0].status() == pb::AgentStatus::Dormant
        })
        .await;
    let genesis = &agents[0];
    let me = genesis.agent_id.clone();
    let lines = notes(&stack, &me);
    let detail = stack.detail(&me).await;
    let mut windows = detail.executions.clone();
    windows.sort_by_key(|e| e.started_at.unwrap().seconds);
    let (first, second) = (&windows[0].execution_id, &windows[1].execution_id);

    // Window 1: nothing waiting; its own message is not delivered to itself yet.
    assert_eq!(line(&lines, "1 env"), r#"{"count": 0, "senders": []}"#);
    assert_eq!(line(&lines, "1 inbox "), "[]");
    assert_eq!(line(&lines, "1 inbox-after"), "[]");
    let human: Vec<&str> = line(&lines, "1 human").split_whitespace().collect();
    assert_eq!(human[1], "1000000", "the fee: {lines:?}");
    assert_eq!(human[0], human[2], "a retry answers the same message");
    assert_eq!(line(&lines, "1 ghost"), "NOT_FOUND unknown_recipient");
    assert_eq!(line(&lines, "1 big"), "PAYLOAD_TOO_LARGE body_too_large");
    assert_eq!(line(&lines, "1 bob"), "INVALID_ARGUMENT invalid_recipient");
    assert_eq!(line(&lines, "1 empty"), "INVALID_ARGUMENT empty_body");
    assert_eq!(line(&lines, "1 to-human"), "CONFLICT idempotency_id_reused");
    assert_eq!(
        line(&lines, "1 board"),
        r#"["second post", "hello board"] 0"#
    );
    // Window 2: the summary in env.json, then the message itself, sent from window 1.
    assert_eq!(
        line(&lines, "2 env"),
        format!(r#"{{"count": 1, "senders": ["{me}"]}}"#)
    );
    assert_eq!(
        line(&lines, "2 inbox"),
        format!(r#"[["{me}", "{me}", "from {first}", "{first}"]]"#)
    );
    assert_ne!(first, second);

    // The human's view: one message, from window 1.
    let to_human = stack
        .client
        .call::<admin::HumanMessages>(&pb::HumanMessagesRequest::default())
        .await
        .unwrap();
    assert_eq!(to_human.messages.len(), 1, "{to_human:?}");
    let message = &to_human.messages[0];
    assert_eq!(
        (
            message.from_agent_id.as_str(),
            message.to.as_str(),
            message.body.as_str()
        ),
        (me.as_str(), "human", "hello human")
    );
    assert_eq!(&message.execution_id, first);
    assert_eq!(message.id.to_string(), human[0]);
    assert_eq!(to_human.next_before_id, 0);
    let older = stack
        .client
        .call::<admin::HumanMessages>(&pb::HumanMessagesRequest {
            before_id: message.id,
            limit: 10,
        })
        .await
        .unwrap();
    assert!(older.messages.is_empty());

    // Fees: two messages sent, two credits burned (the retry and the refusals cost nothing);
    // posts are free. Two windows at 1 credit each.
    let account = stack.account(&me).await;
    assert_eq!(
        account.balance_micros,
        10 * CREDIT - 2 * CREDIT - 2 * CREDIT
    );
    let audit = stack.audit().await;
    assert!(audit.ok, "{audit:?}");
    assert_eq!(audit.sum_micros, 0);
    assert_eq!(audit.minted_micros, 10 * CREDIT);
    assert_eq!(audit.burned_micros, 4 * CREDIT);

    // The board, paged, as any agent reads it.
    let genesis_id = agent_id(genesis);
    let page = stack
        .client
        .call_as::<agent::ReadBoard>(
            &genesis_id,
            &pb::ReadBoardRequest {
                before_id: 0,
                limit: 1,
            },
        )
        .await
        .unwrap();
    assert_eq!(page.posts.len(), 1);
    assert_eq!(page.posts[0].body, "second post");
    assert_eq!(page.posts[0].agent_id, me);
    let rest = stack
        .client
        .call_as::<agent::ReadBoard>(
            &genesis_id,
            &pb::ReadBoardRequest {
                before_id: page.next_before_id,
                limit: 1,
            },
        )
        .await
        .unwrap();
    assert_eq!(rest.posts.len(), 1);
    assert_eq!(rest.posts[0].body, "hello board");

    // Outside a window an agent can neither send nor read its inbox.
    let send = stack
        .client
        .call_as::<agent::SendMessage>(
            &genesis_id,
            &pb::SendMessageRequest {
                idempotency_id: "outside".into(),
                to: "human".into(),
                body: "hello?".into(),
            },
        )
        .await
        .unwrap_err();
    assert_eq!(
        (send.code, send.reason.as_str()),
        (ErrorCode::FailedPrecondition, "no_window")
    );
    let inbox = stack
        .client
        .call_as::<agent::ReadInbox>(&genesis_id, &pb::ReadInboxRequest {})
        .await
        .unwrap_err();
    assert_eq!(inbox.reason, "no_window");
    // A window opening now would find nothing new (window 2 sent nothing).
    let now = chrono::Utc::now();
    let summary = stack
        .client
        .call::<internal::InboxSummary>(&pb::InboxSummaryRequest {
            agent_id: me.clone(),
            window_start: Some(prost_types::Timestamp {
                seconds: now.timestamp(),
                nanos: 0,
            }),
        })
        .await
        .unwrap();
    assert_eq!(summary.count, 0);
    assert_eq!(stack.account(&me).await.balance_micros, 6 * CREDIT);

    // Events: two messages sent, two posts.
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    let (sent, posted) = loop {
        let events = stack.events().await;
        let of = |subject: &str| events.iter().filter(|(s, _)| s == subject).count();
        let counts = (of(social_events::MESSAGE_SENT), of(social_events::POSTED));
        if counts == (2, 2) || std::time::Instant::now() > deadline {
            break counts;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    };
    assert_eq!((sent, posted), (2, 2));
    stack.stop().await;
}
