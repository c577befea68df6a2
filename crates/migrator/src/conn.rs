//! The engine's reads over its dedicated connection (`common::sql::Conn`, detached from the
//! pool: if the process or the task dies, closing it releases the lock and rolls back an open
//! transaction): history, outbox and catalog checks, and the DDL of the engine's own tables.

use fleetsync_common::{
    Backend,
    sql::{Row, Value},
};

pub(crate) use fleetsync_common::sql::Conn;

/// A row of `fleetsync_schema_history`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct HistoryRow {
    pub version: i64,
    pub name: String,
    pub checksum: String,
    pub state: String,
    pub statements_applied: i64,
    pub statements_total: i64,
    pub prefix_checksum: Option<String>,
    pub started_at: Option<i64>,
    pub finished_at: Option<i64>,
    pub duration_ms: Option<i64>,
    pub installed_by: String,
    pub run_id: String,
    pub error: Option<String>,
    pub failing_statement: Option<String>,
    pub resync: String,
}

const HISTORY_COLUMNS: &str = "version, name, checksum, state, statements_applied, \
    statements_total, prefix_checksum, started_at, finished_at, duration_ms, installed_by, run_id, \
    error, failing_statement, resync";

impl TryFrom<&Row> for HistoryRow {
    type Error = sqlx::Error;

    fn try_from(r: &Row) -> Result<Self, sqlx::Error> {
        Ok(Self {
            version: r.int(0)?,
            name: r.text(1)?,
            checksum: r.text(2)?,
            state: r.text(3)?,
            statements_applied: r.int(4)?,
            statements_total: r.int(5)?,
            prefix_checksum: r.opt_text(6)?,
            started_at: r.opt_int(7)?,
            finished_at: r.opt_int(8)?,
            duration_ms: r.opt_int(9)?,
            installed_by: r.text(10)?,
            run_id: r.text(11)?,
            error: r.opt_text(12)?,
            failing_statement: r.opt_text(13)?,
            resync: r.text(14)?,
        })
    }
}

/// The history table, the engine's own.
pub(crate) const HISTORY_TABLE: &str = "fleetsync_schema_history";
/// The outbox of sync requests, the engine's own: it must exist before any migration that
/// records a request runs.
pub(crate) const OUTBOX_TABLE: &str = "sync_requests";

/// Every history row, by version. Empty if the table does not exist yet.
pub(crate) async fn history(conn: &mut Conn) -> Result<Vec<HistoryRow>, sqlx::Error> {
    if !table_exists(conn, HISTORY_TABLE).await? {
        return Ok(Vec::new());
    }
    history_where(conn, "", &[]).await
}

/// The history row of one version.
pub(crate) async fn history_row(
    conn: &mut Conn,
    version: i64,
) -> Result<Option<HistoryRow>, sqlx::Error> {
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
) -> Result<Vec<HistoryRow>, sqlx::Error> {
    let sql = format!("SELECT {HISTORY_COLUMNS} FROM {HISTORY_TABLE} {filter} ORDER BY version");
    conn.fetch(&sql, args)
        .await?
        .iter()
        .map(HistoryRow::try_from)
        .collect()
}

/// Pending outbox requests as (id, scopes, reason), oldest first.
pub(crate) async fn pending_requests(
    conn: &mut Conn,
) -> Result<Vec<(String, String, String)>, sqlx::Error> {
    let sql = format!(
        "SELECT id, scopes, reason FROM {OUTBOX_TABLE} WHERE state = 'pending' \
         ORDER BY created_at, id"
    );
    conn.fetch(&sql, &[])
        .await?
        .iter()
        .map(|r| Ok((r.text(0)?, r.text(1)?, r.text(2)?)))
        .collect()
}

/// True if a table of this name exists in the current schema.
pub(crate) async fn table_exists(conn: &mut Conn, table: &str) -> Result<bool, sqlx::Error> {
    let sql = match conn.backend() {
        Backend::Sqlite => "SELECT COUNT(*) FROM sqlite_master WHERE type = 'table' AND name = ?",
        Backend::Postgres => {
            "SELECT COUNT(*) FROM information_schema.tables \
             WHERE table_schema = current_schema() AND table_name = ?"
        }
        Backend::MySql => {
            "SELECT COUNT(*) FROM information_schema.tables \
             WHERE table_schema = DATABASE() AND table_name = ?"
        }
    };
    Ok(conn.scalar(sql, &[table.into()]).await? > Some(0))
}

/// True if `table` has a column `column`.
pub(crate) async fn column_exists(
    conn: &mut Conn,
    table: &str,
    column: &str,
) -> Result<bool, sqlx::Error> {
    let sql = match conn.backend() {
        Backend::Sqlite => "SELECT COUNT(*) FROM pragma_table_info(?) WHERE name = ?",
        Backend::Postgres => {
            "SELECT COUNT(*) FROM information_schema.columns \
             WHERE table_schema = current_schema() AND table_name = ? AND column_name = ?"
        }
        Backend::MySql => {
            "SELECT COUNT(*) FROM information_schema.columns \
             WHERE table_schema = DATABASE() AND table_name = ? AND column_name = ?"
        }
    };
    Ok(conn.scalar(sql, &[table.into(), column.into()]).await? > Some(0))
}

/// True if an index of this name exists (on `table`, for MySQL where names are per table).
pub(crate) async fn index_exists(
    conn: &mut Conn,
    table: &str,
    index: &str,
) -> Result<bool, sqlx::Error> {
    let (sql, args): (&str, Vec<Value>) = match conn.backend() {
        Backend::Sqlite => (
            "SELECT COUNT(*) FROM sqlite_master WHERE type = 'index' AND name = ?",
            vec![index.into()],
        ),
        Backend::Postgres => (
            "SELECT COUNT(*) FROM pg_indexes WHERE schemaname = current_schema() \
             AND indexname = ?",
            vec![index.into()],
        ),
        Backend::MySql => (
            "SELECT COUNT(*) FROM information_schema.statistics \
             WHERE table_schema = DATABASE() AND table_name = ? AND index_name = ?",
            vec![table.into(), index.into()],
        ),
    };
    Ok(conn.scalar(sql, &args).await? > Some(0))
}

/// DDL of the engine's own tables, per backend. Idempotent.
pub(crate) fn bootstrap_sql(backend: Backend) -> [String; 2] {
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
    ]
}
