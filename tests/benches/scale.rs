//! `just bench-scale`: the control plane's work path at fleet scale. Agents are the real release
//! binaries, the databases the machine's real SQLite, PostgreSQL and MariaDB.
//!
//! - refused servers (127.0.0.1:1: the connect fails at once, so the time is all control-plane
//!   work), one agent, 1,000 / 10,000 / 100,000 servers on each backend (`BENCH_SIZES`, e.g.
//!   `100000,1000000`), with the agent's and the database server's CPU per server; at 10,000
//!   and more, reading at that size after the jobs: a second watcher resuming at the middle of
//!   the last job, `ListServers` pages, `GetServer`, `ListJobs`;
//! - 10,000 refused servers on PostgreSQL and MariaDB with 1 and 3 agents (`BENCH_THREE_SIZES`
//!   for other sizes with 3);
//! - a latency-bound fleet: 3,000 addresses that accept TCP and never send a banner (one
//!   listener on the wildcard address serves 127.1.x.y), `--handshake-timeout 1s`, fixed
//!   concurrency per agent, 1 and 3 agents: where agents, not the database, are the limit;
//! - SSH attempts in flight: 10,000 silent addresses dialed at once by one agent
//!   (`--in-flight 10000`), its peak RSS;
//! - offline at size (`BENCH_OFFLINE_SIZES`, default 100,000): a job of servers all offline in
//!   backoff (each SKIPPED_OFFLINE), then probes of all of them once due;
//! - the second opinion's cost: 10,000 servers on PostgreSQL, 3 agents, 10% of them down
//!   (refused, or silent), with and without `--no-second-opinions`;
//! - registration: 10,000 `Fleet/UpsertServer` calls with 64 in flight, per backend;
//! - import: `sync-agent servers import` of a JSON-lines file of 100,000 and 1,000,000 servers
//!   (`BENCH_IMPORT_SIZES`) into an empty control plane, then the same file again (every server
//!   unchanged), per backend, the real CLI against one agent;
//! - history: 10,000, 100,000 and 1,000,000 job rows and runs stored (`BENCH_HISTORY_SIZES`), per
//!   backend: a retention pass, `DeleteServer`, `ListJobs` (also by server), `GetServer` and a
//!   `WatchSync` resume, each the median of `BENCH_RUNS` (at least 5).
//!
//! Each figure is the median of `BENCH_RUNS` (default 3) jobs: `StartSync` of every server with
//! `force`, watched to the summary. Prints a markdown table and writes it to `bench/scale.md`
//! with the machine's description. `BENCH_SIZES=1000,10000` limits the refused sizes.

use std::{
    fmt::Write as _,
    net::SocketAddr,
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
    time::Instant,
};

use fleetsync_common::{
    Backend,
    proto::sync::v1::{
        DatabaseService, ListServersRequest, ServerSpec, StartSyncRequest, UpsertServerRequest,
        WatchSyncRequest, fleet_client::FleetClient, sync_agent_client::SyncAgentClient,
        sync_event,
    },
};
use fleetsync_tests::{
    AgentProcess, TestDb,
    bench::{
        cpu_seconds, database_cpu_seconds, machine, median, peak_rss_mib, runs, silent_listener,
    },
    catalog::{add_mariadb_everywhere, analyze, count, execute, insert_servers},
    db::ALL_BACKENDS,
    history::{HistoryFigures, panel_reads},
    services::{ServeProcess, migrate},
};
use tokio_stream::StreamExt;

fn sizes() -> Vec<usize> {
    env_sizes("BENCH_SIZES", &[1_000, 10_000, 100_000])
}

/// Which parts to run (`BENCH_ONLY=refused,three,silent,flight,offline,second,registration,import,history`); all by default. A
/// partial run prints its table and leaves `bench/scale.md` alone.
fn only() -> Option<Vec<String>> {
    std::env::var("BENCH_ONLY")
        .ok()
        .map(|s| s.split(',').map(|p| p.trim().to_owned()).collect())
}

fn wanted(part: &str) -> bool {
    only().is_none_or(|parts| parts.iter().any(|p| p == part))
}

/// Which backends to run (`BENCH_BACKENDS=mysql,postgres`); all by default. A run that leaves
/// one out is partial, like `BENCH_ONLY`.
fn backend_wanted(backend: &Backend) -> bool {
    std::env::var("BENCH_BACKENDS")
        .ok()
        .is_none_or(|s| s.split(',').any(|b| b.trim() == backend.as_str()))
}

/// Inserts `n` servers (bulk SQL: registration is measured on its own) with a MariaDB service,
/// at `addr(i)`:`port`.
async fn insert_fleet(db: &TestDb, n: usize, port: u16, addr: impl Fn(usize) -> String) {
    let conn = db.connect().await;
    insert_servers(&conn, n, port, addr).await;
    add_mariadb_everywhere(&conn, "10.11").await;
    analyze(&conn).await;
    // The migrations' sync request would make a job of every server at the agents' start,
    // served by the measured job's runs as well: the job measured is the only one.
    execute(&conn, "UPDATE sync_requests SET state = 'taken'").await;
    conn.close().await;
}

struct Agents {
    procs: Vec<ServeProcess>,
    _dir: tempfile::TempDir,
}

impl Agents {
    fn start(db: &TestDb, n: usize, extra: &[&str]) -> Self {
        let dir = tempfile::tempdir().expect("temp dir");
        let agent = AgentProcess::on(db.url())
            .flag("--sync-interval", "0s")
            .flag("--probe-interval", "1h")
            .flag("--backoff-base", "1h")
            .args(extra);
        let procs = (0..n).map(|_| agent.start(dir.path())).collect();
        Self { procs, _dir: dir }
    }

