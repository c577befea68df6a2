//! Portable SQL over the three backends: `?` placeholders (rewritten to `$n` for PostgreSQL),
//! bind values, rows of plain values, and transactions. fleetsync's tables use only integers
//! (`BIGINT`) and text, so two value kinds cover every column.

use sqlx::{
    AssertSqlSafe, Column as _, MySql, Postgres, Row as _, Sqlite, Transaction, TypeInfo,
    mysql::MySqlRow, postgres::PgRow, sqlite::SqliteRow,
};

use crate::{
    Backend, Db,
    pool::{acquire, timed},
};

mod chunked;
mod row;

pub use chunked::{IDS, IN_CHUNK, in_list};
pub use row::{Column, FromColumns, Row};

/// A value bound to a placeholder or read from a column.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Value {
    /// SQL NULL, bound as an integer (PostgreSQL types every parameter, NULL included).
    Null,
    /// SQL NULL, bound as text.
    NullText,
    /// An integer.
    Int(i64),
    /// UTF-8 text.
    Text(String),
}

impl From<i64> for Value {
    fn from(v: i64) -> Self {
        Self::Int(v)
    }
}

impl From<u32> for Value {
    fn from(v: u32) -> Self {
        Self::Int(i64::from(v))
    }
}

impl From<bool> for Value {
    fn from(v: bool) -> Self {
        Self::Int(i64::from(v))
    }
}

impl From<&str> for Value {
    fn from(v: &str) -> Self {
        Self::Text(v.to_owned())
    }
}

impl From<String> for Value {
    fn from(v: String) -> Self {
        Self::Text(v)
    }
}

impl From<&String> for Value {
    fn from(v: &String) -> Self {
        Self::Text(v.clone())
    }
}

impl From<Option<i64>> for Value {
    fn from(v: Option<i64>) -> Self {
        v.map_or(Self::Null, Self::Int)
    }
}

impl From<Option<String>> for Value {
    fn from(v: Option<String>) -> Self {
        v.map_or(Self::NullText, Self::Text)
    }
}

impl From<Option<&str>> for Value {
    fn from(v: Option<&str>) -> Self {
        v.map_or(Self::NullText, |t| Self::Text(t.to_owned()))
    }
}

/// `?` placeholders as the backend wants them: `$1`, `$2`, ... on PostgreSQL. Statements given
/// here must not contain `?` inside string literals.
pub fn placeholders(backend: Backend, sql: &str) -> String {
    if backend != Backend::Postgres {
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

/// A count of the tables named by its one parameter in the current schema: above 0 if the
/// table exists (the migrator asks before its own tables are made, the agent about the
/// migrator's).
pub fn table_exists_sql(backend: Backend) -> &'static str {
    match backend {
        Backend::Sqlite => "SELECT COUNT(*) FROM sqlite_master WHERE type = 'table' AND name = ?",
        Backend::Postgres => {
            "SELECT COUNT(*) FROM information_schema.tables \
             WHERE table_schema = current_schema() AND table_name = ?"
        }
        Backend::MySql => {
            "SELECT COUNT(*) FROM information_schema.tables \
             WHERE table_schema = DATABASE() AND table_name = ?"
        }
    }
}

/// The SQL expression for "now" in milliseconds since the Unix epoch, by the database's clock
/// (so that agents on several machines agree on lease expiry).
pub fn now_ms_sql(backend: Backend) -> &'static str {
    match backend {
        Backend::Sqlite => "CAST((julianday('now') - 2440587.5) * 86400000 AS INTEGER)",
        Backend::Postgres => "CAST(EXTRACT(EPOCH FROM clock_timestamp()) * 1000 AS BIGINT)",
        Backend::MySql => "CAST(UNIX_TIMESTAMP(NOW(3)) * 1000 AS SIGNED)",
    }
}

/// What a failed statement means for whoever runs it again.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Failure {
    /// The database chose this transaction as a victim of concurrency (deadlock, serialisation
    /// failure, lock wait timeout, SQLite busy): running it again at once is the cure.
    Conflict,
    /// The database is out of reach (pool timeout, connection lost): retry later.
    Unavailable,
    /// Anything else: the same statement with the same data fails the same way.
    Permanent,
}

