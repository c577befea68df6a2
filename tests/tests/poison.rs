//! Servers whose output cannot be stored ("poison") end as an outcome, never as a retry loop:
//! every field a server sends is validated and bounded before it is written, and a write the
//! control-plane database refuses for good (two names its collation treats as one) is recorded
//! as `PARSE_FAILED` with the reason. Each case on each backend, next to a healthy server in the
//! same batch.

use std::time::Duration;

use fleetsync_common::{
    Backend,
    proto::sync::v1::{DatabaseService, GetServerRequest, Outcome},
};
use fleetsync_sync_agent::ssh::Timeouts;
use fleetsync_tests::{
    Scenario, SshFleet,
    catalog::{count, execute},
    db::ALL_BACKENDS,
    events::outcomes,
    services::{register_fleet, sync_events},
};

/// What each fake `sudo` prints (a JSON document), and what must come of it.
const CASES: &[(&str, &str, Expect)] = &[
    (
        "nul-charset",
        r#"{"version": "10.11", "databases": [{"name": "a", "charset": "utf8\u0000", "collation": "c"}]}"#,
        Expect::Refused("charset of database \"a\" contains a NUL byte"),
    ),
    (
        "wide-collation",
        r#"{"version": "10.11", "databases": [{"name": "a", "charset": "utf8mb4", "collation": "ccccccccccccccccccccccccccccccccccccccccccccccccccccccccccccccccccccc"}]}"#,
        Expect::Refused("at most 64"),
    ),
    (
        "wide-host",
        r#"{"version": "10.11", "users": [{"user": "u", "host": "HOST"}]}"#,
        Expect::Refused("host of user \"u\" of 300 characters (at most 255)"),
    ),
    (
        "nul-version",
        r#"{"version": "10.11\u0000", "databases": []}"#,
        Expect::Refused("version contains a NUL byte"),
    ),
    (
        // Distinct on PostgreSQL and SQLite; one name under MySQL's PAD SPACE utf8mb4_bin.
        "trailing-space-twins",
        r#"{"version": "10.11", "databases": [{"name": "dup", "charset": "utf8mb4", "collation": "utf8mb4_bin"}, {"name": "dup ", "charset": "utf8mb4", "collation": "utf8mb4_bin"}]}"#,
        Expect::TwinsOnMySql,
    ),
];

