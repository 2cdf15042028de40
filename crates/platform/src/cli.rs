//! The `main` every service binary shares: `--config FILE` / `--check-config`, configuration,
//! telemetry, start, serve until SIGTERM/SIGINT, flush telemetry.

use std::future::Future;
use std::path::PathBuf;

use clap::{CommandFactory, FromArgMatches, Parser};
use serde::de::DeserializeOwned;
use tokio_util::sync::CancellationToken;

use crate::Service;
use crate::config::{ServiceConfig, Validate};
use crate::telemetry::Telemetry;

/// Configuration: built-in defaults, then the optional file, then environment variables
/// `SYNTROPISM__<SECTION>__<KEY>` (e.g. `SYNTROPISM__DATABASE__URL`).
#[derive(Debug, Parser)]
struct Args {
    /// A TOML configuration file.
    #[arg(long, env = "SYNTROPISM_CONFIG")]
    config: Option<PathBuf>,
    /// Validate the configuration, print it, and exit.
    #[arg(long)]
    check_config: bool,
}

/// Runs the service `name` (described by `about` in `--help`) whose own configuration section
/// is `section` with service-specific `defaults`; `start` builds it from its configuration.
/// An invalid configuration exits with status 2 and a message naming the key.
pub async fn run_service<S, F, Fut>(
    name: &'static str,
    about: &'static str,
    section: &str,
    defaults: &[(&str, &str)],
    start: F,
) -> anyhow::Result<()>
where
    S: DeserializeOwned + Default + Validate + std::fmt::Debug,
    F: FnOnce(ServiceConfig<S>, CancellationToken) -> Fut,
    Fut: Future<Output = anyhow::Result<Service>>,
{
    let command = Args::command()
        .name(name)
        .about(about)
        .version(env!("CARGO_PKG_VERSION"));
    let args = Args::from_arg_matches(&command.get_matches()).unwrap_or_else(|e| e.exit());
    let config: ServiceConfig<S> =
        match crate::config::load(section, defaults, args.config.as_deref()) {
            Ok(config) => config,
            Err(error) => {
                eprintln!("{name}: {error}");
                std::process::exit(2);
            }
        };
    if args.check_config {
        println!("{config:#?}");
        return Ok(());
    }
    let telemetry = Telemetry::init(name, &config.platform.telemetry)?;
    let stop = crate::shutdown::on_signal();
    let result = async {
        start(config, stop).await?.run().await;
        anyhow::Ok(())
    }
    .await;
    if let Err(error) = &result {
        tracing::error!(error = format!("{error:#}"), "{name} failed");
    }
    telemetry.shutdown();
    result
}
