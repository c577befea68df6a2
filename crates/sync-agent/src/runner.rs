//! The scheduler: claims waiting servers in batches, runs one SSH sync per server (bounded
//! concurrency, no database access during the run), and records finished runs in batches
//! (group commit), one outcome serving every job that waited for that server since before the
//! claim. One heartbeat renews every lease the agent holds. Also drains the outbox of sync
//! requests recorded by migrations, probes offline servers in parallel, starts the periodic
//! sync and prunes old history.

use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use fleetsync_common::{
    clock::jitter,
    proto::sync::v1::{Outcome, UnreachableCause},
    sql::{Failure, classify},
};
use tokio::sync::{Notify, OwnedSemaphorePermit, Semaphore, mpsc, watch};
use tokio_util::sync::CancellationToken;

use prometheus_client::metrics::gauge::Gauge;

use crate::{
    inventory,
    metrics::Metrics,
    ssh::{HostKeyInfo, SshClient, SshError, Target},
    store::{
        Claim, ClaimedServer, Completion, InventoryWrite, JobOrigin, NewJob, Pruned, Reach,
        Recorded, RunResult, Selection, ServerRecord, Store,
    },
};

/// Scheduler settings.
#[derive(Debug, Clone)]
pub struct RunnerConfig {
    /// Servers synced at once (SSH sessions in flight).
    pub concurrency: usize,
    /// Lease length; renewed while a run lasts.
    pub lease_ttl: Duration,
    /// How often the database is polled for work (work made here wakes the scheduler at once).
    pub poll_interval: Duration,
    /// How often the outbox of migration sync requests is drained.
    pub outbox_interval: Duration,
    /// Backoff after the first failed connection to a server; doubles with each failure.
    pub backoff_base: Duration,
    /// Longest backoff.
    pub backoff_max: Duration,
    /// How often offline servers whose backoff ended are probed (TCP connect and banner).
    pub probe_interval: Duration,
    /// Every server is synced this often (`None`: only on request).
    pub sync_interval: Option<Duration>,
    /// Finished jobs and runs are deleted this long after they finished.
    pub retention: Duration,
}

impl Default for RunnerConfig {
    fn default() -> Self {
        Self {
            concurrency: 64,
            lease_ttl: Duration::from_secs(60),
            poll_interval: Duration::from_millis(200),
            outbox_interval: Duration::from_secs(10),
            backoff_base: Duration::from_secs(5),
            backoff_max: Duration::from_secs(600),
            probe_interval: Duration::from_secs(5),
            sync_interval: Some(Duration::from_secs(3600)),
            retention: Duration::from_secs(7 * 24 * 3600),
        }
    }
}

/// Most servers claimed in one transaction.
const CLAIM_BATCH: usize = 256;
/// Fewest runs in flight (dialing, waiting for a slot, or in a slot) whatever `concurrency`
/// is: dialing (TCP connect and banner) costs waiting, not CPU, so servers that do not answer
/// wait out their timeouts side by side with the healthy work instead of taking its slots.
const MIN_IN_FLIGHT: usize = 256;
/// Most runs in flight: each holds a socket and a lease.
const MAX_IN_FLIGHT: usize = 1024;
/// Most runs recorded in one transaction.
const COMPLETE_BATCH: usize = 256;
/// How long the completer waits for more finished runs before it writes a batch: an outcome
/// is recorded at most this much later, in exchange for far fewer transactions.
const COMPLETE_LINGER: Duration = Duration::from_millis(50);
/// How often finished jobs and runs past the retention are pruned.
const RETENTION_INTERVAL: Duration = Duration::from_secs(60);

/// Handles shared by the scheduler and the services.
#[derive(Debug, Clone)]
pub struct Signals {
    /// Wakes the scheduler (new work).
    pub wake: Arc<Notify>,
    /// Bumped after every batch of recorded outcomes; watchers wait on it.
    pub changed: watch::Sender<u64>,
}

impl Default for Signals {
    fn default() -> Self {
        Self {
            wake: Arc::new(Notify::new()),
            changed: watch::channel(0).0,
        }
    }
}

impl Signals {
    fn bump(&self) {
        self.changed.send_modify(|n| *n = n.wrapping_add(1));
    }
}