/// Classifies a database error (PostgreSQL 40001/40P01/55P03, MySQL 1213/1205, SQLite
/// BUSY/LOCKED are conflicts; a cancelled statement, PostgreSQL 57014 and MySQL 1317/1969/3024,
/// is transient like a lost connection, never permanent, and so are "too many clients",
/// PostgreSQL 53300 and MySQL 1040).
pub fn classify(err: &sqlx::Error) -> Failure {
    match err {
        sqlx::Error::PoolTimedOut
        | sqlx::Error::PoolClosed
        | sqlx::Error::Io(_)
        | sqlx::Error::Tls(_)
        | sqlx::Error::WorkerCrashed => Failure::Unavailable,
        sqlx::Error::Database(db) => {
            if let Some(my) = db.try_downcast_ref::<sqlx::mysql::MySqlDatabaseError>() {
                return match my.number() {
                    1213 | 1205 => Failure::Conflict,
                    // Statement cut short: interrupted, MariaDB's max_statement_time, MySQL's
                    // max_execution_time. The same statement may well pass next time.
                    1317 | 1969 | 3024 => Failure::Unavailable,
                    // Server gone / lost / shutting down / too many connections.
                    2006 | 2013 | 1053 | 1040 => Failure::Unavailable,
                    _ => Failure::Permanent,
                };
            }
            match db.code().as_deref() {
                Some("40001" | "40P01" | "55P03") => Failure::Conflict,
                // query_canceled: statement_timeout, or cancelled by an operator.
                Some("57014") => Failure::Unavailable,
                // SQLite: BUSY, LOCKED and their extended codes.
                Some("5" | "6" | "261" | "262" | "517") => Failure::Conflict,
                // Connection exceptions, shutdowns, and insufficient resources (53300: too
                // many clients already; 53100: disk full) pass, or are worth waiting out.
                Some(code)
                    if code.starts_with("08")
                        || code.starts_with("57P")
                        || code.starts_with("53") =>
                {
                    Failure::Unavailable
                }
                _ => Failure::Permanent,
            }
        }
        _ => Failure::Permanent,
    }
}

/// True if the error is a lock wait that ran out (PostgreSQL 55P03 `lock_timeout`, MySQL 1205
/// `innodb_lock_wait_timeout`): another session held a lock for long. A conflict like the
/// others, but one its caller may want to handle itself (the completer renews its leases
/// before it tries again).
pub fn is_lock_timeout(err: &sqlx::Error) -> bool {
    let sqlx::Error::Database(db) = err else {
        return false;
    };
    if let Some(my) = db.try_downcast_ref::<sqlx::mysql::MySqlDatabaseError>() {
        return my.number() == 1205;
    }
    db.code().as_deref() == Some("55P03")
}

/// True if the error is a unique-key violation (a concurrent twin inserted the same key).
pub fn is_unique_violation(err: &sqlx::Error) -> bool {
    matches!(err, sqlx::Error::Database(db) if db.is_unique_violation())
}

/// Errors that can say whether running the same transaction again may succeed.
pub trait Retryable {
    /// True for a concurrency conflict (deadlock, serialisation failure, busy).
    fn is_conflict(&self) -> bool;
}

impl Retryable for sqlx::Error {
    fn is_conflict(&self) -> bool {
        classify(self) == Failure::Conflict
    }
}

impl Retryable for crate::ServiceError {
    fn is_conflict(&self) -> bool {
        matches!(self, Self::Aborted(_))
    }
}

/// How many times a transaction is tried before its conflict reaches the caller.
pub const MAX_ATTEMPTS: u32 = 12;

