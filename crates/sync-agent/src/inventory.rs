//! Inventory probes: the command run on a server for its database service, and the parser of
//! its output.
//!
//! The query goes to the service's own client on stdin (never through the shell's quoting),
//! and asks the server for one JSON document, so that any name (quotes, tabs, `|`, newlines,
//! unicode) round-trips exactly. Nothing read from a server is interpolated anywhere: it is
//! parsed, validated and bound as SQL parameters.

use std::collections::BTreeMap;

use serde::Deserialize;
use serde_json::Value as Json;

use crate::store::{
    CharsetEntry, Charsets, CharsetsDocument, DatabaseRead, DatabaseService, InventoryWrite,
    UserRead,
};

/// Which query a MySQL or MariaDB server gets, decided by the server from its own `VERSION()`
/// and prepared only then, so that no server ever parses a function it lacks: the query below
/// where `JSON_ARRAYAGG` exists (MySQL 5.7.22, MariaDB 10.5), the same with `GROUP_CONCAT`
/// where only `JSON_OBJECT` does (MySQL 5.7.8, MariaDB 10.2.3), else a document that names the
/// version and what it lacks. One command, one round trip, on every version.
macro_rules! mysql_dispatch {
    () => {
        "SET SESSION group_concat_max_len = @@max_allowed_packet;
SET @fleetsync_version = VERSION();
SET @fleetsync_number = CAST(SUBSTRING_INDEX(@fleetsync_version, '.', 1) AS UNSIGNED) * 10000
  + CAST(SUBSTRING_INDEX(SUBSTRING_INDEX(@fleetsync_version, '.', 2), '.', -1) AS UNSIGNED) * 100
  + CAST(SUBSTRING_INDEX(SUBSTRING_INDEX(SUBSTRING_INDEX(@fleetsync_version, '-', 1), '.', 3), '.', -1) AS UNSIGNED);
SET @fleetsync_mariadb = @fleetsync_version LIKE '%MariaDB%';
SET @fleetsync_query = CASE
  WHEN @fleetsync_number >= IF(@fleetsync_mariadb, 100500, 50722) THEN {modern}
  WHEN @fleetsync_number >= IF(@fleetsync_mariadb, 100203, 50708) THEN {legacy}
  ELSE {unsupported} END;
PREPARE fleetsync_probe FROM @fleetsync_query;
EXECUTE fleetsync_probe;
"
    };
}

/// The command and its stdin for a service. `known` is the stored charset list's key
/// (`version|default charset`): a server that still reports the same skips its collations (a
/// few hundred rows that change only with the server's version) and says `unchanged`. The key
/// travels hex-encoded, so nothing read from a server is ever quoted into a query.
pub fn probe(service: DatabaseService, known: Option<&str>) -> (&'static str, String) {
    let hex: String = known
        .unwrap_or_default()
        .bytes()
        .map(|b| format!("{b:02x}"))
        .collect();
    match service {
        DatabaseService::Mysql | DatabaseService::Mariadb => {
            let client = if service == DatabaseService::Mysql {
                "sudo -n mysql --batch --raw --skip-column-names --default-character-set=utf8mb4"
            } else {
                "sudo -n mariadb --batch --raw --skip-column-names --default-character-set=utf8mb4"
            };
            let known = if known.is_some() {
                format!("X'{hex}'")
            } else {
                "NULL".into()
            };
            (
                client,
                format!(
                    concat!("SET @fleetsync_known = {known};\n", mysql_dispatch!()),
                    known = known,
                    modern = sql_literal(MYSQL_QUERY),
                    legacy = sql_literal(&legacy_mysql_query()),
                    unsupported = sql_literal(MYSQL_UNSUPPORTED),
                ),
            )
        }
        DatabaseService::Postgresql => (
            "sudo -n -u postgres psql -X -q -A -t -v ON_ERROR_STOP=1 -d postgres",
            format!("\\set fleetsync_known '{hex}'\n{POSTGRES_QUERY}"),
        ),
    }
}

