//! `just bench-sandbox`: time from asking for a run to the agent's first NATS request, over
//! `BENCH_RUNS` (default 50) runs each of:
//!
//! - **runner**: a `sandbox.run` request to the sandbox-runner service (in this process: claim
//!   in Postgres, `env.json`, the NATS relay, create, start), the agent in its full sandbox;
//! - **docker run**: `docker run --rm` of the same image and program (host network, the same
//!   execution credentials);
//! - **docker start**: `docker start` of a container created beforehand (what a warm pool of
//!   pre-created containers would pay).
//!
//! The program is the same in all three: the Python SDK connects with `env.json`'s credentials
//! and sends one request, which this process answers and timestamps. Runs are sequential; the
//! NATS server, Postgres and Docker are real and local. Prints p50/p99 per path and the ratio
//! of the runner's p50 to `docker run`'s (target ≤ 1.2).

use std::collections::HashMap;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use futures::StreamExt;
use hdrhistogram::Histogram;
use syntropism_contracts::sandbox::internal::Run;
use syntropism_contracts::{AgentId, RpcClient, pb};
use syntropism_identity::{Authority, ExecutionGrant};
use syntropism_sandbox_runner::sandbox::AGENT_UID;
use syntropism_test_support::{Nats, Postgres};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

const IMAGE: &str = "syntropism/agent-runtime:latest";

const MAIN: &str = r#"
import asyncio, syntropism
async def main():
    agent = await syntropism.Agent.connect()
    await agent._nc.request(f"agent.{agent.id}.bench.ping", agent.env.execution_id.encode(), timeout=10)
    await agent.close()
asyncio.run(main())
"#;

fn now_secs() -> i64 {
    chrono::Utc::now().timestamp()
}

struct Bench {
    authority: Authority,
    nats: Nats,
    agent: AgentId,
    workspace: std::path::PathBuf,
    /// Execution ids as their first request arrives.
    arrivals: mpsc::UnboundedReceiver<String>,
}

impl Bench {
    fn grant(&self, execution: &str) -> (ExecutionGrant, String) {
        let grant = ExecutionGrant {
            agent_id: self.agent.to_string(),
            inbox_prefix: ExecutionGrant::inbox_prefix_for(&self.agent.to_string(), execution),
            expires_at: now_secs() + 120,
            name: execution.into(),
        };
        let creds = self.authority.execution(&grant).unwrap().to_creds_file();
        (grant, creds)
    }

    /// `env.json` for running outside the runner (host network, NATS directly).
    fn write_env(&self, execution: &str) {
        let (grant, creds) = self.grant(execution);
        let env = serde_json::json!({
            "agent_id": self.agent.to_string(),
            "execution_id": execution,
            "deadline": chrono::DateTime::from_timestamp(grant.expires_at, 0).unwrap().to_rfc3339(),
            "nats": {"url": self.nats.url(), "credentials": creds, "inbox_prefix": grant.inbox_prefix},
        });
        let path = self.workspace.join("env.json");
        std::fs::write(&path, env.to_string()).unwrap();
        std::os::unix::fs::chown(&path, Some(AGENT_UID), Some(AGENT_UID)).unwrap();
    }

    async fn arrival(&mut self, execution: &str) {
        loop {
            let id = tokio::time::timeout(Duration::from_secs(60), self.arrivals.recv())
                .await
                .expect("the agent's request arrives")
                .unwrap();
            if id == execution {
                return;
            }
        }
    }

    fn docker_args(&self) -> Vec<String> {
        [
            "--network",
            "host",
            "--read-only",
            "--tmpfs",
            "/tmp:rw,noexec,nosuid,size=64m",
            "--user",
            "10001:10001",
            "--cap-drop",
            "ALL",
            "--security-opt",
            "no-new-privileges:true",
            "--cpus",
            "0.5",
            "--memory",
            "256m",
            "--memory-swap",
            "256m",
            "--pids-limit",
            "128",
            "-v",
        ]
        .iter()
        .map(|s| s.to_string())
        .chain([format!("{}:/workspace:rw", self.workspace.display())])
        .chain([IMAGE.to_owned()])
        .collect()
    }
}

fn quiet(command: &mut Command) {
    let status = command
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .unwrap();
    assert!(status.success(), "{command:?} failed");
}

