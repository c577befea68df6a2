//! Both services serve over real gRPC: health, reflection (grpcurl, the real client), the full
//! contract, graceful shutdown on SIGTERM, and a clear refusal when the database is down.

use std::{process::Command, time::Duration};

use fleetsync_common::Backend;
use fleetsync_common::proto::{
    migrator::v1::{
        GetStatusRequest, MigrateRequest, MigrationState, PlanRequest, VerifyRequest, migrate_event,
    },
    sync::v1::{ListServersRequest, StartSyncRequest},
};
use fleetsync_sync_agent::ssh::Timeouts;
use fleetsync_tests::{
    Scenario, TestDb, TestMigrator,
    process::bin_path,
    services::{ServeProcess, migrate, serve_command},
};
use tokio_stream::StreamExt;
use tonic::Code;
use tonic_health::pb::{HealthCheckRequest, health_check_response::ServingStatus};

async fn health(
    client: &mut tonic_health::pb::health_client::HealthClient<tonic::transport::Channel>,
    service: &str,
) -> ServingStatus {
    let response = client
        .check(HealthCheckRequest {
            service: service.into(),
        })
        .await
        .expect("health check");
    response.into_inner().status()
}

#[tokio::test]
async fn agent_serves_health_and_its_services_on_every_backend() {
    for backend in fleetsync_tests::db::ALL_BACKENDS {
        let scenario = Scenario::on(backend)
            .timeouts(Timeouts::default())
            .output_cap(1024)
            .start()
            .await;
        let agent = scenario.agent();
        let mut health_client = agent.service.health();
        assert_eq!(
            health(&mut health_client, "").await,
            ServingStatus::Serving,
            "{backend}"
        );
        for service in ["fleetsync.sync.v1.SyncAgent", "fleetsync.sync.v1.Fleet"] {
            assert_eq!(
                health(&mut health_client, service).await,
                ServingStatus::Serving
            );
        }
        let unknown = health_client
            .check(HealthCheckRequest {
                service: "fleetsync.migrator.v1.Migrator".into(),
            })
            .await
            .expect_err("the agent does not serve the migrator");
        assert_eq!(unknown.code(), Code::NotFound);

        let servers = agent
            .fleet()
            .list_servers(ListServersRequest::default())
            .await
            .expect("list")
            .into_inner();
        assert!(servers.servers.is_empty());
        let status = agent
            .sync()
            .start_sync(StartSyncRequest::default())
            .await
            .expect_err("empty selection");
        assert_eq!(status.code(), Code::InvalidArgument);
        assert!(
            status.message().contains("empty selection"),
            "{}",
            status.message()
        );

        scenario.stop().await;
    }
}

