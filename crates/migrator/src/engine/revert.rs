//! The way down: applied migrations rolled back newest first by their reverses, with the same
//! guarantees as the way up. What is checked before anything is written (a reverse that is
//! missing or edited, data it would destroy, agents it would stop), both paths (one
//! transaction per migration; journaled statement by statement on MySQL), and the rows they
//! write: the history row goes, the roll-back is recorded (who, when, from, to), the migration's
//! pending sync request and its agent stop are withdrawn, all in the final transaction.

use std::time::Instant;

use fleetsync_common::{
    clock::now_ms,
    model::{RequestState, SCHEMA_BREAKS_TABLE},
    sql::Value,
};

use super::{
    Engine, EngineError, Event, Planned, Report,
    apply::{begin_with_row, report_failure, rollback},
    db_err,
    ddl::{Loss, already_applied, would_lose},
};
use crate::{
    agents::LiveAgent,
    history::{self, Conn, HISTORY_TABLE, History, ROLLBACKS_TABLE, Rollback},
    migration::{Migration, Reverse},
    model::{RollbackState, State},
    outbox::OUTBOX_TABLE,
};

/// One run's way down: where it started and where it goes (recorded with each roll-back).
pub(super) struct Way<'a> {
    /// The run of `migrate`.
    pub run_id: &'a str,
    /// The version the database was at.
    pub from: i64,
    /// The target.
    pub to: i64,
}

