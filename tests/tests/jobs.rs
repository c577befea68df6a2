//! Finding jobs: `ListJobs` shows every job (calls, migrations, the periodic sync, recovery),
//! newest first, filtered and paged; malformed filters name their field.

use fleetsync_common::Backend;
use fleetsync_common::{
    JobId, RequestId, ServerId,
    proto::sync::v1::{JobOrigin, JobState, ListJobsRequest, StartSyncRequest},
};
use fleetsync_tests::{
    Scenario, TestDb,
    catalog::{add_mariadb_everywhere, insert_servers},
    services::{migrate, watch_to_end},
};

#[tokio::test]
async fn jobs_are_listed_newest_first_filtered_and_paged() {
    let mut scenario = Scenario::on(Backend::Postgres).agents(0).start().await;
    let conn = scenario.db.connect().await;
    // Refused loopback addresses: every run ends at once. The migration left a sync request
    // for all servers in the outbox: the agent turns it into a migration job.
    insert_servers(&conn, 3, 1, |_| "127.0.0.1".into()).await;
    add_mariadb_everywhere(&conn, "").await;
    let agent = scenario.add_agent().await.sync();
    let mut sync = agent.clone();
    let mut made = Vec::new();
    for (i, ids) in [vec![1], vec![2], vec![1, 3]].into_iter().enumerate() {
        let job = sync
            .start_sync(StartSyncRequest {
                request_id: format!("list-{i}"),
                server_ids: ids,
                reason: format!("job {i}"),
                ..Default::default()
            })
            .await
            .expect("start")
            .into_inner();
        // Wait for each to finish, so that states are known.
        watch_to_end(&mut sync, &job.job_id).await;
        made.push(job.job_id);
        tokio::time::sleep(std::time::Duration::from_millis(5)).await;
    }
    let list = |request: ListJobsRequest| {
        let mut sync = agent.clone();
        async move { sync.list_jobs(request).await.map(|r| r.into_inner()) }
    };

    let rpc = list(ListJobsRequest {
        origin: JobOrigin::Rpc as i32,
        ..Default::default()
    })
    .await
    .expect("list");
    let ids: Vec<&str> = rpc.jobs.iter().map(|j| j.job_id.as_str()).collect();
    assert_eq!(ids, [&made[2], &made[1], &made[0]], "newest first");
    assert!(rpc.jobs.iter().all(|j| j.state() == JobState::Done));
    assert_eq!(rpc.jobs[0].outcome_counts.len(), 1, "{:?}", rpc.jobs[0]);
    assert_eq!(rpc.jobs[0].outcome_counts[0].count, 2);

    // The migration's job is there too, without knowing its id.
    let all = list(ListJobsRequest::default()).await.expect("list");
    assert!(
        all.jobs.iter().any(|j| j.origin() == JobOrigin::Migration),
        "{:?}",
        all.jobs
    );

    // By server: jobs 0 and 2 cover server 1.
    let of_one = list(ListJobsRequest {
        server_id: 1,
        origin: JobOrigin::Rpc as i32,
        ..Default::default()
    })
    .await
    .expect("list");
    let ids: Vec<&str> = of_one.jobs.iter().map(|j| j.job_id.as_str()).collect();
    assert_eq!(ids, [&made[2], &made[0]]);

    // One page at a time.
    let first = list(ListJobsRequest {
        origin: JobOrigin::Rpc as i32,
        page_size: 2,
        ..Default::default()
    })
    .await
    .expect("page 1");
    assert_eq!(first.jobs.len(), 2);
    assert!(!first.next_page_token.is_empty());
    let second = list(ListJobsRequest {
        origin: JobOrigin::Rpc as i32,
        page_size: 2,
        page_token: first.next_page_token.clone(),
        ..Default::default()
    })
    .await
    .expect("page 2");
    assert_eq!(second.jobs.len(), 1);
    assert_eq!(second.jobs[0].job_id, made[0]);
    assert!(second.next_page_token.is_empty(), "the last page says so");

    // At or after the newest job's time: that job only; before the oldest: none.
    let after = list(ListJobsRequest {
        origin: JobOrigin::Rpc as i32,
        created_after: rpc.jobs[0].created_at,
        ..Default::default()
    })
    .await
    .expect("list");
    assert_eq!(after.jobs.len(), 1, "{:?}", after.jobs);
    let before = list(ListJobsRequest {
        origin: JobOrigin::Rpc as i32,
        created_before: rpc.jobs[2].created_at,
        ..Default::default()
    })
    .await
    .expect("list");
    assert!(before.jobs.is_empty());

    for (request, field) in [
        (
            ListJobsRequest {
                origin: 42,
                ..Default::default()
            },
            "origin",
        ),
        (
            ListJobsRequest {
                page_size: 5000,
                ..Default::default()
            },
            "page_size",
        ),
        (
            ListJobsRequest {
                page_token: "garbage".into(),
                ..Default::default()
            },
            "page_token",
        ),
        (
            ListJobsRequest {
                server_id: -3,
                ..Default::default()
            },
            "server_id",
        ),
    ] {
        let err = list(request).await.expect_err("refused");
        assert_eq!(
            err.code(),
            tonic::Code::InvalidArgument,
            "{}",
            err.message()
        );
        assert!(err.message().contains(field), "{}", err.message());
    }
    scenario.stop().await;
}

