//! The README's operator commands, run as written against the real binaries, a real agent and
//! a real database: every `migrator` and `sync-agent` line of its `sh` blocks. A flag or command
//! the binaries do not know (a usage error), or an agent or database they cannot use, fails
//! the test; so the README and the binaries cannot drift apart unnoticed.

use std::{
    path::{Path, PathBuf},
    process::Command,
};

use fleetsync_common::Backend;
use fleetsync_tests::{
    Scenario,
    catalog::{add_mariadb_everywhere, count, insert_servers},
    process::bin_path,
};

/// Every line of a fenced `sh` block that runs one of the binaries, with its comment removed.
fn commands(readme: &str) -> Vec<String> {
    let mut lines = Vec::new();
    let mut in_sh = false;
    for line in readme.lines() {
        if line.starts_with("```") {
            in_sh = line.trim() == "```sh" && !in_sh;
            continue;
        }
        let command = line.split(" #").next().unwrap_or_default().trim();
        if in_sh && (command.starts_with("migrator ") || command.starts_with("sync-agent ")) {
            lines.push(command.to_owned());
        }
    }
    lines
}

/// The body of the README's first fenced block in `language`.
fn block(readme: &str, language: &str) -> String {
    let fence = format!("```{language}\n");
    let start = readme.find(&fence).expect("the block") + fence.len();
    let end = start + readme[start..].find("```").expect("its end");
    readme[start..end].to_owned()
}

/// The line with its placeholders filled: optional `[--flag value]` groups given, `JOB_ID` and
/// `ID` replaced by a real job and server.
fn filled(line: &str, job: &str, server: i64) -> String {
    line.replace(['[', ']'], "")
        .replace("JOB_ID", job)
        .replace(" ID", &format!(" {server}"))
}

#[tokio::test]
async fn every_operator_command_in_the_readme_runs_as_written() {
    let readme_path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../README.md");
    let readme = std::fs::read_to_string(&readme_path).expect("read README.md");
    let mut lines = commands(&readme);
    assert!(lines.len() >= 15, "the README's commands: {lines:?}");
    // Removing a server comes last, so that the lines before it find every server.
    lines.sort_by_key(|l| l.contains(" remove "));

    let scenario = Scenario::on(Backend::Sqlite).agents(0).start().await;
    let (db, dir) = (&scenario.db, scenario.dir());
    let conn = db.connect().await;
    // Refused addresses: every sync ends at once (UNREACHABLE). Ids 1..=8 exist.
    insert_servers(&conn, 8, 1, |_| "127.0.0.1".into()).await;
    add_mariadb_everywhere(&conn, "").await;
    assert_eq!(count(&conn, "SELECT MAX(id) FROM servers").await, 8);
    let agent = scenario.start_process(&scenario.agent_process());
    let url = format!("http://{}", agent.addr);
    // The import examples, as the files the import line reads; both import cleanly. Their
    // addresses become refused loopback ones: the syncs below must not leave the machine.
    for (language, file) in [("csv", "fleet.csv"), ("jsonl", "fleet.jsonl")] {
        let example = block(&readme, language)
            .replace("10.0.0.5", "127.0.0.1")
            .replace("db-2.example.net", "localhost")
            .replace("2222", "1");
        assert!(
            !example.contains("10.0.") && !example.contains(".example"),
            "an address the test does not know in the README's {language} example"
        );
        std::fs::write(dir.join(file), example).expect("write");
        let imported = Command::new(bin_path("sync-agent"))
            .args(["servers", "import", file, "-o", "json", "--agent-url", &url])
            .current_dir(dir)
            .output()
            .expect("run sync-agent");
        let report = fleetsync_tests::process::json_document(&imported);
        assert_eq!(imported.status.code(), Some(0), "{file}: {report}");
        assert_eq!(
            report["rejected"],
            serde_json::json!([]),
            "{file}: {report}"
        );
    }
    // A job for `JOB_ID`.
    let started = Command::new(bin_path("sync-agent"))
        .args(["sync", "--all", "-o", "json", "--agent-url", &url])
        .output()
        .expect("run sync-agent");
    let started: serde_json::Value =
        serde_json::from_slice(&started.stdout).expect("the started job as JSON");
    let job_id = started["job_id"].as_str().expect("a job id").to_owned();

    let binaries: PathBuf = bin_path("sync-agent")
        .parent()
        .expect("the binaries' directory")
        .to_owned();
    let path = format!(
        "{}:{}",
        binaries.display(),
        std::env::var("PATH").unwrap_or_default()
    );
    for line in &lines {
        let mut command = filled(line, &job_id, 3);
        // System paths (`> /etc/bash_completion.d/...`, `--dir /usr/local/share/man/man1`) go
        // under the test's directory instead.
        for path in line
            .split_whitespace()
            .filter(|t| t.starts_with("/etc/") || t.starts_with("/usr/"))
        {
            let local = dir.join(path.trim_start_matches('/'));
            std::fs::create_dir_all(local.parent().expect("a parent")).expect("create dirs");
            command = command.replace(path, local.to_str().expect("utf-8"));
        }
        // A server is started only to see that its command line parses.
        if command.contains(" serve ") {
            command.push_str(" --help");
        }
        let output = Command::new("sh")
            .args(["-c", &command])
            .current_dir(dir)
            .env("PATH", &path)
            .env("DATABASE_URL", db.url())
            .env("FLEETSYNC_AGENT_URL", &url)
            .env("FLEETSYNC_TIMEOUT", "20s")
            .env_remove("FLEETSYNC_OUTPUT")
            .output()
            .expect("run sh");
        let stderr = String::from_utf8_lossy(&output.stderr);
        // 0 every server OK, 1 some not (the fleet is unreachable here); never a usage error
        // (2), a refusal (3) or an agent out of reach (4).
        assert!(
            matches!(output.status.code(), Some(0 | 1)),
            "README line `{line}` (run as `{command}`) ended {:?}:\n{}{stderr}",
            output.status.code(),
            String::from_utf8_lossy(&output.stdout)
        );
    }
}

#[test]
fn placeholders_are_filled() {
    assert_eq!(
        filled("sync-agent job JOB_ID [--watch]", "j1", 3),
        "sync-agent job j1 --watch"
    );
    assert_eq!(
        filled(
            "sync-agent jobs [--origin migration] [--server ID]",
            "j1",
            3
        ),
        "sync-agent jobs --origin migration --server 3"
    );
}