/// The leases this agent holds for runs in flight or waiting to be recorded: the heartbeat
/// renews exactly these. A lease leaves the set when its guard drops, whatever ends the run
/// (recorded, released, or a panic), so no lease is renewed past the run that holds it.
#[derive(Debug, Default)]
struct HeldLeases {
    leases: Mutex<HashMap<i64, i64>>,
    /// `fleetsync_leases_held`.
    gauge: Gauge,
}

impl HeldLeases {
    fn hold(self: &Arc<Self>, claim: Claim) -> LeaseGuard {
        let mut leases = self.leases.lock().expect("lease set");
        leases.insert(claim.server_id, claim.token);
        self.gauge.set(leases.len() as i64);
        drop(leases);
        LeaseGuard {
            leases: Arc::clone(self),
            claim,
        }
    }

    fn server_ids(&self) -> Vec<i64> {
        self.leases
            .lock()
            .expect("lease set")
            .keys()
            .copied()
            .collect()
    }
}

/// Holds one lease in [`HeldLeases`] until dropped.
#[derive(Debug)]
struct LeaseGuard {
    leases: Arc<HeldLeases>,
    claim: Claim,
}

impl Drop for LeaseGuard {
    fn drop(&mut self) {
        let mut held = self.leases.leases.lock().expect("lease set");
        if held.get(&self.claim.server_id) == Some(&self.claim.token) {
            held.remove(&self.claim.server_id);
            self.leases.gauge.set(held.len() as i64);
        }
    }
}

/// What bounds the runs of one agent.
#[derive(Debug)]
struct Slots {
    /// Runs in flight, from the claim to the run's end (dialing included).
    flight: Arc<Semaphore>,
    /// Runs past dialing: key exchange, authentication and the command, the part that costs
    /// CPU here and on the server (`--concurrency`).
    busy: Arc<Semaphore>,
    /// Leases held: runs in flight plus finished runs waiting to be recorded.
    leases: Arc<Semaphore>,
}

impl Slots {
    fn new(concurrency: usize) -> Self {
        let flight = (concurrency * 4)
            .clamp(MIN_IN_FLIGHT, MAX_IN_FLIGHT)
            .max(concurrency);
        Self {
            flight: Arc::new(Semaphore::new(flight)),
            busy: Arc::new(Semaphore::new(concurrency)),
            leases: Arc::new(Semaphore::new(flight + concurrency.max(COMPLETE_BATCH))),
        }
    }
}

/// A finished run on its way to the database, with the lease it holds and its slot.
#[derive(Debug)]
struct Finished {
    completion: Completion,
    _guard: LeaseGuard,
    _slot: OwnedSemaphorePermit,
}

/// The scheduler of one agent.
#[derive(Debug, Clone)]
pub struct Runner {
    store: Store,
    ssh: SshClient,
    holder: String,
    config: RunnerConfig,
    signals: Signals,
    shutdown: CancellationToken,
    held: Arc<HeldLeases>,
    metrics: Arc<Metrics>,
}

impl Runner {
    /// A scheduler; `holder` names this agent in leases.
    pub fn new(
        store: Store,
        ssh: SshClient,
        holder: String,
        config: RunnerConfig,
        signals: Signals,
        shutdown: CancellationToken,
        metrics: Arc<Metrics>,
    ) -> Self {
        Self {
            store,
            ssh,
            holder,
            config,
            signals,
            shutdown,
            held: Arc::new(HeldLeases {
                leases: Mutex::default(),
                gauge: metrics.leases_held().clone(),
            }),
            metrics,
        }
    }

