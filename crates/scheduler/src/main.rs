//! `scheduler`: bids in escrow and the clearing auction.

use std::path::PathBuf;

use clap::Parser;
use syntropism_platform::telemetry::Telemetry;
use syntropism_scheduler::SchedulerConfig;
use syntropism_scheduler::config::{DEFAULTS, SECTION};

/// Syntropism's scheduler service: bids in escrow and the combinatorial clearing auction.
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
    let config: SchedulerConfig =
        match syntropism_platform::config::load(SECTION, DEFAULTS, args.config.as_deref()) {
            Ok(config) => config,
            Err(error) => {
                eprintln!("scheduler: {error}");
                std::process::exit(2);
            }
        };
    if args.check_config {
        println!("{config:#?}");
        return Ok(());
    }
    let telemetry = Telemetry::init("scheduler", &config.platform.telemetry)?;
    let stop = syntropism_platform::shutdown::on_signal();
    let result = async {
        let service = syntropism_scheduler::start(&config, stop).await?;
        service.run().await;
        anyhow::Ok(())
    }
    .await;
    if let Err(error) = &result {
        tracing::error!(error = format!("{error:#}"), "scheduler failed");
    }
    telemetry.shutdown();
    result
}
