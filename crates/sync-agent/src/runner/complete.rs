//! The completer: finished runs are recorded in batches (group commit), everything that
//! finished within a short linger in one transaction; a batch the database refuses for good is
//! written item by item, and an item it still refuses becomes `PARSE_FAILED` with the reason.

use fleetsync_common::ServerId;
use std::{
    sync::Arc,
    time::{Duration, Instant},
};

use fleetsync_common::{
    clock::jitter,
    sql::{Failure, classify, is_lock_timeout},
};
use tokio::sync::mpsc;

use super::{COMPLETE_BATCH, COMPLETE_LINGER, Finished, Runner, run::truncate};
use crate::{
    model::Outcome,
    store::{Completion, Recorded, RunResult},
};

impl Runner {
    /// Records finished runs in batches: everything that finished while the previous batch was
    /// being written goes into the next transaction.
    pub(super) async fn complete_forever(
        self: Arc<Self>,
        mut done: mpsc::UnboundedReceiver<Finished>,
    ) {
        while let Some(first) = done.recv().await {
            let mut batch = vec![first];
            // Group commit: what finishes within the linger joins this transaction. Runs of a
            // fleet finish spread out, one every few milliseconds; without it, each would be a
            // transaction of its own (a dozen statements for one server).
            let deadline = tokio::time::Instant::now() + COMPLETE_LINGER;
            while batch.len() < COMPLETE_BATCH {
                match tokio::time::timeout_at(deadline, done.recv()).await {
                    Ok(Some(next)) => batch.push(next),
                    Ok(None) | Err(_) => break,
                }
            }
            self.record(batch).await;
            // The batch's lease slots are free again: the scheduler may claim more.
            self.signals.wake.notify_one();
        }
    }

    /// Writes one batch. Conflicts are retried inside; while the database is unreachable the
    /// batch waits (its leases still renewed); a batch refused for a reason that will not go
    /// away is written item by item, and an item the database refuses is recorded as
    /// `PARSE_FAILED` with the reason instead of being retried forever.
    ///
    /// Another session's lock on a row the batch writes (a panel's long transaction, a DDL)
    /// ends each attempt after the work pool's lock timeout (a quarter of the TTL): the batch's
    /// leases, locked by the attempt and so skipped by the heartbeat, are renewed here before
    /// the next one. After [`record_give_up`] without success the batch is given up: its leases
    /// are released (holder and token) and its servers synced again.
    async fn record(&self, batch: Vec<Finished>) {
        let items: Vec<Completion> = batch.iter().map(|f| f.completion.clone()).collect();
        let mut pause = Duration::from_millis(200);
        let began = Instant::now();
        let give_up = record_give_up(self.config.lease_ttl);
        loop {
            let started = Instant::now();
            let written = self.store.complete(&self.holder, &items).await;
            tracing::debug!(
                runs = items.len(),
                took_ms = started.elapsed().as_millis() as u64,
                "recorded a batch"
            );
            match written {
                Ok(recorded) => {
                    self.report(&items, recorded);
                    return;
                }
                Err(err) if classify(&err) != Failure::Permanent => {
                    if self.abandon.is_cancelled() {
                        tracing::warn!(error = %err, runs = items.len(), "could not record runs before stopping; their servers will be synced again");
                        return;
                    }
                    if began.elapsed() >= give_up {
                        return self.give_up(&items, &err, began.elapsed()).await;
                    }
                    if is_lock_timeout(&err) {
                        tracing::warn!(error = %err, runs = items.len(), "another session holds a lock the batch needs; renewing its leases and trying again");
                        self.renew_batch(&items).await;
                        continue;
                    }
                    tracing::warn!(error = %err, runs = items.len(), "could not record runs; retrying");
                    tokio::time::sleep(jitter(pause, 0.2)).await;
                    pause = (pause * 2).min(Duration::from_secs(5));
                }
                Err(err) => {
                    if items.len() > 1 {
                        tracing::warn!(error = %err, runs = items.len(), "a batch of runs was refused; recording them one by one");
                    }
                    for item in items {
                        self.record_one(item).await;
                    }
                    return;
                }
            }
        }
    }