    /// Runs until shutdown; runs in flight are stopped and their servers left for the next
    /// agent (their leases released, their job rows still waiting). Runs already finished are
    /// recorded first.
    pub async fn run(self) {
        let this = Arc::new(self);
        let background = [
            tokio::spawn(Arc::clone(&this).drain_outbox_forever()),
            tokio::spawn(Arc::clone(&this).probe_offline_forever()),
            tokio::spawn(Arc::clone(&this).schedule_forever()),
            tokio::spawn(Arc::clone(&this).listen_forever()),
            tokio::spawn(Arc::clone(&this).heartbeat_forever()),
            tokio::spawn(Arc::clone(&this).prune_forever()),
        ];
        let (done_tx, done_rx) = mpsc::unbounded_channel();
        let completer = tokio::spawn(Arc::clone(&this).complete_forever(done_rx));
        let slots = Slots::new(this.config.concurrency);
        let mut runs = tokio::task::JoinSet::new();
        loop {
            let claimed = match this.fill(&slots, &done_tx, &mut runs).await {
                Ok(claimed) => claimed,
                Err(err) => {
                    tracing::warn!(error = %err, "scheduler could not claim work; retrying");
                    0
                }
            };
            while let Some(joined) = runs.try_join_next() {
                if let Err(err) = joined
                    && err.is_panic()
                {
                    tracing::error!(error = %err, "a run panicked; its lease expires by itself");
                }
            }
            if claimed > 0 && slots.flight.available_permits() > 0 {
                // A full batch: there may be more work right away.
                continue;
            }
            // Expired leases of a dead agent announce nothing: look at least twice per TTL.
            let nap = this.config.poll_interval.min(this.config.lease_ttl / 2);
            tokio::select! {
                () = this.shutdown.cancelled() => break,
                () = this.signals.wake.notified() => {
                    // Let a few more runs finish, so that claims come in batches.
                    tokio::time::sleep(Duration::from_millis(2)).await;
                }
                () = tokio::time::sleep(nap) => {}
            }
        }
        // Runs watch the same token; wait for them to release their leases or hand their
        // results over, then for the completer to record what finished.
        while runs.join_next().await.is_some() {}
        drop(done_tx);
        let _ = completer.await;
        for task in background {
            let _ = task.await;
        }
    }

    /// Claims as many waiting servers as there are free slots and starts their runs. Returns
    /// how many it claimed.
    async fn fill(
        self: &Arc<Self>,
        slots: &Slots,
        done: &mpsc::UnboundedSender<Finished>,
        runs: &mut tokio::task::JoinSet<()>,
    ) -> Result<usize, sqlx::Error> {
        let free = slots
            .flight
            .available_permits()
            .min(slots.leases.available_permits())
            .min(CLAIM_BATCH);
        if free == 0 {
            return Ok(0);
        }
        let ttl = self.config.lease_ttl.as_millis() as i64;
        let started = Instant::now();
        let claimed = self.store.claim(&self.holder, ttl, free).await?;
        let n = claimed.len();
        tracing::debug!(
            asked = free,
            claimed = n,
            took_ms = started.elapsed().as_millis() as u64,
            "claimed"
        );
        for work in claimed {
            let guard = self.held.hold(work.claim);
            let (Ok(flight), Ok(slot)) = (
                Arc::clone(&slots.flight).try_acquire_owned(),
                Arc::clone(&slots.leases).try_acquire_owned(),
            ) else {
                unreachable!("claims never exceed the free slots");
            };
            let this = Arc::clone(self);
            let done = done.clone();
            let busy = Arc::clone(&slots.busy);
            self.metrics.runs_in_flight().inc();
            runs.spawn(async move {
                use tracing::Instrument;
                let span = tracing::info_span!("sync", server_id = work.claim.server_id, token = work.claim.token);
                let completion = tokio::select! {
                    () = this.shutdown.cancelled() => None,
                    completion = this.sync_server(&work, &busy).instrument(span) => Some(completion),
                };
                drop(flight);
                this.metrics.runs_in_flight().dec();
                this.signals.wake.notify_one();
                match completion {
                    Some(completion) => {
                        let _ = done.send(Finished {
                            completion,
                            _guard: guard,
                            _slot: slot,
                        });
                    }
                    None => {
                        // Shutting down: leave the server to whoever runs next.
                        if let Err(err) = this.store.release(&this.holder, &[work.claim]).await {
                            tracing::warn!(error = %err, "could not release a lease; it expires by itself");
                        }
                    }
                }
            });
        }
        Ok(n)
    }