    fn cpu(&self) -> f64 {
        self.procs.iter().map(|p| cpu_seconds(p.pid())).sum()
    }

    fn peak_rss(&self) -> f64 {
        self.procs
            .iter()
            .map(|p| peak_rss_mib(p.pid()))
            .fold(0.0, f64::max)
    }

    fn addr(&self) -> SocketAddr {
        self.procs[0].addr
    }
}

/// Starts a job and opens its stream from the first event.
async fn start_watched(
    client: &mut SyncAgentClient<tonic::transport::Channel>,
    request: StartSyncRequest,
) -> (
    fleetsync_common::proto::sync::v1::StartSyncResponse,
    tonic::Streaming<fleetsync_common::proto::sync::v1::SyncEvent>,
) {
    let job = client
        .start_sync(request)
        .await
        .expect("start")
        .into_inner();
    let stream = client
        .watch_sync(WatchSyncRequest {
            job_id: job.job_id.clone(),
            cursor: 0,
        })
        .await
        .expect("watch")
        .into_inner();
    (job, stream)
}

/// `1000,10000` in the environment variable `var`, else `default`.
fn env_sizes(var: &str, default: &[usize]) -> Vec<usize> {
    std::env::var(var)
        .ok()
        .map(|s| s.split(',').filter_map(|n| n.trim().parse().ok()).collect())
        .unwrap_or_else(|| default.to_vec())
}

/// One job of one server on every agent: connections opened, code paths warm.
async fn warm_up(agents: &Agents) {
    for agent in &agents.procs {
        let mut client = SyncAgentClient::connect(format!("http://{}", agent.addr))
            .await
            .expect("connect");
        let (_, mut stream) = start_watched(
            &mut client,
            StartSyncRequest {
                server_ids: vec![1],
                force: true,
                ..Default::default()
            },
        )
        .await;
        while stream.next().await.is_some() {}
    }
}

/// One job of every server, forced, watched to its summary (every cursor, in order, once):
/// (seconds, agent CPU seconds, database server CPU seconds, the job's id).
async fn one_job(agents: &Agents, backend: Backend, servers: usize) -> (f64, f64, f64, String) {
    let mut client = SyncAgentClient::connect(format!("http://{}", agents.addr()))
        .await
        .expect("connect")
        .max_decoding_message_size(64 << 20);
    let cpu_before = agents.cpu();
    let db_before = database_cpu_seconds(backend);
    let started = Instant::now();
    let (job, mut stream) = start_watched(
        &mut client,
        StartSyncRequest {
            all_servers: true,
            force: true,
            reason: "bench".into(),
            ..Default::default()
        },
    )
    .await;
    assert_eq!(job.server_count as usize, servers);
    let mut outcomes = 0;
    let mut summary = None;
    while let Some(event) = stream.next().await {
        let event = event.expect("event");
        assert_eq!(
            event.cursor,
            outcomes as u64 + 1,
            "cursors in order, each once"
        );
        match event.event {
            Some(sync_event::Event::Outcome(_)) => outcomes += 1,
            Some(sync_event::Event::Summary(s)) => summary = Some(s),
            None => {}
        }
    }
    let elapsed = started.elapsed().as_secs_f64();
    let summary = summary.expect("summary");
    assert_eq!(outcomes, servers, "one outcome per server");
    assert_eq!(summary.finished as usize, servers);
    (
        elapsed,
        agents.cpu() - cpu_before,
        database_cpu_seconds(backend) - db_before,
        job.job_id,
    )
}

/// Reading at fleet size, after the jobs: a second watcher of the last job resuming at its
/// middle, and the pages an operator's panel reads (medians of 5 calls, ms).
#[derive(Debug, Clone)]
struct Reads {
    /// Outcomes per second of a `WatchSync` resumed at cursor N/2, read to its summary.
    resume_rate: f64,
    list_servers: f64,
    /// The page after server N - 200 (a token deep in the fleet).
    list_servers_deep: f64,
    /// The first page of the servers with a reachability none has (every server is offline
    /// after a refused job: those online).
    list_servers_none: f64,
    get_server: f64,
    list_jobs: f64,
    list_jobs_by_server: f64,
}

