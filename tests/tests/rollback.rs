//! The way down on all three backends: a SIGKILL at every statement of every reverse converges
//! on a re-run; up, down and up again gives a fresh install's catalog with the operators' data
//! still there; data a reverse would destroy is refused and shown; sync requests are withdrawn
//! with their migration; irreversible migrations, serving agents and concurrent migrators.

use std::time::Duration;

use fleetsync_common::{
    Backend,
    proto::sync::v1::{
        DatabaseService, StartSyncRequest, fleet_client::FleetClient,
        sync_agent_client::SyncAgentClient,
    },
};
use fleetsync_migrator::{
    engine::{Engine, EngineError, Options},
    migration::{AGENT_SCHEMA_RANGES_VERSION, CHARSET_COLLATION_VERSION, Migration, MigrationSet},
};
use fleetsync_tests::{
    Scenario, TestDb,
    catalog::{
        add_mariadb_everywhere, count, dump, execute, insert_servers, strings, wait_for_count,
    },
    migrator::{Run, at_each_point, concurrently, migrator, migrator_crash},
    services::{connect, register_fleet},
};
use serde_json::Value;
use tonic_health::pb::health_check_response::ServingStatus;

/// The first migration (`servers`): the lowest target that keeps a table.
const FIRST: i64 = 20240101000001;

fn ok(run: &Run, what: &str) {
    assert_eq!(run.code(), 0, "{what}: {}{}", run.stdout, run.stderr);
}

fn json(run: &Run) -> Value {
    serde_json::from_str(&run.stdout).unwrap_or_else(|err| panic!("{err}: {}", run.stdout))
}

/// `databases` is a reserved word in MySQL.
fn databases(backend: Backend) -> &'static str {
    if backend == Backend::MySql {
        "`databases`"
    } else {
        "databases"
    }
}

/// Kills `migrate --target 0` (SIGKILL) at every point of the way down from the latest
/// version in turn; after each, the same command without the crash completes and the catalog
/// equals that of a database never migrated, with every roll-back recorded once.
async fn crash_anywhere_on_the_way_down(backend: Backend) {
    let down = [
        "migrate",
        "--no-dispatch",
        "--target",
        "0",
        "--allow-data-loss",
    ];
    let never = TestDb::create(backend).await;
    ok(
        &migrator(never.url(), &down).await,
        "migrate --target 0 on nothing",
    );
    let expected = dump(&never.connect().await).await;
    assert!(
        !expected.iter().any(|l| l.starts_with("history ")),
        "{expected:?}"
    );

    let engine = Engine::new(never.connect().await, Options::default());
    let points = engine.rollback_crash_points();
    let statements: usize = engine
        .migrations()
        .iter()
        .map(|m| m.reverse.statements().len())
        .sum();
    let journaled = backend == Backend::MySql;
    assert_eq!(
        points.len(),
        statements * if journaled { 2 } else { 1 } + engine.migrations().len()
    );

    let checked = at_each_point(points, |point| {
        let expected = expected.clone();
        async move {
            let db = TestDb::create(backend).await;
            ok(
                &migrator(db.url(), &["migrate", "--no-dispatch"]).await,
                "up",
            );
            let mut args = down.to_vec();
            args.extend(["--crash-at", &point]);
            let crashed = migrator_crash(db.url(), &args).await;
            assert!(
                crashed.killed(),
                "{point}: not killed: {} {}",
                crashed.stdout,
                crashed.stderr
            );
            // An interrupted way down (journaled: the roll-back's row is open) is a problem
            // until a re-run finishes it; elsewhere the crash left a consistent history.
            let interrupted = journaled && !point.ends_with(":commit");
            let verify = migrator(db.url(), &["verify"]).await;
            assert_eq!(
                verify.code(),
                if interrupted { 3 } else { 0 },
                "{point}: {}",
                verify.stdout
            );
            if interrupted {
                assert!(
                    verify.stdout.contains("partly rolled back"),
                    "{}",
                    verify.stdout
                );
                let status = migrator(db.url(), &["status"]).await;
                assert!(
                    status.stdout.contains("INTERRUPTED after"),
                    "{point}: {}",
                    status.stdout
                );
            }
            let retry = migrator(db.url(), &down).await;
            ok(&retry, &format!("{point}: the re-run"));
            let got = dump(&db.connect().await).await;
            assert_eq!(
                got, expected,
                "{point}: the catalog differs from no migration"
            );
            let status = json(&migrator(db.url(), &["status", "-o", "json"]).await);
            let rollbacks = status["rollbacks"].as_array().expect("rollbacks");
            let mut versions: Vec<i64> = rollbacks
                .iter()
                .map(|r| {
                    assert_eq!(r["state"], "reverted", "{point}: {r}");
                    r["version"].as_i64().expect("version")
                })
                .collect();
            versions.sort();
            let all: Vec<i64> = MigrationSet::embedded(backend)
                .iter()
                .map(|m| m.version)
                .collect();
            assert_eq!(versions, all, "{point}: each migration rolled back once");
        }
    })
    .await;
    assert!(checked >= 50, "only {checked} crash points");
}

