//! The scheduler: finds servers with job rows waiting, claims their leases, and runs one SSH
//! sync per server (bounded concurrency), recording one outcome that satisfies every job
//! waiting for that server. Also drains the outbox of sync requests recorded by migrations.

use std::{
    sync::Arc,
    time::{Duration, Instant},
};

use fleetsync_common::proto::sync::v1::{Outcome, UnreachableCause};
use tokio::sync::{Notify, Semaphore, watch};
use tokio_util::sync::CancellationToken;

use crate::{
    inventory,
    ssh::{HostKeyInfo, SshClient, SshError, Target},
    store::{
        InventoryWrite, JobOrigin, NewJob, RunRecord, RunResult, Selection, ServerRecord, Store,
    },
};

/// Scheduler settings.
#[derive(Debug, Clone)]
pub struct RunnerConfig {
    /// Servers synced at once.
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
}

impl Default for RunnerConfig {
    fn default() -> Self {
        Self {
            concurrency: 64,
            lease_ttl: Duration::from_secs(60),
            poll_interval: Duration::from_millis(500),
            outbox_interval: Duration::from_secs(10),
            backoff_base: Duration::from_secs(5),
            backoff_max: Duration::from_secs(600),
            probe_interval: Duration::from_secs(5),
            sync_interval: Some(Duration::from_secs(3600)),
        }
    }
}

/// Handles shared by the scheduler and the services.
#[derive(Debug, Clone)]
pub struct Signals {
    /// Wakes the scheduler (new work).
    pub wake: Arc<Notify>,
    /// Bumped after every recorded outcome; watchers wait on it.
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

/// The scheduler of one agent.
#[derive(Debug, Clone)]
pub struct Runner {
    store: Store,
    ssh: SshClient,
    holder: String,
    config: RunnerConfig,
    signals: Signals,
    shutdown: CancellationToken,
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
    ) -> Self {
        Self {
            store,
            ssh,
            holder,
            config,
            signals,
            shutdown,
        }
    }

    /// Runs until shutdown; runs in flight are stopped and their servers left for the next
    /// agent (their leases released, their job rows still waiting).
    pub async fn run(self) {
        let this = Arc::new(self);
        let outbox = tokio::spawn(Arc::clone(&this).drain_outbox_forever());
        let prober = tokio::spawn(Arc::clone(&this).probe_offline_forever());
        let scheduler = tokio::spawn(Arc::clone(&this).schedule_forever());
        let listener = tokio::spawn(Arc::clone(&this).listen_forever());
        let permits = Arc::new(Semaphore::new(this.config.concurrency));
        let mut runs = tokio::task::JoinSet::new();
        loop {
            if let Err(err) = this.fill(&permits, &mut runs).await {
                tracing::warn!(error = %err, "scheduler could not read pending work; retrying");
            }
            while runs.try_join_next().is_some() {}
            // Expired leases of a dead agent announce nothing: look at least twice per TTL.
            let nap = this.config.poll_interval.min(this.config.lease_ttl / 2);
            tokio::select! {
                () = this.shutdown.cancelled() => break,
                () = this.signals.wake.notified() => {}
                () = tokio::time::sleep(nap) => {}
            }
        }
        // Runs watch the same token; wait for them to release their leases.
        while runs.join_next().await.is_some() {}
        let _ = tokio::join!(outbox, prober, scheduler, listener);
    }

    async fn fill(
        self: &Arc<Self>,
        permits: &Arc<Semaphore>,
        runs: &mut tokio::task::JoinSet<()>,
    ) -> Result<(), sqlx::Error> {
        let free = permits.available_permits();
        if free == 0 {
            return Ok(());
        }
        for work in self.store.pending_work(free as i64).await? {
            if !work.exists {
                if !self.store.cancel_deleted(work.server_id).await?.is_empty() {
                    self.signals.bump();
                }
                continue;
            }
            let Ok(permit) = Arc::clone(permits).try_acquire_owned() else {
                break;
            };
            let ttl = self.config.lease_ttl.as_millis() as i64;
            let Some(token) = self
                .store
                .claim_lease(work.server_id, &self.holder, ttl)
                .await?
            else {
                continue;
            };
            let this = Arc::clone(self);
            runs.spawn(async move {
                this.run_server(work.server_id, token).await;
                drop(permit);
                this.signals.wake.notify_one();
            });
        }
        Ok(())
    }

