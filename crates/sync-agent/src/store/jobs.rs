//! Jobs and their per-server rows: creating a job (idempotent by request id, marking its
//! servers as waiting on the lease table), reading jobs and their outcomes in stream order, and
//! the outbox of sync requests recorded by migrations.
//!
//! A job has one row per server; a run's outcome fills every row of that server that was
//! waiting when the run was claimed (`complete`), so concurrent requests for one server share
//! one SSH run, and a request that arrives during a run waits for the next one.

use fleetsync_common::{
    Backend, ServiceError,
    sql::{Row, Tx, Value, is_unique_violation, now_ms_sql, retry},
};

use super::{InventoryCounts, Store, list};
pub use crate::model::{JobOrigin, JobState};

/// Every scope, as stored: what the periodic and recovery syncs are for.
pub const ALL_SCOPES: &str = "charsets,databases,users";

/// Which servers a job covers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Selection {
    /// Every registered server.
    All,
    /// These (deduplicated, validated to exist).
    Ids(Vec<i64>),
}

/// Which jobs to list.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct JobFilter {
    /// Only this origin.
    pub origin: Option<JobOrigin>,
    /// Only this state.
    pub state: Option<JobState>,
    /// Only jobs covering this server.
    pub server_id: Option<i64>,
    /// Accepted at or after (ms).
    pub created_after: Option<i64>,
    /// Accepted before (ms).
    pub created_before: Option<i64>,
}

/// A job to create.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewJob {
    /// Idempotency key.
    pub request_id: String,
    /// Where the request came from: a call, a migration, the schedule or a recovery.
    pub origin: JobOrigin,
    /// Which servers: all of them, or these ids.
    pub selection: Selection,
    /// Scope names (`databases`, `charsets`, `users`), comma-joined.
    pub scopes: String,
    /// Try servers in backoff too.
    pub force: bool,
    /// Free text.
    pub reason: String,
}

/// A job as stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JobRecord {
    /// The job's id, as `StartSync` returns it.
    pub id: String,
    /// Idempotency key.
    pub request_id: String,
    /// Where the request came from: a call, a migration, the schedule or a recovery.
    pub origin: JobOrigin,
    /// Scope names, comma-joined.
    pub scopes: String,
    /// Whether servers in backoff are tried anyway.
    pub force: bool,
    /// Why it was started, as the caller said.
    pub reason: String,
    /// Servers in it.
    pub total: i64,
    /// Servers with an outcome.
    pub finished: i64,
    /// Accepted (ms).
    pub created_at: i64,
    /// Last outcome (ms), once done.
    pub finished_at: Option<i64>,
    /// Outcome name and count.
    pub outcome_counts: Vec<(String, i64)>,
}

impl JobRecord {
    /// Where it is in its life.
    pub fn state(&self) -> JobState {
        if self.finished >= self.total {
            JobState::Done
        } else if self.finished == 0 {
            JobState::Pending
        } else {
            JobState::Running
        }
    }
}

/// One server's outcome in one job.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OutcomeRecord {
    /// Position in the job's stream (1-based).
    pub seq: i64,
    /// The server's id.
    pub server_id: i64,
    /// Its name when the job was made.
    pub server_name: String,
    /// The run's result.
    pub result: RunResult,
    /// Recorded (ms).
    pub finished_at: i64,
}

/// The result of one server's run, as stored with every job it satisfies.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct RunResult {
    /// Outcome name, e.g. `OK`, `UNREACHABLE`.
    pub outcome: String,
    /// Unreachable cause name, e.g. `REFUSED`.
    pub cause: Option<String>,
    /// Human-readable detail: the error, or the first lines of a failing command's stderr.
    pub message: String,
    /// Exit status of a failed command.
    pub exit_status: Option<i64>,
    /// How long the run took.
    pub duration_ms: i64,
    /// When an offline server is probed next (ms).
    pub next_probe_at: Option<i64>,
    /// What changed (OK only).
    pub counts: Option<InventoryCounts>,
}

const JOB_COLUMNS: &str = "id, request_id, origin, scopes, force_offline, reason, total, finished, \
                           created_at, finished_at";

