//! History at scale, for `just bench-scale`: a control plane filled by bulk SQL with finished
//! jobs (100 servers each) and runs, 10% of them past the retention, and the calls that must
//! stay flat as that history grows, timed against a real agent. Each call does the same work at
//! every size (a full page, a server with the same runs laid out alike): only the history
//! around it grows.

use std::{net::SocketAddr, time::Instant};

use fleetsync_common::{
    Backend, Db,
    proto::sync::v1::{
        DeleteServerRequest, GetServerRequest, ListJobsRequest, WatchSyncRequest,
        fleet_client::FleetClient, sync_agent_client::SyncAgentClient,
    },
};
use fleetsync_sync_agent::{model::Scopes, store::Store};
use tokio_stream::StreamExt;

use crate::{
    bench::median,
    catalog::{add_mariadb_everywhere, analyze, count, execute, insert_servers},
};

/// Servers in the filled control plane.
pub const SERVERS: usize = 1_000;
/// Servers of each job: the first is always [`HOT`], the others the next 99 of a rotation
/// over the rest.
const JOB_SIZE: usize = 100;
/// The server (offset from the first) that is in every job: `ListJobs` filtered by it.
const HOT: usize = SERVERS - 1;
/// Servers `measure` deletes (at most; offsets 0..), each with [`RUNS_OF_DELETED`] runs, the
/// newest runs, interleaved among them, at every size. The other runs rotate over the others.
const DELETED: usize = 9;
/// Runs of each server `DeleteServer` is timed on, whatever the size.
const RUNS_OF_DELETED: usize = 1_000;
/// Rows inserted per statement (each statement stays well inside the statement timeout).
const CHUNK: usize = 100_000;
const DAY_MS: i64 = 86_400_000;

/// What one filled control plane measured: medians in milliseconds.
#[derive(Debug, Clone)]
pub struct HistoryFigures {
    /// Job rows stored (and as many runs).
    pub rows: usize,
    /// Runs of each server deleted by `DeleteServer`.
    pub runs_per_server: i64,
    /// Runs past the retention when the passes started.
    pub runs_due: i64,
    /// One retention pass (`Store::prune`, one batch of each kind).
    pub retention: f64,
    /// `Fleet/DeleteServer`.
    pub delete_server: f64,
    /// `ListJobs`, a page of 100.
    pub list_jobs: f64,
    /// `ListJobs` filtered by a server, a page of 100.
    pub list_jobs_by_server: f64,
    /// `Fleet/GetServer`.
    pub get_server: f64,
    /// `WatchSync` of a finished job resumed at its middle (cursor 50), read to its summary.
    pub watch_resume: f64,
}

/// `1..=n` as a subquery `s` with one column `i`.
fn series(backend: Backend, n: usize) -> String {
    match backend {
        Backend::Postgres => format!("(SELECT generate_series(1, {n}) AS i) s"),
        Backend::MySql => format!("(SELECT seq AS i FROM seq_1_to_{n}) s"),
        Backend::Sqlite => format!(
            "(WITH RECURSIVE c(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM c WHERE i < {n}) \
             SELECT i FROM c) s"
        ),
    }
}

fn concat(backend: Backend, prefix: &str, expr: &str) -> String {
    match backend {
        Backend::MySql => format!("CONCAT('{prefix}', {expr})"),
        _ => format!("('{prefix}' || ({expr}))"),
    }
}

fn div(backend: Backend, expr: &str, by: usize) -> String {
    match backend {
        Backend::MySql => format!("(({expr}) DIV {by})"),
        _ => format!("(({expr}) / {by})"),
    }
}

