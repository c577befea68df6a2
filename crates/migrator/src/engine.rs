//! The migration engine: status, plan, verify and migrate over one dedicated connection.
//!
//! - PostgreSQL and SQLite: a migration's statements, its history row and its outbox row commit
//!   in one transaction; a crash rolls all of it back and the next run starts it over.
//! - MySQL/MariaDB (DDL commits implicitly), and migrations marked `no-transaction`: each
//!   statement is journaled in the history row after it runs; a retry resumes at the first
//!   statement not journaled, and first asks the catalog whether that statement already ran
//!   (the journal may lag one statement behind a crash). The outbox row and the final state
//!   commit together in one transaction.
//! - Locking through the database only: PostgreSQL advisory lock, MySQL `GET_LOCK`, SQLite
//!   `BEGIN IMMEDIATE` around each migration (with the busy timeout). History is re-read once
//!   the lock is held.

use std::{
    collections::BTreeSet,
    time::{Duration, Instant},
};

use fleetsync_common::{Backend, Db, sql::Value};

use crate::{
    conn::{self, Conn, HistoryRow, OUTBOX_TABLE, bootstrap_sql},
    migration::{Migration, MigrationSet},
};

/// Name of the PostgreSQL advisory lock key and the MySQL named lock.
const LOCK_NAME: &str = "fleetsync_migrate";
/// PostgreSQL advisory lock key (a fixed 64-bit number: "fleetsyn" in ASCII).
const PG_LOCK_KEY: i64 = 0x666c_6565_7473_796e;

/// History states.
pub mod state {
    /// Applied completely.
    pub const APPLIED: &str = "applied";
    /// Interrupted part-way; resumable.
    pub const PARTIAL: &str = "partial";
    /// A statement failed; re-run once fixed.
    pub const FAILED: &str = "failed";
}

/// What can stop the engine.
#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    /// The database failed or went away.
    #[error("database error while {doing}: {source}")]
    Database {
        /// What the engine was doing.
        doing: String,
        /// The driver's error.
        #[source]
        source: sqlx::Error,
    },
    /// Another migrator held the lock for longer than the lock timeout.
    #[error("another migrator holds the migration lock; gave up after {0:?}")]
    LockTimeout(Duration),
    /// An applied migration's text changed since it was applied.
    #[error(
        "migration {version} ({name}) was edited after it was applied: applied checksum \
         {applied}, binary checksum {binary}. Restore the original file; add a new migration \
         for the change"
    )]
    ChecksumMismatch {
        /// Version.
        version: i64,
        /// Name.
        name: String,
        /// Checksum recorded when applied.
        applied: String,
        /// Checksum of the binary's text.
        binary: String,
    },
    /// The statements a partial migration already ran were changed.
    #[error(
        "migration {version} ({name}) is partly applied ({done} statements) and those statements \
         were edited since; restore them, then run migrate again"
    )]
    PartialEdited {
        /// Version.
        version: i64,
        /// Name.
        name: String,
        /// Statements done.
        done: i64,
    },
    /// The database has versions this binary does not know: a newer migrator ran.
    #[error(
        "the database has migrations this binary does not know: {}. It was migrated by a newer \
         fleetsync; use that version",
        .0.iter().map(i64::to_string).collect::<Vec<_>>().join(", ")
    )]
    UnknownVersions(Vec<i64>),
    /// `--target` names no migration.
    #[error("no migration has version {0}")]
    UnknownTarget(i64),
    /// A statement failed; nothing of the migration is applied (transactional backends) or the
    /// statements before it are (MySQL), and the next run retries from there.
    #[error(
        "migration {version} ({name}) failed at statement {index} of {total}: {error}\n  statement: {statement}"
    )]
    StatementFailed {
        /// Version.
        version: i64,
        /// Name.
        name: String,
        /// 1-based index of the failing statement.
        index: usize,
        /// Statements in the migration.
        total: usize,
        /// The statement.
        statement: String,
        /// The database's error.
        error: String,
    },
}

impl EngineError {
    /// True for refusals that mean "the binary and the database disagree", as opposed to a
    /// failure while running. The CLI exits with a distinct status for these.
    pub fn is_verification(&self) -> bool {
        matches!(
            self,
            Self::ChecksumMismatch { .. }
                | Self::PartialEdited { .. }
                | Self::UnknownVersions(_)
                | Self::UnknownTarget(_)
        )
    }
}

fn db_err(doing: impl Into<String>) -> impl FnOnce(sqlx::Error) -> EngineError {
    let doing = doing.into();
    move |source| EngineError::Database { doing, source }
}

