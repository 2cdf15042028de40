//! `attention`: prompts shown to the human, and the rewards the human gives.

use syntropism_attention::config::{DEFAULTS, SECTION};

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    syntropism_platform::cli::run_service(
        "attention",
        "Syntropism's attention service: prompts, the human's scores, rewards.",
        SECTION,
        DEFAULTS,
        |config: syntropism_attention::AttentionConfig, stop| async move {
            syntropism_attention::start(&config, stop).await
        },
    )
    .await
}
