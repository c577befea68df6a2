//! The one writer of a job's outcomes: completions, `DeleteServer` and retention's orphan
//! clean-up all fill a job's rows through [`fill`], which takes the same locks in the same order
//! for all of them (the job's row, then its rows still waiting) and fills each row at most once.
//! Sequence numbers are given per job and per batch under the job row's lock, taken last and in
//! job-id order, so cursors commit in order without holding agents on one job for long; the
//! job's outcome counts move with them.
//!
//! Job creation fills no waiting row: it inserts a new job's rows (invisible until it commits),
//! those of servers in backoff already filled with `SKIPPED_OFFLINE` ([`skip_in_backoff`]), and
//! marks the other servers as waiting on the lease rows, the first lock a completion and a
//! delete take. It never waits on a job row, so it closes no cycle with the fillers.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use fleetsync_common::{
    Backend, JobId, ServerId,
    sql::{Tx, Value},
};

use crate::model::{Cause, JobState, Outcome, Reachability};

use super::{
    CHUNK, OUTCOMES_CHANNEL, OutcomeCounts, RunResult, db_now, for_update, list, notify, rows,
};

/// One server's outcome to give to the job rows waiting for it.
pub(super) struct Fill<'a> {
    pub server_id: ServerId,
    /// Only rows of jobs created up to this time (ms, database clock) are served.
    pub served_before: i64,
    pub result: &'a RunResult,
    pub counts: Option<String>,
}

/// Which jobs each server served.
#[derive(Debug, Default)]
pub(super) struct FillReport {
    pub jobs: HashMap<ServerId, Vec<JobId>>,
}

/// The job rows waiting for these servers, split into those each run serves (by job) and the
/// servers that keep rows waiting for a later run.
pub(super) struct Waiting {
    /// job id -> (server id, server name), ascending server id.
    served: BTreeMap<JobId, Vec<(ServerId, String)>>,
    pub(super) still_waiting: BTreeSet<ServerId>,
}

