//! The migrator on all three backends: fresh runs, crashes at every point, failing migrations,
//! concurrent runs, edited and unknown migrations, a database that is down, and Vito's incident
//! replayed with 1,000 servers and no agent.

use std::{
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
    time::{Duration, Instant},
};

use fleetsync_common::Backend;
use fleetsync_migrator::{
    engine::{Engine, EngineError, Options, State},
    migration::{CHARSET_COLLATION_VERSION, Migration, MigrationSet},
};
use fleetsync_tests::{
    TestDb,
    catalog::{count, dump, execute},
    db::ALL_BACKENDS,
    migrator::{at_each_point, concurrently, migrator, migrator_crash},
};
use serde_json::Value;

async fn fresh_run(backend: Backend) {
    let db = TestDb::create(backend).await;
    let url = db.url();

    let plan = migrator(url, &["plan"]).await;
    assert_eq!(plan.code(), 0, "{}", plan.stderr);
    assert!(
        plan.stdout.contains("CREATE TABLE servers"),
        "{}",
        plan.stdout
    );
    assert!(
        plan.stdout.contains("-- then re-sync: charsets, databases"),
        "{}",
        plan.stdout
    );

    let first = migrator(url, &["migrate", "--no-dispatch"]).await;
    assert_eq!(first.code(), 0, "{}", first.stderr);
    assert!(
        first.stdout.contains(&format!(
            "done: {} migration(s) applied",
            MigrationSet::embedded(backend).len()
        )),
        "{}",
        first.stdout
    );
    let second = migrator(url, &["migrate", "--no-dispatch"]).await;
    assert_eq!(second.code(), 0, "{}", second.stderr);
    assert!(
        second.stdout.contains("nothing to migrate"),
        "{}",
        second.stdout
    );

    let status = migrator(url, &["status", "-o", "json"]).await;
    assert_eq!(status.code(), 0, "{}", status.stderr);
    let status: Value = serde_json::from_str(&status.stdout).expect("status JSON");
    assert_eq!(status["backend"], backend.as_str());
    assert_eq!(status["current_version"], status["latest_version"]);
    assert_eq!(status["pending_sync_requests"], 1);
    for m in status["migrations"].as_array().expect("migrations") {
        assert_eq!(m["state"], "applied", "{m}");
        assert_eq!(m["checksum"], m["applied_checksum"]);
        assert_eq!(m["statements_applied"], m["statements_total"]);
    }

    let verify = migrator(url, &["verify"]).await;
    assert_eq!(verify.code(), 0, "{}", verify.stdout);
    let plan = migrator(url, &["plan", "-o", "json"]).await;
    let plan: Value = serde_json::from_str(&plan.stdout).expect("plan JSON");
    assert_eq!(plan["migrations"].as_array().map(Vec::len), Some(0));
}

fleetsync_tests::per_backend!(fresh_database => fresh_run);

/// Kills `migrate` (SIGKILL) at every crash point in turn; after each, a plain `migrate`
/// completes and the catalog equals a clean run's.
async fn crash_anywhere(backend: Backend) {
    let clean = TestDb::create(backend).await;
    let run = migrator(clean.url(), &["migrate", "--no-dispatch"]).await;
    assert_eq!(run.code(), 0, "{}", run.stderr);
    let expected = dump(&clean.connect().await).await;
    assert!(
        expected.iter().any(|l| l.contains("outbox migration-")),
        "{expected:?}"
    );

    let engine = Engine::new(clean.connect().await, Options::default());
    let points = engine.crash_points();
    let journaled = points.iter().any(|p| p.ends_with(":journal"));
    assert_eq!(journaled, backend == Backend::MySql);

    // A few points at a time: each in a database of its own.
    let checked = at_each_point(points, |point| {
        let expected = expected.clone();
        async move {
            let db = TestDb::create(backend).await;
            let crashed = migrator_crash(
                db.url(),
                &["migrate", "--no-dispatch", "--crash-at", &point],
            )
            .await;
            assert!(
                crashed.killed(),
                "{point}: not killed: {} {}",
                crashed.stdout,
                crashed.stderr
            );
            let retry = migrator(db.url(), &["migrate", "--no-dispatch"]).await;
            assert_eq!(
                retry.code(),
                0,
                "{point}: retry failed: {}{}",
                retry.stdout,
                retry.stderr
            );
            let got = dump(&db.connect().await).await;
            assert_eq!(got, expected, "{point}: schema differs from a clean run");
        }
    })
    .await;
    assert!(checked >= 26, "only {checked} crash points");
}

fleetsync_tests::per_backend!(crash_at_every_point => crash_anywhere);

