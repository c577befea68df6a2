//! How runs share the agent's slots: dialing (TCP connect and banner) does not take one of the
//! `--concurrency` slots, so servers that never answer wait out their timeouts side by side
//! with the healthy work, not before it, whatever their number and order.

use std::time::Duration;

use fleetsync_common::Backend;
use fleetsync_common::proto::sync::v1::{
    DatabaseService, Outcome, StartSyncRequest, UnreachableCause,
};
use fleetsync_sync_agent::ssh::Timeouts;
use fleetsync_tests::{
    Scenario,
    catalog::wait_for_count,
    fleet::SSH_USER,
    services::{job_outcomes, register_server, watch_to_end},
};

#[tokio::test]
async fn hosts_that_never_answer_do_not_hold_the_slots_of_the_healthy_ones() {
    // Ten frozen hosts (they accept TCP and never send a banner) registered first, so they are
    // claimed first, then ten healthy ones; two slots.
    const FROZEN: usize = 10;
    let timeouts = Timeouts {
        connect: Duration::from_secs(3),
        handshake: Duration::from_secs(3),
        auth: Duration::from_secs(3),
        command: Duration::from_secs(10),
    };
    let scenario = Scenario::on(Backend::Postgres)
        .hosts(2 * FROZEN)
        .timeouts(timeouts)
        .runner(|r| r.concurrency = 2)
        .start()
        .await;
    let (fleet, db, agent) = (&scenario.fleet, &scenario.db, scenario.agent());
    for host in &fleet.hosts()[..FROZEN] {
        host.freeze();
    }
    let mut fleet_api = agent.fleet();
    let mut ids = Vec::new();
    for (i, host) in fleet.hosts().iter().enumerate() {
        let id = register_server(
            &mut fleet_api,
            &format!("host-{i}"),
            host,
            SSH_USER,
            DatabaseService::Mariadb,
        )
        .await;
        ids.push(id);
    }
    // Whatever registration started (the migration's request covers every server) ends
    // first: the job below must find every lease free.
    let conn = db.connect().await;
    wait_for_count(
        &conn,
        "SELECT (SELECT COUNT(*) FROM server_leases WHERE pending_since IS NOT NULL) \
         + (SELECT COUNT(*) FROM sync_job_servers WHERE outcome IS NULL)",
        |n| n == 0,
        Duration::from_secs(20),
        "servers still waiting or running before the job",
    )
    .await;
    let mut sync = agent.sync();
    let job = sync
        .start_sync(StartSyncRequest {
            request_id: "slots".into(),
            server_ids: ids.clone(),
            force: true,
            ..Default::default()
        })
        .await
        .expect("start")
        .into_inner();
    watch_to_end(&mut sync, &job.job_id).await;
    let outcomes = job_outcomes(&mut sync, &job.job_id).await;
    assert_eq!(outcomes.len(), 2 * FROZEN);
    let frozen: Vec<_> = outcomes
        .iter()
        .filter(|o| ids[..FROZEN].contains(&o.server_id))
        .collect();
    let healthy: Vec<_> = outcomes
        .iter()
        .filter(|o| ids[FROZEN..].contains(&o.server_id))
        .collect();
    for o in &frozen {
        assert_eq!(o.outcome(), Outcome::Unreachable, "{o:?}");
        assert_eq!(o.cause(), UnreachableCause::Timeout, "{o:?}");
    }
    for o in &healthy {
        assert_eq!(o.outcome(), Outcome::Ok, "{o:?}");
    }
    // Every healthy server finished before the first frozen one timed out: the frozen hosts
    // took none of the two slots while they waited.
    let finished = |o: &&fleetsync_common::proto::sync::v1::ServerOutcome| {
        let t = o.finished_at.expect("finished_at");
        t.seconds as f64 + f64::from(t.nanos) / 1e9
    };
    let last_healthy = healthy.iter().map(finished).fold(f64::MIN, f64::max);
    let first_frozen = frozen.iter().map(finished).fold(f64::MAX, f64::min);
    assert!(
        last_healthy < first_frozen,
        "the healthy servers waited for the frozen ones: last healthy at {last_healthy}, \
         first frozen at {first_frozen}"
    );
    // And the frozen hosts waited side by side: all within one timeout of each other, not
    // in five rounds of two.
    let last_frozen = frozen.iter().map(finished).fold(f64::MIN, f64::max);
    assert!(
        last_frozen - first_frozen < timeouts.handshake.as_secs_f64(),
        "frozen hosts timed out over {:.1} s: one after another ({:?})",
        last_frozen - first_frozen,
        frozen
            .iter()
            .map(|o| (finished(o) - first_frozen, o.message.clone()))
            .collect::<Vec<_>>()
    );
}
