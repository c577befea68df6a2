//! Offline tracking against real sshd processes: backoff, skipping, probing on schedule,
//! recovery, forced syncs, and `CheckConnection`.

use std::time::{Duration, Instant};

use fleetsync_common::Backend;
use fleetsync_common::proto::sync::v1::{
    self as pb, CheckConnectionRequest, DatabaseService, GetServerRequest, HostKeyCheck, Outcome,
    ServerSpec, StartSyncRequest, UnreachableCause, UpsertServerRequest, fleet_client::FleetClient,
    sync_agent_client::SyncAgentClient, sync_event,
};
use fleetsync_sync_agent::ssh::Timeouts;
use fleetsync_tests::{
    Scenario,
    catalog::{count, wait_for_count},
    fleet::SSH_USER,
    services::{register_fleet, register_server},
};
use tokio_stream::StreamExt;
use tonic::transport::Channel;

fn timeouts() -> Timeouts {
    Timeouts {
        connect: Duration::from_secs(2),
        handshake: Duration::from_secs(2),
        auth: Duration::from_secs(2),
        command: Duration::from_secs(10),
    }
}

async fn sync_all(client: &mut SyncAgentClient<Channel>, force: bool) -> Vec<pb::ServerOutcome> {
    let stream = client
        .sync(StartSyncRequest {
            all_servers: true,
            force,
            ..Default::default()
        })
        .await
        .expect("sync")
        .into_inner();
    let events: Vec<_> = tokio::time::timeout(
        Duration::from_secs(20),
        stream.map(|e| e.expect("event")).collect::<Vec<_>>(),
    )
    .await
    .expect("job ends");
    events
        .into_iter()
        .filter_map(|e| match e.event {
            Some(sync_event::Event::Outcome(o)) => Some(o),
            _ => None,
        })
        .collect()
}

async fn server(fleet: &mut FleetClient<Channel>, id: i64) -> pb::Server {
    fleet
        .get_server(GetServerRequest { id })
        .await
        .expect("get")
        .into_inner()
        .server
        .expect("server")
}

fn ms(t: Option<&prost_types::Timestamp>) -> i64 {
    let t = t.expect("timestamp");
    t.seconds * 1000 + i64::from(t.nanos) / 1_000_000
}

