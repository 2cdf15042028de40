//! The attention service with a real economy, nats-server and Postgres, in-process: rewards
//! cut off half-way (the economy down, a handler dead after minting) are minted exactly once;
//! a dead agent's prompt cannot be rewarded; garbage and hostile requests are refused.
//!
//! Prompts are shown only during windows the orchestrator opens (the orchestrator's end-to-end
//! tests run them through real windows); here each test puts its prompts in the database as a
//! handler would have left them.

use std::time::Duration;

use diesel_async::{AsyncConnection, AsyncPgConnection, RunQueryDsl};
use syntropism_attention::handlers::reward_key;
use syntropism_contracts::attention::{admin, agent};
use syntropism_contracts::economy::internal as economy;
use syntropism_contracts::{AgentId, ErrorCode, RpcClient, RpcError, pb};
use syntropism_test_support::{
    Nats, Postgres, Running, assert_garbage_refused, service_vars, subject_of,
};
use tokio_util::sync::CancellationToken;

const CREDIT: i64 = 1_000_000;
/// The default weight: 50 credits a point.
const POINT: i64 = 50 * CREDIT;

async fn economy(nats: &Nats, pg: &Postgres) -> Running {
    let config: syntropism_economy::EconomyConfig = syntropism_platform::config::load_from(
        syntropism_economy::config::SECTION,
        syntropism_economy::config::DEFAULTS,
        None,
        service_vars(nats, pg, "economy", &[]),
    )
    .unwrap();
    let stop = CancellationToken::new();
    let service = syntropism_economy::start(&config, stop.clone())
        .await
        .unwrap();
    Running::spawn(stop, service.run())
}

async fn attention(nats: &Nats, pg: &Postgres) -> Running {
    let config: syntropism_attention::AttentionConfig = syntropism_platform::config::load_from(
        syntropism_attention::config::SECTION,
        syntropism_attention::config::DEFAULTS,
        None,
        service_vars(
            nats,
            pg,
            "attention",
            &[
                ("SYNTROPISM__ATTENTION__SWEEP_INTERVAL_MS", "100"),
                ("SYNTROPISM__ATTENTION__RESUME_AFTER_MS", "500"),
            ],
        ),
    )
    .unwrap();
    let stop = CancellationToken::new();
    let service = syntropism_attention::start(&config, stop.clone())
        .await
        .unwrap();
    Running::spawn(stop, service.run())
}

async fn client(nats: &Nats) -> RpcClient {
    RpcClient::new(async_nats::connect(nats.url()).await.unwrap())
        .with_timeout(Duration::from_secs(10))
}

async fn open_account(client: &RpcClient, agent: AgentId) {
    client
        .call::<economy::OpenAccount>(&pb::OpenAccountRequest {
            idempotency_id: format!("open:{agent}"),
            op: Some(pb::OpenAccountOp {
                agent_id: agent.to_string(),
            }),
        })
        .await
        .unwrap();
}

async fn balance(client: &RpcClient, agent: AgentId) -> i64 {
    client
        .call::<economy::Balance>(&pb::BalanceRequest {
            account: Some(pb::AccountRef {
                account: Some(pb::account_ref::Account::AgentId(agent.to_string())),
            }),
        })
        .await
        .unwrap()
        .account
        .unwrap()
        .balance_micros
}

async fn db(pg: &Postgres) -> AsyncPgConnection {
    AsyncPgConnection::establish(&pg.admin_url()).await.unwrap()
}

/// A prompt as a handler left it: `status` with `scores` (points) fixed or not.
async fn put_prompt(
    pg: &Postgres,
    agent: AgentId,
    status: &str,
    points: Option<[i32; 3]>,
) -> String {
    let id = uuid::Uuid::now_v7();
    let [i, u, un] = points.map_or(["NULL".to_owned(), "NULL".into(), "NULL".into()], |p| {
        p.map(|v| v.to_string())
    });
    let reward = points.map_or(0, |p| i64::from(p.iter().sum::<i32>()) * POINT);
    diesel::sql_query(format!(
        "INSERT INTO attention.prompts (prompt_id, agent_id, idempotency_id, request_hash, \
         execution_id, window_slots, paid_micros, content, status, created_at, expires_at, \
         interesting, useful, understandable, reward_micros, updated_at) VALUES \
         ('{id}', '{agent}', 'p-{id}', '\\x00', 'exec-{id}', 1, 5000000, 'look', '{status}', \
          now(), now() + interval '1 hour', {i}, {u}, {un}, {reward}, now() - interval '1 minute')"
    ))
    .execute(&mut db(pg).await)
    .await
    .unwrap();
    id.to_string()
}

