//! The scheduler: claims waiting servers in batches, runs one SSH sync per server (bounded
//! concurrency, no database access during the run), and records finished runs in batches
//! (group commit), one outcome serving every job that waited for that server since before the
//! claim. One heartbeat renews every lease the agent holds. Also drains the outbox of sync
//! requests recorded by migrations, probes offline servers in parallel, starts the periodic
//! sync and prunes old history.
//!
//! Here: the slots, claiming and the background loops; `run` is one server's run, `complete`
//! the completer, `leases` the leases held and their heartbeat, `prober` the reachability
//! probes, `quarantine` the peers, second opinions and quarantine.

mod complete;
mod leases;
mod prober;
mod quarantine;
mod run;

use std::{
    sync::Arc,
    time::{Duration, Instant},
};

use fleetsync_common::{AgentId, RequestId};
use leases::{HeldLeases, LeaseGuard};
use quarantine::Standing;
use run::RunEnd;
use tokio::sync::{Notify, OwnedSemaphorePermit, Semaphore, mpsc, watch};
use tokio_util::sync::CancellationToken;

use crate::{
    metrics::Metrics,
    model::{AgentState, JobOrigin, Scopes},
    ssh::SshClient,
    store::{
        AgentReport, Claimer, Completion, NewJob, OUTCOMES_CHANNEL, Pruned, Selection, Store,
        WORK_CHANNEL,
    },
};

/// Scheduler settings.
#[derive(Debug, Clone)]
pub struct RunnerConfig {
    /// Servers synced at once (SSH sessions in flight).
    pub concurrency: usize,
    /// Most runs in flight, dialing included (`None`: 4x `concurrency`, 256 to 1024). An agent
    /// claims this many servers at once, so a job smaller than this is run by one agent.
    pub in_flight: Option<usize>,
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
    /// The zone it serves (empty: servers without one).
    pub zone: String,
    /// Whether a failure that may be its own is handed to a live peer of its zone before it is
    /// recorded.
    pub second_opinions: bool,
    /// Most runs in flight the open-file limit allows (`limits::OpenFiles::runs_allowed`);
    /// `None`: no cap.
    pub open_files_cap: Option<usize>,
}

