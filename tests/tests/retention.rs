//! Retention on every backend: finished jobs (with their rows), runs and inventory rows marked
//! gone older than the cutoff are deleted; unfinished jobs, newer history and live inventory
//! stay; rows left waiting for servers that were deleted behind the API's back end as
//! CANCELLED; the cutoff is taken by the database's clock. A watch of a job deleted while it is
//! open ends with NOT_FOUND.

use fleetsync_common::{AgentId, RequestId, ServerId};
use fleetsync_sync_agent::{
    model::{JobOrigin, Outcome, Scope},
    store::{Completion, NewJob, Reach, Recorded, RunResult, Selection, Store},
};
use fleetsync_tests::{
    TestDb,
    catalog::{count, execute, insert_servers},
    db::ALL_BACKENDS,
    services::migrate,
};

fn job(request: &str, ids: Vec<i64>) -> NewJob {
    NewJob {
        request_id: RequestId::new(request),
        origin: JobOrigin::Rpc,
        selection: Selection::Ids(ids.into_iter().map(ServerId::stored).collect()),
        scopes: [Scope::Databases].into_iter().collect(),
        force: false,
        reason: String::new(),
    }
}

#[tokio::test]
async fn old_history_is_pruned_and_open_work_is_kept() {
    for backend in ALL_BACKENDS {
        let db = TestDb::create(backend).await;
        migrate(db.url()).await;
        let conn = db.connect().await;
        insert_servers(&conn, 3, 22, |_| "192.0.2.30".into()).await;
        let store = Store::new(conn.clone());
        let (old, _) = store.create_job(&job("old", vec![1])).await.expect("job");
        let (open, _) = store.create_job(&job("open", vec![2])).await.expect("job");
        let claims = store
            .claim(&AgentId::new("agent"), 60_000, 10)
            .await
            .expect("claim");
        let done: Vec<Completion> = claims
            .iter()
            .filter(|c| c.claim.server_id == ServerId::stored(1))
            .map(|c| Completion {
                claim: c.claim,
                result: RunResult::new(Outcome::Ok, ""),
                inventory: None,
                pin: None,
                reach: Reach::Online,
                ask_peer_ms: None,
            })
            .collect();
        let recorded = store
            .complete(&AgentId::new("agent"), &done)
            .await
            .expect("complete");
        assert!(matches!(recorded[0], Recorded::Stored { .. }), "{backend}");
        // The finished job and its run are a month old; the open job is as old but unfinished.
        execute(
            &conn,
            "UPDATE sync_jobs SET finished_at = 1000, created_at = 1000",
        )
        .await;
        execute(&conn, "UPDATE sync_runs SET finished_at = 1000").await;
        // Server 3 is deleted behind the API's back with a row waiting for it.
        let (orphaned, _) = store
            .create_job(&job("orphan", vec![3]))
            .await
            .expect("job");
        execute(&conn, "DELETE FROM server_leases WHERE server_id = 3").await;
        execute(&conn, "DELETE FROM servers WHERE id = 3").await;

        let pruned = store.prune(2000, 10).await.expect("prune");
        assert_eq!(
            (pruned.jobs, pruned.runs, pruned.orphans),
            (1, 1, 1),
            "{backend}"
        );
        assert!(
            store.job(&old.id).await.expect("read").is_none(),
            "{backend}"
        );
        assert_eq!(
            count(
                &conn,
                &format!(
                    "SELECT COUNT(*) FROM sync_job_servers WHERE job_id = '{}'",
                    old.id
                )
            )
            .await,
            0,
            "{backend}: the pruned job's rows go with it"
        );
        let kept = store.job(&open.id).await.expect("read").expect("kept");
        assert_eq!(
            kept.finished, 0,
            "{backend}: unfinished work is never pruned"
        );
        let orphaned = store.job(&orphaned.id).await.expect("read").expect("kept");
        assert_eq!(
            orphaned.outcome_counts,
            [(Outcome::Cancelled, 1)],
            "{backend}: the orphan row ended"
        );
        let again = store.prune(2000, 10).await.expect("prune");
        assert_eq!(
            (again.jobs, again.runs, again.orphans),
            (0, 0, 0),
            "{backend}"
        );

        // Inventory rows gone before the cutoff are deleted; newer gone rows and live ones stay.
        let databases = if backend == fleetsync_common::Backend::MySql {
            "`databases`"
        } else {
            "\"databases\""
        };
        execute(
            &conn,
            &format!(
                "INSERT INTO {databases} (server_id, name, status, created_at, updated_at) VALUES \
                 (2, 'old_gone', 'gone', 0, 1000), (2, 'new_gone', 'gone', 0, 3000), \
                 (2, 'old_live', 'ready', 0, 1000)"
            ),
        )
        .await;
        execute(
            &conn,
            &format!(
                "INSERT INTO database_users (server_id, username, host, {databases}, status, \
                 created_at, updated_at) VALUES (2, 'old_gone', '%', '[]', 'gone', 0, 1000), \
                 (2, 'old_live', '%', '[]', 'ready', 0, 1000)"
            ),
        )
        .await;
        let gone = store.prune(2000, 10).await.expect("prune");
        assert_eq!(gone.gone, 2, "{backend}: one database, one user");
        let names = store
            .inventory(ServerId::stored(2))
            .await
            .expect("inventory");
        let dbs: Vec<&str> = names.databases.iter().map(|d| d.name.as_str()).collect();
        assert_eq!(dbs, ["new_gone", "old_live"], "{backend}");
        assert_eq!(names.users.len(), 1, "{backend}: the live user stays");

        // The cutoff by the database's clock: a run that finished a minute ago by that clock.
        execute(
            &conn,
            &format!(
                "INSERT INTO sync_runs (server_id, lease_token, holder, scopes, started_at, \
                 finished_at, outcome) SELECT 2, 1, 'agent', 'databases', t, t, 'OK' FROM \
                 (SELECT {} - 60000 AS t) c",
                fleetsync_common::sql::now_ms_sql(backend)
            ),
        )
        .await;
        let kept = store.prune_older_than(120_000, 10).await.expect("prune");
        assert_eq!(kept.runs, 0, "{backend}: younger than two minutes");
        let pruned = store.prune_older_than(30_000, 10).await.expect("prune");
        assert_eq!(pruned.runs, 1, "{backend}: older than thirty seconds");
    }
}

