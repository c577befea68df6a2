//! The sync-agent end to end: real sshd hosts in front of the machine's real MariaDB and
//! PostgreSQL, the control plane on each backend, every kind of fault (refused, no route, frozen,
//! tarpit, wrong host key, refused login, failing and hanging commands), hostile names and
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
    SshFleet, TestAgent, TestDb,
    catalog::{count, execute, wait_for_count},
    fleet::{NO_SUDO_USER, Placement, SSH_USER},
    migrator::migrator,
    services::{migrate, register_fleet, register_server, sync_events as sync, test_runner_config},
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
        ids.push(register_server(&mut fleet_api, &format!("host-{i}"), host, user, service).await);
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

fn unique(prefix: &str) -> String {
    format!("{prefix}_{:x}", fleetsync_tests::random_u64() >> 24)
}

#[tokio::test]
async fn databases_appear_change_and_go_and_hostile_names_round_trip() {
    let fleet = SshFleet::start(2).await;
    let db = TestDb::sqlite().await;
    let agent = TestAgent::spawn(db.url(), fleet.client(timeouts(), DEFAULT_OUTPUT_CAP)).await;
    let (mut fleet_api, mut sync_api) = (agent.fleet(), agent.sync());
    let maria = register_server(
        &mut fleet_api,
        "maria",
        fleet.host(0),
        SSH_USER,
        DatabaseService::Mariadb,
    )
    .await;
    let pg = register_server(
        &mut fleet_api,
        "pg",
        fleet.host(1),
        SSH_USER,
        DatabaseService::Postgresql,
    )
    .await;

    let tag = unique("fst");
    let plain = format!("{tag}_plain");
    // Quotes, a tab, a pipe, a newline, unicode, and the 64-character limit.
    let hostile = [
        format!("{tag} it's \"quoted\""),
        format!("{tag}\ttab|pipe"),
        format!("{tag}\nnewline"),
        format!("{tag} é日本"),
        format!("{tag}{}", "x".repeat(64 - tag.len())),
    ];
    // PostgreSQL names stop at 63 bytes.
    let pg_names: Vec<String> = hostile
        .iter()
        .map(|n| {
            if n.len() > 63 {
                n[..63].to_owned()
            } else {
                n.clone()
            }
        })
        .collect();
    let mysql_ident = |name: &str| format!("`{}`", name.replace('`', "``"));
    let pg_ident = |name: &str| format!("\"{}\"", name.replace('"', "\"\""));
    mariadb_exec(&format!(
        "CREATE DATABASE {} CHARACTER SET latin1 COLLATE latin1_swedish_ci",
        mysql_ident(&plain)
    ))
    .await;
    for name in &hostile {
        mariadb_exec(&format!("CREATE DATABASE {}", mysql_ident(name))).await;
    }
    for name in &pg_names {
        postgres_exec(&format!("CREATE DATABASE {}", pg_ident(name))).await;
    }
    let user = format!("{tag}_user");
    mariadb_exec(&format!("CREATE USER '{user}'@'10.%' IDENTIFIED BY 'x'")).await;
    mariadb_exec(&format!(
        "GRANT ALL ON {}.* TO '{user}'@'10.%'",
        mysql_ident(&plain)
    ))
    .await;

    let first = outcomes(&sync(&mut sync_api, &[maria, pg], &unique("first")).await);
    assert_eq!(
        first[&maria].outcome(),
        Outcome::Ok,
        "{}",
        first[&maria].message
    );
    assert_eq!(first[&pg].outcome(), Outcome::Ok, "{}", first[&pg].message);

    let inventory = |id| {
        let mut client = fleet_api.clone();
        async move {
            client
                .get_server(GetServerRequest { id })
                .await
                .expect("get")
                .into_inner()
                .inventory
                .expect("inventory")
        }
    };
    let maria_inv = inventory(maria).await;
    let found = maria_inv
        .databases
        .iter()
        .find(|d| d.name == plain)
        .expect("plain database");
    assert_eq!(
        (found.charset.as_str(), found.collation.as_str()),
        ("latin1", "latin1_swedish_ci")
    );
    let pg_inv = inventory(pg).await;
    for name in &hostile {
        assert!(
            maria_inv.databases.iter().any(|d| &d.name == name),
            "MariaDB lost {name:?}"
        );
    }
    for name in &pg_names {
        let d = pg_inv.databases.iter().find(|d| &d.name == name);
        let d = d.unwrap_or_else(|| panic!("PostgreSQL lost {name:?}"));
        assert_eq!(d.charset, "UTF8");
        assert_eq!(d.state(), pb::DatabaseState::Ready);
    }
    let u = maria_inv
        .users
        .iter()
        .find(|u| u.username == user)
        .expect("user");
    assert_eq!(
        (u.host.as_str(), u.databases.clone()),
        ("10.%", vec![plain.clone()])
    );

    // Changed, dropped and new, between two syncs.
    mariadb_exec(&format!(
        "ALTER DATABASE {} CHARACTER SET utf8mb4 COLLATE utf8mb4_bin",
        mysql_ident(&plain)
    ))
    .await;
    mariadb_exec(&format!("DROP DATABASE {}", mysql_ident(&hostile[0]))).await;
    let newer = format!("{tag}_new");
    mariadb_exec(&format!("CREATE DATABASE {}", mysql_ident(&newer))).await;
    mariadb_exec(&format!("DROP USER '{user}'@'10.%'")).await;
    let second = outcomes(&sync(&mut sync_api, &[maria], &unique("second")).await);
    let counts = second[&maria].counts.expect("counts");
    assert!(
        counts.databases_added >= 1 && counts.databases_updated >= 1 && counts.databases_gone >= 1,
        "{counts:?}"
    );
    assert!(counts.users_gone >= 1, "{counts:?}");
    let maria_inv = inventory(maria).await;
    let state = |name: &str| {
        maria_inv
            .databases
            .iter()
            .find(|d| d.name == name)
            .map(|d| (d.state(), d.collation.clone()))
    };
    assert_eq!(
        state(&plain),
        Some((pb::DatabaseState::Ready, "utf8mb4_bin".into()))
    );
    assert_eq!(
        state(&hostile[0]).map(|s| s.0),
        Some(pb::DatabaseState::Gone),
        "dropped is marked gone, kept"
    );
    assert_eq!(state(&newer).map(|s| s.0), Some(pb::DatabaseState::Ready));
    let gone_user = maria_inv
        .users
        .iter()
        .find(|u| u.username == user)
        .expect("user kept");
    assert_eq!(gone_user.state(), pb::DatabaseState::Gone);

    // A sync with no change since the last one changes nothing. The MariaDB server is the
    // machine's, shared with every test running meanwhile (each makes its own database), so
    // one of them may change the listing between two syncs: a few tries, one must be clean.
    let mut clean = None;
    for attempt in 0..5 {
        let again = outcomes(
            &sync(
                &mut sync_api,
                &[maria],
                &unique(&format!("again-{attempt}")),
            )
            .await,
        );
        let c = again[&maria].counts.expect("counts");
        if (c.databases_added, c.databases_updated, c.databases_gone) == (0, 0, 0) {
            clean = Some(c);
            break;
        }
    }
    assert!(
        clean.is_some(),
        "no sync without changes in five tries: not idempotent"
    );

    for name in hostile.iter().skip(1).chain([&plain, &newer]) {
        mariadb_exec(&format!("DROP DATABASE IF EXISTS {}", mysql_ident(name))).await;
    }
    for name in &pg_names {
        postgres_exec(&format!("DROP DATABASE IF EXISTS {}", pg_ident(name))).await;
    }
    agent.service.stop().await.expect("clean stop");
}

