//! The runner's NATS methods: `sandbox.run` and `sandbox.get_run`.
//!
//! Every runner serves both in the `sandbox` queue group, so a request reaches one of them. A
//! runner takes a run only if its bundle fits the capacity it has free (else `UNAVAILABLE`,
//! reason `no_capacity`, and the caller asks again, reaching another runner); it claims the
//! execution id in Postgres before creating anything, so however often and wherever a run is
//! asked for, it is executed at most once. The reply comes when the run has ended.

use std::collections::HashMap;
use std::net::{Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use prost::Message as _;
use sha2::{Digest, Sha256};
use syntropism_contracts::sandbox::internal::{GetRun, Run};
use syntropism_contracts::subjects::{sandbox_events, services};
use syntropism_contracts::{AgentId, RequestContext, RpcError, RpcServer, events, pb};
use syntropism_platform::outbox::PendingEvent;
use tokio::sync::{Notify, watch};

use crate::config::SandboxSection;
use crate::sandbox::{Outcome, RunSpec, Sandbox};
use crate::store::{Claim, Finish, Store};
use crate::workspace;

/// Environment names the runner sets itself.
const RESERVED_ENV: [&str; 2] = ["SYNTROPISM_", "TRACEPARENT"];
const MAX_ENV: usize = 64;
const MAX_ENV_BYTES: usize = 32 * 1024;
const MAX_INBOX_JSON: usize = 256 * 1024;

/// The capacity a runner has free.
#[derive(Debug)]
struct Capacity {
    cpu: u64,
    memory: u64,
}

/// The runner: its configuration, Docker, its records and what it is running now.
pub struct Runner {
    config: SandboxSection,
    runner_id: String,
    nats_upstream: String,
    sandbox: Sandbox,
    store: Store,
    outbox: Arc<Notify>,
    free: Mutex<Capacity>,
    /// Runs in progress here, with the record they will end with.
    running: Mutex<HashMap<String, watch::Receiver<Option<pb::RunRecord>>>>,
}

impl std::fmt::Debug for Runner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Runner")
            .field("runner_id", &self.runner_id)
            .finish_non_exhaustive()
    }
}

/// A hash of the request that does not depend on the order of its environment map.
fn request_hash(request: &pb::RunRequest) -> Vec<u8> {
    let mut rest = request.clone();
    let env: std::collections::BTreeMap<String, String> =
        std::mem::take(&mut rest.env).into_iter().collect();
    let mut hash = Sha256::new();
    hash.update(rest.encode_to_vec());
    for (key, value) in env {
        hash.update((key.len() as u64).to_le_bytes());
        hash.update(key.as_bytes());
        hash.update((value.len() as u64).to_le_bytes());
        hash.update(value.as_bytes());
    }
    hash.finalize().to_vec()
}

fn unix_time(t: &prost_types::Timestamp) -> Option<chrono::DateTime<chrono::Utc>> {
    chrono::DateTime::from_timestamp(t.seconds, t.nanos.clamp(0, 999_999_999) as u32)
}

fn valid_execution_id(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= 64
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
}

impl Runner {
    pub fn new(
        config: SandboxSection,
        runner_id: String,
        nats_upstream: String,
        sandbox: Sandbox,
        store: Store,
        outbox: Arc<Notify>,
    ) -> Runner {
        let free = Capacity {
            cpu: config.cpu_millicores,
            memory: config.memory_mib,
        };
        Runner {
            config,
            runner_id,
            nats_upstream,
            sandbox,
            store,
            outbox,
            free: Mutex::new(free),
            running: Mutex::new(HashMap::new()),
        }
    }

    pub fn runner_id(&self) -> &str {
        &self.runner_id
    }