/// Runs `attempt` (one whole transaction) until it ends without a concurrency conflict, at
/// most [`MAX_ATTEMPTS`] times, with a growing jittered pause between tries. Deadlocks and
/// serialisation failures are normal under concurrency; callers never see them unless the
/// conflict persists.
pub async fn retry<T, E, F, Fut>(what: &'static str, mut attempt: F) -> Result<T, E>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, E>>,
    E: Retryable + std::fmt::Display,
{
    let mut pause = std::time::Duration::from_millis(2);
    let mut tries = 1;
    loop {
        match attempt().await {
            Err(err) if tries < MAX_ATTEMPTS && err.is_conflict() => {
                tracing::debug!(what, tries, error = %err, "transaction conflict; trying again");
                tokio::time::sleep(crate::clock::jitter(pause, 0.5)).await;
                pause = (pause * 2).min(std::time::Duration::from_millis(250));
                tries += 1;
            }
            other => return other,
        }
    }
}

macro_rules! bind_values {
    ($query:expr, $args:expr) => {{
        let mut query = $query;
        for arg in $args {
            query = match arg {
                Value::Null => query.bind(None::<i64>),
                Value::NullText => query.bind(None::<String>),
                Value::Int(v) => query.bind(*v),
                Value::Text(v) => query.bind(v.clone()),
            };
        }
        query
    }};
}

macro_rules! decode_row {
    ($row:expr) => {{
        let row = $row;
        let mut values = Vec::with_capacity(row.columns().len());
        for (i, column) in row.columns().iter().enumerate() {
            let value = if let Ok(v) = row.try_get::<Option<i64>, _>(i) {
                v.map_or(Value::Null, Value::Int)
            } else if let Ok(v) = row.try_get::<Option<String>, _>(i) {
                v.map_or(Value::Null, Value::Text)
            } else if let Ok(v) = row.try_get::<Option<Vec<u8>>, _>(i) {
                v.map_or(Value::Null, |b| {
                    Value::Text(String::from_utf8_lossy(&b).into_owned())
                })
            } else {
                return Err(sqlx::Error::ColumnDecode {
                    index: column.name().to_owned(),
                    source: format!("unsupported column type {}", column.type_info().name()).into(),
                });
            };
            values.push(value);
        }
        Row(values)
    }};
}

fn sqlite_row(row: &SqliteRow) -> Result<Row, sqlx::Error> {
    Ok(decode_row!(row))
}

fn pg_row(row: &PgRow) -> Result<Row, sqlx::Error> {
    Ok(decode_row!(row))
}

fn mysql_row(row: &MySqlRow) -> Result<Row, sqlx::Error> {
    Ok(decode_row!(row))
}

/// Runs one statement with `?` placeholders on an executor of the given database type.
macro_rules! dispatch {
    ($backend:expr, $sql:expr, $args:expr, $exec:expr, execute) => {{
        let started = std::time::Instant::now();
        let sql = AssertSqlSafe(placeholders($backend, $sql));
        let result = bind_values!(sqlx::query(sql), $args)
            .execute($exec)
            .await
            .map(|r| r.rows_affected());
        slow($sql, $args.len(), started);
        result
    }};
    ($backend:expr, $sql:expr, $args:expr, $exec:expr, fetch, $decode:ident) => {{
        let started = std::time::Instant::now();
        let sql = AssertSqlSafe(placeholders($backend, $sql));
        let rows = bind_values!(sqlx::query(sql), $args).fetch_all($exec).await;
        slow($sql, $args.len(), started);
        rows?
            .iter()
            .map($decode)
            .collect::<Result<Vec<Row>, sqlx::Error>>()
    }};
}

/// Statements slower than this are logged at debug level, with their first words.
const SLOW_STATEMENT: std::time::Duration = std::time::Duration::from_millis(25);

fn slow(sql: &str, binds: usize, started: std::time::Instant) {
    let took = started.elapsed();
    if took >= SLOW_STATEMENT {
        let head: String = sql.chars().take(72).collect();
        tracing::debug!(took_ms = took.as_millis() as u64, binds, sql = %head, "slow statement");
    }
}

impl Db {
    /// Runs a statement; returns the rows it affected.
    pub async fn execute(&self, sql: &str, args: &[Value]) -> Result<u64, sqlx::Error> {
        let backend = self.backend();
        match self {
            Self::Sqlite(pool) => {
                let mut conn = acquire(pool).await?;
                dispatch!(backend, sql, args, &mut *conn, execute)
            }
            Self::Postgres(pool) => {
                let mut conn = acquire(pool).await?;
                dispatch!(backend, sql, args, &mut *conn, execute)
            }
            Self::MySql(pool) => {
                let mut conn = acquire(pool).await?;
                dispatch!(backend, sql, args, &mut *conn, execute)
            }
        }
    }

    /// Runs a query; returns its rows.
    pub async fn fetch(&self, sql: &str, args: &[Value]) -> Result<Vec<Row>, sqlx::Error> {
        let backend = self.backend();
        match self {
            Self::Sqlite(pool) => {
                let mut conn = acquire(pool).await?;
                dispatch!(backend, sql, args, &mut *conn, fetch, sqlite_row)
            }
            Self::Postgres(pool) => {
                let mut conn = acquire(pool).await?;
                dispatch!(backend, sql, args, &mut *conn, fetch, pg_row)
            }
            Self::MySql(pool) => {
                let mut conn = acquire(pool).await?;
                dispatch!(backend, sql, args, &mut *conn, fetch, mysql_row)
            }
        }
    }

    /// Runs a query; returns its first row, if any.
    pub async fn fetch_optional(
        &self,
        sql: &str,
        args: &[Value],
    ) -> Result<Option<Row>, sqlx::Error> {
        Ok(self.fetch(sql, args).await?.into_iter().next())
    }

    /// Starts a transaction (SQLite: `BEGIN IMMEDIATE`, so that it holds the write lock from
    /// the start and never fails to upgrade later). Dropping it rolls back.
    pub async fn begin(&self) -> Result<Tx, sqlx::Error> {
        Ok(match self {
            Self::Sqlite(pool) => {
                Tx::Sqlite(timed(pool, pool.begin_with("BEGIN IMMEDIATE")).await?)
            }
            Self::Postgres(pool) => Tx::Postgres(timed(pool, pool.begin()).await?),
            Self::MySql(pool) => Tx::MySql(timed(pool, pool.begin()).await?),
        })
    }
}

/// A transaction on one of the three backends. Dropping it without `commit` rolls back.
pub enum Tx {
    /// SQLite.
    Sqlite(Transaction<'static, Sqlite>),
    /// PostgreSQL.
    Postgres(Transaction<'static, Postgres>),
    /// MySQL or MariaDB.
    MySql(Transaction<'static, MySql>),
}

impl std::fmt::Debug for Tx {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_tuple("Tx").field(&self.backend()).finish()
    }
}

impl Tx {
    /// The backend.
    pub fn backend(&self) -> Backend {
        match self {
            Self::Sqlite(_) => Backend::Sqlite,
            Self::Postgres(_) => Backend::Postgres,
            Self::MySql(_) => Backend::MySql,
        }
    }

    /// Runs a statement; returns the rows it affected.
    pub async fn execute(&mut self, sql: &str, args: &[Value]) -> Result<u64, sqlx::Error> {
        let backend = self.backend();
        match self {
            Self::Sqlite(tx) => dispatch!(backend, sql, args, &mut **tx, execute),
            Self::Postgres(tx) => dispatch!(backend, sql, args, &mut **tx, execute),
            Self::MySql(tx) => dispatch!(backend, sql, args, &mut **tx, execute),
        }
    }

    /// Runs a query; returns its rows.
    pub async fn fetch(&mut self, sql: &str, args: &[Value]) -> Result<Vec<Row>, sqlx::Error> {
        let backend = self.backend();
        match self {
            Self::Sqlite(tx) => dispatch!(backend, sql, args, &mut **tx, fetch, sqlite_row),
            Self::Postgres(tx) => dispatch!(backend, sql, args, &mut **tx, fetch, pg_row),
            Self::MySql(tx) => dispatch!(backend, sql, args, &mut **tx, fetch, mysql_row),
        }
    }

    /// Runs a query; returns its first row, if any.
    pub async fn fetch_optional(
        &mut self,
        sql: &str,
        args: &[Value],
    ) -> Result<Option<Row>, sqlx::Error> {
        Ok(self.fetch(sql, args).await?.into_iter().next())
    }

    /// Commits the transaction (dropping it instead rolls back).
    /// Rolls back now (dropping a transaction rolls it back only when its connection is next
    /// used: its locks would outlive it meanwhile).
    pub async fn rollback(self) -> Result<(), sqlx::Error> {
        match self {
            Self::Sqlite(tx) => tx.rollback().await,
            Self::Postgres(tx) => tx.rollback().await,
            Self::MySql(tx) => tx.rollback().await,
        }
    }

    /// Commits.
    pub async fn commit(self) -> Result<(), sqlx::Error> {
        match self {
            Self::Sqlite(tx) => tx.commit().await,
            Self::Postgres(tx) => tx.commit().await,
            Self::MySql(tx) => tx.commit().await,
        }
    }
}

/// A dedicated connection, taken from the pool and detached from it: session state (an
/// advisory lock, a transaction begun by hand) lives exactly as long as it, and closing or
/// dropping it releases that state on the server.
pub enum Conn {
    /// SQLite.
    Sqlite(sqlx::SqliteConnection),
    /// PostgreSQL.
    Postgres(sqlx::PgConnection),
    /// MySQL or MariaDB.
    MySql(sqlx::MySqlConnection),
}

impl std::fmt::Debug for Conn {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_tuple("Conn").field(&self.backend()).finish()
    }
}

impl Conn {
    /// Opens a connection of its own.
    pub async fn open(db: &Db) -> Result<Self, sqlx::Error> {
        Ok(match db {
            Db::Sqlite(pool) => Self::Sqlite(pool.acquire().await?.detach()),
            Db::Postgres(pool) => Self::Postgres(pool.acquire().await?.detach()),
            Db::MySql(pool) => Self::MySql(pool.acquire().await?.detach()),
        })
    }

    /// The backend.
    pub fn backend(&self) -> Backend {
        match self {
            Self::Sqlite(_) => Backend::Sqlite,
            Self::Postgres(_) => Backend::Postgres,
            Self::MySql(_) => Backend::MySql,
        }
    }

    /// Runs SQL text as is, with the simple protocol (DDL, `BEGIN`, `COMMIT`).
    pub async fn raw(&mut self, sql: &str) -> Result<(), sqlx::Error> {
        let sql = AssertSqlSafe(sql.to_owned());
        match self {
            Self::Sqlite(c) => sqlx::raw_sql(sql).execute(c).await.map(drop),
            Self::Postgres(c) => sqlx::raw_sql(sql).execute(c).await.map(drop),
            Self::MySql(c) => sqlx::raw_sql(sql).execute(c).await.map(drop),
        }
    }

    /// Runs a statement; returns the rows it affected.
    pub async fn execute(&mut self, sql: &str, args: &[Value]) -> Result<u64, sqlx::Error> {
        let backend = self.backend();
        match self {
            Self::Sqlite(c) => dispatch!(backend, sql, args, &mut *c, execute),
            Self::Postgres(c) => dispatch!(backend, sql, args, &mut *c, execute),
            Self::MySql(c) => dispatch!(backend, sql, args, &mut *c, execute),
        }
    }

    /// Runs a query; returns its rows.
    pub async fn fetch(&mut self, sql: &str, args: &[Value]) -> Result<Vec<Row>, sqlx::Error> {
        let backend = self.backend();
        match self {
            Self::Sqlite(c) => dispatch!(backend, sql, args, &mut *c, fetch, sqlite_row),
            Self::Postgres(c) => dispatch!(backend, sql, args, &mut *c, fetch, pg_row),
            Self::MySql(c) => dispatch!(backend, sql, args, &mut *c, fetch, mysql_row),
        }
    }

    /// Runs a query that returns one integer (a count, a lock result); NULL is `None`.
    pub async fn scalar(&mut self, sql: &str, args: &[Value]) -> Result<Option<i64>, sqlx::Error> {
        match self.fetch(sql, args).await?.first() {
            Some(row) => row.opt_int(0),
            None => Ok(None),
        }
    }

    /// Closes the connection.
    pub async fn close(self) {
        use sqlx::Connection;
        let _ = match self {
            Self::Sqlite(c) => c.close().await,
            Self::Postgres(c) => c.close().await,
            Self::MySql(c) => c.close().await,
        };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rewrites_placeholders_for_postgres_only() {
        let sql = "SELECT a FROM t WHERE b = ? AND c IN (?, ?)";
        assert_eq!(placeholders(Backend::Sqlite, sql), sql);
        assert_eq!(placeholders(Backend::MySql, sql), sql);
        assert_eq!(
            placeholders(Backend::Postgres, sql),
            "SELECT a FROM t WHERE b = $1 AND c IN ($2, $3)"
        );
    }

    #[test]
    fn rows_decode_by_kind() {
        let row = Row(vec![Value::Int(7), Value::Null, Value::Text("x".into())]);
        assert_eq!(row.int(0).unwrap(), 7);
        assert_eq!(row.opt_int(1).unwrap(), None);
        assert_eq!(row.opt_text(1).unwrap(), None);
        assert_eq!(row.text(2).unwrap(), "x");
        assert!(row.int(2).is_err());
        assert!(row.text(3).is_err());
        assert_eq!(Value::from(Some(3_i64)), Value::Int(3));
        assert_eq!(Value::from(None::<String>), Value::NullText);
        assert_eq!(Value::from(None::<i64>), Value::Null);
    }
}
