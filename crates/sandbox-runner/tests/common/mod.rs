//! Runners as the orchestrator meets them: NATS in operator mode, Postgres, the economy (so
//! agents have a service to reach), runners in-process or as their own process, and a client on
//! service credentials.
#![allow(dead_code, unused_imports, unreachable_pub)]

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use syntropism_contracts::economy::internal as economy;
use syntropism_contracts::sandbox::internal::Run;
use syntropism_contracts::{AgentId, RpcClient, RpcError, pb};
use syntropism_identity::{Authority, ExecutionGrant};
use syntropism_sandbox_runner::sandbox::AGENT_UID;
use syntropism_test_support::{Nats, Postgres};
use tokio_util::sync::CancellationToken;

pub use syntropism_test_support::{AGENT_IMAGE as IMAGE, require_agent_image as image_present};

pub struct Stack {
    pub authority: Authority,
    pub nats: Nats,
    pub pg: Postgres,
    pub client: RpcClient,
    pub nats_client: async_nats::Client,
    pub workspaces: tempfile::TempDir,
    pub dir: tempfile::TempDir,
    stop: CancellationToken,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

fn creds(authority: &Authority, dir: &Path, name: &str) -> PathBuf {
    let path = dir.join(format!("{name}.creds"));
    std::fs::write(&path, authority.service(name).unwrap().to_creds_file()).unwrap();
    path
}

impl Stack {
    pub async fn start() -> Stack {
        image_present();
        let authority = Authority::generate();
        let nats = Nats::start_with_config(&authority.server_config().unwrap());
        let pg = Postgres::fresh_database().await;
        let dir = tempfile::tempdir().unwrap();
        let workspaces = tempfile::tempdir().unwrap();
        let stop = CancellationToken::new();
        let nats_client = async_nats::ConnectOptions::with_credentials_file(creds(
            &authority,
            dir.path(),
            "orchestrator",
        ))
        .await
        .unwrap()
        .connect(nats.url())
        .await
        .unwrap();
        let mut stack = Stack {
            client: RpcClient::new(nats_client.clone()).with_timeout(Duration::from_secs(90)),
            nats_client,
            authority,
            nats,
            pg,
            workspaces,
            dir,
            stop,
            tasks: Vec::new(),
        };
        let economy: syntropism_economy::EconomyConfig = syntropism_platform::config::load_from(
            syntropism_economy::config::SECTION,
            syntropism_economy::config::DEFAULTS,
            None,
            stack.vars("economy"),
        )
        .unwrap();
        let service = syntropism_economy::start(&economy, stack.stop.clone())
            .await
            .unwrap();
        stack.tasks.push(tokio::spawn(service.run()));
        stack
    }

    /// The environment a service `role` is configured with.
    pub fn vars(&self, role: &str) -> Vec<(String, String)> {
        vec![
            ("SYNTROPISM__NATS__URL".into(), self.nats.url()),
            (
                "SYNTROPISM__NATS__CREDENTIALS_FILE".into(),
                creds(&self.authority, self.dir.path(), role)
                    .display()
                    .to_string(),
            ),
            (
                "SYNTROPISM__DATABASE__URL".into(),
                self.pg.url_for(role, role),
            ),
            (
                "SYNTROPISM__DATABASE__ADMIN_URL".into(),
                self.pg.admin_url(),
            ),
            ("SYNTROPISM__HTTP__ENABLED".into(), "false".into()),
            ("SYNTROPISM__OUTBOX__POLL_INTERVAL_MS".into(), "50".into()),
        ]
    }

    /// A runner's configuration: `id`, `cpu` millicores, plus `extra` settings.
    pub fn runner_vars(&self, id: &str, cpu: u64, extra: &[(&str, &str)]) -> Vec<(String, String)> {
        let mut vars = self.vars("sandbox");
        vars.extend([
            ("SYNTROPISM__SANDBOX__RUNNER_ID".into(), id.to_owned()),
            (
                "SYNTROPISM__SANDBOX__CPU_MILLICORES".into(),
                cpu.to_string(),
            ),
            (
                "SYNTROPISM__SANDBOX__WORKSPACE_ROOT".into(),
                self.workspaces.path().display().to_string(),
            ),
            (
                "SYNTROPISM__SANDBOX__RUN_DIR".into(),
                self.dir
                    .path()
                    .join(format!("runs-{id}"))
                    .display()
                    .to_string(),
            ),
            ("SYNTROPISM__SANDBOX__HEARTBEAT_MS".into(), "200".into()),
            ("SYNTROPISM__SANDBOX__LOST_AFTER_MS".into(), "1000".into()),
        ]);
        for (k, v) in extra {
            vars.push((
                format!("SYNTROPISM__SANDBOX__{}", k.to_uppercase()),
                (*v).to_owned(),
            ));
        }
        vars
    }