/// Where one migration stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum State {
    /// Not applied.
    Pending,
    /// Applied.
    Applied,
    /// Interrupted part-way (journaled migrations).
    Partial,
    /// Failed on a statement.
    Failed,
}

impl State {
    fn from_history(row: Option<&HistoryRow>) -> Self {
        match row.map(|r| r.state.as_str()) {
            None => Self::Pending,
            Some(state::APPLIED) => Self::Applied,
            Some(state::PARTIAL) => Self::Partial,
            Some(_) => Self::Failed,
        }
    }

    /// Lowercase name.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Pending => "pending",
            Self::Applied => "applied",
            Self::Partial => "partial",
            Self::Failed => "failed",
        }
    }
}

/// One migration with what the database records of it.
#[derive(Debug, Clone)]
pub struct MigrationStatus {
    /// The binary's migration.
    pub migration: Migration,
    /// Where it stands.
    pub state: State,
    /// Its history row, if any.
    pub history: Option<History>,
}

/// What the history table records of one migration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct History {
    /// Checksum at the time it was applied.
    pub checksum: String,
    /// Statements done.
    pub statements_applied: i64,
    /// Statements in it then.
    pub statements_total: i64,
    /// Start of the last attempt (ms since epoch).
    pub started_at: Option<i64>,
    /// End of the applying attempt or the failure (ms since epoch).
    pub finished_at: Option<i64>,
    /// Duration of the applying attempt.
    pub duration_ms: Option<i64>,
    /// `user@host` of the process that ran it.
    pub installed_by: String,
    /// Id of the run that last touched it.
    pub run_id: String,
    /// Error of a failed attempt.
    pub error: Option<String>,
    /// Statement that failed.
    pub failing_statement: Option<String>,
}

impl From<&HistoryRow> for History {
    fn from(row: &HistoryRow) -> Self {
        Self {
            checksum: row.checksum.clone(),
            statements_applied: row.statements_applied,
            statements_total: row.statements_total,
            started_at: row.started_at,
            finished_at: row.finished_at,
            duration_ms: row.duration_ms,
            installed_by: row.installed_by.clone(),
            run_id: row.run_id.clone(),
            error: row.error.clone(),
            failing_statement: row.failing_statement.clone(),
        }
    }
}

/// The database's schema state against the binary.
#[derive(Debug, Clone)]
pub struct Status {
    /// Backend.
    pub backend: Backend,
    /// Highest applied version (0 if none).
    pub current_version: i64,
    /// Highest version the binary knows.
    pub latest_version: i64,
    /// Every known migration, ascending.
    pub migrations: Vec<MigrationStatus>,
    /// Versions in the database the binary does not know.
    pub unknown_versions: Vec<i64>,
    /// Sync requests not yet taken by an agent.
    pub pending_sync_requests: i64,
}

/// A migration `migrate` would run, with its exact SQL.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Planned {
    /// Version.
    pub version: i64,
    /// Name.
    pub name: String,
    /// Whether it runs in one transaction.
    pub transactional: bool,
    /// Statements still to run, in order.
    pub statements: Vec<String>,
    /// Data to re-sync.
    pub resync: Vec<String>,
}

/// Something wrong between the database and the binary.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    /// The version concerned.
    pub version: i64,
    /// What is wrong.
    pub problem: String,
}

/// Progress of a `migrate`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// A migration started.
    Started {
        /// Version.
        version: i64,
        /// Name.
        name: String,
        /// Statements to run in this attempt.
        statements: usize,
    },
    /// A migration was applied.
    Applied {
        /// Version.
        version: i64,
        /// How long it took.
        duration: Duration,
        /// Id of the sync request it recorded, if any.
        sync_request: Option<String>,
    },
    /// A migration failed.
    Failed {
        /// Version.
        version: i64,
        /// How long it ran.
        duration: Duration,
        /// The error.
        error: String,
        /// The statement that failed.
        statement: String,
    },
}

/// What a `migrate` did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Report {
    /// Versions applied by this run, in order.
    pub applied: Vec<i64>,
    /// Highest applied version afterwards.
    pub current_version: i64,
    /// Sync requests recorded by this run.
    pub sync_requests: Vec<String>,
}

/// Engine settings.
#[derive(Debug, Clone)]
pub struct Options {
    /// Longest wait for another migrator's lock.
    pub lock_timeout: Duration,
    /// Recorded as `installed_by`.
    pub installed_by: String,
    /// Test hook: the process kills itself (SIGKILL) on reaching this point (see
    /// [`Engine::crash_points`]).
    pub crash_at: Option<String>,
}