    /// Records finished runs in batches: everything that finished while the previous batch was
    /// being written goes into the next transaction.
    async fn complete_forever(self: Arc<Self>, mut done: mpsc::UnboundedReceiver<Finished>) {
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
    async fn record(&self, batch: Vec<Finished>) {
        let items: Vec<Completion> = batch.iter().map(|f| f.completion.clone()).collect();
        let mut pause = Duration::from_millis(200);
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
                    if self.shutdown.is_cancelled() {
                        tracing::warn!(error = %err, runs = items.len(), "could not record runs before stopping; their servers will be synced again");
                        return;
                    }
                    tracing::warn!(error = %err, runs = items.len(), "could not record runs; retrying");
                    tokio::time::sleep(jitter(pause, 0.2)).await;
                    pause = (pause * 2).min(Duration::from_secs(5));
                }
                Err(err) if items.len() > 1 => {
                    tracing::warn!(error = %err, runs = items.len(), "a batch of runs was refused; recording them one by one");
                    for item in &items {
                        self.record_one(item.clone()).await;
                    }
                    return;
                }
                Err(err) => {
                    let item = items.into_iter().next().expect("one item");
                    self.record_degraded(unstorable(item, &err)).await;
                    return;
                }
            }
        }
    }

    async fn record_one(&self, item: Completion) {
        match self
            .store
            .complete(&self.holder, std::slice::from_ref(&item))
            .await
        {
            Ok(recorded) => self.report(std::slice::from_ref(&item), recorded),
            Err(err) if classify(&err) == Failure::Permanent => {
                self.record_degraded(unstorable(item, &err)).await;
            }
            Err(err) => {
                tracing::warn!(error = %err, server_id = item.claim.server_id, "could not record a run; its lease expires and the server is synced again");
            }
        }
    }

    async fn record_degraded(&self, item: Completion) {
        match self
            .store
            .complete(&self.holder, std::slice::from_ref(&item))
            .await
        {
            Ok(recorded) => self.report(std::slice::from_ref(&item), recorded),
            Err(err) => {
                tracing::error!(error = %err, server_id = item.claim.server_id, "could not record a run even without its inventory; its lease expires");
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
                    self.metrics
                        .synced(&result.outcome, result.cause.as_deref());
                    tracing::info!(server_id, outcome = %result.outcome, jobs = jobs.len(), duration_ms = result.duration_ms, "server synced");
                }
                Recorded::LeaseLost => {
                    self.metrics.discarded();
                    tracing::warn!(server_id, "lease lost during the run: result discarded")
                }
            }
        }
        if any {
            self.signals.bump();
        }
    }

    /// Renews every lease this agent holds, a third of the TTL apart, in one statement.
    async fn heartbeat_forever(self: Arc<Self>) {
        let ttl = self.config.lease_ttl;
        loop {
            tokio::select! {
                () = self.shutdown.cancelled() => return,
                () = tokio::time::sleep(ttl / 3) => {}
            }
            let ids = self.held.server_ids();
            if ids.is_empty() {
                continue;
            }
            match self
                .store
                .renew(&self.holder, &ids, ttl.as_millis() as i64)
                .await
            {
                Ok(n) if (n as usize) < ids.len() => {
                    tracing::warn!(held = ids.len(), renewed = n, "some leases were lost");
                }
                Ok(_) => {}
                Err(err) => tracing::warn!(error = %err, "lease heartbeat failed"),
            }
        }
    }

    /// Deletes finished jobs and runs past the retention, every minute.
    async fn prune_forever(self: Arc<Self>) {
        loop {
            let cutoff = crate::now_ms() - self.config.retention.as_millis() as i64;
            match self.store.prune(cutoff, 20).await {
                Ok(pruned) if pruned != Pruned::default() => {
                    tracing::info!(
                        jobs = pruned.jobs,
                        runs = pruned.runs,
                        orphans = pruned.orphans,
                        "pruned history past the retention"
                    );
                    if pruned.orphans > 0 {
                        self.signals.bump();
                    }
                }
                Ok(_) => {}
                Err(err) => tracing::warn!(error = %err, "could not prune history; retrying"),
            }
            tokio::select! {
                () = self.shutdown.cancelled() => return,
                () = tokio::time::sleep(RETENTION_INTERVAL) => {}
            }
        }
    }

    /// One server: skip it, or connect, read its inventory and parse it. No database access:
    /// everything it needs came with the claim.
    async fn sync_server(&self, work: &ClaimedServer, busy: &Semaphore) -> Completion {
        let started = Instant::now();
        let server = &work.server;
        let done = |result: RunResult, reach: Reach| Completion {
            claim: work.claim,
            result: finish(result, started),
            inventory: None,
            pin: None,
            reach,
        };
        let Some(service) = server.database_service else {
            let result = failure(
                Outcome::SkippedNoDatabaseService,
                None,
                "no database service registered".into(),
            );
            return done(result, Reach::Untried);
        };
        // Backoff is judged by the database's clock (the claim time), as it was written.
        if let Some(until) = server.next_probe_at
            && server.reachability == "offline"
            && until > work.claim.claimed_at
            && !work.forced
        {
            let mut result = failure(
                Outcome::SkippedOffline,
                None,
                format!(
                    "offline since {} failed attempt(s); next probe {}",
                    server.consecutive_failures,
                    crate::format_ms(until)
                ),
            );
            result.next_probe_at = Some(until);
            return done(result, Reach::Untried);
        }
        let (result, inventory, pin, reachable) = self.probe(server, service, busy).await;
        let reach = if reachable {
            Reach::Online
        } else {
            Reach::Offline {
                backoff_ms: self.backoff_ms(server.consecutive_failures + 1),
            }
        };
        Completion {
            claim: work.claim,
            result: finish(result, started),
            inventory,
            pin: pin.map(|k| (k.algorithm, k.fingerprint)),
            reach,
        }
    }

    /// Connects and reads the inventory: the result, what was read, the host key to pin on
    /// first contact, and whether the server answered at all.
    async fn probe(
        &self,
        server: &ServerRecord,
        service: crate::store::DatabaseService,
        busy: &Semaphore,
    ) -> (RunResult, Option<InventoryWrite>, Option<HostKeyInfo>, bool) {
        let pinned = server.host_key.as_ref().map(|k| HostKeyInfo {
            algorithm: k.algorithm.clone(),
            fingerprint: k.fingerprint.clone(),
        });
        let target = Target {
            host: &server.ip,
            port: server.port,
            user: &server.ssh_user,
            pinned: pinned.as_ref(),
        };
        // Dialing waits on the network; only what follows (key exchange, authentication, the
        // command) takes one of the busy slots, held until the run ends.
        let dialed = match self.ssh.dial(target.host, target.port).await {
            Ok(dialed) => dialed,
            Err(err) => return (ssh_failure(&err), None, None, !err.is_unreachable()),
        };
        let _busy = busy.acquire().await.expect("the slots are never closed");
        let connection = match self.ssh.establish(dialed, target).await {
            Ok(connection) => connection,
            Err(err) => return (ssh_failure(&err), None, None, !err.is_unreachable()),
        };
        self.metrics.connected(connection.times());
        let pin = pinned.is_none().then(|| connection.host_key().clone());
        let (command, input) = inventory::probe(service, server.inventory_key.as_deref());
        let started = Instant::now();
        let output = connection.run_with_input(command, input.as_bytes()).await;
        if output.is_ok() {
            self.metrics.command(started.elapsed());
        }
        connection.close().await;
        let (result, inventory) = match output {
            Err(err) => (ssh_failure(&err), None),
            Ok(out) if !out.success() => {
                let stderr = String::from_utf8_lossy(&out.stderr);
                let first: Vec<&str> = stderr.lines().take(5).collect();
                let mut message = format!(
                    "`{}` exited with {}",
                    command
                        .split_whitespace()
                        .take(4)
                        .collect::<Vec<_>>()
                        .join(" "),
                    out.exit_status
                        .map_or("no status".into(), |s| s.to_string())
                );
                if !first.is_empty() {
                    message.push_str(": ");
                    message.push_str(&truncate(&first.join(" | "), 500));
                }
                let mut result = failure(Outcome::CommandFailed, None, message);
                result.exit_status = Some(out.exit_status.map_or(-1, i64::from));
                (result, None)
            }
            Ok(out) => match inventory::parse(service, &out.stdout) {
                Ok(inventory) => {
                    let charsets = inventory.charsets.as_ref().map_or_else(
                        || "charsets unchanged".to_owned(),
                        |c| format!("{} charset(s)", c.count),
                    );
                    let message = format!(
                        "{} database(s), {} user(s), {charsets}",
                        inventory.databases.len(),
                        inventory.users.len(),
                    );
                    (
                        RunResult {
                            outcome: name(Outcome::Ok),
                            message,
                            ..RunResult::default()
                        },
                        Some(inventory),
                    )
                }
                Err(err) => (failure(Outcome::ParseFailed, None, err.0), None),
            },
        };
        (result, inventory, pin, true)
    }

    /// How long a server that failed `failures` times in a row waits before its next probe:
    /// exponential backoff from `backoff_base`, capped at `backoff_max`, with ±20% jitter so
    /// that a fleet that went down together does not come back in lockstep. Added to the
    /// database's clock when written.
    fn backoff_ms(&self, failures: i64) -> i64 {
        let exponent = failures.clamp(1, 32) - 1;
        let base = self.config.backoff_base.as_millis() as f64;
        let delay =
            (base * 2f64.powi(exponent as i32)).min(self.config.backoff_max.as_millis() as f64);
        jitter(Duration::from_millis(delay as u64), 0.2).as_millis() as i64
    }

    /// Probes offline servers whose backoff ended, all of a batch at once: TCP connect and SSH
    /// banner, no login. Servers that answer get one recovery sync (the syncs they missed);
    /// the others back off further.
    async fn probe_offline_forever(self: Arc<Self>) {
        loop {
            tokio::select! {
                () = self.shutdown.cancelled() => return,
                () = tokio::time::sleep(self.config.probe_interval) => {}
            }
            loop {
                let ttl = self.config.lease_ttl.as_millis() as i64;
                let limit = self.config.concurrency.clamp(1, 1024);
                let due = match self.store.claim_due_offline(&self.holder, ttl, limit).await {
                    Ok(due) => due,
                    Err(err) => {
                        tracing::warn!(error = %err, "could not read offline servers; retrying");
                        break;
                    }
                };
                let full = due.len() == limit;
                if due.is_empty() {
                    break;
                }
                let guards: Vec<LeaseGuard> = due
                    .iter()
                    .map(|(claim, _)| self.held.hold(*claim))
                    .collect();
                let this = &*self;
                let probes = due.iter().map(|(claim, server)| async move {
                    let probed = this.ssh.probe(&server.ip, server.port).await;
                    this.metrics.probed(probed.is_ok());
                    if let Err(err) = &probed {
                        tracing::debug!(server_id = server.id, error = %err, "still offline");
                    }
                    let backoff = probed
                        .is_err()
                        .then(|| this.backoff_ms(server.consecutive_failures + 1));
                    (*claim, backoff)
                });
                let probed = tokio::select! {
                    () = self.shutdown.cancelled() => None,
                    probed = futures_util::future::join_all(probes) => Some(probed),
                };
                let Some(probed) = probed else {
                    let claims: Vec<Claim> = due.iter().map(|(c, _)| *c).collect();
                    let _ = self.store.release(&self.holder, &claims).await;
                    return;
                };
                let back = match self.store.record_probes(&self.holder, &probed).await {
                    Ok(back) => back,
                    Err(err) => {
                        tracing::warn!(error = %err, "could not record probes; their leases expire");
                        break;
                    }
                };
                drop(guards);
                if !back.is_empty() {
                    tracing::info!(
                        servers = back.len(),
                        "servers are back: syncing what they missed"
                    );
                    let job = NewJob {
                        request_id: format!("recovery-{}-{}", self.holder, crate::new_id()),
                        origin: JobOrigin::Recovery,
                        selection: Selection::Ids(back),
                        scopes: "charsets,databases,users".into(),
                        force: true,
                        reason: "the server is reachable again".into(),
                    };
                    if let Err(err) = self.store.create_job(&job).await {
                        tracing::warn!(error = %err, "could not start the recovery sync");
                    }
                    self.signals.wake.notify_one();
                }
                if !full {
                    break;
                }
            }
        }
    }

    /// Syncs every server each `sync_interval`. The job's request id is the interval's number,
    /// so agents running side by side make one job per interval, not one each.
    async fn schedule_forever(self: Arc<Self>) {
        let Some(interval) = self.config.sync_interval.filter(|i| !i.is_zero()) else {
            return;
        };
        let interval_ms = interval.as_millis().max(1) as i64;
        loop {
            let bucket = crate::now_ms() / interval_ms;
            let job = NewJob {
                request_id: format!("schedule-{interval_ms}-{bucket}"),
                origin: JobOrigin::Schedule,
                selection: Selection::All,
                scopes: "charsets,databases,users".into(),
                force: false,
                reason: format!(
                    "periodic sync every {}",
                    humantime::format_duration(interval)
                ),
            };
            match self.store.create_job(&job).await {
                Ok((_, true)) => self.signals.wake.notify_one(),
                Ok((_, false)) => {}
                Err(err) => tracing::warn!(error = %err, "could not start the periodic sync"),
            }
            let next = (bucket + 1) * interval_ms - crate::now_ms();
            tokio::select! {
                () = self.shutdown.cancelled() => return,
                () = tokio::time::sleep(Duration::from_millis(next.max(1) as u64)) => {}
            }
        }
    }

    /// On PostgreSQL, wakes this agent's scheduler and watchers as soon as another agent
    /// creates a job or records an outcome (`LISTEN`). Notifications can be missed (a dropped
    /// connection), so polling stays the ground truth; this only makes replicas quick.
    async fn listen_forever(self: Arc<Self>) {
        let fleetsync_common::Db::Postgres(pool) = self.store.db() else {
            return;
        };
        use crate::store::{OUTCOMES_CHANNEL, WORK_CHANNEL};
        loop {
            let listening = async {
                let mut listener = sqlx::postgres::PgListener::connect_with(pool).await?;
                listener
                    .listen_all([OUTCOMES_CHANNEL, WORK_CHANNEL])
                    .await?;
                loop {
                    let notification = listener.recv().await?;
                    if notification.channel() == WORK_CHANNEL {
                        self.signals.wake.notify_one();
                    } else {
                        self.signals.bump();
                    }
                }
                #[allow(unreachable_code)]
                Ok::<(), sqlx::Error>(())
            };
            tokio::select! {
                () = self.shutdown.cancelled() => return,
                result = listening => {
                    if let Err(err) = result {
                        tracing::warn!(error = %err, "LISTEN connection lost; polling meanwhile");
                    }
                }
            }
            tokio::select! {
                () = self.shutdown.cancelled() => return,
                () = tokio::time::sleep(Duration::from_secs(1)) => {}
            }
        }
    }

    async fn drain_outbox_forever(self: Arc<Self>) {
        loop {
            match self.drain_outbox().await {
                Ok(0) => {}
                Ok(n) => tracing::info!(requests = n, "took sync requests recorded by migrations"),
                Err(err) => tracing::warn!(error = %err, "could not drain the outbox; retrying"),
            }
            tokio::select! {
                () = self.shutdown.cancelled() => return,
                () = tokio::time::sleep(self.config.outbox_interval) => {}
            }
        }
    }

    /// Turns every untaken sync request into a job (idempotently: the request id is the job's).
    pub async fn drain_outbox(&self) -> Result<usize, fleetsync_common::ServiceError> {
        let requests = self.store.untaken_requests().await?;
        let n = requests.len();
        for (id, scopes, reason) in requests {
            self.store
                .create_job(&NewJob {
                    request_id: id,
                    origin: JobOrigin::Migration,
                    selection: Selection::All,
                    scopes,
                    force: false,
                    reason,
                })
                .await?;
        }
        if n > 0 {
            self.signals.wake.notify_one();
        }
        Ok(n)
    }
}

