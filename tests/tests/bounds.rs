//! Bounded by default: `CheckConnection` runs under a cap (RESOURCE_EXHAUSTED past it) while a
//! job of healthy hosts still completes, and a burst of metrics scrapes reads the fleet-wide
//! gauges from the database once, leaving RPCs unharmed.

use fleetsync_common::AgentId;
use std::time::{Duration, Instant};

use fleetsync_common::Backend;
use fleetsync_common::proto::sync::v1::{
    CheckConnectionRequest, DatabaseService, ListServersRequest, Outcome, UnreachableCause,
    fleet_client::FleetClient, sync_event,
};
use fleetsync_sync_agent::ssh::Timeouts;
use fleetsync_tests::{
    Scenario,
    bench::silent_listener,
    catalog::{add_mariadb_everywhere, count, insert_servers},
    scrape::{sample, scrape},
    services::{connect, watch_to_end},
};
use tonic::Code;

#[tokio::test]
async fn check_connection_is_capped_and_a_job_still_completes() {
    const CALLS: usize = 2_000;
    let (port, tarpit) = silent_listener().await;
    let scenario = Scenario::on(Backend::Postgres)
        .hosts(3)
        .timeouts(Timeouts {
            handshake: Duration::from_secs(2),
            ..Timeouts::default()
        })
        .output_cap(1 << 20)
        .register("ok-", DatabaseService::Mariadb)
        .start()
        .await;
    let (db, agent, healthy) = (&scenario.db, scenario.agent(), &scenario.ids[..]);
    let conn = db.connect().await;
    insert_servers(&conn, 1, port, |_| "127.0.0.1".into()).await;
    let silent = count(&conn, "SELECT MAX(id) FROM servers").await;

    let calls: Vec<_> = (0..CALLS)
        .map(|_| {
            let mut sync = agent.sync();
            tokio::spawn(async move {
                sync.check_connection(CheckConnectionRequest { server_id: silent })
                    .await
                    .map(tonic::Response::into_inner)
            })
        })
        .collect();
    // Meanwhile a job of the healthy hosts runs to its end.
    let started = Instant::now();
    let job = agent.start_sync(healthy).await;
    let events = tokio::time::timeout(
        Duration::from_secs(60),
        watch_to_end(&mut agent.sync(), &job),
    )
    .await
    .expect("the job completes while the checks are under way");
    let ok = events
        .iter()
        .filter(|e| {
            matches!(&e.event, Some(sync_event::Event::Outcome(o)) if o.outcome() == Outcome::Ok)
        })
        .count();
    assert_eq!(ok, 3, "every healthy host synced: {events:?}");
    let job_took = started.elapsed();

    let (mut exhausted, mut timed_out) = (0, 0);
    for call in calls {
        match call.await.expect("task") {
            Ok(check) => {
                assert_eq!(check.outcome(), Outcome::Unreachable, "{check:?}");
                assert_eq!(check.cause(), UnreachableCause::Timeout, "{check:?}");
                timed_out += 1;
            }
            Err(status) if status.code() == Code::ResourceExhausted => {
                assert!(status.message().contains("--max-checks"), "{status:?}");
                exhausted += 1;
            }
            Err(status) => panic!("unexpected: {status:?}"),
        }
    }
    eprintln!(
        "{CALLS} checks: {timed_out} answered TIMEOUT, {exhausted} RESOURCE_EXHAUSTED; the job \
         took {job_took:?}"
    );
    assert!(exhausted > 0, "the cap turned calls away");
    assert!(timed_out >= 64, "the cap's worth of calls ran: {timed_out}");
    assert_eq!(exhausted + timed_out, CALLS);
    tarpit.abort();
    scenario.stop().await;
}