impl Default for Options {
    fn default() -> Self {
        Self {
            lock_timeout: Duration::from_secs(60),
            installed_by: default_installed_by(),
            crash_at: None,
        }
    }
}

/// `user@host` of this process.
pub fn default_installed_by() -> String {
    let user = std::env::var("USER")
        .or_else(|_| std::env::var("LOGNAME"))
        .unwrap_or_else(|_| "unknown".into());
    let host = std::fs::read_to_string("/etc/hostname")
        .map(|h| h.trim().to_owned())
        .unwrap_or_else(|_| "localhost".into());
    format!("{user}@{host}")
}

pub use fleetsync_common::clock::now_ms;

impl EngineError {
    /// True for a deadlock or serialisation failure: running the migration again is the cure.
    pub fn is_conflict(&self) -> bool {
        matches!(self, Self::Database { source, .. } if fleetsync_common::sql::classify(source) == fleetsync_common::sql::Failure::Conflict)
    }
}

/// The migration engine over one database and one migration set.
#[derive(Debug, Clone)]
pub struct Engine {
    db: Db,
    set: MigrationSet,
    options: Options,
}

impl Engine {
    /// An engine for the embedded migrations of the database's backend.
    pub fn new(db: Db, options: Options) -> Self {
        let set = MigrationSet::embedded(db.backend());
        Self::with_set(db, set, options)
    }

    /// An engine with a migration set of one's own (tests).
    pub fn with_set(db: Db, set: MigrationSet, options: Options) -> Self {
        Self { db, set, options }
    }

    /// The migrations it knows.
    pub fn migrations(&self) -> &MigrationSet {
        &self.set
    }

    /// The backend.
    pub fn backend(&self) -> Backend {
        self.db.backend()
    }

    /// Every crash point a `migrate` from scratch passes, in order (for fault-injection tests):
    /// `V:K` after statement K of version V ran, `V:K:journal` after it was journaled
    /// (journaled migrations only), `V:commit` after the migration committed.
    pub fn crash_points(&self) -> Vec<String> {
        let mut points = Vec::new();
        for m in self.set.iter() {
            let journaled = self.journaled(m);
            for k in 1..=m.statements.len() {
                points.push(format!("{}:{k}", m.version));
                if journaled {
                    points.push(format!("{}:{k}:journal", m.version));
                }
            }
            points.push(format!("{}:commit", m.version));
        }
        points
    }

    fn journaled(&self, m: &Migration) -> bool {
        !m.transactional || self.backend() == Backend::MySql
    }

    /// The schema state. Writes nothing.
    pub async fn status(&self) -> Result<Status, EngineError> {
        let mut conn = Conn::open(&self.db).await.map_err(db_err("connecting"))?;
        let history = conn::history(&mut conn)
            .await
            .map_err(db_err("reading history"));
        let pending = match &history {
            Ok(_)
                if conn::table_exists(&mut conn, OUTBOX_TABLE)
                    .await
                    .map_err(db_err("reading outbox"))? =>
            {
                conn.scalar(
                    &format!("SELECT COUNT(*) FROM {OUTBOX_TABLE} WHERE state = 'pending'"),
                    &[],
                )
                .await
                .map_err(db_err("reading outbox"))?
                .unwrap_or(0)
            }
            _ => 0,
        };
        conn.close().await;
        let history = history?;
        Ok(self.status_from(&history, pending))
    }

    fn status_from(&self, history: &[HistoryRow], pending_sync_requests: i64) -> Status {
        let migrations = self
            .set
            .iter()
            .map(|m| {
                let row = history.iter().find(|r| r.version == m.version);
                MigrationStatus {
                    migration: m.clone(),
                    state: State::from_history(row),
                    history: row.map(History::from),
                }
            })
            .collect();
        Status {
            backend: self.backend(),
            current_version: current_version(history),
            latest_version: self.set.latest(),
            migrations,
            unknown_versions: self.unknown_versions(history),
            pending_sync_requests,
        }
    }

    fn unknown_versions(&self, history: &[HistoryRow]) -> Vec<i64> {
        history
            .iter()
            .filter(|r| self.set.get(r.version).is_none())
            .map(|r| r.version)
            .collect()
    }

