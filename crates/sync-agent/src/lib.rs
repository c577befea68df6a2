//! The fleetsync sync-agent: the one component that opens SSH connections to managed servers.
//! It serves `SyncAgent` and `Fleet` over gRPC (with health and reflection), schedules syncs
//! through leases in the control-plane database, and drains the outbox of sync requests that
//! migrations record.
#![forbid(unsafe_code)]

pub mod client;
pub mod config;
pub mod entry;
pub mod inventory;
pub mod limits;
pub mod metrics;
pub mod model;
pub mod runner;
pub mod schema;
pub mod service;
pub mod ssh;
pub mod store;

use std::{sync::Arc, time::Duration};

use anyhow::Context;
use fleetsync_common::{
    Db, DbError, DbOptions, SessionLimits,
    calls::CallCounter,
    grpc,
    proto::{
        SYNC_DESCRIPTOR_SET,
        sync::v1::{fleet_server::FleetServer, sync_agent_server::SyncAgentServer},
    },
};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tonic::server::NamedService;

use crate::{
    metrics::Metrics,
    runner::{Runner, RunnerConfig, Signals},
    service::{AgentState, FleetService, SyncAgentService},
    ssh::SshClient,
    store::Store,
};

/// Connections of the work path's own pool: the claimer, the completer, the heartbeat, the
/// prober, the outbox drain and retention each use at most one at a time; PostgreSQL's
/// `LISTEN` keeps one more, outside the pool. With the default `--db-pool-size` (6) an agent
/// opens at most 6 + 6 + 1 = 13 connections: six agents fit PostgreSQL's default
/// `max_connections` (100, 3 of them reserved) with room for the panel and the migrator.
pub const WORK_POOL_SIZE: u32 = 6;
/// How long, past the shutdown grace, the scheduler may take to release the leases of the runs
/// it stopped and to record the runs that finished.
const WIND_DOWN: Duration = Duration::from_secs(5);

/// What `run` needs, resolved from the command line (or built by tests).
#[derive(Debug, Clone)]
pub struct Config {
    /// Control-plane database URL.
    pub database_url: String,
    /// How long calls in flight may take to finish on shutdown.
    pub shutdown_grace: Duration,
    /// How long health says NOT_SERVING before the agent stops taking calls and work.
    pub drain_delay: Duration,
    /// SSH client with keys and timeouts.
    pub ssh: SshClient,
    /// Scheduler settings.
    pub runner: RunnerConfig,
    /// Bearer token and TLS.
    pub security: grpc::Security,
    /// Connections to the control-plane database.
    pub db_pool_size: u32,
    /// Most event streams open at once.
    pub max_streams: usize,
    /// Most `CheckConnection` calls in flight at once.
    pub max_checks: usize,
    /// Where to serve Prometheus metrics (`GET /metrics`), if anywhere.
    pub metrics_listen: Option<std::net::SocketAddr>,
    /// The fleet-wide gauges are read at most this often.
    pub metrics_interval: Duration,
    /// How long a PostgreSQL or MySQL database that does not answer at start is waited for
    /// (`None`: as long as it takes).
    pub database_wait: Option<Duration>,
}

