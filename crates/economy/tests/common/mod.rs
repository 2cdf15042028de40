//! A real economy service for tests: a private nats-server, a fresh database, the service
//! started in-process, and a client.
#![allow(dead_code, unreachable_pub)]

use std::time::Duration;

use syntropism_contracts::economy::internal;
use syntropism_contracts::{AgentId, RpcClient, RpcError, pb};
use syntropism_economy::EconomyConfig;
use syntropism_test_support::{Nats, Postgres};
use tokio_util::sync::CancellationToken;

pub const CREDIT: i64 = 1_000_000;

pub fn config(nats_url: &str, pg: &Postgres) -> EconomyConfig {
    let env = [
        ("SYNTROPISM__NATS__URL", nats_url.to_owned()),
        (
            "SYNTROPISM__DATABASE__URL",
            pg.url_for("economy", "economy"),
        ),
        ("SYNTROPISM__DATABASE__ADMIN_URL", pg.admin_url()),
        ("SYNTROPISM__DATABASE__POOL_SIZE", "8".to_owned()),
        ("SYNTROPISM__HTTP__LISTEN", "127.0.0.1:0".to_owned()),
        ("SYNTROPISM__OUTBOX__POLL_INTERVAL_MS", "50".to_owned()),
    ];
    syntropism_platform::config::load_from(
        syntropism_economy::config::SECTION,
        syntropism_economy::config::DEFAULTS,
        None,
        env.into_iter().map(|(k, v)| (k.to_owned(), v)),
    )
    .expect("test config")
}

pub struct Harness {
    pub nats: Nats,
    pub pg: Postgres,
    pub client: RpcClient,
    pub http: std::net::SocketAddr,
    stop: CancellationToken,
    task: tokio::task::JoinHandle<()>,
}

impl Harness {
    pub async fn start() -> Harness {
        let nats = Nats::start();
        let pg = Postgres::fresh_database().await;
        let stop = CancellationToken::new();
        let service = syntropism_economy::start(&config(&nats.url(), &pg), stop.clone())
            .await
            .expect("economy starts");
        let http = service.http_address.expect("http enabled");
        let task = tokio::spawn(service.run());
        let client = RpcClient::new(
            async_nats::connect(nats.url())
                .await
                .expect("client connects"),
        )
        .with_timeout(Duration::from_secs(10));
        Harness {
            nats,
            pg,
            client,
            http,
            stop,
            task,
        }
    }

    /// Stops the service gracefully and waits for it.
    pub async fn stop(self) {
        self.stop.cancel();
        self.task.await.expect("service task");
    }

    pub async fn open(&self, agent: AgentId) -> pb::Account {
        self.client
            .call::<internal::OpenAccount>(&pb::OpenAccountRequest {
                idempotency_id: format!("open-{agent}"),
                op: Some(pb::OpenAccountOp {
                    agent_id: agent.to_string(),
                }),
            })
            .await
            .expect("open account")
            .account
            .expect("account")
    }

    pub async fn mint(&self, agent: AgentId, micros: i64) -> Result<pb::Transfer, RpcError> {
        self.client
            .call::<internal::Mint>(&pb::MintRequest {
                idempotency_id: uuid::Uuid::new_v4().to_string(),
                op: Some(pb::MintOp {
                    agent_id: agent.to_string(),
                    amount_micros: micros,
                    reason: pb::MintReason::GenesisGrant as i32,
                    memo: "test grant".into(),
                }),
            })
            .await
            .map(|r| r.transfer.expect("transfer"))
    }

    /// A funded, open agent account.
    pub async fn funded_agent(&self, micros: i64) -> AgentId {
        let agent = AgentId::random();
        self.open(agent).await;
        if micros > 0 {
            self.mint(agent, micros).await.expect("mint");
        }
        agent
    }

    pub async fn transfer(
        &self,
        key: &str,
        from: AgentId,
        to: pb::AccountRef,
        micros: i64,
    ) -> Result<pb::Transfer, RpcError> {
        self.client
            .call::<internal::Transfer>(&pb::TransferRequest {
                idempotency_id: key.into(),
                op: Some(pb::TransferOp {
                    from: Some(agent_ref(from)),
                    to: Some(to),
                    amount_micros: micros,
                    memo: String::new(),
                }),
            })
            .await
            .map(|r| r.transfer.expect("transfer"))
    }

    pub async fn hold(
        &self,
        key: &str,
        from: AgentId,
        to: pb::AccountRef,
        micros: i64,
    ) -> Result<pb::Hold, RpcError> {
        self.client
            .call::<internal::Hold>(&pb::HoldRequest {
                idempotency_id: key.into(),
                op: Some(pb::HoldOp {
                    from: Some(agent_ref(from)),
                    to: Some(to),
                    amount_micros: micros,
                    memo: "escrow".into(),
                }),
            })
            .await
            .map(|r| r.hold.expect("hold"))
    }

    pub async fn balance(&self, agent: AgentId) -> pb::Account {
        self.client
            .call::<internal::Balance>(&pb::BalanceRequest {
                account: Some(agent_ref(agent)),
            })
            .await
            .expect("balance")
            .account
            .expect("account")
    }

    pub async fn audit(&self) -> pb::AuditResponse {
        self.client
            .call::<internal::Audit>(&pb::AuditRequest {})
            .await
            .expect("audit")
    }
}

pub fn agent_ref(agent: AgentId) -> pb::AccountRef {
    pb::AccountRef {
        account: Some(pb::account_ref::Account::AgentId(agent.to_string())),
    }
}

pub fn burn_ref() -> pb::AccountRef {
    pb::AccountRef {
        account: Some(pb::account_ref::Account::System(
            pb::SystemAccount::Burn as i32,
        )),
    }
}

pub fn mint_ref() -> pb::AccountRef {
    pb::AccountRef {
        account: Some(pb::account_ref::Account::System(
            pb::SystemAccount::Mint as i32,
        )),
    }
}
