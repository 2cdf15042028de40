//! The SDK as an execution uses it: NATS in operator mode, the services on their own
//! credentials, the agent on the execution's credentials from env.json.

use std::path::Path;
use std::time::Duration;

use futures::StreamExt;
use syntropism_agent_sdk::{Agent, ExecutionEnv, SdkError};
use syntropism_contracts::economy::internal as economy;
use syntropism_contracts::{AgentId, ErrorCode, RpcClient, pb};
use syntropism_identity::{Authority, ExecutionGrant};
use syntropism_test_support::{Nats, Postgres};
use tokio_util::sync::CancellationToken;

const CREDIT: i64 = 1_000_000;

fn env(nats: &Nats, pg: &Postgres, role: &str, creds: &Path) -> Vec<(String, String)> {
    vec![
        ("SYNTROPISM__NATS__URL".into(), nats.url()),
        (
            "SYNTROPISM__NATS__CREDENTIALS_FILE".into(),
            creds.display().to_string(),
        ),
        ("SYNTROPISM__DATABASE__URL".into(), pg.url_for(role, role)),
        ("SYNTROPISM__DATABASE__ADMIN_URL".into(), pg.admin_url()),
        ("SYNTROPISM__HTTP__ENABLED".into(), "false".into()),
        ("SYNTROPISM__OUTBOX__POLL_INTERVAL_MS".into(), "50".into()),
    ]
}

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
    let authority = Authority::generate();
    let nats = Nats::start_with_config(&authority.server_config().unwrap());
    let pg = Postgres::fresh_database().await;
    let dir = tempfile::tempdir().unwrap();
    let creds = |name: &str| {
        let path = dir.path().join(format!("{name}.creds"));
        std::fs::write(&path, authority.service(name).unwrap().to_creds_file()).unwrap();
        path
    };
    let stop = CancellationToken::new();
    let mut tasks = Vec::new();
    let economy_config: syntropism_economy::EconomyConfig = syntropism_platform::config::load_from(
        syntropism_economy::config::SECTION,
        syntropism_economy::config::DEFAULTS,
        None,
        env(&nats, &pg, "economy", &creds("economy")),
    )
    .unwrap();
    tasks.push(tokio::spawn(
        syntropism_economy::start(&economy_config, stop.clone())
            .await
            .unwrap()
            .run(),
    ));
    let market_config: syntropism_market::MarketConfig = syntropism_platform::config::load_from(
        syntropism_market::config::SECTION,
        syntropism_market::config::DEFAULTS,
        None,
        env(&nats, &pg, "market", &creds("market")),
    )
    .unwrap();
    tasks.push(tokio::spawn(
        syntropism_market::start(&market_config, stop.clone())
            .await
            .unwrap()
            .run(),
    ));
    let scheduler_config: syntropism_scheduler::SchedulerConfig =
        syntropism_platform::config::load_from(
            syntropism_scheduler::config::SECTION,
            syntropism_scheduler::config::DEFAULTS,
            None,
            env(&nats, &pg, "scheduler", &creds("scheduler")),
        )
        .unwrap();
    tasks.push(tokio::spawn(
        syntropism_scheduler::start(&scheduler_config, stop.clone())
            .await
            .unwrap()
            .run(),
    ));

    // The operator's side: two agents, one endowed.
    let admin_nats = async_nats::ConnectOptions::with_credentials_file(creds("cli"))
        .await
        .unwrap()
        .connect(nats.url())
        .await
        .unwrap();
    let admin = RpcClient::new(admin_nats.clone());
    let (alice, bob) = (AgentId::random(), AgentId::random());
    for agent in [alice, bob] {
        admin
            .call::<economy::OpenAccount>(&pb::OpenAccountRequest {
                idempotency_id: format!("open-{agent}"),
                op: Some(pb::OpenAccountOp {
                    agent_id: agent.to_string(),
                }),
            })
            .await
            .unwrap();
    }
    admin
        .call::<economy::Mint>(&pb::MintRequest {
            idempotency_id: "grant".into(),
            op: Some(pb::MintOp {
                agent_id: alice.to_string(),
                amount_micros: 100 * CREDIT,
                reason: pb::MintReason::GenesisGrant as i32,
                memo: String::new(),
            }),
        })
        .await
        .unwrap();
    // Watch what reaches the services on Alice's subjects (headers included).
    let mut watched = admin_nats
        .subscribe(format!("agent.{alice}.market.state"))
        .await
        .unwrap();
    admin_nats.flush().await.unwrap();

    let env = write_env(dir.path(), &authority, &nats, alice, 60);
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

    let window = pb::Bundle {
        cpu_millicores: 1000,
        memory_mib: 512,
        duration_ms: 60_000,
        llm_tokens: 1000,
        attention_slots: 0,
    };
    let reserve = admin
        .call::<syntropism_contracts::market::internal::Quote>(&pb::QuoteRequest {
            bundle: Some(window),
        })
        .await
        .unwrap()
        .reserve_micros;
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
    let late = write_env(late_dir.path(), &authority, &nats, alice, -5);
    assert!(matches!(
        Agent::connect(late).await,
        Err(SdkError::Connect(_))
    ));

    stop.cancel();
    for task in tasks {
        task.await.unwrap();
    }
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
