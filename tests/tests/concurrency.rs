//! Many callers at once, on every backend: registrations racing each other (distinct names and
//! the same name), jobs created at once under one request id, and jobs made while servers go
//! in and out of backoff under them. Deadlocks, serialisation
//! failures and unique-key races are retried inside; no caller ever sees them.

use std::collections::BTreeSet;

use fleetsync_common::Backend;
use fleetsync_common::proto::sync::v1::{DatabaseService, ServerSpec, UpsertServerRequest};
use fleetsync_sync_agent::{
    model::JobOrigin,
    ssh::Timeouts,
    store::{NewJob, Selection, Store},
};
use fleetsync_tests::{Scenario, TestDb, catalog::count, db::ALL_BACKENDS, services::migrate};

#[tokio::test]
async fn concurrent_registrations_never_fail_on_any_backend() {
    for backend in ALL_BACKENDS {
        let scenario = Scenario::on(backend)
            .timeouts(Timeouts::default())
            .output_cap(1024)
            .start()
            .await;
        let (db, agent) = (&scenario.db, scenario.agent());
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
        scenario.stop().await;
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
                            request_id: fleetsync_common::RequestId::new(format!("twin-{}", i % 2)),
                            origin: JobOrigin::Migration,
                            selection: Selection::All,
                            scopes: [fleetsync_sync_agent::model::Scope::Databases]
                                .into_iter()
                                .collect(),
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

/// Jobs made while servers go into backoff and out of it under them (as runs and probes record
/// them), on every backend: each job still has one row per server, its servers skipped when it
/// was made filled with cursors 1..k and counted, every other row waiting with its server
/// marked. (The skips are read before the other rows are inserted, which pass over them by key:
/// a server whose backoff changes in between is in exactly one of the two.)
#[tokio::test]
async fn jobs_made_while_backoffs_change_have_one_row_per_server() {
    use fleetsync_common::{JobId, RequestId, ServerId};
    use std::sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    };
    const SERVERS: i64 = 300;
    for backend in ALL_BACKENDS {
        let db = TestDb::create(backend).await;
        migrate(db.url()).await;
        let conn = db.connect().await;
        fleetsync_tests::catalog::insert_servers(&conn, SERVERS as usize, 22, |_| {
            "192.0.2.30".into()
        })
        .await;
        let first = count(&conn, "SELECT MIN(id) FROM servers").await;
        let store = Store::new(conn.clone());
        // Flip a seventh of the servers at a time, each flip its own transaction.
        let stop = Arc::new(AtomicBool::new(false));
        let flipper = {
            let (conn, stop) = (conn.clone(), stop.clone());
            tokio::spawn(async move {
                let later = fleetsync_common::clock::now_ms() + 86_400_000;
                let mut flips = 0;
                while !stop.load(Ordering::Relaxed) {
                    let sql = format!(
                        // MySQL assigns left to right, each assignment seeing the ones
                        // before: the reachability is read before it is changed.
                        "UPDATE servers SET \
                         next_probe_at = CASE WHEN reachability = 'offline' THEN NULL \
                         ELSE {later} END, \
                         reachability = CASE WHEN reachability = 'offline' THEN 'online' \
                         ELSE 'offline' END, consecutive_failures = 2 WHERE id % 7 = {}",
                        flips % 7
                    );
                    fleetsync_common::sql::retry("flip", || conn.execute(&sql, &[]))
                        .await
                        .expect("flip");
                    flips += 1;
                }
                flips
            })
        };
        let some: Vec<ServerId> = (0..SERVERS)
            .filter(|i| i % 3 != 0)
            .map(|i| ServerId::stored(first + i))
            .collect();
        let makers: Vec<_> = (0..4)
            .map(|maker| {
                let (store, some) = (store.clone(), some.clone());
                tokio::spawn(async move {
                    let mut made = Vec::new();
                    for i in 0..6 {
                        let selection = if i % 2 == 0 {
                            Selection::All
                        } else {
                            Selection::Ids(some.clone())
                        };
                        let (job, _) = store
                            .create_job(&NewJob {
                                request_id: RequestId::new(format!("flip-{maker}-{i}")),
                                origin: JobOrigin::Rpc,
                                selection,
                                scopes: fleetsync_sync_agent::model::Scopes::ALL,
                                force: false,
                                reason: String::new(),
                            })
                            .await
                            .expect("create job");
                        made.push(job);
                    }
                    made
                })
            })
            .collect();
        let mut jobs = Vec::new();
        for maker in makers {
            jobs.extend(maker.await.expect("task"));
        }
        stop.store(true, Ordering::Relaxed);
        let flips = flipper.await.expect("flipper");
        assert!(flips > 0, "{backend}: the backoffs changed");
        let mut skipped_somewhere = false;
        for job in &jobs {
            let id: &JobId = &job.id;
            let rows = |filter: &str| {
                format!("SELECT COUNT(*) FROM sync_job_servers WHERE job_id = '{id}'{filter}")
            };
            let expected = if job.total == SERVERS {
                SERVERS
            } else {
                some.len() as i64
            };
            assert_eq!(job.total, expected, "{backend}: {job:?}");
            assert_eq!(count(&conn, &rows("")).await, expected, "{backend}");
            assert_eq!(
                count(
                    &conn,
                    &format!(
                        "SELECT COUNT(DISTINCT server_id) FROM sync_job_servers \
                         WHERE job_id = '{id}'"
                    )
                )
                .await,
                expected,
                "{backend}: each server once"
            );
            let filled = count(&conn, &rows(" AND outcome = 'SKIPPED_OFFLINE'")).await;
            assert_eq!(filled, job.finished, "{backend}: {job:?}");
            assert_eq!(
                count(&conn, &rows(&format!(" AND seq BETWEEN 1 AND {filled}"))).await,
                filled,
                "{backend}: cursors 1..k"
            );
            assert_eq!(
                count(
                    &conn,
                    &format!(
                        "SELECT COUNT(DISTINCT seq) FROM sync_job_servers WHERE job_id = '{id}'"
                    )
                )
                .await,
                filled,
                "{backend}: each cursor once"
            );
            skipped_somewhere |= filled > 0;
        }
        assert!(skipped_somewhere, "{backend}: some servers were skipped");
        // Every server with a row still waiting is marked as waiting.
        assert_eq!(
            count(
                &conn,
                "SELECT COUNT(DISTINCT js.server_id) FROM sync_job_servers js \
                 JOIN server_leases l ON l.server_id = js.server_id \
                 WHERE js.outcome IS NULL AND l.pending_since IS NULL"
            )
            .await,
            0,
            "{backend}: a waiting row without its mark"
        );
        conn.close().await;
    }
}

#[tokio::test]
async fn streams_past_the_cap_are_refused_and_a_freed_slot_is_reused() {
    use fleetsync_common::proto::sync::v1::{StartSyncRequest, WatchSyncRequest};
    let mut scenario = Scenario::on(Backend::Sqlite)
        .agents(0)
        .timeouts(Timeouts {
            handshake: std::time::Duration::from_secs(10),
            ..Timeouts::default()
        })
        .output_cap(1024)
        .max_streams(2)
        .start()
        .await;
    let conn = scenario.db.connect().await;
    // One server that accepts and never says a word (on loopback): its job stays open for the
    // handshake timeout.
    let silent = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let port = silent.local_addr().expect("addr").port();
    fleetsync_tests::catalog::insert_servers(&conn, 1, port, |_| "127.0.0.1".into()).await;
    fleetsync_tests::catalog::add_mariadb_everywhere(&conn, "").await;
    let mut sync = scenario.add_agent().await.sync();
    let job = sync
        .start_sync(StartSyncRequest {
            server_ids: vec![1],
            ..Default::default()
        })
        .await
        .expect("start")
        .into_inner();
    let watch = || WatchSyncRequest {
        job_id: job.job_id.clone(),
        cursor: 0,
    };
    let first = sync.watch_sync(watch()).await.expect("first stream");
    let second = sync.watch_sync(watch()).await.expect("second stream");
    let err = sync.watch_sync(watch()).await.expect_err("third stream");
    assert_eq!(
        err.code(),
        tonic::Code::ResourceExhausted,
        "{}",
        err.message()
    );
    assert!(err.message().contains("--max-streams"), "{}", err.message());
    drop(first);
    // The slot comes back once the server side notices the client left.
    fleetsync_tests::poll_until(
        "the slot never came back",
        std::time::Duration::from_secs(10),
        || async {
            match sync.clone().watch_sync(watch()).await {
                Ok(_) => Ok(()),
                Err(err) => {
                    assert_eq!(err.code(), tonic::Code::ResourceExhausted);
                    Err(err.message().to_owned())
                }
            }
        },
    )
    .await;
    drop(second);
    scenario.stop().await;
    drop(silent);
}

#[tokio::test]
async fn agents_starting_together_repair_the_queue_once() {
    for backend in [
        fleetsync_common::Backend::Postgres,
        fleetsync_common::Backend::MySql,
    ] {
        let mut scenario = Scenario::on(backend)
            .agents(0)
            .timeouts(Timeouts::default())
            .output_cap(1024)
            .start()
            .await;
        let conn = scenario.db.connect().await;
        // Servers inserted by hand have no lease row: every agent adds the missing ones at
        // start, all at the same moment here.
        fleetsync_tests::catalog::insert_servers(&conn, 500, 22, |_| "192.0.2.50".into()).await;
        scenario.add_agents(4).await;
        fleetsync_tests::catalog::wait_for_count(
            &conn,
            "SELECT COUNT(*) FROM server_leases",
            |n| n == 500,
            std::time::Duration::from_secs(10),
            "the lease rows were never added",
        )
        .await;
        assert_eq!(scenario.agents.len(), 4);
        scenario.stop().await;
    }
}

#[tokio::test]
async fn a_request_id_names_one_request_and_alone_joins_its_job() {
    use fleetsync_common::proto::sync::v1::StartSyncRequest;
    use tokio_stream::StreamExt;
    let mut scenario = Scenario::on(Backend::Sqlite).agents(0).start().await;
    let conn = scenario.db.connect().await;
    // Refused loopback addresses: every run ends at once.
    fleetsync_tests::catalog::insert_servers(&conn, 2, 1, |_| "127.0.0.1".into()).await;
    scenario.add_agent().await;
    let agent = scenario.agent();
    let mut sync = agent.sync();
    let request = |ids: Vec<i64>| StartSyncRequest {
        request_id: "nightly-42".into(),
        server_ids: ids,
        ..Default::default()
    };
    let first = sync
        .start_sync(request(vec![1]))
        .await
        .expect("start")
        .into_inner();
    assert!(first.created);
    let again = sync
        .start_sync(request(vec![1]))
        .await
        .expect("repeat")
        .into_inner();
    assert_eq!(
        (again.job_id.as_str(), again.created),
        (first.job_id.as_str(), false)
    );
    // The same request id with another request: refused, naming the difference.
    for (other, says) in [
        (request(vec![1, 2]), "2 other server(s) (the job has 1)"),
        (
            StartSyncRequest {
                force: true,
                ..request(vec![1])
            },
            "force true (the job has false)",
        ),
        (
            StartSyncRequest {
                all_servers: true,
                ..request(vec![])
            },
            "all servers",
        ),
        (
            StartSyncRequest {
                scopes: vec![fleetsync_common::proto::sync::v1::SyncScope::Users as i32],
                ..request(vec![1])
            },
            "scopes users",
        ),
    ] {
        let err = sync.start_sync(other).await.expect_err("refused");
        assert_eq!(err.code(), tonic::Code::AlreadyExists, "{}", err.message());
        assert!(err.message().contains(says), "{}", err.message());
        assert!(err.message().contains(&first.job_id), "{}", err.message());
    }
    // The request id alone joins the job, by StartSync and by Sync (which streams it).
    let joined = sync
        .start_sync(request(vec![]))
        .await
        .expect("join")
        .into_inner();
    assert_eq!(
        (joined.job_id.as_str(), joined.created),
        (first.job_id.as_str(), false)
    );
    let events: Vec<_> = sync
        .sync(request(vec![]))
        .await
        .expect("sync joins")
        .into_inner()
        .map(|e| e.expect("event"))
        .collect()
        .await;
    assert_eq!(events.len(), 2, "one outcome and the summary: {events:?}");
    // And with grpcurl, as an operator would.
    let grpcurl = std::env::var("FLEETSYNC_GRPCURL").unwrap_or_else(|_| "grpcurl".into());
    // (tokio's Command: the agent runs on this test's runtime and must keep serving.)
    let output = tokio::process::Command::new(&grpcurl)
        .args([
            "-plaintext",
            "-d",
            r#"{"requestId": "nightly-42"}"#,
            &agent.service.addr.to_string(),
            "fleetsync.sync.v1.SyncAgent/StartSync",
        ])
        .output()
        .await
        .expect("run grpcurl (`just setup`)");
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(stdout.contains(&first.job_id), "{stdout}");
    let err = sync
        .start_sync(StartSyncRequest {
            request_id: "never-made".into(),
            ..Default::default()
        })
        .await
        .expect_err("unknown");
    assert_eq!(err.code(), tonic::Code::NotFound, "{}", err.message());
    scenario.stop().await;
}
