//! Running helper commands and locating the workspace's binaries.

use std::{
    path::PathBuf,
    process::{Command, Output},
};

/// Runs a command to completion; panics with its stderr if it fails to start or exits non-zero.
pub fn run(program: &str, args: &[&str]) -> Output {
    let output = Command::new(program)
        .args(args)
        .output()
        .unwrap_or_else(|err| panic!("cannot run {program}: {err} (did `just setup` run?)"));
    assert!(
        output.status.success(),
        "{program} {} failed with {}: {}",
        args.join(" "),
        output.status,
        String::from_utf8_lossy(&output.stderr).trim()
    );
    output
}

/// A finished command as a failed assertion shows it: its exit status, stdout and stderr.
pub fn described(output: &Output) -> String {
    format!(
        "exit {:?}\nstdout: {}\nstderr: {}",
        output.status.code(),
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    )
}

/// The one JSON document a command printed on stdout (a failed assertion otherwise).
pub fn json_document(output: &Output) -> serde_json::Value {
    serde_json::from_slice(&output.stdout)
        .unwrap_or_else(|err| panic!("one JSON document on stdout ({err}): {}", described(output)))
}

/// Runs a command to completion and reports whether it succeeded; for cleanup paths that must
/// not panic.
pub fn run_quiet(program: &str, args: &[&str]) -> bool {
    Command::new(program)
        .args(args)
        .output()
        .map(|output| output.status.success())
        .unwrap_or(false)
}

/// True if a process with this pid exists (and is not a zombie we could still reap).
pub fn pid_alive(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        // The state is the field after the parenthesised command name.
        Ok(stat) => stat
            .rsplit_once(')')
            .and_then(|(_, rest)| rest.split_whitespace().next())
            .is_some_and(|state| state != "Z" && state != "X"),
        Err(_) => false,
    }
}

/// Path of a binary of this workspace (`sync-agent`, `migrator`), built by `cargo test`.
pub fn bin_path(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("current executable");
    // Tests live in target/<profile>/deps/, binaries (the demo) in target/<profile>/.
    let mut dir = exe.parent().expect("executable has a directory");
    if dir.ends_with("deps") {
        dir = dir.parent().expect("target/<profile>");
    }
    let path = dir.join(name);
    assert!(
        path.exists(),
        "{} is not built: run `just test` (or `just build`, then `cargo test --workspace`)",
        path.display()
    );
    path
}

/// A cgroup (v2) that holds a process and everything it ever forks, even after they are
/// reparented: sshd's per-connection processes and the commands they run. Dropping it kills
/// them all and removes the group.
#[derive(Debug)]
pub struct Cgroup {
    path: PathBuf,
}

const CGROUP_PREFIX: &str = "fleetsync-";

impl Cgroup {
    /// Creates an empty cgroup, or `None` where no writable cgroup v2 hierarchy is mounted
    /// (then only the main process is tracked).
    pub fn create() -> Option<Self> {
        let root = cgroup2_root()?;
        reap_stale_cgroups(&root);
        let path = root.join(format!(
            "{CGROUP_PREFIX}{}-{:x}",
            std::process::id(),
            crate::random_u64() >> 16
        ));
        std::fs::create_dir(&path).ok()?;
        Some(Self { path })
    }

    /// The file a process writes its pid to, to join the group.
    pub fn procs_file(&self) -> PathBuf {
        self.path.join("cgroup.procs")
    }

    /// Kills every process in the group and waits (up to 5 s) until it is empty.
    pub fn kill_all(&self) {
        kill_cgroup(&self.path);
    }
}

impl Drop for Cgroup {
    fn drop(&mut self) {
        kill_cgroup(&self.path);
        let _ = std::fs::remove_dir(&self.path);
    }
}

fn kill_cgroup(path: &std::path::Path) {
    let _ = std::fs::write(path.join("cgroup.kill"), "1");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    while std::fs::read_to_string(path.join("cgroup.procs"))
        .is_ok_and(|procs| !procs.trim().is_empty())
        && std::time::Instant::now() < deadline
    {
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
}

fn cgroup2_root() -> Option<PathBuf> {
    ["/sys/fs/cgroup", "/sys/fs/cgroup/unified"]
        .into_iter()
        .map(PathBuf::from)
        .find(|root| root.join("cgroup.controllers").exists() && root.join("cgroup.procs").exists())
}

/// Removes groups left by test processes that were killed before they could clean up.
fn reap_stale_cgroups(root: &std::path::Path) {
    let Ok(entries) = std::fs::read_dir(root) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name();
        let Some(rest) = name.to_str().and_then(|n| n.strip_prefix(CGROUP_PREFIX)) else {
            continue;
        };
        let owner = rest
            .split('-')
            .next()
            .and_then(|pid| pid.parse::<u32>().ok());
        if owner.is_some_and(|pid| !pid_alive(pid)) {
            kill_cgroup(&entry.path());
            let _ = std::fs::remove_dir(entry.path());
        }
    }
}

/// Every cgroup this harness has now (for leak checks).
pub fn list_cgroups() -> Vec<String> {
    let Some(root) = cgroup2_root() else {
        return Vec::new();
    };
    std::fs::read_dir(root)
        .map(|entries| {
            entries
                .flatten()
                .filter_map(|e| e.file_name().to_str().map(str::to_owned))
                .filter(|name| name.starts_with(CGROUP_PREFIX))
                .collect()
        })
        .unwrap_or_default()
}