/// Fills a freshly migrated database: [`SERVERS`] servers with a MariaDB service, `rows / 100`
/// finished jobs of 100 servers (their rows filled, counts kept), `rows` runs spread evenly
/// over the servers not deleted, the oldest tenth (at least 12,000) 30 days old and the rest an
/// hour old, and the deleted servers' runs, newest. Returns the clock the times were set from
/// (ms).
pub async fn fill(conn: &Db, rows: usize) -> i64 {
    let backend = conn.backend();
    insert_servers(conn, SERVERS, 1, |_| "127.0.0.1".into()).await;
    add_mariadb_everywhere(conn, "10.11").await;
    let first = count(conn, "SELECT MIN(id) FROM servers").await;
    let now = fleetsync_common::clock::now_ms();
    let recent = now - 3_600_000;
    let old = now - 30 * DAY_MS;
    let jobs = rows / JOB_SIZE;
    let scopes = Scopes::ALL.to_string();
    let id = concat(backend, "h", "i");
    execute(
        conn,
        &format!(
            "INSERT INTO sync_jobs (id, request_id, origin, state, scopes, force_offline, reason, \
             total, finished, created_at, finished_at, selection, outcome_counts) \
             SELECT {id}, {id}, 'rpc', 'done', '{scopes}', 0, '', {JOB_SIZE}, {JOB_SIZE}, \
             {recent} + i * 1000, {recent} + i * 1000 + 500, 'all', '{{\"OK\":{JOB_SIZE}}}' \
             FROM {}",
            series(backend, jobs)
        ),
    )
    .await;
    for start in (0..rows).step_by(CHUNK) {
        let n = CHUNK.min(rows - start);
        let at = format!("(i + {start} - 1)");
        let job = concat(
            backend,
            "h",
            &format!("{} + 1", div(backend, &at, JOB_SIZE)),
        );
        let server = format!(
            "(CASE WHEN {at} % {JOB_SIZE} = 0 THEN {HOT} ELSE ({at} - {}) % {HOT} END)",
            div(backend, &at, JOB_SIZE)
        );
        let name = concat(backend, "srv-", &server);
        execute(
            conn,
            &format!(
                "INSERT INTO sync_job_servers (job_id, server_id, server_name, seq, outcome, \
                 message, duration_ms, finished_at) \
                 SELECT {job}, {first} + {server}, {name}, {at} % {JOB_SIZE} + 1, 'OK', \
                 '', 1, {recent} FROM {}",
                series(backend, n)
            ),
        )
        .await;
        // A tenth of the history, and at least six retention batches' worth at any size.
        let due = (rows / 10).max(12_000).min(rows);
        execute(
            conn,
            &format!(
                "INSERT INTO sync_runs (server_id, lease_token, holder, scopes, started_at, \
                 finished_at, outcome, message, duration_ms) \
                 SELECT {first} + {DELETED} + {at} % {}, 1, 'bench', '{scopes}', \
                 CASE WHEN {at} < {due} THEN {old} ELSE {recent} END + {at}, \
                 CASE WHEN {at} < {due} THEN {old} ELSE {recent} END + {at}, 'OK', '', 1 FROM {}",
                SERVERS - DELETED,
                series(backend, n)
            ),
        )
        .await;
    }
    // The servers `measure` deletes: 1,000 runs each, the newest, interleaved, at every size.
    let newest = recent + rows as i64;
    execute(
        conn,
        &format!(
            "INSERT INTO sync_runs (server_id, lease_token, holder, scopes, started_at, \
             finished_at, outcome, message, duration_ms) \
             SELECT {first} + i % {DELETED}, 1, 'bench', '{scopes}', {newest} + i, \
             {newest} + i, 'OK', '', 1 FROM {}",
            series(backend, DELETED * RUNS_OF_DELETED)
        ),
    )
    .await;
    // The migrations' sync request would be a job of every server at the agent's start.
    execute(conn, "UPDATE sync_requests SET state = 'taken'").await;
    analyze(conn).await;
    if backend == Backend::Sqlite {
        // As the history measured so far: the filled tables analyzed.
        execute(conn, "ANALYZE").await;
    }
    now
}

/// One round of the reads a panel makes, timed (ms): a `ListJobs` page of 100, the same
/// filtered by `server`, and `GetServer` of `get`; with the pages' lengths.
#[derive(Debug, Clone, Copy)]
pub struct PanelReads {
    pub list_jobs: f64,
    pub jobs: usize,
    pub list_jobs_by_server: f64,
    pub jobs_of_server: usize,
    pub get_server: f64,
}

