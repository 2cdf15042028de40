//! `orchestrator`: the agent registry and the tick loop that keeps the economy running.

use syntropism_orchestrator::config::{DEFAULTS, SECTION};

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    syntropism_platform::cli::run_service(
        "orchestrator",
        "Syntropism's orchestrator: agents, ticks, genesis, spawn, life and death.",
        SECTION,
        DEFAULTS,
        |config: syntropism_orchestrator::OrchestratorConfig, stop| async move {
            syntropism_orchestrator::start(&config, stop).await
        },
    )
    .await
}