#[tokio::test]
async fn output_over_the_cap_is_a_parse_failure_and_a_hung_probe_a_command_failure() {
    let fleet = SshFleet::start(2).await;
    let db = TestDb::sqlite().await;
    let mut t = timeouts();
    t.command = Duration::from_secs(1);
    let agent = TestAgent::spawn(db.url(), fleet.client(t, 64 * 1024)).await;
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
    agent.service.stop().await.expect("clean stop");
}

#[tokio::test]
async fn a_request_during_a_run_gets_a_run_of_its_own_and_repeat_requests_one_job() {
    let fleet = SshFleet::start(1).await;
    let db = TestDb::sqlite().await;
    let agent = TestAgent::spawn(db.url(), fleet.client(timeouts(), DEFAULT_OUTPUT_CAP)).await;
    let (mut fleet_api, mut sync_api) = (agent.fleet(), agent.sync());
    let id = register_server(
        &mut fleet_api,
        "slow",
        fleet.host(0),
        SSH_USER,
        DatabaseService::Mariadb,
    )
    .await;
    // A slow server: the probe takes a second before answering for real.
    fleet
        .host(0)
        .install_program("sudo", "#!/bin/sh\nsleep 1\nexec /usr/bin/sudo \"$@\"\n");

    let start = |request_id: &str| StartSyncRequest {
        request_id: request_id.into(),
        server_ids: vec![id],
        ..Default::default()
    };
    let a = sync_api
        .start_sync(start("a"))
        .await
        .expect("a")
        .into_inner();
    // Wait until the run is in flight (its lease is held), then ask again.
    let conn = db.connect().await;
    wait_for_count(
        &conn,
        "SELECT COUNT(*) FROM server_leases WHERE holder IS NOT NULL",
        |n| n > 0,
        Duration::from_secs(5),
        "the run never started",
    )
    .await;
    let b = sync_api
        .start_sync(start("b"))
        .await
        .expect("b")
        .into_inner();
    assert_ne!(a.job_id, b.job_id);
    // The same request id is the same job, however often it is sent.
    let a_again = sync_api
        .start_sync(start("a"))
        .await
        .expect("a again")
        .into_inner();
    assert_eq!(
        (a_again.job_id.as_str(), a_again.created),
        (a.job_id.as_str(), false)
    );

    let mut finished = Vec::new();
    for job in [&a.job_id, &b.job_id] {
        let events = watch(&mut sync_api, job, 0).await;
        let outcome = &outcomes(&events)[&id];
        assert_eq!(outcome.outcome(), Outcome::Ok);
        let at = outcome.finished_at.as_ref().expect("finished_at");
        finished.push((at.seconds, at.nanos));
    }
    // B arrived while A's run was reading the server: what that run read may predate B (a
    // "sync after restore"), so B gets a run of its own, which finishes later.
    assert_eq!(
        count(&conn, "SELECT COUNT(*) FROM sync_runs").await,
        2,
        "the request made during a run is served by the next run"
    );
    assert!(finished[1] > finished[0], "{finished:?}");
    assert_eq!(
        count(&conn, "SELECT COUNT(*) FROM sync_jobs WHERE origin = 'rpc'").await,
        2
    );
    agent.service.stop().await.expect("clean stop");
}