#[tokio::test]
async fn migrator_service_reports_plans_and_migrates_alongside_the_cli() {
    let db = TestDb::postgres().await;
    let migrator = TestMigrator::spawn(db.url()).await;
    let mut health_client = migrator.service.health();
    assert_eq!(health(&mut health_client, "").await, ServingStatus::Serving);
    assert_eq!(
        health(&mut health_client, "fleetsync.migrator.v1.Migrator").await,
        ServingStatus::Serving
    );
    let mut client = migrator.migrator();

    let status = client
        .get_status(GetStatusRequest {})
        .await
        .expect("status")
        .into_inner();
    assert_eq!(status.backend, "postgres");
    assert_eq!(status.current_version, 0);
    let embedded =
        fleetsync_migrator::migration::MigrationSet::embedded(fleetsync_common::Backend::Postgres)
            .len();
    assert_eq!(status.migrations.len(), embedded);
    let plan = client
        .plan(PlanRequest { target_version: 0 })
        .await
        .expect("plan")
        .into_inner();
    assert_eq!(plan.migrations.len(), embedded);
    assert!(plan.migrations[0].statements[0].starts_with("CREATE TABLE servers"));

    // Bad targets are the caller's fault.
    let err = client
        .plan(PlanRequest { target_version: -1 })
        .await
        .expect_err("negative");
    assert_eq!(err.code(), Code::InvalidArgument);
    let err = client
        .plan(PlanRequest { target_version: 42 })
        .await
        .expect_err("unknown");
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(
        err.message().contains("no migration has version 42"),
        "{}",
        err.message()
    );

    // The RPC and the CLI at once: serialised by the lock, each migration applied once.
    let url = db.url().to_owned();
    let cli = tokio::spawn(async move {
        fleetsync_tests::migrator::migrator(&url, &["migrate", "--no-dispatch"]).await
    });
    let mut stream = client
        .migrate(MigrateRequest {
            target_version: 0,
            ..MigrateRequest::default()
        })
        .await
        .expect("migrate")
        .into_inner();
    let mut rpc_applied = Vec::new();
    let mut summary = None;
    while let Some(event) = stream.next().await {
        match event.expect("event").event.expect("event body") {
            migrate_event::Event::Finished(f) => {
                assert_eq!(f.state(), MigrationState::Applied, "{f:?}");
                rpc_applied.push(f.version);
            }
            migrate_event::Event::Summary(s) => summary = Some(s),
            migrate_event::Event::Started(_) => {}
        }
    }
    let summary = summary.expect("the stream ends with a summary");
    assert!(summary.success, "{}", summary.error);
    assert_eq!(summary.applied, rpc_applied);
    let cli = cli.await.expect("cli task");
    assert_eq!(cli.code(), 0, "{}", cli.stderr);
    let cli_applied = cli
        .stdout
        .lines()
        .filter(|l| l.trim_start().starts_with("applied "))
        .count();
    assert_eq!(
        rpc_applied.len() + cli_applied,
        embedded,
        "each migration applied exactly once"
    );

    let verify = client
        .verify(VerifyRequest {})
        .await
        .expect("verify")
        .into_inner();
    assert!(verify.ok, "{:?}", verify.problems);
    let status = client
        .get_status(GetStatusRequest {})
        .await
        .expect("status")
        .into_inner();
    assert_eq!(status.current_version, status.latest_version);
    assert_eq!(status.pending_sync_requests, 1);
    assert!(
        status
            .migrations
            .iter()
            .all(|m| m.state() == MigrationState::Applied)
    );

    // The way down: planned with what it would destroy, refused without allow_data_loss,
    // then streamed as ROLLED_BACK, and recorded.
    let incident = fleetsync_migrator::migration::CHARSET_COLLATION_VERSION;
    let pool = db.connect().await;
    fleetsync_tests::catalog::insert_servers(&pool, 3, 22, |i| format!("10.0.0.{i}")).await;
    fleetsync_tests::catalog::execute(&pool, "UPDATE servers SET zone = 'eu-1'").await;
    let plan = client
        .plan(PlanRequest {
            target_version: incident,
        })
        .await
        .expect("plan down")
        .into_inner();
    let above = status
        .migrations
        .iter()
        .filter(|m| m.version > incident)
        .count();
    assert_eq!(plan.migrations.len(), above);
    assert!(
        plan.migrations
            .iter()
            .all(|p| p.reverse && p.irreversible.is_empty())
    );
    assert!(
        plan.migrations
            .iter()
            .flat_map(|p| &p.losses)
            .any(|l| l.table == "servers" && l.column == "zone" && l.rows == 3),
        "{plan:?}"
    );
    let run = |allow_data_loss| {
        let mut client = client.clone();
        async move {
            let mut stream = client
                .migrate(MigrateRequest {
                    target_version: incident,
                    allow_data_loss,
                    ..MigrateRequest::default()
                })
                .await
                .expect("migrate down")
                .into_inner();
            let mut events = Vec::new();
            while let Some(event) = stream.next().await {
                events.push(event.expect("event").event.expect("event body"));
            }
            events
        }
    };
    let refused = run(false).await;
    let [migrate_event::Event::Summary(summary)] = refused.as_slice() else {
        panic!("{refused:?}");
    };
    assert!(
        !summary.success && summary.error.contains("would destroy data"),
        "{summary:?}"
    );
    let events = run(true).await;
    let rolled_back: Vec<i64> = events
        .iter()
        .filter_map(|e| match e {
            migrate_event::Event::Finished(f) => {
                assert_eq!(f.state(), MigrationState::RolledBack, "{f:?}");
                Some(f.version)
            }
            migrate_event::Event::Started(s) => {
                assert!(s.reverse, "{s:?}");
                None
            }
            migrate_event::Event::Summary(s) => {
                assert!(s.success, "{s:?}");
                None
            }
        })
        .collect();
    assert_eq!(rolled_back.len(), above);
    assert!(rolled_back.windows(2).all(|w| w[0] > w[1]), "newest first");
    let status = client
        .get_status(GetStatusRequest {})
        .await
        .expect("status")
        .into_inner();
    assert_eq!(status.current_version, incident);
    for m in status.migrations.iter().filter(|m| m.version > incident) {
        assert_eq!(m.state(), MigrationState::Pending);
        let r = m.last_rollback.as_ref().expect("recorded");
        assert!(r.done && r.to_version == incident, "{r:?}");
        assert_eq!(r.from_version, status.latest_version);
    }
    migrator.service.stop().await.expect("clean stop");
}

