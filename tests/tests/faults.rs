//! Every kind of fault a server can have, each ending as its own outcome on every backend:
//! refused, no route, frozen, tarpit, wrong host key, refused login, no sudo, failing and
//! hanging commands, output over the cap, a flood of output.

use std::time::{Duration, Instant};

use fleetsync_common::{
    Backend,
    proto::sync::v1::{
        self as pb, DatabaseService, GetServerRequest, Outcome, ResetHostKeyRequest,
        UnreachableCause, fleet_client::FleetClient, sync_agent_client::SyncAgentClient,
    },
};
use fleetsync_sync_agent::ssh::Timeouts;
use fleetsync_tests::{
    Scenario,
    bench::peak_rss_mib,
    events::{outcomes, prost_duration, summary, sync_timeouts},
    fleet::{NO_SUDO_USER, Placement, SSH_USER},
    services::{register_server, sync_events as sync},
};

async fn every_fault(backend: Backend) {
    // The hosts, by what they do in the second sync (all but NO_SUDO and NO_SERVICE answer
    // the first one).
    const MARIADB: usize = 0; // healthy, MariaDB
    const POSTGRES: usize = 1; // healthy, PostgreSQL
    const REFUSED: usize = 2; // sshd stopped
    const FROZEN: usize = 3; // sshd SIGSTOPped: TCP accepted, no banner
    const NO_ROUTE: usize = 4; // in a namespace whose address is removed
    const NEW_HOST_KEY: usize = 5; // re-installed: another host key
    const KEY_REVOKED: usize = 6; // the agent's key removed from authorized_keys
    const NO_SUDO: usize = 7; // the login user has no sudo: the command fails
    const NO_SERVICE: usize = 8; // no database service registered
    const HOSTILE: usize = 9; // prints something that is not the inventory
    let mut placements = [Placement::Loopback; 10];
    placements[NO_ROUTE] = Placement::Namespace;
    let scenario = Scenario::on(backend).placements(&placements).start().await;
    let (fleet, agent) = (&scenario.fleet, scenario.agent());
    let (mut fleet_api, mut sync_api) = (agent.fleet(), agent.sync());
    let mut ids = Vec::new();
    for (i, host) in fleet.hosts().iter().enumerate() {
        let (user, service) = match i {
            POSTGRES => (SSH_USER, DatabaseService::Postgresql),
            NO_SUDO => (NO_SUDO_USER, DatabaseService::Mariadb),
            NO_SERVICE => (SSH_USER, DatabaseService::None),
            _ => (SSH_USER, DatabaseService::Mariadb),
        };
        ids.push(register_server(&mut fleet_api, &format!("host-{i}"), host, user, service).await);
    }

    // First contact pins every host key.
    let first = sync(&mut sync_api, &ids, "first").await;
    let first_outcomes = outcomes(&first);
    assert_eq!(first_outcomes.len(), ids.len(), "one outcome per server");
    for i in [
        MARIADB,
        POSTGRES,
        REFUSED,
        FROZEN,
        NO_ROUTE,
        NEW_HOST_KEY,
        KEY_REVOKED,
        HOSTILE,
    ] {
        assert_eq!(
            first_outcomes[&ids[i]].outcome(),
            Outcome::Ok,
            "host {i}: {:?}",
            first_outcomes[&ids[i]]
        );
    }

    fleet.host(REFUSED).stop();
    fleet.host(FROZEN).freeze();
    fleet.host(NO_ROUTE).cut_route();
    fleet.host(NEW_HOST_KEY).rotate_host_key().await;
    fleet.host(KEY_REVOKED).revoke_client_key();
    fleet
        .host(HOSTILE)
        .install_program("sudo", "#!/bin/sh\necho '{\"databases\": \"not a list\"'\n");

    let started = Instant::now();
    let events = sync(&mut sync_api, &ids, "faults").await;
    let elapsed = started.elapsed();
    fleet.host(FROZEN).thaw();
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
    let ok = expect(MARIADB, Outcome::Ok, UnreachableCause::Unspecified);
    assert!(ok.message.contains("database(s)"), "{}", ok.message);
    expect(POSTGRES, Outcome::Ok, UnreachableCause::Unspecified);
    expect(REFUSED, Outcome::Unreachable, UnreachableCause::Refused);
    let frozen = expect(FROZEN, Outcome::Unreachable, UnreachableCause::Timeout);
    assert!(
        frozen.message.contains("no SSH banner"),
        "{}",
        frozen.message
    );
    expect(NO_ROUTE, Outcome::Unreachable, UnreachableCause::NoRoute);
    let changed = expect(
        NEW_HOST_KEY,
        Outcome::HostKeyMismatch,
        UnreachableCause::Unspecified,
    );
    assert!(
        changed
            .message
            .contains(&fleet.host(NEW_HOST_KEY).host_key().fingerprint),
        "{}",
        changed.message
    );
    expect(
        KEY_REVOKED,
        Outcome::AuthFailed,
        UnreachableCause::Unspecified,
    );
    let failed = expect(
        NO_SUDO,
        Outcome::CommandFailed,
        UnreachableCause::Unspecified,
    );
    assert_eq!(failed.exit_status, 1, "{}", failed.message);
    assert!(failed.message.contains("sudo"), "{}", failed.message);
    expect(
        NO_SERVICE,
        Outcome::SkippedNoDatabaseService,
        UnreachableCause::Unspecified,
    );
    let hostile = expect(HOSTILE, Outcome::ParseFailed, UnreachableCause::Unspecified);
    assert!(
        hostile.message.contains("not the expected JSON"),
        "{}",
        hostile.message
    );
    // Each within its timeout: the slowest (frozen: 2 s banner) bounds the job.
    let t = sync_timeouts();
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
    let healthy_took = prost_duration(got[&ids[MARIADB]].duration.as_ref());
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
        .get_server(GetServerRequest { id: ids[REFUSED] })
        .await
        .expect("get")
        .into_inner();
    assert_eq!(
        refused.server.expect("server").reachability(),
        pb::Reachability::Offline
    );

    // Re-pinning: after a reset, the changed host syncs again and pins its new key.
    let reset = fleet_api
        .reset_host_key(ResetHostKeyRequest {
            id: ids[NEW_HOST_KEY],
        })
        .await
        .expect("reset")
        .into_inner();
    assert!(reset.previous.is_some());
    let again = outcomes(&sync(&mut sync_api, &[ids[NEW_HOST_KEY]], "repin").await);
    assert_eq!(again[&ids[NEW_HOST_KEY]].outcome(), Outcome::Ok);
    let pinned = fleet_api
        .get_server(GetServerRequest {
            id: ids[NEW_HOST_KEY],
        })
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
        fleet.host(NEW_HOST_KEY).host_key().fingerprint
    );
    scenario.stop().await;
}