    /// Starts a runner in this process.
    pub async fn runner(&mut self, id: &str, cpu: u64, extra: &[(&str, &str)]) {
        let config: syntropism_sandbox_runner::RunnerConfig =
            syntropism_platform::config::load_from(
                syntropism_sandbox_runner::config::SECTION,
                syntropism_sandbox_runner::config::DEFAULTS,
                None,
                self.runner_vars(id, cpu, extra),
            )
            .unwrap();
        let service = syntropism_sandbox_runner::start(&config, self.stop.clone())
            .await
            .unwrap();
        self.tasks.push(tokio::spawn(service.run()));
    }

    /// An agent with an open, endowed account and a workspace holding `main`.
    pub async fn agent(&self, main: &str) -> AgentId {
        let agent = AgentId::random();
        self.client
            .call::<economy::OpenAccount>(&pb::OpenAccountRequest {
                idempotency_id: format!("open-{agent}"),
                op: Some(pb::OpenAccountOp {
                    agent_id: agent.to_string(),
                }),
            })
            .await
            .unwrap();
        self.client
            .call::<economy::Mint>(&pb::MintRequest {
                idempotency_id: format!("grant-{agent}"),
                op: Some(pb::MintOp {
                    agent_id: agent.to_string(),
                    amount_micros: 7_000_000,
                    reason: pb::MintReason::GenesisGrant as i32,
                    memo: String::new(),
                }),
            })
            .await
            .unwrap();
        let dir = self.workspace(agent);
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("main.py"), main).unwrap();
        std::os::unix::fs::chown(&dir, Some(AGENT_UID), Some(AGENT_UID)).unwrap();
        agent
    }

    pub fn workspace(&self, agent: AgentId) -> PathBuf {
        self.workspaces.path().join(agent.to_string())
    }

    /// A run request for `agent`'s execution `execution`, its window `seconds` long.
    pub fn request(&self, agent: AgentId, execution: &str, seconds: i64) -> pb::RunRequest {
        let deadline = chrono::Utc::now().timestamp() + seconds;
        let grant = ExecutionGrant {
            agent_id: agent.to_string(),
            inbox_prefix: ExecutionGrant::inbox_prefix_for(&agent.to_string(), execution),
            expires_at: deadline,
            name: execution.into(),
        };
        pb::RunRequest {
            execution_id: execution.into(),
            agent_id: agent.to_string(),
            bundle: Some(pb::Bundle {
                cpu_millicores: 500,
                memory_mib: 256,
                duration_ms: seconds as u64 * 1000,
                llm_tokens: 0,
                attention_slots: 0,
            }),
            deadline: Some(prost_types::Timestamp {
                seconds: deadline,
                nanos: 0,
            }),
            image: String::new(),
            env: HashMap::new(),
            credentials: self.authority.execution(&grant).unwrap().to_creds_file(),
            inbox_prefix: grant.inbox_prefix,
            debug: false,
            balance_micros: 7_000_000,
            inbox_json: String::new(),
            traceparent: String::new(),
        }
    }

    pub async fn run(&self, request: &pb::RunRequest) -> Result<pb::RunRecord, RpcError> {
        Ok(self.client.call::<Run>(request).await?.run.unwrap())
    }

    pub async fn stop(self) {
        self.stop.cancel();
        for task in self.tasks {
            task.await.unwrap();
        }
    }
}

/// Containers of runner `id` that exist now.
pub fn containers_of(id: &str) -> Vec<String> {
    let out = std::process::Command::new("docker")
        .args([
            "ps",
            "-aq",
            "--filter",
            &format!("label=org.syntropism.runner={id}"),
        ])
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(str::to_owned)
        .collect()
}

/// A runner `id` as its own process (the `sandbox-runner` binary), so a test can kill it.
pub fn runner_process(stack: &Stack, id: &str) -> std::process::Child {
    std::process::Command::new(env!("CARGO_BIN_EXE_sandbox-runner"))
        .envs(stack.runner_vars(id, 2000, &[]))
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap()
}

/// Asks for `request` until a runner answers other than "ask again" (no answer within 2 s
/// counts as that: its runner may have died).
pub async fn ask_until_answered(
    client: RpcClient,
    request: pb::RunRequest,
) -> Result<pb::RunResponse, RpcError> {
    let client = client.with_timeout(Duration::from_secs(2));
    loop {
        match client.call::<Run>(&request).await {
            Err(e) if e.is_retryable() => tokio::time::sleep(Duration::from_millis(100)).await,
            other => return other,
        }
    }
}

/// Waits until runner `id` has a container (at most 30 s).
pub async fn wait_for_container_of(id: &str) {
    for _ in 0..300 {
        if !containers_of(id).is_empty() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("runner {id} never started a container");
}