/// A watch of a job that is deleted while it waits (pruned, or removed by hand) ends with
/// NOT_FOUND instead of staying open forever.
#[tokio::test]
async fn a_watch_of_a_job_deleted_while_open_ends_with_not_found() {
    use fleetsync_common::proto::sync::v1::WatchSyncRequest;
    use fleetsync_sync_agent::ssh::Timeouts;
    use fleetsync_tests::Scenario;
    use tokio_stream::StreamExt;

    // A host that accepts and never speaks: the job's run waits out a long handshake timeout.
    let (port, held) = fleetsync_tests::bench::silent_listener().await;
    let scenario = Scenario::on(fleetsync_common::Backend::Postgres)
        .timeouts(Timeouts {
            handshake: std::time::Duration::from_secs(60),
            ..Timeouts::default()
        })
        .start()
        .await;
    let (db, agent) = (&scenario.db, scenario.agent());
    let conn = db.connect().await;
    insert_servers(&conn, 1, port, |_| "127.0.0.1".into()).await;
    fleetsync_tests::catalog::add_mariadb_everywhere(&conn, "10.11").await;
    let id = count(&conn, "SELECT MIN(id) FROM servers").await;
    let job_id = agent.start_sync(&[id]).await;
    let mut stream = agent
        .sync()
        .watch_sync(WatchSyncRequest {
            job_id: job_id.clone(),
            cursor: 0,
        })
        .await
        .expect("watch")
        .into_inner();
    execute(
        &conn,
        &format!("DELETE FROM sync_job_servers WHERE job_id = '{job_id}'"),
    )
    .await;
    execute(
        &conn,
        &format!("DELETE FROM sync_jobs WHERE id = '{job_id}'"),
    )
    .await;
    let end = tokio::time::timeout(std::time::Duration::from_secs(20), stream.next())
        .await
        .expect("the stream ends, not waits forever")
        .expect("an item");
    let status = end.expect_err("NOT_FOUND");
    assert_eq!(status.code(), tonic::Code::NotFound, "{}", status.message());
    assert!(status.message().contains(&job_id), "{}", status.message());
    held.abort();
    scenario.stop().await;
}
