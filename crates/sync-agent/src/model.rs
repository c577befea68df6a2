//! The agent's domain values as types: where a job came from, where it is in its life, whether
//! a server answers, how a server's run ended, and a server's host key. Each is stored as text and converted at the
//! database edge (`as_str`, `parse`: unknown text is an error, never a guess; see
//! `common::stored_enum!`) and at the proto edge (`service::convert`).

pub use fleetsync_common::model::{
    AgentState, InventoryStatus, RequestState, Scope, Scopes, ServiceStatus, ServiceType,
};
use std::fmt;

use fleetsync_common::stored_enum;

stored_enum! {
    /// Whether a server answers, as its last contact found.
    pub enum Reachability in "reachability in servers" {
        /// Never tried, or not since it was registered.
        Unknown => "unknown",
        /// The last contact got an SSH answer.
        Online => "online",
        /// The last contact got none: in backoff until its next probe.
        Offline => "offline",
    }
}

stored_enum! {
    /// Which servers a job covers, as stored (`sync_jobs.selection`); the ids themselves are
    /// its rows.
    pub enum JobSelection in "selection in sync_jobs" {
        /// Every server registered when it was made.
        All => "all",
        /// A list of servers.
        Ids => "ids",
    }
}

stored_enum! {
    /// Where a job came from.
    pub enum JobOrigin in "job origin in sync_jobs" {
        /// An RPC.
        Rpc => "rpc",
        /// A migration's sync request.
        Migration => "migration",
        /// The periodic sync.
        Schedule => "schedule",
        /// A server that came back.
        Recovery => "recovery",
    }
}

stored_enum! {
    /// A job's life.
    pub enum JobState in "job state in sync_jobs" {
        /// No server finished.
        Pending => "pending",
        /// Some servers finished.
        Running => "running",
        /// Every server has an outcome.
        Done => "done",
    }
}

stored_enum! {
    /// How one server's run ended (the proto's `Outcome`, whose comments say more).
    pub enum Outcome in "outcome in sync_job_servers" {
        /// Inventory read and stored.
        Ok => "OK",
        /// Not attempted: offline and in backoff.
        SkippedOffline => "SKIPPED_OFFLINE",
        /// Not attempted: no database service registered.
        SkippedNoDatabaseService => "SKIPPED_NO_DATABASE_SERVICE",
        /// No TCP connection or no SSH banner; the `Cause` says why, where known.
        Unreachable => "UNREACHABLE",
        /// The SSH handshake failed.
        HandshakeFailed => "HANDSHAKE_FAILED",
        /// Every key was refused.
        AuthFailed => "AUTH_FAILED",
        /// The host key is not the pinned one; nothing was run.
        HostKeyMismatch => "HOST_KEY_MISMATCH",
        /// The inventory command exited non-zero or timed out.
        CommandFailed => "COMMAND_FAILED",
        /// The output could not be understood or stored.
        ParseFailed => "PARSE_FAILED",
        /// The server was deleted before it was synced.
        Cancelled => "CANCELLED",
    }
}

stored_enum! {
    /// Why a server was `UNREACHABLE`.
    pub enum Cause in "unreachable cause in sync_job_servers" {
        /// Nothing listens on the address and port.
        Refused => "REFUSED",
        /// No route to the host: down, or the network is cut.
        NoRoute => "NO_ROUTE",
        /// No connection or no banner within the timeout.
        Timeout => "TIMEOUT",
        /// The host name did not resolve.
        Dns => "DNS",
    }
}

impl Outcome {
    /// True for the failures that may be the agent's rather than the server's: its key refused,
    /// no connection from where it stands, a handshake that broke on its path. Before one of
    /// these becomes a server's outcome, another live agent of the zone is asked for a second
    /// opinion (see `store::complete`).
    pub fn may_be_the_agents(self) -> bool {
        matches!(
            self,
            Self::Unreachable | Self::HandshakeFailed | Self::AuthFailed
        )
    }
}

impl Outcome {
    /// True when the run got past authentication: whatever failed after, the way to the server
    /// and the agent's key were fine.
    pub fn reached_the_server(self) -> bool {
        matches!(self, Self::Ok | Self::CommandFailed | Self::ParseFailed)
    }
}

/// Most characters of a zone name.
pub const ZONE_MAX: usize = 64;

/// Checks a zone name (a server's `zone`, an agent's `--zone`): empty (no zone), or 1 to
/// [`ZONE_MAX`] ASCII letters, digits, `.`, `_` and `-`, starting with a letter or digit.
pub fn check_zone(zone: &str) -> Result<(), String> {
    if zone.is_empty() {
        return Ok(());
    }
    let valid = zone.len() <= ZONE_MAX
        && zone.starts_with(|c: char| c.is_ascii_alphanumeric())
        && zone
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'));
    if valid {
        Ok(())
    } else {
        Err(format!(
            "{zone:?} is not a zone name (letters, digits, '.', '_' and '-', starting with a \
             letter or digit, at most {ZONE_MAX})"
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn zone_names() {
        for good in ["", "eu-1", "dc2.rack_7", "A"] {
            assert_eq!(check_zone(good), Ok(()), "{good:?}");
        }
        for bad in ["-eu", "eu 1", "eu/1", "é", &"z".repeat(65)] {
            assert!(check_zone(bad).is_err(), "{bad:?}");
        }
        assert!(Outcome::AuthFailed.may_be_the_agents());
        assert!(!Outcome::HostKeyMismatch.may_be_the_agents());
        assert!(!Outcome::CommandFailed.may_be_the_agents());
    }

    #[test]
    fn stored_names_round_trip_and_unknown_text_is_refused() {
        for outcome in Outcome::ALL {
            assert_eq!(Outcome::parse(outcome.as_str()), Ok(*outcome));
        }
        for cause in Cause::ALL {
            assert_eq!(Cause::parse(cause.as_str()), Ok(*cause));
        }
        let err = Outcome::parse("ok").unwrap_err();
        assert_eq!(
            err.to_string(),
            "unknown outcome in sync_job_servers \"ok\""
        );
        assert!(JobOrigin::parse("cron").is_err());
        assert!(Reachability::parse("").is_err());
        assert!(JobState::parse("cancelled").is_err());
    }
}

/// A server's host key as it is registered, checked and pinned: algorithm and SHA-256
/// fingerprint. One type from a registration (`ServerSpec`) to the SSH check (`ssh::Target`)
/// to the pin a run records (`store::Completion`) and the pin stored (`store::PinnedKey`).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct HostKey {
    /// Algorithm name, e.g. `ssh-ed25519`.
    pub algorithm: String,
    /// OpenSSH-style fingerprint, `SHA256:...`.
    pub fingerprint: String,
}

impl HostKey {
    /// From its two stored columns: a key when both are there, none when either is missing.
    pub fn stored(algorithm: Option<String>, fingerprint: Option<String>) -> Option<Self> {
        Some(Self {
            algorithm: algorithm?,
            fingerprint: fingerprint?,
        })
    }
}

impl fmt::Display for HostKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {}", self.algorithm, self.fingerprint)
    }
}
