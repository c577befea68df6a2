//! What the engine reports: each migration's state and history, status, plans, verification
//! problems, the events of a run and its report.

use std::time::Duration;

use fleetsync_common::Backend;

use super::state;
use crate::{conn::HistoryRow, migration::Migration};

/// Where one migration stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum State {
    /// Not applied.
    Pending,
    /// Applied to the end and recorded.
    Applied,
    /// Interrupted part-way (journaled migrations).
    Partial,
    /// Failed on a statement.
    Failed,
}

impl State {
    pub(super) fn from_history(row: Option<&HistoryRow>) -> Self {
        match row.map(|r| r.state.as_str()) {
            None => Self::Pending,
            Some(state::APPLIED) => Self::Applied,
            Some(state::PARTIAL) => Self::Partial,
            Some(_) => Self::Failed,
        }
    }

    /// Lowercase name.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Pending => "pending",
            Self::Applied => "applied",
            Self::Partial => "partial",
            Self::Failed => "failed",
        }
    }
}

/// One migration with what the database records of it.
#[derive(Debug, Clone)]
pub struct MigrationStatus {
    /// The binary's migration.
    pub migration: Migration,
    /// Where it stands.
    pub state: State,
    /// Its history row, if any.
    pub history: Option<History>,
}

/// What the history table records of one migration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct History {
    /// Checksum at the time it was applied.
    pub checksum: String,
    /// Statements done.
    pub statements_applied: i64,
    /// Statements in it then.
    pub statements_total: i64,
    /// Start of the last attempt (ms since epoch).
    pub started_at: Option<i64>,
    /// End of the applying attempt or the failure (ms since epoch).
    pub finished_at: Option<i64>,
    /// Duration of the applying attempt.
    pub duration_ms: Option<i64>,
    /// `user@host` of the process that ran it.
    pub installed_by: String,
    /// Id of the run that last touched it.
    pub run_id: String,
    /// Error of a failed attempt.
    pub error: Option<String>,
    /// Statement that failed.
    pub failing_statement: Option<String>,
}

impl From<&HistoryRow> for History {
    fn from(row: &HistoryRow) -> Self {
        Self {
            checksum: row.checksum.clone(),
            statements_applied: row.statements_applied,
            statements_total: row.statements_total,
            started_at: row.started_at,
            finished_at: row.finished_at,
            duration_ms: row.duration_ms,
            installed_by: row.installed_by.clone(),
            run_id: row.run_id.clone(),
            error: row.error.clone(),
            failing_statement: row.failing_statement.clone(),
        }
    }
}

/// The database's schema state against the binary.
#[derive(Debug, Clone)]
pub struct Status {
    /// Which database it ran on.
    pub backend: Backend,
    /// Highest applied version (0 if none).
    pub current_version: i64,
    /// Highest version the binary knows.
    pub latest_version: i64,
    /// Every known migration, ascending.
    pub migrations: Vec<MigrationStatus>,
    /// Versions in the database the binary does not know.
    pub unknown_versions: Vec<i64>,
    /// Sync requests not yet taken by an agent.
    pub pending_sync_requests: i64,
}

/// A migration `migrate` would run, with its exact SQL.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Planned {
    /// The migration's version (the timestamp its file name starts with).
    pub version: i64,
    /// The migration's name, from its file name.
    pub name: String,
    /// Whether it runs in one transaction.
    pub transactional: bool,
    /// Statements still to run, in order.
    pub statements: Vec<String>,
    /// Data to re-sync.
    pub resync: Vec<String>,
}

/// Something wrong between the database and the binary.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    /// The version concerned.
    pub version: i64,
    /// What is wrong.
    pub problem: String,
}

/// Progress of a `migrate`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// A migration started.
    Started {
        /// The migration's version (the timestamp its file name starts with).
        version: i64,
        /// The migration's name, from its file name.
        name: String,
        /// Statements to run in this attempt.
        statements: usize,
    },
    /// A migration was applied.
    Applied {
        /// The migration's version (the timestamp its file name starts with).
        version: i64,
        /// How long it took.
        duration: Duration,
        /// Id of the sync request it recorded, if any.
        sync_request: Option<String>,
    },
    /// A migration failed.
    Failed {
        /// The migration's version (the timestamp its file name starts with).
        version: i64,
        /// How long it ran.
        duration: Duration,
        /// The error.
        error: String,
        /// The statement that failed.
        statement: String,
    },
}

/// What a `migrate` did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Report {
    /// Versions applied by this run, in order.
    pub applied: Vec<i64>,
    /// Highest applied version afterwards.
    pub current_version: i64,
    /// Sync requests recorded by this run.
    pub sync_requests: Vec<String>,
}
