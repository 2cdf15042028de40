//! One execution's container, from creation to removal.

use std::collections::{HashMap, VecDeque};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use bollard::Docker;
use bollard::models::{ContainerCreateBody, HostConfig, HostConfigLogConfig};
use bollard::query_parameters::{
    CreateContainerOptionsBuilder, KillContainerOptionsBuilder, ListContainersOptionsBuilder,
    LogsOptionsBuilder, RemoveContainerOptionsBuilder, StatsOptionsBuilder,
    WaitContainerOptionsBuilder,
};
use futures::StreamExt;

use crate::relay::{self, Relays};

/// The label every sandbox container carries, with the runner's id as its value.
pub const RUNNER_LABEL: &str = "org.syntropism.runner";
pub const EXECUTION_LABEL: &str = "org.syntropism.execution";
pub const AGENT_LABEL: &str = "org.syntropism.agent";
/// The uid agents run as (the runtime image's `agent` user); it must own the workspace.
pub const AGENT_UID: u32 = 10001;

#[derive(Debug, thiserror::Error)]
pub enum SandboxError {
    #[error("docker: {0}")]
    Docker(#[from] bollard::errors::Error),
    #[error("invalid run: {0}")]
    Invalid(String),
    #[error("sandbox sockets: {0}")]
    Relay(#[from] std::io::Error),
}

/// What to run, and within which limits.
#[derive(Debug, Clone)]
pub struct RunSpec {
    pub execution_id: String,
    pub agent_id: String,
    pub image: String,
    /// The agent's workspace on the host, mounted read-write at `/workspace`.
    pub workspace: PathBuf,
    pub cpu_millicores: u64,
    pub memory_mib: u64,
    /// How long the container may run before it is killed.
    pub time_limit: Duration,
    pub env: Vec<(String, String)>,
    /// NATS (`host:port`, as the runner reaches it) relayed into the sandbox at
    /// `127.0.0.1:4222`; `None`: nothing is reachable.
    pub nats_upstream: Option<String>,
    /// The most NATS connections the sandbox may hold at once.
    pub max_nats_connections: usize,
    /// Debug mode: the program waits for a debugger, which connects to this address (loopback).
    pub debug: Option<SocketAddr>,
    /// A Docker network to attach to instead of none (tests of the isolation only).
    pub network: Option<String>,
    pub pids_limit: i64,
    pub tmp_mib: u64,
    /// The most bytes of stdout/stderr kept (the end of it).
    pub log_tail_bytes: usize,
}

impl RunSpec {
    /// A spec with the default limits for everything the caller does not set.
    pub fn new(execution_id: &str, agent_id: &str, image: &str, workspace: PathBuf) -> Self {
        Self {
            execution_id: execution_id.into(),
            agent_id: agent_id.into(),
            image: image.into(),
            workspace,
            cpu_millicores: 1000,
            memory_mib: 256,
            time_limit: Duration::from_secs(60),
            env: Vec::new(),
            nats_upstream: None,
            max_nats_connections: 8,
            debug: None,
            network: None,
            pids_limit: 128,
            tmp_mib: 64,
            log_tail_bytes: 64 * 1024,
        }
    }

    fn validate(&self) -> Result<(), SandboxError> {
        let invalid = |m: &str| Err(SandboxError::Invalid(m.into()));
        if self.execution_id.is_empty()
            || !self
                .execution_id
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        {
            return invalid("execution_id must be letters, digits, - and _");
        }
        if !self.workspace.is_absolute() {
            return invalid("the workspace must be an absolute path");
        }
        // The bind is written `host:container:mode`: a `:` or `,` in the path would change it.
        let path = self.workspace.to_string_lossy();
        if path.contains([':', ',']) || path.contains('\0') {
            return invalid("the workspace path must not contain ':' or ','");
        }
        if self.cpu_millicores == 0 || self.memory_mib < 6 || self.pids_limit < 1 {
            return invalid("cpu, memory (≥ 6 MiB) and pids limits must be positive");
        }
        // Docker follows a symlink when it mounts: the workspace must be a directory itself.
        match std::fs::symlink_metadata(&self.workspace) {
            Ok(meta) if meta.is_dir() => {}
            Ok(_) => return invalid("the workspace is not a directory (a symlink?)"),
            Err(e) => return invalid(&format!("the workspace: {e}")),
        }
        Ok(())
    }
}

/// How a run ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    Completed,
    Failed { exit_code: i64 },
    TimedOut,
    OomKilled,
}

/// What a run did.
#[derive(Debug, Clone)]
pub struct RunReport {
    pub outcome: Outcome,
    /// The end of stdout and stderr, interleaved, at most `log_tail_bytes`.
    pub log_tail: String,
    /// Whether earlier output was cut off.
    pub log_truncated: bool,
    pub wall_time: Duration,
    /// CPU time the container used (sampled every 100 ms while it ran).
    pub cpu_time: Duration,
    /// The most memory it held at once, in bytes.
    pub peak_memory_bytes: u64,
}

/// Runs sandboxes on the local Docker engine for one runner.
#[derive(Debug, Clone)]
pub struct Sandbox {
    docker: Docker,
    runner_id: String,
    run_dir: PathBuf,
}

impl Sandbox {
    /// Connects to the local Docker engine (`DOCKER_HOST` or the default socket). Each run's
    /// sockets live under `<temp dir>/syntropism-runner-<runner id>` unless
    /// [`Sandbox::with_run_dir`] says otherwise.
    pub fn connect(runner_id: &str) -> Result<Self, SandboxError> {
        Ok(Self {
            docker: Docker::connect_with_local_defaults()?,
            runner_id: runner_id.into(),
            run_dir: std::env::temp_dir().join(format!("syntropism-runner-{runner_id}")),
        })
    }

