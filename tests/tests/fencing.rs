//! Lease fencing: an agent that lost its lease writes nothing, and a run serves only the
//! requests made before it was claimed.

use std::time::Duration;

use fleetsync_common::{AgentId, Backend, RequestId, ServerId};
use fleetsync_tests::{
    TestDb,
    catalog::{count, execute},
    services::migrate,
};

#[tokio::test]
async fn an_agent_that_lost_its_lease_writes_nothing_and_runs_serve_only_older_requests() {
    use fleetsync_sync_agent::{
        model::{JobOrigin, Outcome, Scope},
        store::{Completion, Reach, Recorded, RunResult, Store},
    };
    for backend in [Backend::Sqlite, Backend::Postgres, Backend::MySql] {
        let db = TestDb::create(backend).await;
        migrate(db.url()).await;
        let conn = db.connect().await;
        let store = Store::new(conn.clone());
        let spec = fleetsync_sync_agent::store::ServerSpec {
            name: "leased".into(),
            ip: "192.0.2.1".into(),
            port: 22,
            ssh_user: "vito".into(),
            database_service: None,
            database_version: String::new(),
            status: None,
            host_key: None,
            zone: String::new(),
        };
        let server = store
            .upsert_server(None, &spec)
            .await
            .expect("server")
            .server
            .id;
        let job = |request: &str| fleetsync_sync_agent::store::NewJob {
            request_id: RequestId::new(request),
            origin: JobOrigin::Rpc,
            selection: fleetsync_sync_agent::store::Selection::Ids(vec![server]),
            scopes: [Scope::Databases].into_iter().collect(),
            force: false,
            reason: String::new(),
        };
        let (before, _) = store.create_job(&job("before")).await.expect("job");

        let a = store
            .claim(&AgentId::new("agent-a"), 60_000, 10)
            .await
            .expect("claim");
        assert_eq!(a.len(), 1, "{backend}: the waiting server is claimed");
        let a = a[0].claim;
        assert!(
            store
                .claim(&AgentId::new("agent-b"), 60_000, 10)
                .await
                .expect("claim")
                .is_empty(),
            "{backend}: a held lease is not claimed again"
        );
        // A request that arrives while A's run is in flight ("sync after restore") must not be
        // answered with what A read before it.
        tokio::time::sleep(Duration::from_millis(5)).await;
        let (during, _) = store.create_job(&job("during")).await.expect("job");
        // (A claim serves requests up to its own millisecond.)
        tokio::time::sleep(Duration::from_millis(5)).await;

        // Agent A stalls past its lease; agent B takes over with a newer token.
        execute(&conn, "UPDATE server_leases SET expires_at = 0").await;
        let b = store
            .claim(&AgentId::new("agent-b"), 60_000, 10)
            .await
            .expect("claim");
        assert_eq!(b.len(), 1, "{backend}: an expired lease is claimed");
        let b = b[0].claim;
        assert!(b.token > a.token, "tokens grow on every claim");

        let completion = |claim, outcome: Outcome| Completion {
            claim,
            result: RunResult::new(outcome, ""),
            inventory: None,
            pin: None,
            reach: Reach::Online,
            ask_peer_ms: None,
        };
        let stale = store
            .complete(
                &AgentId::new("agent-a"),
                &[completion(a, Outcome::AuthFailed)],
            )
            .await
            .expect("record");
        assert_eq!(
            stale,
            [Recorded::LeaseLost],
            "{backend}: the stale agent is fenced off"
        );
        assert_eq!(count(&conn, "SELECT COUNT(*) FROM sync_runs").await, 0);

        // B's claim came after both requests: its run serves both.
        let fresh = store
            .complete(&AgentId::new("agent-b"), &[completion(b, Outcome::Ok)])
            .await
            .expect("record");
        let Recorded::Stored { jobs, .. } = &fresh[0] else {
            panic!("{backend}: {fresh:?}")
        };
        let mut expected = vec![before.id.clone(), during.id.clone()];
        expected.sort();
        assert_eq!(*jobs, expected, "{backend}");

        // Now a run that started before a request: the request waits for the next run.
        let c = store
            .claim(&AgentId::new("agent-c"), 60_000, 10)
            .await
            .expect("claim");
        assert!(c.is_empty(), "{backend}: nothing waits");
        let (first, _) = store.create_job(&job("first")).await.expect("job");
        tokio::time::sleep(Duration::from_millis(5)).await;
        let c = store
            .claim(&AgentId::new("agent-c"), 60_000, 10)
            .await
            .expect("claim")[0]
            .claim;
        tokio::time::sleep(Duration::from_millis(5)).await;
        let (late, _) = store.create_job(&job("late")).await.expect("job");
        let served = store
            .complete(&AgentId::new("agent-c"), &[completion(c, Outcome::Ok)])
            .await
            .expect("record");
        assert!(
            matches!(&served[0], Recorded::Stored { jobs, .. } if *jobs == [first.id.clone()]),
            "{backend}: only the request older than the claim is served: {served:?}"
        );
        let late_job = store.job(&late.id).await.expect("job").expect("exists");
        assert_eq!(late_job.finished, 0, "{backend}: the late request waits");
        let again = store
            .claim(&AgentId::new("agent-c"), 60_000, 10)
            .await
            .expect("claim");
        assert_eq!(
            again.len(),
            1,
            "{backend}: the server waits again for the late request"
        );
        let served = store
            .complete(
                &AgentId::new("agent-c"),
                &[completion(again[0].claim, Outcome::Ok)],
            )
            .await
            .expect("record");
        assert!(
            matches!(&served[0], Recorded::Stored { jobs, .. } if *jobs == [late.id.clone()]),
            "{backend}: {served:?}"
        );
        // An agent that stalled past its lease writes nothing even if nobody took over: it may
        // have timed out on its own stall. The server waits for a run that did not stall.
        let (stalled, _) = store.create_job(&job("stalled")).await.expect("job");
        tokio::time::sleep(Duration::from_millis(5)).await;
        let d = store
            .claim(&AgentId::new("agent-d"), 60_000, 10)
            .await
            .expect("claim")[0]
            .claim;
        execute(&conn, "UPDATE server_leases SET expires_at = 0").await;
        // Its heartbeat, overdue after the stall, does not revive the expired lease.
        assert_eq!(
            store
                .renew(&AgentId::new("agent-d"), &[server], 60_000)
                .await
                .expect("renew")
                .renewed,
            Vec::<ServerId>::new(),
            "{backend}: an expired lease stays expired"
        );
        let late = store
            .complete(
                &AgentId::new("agent-d"),
                &[completion(d, Outcome::HandshakeFailed)],
            )
            .await
            .expect("record");
        assert_eq!(
            late,
            [Recorded::LeaseLost],
            "{backend}: an expired lease is lost"
        );
        let d = store
            .claim(&AgentId::new("agent-d"), 60_000, 10)
            .await
            .expect("claim");
        assert_eq!(d.len(), 1, "{backend}: the server still waits");
        // A live lease is renewed (twice in a row: MySQL counts a row whose values did not
        // change as untouched), and only by its holder; unknown servers are not reported.
        for _ in 0..2 {
            assert_eq!(
                store
                    .renew(
                        &AgentId::new("agent-d"),
                        &[server, ServerId::stored(server.get() + 1000)],
                        60_000
                    )
                    .await
                    .expect("renew")
                    .renewed,
                [server],
                "{backend}: the live lease is renewed"
            );
        }
        assert_eq!(
            store
                .renew(&AgentId::new("agent-c"), &[server], 60_000)
                .await
                .expect("renew")
                .renewed,
            Vec::<ServerId>::new(),
            "{backend}: another agent's lease is not renewed"
        );
        let served = store
            .complete(
                &AgentId::new("agent-d"),
                &[completion(d[0].claim, Outcome::Ok)],
            )
            .await
            .expect("record");
        assert!(
            matches!(&served[0], Recorded::Stored { jobs, .. } if *jobs == [stalled.id.clone()]),
            "{backend}: {served:?}"
        );
        let job = store.job(&before.id).await.expect("job").expect("exists");
        assert_eq!(job.outcome_counts, [(Outcome::Ok, 1)], "{backend}");
        assert!(
            store
                .claim(&AgentId::new("agent-c"), 60_000, 10)
                .await
                .expect("claim")
                .is_empty(),
            "{backend}: nothing waits once every request is served"
        );
    }
}
