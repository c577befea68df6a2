//! One filler per job row, on every backend: concurrent deletes of one waiting server, a delete
//! racing that server's completion, and two agents' retention passes on an orphaned row each
//! fill the row once. The job's stream stays cursors 1..N without gap or repeat, `finished`
//! equals the rows with an outcome, the kept outcome counts add up, and nothing but the summary
//! lies past the last server.

use std::collections::BTreeSet;

use fleetsync_common::{AgentId, Backend, Db, JobId, RequestId, ServerId};
use fleetsync_sync_agent::{
    model::{JobOrigin, JobState, Outcome, Scopes},
    store::{Claim, Completion, NewJob, Reach, Recorded, RunResult, Selection, Store},
};
use fleetsync_tests::{
    TestDb,
    catalog::{count, execute, insert_servers},
    db::ALL_BACKENDS,
    services::migrate,
};

/// A fresh database of `backend` with `n` servers (documentation addresses: never dialled).
async fn setup(backend: Backend, n: usize) -> (TestDb, Db, Store) {
    let db = TestDb::create(backend).await;
    migrate(db.url()).await;
    let conn = db.connect().await;
    insert_servers(&conn, n, 22, |i| format!("192.0.2.{}", i % 250 + 1)).await;
    let store = Store::new(conn.clone());
    (db, conn, store)
}

async fn new_job(store: &Store, request_id: &str, reason: &str) -> JobId {
    let (job, created) = store
        .create_job(&NewJob {
            request_id: RequestId::new(request_id),
            origin: JobOrigin::Rpc,
            selection: Selection::All,
            scopes: Scopes::ALL,
            force: false,
            reason: reason.into(),
        })
        .await
        .expect("create job");
    assert!(created);
    job.id
}

async fn server_ids(conn: &Db) -> Vec<ServerId> {
    let n = count(conn, "SELECT COUNT(*) FROM servers").await;
    let first = count(conn, "SELECT MIN(id) FROM servers").await;
    (first..first + n).map(ServerId::stored).collect()
}

/// The job's stream is exact: what `WatchSync` reads (the rows after cursor 0, then the summary
/// once the cursor reaches the total).
async fn assert_exact(store: &Store, conn: &Db, job_id: &JobId, what: &str) {
    let job = store.job(job_id).await.expect("job").expect("job exists");
    let outcomes = store
        .outcomes_after(job_id, 0, 100_000)
        .await
        .expect("outcomes");
    let cursors: Vec<i64> = outcomes.iter().map(|o| o.seq).collect();
    assert_eq!(
        cursors,
        (1..=job.finished).collect::<Vec<_>>(),
        "{what}: cursors 1..finished without gap or repeat"
    );
    let servers: BTreeSet<ServerId> = outcomes.iter().map(|o| o.server_id).collect();
    assert_eq!(servers.len(), outcomes.len(), "{what}: each server once");
    let filled = count(
        conn,
        &format!(
            "SELECT COUNT(*) FROM sync_job_servers WHERE job_id = '{job_id}' \
             AND outcome IS NOT NULL"
        ),
    )
    .await;
    assert_eq!(
        job.finished, filled,
        "{what}: finished = rows with an outcome"
    );
    assert!(job.finished <= job.total, "{what}: {job:?}");
    let counted: i64 = job.outcome_counts.iter().map(|(_, n)| n).sum();
    assert_eq!(counted, job.finished, "{what}: outcome counts {job:?}");
    if job.finished == job.total {
        assert_eq!(job.state(), JobState::Done, "{what}");
        assert!(job.finished_at.is_some(), "{what}: done has a time");
    }
}

#[tokio::test]
async fn concurrent_deletes_of_one_waiting_server_fill_its_row_once() {
    for backend in ALL_BACKENDS {
        for callers in [2, 10] {
            let what = format!("{backend}, {callers} deletes");
            let (_db, conn, store) = setup(backend, 4).await;
            let job = new_job(&store, "deletes", "").await;
            let ids = server_ids(&conn).await;
            let deletes: Vec<_> = (0..callers)
                .map(|_| {
                    let store = store.clone();
                    let id = ids[0];
                    tokio::spawn(async move { store.delete_server(id).await })
                })
                .collect();
            let mut deleted = 0;
            for delete in deletes {
                deleted += usize::from(
                    delete
                        .await
                        .expect("task")
                        .unwrap_or_else(|err| panic!("{what}: {err}")),
                );
            }
            assert_eq!(deleted, 1, "{what}: one delete finds the server");
            assert_exact(&store, &conn, &job, &what).await;
            // The rest, also two at a time: the job ends with 1..4 and its summary.
            for &id in &ids[1..] {
                let (a, b) = tokio::join!(store.delete_server(id), store.delete_server(id));
                assert!(a.expect("delete") ^ b.expect("delete"), "{what}");
            }
            assert_exact(&store, &conn, &job, &what).await;
            let done = store.job(&job).await.expect("job").expect("exists");
            assert_eq!(
                (done.finished, done.total),
                (4, 4),
                "{what}: every row once"
            );
            assert_eq!(done.outcome_counts, [(Outcome::Cancelled, 4)], "{what}");
        }
    }
}

fn completion(claim: Claim) -> Completion {
    Completion {
        claim,
        result: RunResult::new(Outcome::Ok, ""),
        inventory: None,
        pin: None,
        reach: Reach::Untried,
        ask_peer_ms: None,
    }
}

