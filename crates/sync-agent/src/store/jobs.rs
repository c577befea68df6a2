//! Jobs and their per-server rows: creating a job (idempotent by request id; servers in backoff
//! skipped at once, unless forced; the others marked as waiting on the lease table) and reading
//! jobs with their outcome counts. The
//! outcomes themselves are `outcomes`' reads; the migrations' requests are `outbox`'s.
//!
//! A job has one row per server; a run's outcome fills every row of that server that was
//! waiting when the run was claimed (`complete`), so concurrent requests for one server share
//! one SSH run, and a request that arrives during a run waits for the next one.

use std::collections::HashMap;

use fleetsync_common::{
    Backend, ServiceError,
    sql::{Row, Tx, Value, is_unique_violation, retry},
};
use fleetsync_common::{JobId, RequestId, ServerId};

use super::{
    OUTCOMES_CHANNEL, Store, WORK_CHANNEL, db_now, fill::skip_in_backoff, notify,
    outbox::take_request, queue::add_missing_leases,
};
use crate::model::{JobOrigin, JobSelection, JobState, Outcome, Scopes};

/// Which servers a job covers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Selection {
    /// Every registered server.
    All,
    /// These (deduplicated, validated to exist).
    Ids(Vec<ServerId>),
}

/// Which jobs to list.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct JobFilter {
    /// Only this origin.
    pub origin: Option<JobOrigin>,
    /// Only this state.
    pub state: Option<JobState>,
    /// Only jobs covering this server.
    pub server_id: Option<ServerId>,
    /// Accepted at or after (ms).
    pub created_after: Option<i64>,
    /// Accepted before (ms).
    pub created_before: Option<i64>,
}

/// A job to create.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewJob {
    /// Idempotency key.
    pub request_id: RequestId,
    /// Where the request came from: a call, a migration, the schedule or a recovery.
    pub origin: JobOrigin,
    /// Which servers: all of them, or these ids.
    pub selection: Selection,
    /// What it is for (every job reads the whole inventory; the scopes record why).
    pub scopes: Scopes,
    /// Try servers in backoff too.
    pub force: bool,
    /// Free text.
    pub reason: String,
}

/// A job as stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JobRecord {
    /// The job's id, as `StartSync` returns it.
    pub id: JobId,
    /// Idempotency key.
    pub request_id: RequestId,
    /// Where the request came from: a call, a migration, the schedule or a recovery.
    pub origin: JobOrigin,
    /// What it is for.
    pub scopes: Scopes,
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
    /// Servers per outcome, in `Outcome` order.
    pub outcome_counts: Vec<(Outcome, i64)>,
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

fleetsync_common::stored_row! {
    /// A row of `sync_jobs` as stored, its outcome counts still JSON text (`None`: a job made
    /// before the counts were kept on its row, whose counts are its rows').
    struct JobRow {
        id: JobId,
        request_id: RequestId,
        origin: JobOrigin,
        scopes: Scopes,
        force_offline: i64,
        reason: String,
        total: i64,
        finished: i64,
        created_at: i64,
        finished_at: Option<i64>,
        outcome_counts: Option<String>,
    }
}

const JOB_COLUMNS: &str = JobRow::COLUMNS;

/// A job's servers per outcome, kept on the job's row (`sync_jobs.outcome_counts`, a JSON
/// object of stored outcome name to count) and updated under its lock by `complete::fill`, so
/// reads never count rows. Unknown outcome names or unreadable text are errors.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(super) struct OutcomeCounts(std::collections::BTreeMap<Outcome, i64>);

impl OutcomeCounts {
    /// Adds `n` servers with this outcome.
    pub(super) fn add(&mut self, outcome: Outcome, n: i64) {
        *self.0.entry(outcome).or_default() += n;
    }

    /// The stored form.
    pub(super) fn encode(&self) -> String {
        let map: std::collections::BTreeMap<&str, i64> =
            self.0.iter().map(|(o, n)| (o.as_str(), *n)).collect();
        serde_json::to_string(&map).expect("counts serialise")
    }

    /// From the stored form.
    pub(super) fn decode(text: &str) -> Result<Self, sqlx::Error> {
        let map: std::collections::BTreeMap<String, i64> =
            serde_json::from_str(text).map_err(|err| sqlx::Error::Decode(Box::new(err)))?;
        let mut counts = Self::default();
        for (outcome, n) in map {
            counts.add(Outcome::parse(&outcome)?, n);
        }
        Ok(counts)
    }

