//! Servers whose output cannot be stored ("poison") end as an outcome, never as a retry loop:
//! every field a server sends is validated and bounded before it is written, and a write the
//! control-plane database refuses for good (two names its collation treats as one) is recorded
//! as `PARSE_FAILED` with the reason. Each case on each backend, next to a healthy server in the
//! same batch.

use std::time::Duration;

use fleetsync_common::{
    Backend,
    proto::sync::v1::{DatabaseService, Outcome, sync_event},
};
use fleetsync_sync_agent::ssh::{DEFAULT_OUTPUT_CAP, Timeouts};
use fleetsync_tests::{
    SshFleet, TestAgent, TestDb,
    db::ALL_BACKENDS,
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
    let db = TestDb::create(backend).await;
    let timeouts = Timeouts {
        command: Duration::from_secs(10),
        ..Timeouts::default()
    };
    let agent = TestAgent::spawn(db.url(), fleet.client(timeouts, DEFAULT_OUTPUT_CAP)).await;
    let (mut fleet_api, mut sync_api) = (agent.fleet(), agent.sync());
    let ids = register_fleet(&mut fleet_api, fleet, "poison-", DatabaseService::Mariadb).await;
    let healthy = ids[CASES.len()];
    // Twice: a poison server must not stay leased, retried or stuck after the first job.
    for round in ["first", "second"] {
        let events = sync_events(&mut sync_api, &ids, round).await;
        let outcomes: std::collections::BTreeMap<i64, _> = events
            .iter()
            .filter_map(|e| match &e.event {
                Some(sync_event::Event::Outcome(o)) => Some((o.server_id, o.clone())),
                _ => None,
            })
            .collect();
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
    agent.service.stop().await.expect("clean stop");
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