async fn reads(agents: &Agents, job_id: &str, servers: usize) -> Reads {
    let url = format!("http://{}", agents.addr());
    let mut sync = SyncAgentClient::connect(url.clone())
        .await
        .expect("connect")
        .max_decoding_message_size(64 << 20);
    let mut fleet = FleetClient::connect(url).await.expect("connect");
    let half = servers as u64 / 2;
    let started = Instant::now();
    let mut stream = sync
        .watch_sync(WatchSyncRequest {
            job_id: job_id.to_owned(),
            cursor: half,
        })
        .await
        .expect("watch")
        .into_inner();
    let mut next = half + 1;
    while let Some(event) = stream.next().await {
        assert_eq!(
            event.expect("event").cursor,
            next,
            "resumed in cursor order"
        );
        next += 1;
    }
    assert_eq!(
        next,
        servers as u64 + 2,
        "the rest of the job and its summary"
    );
    let resume_rate = (servers as u64 - half) as f64 / started.elapsed().as_secs_f64();
    let ms = |started: Instant| started.elapsed().as_secs_f64() * 1000.0;
    let (mut list, mut deep, mut none, mut get, mut jobs, mut by_server) = (
        Vec::new(),
        Vec::new(),
        Vec::new(),
        Vec::new(),
        Vec::new(),
        Vec::new(),
    );
    for i in 0..5 {
        // A page of 100 after `page_token` (empty: the first), timed.
        let page_after = |page_token: String| {
            let mut fleet = fleet.clone();
            async move {
                let started = Instant::now();
                let page = fleet
                    .list_servers(ListServersRequest {
                        page_size: 100,
                        page_token,
                        ..Default::default()
                    })
                    .await
                    .expect("list servers")
                    .into_inner();
                assert_eq!(page.servers.len(), 100);
                ms(started)
            }
        };
        list.push(page_after(String::new()).await);
        deep.push(page_after((servers - 200).to_string()).await);
        let started = Instant::now();
        let online = fleet
            .list_servers(ListServersRequest {
                reachability: fleetsync_common::proto::sync::v1::Reachability::Online as i32,
                page_size: 100,
                ..Default::default()
            })
            .await
            .expect("list online servers")
            .into_inner();
        none.push(ms(started));
        assert!(online.servers.is_empty(), "every server is offline");
        let panel = panel_reads(
            &mut sync,
            &mut fleet,
            (servers / 2) as i64,
            (servers / 2 + i) as i64,
        )
        .await;
        assert!(panel.jobs > 0 && panel.jobs_of_server > 0);
        get.push(panel.get_server);
        jobs.push(panel.list_jobs);
        by_server.push(panel.list_jobs_by_server);
    }
    Reads {
        resume_rate,
        list_servers: median(list),
        list_servers_deep: median(deep),
        list_servers_none: median(none),
        get_server: median(get),
        list_jobs: median(jobs),
        list_jobs_by_server: median(by_server),
    }
}

#[derive(Debug)]
struct Row {
    scenario: String,
    backend: Backend,
    agents: usize,
    servers: usize,
    seconds: f64,
    cpu: f64,
    db_cpu: f64,
    rss: f64,
    /// Reading at size (refused fleets, one agent).
    reads: Option<Reads>,
}

impl Row {
    fn rate(&self) -> f64 {
        self.servers as f64 / self.seconds
    }
    fn cpu_per_server_us(&self) -> f64 {
        self.cpu / self.servers as f64 * 1e6
    }
    fn db_cpu_per_server_us(&self) -> f64 {
        self.db_cpu / self.servers as f64 * 1e6
    }
}

async fn job_scenario(
    scenario: &str,
    backend: Backend,
    servers: usize,
    agents: usize,
    port: u16,
    addr: impl Fn(usize) -> String,
    extra: &[&str],
) -> Row {
    let db = TestDb::create(backend).await;
    migrate(db.url()).await;
    insert_fleet(&db, servers, port, addr).await;
    measure(scenario, &db, servers, agents, extra).await
}

/// The median job of `servers` on `agents` agents started on `db` (its fleet in place).
async fn measure(
    scenario: &str,
    db: &TestDb,
    servers: usize,
    agents: usize,
    extra: &[&str],
) -> Row {
    let backend = db.backend();
    let running = Agents::start(db, agents, extra);
    warm_up(&running).await;
    let mut seconds = Vec::new();
    let mut cpu = Vec::new();
    let mut db_cpu = Vec::new();
    let mut last_job = String::new();
    for _ in 0..runs() {
        let (s, c, d, job) = one_job(&running, backend, servers).await;
        seconds.push(s);
        cpu.push(c);
        db_cpu.push(d);
        last_job = job;
    }
    let reads = if scenario == "refused" && agents == 1 && servers >= 10_000 {
        Some(reads(&running, &last_job, servers).await)
    } else {
        None
    };
    // `BENCH_AGENT_LOG=DIR`: each agent's log, to see where a run spent its time.
    if let Some(dir) = std::env::var_os("BENCH_AGENT_LOG") {
        for (i, agent) in running.procs.iter().enumerate() {
            let path = std::path::Path::new(&dir).join(format!(
                "{scenario}-{}-{servers}-{agents}-{i}.log",
                backend.as_str()
            ));
            std::fs::write(&path, agent.log()).expect("write the agent's log");
        }
    }
    let row = Row {
        scenario: scenario.into(),
        backend,
        agents,
        servers,
        seconds: median(seconds),
        cpu: median(cpu),
        db_cpu: median(db_cpu),
        rss: running.peak_rss(),
        reads,
    };
    eprintln!(
        "{:<16} {:<8} agents={} servers={:>6}: {:>7.2} s, {:>8.0}/s, {:>6.1} µs CPU/server, {:>6.1} µs database CPU/server, {:>6.1} MiB",
        row.scenario,
        row.backend.as_str(),
        row.agents,
        row.servers,
        row.seconds,
        row.rate(),
        row.cpu_per_server_us(),
        row.db_cpu_per_server_us(),
        row.rss
    );
    if let Some(reads) = &row.reads {
        eprintln!("  reading at size: {reads:?}");
    }
    row
}

/// 1000000 as "1,000,000".
fn thousands(n: usize) -> String {
    let digits = n.to_string();
    let mut out = String::new();
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}

