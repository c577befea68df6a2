//! The Python client in `examples/python/`, as another team uses it: stubs generated from
//! `proto/` with grpcio-tools, run against the real agent binary and real sshd hosts. Its
//! outcomes must be the job's, each once, across a watch it drops and resumes on purpose.

use std::{collections::BTreeSet, path::PathBuf, process::Command};

use fleetsync_common::Backend;
use fleetsync_common::proto::sync::v1::sync_agent_client::SyncAgentClient;
use fleetsync_tests::{
    Scenario,
    fleet::SSH_USER,
    services::{connect, job_outcomes},
};
use serde_json::Value;

/// The Python that `just setup` prepares (grpcio, grpcio-tools, grpcio-health-checking).
fn python() -> String {
    std::env::var("FLEETSYNC_PYTHON").unwrap_or_else(|_| "python3".into())
}

fn repo_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("the workspace")
        .to_owned()
}

/// Stubs generated from `proto/` with grpcio-tools, as the example's README says.
fn generate() -> tempfile::TempDir {
    let root = repo_root();
    let generated = tempfile::tempdir().expect("temp dir");
    let protos: Vec<PathBuf> = std::fs::read_dir(root.join("proto/fleetsync/sync/v1"))
        .expect("proto dir")
        .map(|e| e.expect("entry").path())
        .filter(|p| p.extension().is_some_and(|e| e == "proto"))
        .collect();
    let generate = Command::new(python())
        .args(["-m", "grpc_tools.protoc", "-I"])
        .arg(root.join("proto"))
        .arg(format!("--python_out={}", generated.path().display()))
        .arg(format!("--grpc_python_out={}", generated.path().display()))
        .args(&protos)
        .output()
        .unwrap_or_else(|err| panic!("cannot run {} ({err}): run `just setup`", python()));
    assert!(
        generate.status.success(),
        "grpc_tools.protoc: {}",
        String::from_utf8_lossy(&generate.stderr)
    );
    generated
}

#[tokio::test]
async fn the_python_example_registers_syncs_and_resumes_its_watch() {
    let root = repo_root();
    let generated = generate();

    // Two hosts answer, a third refuses.
    let scenario = Scenario::on(Backend::Sqlite)
        .hosts(3)
        .agents(0)
        .start()
        .await;
    let fleet = &scenario.fleet;
    fleet.host(2).stop();
    let agent = scenario.start_process(&scenario.agent_process());

    let mut args = vec![
        root.join("examples/python/fleet_sync.py")
            .display()
            .to_string(),
        "--agent".into(),
        agent.addr.to_string(),
        "--user".into(),
        SSH_USER.into(),
        "--drop-after".into(),
        "1".into(),
    ];
    for (i, host) in fleet.hosts().iter().enumerate() {
        args.push("--server".into());
        args.push(format!("py-{i}={}:{}", host.addr(), host.port()));
    }
    let run = tokio::process::Command::new(python())
        .args(&args)
        .env("FLEETSYNC_PY_OUT", generated.path())
        .output();
    let output = tokio::time::timeout(std::time::Duration::from_secs(60), run)
        .await
        .expect("the example ends within 60 s")
        .expect("run the example");
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(
        output.status.code(),
        Some(1),
        "one server refuses, so the example exits 1: {stdout}{stderr}"
    );
    let lines: Vec<Value> = stdout
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{l}: {e}")))
        .collect();
    let of = |kind: &str| -> Vec<&Value> { lines.iter().filter(|l| l["event"] == kind).collect() };

    assert_eq!(of("registered").len(), 3, "{stdout}");
    let started = of("started");
    let job_id = started[0]["job_id"].as_str().expect("job id").to_owned();
    assert_eq!(started[0]["server_count"], 3);
    assert_eq!(
        of("resumed").len(),
        1,
        "the watch was dropped once: {stdout}"
    );
    let outcomes = of("outcome");
    let cursors: BTreeSet<u64> = outcomes
        .iter()
        .map(|o| o["cursor"].as_u64().expect("cursor"))
        .collect();
    assert_eq!(
        cursors.len(),
        3,
        "each outcome once across the resume: {stdout}"
    );
    let summary = of("summary");
    assert_eq!(summary[0]["state"], "DONE");
    assert_eq!(summary[0]["finished"], 3);

    // What the script printed is what the agent stored.
    let mut sync = SyncAgentClient::new(connect(agent.addr).await);
    let stored = job_outcomes(&mut sync, &job_id).await;
    let stored: BTreeSet<(String, String)> = stored
        .iter()
        .map(|o| {
            (
                o.server_name.clone(),
                o.outcome()
                    .as_str_name()
                    .trim_start_matches("OUTCOME_")
                    .to_owned(),
            )
        })
        .collect();
    let printed: BTreeSet<(String, String)> = outcomes
        .iter()
        .map(|o| {
            (
                o["server"].as_str().expect("name").to_owned(),
                o["outcome"].as_str().expect("outcome").to_owned(),
            )
        })
        .collect();
    assert_eq!(printed, stored);
    assert!(printed.contains(&("py-0".to_owned(), "OK".to_owned())));
    assert!(printed.contains(&("py-2".to_owned(), "UNREACHABLE".to_owned())));
    let refused = outcomes
        .iter()
        .find(|o| o["server"] == "py-2")
        .expect("py-2");
    assert_eq!(refused["cause"], "REFUSED");
}

#[test]
fn the_python_example_says_what_is_wrong() {
    let generated = generate();
    let script = repo_root().join("examples/python/fleet_sync.py");
    let run = |args: &[&str]| {
        let output = Command::new(python())
            .arg(&script)
            .args(args)
            .env("FLEETSYNC_PY_OUT", generated.path())
            .output()
            .expect("run python");
        (
            output.status.code(),
            String::from_utf8_lossy(&output.stderr).into_owned(),
        )
    };
    let (code, stderr) = run(&["--server", "no-address"]);
    assert_eq!(code, Some(2), "{stderr}");
    assert!(stderr.contains("expected NAME=HOST:PORT"), "{stderr}");
    let (code, stderr) = run(&["--server", "a=127.0.0.1:22:oracle"]);
    assert_eq!(code, Some(2), "{stderr}");
    assert!(stderr.contains("service must be one of"), "{stderr}");

    // Nothing listens there: a clear message, exit 4 (as the CLI's), no traceback.
    let closed = std::net::TcpListener::bind("127.0.0.1:0")
        .expect("bind")
        .local_addr()
        .expect("addr")
        .to_string();
    let (code, stderr) = run(&["--agent", &closed, "--server", "a=127.0.0.1:22"]);
    assert_eq!(code, Some(4), "{stderr}");
    assert!(stderr.contains("does not answer"), "{stderr}");
    assert!(!stderr.contains("Traceback"), "{stderr}");
}