    /// The exact SQL `migrate` would run now, up to `target` (0: the latest). Writes nothing.
    pub async fn plan(&self, target: i64) -> Result<Vec<Planned>, EngineError> {
        let target = self.resolve_target(target)?;
        let mut conn = Conn::open(&self.db).await.map_err(db_err("connecting"))?;
        let history = conn::history(&mut conn)
            .await
            .map_err(db_err("reading history"));
        conn.close().await;
        let history = history?;
        self.check(&history)?;
        Ok(self
            .set
            .iter()
            .filter(|m| m.version <= target)
            .filter_map(|m| {
                let row = history.iter().find(|r| r.version == m.version);
                let done = match row {
                    Some(r) if r.state == state::APPLIED => return None,
                    Some(r) if self.journaled(m) => r.statements_applied.max(0) as usize,
                    _ => 0,
                };
                Some(Planned {
                    version: m.version,
                    name: m.name.clone(),
                    transactional: !self.journaled(m),
                    statements: m.statements[done.min(m.statements.len())..].to_vec(),
                    resync: m.resync.iter().map(|s| s.as_str().to_owned()).collect(),
                })
            })
            .collect())
    }

    /// Everything wrong between the database and the binary; empty if all is well. Writes
    /// nothing.
    pub async fn verify(&self) -> Result<Vec<Problem>, EngineError> {
        let mut conn = Conn::open(&self.db).await.map_err(db_err("connecting"))?;
        let history = conn::history(&mut conn)
            .await
            .map_err(db_err("reading history"));
        conn.close().await;
        let history = history?;
        let mut problems = Vec::new();
        for version in self.unknown_versions(&history) {
            problems.push(Problem {
                version,
                problem: "recorded in the database but unknown to this binary (a newer \
                          fleetsync migrated it)"
                    .into(),
            });
        }
        let current = current_version(&history);
        for m in self.set.iter() {
            let row = history.iter().find(|r| r.version == m.version);
            match row {
                Some(r) if r.state == state::APPLIED && r.checksum != m.checksum => {
                    problems.push(Problem {
                        version: m.version,
                        problem: format!(
                            "checksum mismatch: applied {}, binary {} (the file was edited)",
                            r.checksum, m.checksum
                        ),
                    });
                }
                Some(r) if r.state == state::PARTIAL => problems.push(Problem {
                    version: m.version,
                    problem: format!(
                        "partially applied ({} of {} statements): run migrate to finish it",
                        r.statements_applied, r.statements_total
                    ),
                }),
                Some(r) if r.state == state::FAILED => problems.push(Problem {
                    version: m.version,
                    problem: format!(
                        "failed: {}: run migrate again once fixed",
                        r.error.as_deref().unwrap_or("unknown error")
                    ),
                }),
                None if m.version < current => problems.push(Problem {
                    version: m.version,
                    problem: format!(
                        "missing: older than the applied version {current} but never applied"
                    ),
                }),
                _ => {}
            }
        }
        Ok(problems)
    }

    fn resolve_target(&self, target: i64) -> Result<i64, EngineError> {
        if target == 0 {
            return Ok(self.set.latest());
        }
        self.set
            .get(target)
            .map(|m| m.version)
            .ok_or(EngineError::UnknownTarget(target))
    }

    /// Refuses a database that disagrees with the binary.
    fn check(&self, history: &[HistoryRow]) -> Result<(), EngineError> {
        let unknown = self.unknown_versions(history);
        if !unknown.is_empty() {
            return Err(EngineError::UnknownVersions(unknown));
        }
        for row in history {
            let Some(m) = self.set.get(row.version) else {
                continue;
            };
            if row.state == state::APPLIED && row.checksum != m.checksum {
                return Err(EngineError::ChecksumMismatch {
                    version: m.version,
                    name: m.name.clone(),
                    applied: row.checksum.clone(),
                    binary: m.checksum.clone(),
                });
            }
            if row.state != state::APPLIED && self.journaled(m) && row.statements_applied > 0 {
                let done = row.statements_applied as usize;
                if done > m.statements.len()
                    || row.prefix_checksum.as_deref() != Some(&m.prefix_checksum(done))
                {
                    return Err(EngineError::PartialEdited {
                        version: m.version,
                        name: m.name.clone(),
                        done: row.statements_applied,
                    });
                }
            }
        }
        Ok(())
    }

