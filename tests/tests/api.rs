//! The SyncAgent and Fleet APIs as clients use them: joined runs and repeated requests,
//! resumable watches, malformed and hostile requests, registration by name and paging, and
//! grpcurl against the binary.

use std::time::Duration;

use fleetsync_common::Backend;
use fleetsync_common::proto::sync::v1::{
    self as pb, DatabaseService, GetServerRequest, GetSyncJobRequest, ListServersRequest, Outcome,
    ResetHostKeyRequest, ServerSpec, StartSyncRequest, UpsertServerRequest, WatchSyncRequest,
};
use fleetsync_tests::{
    AgentProcess, Scenario, SshFleet, TestDb,
    catalog::{count, wait_for_count},
    events::{outcomes, summary, watch},
    fleet::SSH_USER,
    services::{migrate, register_fleet, register_server, sync_events as sync},
};
use tonic::Code;

#[tokio::test]
async fn a_request_during_a_run_gets_a_run_of_its_own_and_repeat_requests_one_job() {
    let scenario = Scenario::on(Backend::Sqlite).hosts(1).start().await;
    let (fleet, db, agent) = (&scenario.fleet, &scenario.db, scenario.agent());
    let (mut fleet_api, mut sync_api) = (agent.fleet(), agent.sync());
    let id = register_server(
        &mut fleet_api,
        "slow",
        fleet.host(0),
        SSH_USER,
        DatabaseService::Mariadb,
    )
    .await;
    // A slow server: the probe takes a second before answering for real.
    fleet
        .host(0)
        .install_program("sudo", "#!/bin/sh\nsleep 1\nexec /usr/bin/sudo \"$@\"\n");

    let start = |request_id: &str| StartSyncRequest {
        request_id: request_id.into(),
        server_ids: vec![id],
        ..Default::default()
    };
    let a = sync_api
        .start_sync(start("a"))
        .await
        .expect("a")
        .into_inner();
    // Wait until the run is in flight (its lease is held), then ask again.
    let conn = db.connect().await;
    wait_for_count(
        &conn,
        "SELECT COUNT(*) FROM server_leases WHERE holder IS NOT NULL",
        |n| n > 0,
        Duration::from_secs(5),
        "the run never started",
    )
    .await;
    let b = sync_api
        .start_sync(start("b"))
        .await
        .expect("b")
        .into_inner();
    assert_ne!(a.job_id, b.job_id);
    // The same request id is the same job, however often it is sent.
    let a_again = sync_api
        .start_sync(start("a"))
        .await
        .expect("a again")
        .into_inner();
    assert_eq!(
        (a_again.job_id.as_str(), a_again.created),
        (a.job_id.as_str(), false)
    );

    let mut finished = Vec::new();
    for job in [&a.job_id, &b.job_id] {
        let events = watch(&mut sync_api, job, 0).await;
        let outcome = &outcomes(&events)[&id];
        assert_eq!(outcome.outcome(), Outcome::Ok);
        let at = outcome.finished_at.as_ref().expect("finished_at");
        finished.push((at.seconds, at.nanos));
    }
    // B arrived while A's run was reading the server: what that run read may predate B (a
    // "sync after restore"), so B gets a run of its own, which finishes later.
    assert_eq!(
        count(&conn, "SELECT COUNT(*) FROM sync_runs").await,
        2,
        "the request made during a run is served by the next run"
    );
    assert!(finished[1] > finished[0], "{finished:?}");
    assert_eq!(
        count(&conn, "SELECT COUNT(*) FROM sync_jobs WHERE origin = 'rpc'").await,
        2
    );
    scenario.stop().await;
}

