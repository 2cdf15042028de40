//! The typed request/reply layer over a real nats-server.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use async_nats::HeaderMap;
use bytes::Bytes;
use syntropism_contracts::rpc::decode_reply;
use syntropism_contracts::{
    AgentId, ErrorCode, RequestContext, RpcClient, RpcError, RpcServer, headers, pb, rpc_method,
};
use syntropism_test_support::Nats;

rpc_method!(Echo: Internal "test"."echo", pb::AgentHistoryRequest => pb::AgentHistoryRequest, max_request_bytes = 128);
rpc_method!(WhoAmI: Agent "test"."whoami", pb::AgentBalanceRequest => pb::OpenAccountOp);
rpc_method!(Slow: Internal "test"."slow", pb::AgentHistoryRequest => pb::AgentHistoryRequest);
rpc_method!(Panics: Internal "test"."panics", pb::AgentBalanceRequest => pb::AgentBalanceRequest);
rpc_method!(Refuses: Internal "test"."refuses", pb::AgentBalanceRequest => pb::AgentBalanceRequest);
rpc_method!(Nobody: Internal "test"."nobody", pb::AgentBalanceRequest => pb::AgentBalanceRequest);

async fn server(nats: &Nats) -> RpcServer {
    let client = async_nats::connect(nats.url()).await.unwrap();
    let mut server = RpcServer::new(client, "test");
    server
        .serve::<Echo, _, _>(|_ctx, request| async move { Ok(request) })
        .await
        .unwrap();
    server
        .serve::<WhoAmI, _, _>(|ctx: RequestContext, _| async move {
            Ok(pb::OpenAccountOp {
                agent_id: ctx.caller()?.to_string(),
            })
        })
        .await
        .unwrap();
    server
        .serve::<Slow, _, _>(|_ctx, request: pb::AgentHistoryRequest| async move {
            tokio::time::sleep(Duration::from_millis(request.limit as u64)).await;
            Ok(request)
        })
        .await
        .unwrap();
    server
        .serve::<Panics, _, _>(|_ctx, _request| async move {
            if true {
                panic!("boom");
            }
            Ok(pb::AgentBalanceRequest {})
        })
        .await
        .unwrap();
    server
        .serve::<Refuses, _, _>(|_ctx, _request| async move {
            Err(RpcError::insufficient_funds("not today")
                .with_reason("broke")
                .with_detail("needed_micros", 5))
        })
        .await
        .unwrap();
    server
}