fn job_from(r: &Row) -> Result<JobRecord, sqlx::Error> {
    Ok(JobRecord {
        id: r.text(0)?,
        request_id: r.text(1)?,
        origin: JobOrigin::parse(&r.text(2)?)?,
        scopes: r.text(3)?,
        force: r.int(4)? != 0,
        reason: r.text(5)?,
        total: r.int(6)?,
        finished: r.int(7)?,
        created_at: r.int(8)?,
        finished_at: r.opt_int(9)?,
        outcome_counts: Vec::new(),
    })
}

/// Largest id list per statement.
pub(super) const CHUNK: usize = 500;

/// A unique-key violation while creating a job means a concurrent twin won: the retry finds it.
fn twin(err: sqlx::Error) -> ServiceError {
    if is_unique_violation(&err) {
        ServiceError::Aborted(format!("a concurrent request created the same rows: {err}"))
    } else {
        err.into()
    }
}

impl Store {
    /// Creates a job, or returns the one with the same request id (`created` false). Unknown
    /// server ids are NOT_FOUND, listed. Concurrent calls with one request id all get the one
    /// job; deadlocks and serialisation failures are retried.
    pub async fn create_job(&self, job: &NewJob) -> Result<(JobRecord, bool), ServiceError> {
        let (id, created) = retry("create job", || self.create_job_once(job)).await?;
        // The migrator handed this request over itself: it is taken all the same.
        if !created {
            self.db
                .execute(
                    "UPDATE sync_requests SET state = 'taken', job_id = ? WHERE id = ? AND state <> 'taken'",
                    &[id.as_str().into(), job.request_id.as_str().into()],
                )
                .await?;
        }
        let record = self
            .job(&id)
            .await?
            .ok_or_else(|| ServiceError::Internal(format!("job {id} vanished after insert")))?;
        Ok((record, created))
    }

    async fn create_job_once(&self, job: &NewJob) -> Result<(String, bool), ServiceError> {
        if let Some(existing) = self.job_id_by_request(&job.request_id).await? {
            self.check_same_request(&existing, job).await?;
            return Ok((existing, false));
        }
        let id = crate::new_id();
        let now_sql = now_ms_sql(self.backend());
        let mut tx = self.db.begin().await?;
        let now = tx
            .fetch_optional(&format!("SELECT {now_sql}"), &[])
            .await?
            .ok_or(sqlx::Error::RowNotFound)?
            .int(0)?;
        tx.execute(
            "INSERT INTO sync_jobs (id, request_id, origin, state, scopes, force_offline, reason, \
             total, finished, created_at, selection) VALUES (?, ?, ?, 'pending', ?, ?, ?, 0, 0, ?, ?)",
            &[
                id.as_str().into(),
                job.request_id.as_str().into(),
                job.origin.as_str().into(),
                job.scopes.as_str().into(),
                job.force.into(),
                job.reason.as_str().into(),
                now.into(),
                match job.selection {
                    Selection::All => "all",
                    Selection::Ids(_) => "ids",
                }
                .into(),
            ],
        )
        .await
        .map_err(twin)?;
        let total = match &job.selection {
            Selection::All => {
                tx.execute(
                    "INSERT INTO sync_job_servers (job_id, server_id, server_name) \
                     SELECT ?, id, name FROM servers",
                    &[id.as_str().into()],
                )
                .await?
            }
            Selection::Ids(ids) => {
                let mut inserted = 0;
                for chunk in ids.chunks(CHUNK) {
                    let sql = format!(
                        "INSERT INTO sync_job_servers (job_id, server_id, server_name) \
                         SELECT ?, id, name FROM servers WHERE id IN {}",
                        list(chunk.len())
                    );
                    let mut args: Vec<Value> = vec![id.as_str().into()];
                    args.extend(chunk.iter().map(|&i| Value::Int(i)));
                    inserted += tx.execute(&sql, &args).await?;
                }
                if inserted < ids.len() as u64 {
                    let missing = missing_ids(&mut tx, ids).await?;
                    return Err(ServiceError::NotFound {
                        what: "server",
                        id: describe_ids(&missing),
                    });
                }
                inserted
            }
        };
        if total > 0 {
            // Servers inserted by hand (not through Fleet) may have no lease row yet.
            tx.execute(
                "INSERT INTO server_leases (server_id, token) SELECT js.server_id, 0 \
                 FROM sync_job_servers js WHERE js.job_id = ? AND NOT EXISTS \
                 (SELECT 1 FROM server_leases l WHERE l.server_id = js.server_id)",
                &[id.as_str().into()],
            )
            .await
            .map_err(twin)?;
            // Mark the servers as waiting. This takes each lease row's lock, so it waits for a
            // completion in flight on that server, which then cannot clear the mark after us.
            tx.execute(
                "UPDATE server_leases SET pending_since = COALESCE(pending_since, ?) \
                 WHERE server_id IN (SELECT server_id FROM sync_job_servers WHERE job_id = ?)",
                &[now.into(), id.as_str().into()],
            )
            .await?;
        }
        let done = (total == 0).then_some(now);
        tx.execute(
            "UPDATE sync_jobs SET total = ?, state = ?, finished_at = ? WHERE id = ?",
            &[
                (total as i64).into(),
                if total == 0 { "done" } else { "pending" }.into(),
                done.into(),
                id.as_str().into(),
            ],
        )
        .await?;
        notify(&mut tx, WORK_CHANNEL).await?;
        // A migration's request is taken once its job exists.
        tx.execute(
            "UPDATE sync_requests SET state = 'taken', job_id = ? WHERE id = ? AND state <> 'taken'",
            &[id.as_str().into(), job.request_id.as_str().into()],
        )
        .await?;
        tx.commit().await?;
        Ok((id, true))
    }