fn grpcurl(args: &[&str]) -> String {
    // `just test` points this at the grpcurl that `just setup` installs.
    let program = std::env::var("FLEETSYNC_GRPCURL").unwrap_or_else(|_| "grpcurl".into());
    let output = Command::new(&program)
        .args(args)
        .output()
        .unwrap_or_else(|err| panic!("cannot run {program} ({err}): run `just setup`"));
    assert!(
        output.status.success(),
        "grpcurl {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8(output.stdout).expect("utf-8")
}

#[tokio::test]
async fn grpcurl_lists_describes_and_checks_health_of_the_agent_binary() {
    let scenario = Scenario::on(Backend::Sqlite).agents(0).start().await;
    let agent = scenario.start_process(&scenario.agent_process());
    let addr = agent.addr.to_string();

    let list = grpcurl(&["-plaintext", &addr, "list"]);
    let services: Vec<&str> = list.lines().collect();
    for expected in [
        "fleetsync.sync.v1.Fleet",
        "fleetsync.sync.v1.SyncAgent",
        "grpc.health.v1.Health",
        "grpc.reflection.v1alpha.ServerReflection",
    ] {
        assert!(
            services.contains(&expected),
            "{expected} missing from {services:?}"
        );
    }
    assert!(
        !list.contains("Migrator"),
        "the agent must not advertise the migrator: {list}"
    );

    let health = grpcurl(&["-plaintext", &addr, "grpc.health.v1.Health/Check"]);
    assert!(health.contains("\"status\": \"SERVING\""), "{health}");

    // The proto comments reach users through describe.
    let describe = grpcurl(&[
        "-plaintext",
        &addr,
        "describe",
        "fleetsync.sync.v1.SyncAgent.StartSync",
    ]);
    assert!(describe.contains("Idempotent"), "{describe}");
    let message = grpcurl(&[
        "-plaintext",
        &addr,
        "describe",
        "fleetsync.sync.v1.ServerOutcome",
    ]);
    assert!(message.contains("UnreachableCause cause"), "{message}");
}

#[tokio::test]
async fn grpcurl_lists_the_migrator_binary() {
    let dir = tempfile::tempdir().expect("temp dir");
    let db = TestDb::mariadb().await;
    let migrator = ServeProcess::start("migrator", &["--database-url", db.url()], dir.path());
    let addr = migrator.addr.to_string();
    let list = grpcurl(&["-plaintext", &addr, "list"]);
    assert!(
        list.lines().any(|l| l == "fleetsync.migrator.v1.Migrator"),
        "{list}"
    );
    assert!(list.lines().any(|l| l == "grpc.health.v1.Health"), "{list}");
    assert!(!list.contains("fleetsync.sync"), "{list}");
    let health = grpcurl(&[
        "-plaintext",
        "-d",
        r#"{"service":"fleetsync.migrator.v1.Migrator"}"#,
        &addr,
        "grpc.health.v1.Health/Check",
    ]);
    assert!(health.contains("SERVING"), "{health}");
}

#[tokio::test]
async fn sigterm_turns_health_not_serving_then_exits_cleanly() {
    for binary in ["sync-agent", "migrator"] {
        let dir = tempfile::tempdir().expect("temp dir");
        let db = TestDb::sqlite().await;
        migrate(db.url()).await;
        let mut process = ServeProcess::start(
            binary,
            &["--database-url", db.url(), "--shutdown-grace", "1s"],
            dir.path(),
        );
        let channel = fleetsync_tests::services::connect(process.addr).await;
        let mut health_client = tonic_health::pb::health_client::HealthClient::new(channel);
        let mut watch = health_client
            .watch(HealthCheckRequest {
                service: String::new(),
            })
            .await
            .expect("watch")
            .into_inner();
        let first = watch.next().await.expect("first status").expect("ok");
        assert_eq!(first.status(), ServingStatus::Serving);

        let status = process.terminate(Duration::from_secs(10));
        assert!(
            status.success(),
            "{binary} exited with {status} after SIGTERM"
        );
        // NOT_SERVING reached the watcher before the server went away.
        let mut saw_not_serving = false;
        while let Some(Ok(update)) = watch.next().await {
            saw_not_serving |= update.status() == ServingStatus::NotServing;
        }
        assert!(saw_not_serving, "{binary}: no NOT_SERVING before exit");
        let log = process.log();
        assert!(log.contains("shutting down"), "{log}");
        // The open watch is closed after the grace period rather than holding the exit forever.
        assert!(log.contains("after the shutdown grace period"), "{log}");
    }
}

#[tokio::test]
async fn sigterm_drains_for_the_drain_delay_before_refusing_calls() {
    for binary in ["sync-agent", "migrator"] {
        let dir = tempfile::tempdir().expect("temp dir");
        let db = TestDb::sqlite().await;
        migrate(db.url()).await;
        let mut process = ServeProcess::start(
            binary,
            &[
                "--database-url",
                db.url(),
                "--drain-delay",
                "2s",
                "--shutdown-grace",
                "1s",
            ],
            dir.path(),
        );
        let sent = Command::new("kill")
            .args(["-TERM", &process.pid().to_string()])
            .status()
            .expect("kill");
        assert!(sent.success());
        let signalled = std::time::Instant::now();
        // During the delay: NOT_SERVING, and new connections and calls are still served, so a
        // load balancer has time to notice before anything is refused.
        tokio::time::sleep(Duration::from_millis(300)).await;
        let mut health = tonic_health::pb::health_client::HealthClient::new(
            fleetsync_tests::services::connect(process.addr).await,
        );
        let status = health
            .check(HealthCheckRequest {
                service: String::new(),
            })
            .await
            .expect("still answering during the drain")
            .into_inner();
        assert_eq!(status.status(), ServingStatus::NotServing, "{binary}");
        assert!(
            signalled.elapsed() < Duration::from_secs(2),
            "{binary}: the check came after the delay"
        );
        let status = process.terminate_wait().expect("exits after the drain");
        assert!(status.success(), "{binary} exited with {status}");
        assert!(
            signalled.elapsed() >= Duration::from_secs(2),
            "{binary} exited before its drain delay: {:?}",
            signalled.elapsed()
        );
        assert!(
            process
                .log()
                .contains("still serving while load balancers notice")
        );
    }
}

/// Where a host's fake `sudo` leaves a file as it starts.
fn started(host: &fleetsync_tests::SshHost) -> std::path::PathBuf {
    host.program_dir().join("started")
}

/// Gives `host` a `sudo` that leaves its `started` file, then runs `then`.
fn sudo_marking_its_start(host: &fleetsync_tests::SshHost, then: &str) {
    host.install_program(
        "sudo",
        &format!("#!/bin/sh\ntouch '{}'\n{then}\n", started(host).display()),
    );
}

/// Two hosts, each with its `sudo` as `prepare` makes it, registered with an agent of
/// `concurrency` slots, and a job syncing both.
async fn two_hosts_syncing(
    concurrency: usize,
    prepare: impl Fn(usize, &fleetsync_tests::SshHost),
) -> (Scenario, String) {
    use fleetsync_common::proto::sync::v1::DatabaseService;
    let scenario = Scenario::on(Backend::Sqlite)
        .hosts(2)
        .output_cap(1 << 20)
        .runner(|r| r.concurrency = concurrency)
        .register("db-", DatabaseService::Mariadb)
        .start()
        .await;
    for (i, host) in scenario.fleet.hosts().iter().enumerate() {
        prepare(i, host);
    }
    let job = scenario.agent().start_sync(&scenario.ids).await;
    (scenario, job)
}

/// After the first agent stopped: `done` was recorded `OK`, `left` still waits with no lease
/// held, and the next agent takes it at once and ends the job.
async fn left_for_the_next_agent(mut scenario: Scenario, job: &str, done: i64, left: i64) {
    use fleetsync_common::proto::sync::v1::Outcome;
    use fleetsync_tests::{
        catalog::count,
        events::{outcomes, watch},
    };

    let conn = scenario.db.connect().await;
    let rows = |condition: &str| {
        format!("SELECT COUNT(*) FROM sync_job_servers WHERE job_id = '{job}' AND {condition}")
    };
    assert_eq!(
        count(
            &conn,
            &rows(&format!("server_id = {done} AND outcome = 'OK'"))
        )
        .await,
        1,
        "the run in a slot was recorded"
    );
    assert_eq!(
        count(
            &conn,
            &rows(&format!("server_id = {left} AND outcome IS NULL"))
        )
        .await,
        1,
        "the other server still waits"
    );
    assert_eq!(
        count(
            &conn,
            "SELECT COUNT(*) FROM server_leases WHERE holder IS NOT NULL"
        )
        .await,
        0,
        "every lease was released"
    );
    for host in scenario.fleet.hosts() {
        host.remove_program("sudo");
    }
    let mut sync = scenario.add_agent().await.sync();
    let events = tokio::time::timeout(Duration::from_secs(15), watch(&mut sync, job, 0))
        .await
        .expect("the next agent finishes the job");
    let outcomes = outcomes(&events);
    assert_eq!(
        (outcomes[&done].outcome(), outcomes[&left].outcome()),
        (Outcome::Ok, Outcome::Ok)
    );
    scenario.stop().await;
}

/// A rolling restart in the middle of a sync: the agent claims nothing more, the run that
/// finishes within the shutdown grace (1 s here) is recorded as usual, and the one that would
/// take longer is stopped, its lease released and its server left waiting for the next agent,
/// which finishes the job.
#[tokio::test]
async fn stopping_lets_runs_in_flight_finish_within_the_grace() {
    let (mut scenario, job) = two_hosts_syncing(4, |i, host| {
        let then = ["sleep 0.5\nexec /usr/bin/sudo \"$@\"", "exec sleep 30"][i];
        sudo_marking_its_start(host, then);
    })
    .await;
    let (quick, stuck) = (scenario.fleet.host(0), scenario.fleet.host(1));
    fleetsync_tests::wait_until(
        "the commands never started",
        Duration::from_secs(10),
        || started(quick).exists() && started(stuck).exists(),
    )
    .await;

    let stopping = std::time::Instant::now();
    scenario.stop_agent(0).await;
    let took = stopping.elapsed();
    assert!(
        took >= Duration::from_millis(900) && took < Duration::from_secs(5),
        "stopped after {took:?}: the stuck run should hold the stop for the 1 s grace, no longer"
    );
    let ids = scenario.ids.clone();
    left_for_the_next_agent(scenario, &job, ids[0], ids[1]).await;
}

/// Only runs past the key exchange spend the grace: one still dialing or waiting for a slot
/// (one slot here, taken) hands its server over at once and never runs its command.
#[tokio::test]
async fn stopping_hands_over_at_once_the_runs_waiting_for_a_slot() {
    let (mut scenario, job) = two_hosts_syncing(1, |_, host| {
        sudo_marking_its_start(host, "sleep 0.5\nexec /usr/bin/sudo \"$@\"");
    })
    .await;
    let marks: Vec<_> = scenario.fleet.hosts().iter().map(started).collect();
    let running = |i: usize| marks[i].exists();
    fleetsync_tests::wait_until("no command started", Duration::from_secs(10), || {
        running(0) || running(1)
    })
    .await;
    scenario.stop_agent(0).await;
    let first = usize::from(!running(0));
    assert!(
        !running(1 - first),
        "the run waiting for the slot ran its command"
    );
    let ids = scenario.ids.clone();
    left_for_the_next_agent(scenario, &job, ids[first], ids[1 - first]).await;
}

#[tokio::test]
async fn a_database_that_is_down_is_a_clear_startup_error() {
    let dir = tempfile::tempdir().expect("temp dir");
    // Port 1 on loopback: nothing listens, connection refused at once. The agent waits for
    // its database (here at most a second: `--database-wait`), the migrator does not.
    for (binary, url, wait) in [
        (
            "sync-agent",
            "postgres://postgres:hunter2@127.0.0.1:1/nope",
            &["--database-wait", "1s"][..],
        ),
        ("migrator", "mysql://root:hunter2@127.0.0.1:1/nope", &[]),
    ] {
        let output = serve_command(binary, dir.path())
            .args(["--listen", "127.0.0.1:0", "--database-url", url])
            .args(wait)
            .output()
            .expect("run");
        assert!(!output.status.success(), "{binary} must fail");
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(stderr.contains("cannot connect to"), "{stderr}");
        assert!(stderr.contains("127.0.0.1:1"), "{stderr}");
        assert!(!stderr.contains("hunter2"), "password leaked: {stderr}");
    }
    let output = serve_command("sync-agent", dir.path())
        .args(["--listen", "127.0.0.1:0", "--database-url", "redis://x"])
        .output()
        .expect("run");
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("unsupported scheme `redis`"), "{stderr}");
}

