//! Least privilege, on PostgreSQL and MariaDB: the migrator runs as a role that owns the schema
//! and grants the agent's role (`migrate --agent-role`) rows of its tables and nothing else; the
//! agent then does its whole job as that role (take the migrations' requests, register, sync,
//! delete, prune) and cannot change the schema or the migrator's history.

use fleetsync_common::{
    Backend, Db,
    proto::sync::v1::{
        DatabaseService, DeleteServerRequest, ListAgentsRequest, Outcome, ServerSpec,
        StartSyncRequest, UpsertServerRequest,
    },
};
use fleetsync_sync_agent::{ssh::Timeouts, store::Store};
use fleetsync_tests::{
    Scenario, TestDb,
    db::{mysql_admin_url, postgres_admin_url},
    migrator::migrator,
    services::{job_outcomes, watch_to_end},
};

/// Runs `statements` on a connection of their own to `url`.
async fn run_all(url: &str, statements: &[String]) {
    let conn = Db::connect(url).await.expect("connect");
    for sql in statements {
        conn.execute(sql, &[])
            .await
            .unwrap_or_else(|e| panic!("{sql}: {e}"));
    }
    conn.close().await;
}

/// Two roles made for one test, dropped (after the database) when it ends, also on failure.
struct Roles {
    backend: Backend,
    migrator: String,
    agent: String,
}

impl Roles {
    async fn create(db: &TestDb) -> Self {
        let suffix = format!("{:x}", fleetsync_tests::random_u64() >> 24);
        let roles = Self {
            backend: db.backend(),
            migrator: format!("fs_mig_{suffix}"),
            agent: format!("fs_agent_{suffix}"),
        };
        let (admin_url, create) = match db.backend() {
            Backend::Postgres => (postgres_admin_url(), "CREATE ROLE {} LOGIN"),
            Backend::MySql => (mysql_admin_url(), "CREATE USER '{}'@'%'"),
            Backend::Sqlite => unreachable!("SQLite has no roles"),
        };
        let mut statements: Vec<String> = [&roles.migrator, &roles.agent]
            .iter()
            .map(|role| create.replace("{}", role))
            .collect();
        if db.backend() == Backend::MySql {
            statements.push(format!(
                "GRANT ALL ON {}.* TO '{}'@'%' WITH GRANT OPTION",
                db.name(),
                roles.migrator
            ));
        }
        run_all(&admin_url, &statements).await;
        if db.backend() == Backend::Postgres {
            // The schema is the migrator's to change; the agent gets nothing here.
            run_all(
                db.url(),
                &[format!(
                    "GRANT CREATE, USAGE ON SCHEMA public TO {}",
                    roles.migrator
                )],
            )
            .await;
        }
        roles
    }

    /// The database's URL, logged in as `role`.
    fn url(&self, db: &TestDb, role: &str) -> String {
        let admin_user = match self.backend {
            Backend::Postgres => "postgres@",
            _ => "root@",
        };
        assert!(db.url().contains(admin_user), "{}", db.url());
        db.url().replacen(admin_user, &format!("{role}@"), 1)
    }
}

impl Drop for Roles {
    fn drop(&mut self) {
        let (backend, roles) = (self.backend, [self.migrator.clone(), self.agent.clone()]);
        let dropped = std::thread::spawn(move || {
            tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("runtime")
                .block_on(async move {
                    let url = match backend {
                        Backend::Postgres => postgres_admin_url(),
                        _ => mysql_admin_url(),
                    };
                    let admin = Db::connect(&url).await.expect("admin");
                    for role in roles {
                        let sql = match backend {
                            Backend::Postgres => format!("DROP ROLE IF EXISTS {role}"),
                            _ => format!("DROP USER IF EXISTS '{role}'@'%'"),
                        };
                        if let Err(err) = admin.execute(&sql, &[]).await {
                            eprintln!("could not drop {role}: {err}");
                        }
                    }
                    admin.close().await;
                })
        })
        .join();
        if dropped.is_err() {
            eprintln!("dropping the test roles panicked");
        }
    }
}

