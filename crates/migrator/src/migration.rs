//! Migrations as the binary knows them: embedded SQL per dialect, the header line that declares
//! options, statement splitting, and checksums.

use fleetsync_common::Backend;
use sha2::{Digest, Sha256};

use crate::model::{Scope, Scopes};

/// One migration for one dialect.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Migration {
    /// Version; migrations apply in ascending order.
    pub version: i64,
    /// Name, e.g. `add_charset_collation_to_databases`.
    pub name: String,
    /// SHA-256 (hex) of the text normalised to LF line ends without a BOM.
    pub checksum: String,
    /// The statements, in order, without their terminating `;`.
    pub statements: Vec<String>,
    /// Data the sync-agent must re-sync once it is applied (header `resync=...`).
    pub resync: Scopes,
    /// False with header option `no-transaction` (statements then run one by one, journaled,
    /// as on MySQL).
    pub transactional: bool,
    /// Header option `stops-agents`: sync-agents built before this migration (whose schema
    /// range ends below its version) must stop claiming once it is applied (README,
    /// "Upgrades").
    pub stops_agents: bool,
}

/// Why a migration's text was refused.
#[derive(Debug, thiserror::Error)]
#[error("migration {version} ({name}): {reason}")]
pub struct MigrationError {
    /// The migration's version (the timestamp its file name starts with).
    pub version: i64,
    /// The migration's name, from its file name.
    pub name: String,
    /// What is wrong.
    pub reason: String,
}

/// The header marker: `-- fleetsync: resync=databases,charsets no-transaction stops-agents`.
const HEADER: &str = "-- fleetsync:";

impl Migration {
    /// Parses a migration from its text.
    pub fn parse(version: i64, name: &str, text: &str) -> Result<Self, MigrationError> {
        let error = |reason: String| MigrationError {
            version,
            name: name.to_owned(),
            reason,
        };
        let normalised = normalise(text);
        let mut resync = Scopes::empty();
        let mut transactional = true;
        let mut stops_agents = false;
        for line in normalised.lines() {
            let Some(options) = line.trim().strip_prefix(HEADER) else {
                continue;
            };
            for option in options.split_whitespace() {
                if option == "no-transaction" {
                    transactional = false;
                } else if option == "stops-agents" {
                    stops_agents = true;
                } else if let Some(scopes) = option.strip_prefix("resync=") {
                    for scope in scopes.split(',').filter(|s| !s.is_empty()) {
                        let scope = Scope::parse(scope).map_err(|_| {
                            error(format!(
                                "unknown resync scope `{scope}` (use databases, charsets, users)"
                            ))
                        })?;
                        resync.insert(scope);
                    }
                } else {
                    return Err(error(format!("unknown header option `{option}`")));
                }
            }
        }
        let statements = split_statements(&normalised).map_err(error)?;
        if statements.is_empty() {
            return Err(error("no statements".into()));
        }
        Ok(Self {
            version,
            name: name.to_owned(),
            checksum: sha256_hex(normalised.as_bytes()),
            statements,
            resync,
            transactional,
            stops_agents,
        })
    }

    /// SHA-256 (hex) of the first `n` statements: what a partial migration's journal vouches for.
    pub fn prefix_checksum(&self, n: usize) -> String {
        let mut hasher = Sha256::new();
        for statement in self.statements.iter().take(n) {
            hasher.update(statement.as_bytes());
            hasher.update([0]);
        }
        hex(&hasher.finalize())
    }
}

/// LF line ends, no BOM.
fn normalise(text: &str) -> String {
    text.strip_prefix('\u{feff}')
        .unwrap_or(text)
        .replace("\r\n", "\n")
        .replace('\r', "\n")
}

/// SHA-256 of `bytes` as lowercase hex.
pub fn sha256_hex(bytes: &[u8]) -> String {
    hex(&Sha256::digest(bytes))
}

