//! The operator commands in scripts, pipelines and service managers, run as the real binaries:
//! documented exit statuses (0 every server OK, 1 some server not OK, 2 usage, 3 refused by the
//! agent, 4 agent unreachable), a timeout on every call, one JSON document on stdout for every
//! failure under `-o json`, and a quiet end when the reader of stdout goes away.

use std::{
    path::Path,
    process::{Command, Output, Stdio},
    time::{Duration, Instant},
};

use fleetsync_common::Backend;
use fleetsync_tests::{
    Scenario, TestDb,
    bench::silent_listener,
    catalog::{add_mariadb_everywhere, count, insert_servers},
    process::{bin_path, described as text, json_document as document},
    services::{ServeProcess, migrate},
};

fn run(binary: &str, args: &[&str]) -> Output {
    run_in(binary, args, Path::new("."))
}

fn run_in(binary: &str, args: &[&str], dir: &Path) -> Output {
    Command::new(bin_path(binary))
        .args(args)
        .current_dir(dir)
        .env_remove("FLEETSYNC_OUTPUT")
        .env_remove("FLEETSYNC_TIMEOUT")
        .env_remove("FLEETSYNC_AGENT_URL")
        .output()
        .expect("run the binary")
}

fn code(output: &Output) -> i32 {
    output.status.code().expect("exited, not killed")
}

/// The command ended with `status`.
fn exits(output: &Output, status: i32) {
    assert_eq!(code(output), status, "{}", text(output));
}

/// `stream` (the output's stdout or stderr) contains `what`.
fn shows(stream: &[u8], what: &str, output: &Output) {
    assert!(
        String::from_utf8_lossy(stream).contains(what),
        "{what:?}: {}",
        text(output)
    );
}

/// `stream` starts with `what`.
fn begins(stream: &[u8], what: &str, output: &Output) {
    assert!(
        String::from_utf8_lossy(stream).starts_with(what),
        "{what:?}: {}",
        text(output)
    );
}

/// An agent (the real binary) on a fresh SQLite database with `servers` servers at
/// 127.0.0.1:1, where every connection is refused at once, each with MariaDB.
struct Agent {
    conn: fleetsync_common::Db,
    url: String,
    _process: ServeProcess,
    scenario: Scenario,
}

