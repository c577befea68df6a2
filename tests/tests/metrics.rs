//! The agent's Prometheus endpoint, scraped as Prometheus does while a real sync runs: runs
//! in flight and leases during the run; afterwards, syncs by outcome and cause that match the
//! job's outcomes one for one, SSH stage histograms, gRPC calls by method and code, and the
//! fleet's state read from the database.

use fleetsync_common::Backend;
use fleetsync_common::proto::sync::v1::{
    DatabaseService, GetSyncJobRequest, StartSyncRequest, fleet_client::FleetClient,
    sync_agent_client::SyncAgentClient,
};
use fleetsync_tests::{
    Scenario,
    fleet::SSH_USER,
    scrape::{sample, scrape, sum},
    services::{connect, job_outcomes, register_server, watch_to_end},
};

#[tokio::test]
async fn metrics_count_what_a_real_sync_did() {
    // Hosts 0-2 answer (host 0 slowly, so the sync is seen in flight), host 3 refuses, and a
    // fifth server has no database service registered.
    let scenario = Scenario::on(Backend::Postgres)
        .hosts(4)
        .agents(0)
        .start()
        .await;
    let fleet = &scenario.fleet;
    fleet
        .host(0)
        .install_program("sudo", "#!/bin/sh\nsleep 2\nexec /usr/bin/sudo \"$@\"\n");
    fleet.host(3).stop();
    // Fresh fleet gauges at every scrape: the test follows them step by step.
    let (agent, metrics_addr) = scenario.start_with_metrics(
        scenario.agent_process().flag("--connect-timeout", "2s"),
        "0s",
    );
    let channel = connect(agent.addr).await;
    let mut fleet_api = FleetClient::new(channel.clone());
    let mut sync = SyncAgentClient::new(channel);

    // Before any work: every family is there, at zero.
    let idle = scrape(metrics_addr).await;
    assert_eq!(
        sample(&idle, "fleetsync_database_up", ""),
        Some(1.0),
        "{idle}"
    );
    assert_eq!(sample(&idle, "fleetsync_runs_in_flight", ""), Some(0.0));
    assert_eq!(sample(&idle, "fleetsync_leases_held", ""), Some(0.0));
    assert_eq!(sum(&idle, "fleetsync_syncs_total", ""), 0.0);
    assert!(
        sample(&idle, "fleetsync_db_pool_max_connections", "pool=\"rpc\"") >= Some(2.0),
        "{idle}"
    );

    for (i, host) in fleet.hosts().iter().enumerate() {
        register_server(
            &mut fleet_api,
            &format!("db-{i}"),
            host,
            SSH_USER,
            DatabaseService::Mariadb,
        )
        .await;
    }
    register_server(
        &mut fleet_api,
        "web-1",
        fleet.host(1),
        SSH_USER,
        DatabaseService::None,
    )
    .await;
    // Registering may start a run (the migration's request covers every server): wait until
    // the agent is idle, and count from there.
    let baseline = idle_scrape(metrics_addr).await;
    let job = sync
        .start_sync(StartSyncRequest {
            request_id: "metrics-1".into(),
            all_servers: true,
            force: true,
            reason: "metrics test".into(),
            ..Default::default()
        })
        .await
        .expect("start")
        .into_inner();

    // During the run: host 0 is still in its two-second command.
    let during = fleetsync_tests::poll_until(
        "no run in flight seen",
        std::time::Duration::from_secs(10),
        || async {
            let text = scrape(metrics_addr).await;
            if sample(&text, "fleetsync_runs_in_flight", "") >= Some(1.0) {
                Ok(text)
            } else {
                Err(text)
            }
        },
    )
    .await;
    assert!(sample(&during, "fleetsync_leases_held", "") >= Some(1.0));
    // Ours (and the migration's job, once the outbox is drained) not done yet.
    assert!(sum(&during, "fleetsync_jobs", "") >= 1.0, "{during}");
    assert!(sample(&during, "fleetsync_servers_waiting", "") >= Some(1.0));

    watch_to_end(&mut sync, &job.job_id).await;
    let outcomes = job_outcomes(&mut sync, &job.job_id).await;
    assert_eq!(outcomes.len(), 5);
    let unknown = sync
        .get_sync_job(GetSyncJobRequest {
            job_id: "no-such-job".into(),
            ..Default::default()
        })
        .await
        .expect_err("unknown job");
    assert_eq!(unknown.code(), tonic::Code::NotFound);

    let after = scrape(metrics_addr).await;
    // One sample per outcome and cause, counting exactly the job's outcomes.
    let mut expected = std::collections::BTreeMap::new();
    for outcome in &outcomes {
        let name = outcome
            .outcome()
            .as_str_name()
            .trim_start_matches("OUTCOME_")
            .to_owned();
        let cause = match outcome.cause() {
            fleetsync_common::proto::sync::v1::UnreachableCause::Unspecified => String::new(),
            cause => cause
                .as_str_name()
                .trim_start_matches("UNREACHABLE_CAUSE_")
                .to_owned(),
        };
        *expected.entry((name, cause)).or_insert(0.0) += 1.0;
    }
    assert_eq!(
        expected.get(&("OK".to_owned(), String::new())),
        Some(&3.0),
        "{outcomes:?}"
    );
    assert_eq!(
        expected.get(&("UNREACHABLE".to_owned(), "REFUSED".to_owned())),
        Some(&1.0),
        "{outcomes:?}"
    );
    for ((outcome, cause), n) in &expected {
        let labels = format!("outcome=\"{outcome}\",cause=\"{cause}\"");
        assert_eq!(
            delta(&after, &baseline, "fleetsync_syncs_total", &labels),
            *n,
            "{labels}: {after}"
        );
    }
    assert_eq!(
        sum(&after, "fleetsync_syncs_total", "") - sum(&baseline, "fleetsync_syncs_total", ""),
        5.0,
        "{after}"
    );

    // Stage histograms: every stage of the three servers that answered.
    for stage in ["connect", "banner", "key_exchange", "auth", "command"] {
        let count = delta(
            &after,
            &baseline,
            "fleetsync_ssh_stage_seconds_count",
            &format!("stage=\"{stage}\""),
        );
        assert_eq!(count, 3.0, "{stage}: {after}");
    }
    let command_sum = delta(
        &after,
        &baseline,
        "fleetsync_ssh_stage_seconds_sum",
        "stage=\"command\"",
    );
    assert!(command_sum >= 2.0, "host 0 took two seconds: {command_sum}");

    // gRPC calls by method and code, streams counted when they end.
    let agent_service = "service=\"fleetsync.sync.v1.SyncAgent\"";
    for (method, code, n) in [
        ("StartSync", "OK", 1.0),
        ("WatchSync", "OK", 1.0),
        ("GetSyncJob", "OK", 1.0),
        ("GetSyncJob", "NOT_FOUND", 1.0),
    ] {
        let labels = format!("{agent_service},method=\"{method}\",code=\"{code}\"");
        assert_eq!(
            delta(&after, &baseline, "fleetsync_grpc_calls_total", &labels),
            n,
            "{labels}: {after}"
        );
    }
    assert_eq!(
        sample(
            &after,
            "fleetsync_grpc_calls_total",
            "service=\"fleetsync.sync.v1.Fleet\",method=\"UpsertServer\",code=\"OK\""
        ),
        Some(5.0)
    );

    // grpcurl's reflection calls are counted by their service, not as "unknown".
    let grpcurl = std::env::var("FLEETSYNC_GRPCURL").unwrap_or_else(|_| "grpcurl".into());
    let listed = std::process::Command::new(grpcurl)
        .args(["-plaintext", &agent.addr.to_string(), "list"])
        .output()
        .expect("run grpcurl (`just setup`)");
    assert!(listed.status.success(), "{listed:?}");
    let reflected = scrape(metrics_addr).await;
    let reflection = sum(
        &reflected,
        "fleetsync_grpc_calls_total",
        "service=\"grpc.reflection.v1.ServerReflection\"",
    ) + sum(
        &reflected,
        "fleetsync_grpc_calls_total",
        "service=\"grpc.reflection.v1alpha.ServerReflection\"",
    );
    assert!(reflection >= 1.0, "{reflected}");
    assert_eq!(
        sum(
            &reflected,
            "fleetsync_grpc_calls_total",
            "service=\"unknown\""
        ),
        sum(&after, "fleetsync_grpc_calls_total", "service=\"unknown\""),
        "{reflected}"
    );

    // The fleet's state, from the database: nothing waits, the refused host is offline, the
    // server without a database service was never tried.
    for (labels, n) in [
        ("reachability=\"online\"", 3.0),
        ("reachability=\"offline\"", 1.0),
        ("reachability=\"unknown\"", 1.0),
    ] {
        assert_eq!(
            sample(&after, "fleetsync_servers", labels),
            Some(n),
            "{labels}: {after}"
        );
    }
    assert_eq!(sample(&after, "fleetsync_servers_waiting", ""), Some(0.0));
    assert_eq!(sum(&after, "fleetsync_jobs", ""), 0.0, "{after}");
    assert_eq!(sample(&after, "fleetsync_runs_in_flight", ""), Some(0.0));
    assert_eq!(sample(&after, "fleetsync_leases_held", ""), Some(0.0));
    assert!(
        sample(&after, "fleetsync_db_acquire_wait_seconds_count", "") > Some(0.0),
        "{after}"
    );
}

