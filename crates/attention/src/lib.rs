//! The attention service (DESIGN.md §4 "Attention"): prompts agents show the human, the
//! human's scores, and rewards — the only way credits come into being after genesis.
//!
//! - [`rules`]: the pure rules — content and score checks, the reward, which step a prompt in
//!   a given state may take.
//! - [`store`]: the prompts in Postgres.
//! - [`handlers`]: the NATS methods: agent-facing (`agent.<id>.attention.prompt`) and operator
//!   (`admin.attention.*`), and the sweep that expires prompts and finishes rewards left
//!   half-way.

pub mod config;
pub mod handlers;
pub mod rules;
pub mod store;

use std::sync::Arc;

use diesel_migrations::{EmbeddedMigrations, embed_migrations};
use syntropism_contracts::subjects::services;
use syntropism_platform::Service;
use tokio_util::sync::CancellationToken;

pub use config::AttentionConfig;

/// `migrations/attention/`, compiled into the binary.
pub const MIGRATIONS: EmbeddedMigrations = embed_migrations!("../../migrations/attention");

/// Starts the service (connections, migrations, handlers, the sweep); call [`Service::run`] to
/// serve until `stop` fires.
pub async fn start(config: &AttentionConfig, stop: CancellationToken) -> anyhow::Result<Service> {
    let mut service = Service::start(
        services::ATTENTION,
        &config.platform,
        MIGRATIONS,
        stop.clone(),
    )
    .await?;
    let attention = Arc::new(handlers::Attention::new(
        store::Store::new(service.pool.clone()),
        service.client(),
        config.service.clone(),
        service.outbox.clone(),
    ));
    handlers::register(&mut service.rpc, attention.clone()).await?;
    tokio::spawn(attention.sweep_until(stop));
    Ok(service)
}
