//! `sync-agent`: the sync-agent's command line (see `fleetsync_sync_agent::entry`).

#[tokio::main]
async fn main() -> std::process::ExitCode {
    fleetsync_sync_agent::entry::main().await
}