/// What a server older than MySQL 5.7.8 or MariaDB 10.2.3 answers: no JSON functions at all.
const MYSQL_UNSUPPORTED: &str =
    "SELECT CONCAT('{\"version\": \"', REPLACE(@fleetsync_version, '\"', ''),
  '\", \"unsupported\": \"JSON_OBJECT (MySQL 5.7.8 or MariaDB 10.2.3 and later have it)\"}')";

/// A string as a MySQL string literal (the queries hold no backslashes).
fn sql_literal(text: &str) -> String {
    format!("'{}'", text.replace('\'', "''"))
}

/// [`MYSQL_QUERY`] for servers without `JSON_ARRAYAGG`: each `JSON_ARRAYAGG(x)` becomes
/// `CONCAT('[', GROUP_CONCAT(x SEPARATOR ','), ']')`, a JSON array as text (the parser reads
/// lists given as text, as MariaDB nests them), NULL over no rows like the aggregate.
fn legacy_mysql_query() -> String {
    const AGG: &str = "JSON_ARRAYAGG(";
    let mut out = String::with_capacity(MYSQL_QUERY.len() + 200);
    let mut rest = MYSQL_QUERY;
    while let Some(at) = rest.find(AGG) {
        out.push_str(&rest[..at]);
        out.push_str("CONCAT('[', GROUP_CONCAT(");
        rest = &rest[at + AGG.len()..];
        // The aggregate's closing parenthesis (the query quotes no parentheses).
        let mut depth = 1;
        let end = rest
            .char_indices()
            .find(|(_, c)| {
                match c {
                    '(' => depth += 1,
                    ')' => depth -= 1,
                    _ => {}
                }
                depth == 0
            })
            .map(|(i, _)| i)
            .expect("balanced parentheses");
        out.push_str(&rest[..end]);
        out.push_str(" SEPARATOR ','), ']')");
        rest = &rest[end + 1..];
    }
    out.push_str(rest);
    out
}

/// One JSON document: version (as the dispatch read it), default charset, databases,
/// collations (unless unchanged), users and their grants.
const MYSQL_QUERY: &str = "SELECT JSON_OBJECT(
  'version', @fleetsync_version,
  'default_charset', @@character_set_server,
  'unchanged', CONCAT(@fleetsync_version, '|', @@character_set_server) <=> @fleetsync_known,
  'databases', (SELECT JSON_ARRAYAGG(JSON_OBJECT('name', SCHEMA_NAME,
      'charset', DEFAULT_CHARACTER_SET_NAME, 'collation', DEFAULT_COLLATION_NAME))
    FROM information_schema.SCHEMATA
    WHERE SCHEMA_NAME NOT IN ('information_schema', 'performance_schema', 'mysql', 'sys')),
  'collations', IF(CONCAT(@fleetsync_version, '|', @@character_set_server) <=> @fleetsync_known, NULL,
    (SELECT JSON_ARRAYAGG(JSON_OBJECT('charset', CHARACTER_SET_NAME,
      'collation', COLLATION_NAME, 'default', IS_DEFAULT))
    FROM information_schema.COLLATIONS WHERE CHARACTER_SET_NAME IS NOT NULL)),
  'users', (SELECT JSON_ARRAYAGG(JSON_OBJECT('user', User, 'host', Host)) FROM mysql.user),
  'grants', (SELECT JSON_ARRAYAGG(JSON_OBJECT('user', User, 'host', Host, 'db', Db)) FROM mysql.db)
)";

