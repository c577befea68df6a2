//! Recording finished runs, many per transaction ("group commit"): the inventory each run read,
//! host keys pinned on first contact, reachability, the run history, and the outcome of every
//! job row the run serves, with each job's stream cursor.
//!
//! Every write is fenced: the batch first locks the lease rows of its servers and drops the
//! items whose lease is no longer `(holder, token)`. A run serves only the job rows created
//! by its claim; rows that arrived during the run keep the server waiting for the next one.
//! Sequence numbers are given per job and per batch under the job row's lock, taken last and in
//! job-id order, so cursors commit in order without holding agents on one job for long.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use fleetsync_common::{
    Backend,
    sql::{Tx, Value, is_lock_timeout, retry},
};

use crate::model::{Cause, JobState, Outcome, Reachability, Scopes};

use super::{
    CHUNK, InventoryWrite, OUTCOMES_CHANNEL, OutcomeCounts, RunResult, Store, for_update,
    inventory, list, notify,
    queue::{Claim, WaitMark, db_now, release_leases},
    reachability::mark_online,
};

/// What a run learned about reaching its server.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reach {
    /// Not tried (skipped, no database service): reachability unchanged.
    Untried,
    /// The server answered.
    Online,
    /// The server did not answer; try again after this long (ms, from the write).
    Offline {
        /// Backoff before the next probe.
        backoff_ms: i64,
    },
}

/// One finished run, to record.
#[derive(Debug, Clone)]
pub struct Completion {
    /// The lease the run held.
    pub claim: Claim,
    /// Its result.
    pub result: RunResult,
    /// The inventory it read (OK only).
    pub inventory: Option<InventoryWrite>,
    /// The host key to pin on first contact: (algorithm, fingerprint).
    pub pin: Option<(String, String)>,
    /// What the run learned about reaching the server.
    pub reach: Reach,
}

/// What became of one completion.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Recorded {
    /// Stored: the final result (with counts and the next probe time) and the jobs it served.
    Stored {
        /// The result as stored.
        result: RunResult,
        /// Jobs that got this outcome.
        jobs: Vec<String>,
    },
    /// The lease was lost (expired, perhaps taken by another agent): nothing written; the
    /// server stays waiting.
    LeaseLost,
}

/// One server's outcome to give to the job rows waiting for it.
pub(super) struct Fill<'a> {
    pub server_id: i64,
    /// Only rows of jobs created up to this time (ms, database clock) are served.
    pub served_before: i64,
    pub result: &'a RunResult,
    pub counts: Option<String>,
}

/// Which jobs each server served.
#[derive(Debug, Default)]
pub(super) struct FillReport {
    pub jobs: HashMap<i64, Vec<String>>,
}

impl Store {
    /// Records a batch of finished runs in one transaction (deadlocks and serialisation
    /// failures retried). Items whose lease was lost are skipped. A failure leaves everything
    /// as it was. A lock wait that ran out (another session holds a row the batch writes) is
    /// returned, not retried: the batch held its lease rows meanwhile, so the heartbeat could
    /// not renew them, and the caller renews them before it tries again.
    pub async fn complete(
        &self,
        holder: &str,
        batch: &[Completion],
    ) -> Result<Vec<Recorded>, sqlx::Error> {
        retry("record runs", || async {
            match self.complete_once(holder, batch).await {
                Err(err) if is_lock_timeout(&err) => Ok(Err(err)),
                other => other.map(Ok),
            }
        })
        .await?
    }

    async fn complete_once(
        &self,
        holder: &str,
        batch: &[Completion],
    ) -> Result<Vec<Recorded>, sqlx::Error> {
        let mut tx = self.db.begin().await?;
        match self.complete_in(&mut tx, holder, batch).await {
            Ok(recorded) => {
                tx.commit().await?;
                Ok(recorded)
            }
            Err(err) => {
                // At once: the lease rows it locked must be free for the renewal that comes
                // before the next attempt (MySQL ends only the statement on a lock timeout).
                if let Err(rollback) = tx.rollback().await {
                    tracing::debug!(error = %rollback, "rollback after a failed batch");
                }
                Err(err)
            }
        }
    }

