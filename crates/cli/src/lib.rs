//! The operator CLI's commands: each asks the admin subjects and renders the answer as a
//! table for people or JSON for scripts.

use std::io::Write;
use std::path::Path;
use std::time::Duration;

use anyhow::Context as _;
use futures::StreamExt;
use prost::Message as _;
use serde_json::{Value, json};
use syntropism_contracts::attention::admin as attention;
use syntropism_contracts::economy::admin as economy;
use syntropism_contracts::market::admin as market;
use syntropism_contracts::orchestrator::admin as orchestrator;
use syntropism_contracts::social::admin as social;
use syntropism_contracts::{Credits, RpcClient, events, pb};

/// How results are printed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Output {
    Table,
    Json,
}

/// One CLI command.
#[derive(Debug, Clone)]
pub enum Command {
    Status,
    Agents {
        status: Option<String>,
    },
    Agent {
        agent_id: String,
        executions: u32,
    },
    Market,
    Prompts,
    Reward {
        prompt_id: String,
        scores: [u32; 3],
        reason: String,
    },
    Dismiss {
        prompt_id: String,
        reason: String,
    },
    Messages {
        limit: u32,
    },
    Events {
        follow: bool,
        last: u64,
    },
    Audit,
    /// One line per tick until interrupted (the demo's progress).
    Watch,
}

/// A connection with the operator's credentials.
#[derive(Debug, Clone)]
pub struct Cli {
    client: RpcClient,
}

fn credits(micros: i64) -> String {
    Credits::from_micros(micros).to_string()
}

fn time(t: &Option<prost_types::Timestamp>) -> String {
    t.as_ref()
        .and_then(|t| chrono::DateTime::from_timestamp(t.seconds, t.nanos.max(0) as u32))
        .map(|t| t.format("%Y-%m-%d %H:%M:%S").to_string())
        .unwrap_or_else(|| "-".into())
}

fn status_name(status: pb::AgentStatus) -> &'static str {
    match status {
        pb::AgentStatus::Alive => "alive",
        pb::AgentStatus::Dormant => "dormant",
        pb::AgentStatus::Dead => "dead",
        pb::AgentStatus::Unspecified => "-",
    }
}

fn outcome_name(outcome: pb::RunOutcome) -> &'static str {
    match outcome {
        pb::RunOutcome::Completed => "completed",
        pb::RunOutcome::Failed => "failed",
        pb::RunOutcome::TimedOut => "timed out",
        pb::RunOutcome::OomKilled => "oom-killed",
        pb::RunOutcome::Lost => "lost",
        pb::RunOutcome::Unspecified => "-",
    }
}

/// A plain text table: a header row and aligned columns.
pub fn table(header: &[&str], rows: &[Vec<String>]) -> String {
    let mut widths: Vec<usize> = header.iter().map(|h| h.chars().count()).collect();
    for row in rows {
        for (i, cell) in row.iter().enumerate() {
            if let Some(w) = widths.get_mut(i) {
                *w = (*w).max(cell.chars().count());
            }
        }
    }
    let line = |cells: Vec<&str>| {
        let mut out = String::new();
        for (i, cell) in cells.iter().enumerate() {
            if i > 0 {
                out.push_str("  ");
            }
            out.push_str(cell);
            if i + 1 < cells.len() {
                out.push_str(&" ".repeat(widths[i].saturating_sub(cell.chars().count())));
            }
        }
        out.trim_end().to_owned() + "\n"
    };
    let mut out = line(header.to_vec());
    for row in rows {
        out.push_str(&line(row.iter().map(String::as_str).collect()));
    }
    out
}

fn agent_json(a: &pb::Agent) -> Value {
    json!({
        "agent_id": a.agent_id,
        "status": status_name(a.status()),
        "lineage": a.lineage,
        "execution_count": a.execution_count,
        "earned_micros": a.earned_micros,
        "spent_micros": a.spent_micros,
        "created_at": time(&a.created_at),
        "last_window_at": time(&a.last_window_at),
        "died_at": time(&a.died_at),
        "death_cause": a.death_cause,
    })
}