/// One JSON document, as for MySQL, on PostgreSQL 12 to 18. Roles have no host: the host is
/// empty. A database's collation is the locale its provider uses: `datcollate` for libc, the
/// ICU or builtin locale otherwise (`daticulocale` in 15 and 16, `datlocale` from 17), read
/// through `to_jsonb` so that a column this version lacks is NULL rather than an error.
const POSTGRES_QUERY: &str = "SELECT json_build_object(
  'version', current_setting('server_version'),
  'default_charset', current_setting('server_encoding'),
  'unchanged', current_setting('server_version') || '|' || current_setting('server_encoding')
    = convert_from(decode(:'fleetsync_known', 'hex'), 'UTF8'),
  'databases', (SELECT coalesce(json_agg(json_build_object('name', d.datname,
      'charset', pg_encoding_to_char(d.encoding), 'collation', CASE
        WHEN to_jsonb(d)->>'datlocprovider' IN ('i', 'b')
        THEN coalesce(to_jsonb(d)->>'datlocale', to_jsonb(d)->>'daticulocale', d.datcollate)
        ELSE d.datcollate END) ORDER BY d.datname), '[]'::json)
    FROM pg_database d WHERE d.datname NOT IN ('template0', 'template1', 'postgres')),
  'collations', CASE WHEN current_setting('server_version') || '|'
      || current_setting('server_encoding') = convert_from(decode(:'fleetsync_known', 'hex'), 'UTF8')
    THEN NULL ELSE (SELECT coalesce(json_agg(json_build_object(
      'charset', CASE WHEN collencoding = -1 THEN '' ELSE pg_encoding_to_char(collencoding) END,
      'collation', collname) ORDER BY collname), '[]'::json) FROM pg_collation) END,
  'users', (SELECT coalesce(json_agg(json_build_object('user', r.rolname, 'host', '',
      'databases', (SELECT coalesce(json_agg(d.datname ORDER BY d.datname), '[]'::json)
        FROM pg_database d
        WHERE NOT d.datistemplate AND d.datname <> 'postgres'
          AND has_database_privilege(r.oid, d.oid, 'CONNECT'))) ORDER BY r.rolname), '[]'::json)
    FROM pg_roles r WHERE r.rolcanlogin)
);
";

/// System databases, never stored (also filtered here, whatever the server sends).
const SYSTEM_DATABASES: &[&str] = &[
    "information_schema",
    "performance_schema",
    "mysql",
    "sys",
    "template0",
    "template1",
    "postgres",
];

/// Longest name accepted from a server (MySQL allows 64 characters, PostgreSQL 63 bytes), and
/// the width of the control-plane columns that hold names, users and hosts.
const MAX_NAME: usize = 255;
/// Width of the control-plane columns for charsets, collations and versions (`VARCHAR(64)`).
const MAX_SHORT: usize = 64;
/// Most databases, users, grants or collations accepted from one server.
const MAX_ITEMS: usize = 100_000;

/// Why a probe's output was refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ParseError {
    /// Not what the probe asks for: `PARSE_FAILED`.
    #[error("{0}")]
    Invalid(String),
    /// The server is too old for the probe, and said which version it is and what it lacks:
    /// `COMMAND_FAILED`.
    #[error("{0}")]
    Unsupported(String),
}

#[derive(Debug, Deserialize)]
struct Document {
    version: Option<String>,
    /// What a server too old for the probe lacks (see [`MYSQL_UNSUPPORTED`]).
    #[serde(default)]
    unsupported: Option<String>,
    default_charset: Option<String>,
    /// True (or 1) when the server still reports the key it was sent: collations are left out.
    #[serde(default)]
    unchanged: Json,
    #[serde(default)]
    databases: Json,
    #[serde(default)]
    collations: Json,
    #[serde(default)]
    users: Json,
    #[serde(default)]
    grants: Json,
}

#[derive(Debug, Deserialize)]
struct DatabaseRow {
    name: String,
    charset: Option<String>,
    collation: Option<String>,
}

#[derive(Debug, Deserialize)]
struct CollationRow {
    charset: Option<String>,
    collation: String,
    #[serde(default)]
    default: Option<String>,
}

#[derive(Debug, Deserialize)]
struct UserRow {
    user: String,
    #[serde(default)]
    host: Option<String>,
    #[serde(default)]
    databases: Option<Vec<String>>,
}

#[derive(Debug, Deserialize)]
struct GrantRow {
    user: String,
    host: String,
    db: String,
}

/// At most `max` characters of `text` (for messages built from what a server said).
fn truncate_chars(text: &str, max: usize) -> String {
    text.chars().filter(|c| !c.is_control()).take(max).collect()
}