    /// Applies pending migrations up to `target` (0: the latest), calling `on_event` as it
    /// goes. Stops at the first failure, which is returned (and recorded in the history).
    pub async fn migrate(
        &self,
        target: i64,
        on_event: &mut (dyn FnMut(Event) + Send),
    ) -> Result<Report, EngineError> {
        // A deadlock or serialisation failure (with the agent writing the outbox, say) rolls
        // the transaction back; the run starts over under the lock, from the history.
        let mut tries = 1;
        loop {
            match self.migrate_once(target, on_event).await {
                Err(err) if tries < fleetsync_common::sql::MAX_ATTEMPTS && err.is_conflict() => {
                    tracing::warn!(error = %err, tries, "migration conflicted with concurrent writes; starting over");
                    tokio::time::sleep(fleetsync_common::clock::jitter(
                        Duration::from_millis(20 * u64::from(tries)),
                        0.5,
                    ))
                    .await;
                    tries += 1;
                }
                other => return other,
            }
        }
    }

    async fn migrate_once(
        &self,
        target: i64,
        on_event: &mut (dyn FnMut(Event) + Send),
    ) -> Result<Report, EngineError> {
        let target = self.resolve_target(target)?;
        let mut conn = Conn::open(&self.db).await.map_err(db_err("connecting"))?;
        let result = self.migrate_locked(&mut conn, target, on_event).await;
        self.unlock(&mut conn).await;
        // Closing the connection releases a lock that unlock could not.
        conn.close().await;
        result
    }

    async fn migrate_locked(
        &self,
        conn: &mut Conn,
        target: i64,
        on_event: &mut (dyn FnMut(Event) + Send),
    ) -> Result<Report, EngineError> {
        self.lock(conn).await?;
        self.bootstrap(conn).await?;
        let history = conn::history(conn)
            .await
            .map_err(db_err("reading history"))?;
        self.check(&history)?;
        let run_id = format!("{:x}-{:x}", now_ms(), std::process::id());

        let mut report = Report::default();
        for m in self.set.iter().filter(|m| m.version <= target) {
            let row = history.iter().find(|r| r.version == m.version);
            if row.is_some_and(|r| r.state == state::APPLIED) {
                continue;
            }
            let started = Instant::now();
            let outcome = if self.journaled(m) {
                self.apply_journaled(conn, m, &run_id, on_event).await
            } else {
                self.apply_transactional(conn, m, &run_id, on_event).await
            };
            match outcome {
                Ok(Applied::Now { sync_request }) => {
                    report.applied.push(m.version);
                    if let Some(id) = &sync_request {
                        report.sync_requests.push(id.clone());
                    }
                    on_event(Event::Applied {
                        version: m.version,
                        duration: started.elapsed(),
                        sync_request,
                    });
                }
                Ok(Applied::ByAnother) => {}
                Err(err) => {
                    if let EngineError::StatementFailed {
                        error, statement, ..
                    } = &err
                    {
                        on_event(Event::Failed {
                            version: m.version,
                            duration: started.elapsed(),
                            error: error.clone(),
                            statement: statement.clone(),
                        });
                    }
                    return Err(err);
                }
            }
        }
        let history = conn::history(conn)
            .await
            .map_err(db_err("reading history"))?;
        report.current_version = current_version(&history);
        Ok(report)
    }

