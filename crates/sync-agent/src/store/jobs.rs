//! Jobs, their servers and outcomes, the per-server leases that divide work between agents,
//! and the outbox of sync requests recorded by migrations.
//!
//! A job has one row per server; a server's outcome fills every job row of that server still
//! waiting, so concurrent requests for one server share one SSH run. Each filled row gets the
//! next sequence number of its job (the watch cursor), under the job row's lock, so sequence
//! numbers commit in order. Every write for a leased server checks the lease token first: an
//! agent that lost its lease writes nothing.

use fleetsync_common::{
    Backend, ServiceError,
    sql::{Row, Tx, Value, now_ms_sql},
};

use super::{InventoryCounts, InventoryWrite, Store, inventory, list};

/// Where a job came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum JobOrigin {
    /// An RPC.
    Rpc,
    /// A migration's sync request.
    Migration,
    /// The periodic sync.
    Schedule,
    /// A server that came back.
    Recovery,
}

impl JobOrigin {
    /// Stored name.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Rpc => "rpc",
            Self::Migration => "migration",
            Self::Schedule => "schedule",
            Self::Recovery => "recovery",
        }
    }

    fn parse(s: &str) -> Self {
        match s {
            "migration" => Self::Migration,
            "schedule" => Self::Schedule,
            "recovery" => Self::Recovery,
            _ => Self::Rpc,
        }
    }
}

/// A job's life.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum JobState {
    /// No server finished.
    Pending,
    /// Some servers finished.
    Running,
    /// Every server has an outcome.
    Done,
}

/// Which servers a job covers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Selection {
    /// Every registered server.
    All,
    /// These (deduplicated, validated to exist).
    Ids(Vec<i64>),
}

/// A job to create.
#[derive(Debug, Clone)]
pub struct NewJob {
    /// Idempotency key.
    pub request_id: String,
    /// Origin.
    pub origin: JobOrigin,
    /// Servers.
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
    /// Id.
    pub id: String,
    /// Idempotency key.
    pub request_id: String,
    /// Origin.
    pub origin: JobOrigin,
    /// Scope names, comma-joined.
    pub scopes: String,
    /// Force.
    pub force: bool,
    /// Reason.
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
    /// Server.
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
    /// Detail.
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

/// What one server's run produced, to record.
#[derive(Debug, Clone, Copy)]
pub struct RunRecord<'a> {
    /// The outcome.
    pub result: &'a RunResult,
    /// The inventory read (OK only).
    pub inventory: Option<&'a InventoryWrite>,
    /// The host key to pin, on first contact: (algorithm, fingerprint).
    pub pin: Option<(&'a str, &'a str)>,
    /// Whether the server answered (`None`: not tried).
    pub reachable: Option<bool>,
}

/// A server with job rows waiting, and whether it still exists.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PendingWork {
    /// The server.
    pub server_id: i64,
    /// False if it was deleted after the job was made.
    pub exists: bool,
}

const JOB_COLUMNS: &str = "id, request_id, origin, scopes, force_offline, reason, total, finished, \
                           created_at, finished_at";

