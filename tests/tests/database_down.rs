//! The control-plane database goes down under a running agent, then comes back: calls fail
//! with UNAVAILABLE (never hang), health says NOT_SERVING, and nothing is lost.

use std::time::{Duration, Instant};

use fleetsync_common::proto::sync::v1::{
    DatabaseService, ListServersRequest, ServerSpec, UpsertServerRequest,
};
use fleetsync_sync_agent::ssh::{ClientKeys, SshClient, Timeouts};
use fleetsync_tests::{
    Scenario, TestAgent, TestDb, proxy::TcpProxy, scenario::ScenarioBuilder,
    services::test_runner_config,
};
use tonic::Code;
use tonic_health::pb::{HealthCheckRequest, health_check_response::ServingStatus};

async fn status(agent: &TestAgent) -> ServingStatus {
    agent
        .service
        .health()
        .check(HealthCheckRequest {
            service: String::new(),
        })
        .await
        .expect("health answers even without a database")
        .into_inner()
        .status()
}

async fn wait_for(agent: &TestAgent, wanted: ServingStatus) {
    fleetsync_tests::poll_until(
        &format!("health never became {wanted:?}"),
        Duration::from_secs(15),
        || async {
            match status(agent).await {
                seen if seen == wanted => Ok(()),
                seen => Err(format!("{seen:?}")),
            }
        },
    )
    .await;
}

/// A PostgreSQL database with agents that reach it through a proxy that can cut it off.
async fn postgres_behind_a_proxy() -> (ScenarioBuilder, TcpProxy) {
    let db = TestDb::postgres().await;
    let proxy = TcpProxy::start("127.0.0.1:5432".parse().expect("addr")).await;
    let url = db.url().replace("127.0.0.1:5432", &proxy.addr.to_string());
    assert_ne!(url, db.url(), "the URL goes through the proxy");
    (Scenario::with_db(db).agent_url(url), proxy)
}

#[tokio::test]
async fn the_agent_survives_its_database_going_down() {
    let (scenario, proxy) = postgres_behind_a_proxy().await;
    let scenario = scenario
        .timeouts(Timeouts::default())
        .output_cap(1024)
        .start()
        .await;
    let agent = scenario.agent();
    let mut fleet = agent.fleet();
    fleet
        .upsert_server(UpsertServerRequest {
            id: 0,
            spec: Some(ServerSpec {
                name: "kept".into(),
                ip: "192.0.2.7".into(),
                database_service: DatabaseService::None as i32,
                ..Default::default()
            }),
        })
        .await
        .expect("register");

    proxy.cut();
    let started = Instant::now();
    let err = fleet
        .list_servers(ListServersRequest::default())
        .await
        .expect_err("database down");
    assert_eq!(err.code(), Code::Unavailable, "{}", err.message());
    assert!(
        err.message().contains("database unavailable"),
        "{}",
        err.message()
    );
    assert!(
        started.elapsed() < Duration::from_secs(8),
        "took {:?}",
        started.elapsed()
    );
    wait_for(agent, ServingStatus::NotServing).await;

    proxy.restore().await;
    wait_for(agent, ServingStatus::Serving).await;
    let servers = fleet
        .list_servers(ListServersRequest::default())
        .await
        .expect("back")
        .into_inner();
    assert_eq!(servers.servers.len(), 1, "nothing lost");
    assert_eq!(
        servers.servers[0].spec.as_ref().map(|s| s.name.as_str()),
        Some("kept")
    );
    scenario.stop().await;
}

/// An agent started while its database is down (a machine booting, a failover) stays up,
/// answers health NOT_SERVING, and serves once the database answers; shut down while it
/// waits, it ends cleanly. No crash loop under a service manager.
#[tokio::test]
async fn an_agent_started_while_its_database_is_down_waits_for_it() {
    use fleetsync_tests::services::agent_config;
    use tokio_util::sync::CancellationToken;
    use tonic_health::pb::health_client::HealthClient;

    let (scenario, proxy) = postgres_behind_a_proxy().await;
    // Migrated, no agent: this test starts its own, while the database is cut off.
    let scenario = scenario.agents(0).start().await;
    let url = scenario.agent_url().to_owned();
    proxy.cut();
    let start = |url: String| async move {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("addr");
        let shutdown = CancellationToken::new();
        let ssh = SshClient::new(Timeouts::default(), 1024, ClientKeys::default());
        let task = tokio::spawn(fleetsync_sync_agent::run(
            agent_config(&url, ssh, test_runner_config()),
            listener,
            shutdown.clone(),
        ));
        let channel = tonic::transport::Channel::from_shared(format!("http://{addr}"))
            .expect("uri")
            .connect_lazy();
        (task, shutdown, channel, addr)
    };
    let health_of = |channel: tonic::transport::Channel| async move {
        HealthClient::new(channel)
            .check(HealthCheckRequest::default())
            .await
            .map(|r| r.into_inner().status())
            .map_err(|s| s.to_string())
    };
    let health_becomes = |channel: tonic::transport::Channel, wanted: ServingStatus| async move {
        fleetsync_tests::poll_until(
            &format!("health {wanted:?}"),
            Duration::from_secs(30),
            || {
                let channel = channel.clone();
                async move {
                    match health_of(channel).await {
                        Ok(seen) if seen == wanted => Ok(()),
                        other => Err(format!("{other:?}")),
                    }
                }
            },
        )
        .await
    };

    let (task, shutdown, channel, addr) = start(url.clone()).await;
    health_becomes(channel.clone(), ServingStatus::NotServing).await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert!(!task.is_finished(), "the agent waits, it does not exit");
    assert_eq!(
        health_of(channel.clone()).await,
        Ok(ServingStatus::NotServing)
    );
    // As the README checks it: grpcurl finds health through reflection meanwhile too.
    let grpcurl = std::env::var("FLEETSYNC_GRPCURL").unwrap_or_else(|_| "grpcurl".into());
    let checked = tokio::process::Command::new(grpcurl)
        .args([
            "-plaintext",
            &addr.to_string(),
            "grpc.health.v1.Health/Check",
        ])
        .output()
        .await
        .expect("run grpcurl (`just setup`)");
    assert!(
        String::from_utf8_lossy(&checked.stdout).contains("NOT_SERVING"),
        "{}{}",
        String::from_utf8_lossy(&checked.stdout),
        String::from_utf8_lossy(&checked.stderr)
    );

    proxy.restore().await;
    health_becomes(channel.clone(), ServingStatus::Serving).await;
    let mut fleet = fleetsync_common::proto::sync::v1::fleet_client::FleetClient::new(channel);
    fleet
        .list_servers(ListServersRequest::default())
        .await
        .expect("served once the database is back");
    shutdown.cancel();
    task.await.expect("join").expect("a clean stop");

    // Shut down while it waits: a clean end, at once.
    proxy.cut();
    let (task, shutdown, channel, _addr) = start(url).await;
    health_becomes(channel, ServingStatus::NotServing).await;
    shutdown.cancel();
    let ended = tokio::time::timeout(Duration::from_secs(10), task)
        .await
        .expect("ends soon after shutdown");
    ended.expect("join").expect("a clean stop while waiting");
}

