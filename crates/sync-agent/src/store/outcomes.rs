//! Run results as stored: one per server per job (`sync_job_servers`, read in stream order)
//! and one per run (`sync_runs`, the latest per server), decoded by one function.

use std::collections::HashMap;

use fleetsync_common::sql::{Row, Value};

use super::{InventoryCounts, Store};
use crate::model::{Cause, Outcome};

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
}

/// The columns `result_from` reads, in its order (both tables have them).
const RESULT_COLUMNS: &str = "outcome, cause, message, exit_status, duration_ms, counts";

/// A result from `RESULT_COLUMNS` starting at column `at`; an unknown outcome or cause is an
/// error. `next_probe_at` is the caller's: only job rows have it.
fn result_from(r: &Row, at: usize) -> Result<RunResult, sqlx::Error> {
    Ok(RunResult {
        outcome: Outcome::parse(&r.text(at)?)?,
        cause: r
            .opt_text(at + 1)?
            .as_deref()
            .map(Cause::parse)
            .transpose()?,
        message: r.opt_text(at + 2)?.unwrap_or_default(),
        exit_status: r.opt_int(at + 3)?,
        duration_ms: r.opt_int(at + 4)?.unwrap_or(0),
        next_probe_at: None,
        counts: r
            .opt_text(at + 5)?
            .map(|c| serde_json::from_str(&c).map_err(|err| sqlx::Error::Decode(Box::new(err))))
            .transpose()?,
    })
}

impl Store {
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
                &format!(
                    "SELECT seq, server_id, server_name, finished_at, next_probe_at, \
                     {RESULT_COLUMNS} FROM sync_job_servers \
                     WHERE job_id = ? AND seq > ? ORDER BY seq LIMIT ?"
                ),
                &[job_id.into(), cursor.into(), limit.into()],
            )
            .await?
            .iter()
            .map(|r| {
                let mut result = result_from(r, 5)?;
                result.next_probe_at = r.opt_int(4)?;
                Ok(OutcomeRecord {
                    seq: r.int(0)?,
                    server_id: r.int(1)?,
                    server_name: r.text(2)?,
                    result,
                    finished_at: r.opt_int(3)?.unwrap_or(0),
                })
            })
            .collect()
    }

    /// The latest run of each of these servers, and where that run skipped an offline server,
    /// the latest run that did try it (why it is offline).
    pub async fn last_runs(&self, ids: &[i64]) -> Result<HashMap<i64, LastRuns>, sqlx::Error> {
        let mut out: HashMap<i64, LastRuns> = HashMap::new();
        for (id, last) in self.latest_runs(ids, None).await? {
            out.insert(
                id,
                LastRuns {
                    last,
                    attempt: None,
                },
            );
        }
        let skipped: Vec<i64> = out
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
        ids: &[i64],
        except: Option<Outcome>,
    ) -> Result<Vec<(i64, (RunResult, i64))>, sqlx::Error> {
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
            "SELECT server_id, finished_at, {RESULT_COLUMNS} FROM sync_runs \
             WHERE id IN (SELECT (SELECT MAX(r.id) FROM sync_runs r \
             WHERE r.server_id = s.id{skip}) FROM servers s WHERE s.id IN $ids)"
        );
        for r in self.db.fetch_in(&self.sql(&sql), &before, ids).await? {
            out.push((r.int(0)?, (result_from(&r, 2)?, r.opt_int(1)?.unwrap_or(0))));
        }
        Ok(out)
    }
}
