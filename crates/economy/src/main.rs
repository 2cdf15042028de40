//! `economy`: the credit ledger service.

use syntropism_economy::config::{DEFAULTS, SECTION};

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    syntropism_platform::cli::run_service(
        "economy",
        "Syntropism's economy service: the double-entry credit ledger.",
        SECTION,
        DEFAULTS,
        |config: syntropism_economy::config::EconomyConfig, stop| async move {
            syntropism_economy::start(&config, stop).await
        },
    )
    .await
}
