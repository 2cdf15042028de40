//! `sandbox-runner`: agent containers with hard limits, run on request over NATS.

use syntropism_sandbox_runner::config::{DEFAULTS, SECTION};

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    syntropism_platform::cli::run_service(
        "sandbox-runner",
        "Syntropism's sandbox runner: runs agents' execution windows in hardened Docker containers.",
        SECTION,
        DEFAULTS,
        |config: syntropism_sandbox_runner::RunnerConfig, stop| async move {
            syntropism_sandbox_runner::start(&config, stop).await
        },
    )
    .await
}