fleetsync_tests::per_backend!(crash_at_every_point_of_the_way_down => crash_anywhere_on_the_way_down);

/// The demo's kind of data (servers, a database service, databases and users) at the latest
/// version; refused and planned ways down; down to the incident's version and to the first,
/// with the data each keeps still readable; up again: a fresh install's catalog.
async fn up_down_up(backend: Backend) {
    let fresh = TestDb::create(backend).await;
    ok(
        &migrator(fresh.url(), &["migrate", "--no-dispatch"]).await,
        "fresh",
    );
    let fresh_catalog = dump(&fresh.connect().await).await;

    let test_db = TestDb::create(backend).await;
    let url = test_db.url();
    ok(&migrator(url, &["migrate", "--no-dispatch"]).await, "up");
    let db = test_db.connect().await;
    insert_servers(&db, 50, 22, |i| format!("10.0.0.{i}")).await;
    // Values other than a column's default are data; the default is not (applying the
    // migration again gives it back).
    execute(&db, "UPDATE servers SET zone = 'eu-1'").await;
    add_mariadb_everywhere(&db, "10.11.6").await;
    let dbs = databases(backend);
    execute(
        &db,
        &format!(
            "INSERT INTO {dbs} (server_id, name, status, charset, {}, created_at, updated_at) \
             SELECT id, 'app', 'ready', 'utf8mb4', 'utf8mb4_bin', 0, 0 FROM servers",
            if backend == Backend::MySql {
                "`collation`"
            } else {
                "\"collation\""
            }
        ),
    )
    .await;
    execute(
        &db,
        "INSERT INTO database_users (server_id, username, host, databases, status, created_at, \
         updated_at) SELECT id, 'app', 'localhost', '[\"app\"]', 'ready', 0, 0 FROM servers"
            .replace(" databases,", &format!(" {},", dbs))
            .as_str(),
    )
    .await;
    let servers_sql = "SELECT CONCAT(name, ' ', ip) FROM servers ORDER BY id";
    let servers = strings(&db, servers_sql).await;
    assert_eq!(servers.len(), 50);
    let before = dump(&db).await;

    // Below the incident's version the charset columns go with their values: refused, with
    // what would be lost, and nothing written.
    let below_incident = "20240101000004";
    let refused = migrator(
        url,
        &["migrate", "--no-dispatch", "--target", below_incident],
    )
    .await;
    assert_eq!(refused.code(), 5, "{}{}", refused.stdout, refused.stderr);
    assert!(
        refused.stderr.contains("would destroy data")
            && refused
                .stderr
                .contains("column databases.charset (50 values)")
            && refused.stderr.contains("nothing was written"),
        "{}",
        refused.stderr
    );
    assert_eq!(
        dump(&db).await,
        before,
        "a refused way down wrote something"
    );

    // The plan of the way down to the first version: every reverse, newest first, each with
    // what it destroys.
    let plan = json(&migrator(url, &["plan", "--target", &FIRST.to_string(), "-o", "json"]).await);
    let planned = plan["migrations"].as_array().expect("migrations");
    let set = MigrationSet::embedded(backend);
    assert_eq!(planned.len(), set.len() - 1);
    let mut previous = i64::MAX;
    for p in planned {
        assert_eq!(p["direction"], "down", "{p}");
        let version = p["version"].as_i64().expect("version");
        assert!(version < previous && version > FIRST, "{p}");
        previous = version;
        assert_eq!(
            p["statements"].as_array().map(Vec::len),
            Some(set.get(version).expect("known").reverse.statements().len())
        );
    }
    let losses = |version: i64| -> Vec<String> {
        planned
            .iter()
            .find(|p| p["version"] == version)
            .expect("planned")["losses"]
            .as_array()
            .expect("losses")
            .iter()
            .map(|l| format!("{} {} {}", l["table"], l["column"], l["rows"]))
            .collect()
    };
    assert_eq!(
        losses(CHARSET_COLLATION_VERSION),
        [
            "\"databases\" \"collation\" 50",
            "\"databases\" \"charset\" 50"
        ]
    );
    assert_eq!(losses(20240101000002), ["\"services\" null 50"]);
    assert_eq!(losses(20240101000003), ["\"databases\" null 50"]);
    assert_eq!(losses(20240101000004), ["\"database_users\" null 50"]);
    // The zones set; the reachability every server has by default is no loss.
    assert!(
        !losses(20250301000001)
            .iter()
            .any(|l| l.contains("reachability")),
        "{:?}",
        losses(20250301000001)
    );
    assert!(
        losses(20261208000001).contains(&"\"servers\" \"zone\" 50".to_string()),
        "{:?}",
        losses(20261208000001)
    );
    // Nothing is stored in the registry, runs or jobs: nothing lost there.
    assert!(losses(AGENT_SCHEMA_RANGES_VERSION).is_empty());
    assert!(losses(20250301000002).is_empty());
    let human = migrator(url, &["plan", "--target", &FIRST.to_string()]).await;
    ok(&human, "plan");
    assert!(
        human
            .stdout
            .contains("-- roll back 20240101000002 create_services")
            && human
                .stdout
                .contains("DESTROYS (migrate needs --allow-data-loss)")
            && human.stdout.contains("table services (50 rows)")
            && human.stdout.contains("DROP TABLE services;"),
        "{}",
        human.stdout
    );

    // Down to the incident's version: the databases and their charsets stay.
    let incident = CHARSET_COLLATION_VERSION.to_string();
    let run = migrator(
        url,
        &[
            "migrate",
            "--no-dispatch",
            "--target",
            &incident,
            "--allow-data-loss",
        ],
    )
    .await;
    ok(&run, "down to the incident's version");
    assert!(
        run.stdout.contains(&format!(
            "rolled back, 0 applied, the database is at version {incident}"
        )),
        "{}",
        run.stdout
    );
    assert_eq!(
        strings(
            &db,
            &format!("SELECT CONCAT(name, ' ', charset) FROM {dbs} ORDER BY id")
        )
        .await
        .len(),
        50
    );
    assert_eq!(
        count(
            &db,
            &format!("SELECT COUNT(*) FROM {dbs} WHERE charset = 'utf8mb4'")
        )
        .await,
        50
    );

    // Down to the first version: the servers stay.
    let run = migrator(
        url,
        &[
            "migrate",
            "--no-dispatch",
            "--target",
            &FIRST.to_string(),
            "--allow-data-loss",
            "-o",
            "json",
        ],
    )
    .await;
    ok(&run, "down to the first version");
    let report = json(&run);
    assert_eq!(report["current_version"], FIRST);
    assert_eq!(report["rolled_back"].as_array().map(Vec::len), Some(4));
    assert_eq!(strings(&db, servers_sql).await, servers);
    let status = json(&migrator(url, &["status", "-o", "json"]).await);
    assert_eq!(status["current_version"], FIRST);
    let rollbacks = status["rollbacks"].as_array().expect("rollbacks");
    assert_eq!(rollbacks.len(), set.len() - 1);
    let latest = set.latest();
    for r in rollbacks {
        assert_eq!(r["state"], "reverted", "{r}");
        assert!(
            r["rolled_back_by"]
                .as_str()
                .is_some_and(|b| b.contains('@')),
            "{r}"
        );
        assert!(r["finished_at"].as_i64() >= r["started_at"].as_i64(), "{r}");
        let version = r["version"].as_i64().expect("version");
        if version > CHARSET_COLLATION_VERSION {
            assert_eq!(r["from_version"], latest, "{r}");
            assert_eq!(r["to_version"], CHARSET_COLLATION_VERSION, "{r}");
        } else {
            assert_eq!(r["from_version"], CHARSET_COLLATION_VERSION, "{r}");
            assert_eq!(r["to_version"], FIRST, "{r}");
        }
    }
    // The incident migration's sync request was still pending: withdrawn with it.
    let charset = rollbacks
        .iter()
        .find(|r| r["version"] == CHARSET_COLLATION_VERSION)
        .expect("rolled back");
    assert_eq!(
        charset["withdrawn_request"],
        format!("migration-{CHARSET_COLLATION_VERSION}")
    );
    assert_eq!(count(&db, "SELECT COUNT(*) FROM sync_requests").await, 0);
    let verify = migrator(url, &["verify"]).await;
    ok(&verify, "verify after the way down");

    // Up again: a fresh install's catalog (the history, the outbox and every table), the
    // servers as they were.
    ok(
        &migrator(url, &["migrate", "--no-dispatch"]).await,
        "up again",
    );
    assert_eq!(strings(&db, servers_sql).await, servers);
    execute(&db, "DELETE FROM servers").await;
    assert_eq!(dump(&db).await, fresh_catalog);
}

