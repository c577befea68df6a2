//! Recording finished runs, many per transaction ("group commit"): the inventory each run read,
//! host keys pinned on first contact, reachability, the run history, and the outcome of every
//! job row the run serves (through `fill`, with each job's stream cursor).
//!
//! Every write is fenced: the batch first locks the lease rows of its servers and drops the
//! items whose lease is no longer `(holder, token)`. A run serves only the job rows created
//! by its claim; rows that arrived during the run keep the server waiting for the next one.
//!
//! Second opinions: a failure that may be the agent's own (`Outcome::may_be_the_agents`) of a
//! run whose agent knows a live peer in its zone is not recorded: the lease goes back with the
//! agent's name (`second_opinion_of`), nothing else is written (no run, no reachability, no
//! outcome), and the next agent to claim the server decides. That agent's outcome is recorded
//! whatever it is, and counts for or against the first agent in the registry (`overruled`,
//! `confirmed`).

use std::collections::{BTreeMap, BTreeSet, HashMap};

use fleetsync_common::sql::{Tx, Value, is_lock_timeout, retry};
use fleetsync_common::{AgentId, JobId, ServerId};

use crate::model::{Cause, HostKey, Outcome, Scopes};

use super::{
    CHUNK, InventoryWrite, OUTCOMES_CHANNEL, RunResult, Store, case, db_now,
    fill::{Fill, fill, waiting_rows},
    for_update, inventory, list, notify,
    queue::{Claim, WaitMark, release_leases},
    reachability::{mark_offline, mark_online},
    rows,
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
    /// The host key to pin on first contact.
    pub pin: Option<HostKey>,
    /// What the run learned about reaching the server.
    pub reach: Reach,
    /// Set when the agent knows a live peer in its zone: a failure that may be the agent's own
    /// is then handed to a peer instead of recorded, and this agent may take the server again
    /// only after this long (ms), should no peer answer.
    pub ask_peer_ms: Option<i64>,
}

/// What became of one completion.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Recorded {
    /// Stored: the final result (with counts and the next probe time) and the jobs it served.
    Stored {
        /// The result as stored.
        result: RunResult,
        /// Jobs that got this outcome.
        jobs: Vec<JobId>,
    },
    /// The lease was lost (expired, perhaps taken by another agent): nothing written; the
    /// server stays waiting.
    LeaseLost,
    /// A failure handed to a peer for a second opinion: nothing recorded; the server waits for
    /// the peer.
    Deferred,
}

/// What the fence found on a lease row that is still ours: who asked for a second opinion on
/// this server (and what they saw), if anyone did.
#[derive(Debug, Clone)]
struct Asked {
    agent: AgentId,
    note: String,
}