    /// Checks a request; returns the agent id and the run's time limit.
    fn check(&self, request: &pb::RunRequest) -> Result<(AgentId, Duration), RpcError> {
        let invalid = |field: &str, message: &str| {
            RpcError::invalid_argument(format!("{field}: {message}"))
                .with_reason("invalid_field")
                .with_detail("field", field)
        };
        if !valid_execution_id(&request.execution_id) {
            return Err(invalid(
                "execution_id",
                "1 to 64 letters, digits, '-' and '_'",
            ));
        }
        let agent = AgentId::parse(&request.agent_id, "agent_id")?;
        let bundle = request
            .bundle
            .as_ref()
            .ok_or_else(|| invalid("bundle", "required"))?;
        if bundle.cpu_millicores == 0 || bundle.memory_mib < 6 || bundle.duration_ms == 0 {
            return Err(invalid(
                "bundle",
                "cpu and duration must be positive, memory at least 6 MiB",
            ));
        }
        let deadline = request
            .deadline
            .as_ref()
            .and_then(unix_time)
            .ok_or_else(|| invalid("deadline", "required"))?;
        if !request.image.is_empty()
            && !self
                .config
                .allowed_images
                .iter()
                .any(|prefix| request.image.starts_with(prefix.as_str()))
        {
            return Err(RpcError::forbidden(format!(
                "image {:?} is not allowed on this runner",
                request.image
            ))
            .with_reason("image_not_allowed"));
        }
        let mut env_bytes = 0;
        for (key, value) in &request.env {
            env_bytes += key.len() + value.len();
            if key.is_empty()
                || !key.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_')
                || RESERVED_ENV.iter().any(|r| key.starts_with(r))
                || value.contains('\0')
            {
                return Err(invalid(
                    "env",
                    &format!(
                        "{key:?}: names are letters, digits and '_', not SYNTROPISM_* or TRACEPARENT; values have no NUL"
                    ),
                ));
            }
        }
        if request.env.len() > MAX_ENV || env_bytes > MAX_ENV_BYTES {
            return Err(RpcError::payload_too_large(format!(
                "at most {MAX_ENV} variables and {MAX_ENV_BYTES} bytes of environment"
            )));
        }
        if request.credentials.is_empty() || request.inbox_prefix.is_empty() {
            return Err(invalid(
                "credentials",
                "the execution's credentials and inbox prefix are required",
            ));
        }
        if !request.inbox_json.is_empty()
            && (request.inbox_json.len() > MAX_INBOX_JSON
                || serde_json::from_str::<serde_json::Value>(&request.inbox_json).is_err())
        {
            return Err(invalid("inbox_json", "a JSON value of at most 256 KiB"));
        }
        let left = (deadline - chrono::Utc::now()).to_std().map_err(|_| {
            RpcError::failed_precondition("the window's deadline has passed")
                .with_reason("deadline_passed")
        })?;
        Ok((agent, left.min(Duration::from_millis(bundle.duration_ms))))
    }

    /// Takes `cpu` millicores and `memory` MiB of free capacity, if they fit.
    fn reserve(&self, cpu: u64, memory: u64) -> Result<(), RpcError> {
        let mut free = self.free.lock().expect("capacity lock");
        if cpu > self.config.cpu_millicores || memory > self.config.memory_mib {
            return Err(RpcError::unavailable("the bundle exceeds this runner")
                .with_reason("no_capacity")
                .with_detail("runner_cpu_millicores", self.config.cpu_millicores)
                .with_detail("runner_memory_mib", self.config.memory_mib));
        }
        if cpu > free.cpu || memory > free.memory {
            return Err(RpcError::unavailable("this runner is full")
                .with_reason("no_capacity")
                .with_detail("free_cpu_millicores", free.cpu)
                .with_detail("free_memory_mib", free.memory));
        }
        free.cpu -= cpu;
        free.memory -= memory;
        Ok(())
    }

    fn release(&self, cpu: u64, memory: u64) {
        let mut free = self.free.lock().expect("capacity lock");
        free.cpu += cpu;
        free.memory += memory;
    }

