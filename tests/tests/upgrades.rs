//! Version skew has rules: a rolling upgrade across a migration that stops agents built before
//! it (`stops-agents`), during a 10,000-server job on PostgreSQL, with agents of the previous
//! release (`sync-agent-older`, the same program built with the previous schema range) serving
//! it. `migrate` refuses while they serve and names them (so do `plan` and `status`); with
//! `--stop-agents` it applies the migration, and the old agents see it at their next heartbeat:
//! they claim nothing more, hand over what has not reached its server, and say why (registry,
//! Work health); nothing moves until agents of the new release start; the job then completes
//! with each server once and exact cursors, and no host ever sees two SSH sessions at once
//! (checked on the host). An old agent started afterwards refuses to start.

use std::{
    sync::{Arc, Mutex},
    time::Duration,
};

use fleetsync_common::Backend;
use fleetsync_common::proto::sync::v1::{DatabaseService, fleet_client::FleetClient};
use fleetsync_migrator::migration::AGENT_SCHEMA_RANGES_VERSION;
use fleetsync_tests::{
    AgentProcess, Scenario,
    catalog::{add_mariadb_everywhere, count, execute, insert_servers, wait_for_count},
    events::WatchedJob,
    fleet::{assert_no_overlaps, session_script},
    migrator::migrator,
    process::{bin_path, described},
    services::{ServeProcess, connect, register_fleet},
};
use tonic_health::pb::health_check_response::ServingStatus;

/// Real sshd hosts, each answering after a session of 0.3 s (and checking that no two
/// sessions overlap).
const HOSTS: usize = 40;
/// Servers in the job: the hosts, and addresses on loopback where nothing listens (refused).
const SERVERS: usize = 10_000;
/// The schema the previous release works with.
const PREVIOUS: i64 = 20261208000001;

/// A port on loopback where nothing listens.
fn closed_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .expect("bind")
        .local_addr()
        .expect("addr")
        .port()
}

