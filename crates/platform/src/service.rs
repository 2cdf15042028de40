//! A service's lifecycle: connect, migrate, serve, and shut down gracefully.
//!
//! On stop (SIGTERM/SIGINT or the caller's token): `/readyz` turns unready, the RPC server stops
//! taking requests and finishes those in flight, the outbox relay makes a last pass, the HTTP
//! endpoint closes. Telemetry is flushed by the caller after [`Service::run`] returns.

use std::net::SocketAddr;
use std::sync::Arc;

use async_nats::connection::State;
use diesel_migrations::EmbeddedMigrations;
use syntropism_contracts::{RpcClient, RpcServer};
use tokio::sync::Notify;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use crate::config::PlatformConfig;
use crate::db::{self, Pool};
use crate::http::{self, Readiness};
use crate::outbox::{self, Relay};

/// A running service's shared resources; the service adds its handlers to [`Service::rpc`].
pub struct Service {
    pub name: &'static str,
    pub nats: async_nats::Client,
    pub pool: Pool,
    pub rpc: RpcServer,
    /// Wake the outbox relay after committing events.
    pub outbox: Arc<Notify>,
    /// Where `/healthz`, `/readyz` and `/metrics` listen, if enabled.
    pub http_address: Option<SocketAddr>,
    stop: CancellationToken,
    readiness: Arc<Readiness>,
    relay_stop: CancellationToken,
    http_stop: CancellationToken,
    background: JoinSet<()>,
}

impl std::fmt::Debug for Service {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Service")
            .field("name", &self.name)
            .field("http_address", &self.http_address)
            .finish_non_exhaustive()
    }
}

impl Service {
    /// Connects to NATS and Postgres, applies `migrations` in schema `name`, ensures the events
    /// stream, and starts the outbox relay and the HTTP endpoint. `stop` ends [`Service::run`].
    pub async fn start(
        name: &'static str,
        config: &PlatformConfig,
        migrations: EmbeddedMigrations,
        stop: CancellationToken,
    ) -> anyhow::Result<Service> {
        metrics::gauge!(
            "syntropism_service_info",
            "service" => name,
            "version" => env!("CARGO_PKG_VERSION")
        )
        .set(1.0);
        let nats = crate::nats::connect(&config.nats, name).await?;
        let pool = db::prepare(&config.database, name, migrations).await?;
        outbox::ensure_stream(&nats).await?;

        let mut background = JoinSet::new();
        let relay = Relay::new(pool.clone(), nats.clone(), config.outbox.clone());
        let outbox = relay.waker();
        let relay_stop = CancellationToken::new();
        background.spawn(relay.run(relay_stop.clone()));

        let (ready_nats, ready_pool) = (nats.clone(), pool.clone());
        let readiness = Arc::new(
            Readiness::default()
                .check("nats", move || {
                    let state = ready_nats.connection_state();
                    async move {
                        if state == State::Connected {
                            Ok(())
                        } else {
                            Err(format!("{state:?}"))
                        }
                    }
                })
                .check("postgres", move || {
                    let pool = ready_pool.clone();
                    async move { db::ping(&pool).await }
                }),
        );
        let http_stop = CancellationToken::new();
        let mut http_address = None;
        if config.http.enabled {
            let (address, task) =
                http::serve(config.http.listen, readiness.clone(), http_stop.clone()).await?;
            http_address = Some(address);
            background.spawn(async move {
                let _ = task.await;
            });
        }
        let rpc = RpcServer::new(nats.clone(), name).with_max_in_flight(config.rpc.max_in_flight);
        Ok(Service {
            name,
            nats,
            pool,
            rpc,
            outbox,
            http_address,
            stop,
            readiness,
            relay_stop,
            http_stop,
            background,
        })
    }

    /// A client on this service's connection, for calling other services.
    pub fn client(&self) -> RpcClient {
        RpcClient::new(self.nats.clone())
    }

    /// Serves until the stop token fires, then shuts down in order.
    pub async fn run(mut self) {
        tracing::info!(service = self.name, "serving");
        self.stop.cancelled().await;
        tracing::info!(
            service = self.name,
            "stopping: finishing in-flight requests"
        );
        self.readiness.set_stopping();
        self.rpc.shutdown().await;
        self.relay_stop.cancel();
        self.http_stop.cancel();
        while self.background.join_next().await.is_some() {}
        if let Err(error) = self.nats.flush().await {
            tracing::warn!(%error, "final NATS flush failed");
        }
        tracing::info!(service = self.name, "stopped");
    }
}
