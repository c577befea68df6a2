//! One dedicated connection to the control-plane database, whatever the backend: the engine's
//! lock, transactions and history live on it. It is detached from the pool, so if the process
//! or the task dies, closing it releases the lock and rolls back an open transaction.

use fleetsync_common::{Backend, Db};
use sqlx::{AssertSqlSafe, Connection, MySqlConnection, PgConnection, SqliteConnection};

/// A bind argument.
#[derive(Debug, Clone)]
pub(crate) enum Arg {
    I64(i64),
    OptI64(Option<i64>),
    Str(String),
    OptStr(Option<String>),
}

/// A dedicated connection.
pub(crate) enum Conn {
    Sqlite(SqliteConnection),
    Postgres(PgConnection),
    MySql(MySqlConnection),
}

/// Binds `args` to a query, whatever its database.
macro_rules! bind_all {
    ($query:expr, $args:expr) => {{
        let mut query = $query;
        for arg in $args {
            query = match arg {
                Arg::I64(v) => query.bind(v),
                Arg::OptI64(v) => query.bind(v),
                Arg::Str(v) => query.bind(v),
                Arg::OptStr(v) => query.bind(v),
            };
        }
        query
    }};
}

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

type HistoryTuple = (
    i64,
    String,
    String,
    String,
    i64,
    i64,
    Option<String>,
    Option<i64>,
    Option<i64>,
    Option<i64>,
    String,
    String,
    Option<String>,
    Option<String>,
    String,
);

const HISTORY_COLUMNS: &str = "version, name, checksum, state, statements_applied, \
    statements_total, prefix_checksum, started_at, finished_at, duration_ms, installed_by, run_id, \
    error, failing_statement, resync";

impl From<HistoryTuple> for HistoryRow {
    fn from(t: HistoryTuple) -> Self {
        Self {
            version: t.0,
            name: t.1,
            checksum: t.2,
            state: t.3,
            statements_applied: t.4,
            statements_total: t.5,
            prefix_checksum: t.6,
            started_at: t.7,
            finished_at: t.8,
            duration_ms: t.9,
            installed_by: t.10,
            run_id: t.11,
            error: t.12,
            failing_statement: t.13,
            resync: t.14,
        }
    }
}

/// The history table, the engine's own.
pub(crate) const HISTORY_TABLE: &str = "fleetsync_schema_history";
/// The outbox of sync requests, the engine's own: it must exist before any migration that
/// records a request runs.
pub(crate) const OUTBOX_TABLE: &str = "sync_requests";

impl Conn {
    /// Opens a connection of its own (taken from the pool and detached from it).
    pub async fn open(db: &Db) -> Result<Self, sqlx::Error> {
        Ok(match db {
            Db::Sqlite(pool) => Self::Sqlite(pool.acquire().await?.detach()),
            Db::Postgres(pool) => Self::Postgres(pool.acquire().await?.detach()),
            Db::MySql(pool) => Self::MySql(pool.acquire().await?.detach()),
        })
    }

    pub fn backend(&self) -> Backend {
        match self {
            Self::Sqlite(_) => Backend::Sqlite,
            Self::Postgres(_) => Backend::Postgres,
            Self::MySql(_) => Backend::MySql,
        }
    }

    /// Runs SQL text as is (simple protocol): migration statements, `BEGIN`, `COMMIT`.
    pub async fn raw(&mut self, sql: &str) -> Result<(), sqlx::Error> {
        let sql = AssertSqlSafe(sql.to_owned());
        match self {
            Self::Sqlite(c) => sqlx::raw_sql(sql).execute(c).await.map(drop),
            Self::Postgres(c) => sqlx::raw_sql(sql).execute(c).await.map(drop),
            Self::MySql(c) => sqlx::raw_sql(sql).execute(c).await.map(drop),
        }
    }

    /// Runs a statement with `?` placeholders and bind arguments; returns rows affected.
    pub async fn exec(&mut self, sql: &str, args: Vec<Arg>) -> Result<u64, sqlx::Error> {
        let sql = self.placeholders(sql);
        match self {
            Self::Sqlite(c) => bind_all!(sqlx::query(AssertSqlSafe(sql)), args)
                .execute(c)
                .await
                .map(|r| r.rows_affected()),
            Self::Postgres(c) => bind_all!(sqlx::query(AssertSqlSafe(sql)), args)
                .execute(c)
                .await
                .map(|r| r.rows_affected()),
            Self::MySql(c) => bind_all!(sqlx::query(AssertSqlSafe(sql)), args)
                .execute(c)
                .await
                .map(|r| r.rows_affected()),
        }
    }

    /// Runs a query that returns one integer (a count, a lock result). NULL is `None`.
    pub async fn scalar(&mut self, sql: &str, args: Vec<Arg>) -> Result<Option<i64>, sqlx::Error> {
        let sql = self.placeholders(sql);
        match self {
            Self::Sqlite(c) => {
                bind_all!(sqlx::query_scalar(AssertSqlSafe(sql)), args)
                    .fetch_one(c)
                    .await
            }
            Self::Postgres(c) => {
                bind_all!(sqlx::query_scalar(AssertSqlSafe(sql)), args)
                    .fetch_one(c)
                    .await
            }
            Self::MySql(c) => {
                bind_all!(sqlx::query_scalar(AssertSqlSafe(sql)), args)
                    .fetch_one(c)
                    .await
            }
        }
    }