fn hex(bytes: &[u8]) -> String {
    use std::fmt::Write;
    bytes.iter().fold(String::with_capacity(64), |mut s, b| {
        let _ = write!(s, "{b:02x}");
        s
    })
}

/// Splits SQL text into statements at `;` outside quotes, comments and dollar-quoted bodies.
/// Comments are kept inside a statement but a statement made only of comments is dropped.
pub fn split_statements(sql: &str) -> Result<Vec<String>, String> {
    let bytes = sql.as_bytes();
    let mut statements = Vec::new();
    let mut start = 0;
    let mut i = 0;
    let mut has_code = false;
    while i < bytes.len() {
        let c = bytes[i];
        match c {
            b'\'' | b'"' | b'`' => {
                let quote = c;
                i += 1;
                loop {
                    match bytes.get(i) {
                        None => return Err(format!("unterminated {} quote", quote as char)),
                        Some(&b) if b == quote => {
                            // A doubled quote is an escaped quote.
                            if bytes.get(i + 1) == Some(&quote) {
                                i += 2;
                                continue;
                            }
                            break;
                        }
                        Some(b'\\') if quote == b'\'' => i += 2,
                        Some(_) => i += 1,
                    }
                }
                has_code = true;
                i += 1;
            }
            b'-' if bytes.get(i + 1) == Some(&b'-') => {
                while i < bytes.len() && bytes[i] != b'\n' {
                    i += 1;
                }
            }
            b'/' if bytes.get(i + 1) == Some(&b'*') => {
                let end = sql[i + 2..]
                    .find("*/")
                    .ok_or_else(|| "unterminated /* comment".to_owned())?;
                i += 2 + end + 2;
            }
            b'$' => {
                // PostgreSQL dollar quoting: $tag$ ... $tag$.
                let tag_end = sql[i + 1..].find('$').map(|e| i + 1 + e);
                match tag_end {
                    Some(end)
                        if sql[i + 1..end]
                            .bytes()
                            .all(|b| b.is_ascii_alphanumeric() || b == b'_') =>
                    {
                        let tag = &sql[i..=end];
                        let close = sql[end + 1..]
                            .find(tag)
                            .ok_or_else(|| format!("unterminated {tag} quote"))?;
                        i = end + 1 + close + tag.len();
                    }
                    _ => i += 1,
                }
                has_code = true;
            }
            b';' => {
                if has_code {
                    statements.push(strip_comments_around(&sql[start..i]));
                }
                i += 1;
                start = i;
                has_code = false;
            }
            c if c.is_ascii_whitespace() => i += 1,
            _ => {
                has_code = true;
                i += 1;
            }
        }
    }
    if has_code {
        statements.push(strip_comments_around(&sql[start..]));
    }
    Ok(statements)
}

/// The statement without leading comment lines and surrounding white space.
fn strip_comments_around(statement: &str) -> String {
    let mut lines: Vec<&str> = statement.lines().collect();
    while lines
        .first()
        .is_some_and(|l| l.trim().is_empty() || l.trim_start().starts_with("--"))
    {
        lines.remove(0);
    }
    lines.join("\n").trim().to_owned()
}

/// A migration as listed in the binary: version, name, and its text for each dialect.
struct Source {
    version: i64,
    name: &'static str,
    sqlite: &'static str,
    postgres: &'static str,
    mysql: &'static str,
}

macro_rules! source {
    ($version:literal, $name:literal) => {
        Source {
            version: $version,
            name: $name,
            sqlite: include_str!(concat!(
                "../migrations/sqlite/",
                $version,
                "_",
                $name,
                ".sql"
            )),
            postgres: include_str!(concat!(
                "../migrations/postgres/",
                $version,
                "_",
                $name,
                ".sql"
            )),
            mysql: include_str!(concat!(
                "../migrations/mysql/",
                $version,
                "_",
                $name,
                ".sql"
            )),
        }
    };
}