/// A JSON array, wherever it may hide: MariaDB can hand a nested aggregate back as a string,
/// and an aggregate over no rows is NULL.
fn array<T: for<'de> Deserialize<'de>>(value: Json, what: &str) -> Result<Vec<T>, ParseError> {
    let value = match value {
        Json::Null => return Ok(Vec::new()),
        Json::String(text) => serde_json::from_str(&text)
            .map_err(|e| ParseError::Invalid(format!("{what}: not JSON: {e}")))?,
        other => other,
    };
    match value {
        Json::Null => Ok(Vec::new()),
        value @ Json::Array(_) => {
            serde_json::from_value(value).map_err(|e| ParseError::Invalid(format!("{what}: {e}")))
        }
        other => Err(ParseError::Invalid(format!(
            "{what}: expected a list, got {}",
            kind(&other)
        ))),
    }
}

fn kind(value: &Json) -> &'static str {
    match value {
        Json::Null => "null",
        Json::Bool(_) => "a boolean",
        Json::Number(_) => "a number",
        Json::String(_) => "a string",
        Json::Array(_) => "a list",
        Json::Object(_) => "an object",
    }
}

fn check_name(what: &str, name: &str) -> Result<(), ParseError> {
    if name.is_empty() {
        return Err(ParseError::Invalid(format!("{what} with an empty name")));
    }
    if name.len() > MAX_NAME {
        return Err(ParseError::Invalid(format!(
            "{what} name of {} bytes (at most {MAX_NAME})",
            name.len()
        )));
    }
    if name.contains('\0') {
        return Err(ParseError::Invalid(format!(
            "{what} name contains a NUL byte"
        )));
    }
    Ok(())
}

/// Every other text a server sends (charset, collation, version, host) must fit the column that
/// stores it and hold no NUL byte (which PostgreSQL cannot store): a value that cannot be
/// stored is refused here, with its field named, instead of failing the write every time.
fn check_text(what: &str, value: &str, max_chars: usize) -> Result<(), ParseError> {
    if value.contains('\0') {
        return Err(ParseError::Invalid(format!("{what} contains a NUL byte")));
    }
    let chars = value.chars().count();
    if chars > max_chars {
        return Err(ParseError::Invalid(format!(
            "{what} of {chars} characters (at most {max_chars}): {:?}…",
            value.chars().take(32).collect::<String>()
        )));
    }
    Ok(())
}

fn check_count(what: &str, n: usize) -> Result<(), ParseError> {
    if n > MAX_ITEMS {
        return Err(ParseError::Invalid(format!(
            "{n} {what} (at most {MAX_ITEMS})"
        )));
    }
    Ok(())
}

