//! The incident end to end: `migrate` with half the fleet offline and the agent down; the
//! request waits in the outbox and is served once; a later `migrate` hands it to the running
//! agent.

use std::{
    collections::BTreeMap,
    time::{Duration, Instant},
};

use fleetsync_common::{
    Backend,
    proto::sync::v1::{self as pb, Outcome},
};
use fleetsync_tests::{
    Scenario,
    catalog::{count, execute, wait_for_count},
    events::{outcomes, summary, watch},
    fleet::SSH_USER,
    migrator::migrator,
};

/// The incident with the agent: servers registered before the charset/collation migration,
/// half of them offline, the agent down while `migrate` runs. The request waits in the outbox,
/// and the agent serves it once when it starts: one outcome per server, charset and collation
/// filled in on the online ones. A later `migrate` hands the same request to the running agent
/// and gets the same job back.
async fn migration_with_half_the_fleet_offline(backend: Backend) {
    let mut scenario = Scenario::on(backend).hosts(4).unmigrated().start().await;
    let run = migrator(
        scenario.db.url(),
        &["migrate", "--no-dispatch", "--target", "20240101000004"],
    )
    .await;
    assert_eq!(run.code(), 0, "{}", run.stderr);
    let conn = scenario.db.connect().await;
    for (i, host) in scenario.fleet.hosts().iter().enumerate() {
        execute(
            &conn,
            &format!(
                "INSERT INTO servers (name, ip, port, ssh_user, status, created_at, updated_at) \
                 VALUES ('vito-{i}', '{}', {}, '{SSH_USER}', 'ready', 0, 0)",
                host.addr(),
                host.port()
            ),
        )
        .await;
        execute(
            &conn,
            &format!(
                "INSERT INTO services (server_id, type, name, version, status, created_at, updated_at) \
                 SELECT id, 'database', 'mariadb', '10.11', 'ready', 0, 0 FROM servers WHERE name = 'vito-{i}'"
            ),
        )
        .await;
    }
    let (databases, collation) = if backend == Backend::MySql {
        ("`databases`", "`collation`")
    } else {
        ("databases", "\"collation\"")
    };
    execute(
        &conn,
        &format!(
            "INSERT INTO {databases} (server_id, name, status, created_at, updated_at) \
             SELECT id, 'test', 'ready', 0, 0 FROM servers"
        ),
    )
    .await;
    scenario.fleet.host(2).stop();
    scenario.fleet.host(3).stop();

    // The agent is not running: migrate exits 0 at once, the request waits.
    let started = Instant::now();
    let run = migrator(
        scenario.db.url(),
        &["migrate", "--agent-url", "http://127.0.0.1:1"],
    )
    .await;
    assert_eq!(run.code(), 0, "{}{}", run.stdout, run.stderr);
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "{:?}",
        started.elapsed()
    );
    assert!(run.stderr.contains("stays pending"), "{}", run.stderr);

    scenario.add_agent().await;
    let (_fleet, db, agent) = (&scenario.fleet, &scenario.db, scenario.agent());
    let mut sync_api = agent.sync();
    // The agent drains the outbox as it starts: find the job of the migration's request.
    let job_id = fleetsync_tests::poll_until(
        "the agent never took the request",
        Duration::from_secs(10),
        || async {
            let taken = conn
                .fetch_optional(
                    "SELECT job_id FROM sync_requests WHERE state = 'taken'",
                    &[],
                )
                .await
                .expect("outbox");
            match taken {
                Some(row) => Ok(row.text(0).expect("job id")),
                None => Err("no request taken".into()),
            }
        },
    )
    .await;
    let events = watch(&mut sync_api, &job_id, 0).await;
    let got = outcomes(&events);
    assert_eq!(got.len(), 4, "one outcome per server");
    let by_name: BTreeMap<&str, Outcome> = got
        .values()
        .map(|o| (o.server_name.as_str(), o.outcome()))
        .collect();
    assert_eq!(by_name["vito-0"], Outcome::Ok);
    assert_eq!(by_name["vito-1"], Outcome::Ok);
    assert_eq!(by_name["vito-2"], Outcome::Unreachable);
    assert_eq!(by_name["vito-3"], Outcome::Unreachable);
    let s = summary(&events);
    assert_eq!(s.origin(), pb::JobOrigin::Migration);
    assert_eq!(s.request_id, "migration-20250215120213");
    let filled = count(
        &conn,
        &format!(
            "SELECT COUNT(*) FROM {databases} WHERE name = 'test' AND charset IS NOT NULL \
             AND {collation} IS NOT NULL"
        ),
    )
    .await;
    assert_eq!(filled, 2, "the online servers have charset and collation");

    // Handed over again by a later migrate: the same job, not a second one.
    let run = migrator(
        db.url(),
        &[
            "migrate",
            "--agent-url",
            &format!("http://{}", agent.service.addr),
        ],
    )
    .await;
    assert_eq!(run.code(), 0, "{}", run.stderr);
    assert_eq!(
        count(
            &conn,
            "SELECT COUNT(*) FROM sync_jobs WHERE origin = 'migration'"
        )
        .await,
        1
    );
    assert_eq!(
        count(
            &conn,
            "SELECT COUNT(*) FROM sync_requests WHERE state = 'taken'"
        )
        .await,
        1
    );
    // A later drain of the outbox (seen by a marker request it takes) makes no second job.
    execute(
        &conn,
        "INSERT INTO sync_requests (id, origin, migration_version, scopes, reason, state, \
         created_at) VALUES ('marker', 'migration', 0, 'charsets', 'marker', 'pending', 0)",
    )
    .await;
    wait_for_count(
        &conn,
        "SELECT COUNT(*) FROM sync_requests WHERE id = 'marker' AND state = 'taken'",
        |n| n == 1,
        Duration::from_secs(10),
        "the outbox was never drained again",
    )
    .await;
    assert_eq!(
        count(
            &conn,
            "SELECT COUNT(*) FROM sync_jobs WHERE request_id = 'migration-20250215120213'"
        )
        .await,
        1,
        "exactly once"
    );
    scenario.stop().await;
}