#[tokio::test]
async fn a_watch_resumes_from_its_cursor_and_jobs_read_back() {
    let scenario = Scenario::on(Backend::Postgres).hosts(3).start().await;
    let (fleet, agent) = (&scenario.fleet, scenario.agent());
    let (mut fleet_api, mut sync_api) = (agent.fleet(), agent.sync());
    let ids = register_fleet(&mut fleet_api, fleet, "h", DatabaseService::Mariadb).await;
    let all = sync(&mut sync_api, &ids, "full").await;
    let job_id = summary(&all).job_id;
    // From cursor 2: the third outcome, then the summary.
    let tail = watch(&mut sync_api, &job_id, 2).await;
    assert_eq!(tail.iter().map(|e| e.cursor).collect::<Vec<_>>(), [3, 4]);
    assert_eq!(tail[0], all[2]);
    // From the summary's own cursor: nothing more, the stream just ends.
    let end = watch(&mut sync_api, &job_id, 4).await;
    assert!(end.is_empty(), "{end:?}");
    let read = sync_api
        .get_sync_job(GetSyncJobRequest {
            job_id: job_id.clone(),
            include_outcomes: true,
            page_size: 0,
            page_token: String::new(),
        })
        .await
        .expect("get job")
        .into_inner();
    let job = read.job.expect("job");
    assert_eq!(
        (job.total, job.finished, job.state()),
        (3, 3, pb::JobState::Done)
    );
    assert_eq!(
        job.outcome_counts,
        [pb::OutcomeCount {
            outcome: Outcome::Ok as i32,
            count: 3
        }]
    );
    assert_eq!(read.outcomes.len(), 3);
    assert!(
        read.next_page_token.is_empty(),
        "everything fit in one page"
    );

    // A page at a time: two, then the last one, in stream order.
    let page = |size: u32, token: &str| GetSyncJobRequest {
        job_id: job_id.clone(),
        include_outcomes: true,
        page_size: size,
        page_token: token.into(),
    };
    let first = sync_api
        .get_sync_job(page(2, ""))
        .await
        .expect("page 1")
        .into_inner();
    assert_eq!(first.outcomes.len(), 2);
    assert!(!first.next_page_token.is_empty());
    let second = sync_api
        .get_sync_job(page(2, &first.next_page_token))
        .await
        .expect("page 2")
        .into_inner();
    assert_eq!(second.outcomes.len(), 1);
    assert!(second.next_page_token.is_empty(), "the last page says so");
    let paged: Vec<_> = first.outcomes.iter().chain(&second.outcomes).collect();
    assert_eq!(paged, read.outcomes.iter().collect::<Vec<_>>());
    for (request, field) in [
        (page(2, "not-a-token"), "page_token"),
        (page(10_001, ""), "page_size"),
    ] {
        let err = sync_api.get_sync_job(request).await.expect_err("refused");
        assert_eq!(err.code(), Code::InvalidArgument, "{}", err.message());
        assert!(err.message().contains(field), "{}", err.message());
    }
    scenario.stop().await;
}

/// A request that must be refused: the status it gets.
type Refusal = std::pin::Pin<Box<dyn std::future::Future<Output = tonic::Status> + Send>>;

/// The status `call` ends with; a success fails the test.
fn refused<T: std::fmt::Debug + Send + 'static>(
    call: impl std::future::Future<Output = Result<tonic::Response<T>, tonic::Status>> + Send + 'static,
) -> Refusal {
    Box::pin(async move {
        match call.await {
            Ok(response) => panic!("expected an error, got {response:?}"),
            Err(status) => status,
        }
    })
}

