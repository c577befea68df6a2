//! Running the real `migrator` binary from tests.

use std::{
    os::unix::process::ExitStatusExt,
    process::{ExitStatus, Stdio},
    time::Duration,
};

use crate::process::bin_path;

/// What a `migrator` run did.
#[derive(Debug)]
pub struct Run {
    /// Exit status (a signal if it was killed).
    pub status: ExitStatus,
    /// Everything on stdout.
    pub stdout: String,
    /// Everything on stderr.
    pub stderr: String,
}

impl Run {
    /// The exit code; panics if the process was killed.
    pub fn code(&self) -> i32 {
        self.status.code().unwrap_or_else(|| {
            panic!(
                "killed by signal {:?}: {}",
                self.status.signal(),
                self.stderr
            )
        })
    }

    /// True if SIGKILL ended it.
    pub fn killed(&self) -> bool {
        self.status.signal() == Some(9)
    }
}

/// Runs `migrator ARGS... --database-url URL` (a minute at most).
pub async fn migrator(url: &str, args: &[&str]) -> Run {
    run_binary("migrator", url, args).await
}

/// Runs `migrator-crash ARGS... --database-url URL`: the migrator with `--crash-at` (`just
/// build` makes it).
pub async fn migrator_crash(url: &str, args: &[&str]) -> Run {
    run_binary("migrator-crash", url, args).await
}

async fn run_binary(binary: &str, url: &str, args: &[&str]) -> Run {
    let child = tokio::process::Command::new(bin_path(binary))
        .args(args)
        .args(["--database-url", url])
        .env_remove("RUST_LOG")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("spawn migrator");
    let output = tokio::time::timeout(Duration::from_secs(60), child.wait_with_output())
        .await
        .expect("migrator finishes within 60s")
        .expect("wait for migrator");
    Run {
        status: output.status,
        stdout: String::from_utf8_lossy(&output.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&output.stderr).into_owned(),
    }
}

/// Runs `check` for every crash point, three at a time (each in a database of its own, as the
/// checks make them); returns how many ran. A failed check fails the test.
pub async fn at_each_point<F, Fut>(points: Vec<String>, check: F) -> usize
where
    F: Fn(String) -> Fut,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let mut tasks = tokio::task::JoinSet::new();
    let mut points = points.into_iter();
    let mut checked = 0;
    loop {
        while tasks.len() < 3 {
            let Some(point) = points.next() else { break };
            tasks.spawn(check(point));
        }
        match tasks.join_next().await {
            Some(result) => {
                result.expect("crash point task");
                checked += 1;
            }
            None => return checked,
        }
    }
}

/// Runs the futures at once (one task each) and returns their outputs, in order.
pub async fn concurrently<F>(futures: impl Iterator<Item = F>) -> Vec<F::Output>
where
    F: std::future::Future + Send + 'static,
    F::Output: Send + 'static,
{
    let handles: Vec<_> = futures.map(tokio::spawn).collect();
    let mut out = Vec::new();
    for handle in handles {
        out.push(handle.await.expect("task"));
    }
    out
}
