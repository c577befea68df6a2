//! The sync-agent end to end: real sshd hosts in front of the machine's real MariaDB and
//! PostgreSQL, the control plane on each backend, every fault of TESTING.md, hostile names and
//! output, the migrator's sync requests, and malformed requests.

use std::{
    collections::BTreeMap,
    time::{Duration, Instant},
};

use fleetsync_common::{
    Backend,
    proto::sync::v1::{
        self as pb, DatabaseService, GetServerRequest, GetSyncJobRequest, ListServersRequest,
        Outcome, ResetHostKeyRequest, ServerSpec, StartSyncRequest, SyncEvent, UnreachableCause,
        UpsertServerRequest, WatchSyncRequest, fleet_client::FleetClient,
        sync_agent_client::SyncAgentClient, sync_event,
    },
};
use fleetsync_sync_agent::ssh::{DEFAULT_OUTPUT_CAP, Timeouts};
use fleetsync_tests::{
    SshFleet, SshHost, TestAgent, TestDb,
    catalog::{count, execute},
    db::ALL_BACKENDS,
    fleet::{NO_SUDO_USER, Placement, SSH_USER},
    migrator::migrator,
    services::{migrate, test_runner_config},
};
use tokio_stream::StreamExt;
use tonic::{Code, transport::Channel};

fn timeouts() -> Timeouts {
    Timeouts {
        connect: Duration::from_secs(3),
        handshake: Duration::from_secs(2),
        auth: Duration::from_secs(3),
        command: Duration::from_secs(10),
    }
}

async fn register(
    fleet: &mut FleetClient<Channel>,
    name: &str,
    host: &SshHost,
    user: &str,
    service: DatabaseService,
) -> i64 {
    let response = fleet
        .upsert_server(UpsertServerRequest {
            id: 0,
            spec: Some(ServerSpec {
                name: name.into(),
                ip: host.addr().to_string(),
                port: u32::from(host.port()),
                ssh_user: user.into(),
                database_service: service as i32,
                database_version: String::new(),
                status: 0,
            }),
        })
        .await
        .expect("register server")
        .into_inner();
    assert!(response.created);
    response.server.expect("server").id
}

/// Runs `Sync` for these servers and collects its events (with a deadline).
async fn sync(
    client: &mut SyncAgentClient<Channel>,
    ids: &[i64],
    request_id: &str,
) -> Vec<SyncEvent> {
    let stream = client
        .sync(StartSyncRequest {
            request_id: request_id.into(),
            server_ids: ids.to_vec(),
            ..Default::default()
        })
        .await
        .expect("sync")
        .into_inner();
    tokio::time::timeout(
        Duration::from_secs(30),
        stream.map(|e| e.expect("event")).collect::<Vec<_>>(),
    )
    .await
    .expect("the job finishes within 30s")
}

fn outcomes(events: &[SyncEvent]) -> BTreeMap<i64, pb::ServerOutcome> {
    events
        .iter()
        .filter_map(|e| match &e.event {
            Some(sync_event::Event::Outcome(o)) => Some((o.server_id, o.clone())),
            _ => None,
        })
        .collect()
}

fn summary(events: &[SyncEvent]) -> pb::JobSummary {
    match events.last().and_then(|e| e.event.clone()) {
        Some(sync_event::Event::Summary(s)) => s,
        other => panic!("the stream must end with a summary, got {other:?}"),
    }
}

/// Creates a database on the machine's MariaDB (what the hosts' `sudo mariadb` sees).
async fn mariadb_exec(sql: &str) {
    let db = fleetsync_common::Db::connect(&fleetsync_tests::db::mysql_admin_url())
        .await
        .expect("mariadb");
    execute(&db, sql).await;
    db.close().await;
}

async fn postgres_exec(sql: &str) {
    let db = fleetsync_common::Db::connect(&fleetsync_tests::db::postgres_admin_url())
        .await
        .expect("postgres");
    execute(&db, sql).await;
    db.close().await;
}

