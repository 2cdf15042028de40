//! `market`: the resource market service.

use std::path::PathBuf;

use clap::Parser;
use syntropism_market::MarketConfig;
use syntropism_market::config::{DEFAULTS, SECTION};
use syntropism_platform::telemetry::Telemetry;

/// Syntropism's market service: supply, reserve prices and price discovery.
///
/// Configuration: built-in defaults, then the optional file, then environment variables
/// `SYNTROPISM__<SECTION>__<KEY>` (e.g. `SYNTROPISM__DATABASE__URL`).
#[derive(Debug, Parser)]
#[command(version)]
struct Args {
    /// A TOML configuration file.
    #[arg(long, env = "SYNTROPISM_CONFIG")]
    config: Option<PathBuf>,
    /// Validate the configuration, print it, and exit.
    #[arg(long)]
    check_config: bool,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let config: MarketConfig =
        match syntropism_platform::config::load(SECTION, DEFAULTS, args.config.as_deref()) {
            Ok(config) => config,
            Err(error) => {
                eprintln!("market: {error}");
                std::process::exit(2);
            }
        };
    if args.check_config {
        println!("{config:#?}");
        return Ok(());
    }
    let telemetry = Telemetry::init("market", &config.platform.telemetry)?;
    let stop = syntropism_platform::shutdown::on_signal();
    let result = async {
        let service = syntropism_market::start(&config, stop).await?;
        service.run().await;
        anyhow::Ok(())
    }
    .await;
    if let Err(error) = &result {
        tracing::error!(error = format!("{error:#}"), "market failed");
    }
    telemetry.shutdown();
    result
}
