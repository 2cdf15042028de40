//! The NATS connection every service uses: retried with backoff at start-up (the broker may come
//! up after the service), reconnecting forever afterwards.

use std::time::Duration;

use anyhow::Context as _;
use async_nats::{Client, ConnectOptions};

use crate::config::NatsConfig;

/// Connects as `name`, retrying with exponential backoff up to `connect_attempts` times.
pub async fn connect(config: &NatsConfig, name: &str) -> anyhow::Result<Client> {
    let mut delay = Duration::from_millis(100);
    let mut attempt = 0u32;
    loop {
        attempt += 1;
        let mut options = ConnectOptions::new()
            .name(name)
            .connection_timeout(Duration::from_millis(config.connect_timeout_ms))
            .request_timeout(Some(Duration::from_millis(config.request_timeout_ms)))
            .max_reconnects(None);
        if let Some(file) = &config.credentials_file {
            options = options.credentials_file(file).await.with_context(|| {
                format!("nats.credentials_file: cannot read {}", file.display())
            })?;
        }
        match options.connect(config.url.as_str()).await {
            Ok(client) => {
                tracing::info!(url = %config.url, "connected to NATS");
                return Ok(client);
            }
            Err(error) if config.connect_attempts == 0 || attempt < config.connect_attempts => {
                tracing::warn!(url = %config.url, %error, attempt, "NATS not reachable yet; retrying");
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(Duration::from_secs(5));
            }
            Err(error) => {
                return Err(error).with_context(|| {
                    format!(
                        "nats.url: cannot connect to {} after {attempt} attempts",
                        config.url
                    )
                });
            }
        }
    }
}
