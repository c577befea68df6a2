//! Everything the agent reads and writes in the control-plane database, over the three
//! backends: the registry of agents (`agents`), servers, their registration by name one or many at once, and their inventory
//! (`servers`, `import`, `inventory`), jobs (`jobs`) and the run
//! results they report (`outcomes`), the migrations' sync requests (`outbox`), the work queue
//! and its fenced leases (`queue`), batched completion of runs (`complete`), reachability
//! probes (`reachability`), pruning of old history (`retention`) and the counts the metrics
//! endpoint reports (`gauges`).
//!
//! SQL here uses `?` placeholders and double-quoted identifiers where a name is a reserved word
//! somewhere (`"databases"`, `"collation"`); [`Store::sql`] adapts both per backend.

mod agents;
mod complete;
mod fill;
mod gauges;
mod import;
mod inventory;
mod jobs;
mod outbox;
mod outcomes;
mod queue;
mod reachability;
mod retention;
mod servers;
mod services;

use std::borrow::Cow;

use fleetsync_common::{Backend, Db, sql::Tx};

pub use agents::{AgentRecord, AgentReport, AgentStatus, Verdicts};
pub use complete::{Completion, Reach, Recorded};
pub use gauges::FleetGauges;
pub use import::{Imported, Registered};
pub use inventory::{
    CharsetEntry, Charsets, CharsetsDocument, DatabaseRead, InventoryCounts, InventoryWrite,
    UserRead,
};
use jobs::OutcomeCounts;
pub use jobs::{JobFilter, JobRecord, NewJob, Selection};
pub use outbox::SyncRequest;
pub use outcomes::{LastRuns, OutcomeRecord, RunResult};
pub use queue::{Claim, ClaimedServer, Claimer, Renewal};
pub use retention::Pruned;
pub use servers::{
    DatabaseRecord, DatabaseService, HostKeyReset, Inventory, PinnedKey, Registration,
    ServerRecord, ServerSpec, Unreadable, UpsertOutcome, UserRecord,
};

/// The agent's view of the control-plane database.
#[derive(Debug, Clone)]
pub struct Store {
    db: Db,
}

impl Store {
    /// A store over an open database.
    pub fn new(db: Db) -> Self {
        Self { db }
    }

    /// The database.
    pub fn db(&self) -> &Db {
        &self.db
    }

    /// The backend.
    pub fn backend(&self) -> Backend {
        self.db.backend()
    }

    /// `sql` with double-quoted identifiers as the backend wants them (backticks on MySQL).
    /// Statements given here use single quotes for every string literal.
    pub fn sql<'a>(&self, sql: &'a str) -> Cow<'a, str> {
        quote_identifiers(self.backend(), sql)
    }
}

/// Double-quoted identifiers become backtick-quoted on MySQL.
pub(crate) fn quote_identifiers(backend: Backend, sql: &str) -> Cow<'_, str> {
    match backend {
        Backend::MySql => Cow::Owned(sql.replace('"', "`")),
        _ => Cow::Borrowed(sql),
    }
}

/// ` FOR UPDATE` where the backend has row locks (SQLite's write transaction is exclusive).
pub(crate) fn for_update(backend: Backend) -> &'static str {
    match backend {
        Backend::Sqlite => "",
        _ => " FOR UPDATE",
    }
}

/// `(?, ?), (?, ?)`: `n` rows of `columns` placeholders.
pub(crate) fn rows(n: usize, columns: usize) -> String {
    let row = list(columns);
    let mut s = String::with_capacity(n * (row.len() + 2));
    for i in 0..n {
        if i > 0 {
            s.push_str(", ");
        }
        s.push_str(&row);
    }
    s
}

/// `CASE id WHEN ? THEN ? ... END` with `n` branches.
pub(crate) fn case(n: usize) -> String {
    let mut s = String::with_capacity(n * 16 + 16);
    s.push_str("CASE id");
    for _ in 0..n {
        s.push_str(" WHEN ? THEN ?");
    }
    s.push_str(" END");
    s
}

/// `(?, ?, ?)` with `n` placeholders.
pub(crate) use fleetsync_common::sql::in_list as list;

/// The database's clock now, read inside the transaction (one value for a whole batch).
pub(super) async fn db_now(tx: &mut Tx) -> Result<i64, sqlx::Error> {
    let sql = format!("SELECT {}", fleetsync_common::sql::now_ms_sql(tx.backend()));
    tx.fetch_optional(&sql, &[])
        .await?
        .ok_or(sqlx::Error::RowNotFound)?
        .decode()
}

impl Store {
    /// The database's clock now, outside a transaction.
    pub(super) async fn db_now(&self) -> Result<i64, sqlx::Error> {
        let sql = format!(
            "SELECT {}",
            fleetsync_common::sql::now_ms_sql(self.backend())
        );
        self.db
            .fetch_optional(&sql, &[])
            .await?
            .ok_or(sqlx::Error::RowNotFound)?
            .decode()
    }
}

/// Largest id list per statement.
pub(super) const CHUNK: usize = fleetsync_common::sql::IN_CHUNK;

/// PostgreSQL channel told when outcomes are recorded (watchers on other agents wake up).
pub const OUTCOMES_CHANNEL: &str = "fleetsync_outcomes";
/// PostgreSQL channel told when a job is created (schedulers on other agents wake up).
pub const WORK_CHANNEL: &str = "fleetsync_work";

/// `NOTIFY` on PostgreSQL (delivered when the transaction commits); nothing elsewhere, where
/// other agents' changes are found by polling.
pub(crate) async fn notify(tx: &mut Tx, channel: &str) -> Result<(), sqlx::Error> {
    if tx.backend() == Backend::Postgres {
        tx.execute(
            "SELECT CAST(1 AS BIGINT) FROM pg_notify(?, '')",
            &[channel.into()],
        )
        .await?;
    }
    Ok(())
}
