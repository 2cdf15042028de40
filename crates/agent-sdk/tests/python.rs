//! The Python SDK inside the agent runtime image, against the real services: NATS in operator
//! mode, the agent on an execution's credentials from env.json. Needs Docker and the image
//! (`just agent-image`; `scripts/test.sh` builds it).

use std::process::Stdio;
use std::time::Duration;

mod common;

use common::*;
use syntropism_identity::ExecutionGrant;

const IMAGE: &str = "syntropism/agent-runtime:latest";

const MAIN: &str = r#"
import asyncio, json, syntropism
from syntropism import pb

async def main():
    facts = json.load(open("/workspace/facts.json"))
    agent = await syntropism.Agent.connect()
    out = {"id": agent.id}
    out["available"] = (await agent.balance()).available_micros
    paid = await agent.transfer("py-t1", facts["bob"], 5_000_000, "from python")
    out["after_transfer"] = paid.available_micros
    out["history"] = len((await agent.history()).transfers)
    out["max_window_ms"] = (await agent.market_state()).catalogue.max_window_ms
    window = {"cpu_millicores": 1000, "memory_mib": 512, "duration_ms": 60000, "llm_tokens": 1000}
    bid = await agent.place_bid("py-bid", window, facts["reserve"])
    out["bid"] = pb.BidStatus.name(bid.status)
    out["pending"] = (await agent.balance()).pending_micros
    out["listed"] = len((await agent.list_bids(status=pb.BidStatus.PENDING)).bids)
    out["cancelled"] = pb.BidStatus.name((await agent.cancel_bid("py-cancel", bid.id)).status)
    try:
        await agent.transfer("py-t2", facts["bob"], 10**12)
    except syntropism.SyntropismError as error:
        out["error"] = [error.code, error.retryable]
    try:
        await agent.place_bid("py-low", window, 1)
    except syntropism.SyntropismError as error:
        out["low"] = [error.code, error.reason, error.details.get("reserve_micros")]
    await agent.close()
    print(json.dumps(out))

asyncio.run(main())
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_python_sdk_works_from_the_agent_runtime_image() {
    let docker = std::process::Command::new("docker")
        .args(["image", "inspect", IMAGE])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status();
    assert!(
        docker.is_ok_and(|s| s.success()),
        "the agent runtime image {IMAGE} is missing (or Docker is not running): run `just agent-image` (scripts/test.sh builds it)"
    );
    let stack = Stack::start().await;
    let (authority, nats) = (&stack.authority, &stack.nats);
    let (alice, bob) = stack.agents(100 * CREDIT).await;
    let reserve = stack.reserve().await;

    // The workspace: main.py, env.json with the execution's credentials, the test's facts.
    let workspace = tempfile::tempdir().unwrap();
    let grant = ExecutionGrant {
        agent_id: alice.to_string(),
        inbox_prefix: ExecutionGrant::inbox_prefix_for(&alice.to_string(), "py-1"),
        expires_at: chrono::Utc::now().timestamp() + 120,
        name: "py-1".into(),
    };
    let env_json = serde_json::json!({
        "agent_id": alice.to_string(),
        "execution_id": "py-1",
        "deadline": chrono::Utc::now() + chrono::Duration::seconds(120),
        "nats": {
            "url": nats.url(),
            "credentials": authority.execution(&grant).unwrap().to_creds_file(),
            "inbox_prefix": grant.inbox_prefix,
        },
        "balance_micros": 100 * CREDIT,
    });
    std::fs::write(workspace.path().join("env.json"), env_json.to_string()).unwrap();
    std::fs::write(
        workspace.path().join("facts.json"),
        serde_json::json!({ "bob": bob.to_string(), "reserve": reserve }).to_string(),
    )
    .unwrap();
    std::fs::write(workspace.path().join("main.py"), MAIN).unwrap();

    // Host networking only so the container reaches this test's nats-server on loopback.
    let output = tokio::time::timeout(
        Duration::from_secs(60),
        tokio::process::Command::new("docker")
            .args([
                "run",
                "--rm",
                "--network",
                "host",
                "--read-only",
                "--tmpfs",
                "/tmp:size=16m",
                "--cap-drop",
                "ALL",
                "--security-opt",
                "no-new-privileges",
            ])
            .arg("-v")
            .arg(format!("{}:/workspace:ro", workspace.path().display()))
            .arg(IMAGE)
            .output(),
    )
    .await
    .expect("the agent finishes")
    .expect("docker runs");
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "the agent failed: {}\n{stdout}",
        String::from_utf8_lossy(&output.stderr)
    );
    let out: serde_json::Value =
        serde_json::from_str(stdout.trim()).expect("the agent printed JSON");
    assert_eq!(out["id"], alice.to_string());
    assert_eq!(out["available"], 100 * CREDIT);
    assert_eq!(out["after_transfer"], 95 * CREDIT);
    assert_eq!(out["history"], 2);
    assert_eq!(out["max_window_ms"], 300_000);
    assert_eq!(out["bid"], "PENDING");
    assert_eq!(out["pending"], reserve);
    assert_eq!(out["listed"], 1);
    assert_eq!(out["cancelled"], "CANCELLED");
    assert_eq!(
        out["error"],
        serde_json::json!(["INSUFFICIENT_FUNDS", false])
    );
    assert_eq!(out["low"][0], "INVALID_ARGUMENT");
    assert_eq!(out["low"][1], "below_reserve");
    assert_eq!(out["low"][2], reserve.to_string());

    stack.stop().await;
}