#[test]
fn an_agent_without_a_usable_key_refuses_to_start() {
    let dir = tempfile::tempdir().expect("temp dir");
    let bogus = dir.path().join("not-a-key");
    std::fs::write(&bogus, "not a key\n").expect("write");
    let bogus = bogus.to_str().expect("utf-8").to_owned();
    // No key at all; a file that is no key (named in the error).
    for (keys, says) in [
        (vec![], "no --ssh-key given"),
        (vec!["--ssh-key", bogus.as_str()], "not-a-key"),
    ] {
        let output = Command::new(bin_path("sync-agent"))
            .args(["serve", "--listen", "127.0.0.1:0"])
            .args(["--database-url", "sqlite:///nonexistent/never-opened.db"])
            .args(&keys)
            .env_remove("FLEETSYNC_SSH_KEYS")
            .output()
            .expect("run");
        assert!(!output.status.success(), "{keys:?}");
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(stderr.contains(says), "{keys:?}: {stderr}");
    }
}

#[tokio::test]
async fn the_agent_refuses_a_schema_older_than_it_needs() {
    let dir = tempfile::tempdir().expect("temp dir");
    let db = TestDb::sqlite().await;
    let run = fleetsync_tests::migrator::migrator(
        db.url(),
        &["migrate", "--no-dispatch", "--target", "20250215120213"],
    )
    .await;
    assert_eq!(run.code(), 0, "{}", run.stderr);
    let output = serve_command("sync-agent", dir.path())
        .args(["--listen", "127.0.0.1:0", "--database-url", db.url()])
        .output()
        .expect("run");
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("schema is at version 20250215120213"),
        "{stderr}"
    );
    assert!(stderr.contains("run `migrator migrate"), "{stderr}");
}