impl Engine {
    /// The migrations the way down to `target` rolls back, newest first: each applied above the
    /// target (or partly applied, where journaled), and an interrupted roll-back whatever the
    /// target (it is finished first; the way up then applies it again if the target wants it).
    pub(super) fn way_down<'a>(
        &'a self,
        history: &[History],
        open: Option<&Rollback>,
        target: i64,
    ) -> Vec<&'a Migration> {
        let mut down: Vec<&Migration> = self
            .set
            .iter()
            .filter(|m| {
                let row = history.iter().find(|r| r.version == m.version);
                let interrupted = open.is_some_and(|o| o.version == m.version);
                let applied = row.is_some_and(|r| {
                    r.state == State::Applied || (self.journaled(m) && r.statements_applied > 0)
                });
                applied && (m.version > target || interrupted)
            })
            .collect();
        down.reverse();
        down
    }

    /// What the way down would do, migration by migration, with the data each reverse would
    /// destroy (`plan`).
    pub(super) async fn plan_way_down(
        &self,
        conn: &mut Conn,
        down: &[&Migration],
        open: Option<&Rollback>,
        target: i64,
        agents: &[LiveAgent],
    ) -> Result<Vec<Planned>, EngineError> {
        let stops: Vec<LiveAgent> = agents
            .iter()
            .filter(|a| a.needs_newer_than(target))
            .cloned()
            .collect();
        let mut planned = Vec::new();
        for (i, m) in down.iter().enumerate() {
            let statements = remaining(m, open);
            let losses = losses(conn, m, open).await?;
            planned.push(Planned {
                version: m.version,
                name: m.name.clone(),
                reverse: true,
                transactional: !self.journaled(m),
                statements: statements.to_vec(),
                resync: Default::default(),
                stops_agents: false,
                // Said once, with the first step of the way down.
                stops: if i == 0 { stops.clone() } else { Vec::new() },
                losses,
                irreversible: match &m.reverse {
                    Reverse::Irreversible(reason) => Some(reason.clone()),
                    Reverse::Statements(_) => None,
                },
            });
        }
        Ok(planned)
    }

    /// Refuses a way down that cannot or may not be taken, before anything is written: a
    /// migration without a reverse, an interrupted reverse whose done statements were edited,
    /// serving agents whose range it leaves (without `stop_agents`), data it would destroy
    /// (without `allow_data_loss`).
    pub(super) async fn check_way_down(
        &self,
        conn: &mut Conn,
        down: &[&Migration],
        open: Option<&Rollback>,
        target: i64,
        agents: &[LiveAgent],
    ) -> Result<(), EngineError> {
        for m in down {
            if let Reverse::Irreversible(reason) = &m.reverse {
                return Err(EngineError::Irreversible {
                    version: m.version,
                    name: m.name.clone(),
                    reason: reason.clone(),
                });
            }
        }
        if let Some(open) = open {
            let m = down.iter().find(|m| m.version == open.version);
            let done = open.statements_done.max(0) as usize;
            let edited = m.is_none_or(|m| {
                done > m.reverse.statements().len()
                    || open.prefix_checksum.as_deref() != Some(&m.reverse.prefix_checksum(done))
            });
            if edited {
                return Err(EngineError::ReverseEdited {
                    version: open.version,
                    name: open.name.clone(),
                    done: open.statements_done,
                });
            }
        }
        if !self.options.stop_agents {
            let serving: Vec<String> = agents
                .iter()
                .filter(|a| a.serving() && a.needs_newer_than(target))
                .map(ToString::to_string)
                .collect();
            if !serving.is_empty() {
                return Err(EngineError::RollbackStopsAgents {
                    target,
                    agents: serving,
                });
            }
        }
        if !self.options.allow_data_loss {
            let mut all = Vec::new();
            for m in down {
                all.extend(
                    losses(conn, m, open)
                        .await?
                        .into_iter()
                        .map(|loss| (m.version, loss)),
                );
            }
            if !all.is_empty() {
                return Err(EngineError::WouldLoseData {
                    target,
                    losses: all,
                });
            }
        }
        Ok(())
    }

    /// Rolls one migration back, reporting it.
    pub(super) async fn revert(
        &self,
        conn: &mut Conn,
        m: &Migration,
        way: &Way<'_>,
        open: Option<&Rollback>,
        report: &mut Report,
        on_event: &mut (dyn FnMut(Event) + Send),
    ) -> Result<(), EngineError> {
        let started = Instant::now();
        let open = open.filter(|o| o.version == m.version);
        let outcome = if self.journaled(m) {
            self.revert_journaled(conn, m, way, open, on_event).await
        } else {
            self.revert_transactional(conn, m, way, on_event).await
        };
        match outcome {
            Ok(Some(withdrawn)) => {
                report.rolled_back.push(m.version);
                report.withdrawn.extend(withdrawn.clone());
                on_event(Event::RolledBack {
                    version: m.version,
                    duration: started.elapsed(),
                    withdrawn,
                });
                Ok(())
            }
            // Another migrator rolled it back since the history was read.
            Ok(None) => Ok(()),
            Err(err) => {
                report_failure(on_event, m, started, &err);
                Err(err)
            }
        }
    }

    /// The reverse, the history row's removal and the roll-back's record in one transaction.
    /// `None` if another migrator rolled it back first.
    async fn revert_transactional(
        &self,
        conn: &mut Conn,
        m: &Migration,
        way: &Way<'_>,
        on_event: &mut (dyn FnMut(Event) + Send),
    ) -> Result<Option<Option<String>>, EngineError> {
        let row = begin_with_row(conn, m).await?;
        if row.is_none_or(|r| r.state != State::Applied) {
            conn.raw("COMMIT").await.map_err(db_err("committing"))?;
            return Ok(None);
        }
        let statements = m.reverse.statements();
        on_event(Event::RollingBack {
            version: m.version,
            name: m.name.clone(),
            statements: statements.len(),
        });
        let started_at = now_ms();
        for (i, statement) in statements.iter().enumerate() {
            if let Err(err) = conn.raw(statement).await {
                let err = reverse_failed(m, i, &err);
                let _ = conn.raw("ROLLBACK").await;
                return Err(err);
            }
            self.crash_point(&format!("down:{}:{}", m.version, i + 1));
        }
        let id = rollback_id(way, m);
        let record = async {
            insert_rollback(conn, &id, m, way, &self.options.installed_by, started_at).await?;
            finish_rollback(conn, m, &id).await
        };
        let withdrawn = match record.await {
            Ok(withdrawn) => withdrawn,
            Err(err) => return Err(rollback(conn, db_err("recording the roll-back")(err)).await),
        };
        conn.raw("COMMIT").await.map_err(db_err("committing"))?;
        self.crash_point(&format!("down:{}:commit", m.version));
        Ok(Some(withdrawn))
    }

    /// The reverse statement by statement, each journaled in the roll-back's row, so that a
    /// retry resumes after the last one that took effect; the history row's removal and the
    /// roll-back's end commit together. `None` if another migrator rolled it back first.
    async fn revert_journaled(
        &self,
        conn: &mut Conn,
        m: &Migration,
        way: &Way<'_>,
        open: Option<&Rollback>,
        on_event: &mut (dyn FnMut(Event) + Send),
    ) -> Result<Option<Option<String>>, EngineError> {
        let row = history::history_row(conn, m.version)
            .await
            .map_err(db_err("reading history"))?;
        let Some(row) = row else {
            return Ok(None);
        };
        // A migration interrupted on its way up: which of its reverse statements have something
        // to undo is the catalog's to say, statement by statement.
        let partly_applied = row.state != State::Applied;
        let statements = m.reverse.statements();
        let (id, done) = match open {
            Some(open) => {
                conn.execute(
                    &format!(
                        "UPDATE {ROLLBACKS_TABLE} SET run_id = ?, rolled_back_by = ? WHERE id = ?"
                    ),
                    &[
                        Value::Text(way.run_id.into()),
                        Value::Text(self.options.installed_by.clone()),
                        Value::Text(open.id.clone()),
                    ],
                )
                .await
                .map_err(db_err("journaling the roll-back"))?;
                (open.id.clone(), open.statements_done.max(0) as usize)
            }
            None => {
                let id = rollback_id(way, m);
                insert_rollback(conn, &id, m, way, &self.options.installed_by, now_ms())
                    .await
                    .map_err(db_err("journaling the roll-back"))?;
                (id, 0)
            }
        };
        on_event(Event::RollingBack {
            version: m.version,
            name: m.name.clone(),
            statements: statements.len() - done.min(statements.len()),
        });
        for (i, statement) in statements.iter().enumerate().skip(done) {
            // The journal may lag one statement behind a crash: ask the catalog first.
            let check = partly_applied || (open.is_some() && i == done);
            if check && already_applied(conn, statement).await? {
                tracing::info!(
                    version = m.version,
                    statement = i + 1,
                    "reverse statement already in effect, not run again"
                );
            } else if let Err(err) = conn.raw(statement).await {
                let err = reverse_failed(m, i, &err);
                if let EngineError::StatementFailed { error, .. } = &err {
                    let recorded = conn
                        .execute(
                            &format!("UPDATE {ROLLBACKS_TABLE} SET error = ? WHERE id = ?"),
                            &[Value::Text(error.clone()), Value::Text(id.clone())],
                        )
                        .await;
                    if let Err(record) = recorded {
                        tracing::warn!(version = m.version, error = %record, "could not record the failed roll-back");
                    }
                }
                return Err(err);
            }
            self.crash_point(&format!("down:{}:{}", m.version, i + 1));
            conn.execute(
                &format!(
                    "UPDATE {ROLLBACKS_TABLE} SET statements_done = ?, prefix_checksum = ?, \
                     error = NULL WHERE id = ?"
                ),
                &[
                    Value::Int(i as i64 + 1),
                    Value::Text(m.reverse.prefix_checksum(i + 1)),
                    Value::Text(id.clone()),
                ],
            )
            .await
            .map_err(db_err("journaling the roll-back"))?;
            self.crash_point(&format!("down:{}:{}:journal", m.version, i + 1));
        }
        conn.raw("BEGIN")
            .await
            .map_err(db_err("starting a transaction"))?;
        let withdrawn = match finish_rollback(conn, m, &id).await {
            Ok(withdrawn) => withdrawn,
            Err(err) => return Err(rollback(conn, db_err("recording the roll-back")(err)).await),
        };
        conn.raw("COMMIT").await.map_err(db_err("committing"))?;
        self.crash_point(&format!("down:{}:commit", m.version));
        Ok(Some(withdrawn))
    }
}

