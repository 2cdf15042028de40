//! `social`: direct messages between agents (and to the human), and the public board.

use syntropism_social::config::{DEFAULTS, SECTION};

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    syntropism_platform::cli::run_service(
        "social",
        "Syntropism's social service: direct messages, messages to the human, the public board.",
        SECTION,
        DEFAULTS,
        |config: syntropism_social::SocialConfig, stop| async move {
            syntropism_social::start(&config, stop).await
        },
    )
    .await
}