#[test]
fn help_documents_every_flag_with_its_environment_variable() {
    // A password in the environment never shows in --help.
    let output = Command::new(bin_path("sync-agent"))
        .args(["serve", "--help"])
        .env("DATABASE_URL", "postgres://app:s3cret-pw@db/cp")
        .output()
        .expect("run");
    let help = String::from_utf8_lossy(&output.stdout);
    for flag in [
        "--listen",
        "--database-url",
        "--ssh-key",
        "--connect-timeout",
        "--command-timeout",
        "--output-cap",
        "--db-pool-size",
        "--retention",
        "[env: DATABASE_URL]",
        "[env: FLEETSYNC_SSH_KEYS=",
    ] {
        assert!(help.contains(flag), "{flag} missing from:\n{help}");
    }
    assert!(!help.contains("s3cret-pw"), "{help}");
    let output = Command::new(bin_path("migrator"))
        .args(["serve", "--help"])
        .output()
        .expect("run");
    let help = String::from_utf8_lossy(&output.stdout);
    assert!(help.contains("[default: 127.0.0.1:50052]"), "{help}");
}

#[test]
fn intervals_that_would_busy_loop_are_refused_at_start() {
    let dir = tempfile::tempdir().expect("temp dir");
    for (flag, value, says) in [
        (
            "--lease-ttl",
            "0s",
            "--lease-ttl 0s is too short: at least 1s",
        ),
        (
            "--poll-interval",
            "0s",
            "--poll-interval 0s is too short: at least 10ms",
        ),
        (
            "--probe-interval",
            "1ms",
            "--probe-interval 1ms is too short",
        ),
    ] {
        let output = serve_command("sync-agent", dir.path())
            .args([
                "--listen",
                "127.0.0.1:0",
                "--database-url",
                "sqlite://unused.db",
            ])
            .args([flag, value])
            .output()
            .expect("run");
        assert!(!output.status.success(), "{flag} {value} was accepted");
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(stderr.contains(says), "{flag} {value}: {stderr}");
    }
}