/// 10,000 registrations, 64 in flight: (calls per second, errors).
async fn registration(backend: Backend) -> (f64, usize) {
    const CALLS: usize = 10_000;
    let db = TestDb::create(backend).await;
    migrate(db.url()).await;
    let agents = Agents::start(&db, 1, &[]);
    let client = FleetClient::connect(format!("http://{}", agents.addr()))
        .await
        .expect("connect");
    let next = Arc::new(AtomicUsize::new(0));
    let errors = Arc::new(AtomicUsize::new(0));
    let started = Instant::now();
    let workers: Vec<_> = (0..64)
        .map(|_| {
            let (mut client, next, errors) = (client.clone(), next.clone(), errors.clone());
            tokio::spawn(async move {
                loop {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    if i >= CALLS {
                        return;
                    }
                    let result = client
                        .upsert_server(UpsertServerRequest {
                            id: 0,
                            spec: Some(ServerSpec {
                                name: format!("reg-{i}"),
                                ip: "127.0.0.1".into(),
                                port: 1,
                                ssh_user: "vito".into(),
                                database_service: DatabaseService::Mariadb as i32,
                                ..Default::default()
                            }),
                        })
                        .await;
                    if let Err(status) = result
                        && errors.fetch_add(1, Ordering::Relaxed) < 3
                    {
                        eprintln!("registration error: {status}");
                    }
                }
            })
        })
        .collect();
    for worker in workers {
        worker.await.expect("worker");
    }
    let rate = CALLS as f64 / started.elapsed().as_secs_f64();
    (rate, errors.load(Ordering::Relaxed))
}

fn import_sizes() -> Vec<usize> {
    env_sizes("BENCH_IMPORT_SIZES", &[100_000, 1_000_000])
}

/// A JSON-lines file of `n` servers, as a panel would export them.
fn import_file(dir: &std::path::Path, n: usize) -> std::path::PathBuf {
    use std::io::Write as _;
    let path = dir.join(format!("fleet-{n}.jsonl"));
    let mut file = std::io::BufWriter::new(std::fs::File::create(&path).expect("create"));
    for i in 0..n {
        writeln!(
            file,
            r#"{{"name": "srv-{i:07}", "ip": "10.{}.{}.{}", "databaseService": "DATABASE_SERVICE_MARIADB", "databaseVersion": "10.11"}}"#,
            i >> 16,
            (i >> 8) & 255,
            i & 255
        )
        .expect("write");
    }
    file.flush().expect("flush");
    path
}

/// An import's medians: seconds into an empty control plane, seconds of the same file again,
/// and the agent's CPU per server of the first.
#[derive(Debug, Clone, Copy)]
struct ImportFigures {
    backend: Backend,
    servers: usize,
    create: f64,
    again: f64,
    cpu_us: f64,
}

/// `sync-agent servers import` of `file` (`n` servers): `BENCH_RUNS` times into a fresh
/// database, then again.
async fn import(backend: Backend, n: usize, file: &std::path::Path) -> ImportFigures {
    let run = |url: String, expect: &'static str| {
        let file = file.to_owned();
        tokio::task::spawn_blocking(move || {
            let started = Instant::now();
            let output =
                std::process::Command::new(fleetsync_tests::process::bin_path("sync-agent"))
                    .args(["servers", "import"])
                    .arg(&file)
                    .args(["--agent-url", &url, "-o", "json", "--timeout", "5m"])
                    .output()
                    .expect("run the import");
            let seconds = started.elapsed().as_secs_f64();
            let report = fleetsync_tests::process::json_document(&output);
            assert_eq!(report[expect].as_u64(), Some(n as u64), "{report}");
            seconds
        })
    };
    let (mut create, mut again, mut cpu) = (Vec::new(), Vec::new(), Vec::new());
    for _ in 0..runs() {
        let db = TestDb::create(backend).await;
        migrate(db.url()).await;
        let agents = Agents::start(&db, 1, &[]);
        let url = format!("http://{}", agents.addr());
        let before = agents.cpu();
        create.push(run(url.clone(), "created").await.expect("import"));
        cpu.push((agents.cpu() - before) / n as f64 * 1e6);
        again.push(run(url, "unchanged").await.expect("import again"));
    }
    let figures = ImportFigures {
        backend,
        servers: n,
        create: median(create),
        again: median(again),
        cpu_us: median(cpu),
    };
    eprintln!(
        "import {:<8} {n:>9}: {:.2} s ({:.0}/s), again {:.2} s ({:.0}/s), agent {:.1} µs/server",
        backend.as_str(),
        figures.create,
        n as f64 / figures.create,
        figures.again,
        n as f64 / figures.again,
        figures.cpu_us
    );
    figures
}

fn history_sizes() -> Vec<usize> {
    env_sizes("BENCH_HISTORY_SIZES", &[10_000, 100_000, 1_000_000])
}

/// A control plane with `rows` job rows and runs of history, served by one agent.
async fn history(backend: Backend, rows: usize) -> HistoryFigures {
    let db = TestDb::create(backend).await;
    migrate(db.url()).await;
    let conn = db.connect().await;
    let started = Instant::now();
    let now = fleetsync_tests::history::fill(&conn, rows).await;
    eprintln!(
        "history {:<8} {rows:>9} rows: filled in {:.1} s",
        backend.as_str(),
        started.elapsed().as_secs_f64()
    );
    // The agent's own retention must not prune what the bench measures.
    let agents = Agents::start(&db, 1, &["--retention", "3650d"]);
    let figures =
        fleetsync_tests::history::measure(&conn, agents.addr(), rows, now, runs().max(5)).await;
    eprintln!(
        "history {:<8} {rows:>9} rows: {figures:?}",
        backend.as_str()
    );
    conn.close().await;
    figures
}

fn offline_sizes() -> Vec<usize> {
    env_sizes("BENCH_OFFLINE_SIZES", &[100_000])
}