async fn watch(client: &mut SyncAgentClient<Channel>, job_id: &str, cursor: u64) -> Vec<SyncEvent> {
    let stream = client
        .watch_sync(WatchSyncRequest {
            job_id: job_id.into(),
            cursor,
        })
        .await
        .expect("watch")
        .into_inner();
    tokio::time::timeout(
        Duration::from_secs(30),
        stream.map(|e| e.expect("event")).collect::<Vec<_>>(),
    )
    .await
    .expect("the watch ends within 30s")
}

#[tokio::test]
async fn a_watch_resumes_from_its_cursor_and_jobs_read_back() {
    let fleet = SshFleet::start(3).await;
    let db = TestDb::postgres().await;
    let agent = TestAgent::spawn(db.url(), fleet.client(timeouts(), DEFAULT_OUTPUT_CAP)).await;
    let (mut fleet_api, mut sync_api) = (agent.fleet(), agent.sync());
    let ids = register_fleet(&mut fleet_api, &fleet, "h", DatabaseService::Mariadb).await;
    let all = sync(&mut sync_api, &ids, "full").await;
    let job_id = summary(&all).job_id;
    // From cursor 2: the third outcome, then the summary.
    let tail = watch(&mut sync_api, &job_id, 2).await;
    assert_eq!(tail.iter().map(|e| e.cursor).collect::<Vec<_>>(), [3, 4]);
    assert_eq!(tail[0], all[2]);
    // From the summary's own cursor: nothing more, the stream just ends.
    let end = watch(&mut sync_api, &job_id, 4).await;
    assert!(end.is_empty(), "{end:?}");
    let read = sync_api
        .get_sync_job(GetSyncJobRequest {
            job_id: job_id.clone(),
            include_outcomes: true,
            page_size: 0,
            page_token: String::new(),
        })
        .await
        .expect("get job")
        .into_inner();
    let job = read.job.expect("job");
    assert_eq!(
        (job.total, job.finished, job.state()),
        (3, 3, pb::JobState::Done)
    );
    assert_eq!(
        job.outcome_counts,
        [pb::OutcomeCount {
            outcome: Outcome::Ok as i32,
            count: 3
        }]
    );
    assert_eq!(read.outcomes.len(), 3);
    assert!(
        read.next_page_token.is_empty(),
        "everything fit in one page"
    );

    // A page at a time: two, then the last one, in stream order.
    let page = |size: u32, token: &str| GetSyncJobRequest {
        job_id: job_id.clone(),
        include_outcomes: true,
        page_size: size,
        page_token: token.into(),
    };
    let first = sync_api
        .get_sync_job(page(2, ""))
        .await
        .expect("page 1")
        .into_inner();
    assert_eq!(first.outcomes.len(), 2);
    assert!(!first.next_page_token.is_empty());
    let second = sync_api
        .get_sync_job(page(2, &first.next_page_token))
        .await
        .expect("page 2")
        .into_inner();
    assert_eq!(second.outcomes.len(), 1);
    assert!(second.next_page_token.is_empty(), "the last page says so");
    let paged: Vec<_> = first.outcomes.iter().chain(&second.outcomes).collect();
    assert_eq!(paged, read.outcomes.iter().collect::<Vec<_>>());
    for (request, field) in [
        (page(2, "not-a-token"), "page_token"),
        (page(10_001, ""), "page_size"),
    ] {
        let err = sync_api.get_sync_job(request).await.expect_err("refused");
        assert_eq!(err.code(), Code::InvalidArgument, "{}", err.message());
        assert!(err.message().contains(field), "{}", err.message());
    }
    agent.service.stop().await.expect("clean stop");
}

