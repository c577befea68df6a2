//! Asking the catalog whether a DDL statement already ran (a journaled migration resumed after
//! a crash, where the journal may lag one statement behind): a small tokenizer of what each
//! statement creates, alters or drops.

use super::{EngineError, db_err};
use crate::{catalog, history::Conn};

/// Whether a statement's effect is already in the catalog: `CREATE TABLE t`, `CREATE [UNIQUE]
/// INDEX i ON t`, `ALTER TABLE t ADD [COLUMN] c` (the thing exists), `DROP INDEX i ON t` (it
/// does not). Other statements are run again (migrations that cannot commit atomically must
/// keep such statements idempotent).
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
    };
    result.map_err(db_err("checking the catalog"))
}

/// What a DDL statement creates or removes.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Effect {
    Table(String),
    Column(String, String),
    Index(String, String),
    /// The index (table, name) is gone.
    NoIndex(String, String),
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
            ("ALTER", "TABLE") => {
                let table = ident(2)?;
                (word(3) == Some("ADD")).then_some(())?;
                let at = if word(4) == Some("COLUMN") { 5 } else { 4 };
                if matches!(
                    word(at),
                    Some("CONSTRAINT" | "INDEX" | "KEY" | "UNIQUE" | "PRIMARY" | "FOREIGN")
                ) {
                    return None;
                }
                Some(Self::Column(table, ident(at)?))
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
        assert_eq!(Effect::of("UPDATE t SET x = 1"), None);
    }

    #[test]
    fn every_embedded_mysql_statement_is_checkable() {
        // The MySQL migrations resume statement by statement: each one must be recognised, or
        // a crash right after it could make the retry fail on "already exists".
        for m in MigrationSet::embedded(Backend::MySql).iter() {
            for statement in &m.statements {
                assert!(
                    Effect::of(statement).is_some(),
                    "{}: {statement}",
                    m.version
                );
            }
        }
    }
}
