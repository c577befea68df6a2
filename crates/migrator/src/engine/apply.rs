//! Applying migrations under the lock: the lock itself, bootstrapping the engine's tables, the
//! transactional and the journaled apply paths, and the history, outbox and stop rows they
//! write.

use std::time::{Duration, Instant};

use fleetsync_common::{
    Backend, RequestId,
    clock::now_ms,
    model::{RequestOrigin, RequestState, SCHEMA_BREAKS_TABLE},
    sql::Value,
};

use super::{Engine, EngineError, Event, LOCK_NAME, PG_LOCK_KEY, db_err, ddl::already_applied};
use crate::{
    history::{self, Conn, History, bootstrap_sql},
    migration::Migration,
    model::State,
    outbox::OUTBOX_TABLE,
};

impl Engine {
    pub(super) async fn lock(&self, conn: &mut Conn) -> Result<(), EngineError> {
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

    pub(super) async fn unlock(&self, conn: &mut Conn) {
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

    pub(super) async fn bootstrap(&self, conn: &mut Conn) -> Result<(), EngineError> {
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

    /// The test hook (feature `crash-points`): SIGKILL this process at `point`.
    #[cfg(feature = "crash-points")]
    pub(super) fn crash_point(&self, point: &str) {
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

    /// Without the `crash-points` feature, crash points are nothing.
    #[cfg(not(feature = "crash-points"))]
    #[inline(always)]
    pub(super) fn crash_point(&self, _point: &str) {}

    /// Applies a migration whose statements commit together: one transaction for the
    /// statements, the history row and the outbox row.
    pub(super) async fn apply_transactional(
        &self,
        conn: &mut Conn,
        attempt: &mut Attempt<'_>,
    ) -> Result<Applied, EngineError> {
        let m = attempt.migration;
        // Under the lock: another migrator may have applied it since history was read.
        let row = begin_with_row(conn, m).await?;
        if row.as_ref().is_some_and(|r| r.state == State::Applied) {
            conn.raw("COMMIT").await.map_err(db_err("committing"))?;
            return Ok(Applied::ByAnother);
        }
        attempt.started(m.statements.len());
        let started_at = now_ms();
        let started = Instant::now();
        for (i, statement) in m.statements.iter().enumerate() {
            if let Err(err) = conn.raw(statement).await {
                let err = statement_failed(m, i, &err);
                let _ = conn.raw("ROLLBACK").await;
                self.record_failure(conn, attempt, started_at, 0, &err)
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
            self.insert_history(
                conn,
                attempt,
                State::Applied,
                m.statements.len(),
                started_at,
            )
            .await
        };
        if let Err(err) = record.await {
            return Err(rollback(conn, db_err("recording the migration")(err)).await);
        }
        self.commit_applied(conn, m, started).await
    }

    /// Applies a migration statement by statement (DDL that cannot run in a transaction),
    /// journaling each one, so that a retry resumes after the last statement that took effect.
    pub(super) async fn apply_journaled(
        &self,
        conn: &mut Conn,
        attempt: &mut Attempt<'_>,
    ) -> Result<Applied, EngineError> {
        let m = attempt.migration;
        let row = history::history_row(conn, m.version)
            .await
            .map_err(db_err("reading history"))?;
        if row.as_ref().is_some_and(|r| r.state == State::Applied) {
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
                    Value::Text(State::Partial.as_str().into()),
                    Value::Int(started_at),
                    Value::Text(attempt.run_id.into()),
                    Value::Text(self.options.installed_by.clone()),
                    Value::Text(m.checksum.clone()),
                    Value::Int(m.statements.len() as i64),
                    Value::Int(m.version),
                ],
            )
            .await
            .map_err(db_err("journaling"))?;
        } else {
            self.insert_history(conn, attempt, State::Partial, 0, started_at)
                .await
                .map_err(db_err("journaling"))?;
        }
        attempt.started(m.statements.len() - done.min(m.statements.len()));
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
                self.record_failure(conn, attempt, started_at, i, &err)
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
    pub(super) async fn commit_applied(
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
                    Value::Text(State::Applied.as_str().into()),
                    Value::Int(now_ms()),
                    Value::Int(started.elapsed().as_millis() as i64),
                    Value::Int(m.version),
                ],
            )
            .await?;
            record_stop(conn, m).await?;
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
    pub(super) async fn record_failure(
        &self,
        conn: &mut Conn,
        attempt: &mut Attempt<'_>,
        started_at: i64,
        done: usize,
        err: &EngineError,
    ) {
        let m = attempt.migration;
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
                self.insert_history(conn, attempt, State::Failed, done, started_at)
                    .await?;
            }
            conn.execute(
                "UPDATE fleetsync_schema_history SET state = ?, error = ?, failing_statement = ?, \
                 finished_at = ? WHERE version = ?",
                &[
                    Value::Text(State::Failed.as_str().into()),
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

pub(super) enum Applied {
    Now { sync_request: Option<RequestId> },
    ByAnother,
}

/// Opens the migration's transaction (SQLite: with the write lock) and reads its history row
/// inside it.
pub(super) async fn begin_with_row(
    conn: &mut Conn,
    m: &Migration,
) -> Result<Option<History>, EngineError> {
    let begin = match conn.backend() {
        Backend::Sqlite => "BEGIN IMMEDIATE",
        _ => "BEGIN",
    };
    conn.raw(begin)
        .await
        .map_err(db_err("starting a transaction"))?;
    match history::history_row(conn, m.version).await {
        Ok(row) => Ok(row),
        Err(err) => Err(rollback(conn, db_err("reading history")(err)).await),
    }
}

/// Reports a failed statement (other errors are the caller's to report).
pub(super) fn report_failure(
    on_event: &mut (dyn FnMut(Event) + Send),
    m: &Migration,
    started: Instant,
    err: &EngineError,
) {
    if let EngineError::StatementFailed {
        error, statement, ..
    } = err
    {
        on_event(Event::Failed {
            version: m.version,
            duration: started.elapsed(),
            error: error.clone(),
            statement: statement.clone(),
        });
    }
}

pub(super) async fn rollback(conn: &mut Conn, err: EngineError) -> EngineError {
    let _ = conn.raw("ROLLBACK").await;
    err
}

pub(super) fn statement_failed(m: &Migration, i: usize, err: &sqlx::Error) -> EngineError {
    let error = match err {
        sqlx::Error::Database(db) => db.message().to_owned(),
        other => other.to_string(),
    };
    EngineError::StatementFailed {
        reverse: false,
        version: m.version,
        name: m.name.clone(),
        index: i + 1,
        total: m.statements.len(),
        statement: m.statements[i].clone(),
        error,
    }
}

pub(super) fn current_version(history: &[History]) -> i64 {
    history
        .iter()
        .filter(|r| r.state == State::Applied)
        .map(|r| r.version)
        .max()
        .unwrap_or(0)
}

impl Engine {
    /// Writes the history row of `attempt`, in `state` after `done` statements.
    async fn insert_history(
        &self,
        conn: &mut Conn,
        attempt: &mut Attempt<'_>,
        state: State,
        done: usize,
        started_at: i64,
    ) -> Result<u64, sqlx::Error> {
        let m = attempt.migration;
        conn.execute(
            "INSERT INTO fleetsync_schema_history (version, name, checksum, state, \
             statements_applied, statements_total, prefix_checksum, started_at, installed_by, \
             run_id, resync) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            &[
                Value::Int(m.version),
                Value::Text(m.name.clone()),
                Value::Text(m.checksum.clone()),
                Value::Text(state.as_str().into()),
                Value::Int(done as i64),
                Value::Int(m.statements.len() as i64),
                Value::Text(m.prefix_checksum(done)),
                Value::Int(started_at),
                Value::Text(self.options.installed_by.clone()),
                Value::Text(attempt.run_id.into()),
                Value::Text(m.resync.to_string()),
            ],
        )
        .await
    }
}

/// One attempt at applying one migration in a run of `migrate`: what its history row records,
/// and where its progress is reported.
pub(super) struct Attempt<'a> {
    /// The migration.
    pub migration: &'a Migration,
    /// The run of `migrate` this attempt belongs to (recorded in the history row).
    pub run_id: &'a str,
    /// Where progress goes.
    pub on_event: &'a mut (dyn FnMut(Event) + Send),
}

impl Attempt<'_> {
    /// Reports that `statements` statements are about to run.
    fn started(&mut self, statements: usize) {
        (self.on_event)(Event::Started {
            version: self.migration.version,
            name: self.migration.name.clone(),
            statements,
        });
    }
}

/// Records a `stops-agents` migration where every agent looks on its heartbeat (in the
/// transaction that marks it applied).
async fn record_stop(conn: &mut Conn, m: &Migration) -> Result<(), sqlx::Error> {
    if !m.stops_agents {
        return Ok(());
    }
    let recorded = conn
        .scalar(
            &format!("SELECT COUNT(*) FROM {SCHEMA_BREAKS_TABLE} WHERE version = ?"),
            &[Value::Int(m.version)],
        )
        .await?
        > Some(0);
    if !recorded {
        conn.execute(
            &format!(
                "INSERT INTO {SCHEMA_BREAKS_TABLE} (version, name, applied_at) VALUES (?, ?, ?)"
            ),
            &[
                Value::Int(m.version),
                Value::Text(m.name.clone()),
                Value::Int(now_ms()),
            ],
        )
        .await?;
    }
    Ok(())
}

/// Id of the sync request a migration records: one per application of a migration, so
/// recording it twice is impossible and the agent deduplicates on it. The first application's
/// is `migration-VERSION`; a migration applied again after a roll-back, whose earlier request
/// an agent had taken, records `migration-VERSION-2` and so on (`earlier`: the requests of
/// this version already recorded).
pub fn sync_request_id(version: i64, earlier: i64) -> RequestId {
    RequestId::new(match earlier {
        0 => format!("migration-{version}"),
        n => format!("migration-{version}-{}", n + 1),
    })
}

/// Records the migration's sync request in the outbox, if it declares re-sync scopes.
pub(super) async fn record_sync_request(
    conn: &mut Conn,
    m: &Migration,
) -> Result<Option<RequestId>, sqlx::Error> {
    if m.resync.is_empty() {
        return Ok(None);
    }
    // The history row and the request commit together: a request of this version exists only
    // if an agent took it before the migration was rolled back (a pending one is withdrawn).
    let earlier = conn
        .scalar(
            &format!("SELECT COUNT(*) FROM {OUTBOX_TABLE} WHERE migration_version = ?"),
            &[Value::Int(m.version)],
        )
        .await?
        .unwrap_or(0);
    let id = sync_request_id(m.version, earlier);
    {
        conn.execute(
            &format!(
                "INSERT INTO {OUTBOX_TABLE} (id, origin, migration_version, scopes, reason, state, \
                 created_at) VALUES (?, ?, ?, ?, ?, ?, ?)"
            ),
            &[
                (&id).into(),
                RequestOrigin::Migration.as_str().into(),
                Value::Int(m.version),
                Value::Text(m.resync.to_string()),
                Value::Text(format!("migration {} {}", m.version, m.name)),
                RequestState::Pending.as_str().into(),
                Value::Int(now_ms()),
            ],
        )
        .await?;
    }
    Ok(Some(id))
}
