//! Every economy subject fed garbage and oversize payloads: each gets an error reply with a
//! stable code, and the service stays up with its books intact.

mod common;

use async_nats::HeaderMap;
use bytes::Bytes;
use common::*;
use syntropism_contracts::economy::{agent, internal};
use syntropism_contracts::rpc::{DEFAULT_MAX_REQUEST_BYTES, decode_reply};
use syntropism_contracts::{AgentId, ErrorCode, Method, pb};

fn subjects(agent: &AgentId) -> Vec<(String, usize, bool)> {
    fn entry<M: Method>(agent: &AgentId, mutates: bool) -> (String, usize, bool) {
        let subject = M::ENDPOINT
            .subject(Some(agent))
            .or_else(|_| M::ENDPOINT.subject(None))
            .unwrap();
        (subject, M::MAX_REQUEST_BYTES, mutates)
    }
    vec![
        entry::<internal::OpenAccount>(agent, true),
        entry::<internal::CloseAccount>(agent, true),
        entry::<internal::Transfer>(agent, true),
        entry::<internal::Mint>(agent, true),
        entry::<internal::Hold>(agent, true),
        entry::<internal::PostHold>(agent, true),
        entry::<internal::VoidHold>(agent, true),
        entry::<internal::Batch>(agent, true),
        entry::<internal::Balance>(agent, false),
        entry::<internal::History>(agent, false),
        entry::<internal::Audit>(agent, false),
        entry::<agent::Balance>(agent, false),
        entry::<agent::History>(agent, false),
        entry::<agent::Transfer>(agent, true),
    ]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn garbage_and_oversize_payloads_get_error_replies_and_the_service_stays_up() {
    let h = Harness::start().await;
    let alice = h.funded_agent(10 * CREDIT).await;
    let before = h.audit().await;
    let garbage: Vec<Bytes> = vec![
        Bytes::from_static(&[0xff; 16]),                 // invalid wire type
        Bytes::from_static(b"\x0a\xff\xff\xff\xff\x0f"), // length beyond the buffer
        Bytes::from_static(b"\x12\x05abc"),              // truncated field
        Bytes::from_static(b"GET / HTTP/1.1\r\n\r\n"),
        Bytes::from((0..=255u8).rev().cycle().take(4096).collect::<Vec<u8>>()),
    ];
    assert_eq!(
        subjects(&alice).len(),
        14,
        "every economy method is covered"
    );
    for (subject, limit, mutates) in subjects(&alice) {
        for (i, payload) in garbage.iter().enumerate() {
            let reply = h
                .client
                .request_raw(&subject, HeaderMap::new(), payload.clone())
                .await
                .expect("a reply");
            match decode_reply::<pb::BatchResponse>(reply) {
                Err(error) => assert_eq!(
                    error.code,
                    ErrorCode::InvalidArgument,
                    "{subject} garbage #{i}: {error}"
                ),
                // Protobuf skips unknown fields, so some garbage decodes as an empty request:
                // acceptable only for reads, which have nothing to validate.
                Ok(_) => assert!(!mutates, "{subject} accepted garbage #{i}"),
            }
        }
        // One byte over the method's limit (and the default limit for the others).
        let oversize = Bytes::from(vec![0x08; limit + 1]);
        let reply = h
            .client
            .request_raw(&subject, HeaderMap::new(), oversize)
            .await
            .expect("a reply");
        let error = decode_reply::<pb::BatchResponse>(reply).unwrap_err();
        assert_eq!(error.code, ErrorCode::PayloadTooLarge, "{subject}");
        assert_eq!(
            error.details.get("limit_bytes").map(String::as_str),
            Some(limit.to_string().as_str())
        );
    }

    // The typed client refuses to send an oversize request at all.
    let huge = pb::TransferRequest {
        idempotency_id: "huge".into(),
        op: Some(pb::TransferOp {
            memo: "x".repeat(DEFAULT_MAX_REQUEST_BYTES),
            ..Default::default()
        }),
    };
    assert_eq!(
        h.client
            .call::<internal::Transfer>(&huge)
            .await
            .unwrap_err()
            .code,
        ErrorCode::PayloadTooLarge
    );
    // A memo within the payload limit but over the ledger's limit is refused by the rules.
    let long_memo = pb::TransferRequest {
        idempotency_id: "memo".into(),
        op: Some(pb::TransferOp {
            from: Some(agent_ref(alice)),
            to: Some(burn_ref()),
            amount_micros: 1,
            memo: "x".repeat(2000),
        }),
    };
    assert_eq!(
        h.client
            .call::<internal::Transfer>(&long_memo)
            .await
            .unwrap_err()
            .reason,
        "memo_too_long"
    );
    // An agent subject whose id is not an agent id.
    let reply = h
        .client
        .request_raw(
            "agent.not-a-uuid.economy.balance",
            HeaderMap::new(),
            Bytes::new(),
        )
        .await
        .expect("a reply");
    assert_eq!(
        decode_reply::<pb::AgentBalanceResponse>(reply)
            .unwrap_err()
            .code,
        ErrorCode::InvalidArgument
    );

    // Still serving, books untouched.
    assert_eq!(h.balance(alice).await.balance_micros, 10 * CREDIT);
    let after = h.audit().await;
    assert!(after.ok);
    assert_eq!(after.transfer_count, before.transfer_count);
    h.stop().await;
}