#[tokio::test]
async fn malformed_and_hostile_requests_get_the_right_status() {
    let scenario = Scenario::on(Backend::Sqlite).hosts(1).start().await;
    let (fleet, agent) = (&scenario.fleet, scenario.agent());
    let (mut fleet_api, mut sync_api) = (agent.fleet(), agent.sync());
    let id = register_server(
        &mut fleet_api,
        "one",
        fleet.host(0),
        SSH_USER,
        DatabaseService::Mariadb,
    )
    .await;
    let deadline = Duration::from_secs(10);
    fn code<T: std::fmt::Debug>(
        result: Result<tonic::Response<T>, tonic::Status>,
    ) -> (Code, String) {
        match result {
            Ok(r) => panic!("expected an error, got {r:?}"),
            Err(status) => (status.code(), status.message().to_owned()),
        }
    }
    let start = |r: StartSyncRequest| {
        let mut client = sync_api.clone();
        async move { client.start_sync(r).await }
    };
    let list = |r: ListServersRequest| {
        let mut client = fleet_api.clone();
        async move { client.list_servers(r).await }
    };
    // Each malformed or hostile request: what it is, the status it gets, and a part of its
    // message ("" when the code says it all).
    let cases: Vec<(&str, Code, &str, Refusal)> = vec![
        (
            "unknown server ids, named",
            Code::NotFound,
            "424242",
            refused(start(StartSyncRequest {
                server_ids: vec![id, 424242, 9],
                ..Default::default()
            })),
        ),
        (
            "nothing selected",
            Code::InvalidArgument,
            "empty selection",
            refused(start(StartSyncRequest::default())),
        ),
        (
            "too many ids",
            Code::InvalidArgument,
            "at most 10000",
            refused(start(StartSyncRequest {
                server_ids: (1..=100_000).collect(),
                ..Default::default()
            })),
        ),
        (
            "an unknown scope",
            Code::InvalidArgument,
            "unknown value 99",
            refused(start(StartSyncRequest {
                all_servers: true,
                scopes: vec![99],
                ..Default::default()
            })),
        ),
        (
            "a negative id",
            Code::InvalidArgument,
            "must be a positive server id, got -5",
            refused(start(StartSyncRequest {
                server_ids: vec![-5],
                ..Default::default()
            })),
        ),
        (
            "GetSyncJob of an unknown job",
            Code::NotFound,
            "nope",
            refused({
                let mut client = sync_api.clone();
                async move {
                    client
                        .get_sync_job(GetSyncJobRequest {
                            job_id: "nope".into(),
                            include_outcomes: true,
                            page_size: 0,
                            page_token: String::new(),
                        })
                        .await
                }
            }),
        ),
        (
            "GetSyncJob without a job id",
            Code::InvalidArgument,
            "invalid job_id: required: a job id, as StartSync returns it",
            refused({
                let mut client = sync_api.clone();
                async move { client.get_sync_job(GetSyncJobRequest::default()).await }
            }),
        ),
        (
            "a job id with a newline",
            Code::InvalidArgument,
            "invalid job_id: contains control characters",
            refused({
                let mut client = sync_api.clone();
                async move {
                    client
                        .watch_sync(WatchSyncRequest {
                            job_id: "j\n1".into(),
                            cursor: 0,
                        })
                        .await
                        .map(|stream| stream.map(|_| ()))
                }
            }),
        ),
        (
            "ResumeAgent without an id",
            Code::InvalidArgument,
            "invalid id: required: an agent id, as ListAgents shows it",
            refused({
                let mut client = sync_api.clone();
                async move {
                    client
                        .resume_agent(pb::ResumeAgentRequest { id: "  ".into() })
                        .await
                }
            }),
        ),
        (
            "GetServer of an unknown id",
            Code::NotFound,
            "server 987654 not found",
            refused({
                let mut client = fleet_api.clone();
                async move { client.get_server(GetServerRequest { id: 987654 }).await }
            }),
        ),
        (
            "DeleteServer of an unknown id",
            Code::NotFound,
            "987654",
            refused({
                let mut client = fleet_api.clone();
                async move {
                    client
                        .delete_server(pb::DeleteServerRequest { id: 987654 })
                        .await
                }
            }),
        ),
        (
            "ResetHostKey of id 0",
            Code::InvalidArgument,
            "must be a positive server id",
            refused({
                let mut client = fleet_api.clone();
                async move { client.reset_host_key(ResetHostKeyRequest { id: 0 }).await }
            }),
        ),
        (
            "an unknown reachability filter",
            Code::InvalidArgument,
            "reachability",
            refused(list(ListServersRequest {
                reachability: 9,
                ..Default::default()
            })),
        ),
        (
            "a page token that is not one",
            Code::InvalidArgument,
            "page_token",
            refused(list(ListServersRequest {
                page_token: "abc".into(),
                ..Default::default()
            })),
        ),
        (
            "a page too large",
            Code::InvalidArgument,
            "page_size",
            refused(list(ListServersRequest {
                page_size: 5000,
                ..Default::default()
            })),
        ),
    ];
    for (what, expected, part, refusal) in cases {
        let status = tokio::time::timeout(deadline, refusal)
            .await
            .unwrap_or_else(|_| panic!("{what}: no answer within {deadline:?}"));
        assert_eq!(status.code(), expected, "{what}: {}", status.message());
        assert!(
            status.message().contains(part),
            "{what}: {}",
            status.message()
        );
    }

    let job = sync_api
        .start_sync(StartSyncRequest {
            server_ids: vec![id],
            ..Default::default()
        })
        .await
        .expect("start")
        .into_inner();
    let watch_err = |job_id: &str, cursor: u64| {
        let mut client = sync_api.clone();
        let job_id = job_id.to_owned();
        async move {
            let result = tokio::time::timeout(
                deadline,
                client.watch_sync(WatchSyncRequest { job_id, cursor }),
            )
            .await
            .expect("answers in time");
            result.map(|_| ()).expect_err("must fail").code()
        }
    };
    assert_eq!(
        watch_err(&job.job_id, 3).await,
        Code::OutOfRange,
        "a bogus cursor"
    );
    assert_eq!(watch_err(&job.job_id, u64::MAX).await, Code::OutOfRange);
    assert_eq!(watch_err("no-such-job", 0).await, Code::NotFound);
    assert_eq!(watch_err("", 0).await, Code::InvalidArgument);

    // A request over the 4 MiB message limit: tonic answers OUT_OF_RANGE (its code for a
    // message too large to decode, documented in the README), saying so; nothing is created.
    let huge = StartSyncRequest {
        server_ids: (1_000_000..=2_500_000).collect(),
        ..Default::default()
    };
    let (c, m) = code(
        sync_api
            .clone()
            .max_encoding_message_size(64 << 20)
            .start_sync(huge)
            .await,
    );
    assert_eq!(c, Code::OutOfRange, "{m}");
    assert!(m.contains("message length too large"), "{m}");

    // Fleet: unknown ids, bad fields (each named), unknown enum values, bad page tokens.
    let bad = |spec: ServerSpec| {
        let mut client = fleet_api.clone();
        async move {
            let status = client
                .upsert_server(UpsertServerRequest {
                    id: 0,
                    spec: Some(spec),
                })
                .await
                .expect_err("invalid");
            (status.code(), status.message().to_owned())
        }
    };
    let good = ServerSpec {
        name: "x".into(),
        ip: "127.0.0.1".into(),
        port: 22,
        ssh_user: "vito".into(),
        database_service: DatabaseService::Mysql as i32,
        database_version: String::new(),
        status: 0,
        host_key: String::new(),
        zone: String::new(),
    };
    for (spec, field) in [
        (
            ServerSpec {
                host_key: "ssh-ed25519 not-a-key".into(),
                ..good.clone()
            },
            "spec.host_key",
        ),
        (
            ServerSpec {
                name: String::new(),
                ..good.clone()
            },
            "spec.name",
        ),
        (
            ServerSpec {
                ip: "300.1.1.1 ; rm -rf /".into(),
                ..good.clone()
            },
            "spec.ip",
        ),
        (
            // Digits and dots that are no IPv4 address: refused now, not a DNS failure later.
            ServerSpec {
                ip: "999.1.1.1".into(),
                ..good.clone()
            },
            "spec.ip",
        ),
        (
            ServerSpec {
                ip: "db.123".into(),
                ..good.clone()
            },
            "spec.ip",
        ),
        (
            ServerSpec {
                port: 70000,
                ..good.clone()
            },
            "spec.port",
        ),
        (
            ServerSpec {
                database_service: 17,
                ..good.clone()
            },
            "spec.database_service",
        ),
        (
            ServerSpec {
                database_service: 0,
                ..good.clone()
            },
            "spec.database_service",
        ),
        (
            ServerSpec {
                zone: "eu/1; DROP TABLE servers".into(),
                ..good.clone()
            },
            "spec.zone",
        ),
    ] {
        let (c, m) = bad(spec).await;
        assert_eq!(c, Code::InvalidArgument);
        assert!(m.contains(field), "{m}");
    }
    let (c, _) = code(
        fleet_api
            .upsert_server(UpsertServerRequest {
                id: 555,
                spec: Some(good.clone()),
            })
            .await,
    );
    assert_eq!(c, Code::NotFound, "update of an unknown id");

    // The agent is still fine.
    let list = fleet_api
        .list_servers(ListServersRequest::default())
        .await
        .expect("list")
        .into_inner();
    assert_eq!(list.servers.len(), 1);
    scenario.stop().await;
}