fleetsync_tests::per_backend!(up_down_and_up_again_is_a_fresh_install => up_down_up);

/// A request an agent took stays (it is history); the migration applied again records a new
/// one, which the agent does not take for the old job.
#[tokio::test]
async fn a_request_taken_before_the_roll_back_stays_and_the_next_application_asks_again() {
    let test_db = TestDb::create(Backend::Sqlite).await;
    let url = test_db.url();
    let db = test_db.connect().await;
    let incident = CHARSET_COLLATION_VERSION.to_string();
    let below = "20240101000004";
    ok(
        &migrator(url, &["migrate", "--no-dispatch", "--target", &incident]).await,
        "up",
    );
    execute(
        &db,
        "UPDATE sync_requests SET state = 'taken', job_id = 'job-1'",
    )
    .await;
    let run = migrator(
        url,
        &["migrate", "--no-dispatch", "--target", below, "-o", "json"],
    )
    .await;
    ok(&run, "down");
    assert_eq!(json(&run)["withdrawn"], serde_json::json!([]));
    ok(
        &migrator(url, &["migrate", "--no-dispatch", "--target", &incident]).await,
        "up again",
    );
    let requests = strings(
        &db,
        "SELECT id || ' ' || state FROM sync_requests ORDER BY id",
    )
    .await;
    assert_eq!(
        requests,
        [
            format!("migration-{incident} taken"),
            format!("migration-{incident}-2 pending")
        ]
    );
    // Down again: the pending one is withdrawn, the taken one stays.
    let run = migrator(
        url,
        &["migrate", "--no-dispatch", "--target", below, "-o", "json"],
    )
    .await;
    ok(&run, "down again");
    assert_eq!(
        json(&run)["withdrawn"],
        serde_json::json!([format!("migration-{incident}-2")])
    );
    let requests = strings(
        &db,
        "SELECT id || ' ' || state FROM sync_requests ORDER BY id",
    )
    .await;
    assert_eq!(requests, [format!("migration-{incident} taken")]);
}