/// `ListJobs` by server pages alike, on every backend, for a server in many jobs (SQLite walks
/// the jobs newest first and probes each) and for one in few (it reads the server's jobs and
/// sorts them): the same jobs, newest first, each once, as the unfiltered list shows them.
#[tokio::test]
async fn jobs_of_a_server_in_many_or_few_jobs_page_alike() {
    use fleetsync_sync_agent::{
        model::{JobOrigin as Origin, Scopes},
        store::{JobFilter, NewJob, Selection, Store},
    };
    use fleetsync_tests::{catalog::count, db::ALL_BACKENDS};

    for backend in ALL_BACKENDS {
        let db = TestDb::create(backend).await;
        migrate(db.url()).await;
        let conn = db.connect().await;
        insert_servers(&conn, 2, 22, |i| format!("192.0.2.{}", i + 1)).await;
        let store = Store::new(conn.clone());
        let first = count(&conn, "SELECT MIN(id) FROM servers").await;
        let (many, few) = (ServerId::stored(first), ServerId::stored(first + 1));
        // 30 jobs of the first server; the second is in 3 of them. A page of 2 asks SQLite
        // whether the server is in at least 20 jobs.
        for i in 0..30 {
            let ids = if [4, 16, 27].contains(&i) {
                vec![many, few]
            } else {
                vec![many]
            };
            store
                .create_job(&NewJob {
                    request_id: RequestId::new(format!("paged-{i}")),
                    origin: Origin::Rpc,
                    selection: Selection::Ids(ids),
                    scopes: Scopes::ALL,
                    force: false,
                    reason: String::new(),
                })
                .await
                .expect("create job");
        }
        let rpc = |server_id| JobFilter {
            origin: Some(Origin::Rpc),
            server_id,
            ..Default::default()
        };
        let all = store.list_jobs(&rpc(None), None, 100).await.expect("list");
        assert_eq!(all.len(), 30, "{backend}");
        for (server, expected) in [(many, 30), (few, 3)] {
            let mut paged = Vec::new();
            let mut after = None;
            loop {
                let page = store
                    .list_jobs(&rpc(Some(server)), after.clone(), 2)
                    .await
                    .expect("page");
                let Some(last) = page.last() else { break };
                after = Some((last.created_at, last.id.clone()));
                paged.extend(page.into_iter().map(|j| j.id));
            }
            let wanted: Vec<JobId> = all
                .iter()
                .filter(|j| server == many || j.total == 2)
                .map(|j| j.id.clone())
                .collect();
            assert_eq!(paged.len(), expected, "{backend}, server {server}");
            assert_eq!(
                paged, wanted,
                "{backend}, server {server}: newest first, once"
            );
        }
    }
}

