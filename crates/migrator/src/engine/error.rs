//! What can stop the engine: `EngineError`, which refusals are verification problems, and which
//! failures a new attempt cures.

use std::time::Duration;

use super::Loss;

/// What can stop the engine.
#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    /// The database failed or went away.
    #[error("database error while {doing}: {source}")]
    Database {
        /// What the engine was doing.
        doing: String,
        /// The driver's error.
        #[source]
        source: sqlx::Error,
    },
    /// Another migrator held the lock for longer than the lock timeout.
    #[error("another migrator holds the migration lock; gave up after {0:?}")]
    LockTimeout(Duration),
    /// An applied migration's text changed since it was applied.
    #[error(
        "migration {version} ({name}) was edited after it was applied: applied checksum \
         {applied}, binary checksum {binary}. Restore the original file; add a new migration \
         for the change"
    )]
    ChecksumMismatch {
        /// The migration's version (the timestamp its file name starts with).
        version: i64,
        /// The migration's name, from its file name.
        name: String,
        /// Checksum recorded when applied.
        applied: String,
        /// Checksum of the binary's text.
        binary: String,
    },
    /// The statements a partial migration already ran were changed.
    #[error(
        "migration {version} ({name}) is partly applied ({done} statements) and those statements \
         were edited since; restore them, then run migrate again"
    )]
    PartialEdited {
        /// The migration's version (the timestamp its file name starts with).
        version: i64,
        /// The migration's name, from its file name.
        name: String,
        /// Statements done.
        done: i64,
    },
    /// The database has versions this binary does not know: a newer migrator ran.
    #[error(
        "the database has migrations this binary does not know: {}. It was migrated by a newer \
         fleetsync; use that version",
        .0.iter().map(i64::to_string).collect::<Vec<_>>().join(", ")
    )]
    UnknownVersions(Vec<i64>),
    /// A pending migration stops agents built before it, and such agents are serving.
    #[error(
        "migration {version} ({name}) stops sync-agents built before it, and {} serve now: {}. \
         Upgrade them first (README, \"Upgrades\"), or pass --stop-agents to apply it anyway: \
         they then claim nothing more, hand over what has not reached its server, and say so \
         (`sync-agent agents`); nothing was written",
        .agents.len(),
        .agents.join("; ")
    )]
    WouldStopAgents {
        /// The migration's version.
        version: i64,
        /// Its name.
        name: String,
        /// The serving agents it would stop, described.
        agents: Vec<String>,
    },
    /// A migration the way down must pass has no reverse.
    #[error("migration {version} ({name}) cannot be rolled back: {reason}; nothing was written")]
    Irreversible {
        /// The migration's version.
        version: i64,
        /// Its name.
        name: String,
        /// Why, as its down file says.
        reason: String,
    },
    /// The way down would destroy data, and `--allow-data-loss` was not given.
    #[error(
        "rolling back to version {target} would destroy data: {}. `migrator plan --target \
         {target}` shows it; pass --allow-data-loss to roll back anyway; nothing was written",
        .losses.iter().map(|(v, l)| format!("{l} (reverse of {v})")).collect::<Vec<_>>().join(", ")
    )]
    WouldLoseData {
        /// Where the way down goes.
        target: i64,
        /// What would go, by the version whose reverse drops it.
        losses: Vec<(i64, Loss)>,
    },
    /// The way down goes below the schema range of serving agents.
    #[error(
        "rolling back to version {target} goes below the schema range of {} serving \
         sync-agent(s): {}. Replace them by agents of the release you return to first (README, \
         \"Rolling back\"), or pass --stop-agents: they then claim nothing until the schema is \
         back in their range; nothing was written",
        .agents.len(),
        .agents.join("; ")
    )]
    RollbackStopsAgents {
        /// Where the way down goes.
        target: i64,
        /// The serving agents it would stop, described.
        agents: Vec<String>,
    },
    /// The reverse statements an interrupted way down already ran were changed.
    #[error(
        "the roll-back of migration {version} ({name}) was interrupted after {done} statements of \
         its reverse, and those statements were edited since; restore them, then run migrate again"
    )]
    ReverseEdited {
        /// The migration's version.
        version: i64,
        /// Its name.
        name: String,
        /// Reverse statements done.
        done: i64,
    },
    /// `--target` names no migration.
    #[error(
        "no migration has version {0} (`migrator status` lists the versions this binary knows)"
    )]
    UnknownTarget(i64),
    /// A statement failed; nothing of the migration (or its reverse) is applied (transactional
    /// backends) or the statements before it are (MySQL), and the next run retries from there.
    #[error(
        "{}migration {version} ({name}) failed at statement {index} of {total}: {error}\n  statement: {statement}",
        if *.reverse { "the reverse of " } else { "" }
    )]
    StatementFailed {
        /// True for a statement of the migration's reverse (the way down).
        reverse: bool,
        /// The migration's version (the timestamp its file name starts with).
        version: i64,
        /// The migration's name, from its file name.
        name: String,
        /// 1-based index of the failing statement.
        index: usize,
        /// Statements in the migration.
        total: usize,
        /// The statement.
        statement: String,
        /// The database's error.
        error: String,
    },
}

impl EngineError {
    /// True for refusals that mean "the binary and the database disagree", as opposed to a
    /// failure while running. The CLI exits with a distinct status for these.
    pub fn is_verification(&self) -> bool {
        matches!(
            self,
            Self::ChecksumMismatch { .. }
                | Self::PartialEdited { .. }
                | Self::ReverseEdited { .. }
                | Self::UnknownVersions(_)
                | Self::UnknownTarget(_)
        )
    }
}

pub(super) fn db_err(doing: impl Into<String>) -> impl FnOnce(sqlx::Error) -> EngineError {
    let doing = doing.into();
    move |source| EngineError::Database { doing, source }
}

impl fleetsync_common::sql::Retryable for EngineError {
    /// A deadlock or serialisation failure: running the migration again is the cure.
    fn is_conflict(&self) -> bool {
        matches!(self, Self::Database { source, .. } if source.is_conflict())
    }
}
