//! The sandbox runner's configuration: the shared platform sections plus `[sandbox]`.

use std::path::PathBuf;

use serde::Deserialize;
use syntropism_platform::config::ServiceConfig;
use syntropism_platform::{Problems, Validate};

/// The shared platform sections plus `[sandbox]`.
pub type RunnerConfig = ServiceConfig<SandboxSection>;

/// The name of the service's own configuration section.
pub const SECTION: &str = "sandbox";

#[derive(Debug, Clone, Deserialize)]
#[serde(default)]
pub struct SandboxSection {
    /// This runner's id: its containers carry it, and a restarted runner removes the containers
    /// of its previous life by it. Empty: the host name.
    pub runner_id: String,
    /// The capacity this runner offers: the sum of the bundles it runs at once.
    pub cpu_millicores: u64,
    pub memory_mib: u64,
    /// The image of a request that names none.
    pub image: String,
    /// A request's image must start with one of these.
    pub allowed_images: Vec<String>,
    /// Agents' workspaces: `<workspace_root>/<agent id>`, shared with the orchestrator.
    pub workspace_root: PathBuf,
    /// Where each run's socket directory is made. Empty: a directory under the temp dir.
    pub run_dir: PathBuf,
    /// NATS as the runner reaches it (`host:port`), relayed into sandboxes. Empty: the host
    /// and port of `nats.url`.
    pub nats_upstream: String,
    /// NATS connections one sandbox may hold at once.
    pub max_nats_connections: usize,
    pub pids_limit: i64,
    pub tmp_mib: u64,
    /// The most bytes of a run's output kept (its end).
    pub log_tail_bytes: usize,
    /// Debug mode's port, on 127.0.0.1 of the runner's host.
    pub debug_port: u16,
    pub heartbeat_ms: u64,
    /// A run is lost when its runner has not beaten for this long.
    pub lost_after_ms: u64,
}

impl Default for SandboxSection {
    fn default() -> Self {
        Self {
            runner_id: String::new(),
            cpu_millicores: 2000,
            memory_mib: 4096,
            image: "syntropism/agent-runtime:latest".into(),
            allowed_images: vec!["syntropism/agent-runtime:".into()],
            workspace_root: PathBuf::from(".run/workspaces"),
            run_dir: PathBuf::new(),
            nats_upstream: String::new(),
            max_nats_connections: 8,
            pids_limit: 128,
            tmp_mib: 64,
            log_tail_bytes: 64 * 1024,
            debug_port: 5678,
            heartbeat_ms: 2000,
            lost_after_ms: 15_000,
        }
    }
}

fn valid_runner_id(id: &str) -> bool {
    id.len() <= 64
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_' || b == b'.')
}

impl Validate for SandboxSection {
    fn validate(&self, p: &mut Problems) {
        p.check(
            valid_runner_id(&self.runner_id),
            "sandbox.runner_id",
            "at most 64 letters, digits, '-', '_' and '.'",
        );
        p.check(
            self.cpu_millicores >= 1,
            "sandbox.cpu_millicores",
            "must be positive",
        );
        p.check(
            self.memory_mib >= 6,
            "sandbox.memory_mib",
            "must be at least 6",
        );
        p.check(
            self.allowed_images
                .iter()
                .any(|prefix| self.image.starts_with(prefix.as_str())),
            "sandbox.image",
            "must be one of allowed_images",
        );
        p.check(
            (1..=1024).contains(&self.max_nats_connections),
            "sandbox.max_nats_connections",
            "must be between 1 and 1024",
        );
        p.check(
            self.pids_limit >= 8,
            "sandbox.pids_limit",
            "must be at least 8",
        );
        p.check(
            (1..=4096).contains(&self.tmp_mib),
            "sandbox.tmp_mib",
            "must be between 1 and 4096",
        );
        p.check(
            self.log_tail_bytes <= 1 << 20,
            "sandbox.log_tail_bytes",
            "must be at most 1 MiB (Docker keeps no more)",
        );
        p.check(
            self.heartbeat_ms >= 100 && self.lost_after_ms >= 3 * self.heartbeat_ms,
            "sandbox.lost_after_ms",
            "heartbeat_ms must be ≥ 100 and lost_after_ms ≥ 3 × heartbeat_ms",
        );
    }
}

/// Built-in defaults that depend on the service (the rest are in the structs).
pub const DEFAULTS: &[(&str, &str)] = &[
    (
        "database.url",
        "postgres://sandbox:sandbox@127.0.0.1:55432/syntropism",
    ),
    ("http.listen", "127.0.0.1:9104"),
];