/// Parses a probe's stdout into what to store.
pub fn parse(service: DatabaseService, stdout: &[u8]) -> Result<InventoryWrite, ParseError> {
    let text = std::str::from_utf8(stdout)
        .map_err(|e| ParseError::Invalid(format!("output is not UTF-8: {e}")))?
        .trim();
    if text.is_empty() {
        return Err(ParseError::Invalid("the probe printed nothing".into()));
    }
    let document: Document = serde_json::from_str(text)
        .map_err(|e| ParseError::Invalid(format!("output is not the expected JSON: {e}")))?;

    if let Some(missing) = document.unsupported {
        let product = match service {
            DatabaseService::Mariadb => "MariaDB",
            DatabaseService::Mysql => "MySQL",
            DatabaseService::Postgresql => "PostgreSQL",
        };
        let version = document.version.unwrap_or_default();
        return Err(ParseError::Unsupported(format!(
            "{product} {} is too old for the inventory query: it lacks {}",
            truncate_chars(&version, 64),
            truncate_chars(&missing, 200)
        )));
    }

    // The key the server compares next time: what it reported, before any default.
    let key = format!(
        "{}|{}",
        document.version.as_deref().unwrap_or_default(),
        document.default_charset.as_deref().unwrap_or_default()
    );
    let unchanged =
        matches!(document.unchanged, Json::Bool(true)) || document.unchanged.as_i64() == Some(1);
    let default_charset = document.default_charset.unwrap_or_else(|| match service {
        DatabaseService::Postgresql => "UTF8".into(),
        _ => "utf8mb3".into(),
    });
    check_text("default charset", &default_charset, MAX_SHORT)?;
    if let Some(version) = &document.version {
        check_text("version", version, MAX_SHORT)?;
    }

    let mut databases = BTreeMap::new();
    let rows = array::<DatabaseRow>(document.databases, "databases")?;
    check_count("databases", rows.len())?;
    for row in rows {
        check_name("database", &row.name)?;
        if SYSTEM_DATABASES.contains(&row.name.as_str()) {
            continue;
        }
        let charset = row.charset.unwrap_or_else(|| default_charset.clone());
        let collation = row.collation.unwrap_or_default();
        check_text(
            &format!("charset of database {:?}", row.name),
            &charset,
            MAX_SHORT,
        )?;
        check_text(
            &format!("collation of database {:?}", row.name),
            &collation,
            MAX_SHORT,
        )?;
        databases.insert(row.name, (charset, collation));
    }

    let charsets = if unchanged {
        None
    } else {
        Some(charsets(document.collations, default_charset, key)?)
    };

    let mut users: BTreeMap<(String, String), Vec<String>> = BTreeMap::new();
    let rows = array::<UserRow>(document.users, "users")?;
    check_count("users", rows.len())?;
    for row in rows {
        check_name("user", &row.user)?;
        let host = row.host.unwrap_or_default();
        check_text(&format!("host of user {:?}", row.user), &host, MAX_NAME)?;
        let granted = row.databases.unwrap_or_default();
        check_count("databases of one user", granted.len())?;
        for db in &granted {
            check_name("granted database", db)?;
        }
        let entry = users.entry((row.user, host)).or_default();
        entry.extend(granted);
    }
    let grants = array::<GrantRow>(document.grants, "grants")?;
    check_count("grants", grants.len())?;
    for grant in grants {
        if let Some(databases) = users.get_mut(&(grant.user, grant.host)) {
            check_name("granted database", &grant.db)?;
            databases.push(grant.db);
        }
    }

    Ok(InventoryWrite {
        version: document.version,
        charsets,
        databases: databases
            .into_iter()
            .map(|(name, (charset, collation))| DatabaseRead {
                name,
                charset,
                collation,
            })
            .collect(),
        users: users
            .into_iter()
            .map(|((username, host), databases)| UserRead {
                username,
                host,
                databases,
            })
            .collect(),
    })
}