    /// A request id names one request: the same servers, scopes and force. A repeat that asks
    /// for something else is refused with the differences, instead of silently getting the
    /// first job. (The reason is free text and may differ.)
    async fn check_same_request(&self, job_id: &str, job: &NewJob) -> Result<(), ServiceError> {
        let Some(row) = self
            .db
            .fetch_optional(
                "SELECT scopes, force_offline, selection FROM sync_jobs WHERE id = ?",
                &[job_id.into()],
            )
            .await?
        else {
            return Ok(());
        };
        let scopes = |s: &str| {
            let mut v: Vec<String> = s
                .split(',')
                .map(|p| p.trim().to_owned())
                .filter(|p| !p.is_empty())
                .collect();
            v.sort();
            v.dedup();
            v.join(",")
        };
        let mut differences = Vec::new();
        let (had_scopes, had_force) = (row.text(0)?, row.int(1)? != 0);
        if scopes(&had_scopes) != scopes(&job.scopes) {
            differences.push(format!(
                "scopes {} (the job has {})",
                scopes(&job.scopes),
                scopes(&had_scopes)
            ));
        }
        if had_force != job.force {
            differences.push(format!("force {} (the job has {had_force})", job.force));
        }
        match (row.opt_text(2)?.as_deref(), &job.selection) {
            (Some("ids"), Selection::All) => {
                differences.push("all servers (the job has a list of servers)".into());
            }
            (Some("all"), Selection::Ids(_)) => {
                differences.push("a list of servers (the job has all servers)".into());
            }
            (Some("ids"), Selection::Ids(ids)) => {
                let had: Vec<i64> = self
                    .db
                    .fetch(
                        "SELECT server_id FROM sync_job_servers WHERE job_id = ? ORDER BY server_id",
                        &[job_id.into()],
                    )
                    .await?
                    .iter()
                    .map(|r| r.int(0))
                    .collect::<Result<_, _>>()?;
                if had != *ids {
                    differences.push(format!(
                        "{} other server(s) (the job has {})",
                        ids.len(),
                        had.len()
                    ));
                }
            }
            _ => {}
        }
        if differences.is_empty() {
            return Ok(());
        }
        Err(ServiceError::AlreadyExists(format!(
            "request_id {:?} already names job {job_id}, made by a different request: this one \
             asks for {}. Use a new request_id, or send the request_id alone to join that job",
            job.request_id,
            differences.join(", ")
        )))
    }

    /// The job made under a request id, with its outcome counts.
    pub async fn job_by_request(&self, request_id: &str) -> Result<Option<JobRecord>, sqlx::Error> {
        match self.job_id_by_request(request_id).await? {
            Some(id) => self.job(&id).await,
            None => Ok(None),
        }
    }

    async fn job_id_by_request(&self, request_id: &str) -> Result<Option<String>, sqlx::Error> {
        self.db
            .fetch_optional(
                "SELECT id FROM sync_jobs WHERE request_id = ?",
                &[request_id.into()],
            )
            .await?
            .map(|row| row.text(0))
            .transpose()
    }