#[tokio::test]
async fn an_offline_server_is_skipped_probed_on_schedule_and_synced_when_back() {
    let scenario = Scenario::on(Backend::Sqlite)
        .hosts(2)
        .timeouts(timeouts())
        .start()
        .await;
    let (fleet, db, agent) = (&scenario.fleet, &scenario.db, scenario.agent());
    let (mut fleet_api, mut sync_api) = (agent.fleet(), agent.sync());
    let ids = register_fleet(&mut fleet_api, fleet, "h", DatabaseService::Mariadb).await;
    let (up, down) = (ids[0], ids[1]);
    assert!(
        sync_all(&mut sync_api, false)
            .await
            .iter()
            .all(|o| o.outcome() == Outcome::Ok)
    );

    // Taken offline: the next bulk sync tries, fails, and schedules a probe.
    fleet.host(1).stop();
    let before = fleetsync_sync_agent::now_ms();
    let outcomes = sync_all(&mut sync_api, false).await;
    let failed = outcomes
        .iter()
        .find(|o| o.server_id == down)
        .expect("outcome");
    assert_eq!(
        (failed.outcome(), failed.cause()),
        (Outcome::Unreachable, UnreachableCause::Refused)
    );
    let next = ms(failed.next_probe_at.as_ref());
    // Backoff 1 s ±20%.
    assert!(
        next >= before + 800 && next <= fleetsync_sync_agent::now_ms() + 1200,
        "next probe {next}, now {before}"
    );
    let s = server(&mut fleet_api, down).await;
    assert_eq!(
        (s.reachability(), s.consecutive_failures),
        (pb::Reachability::Offline, 1)
    );

    // Bulk syncs while it is in backoff skip it, with its next probe time, without connecting.
    for _ in 0..3 {
        let outcomes = sync_all(&mut sync_api, false).await;
        let skipped = outcomes
            .iter()
            .find(|o| o.server_id == down)
            .expect("outcome");
        if fleetsync_sync_agent::now_ms() < next - 100 {
            assert_eq!(
                skipped.outcome(),
                Outcome::SkippedOffline,
                "{}",
                skipped.message
            );
            assert_eq!(ms(skipped.next_probe_at.as_ref()), next);
            assert_eq!(skipped.duration.as_ref().map_or(0, |d| d.seconds), 0);
        }
        assert_eq!(
            outcomes
                .iter()
                .find(|o| o.server_id == up)
                .map(|o| o.outcome()),
            Some(Outcome::Ok)
        );
    }

    // Probed on schedule, not on every sync: after a few seconds of probes with backoff, the
    // failures grow by the schedule (1 s, 2 s, 4 s: about three), not by the syncs.
    tokio::time::sleep(Duration::from_millis(3500)).await;
    let failures = server(&mut fleet_api, down).await.consecutive_failures;
    assert!(
        (2..=4).contains(&failures),
        "{failures} failures after 3.5 s of backoff"
    );

    // A forced sync tries it right away.
    let forced = sync_all(&mut sync_api, true).await;
    assert_eq!(
        forced
            .iter()
            .find(|o| o.server_id == down)
            .map(|o| o.outcome()),
        Some(Outcome::Unreachable)
    );

    // Back up: the probe finds it and a recovery sync runs, within the backoff (at most 4 s
    // +20%) plus one probe interval.
    fleet.host(1).start().await;
    let back = Instant::now();
    let conn = db.connect().await;
    let s = fleetsync_tests::poll_until(
        "not synced after it came back",
        Duration::from_secs(7).saturating_sub(back.elapsed()),
        || async {
            let s = server(&mut fleet_api.clone(), down).await;
            let recovered = count(
                &conn,
                "SELECT COUNT(*) FROM sync_jobs WHERE origin = 'recovery'",
            )
            .await;
            if s.reachability() == pb::Reachability::Online
                && recovered == 1
                && s.last_outcome.as_ref().map(|o| o.outcome()) == Some(Outcome::Ok)
            {
                Ok(s)
            } else {
                Err(format!("{s:?}"))
            }
        },
    )
    .await;
    assert_eq!(s.consecutive_failures, 0);
    scenario.stop().await;
}

#[tokio::test]
async fn check_connection_reports_each_stage() {
    let scenario = Scenario::on(Backend::Postgres)
        .hosts(2)
        .timeouts(timeouts())
        .start()
        .await;
    let (fleet, agent) = (&scenario.fleet, scenario.agent());
    let (mut fleet_api, mut sync_api) = (agent.fleet(), agent.sync());
    let ids = register_fleet(&mut fleet_api, fleet, "c", DatabaseService::None).await;
    let check = |id| {
        let mut client = sync_api.clone();
        async move {
            client
                .check_connection(CheckConnectionRequest { server_id: id })
                .await
                .expect("check")
                .into_inner()
        }
    };
    let fresh = check(ids[0]).await;
    assert_eq!(fresh.outcome(), Outcome::Ok, "{}", fresh.message);
    assert!(
        fresh.authenticated && fresh.banner.starts_with("SSH-2.0-OpenSSH"),
        "{fresh:?}"
    );
    assert_eq!(fresh.host_key_check(), HostKeyCheck::NotPinned);
    assert_eq!(
        fresh.host_key_fingerprint,
        fleet.host(0).host_key().fingerprint
    );
    assert!(fresh.connect_latency.is_some());
    // The check never pins; a sync does (even of a server without a database service? no: it is
    // skipped without connecting), so pin by syncing a server that has one.
    let s = server(&mut fleet_api, ids[0]).await;
    assert!(s.host_key.is_none(), "a check does not pin");

    fleet.host(1).stop();
    let down = check(ids[1]).await;
    assert_eq!(
        (down.outcome(), down.cause()),
        (Outcome::Unreachable, UnreachableCause::Refused)
    );
    assert!(!down.authenticated && down.banner.is_empty());

    // Pinned by a sync, then the key changes: the check says so and does not log in.
    fleet_api
        .upsert_server(UpsertServerRequest {
            id: ids[0],
            spec: Some(ServerSpec {
                name: "c0".into(),
                ip: fleet.host(0).addr().to_string(),
                port: u32::from(fleet.host(0).port()),
                ssh_user: SSH_USER.into(),
                database_service: DatabaseService::Mariadb as i32,
                ..Default::default()
            }),
        })
        .await
        .expect("update");
    let synced = sync_api
        .clone()
        .sync(StartSyncRequest {
            server_ids: vec![ids[0]],
            ..Default::default()
        })
        .await
        .expect("sync")
        .into_inner()
        .collect::<Vec<_>>()
        .await;
    assert!(!synced.is_empty());
    assert_eq!(check(ids[0]).await.host_key_check(), HostKeyCheck::Match);
    fleet.host(0).rotate_host_key().await;
    let changed = check(ids[0]).await;
    assert_eq!(changed.outcome(), Outcome::HostKeyMismatch);
    assert_eq!(changed.host_key_check(), HostKeyCheck::Mismatch);
    assert!(!changed.authenticated);

    let status = sync_api
        .check_connection(CheckConnectionRequest { server_id: 777 })
        .await
        .expect_err("unknown");
    assert_eq!(status.code(), tonic::Code::NotFound);
    scenario.stop().await;
}

