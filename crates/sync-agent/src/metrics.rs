//! The agent's Prometheus metrics, served as plain HTTP `GET /metrics` on `--metrics-listen`
//! (OpenMetrics text). Counters and histograms are updated where things happen (a run
//! recorded, a stage passed, a call answered); the fleet's state (jobs, waiting servers,
//! reachability, the outbox) is read from the database at each scrape, so every agent reports
//! the same fleet-wide numbers and `sum()` over agents is wrong for those: use `max()`.

use std::{fmt, net::SocketAddr, sync::Arc, time::Duration};

use anyhow::Context;
use fleetsync_common::{
    Db,
    calls::{CallSink, code_name},
    pool::ACQUIRE_WAIT,
};
use prometheus_client::{
    collector::Collector,
    encoding::{DescriptorEncoder, EncodeLabelSet, NoLabelSet},
    metrics::{
        MetricType,
        counter::Counter,
        family::Family,
        gauge::Gauge,
        histogram::{Histogram, exponential_buckets},
    },
    registry::{Registry, Unit},
};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::{
    model::{AgentState, Cause, JobState, Outcome, Reachability},
    ssh::StageTimes,
    store::Store,
};

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct SyncLabels {
    outcome: &'static str,
    cause: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct StageLabels {
    stage: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ResultLabels {
    result: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct CallLabels {
    service: String,
    method: String,
    code: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct StateLabels {
    state: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ReachabilityLabels {
    reachability: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct PoolLabels {
    pool: &'static str,
    state: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct PoolNameLabels {
    pool: &'static str,
}

type StageHistograms = Family<StageLabels, Histogram, fn() -> Histogram>;

fn stage_histogram() -> Histogram {
    // 0.5 ms to 16 s.
    Histogram::new(exponential_buckets(0.000_5, 2.0, 16))
}

/// Every metric of one agent. Cheap to share (`Arc`); updating one is a few atomic operations.
/// This agent's own work is counted where it happens; the fleet's state is [`FleetGauges`].
pub struct Metrics {
    registry: Registry,
    syncs: Family<SyncLabels, Counter>,
    discarded: Counter,
    stages: StageHistograms,
    probes: Family<ResultLabels, Counter>,
    calls: Family<CallLabels, Counter>,
    runs_in_flight: Gauge,
    leases_held: Gauge,
    /// `fleetsync_agent_state`: 1 for this agent's state (serving, draining...), 0 for others.
    agent_state: Family<StateLabels, Gauge>,
    /// Runs recorded since start, by outcome (in `Outcome::ALL` order), for the registry.
    outcomes: Vec<std::sync::atomic::AtomicU64>,
    fleet: FleetGauges,
}

/// The fleet's state and the database pools, read at a scrape at most once per interval
/// (`--metrics-interval`; the same numbers on every agent).
#[derive(Default)]
struct FleetGauges {
    /// When they were last read; held while a read is under way, so that concurrent scrapes
    /// wait for one read instead of each running its own.
    last_read: tokio::sync::Mutex<Option<std::time::Instant>>,
    /// Read at most this often (`--metrics-interval`).
    interval: std::time::Duration,
    /// `fleetsync_fleet_reads_total`: how often they were read.
    reads: Counter,
    jobs: Family<StateLabels, Gauge>,
    servers_waiting: Gauge,
    servers: Family<ReachabilityLabels, Gauge>,
    outbox_pending: Gauge,
    agents: Family<StateLabels, Gauge>,
    database_up: Gauge,
    pool_connections: Family<PoolLabels, Gauge>,
    pool_max: Family<PoolNameLabels, Gauge>,
}

impl fmt::Debug for Metrics {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Metrics").finish_non_exhaustive()
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    /// Every metric at zero, registered under its name.
    pub fn new() -> Self {
        let mut registry = Registry::default();
        let this = Self {
            syncs: Family::default(),
            discarded: Counter::default(),
            stages: Family::new_with_constructor(stage_histogram),
            probes: Family::default(),
            calls: Family::default(),
            runs_in_flight: Gauge::default(),
            leases_held: Gauge::default(),
            agent_state: Family::default(),
            outcomes: Outcome::ALL.iter().map(|_| Default::default()).collect(),
            fleet: FleetGauges::default(),
            registry: Registry::default(),
        };
        registry.register(
            "fleetsync_syncs",
            "Runs recorded by this agent, by outcome and cause (one run serves every job that waited for its server)",
            this.syncs.clone(),
        );
        registry.register(
            "fleetsync_runs_discarded",
            "Runs whose lease expired before they were recorded or before their command ran (the server is synced again)",
            this.discarded.clone(),
        );
        registry.register_with_unit(
            "fleetsync_ssh_stage",
            "Time each SSH stage took when it succeeded: connect, banner, key_exchange, auth, command",
            Unit::Seconds,
            this.stages.clone(),
        );
        registry.register(
            "fleetsync_probes",
            "Reachability probes of offline servers (TCP connect and banner), by result",
            this.probes.clone(),
        );
        registry.register(
            "fleetsync_grpc_calls",
            "gRPC calls answered, by service, method and status code",
            this.calls.clone(),
        );
        registry.register(
            "fleetsync_runs_in_flight",
            "SSH runs in flight on this agent",
            this.runs_in_flight.clone(),
        );
        registry.register(
            "fleetsync_leases_held",
            "Server leases this agent holds (runs in flight, probes, and runs waiting to be recorded)",
            this.leases_held.clone(),
        );
        registry.register(
            "fleetsync_agent_state",
            "This agent's state in the registry: 1 for the one it is in (serving, draining, quarantined, gone)",
            this.agent_state.clone(),
        );
        this.fleet.register(&mut registry);
        registry.register_collector(Box::new(AcquireWait));
        Self { registry, ..this }
    }

    /// One run recorded with this outcome and cause (`None`: no cause).
    pub fn synced(&self, outcome: Outcome, cause: Option<Cause>) {
        if let Some(i) = Outcome::ALL.iter().position(|o| *o == outcome) {
            self.outcomes[i].fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        }
        self.syncs
            .get_or_create(&SyncLabels {
                outcome: outcome.as_str(),
                cause: cause.map_or("", Cause::as_str),
            })
            .inc();
    }

    /// One run discarded: its lease was lost.
    pub fn discarded(&self) {
        self.discarded.inc();
    }

    /// The stages of a connection that got through authentication.
    pub fn connected(&self, times: StageTimes) {
        for (stage, took) in [
            ("connect", times.connect),
            ("banner", times.banner),
            ("key_exchange", times.key_exchange),
            ("auth", times.auth),
        ] {
            self.stage(stage, took);
        }
    }

    /// A command that ran to its end.
    pub fn command(&self, took: Duration) {
        self.stage("command", took);
    }

    fn stage(&self, stage: &'static str, took: Duration) {
        self.stages
            .get_or_create(&StageLabels { stage })
            .observe(took.as_secs_f64());
    }

    /// One reachability probe, answered or not.
    pub fn probed(&self, online: bool) {
        let result = if online { "online" } else { "offline" };
        self.probes.get_or_create(&ResultLabels { result }).inc();
    }

    /// Runs recorded since start, by outcome (those with none left out).
    pub fn outcomes(&self) -> std::collections::BTreeMap<String, u64> {
        Outcome::ALL
            .iter()
            .zip(&self.outcomes)
            .map(|(o, n)| {
                (
                    o.as_str().to_owned(),
                    n.load(std::sync::atomic::Ordering::Relaxed),
                )
            })
            .filter(|(_, n)| *n > 0)
            .collect()
    }

    /// This agent's state, for `fleetsync_agent_state`.
    pub fn agent_state(&self, state: AgentState) {
        for s in AgentState::ALL {
            self.agent_state
                .get_or_create(&StateLabels { state: s.as_str() })
                .set(i64::from(*s == state));
        }
    }

    /// The gauge of runs in flight.
    pub fn runs_in_flight(&self) -> &Gauge {
        &self.runs_in_flight
    }

    /// The gauge of leases held.
    pub fn leases_held(&self) -> &Gauge {
        &self.leases_held
    }

    /// Where the gRPC layer reports each finished call.
    pub fn call_sink(self: &Arc<Self>) -> CallSink {
        let this = Arc::clone(self);
        Arc::new(move |service, method, code| {
            this.calls
                .get_or_create(&CallLabels {
                    service: service.to_owned(),
                    method: method.to_owned(),
                    code: code_name(code),
                })
                .inc();
        })
    }

    /// The fleet-wide gauges are read at most once per `interval` (zero: at every scrape).
    pub fn with_fleet_interval(mut self, interval: std::time::Duration) -> Self {
        self.fleet.interval = interval;
        self
    }

    /// Reads the fleet's state and the pools (unless read within the fleet interval),
    /// then encodes everything. However often and however many at once scrape, the database
    /// sees at most one read per interval.
    async fn scrape(&self, store: &Store, pools: &[(&'static str, Db)]) -> String {
        {
            let mut last = self.fleet.last_read.lock().await;
            if last.is_none_or(|at| at.elapsed() >= self.fleet.interval) {
                self.fleet.read(store, pools).await;
                self.fleet.reads.inc();
                *last = Some(std::time::Instant::now());
            }
        }
        let mut text = String::with_capacity(16 * 1024);
        prometheus_client::encoding::text::encode(&mut text, &self.registry)
            .expect("writing to a String cannot fail");
        text
    }
}

impl FleetGauges {
    /// Registers every gauge under its name.
    fn register(&self, registry: &mut Registry) {
        registry.register(
            "fleetsync_jobs",
            "Jobs not done, by state (fleet-wide, read at scrape)",
            self.jobs.clone(),
        );
        registry.register(
            "fleetsync_servers_waiting",
            "Servers waiting for a run (fleet-wide, read at scrape)",
            self.servers_waiting.clone(),
        );
        registry.register(
            "fleetsync_servers",
            "Registered servers by reachability (fleet-wide, read at scrape)",
            self.servers.clone(),
        );
        registry.register(
            "fleetsync_outbox_pending",
            "Sync requests recorded by migrations and not yet taken (read at scrape)",
            self.outbox_pending.clone(),
        );
        registry.register(
            "fleetsync_agents",
            "Agents of the registry by state: serving, draining, quarantined, gone (fleet-wide, read at scrape)",
            self.agents.clone(),
        );
        registry.register(
            "fleetsync_database_up",
            "1 if the control-plane database answered the last scrape's queries, else 0",
            self.database_up.clone(),
        );
        registry.register(
            "fleetsync_db_pool_connections",
            "Database connections of each pool (rpc: calls and streams; work: the scheduler), by state",
            self.pool_connections.clone(),
        );
        registry.register(
            "fleetsync_db_pool_max_connections",
            "Most connections each pool may open",
            self.pool_max.clone(),
        );
        registry.register(
            "fleetsync_fleet_reads",
            "Reads of the fleet-wide gauges from the database (at most one per --metrics-interval, whatever the scrape rate)",
            self.reads.clone(),
        );
    }

    /// Reads the fleet's state (at most 5 s; `fleetsync_database_up` 0 if the database does
    /// not answer) and the pools' usage.
    async fn read(&self, store: &Store, pools: &[(&'static str, Db)]) {
        match tokio::time::timeout(Duration::from_secs(5), store.gauges()).await {
            Ok(Ok(gauges)) => {
                self.database_up.set(1);
                // States and reachabilities that have no rows now read 0, not their last value.
                let not_done = [JobState::Pending, JobState::Running];
                for state in not_done {
                    self.jobs.get_or_create(&state_labels(state)).set(0);
                }
                for (state, n) in gauges.jobs {
                    self.jobs.get_or_create(&state_labels(state)).set(n);
                }
                for reachability in Reachability::ALL {
                    self.servers
                        .get_or_create(&reach_labels(*reachability))
                        .set(0);
                }
                for (reachability, n) in gauges.servers {
                    self.servers
                        .get_or_create(&reach_labels(reachability))
                        .set(n);
                }
                self.servers_waiting.set(gauges.servers_waiting);
                self.outbox_pending.set(gauges.outbox_pending);
                for state in AgentState::ALL {
                    self.agents
                        .get_or_create(&StateLabels {
                            state: state.as_str(),
                        })
                        .set(0);
                }
                for (state, n) in gauges.agents {
                    self.agents
                        .get_or_create(&StateLabels {
                            state: state.as_str(),
                        })
                        .set(n);
                }
            }
            Ok(Err(err)) => {
                tracing::debug!(error = %err, "metrics: the database did not answer");
                self.database_up.set(0);
            }
            Err(_) => {
                self.database_up.set(0);
            }
        }
        for (pool, db) in pools {
            let usage = db.usage();
            for (state, n) in [("in_use", usage.in_use()), ("idle", usage.idle)] {
                self.pool_connections
                    .get_or_create(&PoolLabels { pool, state })
                    .set(i64::from(n));
            }
            self.pool_max
                .get_or_create(&PoolNameLabels { pool })
                .set(i64::from(usage.max));
        }
    }
}

fn state_labels(state: JobState) -> StateLabels {
    StateLabels {
        state: state.as_str(),
    }
}

fn reach_labels(reachability: Reachability) -> ReachabilityLabels {
    ReachabilityLabels {
        reachability: reachability.as_str(),
    }
}

/// The process-wide wait for database connections, from `fleetsync_common::pool`.
#[derive(Debug)]
struct AcquireWait;

impl Collector for AcquireWait {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), fmt::Error> {
        let snapshot = ACQUIRE_WAIT.snapshot();
        let mut metric = encoder.encode_descriptor(
            "fleetsync_db_acquire_wait",
            "Time to get a pooled database connection (for a transaction, including its BEGIN), over both pools",
            Some(&Unit::Seconds),
            MetricType::Histogram,
        )?;
        metric.encode_histogram::<NoLabelSet>(snapshot.sum, snapshot.count, &snapshot.buckets, None)
    }
}

/// What the `/metrics` handler reads.
struct Endpoint {
    metrics: Arc<Metrics>,
    store: Store,
    pools: Vec<(&'static str, Db)>,
}

/// Serves `GET /metrics` on `listener` until `stop`.
pub async fn serve(
    listener: TcpListener,
    metrics: Arc<Metrics>,
    store: Store,
    pools: Vec<(&'static str, Db)>,
    stop: CancellationToken,
) -> anyhow::Result<()> {
    use axum::{extract::State, http::header, routing::get};
    let endpoint = Arc::new(Endpoint {
        metrics,
        store,
        pools,
    });
    let app = axum::Router::new()
        .route(
            "/metrics",
            get(|State(endpoint): State<Arc<Endpoint>>| async move {
                let body = endpoint
                    .metrics
                    .scrape(&endpoint.store, &endpoint.pools)
                    .await;
                (
                    [(
                        header::CONTENT_TYPE,
                        "application/openmetrics-text; version=1.0.0; charset=utf-8",
                    )],
                    body,
                )
            }),
        )
        .with_state(endpoint);
    axum::serve(listener, app)
        .with_graceful_shutdown(stop.cancelled_owned())
        .await
        .context("serving metrics")
}

/// Binds the metrics listener (before the agent says it is listening, so a bad address fails
/// the start).
pub async fn bind(addr: SocketAddr) -> anyhow::Result<TcpListener> {
    TcpListener::bind(addr)
        .await
        .with_context(|| format!("cannot listen for metrics on {addr}"))
}
