//! What the database's catalog says exists: tables, columns and indexes, per backend. The engine
//! asks it whether a non-transactional statement already took effect, and whether its own
//! tables are there yet.

use fleetsync_common::{
    Backend,
    sql::{Conn, Value, table_exists_sql},
};

/// True if a table of this name exists in the current schema.
pub(crate) async fn table_exists(conn: &mut Conn, table: &str) -> Result<bool, sqlx::Error> {
    let sql = table_exists_sql(conn.backend());
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