async fn agent_with(servers: usize) -> Agent {
    let scenario = Scenario::on(Backend::Sqlite).agents(0).start().await;
    let conn = scenario.db.connect().await;
    insert_servers(&conn, servers, 1, |_| "127.0.0.1".into()).await;
    add_mariadb_everywhere(&conn, "").await;
    let process = scenario.start_process(&scenario.agent_process());
    Agent {
        url: format!("http://{}", process.addr),
        conn,
        _process: process,
        scenario,
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn exit_statuses_say_what_happened() {
    let agent = agent_with(2).await;
    let (db, conn, url) = (&agent.scenario.db, &agent.conn, &agent.url);
    let first = count(conn, "SELECT MIN(id) FROM servers").await.to_string();
    let cli = |args: &[&str]| {
        run(
            "sync-agent",
            &[args, &["--agent-url", url.as_str()]].concat(),
        )
    };

    // Servers that did not end OK: 1, in both outputs.
    let synced = cli(&["sync", "--all", "--force", "--watch"]);
    exits(&synced, 1);
    shows(&synced.stdout, "UNREACHABLE (refused)", &synced);
    let synced = cli(&["sync", "--all", "--force", "--watch", "-o", "json"]);
    exits(&synced, 1);
    let synced = document(&synced);
    assert_eq!(synced["outcomes"][0]["outcome"], "UNREACHABLE");
    let job_id = synced["job"]["job_id"].as_str().expect("job id").to_owned();
    let job = cli(&["job", &job_id, "-o", "json"]);
    exits(&job, 1);
    assert_eq!(document(&job)["job"]["outcomes"]["UNREACHABLE"], 2);

    // `check` says why, and exits 1: `check 3 && deploy` does not deploy.
    let check = cli(&["check", &first]);
    exits(&check, 1);
    shows(&check.stdout, "UNREACHABLE (refused)", &check);
    let check = cli(&["check", &first, "-o", "json"]);
    exits(&check, 1);
    let check = document(&check);
    assert_eq!(
        (check["outcome"].as_str(), check["cause"].as_str()),
        (Some("UNREACHABLE"), Some("REFUSED")),
        "{check}"
    );

    // In backoff now: a sync skips them (a skip is not a run), and `servers` shows the attempt
    // that put them offline, and when they are probed next.
    let skipped = cli(&["sync", "--all", "--watch", "-o", "json"]);
    exits(&skipped, 1);
    let skipped = document(&skipped);
    assert_eq!(skipped["outcomes"][0]["outcome"], "SKIPPED_OFFLINE");
    assert_eq!(
        skipped["job"]["outcomes"]["SKIPPED_OFFLINE"], 2,
        "{skipped}"
    );
    let listed = document(&cli(&["servers", "-o", "json"]));
    let server = &listed[0];
    assert_eq!(
        (
            server["last_outcome"]["outcome"].as_str(),
            server["last_outcome"]["cause"].as_str(),
            server["last_attempt"].is_null(),
            server["reachability"].as_str(),
            server["next_probe_at"].is_string(),
        ),
        (
            Some("UNREACHABLE"),
            Some("REFUSED"),
            true,
            Some("offline"),
            true
        ),
        "{server}"
    );
    let listed = cli(&["servers"]);
    shows(&listed.stdout, "UNREACHABLE (refused)", &listed);

    // Started, not watched; listings: 0.
    for args in [
        &["sync", "--all"][..],
        &["servers"],
        &["jobs"],
        &["servers", "-o", "json"],
    ] {
        let ran = cli(args);
        assert_eq!(code(&ran), 0, "{args:?}: {}", text(&ran));
    }

    // The agent refuses: 3, the error as a JSON document on stdout, or a line on stderr.
    let unknown = cli(&["job", "no-such-job", "-o", "json"]);
    exits(&unknown, 3);
    let error = &document(&unknown)["error"];
    assert_eq!(
        (
            error["exit"].as_u64(),
            error["kind"].as_str(),
            error["grpc_code"].as_str()
        ),
        (Some(3), Some("refused"), Some("NotFound")),
        "{error}"
    );
    let unknown = cli(&["job", "no-such-job"]);
    exits(&unknown, 3);
    assert!(unknown.stdout.is_empty(), "{}", text(&unknown));
    begins(&unknown.stderr, "error: NotFound: ", &unknown);

    // reset-host-key speaks JSON too.
    let reset = cli(&["reset-host-key", &first, "-o", "json"]);
    exits(&reset, 0);
    let reset = document(&reset);
    assert_eq!(reset["server_id"].to_string(), first);
    assert!(reset["forgotten"].is_null(), "{reset}");
    let reset = cli(&["reset-host-key", "999999", "-o", "json"]);
    exits(&reset, 3);
    assert_eq!(document(&reset)["error"]["grpc_code"], "NotFound");

    // Register, change and remove a server from the CLI (the Fleet API underneath).
    let added = cli(&[
        "servers",
        "add",
        "db-9",
        "127.0.0.1",
        "--port",
        "1",
        "-o",
        "json",
    ]);
    exits(&added, 0);
    let added = document(&added);
    assert_eq!(added["created"], true, "{added}");
    let id = added["id"].to_string();
    let changed = cli(&[
        "servers",
        "add",
        "db-9",
        "127.0.0.1",
        "--port",
        "2",
        "--service",
        "postgresql",
        "--id",
        &id,
    ]);
    exits(&changed, 0);
    assert!(
        String::from_utf8_lossy(&changed.stdout)
            .contains(&format!("server {id} db-9 (127.0.0.1:2) updated")),
        "{}",
        text(&changed)
    );
    // With the host key the panel knows: pinned at once.
    let keys = tempfile::tempdir().expect("temp dir");
    let key_path = keys.path().join("host");
    let generated = Command::new("ssh-keygen")
        .args(["-q", "-t", "ed25519", "-N", "", "-f"])
        .arg(&key_path)
        .output()
        .expect("run ssh-keygen");
    assert!(generated.status.success(), "{generated:?}");
    let public = std::fs::read_to_string(key_path.with_extension("pub")).expect("public key");
    let pinned = cli(&[
        "servers",
        "add",
        "db-11",
        "127.0.0.1",
        "--port",
        "1",
        "--host-key",
        public.trim(),
        "-o",
        "json",
    ]);
    exits(&pinned, 0);
    let listed = document(&cli(&["servers", "-o", "json"]));
    let db11 = listed
        .as_array()
        .and_then(|l| l.iter().find(|s| s["name"] == "db-11"))
        .unwrap_or_else(|| panic!("db-11 listed: {listed}"));
    assert!(
        db11["host_key"]
            .as_str()
            .is_some_and(|k| k.starts_with("SHA256:")),
        "{db11}"
    );
    let db9 = listed
        .as_array()
        .and_then(|l| l.iter().find(|s| s["name"] == "db-9"))
        .unwrap_or_else(|| panic!("db-9 listed: {listed}"));
    assert_eq!(
        (db9["port"].as_u64(), db9["database_service"].as_str()),
        (Some(2), Some("postgresql"))
    );
    let invalid = cli(&["servers", "add", "db-10", "999.1.1.1"]);
    exits(&invalid, 3);
    shows(&invalid.stderr, "InvalidArgument", &invalid);
    let removed = cli(&["servers", "remove", &id, "-o", "json"]);
    exits(&removed, 0);
    assert_eq!(document(&removed)["removed"], true);
    let again = cli(&["servers", "remove", &id]);
    exits(&again, 3);

    // Flags that only serving uses are offered only by `serve`.
    for (binary, command, has) in [
        ("migrator", "status", false),
        ("migrator", "plan", false),
        ("migrator", "serve", true),
        ("sync-agent", "serve", true),
    ] {
        let help = run(binary, &[command, "--help"]);
        let help = String::from_utf8_lossy(&help.stdout);
        for flag in ["--shutdown-grace", "--drain-delay"] {
            assert_eq!(
                help.contains(flag),
                has,
                "{binary} {command} --help and {flag}"
            );
        }
    }

    // Usage: 2.
    let zero = cli(&["servers", "--timeout", "0s"]);
    exits(&zero, 2);
    let zero = run(
        "sync-agent",
        &["serve", "--concurrency", "0", "--database-url", db.url()],
    );
    exits(&zero, 2);
    shows(&zero.stderr, "--concurrency", &zero);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_silent_or_absent_agent_ends_the_command_with_4() {
    // Accepts TCP and never answers, as a hung process or a black-holing proxy would.
    let (port, _listener) = silent_listener().await;
    for url in [
        format!("http://127.0.0.1:{port}"),
        format!("https://127.0.0.1:{port}"),
    ] {
        let started = Instant::now();
        let silent = run(
            "sync-agent",
            &["servers", "--agent-url", &url, "--timeout", "1s"],
        );
        assert_eq!(code(&silent), 4, "{url}: {}", text(&silent));
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "{url}: {:?}",
            started.elapsed()
        );
        assert!(
            String::from_utf8_lossy(&silent.stderr).contains("did not answer within 1s"),
            "{url}: {}",
            text(&silent)
        );
    }
    // The timeout from the environment, and the failure as JSON.
    let silent = Command::new(bin_path("sync-agent"))
        .args(["check", "1", "-o", "json"])
        .env("FLEETSYNC_AGENT_URL", format!("http://127.0.0.1:{port}"))
        .env("FLEETSYNC_TIMEOUT", "1s")
        .output()
        .expect("run");
    exits(&silent, 4);
    let error = &document(&silent)["error"];
    assert_eq!(error["kind"], "unreachable", "{error}");

    // Nothing listening: 4, each cause said once.
    let absent = run(
        "sync-agent",
        &["servers", "--agent-url", "http://127.0.0.1:1"],
    );
    exits(&absent, 4);
    let stderr = String::from_utf8_lossy(&absent.stderr);
    assert!(
        stderr.contains("cannot reach the sync-agent at http://127.0.0.1:1"),
        "{stderr}"
    );
    assert!(stderr.contains("Connection refused"), "{stderr}");
    assert!(
        !stderr.contains("tcp connect error: tcp connect error"),
        "{stderr}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_closed_stdout_ends_the_command_quietly() {
    let agent = agent_with(50).await;
    let (db, url) = (&agent.scenario.db, &agent.url);
    let unmigrated = TestDb::sqlite().await;
    for (binary, args) in [
        ("sync-agent", vec!["servers", "--agent-url", url.as_str()]),
        ("sync-agent", vec!["jobs", "--agent-url", url.as_str()]),
        ("migrator", vec!["plan", "--database-url", unmigrated.url()]),
        ("migrator", vec!["status", "--database-url", db.url()]),
    ] {
        let mut child = Command::new(bin_path(binary))
            .args(&args)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn");
        // The reader goes away before the first line (`| head -0`).
        drop(child.stdout.take());
        let ended = child.wait_with_output().expect("wait");
        assert_eq!(code(&ended), 0, "{binary} {args:?}: {}", text(&ended));
        assert!(
            !String::from_utf8_lossy(&ended.stderr).contains("panicked"),
            "{binary} {args:?}: {}",
            text(&ended)
        );
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn the_migrator_reports_failures_as_json_and_names_what_it_opened() {
    let db = TestDb::sqlite().await;
    migrate(db.url()).await;
    // A version that does not exist is a usage error (2), said as one JSON document.
    let unknown = run(
        "migrator",
        &[
            "plan",
            "--target",
            "42",
            "-o",
            "json",
            "--database-url",
            db.url(),
        ],
    );
    exits(&unknown, 2);
    let error = &document(&unknown)["error"];
    assert_eq!(error["exit"], 2, "{error}");
    assert!(
        error["message"]
            .as_str()
            .is_some_and(|m| m.contains("no migration has version 42")),
        "{error}"
    );
    let unknown = run(
        "migrator",
        &[
            "migrate",
            "--no-dispatch",
            "--target",
            "42",
            "--database-url",
            db.url(),
        ],
    );
    exits(&unknown, 2);
    // A database that cannot be reached: 1, and JSON.
    let down = run(
        "migrator",
        &[
            "status",
            "-o",
            "json",
            "--database-url",
            "postgres://fleetsync@127.0.0.1:1/none",
        ],
    );
    exits(&down, 1);
    assert_eq!(document(&down)["error"]["exit"], 1);

    // The agent started from another directory with a relative SQLite URL: the error names
    // the file it opened.
    let elsewhere = tempfile::tempdir().expect("temp dir");
    let agent = fleetsync_tests::services::serve_command("sync-agent", elsewhere.path())
        .args([
            "--listen",
            "127.0.0.1:0",
            "--database-url",
            "sqlite://fleetsync.db",
        ])
        .current_dir(elsewhere.path())
        .output()
        .expect("run the agent");
    assert_ne!(code(&agent), 0, "{}", text(&agent));
    let opened = elsewhere.path().join("fleetsync.db");
    shows(&agent.stderr, &opened.display().to_string(), &agent);
}

#[test]
fn completions_and_man_pages_come_from_the_command_line_definitions() {
    for (binary, flag, subcommand) in [
        ("sync-agent", "--agent-url", "serve"),
        ("migrator", "--database-url", "migrate"),
    ] {
        for shell in ["bash", "zsh", "fish"] {
            let script = run(binary, &["completions", shell]);
            exits(&script, 0);
            // fish writes long flags without their dashes (`-l agent-url`).
            shows(&script.stdout, flag.trim_start_matches('-'), &script);
            shows(&script.stdout, subcommand, &script);
        }
        let page = run(binary, &["man"]);
        exits(&page, 0);
        shows(&page.stdout, &format!(".TH {binary} 1"), &page);
        shows(&page.stdout, subcommand, &page);
        let dir = tempfile::tempdir().expect("temp dir");
        let pages = run(
            binary,
            &["man", "--dir", dir.path().to_str().expect("utf-8")],
        );
        exits(&pages, 0);
        for name in [format!("{binary}.1"), format!("{binary}-{subcommand}.1")] {
            let text = std::fs::read_to_string(dir.path().join(&name))
                .unwrap_or_else(|e| panic!("{name}: {e}"));
            assert!(text.contains(".SH"), "{name}: {text}");
        }
    }
}
