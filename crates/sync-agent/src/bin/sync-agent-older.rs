//! `sync-agent-older`: the sync-agent built with the `older-schema-range` feature, whose
//! schema range is the previous release's. The tests run it as the agent a rolling upgrade
//! replaces; `cargo build --release` and `cargo install` never make it.

#[tokio::main]
async fn main() -> std::process::ExitCode {
    fleetsync_sync_agent::entry::main().await
}
