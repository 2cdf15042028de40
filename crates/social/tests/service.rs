//! The social service with a real economy, nats-server and Postgres, in-process: messages a
//! crash left paying are delivered once their fee is burned, once; the board with fees, retries
//! and refusals; garbage and hostile requests refused.
//!
//! Messages are sent only during windows the orchestrator opens (the orchestrator's end-to-end
//! tests run them through real windows); here the messages a crash would leave behind are put
//! in the database as a handler would have left them.

use std::time::Duration;

use diesel_async::{AsyncConnection, AsyncPgConnection, RunQueryDsl};
use sha2::Digest as _;
use syntropism_contracts::economy::internal as economy;
use syntropism_contracts::social::{admin, agent, internal};
use syntropism_contracts::{AgentId, ErrorCode, IdempotencyId, RpcClient, pb};
use syntropism_social::rules;
use syntropism_test_support::{
    Nats, Postgres, Running, assert_garbage_refused, service_vars, subject_of,
};
use tokio_util::sync::CancellationToken;

const CREDIT: i64 = 1_000_000;

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

async fn social(nats: &Nats, pg: &Postgres, extra: &[(&str, &str)]) -> Running {
    let mut settings = vec![
        ("SYNTROPISM__SOCIAL__SWEEP_INTERVAL_MS", "100"),
        ("SYNTROPISM__SOCIAL__RESUME_AFTER_MS", "0"),
    ];
    settings.extend_from_slice(extra);
    let config: syntropism_social::SocialConfig = syntropism_platform::config::load_from(
        syntropism_social::config::SECTION,
        syntropism_social::config::DEFAULTS,
        None,
        service_vars(nats, pg, "social", &settings),
    )
    .unwrap();
    let stop = CancellationToken::new();
    let service = syntropism_social::start(&config, stop.clone())
        .await
        .unwrap();
    Running::spawn(stop, service.run())
}

async fn client(nats: &Nats) -> RpcClient {
    RpcClient::new(async_nats::connect(nats.url()).await.unwrap())
        .with_timeout(Duration::from_secs(10))
}

fn agent_ref(agent: AgentId) -> Option<pb::AccountRef> {
    Some(pb::AccountRef {
        account: Some(pb::account_ref::Account::AgentId(agent.to_string())),
    })
}

/// Opens `agent`'s account with `credits`.
async fn funded(client: &RpcClient, agent: AgentId, credits: i64) {
    client
        .call::<economy::OpenAccount>(&pb::OpenAccountRequest {
            idempotency_id: format!("open:{agent}"),
            op: Some(pb::OpenAccountOp {
                agent_id: agent.to_string(),
            }),
        })
        .await
        .unwrap();
    if credits > 0 {
        client
            .call::<economy::Mint>(&pb::MintRequest {
                idempotency_id: format!("grant:{agent}"),
                op: Some(pb::MintOp {
                    agent_id: agent.to_string(),
                    amount_micros: credits * CREDIT,
                    reason: pb::MintReason::GenesisGrant as i32,
                    memo: "grant".into(),
                }),
            })
            .await
            .unwrap();
    }
}

async fn balance(client: &RpcClient, agent: AgentId) -> i64 {
    client
        .call::<economy::Balance>(&pb::BalanceRequest {
            account: agent_ref(agent),
        })
        .await
        .unwrap()
        .account
        .unwrap()
        .balance_micros
}

async fn burned(client: &RpcClient) -> i64 {
    let audit = client
        .call::<economy::Audit>(&pb::AuditRequest {})
        .await
        .unwrap();
    assert!(audit.ok && audit.sum_micros == 0, "{audit:?}");
    audit.burned_micros
}

async fn db(pg: &Postgres) -> AsyncPgConnection {
    AsyncPgConnection::establish(&pg.admin_url()).await.unwrap()
}

/// A message to the human as a handler left it before its fee was confirmed; returns its id.
async fn put_paying(pg: &Postgres, from: AgentId, key: &str, body: &str) -> i64 {
    #[derive(diesel::QueryableByName)]
    struct Row {
        #[diesel(sql_type = diesel::sql_types::BigInt)]
        id: i64,
    }
    // The fingerprint the service keeps: the request without its idempotency id.
    let request = pb::SendMessageRequest {
        idempotency_id: String::new(),
        to: "human".into(),
        body: body.into(),
    };
    let hash: String = sha2::Sha256::digest(prost::Message::encode_to_vec(&request))
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    let rows: Vec<Row> = diesel::sql_query(format!(
        "INSERT INTO social.messages (from_agent_id, idempotency_id, request_hash, recipient, \
         body, execution_id, fee_micros, state) VALUES ('{from}', '{key}', '\\x{hash}', 'human', \
         '{body}', 'exec-1', {CREDIT}, 'paying') RETURNING id"
    ))
    .load(&mut db(pg).await)
    .await
    .unwrap();
    rows[0].id
}

