//! The scheduler service (DESIGN.md §4 "Bids and clearing"): who gets to exist each round.
//!
//! - [`clearing`]: the round itself as a pure, deterministic function (ordering and payment
//!   rules pluggable).
//! - [`service`]: bids held in escrow through the economy (agent-facing
//!   `agent.<id>.scheduler.*`) and `scheduler.clear`, which clears a round exactly once across
//!   replicas, settles it in one idempotent economy batch and reports it to the market.
//! - [`store`]: bids and rounds in Postgres.

pub mod clearing;
pub mod config;
pub mod service;
pub mod store;

use std::sync::Arc;

use diesel_migrations::{EmbeddedMigrations, embed_migrations};
use syntropism_contracts::subjects::services;
use syntropism_platform::Service;
use tokio_util::sync::CancellationToken;

pub use config::SchedulerConfig;

/// `migrations/scheduler/`, compiled into the binary.
pub const MIGRATIONS: EmbeddedMigrations = embed_migrations!("../../migrations/scheduler");

/// Starts the service (connections, migrations, handlers); call [`Service::run`] to serve until
/// `stop` fires.
pub async fn start(config: &SchedulerConfig, stop: CancellationToken) -> anyhow::Result<Service> {
    let mut service =
        Service::start(services::SCHEDULER, &config.platform, MIGRATIONS, stop).await?;
    let scheduler = Arc::new(service::Scheduler::new(
        service.pool.clone(),
        service.client(),
        config.service.clone(),
        service.outbox.clone(),
    ));
    service::register(&mut service.rpc, scheduler).await?;
    Ok(service)
}
