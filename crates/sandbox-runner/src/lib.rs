//! The sandbox runner (DESIGN.md §4 "Execution windows"): agent containers with hard limits.
//!
//! - [`sandbox`] runs one execution's container through the Docker API: the workspace
//!   read-write at `/workspace` and nothing else of the host, a read-only root filesystem, a
//!   size-capped `/tmp`, a non-root user, cpu and memory limits without swap, a pids limit, no
//!   capabilities, no privilege escalation, Docker's default seccomp, no network but loopback,
//!   bounded logs; killed at the deadline and always removed, with the outcome, cpu time and
//!   peak memory reported.
//! - [`relay`]: NATS, the one thing a sandbox reaches, through a Unix socket of the runner's.
//! - [`workspace`]: the agent's workspace handled as hostile content.
//! - [`service`] and [`store`]: the `sandbox-runner` service: `sandbox.run` in a queue group,
//!   capacity, at-most-once runs claimed in Postgres, outcome events, heartbeats and lost runs.

pub mod config;
pub mod relay;
pub mod sandbox;
pub mod service;
pub mod store;
pub mod workspace;

use std::sync::Arc;

use anyhow::Context as _;
use diesel_migrations::{EmbeddedMigrations, embed_migrations};
use syntropism_contracts::subjects::services;
use syntropism_platform::Service;
use tokio_util::sync::CancellationToken;

pub use config::RunnerConfig;

/// `migrations/sandbox/`, compiled into the binary.
pub const MIGRATIONS: EmbeddedMigrations = embed_migrations!("../../migrations/sandbox");

/// This host's name, as a runner id.
fn host_name() -> String {
    let name = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap_or_default();
    let name: String = name
        .trim()
        .chars()
        .filter(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
        .take(64)
        .collect();
    if name.is_empty() {
        "runner".into()
    } else {
        name
    }
}

/// `host:port` of a `nats://host:port` URL (the first, if several).
fn nats_host_port(url: &str) -> String {
    let rest = url.split(',').next().unwrap_or_default().trim();
    let rest = rest.split_once("://").map_or(rest, |(_, r)| r);
    let rest = rest.rsplit_once('@').map_or(rest, |(_, r)| r);
    let rest = rest.split('/').next().unwrap_or_default();
    if rest.contains(':') {
        rest.to_owned()
    } else {
        format!("{rest}:4222")
    }
}

/// Starts the runner: connections and migrations, registration, the runs a previous life of
/// this runner left marked lost and their containers removed, the heartbeat, the handlers.
/// Call [`Service::run`] to serve until `stop` fires.
pub async fn start(config: &RunnerConfig, stop: CancellationToken) -> anyhow::Result<Service> {
    let section = config.service.clone();
    let runner_id = if section.runner_id.is_empty() {
        host_name()
    } else {
        section.runner_id.clone()
    };
    let run_dir = if section.run_dir.as_os_str().is_empty() {
        service::default_run_dir(&runner_id)
    } else {
        section.run_dir.clone()
    };
    let nats_upstream = if section.nats_upstream.is_empty() {
        nats_host_port(&config.platform.nats.url)
    } else {
        section.nats_upstream.clone()
    };
    let sandbox = sandbox::Sandbox::connect(&runner_id)?.with_run_dir(&run_dir);
    sandbox
        .docker()
        .ping()
        .await
        .context("the Docker engine is not reachable (is Docker running?)")?;
    std::fs::create_dir_all(&section.workspace_root).with_context(|| {
        format!(
            "sandbox.workspace_root {}",
            section.workspace_root.display()
        )
    })?;

    let mut service = Service::start(
        services::SANDBOX,
        &config.platform,
        MIGRATIONS,
        stop.clone(),
    )
    .await?;
    let store = store::Store::new(service.pool.clone());
    store
        .register(&runner_id, section.cpu_millicores, section.memory_mib)
        .await
        .map_err(|e| anyhow::anyhow!("registering the runner: {e}"))?;
    // A previous life of this runner died: its runs are lost and its containers go.
    let lost = store
        .mark_lost(0, Some(&runner_id))
        .await
        .map_err(|e| anyhow::anyhow!("marking lost runs: {e}"))?;
    let orphans = sandbox.remove_orphans().await?;
    if !lost.is_empty() || orphans > 0 {
        tracing::warn!(
            lost = lost.len(),
            orphans,
            "a previous run of this runner died: its runs are lost and its containers removed"
        );
        service.outbox.notify_one();
    }
    let runner = Arc::new(service::Runner::new(
        section,
        runner_id.clone(),
        nats_upstream,
        sandbox,
        store,
        service.outbox.clone(),
    ));
    tokio::spawn(runner.clone().heartbeat(stop));
    service::register(&mut service.rpc, runner).await?;
    tracing::info!(runner = %runner_id, "runner ready");
    Ok(service)
}

#[cfg(test)]
mod tests {
    #[test]
    fn nats_urls_become_host_and_port() {
        assert_eq!(
            super::nats_host_port("nats://127.0.0.1:4222"),
            "127.0.0.1:4222"
        );
        assert_eq!(super::nats_host_port("nats://u:p@nats:5000/"), "nats:5000");
        assert_eq!(super::nats_host_port("nats"), "nats:4222");
        assert_eq!(super::nats_host_port("nats://a:1,nats://b:2"), "a:1");
    }
}
