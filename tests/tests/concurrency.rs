//! Many callers at once, on every backend: registrations racing each other (distinct names and
//! the same name), and jobs created at once under one request id. Deadlocks, serialisation
//! failures and unique-key races are retried inside; no caller ever sees them.

use std::collections::BTreeSet;

use fleetsync_common::proto::sync::v1::{DatabaseService, ServerSpec, UpsertServerRequest};
use fleetsync_sync_agent::{
    ssh::{ClientKeys, SshClient, Timeouts},
    store::{JobOrigin, NewJob, Selection, Store},
};
use fleetsync_tests::{
    TestAgent, TestDb,
    catalog::count,
    db::ALL_BACKENDS,
    services::{migrate, test_runner_config},
};

#[tokio::test]
async fn concurrent_registrations_never_fail_on_any_backend() {
    for backend in ALL_BACKENDS {
        let db = TestDb::create(backend).await;
        migrate(db.url()).await;
        let ssh = SshClient::new(Timeouts::default(), 1024, ClientKeys::default());
        let agent = TestAgent::spawn_with(db.url(), ssh, test_runner_config()).await;
        // 64 callers at once, three rounds: new names, then the same names again (updates),
        // and every caller registering one shared name.
        for round in ["new", "again", "shared"] {
            let calls: Vec<_> = (0..64)
                .map(|i| {
                    let mut fleet = agent.fleet();
                    let name = if round == "shared" {
                        "shared".to_owned()
                    } else {
                        format!("srv-{i}")
                    };
                    tokio::spawn(async move {
                        fleet
                            .upsert_server(UpsertServerRequest {
                                id: 0,
                                spec: Some(ServerSpec {
                                    name,
                                    ip: "192.0.2.10".into(),
                                    port: 22,
                                    ssh_user: "vito".into(),
                                    database_service: DatabaseService::Mariadb as i32,
                                    ..Default::default()
                                }),
                            })
                            .await
                    })
                })
                .collect();
            let mut failed = Vec::new();
            for call in calls {
                if let Err(status) = call.await.expect("task") {
                    failed.push(format!("{:?}: {}", status.code(), status.message()));
                }
            }
            assert!(failed.is_empty(), "{backend} {round}: {failed:?}");
        }
        let conn = db.connect().await;
        assert_eq!(
            count(&conn, "SELECT COUNT(*) FROM servers").await,
            65,
            "{backend}"
        );
        assert_eq!(
            count(&conn, "SELECT COUNT(*) FROM server_leases").await,
            65,
            "{backend}: one lease row per server"
        );
        assert_eq!(
            count(&conn, "SELECT COUNT(*) FROM services").await,
            65,
            "{backend}: one service per server"
        );
        agent.service.stop().await.expect("clean stop");
    }
}

#[tokio::test]
async fn jobs_created_at_once_under_one_request_id_are_one_job() {
    for backend in ALL_BACKENDS {
        let db = TestDb::create(backend).await;
        migrate(db.url()).await;
        let conn = db.connect().await;
        fleetsync_tests::catalog::insert_servers(&conn, 50, 22, |_| "192.0.2.20".into()).await;
        let store = Store::new(conn.clone());
        let tasks: Vec<_> = (0..16)
            .map(|i| {
                let store = store.clone();
                tokio::spawn(async move {
                    store
                        .create_job(&NewJob {
                            // Half the callers name one request, half another.
                            request_id: format!("twin-{}", i % 2),
                            origin: JobOrigin::Migration,
                            selection: Selection::All,
                            scopes: "databases".into(),
                            force: false,
                            reason: String::new(),
                        })
                        .await
                })
            })
            .collect();
        let mut ids = BTreeSet::new();
        let mut created = 0;
        for task in tasks {
            let (job, was_created) = task
                .await
                .expect("task")
                .unwrap_or_else(|err| panic!("{backend}: {err}"));
            assert_eq!(job.total, 50, "{backend}");
            ids.insert(job.id);
            created += usize::from(was_created);
        }
        assert_eq!(ids.len(), 2, "{backend}: one job per request id");
        assert_eq!(created, 2, "{backend}: each created once");
        assert_eq!(count(&conn, "SELECT COUNT(*) FROM sync_jobs").await, 2);
        assert_eq!(
            count(&conn, "SELECT COUNT(*) FROM sync_job_servers").await,
            100
        );
        assert_eq!(
            count(
                &conn,
                "SELECT COUNT(*) FROM server_leases WHERE pending_since IS NOT NULL"
            )
            .await,
            50,
            "{backend}: every server waits"
        );
    }
}