    /// A job's row (no outcome counts: one primary-key read, cheap enough to poll).
    pub async fn job_progress(&self, id: &str) -> Result<Option<JobRecord>, sqlx::Error> {
        let sql = format!("SELECT {JOB_COLUMNS} FROM sync_jobs WHERE id = ?");
        self.db
            .fetch_optional(&sql, &[id.into()])
            .await?
            .as_ref()
            .map(job_from)
            .transpose()
    }

    /// A job with its outcome counts.
    pub async fn job(&self, id: &str) -> Result<Option<JobRecord>, sqlx::Error> {
        let Some(mut job) = self.job_progress(id).await? else {
            return Ok(None);
        };
        job.outcome_counts = self
            .db
            .fetch(
                "SELECT outcome, COUNT(*) FROM sync_job_servers WHERE job_id = ? \
                 AND seq IS NOT NULL GROUP BY outcome ORDER BY outcome",
                &[id.into()],
            )
            .await?
            .iter()
            .map(|r| Ok((r.text(0)?, r.int(1)?)))
            .collect::<Result<_, sqlx::Error>>()?;
        Ok(Some(job))
    }

    /// A job's outcomes after `cursor`, in stream order, at most `limit` (an index range read:
    /// the cost is the rows returned, whatever the job's size).
    pub async fn outcomes_after(
        &self,
        job_id: &str,
        cursor: i64,
        limit: i64,
    ) -> Result<Vec<OutcomeRecord>, sqlx::Error> {
        self.db
            .fetch(
                "SELECT seq, server_id, server_name, outcome, cause, message, exit_status, \
                 duration_ms, next_probe_at, counts, finished_at FROM sync_job_servers \
                 WHERE job_id = ? AND seq > ? ORDER BY seq LIMIT ?",
                &[job_id.into(), cursor.into(), limit.into()],
            )
            .await?
            .iter()
            .map(|r| {
                Ok(OutcomeRecord {
                    seq: r.int(0)?,
                    server_id: r.int(1)?,
                    server_name: r.text(2)?,
                    result: RunResult {
                        outcome: r.text(3)?,
                        cause: r.opt_text(4)?,
                        message: r.opt_text(5)?.unwrap_or_default(),
                        exit_status: r.opt_int(6)?,
                        duration_ms: r.opt_int(7)?.unwrap_or(0),
                        next_probe_at: r.opt_int(8)?,
                        counts: r.opt_text(9)?.and_then(|c| serde_json::from_str(&c).ok()),
                    },
                    finished_at: r.opt_int(10)?.unwrap_or(0),
                })
            })
            .collect()
    }

    /// Jobs newest first after the keyset `after` (created_at, id), with their outcome counts.
    pub async fn list_jobs(
        &self,
        filter: &JobFilter,
        after: Option<(i64, String)>,
        limit: i64,
    ) -> Result<Vec<JobRecord>, sqlx::Error> {
        let mut sql = format!("SELECT {JOB_COLUMNS} FROM sync_jobs WHERE 1 = 1");
        let mut args: Vec<Value> = Vec::new();
        if let Some(origin) = filter.origin {
            sql.push_str(" AND origin = ?");
            args.push(origin.as_str().into());
        }
        if let Some(state) = filter.state {
            sql.push_str(" AND state = ?");
            args.push(
                match state {
                    JobState::Pending => "pending",
                    JobState::Running => "running",
                    JobState::Done => "done",
                }
                .into(),
            );
        }
        if let Some(server) = filter.server_id {
            sql.push_str(" AND id IN (SELECT job_id FROM sync_job_servers WHERE server_id = ?)");
            args.push(server.into());
        }
        if let Some(at) = filter.created_after {
            sql.push_str(" AND created_at >= ?");
            args.push(at.into());
        }
        if let Some(at) = filter.created_before {
            sql.push_str(" AND created_at < ?");
            args.push(at.into());
        }
        if let Some((at, id)) = after {
            sql.push_str(" AND (created_at < ? OR (created_at = ? AND id < ?))");
            args.extend([at.into(), at.into(), id.into()]);
        }
        sql.push_str(" ORDER BY created_at DESC, id DESC LIMIT ?");
        args.push(limit.into());
        let mut jobs: Vec<JobRecord> = self
            .db
            .fetch(&sql, &args)
            .await?
            .iter()
            .map(job_from)
            .collect::<Result<_, _>>()?;
        if jobs.is_empty() {
            return Ok(jobs);
        }
        let ids: Vec<Value> = jobs.iter().map(|j| j.id.as_str().into()).collect();
        let counts = self
            .db
            .fetch(
                &format!(
                    "SELECT job_id, outcome, COUNT(*) FROM sync_job_servers WHERE job_id IN {} \
                     AND seq IS NOT NULL GROUP BY job_id, outcome ORDER BY job_id, outcome",
                    list(ids.len())
                ),
                &ids,
            )
            .await?;
        let mut by_job: std::collections::HashMap<String, Vec<(String, i64)>> =
            std::collections::HashMap::new();
        for row in counts {
            by_job
                .entry(row.text(0)?)
                .or_default()
                .push((row.text(1)?, row.int(2)?));
        }
        for job in &mut jobs {
            job.outcome_counts = by_job.remove(&job.id).unwrap_or_default();
        }
        Ok(jobs)
    }
}