#[tokio::test]
async fn malformed_and_hostile_requests_get_the_right_status() {
    let db = TestDb::sqlite().await;
    let fleet = SshFleet::start(1).await;
    let agent = TestAgent::spawn(db.url(), fleet.client(timeouts(), DEFAULT_OUTPUT_CAP)).await;
    let (mut fleet_api, mut sync_api) = (agent.fleet(), agent.sync());
    let id = register_server(
        &mut fleet_api,
        "one",
        fleet.host(0),
        SSH_USER,
        DatabaseService::Mariadb,
    )
    .await;
    let deadline = Duration::from_secs(10);
    fn code<T: std::fmt::Debug>(
        result: Result<tonic::Response<T>, tonic::Status>,
    ) -> (Code, String) {
        match result {
            Ok(r) => panic!("expected an error, got {r:?}"),
            Err(status) => (status.code(), status.message().to_owned()),
        }
    }
    let start = |r: StartSyncRequest| {
        let mut client = sync_api.clone();
        async move {
            tokio::time::timeout(deadline, client.start_sync(r))
                .await
                .expect("answers in time")
        }
    };

    let (c, m) = code(
        start(StartSyncRequest {
            server_ids: vec![id, 424242, 9],
            ..Default::default()
        })
        .await,
    );
    assert_eq!(c, Code::NotFound);
    assert!(m.contains("424242") && m.contains('9'), "{m}");
    let (c, m) = code(start(StartSyncRequest::default()).await);
    assert_eq!(
        (c, m.contains("empty selection")),
        (Code::InvalidArgument, true),
        "{m}"
    );
    let (c, m) = code(
        start(StartSyncRequest {
            server_ids: (1..=100_000).collect(),
            ..Default::default()
        })
        .await,
    );
    assert_eq!(
        (c, m.contains("at most 10000")),
        (Code::InvalidArgument, true),
        "{m}"
    );
    let (c, m) = code(
        start(StartSyncRequest {
            all_servers: true,
            scopes: vec![99],
            ..Default::default()
        })
        .await,
    );
    assert_eq!(
        (c, m.contains("unknown value 99")),
        (Code::InvalidArgument, true),
        "{m}"
    );
    let (c, _) = code(
        start(StartSyncRequest {
            server_ids: vec![-5],
            ..Default::default()
        })
        .await,
    );
    assert_eq!(c, Code::InvalidArgument);

    let job = sync_api
        .start_sync(StartSyncRequest {
            server_ids: vec![id],
            ..Default::default()
        })
        .await
        .expect("start")
        .into_inner();
    let watch_err = |job_id: &str, cursor: u64| {
        let mut client = sync_api.clone();
        let job_id = job_id.to_owned();
        async move {
            let result = tokio::time::timeout(
                deadline,
                client.watch_sync(WatchSyncRequest { job_id, cursor }),
            )
            .await
            .expect("answers in time");
            result.map(|_| ()).expect_err("must fail").code()
        }
    };
    assert_eq!(
        watch_err(&job.job_id, 3).await,
        Code::OutOfRange,
        "a bogus cursor"
    );
    assert_eq!(watch_err(&job.job_id, u64::MAX).await, Code::OutOfRange);
    assert_eq!(watch_err("no-such-job", 0).await, Code::NotFound);
    assert_eq!(watch_err("", 0).await, Code::InvalidArgument);
    let (c, _) = code(
        sync_api
            .get_sync_job(GetSyncJobRequest {
                job_id: "nope".into(),
                include_outcomes: true,
                page_size: 0,
                page_token: String::new(),
            })
            .await,
    );
    assert_eq!(c, Code::NotFound);

    // A request over the 4 MiB message limit: tonic answers OUT_OF_RANGE (its code for a
    // message too large to decode, documented in the README), saying so; nothing is created.
    let huge = StartSyncRequest {
        server_ids: (1_000_000..=2_500_000).collect(),
        ..Default::default()
    };
    let (c, m) = code(
        sync_api
            .clone()
            .max_encoding_message_size(64 << 20)
            .start_sync(huge)
            .await,
    );
    assert_eq!(c, Code::OutOfRange, "{m}");
    assert!(m.contains("message length too large"), "{m}");

    // Fleet: unknown ids, bad fields (each named), unknown enum values, bad page tokens.
    let (c, m) = code(fleet_api.get_server(GetServerRequest { id: 987654 }).await);
    assert_eq!((c, m.as_str()), (Code::NotFound, "server 987654 not found"));
    let (c, _) = code(
        fleet_api
            .delete_server(pb::DeleteServerRequest { id: 987654 })
            .await,
    );
    assert_eq!(c, Code::NotFound);
    let (c, _) = code(
        fleet_api
            .reset_host_key(ResetHostKeyRequest { id: 0 })
            .await,
    );
    assert_eq!(c, Code::InvalidArgument);
    let bad = |spec: ServerSpec| {
        let mut client = fleet_api.clone();
        async move {
            let status = client
                .upsert_server(UpsertServerRequest {
                    id: 0,
                    spec: Some(spec),
                })
                .await
                .expect_err("invalid");
            (status.code(), status.message().to_owned())
        }
    };
    let good = ServerSpec {
        name: "x".into(),
        ip: "127.0.0.1".into(),
        port: 22,
        ssh_user: "vito".into(),
        database_service: DatabaseService::Mysql as i32,
        database_version: String::new(),
        status: 0,
    };
    for (spec, field) in [
        (
            ServerSpec {
                name: String::new(),
                ..good.clone()
            },
            "spec.name",
        ),
        (
            ServerSpec {
                ip: "300.1.1.1 ; rm -rf /".into(),
                ..good.clone()
            },
            "spec.ip",
        ),
        (
            // Digits and dots that are no IPv4 address: refused now, not a DNS failure later.
            ServerSpec {
                ip: "999.1.1.1".into(),
                ..good.clone()
            },
            "spec.ip",
        ),
        (
            ServerSpec {
                ip: "db.123".into(),
                ..good.clone()
            },
            "spec.ip",
        ),
        (
            ServerSpec {
                port: 70000,
                ..good.clone()
            },
            "spec.port",
        ),
        (
            ServerSpec {
                database_service: 17,
                ..good.clone()
            },
            "spec.database_service",
        ),
        (
            ServerSpec {
                database_service: 0,
                ..good.clone()
            },
            "spec.database_service",
        ),
    ] {
        let (c, m) = bad(spec).await;
        assert_eq!(c, Code::InvalidArgument);
        assert!(m.contains(field), "{m}");
    }
    let (c, _) = code(
        fleet_api
            .upsert_server(UpsertServerRequest {
                id: 555,
                spec: Some(good.clone()),
            })
            .await,
    );
    assert_eq!(c, Code::NotFound, "update of an unknown id");
    let (c, _) = code(
        fleet_api
            .list_servers(ListServersRequest {
                reachability: 9,
                ..Default::default()
            })
            .await,
    );
    assert_eq!(c, Code::InvalidArgument);
    let (c, _) = code(
        fleet_api
            .list_servers(ListServersRequest {
                page_token: "abc".into(),
                ..Default::default()
            })
            .await,
    );
    assert_eq!(c, Code::InvalidArgument);
    let (c, _) = code(
        fleet_api
            .list_servers(ListServersRequest {
                page_size: 5000,
                ..Default::default()
            })
            .await,
    );
    assert_eq!(c, Code::InvalidArgument);

    // The agent is still fine.
    let list = fleet_api
        .list_servers(ListServersRequest::default())
        .await
        .expect("list")
        .into_inner();
    assert_eq!(list.servers.len(), 1);
    agent.service.stop().await.expect("clean stop");
}