fn job_from(r: &Row) -> Result<JobRecord, sqlx::Error> {
    Ok(JobRecord {
        id: r.text(0)?,
        request_id: r.text(1)?,
        origin: JobOrigin::parse(&r.text(2)?),
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
const CHUNK: usize = 500;

impl Store {
    /// Creates a job, or returns the one with the same request id (`created` false). Unknown
    /// server ids are NOT_FOUND, listed.
    pub async fn create_job(&self, job: &NewJob) -> Result<(JobRecord, bool), ServiceError> {
        if let Some(existing) = self.job_by_request(&job.request_id).await? {
            // The migrator handed this request over itself: it is taken all the same.
            self.db
                .execute(
                    "UPDATE sync_requests SET state = 'taken', job_id = ? WHERE id = ? AND state <> 'taken'",
                    &[existing.id.as_str().into(), job.request_id.as_str().into()],
                )
                .await?;
            return Ok((existing, false));
        }
        let id = crate::new_id();
        let mut tx = self.db.begin().await?;
        // Re-checked under the transaction: a concurrent twin may have won.
        if tx
            .fetch_optional(
                "SELECT id FROM sync_jobs WHERE request_id = ?",
                &[job.request_id.as_str().into()],
            )
            .await?
            .is_some()
        {
            drop(tx);
            let existing = self.job_by_request(&job.request_id).await?.ok_or_else(|| {
                ServiceError::Internal("job vanished after a concurrent insert".into())
            })?;
            return Ok((existing, false));
        }
        let now = crate::now_ms();
        tx.execute(
            "INSERT INTO sync_jobs (id, request_id, origin, state, scopes, force_offline, reason, \
             total, finished, created_at) VALUES (?, ?, ?, 'pending', ?, ?, ?, 0, 0, ?)",
            &[
                id.as_str().into(),
                job.request_id.as_str().into(),
                job.origin.as_str().into(),
                job.scopes.as_str().into(),
                job.force.into(),
                job.reason.as_str().into(),
                now.into(),
            ],
        )
        .await?;
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
        let record = self
            .job(&id)
            .await?
            .ok_or_else(|| ServiceError::Internal("job vanished after insert".into()))?;
        Ok((record, true))
    }

    async fn job_by_request(&self, request_id: &str) -> Result<Option<JobRecord>, sqlx::Error> {
        let row = self
            .db
            .fetch_optional(
                "SELECT id FROM sync_jobs WHERE request_id = ?",
                &[request_id.into()],
            )
            .await?;
        match row {
            Some(row) => self.job(&row.text(0)?).await,
            None => Ok(None),
        }
    }

    /// A job with its outcome counts.
    pub async fn job(&self, id: &str) -> Result<Option<JobRecord>, sqlx::Error> {
        let sql = format!("SELECT {JOB_COLUMNS} FROM sync_jobs WHERE id = ?");
        let Some(row) = self.db.fetch_optional(&sql, &[id.into()]).await? else {
            return Ok(None);
        };
        let mut job = job_from(&row)?;
        job.outcome_counts = self
            .db
            .fetch(
                "SELECT outcome, COUNT(*) FROM sync_job_servers WHERE job_id = ? \
                 AND outcome IS NOT NULL GROUP BY outcome ORDER BY outcome",
                &[id.into()],
            )
            .await?
            .iter()
            .map(|r| Ok((r.text(0)?, r.int(1)?)))
            .collect::<Result<_, sqlx::Error>>()?;
        Ok(Some(job))
    }

    /// A job's outcomes after `cursor`, in stream order, at most `limit`.
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

    /// Servers with job rows waiting and no live lease, lowest id first.
    pub async fn pending_work(&self, limit: i64) -> Result<Vec<PendingWork>, sqlx::Error> {
        let now = now_ms_sql(self.backend());
        let sql = format!(
            "SELECT DISTINCT js.server_id, s.id FROM sync_job_servers js \
             LEFT JOIN servers s ON s.id = js.server_id \
             LEFT JOIN server_leases l ON l.server_id = js.server_id \
             WHERE js.outcome IS NULL AND (l.holder IS NULL OR l.expires_at < {now}) \
             ORDER BY js.server_id LIMIT ?"
        );
        self.db
            .fetch(&sql, &[limit.into()])
            .await?
            .iter()
            .map(|r| {
                Ok(PendingWork {
                    server_id: r.int(0)?,
                    exists: r.opt_int(1)?.is_some(),
                })
            })
            .collect()
    }

    /// Claims a server's lease for `holder`: succeeds if nobody holds it or the holder's lease
    /// expired. Returns the new token (incremented on every claim).
    pub async fn claim_lease(
        &self,
        server_id: i64,
        holder: &str,
        ttl_ms: i64,
    ) -> Result<Option<i64>, sqlx::Error> {
        let now = now_ms_sql(self.backend());
        let mut tx = self.db.begin().await?;
        // A server registered before the lease table existed gets its row now.
        let exists = tx
            .fetch_optional(
                "SELECT token FROM server_leases WHERE server_id = ?",
                &[server_id.into()],
            )
            .await?
            .is_some();
        if !exists {
            tx.execute(
                "INSERT INTO server_leases (server_id, token) SELECT id, 0 FROM servers WHERE id = ?",
                &[server_id.into()],
            )
            .await?;
        }
        let claimed = tx
            .execute(
                &format!(
                    "UPDATE server_leases SET token = token + 1, holder = ?, \
                     expires_at = {now} + ?, heartbeat_at = {now} \
                     WHERE server_id = ? AND (holder IS NULL OR expires_at < {now})"
                ),
                &[holder.into(), ttl_ms.into(), server_id.into()],
            )
            .await?;
        if claimed == 0 {
            return Ok(None);
        }
        let token = tx
            .fetch_optional(
                "SELECT token FROM server_leases WHERE server_id = ? AND holder = ?",
                &[server_id.into(), holder.into()],
            )
            .await?
            .map(|r| r.int(0))
            .transpose()?;
        tx.commit().await?;
        Ok(token)
    }

    /// Extends a held lease. False if it was lost.
    pub async fn heartbeat(
        &self,
        server_id: i64,
        holder: &str,
        token: i64,
        ttl_ms: i64,
    ) -> Result<bool, sqlx::Error> {
        let now = now_ms_sql(self.backend());
        let updated = self
            .db
            .execute(
                &format!(
                    "UPDATE server_leases SET expires_at = {now} + ?, heartbeat_at = {now} \
                     WHERE server_id = ? AND holder = ? AND token = ?"
                ),
                &[ttl_ms.into(), server_id.into(), holder.into(), token.into()],
            )
            .await?;
        Ok(updated > 0)
    }

    /// Records a server's run: its inventory (if any), host key pin, reachability, and its
    /// outcome in every job row of that server still waiting; releases the lease. Fenced: if
    /// the lease is no longer `(holder, token)`, nothing is written and `Ok(None)` is returned.
    /// Returns the ids of the jobs that got an outcome.
    pub async fn record_run(
        &self,
        server_id: i64,
        holder: &str,
        token: i64,
        run: RunRecord<'_>,
    ) -> Result<Option<Vec<String>>, sqlx::Error> {
        let RunRecord {
            result,
            inventory,
            pin,
            reachable,
        } = run;
        let mut tx = self.db.begin().await?;
        if !lease_is_ours(&mut tx, server_id, holder, token).await? {
            return Ok(None);
        }
        let now = crate::now_ms();
        let mut result = result.clone();
        if let Some(inventory) = inventory {
            result.counts = Some(inventory::write(&mut tx, server_id, inventory, now).await?);
        }
        if let Some((algorithm, fingerprint)) = pin {
            tx.execute(
                "UPDATE servers SET host_key_algorithm = ?, host_key_fingerprint = ?, \
                 host_key_pinned_at = ? WHERE id = ? AND host_key_fingerprint IS NULL",
                &[
                    algorithm.into(),
                    fingerprint.into(),
                    now.into(),
                    server_id.into(),
                ],
            )
            .await?;
        }
        match reachable {
            Some(true) => {
                tx.execute(
                    "UPDATE servers SET reachability = 'online', last_seen_at = ?, \
                     consecutive_failures = 0, next_probe_at = NULL WHERE id = ?",
                    &[now.into(), server_id.into()],
                )
                .await?;
            }
            Some(false) => {
                tx.execute(
                    "UPDATE servers SET reachability = 'offline', \
                     consecutive_failures = consecutive_failures + 1, next_probe_at = ? WHERE id = ?",
                    &[result.next_probe_at.into(), server_id.into()],
                )
                .await?;
            }
            None => {}
        }
        let counts = result
            .counts
            .map(|c| serde_json::to_string(&c).expect("counts serialise"));
        tx.execute(
            "INSERT INTO sync_runs (server_id, lease_token, holder, scopes, started_at, finished_at, \
             outcome, cause, message, exit_status, duration_ms, counts) \
             VALUES (?, ?, ?, 'all', ?, ?, ?, ?, ?, ?, ?, ?)",
            &[
                server_id.into(),
                token.into(),
                holder.into(),
                (now - result.duration_ms).into(),
                now.into(),
                result.outcome.as_str().into(),
                result.cause.clone().into(),
                result.message.as_str().into(),
                result.exit_status.into(),
                result.duration_ms.into(),
                counts.clone().into(),
            ],
        )
        .await?;
        let jobs = fill_waiting(&mut tx, server_id, &result, counts, now).await?;
        notify(&mut tx, OUTCOMES_CHANNEL).await?;
        tx.execute(
            "UPDATE server_leases SET holder = NULL, expires_at = NULL WHERE server_id = ? AND token = ?",
            &[server_id.into(), token.into()],
        )
        .await?;
        tx.commit().await?;
        Ok(Some(jobs))
    }

    /// Ends the waiting job rows of a server that no longer exists (no lease: nothing to fence).
    pub async fn cancel_deleted(&self, server_id: i64) -> Result<Vec<String>, sqlx::Error> {
        let mut tx = self.db.begin().await?;
        if tx
            .fetch_optional("SELECT id FROM servers WHERE id = ?", &[server_id.into()])
            .await?
            .is_some()
        {
            return Ok(Vec::new());
        }
        let result = RunResult {
            outcome: "CANCELLED".into(),
            message: "the server was deleted before it was synced".into(),
            ..RunResult::default()
        };
        let jobs = fill_waiting(&mut tx, server_id, &result, None, crate::now_ms()).await?;
        tx.commit().await?;
        Ok(jobs)
    }

    /// Sync requests recorded by migrations that no job has taken yet: (id, scopes, reason).
    pub async fn untaken_requests(&self) -> Result<Vec<(String, String, String)>, sqlx::Error> {
        self.db
            .fetch(
                "SELECT id, scopes, reason FROM sync_requests WHERE state <> 'taken' \
                 ORDER BY created_at, id",
                &[],
            )
            .await?
            .iter()
            .map(|r| Ok((r.text(0)?, r.text(1)?, r.text(2)?)))
            .collect()
    }
}

/// PostgreSQL channel told when outcomes are recorded (watchers on other agents wake up).
pub const OUTCOMES_CHANNEL: &str = "fleetsync_outcomes";
/// PostgreSQL channel told when a job is created (schedulers on other agents wake up).
pub const WORK_CHANNEL: &str = "fleetsync_work";

/// `NOTIFY` on PostgreSQL (delivered when the transaction commits); nothing elsewhere, where
/// other agents' changes are found by polling.
async fn notify(tx: &mut Tx, channel: &str) -> Result<(), sqlx::Error> {
    if tx.backend() == Backend::Postgres {
        tx.execute(
            "SELECT CAST(1 AS BIGINT) FROM pg_notify(?, '')",
            &[channel.into()],
        )
        .await?;
    }
    Ok(())
}

/// True if the lease of `server_id` is still `(holder, token)`; locks the lease row until the
/// transaction ends (`FOR UPDATE`; SQLite's transaction holds the write lock already).
async fn lease_is_ours(
    tx: &mut Tx,
    server_id: i64,
    holder: &str,
    token: i64,
) -> Result<bool, sqlx::Error> {
    let lock = if tx.backend() == Backend::Sqlite {
        ""
    } else {
        " FOR UPDATE"
    };
    let lease = tx
        .fetch_optional(
            &format!("SELECT token, holder FROM server_leases WHERE server_id = ?{lock}"),
            &[server_id.into()],
        )
        .await?;
    Ok(match &lease {
        Some(row) => row.int(0)? == token && row.opt_text(1)?.as_deref() == Some(holder),
        None => false,
    })
}

/// Gives every waiting job row of `server_id` the run's outcome and the next sequence number of
/// its job; marks jobs done when their last server finishes.
async fn fill_waiting(
    tx: &mut Tx,
    server_id: i64,
    result: &RunResult,
    counts: Option<String>,
    now: i64,
) -> Result<Vec<String>, sqlx::Error> {
    let lock = if tx.backend() == Backend::Sqlite {
        ""
    } else {
        " FOR UPDATE"
    };
    let waiting: Vec<String> = tx
        .fetch(
            &format!(
                "SELECT job_id FROM sync_job_servers WHERE server_id = ? AND outcome IS NULL \
                 ORDER BY job_id{lock}"
            ),
            &[server_id.into()],
        )
        .await?
        .iter()
        .map(|r| r.text(0))
        .collect::<Result<_, _>>()?;
    for job_id in &waiting {
        // The job row's lock orders sequence numbers: they commit in the order they are given.
        tx.execute(
            "UPDATE sync_jobs SET finished = finished + 1, state = 'running' WHERE id = ?",
            &[job_id.as_str().into()],
        )
        .await?;
        let row = tx
            .fetch_optional(
                "SELECT finished, total FROM sync_jobs WHERE id = ?",
                &[job_id.as_str().into()],
            )
            .await?
            .ok_or(sqlx::Error::RowNotFound)?;
        let (seq, total) = (row.int(0)?, row.int(1)?);
        tx.execute(
            "UPDATE sync_job_servers SET seq = ?, outcome = ?, cause = ?, message = ?, \
             exit_status = ?, duration_ms = ?, finished_at = ?, next_probe_at = ?, counts = ? \
             WHERE job_id = ? AND server_id = ?",
            &[
                seq.into(),
                result.outcome.as_str().into(),
                result.cause.clone().into(),
                result.message.as_str().into(),
                result.exit_status.into(),
                result.duration_ms.into(),
                now.into(),
                result.next_probe_at.into(),
                counts.clone().into(),
                job_id.as_str().into(),
                server_id.into(),
            ],
        )
        .await?;
        if seq >= total {
            tx.execute(
                "UPDATE sync_jobs SET state = 'done', finished_at = ? WHERE id = ?",
                &[now.into(), job_id.as_str().into()],
            )
            .await?;
        }
    }
    Ok(waiting)
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
    /// Gives a lease back without recording anything (the agent is stopping).
    pub async fn release_lease(
        &self,
        server_id: i64,
        holder: &str,
        token: i64,
    ) -> Result<(), sqlx::Error> {
        self.db
            .execute(
                "UPDATE server_leases SET holder = NULL, expires_at = NULL \
                 WHERE server_id = ? AND holder = ? AND token = ?",
                &[server_id.into(), holder.into(), token.into()],
            )
            .await
            .map(drop)
    }

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

impl Store {
    /// True if any job waiting for this server asked to force past a backoff.
    pub async fn forced(&self, server_id: i64) -> Result<bool, sqlx::Error> {
        Ok(self
            .db
            .fetch_optional(
                "SELECT COUNT(*) FROM sync_job_servers js JOIN sync_jobs j ON j.id = js.job_id \
                 WHERE js.server_id = ? AND js.outcome IS NULL AND j.force_offline <> 0",
                &[server_id.into()],
            )
            .await?
            .map(|r| r.int(0))
            .transpose()?
            .unwrap_or(0)
            > 0)
    }

    /// Offline servers whose backoff has ended (by the database's clock), not leased.
    pub async fn due_offline(&self, limit: i64) -> Result<Vec<super::ServerRecord>, sqlx::Error> {
        let now = now_ms_sql(self.backend());
        let ids: Vec<i64> = self
            .db
            .fetch(
                &format!(
                    "SELECT s.id FROM servers s LEFT JOIN server_leases l ON l.server_id = s.id \
                     WHERE s.reachability = 'offline' AND s.next_probe_at <= {now} \
                     AND (l.holder IS NULL OR l.expires_at < {now}) ORDER BY s.next_probe_at LIMIT ?"
                ),
                &[limit.into()],
            )
            .await?
            .iter()
            .map(|r| r.int(0))
            .collect::<Result<_, _>>()?;
        let mut servers = Vec::with_capacity(ids.len());
        for id in ids {
            if let Some(server) = self.server(id).await? {
                servers.push(server);
            }
        }
        Ok(servers)
    }

    /// Records a reachability probe (fenced like a run) and releases the lease: back online
    /// (`next_probe_at` `None`) or one more failure with the next probe time. False if the
    /// lease was lost.
    pub async fn record_probe(
        &self,
        server_id: i64,
        holder: &str,
        token: i64,
        next_probe_at: Option<i64>,
    ) -> Result<bool, sqlx::Error> {
        let mut tx = self.db.begin().await?;
        if !lease_is_ours(&mut tx, server_id, holder, token).await? {
            return Ok(false);
        }
        match next_probe_at {
            None => {
                tx.execute(
                    "UPDATE servers SET reachability = 'online', last_seen_at = ?, \
                     consecutive_failures = 0, next_probe_at = NULL WHERE id = ?",
                    &[crate::now_ms().into(), server_id.into()],
                )
                .await?
            }
            Some(next) => {
                tx.execute(
                    "UPDATE servers SET consecutive_failures = consecutive_failures + 1, \
                     next_probe_at = ? WHERE id = ?",
                    &[next.into(), server_id.into()],
                )
                .await?
            }
        };
        tx.execute(
            "UPDATE server_leases SET holder = NULL, expires_at = NULL WHERE server_id = ? AND token = ?",
            &[server_id.into(), token.into()],
        )
        .await?;
        tx.commit().await?;
        Ok(true)
    }
}
