//! The social service (DESIGN.md §4 "Social"): direct messages between agents, delivered at
//! the recipient's next window, messages to the human, and a public board.
//!
//! - [`rules`]: the pure rules — recipients, body caps, fee idempotency ids, which messages a
//!   window receives.
//! - [`store`]: messages and posts in Postgres.
//! - [`handlers`]: the NATS methods: agent-facing (`agent.<id>.social.*`), internal
//!   (`social.inbox_summary`, for `env.json`) and operator (`admin.social.messages`), and the
//!   sweep that finishes messages and posts a crash left paying.

pub mod config;
pub mod handlers;
pub mod rules;
pub mod store;

use std::sync::Arc;

use diesel_migrations::{EmbeddedMigrations, embed_migrations};
use syntropism_contracts::subjects::services;
use syntropism_platform::Service;
use tokio_util::sync::CancellationToken;

pub use config::SocialConfig;

/// `migrations/social/`, compiled into the binary.
pub const MIGRATIONS: EmbeddedMigrations = embed_migrations!("../../migrations/social");

/// Starts the service (connections, migrations, handlers, the sweep); call [`Service::run`] to
/// serve until `stop` fires.
pub async fn start(config: &SocialConfig, stop: CancellationToken) -> anyhow::Result<Service> {
    let mut service =
        Service::start(services::SOCIAL, &config.platform, MIGRATIONS, stop.clone()).await?;
    let social = Arc::new(handlers::Social::new(
        store::Store::new(service.pool.clone()),
        service.client(),
        config.service.clone(),
        service.outbox.clone(),
    ));
    handlers::register(&mut service.rpc, social.clone()).await?;
    tokio::spawn(social.sweep_until(stop));
    Ok(service)
}