/// The control-plane migrations, in order. Each has a file in every dialect folder; a test
/// checks that the folders hold nothing else.
const SOURCES: &[Source] = &[
    source!(20240101000001, "create_servers"),
    source!(20240101000002, "create_services"),
    source!(20240101000003, "create_databases"),
    source!(20240101000004, "create_database_users"),
    source!(20250215120213, "add_charset_collation_to_databases"),
    source!(20250301000001, "add_reachability_to_servers"),
    source!(20250301000002, "create_sync_bookkeeping"),
    source!(20250401000001, "create_sync_work_queue"),
    source!(20250501000001, "add_inventory_key_to_services"),
    source!(20261201000001, "flat_history"),
    source!(20261206000001, "drop_sync_runs_server"),
    source!(20261207000001, "create_sync_agents"),
    source!(20261208000001, "zones_and_second_opinions"),
    source!(20261209000001, "agent_schema_ranges"),
];

/// The version that adds `charset` and `collation` to `databases` (Vito's incident).
pub const CHARSET_COLLATION_VERSION: i64 = 20250215120213;

/// The version from which agents declare their schema range (`sync_agents.schema_max`): the
/// first migration that stops agents built before it.
pub const AGENT_SCHEMA_RANGES_VERSION: i64 = 20261209000001;

/// An ordered set of migrations for one dialect.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MigrationSet {
    migrations: Vec<Migration>,
}

impl MigrationSet {
    /// The control-plane migrations embedded in this binary, for `backend`.
    pub fn embedded(backend: Backend) -> Self {
        let migrations = SOURCES
            .iter()
            .map(|source| {
                let text = match backend {
                    Backend::Sqlite => source.sqlite,
                    Backend::Postgres => source.postgres,
                    Backend::MySql => source.mysql,
                };
                Migration::parse(source.version, source.name, text)
                    .expect("embedded migrations are checked by tests")
            })
            .collect();
        Self::new(migrations).expect("embedded migrations are ordered and unique")
    }

    /// A set from migrations (tests use their own sets). Versions must be positive and unique.
    pub fn new(mut migrations: Vec<Migration>) -> Result<Self, MigrationError> {
        migrations.sort_by_key(|m| m.version);
        for pair in migrations.windows(2) {
            if pair[0].version == pair[1].version {
                return Err(MigrationError {
                    version: pair[1].version,
                    name: pair[1].name.clone(),
                    reason: format!("version also used by {}", pair[0].name),
                });
            }
        }
        if let Some(m) = migrations.iter().find(|m| m.version <= 0) {
            return Err(MigrationError {
                version: m.version,
                name: m.name.clone(),
                reason: "versions must be positive".into(),
            });
        }
        Ok(Self { migrations })
    }

    /// The migrations, ascending.
    pub fn iter(&self) -> impl Iterator<Item = &Migration> {
        self.migrations.iter()
    }

    /// The migration with this version.
    pub fn get(&self, version: i64) -> Option<&Migration> {
        self.migrations.iter().find(|m| m.version == version)
    }

    /// The highest version (0 for an empty set).
    pub fn latest(&self) -> i64 {
        self.migrations.last().map_or(0, |m| m.version)
    }

    /// How many migrations there are.
    pub fn len(&self) -> usize {
        self.migrations.len()
    }