#[tokio::test]
async fn fleet_upserts_by_name_pages_and_deletes() {
    let scenario = Scenario::on(Backend::MySql).output_cap(1024).start().await;
    let mut fleet_api = scenario.fleet_api();
    let spec = |name: &str, service: DatabaseService| ServerSpec {
        name: name.into(),
        ip: "192.0.2.10".into(),
        port: 0,
        ssh_user: String::new(),
        database_service: service as i32,
        database_version: "10.11".into(),
        status: 0,
        host_key: String::new(),
        zone: String::new(),
    };
    let mut ids = Vec::new();
    for i in 0..5 {
        let r = fleet_api
            .upsert_server(UpsertServerRequest {
                id: 0,
                spec: Some(spec(&format!("s{i}"), DatabaseService::Mariadb)),
            })
            .await
            .expect("create")
            .into_inner();
        assert!(r.created);
        ids.push(r.server.expect("server").id);
    }
    // Same name: an update, not a second server; the service can change.
    let r = fleet_api
        .upsert_server(UpsertServerRequest {
            id: 0,
            spec: Some(spec("s0", DatabaseService::Postgresql)),
        })
        .await
        .expect("update")
        .into_inner();
    assert!(!r.created);
    let s0 = r.server.expect("server");
    assert_eq!(s0.id, ids[0]);
    let s0_spec = s0.spec.clone().expect("spec");
    assert_eq!((s0_spec.port, s0_spec.ssh_user.as_str()), (22, "vito"));
    assert_eq!(s0_spec.database_service(), DatabaseService::Postgresql);
    assert_eq!(s0.reachability(), pb::Reachability::Unknown);
    // Renaming onto another server's name is refused.
    let status = fleet_api
        .upsert_server(UpsertServerRequest {
            id: ids[1],
            spec: Some(spec("s2", DatabaseService::None)),
        })
        .await
        .expect_err("clash");
    assert_eq!(status.code(), Code::AlreadyExists);

    let page = fleet_api
        .list_servers(ListServersRequest {
            page_size: 2,
            ..Default::default()
        })
        .await
        .expect("page 1")
        .into_inner();
    assert_eq!(
        page.servers.iter().map(|s| s.id).collect::<Vec<_>>(),
        ids[..2]
    );
    let page2 = fleet_api
        .list_servers(ListServersRequest {
            page_size: 2,
            page_token: page.next_page_token,
            ..Default::default()
        })
        .await
        .expect("page 2")
        .into_inner();
    assert_eq!(
        page2.servers.iter().map(|s| s.id).collect::<Vec<_>>(),
        ids[2..4]
    );
    let offline = fleet_api
        .list_servers(ListServersRequest {
            reachability: pb::Reachability::Offline as i32,
            ..Default::default()
        })
        .await
        .expect("filter")
        .into_inner();
    assert!(offline.servers.is_empty());

    fleet_api
        .delete_server(pb::DeleteServerRequest { id: ids[4] })
        .await
        .expect("delete");
    let status = fleet_api
        .get_server(GetServerRequest { id: ids[4] })
        .await
        .expect_err("gone");
    assert_eq!(status.code(), Code::NotFound);
    scenario.stop().await;
}

