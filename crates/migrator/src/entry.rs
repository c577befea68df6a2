//! The `migrator` command line, shared by the shipped binary and the tests' `migrator-crash`
//! (the same binary with the crash points of the `crash-points` feature): parses the command
//! line, sets up logging and signals, and hands over to the library.

use std::process::ExitCode;

use anyhow::Context;
use clap::{CommandFactory, Parser};
use fleetsync_common::{Db, shutdown, telemetry};

use crate::{
    Config, commands,
    config::{Cli, Command, Output},
};

/// Parses the command line, runs the command, and says how it ended.
pub async fn main() -> ExitCode {
    let cli = Cli::parse();
    let output = match &cli.command {
        Command::Serve(_) => Output::Human,
        Command::Migrate(args) => args.read.output,
        Command::Status(args) | Command::Verify(args) => args.output,
        Command::Plan(args) => args.read.output,
        Command::Completions(_) | Command::Man(_) => Output::Human,
    };
    match run(cli).await {
        Ok(code) => code,
        Err(err) => commands::fail(output, &err),
    }
}

async fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    match cli.command {
        Command::Serve(args) => {
            telemetry::init(args.common.log_format.into());
            let security =
                fleetsync_common::grpc::Security::from_args(&args.security, args.listen)?;
            let listener = tokio::net::TcpListener::bind(args.listen)
                .await
                .with_context(|| format!("cannot listen on {}", args.listen))?;
            let shutdown = shutdown::on_signals().context("installing signal handlers")?;
            let config = Config {
                database_url: args.common.database_url,
                shutdown_grace: args.shutdown.shutdown_grace.into(),
                drain_delay: args.shutdown.drain_delay.into(),
                lock_timeout: args.lock_timeout.into(),
                security,
            };
            crate::run(config, listener, shutdown).await?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Migrate(args) => {
            let db = open(&args.read.common).await?;
            commands::migrate(db, &args).await
        }
        Command::Status(args) => commands::status(open(&args.common).await?, &args).await,
        Command::Plan(args) => commands::plan(open(&args.read.common).await?, &args).await,
        Command::Verify(args) => commands::verify(open(&args.common).await?, &args).await,
        Command::Completions(args) => {
            fleetsync_common::cli::print_completions(Cli::command(), &args)?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Man(args) => {
            fleetsync_common::cli::print_man(Cli::command(), &args)?;
            Ok(ExitCode::SUCCESS)
        }
    }
}

async fn open(common: &fleetsync_common::cli::CommonArgs) -> anyhow::Result<Db> {
    telemetry::init_with_default(common.log_format.into(), "warn");
    Ok(Db::connect(&common.database_url).await?)
}