#[tokio::test]
async fn a_delete_racing_the_servers_completion_fills_its_row_once() {
    for backend in ALL_BACKENDS {
        let (_db, conn, store) = setup(backend, 24).await;
        let job = new_job(&store, "race", "").await;
        let claims = store
            .claim(&AgentId::new("agent-a"), 60_000, 100)
            .await
            .expect("claim");
        assert_eq!(claims.len(), 24, "{backend}");
        // Each server: its completion and its delete at the same moment.
        let races: Vec<_> = claims
            .iter()
            .map(|c| {
                let (store, claim) = (store.clone(), c.claim);
                tokio::spawn(async move {
                    let batch = [completion(claim)];
                    let agent = AgentId::new("agent-a");
                    let complete = store.complete(&agent, &batch);
                    let delete = store.delete_server(claim.server_id);
                    let (recorded, deleted) = tokio::join!(complete, delete);
                    (recorded.expect("record"), deleted.expect("delete"))
                })
            })
            .collect();
        let (mut ok, mut lost) = (0, 0);
        for race in races {
            let (recorded, deleted) = race.await.expect("task");
            assert!(deleted, "{backend}: the delete always finds the server");
            match &recorded[..] {
                [Recorded::Stored { .. }] => ok += 1,
                [Recorded::LeaseLost] => lost += 1,
                other => panic!("{backend}: {other:?}"),
            }
        }
        assert_eq!(ok + lost, 24, "{backend}");
        assert_exact(
            &store,
            &conn,
            &job,
            &format!("{backend}, delete vs completion"),
        )
        .await;
        let done = store.job(&job).await.expect("job").expect("exists");
        assert_eq!(done.finished, 24, "{backend}: every row filled once");
        // Whichever went first decided the row: completions that won are OK, the rest
        // CANCELLED by the delete.
        let ok_rows = done
            .outcome_counts
            .iter()
            .find(|(o, _)| *o == Outcome::Ok)
            .map_or(0, |(_, n)| *n);
        assert_eq!(ok_rows, ok, "{backend}: {:?}", done.outcome_counts);
    }
}

#[tokio::test]
async fn two_retention_passes_on_an_orphaned_row_fill_it_once() {
    for backend in ALL_BACKENDS {
        let what = format!("{backend}, two retention passes");
        let (db, conn, store) = setup(backend, 4).await;
        let job = new_job(&store, "orphans", "").await;
        let ids = server_ids(&conn).await;
        // Deleted behind the Fleet API's back: its row waits for a server that is gone.
        execute(
            &conn,
            &format!("DELETE FROM server_leases WHERE server_id = {}", ids[0]),
        )
        .await;
        execute(&conn, &format!("DELETE FROM servers WHERE id = {}", ids[0])).await;
        // Two agents: two pools, so the passes really run at once.
        let other = Store::new(db.connect().await);
        let (a, b) = tokio::join!(store.prune(0, 1), other.prune(0, 1));
        let orphans = a.expect("prune").orphans + b.expect("prune").orphans;
        assert_eq!(orphans, 1, "{what}: one pass ends the row");
        assert_exact(&store, &conn, &job, &what).await;
        let job = store.job(&job).await.expect("job").expect("exists");
        assert_eq!(job.finished, 1, "{what}");
        assert_eq!(job.outcome_counts, [(Outcome::Cancelled, 1)], "{what}");
    }
}

#[tokio::test]
async fn a_reason_is_stored_byte_exact() {
    let reason = "after the restore\n\tticket #42\r\nsee: \u{1b}[1mrunbook\u{1b}[0m";
    for backend in ALL_BACKENDS {
        let (_db, _conn, store) = setup(backend, 1).await;
        let job = new_job(&store, "reason", reason).await;
        let stored = store.job(&job).await.expect("job").expect("exists");
        assert_eq!(stored.reason, reason, "{backend}");
    }
}

/// A job made before its outcome counts were kept on its row (`outcome_counts` NULL) reads its
/// counts from its rows, and the first filler counts them, under the job's lock, before adding
/// its own.
#[tokio::test]
async fn a_job_from_before_the_kept_counts_is_counted_from_its_rows() {
    for backend in ALL_BACKENDS {
        let (_db, conn, store) = setup(backend, 3).await;
        let job = new_job(&store, "legacy", "").await;
        let ids = server_ids(&conn).await;
        assert!(store.delete_server(ids[0]).await.expect("delete"));
        execute(&conn, "UPDATE sync_jobs SET outcome_counts = NULL").await;
        let read = store.job(&job).await.expect("job").expect("exists");
        assert_eq!(read.outcome_counts, [(Outcome::Cancelled, 1)], "{backend}");
        assert!(store.delete_server(ids[1]).await.expect("delete"));
        let read = store.job(&job).await.expect("job").expect("exists");
        assert_eq!(read.outcome_counts, [(Outcome::Cancelled, 2)], "{backend}");
        assert_eq!(
            count(
                &conn,
                "SELECT COUNT(*) FROM sync_jobs WHERE outcome_counts IS NOT NULL"
            )
            .await,
            1,
            "{backend}: kept on the row again"
        );
        assert_exact(&store, &conn, &job, &format!("{backend}, legacy counts")).await;
    }
}
