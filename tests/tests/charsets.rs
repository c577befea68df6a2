//! The charset list (hundreds of collations) is read from a server only when its version or
//! default charset differ from what the stored list was read under; the databases and users
//! are read every time. On MariaDB and PostgreSQL services, through real sshd hosts.

use fleetsync_common::Backend;
use fleetsync_common::proto::sync::v1::{DatabaseService, GetServerRequest, StartSyncRequest};
use fleetsync_sync_agent::ssh::Timeouts;
use fleetsync_tests::{
    Scenario, TestAgent,
    catalog::execute,
    fleet::SSH_USER,
    services::{job_outcomes, register_server, watch_to_end},
};

async fn sync_once(agent: &TestAgent, id: i64, request: &str) -> (u32, String) {
    let mut sync = agent.sync();
    let job = sync
        .start_sync(StartSyncRequest {
            request_id: request.into(),
            server_ids: vec![id],
            force: true,
            ..Default::default()
        })
        .await
        .expect("start")
        .into_inner();
    watch_to_end(&mut sync, &job.job_id).await;
    let outcome = job_outcomes(&mut sync, &job.job_id)
        .await
        .pop()
        .expect("one outcome");
    assert_eq!(outcome.outcome().as_str_name(), "OUTCOME_OK", "{outcome:?}");
    (outcome.counts.expect("counts").charsets, outcome.message)
}

#[tokio::test]
async fn the_charset_list_is_read_again_only_when_the_server_changes() {
    let scenario = Scenario::on(Backend::Sqlite)
        .hosts(2)
        .timeouts(Timeouts::default())
        .start()
        .await;
    let (fleet, db, agent) = (&scenario.fleet, &scenario.db, scenario.agent());
    let conn = db.connect().await;
    for (host, service) in fleet
        .hosts()
        .iter()
        .zip([DatabaseService::Mariadb, DatabaseService::Postgresql])
    {
        let id = register_server(
            &mut agent.fleet(),
            &format!("{service:?}"),
            host,
            SSH_USER,
            service,
        )
        .await;
        let (first, message) = sync_once(agent, id, &format!("{id}-first")).await;
        assert!(
            first > 0,
            "{service:?}: the first sync reads the charsets: {message}"
        );
        let (second, message) = sync_once(agent, id, &format!("{id}-second")).await;
        assert_eq!(second, 0, "{service:?}: unchanged: {message}");
        assert!(message.contains("charsets unchanged"), "{message}");
        let stored = agent
            .fleet()
            .get_server(GetServerRequest { id })
            .await
            .expect("get")
            .into_inner()
            .inventory
            .expect("inventory");
        assert_eq!(
            stored.charsets.len() as u32,
            first,
            "{service:?}: the stored list is kept"
        );
        assert!(!stored.default_charset.is_empty());

        // The server now reports something else than the key (an upgrade, say): read again.
        execute(
            &conn,
            &format!("UPDATE services SET inventory_key = 'older|utf8' WHERE server_id = {id}"),
        )
        .await;
        let (third, message) = sync_once(agent, id, &format!("{id}-third")).await;
        assert_eq!(third, first, "{service:?}: read again: {message}");
    }
}
