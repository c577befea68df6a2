//! The registry of agents on one PostgreSQL or MariaDB: `sync-agent agents` (the real
//! binaries) lists every agent with its version, schema, key fingerprints, heartbeat, leases and
//! outcomes; a stopped agent shows as gone with "stopped", a killed one as gone once its
//! heartbeat is two TTLs late; retention drops them, and a live agent whose row was dropped
//! writes it again. The metrics carry the state.

use std::{
    process::Command,
    time::{Duration, Instant},
};

use fleetsync_common::{
    Backend,
    proto::sync::v1::{StartSyncRequest, sync_agent_client::SyncAgentClient},
};
use fleetsync_sync_agent::store::Store;
use fleetsync_tests::{
    AgentProcess, Scenario,
    catalog::{add_mariadb_everywhere, count, insert_servers},
    fleet::{GeneratedKey, generate_key},
    process::{bin_path, described, json_document},
    scrape::{sample, scrape},
    services::connect,
};
use serde_json::Value;

/// `sync-agent agents -o json` against `url`, by agent id.
fn agents(url: &str) -> Vec<Value> {
    let output = Command::new(bin_path("sync-agent"))
        .args(["agents", "-o", "json", "--agent-url", url])
        .output()
        .expect("run sync-agent agents");
    assert_eq!(output.status.code(), Some(0), "{}", described(&output));
    json_document(&output).as_array().expect("a list").clone()
}

fn find<'a>(list: &'a [Value], id: &str) -> &'a Value {
    list.iter()
        .find(|a| a["id"] == id)
        .unwrap_or_else(|| panic!("{id} is not listed: {list:?}"))
}