/// Servers offline in backoff when a job is made are skipped then, on every backend: their rows
/// are filled at once (cursors 1..k, in server order, with why and the next probe), only the
/// others wait for a run, and a skip writes no run. A job of skipped servers alone is done when
/// made; a forced job skips nothing; an unknown id creates nothing. An agent then runs the
/// others and the stream is 1..N and the summary at N + 1.
#[tokio::test]
async fn servers_in_backoff_are_skipped_when_the_job_is_made() {
    use fleetsync_common::proto::sync::v1::{Outcome as PbOutcome, sync_event};
    use fleetsync_common::{ServiceError, clock::now_ms};
    use fleetsync_sync_agent::{
        model::{JobOrigin as Origin, JobState as State, Outcome, Scopes},
        store::{NewJob, RunResult, Selection, Store},
    };
    use fleetsync_tests::{
        catalog::{count, execute},
        db::ALL_BACKENDS,
        events::watch,
    };

    for backend in ALL_BACKENDS {
        let mut scenario = Scenario::on(backend).agents(0).start().await;
        let conn = scenario.db.connect().await;
        // Refused loopback addresses: a run ends at once.
        insert_servers(&conn, 6, 1, |_| "127.0.0.1".into()).await;
        add_mariadb_everywhere(&conn, "").await;
        let first = count(&conn, "SELECT MIN(id) FROM servers").await;
        let id = |i: i64| ServerId::stored(first + i);
        let later = now_ms() + 86_400_000;
        // The 2nd, 4th and 5th in backoff; the 6th offline with its probe due.
        execute(
            &conn,
            &format!(
                "UPDATE servers SET reachability = 'offline', consecutive_failures = 3, \
                 next_probe_at = {later} WHERE id IN ({}, {}, {})",
                first + 1,
                first + 3,
                first + 4
            ),
        )
        .await;
        execute(
            &conn,
            &format!(
                "UPDATE servers SET reachability = 'offline', consecutive_failures = 1, \
                 next_probe_at = 1 WHERE id = {}",
                first + 5
            ),
        )
        .await;
        let store = Store::new(conn.clone());
        let job = |request: &str, selection: Selection, force: bool| NewJob {
            request_id: RequestId::new(request),
            origin: Origin::Rpc,
            selection,
            scopes: Scopes::ALL,
            force,
            reason: String::new(),
        };

        let (made, created) = store
            .create_job(&job("skips", Selection::All, false))
            .await
            .expect("create");
        assert!(created);
        assert_eq!(
            (made.total, made.finished, made.state(), made.finished_at),
            (6, 3, State::Running, None),
            "{backend:?}"
        );
        assert_eq!(made.outcome_counts, [(Outcome::SkippedOffline, 3)]);
        let skipped = store
            .outcomes_after(&made.id, 0, 100)
            .await
            .expect("outcomes");
        let rows: Vec<(i64, ServerId, Outcome, Option<i64>)> = skipped
            .iter()
            .map(|o| (o.seq, o.server_id, o.result.outcome, o.result.next_probe_at))
            .collect();
        let skip = Outcome::SkippedOffline;
        assert_eq!(
            rows,
            [
                (1, id(1), skip, Some(later)),
                (2, id(3), skip, Some(later)),
                (3, id(4), skip, Some(later))
            ],
            "{backend:?}"
        );
        // The database writes what a run would say: "offline since 3 failed attempt(s); next
        // probe <UTC to the second>".
        let said = RunResult::skipped_offline(3, later).message;
        assert!(
            said.starts_with("offline since 3 failed attempt(s); next probe 20"),
            "{said}"
        );
        for row in &skipped {
            assert_eq!(row.result.message, said, "{backend:?}");
        }
        // Only the others wait for a run.
        assert_eq!(
            count(
                &conn,
                "SELECT COUNT(*) FROM server_leases WHERE pending_since IS NOT NULL"
            )
            .await,
            3,
            "{backend:?}"
        );

        // Skipped servers alone: done when made. An unknown id: nothing made.
        let (only, _) = store
            .create_job(&job(
                "only-skips",
                Selection::Ids(vec![id(1), id(4)]),
                false,
            ))
            .await
            .expect("create");
        assert_eq!(
            (only.total, only.finished, only.state()),
            (2, 2, State::Done)
        );
        assert!(only.finished_at.is_some());
        let unknown = ServerId::stored(first + 1000);
        let refused = store
            .create_job(&job(
                "unknown",
                Selection::Ids(vec![id(1), id(2), unknown]),
                false,
            ))
            .await
            .expect_err("an unknown server");
        assert!(
            matches!(&refused, ServiceError::NotFound { id, .. } if *id == unknown.to_string()),
            "{refused:?}"
        );
        assert!(
            store
                .job_by_request(&RequestId::new("unknown"))
                .await
                .expect("read")
                .is_none()
        );
        // Forced: nothing skipped.
        let (forced, _) = store
            .create_job(&job("forced", Selection::All, true))
            .await
            .expect("create");
        assert_eq!((forced.total, forced.finished), (6, 0));

        // An agent runs the others: each stream is 1..N, the summary at N + 1. (The
        // migration's request would be a third job: taken.)
        execute(&conn, "UPDATE sync_requests SET state = 'taken'").await;
        let mut sync = scenario.add_agent().await.sync();
        for (job_id, total) in [(made.id.to_string(), 6), (forced.id.to_string(), 6)] {
            let events = watch(&mut sync, &job_id, 0).await;
            let cursors: Vec<u64> = events.iter().map(|e| e.cursor).collect();
            assert_eq!(
                cursors,
                (1..=total + 1).collect::<Vec<u64>>(),
                "{backend:?}"
            );
            let skipped = events
                .iter()
                .filter(|e| {
                    matches!(&e.event, Some(sync_event::Event::Outcome(o))
                        if o.outcome() == PbOutcome::SkippedOffline)
                })
                .count();
            let expected = if job_id == made.id.to_string() { 3 } else { 0 };
            assert_eq!(skipped, expected, "{backend:?} {job_id}");
        }
        // Runs: the three servers not in backoff, twice (each job once, or both in one
        // run), the three in backoff once (the forced job): no skip is a run.
        assert_eq!(
            count(
                &conn,
                "SELECT COUNT(*) FROM sync_runs WHERE outcome = 'SKIPPED_OFFLINE'"
            )
            .await,
            0
        );
        let runs = count(&conn, "SELECT COUNT(*) FROM sync_runs").await;
        assert!((6..=9).contains(&runs), "{backend:?}: {runs} runs");
        conn.close().await;
    }
}
