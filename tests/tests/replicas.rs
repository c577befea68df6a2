//! Several agents side by side on one PostgreSQL control plane: work divided by leases, every
//! server synced once per job, watches served by any agent, and a killed agent's servers taken
//! over when its leases expire.

use std::time::{Duration, Instant};

use fleetsync_common::Backend;
use fleetsync_common::proto::sync::v1::{
    DatabaseService, Outcome, StartSyncRequest, WatchSyncRequest, fleet_client::FleetClient,
    sync_agent_client::SyncAgentClient, sync_event,
};
use fleetsync_tests::{
    AgentProcess, Scenario, TestDb,
    catalog::{count, wait_for_count},
    fleet::SSH_USER,
    services::{ServeProcess, connect, register_server},
};
use tokio_stream::StreamExt;

fn agent(db: &TestDb, key: &str, dir: &std::path::Path) -> ServeProcess {
    AgentProcess::on(db.url())
        .key(key)
        .flag("--lease-ttl", "3s")
        .flag("--poll-interval", "100ms")
        .flag("--sync-interval", "0s")
        .flag("--concurrency", 4)
        // Claim four at a time, so that both agents get part of an eight-server job.
        .flag("--in-flight", 4)
        .start(dir)
}

#[tokio::test]
async fn agents_share_the_work_and_take_over_from_a_dead_one() {
    let scenario = Scenario::on(Backend::Postgres)
        .hosts(8)
        .agents(0)
        .start()
        .await;
    let (fleet, db, dir) = (&scenario.fleet, &scenario.db, scenario.dir());
    let key = fleet.client_key().to_str().expect("utf-8").to_owned();
    let mut a = agent(db, &key, dir);
    let b = agent(db, &key, dir);
    let (channel_a, channel_b) = (connect(a.addr).await, connect(b.addr).await);

    let mut fleet_api = FleetClient::new(channel_a.clone());
    let mut ids = Vec::new();
    for (i, host) in fleet.hosts().iter().enumerate() {
        ids.push(
            register_server(
                &mut fleet_api,
                &format!("r{i}"),
                host,
                SSH_USER,
                DatabaseService::Mariadb,
            )
            .await,
        );
        // Every probe takes half a second, so that both agents get work.
        host.install_program("sudo", "#!/bin/sh\nsleep 0.5\nexec /usr/bin/sudo \"$@\"\n");
    }

    // Started on A, watched on B: 8 outcomes, each server synced exactly once.
    let started = Instant::now();
    let job = SyncAgentClient::new(channel_a.clone())
        .start_sync(StartSyncRequest {
            all_servers: true,
            request_id: "shared".into(),
            ..Default::default()
        })
        .await
        .expect("start")
        .into_inner();
    let events: Vec<_> = tokio::time::timeout(
        Duration::from_secs(30),
        SyncAgentClient::new(channel_b.clone())
            .watch_sync(WatchSyncRequest {
                job_id: job.job_id.clone(),
                cursor: 0,
            })
            .await
            .expect("watch on B")
            .into_inner()
            .map(|e| e.expect("event"))
            .collect::<Vec<_>>(),
    )
    .await
    .expect("done in time");
    let oks = events
        .iter()
        .filter(|e| matches!(&e.event, Some(sync_event::Event::Outcome(o)) if o.outcome() == Outcome::Ok))
        .count();
    assert_eq!(oks, 8);
    // Two agents, four runs each, half a second per server: about a second, far below the
    // 10 s poll: B learned of A's job and outcomes through NOTIFY.
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "{:?}",
        started.elapsed()
    );
    let conn = db.connect().await;
    assert_eq!(
        count(&conn, "SELECT COUNT(*) FROM sync_runs").await,
        8,
        "each server once"
    );
    assert_eq!(
        count(&conn, "SELECT COUNT(DISTINCT holder) FROM sync_runs").await,
        2,
        "both agents worked"
    );

    // Kill A (SIGKILL) in the middle of a job: its leases expire and B finishes the job.
    for host in fleet.hosts() {
        host.install_program("sudo", "#!/bin/sh\nsleep 2\nexec /usr/bin/sudo \"$@\"\n");
    }
    let job = SyncAgentClient::new(channel_a)
        .start_sync(StartSyncRequest {
            all_servers: true,
            request_id: "failover".into(),
            ..Default::default()
        })
        .await
        .expect("start")
        .into_inner();
    // With 4 runs each and 8 servers, all 8 leases held means A holds 4 of them.
    wait_for_count(
        &conn,
        "SELECT COUNT(*) FROM server_leases WHERE holder IS NOT NULL",
        |held| held == 8,
        Duration::from_secs(10),
        "the agents did not take every lease",
    )
    .await;
    let killed = std::process::Command::new("kill")
        .args(["-KILL", &a.pid().to_string()])
        .status()
        .expect("kill");
    assert!(killed.success());
    let _ = a.terminate_wait();
    let started = Instant::now();
    let events: Vec<_> = tokio::time::timeout(
        Duration::from_secs(30),
        SyncAgentClient::new(channel_b)
            .watch_sync(WatchSyncRequest {
                job_id: job.job_id.clone(),
                cursor: 0,
            })
            .await
            .expect("watch on B")
            .into_inner()
            .map(|e| e.expect("event"))
            .collect::<Vec<_>>(),
    )
    .await
    .expect("B finishes the job after A died");
    let outcomes: Vec<_> = events
        .iter()
        .filter_map(|e| match &e.event {
            Some(sync_event::Event::Outcome(o)) => Some(o.outcome()),
            _ => None,
        })
        .collect();
    assert_eq!(
        outcomes.len(),
        8,
        "one outcome per server, none lost, none twice"
    );
    assert!(outcomes.iter().all(|o| *o == Outcome::Ok), "{outcomes:?}");
    assert!(
        started.elapsed() < Duration::from_secs(20),
        "{:?}",
        started.elapsed()
    );
    // The job's rows were filled once each: cursors 1..=8.
    assert_eq!(
        count(
            &conn,
            &format!(
                "SELECT COUNT(DISTINCT seq) FROM sync_job_servers WHERE job_id = '{}'",
                job.job_id
            )
        )
        .await,
        8
    );
    drop(b);
}
