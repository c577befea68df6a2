//! The history table (`fleetsync_schema_history`): its rows as `History`, read over the
//! engine's dedicated connection (`common::sql::Conn`, detached from the pool: if the process
//! or the task dies, closing it releases the lock and rolls back an open transaction), and the
//! DDL of the engine's own tables (the history, the way down of migrations rolled back, the
//! outbox, and the applied migrations that stop agents built before them).

use fleetsync_common::{Backend, model::SCHEMA_BREAKS_TABLE, sql::Value};

pub(crate) use fleetsync_common::sql::Conn;

use crate::{
    catalog::table_exists,
    model::{RollbackState, Scopes, State},
    outbox::OUTBOX_TABLE,
};

fleetsync_common::stored_row! {
    /// What the history table records of one migration (a row of `fleetsync_schema_history`).
    pub struct History {
        /// The migration's version.
        pub version: i64,
        /// The migration's name when it was recorded.
        pub name: String,
        /// Checksum at the time it was applied.
        pub checksum: String,
        /// Applied, partial or failed (never pending: a pending migration has no row).
        pub state: State,
        /// Statements done.
        pub statements_applied: i64,
        /// Statements in it then.
        pub statements_total: i64,
        /// SHA-256 of the statements done, for resuming a journaled migration.
        pub prefix_checksum: Option<String>,
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
        /// What it asked the agent to re-sync.
        pub resync: Scopes,
    }
}

/// The history table, the engine's own.
pub(crate) const HISTORY_TABLE: &str = fleetsync_common::model::SCHEMA_HISTORY_TABLE;

/// Every history row, by version. Empty if the table does not exist yet.
pub(crate) async fn history(conn: &mut Conn) -> Result<Vec<History>, sqlx::Error> {
    if !table_exists(conn, HISTORY_TABLE).await? {
        return Ok(Vec::new());
    }
    history_where(conn, "", &[]).await
}

/// The history row of one version.
pub(crate) async fn history_row(
    conn: &mut Conn,
    version: i64,
) -> Result<Option<History>, sqlx::Error> {
    Ok(
        history_where(conn, "WHERE version = ?", &[Value::Int(version)])
            .await?
            .pop(),
    )
}

async fn history_where(
    conn: &mut Conn,
    filter: &str,
    args: &[Value],
) -> Result<Vec<History>, sqlx::Error> {
    let sql = format!(
        "SELECT {} FROM {HISTORY_TABLE} {filter} ORDER BY version",
        History::COLUMNS
    );
    conn.fetch(&sql, args)
        .await?
        .iter()
        .map(History::try_from)
        .collect()
}

fleetsync_common::stored_row! {
    /// The way down of one migration (a row of `fleetsync_schema_rollbacks`): who rolled it
    /// back, when, from which version to which, and, while it runs on MySQL, its journal.
    pub struct Rollback {
        /// `RUN:VERSION` of the run that started it.
        pub id: String,
        /// The migration rolled back.
        pub version: i64,
        /// Its name.
        pub name: String,
        /// Under way or done.
        pub state: RollbackState,
        /// Statements of the reverse done (the journal of a journaled reverse).
        pub statements_done: i64,
        /// Statements in the reverse.
        pub statements_total: i64,
        /// SHA-256 of the reverse's statements done, for resuming it.
        pub prefix_checksum: Option<String>,
        /// The version the database was at when the run started.
        pub from_version: i64,
        /// The version the run was asked to go to (0: before every migration).
        pub to_version: i64,
        /// When it started (ms since epoch).
        pub started_at: i64,
        /// When it was done.
        pub finished_at: Option<i64>,
        /// `user@host` of the process that ran it.
        pub rolled_back_by: String,
        /// Id of the run that last worked on it.
        pub run_id: String,
        /// Error of the last attempt that failed.
        pub error: Option<String>,
        /// The migration's sync request withdrawn with it (no agent had taken it yet).
        pub withdrawn_request: Option<String>,
    }
}

/// The table of migrations rolled back, the engine's own.
pub(crate) const ROLLBACKS_TABLE: &str = "fleetsync_schema_rollbacks";