async fn every_fault(backend: Backend) {
    let fleet = SshFleet::start_with(&[
        Placement::Loopback,  // 0 healthy, MariaDB
        Placement::Loopback,  // 1 healthy, PostgreSQL
        Placement::Loopback,  // 2 refused
        Placement::Loopback,  // 3 frozen
        Placement::Namespace, // 4 no route
        Placement::Loopback,  // 5 host key changed
        Placement::Loopback,  // 6 client key revoked
        Placement::Loopback,  // 7 no sudo: command fails
        Placement::Loopback,  // 8 no database service
        Placement::Loopback,  // 9 hostile output
    ])
    .await;
    let db = TestDb::create(backend).await;
    let agent = TestAgent::spawn(db.url(), fleet.client(timeouts(), DEFAULT_OUTPUT_CAP)).await;
    let (mut fleet_api, mut sync_api) = (agent.fleet(), agent.sync());
    let mut ids = Vec::new();
    for (i, host) in fleet.hosts().iter().enumerate() {
        let (user, service) = match i {
            1 => (SSH_USER, DatabaseService::Postgresql),
            7 => (NO_SUDO_USER, DatabaseService::Mariadb),
            8 => (SSH_USER, DatabaseService::None),
            _ => (SSH_USER, DatabaseService::Mariadb),
        };
        ids.push(register(&mut fleet_api, &format!("host-{i}"), host, user, service).await);
    }

    // First contact pins every host key.
    let first = sync(&mut sync_api, &ids, "first").await;
    let first_outcomes = outcomes(&first);
    assert_eq!(first_outcomes.len(), ids.len(), "one outcome per server");
    for i in [0, 1, 2, 3, 4, 5, 6, 9] {
        assert_eq!(
            first_outcomes[&ids[i]].outcome(),
            Outcome::Ok,
            "host {i}: {:?}",
            first_outcomes[&ids[i]]
        );
    }

    fleet.host(2).stop();
    fleet.host(3).freeze();
    fleet.host(4).cut_route();
    fleet.host(5).rotate_host_key().await;
    fleet.host(6).revoke_client_key();
    fleet
        .host(9)
        .install_program("sudo", "#!/bin/sh\necho '{\"databases\": \"not a list\"'\n");

    let started = Instant::now();
    let events = sync(&mut sync_api, &ids, "faults").await;
    let elapsed = started.elapsed();
    fleet.host(3).thaw();
    let got = outcomes(&events);
    assert_eq!(
        got.len(),
        ids.len(),
        "exactly one outcome per server: {got:?}"
    );
    let cursors: Vec<u64> = events.iter().map(|e| e.cursor).collect();
    assert_eq!(
        cursors,
        (1..=ids.len() as u64 + 1).collect::<Vec<_>>(),
        "cursors run 1..=n, then the summary"
    );

    let expect = |i: usize, outcome: Outcome, cause: UnreachableCause| {
        let o = &got[&ids[i]];
        assert_eq!(
            (o.outcome(), o.cause()),
            (outcome, cause),
            "host {i}: {}",
            o.message
        );
        o
    };
    let ok = expect(0, Outcome::Ok, UnreachableCause::Unspecified);
    assert!(ok.message.contains("database(s)"), "{}", ok.message);
    expect(1, Outcome::Ok, UnreachableCause::Unspecified);
    expect(2, Outcome::Unreachable, UnreachableCause::Refused);
    let frozen = expect(3, Outcome::Unreachable, UnreachableCause::Timeout);
    assert!(
        frozen.message.contains("no SSH banner"),
        "{}",
        frozen.message
    );
    expect(4, Outcome::Unreachable, UnreachableCause::NoRoute);
    let changed = expect(5, Outcome::HostKeyMismatch, UnreachableCause::Unspecified);
    assert!(
        changed
            .message
            .contains(&fleet.host(5).host_key().fingerprint),
        "{}",
        changed.message
    );
    expect(6, Outcome::AuthFailed, UnreachableCause::Unspecified);
    let failed = expect(7, Outcome::CommandFailed, UnreachableCause::Unspecified);
    assert_eq!(failed.exit_status, 1, "{}", failed.message);
    assert!(failed.message.contains("sudo"), "{}", failed.message);
    expect(
        8,
        Outcome::SkippedNoDatabaseService,
        UnreachableCause::Unspecified,
    );
    let hostile = expect(9, Outcome::ParseFailed, UnreachableCause::Unspecified);
    assert!(
        hostile.message.contains("not the expected JSON"),
        "{}",
        hostile.message
    );
    // Each within its timeout: the slowest (frozen: 2 s banner) bounds the job.
    let t = timeouts();
    for (i, limit) in [
        (2, t.connect),
        (3, t.handshake),
        (4, t.connect),
        (5, t.handshake),
    ] {
        let took = prost_duration(got[&ids[i]].duration.as_ref());
        assert!(
            took <= limit + Duration::from_millis(750),
            "host {i} took {took:?}"
        );
    }
    assert!(elapsed < Duration::from_secs(8), "job took {elapsed:?}");
    // The healthy servers did not wait for the frozen one.
    let healthy_took = prost_duration(got[&ids[0]].duration.as_ref());
    assert!(healthy_took < Duration::from_secs(2), "{healthy_took:?}");

    let s = summary(&events);
    assert_eq!((s.total, s.finished), (ids.len() as u32, ids.len() as u32));
    assert_eq!(s.state(), pb::JobState::Done);

    // The healthy servers' inventory is stored: databases with charset and collation, the
    // service's charsets, users.
    for (i, system) in [(0, "mysql"), (1, "postgres")] {
        let server = fleet_api
            .get_server(GetServerRequest { id: ids[i] })
            .await
            .expect("get")
            .into_inner();
        let inventory = server.inventory.expect("inventory after a sync");
        let test = inventory
            .databases
            .iter()
            .find(|d| d.name == "test")
            .expect("the machine's `test` database");
        assert!(
            !test.charset.is_empty() && !test.collation.is_empty(),
            "{test:?}"
        );
        assert!(
            inventory.databases.iter().all(|d| d.name != system),
            "system databases are skipped"
        );
        let default = inventory
            .charsets
            .iter()
            .find(|c| c.name == inventory.default_charset)
            .expect("the default charset is among the charsets");
        assert!(
            !default.collations.is_empty(),
            "collations stored: {default:?}"
        );
        assert!(!inventory.default_charset.is_empty());
        assert!(!inventory.users.is_empty(), "users stored");
        let s = server.server.expect("server");
        assert_eq!(s.reachability(), pb::Reachability::Online);
        assert!(s.host_key.is_some(), "host key pinned");
        assert_eq!(s.last_outcome.expect("last outcome").outcome(), Outcome::Ok);
    }
    let refused = fleet_api
        .get_server(GetServerRequest { id: ids[2] })
        .await
        .expect("get")
        .into_inner();
    assert_eq!(
        refused.server.expect("server").reachability(),
        pb::Reachability::Offline
    );

    // Re-pinning: after a reset, the changed host syncs again and pins its new key.
    let reset = fleet_api
        .reset_host_key(ResetHostKeyRequest { id: ids[5] })
        .await
        .expect("reset")
        .into_inner();
    assert!(reset.previous.is_some());
    let again = outcomes(&sync(&mut sync_api, &[ids[5]], "repin").await);
    assert_eq!(again[&ids[5]].outcome(), Outcome::Ok);
    let pinned = fleet_api
        .get_server(GetServerRequest { id: ids[5] })
        .await
        .expect("get")
        .into_inner();
    assert_eq!(
        pinned
            .server
            .expect("server")
            .host_key
            .expect("pinned")
            .fingerprint,
        fleet.host(5).host_key().fingerprint
    );
    agent.service.stop().await.expect("clean stop");
}

fn prost_duration(d: Option<&prost_types::Duration>) -> Duration {
    let d = d.expect("duration");
    Duration::new(d.seconds as u64, d.nanos as u32)
}

#[tokio::test]
async fn every_fault_yields_its_outcome_sqlite() {
    every_fault(Backend::Sqlite).await;
}

#[tokio::test]
async fn every_fault_yields_its_outcome_postgres() {
    every_fault(Backend::Postgres).await;
}

#[tokio::test]
async fn every_fault_yields_its_outcome_mariadb() {
    every_fault(Backend::MySql).await;
}
