//! Command-line configuration of the migrator (clap, every flag also an environment variable).

use std::net::SocketAddr;

use clap::{Args, Parser, Subcommand, ValueEnum};
use fleetsync_common::cli::{CommonArgs, SecurityArgs, ShutdownArgs};

/// The fleetsync migrator: applies the control-plane schema atomically and retryably, and never
/// connects to a managed server.
///
/// Exit status: 0 success; 1 failure (database unreachable, a migration failed, lock timeout);
/// 2 bad command line; 3 the database and this binary disagree (an applied migration was
/// edited, the database has versions this binary does not know, `verify` found problems).
#[derive(Debug, Parser)]
#[command(name = "migrator", version, propagate_version = true)]
pub struct Cli {
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// The migrator's subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Apply pending migrations, then hand their sync requests to the sync-agent (best effort:
    /// an unreachable agent is a warning, the requests stay pending, the exit status stays 0).
    Migrate(MigrateArgs),
    /// Show every migration's state, and the pending sync requests.
    Status(ReadArgs),
    /// Print the exact SQL that `migrate` would run, without running it.
    Plan(PlanArgs),
    /// Check applied migrations against this binary: edited, unknown, missing, partial, failed.
    Verify(ReadArgs),
    /// Serve the Migrator gRPC service (with health and reflection).
    Serve(ServeArgs),
    /// Print a shell completion script (bash, zsh, fish, elvish, powershell).
    Completions(fleetsync_common::cli::CompletionsArgs),
    /// Print the man page (with --dir: write one page per command).
    Man(fleetsync_common::cli::ManArgs),
}

/// Output format of the commands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Output {
    /// Lines for people.
    Human,
    /// One JSON document on stdout, for scripts.
    Json,
}

/// Arguments of commands that only read.
#[derive(Debug, Clone, Args)]
pub struct ReadArgs {
    #[command(flatten)]
    pub common: CommonArgs,

    /// Output format.
    #[arg(long, short, env = "FLEETSYNC_OUTPUT", value_enum, default_value_t = Output::Human)]
    pub output: Output,
}

/// `migrator plan`.
#[derive(Debug, Clone, Args)]
pub struct PlanArgs {
    #[command(flatten)]
    pub read: ReadArgs,

    /// Plan up to and including this version (default: the latest). Below the current version:
    /// the way down, each reverse with the data it would destroy; 0: before every migration.
    #[arg(long)]
    pub target: Option<i64>,
}

/// `migrator migrate`.
#[derive(Debug, Clone, Args)]
pub struct MigrateArgs {
    #[command(flatten)]
    pub read: ReadArgs,

    /// Apply up to and including this version (default: the latest). Below the current version,
    /// roll back the migrations above it, newest first, by their reverses; 0: before every
    /// migration. `plan --target` shows what that runs and destroys.
    #[arg(long)]
    pub target: Option<i64>,

    /// The sync-agent to hand sync requests to.
    #[arg(
        long,
        env = "FLEETSYNC_AGENT_URL",
        default_value = "http://127.0.0.1:50051"
    )]
    pub agent_url: String,

    /// Deadline for handing sync requests to the agent; past it the requests stay pending.
    #[arg(long, env = "FLEETSYNC_AGENT_TIMEOUT", default_value = "2s")]
    pub agent_timeout: humantime::Duration,

    /// File holding the agent's bearer token, if it requires one.
    #[arg(long, env = "FLEETSYNC_AGENT_TOKEN_FILE")]
    pub agent_token_file: Option<std::path::PathBuf>,

    /// PEM certificate of the authority that signed the agent's TLS certificate (for an
    /// `https://` agent URL with a private CA).
    #[arg(long, env = "FLEETSYNC_AGENT_CA")]
    pub agent_ca: Option<std::path::PathBuf>,

    /// Record sync requests but do not contact the agent (it picks them up itself).
    #[arg(long, env = "FLEETSYNC_NO_DISPATCH")]
    pub no_dispatch: bool,

    /// Longest wait for another migrator holding the migration lock.
    #[arg(long, env = "FLEETSYNC_LOCK_TIMEOUT", default_value = "60s")]
    pub lock_timeout: humantime::Duration,

    /// Apply a migration that stops sync-agents built before it even while such agents serve
    /// (`plan` lists them): they stop claiming and hand their work over until agents of this
    /// release take it. Without it, `migrate` refuses (exit status 4) and writes nothing.
    /// On the way down: also roll back below the schema range of serving agents (they stand
    /// down until the schema is back in their range).
    #[arg(long)]
    pub stop_agents: bool,

    /// Roll back even where a reverse destroys data (drops a table with rows, or a column
    /// with values): without it, `migrate` refuses (exit status 5), says what would be lost,
    /// and writes nothing.
    #[arg(long)]
    pub allow_data_loss: bool,

    /// After migrating, grant this database role exactly the rights the sync-agent needs (rows
    /// of its tables, never the schema): PostgreSQL role name, or MySQL `USER[@HOST]` (host
    /// `%` by default). Run it as the role that owns the schema.
    #[arg(long, env = "FLEETSYNC_AGENT_ROLE")]
    pub agent_role: Option<String>,

    /// Test hook (built with the `crash-points` feature only): SIGKILL this process at a crash
    /// point (`VERSION:STATEMENT`, `VERSION:STATEMENT:journal` or `VERSION:commit`).
    #[cfg(feature = "crash-points")]
    #[arg(long, env = "FLEETSYNC_CRASH_AT", hide = true)]
    pub crash_at: Option<String>,
}

/// `migrator serve`.
#[derive(Debug, Clone, Args)]
pub struct ServeArgs {
    /// Address to listen on for gRPC.
    #[arg(
        long,
        env = "FLEETSYNC_MIGRATOR_LISTEN",
        default_value = "127.0.0.1:50052"
    )]
    pub listen: SocketAddr,

    #[command(flatten)]
    pub common: CommonArgs,

    #[command(flatten)]
    pub shutdown: ShutdownArgs,

    #[command(flatten)]
    pub security: SecurityArgs,

    /// Longest wait for another migrator holding the migration lock.
    #[arg(long, env = "FLEETSYNC_LOCK_TIMEOUT", default_value = "60s")]
    pub lock_timeout: humantime::Duration,
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn cli_is_consistent() {
        Cli::command().debug_assert();
        let cli = Cli::try_parse_from(["migrator", "serve"]).unwrap();
        let Command::Serve(args) = cli.command else {
            panic!("serve")
        };
        assert_eq!(args.listen.to_string(), "127.0.0.1:50052");
        let cli =
            Cli::try_parse_from(["migrator", "migrate", "--target", "5", "-o", "json"]).unwrap();
        let Command::Migrate(args) = cli.command else {
            panic!("migrate")
        };
        assert_eq!(args.target, Some(5));
        assert_eq!(args.read.output, Output::Json);
        assert_eq!(
            std::time::Duration::from(args.agent_timeout),
            std::time::Duration::from_secs(2)
        );
    }
}