/// Every way down recorded, oldest first. Empty if the table does not exist yet (a database
/// last migrated by a release without roll-back).
pub(crate) async fn rollbacks(conn: &mut Conn) -> Result<Vec<Rollback>, sqlx::Error> {
    if !table_exists(conn, ROLLBACKS_TABLE).await? {
        return Ok(Vec::new());
    }
    rollbacks_where(conn, "", &[]).await
}

/// The way down under way or interrupted, if any (there is at most one: the lock runs one
/// `migrate` at a time, and each finishes an interrupted one first).
pub(crate) async fn open_rollback(conn: &mut Conn) -> Result<Option<Rollback>, sqlx::Error> {
    if !table_exists(conn, ROLLBACKS_TABLE).await? {
        return Ok(None);
    }
    Ok(rollbacks_where(
        conn,
        "WHERE state = ?",
        &[RollbackState::Reverting.as_str().into()],
    )
    .await?
    .pop())
}

async fn rollbacks_where(
    conn: &mut Conn,
    filter: &str,
    args: &[Value],
) -> Result<Vec<Rollback>, sqlx::Error> {
    let sql = format!(
        "SELECT {} FROM {ROLLBACKS_TABLE} {filter} ORDER BY started_at, version DESC",
        Rollback::COLUMNS
    );
    conn.fetch(&sql, args)
        .await?
        .iter()
        .map(Rollback::try_from)
        .collect()
}

/// DDL of the engine's own tables, per backend. Idempotent.
pub(crate) fn bootstrap_sql(backend: Backend) -> [String; 4] {
    let (text, key, big) = match backend {
        Backend::Sqlite | Backend::Postgres => ("TEXT", "TEXT", "BIGINT"),
        Backend::MySql => ("LONGTEXT", "VARCHAR(191)", "BIGINT"),
    };
    let suffix = match backend {
        Backend::MySql => " ENGINE=InnoDB DEFAULT CHARSET=utf8mb4 COLLATE=utf8mb4_bin",
        _ => "",
    };
    [
        format!(
            "CREATE TABLE IF NOT EXISTS {HISTORY_TABLE} (\
             version {big} NOT NULL PRIMARY KEY, \
             name {key} NOT NULL, \
             checksum {key} NOT NULL, \
             state {key} NOT NULL, \
             statements_applied {big} NOT NULL, \
             statements_total {big} NOT NULL, \
             prefix_checksum {key}, \
             started_at {big}, \
             finished_at {big}, \
             duration_ms {big}, \
             installed_by {key} NOT NULL, \
             run_id {key} NOT NULL, \
             error {text}, \
             failing_statement {text}, \
             resync {key} NOT NULL)\
             {suffix}"
        ),
        format!(
            "CREATE TABLE IF NOT EXISTS {ROLLBACKS_TABLE} (\
             id {key} NOT NULL PRIMARY KEY, \
             version {big} NOT NULL, \
             name {key} NOT NULL, \
             state {key} NOT NULL, \
             statements_done {big} NOT NULL, \
             statements_total {big} NOT NULL, \
             prefix_checksum {key}, \
             from_version {big} NOT NULL, \
             to_version {big} NOT NULL, \
             started_at {big} NOT NULL, \
             finished_at {big}, \
             rolled_back_by {key} NOT NULL, \
             run_id {key} NOT NULL, \
             error {text}, \
             withdrawn_request {key})\
             {suffix}"
        ),
        format!(
            "CREATE TABLE IF NOT EXISTS {OUTBOX_TABLE} (\
             id {key} NOT NULL PRIMARY KEY, \
             origin {key} NOT NULL, \
             migration_version {big}, \
             scopes {key} NOT NULL, \
             reason {text} NOT NULL, \
             state {key} NOT NULL, \
             job_id {key}, \
             created_at {big} NOT NULL, \
             dispatched_at {big}, \
             last_error {text})\
             {suffix}"
        ),
        format!(
            "CREATE TABLE IF NOT EXISTS {SCHEMA_BREAKS_TABLE} (\
             version {big} NOT NULL PRIMARY KEY, \
             name {key} NOT NULL, \
             applied_at {big} NOT NULL)\
             {suffix}"
        ),
    ]
}