/// Runs the agent on `listener` until `shutdown` is cancelled.
///
/// Waits for a database that does not answer yet (health `NOT_SERVING` meanwhile), refuses to
/// start on a schema older than it needs. Health reports `SERVING` once the database answers
/// and the schema is current, and `NOT_SERVING` as soon as shutdown begins.
pub async fn run(
    mut config: Config,
    listener: TcpListener,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    // Every run in flight holds a socket: the soft open-file limit goes up to the hard one,
    // and the runs in flight stay within it.
    match limits::raise_open_files() {
        Ok(files) => {
            if files.now > files.before {
                tracing::info!(
                    before = files.before,
                    now = files.now,
                    "raised the open-file limit (soft) to the hard limit"
                );
            }
            config.runner.open_files_cap = Some(files.runs_allowed());
        }
        Err(err) => tracing::warn!(error = %err, "could not read or raise the open-file limit"),
    }
    let metrics = Arc::new(Metrics::new().with_fleet_interval(config.metrics_interval));
    let metrics_listener = match config.metrics_listen {
        Some(addr) => Some(metrics::bind(addr).await?),
        None => None,
    };
    let services = [
        SyncAgentServer::<SyncAgentService>::NAME,
        FleetServer::<FleetService>::NAME,
    ];
    let Some(db) = open_database(&config, &listener, &services, &shutdown).await? else {
        tracing::info!("shutdown before the database answered");
        return Ok(());
    };
    let version = schema::check(&db).await.with_context(|| {
        format!(
            "checking the schema of {}",
            fleetsync_common::db::describe_url(&config.database_url)
        )
    })?;
    let store = Store::new(db.clone());
    let marked = store
        .repair_queue()
        .await
        .context("marking the servers that wait for a sync")?;
    if marked > 0 {
        tracing::info!(
            servers = marked,
            "servers waiting from before this agent's schema"
        );
    }
    // The work path (claims, completions, the heartbeat, probes) has a pool of its own, so that
    // however many calls and watch streams the services serve, leases are always renewed.
    let work_db = Db::connect_with(
        &config.database_url,
        DbOptions {
            pool_size: WORK_POOL_SIZE,
            // A completion holds its lease rows while it waits on a lock: it gives up after a
            // quarter of the TTL, renews them, and tries again (`runner::complete`).
            limits: SessionLimits {
                lock: config.runner.lease_ttl / 4,
                ..SessionLimits::default()
            },
            ..DbOptions::default()
        },
    )
    .await?;
    let signals = Signals::default();
    let holder = fleetsync_common::AgentId::new(format!(
        "{}-{}-{}",
        fleetsync_common::clock::hostname("agent"),
        std::process::id(),
        &new_id()[..8]
    ));
    // `shutdown` starts the drain (health NOT_SERVING, everything still served); `stop` ends
    // the work, the streams and the server once the drain delay is over.
    let stop = CancellationToken::new();
    let report = store::AgentReport {
        id: holder.clone(),
        host: fleetsync_common::clock::hostname("agent"),
        version: env!("CARGO_PKG_VERSION").to_owned(),
        schema_version: schema::SCHEMA_MIN,
        schema_max: Some(schema::SCHEMA_MAX),
        key_fingerprints: config.ssh.key_fingerprints(),
        zone: config.runner.zone.clone(),
        lease_ttl_ms: config.runner.lease_ttl.as_millis() as i64,
    };
    let runner = Runner::new(
        Store::new(work_db.clone()),
        config.ssh.clone(),
        report,
        config.runner.clone(),
        signals.clone(),
        stop.clone(),
        Arc::clone(&metrics),
    );
    let state = AgentState {
        store,
        ssh: config.ssh,
        signals,
        shutdown: stop.clone(),
        watch_poll: config.runner.poll_interval.max(Duration::from_millis(100)),
        feeds: service::Feeds::default(),
        streams: Arc::new(tokio::sync::Semaphore::new(config.max_streams.max(1))),
        checks: Arc::new(tokio::sync::Semaphore::new(config.max_checks.max(1))),
    };
    let counted = [
        services[0],
        services[1],
        "grpc.health.v1.Health",
        "grpc.reflection.v1.ServerReflection",
        "grpc.reflection.v1alpha.ServerReflection",
    ];
    let (router, health) = grpc::base_router(
        &services,
        SYNC_DESCRIPTOR_SET,
        &config.security,
        CallCounter::new(&counted, metrics.call_sink()),
    )
    .await
    .context("building the gRPC server")?;
    let security = &config.security;
    let router = router
        .add_service(security.protect(SyncAgentServer::new(SyncAgentService::new(state.clone()))))
        .add_service(security.protect(FleetServer::new(FleetService::new(state))));

    follow_work(runner.work_state(), health.clone());
    let scheduler = tokio::spawn(runner.run(config.shutdown_grace));
    if let Some(listener) = metrics_listener {
        let addr = listener
            .local_addr()
            .context("reading the metrics address")?;
        tracing::info!(metrics_addr = %addr, "serving Prometheus metrics on http://{addr}/metrics");
        let pools = vec![("rpc", db.clone()), ("work", work_db.clone())];
        let served = metrics::serve(
            listener,
            metrics,
            Store::new(db.clone()),
            pools,
            stop.clone(),
        );
        tokio::spawn(async move {
            if let Err(err) = served.await {
                tracing::error!(error = %format!("{err:#}"), "the metrics endpoint stopped");
            }
        });
    }
    health.serving().await;
    health.follow_database(db.clone(), Duration::from_secs(2), shutdown.clone());
    let addr = listener
        .local_addr()
        .context("reading the listen address")?;
    tracing::info!(%addr, backend = %db.backend(), schema = version, %holder, "sync-agent listening");

    grpc::drain_then_stop(
        shutdown.clone(),
        health.clone(),
        config.drain_delay,
        stop.clone(),
    );
    let served = grpc::serve(
        router,
        listener,
        health,
        stop.clone(),
        config.shutdown_grace,
    )
    .await;
    stop.cancel();
    // The scheduler gives its runs the grace (counted from `stop`, as the calls' is), then
    // releases what is left and records what finished: that takes a moment beyond the grace.
    if tokio::time::timeout(config.shutdown_grace + WIND_DOWN, scheduler)
        .await
        .is_err()
    {
        tracing::warn!(
            "the scheduler did not wind down after the grace period; the leases it holds expire by themselves"
        );
    }
    served.context("serving gRPC")?;
    db.close().await;
    work_db.close().await;
    tracing::info!("sync-agent stopped");
    Ok(())
}

