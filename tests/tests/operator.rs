//! What an operator runs: `just demo` (twice, as a newcomer would) and the agent's CLI.

use std::process::Command;

use fleetsync_common::Backend;
use fleetsync_tests::{Scenario, fleet::SSH_USER, process::bin_path};
use serde_json::Value;

#[test]
fn the_demo_runs_clean_twice() {
    let dir = tempfile::tempdir().expect("temp dir");
    let run = || {
        let output = Command::new(bin_path("demo"))
            .current_dir(dir.path())
            .output()
            .expect("run the demo (built by `just build`)");
        let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
        assert!(
            output.status.success(),
            "demo failed: {stdout}{}",
            String::from_utf8_lossy(&output.stderr)
        );
        stdout
    };
    let first = run();
    for expected in [
        "migrate exited with 0",
        "UNREACHABLE (refused)",
        "UNREACHABLE (timeout)",
        "SKIPPED_NO_DATABASE_SERVICE",
        "HOST_KEY_MISMATCH",
        "7 of 7 server(s) finished",
        "every sshd and the agent are stopped",
    ] {
        assert!(
            first.contains(expected),
            "first run lacks {expected:?}:\n{first}"
        );
    }
    let second = run();
    for expected in [
        "nothing to migrate",
        "SKIPPED_OFFLINE",
        "HOST_KEY_MISMATCH",
        "db-3    OK",
    ] {
        assert!(
            second.contains(expected),
            "second run lacks {expected:?}:\n{second}"
        );
    }
    assert!(dir.path().join("demo/fleetsync.db").exists());
}

#[tokio::test]
async fn the_agent_cli_speaks_json_for_scripts() {
    let scenario = Scenario::on(Backend::Sqlite)
        .hosts(1)
        .agents(0)
        .start()
        .await;
    let fleet = &scenario.fleet;
    let agent = scenario.start_process(&scenario.agent_process());
    let url = format!("http://{}", agent.addr);
    // Exits 0 (every server OK) or, where a server failed, 1.
    let cli_exiting = |args: &[&str], status: i32| -> Value {
        let output = Command::new(bin_path("sync-agent"))
            .args(args)
            .args(["--agent-url", &url, "-o", "json"])
            .output()
            .expect("run sync-agent");
        assert_eq!(
            output.status.code(),
            Some(status),
            "{args:?}: {}",
            String::from_utf8_lossy(&output.stderr)
        );
        serde_json::from_slice(&output.stdout).expect("JSON on stdout")
    };
    let cli = |args: &[&str]| cli_exiting(args, 0);

    let mut fleet_api =
        fleetsync_common::proto::sync::v1::fleet_client::FleetClient::connect(url.clone())
            .await
            .expect("connect");
    let host = fleet.host(0);
    fleet_api
        .upsert_server(fleetsync_common::proto::sync::v1::UpsertServerRequest {
            id: 0,
            spec: Some(fleetsync_common::proto::sync::v1::ServerSpec {
                name: "db-1".into(),
                ip: host.addr().to_string(),
                port: u32::from(host.port()),
                ssh_user: SSH_USER.into(),
                database_service: fleetsync_common::proto::sync::v1::DatabaseService::Mariadb
                    as i32,
                ..Default::default()
            }),
        })
        .await
        .expect("register");

    let synced = cli(&["sync", "--all", "--watch"]);
    assert_eq!(synced["job"]["state"], "done");
    assert_eq!(synced["outcomes"][0]["outcome"], "OK");
    assert_eq!(synced["outcomes"][0]["server"], "db-1");
    let job_id = synced["job"]["job_id"].as_str().expect("job id").to_owned();
    let job = cli(&["job", &job_id]);
    assert_eq!(job["job"]["outcomes"]["OK"], 1);
    let servers = cli(&["servers"]);
    assert_eq!(servers[0]["reachability"], "online");
    assert_eq!(servers[0]["last_outcome"]["outcome"], "OK");
    let check = cli(&["check", "1"]);
    assert_eq!(
        (check["outcome"].as_str(), check["host_key_check"].as_str()),
        (Some("OK"), Some("match"))
    );
    assert_eq!(check["authenticated"], true);

    // A hostile server writes terminal escape sequences to stderr: the human table shows them
    // escaped, JSON keeps them exact.
    host.install_program(
        "sudo",
        "#!/bin/sh\ncat >/dev/null\nprintf '\\033]0;owned\\007\\033[2Jboom\\n' >&2\nexit 3\n",
    );
    let human = Command::new(bin_path("sync-agent"))
        .args(["sync", "--all", "--watch", "--agent-url", &url])
        .output()
        .expect("run sync-agent");
    let stdout = String::from_utf8_lossy(&human.stdout);
    assert!(stdout.contains("COMMAND_FAILED"), "{stdout}");
    assert!(
        !stdout.contains('\u{1b}'),
        "raw escape in human output: {stdout:?}"
    );
    assert!(
        stdout.contains(r"\u{1b}]0;owned\u{7}\u{1b}[2Jboom"),
        "{stdout}"
    );
    let exact = cli_exiting(&["sync", "--all", "--watch"], 1);
    let message = exact["outcomes"][0]["message"].as_str().expect("message");
    assert!(
        message.contains("\u{1b}]0;owned\u{7}\u{1b}[2Jboom"),
        "{message:?}"
    );
    host.remove_program("sudo");

    // Every job, newest first, without knowing ids: the migration's too.
    let jobs = cli(&["jobs", "--limit", "50"]);
    let jobs = jobs.as_array().expect("a list");
    assert_eq!(jobs[0]["job_id"], exact["job"]["job_id"], "{jobs:?}");
    assert!(jobs.iter().any(|j| j["origin"] == "migration"), "{jobs:?}");
    let rpc = cli(&["jobs", "--origin", "rpc", "--limit", "2"]);
    assert_eq!(rpc.as_array().map(Vec::len), Some(2), "{rpc:?}");

    // A clear error for an agent that is not there.
    let output = Command::new(bin_path("sync-agent"))
        .args(["servers", "--agent-url", "http://127.0.0.1:1"])
        .output()
        .expect("run");
    assert!(!output.status.success());
    assert!(
        String::from_utf8_lossy(&output.stderr)
            .contains("cannot reach the sync-agent at http://127.0.0.1:1")
    );
}
