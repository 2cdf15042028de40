//! `syntropism`: the operator's view of a running economy, over the admin subjects with the
//! operator's NATS credentials.

use std::path::PathBuf;
use std::time::Duration;

use clap::{Parser, Subcommand};
use syntropism_cli::{Cli, Command, Output};

/// Watch and steer a running Syntropism economy.
#[derive(Debug, Parser)]
#[command(name = "syntropism", version)]
struct Args {
    /// The NATS server.
    #[arg(
        long,
        env = "SYNTROPISM_NATS_URL",
        default_value = "nats://127.0.0.1:4222"
    )]
    nats_url: String,
    /// The operator's NATS credentials (written by `just nats-config`).
    #[arg(
        long,
        env = "SYNTROPISM_CREDS",
        default_value = ".run/nats-identity/cli.creds"
    )]
    creds: PathBuf,
    /// Machine-readable JSON instead of tables.
    #[arg(long, global = true)]
    json: bool,
    /// How long to wait for each answer, in seconds.
    #[arg(long, default_value_t = 10)]
    timeout: u64,
    #[command(subcommand)]
    command: Commands,
}

#[derive(Debug, Subcommand)]
enum Commands {
    /// The tick, agents alive/dormant/dead, money supply, prices and the ledger audit.
    Status,
    /// Every agent (or those of one status: alive, dormant, dead).
    Agents {
        #[arg(long)]
        status: Option<String>,
    },
    /// One agent: record, lineage, balance, latest executions with outcome and log tail.
    Agent {
        agent_id: String,
        /// How many executions.
        #[arg(long, default_value_t = 5)]
        executions: u32,
    },
    /// Supply, reserve and discovered prices, utilisation and recent rounds.
    Market,
    /// Prompts waiting for the human, most paid for first.
    Prompts,
    /// Rewards a prompt: scores 0–10; the reward is minted to its agent.
    Reward {
        prompt_id: String,
        interesting: u32,
        useful: u32,
        understandable: u32,
        #[arg(long, default_value = "")]
        reason: String,
    },
    /// Sets a prompt aside without a reward.
    Dismiss {
        prompt_id: String,
        #[arg(long, default_value = "")]
        reason: String,
    },
    /// Messages agents sent to the human, newest first.
    Messages {
        #[arg(long, default_value_t = 20)]
        limit: u32,
    },
    /// The event stream: the latest events, or every new one as it happens.
    Events {
        /// Keep printing new events until Ctrl-C.
        #[arg(long)]
        follow: bool,
        /// How many past events to show first.
        #[arg(long, default_value_t = 20)]
        last: u64,
    },
    /// The ledger's invariants: the sum of all accounts is zero, no available balance negative.
    Audit,
    /// A progress line after every tick (tick, agents, executions, prices, treasury) until Ctrl-C.
    Watch,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let cli = Cli::connect(
        &args.nats_url,
        &args.creds,
        Duration::from_secs(args.timeout),
    )
    .await?;
    let output = if args.json {
        Output::Json
    } else {
        Output::Table
    };
    let command = match args.command {
        Commands::Status => Command::Status,
        Commands::Agents { status } => Command::Agents { status },
        Commands::Agent {
            agent_id,
            executions,
        } => Command::Agent {
            agent_id,
            executions,
        },
        Commands::Market => Command::Market,
        Commands::Prompts => Command::Prompts,
        Commands::Reward {
            prompt_id,
            interesting,
            useful,
            understandable,
            reason,
        } => Command::Reward {
            prompt_id,
            scores: [interesting, useful, understandable],
            reason,
        },
        Commands::Dismiss { prompt_id, reason } => Command::Dismiss { prompt_id, reason },
        Commands::Messages { limit } => Command::Messages { limit },
        Commands::Events { follow, last } => Command::Events { follow, last },
        Commands::Audit => Command::Audit,
        Commands::Watch => Command::Watch,
    };
    let mut stdout = std::io::stdout();
    match cli.run(command, output, &mut stdout).await {
        Ok(()) => Ok(()),
        Err(error) => {
            eprintln!("syntropism: {error:#}");
            std::process::exit(1);
        }
    }
}
