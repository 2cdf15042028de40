//! The economy, the market and the scheduler for tests: one private nats-server, one fresh
//! database (a schema per service), the services started in-process.
#![allow(dead_code, unreachable_pub)]

use std::time::Duration;

use syntropism_contracts::economy::internal as economy;
use syntropism_contracts::{AgentId, RpcClient, pb};
use syntropism_test_support::{Nats, Postgres, Running, service_vars};
use tokio_util::sync::CancellationToken;

pub const CREDIT: i64 = 1_000_000;

fn env(nats: &Nats, pg: &Postgres, role: &str) -> Vec<(String, String)> {
    service_vars(nats, pg, role, &[("SYNTROPISM__DATABASE__POOL_SIZE", "6")])
}

fn spawn(service: syntropism_platform::Service, stop: CancellationToken) -> Running {
    Running::spawn(stop, service.run())
}

pub async fn start_scheduler(nats: &Nats, pg: &Postgres, extra: &[(&str, &str)]) -> Running {
    let mut vars = env(nats, pg, "scheduler");
    vars.extend(extra.iter().map(|(k, v)| (k.to_string(), v.to_string())));
    let config: syntropism_scheduler::SchedulerConfig = syntropism_platform::config::load_from(
        syntropism_scheduler::config::SECTION,
        syntropism_scheduler::config::DEFAULTS,
        None,
        vars,
    )
    .expect("scheduler config");
    let stop = CancellationToken::new();
    let service = syntropism_scheduler::start(&config, stop.clone())
        .await
        .expect("scheduler starts");
    spawn(service, stop)
}

pub struct Harness {
    pub nats: Nats,
    pub pg: Postgres,
    pub client: RpcClient,
    pub services: Vec<Running>,
}

impl Harness {
    /// Economy, market (supply: 4 cores, 8 GiB, 200k tokens, 1 attention slot) and one
    /// scheduler with `scheduler` settings.
    pub async fn start(scheduler: &[(&str, &str)]) -> Harness {
        let nats = Nats::start();
        let pg = Postgres::fresh_database().await;
        let economy_config: syntropism_economy::EconomyConfig =
            syntropism_platform::config::load_from(
                syntropism_economy::config::SECTION,
                syntropism_economy::config::DEFAULTS,
                None,
                env(&nats, &pg, "economy"),
            )
            .expect("economy config");
        let stop = CancellationToken::new();
        let economy = spawn(
            syntropism_economy::start(&economy_config, stop.clone())
                .await
                .expect("economy starts"),
            stop,
        );
        let market_config: syntropism_market::MarketConfig =
            syntropism_platform::config::load_from(
                syntropism_market::config::SECTION,
                syntropism_market::config::DEFAULTS,
                None,
                env(&nats, &pg, "market"),
            )
            .expect("market config");
        let stop = CancellationToken::new();
        let market = spawn(
            syntropism_market::start(&market_config, stop.clone())
                .await
                .expect("market starts"),
            stop,
        );
        let scheduler = start_scheduler(&nats, &pg, scheduler).await;
        let client = RpcClient::new(async_nats::connect(nats.url()).await.unwrap())
            .with_timeout(Duration::from_secs(20));
        Harness {
            nats,
            pg,
            client,
            services: vec![economy, market, scheduler],
        }
    }

    pub async fn stop(self) {
        for service in self.services.into_iter().rev() {
            service.stop().await;
        }
    }

    /// An open agent account with `micros` minted to it.
    pub async fn funded_agent(&self, micros: i64) -> AgentId {
        let agent = AgentId::random();
        self.client
            .call::<economy::OpenAccount>(&pb::OpenAccountRequest {
                idempotency_id: format!("open-{agent}"),
                op: Some(pb::OpenAccountOp {
                    agent_id: agent.to_string(),
                }),
            })
            .await
            .expect("open");
        if micros > 0 {
            self.client
                .call::<economy::Mint>(&pb::MintRequest {
                    idempotency_id: format!("grant-{agent}"),
                    op: Some(pb::MintOp {
                        agent_id: agent.to_string(),
                        amount_micros: micros,
                        reason: pb::MintReason::GenesisGrant as i32,
                        memo: String::new(),
                    }),
                })
                .await
                .expect("mint");
        }
        agent
    }

    pub async fn account(&self, agent: AgentId) -> pb::Account {
        self.client
            .call::<economy::Balance>(&pb::BalanceRequest {
                account: Some(pb::AccountRef {
                    account: Some(pb::account_ref::Account::AgentId(agent.to_string())),
                }),
            })
            .await
            .expect("balance")
            .account
            .expect("account")
    }

    pub async fn audit(&self) -> pb::AuditResponse {
        self.client
            .call::<economy::Audit>(&pb::AuditRequest {})
            .await
            .expect("audit")
    }

    pub async fn reserve(&self, bundle: pb::Bundle) -> i64 {
        self.client
            .call::<syntropism_contracts::market::internal::Quote>(&pb::QuoteRequest {
                bundle: Some(bundle),
            })
            .await
            .expect("quote")
            .reserve_micros
    }
}

/// A window: `cpu` millicores, 512 MiB, 60 s, 1,000 tokens.
pub fn window(cpu: u64) -> pb::Bundle {
    pb::Bundle {
        cpu_millicores: cpu,
        memory_mib: 512,
        duration_ms: 60_000,
        llm_tokens: 1_000,
        attention_slots: 0,
    }
}

pub fn in_ms(ms: i64) -> prost_types::Timestamp {
    let t = chrono::Utc::now() + chrono::Duration::milliseconds(ms);
    prost_types::Timestamp {
        seconds: t.timestamp(),
        nanos: t.timestamp_subsec_nanos() as i32,
    }
}
