//! Bulk registration on every backend, through the real binaries: `sync-agent servers import`
//! of JSON lines and CSV (bad lines reported by number, the rest stored, a repeat changing
//! nothing, the later of two lines for one name winning, known host keys pinned), imports racing
//! each other on one fleet, and `Fleet/ImportServers` at its edges.

use std::{
    collections::HashMap,
    path::Path,
    process::{Command, Output},
};

use fleetsync_common::Backend;
use fleetsync_common::proto::sync::v1::{DatabaseService, ImportServersRequest, ServerSpec};
use fleetsync_sync_agent::ssh::Timeouts;
use fleetsync_tests::{
    Scenario,
    catalog::count,
    db::ALL_BACKENDS,
    fleet::generate_key,
    process::{bin_path, described as text, json_document as document},
};
use serde_json::{Value, json};

fn import(url: &str, file: &Path, extra: &[&str]) -> Output {
    Command::new(bin_path("sync-agent"))
        .args(["servers", "import"])
        .arg(file)
        .args(["--agent-url", url])
        .args(extra)
        .env_remove("FLEETSYNC_OUTPUT")
        .output()
        .expect("run sync-agent servers import")
}

/// Every server as `sync-agent servers -o json` lists it, by name.
fn listed(url: &str) -> HashMap<String, Value> {
    let output = Command::new(bin_path("sync-agent"))
        .args(["servers", "--agent-url", url, "-o", "json"])
        .output()
        .expect("run sync-agent servers");
    assert_eq!(output.status.code(), Some(0), "{}", text(&output));
    document(&output)
        .as_array()
        .expect("a list")
        .iter()
        .map(|s| (s["name"].as_str().expect("name").to_owned(), s.clone()))
        .collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn an_import_registers_a_fleet_and_is_safe_to_repeat_on_every_backend() {
    let dir = tempfile::tempdir().expect("temp dir");
    let keys: Vec<(String, String)> = (0..3)
        .map(|i| {
            let key = generate_key(dir.path(), &format!("key{i}"));
            (key.public, key.fingerprint)
        })
        .collect();
    // 2,500 servers (three calls of 1,000), bad lines among them, one name given twice.
    let mut lines: Vec<String> = (0..2500)
        .map(|i| {
            let mut spec = json!({
                "name": format!("imp-{i}"),
                "ip": format!("10.1.{}.{}", i / 250, i % 250),
                "databaseService": "DATABASE_SERVICE_MARIADB",
                "databaseVersion": "10.11",
            });
            if let Some((key, _)) = keys.get(i) {
                spec["hostKey"] = json!(key);
            }
            spec.to_string()
        })
        .collect();
    lines.insert(
        100,
        r#"{"name": "bad-ip", "ip": "10.0.0.999", "databaseService": "MARIADB"}"#.into(),
    );
    lines.insert(200, r#"{"name": "bad-json", "ip": "#.into());
    lines.insert(
        300,
        r#"{"name": "bad-field", "ip": "10.0.0.1", "adress": "x"}"#.into(),
    );
    lines.insert(
        1500,
        r#"{"name": "bad-port", "ip": "10.0.0.1", "port": 70000, "databaseService": "NONE"}"#
            .into(),
    );
    lines.push(
        r#"{"name": "imp-5", "ip": "192.0.2.5", "sshUser": "ops", "databaseService": "MYSQL"}"#
            .into(),
    );
    lines.insert(2000, String::new()); // a blank line is no spec, and no error
    let jsonl = dir.path().join("fleet.jsonl");
    std::fs::write(&jsonl, lines.join("\n") + "\n").expect("write the file");
    let line_of = |needle: &str| {
        1 + lines
            .iter()
            .position(|l| l.contains(needle))
            .expect("the line is there")
    };

    // CSV: 100 servers move, 50 change to PostgreSQL, 50 lose their service, 10 new ones.
    let mut csv = String::from("name,ip,port,ssh_user,database_service,database_version\n");
    for i in 0..100 {
        csv += &format!("imp-{i},10.2.0.{i},2222,vito,mariadb,10.11\n");
    }
    for i in 100..150 {
        csv += &format!("imp-{i},10.1.0.{i},,,postgresql,16\n");
    }
    for i in 150..200 {
        csv += &format!("imp-{i},10.1.0.{i},22,vito,none,\n");
    }
    for i in 0..10 {
        csv += &format!("\"new, {i}\",10.3.0.{i},22,vito,DATABASE_SERVICE_MARIADB,11.4\n");
    }
    csv += "imp-900,10.1.3.150,22\n"; // too few fields: reported, not stored
    let csv_file = dir.path().join("changes.csv");
    std::fs::write(&csv_file, &csv).expect("write the CSV");

    for backend in ALL_BACKENDS {
        let scenario = Scenario::on(backend).agents(0).start().await;
        let db = &scenario.db;
        let agent = scenario.start_process(&scenario.agent_process());
        let url = format!("http://{}", agent.addr);

        let first = import(&url, &jsonl, &[]);
        assert_eq!(first.status.code(), Some(1), "{backend}: {}", text(&first));
        let stdout = String::from_utf8_lossy(&first.stdout);
        assert!(
            stdout.contains("2505 server(s)")
                && stdout.contains("2500 created, 1 updated, 0 unchanged, 4 rejected"),
            "{backend}: {}",
            text(&first)
        );
        let stderr = String::from_utf8_lossy(&first.stderr);
        for (needle, says) in [
            ("bad-ip", "ip: \"10.0.0.999\" is not a valid IPv4 address"),
            ("bad-json", "not valid JSON"),
            ("bad-field", "adress: not a ServerSpec field"),
            ("bad-port", "port: must be 1-65535, got 70000"),
        ] {
            let expected = format!("line {}: {says}", line_of(needle));
            assert!(
                stderr.contains(&expected),
                "{backend}: {expected:?}: {}",
                text(&first)
            );
        }

        let servers = listed(&url);
        assert_eq!(servers.len(), 2500, "{backend}");
        // The later line for imp-5 won.
        let five = &servers["imp-5"];
        assert_eq!(
            (
                five["ip"].as_str(),
                five["ssh_user"].as_str(),
                five["database_service"].as_str()
            ),
            (Some("192.0.2.5"), Some("ops"), Some("mysql")),
            "{backend}: {five}"
        );
        // Known keys are pinned before any contact.
        for (i, (_, fingerprint)) in keys.iter().enumerate() {
            assert_eq!(
                servers[&format!("imp-{i}")]["host_key"].as_str(),
                Some(fingerprint.as_str()),
                "{backend}"
            );
        }
        assert!(servers["imp-3"]["host_key"].is_null(), "{backend}");
        let conn = db.connect().await;
        for table in ["server_leases", "services"] {
            assert_eq!(
                count(&conn, &format!("SELECT COUNT(*) FROM {table}")).await,
                2500,
                "{backend}: one {table} row per server"
            );
        }

        // Syncs store the version each server reports; a registration's "10.11" stands for it.
        conn.execute(
            "UPDATE services SET version = '10.11.19-MariaDB' WHERE name = 'mariadb'",
            &[],
        )
        .await
        .expect("a sync's version");
        // Again: nothing changes but the name given twice, written twice.
        let again = import(&url, &jsonl, &["-o", "json"]);
        assert_eq!(again.status.code(), Some(1), "{backend}: {}", text(&again));
        let report = document(&again);
        assert_eq!(
            (
                report["created"].as_u64(),
                report["updated"].as_u64(),
                report["unchanged"].as_u64()
            ),
            (Some(0), Some(2), Some(2499)),
            "{backend}: {report}"
        );
        let rejected: Vec<u64> = report["rejected"]
            .as_array()
            .expect("rejected")
            .iter()
            .map(|r| r["line"].as_u64().expect("line"))
            .collect();
        let expected: Vec<u64> = ["bad-ip", "bad-json", "bad-field", "bad-port"]
            .iter()
            .map(|n| line_of(n) as u64)
            .collect();
        assert_eq!(rejected, expected, "{backend}: bad lines in file order");
        assert_eq!(report["rejected"][3]["field"], "port", "{backend}");
        assert_eq!(
            count(
                &conn,
                "SELECT COUNT(*) FROM services WHERE version = '10.11.19-MariaDB'"
            )
            .await,
            2499,
            "{backend}: the versions read by syncs stay (imp-5 was written twice)"
        );
        let pinned_at = count(
            &conn,
            "SELECT host_key_pinned_at FROM servers WHERE name = 'imp-0'",
        )
        .await;

        // The CSV's changes.
        let changed = import(&url, &csv_file, &["-o", "json"]);
        assert_eq!(
            changed.status.code(),
            Some(1),
            "{backend}: {}",
            text(&changed)
        );
        let report = document(&changed);
        assert_eq!(
            (
                report["created"].as_u64(),
                report["updated"].as_u64(),
                report["unchanged"].as_u64()
            ),
            (Some(10), Some(200), Some(0)),
            "{backend}: {report}"
        );
        assert_eq!(report["rejected"][0]["line"], 212, "{backend}: {report}");
        let servers = listed(&url);
        assert_eq!(servers.len(), 2510, "{backend}");
        assert_eq!(
            (
                servers["imp-7"]["ip"].as_str(),
                servers["imp-7"]["port"].as_u64()
            ),
            (Some("10.2.0.7"), Some(2222)),
            "{backend}"
        );
        assert_eq!(
            servers["imp-120"]["database_service"], "postgresql",
            "{backend}"
        );
        assert_eq!(servers["imp-170"]["database_service"], "none", "{backend}");
        assert_eq!(servers["new, 3"]["ip"], "10.3.0.3", "{backend}");
        // A spec without a key keeps the pinned one, and its pin time.
        assert_eq!(
            servers["imp-0"]["host_key"].as_str(),
            Some(keys[0].1.as_str()),
            "{backend}"
        );
        assert_eq!(
            count(
                &conn,
                "SELECT host_key_pinned_at FROM servers WHERE name = 'imp-0'"
            )
            .await,
            pinned_at,
            "{backend}"
        );
        assert_eq!(
            count(
                &conn,
                "SELECT COUNT(*) FROM services WHERE name = 'postgresql' AND version = '16'"
            )
            .await,
            50,
            "{backend}"
        );
        assert_eq!(
            count(&conn, "SELECT COUNT(*) FROM services").await,
            2510 - 50,
            "{backend}: a server without a service has no service row"
        );
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn imports_racing_on_one_fleet_create_each_server_once_on_every_backend() {
    let dir = tempfile::tempdir().expect("temp dir");
    // Four files over the same 2,000 names, each in another order and with its own address.
    let files: Vec<_> = (0..4)
        .map(|f| {
            let mut names: Vec<usize> = (0..2000).collect();
            names.rotate_left(f * 500);
            if f % 2 == 1 {
                names.reverse();
            }
            let body: String = names
                .iter()
                .map(|i| {
                    json!({"name": format!("race-{i}"), "ip": format!("10.9.{f}.{}", i % 250),
                           "databaseService": "POSTGRESQL"})
                    .to_string()
                        + "\n"
                })
                .collect();
            let path = dir.path().join(format!("race-{f}.jsonl"));
            std::fs::write(&path, body).expect("write");
            path
        })
        .collect();
    for backend in ALL_BACKENDS {
        let scenario = Scenario::on(backend).agents(0).start().await;
        let db = &scenario.db;
        let agent = scenario.start_process(&scenario.agent_process());
        let url = format!("http://{}", agent.addr);
        let runs: Vec<_> = files
            .iter()
            .map(|file| {
                let (url, file) = (url.clone(), file.clone());
                std::thread::spawn(move || import(&url, &file, &["-o", "json", "--batch", "300"]))
            })
            .collect();
        let mut created = 0;
        for run in runs {
            let output = run.join().expect("thread");
            assert_eq!(
                output.status.code(),
                Some(0),
                "{backend}: {}",
                text(&output)
            );
            let report = document(&output);
            let counted = ["created", "updated", "unchanged"]
                .iter()
                .map(|k| report[k].as_u64().expect("a count"))
                .sum::<u64>();
            assert_eq!(
                counted, 2000,
                "{backend}: every spec counted once: {report}"
            );
            created += report["created"].as_u64().expect("created");
        }
        assert_eq!(
            created, 2000,
            "{backend}: each server created by one import"
        );
        let conn = db.connect().await;
        for table in ["servers", "server_leases", "services"] {
            assert_eq!(
                count(&conn, &format!("SELECT COUNT(*) FROM {table}")).await,
                2000,
                "{backend}: {table}"
            );
        }
    }
}

#[tokio::test]
async fn import_servers_at_its_edges() {
    let scenario = Scenario::on(Backend::Sqlite)
        .timeouts(Timeouts::default())
        .output_cap(16)
        .start()
        .await;
    let (db, agent) = (&scenario.db, scenario.agent());
    let mut fleet = agent.fleet();
    let spec = |i: usize| ServerSpec {
        name: format!("edge-{i}"),
        ip: "192.0.2.1".into(),
        database_service: DatabaseService::Mariadb as i32,
        ..Default::default()
    };

    let empty = fleet
        .import_servers(ImportServersRequest { servers: vec![] })
        .await
        .expect("an empty import is no error")
        .into_inner();
    assert_eq!((empty.created, empty.ids.len()), (0, 0));

    let too_many = fleet
        .import_servers(ImportServersRequest {
            servers: (0..10_001).map(spec).collect(),
        })
        .await
        .expect_err("more than 10,000 at once");
    assert_eq!(too_many.code(), tonic::Code::InvalidArgument);
    assert!(too_many.message().contains("servers"), "{too_many:?}");

    let mut servers: Vec<ServerSpec> = (0..5).map(spec).collect();
    servers[3].database_service = DatabaseService::Unspecified as i32;
    servers[4].name = "edge-0".into(); // the same name again: applied after the first
    servers[4].ip = "192.0.2.99".into();
    let answer = fleet
        .import_servers(ImportServersRequest { servers })
        .await
        .expect("stored but one")
        .into_inner();
    assert_eq!(
        (answer.created, answer.updated, answer.unchanged),
        (3, 1, 0)
    );
    assert_eq!(answer.rejected.len(), 1);
    assert_eq!(
        (answer.rejected[0].index, answer.rejected[0].field.as_str()),
        (3, "database_service")
    );
    assert_eq!(answer.ids[3], 0, "no id for a rejected spec");
    assert_eq!(answer.ids[0], answer.ids[4], "one server for one name");
    assert!(answer.ids[..3].iter().all(|id| *id > 0));
    let conn = db.connect().await;
    assert_eq!(
        count(
            &conn,
            "SELECT COUNT(*) FROM servers WHERE ip = '192.0.2.99'"
        )
        .await,
        1
    );
    scenario.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn imports_racing_deletes_leave_every_server_whole_on_every_backend() {
    for backend in ALL_BACKENDS {
        let scenario = Scenario::on(backend)
            .timeouts(Timeouts::default())
            .output_cap(16)
            .start()
            .await;
        let (db, agent) = (&scenario.db, scenario.agent());
        let specs = |round: usize| -> Vec<ServerSpec> {
            (0..200)
                .map(|i| ServerSpec {
                    name: format!("churn-{i}"),
                    // Another address each round: every spec changes its server.
                    ip: format!("192.0.2.{}", round % 200 + 1),
                    database_service: if round.is_multiple_of(2) {
                        DatabaseService::Mariadb
                    } else {
                        DatabaseService::Postgresql
                    } as i32,
                    ..Default::default()
                })
                .collect()
        };
        let done = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let importer = {
            let (mut fleet, done) = (agent.fleet(), done.clone());
            tokio::spawn(async move {
                let mut failures = Vec::new();
                for round in 0..20 {
                    if let Err(status) = fleet
                        .import_servers(ImportServersRequest {
                            servers: specs(round),
                        })
                        .await
                    {
                        failures.push(format!("import {round}: {status}"));
                    }
                }
                done.store(true, std::sync::atomic::Ordering::Relaxed);
                failures
            })
        };
        let deleter = {
            let (mut fleet, done) = (agent.fleet(), done.clone());
            tokio::spawn(async move {
                let mut failures = Vec::new();
                let mut deleted = 0;
                while !done.load(std::sync::atomic::Ordering::Relaxed) {
                    let listed = match fleet
                        .list_servers(fleetsync_common::proto::sync::v1::ListServersRequest {
                            page_size: 1000,
                            ..Default::default()
                        })
                        .await
                    {
                        Ok(page) => page.into_inner().servers,
                        Err(status) => {
                            failures.push(format!("list: {status}"));
                            continue;
                        }
                    };
                    for server in listed.iter().step_by(3) {
                        match fleet
                            .delete_server(fleetsync_common::proto::sync::v1::DeleteServerRequest {
                                id: server.id,
                            })
                            .await
                        {
                            Ok(_) => deleted += 1,
                            Err(status) if status.code() == tonic::Code::NotFound => {}
                            Err(status) => failures.push(format!("delete: {status}")),
                        }
                    }
                }
                (failures, deleted)
            })
        };
        let mut failures = importer.await.expect("importer");
        let (deleting, deleted) = deleter.await.expect("deleter");
        failures.extend(deleting);
        assert!(failures.is_empty(), "{backend}: {failures:?}");
        assert!(deleted > 0, "{backend}: the deletes raced the imports");
        let conn = db.connect().await;
        for (what, sql) in [
            (
                "servers without a lease",
                "SELECT COUNT(*) FROM servers s WHERE NOT EXISTS \
                 (SELECT 1 FROM server_leases l WHERE l.server_id = s.id)",
            ),
            (
                "leases without a server",
                "SELECT COUNT(*) FROM server_leases l WHERE NOT EXISTS \
                 (SELECT 1 FROM servers s WHERE s.id = l.server_id)",
            ),
            (
                "services without a server",
                "SELECT COUNT(*) FROM services v WHERE NOT EXISTS \
                 (SELECT 1 FROM servers s WHERE s.id = v.server_id)",
            ),
        ] {
            assert_eq!(count(&conn, sql).await, 0, "{backend}: {what}");
        }
        scenario.stop().await;
    }
}