    /// Pending outbox requests as (id, scopes, reason), oldest first.
    pub async fn pending_requests(&mut self) -> Result<Vec<(String, String, String)>, sqlx::Error> {
        let sql = AssertSqlSafe(format!(
            "SELECT id, scopes, reason FROM {OUTBOX_TABLE} WHERE state = 'pending' \
             ORDER BY created_at, id"
        ));
        match self {
            Self::Sqlite(c) => sqlx::query_as(sql).fetch_all(c).await,
            Self::Postgres(c) => sqlx::query_as(sql).fetch_all(c).await,
            Self::MySql(c) => sqlx::query_as(sql).fetch_all(c).await,
        }
    }

    /// Every history row, by version. Empty if the table does not exist yet.
    pub async fn history(&mut self) -> Result<Vec<HistoryRow>, sqlx::Error> {
        if !self.table_exists(HISTORY_TABLE).await? {
            return Ok(Vec::new());
        }
        self.history_where("", Vec::new()).await
    }

    /// The history row of one version.
    pub async fn history_row(&mut self, version: i64) -> Result<Option<HistoryRow>, sqlx::Error> {
        Ok(self
            .history_where("WHERE version = ?", vec![Arg::I64(version)])
            .await?
            .pop())
    }

    async fn history_where(
        &mut self,
        filter: &str,
        args: Vec<Arg>,
    ) -> Result<Vec<HistoryRow>, sqlx::Error> {
        let sql = self.placeholders(&format!(
            "SELECT {HISTORY_COLUMNS} FROM {HISTORY_TABLE} {filter} ORDER BY version"
        ));
        let rows: Vec<HistoryTuple> = match self {
            Self::Sqlite(c) => {
                bind_all!(sqlx::query_as(AssertSqlSafe(sql)), args)
                    .fetch_all(c)
                    .await?
            }
            Self::Postgres(c) => {
                bind_all!(sqlx::query_as(AssertSqlSafe(sql)), args)
                    .fetch_all(c)
                    .await?
            }
            Self::MySql(c) => {
                bind_all!(sqlx::query_as(AssertSqlSafe(sql)), args)
                    .fetch_all(c)
                    .await?
            }
        };
        Ok(rows.into_iter().map(HistoryRow::from).collect())
    }

    /// True if a table of this name exists in the current schema.
    pub async fn table_exists(&mut self, table: &str) -> Result<bool, sqlx::Error> {
        let sql = match self.backend() {
            Backend::Sqlite => {
                "SELECT COUNT(*) FROM sqlite_master WHERE type = 'table' AND name = ?"
            }
            Backend::Postgres => {
                "SELECT COUNT(*) FROM information_schema.tables \
                 WHERE table_schema = current_schema() AND table_name = ?"
            }
            Backend::MySql => {
                "SELECT COUNT(*) FROM information_schema.tables \
                 WHERE table_schema = DATABASE() AND table_name = ?"
            }
        };
        Ok(self.scalar(sql, vec![Arg::Str(table.to_owned())]).await? > Some(0))
    }

    /// True if `table` has a column `column`.
    pub async fn column_exists(&mut self, table: &str, column: &str) -> Result<bool, sqlx::Error> {
        let sql = match self.backend() {
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
        let args = vec![Arg::Str(table.to_owned()), Arg::Str(column.to_owned())];
        Ok(self.scalar(sql, args).await? > Some(0))
    }

    /// True if an index of this name exists (on `table`, for MySQL where names are per table).
    pub async fn index_exists(&mut self, table: &str, index: &str) -> Result<bool, sqlx::Error> {
        let (sql, args) = match self.backend() {
            Backend::Sqlite => (
                "SELECT COUNT(*) FROM sqlite_master WHERE type = 'index' AND name = ?",
                vec![Arg::Str(index.to_owned())],
            ),
            Backend::Postgres => (
                "SELECT COUNT(*) FROM pg_indexes WHERE schemaname = current_schema() \
                 AND indexname = ?",
                vec![Arg::Str(index.to_owned())],
            ),
            Backend::MySql => (
                "SELECT COUNT(*) FROM information_schema.statistics \
                 WHERE table_schema = DATABASE() AND table_name = ? AND index_name = ?",
                vec![Arg::Str(table.to_owned()), Arg::Str(index.to_owned())],
            ),
        };
        Ok(self.scalar(sql, args).await? > Some(0))
    }

    /// `?` placeholders as the backend wants them (`$1`, `$2`, ... on PostgreSQL).
    fn placeholders(&self, sql: &str) -> String {
        if self.backend() != Backend::Postgres {
            return sql.to_owned();
        }
        let mut out = String::with_capacity(sql.len() + 8);
        let mut n = 0;
        for c in sql.chars() {
            if c == '?' {
                n += 1;
                out.push('$');
                out.push_str(&n.to_string());
            } else {
                out.push(c);
            }
        }
        out
    }

    /// Closes the connection (releasing any session lock it holds).
    pub async fn close(self) {
        let _ = match self {
            Self::Sqlite(c) => c.close().await,
            Self::Postgres(c) => c.close().await,
            Self::MySql(c) => c.close().await,
        };
    }
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
