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

use fleetsync_common::proto::sync::v1::{
    DatabaseService, Outcome, StartSyncRequest, UnreachableCause,
    sync_agent_client::SyncAgentClient,
};
use fleetsync_tests::{
    SshFleet, TestDb,
    catalog::{count, wait_for_count},
    events::watch_resumably,
    services::{ServeProcess, connect, migrate, register_fleet},
};

const HOSTS: usize = 300;
/// Hosts 270..290 are stopped (refused), 290..300 frozen (no banner).
const HEALTHY: usize = 270;
const REFUSED: usize = 20;

/// A fake `sudo` that takes a lock directory for the length of the session (records an overlap
/// with the holder's connection if another session holds it), takes a while, and answers like a
/// MariaDB server; a session whose answer finds no reader records itself as abandoned. It
/// outlives its connection (`PIPE` and `HUP` ignored), as a slow command on a real server may.
const SESSION: &str = r#"#!/bin/sh
D=$(dirname "$0")
cat >/dev/null
held=
if mkdir "$D/session.lock" 2>/dev/null; then
    echo "$SSH_CLIENT" > "$D/session.lock/holder"
    held=1
    trap 'rm -rf "$D/session.lock"' EXIT
else
    echo "overlap $(cat "$D/session.lock/holder" 2>/dev/null)" >> "$D/overlaps"
fi
trap '' PIPE HUP
echo "start $(date +%s.%N) $SSH_CLIENT" >> "$D/sessions"
sleep 0.6
printf '%s\n' '{"version": "10.11", "databases": [{"name": "app", "charset": "utf8mb4", "collation": "utf8mb4_bin"}]}' \
    || echo "abandoned $SSH_CLIENT" >> "$D/abandoned"
# The work is done once the answer is out: the lock goes now, not when the shell exits.
if [ -n "$held" ]; then
    trap - EXIT
    rm -rf "$D/session.lock"
fi
echo "end $(date +%s.%N) $SSH_CLIENT" >> "$D/sessions"
"#;

