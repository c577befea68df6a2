//! Run results as stored: one per server per job (`sync_job_servers`, read in stream order)
//! and one per run (`sync_runs`, the latest per server), decoded by one function.

use std::collections::HashMap;

use fleetsync_common::sql::Value;
use fleetsync_common::{JobId, ServerId};

use super::{InventoryCounts, Store};
use crate::model::{Cause, Outcome};

/// One server's outcome in one job.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OutcomeRecord {
    /// Position in the job's stream (1-based).
    pub seq: i64,
    /// The server's id.
    pub server_id: ServerId,
    /// Its name when the job was made.
    pub server_name: String,
    /// The run's result.
    pub result: RunResult,
    /// Recorded (ms).
    pub finished_at: i64,
}

/// A server's latest run (result, finished_at), and when that skipped the server as offline,
/// the latest run that did try it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LastRuns {
    /// The latest run.
    pub last: (RunResult, i64),
    /// The latest run other than SKIPPED_OFFLINE, when `last` is one.
    pub attempt: Option<(RunResult, i64)>,
}

/// The result of one server's run, as stored with every job it satisfies.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RunResult {
    /// How the run ended.
    pub outcome: Outcome,
    /// Why the server was unreachable, where known (with `Outcome::Unreachable` only).
    pub cause: Option<Cause>,
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

impl RunResult {
    /// A result with this outcome and message, nothing else known yet.
    pub fn new(outcome: Outcome, message: impl Into<String>) -> Self {
        Self {
            outcome,
            cause: None,
            message: message.into(),
            exit_status: None,
            duration_ms: 0,
            next_probe_at: None,
            counts: None,
        }
    }

    /// An offline server in backoff, not tried: when it failed and when it is probed next
    /// (`until`, ms). Made at job creation for the servers in backoff then, and by a run whose
    /// server went into backoff after its job was made.
    pub fn skipped_offline(consecutive_failures: i64, until: i64) -> Self {
        Self {
            next_probe_at: Some(until),
            ..Self::new(
                Outcome::SkippedOffline,
                format!(
                    "offline since {consecutive_failures} failed attempt(s); next probe {}",
                    crate::format_ms(until)
                ),
            )
        }
    }
}

fleetsync_common::stored_row! {
    /// A result as `sync_runs` and `sync_job_servers` both store it (an unknown outcome or
    /// cause is a decode error; counts still JSON text).
    struct ResultRow {
        outcome: Outcome,
        cause: Option<Cause>,
        message: Option<String>,
        exit_status: Option<i64>,
        duration_ms: Option<i64>,
        counts: Option<String>,
    }
}

/// The result columns both tables have.
const RESULT_COLUMNS: &str = ResultRow::COLUMNS;

impl TryFrom<ResultRow> for RunResult {
    type Error = sqlx::Error;

    /// `next_probe_at` is the caller's: only job rows have it.
    fn try_from(r: ResultRow) -> Result<Self, sqlx::Error> {
        Ok(RunResult {
            outcome: r.outcome,
            cause: r.cause,
            message: r.message.unwrap_or_default(),
            exit_status: r.exit_status,
            duration_ms: r.duration_ms.unwrap_or(0),
            next_probe_at: None,
            counts: r
                .counts
                .map(|c| serde_json::from_str(&c).map_err(|err| sqlx::Error::Decode(Box::new(err))))
                .transpose()?,
        })
    }
}

fleetsync_common::stored_row! {
    /// A job row with an outcome, in stream order (its result follows: [`ResultRow`]).
    struct OutcomeRow {
        seq: i64,
        server_id: ServerId,
        server_name: String,
        finished_at: Option<i64>,
        next_probe_at: Option<i64>,
    }
}

fleetsync_common::stored_row! {
    /// A server's latest run (its result follows: [`ResultRow`]).
    struct LatestRunRow {
        server_id: ServerId,
        finished_at: Option<i64>,
    }
}