    /// Renews the leases of a batch whose write must start over (they were locked by it).
    async fn renew_batch(&self, items: &[Completion]) {
        let ids: Vec<ServerId> = items.iter().map(|c| c.claim.server_id).collect();
        let sent = Instant::now();
        let ttl = self.config.lease_ttl.as_millis() as i64;
        match self.store.renew(&self.holder, &ids, ttl).await {
            Ok(renewal) => self.held.renewed(&renewal.renewed, sent),
            Err(err) => tracing::warn!(error = %err, "could not renew the leases of a batch"),
        }
    }

    /// Ends a batch that could not be written within the bound: its servers are synced again.
    async fn give_up(&self, items: &[Completion], err: &sqlx::Error, waited: Duration) {
        tracing::error!(error = %err, runs = items.len(), waited_s = waited.as_secs(), "could not record runs in time; releasing their leases, their servers will be synced again");
        for _ in items {
            self.metrics.discarded();
        }
        let claims: Vec<_> = items.iter().map(|c| c.claim).collect();
        if let Err(err) = self.store.release(&self.holder, &claims).await {
            tracing::warn!(error = %err, "could not release the leases; they expire by themselves");
        }
    }

    /// Writes one run; if the database refuses it for good, writes it once more as
    /// `PARSE_FAILED` with the reason, without its inventory. A run that cannot be written even
    /// so is left to its lease, which expires: the server is synced again.
    async fn record_one(&self, mut item: Completion) {
        let mut degraded = false;
        loop {
            let written = self
                .store
                .complete(&self.holder, std::slice::from_ref(&item))
                .await;
            match written {
                Ok(recorded) => return self.report(std::slice::from_ref(&item), recorded),
                Err(err) if classify(&err) == Failure::Permanent && !degraded => {
                    item = unstorable(item, &err);
                    degraded = true;
                }
                Err(err) => {
                    tracing::error!(error = %err, server_id = item.claim.server_id.get(), degraded, "could not record a run; its lease expires and the server is synced again");
                    return;
                }
            }
        }
    }

    fn report(&self, items: &[Completion], recorded: Vec<Recorded>) {
        let mut any = false;
        for (item, recorded) in items.iter().zip(recorded) {
            let server_id = item.claim.server_id;
            match recorded {
                Recorded::Stored { result, jobs } => {
                    any |= !jobs.is_empty();
                    // A skip is not a run (no attempt, no `sync_runs` row): the job's rows
                    // count it, as they count the skips made with the job.
                    if result.outcome != Outcome::SkippedOffline {
                        self.metrics.synced(result.outcome, result.cause);
                    }
                    tracing::info!(server_id = server_id.get(), outcome = %result.outcome, jobs = jobs.len(), duration_ms = result.duration_ms, "server synced");
                }
                Recorded::LeaseLost => {
                    self.metrics.discarded();
                    tracing::warn!(
                        server_id = server_id.get(),
                        "lease lost during the run: result discarded"
                    )
                }
                Recorded::Deferred => {
                    self.standing.handed_over(server_id);
                    tracing::info!(server_id = server_id.get(), outcome = %item.result.outcome, message = %item.result.message, "failed here; asked a peer of the zone for a second opinion");
                }
            }
        }
        if any {
            self.signals.bump();
        }
    }
}

/// How long the completer keeps trying to write one batch before it gives it up: ten lease
/// TTLs, at least two minutes. Long enough for a database restart or a long lock; short enough
/// that a batch stuck for good does not hold its servers forever.
pub(super) fn record_give_up(lease_ttl: Duration) -> Duration {
    (lease_ttl * 10).max(Duration::from_secs(120))
}

/// A run whose results the database refused for good: `PARSE_FAILED` with the reason, without
/// the inventory (the server did answer: reachability and the host key pin still count).
fn unstorable(mut item: Completion, err: &sqlx::Error) -> Completion {
    item.result = RunResult {
        duration_ms: item.result.duration_ms,
        ..RunResult::new(
            Outcome::ParseFailed,
            truncate(
                &format!("what the server reported cannot be stored: {err}"),
                1000,
            ),
        )
    };
    item.inventory = None;
    item
}
