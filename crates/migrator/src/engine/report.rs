//! What the engine reports: each migration's state and history, status, plans, verification
//! problems, the events of a run and its report.

use std::time::Duration;

use fleetsync_common::{Backend, RequestId};

use crate::{
    agents::LiveAgent,
    engine::Loss,
    history::{History, Rollback},
    migration::Migration,
    model::{Scopes, State},
};

impl State {
    /// Where a migration stands by its history row (none: pending).
    pub(super) fn of(row: Option<&History>) -> Self {
        row.map_or(Self::Pending, |r| r.state)
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
    /// Its latest roll-back, if it was ever rolled back (under way if its state is
    /// `reverting`).
    pub rolled_back: Option<Rollback>,
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
    /// The live sync-agents (heartbeat within two lease TTLs), oldest first.
    pub agents: Vec<LiveAgent>,
    /// Every roll-back recorded, oldest first.
    pub rollbacks: Vec<Rollback>,
}

/// A migration `migrate` would run, or roll back, with its exact SQL.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Planned {
    /// The migration's version (the timestamp its file name starts with).
    pub version: i64,
    /// The migration's name, from its file name.
    pub name: String,
    /// True when its reverse runs (the way down).
    pub reverse: bool,
    /// Whether it runs in one transaction.
    pub transactional: bool,
    /// Statements still to run, in order (the reverse's on the way down).
    pub statements: Vec<String>,
    /// Data to re-sync.
    pub resync: Scopes,
    /// Whether it stops agents built before it (header `stops-agents`).
    pub stops_agents: bool,
    /// The live agents it would stop (their range ends before it; on the way down, the
    /// target is below their range).
    pub stops: Vec<LiveAgent>,
    /// On the way down: the data its reverse would destroy, as it stands now.
    pub losses: Vec<Loss>,
    /// On the way down: why it cannot be rolled back, if it cannot.
    pub irreversible: Option<String>,
}

/// What `plan` shows: the migrations `migrate` would roll back and run, and the live agents.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Plan {
    /// The way down (newest first), then the pending migrations up to the target, in order.
    pub migrations: Vec<Planned>,
    /// The live sync-agents, oldest first.
    pub agents: Vec<LiveAgent>,
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
        sync_request: Option<RequestId>,
    },
    /// A migration's reverse started (the way down).
    RollingBack {
        /// The migration's version.
        version: i64,
        /// Its name.
        name: String,
        /// Reverse statements to run in this attempt.
        statements: usize,
    },
    /// A migration was rolled back.
    RolledBack {
        /// The migration's version.
        version: i64,
        /// How long it took.
        duration: Duration,
        /// The sync request it had recorded, withdrawn with it (no agent had taken it).
        withdrawn: Option<String>,
    },
    /// A migration, or its reverse, failed.
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
    /// Versions rolled back by this run, newest first.
    pub rolled_back: Vec<i64>,
    /// Sync requests withdrawn with them.
    pub withdrawn: Vec<String>,
    /// Versions applied by this run, in order.
    pub applied: Vec<i64>,
    /// Highest applied version afterwards.
    pub current_version: i64,
    /// Sync requests recorded by this run.
    pub sync_requests: Vec<RequestId>,
}
