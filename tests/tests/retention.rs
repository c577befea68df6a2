//! Retention on every backend: finished jobs (with their rows) and runs older than the cutoff
//! are deleted; unfinished jobs and newer history stay; rows left waiting for servers that were
//! deleted behind the API's back end as CANCELLED.

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
        request_id: request.into(),
        origin: JobOrigin::Rpc,
        selection: Selection::Ids(ids),
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
        let claims = store.claim("agent", 60_000, 10).await.expect("claim");
        let done: Vec<Completion> = claims
            .iter()
            .filter(|c| c.claim.server_id == 1)
            .map(|c| Completion {
                claim: c.claim,
                result: RunResult::new(Outcome::Ok, ""),
                inventory: None,
                pin: None,
                reach: Reach::Online,
            })
            .collect();
        let recorded = store.complete("agent", &done).await.expect("complete");
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
    }
}