impl Store {
    /// Records a batch of finished runs in one transaction (deadlocks and serialisation
    /// failures retried). Items whose lease was lost are skipped. A failure leaves everything
    /// as it was. A lock wait that ran out (another session holds a row the batch writes) is
    /// returned, not retried: the batch held its lease rows meanwhile, so the heartbeat could
    /// not renew them, and the caller renews them before it tries again.
    pub async fn complete(
        &self,
        holder: &AgentId,
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
        holder: &AgentId,
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

    /// The stages of one batch, in one transaction: fence, judge, inventories, host keys,
    /// reachability, run history, job rows and leases, second opinions.
    async fn complete_in(
        &self,
        tx: &mut Tx,
        holder: &AgentId,
        batch: &[Completion],
    ) -> Result<Vec<Recorded>, sqlx::Error> {
        let now = db_now(tx).await?;
        let held = lock_leases(tx, batch).await?;
        let Judged {
            mut results,
            deferred,
            verdicts,
        } = judge_items(batch, &held, holder, now);
        write_inventories(tx, batch, &mut results, now).await?;
        let stored: Vec<(&Completion, &RunResult)> = batch
            .iter()
            .zip(&results)
            .filter_map(|(item, r)| match r {
                Judgement::Store(r) => Some((item, r)),
                _ => None,
            })
            .collect();
        pin_host_keys(tx, &stored, now).await?;
        record_reachability(tx, &stored, now).await?;
        let counts = record_runs(tx, holder, &stored, now).await?;
        let mut jobs = fill_jobs(tx, &stored, counts, now).await?;
        hand_over(tx, holder, &deferred).await?;
        judge(tx, &verdicts).await?;
        Ok(batch
            .iter()
            .zip(results)
            .map(|(item, judgement)| match judgement {
                Judgement::Defer => Recorded::Deferred,
                Judgement::Store(result) => Recorded::Stored {
                    result,
                    jobs: jobs.remove(&item.claim.server_id).unwrap_or_default(),
                },
                Judgement::LeaseLost => Recorded::LeaseLost,
            })
            .collect())
    }
}

fleetsync_common::stored_row! {
    /// A lease row as the fence reads it.
    struct FenceRow {
        server_id: ServerId,
        token: i64,
        holder: Option<AgentId>,
        expires_at: Option<i64>,
        second_opinion_of: Option<AgentId>,
        second_opinion_note: Option<String>,
    }
}

/// What the fence found on a server's lease row: token, holder, expiry, and who asked for a
/// second opinion.
type Held = HashMap<ServerId, (i64, Option<AgentId>, Option<i64>, Option<Asked>)>;

/// Fence: locks the lease rows of the batch's servers, in server order (every completer locks
/// in the same order), and reads them.
async fn lock_leases(tx: &mut Tx, batch: &[Completion]) -> Result<Held, sqlx::Error> {
    let mut sorted: Vec<ServerId> = batch.iter().map(|c| c.claim.server_id).collect();
    sorted.sort_unstable();
    let lock = for_update(tx.backend());
    let sql = format!(
        "SELECT {} FROM server_leases WHERE server_id IN $ids ORDER BY server_id{lock}",
        FenceRow::COLUMNS
    );
    let mut held = HashMap::with_capacity(sorted.len());
    for row in tx.fetch_in(&sql, &[], &sorted).await? {
        let r = FenceRow::try_from(&row)?;
        let asked = r.second_opinion_of.map(|agent| Asked {
            agent,
            note: r.second_opinion_note.unwrap_or_default(),
        });
        held.insert(r.server_id, (r.token, r.holder, r.expires_at, asked));
    }
    Ok(held)
}

/// What becomes of one item of the batch.
#[derive(Debug, Clone)]
enum Judgement {
    /// The lease is no longer ours: nothing written.
    LeaseLost,
    /// Handed to a peer for a second opinion.
    Defer,
    /// Recorded, as this result.
    Store(RunResult),
}

/// The batch judged: each item's fate, the hand-overs, and the verdicts on agents that asked.
struct Judged {
    results: Vec<Judgement>,
    /// (server, may be taken again at, what this agent saw).
    deferred: Vec<(ServerId, i64, String)>,
    /// Per asking agent: (overruled, confirmed).
    verdicts: BTreeMap<AgentId, (i64, i64)>,
}

/// Judges each item against its lease (writes nothing): ours or lost; a first failure that may
/// be the agent's own, with a peer to ask, handed over; a second opinion recorded and counted
/// for or against the agent that asked; the next probe of an offline server.
fn judge_items(batch: &[Completion], held: &Held, holder: &AgentId, now: i64) -> Judged {
    let mut judged = Judged {
        results: Vec::with_capacity(batch.len()),
        deferred: Vec::new(),
        verdicts: BTreeMap::new(),
    };
    for item in batch {
        // Ours: same holder and token, and not expired. An agent that stalled past its lease
        // (a pause, a frozen VM) may have timed out on its own stall: its result is dropped
        // and the server synced again, whether or not another agent took over.
        let Some((_, _, _, asked)) =
            held.get(&item.claim.server_id)
                .filter(|(token, h, expires, _)| {
                    *token == item.claim.token
                        && h.as_ref() == Some(holder)
                        && expires.is_some_and(|e| e >= now)
                })
        else {
            judged.results.push(Judgement::LeaseLost);
            continue;
        };
        let mut result = item.result.clone();
        let agents_fault = result.outcome.may_be_the_agents();
        match (asked, item.ask_peer_ms) {
            // A first failure that may be ours, with a peer to ask: handed over.
            (None, Some(wait_ms)) if agents_fault => {
                let note = truncate_note(&format!("{}: {}", result.outcome, result.message));
                judged
                    .deferred
                    .push((item.claim.server_id, now + wait_ms, note));
                judged.results.push(Judgement::Defer);
                continue;
            }
            // A second opinion: recorded as it is, and it judges the first agent's failure.
            (Some(asked), _) if asked.agent != *holder => {
                let verdict = judged.verdicts.entry(asked.agent.clone()).or_default();
                if agents_fault {
                    verdict.1 += 1;
                    result.message = truncate_note(&format!(
                        "{} (agent {} failed too: {})",
                        result.message, asked.agent, asked.note
                    ));
                } else if result.outcome.reached_the_server() {
                    verdict.0 += 1;
                }
            }
            _ => {}
        }
        if let Reach::Offline { backoff_ms } = item.reach {
            result.next_probe_at = Some(now + backoff_ms);
        }
        judged.results.push(Judgement::Store(result));
    }
    judged
}

/// Inventories of the runs still ours, the whole batch at once; their counts go on the results.
async fn write_inventories(
    tx: &mut Tx,
    batch: &[Completion],
    results: &mut [Judgement],
    now: i64,
) -> Result<(), sqlx::Error> {
    let read: Vec<(usize, (ServerId, &InventoryWrite))> = batch
        .iter()
        .enumerate()
        .filter(|(i, _)| matches!(results[*i], Judgement::Store(_)))
        .filter_map(|(i, item)| Some((i, (item.claim.server_id, item.inventory.as_ref()?))))
        .collect();
    let writes: Vec<(ServerId, &InventoryWrite)> = read.iter().map(|(_, w)| *w).collect();
    let counts = inventory::write_all(tx, &writes, now).await?;
    for ((i, _), counts) in read.iter().zip(counts) {
        if let Judgement::Store(result) = &mut results[*i] {
            result.counts = Some(counts);
        }
    }
    Ok(())
}

/// Host keys pinned on first contact.
async fn pin_host_keys(
    tx: &mut Tx,
    stored: &[(&Completion, &RunResult)],
    now: i64,
) -> Result<(), sqlx::Error> {
    let pins: Vec<(ServerId, &str, &str)> = stored
        .iter()
        .filter_map(|(item, _)| {
            item.pin.as_ref().map(|key| {
                (
                    item.claim.server_id,
                    key.algorithm.as_str(),
                    key.fingerprint.as_str(),
                )
            })
        })
        .collect();
    for chunk in pins.chunks(CHUNK / 2) {
        let mut args: Vec<Value> = Vec::with_capacity(chunk.len() * 5 + 1);
        let algorithm = case(chunk.len());
        for (id, a, _) in chunk {
            args.extend([(*id).into(), (*a).into()]);
        }
        let fingerprint = case(chunk.len());
        for (id, _, f) in chunk {
            args.extend([(*id).into(), (*f).into()]);
        }
        args.push(now.into());
        args.extend(chunk.iter().map(|(id, _, _)| (*id).into()));
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
    Ok(())
}

/// Reachability: servers that answered are online; the others one failure further, with
/// their next probe.
async fn record_reachability(
    tx: &mut Tx,
    stored: &[(&Completion, &RunResult)],
    now: i64,
) -> Result<(), sqlx::Error> {
    let online: Vec<ServerId> = stored
        .iter()
        .filter(|(item, _)| item.reach == Reach::Online)
        .map(|(item, _)| item.claim.server_id)
        .collect();
    mark_online(tx, now, &online).await?;
    let offline: Vec<(ServerId, i64)> = stored
        .iter()
        .filter(|(item, _)| matches!(item.reach, Reach::Offline { .. }))
        .map(|(item, r)| (item.claim.server_id, r.next_probe_at.unwrap_or(now)))
        .collect();
    mark_offline(tx, &offline).await
}

/// The run history, 200 runs per statement (a skip is not a run and is not kept here). Every
/// run reads the whole inventory: its scopes are all of them. Returns each run's inventory
/// counts as stored (JSON).
async fn record_runs(
    tx: &mut Tx,
    holder: &AgentId,
    stored: &[(&Completion, &RunResult)],
    now: i64,
) -> Result<Vec<Option<String>>, sqlx::Error> {
    let scopes = Scopes::ALL.to_string();
    let counts: Vec<Option<String>> = stored
        .iter()
        .map(|(_, r)| {
            r.counts
                .map(|c| serde_json::to_string(&c).expect("counts serialise"))
        })
        .collect();
    const RUN_COLUMNS: usize = 12;
    // A skip is not a run: it stays on its job's row, as the skips made with a job do.
    let ran: Vec<(&(&Completion, &RunResult), &Option<String>)> = stored
        .iter()
        .zip(&counts)
        .filter(|((_, r), _)| r.outcome != Outcome::SkippedOffline)
        .collect();
    for chunk in ran.chunks(200) {
        let mut args: Vec<Value> = Vec::with_capacity(chunk.len() * RUN_COLUMNS);
        for ((item, r), counts) in chunk {
            args.extend([
                item.claim.server_id.into(),
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
                (*counts).clone().into(),
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
    Ok(counts)
}

/// Outcomes for the job rows each run serves (through `fill`), and the leases released;
/// watchers told. Returns the jobs each server's outcome went to.
async fn fill_jobs(
    tx: &mut Tx,
    stored: &[(&Completion, &RunResult)],
    counts: Vec<Option<String>>,
    now: i64,
) -> Result<HashMap<ServerId, Vec<JobId>>, sqlx::Error> {
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
    let ours: Vec<ServerId> = stored
        .iter()
        .map(|(item, _)| item.claim.server_id)
        .collect();
    release_served(tx, &ours, &waiting.still_waiting).await?;
    let report = fill(tx, now, &fills, waiting).await?;
    if !report.jobs.is_empty() {
        notify(tx, OUTCOMES_CHANNEL).await?;
    }
    Ok(report.jobs)
}

/// Most characters of what a first agent saw, kept for the second opinion's message.
const NOTE_MAX: usize = 1000;

fn truncate_note(text: &str) -> String {
    match text.char_indices().nth(NOTE_MAX) {
        Some((at, _)) => format!("{}...", &text[..at]),
        None => text.to_owned(),
    }
}

/// Hands failures over for a second opinion: each lease released with the asking agent's name,
/// the time it may take the server again, and what it saw; the server keeps waiting, and the
/// other agents are woken.
async fn hand_over(
    tx: &mut Tx,
    holder: &AgentId,
    deferred: &[(ServerId, i64, String)],
) -> Result<(), sqlx::Error> {
    if deferred.is_empty() {
        return Ok(());
    }
    for chunk in deferred.chunks(CHUNK / 4) {
        let until = case(chunk.len()).replace("CASE id", "CASE server_id");
        let note = until.clone();
        let mut args: Vec<Value> = vec![holder.into()];
        for (id, at, _) in chunk {
            args.extend([(*id).into(), Value::Int(*at)]);
        }
        for (id, _, text) in chunk {
            args.extend([(*id).into(), text.as_str().into()]);
        }
        args.extend(chunk.iter().map(|(id, _, _)| (*id).into()));
        tx.execute(
            &format!(
                "UPDATE server_leases SET holder = NULL, expires_at = NULL, \
                 second_opinion_of = ?, second_opinion_until = {until}, \
                 second_opinion_note = {note} WHERE server_id IN {}",
                list(chunk.len())
            ),
            &args,
        )
        .await?;
    }
    notify(tx, super::WORK_CHANNEL).await
}

/// Counts second opinions against (overruled) or for (confirmed) the agents that asked, in
/// their registry rows, in id order (two completions never wait on each other in a circle).
async fn judge(tx: &mut Tx, verdicts: &BTreeMap<AgentId, (i64, i64)>) -> Result<(), sqlx::Error> {
    for (agent, (overruled, confirmed)) in verdicts {
        tx.execute(
            "UPDATE sync_agents SET overruled = overruled + ?, confirmed = confirmed + ? \
             WHERE id = ?",
            &[
                (*overruled).into(),
                (*confirmed).into(),
                agent.as_str().into(),
            ],
        )
        .await?;
    }
    Ok(())
}

/// Releases the leases of `ids`; servers with no row left waiting stop waiting.
async fn release_served(
    tx: &mut Tx,
    ids: &[ServerId],
    still_waiting: &BTreeSet<ServerId>,
) -> Result<(), sqlx::Error> {
    let (keep, done): (Vec<ServerId>, Vec<ServerId>) =
        ids.iter().partition(|id| still_waiting.contains(id));
    release_leases(tx, &done, None, WaitMark::Clear).await?;
    release_leases(tx, &keep, None, WaitMark::Keep).await
}