fn set(migrations: &[(i64, &str, &str, &str)]) -> MigrationSet {
    MigrationSet::new(
        migrations
            .iter()
            .map(|(v, n, up, down)| {
                Migration::parse(*v, n, up)
                    .and_then(|m| m.with_reverse(down))
                    .expect("test migration parses")
            })
            .collect(),
    )
    .expect("test set")
}

/// A migration declared irreversible stops the way down before anything is written, with its
/// reason, on `plan` and `migrate` alike.
#[tokio::test]
async fn an_irreversible_migration_stops_the_way_down_before_anything_is_written() {
    for backend in [Backend::Sqlite, Backend::Postgres, Backend::MySql] {
        let test_db = TestDb::create(backend).await;
        let db = test_db.connect().await;
        let migrations = set(&[
            (1, "a", "CREATE TABLE a (x BIGINT)", "DROP TABLE a"),
            (
                2,
                "b",
                "CREATE TABLE b (x BIGINT)",
                "-- fleetsync: irreversible b's rows were merged into a",
            ),
            (3, "c", "CREATE TABLE c (x BIGINT)", "DROP TABLE c"),
        ]);
        let engine = Engine::with_set(db.clone(), migrations.clone(), Options::default());
        engine.migrate(None, &mut |_| {}).await.expect("up");
        let before = dump(&db).await;
        let err = engine
            .migrate(Some(1), &mut |_| {})
            .await
            .expect_err("irreversible");
        assert!(
            matches!(&err, EngineError::Irreversible { version: 2, reason, .. } if reason == "b's rows were merged into a"),
            "{backend}: {err}"
        );
        assert!(err.to_string().contains("nothing was written"), "{err}");
        assert_eq!(dump(&db).await, before, "{backend}: something was written");
        let plan = engine.plan(Some(1)).await.expect("plan");
        let irreversible: Vec<_> = plan
            .migrations
            .iter()
            .map(|p| (p.version, p.reverse, p.irreversible.clone()))
            .collect();
        assert_eq!(
            irreversible,
            [
                (3, true, None),
                (2, true, Some("b's rows were merged into a".to_owned()))
            ]
        );
        // Above it, the way down is open.
        let report = engine
            .migrate(Some(2), &mut |_| {})
            .await
            .expect("down to 2");
        assert_eq!((report.rolled_back, report.current_version), (vec![3], 2));
    }
}