#[tokio::test]
async fn fleet_upserts_by_name_pages_and_deletes() {
    let db = TestDb::mariadb().await;
    migrate(db.url()).await;
    let agent = TestAgent::spawn_with(
        db.url(),
        fleetsync_sync_agent::ssh::SshClient::new(timeouts(), 1024, Default::default()),
        test_runner_config(),
    )
    .await;
    let mut fleet_api = agent.fleet();
    let spec = |name: &str, service: DatabaseService| ServerSpec {
        name: name.into(),
        ip: "192.0.2.10".into(),
        port: 0,
        ssh_user: String::new(),
        database_service: service as i32,
        database_version: "10.11".into(),
        status: 0,
    };
    let mut ids = Vec::new();
    for i in 0..5 {
        let r = fleet_api
            .upsert_server(UpsertServerRequest {
                id: 0,
                spec: Some(spec(&format!("s{i}"), DatabaseService::Mariadb)),
            })
            .await
            .expect("create")
            .into_inner();
        assert!(r.created);
        ids.push(r.server.expect("server").id);
    }
    // Same name: an update, not a second server; the service can change.
    let r = fleet_api
        .upsert_server(UpsertServerRequest {
            id: 0,
            spec: Some(spec("s0", DatabaseService::Postgresql)),
        })
        .await
        .expect("update")
        .into_inner();
    assert!(!r.created);
    let s0 = r.server.expect("server");
    assert_eq!(s0.id, ids[0]);
    let s0_spec = s0.spec.clone().expect("spec");
    assert_eq!((s0_spec.port, s0_spec.ssh_user.as_str()), (22, "vito"));
    assert_eq!(s0_spec.database_service(), DatabaseService::Postgresql);
    assert_eq!(s0.reachability(), pb::Reachability::Unknown);
    // Renaming onto another server's name is refused.
    let status = fleet_api
        .upsert_server(UpsertServerRequest {
            id: ids[1],
            spec: Some(spec("s2", DatabaseService::None)),
        })
        .await
        .expect_err("clash");
    assert_eq!(status.code(), Code::AlreadyExists);

    let page = fleet_api
        .list_servers(ListServersRequest {
            page_size: 2,
            ..Default::default()
        })
        .await
        .expect("page 1")
        .into_inner();
    assert_eq!(
        page.servers.iter().map(|s| s.id).collect::<Vec<_>>(),
        ids[..2]
    );
    let page2 = fleet_api
        .list_servers(ListServersRequest {
            page_size: 2,
            page_token: page.next_page_token,
            ..Default::default()
        })
        .await
        .expect("page 2")
        .into_inner();
    assert_eq!(
        page2.servers.iter().map(|s| s.id).collect::<Vec<_>>(),
        ids[2..4]
    );
    let offline = fleet_api
        .list_servers(ListServersRequest {
            reachability: pb::Reachability::Offline as i32,
            ..Default::default()
        })
        .await
        .expect("filter")
        .into_inner();
    assert!(offline.servers.is_empty());

    fleet_api
        .delete_server(pb::DeleteServerRequest { id: ids[4] })
        .await
        .expect("delete");
    let status = fleet_api
        .get_server(GetServerRequest { id: ids[4] })
        .await
        .expect_err("gone");
    assert_eq!(status.code(), Code::NotFound);
    agent.service.stop().await.expect("clean stop");
}

