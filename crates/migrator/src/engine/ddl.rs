//! Asking the catalog whether a DDL statement already ran (a journaled migration or reverse
//! resumed after a crash, where the journal may lag one statement behind), and what a reverse
//! would destroy: a small tokenizer of what each statement creates, alters or drops.

use super::{EngineError, db_err};
use crate::{catalog, history::Conn};

/// Whether a statement's effect is already in the catalog: `CREATE TABLE t`, `CREATE [UNIQUE]
/// INDEX i ON t`, `ALTER TABLE t ADD [COLUMN] c` (the thing exists), `DROP INDEX i ON t`,
/// `DROP TABLE t`, `ALTER TABLE t DROP [COLUMN] c` (it does not). Other statements are run
/// again (migrations that cannot commit atomically must keep such statements idempotent).
pub(super) async fn already_applied(conn: &mut Conn, statement: &str) -> Result<bool, EngineError> {
    let Some(effect) = Effect::of(statement) else {
        return Ok(false);
    };
    let result = match &effect {
        Effect::Table(table) => catalog::table_exists(conn, table).await,
        Effect::Column(table, column) => catalog::column_exists(conn, table, column).await,
        Effect::Index(table, index) => catalog::index_exists(conn, table, index).await,
        Effect::NoIndex(table, index) => catalog::index_exists(conn, table, index)
            .await
            .map(|exists| !exists),
        Effect::NoTable(table) => catalog::table_exists(conn, table)
            .await
            .map(|exists| !exists),
        Effect::NoColumn(table, column) => catalog::column_exists(conn, table, column)
            .await
            .map(|exists| !exists),
    };
    result.map_err(db_err("checking the catalog"))
}

/// Data a statement would destroy, as it stands now: the rows of a table it drops, or the
/// values of a column it drops that are neither NULL nor the default the column was added with
/// in `forward` (the migration's own statements: applying it again gives those back). None for
/// anything else, and for what is already gone.
pub(super) async fn would_lose(
    conn: &mut Conn,
    statement: &str,
    forward: &[String],
) -> Result<Option<Loss>, EngineError> {
    let (table, column) = match Effect::of(statement) {
        Some(Effect::NoTable(table)) => (table, None),
        Some(Effect::NoColumn(table, column)) => (table, Some(column)),
        _ => return Ok(None),
    };
    let doing = || db_err("counting what the reverse would drop");
    if !catalog::table_exists(conn, &table).await.map_err(doing())? {
        return Ok(None);
    }
    let backend = conn.backend();
    let quote = |name: &str| match backend {
        fleetsync_common::Backend::MySql => format!("`{name}`"),
        _ => format!("\"{name}\""),
    };
    let sql = match &column {
        None => format!("SELECT COUNT(*) FROM {}", quote(&table)),
        Some(column) => {
            if !catalog::column_exists(conn, &table, column)
                .await
                .map_err(doing())?
            {
                return Ok(None);
            }
            let default = forward
                .iter()
                .filter(|s| Effect::of(s) == Some(Effect::Column(table.clone(), column.clone())))
                .find_map(|s| added_default(s))
                .map(|literal| format!(" AND {} <> {literal}", quote(column)))
                .unwrap_or_default();
            format!(
                "SELECT COUNT(*) FROM {} WHERE {} IS NOT NULL{default}",
                quote(&table),
                quote(column)
            )
        }
    };
    let rows = conn.scalar(&sql, &[]).await.map_err(doing())?.unwrap_or(0);
    Ok((rows > 0).then_some(Loss {
        table,
        column,
        rows,
    }))
}

/// The literal after `DEFAULT` in an `ADD COLUMN` statement: a quoted string or one token.
fn added_default(statement: &str) -> Option<String> {
    let at = statement.to_ascii_uppercase().find(" DEFAULT ")? + " DEFAULT ".len();
    let rest = statement[at..].trim_start();
    if let Some(quoted) = rest.strip_prefix('\'') {
        let end = quoted.find('\'')?;
        return Some(format!("'{}'", &quoted[..end]));
    }
    let token: String = rest
        .chars()
        .take_while(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '-'))
        .collect();
    (!token.is_empty()).then_some(token)
}

/// Data a reverse would destroy: a table's rows, or a column's values.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Loss {
    /// The table.
    pub table: String,
    /// The column dropped, or none when the whole table goes.
    pub column: Option<String>,
    /// Rows of the table (a column: rows where it is neither NULL nor its default).
    pub rows: i64,
}

impl std::fmt::Display for Loss {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let s = if self.rows == 1 { "" } else { "s" };
        match &self.column {
            None => write!(f, "table {} ({} row{s})", self.table, self.rows),
            Some(column) => write!(f, "column {}.{column} ({} value{s})", self.table, self.rows),
        }
    }
}

/// What a DDL statement creates or removes.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Effect {
    Table(String),
    Column(String, String),
    Index(String, String),
    /// The index (table, name) is gone.
    NoIndex(String, String),
    /// The table is gone.
    NoTable(String),
    /// The column (table, name) is gone.
    NoColumn(String, String),
}