/// Polls the listing until `done` holds for it, at most `within`.
async fn until(
    url: &str,
    within: Duration,
    what: &str,
    done: impl Fn(&[Value]) -> bool,
) -> Vec<Value> {
    let deadline = Instant::now() + within;
    loop {
        let list = agents(url);
        if done(&list) {
            return list;
        }
        assert!(
            Instant::now() < deadline,
            "{what} within {within:?}: {list:#?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn the_registry_shows_every_agent_and_what_became_of_it_on_postgres() {
    the_registry_shows_every_agent_and_what_became_of_it(Backend::Postgres).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn the_registry_shows_every_agent_and_what_became_of_it_on_mariadb() {
    the_registry_shows_every_agent_and_what_became_of_it(Backend::MySql).await;
}

/// Several agents on one control plane (SQLite serves one agent only).
async fn the_registry_shows_every_agent_and_what_became_of_it(backend: Backend) {
    let scenario = Scenario::on(backend).agents(0).start().await;
    let (db, dir) = (&scenario.db, scenario.dir());
    let conn = db.connect().await;
    insert_servers(&conn, 60, 1, |_| "127.0.0.1".into()).await;
    add_mariadb_everywhere(&conn, "").await;
    let start = |key: &str, metrics: bool| {
        let agent = AgentProcess::on(db.url())
            .key(key)
            .flag("--lease-ttl", "3s");
        let agent = if metrics {
            agent
                .flag("--metrics-listen", "127.0.0.1:0")
                .flag("--metrics-interval", "0s")
        } else {
            agent
        };
        agent.start(dir)
    };
    let keys: Vec<GeneratedKey> = ["a", "b", "c"]
        .iter()
        .map(|n| generate_key(dir, n))
        .collect();
    let path = |i: usize| keys[i].path.to_str().expect("utf-8").to_owned();
    let a = start(&path(0), true);
    let mut b = start(&path(1), false);
    let mut c = start(&path(2), false);
    let ids: Vec<String> = [&a, &b, &c].iter().map(|p| p.logged("holder")).collect();
    let url = format!("http://{}", a.addr);

    let list = until(
        &url,
        Duration::from_secs(10),
        "three agents serving",
        |list| list.len() == 3 && list.iter().all(|x| x["state"] == "serving"),
    )
    .await;
    for (i, id) in ids.iter().enumerate() {
        let agent = find(&list, id);
        assert_eq!(agent["version"], env!("CARGO_PKG_VERSION"));
        assert_eq!(
            agent["schema_version"].as_i64(),
            Some(fleetsync_sync_agent::schema::SCHEMA_MIN)
        );
        assert_eq!(
            agent["schema_max"].as_i64(),
            Some(fleetsync_sync_agent::schema::SCHEMA_MAX)
        );
        let fingerprints = agent["key_fingerprints"].as_array().expect("fingerprints");
        assert_eq!(fingerprints.len(), 1, "{agent}");
        assert!(
            fingerprints[0]
                .as_str()
                .expect("text")
                .ends_with(&keys[i].fingerprint),
            "{agent} vs {}",
            keys[i].fingerprint
        );
        assert!(!agent["host"].as_str().expect("host").is_empty());
    }

    // A job: every outcome is counted by the agent that recorded it.
    SyncAgentClient::new(connect(a.addr).await)
        .start_sync(StartSyncRequest {
            all_servers: true,
            force: true,
            ..Default::default()
        })
        .await
        .expect("start the job");
    // (The migration's sync request made a job of its own: its runs count too, one per run.)
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let counted: u64 = agents(&url)
            .iter()
            .filter_map(|x| x["outcomes"]["UNREACHABLE"].as_u64())
            .sum();
        let runs = count(&conn, "SELECT COUNT(*) FROM sync_runs").await as u64;
        if counted >= 60 && counted == runs {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the registry counts {counted} UNREACHABLE runs, sync_runs holds {runs}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let metrics_addr = a.logged("metrics_addr").parse().expect("an address");
    let text = scrape(metrics_addr).await;
    assert_eq!(
        sample(&text, "fleetsync_agent_state", r#"state="serving""#),
        Some(1.0),
        "{text}"
    );
    assert_eq!(
        sample(&text, "fleetsync_agent_state", r#"state="gone""#),
        Some(0.0)
    );
    assert_eq!(
        sample(&text, "fleetsync_agents", r#"state="serving""#),
        Some(3.0),
        "the fleet's agents by state: {text}"
    );

    // Killed: gone once two TTLs pass without a heartbeat. Stopped: gone, "stopped".
    let killed = Command::new("kill")
        .args(["-KILL", &c.pid().to_string()])
        .status()
        .expect("kill");
    assert!(killed.success());
    c.terminate_wait();
    b.terminate(Duration::from_secs(20));
    let list = until(&url, Duration::from_secs(15), "two agents gone", |list| {
        find(list, &ids[1])["state"] == "gone" && find(list, &ids[2])["state"] == "gone"
    })
    .await;
    assert_eq!(find(&list, &ids[1])["reason"], "stopped");
    let silent = find(&list, &ids[2])["reason"]
        .as_str()
        .expect("a reason")
        .to_owned();
    assert!(
        silent.starts_with("no heartbeat for ") && silent.ends_with("(last state: serving)"),
        "{silent}"
    );
    assert_eq!(find(&list, &ids[0])["state"], "serving");
    let text = scrape(metrics_addr).await;
    assert_eq!(
        sample(&text, "fleetsync_agents", r#"state="gone""#),
        Some(2.0)
    );
    assert_eq!(
        sample(&text, "fleetsync_agents", r#"state="serving""#),
        Some(1.0)
    );

    // Retention drops the gone ones; a live agent whose row went too writes it again.
    let store = Store::new(conn.clone());
    let pruned = store.prune_older_than(0, 10).await.expect("prune");
    assert_eq!(pruned.agents, 3, "every row was older than now");
    let list = until(
        &url,
        Duration::from_secs(5),
        "the live agent back",
        |list| list.len() == 1,
    )
    .await;
    assert_eq!(list[0]["id"], ids[0].as_str());
    assert_eq!(list[0]["state"], "serving");
    drop(a);
}