pub(super) async fn waiting_rows(tx: &mut Tx, fills: &[Fill<'_>]) -> Result<Waiting, sqlx::Error> {
    let before: HashMap<ServerId, i64> = fills
        .iter()
        .map(|f| (f.server_id, f.served_before))
        .collect();
    let ids: Vec<ServerId> = fills.iter().map(|f| f.server_id).collect();
    let mut waiting = Waiting {
        served: BTreeMap::new(),
        still_waiting: BTreeSet::new(),
    };
    // Two statements, not a join: joined with `sync_jobs`, MariaDB with fresh statistics
    // (a job of 100,000 servers inserted moments ago) drives from the jobs and scans every row of
    // each job per batch; alone, the rows are an index range on (server_id, outcome). On MySQL
    // the index is named: past `eq_range_index_dive_limit` (200) values in the list, MariaDB
    // estimates from statistics, which a fresh job makes stale, and chose a full scan (100 ms a
    // batch at 100,000 servers).
    let hint = waiting_hint(tx.backend());
    let mut rows: Vec<(JobId, ServerId, String)> = Vec::new();
    let sql = format!(
        "SELECT job_id, server_id, server_name FROM sync_job_servers{hint} \
         WHERE outcome IS NULL AND server_id IN $ids"
    );
    for row in tx.fetch_in(&sql, &[], &ids).await? {
        rows.push(row.decode()?);
    }
    let jobs: Vec<&str> = rows
        .iter()
        .map(|(job, _, _)| job.as_str())
        .collect::<BTreeSet<_>>()
        .into_iter()
        .collect();
    let mut created_at: HashMap<JobId, i64> = HashMap::with_capacity(jobs.len());
    for row in tx
        .fetch_in(
            "SELECT id, created_at FROM sync_jobs WHERE id IN $ids",
            &[],
            &jobs,
        )
        .await?
    {
        let (id, at): (JobId, i64) = row.decode()?;
        created_at.insert(id, at);
    }
    for (job, server, name) in rows {
        let created = created_at.get(&job).copied().unwrap_or(i64::MAX);
        // A request made in the claim's own millisecond is served: the run reads the server
        // only after connecting and logging in, milliseconds after the claim.
        if created <= before.get(&server).copied().unwrap_or(i64::MIN) {
            waiting.served.entry(job).or_default().push((server, name));
        } else {
            waiting.still_waiting.insert(server);
        }
    }
    for servers in waiting.served.values_mut() {
        servers.sort_unstable_by_key(|(id, _)| *id);
    }
    Ok(waiting)
}

/// Gives the served rows their outcome and their job's next sequence numbers; marks jobs done
/// when their last server finishes. The one writer of a job's outcomes: completions,
/// `DeleteServer` and retention's orphan clean-up all fill through here.
///
/// One filler per row: for each job, in job-id order, the job's row is locked first, then its
/// rows among the candidates that are still waiting are read again under that lock.
/// A concurrent filler of the same rows (two deletes of one server, a delete racing the
/// server's completion, two agents' retention passes) queues on the job row and then finds them
/// filled: it writes and counts nothing. Counters, cursors and the outcome counts move together
/// under the lock, so the stream is 1..N without gap or repeat.
pub(super) async fn fill(
    tx: &mut Tx,
    now: i64,
    fills: &[Fill<'_>],
    waiting: Waiting,
) -> Result<FillReport, sqlx::Error> {
    let by_server: HashMap<ServerId, &Fill<'_>> = fills.iter().map(|f| (f.server_id, f)).collect();
    let mut report = FillReport::default();
    let mut values: Vec<Value> = Vec::new();
    let mut pending_rows = 0;
    let backend = tx.backend();
    let upsert = match backend {
        Backend::MySql => {
            "ON DUPLICATE KEY UPDATE seq = VALUES(seq), outcome = VALUES(outcome), \
             cause = VALUES(cause), message = VALUES(message), exit_status = VALUES(exit_status), \
             duration_ms = VALUES(duration_ms), finished_at = VALUES(finished_at), \
             next_probe_at = VALUES(next_probe_at), counts = VALUES(counts)"
        }
        _ => {
            "ON CONFLICT (job_id, server_id) DO UPDATE SET seq = excluded.seq, \
             outcome = excluded.outcome, cause = excluded.cause, message = excluded.message, \
             exit_status = excluded.exit_status, duration_ms = excluded.duration_ms, \
             finished_at = excluded.finished_at, next_probe_at = excluded.next_probe_at, \
             counts = excluded.counts"
        }
    };
    let lock = for_update(backend);
    for (job_id, candidates) in &waiting.served {
        // The job's row first: every filler of this job queues here.
        let Some(job) = tx
            .fetch_optional(
                &format!(
                    "SELECT finished, total, outcome_counts, finished_at FROM sync_jobs \
                     WHERE id = ?{lock}"
                ),
                &[job_id.as_str().into()],
            )
            .await?
        else {
            continue; // Pruned meanwhile: nothing to fill.
        };
        let (finished, total, counts, finished_at): (i64, i64, Option<String>, Option<i64>) =
            job.decode()?;
        let mut counts = match counts {
            Some(text) => OutcomeCounts::decode(&text)?,
            // A job made before the counts were kept: counted once, here, under its lock.
            None => count_rows(tx, job_id).await?,
        };
        // Then, under that lock, which candidates still wait: a filler that went first has
        // filled the others.
        let still = still_waiting(tx, job_id, candidates).await?;
        let servers: Vec<&(ServerId, String)> = candidates
            .iter()
            .filter(|(id, _)| still.contains(id))
            .collect();
        if servers.is_empty() {
            continue;
        }
        let n = servers.len() as i64;
        for (server_id, _) in &servers {
            counts.add(by_server[server_id].result.outcome, 1);
        }
        let done = finished + n >= total;
        let finished_at = if done { Some(now) } else { finished_at };
        tx.execute(
            "UPDATE sync_jobs SET finished = ?, state = ?, finished_at = ?, outcome_counts = ? \
             WHERE id = ?",
            &[
                (finished + n).into(),
                if done {
                    JobState::Done
                } else {
                    JobState::Running
                }
                .as_str()
                .into(),
                finished_at.into(),
                counts.encode().into(),
                job_id.as_str().into(),
            ],
        )
        .await?;
        for (seq, (server_id, name)) in (finished + 1..).zip(servers) {
            let f = by_server[server_id];
            values.extend([
                job_id.as_str().into(),
                (*server_id).into(),
                name.as_str().into(),
                Value::Int(seq),
                f.result.outcome.as_str().into(),
                f.result.cause.map(Cause::as_str).into(),
                f.result.message.as_str().into(),
                f.result.exit_status.into(),
                Value::Int(f.result.duration_ms),
                Value::Int(now),
                f.result.next_probe_at.into(),
                f.counts.clone().into(),
            ]);
            pending_rows += 1;
            report
                .jobs
                .entry(*server_id)
                .or_default()
                .push(job_id.clone());
            if pending_rows == ROWS_PER_STATEMENT {
                upsert_rows(tx, &mut values, pending_rows, upsert).await?;
                pending_rows = 0;
            }
        }
    }
    if pending_rows > 0 {
        upsert_rows(tx, &mut values, pending_rows, upsert).await?;
    }
    Ok(report)
}

/// Which of `candidates` still wait in this job, read under the job row's lock. A plain read is
/// enough: every filler of the job holds that lock while it writes and commits before it lets
/// go, and each statement sees what was committed when it started (PostgreSQL, and MySQL at
/// `READ COMMITTED`; SQLite has one writer). Locking the rows as well cost PostgreSQL a write of
/// every row's header, a third of a 10,000-server job's time.
async fn still_waiting(
    tx: &mut Tx,
    job_id: &JobId,
    candidates: &[(ServerId, String)],
) -> Result<BTreeSet<ServerId>, sqlx::Error> {
    let hint = waiting_hint(tx.backend());
    let mut still = BTreeSet::new();
    // The waiting rows of these servers (the index of waiting rows), this job's kept: with
    // `job_id = ?` in the statement, PostgreSQL's generic plan walked the job's whole
    // primary-key range, every row of a 10,000-server job per batch (a third of its time).
    let sql = format!(
        "SELECT job_id, server_id FROM sync_job_servers{hint} WHERE outcome IS NULL \
         AND server_id IN $ids"
    );
    let ids: Vec<ServerId> = candidates.iter().map(|(id, _)| *id).collect();
    for row in tx.fetch_in(&sql, &[], &ids).await? {
        let (job, server): (JobId, ServerId) = row.decode()?;
        if job == *job_id {
            still.insert(server);
        }
    }
    Ok(still)
}

/// The index hint that makes MySQL read waiting rows by server (see [`waiting_rows`]).
fn waiting_hint(backend: Backend) -> &'static str {
    match backend {
        Backend::MySql => " FORCE INDEX (sync_job_servers_waiting)",
        _ => "",
    }
}

/// A job's outcome counts from its rows (a job made before the counts were kept).
async fn count_rows(tx: &mut Tx, job_id: &JobId) -> Result<OutcomeCounts, sqlx::Error> {
    let mut counts = OutcomeCounts::default();
    for row in tx
        .fetch(
            "SELECT outcome, COUNT(*) FROM sync_job_servers WHERE job_id = ? \
             AND outcome IS NOT NULL GROUP BY outcome",
            &[job_id.into()],
        )
        .await?
    {
        let (outcome, n): (Outcome, i64) = row.decode()?;
        counts.add(outcome, n);
    }
    Ok(counts)
}

/// Columns of one `sync_job_servers` row as [`fill`] writes it.
const JOB_ROW_COLUMNS: usize = 12;

/// Rows written per statement.
const ROWS_PER_STATEMENT: usize = 200;

/// A new job's servers that are offline and in backoff by the database's clock (`now`), among
/// `ids` or all servers: their rows are inserted already filled with `SKIPPED_OFFLINE`, cursors
/// 1..k in server order, so that a job that is not forced never claims them. One row written per
/// server, where a skip at run time cost a claim, a completion and a run row; written by the
/// database from the server rows (`INSERT ... SELECT`), nothing read into the agent. The job is
/// still invisible (its transaction has not committed), so no other filler can meet these rows;
/// the caller inserts the job's other rows after them (passing over these) and counts them on
/// the job's row. Returns k.
pub(super) async fn skip_in_backoff(
    tx: &mut Tx,
    job_id: &JobId,
    ids: Option<&[ServerId]>,
    now: i64,
) -> Result<i64, sqlx::Error> {
    let message = skip_message_sql(tx.backend());
    let sql = |filter: &str| {
        format!(
            "INSERT INTO sync_job_servers (job_id, server_id, server_name, seq, outcome, message, \
             duration_ms, finished_at, next_probe_at) \
             SELECT ?, id, name, ? + ROW_NUMBER() OVER (ORDER BY id), ?, {message}, 0, ?, next_probe_at \
             FROM servers WHERE next_probe_at > ? AND reachability = ?{filter}"
        )
    };
    let args = |skipped: i64| -> Vec<Value> {
        vec![
            job_id.as_str().into(),
            Value::Int(skipped),
            Outcome::SkippedOffline.as_str().into(),
            Value::Int(now),
            Value::Int(now),
            Reachability::Offline.as_str().into(),
        ]
    };
    let Some(ids) = ids else {
        return Ok(tx.execute(&sql(""), &args(0)).await? as i64);
    };
    // In server order across chunks: each chunk's cursors follow the last chunk's.
    let mut sorted = ids.to_vec();
    sorted.sort_unstable();
    let mut skipped = 0;
    for chunk in sorted.chunks(CHUNK) {
        let mut args = args(skipped);
        args.extend(chunk.iter().map(|id| (*id).into()));
        skipped += tx
            .execute(&sql(&format!(" AND id IN {}", list(chunk.len()))), &args)
            .await? as i64;
    }
    Ok(skipped)
}

/// `RunResult::skipped_offline`'s message, made by the database from a server row: "offline
/// since N failed attempt(s); next probe 2026-12-07T20:00:00Z" (the next probe in UTC, to the
/// second, as `format_ms` writes it).
fn skip_message_sql(backend: Backend) -> &'static str {
    match backend {
        Backend::Postgres => {
            "'offline since ' || consecutive_failures || ' failed attempt(s); next probe ' || \
             to_char(TIMESTAMP '1970-01-01' + next_probe_at / 1000 * INTERVAL '1 second', \
             'YYYY-MM-DD\"T\"HH24:MI:SS\"Z\"')"
        }
        Backend::Sqlite => {
            "'offline since ' || consecutive_failures || ' failed attempt(s); next probe ' || \
             strftime('%Y-%m-%dT%H:%M:%SZ', next_probe_at / 1000, 'unixepoch')"
        }
        Backend::MySql => {
            "CONCAT('offline since ', consecutive_failures, ' failed attempt(s); next probe ', \
             DATE_FORMAT(TIMESTAMPADD(SECOND, next_probe_at DIV 1000, '1970-01-01 00:00:00'), \
             '%Y-%m-%dT%H:%i:%sZ'))"
        }
    }
}

