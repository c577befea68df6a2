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
