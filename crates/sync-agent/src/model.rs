//! The agent's domain values as types: where a job came from, where it is in its life, and
//! whether a server answers. Each is stored as text and converted at the database edge
//! (`as_str`, `parse`: unknown text is an error, never a guess) and at the proto edge
//! (`service::convert`).

/// Whether a server answers, as its last contact found.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Reachability {
    /// Never tried, or not since it was registered.
    Unknown,
    /// The last contact got an SSH answer.
    Online,
    /// The last contact got none: in backoff until its next probe.
    Offline,
}

impl Reachability {
    /// Stored name.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Unknown => "unknown",
            Self::Online => "online",
            Self::Offline => "offline",
        }
    }

    /// From its stored name; anything else is an error, never a guess.
    pub fn parse(s: &str) -> Result<Self, sqlx::Error> {
        match s {
            "unknown" => Ok(Self::Unknown),
            "online" => Ok(Self::Online),
            "offline" => Ok(Self::Offline),
            other => Err(sqlx::Error::Decode(
                format!("unknown reachability {other:?} in servers").into(),
            )),
        }
    }
}

/// Where a job came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum JobOrigin {
    /// An RPC.
    Rpc,
    /// A migration's sync request.
    Migration,
    /// The periodic sync.
    Schedule,
    /// A server that came back.
    Recovery,
}

impl JobOrigin {
    /// Stored name.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Rpc => "rpc",
            Self::Migration => "migration",
            Self::Schedule => "schedule",
            Self::Recovery => "recovery",
        }
    }

    /// From its stored name; anything else is an error, never a guess.
    pub fn parse(s: &str) -> Result<Self, sqlx::Error> {
        match s {
            "rpc" => Ok(Self::Rpc),
            "migration" => Ok(Self::Migration),
            "schedule" => Ok(Self::Schedule),
            "recovery" => Ok(Self::Recovery),
            other => Err(sqlx::Error::Decode(
                format!("unknown job origin {other:?} in sync_jobs").into(),
            )),
        }
    }
}

/// A job's life.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum JobState {
    /// No server finished.
    Pending,
    /// Some servers finished.
    Running,
    /// Every server has an outcome.
    Done,
}