fn set(migrations: &[(i64, &str, &str)]) -> MigrationSet {
    MigrationSet::new(
        migrations
            .iter()
            .map(|(v, n, sql)| Migration::parse(*v, n, sql).expect("test migration parses"))
            .collect(),
    )
    .expect("test set")
}

fn engine(db: &fleetsync_common::Db, migrations: &[(i64, &str, &str)]) -> Engine {
    Engine::with_set(db.clone(), set(migrations), Options::default())
}

#[tokio::test]
async fn a_failing_migration_names_its_statement_and_reruns_once_fixed() {
    for backend in ALL_BACKENDS {
        let test_db = TestDb::create(backend).await;
        let db = test_db.connect().await;
        let broken = [
            (1, "first", "CREATE TABLE t1 (id BIGINT);"),
            (
                2,
                "second",
                "CREATE TABLE t2 (id BIGINT);\nCREATE TABLE t3 (id BIGINT);\nCREAT TABLE typo (id BIGINT);\nCREATE TABLE t4 (id BIGINT);",
            ),
        ];
        let err = engine(&db, &broken)
            .migrate(None, &mut |_| {})
            .await
            .expect_err("must fail");
        let EngineError::StatementFailed {
            version,
            index,
            total,
            statement,
            ..
        } = &err
        else {
            panic!("{backend}: {err:?}");
        };
        assert_eq!((*version, *index, *total), (2, 3, 4), "{backend}");
        assert_eq!(statement, "CREAT TABLE typo (id BIGINT)");
        assert!(
            err.to_string()
                .contains("migration 2 (second) failed at statement 3 of 4"),
            "{err}"
        );

        let status = engine(&db, &broken).status().await.expect("status");
        assert_eq!(status.migrations[0].state, State::Applied);
        assert_eq!(status.migrations[1].state, State::Failed, "{backend}");
        let history = status.migrations[1].history.as_ref().expect("failed row");
        assert_eq!(
            history.failing_statement.as_deref(),
            Some("CREAT TABLE typo (id BIGINT)")
        );

        // Transactional backends rolled the migration back; MySQL kept what it did.
        let t2 = count(
            &db,
            "SELECT COUNT(*) FROM fleetsync_schema_history WHERE version = 1",
        )
        .await;
        assert_eq!(t2, 1);

        let fixed = [
            broken[0],
            (
                2,
                "second",
                "CREATE TABLE t2 (id BIGINT);\nCREATE TABLE t3 (id BIGINT);\nCREATE TABLE fixed (id BIGINT);\nCREATE TABLE t4 (id BIGINT);",
            ),
        ];
        let report = engine(&db, &fixed)
            .migrate(None, &mut |_| {})
            .await
            .expect("re-runs once fixed");
        assert_eq!(report.applied, [2], "{backend}");
        for table in ["t1", "t2", "t3", "fixed", "t4"] {
            assert_eq!(
                count(&db, &format!("SELECT COUNT(*) FROM {table}")).await,
                0,
                "{backend} {table}"
            );
        }
        assert!(
            engine(&db, &fixed)
                .verify()
                .await
                .expect("verify")
                .is_empty()
        );
    }
}

#[tokio::test]
async fn five_migrators_at_once_apply_each_migration_exactly_once() {
    for backend in ALL_BACKENDS {
        let db = TestDb::create(backend).await;
        let url = db.url().to_owned();
        let runs = concurrently((0..5).map(|_| {
            let url = url.clone();
            async move { migrator(&url, &["migrate", "--no-dispatch"]).await }
        }))
        .await;
        let mut applied = std::collections::BTreeMap::<String, usize>::new();
        for run in &runs {
            assert_eq!(run.code(), 0, "{backend}: {}{}", run.stdout, run.stderr);
            for line in run
                .stdout
                .lines()
                .filter(|l| l.trim_start().starts_with("applied "))
            {
                let version = line.split_whitespace().nth(1).expect("version").to_owned();
                *applied.entry(version).or_default() += 1;
            }
        }
        assert_eq!(
            applied.len(),
            MigrationSet::embedded(backend).len(),
            "{backend}: {applied:?}"
        );
        assert!(applied.values().all(|n| *n == 1), "{backend}: {applied:?}");
        let outbox = count(&db.connect().await, "SELECT COUNT(*) FROM sync_requests").await;
        assert_eq!(outbox, 1, "{backend}: exactly one sync request");
    }
}