/// Offline at size: (µs per SKIPPED_OFFLINE, probes per second).
#[derive(Debug, Clone, Copy)]
struct Offline {
    backend: Backend,
    servers: usize,
    /// From `StartSync` to the job done (every skip stored).
    settled_us: f64,
    /// From `StartSync` to the watcher's summary (every skip also read back).
    skipped_us: f64,
    probes_per_s: f64,
}

/// `servers` refused servers, every one offline in backoff: a job of all of them (not forced)
/// records SKIPPED_OFFLINE for each, which is its whole cost; then every backoff is made due
/// and one agent probing every second (`--probe-interval 1s`) probes them all (a refused
/// connect each): probes per second from the first probe recorded to the last.
async fn offline_at_size(backend: Backend, servers: usize) -> Offline {
    let db = TestDb::create(backend).await;
    migrate(db.url()).await;
    insert_fleet(&db, servers, 1, |_| "127.0.0.1".into()).await;
    let conn = db.connect().await;
    let day_later = fleetsync_common::clock::now_ms() + 86_400_000;
    execute(
        &conn,
        &format!(
            "UPDATE servers SET reachability = 'offline', consecutive_failures = 3, \
             next_probe_at = {day_later}"
        ),
    )
    .await;
    analyze(&conn).await;
    let agents = Agents::start(&db, 1, &[]);
    warm_up(&agents).await;
    let mut client = SyncAgentClient::connect(format!("http://{}", agents.addr()))
        .await
        .expect("connect")
        .max_decoding_message_size(64 << 20);
    let started = Instant::now();
    let (job, mut stream) = start_watched(
        &mut client,
        StartSyncRequest {
            all_servers: true,
            reason: "offline".into(),
            ..Default::default()
        },
    )
    .await;
    // Settled: the job is done (polled; a job of skips alone is done when made).
    loop {
        let state = client
            .get_sync_job(fleetsync_common::proto::sync::v1::GetSyncJobRequest {
                job_id: job.job_id.clone(),
                ..Default::default()
            })
            .await
            .expect("get job")
            .into_inner()
            .job
            .expect("job")
            .state();
        if state == fleetsync_common::proto::sync::v1::JobState::Done {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(5)).await;
    }
    let settled_us = started.elapsed().as_secs_f64() * 1e6 / servers as f64;
    let mut skipped = 0;
    while let Some(event) = stream.next().await {
        if let Some(sync_event::Event::Outcome(o)) = event.expect("event").event {
            assert_eq!(
                o.outcome,
                fleetsync_common::proto::sync::v1::Outcome::SkippedOffline as i32,
                "every server is in its backoff"
            );
            skipped += 1;
        }
    }
    let skipped_us = started.elapsed().as_secs_f64() * 1e6 / skipped as f64;
    assert_eq!(skipped, servers);
    drop(agents);
    // Every backoff due: an agent probing every second probes them all.
    execute(&conn, "UPDATE servers SET next_probe_at = 0").await;
    let dir = tempfile::tempdir().expect("temp dir");
    let prober = AgentProcess::on(db.url())
        .flag("--sync-interval", "0s")
        .flag("--probe-interval", "1s")
        .flag("--backoff-base", "1h")
        .start(dir.path());
    let probed = "SELECT COUNT(*) FROM servers WHERE next_probe_at > 0";
    fleetsync_tests::catalog::wait_for_count(
        &conn,
        probed,
        |n| n > 0,
        std::time::Duration::from_secs(60),
        "no probe was recorded",
    )
    .await;
    let first = Instant::now();
    let from = count(&conn, probed).await;
    fleetsync_tests::catalog::wait_for_count(
        &conn,
        probed,
        |n| n == servers as i64,
        std::time::Duration::from_secs(1200),
        "the probes never ended",
    )
    .await;
    let probes_per_s = (servers as i64 - from) as f64 / first.elapsed().as_secs_f64();
    drop(prober);
    conn.close().await;
    let figures = Offline {
        backend,
        servers,
        settled_us,
        skipped_us,
        probes_per_s,
    };
    eprintln!("offline at size: {figures:?}");
    figures
}

