//! Chaos, for `just chaos` (4,000 servers, `bench/chaos.md`) and its small version in
//! `just test`: one forced job over a mixed fleet (real sshd hosts, silent addresses that never
//! send a banner, refused addresses) on PostgreSQL with three agent processes, while one agent
//! is SIGKILLed and restarted, another SIGSTOPped past its lease and resumed, PostgreSQL
//! restarts, every fleetsync database connection is terminated, and a third agent is rolled
//! with SIGTERM. Then the checks a job's consumers rely on, and the time against the same job
//! without faults.

use std::{
    collections::BTreeSet,
    fmt::Write as _,
    process::Command,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use fleetsync_common::proto::sync::v1::{
    DatabaseService, GetSyncJobRequest, JobState, Outcome, StartSyncRequest, WatchSyncRequest,
    fleet_client::FleetClient, sync_agent_client::SyncAgentClient, sync_event,
};
use tokio_stream::StreamExt;

use crate::{
    AgentProcess, SshFleet, TestDb,
    bench::silent_listener,
    catalog::{add_mariadb_everywhere, count, execute, insert_servers},
    events::watch_resumably,
    services::{ServeProcess, connect, migrate, register_fleet},
};

/// The fleet and how hard the agents are held back (so that the faults land mid-job).
#[derive(Debug, Clone, Copy)]
pub struct Plan {
    /// Real sshd hosts (each answers after a short pause).
    pub hosts: usize,
    /// Addresses that accept TCP and never send a banner (each costs a handshake timeout).
    pub silent: usize,
    /// Addresses that refuse the connection.
    pub refused: usize,
    /// `--in-flight` of each agent.
    pub in_flight: usize,
    /// `--handshake-timeout`, seconds.
    pub handshake_s: u64,
}

impl Plan {
    /// Every server.
    pub fn servers(&self) -> usize {
        self.hosts + self.silent + self.refused
    }
}

/// One check, as printed.
#[derive(Debug, Clone)]
pub struct Check {
    /// What is checked.
    pub name: &'static str,
    /// Whether it held; `None` for a figure that is only reported.
    pub ok: Option<bool>,
    /// What was seen.
    pub seen: String,
}

/// What a chaos run measured.
#[derive(Debug, Clone)]
pub struct Report {
    /// The fleet.
    pub plan: Plan,
    /// The same job without faults, start to summary.
    pub baseline: Duration,
    /// The job under faults, start to summary.
    pub faulted: Duration,
    /// Each fault, with when it struck (since the job started) and the job's progress then.
    pub faults: Vec<(Duration, String, i64)>,
    /// The checks.
    pub checks: Vec<Check>,
}

impl Report {
    /// True if every check held.
    pub fn passed(&self) -> bool {
        self.checks.iter().all(|c| c.ok != Some(false))
    }

    /// The report as markdown: faults, checks, times.
    pub fn markdown(&self) -> String {
        let mut out = String::new();
        let p = &self.plan;
        writeln!(
            out,
            "One forced job of {} servers ({} real sshd hosts, {} silent addresses, {} refused), \
             three agents on PostgreSQL (`--lease-ttl {LEASE_TTL_S}s`, `--in-flight {}`, \
             `--handshake-timeout {}s`).\n",
            p.servers(),
            p.hosts,
            p.silent,
            p.refused,
            p.in_flight,
            p.handshake_s
        )
        .unwrap();
        writeln!(out, "| at | fault | job rows done then |\n|---|---|---|").unwrap();
        for (at, fault, done) in &self.faults {
            writeln!(out, "| {:.1} s | {fault} | {done} |", at.as_secs_f64()).unwrap();
        }
        writeln!(out, "\n| check | result | seen |\n|---|---|---|").unwrap();
        for c in &self.checks {
            let result = match c.ok {
                Some(true) => "ok",
                Some(false) => "FAILED",
                None => "reported",
            };
            writeln!(out, "| {} | {result} | {} |", c.name, c.seen).unwrap();
        }
        writeln!(
            out,
            "\nTime to settle: {:.2} s under faults, {:.2} s without ({:.2}x).",
            self.faulted.as_secs_f64(),
            self.baseline.as_secs_f64(),
            self.faulted.as_secs_f64() / self.baseline.as_secs_f64()
        )
        .unwrap();
        out
    }
}

const LEASE_TTL_S: u64 = 3;

/// A fake `sudo` that reads the query, pauses, and answers as a MariaDB server does.
const SUDO: &str = r#"#!/bin/sh
cat >/dev/null
sleep 0.3
printf '%s\n' '{"version": "10.11", "databases": [{"name": "app", "charset": "utf8mb4", "collation": "utf8mb4_bin"}]}'
"#;

fn agent(db: &TestDb, key: &str, plan: &Plan, dir: &std::path::Path) -> ServeProcess {
    AgentProcess::on(db.url())
        .fleet_defaults()
        .key(key)
        .without("--sync-interval")
        .flag("--lease-ttl", format!("{LEASE_TTL_S}s"))
        .flag("--in-flight", plan.in_flight)
        .flag("--concurrency", (plan.in_flight / 4).max(1))
        .flag("--handshake-timeout", format!("{}s", plan.handshake_s))
        .flag("--shutdown-grace", "2s")
        .start(dir)
}

fn signal(process: &ServeProcess, sig: &str) {
    let sent = Command::new("kill")
        .args([&format!("-{sig}"), &process.pid().to_string()])
        .status()
        .expect("kill");
    assert!(sent.success(), "kill -{sig}");
}

/// Restarts the machine's PostgreSQL cluster (fast shutdown: sessions are cut, transactions
/// rolled back) and waits until it accepts connections again.
fn restart_postgres() {
    let version = std::fs::read_dir("/etc/postgresql")
        .expect("/etc/postgresql")
        .filter_map(|e| e.ok()?.file_name().into_string().ok())
        .max()
        .expect("a PostgreSQL cluster");
    let status = Command::new("pg_ctlcluster")
        .args([
            "--skip-systemctl-redirect",
            &version,
            "main",
            "restart",
            "-m",
            "fast",
        ])
        .status()
        .expect("run pg_ctlcluster");
    assert!(status.success(), "pg_ctlcluster restart: {status}");
}

async fn wait_for_postgres(db: &TestDb) -> fleetsync_common::Db {
    crate::poll_until(
        "PostgreSQL never came back",
        Duration::from_secs(60),
        || async {
            fleetsync_common::Db::connect(db.url())
                .await
                .map_err(|e| e.to_string())
        },
    )
    .await
}

/// The job's rows with an outcome, read over a connection of its own (the faults cut pools).
async fn done_rows(db: &TestDb, job: &str) -> i64 {
    let conn = wait_for_postgres(db).await;
    let n = count(
        &conn,
        &format!(
            "SELECT COUNT(*) FROM sync_job_servers WHERE job_id = '{job}' AND seq IS NOT NULL"
        ),
    )
    .await;
    conn.close().await;
    n
}

/// Starts a forced job of every server on the agent at `addr`; returns its id.
async fn start_job(addr: std::net::SocketAddr, request_id: &str) -> String {
    SyncAgentClient::new(connect(addr).await)
        .start_sync(StartSyncRequest {
            all_servers: true,
            force: true,
            request_id: request_id.into(),
            reason: "chaos".into(),
            ..Default::default()
        })
        .await
        .expect("start")
        .into_inner()
        .job_id
}

/// Runs the plan: the job without faults, then the job under faults, then the checks.
pub async fn run(plan: Plan) -> Report {
    let fleet = SshFleet::start(plan.hosts).await;
    for host in fleet.hosts() {
        host.install_program("sudo", SUDO);
    }
    let (port, silent) = silent_listener().await;
    let dir = tempfile::tempdir().expect("temp dir");
    let db = TestDb::postgres().await;
    migrate(db.url()).await;
    let conn = db.connect().await;
    insert_servers(&conn, plan.refused, 1, |_| "127.0.0.1".into()).await;
    // `insert_servers` names servers from srv-0: renamed, the silent ones can take those names.
    execute(&conn, "UPDATE servers SET name = 'refused-' || id").await;
    insert_servers(&conn, plan.silent, port, |i| {
        format!("127.2.{}.{}", i / 250, i % 250 + 1)
    })
    .await;
    add_mariadb_everywhere(&conn, "10.11").await;
    // The migrations' sync request would be a job of every server at the agents' start.
    execute(&conn, "UPDATE sync_requests SET state = 'taken'").await;
    let key = fleet.client_key().to_str().expect("utf-8").to_owned();
    let mut a = agent(&db, &key, &plan, dir.path());
    let b = agent(&db, &key, &plan, dir.path());
    let mut c = agent(&db, &key, &plan, dir.path());
    let hosts = register_fleet(
        &mut FleetClient::new(connect(a.addr).await),
        &fleet,
        "host-",
        DatabaseService::Mariadb,
    )
    .await;
    let servers = count(&conn, "SELECT COUNT(*) FROM servers").await;
    assert_eq!(servers as usize, plan.servers());
    let within = Duration::from_secs(600);

    // The same job without faults.
    let live = Arc::new(Mutex::new(vec![a.addr, b.addr, c.addr]));
    let started = Instant::now();
    let job = start_job(a.addr, "chaos-baseline").await;
    let (events, _) = watch_resumably(live.clone(), job, within).await;
    let baseline = started.elapsed();
    assert_eq!(events.len(), plan.servers(), "the baseline job is whole");

    // The job under faults.
    let tokens_before = count(
        &conn,
        "SELECT CAST(SUM(token) AS BIGINT) FROM server_leases",
    )
    .await;
    let runs_before = count(&conn, "SELECT COUNT(*) FROM sync_runs").await;
    let started = Instant::now();
    let job = start_job(b.addr, "chaos-faulted").await;
    let watcher = tokio::spawn(watch_resumably(live.clone(), job.clone(), within));
    let mut faults = Vec::new();
    crate::poll_until("the job never started", Duration::from_secs(60), || async {
        match done_rows(&db, &job).await {
            n if n >= (plan.servers() / 20) as i64 => Ok(()),
            n => Err(n.to_string()),
        }
    })
    .await;
    let mut note = |what: String, done: i64| {
        eprintln!(
            "chaos: {:>6.1} s {what} ({done} done)",
            started.elapsed().as_secs_f64()
        );
        faults.push((started.elapsed(), what, done));
    };

    // 1. SIGKILL agent A, and start it again.
    let done = done_rows(&db, &job).await;
    signal(&a, "KILL");
    let _ = a.terminate_wait();
    live.lock().expect("live").retain(|addr| *addr != a.addr);
    a = agent(&db, &key, &plan, dir.path());
    live.lock().expect("live").push(a.addr);
    note("SIGKILL agent A; a new A started".into(), done);

    // 2. SIGSTOP agent B past its lease, then SIGCONT.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let done = done_rows(&db, &job).await;
    signal(&b, "STOP");
    note(format!("SIGSTOP agent B for {} s", LEASE_TTL_S + 1), done);
    tokio::time::sleep(Duration::from_secs(LEASE_TTL_S + 1)).await;
    signal(&b, "CONT");
    note("SIGCONT agent B".into(), done_rows(&db, &job).await);

    // 3. Restart PostgreSQL.
    let done = done_rows(&db, &job).await;
    let restarting = Instant::now();
    tokio::task::spawn_blocking(restart_postgres)
        .await
        .expect("restart");
    wait_for_postgres(&db).await.close().await;
    note(
        format!(
            "PostgreSQL restarted (fast; {:.1} s)",
            restarting.elapsed().as_secs_f64()
        ),
        done,
    );

    // 4. Terminate every fleetsync connection.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let done = done_rows(&db, &job).await;
    let killer = wait_for_postgres(&db).await;
    let terminated = count(
        &killer,
        "SELECT COUNT(*) FROM (SELECT pg_terminate_backend(pid) FROM pg_stat_activity \
         WHERE datname = current_database() AND pid <> pg_backend_pid()) t",
    )
    .await;
    killer.close().await;
    note(
        format!("terminated every fleetsync connection ({terminated})"),
        done,
    );

    // 5. Roll agent C: a new C first, then SIGTERM the old one.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let done = done_rows(&db, &job).await;
    let rolled = agent(&db, &key, &plan, dir.path());
    live.lock().expect("live").push(rolled.addr);
    let status = c.terminate(Duration::from_secs(30));
    live.lock().expect("live").retain(|addr| *addr != c.addr);
    note(format!("rolled agent C (SIGTERM: {status})"), done);
    c = rolled;

    let (events, resumed) = watcher
        .await
        .expect("the watcher saw the job to its summary");
    let faulted = started.elapsed();
    let conn = wait_for_postgres(&db).await;

    // The checks.
    let mut checks = Vec::new();
    let mut check = |name, ok, seen: String| {
        checks.push(Check {
            name,
            ok: Some(ok),
            seen,
        });
    };
    let n = plan.servers() as i64;
    let summary = SyncAgentClient::new(connect(c.addr).await)
        .get_sync_job(GetSyncJobRequest {
            job_id: job.clone(),
            ..Default::default()
        })
        .await
        .expect("GetSyncJob")
        .into_inner()
        .job
        .expect("job");
    check(
        "job done",
        summary.state() == JobState::Done && i64::from(summary.finished) == n,
        format!(
            "{:?}, {} of {}",
            summary.state(),
            summary.finished,
            summary.total
        ),
    );
    let rows = count(
        &conn,
        &format!(
            "SELECT COUNT(DISTINCT seq) FROM sync_job_servers WHERE job_id = '{job}' \
             AND outcome IS NOT NULL AND seq BETWEEN 1 AND {n}"
        ),
    )
    .await;
    check(
        "rows: one outcome per server, seq 1..N",
        rows == n,
        format!("{rows} of {n}"),
    );
    let cursors: Vec<u64> = events.iter().map(|(cursor, ..)| *cursor).collect();
    let again = reread(c.addr, &job).await;
    check(
        "cursors 1..N then the summary at N+1 (live, resumed, and read again)",
        cursors == (1..=n as u64).collect::<Vec<_>>() && again == n as u64 + 1,
        format!(
            "{} outcomes live ({resumed} resumes); read again: summary at {again}",
            cursors.len()
        ),
    );
    let distinct: BTreeSet<i64> = events.iter().map(|(_, id, ..)| *id).collect();
    check(
        "each server once",
        distinct.len() as i64 == n,
        format!("{} servers of {n}", distinct.len()),
    );
    let healthy: BTreeSet<i64> = hosts.iter().copied().collect();
    let ok = events
        .iter()
        .filter(|(_, id, outcome, _)| healthy.contains(id) && *outcome == Outcome::Ok)
        .count();
    check(
        "healthy hosts OK",
        ok == hosts.len(),
        format!("{ok} of {}", hosts.len()),
    );
    let recorded = count(&conn, "SELECT COUNT(*) FROM sync_runs").await - runs_before;
    check(
        "each server's run recorded once",
        recorded == n,
        format!("{recorded} runs recorded for {n} servers"),
    );
    let claims = count(
        &conn,
        "SELECT CAST(SUM(token) AS BIGINT) FROM server_leases",
    )
    .await
        - tokens_before;
    checks.push(Check {
        name: "runs redone (claims past one per server: work the faults cut short)",
        ok: None,
        seen: format!("{}", claims - n),
    });
    silent.abort();
    drop((a, b, c));
    Report {
        plan,
        baseline,
        faulted,
        faults,
        checks,
    }
}

/// Reads a job's stream again from the start; returns the summary's cursor (after checking the
/// outcomes run 1..N).
async fn reread(addr: std::net::SocketAddr, job: &str) -> u64 {
    let mut stream = SyncAgentClient::new(connect(addr).await)
        .watch_sync(WatchSyncRequest {
            job_id: job.to_owned(),
            cursor: 0,
        })
        .await
        .expect("watch")
        .into_inner();
    let mut next = 1;
    while let Some(event) = stream.next().await {
        let event = event.expect("event");
        if event.cursor != next {
            return 0;
        }
        next += 1;
        if let Some(sync_event::Event::Summary(_)) = event.event {
            return event.cursor;
        }
    }
    0
}