/// The health entry that says whether this agent claims work: `NOT_SERVING` while it is
/// quarantined or draining (the reason is in `sync-agent agents` and the log), even though its
/// RPCs are served.
pub const WORK_HEALTH: &str = "fleetsync.sync.v1.Work";

/// Keeps [`WORK_HEALTH`] in step with the scheduler's state.
fn follow_work(
    mut work: tokio::sync::watch::Receiver<(model::AgentState, String)>,
    health: fleetsync_common::grpc::Health,
) {
    tokio::spawn(async move {
        loop {
            let serving = work.borrow_and_update().0 == model::AgentState::Serving;
            health.set_entry(WORK_HEALTH, serving).await;
            if work.changed().await.is_err() {
                return;
            }
        }
    });
}

/// The control-plane database, waited for at start: a PostgreSQL or MySQL server that does not
/// answer yet (a machine booting, a failover, a network still coming up) is tried again with
/// backoff (0.5 s doubling to 30 s) while health answers `NOT_SERVING` on `listener`, until it
/// answers, `config.database_wait` has passed (then its error), or shutdown (then `None`). A
/// URL that cannot work and a SQLite file fail at once.
async fn open_database(
    config: &Config,
    listener: &TcpListener,
    services: &[&'static str],
    shutdown: &CancellationToken,
) -> anyhow::Result<Option<Db>> {
    let options = DbOptions {
        pool_size: config.db_pool_size,
        ..DbOptions::default()
    };
    let url = &config.database_url;
    let first = match Db::connect_with(url, options).await {
        Ok(db) => return Ok(Some(db)),
        Err(err) => err,
    };
    let server = fleetsync_common::Backend::from_url(url)
        .is_ok_and(|b| b != fleetsync_common::Backend::Sqlite);
    if !server || !matches!(first, DbError::Connect { .. } | DbError::Timeout { .. }) {
        return Err(first.into());
    }
    let started = std::time::Instant::now();
    let wait = async {
        let mut delay = Duration::from_millis(500);
        let mut err = first;
        loop {
            let left = config
                .database_wait
                .map(|limit| limit.saturating_sub(started.elapsed()));
            if left == Some(Duration::ZERO) {
                return Err(anyhow::Error::from(err).context(format!(
                    "the database did not answer within --database-wait {}",
                    humantime::format_duration(config.database_wait.unwrap_or_default())
                )));
            }
            let pause = left.map_or(delay, |left| delay.min(left));
            tracing::warn!(
                error = %err,
                retry_in = %humantime::format_duration(pause),
                "the control-plane database does not answer; health is NOT_SERVING until it does"
            );
            tokio::select! {
                () = tokio::time::sleep(pause) => {}
                () = shutdown.cancelled() => return Ok(None),
            }
            delay = (delay * 2).min(Duration::from_secs(30));
            match Db::connect_with(url, options).await {
                Ok(db) => {
                    tracing::info!("the control-plane database answers");
                    return Ok(Some(db));
                }
                Err(next) => err = next,
            }
        }
    };
    grpc::not_serving_until(
        listener,
        services,
        SYNC_DESCRIPTOR_SET,
        &config.security,
        wait,
    )
    .await
    .context("answering health while waiting for the database")?
}

/// Builds the run configuration from `sync-agent serve` arguments, loading the key files.
pub fn config_from_args(args: &config::ServeArgs) -> anyhow::Result<Config> {
    // An agent without a key would claim servers and end every one AUTH_FAILED, in the jobs
    // of every operator: it does not start.
    if args.ssh.ssh_keys.is_empty() {
        anyhow::bail!(
            "no --ssh-key given (FLEETSYNC_SSH_KEYS): this agent could log in to no server, and \
             every sync it took would end AUTH_FAILED. Give the private key(s) whose public half \
             is in the servers' ~/.ssh/authorized_keys"
        );
    }
    let keys = ssh::ClientKeys::load(&args.ssh.ssh_keys)?;
    tracing::info!(keys = ?keys.fingerprints(), "loaded ssh keys");
    let security = grpc::Security::from_args(&args.security, args.listen)?;
    // The metrics endpoint has no token: beyond loopback it needs the same explicit opt-in as
    // an unauthenticated gRPC port.
    if let Some(addr) = args.metrics_listen
        && !addr.ip().is_loopback()
        && !args.security.allow_unauthenticated
    {
        anyhow::bail!(
            "refusing to serve metrics on {addr}, beyond loopback: the endpoint has no \
             authentication. Listen on loopback (e.g. 127.0.0.1:9464, behind a proxy), or pass \
             --allow-unauthenticated"
        );
    }
    // Shorter than these, an interval would busy-loop or a lease expire before its renewal.
    let minimums = [
        ("lease-ttl", args.lease_ttl, Duration::from_secs(1)),
        (
            "poll-interval",
            args.poll_interval,
            Duration::from_millis(10),
        ),
        (
            "outbox-interval",
            args.outbox_interval,
            Duration::from_millis(100),
        ),
        (
            "probe-interval",
            args.probe_interval,
            Duration::from_millis(10),
        ),
        ("backoff-base", args.backoff_base, Duration::from_millis(1)),
        ("retention", args.retention, Duration::from_secs(60)),
    ];
    for (flag, value, min) in minimums {
        let value: Duration = value.into();
        anyhow::ensure!(
            value >= min,
            "--{flag} {} is too short: at least {}",
            humantime::format_duration(value),
            humantime::format_duration(min)
        );
    }
    Ok(Config {
        db_pool_size: args.db_pool_size,
        metrics_listen: args.metrics_listen,
        metrics_interval: args.metrics_interval.into(),
        max_checks: args.max_checks,
        database_wait: args.database_wait.map(Into::into),
        max_streams: args.max_streams,
        security,
        database_url: args.common.database_url.clone(),
        shutdown_grace: args.shutdown.shutdown_grace.into(),
        drain_delay: args.shutdown.drain_delay.into(),
        ssh: SshClient::new(args.ssh.timeouts(), args.ssh.output_cap, keys),
        runner: RunnerConfig {
            concurrency: args.concurrency.max(1),
            in_flight: args.in_flight,
            lease_ttl: args.lease_ttl.into(),
            poll_interval: args.poll_interval.into(),
            outbox_interval: args.outbox_interval.into(),
            backoff_base: args.backoff_base.into(),
            backoff_max: args.backoff_max.into(),
            probe_interval: args.probe_interval.into(),
            sync_interval: Some(args.sync_interval.into()).filter(|i: &Duration| !i.is_zero()),
            retention: args.retention.into(),
            zone: args.zone.clone(),
            second_opinions: !args.no_second_opinions,
            open_files_cap: None,
        },
    })
}

pub use fleetsync_common::clock::{format_ms, new_id, now_ms, random_u64};