#[tokio::main]
async fn main() {
    // The silent listener holds a socket per attempt, as the agent does.
    fleetsync_sync_agent::limits::raise_open_files().expect("open-file limit");
    let runs = runs();
    let mut table = String::new();
    let mut rows = Vec::new();

    // 1. Refused servers, one agent, every backend and size.
    for backend in ALL_BACKENDS
        .into_iter()
        .filter(|b| wanted("refused") && backend_wanted(b))
    {
        for &n in &sizes() {
            rows.push(job_scenario("refused", backend, n, 1, 1, |_| "127.0.0.1".into(), &[]).await);
        }
    }
    // 2. Refused servers, 3 agents (1 agent is in the rows above): 10,000, or
    // `BENCH_THREE_SIZES`.
    let three_sizes = env_sizes("BENCH_THREE_SIZES", &[10_000]);
    for backend in [Backend::Postgres, Backend::MySql]
        .into_iter()
        .filter(|b| wanted("three") && backend_wanted(b))
    {
        for &n in &three_sizes {
            rows.push(job_scenario("refused", backend, n, 3, 1, |_| "127.0.0.1".into(), &[]).await);
        }
    }
    // 3. Latency-bound: 3,000 silent addresses, 1 and 3 agents.
    let (port, listener) = silent_listener().await;
    let silent = |i: usize| format!("127.1.{}.{}", i / 250, i % 250 + 1);
    // `--in-flight 200`: each agent keeps as many runs in flight as it has slots, so one agent
    // is the limit this scenario measures (with the default, 4x the slots, one agent already
    // dials 800 silent hosts at once and the 2-core machine becomes the limit, not the agent).
    let latency_flags = [
        "--handshake-timeout",
        "1s",
        "--concurrency",
        "200",
        "--in-flight",
        "200",
    ];
    let mut latency = Vec::new();
    for backend in [Backend::Postgres, Backend::MySql]
        .into_iter()
        .filter(|b| wanted("silent") && backend_wanted(b))
    {
        for agents in [1, 3] {
            latency.push(
                job_scenario(
                    "silent (1 s)",
                    backend,
                    3_000,
                    agents,
                    port,
                    silent,
                    &latency_flags,
                )
                .await,
            );
        }
    }
    // 3b. SSH attempts in flight: one agent dials 10,000 silent addresses at once
    // (`--in-flight 10000`), each waiting out a 1 s handshake timeout.
    if wanted("flight") && backend_wanted(&Backend::Postgres) {
        latency.push(
            job_scenario(
                "silent (1 s), 10,000 in flight",
                Backend::Postgres,
                10_000,
                1,
                port,
                silent,
                &[
                    "--handshake-timeout",
                    "1s",
                    "--concurrency",
                    "200",
                    "--in-flight",
                    "10000",
                ],
            )
            .await,
        );
    }
    // 4. The second opinion's cost: 10,000 servers on PostgreSQL, three agents, 1,000 of them
    // down (refused, or silent past a 1 s handshake timeout) and 9,000 up without a database
    // service (never dialed: all their cost is the control plane's), with second opinions and
    // without (`--no-second-opinions`).
    let mut offline = Vec::new();
    for backend in ALL_BACKENDS
        .into_iter()
        .filter(|b| wanted("offline") && backend_wanted(b))
    {
        for &n in &offline_sizes() {
            offline.push(offline_at_size(backend, n).await);
        }
    }
    let mut second = Vec::new();
    if wanted("second") && backend_wanted(&Backend::Postgres) {
        for (down, port, addr) in [
            (
                "refused",
                1,
                (|_| "127.0.0.1".to_owned()) as fn(usize) -> String,
            ),
            ("silent (1 s)", port, silent),
        ] {
            for (label, flag) in [("with", None), ("without", Some("--no-second-opinions"))] {
                let db = TestDb::create(Backend::Postgres).await;
                migrate(db.url()).await;
                insert_fleet(&db, 10_000, port, addr).await;
                let conn = db.connect().await;
                execute(&conn, "DELETE FROM services WHERE server_id > 1000").await;
                conn.close().await;
                let mut flags = vec!["--handshake-timeout", "1s"];
                flags.extend(flag);
                let scenario = format!("10% {down}, {label} second opinions");
                second.push(measure(&scenario, &db, 10_000, 3, &flags).await);
            }
        }
    }
    listener.abort();
    // 5. Registration.
    let mut registrations = Vec::new();
    for backend in ALL_BACKENDS
        .into_iter()
        .filter(|b| wanted("registration") && backend_wanted(b))
    {
        let (rate, errors) = registration(backend).await;
        eprintln!(
            "registration {:<8}: {rate:>7.0} calls/s, {errors} errors",
            backend.as_str()
        );
        registrations.push((backend, rate, errors));
    }

    // 6. Import.
    let mut imports = Vec::new();
    if wanted("import") {
        let dir = tempfile::tempdir().expect("temp dir");
        for &n in &import_sizes() {
            let file = import_file(dir.path(), n);
            for backend in ALL_BACKENDS.into_iter().filter(backend_wanted) {
                imports.push(import(backend, n, &file).await);
            }
        }
    }

    // 7. History.
    let mut histories = Vec::new();
    for backend in ALL_BACKENDS
        .into_iter()
        .filter(|b| wanted("history") && backend_wanted(b))
    {
        for &rows in &history_sizes() {
            histories.push((backend, history(backend, rows).await));
        }
    }

    writeln!(table, "# `just bench-scale`\n").unwrap();
    writeln!(table, "Machine: {}.\n", machine()).unwrap();
    writeln!(
        table,
        "Each job: `StartSync` of every server with `force`, watched over `WatchSync` to the \
         summary; median of {runs} jobs. Agent CPU is user + system of every agent process; peak \
         RSS is the largest agent's `VmHWM`. Database CPU is user + system of the database \
         server's processes (PostgreSQL's backends and their postmaster, MariaDB's one \
         process; SQLite runs inside the agent). Servers are inserted with SQL (registration \
         through the API is measured separately below).\n"
    )
    .unwrap();
    writeln!(table, "| fleet | backend | agents | servers | time to settle | servers/s | agent CPU per server | database CPU per server | agent peak RSS |").unwrap();
    writeln!(table, "|---|---|---|---|---|---|---|---|---|").unwrap();
    for row in rows.iter().chain(&latency) {
        writeln!(
            table,
            "| {} | {} | {} | {} | {:.2} s | {:.0} | {:.0} µs | {} | {:.0} MiB |",
            row.scenario,
            row.backend.as_str(),
            row.agents,
            row.servers,
            row.seconds,
            row.rate(),
            row.cpu_per_server_us(),
            if row.backend == Backend::Sqlite {
                "in the agent's".to_owned()
            } else {
                format!("{:.0} µs", row.db_cpu_per_server_us())
            },
            row.rss
        )
        .unwrap();
    }
    writeln!(table, "\nRatios:\n").unwrap();
    let find = |scenario: &str, backend: Backend, agents: usize, servers: usize| {
        rows.iter().chain(&latency).find(|r| {
            r.scenario == scenario
                && r.backend == backend
                && r.agents == agents
                && r.servers == servers
        })
    };
    for backend in [Backend::Postgres, Backend::MySql] {
        if let (Some(one), Some(three)) = (
            find("refused", backend, 1, 10_000),
            find("refused", backend, 3, 10_000),
        ) {
            writeln!(
                table,
                "- refused, 10,000 servers, {}: 3 agents take {:.2}x the time of 1 (target ≤ 1.1)",
                backend.as_str(),
                three.seconds / one.seconds
            )
            .unwrap();
        }
        if let (Some(one), Some(three)) = (
            find("silent (1 s)", backend, 1, 3_000),
            find("silent (1 s)", backend, 3, 3_000),
        ) {
            writeln!(
                table,
                "- silent fleet, 3,000 addresses, {}: 3 agents reach {:.2}x the throughput of 1 (target ≥ 2.7)",
                backend.as_str(),
                three.rate() / one.rate()
            )
            .unwrap();
        }
    }
    for backend in ALL_BACKENDS {
        for (small, large, target) in [
            (10_000, 100_000, 1.3),
            (
                100_000,
                1_000_000,
                if backend == Backend::Postgres {
                    1.2
                } else {
                    1.3
                },
            ),
        ] {
            if let (Some(small), Some(large)) = (
                find("refused", backend, 1, small),
                find("refused", backend, 1, large),
            ) {
                writeln!(
                    table,
                    "- refused, {}: time per server at {} is {:.2}x that at {} (target ≤ {target})",
                    backend.as_str(),
                    thousands(large.servers),
                    (large.seconds / large.servers as f64) / (small.seconds / small.servers as f64),
                    thousands(small.servers),
                )
                .unwrap();
            }
        }
    }
    let read_rows: Vec<(&Row, &Reads)> = rows
        .iter()
        .filter_map(|r| r.reads.as_ref().map(|reads| (r, reads)))
        .collect();
    if !read_rows.is_empty() {
        writeln!(
            table,
            "\nReading at size, after the jobs above (refused fleets, one agent): a second watcher \
             of the last job resumes at its middle (cursor N/2) and reads to the summary, every \
             cursor in order; then the pages a panel reads, medians of 5 calls (ListServers also \
             filtered by a reachability no server has: every server is offline after a refused \
             job, the page of those online is empty). Targets: pages \
             under 50 ms with 1,000,000 servers stored.\n"
        )
        .unwrap();
        writeln!(
            table,
            "| backend | servers | WatchSync resumed at N/2 | ListServers (first page) | ListServers (page at N - 200) | ListServers online (none is) | GetServer | ListJobs | ListJobs by server |\n|---|---|---|---|---|---|---|---|---|"
        )
        .unwrap();
        for (row, r) in read_rows {
            writeln!(
                table,
                "| {} | {} | {:.0} outcomes/s | {:.1} ms | {:.1} ms | {:.1} ms | {:.1} ms | {:.1} ms | {:.1} ms |",
                row.backend.as_str(),
                row.servers,
                r.resume_rate,
                r.list_servers,
                r.list_servers_deep,
                r.list_servers_none,
                r.get_server,
                r.list_jobs,
                r.list_jobs_by_server
            )
            .unwrap();
        }
    }
    writeln!(
        table,
        "\nRegistration: 10,000 `Fleet/UpsertServer` calls, 64 in flight, one agent:\n"
    )
    .unwrap();
    writeln!(table, "| backend | calls/s | errors |\n|---|---|---|").unwrap();
    for (backend, rate, errors) in &registrations {
        writeln!(table, "| {} | {rate:.0} | {errors} |", backend.as_str()).unwrap();
    }
    if !offline.is_empty() {
        writeln!(
            table,
            "\nOffline at size: refused servers, every one offline in backoff; a job of all of \
             them (not forced) records SKIPPED_OFFLINE for each: per server, the time from \
             `StartSync` to the job done, and to the watcher's summary (every outcome read back \
             as well); then every backoff made due and one agent probing every second (a refused \
             connect each): probes recorded per second. Targets: ≤ 20 µs per SKIPPED_OFFLINE, \
             ≥ 5,000 probes/s.\n\n| backend | servers | per SKIPPED_OFFLINE, to settle | \
             to the watcher's summary | probes/s |\n|---|---|---|---|---|"
        )
        .unwrap();
        for o in &offline {
            writeln!(
                table,
                "| {} | {} | {:.1} µs | {:.1} µs | {:.0} |",
                o.backend.as_str(),
                o.servers,
                o.settled_us,
                o.skipped_us,
                o.probes_per_s
            )
            .unwrap();
        }
    }
    if !second.is_empty() {
        write_second_opinions(&mut table, &second);
    }
    if !imports.is_empty() {
        write_imports(&mut table, &imports);
    }
    if !histories.is_empty() {
        write_history(&mut table, &histories);
    }
    print!("{table}");
    if only().is_some() || std::env::var_os("BENCH_BACKENDS").is_some() {
        eprintln!("partial run (BENCH_ONLY, BENCH_BACKENDS): bench/scale.md left as it was");
        return;
    }
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../bench/scale.md");
    std::fs::write(&path, &table).expect("write bench/scale.md");
    eprintln!("wrote {}", path.display());
}