    async fn run_server(&self, server_id: i64, token: i64) {
        use tracing::Instrument;
        let span = tracing::info_span!("sync", server_id, token);
        self.run_server_inner(server_id, token)
            .instrument(span)
            .await;
    }

    async fn run_server_inner(&self, server_id: i64, token: i64) {
        let heartbeat = self.spawn_heartbeat(server_id, token);
        let outcome = tokio::select! {
            () = self.shutdown.cancelled() => None,
            outcome = self.sync_server(server_id) => Some(outcome),
        };
        heartbeat.cancel();
        let Some(outcome) = outcome else {
            // Shutting down: leave the server to whoever runs next.
            if let Err(err) = self
                .store
                .release_lease(server_id, &self.holder, token)
                .await
            {
                tracing::warn!(error = %err, "could not release the lease; it expires by itself");
            }
            return;
        };
        let Some((result, inventory, pin, reachable)) = outcome else {
            // The server was deleted meanwhile.
            let _ = self
                .store
                .release_lease(server_id, &self.holder, token)
                .await;
            return;
        };
        let pin = pin
            .as_ref()
            .map(|k| (k.algorithm.as_str(), k.fingerprint.as_str()));
        match self
            .store
            .record_run(
                server_id,
                &self.holder,
                token,
                RunRecord {
                    result: &result,
                    inventory: inventory.as_ref(),
                    pin,
                    reachable,
                },
            )
            .await
        {
            Ok(Some(jobs)) => {
                tracing::info!(outcome = %result.outcome, jobs = jobs.len(), duration_ms = result.duration_ms, "server synced");
                self.signals.bump();
            }
            Ok(None) => tracing::warn!("lease lost during the run: result discarded"),
            Err(err) => {
                tracing::error!(error = %err, "could not record the run; the server will be synced again")
            }
        }
    }

    fn spawn_heartbeat(&self, server_id: i64, token: i64) -> CancellationToken {
        let stop = CancellationToken::new();
        let store = self.store.clone();
        let holder = self.holder.clone();
        let ttl = self.config.lease_ttl;
        let guard = stop.clone();
        tokio::spawn(async move {
            loop {
                tokio::select! {
                    () = guard.cancelled() => return,
                    () = tokio::time::sleep(ttl / 3) => {}
                }
                match store
                    .heartbeat(server_id, &holder, token, ttl.as_millis() as i64)
                    .await
                {
                    Ok(true) => {}
                    Ok(false) => {
                        tracing::warn!(server_id, "lease lost");
                        return;
                    }
                    Err(err) => tracing::warn!(server_id, error = %err, "lease heartbeat failed"),
                }
            }
        });
        stop
    }

    /// One server: connect, probe, parse. `None` if the server no longer exists.
    #[allow(clippy::type_complexity)]
    async fn sync_server(
        &self,
        server_id: i64,
    ) -> Option<(
        RunResult,
        Option<InventoryWrite>,
        Option<HostKeyInfo>,
        Option<bool>,
    )> {
        let started = Instant::now();
        let server = match self.store.server(server_id).await {
            Ok(Some(server)) => server,
            Ok(None) => return None,
            Err(err) => {
                let result = failure(Outcome::Cancelled, None, format!("database error: {err}"));
                return Some((finish(result, started), None, None, None));
            }
        };
        let Some(service) = server.database_service else {
            let result = failure(
                Outcome::SkippedNoDatabaseService,
                None,
                "no database service registered".into(),
            );
            return Some((finish(result, started), None, None, None));
        };
        if let Some(until) = server.next_probe_at
            && server.reachability == "offline"
            && until > crate::now_ms()
        {
            let forced = self.store.forced(server_id).await.unwrap_or(false);
            if !forced {
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
                return Some((finish(result, started), None, None, None));
            }
        }
        let (mut result, inventory, pin, reachable) = self.probe(&server, service).await;
        if reachable == Some(false) {
            result.next_probe_at = Some(self.next_probe(server.consecutive_failures + 1));
        }
        Some((finish(result, started), inventory, pin, reachable))
    }

