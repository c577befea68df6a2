//! `migrator`: parses the command line, sets up logging and signals, and hands over to the
//! library.

use std::process::ExitCode;

use anyhow::Context;
use clap::Parser;
use fleetsync_common::{shutdown, telemetry};
use fleetsync_migrator::{
    Config,
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
            let listener = tokio::net::TcpListener::bind(args.listen)
                .await
                .with_context(|| format!("cannot listen on {}", args.listen))?;
            let shutdown = shutdown::on_signals().context("installing signal handlers")?;
            let config = Config {
                database_url: args.common.database_url,
                shutdown_grace: args.common.shutdown_grace.into(),
            };
            fleetsync_migrator::run(config, listener, shutdown).await
        }
    }
}
