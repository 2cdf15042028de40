//! The whole system as the orchestrator meets it: NATS in operator mode, Postgres, the economy,
//! market, scheduler, a sandbox runner, attention and social in this process, and orchestrator
//! replicas in this process or as their own processes (so a test can kill one).
#![allow(unused, unreachable_pub)]

use std::path::{Path, PathBuf};
use std::time::Duration;

use futures::StreamExt;
use syntropism_contracts::economy::internal as economy;
use syntropism_contracts::orchestrator::admin;
use syntropism_contracts::{AgentId, RpcClient, pb};
use syntropism_identity::Authority;
use syntropism_test_support::{Nats, Postgres};
use tokio_util::sync::CancellationToken;

pub use syntropism_test_support::{AGENT_IMAGE as IMAGE, require_agent_image as image_present};

/// The services a stack runs besides the orchestrator, in start order.
pub const SERVICES: [&str; 6] = [
    "economy",
    "market",
    "scheduler",
    "sandbox-runner",
    "attention",
    "social",
];

pub struct Stack {
    pub authority: Authority,
    pub nats: Nats,
    pub pg: Postgres,
    pub client: RpcClient,
    pub nats_client: async_nats::Client,
    pub dir: tempfile::TempDir,
    pub workspaces: PathBuf,
    pub archive: PathBuf,
    pub identity: PathBuf,
    pub genesis: PathBuf,
    pub runner_id: String,
    /// Settings every service is given on top of its own.
    pub extra: Vec<(String, String)>,
    stop: CancellationToken,
    services: Vec<(String, CancellationToken, tokio::task::JoinHandle<()>)>,
    orchestrators: Vec<(CancellationToken, tokio::task::JoinHandle<()>)>,
}

fn creds(authority: &Authority, dir: &Path, name: &str) -> PathBuf {
    let path = dir.join(format!("{name}.creds"));
    std::fs::write(&path, authority.service(name).unwrap().to_creds_file()).unwrap();
    path
}

impl Stack {
    /// The services but the orchestrator; `genesis_main` is genesis's `main.py`.
    pub async fn start(genesis_main: &str) -> Stack {
        Stack::start_with(genesis_main, &[]).await
    }

    /// [`Stack::start`], with `extra` settings (`SYNTROPISM__<SECTION>__<KEY>`, each read only
    /// by the service whose section it names) given to every service.
    pub async fn start_with(genesis_main: &str, extra: &[(&str, &str)]) -> Stack {
        let _ = tracing_subscriber::fmt()
            .with_env_filter(
                tracing_subscriber::EnvFilter::try_from_default_env()
                    .unwrap_or_else(|_| "info,syntropism_orchestrator=debug".into()),
            )
            .with_test_writer()
            .try_init();
        image_present();
        let authority = Authority::generate();
        let nats = Nats::start_with_config(&authority.server_config().unwrap());
        let pg = Postgres::fresh_database().await;
        let dir = tempfile::tempdir().unwrap();
        let identity = dir.path().join("identity");
        authority.save(&identity).unwrap();
        let genesis = dir.path().join("genesis");
        std::fs::create_dir_all(&genesis).unwrap();
        std::fs::write(genesis.join("main.py"), genesis_main).unwrap();
        let nats_client =
            async_nats::ConnectOptions::with_credentials_file(creds(&authority, dir.path(), "cli"))
                .await
                .unwrap()
                .connect(nats.url())
                .await
                .unwrap();
        let mut stack = Stack {
            client: RpcClient::new(nats_client.clone()).with_timeout(Duration::from_secs(30)),
            nats_client,
            workspaces: dir.path().join("workspaces"),
            archive: dir.path().join("archive"),
            identity,
            genesis,
            runner_id: format!("orch-test-{}", uuid::Uuid::new_v4().simple()),
            authority,
            nats,
            pg,
            dir,
            stop: CancellationToken::new(),
            services: Vec::new(),
            orchestrators: Vec::new(),
            extra: extra
                .iter()
                .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                .collect(),
        };
        for name in SERVICES {
            stack.start_service(name).await;
        }
        stack
    }