#[tokio::test]
async fn grpcurl_syncs_one_server_and_streams_its_outcome() {
    let fleet = SshFleet::start(1).await;
    let dir = tempfile::tempdir().expect("temp dir");
    let db = TestDb::sqlite().await;
    migrate(db.url()).await;
    let key = fleet.client_key().to_str().expect("utf-8 path").to_owned();
    let agent = AgentProcess::on(db.url())
        .args(&["--ssh-key", &key])
        .start(dir.path());
    let addr = agent.addr.to_string();
    let grpcurl = std::env::var("FLEETSYNC_GRPCURL").unwrap_or_else(|_| "grpcurl".into());
    let run = |args: Vec<String>| {
        let output = std::process::Command::new(&grpcurl)
            .args(&args)
            .output()
            .expect("run grpcurl (`just setup`)");
        assert!(
            output.status.success(),
            "grpcurl {args:?}: {}",
            String::from_utf8_lossy(&output.stderr)
        );
        String::from_utf8(output.stdout).expect("utf-8")
    };
    let host = fleet.host(0);
    let registered = run(vec![
        "-plaintext".into(),
        "-d".into(),
        format!(
            r#"{{"spec": {{"name": "db-1", "ip": "{}", "port": {}, "sshUser": "{SSH_USER}", "databaseService": "DATABASE_SERVICE_MARIADB"}}}}"#,
            host.addr(),
            host.port()
        ),
        addr.clone(),
        "fleetsync.sync.v1.Fleet/UpsertServer".into(),
    ]);
    assert!(registered.contains("\"created\": true"), "{registered}");
    let streamed = run(vec![
        "-plaintext".into(),
        "-d".into(),
        r#"{"serverIds": ["1"], "reason": "manual"}"#.into(),
        addr.clone(),
        "fleetsync.sync.v1.SyncAgent/Sync".into(),
    ]);
    assert!(
        streamed.contains("\"outcome\": \"OUTCOME_OK\""),
        "{streamed}"
    );
    assert!(streamed.contains("\"serverName\": \"db-1\""), "{streamed}");
    assert!(
        streamed.contains("\"state\": \"JOB_STATE_DONE\""),
        "{streamed}"
    );
    let server = run(vec![
        "-plaintext".into(),
        "-d".into(),
        r#"{"id": "1"}"#.into(),
        addr,
        "fleetsync.sync.v1.Fleet/GetServer".into(),
    ]);
    assert!(server.contains("\"name\": \"test\""), "{server}");
    assert!(server.contains("REACHABILITY_ONLINE"), "{server}");
}