/// The incident with the agent: servers registered before the charset/collation migration,
/// half of them offline, the agent down while `migrate` runs. The request waits in the outbox,
/// and the agent serves it once when it starts: one outcome per server, charset and collation
/// filled in on the online ones. A later `migrate` hands the same request to the running agent
/// and gets the same job back.
async fn migration_with_half_the_fleet_offline(backend: Backend) {
    let fleet = SshFleet::start(4).await;
    let db = TestDb::create(backend).await;
    let run = migrator(
        db.url(),
        &["migrate", "--no-dispatch", "--target", "20240101000004"],
    )
    .await;
    assert_eq!(run.code(), 0, "{}", run.stderr);
    let conn = db.connect().await;
    for (i, host) in fleet.hosts().iter().enumerate() {
        execute(
            &conn,
            &format!(
                "INSERT INTO servers (name, ip, port, ssh_user, status, created_at, updated_at) \
                 VALUES ('vito-{i}', '{}', {}, '{SSH_USER}', 'ready', 0, 0)",
                host.addr(),
                host.port()
            ),
        )
        .await;
        execute(
            &conn,
            &format!(
                "INSERT INTO services (server_id, type, name, version, status, created_at, updated_at) \
                 SELECT id, 'database', 'mariadb', '10.11', 'ready', 0, 0 FROM servers WHERE name = 'vito-{i}'"
            ),
        )
        .await;
    }
    let (databases, collation) = if backend == Backend::MySql {
        ("`databases`", "`collation`")
    } else {
        ("databases", "\"collation\"")
    };
    execute(
        &conn,
        &format!(
            "INSERT INTO {databases} (server_id, name, status, created_at, updated_at) \
             SELECT id, 'test', 'ready', 0, 0 FROM servers"
        ),
    )
    .await;
    fleet.host(2).stop();
    fleet.host(3).stop();

    // The agent is not running: migrate exits 0 at once, the request waits.
    let started = Instant::now();
    let run = migrator(db.url(), &["migrate", "--agent-url", "http://127.0.0.1:1"]).await;
    assert_eq!(run.code(), 0, "{}{}", run.stdout, run.stderr);
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "{:?}",
        started.elapsed()
    );
    assert!(run.stderr.contains("stays pending"), "{}", run.stderr);

    let agent = TestAgent::spawn_with(
        db.url(),
        fleet.client(timeouts(), DEFAULT_OUTPUT_CAP),
        test_runner_config(),
    )
    .await;
    let mut sync_api = agent.sync();
    // The agent drains the outbox as it starts: find the job of the migration's request.
    let deadline = Instant::now() + Duration::from_secs(10);
    let job_id = loop {
        let taken = conn
            .fetch_optional(
                "SELECT job_id FROM sync_requests WHERE state = 'taken'",
                &[],
            )
            .await
            .expect("outbox");
        if let Some(row) = taken {
            break row.text(0).expect("job id");
        }
        assert!(
            Instant::now() < deadline,
            "the agent never took the request"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let events = watch(&mut sync_api, &job_id, 0).await;
    let got = outcomes(&events);
    assert_eq!(got.len(), 4, "one outcome per server");
    let by_name: BTreeMap<&str, Outcome> = got
        .values()
        .map(|o| (o.server_name.as_str(), o.outcome()))
        .collect();
    assert_eq!(by_name["vito-0"], Outcome::Ok);
    assert_eq!(by_name["vito-1"], Outcome::Ok);
    assert_eq!(by_name["vito-2"], Outcome::Unreachable);
    assert_eq!(by_name["vito-3"], Outcome::Unreachable);
    let s = summary(&events);
    assert_eq!(s.origin(), pb::JobOrigin::Migration);
    assert_eq!(s.request_id, "migration-20250215120213");
    let filled = count(
        &conn,
        &format!(
            "SELECT COUNT(*) FROM {databases} WHERE name = 'test' AND charset IS NOT NULL \
             AND {collation} IS NOT NULL"
        ),
    )
    .await;
    assert_eq!(filled, 2, "the online servers have charset and collation");

    // Handed over again by a later migrate: the same job, not a second one.
    let run = migrator(
        db.url(),
        &[
            "migrate",
            "--agent-url",
            &format!("http://{}", agent.service.addr),
        ],
    )
    .await;
    assert_eq!(run.code(), 0, "{}", run.stderr);
    assert_eq!(
        count(
            &conn,
            "SELECT COUNT(*) FROM sync_jobs WHERE origin = 'migration'"
        )
        .await,
        1
    );
    assert_eq!(
        count(
            &conn,
            "SELECT COUNT(*) FROM sync_requests WHERE state = 'taken'"
        )
        .await,
        1
    );
    tokio::time::sleep(Duration::from_millis(700)).await; // one more outbox drain
    assert_eq!(
        count(
            &conn,
            "SELECT COUNT(*) FROM sync_jobs WHERE origin = 'migration'"
        )
        .await,
        1,
        "exactly once"
    );
    agent.service.stop().await.expect("clean stop");
}

#[tokio::test]
async fn migration_with_half_the_fleet_offline_sqlite() {
    migration_with_half_the_fleet_offline(Backend::Sqlite).await;
}

#[tokio::test]
async fn migration_with_half_the_fleet_offline_postgres() {
    migration_with_half_the_fleet_offline(Backend::Postgres).await;
}

#[tokio::test]
async fn migration_with_half_the_fleet_offline_mariadb() {
    migration_with_half_the_fleet_offline(Backend::MySql).await;
}

#[tokio::test]
async fn migrate_hands_its_request_to_a_running_agent() {
    // A database migrated but for the incident migration cannot run an agent; so the agent
    // runs on a fully migrated database whose request is still pending, as after a dispatch
    // that failed, and `migrate` (a no-op) hands the request over.
    let db = TestDb::sqlite().await;
    let run = migrator(db.url(), &["migrate", "--no-dispatch"]).await;
    assert_eq!(run.code(), 0);
    let mut config = test_runner_config();
    config.outbox_interval = Duration::from_secs(3600);
    let conn = db.connect().await;
    // Pretend the agent already drained once: only the dispatch can deliver the request now.
    let agent = TestAgent::spawn_with(
        db.url(),
        fleetsync_sync_agent::ssh::SshClient::new(timeouts(), 1024, Default::default()),
        config,
    )
    .await;
    wait_for_count(
        &conn,
        "SELECT COUNT(*) FROM sync_requests WHERE state = 'taken'",
        |n| n > 0,
        Duration::from_secs(5),
        "the start-up drain took nothing",
    )
    .await;
    execute(&conn, "UPDATE sync_requests SET state = 'pending'").await;
    let run = migrator(
        db.url(),
        &[
            "migrate",
            "--agent-url",
            &format!("http://{}", agent.service.addr),
        ],
    )
    .await;
    assert_eq!(run.code(), 0, "{}", run.stderr);
    assert!(
        run.stdout.contains("handed to the sync-agent: job"),
        "{}{}",
        run.stdout,
        run.stderr
    );
    assert_eq!(
        count(
            &conn,
            "SELECT COUNT(*) FROM sync_jobs WHERE origin = 'migration'"
        )
        .await,
        1
    );
    assert_eq!(
        count(
            &conn,
            "SELECT COUNT(*) FROM sync_requests WHERE state = 'taken'"
        )
        .await,
        1
    );
    agent.service.stop().await.expect("clean stop");
}

#[tokio::test]
async fn an_agent_that_lost_its_lease_writes_nothing_and_runs_serve_only_older_requests() {
    use fleetsync_sync_agent::store::{Completion, Reach, Recorded, RunResult, Store};
    for backend in [Backend::Sqlite, Backend::Postgres, Backend::MySql] {
        let db = TestDb::create(backend).await;
        migrate(db.url()).await;
        let conn = db.connect().await;
        let store = Store::new(conn.clone());
        let spec = fleetsync_sync_agent::store::ServerSpec {
            name: "leased".into(),
            ip: "192.0.2.1".into(),
            port: 22,
            ssh_user: "vito".into(),
            database_service: None,
            database_version: String::new(),
            status: None,
        };
        let server = store
            .upsert_server(None, &spec)
            .await
            .expect("server")
            .server
            .id;
        let job = |request: &str| fleetsync_sync_agent::store::NewJob {
            request_id: request.into(),
            origin: fleetsync_sync_agent::store::JobOrigin::Rpc,
            selection: fleetsync_sync_agent::store::Selection::Ids(vec![server]),
            scopes: "databases".into(),
            force: false,
            reason: String::new(),
        };
        let (before, _) = store.create_job(&job("before")).await.expect("job");

        let a = store.claim("agent-a", 60_000, 10).await.expect("claim");
        assert_eq!(a.len(), 1, "{backend}: the waiting server is claimed");
        let a = a[0].claim;
        assert!(
            store
                .claim("agent-b", 60_000, 10)
                .await
                .expect("claim")
                .is_empty(),
            "{backend}: a held lease is not claimed again"
        );
        // A request that arrives while A's run is in flight ("sync after restore") must not be
        // answered with what A read before it.
        tokio::time::sleep(Duration::from_millis(5)).await;
        let (during, _) = store.create_job(&job("during")).await.expect("job");
        // (A claim serves requests up to its own millisecond.)
        tokio::time::sleep(Duration::from_millis(5)).await;

        // Agent A stalls past its lease; agent B takes over with a newer token.
        execute(&conn, "UPDATE server_leases SET expires_at = 0").await;
        let b = store.claim("agent-b", 60_000, 10).await.expect("claim");
        assert_eq!(b.len(), 1, "{backend}: an expired lease is claimed");
        let b = b[0].claim;
        assert!(b.token > a.token, "tokens grow on every claim");

        let completion = |claim, outcome: &str| Completion {
            claim,
            result: RunResult {
                outcome: outcome.into(),
                ..RunResult::default()
            },
            inventory: None,
            pin: None,
            reach: Reach::Online,
        };
        let stale = store
            .complete("agent-a", &[completion(a, "AUTH_FAILED")])
            .await
            .expect("record");
        assert_eq!(
            stale,
            [Recorded::LeaseLost],
            "{backend}: the stale agent is fenced off"
        );
        assert_eq!(count(&conn, "SELECT COUNT(*) FROM sync_runs").await, 0);

        // B's claim came after both requests: its run serves both.
        let fresh = store
            .complete("agent-b", &[completion(b, "OK")])
            .await
            .expect("record");
        let Recorded::Stored { jobs, .. } = &fresh[0] else {
            panic!("{backend}: {fresh:?}")
        };
        let mut expected = vec![before.id.clone(), during.id.clone()];
        expected.sort();
        assert_eq!(*jobs, expected, "{backend}");

        // Now a run that started before a request: the request waits for the next run.
        let c = store.claim("agent-c", 60_000, 10).await.expect("claim");
        assert!(c.is_empty(), "{backend}: nothing waits");
        let (first, _) = store.create_job(&job("first")).await.expect("job");
        tokio::time::sleep(Duration::from_millis(5)).await;
        let c = store.claim("agent-c", 60_000, 10).await.expect("claim")[0].claim;
        tokio::time::sleep(Duration::from_millis(5)).await;
        let (late, _) = store.create_job(&job("late")).await.expect("job");
        let served = store
            .complete("agent-c", &[completion(c, "OK")])
            .await
            .expect("record");
        assert!(
            matches!(&served[0], Recorded::Stored { jobs, .. } if *jobs == [first.id.clone()]),
            "{backend}: only the request older than the claim is served: {served:?}"
        );
        let late_job = store.job(&late.id).await.expect("job").expect("exists");
        assert_eq!(late_job.finished, 0, "{backend}: the late request waits");
        let again = store.claim("agent-c", 60_000, 10).await.expect("claim");
        assert_eq!(
            again.len(),
            1,
            "{backend}: the server waits again for the late request"
        );
        let served = store
            .complete("agent-c", &[completion(again[0].claim, "OK")])
            .await
            .expect("record");
        assert!(
            matches!(&served[0], Recorded::Stored { jobs, .. } if *jobs == [late.id.clone()]),
            "{backend}: {served:?}"
        );
        // An agent that stalled past its lease writes nothing even if nobody took over: it may
        // have timed out on its own stall. The server waits for a run that did not stall.
        let (stalled, _) = store.create_job(&job("stalled")).await.expect("job");
        tokio::time::sleep(Duration::from_millis(5)).await;
        let d = store.claim("agent-d", 60_000, 10).await.expect("claim")[0].claim;
        execute(&conn, "UPDATE server_leases SET expires_at = 0").await;
        // Its heartbeat, overdue after the stall, does not revive the expired lease.
        assert_eq!(
            store
                .renew("agent-d", &[server], 60_000)
                .await
                .expect("renew"),
            0,
            "{backend}: an expired lease stays expired"
        );
        let late = store
            .complete("agent-d", &[completion(d, "HANDSHAKE_FAILED")])
            .await
            .expect("record");
        assert_eq!(
            late,
            [Recorded::LeaseLost],
            "{backend}: an expired lease is lost"
        );
        let d = store.claim("agent-d", 60_000, 10).await.expect("claim");
        assert_eq!(d.len(), 1, "{backend}: the server still waits");
        let served = store
            .complete("agent-d", &[completion(d[0].claim, "OK")])
            .await
            .expect("record");
        assert!(
            matches!(&served[0], Recorded::Stored { jobs, .. } if *jobs == [stalled.id.clone()]),
            "{backend}: {served:?}"
        );
        let job = store.job(&before.id).await.expect("job").expect("exists");
        assert_eq!(job.outcome_counts, [("OK".to_owned(), 1)], "{backend}");
        assert!(
            store
                .claim("agent-c", 60_000, 10)
                .await
                .expect("claim")
                .is_empty(),
            "{backend}: nothing waits once every request is served"
        );
    }
}

#[tokio::test]
async fn grpcurl_syncs_one_server_and_streams_its_outcome() {
    let fleet = SshFleet::start(1).await;
    let dir = tempfile::tempdir().expect("temp dir");
    let db = TestDb::sqlite().await;
    migrate(db.url()).await;
    let key = fleet.client_key().to_str().expect("utf-8 path").to_owned();
    let agent = fleetsync_tests::services::ServeProcess::start(
        "sync-agent",
        &["--database-url", db.url(), "--ssh-key", &key],
        dir.path(),
    );
    let addr = agent.addr.to_string();
    let grpcurl = std::env::var("FLEETSYNC_GRPCURL").unwrap_or_else(|_| "grpcurl".into());
    let run = |args: Vec<String>| {
        let output = std::process::Command::new(&grpcurl)
            .args(&args)
            .output()
            .expect("run grpcurl (`just setup`)");
        assert!(
            output.status.success(),
            "grpcurl {args:?}: {}",
            String::from_utf8_lossy(&output.stderr)
        );
        String::from_utf8(output.stdout).expect("utf-8")
    };
    let host = fleet.host(0);
    let registered = run(vec![
        "-plaintext".into(),
        "-d".into(),
        format!(
            r#"{{"spec": {{"name": "db-1", "ip": "{}", "port": {}, "sshUser": "{SSH_USER}", "databaseService": "DATABASE_SERVICE_MARIADB"}}}}"#,
            host.addr(),
            host.port()
        ),
        addr.clone(),
        "fleetsync.sync.v1.Fleet/UpsertServer".into(),
    ]);
    assert!(registered.contains("\"created\": true"), "{registered}");
    let streamed = run(vec![
        "-plaintext".into(),
        "-d".into(),
        r#"{"serverIds": ["1"], "reason": "manual"}"#.into(),
        addr.clone(),
        "fleetsync.sync.v1.SyncAgent/Sync".into(),
    ]);
    assert!(
        streamed.contains("\"outcome\": \"OUTCOME_OK\""),
        "{streamed}"
    );
    assert!(streamed.contains("\"serverName\": \"db-1\""), "{streamed}");
    assert!(
        streamed.contains("\"state\": \"JOB_STATE_DONE\""),
        "{streamed}"
    );
    let server = run(vec![
        "-plaintext".into(),
        "-d".into(),
        r#"{"id": "1"}"#.into(),
        addr,
        "fleetsync.sync.v1.Fleet/GetServer".into(),
    ]);
    assert!(server.contains("\"name\": \"test\""), "{server}");
    assert!(server.contains("REACHABILITY_ONLINE"), "{server}");
}

fn peak_rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("read status");
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmHWM")
}

#[tokio::test]
async fn a_flood_of_output_does_not_grow_the_agents_memory() {
    let fleet = SshFleet::start(1).await;
    let dir = tempfile::tempdir().expect("temp dir");
    let db = TestDb::sqlite().await;
    migrate(db.url()).await;
    let key = fleet.client_key().to_str().expect("utf-8").to_owned();
    let agent = fleetsync_tests::services::ServeProcess::start(
        "sync-agent",
        &[
            "--database-url",
            db.url(),
            "--ssh-key",
            &key,
            "--output-cap",
            "65536",
        ],
        dir.path(),
    );
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
    let before = peak_rss_kib(agent.pid());
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
    let after = peak_rss_kib(agent.pid());
    eprintln!("agent peak RSS: {before} KiB before, {after} KiB after 512 MiB of output");
    assert!(
        after < before + 32 * 1024,
        "peak RSS grew from {before} KiB to {after} KiB for 512 MiB of output"
    );
}