/// A server that went into backoff after its job was made is skipped by the run that finds it
/// so: the job's row says SKIPPED_OFFLINE, as for the skips made with a job, but a skip is no
/// attempt: no `sync_runs` row and nothing in `fleetsync_syncs_total` (whose sum the agent's
/// quarantine rule reads as its attempts).
#[tokio::test]
async fn a_skip_at_run_time_is_not_counted_as_a_run() {
    use fleetsync_common::proto::sync::v1::{self as pb, sync_event};
    use fleetsync_common::{RequestId, clock::now_ms};
    use fleetsync_sync_agent::{
        model::{JobOrigin, Scopes},
        store::{NewJob, RunResult, Selection, Store},
    };
    use fleetsync_tests::{
        catalog::{add_mariadb_everywhere, count, execute, insert_servers},
        events::watch,
    };

    let scenario = Scenario::on(Backend::Sqlite).agents(0).start().await;
    let conn = scenario.db.connect().await;
    // Refused loopback addresses: a run ends at once.
    insert_servers(&conn, 2, 1, |_| "127.0.0.1".into()).await;
    add_mariadb_everywhere(&conn, "").await;
    execute(&conn, "UPDATE sync_requests SET state = 'taken'").await;
    let first = count(&conn, "SELECT MIN(id) FROM servers").await;
    let (job, _) = Store::new(conn.clone())
        .create_job(&NewJob {
            request_id: RequestId::new("before-the-backoff"),
            origin: JobOrigin::Rpc,
            selection: Selection::All,
            scopes: Scopes::ALL,
            force: false,
            reason: String::new(),
        })
        .await
        .expect("create");
    assert_eq!((job.total, job.finished), (2, 0), "nothing in backoff yet");
    // Then the first server fails a probe: in backoff for a day.
    let until = now_ms() + 86_400_000;
    execute(
        &conn,
        &format!(
            "UPDATE servers SET reachability = 'offline', consecutive_failures = 2, \
             next_probe_at = {until} WHERE id = {first}"
        ),
    )
    .await;

    let (agent, metrics_addr) = scenario.start_with_metrics(scenario.agent_process(), "0s");
    let mut sync = SyncAgentClient::new(connect(agent.addr).await);
    let events = watch(&mut sync, job.id.as_str(), 0).await;
    assert_eq!(
        events.iter().map(|e| e.cursor).collect::<Vec<u64>>(),
        [1, 2, 3]
    );
    let outcomes: Vec<_> = events
        .iter()
        .filter_map(|e| match &e.event {
            Some(sync_event::Event::Outcome(o)) => Some(o),
            _ => None,
        })
        .collect();
    let skipped = outcomes
        .iter()
        .find(|o| o.server_id == first)
        .expect("the first server's outcome");
    assert_eq!(skipped.outcome(), pb::Outcome::SkippedOffline);
    assert_eq!(
        skipped.message,
        RunResult::skipped_offline(2, until).message
    );
    let other = outcomes
        .iter()
        .find(|o| o.server_id != first)
        .expect("the other server's outcome");
    assert_eq!(other.outcome(), pb::Outcome::Unreachable);

    let after = idle_scrape(metrics_addr).await;
    assert_eq!(
        sum(&after, "fleetsync_syncs_total", "SKIPPED_OFFLINE"),
        0.0,
        "{after}"
    );
    assert_eq!(
        sum(&after, "fleetsync_syncs_total", "outcome=\"UNREACHABLE\""),
        1.0,
        "{after}"
    );
    assert_eq!(sum(&after, "fleetsync_syncs_total", ""), 1.0, "{after}");
    assert_eq!(count(&conn, "SELECT COUNT(*) FROM sync_runs").await, 1);
    conn.close().await;
}