/// A serving agent whose range starts above the target stops the way down (exit status 4,
/// named) unless the operator says to stop it.
#[tokio::test]
async fn rolling_back_below_a_serving_agents_range_needs_stop_agents() {
    let test_db = TestDb::create(Backend::Postgres).await;
    let url = test_db.url();
    ok(&migrator(url, &["migrate", "--no-dispatch"]).await, "up");
    let db = test_db.connect().await;
    let latest = MigrationSet::embedded(Backend::Postgres).latest();
    execute(
        &db,
        &format!(
            "INSERT INTO sync_agents (id, host, version, schema_version, schema_max, \
             key_fingerprints, started_at, heartbeat_at, lease_ttl_ms, state, reason, outcomes) \
             VALUES ('agent-new', 'h1', '9.9.9', {AGENT_SCHEMA_RANGES_VERSION}, {latest}, '[]', \
             0, (EXTRACT(EPOCH FROM clock_timestamp()) * 1000)::BIGINT + 600000, 30000, \
             'serving', '', '{{}}')"
        ),
    )
    .await;
    let before = dump(&db).await;
    let below = "20261208000001";
    let refused = migrator(url, &["migrate", "--no-dispatch", "--target", below]).await;
    assert_eq!(refused.code(), 4, "{}{}", refused.stdout, refused.stderr);
    assert!(
        refused.stderr.contains("agent-new on h1")
            && refused.stderr.contains("--stop-agents")
            && refused.stderr.contains("nothing was written"),
        "{}",
        refused.stderr
    );
    assert_eq!(dump(&db).await, before);
    let plan = migrator(url, &["plan", "--target", below]).await;
    assert!(
        plan.stdout
            .contains("below the schema range of 1 live agent(s)")
            && plan.stdout.contains("--   agent-new"),
        "{}",
        plan.stdout
    );
    // The agent's row has values in the columns the reverse drops.
    let run = migrator(
        url,
        &[
            "migrate",
            "--no-dispatch",
            "--target",
            below,
            "--stop-agents",
            "--allow-data-loss",
        ],
    )
    .await;
    ok(&run, "down with --stop-agents");
    assert!(
        run.stdout.contains(&format!("rolled back {latest}")),
        "{}",
        run.stdout
    );
}