fn agent(db: &TestDb, key: &str, dir: &std::path::Path) -> ServeProcess {
    ServeProcess::start(
        "sync-agent",
        &[
            "--database-url",
            db.url(),
            "--ssh-key",
            key,
            "--lease-ttl",
            "2s",
            "--poll-interval",
            "100ms",
            "--sync-interval",
            "0s",
            "--concurrency",
            "20",
            "--connect-timeout",
            "2s",
            // Generous: 300 sshd on two cores, and CI runs other work beside.
            "--handshake-timeout",
            "4s",
            "--probe-interval",
            "1h",
            "--backoff-base",
            "1h",
        ],
        dir,
    )
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

fn assert_no_overlaps(fleet: &SshFleet, phase: &str) {
    let overlapped = overlaps(fleet);
    assert!(
        overlapped.is_empty(),
        "{phase}: {} host(s) saw two sessions at once, the first: {:?}",
        overlapped.len(),
        overlapped.first()
    );
}

/// Hosts that saw two sessions at work at once, each with its logs: an overlap counts unless
/// the session that held the host was abandoned (its agent went away). Every healthy host must
/// have logged its sessions: a script that could not write its files would see no overlap
/// whatever happened.
fn overlaps(fleet: &SshFleet) -> Vec<(usize, String)> {
    let read = |i: usize, name: &str| {
        std::fs::read_to_string(fleet.host(i).program_dir().join(name)).unwrap_or_default()
    };
    let unlogged: Vec<usize> = (0..HEALTHY)
        .filter(|&i| read(i, "sessions").is_empty())
        .collect();
    assert!(
        unlogged.is_empty(),
        "hosts whose sessions left no log: {unlogged:?}"
    );
    (0..HEALTHY)
        .filter(|&i| {
            let abandoned = read(i, "abandoned");
            read(i, "overlaps").lines().any(|line| {
                let holder = line.trim_start_matches("overlap").trim();
                holder.is_empty()
                    || !abandoned
                        .lines()
                        .any(|a| a.trim_start_matches("abandoned").trim() == holder)
            })
        })
        .map(|i| {
            let logs = format!(
                "overlaps:\n{}abandoned:\n{}sessions:\n{}",
                read(i, "overlaps"),
                read(i, "abandoned"),
                read(i, "sessions")
            );
            (i, logs)
        })
        .collect()
}

#[tokio::test]
async fn three_agents_share_300_hosts_and_survive_kill_stop_and_restart() {
    let fleet = SshFleet::start(HOSTS).await;
    let dir = tempfile::tempdir().expect("temp dir");
    let db = TestDb::postgres().await;
    migrate(db.url()).await;
    let conn = db.connect().await;
    let key = fleet.client_key().to_str().expect("utf-8").to_owned();
    for host in &fleet.hosts()[..HEALTHY] {
        host.install_program("sudo", SESSION);
    }
    let mut a = agent(&db, &key, dir.path());
    let mut b = agent(&db, &key, dir.path());
    let mut c = agent(&db, &key, dir.path());
    let ids = register_fleet(
        &mut fleetsync_common::proto::sync::v1::fleet_client::FleetClient::new(
            connect(a.addr).await,
        ),
        &fleet,
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
    let job = SyncAgentClient::new(connect(a.addr).await)
        .start_sync(StartSyncRequest {
            all_servers: true,
            request_id: "phase-1".into(),
            ..Default::default()
        })
        .await
        .expect("start")
        .into_inner();
    let watcher = tokio::spawn(watch_resumably(
        live.clone(),
        job.job_id.clone(),
        Duration::from_secs(90),
    ));
    let finished = format!(
        "SELECT COUNT(*) FROM sync_job_servers WHERE job_id = '{}' AND seq IS NOT NULL",
        job.job_id
    );
    wait_for_count(
        &conn,
        &finished,
        |n| n >= 30,
        Duration::from_secs(30),
        "no progress",
    )
    .await;
    signal(&a, "KILL");
    let _ = a.terminate_wait();
    signal(&b, "STOP");
    tokio::time::sleep(Duration::from_secs(4)).await;
    signal(&b, "CONT");
    let (events, _) = watcher.await.expect("watcher");
    check_outcomes(&events, &ids, "phase 1");
    assert_eq!(
        count(&conn, "SELECT COUNT(*) FROM sync_runs").await,
        HOSTS as i64,
        "each server recorded once: the dead agent's runs were redone, the stopped one's fenced off"
    );
    assert_no_overlaps(&fleet, "phase 1");

    // Phase 2: restart every agent mid-job; the watcher resumes on the new ones.
    let job = SyncAgentClient::new(connect(c.addr).await)
        .start_sync(StartSyncRequest {
            all_servers: true,
            force: true,
            request_id: "phase-2".into(),
            ..Default::default()
        })
        .await
        .expect("start")
        .into_inner();
    *live.lock().expect("agents") = vec![c.addr, b.addr];
    let watcher = tokio::spawn(watch_resumably(
        live.clone(),
        job.job_id.clone(),
        Duration::from_secs(90),
    ));
    let finished = format!(
        "SELECT COUNT(*) FROM sync_job_servers WHERE job_id = '{}' AND seq IS NOT NULL",
        job.job_id
    );
    wait_for_count(
        &conn,
        &finished,
        |n| n >= 30,
        Duration::from_secs(30),
        "no progress",
    )
    .await;
    for old in [&mut b, &mut c] {
        old.terminate(Duration::from_secs(15));
    }
    let fresh: Vec<ServeProcess> = (0..3).map(|_| agent(&db, &key, dir.path())).collect();
    *live.lock().expect("agents") = fresh.iter().map(|p| p.addr).collect();
    let (events, resumed) = watcher.await.expect("watcher");
    check_outcomes(&events, &ids, "phase 2");
    assert!(resumed >= 1, "the watch was cut by the restart and resumed");
    assert_eq!(
        count(&conn, "SELECT COUNT(*) FROM sync_runs").await,
        2 * HOSTS as i64,
        "each server recorded once more"
    );
    assert_no_overlaps(&fleet, "phase 2");
    for host in &fleet.hosts()[HEALTHY + REFUSED..] {
        host.thaw();
    }
    drop(fresh);
}
