//! The market service (DESIGN.md §4 "Resources and bundles"): what a round sells and at what
//! price.
//!
//! - [`pricing`]: the pure rules — a bundle's reserve value, utilisation, and the pluggable
//!   price rules applied after each round.
//! - [`store`]: the catalogue and the history of rounds in Postgres.
//! - [`handlers`]: the NATS methods: internal (`market.*`), agent-facing
//!   (`agent.<id>.market.state`) and operator (`admin.market.*`).

pub mod config;
pub mod handlers;
pub mod pricing;
pub mod store;

use std::sync::Arc;

use diesel_migrations::{EmbeddedMigrations, embed_migrations};
use syntropism_contracts::events;
use syntropism_contracts::subjects::{market_events, services};
use syntropism_platform::Service;
use syntropism_platform::outbox::PendingEvent;
use tokio_util::sync::CancellationToken;

pub use config::MarketConfig;

/// `migrations/market/`, compiled into the binary.
pub const MIGRATIONS: EmbeddedMigrations = embed_migrations!("../../migrations/market");

/// Starts the service (connections, migrations, the catalogue seeded from configuration on
/// first start, handlers); call [`Service::run`] to serve until `stop` fires.
pub async fn start(config: &MarketConfig, stop: CancellationToken) -> anyhow::Result<Service> {
    let mut service = Service::start(services::MARKET, &config.platform, MIGRATIONS, stop).await?;
    let store = store::Store::new(service.pool.clone());
    let seed = handlers::Market::configured_catalogue(&config.service);
    let event = PendingEvent {
        subject: market_events::CATALOGUE_CHANGED.into(),
        envelope: events::envelope(
            services::MARKET,
            &handlers::seeded_event(&seed),
            &uuid::Uuid::now_v7().to_string(),
            "catalogue/1",
        ),
    };
    let (catalogue, created) = store
        .seed(&seed, event)
        .await
        .map_err(|e| anyhow::anyhow!("seeding the catalogue: {e}"))?;
    if created {
        service.outbox.notify_one();
        tracing::info!("catalogue seeded from configuration");
    } else if catalogue.version > 1 || catalogue.supply != seed.supply {
        tracing::info!(
            version = catalogue.version,
            "the catalogue in the database (changed by the operator) is in force, not the configured one"
        );
    }
    let market = Arc::new(handlers::Market::new(store, config.service.clone()));
    handlers::register(&mut service.rpc, market).await?;
    Ok(service)
}