    /// Starts service `name` (one of [`SERVICES`]) in this process, with a stop token of its own.
    pub async fn start_service(&mut self, name: &str) {
        fn load<S>(
            section: &str,
            defaults: &[(&str, &str)],
            vars: Vec<(String, String)>,
        ) -> syntropism_platform::config::ServiceConfig<S>
        where
            S: serde::de::DeserializeOwned + Default + syntropism_platform::Validate,
        {
            syntropism_platform::config::load_from(section, defaults, None, vars).unwrap()
        }
        let stop = self.stop.child_token();
        let mut vars = self.vars(if name == "sandbox-runner" {
            "sandbox"
        } else {
            name
        });
        let service = match name {
            "economy" => {
                use syntropism_economy::config::{DEFAULTS, SECTION};
                syntropism_economy::start(&load(SECTION, DEFAULTS, vars), stop.clone()).await
            }
            "market" => {
                use syntropism_market::config::{DEFAULTS, SECTION};
                syntropism_market::start(&load(SECTION, DEFAULTS, vars), stop.clone()).await
            }
            "scheduler" => {
                use syntropism_scheduler::config::{DEFAULTS, SECTION};
                syntropism_scheduler::start(&load(SECTION, DEFAULTS, vars), stop.clone()).await
            }
            "sandbox-runner" => {
                use syntropism_sandbox_runner::config::{DEFAULTS, SECTION};
                vars.extend([
                    (
                        "SYNTROPISM__SANDBOX__RUNNER_ID".to_owned(),
                        self.runner_id.clone(),
                    ),
                    (
                        "SYNTROPISM__SANDBOX__WORKSPACE_ROOT".into(),
                        self.workspaces.display().to_string(),
                    ),
                    (
                        "SYNTROPISM__SANDBOX__RUN_DIR".into(),
                        self.dir.path().join("runs").display().to_string(),
                    ),
                    ("SYNTROPISM__SANDBOX__CPU_MILLICORES".into(), "4000".into()),
                    ("SYNTROPISM__SANDBOX__MEMORY_MIB".into(), "8192".into()),
                ]);
                vars.extend(self.extra.iter().cloned());
                syntropism_sandbox_runner::start(&load(SECTION, DEFAULTS, vars), stop.clone()).await
            }
            // Attention and social sweep often, so expiry shows within a test's patience;
            // `extra` still has the last word.
            "attention" => {
                use syntropism_attention::config::{DEFAULTS, SECTION};
                vars.push((
                    "SYNTROPISM__ATTENTION__SWEEP_INTERVAL_MS".into(),
                    "200".into(),
                ));
                vars.extend(self.extra.iter().cloned());
                syntropism_attention::start(&load(SECTION, DEFAULTS, vars), stop.clone()).await
            }
            "social" => {
                use syntropism_social::config::{DEFAULTS, SECTION};
                vars.push(("SYNTROPISM__SOCIAL__SWEEP_INTERVAL_MS".into(), "200".into()));
                vars.extend(self.extra.iter().cloned());
                syntropism_social::start(&load(SECTION, DEFAULTS, vars), stop.clone()).await
            }
            other => panic!("no service {other:?}"),
        }
        .unwrap();
        self.services
            .push((name.to_owned(), stop, tokio::spawn(service.run())));
    }

    /// Stops service `name` (it finishes what it is doing, as on SIGTERM) and waits for it.
    pub async fn kill(&mut self, name: &str) {
        let at = self
            .services
            .iter()
            .position(|(n, _, _)| n == name)
            .unwrap_or_else(|| panic!("{name} is not running"));
        let (_, stop, task) = self.services.remove(at);
        stop.cancel();
        task.await.unwrap();
    }

    /// Starts service `name` again after [`Stack::kill`].
    pub async fn restart(&mut self, name: &str) {
        self.start_service(name).await;
    }

    /// The environment a service `role` is configured with.
    pub fn vars(&self, role: &str) -> Vec<(String, String)> {
        let mut vars = vec![
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
        ];
        vars.extend(self.extra.iter().cloned());
        vars
    }

    /// An orchestrator replica's environment; `extra` are `[orchestrator]` keys.
    pub fn orchestrator_vars(
        &self,
        replica: &str,
        extra: &[(&str, &str)],
    ) -> Vec<(String, String)> {
        let mut vars = self.vars("orchestrator");
        let o = |k: &str| format!("SYNTROPISM__ORCHESTRATOR__{}", k.to_uppercase());
        vars.extend([
            (o("replica_id"), replica.to_owned()),
            (o("workspace_root"), self.workspaces.display().to_string()),
            (o("archive_root"), self.archive.display().to_string()),
            (o("identity_dir"), self.identity.display().to_string()),
            (o("genesis_dir"), self.genesis.display().to_string()),
            (o("tick_ms"), "1500".into()),
            (o("lease_ms"), "3000".into()),
            (o("run_grace_ms"), "5000".into()),
            (o("genesis_bundle__cpu_millicores"), "250".into()),
            (o("genesis_bundle__memory_mib"), "128".into()),
            (o("genesis_bundle__duration_ms"), "8000".into()),
            (o("genesis_bundle__attention_slots"), "0".into()),
        ]);
        for (k, v) in extra {
            vars.push((o(k), (*v).to_owned()));
        }
        vars
    }

    /// Starts an orchestrator replica in this process.
    pub async fn orchestrator(&mut self, replica: &str, extra: &[(&str, &str)]) {
        let config: syntropism_orchestrator::OrchestratorConfig =
            syntropism_platform::config::load_from(
                syntropism_orchestrator::config::SECTION,
                syntropism_orchestrator::config::DEFAULTS,
                None,
                self.orchestrator_vars(replica, extra),
            )
            .unwrap();
        let stop = self.stop.child_token();
        let service = syntropism_orchestrator::start(&config, stop.clone())
            .await
            .unwrap();
        self.orchestrators.push((stop, tokio::spawn(service.run())));
    }

