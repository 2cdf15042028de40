//! `scheduler`: bids in escrow and the clearing auction.

use syntropism_scheduler::config::{DEFAULTS, SECTION};

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    syntropism_platform::cli::run_service(
        "scheduler",
        "Syntropism's scheduler service: bids in escrow and the combinatorial clearing auction.",
        SECTION,
        DEFAULTS,
        |config: syntropism_scheduler::config::SchedulerConfig, stop| async move {
            syntropism_scheduler::start(&config, stop).await
        },
    )
    .await
}