impl Store {
    /// A job's outcomes after `cursor`, in stream order, at most `limit` (an index range read:
    /// the cost is the rows returned, whatever the job's size).
    pub async fn outcomes_after(
        &self,
        job_id: &JobId,
        cursor: i64,
        limit: i64,
    ) -> Result<Vec<OutcomeRecord>, sqlx::Error> {
        self.db
            .fetch(
                &format!(
                    "SELECT {}, {RESULT_COLUMNS} FROM sync_job_servers \
                     WHERE job_id = ? AND seq > ? ORDER BY seq LIMIT ?",
                    OutcomeRow::COLUMNS
                ),
                &[job_id.into(), cursor.into(), limit.into()],
            )
            .await?
            .iter()
            .map(|r| {
                let o = OutcomeRow::try_from(r)?;
                let mut result =
                    RunResult::try_from(ResultRow::read(r, OutcomeRow::COLUMN_COUNT)?)?;
                result.next_probe_at = o.next_probe_at;
                Ok(OutcomeRecord {
                    seq: o.seq,
                    server_id: o.server_id,
                    server_name: o.server_name,
                    result,
                    finished_at: o.finished_at.unwrap_or(0),
                })
            })
            .collect()
    }

    /// The latest run of each of these servers, and where that run skipped an offline server,
    /// the latest run that did try it (why it is offline).
    pub async fn last_runs(
        &self,
        ids: &[ServerId],
    ) -> Result<HashMap<ServerId, LastRuns>, sqlx::Error> {
        let mut out: HashMap<ServerId, LastRuns> = HashMap::new();
        for (id, last) in self.latest_runs(ids, None).await? {
            out.insert(
                id,
                LastRuns {
                    last,
                    attempt: None,
                },
            );
        }
        let skipped: Vec<ServerId> = out
            .iter()
            .filter(|(_, runs)| runs.last.0.outcome == Outcome::SkippedOffline)
            .map(|(&id, _)| id)
            .collect();
        if !skipped.is_empty() {
            for (id, attempt) in self
                .latest_runs(&skipped, Some(Outcome::SkippedOffline))
                .await?
            {
                if let Some(runs) = out.get_mut(&id) {
                    runs.attempt = Some(attempt);
                }
            }
        }
        Ok(out)
    }

    /// The latest run of each of these servers (other than `except`): (server id, (result,
    /// finished_at)).
    async fn latest_runs(
        &self,
        ids: &[ServerId],
        except: Option<Outcome>,
    ) -> Result<Vec<(ServerId, (RunResult, i64))>, sqlx::Error> {
        let mut out = Vec::with_capacity(ids.len());
        // One index probe per server (`sync_runs_last`, (server_id, id)): a correlated MAX is
        // a seek to the end of the server's range on every backend, where a MAX grouped over
        // an IN list read every run of every server. Skipping an outcome walks back over the
        // runs that have it (a server in backoff: one skip per periodic sync since its last
        // attempt).
        let (skip, before): (&str, Vec<Value>) = match except {
            Some(outcome) => (" AND r.outcome <> ?", vec![outcome.as_str().into()]),
            None => ("", Vec::new()),
        };
        let sql = format!(
            "SELECT {}, {RESULT_COLUMNS} FROM sync_runs \
             WHERE id IN (SELECT (SELECT MAX(r.id) FROM sync_runs r \
             WHERE r.server_id = s.id{skip}) FROM servers s WHERE s.id IN $ids)",
            LatestRunRow::COLUMNS
        );
        for r in self.db.fetch_in(&self.sql(&sql), &before, ids).await? {
            let run = LatestRunRow::try_from(&r)?;
            let result = RunResult::try_from(ResultRow::read(&r, LatestRunRow::COLUMN_COUNT)?)?;
            out.push((run.server_id, (result, run.finished_at.unwrap_or(0))));
        }
        Ok(out)
    }
}
