//! Bids and rounds end to end: the economy, the market and the scheduler on a real
//! nats-server and Postgres.

mod common;

use std::collections::HashMap;
use std::time::Duration;

use common::*;
use rand::{Rng, SeedableRng, rngs::StdRng};
use syntropism_contracts::scheduler::{agent, internal};
use syntropism_contracts::{AgentId, ErrorCode, pb};

/// What the ledger must show for each agent, from the bids' final states.
async fn check_escrow(h: &Harness, agents: &[AgentId], endowment: i64) {
    let mut paid: HashMap<AgentId, i64> = HashMap::new();
    let mut pending: HashMap<AgentId, i64> = HashMap::new();
    for agent in agents {
        let bids = h
            .client
            .call_as::<agent::ListBids>(
                agent,
                &pb::ListBidsRequest {
                    limit: 500,
                    ..Default::default()
                },
            )
            .await
            .unwrap()
            .bids;
        for bid in bids {
            match pb::BidStatus::try_from(bid.status).unwrap() {
                pb::BidStatus::Won => *paid.entry(*agent).or_default() += bid.paid_micros,
                pb::BidStatus::Pending => *pending.entry(*agent).or_default() += bid.amount_micros,
                _ => {}
            }
        }
    }
    for agent in agents {
        let account = h.account(*agent).await;
        assert_eq!(
            account.balance_micros,
            endowment - paid.get(agent).copied().unwrap_or(0),
            "{agent}: balance = endowment − what its won bids paid"
        );
        assert_eq!(
            account.pending_micros,
            pending.get(agent).copied().unwrap_or(0),
            "{agent}: escrow = its pending bids"
        );
    }
    let audit = h.audit().await;
    assert!(audit.ok, "{audit:?}");
    assert_eq!(audit.sum_micros, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_agents_bid_through_rounds_and_escrow_follows_the_rounds() {
    let h = Harness::start(&[]).await;
    let endowment = 100 * CREDIT;
    let agents: Vec<AgentId> =
        futures::future::join_all((0..12).map(|_| h.funded_agent(endowment))).await;
    let reserve = h.reserve(window(1000)).await;
    assert!(reserve > 0);

    // Round by round: every agent bids concurrently (some sponsor another, some ask to wait,
    // some expire soon); a few cancel; then the round clears.
    let mut rng = StdRng::seed_from_u64(7);
    let mut sponsored = Vec::new();
    for round in 1..=4u64 {
        let placements = agents.iter().enumerate().map(|(i, agent)| {
            let amount = reserve + rng.random_range(0..5 * CREDIT);
            let beneficiary = if i % 4 == 0 {
                agents[(i + 1) % agents.len()].to_string()
            } else {
                String::new()
            };
            let not_before = (i % 5 == 1).then(|| in_ms(60_000));
            let expires_at = (i % 6 == 2).then(|| in_ms(2_000));
            let request = pb::PlaceBidRequest {
                idempotency_id: format!("r{round}-a{i}"),
                bundle: Some(window(1000)),
                amount_micros: amount,
                beneficiary_id: beneficiary,
                not_before,
                expires_at,
            };
            let client = h.client.clone();
            let agent = *agent;
            async move {
                (
                    agent,
                    client.call_as::<agent::PlaceBid>(&agent, &request).await,
                )
            }
        });
        let placed: Vec<(AgentId, pb::Bid)> = futures::future::join_all(placements)
            .await
            .into_iter()
            .map(|(agent, reply)| (agent, reply.expect("placed").bid.unwrap()))
            .collect();
        for (agent, bid) in &placed {
            assert_eq!(bid.status, pb::BidStatus::Pending as i32);
            if bid.beneficiary_id != agent.to_string() {
                sponsored.push(bid.id);
            }
        }
        // Agent 3 changes its mind.
        let (canceller, bid) = &placed[3];
        let cancelled = h
            .client
            .call_as::<agent::CancelBid>(
                canceller,
                &pb::CancelBidRequest {
                    idempotency_id: format!("cancel-{round}"),
                    bid_id: bid.id,
                },
            )
            .await
            .unwrap()
            .bid
            .unwrap();
        assert_eq!(cancelled.status, pb::BidStatus::Cancelled as i32);
        check_escrow(&h, &agents, endowment).await;

        tokio::time::sleep(Duration::from_millis(2_100)).await; // the short-lived bids expire
        let cleared = h
            .client
            .call::<internal::Clear>(&pb::ClearRequest { round })
            .await
            .unwrap();
        assert_eq!(cleared.round, round);
        // Supply is 4 cores: four 1-core windows win, the highest bids among those due.
        assert_eq!(cleared.allocations.len(), 4, "round {round}");
        assert!(cleared.discovered.is_some(), "the market reported prices");
        assert!(
            cleared.expired >= 2,
            "round {round}: the short-lived bids expired"
        );
        for allocation in &cleared.allocations {
            assert!(allocation.paid_micros >= reserve);
            if sponsored.contains(&allocation.bid_id) {
                assert_ne!(
                    allocation.agent_id, allocation.payer_id,
                    "a sponsored bid runs its beneficiary"
                );
            } else {
                assert_eq!(allocation.agent_id, allocation.payer_id);
            }
        }
        // Clearing the same round again answers the same and changes nothing.
        let again = h
            .client
            .call::<internal::Clear>(&pb::ClearRequest { round })
            .await
            .unwrap();
        assert_eq!(again, cleared);
        check_escrow(&h, &agents, endowment).await;
    }
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_replicas_clear_every_round_exactly_once() {
    let mut h = Harness::start(&[]).await;
    let second = start_scheduler(&h.nats, &h.pg, &[]).await;
    h.services.push(second);
    let agents: Vec<AgentId> =
        futures::future::join_all((0..8).map(|_| h.funded_agent(50 * CREDIT))).await;
    let reserve = h.reserve(window(1000)).await;
    for round in 1..=3u64 {
        for (i, agent) in agents.iter().enumerate() {
            h.client
                .call_as::<agent::PlaceBid>(
                    agent,
                    &pb::PlaceBidRequest {
                        idempotency_id: format!("r{round}-{i}"),
                        bundle: Some(window(1000)),
                        amount_micros: reserve + i as i64 * 1000,
                        ..Default::default()
                    },
                )
                .await
                .unwrap();
        }
        // Both replicas (a queue group) get concurrent requests for the same round.
        let replies = futures::future::join_all((0..8).map(|_| {
            let client = h.client.clone();
            async move {
                client
                    .call::<internal::Clear>(&pb::ClearRequest { round })
                    .await
            }
        }))
        .await;
        let first = replies[0].as_ref().unwrap().clone();
        for reply in &replies {
            let reply = reply.as_ref().unwrap();
            assert_eq!(reply.allocations, first.allocations, "round {round}");
            assert_eq!(reply.cleared_at, first.cleared_at);
        }
        assert_eq!(first.allocations.len(), 4);
    }
    // Each round cleared once: one round_cleared event per round, one bid_won per winner.
    let js = async_nats::jetstream::new(async_nats::connect(h.nats.url()).await.unwrap());
    let mut counts: HashMap<String, usize> = HashMap::new();
    for _ in 0..100 {
        counts.clear();
        let mut stream = js.get_stream("EVENTS").await.unwrap();
        let total = stream.info().await.unwrap().state.messages;
        for sequence in 1..=total {
            let message = stream.get_raw_message(sequence).await.unwrap();
            if message.subject.as_str() == "events.scheduler.round_cleared" {
                let envelope: pb::EventEnvelope =
                    prost::Message::decode(message.payload.clone()).unwrap();
                let cleared: pb::RoundCleared =
                    syntropism_contracts::events::open(&envelope).unwrap();
                assert_eq!(cleared.winners, 4);
                assert!(
                    cleared.discovered.is_some(),
                    "a cleared round carries its prices"
                );
            }
            *counts.entry(message.subject.to_string()).or_default() += 1;
        }
        if counts.get("events.scheduler.round_cleared") == Some(&3)
            && counts.get("events.scheduler.bid_won") == Some(&12)
        {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(
        counts.get("events.scheduler.round_cleared"),
        Some(&3),
        "{counts:?}"
    );
    assert_eq!(
        counts.get("events.scheduler.bid_won"),
        Some(&12),
        "{counts:?}"
    );
    check_escrow(&h, &agents, 50 * CREDIT).await;
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_bids_get_clear_errors_and_change_nothing() {
    let h = Harness::start(&[("SYNTROPISM__SCHEDULER__MAX_PENDING_BIDS", "2")]).await;
    let alice = h.funded_agent(10 * CREDIT).await;
    let bob = h.funded_agent(10 * CREDIT).await;
    let reserve = h.reserve(window(1000)).await;
    let bid = |key: &str, bundle: Option<pb::Bundle>, amount: i64| pb::PlaceBidRequest {
        idempotency_id: key.into(),
        bundle,
        amount_micros: amount,
        ..Default::default()
    };
    let refused = |request: pb::PlaceBidRequest| {
        let client = h.client.clone();
        async move {
            client
                .call_as::<agent::PlaceBid>(&alice, &request)
                .await
                .unwrap_err()
        }
    };
    let cases: Vec<(pb::PlaceBidRequest, ErrorCode, &str)> = vec![
        (
            bid("a1", None, reserve),
            ErrorCode::InvalidArgument,
            "missing_field",
        ),
        (
            bid("a2", Some(window(0)), reserve),
            ErrorCode::InvalidArgument,
            "invalid_bundle",
        ),
        (
            bid("a3", Some(window(1000)), -5),
            ErrorCode::InvalidArgument,
            "invalid_amount",
        ),
        (
            bid("a4", Some(window(1000)), 0),
            ErrorCode::InvalidArgument,
            "invalid_amount",
        ),
        (
            bid("a5", Some(window(u64::MAX)), i64::MAX),
            ErrorCode::InvalidArgument,
            "exceeds_window_limit",
        ),
        (
            bid(
                "a6",
                Some(pb::Bundle {
                    duration_ms: 10_000_000,
                    ..window(1000)
                }),
                reserve,
            ),
            ErrorCode::InvalidArgument,
            "exceeds_window_limit",
        ),
        (
            bid("a7", Some(window(1000)), reserve - 1),
            ErrorCode::InvalidArgument,
            "below_reserve",
        ),
        (
            pb::PlaceBidRequest {
                beneficiary_id: AgentId::random().to_string(),
                ..bid("a8", Some(window(1000)), reserve)
            },
            ErrorCode::NotFound,
            "unknown_beneficiary",
        ),
        (
            pb::PlaceBidRequest {
                beneficiary_id: "not-a-uuid".into(),
                ..bid("a9", Some(window(1000)), reserve)
            },
            ErrorCode::InvalidArgument,
            "invalid_field",
        ),
        (
            pb::PlaceBidRequest {
                expires_at: Some(in_ms(-1000)),
                ..bid("a10", Some(window(1000)), reserve)
            },
            ErrorCode::InvalidArgument,
            "invalid_time",
        ),
        (
            pb::PlaceBidRequest {
                not_before: Some(in_ms(10_000)),
                expires_at: Some(in_ms(5_000)),
                ..bid("a11", Some(window(1000)), reserve)
            },
            ErrorCode::InvalidArgument,
            "invalid_time",
        ),
        (
            bid("", Some(window(1000)), reserve),
            ErrorCode::InvalidArgument,
            "invalid_field",
        ),
        (
            bid("a12", Some(window(1000)), 11 * CREDIT),
            ErrorCode::InsufficientFunds,
            "",
        ),
    ];
    for (request, code, reason) in cases {
        let key = request.idempotency_id.clone();
        let error = refused(request).await;
        assert_eq!(error.code, code, "{key}: {error}");
        if !reason.is_empty() {
            assert_eq!(error.reason, reason, "{key}: {error}");
        }
    }
    // A rejected placement is rejected again on retry.
    let again = refused(bid("a12", Some(window(1000)), 11 * CREDIT)).await;
    assert_eq!(again.code, ErrorCode::InsufficientFunds);

    // The limit on open bids, and an id reused for a different bid.
    for key in ["ok1", "ok2"] {
        h.client
            .call_as::<agent::PlaceBid>(&alice, &bid(key, Some(window(1000)), reserve))
            .await
            .unwrap();
    }
    let error = refused(bid("ok3", Some(window(1000)), reserve)).await;
    assert_eq!(
        (error.code, error.reason.as_str()),
        (ErrorCode::FailedPrecondition, "too_many_bids")
    );
    let error = refused(bid("ok1", Some(window(2000)), reserve)).await;
    assert_eq!(
        (error.code, error.reason.as_str()),
        (ErrorCode::Conflict, "idempotency_id_reused")
    );
    let retry = h
        .client
        .call_as::<agent::PlaceBid>(&alice, &bid("ok1", Some(window(1000)), reserve))
        .await
        .unwrap()
        .bid
        .unwrap();
    // Bob cannot cancel Alice's bid, nor a bid that does not exist.
    for id in [retry.id, 999_999] {
        let error = h
            .client
            .call_as::<agent::CancelBid>(
                &bob,
                &pb::CancelBidRequest {
                    idempotency_id: "c".into(),
                    bid_id: id,
                },
            )
            .await
            .unwrap_err();
        assert_eq!(
            (error.code, error.reason.as_str()),
            (ErrorCode::NotFound, "bid_not_found")
        );
    }
    // Garbage on every scheduler subject.
    use syntropism_contracts::Method;
    let subjects = [
        agent::PlaceBid::ENDPOINT.subject(Some(&alice)).unwrap(),
        agent::CancelBid::ENDPOINT.subject(Some(&alice)).unwrap(),
        agent::ListBids::ENDPOINT.subject(Some(&alice)).unwrap(),
        internal::Clear::ENDPOINT.subject(None).unwrap(),
    ];
    for subject in &subjects {
        for payload in [
            &b"\xff\xff\xff\xff"[..],
            b"\x0a\xff\xff\xff\xff\x0f",
            b"\x12\x05abc",
        ] {
            let reply = h
                .client
                .request_raw(
                    subject,
                    async_nats::HeaderMap::new(),
                    bytes::Bytes::copy_from_slice(payload),
                )
                .await
                .unwrap();
            let error =
                syntropism_contracts::rpc::decode_reply::<pb::ListBidsResponse>(reply).unwrap_err();
            assert_eq!(error.code, ErrorCode::InvalidArgument, "{subject}");
        }
    }
    // Nothing but the two good bids changed anything.
    let alice_account = h.account(alice).await;
    assert_eq!(alice_account.balance_micros, 10 * CREDIT);
    assert_eq!(alice_account.pending_micros, 2 * reserve);
    let bob_account = h.account(bob).await;
    assert_eq!(
        (bob_account.balance_micros, bob_account.pending_micros),
        (10 * CREDIT, 0)
    );
    let listed = h
        .client
        .call_as::<agent::ListBids>(&alice, &pb::ListBidsRequest::default())
        .await
        .unwrap()
        .bids;
    assert_eq!(listed.len(), 2, "rejected placements are not bids");
    assert!(h.audit().await.ok);
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bid_the_economy_refuses_to_settle_is_left_out_and_the_round_goes_on() {
    let h = Harness::start(&[]).await;
    let agents: Vec<AgentId> =
        futures::future::join_all((0..3).map(|_| h.funded_agent(50 * CREDIT))).await;
    let reserve = h.reserve(window(1000)).await;
    let mut bids = Vec::new();
    for (i, agent) in agents.iter().enumerate() {
        let bid = h
            .client
            .call_as::<agent::PlaceBid>(
                agent,
                &pb::PlaceBidRequest {
                    idempotency_id: format!("b{i}"),
                    bundle: Some(window(1000)),
                    amount_micros: reserve + i as i64,
                    ..Default::default()
                },
            )
            .await
            .unwrap()
            .bid
            .unwrap();
        bids.push(bid);
    }
    // Someone releases the second bid's escrow behind the scheduler's back: posting it will be
    // refused, which must not sink the round (nor charge anyone twice).
    h.client
        .call::<syntropism_contracts::economy::internal::VoidHold>(&pb::VoidHoldRequest {
            idempotency_id: "tamper".into(),
            op: Some(pb::VoidHoldOp {
                hold_id: bids[1].hold_id,
            }),
        })
        .await
        .unwrap();
    let cleared = h
        .client
        .call::<internal::Clear>(&pb::ClearRequest { round: 1 })
        .await
        .unwrap();
    let won: Vec<i64> = cleared.allocations.iter().map(|a| a.bid_id).collect();
    assert_eq!(
        won,
        vec![bids[2].id, bids[0].id],
        "the refused bid is left out"
    );
    assert_eq!(cleared.used.unwrap().cpu_millicores, 2000);
    for i in [0, 2] {
        assert_eq!(
            h.account(agents[i]).await.balance_micros,
            50 * CREDIT - bids[i].amount_micros
        );
    }
    let second = h
        .client
        .call_as::<agent::ListBids>(&agents[1], &pb::ListBidsRequest::default())
        .await
        .unwrap()
        .bids;
    assert_eq!(
        second[0].status,
        pb::BidStatus::Pending as i32,
        "back to pending, not charged"
    );
    assert_eq!(h.account(agents[1]).await.balance_micros, 50 * CREDIT);
    // The round answers the same on a retry, and the books balance.
    let again = h
        .client
        .call::<internal::Clear>(&pb::ClearRequest { round: 1 })
        .await
        .unwrap();
    assert_eq!(again, cleared);
    assert!(h.audit().await.ok);
    h.stop().await;
}

/// `pending_for` counts the bids that would run an agent, whoever pays: a sponsor's bid keeps
/// its beneficiary alive, a scheduled bid is told apart, a cancelled one no longer counts.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pending_for_counts_bids_by_beneficiary_whoever_pays() {
    let h = Harness::start(&[]).await;
    let sponsor = h.funded_agent(10 * CREDIT).await;
    let sponsored = h.funded_agent(CREDIT).await;
    let idle = h.funded_agent(CREDIT).await;
    let reserve = h.reserve(window(100)).await;
    let place = |payer: AgentId, key: &str, beneficiary: Option<AgentId>, not_before| {
        let client = h.client.clone();
        let request = pb::PlaceBidRequest {
            idempotency_id: key.into(),
            bundle: Some(window(100)),
            amount_micros: reserve,
            beneficiary_id: beneficiary.map(|b| b.to_string()).unwrap_or_default(),
            not_before,
            ..Default::default()
        };
        async move {
            client
                .call_as::<agent::PlaceBid>(&payer, &request)
                .await
                .unwrap()
                .bid
                .unwrap()
        }
    };
    let ask = |agents: Vec<AgentId>| {
        let client = h.client.clone();
        async move {
            client
                .call::<internal::PendingFor>(&pb::PendingForRequest {
                    agent_ids: agents.iter().map(ToString::to_string).collect(),
                })
                .await
                .unwrap()
                .agents
                .into_iter()
                .map(|p| (p.due, p.scheduled))
                .collect::<Vec<_>>()
        }
    };
    place(sponsor, "for-them", Some(sponsored), None).await;
    place(
        sponsor,
        "for-them-later",
        Some(sponsored),
        Some(in_ms(600_000)),
    )
    .await;
    let own = place(sponsor, "for-me", None, None).await;
    assert_eq!(
        ask(vec![sponsored, sponsor, idle]).await,
        vec![(1, 1), (1, 0), (0, 0)],
        "in the order asked; the sponsor's bids count for whom they run"
    );
    h.client
        .call_as::<agent::CancelBid>(
            &sponsor,
            &pb::CancelBidRequest {
                idempotency_id: "cancel-mine".into(),
                bid_id: own.id,
            },
        )
        .await
        .unwrap();
    assert_eq!(ask(vec![sponsor]).await, vec![(0, 0)]);
    assert_eq!(ask(vec![]).await, vec![]);

    let too_many: Vec<AgentId> = (0..1001).map(|_| AgentId::random()).collect();
    let error = h
        .client
        .call::<internal::PendingFor>(&pb::PendingForRequest {
            agent_ids: too_many.iter().map(ToString::to_string).collect(),
        })
        .await
        .unwrap_err();
    assert_eq!(
        (error.code, error.reason.as_str()),
        (ErrorCode::InvalidArgument, "too_many")
    );
    let error = h
        .client
        .call::<internal::PendingFor>(&pb::PendingForRequest {
            agent_ids: vec!["nobody".into()],
        })
        .await
        .unwrap_err();
    assert_eq!(error.code, ErrorCode::InvalidArgument);
    h.stop().await;
}