#[tokio::test]
async fn servers_that_are_up_are_resynced_every_interval() {
    let scenario = Scenario::on(Backend::Sqlite)
        .hosts(1)
        .timeouts(timeouts())
        .runner(|r| r.sync_interval = Some(Duration::from_secs(1)))
        .start()
        .await;
    let (fleet, db) = (&scenario.fleet, &scenario.db);
    let mut fleet_api = scenario.fleet_api();
    let host = fleet.host(0);
    register_server(
        &mut fleet_api,
        "periodic",
        host,
        SSH_USER,
        DatabaseService::Mariadb,
    )
    .await;
    // No request at all: the schedule alone syncs it, once per interval.
    let conn = db.connect().await;
    // (Only the schedule's jobs count: the migration's sync request may cover it too.)
    wait_for_count(
        &conn,
        "SELECT COUNT(*) FROM sync_job_servers js JOIN sync_jobs j ON j.id = js.job_id \
         WHERE j.origin = 'schedule' AND js.outcome = 'OK'",
        |runs| runs >= 2,
        Duration::from_secs(8),
        "periodic syncs",
    )
    .await;
    let jobs = count(
        &conn,
        "SELECT COUNT(*) FROM sync_jobs WHERE origin = 'schedule'",
    )
    .await;
    let elapsed_intervals = 8;
    assert!(
        (2..=elapsed_intervals + 1).contains(&jobs),
        "{jobs} schedule jobs"
    );
    scenario.stop().await;
}

/// After an outage of many hosts, the prober notices them in parallel: thirty hosts that accept
/// TCP and never send a banner (each probe waits out the 1 s handshake timeout) are all probed
/// within a few seconds, not one after the other (which took thirty).
#[tokio::test]
async fn offline_servers_are_probed_in_parallel() {
    let silent = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let port = silent.local_addr().expect("addr").port();
    let holder = tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((socket, _)) = silent.accept().await {
            held.push(socket);
        }
    });
    let scenario = Scenario::on(Backend::Postgres)
        .timeouts(Timeouts {
            handshake: Duration::from_secs(1),
            ..timeouts()
        })
        .start()
        .await;
    let (db, agent) = (&scenario.db, scenario.agent());
    // Inserted once the agent runs: the migrations' sync requests became jobs of no servers,
    // so the sync below is the first these servers see.
    let conn = db.connect().await;
    fleetsync_tests::catalog::insert_servers(&conn, 30, port, |_| "127.0.0.1".into()).await;
    fleetsync_tests::catalog::add_mariadb_everywhere(&conn, "").await;
    // The first sync finds them all offline (one failure each, backoff about a second).
    let outcomes = sync_all(&mut agent.sync(), false).await;
    assert_eq!(outcomes.len(), 30);
    assert!(
        outcomes
            .iter()
            .all(|o| o.cause() == UnreachableCause::Timeout),
        "{outcomes:?}"
    );
    let probed = Instant::now();
    wait_for_count(
        &conn,
        "SELECT COUNT(*) FROM servers WHERE consecutive_failures >= 2",
        |n| n == 30,
        Duration::from_secs(8),
        "the prober did not probe every offline server",
    )
    .await;
    assert!(
        probed.elapsed() < Duration::from_secs(8),
        "{:?}",
        probed.elapsed()
    );
    scenario.stop().await;
    holder.abort();
}

