//! `market`: the resource market service.

use syntropism_market::config::{DEFAULTS, SECTION};

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    syntropism_platform::cli::run_service(
        "market",
        "Syntropism's market service: supply, reserve prices and price discovery.",
        SECTION,
        DEFAULTS,
        |config: syntropism_market::config::MarketConfig, stop| async move {
            syntropism_market::start(&config, stop).await
        },
    )
    .await
}
