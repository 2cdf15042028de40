//! The ledger end to end: real nats-server, real Postgres, the service in-process.

mod common;

use common::*;
use futures::StreamExt;
use syntropism_contracts::economy::{agent, internal};
use syntropism_contracts::{AgentId, ErrorCode, pb};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn money_moves_by_transfers_holds_posts_and_voids_and_the_books_balance() {
    let h = Harness::start().await;
    let (alice, bob) = (AgentId::random(), AgentId::random());
    let opened = h.open(alice).await;
    assert_eq!(opened.status, pb::AccountStatus::Open as i32);
    assert_eq!(opened.balance_micros, 0);
    h.open(bob).await;

    let grant = h.mint(alice, 100 * CREDIT).await.unwrap();
    assert_eq!(grant.kind, pb::TransferKind::Mint as i32);
    assert_eq!(grant.mint_reason, pb::MintReason::GenesisGrant as i32);

    let paid = h
        .transfer("t1", alice, agent_ref(bob), 30 * CREDIT)
        .await
        .unwrap();
    assert_eq!(paid.amount_micros, 30 * CREDIT);

    // Escrow 50 to burn, post 20 of it: 30 is released.
    let hold = h.hold("h1", alice, burn_ref(), 50 * CREDIT).await.unwrap();
    assert_eq!(hold.status, pb::HoldStatus::Pending as i32);
    let a = h.balance(alice).await;
    assert_eq!(
        (a.balance_micros, a.pending_micros, a.available_micros),
        (70 * CREDIT, 50 * CREDIT, 20 * CREDIT)
    );
    // Available, not posted, balance limits what can be committed.
    let refused = h
        .transfer("t2", alice, agent_ref(bob), 21 * CREDIT)
        .await
        .unwrap_err();
    assert_eq!(refused.code, ErrorCode::InsufficientFunds);
    let posted = h
        .client
        .call::<internal::PostHold>(&pb::PostHoldRequest {
            idempotency_id: "p1".into(),
            op: Some(pb::PostHoldOp {
                hold_id: hold.id,
                amount_micros: Some(20 * CREDIT),
            }),
        })
        .await
        .unwrap();
    assert_eq!(posted.hold.unwrap().posted_micros, 20 * CREDIT);
    assert_eq!(
        posted.transfer.unwrap().kind,
        pb::TransferKind::HoldPost as i32
    );
    let a = h.balance(alice).await;
    assert_eq!((a.balance_micros, a.pending_micros), (50 * CREDIT, 0));

    // A hold to bob, voided: nothing moves.
    let hold = h
        .hold("h2", alice, agent_ref(bob), 10 * CREDIT)
        .await
        .unwrap();
    let voided = h
        .client
        .call::<internal::VoidHold>(&pb::VoidHoldRequest {
            idempotency_id: "v1".into(),
            op: Some(pb::VoidHoldOp { hold_id: hold.id }),
        })
        .await
        .unwrap();
    assert_eq!(voided.hold.unwrap().status, pb::HoldStatus::Voided as i32);
    // A resolved hold cannot be resolved again.
    let again = h
        .client
        .call::<internal::PostHold>(&pb::PostHoldRequest {
            idempotency_id: "p2".into(),
            op: Some(pb::PostHoldOp {
                hold_id: hold.id,
                amount_micros: None,
            }),
        })
        .await
        .unwrap_err();
    assert_eq!(
        (again.code, again.reason.as_str()),
        (ErrorCode::FailedPrecondition, "hold_not_pending")
    );

    assert_eq!(h.balance(alice).await.balance_micros, 50 * CREDIT);
    assert_eq!(h.balance(bob).await.balance_micros, 30 * CREDIT);
    let audit = h.audit().await;
    assert!(audit.ok, "{:?}", audit.violations);
    assert_eq!(audit.sum_micros, 0);
    assert_eq!(audit.minted_micros, 100 * CREDIT);
    assert_eq!(audit.burned_micros, 20 * CREDIT);
    assert_eq!(audit.agents_micros, 80 * CREDIT);
    assert_eq!(audit.transfer_count, 3);
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retry_returns_the_first_outcome_and_a_reused_id_is_refused() {
    let h = Harness::start().await;
    let alice = h.funded_agent(10 * CREDIT).await;
    let bob = h.funded_agent(0).await;
    let first = h
        .transfer("same", alice, agent_ref(bob), CREDIT)
        .await
        .unwrap();
    let retry = h
        .transfer("same", alice, agent_ref(bob), CREDIT)
        .await
        .unwrap();
    assert_eq!(first, retry, "a retry replays the first outcome");
    assert_eq!(
        h.balance(alice).await.balance_micros,
        9 * CREDIT,
        "and moves nothing again"
    );

    let reused = h
        .transfer("same", alice, agent_ref(bob), 2 * CREDIT)
        .await
        .unwrap_err();
    assert_eq!(
        (reused.code, reused.reason.as_str()),
        (ErrorCode::Conflict, "idempotency_mismatch")
    );

    // A refusal is an outcome too: the retry gets the same refusal even after funds arrive.
    let poor = h
        .transfer("too-much", alice, agent_ref(bob), 50 * CREDIT)
        .await
        .unwrap_err();
    assert_eq!(poor.code, ErrorCode::InsufficientFunds);
    h.mint(alice, 100 * CREDIT).await.unwrap();
    let replay = h
        .transfer("too-much", alice, agent_ref(bob), 50 * CREDIT)
        .await
        .unwrap_err();
    assert_eq!(replay, poor);
    // Agents have their own idempotency namespace: the same id is a new request there.
    let mine = h
        .client
        .call_as::<agent::Transfer>(
            &alice,
            &pb::AgentTransferRequest {
                idempotency_id: "same".into(),
                to_agent_id: bob.to_string(),
                amount_micros: CREDIT,
                memo: "thanks".into(),
            },
        )
        .await
        .unwrap();
    assert_ne!(mine.transfer.unwrap().id, first.id);
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_requests_get_clear_codes_and_change_nothing() {
    let h = Harness::start().await;
    let alice = h.funded_agent(10 * CREDIT).await;
    let bob = h.funded_agent(0).await;
    let before = h.audit().await;

    let cases: Vec<(
        &str,
        Result<pb::Transfer, syntropism_contracts::RpcError>,
        ErrorCode,
        &str,
    )> = vec![
        (
            "zero",
            h.transfer("z", alice, agent_ref(bob), 0).await,
            ErrorCode::InvalidArgument,
            "non_positive_amount",
        ),
        (
            "negative",
            h.transfer("n", alice, agent_ref(bob), -5).await,
            ErrorCode::InvalidArgument,
            "non_positive_amount",
        ),
        (
            "self",
            h.transfer("s", alice, agent_ref(alice), 1).await,
            ErrorCode::InvalidArgument,
            "self_transfer",
        ),
        (
            "to mint",
            h.transfer("m", alice, mint_ref(), 1).await,
            ErrorCode::InvalidArgument,
            "invalid_payee",
        ),
        (
            "unknown",
            h.transfer("u", alice, agent_ref(AgentId::random()), 1)
                .await,
            ErrorCode::NotFound,
            "account_not_found",
        ),
        (
            "poor",
            h.transfer("p", alice, agent_ref(bob), 11 * CREDIT).await,
            ErrorCode::InsufficientFunds,
            "insufficient_funds",
        ),
        (
            "no key",
            h.transfer("", alice, agent_ref(bob), 1).await,
            ErrorCode::InvalidArgument,
            "invalid_field",
        ),
        (
            "bad key",
            h.transfer("a b", alice, agent_ref(bob), 1).await,
            ErrorCode::InvalidArgument,
            "invalid_field",
        ),
    ];
    for (name, result, code, reason) in cases {
        let error = result.expect_err(name);
        assert_eq!(
            (error.code, error.reason.as_str()),
            (code, reason),
            "{name}: {error}"
        );
    }
    // Overflow: the recipient's balance cannot exceed i64.
    h.mint(bob, i64::MAX - 1).await.unwrap();
    let overflow = h.mint(bob, 2).await.unwrap_err();
    assert_eq!(
        (overflow.code, overflow.reason.as_str()),
        (ErrorCode::InvalidArgument, "overflow")
    );
    let overflow = h.transfer("o", alice, agent_ref(bob), 2).await.unwrap_err();
    assert_eq!(overflow.reason, "overflow");
    // Mint needs a reason; a system account cannot pay.
    let no_reason = h
        .client
        .call::<internal::Mint>(&pb::MintRequest {
            idempotency_id: "mr".into(),
            op: Some(pb::MintOp {
                agent_id: alice.to_string(),
                amount_micros: 1,
                reason: 0,
                memo: String::new(),
            }),
        })
        .await
        .unwrap_err();
    assert_eq!(no_reason.code, ErrorCode::InvalidArgument);
    let burn_pays = h
        .client
        .call::<internal::Transfer>(&pb::TransferRequest {
            idempotency_id: "bp".into(),
            op: Some(pb::TransferOp {
                from: Some(burn_ref()),
                to: Some(agent_ref(alice)),
                amount_micros: 1,
                memo: String::new(),
            }),
        })
        .await
        .unwrap_err();
    assert_eq!(burn_pays.reason, "invalid_payer");

    let after = h.audit().await;
    assert!(after.ok, "{:?}", after.violations);
    assert_eq!(
        after.transfer_count,
        before.transfer_count + 1,
        "only the successful big mint was written"
    );
    assert_eq!(h.balance(alice).await.balance_micros, 10 * CREDIT);
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_is_all_or_nothing_and_names_the_failing_operation() {
    let h = Harness::start().await;
    let alice = h.funded_agent(10 * CREDIT).await;
    let (carol, dave) = (AgentId::random(), AgentId::random());
    let transfer = |from: AgentId, to: pb::AccountRef, micros: i64| pb::LedgerOp {
        op: Some(pb::ledger_op::Op::Transfer(pb::TransferOp {
            from: Some(agent_ref(from)),
            to: Some(to),
            amount_micros: micros,
            memo: String::new(),
        })),
    };
    let open = |agent: AgentId| pb::LedgerOp {
        op: Some(pb::ledger_op::Op::OpenAccount(pb::OpenAccountOp {
            agent_id: agent.to_string(),
        })),
    };
    // Open carol, pay her, then overdraw: nothing of it may remain.
    let failing = pb::BatchRequest {
        idempotency_id: "b1".into(),
        ops: vec![
            open(carol),
            transfer(alice, agent_ref(carol), 4 * CREDIT),
            transfer(alice, burn_ref(), 7 * CREDIT),
        ],
    };
    let error = h
        .client
        .call::<internal::Batch>(&failing)
        .await
        .unwrap_err();
    assert_eq!(error.code, ErrorCode::InsufficientFunds);
    assert_eq!(error.details.get("op_index").map(String::as_str), Some("2"));
    let missing = h
        .client
        .call::<internal::Balance>(&pb::BalanceRequest {
            account: Some(agent_ref(carol)),
        })
        .await
        .unwrap_err();
    assert_eq!(
        missing.code,
        ErrorCode::NotFound,
        "the opened account was rolled back too"
    );
    assert_eq!(h.balance(alice).await.balance_micros, 10 * CREDIT);

    // Operations before an Open cannot use the account; after it they can.
    let early = pb::BatchRequest {
        idempotency_id: "b2".into(),
        ops: vec![transfer(alice, agent_ref(dave), 1), open(dave)],
    };
    assert_eq!(
        h.client
            .call::<internal::Batch>(&early)
            .await
            .unwrap_err()
            .code,
        ErrorCode::NotFound
    );
    let ok = pb::BatchRequest {
        idempotency_id: "b3".into(),
        ops: vec![
            open(dave),
            transfer(alice, agent_ref(dave), 3 * CREDIT),
            transfer(alice, burn_ref(), 7 * CREDIT),
        ],
    };
    let results = h.client.call::<internal::Batch>(&ok).await.unwrap().results;
    assert_eq!(results.len(), 3);
    assert_eq!(h.balance(alice).await.available_micros, 0);
    assert_eq!(h.balance(dave).await.balance_micros, 3 * CREDIT);
    // Opening twice is refused.
    let twice = pb::BatchRequest {
        idempotency_id: "b4".into(),
        ops: vec![open(dave)],
    };
    assert_eq!(
        h.client
            .call::<internal::Batch>(&twice)
            .await
            .unwrap_err()
            .code,
        ErrorCode::AlreadyExists
    );
    let empty = pb::BatchRequest {
        idempotency_id: "b5".into(),
        ops: vec![],
    };
    assert_eq!(
        h.client
            .call::<internal::Batch>(&empty)
            .await
            .unwrap_err()
            .reason,
        "empty_batch"
    );
    assert!(h.audit().await.ok);
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_batches_keep_their_own_outcomes_when_they_share_a_transaction() {
    // Batches of more than a few operations queue for one committer, which applies those that
    // wait together in one transaction: each must still be all-or-nothing on its own.
    let h = Harness::start().await;
    let payers: Vec<AgentId> =
        futures::future::join_all((0..8).map(|_| h.funded_agent(100 * CREDIT))).await;
    let sink = h.funded_agent(0).await;
    let batch = |i: usize, each: i64| pb::BatchRequest {
        idempotency_id: format!("batch-{i}"),
        ops: (0..20)
            .map(|_| pb::LedgerOp {
                op: Some(pb::ledger_op::Op::Transfer(pb::TransferOp {
                    from: Some(agent_ref(payers[i])),
                    to: Some(agent_ref(sink)),
                    amount_micros: each,
                    memo: format!("batch {i}"),
                })),
            })
            .collect(),
    };
    // Batch 3 overdraws at its 17th transfer (17 × 6 > 100); the others move 20 credits each.
    let requests: Vec<pb::BatchRequest> = (0..8)
        .map(|i| batch(i, if i == 3 { 6 * CREDIT } else { CREDIT }))
        .chain([batch(0, CREDIT)]) // a retry racing its original
        .collect();
    let replies = futures::future::join_all(
        requests
            .iter()
            .map(|request| h.client.call::<internal::Batch>(request)),
    )
    .await;
    for (i, reply) in replies.iter().enumerate() {
        if i == 3 {
            let error = reply.as_ref().unwrap_err();
            assert_eq!(error.code, ErrorCode::InsufficientFunds, "{error:?}");
            assert_eq!(
                error.details.get("op_index").map(String::as_str),
                Some("16")
            );
        } else {
            let results = &reply.as_ref().unwrap().results;
            assert_eq!(results.len(), 20, "batch {i}");
            assert!(results.iter().all(|r| {
                r.transfer
                    .as_ref()
                    .is_some_and(|t| t.memo == format!("batch {}", i % 8))
            }));
        }
    }
    assert_eq!(
        replies[8].as_ref().unwrap(),
        replies[0].as_ref().unwrap(),
        "the retry replays the first outcome"
    );
    for (i, payer) in payers.iter().enumerate() {
        let expected = if i == 3 { 100 } else { 80 };
        assert_eq!(
            h.balance(*payer).await.balance_micros,
            expected * CREDIT,
            "payer {i}"
        );
    }
    assert_eq!(h.balance(sink).await.balance_micros, 7 * 20 * CREDIT);
    // A refused batch is refused again on retry, and its id cannot carry a different body.
    let again = h
        .client
        .call::<internal::Batch>(&batch(3, 6 * CREDIT))
        .await
        .unwrap_err();
    assert_eq!(again.code, ErrorCode::InsufficientFunds);
    let reused = h
        .client
        .call::<internal::Batch>(&batch(3, CREDIT))
        .await
        .unwrap_err();
    assert_eq!(reused.code, ErrorCode::Conflict);
    let audit = h.audit().await;
    assert!(audit.ok, "{audit:?}");
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_big_batch_that_opens_an_account_is_all_or_nothing_too() {
    let h = Harness::start().await;
    let alice = h.funded_agent(10 * CREDIT).await;
    let batch = |key: &str, agent: AgentId, each: i64| pb::BatchRequest {
        idempotency_id: key.into(),
        ops: std::iter::once(pb::LedgerOp {
            op: Some(pb::ledger_op::Op::OpenAccount(pb::OpenAccountOp {
                agent_id: agent.to_string(),
            })),
        })
        .chain((0..20).map(|_| pb::LedgerOp {
            op: Some(pb::ledger_op::Op::Transfer(pb::TransferOp {
                from: Some(agent_ref(alice)),
                to: Some(agent_ref(agent)),
                amount_micros: each,
                memo: String::new(),
            })),
        }))
        .collect(),
    };
    let (carol, dave) = (AgentId::random(), AgentId::random());
    // Run side by side: a failing opener and a good one.
    let failing = batch("big-open-1", carol, CREDIT);
    let good = batch("big-open-2", dave, CREDIT / 10);
    let (failed, opened) = futures::join!(
        h.client.call::<internal::Batch>(&failing),
        h.client.call::<internal::Batch>(&good),
    );
    let error = failed.unwrap_err();
    assert_eq!(error.code, ErrorCode::InsufficientFunds);
    // Its 11th transfer overdraws, or its 9th if the good batch went first.
    let index = error.details.get("op_index").map(String::as_str);
    assert!(matches!(index, Some("9" | "11")), "{index:?}");
    assert_eq!(opened.unwrap().results.len(), 21);
    let missing = h
        .client
        .call::<internal::Balance>(&pb::BalanceRequest {
            account: Some(agent_ref(carol)),
        })
        .await
        .unwrap_err();
    assert_eq!(
        missing.code,
        ErrorCode::NotFound,
        "carol's opening rolled back"
    );
    assert_eq!(h.balance(dave).await.balance_micros, 2 * CREDIT);
    assert_eq!(h.balance(alice).await.balance_micros, 8 * CREDIT);
    let again = h
        .client
        .call::<internal::Batch>(&failing)
        .await
        .unwrap_err();
    assert_eq!(again.code, ErrorCode::InsufficientFunds);
    assert!(h.audit().await.ok);
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn closing_burns_the_remainder_and_is_final() {
    let h = Harness::start().await;
    let alice = h.funded_agent(10 * CREDIT).await;
    let bob = h.funded_agent(0).await;
    let close = |key: &str, agent: AgentId| pb::CloseAccountRequest {
        idempotency_id: key.into(),
        op: Some(pb::CloseAccountOp {
            agent_id: agent.to_string(),
            memo: "died".into(),
        }),
    };
    let hold = h.hold("h", alice, burn_ref(), CREDIT).await.unwrap();
    let refused = h
        .client
        .call::<internal::CloseAccount>(&close("c0", alice))
        .await
        .unwrap_err();
    assert_eq!(
        (refused.code, refused.reason.as_str()),
        (ErrorCode::FailedPrecondition, "pending_holds")
    );
    h.client
        .call::<internal::VoidHold>(&pb::VoidHoldRequest {
            idempotency_id: "v".into(),
            op: Some(pb::VoidHoldOp { hold_id: hold.id }),
        })
        .await
        .unwrap();
    let closed = h
        .client
        .call::<internal::CloseAccount>(&close("c1", alice))
        .await
        .unwrap();
    let account = closed.account.unwrap();
    assert_eq!(account.status, pb::AccountStatus::Closed as i32);
    assert_eq!(account.balance_micros, 0);
    let burn = closed.burn.unwrap();
    assert_eq!(
        (burn.kind, burn.amount_micros),
        (pb::TransferKind::CloseBurn as i32, 10 * CREDIT)
    );

    let to_dead = h.transfer("t", bob, agent_ref(alice), 1).await;
    assert_eq!(
        to_dead.unwrap_err().reason,
        "insufficient_funds",
        "bob is broke: funds are checked first"
    );
    h.mint(bob, CREDIT).await.unwrap();
    let to_dead = h
        .transfer("t2", bob, agent_ref(alice), 1)
        .await
        .unwrap_err();
    assert_eq!(
        (to_dead.code, to_dead.reason.as_str()),
        (ErrorCode::FailedPrecondition, "account_closed")
    );
    assert_eq!(h.mint(alice, 1).await.unwrap_err().reason, "account_closed");
    let reopen = h
        .client
        .call::<internal::OpenAccount>(&pb::OpenAccountRequest {
            idempotency_id: "re".into(),
            op: Some(pb::OpenAccountOp {
                agent_id: alice.to_string(),
            }),
        })
        .await
        .unwrap_err();
    assert_eq!(reopen.code, ErrorCode::AlreadyExists, "death is final");
    // Closing an empty account burns nothing.
    let empty = h.funded_agent(0).await;
    let closed = h
        .client
        .call::<internal::CloseAccount>(&close("c2", empty))
        .await
        .unwrap();
    assert!(closed.burn.is_none());
    let audit = h.audit().await;
    assert!(audit.ok, "{:?}", audit.violations);
    assert_eq!(
        (audit.closed_accounts, audit.burned_micros),
        (2, 10 * CREDIT)
    );
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agents_see_only_their_own_money() {
    let h = Harness::start().await;
    let alice = h.funded_agent(10 * CREDIT).await;
    let bob = h.funded_agent(0).await;
    for i in 0..5 {
        h.client
            .call_as::<agent::Transfer>(
                &alice,
                &pb::AgentTransferRequest {
                    idempotency_id: format!("gift-{i}"),
                    to_agent_id: bob.to_string(),
                    amount_micros: CREDIT,
                    memo: format!("gift {i}"),
                },
            )
            .await
            .unwrap();
    }
    let mine = h
        .client
        .call_as::<agent::Balance>(&alice, &pb::AgentBalanceRequest {})
        .await
        .unwrap();
    assert_eq!(
        (mine.balance_micros, mine.available_micros),
        (5 * CREDIT, 5 * CREDIT)
    );
    // History pages, newest first.
    let page1 = h
        .client
        .call_as::<agent::History>(
            &bob,
            &pb::AgentHistoryRequest {
                before_id: 0,
                limit: 3,
            },
        )
        .await
        .unwrap();
    assert_eq!(page1.transfers.len(), 3);
    assert_eq!(page1.transfers[0].memo, "gift 4");
    let page2 = h
        .client
        .call_as::<agent::History>(
            &bob,
            &pb::AgentHistoryRequest {
                before_id: page1.next_before_id,
                limit: 3,
            },
        )
        .await
        .unwrap();
    assert_eq!(page2.transfers.len(), 2);
    assert_eq!(page2.next_before_id, 0);
    assert!(
        page1
            .transfers
            .iter()
            .chain(&page2.transfers)
            .all(|t| t.credit == Some(agent_ref(bob)))
    );
    // An agent with no account, and an agent paying a stranger.
    let ghost = AgentId::random();
    let none = h
        .client
        .call_as::<agent::Balance>(&ghost, &pb::AgentBalanceRequest {})
        .await
        .unwrap_err();
    assert_eq!(none.code, ErrorCode::NotFound);
    let stranger = h
        .client
        .call_as::<agent::Transfer>(
            &alice,
            &pb::AgentTransferRequest {
                idempotency_id: "x".into(),
                to_agent_id: "not-an-agent".into(),
                amount_micros: 1,
                memo: String::new(),
            },
        )
        .await
        .unwrap_err();
    assert_eq!(stranger.code, ErrorCode::InvalidArgument);
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_posted_change_is_published_once_through_the_outbox() {
    let h = Harness::start().await;
    let nats = async_nats::connect(h.nats.url()).await.unwrap();
    let alice = h.funded_agent(10 * CREDIT).await;
    let bob = h.funded_agent(0).await;
    h.transfer("t", alice, agent_ref(bob), CREDIT)
        .await
        .unwrap();
    h.hold("h", alice, burn_ref(), CREDIT).await.unwrap();

    // Read the EVENTS stream from the start.
    let js = async_nats::jetstream::new(nats);
    let stream = js.get_stream("EVENTS").await.unwrap();
    let consumer = stream
        .create_consumer(async_nats::jetstream::consumer::pull::Config {
            durable_name: None,
            ..Default::default()
        })
        .await
        .unwrap();
    let mut messages = consumer.messages().await.unwrap();
    let mut seen = Vec::new();
    // opened ×2, minted ×1, transfer ×1, hold ×1
    while seen.len() < 5 {
        let message = tokio::time::timeout(std::time::Duration::from_secs(10), messages.next())
            .await
            .expect("events arrive")
            .unwrap()
            .unwrap();
        let envelope: pb::EventEnvelope = prost::Message::decode(message.payload.clone()).unwrap();
        assert!(!envelope.event_id.is_empty() && !envelope.correlation_id.is_empty());
        assert_eq!(envelope.source, "economy");
        seen.push(message.subject.to_string());
        message.ack().await.unwrap();
    }
    seen.sort();
    assert_eq!(
        seen,
        [
            "events.economy.accounts_opened",
            "events.economy.accounts_opened",
            "events.economy.holds_placed",
            "events.economy.transfers_posted",
            "events.economy.transfers_posted",
        ]
    );
    let transfer_event = {
        let info = stream.get_info().await.unwrap();
        info.state.messages
    };
    assert_eq!(transfer_event, 5, "nothing published twice");
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn big_batches_split_their_events_so_each_fits_a_nats_message() {
    let h = Harness::start().await;
    let alice = h.funded_agent(0).await;
    let ops = (0..1_500)
        .map(|_| pb::LedgerOp {
            op: Some(pb::ledger_op::Op::Mint(pb::MintOp {
                agent_id: alice.to_string(),
                amount_micros: 1,
                reason: pb::MintReason::Reward as i32,
                memo: String::new(),
            })),
        })
        .collect();
    let response = h
        .client
        .call::<internal::Batch>(&pb::BatchRequest {
            idempotency_id: "big".into(),
            ops,
        })
        .await
        .unwrap();
    assert_eq!(response.results.len(), 1_500);
    let too_many = (0..5_001)
        .map(|_| pb::LedgerOp {
            op: Some(pb::ledger_op::Op::VoidHold(pb::VoidHoldOp { hold_id: 1 })),
        })
        .collect();
    let error = h
        .client
        .call::<internal::Batch>(&pb::BatchRequest {
            idempotency_id: "huge".into(),
            ops: too_many,
        })
        .await
        .unwrap_err();
    assert_eq!(error.reason, "batch_too_large");

    let js = async_nats::jetstream::new(async_nats::connect(h.nats.url()).await.unwrap());
    let mut stream = js.get_stream("EVENTS").await.unwrap();
    let mut subjects = Vec::new();
    for _ in 0..100 {
        let info = stream.info().await.unwrap();
        if info.state.messages >= 3 {
            for sequence in 1..=info.state.messages {
                let message = stream.get_raw_message(sequence).await.unwrap();
                let envelope: pb::EventEnvelope = prost::Message::decode(message.payload).unwrap();
                if let Ok(posted) =
                    syntropism_contracts::events::open::<pb::TransfersPosted>(&envelope)
                {
                    subjects.push(posted.transfers.len());
                }
            }
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    subjects.sort();
    assert_eq!(subjects, [500, 1_000], "1,500 transfers in two events");
    assert_eq!(h.balance(alice).await.balance_micros, 1_500);
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_opening_stays_refused_on_retry_and_opens_nothing() {
    let h = Harness::start().await;
    let alice = h.funded_agent(CREDIT).await;
    let (carol, dave) = (AgentId::random(), AgentId::random());
    let open = |agent: AgentId| pb::LedgerOp {
        op: Some(pb::ledger_op::Op::OpenAccount(pb::OpenAccountOp {
            agent_id: agent.to_string(),
        })),
    };
    let overdraw = pb::LedgerOp {
        op: Some(pb::ledger_op::Op::Transfer(pb::TransferOp {
            from: Some(agent_ref(alice)),
            to: Some(agent_ref(carol)),
            amount_micros: 5 * CREDIT,
            memo: String::new(),
        })),
    };
    let request = pb::BatchRequest {
        idempotency_id: "opener".into(),
        ops: vec![open(carol), overdraw],
    };
    let first = h
        .client
        .call::<internal::Batch>(&request)
        .await
        .unwrap_err();
    assert_eq!(first.code, ErrorCode::InsufficientFunds);
    let retry = h
        .client
        .call::<internal::Batch>(&request)
        .await
        .unwrap_err();
    assert_eq!(retry, first, "the retry replays the refusal");
    // The same id for another opening is a conflict, and opens nothing either.
    let reused = pb::BatchRequest {
        idempotency_id: "opener".into(),
        ops: vec![open(dave)],
    };
    assert_eq!(
        h.client
            .call::<internal::Batch>(&reused)
            .await
            .unwrap_err()
            .reason,
        "idempotency_mismatch"
    );
    for agent in [carol, dave] {
        let missing = h
            .client
            .call::<internal::Balance>(&pb::BalanceRequest {
                account: Some(agent_ref(agent)),
            })
            .await;
        assert_eq!(
            missing.unwrap_err().code,
            ErrorCode::NotFound,
            "{agent} must not exist"
        );
    }
    assert!(h.audit().await.ok);
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_mutation_whose_reply_would_not_fit_a_message_is_refused_before_it_commits() {
    let h = Harness::start().await;
    let alice = h.funded_agent(10_000 * CREDIT).await;
    let memo = "m".repeat(1_000);
    // 1,000 holds with 1 KB memos, placed in two batches (each within the request limit).
    let mut holds = Vec::new();
    for half in 0..2 {
        let ops = (0..500)
            .map(|_| pb::LedgerOp {
                op: Some(pb::ledger_op::Op::Hold(pb::HoldOp {
                    from: Some(agent_ref(alice)),
                    to: Some(burn_ref()),
                    amount_micros: 1,
                    memo: memo.clone(),
                })),
            })
            .collect();
        let placed = h
            .client
            .call::<internal::Batch>(&pb::BatchRequest {
                idempotency_id: format!("place-{half}"),
                ops,
            })
            .await
            .unwrap();
        holds.extend(placed.results.into_iter().map(|r| r.hold.unwrap().id));
    }
    // Voiding them all is a small request, but its reply repeats every memo: over 1 MB.
    let ops = holds
        .iter()
        .map(|&hold_id| pb::LedgerOp {
            op: Some(pb::ledger_op::Op::VoidHold(pb::VoidHoldOp { hold_id })),
        })
        .collect();
    let request = pb::BatchRequest {
        idempotency_id: "void-all".into(),
        ops,
    };
    let error = h
        .client
        .call::<internal::Batch>(&request)
        .await
        .unwrap_err();
    assert_eq!(
        (error.code, error.reason.as_str()),
        (ErrorCode::InvalidArgument, "reply_too_large")
    );
    assert_eq!(
        h.client
            .call::<internal::Batch>(&request)
            .await
            .unwrap_err(),
        error,
        "the refusal is the recorded outcome"
    );
    let account = h.balance(alice).await;
    assert_eq!(account.pending_micros, 1_000, "nothing was voided");
    assert!(h.audit().await.ok);
    h.stop().await;
}