fn prompt_json(p: &pb::Prompt) -> Value {
    let scores = p.scores.unwrap_or_default();
    json!({
        "prompt_id": p.prompt_id,
        "agent_id": p.agent_id,
        "execution_id": p.execution_id,
        "content": p.content,
        "paid_micros": p.paid_micros,
        "status": format!("{:?}", p.status()).to_lowercase(),
        "created_at": time(&p.created_at),
        "expires_at": time(&p.expires_at),
        "scores": [scores.interesting, scores.useful, scores.understandable],
        "reward_micros": p.reward_micros,
        "reason": p.reason,
    })
}

fn prices(p: &Option<pb::UnitPrices>) -> Value {
    let p = p.unwrap_or_default();
    json!({
        "cpu_nanos_per_millicore_second": p.cpu_nanos_per_millicore_second,
        "memory_nanos_per_mib_second": p.memory_nanos_per_mib_second,
        "llm_token_nanos": p.llm_token_nanos,
        "attention_slot_nanos": p.attention_slot_nanos,
    })
}

/// A one-line account of an event's payload, for the types people watch.
pub fn describe(envelope: &pb::EventEnvelope) -> String {
    let name = envelope.r#type.rsplit('.').next().unwrap_or_default();
    let text = match name {
        "TickCompleted" => events::open::<pb::TickCompleted>(envelope).ok().map(|t| {
            format!(
                "tick {} in {} ms: {} allocations; {} alive, {} dormant, {} dead{}",
                t.tick,
                t.duration_ms,
                t.allocations,
                t.alive,
                t.dormant,
                t.dead,
                if t.overran { " (overran)" } else { "" }
            )
        }),
        "AgentBorn" => events::open::<pb::AgentBorn>(envelope).ok().map(|b| {
            let a = b.agent.unwrap_or_default();
            format!(
                "{} born ({}), lineage [{}]",
                a.agent_id,
                b.cause,
                a.lineage.join(", ")
            )
        }),
        "AgentStatusChanged" => events::open::<pb::AgentStatusChanged>(envelope)
            .ok()
            .map(|c| {
                format!(
                    "{} {} → {} ({})",
                    c.agent_id,
                    status_name(c.from()),
                    status_name(c.to()),
                    c.cause
                )
            }),
        "ExecutionChanged" => events::open::<pb::ExecutionChanged>(envelope)
            .ok()
            .map(|c| {
                let e = c.execution.unwrap_or_default();
                match e.run {
                    Some(run) => format!(
                        "{} of {} ended: {}",
                        e.execution_id,
                        e.agent_id,
                        outcome_name(run.outcome())
                    ),
                    None => format!(
                        "{} of {} started (round {}, paid {})",
                        e.execution_id,
                        e.agent_id,
                        e.round,
                        credits(e.paid_micros)
                    ),
                }
            }),
        "PromptChanged" => events::open::<pb::PromptChanged>(envelope).ok().map(|c| {
            let p = c.prompt.unwrap_or_default();
            format!(
                "prompt {} of {}: {:?} {}",
                p.prompt_id,
                p.agent_id,
                p.status(),
                if p.reward_micros > 0 {
                    credits(p.reward_micros)
                } else {
                    String::new()
                }
            )
        }),
        "MessageSent" => events::open::<pb::MessageSent>(envelope).ok().map(|m| {
            let m = m.message.unwrap_or_default();
            format!("{} → {}: {} bytes", m.from_agent_id, m.to, m.body.len())
        }),
        "RoundCleared" => events::open::<pb::RoundCleared>(envelope).ok().map(|r| {
            format!(
                "round {}: {} due, {} won, paid {}",
                r.round,
                r.bids_due,
                r.winners,
                credits(r.paid_micros)
            )
        }),
        "TransfersPosted" => events::open::<pb::TransfersPosted>(envelope)
            .ok()
            .map(|t| format!("{} transfers", t.transfers.len())),
        _ => None,
    };
    text.unwrap_or_else(|| format!("{} ({} bytes)", envelope.r#type, envelope.payload.len()))
}

impl Cli {
    pub async fn connect(url: &str, creds: &Path, timeout: Duration) -> anyhow::Result<Cli> {
        let nats = async_nats::ConnectOptions::new()
            .name("syntropism cli")
            .credentials_file(creds)
            .await
            .with_context(|| {
                format!(
                    "cannot read the operator credentials {} (`just nats-config` writes them; \
                     or pass --creds)",
                    creds.display()
                )
            })?
            .connection_timeout(timeout)
            .connect(url)
            .await
            .with_context(|| format!("cannot connect to NATS at {url} (is the system running?)"))?;
        Ok(Cli::new(RpcClient::new(nats).with_timeout(timeout)))
    }

    pub fn new(client: RpcClient) -> Cli {
        Cli { client }
    }

    /// Runs `command`, printing to `out`.
    pub async fn run(
        &self,
        command: Command,
        output: Output,
        out: &mut impl Write,
    ) -> anyhow::Result<()> {
        if let Command::Events { follow, last } = command {
            return self.events(follow, last, output, out).await;
        }
        if let Command::Watch = command {
            return self.watch(output, out).await;
        }
        let (value, text) = self.render(command).await?;
        match output {
            Output::Json => writeln!(out, "{}", serde_json::to_string_pretty(&value)?)?,
            Output::Table => write!(out, "{text}")?,
        }
        Ok(())
    }

    /// The JSON and the table of a command's answer.
    pub async fn render(&self, command: Command) -> anyhow::Result<(Value, String)> {
        let c = &self.client;
        Ok(match command {
            Command::Status => {
                let s = c
                    .call::<orchestrator::Status>(&pb::StatusRequest {})
                    .await?;
                let supply = s.supply.unwrap_or_default();
                let value = json!({
                    "tick": s.tick,
                    "tick_duration_ms": s.tick_duration_ms,
                    "leader": s.leader,
                    "alive": s.alive,
                    "dormant": s.dormant,
                    "dead": s.dead,
                    "running_executions": s.running_executions,
                    "executions_total": s.executions_total,
                    "minted_micros": s.minted_micros,
                    "burned_micros": s.burned_micros,
                    "agents_micros": s.agents_micros,
                    "audit_ok": s.audit_ok,
                    "audit_violations": s.audit_violations,
                    "supply": {
                        "cpu_millicores": supply.cpu_millicores,
                        "memory_mib": supply.memory_mib,
                        "llm_tokens": supply.llm_tokens,
                        "attention_slots": supply.attention_slots,
                    },
                    "reserve": prices(&s.reserve),
                    "discovered": prices(&s.discovered),
                });
                let d = s.discovered.unwrap_or_default();
                let rows = vec![
                    vec![
                        "tick".into(),
                        format!(
                            "{} ({} ms, leader {})",
                            s.tick, s.tick_duration_ms, s.leader
                        ),
                    ],
                    vec![
                        "agents".into(),
                        format!("{} alive, {} dormant, {} dead", s.alive, s.dormant, s.dead),
                    ],
                    vec![
                        "executions".into(),
                        format!(
                            "{} running, {} in all",
                            s.running_executions, s.executions_total
                        ),
                    ],
                    vec!["minted".into(), credits(s.minted_micros)],
                    vec!["burned".into(), credits(s.burned_micros)],
                    vec!["held by agents".into(), credits(s.agents_micros)],
                    vec![
                        "supply".into(),
                        format!(
                            "{} mcpu, {} MiB, {} tokens, {} attention",
                            supply.cpu_millicores,
                            supply.memory_mib,
                            supply.llm_tokens,
                            supply.attention_slots
                        ),
                    ],
                    vec![
                        "prices (nc)".into(),
                        format!(
                            "cpu {}/mcpu·s, memory {}/MiB·s, token {}, attention {}",
                            d.cpu_nanos_per_millicore_second,
                            d.memory_nanos_per_mib_second,
                            d.llm_token_nanos,
                            d.attention_slot_nanos
                        ),
                    ],
                    vec![
                        "audit".into(),
                        if s.audit_ok {
                            "ok".into()
                        } else {
                            format!("VIOLATED: {}", s.audit_violations.join("; "))
                        },
                    ],
                ];
                (value, table(&["", ""], &rows))
            }
            Command::Agents { status } => {
                let status = match status.as_deref() {
                    None => pb::AgentStatus::Unspecified,
                    Some("alive") => pb::AgentStatus::Alive,
                    Some("dormant") => pb::AgentStatus::Dormant,
                    Some("dead") => pb::AgentStatus::Dead,
                    Some(other) => anyhow::bail!("unknown status {other:?} (alive, dormant, dead)"),
                };
                let r = c
                    .call::<orchestrator::ListAgents>(&pb::ListAgentsRequest {
                        status: status as i32,
                    })
                    .await?;
                let rows: Vec<Vec<String>> = r
                    .agents
                    .iter()
                    .map(|a| {
                        vec![
                            a.agent_id.clone(),
                            status_name(a.status()).into(),
                            a.lineage.len().to_string(),
                            a.execution_count.to_string(),
                            credits(a.earned_micros),
                            credits(a.spent_micros),
                            time(&a.last_window_at),
                        ]
                    })
                    .collect();
                (
                    Value::Array(r.agents.iter().map(agent_json).collect()),
                    table(
                        &[
                            "agent",
                            "status",
                            "generation",
                            "windows",
                            "earned",
                            "spent",
                            "last window",
                        ],
                        &rows,
                    ),
                )
            }
            Command::Agent {
                agent_id,
                executions,
            } => {
                let r = c
                    .call::<orchestrator::AgentDetail>(&pb::AgentDetailRequest {
                        agent_id,
                        executions,
                    })
                    .await?;
                let a = r.agent.unwrap_or_default();
                let mut value = agent_json(&a);
                value["balance_micros"] = json!(r.balance_micros);
                value["available_micros"] = json!(r.available_micros);
                let mut text = table(
                    &["", ""],
                    &[
                        vec!["agent".into(), a.agent_id.clone()],
                        vec!["status".into(), status_name(a.status()).into()],
                        vec![
                            "lineage".into(),
                            if a.lineage.is_empty() {
                                "(genesis)".into()
                            } else {
                                a.lineage.join(" ← ")
                            },
                        ],
                        vec![
                            "balance".into(),
                            format!(
                                "{} ({} available)",
                                credits(r.balance_micros),
                                credits(r.available_micros)
                            ),
                        ],
                        vec![
                            "earned / spent".into(),
                            format!("{} / {}", credits(a.earned_micros), credits(a.spent_micros)),
                        ],
                        vec!["windows".into(), a.execution_count.to_string()],
                        vec!["born".into(), time(&a.created_at)],
                        vec![
                            "died".into(),
                            if a.died_at.is_some() {
                                format!("{} ({})", time(&a.died_at), a.death_cause)
                            } else {
                                "-".into()
                            },
                        ],
                    ],
                );
                let mut runs = Vec::new();
                for e in &r.executions {
                    let run = e.run.clone().unwrap_or_default();
                    runs.push(json!({
                        "execution_id": e.execution_id,
                        "round": e.round,
                        "paid_micros": e.paid_micros,
                        "status": format!("{:?}", e.status()).to_lowercase(),
                        "outcome": outcome_name(run.outcome()),
                        "exit_code": run.exit_code,
                        "cpu_time_ms": run.cpu_time_ms,
                        "peak_memory_bytes": run.peak_memory_bytes,
                        "wall_time_ms": run.wall_time_ms,
                        "log_tail": run.log_tail,
                        "error": run.error,
                        "started_at": time(&e.started_at),
                    }));
                    text.push_str(&format!(
                        "\nexecution {} (round {}, paid {}, started {}): {}{}, cpu {} ms, peak {} KiB, wall {} ms\n",
                        e.execution_id,
                        e.round,
                        credits(e.paid_micros),
                        time(&e.started_at),
                        if e.run.is_some() { outcome_name(run.outcome()) } else { "running" },
                        if run.outcome() == pb::RunOutcome::Failed { format!(" (exit {})", run.exit_code) } else { String::new() },
                        run.cpu_time_ms,
                        run.peak_memory_bytes / 1024,
                        run.wall_time_ms,
                    ));
                    if !run.error.is_empty() {
                        text.push_str(&format!("  error: {}\n", run.error));
                    }
                    let tail: Vec<&str> = run.log_tail.lines().collect();
                    for line in &tail[tail.len().saturating_sub(10)..] {
                        text.push_str(&format!("  | {line}\n"));
                    }
                }
                value["executions"] = Value::Array(runs);
                (value, text)
            }
            Command::Market => {
                let m = c
                    .call::<market::State>(&pb::MarketStateRequest { rounds: 10 })
                    .await?;
                let cat = m.catalogue.unwrap_or_default();
                let u = m.utilisation.unwrap_or_default();
                let value = json!({
                    "supply": cat.supply.map(|s| json!({"cpu_millicores": s.cpu_millicores, "memory_mib": s.memory_mib, "llm_tokens": s.llm_tokens, "attention_slots": s.attention_slots})),
                    "max_window_ms": cat.max_window_ms,
                    "price_rule": cat.price_rule,
                    "reserve": prices(&cat.reserve),
                    "discovered": prices(&m.discovered),
                    "utilisation_ppm": [u.cpu_ppm, u.memory_ppm, u.llm_tokens_ppm, u.attention_slots_ppm],
                    "rounds": m.recent_rounds.iter().map(|r| json!({"round": r.round, "bids_due": r.bids_due, "winners": r.winners, "paid_micros": r.paid_micros, "cleared_at": time(&r.cleared_at)})).collect::<Vec<_>>(),
                });
                let (r, d) = (
                    cat.reserve.unwrap_or_default(),
                    m.discovered.unwrap_or_default(),
                );
                let s = cat.supply.unwrap_or_default();
                let pct = |ppm: u32| format!("{:.1}%", f64::from(ppm) / 10_000.0);
                let mut text = table(
                    &[
                        "resource",
                        "supply",
                        "reserve (nc)",
                        "discovered (nc)",
                        "utilisation",
                    ],
                    &[
                        vec![
                            "cpu (mcpu·s)".into(),
                            s.cpu_millicores.to_string(),
                            r.cpu_nanos_per_millicore_second.to_string(),
                            d.cpu_nanos_per_millicore_second.to_string(),
                            pct(u.cpu_ppm),
                        ],
                        vec![
                            "memory (MiB·s)".into(),
                            s.memory_mib.to_string(),
                            r.memory_nanos_per_mib_second.to_string(),
                            d.memory_nanos_per_mib_second.to_string(),
                            pct(u.memory_ppm),
                        ],
                        vec![
                            "llm tokens".into(),
                            s.llm_tokens.to_string(),
                            r.llm_token_nanos.to_string(),
                            d.llm_token_nanos.to_string(),
                            pct(u.llm_tokens_ppm),
                        ],
                        vec![
                            "attention slots".into(),
                            s.attention_slots.to_string(),
                            r.attention_slot_nanos.to_string(),
                            d.attention_slot_nanos.to_string(),
                            pct(u.attention_slots_ppm),
                        ],
                    ],
                );
                text.push('\n');
                let rows: Vec<Vec<String>> = m
                    .recent_rounds
                    .iter()
                    .map(|r| {
                        vec![
                            r.round.to_string(),
                            time(&r.cleared_at),
                            r.bids_due.to_string(),
                            r.winners.to_string(),
                            credits(r.paid_micros),
                        ]
                    })
                    .collect();
                text.push_str(&table(&["round", "cleared", "due", "won", "paid"], &rows));
                (value, text)
            }
            Command::Prompts => {
                let r = c
                    .call::<attention::PendingPrompts>(&pb::PendingPromptsRequest { limit: 100 })
                    .await?;
                let mut text = String::new();
                if r.prompts.is_empty() {
                    text.push_str("no prompts are waiting\n");
                }
                for p in &r.prompts {
                    text.push_str(&format!(
                        "prompt {}  from {}  paid {}  expires {}\n",
                        p.prompt_id,
                        p.agent_id,
                        credits(p.paid_micros),
                        time(&p.expires_at)
                    ));
                    for line in p.content.lines() {
                        text.push_str(&format!("  > {line}\n"));
                    }
                    text.push('\n');
                }
                (
                    Value::Array(r.prompts.iter().map(prompt_json).collect()),
                    text,
                )
            }
            Command::Reward {
                prompt_id,
                scores,
                reason,
            } => {
                let r = c
                    .call::<attention::Reward>(&pb::RewardRequest {
                        prompt_id,
                        scores: Some(pb::Scores {
                            interesting: scores[0],
                            useful: scores[1],
                            understandable: scores[2],
                        }),
                        reason,
                    })
                    .await?;
                let p = r.prompt.unwrap_or_default();
                let text = format!(
                    "rewarded prompt {} of {}: {} minted\n",
                    p.prompt_id,
                    p.agent_id,
                    credits(p.reward_micros)
                );
                (prompt_json(&p), text)
            }
            Command::Dismiss { prompt_id, reason } => {
                let r = c
                    .call::<attention::Dismiss>(&pb::DismissRequest { prompt_id, reason })
                    .await?;
                let p = r.prompt.unwrap_or_default();
                let text = format!("dismissed prompt {} of {}\n", p.prompt_id, p.agent_id);
                (prompt_json(&p), text)
            }
            Command::Messages { limit } => {
                let r = c
                    .call::<social::HumanMessages>(&pb::HumanMessagesRequest {
                        before_id: 0,
                        limit,
                    })
                    .await?;
                let mut text = String::new();
                if r.messages.is_empty() {
                    text.push_str("no messages to the human\n");
                }
                for m in &r.messages {
                    text.push_str(&format!("{}  from {}\n", time(&m.sent_at), m.from_agent_id));
                    for line in m.body.lines() {
                        text.push_str(&format!("  > {line}\n"));
                    }
                }
                let value = Value::Array(
                    r.messages
                        .iter()
                        .map(|m| json!({"id": m.id, "from": m.from_agent_id, "body": m.body, "sent_at": time(&m.sent_at), "execution_id": m.execution_id}))
                        .collect(),
                );
                (value, text)
            }
            Command::Audit => {
                let a = c.call::<economy::Audit>(&pb::AuditRequest {}).await?;
                let value = json!({
                    "ok": a.ok,
                    "violations": a.violations,
                    "sum_micros": a.sum_micros,
                    "minted_micros": a.minted_micros,
                    "burned_micros": a.burned_micros,
                    "agents_micros": a.agents_micros,
                    "pending_micros": a.pending_micros,
                    "transfer_count": a.transfer_count,
                    "open_accounts": a.open_accounts,
                    "closed_accounts": a.closed_accounts,
                    "pending_holds": a.pending_holds,
                });
                let text = table(
                    &["", ""],
                    &[
                        vec![
                            "invariants".into(),
                            if a.ok {
                                "hold".into()
                            } else {
                                format!("VIOLATED: {}", a.violations.join("; "))
                            },
                        ],
                        vec!["sum of all accounts".into(), credits(a.sum_micros)],
                        vec!["minted".into(), credits(a.minted_micros)],
                        vec!["burned".into(), credits(a.burned_micros)],
                        vec!["held by agents".into(), credits(a.agents_micros)],
                        vec![
                            "in escrow".into(),
                            format!("{} ({} holds)", credits(a.pending_micros), a.pending_holds),
                        ],
                        vec!["transfers".into(), a.transfer_count.to_string()],
                        vec![
                            "accounts".into(),
                            format!("{} open, {} closed", a.open_accounts, a.closed_accounts),
                        ],
                    ],
                );
                (value, text)
            }
            Command::Events { .. } | Command::Watch => unreachable!("handled by run"),
        })
    }

    /// A progress line after every tick: the tick, the population, executions, prices and the
    /// treasury.
    async fn watch(&self, output: Output, out: &mut impl Write) -> anyhow::Result<()> {
        let mut ticks = self
            .client
            .nats()
            .subscribe(syntropism_contracts::subjects::orchestrator_events::TICK_COMPLETED)
            .await?;
        while let Some(message) = ticks.next().await {
            let Ok(envelope) = pb::EventEnvelope::decode(message.payload.as_ref()) else {
                continue;
            };
            let Ok(tick) = events::open::<pb::TickCompleted>(&envelope) else {
                continue;
            };
            let status = match self
                .client
                .call::<orchestrator::Status>(&pb::StatusRequest {})
                .await
            {
                Ok(status) => status,
                Err(error) => {
                    writeln!(out, "tick {}: status unavailable: {error}", tick.tick)?;
                    continue;
                }
            };
            let d = status.discovered.unwrap_or_default();
            match output {
                Output::Json => writeln!(
                    out,
                    "{}",
                    json!({
                        "tick": tick.tick,
                        "duration_ms": tick.duration_ms,
                        "overran": tick.overran,
                        "allocations": tick.allocations,
                        "alive": tick.alive,
                        "dormant": tick.dormant,
                        "dead": tick.dead,
                        "running_executions": status.running_executions,
                        "executions_total": status.executions_total,
                        "discovered": prices(&status.discovered),
                        "minted_micros": status.minted_micros,
                        "burned_micros": status.burned_micros,
                        "agents_micros": status.agents_micros,
                        "audit_ok": status.audit_ok,
                    })
                )?,
                Output::Table => writeln!(
                    out,
                    "tick {:>5} {:>5} ms{} | alive {} dormant {} dead {} | executions {} now, {} in all | \
                     cpu {} nc/mcpu·s, attention {} | minted {}, burned {}, agents hold {} | audit {}",
                    tick.tick,
                    tick.duration_ms,
                    if tick.overran { " (overran)" } else { "" },
                    tick.alive,
                    tick.dormant,
                    tick.dead,
                    status.running_executions,
                    status.executions_total,
                    d.cpu_nanos_per_millicore_second,
                    credits(d.attention_slot_nanos / 1000),
                    credits(status.minted_micros),
                    credits(status.burned_micros),
                    credits(status.agents_micros),
                    if status.audit_ok { "ok" } else { "VIOLATED" },
                )?,
            }
            out.flush()?;
        }
        Ok(())
    }

    /// The last `last` events of the stream, then (with `follow`) every new one.
    async fn events(
        &self,
        follow: bool,
        last: u64,
        output: Output,
        out: &mut impl Write,
    ) -> anyhow::Result<()> {
        use async_nats::jetstream::consumer::{DeliverPolicy, pull};
        let js = async_nats::jetstream::new(self.client.nats().clone());
        let mut stream = js
            .get_stream(syntropism_contracts::subjects::EVENTS_STREAM)
            .await
            .context("the events stream (is the system running?)")?;
        let state = stream.info().await?.state.clone();
        let start = state
            .last_sequence
            .saturating_sub(last.saturating_sub(1))
            .max(state.first_sequence)
            .max(1);
        let consumer = stream
            .create_consumer(pull::OrderedConfig {
                deliver_policy: DeliverPolicy::ByStartSequence {
                    start_sequence: start,
                },
                ..Default::default()
            })
            .await?;
        let mut messages = consumer.messages().await?;
        let mut seen = 0u64;
        let backlog = if state.messages == 0 {
            0
        } else {
            state.last_sequence.saturating_sub(start) + 1
        };
        loop {
            if !follow && seen >= backlog {
                return Ok(());
            }
            let next = if follow {
                messages.next().await
            } else {
                match tokio::time::timeout(Duration::from_secs(5), messages.next()).await {
                    Ok(next) => next,
                    Err(_) => return Ok(()),
                }
            };
            let Some(message) = next else {
                return Ok(());
            };
            let message = message?;
            seen += 1;
            let envelope = pb::EventEnvelope::decode(message.payload.as_ref())?;
            match output {
                Output::Json => writeln!(
                    out,
                    "{}",
                    json!({
                        "subject": message.subject.to_string(),
                        "event_id": envelope.event_id,
                        "time": time(&envelope.time),
                        "type": envelope.r#type,
                        "source": envelope.source,
                        "correlation_id": envelope.correlation_id,
                        "summary": describe(&envelope),
                    })
                )?,
                Output::Table => writeln!(
                    out,
                    "{}  {:<42} {}",
                    time(&envelope.time),
                    message.subject,
                    describe(&envelope)
                )?,
            }
            out.flush()?;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tables_align_their_columns() {
        let text = table(
            &["agent", "status"],
            &[
                vec!["a".into(), "alive".into()],
                vec!["bbbbbb".into(), "dead".into()],
            ],
        );
        assert_eq!(text, "agent   status\na       alive\nbbbbbb  dead\n");
    }

    #[test]
    fn events_are_described_in_a_line() {
        let envelope = events::envelope(
            "orchestrator",
            &pb::TickCompleted {
                tick: 7,
                duration_ms: 12,
                allocations: 2,
                alive: 3,
                dormant: 1,
                dead: 0,
                overran: false,
                leader: "a".into(),
            },
            "c",
            "c",
        );
        assert_eq!(
            describe(&envelope),
            "tick 7 in 12 ms: 2 allocations; 3 alive, 1 dormant, 0 dead"
        );
    }
}
