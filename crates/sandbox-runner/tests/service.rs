//! The `sandbox-runner` service end to end: real Docker, the agent runtime image, Postgres and
//! nats-server in operator mode, the economy for agents to reach.

mod common;

use std::time::Duration;

use common::*;
use futures::StreamExt;
use syntropism_contracts::sandbox::internal::GetRun;
use syntropism_contracts::{ErrorCode, events, pb};

/// Appends a line per window to `windows.txt`, asks its balance through the SDK, prints it.
const COUNTING_AGENT: &str = r#"
import asyncio, os, syntropism
async def main():
    agent = await syntropism.Agent.connect()
    balance = await agent.balance()
    with open("/workspace/windows.txt", "a") as f:
        f.write(agent.env.execution_id + "\n")
    print("BALANCE", balance.available_micros)
    print("WINDOWS", len(open("/workspace/windows.txt").read().split()))
    await agent.close()
asyncio.run(main())
"#;

fn outcome(record: &pb::RunRecord) -> pb::RunOutcome {
    record.outcome()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn windows_run_reach_their_services_and_keep_their_workspace() {
    let mut stack = Stack::start().await;
    let mut events = stack
        .nats_client
        .subscribe("events.sandbox.>")
        .await
        .unwrap();
    stack.runner("r1", 2000, &[]).await;
    let agent = stack.agent(COUNTING_AGENT).await;

    let first = stack.request(agent, "exec-1", 60);
    let record = stack.run(&first).await.unwrap();
    assert_eq!(outcome(&record), pb::RunOutcome::Completed, "{record:?}");
    assert_eq!(record.status(), pb::RunStatus::Finished);
    assert_eq!(record.runner_id, "r1");
    assert!(
        record.log_tail.contains("BALANCE 7000000"),
        "{}",
        record.log_tail
    );
    assert!(record.log_tail.contains("WINDOWS 1"), "{}", record.log_tail);
    assert!(record.peak_memory_bytes > 1 << 20, "{record:?}");
    assert!(record.wall_time_ms > 0);

    // The workspace persists into the next window.
    let second = stack
        .run(&stack.request(agent, "exec-2", 60))
        .await
        .unwrap();
    assert_eq!(outcome(&second), pb::RunOutcome::Completed, "{second:?}");
    assert!(second.log_tail.contains("WINDOWS 2"), "{}", second.log_tail);

    // Asking again for a run that happened returns its record and runs nothing.
    let again = stack.run(&first).await.unwrap();
    assert_eq!(again, record);
    let windows = std::fs::read_to_string(stack.workspace(agent).join("windows.txt")).unwrap();
    assert_eq!(windows.lines().collect::<Vec<_>>(), ["exec-1", "exec-2"]);
    // …and the same id with another request is a conflict.
    let mut other = first.clone();
    other.env.insert("X".into(), "1".into());
    let error = stack.run(&other).await.unwrap_err();
    assert_eq!(error.code, ErrorCode::Conflict);

    let got = stack
        .client
        .call::<GetRun>(&pb::GetRunRequest {
            execution_id: "exec-1".into(),
        })
        .await
        .unwrap();
    assert_eq!(got.run.unwrap(), record);

    // Events: started then finished, for each window.
    let mut seen = Vec::new();
    while seen.len() < 4 {
        let message = tokio::time::timeout(Duration::from_secs(10), events.next())
            .await
            .expect("sandbox events")
            .unwrap();
        let envelope: pb::EventEnvelope = prost::Message::decode(message.payload).unwrap();
        if message.subject.as_str() == "events.sandbox.run_finished" {
            let finished: pb::RunFinished = events::open(&envelope).unwrap();
            let run = finished.run.unwrap();
            seen.push(format!("finished {} {:?}", run.execution_id, run.outcome()));
        } else {
            let started: pb::RunStarted = events::open(&envelope).unwrap();
            seen.push(format!("started {}", started.execution_id));
        }
    }
    assert_eq!(
        seen,
        [
            "started exec-1",
            "finished exec-1 Completed",
            "started exec-2",
            "finished exec-2 Completed"
        ]
    );
    stack.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_run_asked_for_many_times_on_two_runners_runs_once() {
    let mut stack = Stack::start().await;
    stack.runner("twice-a", 4000, &[]).await;
    stack.runner("twice-b", 4000, &[]).await;
    let agent = stack.agent(COUNTING_AGENT).await;
    let request = stack.request(agent, "exec-once", 60);
    let asks = (0..6).map(|_| stack.run(&request));
    let results = futures::future::join_all(asks).await;
    let mut records = Vec::new();
    for result in results {
        match result {
            Ok(record) => records.push(record),
            // Asked of the runner that is not running it while it runs: ask again later.
            Err(error) => {
                assert_eq!(error.reason, "running_elsewhere", "{error:?}");
                assert!(error.is_retryable());
            }
        }
    }
    assert!(!records.is_empty());
    let record = stack.run(&request).await.unwrap();
    for other in &records {
        assert_eq!(other, &record);
    }
    assert_eq!(outcome(&record), pb::RunOutcome::Completed, "{record:?}");
    let windows = std::fs::read_to_string(stack.workspace(agent).join("windows.txt")).unwrap();
    assert_eq!(windows.lines().count(), 1, "ran more than once: {windows}");
    stack.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_runner_takes_only_runs_that_fit() {
    let mut stack = Stack::start().await;
    stack.runner("small", 600, &[]).await;
    let sleeper = stack.agent("import time\ntime.sleep(3)\n").await;
    let other = stack.agent("print('fits now')\n").await;
    let long = stack.request(sleeper, "exec-long", 30);
    let client = stack.client.clone();
    let running = tokio::spawn(async move {
        client
            .call::<syntropism_contracts::sandbox::internal::Run>(&long)
            .await
    });
    tokio::time::sleep(Duration::from_millis(700)).await;
    // 500 of 600 millicores are taken.
    let refused = stack
        .run(&stack.request(other, "exec-other", 30))
        .await
        .unwrap_err();
    assert_eq!(refused.code, ErrorCode::Unavailable, "{refused:?}");
    assert_eq!(refused.reason, "no_capacity");
    assert_eq!(
        refused
            .details
            .get("free_cpu_millicores")
            .map(String::as_str),
        Some("100")
    );
    // Bigger than the runner: refused too, saying so.
    let mut huge = stack.request(other, "exec-huge", 30);
    huge.bundle.as_mut().unwrap().cpu_millicores = 4000;
    let refused = stack.run(&huge).await.unwrap_err();
    assert_eq!(refused.reason, "no_capacity");
    assert!(refused.details.contains_key("runner_cpu_millicores"));
    let slept = running.await.unwrap().unwrap().run.unwrap();
    assert_eq!(outcome(&slept), pb::RunOutcome::Completed);
    assert!(slept.wall_time_ms >= 3000, "{slept:?}");
    // Free again.
    let fits = stack
        .run(&stack.request(other, "exec-other", 30))
        .await
        .unwrap();
    assert!(fits.log_tail.contains("fits now"), "{fits:?}");
    stack.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_requests_are_refused_with_their_code() {
    let mut stack = Stack::start().await;
    stack.runner("strict", 2000, &[]).await;
    let agent = stack.agent("print(1)\n").await;
    type Change = Box<dyn Fn(&mut pb::RunRequest)>;
    let cases: Vec<(&str, Change, ErrorCode)> = vec![
        (
            "bad id",
            Box::new(|r| r.execution_id = "../x".into()),
            ErrorCode::InvalidArgument,
        ),
        (
            "bad agent",
            Box::new(|r| r.agent_id = "bob".into()),
            ErrorCode::InvalidArgument,
        ),
        (
            "no bundle",
            Box::new(|r| r.bundle = None),
            ErrorCode::InvalidArgument,
        ),
        (
            "no deadline",
            Box::new(|r| r.deadline = None),
            ErrorCode::InvalidArgument,
        ),
        (
            "past deadline",
            Box::new(|r| {
                r.deadline = Some(prost_types::Timestamp {
                    seconds: 1,
                    nanos: 0,
                })
            }),
            ErrorCode::FailedPrecondition,
        ),
        (
            "other image",
            Box::new(|r| r.image = "debian:latest".into()),
            ErrorCode::Forbidden,
        ),
        (
            "reserved env",
            Box::new(|r| {
                r.env.insert("SYNTROPISM_NATS_SOCKET".into(), "/etc".into());
            }),
            ErrorCode::InvalidArgument,
        ),
        (
            "no credentials",
            Box::new(|r| r.credentials.clear()),
            ErrorCode::InvalidArgument,
        ),
        (
            "bad inbox",
            Box::new(|r| r.inbox_json = "{".into()),
            ErrorCode::InvalidArgument,
        ),
    ];
    for (i, (name, change, code)) in cases.into_iter().enumerate() {
        let mut request = stack.request(agent, &format!("bad-{i}"), 30);
        change(&mut request);
        let error = stack.run(&request).await.unwrap_err();
        assert_eq!(error.code, code, "{name}: {error:?}");
    }
    // Garbage bytes on the subject.
    let reply = stack
        .nats_client
        .request("sandbox.run", "\u{0}garbage".into())
        .await
        .unwrap();
    assert!(reply.headers.is_some());
    // Nothing ran.
    assert!(containers_of("strict").is_empty());
    stack.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_workspace_contents_touch_nothing_outside_it() {
    let mut stack = Stack::start().await;
    stack.runner("hostile-ws", 2000, &[]).await;
    let outside = tempfile::tempdir().unwrap();
    let secret = outside.path().join("host-secret");
    std::fs::write(&secret, "do not touch").unwrap();
    let agent = stack
        .agent(
            r#"
import os
print("ENV", os.path.islink("/workspace/env.json"), len(open("/workspace/env.json").read()) > 10)
print("ESCAPE", os.path.islink("/workspace/escape"), os.path.exists("/workspace/escape"))
try:
    open("/workspace/escape/host-secret").read()
    print("READ HOST")
except OSError as e:
    print("NO HOST FILE", e.errno)
"#,
        )
        .await;
    let ws = stack.workspace(agent);
    // env.json points at a host file; `escape` at the host's directory holding it; odd names;
    // a 20 GB sparse file.
    std::os::unix::fs::symlink(&secret, ws.join("env.json")).unwrap();
    std::os::unix::fs::symlink(outside.path(), ws.join("escape")).unwrap();
    std::fs::write(ws.join("new\nline:name,ro"), "x").unwrap();
    std::fs::write(ws.join("x".repeat(255)), "x").unwrap();
    let huge = std::fs::File::create(ws.join("huge.bin")).unwrap();
    huge.set_len(20 << 30).unwrap();
    let record = stack
        .run(&stack.request(agent, "exec-hostile", 60))
        .await
        .unwrap();
    assert_eq!(outcome(&record), pb::RunOutcome::Completed, "{record:?}");
    assert_eq!(std::fs::read_to_string(&secret).unwrap(), "do not touch");
    assert!(
        std::fs::symlink_metadata(ws.join("env.json"))
            .unwrap()
            .is_file()
    );
    assert!(
        record.log_tail.contains("ENV False True"),
        "{}",
        record.log_tail
    );
    // Inside, the link resolves in the container's own filesystem, where the host dir is not.
    assert!(
        record.log_tail.contains("NO HOST FILE"),
        "{}",
        record.log_tail
    );

    // A workspace that is itself a symlink (to the host dir) is refused, not mounted.
    let linked = stack.agent("print(1)\n").await;
    let linked_ws = stack.workspace(linked);
    std::fs::remove_dir_all(&linked_ws).unwrap();
    std::os::unix::fs::symlink(outside.path(), &linked_ws).unwrap();
    let record = stack
        .run(&stack.request(linked, "exec-linked", 60))
        .await
        .unwrap();
    assert_eq!(outcome(&record), pb::RunOutcome::Failed);
    assert!(record.error.contains("not a directory"), "{record:?}");
    assert_eq!(std::fs::read_dir(outside.path()).unwrap().count(), 1);
    stack.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_runner_leaves_no_container_and_its_run_is_lost() {
    let mut stack = Stack::start().await;
    let mut events = stack
        .nats_client
        .subscribe("events.sandbox.run_finished")
        .await
        .unwrap();
    let agent = stack
        .agent("import time\nprint('sleeping')\ntime.sleep(120)\n")
        .await;
    let mut runner = runner_process(&stack, "phoenix");
    // Asked until the runner (starting) takes it.
    let asked = tokio::spawn(ask_until_answered(
        stack.client.clone(),
        stack.request(agent, "exec-doomed", 120),
    ));
    wait_for_container_of("phoenix").await;
    runner.kill().unwrap();
    runner.wait().unwrap();
    assert_eq!(
        containers_of("phoenix").len(),
        1,
        "the orphan is still there"
    );
    asked.abort();

    // Restarted with the same id, it removes the orphan and reports the run lost.
    stack.runner("phoenix", 2000, &[]).await;
    assert!(containers_of("phoenix").is_empty());
    let got = stack
        .client
        .call::<GetRun>(&pb::GetRunRequest {
            execution_id: "exec-doomed".into(),
        })
        .await
        .unwrap()
        .run
        .unwrap();
    assert_eq!(outcome(&got), pb::RunOutcome::Lost, "{got:?}");
    let message = tokio::time::timeout(Duration::from_secs(10), events.next())
        .await
        .expect("a run_finished event")
        .unwrap();
    let envelope: pb::EventEnvelope = prost::Message::decode(message.payload).unwrap();
    let finished: pb::RunFinished = events::open(&envelope).unwrap();
    assert_eq!(finished.run.unwrap().outcome(), pb::RunOutcome::Lost);
    // Asking again does not run it again.
    let again = stack.run(&stack.request(agent, "exec-doomed", 120)).await;
    assert!(again.is_err() || again.unwrap().outcome() == pb::RunOutcome::Lost);
    assert!(containers_of("phoenix").is_empty());
    stack.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_run_on_a_dead_runner_is_reported_lost_by_another() {
    let mut stack = Stack::start().await;
    let agent = stack.agent("import time\ntime.sleep(120)\n").await;
    // Only the doomed runner serves when the run is asked for.
    let mut doomed = runner_process(&stack, "doomed");
    // The orchestrator's way: ask, and on no answer or a retryable refusal, ask again.
    let asked = tokio::spawn(ask_until_answered(
        stack.client.clone(),
        stack.request(agent, "exec-stranded", 120),
    ));
    wait_for_container_of("doomed").await;
    stack.runner("survivor", 2000, &[]).await;
    doomed.kill().unwrap();
    doomed.wait().unwrap();
    // The survivor sees the silence (no heartbeat for lost_after_ms) and reports the run lost;
    // it never runs it again.
    let record = tokio::time::timeout(Duration::from_secs(30), asked)
        .await
        .expect("an answer after the runner died")
        .unwrap()
        .unwrap()
        .run
        .unwrap();
    assert_eq!(record.outcome(), pb::RunOutcome::Lost, "{record:?}");
    assert_eq!(record.runner_id, "doomed");
    assert!(containers_of("survivor").is_empty());
    // Its container is the dead runner's to remove when it comes back.
    stack.runner("doomed", 2000, &[]).await;
    assert!(containers_of("doomed").is_empty());
    stack.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn debug_mode_waits_for_a_debugger_on_loopback() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stack = Stack::start().await;
    // A free port for this test's debugger.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    stack
        .runner("debugging", 2000, &[("debug_port", &port.to_string())])
        .await;
    let agent = stack.agent("print('attached and running')\n").await;
    let mut request = stack.request(agent, "exec-debug", 60);
    request.debug = true;
    let client = stack.client.clone();
    let running = tokio::spawn(async move {
        client
            .call::<syntropism_contracts::sandbox::internal::Run>(&request)
            .await
    });
    // The program waits for a debugger: attach with the Debug Adapter Protocol.
    let mut stream = None;
    for _ in 0..100 {
        if let Ok(s) = tokio::net::TcpStream::connect(("127.0.0.1", port)).await {
            stream = Some(s);
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let mut stream = stream.expect("the debug port listens on 127.0.0.1");
    let body =
        r#"{"seq":1,"type":"request","command":"initialize","arguments":{"adapterID":"test"}}"#;
    stream
        .write_all(format!("Content-Length: {}\r\n\r\n{body}", body.len()).as_bytes())
        .await
        .unwrap();
    let mut seen = String::new();
    let mut buffer = [0u8; 4096];
    while !seen.contains("\"command\": \"initialize\"")
        && !seen.contains("\"command\":\"initialize\"")
    {
        let n = tokio::time::timeout(Duration::from_secs(20), stream.read(&mut buffer))
            .await
            .expect("debugpy answers")
            .unwrap();
        assert!(n > 0, "the debug connection closed: {seen}");
        seen.push_str(&String::from_utf8_lossy(&buffer[..n]));
    }
    assert!(
        seen.contains("\"success\": true") || seen.contains("\"success\":true"),
        "{seen}"
    );
    // Finish the handshake so the program runs on.
    for (seq, command, arguments) in [(2, "attach", "{}"), (3, "configurationDone", "{}")] {
        let body = format!(
            r#"{{"seq":{seq},"type":"request","command":"{command}","arguments":{arguments}}}"#
        );
        stream
            .write_all(format!("Content-Length: {}\r\n\r\n{body}", body.len()).as_bytes())
            .await
            .unwrap();
    }
    let record = tokio::time::timeout(Duration::from_secs(60), running)
        .await
        .expect("the run ends")
        .unwrap()
        .unwrap()
        .run
        .unwrap();
    assert_eq!(record.outcome(), pb::RunOutcome::Completed, "{record:?}");
    assert!(
        record.log_tail.contains("attached and running"),
        "{}",
        record.log_tail
    );
    stack.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_cannot_read_another_agents_workspace() {
    let mut stack = Stack::start().await;
    stack.runner("neighbours", 2000, &[]).await;
    let victim = stack.agent("print(1)\n").await;
    std::fs::write(stack.workspace(victim).join("secret.txt"), "TOPSECRET").unwrap();
    let thief = stack
        .agent(
            r#"
import os
victim, host_path = os.environ["VICTIM"], os.environ["VICTIM_PATH"]
for path in [f"{host_path}/secret.txt", f"/workspace/../{victim}/secret.txt",
             f"/{victim}/secret.txt", "/workspace/secret.txt"]:
    try:
        print("READ", path, open(path).read())
    except OSError as error:
        print("DENIED", path, error.errno)
mounts = [line.split()[4] for line in open("/proc/self/mountinfo")]
print("MOUNTS", " ".join(m for m in mounts if m.startswith(("/workspace", "/run"))))
"#,
        )
        .await;
    let mut request = stack.request(thief, "exec-thief", 60);
    request.env.insert("VICTIM".into(), victim.to_string());
    request.env.insert(
        "VICTIM_PATH".into(),
        stack.workspace(victim).display().to_string(),
    );
    let record = stack.run(&request).await.unwrap();
    assert_eq!(outcome(&record), pb::RunOutcome::Completed, "{record:?}");
    assert!(
        !record.log_tail.contains("TOPSECRET"),
        "{}",
        record.log_tail
    );
    assert_eq!(
        record.log_tail.matches("DENIED").count(),
        4,
        "{}",
        record.log_tail
    );
    // Its own workspace and the runner's socket directory, nothing else of the host.
    assert!(
        record
            .log_tail
            .contains("MOUNTS /workspace /run/syntropism\n"),
        "{}",
        record.log_tail
    );
    stack.stop().await;
}