async fn the_agent_does_its_job_with_only_its_rights(backend: Backend) {
    // Declared first, dropped last: the database (and what the roles own in it) goes first.
    let roles: Roles;
    let db = TestDb::create(backend).await;
    roles = Roles::create(&db).await;
    let (migrator_url, agent_url) = (
        roles.url(&db, &roles.migrator),
        roles.url(&db, &roles.agent),
    );
    // The migrator below migrates; then the agent connects as its role.
    let mut scenario = Scenario::with_db(db)
        .unmigrated()
        .agent_url(agent_url.clone())
        .timeouts(Timeouts::default())
        .output_cap(1024)
        .start()
        .await;

    // A role name that could not be granted is refused before anything is written.
    let refused = migrator(&migrator_url, &["migrate", "--agent-role", "a'; DROP"]).await;
    assert_eq!(refused.code(), 2, "{}", refused.stderr);
    let migrated = migrator(
        &migrator_url,
        &["migrate", "--no-dispatch", "--agent-role", &roles.agent],
    )
    .await;
    assert_eq!(migrated.code(), 0, "{}{}", migrated.stdout, migrated.stderr);
    assert!(
        migrated.stdout.contains(&format!(
            "granted the sync-agent's rights to {}",
            roles.agent
        )),
        "{}",
        migrated.stdout
    );

    // The agent, as its role: takes the migrations' requests (TestAgent waits for that),
    // registers, syncs, deletes.
    let agent = scenario.add_agent().await;
    let mut fleet = agent.fleet();
    let server = fleet
        .upsert_server(UpsertServerRequest {
            id: 0,
            spec: Some(ServerSpec {
                name: "refused".into(),
                ip: "127.0.0.1".into(),
                port: 1,
                database_service: DatabaseService::Mariadb as i32,
                ..Default::default()
            }),
        })
        .await
        .expect("register as the agent's role")
        .into_inner()
        .server
        .expect("server");
    let mut sync = agent.sync();
    let job = sync
        .start_sync(StartSyncRequest {
            server_ids: vec![server.id],
            ..Default::default()
        })
        .await
        .expect("start a sync as the agent's role")
        .into_inner();
    watch_to_end(&mut sync, &job.job_id).await;
    let outcomes = job_outcomes(&mut sync, &job.job_id).await;
    assert_eq!(outcomes.len(), 1);
    // Its row of the registry, written as its role.
    let agents = sync
        .list_agents(ListAgentsRequest {})
        .await
        .expect("list the agents as the agent's role")
        .into_inner()
        .agents;
    assert_eq!(agents.len(), 1, "{backend}: {agents:?}");
    assert_eq!(outcomes[0].outcome(), Outcome::Unreachable);
    fleet
        .delete_server(DeleteServerRequest { id: server.id })
        .await
        .expect("delete as the agent's role");
    let as_agent = Db::connect(&agent_url).await.expect("connect as the agent");
    Store::new(as_agent.clone())
        .prune(i64::MAX, 10)
        .await
        .expect("retention as the agent's role");

    // And nothing more.
    for sql in [
        "CREATE TABLE intruder (i INT)",
        "UPDATE fleetsync_schema_history SET checksum = checksum",
        "ALTER TABLE servers ADD COLUMN intruder INT",
    ] {
        let err = as_agent
            .execute(sql, &[])
            .await
            .expect_err("the agent's role may not");
        let text = err.to_string().to_lowercase();
        assert!(
            text.contains("denied") || text.contains("must be owner"),
            "{backend}: {sql}: {text}"
        );
    }
    as_agent.close().await;
    scenario.stop().await;
}

#[tokio::test]
async fn postgres_agent_with_only_its_rights() {
    the_agent_does_its_job_with_only_its_rights(Backend::Postgres).await;
}

#[tokio::test]
async fn mariadb_agent_with_only_its_rights() {
    the_agent_does_its_job_with_only_its_rights(Backend::MySql).await;
}