/// Five migrators roll back at once: each migration is rolled back exactly once, and none
/// of them fails.
#[tokio::test]
async fn five_migrators_rolling_back_at_once_roll_each_migration_back_once() {
    for backend in [Backend::Postgres, Backend::MySql, Backend::Sqlite] {
        let test_db = TestDb::create(backend).await;
        let url = test_db.url().to_owned();
        ok(&migrator(&url, &["migrate", "--no-dispatch"]).await, "up");
        let runs = concurrently((0..5).map(|_| {
            let url = url.clone();
            async move {
                migrator(
                    &url,
                    &[
                        "migrate",
                        "--no-dispatch",
                        "--target",
                        &FIRST.to_string(),
                        "--allow-data-loss",
                        "-o",
                        "json",
                    ],
                )
                .await
            }
        }))
        .await;
        let mut rolled_back = Vec::new();
        for run in &runs {
            ok(run, &format!("{backend}: one of five"));
            for v in json(run)["rolled_back"].as_array().expect("rolled_back") {
                rolled_back.push(v.as_i64().expect("version"));
            }
        }
        rolled_back.sort();
        let expected: Vec<i64> = MigrationSet::embedded(backend)
            .iter()
            .map(|m| m.version)
            .filter(|v| *v > FIRST)
            .collect();
        assert_eq!(rolled_back, expected, "{backend}");
        let db = test_db.connect().await;
        assert_eq!(
            count(&db, "SELECT COUNT(*) FROM fleetsync_schema_rollbacks").await,
            expected.len() as i64,
            "{backend}"
        );
    }
}

/// An agent whose range starts above the schema it now finds (rolled back under it) stops
/// claiming and says why, in its health and its log, without failing writes; migrated up
/// again, it serves again and syncs.
#[tokio::test]
async fn an_agent_stands_down_while_the_schema_is_below_its_range_and_serves_again() {
    let scenario = Scenario::on(Backend::Postgres)
        .hosts(1)
        .unmigrated()
        .start()
        .await;
    let (fleet, db) = (&scenario.fleet, &scenario.db);
    ok(
        &migrator(db.url(), &["migrate", "--no-dispatch"]).await,
        "up",
    );
    let conn = db.connect().await;
    let agent = scenario.start_process(&scenario.agent_process().fleet_defaults());
    let id = agent.logged("holder");
    let mut fleet_api = FleetClient::new(connect(agent.addr).await);
    register_fleet(&mut fleet_api, fleet, "h", DatabaseService::Mariadb).await;
    assert_eq!(agent.work_health().await, ServingStatus::Serving);

    let previous = MigrationSet::embedded(Backend::Postgres)
        .iter()
        .map(|m| m.version)
        .filter(|v| *v < AGENT_SCHEMA_RANGES_VERSION)
        .max()
        .expect("a previous version")
        .to_string();
    let run = migrator(
        db.url(),
        &[
            "migrate",
            "--no-dispatch",
            "--target",
            &previous,
            "--stop-agents",
            "--allow-data-loss",
        ],
    )
    .await;
    ok(&run, "down below the agent's range");
    agent
        .wait_for_work_health(ServingStatus::NotServing, Duration::from_secs(20))
        .await;
    let log = agent.log();
    assert!(
        log.contains("the schema is outside this agent's range"),
        "{log}"
    );
    // Its row says so (in the columns the older registry has), so that the way up is not
    // refused on its account.
    let standing_down = format!(
        "SELECT COUNT(*) FROM sync_agents WHERE id = '{id}' AND state = 'incompatible' \
         AND reason LIKE '%{previous}%'"
    );
    wait_for_count(
        &conn,
        &standing_down,
        |n| n == 1,
        Duration::from_secs(20),
        "recorded",
    )
    .await;
    // It claims nothing: a job of every server waits while it stands down.
    let job = SyncAgentClient::new(connect(agent.addr).await)
        .start_sync(StartSyncRequest {
            request_id: "while-down".into(),
            all_servers: true,
            force: true,
            ..Default::default()
        })
        .await
        .expect("start a job")
        .into_inner()
        .job_id;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let finished = format!("SELECT finished FROM sync_jobs WHERE id = '{job}'");
    assert_eq!(
        count(&conn, &finished).await,
        0,
        "claimed while standing down"
    );

    ok(
        &migrator(db.url(), &["migrate", "--no-dispatch"]).await,
        "up again",
    );
    agent
        .wait_for_work_health(ServingStatus::Serving, Duration::from_secs(20))
        .await;
    assert!(agent.log().contains("inside this agent's range again"));
    let registry =
        format!("SELECT COUNT(*) FROM sync_agents WHERE id = '{id}' AND state = 'serving'");
    wait_for_count(
        &conn,
        &registry,
        |n| n == 1,
        Duration::from_secs(20),
        "registered again",
    )
    .await;
    wait_for_count(
        &conn,
        &finished,
        |n| n == 1,
        Duration::from_secs(20),
        "the job, done",
    )
    .await;
    // No write failed while it stood down: its only warnings are about the schema.
    let log = agent.log();
    let failed: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("\"WARN\"") || l.contains("\"ERROR\""))
        .filter(|l| !l.contains("this agent's range"))
        .collect();
    assert!(failed.is_empty(), "{failed:#?}");
}