/// On SQLite the agent copies the write-ahead log into the database file itself, every 100 ms
/// from a connection of its own (`Db::checkpoint`): a job's runs reach the file while the agent
/// runs, long before the log holds the 4,096 pages past which a writer would copy it inside its
/// own commit. Read here from the file alone, as SQLite opens an immutable database (the log
/// ignored).
#[tokio::test]
async fn the_agent_checkpoints_sqlite_beside_its_writers() {
    use fleetsync_tests::catalog::{add_mariadb_everywhere, count, execute, insert_servers};
    use sqlx::{ConnectOptions, Connection, sqlite::SqliteConnectOptions};
    use std::str::FromStr;

    let mut scenario = Scenario::on(Backend::Sqlite).agents(0).start().await;
    let conn = scenario.db.connect().await;
    // Refused loopback addresses: each run ends at once, and is one row of `sync_runs`.
    insert_servers(&conn, 200, 1, |_| "127.0.0.1".into()).await;
    add_mariadb_everywhere(&conn, "").await;
    execute(&conn, "UPDATE sync_requests SET state = 'taken'").await;
    let mut sync = scenario.add_agent().await.sync();
    let job = sync
        .start_sync(StartSyncRequest {
            all_servers: true,
            request_id: "checkpointed".into(),
            ..Default::default()
        })
        .await
        .expect("start sync")
        .into_inner()
        .job_id;
    fleetsync_tests::services::watch_to_end(&mut sync, &job).await;
    assert_eq!(count(&conn, "SELECT COUNT(*) FROM sync_runs").await, 200);

    let file_alone = SqliteConnectOptions::from_str(scenario.db.url())
        .expect("url")
        .read_only(true)
        .immutable(true);
    let in_file = fleetsync_tests::poll_until(
        "the runs never reached the database file (no checkpoint)",
        Duration::from_secs(5),
        || async {
            let mut file = file_alone.connect().await.expect("open the file alone");
            let runs: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM sync_runs")
                .fetch_one(&mut file)
                .await
                .expect("count");
            file.close().await.ok();
            if runs == 200 {
                Ok(runs)
            } else {
                Err(format!("{runs} of 200 runs in the file"))
            }
        },
    )
    .await;
    assert_eq!(in_file, 200);
    conn.close().await;
}
