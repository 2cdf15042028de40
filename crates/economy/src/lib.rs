//! The economy service: Syntropism's double-entry credit ledger (DESIGN.md §4 "Money").
//!
//! - [`ledger`]: the rules, as plain functions (no I/O).
//! - [`store`]: the ledger in Postgres: locking order, set-based writes, idempotency, outbox.
//! - [`handlers`]: the NATS methods, internal and agent-facing.

pub mod config;
mod errors;
pub mod handlers;
pub mod ledger;
pub mod store;

use std::sync::Arc;

use diesel_migrations::{EmbeddedMigrations, embed_migrations};
use syntropism_contracts::subjects::services;
use syntropism_platform::Service;
use tokio_util::sync::CancellationToken;

pub use config::EconomyConfig;

/// `migrations/economy/`, compiled into the binary.
pub const MIGRATIONS: EmbeddedMigrations = embed_migrations!("../../migrations/economy");

/// Starts the service (connections, migrations, handlers); call [`Service::run`] to serve until
/// `stop` fires.
pub async fn start(config: &EconomyConfig, stop: CancellationToken) -> anyhow::Result<Service> {
    let mut service = Service::start(services::ECONOMY, &config.platform, MIGRATIONS, stop).await?;
    let store = store::Store::new(
        service.pool.clone(),
        config.service.system_shards,
        service.outbox.clone(),
        store::CommitSettings {
            committers: config.service.committers,
            max_group: config.service.max_group,
            max_group_ops: config.service.max_group_ops,
        },
    );
    let economy = Arc::new(handlers::Economy::new(store, config.service.clone()));
    handlers::register(&mut service.rpc, economy).await?;
    Ok(service)
}
