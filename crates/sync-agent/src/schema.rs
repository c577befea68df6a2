//! The agent never changes the schema (the migrator does). It works with a range of schema
//! versions, from [`SCHEMA_MIN`] (the newest migration whose tables it uses) to [`SCHEMA_MAX`]
//! (the newest migration it was built with). A schema newer than the range is fine unless a
//! migration past its end was declared to stop agents built before it (`stops-agents`; the
//! migrator lists those in `fleetsync_schema_breaks`). Checked at start-up, where the agent
//! refuses to run, and on every heartbeat, where it stops claiming (`runner`).

use fleetsync_common::{
    Db,
    model::{SCHEMA_BREAKS_TABLE, SCHEMA_HISTORY_TABLE},
    sql::{Value, table_exists_sql},
};

/// The newest migration whose tables the agent uses (`agent_schema_ranges`).
#[cfg(not(feature = "older-schema-range"))]
pub const SCHEMA_MIN: i64 = 20261209000001;
/// The newest migration this build knows.
#[cfg(not(feature = "older-schema-range"))]
pub const SCHEMA_MAX: i64 = 20261210000001;
/// The previous release's range (feature `older-schema-range`): the tests build it to play the
/// agent a rolling upgrade replaces.
#[cfg(feature = "older-schema-range")]
pub const SCHEMA_MIN: i64 = 20261208000001;
/// The previous release's range (feature `older-schema-range`).
#[cfg(feature = "older-schema-range")]
pub const SCHEMA_MAX: i64 = 20261208000001;

/// From this version on, an agent's registry row records the end of its range
/// (`sync_agents.schema_max`); a build whose range ends before it neither writes nor reads it.
pub const RANGES_RECORDED: i64 = 20261209000001;
/// Whether this build's registry rows carry `schema_max`.
pub(crate) const RECORDS_RANGE: bool = SCHEMA_MAX >= RANGES_RECORDED;

/// The range, for messages: `20261208000001..20261209000001`.
pub fn range() -> String {
    format!("{SCHEMA_MIN}..{SCHEMA_MAX}")
}

/// The schema is outside the agent's range.
#[derive(Debug, thiserror::Error)]
pub enum SchemaError {
    /// Older than needed, never migrated, or rolled back below what it needs.
    #[error(
        "the control-plane schema is at version {found}, this sync-agent works with {}: run \
         `migrator migrate --database-url <the same URL>` first",
        range()
    )]
    TooOld {
        /// The highest applied version (0: never migrated).
        found: i64,
    },
    /// Migrated past a migration that stops agents built before it.
    #[error(
        "the control-plane schema has migration {version} ({name}), which stops sync-agents \
         built before it; this one works with {}: upgrade it (README, \"Upgrades\")",
        range()
    )]
    Stopped {
        /// The highest applied version.
        found: i64,
        /// The first applied migration that stops this agent.
        version: i64,
        /// Its name.
        name: String,
    },
    /// The database could not be read.
    #[error("cannot read the schema version: {0}")]
    Database(#[from] sqlx::Error),
}

impl SchemaError {
    /// True when the schema is out of range (as opposed to unreadable).
    pub fn out_of_range(&self) -> bool {
        !matches!(self, Self::Database(_))
    }
}

/// True if `table` exists in the control-plane schema.
pub(crate) async fn table_exists(db: &Db, table: &str) -> Result<bool, sqlx::Error> {
    Ok(db
        .fetch_optional(table_exists_sql(db.backend()), &[table.into()])
        .await?
        .map(|row| row.decode::<i64>())
        .transpose()?
        .unwrap_or(0)
        > 0)
}

/// The highest applied version, if it is inside [`SCHEMA_MIN`]..=[`SCHEMA_MAX`] or newer
/// without a migration that stops this agent.
pub async fn check(db: &Db) -> Result<i64, SchemaError> {
    if !table_exists(db, SCHEMA_HISTORY_TABLE).await? {
        return Err(SchemaError::TooOld { found: 0 });
    }
    let found = db
        .fetch_optional(
            &format!("SELECT MAX(version) FROM {SCHEMA_HISTORY_TABLE} WHERE state = 'applied'"),
            &[],
        )
        .await?
        .map(|row| row.decode::<Option<i64>>())
        .transpose()?
        .flatten()
        .unwrap_or(0);
    if found < SCHEMA_MIN {
        return Err(SchemaError::TooOld { found });
    }
    if found > SCHEMA_MAX && table_exists(db, SCHEMA_BREAKS_TABLE).await? {
        let first = db
            .fetch_optional(
                &format!(
                    "SELECT version, name FROM {SCHEMA_BREAKS_TABLE} WHERE version > ? \
                     ORDER BY version LIMIT 1"
                ),
                &[Value::Int(SCHEMA_MAX)],
            )
            .await?;
        if let Some(row) = first {
            let (version, name) = row.decode()?;
            return Err(SchemaError::Stopped {
                found,
                version,
                name,
            });
        }
    }
    Ok(found)
}
