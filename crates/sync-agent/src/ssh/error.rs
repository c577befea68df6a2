//! How an SSH connection or command can fail, and which sync outcome each failure is.

use std::{io, net::SocketAddr, time::Duration};

use crate::model::{Cause, Outcome};

use super::HostKey;

/// The stage of a connection that a timeout hit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stage {
    /// DNS and TCP connect.
    Connect,
    /// Waiting for the server's SSH identification line.
    Banner,
    /// Key exchange and host key check.
    Handshake,
    /// Public-key authentication.
    Auth,
    /// Running a command.
    Command,
}

impl std::fmt::Display for Stage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Connect => "connect",
            Self::Banner => "SSH banner",
            Self::Handshake => "handshake",
            Self::Auth => "authentication",
            Self::Command => "command",
        })
    }
}

/// Why a TCP connection failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ConnectCause {
    /// `ECONNREFUSED`: nothing listens there.
    Refused,
    /// `EHOSTUNREACH` or `ENETUNREACH`.
    NoRoute,
    /// `ETIMEDOUT` from the kernel.
    TimedOut,
    /// Anything else.
    Other,
}

/// An SSH failure. Each maps to exactly one sync outcome (see [`SshError::outcome`]).
#[derive(Debug, thiserror::Error)]
pub enum SshError {
    /// The host name did not resolve.
    #[error("cannot resolve {host}: {message}")]
    Dns {
        /// The name.
        host: String,
        /// The resolver's error.
        message: String,
    },
    /// The TCP connection failed.
    #[error("cannot connect to {addr}: {source}")]
    Connect {
        /// The address tried last.
        addr: SocketAddr,
        /// What kind of failure.
        cause: ConnectCause,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// A stage took longer than its timeout.
    #[error("{}", timeout_message(*.stage, *.after))]
    Timeout {
        /// Which stage.
        stage: Stage,
        /// Its timeout.
        after: Duration,
    },
    /// The SSH handshake failed (not an SSH server, no common algorithm, dropped connection).
    #[error("ssh handshake failed: {0}")]
    Handshake(String),
    /// The server presented a different host key than the pinned one. Nothing was sent to it.
    #[error("host key changed: pinned {pinned}, presented {presented}")]
    HostKeyMismatch {
        /// The pinned key.
        pinned: HostKey,
        /// The key the server presented.
        presented: HostKey,
    },
    /// The server refused every key.
    #[error("authentication as {user} rejected for all {keys} configured key(s)")]
    AuthRejected {
        /// The login user.
        user: String,
        /// How many keys were offered.
        keys: usize,
    },
    /// Authentication broke off (protocol error, disconnect).
    #[error("authentication failed: {0}")]
    Auth(String),
    /// A channel could not be opened, or the command not started.
    #[error("ssh channel failed: {0}")]
    Channel(String),
    /// A command printed more than the output cap.
    #[error("command output exceeds the {limit}-byte cap")]
    OutputTooLarge {
        /// The cap.
        limit: usize,
    },
}

fn timeout_message(stage: Stage, after: Duration) -> String {
    let after = humantime::format_duration(after);
    match stage {
        Stage::Banner => format!("connection accepted but no SSH banner within {after}"),
        stage => format!("{stage} timed out after {after}"),
    }
}

impl SshError {
    pub(super) fn connect(addr: SocketAddr, source: io::Error) -> Self {
        let cause = match source.kind() {
            io::ErrorKind::ConnectionRefused => ConnectCause::Refused,
            io::ErrorKind::HostUnreachable | io::ErrorKind::NetworkUnreachable => {
                ConnectCause::NoRoute
            }
            io::ErrorKind::TimedOut => ConnectCause::TimedOut,
            _ => ConnectCause::Other,
        };
        Self::Connect {
            addr,
            cause,
            source,
        }
    }

    /// The sync outcome this failure is reported as, with the unreachable cause where it has one.
    pub fn outcome(&self) -> (Outcome, Option<Cause>) {
        match self {
            Self::Dns { .. } => (Outcome::Unreachable, Some(Cause::Dns)),
            Self::Connect { cause, .. } => (
                Outcome::Unreachable,
                match cause {
                    ConnectCause::Refused => Some(Cause::Refused),
                    ConnectCause::NoRoute => Some(Cause::NoRoute),
                    ConnectCause::TimedOut => Some(Cause::Timeout),
                    ConnectCause::Other => None,
                },
            ),
            Self::Timeout { stage, .. } => match stage {
                Stage::Connect | Stage::Banner => (Outcome::Unreachable, Some(Cause::Timeout)),
                Stage::Handshake => (Outcome::HandshakeFailed, None),
                Stage::Auth => (Outcome::AuthFailed, None),
                Stage::Command => (Outcome::CommandFailed, None),
            },
            Self::Handshake(_) => (Outcome::HandshakeFailed, None),
            Self::HostKeyMismatch { .. } => (Outcome::HostKeyMismatch, None),
            Self::AuthRejected { .. } | Self::Auth(_) => (Outcome::AuthFailed, None),
            Self::Channel(_) => (Outcome::CommandFailed, None),
            Self::OutputTooLarge { .. } => (Outcome::ParseFailed, None),
        }
    }

    /// True for failures to reach the server at all (the ones that mark it offline).
    pub fn is_unreachable(&self) -> bool {
        self.outcome().0 == Outcome::Unreachable
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn os_errors_map_to_causes() {
        let addr: SocketAddr = "127.0.0.1:22".parse().unwrap();
        let refused = SshError::connect(addr, io::Error::from(io::ErrorKind::ConnectionRefused));
        assert_eq!(
            refused.outcome(),
            (Outcome::Unreachable, Some(Cause::Refused))
        );
        // EHOSTUNREACH is 113 on Linux.
        let no_route = SshError::connect(addr, io::Error::from_raw_os_error(113));
        assert_eq!(
            no_route.outcome(),
            (Outcome::Unreachable, Some(Cause::NoRoute))
        );
        // ENETUNREACH is 101.
        let no_net = SshError::connect(addr, io::Error::from_raw_os_error(101));
        assert_eq!(
            no_net.outcome(),
            (Outcome::Unreachable, Some(Cause::NoRoute))
        );
        let banner = SshError::Timeout {
            stage: Stage::Banner,
            after: Duration::from_secs(5),
        };
        assert_eq!(
            banner.outcome(),
            (Outcome::Unreachable, Some(Cause::Timeout))
        );
        assert_eq!(
            banner.to_string(),
            "connection accepted but no SSH banner within 5s"
        );
        let cap = SshError::OutputTooLarge { limit: 10 };
        assert_eq!(cap.outcome().0, Outcome::ParseFailed);
    }
}
