//! The connection budget of several agents on one PostgreSQL with its default
//! `max_connections` (100): six agents (the real binaries, default pool sizes) run a job while
//! 300 watchers stream it and 3,000 registrations go in 64 at a time; no call fails, every
//! watcher sees the whole stream, and the database never holds more than 6 x 13 connections of
//! theirs.

use std::{
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicI64, AtomicUsize, Ordering},
    },
    time::Duration,
};

use fleetsync_common::Backend;
use fleetsync_common::proto::sync::v1::{
    DatabaseService, ServerSpec, StartSyncRequest, UpsertServerRequest, WatchSyncRequest,
    fleet_client::FleetClient, sync_agent_client::SyncAgentClient, sync_event,
};
use fleetsync_tests::{
    AgentProcess, Scenario, TestDb,
    catalog::{add_mariadb_everywhere, count, insert_servers},
    services::{ServeProcess, connect},
};
use tokio_stream::StreamExt;

const AGENTS: usize = 6;
/// Each agent's connections at most: `--db-pool-size` (6), the work pool (6), `LISTEN` (1).
const PER_AGENT: i64 = 13;
const SERVERS: usize = 5_000;
const WATCHERS: usize = 300;
const REGISTRATIONS: usize = 3_000;
const IN_FLIGHT: usize = 64;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn six_agents_fit_postgresql_default_connections_under_load() {
    let scenario = Scenario::on(Backend::Postgres).agents(0).start().await;
    let (db, dir) = (&scenario.db, scenario.dir());
    let conn = db.connect().await;
    assert_eq!(
        count(
            &conn,
            "SELECT CAST(current_setting('max_connections') AS BIGINT)"
        )
        .await,
        100,
        "this test is about PostgreSQL's default max_connections"
    );
    // Refused addresses: each run ends at once, so the job is all control-plane work.
    insert_servers(&conn, SERVERS, 1, |_| "127.0.0.1".into()).await;
    add_mariadb_everywhere(&conn, "").await;
    let agents: Vec<ServeProcess> = (0..AGENTS)
        .map(|_| {
            AgentProcess::on(db.url())
                .args(&["--poll-interval", "200ms"])
                .start(dir)
        })
        .collect();
    let mut channels = Vec::new();
    for agent in &agents {
        channels.push(connect(agent.addr).await);
    }

    // The database's connections of this test's database, sampled throughout.
    let peak = Arc::new(AtomicI64::new(0));
    let sampling = Arc::new(AtomicBool::new(true));
    let sampler = {
        let (peak, sampling) = (peak.clone(), sampling.clone());
        let admin = fleetsync_common::Db::connect(&fleetsync_tests::db::postgres_admin_url())
            .await
            .expect("admin database");
        // A connection of its own, opened before the load: it must not queue for one.
        let mut admin = fleetsync_common::sql::Conn::open(&admin)
            .await
            .expect("admin connection");
        let name = db.name().to_owned();
        tokio::spawn(async move {
            while sampling.load(Ordering::Relaxed) {
                let now = admin
                    .fetch(
                        "SELECT COUNT(*) FROM pg_stat_activity WHERE datname = ?",
                        &[name.as_str().into()],
                    )
                    .await
                    .expect("pg_stat_activity")[0]
                    .int(0)
                    .expect("a count");
                peak.fetch_max(now, Ordering::Relaxed);
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        })
    };

    let job = SyncAgentClient::new(channels[0].clone())
        .start_sync(StartSyncRequest {
            all_servers: true,
            force: true,
            ..Default::default()
        })
        .await
        .expect("start the job")
        .into_inner();
    let total = u64::from(job.server_count);
    assert_eq!(total, SERVERS as u64);

    let failures = Arc::new(std::sync::Mutex::new(Vec::<String>::new()));
    let watchers: Vec<_> = (0..WATCHERS)
        .map(|i| {
            let mut client = SyncAgentClient::new(channels[i % AGENTS].clone());
            let (job_id, failures) = (job.job_id.clone(), failures.clone());
            tokio::spawn(async move {
                let mut stream = match client
                    .watch_sync(WatchSyncRequest { job_id, cursor: 0 })
                    .await
                {
                    Ok(stream) => stream.into_inner(),
                    Err(status) => {
                        failures
                            .lock()
                            .unwrap()
                            .push(format!("watch {i}: {status}"));
                        return;
                    }
                };
                let mut expected = 1;
                while let Some(event) = stream.next().await {
                    match event {
                        Ok(event) => {
                            if event.cursor != expected {
                                failures.lock().unwrap().push(format!(
                                    "watcher {i}: cursor {} where {expected} was due",
                                    event.cursor
                                ));
                                return;
                            }
                            expected += 1;
                            if matches!(event.event, Some(sync_event::Event::Summary(_))) {
                                break;
                            }
                        }
                        Err(status) => {
                            failures
                                .lock()
                                .unwrap()
                                .push(format!("watcher {i}: {status}"));
                            return;
                        }
                    }
                }
                if expected != total + 2 {
                    failures
                        .lock()
                        .unwrap()
                        .push(format!("watcher {i}: ended at cursor {}", expected - 1));
                }
            })
        })
        .collect();
    let next = Arc::new(AtomicUsize::new(0));
    let registrars: Vec<_> = (0..IN_FLIGHT)
        .map(|w| {
            let mut client = FleetClient::new(channels[w % AGENTS].clone());
            let (next, failures) = (next.clone(), failures.clone());
            tokio::spawn(async move {
                loop {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    if i >= REGISTRATIONS {
                        return;
                    }
                    let registered = client
                        .upsert_server(UpsertServerRequest {
                            id: 0,
                            spec: Some(ServerSpec {
                                name: format!("late-{i}"),
                                ip: "127.0.0.1".into(),
                                port: 1,
                                database_service: DatabaseService::Mariadb as i32,
                                ..Default::default()
                            }),
                        })
                        .await;
                    if let Err(status) = registered {
                        failures
                            .lock()
                            .unwrap()
                            .push(format!("registration {i}: {status}"));
                    }
                }
            })
        })
        .collect();
    for task in watchers.into_iter().chain(registrars) {
        tokio::time::timeout(Duration::from_secs(120), task)
            .await
            .expect("within two minutes")
            .expect("task");
    }
    sampling.store(false, Ordering::Relaxed);
    sampler.await.expect("sampler");

    let failures = std::mem::take(&mut *failures.lock().unwrap());
    assert!(
        failures.is_empty(),
        "{} failures, the first: {:?}",
        failures.len(),
        &failures[..failures.len().min(5)]
    );
    assert_eq!(
        count(&conn, "SELECT COUNT(*) FROM servers").await,
        (SERVERS + REGISTRATIONS) as i64
    );
    let peak = peak.load(Ordering::Relaxed);
    // The test's own connections (its pool and the sampler's) come on top of the agents'.
    assert!(
        peak <= AGENTS as i64 * PER_AGENT + 8,
        "{peak} connections at the peak"
    );
    eprintln!(
        "peak connections: {peak} (six agents may hold {})",
        AGENTS as i64 * PER_AGENT
    );
}

#[tokio::test]
async fn a_database_that_refuses_connections_is_unavailable_and_says_why() {
    let db = TestDb::postgres().await;
    let admin = fleetsync_common::Db::connect(&fleetsync_tests::db::postgres_admin_url())
        .await
        .expect("admin database");
    // Superusers pass connection limits: a role of the test's own, allowed one connection.
    let role = format!("{}_one", db.name());
    admin
        .execute(
            &format!("CREATE ROLE \"{role}\" LOGIN CONNECTION LIMIT 1"),
            &[],
        )
        .await
        .expect("a role with one connection");
    let url = db.url().replacen("://postgres@", &format!("://{role}@"), 1);
    assert_ne!(
        url,
        db.url(),
        "the test database's URL names the postgres user"
    );
    let pool = fleetsync_common::Db::connect_with(
        &url,
        fleetsync_common::db::DbOptions {
            connect_timeout: Duration::from_secs(1),
            pool_size: 4,
            ..Default::default()
        },
    )
    .await
    .expect("the first connection is allowed");
    // The one connection the role may have, held by a transaction.
    let held = pool.begin().await.expect("a transaction");
    let err = pool
        .fetch("SELECT CAST(1 AS BIGINT)", &[])
        .await
        .expect_err("no second connection");
    assert_eq!(
        fleetsync_common::sql::classify(&err),
        fleetsync_common::sql::Failure::Unavailable,
        "{err}"
    );
    let status = tonic::Status::from(fleetsync_common::ServiceError::from(err));
    assert_eq!(status.code(), tonic::Code::Unavailable, "{status:?}");
    assert!(
        status.message().contains("too many connections"),
        "the reason, not only a timeout: {status:?}"
    );
    held.rollback().await.expect("rollback");
    pool.close().await;
    admin
        .execute(&format!("DROP ROLE \"{role}\""), &[])
        .await
        .expect("drop the role");
}
