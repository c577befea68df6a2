//! `sync-agent`: parses the command line, sets up logging and signals, and hands over to the
//! library.

use std::process::ExitCode;

use anyhow::Context;
use clap::Parser;
use fleetsync_common::{shutdown, telemetry};
use fleetsync_sync_agent::{
    client,
    config::{Cli, Command},
};

#[tokio::main]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(cli).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("error: {err:#}");
            ExitCode::FAILURE
        }
    }
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Serve(args) => {
            telemetry::init(args.common.log_format.into());
            let config = fleetsync_sync_agent::config_from_args(&args)?;
            let listener = tokio::net::TcpListener::bind(args.listen)
                .await
                .with_context(|| format!("cannot listen on {}", args.listen))?;
            let shutdown = shutdown::on_signals().context("installing signal handlers")?;
            fleetsync_sync_agent::run(config, listener, shutdown).await
        }
        Command::Servers(args) => client::servers(&args).await,
        Command::Sync(args) => client::sync(&args).await,
        Command::Job(args) => client::job(&args).await,
        Command::Jobs(args) => client::jobs(&args).await,
        Command::Check(args) => client::check(&args).await,
        Command::ResetHostKey(args) => client::reset_host_key(&args).await,
    }
}