    async fn lock(&self, conn: &mut Conn) -> Result<(), EngineError> {
        let deadline = Instant::now() + self.options.lock_timeout;
        match conn.backend() {
            // SQLite: each migration takes the write lock with BEGIN IMMEDIATE.
            Backend::Sqlite => Ok(()),
            Backend::Postgres => loop {
                let got = conn
                    .scalar(
                        "SELECT CAST(CASE WHEN pg_try_advisory_lock(?) THEN 1 ELSE 0 END AS BIGINT)",
                        &[Value::Int(PG_LOCK_KEY)],
                    )
                    .await
                    .map_err(db_err("taking the migration lock"))?;
                if got == Some(1) {
                    return Ok(());
                }
                if Instant::now() >= deadline {
                    return Err(EngineError::LockTimeout(self.options.lock_timeout));
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            },
            Backend::MySql => {
                let seconds = self.options.lock_timeout.as_secs_f64().ceil() as i64;
                let got = conn
                    .scalar(
                        "SELECT GET_LOCK(?, ?)",
                        &[Value::Text(LOCK_NAME.into()), Value::Int(seconds)],
                    )
                    .await
                    .map_err(db_err("taking the migration lock"))?;
                if got == Some(1) {
                    Ok(())
                } else {
                    Err(EngineError::LockTimeout(self.options.lock_timeout))
                }
            }
        }
    }

    async fn unlock(&self, conn: &mut Conn) {
        let result = match conn.backend() {
            Backend::Sqlite => return,
            Backend::Postgres => conn
                .scalar(
                    "SELECT CAST(CASE WHEN pg_advisory_unlock(?) THEN 1 ELSE 0 END AS BIGINT)",
                    &[Value::Int(PG_LOCK_KEY)],
                )
                .await
                .map(drop),
            Backend::MySql => conn
                .scalar("SELECT RELEASE_LOCK(?)", &[Value::Text(LOCK_NAME.into())])
                .await
                .map(drop),
        };
        if let Err(err) = result {
            tracing::warn!(error = %err, "releasing the migration lock failed; closing the connection releases it");
        }
    }

    async fn bootstrap(&self, conn: &mut Conn) -> Result<(), EngineError> {
        let sqlite = conn.backend() == Backend::Sqlite;
        if sqlite {
            conn.raw("BEGIN IMMEDIATE")
                .await
                .map_err(db_err("locking the database"))?;
        }
        for ddl in bootstrap_sql(conn.backend()) {
            if let Err(err) = conn.raw(&ddl).await {
                if sqlite {
                    let _ = conn.raw("ROLLBACK").await;
                }
                return Err(db_err("creating the history table")(err));
            }
        }
        if sqlite {
            conn.raw("COMMIT")
                .await
                .map_err(db_err("creating the history table"))?;
        }
        Ok(())
    }

    /// The test hook: SIGKILL this process at `point`.
    fn crash_point(&self, point: &str) {
        if self.options.crash_at.as_deref() == Some(point) {
            eprintln!("crash point {point} reached: killing this process");
            let pid = std::process::id().to_string();
            let _ = std::process::Command::new("kill")
                .args(["-KILL", &pid])
                .status();
            // SIGKILL is not instant; never go on past the point.
            loop {
                std::thread::sleep(Duration::from_secs(1));
            }
        }
    }

    async fn apply_transactional(
        &self,
        conn: &mut Conn,
        m: &Migration,
        run_id: &str,
        on_event: &mut (dyn FnMut(Event) + Send),
    ) -> Result<Applied, EngineError> {
        let begin = match conn.backend() {
            Backend::Sqlite => "BEGIN IMMEDIATE",
            _ => "BEGIN",
        };
        conn.raw(begin)
            .await
            .map_err(db_err("starting a transaction"))?;
        // Under the lock: another migrator may have applied it since history was read.
        let row = match conn::history_row(conn, m.version).await {
            Ok(row) => row,
            Err(err) => return Err(rollback(conn, db_err("reading history")(err)).await),
        };
        if row.as_ref().is_some_and(|r| r.state == state::APPLIED) {
            conn.raw("COMMIT").await.map_err(db_err("committing"))?;
            return Ok(Applied::ByAnother);
        }
        on_event(Event::Started {
            version: m.version,
            name: m.name.clone(),
            statements: m.statements.len(),
        });
        let started_at = now_ms();
        let started = Instant::now();
        for (i, statement) in m.statements.iter().enumerate() {
            if let Err(err) = conn.raw(statement).await {
                let err = statement_failed(m, i, &err);
                let _ = conn.raw("ROLLBACK").await;
                self.record_failure(conn, m, run_id, started_at, 0, &err)
                    .await;
                return Err(err);
            }
            self.crash_point(&format!("{}:{}", m.version, i + 1));
        }
        // A row left by a failed attempt is replaced.
        let record = async {
            conn.execute(
                "DELETE FROM fleetsync_schema_history WHERE version = ?",
                &[Value::Int(m.version)],
            )
            .await?;
            insert_history(
                conn,
                m,
                state::APPLIED,
                m.statements.len(),
                run_id,
                started_at,
                &self.options.installed_by,
            )
            .await
        };
        if let Err(err) = record.await {
            return Err(rollback(conn, db_err("recording the migration")(err)).await);
        }
        self.commit_applied(conn, m, started).await
    }

    async fn apply_journaled(
        &self,
        conn: &mut Conn,
        m: &Migration,
        run_id: &str,
        on_event: &mut (dyn FnMut(Event) + Send),
    ) -> Result<Applied, EngineError> {
        let row = conn::history_row(conn, m.version)
            .await
            .map_err(db_err("reading history"))?;
        if row.as_ref().is_some_and(|r| r.state == state::APPLIED) {
            return Ok(Applied::ByAnother);
        }
        let started_at = now_ms();
        let started = Instant::now();
        let resuming = row.is_some();
        let done = row
            .as_ref()
            .map_or(0, |r| r.statements_applied.max(0) as usize);
        if resuming {
            conn.execute(
                "UPDATE fleetsync_schema_history SET state = ?, started_at = ?, run_id = ?, \
                 installed_by = ?, checksum = ?, statements_total = ? WHERE version = ?",
                &[
                    Value::Text(state::PARTIAL.into()),
                    Value::Int(started_at),
                    Value::Text(run_id.into()),
                    Value::Text(self.options.installed_by.clone()),
                    Value::Text(m.checksum.clone()),
                    Value::Int(m.statements.len() as i64),
                    Value::Int(m.version),
                ],
            )
            .await
            .map_err(db_err("journaling"))?;
        } else {
            insert_history(
                conn,
                m,
                state::PARTIAL,
                0,
                run_id,
                started_at,
                &self.options.installed_by,
            )
            .await
            .map_err(db_err("journaling"))?;
        }
        on_event(Event::Started {
            version: m.version,
            name: m.name.clone(),
            statements: m.statements.len() - done.min(m.statements.len()),
        });
        for (i, statement) in m.statements.iter().enumerate().skip(done) {
            // The journal may lag one statement behind a crash: ask the catalog first.
            let already = resuming && i == done && already_applied(conn, statement).await?;
            if already {
                tracing::info!(
                    version = m.version,
                    statement = i + 1,
                    "statement already in the catalog, not run again"
                );
            } else if let Err(err) = conn.raw(statement).await {
                let err = statement_failed(m, i, &err);
                self.record_failure(conn, m, run_id, started_at, i, &err)
                    .await;
                return Err(err);
            }
            self.crash_point(&format!("{}:{}", m.version, i + 1));
            conn.execute(
                "UPDATE fleetsync_schema_history SET statements_applied = ?, prefix_checksum = ?, \
                 error = NULL, failing_statement = NULL WHERE version = ?",
                &[
                    Value::Int(i as i64 + 1),
                    Value::Text(m.prefix_checksum(i + 1)),
                    Value::Int(m.version),
                ],
            )
            .await
            .map_err(db_err("journaling"))?;
            self.crash_point(&format!("{}:{}:journal", m.version, i + 1));
        }
        // The final state and the outbox row commit together.
        conn.raw("BEGIN")
            .await
            .map_err(db_err("starting a transaction"))?;
        self.commit_applied(conn, m, started).await
    }

    /// Inside the migration's open transaction: marks it applied, records its sync request,
    /// commits. The history row and the outbox row commit together or not at all.
    async fn commit_applied(
        &self,
        conn: &mut Conn,
        m: &Migration,
        started: Instant,
    ) -> Result<Applied, EngineError> {
        let finish = async {
            conn.execute(
                "UPDATE fleetsync_schema_history SET state = ?, finished_at = ?, duration_ms = ? \
                 WHERE version = ?",
                &[
                    Value::Text(state::APPLIED.into()),
                    Value::Int(now_ms()),
                    Value::Int(started.elapsed().as_millis() as i64),
                    Value::Int(m.version),
                ],
            )
            .await?;
            record_sync_request(conn, m).await
        };
        let sync_request = match finish.await {
            Ok(id) => id,
            Err(err) => return Err(rollback(conn, db_err("recording the migration")(err)).await),
        };
        conn.raw("COMMIT").await.map_err(db_err("committing"))?;
        self.crash_point(&format!("{}:commit", m.version));
        Ok(Applied::Now { sync_request })
    }

    /// Records a failed attempt, so that `status` shows it. Best effort: the error itself is
    /// what the caller reports.
    async fn record_failure(
        &self,
        conn: &mut Conn,
        m: &Migration,
        run_id: &str,
        started_at: i64,
        done: usize,
        err: &EngineError,
    ) {
        let EngineError::StatementFailed {
            error, statement, ..
        } = err
        else {
            return;
        };
        let result = async {
            let exists = conn
                .scalar(
                    "SELECT COUNT(*) FROM fleetsync_schema_history WHERE version = ?",
                    &[Value::Int(m.version)],
                )
                .await?
                > Some(0);
            if !exists {
                insert_history(
                    conn,
                    m,
                    state::FAILED,
                    done,
                    run_id,
                    started_at,
                    &self.options.installed_by,
                )
                .await?;
            }
            conn.execute(
                "UPDATE fleetsync_schema_history SET state = ?, error = ?, failing_statement = ?, \
                 finished_at = ? WHERE version = ?",
                &[
                    Value::Text(state::FAILED.into()),
                    Value::Text(error.clone()),
                    Value::Text(statement.clone()),
                    Value::Int(now_ms()),
                    Value::Int(m.version),
                ],
            )
            .await
        }
        .await;
        if let Err(record) = result {
            tracing::warn!(version = m.version, error = %record, "could not record the failed migration");
        }
    }
}

enum Applied {
    Now { sync_request: Option<String> },
    ByAnother,
}

async fn rollback(conn: &mut Conn, err: EngineError) -> EngineError {
    let _ = conn.raw("ROLLBACK").await;
    err
}

fn statement_failed(m: &Migration, i: usize, err: &sqlx::Error) -> EngineError {
    let error = match err {
        sqlx::Error::Database(db) => db.message().to_owned(),
        other => other.to_string(),
    };
    EngineError::StatementFailed {
        version: m.version,
        name: m.name.clone(),
        index: i + 1,
        total: m.statements.len(),
        statement: m.statements[i].clone(),
        error,
    }
}

fn current_version(history: &[HistoryRow]) -> i64 {
    history
        .iter()
        .filter(|r| r.state == state::APPLIED)
        .map(|r| r.version)
        .max()
        .unwrap_or(0)
}

async fn insert_history(
    conn: &mut Conn,
    m: &Migration,
    state: &str,
    done: usize,
    run_id: &str,
    started_at: i64,
    installed_by: &str,
) -> Result<u64, sqlx::Error> {
    let resync: BTreeSet<&str> = m.resync.iter().map(|s| s.as_str()).collect();
    conn.execute(
        "INSERT INTO fleetsync_schema_history (version, name, checksum, state, \
         statements_applied, statements_total, prefix_checksum, started_at, installed_by, run_id, \
         resync) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
        &[
            Value::Int(m.version),
            Value::Text(m.name.clone()),
            Value::Text(m.checksum.clone()),
            Value::Text(state.into()),
            Value::Int(done as i64),
            Value::Int(m.statements.len() as i64),
            Value::Text(m.prefix_checksum(done)),
            Value::Int(started_at),
            Value::Text(installed_by.into()),
            Value::Text(run_id.into()),
            Value::Text(resync.into_iter().collect::<Vec<_>>().join(",")),
        ],
    )
    .await
}

/// Id of the sync request a migration records: one per migration, so recording it twice is
/// impossible and the agent deduplicates on it.
pub fn sync_request_id(version: i64) -> String {
    format!("migration-{version}")
}

/// Records the migration's sync request in the outbox, if it declares re-sync scopes.
async fn record_sync_request(
    conn: &mut Conn,
    m: &Migration,
) -> Result<Option<String>, sqlx::Error> {
    if m.resync.is_empty() {
        return Ok(None);
    }
    let id = sync_request_id(m.version);
    let exists = conn
        .scalar(
            &format!("SELECT COUNT(*) FROM {OUTBOX_TABLE} WHERE id = ?"),
            &[Value::Text(id.clone())],
        )
        .await?
        > Some(0);
    if !exists {
        let scopes: Vec<&str> = m.resync.iter().map(|s| s.as_str()).collect();
        conn.execute(
            &format!(
                "INSERT INTO {OUTBOX_TABLE} (id, origin, migration_version, scopes, reason, state, \
                 created_at) VALUES (?, 'migration', ?, ?, ?, 'pending', ?)"
            ),
            &[
                Value::Text(id.clone()),
                Value::Int(m.version),
                Value::Text(scopes.join(",")),
                Value::Text(format!("migration {} {}", m.version, m.name)),
                Value::Int(now_ms()),
            ],
        )
        .await?;
    }
    Ok(Some(id))
}

/// Whether a statement's effect is already in the catalog: `CREATE TABLE t`, `CREATE [UNIQUE]
/// INDEX i ON t`, `ALTER TABLE t ADD [COLUMN] c`. Other statements are run again (migrations
/// that cannot commit atomically must keep such statements idempotent).
async fn already_applied(conn: &mut Conn, statement: &str) -> Result<bool, EngineError> {
    let Some(effect) = Effect::of(statement) else {
        return Ok(false);
    };
    let result = match &effect {
        Effect::Table(table) => conn::table_exists(conn, table).await,
        Effect::Column(table, column) => conn::column_exists(conn, table, column).await,
        Effect::Index(table, index) => conn::index_exists(conn, table, index).await,
    };
    result.map_err(db_err("checking the catalog"))
}

/// What a DDL statement creates.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Effect {
    Table(String),
    Column(String, String),
    Index(String, String),
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