    /// Where each run's socket directory is made (created if missing, owner root).
    pub fn with_run_dir(mut self, dir: impl Into<PathBuf>) -> Self {
        self.run_dir = dir.into();
        self
    }

    pub fn docker(&self) -> &Docker {
        &self.docker
    }

    pub fn runner_id(&self) -> &str {
        &self.runner_id
    }

    pub fn container_name(&self, spec: &RunSpec) -> String {
        format!("syntropism-{}", spec.execution_id)
    }

    /// The container's configuration: every limit of the sandbox. `sockets`: the run's socket
    /// directory, mounted read-only at `/run/syntropism`.
    pub fn container_config(&self, spec: &RunSpec, sockets: Option<&Path>) -> ContainerCreateBody {
        let memory = (spec.memory_mib * 1024 * 1024) as i64;
        let mut env: Vec<String> = spec.env.iter().map(|(k, v)| format!("{k}={v}")).collect();
        let mut binds = vec![format!("{}:/workspace:rw", spec.workspace.display())];
        if let Some(dir) = sockets {
            binds.push(format!("{}:{}:ro", dir.display(), relay::CONTAINER_DIR));
            if spec.nats_upstream.is_some() {
                env.push(format!(
                    "SYNTROPISM_NATS_SOCKET={}/{}",
                    relay::CONTAINER_DIR,
                    relay::NATS_SOCKET
                ));
            }
            if spec.debug.is_some() {
                env.push("SYNTROPISM_DEBUG=1".into());
                env.push(format!(
                    "SYNTROPISM_DEBUG_SOCKET={}/{}",
                    relay::CONTAINER_DIR,
                    relay::DEBUG_SOCKET
                ));
            }
        }
        let labels = HashMap::from([
            (RUNNER_LABEL.to_owned(), self.runner_id.clone()),
            (EXECUTION_LABEL.to_owned(), spec.execution_id.clone()),
            (AGENT_LABEL.to_owned(), spec.agent_id.clone()),
        ]);
        ContainerCreateBody {
            image: Some(spec.image.clone()),
            user: Some(format!("{AGENT_UID}:{AGENT_UID}")),
            working_dir: Some("/workspace".into()),
            env: Some(env),
            labels: Some(labels),
            network_disabled: Some(spec.network.is_none()),
            host_config: Some(HostConfig {
                binds: Some(binds),
                readonly_rootfs: Some(true),
                tmpfs: Some(HashMap::from([(
                    "/tmp".to_owned(),
                    format!("rw,noexec,nosuid,nodev,size={}m", spec.tmp_mib),
                )])),
                memory: Some(memory),
                // No swap beyond memory.
                memory_swap: Some(memory),
                nano_cpus: Some((spec.cpu_millicores * 1_000_000) as i64),
                pids_limit: Some(spec.pids_limit),
                cap_drop: Some(vec!["ALL".into()]),
                // Docker's default seccomp profile applies unless disabled; only this is added.
                security_opt: Some(vec!["no-new-privileges:true".into()]),
                privileged: Some(false),
                network_mode: Some(spec.network.clone().unwrap_or_else(|| "none".into())),
                ipc_mode: Some("private".into()),
                // Docker's own copy of the logs is bounded too.
                log_config: Some(HostConfigLogConfig {
                    typ: Some("json-file".into()),
                    config: Some(HashMap::from([
                        ("max-size".to_owned(), "1m".to_owned()),
                        ("max-file".to_owned(), "1".to_owned()),
                    ])),
                }),
                auto_remove: Some(false),
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    /// Runs the execution to its end (or its deadline) and removes its container.
    pub async fn run(&self, spec: &RunSpec) -> Result<RunReport, SandboxError> {
        spec.validate()?;
        let relays = self.relays(spec).await?;
        let name = self.container_name(spec);
        let options = CreateContainerOptionsBuilder::default().name(&name).build();
        self.docker
            .create_container(
                Some(options),
                self.container_config(spec, relays.as_ref().map(Relays::dir)),
            )
            .await?;
        let result = self.start_and_wait(&name, spec).await;
        drop(relays);
        // Always removed, whatever happened.
        let remove = RemoveContainerOptionsBuilder::default().force(true).build();
        if let Err(error) = self.docker.remove_container(&name, Some(remove)).await {
            tracing::warn!(%error, container = %name, "could not remove a sandbox container");
        }
        result
    }

    async fn relays(&self, spec: &RunSpec) -> Result<Option<Relays>, SandboxError> {
        if spec.nats_upstream.is_none() && spec.debug.is_none() {
            return Ok(None);
        }
        std::fs::create_dir_all(&self.run_dir)?;
        let dir = self.run_dir.join(&spec.execution_id);
        // Left by a crash: nothing in it is worth keeping.
        if std::fs::symlink_metadata(&dir).is_ok() {
            std::fs::remove_dir_all(&dir)?;
        }
        let upstream = spec.nats_upstream.as_deref().unwrap_or("127.0.0.1:0");
        Ok(Some(
            Relays::start(&dir, upstream, spec.max_nats_connections, spec.debug).await?,
        ))
    }

    async fn start_and_wait(&self, name: &str, spec: &RunSpec) -> Result<RunReport, SandboxError> {
        let started = Instant::now();
        self.docker.start_container(name, None).await?;
        let usage = Usage::default();
        let sampler = tokio::spawn(usage.clone().sample(self.docker.clone(), name.to_owned()));
        let wait = WaitContainerOptionsBuilder::default()
            .condition("not-running")
            .build();
        let mut waiting = self.docker.wait_container(name, Some(wait));
        let exit = tokio::time::timeout(spec.time_limit, waiting.next()).await;
        let timed_out = exit.is_err();
        if timed_out {
            let kill = KillContainerOptionsBuilder::default()
                .signal("KILL")
                .build();
            let _ = self.docker.kill_container(name, Some(kill)).await;
        }
        let wall_time = started.elapsed();
        sampler.abort();
        let state = self.docker.inspect_container(name, None).await?.state;
        let (exit_code, oom_killed) = state
            .map(|s| (s.exit_code.unwrap_or(-1), s.oom_killed.unwrap_or(false)))
            .unwrap_or((-1, false));
        let outcome = if timed_out {
            Outcome::TimedOut
        } else if oom_killed {
            Outcome::OomKilled
        } else if exit_code == 0 {
            Outcome::Completed
        } else {
            Outcome::Failed { exit_code }
        };
        let (tail, log_truncated) = self.log_tail(name, spec.log_tail_bytes).await;
        Ok(RunReport {
            outcome,
            log_tail: String::from_utf8_lossy(&tail).into_owned(),
            log_truncated,
            wall_time,
            cpu_time: Duration::from_nanos(usage.cpu_nanos.load(Ordering::Relaxed)),
            peak_memory_bytes: usage.peak_memory.load(Ordering::Relaxed),
        })
    }

    /// The end of the container's output, at most `cap` bytes. Docker keeps at most its last
    /// 1 MiB (the log options above), so a flood costs neither disk nor memory here.
    async fn log_tail(&self, name: &str, cap: usize) -> (Vec<u8>, bool) {
        let options = LogsOptionsBuilder::default()
            .stdout(true)
            .stderr(true)
            .build();
        let mut stream = self.docker.logs(name, Some(options));
        let mut tail: VecDeque<u8> = VecDeque::with_capacity(cap.min(1 << 20));
        let mut truncated = false;
        while let Some(chunk) = stream.next().await {
            let Ok(chunk) = chunk else { break };
            for byte in chunk.into_bytes() {
                if tail.len() == cap {
                    tail.pop_front();
                    truncated = true;
                }
                if cap > 0 {
                    tail.push_back(byte);
                }
            }
        }
        (tail.into(), truncated)
    }

    /// Removes this runner's containers left by an earlier crash of it. Returns how many.
    pub async fn remove_orphans(&self) -> Result<usize, SandboxError> {
        let filters = HashMap::from([(
            "label".to_owned(),
            vec![format!("{RUNNER_LABEL}={}", self.runner_id)],
        )]);
        let options = ListContainersOptionsBuilder::default()
            .all(true)
            .filters(&filters)
            .build();
        let containers = self.docker.list_containers(Some(options)).await?;
        let mut removed = 0;
        for container in containers {
            if let Some(id) = container.id {
                let remove = RemoveContainerOptionsBuilder::default().force(true).build();
                self.docker.remove_container(&id, Some(remove)).await?;
                removed += 1;
            }
        }
        Ok(removed)
    }
}

/// A running container's cpu time and peak memory, sampled from its cgroup (v1 or v2) every
/// 100 ms, or from Docker's stats where the cgroup is not visible to the runner.
#[derive(Debug, Clone, Default)]
struct Usage {
    cpu_nanos: Arc<AtomicU64>,
    peak_memory: Arc<AtomicU64>,
}

impl Usage {
    fn record(&self, cpu_nanos: Option<u64>, memory: Option<u64>) {
        if let Some(cpu) = cpu_nanos {
            self.cpu_nanos.fetch_max(cpu, Ordering::Relaxed);
        }
        if let Some(memory) = memory {
            self.peak_memory.fetch_max(memory, Ordering::Relaxed);
        }
    }

    async fn sample(self, docker: Docker, name: String) {
        let id = match docker.inspect_container(&name, None).await {
            Ok(info) => info.id.unwrap_or_default(),
            Err(_) => return,
        };
        let read = |path: String| async move {
            tokio::fs::read_to_string(path)
                .await
                .ok()
                .and_then(|text| text.trim().parse::<u64>().ok())
        };
        let v1 = format!("/sys/fs/cgroup/cpuacct/docker/{id}/cpuacct.usage");
        let v2 = [
            format!("/sys/fs/cgroup/system.slice/docker-{id}.scope"),
            format!("/sys/fs/cgroup/docker/{id}"),
        ]
        .into_iter()
        .find(|dir| Path::new(dir).join("cpu.stat").exists());
        let cgroup = Path::new(&v1).exists() || v2.is_some();
        let mut tick = tokio::time::interval(Duration::from_millis(100));
        loop {
            tick.tick().await;
            if Path::new(&v1).exists() {
                let memory = read(format!(
                    "/sys/fs/cgroup/memory/docker/{id}/memory.max_usage_in_bytes"
                ));
                let (cpu, memory) = (read(v1.clone()).await, memory.await);
                self.record(cpu, memory);
            } else if let Some(dir) = &v2 {
                let cpu = tokio::fs::read_to_string(format!("{dir}/cpu.stat"))
                    .await
                    .ok()
                    .and_then(|text| {
                        text.lines()
                            .find_map(|l| l.strip_prefix("usage_usec "))
                            .and_then(|v| v.trim().parse::<u64>().ok())
                    })
                    .map(|usec| usec * 1000);
                let memory = match read(format!("{dir}/memory.peak")).await {
                    Some(peak) => Some(peak),
                    None => read(format!("{dir}/memory.current")).await,
                };
                self.record(cpu, memory);
            } else if !cgroup {
                let options = StatsOptionsBuilder::default()
                    .stream(false)
                    .one_shot(true)
                    .build();
                let Some(Ok(stats)) = docker.stats(&name, Some(options)).next().await else {
                    continue;
                };
                let cpu = stats
                    .cpu_stats
                    .and_then(|c| c.cpu_usage)
                    .and_then(|u| u.total_usage);
                let memory = stats.memory_stats.and_then(|m| m.max_usage.or(m.usage));
                self.record(cpu, memory);
            }
        }
    }
}
