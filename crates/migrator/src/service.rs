//! The `fleetsync.migrator.v1.Migrator` gRPC service, backed by the same engine as the CLI.
//! Calls are serialised with the CLI and other migrators by the engine's database lock.

use std::{
    pin::Pin,
    time::{Duration, UNIX_EPOCH},
};

use fleetsync_common::{
    Db, ServiceError,
    proto::migrator::v1::{
        self as pb, GetStatusRequest, GetStatusResponse, MigrateEvent, MigrateRequest,
        MigrateSummary, MigrationFinished, MigrationStarted, PlanRequest, PlanResponse,
        PlannedMigration, VerifyProblem, VerifyRequest, VerifyResponse, migrate_event,
        migrator_server::Migrator,
    },
};
use tokio_stream::{Stream, wrappers::ReceiverStream};
use tonic::{Request, Response, Status};

use crate::engine::{Engine, EngineError, Event, Options, State};

/// `fleetsync.migrator.v1.Migrator`.
#[derive(Debug, Clone)]
pub struct MigratorService {
    db: Db,
    lock_timeout: Duration,
}

impl MigratorService {
    /// The service over the control-plane database.
    pub fn new(db: Db, lock_timeout: Duration) -> Self {
        Self { db, lock_timeout }
    }

    fn engine(&self) -> Engine {
        self.engine_migrating(&MigrateRequest::default())
    }

    fn engine_migrating(&self, request: &MigrateRequest) -> Engine {
        Engine::new(
            self.db.clone(),
            Options {
                lock_timeout: self.lock_timeout,
                stop_agents: request.stop_agents,
                allow_data_loss: request.allow_data_loss,
                ..Options::default()
            },
        )
    }
}

impl From<EngineError> for ServiceError {
    fn from(err: EngineError) -> Self {
        match err {
            EngineError::Database { source, .. } => ServiceError::from(source),
            EngineError::LockTimeout(_) => ServiceError::Unavailable(err.to_string()),
            EngineError::UnknownTarget(_) => {
                ServiceError::invalid("target_version", err.to_string())
            }
            other => ServiceError::FailedPrecondition(other.to_string()),
        }
    }
}

fn status(err: EngineError) -> Status {
    ServiceError::from(err).into()
}

fn timestamp(ms: Option<i64>) -> Option<prost_types::Timestamp> {
    let ms = u64::try_from(ms?).ok()?;
    Some((UNIX_EPOCH + Duration::from_millis(ms)).into())
}

fn duration(d: Duration) -> Option<prost_types::Duration> {
    prost_types::Duration::try_from(d).ok()
}

fn state(state: State) -> pb::MigrationState {
    match state {
        State::Pending => pb::MigrationState::Pending,
        State::Applied => pb::MigrationState::Applied,
        State::Partial => pb::MigrationState::Partial,
        State::Failed => pb::MigrationState::Failed,
    }
}

/// 0 is the latest (rolling everything back is for the command line, `--target 0`).
fn target(version: i64) -> Result<Option<i64>, Status> {
    match version {
        0 => Ok(None),
        v if v < 0 => {
            Err(ServiceError::invalid("target_version", "must be 0 (latest) or a version").into())
        }
        v => Ok(Some(v)),
    }
}

fn rollback_message(r: &crate::history::Rollback) -> pb::Rollback {
    pb::Rollback {
        done: r.state == crate::model::RollbackState::Reverted,
        statements_done: r.statements_done.max(0) as u32,
        statements_total: r.statements_total.max(0) as u32,
        from_version: r.from_version,
        to_version: r.to_version,
        started_at: timestamp(Some(r.started_at)),
        finished_at: timestamp(r.finished_at),
        rolled_back_by: r.rolled_back_by.clone(),
        error: r.error.clone().unwrap_or_default(),
        withdrawn_request: r.withdrawn_request.clone().unwrap_or_default(),
    }
}

#[tonic::async_trait]
impl Migrator for MigratorService {
    type MigrateStream = Pin<Box<dyn Stream<Item = Result<MigrateEvent, Status>> + Send>>;

    async fn get_status(
        &self,
        _request: Request<GetStatusRequest>,
    ) -> Result<Response<GetStatusResponse>, Status> {
        let engine = self.engine();
        let s = engine.status().await.map_err(status)?;
        let migrations = s
            .migrations
            .iter()
            .map(|m| {
                let h = m.history.as_ref();
                pb::Migration {
                    version: m.migration.version,
                    name: m.migration.name.clone(),
                    state: state(m.state) as i32,
                    checksum: m.migration.checksum.clone(),
                    applied_checksum: h.map(|h| h.checksum.clone()).unwrap_or_default(),
                    statements_applied: h.map_or(0, |h| h.statements_applied.max(0) as u32),
                    statements_total: m.migration.statements.len() as u32,
                    resync_scopes: m
                        .migration
                        .resync
                        .iter()
                        .map(|s| s.as_str().into())
                        .collect(),
                    transactional: m.migration.transactional
                        && engine.backend() != fleetsync_common::Backend::MySql,
                    started_at: timestamp(h.and_then(|h| h.started_at)),
                    finished_at: timestamp(h.and_then(|h| h.finished_at)),
                    duration: h
                        .and_then(|h| h.duration_ms)
                        .and_then(|ms| duration(Duration::from_millis(ms.max(0) as u64))),
                    installed_by: h.map(|h| h.installed_by.clone()).unwrap_or_default(),
                    error: h.and_then(|h| h.error.clone()).unwrap_or_default(),
                    failing_statement: h
                        .and_then(|h| h.failing_statement.clone())
                        .unwrap_or_default(),
                    last_rollback: m.rolled_back.as_ref().map(rollback_message),
                }
            })
            .collect();
        Ok(Response::new(GetStatusResponse {
            backend: s.backend.as_str().into(),
            current_version: s.current_version,
            latest_version: s.latest_version,
            migrations,
            unknown_versions: s.unknown_versions,
            pending_sync_requests: s.pending_sync_requests.max(0) as u32,
        }))
    }