#[test]
fn a_metrics_address_that_cannot_be_bound_fails_the_start() {
    let held = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let taken = held.local_addr().expect("addr").to_string();
    let output = start_with_metrics_on(&taken);
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains(&format!("cannot listen for metrics on {taken}")),
        "{stderr}"
    );
}

/// `name{labels}` in `after` minus the same in `before` (absent counts as 0).
fn delta(after: &str, before: &str, name: &str, labels: &str) -> f64 {
    sample(after, name, labels).unwrap_or(0.0) - sample(before, name, labels).unwrap_or(0.0)
}

/// A scrape once nothing waits, runs or holds a lease (within 20 s).
async fn idle_scrape(addr: std::net::SocketAddr) -> String {
    fleetsync_tests::poll_until(
        "the agent never went idle",
        std::time::Duration::from_secs(20),
        || async {
            let text = scrape(addr).await;
            let idle = [
                "fleetsync_servers_waiting",
                "fleetsync_runs_in_flight",
                "fleetsync_leases_held",
            ]
            .iter()
            .all(|name| sample(&text, name, "") == Some(0.0));
            if idle { Ok(text) } else { Err(text) }
        },
    )
    .await
}

/// Runs `sync-agent serve` with metrics on `addr`, for a start that must fail.
fn start_with_metrics_on(addr: &str) -> std::process::Output {
    let dir = tempfile::tempdir().expect("temp dir");
    fleetsync_tests::services::serve_command("sync-agent", dir.path())
        .args([
            "--listen",
            "127.0.0.1:0",
            "--database-url",
            "sqlite::memory:",
            "--metrics-listen",
            addr,
        ])
        .env("FLEETSYNC_DRAIN_DELAY", "0s")
        .output()
        .expect("run sync-agent")
}

#[test]
fn metrics_beyond_loopback_need_the_same_opt_in_as_the_grpc_port() {
    let refused = start_with_metrics_on("0.0.0.0:0");
    assert!(!refused.status.success());
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert!(
        stderr.contains("refusing to serve metrics on 0.0.0.0:0")
            && stderr.contains("--allow-unauthenticated"),
        "{stderr}"
    );
}