async fn client(nats: &Nats) -> RpcClient {
    RpcClient::new(async_nats::connect(nats.url()).await.unwrap())
        .with_timeout(Duration::from_secs(2))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn typed_calls_round_trip_and_errors_keep_code_reason_and_details() {
    let nats = Nats::start();
    let server = server(&nats).await;
    let client = client(&nats).await;
    let request = pb::AgentHistoryRequest {
        before_id: 42,
        limit: 7,
    };
    assert_eq!(client.call::<Echo>(&request).await.unwrap(), request);

    let agent = AgentId::random();
    let me = client
        .call_as::<WhoAmI>(&agent, &pb::AgentBalanceRequest {})
        .await
        .unwrap();
    assert_eq!(
        me.agent_id,
        agent.to_string(),
        "the agent id comes from the subject"
    );
    assert!(
        client
            .call::<WhoAmI>(&pb::AgentBalanceRequest {})
            .await
            .is_err(),
        "agent methods need an agent"
    );

    let error = client
        .call::<Refuses>(&pb::AgentBalanceRequest {})
        .await
        .unwrap_err();
    assert_eq!(error.code, ErrorCode::InsufficientFunds);
    assert_eq!(error.reason, "broke");
    assert_eq!(
        error.details.get("needed_micros").map(String::as_str),
        Some("5")
    );
    assert!(!error.is_retryable());
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn transport_failures_map_to_stable_codes() {
    let nats = Nats::start();
    let server = server(&nats).await;
    let client = client(&nats).await;
    let nobody = client
        .call::<Nobody>(&pb::AgentBalanceRequest {})
        .await
        .unwrap_err();
    assert_eq!(
        (nobody.code, nobody.reason.as_str()),
        (ErrorCode::Unavailable, "no_responders")
    );
    assert!(nobody.is_retryable());

    let impatient = client.clone().with_timeout(Duration::from_millis(100));
    let late = impatient
        .call::<Slow>(&pb::AgentHistoryRequest {
            before_id: 0,
            limit: 1_000,
        })
        .await
        .unwrap_err();
    assert_eq!(late.code, ErrorCode::DeadlineExceeded);
    assert!(late.is_retryable());

    // A panicking handler answers INTERNAL and the server keeps serving.
    let panicked = client
        .call::<Panics>(&pb::AgentBalanceRequest {})
        .await
        .unwrap_err();
    assert_eq!(
        (panicked.code, panicked.reason.as_str()),
        (ErrorCode::Internal, "panic")
    );
    assert!(
        client
            .call::<Echo>(&pb::AgentHistoryRequest::default())
            .await
            .is_ok()
    );
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn payload_limits_are_enforced_by_client_and_server_and_garbage_is_refused() {
    let nats = Nats::start();
    let server = server(&nats).await;
    let client = client(&nats).await;
    // Server side: a raw request over the method's 128-byte limit.
    let reply = client
        .request_raw("test.echo", HeaderMap::new(), Bytes::from(vec![0u8; 129]))
        .await
        .unwrap();
    let error = decode_reply::<pb::AgentHistoryRequest>(reply).unwrap_err();
    assert_eq!(error.code, ErrorCode::PayloadTooLarge);
    // Client side: refused before sending.
    let mut headers_only = HeaderMap::new();
    headers_only.insert("x", "y");
    let big = pb::AgentHistoryRequest {
        before_id: i64::MAX,
        limit: u32::MAX,
    };
    assert!(client.call::<Echo>(&big).await.is_ok(), "small enough");
    let reply = client
        .request_raw(
            "test.echo",
            headers_only,
            Bytes::from_static(&[0xff, 0xff, 0xff]),
        )
        .await
        .unwrap();
    let error = decode_reply::<pb::AgentHistoryRequest>(reply).unwrap_err();
    assert_eq!(
        (error.code, error.reason.as_str()),
        (ErrorCode::InvalidArgument, "malformed_request")
    );
    // An agent subject with a token that is not an agent id.
    let reply = client
        .request_raw("agent.nope.test.whoami", HeaderMap::new(), Bytes::new())
        .await
        .unwrap();
    assert_eq!(
        decode_reply::<pb::OpenAccountOp>(reply).unwrap_err().code,
        ErrorCode::InvalidArgument
    );
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn trace_context_and_correlation_travel_in_headers_both_ways() {
    let nats = Nats::start();
    let server = server(&nats).await;
    let client = client(&nats).await;
    let trace_id = "4bf92f3577b34da6a3ce929d0e0e4736";
    let mut request_headers = HeaderMap::new();
    request_headers.insert(
        headers::TRACEPARENT,
        format!("00-{trace_id}-00f067aa0ba902b7-01").as_str(),
    );
    let payload = prost::Message::encode_to_vec(&pb::AgentHistoryRequest::default());
    let reply = client
        .request_raw("test.echo", request_headers, payload.into())
        .await
        .unwrap();
    let traceparent = reply
        .headers
        .as_ref()
        .and_then(|h| h.get(headers::TRACEPARENT))
        .expect("reply carries traceparent");
    assert!(
        traceparent.as_str().contains(trace_id),
        "the reply continues the caller's trace: {traceparent}"
    );

    // The correlation id reaches the handler.
    let nats_client = async_nats::connect(nats.url()).await.unwrap();
    let mut echo_server = RpcServer::new(nats_client, "corr");
    rpc_method!(Correlated: Internal "test"."correlated", pb::AgentBalanceRequest => pb::OpenAccountOp);
    echo_server
        .serve::<Correlated, _, _>(|ctx: RequestContext, _| async move {
            Ok(pb::OpenAccountOp {
                agent_id: ctx.correlation_id,
            })
        })
        .await
        .unwrap();
    let tagged = client.clone().with_correlation_id("flow-17");
    assert_eq!(
        tagged
            .call::<Correlated>(&pb::AgentBalanceRequest {})
            .await
            .unwrap()
            .agent_id,
        "flow-17"
    );
    let fresh = client
        .call::<Correlated>(&pb::AgentBalanceRequest {})
        .await
        .unwrap()
        .agent_id;
    assert!(
        !fresh.is_empty() && fresh != "flow-17",
        "a new flow gets a new id"
    );
    echo_server.shutdown().await;
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replicas_share_a_queue_group_and_shutdown_finishes_in_flight_requests() {
    let nats = Nats::start();
    let counts = [Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0))];
    let mut servers = Vec::new();
    for count in &counts {
        let mut server = RpcServer::new(async_nats::connect(nats.url()).await.unwrap(), "shared");
        let count = count.clone();
        server
            .serve::<Slow, _, _>(move |_ctx, request: pb::AgentHistoryRequest| {
                let count = count.clone();
                async move {
                    count.fetch_add(1, Ordering::SeqCst);
                    tokio::time::sleep(Duration::from_millis(request.limit as u64)).await;
                    Ok(request)
                }
            })
            .await
            .unwrap();
        servers.push(server);
    }
    let client = client(&nats).await;
    for _ in 0..40 {
        client
            .call::<Slow>(&pb::AgentHistoryRequest {
                before_id: 1,
                limit: 0,
            })
            .await
            .unwrap();
    }
    let (a, b) = (
        counts[0].load(Ordering::SeqCst),
        counts[1].load(Ordering::SeqCst),
    );
    assert_eq!(a + b, 40, "each request handled exactly once");
    assert!(a > 0 && b > 0, "both replicas took work ({a}/{b})");

    // A slow request is in flight when both replicas are told to stop: it still gets its reply.
    let in_flight = {
        let client = client.clone();
        tokio::spawn(async move {
            client
                .call::<Slow>(&pb::AgentHistoryRequest {
                    before_id: 9,
                    limit: 700,
                })
                .await
        })
    };
    tokio::time::sleep(Duration::from_millis(200)).await;
    for server in servers {
        server.shutdown().await;
    }
    let reply = in_flight
        .await
        .unwrap()
        .expect("the in-flight request was answered");
    assert_eq!(reply.before_id, 9);
    let after = client
        .call::<Slow>(&pb::AgentHistoryRequest::default())
        .await
        .unwrap_err();
    assert_eq!(
        after.code,
        ErrorCode::Unavailable,
        "stopped servers take no new requests"
    );
}

#[test]
fn the_python_sdk_descriptors_match_proto() {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../sdk/python/syntropism/descriptor.bin");
    let committed = std::fs::read(&path).expect("sdk/python/syntropism/descriptor.bin");
    assert!(
        committed == syntropism_contracts::FILE_DESCRIPTOR_SET,
        "sdk/python/syntropism/descriptor.bin is stale: run `just sdk-descriptor`"
    );
}

/// A TCP relay to `upstream` that holds every chunk from its clients for `delay` before
/// passing it on (a slow link); returns its address.
async fn slow_link(upstream: u16, delay: Duration) -> std::net::SocketAddr {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((client, _)) = listener.accept().await {
            let server = tokio::net::TcpStream::connect(("127.0.0.1", upstream))
                .await
                .unwrap();
            let (mut client_read, mut client_write) = client.into_split();
            let (mut server_read, mut server_write) = server.into_split();
            tokio::spawn(async move {
                let mut buffer = vec![0u8; 65536];
                while let Ok(n @ 1..) = client_read.read(&mut buffer).await {
                    tokio::time::sleep(delay).await;
                    if server_write.write_all(&buffer[..n]).await.is_err() {
                        break;
                    }
                }
            });
            tokio::spawn(async move {
                let _ = tokio::io::copy(&mut server_read, &mut client_write).await;
            });
        }
    });
    address
}

/// When `serve` returns, the method answers a request sent at once from another connection,
/// even when the server's own link to NATS is slow: `serve` waits until the server has the
/// subscription, not only until its bytes have left.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_method_answers_as_soon_as_serve_returns() {
    let nats = Nats::start();
    let link = slow_link(nats.port(), Duration::from_millis(300)).await;
    let client = client(&nats).await;
    let mut server = RpcServer::new(
        async_nats::connect(format!("nats://{link}")).await.unwrap(),
        "slow",
    );
    server
        .serve::<Echo, _, _>(|_ctx, request| async move { Ok(request) })
        .await
        .unwrap();
    let echoed = client
        .call::<Echo>(&pb::AgentHistoryRequest {
            before_id: 7,
            limit: 1,
        })
        .await
        .unwrap();
    assert_eq!(echoed.before_id, 7);
    server.shutdown().await;
}
