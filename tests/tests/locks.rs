//! Nothing waits behind someone else's lock: another connection holds a row lock on every
//! server for three lease TTLs during a job (as a panel's long transaction or a DDL would). The
//! completions wait, give up after the work pool's lock timeout, renew their leases and try
//! again; the heartbeat skips the rows they lock; runs still in flight keep their leases. No run
//! is discarded or redone (every lease token stays 1), and the job completes once the lock is
//! released. PostgreSQL and MariaDB (SQLite has no row locks). And every connection runs under
//! its session limits; a statement they cut short is transient.

use std::time::Duration;

use fleetsync_common::{
    Backend, Db,
    proto::sync::v1::{DatabaseService, Outcome},
};
use fleetsync_sync_agent::ssh::Timeouts;
use fleetsync_tests::{
    Scenario, TestDb,
    catalog::{count, execute, insert_servers},
    services::watch_to_end,
};
use tokio::sync::oneshot;

/// Locks every `servers` row on a connection of its own, says so, holds the lock for `hold`,
/// then commits.
fn lock_every_server(
    db: Db,
    hold: Duration,
) -> (oneshot::Receiver<()>, tokio::task::JoinHandle<()>) {
    let (locked, taken) = oneshot::channel();
    let task = tokio::spawn(async move {
        const LOCK: &str = "SELECT id FROM servers FOR UPDATE";
        match &db {
            Db::Postgres(pool) => {
                let mut tx = pool.begin().await.expect("begin");
                sqlx::query(LOCK).fetch_all(&mut *tx).await.expect("lock");
                let _ = locked.send(());
                tokio::time::sleep(hold).await;
                tx.commit().await.expect("commit");
            }
            Db::MySql(pool) => {
                let mut tx = pool.begin().await.expect("begin");
                sqlx::query(LOCK).fetch_all(&mut *tx).await.expect("lock");
                let _ = locked.send(());
                tokio::time::sleep(hold).await;
                tx.commit().await.expect("commit");
            }
            Db::Sqlite(_) => unreachable!("SQLite has no row locks"),
        }
    });
    (taken, task)
}

async fn a_lock_on_every_server_discards_no_run(backend: Backend) {
    // MySQL counts lock waits in whole seconds: a quarter of 3 s is 1 s there.
    let ttl = match backend {
        Backend::MySql => Duration::from_secs(3),
        _ => Duration::from_secs(2),
    };
    let scenario = Scenario::on(backend)
        .hosts(4)
        .timeouts(Timeouts::default())
        .output_cap(1 << 20)
        .runner(|r| r.lease_ttl = ttl)
        .register("host-", DatabaseService::Mariadb)
        .start()
        .await;
    let (hosts, db, agent) = (&scenario.fleet, &scenario.db, scenario.agent());
    for host in hosts.hosts() {
        // Runs still in flight while the lock is held: their leases must be renewed.
        host.install_program("sudo", "#!/bin/sh\nsleep 1\nexec /usr/bin/sudo \"$@\"\n");
    }
    let direct = db.connect().await;
    // And servers without a database service: their runs end at once, so the first batch
    // meets the lock straight away.
    insert_servers(&direct, 40, 22, |i| format!("192.0.2.{}", i + 1)).await;
    // With their lease rows, as the Fleet API and the agent's start-up repair make them (a
    // job that must create one checks its server's key, and would wait on the lock itself).
    execute(
        &direct,
        "INSERT INTO server_leases (server_id, token) SELECT s.id, 0 FROM servers s \
         WHERE NOT EXISTS (SELECT 1 FROM server_leases l WHERE l.server_id = s.id)",
    )
    .await;

    assert_eq!(
        count(&direct, "SELECT COUNT(*) FROM sync_runs").await,
        0,
        "{backend}: nothing ran before the job"
    );
    let hold = ttl * 3;
    let (locked, holder) = lock_every_server(db.connect().await, hold);
    locked.await.expect("the lock is taken");

    let mut sync = agent.sync();
    let job_id = sync
        .start_sync(fleetsync_common::proto::sync::v1::StartSyncRequest {
            all_servers: true,
            ..Default::default()
        })
        .await
        .expect("start")
        .into_inner()
        .job_id;
    tokio::time::sleep(hold - Duration::from_millis(500)).await;
    assert_eq!(
        count(&direct, "SELECT COUNT(*) FROM sync_runs").await,
        0,
        "{backend}: the lock held every completion back"
    );
    holder.await.expect("lock released");

    let events = tokio::time::timeout(Duration::from_secs(60), watch_to_end(&mut sync, &job_id))
        .await
        .unwrap_or_else(|_| panic!("{backend}: the job never completed after the lock"));
    let outcomes = fleetsync_tests::events::outcomes(&events);
    assert_eq!(outcomes.len(), 44, "{backend}: every server once");
    assert_eq!(
        outcomes
            .values()
            .filter(|o| o.outcome() == Outcome::Ok)
            .count(),
        4,
        "{backend}: the real hosts synced: {outcomes:?}"
    );
    assert_eq!(
        count(&direct, "SELECT MAX(token) FROM server_leases").await,
        1,
        "{backend}: no server was claimed twice: no run was discarded and redone"
    );
    assert_eq!(
        count(&direct, "SELECT COUNT(*) FROM sync_runs").await,
        44,
        "{backend}: one run per server"
    );
    scenario.stop().await;
}

fleetsync_tests::per_backend!(a_lock_on_every_server_for_three_ttls_discards_no_run => a_lock_on_every_server_discards_no_run; postgres, mariadb);

/// Every connection runs under its session limits (read back from the server), and a statement
/// cut short by one is transient: tried again, never taken for a permanent failure (a good run
/// would otherwise become PARSE_FAILED).
#[tokio::test]
async fn session_limits_hold_and_a_cut_statement_is_transient() {
    use fleetsync_common::{
        DbOptions, SessionLimits,
        sql::{Failure, classify},
    };
    for backend in [Backend::Postgres, Backend::MySql] {
        let db = TestDb::create(backend).await;
        let limited = Db::connect_with(
            db.url(),
            DbOptions {
                limits: SessionLimits {
                    statement: Duration::from_millis(200),
                    lock: Duration::from_secs(3),
                    idle_in_transaction: Duration::from_secs(7),
                },
                ..DbOptions::default()
            },
        )
        .await
        .expect("connect");
        let (read, sleep) = match backend {
            Backend::Postgres => (
                "SELECT current_setting('lock_timeout') || ' ' || \
                 current_setting('idle_in_transaction_session_timeout') || ' ' || \
                 current_setting('statement_timeout')",
                "SELECT 1 FROM pg_sleep(2)",
            ),
            _ => (
                "SELECT CONCAT(@@innodb_lock_wait_timeout, ' ', @@lock_wait_timeout, ' ', \
                 @@idle_transaction_timeout, ' ', @@max_statement_time)",
                "SELECT SLEEP(2)",
            ),
        };
        let settings = limited.fetch(read, &[]).await.expect("read the limits")[0]
            .text(0)
            .expect("text");
        let expected = match backend {
            Backend::Postgres => "3s 7s 200ms",
            _ => "3 3 7 0.200000",
        };
        assert_eq!(settings, expected, "{backend}");
        let started = std::time::Instant::now();
        let err = limited
            .fetch(sleep, &[])
            .await
            .expect_err("the statement is cut short");
        assert!(
            started.elapsed() < Duration::from_secs(2),
            "{backend}: cut at its limit, not run to the end"
        );
        assert_eq!(classify(&err), Failure::Unavailable, "{backend}: {err}");
        limited.close().await;
    }
}