async fn status_of(pg: &Postgres, id: &str) -> String {
    #[derive(diesel::QueryableByName)]
    struct Row {
        #[diesel(sql_type = diesel::sql_types::Text)]
        status: String,
    }
    let rows: Vec<Row> = diesel::sql_query(format!(
        "SELECT status FROM attention.prompts WHERE prompt_id = '{id}'"
    ))
    .load(&mut db(pg).await)
    .await
    .unwrap();
    rows.into_iter().next().unwrap().status
}

async fn until_status(pg: &Postgres, id: &str, status: &str) {
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    loop {
        let now = status_of(pg, id).await;
        if now == status {
            return;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "prompt {id} is {now}, not {status}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn reward(client: &RpcClient, id: &str, s: [u32; 3]) -> Result<pb::Prompt, RpcError> {
    client
        .call::<admin::Reward>(&pb::RewardRequest {
            prompt_id: id.into(),
            scores: Some(pb::Scores {
                interesting: s[0],
                useful: s[1],
                understandable: s[2],
            }),
            reason: String::new(),
        })
        .await
        .map(|r| r.prompt.unwrap())
}

async fn minted(client: &RpcClient) -> i64 {
    let audit = client
        .call::<economy::Audit>(&pb::AuditRequest {})
        .await
        .unwrap();
    assert!(audit.ok, "{audit:?}");
    audit.minted_micros
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_reward_cut_off_by_the_economy_is_minted_once_it_is_back() {
    let nats = Nats::start();
    let pg = Postgres::fresh_database().await;
    let client = client(&nats).await;
    let agent = AgentId::random();
    let ledger = economy(&nats, &pg).await;
    open_account(&client, agent).await;
    ledger.stop().await;
    let service = attention(&nats, &pg).await;
    let prompt = put_prompt(&pg, agent, "pending", None).await;
    // The economy is down: the scores are fixed, the mint is not done; the answer says retry.
    let error = reward(&client, &prompt, [2, 3, 4]).await.unwrap_err();
    assert!(error.is_retryable(), "{error:?}");
    assert_eq!(status_of(&pg, &prompt).await, "rewarding");
    // Other scores cannot replace the fixed ones.
    let error = reward(&client, &prompt, [9, 9, 9]).await.unwrap_err();
    assert_eq!(
        (error.code, error.reason.as_str()),
        (ErrorCode::Conflict, "already_rewarded")
    );
    // Not in the human's queue any more.
    let pending = client
        .call::<admin::PendingPrompts>(&pb::PendingPromptsRequest { limit: 10 })
        .await
        .unwrap();
    assert!(pending.prompts.is_empty(), "{pending:?}");
    // The economy comes back: the sweep finishes the reward, nobody asks again.
    let ledger = economy(&nats, &pg).await;
    until_status(&pg, &prompt, "rewarded").await;
    assert_eq!(balance(&client, agent).await, 9 * POINT);
    // The operator's retry gets the first outcome; nothing more is minted.
    let done = reward(&client, &prompt, [2, 3, 4]).await.unwrap();
    assert_eq!(done.status(), pb::PromptStatus::Rewarded);
    assert_eq!(done.reward_micros, 9 * POINT);
    assert_eq!(balance(&client, agent).await, 9 * POINT);
    assert_eq!(minted(&client).await, 9 * POINT);
    service.stop().await;
    ledger.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_reward_minted_by_a_handler_that_died_is_not_minted_again() {
    let nats = Nats::start();
    let pg = Postgres::fresh_database().await;
    let client = client(&nats).await;
    let agent = AgentId::random();
    let ledger = economy(&nats, &pg).await;
    open_account(&client, agent).await;
    let service = attention(&nats, &pg).await;
    // Two handlers died after fixing the scores: one before minting, one after.
    let unminted = put_prompt(&pg, agent, "rewarding", Some([1, 1, 1])).await;
    let minted_once = put_prompt(&pg, agent, "rewarding", Some([10, 10, 10])).await;
    client
        .call::<economy::Mint>(&pb::MintRequest {
            idempotency_id: reward_key(minted_once.parse().unwrap()),
            op: Some(pb::MintOp {
                agent_id: agent.to_string(),
                amount_micros: 30 * POINT,
                reason: pb::MintReason::Reward as i32,
                memo: format!("reward for prompt {minted_once}"),
            }),
        })
        .await
        .unwrap();
    until_status(&pg, &unminted, "rewarded").await;
    until_status(&pg, &minted_once, "rewarded").await;
    assert_eq!(balance(&client, agent).await, 33 * POINT);
    assert_eq!(minted(&client).await, 33 * POINT);
    let again = reward(&client, &minted_once, [10, 10, 10]).await.unwrap();
    assert_eq!(again.reward_micros, 30 * POINT);
    assert_eq!(balance(&client, agent).await, 33 * POINT);
    service.stop().await;
    ledger.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_dead_agents_prompt_is_set_aside_unrewarded() {
    let nats = Nats::start();
    let pg = Postgres::fresh_database().await;
    let client = client(&nats).await;
    let agent = AgentId::random();
    let ledger = economy(&nats, &pg).await;
    open_account(&client, agent).await;
    client
        .call::<economy::CloseAccount>(&pb::CloseAccountRequest {
            idempotency_id: format!("death:{agent}"),
            op: Some(pb::CloseAccountOp {
                agent_id: agent.to_string(),
                memo: "death".into(),
            }),
        })
        .await
        .unwrap();
    let service = attention(&nats, &pg).await;
    let prompt = put_prompt(&pg, agent, "pending", None).await;
    for _ in 0..2 {
        let error = reward(&client, &prompt, [5, 5, 5]).await.unwrap_err();
        assert_eq!(
            (error.code, error.reason.as_str()),
            (ErrorCode::FailedPrecondition, "agent_dead"),
            "{error:?}"
        );
    }
    assert_eq!(status_of(&pg, &prompt).await, "dismissed");
    let error = reward(&client, &prompt, [1, 1, 1]).await.unwrap_err();
    assert_eq!(error.reason, "prompt_dismissed");
    assert_eq!(minted(&client).await, 0);
    service.stop().await;
    ledger.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn garbage_and_hostile_requests_are_refused() {
    let nats = Nats::start();
    let pg = Postgres::fresh_database().await;
    let client = client(&nats).await;
    let service = attention(&nats, &pg).await;
    let agent = AgentId::random();
    let subjects = [
        subject_of::<agent::SubmitPrompt>(&agent),
        subject_of::<admin::PendingPrompts>(&agent),
        subject_of::<admin::Reward>(&agent),
        subject_of::<admin::Dismiss>(&agent),
    ];
    assert_garbage_refused(&client, &subjects).await;
    let prompt = |key: &str, content: String| {
        let client = client.clone();
        let request = pb::SubmitPromptRequest {
            idempotency_id: key.into(),
            content,
        };
        async move {
            client
                .call_as::<agent::SubmitPrompt>(&agent, &request)
                .await
                .unwrap_err()
        }
    };
    let cases = [
        (prompt("", "hi".into()).await, ErrorCode::InvalidArgument),
        (prompt("a b", "hi".into()).await, ErrorCode::InvalidArgument),
        (prompt("k", String::new()).await, ErrorCode::InvalidArgument),
        (
            prompt("k", "x".repeat(4097)).await,
            ErrorCode::PayloadTooLarge,
        ),
        // Well-formed, but nobody can say whether a window is open (no orchestrator here).
        (prompt("k", "hi".into()).await, ErrorCode::Unavailable),
    ];
    for (error, code) in cases {
        assert_eq!(error.code, code, "{error:?}");
    }
    let unknown = uuid::Uuid::new_v4().to_string();
    let error = reward(&client, &unknown, [1, 2, 3]).await.unwrap_err();
    assert_eq!(
        (error.code, error.reason.as_str()),
        (ErrorCode::NotFound, "prompt_not_found")
    );
    let error = reward(&client, "'; DROP TABLE prompts; --", [1, 2, 3])
        .await
        .unwrap_err();
    assert_eq!(error.code, ErrorCode::InvalidArgument);
    let error = reward(&client, &unknown, [1, 2, 30]).await.unwrap_err();
    assert_eq!(error.reason, "invalid_score");
    let error = client
        .call::<admin::Reward>(&pb::RewardRequest {
            prompt_id: unknown.clone(),
            scores: None,
            reason: String::new(),
        })
        .await
        .unwrap_err();
    assert_eq!(error.reason, "missing_field");
    let error = client
        .call::<admin::Dismiss>(&pb::DismissRequest {
            prompt_id: unknown,
            reason: "x".repeat(5000),
        })
        .await
        .unwrap_err();
    assert_eq!(error.reason, "reason_too_long");
    service.stop().await;
}