/// The charset list: every charset's collations and default, and its key.
fn charsets(
    collations: Json,
    default_charset: String,
    key: String,
) -> Result<Charsets, ParseError> {
    // charset -> {"default": collation, "list": [collations]}
    let mut charsets: BTreeMap<String, (Option<String>, Vec<String>)> = BTreeMap::new();
    let rows = array::<CollationRow>(collations, "collations")?;
    check_count("collations", rows.len())?;
    for row in rows {
        check_name("collation", &row.collation)?;
        check_text("collation", &row.collation, MAX_SHORT)?;
        // PostgreSQL collations for any encoding apply to the server's.
        let charset = match row.charset {
            Some(c) if !c.is_empty() => c,
            _ => default_charset.clone(),
        };
        check_text("charset", &charset, MAX_SHORT)?;
        let entry = charsets.entry(charset).or_default();
        if row.default.as_deref() == Some("Yes") {
            entry.0 = Some(row.collation.clone());
        }
        entry.1.push(row.collation);
    }
    let document = CharsetsDocument {
        charsets: charsets
            .into_iter()
            .map(|(name, (default, mut list))| {
                list.sort();
                list.dedup();
                (name, CharsetEntry { default, list })
            })
            .collect(),
        default_charset,
    };
    Ok(Charsets { document, key })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_mariadb_output_with_nested_strings_and_hostile_names() {
        let out = r#"{"version": "10.11.6-MariaDB", "default_charset": "utf8mb4",
            "databases": "[{\"name\": \"app\", \"charset\": \"utf8mb4\", \"collation\": \"utf8mb4_bin\"}, {\"name\": \"we'ird\\t|\\nname ü\", \"charset\": \"latin1\", \"collation\": \"latin1_swedish_ci\"}, {\"name\": \"mysql\", \"charset\": \"utf8mb4\", \"collation\": \"x\"}]",
            "collations": [{"charset": "utf8mb4", "collation": "utf8mb4_general_ci", "default": "Yes"},
                           {"charset": "utf8mb4", "collation": "utf8mb4_bin", "default": ""}],
            "users": [{"user": "app", "host": "%"}, {"user": "root", "host": "localhost"}],
            "grants": [{"user": "app", "host": "%", "db": "app"}]}"#;
        let inv = parse(DatabaseService::Mariadb, out.as_bytes()).unwrap();
        assert_eq!(inv.version.as_deref(), Some("10.11.6-MariaDB"));
        let database = |name: &str, charset: &str, collation: &str| DatabaseRead {
            name: name.into(),
            charset: charset.into(),
            collation: collation.into(),
        };
        assert_eq!(
            inv.databases,
            [
                database("app", "utf8mb4", "utf8mb4_bin"),
                database("we'ird\t|\nname ü", "latin1", "latin1_swedish_ci"),
            ]
        );
        let user = |username: &str, host: &str, databases: &[&str]| UserRead {
            username: username.into(),
            host: host.into(),
            databases: databases.iter().map(|d| (*d).to_owned()).collect(),
        };
        assert_eq!(
            inv.users,
            [user("app", "%", &["app"]), user("root", "localhost", &[])]
        );
        let charsets = inv.charsets.expect("collations were sent");
        assert_eq!(charsets.document.charsets.len(), 1);
        assert_eq!(charsets.key, "10.11.6-MariaDB|utf8mb4");
        // Stored in the panel's shape, and read back as written.
        let stored: Json = serde_json::from_str(&charsets.document.encode()).unwrap();
        assert_eq!(stored["defaultCharset"], "utf8mb4");
        assert_eq!(
            stored["charsets"]["utf8mb4"]["default"],
            "utf8mb4_general_ci"
        );
        assert_eq!(stored["charsets"]["utf8mb4"]["list"][0], "utf8mb4_bin");
        assert_eq!(
            CharsetsDocument::decode(&charsets.document.encode()).unwrap(),
            charsets.document
        );
        assert!(CharsetsDocument::decode(r#"{"charsets": []}"#).is_err());
    }

    #[test]
    fn empty_aggregates_are_empty_lists() {
        let out = r#"{"version": "16", "default_charset": null, "databases": null, "collations": null, "users": null}"#;
        let inv = parse(DatabaseService::Postgresql, out.as_bytes()).unwrap();
        assert!(inv.databases.is_empty() && inv.users.is_empty());
        let charsets = inv.charsets.expect("read");
        assert_eq!(charsets.document.default_charset, "UTF8");
        assert_eq!(charsets.key, "16|", "the key is what the server reported");
    }

    #[test]
    fn an_unchanged_server_leaves_its_charsets_alone() {
        for unchanged in ["true", "1"] {
            let out = format!(
                r#"{{"version": "10.11", "default_charset": "utf8mb4", "unchanged": {unchanged},
                    "collations": null, "databases": [{{"name": "app"}}]}}"#
            );
            let inv = parse(DatabaseService::Mariadb, out.as_bytes()).unwrap();
            assert_eq!(inv.charsets, None, "{unchanged}");
            assert_eq!(inv.databases.len(), 1);
        }
        let out = r#"{"version": "10.11", "default_charset": "utf8mb4", "unchanged": 0, "collations": null}"#;
        assert!(
            parse(DatabaseService::Mariadb, out.as_bytes())
                .unwrap()
                .charsets
                .is_some()
        );
    }

    #[test]
    fn each_mysql_version_is_sent_a_query_it_can_parse() {
        let legacy = legacy_mysql_query();
        assert!(!legacy.contains("JSON_ARRAYAGG"), "{legacy}");
        assert_eq!(
            legacy.matches("GROUP_CONCAT(").count(),
            MYSQL_QUERY.matches("JSON_ARRAYAGG(").count()
        );
        assert!(
            !MYSQL_QUERY.trim_end().ends_with(';'),
            "a prepared statement is one statement"
        );
        let (_, script) = probe(DatabaseService::Mysql, None);
        // Every query travels as one string literal, prepared only where the server chose it.
        assert_eq!(script.matches("PREPARE fleetsync_probe").count(), 1);
        assert!(script.contains(&sql_literal(&legacy)));
        assert!(script.contains(&sql_literal(MYSQL_QUERY)));
        assert!(script.contains(&sql_literal(MYSQL_UNSUPPORTED)));
    }

    #[test]
    fn a_server_too_old_says_its_version_and_what_it_lacks() {
        let out = br#"{"version": "5.6.51-log", "unsupported": "JSON_OBJECT (MySQL 5.7.8 or MariaDB 10.2.3 and later have it)"}"#;
        assert_eq!(
            parse(DatabaseService::Mysql, out),
            Err(ParseError::Unsupported(
                "MySQL 5.6.51-log is too old for the inventory query: it lacks JSON_OBJECT \
                 (MySQL 5.7.8 or MariaDB 10.2.3 and later have it)"
                    .into()
            ))
        );
    }

    #[test]
    fn the_known_key_travels_hex_encoded() {
        let (_, mysql) = probe(DatabaseService::Mariadb, Some("10.11'; DROP|x"));
        assert!(
            mysql.starts_with("SET @fleetsync_known = X'31302e3131273b2044524f507c78';\n"),
            "{mysql}"
        );
        let (_, mysql) = probe(DatabaseService::Mysql, None);
        assert!(mysql.starts_with("SET @fleetsync_known = NULL;\n"));
        let (_, pg) = probe(DatabaseService::Postgresql, Some("16|UTF8"));
        assert!(
            pg.starts_with("\\set fleetsync_known '31367c55544638'\n"),
            "{pg}"
        );
    }

    #[test]
    fn hostile_output_is_refused_with_a_reason() {
        for (out, expected) in [
            ("", "printed nothing"),
            ("ERROR 1045 (28000): Access denied", "not the expected JSON"),
            (r#"{"databases": 5}"#, "expected a list, got a number"),
            (r#"{"databases": [{"nome": "x"}]}"#, "missing field `name`"),
            (r#"{"databases": [{"name": ""}]}"#, "empty name"),
            (r#"{"databases": [{"name": "a\u0000b"}]}"#, "NUL"),
        ] {
            let err = parse(DatabaseService::Mysql, out.as_bytes()).unwrap_err();
            assert!(err.to_string().contains(expected), "{out}: {err}");
        }
        for (out, expected) in [
            (
                r#"{"databases": [{"name": "a", "charset": "utf8\u0000"}]}"#,
                "charset of database \"a\" contains a NUL byte",
            ),
            (r#"{"version": "1\u0000"}"#, "version contains a NUL byte"),
            (
                r#"{"users": [{"user": "u", "host": "h\u0000"}]}"#,
                "host of user \"u\" contains a NUL byte",
            ),
            (
                r#"{"collations": [{"charset": "utf8mb4\u0000", "collation": "c"}]}"#,
                "charset contains a NUL byte",
            ),
        ] {
            let err = parse(DatabaseService::Mysql, out.as_bytes()).unwrap_err();
            assert!(err.to_string().contains(expected), "{out}: {err}");
        }
        let wide = format!(
            r#"{{"databases": [{{"name": "a", "collation": "{}"}}]}}"#,
            "c".repeat(65)
        );
        let err = parse(DatabaseService::Mysql, wide.as_bytes()).unwrap_err();
        assert!(
            err.to_string().contains("of 65 characters (at most 64)"),
            "{err}"
        );
        let wide = format!(r#"{{"version": "{}"}}"#, "ü".repeat(65));
        assert!(parse(DatabaseService::Mysql, wide.as_bytes()).is_err());
        let fits = format!(r#"{{"version": "{}"}}"#, "ü".repeat(64));
        assert!(parse(DatabaseService::Mysql, fits.as_bytes()).is_ok());
        let long = format!(r#"{{"databases": [{{"name": "{}"}}]}}"#, "x".repeat(300));
        assert!(
            parse(DatabaseService::Mysql, long.as_bytes())
                .unwrap_err()
                .to_string()
                .contains("300 bytes")
        );
        assert!(
            parse(DatabaseService::Mysql, &[0xff, 0xfe])
                .unwrap_err()
                .to_string()
                .contains("UTF-8")
        );
    }
}
