//! Command-line arguments both binaries share (database, log format), as clap `Args`.

use clap::{Args, ValueEnum};

use crate::telemetry::LogFormat;

/// Where the control-plane database is and how to log.
#[derive(Debug, Clone, Args)]
pub struct CommonArgs {
    /// Control-plane database: `sqlite://PATH` (created if missing), `postgres://...` or
    /// `mysql://...` (MySQL and MariaDB).
    #[arg(long, env = "DATABASE_URL", default_value = "sqlite://fleetsync.db")]
    pub database_url: String,

    /// On SIGTERM or ctrl-c, how long calls in flight (streams included) may take to finish
    /// before the server stops anyway. Health turns NOT_SERVING at once.
    #[arg(long, env = "FLEETSYNC_SHUTDOWN_GRACE", default_value = "5s")]
    pub shutdown_grace: humantime::Duration,

    /// Log format on stderr; the level comes from `RUST_LOG` (default `info`).
    #[arg(long, env = "FLEETSYNC_LOG_FORMAT", value_enum, default_value_t = LogFormatArg::Plain)]
    pub log_format: LogFormatArg,
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
