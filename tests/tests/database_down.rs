//! The control-plane database goes down under a running agent, then comes back: calls fail
//! with UNAVAILABLE (never hang), health says NOT_SERVING, and nothing is lost.

use std::time::{Duration, Instant};

use fleetsync_common::proto::sync::v1::{
    DatabaseService, ListServersRequest, ServerSpec, UpsertServerRequest,
};
use fleetsync_sync_agent::ssh::{ClientKeys, SshClient, Timeouts};
use fleetsync_tests::{
    TestAgent, TestDb,
    proxy::TcpProxy,
    services::{migrate, test_runner_config},
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
    let deadline = Instant::now() + Duration::from_secs(15);
    while status(agent).await != wanted {
        assert!(Instant::now() < deadline, "health never became {wanted:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test]
async fn the_agent_survives_its_database_going_down() {
    let db = TestDb::postgres().await;
    migrate(db.url()).await;
    let proxy = TcpProxy::start("127.0.0.1:5432".parse().expect("addr")).await;
    let url = db.url().replace("127.0.0.1:5432", &proxy.addr.to_string());
    assert_ne!(url, db.url(), "the URL goes through the proxy");
    let ssh = SshClient::new(Timeouts::default(), 1024, ClientKeys::default());
    let agent = TestAgent::spawn_with(&url, ssh, test_runner_config()).await;
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
    wait_for(&agent, ServingStatus::NotServing).await;

    proxy.restore().await;
    wait_for(&agent, ServingStatus::Serving).await;
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
    agent.service.stop().await.expect("clean stop");
}
