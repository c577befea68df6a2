//! Replicas that govern themselves, with real sshd hosts and agent binaries on one PostgreSQL:
//! a failure that may be the agent's own is tried once more by a peer before it becomes the
//! server's outcome; an agent whose failures its peers keep overruling quarantines itself, and
//! comes back when an operator says so; zones keep each agent to the servers it can reach.
//!
//! - a replica with a key no host accepts: 0 healthy hosts recorded as failed over 5 jobs, the
//!   replica quarantined (NOT_SERVING, `agents`), then resumed by `sync-agent agents resume`;
//! - a replica in a network namespace without a route to the hosts: their outcome is OK, and
//!   none of them ever enters backoff;
//! - a host that is really down: UNREACHABLE after exactly two attempts, by two agents (one,
//!   with `--no-second-opinions`);
//! - two zones behind two namespaces, an agent in each: every server synced by its zone's agent.

use std::{
    net::{IpAddr, SocketAddr, TcpListener},
    process::Command,
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
    time::{Duration, Instant},
};

use fleetsync_common::{
    Backend,
    proto::sync::v1::{
        DatabaseService, Outcome, ServerSpec, StartSyncRequest, UpsertServerRequest,
        fleet_client::FleetClient, sync_agent_client::SyncAgentClient,
    },
};
use fleetsync_tests::{
    AgentProcess, Scenario,
    catalog::count,
    events,
    fleet::{Placement, SSH_USER},
    netns::NetNs,
    process::{bin_path, described, json_document},
    proxy::TcpProxy,
    services::{ServeProcess, connect, register_fleet},
};
use serde_json::Value;
use tonic_health::pb::health_check_response::ServingStatus;

/// The agent of these tests: a 3 s lease (a heartbeat every second, a quarantine window of
/// about nine), quick polls, no schedule, 1 s to connect and to exchange keys.
fn agent(database_url: &str) -> AgentProcess<'_> {
    AgentProcess::on(database_url)
        .flag("--lease-ttl", "3s")
        .flag("--poll-interval", "100ms")
        .flag("--sync-interval", "0s")
        .flag("--handshake-timeout", "1s")
        .flag("--connect-timeout", "1s")
}

/// `sync-agent agents -o json` against `agent`.
fn agents(agent: &ServeProcess) -> Vec<Value> {
    let output = Command::new(bin_path("sync-agent"))
        .args(["agents", "-o", "json", "--agent-url"])
        .arg(format!("http://{}", agent.addr))
        .output()
        .expect("run sync-agent agents");
    assert_eq!(output.status.code(), Some(0), "{}", described(&output));
    json_document(&output).as_array().expect("a list").clone()
}

