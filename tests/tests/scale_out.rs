//! Three agents on one PostgreSQL control plane and 300 real sshd hosts, some of them faulty:
//! one job gives exactly one outcome per server, and no host ever sees two SSH sessions at work
//! at once (checked on the host: every session takes a lock directory, and a session that finds
//! it taken records an overlap). Then the agents fail the ways agents fail: one is SIGKILLed
//! mid-job and another SIGSTOPped past its lease and resumed: the job completes, nothing is lost
//! or recorded twice (the stale agent's late results are fenced off, and it starts no command
//! once its lease has lapsed). Then every agent is restarted mid-job: the job completes and the
//! watcher resumes from its cursor on a new agent. The one overlap allowed: a session whose
//! agent went away (its output has no reader) may still be finishing when the next one starts,
//! as a stopping agent hands its servers over at once.

use std::{
    collections::BTreeMap,
    sync::{Arc, Mutex},
    time::Duration,
};

use fleetsync_common::Backend;
use fleetsync_common::proto::sync::v1::{DatabaseService, Outcome, UnreachableCause};
use fleetsync_tests::{
    AgentProcess, Scenario, TestDb,
    catalog::count,
    events::WatchedJob,
    fleet::{assert_no_overlaps, session_script},
    services::{ServeProcess, connect, register_fleet},
};

const HOSTS: usize = 300;
/// Hosts 270..290 are stopped (refused), 290..300 frozen (no banner).
const HEALTHY: usize = 270;
const REFUSED: usize = 20;

fn agent(db: &TestDb, key: &str, dir: &std::path::Path) -> ServeProcess {
    AgentProcess::on(db.url())
        .fleet_defaults()
        .key(key)
        .flag("--concurrency", 20)
        .start(dir)
}

fn signal(process: &ServeProcess, sig: &str) {
    let sent = std::process::Command::new("kill")
        .args([&format!("-{sig}"), &process.pid().to_string()])
        .status()
        .expect("kill");
    assert!(sent.success(), "kill -{sig}");
}

fn check_outcomes(events: &[(u64, i64, Outcome, UnreachableCause)], ids: &[i64], phase: &str) {
    let by_server: BTreeMap<i64, (Outcome, UnreachableCause)> =
        events.iter().map(|(_, id, o, c)| (*id, (*o, *c))).collect();
    assert_eq!(events.len(), HOSTS, "{phase}: one event per server");
    assert_eq!(
        by_server.len(),
        HOSTS,
        "{phase}: one outcome per server, none twice"
    );
    for (i, id) in ids.iter().enumerate() {
        let expected = if i < HEALTHY {
            (Outcome::Ok, UnreachableCause::Unspecified)
        } else if i < HEALTHY + REFUSED {
            (Outcome::Unreachable, UnreachableCause::Refused)
        } else {
            (Outcome::Unreachable, UnreachableCause::Timeout)
        };
        assert_eq!(by_server[id], expected, "{phase}: host {i}");
    }
}

#[tokio::test]
async fn three_agents_share_300_hosts_and_survive_kill_stop_and_restart() {
    let scenario = Scenario::on(Backend::Postgres)
        .hosts(HOSTS)
        .agents(0)
        .start()
        .await;
    let (fleet, db, dir) = (&scenario.fleet, &scenario.db, scenario.dir());
    let conn = db.connect().await;
    let key = fleet.client_key().to_str().expect("utf-8").to_owned();
    for host in &fleet.hosts()[..HEALTHY] {
        host.install_program("sudo", &session_script("0.6"));
    }
    let mut a = agent(db, &key, dir);
    let mut b = agent(db, &key, dir);
    let mut c = agent(db, &key, dir);
    let ids = register_fleet(
        &mut fleetsync_common::proto::sync::v1::fleet_client::FleetClient::new(
            connect(a.addr).await,
        ),
        fleet,
        "h",
        DatabaseService::Mariadb,
    )
    .await;
    for host in &fleet.hosts()[HEALTHY..HEALTHY + REFUSED] {
        host.stop();
    }
    for host in &fleet.hosts()[HEALTHY + REFUSED..] {
        host.freeze();
    }

    // Phase 1: kill A, stop B past its lease, resume B.
    let live = Arc::new(Mutex::new(vec![c.addr, b.addr, a.addr]));
    let job = WatchedJob::start(live.clone(), "phase-1", false, Duration::from_secs(90)).await;
    job.wait_finished(&conn, 30, Duration::from_secs(30)).await;
    signal(&a, "KILL");
    let _ = a.terminate_wait();
    signal(&b, "STOP");
    tokio::time::sleep(Duration::from_secs(4)).await;
    signal(&b, "CONT");
    let (events, _) = job.watched().await;
    check_outcomes(&events, &ids, "phase 1");
    assert_eq!(
        count(&conn, "SELECT COUNT(*) FROM sync_runs").await,
        HOSTS as i64,
        "each server recorded once: the dead agent's runs were redone, the stopped one's fenced off"
    );
    assert_no_overlaps(fleet, HEALTHY, "phase 1");

    // Phase 2: restart every agent mid-job; the watcher resumes on the new ones.
    *live.lock().expect("agents") = vec![c.addr, b.addr];
    let job = WatchedJob::start(live.clone(), "phase-2", true, Duration::from_secs(90)).await;
    job.wait_finished(&conn, 30, Duration::from_secs(30)).await;
    for old in [&mut b, &mut c] {
        old.terminate(Duration::from_secs(15));
    }
    let fresh: Vec<ServeProcess> = (0..3).map(|_| agent(db, &key, dir)).collect();
    *live.lock().expect("agents") = fresh.iter().map(|p| p.addr).collect();
    let (events, resumed) = job.watched().await;
    check_outcomes(&events, &ids, "phase 2");
    assert!(resumed >= 1, "the watch was cut by the restart and resumed");
    assert_eq!(
        count(&conn, "SELECT COUNT(*) FROM sync_runs").await,
        2 * HOSTS as i64,
        "each server recorded once more"
    );
    assert_no_overlaps(fleet, HEALTHY, "phase 2");
    for host in &fleet.hosts()[HEALTHY + REFUSED..] {
        host.thaw();
    }
    drop(fresh);
}