fn row(name: &str, histogram: &Histogram<u64>) -> (f64, f64) {
    let p50 = histogram.value_at_quantile(0.5) as f64 / 1000.0;
    let p99 = histogram.value_at_quantile(0.99) as f64 / 1000.0;
    println!(
        "| {name:<44} | {:>5} | {p50:>8.1} | {p99:>8.1} | {:>8.1} |",
        histogram.len(),
        histogram.min() as f64 / 1000.0
    );
    (p50, p99)
}

#[tokio::main]
async fn main() {
    let runs: usize = std::env::var("BENCH_RUNS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(50);
    assert!(
        Command::new("docker")
            .args(["image", "inspect", IMAGE])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success()),
        "{IMAGE} is missing: run `just agent-image`"
    );
    let authority = Authority::generate();
    let nats = Nats::start_with_config(&authority.server_config().unwrap());
    let pg = Postgres::fresh_database().await;
    let dir = tempfile::tempdir().unwrap();
    let workspaces = dir.path().join("workspaces");
    let agent = AgentId::random();
    let workspace = workspaces.join(agent.to_string());
    std::fs::create_dir_all(&workspace).unwrap();
    std::fs::write(workspace.join("main.py"), MAIN).unwrap();
    std::os::unix::fs::chown(&workspace, Some(AGENT_UID), Some(AGENT_UID)).unwrap();

    let creds = |name: &str| {
        let path = dir.path().join(format!("{name}.creds"));
        std::fs::write(&path, authority.service(name).unwrap().to_creds_file()).unwrap();
        path
    };
    let client = async_nats::ConnectOptions::with_credentials_file(creds("bench"))
        .await
        .unwrap()
        .connect(nats.url())
        .await
        .unwrap();
    let mut pings = client
        .subscribe(format!("agent.{agent}.bench.ping"))
        .await
        .unwrap();
    client.flush().await.unwrap();
    let (arrived, arrivals) = mpsc::unbounded_channel();
    let responder = client.clone();
    tokio::spawn(async move {
        while let Some(message) = pings.next().await {
            let _ = arrived.send(String::from_utf8_lossy(&message.payload).into_owned());
            if let Some(reply) = message.reply {
                let _ = responder.publish(reply, "pong".into()).await;
            }
        }
    });

    let stop = CancellationToken::new();
    let vars = vec![
        ("SYNTROPISM__NATS__URL".to_owned(), nats.url()),
        (
            "SYNTROPISM__NATS__CREDENTIALS_FILE".to_owned(),
            creds("sandbox").display().to_string(),
        ),
        (
            "SYNTROPISM__DATABASE__URL".to_owned(),
            pg.url_for("sandbox", "sandbox"),
        ),
        ("SYNTROPISM__DATABASE__ADMIN_URL".to_owned(), pg.admin_url()),
        ("SYNTROPISM__HTTP__ENABLED".to_owned(), "false".to_owned()),
        (
            "SYNTROPISM__TELEMETRY__LOG_FILTER".to_owned(),
            "warn".to_owned(),
        ),
        (
            "SYNTROPISM__SANDBOX__RUNNER_ID".to_owned(),
            "bench-runner".to_owned(),
        ),
        (
            "SYNTROPISM__SANDBOX__WORKSPACE_ROOT".to_owned(),
            workspaces.display().to_string(),
        ),
        (
            "SYNTROPISM__SANDBOX__RUN_DIR".to_owned(),
            dir.path().join("runs").display().to_string(),
        ),
    ];
    let config: syntropism_sandbox_runner::RunnerConfig = syntropism_platform::config::load_from(
        syntropism_sandbox_runner::config::SECTION,
        syntropism_sandbox_runner::config::DEFAULTS,
        None,
        vars,
    )
    .unwrap();
    let service = syntropism_sandbox_runner::start(&config, stop.clone())
        .await
        .unwrap();
    let served = tokio::spawn(service.run());
    let rpc = RpcClient::new(client.clone()).with_timeout(Duration::from_secs(120));

    let mut bench = Bench {
        authority,
        nats,
        agent,
        workspace: workspace.clone(),
        arrivals,
    };
    let mut histograms: HashMap<&str, Histogram<u64>> = HashMap::new();
    let new = || Histogram::<u64>::new_with_bounds(1, 600_000_000, 3).unwrap();
    println!(
        "Sandbox start-up: {runs} runs per path, request → the agent's first NATS request (ms)\n"
    );

    // Warm-up, unmeasured (page cache, image layers).
    for i in 0..2 {
        let execution = format!("warm-{i}");
        bench.write_env(&execution);
        quiet(
            Command::new("docker")
                .arg("run")
                .arg("--rm")
                .args(bench.docker_args()),
        );
        bench.arrival(&execution).await;
    }

    let mut runner_totals = new();
    for i in 0..runs {
        // The runner path.
        let execution = format!("runner-{i}");
        let (grant, credentials) = bench.grant(&execution);
        let request = pb::RunRequest {
            execution_id: execution.clone(),
            agent_id: agent.to_string(),
            bundle: Some(pb::Bundle {
                cpu_millicores: 500,
                memory_mib: 256,
                duration_ms: 60_000,
                llm_tokens: 0,
                attention_slots: 0,
            }),
            deadline: Some(prost_types::Timestamp {
                seconds: grant.expires_at,
                nanos: 0,
            }),
            credentials,
            inbox_prefix: grant.inbox_prefix.clone(),
            ..Default::default()
        };
        let started = Instant::now();
        let call = {
            let rpc = rpc.clone();
            tokio::spawn(async move { rpc.call::<Run>(&request).await })
        };
        bench.arrival(&execution).await;
        histograms
            .entry("runner: sandbox.run → first request")
            .or_insert_with(new)
            .record(started.elapsed().as_micros() as u64)
            .unwrap();
        let record = call
            .await
            .unwrap()
            .expect("the run is reported")
            .run
            .unwrap();
        assert_eq!(
            record.outcome(),
            pb::RunOutcome::Completed,
            "{}",
            record.log_tail
        );
        runner_totals
            .record(started.elapsed().as_micros() as u64)
            .unwrap();

        // docker run --rm.
        let execution = format!("run-{i}");
        bench.write_env(&execution);
        let started = Instant::now();
        let mut child = Command::new("docker")
            .arg("run")
            .arg("--rm")
            .args(bench.docker_args())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        bench.arrival(&execution).await;
        histograms
            .entry("docker run --rm → first request")
            .or_insert_with(new)
            .record(started.elapsed().as_micros() as u64)
            .unwrap();
        assert!(
            tokio::task::block_in_place(|| child.wait())
                .unwrap()
                .success()
        );

        // docker start of a pre-created container.
        let execution = format!("start-{i}");
        bench.write_env(&execution);
        let name = format!("bench-precreated-{}-{i}", std::process::id());
        quiet(
            Command::new("docker")
                .args(["create", "--name", &name])
                .args(bench.docker_args()),
        );
        let started = Instant::now();
        let mut child = Command::new("docker")
            .args(["start", "-a", &name])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        bench.arrival(&execution).await;
        histograms
            .entry("docker start (pre-created) → first request")
            .or_insert_with(new)
            .record(started.elapsed().as_micros() as u64)
            .unwrap();
        assert!(
            tokio::task::block_in_place(|| child.wait())
                .unwrap()
                .success()
        );
        quiet(Command::new("docker").args(["rm", "-f", &name]));
    }

    println!(
        "| path                                         |  runs |  p50 ms  |  p99 ms  |  min ms  |"
    );
    println!(
        "|----------------------------------------------|------:|---------:|---------:|---------:|"
    );
    let (runner, _) = row(
        "runner: sandbox.run → first request",
        &histograms["runner: sandbox.run → first request"],
    );
    let (run, _) = row(
        "docker run --rm → first request",
        &histograms["docker run --rm → first request"],
    );
    let (start, _) = row(
        "docker start (pre-created) → first request",
        &histograms["docker start (pre-created) → first request"],
    );
    row("runner: sandbox.run → reply (whole run)", &runner_totals);
    println!(
        "\nrunner p50 / docker run p50 = {:.2} (target ≤ 1.20)\n\
         a warm pool (docker start of a pre-created container) would save {:.0} ms at p50 \
         ({:.0}% of the runner's start-up)",
        runner / run,
        (runner - start).max(0.0),
        ((runner - start).max(0.0) / runner) * 100.0
    );
    stop.cancel();
    let _ = served.await;
    drop(pg);
}