#[tokio::test]
async fn a_burst_of_scrapes_reads_the_fleet_once_and_leaves_rpcs_unharmed() {
    let scenario = Scenario::on(Backend::Postgres).agents(0).start().await;
    let conn = scenario.db.connect().await;
    insert_servers(&conn, 1_000, 1, |_| "127.0.0.1".into()).await;
    add_mariadb_everywhere(&conn, "10.11").await;
    let (agent, metrics) = scenario.start_with_metrics(scenario.agent_process(), "30s");
    let mut fleet = FleetClient::new(connect(agent.addr).await);
    let list = |mut fleet: FleetClient<tonic::transport::Channel>| async move {
        let started = Instant::now();
        let page = fleet
            .list_servers(ListServersRequest {
                page_size: 100,
                ..Default::default()
            })
            .await
            .expect("ListServers");
        assert_eq!(page.into_inner().servers.len(), 100);
        started.elapsed()
    };
    let first = scrape(metrics).await;
    let reads = |text: &str| sample(text, "fleetsync_fleet_reads_total", "").expect("reads");
    assert_eq!(reads(&first), 1.0, "the first scrape read the fleet");
    let mut quiet = Vec::new();
    for _ in 0..20 {
        quiet.push(list(fleet.clone()).await);
    }

    let scrapes: Vec<_> = (0..100)
        .map(|_| tokio::spawn(async move { scrape(metrics).await }))
        .collect();
    let mut busy = Vec::new();
    for _ in 0..20 {
        busy.push(list(fleet.clone()).await);
    }
    let mut last = 0.0;
    for scrape in scrapes {
        let text = scrape.await.expect("scrape");
        last = f64::max(last, reads(&text));
        assert_eq!(
            sample(&text, "fleetsync_database_up", ""),
            Some(1.0),
            "every scrape answered"
        );
    }
    assert_eq!(
        last, 1.0,
        "100 scrapes within the interval read the database no more"
    );
    quiet.sort();
    busy.sort();
    let (quiet, busy) = (quiet[quiet.len() / 2], busy[busy.len() / 2]);
    eprintln!("ListServers median: {quiet:?} quiet, {busy:?} during 100 scrapes");
    assert!(
        busy < quiet * 5 + Duration::from_millis(50),
        "RPCs slowed by the scrapes: {quiet:?} -> {busy:?}"
    );
    let _ = fleet.list_servers(ListServersRequest::default()).await;
}

#[tokio::test]
async fn the_cli_reads_a_10000_server_job_whose_outcomes_carry_1_kb_messages() {
    use fleetsync_sync_agent::{
        model::{JobOrigin, Outcome as Stored, Scopes},
        store::{Completion, NewJob, Reach, RunResult, Selection, Store},
    };
    const SERVERS: usize = 10_000;
    let scenario = Scenario::on(Backend::Postgres).agents(0).start().await;
    let conn = scenario.db.connect().await;
    insert_servers(&conn, SERVERS, 1, |_| "127.0.0.1".into()).await;
    let store = Store::new(conn.clone());
    let (job, _) = store
        .create_job(&NewJob {
            request_id: fleetsync_common::RequestId::new("long-messages"),
            origin: JobOrigin::Rpc,
            selection: Selection::All,
            scopes: Scopes::ALL,
            force: false,
            reason: String::new(),
        })
        .await
        .expect("job");
    // Every server fails with a message of a kilobyte (the most a run stores).
    let message = "é".repeat(500);
    loop {
        let claims = store
            .claim(&AgentId::new("bench"), 600_000, 1_000)
            .await
            .expect("claim");
        if claims.is_empty() {
            break;
        }
        let batch: Vec<Completion> = claims
            .iter()
            .map(|c| Completion {
                claim: c.claim,
                result: RunResult::new(Stored::CommandFailed, message.clone()),
                inventory: None,
                pin: None,
                reach: Reach::Untried,
                ask_peer_ms: None,
            })
            .collect();
        store
            .complete(&AgentId::new("bench"), &batch)
            .await
            .expect("complete");
    }
    let agent = scenario.start_process(&scenario.agent_process());
    let output = std::process::Command::new(fleetsync_tests::process::bin_path("sync-agent"))
        .args([
            "job",
            job.id.as_str(),
            "--agent-url",
            &format!("http://{}", agent.addr),
        ])
        .args(["-o", "json"])
        .output()
        .expect("run sync-agent job");
    // Every server failed its command: read whole, and exit 1.
    assert_eq!(
        output.status.code(),
        Some(1),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let read: serde_json::Value = serde_json::from_slice(&output.stdout).expect("JSON");
    let outcomes = read["outcomes"].as_array().expect("outcomes");
    assert_eq!(outcomes.len(), SERVERS, "every outcome, across pages");
    assert!(
        outcomes.iter().all(|o| o["message"] == message.as_str()),
        "messages intact"
    );
}