/// A run whose results the database refused for good: `PARSE_FAILED` with the reason, without
/// the inventory (the server did answer: reachability and the host key pin still count).
fn unstorable(mut item: Completion, err: &sqlx::Error) -> Completion {
    item.result = RunResult {
        outcome: name(Outcome::ParseFailed),
        message: truncate(
            &format!("what the server reported cannot be stored: {err}"),
            1000,
        ),
        duration_ms: item.result.duration_ms,
        ..RunResult::default()
    };
    item.inventory = None;
    item
}

/// Stored name of an outcome (`OK`, `UNREACHABLE`, ...).
pub fn name(outcome: Outcome) -> String {
    outcome
        .as_str_name()
        .trim_start_matches("OUTCOME_")
        .to_owned()
}

/// Stored name of a cause (`REFUSED`, ...).
pub fn cause_name(cause: UnreachableCause) -> Option<String> {
    (cause != UnreachableCause::Unspecified).then(|| {
        cause
            .as_str_name()
            .trim_start_matches("UNREACHABLE_CAUSE_")
            .to_owned()
    })
}

fn failure(outcome: Outcome, cause: Option<UnreachableCause>, message: String) -> RunResult {
    RunResult {
        outcome: name(outcome),
        cause: cause.and_then(cause_name),
        message,
        ..RunResult::default()
    }
}

fn ssh_failure(err: &SshError) -> RunResult {
    let (outcome, cause) = err.outcome();
    let mut result = failure(outcome, Some(cause), err.to_string());
    if matches!(
        err,
        SshError::Timeout {
            stage: crate::ssh::Stage::Command,
            ..
        }
    ) {
        result.exit_status = Some(-1);
    }
    result
}

fn finish(mut result: RunResult, started: Instant) -> RunResult {
    result.duration_ms = started.elapsed().as_millis() as i64;
    result
}

fn truncate(text: &str, max: usize) -> String {
    if text.len() <= max {
        return text.to_owned();
    }
    let mut end = max;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}…", &text[..end])
}