#[tokio::test(flavor = "multi_thread")]
async fn a_rolling_upgrade_across_a_stopping_migration_mid_job_is_exact() {
    let scenario = Scenario::on(Backend::Postgres)
        .hosts(HOSTS)
        .unmigrated()
        .start()
        .await;
    let (fleet, db, dir) = (&scenario.fleet, &scenario.db, scenario.dir());
    let previous = PREVIOUS.to_string();
    let run = migrator(
        db.url(),
        &["migrate", "--no-dispatch", "--target", &previous],
    )
    .await;
    assert_eq!(run.code(), 0, "{}", run.stderr);
    let conn = db.connect().await;
    let key = fleet.client_key().to_str().expect("utf-8").to_owned();
    for host in fleet.hosts() {
        host.install_program("sudo", &session_script("0.3"));
    }
    // The refused part of the fleet, by plain SQL (each on an address of its own).
    let port = closed_port();
    insert_servers(&conn, SERVERS - HOSTS, port, |i| {
        format!("127.{}.{}.{}", 1 + i / 65_536, (i / 256) % 256, i % 256)
    })
    .await;
    add_mariadb_everywhere(&conn, "10.11").await;
    // The incident migration's sync request would be a job of every server as the agents
    // start, running into the job under test: this test is about that one job.
    execute(&conn, "UPDATE sync_requests SET state = 'taken'").await;

    // The previous release: two agents, small enough slots that the job takes a while.
    let old_release = AgentProcess::on(db.url())
        .fleet_defaults()
        .key(&key)
        .binary("sync-agent-older")
        .flag("--concurrency", 4)
        .flag("--in-flight", 8);
    let old: Vec<ServeProcess> = (0..2).map(|_| old_release.start(dir)).collect();
    let old_ids: Vec<String> = old.iter().map(|p| p.logged("holder")).collect();
    let mut fleet_api = FleetClient::new(connect(old[0].addr).await);
    register_fleet(&mut fleet_api, fleet, "h", DatabaseService::Mariadb).await;
    assert_eq!(
        count(&conn, "SELECT COUNT(*) FROM servers").await,
        SERVERS as i64
    );

    let before = count(&conn, "SELECT COUNT(*) FROM sync_runs").await;
    assert_eq!(before, 0, "no run before the job");
    let live = Arc::new(Mutex::new(old.iter().map(|p| p.addr).collect::<Vec<_>>()));
    let job = WatchedJob::start(
        live.clone(),
        "across-the-upgrade",
        true,
        Duration::from_secs(240),
    )
    .await;
    let finished = job.finished_sql();
    job.wait_finished(&conn, 500, Duration::from_secs(60)).await;

    // Plain `migrate` refuses and names both agents; nothing is written.
    let refused = migrator(db.url(), &["migrate", "--no-dispatch"]).await;
    assert_eq!(refused.code(), 4, "{}", refused.stderr);
    for id in &old_ids {
        assert!(refused.stderr.contains(id.as_str()), "{}", refused.stderr);
    }
    assert!(
        refused.stderr.contains("--stop-agents"),
        "{}",
        refused.stderr
    );
    let applied = "SELECT MAX(version) FROM fleetsync_schema_history WHERE state = 'applied'";
    assert_eq!(count(&conn, applied).await, PREVIOUS, "nothing written");
    // `plan` and `status` say which agents the migration stops, and why.
    let plan = migrator(db.url(), &["plan", "-o", "json"]).await;
    assert_eq!(plan.code(), 0, "{}", plan.stderr);
    let plan: serde_json::Value = serde_json::from_str(&plan.stdout).expect("plan JSON");
    let stopping = &plan["migrations"][0];
    assert_eq!(stopping["version"], AGENT_SCHEMA_RANGES_VERSION);
    assert_eq!(stopping["stops_agents"], true);
    let mut stopped: Vec<&str> = stopping["stops"]
        .as_array()
        .expect("stops")
        .iter()
        .map(|v| v.as_str().expect("an id"))
        .collect();
    stopped.sort_unstable();
    let mut expected: Vec<&str> = old_ids.iter().map(String::as_str).collect();
    expected.sort_unstable();
    assert_eq!(stopped, expected);
    let status = migrator(db.url(), &["status"]).await;
    assert_eq!(status.code(), 0, "{}", status.stderr);
    assert!(
        status.stdout.contains("live sync-agents: 2") && status.stdout.contains(&old_ids[0]),
        "{}",
        status.stdout
    );

    // With --stop-agents: applied; the old agents stop claiming and say why.
    let run = migrator(db.url(), &["migrate", "--no-dispatch", "--stop-agents"]).await;
    assert_eq!(run.code(), 0, "{}", run.stderr);
    // Through the newest (migrations after the stopping one stop nobody).
    assert_eq!(
        count(&conn, applied).await,
        fleetsync_sync_agent::schema::SCHEMA_MAX
    );
    for id in &old_ids {
        let idle = format!(
            "SELECT COUNT(*) FROM sync_agents WHERE id = '{id}' AND state = 'incompatible' \
             AND reason LIKE '%{AGENT_SCHEMA_RANGES_VERSION}%' AND leases = 0 AND in_flight = 0"
        );
        wait_for_count(
            &conn,
            &idle,
            |n| n == 1,
            Duration::from_secs(20),
            "an old agent stood down",
        )
        .await;
    }
    for agent in &old {
        assert_eq!(agent.work_health().await, ServingStatus::NotServing);
    }
    let paused = count(&conn, &finished).await;
    assert!(
        paused < SERVERS as i64,
        "the job was still under way when the old agents stood down ({paused} finished)"
    );
    let old_runs = format!(
        "SELECT COUNT(*) FROM sync_runs WHERE holder IN ('{}', '{}')",
        old_ids[0], old_ids[1]
    );
    let by_old = count(&conn, &old_runs).await;
    eprintln!(
        "the old agents stood down with {paused} of {SERVERS} outcomes in; {by_old} runs theirs"
    );
    // Two heartbeats of the old agents: nobody claims, nothing moves.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(count(&conn, &finished).await, paused, "no agent claims");
    // An old agent cannot start on this schema.
    let refused = std::process::Command::new(bin_path("sync-agent-older"))
        .args([
            "serve",
            "--listen",
            "127.0.0.1:0",
            "--ssh-key",
            &key,
            "--database-url",
            db.url(),
        ])
        .env("FLEETSYNC_DRAIN_DELAY", "0s")
        .output()
        .expect("run sync-agent-older");
    assert_eq!(refused.status.code(), Some(1), "{}", described(&refused));
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert!(
        stderr.contains("stops sync-agents built before it") && stderr.contains("upgrade it"),
        "{stderr}"
    );

    // The new release takes the job over and completes it.
    let new_release = AgentProcess::on(db.url()).fleet_defaults().key(&key);
    let new: Vec<ServeProcess> = (0..2).map(|_| new_release.start(dir)).collect();
    *live.lock().expect("agents") = new.iter().map(|p| p.addr).collect();
    let (events, _) = job.watched().await;
    assert_eq!(events.len(), SERVERS, "one event per server");
    let servers: std::collections::BTreeSet<i64> = events.iter().map(|e| e.1).collect();
    assert_eq!(servers.len(), SERVERS, "each server once");
    assert_eq!(
        count(&conn, "SELECT COUNT(*) FROM sync_runs").await - before,
        SERVERS as i64,
        "each server recorded once in the job"
    );
    assert_eq!(
        count(&conn, &old_runs).await,
        by_old,
        "nothing more by the old agents"
    );
    assert_no_overlaps(fleet, HOSTS, "across the upgrade");
    let declared = format!(
        "SELECT COUNT(*) FROM sync_agents WHERE schema_max = {} AND state = 'serving'",
        fleetsync_sync_agent::schema::SCHEMA_MAX
    );
    assert_eq!(
        count(&conn, &declared).await,
        2,
        "the new agents declare their range"
    );
    for mut agent in old.into_iter().chain(new) {
        agent.terminate(Duration::from_secs(15));
    }
}

/// The end of the agent's range is the newest migration there is: a new migration must move it
/// (and the start too when the agent uses what it adds), or agents would not know it.
#[test]
fn the_agent_declares_the_newest_migration_as_the_end_of_its_range() {
    let latest =
        fleetsync_migrator::migration::MigrationSet::embedded(fleetsync_common::Backend::Sqlite)
            .latest();
    assert_eq!(fleetsync_sync_agent::schema::SCHEMA_MAX, latest);
    assert!(fleetsync_sync_agent::schema::SCHEMA_MIN <= latest);
}