#[derive(Debug, Clone, Copy)]
enum Expect {
    /// PARSE_FAILED with this in the message, on every backend.
    Refused(&'static str),
    /// OK with two databases where the names differ; PARSE_FAILED naming the write on MySQL.
    TwinsOnMySql,
}

async fn poison_ends_as_an_outcome(backend: Backend, fleet: &SshFleet) {
    let scenario = Scenario::on(backend)
        .key_of(fleet)
        .timeouts(Timeouts {
            command: Duration::from_secs(10),
            ..Timeouts::default()
        })
        .start()
        .await;
    let (_db, agent) = (&scenario.db, scenario.agent());
    let (mut fleet_api, mut sync_api) = (agent.fleet(), agent.sync());
    let ids = register_fleet(&mut fleet_api, fleet, "poison-", DatabaseService::Mariadb).await;
    let healthy = ids[CASES.len()];
    // Twice: a poison server must not stay leased, retried or stuck after the first job.
    for round in ["first", "second"] {
        let events = sync_events(&mut sync_api, &ids, round).await;
        let outcomes = outcomes(&events);
        assert_eq!(
            outcomes.len(),
            ids.len(),
            "{backend} {round}: one outcome each"
        );
        assert_eq!(
            outcomes[&healthy].outcome(),
            Outcome::Ok,
            "{backend} {round}: the healthy server in the same batch: {}",
            outcomes[&healthy].message
        );
        for (i, (name, _, expect)) in CASES.iter().enumerate() {
            let got = &outcomes[&ids[i]];
            match (expect, backend) {
                (Expect::Refused(reason), _) => {
                    assert_eq!(
                        got.outcome(),
                        Outcome::ParseFailed,
                        "{backend} {name}: {got:?}"
                    );
                    assert!(
                        got.message.contains(reason),
                        "{backend} {name}: {}",
                        got.message
                    );
                }
                (Expect::TwinsOnMySql, Backend::MySql) => {
                    assert_eq!(
                        got.outcome(),
                        Outcome::ParseFailed,
                        "{backend} {name}: {got:?}"
                    );
                    assert!(
                        got.message.contains("cannot be stored")
                            && got.message.contains("Duplicate"),
                        "{backend} {name}: {}",
                        got.message
                    );
                }
                (Expect::TwinsOnMySql, _) => {
                    assert_eq!(got.outcome(), Outcome::Ok, "{backend} {name}: {got:?}");
                }
            }
        }
    }
    scenario.stop().await;
}

#[tokio::test]
async fn poison_servers_end_as_outcomes_on_every_backend() {
    let fleet = SshFleet::start(CASES.len() + 1).await;
    for (i, (_, document, _)) in CASES.iter().enumerate() {
        let document = document.replace("HOST", &"h".repeat(300));
        fleet.host(i).install_program(
            "sudo",
            &format!("#!/bin/sh\ncat >/dev/null\nprintf '%s\\n' '{document}'\n"),
        );
    }
    for backend in ALL_BACKENDS {
        poison_ends_as_an_outcome(backend, &fleet).await;
    }
}

/// Registrations the agent cannot read (written by hand or by a newer panel: a port out of
/// range, a database service this build does not know, a reachability state it does not
/// know) end as each server's own `PARSE_FAILED` with the reason, next to healthy servers
/// claimed in the same batch, job after job; never a claim batch that fails.
async fn unreadable_registrations(backend: Backend, fleet: &SshFleet) {
    let scenario = Scenario::on(backend)
        .key_of(fleet)
        .timeouts(Timeouts::default())
        .start()
        .await;
    let (db, agent) = (&scenario.db, scenario.agent());
    let (mut fleet_api, mut sync_api) = (agent.fleet(), agent.sync());
    let healthy = register_fleet(&mut fleet_api, fleet, "ok-", DatabaseService::Mariadb).await;
    let conn = db.connect().await;
    let broken = [
        (
            "port-70000",
            70000,
            "mariadb",
            "unknown",
            "servers.port 70000 is not a TCP port",
        ),
        (
            "port-0",
            0,
            "mariadb",
            "unknown",
            "servers.port 0 is not a TCP port",
        ),
        ("oracle", 22, "oracle", "unknown", "oracle"),
        ("reachability", 22, "mariadb", "half-there", "half-there"),
    ];
    let mut ids = healthy.clone();
    for (name, port, service, reachability, _) in broken {
        execute(
            &conn,
            &format!(
                "INSERT INTO servers (name, ip, port, ssh_user, status, reachability, created_at, \
                 updated_at) VALUES ('{name}', '127.0.0.1', {port}, 'vito', 'ready', \
                 '{reachability}', 0, 0)"
            ),
        )
        .await;
        let id = count(
            &conn,
            &format!("SELECT id FROM servers WHERE name = '{name}'"),
        )
        .await;
        execute(
            &conn,
            &format!(
                "INSERT INTO services (server_id, type, name, version, status, created_at, \
                 updated_at) VALUES ({id}, 'database', '{service}', '1', 'ready', 0, 0)"
            ),
        )
        .await;
        execute(
            &conn,
            &format!("INSERT INTO server_leases (server_id) VALUES ({id})"),
        )
        .await;
        ids.push(id);
    }
    for round in ["first", "second"] {
        let events = sync_events(&mut sync_api, &ids, &format!("unreadable-{round}")).await;
        let outcomes = outcomes(&events);
        assert_eq!(
            outcomes.len(),
            ids.len(),
            "{backend} {round}: one outcome each"
        );
        for id in &healthy {
            assert_eq!(
                outcomes[id].outcome(),
                Outcome::Ok,
                "{backend}: {:?}",
                outcomes[id]
            );
        }
        for (i, (name, _, _, _, reason)) in broken.iter().enumerate() {
            let got = &outcomes[&ids[healthy.len() + i]];
            assert_eq!(
                got.outcome(),
                Outcome::ParseFailed,
                "{backend} {name}: {got:?}"
            );
            assert!(
                got.message.contains("registration cannot be read") && got.message.contains(reason),
                "{backend} {name}: {}",
                got.message
            );
        }
    }
    // Read one by one, an unreadable registration is an error (never a port of 22 made up),
    // and the others read as ever.
    let broken_id = ids[healthy.len()];
    let err = fleet_api
        .get_server(GetServerRequest { id: broken_id })
        .await
        .expect_err("an unreadable registration");
    assert_eq!(err.code(), tonic::Code::Internal, "{backend}: {err}");
    let ok = fleet_api
        .get_server(GetServerRequest { id: healthy[0] })
        .await
        .expect("a readable registration");
    assert_eq!(ok.into_inner().server.map(|s| s.id), Some(healthy[0]));
    scenario.stop().await;
}

#[tokio::test]
async fn unreadable_registrations_are_their_servers_own_outcomes_on_every_backend() {
    let fleet = SshFleet::start(2).await;
    for backend in ALL_BACKENDS {
        unreadable_registrations(backend, &fleet).await;
    }
}