/// What the second opinion costs: each pair of rows (with, without) and the difference per
/// server that is down.
fn write_second_opinions(table: &mut String, rows: &[Row]) {
    writeln!(
        table,
        "\nSecond opinions: 10,000 servers on PostgreSQL, three agents, 1,000 of them down \
         (refused, or accepting TCP but silent past a 1 s handshake timeout) and 9,000 up without \
         a database service (never dialed: their cost is the control plane's); with second \
         opinions (the default: each failure of a down server is handed to a peer, which tries \
         once more and records it) and without (`--no-second-opinions`); median of {} jobs:\n",
        runs()
    )
    .unwrap();
    writeln!(
        table,
        "| fleet | time to settle | agent CPU per server | agent peak RSS |\n|---|---|---|---|"
    )
    .unwrap();
    for row in rows {
        writeln!(
            table,
            "| {} | {:.2} s | {:.0} µs | {:.0} MiB |",
            row.scenario,
            row.seconds,
            row.cpu_per_server_us(),
            row.rss
        )
        .unwrap();
    }
    writeln!(table).unwrap();
    for pair in rows.chunks(2) {
        if let [with, without] = pair {
            writeln!(
                table,
                "- {}: the second opinion costs {:+.2} s of wall time ({:.2}x) and {:+.0} µs of \
                 agent CPU per down server",
                with.scenario.trim_end_matches(", with second opinions"),
                with.seconds - without.seconds,
                with.seconds / without.seconds,
                (with.cpu - without.cpu) / 1_000.0 * 1e6
            )
            .unwrap();
        }
    }
}

