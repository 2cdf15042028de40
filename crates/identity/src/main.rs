//! `nats-identity`: the development keys and the nats-server authorisation they imply.

use std::path::PathBuf;

use clap::{Parser, Subcommand};
use syntropism_identity::Authority;

/// Generates and uses Syntropism's NATS identities (operator mode).
#[derive(Debug, Parser)]
#[command(version)]
struct Args {
    /// Where the keys live (seeds, owner-readable only).
    #[arg(long, default_value = ".run/nats-identity")]
    dir: PathBuf,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Creates the keys if missing and writes `auth.conf` (for nats-server's `include`) and a
    /// credentials file per service into the key directory.
    Init {
        /// Services to write credentials for.
        #[arg(
            long,
            value_delimiter = ',',
            default_value = "economy,market,scheduler,sandbox,orchestrator,attention,social,cli"
        )]
        services: Vec<String>,
    },
    /// Prints the nats-server authorisation settings.
    ServerConfig,
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let authority = Authority::load_or_generate(&args.dir)?;
    match args.command {
        Command::Init { services } => {
            std::fs::write(args.dir.join("auth.conf"), authority.server_config()?)?;
            for service in services {
                let path = args.dir.join(format!("{service}.creds"));
                std::fs::write(&path, authority.service(&service)?.to_creds_file())?;
                #[cfg(unix)]
                {
                    use std::os::unix::fs::PermissionsExt;
                    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600))?;
                }
            }
            println!("{}", args.dir.display());
        }
        Command::ServerConfig => print!("{}", authority.server_config()?),
    }
    Ok(())
}
