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
//! - The way down (`--target` below the current version) runs reverses newest first with the
//!   same guarantees, journaled in `fleetsync_schema_rollbacks` where DDL commits by itself; an
//!   interrupted way down is finished before anything else.
//!
//! Here: the engine's API (status, plan, verify, migrate) and its options; `report` holds what
//! it reports, `apply` the lock and both apply paths with the rows they write, `revert` the
//! way down, `ddl` the catalog check of a resumed statement and what a reverse would destroy.

mod apply;
mod ddl;
mod error;
mod report;
mod revert;

pub use crate::history::History;
pub use crate::model::State;
pub use apply::sync_request_id;
use apply::{Applied, current_version};
pub use ddl::Loss;
pub use error::EngineError;
use error::db_err;
pub use report::{Event, MigrationStatus, Plan, Planned, Problem, Report, Status};

use std::time::{Duration, Instant};

use fleetsync_common::{Backend, Db, clock::now_ms, model::RequestState};

use crate::{
    agents::{LiveAgent, live_agents},
    catalog::table_exists,
    history::{self, Conn, Rollback},
    migration::{Migration, MigrationSet},
    outbox::OUTBOX_TABLE,
};

/// Name of the PostgreSQL advisory lock key and the MySQL named lock.
const LOCK_NAME: &str = "fleetsync_migrate";
/// PostgreSQL advisory lock key (a fixed 64-bit number: "fleetsyn" in ASCII).
const PG_LOCK_KEY: i64 = 0x666c_6565_7473_796e;

/// Engine settings.
#[derive(Debug, Clone)]
pub struct Options {
    /// Longest wait for another migrator's lock.
    pub lock_timeout: Duration,
    /// Recorded as `installed_by`.
    pub installed_by: String,
    /// Apply a migration that stops serving agents built before it, or roll back below the
    /// range of serving agents (`--stop-agents`).
    pub stop_agents: bool,
    /// Roll back even where a reverse destroys data (`--allow-data-loss`).
    pub allow_data_loss: bool,
    /// Test hook (feature `crash-points`): the process kills itself (SIGKILL) on reaching this
    /// point (see [`Engine::crash_points`]).
    #[cfg(feature = "crash-points")]
    pub crash_at: Option<String>,
}

impl Default for Options {
    fn default() -> Self {
        Self {
            lock_timeout: Duration::from_secs(60),
            installed_by: default_installed_by(),
            stop_agents: false,
            allow_data_loss: false,
            #[cfg(feature = "crash-points")]
            crash_at: None,
        }
    }
}