    /// The answer for a run that exists already.
    async fn existing(
        &self,
        request_hash: &[u8],
        run: crate::store::StoredRun,
    ) -> Result<pb::RunRecord, RpcError> {
        if run.request_hash != request_hash {
            return Err(
                RpcError::conflict("this execution id was run with a different request")
                    .with_reason("execution_id_reused"),
            );
        }
        if run.record.status() == pb::RunStatus::Finished {
            return Ok(run.record);
        }
        // Running here: wait for its end.
        let waiting = self
            .running
            .lock()
            .expect("running lock")
            .get(&run.record.execution_id)
            .cloned();
        if let Some(mut waiting) = waiting {
            let record = waiting
                .wait_for(Option::is_some)
                .await
                .map_err(|_| RpcError::unavailable("the run ended without a record"))?
                .clone();
            return record.ok_or_else(|| RpcError::internal("unreachable"));
        }
        // Running elsewhere, or lost.
        let lost = self
            .store
            .mark_lost(self.config.lost_after_ms, None)
            .await?;
        if let Some(record) = lost
            .into_iter()
            .find(|r| r.execution_id == run.record.execution_id)
        {
            self.outbox.notify_one();
            return Ok(record);
        }
        Err(
            RpcError::unavailable("the run is in progress on another runner")
                .with_reason("running_elsewhere")
                .with_detail("runner_id", &run.record.runner_id),
        )
    }

    /// `sandbox.run`.
    pub async fn run(&self, request: pb::RunRequest) -> Result<pb::RunRecord, RpcError> {
        let hash = request_hash(&request);
        if let Some(run) = self.store.get(&request.execution_id).await? {
            return self.existing(&hash, run).await;
        }
        let (agent, time_limit) = self.check(&request)?;
        let bundle = request.bundle.unwrap_or_default();
        self.reserve(bundle.cpu_millicores, bundle.memory_mib)?;
        let started = PendingEvent {
            subject: sandbox_events::RUN_STARTED.into(),
            envelope: events::envelope(
                services::SANDBOX,
                &pb::RunStarted {
                    execution_id: request.execution_id.clone(),
                    agent_id: agent.to_string(),
                    runner_id: self.runner_id.clone(),
                    bundle: Some(bundle),
                },
                &request.execution_id,
                &format!("run/{}", request.execution_id),
            ),
        };
        // One request per execution id at a time in this runner; the others wait for it.
        let (done, waiting) = watch::channel(None);
        let local = {
            let mut running = self.running.lock().expect("running lock");
            let local = running.get(&request.execution_id).cloned();
            if local.is_none() {
                running.insert(request.execution_id.clone(), waiting);
            }
            local
        };
        if let Some(mut local) = local {
            self.release(bundle.cpu_millicores, bundle.memory_mib);
            if let Ok(record) = local.wait_for(Option::is_some).await
                && let Some(record) = record.clone()
            {
                return Ok(record);
            }
            // The first request here ended without a record of its own (its claim found the
            // run on another runner, or its store failed): answer from the store.
            return match self.store.get(&request.execution_id).await? {
                Some(run) => self.existing(&hash, run).await,
                None => Err(
                    RpcError::unavailable("the run could not be claimed; ask again")
                        .with_reason("claim_failed"),
                ),
            };
        }
        let claim = self
            .store
            .claim(
                &request.execution_id,
                &agent.to_string(),
                &self.runner_id,
                &hash,
                &bundle,
                started,
            )
            .await;
        match claim {
            Ok(Claim::Claimed) => {}
            Ok(Claim::Exists(run)) => {
                self.forget(&request.execution_id);
                self.release(bundle.cpu_millicores, bundle.memory_mib);
                return self.existing(&hash, *run).await;
            }
            Err(error) => {
                self.forget(&request.execution_id);
                self.release(bundle.cpu_millicores, bundle.memory_mib);
                return Err(error);
            }
        }
        self.outbox.notify_one();
        let finish = self.execute(&request, agent, time_limit).await;
        self.release(bundle.cpu_millicores, bundle.memory_mib);
        let stored = self.store.finish(&request.execution_id, &finish).await;
        self.outbox.notify_one();
        let record = match stored {
            Ok(Some(record)) => Ok(record),
            // Declared lost meanwhile (this runner looked dead): that record stands.
            Ok(None) => self
                .store
                .get(&request.execution_id)
                .await?
                .map(|run| run.record)
                .ok_or_else(|| RpcError::internal("the run's record vanished")),
            Err(error) => Err(error),
        };
        let _ = done.send(record.as_ref().ok().cloned());
        self.forget(&request.execution_id);
        record
    }

