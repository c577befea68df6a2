//! The agent never changes the schema (the migrator does): it checks at start-up that the
//! control-plane database is migrated far enough, and refuses to run otherwise.

use fleetsync_common::{Backend, Db};

/// The newest migration whose tables the agent uses (`zones_and_second_opinions`).
pub const REQUIRED_VERSION: i64 = 20261208000001;

/// The schema is not what the agent needs.
#[derive(Debug, thiserror::Error)]
pub enum SchemaError {
    /// Older than needed, or never migrated.
    #[error(
        "the control-plane schema is at version {found}, the sync-agent needs {REQUIRED_VERSION}: \
         run `migrator migrate --database-url <the same URL>` first"
    )]
    TooOld {
        /// The highest applied version (0: never migrated).
        found: i64,
    },
    /// The database could not be read.
    #[error("cannot read the schema version: {0}")]
    Database(#[from] sqlx::Error),
}

/// Succeeds if every migration up to [`REQUIRED_VERSION`] is applied.
pub async fn check(db: &Db) -> Result<i64, SchemaError> {
    let exists = match db.backend() {
        Backend::Sqlite => {
            "SELECT COUNT(*) FROM sqlite_master WHERE type = 'table' AND name = 'fleetsync_schema_history'"
        }
        Backend::Postgres => {
            "SELECT COUNT(*) FROM information_schema.tables WHERE table_schema = current_schema() \
             AND table_name = 'fleetsync_schema_history'"
        }
        Backend::MySql => {
            "SELECT COUNT(*) FROM information_schema.tables WHERE table_schema = DATABASE() \
             AND table_name = 'fleetsync_schema_history'"
        }
    };
    let exists = db
        .fetch_optional(exists, &[])
        .await?
        .map(|r| r.int(0))
        .transpose()?
        .unwrap_or(0)
        > 0;
    let found = if exists {
        db.fetch_optional(
            "SELECT MAX(version) FROM fleetsync_schema_history WHERE state = 'applied'",
            &[],
        )
        .await?
        .map(|r| r.opt_int(0))
        .transpose()?
        .flatten()
        .unwrap_or(0)
    } else {
        0
    };
    if found < REQUIRED_VERSION {
        return Err(SchemaError::TooOld { found });
    }
    Ok(found)
}