#[tokio::test]
async fn edited_and_unknown_migrations_are_refused_and_nothing_is_written() {
    for backend in ALL_BACKENDS {
        let test_db = TestDb::create(backend).await;
        let db = test_db.connect().await;
        let original = [
            (1, "one", "CREATE TABLE a (id BIGINT);"),
            (2, "two", "CREATE TABLE b (id BIGINT);"),
        ];
        engine(&db, &original[..1])
            .migrate(None, &mut |_| {})
            .await
            .expect("apply v1");
        let before = dump(&db).await;

        let edited = [
            (1, "one", "CREATE TABLE a (id BIGINT, x BIGINT);"),
            original[1],
        ];
        let err = engine(&db, &edited)
            .migrate(None, &mut |_| {})
            .await
            .expect_err("edited");
        let EngineError::ChecksumMismatch {
            version,
            applied,
            binary,
            ..
        } = &err
        else {
            panic!("{err:?}");
        };
        assert_eq!(*version, 1);
        assert_ne!(applied, binary);
        assert!(
            err.to_string().contains(applied.as_str()) && err.to_string().contains(binary.as_str())
        );
        assert!(err.is_verification());
        assert_eq!(dump(&db).await, before, "{backend}: nothing written");
        let problems = engine(&db, &edited).verify().await.expect("verify");
        assert!(
            problems
                .iter()
                .any(|p| p.version == 1 && p.problem.contains("checksum mismatch"))
        );

        // A newer binary applied v2; this one knows only v1.
        engine(&db, &original)
            .migrate(None, &mut |_| {})
            .await
            .expect("apply v2");
        let before = dump(&db).await;
        let err = engine(&db, &original[..1])
            .migrate(None, &mut |_| {})
            .await
            .expect_err("unknown");
        assert!(
            matches!(&err, EngineError::UnknownVersions(v) if v == &[2]),
            "{err:?}"
        );
        assert!(err.to_string().contains("newer fleetsync"), "{err}");
        assert_eq!(dump(&db).await, before);
        let err = engine(&db, &original[..1])
            .plan(None)
            .await
            .map(|plan| plan.migrations)
            .expect_err("plan refuses too");
        assert!(matches!(err, EngineError::UnknownVersions(_)));
    }
}

#[tokio::test]
async fn the_binary_exits_3_on_a_database_from_a_newer_migrator() {
    let test_db = TestDb::sqlite().await;
    let run = migrator(test_db.url(), &["migrate", "--no-dispatch"]).await;
    assert_eq!(run.code(), 0);
    let db = test_db.connect().await;
    execute(
        &db,
        "INSERT INTO fleetsync_schema_history (version, name, checksum, state, statements_applied, \
         statements_total, installed_by, run_id, resync) VALUES (29990101000000, 'from_the_future', \
         'x', 'applied', 1, 1, 'test', 'test', '')",
    )
    .await;
    let before = dump(&db).await;
    let run = migrator(test_db.url(), &["migrate", "--no-dispatch"]).await;
    assert_eq!(run.code(), 3, "{}", run.stderr);
    assert!(run.stderr.contains("29990101000000"), "{}", run.stderr);
    let verify = migrator(test_db.url(), &["verify"]).await;
    assert_eq!(verify.code(), 3);
    assert!(
        verify.stdout.contains("unknown to this binary"),
        "{}",
        verify.stdout
    );
    assert_eq!(dump(&db).await, before);
}

#[tokio::test]
async fn a_database_that_is_down_is_a_clear_error() {
    for url in [
        "postgres://postgres:s3cret@127.0.0.1:1/control",
        "mysql://root:s3cret@127.0.0.1:1/control",
    ] {
        let started = Instant::now();
        let run = migrator(url, &["migrate"]).await;
        assert_eq!(run.code(), 1, "{}", run.stderr);
        assert!(run.stderr.contains("cannot connect to"), "{}", run.stderr);
        assert!(run.stderr.contains("Connection refused"), "{}", run.stderr);
        assert!(
            !run.stderr.contains("s3cret"),
            "password leaked: {}",
            run.stderr
        );
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "{:?}",
            started.elapsed()
        );
    }
    // A SQLite path that cannot be created.
    let run = migrator("sqlite:///proc/no/such/dir/x.db", &["migrate"]).await;
    assert_eq!(run.code(), 1);
    assert!(
        run.stderr
            .contains("cannot connect to sqlite:///proc/no/such/dir/x.db"),
        "{}",
        run.stderr
    );
}

/// A loopback listener that counts the connections it accepts and never answers them.
struct CountingListener {
    port: u16,
    accepted: Arc<AtomicUsize>,
    task: tokio::task::JoinHandle<()>,
}

impl CountingListener {
    async fn start() -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let port = listener.local_addr().expect("addr").port();
        let accepted = Arc::new(AtomicUsize::new(0));
        let counter = accepted.clone();
        let task = tokio::spawn(async move {
            let mut held = Vec::new();
            while let Ok((stream, _)) = listener.accept().await {
                counter.fetch_add(1, Ordering::SeqCst);
                held.push(stream);
            }
        });
        Self {
            port,
            accepted,
            task,
        }
    }
}