/// The reverse statements still to run: all of them, or those after an interrupted roll-back's
/// journal.
fn remaining<'m>(m: &'m Migration, open: Option<&Rollback>) -> &'m [String] {
    let statements = m.reverse.statements();
    let done = open
        .filter(|o| o.version == m.version)
        .map_or(0, |o| o.statements_done.max(0) as usize);
    &statements[done.min(statements.len())..]
}

/// The data the rest of a migration's reverse would destroy, as it stands now.
async fn losses(
    conn: &mut Conn,
    m: &Migration,
    open: Option<&Rollback>,
) -> Result<Vec<Loss>, EngineError> {
    let mut losses = Vec::new();
    for statement in remaining(m, open) {
        losses.extend(would_lose(conn, statement, &m.statements).await?);
    }
    Ok(losses)
}

fn rollback_id(way: &Way<'_>, m: &Migration) -> String {
    format!("{}:{}", way.run_id, m.version)
}

fn reverse_failed(m: &Migration, i: usize, err: &sqlx::Error) -> EngineError {
    let error = match err {
        sqlx::Error::Database(db) => db.message().to_owned(),
        other => other.to_string(),
    };
    let statements = m.reverse.statements();
    EngineError::StatementFailed {
        reverse: true,
        version: m.version,
        name: m.name.clone(),
        index: i + 1,
        total: statements.len(),
        statement: statements[i].clone(),
        error,
    }
}