fleetsync_tests::per_backend!(every_fault_yields_its_outcome => every_fault);

#[tokio::test]
async fn output_over_the_cap_is_a_parse_failure_and_a_hung_probe_a_command_failure() {
    let scenario = Scenario::on(Backend::Sqlite)
        .hosts(2)
        .timeouts(Timeouts {
            command: Duration::from_secs(1),
            ..sync_timeouts()
        })
        .output_cap(64 * 1024)
        .start()
        .await;
    let (fleet, agent) = (&scenario.fleet, scenario.agent());
    let (mut fleet_api, mut sync_api) = (agent.fleet(), agent.sync());
    let flood = register_server(
        &mut fleet_api,
        "flood",
        fleet.host(0),
        SSH_USER,
        DatabaseService::Mariadb,
    )
    .await;
    let hang = register_server(
        &mut fleet_api,
        "hang",
        fleet.host(1),
        SSH_USER,
        DatabaseService::Mariadb,
    )
    .await;
    // 200 MiB of output against a 64 KiB cap; and a probe that never ends.
    fleet
        .host(0)
        .install_program("sudo", "#!/bin/sh\nexec head -c 209715200 /dev/zero\n");
    fleet
        .host(1)
        .install_program("sudo", "#!/bin/sh\nexec sleep 30\n");
    let started = Instant::now();
    let got = outcomes(&sync(&mut sync_api, &[flood, hang], "cap").await);
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "{:?}",
        started.elapsed()
    );
    assert_eq!(
        got[&flood].outcome(),
        Outcome::ParseFailed,
        "{}",
        got[&flood].message
    );
    assert!(
        got[&flood].message.contains("65536-byte cap"),
        "{}",
        got[&flood].message
    );
    assert_eq!(
        got[&hang].outcome(),
        Outcome::CommandFailed,
        "{}",
        got[&hang].message
    );
    assert_eq!(got[&hang].exit_status, -1);
    assert!(
        got[&hang].message.contains("command timed out after 1s"),
        "{}",
        got[&hang].message
    );
    scenario.stop().await;
}

#[tokio::test]
async fn a_flood_of_output_does_not_grow_the_agents_memory() {
    let scenario = Scenario::on(Backend::Sqlite)
        .hosts(1)
        .agents(0)
        .start()
        .await;
    let fleet = &scenario.fleet;
    let agent = scenario.start_process(&scenario.agent_process().flag("--output-cap", 65536));
    let channel = fleetsync_tests::services::connect(agent.addr).await;
    let mut fleet_api = FleetClient::new(channel.clone());
    let mut sync_api = SyncAgentClient::new(channel);
    let id = register_server(
        &mut fleet_api,
        "flood",
        fleet.host(0),
        SSH_USER,
        DatabaseService::Mariadb,
    )
    .await;
    // A first, normal sync: the agent's working set with a real inventory.
    assert_eq!(
        outcomes(&sync(&mut sync_api, &[id], "warm").await)[&id].outcome(),
        Outcome::Ok
    );
    let before = (peak_rss_mib(agent.pid()) * 1024.0) as u64;
    // 512 MiB of output against a 64 KiB cap.
    fleet
        .host(0)
        .install_program("sudo", "#!/bin/sh\nexec head -c 536870912 /dev/zero\n");
    let got = outcomes(&sync(&mut sync_api, &[id], "flood").await);
    assert_eq!(
        got[&id].outcome(),
        Outcome::ParseFailed,
        "{}",
        got[&id].message
    );
    let after = (peak_rss_mib(agent.pid()) * 1024.0) as u64;
    eprintln!("agent peak RSS: {before} KiB before, {after} KiB after 512 MiB of output");
    assert!(
        after < before + 32 * 1024,
        "peak RSS grew from {before} KiB to {after} KiB for 512 MiB of output"
    );
}