    fn forget(&self, execution_id: &str) {
        self.running
            .lock()
            .expect("running lock")
            .remove(execution_id);
    }

    /// Prepares the workspace and runs the container; every failure is a finished run.
    async fn execute(
        &self,
        request: &pb::RunRequest,
        agent: AgentId,
        time_limit: Duration,
    ) -> Finish {
        let failed = |error: String| Finish {
            outcome: pb::RunOutcome::Failed,
            exit_code: -1,
            cpu_time_ms: 0,
            peak_memory_bytes: 0,
            wall_time_ms: 0,
            log_tail: String::new(),
            log_truncated: false,
            error,
        };
        let agent_id = agent.to_string();
        let dir = match workspace::prepare(&self.config.workspace_root, &agent_id) {
            Ok(dir) => dir,
            Err(error) => return failed(error.to_string()),
        };
        let env = self.env_json(request, &agent_id);
        if let Err(error) = workspace::replace_file(&dir, "env.json", env.as_bytes()) {
            return failed(error.to_string());
        }
        let image = if request.image.is_empty() {
            self.config.image.clone()
        } else {
            request.image.clone()
        };
        let bundle = request.bundle.unwrap_or_default();
        let mut spec = RunSpec::new(&request.execution_id, &agent_id, &image, dir);
        spec.cpu_millicores = bundle.cpu_millicores;
        spec.memory_mib = bundle.memory_mib;
        spec.time_limit = time_limit;
        spec.pids_limit = self.config.pids_limit;
        spec.tmp_mib = self.config.tmp_mib;
        spec.log_tail_bytes = self.config.log_tail_bytes;
        spec.nats_upstream = Some(self.nats_upstream.clone());
        spec.max_nats_connections = self.config.max_nats_connections;
        if request.debug {
            spec.debug = Some(SocketAddr::from((
                Ipv4Addr::LOCALHOST,
                self.config.debug_port,
            )));
        }
        spec.env = request
            .env
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        spec.env
            .push(("SYNTROPISM_ENV".into(), "/workspace/env.json".into()));
        if !request.traceparent.is_empty() {
            spec.env
                .push(("TRACEPARENT".into(), request.traceparent.clone()));
        }
        tracing::info!(execution = %request.execution_id, agent = %agent_id, ?time_limit, "run starts");
        match self.sandbox.run(&spec).await {
            Ok(report) => {
                let (outcome, exit_code) = match report.outcome {
                    Outcome::Completed => (pb::RunOutcome::Completed, 0),
                    Outcome::Failed { exit_code } => (pb::RunOutcome::Failed, exit_code),
                    Outcome::TimedOut => (pb::RunOutcome::TimedOut, -1),
                    Outcome::OomKilled => (pb::RunOutcome::OomKilled, 137),
                };
                tracing::info!(execution = %request.execution_id, ?outcome, "run ended");
                Finish {
                    outcome,
                    exit_code,
                    cpu_time_ms: report.cpu_time.as_millis() as u64,
                    peak_memory_bytes: report.peak_memory_bytes,
                    wall_time_ms: report.wall_time.as_millis() as u64,
                    log_tail: report.log_tail,
                    log_truncated: report.log_truncated,
                    error: String::new(),
                }
            }
            Err(error) => {
                tracing::warn!(execution = %request.execution_id, %error, "run could not start");
                failed(error.to_string())
            }
        }
    }

