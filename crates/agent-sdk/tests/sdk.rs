//! The SDK as an execution uses it: NATS in operator mode, the services on their own
//! credentials, the agent on the execution's credentials from env.json.

use std::path::Path;
use std::time::Duration;

use futures::StreamExt;
mod common;

use common::*;
use syntropism_agent_sdk::{Agent, ExecutionEnv, SdkError};
use syntropism_contracts::{AgentId, ErrorCode, pb};
use syntropism_identity::{Authority, ExecutionGrant};
use syntropism_test_support::Nats;

fn now() -> i64 {
    chrono::Utc::now().timestamp()
}

fn write_env(
    dir: &Path,
    authority: &Authority,
    nats: &Nats,
    agent: AgentId,
    expires_in: i64,
) -> ExecutionEnv {
    let grant = ExecutionGrant {
        agent_id: agent.to_string(),
        inbox_prefix: ExecutionGrant::inbox_prefix_for(&agent.to_string(), "exec-1"),
        expires_at: now() + expires_in,
        name: "exec-1".into(),
    };
    let creds = authority.execution(&grant).unwrap().to_creds_file();
    let json = serde_json::json!({
        "agent_id": agent.to_string(),
        "execution_id": "exec-1",
        "deadline": chrono::Utc::now() + chrono::Duration::seconds(expires_in),
        "nats": { "url": nats.url(), "credentials": creds, "inbox_prefix": grant.inbox_prefix },
        "balance_micros": 100 * CREDIT,
        "bundle": { "cpu_millicores": 1000, "memory_mib": 512, "duration_ms": 60000 },
        "traceparent": "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
    });
    let path = dir.join("env.json");
    std::fs::write(&path, serde_json::to_vec_pretty(&json).unwrap()).unwrap();
    ExecutionEnv::load(&path).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_uses_every_service_with_its_own_identity() {
    let stack = Stack::start().await;
    let (authority, nats, admin_nats) = (&stack.authority, &stack.nats, &stack.admin_nats);
    let dir = tempfile::tempdir().unwrap();
    let (alice, bob) = stack.agents(100 * CREDIT).await;
    // Watch what reaches the services on Alice's subjects (headers included).
    let mut watched = admin_nats
        .subscribe(format!("agent.{alice}.market.state"))
        .await
        .unwrap();
    admin_nats.flush().await.unwrap();

    let env = write_env(dir.path(), authority, nats, alice, 60);
    assert_eq!(env.bundle.cpu_millicores, 1000);
    let agent = Agent::connect(env).await.expect("the execution connects");
    assert_eq!(agent.id(), alice);
    assert!(agent.time_left() > Duration::from_secs(50));

    let balance = agent.balance().await.unwrap();
    assert_eq!(balance.available_micros, 100 * CREDIT);
    let paid = agent
        .transfer("t1", bob, 5 * CREDIT, "thanks")
        .await
        .unwrap();
    assert_eq!(paid.available_micros, 95 * CREDIT);
    let again = agent
        .transfer("t1", bob, 5 * CREDIT, "thanks")
        .await
        .unwrap();
    assert_eq!(
        again.transfer, paid.transfer,
        "a retry returns the first outcome"
    );
    assert_eq!(agent.history(0, 10).await.unwrap().transfers.len(), 2);

    let state = agent.market_state(0).await.unwrap();
    assert!(state.catalogue.is_some());
    let watched = tokio::time::timeout(Duration::from_secs(5), watched.next())
        .await
        .unwrap()
        .unwrap();
    let headers = watched.headers.expect("headers");
    assert_eq!(
        headers.get("traceparent").map(|v| v.as_str()),
        Some("00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"),
        "the window's trace continues in every request"
    );

    let window = window();
    let reserve = stack.reserve().await;
    let bid = agent
        .place_bid(&pb::PlaceBidRequest {
            idempotency_id: "bid-1".into(),
            bundle: Some(window),
            amount_micros: reserve,
            ..Default::default()
        })
        .await
        .unwrap();
    assert_eq!(bid.status, pb::BidStatus::Pending as i32);
    assert_eq!(agent.balance().await.unwrap().pending_micros, reserve);
    let listed = agent
        .list_bids(pb::BidStatus::Pending, 0, 10)
        .await
        .unwrap();
    assert_eq!(listed.bids.len(), 1);
    let cancelled = agent.cancel_bid("cancel-1", bid.id).await.unwrap();
    assert_eq!(cancelled.status, pb::BidStatus::Cancelled as i32);
    assert_eq!(agent.balance().await.unwrap().pending_micros, 0);

    // Refusals carry the service's code.
    let error = agent
        .transfer("t2", AgentId::random(), CREDIT, "")
        .await
        .unwrap_err();
    assert_eq!(error.code(), Some(ErrorCode::NotFound), "{error}");
    let error = agent
        .transfer("t3", bob, 1_000 * CREDIT, "")
        .await
        .unwrap_err();
    assert_eq!(error.code(), Some(ErrorCode::InsufficientFunds), "{error}");

    // A window whose credentials have expired cannot connect.
    let late_dir = tempfile::tempdir().unwrap();
    let late = write_env(late_dir.path(), authority, nats, alice, -5);
    assert!(matches!(
        Agent::connect(late).await,
        Err(SdkError::Connect(_))
    ));

    stack.stop().await;
}

#[test]
fn a_broken_env_file_is_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("env.json");
    std::fs::write(&path, r#"{"agent_id": "not-a-uuid"}"#).unwrap();
    let error = ExecutionEnv::load(&path).unwrap_err();
    assert!(error.to_string().contains("env.json"), "{error}");
    assert!(ExecutionEnv::load(&dir.path().join("missing.json")).is_err());
}
