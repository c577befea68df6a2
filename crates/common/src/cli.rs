//! Command-line arguments both binaries share (database, log format), as clap `Args`.

use clap::{Args, ValueEnum};

/// Writes a line to stdout and returns the write's `io::Result` (`println!` panics when the
/// reader has gone away, as in `migrator plan | head -5`).
#[macro_export]
macro_rules! out {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        writeln!(std::io::stdout().lock(), $($arg)*)
    }};
}

/// Whether an error, or one of its causes, is a write to a pipe whose reader has gone: the
/// command ends quietly with success, like the Unix tools it is piped with.
pub fn is_closed_pipe(err: &(dyn std::error::Error + 'static)) -> bool {
    let mut next = Some(err);
    while let Some(e) = next {
        if e.downcast_ref::<std::io::Error>()
            .is_some_and(|e| e.kind() == std::io::ErrorKind::BrokenPipe)
        {
            return true;
        }
        next = e.source();
    }
    false
}

use crate::telemetry::LogFormat;

/// Where the control-plane database is and how to log.
#[derive(Debug, Clone, Args)]
pub struct CommonArgs {
    /// Control-plane database: `sqlite://PATH` (created if missing), `postgres://...` or
    /// `mysql://...` (MySQL and MariaDB).
    // `--help` must not print a password set in the environment.
    #[arg(
        long,
        env = "DATABASE_URL",
        hide_env_values = true,
        default_value = "sqlite://fleetsync.db"
    )]
    pub database_url: String,

    /// Log format on stderr; the level comes from `RUST_LOG` (default `info`).
    #[arg(long, env = "FLEETSYNC_LOG_FORMAT", value_enum, default_value_t = LogFormatArg::Plain)]
    pub log_format: LogFormatArg,
}

/// How a server (`serve`) stops on SIGTERM or ctrl-c: first the drain delay, then the grace.
#[derive(Debug, Clone, Args)]
pub struct ShutdownArgs {
    /// On SIGTERM or ctrl-c, how long health reports NOT_SERVING while every call is still
    /// served, so that load balancers and probes stop sending calls before the server refuses
    /// them; the shutdown grace follows.
    #[arg(long, env = "FLEETSYNC_DRAIN_DELAY", default_value = "3s")]
    pub drain_delay: humantime::Duration,

    /// After the drain delay, how long calls in flight (streams included), and the agent's
    /// syncs in flight, may take to finish while no new call is taken; then the server stops
    /// anyway.
    #[arg(long, env = "FLEETSYNC_SHUTDOWN_GRACE", default_value = "5s")]
    pub shutdown_grace: humantime::Duration,
}

/// Who may call a gRPC server: bearer token and TLS.
#[derive(Debug, Clone, Args)]
pub struct SecurityArgs {
    /// File holding the bearer token every RPC but health must present (`authorization: Bearer
    /// TOKEN`), or several, one per line, all accepted (rotation). Read again every 2 s: a
    /// changed file takes effect without a restart. Without it, anyone who can reach the port
    /// can call every RPC.
    #[arg(long, env = "FLEETSYNC_AUTH_TOKEN_FILE")]
    pub auth_token_file: Option<std::path::PathBuf>,

    /// PEM certificate (chain) to serve TLS with; needs --tls-key.
    #[arg(long, env = "FLEETSYNC_TLS_CERT", requires = "tls_key")]
    pub tls_cert: Option<std::path::PathBuf>,

    /// PEM private key of --tls-cert.
    #[arg(long, env = "FLEETSYNC_TLS_KEY", requires = "tls_cert")]
    pub tls_key: Option<std::path::PathBuf>,

    /// Listen beyond loopback without a token (refused otherwise).
    #[arg(long, env = "FLEETSYNC_ALLOW_UNAUTHENTICATED")]
    pub allow_unauthenticated: bool,

    /// Accept the bearer token over plain HTTP/2 on a listener beyond loopback (a private
    /// network, or TLS ended by a proxy in front). Without it, such a listener needs TLS.
    #[arg(long, env = "FLEETSYNC_ALLOW_PLAINTEXT_TOKEN")]
    pub allow_plaintext_token: bool,
}

/// Log format as a command-line value.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LogFormatArg {
    /// Human-readable lines.
    Plain,
    /// One JSON object per line.
    Json,
}

impl From<LogFormatArg> for LogFormat {
    fn from(arg: LogFormatArg) -> Self {
        match arg {
            LogFormatArg::Plain => LogFormat::Plain,
            LogFormatArg::Json => LogFormat::Json,
        }
    }
}

/// `completions SHELL` and `man [--dir DIR]`: what a package installs beside a binary, made
/// from its clap definition.
#[derive(Debug, Clone, Args)]
pub struct CompletionsArgs {
    /// The shell to complete for.
    #[arg(value_enum)]
    pub shell: clap_complete::Shell,
}

/// `man [--dir DIR]`.
#[derive(Debug, Clone, Args)]
pub struct ManArgs {
    /// Write one page per command (`BINARY.1`, `BINARY-SUBCOMMAND.1`, ...) into this directory
    /// instead of printing the main page.
    #[arg(long)]
    pub dir: Option<std::path::PathBuf>,
}

/// Prints the completion script of `command` for `shell` (e.g. `sync-agent completions bash >
/// /etc/bash_completion.d/sync-agent`).
pub fn print_completions(
    mut command: clap::Command,
    args: &CompletionsArgs,
) -> std::io::Result<()> {
    let name = command.get_name().to_owned();
    let mut script = Vec::new();
    clap_complete::generate(args.shell, &mut command, name, &mut script);
    use std::io::Write as _;
    std::io::stdout().lock().write_all(&script)
}

/// Prints `command`'s man page, or with `--dir` writes a page for it and each of its subcommands.
pub fn print_man(command: clap::Command, args: &ManArgs) -> std::io::Result<()> {
    match &args.dir {
        Some(dir) => {
            std::fs::create_dir_all(dir)?;
            clap_mangen::generate_to(command, dir)
        }
        None => {
            let mut page = Vec::new();
            clap_mangen::Man::new(command).render(&mut page)?;
            use std::io::Write as _;
            std::io::stdout().lock().write_all(&page)
        }
    }
}