    async fn plan(&self, request: Request<PlanRequest>) -> Result<Response<PlanResponse>, Status> {
        let target = target(request.into_inner().target_version)?;
        let plan = self.engine().plan(target).await.map_err(status)?;
        Ok(Response::new(PlanResponse {
            migrations: plan
                .migrations
                .into_iter()
                .map(|p| PlannedMigration {
                    version: p.version,
                    name: p.name,
                    transactional: p.transactional,
                    statements: p.statements,
                    resync_scopes: p.resync.iter().map(|s| s.as_str().into()).collect(),
                    stops_agents: p.stops_agents,
                    stopped_agents: p.stops.into_iter().map(|a| a.id.into_string()).collect(),
                    reverse: p.reverse,
                    losses: p
                        .losses
                        .into_iter()
                        .map(|l| pb::DataLoss {
                            table: l.table,
                            column: l.column.unwrap_or_default(),
                            rows: l.rows,
                        })
                        .collect(),
                    irreversible: p.irreversible.unwrap_or_default(),
                })
                .collect(),
        }))
    }

    async fn migrate(
        &self,
        request: Request<MigrateRequest>,
    ) -> Result<Response<Self::MigrateStream>, Status> {
        let request = request.into_inner();
        let target = target(request.target_version)?;
        let engine = self.engine_migrating(&request);
        let (tx, rx) = tokio::sync::mpsc::channel(32);
        // The run goes on to completion even if the client leaves: a migration is never cut
        // off half-way by a disconnect. Progress the client cannot take is dropped.
        tokio::spawn(async move {
            let progress = tx.clone();
            let result = engine
                .migrate(target, &mut |event| {
                    let _ = progress.try_send(Ok(event_message(event)));
                })
                .await;
            let summary = match &result {
                Ok(report) => MigrateSummary {
                    applied: report.applied.clone(),
                    current_version: report.current_version,
                    success: true,
                    error: String::new(),
                    sync_request_id: report
                        .sync_requests
                        .last()
                        .map(ToString::to_string)
                        .unwrap_or_default(),
                    sync_job_id: String::new(),
                    rolled_back: report.rolled_back.clone(),
                    withdrawn_requests: report.withdrawn.clone(),
                },
                Err(err) => MigrateSummary {
                    success: false,
                    error: err.to_string(),
                    ..MigrateSummary::default()
                },
            };
            let _ = tx
                .send(Ok(MigrateEvent {
                    event: Some(migrate_event::Event::Summary(summary)),
                }))
                .await;
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }

    async fn verify(
        &self,
        _request: Request<VerifyRequest>,
    ) -> Result<Response<VerifyResponse>, Status> {
        let problems = self.engine().verify().await.map_err(status)?;
        Ok(Response::new(VerifyResponse {
            ok: problems.is_empty(),
            problems: problems
                .into_iter()
                .map(|p| VerifyProblem {
                    version: p.version,
                    problem: p.problem,
                })
                .collect(),
        }))
    }
}

fn event_message(event: Event) -> MigrateEvent {
    let event = match event {
        Event::Started {
            version,
            name,
            statements,
        } => migrate_event::Event::Started(MigrationStarted {
            version,
            name,
            statements: statements as u32,
            reverse: false,
        }),
        Event::RollingBack {
            version,
            name,
            statements,
        } => migrate_event::Event::Started(MigrationStarted {
            version,
            name,
            statements: statements as u32,
            reverse: true,
        }),
        Event::RolledBack {
            version,
            duration: d,
            withdrawn,
        } => migrate_event::Event::Finished(MigrationFinished {
            version,
            state: pb::MigrationState::RolledBack as i32,
            duration: duration(d),
            withdrawn_request: withdrawn.unwrap_or_default(),
            ..MigrationFinished::default()
        }),
        Event::Applied {
            version,
            duration: d,
            ..
        } => migrate_event::Event::Finished(MigrationFinished {
            version,
            state: pb::MigrationState::Applied as i32,
            duration: duration(d),
            ..MigrationFinished::default()
        }),
        Event::Failed {
            version,
            duration: d,
            error,
            statement,
        } => migrate_event::Event::Finished(MigrationFinished {
            version,
            state: pb::MigrationState::Failed as i32,
            duration: duration(d),
            error,
            failing_statement: statement,
            withdrawn_request: String::new(),
        }),
    };
    MigrateEvent { event: Some(event) }
}