impl Drop for CountingListener {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Vito's incident: 1,000 registered servers, the charset/collation migration pending, and no
/// agent (not running, then accepting TCP and never answering).
async fn incident(backend: Backend) {
    let test_db = TestDb::create(backend).await;
    let run = migrator(
        test_db.url(),
        &["migrate", "--no-dispatch", "--target", "20240101000004"],
    )
    .await;
    assert_eq!(run.code(), 0, "{}", run.stderr);

    let servers = CountingListener::start().await;
    let db = test_db.connect().await;
    let values: Vec<String> = (0..1000)
        .map(|i| {
            format!(
                "('srv-{i}', '127.0.0.1', {}, 'vito', 'ready', 0, 0)",
                servers.port
            )
        })
        .collect();
    execute(
        &db,
        &format!(
            "INSERT INTO servers (name, ip, port, ssh_user, status, created_at, updated_at) VALUES {}",
            values.join(", ")
        ),
    )
    .await;
    // `databases` is a reserved word in MySQL.
    let databases = if backend == Backend::MySql {
        "`databases`"
    } else {
        "databases"
    };
    execute(
        &db,
        &format!(
            "INSERT INTO {databases} (server_id, name, status, created_at, updated_at) \
             SELECT id, 'app', 'ready', 0, 0 FROM servers"
        ),
    )
    .await;

    // No agent at all: a port nothing listens on.
    let closed = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let closed_url = format!("http://{}", closed.local_addr().expect("addr"));
    drop(closed);
    let started = Instant::now();
    let run = migrator(
        test_db.url(),
        &[
            "migrate",
            "--target",
            &CHARSET_COLLATION_VERSION.to_string(),
            "--agent-url",
            &closed_url,
        ],
    )
    .await;
    assert_eq!(run.code(), 0, "{}{}", run.stdout, run.stderr);
    assert!(run.stderr.contains("stays pending"), "{}", run.stderr);
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "{:?}",
        started.elapsed()
    );
    assert_eq!(
        servers.accepted.load(Ordering::SeqCst),
        0,
        "the migrator touched a server"
    );
    let pending = count(
        &db,
        "SELECT COUNT(*) FROM sync_requests WHERE state = 'pending'",
    )
    .await;
    assert_eq!(pending, 1);
    let filled = count(
        &db,
        &format!("SELECT COUNT(*) FROM {databases} WHERE charset IS NULL"),
    )
    .await;
    assert_eq!(filled, 1000, "charset is left for the agent to fill");

    // An agent that accepts TCP and never answers: still exit 0, within its deadline.
    let hung = CountingListener::start().await;
    let started = Instant::now();
    let run = migrator(
        test_db.url(),
        &[
            "migrate",
            "--agent-url",
            &format!("http://127.0.0.1:{}", hung.port),
            "--agent-timeout",
            "1s",
        ],
    )
    .await;
    let elapsed = started.elapsed();
    assert_eq!(run.code(), 0, "{}{}", run.stdout, run.stderr);
    assert!(
        run.stderr.contains("did not answer within 1s"),
        "{}",
        run.stderr
    );
    assert!(elapsed < Duration::from_millis(2500), "{elapsed:?}");
    assert!(
        hung.accepted.load(Ordering::SeqCst) >= 1,
        "the agent was asked"
    );
    assert_eq!(
        servers.accepted.load(Ordering::SeqCst),
        0,
        "the migrator touched a server"
    );
    assert_eq!(
        count(
            &db,
            "SELECT COUNT(*) FROM sync_requests WHERE state = 'pending'"
        )
        .await,
        1
    );
}

fleetsync_tests::per_backend!(incident_replay => incident);

/// The migrator that is shipped has no test hooks: only `migrator-crash` (built with the
/// `crash-points` feature, which nothing in the workspace turns on) knows `--crash-at`, so
/// `cargo build --release` and `cargo install` give a migrator without it.
#[tokio::test]
async fn the_shipped_migrator_has_no_crash_points() {
    let db = TestDb::sqlite().await;
    let run = migrator(db.url(), &["migrate", "--no-dispatch", "--crash-at", "x"]).await;
    assert_eq!(run.code(), 2, "{}", run.stderr);
    assert!(
        run.stderr.contains("unexpected argument '--crash-at'"),
        "{}",
        run.stderr
    );
    let help = migrator(db.url(), &["migrate", "--help"]).await;
    assert!(!help.stdout.contains("crash"), "{}", help.stdout);
}