    /// In `Outcome` order, zero counts left out.
    fn into_vec(self) -> Vec<(Outcome, i64)> {
        self.0.into_iter().filter(|(_, n)| *n > 0).collect()
    }
}

/// The job of a row, and whether its counts are its rows' (a job made before the counts were
/// kept on its row: the caller counts them).
fn job_from(r: &Row) -> Result<(JobRecord, bool), sqlx::Error> {
    let r = JobRow::try_from(r)?;
    let counted_by_rows = r.outcome_counts.is_none();
    let job = JobRecord {
        id: r.id,
        request_id: r.request_id,
        origin: r.origin,
        scopes: r.scopes,
        force: r.force_offline != 0,
        reason: r.reason,
        total: r.total,
        finished: r.finished,
        created_at: r.created_at,
        finished_at: r.finished_at,
        outcome_counts: match r.outcome_counts {
            Some(text) => OutcomeCounts::decode(&text)?.into_vec(),
            None => Vec::new(),
        },
    };
    Ok((job, counted_by_rows))
}

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
            let (sql, args) = take_request(&id, &job.request_id);
            self.db.execute(sql, &args).await?;
        }
        let record = self
            .job(&id)
            .await?
            .ok_or_else(|| ServiceError::Internal(format!("job {id} vanished after insert")))?;
        Ok((record, created))
    }

    async fn create_job_once(&self, job: &NewJob) -> Result<(JobId, bool), ServiceError> {
        if let Some(existing) = self.job_id_by_request(&job.request_id).await? {
            self.check_same_request(&existing, job).await?;
            return Ok((existing, false));
        }
        let id = JobId::new(crate::new_id());
        let mut tx = self.db.begin().await?;
        let now = db_now(&mut tx).await?;
        tx.execute(
            "INSERT INTO sync_jobs (id, request_id, origin, state, scopes, force_offline, reason, \
             total, finished, created_at, selection, outcome_counts) \
             VALUES (?, ?, ?, ?, ?, ?, ?, 0, 0, ?, ?, '{}')",
            &[
                id.as_str().into(),
                job.request_id.as_str().into(),
                job.origin.as_str().into(),
                JobState::Pending.as_str().into(),
                job.scopes.to_string().into(),
                job.force.into(),
                job.reason.as_str().into(),
                now.into(),
                match job.selection {
                    Selection::All => JobSelection::All,
                    Selection::Ids(_) => JobSelection::Ids,
                }
                .as_str()
                .into(),
            ],
        )
        .await
        .map_err(twin)?;
        let ids = match &job.selection {
            Selection::All => None,
            Selection::Ids(ids) => Some(ids.as_slice()),
        };
        // Servers in backoff first, their rows filled (a forced job tries them all).
        let skipped = if job.force {
            0
        } else {
            skip_in_backoff(&mut tx, &id, ids, now).await?
        };
        let waiting = insert_waiting_rows(&mut tx, &id, ids, skipped > 0).await?;
        let total = skipped + waiting;
        if let Some(ids) = ids
            && total < ids.len() as i64
        {
            let missing = missing_ids(&mut tx, ids).await?;
            return Err(ServiceError::NotFound {
                what: "server",
                id: describe_ids(&missing),
            });
        }
        if waiting > 0 {
            // Servers inserted by hand (not through Fleet) may have no lease row yet.
            add_missing_leases(
                &mut tx,
                "sync_job_servers js JOIN servers s ON s.id = js.server_id",
                Some("js.job_id = ? AND js.outcome IS NULL"),
                &[id.as_str().into()],
            )
            .await
            .map_err(twin)?;
            // Mark the servers as waiting. This takes each lease row's lock, so it waits for a
            // completion in flight on that server, which then cannot clear the mark after us.
            tx.execute(
                "UPDATE server_leases SET pending_since = COALESCE(pending_since, ?) \
                 WHERE server_id IN (SELECT server_id FROM sync_job_servers \
                 WHERE job_id = ? AND outcome IS NULL)",
                &[now.into(), id.as_str().into()],
            )
            .await?;
        }
        let state = if waiting == 0 {
            JobState::Done
        } else if skipped > 0 {
            JobState::Running
        } else {
            JobState::Pending
        };
        let mut counts = OutcomeCounts::default();
        counts.add(Outcome::SkippedOffline, skipped);
        tx.execute(
            "UPDATE sync_jobs SET total = ?, finished = ?, state = ?, finished_at = ?, \
             outcome_counts = ? WHERE id = ?",
            &[
                total.into(),
                skipped.into(),
                state.as_str().into(),
                (waiting == 0).then_some(now).into(),
                counts.encode().into(),
                id.as_str().into(),
            ],
        )
        .await?;
        if skipped > 0 {
            notify(&mut tx, OUTCOMES_CHANNEL).await?;
        }
        notify(&mut tx, WORK_CHANNEL).await?;
        // A migration's request is taken once its job exists.
        let (sql, args) = take_request(&id, &job.request_id);
        tx.execute(sql, &args).await?;
        tx.commit().await?;
        Ok((id, true))
    }

    /// A request id names one request: the same servers, scopes and force. A repeat that asks
    /// for something else is refused with the differences, instead of silently getting the
    /// first job. (The reason is free text and may differ.)
    async fn check_same_request(&self, job_id: &JobId, job: &NewJob) -> Result<(), ServiceError> {
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
        let mut differences = Vec::new();
        let (had_scopes, had_force, had): (Scopes, i64, Option<JobSelection>) = row.decode()?;
        let had_force = had_force != 0;
        if had_scopes != job.scopes {
            differences.push(format!("scopes {} (the job has {had_scopes})", job.scopes));
        }
        if had_force != job.force {
            differences.push(format!("force {} (the job has {had_force})", job.force));
        }
        match (had, &job.selection) {
            (Some(JobSelection::Ids), Selection::All) => {
                differences.push("all servers (the job has a list of servers)".into());
            }
            (Some(JobSelection::All), Selection::Ids(_)) => {
                differences.push("a list of servers (the job has all servers)".into());
            }
            (Some(JobSelection::Ids), Selection::Ids(ids)) => {
                let had: Vec<ServerId> = self
                    .db
                    .fetch(
                        "SELECT server_id FROM sync_job_servers WHERE job_id = ? ORDER BY server_id",
                        &[job_id.into()],
                    )
                    .await?
                    .iter()
                    .map(Row::decode)
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
    pub async fn job_by_request(
        &self,
        request_id: &RequestId,
    ) -> Result<Option<JobRecord>, sqlx::Error> {
        match self.job_id_by_request(request_id).await? {
            Some(id) => self.job(&id).await,
            None => Ok(None),
        }
    }

    async fn job_id_by_request(
        &self,
        request_id: &RequestId,
    ) -> Result<Option<JobId>, sqlx::Error> {
        self.db
            .fetch_optional(
                "SELECT id FROM sync_jobs WHERE request_id = ?",
                &[request_id.into()],
            )
            .await?
            .map(|row| row.decode())
            .transpose()
    }

    /// A job's row with its outcome counts: one primary-key read, cheap enough to poll.
    pub async fn job(&self, id: &JobId) -> Result<Option<JobRecord>, sqlx::Error> {
        let sql = format!("SELECT {JOB_COLUMNS} FROM sync_jobs WHERE id = ?");
        let Some(row) = self.db.fetch_optional(&sql, &[id.into()]).await? else {
            return Ok(None);
        };
        let (mut job, counted_by_rows) = job_from(&row)?;
        if counted_by_rows {
            job.outcome_counts = self
                .count_rows(&[job.id.as_str()])
                .await?
                .remove(id)
                .unwrap_or_default();
        }
        Ok(Some(job))
    }

    /// Outcome counts from the rows of jobs made before the counts were kept on the job.
    async fn count_rows(
        &self,
        ids: &[&str],
    ) -> Result<HashMap<JobId, Vec<(Outcome, i64)>>, sqlx::Error> {
        let mut by_job: HashMap<JobId, OutcomeCounts> = HashMap::new();
        let rows = self
            .db
            .fetch_in(
                "SELECT job_id, outcome, COUNT(*) FROM sync_job_servers \
                 WHERE job_id IN $ids AND seq IS NOT NULL GROUP BY job_id, outcome",
                &[],
                ids,
            )
            .await?;
        for row in rows {
            let (job, outcome, n): (JobId, Outcome, i64) = row.decode()?;
            by_job.entry(job).or_default().add(outcome, n);
        }
        Ok(by_job
            .into_iter()
            .map(|(id, counts)| (id, counts.into_vec()))
            .collect())
    }

    /// Whether `ListJobs` filtered by `server` should walk the jobs newest first and probe each
    /// for the server (a server in many jobs: the page is found after a few probes) rather than
    /// read all the server's jobs and sort them (a server in few). PostgreSQL and MySQL choose
    /// by their statistics of the value; SQLite keeps none per value and always sorted all of
    /// them (a server in 10,000 jobs: 17 ms a page), so it is asked how many, up to a bound.
    async fn walk_jobs_for(&self, server: ServerId, limit: i64) -> Result<bool, sqlx::Error> {
        if self.backend() != Backend::Sqlite {
            return Ok(false);
        }
        let bound = limit.clamp(1, 1_000) * 10;
        let rows = self
            .db
            .fetch_optional(
                "SELECT COUNT(*) FROM (SELECT 1 FROM sync_job_servers WHERE server_id = ? LIMIT ?)",
                &[server.into(), bound.into()],
            )
            .await?
            .map_or(Ok(0), |r| r.decode())?;
        Ok(rows >= bound)
    }

    /// Jobs newest first after the keyset `after` (created_at, id), with their outcome counts.
    pub async fn list_jobs(
        &self,
        filter: &JobFilter,
        after: Option<(i64, JobId)>,
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
            args.push(state.as_str().into());
        }
        if let Some(server) = filter.server_id {
            sql.push_str(if self.walk_jobs_for(server, limit).await? {
                " AND EXISTS (SELECT 1 FROM sync_job_servers js \
                 WHERE js.job_id = sync_jobs.id AND js.server_id = ?)"
            } else {
                " AND id IN (SELECT job_id FROM sync_job_servers WHERE server_id = ?)"
            });
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
        let rows = self.db.fetch(&sql, &args).await?;
        let decoded: Vec<(JobRecord, bool)> =
            rows.iter().map(job_from).collect::<Result<_, _>>()?;
        let legacy: Vec<JobId> = decoded
            .iter()
            .filter(|(_, counted_by_rows)| *counted_by_rows)
            .map(|(job, _)| job.id.clone())
            .collect();
        let mut jobs: Vec<JobRecord> = decoded.into_iter().map(|(job, _)| job).collect();
        let legacy: Vec<&str> = legacy.iter().map(JobId::as_str).collect();
        if !legacy.is_empty() {
            let mut counted = self.count_rows(&legacy).await?;
            for job in &mut jobs {
                if let Some(counts) = counted.remove(&job.id) {
                    job.outcome_counts = counts;
                }
            }
        }
        Ok(jobs)
    }
}

/// Inserts a new job's rows that wait for a run: of `ids`, or of every server. With `after_skips`,
/// the servers already given a row (skipped in backoff) are passed over by the row's key, not
/// by testing their backoff again: a server whose reachability changed between the two
/// statements is in exactly one of them. Returns the rows inserted.
async fn insert_waiting_rows(
    tx: &mut Tx,
    job_id: &JobId,
    ids: Option<&[ServerId]>,
    after_skips: bool,
) -> Result<i64, sqlx::Error> {
    let backend = tx.backend();
    // MySQL has no `ON CONFLICT DO NOTHING`; `IGNORE` also passes over other errors, of which
    // this statement can have none (every value comes from a `servers` row of the same types).
    let ignore = if after_skips && backend == Backend::MySql {
        " IGNORE"
    } else {
        ""
    };
    let filter = match ids {
        None => "true",
        Some(_) => "id IN $ids",
    };
    // SQLite reads `ON CONFLICT` after a `SELECT` as its join's unless a `WHERE` comes first.
    let on_conflict = if after_skips && backend != Backend::MySql {
        " ON CONFLICT (job_id, server_id) DO NOTHING"
    } else {
        ""
    };
    let sql = format!(
        "INSERT{ignore} INTO sync_job_servers (job_id, server_id, server_name) \
         SELECT ?, id, name FROM servers WHERE {filter}{on_conflict}"
    );
    let args = [job_id.as_str().into()];
    let inserted = match ids {
        None => tx.execute(&sql, &args).await?,
        Some(ids) => tx.execute_in(&sql, &args, ids).await?,
    };
    Ok(inserted as i64)
}

async fn missing_ids(tx: &mut Tx, ids: &[ServerId]) -> Result<Vec<ServerId>, sqlx::Error> {
    let mut found = std::collections::BTreeSet::new();
    for row in tx
        .fetch_in("SELECT id FROM servers WHERE id IN $ids", &[], ids)
        .await?
    {
        found.insert(row.decode::<ServerId>()?);
    }
    Ok(ids
        .iter()
        .copied()
        .filter(|id| !found.contains(id))
        .collect())
}

fn describe_ids(ids: &[ServerId]) -> String {
    let shown: Vec<String> = ids.iter().take(10).map(ServerId::to_string).collect();
    if ids.len() > 10 {
        format!("{} (and {} more)", shown.join(", "), ids.len() - 10)
    } else {
        shown.join(", ")
    }
}