async fn upsert_rows(
    tx: &mut Tx,
    values: &mut Vec<Value>,
    n: usize,
    upsert: &str,
) -> Result<(), sqlx::Error> {
    let sql = format!(
        "INSERT INTO sync_job_servers (job_id, server_id, server_name, seq, outcome, cause, \
         message, exit_status, duration_ms, finished_at, next_probe_at, counts) VALUES {} {upsert}",
        rows(n, JOB_ROW_COLUMNS)
    );
    tx.execute(&sql, values).await?;
    values.clear();
    Ok(())
}

/// Ends the waiting rows of a server about to be deleted with `CANCELLED`.
pub(super) async fn cancel_waiting(tx: &mut Tx, server_id: ServerId) -> Result<usize, sqlx::Error> {
    let now = db_now(tx).await?;
    let result = RunResult::new(
        Outcome::Cancelled,
        "the server was deleted before it was synced",
    );
    let fills = [Fill {
        server_id,
        served_before: i64::MAX,
        result: &result,
        counts: None,
    }];
    let waiting = waiting_rows(tx, &fills).await?;
    let report = fill(tx, now, &fills, waiting).await?;
    if !report.jobs.is_empty() {
        notify(tx, OUTCOMES_CHANNEL).await?;
    }
    Ok(report.jobs.values().map(Vec::len).sum())
}