/// The registry's row of `id`, polled until `done` holds for it (at most `within`).
async fn agent_row(
    at: &ServeProcess,
    id: &str,
    within: Duration,
    what: &str,
    done: impl Fn(&Value) -> bool,
) -> Value {
    let deadline = Instant::now() + within;
    loop {
        let list = agents(at);
        if let Some(row) = list.iter().find(|a| a["id"] == id)
            && done(row)
        {
            return row.clone();
        }
        assert!(
            Instant::now() < deadline,
            "{what} within {within:?}: {list:#?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Every agent of `ids` listed as serving.
async fn all_serving(at: &ServeProcess, ids: &[&str]) {
    for id in ids {
        agent_row(at, id, Duration::from_secs(15), "serving", |a| {
            a["state"] == "serving"
        })
        .await;
    }
}

/// One forced job of these servers, watched to its summary: each server's outcome.
async fn forced_job(
    agent: SocketAddr,
    ids: &[i64],
    request_id: &str,
) -> Vec<(i64, Outcome, String)> {
    let mut client = SyncAgentClient::new(connect(agent).await);
    let job = client
        .start_sync(StartSyncRequest {
            server_ids: ids.to_vec(),
            request_id: request_id.into(),
            force: true,
            ..Default::default()
        })
        .await
        .expect("start")
        .into_inner();
    let outcomes: Vec<_> = events::outcomes(&events::watch(&mut client, &job.job_id, 0).await)
        .into_values()
        .map(|o| (o.server_id, o.outcome(), o.message))
        .collect();
    assert_eq!(
        outcomes.len(),
        ids.len(),
        "one outcome per server: {outcomes:?}"
    );
    outcomes
}

#[tokio::test(flavor = "multi_thread")]
async fn a_replica_whose_key_no_host_accepts_decides_no_outcome_and_quarantines_itself() {
    let scenario = Scenario::on(Backend::Postgres)
        .hosts(12)
        .agents(0)
        .start()
        .await;
    let (fleet, db, dir) = (&scenario.fleet, &scenario.db, scenario.dir());
    let key = fleet.client_key().to_str().expect("utf-8").to_owned();
    // The healthy replica has the fleet's key; the broken one a key of its own (the test
    // harness gives every agent started without --ssh-key one): a rotation that reached one.
    let good = agent(db.url()).key(&key).start(dir);
    let broken = agent(db.url()).start(dir);
    let (good_id, broken_id) = (good.logged("holder"), broken.logged("holder"));
    all_serving(&good, &[&good_id, &broken_id]).await;
    let ids = register_fleet(
        &mut FleetClient::new(connect(good.addr).await),
        fleet,
        "h",
        DatabaseService::Mariadb,
    )
    .await;

    // The first job goes to the broken replica whole: the healthy one is stopped until the
    // broken one has handed every server over.
    nix_signal(good.pid(), "STOP");
    let first = tokio::spawn({
        let (addr, ids) = (broken.addr, ids.clone());
        async move { forced_job(addr, &ids, "key-0").await }
    });
    let handed = agent_row(
        &broken,
        &broken_id,
        Duration::from_secs(20),
        "every failure handed over",
        |a| a["second_opinions"]["asked"].as_u64() >= Some(ids.len() as u64),
    )
    .await;
    assert_eq!(
        handed["outcomes"].as_object().map(|o| o.len()),
        Some(0),
        "{handed}"
    );
    nix_signal(good.pid(), "CONT");
    let mut outcomes = first.await.expect("first job");
    for job in 1..5 {
        outcomes.extend(forced_job(good.addr, &ids, &format!("key-{job}")).await);
    }
    let failed: Vec<_> = outcomes
        .iter()
        .filter(|(_, o, _)| *o != Outcome::Ok)
        .collect();
    assert!(
        failed.is_empty(),
        "healthy hosts recorded as failed: {failed:?}"
    );
    assert_eq!(outcomes.len(), 5 * ids.len());

    // Its peers overruled it on every server: it quarantined itself.
    let row = agent_row(
        &good,
        &broken_id,
        Duration::from_secs(15),
        "quarantined",
        |a| a["state"] == "quarantined",
    )
    .await;
    assert!(
        row["second_opinions"]["overruled"].as_u64() >= Some(ids.len() as u64),
        "{row}"
    );
    assert_eq!(row["second_opinions"]["confirmed"], 0, "{row}");
    assert!(
        row["reason"]
            .as_str()
            .is_some_and(|r| r.contains("where a peer of its zone then succeeded")),
        "{row}"
    );
    assert_eq!(broken.work_health().await, ServingStatus::NotServing);
    assert_eq!(good.work_health().await, ServingStatus::Serving);
    let conn = db.connect().await;
    assert_eq!(
        count(
            &conn,
            &format!("SELECT COUNT(*) FROM sync_runs WHERE holder = '{broken_id}'")
        )
        .await,
        0,
        "the broken replica recorded nothing"
    );
    assert_eq!(
        count(
            &conn,
            "SELECT COUNT(*) FROM servers WHERE consecutive_failures > 0"
        )
        .await,
        0,
        "no healthy host entered backoff"
    );
    // Quarantined, it claims nothing: a job now is the healthy replica's alone.
    let before = count(
        &conn,
        &format!("SELECT COUNT(*) FROM sync_runs WHERE holder = '{good_id}'"),
    )
    .await;
    forced_job(broken.addr, &ids, "while-quarantined").await;
    assert_eq!(
        count(
            &conn,
            &format!("SELECT COUNT(*) FROM sync_runs WHERE holder = '{good_id}'")
        )
        .await,
        before + ids.len() as i64
    );

    // An operator resumes it: it serves again at its next heartbeat.
    let output = Command::new(bin_path("sync-agent"))
        .args(["agents", "resume", &broken_id, "--agent-url"])
        .arg(format!("http://{}", good.addr))
        .output()
        .expect("run sync-agent agents resume");
    assert_eq!(output.status.code(), Some(0), "{}", described(&output));
    agent_row(&good, &broken_id, Duration::from_secs(10), "resumed", |a| {
        a["state"] == "serving"
    })
    .await;
    assert_eq!(broken.work_health().await, ServingStatus::Serving);
    // Resuming an agent that is not quarantined, or one that does not exist, is refused.
    for (id, code) in [(good_id.as_str(), 9), ("no-such-agent", 5)] {
        let output = Command::new(bin_path("sync-agent"))
            .args(["agents", "resume", id, "--agent-url"])
            .arg(format!("http://{}", good.addr))
            .output()
            .expect("run sync-agent agents resume");
        assert_ne!(output.status.code(), Some(0), "{}", described(&output));
        let text = described(&output);
        assert!(
            text.contains(if code == 9 {
                "not quarantined"
            } else {
                "not found"
            }),
            "{text}"
        );
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_replica_without_a_route_to_the_hosts_never_decides_their_outcome() {
    let scenario = Scenario::on(Backend::Postgres)
        .placements(&[Placement::Namespace, Placement::Namespace])
        .agents(0)
        .start()
        .await;
    let (fleet, db, dir) = (&scenario.fleet, &scenario.db, scenario.dir());
    let key = fleet.client_key().to_str().expect("utf-8").to_owned();
    // The cut-off replica lives in a namespace of its own: it reaches the database through a
    // proxy on its veth, and nothing else (no route to the hosts' namespaces).
    let island = NetNs::create();
    let proxy = TcpProxy::start_on(
        IpAddr::V4(island.host_addr),
        "127.0.0.1:5432".parse().expect("addr"),
    )
    .await;
    let island_url = db.url().replace("127.0.0.1:5432", &proxy.addr.to_string());
    let good = agent(db.url()).key(&key).start(dir);
    let cut = agent(&island_url).key(&key).in_netns(&island).start(dir);
    let (good_id, cut_id) = (good.logged("holder"), cut.logged("holder"));
    all_serving(&good, &[&good_id, &cut_id]).await;
    let ids = register_fleet(
        &mut FleetClient::new(connect(good.addr).await),
        fleet,
        "ns",
        DatabaseService::Mariadb,
    )
    .await;

    // The cut-off replica takes the job (the other is stopped meanwhile) and fails to route.
    nix_signal(good.pid(), "STOP");
    let job = tokio::spawn({
        let (addr, ids) = (cut.addr, ids.clone());
        async move { forced_job(addr, &ids, "route").await }
    });
    agent_row(
        &cut,
        &cut_id,
        Duration::from_secs(20),
        "both failures handed over",
        |a| a["second_opinions"]["asked"].as_u64() >= Some(2),
    )
    .await;
    nix_signal(good.pid(), "CONT");
    let outcomes = job.await.expect("job");
    assert!(
        outcomes.iter().all(|(_, o, _)| *o == Outcome::Ok),
        "{outcomes:?}"
    );
    let conn = db.connect().await;
    assert_eq!(
        count(
            &conn,
            "SELECT COUNT(*) FROM servers WHERE consecutive_failures > 0 OR next_probe_at IS NOT NULL \
             OR reachability <> 'online'"
        )
        .await,
        0,
        "a reachable server entered backoff"
    );
    let row = agent_row(&good, &cut_id, Duration::from_secs(10), "judged", |a| {
        a["second_opinions"]["overruled"].as_u64() >= Some(2)
    })
    .await;
    assert_eq!(row["second_opinions"]["confirmed"], 0, "{row}");
    drop(cut);
    drop(proxy);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_host_that_is_really_down_is_unreachable_after_exactly_two_attempts_by_two_agents() {
    really_down(Backend::Postgres).await;
}

/// The same on MariaDB: the lease hand-over and the counts on the asker's row are written by
/// two agents there too.
#[tokio::test(flavor = "multi_thread")]
async fn a_host_that_is_really_down_is_unreachable_after_two_attempts_on_mariadb_too() {
    really_down(Backend::MySql).await;
}

async fn really_down(backend: Backend) {
    let scenario = Scenario::on(backend).hosts(2).agents(0).start().await;
    let (fleet, db, dir) = (&scenario.fleet, &scenario.db, scenario.dir());
    let key = fleet.client_key().to_str().expect("utf-8").to_owned();
    // The down host: accepts TCP and never speaks (a hung machine), counting every attempt.
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
    let down = listener.local_addr().expect("addr");
    let attempts = Arc::new(AtomicUsize::new(0));
    let counted = Arc::clone(&attempts);
    std::thread::spawn(move || {
        let mut held = Vec::new();
        for stream in listener.incoming().map_while(Result::ok) {
            counted.fetch_add(1, Ordering::SeqCst);
            held.push(stream);
        }
    });
    let a = agent(db.url()).key(&key).start(dir);
    let b = agent(db.url()).key(&key).start(dir);
    let (a_id, b_id) = (a.logged("holder"), b.logged("holder"));
    all_serving(&a, &[&a_id, &b_id]).await;
    let mut fleet_api = FleetClient::new(connect(a.addr).await);
    let mut ids = register_fleet(&mut fleet_api, fleet, "up", DatabaseService::Mariadb).await;
    let down_id = fleet_api
        .upsert_server(UpsertServerRequest {
            id: 0,
            spec: Some(ServerSpec {
                name: "down".into(),
                ip: down.ip().to_string(),
                port: u32::from(down.port()),
                ssh_user: SSH_USER.into(),
                database_service: DatabaseService::Mariadb as i32,
                ..Default::default()
            }),
        })
        .await
        .expect("register")
        .into_inner()
        .server
        .expect("server")
        .id;
    ids.push(down_id);

    let outcomes = forced_job(a.addr, &ids, "down").await;
    let (_, outcome, message) = outcomes
        .iter()
        .find(|(id, _, _)| *id == down_id)
        .expect("the down host's outcome");
    assert_eq!(*outcome, Outcome::Unreachable, "{message}");
    assert!(message.contains("failed too"), "{message}");
    assert_eq!(attempts.load(Ordering::SeqCst), 2, "two attempts, no more");
    let conn = db.connect().await;
    assert_eq!(
        count(
            &conn,
            &format!("SELECT COUNT(*) FROM sync_runs WHERE server_id = {down_id}")
        )
        .await,
        1,
        "one run recorded: the second agent's"
    );
    assert_eq!(
        count(
            &conn,
            &format!("SELECT consecutive_failures FROM servers WHERE id = {down_id}")
        )
        .await,
        1,
        "in backoff once"
    );
    let healthy = outcomes
        .iter()
        .filter(|(_, o, _)| *o == Outcome::Ok)
        .count();
    assert_eq!(healthy, 2);
    // The asker's failure was confirmed by its peer, in the registry.
    let confirmed: u64 = agents(&a)
        .iter()
        .map(|r| r["second_opinions"]["confirmed"].as_u64().unwrap_or(0))
        .sum();
    assert_eq!(confirmed, 1);

    // Agents that ask no second opinion: one attempt, recorded at once.
    let alike = agent(db.url()).key(&key).switch("--no-second-opinions");
    let (c, d) = (alike.start(dir), alike.start(dir));
    for mut old in [a, b] {
        old.terminate(Duration::from_secs(15));
    }
    all_serving(&c, &[&c.logged("holder"), &d.logged("holder")]).await;
    let outcomes = forced_job(c.addr, &[down_id], "down-again").await;
    assert_eq!(outcomes[0].1, Outcome::Unreachable, "{}", outcomes[0].2);
    assert!(!outcomes[0].2.contains("failed too"), "{}", outcomes[0].2);
    assert_eq!(attempts.load(Ordering::SeqCst), 3, "one attempt more");
}

#[tokio::test(flavor = "multi_thread")]
async fn each_zone_is_synced_by_its_own_agent_only() {
    let scenario = Scenario::on(Backend::Postgres)
        .placements(&[Placement::Namespace, Placement::Namespace])
        .agents(0)
        .start()
        .await;
    let (fleet, db, dir) = (&scenario.fleet, &scenario.db, scenario.dir());
    let key = fleet.client_key().to_str().expect("utf-8").to_owned();
    // One agent in each host's namespace: each reaches its own host and the database (through
    // a proxy on the namespace's veth), not the other zone's host.
    let mut agents_by_zone = Vec::new();
    let mut proxies = Vec::new();
    for (zone, host) in ["east", "west"].iter().zip(fleet.hosts()) {
        let netns = host.netns().expect("a namespaced host");
        let proxy = TcpProxy::start_on(
            IpAddr::V4(netns.host_addr),
            "127.0.0.1:5432".parse().expect("addr"),
        )
        .await;
        let url = db.url().replace("127.0.0.1:5432", &proxy.addr.to_string());
        let agent = agent(&url)
            .key(&key)
            .flag("--zone", zone)
            .in_netns(netns)
            .start(dir);
        proxies.push(proxy);
        agents_by_zone.push((*zone, agent));
    }
    let east = &agents_by_zone[0].1;
    let holders: Vec<String> = agents_by_zone
        .iter()
        .map(|(_, a)| a.logged("holder"))
        .collect();
    all_serving(
        east,
        &holders.iter().map(String::as_str).collect::<Vec<_>>(),
    )
    .await;
    let listed = agents(east);
    for ((zone, _), holder) in agents_by_zone.iter().zip(&holders) {
        let row = listed
            .iter()
            .find(|a| a["id"] == holder.as_str())
            .expect("listed");
        assert_eq!(row["zone"], *zone, "{row}");
    }
    let mut fleet_api = FleetClient::new(connect(east.addr).await);
    let mut servers = Vec::new();
    for (i, ((zone, _), host)) in agents_by_zone.iter().zip(fleet.hosts()).enumerate() {
        let id = fleet_api
            .upsert_server(UpsertServerRequest {
                id: 0,
                spec: Some(ServerSpec {
                    name: format!("{zone}-{i}"),
                    ip: host.addr().to_string(),
                    port: u32::from(host.port()),
                    ssh_user: SSH_USER.into(),
                    database_service: DatabaseService::Mariadb as i32,
                    zone: (*zone).into(),
                    ..Default::default()
                }),
            })
            .await
            .expect("register")
            .into_inner()
            .server
            .expect("server");
        assert_eq!(id.spec.as_ref().map(|s| s.zone.as_str()), Some(*zone));
        servers.push(id.id);
    }
    for job in 0..3 {
        let outcomes = forced_job(east.addr, &servers, &format!("zones-{job}")).await;
        assert!(
            outcomes.iter().all(|(_, o, _)| *o == Outcome::Ok),
            "{outcomes:?}"
        );
    }
    let conn = db.connect().await;
    for (server, holder) in servers.iter().zip(&holders) {
        // Three jobs, and the migrations' sync request (drained by the first agent up).
        let runs = count(
            &conn,
            &format!("SELECT COUNT(*) FROM sync_runs WHERE server_id = {server}"),
        )
        .await;
        assert!(runs >= 3, "{runs} runs of server {server}");
        assert_eq!(
            count(
                &conn,
                &format!(
                    "SELECT COUNT(*) FROM sync_runs WHERE server_id = {server} AND holder <> '{holder}'"
                )
            )
            .await,
            0,
            "synced by another zone's agent"
        );
    }
    // None attempted across: no failure was ever handed over for a second opinion.
    for row in agents(east) {
        assert_eq!(row["second_opinions"]["asked"], 0, "{row}");
    }
}

/// Sends a signal by name to a process.
fn nix_signal(pid: u32, signal: &str) {
    let status = Command::new("kill")
        .args([&format!("-{signal}"), &pid.to_string()])
        .status()
        .expect("run kill");
    assert!(status.success(), "kill -{signal} {pid}");
}