    async fn probe(
        &self,
        server: &ServerRecord,
        service: crate::store::DatabaseService,
    ) -> (
        RunResult,
        Option<InventoryWrite>,
        Option<HostKeyInfo>,
        Option<bool>,
    ) {
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
        let connection = match self.ssh.connect(target).await {
            Ok(connection) => connection,
            Err(err) => {
                let reachable = !err.is_unreachable();
                return (ssh_failure(&err), None, None, Some(reachable));
            }
        };
        let pin = pinned.is_none().then(|| connection.host_key().clone());
        let (command, input) = inventory::probe(service);
        let output = connection.run_with_input(command, input.as_bytes()).await;
        connection.close().await;
        let result = match output {
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
                    let message = format!(
                        "{} database(s), {} user(s), {} charset(s)",
                        inventory.databases.len(),
                        inventory.users.len(),
                        inventory.charsets
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
        (result.0, result.1, pin, Some(true))
    }

    /// When a server that failed `failures` times in a row is probed next: exponential backoff
    /// from `backoff_base`, capped at `backoff_max`, with ±20% jitter so that a fleet that went
    /// down together does not come back in lockstep.
    fn next_probe(&self, failures: i64) -> i64 {
        let exponent = failures.clamp(1, 32) - 1;
        let base = self.config.backoff_base.as_millis() as f64;
        let delay =
            (base * 2f64.powi(exponent as i32)).min(self.config.backoff_max.as_millis() as f64);
        let jitter = 0.8 + 0.4 * (crate::random_u64() as f64 / u64::MAX as f64);
        crate::now_ms() + (delay * jitter) as i64
    }

    /// Probes offline servers whose backoff ended: TCP connect and SSH banner, no login. A server
    /// that answers gets a recovery sync (the syncs it missed); one that does not backs off
    /// further.
    async fn probe_offline_forever(self: Arc<Self>) {
        loop {
            tokio::select! {
                () = self.shutdown.cancelled() => return,
                () = tokio::time::sleep(self.config.probe_interval) => {}
            }
            let due = match self.store.due_offline(self.config.concurrency as i64).await {
                Ok(due) => due,
                Err(err) => {
                    tracing::warn!(error = %err, "could not read offline servers; retrying");
                    continue;
                }
            };
            for server in due {
                let ttl = self.config.lease_ttl.as_millis() as i64;
                let Ok(Some(token)) = self.store.claim_lease(server.id, &self.holder, ttl).await
                else {
                    continue;
                };
                let probed = tokio::select! {
                    () = self.shutdown.cancelled() => None,
                    probed = self.ssh.probe(&server.ip, server.port) => Some(probed),
                };
                let Some(probed) = probed else {
                    let _ = self
                        .store
                        .release_lease(server.id, &self.holder, token)
                        .await;
                    return;
                };
                let next = match &probed {
                    Ok(_) => None,
                    Err(_) => Some(self.next_probe(server.consecutive_failures + 1)),
                };
                match self
                    .store
                    .record_probe(server.id, &self.holder, token, next)
                    .await
                {
                    Ok(true) if probed.is_ok() => {
                        tracing::info!(
                            server_id = server.id,
                            "server is back: syncing what it missed"
                        );
                        let job = NewJob {
                            request_id: format!("recovery-{}-{}", server.id, crate::now_ms()),
                            origin: JobOrigin::Recovery,
                            selection: Selection::Ids(vec![server.id]),
                            scopes: "charsets,databases,users".into(),
                            force: true,
                            reason: "the server is reachable again".into(),
                        };
                        if let Err(err) = self.store.create_job(&job).await {
                            tracing::warn!(server_id = server.id, error = %err, "could not start the recovery sync");
                        }
                        self.signals.wake.notify_one();
                    }
                    Ok(_) => {
                        if let Err(err) = &probed {
                            tracing::debug!(server_id = server.id, error = %err, "still offline");
                        }
                    }
                    Err(err) => {
                        tracing::warn!(server_id = server.id, error = %err, "could not record the probe")
                    }
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