fleetsync_tests::per_backend!(migration_with_half_the_fleet_offline => migration_with_half_the_fleet_offline);

#[tokio::test]
async fn migrate_hands_its_request_to_a_running_agent() {
    // A database migrated but for the incident migration cannot run an agent; so the agent
    // runs on a fully migrated database whose request is still pending, as after a dispatch
    // that failed, and `migrate` (a no-op) hands the request over.
    let mut scenario = Scenario::on(Backend::Sqlite)
        .unmigrated()
        .output_cap(1024)
        .runner(|r| r.outbox_interval = Duration::from_secs(3600))
        .start()
        .await;
    let run = migrator(scenario.db.url(), &["migrate", "--no-dispatch"]).await;
    assert_eq!(run.code(), 0);
    let conn = scenario.db.connect().await;
    // Pretend the agent already drained once: only the dispatch can deliver the request now.
    scenario.add_agent().await;
    let (db, agent) = (&scenario.db, scenario.agent());
    wait_for_count(
        &conn,
        "SELECT COUNT(*) FROM sync_requests WHERE state = 'taken'",
        |n| n > 0,
        Duration::from_secs(5),
        "the start-up drain took nothing",
    )
    .await;
    execute(&conn, "UPDATE sync_requests SET state = 'pending'").await;
    let run = migrator(
        db.url(),
        &[
            "migrate",
            "--agent-url",
            &format!("http://{}", agent.service.addr),
        ],
    )
    .await;
    assert_eq!(run.code(), 0, "{}", run.stderr);
    assert!(
        run.stdout.contains("handed to the sync-agent: job"),
        "{}{}",
        run.stdout,
        run.stderr
    );
    assert_eq!(
        count(
            &conn,
            "SELECT COUNT(*) FROM sync_jobs WHERE origin = 'migration'"
        )
        .await,
        1
    );
    assert_eq!(
        count(
            &conn,
            "SELECT COUNT(*) FROM sync_requests WHERE state = 'taken'"
        )
        .await,
        1
    );
    scenario.stop().await;
}