/// A server registered with the host key the panel knows is pinned before its first contact:
/// on an address where another sshd answers (an impostor, a reused IP), the sync and the check
/// end HOST_KEY_MISMATCH without authenticating; with the right key, it syncs. A malformed key
/// is INVALID_ARGUMENT. Without a key, trust on first use stays.
#[tokio::test]
async fn a_host_key_given_at_registration_is_pinned_before_the_first_contact() {
    let scenario = Scenario::on(Backend::Sqlite)
        .hosts(2)
        .timeouts(timeouts())
        .start()
        .await;
    let (fleet, agent) = (&scenario.fleet, scenario.agent());
    let mut sync_api = agent.sync();
    let mut fleet_api = agent.fleet();
    let registrar = agent.fleet();
    let register = |name: &str, key: String| {
        let mut fleet_api = registrar.clone();
        let host = fleet.host(0);
        let spec = ServerSpec {
            name: name.into(),
            ip: host.addr().to_string(),
            port: u32::from(host.port()),
            ssh_user: SSH_USER.into(),
            database_service: DatabaseService::Mariadb as i32,
            host_key: key,
            ..Default::default()
        };
        async move {
            fleet_api
                .upsert_server(UpsertServerRequest {
                    id: 0,
                    spec: Some(spec),
                })
                .await
                .map(|r| r.into_inner().server.expect("server"))
        }
    };
    // Host 0 answers; the panel believes the server there has host 1's key.
    let impostor = register("expects-host-1", fleet.host(1).host_public_key())
        .await
        .expect("register");
    let pinned = impostor.host_key.as_ref().expect("pinned at registration");
    assert_eq!(pinned.fingerprint, fleet.host(1).host_key().fingerprint);
    assert!(pinned.pinned_at.is_some());
    let genuine = register("expects-host-0", fleet.host(0).host_public_key())
        .await
        .expect("register");
    let trusting = register("trusts-first-use", String::new())
        .await
        .expect("register");
    assert!(trusting.host_key.is_none(), "no key given, none pinned");

    let checked = sync_api
        .check_connection(CheckConnectionRequest {
            server_id: impostor.id,
        })
        .await
        .expect("check")
        .into_inner();
    assert_eq!(checked.outcome(), Outcome::HostKeyMismatch, "{checked:?}");
    assert_eq!(checked.host_key_check(), HostKeyCheck::Mismatch);
    assert!(!checked.authenticated, "nothing is sent to an impostor");

    let outcomes = sync_all(&mut sync_api, true).await;
    let of = |id: i64| {
        outcomes
            .iter()
            .find(|o| o.server_id == id)
            .unwrap_or_else(|| panic!("outcome of {id}: {outcomes:?}"))
            .outcome()
    };
    assert_eq!(of(impostor.id), Outcome::HostKeyMismatch);
    assert_eq!(of(genuine.id), Outcome::Ok);
    assert_eq!(of(trusting.id), Outcome::Ok);
    let trusted = server(&mut fleet_api, trusting.id).await;
    assert_eq!(
        trusted.host_key.map(|k| k.fingerprint),
        Some(fleet.host(0).host_key().fingerprint),
        "pinned on first use"
    );
    // The pin given for the impostor stands: the sync did not replace it.
    let still = server(&mut fleet_api, impostor.id).await;
    assert_eq!(
        still.host_key.map(|k| k.fingerprint),
        Some(fleet.host(1).host_key().fingerprint)
    );

    let bad = register("bad-key", "ssh-ed25519 not-base64!".into())
        .await
        .expect_err("a malformed key");
    assert_eq!(bad.code(), tonic::Code::InvalidArgument);
    assert!(bad.message().contains("spec.host_key"), "{}", bad.message());
}