/// PostgreSQL channel told when outcomes are recorded (watchers on other agents wake up).
pub const OUTCOMES_CHANNEL: &str = "fleetsync_outcomes";
/// PostgreSQL channel told when a job is created (schedulers on other agents wake up).
pub const WORK_CHANNEL: &str = "fleetsync_work";

/// `NOTIFY` on PostgreSQL (delivered when the transaction commits); nothing elsewhere, where
/// other agents' changes are found by polling.
pub(super) async fn notify(tx: &mut Tx, channel: &str) -> Result<(), sqlx::Error> {
    if tx.backend() == Backend::Postgres {
        tx.execute(
            "SELECT CAST(1 AS BIGINT) FROM pg_notify(?, '')",
            &[channel.into()],
        )
        .await?;
    }
    Ok(())
}

async fn missing_ids(tx: &mut Tx, ids: &[i64]) -> Result<Vec<i64>, sqlx::Error> {
    let mut found = std::collections::BTreeSet::new();
    for chunk in ids.chunks(CHUNK) {
        let sql = format!("SELECT id FROM servers WHERE id IN {}", list(chunk.len()));
        let args: Vec<Value> = chunk.iter().map(|&i| Value::Int(i)).collect();
        for row in tx.fetch(&sql, &args).await? {
            found.insert(row.int(0)?);
        }
    }
    Ok(ids
        .iter()
        .copied()
        .filter(|id| !found.contains(id))
        .collect())
}

fn describe_ids(ids: &[i64]) -> String {
    let shown: Vec<String> = ids.iter().take(10).map(i64::to_string).collect();
    if ids.len() > 10 {
        format!("{} (and {} more)", shown.join(", "), ids.len() - 10)
    } else {
        shown.join(", ")
    }
}

impl Store {
    /// The latest run of each of these servers: server id -> (result, finished_at).
    pub async fn last_runs(
        &self,
        ids: &[i64],
    ) -> Result<std::collections::HashMap<i64, (RunResult, i64)>, sqlx::Error> {
        let mut out = std::collections::HashMap::new();
        for chunk in ids.chunks(CHUNK) {
            let sql = format!(
                "SELECT server_id, outcome, cause, message, exit_status, duration_ms, counts, \
                 finished_at FROM sync_runs WHERE id IN (SELECT MAX(id) FROM sync_runs \
                 WHERE server_id IN {} GROUP BY server_id)",
                list(chunk.len())
            );
            let args: Vec<Value> = chunk.iter().map(|&i| Value::Int(i)).collect();
            for r in self.db.fetch(&sql, &args).await? {
                out.insert(
                    r.int(0)?,
                    (
                        RunResult {
                            outcome: r.opt_text(1)?.unwrap_or_default(),
                            cause: r.opt_text(2)?,
                            message: r.opt_text(3)?.unwrap_or_default(),
                            exit_status: r.opt_int(4)?,
                            duration_ms: r.opt_int(5)?.unwrap_or(0),
                            next_probe_at: None,
                            counts: r.opt_text(6)?.and_then(|c| serde_json::from_str(&c).ok()),
                        },
                        r.opt_int(7)?.unwrap_or(0),
                    ),
                );
            }
        }
        Ok(out)
    }
}