impl Effect {
    fn of(statement: &str) -> Option<Self> {
        let tokens: Vec<String> = statement
            .split(|c: char| c.is_whitespace() || c == '(')
            .filter(|t| !t.is_empty())
            .take(12)
            .map(str::to_owned)
            .collect();
        let upper: Vec<String> = tokens.iter().map(|t| t.to_ascii_uppercase()).collect();
        let word = |i: usize| upper.get(i).map(String::as_str);
        let ident = |i: usize| tokens.get(i).map(|t| unquote(t));
        match (word(0)?, word(1)?) {
            ("CREATE", "TABLE") => {
                let at = if word(2) == Some("IF") { 5 } else { 2 };
                Some(Self::Table(ident(at)?))
            }
            ("CREATE", "INDEX") | ("CREATE", "UNIQUE") => {
                let mut at = if word(1) == Some("UNIQUE") { 3 } else { 2 };
                if word(at) == Some("IF") {
                    at += 3;
                }
                let index = ident(at)?;
                (word(at + 1) == Some("ON")).then_some(())?;
                Some(Self::Index(ident(at + 2)?, index))
            }
            ("DROP", "INDEX") => {
                // MySQL's form: the table is named (PostgreSQL and SQLite run in a transaction).
                let at = if word(2) == Some("IF") { 4 } else { 2 };
                let index = ident(at)?;
                (word(at + 1) == Some("ON")).then_some(())?;
                Some(Self::NoIndex(ident(at + 2)?, index))
            }
            ("DROP", "TABLE") => {
                let at = if word(2) == Some("IF") { 4 } else { 2 };
                Some(Self::NoTable(ident(at)?))
            }
            ("ALTER", "TABLE") => {
                let table = ident(2)?;
                let add = match word(3)? {
                    "ADD" => true,
                    "DROP" => false,
                    _ => return None,
                };
                let at = if word(4) == Some("COLUMN") { 5 } else { 4 };
                if matches!(
                    word(at),
                    Some("CONSTRAINT" | "INDEX" | "KEY" | "UNIQUE" | "PRIMARY" | "FOREIGN")
                ) {
                    return None;
                }
                let column = ident(at)?;
                Some(if add {
                    Self::Column(table, column)
                } else {
                    Self::NoColumn(table, column)
                })
            }
            _ => None,
        }
    }
}

fn unquote(token: &str) -> String {
    token
        .trim_end_matches([',', ';'])
        .trim_matches(|c| c == '`' || c == '"')
        .to_owned()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::migration::MigrationSet;
    use fleetsync_common::Backend;

    #[test]
    fn recognises_what_ddl_creates() {
        assert_eq!(
            Effect::of("CREATE TABLE servers (\n id BIGINT)"),
            Some(Effect::Table("servers".into()))
        );
        assert_eq!(
            Effect::of("CREATE TABLE IF NOT EXISTS `databases`(id INT)"),
            Some(Effect::Table("databases".into()))
        );
        assert_eq!(
            Effect::of("ALTER TABLE `databases` ADD COLUMN `collation` VARCHAR(64) NULL"),
            Some(Effect::Column("databases".into(), "collation".into()))
        );
        assert_eq!(
            Effect::of("alter table servers add last_seen_at BIGINT"),
            Some(Effect::Column("servers".into(), "last_seen_at".into()))
        );
        assert_eq!(
            Effect::of("CREATE UNIQUE INDEX a_b ON t (x)"),
            Some(Effect::Index("t".into(), "a_b".into()))
        );
        assert_eq!(
            Effect::of("CREATE INDEX sync_runs_server ON sync_runs (server_id)"),
            Some(Effect::Index("sync_runs".into(), "sync_runs_server".into()))
        );
        assert_eq!(
            Effect::of("ALTER TABLE t ADD CONSTRAINT c UNIQUE (x)"),
            None
        );
        assert_eq!(
            Effect::of("DROP INDEX sync_runs_server ON sync_runs;"),
            Some(Effect::NoIndex(
                "sync_runs".into(),
                "sync_runs_server".into()
            ))
        );
        assert_eq!(
            Effect::of("drop index if exists `a_b` on `t`"),
            Some(Effect::NoIndex("t".into(), "a_b".into()))
        );
        assert_eq!(Effect::of("DROP INDEX a_b"), None);
        assert_eq!(
            Effect::of("DROP TABLE `databases`"),
            Some(Effect::NoTable("databases".into()))
        );
        assert_eq!(
            Effect::of("drop table if exists sync_runs"),
            Some(Effect::NoTable("sync_runs".into()))
        );
        assert_eq!(
            Effect::of("ALTER TABLE `databases` DROP COLUMN `collation`"),
            Some(Effect::NoColumn("databases".into(), "collation".into()))
        );
        assert_eq!(
            Effect::of("ALTER TABLE servers DROP zone"),
            Some(Effect::NoColumn("servers".into(), "zone".into()))
        );
        assert_eq!(Effect::of("ALTER TABLE t DROP FOREIGN KEY t_fk"), None);
        assert_eq!(
            added_default("ALTER TABLE servers ADD COLUMN zone TEXT NOT NULL DEFAULT ''"),
            Some("''".into())
        );
        assert_eq!(
            added_default("ALTER TABLE s ADD COLUMN r VARCHAR(16) NOT NULL default 'unknown'"),
            Some("'unknown'".into())
        );
        assert_eq!(
            added_default("ALTER TABLE s ADD COLUMN n BIGINT NOT NULL DEFAULT 0"),
            Some("0".into())
        );
        assert_eq!(added_default("ALTER TABLE s ADD COLUMN n BIGINT"), None);
        assert_eq!(Effect::of("UPDATE t SET x = 1"), None);
    }

    #[test]
    fn every_embedded_mysql_statement_is_checkable() {
        // The MySQL migrations and their reverses resume statement by statement: each one must
        // be recognised, or a crash right after it could make the retry fail on "already
        // exists" or "does not exist".
        for m in MigrationSet::embedded(Backend::MySql).iter() {
            for statement in m.statements.iter().chain(m.reverse.statements()) {
                assert!(
                    Effect::of(statement).is_some(),
                    "{}: {statement}",
                    m.version
                );
            }
        }
    }
}