/// Runs that finish while the database is down wait for it: their outcomes are the real ones
/// once it is back (never CANCELLED or SKIPPED for a pool timeout), and the job completes.
///
/// The database is cut once every command has started, not once the leases are taken: a cut
/// right after the claim committed can lose the commit's answer on its way back (the proxy
/// runs on the test's runtime), and an agent that never learned of its claim runs nothing;
/// those leases lapse after the TTL (30 s here) and the servers are claimed again. That is
/// what CI once saw as "the runs never ended (waited 10s)".
#[tokio::test]
async fn runs_that_end_while_the_database_is_down_are_recorded_when_it_is_back() {
    use fleetsync_common::proto::sync::v1::{Outcome, WatchSyncRequest, sync_event};

    use tokio_stream::StreamExt;

    let (scenario, proxy) = postgres_behind_a_proxy().await;
    let scenario = scenario
        .hosts(3)
        .timeouts(Timeouts::default())
        .output_cap(1 << 20)
        .register("t", DatabaseService::Mariadb)
        .start()
        .await;
    let (fleet, db, agent, ids) = (
        &scenario.fleet,
        &scenario.db,
        scenario.agent(),
        &scenario.ids,
    );
    for host in fleet.hosts() {
        // Each run takes a second and a half: long enough to cut the database under it. The
        // command leaves a file when it starts and one when it ends, so the test knows where
        // the runs are.
        let started = host.program_dir().join("started");
        let finished = host.program_dir().join("finished");
        host.install_program(
            "sudo",
            &format!(
                "#!/bin/sh\ntouch '{}'\nsleep 1.5\n/usr/bin/sudo \"$@\"\nstatus=$?\ntouch '{}'\nexit $status\n",
                started.display(),
                finished.display()
            ),
        );
    }
    let mut sync = agent.sync();
    let job_id = agent.start_sync(ids).await;
    let direct = db.connect().await;
    // Every command has started: the agent holds its leases and knows it.
    fleetsync_tests::wait_until(
        "the commands never started",
        Duration::from_secs(30),
        || {
            fleet
                .hosts()
                .iter()
                .all(|host| host.program_dir().join("started").exists())
        },
    )
    .await;
    assert_eq!(
        fleetsync_tests::catalog::count(
            &direct,
            "SELECT COUNT(*) FROM server_leases WHERE holder IS NOT NULL"
        )
        .await,
        3,
        "the three leases are held"
    );
    proxy.cut();
    // The runs end while the database is unreachable; their results wait.
    fleetsync_tests::wait_until("the runs never ended", Duration::from_secs(10), || {
        fleet
            .hosts()
            .iter()
            .all(|host| host.program_dir().join("finished").exists())
    })
    .await;
    assert_eq!(
        fleetsync_tests::catalog::count(&direct, "SELECT COUNT(*) FROM sync_runs").await,
        0,
        "nothing could be written meanwhile"
    );
    proxy.restore().await;
    let events: Vec<_> = tokio::time::timeout(
        Duration::from_secs(30),
        sync.watch_sync(WatchSyncRequest { job_id, cursor: 0 })
            .await
            .expect("watch")
            .into_inner()
            .map(|e| e.expect("event"))
            .collect::<Vec<_>>(),
    )
    .await
    .expect("the job completes once the database is back");
    let outcomes: Vec<Outcome> = events
        .iter()
        .filter_map(|e| match &e.event {
            Some(sync_event::Event::Outcome(o)) => Some(o.outcome()),
            _ => None,
        })
        .collect();
    assert_eq!(outcomes, [Outcome::Ok; 3], "the real outcomes, once each");
    scenario.stop().await;
}
