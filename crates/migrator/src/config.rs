//! Command-line configuration of the migrator (clap, every flag also an environment variable).

use std::net::SocketAddr;

use clap::{Args, Parser, Subcommand};
use fleetsync_common::cli::CommonArgs;

/// The fleetsync migrator: applies the control-plane schema atomically and retryably, and never
/// connects to a managed server.
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
    /// Serve the Migrator gRPC service (with health and reflection).
    Serve(ServeArgs),
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
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn cli_is_consistent() {
        Cli::command().debug_assert();
        let cli = Cli::try_parse_from(["migrator", "serve"]).unwrap();
        let Command::Serve(args) = cli.command;
        assert_eq!(args.listen.to_string(), "127.0.0.1:50052");
    }
}