impl Default for RunnerConfig {
    fn default() -> Self {
        Self {
            concurrency: 64,
            in_flight: None,
            lease_ttl: Duration::from_secs(60),
            poll_interval: Duration::from_millis(200),
            outbox_interval: Duration::from_secs(10),
            backoff_base: Duration::from_secs(5),
            backoff_max: Duration::from_secs(600),
            probe_interval: Duration::from_secs(5),
            sync_interval: Some(Duration::from_secs(3600)),
            retention: Duration::from_secs(7 * 24 * 3600),
            zone: String::new(),
            second_opinions: true,
            open_files_cap: None,
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
/// How often SQLite's write-ahead log is copied into the database file, beside the writers
/// (`common::db::SQLITE_AUTOCHECKPOINT_PAGES`).
const CHECKPOINT_INTERVAL: Duration = Duration::from_millis(100);

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

/// How many servers may be in flight (dialing included) as configured: `--in-flight`, or 4x
/// `--concurrency` within 256 to 1024; never fewer than `--concurrency`.
fn wanted_in_flight(concurrency: usize, in_flight: Option<usize>) -> usize {
    in_flight
        .unwrap_or_else(|| (concurrency * 4).clamp(MIN_IN_FLIGHT, MAX_IN_FLIGHT))
        .max(concurrency)
}

impl Slots {
    fn new(concurrency: usize, in_flight: Option<usize>, cap: Option<usize>) -> Self {
        let wanted = wanted_in_flight(concurrency, in_flight);
        let flight = wanted.min(cap.unwrap_or(usize::MAX)).max(1);
        if flight < wanted {
            tracing::warn!(
                wanted,
                in_flight = flight,
                "the open-file limit allows fewer runs in flight than asked: raise the hard limit \
                 (LimitNOFILE in the systemd unit) to run more"
            );
        }
        let concurrency = concurrency.min(flight);
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
    holder: AgentId,
    config: RunnerConfig,
    signals: Signals,
    /// Stop claiming work (SIGTERM, after the drain delay).
    shutdown: CancellationToken,
    /// Stop the runs still in flight: the shutdown grace is over, or nothing is left to wait
    /// for. Leases are renewed until then.
    abandon: CancellationToken,
    held: Arc<HeldLeases>,
    metrics: Arc<Metrics>,
    /// What this agent says about itself in the registry (`sync_agents`).
    report: AgentReport,
    /// Its peers and its quarantine.
    standing: Arc<Standing>,
    /// Whether it claims work, and why not: followed by the health service.
    work: watch::Sender<(AgentState, String)>,
}

impl Runner {
    /// A scheduler; `report.id` names this agent in leases and in the registry.
    pub fn new(
        store: Store,
        ssh: SshClient,
        report: AgentReport,
        config: RunnerConfig,
        signals: Signals,
        shutdown: CancellationToken,
        metrics: Arc<Metrics>,
    ) -> Self {
        Self {
            store,
            ssh,
            holder: report.id.clone(),
            report,
            config,
            signals,
            shutdown,
            abandon: CancellationToken::new(),
            held: Arc::new(HeldLeases::new(metrics.leases_held().clone())),
            metrics,
            standing: Arc::default(),
            work: watch::channel((AgentState::Serving, String::new())).0,
        }
    }

    /// Whether this agent claims work (serving), or why not (quarantined, draining).
    pub fn work_state(&self) -> watch::Receiver<(AgentState, String)> {
        self.work.subscribe()
    }

    /// Runs until shutdown, then claims nothing more and gives the runs past the key exchange up
    /// to `grace` to finish (their leases still renewed, their outcomes recorded and streamed
    /// as usual). Runs still dialing or waiting for a slot stop at once, and runs still going
    /// after the grace then: their servers are left for the next agent (their leases
    /// released, their job rows still waiting). Returns once every finished run is recorded.
    pub async fn run(self, grace: Duration) {
        let this = Arc::new(self);
        this.register().await;
        let background = [
            tokio::spawn(Arc::clone(&this).drain_outbox_forever()),
            tokio::spawn(Arc::clone(&this).probe_offline_forever()),
            tokio::spawn(Arc::clone(&this).schedule_forever()),
            tokio::spawn(Arc::clone(&this).listen_forever()),
            tokio::spawn(Arc::clone(&this).heartbeat_forever()),
            tokio::spawn(Arc::clone(&this).prune_forever()),
            tokio::spawn(Arc::clone(&this).checkpoint_forever()),
        ];
        let (done_tx, done_rx) = mpsc::unbounded_channel();
        let completer = tokio::spawn(Arc::clone(&this).complete_forever(done_rx));
        let slots = Slots::new(
            this.config.concurrency,
            this.config.in_flight,
            this.config.open_files_cap,
        );
        let mut runs = tokio::task::JoinSet::new();
        while !this.shutdown.is_cancelled() {
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
        // A rolling restart should not throw away SSH work nearly done: the runs talking to
        // their server get the grace to finish (the others have stopped at once). Those still
        // going after it release their leases.
        let finished =
            tokio::time::timeout(grace, async { while runs.join_next().await.is_some() {} }).await;
        if finished.is_err() {
            tracing::info!(
                runs = runs.len(),
                "stopping the runs still in flight after the shutdown grace; their servers are left for the next agent"
            );
        }
        this.abandon.cancel();
        // Then wait for the completer to record what finished.
        while runs.join_next().await.is_some() {}
        drop(done_tx);
        let _ = completer.await;
        for task in background {
            let _ = task.await;
        }
        this.report_stopped().await;
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
        if free == 0 || !self.standing.claims() {
            return Ok(0);
        }
        let ttl = self.config.lease_ttl.as_millis() as i64;
        let started = Instant::now();
        let claimer = Claimer {
            holder: &self.holder,
            zone: &self.report.zone,
        };
        let claimed = self.store.claim(claimer, ttl, free).await?;
        let n = claimed.len();
        tracing::debug!(
            asked = free,
            claimed = n,
            took_ms = started.elapsed().as_millis() as u64,
            "claimed"
        );
        for work in claimed {
            let guard = self.held.hold(work.claim, started);
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
                let span = tracing::info_span!("sync", server_id = work.claim.server_id.get(), token = work.claim.token);
                let end = tokio::select! {
                    () = this.abandon.cancelled() => RunEnd::Stopped,
                    end = this.sync_server(&work, &busy).instrument(span) => end,
                };
                drop(flight);
                this.metrics.runs_in_flight().dec();
                this.signals.wake.notify_one();
                match end {
                    RunEnd::Done(completion) => {
                        let _ = done.send(Finished {
                            completion: *completion,
                            _guard: guard,
                            _slot: slot,
                        });
                    }
                    RunEnd::Lapsed => {}
                    RunEnd::Stopped => {
                        // Leave the server to whoever runs next. (On the heap: the store's
                        // futures are large, and every run in flight would carry one.)
                        let claims = [work.claim];
                        let release = Box::pin(this.store.release(&this.holder, &claims));
                        if let Err(err) = release.await {
                            tracing::warn!(error = %err, "could not release a lease; it expires by itself");
                        }
                    }
                }
            });
        }
        Ok(n)
    }

    /// Deletes finished jobs and runs past the retention, every minute.
    async fn prune_forever(self: Arc<Self>) {
        loop {
            let age = self.config.retention.as_millis() as i64;
            let pruned = if self.standing.incompatible().is_some() {
                Ok(Pruned::default())
            } else {
                self.store.prune_older_than(age, 20).await
            };
            match pruned {
                Ok(pruned) if pruned != Pruned::default() => {
                    tracing::info!(
                        jobs = pruned.jobs,
                        runs = pruned.runs,
                        orphans = pruned.orphans,
                        gone = pruned.gone,
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

    /// SQLite: copies the write-ahead log into the database file every
    /// [`CHECKPOINT_INTERVAL`] from a connection of its own, so that no writer (a completion, a
    /// job's creation, a retention batch) waits for the copy inside its commit. Returns at
    /// once on PostgreSQL and MySQL, which checkpoint by themselves.
    async fn checkpoint_forever(self: Arc<Self>) {
        if self.store.backend() != fleetsync_common::Backend::Sqlite {
            return;
        }
        loop {
            if let Err(err) = self.store.db().checkpoint().await {
                tracing::debug!(error = %err, "could not checkpoint the write-ahead log; retrying");
            }
            tokio::select! {
                () = self.shutdown.cancelled() => return,
                () = tokio::time::sleep(CHECKPOINT_INTERVAL) => {}
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
                request_id: RequestId::new(format!("schedule-{interval_ms}-{bucket}")),
                origin: JobOrigin::Schedule,
                selection: Selection::All,
                scopes: Scopes::ALL,
                force: false,
                reason: format!(
                    "periodic sync every {}",
                    humantime::format_duration(interval)
                ),
            };
            // Outside the schema's range, an agent writes nothing; its peers start the job.
            if self.standing.incompatible().is_none() {
                match self.store.create_job(&job).await {
                    Ok((_, true)) => self.signals.wake.notify_one(),
                    Ok((_, false)) => {}
                    Err(err) => tracing::warn!(error = %err, "could not start the periodic sync"),
                }
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
            match self.drain_outbox_if_compatible().await {
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

    /// The outbox, unless the schema is outside this agent's range (then nothing is written).
    async fn drain_outbox_if_compatible(&self) -> Result<usize, fleetsync_common::ServiceError> {
        if self.standing.incompatible().is_some() {
            return Ok(0);
        }
        self.drain_outbox().await
    }

    /// Turns every untaken sync request into a job (idempotently: the request id is the job's).
    pub async fn drain_outbox(&self) -> Result<usize, fleetsync_common::ServiceError> {
        let requests = self.store.untaken_requests().await?;
        let n = requests.len();
        for request in requests {
            self.store
                .create_job(&NewJob {
                    request_id: request.id,
                    origin: JobOrigin::Migration,
                    selection: Selection::All,
                    scopes: request.scopes,
                    force: false,
                    reason: request.reason,
                })
                .await?;
        }
        if n > 0 {
            self.signals.wake.notify_one();
        }
        Ok(n)
    }
}