/// The import table, with the targets (PostgreSQL ≥ 50,000 servers/s, SQLite and MariaDB ≥
/// 20,000/s).
fn write_imports(table: &mut String, imports: &[ImportFigures]) {
    writeln!(
        table,
        "\nImport: `sync-agent servers import FILE` (JSON lines, the default 1,000 servers per \
         call and 4 calls in flight) into an empty control plane, then the same file again \
         (every server unchanged); the CLI, one agent and the database share the machine; \
         median of {} runs:\n",
        runs()
    )
    .unwrap();
    writeln!(
        table,
        "| backend | servers | import | servers/s | target | again | servers/s | agent CPU per server |\n|---|---|---|---|---|---|---|---|"
    )
    .unwrap();
    for f in imports {
        let target = match f.backend {
            Backend::Postgres => 50_000,
            _ => 20_000,
        };
        writeln!(
            table,
            "| {} | {} | {:.2} s | {:.0} | ≥ {target} | {:.2} s | {:.0} | {:.1} µs |",
            f.backend.as_str(),
            f.servers,
            f.create,
            f.servers as f64 / f.create,
            f.again,
            f.servers as f64 / f.again,
            f.cpu_us
        )
        .unwrap();
    }
}

/// The history table: each call's median at each size, and the largest size against the
/// smallest (targets: under 100 ms, within 1.5x).
fn write_history(table: &mut String, histories: &[(Backend, HistoryFigures)]) {
    writeln!(
        table,
        "\nHistory: finished jobs of 100 servers each (as many job rows as runs) over 1,000 \
         servers, a tenth of the runs past the retention; one agent; medians of at least 5 \
         calls, in ms. Each call does the same work at every size; only the history around it \
         grows. Retention: one pass (`Store::prune`, one batch: up to 2,000 runs, the oldest, \
         of every server). DeleteServer: a server with its runs (the count shown; the newest \
         runs, interleaved with 8 other such servers', at every size). ListJobs: a page of 100, \
         also filtered by a server that is in every job. WatchSync: a finished job resumed at \
         cursor 50, read to its summary. Targets: each under 100 ms, and within 1.5x of the \
         same at 10,000 rows.\n"
    )
    .unwrap();
    writeln!(table, "| backend | job rows + runs | retention pass (runs due) | DeleteServer (its runs) | ListJobs | ListJobs by server | GetServer | WatchSync resume |").unwrap();
    writeln!(table, "|---|---|---|---|---|---|---|---|").unwrap();
    let cells = |f: &HistoryFigures| {
        [
            f.retention,
            f.delete_server,
            f.list_jobs,
            f.list_jobs_by_server,
            f.get_server,
            f.watch_resume,
        ]
    };
    for (backend, f) in histories {
        let c = cells(f);
        writeln!(
            table,
            "| {} | {} | {:.1} ({}) | {:.1} ({}) | {:.1} | {:.1} | {:.1} | {:.1} |",
            backend.as_str(),
            f.rows,
            c[0],
            f.runs_due,
            c[1],
            f.runs_per_server,
            c[2],
            c[3],
            c[4],
            c[5]
        )
        .unwrap();
    }
    for backend in ALL_BACKENDS {
        let of: Vec<&HistoryFigures> = histories
            .iter()
            .filter(|(b, _)| *b == backend)
            .map(|(_, f)| f)
            .collect();
        let Some(large) = of.iter().max_by_key(|f| f.rows) else {
            continue;
        };
        for small in of.iter().filter(|f| f.rows < large.rows) {
            let ratios: Vec<String> = cells(large)
                .iter()
                .zip(cells(small))
                .map(|(l, s)| format!("{:.2}x", l / s))
                .collect();
            writeln!(
                table,
                "| {} | {} vs {} | {} |",
                backend.as_str(),
                large.rows,
                small.rows,
                ratios.join(" | ")
            )
            .unwrap();
        }
    }
}
