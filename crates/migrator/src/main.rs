//! `migrator`: the control-plane migrator (see `fleetsync_migrator::entry`).

#[tokio::main]
async fn main() -> std::process::ExitCode {
    fleetsync_migrator::entry::main().await
}
