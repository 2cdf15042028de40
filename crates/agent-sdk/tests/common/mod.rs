//! The system as an execution meets it: NATS in operator mode, the economy, the market and the
//! scheduler on their own service credentials, and an operator client.
#![allow(dead_code, unreachable_pub)]

use std::path::{Path, PathBuf};

use syntropism_contracts::economy::internal as economy;
use syntropism_contracts::{AgentId, RpcClient, pb};
use syntropism_identity::Authority;
use syntropism_test_support::{Nats, Postgres};
use tokio_util::sync::CancellationToken;

pub const CREDIT: i64 = 1_000_000;

/// A 1-core, 512 MiB, 60 s window with 1,000 tokens.
pub fn window() -> pb::Bundle {
    pb::Bundle {
        cpu_millicores: 1000,
        memory_mib: 512,
        duration_ms: 60_000,
        llm_tokens: 1000,
        attention_slots: 0,
    }
}

pub struct Stack {
    pub authority: Authority,
    pub nats: Nats,
    pub pg: Postgres,
    /// The operator's connection (unrestricted service credentials).
    pub admin_nats: async_nats::Client,
    pub admin: RpcClient,
    _dir: tempfile::TempDir,
    stop: CancellationToken,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

/// Writes service `name`'s credentials into `dir`.
fn creds(authority: &Authority, dir: &Path, name: &str) -> PathBuf {
    let path = dir.join(format!("{name}.creds"));
    std::fs::write(&path, authority.service(name).unwrap().to_creds_file()).unwrap();
    path
}

fn env(nats: &Nats, pg: &Postgres, role: &str, creds: &Path) -> Vec<(String, String)> {
    vec![
        ("SYNTROPISM__NATS__URL".into(), nats.url()),
        (
            "SYNTROPISM__NATS__CREDENTIALS_FILE".into(),
            creds.display().to_string(),
        ),
        ("SYNTROPISM__DATABASE__URL".into(), pg.url_for(role, role)),
        ("SYNTROPISM__DATABASE__ADMIN_URL".into(), pg.admin_url()),
        ("SYNTROPISM__HTTP__ENABLED".into(), "false".into()),
        ("SYNTROPISM__OUTBOX__POLL_INTERVAL_MS".into(), "50".into()),
    ]
}

fn load<S>(
    section: &str,
    defaults: &[(&str, &str)],
    vars: Vec<(String, String)>,
) -> syntropism_platform::config::ServiceConfig<S>
where
    S: serde::de::DeserializeOwned + Default + syntropism_platform::Validate,
{
    syntropism_platform::config::load_from(section, defaults, None, vars).expect("service config")
}

impl Stack {
    pub async fn start() -> Stack {
        let authority = Authority::generate();
        let nats = Nats::start_with_config(&authority.server_config().unwrap());
        let pg = Postgres::fresh_database().await;
        let dir = tempfile::tempdir().unwrap();
        let stop = CancellationToken::new();
        let vars = |role: &str| env(&nats, &pg, role, &creds(&authority, dir.path(), role));
        let economy: syntropism_economy::EconomyConfig = load(
            syntropism_economy::config::SECTION,
            syntropism_economy::config::DEFAULTS,
            vars("economy"),
        );
        let market: syntropism_market::MarketConfig = load(
            syntropism_market::config::SECTION,
            syntropism_market::config::DEFAULTS,
            vars("market"),
        );
        let scheduler: syntropism_scheduler::SchedulerConfig = load(
            syntropism_scheduler::config::SECTION,
            syntropism_scheduler::config::DEFAULTS,
            vars("scheduler"),
        );
        let services = [
            syntropism_economy::start(&economy, stop.clone())
                .await
                .unwrap(),
            syntropism_market::start(&market, stop.clone())
                .await
                .unwrap(),
            syntropism_scheduler::start(&scheduler, stop.clone())
                .await
                .unwrap(),
        ];
        let tasks = services
            .into_iter()
            .map(|s| tokio::spawn(s.run()))
            .collect();
        let admin_nats =
            async_nats::ConnectOptions::with_credentials_file(creds(&authority, dir.path(), "cli"))
                .await
                .unwrap()
                .connect(nats.url())
                .await
                .unwrap();
        Stack {
            admin: RpcClient::new(admin_nats.clone()),
            admin_nats,
            authority,
            nats,
            pg,
            _dir: dir,
            stop,
            tasks,
        }
    }

    /// Two agents with open accounts: the first endowed with `endowment`.
    pub async fn agents(&self, endowment: i64) -> (AgentId, AgentId) {
        let (alice, bob) = (AgentId::random(), AgentId::random());
        for agent in [alice, bob] {
            self.admin
                .call::<economy::OpenAccount>(&pb::OpenAccountRequest {
                    idempotency_id: format!("open-{agent}"),
                    op: Some(pb::OpenAccountOp {
                        agent_id: agent.to_string(),
                    }),
                })
                .await
                .unwrap();
        }
        self.admin
            .call::<economy::Mint>(&pb::MintRequest {
                idempotency_id: "grant".into(),
                op: Some(pb::MintOp {
                    agent_id: alice.to_string(),
                    amount_micros: endowment,
                    reason: pb::MintReason::GenesisGrant as i32,
                    memo: String::new(),
                }),
            })
            .await
            .unwrap();
        (alice, bob)
    }

    /// `window()`'s reserve value.
    pub async fn reserve(&self) -> i64 {
        self.admin
            .call::<syntropism_contracts::market::internal::Quote>(&pb::QuoteRequest {
                bundle: Some(window()),
            })
            .await
            .unwrap()
            .reserve_micros
    }

    pub async fn stop(self) {
        self.stop.cancel();
        for task in self.tasks {
            task.await.unwrap();
        }
    }
}