async fn states(pg: &Postgres) -> Vec<(i64, String)> {
    #[derive(diesel::QueryableByName)]
    struct Row {
        #[diesel(sql_type = diesel::sql_types::BigInt)]
        id: i64,
        #[diesel(sql_type = diesel::sql_types::Text)]
        state: String,
    }
    let rows: Vec<Row> = diesel::sql_query("SELECT id, state FROM social.messages ORDER BY id")
        .load(&mut db(pg).await)
        .await
        .unwrap();
    rows.into_iter().map(|r| (r.id, r.state)).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn messages_a_crash_left_paying_are_delivered_once_their_fee_is_burned() {
    let nats = Nats::start();
    let pg = Postgres::fresh_database().await;
    let client = client(&nats).await;
    let ledger = economy(&nats, &pg).await;
    let rich = AgentId::random();
    let poor = AgentId::random();
    funded(&client, rich, 10).await;
    funded(&client, poor, 0).await;
    // The service runs once (its schema exists), then dies leaving three handlers cut off:
    // before asking the economy, after it burned the fee, and for a sender who cannot pay.
    social(&nats, &pg, &[]).await.stop().await;
    let unpaid = put_paying(&pg, rich, "m-1", "first").await;
    let paid = put_paying(&pg, rich, "m-2", "second").await;
    let broke = put_paying(&pg, poor, "m-3", "third").await;
    client
        .call::<economy::Transfer>(&pb::TransferRequest {
            idempotency_id: rules::fee_key(
                rules::MESSAGE_FEE,
                rich,
                &IdempotencyId::parse("m-2").unwrap(),
            ),
            op: Some(pb::TransferOp {
                from: agent_ref(rich),
                to: Some(pb::AccountRef {
                    account: Some(pb::account_ref::Account::System(
                        pb::SystemAccount::Burn as i32,
                    )),
                }),
                amount_micros: CREDIT,
                memo: rules::message_fee_memo(paid, "human"),
            }),
        })
        .await
        .unwrap();
    assert_eq!(balance(&client, rich).await, 9 * CREDIT);
    // Restarted, its sweep finishes them; nobody sees a message before it is paid for.
    let service = social(&nats, &pg, &[]).await;
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while states(&pg).await.iter().any(|(_, s)| s == "paying") {
        assert!(
            std::time::Instant::now() < deadline,
            "{:?}",
            states(&pg).await
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(
        states(&pg).await,
        [
            (unpaid, "sent".to_owned()),
            (paid, "sent".to_owned()),
            (broke, "refused".to_owned())
        ]
    );
    // Each fee burned once.
    assert_eq!(balance(&client, rich).await, 8 * CREDIT);
    assert_eq!(balance(&client, poor).await, 0);
    assert_eq!(burned(&client).await, 2 * CREDIT);
    // The human sees the two paid messages, newest first, in pages.
    let page = client
        .call::<admin::HumanMessages>(&pb::HumanMessagesRequest {
            before_id: 0,
            limit: 1,
        })
        .await
        .unwrap();
    assert_eq!(page.messages.len(), 1);
    assert_eq!(page.messages[0].body, "second");
    assert_eq!(page.next_before_id, paid);
    let rest = client
        .call::<admin::HumanMessages>(&pb::HumanMessagesRequest {
            before_id: page.next_before_id,
            limit: 10,
        })
        .await
        .unwrap();
    let bodies: Vec<&str> = rest.messages.iter().map(|m| m.body.as_str()).collect();
    assert_eq!(bodies, ["first"]);
    assert_eq!(rest.next_before_id, 0);
    // The senders' retries find the first outcomes, the refusal included, charging nothing.
    let retry = |from: AgentId, key: &str, body: &str| {
        let client = client.clone();
        let request = pb::SendMessageRequest {
            idempotency_id: key.into(),
            to: "human".into(),
            body: body.into(),
        };
        async move { client.call_as::<agent::SendMessage>(&from, &request).await }
    };
    let first = retry(rich, "m-1", "first").await.unwrap();
    assert_eq!(first.message.unwrap().id, unpaid);
    assert_eq!(first.fee_micros, CREDIT);
    let error = retry(poor, "m-3", "third").await.unwrap_err();
    assert_eq!(error.code, ErrorCode::InsufficientFunds);
    let error = retry(rich, "m-2", "changed").await.unwrap_err();
    assert_eq!(error.code, ErrorCode::Conflict);
    assert_eq!(balance(&client, rich).await, 8 * CREDIT);
    assert_eq!(burned(&client).await, 2 * CREDIT);
    service.stop().await;
    ledger.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_board_charges_its_fee_once_and_pages_newest_first() {
    let nats = Nats::start();
    let pg = Postgres::fresh_database().await;
    let client = client(&nats).await;
    let ledger = economy(&nats, &pg).await;
    let service = social(
        &nats,
        &pg,
        &[("SYNTROPISM__SOCIAL__POST_FEE_MICROS", "1000000")],
    )
    .await;
    let alice = AgentId::random();
    let bob = AgentId::random();
    funded(&client, alice, 5).await;
    funded(&client, bob, 0).await;
    let post = |who: AgentId, key: &str, body: String| {
        let client = client.clone();
        let request = pb::PostRequest {
            idempotency_id: key.into(),
            body,
        };
        async move { client.call_as::<agent::Post>(&who, &request).await }
    };
    let first = post(alice, "p-1", "one".into())
        .await
        .unwrap()
        .post
        .unwrap();
    assert_eq!(first.agent_id, alice.to_string());
    assert!(first.posted_at.is_some());
    let again = post(alice, "p-1", "one".into())
        .await
        .unwrap()
        .post
        .unwrap();
    assert_eq!(again, first);
    post(alice, "p-2", "two".into()).await.unwrap();
    post(alice, "p-3", "three".into()).await.unwrap();
    assert_eq!(balance(&client, alice).await, 2 * CREDIT);
    let refusals = [
        (
            post(alice, "p-1", "changed".into()).await,
            ErrorCode::Conflict,
        ),
        (
            post(bob, "b-1", "hi".into()).await,
            ErrorCode::InsufficientFunds,
        ),
        // The first outcome again, even if bob had credits now.
        (
            post(bob, "b-1", "hi".into()).await,
            ErrorCode::InsufficientFunds,
        ),
        (
            post(alice, "p-4", "x".repeat(4097)).await,
            ErrorCode::PayloadTooLarge,
        ),
        (
            post(alice, "p-5", " ".into()).await,
            ErrorCode::InvalidArgument,
        ),
        (
            post(alice, "bad key", "hi".into()).await,
            ErrorCode::InvalidArgument,
        ),
    ];
    for (result, code) in refusals {
        assert_eq!(result.unwrap_err().code, code);
    }
    assert_eq!(balance(&client, alice).await, 2 * CREDIT);
    assert_eq!(burned(&client).await, 3 * CREDIT);
    // Newest first, in pages; bob's refused post is nowhere.
    let read = |before_id: i64, limit: u32| {
        let client = client.clone();
        async move {
            client
                .call_as::<agent::ReadBoard>(&bob, &pb::ReadBoardRequest { before_id, limit })
                .await
                .unwrap()
        }
    };
    let page = read(0, 2).await;
    let bodies: Vec<&str> = page.posts.iter().map(|p| p.body.as_str()).collect();
    assert_eq!(bodies, ["three", "two"]);
    let rest = read(page.next_before_id, 2).await;
    let bodies: Vec<&str> = rest.posts.iter().map(|p| p.body.as_str()).collect();
    assert_eq!(bodies, ["one"]);
    assert_eq!(rest.next_before_id, 0);
    assert_eq!(read(0, 0).await.posts.len(), 3);
    service.stop().await;
    ledger.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn garbage_and_hostile_requests_are_refused() {
    let nats = Nats::start();
    let pg = Postgres::fresh_database().await;
    let client = client(&nats).await;
    let service = social(&nats, &pg, &[]).await;
    let agent = AgentId::random();
    let subjects = [
        subject_of::<agent::SendMessage>(&agent),
        subject_of::<agent::ReadInbox>(&agent),
        subject_of::<agent::Post>(&agent),
        subject_of::<agent::ReadBoard>(&agent),
        subject_of::<internal::InboxSummary>(&agent),
        subject_of::<admin::HumanMessages>(&agent),
    ];
    assert_garbage_refused(&client, &subjects).await;
    let send = |key: &str, to: &str, body: String| {
        let client = client.clone();
        let request = pb::SendMessageRequest {
            idempotency_id: key.into(),
            to: to.into(),
            body,
        };
        async move {
            client
                .call_as::<agent::SendMessage>(&agent, &request)
                .await
                .unwrap_err()
        }
    };
    let cases = [
        (
            send("", "human", "hi".into()).await,
            ErrorCode::InvalidArgument,
            "invalid_field",
        ),
        (
            send("k", "human", "".into()).await,
            ErrorCode::InvalidArgument,
            "empty_body",
        ),
        (
            send("k", "human", "x".repeat(4097)).await,
            ErrorCode::PayloadTooLarge,
            "body_too_large",
        ),
        (
            send("k", "agent.>", "hi".into()).await,
            ErrorCode::InvalidArgument,
            "invalid_recipient",
        ),
        // Well-formed, but nobody can say whether a window is open (no orchestrator here).
        (
            send("k", "human", "hi".into()).await,
            ErrorCode::Unavailable,
            "",
        ),
    ];
    for (error, code, reason) in cases {
        assert_eq!(error.code, code, "{error:?}");
        if !reason.is_empty() {
            assert_eq!(error.reason, reason, "{error:?}");
        }
    }
    let error = client
        .call::<internal::InboxSummary>(&pb::InboxSummaryRequest {
            agent_id: agent.to_string(),
            window_start: None,
        })
        .await
        .unwrap_err();
    assert_eq!(error.reason, "missing_field");
    let error = client
        .call::<internal::InboxSummary>(&pb::InboxSummaryRequest {
            agent_id: "nobody".into(),
            window_start: Some(prost_types::Timestamp::default()),
        })
        .await
        .unwrap_err();
    assert_eq!(error.code, ErrorCode::InvalidArgument);
    // Nothing was written.
    assert!(states(&pg).await.is_empty());
    service.stop().await;
}
