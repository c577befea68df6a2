//! Migrations as the binary knows them: embedded SQL per dialect with each one's reverse (the
//! `.down.sql` file beside it, a build error when missing), the header line that declares
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
    /// How to undo it (`migrate --target` below its version).
    pub reverse: Reverse,
}

/// A migration's way back: the statements of its `.down.sql` file, or why there is none.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reverse {
    /// Statements that undo the migration, run newest migration first. They run like the
    /// migration's own: in one transaction, or journaled statement by statement on MySQL and
    /// for `no-transaction` migrations.
    Statements(Vec<String>),
    /// The down file declares `-- fleetsync: irreversible <reason>`: `migrate` refuses to go
    /// below this migration and says why.
    Irreversible(String),
}

impl Reverse {
    /// The statements, or none for an irreversible migration.
    pub fn statements(&self) -> &[String] {
        match self {
            Self::Statements(statements) => statements,
            Self::Irreversible(_) => &[],
        }
    }

    /// SHA-256 (hex) of the first `n` statements: what a partial way down's journal vouches for.
    pub fn prefix_checksum(&self, n: usize) -> String {
        prefix_checksum(self.statements(), n)
    }
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
            reverse: Reverse::Irreversible("no reverse was given".into()),
        })
    }

    /// The migration with its reverse, parsed from the text of its `.down.sql` file: statements
    /// (the header may not declare options of the way up), or only the header
    /// `-- fleetsync: irreversible <reason>`. The reverse is not part of the checksum: adding
    /// or mending a reverse never makes an applied migration look edited.
    pub fn with_reverse(mut self, text: &str) -> Result<Self, MigrationError> {
        let error = |reason: String| MigrationError {
            version: self.version,
            name: format!("{} (reverse)", self.name),
            reason,
        };
        let normalised = normalise(text);
        let mut irreversible = None;
        for line in normalised.lines() {
            let Some(options) = line.trim().strip_prefix(HEADER) else {
                continue;
            };
            match options.trim().strip_prefix("irreversible") {
                Some(reason) if !reason.trim().is_empty() => {
                    irreversible = Some(reason.trim().to_owned());
                }
                Some(_) => return Err(error("`irreversible` needs a reason after it".into())),
                None => {
                    return Err(error(format!(
                        "a reverse's header may only declare `irreversible <reason>`, not `{}`",
                        options.trim()
                    )));
                }
            }
        }
        let statements = split_statements(&normalised).map_err(error)?;
        self.reverse = match (irreversible, statements.is_empty()) {
            (Some(reason), true) => Reverse::Irreversible(reason),
            (None, false) => Reverse::Statements(statements),
            (Some(_), false) => {
                return Err(error(
                    "declared irreversible but has statements: keep one or the other".into(),
                ));
            }
            (None, true) => {
                return Err(error(
                    "no statements: write the reverse, or declare `-- fleetsync: irreversible \
                     <reason>`"
                        .into(),
                ));
            }
        };
        Ok(self)
    }

    /// SHA-256 (hex) of the first `n` statements: what a partial migration's journal vouches for.
    pub fn prefix_checksum(&self, n: usize) -> String {
        prefix_checksum(&self.statements, n)
    }
}

/// SHA-256 (hex) of the first `n` of `statements`, each ended by a NUL byte.
fn prefix_checksum(statements: &[String], n: usize) -> String {
    let mut hasher = Sha256::new();
    for statement in statements.iter().take(n) {
        hasher.update(statement.as_bytes());
        hasher.update([0]);
    }
    hex(&hasher.finalize())
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

/// A migration as listed in the binary: version, name, and for each dialect its text and its
/// reverse's.
struct Source {
    version: i64,
    name: &'static str,
    sqlite: [&'static str; 2],
    postgres: [&'static str; 2],
    mysql: [&'static str; 2],
}

/// The forward and the reverse text of a migration in one dialect folder: a missing file (the
/// reverse included) is a build error.
macro_rules! dialect {
    ($dialect:literal, $version:literal, $name:literal) => {
        [
            include_str!(concat!(
                "../migrations/",
                $dialect,
                "/",
                $version,
                "_",
                $name,
                ".sql"
            )),
            include_str!(concat!(
                "../migrations/",
                $dialect,
                "/",
                $version,
                "_",
                $name,
                ".down.sql"
            )),
        ]
    };
}

macro_rules! source {
    ($version:literal, $name:literal) => {
        Source {
            version: $version,
            name: $name,
            sqlite: dialect!("sqlite", $version, $name),
            postgres: dialect!("postgres", $version, $name),
            mysql: dialect!("mysql", $version, $name),
        }
    };
}

/// The control-plane migrations, in order. Each has a file and its reverse (`.down.sql`) in
/// every dialect folder; a test checks that the folders hold nothing else.
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
    source!(20261210000001, "servers_by_reachability"),
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
                let [up, down] = match backend {
                    Backend::Sqlite => source.sqlite,
                    Backend::Postgres => source.postgres,
                    Backend::MySql => source.mysql,
                };
                Migration::parse(source.version, source.name, up)
                    .and_then(|m| m.with_reverse(down))
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
    pub fn iter(&self) -> impl DoubleEndedIterator<Item = &Migration> {
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
    fn reverses_are_statements_or_declared_irreversible_with_a_reason() {
        let up = || Migration::parse(7, "x", "-- fleetsync: resync=databases\nSELECT 1;").unwrap();
        let checksum = up().checksum;
        let down = up().with_reverse("-- undo\nSELECT 2;\nSELECT 3;").unwrap();
        assert_eq!(
            down.reverse,
            Reverse::Statements(vec!["SELECT 2".into(), "SELECT 3".into()])
        );
        assert_eq!(
            down.checksum, checksum,
            "the reverse is not in the checksum"
        );
        assert_ne!(
            down.reverse.prefix_checksum(1),
            down.reverse.prefix_checksum(2)
        );
        let never = up()
            .with_reverse("-- fleetsync: irreversible the old rows cannot be rebuilt\n")
            .unwrap();
        assert_eq!(
            never.reverse,
            Reverse::Irreversible("the old rows cannot be rebuilt".into())
        );
        for (text, why) in [
            ("-- nothing here\n", "no statements: write the reverse"),
            ("-- fleetsync: irreversible\n", "needs a reason"),
            (
                "-- fleetsync: irreversible because\nSELECT 1;",
                "but has statements",
            ),
            (
                "-- fleetsync: resync=databases\nSELECT 1;",
                "may only declare",
            ),
        ] {
            let err = up().with_reverse(text).unwrap_err().to_string();
            assert!(err.contains(why), "{text:?}: {err}");
            assert!(err.contains("x (reverse)"), "{err}");
        }
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
        // Every embedded migration can be undone.
        for m in sets.iter().flat_map(MigrationSet::iter) {
            assert!(
                matches!(&m.reverse, Reverse::Statements(s) if !s.is_empty()),
                "{}",
                m.version
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
            .flat_map(|s| {
                [
                    format!("{}_{}.sql", s.version, s.name),
                    format!("{}_{}.down.sql", s.version, s.name),
                ]
            })
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