pub async fn panel_reads(
    sync: &mut SyncAgentClient<tonic::transport::Channel>,
    fleet: &mut FleetClient<tonic::transport::Channel>,
    server: i64,
    get: i64,
) -> PanelReads {
    let ms = |started: Instant| started.elapsed().as_secs_f64() * 1000.0;
    let list_jobs = |server_id: i64| {
        let mut sync = sync.clone();
        async move {
            let started = Instant::now();
            let page = sync
                .list_jobs(ListJobsRequest {
                    server_id,
                    page_size: 100,
                    ..Default::default()
                })
                .await
                .expect("list jobs")
                .into_inner();
            (ms(started), page.jobs.len())
        }
    };
    let (list_jobs_ms, jobs) = list_jobs(0).await;
    let (by_server_ms, jobs_of_server) = list_jobs(server).await;
    let started = Instant::now();
    fleet
        .get_server(GetServerRequest { id: get })
        .await
        .expect("get server");
    PanelReads {
        list_jobs: list_jobs_ms,
        jobs,
        list_jobs_by_server: by_server_ms,
        jobs_of_server,
        get_server: ms(started),
    }
}

/// Times the calls over a filled control plane served by the agent at `agent`; `samples`
/// repeats each (the median is kept).
pub async fn measure(
    conn: &Db,
    agent: SocketAddr,
    rows: usize,
    now: i64,
    samples: usize,
) -> HistoryFigures {
    let url = format!("http://{agent}");
    let mut sync = SyncAgentClient::connect(url.clone())
        .await
        .expect("connect")
        .max_decoding_message_size(64 << 20);
    let mut fleet = FleetClient::connect(url).await.expect("connect");
    let first = count(conn, "SELECT MIN(id) FROM servers").await;
    let ms = |started: Instant| started.elapsed().as_secs_f64() * 1000.0;

    let mut list = Vec::new();
    let mut by_server = Vec::new();
    let mut get = Vec::new();
    let mut watch = Vec::new();
    let newest = format!("h{}", rows / JOB_SIZE);
    let hot = first + HOT as i64;
    for i in 0..samples {
        let panel = panel_reads(&mut sync, &mut fleet, hot, first + 500 + i as i64).await;
        assert_eq!(panel.jobs, 100);
        assert_eq!(panel.jobs_of_server, 100);
        list.push(panel.list_jobs);
        by_server.push(panel.list_jobs_by_server);
        get.push(panel.get_server);
        let started = Instant::now();
        let mut stream = sync
            .watch_sync(WatchSyncRequest {
                job_id: newest.clone(),
                cursor: 50,
            })
            .await
            .expect("watch")
            .into_inner();
        let mut events = 0;
        while let Some(event) = stream.next().await {
            event.expect("event");
            events += 1;
        }
        watch.push(ms(started));
        assert_eq!(
            events,
            JOB_SIZE - 50 + 1,
            "the rest of the job and its summary"
        );
    }

    let runs_per_server = count(
        conn,
        &format!("SELECT COUNT(*) FROM sync_runs WHERE server_id = {first}"),
    )
    .await;
    let mut delete = Vec::new();
    for i in 0..samples.min(DELETED) {
        let started = Instant::now();
        fleet
            .delete_server(DeleteServerRequest {
                id: first + i as i64,
            })
            .await
            .expect("delete server");
        delete.push(ms(started));
    }

    let cutoff = now - 7 * DAY_MS;
    let runs_due = count(
        conn,
        &format!("SELECT COUNT(*) FROM sync_runs WHERE finished_at < {cutoff}"),
    )
    .await;
    let store = Store::new(conn.clone());
    let mut retention = Vec::new();
    for _ in 0..samples {
        let started = Instant::now();
        let pruned = store.prune(cutoff, 1).await.expect("prune");
        retention.push(ms(started));
        assert!(pruned.runs > 0, "a batch of runs was due: {pruned:?}");
    }
    HistoryFigures {
        rows,
        runs_per_server,
        runs_due,
        retention: median(retention),
        delete_server: median(delete),
        list_jobs: median(list),
        list_jobs_by_server: median(by_server),
        get_server: median(get),
        watch_resume: median(watch),
    }
}