    /// True if there are none.
    pub fn is_empty(&self) -> bool {
        self.migrations.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn splits_statements_outside_quotes_and_comments() {
        let sql = "-- header; with a semicolon\nCREATE TABLE a (x TEXT DEFAULT 'a;b');\n\
                   /* block ; comment */ INSERT INTO a VALUES ('it''s; fine');\n\
                   CREATE FUNCTION f() RETURNS int AS $body$ SELECT 1; $body$ LANGUAGE sql;\n\
                   -- trailing comment only\n";
        let statements = split_statements(sql).unwrap();
        assert_eq!(
            statements,
            [
                "CREATE TABLE a (x TEXT DEFAULT 'a;b')",
                "/* block ; comment */ INSERT INTO a VALUES ('it''s; fine')",
                "CREATE FUNCTION f() RETURNS int AS $body$ SELECT 1; $body$ LANGUAGE sql",
            ]
        );
        assert!(split_statements("SELECT 'open").is_err());
        assert!(split_statements("/* open").is_err());
    }

    #[test]
    fn header_options_and_checksum_normalisation() {
        let lf = Migration::parse(
            1,
            "x",
            "-- fleetsync: resync=databases,charsets\nSELECT 1;\n",
        )
        .unwrap();
        assert_eq!(
            lf.resync,
            Scopes::from_iter([Scope::Databases, Scope::Charsets])
        );
        assert!(lf.transactional);
        let crlf_bom = Migration::parse(
            1,
            "x",
            "\u{feff}-- fleetsync: resync=databases,charsets\r\nSELECT 1;\r\n",
        )
        .unwrap();
        assert_eq!(lf.checksum, crlf_bom.checksum);
        assert_eq!(lf.checksum.len(), 64);
        let edited =
            Migration::parse(1, "x", "-- fleetsync: resync=databases\nSELECT 1;\n").unwrap();
        assert_ne!(lf.checksum, edited.checksum);

        let manual = Migration::parse(2, "y", "-- fleetsync: no-transaction\nSELECT 1;").unwrap();
        assert!(!manual.transactional);
        assert!(!manual.stops_agents);
        let breaking = Migration::parse(2, "y", "-- fleetsync: stops-agents\nSELECT 1;").unwrap();
        assert!(breaking.stops_agents && breaking.transactional);
        let err = Migration::parse(3, "z", "-- fleetsync: resync=servers\nSELECT 1;").unwrap_err();
        assert!(
            err.to_string().contains("unknown resync scope `servers`"),
            "{err}"
        );
        let err = Migration::parse(3, "z", "-- only a comment\n").unwrap_err();
        assert!(err.to_string().contains("no statements"), "{err}");
    }

    #[test]
    fn embedded_sets_agree_across_dialects() {
        let sets = [Backend::Sqlite, Backend::Postgres, Backend::MySql].map(MigrationSet::embedded);
        for set in &sets {
            let versions: Vec<_> = set.iter().map(|m| (m.version, m.name.clone())).collect();
            let first: Vec<_> = sets[0]
                .iter()
                .map(|m| (m.version, m.name.clone()))
                .collect();
            assert_eq!(versions, first);
            let incident = set
                .get(CHARSET_COLLATION_VERSION)
                .expect("incident migration");
            assert_eq!(
                incident.resync,
                Scopes::from_iter([Scope::Databases, Scope::Charsets])
            );
            // Only that migration asks for a re-sync.
            assert_eq!(set.iter().filter(|m| !m.resync.is_empty()).count(), 1);
            // The first that stops agents built before it is the one that makes them check.
            assert_eq!(
                set.iter().find(|m| m.stops_agents).map(|m| m.version),
                Some(AGENT_SCHEMA_RANGES_VERSION)
            );
        }
        // Same number of statements everywhere, so that progress reads the same.
        for (a, b) in sets[0].iter().zip(sets[2].iter()) {
            assert_eq!(a.statements.len(), b.statements.len(), "{}", a.name);
        }
    }

    #[test]
    fn migration_folders_hold_exactly_the_listed_files() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("migrations");
        let mut expected: Vec<String> = SOURCES
            .iter()
            .map(|s| format!("{}_{}.sql", s.version, s.name))
            .collect();
        expected.sort();
        for dialect in ["sqlite", "postgres", "mysql"] {
            let mut files: Vec<String> = std::fs::read_dir(dir.join(dialect))
                .unwrap()
                .map(|e| e.unwrap().file_name().into_string().unwrap())
                .collect();
            files.sort();
            assert_eq!(files, expected, "{dialect}");
        }
    }
}