    async fn complete_in(
        &self,
        tx: &mut Tx,
        holder: &str,
        batch: &[Completion],
    ) -> Result<Vec<Recorded>, sqlx::Error> {
        let backend = self.backend();
        let now = db_now(tx).await?;

        // Fence: lock the leases, keep the items still ours.
        let ids: Vec<i64> = batch.iter().map(|c| c.claim.server_id).collect();
        let lock = for_update(backend);
        let mut held = HashMap::with_capacity(ids.len());
        let mut sorted = ids.clone();
        sorted.sort_unstable();
        for chunk in sorted.chunks(CHUNK) {
            let sql = format!(
                "SELECT server_id, token, holder, expires_at FROM server_leases \
                 WHERE server_id IN {} ORDER BY server_id{lock}",
                list(chunk.len())
            );
            let args: Vec<Value> = chunk.iter().map(|&id| Value::Int(id)).collect();
            for row in tx.fetch(&sql, &args).await? {
                held.insert(
                    row.int(0)?,
                    (row.int(1)?, row.opt_text(2)?, row.opt_int(3)?),
                );
            }
        }
        let mut results: Vec<Option<RunResult>> = vec![None; batch.len()];
        for (i, item) in batch.iter().enumerate() {
            // Ours: same holder and token, and not expired. An agent that stalled past its
            // lease (a pause, a frozen VM) may have timed out on its own stall: its result is
            // dropped and the server synced again, whether or not another agent took over.
            let ours = held
                .get(&item.claim.server_id)
                .is_some_and(|(token, h, expires)| {
                    *token == item.claim.token
                        && h.as_deref() == Some(holder)
                        && expires.is_some_and(|e| e >= now)
                });
            if !ours {
                continue;
            }
            let mut result = item.result.clone();
            if let Reach::Offline { backoff_ms } = item.reach {
                result.next_probe_at = Some(now + backoff_ms);
            }
            results[i] = Some(result);
        }
        // Inventories of the runs still ours, the whole batch at once.
        let read: Vec<(usize, (i64, &InventoryWrite))> = batch
            .iter()
            .enumerate()
            .filter(|(i, _)| results[*i].is_some())
            .filter_map(|(i, item)| Some((i, (item.claim.server_id, item.inventory.as_ref()?))))
            .collect();
        let writes: Vec<(i64, &InventoryWrite)> = read.iter().map(|(_, w)| *w).collect();
        let counts = inventory::write_all(tx, &writes, now).await?;
        for ((i, _), counts) in read.iter().zip(counts) {
            if let Some(result) = results[*i].as_mut() {
                result.counts = Some(counts);
            }
        }
        let stored: Vec<(&Completion, &RunResult)> = batch
            .iter()
            .zip(&results)
            .filter_map(|(item, r)| r.as_ref().map(|r| (item, r)))
            .collect();

        // Host keys pinned on first contact.
        let pins: Vec<(i64, &str, &str)> = stored
            .iter()
            .filter_map(|(item, _)| {
                item.pin
                    .as_ref()
                    .map(|(a, f)| (item.claim.server_id, a.as_str(), f.as_str()))
            })
            .collect();
        for chunk in pins.chunks(CHUNK / 2) {
            let mut args: Vec<Value> = Vec::with_capacity(chunk.len() * 5 + 1);
            let algorithm = case(chunk.len());
            for (id, a, _) in chunk {
                args.extend([Value::Int(*id), (*a).into()]);
            }
            let fingerprint = case(chunk.len());
            for (id, _, f) in chunk {
                args.extend([Value::Int(*id), (*f).into()]);
            }
            args.push(now.into());
            args.extend(chunk.iter().map(|(id, _, _)| Value::Int(*id)));
            tx.execute(
                &format!(
                    "UPDATE servers SET host_key_algorithm = {algorithm}, \
                     host_key_fingerprint = {fingerprint}, host_key_pinned_at = ? \
                     WHERE host_key_fingerprint IS NULL AND id IN {}",
                    list(chunk.len())
                ),
                &args,
            )
            .await?;
        }

        // Reachability.
        let online: Vec<i64> = stored
            .iter()
            .filter(|(item, _)| item.reach == Reach::Online)
            .map(|(item, _)| item.claim.server_id)
            .collect();
        mark_online(tx, now, &online).await?;
        let offline: Vec<(i64, i64)> = stored
            .iter()
            .filter(|(item, _)| matches!(item.reach, Reach::Offline { .. }))
            .map(|(item, r)| (item.claim.server_id, r.next_probe_at.unwrap_or(now)))
            .collect();
        for chunk in offline.chunks(CHUNK / 2) {
            let next = case(chunk.len());
            let mut args: Vec<Value> = vec![Reachability::Offline.as_str().into()];
            for (id, at) in chunk {
                args.extend([Value::Int(*id), Value::Int(*at)]);
            }
            args.extend(chunk.iter().map(|(id, _)| Value::Int(*id)));
            tx.execute(
                &format!(
                    "UPDATE servers SET reachability = ?, \
                     consecutive_failures = consecutive_failures + 1, next_probe_at = {next} \
                     WHERE id IN {}",
                    list(chunk.len())
                ),
                &args,
            )
            .await?;
        }

        // Run history. Every run reads the whole inventory: its scopes are all of them.
        let scopes = Scopes::ALL.to_string();
        let counts: Vec<Option<String>> = stored
            .iter()
            .map(|(_, r)| {
                r.counts
                    .map(|c| serde_json::to_string(&c).expect("counts serialise"))
            })
            .collect();
        const RUN_COLUMNS: usize = 12;
        for (chunk, chunk_counts) in stored.chunks(200).zip(counts.chunks(200)) {
            let mut args: Vec<Value> = Vec::with_capacity(chunk.len() * RUN_COLUMNS);
            for ((item, r), counts) in chunk.iter().zip(chunk_counts) {
                args.extend([
                    Value::Int(item.claim.server_id),
                    Value::Int(item.claim.token),
                    holder.into(),
                    scopes.as_str().into(),
                    Value::Int(now - r.duration_ms),
                    Value::Int(now),
                    r.outcome.as_str().into(),
                    r.cause.map(Cause::as_str).into(),
                    r.message.as_str().into(),
                    r.exit_status.into(),
                    Value::Int(r.duration_ms),
                    counts.clone().into(),
                ]);
            }
            tx.execute(
                &format!(
                    "INSERT INTO sync_runs (server_id, lease_token, holder, scopes, started_at, \
                     finished_at, outcome, cause, message, exit_status, duration_ms, counts) \
                     VALUES {}",
                    rows(chunk.len(), RUN_COLUMNS)
                ),
                &args,
            )
            .await?;
        }

        // Outcomes for the job rows each run serves; leases released.
        let fills: Vec<Fill<'_>> = stored
            .iter()
            .zip(counts)
            .map(|((item, r), counts)| Fill {
                server_id: item.claim.server_id,
                served_before: item.claim.claimed_at,
                result: r,
                counts,
            })
            .collect();
        let waiting = waiting_rows(tx, &fills).await?;
        let ours: Vec<i64> = stored
            .iter()
            .map(|(item, _)| item.claim.server_id)
            .collect();
        release_served(tx, &ours, &waiting.still_waiting).await?;
        let mut report = fill(tx, now, &fills, waiting).await?;
        if !report.jobs.is_empty() {
            notify(tx, OUTCOMES_CHANNEL).await?;
        }
        Ok(batch
            .iter()
            .zip(results)
            .map(|(item, result)| match result {
                Some(result) => Recorded::Stored {
                    result,
                    jobs: report
                        .jobs
                        .remove(&item.claim.server_id)
                        .unwrap_or_default(),
                },
                None => Recorded::LeaseLost,
            })
            .collect())
    }
}