    /// An orchestrator replica as its own process (the `orchestrator` binary).
    pub fn orchestrator_process(
        &self,
        replica: &str,
        extra: &[(&str, &str)],
    ) -> std::process::Child {
        let log = std::fs::File::create(self.dir.path().join(format!("{replica}.log"))).unwrap();
        std::process::Command::new(env!("CARGO_BIN_EXE_orchestrator"))
            .envs(self.orchestrator_vars(replica, extra))
            .stdout(std::process::Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap()
    }

    pub fn log_of(&self, replica: &str) -> String {
        std::fs::read_to_string(self.dir.path().join(format!("{replica}.log"))).unwrap_or_default()
    }

    pub async fn status(&self) -> pb::StatusResponse {
        self.client
            .call::<admin::Status>(&pb::StatusRequest {})
            .await
            .unwrap()
    }

    pub async fn agents(&self) -> Vec<pb::Agent> {
        self.client
            .call::<admin::ListAgents>(&pb::ListAgentsRequest::default())
            .await
            .unwrap()
            .agents
    }

    pub async fn detail(&self, agent: &str) -> pb::AgentDetailResponse {
        self.client
            .call::<admin::AgentDetail>(&pb::AgentDetailRequest {
                agent_id: agent.into(),
                executions: 100,
            })
            .await
            .unwrap()
    }

    pub async fn audit(&self) -> pb::AuditResponse {
        self.client
            .call::<economy::Audit>(&pb::AuditRequest {})
            .await
            .unwrap()
    }

    pub async fn account(&self, agent: &str) -> pb::Account {
        self.client
            .call::<economy::Balance>(&pb::BalanceRequest {
                account: Some(pb::AccountRef {
                    account: Some(pb::account_ref::Account::AgentId(agent.into())),
                }),
            })
            .await
            .unwrap()
            .account
            .unwrap()
    }

    /// Waits (at most `seconds`) until `check` holds for the agents.
    pub async fn until<F: Fn(&[pb::Agent]) -> bool>(
        &self,
        seconds: u64,
        what: &str,
        check: F,
    ) -> Vec<pb::Agent> {
        let deadline = std::time::Instant::now() + Duration::from_secs(seconds);
        loop {
            // Replicas starting as processes may not answer yet.
            let agents = self
                .client
                .call::<admin::ListAgents>(&pb::ListAgentsRequest::default())
                .await
                .map(|r| r.agents)
                .unwrap_or_default();
            if check(&agents) {
                return agents;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "timed out waiting for {what}: {agents:#?}"
            );
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }

    pub fn workspace(&self, agent: &str) -> PathBuf {
        self.workspaces.join(agent)
    }

    /// Every event published so far on `events.>` (from the JetStream stream), as
    /// (subject, envelope).
    pub async fn events(&self) -> Vec<(String, pb::EventEnvelope)> {
        use prost::Message as _;
        let js = async_nats::jetstream::new(self.nats_client.clone());
        let stream = js
            .get_stream(syntropism_contracts::subjects::EVENTS_STREAM)
            .await
            .unwrap();
        let consumer = stream
            .create_consumer(async_nats::jetstream::consumer::pull::Config {
                deliver_policy: async_nats::jetstream::consumer::DeliverPolicy::All,
                ..Default::default()
            })
            .await
            .unwrap();
        let pending = stream.get_info().await.unwrap().state.messages as usize;
        let mut out = Vec::new();
        let mut messages = consumer
            .fetch()
            .max_messages(pending.max(1))
            .messages()
            .await
            .unwrap();
        while out.len() < pending {
            let Ok(Some(Ok(message))) =
                tokio::time::timeout(Duration::from_secs(5), messages.next()).await
            else {
                break;
            };
            let envelope = pb::EventEnvelope::decode(message.payload.as_ref()).unwrap();
            out.push((message.subject.to_string(), envelope));
        }
        out
    }

    pub async fn stop(mut self) {
        self.stop.cancel();
        for (_, task) in std::mem::take(&mut self.orchestrators) {
            task.await.unwrap();
        }
        for (_, _, task) in std::mem::take(&mut self.services) {
            task.await.unwrap();
        }
    }
}

pub fn agent_id(agent: &pb::Agent) -> AgentId {
    AgentId::parse(&agent.agent_id, "agent_id").unwrap()
}

/// A failed test leaves no container of its runner behind.
impl Drop for Stack {
    fn drop(&mut self) {
        let out = std::process::Command::new("docker")
            .args([
                "ps",
                "-aq",
                "--filter",
                &format!("label=org.syntropism.runner={}", self.runner_id),
            ])
            .output();
        if let Ok(out) = out {
            for id in String::from_utf8_lossy(&out.stdout).lines() {
                let _ = std::process::Command::new("docker")
                    .args(["rm", "-f", id])
                    .output();
            }
        }
    }
}
