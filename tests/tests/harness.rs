//! The fixtures themselves: a fleet leaves no process, namespace, cgroup or temp dir behind,
//! also when the test using it panics; each backend gives every test a database of its own.

use fleetsync_common::Backend;
use fleetsync_sync_agent::ssh::{DEFAULT_OUTPUT_CAP, Timeouts};
use fleetsync_tests::{
    SshFleet, TestDb,
    db::ALL_BACKENDS,
    fleet::Placement,
    netns::{list_links, list_namespaces},
    process::{list_cgroups, pid_alive},
};

struct Traces {
    pids: Vec<u32>,
    session_pids: Vec<u32>,
    netns: String,
    dir: std::path::PathBuf,
}

/// Starts a fleet with a loopback and a namespaced host, leaves a command running on each,
/// and returns what must be gone once the fleet is dropped.
async fn busy_fleet() -> (SshFleet, Traces) {
    let fleet = SshFleet::start_with(&[Placement::Loopback, Placement::Namespace]).await;
    let client = fleet.client(Timeouts::default(), DEFAULT_OUTPUT_CAP);
    let mut session_pids = Vec::new();
    for host in fleet.hosts() {
        let ip = host.addr().to_string();
        let connection = client
            .connect(host.target(&ip, None))
            .await
            .expect("connect");
        // A command that outlives the test unless the harness kills it; it reports its pid.
        let out = connection
            .run("sleep 300 >/dev/null 2>&1 & echo $!")
            .await
            .expect("start a long command");
        let pid: u32 = String::from_utf8_lossy(&out.stdout)
            .trim()
            .parse()
            .expect("pid");
        assert!(pid_alive(pid));
        session_pids.push(pid);
        // Keep the connection open: its sshd session must be killed too.
        std::mem::forget(connection);
    }
    let traces = Traces {
        pids: fleet
            .hosts()
            .iter()
            .map(|h| h.pid().expect("running"))
            .collect(),
        session_pids,
        netns: fleet.host(1).netns_name().expect("namespaced").to_owned(),
        dir: fleet.dir().to_owned(),
    };
    assert!(list_namespaces().contains(&traces.netns));
    (fleet, traces)
}

fn assert_gone(traces: &Traces) {
    for pid in traces.pids.iter().chain(&traces.session_pids) {
        assert!(!pid_alive(*pid), "process {pid} survived the fleet");
    }
    assert!(
        !list_namespaces().contains(&traces.netns),
        "namespace {} left",
        traces.netns
    );
    assert!(
        !traces.dir.exists(),
        "fleet dir {} left",
        traces.dir.display()
    );
}

#[tokio::test]
async fn leaves_nothing_behind_when_dropped() {
    let (fleet, traces) = busy_fleet().await;
    drop(fleet);
    assert_gone(&traces);
}

#[tokio::test]
async fn leaves_nothing_behind_when_the_test_panics() {
    let (tx, rx) = tokio::sync::oneshot::channel();
    let task = tokio::spawn(async move {
        let (_fleet, traces) = busy_fleet().await;
        tx.send(traces).ok().expect("send traces");
        panic!("test failure while the fleet runs");
    });
    let panicked = task.await.expect_err("the task panics");
    assert!(panicked.is_panic());
    let traces = rx.await.expect("traces");
    assert_gone(&traces);
}

#[tokio::test]
async fn namespaces_and_links_are_removed() {
    let before_links = list_links();
    let fleet = SshFleet::start_with(&[Placement::Namespace, Placement::Namespace]).await;
    let names: Vec<String> = fleet
        .hosts()
        .iter()
        .map(|h| h.netns_name().expect("namespaced").to_owned())
        .collect();
    assert_ne!(names[0], names[1], "each host gets its own namespace");
    assert_ne!(fleet.host(0).addr(), fleet.host(1).addr());
    drop(fleet);
    let namespaces = list_namespaces();
    for name in &names {
        assert!(!namespaces.contains(name), "{name} left behind");
    }
    // Links of this fleet are gone (other tests may be creating their own meanwhile).
    let after: Vec<_> = list_links()
        .into_iter()
        .filter(|l| !before_links.contains(l))
        .collect();
    for name in &names {
        let n = name.split('-').nth(1).expect("fleetsync-N-pid");
        assert!(
            !after.iter().any(|l| l == &format!("fs77n{n}a")),
            "link of {name} left behind: {after:?}"
        );
    }
}