/// `CASE id WHEN ? THEN ? ... END` with `n` branches.
fn case(n: usize) -> String {
    let mut s = String::with_capacity(n * 16 + 16);
    s.push_str("CASE id");
    for _ in 0..n {
        s.push_str(" WHEN ? THEN ?");
    }
    s.push_str(" END");
    s
}

/// `(?, ?), (?, ?)`: `n` rows of `columns` placeholders.
fn rows(n: usize, columns: usize) -> String {
    let row = list(columns);
    let mut s = String::with_capacity(n * (row.len() + 2));
    for i in 0..n {
        if i > 0 {
            s.push_str(", ");
        }
        s.push_str(&row);
    }
    s
}

/// The job rows waiting for these servers, split into those each run serves (by job) and the
/// servers that keep rows waiting for a later run.
pub(super) struct Waiting {
    /// job id -> (server id, server name), ascending server id.
    served: BTreeMap<String, Vec<(i64, String)>>,
    still_waiting: BTreeSet<i64>,
}

pub(super) async fn waiting_rows(tx: &mut Tx, fills: &[Fill<'_>]) -> Result<Waiting, sqlx::Error> {
    let before: HashMap<i64, i64> = fills
        .iter()
        .map(|f| (f.server_id, f.served_before))
        .collect();
    let ids: Vec<i64> = fills.iter().map(|f| f.server_id).collect();
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
    let hint = match tx.backend() {
        Backend::MySql => " FORCE INDEX (sync_job_servers_waiting)",
        _ => "",
    };
    let mut rows: Vec<(String, i64, String)> = Vec::new();
    for chunk in ids.chunks(CHUNK) {
        let sql = format!(
            "SELECT job_id, server_id, server_name FROM sync_job_servers{hint} \
             WHERE outcome IS NULL AND server_id IN {}",
            list(chunk.len())
        );
        let args: Vec<Value> = chunk.iter().map(|&id| Value::Int(id)).collect();
        for row in tx.fetch(&sql, &args).await? {
            rows.push((row.text(0)?, row.int(1)?, row.text(2)?));
        }
    }
    let jobs: Vec<&str> = rows
        .iter()
        .map(|(job, _, _)| job.as_str())
        .collect::<BTreeSet<_>>()
        .into_iter()
        .collect();
    let mut created_at: HashMap<String, i64> = HashMap::with_capacity(jobs.len());
    for chunk in jobs.chunks(CHUNK) {
        let sql = format!(
            "SELECT id, created_at FROM sync_jobs WHERE id IN {}",
            list(chunk.len())
        );
        let args: Vec<Value> = chunk.iter().map(|&id| Value::from(id)).collect();
        for row in tx.fetch(&sql, &args).await? {
            created_at.insert(row.text(0)?, row.int(1)?);
        }
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

/// Releases the leases of `ids`; servers with no row left waiting stop waiting.
async fn release_served(
    tx: &mut Tx,
    ids: &[i64],
    still_waiting: &BTreeSet<i64>,
) -> Result<(), sqlx::Error> {
    let (keep, done): (Vec<i64>, Vec<i64>) = ids.iter().partition(|id| still_waiting.contains(id));
    release_leases(tx, &done, None, WaitMark::Clear).await?;
    release_leases(tx, &keep, None, WaitMark::Keep).await
}

/// Gives the served rows their outcome and their job's next sequence numbers; marks jobs done
/// when their last server finishes. The one writer of a job's outcomes: completions,
/// `DeleteServer` and retention's orphan clean-up all fill through here.
///
/// One filler per row: for each job, in job-id order, the job's row is locked first, then its
/// rows among the candidates that are still waiting are read (and locked) again under that lock.
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
    let by_server: HashMap<i64, &Fill<'_>> = fills.iter().map(|f| (f.server_id, f)).collect();
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
        let (finished, total) = (job.int(0)?, job.int(1)?);
        let mut counts = match job.opt_text(2)? {
            Some(text) => OutcomeCounts::decode(&text)?,
            // A job made before the counts were kept: counted once, here, under its lock.
            None => count_rows(tx, job_id).await?,
        };
        // Then, under that lock, which candidates still wait: a filler that went first has
        // filled the others.
        let still = still_waiting(tx, job_id, candidates).await?;
        let servers: Vec<&(i64, String)> = candidates
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
        let finished_at = if done { Some(now) } else { job.opt_int(3)? };
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
        let mut seq = finished;
        for (server_id, name) in servers {
            seq += 1;
            let f = by_server[server_id];
            values.extend([
                job_id.as_str().into(),
                Value::Int(*server_id),
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
            if pending_rows == 200 {
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

/// Which of `candidates` still wait in this job, read (and locked) under the job row's lock.
async fn still_waiting(
    tx: &mut Tx,
    job_id: &str,
    candidates: &[(i64, String)],
) -> Result<BTreeSet<i64>, sqlx::Error> {
    let lock = for_update(tx.backend());
    let mut still = BTreeSet::new();
    for chunk in candidates.chunks(CHUNK) {
        let sql = format!(
            "SELECT server_id FROM sync_job_servers WHERE job_id = ? AND outcome IS NULL \
             AND server_id IN {} ORDER BY server_id{lock}",
            list(chunk.len())
        );
        let mut args: Vec<Value> = vec![job_id.into()];
        args.extend(chunk.iter().map(|(id, _)| Value::Int(*id)));
        for row in tx.fetch(&sql, &args).await? {
            still.insert(row.int(0)?);
        }
    }
    Ok(still)
}

/// A job's outcome counts from its rows (a job made before the counts were kept).
async fn count_rows(tx: &mut Tx, job_id: &str) -> Result<OutcomeCounts, sqlx::Error> {
    let mut counts = OutcomeCounts::default();
    for row in tx
        .fetch(
            "SELECT outcome, COUNT(*) FROM sync_job_servers WHERE job_id = ? \
             AND outcome IS NOT NULL GROUP BY outcome",
            &[job_id.into()],
        )
        .await?
    {
        counts.add(Outcome::parse(&row.text(0)?)?, row.int(1)?);
    }
    Ok(counts)
}

/// Columns of one `sync_job_servers` row as [`fill`] writes it.
const JOB_ROW_COLUMNS: usize = 12;

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
pub(super) async fn cancel_waiting(tx: &mut Tx, server_id: i64) -> Result<usize, sqlx::Error> {
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
