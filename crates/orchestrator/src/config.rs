//! The orchestrator's configuration: the shared platform sections plus `[orchestrator]`.

use std::path::PathBuf;

use serde::Deserialize;
use syntropism_contracts::pb;
use syntropism_platform::config::ServiceConfig;
use syntropism_platform::{Problems, Validate};

/// The shared platform sections plus `[orchestrator]`.
pub type OrchestratorConfig = ServiceConfig<OrchestratorSection>;

/// The name of the service's own configuration section.
pub const SECTION: &str = "orchestrator";

/// A bundle as configuration writes it.
#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq)]
#[serde(default)]
pub struct BundleConfig {
    pub cpu_millicores: u64,
    pub memory_mib: u64,
    pub duration_ms: u64,
    pub llm_tokens: u64,
    pub attention_slots: u64,
}

impl Default for BundleConfig {
    fn default() -> Self {
        Self {
            cpu_millicores: 500,
            memory_mib: 256,
            duration_ms: 10_000,
            llm_tokens: 0,
            attention_slots: 1,
        }
    }
}

impl BundleConfig {
    pub fn to_pb(self) -> pb::Bundle {
        pb::Bundle {
            cpu_millicores: self.cpu_millicores,
            memory_mib: self.memory_mib,
            duration_ms: self.duration_ms,
            llm_tokens: self.llm_tokens,
            attention_slots: self.attention_slots,
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(default)]
pub struct OrchestratorSection {
    /// This replica's name in the leader lease. Empty: host name and process id.
    pub replica_id: String,
    /// The tick period: one clearing round per tick.
    pub tick_ms: u64,
    /// How long a leader's lease lasts without renewal; a replacement takes over after it.
    pub lease_ms: u64,
    /// Agents' workspaces (`<root>/<agent id>`), shared with the sandbox runners.
    pub workspace_root: PathBuf,
    /// Where dead agents' workspaces go, read-only.
    pub archive_root: PathBuf,
    /// The NATS identity keys (`nats-identity`): the account key signs executions' credentials.
    pub identity_dir: PathBuf,
    /// Genesis: the workspace it starts from, its endowment (µcr) and its first bid.
    pub genesis_dir: PathBuf,
    pub genesis_endowment_micros: i64,
    pub genesis_bundle: BundleConfig,
    pub genesis_bid_micros: i64,
    /// Spawn: the fee (burned), and the caps on the child's files.
    pub spawn_fee_micros: i64,
    pub spawn_max_files: usize,
    pub spawn_max_file_bytes: usize,
    pub spawn_max_total_bytes: u64,
    /// A spawn its parent's request left unfinished this long is carried forward by the leader.
    pub spawn_sweep_after_ms: u64,
    /// The cheapest possible bundle: an agent that cannot pay its reserve value, with no bid
    /// and no window, is dead.
    pub cheapest_bundle: BundleConfig,
    /// Extra time past a window's deadline before its run is looked up instead of awaited.
    pub run_grace_ms: u64,
    /// How long a window may wait for a runner with room before it fails.
    pub capacity_wait_ms: u64,
    /// A waiting window is woken when a run this replica carries ends; it also asks again
    /// this often, for room freed elsewhere.
    pub capacity_poll_ms: u64,
    /// Every living agent's status is checked every this many ticks (and each agent's when
    /// its window ends).
    pub settle_every_ticks: u64,
    /// Executions dispatched with debug mode on (agent ids; the operator's choice).
    pub debug_agents: Vec<String>,
}

impl Default for OrchestratorSection {
    fn default() -> Self {
        Self {
            replica_id: String::new(),
            tick_ms: 5_000,
            lease_ms: 10_000,
            workspace_root: PathBuf::from(".run/workspaces"),
            archive_root: PathBuf::from(".run/archive"),
            identity_dir: PathBuf::from(".run/nats-identity"),
            genesis_dir: PathBuf::from("workspaces/genesis"),
            genesis_endowment_micros: 1_000_000_000,
            genesis_bundle: BundleConfig::default(),
            genesis_bid_micros: 10_000_000,
            spawn_fee_micros: 100_000_000,
            spawn_max_files: 64,
            spawn_max_file_bytes: 256 * 1024,
            spawn_max_total_bytes: 4 * 1024 * 1024,
            spawn_sweep_after_ms: 30_000,
            cheapest_bundle: BundleConfig {
                cpu_millicores: 100,
                memory_mib: 64,
                duration_ms: 1_000,
                llm_tokens: 0,
                attention_slots: 0,
            },
            run_grace_ms: 30_000,
            capacity_wait_ms: 60_000,
            capacity_poll_ms: 1_000,
            settle_every_ticks: 5,
            debug_agents: Vec::new(),
        }
    }
}

impl Validate for OrchestratorSection {
    fn validate(&self, p: &mut Problems) {
        p.check(
            self.tick_ms >= 100,
            "orchestrator.tick_ms",
            "must be at least 100",
        );
        p.check(
            self.lease_ms >= 2 * self.tick_ms.min(5_000) && self.lease_ms >= 500,
            "orchestrator.lease_ms",
            "must be at least 500 and twice tick_ms (capped at 5 s)",
        );
        p.check(
            (10..=60_000).contains(&self.capacity_poll_ms),
            "orchestrator.capacity_poll_ms",
            "must be between 10 and 60000",
        );
        p.check(
            (1..=1000).contains(&self.settle_every_ticks),
            "orchestrator.settle_every_ticks",
            "must be between 1 and 1000",
        );
        p.check(
            self.genesis_endowment_micros > 0,
            "orchestrator.genesis_endowment_micros",
            "must be positive",
        );
        p.check(
            self.genesis_bid_micros > 0 && self.genesis_bid_micros <= self.genesis_endowment_micros,
            "orchestrator.genesis_bid_micros",
            "must be positive and at most the endowment",
        );
        p.check(
            self.spawn_fee_micros >= 0,
            "orchestrator.spawn_fee_micros",
            "must not be negative",
        );
        p.check(
            (1..=1024).contains(&self.spawn_max_files),
            "orchestrator.spawn_max_files",
            "must be between 1 and 1024",
        );
        p.check(
            self.spawn_max_file_bytes >= 1
                && (self.spawn_max_file_bytes as u64) <= self.spawn_max_total_bytes,
            "orchestrator.spawn_max_file_bytes",
            "must be positive and at most spawn_max_total_bytes",
        );
        for (key, bundle) in [
            ("orchestrator.genesis_bundle", &self.genesis_bundle),
            ("orchestrator.cheapest_bundle", &self.cheapest_bundle),
        ] {
            p.check(
                bundle.cpu_millicores > 0 && bundle.memory_mib >= 6 && bundle.duration_ms > 0,
                key,
                "cpu and duration must be positive, memory at least 6 MiB",
            );
        }
        p.check(
            self.debug_agents
                .iter()
                .all(|a| syntropism_contracts::AgentId::parse(a, "debug_agents").is_ok()),
            "orchestrator.debug_agents",
            "must be agent ids",
        );
    }
}

/// Built-in defaults that depend on the service (the rest are in the structs).
pub const DEFAULTS: &[(&str, &str)] = &[
    (
        "database.url",
        "postgres://orchestrator:orchestrator@127.0.0.1:55432/syntropism",
    ),
    ("http.listen", "127.0.0.1:9105"),
];