    /// `env.json`: the window's identity, deadline, NATS access (through the relay) and facts.
    fn env_json(&self, request: &pb::RunRequest, agent_id: &str) -> String {
        let deadline = request
            .deadline
            .as_ref()
            .and_then(unix_time)
            .unwrap_or_default();
        let bundle = request.bundle.unwrap_or_default();
        let inbox = if request.inbox_json.is_empty() {
            serde_json::json!({})
        } else {
            serde_json::from_str(&request.inbox_json).unwrap_or_default()
        };
        let mut env = serde_json::json!({
            "agent_id": agent_id,
            "execution_id": request.execution_id,
            "deadline": deadline.to_rfc3339(),
            "nats": {
                "url": "nats://127.0.0.1:4222",
                "credentials": request.credentials,
                "inbox_prefix": request.inbox_prefix,
            },
            "balance_micros": request.balance_micros,
            "bundle": {
                "cpu_millicores": bundle.cpu_millicores,
                "memory_mib": bundle.memory_mib,
                "duration_ms": bundle.duration_ms,
                "llm_tokens": bundle.llm_tokens,
                "attention_slots": bundle.attention_slots,
            },
            "inbox": inbox,
        });
        if !request.traceparent.is_empty() {
            env["traceparent"] = serde_json::json!(request.traceparent);
        }
        env.to_string()
    }

    /// `sandbox.get_run`.
    pub async fn get_run(&self, execution_id: &str) -> Result<pb::RunRecord, RpcError> {
        let run =
            self.store.get(execution_id).await?.ok_or_else(|| {
                RpcError::not_found(format!("no run of execution {execution_id:?}"))
            })?;
        if run.record.status() == pb::RunStatus::Running && run.record.runner_id != self.runner_id {
            let lost = self
                .store
                .mark_lost(self.config.lost_after_ms, None)
                .await?;
            if let Some(record) = lost.into_iter().find(|r| r.execution_id == execution_id) {
                self.outbox.notify_one();
                return Ok(record);
            }
        }
        Ok(run.record)
    }

    /// Beats every `heartbeat_ms` and marks lost the runs of runners that stopped beating.
    pub async fn heartbeat(self: Arc<Self>, stop: tokio_util::sync::CancellationToken) {
        let mut tick = tokio::time::interval(Duration::from_millis(self.config.heartbeat_ms));
        loop {
            tokio::select! {
                _ = stop.cancelled() => break,
                _ = tick.tick() => {}
            }
            if let Err(error) = self.store.heartbeat(&self.runner_id).await {
                tracing::warn!(%error, "heartbeat failed");
            }
            match self.store.mark_lost(self.config.lost_after_ms, None).await {
                Ok(lost) if !lost.is_empty() => {
                    tracing::warn!(runs = lost.len(), "runs of a dead runner marked lost");
                    self.outbox.notify_one();
                }
                Ok(_) => {}
                Err(error) => tracing::warn!(%error, "looking for lost runs failed"),
            }
        }
    }
}

/// Serves `sandbox.run` and `sandbox.get_run`.
pub async fn register(rpc: &mut RpcServer, runner: Arc<Runner>) -> anyhow::Result<()> {
    let r = runner.clone();
    rpc.serve::<Run, _, _>(move |_: RequestContext, request| {
        let runner = r.clone();
        async move {
            let run = runner.run(request).await?;
            Ok(pb::RunResponse { run: Some(run) })
        }
    })
    .await?;
    rpc.serve::<GetRun, _, _>(move |_: RequestContext, request: pb::GetRunRequest| {
        let runner = runner.clone();
        async move {
            let run = runner.get_run(&request.execution_id).await?;
            Ok(pb::GetRunResponse { run: Some(run) })
        }
    })
    .await?;
    Ok(())
}

/// The default place for run sockets.
pub fn default_run_dir(runner_id: &str) -> PathBuf {
    std::env::temp_dir().join(format!("syntropism-runner-{runner_id}"))
}