/// A migration interrupted on its way up on MariaDB (statements journaled, the rest not run)
/// is rolled back with the catalog asked before each reverse statement: only what took effect
/// is undone, and the catalog equals a fresh migration to the target; up again, a fresh
/// install's.
#[tokio::test]
async fn a_migration_interrupted_on_its_way_up_rolls_back_on_mariadb() {
    let backend = Backend::MySql;
    let reachability = "20250301000001";
    let below = "20250215120213";
    let fresh_below = TestDb::create(backend).await;
    ok(
        &migrator(
            fresh_below.url(),
            &["migrate", "--no-dispatch", "--target", below],
        )
        .await,
        "fresh to the target",
    );
    let fresh = TestDb::create(backend).await;
    ok(
        &migrator(fresh.url(), &["migrate", "--no-dispatch"]).await,
        "fresh",
    );

    let db = TestDb::create(backend).await;
    // Three of the seven columns added, the third not yet journaled.
    let crashed = migrator_crash(
        db.url(),
        &[
            "migrate",
            "--no-dispatch",
            "--crash-at",
            &format!("{reachability}:3"),
        ],
    )
    .await;
    assert!(crashed.killed(), "{}{}", crashed.stdout, crashed.stderr);
    let status = json(&migrator(db.url(), &["status", "-o", "json"]).await);
    let partial = status["migrations"]
        .as_array()
        .expect("migrations")
        .iter()
        .find(|m| m["version"].as_i64() == reachability.parse().ok())
        .expect("the migration");
    assert_eq!(partial["state"], "partial", "{partial}");

    let run = migrator(
        db.url(),
        &[
            "migrate",
            "--no-dispatch",
            "--target",
            below,
            "--allow-data-loss",
        ],
    )
    .await;
    ok(&run, "the way down past the partial migration");
    assert!(
        run.stdout.contains(&format!("rolled back {reachability}")),
        "{}",
        run.stdout
    );
    let conn = db.connect().await;
    assert_eq!(dump(&conn).await, dump(&fresh_below.connect().await).await);
    ok(
        &migrator(db.url(), &["migrate", "--no-dispatch"]).await,
        "up again",
    );
    assert_eq!(dump(&conn).await, dump(&fresh.connect().await).await);
}