#[tokio::test]
async fn each_host_has_a_cgroup_that_goes_with_it() {
    let before = list_cgroups();
    let fleet = SshFleet::start(2).await;
    let during: Vec<_> = list_cgroups()
        .into_iter()
        .filter(|c| !before.contains(c))
        .collect();
    assert!(during.len() >= 2, "one cgroup per host: {during:?}");
    drop(fleet);
    let after = list_cgroups();
    for group in &during {
        let ours = group.starts_with(&format!("fleetsync-{}-", std::process::id()));
        assert!(
            !(ours && after.contains(group)),
            "cgroup {group} left behind"
        );
    }
}

#[tokio::test]
async fn every_backend_gives_each_test_its_own_database() {
    for backend in ALL_BACKENDS {
        let a = TestDb::create(backend).await;
        let b = TestDb::create(backend).await;
        assert_ne!(a.url(), b.url());
        let db_a = a.connect().await;
        let db_b = b.connect().await;
        assert_eq!(db_a.backend(), backend);
        db_a.ping().await.expect("ping");

        // A table made in one is not in the other.
        execute(&db_a, "CREATE TABLE probe (id INTEGER PRIMARY KEY)").await;
        execute(&db_a, "INSERT INTO probe (id) VALUES (7)").await;
        execute(&db_b, "CREATE TABLE probe (id INTEGER PRIMARY KEY)").await;
        assert_eq!(count(&db_a).await, 1, "{backend}");
        assert_eq!(count(&db_b).await, 0, "{backend}");
        db_a.close().await;
        db_b.close().await;

        let name = a.name().to_owned();
        drop(a);
        assert!(
            !database_exists(backend, &name).await,
            "{backend} database {name} left behind"
        );
    }
}

async fn execute(db: &fleetsync_common::Db, sql: &'static str) {
    use fleetsync_common::Db;
    match db {
        Db::Sqlite(pool) => sqlx::query(sql).execute(pool).await.map(drop),
        Db::Postgres(pool) => sqlx::query(sql).execute(pool).await.map(drop),
        Db::MySql(pool) => sqlx::query(sql).execute(pool).await.map(drop),
    }
    .expect(sql);
}

async fn count(db: &fleetsync_common::Db) -> i64 {
    use fleetsync_common::Db;
    let sql = "SELECT COUNT(*) FROM probe";
    match db {
        Db::Sqlite(pool) => sqlx::query_scalar(sql).fetch_one(pool).await,
        Db::Postgres(pool) => sqlx::query_scalar(sql).fetch_one(pool).await,
        Db::MySql(pool) => sqlx::query_scalar(sql).fetch_one(pool).await,
    }
    .expect("count")
}

async fn database_exists(backend: Backend, name: &str) -> bool {
    use sqlx::Connection;
    match backend {
        Backend::Sqlite => false, // its temp dir is gone with it; checked by path below
        Backend::Postgres => {
            let mut conn = sqlx::PgConnection::connect(&fleetsync_tests::db::postgres_admin_url())
                .await
                .expect("connect");
            sqlx::query_scalar::<_, i64>("SELECT COUNT(*) FROM pg_database WHERE datname = $1")
                .bind(name)
                .fetch_one(&mut conn)
                .await
                .expect("query")
                > 0
        }
        Backend::MySql => {
            let mut conn = sqlx::MySqlConnection::connect(&fleetsync_tests::db::mysql_admin_url())
                .await
                .expect("connect");
            sqlx::query_scalar::<_, i64>(
                "SELECT COUNT(*) FROM information_schema.schemata WHERE schema_name = ?",
            )
            .bind(name)
            .fetch_one(&mut conn)
            .await
            .expect("query")
                > 0
        }
    }
}

#[tokio::test]
async fn sqlite_test_database_is_a_removed_temp_file() {
    let db = TestDb::sqlite().await;
    let conn = db.connect().await;
    let path = db.url().trim_start_matches("sqlite://").to_owned();
    assert!(std::path::Path::new(&path).exists(), "created if missing");
    conn.close().await;
    drop(db);
    assert!(!std::path::Path::new(&path).exists(), "{path} left behind");
}