/// `user@host` of this process.
pub fn default_installed_by() -> String {
    let user = std::env::var("USER")
        .or_else(|_| std::env::var("LOGNAME"))
        .unwrap_or_else(|_| "unknown".into());
    format!("{user}@{}", fleetsync_common::clock::hostname("localhost"))
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

    /// Every crash point of the way down from the latest version to none, in order:
    /// `down:V:K` after statement K of version V's reverse ran, `down:V:K:journal` after it was
    /// journaled (journaled reverses only), `down:V:commit` after the roll-back committed.
    pub fn rollback_crash_points(&self) -> Vec<String> {
        let mut points = Vec::new();
        for m in self.set.iter().rev() {
            let journaled = self.journaled(m);
            for k in 1..=m.reverse.statements().len() {
                points.push(format!("down:{}:{k}", m.version));
                if journaled {
                    points.push(format!("down:{}:{k}:journal", m.version));
                }
            }
            points.push(format!("down:{}:commit", m.version));
        }
        points
    }

    fn journaled(&self, m: &Migration) -> bool {
        !m.transactional || self.backend() == Backend::MySql
    }

    /// The schema state. Writes nothing.
    pub async fn status(&self) -> Result<Status, EngineError> {
        let mut conn = Conn::open(&self.db).await.map_err(db_err("connecting"))?;
        let history = history::history(&mut conn)
            .await
            .map_err(db_err("reading history"));
        let pending = match &history {
            Ok(_)
                if table_exists(&mut conn, OUTBOX_TABLE)
                    .await
                    .map_err(db_err("reading outbox"))? =>
            {
                conn.scalar(
                    &format!("SELECT COUNT(*) FROM {OUTBOX_TABLE} WHERE state = ?"),
                    &[RequestState::Pending.as_str().into()],
                )
                .await
                .map_err(db_err("reading outbox"))?
                .unwrap_or(0)
            }
            _ => 0,
        };
        let agents = live_agents(&mut conn)
            .await
            .map_err(db_err("reading the registry of agents"));
        let rollbacks = history::rollbacks(&mut conn)
            .await
            .map_err(db_err("reading the roll-backs"));
        conn.close().await;
        let history = history?;
        Ok(self.status_from(&history, pending, agents?, rollbacks?))
    }

    fn status_from(
        &self,
        history: &[History],
        pending_sync_requests: i64,
        agents: Vec<LiveAgent>,
        rollbacks: Vec<Rollback>,
    ) -> Status {
        let migrations = self
            .set
            .iter()
            .map(|m| {
                let row = history.iter().find(|r| r.version == m.version);
                MigrationStatus {
                    migration: m.clone(),
                    state: State::of(row),
                    history: row.cloned(),
                    rolled_back: rollbacks
                        .iter()
                        .rev()
                        .find(|r| r.version == m.version)
                        .cloned(),
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
            agents,
            rollbacks,
        }
    }

    fn unknown_versions(&self, history: &[History]) -> Vec<i64> {
        history
            .iter()
            .filter(|r| self.set.get(r.version).is_none())
            .map(|r| r.version)
            .collect()
    }

    /// The history, read over a connection of its own (no lock: a read-only view).
    async fn read_history(&self) -> Result<Vec<History>, EngineError> {
        let mut conn = Conn::open(&self.db).await.map_err(db_err("connecting"))?;
        let history = history::history(&mut conn)
            .await
            .map_err(db_err("reading history"));
        conn.close().await;
        history
    }

    /// The interrupted way down, if any, over a connection of its own.
    async fn read_open_rollback(&self) -> Result<Option<Rollback>, EngineError> {
        let mut conn = Conn::open(&self.db).await.map_err(db_err("connecting"))?;
        let open = history::open_rollback(&mut conn)
            .await
            .map_err(db_err("reading the roll-backs"));
        conn.close().await;
        open
    }

    /// The live agents, over a connection of its own.
    async fn read_agents(&self) -> Result<Vec<LiveAgent>, EngineError> {
        let mut conn = Conn::open(&self.db).await.map_err(db_err("connecting"))?;
        let agents = live_agents(&mut conn)
            .await
            .map_err(db_err("reading the registry of agents"));
        conn.close().await;
        agents
    }

    /// The exact SQL `migrate` would run now to reach `target` (`None`: the latest; 0: before
    /// every migration): first the reverses of the way down, newest first, with the data each
    /// would destroy, then the migrations of the way up, with the live agents each would stop.
    /// Writes nothing.
    pub async fn plan(&self, target: Option<i64>) -> Result<Plan, EngineError> {
        let target = self.resolve_target(target)?;
        let history = self.read_history().await?;
        self.check(&history)?;
        let agents = self.read_agents().await?;
        let open = self.read_open_rollback().await?;
        let down = self.way_down(&history, open.as_ref(), target);
        let mut migrations = if down.is_empty() {
            Vec::new()
        } else {
            let mut conn = Conn::open(&self.db).await.map_err(db_err("connecting"))?;
            let planned = self
                .plan_way_down(&mut conn, &down, open.as_ref(), target, &agents)
                .await;
            conn.close().await;
            planned?
        };
        let reverted: Vec<i64> = down.iter().map(|m| m.version).collect();
        let up = self
            .set
            .iter()
            .filter(|m| m.version <= target)
            .filter_map(|m| {
                let row = history.iter().find(|r| r.version == m.version);
                let done = match row {
                    _ if reverted.contains(&m.version) => 0,
                    Some(r) if r.state == State::Applied => return None,
                    Some(r) if self.journaled(m) => r.statements_applied.max(0) as usize,
                    _ => 0,
                };
                Some(Planned {
                    version: m.version,
                    name: m.name.clone(),
                    reverse: false,
                    transactional: !self.journaled(m),
                    statements: m.statements[done.min(m.statements.len())..].to_vec(),
                    resync: m.resync,
                    stops_agents: m.stops_agents,
                    stops: agents.iter().filter(|a| a.stopped_by(m)).cloned().collect(),
                    losses: Vec::new(),
                    irreversible: None,
                })
            });
        migrations.extend(up);
        Ok(Plan { migrations, agents })
    }

    /// Refuses a migration that would stop serving agents, unless told to stop them.
    fn check_agents(
        &self,
        pending: &[&Migration],
        agents: &[LiveAgent],
    ) -> Result<(), EngineError> {
        if self.options.stop_agents {
            return Ok(());
        }
        for m in pending {
            let serving: Vec<String> = agents
                .iter()
                .filter(|a| a.serving() && a.stopped_by(m))
                .map(ToString::to_string)
                .collect();
            if !serving.is_empty() {
                return Err(EngineError::WouldStopAgents {
                    version: m.version,
                    name: m.name.clone(),
                    agents: serving,
                });
            }
        }
        Ok(())
    }

    /// Everything wrong between the database and the binary; empty if all is well. Writes
    /// nothing.
    pub async fn verify(&self) -> Result<Vec<Problem>, EngineError> {
        let history = self.read_history().await?;
        let mut problems = Vec::new();
        if let Some(open) = self.read_open_rollback().await? {
            problems.push(Problem {
                version: open.version,
                problem: format!(
                    "partly rolled back ({} of {} reverse statements{}): run migrate to finish it",
                    open.statements_done,
                    open.statements_total,
                    open.error
                        .as_deref()
                        .map(|e| format!("; last error: {e}"))
                        .unwrap_or_default()
                ),
            });
        }
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
                Some(r) if r.state == State::Applied && r.checksum != m.checksum => {
                    problems.push(Problem {
                        version: m.version,
                        problem: format!(
                            "checksum mismatch: applied {}, binary {} (the file was edited)",
                            r.checksum, m.checksum
                        ),
                    });
                }
                Some(r) if r.state == State::Partial => problems.push(Problem {
                    version: m.version,
                    problem: format!(
                        "partially applied ({} of {} statements): run migrate to finish it",
                        r.statements_applied, r.statements_total
                    ),
                }),
                Some(r) if r.state == State::Failed => problems.push(Problem {
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

    /// `None`: the latest; 0: before every migration; else a version the binary knows.
    fn resolve_target(&self, target: Option<i64>) -> Result<i64, EngineError> {
        match target {
            None => Ok(self.set.latest()),
            Some(0) => Ok(0),
            Some(version) => self
                .set
                .get(version)
                .map(|m| m.version)
                .ok_or(EngineError::UnknownTarget(version)),
        }
    }

    /// Refuses a database that disagrees with the binary.
    fn check(&self, history: &[History]) -> Result<(), EngineError> {
        let unknown = self.unknown_versions(history);
        if !unknown.is_empty() {
            return Err(EngineError::UnknownVersions(unknown));
        }
        for row in history {
            let Some(m) = self.set.get(row.version) else {
                continue;
            };
            if row.state == State::Applied && row.checksum != m.checksum {
                return Err(EngineError::ChecksumMismatch {
                    version: m.version,
                    name: m.name.clone(),
                    applied: row.checksum.clone(),
                    binary: m.checksum.clone(),
                });
            }
            if row.state != State::Applied && self.journaled(m) && row.statements_applied > 0 {
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

    /// Brings the schema to `target` (`None`: the latest; 0: before every migration): rolls
    /// back what is applied above it, newest first, then applies what is pending up to it,
    /// calling `on_event` as it goes. Stops at the first failure, which is returned (and
    /// recorded in the history or the roll-backs).
    pub async fn migrate(
        &self,
        target: Option<i64>,
        on_event: &mut (dyn FnMut(Event) + Send),
    ) -> Result<Report, EngineError> {
        // A deadlock or serialisation failure (with the agent writing the outbox, say) rolls
        // the transaction back; the run starts over under the lock, from the history. The
        // progress callback is lent to one attempt at a time.
        let on_event = tokio::sync::Mutex::new(on_event);
        fleetsync_common::sql::retry("migrate", || async {
            let mut on_event = on_event.lock().await;
            self.migrate_once(target, &mut **on_event).await
        })
        .await
    }

    async fn migrate_once(
        &self,
        target: Option<i64>,
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
        let history = history::history(conn)
            .await
            .map_err(db_err("reading history"))?;
        self.check(&history)?;
        let open = history::open_rollback(conn)
            .await
            .map_err(db_err("reading the roll-backs"))?;
        let down = self.way_down(&history, open.as_ref(), target);
        let pending: Vec<&Migration> = self
            .set
            .iter()
            .filter(|m| m.version <= target)
            .filter(|m| {
                down.iter().any(|d| d.version == m.version)
                    || !history
                        .iter()
                        .any(|r| r.version == m.version && r.state == State::Applied)
            })
            .collect();
        if !down.is_empty() || pending.iter().any(|m| m.stops_agents) {
            let agents = live_agents(conn)
                .await
                .map_err(db_err("reading the registry of agents"))?;
            self.check_agents(&pending, &agents)?;
            if !down.is_empty() {
                self.check_way_down(conn, &down, open.as_ref(), target, &agents)
                    .await?;
            }
        }
        let run_id = format!("{:x}-{:x}", now_ms(), std::process::id());

        let mut report = Report::default();
        if !down.is_empty() {
            let way = revert::Way {
                run_id: &run_id,
                from: current_version(&history),
                to: target,
            };
            for m in &down {
                self.revert(conn, m, &way, open.as_ref(), &mut report, on_event)
                    .await?;
            }
        }
        // The way up, from the history as the way down left it.
        let history = if down.is_empty() {
            history
        } else {
            history::history(conn)
                .await
                .map_err(db_err("reading history"))?
        };
        for m in self.set.iter().filter(|m| m.version <= target) {
            let row = history.iter().find(|r| r.version == m.version);
            if row.is_some_and(|r| r.state == State::Applied) {
                continue;
            }
            let started = Instant::now();
            let mut attempt = apply::Attempt {
                migration: m,
                run_id: &run_id,
                on_event: &mut *on_event,
            };
            let outcome = if self.journaled(m) {
                self.apply_journaled(conn, &mut attempt).await
            } else {
                self.apply_transactional(conn, &mut attempt).await
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
                    apply::report_failure(on_event, m, started, &err);
                    return Err(err);
                }
            }
        }
        let history = history::history(conn)
            .await
            .map_err(db_err("reading history"))?;
        report.current_version = current_version(&history);
        Ok(report)
    }
}
