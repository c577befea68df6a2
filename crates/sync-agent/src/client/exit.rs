//! How an operator command ends: its exit status (the example clients use the same ones), and on
//! a failure one error line on stderr or, with `-o json`, one error document on stdout. Output
//! goes through [`out!`]: a reader that went away (`| head`) ends the command quietly.

use std::{error::Error as StdError, fmt, io, process::ExitCode, time::Duration};

use fleetsync_common::error::causes;
use serde_json::json;
use tonic::Code;

use crate::config::Output;

pub(super) use fleetsync_common::out;

/// The exit statuses of the operator commands, documented in the README.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Exit {
    /// Done; every server the command reported on ended OK.
    Ok = 0,
    /// Done, and some server ended other than OK (unreachable, refused its key, failed...).
    NotOk = 1,
    /// The command line, or a file it names, is wrong (clap's own errors exit 2 as well).
    Usage = 2,
    /// The agent answered with an error: an unknown id, an invalid argument, not allowed.
    Refused = 3,
    /// The agent could not be reached, or did not answer within `--timeout`.
    Unreachable = 4,
}

impl Exit {
    /// The process's exit status.
    pub fn code(self) -> ExitCode {
        ExitCode::from(self as u8)
    }

    fn name(self) -> &'static str {
        match self {
            Self::Ok => "ok",
            Self::NotOk => "not_ok",
            Self::Usage => "usage",
            Self::Refused => "refused",
            Self::Unreachable => "unreachable",
        }
    }

    /// 0 when every server reported on ended OK, 1 otherwise.
    pub(super) fn of_outcomes(mut ok: impl Iterator<Item = bool>) -> Self {
        if ok.all(|ok| ok) {
            Self::Ok
        } else {
            Self::NotOk
        }
    }
}

/// Why a command failed.
#[derive(Debug)]
pub struct Failure {
    /// The exit status it ends with.
    pub exit: Exit,
    /// The gRPC status code, when the agent (or the transport) gave one.
    pub code: Option<Code>,
    /// What went wrong, each cause once.
    pub message: String,
    /// Stdout was closed by its reader: nothing to report.
    quiet: bool,
}

impl Failure {
    pub(super) fn new(exit: Exit, message: impl Into<String>) -> Self {
        Self {
            exit,
            code: None,
            message: message.into(),
            quiet: false,
        }
    }

    /// A failure to reach the agent at `url`.
    pub(super) fn unreachable(url: &str, err: &(dyn StdError + 'static)) -> Self {
        let message = causes(err);
        Self::new(
            Exit::Unreachable,
            format!(
                "cannot reach the sync-agent at {url}: {message}{}",
                tls_hint(url, &message)
            ),
        )
    }

    /// No answer within `limit`.
    pub(super) fn silent(url: &str, limit: Duration) -> Self {
        Self {
            code: Some(Code::DeadlineExceeded),
            ..Self::new(
                Exit::Unreachable,
                format!(
                    "the sync-agent at {url} did not answer within {} (--timeout)",
                    humantime::format_duration(limit)
                ),
            )
        }
    }

    /// The agent's (or the transport's) error status for a call to `url`.
    pub(super) fn status(url: &str, status: tonic::Status) -> Self {
        let code = status.code();
        // A status with a source was made on this side from a transport error (a dropped
        // connection, a TLS listener answering plain text with an alert): no answer at all.
        let unreachable = matches!(
            code,
            Code::Unavailable | Code::DeadlineExceeded | Code::Cancelled
        ) || status.source().is_some();
        let mut message = match status.source() {
            Some(source) => {
                fleetsync_common::error::join_causes(vec![status.message().to_owned()], source)
            }
            None => status.message().to_owned(),
        };
        if unreachable && code != Code::DeadlineExceeded {
            message.push_str(&tls_hint(url, &message));
        }
        Self {
            exit: if unreachable {
                Exit::Unreachable
            } else {
                Exit::Refused
            },
            code: Some(code),
            message: if unreachable {
                format!("the sync-agent at {url}: {message}")
            } else {
                format!("{code:?}: {message}")
            },
            quiet: false,
        }
    }

    /// Prints the failure the way `output` asks and returns the exit status.
    pub fn report(self, output: Output) -> ExitCode {
        if self.quiet {
            return ExitCode::SUCCESS;
        }
        match output {
            Output::Json => {
                let document = json!({"error": {
                    "exit": self.exit as u8,
                    "kind": self.exit.name(),
                    "grpc_code": self.code.map(|c| format!("{c:?}")),
                    "message": self.message,
                }});
                // Nothing else to do if even this cannot be written.
                let _ = out!("{document:#}");
            }
            Output::Human => eprintln!("error: {}", self.message),
        }
        self.exit.code()
    }
}

impl fmt::Display for Failure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

impl From<io::Error> for Failure {
    fn from(err: io::Error) -> Self {
        Self {
            quiet: fleetsync_common::cli::is_closed_pipe(&err),
            ..Self::new(Exit::Usage, format!("cannot write the output: {err}"))
        }
    }
}

/// A local problem: a file that cannot be read, an invalid URL or token.
impl From<anyhow::Error> for Failure {
    fn from(err: anyhow::Error) -> Self {
        Self::new(Exit::Usage, format!("{err:#}"))
    }
}

/// A plain-text client talking to a TLS listener sees the connection dropped ("operation was
/// canceled", "connection reset"): say what to change. A refused connection is no such case.
fn tls_hint(url: &str, message: &str) -> String {
    if url.starts_with("http://") && !message.contains("refused") {
        format!(" (if the agent serves TLS, use https:// in --agent-url, not {url})")
    } else {
        String::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exit_is_one_when_a_server_is_not_ok() {
        assert_eq!(Exit::of_outcomes([true, true].into_iter()), Exit::Ok);
        assert_eq!(Exit::of_outcomes(std::iter::empty()), Exit::Ok);
        assert_eq!(Exit::of_outcomes([true, false].into_iter()), Exit::NotOk);
    }
}