/// The roll-back's row, under way (`reverting`, no statement done).
async fn insert_rollback(
    conn: &mut Conn,
    id: &str,
    m: &Migration,
    way: &Way<'_>,
    by: &str,
    started_at: i64,
) -> Result<u64, sqlx::Error> {
    conn.execute(
        &format!(
            "INSERT INTO {ROLLBACKS_TABLE} (id, version, name, state, statements_done, \
             statements_total, prefix_checksum, from_version, to_version, started_at, \
             rolled_back_by, run_id) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
        ),
        &[
            Value::Text(id.into()),
            Value::Int(m.version),
            Value::Text(m.name.clone()),
            RollbackState::Reverting.as_str().into(),
            Value::Int(0),
            Value::Int(m.reverse.statements().len() as i64),
            Value::Text(m.reverse.prefix_checksum(0)),
            Value::Int(way.from),
            Value::Int(way.to),
            Value::Int(started_at),
            Value::Text(by.into()),
            Value::Text(way.run_id.into()),
        ],
    )
    .await
}

/// Inside the roll-back's open transaction, after its reverse ran: the history row goes, and
/// so do the migration's sync request if no agent took it yet and its agent stop; the roll-back
/// is recorded as done. Returns the request withdrawn.
async fn finish_rollback(
    conn: &mut Conn,
    m: &Migration,
    id: &str,
) -> Result<Option<String>, sqlx::Error> {
    conn.execute(
        &format!("DELETE FROM {HISTORY_TABLE} WHERE version = ?"),
        &[Value::Int(m.version)],
    )
    .await?;
    conn.execute(
        &format!("DELETE FROM {SCHEMA_BREAKS_TABLE} WHERE version = ?"),
        &[Value::Int(m.version)],
    )
    .await?;
    let pending = [Value::Int(m.version), RequestState::Pending.as_str().into()];
    let withdrawn: Vec<String> = conn
        .fetch(
            &format!("SELECT id FROM {OUTBOX_TABLE} WHERE migration_version = ? AND state = ?"),
            &pending,
        )
        .await?
        .iter()
        .map(fleetsync_common::sql::Row::decode)
        .collect::<Result<_, _>>()?;
    conn.execute(
        &format!("DELETE FROM {OUTBOX_TABLE} WHERE migration_version = ? AND state = ?"),
        &pending,
    )
    .await?;
    let withdrawn = (!withdrawn.is_empty()).then(|| withdrawn.join(", "));
    let statements = m.reverse.statements().len();
    conn.execute(
        &format!(
            "UPDATE {ROLLBACKS_TABLE} SET state = ?, statements_done = ?, prefix_checksum = ?, \
             finished_at = ?, error = NULL, withdrawn_request = ? WHERE id = ?"
        ),
        &[
            RollbackState::Reverted.as_str().into(),
            Value::Int(statements as i64),
            Value::Text(m.reverse.prefix_checksum(statements)),
            Value::Int(now_ms()),
            withdrawn.clone().map_or(Value::NullText, Value::Text),
            Value::Text(id.into()),
        ],
    )
    .await?;
    Ok(withdrawn)
}

impl Loss {
    /// What it says in `plan`'s JSON.
    pub fn json(&self) -> serde_json::Value {
        serde_json::json!({"table": self.table, "column": self.column, "rows": self.rows})
    }
}
