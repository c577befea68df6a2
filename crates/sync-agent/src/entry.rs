//! The `sync-agent` command line, shared by the shipped binary and the tests'
//! `sync-agent-older` (the same program built with the `older-schema-range` feature, which
//! plays the previous release in a rolling upgrade): parses the command line, sets up logging
//! and signals, and hands over to the library.

use std::process::ExitCode;

use anyhow::Context;
use clap::{CommandFactory, Parser};
use fleetsync_common::{shutdown, telemetry};

use crate::{
    client,
    config::{Cli, Command, ServeArgs},
};

/// Parses the command line, runs the command, and says how it ended.
pub async fn main() -> ExitCode {
    let cli = Cli::parse();
    let (output, ended) = match cli.command {
        Command::Serve(args) => {
            return match serve(*args).await {
                Ok(()) => ExitCode::SUCCESS,
                Err(err) => {
                    eprintln!("error: {err:#}");
                    ExitCode::FAILURE
                }
            };
        }
        Command::Servers(args) => (args.agent.output, client::servers(&args).await),
        Command::Sync(args) => (args.agent.output, client::sync(&args).await),
        Command::Job(args) => (args.agent.output, client::job(&args).await),
        Command::Jobs(args) => (args.agent.output, client::jobs(&args).await),
        Command::Check(args) => (args.agent.output, client::check(&args).await),
        Command::Agents(args) => (args.agent.output, client::agents(&args).await),
        Command::ResetHostKey(args) => (args.agent.output, client::reset_host_key(&args).await),
        Command::Completions(args) => {
            return generated(fleetsync_common::cli::print_completions(
                Cli::command(),
                &args,
            ));
        }
        Command::Man(args) => {
            return generated(fleetsync_common::cli::print_man(Cli::command(), &args));
        }
    };
    match ended {
        Ok(exit) => exit.code(),
        Err(failure) => failure.report(output),
    }
}

/// How `completions` and `man` end: a closed stdout is no failure.
fn generated(written: std::io::Result<()>) -> ExitCode {
    match written {
        Err(err) if !fleetsync_common::cli::is_closed_pipe(&err) => {
            eprintln!("error: {err}");
            ExitCode::FAILURE
        }
        _ => ExitCode::SUCCESS,
    }
}

async fn serve(args: ServeArgs) -> anyhow::Result<()> {
    telemetry::init(args.common.log_format.into());
    let config = crate::config_from_args(&args)?;
    let listener = tokio::net::TcpListener::bind(args.listen)
        .await
        .with_context(|| format!("cannot listen on {}", args.listen))?;
    let shutdown = shutdown::on_signals().context("installing signal handlers")?;
    crate::run(config, listener, shutdown).await
}
